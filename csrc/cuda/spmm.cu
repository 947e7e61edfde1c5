// CSR SpMM and SDDMM on the GPU: the arithmetic of sparse_linear (forward, input gradient, value
// gradient) and of sparse_conv2d's backward. Contracts in sparse_kernels.h.
//
// - spmm_gather (batch <= 8, memory bound): a group of 4, 8 or 32 lanes per sparse row, sized to
//   the average row length, reads the row's values and indices with 16-byte loads (the ragged first
//   and last vectors of a row element by element), gathers x through the indices into one
//   accumulator per batch row, and sums the group with shuffles. Every stored byte is read once.
// - spmm_tiled (larger batches, Sputnik-style 1-D tiling): a warp per sparse row and a tile of
//   32..128 batch columns per block; the row's entries pass through shared memory 32 at a time
//   (one coalesced load each), and every entry scales a coalesced row of the batch-contiguous
//   operand. A block's 8 rows are written back through a shared-memory transpose when the
//   output is [batch, rows], so the stores stay coalesced too.
// - sddmm_gather / sddmm_segments: the value gradient, lanes over entries for small batches and
//   a warp per (row, slice of the product) with a shuffle reduction per entry otherwise.
#include "cuda/sparse_kernels.h"

namespace torchprune {
namespace gpu {
namespace {

using namespace detail;

template <typename P>
bool aligned(const P* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// N elements of U loaded as one aligned unit: 16-byte loads (or one smaller load when the vector
// is smaller), kept in registers. The address must be aligned to alignof(Vector<U, N>).
template <typename U, int N>
struct alignas(N * sizeof(U) < 16 ? N * sizeof(U) : 16) Vector {
  U v[N];
};

template <typename U, int N>
__device__ __forceinline__ Vector<U, N> load_vector(const U* __restrict__ p) {
  return *reinterpret_cast<const Vector<U, N>*>(p);
}

// ---------------------------------------------------------------------------------------------
// spmm_gather

template <typename T, typename I, int kGroup, int kBatch>
__global__ void __launch_bounds__(kBlock)
    spmm_gather_kernel(CsrView<T, I> a, const T* __restrict__ x, int64_t ldx, int m,
                       const T* __restrict__ bias, T* __restrict__ y, int64_t ldy,
                       bool vectorized) {
  using A = Acc<T>;
  constexpr int kVec = 16 / sizeof(T);  // entries per 16-byte load of values
  const int lane = threadIdx.x % kGroup;
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x) / kGroup;
  // Groups past the last row still take part in the shuffles below; they just add nothing.
  const bool active = row < a.rows;
  A acc[kBatch];
#pragma unroll
  for (int b = 0; b < kBatch; ++b) acc[b] = A(0);
  auto add = [&](A v, int64_t c) {
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      if (b < m) acc[b] += v * to_acc(ldg(x + b * ldx + c));
    }
  };
  if (active) {
    const int64_t begin = a.row_ptr[row], end = a.row_ptr[row + 1];
    if (vectorized) {
      // Vectors start at multiples of kVec (aligned, as the launcher checked for the bases);
      // the one straddling `begin` and the one straddling `end` are read element by element.
      for (int64_t e = begin - begin % kVec + lane * kVec; e < end; e += kGroup * kVec) {
        if (e >= begin && e + kVec <= end) {
          const Vector<T, kVec> v = load_vector<T, kVec>(a.val + e);
          const Vector<I, kVec> c = load_vector<I, kVec>(a.col + e);
#pragma unroll
          for (int j = 0; j < kVec; ++j) add(to_acc(v.v[j]), static_cast<int64_t>(c.v[j]));
        } else {
#pragma unroll
          for (int j = 0; j < kVec; ++j) {
            const int64_t f = e + j;
            if (f >= begin && f < end) {
              add(to_acc(ldg(a.val + f)), static_cast<int64_t>(ldg(a.col + f)));
            }
          }
        }
      }
    } else {
      for (int64_t e = begin + lane; e < end; e += kGroup) {
        add(to_acc(ldg(a.val + e)), static_cast<int64_t>(ldg(a.col + e)));
      }
    }
  }
#pragma unroll
  for (int b = 0; b < kBatch; ++b) acc[b] = group_sum(acc[b], kGroup);
  if (active && lane == 0) {
    const A init = bias != nullptr ? to_acc(bias[row]) : A(0);
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      if (b < m) y[b * ldy + row] = from_acc<T>(init + acc[b]);
    }
  }
}

// Batch 1 gets its own kernel (one accumulator); 2..8 share the 8-accumulator one, whose unused
// accumulators cost a predicate each (fewer instantiations keep nvcc's time down).
template <typename T, typename I, int kGroup>
void launch_gather(unsigned blocks, cudaStream_t stream, CsrView<T, I> a, const T* x, int64_t ldx,
                   int m, const T* bias, T* y, int64_t ldy, bool vectorized) {
  if (m == 1) {
    spmm_gather_kernel<T, I, kGroup, 1>
        <<<blocks, kBlock, 0, stream>>>(a, x, ldx, m, bias, y, ldy, vectorized);
  } else {
    spmm_gather_kernel<T, I, kGroup, kGatherMaxBatch>
        <<<blocks, kBlock, 0, stream>>>(a, x, ldx, m, bias, y, ldy, vectorized);
  }
}

// ---------------------------------------------------------------------------------------------
// spmm_tiled

template <typename T, typename I, int kPerLane, bool kStaged>
__global__ void __launch_bounds__(kBlock)
    spmm_tiled_kernel(CsrView<T, I> a, const T* __restrict__ b, int64_t ldb, int64_t b_batch,
                      int64_t m, int64_t tiles, int64_t items, const T* __restrict__ bias,
                      T* __restrict__ c, int64_t c_row_stride, int64_t c_col_stride,
                      int64_t c_batch) {
  using A = Acc<T>;
  constexpr int kTile = kWarpSize * kPerLane;  // batch columns per block
  __shared__ A s_val[kWarps][kWarpSize];
  __shared__ int32_t s_col[kWarps][kWarpSize];
  // One padded row per warp: the transposed read-out below walks the rows without bank conflicts.
  __shared__ A s_out[kStaged ? kWarps : 1][kStaged ? kTile + 1 : 1];

  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kWarps, row = row0 + warp;
  const bool active = row < a.rows;
  const int64_t begin = active ? a.row_ptr[row] : 0, end = active ? a.row_ptr[row + 1] : 0;
  const A init = active && bias != nullptr ? to_acc(bias[row]) : A(0);

  // `item` depends on the block only, so every thread runs the same iterations (and barriers).
  for (int64_t item = blockIdx.y; item < items; item += gridDim.y) {
    const int64_t mat = item / tiles, t0 = (item % tiles) * kTile;
    const T* bm = b + mat * b_batch + t0 + lane;
    A acc[kPerLane];
    bool in_range[kPerLane];
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      acc[i] = init;
      in_range[i] = t0 + lane + i * kWarpSize < m;
    }
    for (int64_t e0 = begin; e0 < end; e0 += kWarpSize) {  // uniform across the warp
      const int n = static_cast<int>(end - e0 < kWarpSize ? end - e0 : kWarpSize);
      if (lane < n) {
        s_val[warp][lane] = to_acc(ldg(a.val + e0 + lane));
        s_col[warp][lane] = static_cast<int32_t>(ldg(a.col + e0 + lane));
      }
      __syncwarp();
#pragma unroll 4
      for (int j = 0; j < n; ++j) {
        const A v = s_val[warp][j];
        const T* src = bm + static_cast<int64_t>(s_col[warp][j]) * ldb;
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) {
          if (in_range[i]) acc[i] += v * to_acc(ldg(src + i * kWarpSize));
        }
      }
      __syncwarp();  // the staging buffer is refilled next
    }
    T* cm = c + mat * c_batch;
    if constexpr (!kStaged) {
      if (active) {
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) {
          const int64_t t = t0 + lane + i * kWarpSize;
          if (in_range[i]) cm[row * c_row_stride + t * c_col_stride] = from_acc<T>(acc[i]);
        }
      }
    } else {
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) s_out[warp][lane + i * kWarpSize] = acc[i];
      __syncthreads();
      // Consecutive threads take consecutive rows of one batch column: with c_row_stride 1
      // (y = x @ Wᵀ as [batch, rows]) they store a contiguous run of kWarps outputs.
      for (int idx = threadIdx.x; idx < kTile * kWarps; idx += kBlock) {
        const int r = idx % kWarps, tt = idx / kWarps;
        const int64_t n = row0 + r, t = t0 + tt;
        if (n < a.rows && t < m) {
          cm[n * c_row_stride + t * c_col_stride] = from_acc<T>(s_out[r][tt]);
        }
      }
      __syncthreads();  // s_out is rewritten by the next item
    }
  }
}

