// Register-tile pieces shared by the AVX2 fp32 kernels (cpu/spmm_avx2.cpp for CSR,
// cpu/bsr_avx2.cpp for block-sparse): the 8x8 transpose and the store of a finished group of
// 8 output features into row-major y. Only include this from files whose callers check
// avx2::supported() first: every function is compiled for AVX2 + FMA.
#pragma once

#include <immintrin.h>

#include <cstdint>

#define TP_AVX2 __attribute__((target("avx2,fma")))
#define TP_AVX2_INLINE TP_AVX2 inline __attribute__((always_inline))

namespace torchprune {
namespace cpu {
namespace avx2 {

constexpr int64_t kGroup = 8;        // output features per transposed store
constexpr int64_t kChunkRows = 512;  // feature rows per pass through the K-blocks (multiple of kGroup)

// Transposes the 8x8 block held in r[0..7] (row i becomes column i).
TP_AVX2_INLINE void transpose8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// Stores the finished results of `rows` features n0.. (buf[r][t], r < rows) plus init into y:
// a full group of 8 over the full tile width by 8x8 register transposes, anything else by
// scalar stores.
template <int V>
TP_AVX2_INLINE void store_group(const float (*buf)[8 * V], int64_t rows, int64_t width,
                                const float* init, float* y, int64_t ldy, int64_t n0) {
  if (rows == kGroup && width == 8 * V) {
    const __m256 bias = init ? _mm256_loadu_ps(init + n0) : _mm256_setzero_ps();
    _Pragma("GCC unroll 4") for (int h = 0; h < V; ++h) {
      __m256 r[8];
      _Pragma("GCC unroll 8") for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(&buf[i][8 * h]);
      transpose8(r);
      _Pragma("GCC unroll 8") for (int i = 0; i < 8; ++i)
        _mm256_storeu_ps(y + (8 * h + i) * ldy + n0, _mm256_add_ps(r[i], bias));
    }
    return;
  }
  for (int64_t t = 0; t < width; ++t) {
    for (int64_t r = 0; r < rows; ++r) y[t * ldy + n0 + r] = buf[r][t] + (init ? init[n0 + r] : 0.f);
  }
}

}  // namespace avx2
}  // namespace cpu
}  // namespace torchprune
