// CUDA implementations of the masked ops and of `compact` (CUDA builds only; setup.py compiles
// csrc/cuda/*.cpp only when it builds the CUDA extension).
//
// Same contract and messages as the CPU kernels (csrc/cpu/masked_ops.cpp, csrc/cpu/compact.cpp),
// whose argument checks they share (common/masked_checks.h, common/compact_checks.h).
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
#include "common/compact_checks.h"
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

// The checked arguments of one call.
struct CompactArgs {
  std::vector<int64_t> dims;         // every dim wrapped into [0, tensors[i].dim())
  std::vector<Tensor> host_indices;  // every index as a contiguous CPU tensor, checked
};

// tensors[0] must be on a GPU: CPU tensors reach this kernel only when an index is on one.
void check_on_gpu(const at::Device& device, at::TensorList indices) {
  if (device.is_cuda()) {
    return;
  }
  for (size_t i = 0; i < indices.size(); ++i) {
    TORCH_CHECK(!indices[i].device().is_cuda(), kCompactOp, ": `indices[", i,
                "]` must be on the CPU when `tensors[0]` is, got ", indices[i].device());
  }
  TORCH_CHECK(false, kCompactOp, ": `tensors` must all be on one device, got `tensors[0]` on ",
              device, " and a tensor on a CUDA device");
}

// Checks everything, before anything is allocated on the device. Indices may be on the CPU (as
// the CPU op takes them) or on the tensors' GPU; GPU indices are copied to the host for the bounds
// check (a sync per tensor: compaction runs once per pruning step, not per batch).
CompactArgs checked_compact_args(at::TensorList tensors, at::IntArrayRef dims,
                                 at::TensorList indices, const at::Device& device) {
  const int64_t n = static_cast<int64_t>(tensors.size());
  CompactArgs args{std::vector<int64_t>(n), std::vector<Tensor>(n)};
  for (int64_t i = 0; i < n; ++i) {
    const Tensor& t = tensors[i];
    TORCH_CHECK(t.device() == device, kCompactOp, ": `tensors[", i,
                "]` must be on the same device as `tensors[0]` (", device, "), got ", t.device());
    args.dims[i] = checked_compact_dim(i, t, dims[i]);
    const Tensor& index = indices[i];
    check_compact_index(i, index);
    TORCH_CHECK(index.device().is_cpu() || index.device() == device, kCompactOp, ": `indices[", i,
                "]` must be on the CPU or on ", device, " (the device of `tensors[0]`), got ",
                index.device());
    args.host_indices[i] = index.to(at::kCPU).contiguous();
    check_compact_index_range(i, args.host_indices[i], t.size(args.dims[i]));
  }
  return args;
}

// The outputs and the launch table: one entry per non-empty output.
struct CompactLaunch {
  std::vector<Tensor> out;
  std::vector<Tensor> inputs;  // contiguous inputs, kept alive until the launch is queued (the
                               // caching allocator reuses their memory only in stream order)
  std::vector<cuda::CompactEntry> entries;
  std::vector<int64_t> entry_tensor;  // the tensor each entry copies
  int64_t index_count = 0;            // total length of the entries' indices
};

CompactLaunch allocate_outputs(at::TensorList tensors, const CompactArgs& args) {
  const int64_t n = static_cast<int64_t>(tensors.size());
  CompactLaunch launch;
  launch.out.resize(n);
  launch.inputs.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    const Tensor& input = launch.inputs[i] = tensors[i].contiguous();
    const int64_t dim = args.dims[i];
    std::vector<int64_t> sizes = input.sizes().vec();
    const int64_t size = sizes[dim];
    sizes[dim] = args.host_indices[i].numel();
    launch.out[i] = at::empty(sizes, input.options().memory_format(at::MemoryFormat::Contiguous));
    if (launch.out[i].numel() == 0) {
      continue;
    }
    cuda::CompactEntry e{};
    e.src = input.const_data_ptr();
    e.dst = launch.out[i].mutable_data_ptr();
    e.outer = 1;
    for (int64_t d = 0; d < dim; ++d) e.outer *= sizes[d];
    int64_t inner = 1;
    for (int64_t d = dim + 1; d < static_cast<int64_t>(sizes.size()); ++d) inner *= sizes[d];
    e.size = size;
    e.kept = sizes[dim];
    e.row_bytes = inner * static_cast<int64_t>(input.element_size());
    launch.entries.push_back(e);
    launch.entry_tensor.push_back(i);
    launch.index_count += e.kept;
  }
  return launch;
}

int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

// One upload: [table | indices of every entry], staged in pinned memory and copied on the current
// stream (the pinned buffer is recycled only after that copy has run); then one launch.
void upload_and_launch(CompactLaunch& launch, const CompactArgs& args, const at::Device& device) {
  std::vector<cuda::CompactEntry>& entries = launch.entries;
  const int64_t count = static_cast<int64_t>(entries.size());
  const int64_t blocks = cuda::compact_plan(entries.data(), count);
  const int64_t entry_bytes = static_cast<int64_t>(sizeof(cuda::CompactEntry));
  const int64_t table_bytes = round_up(count * entry_bytes, 16);
  const int64_t total_bytes =
      table_bytes + launch.index_count * static_cast<int64_t>(sizeof(int64_t));
  const at::TensorOptions bytes_options = at::TensorOptions().dtype(at::kByte);
  Tensor staged = at::empty({total_bytes}, bytes_options.pinned_memory(true));
  Tensor device_buffer = at::empty({total_bytes}, bytes_options.device(device));
  char* host = static_cast<char*>(staged.mutable_data_ptr());
  const char* device_base = static_cast<const char*>(device_buffer.const_data_ptr());
  int64_t offset = table_bytes;
  for (int64_t j = 0; j < count; ++j) {
    const Tensor& idx = args.host_indices[launch.entry_tensor[j]];
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
}

std::vector<Tensor> compact_cuda(at::TensorList tensors, at::IntArrayRef dims,
                                 at::TensorList indices) {
  check_compact_lengths(tensors, dims, indices);
  if (tensors.empty()) {
    return {};
  }
  const at::Device device = tensors[0].device();
  check_on_gpu(device, indices);
  const c10::cuda::CUDAGuard guard(device);
  const CompactArgs args = checked_compact_args(tensors, dims, indices, device);
  CompactLaunch launch = allocate_outputs(tensors, args);
  if (!launch.entries.empty()) {
    upload_and_launch(launch, args, device);
  }
  return launch.out;
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
