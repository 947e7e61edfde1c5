// Autocast for the masked ops: inside torch.autocast a masked layer computes in the autocast
// dtype, as nn.Linear / nn.Conv2d do, so pruned and unpruned layers mix in one autocast model.
//
// The floating arguments are cast with autocast's own cached_cast (which caches the casts of
// leaf weights for the autocast region and leaves the gradient path intact); the bool mask is
// left as it is. Then the op is called again with the autocast key excluded.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <optional>

#include "common/op_handles.h"

namespace torchprune {
namespace {

using at::Tensor;

template <c10::DeviceType device, c10::DispatchKey autocast_key>
struct Autocast {
  static Tensor cast(const Tensor& t) {
    return at::autocast::cached_cast(at::autocast::get_autocast_dtype(device), t, device);
  }

  static std::optional<Tensor> cast(const std::optional<Tensor>& t) {
    return t.has_value() ? std::optional<Tensor>(cast(*t)) : std::nullopt;
  }

  static Tensor masked_linear(const Tensor& x, const Tensor& weight, const Tensor& mask,
                              const std::optional<Tensor>& bias) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key);
    return masked_linear_op().call(cast(x), cast(weight), mask, cast(bias));
  }

  static Tensor masked_conv2d(const Tensor& x, const Tensor& weight, const Tensor& mask,
                              const std::optional<Tensor>& bias, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key);
    return masked_conv2d_op().call(cast(x), cast(weight), mask, cast(bias), stride, padding,
                                   dilation, groups);
  }
};

using AutocastCPU = Autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>;
using AutocastCUDA = Autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>;

}  // namespace
}  // namespace torchprune

TORCH_LIBRARY_IMPL(torchprune, AutocastCPU, m) {
  m.impl("masked_linear", &torchprune::AutocastCPU::masked_linear);
  m.impl("masked_conv2d", &torchprune::AutocastCPU::masked_conv2d);
}

// Registered in every build: in a CPU build no CUDA tensor reaches it.
TORCH_LIBRARY_IMPL(torchprune, AutocastCUDA, m) {
  m.impl("masked_linear", &torchprune::AutocastCUDA::masked_linear);
  m.impl("masked_conv2d", &torchprune::AutocastCUDA::masked_conv2d);
}
