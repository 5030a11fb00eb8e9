// Building blocks of the CPU attention kernels (window_attention, sr_attention): register-tiled small matrix
// products, a vectorised exp, and row copy / transpose helpers between a tensor's dtype and the fp32 / fp64
// working buffers.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "cpu/simd.h"

namespace fastops {
namespace attn {

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Softmax in base 2 (scores scaled by log2(e), then 2^x) needs a cheaper exp; lse stays in natural units.
constexpr double kLog2e = 1.4426950408889634074;
constexpr double kLn2 = 0.6931471805599453094;

// A scalar in every lane. simd::Vec::splat adds the scalar to a zero vector, which GCC without -ffast-math
// cannot fold (0 + -0 is +0), so it costs an add and a shuffle where one broadcast load does: that matters
// in the products' inner loops, which broadcast once per two or three FMAs. (A lane-by-lane loop is no
// better: GCC builds it with inserts.)
template <typename V, typename T, std::size_t... I>
inline V bcast_lanes(T a, std::index_sequence<I...>) {
  return V{((void)I, a)...};
}

template <typename T, int kB>
inline typename simd::Vec<T, kB>::V bcast(T a) {
  return bcast_lanes<typename simd::Vec<T, kB>::V>(a, std::make_index_sequence<simd::Vec<T, kB>::N>{});
}

// Runs worker(grab) once on each of at::parallel_for's threads; grab(t0, t1) hands out the next `chunk` tasks
// of [0, n) from a shared counter and returns false when none are left. A static split (one contiguous range
// per thread) waits for its slowest thread, and on a machine shared with other work one thread is often
// descheduled for a while; with a shared counter the others take over its tasks. Per-thread state lives in
// the worker, outside the grab loop. Which thread runs a task must not change its result.
template <typename Worker>
void parallel_dynamic(int64_t n, int64_t chunk, const Worker& worker) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  auto grab = [&](int64_t& t0, int64_t& t1) {
    t0 = next.fetch_add(chunk, std::memory_order_relaxed);
    if (t0 >= n) return false;
    t1 = std::min(n, t0 + chunk);
    return true;
  };
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), (n + chunk - 1) / chunk);
  at::parallel_for(0, std::max<int64_t>(workers, 1), 1, [&](int64_t, int64_t) { worker(grab); });
}

