// Sparse-times-dense kernels on CSR rows (see spmm.h for the contracts).
//
// The loops are written so that the compiler vectorizes them (fixed-width column tiles held in
// registers, `omp simd` reductions over gathered columns), and each entry point is compiled
// three times through target_clones: AVX-512, AVX2+FMA and baseline x86-64. The loader picks
// the best clone for the CPU, so one wheel runs everywhere and uses the wide units where they
// exist; there is no separate intrinsics code to keep in sync with a scalar reference.
#include "cpu/spmm.h"

#include "cpu/spmm_avx512.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace torchprune {
namespace cpu {
namespace {

#define TP_ALWAYS_INLINE inline __attribute__((always_inline))
#define TP_CLONES __attribute__((target_clones("avx512f", "avx2,fma", "default")))
// Unrolls the gather-dot of spmv with several partial sums, so that consecutive gathers and FMAs
// do not wait on one accumulator.
#define TP_SPLIT_ACCUMULATORS \
  __attribute__((optimize("unroll-loops", "variable-expansion-in-unroller")))

// One sparse row times a tile of W columns of b (or fewer at the right edge): row_of(e) points at
// the tile's part of the b row entry e multiplies. The row's nonzeros are consumed two at a time
// into two accumulator sets, so the FMA chains overlap.
template <typename T, int64_t W, typename RowOf>
TP_ALWAYS_INLINE void row_times_slab(const int32_t* row_ptr, const T* val, int64_t n,
                                     RowOf row_of, int64_t width, T init, T* __restrict out) {
  T acc0[W], acc1[W];
  for (int64_t t = 0; t < W; ++t) {
    acc0[t] = init;
    acc1[t] = 0;
  }
  int64_t e = row_ptr[n];
  const int64_t end = row_ptr[n + 1];
  if (width == W) {
    for (; e + 1 < end; e += 2) {
      const T v0 = val[e], v1 = val[e + 1];
      const T* __restrict b0 = row_of(e);
      const T* __restrict b1 = row_of(e + 1);
#pragma omp simd
      for (int64_t t = 0; t < W; ++t) {
        acc0[t] += v0 * b0[t];
        acc1[t] += v1 * b1[t];
      }
    }
    for (; e < end; ++e) {
      const T v = val[e];
      const T* __restrict b0 = row_of(e);
#pragma omp simd
      for (int64_t t = 0; t < W; ++t) acc0[t] += v * b0[t];
    }
  } else {
    for (; e < end; ++e) {
      const T v = val[e];
      const T* __restrict b0 = row_of(e);
      for (int64_t t = 0; t < width; ++t) acc0[t] += v * b0[t];
    }
  }
  for (int64_t t = 0; t < W; ++t) out[t] = acc0[t] + acc1[t];
}

template <typename T, typename I>
TP_ALWAYS_INLINE void spmm_impl(const Csr<T, I>& a, const T* b, int64_t ldb, int64_t m,
                                const T* init, T* c, int64_t c_row_stride, int64_t c_col_stride,
                                int64_t row_begin, int64_t row_end) {
  constexpr int64_t W = kPanelWidth<T>;
  T out[W];
  for (int64_t t0 = 0; t0 < m; t0 += W) {
    const int64_t width = std::min(W, m - t0);
    for (int64_t n = row_begin; n < row_end; ++n) {
      const T* bt = b + t0;
      const I* col = a.col;
      auto row_of = [=](int64_t e) { return bt + static_cast<int64_t>(col[e]) * ldb; };
      row_times_slab<T, W>(a.row_ptr, a.val, n, row_of, width, init ? init[n] : T(0), out);
      T* dst = c + n * c_row_stride + t0 * c_col_stride;
      if (c_col_stride == 1) {
        for (int64_t t = 0; t < width; ++t) dst[t] = out[t];
      } else {
        for (int64_t t = 0; t < width; ++t) dst[t * c_col_stride] = out[t];
      }
    }
  }
}

template <typename T>
TP_ALWAYS_INLINE void spmm_offsets_impl(const int32_t* row_ptr, const int32_t* offset,
                                        const T* val, const T* b, int64_t m, const T* init, T* c,
                                        int64_t c_row_stride, int64_t row_begin,
                                        int64_t row_end) {
  constexpr int64_t W = kPanelWidth<T>;
  T out[W];
  for (int64_t t0 = 0; t0 < m; t0 += W) {
    const int64_t width = std::min(W, m - t0);
    const T* bt = b + t0;
    auto row_of = [=](int64_t e) { return bt + offset[e]; };
    for (int64_t n = row_begin; n < row_end; ++n) {
      row_times_slab<T, W>(row_ptr, val, n, row_of, width, init ? init[n] : T(0), out);
      for (int64_t t = 0; t < width; ++t) c[n * c_row_stride + t0 + t] = out[t];
    }
  }
}

TP_CLONES void spmm_offsets_f32(const int32_t* row_ptr, const int32_t* offset, const float* val,
                                const float* b, int64_t m, const float* init, float* c,
                                int64_t crs, int64_t r0, int64_t r1) {
  spmm_offsets_impl(row_ptr, offset, val, b, m, init, c, crs, r0, r1);
}

TP_CLONES void spmm_offsets_f64(const int32_t* row_ptr, const int32_t* offset, const double* val,
                                const double* b, int64_t m, const double* init, double* c,
                                int64_t crs, int64_t r0, int64_t r1) {
  spmm_offsets_impl(row_ptr, offset, val, b, m, init, c, crs, r0, r1);
}

template <typename T, typename I>
TP_ALWAYS_INLINE void spmv_impl(const Csr<T, I>& a, const T* __restrict x, const T* init,
                                T* __restrict y, int64_t row_begin, int64_t row_end) {
  for (int64_t n = row_begin; n < row_end; ++n) {
    const int64_t begin = a.row_ptr[n], end = a.row_ptr[n + 1];
    const T* __restrict val = a.val;
    const I* __restrict col = a.col;
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t e = begin; e < end; ++e) sum += val[e] * x[col[e]];
    y[n] = (init ? init[n] : T(0)) + sum;
  }
}

template <typename T, typename I>
TP_ALWAYS_INLINE void spmm_transposed_impl(const Csr<T, I>& a, const T* b, int64_t ldb,
                                           int64_t m, T* c, int64_t ldc, int64_t row_begin,
                                           int64_t row_end) {
  constexpr int64_t W = kPanelWidth<T>;
  for (int64_t t0 = 0; t0 < m; t0 += W) {
    const int64_t width = std::min(W, m - t0);
    for (int64_t n = row_begin; n < row_end; ++n) {
      const T* __restrict bn = b + n * ldb + t0;
      if (width == W) {
        T row[W];
        for (int64_t t = 0; t < W; ++t) row[t] = bn[t];
        for (int64_t e = a.row_ptr[n]; e < a.row_ptr[n + 1]; ++e) {
          const T v = a.val[e];
          T* __restrict dst = c + static_cast<int64_t>(a.col[e]) * ldc + t0;
#pragma omp simd
          for (int64_t t = 0; t < W; ++t) dst[t] += v * row[t];
        }
      } else {
        for (int64_t e = a.row_ptr[n]; e < a.row_ptr[n + 1]; ++e) {
          const T v = a.val[e];
          T* __restrict dst = c + static_cast<int64_t>(a.col[e]) * ldc + t0;
          for (int64_t t = 0; t < width; ++t) dst[t] += v * bn[t];
        }
      }
    }
  }
}

template <typename T, typename I>
TP_ALWAYS_INLINE void sddmm_impl(const Csr<T, I>& a, const T* __restrict p, int64_t ldp,
                                 const T* __restrict q, int64_t ldq, int64_t m, T* __restrict out,
                                 int64_t row_begin, int64_t row_end) {
  const I* __restrict col = a.col;
  for (int64_t n = row_begin; n < row_end; ++n) {
    const int64_t begin = a.row_ptr[n], end = a.row_ptr[n + 1];
    const T* __restrict pn = p + n * ldp;
    if (m == 1) {
      const T scale = pn[0];
#pragma omp simd
      for (int64_t e = begin; e < end; ++e) out[e] = scale * q[static_cast<int64_t>(col[e]) * ldq];
      continue;
    }
    for (int64_t e = begin; e < end; ++e) {
      const T* __restrict qe = q + static_cast<int64_t>(col[e]) * ldq;
      T sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t t = 0; t < m; ++t) sum += pn[t] * qe[t];
      out[e] = sum;
    }
  }
}

