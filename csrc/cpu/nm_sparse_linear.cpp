// nm_sparse_linear on CPU: y = x @ W^T + bias with W in the N:8 format (common/nm.h).
//
// Up to kNmCsrRows - 1 rows of x: fp32 on AVX2 CPUs with n in {1, 2, 4} runs cpu/nm_avx2, up to
// kNmRows rows of x per pass over the weight; other n, fp64 and CPUs without AVX2 run the portable
// loop here; weight rows are split across threads. From kNmCsrRows rows on, a pass per 4 rows
// loses to sparse_linear's tiled kernel, which reuses each stored weight across a whole panel of
// rows: the weight is rewritten as CSR (regular row pointers, the decoded columns: one write of
// 2 or 4 bytes per slot, O(slots) against O(slots x rows) of product) and multiplied by it.
// (Unpacking to a dense scratch weight for the GEMM was tried: a fresh dense buffer per call costs
// more than the product at 16-32 rows, page faults included.) Half precision computes in float32
// and rounds once. The backward is sparse_linear_backward on the same CSR
// (csrc/autograd/sparse_ops.cpp).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <utility>
#include <type_traits>

#include "common/checks.h"
#include "common/nm.h"
#include "common/op_handles.h"
#include "common/op_helpers.h"
#include "common/sparse_checks.h"
#include "cpu/nm_avx2.h"
#include "cpu/spmm.h"
#include "cpu/spmm_avx2.h"

namespace torchprune {

int64_t check_nm(const char* op, const at::Tensor& codes, const at::Tensor& values,
                 int64_t in_features) {
  TORCH_CHECK(in_features >= 0 && in_features % kNmWindow == 0, op,
              ": `in_features` must be a multiple of 8 (the format's windows are 8 input columns), "
              "got ", in_features);
  check_dim(op, "codes", codes, 2);
  check_dim(op, "values", values, 2);
  check_dtype(op, "codes", codes, at::kInt);
  const int64_t windows = in_features / kNmWindow, slots = values.size(1);
  const int64_t n = windows > 0 ? slots / windows : 0;
  TORCH_CHECK(windows > 0 ? (slots % windows == 0 && n >= 1 && n <= kNmWindow) : slots == 0, op,
              ": `values` must be [out_features, in_features / 8 * n] with 1 <= n <= 8 slots per ",
              "window; with in_features = ", in_features, " got shape ", shape_str(values.sizes()));
  TORCH_CHECK(codes.size(0) == values.size(0) && codes.size(1) == (slots + 7) / 8, op,
              ": `codes` must be [out_features, ceil(slots / 8)] = [", values.size(0), ", ",
              (slots + 7) / 8, "] for `values` of shape ", shape_str(values.sizes()), ", got ",
              shape_str(codes.sizes()));
  TORCH_CHECK(codes.is_contiguous() && values.is_contiguous(), op,
              ": `codes` and `values` must be contiguous (as pack_nm returns them)");
  TORCH_CHECK(codes.device() == values.device(), op,
              ": `codes` and `values` must be on one device, got ", codes.device(), " and ",
              values.device());
  return n;
}

namespace {

using at::Tensor;

constexpr const char* kOp = "nm_sparse_linear";

// Rows of x from which the product goes through CSR (benchmarks/bench_linear.py --nm 2:4 on the
// nine transformer shapes, interleaved with dense: at 8 rows two passes of the N:8 kernel ran
// 1.2-2.2x F.linear on every shape; at 16 rows four passes lost to it on most).
constexpr int64_t kNmCsrRows = 16;

// y[t, r] = bias[r] + sum_s val[r, s] * x[t, column(r, s)] for every row t of x and weight rows
// [r0, r1): the portable loop (any n, float or double).
template <typename T>
void portable_rows(const Nm<T>& a, const T* x, int64_t m, const T* bias, T* y, int64_t r0,
                   int64_t r1) {
  for (int64_t t = 0; t < m; ++t) {
    const T* xt = x + t * a.cols;
    for (int64_t r = r0; r < r1; ++r) {
      const T* v = a.val + r * a.slots;
      T out = bias ? bias[r] : T(0);
      a.for_each_slot(r, [&](int64_t s, int64_t c) { out += v[s] * xt[c]; });
      y[t * a.rows + r] = out;
    }
  }
}

// The same weight as CSR: row_ptr (every row holds `slots` entries) and the decoded columns, in
// sparse_linear's index dtype; its values are the N:8 values in the same order.
template <typename T>
std::pair<Tensor, Tensor> to_csr(const Nm<T>& a, const at::TensorOptions& options) {
  const Tensor row_ptr = at::arange(a.rows + 1, options.dtype(at::kInt)) * a.slots;
  Tensor cols = at::empty({a.rows * a.slots}, options.dtype(column_dtype(a.cols)));
  const auto fill = [&](auto* col) {  // uint16_t for the short form (csr.h), int32_t otherwise
    using I = std::remove_pointer_t<decltype(col)>;
    at::parallel_for(0, a.rows, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        I* row = col + r * a.slots;
        a.for_each_slot(r, [&](int64_t s, int64_t c) { row[s] = static_cast<I>(c); });
      }
    });
  };
  if (cols.scalar_type() == at::kShort) {
    fill(reinterpret_cast<uint16_t*>(cols.data_ptr<int16_t>()));
  } else {
    fill(cols.data_ptr<int32_t>());
  }
  return {row_ptr, cols};
}

