// AVX2 fp32 kernels of block_sparse_linear (R x 1 blocks, common/bsr.h), for R in {4, 8}.
//
// Batches > 1 reuse the CSR kernel's Xᵀ panels and K-blocks (spmm_avx2.h), but each stored block
// multiplies ONE panel row into R output features: the panel row is loaded once for R x tile/8
// FMAs instead of tile/8, which is what CSR could not get past (its loads of random panel rows
// from L2 set its speed). Batch 1 is a block gather-dot: R contiguous values times one x entry.
// Call these only when avx2::supported() is true.
#pragma once

#include <cstdint>

#include "common/csr.h"
#include "cpu/spmm_avx2.h"

namespace torchprune {
namespace cpu {
namespace avx2 {

// True for the block heights the AVX2 kernels are compiled for.
inline bool bsr_supported_rows(int64_t r) { return r == 4 || r == 8; }

// The panel width for R-row blocks: R x tile/8 accumulators must fit the 16 AVX registers with
// room for the loads (8 each: 4 x 2 for R = 4 over 16 rows of x, 8 x 1 for R = 8 over 8).
inline int64_t bsr_tile(int64_t r) { return r == 8 ? 8 : 16; }

// y[t * ldy + n] = init[n] + sum over blocks of W[n, c] * panel[c * tile + t] for t < width and
// the output rows n of block rows [block_begin, block_end). a is the BSR as a Csr over block rows
// (val: r values per entry), panel is [a.cols, bsr_tile(r)] with columns width.. zero, and kb is
// k_blocks(a.cols). init may be null.
template <typename I>
void bsr_panel(const Csr<float, I>& a, int64_t r, const KBlocks& kb, const float* panel,
               int64_t width, const float* init, float* y, int64_t ldy, int64_t block_begin,
               int64_t block_end);

// y[n] = init[n] + sum_c W[n, c] * x[c] for the output rows of block rows [block_begin,
// block_end): batch 1. init may be null.
template <typename I>
void bsr_spmv(const Csr<float, I>& a, int64_t r, const float* x, const float* init, float* y,
              int64_t block_begin, int64_t block_end);

}  // namespace avx2
}  // namespace cpu
}  // namespace torchprune
