// sparse_linear on CPU: y = x @ W^T + bias with W packed as CSR (common/csr.h), and its backward.
//
// Batch 1 is a gather-dot per weight row (spmv): every stored value and index is read once,
// which is all that matters when the product is memory bound. Larger batches transpose x once
// to Xᵀ panels so that each stored value scales a contiguous row of a panel held in registers:
// fp32 on AVX2 CPUs through cpu/spmm_avx2 (16/32-wide panels packed by register transposes,
// K-blocks, y written row-major 8 features at a time; its backward runs the same kernel on Wᵀ
// and an SDDMM over the same panels), everything else through cpu/spmm (32-wide panels, y
// written from the register tile with strided stores). Threads take whole panels when the
// panels divide evenly among them (each thread packs the panels it multiplies), else rows split
// by stored entries, not by rows. Half precision computes in float32 and rounds once at the end.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/csr.h"
#include "common/op_helpers.h"
#include "common/sparse_checks.h"
#include "cpu/spmm.h"
#include "cpu/panels.h"
#include "cpu/spmm_avx2.h"

namespace torchprune {
namespace {

using at::Tensor;

constexpr const char* kForward = "sparse_linear";
constexpr const char* kBackward = "sparse_linear_backward";

// Threads worth using for a product of W with m rows: one multiply-add per stored entry and row,
// plus one per output.
template <typename T, typename I>
int64_t product_threads(const Csr<T, I>& a, int64_t m) {
  return cpu::useful_threads((a.row_ptr[a.rows] + a.rows) * m);
}

// cpu::row_panels of W's rows with the inner bounds moved to multiples of 8, so that every row
// panel but the last holds whole groups of 8 features and the kernel's stores stay vectors.
template <typename I>
std::vector<int64_t> group_panels(const Csr<float, I>& a, int64_t parts) {
  auto bounds = cpu::row_panels(a.row_ptr, a.rows, parts);
  for (auto& bound : bounds) bound = std::min(a.rows, (bound + 4) / 8 * 8);
  bounds.back() = a.rows;
  return bounds;
}

// out [m, N] = x @ Wᵀ (+ bias) for fp32 on AVX2 CPUs and m > 1, x given as its panels
// (cpu::x_panels, tile = tile_for(m)): work items are (row panel, tile) pairs, row panels from
// group_panels.
template <typename I>
void forward_avx2(const Csr<float, I>& a, const Tensor& panels_x, int64_t m, const float* bias,
                  Tensor& out) {
  const int64_t n = a.rows, k = a.cols, threads = product_threads(a, m);
  const int64_t tiles = panels_x.size(0), tile = panels_x.size(2);
  const cpu::avx2::KBlocks blocks = cpu::avx2::k_blocks(a.cols);
  const int64_t parts = std::max<int64_t>(1, (threads * 4 + tiles - 1) / tiles);
  const auto panels = group_panels(a, parts);
  const float* b = panels_x.data_ptr<float>();
  float* y = out.data_ptr<float>();
  cpu::for_items(parts * tiles, threads, [&](int64_t item) {
    const int64_t p = item / tiles, t = item % tiles, t0 = t * tile;
    if (panels[p] >= panels[p + 1]) return;
    cpu::avx2::spmm_panel(a, blocks, b + t * k * tile, tile, std::min(tile, m - t0), bias,
                          y + t0 * n, n, panels[p], panels[p + 1]);
  });
}

// Stored entries per row chunk of forward_avx2_by_tile: 384 KiB of values and 16-bit indices,
// a fifth of a 2 MiB L2.
constexpr int64_t kChunkEntries = 64 * 1024;

// forward_avx2 with x as it comes, when its tiles divide evenly among the threads: one work item
// per tile, which packs that tile's panel and then runs every row of W over it, so each panel is
// packed and read by one thread (no panel crosses cores) inside one parallel region. forward_avx2
// splits rows instead, after packing in a region of its own, and at 128 rows its threads spent
// about as long waiting and moving panels as computing. On an Intel Xeon (2 threads, 128 rows,
// 90%), 384x384 took 72 us that way and 42 us this way, 384x1536 320 and 179 us, 768x768 223
// and 144 us; at 70% 768x3072 2008 and 1762 us; at 1024 rows both within 3%. In one process,
// switched per call: all-MiniLM-L6-v2 at 1 x 128 tokens 10.85 -> 8.84 ms at 90% and 14.80 ->
// 13.41 ms at 70%, BERT-base 53.2 -> 50.6 ms and 97.2 -> 91.3 ms, within 1% at 8 x 128.
template <typename I>
void forward_avx2_by_tile(const Csr<float, I>& a, const Tensor& x2, int64_t m, int64_t tile,
                          int64_t threads, const float* bias, Tensor& out) {
  const int64_t n = a.rows, k = a.cols, tiles = (m + tile - 1) / tile;
  const cpu::avx2::KBlocks blocks = cpu::avx2::k_blocks(a.cols);
  // Rows in chunks of about kChunkEntries stored entries (aligned to the groups of 8), each chunk
  // through all of a thread's panels before the next, so that a large weight is read from L3
  // once per thread rather than once per panel.
  const auto chunks = group_panels(a, std::max<int64_t>(1, a.row_ptr[n] / kChunkEntries));
  Tensor panels = cpu::scratch_panels(tiles, k, tile, x2.options());
  const float* x = x2.data_ptr<float>();
  float* p = panels.data_ptr<float>();
  float* y = out.data_ptr<float>();
  const int64_t per_thread = tiles / threads;
  cpu::for_items(threads, threads, [&](int64_t item) {
    const int64_t t0 = item * per_thread, t1 = t0 + per_thread;
    for (int64_t t = t0; t < t1; ++t) cpu::avx2::pack_panel(x, k, m, k, tile, t, p + t * k * tile);
    for (size_t c = 0; c + 1 < chunks.size(); ++c) {
      if (chunks[c] >= chunks[c + 1]) continue;
      for (int64_t t = t0; t < t1; ++t) {
        cpu::avx2::spmm_panel(a, blocks, p + t * k * tile, tile, std::min(tile, m - t * tile),
                              bias, y + t * tile * n, n, chunks[c], chunks[c + 1]);
      }
    }
  });
}

// out [M, N] = x2 [M, K] @ W^T (+ bias).
template <typename T, typename I>
void forward(const Csr<T, I>& a, const Tensor& x2, const T* bias, Tensor& out) {
  const int64_t m = x2.size(0), n = a.rows;
  const int64_t threads = product_threads(a, m);
  if (m == 1) {
    const auto panels = cpu::row_panels(a.row_ptr, n, threads * 4);
    const T* x = x2.data_ptr<T>();
    T* y = out.data_ptr<T>();
    cpu::for_items(threads * 4, threads,
              [&](int64_t p) { cpu::spmv(a, x, bias, y, panels[p], panels[p + 1]); });
    return;
  }
  if constexpr (std::is_same_v<T, float>) {
    if (cpu::avx2::supported()) {
      const int64_t tile = cpu::avx2::tile_for(m), tiles = (m + tile - 1) / tile;
      if (threads > 1 && tiles % threads == 0) {
        return forward_avx2_by_tile(a, x2, m, tile, threads, bias, out);
      }
      return forward_avx2(a, cpu::x_panels(x2, tile, threads, /*scratch=*/true), m, bias, out);
    }
  }
  // Xᵀ as [tiles, K, W] panels of W = kPanelWidth batch rows (the last one zero-padded); a batch
  // that fits one panel is just Xᵀ [K, M], with no padding to copy.
  const int64_t w = m <= cpu::kPanelWidth<T> ? m : cpu::kPanelWidth<T>;
  const int64_t k = a.cols, tiles = (m + w - 1) / w;
  const Tensor panels_x = tiles == 1 ? x2.t().contiguous()
                                     : at::constant_pad_nd(x2, {0, 0, 0, tiles * w - m})
                                           .view({tiles, w, k})
                                           .transpose(1, 2)
                                           .contiguous();
  const int64_t parts = std::max<int64_t>(1, (threads * 4 + tiles - 1) / tiles);
  const auto panels = cpu::row_panels(a.row_ptr, n, parts);
  const T* b = panels_x.data_ptr<T>();
  T* y = out.data_ptr<T>();
  cpu::for_items(parts * tiles, threads, [&](int64_t item) {
    const int64_t p = item / tiles, tile = item % tiles, t0 = tile * w;
    // Row r of the tile goes to y[t0 + t, r]: the transposed store.
    cpu::spmm(a, b + tile * k * w, w, std::min(w, m - t0), bias, y + t0 * n, /*row stride=*/1,
              /*col stride=*/n, panels[p], panels[p + 1]);
  });
}

Tensor sparse_linear_cpu(const Tensor& x, const Tensor& row_ptr, const Tensor& col_idx,
                         const Tensor& values, int64_t in_features,
                         const std::optional<Tensor>& bias) {
  check_sparse_linear(kForward, x, row_ptr, col_idx, values, in_features);
  const int64_t n = row_ptr.numel() - 1;
  if (bias.has_value()) {
    check_sparse_bias(kForward, *bias, n, "out_features", x);
  }
  if (is_half(x)) {
    return forward_in_float32(x, values, bias, [&](const Tensor& x32, const Tensor& v32,
                                                   const std::optional<Tensor>& b32) {
      return sparse_linear_cpu(x32, row_ptr, col_idx, v32, in_features, b32);
    });
  }
  const Tensor x2 = x.reshape({batch_rows(x), in_features}).contiguous();
  Tensor out = at::empty({x2.size(0), n}, x.options());
  if (x2.size(0) > 0 && n > 0) {
    const Tensor bias_c = bias.has_value() ? bias->contiguous() : Tensor();
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), kForward, [&] {
      with_csr<scalar_t>(row_ptr, col_idx, values, in_features, [&](const auto& a) {
        forward(a, x2, bias_c.defined() ? bias_c.data_ptr<scalar_t>() : nullptr, out);
      });
    });
  }
  return out.view(sparse_linear_out_sizes(x, n));
}

