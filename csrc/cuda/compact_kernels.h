// CUDA launcher of `compact` (csrc/cuda/compact.cu): out[i] = tensors[i].index_select(dims[i],
// indices[i]) for many tensors in one kernel launch. Plain C++, no torch headers.
//
// Each tensor is seen as [outer, size, inner] around its dim; its output is [outer, kept, inner]
// with row (o, k) a copy of input row (o, index[k]). The copy is byte-wise, so every dtype works.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace torchprune {
namespace cuda {

// One tensor to compact. The caller fills src .. row_bytes; compact_plan fills the rest. The table
// lives in device memory (it can hold any number of entries), `index` too.
struct CompactEntry {
  const void* src;       // contiguous input [outer, size, inner], device memory
  void* dst;             // contiguous output [outer, kept, inner], device memory
  const int64_t* index;  // [kept] entries in [0, size), device memory, already checked
  int64_t outer;         // product of the sizes before dim
  int64_t size;          // input size along dim
  int64_t kept;          // index length = output size along dim
  int64_t row_bytes;     // inner * element size
  // filled by compact_plan:
  int64_t unit;          // bytes per copied word: 16, 8, 4, 2 or 1 (the widest that divides
                         // row_bytes and the alignment of src and dst)
  int64_t row_units;     // row_bytes / unit
  int64_t first_block;   // the entry's first block in the launch (prefix sum of blocks)
};

// The table is written by the host compiler and read by nvcc's device code: same layout in both.
static_assert(sizeof(CompactEntry) == 10 * 8, "CompactEntry must be 10 packed 8-byte fields");

// Words one block copies: 256 threads x 4 words (up to 64 bytes per thread).
constexpr int kCompactThreads = 256;
constexpr int64_t kCompactUnitsPerBlock = 4 * kCompactThreads;

// Plans the launch on the host: picks each entry's copy width and its range of blocks. Entries
// must be non-empty (outer * kept * row_bytes > 0; leave empty outputs out of the table).
// Returns the total number of blocks.
inline int64_t compact_plan(CompactEntry* entries, int64_t count) {
  int64_t blocks = 0;
  for (int64_t i = 0; i < count; ++i) {
    CompactEntry& e = entries[i];
    const uint64_t bits = static_cast<uint64_t>(e.row_bytes) |
                          reinterpret_cast<uintptr_t>(e.src) | reinterpret_cast<uintptr_t>(e.dst);
    e.unit = 16;
    while (e.unit > 1 && bits % static_cast<uint64_t>(e.unit) != 0) {
      e.unit /= 2;
    }
    e.row_units = e.row_bytes / e.unit;
    e.first_block = blocks;
    const int64_t units = e.outer * e.kept * e.row_units;
    blocks += (units + kCompactUnitsPerBlock - 1) / kCompactUnitsPerBlock;
  }
  return blocks;
}

// Copies every entry of `table` (device memory, `count` entries planned by compact_plan, which
// returned `blocks`). Asynchronous on `stream`; returns the launch error.
cudaError_t launch_compact(const CompactEntry* table, int64_t count, int64_t blocks,
                           cudaStream_t stream);

}  // namespace cuda
}  // namespace torchprune
