// The packed sparse weight format shared by the sparse ops: CSR over the rows of a 2-D weight
// [out_features, in_features] (a conv weight [O, C, kh, kw] is packed as [O, C*kh*kw]).
//
//   row_ptr  int32 [rows + 1]   row r owns entries row_ptr[r] .. row_ptr[r+1]-1
//   col_idx  int16 [nnz]        the column of each entry, an unsigned 16-bit value stored in an
//            or int32 [nnz]     int16 tensor when in_features < 65536 (6 bytes per nonzero in
//                               fp32 instead of 8: at batch 1 the bytes moved set the speed)
//   values   [nnz]              in the weight's dtype
//
// Columns ascend within a row and no column repeats: pack_csr writes them that way and
// check_csr verifies it, so kernels trust the structure and never read out of bounds.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "common/checks.h"

namespace torchprune {

// The largest in_features whose columns fit the 16-bit index.
constexpr int64_t kMaxShortColumns = 65536;

inline at::ScalarType column_dtype(int64_t in_features) {
  return in_features < kMaxShortColumns ? at::kShort : at::kInt;
}

// A read-only view of one CSR matrix, with the column index type as a template parameter
// (uint16_t for the short form, int32_t otherwise).
template <typename T, typename I>
struct Csr {
  const int32_t* row_ptr;
  const I* col;
  const T* val;
  int64_t rows;
  int64_t cols;
};

// Checks the packed tensors at an op boundary: dtypes, shapes, devices and the end points of
// row_ptr, in O(1). With `structure` it also walks every entry (monotone row pointers, ascending
// in-range columns), in O(nnz): unpack_csr and the check_csr op do that, and the tp.nn modules
// call check_csr when a state_dict is loaded, so a hand-made or corrupted checkpoint fails with a clear message
// instead of reading out of bounds. The compute ops skip the walk: it would cost as much as a
// batch-1 product, and what pack_csr writes is valid by construction.
void check_csr(const char* op, const at::Tensor& row_ptr, const at::Tensor& col_idx,
               const at::Tensor& values, int64_t in_features, bool structure);

// Calls fn(Csr<T, I>) with the index type that col_idx holds.
template <typename T, typename Fn>
void with_csr(const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& values,
              int64_t in_features, Fn&& fn) {
  const int64_t rows = row_ptr.numel() - 1;
  if (col_idx.scalar_type() == at::kShort) {
    fn(Csr<T, uint16_t>{row_ptr.data_ptr<int32_t>(),
                        reinterpret_cast<const uint16_t*>(col_idx.data_ptr<int16_t>()),
                        values.data_ptr<T>(), rows, in_features});
  } else {
    fn(Csr<T, int32_t>{row_ptr.data_ptr<int32_t>(), col_idx.data_ptr<int32_t>(),
                       values.data_ptr<T>(), rows, in_features});
  }
}

}  // namespace torchprune
