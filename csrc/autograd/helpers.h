// Small pieces shared by the C++ autograd Functions of csrc/autograd/.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace torchprune {
namespace autograd_helpers {

// The bias travels through autograd as a plain Tensor with a has_bias flag: autograd tracks
// Tensor arguments, not optional ones, and wants every Tensor argument defined, so an absent
// bias is an empty placeholder that is never used.
inline at::Tensor bias_or_placeholder(const std::optional<at::Tensor>& bias,
                                      const at::Tensor& like) {
  return bias.has_value() ? *bias : at::empty({0}, like.options());
}

inline std::optional<at::Tensor> as_optional(const at::Tensor& bias, bool has_bias) {
  return has_bias ? std::optional<at::Tensor>(bias) : std::nullopt;
}

// The backward ops return empty [0] tensors for what was not asked; autograd wants undefined.
inline at::Tensor if_needed(bool needed, const at::Tensor& grad) {
  return needed ? grad : at::Tensor();
}

// Grad mode is on inside a backward only when it builds a graph (create_graph=True: gradient
// penalties, Hessian-vector products). The backward ops have no derivatives of their own, so
// then the same gradients are computed with differentiable ATen ops instead.
inline bool building_graph() { return at::GradMode::is_enabled(); }

}  // namespace autograd_helpers
}  // namespace torchprune
