// AVX2 fp32 kernels of block_sparse_linear (contracts in bsr_avx2.h).
//
// Per stored block (R values of one input column c) the panel kernel loads panel row c once
// (tile/8 vectors) and does R x tile/8 FMAs into R x tile/8 accumulators: 8 independent chains
// for both R = 4 (tile 16) and R = 8 (tile 8), enough to hide the FMA latency. Eight output
// features (8/R block rows) are finished into a buffer and stored row-major by the 8x8 register
// transposes of avx2_tiles.h; K-blocks, row chunks and cursors are the CSR kernel's traversal
// (cpu/panel_rows.h).
#include "cpu/bsr_avx2.h"

#include <cstdint>

#include "cpu/avx2_tiles.h"
#include "cpu/panel_rows.h"

namespace torchprune {
namespace cpu {
namespace avx2 {
namespace {

// out[i * W .. i * W + W) (i < R) = carry + sum over blocks from e to `end` (up to column
// `limit` when Bounded) of val[e * R + i] * panel row col[e]. carry (same layout) is null for the
// first K-block. Returns the first block not taken. Plain `inline`: it is reached through
// panel_rows, whose TP_FLATTEN caller inlines it (see cpu/panel_rows.h).
template <int R, int V, bool Bounded, typename I>
TP_AVX2 inline int64_t block_segment(const I* col, const float* val, int64_t e, int64_t end,
                                     int64_t limit, const float* panel, const float* carry,
                                     float* out) {
  constexpr int64_t W = 8 * V;
  __m256 acc[R][V];
  _Pragma("GCC unroll 8") for (int i = 0; i < R; ++i)
    _Pragma("GCC unroll 4") for (int v = 0; v < V; ++v)
      acc[i][v] = carry ? _mm256_loadu_ps(carry + i * W + 8 * v) : _mm256_setzero_ps();
  for (; e < end && in_block<Bounded>(col, e, 1, limit); ++e) {
    const float* p = panel + static_cast<int64_t>(col[e]) * W;
    __m256 x[V];
    _Pragma("GCC unroll 4") for (int v = 0; v < V; ++v) x[v] = _mm256_loadu_ps(p + 8 * v);
    const float* w = val + e * R;
    _Pragma("GCC unroll 8") for (int i = 0; i < R; ++i) {
      const __m256 b = _mm256_broadcast_ss(w + i);
      _Pragma("GCC unroll 4") for (int v = 0; v < V; ++v)
        acc[i][v] = _mm256_fmadd_ps(b, x[v], acc[i][v]);
    }
  }
  _Pragma("GCC unroll 8") for (int i = 0; i < R; ++i)
    _Pragma("GCC unroll 4") for (int v = 0; v < V; ++v)
      _mm256_storeu_ps(out + i * W + 8 * v, acc[i][v]);
  return e;
}

// store_group behind plain `inline`, for BlockKernel (see block_segment).
template <int V>
TP_AVX2 inline void store_rows(const float (*buf)[8 * V], int64_t rows, int64_t width,
                               const float* init, float* y, int64_t ldy, int64_t n0) {
  store_group<V>(buf, rows, width, init, y, ldy, n0);
}

// The Kernel of panel_rows over block rows of R output rows.
template <int R, int V, typename I>
struct BlockKernel {
  static constexpr int64_t W = 8 * V;
  const Csr<float, I>& a;
  const float* panel;
  int64_t width;
  const float* init;
  float* y;
  int64_t ldy;
  template <bool Bounded>
  inline int64_t segment(int64_t e, int64_t b, int64_t limit, const float* carry,
                         float* out) const {
    return block_segment<R, V, Bounded>(a.col, a.val, e, a.row_ptr[b + 1], limit, panel, carry,
                                        out);
  }
  inline void store(const float (*buf)[W], int64_t rows, int64_t n0) const {
    store_rows<V>(buf, rows, width, init, y, ldy, n0);
  }
};

// Block rows [b0, b1) through panel_rows.
template <int R, int V, typename I>
TP_AVX2 TP_FLATTEN void bsr_kernel(const Csr<float, I>& a, const KBlocks& kb, const float* panel,
                                   int64_t width, const float* init, float* y, int64_t ldy,
                                   int64_t b0, int64_t b1) {
  panel_rows<8 * V, R>(kb, b0, b1, BlockKernel<R, V, I>{a, panel, width, init, y, ldy});
}

// Sum of the four accumulators and init, stored to the R outputs of one block row.
template <int R>
TP_AVX2_INLINE void finish_spmv(const __m256 acc[4], const float* init, float* y) {
  if constexpr (R == 8) {
    __m256 s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    if (init) s = _mm256_add_ps(s, _mm256_loadu_ps(init));
    _mm256_storeu_ps(y, s);
  } else {  // R == 4: the low halves hold the sums
    __m128 s = _mm_add_ps(_mm_add_ps(_mm256_castps256_ps128(acc[0]), _mm256_castps256_ps128(acc[1])),
                          _mm_add_ps(_mm256_castps256_ps128(acc[2]), _mm256_castps256_ps128(acc[3])));
    if (init) s = _mm_add_ps(s, _mm_loadu_ps(init));
    _mm_storeu_ps(y, s);
  }
}

// One block's product into an accumulator: R values times the broadcast x[col].
template <int R>
TP_AVX2_INLINE __m256 block_fma(const float* w, const float* xc, __m256 acc) {
  if constexpr (R == 8) {
    return _mm256_fmadd_ps(_mm256_loadu_ps(w), _mm256_broadcast_ss(xc), acc);
  } else {
    return _mm256_castps128_ps256(_mm_fmadd_ps(_mm_loadu_ps(w), _mm_broadcast_ss(xc),
                                               _mm256_castps256_ps128(acc)));
  }
}

template <int R, typename I>
TP_AVX2 void bsr_spmv_kernel(const Csr<float, I>& a, const float* x, const float* init,
                             float* y, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                     _mm256_setzero_ps()};
    int64_t e = a.row_ptr[b];
    const int64_t end = a.row_ptr[b + 1];
    for (; e + 4 <= end; e += 4) {  // four blocks in flight: independent gathers and FMAs
      _Pragma("GCC unroll 4") for (int u = 0; u < 4; ++u)
        acc[u] = block_fma<R>(a.val + (e + u) * R, x + a.col[e + u], acc[u]);
    }
    for (; e < end; ++e) acc[0] = block_fma<R>(a.val + e * R, x + a.col[e], acc[0]);
    finish_spmv<R>(acc, init ? init + b * R : nullptr, y + b * R);
  }
}

}  // namespace

template <typename I>
void bsr_panel(const Csr<float, I>& a, int64_t r, const KBlocks& kb, const float* panel,
               int64_t width, const float* init, float* y, int64_t ldy, int64_t b0, int64_t b1) {
  if (r == 8) {
    bsr_kernel<8, 1>(a, kb, panel, width, init, y, ldy, b0, b1);
  } else {
    bsr_kernel<4, 2>(a, kb, panel, width, init, y, ldy, b0, b1);
  }
}

template <typename I>
void bsr_spmv(const Csr<float, I>& a, int64_t r, const float* x, const float* init, float* y,
              int64_t b0, int64_t b1) {
  if (r == 8) {
    bsr_spmv_kernel<8>(a, x, init, y, b0, b1);
  } else {
    bsr_spmv_kernel<4>(a, x, init, y, b0, b1);
  }
}

template void bsr_panel<uint16_t>(const Csr<float, uint16_t>&, int64_t, const KBlocks&,
                                  const float*, int64_t, const float*, float*, int64_t, int64_t,
                                  int64_t);
template void bsr_panel<int32_t>(const Csr<float, int32_t>&, int64_t, const KBlocks&,
                                 const float*, int64_t, const float*, float*, int64_t, int64_t,
                                 int64_t);
template void bsr_spmv<uint16_t>(const Csr<float, uint16_t>&, int64_t, const float*,
                                 const float*, float*, int64_t, int64_t);
template void bsr_spmv<int32_t>(const Csr<float, int32_t>&, int64_t, const float*, const float*,
                                float*, int64_t, int64_t);

}  // namespace avx2
}  // namespace cpu
}  // namespace torchprune
