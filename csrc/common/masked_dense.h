// The part of the masked ops that is the same on every device: mask the weight into a temporary,
// then hand the product to ATen (at::convolution / at::convolution_backward pick MKL-DNN or
// cuDNN). Each device passes its own `apply_mask(src, mask, out)`, which writes
// where(mask, src, 0) into `out` (all three contiguous, same numel; `out` may be `src`).
// Arguments are checked, and the device guard set, by the caller.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

namespace torchprune {

// A fresh contiguous where(mask, weight, 0): the temporary masked weight of one op call.
template <typename ApplyMask>
at::Tensor masked_weight(const at::Tensor& weight, const at::Tensor& mask,
                         const ApplyMask& apply_mask) {
  const at::Tensor w = weight.contiguous();
  at::Tensor out = at::empty(w.sizes(), w.options());
  apply_mask(w, mask.contiguous(), out);
  return out;
}

// Zeroes `grad_weight` where mask is false; returns it contiguous (in place when it already was).
template <typename ApplyMask>
at::Tensor mask_grad_weight(const at::Tensor& grad_weight, const at::Tensor& mask,
                            const ApplyMask& apply_mask) {
  at::Tensor out = grad_weight.contiguous();
  apply_mask(out, mask.contiguous(), out);
  return out;
}

template <typename ApplyMask>
at::Tensor masked_conv2d_dense(const at::Tensor& x, const at::Tensor& weight,
                               const at::Tensor& mask, const std::optional<at::Tensor>& bias,
                               at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, int64_t groups,
                               const ApplyMask& apply_mask) {
  return at::convolution(x, masked_weight(weight, mask, apply_mask), bias, stride, padding,
                         dilation, /*transposed=*/false, /*output_padding=*/{0, 0}, groups);
}

// Gradients the caller did not ask for (output_mask false) come back undefined.
template <typename ApplyMask>
std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_conv2d_backward_dense(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& mask, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, std::array<bool, 3> output_mask,
    const ApplyMask& apply_mask) {
  const std::vector<int64_t> bias_shape = {weight.size(0)};
  const at::OptionalIntArrayRef bias_sizes =
      output_mask[2] ? at::OptionalIntArrayRef(bias_shape) : at::OptionalIntArrayRef();
  auto [grad_x, grad_weight, grad_bias] = at::convolution_backward(
      grad_out, x, masked_weight(weight, mask, apply_mask), bias_sizes, stride, padding,
      dilation, /*transposed=*/false, /*output_padding=*/{0, 0}, groups, output_mask);
  if (grad_weight.defined()) {
    grad_weight = mask_grad_weight(grad_weight, mask, apply_mask);
  }
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace torchprune
