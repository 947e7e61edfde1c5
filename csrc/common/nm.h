// The N:8 weight format of nm_sparse_linear: every aligned group of 8 input columns (a window)
// of every row of W [out_features, in_features] stores exactly n entries (its slots), 1 <= n <= 8,
// and in_features is a multiple of 8.
//
//   codes   int32 [out_features, ceil(S / 8)]   S = in_features / 8 * n slots per row; code c
//                                                holds the window positions (0..7) of slots
//                                                8c .. 8c+7, 3 bits each: slot 8c+i at bits
//                                                3i .. 3i+2 (unused high bits zero)
//   values  [out_features, S]                   values[r, s] = W[r, (s / n) * 8 + position(s)]
//
// Positions ascend within a window, so each column appears once and a row's columns ascend (the
// row is a CSR row with implicit pointers). A window with fewer than n kept weights stores zeros
// at unused positions. Any N:M mask with M in {2, 4, 8} is an n:8 mask with n = 8N/M (2:4 and
// 4:8 are n = 4, 1:4 and 2:8 are n = 2).
//
// Why this: 4.5 bytes per fp32 weight (4 + 0.5 of index) instead of CSR's 6, no row pointers, and
// a batch-1 kernel with no gathers: one aligned 8-column load of x per window and a register
// permute by the slots' positions (cpu/nm_avx2.cpp), where CSR gathers x entry by entry.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace torchprune {

// Slots per window, window width and bits per position of the format.
constexpr int64_t kNmWindow = 8;
constexpr int kNmPositionBits = 3;

// A read-only view of one N:8 matrix.
template <typename T>
struct Nm {
  const int32_t* codes;  // [rows, chunks]
  const T* val;          // [rows, slots]
  int64_t rows;
  int64_t cols;    // in_features (a multiple of 8)
  int64_t n;       // slots per window
  int64_t slots;   // per row: cols / 8 * n
  int64_t chunks;  // per row: ceil(slots / 8)

  // The input column of slot s of row r (one division: for single slots, not for whole rows).
  int64_t column(int64_t r, int64_t s) const {
    const uint32_t code = static_cast<uint32_t>(codes[r * chunks + s / 8]);
    return (s / n) * kNmWindow + ((code >> (kNmPositionBits * (s % 8))) & 7u);
  }

  // fn(slot, column) for every slot of row r in order, walking windows instead of dividing.
  template <typename Fn>
  void for_each_slot(int64_t r, Fn&& fn) const {
    const int32_t* code = codes + r * chunks;
    int64_t s = 0;
    for (int64_t base = 0; base < cols; base += kNmWindow) {
      for (int64_t j = 0; j < n; ++j, ++s) {
        const uint32_t bits = static_cast<uint32_t>(code[s >> 3]) >> (kNmPositionBits * (s & 7));
        fn(s, base + (bits & 7u));
      }
    }
  }
};

// Checks the N:8 tensors at an op boundary in O(1): dtypes, 2-D shapes that agree with each
// other and with in_features (a multiple of 8), contiguity, one device. Returns n (0 when
// in_features is 0). The positions are not walked: what pack_nm writes is valid by construction,
// and the tp.nn modules run the Python check_nm when a state_dict is loaded.
int64_t check_nm(const char* op, const at::Tensor& codes, const at::Tensor& values,
                 int64_t in_features);

}  // namespace torchprune
