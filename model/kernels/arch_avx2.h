// x86 AVX2 + FMA (LC_AVX2): qlinear.cpp's activation quantizer and tile product on 256-bit registers, for
// CPUs without AVX-512 (Intel since the 12th generation, AMD before Zen 4). A tile's 64-byte vectors
// (16 rows x 4 inputs) are read as two halves, rows 0-7 and rows 8-15. vpmaddubsw multiplies unsigned
// codes by signed activations into 16-bit pair sums, vpmaddwd widens them to one 32-bit sum per row.
// 16-bit sums saturate, so: 4 bit (codes 0..15) sums a whole block in 16 bits (at most 8 x 2 x 15 x 127 =
// 30480), 8 bit takes the codes as signed (code - 128) with the sign moved onto x, as llama.cpp does for
// Q8_0 (a pair is at most 2 x 128 x 127 = 32512), and corrects the offset for the 128 it took away.
// With LC_AVXVNNI too (the avxvnni variant: Intel since the 12th generation, AMD Zen 5), the 256-bit
// vpdpbusd does all of that in one instruction, exactly, in 32 bits: the codes stay unsigned in both widths.
#pragma once

#include <immintrin.h>

#include "qlinear.h"

namespace lc {
namespace {

// Up to this many activation rows (decoding) also get Act::wide: each 4 inputs already broadcast across a
// vector, read by vpmaddubsw from memory. Broadcasting them in registers instead took 8 of the 16 and
// spilled the sums to the stack (int4, M=1: ~20% slower).
constexpr int64_t WIDE_ROWS = 2;

inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

inline int32_t hsum8(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1)));
}

inline __m256i bcast4(const int8_t* p) {
  int32_t v;
  memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

void quantize_row(const float* x, int64_t K, int64_t G, Act a) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t b = 0; b < K / 32; ++b) {
    __m256 v[4];
    __m256 mx = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(x + 32 * b + 8 * i);
      mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v[i]));
    }
    const float amax = hmax8(mx), d = amax / 127.0f, id = amax > 0 ? 127.0f / amax : 0.0f;
    a.d[b] = d;
    __m256i q[4];
    for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], _mm256_set1_ps(id)));  // nearest even
    // packs work per 128-bit lane: the permute puts the 32 bytes back in input order
    const __m256i q16 = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    _mm256_storeu_si256((__m256i*)(a.q + 32 * b), _mm256_permutevar8x32_epi32(q16, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    a.gsum[b * 32 / G] += d * (float)hsum8(_mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3])));
  }
  if (a.wide)
    for (int64_t k = 0; k < K; k += 4) _mm256_storeu_si256((__m256i*)(a.wide + 8 * k), bcast4(a.q + k));
}

// An empty asm that reads and writes `v` in a register: each row's running sum stays one chain of additions
// in a register. Without it GCC reassociated the additions of the unrolled block loop into trees whose
// partial sums spilled to the stack (prefill, four activation rows per pass, measurably slower).
inline void in_register(__m256i& v) { __asm__("" : "+x"(v)); }

// Inputs k..k+3 of an activation row, repeated across a vector (from Act::wide when WIDE).
template <bool WIDE>
inline __m256i x4(const Act& a, int64_t k) {
  return WIDE ? _mm256_loadu_si256((const __m256i*)(a.wide + 8 * k)) : bcast4(a.q + k);
}

// sum_k q[row][k] * xq[k] over one block of 32 inputs for the 8 rows of half `h` of a tile, for NR
// activation rows at once (the weights are loaded and unpacked once for all of them).
template <int BITS, int NR, bool WIDE>
inline void half_block_dot(const uint8_t* block, int h, const Act* acts, int64_t b, __m256i sums[NR]) {
  for (int r = 0; r < NR; ++r) sums[r] = _mm256_setzero_si256();
#ifdef LC_AVXVNNI
  for (int t = 0; t < (BITS == 4 ? 4 : 8); ++t) {  // 4 bit: as below; 8 bit: vector t holds inputs 4t..
    const __m256i v = _mm256_loadu_si256((const __m256i*)(block + 64 * t + 32 * h));
    if constexpr (BITS == 4) {
      const __m256i low = _mm256_set1_epi8(0x0f);
      const __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
      for (int r = 0; r < NR; ++r) {
        sums[r] = _mm256_dpbusd_avx_epi32(sums[r], lo, x4<WIDE>(acts[r], 32 * b + 4 * t));
        sums[r] = _mm256_dpbusd_avx_epi32(sums[r], hi, x4<WIDE>(acts[r], 32 * b + 16 + 4 * t));
        in_register(sums[r]);
      }
    } else {
      for (int r = 0; r < NR; ++r) {
        sums[r] = _mm256_dpbusd_avx_epi32(sums[r], v, x4<WIDE>(acts[r], 32 * b + 4 * t));
        in_register(sums[r]);
      }
    }
  }
#else
  const __m256i ones = _mm256_set1_epi16(1);
  if constexpr (BITS == 4) {
    const __m256i low = _mm256_set1_epi8(0x0f);
    __m256i p[NR];
    for (int r = 0; r < NR; ++r) p[r] = _mm256_setzero_si256();
    for (int t = 0; t < 4; ++t) {  // vector t: low nibbles inputs 4t.., high nibbles inputs 16 + 4t..
      const __m256i v = _mm256_loadu_si256((const __m256i*)(block + 64 * t + 32 * h));
      const __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
      for (int r = 0; r < NR; ++r) {
        p[r] = _mm256_add_epi16(p[r], _mm256_maddubs_epi16(lo, x4<WIDE>(acts[r], 32 * b + 4 * t)));
        p[r] = _mm256_add_epi16(p[r], _mm256_maddubs_epi16(hi, x4<WIDE>(acts[r], 32 * b + 16 + 4 * t)));
        in_register(p[r]);
      }
    }
    for (int r = 0; r < NR; ++r) sums[r] = _mm256_madd_epi16(p[r], ones);
  } else {
    const __m256i flip = _mm256_set1_epi8((char)0x80);
    for (int j = 0; j < 8; ++j) {
      const __m256i w = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(block + 64 * j + 32 * h)), flip);
      const __m256i aw = _mm256_abs_epi8(w);
      for (int r = 0; r < NR; ++r) {
        const __m256i x = _mm256_sign_epi8(x4<WIDE>(acts[r], 32 * b + 4 * j), w);
        sums[r] = _mm256_add_epi32(sums[r], _mm256_madd_epi16(_mm256_maddubs_epi16(aw, x), ones));
        in_register(sums[r]);
      }
    }
  }
