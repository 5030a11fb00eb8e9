// Per-channel passes over a 4-D (N, C, H, W) tensor in NCHW or channels_last, shared by bn_act.cu and
// conv_bias_act.cu:
//   - an elementwise pass that hands a functor V adjacent elements and their channel(s);
//   - a per-channel reduction over (N, H, W), deterministic: stage 1 writes one partial State per (channel,
//     split of the positions) to a buffer, stage 2 merges a channel's partials in split order. Inside a
//     block the merge order is a fixed tree (NCHW) or fixed row order (channels_last). No atomics, so
//     the same inputs give the same bits on every run.
// V is 16 bytes of the tensor's type where the contiguous dimension (H*W for NCHW, C for channels_last)
// is a multiple of V and every pointer is 16-byte aligned, else 1. In NCHW the V elements of a vector
// share one channel; in channels_last they are V consecutive channels (cstep = 1 below, else 0).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>

#include "cuda/launch_common.cuh"

namespace fastops {
namespace chpass {

using namespace launch;  // kThreads, ceil_div, blocks_for, Vec / load_vec / store_vec, ...

// (N, C, HW) and whether the memory order is (N, HW, C).
struct Layout {
  int64_t N, C, HW;
  bool cl;
};

// Whether the kMaxVec<T>-wide path applies (null pointers count as aligned).
template <typename T>
bool can_vectorise(const Layout& L, std::initializer_list<const void*> ptrs) {
  const int64_t inner = L.cl ? L.C : L.HW;
  if (inner % kMaxVec<T> != 0) return false;
  for (const void* p : ptrs)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

// ---------------------------------------------------------------------------------------------------
// Elementwise: f.apply<V>(off, c, cstep) for every vector; off is the element offset of its first element,
// c that element's channel. I is uint32_t when the tensor has fewer than 2^31 elements (cheaper division),
// else int64_t.

template <int V, typename I, typename F>
__global__ void __launch_bounds__(kThreads)
elementwise_kernel(const F f, const I nvec, const I HW, const I C, const bool cl) {
  const I stride = static_cast<I>(gridDim.x) * blockDim.x;
  for (I v = static_cast<I>(blockIdx.x) * blockDim.x + threadIdx.x; v < nvec; v += stride) {
    const I off = v * V;
    const I c = cl ? off % C : (off / HW) % C;
    f.template apply<V>(static_cast<int64_t>(off), static_cast<int64_t>(c), cl ? 1 : 0);
  }
}

template <typename T, typename F>
void launch_elementwise(const F& f, const Layout& L, bool vec, cudaStream_t stream) {
  const int64_t numel = L.N * L.C * L.HW;
  if (numel == 0) return;
  constexpr int VM = kMaxVec<T>;
  const int64_t nvec = vec ? numel / VM : numel;
  const unsigned int grid = blocks_for(nvec, kThreads, sm_count() * 16);
  if (numel < (int64_t(1) << 31)) {
    using I = uint32_t;  // v + stride stays below 2^32
    if (vec) elementwise_kernel<VM, I, F><<<grid, kThreads, 0, stream>>>(f, I(nvec), I(L.HW), I(L.C), L.cl);
    else elementwise_kernel<1, I, F><<<grid, kThreads, 0, stream>>>(f, I(nvec), I(L.HW), I(L.C), L.cl);
  } else {
    if (vec) elementwise_kernel<VM, int64_t, F><<<grid, kThreads, 0, stream>>>(f, nvec, L.HW, L.C, L.cl);
    else elementwise_kernel<1, int64_t, F><<<grid, kThreads, 0, stream>>>(f, nvec, L.HW, L.C, L.cl);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------------
// Per-channel reduction. An Op provides
//   using State = ...;   a trivial struct with static identity() and merge(other) (this, then other);
//   template <int V> accumulate(State* st, int64_t off, int64_t c, int cstep): V elements from off, element
//       j of channel c + j*cstep, into st[j*cstep];
//   finalize(int64_t c, const State& st): consumes channel c's total.
// Partial States are stored at partial[c * S + s].

// The sums that gradient reductions need (one or two of them).
struct Sum2 {
  float a, b;
  static __device__ __forceinline__ Sum2 identity() { return {0.f, 0.f}; }
  __device__ __forceinline__ void merge(const Sum2& o) {
    a += o.a;
    b += o.b;
  }
};

// Welford's running (count, mean, sum of squared deviations); merge is Chan et al.'s pairwise update.
struct Welford {
  float n, mean, m2;
  static __device__ __forceinline__ Welford identity() { return {0.f, 0.f, 0.f}; }
  __device__ __forceinline__ void add(float x) {
    n += 1.f;
    const float d = x - mean;
    mean += d / n;
    m2 += d * (x - mean);
  }
  __device__ __forceinline__ void merge(const Welford& o) {
    if (o.n == 0.f) return;
    if (n == 0.f) {
      *this = o;
      return;
    }
    const float nn = n + o.n, d = o.mean - mean, f = o.n / nn;
    mean += d * f;
    m2 += o.m2 + d * d * n * f;
    n = nn;
  }
};

// NCHW: a 1-D block per (channel, split); the split covers vectors [s*seg, (s+1)*seg) of the channel's
// N * HW / V vectors (vector m is plane m / (HW/V), position m % (HW/V)).
template <typename Op, int V>
__global__ void __launch_bounds__(kThreads)
reduce_nchw_kernel(const Op op, typename Op::State* __restrict__ partial, const int64_t N, const int64_t C,
                   const int64_t HW, const int64_t S, const int64_t seg) {
  using State = typename Op::State;
  __shared__ State red[kThreads];
  const int tid = threadIdx.x;
  const int64_t hwv = HW / V, nvec = N * hwv;
  for (int64_t item = blockIdx.x; item < C * S; item += gridDim.x) {
    const int64_t c = item / S, s = item - c * S;
    const int64_t m1 = (s + 1) * seg < nvec ? (s + 1) * seg : nvec;
    State acc = State::identity();
    for (int64_t m = s * seg + tid; m < m1; m += kThreads) {
      const int64_t n = m / hwv, p = m - n * hwv;
      op.template accumulate<V>(&acc, (n * C + c) * HW + p * V, c, 0);
    }
    __syncthreads();  // the previous item's reads of red are done
    red[tid] = acc;
    __syncthreads();
#pragma unroll
    for (int w = kThreads / 2; w > 0; w >>= 1) {
      if (tid < w) red[tid].merge(red[tid + w]);
      __syncthreads();
    }
    if (tid == 0) partial[item] = red[0];
  }
}

// channels_last: a (TX, TY) block per (tile of TX*V channels, split of the M = N*HW positions); thread
// (tx, ty) takes channels ct*TX*V + tx*V + [0, V) of every TY-th position, then the TY rows are merged in
// row order through shared memory.
template <typename Op, int V>
__global__ void __launch_bounds__(kThreads)
reduce_nhwc_kernel(const Op op, typename Op::State* __restrict__ partial, const int64_t M, const int64_t C,
                   const int64_t S, const int64_t seg) {
  using State = typename Op::State;
  __shared__ State red[kThreads * V];
  const int TX = blockDim.x, TY = blockDim.y, tx = threadIdx.x, ty = threadIdx.y;
  const int tid = ty * TX + tx;
  const int64_t cvec = C / V, ctiles = ceil_div(cvec, TX);
  for (int64_t item = blockIdx.x; item < ctiles * S; item += gridDim.x) {
    const int64_t ct = item / S, s = item - ct * S;
    const int64_t cv = ct * TX + tx;
    State acc[V];
#pragma unroll
    for (int j = 0; j < V; ++j) acc[j] = State::identity();
    if (cv < cvec) {
      const int64_t m1 = (s + 1) * seg < M ? (s + 1) * seg : M;
      for (int64_t m = s * seg + ty; m < m1; m += TY) op.template accumulate<V>(acc, m * C + cv * V, cv * V, 1);
    }
    __syncthreads();  // the previous item's reads of red are done
#pragma unroll
    for (int j = 0; j < V; ++j) red[tid * V + j] = acc[j];  // row ty, tile element tx*V + j
    __syncthreads();
    for (int e = tid; e < TX * V; e += TX * TY) {
      State sum = red[e];
      for (int t = 1; t < TY; ++t) sum.merge(red[t * TX * V + e]);
      const int64_t c = ct * TX * V + e;
      if (c < C) partial[c * S + s] = sum;
    }
  }
}

template <typename Op>
__global__ void __launch_bounds__(kThreads)
reduce_finalize_kernel(const Op op, const typename Op::State* __restrict__ partial, const int64_t C,
                       const int64_t S) {
  using State = typename Op::State;
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < C; c += int64_t(gridDim.x) * blockDim.x) {
    State st = partial[c * S];
    for (int64_t s = 1; s < S; ++s) st.merge(partial[c * S + s]);
    op.finalize(c, st);
  }
}

// Splits of a reduction of len units over `items` independent workers, so that about `target` workers run
// and each split keeps at least min_chunk units; seg = units per split.
inline void plan_splits(int64_t items, int64_t len, int64_t min_chunk, int64_t target, int64_t& S, int64_t& seg) {
  if (len <= 0) {
    S = 1;
    seg = 0;
    return;
  }
  S = items >= target ? 1 : ceil_div(target, std::max<int64_t>(items, 1));
  S = std::max<int64_t>(1, std::min({S, ceil_div(len, min_chunk), kMaxSplits}));
  seg = ceil_div(len, S);
  S = ceil_div(len, seg);  // drop splits that would start past the end
}

// Runs the two stages of op over the tensor described by L (T: the tensor's element type, which sets V).
template <typename T, int V, typename Op>
void launch_reduce_v(const Op& op, const Layout& L, const at::TensorOptions& opts, cudaStream_t stream) {
  using State = typename Op::State;
  if (L.C == 0) return;
  const int64_t sms = sm_count();
  int64_t S, seg;
  unsigned int grid;
  dim3 block(kThreads);
  if (!L.cl) {
    plan_splits(L.C, L.N * (L.HW / V), int64_t(kThreads) * 4, sms * 8, S, seg);
    grid = blocks_for(L.C * S, 1, int64_t(1) << 30);
  } else {
    const int64_t cvec = L.C / V;
    const int TX = static_cast<int>(std::min<int64_t>(32, next_pow2(cvec))), TY = kThreads / TX;
    block = dim3(TX, TY);
    const int64_t ctiles = ceil_div(cvec, TX);
    plan_splits(ctiles, L.N * L.HW, int64_t(TY) * 16, sms * 8, S, seg);
    grid = blocks_for(ctiles * S, 1, int64_t(1) << 30);
  }
  at::Tensor buf = at::empty({L.C * S * static_cast<int64_t>(sizeof(State))}, opts.dtype(at::kByte));
  State* partial = reinterpret_cast<State*>(buf.data_ptr());
  if (!L.cl) reduce_nchw_kernel<Op, V><<<grid, block, 0, stream>>>(op, partial, L.N, L.C, L.HW, S, seg);
  else reduce_nhwc_kernel<Op, V><<<grid, block, 0, stream>>>(op, partial, L.N * L.HW, L.C, S, seg);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  reduce_finalize_kernel<Op><<<blocks_for(L.C, kThreads, int64_t(1) << 30), kThreads, 0, stream>>>(op, partial, L.C,
                                                                                                   S);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename Op>
void launch_reduce(const Op& op, const Layout& L, bool vec, const at::TensorOptions& opts, cudaStream_t stream) {
  if (vec) launch_reduce_v<T, kMaxVec<T>>(op, L, opts, stream);
  else launch_reduce_v<T, 1>(op, L, opts, stream);
}

}  // namespace chpass
}  // namespace fastops

// float / half / bf16: the CUDA entry points of bn_act / conv_bias_act take no float64 (the Python side
// sends float64 to the CPU kernels).
#define FASTOPS_DISPATCH_FP32_FP16_BF16(TYPE, NAME, ...)                    \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                          \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))
