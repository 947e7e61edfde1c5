// CPU kernels of the masked ops: masked_linear, masked_conv2d and their backward ops.
//
// The only arithmetic written here is the masking step, where(mask, w, 0); the matmul and the
// convolution go to ATen (MKL / oneDNN), which is the fast path. The masked weight exists only
// as a temporary inside each op call; the module keeps its one dense weight and one bool mask.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "common/checks.h"

namespace torchprune {
namespace {

using at::Tensor;

// out[i] = mask[i] ? src[i] : 0 over contiguous buffers (`out` may alias `src`). A select, not a
// multiply, so a pruned entry is exactly 0 even when the stored weight holds inf or nan. One pass,
// memory bound: the bool mask is a quarter of the bytes of a float32 weight.
template <typename scalar_t>
void mask_kernel(const scalar_t* src, const bool* mask, scalar_t* out, int64_t numel) {
  at::parallel_for(0, numel, at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      out[i] = mask[i] ? src[i] : scalar_t(0);
    }
  });
}

// Writes where(mask, src, 0) into `out`; all three contiguous with the same number of elements.
void apply_mask(const Tensor& src, const Tensor& mask, Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "apply_mask", [&] {
    mask_kernel<scalar_t>(src.const_data_ptr<scalar_t>(), mask.const_data_ptr<bool>(),
                          out.mutable_data_ptr<scalar_t>(), src.numel());
  });
}

// A fresh contiguous where(mask, weight, 0): the temporary masked weight of one op call.
Tensor masked_weight(const Tensor& weight, const Tensor& mask) {
  Tensor w = weight.contiguous();
  Tensor out = at::empty(w.sizes(), w.options());
  apply_mask(w, mask.contiguous(), out);
  return out;
}

// Zeroes `grad_weight` where mask is false; returns it contiguous (in place when it already was).
Tensor mask_grad_weight(const Tensor& grad_weight, const Tensor& mask) {
  Tensor out = grad_weight.contiguous();
  apply_mask(out, mask.contiguous(), out);
  return out;
}

// Outputs the caller did not ask for (output_mask false) come back as empty [0] tensors.
Tensor or_empty(const Tensor& t, const Tensor& like) {
  return t.defined() ? t : at::empty({0}, like.options());
}

// ---------------------------------------------------------------------------------------------
// masked_linear

void check_linear(const char* op, const Tensor& x, const Tensor& weight, const Tensor& mask) {
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

// Leading dims of x, flattened: x is used as a [rows, in_features] matrix.
int64_t leading_rows(const Tensor& x) {
  int64_t rows = 1;
  for (int64_t d = 0; d < x.dim() - 1; ++d) {
    rows *= x.size(d);
  }
  return rows;
}

Tensor masked_linear_cpu(const Tensor& x, const Tensor& weight, const Tensor& mask,
                         const std::optional<Tensor>& bias) {
  const char* op = "masked_linear";
  check_linear(op, x, weight, mask);
  if (bias.has_value()) {
    check_bias(op, *bias, weight);
  }
  const int64_t rows = leading_rows(x);
  Tensor w = masked_weight(weight, mask);
  Tensor x2 = x.reshape({rows, weight.size(1)});  // a view unless x is non-contiguous
  Tensor y2 = bias.has_value() ? at::addmm(*bias, x2, w.t()) : at::mm(x2, w.t());
  std::vector<int64_t> out_sizes(x.sizes().begin(), x.sizes().end());
  out_sizes.back() = weight.size(0);
  return y2.view(out_sizes);
}

std::tuple<Tensor, Tensor, Tensor> masked_linear_backward_cpu(
    const Tensor& grad_out, const Tensor& x, const Tensor& weight, const Tensor& mask,
    std::array<bool, 3> output_mask) {
  const char* op = "masked_linear_backward";
  check_linear(op, x, weight, mask);
  std::vector<int64_t> out_sizes(x.sizes().begin(), x.sizes().end());
  out_sizes.back() = weight.size(0);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(out_sizes), op, ": `grad_out` must have the ",
              "output's shape ", shape_str(out_sizes), ", got ", shape_str(grad_out.sizes()));
  check_like(op, "grad_out", grad_out, "weight", weight);

  const int64_t rows = leading_rows(x);
  Tensor g2 = grad_out.reshape({rows, weight.size(0)});
  Tensor grad_x, grad_weight, grad_bias;
  if (output_mask[0]) {
    grad_x = at::mm(g2, masked_weight(weight, mask)).view(x.sizes());
  }
  if (output_mask[1]) {
    grad_weight = mask_grad_weight(at::mm(g2.t(), x.reshape({rows, weight.size(1)})), mask);
  }
  if (output_mask[2]) {
    grad_bias = g2.sum(0);
  }
  return {or_empty(grad_x, x), or_empty(grad_weight, x), or_empty(grad_bias, x)};
}

// ---------------------------------------------------------------------------------------------
// masked_conv2d

void check_conv2d(const char* op, const Tensor& x, const Tensor& weight, const Tensor& mask,
                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
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

Tensor masked_conv2d_cpu(const Tensor& x, const Tensor& weight, const Tensor& mask,
                         const std::optional<Tensor>& bias, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const char* op = "masked_conv2d";
  check_conv2d(op, x, weight, mask, stride, padding, dilation, groups);
  if (bias.has_value()) {
    check_bias(op, *bias, weight);
  }
  return at::convolution(x, masked_weight(weight, mask), bias, stride, padding, dilation,
                         /*transposed=*/false, /*output_padding=*/{0, 0}, groups);
}

std::tuple<Tensor, Tensor, Tensor> masked_conv2d_backward_cpu(
    const Tensor& grad_out, const Tensor& x, const Tensor& weight, const Tensor& mask,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask) {
  const char* op = "masked_conv2d_backward";
  check_conv2d(op, x, weight, mask, stride, padding, dilation, groups);
  std::vector<int64_t> out_sizes = {x.size(0), weight.size(0), 0, 0};
  for (int d = 0; d < 2; ++d) {
    const int64_t kernel = dilation[d] * (weight.size(2 + d) - 1) + 1;
    out_sizes[2 + d] = (x.size(2 + d) + 2 * padding[d] - kernel) / stride[d] + 1;
  }
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(out_sizes), op, ": `grad_out` must have the ",
              "output's shape ", shape_str(out_sizes), ", got ", shape_str(grad_out.sizes()));
  check_like(op, "grad_out", grad_out, "weight", weight);

  const std::vector<int64_t> bias_shape = {weight.size(0)};
  const at::OptionalIntArrayRef bias_sizes =
      output_mask[2] ? at::OptionalIntArrayRef(bias_shape) : at::OptionalIntArrayRef();
  auto [grad_x, grad_weight, grad_bias] = at::convolution_backward(
      grad_out, x, masked_weight(weight, mask), bias_sizes, stride, padding, dilation,
      /*transposed=*/false, /*output_padding=*/{0, 0}, groups, output_mask);
  if (grad_weight.defined()) {
    grad_weight = mask_grad_weight(grad_weight, mask);
  }
  return {or_empty(grad_x, x), or_empty(grad_weight, x), or_empty(grad_bias, x)};
}

}  // namespace
}  // namespace torchprune

TORCH_LIBRARY_IMPL(torchprune, CPU, m) {
  m.impl("masked_linear", &torchprune::masked_linear_cpu);
  m.impl("masked_linear_backward", &torchprune::masked_linear_backward_cpu);
  m.impl("masked_conv2d", &torchprune::masked_conv2d_cpu);
  m.impl("masked_conv2d_backward", &torchprune::masked_conv2d_backward_cpu);
}
