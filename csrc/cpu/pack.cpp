// Packing a dense weight into the CSR format of common/csr.h, and back.
//
// Packing keeps every entry the mask allows (even one whose weight happens to be 0, so that
// fine-tuning on the sparse kernels can still move it), or every nonzero when there is no mask.
// It is deterministic: columns ascend within each row, whatever the number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "common/checks.h"
#include "common/csr.h"

namespace torchprune {

void check_csr(const char* op, const at::Tensor& row_ptr, const at::Tensor& col_idx,
               const at::Tensor& values, int64_t in_features, bool structure) {
  TORCH_CHECK(in_features >= 0, op, ": `in_features` must be >= 0, got ", in_features);
  check_dim(op, "row_ptr", row_ptr, 1);
  check_dim(op, "col_idx", col_idx, 1);
  check_dim(op, "values", values, 1);
  check_dtype(op, "row_ptr", row_ptr, at::kInt);
  check_dtype(op, "col_idx", col_idx, column_dtype(in_features));
  TORCH_CHECK(row_ptr.numel() >= 1, op, ": `row_ptr` must have out_features + 1 >= 1 entries, ",
              "got 0");
  TORCH_CHECK(col_idx.numel() == values.numel(), op,
              ": `col_idx` and `values` must have one entry per stored value, got ",
              col_idx.numel(), " and ", values.numel());
  TORCH_CHECK(row_ptr.is_contiguous() && col_idx.is_contiguous() && values.is_contiguous(), op,
              ": `row_ptr`, `col_idx` and `values` must be contiguous (as pack_csr returns them)");
  TORCH_CHECK(col_idx.device() == values.device() && row_ptr.device() == values.device(), op,
              ": `row_ptr`, `col_idx` and `values` must be on one device, got ", row_ptr.device(),
              ", ", col_idx.device(), " and ", values.device());
  if (!values.device().is_cpu()) {
    return;  // reading row_ptr's end points would need a device sync
  }
  const int32_t* ptr = row_ptr.data_ptr<int32_t>();
  const int64_t rows = row_ptr.numel() - 1, nnz = values.numel();
  TORCH_CHECK(ptr[0] == 0 && ptr[rows] == nnz, op,
              ": `row_ptr` must start at 0 and end at the number of stored values (", nnz,
              "), got ", ptr[0], " and ", ptr[rows]);
  if (!structure) {
    return;
  }
  bool ordered = true, in_range = true;
  const bool is_short = col_idx.scalar_type() == at::kShort;
  const auto* short_col = reinterpret_cast<const uint16_t*>(
      is_short ? col_idx.data_ptr<int16_t>() : nullptr);
  const int32_t* int_col = is_short ? nullptr : col_idx.data_ptr<int32_t>();
  for (int64_t r = 0; r < rows && ordered && in_range; ++r) {
    ordered = ptr[r] <= ptr[r + 1] && ptr[r + 1] <= nnz;  // an interior pointer past nnz must not be read
    int64_t previous = -1;
    for (int64_t e = ptr[r]; ordered && e < ptr[r + 1]; ++e) {
      const int64_t c = is_short ? short_col[e] : int_col[e];
      ordered = c > previous;
      in_range = c >= 0 && c < in_features;
      previous = c;
      if (!in_range) break;
    }
  }
  TORCH_CHECK(ordered, op, ": `row_ptr` must not decrease (nor exceed the number of stored values) ",
              "and `col_idx` must ascend within each row, as pack_csr writes them");
  TORCH_CHECK(in_range, op, ": `col_idx` must lie in [0, in_features) = [0, ", in_features, ")");
}

namespace {

constexpr const char* kPack = "pack_csr";

template <typename T, typename I>
void fill_rows(const at::Tensor& weight, const at::Tensor& keep, const int32_t* row_ptr,
               I* col, T* val) {
  const int64_t cols = weight.size(1);
  const T* w = weight.data_ptr<T>();
  const bool* k = keep.data_ptr<bool>();
  at::parallel_for(0, weight.size(0), 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      int64_t e = row_ptr[r];
      for (int64_t c = 0; c < cols; ++c) {
        if (k[r * cols + c]) {
          col[e] = static_cast<I>(c);
          val[e] = w[r * cols + c];
          ++e;
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pack_csr_cpu(
    const at::Tensor& weight, const std::optional<at::Tensor>& mask) {
  check_dim(kPack, "weight", weight, 2);
  check_floating(kPack, "weight", weight);
  if (mask.has_value()) {
    check_mask(kPack, *mask, weight);
  }
  const at::Tensor dense = weight.contiguous();
  const at::Tensor keep = (mask.has_value() ? *mask : dense != 0).contiguous();
  const int64_t rows = dense.size(0), cols = dense.size(1);

  const at::Tensor counts = keep.sum(1, /*keepdim=*/false, at::kLong);
  const at::Tensor offsets = at::cat({at::zeros({1}, counts.options()), counts.cumsum(0)});
  const int64_t nnz = offsets[rows].item<int64_t>();
  TORCH_CHECK(nnz <= std::numeric_limits<int32_t>::max(), kPack,
              ": `weight` must have fewer than 2^31 entries to keep, got ", nnz);
  at::Tensor row_ptr = offsets.to(at::kInt);
  at::Tensor col_idx = at::empty({nnz}, dense.options().dtype(column_dtype(cols)));
  at::Tensor values = at::empty({nnz}, dense.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dense.scalar_type(), kPack, [&] {
    if (col_idx.scalar_type() == at::kShort) {
      fill_rows<scalar_t>(dense, keep, row_ptr.data_ptr<int32_t>(),
                          reinterpret_cast<uint16_t*>(col_idx.data_ptr<int16_t>()),
                          values.data_ptr<scalar_t>());
    } else {
      fill_rows<scalar_t>(dense, keep, row_ptr.data_ptr<int32_t>(), col_idx.data_ptr<int32_t>(),
                          values.data_ptr<scalar_t>());
    }
  });
  return {row_ptr, col_idx, values};
}

at::Tensor unpack_csr_cpu(const at::Tensor& row_ptr, const at::Tensor& col_idx,
                          const at::Tensor& values, int64_t in_features) {
  check_csr("unpack_csr", row_ptr, col_idx, values, in_features, /*structure=*/true);
  check_floating("unpack_csr", "values", values);
  const int64_t rows = row_ptr.numel() - 1;
  // Row index of every entry, then one scatter into the flattened dense matrix.
  const at::Tensor counts = (row_ptr.narrow(0, 1, rows) - row_ptr.narrow(0, 0, rows)).to(at::kLong);
  const at::Tensor row_of = at::repeat_interleave(counts);
  const at::Tensor cols = col_idx.to(at::kLong).bitwise_and(kMaxShortColumns - 1);
  const at::Tensor flat_index =
      row_of * in_features + (col_idx.scalar_type() == at::kShort ? cols : col_idx.to(at::kLong));
  at::Tensor dense = at::zeros({rows * in_features}, values.options());
  dense.index_put_({flat_index}, values);
  return dense.view({rows, in_features});
}

void check_csr_cpu(const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& values,
                   int64_t in_features) {
  check_csr("check_csr", row_ptr, col_idx, values, in_features, /*structure=*/true);
}

}  // namespace

TORCH_LIBRARY_IMPL(torchprune, CPU, m) {
  m.impl("pack_csr", &pack_csr_cpu);
  m.impl("unpack_csr", &unpack_csr_cpu);
  m.impl("check_csr", &check_csr_cpu);
}

}  // namespace torchprune
