// Autograd of the sparse ops (sparse_linear, sparse_conv2d), in C++ like the masked ops.
//
// The differentiable inputs are x, values (the stored entries: a packed model fine-tunes only
// the weights it kept) and bias; row_ptr and col_idx are structure and get no gradient. Each
// backward is an op called through the dispatcher, so torch.compile traces it via its fake
// kernel. With create_graph=True the same gradients come from differentiable ATen ops on the
// weight unpacked with index_put, whose own derivative gathers the stored entries back.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <vector>

#include "autograd/helpers.h"
#include "common/csr.h"
#include "common/op_handles.h"

namespace torchprune {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using namespace autograd_helpers;

// Position of every stored entry in the flattened dense weight [rows * in_features].
Tensor flat_positions(const Tensor& row_ptr, const Tensor& col_idx, int64_t in_features) {
  const int64_t rows = row_ptr.numel() - 1;
  const Tensor counts = (row_ptr.narrow(0, 1, rows) - row_ptr.narrow(0, 0, rows)).to(at::kLong);
  Tensor cols = col_idx.to(at::kLong);
  if (col_idx.scalar_type() == at::kShort) {
    cols = cols.bitwise_and(kMaxShortColumns - 1);  // the int16 holds an unsigned 16-bit column
  }
  return at::repeat_interleave(counts) * in_features + cols;
}

// The dense [rows, in_features] weight as a differentiable function of `values`.
Tensor dense_weight(const Tensor& row_ptr, const Tensor& flat, const Tensor& values,
                    int64_t in_features) {
  const int64_t rows = row_ptr.numel() - 1;
  return at::zeros({rows * in_features}, values.options())
      .index_put({flat}, values)
      .view({rows, in_features});
}

class SparseLinear : public torch::autograd::Function<SparseLinear> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& row_ptr,
                        const Tensor& col_idx, const Tensor& values, int64_t in_features,
                        const Tensor& bias, bool has_bias) {
    ctx->save_for_backward({x, row_ptr, col_idx, values});
    ctx->saved_data["in_features"] = in_features;
    ctx->saved_data["has_bias"] = has_bias;
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return sparse_linear_op().call(x, row_ptr, col_idx, values, in_features,
                                   as_optional(bias, has_bias));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &row_ptr = saved[1], &col_idx = saved[2], &values = saved[3];
    const Tensor& grad = grad_outputs[0];
    const int64_t k = ctx->saved_data["in_features"].toInt();
    const bool need_x = ctx->needs_input_grad(0), need_values = ctx->needs_input_grad(3);
    const bool need_bias = ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(4);  // edges count tensor arguments only
    if (building_graph()) {
      const Tensor flat = flat_positions(row_ptr, col_idx, k);
      const int64_t m = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
      const Tensor grad2 = grad.reshape({m, row_ptr.numel() - 1});
      return {need_x ? at::matmul(grad, dense_weight(row_ptr, flat, values, k)) : Tensor(),
              Tensor(),
              Tensor(),
              need_values ? at::mm(grad2.t(), x.reshape({m, k})).view(-1).index({flat})
                          : Tensor(),
              Tensor(),
              need_bias ? grad2.sum(0) : Tensor(),
              Tensor()};
    }
    auto [grad_x, grad_values, grad_bias] = sparse_linear_backward_op().call(
        grad, x, row_ptr, col_idx, values, k, {need_x, need_values, need_bias});
    return {if_needed(need_x, grad_x), Tensor(), Tensor(), if_needed(need_values, grad_values),
            Tensor(), if_needed(need_bias, grad_bias), Tensor()};
  }
};

class SparseConv2d : public torch::autograd::Function<SparseConv2d> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& row_ptr,
                        const Tensor& col_idx, const Tensor& values, at::IntArrayRef kernel_size,
                        const Tensor& bias, bool has_bias, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation) {
    ctx->save_for_backward({x, row_ptr, col_idx, values});
    ctx->saved_data["kernel_size"] = kernel_size;
    ctx->saved_data["has_bias"] = has_bias;
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["dilation"] = dilation;
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return sparse_conv2d_op().call(x, row_ptr, col_idx, values, kernel_size,
                                   as_optional(bias, has_bias), stride, padding, dilation);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &row_ptr = saved[1], &col_idx = saved[2], &values = saved[3];
    const Tensor& grad = grad_outputs[0];
    const auto kernel_size = ctx->saved_data["kernel_size"].toIntVector();
    const auto stride = ctx->saved_data["stride"].toIntVector();
    const auto padding = ctx->saved_data["padding"].toIntVector();
    const auto dilation = ctx->saved_data["dilation"].toIntVector();
    const bool need_x = ctx->needs_input_grad(0), need_values = ctx->needs_input_grad(3);
    const bool need_bias = ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(4);  // edges count tensor arguments only
    Tensor grad_x, grad_values, grad_bias;
    if (building_graph()) {
      const int64_t k = x.size(1) * kernel_size[0] * kernel_size[1];
      const Tensor flat = flat_positions(row_ptr, col_idx, k);
      const Tensor weight = dense_weight(row_ptr, flat, values, k)
                                .view({row_ptr.numel() - 1, x.size(1), kernel_size[0],
                                       kernel_size[1]});
      const std::vector<int64_t> bias_shape = {weight.size(0)};
      Tensor grad_weight;
      std::tie(grad_x, grad_weight, grad_bias) = at::convolution_backward(
          grad, x, weight,
          need_bias ? at::OptionalIntArrayRef(bias_shape) : at::OptionalIntArrayRef(), stride,
          padding, dilation, /*transposed=*/false, /*output_padding=*/{0, 0}, /*groups=*/1,
          {need_x, need_values, need_bias});
      if (need_values) {
        grad_values = grad_weight.reshape(-1).index({flat});
      }
    } else {
      std::tie(grad_x, grad_values, grad_bias) = sparse_conv2d_backward_op().call(
          grad, x, row_ptr, col_idx, values, kernel_size, stride, padding, dilation,
          {need_x, need_values, need_bias});
    }
    return {if_needed(need_x, grad_x), Tensor(), Tensor(), if_needed(need_values, grad_values),
            Tensor(), if_needed(need_bias, grad_bias), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor sparse_linear_autograd(const Tensor& x, const Tensor& row_ptr, const Tensor& col_idx,
                              const Tensor& values, int64_t in_features,
                              const std::optional<Tensor>& bias) {
  return SparseLinear::apply(x, row_ptr, col_idx, values, in_features,
                             bias_or_placeholder(bias, values), bias.has_value());
}

Tensor sparse_conv2d_autograd(const Tensor& x, const Tensor& row_ptr, const Tensor& col_idx,
                              const Tensor& values, at::IntArrayRef kernel_size,
                              const std::optional<Tensor>& bias, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation) {
  return SparseConv2d::apply(x, row_ptr, col_idx, values, kernel_size,
                             bias_or_placeholder(bias, values), bias.has_value(), stride, padding,
                             dilation);
}

}  // namespace
}  // namespace torchprune

TORCH_LIBRARY_IMPL(torchprune, Autograd, m) {
  m.impl("sparse_linear", &torchprune::sparse_linear_autograd);
  m.impl("sparse_conv2d", &torchprune::sparse_conv2d_autograd);
}
