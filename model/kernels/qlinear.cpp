// y = x @ W.T for quantized W, with x quantized on the fly to int8 per block of 32 (AVX512-VNNI).
//
// Weights: unsigned codes q (4 bit: 0..15, 8 bit: 0..255) with a bf16 scale s and a bf16 offset m per
// group of G inputs: w = s * q + m. Output rows come in tiles of 16 (N padded up to a multiple of 16);
// a tile stores its codes block by block (32 inputs), each block as vpdpbusd operands (see load_block),
// and its scales and offsets group by group, 16 rows each: [tile][group][16].
// Activations: per row and block of 32, x ~= d * xq with xq = round(x / d) in [-127, 127].
//
//   y[n] = sum_blocks s(n, g(b)) * d(b) * sum_{k in b} q[n][k] * xq[k]  +  sum_g m(n, g) * sum_{k in g} d * xq[k]
//
// which is exactly sum_k w[n][k] * (d * xq[k]): the offset term sums the quantized x too, so rounding x
// is not amplified by the offset (with exact sums of x, int8 codes stored as q + 128 had 2-4x the error).
// The integer dot products are vpdpbusd (u8 x s8 -> s32, 64 products per instruction), so each weight
// byte is read once per token and decoding runs as fast as memory streams the codes. Built at run time
// by model/qkernel.py; plain C ABI, called through ctypes.

#include "qlinear.h"

