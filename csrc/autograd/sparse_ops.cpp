// Autograd of the sparse ops (sparse_linear, sparse_conv2d, block_sparse_linear,
// nm_sparse_linear), in C++ like
// the masked ops.
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
#include <tuple>
#include <vector>

#include "autograd/helpers.h"
#include "common/csr.h"
#include "common/nm.h"
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

// The gradients (x, CSR values, bias) of y = x @ W^T + bias with W the CSR (row_ptr, cols,
// csr_values) over in_features k: the block and N:8 backwards go through the equivalent CSR.
// Under create_graph, differentiable ATen ops on the unpacked weight, as SparseLinear does.
std::tuple<Tensor, Tensor, Tensor> csr_gradients(const Tensor& grad, const Tensor& x,
                                                 const Tensor& row_ptr, const Tensor& cols,
                                                 const Tensor& csr_values, int64_t k,
                                                 std::array<bool, 3> needs) {
  const auto [need_x, need_values, need_bias] = needs;
  if (!building_graph()) {
    return sparse_linear_backward_op().call(grad, x, row_ptr, cols, csr_values, k, needs);
  }
  Tensor grad_x, grad_csr, grad_bias;
  const Tensor flat = flat_positions(row_ptr, cols, k);
  const int64_t m = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  const Tensor grad2 = grad.reshape({m, row_ptr.numel() - 1});
  if (need_x) grad_x = at::matmul(grad, dense_weight(row_ptr, flat, csr_values, k));
  if (need_values) grad_csr = at::mm(grad2.t(), x.reshape({m, k})).view(-1).index({flat});
  if (need_bias) grad_bias = grad2.sum(0);
  return {grad_x, grad_csr, grad_bias};
}

// The CSR form of an R x 1 block-sparse weight (common/bsr.h): its row_ptr and col_idx, and
// `position`, the place in the CSR's values of each entry of values.view(-1) (entry i of block e
// in block row b goes to output row b*R + i, whose entries start at block_ptr[b]*R + i*count(b)).
// Every size follows from the shapes alone (no data-dependent sizes), so the backward traces
// under fake tensors (torch.compile, opcheck). O(blocks * R), once per backward.
std::tuple<Tensor, Tensor, Tensor> csr_of_bsr(const Tensor& block_ptr, const Tensor& col_idx,
                                              const Tensor& values) {
  const c10::SymInt block_rows = block_ptr.sym_numel() - 1, r = values.sym_size(1);
  const Tensor ptr = block_ptr.to(at::kLong);
  const Tensor counts = ptr.narrow_symint(0, 1, block_rows) - ptr.narrow_symint(0, 0, block_rows);
  const Tensor row_ptr = at::cat(
      {at::zeros({1}, ptr.options()), at::repeat_interleave_symint(counts, r).cumsum(0)});
  const Tensor block = at::arange(values.sym_size(0), ptr.options());  // [blocks]
  const Tensor row_of_block =
      at::searchsorted(ptr.narrow_symint(0, 1, block_rows), block, false, /*right=*/true);
  const Tensor start = ptr.index_select(0, row_of_block);
  const Tensor count = counts.index_select(0, row_of_block);
  const Tensor lane = at::arange(r, ptr.options());  // i
  const Tensor position = (start * r + (block - start)).unsqueeze(1) + lane * count.unsqueeze(1);
  const Tensor block_cols = col_idx.unsqueeze(1).expand_as(position).reshape(-1);
  const Tensor cols = at::zeros_like(block_cols).index_put({position.reshape(-1)}, block_cols);
  return {row_ptr.to(at::kInt), cols, position.reshape(-1)};
}

class BlockSparseLinear : public torch::autograd::Function<BlockSparseLinear> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& block_ptr,
                        const Tensor& col_idx, const Tensor& values, int64_t in_features,
                        const Tensor& bias, bool has_bias) {
    ctx->save_for_backward({x, block_ptr, col_idx, values});
    ctx->saved_data["in_features"] = in_features;
    ctx->saved_data["has_bias"] = has_bias;
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return block_sparse_linear_op().call(x, block_ptr, col_idx, values, in_features,
                                         as_optional(bias, has_bias));
  }

  // The gradients of the equivalent CSR weight, with the value gradient put back in block order.
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &block_ptr = saved[1], &col_idx = saved[2], &values = saved[3];
    const Tensor& grad = grad_outputs[0];
    const int64_t k = ctx->saved_data["in_features"].toInt();
    const bool need_x = ctx->needs_input_grad(0), need_values = ctx->needs_input_grad(3);
    const bool need_bias = ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(4);
    const auto [row_ptr, cols, position] = csr_of_bsr(block_ptr, col_idx, values);
    const Tensor csr_values =  // differentiable: index_put's derivative gathers back
        at::zeros_symint({values.sym_numel()}, values.options())
            .index_put({position}, values.reshape(-1));
    const auto [grad_x, grad_csr, grad_bias] =
        csr_gradients(grad, x, row_ptr, cols, csr_values, k, {need_x, need_values, need_bias});
    Tensor grad_values;
    if (need_values) {  // back to block order: each entry's gradient from its CSR position
      grad_values = grad_csr.index_select(0, position).view(values.sizes());
    }
    return {if_needed(need_x, grad_x), Tensor(), Tensor(), if_needed(need_values, grad_values),
            Tensor(), if_needed(need_bias, grad_bias), Tensor()};
  }
};