template <typename T, typename I, int kPerLane>
void launch_tiled(dim3 grid, cudaStream_t stream, bool staged, CsrView<T, I> a, const T* b,
                  int64_t ldb, int64_t b_batch, int64_t m, int64_t tiles, int64_t items,
                  const T* bias, T* c, int64_t crs, int64_t ccs, int64_t c_batch) {
  if (staged) {
    spmm_tiled_kernel<T, I, kPerLane, true><<<grid, kBlock, 0, stream>>>(
        a, b, ldb, b_batch, m, tiles, items, bias, c, crs, ccs, c_batch);
  } else {
    spmm_tiled_kernel<T, I, kPerLane, false><<<grid, kBlock, 0, stream>>>(
        a, b, ldb, b_batch, m, tiles, items, bias, c, crs, ccs, c_batch);
  }
}

// ---------------------------------------------------------------------------------------------
// SDDMM

template <typename T, typename I, int kBatch>
__global__ void __launch_bounds__(kBlock)
    sddmm_gather_kernel(CsrView<T, I> a, const T* __restrict__ g, int64_t ld_g,
                        const T* __restrict__ x, int64_t ldx, int m, T* __restrict__ out) {
  using A = Acc<T>;
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x) / kWarpSize;
  if (row >= a.rows) return;  // whole warps: no shuffles or barriers below
  const int lane = threadIdx.x % kWarpSize;
  A g_row[kBatch];
