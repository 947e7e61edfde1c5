// sparse_conv2d on CPU: a groups=1 convolution whose weight [O, C, kh, kw] is packed as CSR over
// [O, C*kh*kw], and its backward.
//
// The forward is a direct sparse convolution: the input is padded and split into stride phases
// once, each stored weight gets the offset of the input it meets, and the register-tiled kernel
// of sparse_linear multiplies every output channel's taps straight out of the image, writing the
// output rows [O, Ho*Wo] in place. (Unfolding the images with at::im2col first cost more than the
// product itself here, and its power-of-two row strides thrashed the caches; unfolding 32-pixel
// panels on the fly still spent about half the time copying.) The backward works on the whole
// batch at once: the value gradient is one SDDMM over all images' columns, the input gradient a
// transposed product folded back with col2im.
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
#include "common/op_helpers.h"
#include "common/sparse_checks.h"
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
  check_sparse_conv2d_args(op, x, kernel_size, stride, padding, dilation);
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

struct Window {
  int64_t sh, sw, ph, pw, dh, dw;
};

// The input zero-padded and split into its stride phases, [B, C, sh, sw, Hq, Wq] with
// phase[.., a, b, h, w] = padded[.., h * sh + a, w * sw + b]. In it, the inputs that kernel tap
// (i, j) meets along an output row are contiguous, whatever the stride, dilation and padding.
struct Phases {
  at::Tensor planes;
  int64_t hq, wq;
};

Phases split_phases(const Tensor& x, const Geometry& g, const Window& win, bool spare_row) {
  // With spare_row, one more zero row per phase plane: tiles that run across rows of the padded
  // width read up to kw - 1 elements past a plane's last row.
  const int64_t hq = (g.height + 2 * win.ph + win.sh - 1) / win.sh + (spare_row ? 1 : 0);
  const int64_t wq = (g.width + 2 * win.pw + win.sw - 1) / win.sw;
  const Tensor padded = at::constant_pad_nd(
      x, {win.pw, wq * win.sw - g.width - win.pw, win.ph, hq * win.sh - g.height - win.ph});
  return {padded.view({g.batch, g.channels, hq, win.sh, wq, win.sw})
              .permute({0, 1, 3, 5, 2, 4})
              .contiguous(),
          hq, wq};
}

// Offset into one image's phases of the input that stored entry e (column k = (c, i, j))
// multiplies for output pixel (0, 0); pixel (oh, ow) adds oh * Wq + ow.
template <typename I>
std::vector<int32_t> entry_offsets(const I* col, int64_t nnz, const Geometry& g,
                                   const Window& win, const Phases& ph) {
  TORCH_CHECK(g.channels * win.sh * win.sw * ph.hq * ph.wq < (int64_t(1) << 31), kForward,
              ": `x` must have fewer than 2^31 elements per image after padding");
  std::vector<int32_t> offsets(static_cast<size_t>(nnz));
  for (int64_t e = 0; e < nnz; ++e) {
    const int64_t k = col[e], c = k / (g.kh * g.kw), i = (k / g.kw) % g.kh, j = k % g.kw;
    const int64_t ti = i * win.dh, tj = j * win.dw;
    const int64_t plane = (c * win.sh + ti % win.sh) * win.sw + tj % win.sw;
    offsets[e] = static_cast<int32_t>(plane * ph.hq * ph.wq + (ti / win.sh) * ph.wq + tj / win.sw);
  }
  return offsets;
}

