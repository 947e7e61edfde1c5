// Packing on the GPU (contracts in sparse_kernels.h): a warp per row throughout.
//
// pack_count counts each row's kept entries; the caller scans the counts into row_ptr; pack_fill
// then writes every row 32 columns at a time, each kept entry's slot being the number of kept
// lanes below it (a ballot), so columns ascend and the result is the CPU pack's, byte for byte.
// unpack scatters the entries into a zeroed dense matrix; check_structure compares every entry
// with its predecessor and keeps the first failure in row order with an atomicMin.
#include "cuda/sparse_kernels.h"

namespace torchprune {
namespace gpu {
namespace {

using namespace detail;

unsigned row_blocks(int64_t rows) {
  return static_cast<unsigned>(rows > 0 ? (rows + kWarps - 1) / kWarps : 1);
}

__device__ __forceinline__ int64_t warp_row() {
  return static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarpSize;
}

// What pack_csr keeps: the mask where there is one, else the nonzeros (NaN included, -0 not).
template <typename T>
__device__ __forceinline__ bool kept(const T* __restrict__ weight, const bool* __restrict__ mask,
                                     int64_t i) {
  return mask != nullptr ? mask[i] : to_acc(weight[i]) != 0;
}

template <typename T>
__global__ void __launch_bounds__(kBlock)
    pack_count_kernel(const T* __restrict__ weight, const bool* __restrict__ mask, int64_t rows,
                      int64_t cols, int64_t* __restrict__ counts) {
  const int64_t row = warp_row();
  if (row >= rows) return;  // whole warps
  const int lane = threadIdx.x % kWarpSize;
  long long count = 0;
  for (int64_t c = lane; c < cols; c += kWarpSize) count += kept(weight, mask, row * cols + c);
  count = group_sum(count, kWarpSize);
  if (lane == 0) counts[row] = count;
}

template <typename T, typename I>
__global__ void __launch_bounds__(kBlock)
    pack_fill_kernel(const T* __restrict__ weight, const bool* __restrict__ mask, int64_t rows,
                     int64_t cols, const int32_t* __restrict__ row_ptr, I* __restrict__ col,
                     T* __restrict__ val) {
  const int64_t row = warp_row();
  if (row >= rows) return;  // whole warps: the ballots below see all 32 lanes
  const int lane = threadIdx.x % kWarpSize;
  const unsigned below = (1u << lane) - 1u;
  int64_t next = row_ptr[row];
  for (int64_t c0 = 0; c0 < cols; c0 += kWarpSize) {
    const int64_t c = c0 + lane, i = row * cols + c;
    const bool keep = c < cols && kept(weight, mask, i);
    const unsigned ballot = __ballot_sync(kFullMask, keep);
    if (keep) {
      const int64_t slot = next + __popc(ballot & below);
      col[slot] = static_cast<I>(c);
      val[slot] = weight[i];
    }
    next += __popc(ballot);
  }
}

template <typename T, typename I>
__global__ void __launch_bounds__(kBlock) unpack_kernel(CsrView<T, I> a, T* __restrict__ dense) {
  const int64_t row = warp_row();
  if (row >= a.rows) return;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t end = a.row_ptr[row + 1];
  for (int64_t e = a.row_ptr[row] + lane; e < end; e += kWarpSize) {
    dense[row * a.cols + static_cast<int64_t>(a.col[e])] = a.val[e];
  }
}

template <typename I>
__global__ void __launch_bounds__(kBlock)
    check_kernel(const int32_t* __restrict__ row_ptr, const I* __restrict__ col, int64_t rows,
                 int64_t nnz, int64_t cols, int64_t* __restrict__ result) {
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    result[0] = row_ptr[0];
    result[1] = row_ptr[rows];
  }
  auto* first = reinterpret_cast<unsigned long long*>(result + 2);
  const int64_t row = warp_row();
  if (row >= rows) return;
  const int lane = threadIdx.x % kWarpSize;
  const unsigned long long row_key = static_cast<unsigned long long>(row) << 32;
  const int64_t start = row_ptr[row], stop = row_ptr[row + 1];
  if (start > stop || start < 0 || stop > nnz) {
    if (lane == 0) atomicMin(first, row_key);  // a decreasing row pointer: kind 0, position 0
    return;
  }
  for (int64_t e = start + lane; e < stop; e += kWarpSize) {
    const int64_t c = static_cast<int64_t>(col[e]);
    const int64_t previous = e == start ? -1 : static_cast<int64_t>(col[e - 1]);
    const bool ordered = c > previous, in_range = c >= 0 && c < cols;
    if (!ordered || !in_range) {
      // At one entry the CPU walk reports the order first, so kind 0 (order) sorts first.
      atomicMin(first, row_key | static_cast<unsigned long long>(e - start) << 1 |
                           (ordered ? 1ull : 0ull));
      break;  // this lane's later entries come after this one in row order
    }
  }
}

}  // namespace

template <typename T>
cudaError_t pack_count(const T* weight, const bool* mask, int64_t rows, int64_t cols,
                       int64_t* counts, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  pack_count_kernel<T><<<row_blocks(rows), kBlock, 0, stream>>>(weight, mask, rows, cols,
                                                                 counts);
  return cudaGetLastError();
}

template <typename T, typename I>
cudaError_t pack_fill(const T* weight, const bool* mask, int64_t rows, int64_t cols,
                      const int32_t* row_ptr, I* col, T* val, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  pack_fill_kernel<T, I><<<row_blocks(rows), kBlock, 0, stream>>>(weight, mask, rows, cols,
                                                                   row_ptr, col, val);
  return cudaGetLastError();
}

template <typename T, typename I>
cudaError_t unpack(CsrView<T, I> a, T* dense, cudaStream_t stream) {
  if (a.rows == 0 || a.nnz == 0) return cudaSuccess;
  unpack_kernel<T, I><<<row_blocks(a.rows), kBlock, 0, stream>>>(a, dense);
  return cudaGetLastError();
}

template <typename I>
cudaError_t check_structure(const int32_t* row_ptr, const I* col, int64_t rows, int64_t nnz,
                            int64_t cols, int64_t* result, cudaStream_t stream) {
  const cudaError_t status = cudaMemsetAsync(result + 2, 0xFF, sizeof(int64_t), stream);
  if (status != cudaSuccess) return status;
  check_kernel<I><<<row_blocks(rows), kBlock, 0, stream>>>(row_ptr, col, rows, nnz, cols, result);
  return cudaGetLastError();
}

#define TORCHPRUNE_INSTANTIATE_T(T)                                                             \
  template cudaError_t pack_count<T>(const T*, const bool*, int64_t, int64_t, int64_t*,         \
                                     cudaStream_t);
#define TORCHPRUNE_INSTANTIATE_TI(T, I)                                                         \
  template cudaError_t pack_fill<T, I>(const T*, const bool*, int64_t, int64_t, const int32_t*, \
                                       I*, T*, cudaStream_t);                                   \
  template cudaError_t unpack<T, I>(CsrView<T, I>, T*, cudaStream_t);

TORCHPRUNE_INSTANTIATE_T(float)
TORCHPRUNE_INSTANTIATE_T(double)
TORCHPRUNE_INSTANTIATE_T(__half)
TORCHPRUNE_INSTANTIATE_T(__nv_bfloat16)
TORCHPRUNE_FOR_EACH_CSR_TYPE(TORCHPRUNE_INSTANTIATE_TI)
template cudaError_t check_structure<uint16_t>(const int32_t*, const uint16_t*, int64_t, int64_t,
                                               int64_t, int64_t*, cudaStream_t);
template cudaError_t check_structure<int32_t>(const int32_t*, const int32_t*, int64_t, int64_t,
                                              int64_t, int64_t*, cudaStream_t);
#undef TORCHPRUNE_INSTANTIATE_T
#undef TORCHPRUNE_INSTANTIATE_TI

}  // namespace gpu
}  // namespace torchprune
