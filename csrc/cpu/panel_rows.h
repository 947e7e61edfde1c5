// The row traversal shared by the panel kernels of sparse_linear (cpu/spmm_avx2.cpp for AVX2,
// cpu/spmm_avx512.cpp for AVX-512), which differ only in the registers one row segment uses, and
// of block_sparse_linear (cpu/bsr_avx2.cpp), whose stored entries each cover R output rows.
//
// Rows [r0, r1) (block rows of R output rows each; R = 1 for CSR) go in chunks of kChunkRows
// output rows, each chunk through every K-block, so that the partial sums carried between blocks
// (kChunkRows x W floats, 64 KiB at W = 32) stay in L2 however many rows the layer has (a whole
// 4096-row layer would carry 512 KiB, more than L2). Each row of a chunk keeps a cursor: where its
// entries of the next K-block start. A finished group of kGroup output features is stored as rows
// of y.
//
// Kernel supplies the work: Kernel::segment<Bounded>(e, n, limit, carry, out) writes to
// out[0 .. R * W) carry (null for the first K-block) plus the sum over row n's entries from e up
// to column `limit` (to the row's end when not Bounded) of val * panel row col, and returns the
// first entry it did not take; Kernel::store(buf, rows, n0) writes a finished group of `rows`
// output features from n0. PanelKernel below is that Kernel for CSR and any register type Reg,
// which each ISA supplies (Ymm in cpu/spmm_avx2.cpp, Zmm in cpu/spmm_avx512.cpp): its lanes and a
// handful of intrinsics, each carrying its target attribute and plain `inline`. An always_inline
// call from these target-neutral templates into target-specific code does not compile; the
// callers, compiled for the target, are marked TP_FLATTEN, which inlines all of it back into one
// loop.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/avx2_tiles.h"
#include "cpu/spmm_avx2.h"

#define TP_FLATTEN __attribute__((flatten))

