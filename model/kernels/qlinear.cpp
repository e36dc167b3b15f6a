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

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <vector>

namespace {

constexpr int MT = 4;  // activation rows that share one pass over a tile of weights

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return (uint16_t)(u >> 16);
}

inline __m512 load_bf16x16(const uint16_t* p, __mmask16 k) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p)), 16));
}

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

// Scratch reused across calls (per calling thread): decoding calls the kernel ~100 times a token.
template <typename T>
T* scratch(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

inline void store(void* y, bool y_bf16, int64_t at, const float* v, int64_t n) {
  if (y_bf16) {
    uint16_t* yb = (uint16_t*)y + at;
    for (int64_t i = 0; i < n; ++i) yb[i] = f32_to_bf16(v[i]);
  } else {
    memcpy((float*)y + at, v, sizeof(float) * (size_t)n);
  }
}

// One quantized weight matrix in the layout above: N output rows (padded to tiles of 16), K inputs.
struct QMat {
  const uint8_t* codes;
  const uint16_t* scales;
  const uint16_t* offsets;
  int64_t group, bits, n;
};

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

// y_i = x @ W_i.T for `count` matrices sharing x (same K and group) in one parallel pass over all
// their tiles; y_i is M x n_i (fp32 or bf16).
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

bool valid(const QMat& w, int64_t K) {
  return !(K % 32 || w.group % 32 || w.group < 32 || K % w.group || (w.bits != 4 && w.bits != 8) || w.n < 1);
}

bool alike(const QMat& a, const QMat& b) { return a.group == b.group && a.bits == b.bits; }  // one quantized x

// ---- one decode step of a Llama decoder (bf16 activations), the arithmetic of transformers' forward ----

inline float rb(float f) { return bf16_to_f32(f32_to_bf16(f)); }  // a bf16 tensor's rounding

inline __m512 rb_ps(__m512 v) {  // rb on 16 finite values: round to nearest even, keep the top 16 bits
  __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
  return _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32((int)0xffff0000u)));
}

// exp(x) for x <= 0 (softmax, SiLU's exp(-|g|)): 2^(x log2 e) split into 2^n * 2^f, f in [-0.5, 0.5],
// 2^f by a degree-6 polynomial (relative error ~2e-7, about fp32's epsilon).
inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.5353362e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3398874e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// transformers' LlamaRMSNorm on a bf16 row: w * bf16(x * rsqrt(mean(x^2) + eps)).
void rmsnorm(const float* x, const uint16_t* w, int64_t n, float eps, float* out) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  const float r = 1.0f / sqrtf(_mm512_reduce_add_ps(acc) / (float)n + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = rb(bf16_to_f32(w[i]) * rb(x[i] * r));
}

// x * cos + rotate_half(x) * sin on each head of `heads` x dim values, rounded as bf16 tensors are.
void rope(float* x, int64_t heads, int64_t dim, const uint16_t* cos, const uint16_t* sin) {
  const int64_t half = dim / 2;
  float tmp[512];
  for (int64_t h = 0; h < heads; ++h) {
    float* v = x + h * dim;
    for (int64_t j = 0; j < dim; ++j) {
      const float rot = j < half ? -v[j + half] : v[j - half];
      tmp[j] = rb(rb(v[j] * bf16_to_f32(cos[j])) + rb(rot * bf16_to_f32(sin[j])));
    }
    memcpy(v, tmp, sizeof(float) * (size_t)dim);
  }
}

inline __m512 load_bf16_row(const uint16_t* p) { return load_bf16x16(p, 0xffff); }

