// CPU kernels of the masked ops: masked_linear, masked_conv2d and their backward ops.
//
// The only arithmetic written here is the masking step, where(mask, w, 0); the matmul and the
// convolution go to ATen (MKL / oneDNN), which is the fast path. The masked weight exists only
// as a temporary inside each op call; the module keeps its one dense weight and one bool mask.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "common/mask_span.h"
#include "common/masked_dense.h"
#include "common/masked_checks.h"
#include "common/op_helpers.h"

namespace torchprune {
namespace {

using at::Tensor;

// where(mask, src, 0) into `out` over contiguous buffers (`out` may be `src`), in parallel; one
// pass, memory bound: the bool mask is a quarter of the bytes of a float32 weight.
template <typename scalar_t>
void mask_kernel(const scalar_t* src, const bool* mask, scalar_t* out, int64_t numel) {
  const auto* keep = reinterpret_cast<const uint8_t*>(mask);
  at::parallel_for(0, numel, at::internal::GRAIN_SIZE, [=](int64_t begin, int64_t end) {
    mask_span(src + begin, keep + begin, out + begin, end - begin);
  });
}

// Writes where(mask, src, 0) into `out`; all three contiguous with the same number of elements.
void apply_mask(const Tensor& src, const Tensor& mask, Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "apply_mask", [&] {
    mask_kernel<scalar_t>(src.const_data_ptr<scalar_t>(), mask.const_data_ptr<bool>(),
                          out.mutable_data_ptr<scalar_t>(), src.numel());
  });
}

// ---------------------------------------------------------------------------------------------
// masked_linear

// The products are tiled so that the masked weight never exists whole: each thread masks one
// tile of the weight into a small buffer that stays in its L2 cache and multiplies it at once
// (ATen's mm_out, i.e. MKL, writing straight into the output). This avoids a weight-sized
// temporary, which for a 4096x4096 fp32 layer is 64 MiB written, and page-faulted in afresh, on
// every call; the op then reads about what the dense layer reads, plus a quarter for the mask.

constexpr int64_t kTileBytes = 512 * 1024;      // about half of a current x86 core's L2
constexpr int64_t kMaxTileBytes = 8 * 1024 * 1024;  // bounds the per-thread scratch memory
constexpr int64_t kMaxRowsPerTile = 256;          // past this the products are compute bound

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// How many tiles to cut a dimension of `extent` slices into, one slice being `slice` elements of
// `elem_size` bytes, when the other operand has `rows` rows. A tile holds about kTileBytes, but
// at least min(rows, kMaxRowsPerTile) slices (every tile re-reads the other operand, which
// should cost no more than the tile) and at most kMaxTileBytes; the tile count is a multiple of
// the thread count, for equal work.
int64_t tile_count(int64_t extent, int64_t slice, int64_t rows, int64_t elem_size) {
  if (extent <= 0) {
    return 0;
  }
  const int64_t slice_bytes = std::max<int64_t>(1, slice * elem_size);
  int64_t width = std::max<int64_t>({8, kTileBytes / slice_bytes, std::min(rows, kMaxRowsPerTile)});
  width = std::max<int64_t>(1, std::min(width, kMaxTileBytes / slice_bytes));
  int64_t tiles = ceil_div(extent, width);
  if (tiles > 1) {
    const int64_t threads = at::get_num_threads();
    tiles = ceil_div(tiles, threads) * threads;
  }
  return std::min(tiles, extent);
}

// Cuts [0, extent) into `tiles` tiles of equal width and runs fn(start, size) for each. One
// tile runs directly, so that MKL may use all threads inside it; several tiles are spread over
// the threads, one MKL thread each. The ATen calls inside fn need this thread's dispatch state
// (below autograd, grad mode) on the worker threads too, or mm_out would see tensors that
// require grad and refuse.
template <typename Fn>
void for_each_tile(int64_t extent, int64_t tiles, const Fn& fn) {
  if (tiles <= 0) {
    return;
  }
  const int64_t width = ceil_div(extent, tiles);
  const auto run = [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t start = t * width, size = std::min(width, extent - start);
      if (size <= 0) {
        break;  // rounding the tile count up to the threads can leave the last tiles empty
      }
      fn(start, size);
    }
  };
  if (tiles == 1) {
    run(0, 1);
    return;
  }
  const at::ThreadLocalState state;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard guard(state);
    run(begin, end);
  });
}

// A [rows, cols] tile buffer in this thread's scratch memory, grown on demand and kept for the
// thread's lifetime. Allocating it afresh on every call costs more than the masking itself on
// machines where fresh pages fault expensively (a 0.5 MiB buffer is 128 page faults). One buffer
// per thread is live at a time, at most kMaxTileBytes.
template <typename scalar_t>
Tensor scratch_tile(int64_t rows, int64_t cols, const at::TensorOptions& options) {
  thread_local std::vector<scalar_t> storage;
  const size_t numel = static_cast<size_t>(rows * cols);
  if (storage.size() < numel) {
    storage.resize(numel);
  }
  return at::from_blob(storage.data(), {rows, cols}, options);
}