// ---------------------------------------------------------------------------------------------------------
// Small dense products C (+)= op(A) B on the build's widest vectors (kWB bytes, kLanes<T> elements): a core
// with full-width AVX-512 units does half as many FMAs per cycle on 32-byte vectors. B is row-major with a
// column count that is a multiple of kLanes<T>. A register tile of R rows x NV vectors costs, per step of
// the inner dimension, NV loads and R broadcasts for R * NV FMAs. AVX2 (16 registers): 6 x 2 (BLIS's
// shape) keeps its 12 accumulators, 2 operands and a broadcast in registers and needs 8 loads per 12 FMAs;
// 3 x 4 would have to re-load B from L1 on every FMA (15 loads), more than two load ports serve in the FMAs'
// time. AVX-512 (32 registers): 6 x 4, 24 accumulators, 10 loads per 24 FMAs. Every padded dimension these
// products read is a multiple of kLanes<T>, and a column offset into packed panels a multiple of
// kVecs * kLanes<T>.
constexpr int kWB = simd::kWideBytes;
template <typename T>
constexpr int64_t kLanes = simd::Vec<T, kWB>::N;
constexpr int kRows = 6;
constexpr int kVecs = kWB == 64 ? 4 : 2;

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
// blocks of the inner dimension) instead of overwriting it. Vectors of kB bytes.
template <typename T, bool kAccum, int R, int NV, int kB = kWB, typename Acc>
inline void micro(int64_t kd, const Acc a, const T* __restrict__ B, int64_t ldb, T* __restrict__ C, int64_t ldc) {
  using S = simd::Vec<T, kB>;
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
      const V x = bcast<T, kB>(a(r, k));
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
template <typename T, bool kAccum, int R, int NV, int kB = kWB, typename Acc>
inline void micro_any(int rows, int nv, int64_t kd, const Acc& a, const T* B, int64_t ldb, T* C, int64_t ldc) {
  if constexpr (R > 1) {
    if (rows < R) return micro_any<T, kAccum, R - 1, NV, kB>(rows, nv, kd, a, B, ldb, C, ldc);
  }
  if constexpr (NV > 1) {
    if (nv < NV) return micro_any<T, kAccum, R, NV - 1, kB>(rows, nv, kd, a, B, ldb, C, ldc);
  }
  micro<T, kAccum, R, NV, kB>(kd, a, B, ldb, C, ldc);
}

// C (M x nc, ldc) (+)= op(A) (M x kd) B (kd x nc, ldb), op(A)[m][k] = A[m * lda + k], or with kTransA
// A[k * lda + m]; nc a multiple of the SIMD width. Column tiles outside, so that B's panel (kd x NV vectors)
// stays in L1 while the row tiles pass.
template <typename T, bool kTransA, bool kAccum = false, int R = kRows, int NV = kVecs, int kB = kWB>
void gemm(int64_t M, int64_t nc, int64_t kd, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc) {
  constexpr int W = simd::Vec<T, kB>::N;
  using Acc = std::conditional_t<kTransA, TransposedA<T>, RowMajorA<T>>;
  const Acc a{A, lda};
  for (int64_t c0 = 0; c0 < nc; c0 += NV * W) {
    const int nv = static_cast<int>(std::min<int64_t>(NV, (nc - c0) / W));
    for (int64_t m = 0; m < M; m += R) {
      const int rows = static_cast<int>(std::min<int64_t>(R, M - m));
      micro_any<T, kAccum, R, NV, kB>(rows, nv, kd, a.shift(m), B + c0, ldb, C + m * ldc + c0, ldc);
    }
  }
}

// B packed in column panels of the tile width (NV vectors; the last panel may be narrower): the panel of
// columns [c, c + w) is a contiguous (rows x w) block at B + c * kstride (all panels before it are full
// width), so that a micro-kernel call streams one sequential block. A row-major B with a power-of-two row
// stride would instead map a panel's rows onto a few L1 sets and evict itself. Rows koff .. koff + kd are
// used; columns [0, nc) with nc the packed width less any whole panels before B.
template <typename T, bool kTransA, bool kAccum = false, int R = kRows, int NV = kVecs, int kB = kWB>
void gemm_packed(int64_t M, int64_t nc, int64_t kd, const T* A, int64_t lda, const T* B, int64_t kstride,
                 int64_t koff, T* C, int64_t ldc) {
  constexpr int W = simd::Vec<T, kB>::N;
  using Acc = std::conditional_t<kTransA, TransposedA<T>, RowMajorA<T>>;
  const Acc a{A, lda};
  auto tile = [&](int64_t m, int64_t c0) {
    const int64_t w = std::min<int64_t>(NV * W, nc - c0);
    micro_any<T, kAccum, R, NV, kB>(static_cast<int>(std::min<int64_t>(R, M - m)), static_cast<int>(w / W), kd,
                                a.shift(m), B + c0 * kstride + koff * w, w, C + m * ldc + c0, ldc);
  };
  if (nc * kd * static_cast<int64_t>(sizeof(T)) <= 16384) {
    // All of B fits in L1 next to A's row tile: row tiles outside, so that each row tile of A (R x kd) is
    // fetched once and meets every panel from L1.
    for (int64_t m = 0; m < M; m += R)
      for (int64_t c0 = 0; c0 < nc; c0 += NV * W) tile(m, c0);
  } else {
    // Otherwise panels outside: one panel (kd x NV vectors) stays in L1 while the row tiles pass.
    for (int64_t c0 = 0; c0 < nc; c0 += NV * W)
      for (int64_t m = 0; m < M; m += R) tile(m, c0);
  }
}

// ---------------------------------------------------------------------------------------------------------
// exp on a whole vector: simd::VExp (simd.h).
using simd::VExp;

// 2^x on a whole vector, for softmax exponents already in base 2 (scale * log2(e) folded into the scores'
// scale) and at most ~0 (the row max subtracted). fp32: x = n + r, |r| <= 1/2, 2^r by a degree-5 polynomial
// fitted for relative error (< 2e-7), 2^n in the exponent bits; x < -126 (incl. the -inf of masked columns)
// gives exactly 0. About half the operations of VExp: no ln 2 reduction, no upper range. fp64: std::exp2.
template <typename T>
struct VExp2 {
  static inline typename simd::Vec<T>::V run(typename simd::Vec<T>::V x) {
    return simd::lanewise<T, 32>(x, [](T v) { return std::exp2(v); });
  }
};

template <>
struct VExp2<float> {
  using S = simd::Vec<float>;
  using V = S::V;
  typedef int32_t VI __attribute__((vector_size(S::kBytes)));
  static inline V run(V x) {
    const V lo = S::splat(-127.0f), hi = S::splat(127.0f);
    const VI under = x < S::splat(-126.0f);
    x = x < lo ? lo : x;
    x = x > hi ? hi : x;
    const V magic = S::splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer in the low bits
    const V t = x + magic;
    const V r = x - (t - magic);
    static constexpr float kP[] = {1.0f, 6.9314698e-1f, 2.4022242e-1f, 5.5507335e-2f, 9.6715129e-3f, 1.3264811e-3f};
    const V p = simd::horner(r, kP);
    const VI e = (__builtin_bit_cast(VI, t) - 0x4B400000 + 127) << 23;
    const V y = p * __builtin_bit_cast(V, e);
    return under ? S::splat(0.0f) : y;
  }
};

template <int kShift, typename V, std::size_t... I>
inline V rotate_lanes(V v, std::index_sequence<I...>) {
  return __builtin_shufflevector(v, v, ((I + kShift) % sizeof...(I))...);
}

// Horizontal max / sum in log2(N) shuffle steps (simd::Vec::sum adds lane by lane: a serial chain of N adds
// that softmax rows would wait on).
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

// In-register transpose of an 8 x 8 fp32 block: r[i][j] -> r[j][i] (unpack within 128-bit halves, then
// pairs, then halves across), 24 shuffles for 64 values.
inline void transpose8x8(simd::Vec<float>::V* r) {
  using V = simd::Vec<float>::V;
  V t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = __builtin_shufflevector(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[i + 1] = __builtin_shufflevector(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 8; i += 4)
    for (int h = 0; h < 2; ++h) {
      u[i + 2 * h] = __builtin_shufflevector(t[i + h], t[i + h + 2], 0, 1, 8, 9, 4, 5, 12, 13);
      u[i + 2 * h + 1] = __builtin_shufflevector(t[i + h], t[i + h + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    }
  for (int i = 0; i < 4; ++i) {
    r[i] = __builtin_shufflevector(u[i], u[i + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    r[i + 4] = __builtin_shufflevector(u[i], u[i + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  }
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
// column stay within one line. a may be of a narrower dtype than b. fp32 to fp32 goes through 8 x 8 register
// transposes where a whole block fits (element by element, the transposes of K took ~6% of the window
// attention forward).
template <typename S, typename T>
inline void transpose(const S* __restrict__ a, int64_t rows, int64_t cols, int64_t lda, T* __restrict__ b,
                      int64_t ldb) {
  // A row into a column of stride 1 (or the reverse) is a plain copy, vectorised by the compiler; the strips
  // below would move it one value at a time (a 1 x 1 convolution's weight in spatial_reduction's backward).
  if ((rows == 1 && ldb == 1) || (cols == 1 && lda == 1)) {
    for (int64_t i = 0; i < rows * cols; ++i) b[i] = static_cast<T>(a[i]);
    return;
  }
  int64_t j0 = 0;
  if constexpr (std::is_same_v<S, float> && std::is_same_v<T, float> && simd::Vec<float>::N == 8) {
    using V = simd::Vec<float>;
    for (; j0 + 8 <= rows; j0 += 8) {
      int64_t c = 0;
      for (; c + 8 <= cols; c += 8) {
        V::V blk[8];
        for (int i = 0; i < 8; ++i) blk[i] = V::load(a + (j0 + i) * lda + c);
        transpose8x8(blk);
        for (int i = 0; i < 8; ++i) V::store(b + (c + i) * ldb + j0, blk[i]);
      }
      for (; c < cols; ++c)
        for (int64_t j = j0; j < j0 + 8; ++j) b[c * ldb + j] = a[j * lda + c];
    }
  }
  for (; j0 < rows; j0 += 8) {
    const int64_t j1 = std::min<int64_t>(j0 + 8, rows);
    for (int64_t c = 0; c < cols; ++c)
      for (int64_t j = j0; j < j1; ++j) b[c * ldb + j] = static_cast<T>(a[j * lda + c]);
  }
}

// gemm_packed's panels of a (rows x cols) matrix stored row-major at src (row stride ld, any dtype), over
// colsp >= cols columns (a multiple of the SIMD width), zero past cols.
template <typename S, typename T>
void pack_rows(const S* src, int64_t ld, int64_t rows, int64_t cols, int64_t colsp, T* dst) {
  constexpr int64_t tile = kVecs * kLanes<T>;
  for (int64_t c0 = 0; c0 < colsp; c0 += tile) {
    const int64_t w = std::min(tile, colsp - c0), n = std::clamp<int64_t>(cols - c0, 0, w);
    T* panel = dst + c0 * rows;
    for (int64_t r = 0; r < rows; ++r) {
      load_row(src + r * ld + c0, panel + r * w, n, T(1));
      std::fill(panel + r * w + n, panel + (r + 1) * w, T(0));
    }
  }
}

// The same for the transpose: the packed matrix is (rows x cols) with element (r, c) = src[c * ld + r], i.e.
// the panels' columns are src's rows. fp32 goes through 8 x 8 register transposes (whole-vector loads of 8
// source rows, whole-vector stores), the rest element by element.
template <typename S, typename T>
void pack_transposed(const S* src, int64_t ld, int64_t rows, int64_t cols, int64_t colsp, T* dst) {
  constexpr int64_t tile = kVecs * kLanes<T>;
  for (int64_t c0 = 0; c0 < colsp; c0 += tile) {
    const int64_t w = std::min(tile, colsp - c0), n = std::clamp<int64_t>(cols - c0, 0, w);
    T* panel = dst + c0 * rows;
    int64_t cb = 0;  // columns of this panel done by the transposes
    if constexpr (std::is_same_v<T, float> && simd::Vec<T>::N == 8) {
      using V = simd::Vec<float>;
      for (; cb + 8 <= n; cb += 8) {
        int64_t r = 0;
        for (; r + 8 <= rows; r += 8) {
          V::V blk[8];
          for (int i = 0; i < 8; ++i) blk[i] = V::load_from(src + (c0 + cb + i) * ld + r);
          transpose8x8(blk);
          for (int i = 0; i < 8; ++i) V::store(panel + (r + i) * w + cb, blk[i]);
        }
        for (; r < rows; ++r)
          for (int64_t c = cb; c < cb + 8; ++c) panel[r * w + c] = static_cast<T>(src[(c0 + c) * ld + r]);
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      T* row = panel + r * w;
      for (int64_t c = cb; c < n; ++c) row[c] = static_cast<T>(src[(c0 + c) * ld + r]);
      std::fill(row + n, row + w, T(0));
    }
  }
}

}  // namespace attn
}  // namespace fastops
