// The packed-sparse ops on CUDA: argument checks (the CPU ops' checks and messages), the current
// stream, and calls into the kernels of pack.cu, spmm.cu and sparse_conv.cu (sparse_kernels.h).
// Compiled in CUDA builds only.
//
// - sparse_linear: batches up to kGatherMaxBatch run the gather kernel on x as it comes, up to
//   kSlicedGatherMaxBatch the same kernel once per slice of kGatherMaxBatch rows; larger ones the
//   tiled kernel on Xᵀ (one transpose copy), which writes y in [batch, rows] order.
// - Its input gradient is the same product with Wᵀ, packed on the fly as CSR by a stable sort of
//   the column indices (entries of a column in row order): deterministic, no atomics, float
//   accumulation for the half types. Its value gradient is an SDDMM.
// - sparse_conv2d's forward is the implicit-im2col kernel. Its backward reuses the linear
//   kernels on ATen's explicit im2col / col2im, a slice of the batch at a time so the column
//   buffers stay under kColumnBytes: value gradient = SDDMM(grad_out, columns), input gradient
//   = col2im(Wᵀ @ grad_out).
// - check_csr and unpack_csr walk the structure on the device and read one small result back.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/csr.h"
#include "common/op_helpers.h"
#include "common/sparse_checks.h"
#include "cuda/sparse_kernels.h"

