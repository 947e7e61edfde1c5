// Xᵀ panels for the AVX2 fp32 kernels (spmm_avx2.h, bsr_avx2.h), as a tensor.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace torchprune {
namespace cpu {

// Xᵀ of a contiguous fp32 x2 [M, K] as [tiles, K, tile] panels, the last one zero-padded to the
// full tile (AVX2 packing by 8x8 register transposes, tiles on `threads` threads, or on as many
// as m x K values are worth when it is 0). Call only when avx2::supported(). With `scratch` the
// panels live in this thread's scratch_panels buffer (for a forward, which holds one set).
at::Tensor x_panels(const at::Tensor& x2, int64_t tile, int64_t threads = 0, bool scratch = false);

// An uninitialised [tiles, k, tile] tensor in a buffer that the calling thread keeps between
// calls and only ever grows: the next call on the same thread hands out the same memory, so use
// it for the panels of one forward and never keep it. Why: a fresh tensor per call is a fresh
// allocation of up to several MiB (1024 rows x 1536 inputs: 6 MiB), and glibc's malloc serves
// such sizes with mmap or gives them back to the kernel when freed, depending on a threshold that
// moves as the process runs. Then every call faults its pages in again: on an Intel Xeon,
// all-MiniLM-L6-v2 at 90% and 8 x 128 tokens took 41-47 ms per call in some states of the same
// process and 55-61 ms with 14,000-18,000 page faults per call in others.
at::Tensor scratch_panels(int64_t tiles, int64_t k, int64_t tile, const at::TensorOptions& options);

}  // namespace cpu
}  // namespace torchprune
