// The row traversal shared by the CSR panel kernels of sparse_linear (cpu/spmm_avx2.cpp for AVX2,
// cpu/spmm_avx512.cpp for AVX-512), which differ only in the registers one row segment uses.
//
// Rows [r0, r1) go in chunks of kChunkRows, each chunk through every K-block, so that the partial
// sums carried between blocks (kChunkRows x W floats, 64 KiB at W = 32) stay in L2 however many
// rows the layer has (a whole 4096-row layer would carry 512 KiB, more than L2). A finished group
// of kGroup features is stored as rows of y.
//
// Kernel supplies the work: Kernel::segment(e, end, carry, out) writes to out[0 .. W) carry (null
// for the first K-block) plus the sum over entries e .. end-1 of val[e] * panel row col[e], and
// Kernel::store(buf, rows, n0) writes a finished group. PanelKernel below is that Kernel for any
// register type Reg, which each ISA supplies (Ymm in cpu/spmm_avx2.cpp, Zmm in
// cpu/spmm_avx512.cpp): its lanes and a handful of intrinsics, each carrying its target attribute
// and plain `inline`. An always_inline call from these target-neutral templates into
// target-specific code does not compile; the callers, compiled for the target, are marked
// TP_FLATTEN, which inlines all of it back into one loop.
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

// GCC warns that the register values passed between this target-neutral code and Reg's
// functions would change the ABI of a call. There is no such call: the flattened callers inline
// every piece (the built library has no out-of-line panel_segment, PanelKernel or Reg function).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

// out[0 .. W) = carry + the sum over entries e in [e, end) of val[e] * panel row col[e], W =
// Reg::kLanes * V: U nonzeros in flight (U chains of V registers). carry is null for the first
// K-block.
template <typename Reg, int V, int U, typename I>
inline void panel_segment(const I* col, const float* val, int64_t e, int64_t end,
                          const float* panel, const float* carry, float* out) {
  constexpr int64_t L = Reg::kLanes, W = L * V;
  typename Reg::T acc[U][V];
  _Pragma("GCC unroll 8") for (int u = 0; u < U; ++u)
    _Pragma("GCC unroll 8") for (int v = 0; v < V; ++v)
      acc[u][v] = (u == 0 && carry) ? Reg::load(carry + L * v) : Reg::zero();
  for (; e + U <= end; e += U) {
    _Pragma("GCC unroll 8") for (int u = 0; u < U; ++u) {
      const float* p = panel + static_cast<int64_t>(col[e + u]) * W;
      const typename Reg::T w = Reg::broadcast(val + e + u);
      _Pragma("GCC unroll 8") for (int v = 0; v < V; ++v)
        acc[u][v] = Reg::fma(w, Reg::load(p + L * v), acc[u][v]);
    }
  }
  for (; e < end; ++e) {
    const float* p = panel + static_cast<int64_t>(col[e]) * W;
    const typename Reg::T w = Reg::broadcast(val + e);
    _Pragma("GCC unroll 8") for (int v = 0; v < V; ++v)
      acc[0][v] = Reg::fma(w, Reg::load(p + L * v), acc[0][v]);
  }
  _Pragma("GCC unroll 8") for (int v = 0; v < V; ++v) {
    typename Reg::T sum = acc[0][v];
    _Pragma("GCC unroll 8") for (int u = 1; u < U; ++u) sum = Reg::add(sum, acc[u][v]);
    Reg::store(out + L * v, sum);
  }
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
  inline void segment(int64_t e, int64_t end, const float* carry, float* out) const {
    panel_segment<Reg, V, U>(a.col, a.val, e, end, panel, carry, out);
  }
  inline void store(const float (*buf)[W], int64_t rows, int64_t n0) const {
    Reg::template store_group<W / 8>(buf, rows, width, init, y, ldy, n0);
  }
};

#pragma GCC diagnostic pop

}  // namespace cpu
}  // namespace torchprune
