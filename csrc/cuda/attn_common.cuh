// Pieces shared by the CUDA attention kernels of window_attention.cu and sr_attention.cu. In both, a warp
// keeps R rows of the attention matrix in registers and meets the other side 32 tokens at a time, one token
// per lane: a score is one lane's dot product, a row's max / sum is a warp reduction, and the lanes split the
// head dim (slot c of a lane is d = lane + 32 c) when accumulating rows. Shared-memory layouts, masking and
// index arithmetic differ between the ops and stay with each of them.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <type_traits>

#include "cuda/channel_attn.cuh"

namespace fastops {
namespace attn_cuda {

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// s[k] = rows[k * rstride + d] . col[d] over d < hd, for the warp's R rows against the lane's token.
template <int R>
__device__ __forceinline__ void row_dots(float (&s)[R], const float* rows, int rstride, const float* col, int hd) {
#pragma unroll
  for (int k = 0; k < R; ++k) s[k] = 0.f;
  for (int d = 0; d < hd; ++d) {
    const float cd = col[d];
#pragma unroll
    for (int k = 0; k < R; ++k) s[k] = fmaf(rows[k * rstride + d], cd, s[k]);
  }
}

// Two products of row_dots in one pass over d (both operand pairs are read at the same d).
template <int R>
__device__ __forceinline__ void row_dots2(float (&s)[R], const float* rows_s, const float* col_s, float (&t)[R],
                                          const float* rows_t, const float* col_t, int rstride, int hd) {
#pragma unroll
  for (int k = 0; k < R; ++k) s[k] = t[k] = 0.f;
  for (int d = 0; d < hd; ++d) {
    const float cs = col_s[d], ct = col_t[d];
#pragma unroll
    for (int k = 0; k < R; ++k) {
      s[k] = fmaf(rows_s[k * rstride + d], cs, s[k]);
      t[k] = fmaf(rows_t[k * rstride + d], ct, t[k]);
    }
  }
}

// One online-softmax step of a row over the warp's 32 columns: sk is this lane's score, m / l the row's
// running max / sum (updated), acc its accumulator (rescaled); returns this lane's probability (0 where
// !valid). m starts at -inf, so the first step needs a valid lane: alpha = exp(m - mn) is NaN otherwise.
template <int HDV>
__device__ __forceinline__ float online_softmax_step(float sk, bool valid, float& m, float& l, float (&acc)[HDV]) {
  sk = valid ? sk : -INFINITY;
  const float mn = fmaxf(m, warp_max(sk));
  const float alpha = __expf(m - mn);
  const float p = valid ? __expf(sk - mn) : 0.f;
  l = l * alpha + warp_sum(p);
  m = mn;
#pragma unroll
  for (int c = 0; c < HDV; ++c) acc[c] *= alpha;
  return p;
}

// acc[k] += sum over j < n (in j order) of p[k] of lane j times tile row j (stride ld): the warp's rows times
// n tokens of a shared tile (P V, dS K, ...).
template <int R, int HDV>
__device__ __forceinline__ void accum_rows(float (&acc)[R][HDV], const float (&p)[R], const float* tile, int ld,
                                           int n, int hd) {
  const int lane = threadIdx.x & 31;
  for (int j = 0; j < n; ++j) {
#pragma unroll
    for (int k = 0; k < R; ++k) {
      const float pj = __shfl_sync(0xffffffffu, p[k], j);
#pragma unroll
      for (int c = 0; c < HDV; ++c) {
        const int d = lane + 32 * c;
        if (d < hd) acc[k][c] = fmaf(pj, tile[j * ld + d], acc[k][c]);
      }
    }
  }
}

// Two accum_rows over the same n tokens in one pass (dV += P^T dO with dK += dS^T Q).
template <int R, int HDV>
__device__ __forceinline__ void accum_rows2(float (&acc_a)[R][HDV], const float (&p_a)[R], const float* tile_a,
                                            float (&acc_b)[R][HDV], const float (&p_b)[R], const float* tile_b,
                                            int ld, int n, int hd) {
  const int lane = threadIdx.x & 31;
  for (int j = 0; j < n; ++j) {
#pragma unroll
    for (int k = 0; k < R; ++k) {
      const float pa = __shfl_sync(0xffffffffu, p_a[k], j);
      const float pb = __shfl_sync(0xffffffffu, p_b[k], j);
#pragma unroll
      for (int c = 0; c < HDV; ++c) {
        const int d = lane + 32 * c;
        if (d < hd) {
          acc_a[k][c] = fmaf(pa, tile_a[j * ld + d], acc_a[k][c]);
          acc_b[k][c] = fmaf(pb, tile_b[j * ld + d], acc_b[k][c]);
        }
      }
    }
  }
}

// dst[d] = T(acc[c] * mul) for the lane's head-dim slots d < hd.
template <typename T, int HDV>
__device__ __forceinline__ void store_row(T* dst, const float (&acc)[HDV], float mul, int hd) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int c = 0; c < HDV; ++c) {
    const int d = lane + 32 * c;
    if (d < hd) dst[d] = static_cast<T>(acc[c] * mul);
  }
}

// Host side. ------------------------------------------------------------------------------------------

// Above 48 KB a kernel must opt in to more dynamic shared memory, up to the device's per-block limit.
template <typename Kernel>
void prepare_smem(Kernel kernel, size_t bytes, const char* op) {
  constexpr size_t kDefaultSmem = 48 * 1024;
  if (bytes <= kDefaultSmem) return;
  const size_t limit = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  TORCH_CHECK(bytes <= limit, "fastops.", op, " (cuda): needs ", bytes, " bytes of shared memory per block, the ",
              "device allows ", limit);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

// Calls f(std::integral_constant<int, HDV>) with HDV = head-dim registers per lane (head_dim <= 128).
template <typename F>
void dispatch_hdv(int hd, F&& f) {
  if (hd <= 32) {
    f(std::integral_constant<int, 1>{});
  } else if (hd <= 64) {
    f(std::integral_constant<int, 2>{});
  } else {
    f(std::integral_constant<int, 4>{});
  }
}

}  // namespace attn_cuda
}  // namespace fastops