// where(mask, w, 0)[r0 : r0 + r] into a scratch tile of r whole weight rows.
template <typename scalar_t>
Tensor masked_rows(const Tensor& w, const uint8_t* keep, int64_t r0, int64_t r) {
  const int64_t in_f = w.size(1);
  Tensor tile = scratch_tile<scalar_t>(r, in_f, w.options());
  mask_span(w.const_data_ptr<scalar_t>() + r0 * in_f, keep + r0 * in_f,
            tile.mutable_data_ptr<scalar_t>(), r * in_f);
  return tile;
}

// y[:, rows of tile] = x2 @ where(mask, w, 0)[rows of tile]^T (+ bias), tiles over output rows.
template <typename scalar_t>
void linear_forward(const Tensor& x2, const Tensor& w, const uint8_t* keep,
                    const std::optional<Tensor>& bias, Tensor& y) {
  const int64_t out_f = w.size(0);
  const int64_t tiles = tile_count(out_f, w.size(1), x2.size(0), sizeof(scalar_t));
  for_each_tile(out_f, tiles, [&](int64_t r0, int64_t r) {
    const Tensor tile = masked_rows<scalar_t>(w, keep, r0, r);
    Tensor out = y.narrow(1, r0, r);
    if (bias.has_value()) {
      at::addmm_out(out, bias->narrow(0, r0, r), x2, tile.t());
    } else {
      at::mm_out(out, x2, tile.t());
    }
  });
}

// grad_x2 = g2 @ where(mask, w, 0). Two tilings:
// * tiles of whole weight rows, read contiguously like the forward; each thread sums its tiles'
//   products g2[:, tile] @ tile into its own partial [rows, in_f] sum, and the partial sums are
//   added at the end. Measured as fast as the dense product or faster from 1 to 256 rows;
// * tiles of weight columns, each product written straight into its own columns of grad_x2:
//   slower (short strided reads of the weight) but needs no partial sums, so it takes over when
//   those would need more than kMaxPartialBytes (large batches on many threads).
constexpr int64_t kMaxPartialBytes = 16 * 1024 * 1024;

template <typename scalar_t>
void linear_grad_input_by_rows(const Tensor& g2, const Tensor& w, const uint8_t* keep,
                               Tensor& grad_x2) {
  const int64_t out_f = w.size(0), in_f = w.size(1), rows = g2.size(0);
  const int64_t tiles = tile_count(out_f, in_f, rows, sizeof(scalar_t));
  Tensor partial = at::zeros({tiles == 1 ? 1 : at::get_num_threads(), rows, in_f},
                             grad_x2.options());
  for_each_tile(out_f, tiles, [&](int64_t r0, int64_t r) {
    Tensor sum = partial[tiles == 1 ? 0 : at::get_thread_num()];
    sum.addmm_(g2.narrow(1, r0, r), masked_rows<scalar_t>(w, keep, r0, r));
  });
  at::sum_out(grad_x2, partial, {0});
}

template <typename scalar_t>
void linear_grad_input_by_columns(const Tensor& g2, const Tensor& w, const uint8_t* keep,
                                  Tensor& grad_x2) {
  const int64_t out_f = w.size(0), in_f = w.size(1);
  const scalar_t* wp = w.const_data_ptr<scalar_t>();
  const int64_t tiles = tile_count(in_f, out_f, g2.size(0), sizeof(scalar_t));
  for_each_tile(in_f, tiles, [&](int64_t c0, int64_t c) {
    Tensor tile = scratch_tile<scalar_t>(out_f, c, w.options());
    scalar_t* tp = tile.mutable_data_ptr<scalar_t>();
    for (int64_t o = 0; o < out_f; ++o) {
      mask_span(wp + o * in_f + c0, keep + o * in_f + c0, tp + o * c, c);
    }
    Tensor out = grad_x2.narrow(1, c0, c);
    at::mm_out(out, g2, tile);
  });
}

template <typename scalar_t>
void linear_grad_input(const Tensor& g2, const Tensor& w, const uint8_t* keep, Tensor& grad_x2) {
  if (w.size(0) == 0 || w.size(1) == 0) {
    grad_x2.zero_();
  } else if (at::get_num_threads() * g2.size(0) * w.size(1) * int64_t(sizeof(scalar_t)) <=
             kMaxPartialBytes) {
    linear_grad_input_by_rows<scalar_t>(g2, w, keep, grad_x2);
  } else {
    linear_grad_input_by_columns<scalar_t>(g2, w, keep, grad_x2);
  }
}

