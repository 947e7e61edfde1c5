// AVX2 fp32 kernel of nm_sparse_linear (contract in nm_avx2.h).
//
// Accumulators: U chunks in flight for each of the T rows of x (U x T independent FMA chains,
// 4 or more, to hide the FMA latency), summed once per weight row. The slots of a last partial
// chunk (in_features / 8 * n not a multiple of 8) are done in scalar code, so no load reads past
// the row of x.
#include "cpu/nm_avx2.h"

#include "cpu/avx2_tiles.h"

namespace torchprune {
namespace cpu {
namespace avx2 {
namespace {

// The x values that one chunk's 8 slots multiply: window J of the chunk fills lanes
// [J * N, J * N + N), each lane picking its position out of the window's 8 columns.
template <int N, int J>
TP_AVX2_INLINE __m256 chunk_x(const float* x, __m256i positions, __m256 picked) {
  if constexpr (J == 8 / N) {
    return picked;
  } else {
    const __m256 window = _mm256_permutevar8x32_ps(_mm256_loadu_ps(x + 8 * J), positions);
    constexpr int lanes = ((1 << N) - 1) << (J * N);
    return chunk_x<N, J + 1>(x, positions, _mm256_blend_ps(picked, window, lanes));
  }
}

TP_AVX2_INLINE __m256i chunk_positions(int32_t code) {
  const __m256i shifts = _mm256_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21);
  return _mm256_srlv_epi32(_mm256_set1_epi32(code), shifts);
}

TP_AVX2_INLINE float sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// acc[t] += the 8 values of chunk c times the x values they multiply, for the T rows of x.
template <int N, int T>
TP_AVX2_INLINE void chunk_step(const int32_t* code, const float* v, const float* x, int64_t ldx,
                               int64_t c, __m256 acc[T]) {
  constexpr int64_t cols_per_chunk = 64 / N;  // 8 slots = 8 / N windows of 8 columns
  const __m256i positions = chunk_positions(code[c]);
  const __m256 w = _mm256_loadu_ps(v + 8 * c);
  _Pragma("GCC unroll 4") for (int t = 0; t < T; ++t) {
    const float* xc = x + t * ldx + c * cols_per_chunk;
    const __m256 first = _mm256_permutevar8x32_ps(_mm256_loadu_ps(xc), positions);
    acc[t] = _mm256_fmadd_ps(w, chunk_x<N, 1>(xc, positions, first), acc[t]);
  }
}

// N slots per window, T rows of x, U chunks unrolled.
template <int N, int T, int U>
TP_AVX2 void nm_kernel(const Nm<float>& a, const float* x, int64_t ldx, const float* init,
                       float* y, int64_t ldy, int64_t r0, int64_t r1) {
  const int64_t full = a.slots / 8;
  for (int64_t r = r0; r < r1; ++r) {
    const int32_t* code = a.codes + r * a.chunks;
    const float* v = a.val + r * a.slots;
    __m256 acc[U][T];
    _Pragma("GCC unroll 4") for (int u = 0; u < U; ++u)
      _Pragma("GCC unroll 4") for (int t = 0; t < T; ++t) acc[u][t] = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + U <= full; c += U) {
      _Pragma("GCC unroll 4") for (int u = 0; u < U; ++u) {
        chunk_step<N, T>(code, v, x, ldx, c + u, acc[u]);
      }
    }
    for (; c < full; ++c) chunk_step<N, T>(code, v, x, ldx, c, acc[0]);
    _Pragma("GCC unroll 4") for (int t = 0; t < T; ++t) {
      __m256 total = acc[0][t];
      _Pragma("GCC unroll 4") for (int u = 1; u < U; ++u) total = _mm256_add_ps(total, acc[u][t]);
      float out = sum8(total);
      for (int64_t s = full * 8; s < a.slots; ++s) out += v[s] * x[t * ldx + a.column(r, s)];
      y[t * ldy + r] = out + (init ? init[r] : 0.f);
    }
  }
}

template <int N>
void nm_rows_n(const Nm<float>& a, const float* x, int64_t ldx, int64_t m, const float* init,
               float* y, int64_t ldy, int64_t r0, int64_t r1) {
  switch (m) {
    case 1: return nm_kernel<N, 1, 4>(a, x, ldx, init, y, ldy, r0, r1);
    case 2: return nm_kernel<N, 2, 2>(a, x, ldx, init, y, ldy, r0, r1);
    case 3: return nm_kernel<N, 3, 1>(a, x, ldx, init, y, ldy, r0, r1);
    default: return nm_kernel<N, 4, 1>(a, x, ldx, init, y, ldy, r0, r1);
  }
}

}  // namespace

void nm_rows(const Nm<float>& a, const float* x, int64_t ldx, int64_t m, const float* init,
             float* y, int64_t ldy, int64_t row_begin, int64_t row_end) {
  switch (a.n) {
    case 1: return nm_rows_n<1>(a, x, ldx, m, init, y, ldy, row_begin, row_end);
    case 2: return nm_rows_n<2>(a, x, ldx, m, init, y, ldy, row_begin, row_end);
    default: return nm_rows_n<4>(a, x, ldx, m, init, y, ldy, row_begin, row_end);
  }
}

}  // namespace avx2
}  // namespace cpu
}  // namespace torchprune
