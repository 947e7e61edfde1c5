// sparse_conv2d on CPU: a groups=1 convolution whose weight [O, C, kh, kw] is packed as CSR over
// [O, C*kh*kw], and its backward.
//
// The forward is an implicit im2col: for each tile of 32 output pixels it unfolds just the
// columns [C*kh*kw, 32] that tile needs into a cache-resident panel and multiplies the sparse
// weight into it with the register-tiled spmm of sparse_linear, writing the output rows
// [O, Ho*Wo] in place. (Unfolding whole images first with at::im2col cost more than the product
// itself here, and its power-of-two row strides thrashed the caches.) The backward works on the
// whole batch at once: the value gradient is one SDDMM over all images' columns, the input
// gradient a transposed product folded back with col2im.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "common/csr.h"
#include "cpu/spmm.h"

namespace torchprune {
namespace {

using at::IntArrayRef;
using at::Tensor;

constexpr const char* kForward = "sparse_conv2d";
constexpr const char* kBackward = "sparse_conv2d_backward";
constexpr int64_t kColumnChunk = 256;  // columns of grad_cols per backward work item

struct Geometry {
  int64_t batch, channels, height, width, kh, kw, out_h, out_w;
  int64_t k() const { return channels * kh * kw; }
  int64_t pixels() const { return out_h * out_w; }
};

Geometry check_inputs(const char* op, const Tensor& x, const Tensor& row_ptr,
                      const Tensor& col_idx, const Tensor& values, IntArrayRef kernel_size,
                      IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation) {
  check_dim(op, "x", x, 4);
  check_floating(op, "x", x);
  check_pair(op, "kernel_size", kernel_size, 1);
  check_pair(op, "stride", stride, 1);
  check_pair(op, "padding", padding, 0);
  check_pair(op, "dilation", dilation, 1);
  Geometry g{x.size(0), x.size(1), x.size(2), x.size(3), kernel_size[0], kernel_size[1], 0, 0};
  check_csr(op, row_ptr, col_idx, values, g.k(), /*structure=*/false);
  check_like(op, "values", values, "x", x);
  const int64_t span_h = dilation[0] * (g.kh - 1) + 1, span_w = dilation[1] * (g.kw - 1) + 1;
  TORCH_CHECK(g.height + 2 * padding[0] >= span_h && g.width + 2 * padding[1] >= span_w, op,
              ": `x` must be at least as large as the dilated kernel (", span_h, "x", span_w,
              ") after padding, got spatial size ", g.height, "x", g.width);
  g.out_h = (g.height + 2 * padding[0] - span_h) / stride[0] + 1;
  g.out_w = (g.width + 2 * padding[1] - span_w) / stride[1] + 1;
  return g;
}

bool reads_input_as_columns(const Geometry& g, IntArrayRef stride, IntArrayRef padding) {
  return g.kh == 1 && g.kw == 1 && stride[0] == 1 && stride[1] == 1 && padding[0] == 0 &&
         padding[1] == 0;
}

// [B, C*kh*kw, Ho*Wo]
Tensor columns(const Tensor& x, const Geometry& g, IntArrayRef stride, IntArrayRef padding,
               IntArrayRef dilation) {
  if (reads_input_as_columns(g, stride, padding)) {
    return x.reshape({g.batch, g.channels, g.height * g.width});
  }
  return at::im2col(x, {g.kh, g.kw}, dilation, padding, stride);
}

// ceil(a / b) for b > 0 and any sign of a.
int64_t ceil_div(int64_t a, int64_t b) { return a >= 0 ? (a + b - 1) / b : -((-a) / b); }

struct Window {
  int64_t sh, sw, ph, pw, dh, dw;
};

// Columns [K, W] of output pixels [t0, t0 + width) of one image, W = kPanelWidth: the slice of
// im2col that one spmm tile reads, built in cache right before it is read. Pixels run along
// output rows, so for stride 1 each (channel, kernel offset) is a contiguous copy with zeros at
// the borders.
template <typename T>
void fill_panel(const T* image, const Geometry& g, const Window& win, int64_t t0, int64_t width,
                T* panel) {
  constexpr int64_t w = cpu::kPanelWidth<T>;
  for (int64_t c = 0; c < g.channels; ++c) {
    const T* plane = image + c * g.height * g.width;
    for (int64_t i = 0; i < g.kh; ++i) {
      for (int64_t j = 0; j < g.kw; ++j) {
        T* dst = panel + ((c * g.kh + i) * g.kw + j) * w;
        int64_t t = 0;
        while (t < width) {  // one output row segment at a time
          const int64_t pixel = t0 + t, oh = pixel / g.out_w, ow0 = pixel % g.out_w;
          const int64_t count = std::min(width - t, g.out_w - ow0);
          const int64_t ih = oh * win.sh - win.ph + i * win.dh;
          if (ih < 0 || ih >= g.height) {
            std::fill(dst + t, dst + t + count, T(0));
          } else {
            // Output pixels ow0 + q with q in [lo, hi) read inside the row; the rest are padding.
            const T* src = plane + ih * g.width;
            const int64_t offset = j * win.dw - win.pw;  // iw = (ow0 + q) * sw + offset
            const int64_t lo = std::clamp(ceil_div(-offset, win.sw) - ow0, int64_t(0), count);
            const int64_t hi =
                std::clamp(ceil_div(g.width - offset, win.sw) - ow0, lo, count);
            std::fill(dst + t, dst + t + lo, T(0));
            if (win.sw == 1) {
              std::copy(src + ow0 + lo + offset, src + ow0 + hi + offset, dst + t + lo);
            } else {
              for (int64_t q = lo; q < hi; ++q) dst[t + q] = src[(ow0 + q) * win.sw + offset];
            }
            std::fill(dst + t + hi, dst + t + count, T(0));
          }
          t += count;
        }
      }
    }
  }
}

// Work items are (image, pixel tile): each builds its panel in this thread's scratch memory
// and multiplies every output channel's row into it.
template <typename T, typename I>
void forward(const Csr<T, I>& a, const Tensor& x, const T* bias, const Geometry& g,
             const Window& win, Tensor& out) {
  constexpr int64_t w = cpu::kPanelWidth<T>;
  const int64_t o = a.rows, pixels = g.pixels(), tiles = (pixels + w - 1) / w;
  const int64_t work = (a.row_ptr[o] + o) * pixels * g.batch + g.k() * pixels * g.batch;
  const int64_t threads = cpu::useful_threads(work);
  const T* xs = x.data_ptr<T>();
  T* y = out.data_ptr<T>();
  const bool direct = g.kh == 1 && g.kw == 1 && win.sh == 1 && win.sw == 1 && win.ph == 0 &&
                      win.pw == 0;
  auto run = [&](int64_t item) {
    const int64_t image = item / tiles, t0 = (item % tiles) * w;
    const int64_t width = std::min(w, pixels - t0);
    const T* x_image = xs + image * g.channels * g.height * g.width;
    T* y_tile = y + image * o * pixels + t0;
    if (direct) {  // a 1x1, stride-1, unpadded conv: the image [C, H*W] is its own im2col
      cpu::spmm(a, x_image + t0, pixels, width, bias, y_tile, pixels, 1, 0, o);
      return;
    }
    thread_local std::vector<T> panel;
    panel.resize(static_cast<size_t>(g.k() * w));
    fill_panel(x_image, g, win, t0, width, panel.data());
    cpu::spmm(a, panel.data(), w, width, bias, y_tile, pixels, 1, 0, o);
  };
  const int64_t items = g.batch * tiles;
  if (threads <= 1) {
    for (int64_t i = 0; i < items; ++i) run(i);
  } else {
    at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) run(i);
    });
  }
}