// grad_x2 [M, K] = grad2 [M, N] @ W, as Wᵀ-scatter: threads own disjoint row panels and sum
// their private [K, M] partials at the end (for one thread, there is one partial and no sum).
template <typename T, typename I>
Tensor input_grad(const Csr<T, I>& a, const Tensor& grad_t, int64_t m) {
  const int64_t n = a.rows, k = a.cols, threads = product_threads(a, m);
  const auto panels = cpu::row_panels(a.row_ptr, n, threads);
  Tensor partial = at::zeros({threads, k, m}, grad_t.options());
  const T* b = grad_t.data_ptr<T>();
  T* c = partial.data_ptr<T>();
  cpu::for_items(threads, threads, [&](int64_t p) {
    cpu::spmm_transposed(a, b, m, m, c + p * k * m, m, panels[p], panels[p + 1]);
  });
  const Tensor grad_xt = threads == 1 ? partial[0] : partial.sum(0);  // [K, M]
  return grad_xt.t();
}

// Wᵀ in CSR: the columns of W as rows [K, N], entries of each row in ascending n. With it the
// input gradient grad_x = grad_y @ W is the forward product of Wᵀ, on the forward kernel.
template <typename J>
struct TransposedCsr {
  std::vector<int32_t> row_ptr;
  std::vector<J> col;
  std::vector<float> val;
};

