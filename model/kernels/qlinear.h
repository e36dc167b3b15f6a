// Shared by qlinear.cpp (the quantized matmul) and decode.cpp (a decode step built on it): bf16 helpers,
// the weight matrix descriptor and the matmul entry both use. Built together by model/qkernel.py.
#pragma once

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include <vector>

namespace lc {

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

// Scratch reused across calls (per calling thread): decoding calls the kernel ~100 times a token.
template <typename T>
T* scratch(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

// One quantized weight matrix in qlinear.cpp's layout (codes, scales and offsets in one buffer): n output
// rows, padded to tiles of 16.
struct QMat {
  const uint8_t* data;
  int64_t group, bits, n;
};

// y_i = x @ W_i.T for `count` matrices sharing x (same K and group) in one parallel pass over all
// their tiles; y_i is M x n_i (fp32 or bf16).
void linears(const void* x, bool x_bf16, int64_t M, int64_t K, const QMat* w, int count, void* const* y,
             bool y_bf16, int threads);

inline bool valid(const QMat& w, int64_t K) {
  return !(K % 32 || w.group % 32 || w.group < 32 || K % w.group || (w.bits != 4 && w.bits != 8) || w.n < 1);
}

inline bool alike(const QMat& a, const QMat& b) { return a.group == b.group && a.bits == b.bits; }  // one quantized x

}  // namespace lc
