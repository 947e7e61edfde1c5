// where(mask, src, 0) over one contiguous span: the arithmetic every masked op shares.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace torchprune {

// The unsigned integer with the bit width of scalar_t: masking is done on the bits.
template <typename scalar_t>
using bits_of = std::conditional_t<
    sizeof(scalar_t) == 8, uint64_t,
    std::conditional_t<sizeof(scalar_t) == 4, uint32_t, uint16_t>>;

// out[i] = keep[i] ? src[i] : 0 for i < n, serially. `keep` holds torch's bools (bytes 0 / 1).
// A select, not a multiply, so a pruned entry is exactly +0 even when the stored weight holds inf
// or nan. Written as a bitwise AND with 0 or all-ones, branch-free, so the compiler vectorizes
// it. `out` is either `src` itself or a separate buffer, never a shifted overlap, so there is no
// cross-iteration dependence (hence `omp simd`).
template <typename scalar_t>
inline void mask_span(const scalar_t* src, const uint8_t* keep, scalar_t* out, int64_t n) {
  using bits_t = bits_of<scalar_t>;
  static_assert(sizeof(bits_t) == sizeof(scalar_t), "no integer type of this width");
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    bits_t bits;
    std::memcpy(&bits, src + i, sizeof(bits_t));
    bits &= static_cast<bits_t>(bits_t(0) - bits_t(keep[i]));
    std::memcpy(out + i, &bits, sizeof(bits_t));
  }
}

}  // namespace torchprune
