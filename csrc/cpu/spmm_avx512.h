// The AVX-512 kernel of spmm, same contract as in spmm.h. Call it only when supported() is true.
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

}  // namespace avx512
}  // namespace cpu
}  // namespace torchprune
