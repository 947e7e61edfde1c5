// AVX2 fp32 kernel of nm_sparse_linear (the N:8 format, common/nm.h) for n in {1, 2, 4}.
//
// Per chunk of 8 slots (8 / n windows of x) the kernel broadcasts the chunk's code, shifts each
// lane's 3-bit position into place, loads each window of x (8 contiguous floats), permutes it by
// the positions (vpermps reads only the low 3 bits of each lane) and blends the windows into one
// vector of the 8 x values the slots multiply: no gathers. Each chunk's codes and values are
// read once for up to 4 rows of x. Call it only when avx2::supported() is true.
#pragma once

#include <cstdint>

#include "common/nm.h"

namespace torchprune {
namespace cpu {
namespace avx2 {

// True for the slots per window the kernel is compiled for.
inline bool nm_supported(int64_t n) { return n == 1 || n == 2 || n == 4; }

// The most rows of x one pass over the weight serves.
constexpr int64_t kNmRows = 4;

// y[t * ldy + r] = init[r] + sum over slots s of a.val[r, s] * x[t * ldx + a.column(r, s)] for
// t < m (1 <= m <= kNmRows) and rows r in [row_begin, row_end). init may be null.
void nm_rows(const Nm<float>& a, const float* x, int64_t ldx, int64_t m, const float* init,
             float* y, int64_t ldy, int64_t row_begin, int64_t row_end);

}  // namespace avx2
}  // namespace cpu
}  // namespace torchprune
