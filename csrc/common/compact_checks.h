// Argument checks of `compact` that the CPU and CUDA kernels share, so that both raise the same
// messages (built from checks.h). Each kernel adds its own device rules: the CPU op takes CPU
// tensors and indices only; the CUDA op takes tensors on one GPU and indices there or on the CPU.
#pragma once

#include <ATen/ATen.h>

#include "common/checks.h"

namespace torchprune {

constexpr const char* kCompactOp = "compact";

inline void check_compact_lengths(at::TensorList tensors, at::IntArrayRef dims,
                                  at::TensorList indices) {
  TORCH_CHECK(dims.size() == tensors.size() && indices.size() == tensors.size(), kCompactOp,
              ": `tensors`, `dims` and `indices` must have the same length, got ", tensors.size(),
              ", ", dims.size(), " and ", indices.size());
}

// Checks tensors[i] and dims[i]; returns dims[i] wrapped into [0, tensors[i].dim()).
inline int64_t checked_compact_dim(int64_t i, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK(t.dim() >= 1, kCompactOp, ": `tensors[", i,
              "]` must have at least 1 dimension, got a 0-D tensor");
  TORCH_CHECK(dim >= -t.dim() && dim < t.dim(), kCompactOp, ": `dims[", i, "]` must be in [",
              -t.dim(), ", ", t.dim() - 1, "] for a tensor of shape ", shape_str(t.sizes()),
              ", got ", dim);
  return dim < 0 ? dim + t.dim() : dim;
}

// indices[i]'s shape and dtype (its device is the kernel's rule).
inline void check_compact_index(int64_t i, const at::Tensor& index) {
  TORCH_CHECK(index.dim() == 1, kCompactOp, ": `indices[", i, "]` must be 1-D, got a ",
              index.dim(), "-D tensor of shape ", shape_str(index.sizes()));
  TORCH_CHECK(index.scalar_type() == at::kLong, kCompactOp, ": `indices[", i,
              "]` must have dtype torch.int64, got ", dtype_str(index.scalar_type()));
}

// Every entry of indices[i], given as a contiguous CPU tensor, lies in [0, size).
inline void check_compact_index_range(int64_t i, const at::Tensor& host_index, int64_t size) {
  const int64_t* idx = host_index.const_data_ptr<int64_t>();
  for (int64_t k = 0; k < host_index.numel(); ++k) {
    TORCH_CHECK(idx[k] >= 0 && idx[k] < size, kCompactOp, ": `indices[", i, "]` must lie in [0, ",
                size, "), got ", idx[k], " at position ", k);
  }
}

}  // namespace torchprune
