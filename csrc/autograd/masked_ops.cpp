// Autograd of the masked ops, in C++ so that a masked layer costs no Python on its hot path.
//
// Registered at the Autograd dispatch key, so it serves every device. Each backward is itself
// an op (masked_linear_backward, masked_conv2d_backward), called through the dispatcher: eager
// mode runs the device kernel, torch.compile / torch.export trace the op through its fake
// kernel. Only the gradients autograd asks for are computed, and the mask never gets one.
// Higher derivatives (create_graph=True) go through differentiable ATen ops, see building_graph.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "autograd/helpers.h"
#include "common/op_handles.h"

namespace torchprune {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using namespace autograd_helpers;

Tensor masked(const Tensor& mask, const Tensor& values) { return at::where(mask, values, 0); }

class MaskedLinear : public torch::autograd::Function<MaskedLinear> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight,
                        const Tensor& mask, const Tensor& bias, bool has_bias) {
    ctx->save_for_backward({x, weight, mask});
    ctx->saved_data["has_bias"] = has_bias;
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return masked_linear_op().call(x, weight, mask, as_optional(bias, has_bias));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &weight = saved[1], &mask = saved[2], &grad = grad_outputs[0];
    const bool need_x = ctx->needs_input_grad(0), need_weight = ctx->needs_input_grad(1);
    const bool need_bias = ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(3);
    if (building_graph()) {
      const Tensor grad2 = grad.reshape({-1, weight.size(0)});
      return {need_x ? at::matmul(grad, masked(mask, weight)) : Tensor(),
              need_weight ? masked(mask, at::mm(grad2.t(), x.reshape({-1, weight.size(1)})))
                          : Tensor(),
              Tensor(), need_bias ? grad2.sum(0) : Tensor(), Tensor()};
    }
    auto [grad_x, grad_weight, grad_bias] =
        masked_linear_backward_op().call(grad, x, weight, mask, {need_x, need_weight, need_bias});
    return {if_needed(need_x, grad_x), if_needed(need_weight, grad_weight), Tensor(),
            if_needed(need_bias, grad_bias), Tensor()};
  }
};

class MaskedConv2d : public torch::autograd::Function<MaskedConv2d> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight,
                        const Tensor& mask, const Tensor& bias, bool has_bias,
                        at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
    ctx->save_for_backward({x, weight, mask});
    ctx->saved_data["has_bias"] = has_bias;
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["groups"] = groups;
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return masked_conv2d_op().call(x, weight, mask, as_optional(bias, has_bias), stride, padding,
                                   dilation, groups);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const bool need_x = ctx->needs_input_grad(0), need_weight = ctx->needs_input_grad(1);
    const bool need_bias = ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(3);
    const auto stride = ctx->saved_data["stride"].toIntVector();
    const auto padding = ctx->saved_data["padding"].toIntVector();
    const auto dilation = ctx->saved_data["dilation"].toIntVector();
    const int64_t groups = ctx->saved_data["groups"].toInt();
    const Tensor &x = saved[0], &weight = saved[1], &mask = saved[2], &grad = grad_outputs[0];
    if (building_graph()) {
      const std::vector<int64_t> bias_shape = {weight.size(0)};
      auto [grad_x, grad_weight, grad_bias] = at::convolution_backward(
          grad, x, masked(mask, weight),
          need_bias ? at::OptionalIntArrayRef(bias_shape) : at::OptionalIntArrayRef(), stride,
          padding, dilation, /*transposed=*/false, /*output_padding=*/{0, 0}, groups,
          {need_x, need_weight, need_bias});
      return {grad_x, need_weight ? masked(mask, grad_weight) : Tensor(), Tensor(), grad_bias,
              Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    }
    auto [grad_x, grad_weight, grad_bias] =
        masked_conv2d_backward_op().call(grad, x, weight, mask, stride, padding, dilation, groups,
                {need_x, need_weight, need_bias});
    return {if_needed(need_x, grad_x), if_needed(need_weight, grad_weight), Tensor(),
            if_needed(need_bias, grad_bias), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor masked_linear_autograd(const Tensor& x, const Tensor& weight, const Tensor& mask,
                              const std::optional<Tensor>& bias) {
  return MaskedLinear::apply(x, weight, mask, bias_or_placeholder(bias, weight), bias.has_value());
}

Tensor masked_conv2d_autograd(const Tensor& x, const Tensor& weight, const Tensor& mask,
                              const std::optional<Tensor>& bias, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  return MaskedConv2d::apply(x, weight, mask, bias_or_placeholder(bias, weight), bias.has_value(),
                             stride, padding, dilation, groups);
}

}  // namespace
}  // namespace torchprune

TORCH_LIBRARY_IMPL(torchprune, Autograd, m) {
  m.impl("masked_linear", &torchprune::masked_linear_autograd);
  m.impl("masked_conv2d", &torchprune::masked_conv2d_autograd);
}