// One cloned entry point per (kernel, T, I); the template specializations below forward to them.
#define TP_DEFINE_KERNELS(T, I, SUFFIX)                                                          \
  TP_CLONES void spmm_##SUFFIX(const Csr<T, I>& a, const T* b, int64_t ldb, int64_t m,         \
                               const T* init, T* c, int64_t crs, int64_t ccs, int64_t r0,       \
                               int64_t r1) {                                                    \
    spmm_impl(a, b, ldb, m, init, c, crs, ccs, r0, r1);                                         \
  }                                                                                             \
  TP_CLONES TP_SPLIT_ACCUMULATORS void spmv_##SUFFIX(const Csr<T, I>& a, const T* x, const T* init, T* y, int64_t r0, \
                               int64_t r1) {                                                    \
    spmv_impl(a, x, init, y, r0, r1);                                                           \
  }                                                                                             \
  TP_CLONES void spmm_t_##SUFFIX(const Csr<T, I>& a, const T* b, int64_t ldb, int64_t m, T* c,  \
                                 int64_t ldc, int64_t r0, int64_t r1) {                         \
    spmm_transposed_impl(a, b, ldb, m, c, ldc, r0, r1);                                         \
  }                                                                                             \
  TP_CLONES void sddmm_##SUFFIX(const Csr<T, I>& a, const T* p, int64_t ldp, const T* q,        \
                                int64_t ldq, int64_t m, T* out, int64_t r0, int64_t r1) {       \
    sddmm_impl(a, p, ldp, q, ldq, m, out, r0, r1);                                              \
  }

