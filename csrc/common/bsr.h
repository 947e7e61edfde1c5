// The block-sparse weight format of block_sparse_linear: BSR with blocks of R consecutive output
// rows by 1 input column (R x 1), over a 2-D weight [out_features, in_features].
//
//   block_ptr  int32 [out_features / R + 1]   block row b (output rows b*R .. b*R+R-1) owns
//                                              blocks block_ptr[b] .. block_ptr[b+1]-1
//   col_idx    int16 or int32 [blocks]         the input column of each block (int16 holding an
//                                              unsigned value below 65536 columns, as in csr.h)
//   values     [blocks, R]                     values[j, i] = W[b*R + i, col_idx[j]]
//
// Structurally it is a CSR (csr.h) over the block rows whose entries carry R values, so the
// same checks, K-block splits and row panels apply, with Csr::rows = out_features / R and
// Csr::val pointing at R values per entry. Why R x 1: one load of an input column (a panel row
// of x) feeds R output features, so the panel traffic per multiply-add drops R-fold against
// CSR, and at batch 1 a block is R contiguous values behind one index (4.5 bytes per fp32
// weight at R = 8 instead of 6). R must divide out_features.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "common/csr.h"

namespace torchprune {

// Checks the block-sparse tensors at an op boundary (O(1), as check_csr with structure=false):
// values is 2-D [blocks, R] with R >= 1, and block_ptr / col_idx are a CSR over the block rows.
// Returns R.
int64_t check_bsr(const char* op, const at::Tensor& block_ptr, const at::Tensor& col_idx,
                  const at::Tensor& values, int64_t in_features);

}  // namespace torchprune
