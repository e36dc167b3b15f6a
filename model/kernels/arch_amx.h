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

// Two blocks in flight, each in three tiles: the int32 sums (0, 1), the activations (2, 4: 16 rows x 32
// bytes) and the weights (3, 5: 8 rows x 64 bytes). Loaded once per thread and matmul: other code on the
// same threads (oneDNN's AMX kernels in PyTorch) may configure the tiles its own way.
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

// 16 activation rows as the tile unit reads them: per block of 32 inputs, the rows' codes one after the
// other (an A tile, 512 contiguous bytes: rows K bytes apart would share a few cache sets) and their 16
// scales; per group, the rows' 16 sums (Act::gsum). A last chunk of fewer rows is padded with zero rows.
struct AmxRows {
  int8_t* q;
  float* d;
  float* gsum;
};

inline void amx_gather(const Act* acts, int64_t rows, int64_t K, int64_t G, AmxRows a) {
  for (int64_t b = 0; b < K / 32; ++b)
    for (int r = 0; r < 16; ++r) {
      if (r < rows) memcpy(a.q + 512 * b + 32 * r, acts[r].q + 32 * b, 32); else memset(a.q + 512 * b + 32 * r, 0, 32);
      a.d[16 * b + r] = r < rows ? acts[r].d[b] : 0.0f;
    }
  for (int64_t g = 0; g < K / G; ++g)
    for (int r = 0; r < 16; ++r) a.gsum[16 * g + r] = r < rows ? acts[r].gsum[g] : 0.0f;
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

// part[r] += the block's sums (row r) x its activation scale; at a group's end, part into acc with the
// group's weight scale and offset (tile_dot's arithmetic, in its order).
inline void amx_scale(const int32_t sums[16][16], const float* d, __m512 part[16]) {
  for (int r = 0; r < 16; ++r)
    part[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(sums[r])), _mm512_set1_ps(d[r]), part[r]);
}

inline void amx_group(const uint8_t* words_at, const float* gsum, __m512 part[16], __m512 acc[16]) {
  const __m512i words = _mm512_loadu_si512(words_at);  // s | m << 16 per row
  const __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(words, 16));
  const __m512 m = _mm512_castsi512_ps(_mm512_and_si512(words, _mm512_set1_epi32((int)0xffff0000u)));
  for (int r = 0; r < 16; ++r) {
    acc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(gsum[r]), _mm512_fmadd_ps(part[r], s, acc[r]));
    part[r] = _mm512_setzero_ps();
  }
}

// One tile of 16 weight rows against 16 activation rows; `codes` holds the tile's blocks as B tiles,
// 512 bytes each (int8: the tile itself, whose blocks lie in its groups; int4: unpacked). out[r][i] as
// tile_dot's. Pipelined: while block b multiplies on the tile unit, block b - 1's sums are stored and
// scaled (even blocks in tiles 0, 2, 3; odd ones in 1, 4, 5).
template <int BITS>
void amx_tile_dot(const uint8_t* tile, const uint8_t* codes, int64_t K, int64_t G, AmxRows a, float out[16][16]) {
  const int64_t bpg = G / 32, blocks = K / 32;
  alignas(64) int32_t sums[2][16][16];
  __m512 part[16], acc[16];
  for (int r = 0; r < 16; ++r) part[r] = acc[r] = _mm512_setzero_ps();
  const uint8_t* w = BITS == 8 ? tile : codes;  // the next block's weights as a B tile
  const uint8_t* words = tile + bpg * block_bytes(BITS);  // the current group's scales and offsets
  LC_AMX_BLOCK(0, 2, 3, 0, w);
  int64_t j = 0;  // block b's place in its group
  bool ended = false;  // block b - 1 ended its group
  for (int64_t b = 0; b < blocks; ++b) {
    const bool group_end = ++j == bpg;
    w += 512 + (BITS == 8 && group_end ? 64 : 0);  // int8: past the group's scales and offsets
    if (b % 2 == 0) {
      if (b + 1 < blocks) LC_AMX_BLOCK(1, 4, 5, b + 1, w);
      _tile_stored(0, sums[0], 64);
    } else {
      if (b + 1 < blocks) LC_AMX_BLOCK(0, 2, 3, b + 1, w);
      _tile_stored(1, sums[1], 64);
    }
    if (b > 0) {  // block b - 1, stored a step ago: loads right after a tile store wait for it
      amx_scale(sums[(b - 1) % 2], a.d + 16 * (b - 1), part);
      if (ended) amx_group(words, a.gsum + 16 * ((b - 1) / bpg), part, acc), words += group_bytes(G, BITS);
    }
    ended = group_end;
    if (group_end) j = 0;
  }
  amx_scale(sums[(blocks - 1) % 2], a.d + 16 * (blocks - 1), part);
  amx_group(words, a.gsum + 16 * ((blocks - 1) / bpg), part, acc);
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
