// The row traversal shared by the CSR panel kernels of sparse_linear (cpu/spmm_avx2.cpp for AVX2,
// cpu/spmm_avx512.cpp for AVX-512), which differ only in the registers one row segment uses.
//
// Rows [r0, r1) go in chunks of kChunkRows, each chunk through every K-block, so that the partial
// sums carried between blocks (kChunkRows x W floats, 64 KiB at W = 32) stay in L2 however many
// rows the layer has (a whole 4096-row layer would carry 512 KiB, more than L2). A finished group
// of kGroup features is stored as rows of y.
//
// Kernel supplies the ISA: Kernel::segment(e, end, carry, out) writes to out[0 .. W) carry (null
// for the first K-block) plus the sum over entries e .. end-1 of val[e] * panel row col[e], and
// Kernel::store(buf, rows, n0) writes a finished group. Both carry their target attribute and are
// plain `inline`: an always_inline call from this target-neutral template into target-specific
// code does not compile. The caller, compiled for the same target, is marked TP_FLATTEN, which
// inlines all of it back into one loop.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/avx2_tiles.h"
#include "cpu/spmm_avx2.h"

#define TP_FLATTEN __attribute__((flatten))

namespace torchprune {
namespace cpu {

template <int64_t W, typename Kernel>
inline void panel_rows(const avx2::KBlocks& kb, int64_t r0, int64_t r1, const Kernel& kernel) {
  constexpr int64_t kGroup = avx2::kGroup, kChunkRows = avx2::kChunkRows;
  float buf[kGroup][W];
  // The partial sums of one chunk between K-blocks (none with a single block).
  std::vector<float> carry(kb.blocks > 1 ? std::min(kChunkRows, r1 - r0) * W : 0);
  const int32_t* ptr = kb.ptr.data();
  const int64_t rows_total = kb.rows;
  for (int64_t c0 = r0; c0 < r1; c0 += kChunkRows) {
    const int64_t c1 = std::min(r1, c0 + kChunkRows);
    for (int64_t j = 0; j < kb.blocks; ++j) {
      const bool first = j == 0, last = j + 1 == kb.blocks;
      for (int64_t n0 = c0; n0 < c1; n0 += kGroup) {
        const int64_t rows = std::min(kGroup, c1 - n0);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t n = n0 + r;
          float* partial = carry.data() + (n - c0) * W;
          kernel.segment(ptr[j * rows_total + n], ptr[(j + 1) * rows_total + n],
                         first ? nullptr : partial, last ? buf[r] : partial);
        }
        if (last) kernel.store(buf, rows, n0);
      }
    }
  }
}

}  // namespace cpu
}  // namespace torchprune
