// CUDA kernel of `compact` (see compact_kernels.h): many index_selects in one launch.
//
// Structured pruning slices dozens of small tensors at once (a conv's filters, the next
// BatchNorm's four vectors, the next conv's input channels, ...). One launch over a table of
// entries replaces one launch (and one index upload) per tensor. Every block copies up to
// kCompactUnitsPerBlock words of one entry; it finds its entry by binary search over the entries'
// first blocks. Words are as wide as the row length and alignment allow (up to 16 bytes), and
// consecutive threads copy consecutive words of a row, so reads and writes are coalesced.
#include "compact_kernels.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace torchprune {
namespace cuda {
namespace {

constexpr int64_t kMaxBlocks = 16384;  // grid-stride beyond this; far below gridDim.x's limit

struct alignas(16) Word16 {
  uint64_t lo, hi;
};

// Copies words [begin, end) of entry `e`'s output. Offsets are int64: an entry can exceed 2^31
// words.
template <typename word_t>
__device__ void copy_words(const CompactEntry& e, int64_t begin, int64_t end) {
  const auto* src = static_cast<const word_t*>(e.src);
  auto* dst = static_cast<word_t*>(e.dst);
  for (int64_t u = begin + threadIdx.x; u < end; u += blockDim.x) {
    const int64_t row = u / e.row_units;  // output row (o, k)
    const int64_t col = u - row * e.row_units;
    const int64_t o = row / e.kept;
    const int64_t k = row - o * e.kept;
    dst[u] = src[(o * e.size + e.index[k]) * e.row_units + col];
  }
}

__global__ void compact_kernel(const CompactEntry* table, int64_t count, int64_t blocks) {
  for (int64_t block = blockIdx.x; block < blocks; block += gridDim.x) {
    // The last entry whose first block is <= block (entries are non-empty, so first blocks rise).
    int64_t lo = 0, hi = count - 1;
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if (table[mid].first_block <= block) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    const CompactEntry e = table[lo];
    const int64_t units = e.outer * e.kept * e.row_units;
    const int64_t begin = (block - e.first_block) * kCompactUnitsPerBlock;
    const int64_t end = begin + kCompactUnitsPerBlock < units ? begin + kCompactUnitsPerBlock : units;
    switch (e.unit) {  // the same for the whole block: no divergence
      case 16: copy_words<Word16>(e, begin, end); break;
      case 8: copy_words<uint64_t>(e, begin, end); break;
      case 4: copy_words<uint32_t>(e, begin, end); break;
      case 2: copy_words<uint16_t>(e, begin, end); break;
      default: copy_words<uint8_t>(e, begin, end); break;
    }
  }
}

}  // namespace

cudaError_t launch_compact(const CompactEntry* table, int64_t count, int64_t blocks,
                           cudaStream_t stream) {
  if (count <= 0 || blocks <= 0) {
    return cudaSuccess;
  }
  const unsigned grid = static_cast<unsigned>(std::min(blocks, kMaxBlocks));
  compact_kernel<<<grid, kCompactThreads, 0, stream>>>(table, count, blocks);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace torchprune
