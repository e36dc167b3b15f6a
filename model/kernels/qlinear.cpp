// y = x @ W.T for quantized W, with x quantized on the fly to int8 per block of 32 (AVX512-VNNI).
//
// Weights: unsigned codes q (4 bit: 0..15, 8 bit: 0..255) with a bf16 scale s and a bf16 offset m per
// group of G inputs: w = s * q + m. Output rows come in tiles of 16 (N padded up to a multiple of 16).
// A tile stores its groups one after the other, each as its codes block by block (32 inputs; each block
// as vpdpbusd operands, see load_block) followed by 16 32-bit words, one per row: s | m << 16. So each
// thread reads one sequential stream: with codes, scales and offsets in three arrays, int4 matmuls
// streamed 7% (this VM's memory slow) to ~35% (fast) fewer bytes per second.
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

// A tile's group: its blocks' codes, then a 32-bit word (scale | offset << 16) for each of the 16 rows.
constexpr int64_t group_bytes(int64_t G, int64_t bits) { return 16 * G * bits / 8 + 64; }
constexpr int64_t tile_bytes(int64_t K, int64_t G, int64_t bits) { return K / G * group_bytes(G, bits); }

// One tile of 16 weight rows against NR activation rows: out[r][i] = y of activation row r, weight row i.
template <int BITS, int NR>
inline void tile_dot(const uint8_t* tile, int64_t K, int64_t G, const Act* acts, float out[][16]) {
  constexpr int64_t block_bytes = 16 * 32 * BITS / 8;
  const int64_t bpg = G / 32, groups = K / G;
  __m512 acc[NR];
  for (int r = 0; r < NR; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* group = tile + g * group_bytes(G, BITS);
    __m512 part[NR];  // this group's sum, before the weight scale
    for (int r = 0; r < NR; ++r) part[r] = _mm512_setzero_ps();
    for (int64_t j = 0; j < bpg; ++j) {
      __m512i w[8];
      load_block<BITS>(group + j * block_bytes, w);
      const int64_t b = g * bpg + j;
      for (int r = 0; r < NR; ++r)
        part[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(block_dot<BITS>(w, acts[r].q + 32 * b)),
                                  _mm512_set1_ps(acts[r].d[b]), part[r]);
    }
    const __m512i words = _mm512_loadu_si512(group + bpg * block_bytes);  // s | m << 16 per row
    const __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(words, 16));
    const __m512 m = _mm512_castsi512_ps(_mm512_and_si512(words, _mm512_set1_epi32((int)0xffff0000u)));
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
  const uint8_t* tile = w.data + t * tile_bytes(K, w.group, BITS);
  const int64_t rows = w.n - 16 * t < 16 ? w.n - 16 * t : 16;
  for (int64_t m0 = 0; m0 < M; m0 += MT) {
    const int64_t mt = M - m0 < MT ? M - m0 : MT;
    float out[MT][16];
    switch (mt) {
      case 4: tile_dot<BITS, 4>(tile, K, w.group, acts + m0, out); break;
      case 3: tile_dot<BITS, 3>(tile, K, w.group, acts + m0, out); break;
      case 2: tile_dot<BITS, 2>(tile, K, w.group, acts + m0, out); break;
      default: tile_dot<BITS, 1>(tile, K, w.group, acts + m0, out); break;
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
int lc_qlinear(const void* x, int x_bf16, int64_t M, int64_t K, const uint8_t* weights, int bits, int64_t G,
               int64_t N, void* y, int y_bf16, int threads) {
  const QMat w{weights, G, bits, N};
  if (!valid(w, K) || threads < 1 || M < 1) return -1;
  void* out[1] = {y};
  linears(x, x_bf16, M, K, &w, 1, out, y_bf16, threads);
  return 0;
}

}