// One query's attention for the `group` query heads of one key/value head over n cached positions
// (bf16 rows of 16 * C values): softmax(q k^T * scale) v, in fp32; out rounded to bf16. Each key row is
// converted once for all the group's heads, and each head's weighted sum of values keeps its C vectors in
// registers while the values stream by once (a loop per 16 values re-read them C times: 1.5 ms a layer at
// 4k positions, 1B shape).
template <int C>
void attend(const float* q, int64_t group, const uint16_t* keys, const uint16_t* values, int64_t n, float scale,
            float* scores, float* out) {
  constexpr int64_t dim = 16 * C;
  for (int64_t j = 0; j < n; ++j) {
    __m512 k[C];
    for (int c = 0; c < C; ++c) k[c] = load_bf16_row(keys + j * dim + 16 * c);
    for (int64_t g = 0; g < group; ++g) {
      __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(q + g * dim), k[0]);
      for (int c = 1; c < C; ++c) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + g * dim + 16 * c), k[c], acc);
      scores[g * n + j] = _mm512_reduce_add_ps(acc) * scale;
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    float* s = scores + g * n;
    __m512 mx16 = _mm512_set1_ps(-INFINITY);
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) mx16 = _mm512_max_ps(mx16, _mm512_loadu_ps(s + j));
    float mx = _mm512_reduce_max_ps(mx16);
    for (; j < n; ++j) mx = s[j] > mx ? s[j] : mx;
    __m512 sum = _mm512_setzero_ps();
    for (j = 0; j < n; j += 16) {
      const __mmask16 m = n - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - j)) - 1);
      const __m512 e = exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + j), _mm512_set1_ps(mx)));
      _mm512_mask_storeu_ps(s + j, m, e);
      sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(m, e));
    }
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
    __m512 acc[C];
    for (int c = 0; c < C; ++c) acc[c] = _mm512_setzero_ps();
    for (j = 0; j < n; ++j) {
      const __m512 p = _mm512_set1_ps(s[j]);
      for (int c = 0; c < C; ++c) acc[c] = _mm512_fmadd_ps(p, load_bf16_row(values + j * dim + 16 * c), acc[c]);
    }
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + g * dim + 16 * c, rb_ps(_mm512_mul_ps(acc[c], inv)));
  }
}

using AttendFn = void (*)(const float*, int64_t, const uint16_t*, const uint16_t*, int64_t, float, float*, float*);

AttendFn attend_for(int64_t dim) {  // head sizes in use: 64 (Llama 3.2 1B, SmolLM2), 128 (3B)
  switch (dim) {
    case 16: return attend<1>;
    case 32: return attend<2>;
    case 48: return attend<3>;
    case 64: return attend<4>;
    case 80: return attend<5>;
    case 96: return attend<6>;
    case 128: return attend<8>;
    case 256: return attend<16>;
    default: return nullptr;
  }
}

struct DecodeLayer {
  const uint16_t* attn_norm;  // bf16 [hidden]
  const uint16_t* mlp_norm;
  QMat q, k, v, o, gate, up, down;
  uint16_t* keys;    // bf16 [kv_heads][capacity][head_dim]: this step's key is written at `position`
  uint16_t* values;
  int64_t capacity;
};

struct DecodeShape {
  int64_t layers, hidden, heads, kv_heads, head_dim, intermediate, position;
  float eps, scale;
};

}  // namespace

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

