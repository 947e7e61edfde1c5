// block_sparse_linear on CPU: y = x @ W^T + bias with W packed in R x 1 blocks (common/bsr.h).
//
// fp32 on AVX2 CPUs with R in {4, 8} runs cpu/bsr_avx2 (batch 1: a block gather-dot; larger
// batches: Xᵀ panels, one panel-row load per block for R output features). Everything else (other
// R, fp64, CPUs without AVX2) runs the portable loop here, which walks x row by row. Block rows are
// split across threads by stored blocks. Half precision computes in float32 and rounds once.
// The backward is sparse_linear_backward on the equivalent CSR (csrc/autograd/sparse_ops.cpp).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <type_traits>

#include "common/bsr.h"
#include "common/checks.h"
#include "common/op_helpers.h"
#include "common/sparse_checks.h"
#include "cpu/bsr_avx2.h"
#include "cpu/panels.h"
#include "cpu/spmm.h"

namespace torchprune {

int64_t check_bsr(const char* op, const at::Tensor& block_ptr, const at::Tensor& col_idx,
                  const at::Tensor& values, int64_t in_features) {
  TORCH_CHECK(in_features >= 0, op, ": `in_features` must be >= 0, got ", in_features);
  check_dim(op, "block_ptr", block_ptr, 1);
  check_dim(op, "col_idx", col_idx, 1);
  check_dim(op, "values", values, 2);
  check_dtype(op, "block_ptr", block_ptr, at::kInt);
  check_dtype(op, "col_idx", col_idx, column_dtype(in_features));
  TORCH_CHECK(block_ptr.numel() >= 1, op,
              ": `block_ptr` must have out_features / R + 1 >= 1 entries, got 0");
  TORCH_CHECK(values.size(1) >= 1, op, ": `values` must be [blocks, R] with R >= 1, got shape ",
              shape_str(values.sizes()));
  TORCH_CHECK(col_idx.numel() == values.size(0), op,
              ": `col_idx` and `values` must have one entry per stored block, got ",
              col_idx.numel(), " and ", values.size(0));
  TORCH_CHECK(block_ptr.is_contiguous() && col_idx.is_contiguous() && values.is_contiguous(), op,
              ": `block_ptr`, `col_idx` and `values` must be contiguous (as pack_bsr returns them)");
  TORCH_CHECK(col_idx.device() == values.device() && block_ptr.device() == values.device(), op,
              ": `block_ptr`, `col_idx` and `values` must be on one device, got ",
              block_ptr.device(), ", ", col_idx.device(), " and ", values.device());
  if (values.device().is_cpu()) {
    const int32_t* ptr = block_ptr.data_ptr<int32_t>();
    const int64_t rows = block_ptr.numel() - 1, blocks = values.size(0);
    TORCH_CHECK(ptr[0] == 0 && ptr[rows] == blocks, op,
                ": `block_ptr` must start at 0 and end at the number of stored blocks (", blocks,
                "), got ", ptr[0], " and ", ptr[rows]);
  }
  return values.size(1);
}

namespace {

using at::Tensor;

constexpr const char* kOp = "block_sparse_linear";

// Threads worth using: one multiply-add per stored value and row of x, plus one per output.
template <typename T, typename I>
int64_t block_threads(const Csr<T, I>& a, int64_t r, int64_t m) {
  return cpu::useful_threads((static_cast<int64_t>(a.row_ptr[a.rows]) + a.rows) * r * m);
}

// y[t, b*r + i] = bias + sum over blocks e of block row b: val[e*r + i] * x[t, col[e]], for
// every row t of x and block rows [b0, b1): the portable loop (any r, float or double).
template <typename T, typename I>
void portable_rows(const Csr<T, I>& a, int64_t r, const T* x, int64_t m, const T* bias, T* y,
                   int64_t b0, int64_t b1) {
  const int64_t k = a.cols, n = a.rows * r;
  for (int64_t t = 0; t < m; ++t) {
    const T* xt = x + t * k;
    for (int64_t b = b0; b < b1; ++b) {
      T* out = y + t * n + b * r;
      for (int64_t i = 0; i < r; ++i) out[i] = bias ? bias[b * r + i] : T(0);
      for (int64_t e = a.row_ptr[b]; e < a.row_ptr[b + 1]; ++e) {
        const T xv = xt[a.col[e]];
        const T* w = a.val + e * r;
#pragma omp simd
        for (int64_t i = 0; i < r; ++i) out[i] += w[i] * xv;
      }
    }
  }
}

// The AVX2 fp32 product for m > 1: work items are (block-row panel, tile) pairs, the panels
// aligned to whole groups of 8 output features so the kernel's stores stay vectors.
template <typename I>
void forward_avx2(const Csr<float, I>& a, int64_t r, const Tensor& x2, const float* bias,
                  Tensor& out) {
  const int64_t m = x2.size(0), k = a.cols, n = a.rows * r, threads = block_threads(a, r, m);
  const int64_t tile = cpu::avx2::bsr_tile(r), tiles = (m + tile - 1) / tile;
  const Tensor panels_x = cpu::x_panels(x2, tile, 0, /*scratch=*/true);
  const cpu::avx2::KBlocks kb = cpu::avx2::k_blocks(a.cols);
  const int64_t parts = std::max<int64_t>(1, (threads * 4 + tiles - 1) / tiles);
  const int64_t group = 8 / r;  // block rows per group of 8 features
  auto bounds = cpu::row_panels(a.row_ptr, a.rows, parts);
  for (auto& bound : bounds) bound = std::min(a.rows, (bound + group / 2) / group * group);
  bounds.back() = a.rows;
  const float* px = panels_x.data_ptr<float>();
  float* y = out.data_ptr<float>();
  cpu::for_items(parts * tiles, threads, [&](int64_t item) {
    const int64_t p = item / tiles, t = item % tiles, t0 = t * tile;
    if (bounds[p] >= bounds[p + 1]) return;
    cpu::avx2::bsr_panel(a, r, kb, px + t * k * tile, std::min(tile, m - t0), bias, y + t0 * n,
                         n, bounds[p], bounds[p + 1]);
  });
}

template <typename T, typename I>
void forward(const Csr<T, I>& a, int64_t r, const Tensor& x2, const T* bias, Tensor& out) {
  const int64_t m = x2.size(0), threads = block_threads(a, r, m);
  const T* x = x2.data_ptr<T>();
  T* y = out.data_ptr<T>();
  const bool fast = std::is_same_v<T, float> && cpu::avx2::supported() &&
                    cpu::avx2::bsr_supported_rows(r);
  if (fast && m > 1) {
    if constexpr (std::is_same_v<T, float>) return forward_avx2(a, r, x2, bias, out);
  }
  const auto bounds = cpu::row_panels(a.row_ptr, a.rows, threads * 4);
  cpu::for_items(threads * 4, threads, [&](int64_t p) {
    if constexpr (std::is_same_v<T, float>) {
      if (fast) return cpu::avx2::bsr_spmv(a, r, x, bias, y, bounds[p], bounds[p + 1]);
    }
    portable_rows(a, r, x, m, bias, y, bounds[p], bounds[p + 1]);
  });
}

Tensor block_sparse_linear_cpu(const Tensor& x, const Tensor& block_ptr, const Tensor& col_idx,
                               const Tensor& values, int64_t in_features,
                               const std::optional<Tensor>& bias) {
  const int64_t r = check_bsr(kOp, block_ptr, col_idx, values, in_features);
  check_linear_input(kOp, x, values, in_features);
  const int64_t n = (block_ptr.numel() - 1) * r;
  if (bias.has_value()) {
    check_sparse_bias(kOp, *bias, n, "out_features", x);
  }
  if (is_half(x)) {
    return forward_in_float32(x, values, bias, [&](const Tensor& x32, const Tensor& v32,
                                                   const std::optional<Tensor>& b32) {
      return block_sparse_linear_cpu(x32, block_ptr, col_idx, v32, in_features, b32);
    });
  }
  const Tensor x2 = x.reshape({batch_rows(x), in_features}).contiguous();
  Tensor out = at::empty({x2.size(0), n}, x.options());
  if (x2.size(0) > 0 && n > 0) {
    const Tensor bias_c = bias.has_value() ? bias->contiguous() : Tensor();
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), kOp, [&] {
      with_csr<scalar_t>(block_ptr, col_idx, values, in_features, [&](const auto& a) {
        forward(a, r, x2, bias_c.defined() ? bias_c.data_ptr<scalar_t>() : nullptr, out);
      });
    });
  }
  return out.view(sparse_linear_out_sizes(x, n));
}

}  // namespace

TORCH_LIBRARY_IMPL(torchprune, CPU, m) {
  m.impl("block_sparse_linear", &block_sparse_linear_cpu);
}

}  // namespace torchprune
