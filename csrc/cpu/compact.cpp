// compact: the index_select behind structured pruning, for many tensors in one call.
//
// Removing a channel slices every tensor it touches (a conv's filters, the next BatchNorm's four
// vectors, the next conv's input channels, ...). One call copies all of them: out[i] =
// tensors[i].index_select(dims[i], indices[i]). Each output is a fresh contiguous tensor; the
// inputs may be of any dtype (the copy is byte-wise) and any layout (non-contiguous inputs are
// made contiguous first). Rows are copied in parallel over (outer, kept index) pairs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "common/compact_checks.h"

namespace torchprune {
namespace {

// indices[i], checked: 1-D int64 on the CPU with entries in [0, size).
void check_indices(int64_t i, const at::Tensor& index, int64_t size) {
  check_compact_index(i, index);
  TORCH_CHECK(index.device().is_cpu(), kCompactOp, ": `indices[", i, "]` must be on the CPU, got ",
              index.device());
  check_compact_index_range(i, index.contiguous(), size);
}

at::Tensor compact_one(const at::Tensor& tensor, int64_t dim, const at::Tensor& index) {
  const at::Tensor input = tensor.contiguous();
  std::vector<int64_t> sizes = input.sizes().vec();
  const int64_t size = sizes[dim];
  const int64_t kept = index.numel();
  sizes[dim] = kept;
  at::Tensor out = at::empty(sizes, input.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) {
    return out;
  }
  int64_t outer = 1, inner = 1;
  for (int64_t d = 0; d < dim; ++d) outer *= sizes[d];
  for (int64_t d = dim + 1; d < static_cast<int64_t>(sizes.size()); ++d) inner *= sizes[d];
  const int64_t row_bytes = inner * static_cast<int64_t>(input.element_size());
  const at::Tensor idx_tensor = index.contiguous();
  const int64_t* idx = idx_tensor.data_ptr<int64_t>();
  const char* src = static_cast<const char*>(input.const_data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  // One task per copied row; rows are small, so several go to each thread.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(row_bytes, 1));
  at::parallel_for(0, outer * kept, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t o = r / kept, k = r % kept;
      std::memcpy(dst + r * row_bytes, src + (o * size + idx[k]) * row_bytes, row_bytes);
    }
  });
  return out;
}

std::vector<at::Tensor> compact_cpu(at::TensorList tensors, at::IntArrayRef dims,
                                    at::TensorList indices) {
  check_compact_lengths(tensors, dims, indices);
  std::vector<int64_t> wrapped(dims.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.device().is_cpu(), kCompactOp, ": `tensors[", i, "]` must be on the CPU, got ",
                t.device());
    wrapped[i] = checked_compact_dim(i, t, dims[i]);
    check_indices(i, indices[i], t.size(wrapped[i]));
  }
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    out.push_back(compact_one(tensors[i], wrapped[i], indices[i]));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(torchprune, CPU, m) { m.impl("compact", &compact_cpu); }

}  // namespace torchprune