namespace torchprune {
namespace cpu {

template <int64_t W, int64_t R = 1, typename Kernel>
inline void panel_rows(const avx2::KBlocks& kb, int64_t r0, int64_t r1, const Kernel& kernel) {
  constexpr int64_t kGroup = avx2::kGroup / R, kChunkRows = avx2::kChunkRows / R;
  float buf[avx2::kGroup][W];
  // The partial sums of one chunk between K-blocks, and each row's next entry (none with a
  // single block).
  const int64_t carried = kb.blocks > 1 ? std::min(kChunkRows, r1 - r0) : 0;
  std::vector<float> carry(carried * R * W);
  std::vector<int64_t> cursor(carried);
  const int32_t* row_ptr = kernel.a.row_ptr;
  for (int64_t c0 = r0; c0 < r1; c0 += kChunkRows) {
    const int64_t c1 = std::min(r1, c0 + kChunkRows);
    for (int64_t j = 0; j < kb.blocks; ++j) {
      const bool first = j == 0, last = j + 1 == kb.blocks;
      for (int64_t n0 = c0; n0 < c1; n0 += kGroup) {
        const int64_t rows = std::min(kGroup, c1 - n0);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t n = n0 + r;
          const int64_t e = first ? row_ptr[n] : cursor[n - c0];
          float* partial = carry.data() + (n - c0) * R * W;
          if (last) {
            kernel.template segment<false>(e, n, 0, first ? nullptr : partial, buf[r * R]);
          } else {
            cursor[n - c0] = kernel.template segment<true>(e, n, kb.limit(j),
                                                           first ? nullptr : partial, partial);
          }
        }
        if (last) kernel.store(buf, rows * R, n0 * R);
      }
    }
  }
}

// GCC warns that the register values passed between this target-neutral code and Reg's
// functions would change the ABI of a call. There is no such call: the flattened callers inline
// every piece (the built library has no out-of-line panel_segment, PanelKernel or Reg function).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

// out[0 .. W) = carry + the sum of val[e] * panel row col[e] over entries from e to `end`, up to
// column `limit` when Bounded, W = Reg::kLanes * V: U nonzeros in flight (U chains of V
// registers). carry is null for the first K-block. Returns the first entry not taken.
template <typename Reg, int V, int U, bool Bounded, typename I>
inline int64_t panel_segment(const I* col, const float* val, int64_t e, int64_t end,
                             int64_t limit, const float* panel, const float* carry, float* out) {
  constexpr int64_t L = Reg::kLanes, W = L * V;
  typename Reg::T acc[U][V];
  _Pragma("GCC unroll 8") for (int u = 0; u < U; ++u)
    _Pragma("GCC unroll 8") for (int v = 0; v < V; ++v)
      acc[u][v] = (u == 0 && carry) ? Reg::load(carry + L * v) : Reg::zero();
  for (; e + U <= end && avx2::in_block<Bounded>(col, e, U, limit); e += U) {
    _Pragma("GCC unroll 8") for (int u = 0; u < U; ++u) {
      const float* p = panel + static_cast<int64_t>(col[e + u]) * W;
      const typename Reg::T w = Reg::broadcast(val + e + u);
      _Pragma("GCC unroll 8") for (int v = 0; v < V; ++v)
        acc[u][v] = Reg::fma(w, Reg::load(p + L * v), acc[u][v]);
    }
  }
  if constexpr (Bounded) {
    for (; e < end && avx2::in_block<Bounded>(col, e, 1, limit); ++e) {
      const float* p = panel + static_cast<int64_t>(col[e]) * W;
      const typename Reg::T w = Reg::broadcast(val + e);
      _Pragma("GCC unroll 8") for (int v = 0; v < V; ++v)
        acc[0][v] = Reg::fma(w, Reg::load(p + L * v), acc[0][v]);
    }
  } else if (end > 0) {
    // The last 0 to U-1 entries as one group with the FMAs past `end` masked off (reading entry
    // end-1, which exists), not a loop whose random trip count the branch predictor misses.
    _Pragma("GCC unroll 8") for (int u = 0; u + 1 < U; ++u) {
      const int64_t q = std::min(e + u, end - 1);
      const bool on = e + u < end;
      const float* p = panel + static_cast<int64_t>(col[q]) * W;
      const typename Reg::T w = Reg::broadcast(val + q);
      _Pragma("GCC unroll 8") for (int v = 0; v < V; ++v)
        acc[u][v] = Reg::fma_if(on, w, Reg::load(p + L * v), acc[u][v]);
    }
    e = end;
  }
  _Pragma("GCC unroll 8") for (int v = 0; v < V; ++v) {
    typename Reg::T sum = acc[0][v];
    _Pragma("GCC unroll 8") for (int u = 1; u < U; ++u) sum = Reg::add(sum, acc[u][v]);
    Reg::store(out + L * v, sum);
  }
  return e;
}

// The Kernel of panel_rows for registers Reg, V per row and U nonzeros in flight: a finished
// group is stored by Reg::store_group (avx2::store_group's 8x8 transposes on every ISA, since
// VEX-encoded AVX2 code runs at full speed beside AVX-512 code).
template <typename Reg, int V, int U, typename I>
struct PanelKernel {
  static constexpr int64_t W = Reg::kLanes * V;
  const Csr<float, I>& a;
  const float* panel;
  int64_t width;
  const float* init;
  float* y;
  int64_t ldy;
  // Row n's entries from e (see panel_rows).
  template <bool Bounded>
  inline int64_t segment(int64_t e, int64_t n, int64_t limit, const float* carry,
                         float* out) const {
    return panel_segment<Reg, V, U, Bounded>(a.col, a.val, e, a.row_ptr[n + 1], limit, panel,
                                             carry, out);
  }
  inline void store(const float (*buf)[W], int64_t rows, int64_t n0) const {
    Reg::template store_group<W / 8>(buf, rows, width, init, y, ldy, n0);
  }
};

#pragma GCC diagnostic pop

}  // namespace cpu
}  // namespace torchprune
