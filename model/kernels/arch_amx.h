// x86 AMX-INT8 (LC_AMX, built on the AVX512-VNNI variant): rows of a prompt multiply on the tile unit.
// One tdpbsud takes a block of 32 inputs for 16 activation rows (signed, the A tile: rows of the
// quantized x as they lie in memory) and 16 weight rows (unsigned, the B tile: a packed block is already
// the tile's layout, 8 rows of 4 inputs x 16 weight rows), giving the block's 16 x 16 exact integer sums
// as the VNNI path computes them. Each block's sums are then scaled by the block's activation scales in
// AVX-512, so the result is the VNNI path's exactly; while one block's sums are scaled, the tile unit
// multiplies the next. Decoding (one row) stays on VNNI: a tile pays off from a few rows on.
#pragma once

#include <sys/syscall.h>
#include <unistd.h>

#include "arch_avx512.h"

namespace lc {
namespace {

constexpr int64_t AMX_ROWS = 16;  // activation rows per tile; matmuls with fewer rows take the VNNI path

// Linux hands out the tile registers per process on request (arch_prctl ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA); a kernel or hypervisor that refuses leaves the VNNI path.
inline bool amx_permitted() {
  static const bool ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return ok;
}

// Tiles 0-1: the int32 sums of two blocks in flight; 2: activations (16 rows x 32 bytes); 3: weights
// (8 rows x 64 bytes). Loaded once per thread and matmul: other code on the same threads (oneDNN's AMX
// kernels in PyTorch) may configure the tiles its own way.
inline void amx_configure() {
  struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
  } c{};
  c.palette = 1;
  c.colsb[0] = c.colsb[1] = 64, c.rows[0] = c.rows[1] = 16;
  c.colsb[2] = c.colsb[4] = 32, c.rows[2] = c.rows[4] = 16;
  c.colsb[3] = c.colsb[5] = 64, c.rows[3] = c.rows[5] = 8;
  _tile_loadconfig(&c);
}

inline void amx_release() { _tile_release(); }

// 16 activation rows as the tile unit reads them: per block of 32 inputs, the rows' codes one after the
// other (an A tile, 512 contiguous bytes: rows K bytes apart would share a few cache sets) and their 16
// scales; per group, the rows' 16 sums (Act::gsum).
struct AmxRows {
  int8_t* q;
  float* d;
  float* gsum;
};

inline void amx_gather(const Act* acts, int64_t K, int64_t G, AmxRows a) {
  for (int64_t b = 0; b < K / 32; ++b)
    for (int r = 0; r < 16; ++r) {
      memcpy(a.q + 512 * b + 32 * r, acts[r].q + 32 * b, 32);
      a.d[16 * b + r] = acts[r].d[b];
    }
  for (int64_t g = 0; g < K / G; ++g)
    for (int r = 0; r < 16; ++r) a.gsum[16 * g + r] = acts[r].gsum[g];
}

// The 16 x 16 sums of block b (weights at w) into tile C, from tiles A and B. (A macro: the tile
// intrinsics take tile numbers as literals.)
#define LC_AMX_BLOCK(C, A, B, b, w)      \
  do {                                   \
    _tile_zero(C);                       \
    _tile_loadd(A, a.q + 512 * (b), 32); \
    _tile_loadd(B, w, 64);               \
    _tile_dpbsud(C, A, B);               \
  } while (0)

// One tile of 16 weight rows against 16 activation rows; `codes` holds the tile's blocks as B tiles,
// 512 bytes each (int8: the tile itself, whose blocks lie in its groups; int4: unpacked). out[r][i] as
// tile_dot's, with tile_dot's arithmetic in the same order.
template <int BITS>
void amx_tile_dot(const uint8_t* tile, const uint8_t* codes, int64_t K, int64_t G, AmxRows a, float out[16][16]) {
  const int64_t bpg = G / 32, groups = K / G;
  // block j of group g as a B tile
  auto at = [&](int64_t g, int64_t j) { return BITS == 8 ? tile + g * group_bytes(G, 8) + 512 * j : codes + 512 * (g * bpg + j); };
  alignas(64) int32_t sums[2][16][16];
  __m512 part[16], acc[16];
  for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_ps();
  LC_AMX_BLOCK(0, 2, 3, 0, at(0, 0));
  for (int64_t g = 0, b = 0; g < groups; ++g) {
    for (int r = 0; r < 16; ++r) part[r] = _mm512_setzero_ps();
    for (int64_t j = 0; j < bpg; ++j, ++b) {
      // while this block's sums are scaled, the tile unit multiplies the next one (even blocks in
      // tiles 0, 2, 3; odd ones in 1, 4, 5)
      const bool last = j + 1 == bpg && g + 1 == groups;
      const uint8_t* next = j + 1 < bpg ? at(g, j + 1) : at(g + 1, 0);
      if (b % 2 == 0) {
        if (!last) LC_AMX_BLOCK(1, 4, 5, b + 1, next);
        _tile_stored(0, sums[0], 64);
      } else {
        if (!last) LC_AMX_BLOCK(0, 2, 3, b + 1, next);
        _tile_stored(1, sums[1], 64);
      }
      for (int r = 0; r < 16; ++r)
        part[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(sums[b % 2][r])), _mm512_set1_ps(a.d[16 * b + r]),
                                  part[r]);
    }
    // the group's scale and offset
    const __m512i words = _mm512_loadu_si512(tile + g * group_bytes(G, BITS) + bpg * block_bytes(BITS));
    const __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(words, 16));
    const __m512 m = _mm512_castsi512_ps(_mm512_and_si512(words, _mm512_set1_epi32((int)0xffff0000u)));
    for (int r = 0; r < 16; ++r)
      acc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(a.gsum[16 * g + r]), _mm512_fmadd_ps(part[r], s, acc[r]));
  }
  for (int r = 0; r < 16; ++r) _mm512_storeu_ps(out[r], acc[r]);
}
#undef LC_AMX_BLOCK

// An int4 tile's codes as B tiles (amx_tile_dot's `codes`): each block's 4 vectors of nibbles as 8
// vectors of bytes, low nibbles first (the order of load_block's registers).
inline void amx_unpack4(const uint8_t* tile, int64_t K, int64_t G, uint8_t* codes) {
  const int64_t bpg = G / 32;
  const __m512i low = _mm512_set1_epi8(0x0f);
  for (int64_t b = 0; b < K / 32; ++b) {
    const uint8_t* block = tile + b / bpg * group_bytes(G, 4) + b % bpg * block_bytes(4);
    for (int t = 0; t < 4; ++t) {
      const __m512i v = _mm512_loadu_si512(block + 64 * t);
      _mm512_storeu_si512(codes + 512 * b + 64 * t, _mm512_and_si512(v, low));
      _mm512_storeu_si512(codes + 512 * b + 64 * (t + 4), _mm512_and_si512(_mm512_srli_epi16(v, 4), low));
    }
  }
}

}  // namespace
}  // namespace lc