// A direct sparse convolution (SkimCaffe-style): work items are (image, output row, segment of
// up to 32 pixels), and each multiplies every output channel's stored taps straight out of the
// phase planes with spmm_offsets. A 1x1, stride-1, unpadded conv reads the input itself, with
// segments that run on across output rows.
template <typename T, typename I>
void forward(const Csr<T, I>& a, const Tensor& x, const T* bias, const Geometry& g,
             const Window& win, Tensor& out) {
  constexpr int64_t w = cpu::kPanelWidth<T>;
  const int64_t o = a.rows, pixels = g.pixels(), nnz = a.row_ptr[o];
  const int64_t threads = cpu::useful_threads((nnz + o) * pixels * g.batch);
  T* y = out.data_ptr<T>();
  const bool direct = reads_input_as_columns(g, {win.sh, win.sw}, {win.ph, win.pw});
  // Output rows shorter than a tile: tiles run over "virtual" pixels oh * Wq + ow of the padded
  // width instead (contiguous in the phase planes too) and drop the ow >= Wo ones, so that each
  // pass over the weights feeds full registers rather than one short row.
  const bool wrap = !direct && g.out_w < w;
  Phases ph;
  std::vector<int32_t> offsets;
  if (!direct) {
    ph = split_phases(x, g, win, /*spare_row=*/wrap);
    offsets = entry_offsets(a.col, nnz, g, win, ph);
  }
  const T* xs = direct ? x.data_ptr<T>() : ph.planes.data_ptr<T>();
  const int64_t image_size = direct ? g.channels * pixels : ph.planes.numel() / g.batch;
  const int64_t virtual_pixels = direct ? pixels : g.out_h * ph.wq;
  const int64_t per_row = (g.out_w + w - 1) / w;
  const int64_t segments = direct || wrap ? (virtual_pixels + w - 1) / w : g.out_h * per_row;
  auto run = [&](int64_t item) {
    const int64_t image = item / segments, segment = item % segments;
    const T* x_image = xs + image * image_size;
    T* y_image = y + image * o * pixels;
    if (direct) {
      const int64_t t0 = segment * w;
      cpu::spmm(a, x_image + t0, pixels, std::min(w, pixels - t0), bias, y_image + t0, pixels, 1,
                0, o);
      return;
    }
    if (wrap) {
      const int64_t v0 = segment * w, width = std::min(w, virtual_pixels - v0);
      thread_local std::vector<T> tile;
      tile.resize(static_cast<size_t>(o * w));
      cpu::spmm_offsets(a.row_ptr, offsets.data(), a.val, x_image + v0, width, bias, tile.data(), w,
                        0, o);
      for (int64_t t = 0; t < width; ++t) {
        const int64_t oh = (v0 + t) / ph.wq, ow = (v0 + t) % ph.wq;
        if (ow >= g.out_w) continue;
        T* dst = y_image + oh * g.out_w + ow;
        for (int64_t n = 0; n < o; ++n) dst[n * pixels] = tile[n * w + t];
      }
      return;
    }
    const int64_t oh = segment / per_row, ow0 = (segment % per_row) * w;
    cpu::spmm_offsets(a.row_ptr, offsets.data(), a.val, x_image + oh * ph.wq + ow0,
                      std::min(w, g.out_w - ow0), bias, y_image + oh * g.out_w + ow0, pixels, 0,
                      o);
  };
  cpu::for_items(g.batch * segments, threads, run);
}

Tensor sparse_conv2d_cpu(const Tensor& x, const Tensor& row_ptr, const Tensor& col_idx,
                         const Tensor& values, IntArrayRef kernel_size,
                         const std::optional<Tensor>& bias, IntArrayRef stride,
                         IntArrayRef padding, IntArrayRef dilation) {
  const Geometry g = check_inputs(kForward, x, row_ptr, col_idx, values, kernel_size, stride,
                                  padding, dilation);
  const int64_t o = row_ptr.numel() - 1;
  if (bias.has_value()) {
    check_sparse_bias(kForward, *bias, o, "out_channels", x);
  }
  if (is_half(x)) {
    return forward_in_float32(x, values, bias, [&](const Tensor& x32, const Tensor& v32,
                                                   const std::optional<Tensor>& b32) {
      return sparse_conv2d_cpu(x32, row_ptr, col_idx, v32, kernel_size, b32, stride, padding,
                               dilation);
    });
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
  check_sparse_grad_out(kBackward, grad_out, {g.batch, o, g.out_h, g.out_w}, x);
  if (is_half(x)) {
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
        cpu::for_items(threads * 4, threads, [&](int64_t p) {
          cpu::sddmm(a, grad_t.data_ptr<scalar_t>(), bl, cols_t.data_ptr<scalar_t>(), bl, bl,
                     grad_values.data_ptr<scalar_t>(), panels[p], panels[p + 1]);
        });
      }
      if (output_mask[0]) {
        // Threads own disjoint column chunks of grad_cols [K, B*L], so the scatter never races.
        Tensor grad_cols = at::zeros({k, bl}, x.options());
        const int64_t chunks = (bl + kColumnChunk - 1) / kColumnChunk;
        cpu::for_items(chunks, threads, [&](int64_t c) {
          const int64_t t0 = c * kColumnChunk;
          cpu::spmm_transposed(a, grad_t.data_ptr<scalar_t>() + t0, bl,
                               std::min(kColumnChunk, bl - t0), grad_cols.data_ptr<scalar_t>() + t0,
                               bl, 0, o);
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
