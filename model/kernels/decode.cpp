// One decode step of a Llama decoder (lc_decode), on the quantized matmul of qlinear.cpp: the arithmetic
// of transformers' LlamaDecoderLayer forward for bf16 or fp32 activations, with attention and SiLU in fp32.
// In bf16, values are rounded to bf16 wherever that forward holds a bf16 tensor. Called through ctypes by
// model/step.py (NativeStep).
//
// The element-wise work (norms, rotary embeddings, attention, SiLU, residuals) is written as plain loops
// over 16 independent lanes, which the compiler turns into the variant's vector instructions; the
// AVX-512 build keeps hand-written versions of the bf16 ones (decode_avx512.h).

#include <math.h>

#include "qlinear.h"

namespace lc {
namespace {

constexpr int L = 16;  // lanes of the portable loops

inline float to_f(uint16_t h) { return bf16_to_f32(h); }
inline float to_f(float f) { return f; }
template <typename T>
inline T from_f(float f) {
  if constexpr (sizeof(T) == 2) return f32_to_bf16(f); else return f;
}
inline float rb(float f) { return bf16_to_f32(f32_to_bf16(f)); }  // a bf16 tensor's rounding
template <typename T>
inline float R(float f) {  // the rounding of a tensor of T
  if constexpr (sizeof(T) == 2) return rb(f); else return f;
}

// exp(x) for x <= 0 (softmax, SiLU's exp(-|g|)): 2^(x log2 e) split into 2^n * 2^f, f in [-0.5, 0.5],
// 2^f by a degree-6 polynomial (relative error ~2e-7, about fp32's epsilon). Plain arithmetic, so a loop
// over it vectorizes.
inline float exp_neg(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float t = x * 1.44269504088896341f;
  const float n = (t + 12582912.0f) - 12582912.0f;  // round to nearest (|t| < 2^22)
  const float f = t - n;
  float p = 1.5353362e-4f;
  p = p * f + 1.3398874e-3f;
  p = p * f + 9.6181291e-3f;
  p = p * f + 5.5504109e-2f;
  p = p * f + 2.4022651e-1f;
  p = p * f + 6.9314718e-1f;
  p = p * f + 1.0f;
  const uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
  float scale;
  memcpy(&scale, &bits, 4);
  return p * scale;
}

// x += T(y): a residual connection as transformers adds two tensors of T.
template <typename T>
void add_residual(float* x, const float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = R<T>(x[i] + R<T>(y[i]));
}

// Values held as a tensor of T would be (q, k, v after their projections).
template <typename T>
void round_values(float* v, int64_t n) {
  if constexpr (sizeof(T) == 2)
    for (int64_t i = 0; i < n; ++i) v[i] = rb(v[i]);
}

inline float sum_squares(const float* x, int64_t n) {
  float acc[L] = {};
  for (int64_t i = 0; i < n; i += L)
    for (int l = 0; l < L; ++l) acc[l] += x[i + l] * x[i + l];
  float s = 0.0f;
  for (int l = 0; l < L; ++l) s += acc[l];
  return s;
}

// transformers' LlamaRMSNorm: w * T(x * rsqrt(mean(x^2) + eps)).
template <typename T>
void rmsnorm(const float* x, const T* w, int64_t n, float eps, float* out) {
  const float r = 1.0f / sqrtf(sum_squares(x, n) / (float)n + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = R<T>(to_f(w[i]) * R<T>(x[i] * r));
}

// x * cos + rotate_half(x) * sin on each head of `heads` x dim values, rounded as tensors of T are.
template <typename T>
void rope(float* x, int64_t heads, int64_t dim, const T* cos, const T* sin) {
  const int64_t half = dim / 2;
  float tmp[512];
  for (int64_t h = 0; h < heads; ++h) {
    float* v = x + h * dim;
    for (int64_t j = 0; j < dim; ++j) {
      const float rot = j < half ? -v[j + half] : v[j - half];
      tmp[j] = R<T>(R<T>(v[j] * to_f(cos[j])) + R<T>(rot * to_f(sin[j])));
    }
    memcpy(v, tmp, sizeof(float) * (size_t)dim);
  }
}

// T(T(SiLU(T(gate))) * T(up)), SiLU in fp32 with exp(-|g|) (no overflow).
template <typename T>
void silu_mul(const float* gate, const float* up, float* act, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = R<T>(gate[i]);
    const float e = exp_neg(g < 0 ? g : -g);
    const float silu = g >= 0 ? g / (1.0f + e) : g * e / (1.0f + e);
    act[i] = R<T>(R<T>(silu) * R<T>(up[i]));
  }
}

// One query's attention for the `group` query heads of one key/value head over n cached positions (rows
// of 16 * C values of T): softmax(q k^T * scale) v, in fp32; out rounded to T. Each key row is read once
// for all the group's heads, and each head's weighted sum of values streams the values once.
template <typename T, int C>
void attend(const float* q, int64_t group, const T* keys, const T* values, int64_t n, float scale, float* scores,
            float* out) {
  constexpr int64_t dim = L * C;
  for (int64_t j = 0; j < n; ++j) {
    float k[dim];
    for (int64_t i = 0; i < dim; ++i) k[i] = to_f(keys[j * dim + i]);
    for (int64_t g = 0; g < group; ++g) {
      float acc[L] = {};
      for (int c = 0; c < C; ++c)
        for (int l = 0; l < L; ++l) acc[l] += q[g * dim + L * c + l] * k[L * c + l];
      float s = 0.0f;
      for (int l = 0; l < L; ++l) s += acc[l];
      scores[g * n + j] = s * scale;
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    float* s = scores + g * n;
    float lanes[L];  // max, then sum, over 16 lanes (an in-order reduction would not vectorize)
    for (int l = 0; l < L; ++l) lanes[l] = -INFINITY;
    int64_t j = 0;
    for (; j + L <= n; j += L)
      for (int l = 0; l < L; ++l) lanes[l] = s[j + l] > lanes[l] ? s[j + l] : lanes[l];
    float mx = -INFINITY;
    for (int l = 0; l < L; ++l) mx = lanes[l] > mx ? lanes[l] : mx;
    for (; j < n; ++j) mx = s[j] > mx ? s[j] : mx;
    for (j = 0; j < n; ++j) s[j] = exp_neg(s[j] - mx);
    for (int l = 0; l < L; ++l) lanes[l] = 0.0f;
    for (j = 0; j + L <= n; j += L)
      for (int l = 0; l < L; ++l) lanes[l] += s[j + l];
    float sum = 0.0f;
    for (int l = 0; l < L; ++l) sum += lanes[l];
    for (; j < n; ++j) sum += s[j];
    float acc[dim] = {};
    for (j = 0; j < n; ++j)
      for (int64_t i = 0; i < dim; ++i) acc[i] += s[j] * to_f(values[j * dim + i]);
    const float inv = 1.0f / sum;
    for (int64_t i = 0; i < dim; ++i) out[g * dim + i] = R<T>(acc[i] * inv);
  }
}

template <typename T>
using AttendFn = void (*)(const float*, int64_t, const T*, const T*, int64_t, float, float*, float*);

template <typename T>
AttendFn<T> attend_for(int64_t dim) {  // head sizes in use: 64 (Llama 3.2 1B, SmolLM2), 128 (3B)
  switch (dim) {
    case 16: return attend<T, 1>;
    case 32: return attend<T, 2>;
    case 48: return attend<T, 3>;
    case 64: return attend<T, 4>;
    case 80: return attend<T, 5>;
    case 96: return attend<T, 6>;
    case 128: return attend<T, 8>;
    case 256: return attend<T, 16>;
    default: return nullptr;
  }
}

}  // namespace
}  // namespace lc

#ifdef LC_AVX512
#include "decode_avx512.h"  // hand-written bf16 versions of the helpers above
#endif

namespace lc {
namespace {

struct DecodeLayer {
  const void* attn_norm;  // T [hidden]
  const void* mlp_norm;
  QMat q, k, v, o, gate, up, down;
  void* keys;    // T [kv_heads][capacity][head_dim]: this step's key is written at `position`
  void* values;
  int64_t capacity;
};

struct DecodeShape {
  int64_t layers, hidden, heads, kv_heads, head_dim, intermediate, position;
  int64_t fp32;  // activations, norm weights, cos/sin and the cache: fp32 (1) or bf16 (0)
  float eps, scale;
};

bool fits(const DecodeLayer* layers, const DecodeShape* s) {
  const int64_t H = s->hidden, nq = s->heads * s->head_dim, nkv = s->kv_heads * s->head_dim, I = s->intermediate;
  if (H % 32 || I % 32 || !attend_for<float>(s->head_dim) || s->heads % s->kv_heads) return false;
  for (int64_t l = 0; l < s->layers; ++l) {
    const DecodeLayer& L = layers[l];
    if (L.capacity < s->position + 1 || !valid(L.q, H) || !valid(L.o, nq) || !valid(L.gate, H) || !valid(L.down, I) ||
        !alike(L.q, L.k) || !alike(L.q, L.v) || !alike(L.gate, L.up) || L.q.n != nq || L.k.n != nkv ||
        L.v.n != nkv || L.o.n != H || L.gate.n != I || L.up.n != I || L.down.n != H)
      return false;
  }
  return true;
}

template <typename T>
void decode(T* h, const DecodeLayer* layers, const DecodeShape* s, const T* cos, const T* sin, int threads) {
  const int64_t H = s->hidden, D = s->head_dim, nq = s->heads * D, nkv = s->kv_heads * D, I = s->intermediate;
  const int64_t n = s->position + 1, group = s->heads / s->kv_heads;
  const AttendFn<T> attend = attend_for<T>(D);
  thread_local std::vector<float> buf, score_buf;
  float* x = scratch(buf, (size_t)(3 * H + 2 * nq + 2 * nkv + 3 * I));
  float *xn = x + H, *q = xn + H, *k = q + nq, *v = k + nkv, *attn = v + nkv, *o = attn + nq, *gate = o + H,
        *up = gate + I, *act = up + I;
  float* scores = scratch(score_buf, (size_t)(s->heads * n));
  for (int64_t i = 0; i < H; ++i) x[i] = to_f(h[i]);
  for (int64_t l = 0; l < s->layers; ++l) {
    const DecodeLayer& L = layers[l];
    T *keys = (T*)L.keys, *values = (T*)L.values;
    rmsnorm(x, (const T*)L.attn_norm, H, s->eps, xn);
    const QMat qkv[3] = {L.q, L.k, L.v};
    void* qkv_out[3] = {q, k, v};
    linears(xn, false, 1, H, qkv, 3, qkv_out, false, threads);
    round_values<T>(q, nq + 2 * nkv);
    rope(q, s->heads, D, cos, sin);
    rope(k, s->kv_heads, D, cos, sin);
    for (int64_t kh = 0; kh < s->kv_heads; ++kh)
      for (int64_t j = 0; j < D; ++j) {
        keys[(kh * L.capacity + s->position) * D + j] = from_f<T>(k[kh * D + j]);
        values[(kh * L.capacity + s->position) * D + j] = from_f<T>(v[kh * D + j]);
      }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t kh = 0; kh < s->kv_heads; ++kh)
      attend(q + kh * group * D, group, keys + kh * L.capacity * D, values + kh * L.capacity * D, n, s->scale,
             scores + kh * group * n, attn + kh * group * D);
    void* o_out[1] = {o};
    linears(attn, false, 1, nq, &L.o, 1, o_out, false, threads);
    add_residual<T>(x, o, H);
    rmsnorm(x, (const T*)L.mlp_norm, H, s->eps, xn);
    const QMat gu[2] = {L.gate, L.up};
    void* gu_out[2] = {gate, up};
    linears(xn, false, 1, H, gu, 2, gu_out, false, threads);
    silu_mul<T>(gate, up, act, I);
    void* d_out[1] = {o};
    linears(act, false, 1, I, &L.down, 1, d_out, false, threads);
    add_residual<T>(x, o, H);
  }
  for (int64_t i = 0; i < H; ++i) h[i] = from_f<T>(x[i]);
}

}  // namespace
}  // namespace lc

using namespace lc;

extern "C" {

// One token through every decoder layer: h (the token's embedding, [hidden] of bf16 or fp32 as s->fp32
// says) becomes the last layer's output; each layer's key and value for `position` are written into its
// cache, and attention reads positions 0..position. Returns 0, or -1 when a shape does not fit (checked
// before anything is written).
int lc_decode(void* h, const DecodeLayer* layers, const DecodeShape* s, const void* cos, const void* sin,
              int threads) {
  if (threads < 1 || !fits(layers, s)) return -1;
  if (s->fp32)
    decode<float>((float*)h, layers, s, (const float*)cos, (const float*)sin, threads);
  else
    decode<uint16_t>((uint16_t*)h, layers, s, (const uint16_t*)cos, (const uint16_t*)sin, threads);
  return 0;
}

}