template <typename J, typename I>
TransposedCsr<J> transpose_csr(const Csr<float, I>& a) {
  const int64_t nnz = a.row_ptr[a.rows];
  TransposedCsr<J> t{std::vector<int32_t>(a.cols + 1, 0), std::vector<J>(nnz),
                     std::vector<float>(nnz)};
  for (int64_t e = 0; e < nnz; ++e) ++t.row_ptr[static_cast<int64_t>(a.col[e]) + 1];
  for (int64_t j = 0; j < a.cols; ++j) t.row_ptr[j + 1] += t.row_ptr[j];
  std::vector<int32_t> next(t.row_ptr.begin(), t.row_ptr.end() - 1);
  for (int64_t r = 0; r < a.rows; ++r) {
    for (int64_t e = a.row_ptr[r]; e < a.row_ptr[r + 1]; ++e) {
      const int32_t slot = next[a.col[e]]++;
      t.col[slot] = static_cast<J>(r);
      t.val[slot] = a.val[e];
    }
  }
  return t;
}

// grad_x [m, K] = grad_y [m, N] @ W for fp32 on AVX2 CPUs, grad_y given as its panels:
// forward_avx2 with Wᵀ.
template <typename I>
void input_grad_avx2(const Csr<float, I>& a, const Tensor& grad_panels, int64_t m,
                     Tensor& grad_x) {
  const int64_t n = a.rows, k = a.cols;
  auto run = [&](const auto& t) {
    using J = std::remove_cv_t<std::remove_reference_t<decltype(t.col[0])>>;
    const Csr<float, J> at_{t.row_ptr.data(), t.col.data(), t.val.data(), k, n};
    forward_avx2(at_, grad_panels, m, nullptr, grad_x);
  };
  if (n < kMaxShortColumns) {
    run(transpose_csr<uint16_t>(a));
  } else {
    run(transpose_csr<int32_t>(a));
  }
}

