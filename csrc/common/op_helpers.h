// Small device-independent pieces that the CPU and CUDA kernels of several ops share.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace torchprune {

// Rows of x once its leading dims are flattened: x is used as a [rows, x.size(-1)] matrix
// (explicit: reshape(-1, 0) would be ambiguous when a dim is 0).
inline int64_t batch_rows(const at::Tensor& x) {
  return c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
}

// Outputs the caller did not ask for (output_mask false) come back as empty [0] tensors.
inline at::Tensor or_empty(const at::Tensor& t, const at::Tensor& like) {
  return t.defined() ? t : at::empty({0}, like.options());
}

}  // namespace torchprune