// grad_w[rows of tile] = g2[:, rows of tile]^T @ x2, masked while the tile is still in cache.
template <typename scalar_t>
void linear_grad_weight(const Tensor& g2, const Tensor& x2, const uint8_t* keep, Tensor& grad_w) {
  const int64_t out_f = grad_w.size(0), in_f = grad_w.size(1);
  scalar_t* gp = grad_w.mutable_data_ptr<scalar_t>();
  const int64_t tiles = tile_count(out_f, in_f, x2.size(0), sizeof(scalar_t));
  for_each_tile(out_f, tiles, [&](int64_t r0, int64_t r) {
    Tensor out = grad_w.narrow(0, r0, r);
    at::mm_out(out, g2.narrow(1, r0, r).t(), x2);
    mask_span(gp + r0 * in_f, keep + r0 * in_f, gp + r0 * in_f, r * in_f);
  });
}

const uint8_t* mask_bytes(const Tensor& contiguous_mask) {
  return reinterpret_cast<const uint8_t*>(contiguous_mask.const_data_ptr<bool>());
}

Tensor masked_linear_cpu(const Tensor& x, const Tensor& weight, const Tensor& mask,
                         const std::optional<Tensor>& bias) {
  const char* op = "masked_linear";
  check_masked_linear(op, x, weight, mask);
  if (bias.has_value()) {
    check_bias(op, *bias, weight);
  }
  const int64_t rows = batch_rows(x);
  const Tensor w = weight.contiguous(), m = mask.contiguous();
  const Tensor x2 = x.reshape({rows, weight.size(1)});  // a view unless x is non-contiguous
  Tensor y2 = at::empty({rows, weight.size(0)}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "masked_linear", [&] {
    linear_forward<scalar_t>(x2, w, mask_bytes(m), bias, y2);
  });
  return y2.view(masked_linear_out_sizes(x, weight));
}

std::tuple<Tensor, Tensor, Tensor> masked_linear_backward_cpu(
    const Tensor& grad_out, const Tensor& x, const Tensor& weight, const Tensor& mask,
    std::array<bool, 3> output_mask) {
  const char* op = "masked_linear_backward";
  check_masked_linear(op, x, weight, mask);
  check_grad_out(op, grad_out, masked_linear_out_sizes(x, weight), weight);

  const int64_t rows = batch_rows(x);
  const Tensor w = weight.contiguous(), m = mask.contiguous();
  const Tensor g2 = grad_out.reshape({rows, weight.size(0)});
  Tensor grad_x, grad_weight, grad_bias;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "masked_linear_backward", [&] {
    if (output_mask[0]) {
      Tensor grad_x2 = at::empty({rows, weight.size(1)}, x.options());
      linear_grad_input<scalar_t>(g2, w, mask_bytes(m), grad_x2);
      grad_x = grad_x2.view(x.sizes());
    }
    if (output_mask[1]) {
      grad_weight = at::empty(weight.sizes(), weight.options());
      linear_grad_weight<scalar_t>(g2, x.reshape({rows, weight.size(1)}), mask_bytes(m),
                                   grad_weight);
    }
  });
  if (output_mask[2]) {
    grad_bias = g2.sum(0);
  }
  return {or_empty(grad_x, x), or_empty(grad_weight, x), or_empty(grad_bias, x)};
}

// ---------------------------------------------------------------------------------------------
// masked_conv2d

Tensor masked_conv2d_cpu(const Tensor& x, const Tensor& weight, const Tensor& mask,
                         const std::optional<Tensor>& bias, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const char* op = "masked_conv2d";
  check_masked_conv2d(op, x, weight, mask, stride, padding, dilation, groups);
  if (bias.has_value()) {
    check_bias(op, *bias, weight);
  }
  return masked_conv2d_dense(x, weight, mask, bias, stride, padding, dilation, groups,
                             apply_mask);
}

std::tuple<Tensor, Tensor, Tensor> masked_conv2d_backward_cpu(
    const Tensor& grad_out, const Tensor& x, const Tensor& weight, const Tensor& mask,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask) {
  const char* op = "masked_conv2d_backward";
  check_masked_conv2d(op, x, weight, mask, stride, padding, dilation, groups);
  check_grad_out(op, grad_out, masked_conv2d_out_sizes(x, weight, stride, padding, dilation),
                 weight);
  const auto [grad_x, grad_weight, grad_bias] = masked_conv2d_backward_dense(
      grad_out, x, weight, mask, stride, padding, dilation, groups, output_mask, apply_mask);
  return {or_empty(grad_x, x), or_empty(grad_weight, x), or_empty(grad_bias, x)};
}

}  // namespace
}  // namespace torchprune

TORCH_LIBRARY_IMPL(torchprune, CPU, m) {
  m.impl("masked_linear", &torchprune::masked_linear_cpu);
  m.impl("masked_linear_backward", &torchprune::masked_linear_backward_cpu);
  m.impl("masked_conv2d", &torchprune::masked_conv2d_cpu);
  m.impl("masked_conv2d_backward", &torchprune::masked_conv2d_backward_cpu);
}