// One token through every decoder layer: h (bf16 [hidden], the token's embedding) becomes the last
// layer's output; each layer's key and value for `position` are written into its cache, and attention
// reads positions 0..position. The arithmetic is transformers' LlamaDecoderLayer forward in bf16, with
// this file's matmuls: bf16 rounding wherever that forward holds a bf16 tensor; attention in fp32.
// Returns 0, or -1 when a shape does not fit.
int lc_decode(uint16_t* h, const DecodeLayer* layers, const DecodeShape* s, const uint16_t* cos,
              const uint16_t* sin, int threads) {
  const int64_t H = s->hidden, D = s->head_dim, nq = s->heads * D, nkv = s->kv_heads * D, I = s->intermediate;
  const int64_t n = s->position + 1, group = s->heads / s->kv_heads;
  const AttendFn attend = attend_for(D);
  if (H % 32 || I % 32 || !attend || s->heads % s->kv_heads || threads < 1) return -1;
  thread_local std::vector<float> buf, score_buf;
  float* x = scratch(buf, (size_t)(3 * H + 2 * nq + 2 * nkv + 3 * I));
  float *xn = x + H, *q = xn + H, *k = q + nq, *v = k + nkv, *attn = v + nkv, *o = attn + nq, *gate = o + H,
        *up = gate + I, *act = up + I;
  float* scores = scratch(score_buf, (size_t)(s->heads * n));
  for (int64_t i = 0; i < H; ++i) x[i] = bf16_to_f32(h[i]);
  for (int64_t l = 0; l < s->layers; ++l) {  // every layer fits, before anything is written
    const DecodeLayer& L = layers[l];
    if (L.capacity < n || !valid(L.q, H) || !valid(L.o, nq) || !valid(L.gate, H) || !valid(L.down, I) ||
        !alike(L.q, L.k) || !alike(L.q, L.v) || !alike(L.gate, L.up) || L.q.n != nq || L.k.n != nkv ||
        L.v.n != nkv || L.o.n != H || L.gate.n != I || L.up.n != I || L.down.n != H)
      return -1;
  }
  for (int64_t l = 0; l < s->layers; ++l) {
    const DecodeLayer& L = layers[l];
    rmsnorm(x, L.attn_norm, H, s->eps, xn);
    const QMat qkv[3] = {L.q, L.k, L.v};
    void* qkv_out[3] = {q, k, v};
    linears(xn, false, 1, H, qkv, 3, qkv_out, false, threads);
    for (int64_t i = 0; i < nq + 2 * nkv; i += 16) _mm512_storeu_ps(q + i, rb_ps(_mm512_loadu_ps(q + i)));  // q, k, v
    rope(q, s->heads, D, cos, sin);
    rope(k, s->kv_heads, D, cos, sin);
    for (int64_t kh = 0; kh < s->kv_heads; ++kh)
      for (int64_t j = 0; j < D; ++j) {
        L.keys[(kh * L.capacity + s->position) * D + j] = f32_to_bf16(k[kh * D + j]);
        L.values[(kh * L.capacity + s->position) * D + j] = f32_to_bf16(v[kh * D + j]);
      }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t kh = 0; kh < s->kv_heads; ++kh)
      attend(q + kh * group * D, group, L.keys + kh * L.capacity * D, L.values + kh * L.capacity * D, n, s->scale,
             scores + kh * group * n, attn + kh * group * D);
    void* o_out[1] = {o};
    linears(attn, false, 1, nq, &L.o, 1, o_out, false, threads);
    for (int64_t i = 0; i < H; ++i) x[i] = rb(x[i] + rb(o[i]));
    rmsnorm(x, L.mlp_norm, H, s->eps, xn);
    const QMat gu[2] = {L.gate, L.up};
    void* gu_out[2] = {gate, up};
    linears(xn, false, 1, H, gu, 2, gu_out, false, threads);
    for (int64_t i = 0; i < I; i += 16) {  // bf16(bf16(SiLU(bf16 gate)) * bf16 up)
      const __m512 g = rb_ps(_mm512_loadu_ps(gate + i));
      const __m512 e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g)));  // exp(-|g|): no overflow
      const __m512 one_e = _mm512_add_ps(_mm512_set1_ps(1.0f), e);
      const __mmask16 nonneg = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_GE_OQ);
      const __m512 silu = _mm512_mask_blend_ps(nonneg, _mm512_div_ps(_mm512_mul_ps(g, e), one_e), _mm512_div_ps(g, one_e));
      _mm512_storeu_ps(act + i, rb_ps(_mm512_mul_ps(rb_ps(silu), rb_ps(_mm512_loadu_ps(up + i)))));
    }
    void* d_out[1] = {o};
    linears(act, false, 1, I, &L.down, 1, d_out, false, threads);
    for (int64_t i = 0; i < H; ++i) x[i] = rb(x[i] + rb(o[i]));
  }
  for (int64_t i = 0; i < H; ++i) h[i] = f32_to_bf16(x[i]);
  return 0;
}

}