namespace lc {
namespace {

constexpr int MT = 4;  // activation rows that share one pass over a tile of weights

struct Act {  // one activation row, quantized
  int8_t* q;      // K values
  float* d;       // K/32 block scales
  float* gsum;    // K/G sums of the quantized x per group
};

void quantize_row(const float* x, int64_t K, int64_t G, Act a) {
  for (int64_t g = 0; g < K / G; ++g) a.gsum[g] = 0.0f;
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

// The codes of block b (32 inputs) of a tile of 16 rows, as 8 vectors: vector j holds inputs 4j..4j+3 of
// each row (row r in bytes 4r..4r+3), the operand layout of vpdpbusd.
template <int BITS>
inline void load_block(const uint8_t* tile, int64_t b, __m512i w[8]) {
  if constexpr (BITS == 8) {
    for (int j = 0; j < 8; ++j) w[j] = _mm512_loadu_si512(tile + 512 * b + 64 * j);
  } else {  // vector t: low nibbles inputs 4t.., high nibbles inputs 16 + 4t..
    const __m512i low = _mm512_set1_epi8(0x0f);
    for (int t = 0; t < 4; ++t) {
      __m512i v = _mm512_loadu_si512(tile + 256 * b + 64 * t);
      w[t] = _mm512_and_si512(v, low);
      w[t + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
    }
  }
}

inline __m512i bcast4(const int8_t* p) {
  int32_t v;
  memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// One tile of 16 weight rows against NR activation rows: out[r][i] = y of activation row r, weight row i.
template <int BITS, int NR>
inline void tile_dot(const uint8_t* tile, const uint16_t* scales, const uint16_t* offsets, int64_t K, int64_t G,
                     const Act* acts, float out[][16]) {
  const int64_t bpg = G / 32, groups = K / G;
  __m512 acc[NR];
  for (int r = 0; r < NR; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 part[NR];  // this group's sum, before the weight scale
    for (int r = 0; r < NR; ++r) part[r] = _mm512_setzero_ps();
    for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) {
      __m512i w[8];
      load_block<BITS>(tile, b, w);
      for (int r = 0; r < NR; ++r) {
        const int8_t* xq = acts[r].q + 32 * b;
        const __m512i z = _mm512_setzero_si512();
        __m512i i0 = _mm512_dpbusd_epi32(z, w[0], bcast4(xq));
        __m512i i1 = _mm512_dpbusd_epi32(z, w[1], bcast4(xq + 4));
        __m512i i2 = _mm512_dpbusd_epi32(z, w[2], bcast4(xq + 8));
        __m512i i3 = _mm512_dpbusd_epi32(z, w[3], bcast4(xq + 12));
        i0 = _mm512_dpbusd_epi32(i0, w[4], bcast4(xq + 16));
        i1 = _mm512_dpbusd_epi32(i1, w[5], bcast4(xq + 20));
        i2 = _mm512_dpbusd_epi32(i2, w[6], bcast4(xq + 24));
        i3 = _mm512_dpbusd_epi32(i3, w[7], bcast4(xq + 28));
        __m512i sum = _mm512_add_epi32(_mm512_add_epi32(i0, i1), _mm512_add_epi32(i2, i3));
        part[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(acts[r].d[b]), part[r]);
      }
    }
    const __m512 s = load_bf16x16(scales + 16 * g, 0xffff), m = load_bf16x16(offsets + 16 * g, 0xffff);
    for (int r = 0; r < NR; ++r)
      acc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(acts[r].gsum[g]), _mm512_fmadd_ps(part[r], s, acc[r]));
  }
  for (int r = 0; r < NR; ++r) _mm512_storeu_ps(out[r], acc[r]);
}

inline void store(void* y, bool y_bf16, int64_t at, const float* v, int64_t n) {
  if (y_bf16) {
    uint16_t* yb = (uint16_t*)y + at;
    for (int64_t i = 0; i < n; ++i) yb[i] = f32_to_bf16(v[i]);
  } else {
    memcpy((float*)y + at, v, sizeof(float) * (size_t)n);
  }
}

// Activation rows quantized for group size G, in per-thread scratch.
struct ActRows {
  std::vector<int8_t> q;
  std::vector<float> d, gs, xf;
  std::vector<Act> acts;

  Act* quantize(const void* x, bool x_bf16, int64_t M, int64_t K, int64_t G, int threads) {
    const int64_t groups = K / G;
    int8_t* qp = scratch(q, (size_t)(M * K));
    float* dp = scratch(d, (size_t)(M * K / 32));
    float* gp = scratch(gs, (size_t)(M * groups));
    float* xp = x_bf16 ? scratch(xf, (size_t)(M * K)) : (float*)x;
    Act* a = scratch(acts, (size_t)M);
#pragma omp parallel for num_threads(threads) schedule(static) if (M >= 8)
    for (int64_t m = 0; m < M; ++m) {
      if (x_bf16)
        for (int64_t k = 0; k < K; ++k) xp[m * K + k] = bf16_to_f32(((const uint16_t*)x)[m * K + k]);
      a[m] = Act{qp + m * K, dp + m * (K / 32), gp + m * groups};
      quantize_row(xp + m * K, K, G, a[m]);
    }
    return a;
  }
};

template <int BITS>
void tile_rows(const QMat& w, int64_t K, int64_t t, const Act* acts, int64_t M, void* y, bool y_bf16, int64_t ldy) {
  const int64_t groups = K / w.group;
  const uint8_t* tile = w.codes + t * 16 * K * BITS / 8;
  const uint16_t *s = w.scales + t * 16 * groups, *o = w.offsets + t * 16 * groups;
  const int64_t rows = w.n - 16 * t < 16 ? w.n - 16 * t : 16;
  for (int64_t m0 = 0; m0 < M; m0 += MT) {
    const int64_t mt = M - m0 < MT ? M - m0 : MT;
    float out[MT][16];
    switch (mt) {
      case 4: tile_dot<BITS, 4>(tile, s, o, K, w.group, acts + m0, out); break;
      case 3: tile_dot<BITS, 3>(tile, s, o, K, w.group, acts + m0, out); break;
      case 2: tile_dot<BITS, 2>(tile, s, o, K, w.group, acts + m0, out); break;
      default: tile_dot<BITS, 1>(tile, s, o, K, w.group, acts + m0, out); break;
    }
    for (int64_t r = 0; r < mt; ++r) store(y, y_bf16, (m0 + r) * ldy + 16 * t, out[r], rows);
  }
}

}  // namespace

void linears(const void* x, bool x_bf16, int64_t M, int64_t K, const QMat* w, int count, void* const* y,
             bool y_bf16, int threads) {
  thread_local ActRows rows;
  const Act* acts = rows.quantize(x, x_bf16, M, K, w[0].group, threads);
  int64_t total = 0;
  for (int i = 0; i < count; ++i) total += (w[i].n + 15) / 16;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t t = 0; t < total; ++t) {
    int i = 0;
    int64_t lt = t;
    while (lt >= (w[i].n + 15) / 16) lt -= (w[i++].n + 15) / 16;
    if (w[i].bits == 4)
      tile_rows<4>(w[i], K, lt, acts, M, y[i], y_bf16, w[i].n);
    else
      tile_rows<8>(w[i], K, lt, acts, M, y[i], y_bf16, w[i].n);
  }
}

}  // namespace lc

using namespace lc;

extern "C" {

// x: M x K, fp32 or bf16 (x_bf16); y: M x N, fp32 or bf16 (y_bf16). K and the group size G are
// multiples of 32, G divides K. Returns 0, or -1 when the arguments do not fit those rules.
int lc_qlinear(const void* x, int x_bf16, int64_t M, int64_t K, const uint8_t* codes, int bits,
               const uint16_t* scales, const uint16_t* offsets, int64_t G, int64_t N, void* y, int y_bf16,
               int threads) {
  const QMat w{codes, scales, offsets, G, bits, N};
  if (!valid(w, K) || threads < 1 || M < 1) return -1;
  void* out[1] = {y};
  linears(x, x_bf16, M, K, &w, 1, out, y_bf16, threads);
  return 0;
}

}
