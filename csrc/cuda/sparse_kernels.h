// CUDA kernels of the packed-sparse ops (pack.cu, spmm.cu, sparse_conv.cu), behind plain C++
// launchers: raw pointers, sizes and a stream, no torch headers, so nvcc compiles the kernels
// anywhere and register_sparse.cpp binds them to the CUDA dispatch key.
//
// The CSR format is the one of common/csr.h: int32 row pointers, uint16_t (in_features < 65536)
// or int32_t columns, values in T. T is float, double, __half or __nv_bfloat16; the half types
// accumulate in float and round once per output. Dense operands are row-major with a leading
// dimension (ld*) and, where a launcher takes a batch of matrices, a batch stride (*_batch).
// Every launcher returns the launch's cudaError_t (cudaSuccess when there was nothing to do) and
// trusts its arguments: the shape and structure checks happen in register_sparse.cpp.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace torchprune {
namespace gpu {

// A read-only CSR matrix [rows, cols] with nnz stored entries on the device (nnz, known on the
// host as values.numel(), sizes launches without reading row_ptr back).
template <typename T, typename I>
struct CsrView {
  const int32_t* row_ptr;
  const I* col;
  const T* val;
  int64_t rows;
  int64_t cols;
  int64_t nnz;
};

// What a product in T accumulates in (and the value gradient is summed in): double for double,
// float otherwise.
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using Acc = typename AccOf<T>::type;

// ---------------------------------------------------------------------------------------------
// pack.cu

// counts[r] = entries of row r to keep: mask[r, c] where mask is given, else weight[r, c] != 0.
// weight and mask are contiguous [rows, cols].
template <typename T>
cudaError_t pack_count(const T* weight, const bool* mask, int64_t rows, int64_t cols,
                       int64_t* counts, cudaStream_t stream);

// Writes the kept entries of every row at row_ptr[r].. in ascending column order (the same
// bytes as the CPU pack, whatever the launch shape).
template <typename T, typename I>
cudaError_t pack_fill(const T* weight, const bool* mask, int64_t rows, int64_t cols,
                      const int32_t* row_ptr, I* col, T* val, cudaStream_t stream);

// dense[r, col] = val for every stored entry; dense [rows, cols] must be zeroed by the caller.
template <typename T, typename I>
cudaError_t unpack(CsrView<T, I> a, T* dense, cudaStream_t stream);

// The structure walk of check_csr. result[0] and result[1] receive row_ptr[0] and
// row_ptr[rows]; result[2] (read as uint64) the smallest failure key, all ones when the
// structure is valid: key = row << 32 | position_in_row << 1 | kind, where kind 0 means a
// decreasing row pointer or a column not above its predecessor, kind 1 a column outside
// [0, cols). The smallest key is the failure the CPU walk (rows in order) meets first.
// Row pointers outside [0, nnz] count as decreasing, so nothing is read out of bounds.
template <typename I>
cudaError_t check_structure(const int32_t* row_ptr, const I* col, int64_t rows, int64_t nnz,
                            int64_t cols, int64_t* result, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// spmm.cu

// Batches up to this size use the gather kernels, which read x and grad_out as they come
// ([m, K] row-major); larger ones want the batch-contiguous transposes (see below).
constexpr int64_t kGatherMaxBatch = 8;

// y[t, n] = bias[n] + sum_j a[n, j] * x[t, j] for t < m <= kGatherMaxBatch: a (sub)warp per
// sparse row gathers x through the column indices, with 16-byte loads of values and indices.
// x is [m, a.cols] (ldx), y is [m, a.rows] (ldy); bias may be null.
template <typename T, typename I>
cudaError_t spmm_gather(CsrView<T, I> a, const T* x, int64_t ldx, int64_t m, const T* bias, T* y,
                        int64_t ldy, cudaStream_t stream);

// For every matrix i < batch and t < m:
//   c[i][n * c_row_stride + t * c_col_stride] = bias[n] + sum_j a[n, j] * b[i][j * ldb + t]
// with b[i] = b + i * b_batch and c[i] = c + i * c_batch. b holds the dense operand
// batch-contiguous ([a.cols, m] per matrix, Xᵀ for sparse_linear), so a warp reads it coalesced;
// c_col_stride == 1 stores directly, any other stride goes through a shared-memory transpose so
// that y = x @ Wᵀ is written in [m, rows] order. bias may be null.
template <typename T, typename I>
cudaError_t spmm_tiled(CsrView<T, I> a, const T* b, int64_t ldb, int64_t b_batch, int64_t m,
                       int64_t batch, const T* bias, T* c, int64_t c_row_stride,
                       int64_t c_col_stride, int64_t c_batch, cudaStream_t stream);

// The value gradient for m <= kGatherMaxBatch: out[e] = sum_{t<m} g[t, row(e)] * x[t, col(e)],
// g [m, a.rows] (ldg), x [m, a.cols] (ldx); a.val is not read.
template <typename T, typename I>
cudaError_t sddmm_gather(CsrView<T, I> a, const T* g, int64_t ldg, const T* x, int64_t ldx,
                         int64_t m, T* out, cudaStream_t stream);

// The sampled dense-dense product over long operands, in `segments` slices of the t axis:
//   partial[s * nnz + e] += sum over t in slice s of p(row(e), t) * q(col(e), t)
// where t runs over batch matrices i and positions l < len: p(n, t) = p[i * p_batch + n * ldp + l]
// and q(j, t) = q[i * q_batch + j * ldq + l]. The caller zeroes partial [segments, nnz] once
// (calls accumulate) and sums it over segments. Slices give the GPU enough warps when there are
// few rows and long products (a conv layer's value gradient).
template <typename T, typename I>
cudaError_t sddmm_segments(CsrView<T, I> a, const T* p, int64_t ldp, int64_t p_batch,
                           const T* q, int64_t ldq, int64_t q_batch, int64_t len, int64_t batch,
                           int64_t segments, Acc<T>* partial, cudaStream_t stream);

// How many slices sddmm_segments should use for `rows` sparse rows and products of `length`
// terms: enough warps to fill a large GPU, slices of at least 256 terms.
inline int64_t sddmm_segment_count(int64_t rows, int64_t length) {
  constexpr int64_t kTargetWarps = 16384, kMinSlice = 256, kMaxSegments = 65535;
  const int64_t by_length = (length + kMinSlice - 1) / kMinSlice;
  const int64_t by_rows = rows > 0 ? (kTargetWarps + rows - 1) / rows : 1;
  int64_t s = by_length < by_rows ? by_length : by_rows;
  s = s < kMaxSegments ? s : kMaxSegments;
  return s > 1 ? s : 1;
}

// ---------------------------------------------------------------------------------------------
// sparse_conv.cu

// A groups=1 convolution's geometry (NCHW input, [out_channels, channels * kh * kw] weight).
struct ConvShape {
  int64_t batch, channels, height, width;
  int64_t kh, kw, out_h, out_w;
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
};

// y[i, o, oh, ow] = bias[o] + sum over stored (o, (c, ki, kj)) of
//   val * x[i, c, oh * stride_h - pad_h + ki * dil_h, ow * stride_w - pad_w + kj * dil_w]
// (zero outside the image): implicit im2col, nothing materialized. x and y are contiguous NCHW;
// a.cols = channels * kh * kw; bias may be null. The caller keeps height + 2 * pad_h and
// width + 2 * pad_w below 2^30 (int arithmetic for pixel coordinates).
template <typename T, typename I>
cudaError_t sparse_conv2d_forward(CsrView<T, I> a, const T* x, const ConvShape& shape,
                                  const T* bias, T* y, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Device helpers shared by the .cu files (nvcc only).
#ifdef __CUDACC__
namespace detail {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kBlock = 256;  // threads per block in every kernel of the sparse ops
constexpr int kWarps = kBlock / kWarpSize;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
struct Round;
template <>
struct Round<float> {
  __device__ __forceinline__ static float from(float v) { return v; }
};
template <>
struct Round<double> {
  __device__ __forceinline__ static double from(double v) { return v; }
};
template <>
struct Round<__half> {
  __device__ __forceinline__ static __half from(float v) { return __float2half_rn(v); }
};
template <>
struct Round<__nv_bfloat16> {
  __device__ __forceinline__ static __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
};

// The accumulator rounded to the storage type, once per output.
template <typename T>
__device__ __forceinline__ T from_acc(Acc<T> v) {
  return Round<T>::from(v);
}

// A read-only load through the non-coherent (texture) path.
template <typename U>
__device__ __forceinline__ U ldg(const U* p) {
  return __ldg(p);
}

// Sum over aligned groups of `width` lanes (a power of two <= 32); every lane of the warp must
// call it, and every lane of a group gets the group's sum.
template <typename V>
__device__ __forceinline__ V group_sum(V v, int width) {
  for (int offset = width / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(kFullMask, v, offset, width);
  }
  return v;
}

// gridDim.y is limited to 65535: launches put the long axis there and loop over it.
inline unsigned grid_y(int64_t items) {
  return static_cast<unsigned>(items < 65535 ? (items > 0 ? items : 1) : 65535);
}

}  // namespace detail

// Calls M(T, I) for every value type T and column type I the launchers are instantiated for.
#define TORCHPRUNE_FOR_EACH_CSR_TYPE(M) \
  M(float, uint16_t)                    \
  M(float, int32_t)                     \
  M(double, uint16_t)                   \
  M(double, int32_t)                    \
  M(__half, uint16_t)                   \
  M(__half, int32_t)                    \
  M(__nv_bfloat16, uint16_t)            \
  M(__nv_bfloat16, int32_t)
#endif  // __CUDACC__

}  // namespace gpu
}  // namespace torchprune