#pragma unroll
  for (int b = 0; b < kBatch; ++b) g_row[b] = b < m ? to_acc(ldg(g + b * ld_g + row)) : A(0);
  const int64_t begin = a.row_ptr[row], end = a.row_ptr[row + 1];
  for (int64_t e = begin + lane; e < end; e += kWarpSize) {
    const int64_t c = ldg(a.col + e);
    A sum = A(0);
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      if (b < m) sum += g_row[b] * to_acc(ldg(x + b * ldx + c));
    }
    out[e] = from_acc<T>(sum);
  }
}

template <typename T, typename I>
__global__ void __launch_bounds__(kBlock)
    sddmm_segments_kernel(CsrView<T, I> a, const T* __restrict__ p, int64_t ldp, int64_t p_batch,
                          const T* __restrict__ q, int64_t ldq, int64_t q_batch, int64_t len,
                          int64_t total, int64_t slice, Acc<T>* __restrict__ partial) {
  using A = Acc<T>;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  const int64_t t_begin = static_cast<int64_t>(blockIdx.y) * slice;
  if (row >= a.rows || t_begin >= total) return;  // whole warps: the shuffles stay warp-wide
  const int64_t t_end = t_begin + slice < total ? t_begin + slice : total;
  A* out = partial + static_cast<int64_t>(blockIdx.y) * a.nnz;
  const int64_t begin = a.row_ptr[row], end = a.row_ptr[row + 1];
  for (int64_t e = begin; e < end; ++e) {  // uniform across the warp
    const int64_t c = ldg(a.col + e);
    A sum = A(0);
    // t = i * len + l: the slice crosses matrices i at multiples of len.
    for (int64_t i = t_begin / len; i * len < t_end; ++i) {
      const int64_t lo = t_begin > i * len ? t_begin - i * len : 0;
      const int64_t hi = t_end - i * len < len ? t_end - i * len : len;
      const T* pp = p + i * p_batch + row * ldp;
      const T* qq = q + i * q_batch + c * ldq;
      for (int64_t l = lo + lane; l < hi; l += kWarpSize) {
        sum += to_acc(ldg(pp + l)) * to_acc(ldg(qq + l));
      }
    }
    sum = group_sum(sum, kWarpSize);
    if (lane == 0) out[e] += sum;
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Launchers

template <typename T, typename I>
cudaError_t spmm_gather(CsrView<T, I> a, const T* x, int64_t ldx, int64_t m, const T* bias, T* y,
                        int64_t ldy, cudaStream_t stream) {
  if (a.rows == 0 || m == 0) return cudaSuccess;
  if (m > kGatherMaxBatch) return cudaErrorInvalidValue;
  constexpr int kVec = 16 / sizeof(T);
  const bool vectorized = aligned(a.val, alignof(Vector<T, kVec>)) &&
                          aligned(a.col, alignof(Vector<I, kVec>));
  // Lanes per row: 4 for rows of under 4 vectors, 8 under 16 vectors, else a warp, so that
  // short rows do not leave most of a warp idle.
  const int64_t vectors = a.nnz / a.rows / kVec;
  const int group = vectors < 4 ? 4 : vectors < 16 ? 8 : kWarpSize;
  const unsigned blocks = static_cast<unsigned>((a.rows * group + kBlock - 1) / kBlock);
  const int mi = static_cast<int>(m);
  if (group == 4) {
    launch_gather<T, I, 4>(blocks, stream, a, x, ldx, mi, bias, y, ldy, vectorized);
  } else if (group == 8) {
    launch_gather<T, I, 8>(blocks, stream, a, x, ldx, mi, bias, y, ldy, vectorized);
  } else {
    launch_gather<T, I, kWarpSize>(blocks, stream, a, x, ldx, mi, bias, y, ldy, vectorized);
  }
  return cudaGetLastError();
}

template <typename T, typename I>
cudaError_t spmm_tiled(CsrView<T, I> a, const T* b, int64_t ldb, int64_t b_batch, int64_t m,
                       int64_t batch, const T* bias, T* c, int64_t c_row_stride,
                       int64_t c_col_stride, int64_t c_batch, cudaStream_t stream) {
  if (a.rows == 0 || m == 0 || batch == 0) return cudaSuccess;
  const int per_lane = m <= 32 ? 1 : m <= 64 ? 2 : 4;
  const int64_t tile = kWarpSize * per_lane, tiles = (m + tile - 1) / tile;
  const int64_t items = batch * tiles;
  const dim3 grid(static_cast<unsigned>((a.rows + kWarps - 1) / kWarps), grid_y(items));
  const bool staged = c_col_stride != 1;
  switch (per_lane) {
    case 1:
      launch_tiled<T, I, 1>(grid, stream, staged, a, b, ldb, b_batch, m, tiles, items, bias, c,
                            c_row_stride, c_col_stride, c_batch);
      break;
    case 2:
      launch_tiled<T, I, 2>(grid, stream, staged, a, b, ldb, b_batch, m, tiles, items, bias, c,
                            c_row_stride, c_col_stride, c_batch);
      break;
    default:
      launch_tiled<T, I, 4>(grid, stream, staged, a, b, ldb, b_batch, m, tiles, items, bias, c,
                            c_row_stride, c_col_stride, c_batch);
      break;
  }
  return cudaGetLastError();
}

template <typename T, typename I>
cudaError_t sddmm_gather(CsrView<T, I> a, const T* g, int64_t ldg, const T* x, int64_t ldx,
                         int64_t m, T* out, cudaStream_t stream) {
  if (a.rows == 0 || a.nnz == 0) return cudaSuccess;
  if (m > kGatherMaxBatch) return cudaErrorInvalidValue;
  const unsigned blocks = static_cast<unsigned>((a.rows + kWarps - 1) / kWarps);
  const int mi = static_cast<int>(m);
  if (m == 1) {
    sddmm_gather_kernel<T, I, 1><<<blocks, kBlock, 0, stream>>>(a, g, ldg, x, ldx, mi, out);
  } else {
    sddmm_gather_kernel<T, I, kGatherMaxBatch>
        <<<blocks, kBlock, 0, stream>>>(a, g, ldg, x, ldx, mi, out);
  }
  return cudaGetLastError();
}

template <typename T, typename I>
cudaError_t sddmm_segments(CsrView<T, I> a, const T* p, int64_t ldp, int64_t p_batch,
                           const T* q, int64_t ldq, int64_t q_batch, int64_t len, int64_t batch,
                           int64_t segments, Acc<T>* partial, cudaStream_t stream) {
  const int64_t total = len * batch;
  if (a.rows == 0 || a.nnz == 0 || total == 0) return cudaSuccess;
  if (segments < 1 || segments > 65535) return cudaErrorInvalidValue;
  const int64_t slice = (total + segments - 1) / segments;
  const dim3 grid(static_cast<unsigned>((a.rows + kWarps - 1) / kWarps),
                  static_cast<unsigned>(segments));
  sddmm_segments_kernel<T, I><<<grid, kBlock, 0, stream>>>(a, p, ldp, p_batch, q, ldq, q_batch,
                                                           len, total, slice, partial);
  return cudaGetLastError();
}

#define TORCHPRUNE_INSTANTIATE(T, I)                                                            \
  template cudaError_t spmm_gather<T, I>(CsrView<T, I>, const T*, int64_t, int64_t, const T*,   \
                                         T*, int64_t, cudaStream_t);                            \
  template cudaError_t spmm_tiled<T, I>(CsrView<T, I>, const T*, int64_t, int64_t, int64_t,     \
                                        int64_t, const T*, T*, int64_t, int64_t, int64_t,       \
                                        cudaStream_t);                                          \
  template cudaError_t sddmm_gather<T, I>(CsrView<T, I>, const T*, int64_t, const T*, int64_t,  \
                                          int64_t, T*, cudaStream_t);                           \
  template cudaError_t sddmm_segments<T, I>(CsrView<T, I>, const T*, int64_t, int64_t,          \
                                            const T*, int64_t, int64_t, int64_t, int64_t,       \
                                            int64_t, Acc<T>*, cudaStream_t);

TORCHPRUNE_FOR_EACH_CSR_TYPE(TORCHPRUNE_INSTANTIATE)
#undef TORCHPRUNE_INSTANTIATE

}  // namespace gpu
}  // namespace torchprune
