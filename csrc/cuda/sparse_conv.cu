// sparse_conv2d's forward on the GPU (contract in sparse_kernels.h): implicit im2col + SpMM.
//
// A warp owns one output channel and a tile of 32..128 output pixels, flattened over
// (image, oh, ow) so that small feature maps still fill the lanes; a block's 8 warps are 8
// channels over the same pixels, which then share the input through L1. The channel's stored
// taps pass through shared memory 32 at a time, decoded once into (input plane, row shift,
// column shift), and every lane multiplies each tap into the input pixel its output pixel meets
// (zero padding is a bounds test). Lanes hold consecutive pixels, so the input reads for a tap
// and the output stores are coalesced. The backward (register_sparse.cpp) reuses spmm.cu's
// kernels on ATen's explicit im2col / col2im, in slices of the batch.
#include "cuda/sparse_kernels.h"

namespace torchprune {
namespace gpu {
namespace {

using namespace detail;

template <typename T, typename I, int kPerLane>
__global__ void __launch_bounds__(kBlock)
    conv_forward_kernel(CsrView<T, I> a, const T* __restrict__ x, ConvShape s, int64_t pixels,
                        int64_t total, int64_t items, const T* __restrict__ bias,
                        T* __restrict__ y) {
  using A = Acc<T>;
  constexpr int kTile = kWarpSize * kPerLane;
  __shared__ A s_val[kWarps][kWarpSize];
  __shared__ int64_t s_plane[kWarps][kWarpSize];  // c * H * W
  __shared__ int s_dy[kWarps][kWarpSize];         // ki * dil_h - pad_h
  __shared__ int s_dx[kWarps][kWarpSize];         // kj * dil_w - pad_w

  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t channel = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  // Warps past the last channel return as a whole: this kernel has no block-wide barrier.
  if (channel >= a.rows) return;
  const int64_t begin = a.row_ptr[channel], end = a.row_ptr[channel + 1];
  const A init = bias != nullptr ? to_acc(bias[channel]) : A(0);
  const int height = static_cast<int>(s.height), width = static_cast<int>(s.width);
  const int64_t taps = s.kh * s.kw, plane_size = s.height * s.width;
  const int64_t image_size = s.channels * plane_size;

  for (int64_t item = blockIdx.y; item < items; item += gridDim.y) {
    const int64_t t0 = item * kTile;
    A acc[kPerLane];
    bool valid[kPerLane];
    int iy0[kPerLane], ix0[kPerLane];  // top-left input pixel of the output pixel's window
    const T* xi[kPerLane];             // the output pixel's image
    int64_t out_at[kPerLane];          // where the output pixel goes in y
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int64_t t = t0 + lane + i * kWarpSize;
      valid[i] = t < total;
      const int64_t image = valid[i] ? t / pixels : 0, p = valid[i] ? t - image * pixels : 0;
      const int64_t oh = p / s.out_w, ow = p - oh * s.out_w;
      iy0[i] = static_cast<int>(oh * s.stride_h);
      ix0[i] = static_cast<int>(ow * s.stride_w);
      xi[i] = x + image * image_size;
      out_at[i] = (image * a.rows + channel) * pixels + p;
      acc[i] = init;
    }
    for (int64_t e0 = begin; e0 < end; e0 += kWarpSize) {  // uniform across the warp
      const int n = static_cast<int>(end - e0 < kWarpSize ? end - e0 : kWarpSize);
      if (lane < n) {
        const int64_t k = static_cast<int64_t>(ldg(a.col + e0 + lane));
        const int64_t c = k / taps, tap = k - c * taps, ki = tap / s.kw, kj = tap - ki * s.kw;
        s_val[warp][lane] = to_acc(ldg(a.val + e0 + lane));
        s_plane[warp][lane] = c * plane_size;
        s_dy[warp][lane] = static_cast<int>(ki * s.dil_h - s.pad_h);
        s_dx[warp][lane] = static_cast<int>(kj * s.dil_w - s.pad_w);
      }
      __syncwarp();
#pragma unroll 2
      for (int j = 0; j < n; ++j) {
        const A v = s_val[warp][j];
        const int64_t plane = s_plane[warp][j];
        const int dy = s_dy[warp][j], dx = s_dx[warp][j];
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) {
          const int iy = iy0[i] + dy, ix = ix0[i] + dx;
          if (valid[i] && static_cast<unsigned>(iy) < static_cast<unsigned>(height) &&
              static_cast<unsigned>(ix) < static_cast<unsigned>(width)) {
            acc[i] += v * to_acc(ldg(xi[i] + plane + static_cast<int64_t>(iy) * width + ix));
          }
        }
      }
      __syncwarp();  // the staging buffers are refilled next
    }
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      if (valid[i]) y[out_at[i]] = from_acc<T>(acc[i]);
    }
  }
}

template <typename T, typename I, int kPerLane>
void launch_forward(CsrView<T, I> a, const T* x, const ConvShape& s, const T* bias, T* y,
                    int64_t pixels, int64_t total, cudaStream_t stream) {
  const int64_t items = (total + kWarpSize * kPerLane - 1) / (kWarpSize * kPerLane);
  const dim3 grid(static_cast<unsigned>((a.rows + kWarps - 1) / kWarps), grid_y(items));
  conv_forward_kernel<T, I, kPerLane>
      <<<grid, kBlock, 0, stream>>>(a, x, s, pixels, total, items, bias, y);
}

}  // namespace

template <typename T, typename I>
cudaError_t sparse_conv2d_forward(CsrView<T, I> a, const T* x, const ConvShape& shape,
                                  const T* bias, T* y, cudaStream_t stream) {
  const int64_t pixels = shape.out_h * shape.out_w, total = shape.batch * pixels;
  if (a.rows == 0 || total == 0) return cudaSuccess;
  // More pixels per lane reuse each staged tap more; fewer keep small layers parallel.
  if (total >= 65536) {
    launch_forward<T, I, 4>(a, x, shape, bias, y, pixels, total, stream);
  } else if (total >= 8192) {
    launch_forward<T, I, 2>(a, x, shape, bias, y, pixels, total, stream);
  } else {
    launch_forward<T, I, 1>(a, x, shape, bias, y, pixels, total, stream);
  }
  return cudaGetLastError();
}

#define TORCHPRUNE_INSTANTIATE(T, I)                                                        \
  template cudaError_t sparse_conv2d_forward<T, I>(CsrView<T, I>, const T*, const ConvShape&, \
                                                   const T*, T*, cudaStream_t);

TORCHPRUNE_FOR_EACH_CSR_TYPE(TORCHPRUNE_INSTANTIATE)
#undef TORCHPRUNE_INSTANTIATE

}  // namespace gpu
}  // namespace torchprune
