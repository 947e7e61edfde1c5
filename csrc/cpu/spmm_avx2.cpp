// AVX2 kernels of sparse_linear for batches > 1, fp32 (contracts in spmm_avx2.h): the panel
// packing, the forward product and the value-gradient SDDMM.
//
// Per stored value w = a[n, j] the forward does one broadcast and tile/8 FMAs with panel row j,
// in independent chains (4 nonzeros x 2 registers for a 16-wide tile, 2 x 4 for 32) so the FMA
// latency is hidden. Eight consecutive output features form a group: their tile x 8 results are
// transposed in registers (8x8 blocks) and stored as rows of y, one 8-float store per row,
// instead of tile strided scalar stores per feature. K is split into blocks of 384 columns when
// the K x tile panel would not fit L1; each row then carries a partial sum between blocks, and
// rows go through the blocks 512 at a time so those sums stay in L2. Measured on an AMD EPYC
// Zen 3 (AVX2), one thread, 90% random sparsity: 15-35 GF/s per core where the portable loop did
// about 3 (K = 384 to 3072); see benchmarks/README.md and docs/kernels.md for what limits it.
#include "cpu/spmm_avx2.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "cpu/avx2_tiles.h"
#include "cpu/panel_rows.h"
#include "cpu/spmm_avx512.h"

