// The AVX2 kernel of sparse_linear's forward for more than one row of x (fp32): y = x @ Wᵀ + bias
// computed from Xᵀ panels and written row-major, 8 output features at a time.
//
// Why it exists: the portable spmm loop writes each output row with a strided scalar store and
// reads a panel that outgrows L1 from K = 256 up; on an AVX2 CPU it ran at 5-7 GF/s where dense
// SGEMM does ~100, so a 90%-sparse layer was slower than the dense one at transformer token
// counts. Here the tile of 8 output features x `tile` rows of x is transposed in registers and
// stored as 8-float vectors, and K is cut into blocks whose panel slice stays in L1 (partial sums
// carried between blocks). Call it only when supported() is true.
#pragma once

#include <cstdint>

#include "common/csr.h"

namespace torchprune {
namespace cpu {
namespace avx2 {

// True when this CPU has AVX2 and FMA (every AVX-512 CPU too) and neither TORCHPRUNE_PORTABLE nor
// TORCHPRUNE_NO_AVX2 is set (the latter gives AVX-512 CPUs their AVX-512 kernel back, to compare).
bool supported();

// The panel widths the kernel is compiled for: rows of x per tile.
constexpr int64_t kNarrowTile = 16;
constexpr int64_t kWideTile = 32;

// The panel width for a product with m rows of x: the narrow one when m fits it.
inline int64_t tile_for(int64_t m) { return m <= kNarrowTile ? kNarrowTile : kWideTile; }

// How the panel kernels split K: blocks of kBlockCols columns once a K x 32 panel no longer
// fits L1 (K > kL1Cols), else one block (no partial sums to carry). The same for either tile
// width. Each row finds where its entries cross into the next block while it runs (columns
// ascend within a row), so a call computes nothing per row up front. The bisection per row and
// block this replaced ran on one thread before every call: without it all-MiniLM-L6-v2's down
// projection (384 x 1536, 95%, 128 rows, 2 threads, Intel Xeon) took 103 us instead of 114.
constexpr int64_t kBlockCols = 384;  // K-block width once the panel outgrows L1 (best of 128-512)
constexpr int64_t kL1Cols = 512;     // up to this K, one block (a 32-wide panel is 64 KiB)

struct KBlocks {
  int64_t blocks = 1;
  // The first column past block j; the last block takes every entry left.
  int64_t limit(int64_t j) const { return (j + 1) * kBlockCols; }
};

inline KBlocks k_blocks(int64_t cols) {
  return KBlocks{cols > kL1Cols ? (cols + kBlockCols - 1) / kBlockCols : 1};
}

// Whether the entries [e, e + count) of a row lie before column `limit`: a check of the last
// one, since columns ascend. Always true when not Bounded (the last K-block).
template <bool Bounded, typename I>
inline bool in_block(const I* col, int64_t e, int64_t count, int64_t limit) {
  if constexpr (Bounded) {
    return static_cast<int64_t>(col[e + count - 1]) < limit;
  } else {
    return true;
  }
}

// y[t * ldy + n] = init[n] + sum_j a[n, j] * panel[j * tile + t] for t < width and rows n in
// [row_begin, row_end). panel is [a.cols, tile], tile in {kNarrowTile, kWideTile}, with columns
// width.. tile-1 zero (they are computed and dropped). init may be null.
template <typename I>
void spmm_panel(const Csr<float, I>& a, const KBlocks& blocks, const float* panel, int64_t tile,
                int64_t width, const float* init, float* y, int64_t ldy, int64_t row_begin,
                int64_t row_end);

// Packs rows [t * tile, t * tile + tile) of x [m, k] (row stride ldx) as the panel [k, tile]
// at `panel`: panel[j * tile + i] = x[t * tile + i, j], zero for rows past m. 8x8 register
// transposes; the caller runs tiles on threads.
void pack_panel(const float* x, int64_t ldx, int64_t m, int64_t k, int64_t tile, int64_t t,
                float* panel);

// out[e] (+)= sum_t g[n * tile + t] * x[col(e) * tile + t] for the entries e of rows
// [row_begin, row_end): the value gradient (SDDMM) over one tile of batch rows. g is the
// [a.rows, tile] panel of the output gradient, x the [a.cols, tile] panel of the input, both
// zero past the batch; `accumulate` adds to out (every tile after the first) instead of storing.
// Eight entries are reduced at once by a transposed horizontal sum.
template <typename I>
void sddmm_panel(const Csr<float, I>& a, const float* g, const float* x, int64_t tile,
                 bool accumulate, float* out, int64_t row_begin, int64_t row_end);

}  // namespace avx2
}  // namespace cpu
}  // namespace torchprune