#endif
}

// Rows [8 h0, 8 (h0 + HALVES)) of one tile of 16 weight rows against NR activation rows: out[r][i] = y of
// activation row r, weight row i. Both halves in one pass over the tile for a row or two (decoding: the
// work is spread evenly over the weights as they stream in), one half per pass for more rows (prefill:
// their sums would not fit the 16 registers).
template <int BITS, int NR, int HALVES, bool WIDE>
inline void tile_pass(const uint8_t* tile, int64_t K, int64_t G, const Act* acts, float out[][16], int h0) {
  const int64_t bpg = G / 32, groups = K / G;
  __m256 acc[HALVES][NR];
  for (int h = 0; h < HALVES; ++h)
    for (int r = 0; r < NR; ++r) acc[h][r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* group = tile + g * group_bytes(G, BITS);
    __m256 part[HALVES][NR];  // this group's sum, before the weight scale
    for (int h = 0; h < HALVES; ++h)
      for (int r = 0; r < NR; ++r) part[h][r] = _mm256_setzero_ps();
    for (int64_t j = 0; j < bpg; ++j) {
      const int64_t b = g * bpg + j;
      for (int h = 0; h < HALVES; ++h) {
        __m256i sums[NR];
        half_block_dot<BITS, NR, WIDE>(group + j * block_bytes(BITS), h0 + h, acts, b, sums);
        for (int r = 0; r < NR; ++r)
          part[h][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[r]), _mm256_set1_ps(acts[r].d[b]), part[h][r]);
      }
    }
    for (int h = 0; h < HALVES; ++h) {
      const __m256i words = _mm256_loadu_si256((const __m256i*)(group + bpg * block_bytes(BITS) + 32 * (h0 + h)));
      const __m256 s = _mm256_castsi256_ps(_mm256_slli_epi32(words, 16));
      __m256 m = _mm256_castsi256_ps(_mm256_and_si256(words, _mm256_set1_epi32((int)0xffff0000u)));
#ifndef LC_AVXVNNI
      if (BITS == 8) m = _mm256_fmadd_ps(s, _mm256_set1_ps(128.0f), m);  // the codes were taken as code - 128
#endif
      for (int r = 0; r < NR; ++r)
        acc[h][r] = _mm256_fmadd_ps(m, _mm256_set1_ps(acts[r].gsum[g]), _mm256_fmadd_ps(part[h][r], s, acc[h][r]));
    }
  }
  for (int h = 0; h < HALVES; ++h)
    for (int r = 0; r < NR; ++r) _mm256_storeu_ps(out[r] + 8 * (h0 + h), acc[h][r]);
}

// One tile of 16 weight rows against NR activation rows: out[r][i] = y of activation row r, weight row i.
template <int BITS, int NR>
inline void tile_dot(const uint8_t* tile, int64_t K, int64_t G, const Act* acts, float out[][16]) {
  if constexpr (NR <= WIDE_ROWS) {
    if (acts[0].wide)
      tile_pass<BITS, NR, 2, true>(tile, K, G, acts, out, 0);
    else
      tile_pass<BITS, NR, 2, false>(tile, K, G, acts, out, 0);
  } else {
    tile_pass<BITS, NR, 1, false>(tile, K, G, acts, out, 0);
    tile_pass<BITS, NR, 1, false>(tile, K, G, acts, out, 1);
  }
}

}  // namespace
}  // namespace lc
