// The CPU sparse-times-dense building blocks behind sparse_linear and sparse_conv2d.
//
// Each works on a range of CSR rows, so callers split rows (and columns of the dense operand)
// across threads as they see fit. All dense operands are row-major with a leading dimension.
// Every function exists for T in {float, double} and I in {uint16_t, int32_t}; each is compiled
// for AVX-512, AVX2+FMA and baseline x86-64, and the best one is picked at load time.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>
#include <vector>

#include "common/csr.h"

namespace torchprune {
namespace cpu {

// Columns of b that spmm keeps in registers per row: two 512-bit registers of T. A caller with
// more columns than this does best to lay b out as contiguous [cols, kPanelWidth] panels, so the
// rows one tile touches share cache lines with nothing else.
template <typename T>
constexpr int64_t kPanelWidth = 128 / sizeof(T);

// c[n, t] = init[n] + sum_j a[n, j] * b[j, t] for rows n in [row_begin, row_end) and t < m.
// b is [a.cols, >= m] with leading dimension ldb. The result goes to
// c[n * c_row_stride + t * c_col_stride]: (ldc, 1) writes row-major [rows, m]; (1, ldc) writes
// it transposed, which is how sparse_linear produces y = x @ W^T from Xᵀ. init may be null.
template <typename T, typename I>
void spmm(const Csr<T, I>& a, const T* b, int64_t ldb, int64_t m, const T* init, T* c,
          int64_t c_row_stride, int64_t c_col_stride, int64_t row_begin, int64_t row_end);

// c[n, t] = init[n] + sum_e val[e] * b[offset[e] + t] over the entries e of rows
// [row_begin, row_end), t < m, into row-major c (c_row_stride, 1): spmm whose entries carry
// their own offset into b instead of a column times a leading dimension. sparse_conv2d uses it
// to multiply straight out of the (padded) input image, one output row segment at a time.
template <typename T>
void spmm_offsets(const int32_t* row_ptr, const int32_t* offset, const T* val, const T* b,
                  int64_t m, const T* init, T* c, int64_t c_row_stride, int64_t row_begin,
                  int64_t row_end);

// y[n] = init[n] + sum_j a[n, j] * x[j] for rows in [row_begin, row_end): the batch-1 path,
// which gathers x through the column indices and reads each nonzero exactly once.
template <typename T, typename I>
void spmv(const Csr<T, I>& a, const T* x, const T* init, T* y, int64_t row_begin,
          int64_t row_end);

// c[j, t] += sum_n a[n, j] * b[n, t] over rows n in [row_begin, row_end), t < m: the product
// with the transposed matrix (the gradient w.r.t. the input), as a scatter. c is [a.cols, >= m]
// with leading dimension ldc; two calls may run at once only on disjoint columns t of c.
template <typename T, typename I>
void spmm_transposed(const Csr<T, I>& a, const T* b, int64_t ldb, int64_t m, T* c, int64_t ldc,
                     int64_t row_begin, int64_t row_end);

// out[e] = sum_t p[n, t] * q[col(e), t] for every stored entry e of rows [row_begin, row_end):
// the sampled dense-dense product (SDDMM) that gives the gradient of the nonzero values only.
// p is [a.rows, >= m] (ldp), q is [a.cols, >= m] (ldq); out is indexed like a.val.
template <typename T, typename I>
void sddmm(const Csr<T, I>& a, const T* p, int64_t ldp, const T* q, int64_t ldq, int64_t m,
           T* out, int64_t row_begin, int64_t row_end);

}  // namespace cpu
}  // namespace torchprune

namespace torchprune {
namespace cpu {

// Splits rows [0, rows) into `parts` contiguous panels of about equal work (stored entries plus
// one per row), so threads get equal nonzeros rather than equal rows. Returns parts + 1 bounds.
std::vector<int64_t> row_panels(const int32_t* row_ptr, int64_t rows, int64_t parts);

// Threads worth using for `work` multiply-adds: below about 32k the fork costs more than it saves.
int64_t useful_threads(int64_t work);

// Runs fn(item) for items [0, count) on up to `threads` threads (inline when one is enough).
template <typename Fn>
void for_items(int64_t count, int64_t threads, const Fn& fn) {
  if (threads <= 1 || count <= 1) {
    for (int64_t i = 0; i < count; ++i) fn(i);
    return;
  }
  at::parallel_for(0, count, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) fn(i);
  });
}

}  // namespace cpu
}  // namespace torchprune
