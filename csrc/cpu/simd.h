// Portable fixed-width SIMD for the CPU kernels, on GCC/Clang vector extensions: the compiler emits
// AVX2/AVX-512/SSE/NEON for whatever -march the build targets. Kernels use it for their hot loops so
// that the vectorised dimension is the one we chose (the auto-vectoriser sometimes vectorises an outer
// loop with gathers instead, which is many times slower).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace fastops {
namespace simd {

template <typename T>
struct Vec {
  static constexpr int kBytes = 32;
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

}  // namespace simd
}  // namespace fastops
