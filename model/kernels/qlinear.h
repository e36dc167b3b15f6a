// Shared by qlinear.cpp (the quantized matmul) and decode.cpp (a decode step built on it): bf16 helpers,
// the weight matrix descriptor, the tile layout's sizes and the matmul entry. Built together by
// model/qkernel.py, once per variant: LC_AVX512 (AVX512-VNNI), LC_AVX2 (AVX2 + FMA; with LC_AVXVNNI too, the
// avxvnni variant: AVX-VNNI) or LC_NEON (aarch64
// with the dot-product extension); the variant's instructions live in arch_<variant>.h.
#pragma once

#include <stdint.h>
#include <string.h>

#include <vector>

// Bumped whenever an exported function or struct changes; model/qkernel.py refuses a library whose
// lc_abi() differs from its own ABI.
#define LC_ABI 3

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

// One activation row, quantized to int8 per block of 32 (quantize_row in the arch header).
struct Act {
  int8_t* q;      // K values
  float* d;       // K/32 block scales
  float* gsum;    // K/G sums of the quantized x per group, each block's sum times its scale
  const int8_t* wide;  // arch_avx2.h, decoding: each 4 values of q repeated across 32 bytes; else null
};

// A tile's group: its blocks' codes (16 rows x 32 inputs each), then a 32-bit word (scale | offset << 16)
// for each of the 16 rows.
constexpr int64_t block_bytes(int64_t bits) { return 16 * 32 * bits / 8; }
constexpr int64_t group_bytes(int64_t G, int64_t bits) { return G / 32 * block_bytes(bits) + 64; }
constexpr int64_t tile_bytes(int64_t K, int64_t G, int64_t bits) { return K / G * group_bytes(G, bits); }

// y_i = x @ W_i.T for `count` matrices sharing x (same K and group) in one parallel pass over all
// their tiles; y_i is M x n_i (fp32 or bf16).
void linears(const void* x, bool x_bf16, int64_t M, int64_t K, const QMat* w, int count, void* const* y,
             bool y_bf16, int threads);

inline bool valid(const QMat& w, int64_t K) {
  return !(K % 32 || w.group % 32 || w.group < 32 || K % w.group || (w.bits != 4 && w.bits != 8) || w.n < 1);
}

inline bool alike(const QMat& a, const QMat& b) { return a.group == b.group && a.bits == b.bits; }  // one quantized x

}  // namespace lc
