// y = x @ W.T for quantized W, with x quantized on the fly to int8 per block of 32.
//
// Weights: unsigned codes q (4 bit: 0..15, 8 bit: 0..255) with a bf16 scale s and a bf16 offset m per
// group of G inputs: w = s * q + m. Output rows come in tiles of 16 (N padded up to a multiple of 16).
// A tile stores its groups one after the other, each as its codes block by block (32 inputs; each block
// as 8 vectors of 64 bytes, vector j holding inputs 4j..4j+3 of the 16 rows, row r in bytes 4r..4r+3; 4 bit:
// 4 vectors, inputs 16 apart sharing a byte) followed by 16 32-bit words, one per row: s | m << 16. So each
// thread reads one sequential stream: with codes, scales and offsets in three arrays, int4 matmuls
// streamed 7% (this VM's memory slow) to ~35% (fast) fewer bytes per second.
// Activations: per row and block of 32, x ~= d * xq with xq = round(x / d) in [-127, 127].
//
//   y[n] = sum_blocks s(n, g(b)) * d(b) * sum_{k in b} q[n][k] * xq[k]  +  sum_g m(n, g) * sum_{k in g} d * xq[k]
//
// which is exactly sum_k w[n][k] * (d * xq[k]): the offset term sums the quantized x too, so rounding x
// is not amplified by the offset (with exact sums of x, int8 codes stored as q + 128 had 2-4x the error).
// The integer dot products are exact (arch_<variant>.h: vpdpbusd, vpmaddubsw, sdot), so each weight byte
// is read once per token and decoding runs as fast as memory streams the codes. Built at run time by
// model/qkernel.py; plain C ABI, called through ctypes.

#include "qlinear.h"

#if defined(LC_AMX)
#include "arch_amx.h"
#define LC_VARIANT "amx"
#elif defined(LC_AVX512)
#include "arch_avx512.h"
#define LC_VARIANT "avx512"
#elif defined(LC_AVX2)
#include "arch_avx2.h"
#ifdef LC_AVXVNNI
#define LC_VARIANT "avxvnni"
#else
#define LC_VARIANT "avx2"
#endif
#elif defined(LC_NEON)
#include "arch_neon.h"
#define LC_VARIANT "neon"
#else
#error "build with -DLC_AVX512 (and -DLC_AMX), -DLC_AVX2 or -DLC_NEON (model/qkernel.py does)"
#endif

namespace lc {
namespace {

constexpr int MT = 4;  // activation rows that share one pass over a tile of weights

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
  std::vector<int8_t> q, wq;
  std::vector<float> d, gs, xf;
  std::vector<Act> acts;

  Act* quantize(const void* x, bool x_bf16, int64_t M, int64_t K, int64_t G, int threads) {
    const int64_t groups = K / G;
    int8_t* qp = scratch(q, (size_t)(M * K));
    float* dp = scratch(d, (size_t)(M * K / 32));
    float* gp = scratch(gs, (size_t)(M * groups));
    float* xp = x_bf16 ? scratch(xf, (size_t)(M * K)) : (float*)x;
    Act* a = scratch(acts, (size_t)M);
    int8_t* wp = WIDE_ROWS && M <= WIDE_ROWS ? scratch(wq, (size_t)(M * K * 8)) : nullptr;
#pragma omp parallel for num_threads(threads) schedule(static) if (M >= 8)
    for (int64_t m = 0; m < M; ++m) {
      if (x_bf16)
        for (int64_t k = 0; k < K; ++k) xp[m * K + k] = bf16_to_f32(((const uint16_t*)x)[m * K + k]);
      a[m] = Act{qp + m * K, dp + m * (K / 32), gp + m * groups, wp ? wp + m * K * 8 : nullptr};
      for (int64_t g = 0; g < groups; ++g) a[m].gsum[g] = 0.0f;  // quantize_row adds each block's sum
      quantize_row(xp + m * K, K, G, a[m]);
    }
    return a;
  }
};

// Tile t of linears()' tiles, all matrices' one after the other: (its matrix, its index there).
inline int64_t tile_of(const QMat* w, int64_t t, int& i) {
  i = 0;
  while (t >= (w[i].n + 15) / 16) t -= (w[i++].n + 15) / 16;
  return t;
}

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

#ifdef LC_AMX
// linears() for M >= AMX_ROWS: the rows in chunks of 16 (amx_gather), each thread's tiles against every chunk.
void amx_linears(const Act* acts, int64_t M, int64_t K, const QMat* w, void* const* y, bool y_bf16, int64_t total,
                 int threads) {
  thread_local std::vector<int8_t> q;
  thread_local std::vector<float> d, gs;
  const int64_t chunks = (M + 15) / 16, G = w[0].group;
  int8_t* qp = scratch(q, (size_t)(chunks * 16 * K));
  float* dp = scratch(d, (size_t)(chunks * K / 2));
  float* gp = scratch(gs, (size_t)(chunks * 16 * (K / G)));
  auto chunk = [&](int64_t c) { return AmxRows{qp + c * 16 * K, dp + c * K / 2, gp + c * 16 * (K / G)}; };
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (int64_t c = 0; c < chunks; ++c) amx_gather(acts + 16 * c, M - 16 * c < 16 ? M - 16 * c : 16, K, G, chunk(c));
    amx_configure();
    thread_local std::vector<uint8_t> codes;  // an int4 tile unpacked
#pragma omp for schedule(static)
    for (int64_t t = 0; t < total; ++t) {
      int i;
      const int64_t lt = tile_of(w, t, i);
      const QMat& m = w[i];
      const uint8_t* tile = m.data + lt * tile_bytes(K, G, m.bits);
      if (m.bits == 4) amx_unpack4(tile, K, G, scratch(codes, (size_t)(K * 16)));
      const int64_t rows = m.n - 16 * lt < 16 ? m.n - 16 * lt : 16;
      for (int64_t c = 0; c < chunks; ++c) {
        alignas(64) float out[16][16];
        if (m.bits == 4)
          amx_tile_dot<4>(tile, codes.data(), K, G, chunk(c), out);
        else
          amx_tile_dot<8>(tile, nullptr, K, G, chunk(c), out);
        for (int64_t r = 0; r < 16 && 16 * c + r < M; ++r) store(y[i], y_bf16, (16 * c + r) * m.n + 16 * lt, out[r], rows);
      }
    }
    _tile_release();
  }
}
#endif

}  // namespace

void linears(const void* x, bool x_bf16, int64_t M, int64_t K, const QMat* w, int count, void* const* y,
             bool y_bf16, int threads) {
  thread_local ActRows rows;
  const Act* acts = rows.quantize(x, x_bf16, M, K, w[0].group, threads);
  int64_t total = 0;
  for (int i = 0; i < count; ++i) total += (w[i].n + 15) / 16;
#ifdef LC_AMX
  if (M >= AMX_ROWS) {
    amx_linears(acts, M, K, w, y, y_bf16, total, threads);
    return;
  }
#endif
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t t = 0; t < total; ++t) {
    int i;
    const int64_t lt = tile_of(w, t, i);
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

// What model/qkernel.py checks before it uses the library: the ABI it was built for, its variant, and
// whether it can run in this process (AMX: the operating system grants the tile registers).
int lc_abi() { return LC_ABI; }
#ifdef LC_AMX
int lc_ready() { return amx_permitted(); }
#else
int lc_ready() { return 1; }
#endif
const char* lc_variant() { return LC_VARIANT; }

}
