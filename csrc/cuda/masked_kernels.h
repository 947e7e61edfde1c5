// CUDA launchers of the masking step behind masked_linear / masked_conv2d (csrc/cuda/masked.cu).
//
// Plain signatures (pointers, sizes, a stream) and no torch headers, so that nvcc compiles the
// kernels anywhere and the torch-facing wrappers (register_masked.cpp) stay ordinary C++.
//
// Masking is where(mask, w, 0), done as a select on the bits (w & (mask ? ~0 : 0)), exactly as on
// the CPU (csrc/common/mask_span.h): a pruned entry is +0 even where the stored weight holds inf or
// nan, which a multiply by the mask would turn into nan. A select needs only the element width, so
// one kernel per width serves float (4 bytes), double (8), __half and __nv_bfloat16 (2).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace torchprune {
namespace cuda {

// out[i] = mask[i] ? src[i] : 0 for i < numel, elements of `elem_size` bytes (2, 4 or 8). `mask`
// holds one byte per element (torch.bool, or torch.uint8 where any nonzero byte keeps). `out` may
// be `src` (in place: the masked weight gradient) but must not otherwise overlap it. Any alignment
// is accepted; 16-byte accesses are used when all three pointers allow them. Asynchronous on
// `stream`; returns the launch error.
cudaError_t launch_mask(const void* src, const uint8_t* mask, void* out, int64_t numel,
                        int elem_size, cudaStream_t stream);

// The products themselves go through cuBLAS / cuDNN on the masked weight; the weight gradient they
// return is masked in place with the same kernel (launch_mask_inplace below). Fusing the mask into
// the GEMM epilogue would save one pass over the weight, but not through ATen's matmul.

// Typed forms, for callers that hold typed pointers (float, double, __half, __nv_bfloat16, or
// c10::Half / c10::BFloat16, which share the 2-byte layout).
template <typename scalar_t>
inline cudaError_t launch_mask(const scalar_t* src, const uint8_t* mask, scalar_t* out,
                               int64_t numel, cudaStream_t stream) {
  static_assert(sizeof(scalar_t) == 2 || sizeof(scalar_t) == 4 || sizeof(scalar_t) == 8,
                "masking supports 2-, 4- and 8-byte elements");
  return launch_mask(static_cast<const void*>(src), mask, static_cast<void*>(out), numel,
                     static_cast<int>(sizeof(scalar_t)), stream);
}

// grad_w[i] = mask[i] ? grad_w[i] : 0, in place: the masked weight gradient.
template <typename scalar_t>
inline cudaError_t launch_mask_inplace(scalar_t* grad_w, const uint8_t* mask, int64_t numel,
                                       cudaStream_t stream) {
  return launch_mask<scalar_t>(grad_w, mask, grad_w, numel, stream);
}

}  // namespace cuda
}  // namespace torchprune
