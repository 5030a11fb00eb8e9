// Writing a memory-bound pass's output around the cache when it is too large to stay there.
//
// A plain store first reads the destination line into the cache (read-for-ownership), so an
// elementwise pass y = f(x) moves three tensors' worth of bytes, not two; and the written lines push
// out what the pass is still going to read (SE re-reads its input after pooling it). Once the output
// is larger than what the last-level cache holds for its consumer anyway, non-temporal stores skip the
// read and leave the cache to the input. On a 2-core EPYC VM this made a 16-50 MiB y = relu(a*x + b)
// pass 1.2x faster, and still 1.1x faster counting a consumer that reads y back right after; at
// 8 MiB and below plain stores were as fast or faster. Only fp32 with AVX has a streaming path;
// everything else stores normally.
#pragma once

#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <type_traits>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "cpu/simd.h"

namespace fastops {
namespace simd {

// Size of the L3 that CPU 0 shares with its neighbours, from sysfs; sysconf's figure can be the whole
// package's (256 MiB on an EPYC whose cores each share a 32 MiB slice), which is not what a pass can use.
inline int64_t l3_bytes() {
  if (FILE* f = std::fopen("/sys/devices/system/cpu/cpu0/cache/index3/size", "r")) {
    long long v = 0;
    char unit = 0;
    const int got = std::fscanf(f, "%lld%c", &v, &unit);
    std::fclose(f);
    if (got >= 1 && v > 0) return static_cast<int64_t>(v) * (unit == 'K' ? 1024 : unit == 'M' ? 1024 * 1024 : 1);
  }
  const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
  return l3 > 0 ? static_cast<int64_t>(l3) : 0;
}

// The bytes of one tensor a pass can expect to find in cache again: a quarter of the L3 (it also holds
// the pass's other tensors and other processes' data), 8 MiB when its size is unknown. Outputs this
// large or larger are streamed. FASTOPS_LLC_SHARE_BYTES overrides it (read on every call: tests set it
// to reach every code path).
inline int64_t llc_share_bytes() {
  static const int64_t detected = [] {
    const int64_t l3 = l3_bytes();
    return l3 > 0 ? l3 / 4 : int64_t(8) << 20;
  }();
  if (const char* env = std::getenv("FASTOPS_LLC_SHARE_BYTES")) {
    char* end = nullptr;
    const long long v = std::strtoll(env, &end, 10);
    if (end != env && v >= 0) return static_cast<int64_t>(v);
  }
  return detected;
}

inline bool should_stream(int64_t out_bytes) { return out_bytes >= llc_share_bytes(); }

// Streaming stores are weakly ordered: a thread fences before another thread may read what it wrote
// (call at the end of each parallel chunk that streamed).
inline void stream_fence() {
#if defined(__AVX__)
  _mm_sfence();
#endif
}

// One vector of Vec<acc_t, kB>::N values at p: streamed when kStream, the output fp32 and p aligned to the
// vector. The caller makes sure that the two halves of every 64-byte line it streams are both written (see
// kMinStreamRow for why partial lines must be avoided).
template <bool kStream, typename acc_t, typename scalar_t, int kB = 32>
inline void store_vec(scalar_t* p, typename Vec<acc_t, kB>::V v) {
#if defined(__AVX512F__)
  if constexpr (kB == 64 && kStream && std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
    if ((reinterpret_cast<uintptr_t>(p) & 63) == 0) {
      _mm512_stream_ps(p, (__m512)v);
      return;
    }
  }
#endif
#if defined(__AVX__)
  if constexpr (kB == 32 && kStream && std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
    if ((reinterpret_cast<uintptr_t>(p) & 31) == 0) {
      _mm256_stream_ps(p, (__m256)v);
      return;
    }
  }
#endif
  Vec<acc_t, kB>::store_to(p, v);
}

// Rows shorter than this (elements) are stored normally: a cache line only partly written by streaming
// stores goes out as a partial write, far slower than a cached store, and a short row is mostly such
// lines (a 7x7 plane: 196 bytes). Measured on SE over (8, 2048, 7, 7) NCHW: 7x slower with every
// store streamed, still 1.35x slower streaming only the whole lines of each plane.
constexpr int64_t kMinStreamRow = 256;

// dst[i] = vec(i) for whole vectors (Vec<acc_t>::N values from i), dst[i] = one(i) for the rest,
// i in [0, n). With kStream (fp32 output and AVX only) and a row of at least kMinStreamRow, the whole
// 64-byte lines of the row are written with streaming stores, the rest through the cache.
template <bool kStream, typename acc_t, typename scalar_t, typename VecFn, typename OneFn>
inline void write_row(scalar_t* dst, int64_t n, VecFn vec, OneFn one) {
  using Vec = simd::Vec<acc_t>;
  constexpr int64_t N = Vec::N;
  int64_t i = 0;
#if defined(__AVX__)
  if constexpr (kStream && std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
    if (n >= kMinStreamRow) {
      for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) & 63) != 0; ++i) dst[i] = one(i);
      for (; i + 2 * N <= n; i += 2 * N) {
        _mm256_stream_ps(dst + i, (__m256)vec(i));
        _mm256_stream_ps(dst + i + N, (__m256)vec(i + N));
      }
    }
  }
#endif
  for (; i + N <= n; i += N) Vec::store_to(dst + i, vec(i));
  for (; i < n; ++i) dst[i] = static_cast<scalar_t>(one(i));
}

}  // namespace simd
}  // namespace fastops