// The value gradient for fp32 on AVX2 CPUs from the panels of grad_y and x (same tile): one
// SDDMM per batch tile, each thread owning a row panel of entries across every tile.
template <typename I>
Tensor values_grad_avx2(const Csr<float, I>& a, const Tensor& gp, const Tensor& xp, int64_t m) {
  const int64_t n = a.rows, k = a.cols, threads = product_threads(a, m);
  const int64_t tiles = gp.size(0), tile = gp.size(2);
  Tensor out = at::empty({a.row_ptr[n]}, gp.options());
  const auto panels = cpu::row_panels(a.row_ptr, n, threads);
  cpu::for_items(threads, threads, [&](int64_t p) {
    for (int64_t t = 0; t < tiles; ++t) {
      cpu::avx2::sddmm_panel(a, gp.data_ptr<float>() + t * n * tile,
                             xp.data_ptr<float>() + t * k * tile, tile, t > 0,
                             out.data_ptr<float>(), panels[p], panels[p + 1]);
    }
  });
  return out;
}

// grad of the stored values: for entry (r, c), sum over the batch of grad[:, r] * x[:, c].
template <typename T, typename I>
Tensor values_grad(const Csr<T, I>& a, const Tensor& grad_t, const Tensor& xt, int64_t m) {
  const int64_t n = a.rows;
  Tensor out = at::empty({a.row_ptr[n]}, grad_t.options());
  const int64_t threads = product_threads(a, m);
  const auto panels = cpu::row_panels(a.row_ptr, n, threads * 4);
  cpu::for_items(threads * 4, threads, [&](int64_t p) {
    cpu::sddmm(a, grad_t.data_ptr<T>(), m, xt.data_ptr<T>(), m, m, out.data_ptr<T>(), panels[p],
               panels[p + 1]);
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> sparse_linear_backward_cpu(
    const Tensor& grad_out, const Tensor& x, const Tensor& row_ptr, const Tensor& col_idx,
    const Tensor& values, int64_t in_features, std::array<bool, 3> output_mask) {
  check_sparse_linear(kBackward, x, row_ptr, col_idx, values, in_features);
  const int64_t n = row_ptr.numel() - 1;
  check_sparse_grad_out(kBackward, grad_out, sparse_linear_out_sizes(x, n), x);
  if (is_half(x)) {
    auto [gx, gv, gb] = sparse_linear_backward_cpu(grad_out.to(at::kFloat), x.to(at::kFloat),
                                                   row_ptr, col_idx, values.to(at::kFloat),
                                                   in_features, output_mask);
    const auto dtype = x.scalar_type();
    return {gx.to(dtype), gv.to(dtype), gb.to(dtype)};
  }
  const int64_t m = batch_rows(x);
  const Tensor x2 = x.reshape({m, in_features});
  const Tensor grad2 = grad_out.reshape({m, n});
  Tensor grad_x, grad_values, grad_bias;
  if (output_mask[0]) {
    grad_x = at::zeros_like(x, at::MemoryFormat::Contiguous);
  }
  if (output_mask[1]) {
    grad_values = at::zeros_like(values);
  }
  if (output_mask[2]) {
    grad_bias = grad2.sum(0);
  }
  if (m > 0 && n > 0 && in_features > 0 && (output_mask[0] || output_mask[1])) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), kBackward, [&] {
      with_csr<scalar_t>(row_ptr, col_idx, values, in_features, [&](const auto& a) {
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (cpu::avx2::supported() && m > 1) {
            // grad_y is packed once, for both gradients.
            const int64_t tile = cpu::avx2::tile_for(m);
            const Tensor gp = cpu::x_panels(grad2.contiguous(), tile);
            if (output_mask[0]) {
              Tensor gx = grad_x.view({m, in_features});
              input_grad_avx2(a, gp, m, gx);
            }
            if (output_mask[1]) {
              grad_values = values_grad_avx2(a, gp, cpu::x_panels(x2.contiguous(), tile), m);
            }
            return;
          }
        }
        // [N, M] and [K, M]: batch-contiguous rows, what the portable kernels read.
        const Tensor grad_t = grad2.t().contiguous();
        if (output_mask[0]) {
          grad_x.view({m, in_features}).copy_(input_grad(a, grad_t, m));
        }
        if (output_mask[1]) {
          grad_values = values_grad(a, grad_t, x2.t().contiguous(), m);
        }
      });
    });
  }
  const auto empty = at::empty({0}, x.options());
  return {output_mask[0] ? grad_x : empty, output_mask[1] ? grad_values : empty,
          output_mask[2] ? grad_bias : empty};
}

}  // namespace

