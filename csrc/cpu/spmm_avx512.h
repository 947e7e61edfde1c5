// The AVX-512 kernels of spmm and spmm_offsets, same contracts as in spmm.h. Call it only when supported() is true.
#pragma once

#include <cstdint>

#include "common/csr.h"

namespace torchprune {
namespace cpu {
namespace avx512 {

// True when this CPU has AVX-512 F, BW, VL and DQ.
bool supported();

template <typename T, typename I>
void spmm(const Csr<T, I>& a, const T* b, int64_t ldb, int64_t m, const T* init, T* c,
          int64_t c_row_stride, int64_t c_col_stride, int64_t row_begin, int64_t row_end);

template <typename T>
void spmm_offsets(const int32_t* row_ptr, const int32_t* offset, const T* val, const T* b,
                  int64_t m, const T* init, T* c, int64_t c_row_stride, int64_t row_begin,
                  int64_t row_end);

}  // namespace avx512
}  // namespace cpu
}  // namespace torchprune
