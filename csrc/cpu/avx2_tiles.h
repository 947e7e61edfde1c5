// Register-tile pieces shared by the AVX2 fp32 kernels (cpu/spmm_avx2.cpp for CSR,
// cpu/bsr_avx2.cpp for block-sparse): the 8x8 transposing load and the store of a finished
// group of 8 output features into row-major y. Only include this from files whose callers check
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

// r[i] = column i of the 8x8 block of floats at src (row i at src + i * ld): the block
// transposed, as it is loaded. Each register is loaded as two 4-float halves, rows i and i + 4
// (vinsertf128 from memory, a load and an ALU uop that need not use the shuffle port), so only
// the 4x4 transposes inside the 128-bit lanes are left: 16 shuffles, where transposing eight
// loaded rows takes 24, 8 of them lane-crossing (on Intel cores every shuffle goes to one port).
// Measured alone, on an Intel Xeon, the difference was within the noise of the layer timings.
TP_AVX2_INLINE void load_transposed8(const float* src, int64_t ld, __m256 r[8]) {
  _Pragma("GCC unroll 2") for (int h = 0; h < 2; ++h) {  // columns 4h .. 4h + 3
    __m256 a[4];
    _Pragma("GCC unroll 4") for (int i = 0; i < 4; ++i) {
      a[i] = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(src + i * ld + 4 * h)),
                                  _mm_loadu_ps(src + (i + 4) * ld + 4 * h), 1);
    }
    const __m256 t0 = _mm256_unpacklo_ps(a[0], a[1]), t1 = _mm256_unpackhi_ps(a[0], a[1]);
    const __m256 t2 = _mm256_unpacklo_ps(a[2], a[3]), t3 = _mm256_unpackhi_ps(a[2], a[3]);
    r[4 * h + 0] = _mm256_shuffle_ps(t0, t2, 0x44);
    r[4 * h + 1] = _mm256_shuffle_ps(t0, t2, 0xEE);
    r[4 * h + 2] = _mm256_shuffle_ps(t1, t3, 0x44);
    r[4 * h + 3] = _mm256_shuffle_ps(t1, t3, 0xEE);
  }
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
      load_transposed8(&buf[0][8 * h], 8 * V, r);
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
