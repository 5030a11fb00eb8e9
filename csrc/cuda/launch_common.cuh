// Launch geometry and vector access shared by the CUDA per-channel passes (channel_pass.cuh: bn_act,
// conv_bias_act), the channel-attention kernels (channel_attn.cuh: squeeze_excite, cbam and the attention ops
// that use its helpers) and the depthwise kernels (depthwise_kernels.cuh).
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace fastops {
namespace launch {

constexpr int kThreads = 256;                     // threads per block for every kernel
constexpr int64_t kMaxBlocks = int64_t(1) << 30;  // grid-stride loops cover the rest
constexpr int64_t kMaxSplits = 1024;              // most splits of one reduction

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int64_t sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

inline unsigned int blocks_for(int64_t items, int64_t per_block, int64_t cap = kMaxBlocks) {
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(ceil_div(items, per_block), cap)));
}

inline int64_t next_pow2(int64_t v) {
  int64_t p = 1;
  while (p < v) p <<= 1;
  return p;
}

// V elements moved as one aligned load / store (V * sizeof(T) <= 16 bytes for the scalar types; for the
// fp32 weights of a half kernel it can be 32 bytes, which the compiler splits into two 16-byte accesses).
template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

template <int V, typename T>
__device__ __forceinline__ Vec<T, V> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, V>*>(p);
}

template <int V, typename T>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, V>& v) {
  *reinterpret_cast<Vec<T, V>*>(p) = v;
}

template <typename T>
constexpr int kMaxVec = 16 / static_cast<int>(sizeof(T));

inline bool aligned_to(const void* p, int64_t bytes) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

}  // namespace launch
}  // namespace fastops
