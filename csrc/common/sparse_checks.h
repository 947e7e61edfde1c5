// Argument checks of the packed-sparse ops that the CPU and CUDA kernels share, so that both
// raise the same messages (built from checks.h and csr.h).
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "common/checks.h"
#include "common/csr.h"

namespace torchprune {

// The x of a sparse Linear op (sparse_linear, block_sparse_linear, nm_sparse_linear): floating,
// of the packed values' dtype and device, with in_features entries in its last dimension.
inline void check_linear_input(const char* op, const at::Tensor& x, const at::Tensor& values,
                               int64_t in_features) {
  check_floating(op, "x", x);
  check_like(op, "values", values, "x", x);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in_features, op,
              ": `x` must have in_features = ", in_features, " entries in its last dimension, got ",
              "shape ", shape_str(x.sizes()));
}

// sparse_linear's x and packed weight (O(1): the structure walk is check_csr's, see csr.h).
inline void check_sparse_linear(const char* op, const at::Tensor& x, const at::Tensor& row_ptr,
                                const at::Tensor& col_idx, const at::Tensor& values,
                                int64_t in_features) {
  check_csr(op, row_ptr, col_idx, values, in_features, /*structure=*/false);
  check_linear_input(op, x, values, in_features);
}

// The output shape of sparse_linear: x's shape with the last dim replaced by out_features.
inline std::vector<int64_t> sparse_linear_out_sizes(const at::Tensor& x, int64_t out_features) {
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end() - 1);
  sizes.push_back(out_features);
  return sizes;
}

// sparse_conv2d's x and int[2] arguments (the geometry checks that follow are the kernels').
inline void check_sparse_conv2d_args(const char* op, const at::Tensor& x,
                                     at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                     at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_dim(op, "x", x, 4);
  check_floating(op, "x", x);
  check_pair(op, "kernel_size", kernel_size, 1);
  check_pair(op, "stride", stride, 1);
  check_pair(op, "padding", padding, 0);
  check_pair(op, "dilation", dilation, 1);
}

// A bias is 1-D with one entry per output row of the packed weight (`rows`, called `what`:
// out_features or out_channels), dtype and device of x.
inline void check_sparse_bias(const char* op, const at::Tensor& bias, int64_t rows,
                              const char* what, const at::Tensor& x) {
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == rows, op, ": `bias` must have shape [", rows,
              "] (", what, "), got ", shape_str(bias.sizes()));
  check_like(op, "bias", bias, "x", x);
}

// grad_out must have the output's shape, dtype and device.
inline void check_sparse_grad_out(const char* op, const at::Tensor& grad_out,
                                  at::IntArrayRef out_sizes, const at::Tensor& x) {
  check_like(op, "grad_out", grad_out, "x", x);
  TORCH_CHECK(grad_out.sizes() == out_sizes, op, ": `grad_out` must have shape ",
              shape_str(out_sizes), ", got ", shape_str(grad_out.sizes()));
}

}  // namespace torchprune
