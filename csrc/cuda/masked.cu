// CUDA kernels of the masking step: out = where(mask, src, 0) (see masked_kernels.h).
//
// Memory bound: per element it reads the weight and one mask byte and writes the weight once, so
// the only thing that matters is wide, coalesced accesses. Each thread moves 16 bytes of weights
// (8 halves, 4 floats, 2 doubles) and the matching 8/4/2 mask bytes per step, in a grid-stride
// loop; a scalar kernel handles pointers that are not aligned for that (views with an offset).
#include "masked_kernels.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace torchprune {
namespace cuda {
namespace {

constexpr int kThreads = 256;
// Enough blocks to fill any current GPU several times over (an H100 holds 132 SMs x 8 blocks of
// 256 threads); past that the grid-stride loop does the rest, and the grid stays far below the
// 2^31 - 1 limit of gridDim.x whatever numel is.
constexpr int64_t kMaxBlocks = 8192;

// The unsigned integer of each element width: masking is done on the bits.
template <int kBytes> struct Bits;
template <> struct Bits<2> { using type = uint16_t; };
template <> struct Bits<4> { using type = uint32_t; };
template <> struct Bits<8> { using type = uint64_t; };

// 16 bytes of elements and the matching mask bytes, each loaded / stored as one access.
template <int kBytes>
struct alignas(16) Pack {
  typename Bits<kBytes>::type v[16 / kBytes];
};
template <int kCount>
struct alignas(kCount) MaskPack {
  uint8_t b[kCount];
};

template <typename bits_t>
__device__ __forceinline__ bits_t select(bits_t bits, uint8_t keep) {
  return bits & static_cast<bits_t>(bits_t(0) - bits_t(keep != 0));
}

int64_t blocks_for(int64_t work) {
  return std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, kMaxBlocks));
}

// Vectorized: src, out 16-byte aligned, mask aligned to its pack. `src` and `out` are not
// __restrict__: in place (src == out) is allowed, and each element is read and then written by the
// same thread. The numel % kPer tail elements are done one per thread by the first threads.
template <int kBytes>
__global__ void mask_vector_kernel(const Pack<kBytes>* src, const MaskPack<16 / kBytes>* mask,
                                   Pack<kBytes>* out, int64_t packs, int64_t numel) {
  constexpr int kPer = 16 / kBytes;
  using bits_t = typename Bits<kBytes>::type;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = tid; p < packs; p += stride) {
    Pack<kBytes> w = src[p];
    const MaskPack<kPer> m = mask[p];
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      w.v[j] = select<bits_t>(w.v[j], m.b[j]);
    }
    out[p] = w;
  }
  const int64_t i = packs * kPer + tid;
  if (i < numel) {
    const auto* s = reinterpret_cast<const bits_t*>(src);
    const auto* k = reinterpret_cast<const uint8_t*>(mask);
    reinterpret_cast<bits_t*>(out)[i] = select<bits_t>(s[i], k[i]);
  }
}

template <int kBytes>
__global__ void mask_scalar_kernel(const typename Bits<kBytes>::type* src, const uint8_t* mask,
                                   typename Bits<kBytes>::type* out, int64_t numel) {
  using bits_t = typename Bits<kBytes>::type;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += stride) {
    out[i] = select<bits_t>(src[i], mask[i]);
  }
}

bool aligned(const void* p, uintptr_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

template <int kBytes>
cudaError_t launch_width(const void* src, const uint8_t* mask, void* out, int64_t numel,
                         cudaStream_t stream) {
  constexpr int kPer = 16 / kBytes;
  using bits_t = typename Bits<kBytes>::type;
  if (aligned(src, 16) && aligned(out, 16) && aligned(mask, kPer)) {
    const int64_t packs = numel / kPer;
    // At least one thread per tail element (kPer - 1 of them at most).
    const int64_t blocks = blocks_for(std::max<int64_t>(packs, numel - packs * kPer));
    mask_vector_kernel<kBytes><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        static_cast<const Pack<kBytes>*>(src), reinterpret_cast<const MaskPack<kPer>*>(mask),
        static_cast<Pack<kBytes>*>(out), packs, numel);
  } else {
    mask_scalar_kernel<kBytes><<<static_cast<unsigned>(blocks_for(numel)), kThreads, 0, stream>>>(
        static_cast<const bits_t*>(src), mask, static_cast<bits_t*>(out), numel);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_mask(const void* src, const uint8_t* mask, void* out, int64_t numel,
                        int elem_size, cudaStream_t stream) {
  if (numel <= 0) {
    return cudaSuccess;
  }
  switch (elem_size) {
    case 2:
      return launch_width<2>(src, mask, out, numel, stream);
    case 4:
      return launch_width<4>(src, mask, out, numel, stream);
    case 8:
      return launch_width<8>(src, mask, out, numel, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace torchprune
