// Argument checks of the masked ops that the CPU and CUDA kernels share, so that both raise the
// same messages (built from checks.h).
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "common/checks.h"

namespace torchprune {

inline void check_masked_linear(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& mask) {
  check_floating(op, "weight", weight);
  check_dim(op, "weight", weight, 2);
  TORCH_CHECK(x.dim() >= 1, op, ": `x` must have at least 1 dimension (..., in_features), ",
              "got a 0-D tensor");
  check_like(op, "x", x, "weight", weight);
  TORCH_CHECK(x.size(-1) == weight.size(1), op,
              ": `x` must have last dimension in_features = weight.size(1) = ", weight.size(1),
              ", got shape ", shape_str(x.sizes()));
  check_mask(op, mask, weight);
}

// The output shape of masked_linear: x's shape with the last dim replaced by out_features.
inline std::vector<int64_t> masked_linear_out_sizes(const at::Tensor& x, const at::Tensor& weight) {
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes.back() = weight.size(0);
  return sizes;
}

inline void check_masked_conv2d(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& mask, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation,
                                int64_t groups) {
  check_floating(op, "weight", weight);
  check_dim(op, "weight", weight, 4);
  TORCH_CHECK(x.dim() == 4, op, ": `x` must be 4-D (N, C, H, W), got a ", x.dim(),
              "-D tensor of shape ", shape_str(x.sizes()));
  check_like(op, "x", x, "weight", weight);
  check_mask(op, mask, weight);
  check_pair(op, "stride", stride, 1);
  check_pair(op, "padding", padding, 0);
  check_pair(op, "dilation", dilation, 1);
  TORCH_CHECK(groups >= 1, op, ": `groups` must be >= 1, got ", groups);
  TORCH_CHECK(weight.size(0) % groups == 0, op,
              ": `groups` must divide the output channels weight.size(0) = ", weight.size(0),
              ", got ", groups);
  TORCH_CHECK(x.size(1) % groups == 0, op,
              ": `groups` must divide the input channels x.size(1) = ", x.size(1), ", got ",
              groups);
  TORCH_CHECK(weight.size(1) * groups == x.size(1), op,
              ": `weight` must have x.size(1) / groups = ", x.size(1) / groups,
              " input channels per group (dim 1), got shape ", shape_str(weight.sizes()));
  const char* names[2] = {"height", "width"};
  for (int d = 0; d < 2; ++d) {
    const int64_t kernel = dilation[d] * (weight.size(2 + d) - 1) + 1;
    TORCH_CHECK(x.size(2 + d) + 2 * padding[d] >= kernel, op, ": `x` must have ", names[d],
                " + 2 * padding >= the dilated kernel ", names[d], " ", kernel, ", got ",
                x.size(2 + d), " + 2 * ", padding[d]);
  }
}

// The output shape of masked_conv2d (arguments already checked).
inline std::vector<int64_t> masked_conv2d_out_sizes(const at::Tensor& x, const at::Tensor& weight,
                                                    at::IntArrayRef stride,
                                                    at::IntArrayRef padding,
                                                    at::IntArrayRef dilation) {
  std::vector<int64_t> sizes = {x.size(0), weight.size(0), 0, 0};
  for (int d = 0; d < 2; ++d) {
    const int64_t kernel = dilation[d] * (weight.size(2 + d) - 1) + 1;
    sizes[2 + d] = (x.size(2 + d) + 2 * padding[d] - kernel) / stride[d] + 1;
  }
  return sizes;
}

// grad_out must have the output's shape, dtype and device.
inline void check_grad_out(const char* op, const at::Tensor& grad_out,
                           const std::vector<int64_t>& out_sizes, const at::Tensor& weight) {
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(out_sizes), op, ": `grad_out` must have the ",
              "output's shape ", shape_str(out_sizes), ", got ", shape_str(grad_out.sizes()));
  check_like(op, "grad_out", grad_out, "weight", weight);
}

}  // namespace torchprune