namespace torchprune {
namespace cpu {
namespace avx2 {
namespace {

// The AVX2 registers of panel_rows' PanelKernel (cpu/panel_rows.h): 8 floats.
struct Ymm {
  using T = __m256;
  static constexpr int64_t kLanes = 8;
  TP_AVX2 static inline T zero() { return _mm256_setzero_ps(); }
  TP_AVX2 static inline T load(const float* p) { return _mm256_loadu_ps(p); }
  TP_AVX2 static inline T broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  TP_AVX2 static inline T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  TP_AVX2 static inline T fma_if(bool on, T a, T b, T c) {
    return _mm256_blendv_ps(c, _mm256_fmadd_ps(a, b, c),
                            _mm256_castsi256_ps(_mm256_set1_epi32(-static_cast<int>(on))));
  }
  TP_AVX2 static inline T add(T a, T b) { return _mm256_add_ps(a, b); }
  TP_AVX2 static inline void store(float* p, T v) { _mm256_storeu_ps(p, v); }
  template <int G>
  TP_AVX2 static inline void store_group(const float (*buf)[8 * G], int64_t rows, int64_t width,
                                         const float* init, float* y, int64_t ldy, int64_t n0) {
    avx2::store_group<G>(buf, rows, width, init, y, ldy, n0);
  }
};

// The forward over rows [r0, r1) of one panel: V registers per row, U nonzeros in flight.
template <int V, int U, typename I>
TP_AVX2 TP_FLATTEN void panel_kernel(const Csr<float, I>& a, const KBlocks& kb, const float* panel,
                                     int64_t width, const float* init, float* y, int64_t ldy,
                                     int64_t r0, int64_t r1) {
  panel_rows<8 * V>(kb, r0, r1, PanelKernel<Ymm, V, U, I>{a, panel, width, init, y, ldy});
}

// The 8 horizontal sums of s[0..7] as one vector: lane i is the sum of s[i]'s lanes.
TP_AVX2_INLINE __m256 sum8(const __m256 s[8]) {
  const __m256 t0 = _mm256_hadd_ps(s[0], s[1]), t1 = _mm256_hadd_ps(s[2], s[3]);
  const __m256 t2 = _mm256_hadd_ps(s[4], s[5]), t3 = _mm256_hadd_ps(s[6], s[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

template <int V, typename I>
TP_AVX2 void sddmm_kernel(const Csr<float, I>& a, const float* g, const float* x,
                          bool accumulate, float* out, int64_t r0, int64_t r1) {
  constexpr int64_t W = 8 * V;
  for (int64_t n = r0; n < r1; ++n) {
    __m256 gn[V];
    _Pragma("GCC unroll 4") for (int v = 0; v < V; ++v) gn[v] = _mm256_loadu_ps(g + n * W + 8 * v);
    int64_t e = a.row_ptr[n];
    const int64_t end = a.row_ptr[n + 1];
    for (; e + 8 <= end; e += 8) {
      __m256 s[8];
      _Pragma("GCC unroll 8") for (int i = 0; i < 8; ++i) {
        const float* xr = x + static_cast<int64_t>(a.col[e + i]) * W;
        s[i] = _mm256_mul_ps(gn[0], _mm256_loadu_ps(xr));
        _Pragma("GCC unroll 4") for (int v = 1; v < V; ++v)
          s[i] = _mm256_fmadd_ps(gn[v], _mm256_loadu_ps(xr + 8 * v), s[i]);
      }
      __m256 sums = sum8(s);
      if (accumulate) sums = _mm256_add_ps(sums, _mm256_loadu_ps(out + e));
      _mm256_storeu_ps(out + e, sums);
    }
    for (; e < end; ++e) {
      const float* xr = x + static_cast<int64_t>(a.col[e]) * W;
      __m256 s = _mm256_mul_ps(gn[0], _mm256_loadu_ps(xr));
      _Pragma("GCC unroll 4") for (int v = 1; v < V; ++v)
        s = _mm256_fmadd_ps(gn[v], _mm256_loadu_ps(xr + 8 * v), s);
      const __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
      const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
      const float total = _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps(q, q, 1)));
      out[e] = accumulate ? out[e] + total : total;
    }
  }
}

}  // namespace

bool supported() {
  static const bool use = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           std::getenv("TORCHPRUNE_PORTABLE") == nullptr &&
           std::getenv("TORCHPRUNE_NO_AVX2") == nullptr;
  }();
  return use;
}

// Column blocks outside, row groups inside: each block of 8 columns fills 8 whole panel rows,
// tile floats each, which lie one after another (contiguous stores), before the next block. The
// other order (row groups outside) wrote each 128-byte panel row in four pieces, in four passes
// over the whole panel (k * 128 bytes: 48 KiB at k = 384, 192 KiB at 1536). On an Intel Xeon
// (family 6 model 167; medians of 3 alternating processes) this order took a 384x1536 weight at
// 95%, 128 rows, 2 threads, from 109.6 to 100.1 us, and a 100x300 one at 98%, 450 rows, 1
// thread, from 61.5 to 46.8 us.
TP_AVX2 void pack_panel(const float* x, int64_t ldx, int64_t m, int64_t k, int64_t tile,
                        int64_t t, float* panel) {
  const int64_t t0 = t * tile;
  const int64_t k8 = k / 8 * 8;
  const int64_t rows = std::max<int64_t>(0, std::min<int64_t>(tile, m - t0)), groups = rows / 8;
  const float* src = x + t0 * ldx;
  for (int64_t j = 0; j < k8; j += 8) {
    for (int64_t g = 0; g < groups; ++g) {
      __m256 r[8];
      load_transposed8(src + 8 * g * ldx + j, ldx, r);
      _Pragma("GCC unroll 8") for (int i = 0; i < 8; ++i)
        _mm256_storeu_ps(panel + (j + i) * tile + 8 * g, r[i]);
    }
  }
  for (int64_t j = k8; j < k; ++j) {
    for (int64_t i = 0; i < 8 * groups; ++i) panel[j * tile + i] = src[i * ldx + j];
  }
  for (int64_t i = 8 * groups; i < rows; ++i) {  // the last rows, fewer than 8
    for (int64_t j = 0; j < k; ++j) panel[j * tile + i] = src[i * ldx + j];
  }
  if (rows < tile) {  // zero padding past m
    for (int64_t j = 0; j < k; ++j) std::fill(panel + j * tile + rows, panel + (j + 1) * tile, 0.f);
  }
}

template <typename I>
void spmm_panel(const Csr<float, I>& a, const KBlocks& kb, const float* panel, int64_t tile,
                int64_t width, const float* init, float* y, int64_t ldy, int64_t r0, int64_t r1) {
  if (tile == kNarrowTile) {
    panel_kernel<2, 4>(a, kb, panel, width, init, y, ldy, r0, r1);
  } else if (avx512::enabled()) {
    avx512::spmm_panel(a, kb, panel, width, init, y, ldy, r0, r1);
  } else {
    panel_kernel<4, 2>(a, kb, panel, width, init, y, ldy, r0, r1);
  }
}

template <typename I>
void sddmm_panel(const Csr<float, I>& a, const float* g, const float* x, int64_t tile,
                 bool accumulate, float* out, int64_t r0, int64_t r1) {
  if (tile == kNarrowTile) {
    sddmm_kernel<2>(a, g, x, accumulate, out, r0, r1);
  } else {
    sddmm_kernel<4>(a, g, x, accumulate, out, r0, r1);
  }
}

template void sddmm_panel<uint16_t>(const Csr<float, uint16_t>&, const float*, const float*,
                                    int64_t, bool, float*, int64_t, int64_t);
template void sddmm_panel<int32_t>(const Csr<float, int32_t>&, const float*, const float*,
                                   int64_t, bool, float*, int64_t, int64_t);
template void spmm_panel<uint16_t>(const Csr<float, uint16_t>&, const KBlocks&, const float*,
                                   int64_t, int64_t, const float*, float*, int64_t, int64_t,
                                   int64_t);
template void spmm_panel<int32_t>(const Csr<float, int32_t>&, const KBlocks&, const float*,
                                  int64_t, int64_t, const float*, float*, int64_t, int64_t,
                                  int64_t);

}  // namespace avx2
}  // namespace cpu
}  // namespace torchprune