namespace cpu {

Tensor scratch_panels(int64_t tiles, int64_t k, int64_t tile, const at::TensorOptions& options) {
  thread_local Tensor buffer;
  const int64_t need = tiles * k * tile;
  if (!buffer.defined() || buffer.numel() < need || buffer.dtype() != options.dtype()) {
    buffer = at::empty({need}, options);
  }
  return buffer.narrow(0, 0, need).view({tiles, k, tile});
}

Tensor x_panels(const Tensor& x2, int64_t tile, int64_t threads, bool scratch) {
  const int64_t m = x2.size(0), k = x2.size(1), tiles = (m + tile - 1) / tile;
  Tensor panels = scratch ? scratch_panels(tiles, k, tile, x2.options())
                          : at::empty({tiles, k, tile}, x2.options());
  const float* x = x2.data_ptr<float>();
  float* out = panels.data_ptr<float>();
  for_items(tiles, threads > 0 ? threads : useful_threads(m * k), [&](int64_t t) {
    avx2::pack_panel(x, k, m, k, tile, t, out + t * k * tile);
  });
  return panels;
}

}  // namespace cpu

TORCH_LIBRARY_IMPL(torchprune, CPU, m) {
  m.impl("sparse_linear", &sparse_linear_cpu);
  m.impl("sparse_linear_backward", &sparse_linear_backward_cpu);
}

}  // namespace torchprune
