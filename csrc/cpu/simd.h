// Portable fixed-width SIMD for the CPU kernels, on GCC/Clang vector extensions: the compiler emits
// AVX2/AVX-512/SSE/NEON for whatever -march the build targets. Kernels use it for their hot loops so
// that the vectorised dimension is the one we chose (the auto-vectoriser sometimes vectorises an outer
// loop with gathers instead, which is many times slower). Also the vectorised exp and exact GELU the kernels'
// softmax and activation epilogues share.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

namespace fastops {
namespace simd {

// The widest vector the build targets, and how many vector registers it has: 64 bytes (32 registers)
// with AVX-512, else 32 (16, AVX2). Most kernels use 32-byte vectors everywhere; a kernel whose tiles
// want the registers of AVX-512 asks for Vec<T, kWideBytes>.
#if defined(__AVX512F__)
constexpr int kWideBytes = 64;
constexpr int kVecRegs = 32;
#else
constexpr int kWideBytes = 32;
constexpr int kVecRegs = 16;
#endif
// Whether the build has fused multiply-add on 32- or 64-byte vectors (what register-tiled GEMMs need).
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
constexpr bool kFmaVectors = true;
#else
constexpr bool kFmaVectors = false;
#endif

template <typename T, int kB = 32>
struct Vec {
  static constexpr int kBytes = kB;
  static constexpr int N = kBytes / sizeof(T);
  // aligned(sizeof(T)): the type may sit at any element boundary, so plain dereferences are unaligned loads.
  typedef T V __attribute__((vector_size(kBytes), aligned(sizeof(T))));

