// Building blocks of the CPU attention kernels (window_attention, sr_attention): register-tiled small matrix
// products, a vectorised exp, and row copy / transpose helpers between a tensor's dtype and the fp32 / fp64
// working buffers.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "cpu/simd.h"

namespace fastops {
namespace attn {

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// A scalar in every lane. simd::Vec::splat adds the scalar to a zero vector, which GCC without -ffast-math
// cannot fold (0 + -0 is +0), so it costs an add and a shuffle where one broadcast load does: that matters
// in the products' inner loops, which broadcast once per two or three FMAs. (A lane-by-lane loop is no
// better: GCC builds it with inserts.)
template <typename V, typename T, std::size_t... I>
inline V bcast_lanes(T a, std::index_sequence<I...>) {
  return V{((void)I, a)...};
}

template <typename T>
inline typename simd::Vec<T>::V bcast(T a) {
  return bcast_lanes<typename simd::Vec<T>::V>(a, std::make_index_sequence<simd::Vec<T>::N>{});
}

// ---------------------------------------------------------------------------------------------------------
// Small dense products C (+)= op(A) B, B row-major with a column count that is a multiple of the SIMD width.
// A register tile of R rows x NV vectors costs, per step of the inner dimension, NV loads and R broadcasts
// for R * NV FMAs. The default 6 x 2 (BLIS's AVX2 shape) keeps its 12 accumulators, 2 operands and a
// broadcast in AVX2's 16 registers and needs 8 loads per 12 FMAs; 3 x 4 would have to re-load B from L1 on
// every FMA (15 loads), more than two load ports serve in the FMAs' time.
constexpr int kRows = 6;
constexpr int kVecs = 2;

// How a tile reads A: a(r, k) is the element of the tile's row r at inner index k.
template <typename T>
struct RowMajorA {  // A[r * lda + k]
  const T* p;
  int64_t lda;
  T operator()(int r, int64_t k) const { return p[r * lda + k]; }
  RowMajorA shift(int64_t rows) const { return {p + rows * lda, lda}; }
};

template <typename T>
struct TransposedA {  // A[k * lda + r]: A^T B without materialising A^T
  const T* p;
  int64_t lda;
  T operator()(int r, int64_t k) const { return p[k * lda + r]; }
  TransposedA shift(int64_t rows) const { return {p + rows, lda}; }
};

template <typename T, int R>
struct RowPtrsA {  // rows anywhere in memory (gathered in place), R at most
  const T* p[R];
  T operator()(int r, int64_t k) const { return p[r][k]; }
};

// C (R x NV vectors, ldc) (+)= A (R x kd) B (kd x NV vectors, ldb). kAccum adds the product to C (a sum over
// blocks of the inner dimension) instead of overwriting it.
template <typename T, bool kAccum, int R, int NV, typename Acc>
inline void micro(int64_t kd, const Acc a, const T* __restrict__ B, int64_t ldb, T* __restrict__ C, int64_t ldc) {
  using S = simd::Vec<T>;
  using V = typename S::V;
  V acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = kAccum ? S::load(C + r * ldc + v * S::N) : S::splat(0);
  for (int64_t k = 0; k < kd; ++k) {
    const T* b = B + k * ldb;
    V bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = S::load(b + v * S::N);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const V x = bcast<T>(a(r, k));
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] += x * bv[v];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) S::store(C + r * ldc + v * S::N, acc[r][v]);
}

// The tile of rows x nv (at most R x NV) as a compile-time shape.
template <typename T, bool kAccum, int R, int NV, typename Acc>
inline void micro_any(int rows, int nv, int64_t kd, const Acc& a, const T* B, int64_t ldb, T* C, int64_t ldc) {
  if constexpr (R > 1) {
    if (rows < R) return micro_any<T, kAccum, R - 1, NV>(rows, nv, kd, a, B, ldb, C, ldc);
  }
  if constexpr (NV > 1) {
    if (nv < NV) return micro_any<T, kAccum, R, NV - 1>(rows, nv, kd, a, B, ldb, C, ldc);
  }
  micro<T, kAccum, R, NV>(kd, a, B, ldb, C, ldc);
}

// C (M x nc, ldc) (+)= op(A) (M x kd) B (kd x nc, ldb), op(A)[m][k] = A[m * lda + k], or with kTransA
// A[k * lda + m]; nc a multiple of the SIMD width. Column tiles outside, so that B's panel (kd x NV vectors)
// stays in L1 while the row tiles pass.
template <typename T, bool kTransA, bool kAccum = false, int R = kRows, int NV = kVecs>
void gemm(int64_t M, int64_t nc, int64_t kd, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc) {
  constexpr int W = simd::Vec<T>::N;
  using Acc = std::conditional_t<kTransA, TransposedA<T>, RowMajorA<T>>;
  const Acc a{A, lda};
  for (int64_t c0 = 0; c0 < nc; c0 += NV * W) {
    const int nv = static_cast<int>(std::min<int64_t>(NV, (nc - c0) / W));
    for (int64_t m = 0; m < M; m += R) {
      const int rows = static_cast<int>(std::min<int64_t>(R, M - m));
      micro_any<T, kAccum, R, NV>(rows, nv, kd, a.shift(m), B + c0, ldb, C + m * ldc + c0, ldc);
    }
  }
}

// B packed in column panels of the tile width (NV vectors; the last panel may be narrower): the panel of
// columns [c, c + w) is a contiguous (rows x w) block at B + c * kstride (all panels before it are full
// width), so that a micro-kernel call streams one sequential block. A row-major B with a power-of-two row
// stride would instead map a panel's rows onto a few L1 sets and evict itself. Rows koff .. koff + kd are
// used; columns [0, nc) with nc the packed width less any whole panels before B.
template <typename T, bool kTransA, bool kAccum = false, int R = kRows, int NV = kVecs>
void gemm_packed(int64_t M, int64_t nc, int64_t kd, const T* A, int64_t lda, const T* B, int64_t kstride,
                 int64_t koff, T* C, int64_t ldc) {
  constexpr int W = simd::Vec<T>::N;
  using Acc = std::conditional_t<kTransA, TransposedA<T>, RowMajorA<T>>;
  const Acc a{A, lda};
  for (int64_t c0 = 0; c0 < nc; c0 += NV * W) {
    const int64_t w = std::min<int64_t>(NV * W, nc - c0);
    const T* Bp = B + c0 * kstride + koff * w;
    for (int64_t m = 0; m < M; m += R) {
      const int rows = static_cast<int>(std::min<int64_t>(R, M - m));
      micro_any<T, kAccum, R, NV>(rows, static_cast<int>(w / W), kd, a.shift(m), Bp, w, C + m * ldc + c0, ldc);
    }
  }
}

// Packs get(r, c) (r < rows, c < cols) into gemm_packed's panels over colsp >= cols columns (a multiple of the
// SIMD width), zero past cols.
template <typename T, typename Get>
void pack_panels(int64_t rows, int64_t cols, int64_t colsp, Get get, T* dst) {
  constexpr int64_t tile = kVecs * simd::Vec<T>::N;
  for (int64_t c0 = 0; c0 < colsp; c0 += tile) {
    const int64_t w = std::min(tile, colsp - c0), c1 = std::min(cols, c0 + w);
    T* panel = dst + c0 * rows;
    for (int64_t r = 0; r < rows; ++r) {
      T* row = panel + r * w;
      int64_t c = c0;
      for (; c < c1; ++c) row[c - c0] = get(r, c);
      for (; c < c0 + w; ++c) row[c - c0] = T(0);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// exp on a whole vector. fp32: Cephes-style range reduction x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial
// (about 1 ulp), 2^n built in the exponent bits; inputs below the smallest normal's log give exactly 0 (the
// -inf of masked key columns must become 0, never NaN). fp64 runs lane by lane through std::exp: it is
// the accuracy path, not the fast one.
template <typename T>
struct VExp {
  using V = typename simd::Vec<T>::V;
  static inline V run(V x) {
    V y;
    for (int i = 0; i < simd::Vec<T>::N; ++i) y[i] = std::exp(x[i]);
    return y;
  }
};

template <>
struct VExp<float> {
  using S = simd::Vec<float>;
  using V = S::V;
  typedef int32_t VI __attribute__((vector_size(S::kBytes)));
  static inline V run(V x) {
    const V hi = S::splat(88.0f), lo = S::splat(-87.33654475f);
    const VI under = x < lo;
    x = x > hi ? hi : x;
    x = x < lo ? lo : x;
    // Adding 1.5 * 2^23 rounds to the nearest integer and leaves it in the low mantissa bits.
    const V magic = S::splat(12582912.0f);
    const V t = x * S::splat(1.44269504088896341f) + magic;
    const V fx = t - magic;
    const VI n = __builtin_bit_cast(VI, t) - 0x4B400000;
    V r = x - fx * S::splat(0.693359375f);
    r = r - fx * S::splat(-2.12194440e-4f);
    V p = S::splat(1.9875691500e-4f);
    p = p * r + S::splat(1.3981999507e-3f);
    p = p * r + S::splat(8.3334519073e-3f);
    p = p * r + S::splat(4.1665795894e-2f);
    p = p * r + S::splat(1.6666665459e-1f);
    p = p * r + S::splat(5.0000001201e-1f);
    p = p * (r * r) + r + S::splat(1.0f);
    const VI e = (n + 127) << 23;
    const V y = p * __builtin_bit_cast(V, e);
    return under ? S::splat(0.0f) : y;
  }
};

// Horizontal max / sum in log2(N) shuffle steps (simd::Vec::sum adds lane by lane: a serial chain of N adds
// that softmax rows would wait on).
template <int kShift, typename V, std::size_t... I>
inline V rotate_lanes(V v, std::index_sequence<I...>) {
  return __builtin_shufflevector(v, v, ((I + kShift) % sizeof...(I))...);
}

template <typename T, int kShift = simd::Vec<T>::N / 2>
inline T hmax(typename simd::Vec<T>::V v) {
  if constexpr (kShift == 0) {
    return v[0];
  } else {
    const auto r = rotate_lanes<kShift>(v, std::make_index_sequence<simd::Vec<T>::N>{});
    return hmax<T, kShift / 2>(v > r ? v : r);
  }
}

template <typename T, int kShift = simd::Vec<T>::N / 2>
inline T hsum(typename simd::Vec<T>::V v) {
  if constexpr (kShift == 0) {
    return v[0];
  } else {
    return hsum<T, kShift / 2>(v + rotate_lanes<kShift>(v, std::make_index_sequence<simd::Vec<T>::N>{}));
  }
}

// Row copies with restrict-qualified pointers and explicit vectors: with run-time lengths GCC otherwise
// vectorises these gathers badly (aliasing checks, scattered lanes) and they cost more than the products.
template <typename S, typename T>
inline void load_row(const S* __restrict__ src, T* __restrict__ dst, int64_t n, T mul) {
  using Vt = simd::Vec<T>;
  int64_t c = 0;
  for (; c + Vt::N <= n; c += Vt::N) Vt::store(dst + c, Vt::load_from(src + c) * Vt::splat(mul));
  for (; c < n; ++c) dst[c] = static_cast<T>(src[c]) * mul;
}

template <typename T, typename S>
inline void store_row(const T* __restrict__ src, S* __restrict__ dst, int64_t n, T mul) {
  using Vt = simd::Vec<T>;
  int64_t c = 0;
  for (; c + Vt::N <= n; c += Vt::N) Vt::store_to(dst + c, Vt::load(src + c) * Vt::splat(mul));
  for (; c < n; ++c) dst[c] = static_cast<S>(src[c] * mul);
}

template <typename T>
inline void add_row(const T* __restrict__ src, T* __restrict__ dst, int64_t n) {
  using Vt = simd::Vec<T>;
  int64_t c = 0;
  for (; c + Vt::N <= n; c += Vt::N) Vt::store(dst + c, Vt::load(dst + c) + Vt::load(src + c));
  for (; c < n; ++c) dst[c] += src[c];
}

template <typename T>
inline void scale_row(T* __restrict__ x, int64_t n, T mul) {
  using Vt = simd::Vec<T>;
  int64_t c = 0;
  for (; c + Vt::N <= n; c += Vt::N) Vt::store(x + c, Vt::load(x + c) * Vt::splat(mul));
  for (; c < n; ++c) x[c] *= mul;
}

template <typename T>
inline T dot_row(const T* __restrict__ a, const T* __restrict__ b, int64_t n) {
  using Vt = simd::Vec<T>;
  typename Vt::V acc = Vt::splat(T(0));
  int64_t c = 0;
  for (; c + Vt::N <= n; c += Vt::N) acc += Vt::load(a + c) * Vt::load(b + c);
  T s = hsum<T>(acc);
  for (; c < n; ++c) s += a[c] * b[c];
  return s;
}

// Prefetches rows r < rows of len elements at base + r * stride into L2, for reading or (kWrite) writing:
// issued one task ahead, so that a task's operands stream in while the previous one computes.
template <bool kWrite = false, typename S>
inline void prefetch_rows(const S* base, int64_t rows, int64_t stride, int64_t len) {
  const int64_t bytes = len * static_cast<int64_t>(sizeof(S));
  for (int64_t r = 0; r < rows; ++r) {
    const char* p = reinterpret_cast<const char*>(base + r * stride);
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, kWrite ? 1 : 0, 2);
    __builtin_prefetch(p + bytes - 1, kWrite ? 1 : 0, 2);
  }
}

// b[c * ldb + j] = a[j * lda + c], j < rows, c < cols; in strips of 8 rows so that the stores of one
// column stay within one line. a may be of a narrower dtype than b.
template <typename S, typename T>
inline void transpose(const S* __restrict__ a, int64_t rows, int64_t cols, int64_t lda, T* __restrict__ b,
                      int64_t ldb) {
  for (int64_t j0 = 0; j0 < rows; j0 += 8) {
    const int64_t j1 = std::min<int64_t>(j0 + 8, rows);
    for (int64_t c = 0; c < cols; ++c)
      for (int64_t j = j0; j < j1; ++j) b[c * ldb + j] = static_cast<T>(a[j * lda + c]);
  }
}

}  // namespace attn
}  // namespace fastops
