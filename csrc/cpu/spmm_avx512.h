// The AVX-512 kernels of spmm and spmm_offsets (contracts in spmm.h) and of the wide-tile
// spmm_panel (spmm_avx2.h). Call them only when supported() is true; the dispatchers call them
// when enabled().
#pragma once

#include <cstdint>

#include "common/csr.h"
#include "cpu/spmm_avx2.h"

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

// supported(), and neither TORCHPRUNE_NO_AVX512 nor TORCHPRUNE_PORTABLE set (read once per
// process): whether the AVX-512 kernels run. The switches let tests cover the others here too.
bool enabled();

// avx2::spmm_panel (contract in spmm_avx2.h) for the wide tile, avx2::kWideTile = 32 rows of x:
// each stored value scales its panel row in two 512-bit registers where the AVX2 kernel needs
// four, and two nonzeros are in flight. avx2::spmm_panel calls it when enabled().
template <typename I>
void spmm_panel(const Csr<float, I>& a, const avx2::KBlocks& kb, const float* panel, int64_t width,
                const float* init, float* y, int64_t ldy, int64_t r0, int64_t r1);

}  // namespace avx512
}  // namespace cpu
}  // namespace torchprune