// The CSR form of an N:8 weight (common/nm.h): row_ptr (every row holds `slots` entries) and the
// column of every slot, decoded from the 3-bit positions; the CSR's values are values.view(-1)
// in the same order (positions ascend within a window). Sizes follow from the shapes alone.
std::tuple<Tensor, Tensor> csr_of_nm(const Tensor& codes, const Tensor& values, int64_t k) {
  const int64_t rows = values.size(0), slots = values.size(1), n = k > 0 ? slots * 8 / k : 1;
  const auto opts = codes.options().dtype(at::kLong);
  const Tensor shifts = at::arange(8, opts) * kNmPositionBits;
  const Tensor shifted = at::bitwise_right_shift(codes.to(at::kLong).unsqueeze(-1), shifts);
  const Tensor positions =  // explicit sizes: reshape(rows, -1) is ambiguous without rows
      at::bitwise_and(shifted, 7).reshape({rows, codes.size(1) * 8}).narrow(1, 0, slots);
  const Tensor window = at::floor_divide(at::arange(slots, opts), n) * kNmWindow;
  Tensor cols = (positions + window).reshape(-1);
  if (column_dtype(k) == at::kShort) {  // the int16 holds an unsigned 16-bit column (csr.h)
    cols = at::where(cols >= 32768, cols - 65536, cols);
  }
  const Tensor row_ptr = (at::arange(rows + 1, opts) * slots).to(at::kInt);
  return {row_ptr, cols.to(column_dtype(k))};
}

class NmSparseLinear : public torch::autograd::Function<NmSparseLinear> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& codes,
                        const Tensor& values, int64_t in_features, const Tensor& bias,
                        bool has_bias) {
    ctx->save_for_backward({x, codes, values});
    ctx->saved_data["in_features"] = in_features;
    ctx->saved_data["has_bias"] = has_bias;
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return nm_sparse_linear_op().call(x, codes, values, in_features, as_optional(bias, has_bias));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &codes = saved[1], &values = saved[2];
    const int64_t k = ctx->saved_data["in_features"].toInt();
    const bool need_x = ctx->needs_input_grad(0), need_values = ctx->needs_input_grad(2);
    const bool need_bias = ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(3);  // edges count tensor arguments only
    const auto [row_ptr, cols] = csr_of_nm(codes, values, k);
    const auto [grad_x, grad_csr, grad_bias] = csr_gradients(
        grad_outputs[0], x, row_ptr, cols, values.reshape(-1), k, {need_x, need_values, need_bias});
    return {if_needed(need_x, grad_x), Tensor(),
            if_needed(need_values, need_values ? grad_csr.view(values.sizes()) : Tensor()),
            Tensor(), if_needed(need_bias, grad_bias), Tensor()};
  }
};

Tensor sparse_linear_autograd(const Tensor& x, const Tensor& row_ptr, const Tensor& col_idx,
                              const Tensor& values, int64_t in_features,
                              const std::optional<Tensor>& bias) {
  return SparseLinear::apply(x, row_ptr, col_idx, values, in_features,
                             bias_or_placeholder(bias, values), bias.has_value());
}

Tensor block_sparse_linear_autograd(const Tensor& x, const Tensor& block_ptr,
                                    const Tensor& col_idx, const Tensor& values,
                                    int64_t in_features, const std::optional<Tensor>& bias) {
  return BlockSparseLinear::apply(x, block_ptr, col_idx, values, in_features,
                                  bias_or_placeholder(bias, values), bias.has_value());
}

Tensor nm_sparse_linear_autograd(const Tensor& x, const Tensor& codes, const Tensor& values,
                                 int64_t in_features, const std::optional<Tensor>& bias) {
  return NmSparseLinear::apply(x, codes, values, in_features, bias_or_placeholder(bias, values),
                               bias.has_value());
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
  m.impl("block_sparse_linear", &torchprune::block_sparse_linear_autograd);
  m.impl("nm_sparse_linear", &torchprune::nm_sparse_linear_autograd);
}
