// CUDA implementations of the masked ops and of `compact` (CUDA builds only; setup.py compiles
// csrc/cuda/*.cpp only when it builds the CUDA extension).
//
// Same contract and messages as the CPU kernels (csrc/cpu/masked_ops.cpp, csrc/cpu/compact.cpp).
// Our own kernels do the masking and the compaction (masked.cu, compact.cu); the dense products go
// through ATen: at::linear / at::mm (cuBLAS), at::convolution / at::convolution_backward (cuDNN).
// Only c10/cuda headers are used here, not ATen/cuda ones, which pull in cuBLAS / cuSPARSE headers.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "common/masked_checks.h"
#include "common/masked_dense.h"
#include "common/op_helpers.h"
#include "cuda/compact_kernels.h"
#include "cuda/masked_kernels.h"

namespace torchprune {
namespace {

using at::Tensor;

cudaStream_t current_stream(const Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

// where(mask, src, 0) into `out` (contiguous, same numel; `out` may be `src`). The kernel works on
// the bits, so it needs only the element size: float, double, half and bfloat16 alike.
void apply_mask(const Tensor& src, const Tensor& mask, Tensor& out) {
  TORCH_INTERNAL_ASSERT(src.is_contiguous() && mask.is_contiguous() && out.is_contiguous());
  // check_floating also lets the 1-byte float8 dtypes through; the CPU op rejects them in its
  // dtype dispatch, and so must this one (launch_mask would report a bare "CUDA error: invalid
  // argument" for them). Same message as the CPU's AT_DISPATCH.
  const at::ScalarType dtype = src.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              "\"apply_mask\" not implemented for '", c10::toString(dtype), "'");
  C10_CUDA_CHECK(cuda::launch_mask(src.const_data_ptr(),
                                   reinterpret_cast<const uint8_t*>(mask.const_data_ptr()),
                                   out.mutable_data_ptr(), src.numel(),
                                   static_cast<int>(src.element_size()), current_stream(src)));
}

// ---------------------------------------------------------------------------------------------
// masked_linear

Tensor masked_linear_cuda(const Tensor& x, const Tensor& weight, const Tensor& mask,
                          const std::optional<Tensor>& bias) {
  const char* op = "masked_linear";
  check_masked_linear(op, x, weight, mask);
  if (bias.has_value()) {
    check_bias(op, *bias, weight);
  }
  const c10::cuda::CUDAGuard guard(weight.device());
  return at::linear(x, masked_weight(weight, mask, apply_mask), bias);
}

std::tuple<Tensor, Tensor, Tensor> masked_linear_backward_cuda(
    const Tensor& grad_out, const Tensor& x, const Tensor& weight, const Tensor& mask,
    std::array<bool, 3> output_mask) {
  const char* op = "masked_linear_backward";
  check_masked_linear(op, x, weight, mask);
  check_grad_out(op, grad_out, masked_linear_out_sizes(x, weight), weight);
  const c10::cuda::CUDAGuard guard(weight.device());

  const int64_t rows = batch_rows(x);
  const Tensor g2 = grad_out.reshape({rows, weight.size(0)});
  Tensor grad_x, grad_weight, grad_bias;
  if (output_mask[0]) {
    grad_x = at::mm(g2, masked_weight(weight, mask, apply_mask)).view(x.sizes());
  }
  if (output_mask[1]) {
    grad_weight = mask_grad_weight(at::mm(g2.t(), x.reshape({rows, weight.size(1)})), mask,
                                   apply_mask);
  }
  if (output_mask[2]) {
    grad_bias = g2.sum(0);
  }
  return {or_empty(grad_x, x), or_empty(grad_weight, x), or_empty(grad_bias, x)};
}

// ---------------------------------------------------------------------------------------------
// masked_conv2d

Tensor masked_conv2d_cuda(const Tensor& x, const Tensor& weight, const Tensor& mask,
                          const std::optional<Tensor>& bias, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const char* op = "masked_conv2d";
  check_masked_conv2d(op, x, weight, mask, stride, padding, dilation, groups);
  if (bias.has_value()) {
    check_bias(op, *bias, weight);
  }
  const c10::cuda::CUDAGuard guard(weight.device());
  return masked_conv2d_dense(x, weight, mask, bias, stride, padding, dilation, groups,
                             apply_mask);
}

std::tuple<Tensor, Tensor, Tensor> masked_conv2d_backward_cuda(
    const Tensor& grad_out, const Tensor& x, const Tensor& weight, const Tensor& mask,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask) {
  const char* op = "masked_conv2d_backward";
  check_masked_conv2d(op, x, weight, mask, stride, padding, dilation, groups);
  check_grad_out(op, grad_out, masked_conv2d_out_sizes(x, weight, stride, padding, dilation),
                 weight);
  const c10::cuda::CUDAGuard guard(weight.device());
  const auto [grad_x, grad_weight, grad_bias] = masked_conv2d_backward_dense(
      grad_out, x, weight, mask, stride, padding, dilation, groups, output_mask, apply_mask);
  return {or_empty(grad_x, x), or_empty(grad_weight, x), or_empty(grad_bias, x)};
}

// ---------------------------------------------------------------------------------------------
// compact

constexpr const char* kCompact = "compact";

// The indices as a contiguous CPU tensor, checked. Indices may be on the CPU (as the CPU op takes
// them) or on the tensors' GPU; GPU indices are copied to the host for the bounds check (a sync
// per tensor: compaction runs once per pruning step, not per batch).
Tensor checked_host_indices(int64_t i, const Tensor& index, int64_t size, const at::Device& device) {
  TORCH_CHECK(index.dim() == 1, kCompact, ": `indices[", i, "]` must be 1-D, got a ", index.dim(),
              "-D tensor of shape ", shape_str(index.sizes()));
  TORCH_CHECK(index.scalar_type() == at::kLong, kCompact, ": `indices[", i,
              "]` must have dtype torch.int64, got ", dtype_str(index.scalar_type()));
  TORCH_CHECK(index.device().is_cpu() || index.device() == device, kCompact, ": `indices[", i,
              "]` must be on the CPU or on ", device, " (the device of `tensors[0]`), got ",
              index.device());
  const Tensor host = index.to(at::kCPU).contiguous();
  const int64_t* idx = host.const_data_ptr<int64_t>();
  for (int64_t k = 0; k < host.numel(); ++k) {
    TORCH_CHECK(idx[k] >= 0 && idx[k] < size, kCompact, ": `indices[", i, "]` must lie in [0, ",
                size, "), got ", idx[k], " at position ", k);
  }
  return host;
}

int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

std::vector<Tensor> compact_cuda(at::TensorList tensors, at::IntArrayRef dims,
                                 at::TensorList indices) {
  TORCH_CHECK(dims.size() == tensors.size() && indices.size() == tensors.size(), kCompact,
              ": `tensors`, `dims` and `indices` must have the same length, got ", tensors.size(),
              ", ", dims.size(), " and ", indices.size());
  if (tensors.empty()) {
    return {};
  }
  const at::Device device = tensors[0].device();
  if (!device.is_cuda()) {  // CPU tensors reach this kernel only when an index is on a GPU
    for (size_t i = 0; i < indices.size(); ++i) {
      TORCH_CHECK(!indices[i].device().is_cuda(), kCompact, ": `indices[", i,
                  "]` must be on the CPU when `tensors[0]` is, got ", indices[i].device());
    }
    TORCH_CHECK(false, kCompact, ": `tensors` must all be on one device, got `tensors[0]` on ",
                device, " and a tensor on a CUDA device");
  }
  const c10::cuda::CUDAGuard guard(device);

  // Check everything before allocating anything.
  const int64_t n = static_cast<int64_t>(tensors.size());
  std::vector<int64_t> wrapped(n);
  std::vector<Tensor> host_indices(n);
  for (int64_t i = 0; i < n; ++i) {
    const Tensor& t = tensors[i];
    TORCH_CHECK(t.device() == device, kCompact, ": `tensors[", i,
                "]` must be on the same device as `tensors[0]` (", device, "), got ", t.device());
    TORCH_CHECK(t.dim() >= 1, kCompact, ": `tensors[", i,
                "]` must have at least 1 dimension, got a 0-D tensor");
    TORCH_CHECK(dims[i] >= -t.dim() && dims[i] < t.dim(), kCompact, ": `dims[", i,
                "]` must be in [", -t.dim(), ", ", t.dim() - 1, "] for a tensor of shape ",
                shape_str(t.sizes()), ", got ", dims[i]);
    wrapped[i] = dims[i] < 0 ? dims[i] + t.dim() : dims[i];
    host_indices[i] = checked_host_indices(i, indices[i], t.size(wrapped[i]), device);
  }

  // Outputs, contiguous inputs (kept alive until the launch is queued; the caching allocator
  // reuses their memory only in stream order) and the table rows of the non-empty outputs.
  std::vector<Tensor> out(n), inputs(n);
  std::vector<cuda::CompactEntry> entries;
  std::vector<int64_t> entry_tensor;
  int64_t index_count = 0;
  for (int64_t i = 0; i < n; ++i) {
    inputs[i] = tensors[i].contiguous();
    std::vector<int64_t> sizes = inputs[i].sizes().vec();
    const int64_t size = sizes[wrapped[i]];
    sizes[wrapped[i]] = host_indices[i].numel();
    out[i] = at::empty(sizes, inputs[i].options().memory_format(at::MemoryFormat::Contiguous));
    if (out[i].numel() == 0) {
      continue;
    }
    cuda::CompactEntry e{};
    e.src = inputs[i].const_data_ptr();
    e.dst = out[i].mutable_data_ptr();
    e.outer = 1;
    for (int64_t d = 0; d < wrapped[i]; ++d) e.outer *= sizes[d];
    int64_t inner = 1;
    for (int64_t d = wrapped[i] + 1; d < static_cast<int64_t>(sizes.size()); ++d) inner *= sizes[d];
    e.size = size;
    e.kept = host_indices[i].numel();
    e.row_bytes = inner * static_cast<int64_t>(inputs[i].element_size());
    entries.push_back(e);
    entry_tensor.push_back(i);
    index_count += e.kept;
  }
  if (entries.empty()) {
    return out;
  }
  const int64_t count = static_cast<int64_t>(entries.size());
  const int64_t blocks = cuda::compact_plan(entries.data(), count);

  // One upload: [table | indices of every entry], staged in pinned memory and copied on the
  // current stream (the pinned buffer is recycled only after that copy has run).
  const int64_t table_bytes = round_up(count * static_cast<int64_t>(sizeof(cuda::CompactEntry)), 16);
  const int64_t total_bytes = table_bytes + index_count * static_cast<int64_t>(sizeof(int64_t));
  Tensor staged = at::empty({total_bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  Tensor device_buffer = at::empty({total_bytes}, at::TensorOptions().dtype(at::kByte).device(device));
  char* host = static_cast<char*>(staged.mutable_data_ptr());
  const char* device_base = static_cast<const char*>(device_buffer.const_data_ptr());
  int64_t offset = table_bytes;
  for (int64_t j = 0; j < count; ++j) {
    const Tensor& idx = host_indices[entry_tensor[j]];
    const int64_t bytes = idx.numel() * static_cast<int64_t>(sizeof(int64_t));
    std::memcpy(host + offset, idx.const_data_ptr<int64_t>(), bytes);
    entries[j].index = reinterpret_cast<const int64_t*>(device_base + offset);
    offset += bytes;
  }
  std::memcpy(host, entries.data(), count * sizeof(cuda::CompactEntry));
  device_buffer.copy_(staged, /*non_blocking=*/true);

  C10_CUDA_CHECK(cuda::launch_compact(
      reinterpret_cast<const cuda::CompactEntry*>(device_buffer.const_data_ptr()), count, blocks,
      c10::cuda::getCurrentCUDAStream(device.index()).stream()));
  return out;
}

}  // namespace
}  // namespace torchprune

TORCH_LIBRARY_IMPL(torchprune, CUDA, m) {
  m.impl("masked_linear", &torchprune::masked_linear_cuda);
  m.impl("masked_linear_backward", &torchprune::masked_linear_backward_cuda);
  m.impl("masked_conv2d", &torchprune::masked_conv2d_cuda);
  m.impl("masked_conv2d_backward", &torchprune::masked_conv2d_backward_cuda);
  m.impl("compact", &torchprune::compact_cuda);
}
