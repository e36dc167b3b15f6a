// The AVX-512 build's own bf16 versions of decode.cpp's helpers (explicit specializations for bf16
// tensors): the norm's sum, the rounding, SiLU and attention on 512-bit registers.
#pragma once

#include <immintrin.h>

namespace lc {
namespace {

inline __m512 load_bf16_row(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

inline __m512 rb_ps(__m512 v) {  // rb on 16 finite values: round to nearest even, keep the top 16 bits
  __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
  return _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32((int)0xffff0000u)));
}

// exp(x) for x <= 0: exp_neg's polynomial, 16 at a time.
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

template <>
void rmsnorm<uint16_t>(const float* x, const uint16_t* w, int64_t n, float eps, float* out) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  const float r = 1.0f / sqrtf(_mm512_reduce_add_ps(acc) / (float)n + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = rb(bf16_to_f32(w[i]) * rb(x[i] * r));
}

template <>
void round_values<uint16_t>(float* v, int64_t n) {  // n is a multiple of 16 (head sizes)
  for (int64_t i = 0; i < n; i += 16) _mm512_storeu_ps(v + i, rb_ps(_mm512_loadu_ps(v + i)));
}

template <>
void silu_mul<uint16_t>(const float* gate, const float* up, float* act, int64_t n) {  // n: a multiple of 32
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 g = rb_ps(_mm512_loadu_ps(gate + i));
    const __m512 e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g)));  // exp(-|g|): no overflow
    const __m512 one_e = _mm512_add_ps(_mm512_set1_ps(1.0f), e);
    const __mmask16 nonneg = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_GE_OQ);
    const __m512 silu = _mm512_mask_blend_ps(nonneg, _mm512_div_ps(_mm512_mul_ps(g, e), one_e), _mm512_div_ps(g, one_e));
    _mm512_storeu_ps(act + i, rb_ps(_mm512_mul_ps(rb_ps(silu), rb_ps(_mm512_loadu_ps(up + i)))));
  }
}

// decode.cpp's attend for bf16 rows, each key row converted once for all the group's heads and each head's
// C value vectors kept in registers while the values stream by once (a loop per 16 values re-read them C
// times: 1.5 ms a layer at 4k positions, 1B shape).
template <int C>
void attend_avx512(const float* q, int64_t group, const uint16_t* keys, const uint16_t* values, int64_t n, float scale,
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

template <>
AttendFn<uint16_t> attend_for<uint16_t>(int64_t dim) {
  switch (dim) {
    case 16: return attend_avx512<1>;
    case 32: return attend_avx512<2>;
    case 48: return attend_avx512<3>;
    case 64: return attend_avx512<4>;
    case 80: return attend_avx512<5>;
    case 96: return attend_avx512<6>;
    case 128: return attend_avx512<8>;
    case 256: return attend_avx512<16>;
    default: return nullptr;
  }
}

}  // namespace
}  // namespace lc
