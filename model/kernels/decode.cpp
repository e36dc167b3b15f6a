// One decode step of a Llama decoder for bf16 activations (lc_decode), on the quantized matmul of
// qlinear.cpp: the arithmetic of transformers' LlamaDecoderLayer forward, bf16 rounding included, with
// attention and SiLU in fp32. Called through ctypes by model/step.py (NativeStep).

#include <math.h>

#include "qlinear.h"

namespace lc {
namespace {

inline float rb(float f) { return bf16_to_f32(f32_to_bf16(f)); }  // a bf16 tensor's rounding

inline __m512 rb_ps(__m512 v) {  // rb on 16 finite values: round to nearest even, keep the top 16 bits
  __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
  return _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32((int)0xffff0000u)));
}

// x += bf16(y), rounded: a residual connection as transformers adds two bf16 tensors.
inline void add_residual(float* x, const float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = rb(x[i] + rb(y[i]));
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
}  // namespace lc

using namespace lc;

extern "C" {

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
    add_residual(x, o, H);
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
    add_residual(x, o, H);
  }
  for (int64_t i = 0; i < H; ++i) h[i] = f32_to_bf16(x[i]);
  return 0;
}

}