  static inline V load(const T* p) { return *reinterpret_cast<const V*>(p); }
  static inline void store(T* p, V v) { *reinterpret_cast<V*>(p) = v; }
  static inline V splat(T a) { return V{} + a; }
  static inline T sum(V v) {
    T s = 0;
    for (int i = 0; i < N; ++i) s += v[i];
    return s;
  }
  // Loads N values of another element type (half / bf16) converted to T.
  template <typename S>
  static inline V load_from(const S* p) {
    if constexpr (std::is_same_v<S, T>) {
      return load(p);
    } else {
      V v;
      for (int i = 0; i < N; ++i) v[i] = static_cast<T>(p[i]);
      return v;
    }
  }
  template <typename S>
  static inline void store_to(S* p, V v) {
    if constexpr (std::is_same_v<S, T>) {
      store(p, v);
    } else {
      for (int i = 0; i < N; ++i) p[i] = static_cast<S>(v[i]);
    }
  }
};

// The low and high halves of a float vector widened to double vectors by vector conversions (an element-wise
// copy loop compiles to one insert per element). The halves are taken with memcpy, which compiles to an
// extract, where __builtin_shufflevector would need GCC 12.
inline void widen(Vec<float>::V f, Vec<double>::V& lo, Vec<double>::V& hi) {
  static_assert(Vec<float>::N == 8 && Vec<double>::N == 4, "halves of 4 lanes");
  typedef float F4 __attribute__((vector_size(16)));
  F4 l, h;
  std::memcpy(&l, &f, sizeof l);
  std::memcpy(&h, reinterpret_cast<const char*>(&f) + sizeof l, sizeof h);
  lo = __builtin_convertvector(l, Vec<double>::V);
  hi = __builtin_convertvector(h, Vec<double>::V);
}

// The even and odd lanes of the 2N values a, b (a's lanes first): even = a0 a2 .. b0 b2 .., odd = a1 a3 .. .
template <typename T, size_t... I>
inline void deinterleave_lanes(typename Vec<T>::V a, typename Vec<T>::V b, typename Vec<T>::V& even,
                               typename Vec<T>::V& odd, std::index_sequence<I...>) {
  even = __builtin_shufflevector(a, b, (2 * I)...);
  odd = __builtin_shufflevector(a, b, (2 * I + 1)...);
}
template <typename T>
inline void deinterleave(typename Vec<T>::V a, typename Vec<T>::V b, typename Vec<T>::V& even,
                         typename Vec<T>::V& odd) {
  deinterleave_lanes<T>(a, b, even, odd, std::make_index_sequence<Vec<T>::N>{});
}

// lo (+ hi) += v in double: a float vector's halves widen into lo and hi, a double vector adds into lo (the
// double sums of fp32 terms that the channel-attention kernels keep).
template <typename T>
inline void add_widened(Vec<double>::V& lo, Vec<double>::V& hi, typename Vec<T>::V v) {
  if constexpr (std::is_same_v<T, double>) {
    lo += v;
  } else {
    Vec<double>::V l, h;
    widen(v, l, h);
    lo += l;
    hi += h;
  }
}

// c[K-1] x^(K-1) + ... + c[1] x + c[0] on whole vectors, by Horner's rule (coefficients from the constant
// term up), for the polynomial approximations below and in attn_kernels.h.
template <typename V, std::size_t K>
inline V horner(V x, const float (&c)[K]) {
  V p = V{} + c[K - 1];
  for (std::size_t i = K - 1; i-- > 0;) p = p * x + c[i];
  return p;
}

// f on each lane of a vector of kB bytes: the fp64 paths of the vector functions below, which are their
// accuracy paths, not the fast ones.
template <typename T, int kB, typename F>
inline typename Vec<T, kB>::V lanewise(typename Vec<T, kB>::V x, F f) {
  typename Vec<T, kB>::V y;
  for (int i = 0; i < Vec<T, kB>::N; ++i) y[i] = f(x[i]);
  return y;
}

// ---------------------------------------------------------------------------------------------------------
// exp on a whole vector. fp32: Cephes-style range reduction x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial
// (about 1 ulp), 2^n built in the exponent bits; inputs below the smallest normal's log give exactly 0 (the
// -inf of masked key columns must become 0, never NaN). fp64 runs lane by lane through std::exp: it is
// the accuracy path, not the fast one. kB: the vector's bytes, as Vec's.
template <typename T, int kB = 32>
struct VExp {
  static inline typename Vec<T, kB>::V run(typename Vec<T, kB>::V x) {
    return lanewise<T, kB>(x, [](T v) { return std::exp(v); });
  }
};

template <int kB>
struct VExp<float, kB> {
  using S = simd::Vec<float, kB>;
  using V = typename S::V;
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
    static constexpr float kP[] = {5.0000001201e-1f, 1.6666665459e-1f, 4.1665795894e-2f,
                                   8.3334519073e-3f, 1.3981999507e-3f, 1.9875691500e-4f};
    const V p = horner(r, kP) * (r * r) + r + S::splat(1.0f);
    const VI e = (n + 127) << 23;
    const V y = p * __builtin_bit_cast(V, e);
    return under ? S::splat(0.0f) : y;
  }
};

// Natural log on a whole vector, for positive normal inputs only (softmax row sums, which are >= 1). fp32:
// x = m 2^e with m in [sqrt(1/2), sqrt(2)), log(m) = f - f^2/2 + f^3 P(f) for f = m - 1 (Cephes' degree-8
// fit, about 1 ulp), e ln 2 added in two parts so that the sum stays exact. fp64: std::log lane by lane.
template <typename T, int kB = 32>
inline typename Vec<T, kB>::V vlog(typename Vec<T, kB>::V x) {
  if constexpr (!std::is_same_v<T, float>) {
    return lanewise<T, kB>(x, [](T v) { return std::log(v); });
  } else {
    using S = Vec<float, kB>;
    using V = typename S::V;
    typedef int32_t VI __attribute__((vector_size(kB)));
    const VI bits = __builtin_bit_cast(VI, x);
    VI e = (bits >> 23) - 126;  // x = m 2^e, m in [1/2, 1)
    const V m = __builtin_bit_cast(V, (bits & 0x007fffff) | 0x3f000000);
    const VI low = m < S::splat(0.707106781186547524f);  // -1 where m < sqrt(1/2): use 2m, e - 1
    e += low;
    const V f = (low ? m + m : m) - S::splat(1.0f);
    const V z = f * f;
    static constexpr float kP[] = {3.3333331174e-1f, -2.4999993993e-1f, 2.0000714765e-1f,
                                   -1.6668057665e-1f, 1.4249322787e-1f, -1.2420140846e-1f,
                                   1.1676998740e-1f, -1.1514610310e-1f, 7.0376836292e-2f};
    const V fe = __builtin_convertvector(e, V);
    V y = horner(f, kP) * f * z;
    y = y + fe * S::splat(-2.12194440e-4f) - S::splat(0.5f) * z;
    return f + y + fe * S::splat(0.693359375f);
  }
}

// Exact GELU, 0.5 z (1 + erf(z / sqrt(2))). fp32: erf(x) = x P(x^2) / Q(x^2) for |x| <= 3.95 (a degree 5 / 5
// rational least-squares fit, |error| < 3e-7) and +-1 beyond (fp32 erf is within 1.6e-8 of it there): GELU
// within 6.4e-7 of exact on [-5, 5], an absolute bound like that of PyTorch's fp32 GELU. It took 3.3x less time
// than the erfc * exp form it replaced (11 against 37 cycles per 8 lanes, AVX-512 EPYC), which kept relative
// accuracy deep into the negative tail but spent ~28 FP operations and a division per vector. fp64: the C
// library, lane by lane.
template <typename T, int kB = 32>
struct VGelu {
  static inline typename Vec<T, kB>::V run(typename Vec<T, kB>::V z) {
    return lanewise<T, kB>(z, [](T v) { return T(0.5) * v * std::erfc(-v * T(M_SQRT1_2)); });
  }
};

template <int kB>
struct VGelu<float, kB> {
  using S = simd::Vec<float, kB>;
  using V = typename S::V;
  // erf(x) by the rational fit above, +-1 beyond |x| = 3.95.
  static inline V erf(V x) {
    const V lim = S::splat(3.95f);
    const V xc = x < -lim ? -lim : (x > lim ? lim : x);
    const V x2 = xc * xc;
    static constexpr float kP[] = {1.128379066e+00f, 1.903619066e-01f, 5.276410991e-02f,
                                   3.771276718e-03f, 2.863207905e-04f, 2.066461965e-06f};
    static constexpr float kQ[] = {1.0f, 5.020359782e-01f, 1.141109198e-01f,
                                   1.497703761e-02f, 1.166500968e-03f, 3.833924472e-05f};
    const V e = xc * horner(x2, kP) / horner(x2, kQ);
    return x < -lim ? S::splat(-1.f) : (x > lim ? S::splat(1.f) : e);
  }
  static inline V run(V z) { return S::splat(0.5f) * z * (S::splat(1.f) + erf(z * S::splat(0.70710678118654752f))); }
};

// d GELU / dz = Phi(z) + z phi(z), phi the standard normal density: the erf above and VExp (absolute error
// ~1e-6 in fp32). fp64: the C library, lane by lane.
template <typename T, int kB = 32>
struct VGeluGrad {
  static inline typename Vec<T, kB>::V run(typename Vec<T, kB>::V z) {
    return lanewise<T, kB>(z, [](T v) {
      return T(0.5) * std::erfc(-v * T(M_SQRT1_2)) + v * std::exp(T(-0.5) * v * v) * T(0.39894228040143267794);
    });
  }
};

template <int kB>
struct VGeluGrad<float, kB> {
  using S = simd::Vec<float, kB>;
  using V = typename S::V;
  static inline V run(V z) {
    const V cdf = S::splat(0.5f) * (S::splat(1.f) + VGelu<float, kB>::erf(z * S::splat(0.70710678118654752f)));
    return cdf + z * VExp<float, kB>::run(S::splat(-0.5f) * z * z) * S::splat(0.39894228040143267794f);
  }
};

}  // namespace simd
}  // namespace fastops
