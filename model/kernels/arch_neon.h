// aarch64 NEON with the dot-product extension (LC_NEON; Apple M1 and later, Graviton 2 and later,
// Snapdragon X, Cortex-A76 and later): qlinear.cpp's activation quantizer and tile product on 128-bit
// registers. A tile's 64-byte vectors (16 rows x 4 inputs) are read as four quarters of 4 rows; sdot
// multiplies signed bytes, 16 products per instruction into one 32-bit sum per row. So 8-bit codes are
// taken as signed (code - 128), and the offset is corrected for the 128 taken away; 4-bit codes (0..15)
// are signed as they are.
#pragma once

#include <arm_neon.h>

#include "qlinear.h"

namespace lc {
namespace {

constexpr int64_t WIDE_ROWS = 0;  // Act::wide unused

void quantize_row(const float* x, int64_t K, int64_t G, Act a) {
  for (int64_t b = 0; b < K / 32; ++b) {
    float32x4_t v[8];
    float32x4_t mx = vdupq_n_f32(0.0f);
    for (int i = 0; i < 8; ++i) {
      v[i] = vld1q_f32(x + 32 * b + 4 * i);
      mx = vmaxq_f32(mx, vabsq_f32(v[i]));
    }
    const float amax = vmaxvq_f32(mx), d = amax / 127.0f, id = amax > 0 ? 127.0f / amax : 0.0f;
    a.d[b] = d;
    int32x4_t sum = vdupq_n_s32(0);
    for (int i = 0; i < 8; i += 2) {
      const int32x4_t q0 = vcvtnq_s32_f32(vmulq_n_f32(v[i], id)), q1 = vcvtnq_s32_f32(vmulq_n_f32(v[i + 1], id));
      sum = vaddq_s32(sum, vaddq_s32(q0, q1));
      const int16x8_t q16 = vcombine_s16(vqmovn_s32(q0), vqmovn_s32(q1));
      vst1_s8(a.q + 32 * b + 4 * i, vqmovn_s16(q16));
    }
    a.gsum[b * 32 / G] += d * (float)vaddvq_s32(sum);
  }
}

// sum_k q[row][k] * xq[k] over one block of 32 inputs for the 4 rows of quarter `qr` of a tile, for NR
// activation rows at once (the weights are loaded and unpacked once for all of them).
template <int BITS, int NR>
inline void quarter_block_dot(const uint8_t* block, int qr, const Act* acts, int64_t b, int32x4_t sums[NR]) {
  int8x16_t x0[NR], x1[NR];  // inputs 0..15 and 16..31 of each activation row
  for (int r = 0; r < NR; ++r) {
    x0[r] = vld1q_s8(acts[r].q + 32 * b);
    x1[r] = vld1q_s8(acts[r].q + 32 * b + 16);
    sums[r] = vdupq_n_s32(0);
  }
  if constexpr (BITS == 4) {  // vector t: low nibbles inputs 4t.., high nibbles inputs 16 + 4t..
    const uint8x16_t low = vdupq_n_u8(0x0f);
    uint8x16_t v[4];
    for (int t = 0; t < 4; ++t) v[t] = vld1q_u8(block + 64 * t + 16 * qr);
#define LC_NIBBLES(t)                                                                   \
  {                                                                                     \
    const int8x16_t lo = vreinterpretq_s8_u8(vandq_u8(v[t], low));                      \
    const int8x16_t hi = vreinterpretq_s8_u8(vshrq_n_u8(v[t], 4));                      \
    for (int r = 0; r < NR; ++r) {                                                      \
      sums[r] = vdotq_laneq_s32(sums[r], lo, x0[r], t);                                 \
      sums[r] = vdotq_laneq_s32(sums[r], hi, x1[r], t);                                 \
    }                                                                                   \
  }
    LC_NIBBLES(0) LC_NIBBLES(1) LC_NIBBLES(2) LC_NIBBLES(3)  // the lane must be a constant
#undef LC_NIBBLES
  } else {
    const uint8x16_t flip = vdupq_n_u8(0x80);
    int8x16_t w[8];
    for (int j = 0; j < 8; ++j) w[j] = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(block + 64 * j + 16 * qr), flip));
    for (int r = 0; r < NR; ++r) {
      sums[r] = vdotq_laneq_s32(sums[r], w[0], x0[r], 0);
      sums[r] = vdotq_laneq_s32(sums[r], w[1], x0[r], 1);
      sums[r] = vdotq_laneq_s32(sums[r], w[2], x0[r], 2);
      sums[r] = vdotq_laneq_s32(sums[r], w[3], x0[r], 3);
      sums[r] = vdotq_laneq_s32(sums[r], w[4], x1[r], 0);
      sums[r] = vdotq_laneq_s32(sums[r], w[5], x1[r], 1);
      sums[r] = vdotq_laneq_s32(sums[r], w[6], x1[r], 2);
      sums[r] = vdotq_laneq_s32(sums[r], w[7], x1[r], 3);
    }
  }
}

// One tile of 16 weight rows against NR activation rows: out[r][i] = y of activation row r, weight row i.
template <int BITS, int NR>
inline void tile_dot(const uint8_t* tile, int64_t K, int64_t G, const Act* acts, float out[][16]) {
  const int64_t bpg = G / 32, groups = K / G;
  for (int qr = 0; qr < 4; ++qr) {
    float32x4_t acc[NR];
    for (int r = 0; r < NR; ++r) acc[r] = vdupq_n_f32(0.0f);
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t* group = tile + g * group_bytes(G, BITS);
      float32x4_t part[NR];  // this group's sum, before the weight scale
      for (int r = 0; r < NR; ++r) part[r] = vdupq_n_f32(0.0f);
      for (int64_t j = 0; j < bpg; ++j) {
        const int64_t b = g * bpg + j;
        int32x4_t sums[NR];
        quarter_block_dot<BITS, NR>(group + j * block_bytes(BITS), qr, acts, b, sums);
        for (int r = 0; r < NR; ++r) part[r] = vfmaq_n_f32(part[r], vcvtq_f32_s32(sums[r]), acts[r].d[b]);
      }
      const uint32x4_t words = vld1q_u32((const uint32_t*)(group + bpg * block_bytes(BITS) + 16 * qr));
      const float32x4_t s = vreinterpretq_f32_u32(vshlq_n_u32(words, 16));
      float32x4_t m = vreinterpretq_f32_u32(vandq_u32(words, vdupq_n_u32(0xffff0000u)));
      if (BITS == 8) m = vfmaq_n_f32(m, s, 128.0f);  // the codes were taken as code - 128
      for (int r = 0; r < NR; ++r) acc[r] = vfmaq_n_f32(vfmaq_f32(acc[r], part[r], s), m, acts[r].gsum[g]);
    }
    for (int r = 0; r < NR; ++r) vst1q_f32(out[r] + 4 * qr, acc[r]);
  }
}

}  // namespace
}  // namespace lc