template <typename T>
void forward(const Nm<T>& a, const Tensor& x2, const T* bias, Tensor& out) {
  const int64_t m = x2.size(0);
  const int64_t threads = cpu::useful_threads(a.rows * a.slots * m + a.rows);
  const T* x = x2.data_ptr<T>();
  T* y = out.data_ptr<T>();
  const int64_t parts = std::min<int64_t>(threads * 4, std::max<int64_t>(a.rows, 1));
  const auto rows_of = [&](int64_t p) { return a.rows * p / parts; };
  if constexpr (std::is_same_v<T, float>) {
    if (cpu::avx2::supported() && cpu::avx2::nm_supported(a.n)) {
      cpu::for_items(parts, threads, [&](int64_t p) {
        for (int64_t t0 = 0; t0 < m; t0 += cpu::avx2::kNmRows) {
          cpu::avx2::nm_rows(a, x + t0 * a.cols, a.cols, std::min(cpu::avx2::kNmRows, m - t0),
                             bias, y + t0 * a.rows, a.rows, rows_of(p), rows_of(p + 1));
        }
      });
      return;
    }
  }
  cpu::for_items(parts, threads,
                 [&](int64_t p) { portable_rows(a, x, m, bias, y, rows_of(p), rows_of(p + 1)); });
}

Tensor nm_sparse_linear_cpu(const Tensor& x, const Tensor& codes, const Tensor& values,
                            int64_t in_features, const std::optional<Tensor>& bias) {
  const int64_t n = check_nm(kOp, codes, values, in_features);
  check_linear_input(kOp, x, values, in_features);
  const int64_t rows = values.size(0);
  if (bias.has_value()) {
    check_sparse_bias(kOp, *bias, rows, "out_features", x);
  }
  if (is_half(x)) {
    return forward_in_float32(x, values, bias, [&](const Tensor& x32, const Tensor& v32,
                                                   const std::optional<Tensor>& b32) {
      return nm_sparse_linear_cpu(x32, codes, v32, in_features, b32);
    });
  }
  const Tensor x2 = x.reshape({batch_rows(x), in_features}).contiguous();
  Tensor out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), kOp, [&] {
    const Nm<scalar_t> a{codes.data_ptr<int32_t>(), values.data_ptr<scalar_t>(), rows,
                         in_features, n, values.size(1), codes.size(1)};
    if (x2.size(0) >= kNmCsrRows && rows > 0) {
      const auto [row_ptr, cols] = to_csr(a, values.options());
      out = sparse_linear_op().call(x2, row_ptr, cols, values.view(-1), in_features, bias);
      return;
    }
    out = at::empty({x2.size(0), rows}, x.options());
    if (x2.size(0) == 0 || rows == 0) return;
    if (in_features == 0) {
      bias.has_value() ? out.copy_(bias->expand_as(out)) : out.zero_();
      return;
    }
    const Tensor bias_c = bias.has_value() ? bias->contiguous() : Tensor();
    forward(a, x2, bias_c.defined() ? bias_c.data_ptr<scalar_t>() : nullptr, out);
  });
  return out.view(sparse_linear_out_sizes(x, rows));
}

}  // namespace

TORCH_LIBRARY_IMPL(torchprune, CPU, m) {
  m.impl("nm_sparse_linear", &nm_sparse_linear_cpu);
}

}  // namespace torchprune