namespace torchprune {
namespace {

using at::IntArrayRef;
using at::Tensor;

constexpr int64_t kColumnBytes = int64_t(256) << 20;  // per im2col / col2im buffer in the backward

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Calls fn(T*) with a null pointer of the CUDA type that holds `dtype`'s elements.
template <typename Fn>
void dispatch_floating(at::ScalarType dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case at::kFloat:
      fn(static_cast<float*>(nullptr));
      break;
    case at::kDouble:
      fn(static_cast<double*>(nullptr));
      break;
    case at::kHalf:
      fn(static_cast<__half*>(nullptr));
      break;
    case at::kBFloat16:
      fn(static_cast<__nv_bfloat16*>(nullptr));
      break;
    default:
      TORCH_CHECK(false, op, ": no CUDA kernel for ", dtype_str(dtype));
  }
}

template <typename T>
using Elem = std::remove_pointer_t<T>;

template <typename T>
const T* data(const Tensor& t) {
  return static_cast<const T*>(t.const_data_ptr());
}

template <typename T>
T* mutable_data(Tensor& t) {
  return static_cast<T*>(t.mutable_data_ptr());
}

template <typename T>
const T* data_or_null(const Tensor& t) {
  return t.defined() ? data<T>(t) : nullptr;
}

// The dtype that gpu::Acc<T> is.
at::ScalarType acc_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// Calls fn(CsrView<T, I>) with the column type that col_idx holds (int16 holds uint16 columns).
template <typename T, typename Fn>
void with_view(const Tensor& row_ptr, const Tensor& col_idx, const Tensor& values,
               int64_t cols, Fn&& fn) {
  const int64_t rows = row_ptr.numel() - 1, nnz = values.numel();
  if (col_idx.scalar_type() == at::kShort) {
    fn(gpu::CsrView<T, uint16_t>{data<int32_t>(row_ptr),
                                 reinterpret_cast<const uint16_t*>(data<int16_t>(col_idx)),
                                 data<T>(values), rows, cols, nnz});
  } else {
    fn(gpu::CsrView<T, int32_t>{data<int32_t>(row_ptr), data<int32_t>(col_idx), data<T>(values),
                                rows, cols, nnz});
  }
}

// ---------------------------------------------------------------------------------------------
// pack_csr, unpack_csr, check_csr

constexpr const char* kPack = "pack_csr";

// check_csr with structure=true for device tensors: the O(1) checks on the host, then the walk
// on the device and one read-back (a sync), with the CPU walk's messages.
void check_structure(const char* op, const Tensor& row_ptr, const Tensor& col_idx,
                     const Tensor& values, int64_t in_features) {
  check_csr(op, row_ptr, col_idx, values, in_features, /*structure=*/false);
  const c10::cuda::CUDAGuard guard(values.device());
  const int64_t rows = row_ptr.numel() - 1, nnz = values.numel();
  Tensor result = at::empty({3}, row_ptr.options().dtype(at::kLong));
  const auto walk = [&](const auto* col) {
    C10_CUDA_CHECK(gpu::check_structure(data<int32_t>(row_ptr), col, rows, nnz, in_features,
                                        mutable_data<int64_t>(result), current_stream()));
  };
  if (col_idx.scalar_type() == at::kShort) {
    walk(reinterpret_cast<const uint16_t*>(data<int16_t>(col_idx)));
  } else {
    walk(data<int32_t>(col_idx));
  }
  const Tensor host = result.cpu();
  const int64_t* r = host.const_data_ptr<int64_t>();
  TORCH_CHECK(r[0] == 0 && r[1] == nnz, op,
              ": `row_ptr` must start at 0 and end at the number of stored values (", nnz,
              "), got ", r[0], " and ", r[1]);
  const auto first_failure = static_cast<uint64_t>(r[2]);
  if (first_failure == std::numeric_limits<uint64_t>::max()) {
    return;
  }
  TORCH_CHECK((first_failure & 1) != 0, op,
              ": `row_ptr` must not decrease (nor exceed the number of stored values) and `col_idx` ",
              "must ascend within each row, as pack_csr writes them");
  TORCH_CHECK(false, op, ": `col_idx` must lie in [0, in_features) = [0, ", in_features, ")");
}

std::tuple<Tensor, Tensor, Tensor> pack_csr_cuda(const Tensor& weight,
                                                 const std::optional<Tensor>& mask) {
  check_dim(kPack, "weight", weight, 2);
  check_floating(kPack, "weight", weight);
  if (mask.has_value()) {
    check_mask(kPack, *mask, weight);
  }
  const c10::cuda::CUDAGuard guard(weight.device());
  const Tensor dense = weight.contiguous();
  const Tensor keep = mask.has_value() ? mask->contiguous() : Tensor();
  const bool* keep_ptr = keep.defined() ? keep.const_data_ptr<bool>() : nullptr;
  const int64_t rows = dense.size(0), cols = dense.size(1);
  const cudaStream_t stream = current_stream();

  Tensor counts = at::empty({rows}, dense.options().dtype(at::kLong));
  dispatch_floating(dense.scalar_type(), kPack, [&](auto* tag) {
    using T = Elem<decltype(tag)>;
    C10_CUDA_CHECK(gpu::pack_count<T>(data<T>(dense), keep_ptr, rows, cols,
                                      mutable_data<int64_t>(counts), stream));
  });
  const Tensor offsets = at::cat({at::zeros({1}, counts.options()), counts.cumsum(0)});
  const int64_t nnz = offsets[rows].item<int64_t>();
  TORCH_CHECK(nnz <= std::numeric_limits<int32_t>::max(), kPack,
              ": `weight` must have fewer than 2^31 entries to keep, got ", nnz);
  Tensor row_ptr = offsets.to(at::kInt);
  Tensor col_idx = at::empty({nnz}, dense.options().dtype(column_dtype(cols)));
  Tensor values = at::empty({nnz}, dense.options());
  dispatch_floating(dense.scalar_type(), kPack, [&](auto* tag) {
    using T = Elem<decltype(tag)>;
    if (col_idx.scalar_type() == at::kShort) {
      C10_CUDA_CHECK(gpu::pack_fill(
          data<T>(dense), keep_ptr, rows, cols, data<int32_t>(row_ptr),
          reinterpret_cast<uint16_t*>(mutable_data<int16_t>(col_idx)), mutable_data<T>(values),
          stream));
    } else {
      C10_CUDA_CHECK(gpu::pack_fill(data<T>(dense), keep_ptr, rows, cols,
                                                data<int32_t>(row_ptr),
                                                mutable_data<int32_t>(col_idx),
                                                mutable_data<T>(values), stream));
    }
  });
  return {row_ptr, col_idx, values};
}

Tensor unpack_csr_cuda(const Tensor& row_ptr, const Tensor& col_idx, const Tensor& values,
                       int64_t in_features) {
  check_structure("unpack_csr", row_ptr, col_idx, values, in_features);
  check_floating("unpack_csr", "values", values);
  const c10::cuda::CUDAGuard guard(values.device());
  const int64_t rows = row_ptr.numel() - 1;
  Tensor dense = at::zeros({rows, in_features}, values.options());
  dispatch_floating(values.scalar_type(), "unpack_csr", [&](auto* tag) {
    using T = Elem<decltype(tag)>;
    with_view<T>(row_ptr, col_idx, values, in_features, [&](const auto& a) {
      C10_CUDA_CHECK(gpu::unpack(a, mutable_data<T>(dense), current_stream()));
    });
  });
  return dense;
}

void check_csr_cuda(const Tensor& row_ptr, const Tensor& col_idx, const Tensor& values,
                    int64_t in_features) {
  check_structure("check_csr", row_ptr, col_idx, values, in_features);
}

// ---------------------------------------------------------------------------------------------
// sparse_linear

constexpr const char* kLinear = "sparse_linear";
constexpr const char* kLinearBackward = "sparse_linear_backward";

// Batches up to this size run the gather kernel on slices of kGatherMaxBatch rows (one launch
// each, reading the CSR again per slice) instead of the tiled kernel, whose warp per sparse row
// leaves half its lanes idle at M <= 16. Measured on an H200 at 90% (CUDA-graph replay, GPU
// time per call; two runs, one per path), tiled -> sliced at M = 16: fp32 4096x4096 54 -> 45 us,
// 768x3072 52 -> 21 us, 3072x768 14 -> 13 us; fp16 4096x4096 55 -> 48 us, 768x3072 52 -> 26
// us, 11008x4096 139 -> 115 us, but 3072x768 15 -> 25 us. At M = 24 and 32 the slices lost on
// 4096x4096 and 3072x768 (4096x4096 fp32: 67 and 90 us, against 60 us for tiled at M = 48).
constexpr int64_t kSlicedGatherMaxBatch = 16;

// out [m, rows] = x2 [m, cols] @ Aᵀ (+ bias), A = (row_ptr, col_idx, values) of `cols` columns;
// every tensor contiguous on the current device, m > 0.
void linear_product(const Tensor& x2, const Tensor& row_ptr, const Tensor& col_idx,
                    const Tensor& values, int64_t cols, const Tensor& bias, Tensor& out,
                    const char* op) {
  const int64_t m = x2.size(0), rows = row_ptr.numel() - 1;
  const cudaStream_t stream = current_stream();
  const bool sliced = m <= kSlicedGatherMaxBatch;
  // The tiled kernel reads the batch-contiguous Xᵀ [cols, m].
  const Tensor xt = sliced ? Tensor() : x2.t().contiguous();
  dispatch_floating(values.scalar_type(), op, [&](auto* tag) {
    using T = Elem<decltype(tag)>;
    with_view<T>(row_ptr, col_idx, values, cols, [&](const auto& a) {
      if (sliced) {
        for (int64_t r0 = 0; r0 < m; r0 += gpu::kGatherMaxBatch) {
          const int64_t slice = std::min(gpu::kGatherMaxBatch, m - r0);
          C10_CUDA_CHECK(gpu::spmm_gather(a, data<T>(x2) + r0 * cols, cols, slice,
                                          data_or_null<T>(bias), mutable_data<T>(out) + r0 * rows,
                                          rows, stream));
        }
      } else {
        C10_CUDA_CHECK(gpu::spmm_tiled(a, data<T>(xt), /*ldb=*/m, /*b_batch=*/0, m,
                                       /*batch=*/1, data_or_null<T>(bias), mutable_data<T>(out),
                                       /*c_row_stride=*/1, /*c_col_stride=*/rows,
                                       /*c_batch=*/0, stream));
      }
    });
  });
}

// Aᵀ as CSR [cols, rows] with int32 columns: entries sorted (stably) by column, so each new row
// lists its entries in ascending original row.
std::tuple<Tensor, Tensor, Tensor> transpose_csr(const Tensor& row_ptr, const Tensor& col_idx,
                                                 const Tensor& values, int64_t cols) {
  const int64_t rows = row_ptr.numel() - 1, nnz = values.numel();
  Tensor columns = col_idx.to(at::kInt);
  if (col_idx.scalar_type() == at::kShort) {
    columns = columns.bitwise_and(kMaxShortColumns - 1);  // the int16 holds an unsigned column
  }
  // std::optional<bool> names the (stable, dim) overload: a plain `true` would pick
  // sort(self, dim=1, descending=false) and fail on this 1-D tensor.
  const auto [sorted, order] = at::sort(columns, std::optional<bool>(true), /*dim=*/0);
  Tensor t_row_ptr = at::searchsorted(sorted, at::arange(cols + 1, columns.options()),
                                      /*out_int32=*/true);
  const Tensor counts = row_ptr.narrow(0, 1, rows) - row_ptr.narrow(0, 0, rows);
  const Tensor row_of =
      at::repeat_interleave(at::arange(rows, row_ptr.options()), counts, 0, nnz);
  return {t_row_ptr, row_of.index_select(0, order), values.index_select(0, order)};
}

Tensor sparse_linear_cuda(const Tensor& x, const Tensor& row_ptr, const Tensor& col_idx,
                          const Tensor& values, int64_t in_features,
                          const std::optional<Tensor>& bias) {
  check_sparse_linear(kLinear, x, row_ptr, col_idx, values, in_features);
  const int64_t n = row_ptr.numel() - 1;
  if (bias.has_value()) {
    check_sparse_bias(kLinear, *bias, n, "out_features", x);
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t m = batch_rows(x);
  Tensor out = at::empty({m, n}, x.options());
  if (m > 0 && n > 0) {
    const Tensor x2 = x.reshape({m, in_features}).contiguous();
    const Tensor bias_c = bias.has_value() ? bias->contiguous() : Tensor();
    linear_product(x2, row_ptr, col_idx, values, in_features, bias_c, out, kLinear);
  }
  return out.view(sparse_linear_out_sizes(x, n));
}

std::tuple<Tensor, Tensor, Tensor> sparse_linear_backward_cuda(
    const Tensor& grad_out, const Tensor& x, const Tensor& row_ptr, const Tensor& col_idx,
    const Tensor& values, int64_t in_features, std::array<bool, 3> output_mask) {
  check_sparse_linear(kLinearBackward, x, row_ptr, col_idx, values, in_features);
  const int64_t n = row_ptr.numel() - 1, k = in_features, nnz = values.numel();
  check_sparse_grad_out(kLinearBackward, grad_out, sparse_linear_out_sizes(x, n), x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t m = batch_rows(x);
  const Tensor grad2 = grad_out.reshape({m, n}).contiguous();
  const auto empty = at::empty({0}, x.options());
  Tensor grad_x = output_mask[0] ? at::zeros_like(x, at::MemoryFormat::Contiguous) : empty;
  Tensor grad_values = output_mask[1] ? at::zeros_like(values) : empty;
  const Tensor grad_bias = output_mask[2] ? grad2.sum(0) : empty;
  if (m == 0 || n == 0 || k == 0 || nnz == 0 || !(output_mask[0] || output_mask[1])) {
    return {grad_x, grad_values, grad_bias};
  }
  const Tensor x2 = x.reshape({m, k}).contiguous();
  if (output_mask[0]) {
    const auto [t_row_ptr, t_col_idx, t_values] = transpose_csr(row_ptr, col_idx, values, k);
    Tensor grad_x2 = grad_x.view({m, k});
    linear_product(grad2, t_row_ptr, t_col_idx, t_values, n, Tensor(), grad_x2, kLinearBackward);
  }
  if (output_mask[1]) {
    const cudaStream_t stream = current_stream();
    const bool gather = m <= gpu::kGatherMaxBatch;
    // [n, m] and [k, m]: batch-contiguous rows for the segmented SDDMM.
    const Tensor grad_t = gather ? Tensor() : grad2.t().contiguous();
    const Tensor xt = gather ? Tensor() : x2.t().contiguous();
    const int64_t segments = gather ? 1 : gpu::sddmm_segment_count(n, m);
    Tensor partial = gather ? Tensor()
                            : at::zeros({segments, nnz}, values.options().dtype(
                                                            acc_dtype(values.scalar_type())));
    dispatch_floating(values.scalar_type(), kLinearBackward, [&](auto* tag) {
      using T = Elem<decltype(tag)>;
      with_view<T>(row_ptr, col_idx, values, k, [&](const auto& a) {
        if (gather) {
          C10_CUDA_CHECK(gpu::sddmm_gather(a, data<T>(grad2), n, data<T>(x2), k, m,
                                           mutable_data<T>(grad_values), stream));
        } else {
          C10_CUDA_CHECK(gpu::sddmm_segments(a, data<T>(grad_t), /*ldp=*/m, /*p_batch=*/0,
                                             data<T>(xt), /*ldq=*/m, /*q_batch=*/0, /*len=*/m,
                                             /*batch=*/1, segments,
                                             mutable_data<gpu::Acc<T>>(partial), stream));
        }
      });
    });
    if (!gather) {
      grad_values = (segments == 1 ? partial[0] : partial.sum(0)).to(values.scalar_type());
    }
  }
  return {grad_x, grad_values, grad_bias};
}

// ---------------------------------------------------------------------------------------------
// sparse_conv2d

constexpr const char* kConv = "sparse_conv2d";
constexpr const char* kConvBackward = "sparse_conv2d_backward";

gpu::ConvShape check_conv_inputs(const char* op, const Tensor& x, const Tensor& row_ptr,
                                 const Tensor& col_idx, const Tensor& values,
                                 IntArrayRef kernel_size, IntArrayRef stride,
                                 IntArrayRef padding, IntArrayRef dilation) {
  check_sparse_conv2d_args(op, x, kernel_size, stride, padding, dilation);
  gpu::ConvShape s{x.size(0),      x.size(1),   x.size(2),   x.size(3),   kernel_size[0],
                   kernel_size[1], 0,           0,           stride[0],   stride[1],
                   padding[0],     padding[1],  dilation[0], dilation[1]};
  check_csr(op, row_ptr, col_idx, values, s.channels * s.kh * s.kw, /*structure=*/false);
  check_like(op, "values", values, "x", x);
  const int64_t span_h = s.dil_h * (s.kh - 1) + 1, span_w = s.dil_w * (s.kw - 1) + 1;
  TORCH_CHECK(s.height + 2 * s.pad_h >= span_h && s.width + 2 * s.pad_w >= span_w, op,
              ": `x` must be at least as large as the dilated kernel (", span_h, "x", span_w,
              ") after padding, got spatial size ", s.height, "x", s.width);
  // The kernel computes pixel coordinates in int.
  constexpr int64_t kMaxSide = int64_t(1) << 30;
  TORCH_CHECK(s.height + 2 * s.pad_h < kMaxSide && s.width + 2 * s.pad_w < kMaxSide, op,
              ": `x` must have a padded height and width below 2^30 on CUDA, got ",
              s.height + 2 * s.pad_h, "x", s.width + 2 * s.pad_w);
  s.out_h = (s.height + 2 * s.pad_h - span_h) / s.stride_h + 1;
  s.out_w = (s.width + 2 * s.pad_w - span_w) / s.stride_w + 1;
  return s;
}

Tensor sparse_conv2d_cuda(const Tensor& x, const Tensor& row_ptr, const Tensor& col_idx,
                          const Tensor& values, IntArrayRef kernel_size,
                          const std::optional<Tensor>& bias, IntArrayRef stride,
                          IntArrayRef padding, IntArrayRef dilation) {
  const gpu::ConvShape s = check_conv_inputs(kConv, x, row_ptr, col_idx, values, kernel_size,
                                             stride, padding, dilation);
  const int64_t o = row_ptr.numel() - 1;
  if (bias.has_value()) {
    check_sparse_bias(kConv, *bias, o, "out_channels", x);
  }
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor out = at::empty({s.batch, o, s.out_h, s.out_w}, x.options());
  if (out.numel() == 0) {
    return out;
  }
  const Tensor xc = x.contiguous();
  const Tensor bias_c = bias.has_value() ? bias->contiguous() : Tensor();
  dispatch_floating(x.scalar_type(), kConv, [&](auto* tag) {
    using T = Elem<decltype(tag)>;
    with_view<T>(row_ptr, col_idx, values, s.channels * s.kh * s.kw, [&](const auto& a) {
      C10_CUDA_CHECK(gpu::sparse_conv2d_forward(a, data<T>(xc), s, data_or_null<T>(bias_c),
                                                mutable_data<T>(out), current_stream()));
    });
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> sparse_conv2d_backward_cuda(
    const Tensor& grad_out, const Tensor& x, const Tensor& row_ptr, const Tensor& col_idx,
    const Tensor& values, IntArrayRef kernel_size, IntArrayRef stride, IntArrayRef padding,
    IntArrayRef dilation, std::array<bool, 3> output_mask) {
  const gpu::ConvShape s = check_conv_inputs(kConvBackward, x, row_ptr, col_idx, values,
                                             kernel_size, stride, padding, dilation);
  const int64_t o = row_ptr.numel() - 1, nnz = values.numel();
  check_sparse_grad_out(kConvBackward, grad_out, {s.batch, o, s.out_h, s.out_w}, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto empty = at::empty({0}, x.options());
  Tensor grad_x = output_mask[0] ? at::zeros_like(x, at::MemoryFormat::Contiguous) : empty;
  Tensor grad_values = output_mask[1] ? at::zeros_like(values) : empty;
  const Tensor grad_bias = output_mask[2] ? grad_out.sum({0, 2, 3}) : empty;
  const int64_t pixels = s.out_h * s.out_w, k = s.channels * s.kh * s.kw;
  if (s.batch * pixels == 0 || o == 0 || k == 0 || nnz == 0 ||
      !(output_mask[0] || output_mask[1])) {
    return {grad_x, grad_values, grad_bias};
  }
  const Tensor go = grad_out.contiguous();  // [B, O, L]
  const Tensor xc = x.contiguous();
  const bool direct = s.kh == 1 && s.kw == 1 && s.stride_h == 1 && s.stride_w == 1 &&
                      s.pad_h == 0 && s.pad_w == 0;  // the input is its own column matrix
  // Images per slice, so that one [slice, K, L] column buffer stays under kColumnBytes.
  const int64_t per_image = k * pixels * static_cast<int64_t>(x.element_size());
  const int64_t slice = std::max<int64_t>(1, std::min<int64_t>(s.batch, kColumnBytes / per_image));
  const int64_t segments = gpu::sddmm_segment_count(o, slice * pixels);
  Tensor partial;
  if (output_mask[1]) {
    partial = at::zeros({segments, nnz}, values.options().dtype(acc_dtype(values.scalar_type())));
  }
  Tensor t_row_ptr, t_col_idx, t_values;
  if (output_mask[0]) {
    std::tie(t_row_ptr, t_col_idx, t_values) = transpose_csr(row_ptr, col_idx, values, k);
  }
  const cudaStream_t stream = current_stream();
  for (int64_t b0 = 0; b0 < s.batch; b0 += slice) {
    const int64_t bs = std::min(slice, s.batch - b0);
    const Tensor go_slice = go.narrow(0, b0, bs);
    if (output_mask[1]) {
      const Tensor x_slice = xc.narrow(0, b0, bs);
      const Tensor columns =
          direct ? x_slice.reshape({bs, k, pixels})
                 : at::im2col(x_slice, {s.kh, s.kw}, dilation, padding, stride).contiguous();
      dispatch_floating(x.scalar_type(), kConvBackward, [&](auto* tag) {
        using T = Elem<decltype(tag)>;
        with_view<T>(row_ptr, col_idx, values, k, [&](const auto& a) {
          C10_CUDA_CHECK(gpu::sddmm_segments(
              a, data<T>(go_slice), /*ldp=*/pixels, /*p_batch=*/o * pixels, data<T>(columns),
              /*ldq=*/pixels, /*q_batch=*/k * pixels, /*len=*/pixels, /*batch=*/bs, segments,
              mutable_data<gpu::Acc<T>>(partial), stream));
        });
      });
    }
    if (output_mask[0]) {
      Tensor grad_columns = at::empty({bs, k, pixels}, x.options());
      dispatch_floating(x.scalar_type(), kConvBackward, [&](auto* tag) {
        using T = Elem<decltype(tag)>;
        with_view<T>(t_row_ptr, t_col_idx, t_values, o, [&](const auto& a) {
          C10_CUDA_CHECK(gpu::spmm_tiled(a, data<T>(go_slice), /*ldb=*/pixels,
                                         /*b_batch=*/o * pixels, /*m=*/pixels, /*batch=*/bs,
                                         static_cast<const T*>(nullptr),
                                         mutable_data<T>(grad_columns),
                                         /*c_row_stride=*/pixels, /*c_col_stride=*/1,
                                         /*c_batch=*/k * pixels, stream));
        });
      });
      Tensor grad_x_slice = grad_x.narrow(0, b0, bs);
      if (direct) {
        grad_x_slice.copy_(grad_columns.view({bs, s.channels, s.height, s.width}));
      } else {
        grad_x_slice.copy_(at::col2im(grad_columns, {s.height, s.width}, {s.kh, s.kw}, dilation,
                                      padding, stride));
      }
    }
  }
  if (output_mask[1]) {
    grad_values = (segments == 1 ? partial[0] : partial.sum(0)).to(values.scalar_type());
  }
  return {grad_x, grad_values, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchprune, CUDA, m) {
  m.impl("pack_csr", &pack_csr_cuda);
  m.impl("unpack_csr", &unpack_csr_cuda);
  m.impl("check_csr", &check_csr_cuda);
  m.impl("sparse_linear", &sparse_linear_cuda);
  m.impl("sparse_linear_backward", &sparse_linear_backward_cuda);
  m.impl("sparse_conv2d", &sparse_conv2d_cuda);
  m.impl("sparse_conv2d_backward", &sparse_conv2d_backward_cuda);
}

}  // namespace torchprune
