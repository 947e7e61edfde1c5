// Argument checks shared by the kernels.
//
// Every failure reads "<op>: `<arg>` must <what is allowed>, got <what came in>", for example
//   masked_linear: `mask` must have the same shape as `weight` [8, 4], got [4, 8]
// Checks run once at the op boundary; the kernels behind them trust their inputs.
#pragma once

#include <ATen/ATen.h>

#include <sstream>
#include <string>

namespace torchprune {

// "[8, 4]" -- shapes are printed the way Python users see them.
inline std::string shape_str(at::IntArrayRef sizes) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < sizes.size(); ++i) {
    out << (i ? ", " : "") << sizes[i];
  }
  out << "]";
  return out.str();
}

// "torch.float32"
inline std::string dtype_str(at::ScalarType dtype) {
  return "torch." + std::string(c10::getDtypeNames(dtype).first);
}

inline void check_dim(const char* op, const char* arg, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, op, ": `", arg, "` must be ", dim, "-D, got a ", t.dim(),
              "-D tensor of shape ", shape_str(t.sizes()));
}

inline void check_dtype(const char* op, const char* arg, const at::Tensor& t,
                        at::ScalarType dtype) {
  TORCH_CHECK(t.scalar_type() == dtype, op, ": `", arg, "` must have dtype ", dtype_str(dtype),
              ", got ", dtype_str(t.scalar_type()));
}

inline void check_floating(const char* op, const char* arg, const at::Tensor& t) {
  const at::ScalarType type = t.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kDouble || type == at::kHalf ||
                  type == at::kBFloat16,
              op, ": `", arg,
              "` must be a floating point tensor (float32, float64, float16 or bfloat16), got ",
              dtype_str(t.scalar_type()));
}

// `arg` must share dtype and device with the reference argument `ref_arg`.
inline void check_like(const char* op, const char* arg, const at::Tensor& t, const char* ref_arg,
                       const at::Tensor& ref) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": `", arg,
              "` must have the same dtype as `", ref_arg, "` (", dtype_str(ref.scalar_type()),
              "), got ", dtype_str(t.scalar_type()));
  TORCH_CHECK(t.device() == ref.device(), op, ": `", arg, "` must be on the same device as `",
              ref_arg, "` (", ref.device(), "), got ", t.device());
}

// A mask is a bool tensor with exactly the weight's shape, on the weight's device.
inline void check_mask(const char* op, const at::Tensor& mask, const at::Tensor& weight) {
  TORCH_CHECK(mask.scalar_type() == at::kBool, op,
              ": `mask` must be a bool tensor (torch.bool) with the shape of `weight`, got ",
              dtype_str(mask.scalar_type()));
  TORCH_CHECK(mask.sizes() == weight.sizes(), op, ": `mask` must have the same shape as `weight` ",
              shape_str(weight.sizes()), ", got ", shape_str(mask.sizes()));
  TORCH_CHECK(mask.device() == weight.device(), op, ": `mask` must be on the same device as ",
              "`weight` (", weight.device(), "), got ", mask.device());
}

// A bias is 1-D with one entry per output feature / channel, dtype and device of `weight`.
inline void check_bias(const char* op, const at::Tensor& bias, const at::Tensor& weight) {
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == weight.size(0), op,
              ": `bias` must have shape [", weight.size(0), "] (weight.size(0)), got ",
              shape_str(bias.sizes()));
  check_like(op, "bias", bias, "weight", weight);
}

// An int[2] argument (stride, padding, dilation) with every entry >= `min_value`.
inline void check_pair(const char* op, const char* arg, at::IntArrayRef values,
                       int64_t min_value) {
  TORCH_CHECK(values.size() == 2 && values[0] >= min_value && values[1] >= min_value, op, ": `",
              arg, "` must be 2 integers >= ", min_value, ", got ", shape_str(values));
}

}  // namespace torchprune
