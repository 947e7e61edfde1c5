// Typed handles to torchprune's ops, for kernels that call an op again through the dispatcher
// (autograd, autocast): one lookup per process, one signature per op, in one place.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <array>
#include <optional>
#include <tuple>

namespace torchprune {

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using MaskedLinearSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const std::optional<at::Tensor>&);
using MaskedLinearBackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    std::array<bool, 3>);
using MaskedConv2dSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const std::optional<at::Tensor>&, at::IntArrayRef,
                                   at::IntArrayRef, at::IntArrayRef, int64_t);
using MaskedConv2dBackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, at::IntArrayRef,
    at::IntArrayRef, at::IntArrayRef, int64_t, std::array<bool, 3>);

inline const c10::TypedOperatorHandle<MaskedLinearSig>& masked_linear_op() {
  static const auto op = find_op<MaskedLinearSig>("torchprune::masked_linear");
  return op;
}

inline const c10::TypedOperatorHandle<MaskedLinearBackwardSig>& masked_linear_backward_op() {
  static const auto op = find_op<MaskedLinearBackwardSig>("torchprune::masked_linear_backward");
  return op;
}

inline const c10::TypedOperatorHandle<MaskedConv2dSig>& masked_conv2d_op() {
  static const auto op = find_op<MaskedConv2dSig>("torchprune::masked_conv2d");
  return op;
}

inline const c10::TypedOperatorHandle<MaskedConv2dBackwardSig>& masked_conv2d_backward_op() {
  static const auto op = find_op<MaskedConv2dBackwardSig>("torchprune::masked_conv2d_backward");
  return op;
}

using SparseLinearSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, int64_t, const std::optional<at::Tensor>&);
using SparseLinearBackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    int64_t, std::array<bool, 3>);
using SparseConv2dSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, at::IntArrayRef,
                                   const std::optional<at::Tensor>&, at::IntArrayRef,
                                   at::IntArrayRef, at::IntArrayRef);
using SparseConv2dBackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, std::array<bool, 3>);

inline const c10::TypedOperatorHandle<SparseLinearSig>& sparse_linear_op() {
  static const auto op = find_op<SparseLinearSig>("torchprune::sparse_linear");
  return op;
}

// block_sparse_linear has sparse_linear's signature (values is [blocks, R] instead of [nnz]).
inline const c10::TypedOperatorHandle<SparseLinearSig>& block_sparse_linear_op() {
  static const auto op = find_op<SparseLinearSig>("torchprune::block_sparse_linear");
  return op;
}

using NmSparseLinearSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     int64_t, const std::optional<at::Tensor>&);

inline const c10::TypedOperatorHandle<NmSparseLinearSig>& nm_sparse_linear_op() {
  static const auto op = find_op<NmSparseLinearSig>("torchprune::nm_sparse_linear");
  return op;
}

inline const c10::TypedOperatorHandle<SparseLinearBackwardSig>& sparse_linear_backward_op() {
  static const auto op = find_op<SparseLinearBackwardSig>("torchprune::sparse_linear_backward");
  return op;
}

inline const c10::TypedOperatorHandle<SparseConv2dSig>& sparse_conv2d_op() {
  static const auto op = find_op<SparseConv2dSig>("torchprune::sparse_conv2d");
  return op;
}

inline const c10::TypedOperatorHandle<SparseConv2dBackwardSig>& sparse_conv2d_backward_op() {
  static const auto op = find_op<SparseConv2dBackwardSig>("torchprune::sparse_conv2d_backward");
  return op;
}

}  // namespace torchprune
