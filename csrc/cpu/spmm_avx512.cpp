// AVX-512 versions of the forward hot paths for batch > 1: spmm and spmm_offsets (contract in
// spmm.h), and the wide-tile panel product of sparse_linear (contract in spmm_avx2.h).
//
// The portable loop in spmm.cpp leaves the compiler to keep accumulators in registers and to
// handle ragged tile edges; measured here it ran at 4-5 GF/s, a fraction of what the machine
// does. This kernel states it explicitly: masked loads and stores cover any tile width (no
// scalar edge loop), and each row keeps four independent FMA chains in flight (4 nonzeros x 1
// register, or 2 x 2), enough to hide the FMA latency. (A hand-written gather spmv for batch 1
// lost to the compiler's vectorization of spmm.cpp's loop, 0.94 vs 0.73 ms at 4096x4096, 90%,
// so batch 1 stays there.)
//
// The panel product is the AVX2 kernel's (spmm_avx2.cpp: 32-wide Xᵀ panels, K-blocks, 8x8
// transposed stores) with each stored value scaling its panel row in two 512-bit FMAs instead of
// four 256-bit ones. Measured on an Intel Xeon (family 6 model 167), 2 threads, MiniLM's layer
// shapes at 70-95% sparsity, each layer alone: 4-15% less time than the AVX2 kernel at 128 rows
// of x, 10-26% at 512; in the whole 90% MiniLM model only 0-1% at 1 x 128 tokens and 2-3% at
// 8 x 128 (benchmarks/README.md). Wider panels (64 rows, 4 registers) were slower at every K
// block tried (192, 384), prefetching the panel rows of later nonzeros was slower too, and
// 16-wide panels (8 nonzeros in flight), faster layer by layer, were 4% slower in the model.
//
// Two nonzeros in flight (U = 2, as the AVX2 kernel has), not four: each row then pays for half
// the accumulators, one masked tail FMA pair instead of three and two adds instead of six, and
// the FMA latency of one row is hidden by the next row's independent work. On the same Xeon
// (medians of 5 alternating processes, with the packing changes of spmm_avx2.cpp): MiniLM's
// intermediate weight (1536x384) at 95%, 128 rows, 2 threads, 87.7 -> 77.1 us; a 98% 300x64
// weight at 450 rows, 1 thread, 50.3 -> 38.3 us, where rows hold one or two entries and the
// per-row work was most of the time.
//
// Only functions marked TP_AVX512 use the instructions, and callers use them only when
// enabled(): a CPU with AVX-512 F, BW, VL and DQ, and no switch set.
#include "cpu/spmm_avx512.h"

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "cpu/avx2_tiles.h"
#include "cpu/panel_rows.h"