TP_DEFINE_KERNELS(float, uint16_t, f32_u16)
TP_DEFINE_KERNELS(float, int32_t, f32_i32)
TP_DEFINE_KERNELS(double, uint16_t, f64_u16)
TP_DEFINE_KERNELS(double, int32_t, f64_i32)

// TORCHPRUNE_NO_AVX512=1 (or TORCHPRUNE_PORTABLE=1, which also turns off the AVX2 kernel of
// sparse_linear) forces the portable kernels (read once per process), so that the tests cover
// them on machines that have AVX-512 too.
bool use_avx512() { return avx512::enabled(); }

}  // namespace

#define TP_SPECIALIZE(T, I, SUFFIX)                                                              \
  template <>                                                                                   \
  void spmm<T, I>(const Csr<T, I>& a, const T* b, int64_t ldb, int64_t m, const T* init, T* c, \
                  int64_t crs, int64_t ccs, int64_t r0, int64_t r1) {                           \
    if (use_avx512()) return avx512::spmm(a, b, ldb, m, init, c, crs, ccs, r0, r1);             \
    spmm_##SUFFIX(a, b, ldb, m, init, c, crs, ccs, r0, r1);                                     \
  }                                                                                             \
  template <>                                                                                   \
  void spmv<T, I>(const Csr<T, I>& a, const T* x, const T* init, T* y, int64_t r0, int64_t r1) { \
    spmv_##SUFFIX(a, x, init, y, r0, r1);                                                       \
  }                                                                                             \
  template <>                                                                                   \
  void spmm_transposed<T, I>(const Csr<T, I>& a, const T* b, int64_t ldb, int64_t m, T* c,      \
                             int64_t ldc, int64_t r0, int64_t r1) {                             \
    spmm_t_##SUFFIX(a, b, ldb, m, c, ldc, r0, r1);                                              \
  }                                                                                             \
  template <>                                                                                   \
  void sddmm<T, I>(const Csr<T, I>& a, const T* p, int64_t ldp, const T* q, int64_t ldq,        \
                   int64_t m, T* out, int64_t r0, int64_t r1) {                                 \
    sddmm_##SUFFIX(a, p, ldp, q, ldq, m, out, r0, r1);                                          \
  }

template <>
void spmm_offsets<float>(const int32_t* row_ptr, const int32_t* offset, const float* val,
                         const float* b, int64_t m, const float* init, float* c, int64_t crs,
                         int64_t r0, int64_t r1) {
  if (use_avx512()) return avx512::spmm_offsets(row_ptr, offset, val, b, m, init, c, crs, r0, r1);
  spmm_offsets_f32(row_ptr, offset, val, b, m, init, c, crs, r0, r1);
}

template <>
void spmm_offsets<double>(const int32_t* row_ptr, const int32_t* offset, const double* val,
                          const double* b, int64_t m, const double* init, double* c,
                          int64_t crs, int64_t r0, int64_t r1) {
  if (use_avx512()) return avx512::spmm_offsets(row_ptr, offset, val, b, m, init, c, crs, r0, r1);
  spmm_offsets_f64(row_ptr, offset, val, b, m, init, c, crs, r0, r1);
}

TP_SPECIALIZE(float, uint16_t, f32_u16)
TP_SPECIALIZE(float, int32_t, f32_i32)
TP_SPECIALIZE(double, uint16_t, f64_u16)
TP_SPECIALIZE(double, int32_t, f64_i32)

}  // namespace cpu
}  // namespace torchprune

namespace torchprune {
namespace cpu {

std::vector<int64_t> row_panels(const int32_t* row_ptr, int64_t rows, int64_t parts) {
  std::vector<int64_t> bounds(parts + 1, rows);
  bounds[0] = 0;
  const int64_t total = static_cast<int64_t>(row_ptr[rows]) + rows;
  int64_t r = 0;
  for (int64_t p = 1; p < parts; ++p) {
    const int64_t target = total * p / parts;
    while (r < rows && static_cast<int64_t>(row_ptr[r]) + r < target) ++r;
    bounds[p] = r;
  }
  return bounds;
}

int64_t useful_threads(int64_t work) {
  constexpr int64_t kMinWorkPerThread = 32 * 1024;
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), work / kMinWorkPerThread));
}

}  // namespace cpu
}  // namespace torchprune
