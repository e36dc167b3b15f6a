// x86 AVX512-VNNI (LC_AVX512): qlinear.cpp's activation quantizer and tile product, 16 weight rows in one
// 512-bit register; vpdpbusd multiplies the unsigned codes by the signed activations, 64 products per
// instruction.
#pragma once

#include <immintrin.h>

#include "qlinear.h"

namespace lc {
namespace {

constexpr int64_t WIDE_ROWS = 0;  // Act::wide unused

void quantize_row(const float* x, int64_t K, int64_t G, Act a) {
  for (int64_t b = 0; b < K / 32; ++b) {
    __m512 v0 = _mm512_loadu_ps(x + 32 * b), v1 = _mm512_loadu_ps(x + 32 * b + 16);
    float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    float d = amax / 127.0f, id = amax > 0 ? 127.0f / amax : 0.0f;
    a.d[b] = d;
    __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(id)));  // round to nearest even
    __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(id)));
    _mm_storeu_si128((__m128i*)(a.q + 32 * b), _mm512_cvtsepi32_epi8(q0));
    _mm_storeu_si128((__m128i*)(a.q + 32 * b + 16), _mm512_cvtsepi32_epi8(q1));
    a.gsum[b * 32 / G] += d * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
  }
}

// One block of 32 inputs of a tile of 16 rows, as 8 vectors: vector j holds inputs 4j..4j+3 of
// each row (row r in bytes 4r..4r+3), the operand layout of vpdpbusd.
// (4 bit: vectors 4-7 hold 16x the codes, the high nibbles left in place; block_dot corrects the sum.)
template <int BITS>
inline void load_block(const uint8_t* block, __m512i w[8]) {
  if constexpr (BITS == 8) {
    for (int j = 0; j < 8; ++j) w[j] = _mm512_loadu_si512(block + 64 * j);
  } else {  // vector t: low nibbles inputs 4t.., high nibbles inputs 16 + 4t..
    const __m512i low = _mm512_set1_epi8(0x0f);
    for (int t = 0; t < 4; ++t) {
      __m512i v = _mm512_loadu_si512(block + 64 * t);
      w[t] = _mm512_and_si512(v, low);
      w[t + 4] = _mm512_andnot_si512(low, v);
    }
  }
}

inline __m512i bcast4(const int8_t* p) {
  int32_t v;
  memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// sum_k q[row][k] * xq[k] over one block of 32 inputs for the 16 rows of `w` (load_block), exactly.
template <int BITS>
inline __m512i block_dot(const __m512i w[8], const int8_t* xq) {
  const __m512i z = _mm512_setzero_si512();
  __m512i i0 = _mm512_dpbusd_epi32(z, w[0], bcast4(xq));
  __m512i i1 = _mm512_dpbusd_epi32(z, w[1], bcast4(xq + 4));
  __m512i i2 = _mm512_dpbusd_epi32(z, w[4], bcast4(xq + 16));
  __m512i i3 = _mm512_dpbusd_epi32(z, w[5], bcast4(xq + 20));
  i0 = _mm512_dpbusd_epi32(i0, w[2], bcast4(xq + 8));
  i1 = _mm512_dpbusd_epi32(i1, w[3], bcast4(xq + 12));
  i2 = _mm512_dpbusd_epi32(i2, w[6], bcast4(xq + 24));
  i3 = _mm512_dpbusd_epi32(i3, w[7], bcast4(xq + 28));
  const __m512i high = _mm512_add_epi32(i2, i3);  // 4 bit: 16x the high nibbles' sum (one shift, not four)
  return _mm512_add_epi32(_mm512_add_epi32(i0, i1), BITS == 4 ? _mm512_srai_epi32(high, 4) : high);
}

// One tile of 16 weight rows against NR activation rows: out[r][i] = y of activation row r, weight row i.
template <int BITS, int NR>
inline void tile_dot(const uint8_t* tile, int64_t K, int64_t G, const Act* acts, float out[][16]) {
  const int64_t bpg = G / 32, groups = K / G;
  __m512 acc[NR];
  for (int r = 0; r < NR; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* group = tile + g * group_bytes(G, BITS);
    __m512 part[NR];  // this group's sum, before the weight scale
    for (int r = 0; r < NR; ++r) part[r] = _mm512_setzero_ps();
    for (int64_t j = 0; j < bpg; ++j) {
      __m512i w[8];
      load_block<BITS>(group + j * block_bytes(BITS), w);
      const int64_t b = g * bpg + j;
      for (int r = 0; r < NR; ++r)
        part[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(block_dot<BITS>(w, acts[r].q + 32 * b)),
                                  _mm512_set1_ps(acts[r].d[b]), part[r]);
    }
    const __m512i words = _mm512_loadu_si512(group + bpg * block_bytes(BITS));  // s | m << 16 per row
    const __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(words, 16));
    const __m512 m = _mm512_castsi512_ps(_mm512_and_si512(words, _mm512_set1_epi32((int)0xffff0000u)));
    for (int r = 0; r < NR; ++r)
      acc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(acts[r].gsum[g]), _mm512_fmadd_ps(part[r], s, acc[r]));
  }
  for (int r = 0; r < NR; ++r) _mm512_storeu_ps(out[r], acc[r]);
}

}  // namespace
}  // namespace lc
