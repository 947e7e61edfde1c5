// Small device-independent pieces that the CPU and CUDA kernels of several ops share.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace torchprune {

// Rows of x once its leading dims are flattened: x is used as a [rows, x.size(-1)] matrix
// (explicit: reshape(-1, 0) would be ambiguous when a dim is 0).
inline int64_t batch_rows(const at::Tensor& x) {
  return c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
}

// fp16 and bf16: the sparse CPU kernels compute these in float32 and round once at the end.
inline bool is_half(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

// A sparse forward for half-precision x: fn(x, values, bias) on their float32 copies, the result
// rounded back to x's dtype once.
template <typename Fn>
at::Tensor forward_in_float32(const at::Tensor& x, const at::Tensor& values,
                              const std::optional<at::Tensor>& bias, Fn&& fn) {
  const auto bias32 = bias.has_value() ? std::optional<at::Tensor>(bias->to(at::kFloat))
                                       : std::nullopt;
  return fn(x.to(at::kFloat), values.to(at::kFloat), bias32).to(x.scalar_type());
}

// Outputs the caller did not ask for (output_mask false) come back as empty [0] tensors.
inline at::Tensor or_empty(const at::Tensor& t, const at::Tensor& like) {
  return t.defined() ? t : at::empty({0}, like.options());
}

}  // namespace torchprune