namespace torchprune {
namespace cpu {
namespace avx512 {
namespace {

#define TP_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx2")))
#define TP_AVX512_INLINE TP_AVX512 inline __attribute__((always_inline))

template <typename T>
struct Vec;

template <>
struct Vec<float> {
  using R = __m512;
  using Mask = __mmask16;
  static constexpr int64_t kLanes = 16;
  TP_AVX512_INLINE static Mask mask(int64_t n) {
    return n >= 16 ? Mask(0xFFFF) : n <= 0 ? Mask(0) : Mask((1u << n) - 1);
  }
  TP_AVX512_INLINE static R zero() { return _mm512_setzero_ps(); }
  TP_AVX512_INLINE static R set1(float v) { return _mm512_set1_ps(v); }
  TP_AVX512_INLINE static R load(const float* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
  TP_AVX512_INLINE static void store(float* p, Mask m, R v) { _mm512_mask_storeu_ps(p, m, v); }
  TP_AVX512_INLINE static R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  TP_AVX512_INLINE static R add(R a, R b) { return _mm512_add_ps(a, b); }
};

template <>
struct Vec<double> {
  using R = __m512d;
  using Mask = __mmask8;
  static constexpr int64_t kLanes = 8;
  TP_AVX512_INLINE static Mask mask(int64_t n) {
    return n >= 8 ? Mask(0xFF) : n <= 0 ? Mask(0) : Mask((1u << n) - 1);
  }
  TP_AVX512_INLINE static R zero() { return _mm512_setzero_pd(); }
  TP_AVX512_INLINE static R set1(double v) { return _mm512_set1_pd(v); }
  TP_AVX512_INLINE static R load(const double* p, Mask m) { return _mm512_maskz_loadu_pd(m, p); }
  TP_AVX512_INLINE static void store(double* p, Mask m, R v) { _mm512_mask_storeu_pd(p, m, v); }
  TP_AVX512_INLINE static R fma(R a, R b, R c) { return _mm512_fmadd_pd(a, b, c); }
  TP_AVX512_INLINE static R add(R a, R b) { return _mm512_add_pd(a, b); }
};

// Rows [r0, r1) times one tile of b, width <= V * lanes columns; U nonzeros per step.
// row_of(e) is where the tile's part of the b row that entry e multiplies starts, which is how
// one kernel serves CSR columns (b + col * ldb) and conv offsets (image + offset) alike. Column t
// of row n goes to c[n * crs + t * ccs].
template <typename T, int V, typename RowOf>
TP_AVX512 void tile_rows(const int32_t* row_ptr, const T* val, RowOf row_of, int64_t width,
                         const T* init, T* c, int64_t crs, int64_t ccs, int64_t r0, int64_t r1) {
  using X = Vec<T>;
  constexpr int U = 4 / V;
  typename X::Mask mk[V];
  _Pragma("GCC unroll 4") for (int v = 0; v < V; ++v) mk[v] = X::mask(width - v * X::kLanes);
  for (int64_t n = r0; n < r1; ++n) {
    typename X::R acc[U][V];
    _Pragma("GCC unroll 4") for (int u = 0; u < U; ++u)
      _Pragma("GCC unroll 4") for (int v = 0; v < V; ++v) acc[u][v] = X::zero();
    int64_t e = row_ptr[n];
    const int64_t end = row_ptr[n + 1];
    for (; e + U <= end; e += U) {
      _Pragma("GCC unroll 4") for (int u = 0; u < U; ++u) {
        const typename X::R w = X::set1(val[e + u]);
        const T* row = row_of(e + u);
        _Pragma("GCC unroll 4") for (int v = 0; v < V; ++v) acc[u][v] = X::fma(w, X::load(row + v * X::kLanes, mk[v]), acc[u][v]);
      }
    }
    for (; e < end; ++e) {
      const typename X::R w = X::set1(val[e]);
      const T* row = row_of(e);
      _Pragma("GCC unroll 4") for (int v = 0; v < V; ++v) acc[0][v] = X::fma(w, X::load(row + v * X::kLanes, mk[v]), acc[0][v]);
    }
    T out[V * X::kLanes];
    _Pragma("GCC unroll 4") for (int v = 0; v < V; ++v) {
      typename X::R s = X::set1(init ? init[n] : T(0));
      _Pragma("GCC unroll 4") for (int u = 0; u < U; ++u) s = X::add(s, acc[u][v]);
      if (ccs == 1) {
        X::store(c + n * crs + v * X::kLanes, mk[v], s);
      } else {
        X::store(out + v * X::kLanes, mk[v], s);
      }
    }
    if (ccs != 1) {
      T* dst = c + n * crs;
      for (int64_t t = 0; t < width; ++t) dst[t * ccs] = out[t];
    }
  }
}

// The AVX-512 registers of panel_rows' PanelKernel (cpu/panel_rows.h), the traversal
// avx2::spmm_panel's kernel uses too (same K-blocks, same groups): 16 floats.
struct Zmm {
  using T = __m512;
  static constexpr int64_t kLanes = 16;
  TP_AVX512 static inline T zero() { return _mm512_setzero_ps(); }
  TP_AVX512 static inline T load(const float* p) { return _mm512_loadu_ps(p); }
  TP_AVX512 static inline T broadcast(const float* p) { return _mm512_set1_ps(*p); }
  TP_AVX512 static inline T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  TP_AVX512 static inline T fma_if(bool on, T a, T b, T c) {
    return _mm512_mask3_fmadd_ps(a, b, c, on ? __mmask16(0xFFFF) : __mmask16(0));
  }
  TP_AVX512 static inline T add(T a, T b) { return _mm512_add_ps(a, b); }
  TP_AVX512 static inline void store(float* p, T v) { _mm512_storeu_ps(p, v); }
  template <int G>
  TP_AVX512 static inline void store_group(const float (*buf)[8 * G], int64_t rows, int64_t width,
                                           const float* init, float* y, int64_t ldy, int64_t n0) {
    avx2::store_group<G>(buf, rows, width, init, y, ldy, n0);
  }
};

template <int V, int U, typename I>
TP_AVX512 TP_FLATTEN void panel_kernel(const Csr<float, I>& a, const avx2::KBlocks& kb,
                                       const float* panel, int64_t width, const float* init,
                                       float* y, int64_t ldy, int64_t r0, int64_t r1) {
  panel_rows<16 * V>(kb, r0, r1, PanelKernel<Zmm, V, U, I>{a, panel, width, init, y, ldy});
}

}  // namespace

template <typename T, typename I>
TP_AVX512 void spmm(const Csr<T, I>& a, const T* b, int64_t ldb, int64_t m, const T* init, T* c,
                    int64_t crs, int64_t ccs, int64_t r0, int64_t r1) {
  constexpr int64_t lanes = Vec<T>::kLanes;
  const I* col = a.col;
  if (m <= lanes) {
    auto row_of = [=](int64_t e) { return b + static_cast<int64_t>(col[e]) * ldb; };
    tile_rows<T, 1>(a.row_ptr, a.val, row_of, m, init, c, crs, ccs, r0, r1);
    return;
  }
  for (int64_t t0 = 0; t0 < m; t0 += 2 * lanes) {
    const T* bt = b + t0;
    auto row_of = [=](int64_t e) { return bt + static_cast<int64_t>(col[e]) * ldb; };
    tile_rows<T, 2>(a.row_ptr, a.val, row_of, m - t0 < 2 * lanes ? m - t0 : 2 * lanes, init,
                    c + t0 * ccs, crs, ccs, r0, r1);
  }
}

template <typename T>
TP_AVX512 void spmm_offsets(const int32_t* row_ptr, const int32_t* offset, const T* val,
                            const T* b, int64_t m, const T* init, T* c, int64_t crs, int64_t r0,
                            int64_t r1) {
  constexpr int64_t lanes = Vec<T>::kLanes;
  if (m <= lanes) {
    auto row_of = [=](int64_t e) { return b + offset[e]; };
    tile_rows<T, 1>(row_ptr, val, row_of, m, init, c, crs, 1, r0, r1);
    return;
  }
  for (int64_t t0 = 0; t0 < m; t0 += 2 * lanes) {
    const T* bt = b + t0;
    auto row_of = [=](int64_t e) { return bt + offset[e]; };
    tile_rows<T, 2>(row_ptr, val, row_of, m - t0 < 2 * lanes ? m - t0 : 2 * lanes, init, c + t0,
                    crs, 1, r0, r1);
  }
}

template void spmm_offsets<float>(const int32_t*, const int32_t*, const float*, const float*,
                                  int64_t, const float*, float*, int64_t, int64_t, int64_t);
template void spmm_offsets<double>(const int32_t*, const int32_t*, const double*, const double*,
                                   int64_t, const double*, double*, int64_t, int64_t, int64_t);

#define TP_INSTANTIATE(T, I)                                                                 \
  template void spmm<T, I>(const Csr<T, I>&, const T*, int64_t, int64_t, const T*, T*,       \
                           int64_t, int64_t, int64_t, int64_t);
TP_INSTANTIATE(float, uint16_t)
TP_INSTANTIATE(float, int32_t)
TP_INSTANTIATE(double, uint16_t)
TP_INSTANTIATE(double, int32_t)

template <typename I>
void spmm_panel(const Csr<float, I>& a, const avx2::KBlocks& kb, const float* panel, int64_t width,
                const float* init, float* y, int64_t ldy, int64_t r0, int64_t r1) {
  panel_kernel<2, 2>(a, kb, panel, width, init, y, ldy, r0, r1);
}
template void spmm_panel<uint16_t>(const Csr<float, uint16_t>&, const avx2::KBlocks&, const float*,
                                   int64_t, const float*, float*, int64_t, int64_t, int64_t);
template void spmm_panel<int32_t>(const Csr<float, int32_t>&, const avx2::KBlocks&, const float*,
                                  int64_t, const float*, float*, int64_t, int64_t, int64_t);

bool supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}

bool enabled() {
  static const bool use = supported() && std::getenv("TORCHPRUNE_NO_AVX512") == nullptr &&
                          std::getenv("TORCHPRUNE_PORTABLE") == nullptr;
  return use;
}

}  // namespace avx512
}  // namespace cpu
}  // namespace torchprune