Tensor sparse_conv2d_cpu(const Tensor& x, const Tensor& row_ptr, const Tensor& col_idx,
                         const Tensor& values, IntArrayRef kernel_size,
                         const std::optional<Tensor>& bias, IntArrayRef stride,
                         IntArrayRef padding, IntArrayRef dilation) {
  const Geometry g = check_inputs(kForward, x, row_ptr, col_idx, values, kernel_size, stride,
                                  padding, dilation);
  const int64_t o = row_ptr.numel() - 1;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == o, kForward, ": `bias` must have shape [",
                o, "] (out_channels), got ", shape_str(bias->sizes()));
    check_like(kForward, "bias", *bias, "x", x);
  }
  if (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16) {
    const auto bias32 = bias.has_value() ? std::optional<Tensor>(bias->to(at::kFloat))
                                         : std::nullopt;
    return sparse_conv2d_cpu(x.to(at::kFloat), row_ptr, col_idx, values.to(at::kFloat),
                             kernel_size, bias32, stride, padding, dilation)
        .to(x.scalar_type());
  }
  Tensor out = at::empty({g.batch, o, g.out_h, g.out_w}, x.options());
  if (out.numel() == 0) {
    return out;
  }
  const Tensor xc = x.contiguous();
  const Tensor bias_c = bias.has_value() ? bias->contiguous() : Tensor();
  const Window win{stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1]};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), kForward, [&] {
    with_csr<scalar_t>(row_ptr, col_idx, values, g.k(), [&](const auto& a) {
      forward(a, xc, bias_c.defined() ? bias_c.data_ptr<scalar_t>() : nullptr, g, win, out);
    });
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> sparse_conv2d_backward_cpu(
    const Tensor& grad_out, const Tensor& x, const Tensor& row_ptr, const Tensor& col_idx,
    const Tensor& values, IntArrayRef kernel_size, IntArrayRef stride, IntArrayRef padding,
    IntArrayRef dilation, std::array<bool, 3> output_mask) {
  const Geometry g = check_inputs(kBackward, x, row_ptr, col_idx, values, kernel_size, stride,
                                  padding, dilation);
  const int64_t o = row_ptr.numel() - 1;
  check_like(kBackward, "grad_out", grad_out, "x", x);
  const std::array<int64_t, 4> expected{g.batch, o, g.out_h, g.out_w};
  TORCH_CHECK(grad_out.sizes() == IntArrayRef(expected), kBackward,
              ": `grad_out` must have shape ", shape_str(expected), ", got ",
              shape_str(grad_out.sizes()));
  if (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16) {
    auto [gx, gv, gb] = sparse_conv2d_backward_cpu(
        grad_out.to(at::kFloat), x.to(at::kFloat), row_ptr, col_idx, values.to(at::kFloat),
        kernel_size, stride, padding, dilation, output_mask);
    const auto dtype = x.scalar_type();
    return {gx.to(dtype), gv.to(dtype), gb.to(dtype)};
  }
  const auto empty = at::empty({0}, x.options());
  Tensor grad_x = output_mask[0] ? at::zeros_like(x, at::MemoryFormat::Contiguous) : empty;
  Tensor grad_values = output_mask[1] ? at::zeros_like(values) : empty;
  const Tensor grad_bias = output_mask[2] ? grad_out.sum({0, 2, 3}) : empty;
  const int64_t bl = g.batch * g.pixels(), k = g.k();
  if (bl == 0 || o == 0 || k == 0 || !(output_mask[0] || output_mask[1])) {
    return {grad_x, grad_values, grad_bias};
  }
  // Both operands with the whole batch along one axis: grad [O, B*L] and columns [K, B*L].
  const Tensor grad_t = grad_out.reshape({g.batch, o, g.pixels()}).permute({1, 0, 2}).contiguous();
  const int64_t threads = cpu::useful_threads((values.numel() + o) * bl);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), kBackward, [&] {
    with_csr<scalar_t>(row_ptr, col_idx, values, k, [&](const auto& a) {
      if (output_mask[1]) {
        const Tensor cols_t = columns(x.contiguous(), g, stride, padding, dilation)
                                  .permute({1, 0, 2})
                                  .contiguous();
        const auto panels = cpu::row_panels(a.row_ptr, o, threads * 4);
        at::parallel_for(0, threads * 4, 1, [&](int64_t p0, int64_t p1) {
          for (int64_t p = p0; p < p1; ++p) {
            cpu::sddmm(a, grad_t.data_ptr<scalar_t>(), bl, cols_t.data_ptr<scalar_t>(), bl, bl,
                       grad_values.data_ptr<scalar_t>(), panels[p], panels[p + 1]);
          }
        });
      }
      if (output_mask[0]) {
        // Threads own disjoint column chunks of grad_cols [K, B*L], so the scatter never races.
        Tensor grad_cols = at::zeros({k, bl}, x.options());
        const int64_t chunks = (bl + kColumnChunk - 1) / kColumnChunk;
        at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
          for (int64_t c = c0; c < c1; ++c) {
            const int64_t t0 = c * kColumnChunk;
            cpu::spmm_transposed(a, grad_t.data_ptr<scalar_t>() + t0, bl,
                                 std::min(kColumnChunk, bl - t0),
                                 grad_cols.data_ptr<scalar_t>() + t0, bl, 0, o);
          }
        });
        const Tensor per_image = grad_cols.view({k, g.batch, g.pixels()}).permute({1, 0, 2});
        grad_x.copy_(at::col2im(per_image.contiguous(), {g.height, g.width}, {g.kh, g.kw},
                                dilation, padding, stride));
      }
    });
  });
  return {grad_x, grad_values, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchprune, CPU, m) {
  m.impl("sparse_conv2d", &sparse_conv2d_cpu);
  m.impl("sparse_conv2d_backward", &sparse_conv2d_backward_cpu);
}

}  // namespace torchprune
