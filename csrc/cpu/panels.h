// Xᵀ panels for the AVX2 fp32 kernels (spmm_avx2.h, bsr_avx2.h), as a tensor.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace torchprune {
namespace cpu {

// Xᵀ of a contiguous fp32 x2 [M, K] as [tiles, K, tile] panels, the last one zero-padded to the
// full tile (AVX2 packing by 8x8 register transposes, tiles on `threads` threads, or on as many
// as m x K values are worth when it is 0). Call only when avx2::supported().
at::Tensor x_panels(const at::Tensor& x2, int64_t tile, int64_t threads = 0);

}  // namespace cpu
}  // namespace torchprune
