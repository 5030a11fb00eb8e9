// CBAM (channel + spatial attention) on CUDA: forward and backward, NCHW and channels_last, float / half /
// bf16 (the oracle: fastops/reference/cbam.py).
//
// Forward: three passes over x and work on small fp32 maps in between.
//   P1  pooled[n, 0|1, c] = mean_hw x, max_hw x, both in one pass.
//   MLP ca = gate(mlp(pavg) + mlp(pmax)) (fp32 GEMM kernels shared with squeeze_excite.cu).
//   P2  spatial[n, 0|1, p] = mean_c x1, max_c x1 with x1 = x * ca computed on the fly (never written).
//   conv u = conv_kxk(spatial) (shared-memory tiles), BN batch stats (training), sa = gate(BN(u)).
//   P3  out = x1 * sa.
// Backward: recompute ca (bit-identical: same kernels, same inputs) and u; then
//   B1  dsa[n, p] = sum_c go * x1 and |T1[n, p]| = #{c : x1 == s1} in one pass;
//   small maps: dv = dsa * gate'(v), the BN backward -> du, dS = conv_transpose(du) (stored pre-divided:
//       ds0 / C and ds1 / |T1|), gconv_w = sum du * shifted spatial;
//   B2  dca[n, c] = sum_p dx1 * x and |T2[n, c]| = #{p : x == pmax} in one pass, with
//       dx1 = go * sa + ds0 / C + [x1 == s1] ds1 / |T1|;
//   MLP backward (both branches) -> dpavg, dpmax;
//   B3  gx = dx1 * ca + dpavg / HW + [x == pmax] dpmax / |T2|.
// x1 is always __fmul_rn(float(x), ca): an explicit round-to-nearest product the compiler may not fuse
// into an FMA, so the backward's x1 equals the forward's bit for bit and the max ties are found exactly.
//
// Pass shapes. NCHW: a block is 8 warps; a lane owns V adjacent pixels (V-wide loads along the plane), a
// block owns a tile of 32*V pixels of one sample and a chunk of channels, warp w taking channels w, w+8, ...
// Per-pixel values (sa, ds0 / C, ...) are loaded once per tile into registers, per-channel values are
// warp-uniform. Reductions over pixels (P1, B2) are a warp shuffle per channel and tile; reductions over
// channels (P2, B1) combine the 8 warps in shared memory. channels_last: a (TX x TY) block owns TX*V
// adjacent channels (a thread V of them) and a split of the pixels, rows taking every TY-th pixel;
// per-channel values live in registers, per-pixel values are broadcast loads. Reductions over pixels
// combine the rows in shared memory; the reduction over channels (P2, B1) gives each pixel a group of
// lanes (as many as the row needs, up to a warp) and reduces with shuffles. Any reduction split over blocks
// leaves fp32 partials that a second kernel combines in a fixed order: deterministic, no atomics.
//
// The small (N, H, W) maps: conv, transposed conv and the conv weight gradient are hand-written (cuDNN
// would run fp32 convolutions in TF32 under torch's default allow_tf32); BN batch statistics and the few
// scalar sums of the BN backward are ATen reductions on those fp32 maps (fp32, deterministic, a few
// microseconds next to the passes over x).
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <string_view>
#include <tuple>

#include "common.h"
#include "cuda/channel_attn.cuh"

namespace fastops {

namespace {

using namespace attn_cuda;

constexpr int kWarps = kThreads / 32;
constexpr int kConvTile = 16;                     // conv kernels: 16 x 16 outputs per block
constexpr int kMaxK = 15;                         // largest spatial kernel
constexpr int kHalo = kConvTile + kMaxK - 1;      // input rectangle side for the largest kernel

// Max that propagates NaN, as torch.amax.
__device__ __forceinline__ float nanmax(float a, float b) { return (a > b || isnan(a)) ? a : b; }

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = nanmax(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// x1 = x * ca, rounded once (never contracted into an FMA), identical in the forward and the backward.
__device__ __forceinline__ float mul_x1(float x, float ca) { return __fmul_rn(x, ca); }

// Gates (fp32): sigmoid or hard_sigmoid = relu6(z + 3) / 6, and their derivatives.
__device__ __forceinline__ float gate_fwd(Act g, float z) {
  if (g == Act::kHardSigmoid) return hard_sigmoidf_(z);
  return 1.f / (1.f + __expf(-z));
}

__device__ __forceinline__ float gate_grad(Act g, float z) {
  if (g == Act::kHardSigmoid) return (z > -3.f && z < 3.f) ? (1.f / 6.f) : 0.f;
  const float s = 1.f / (1.f + __expf(-z));
  return s * (1.f - s);
}

// ---------------------------------------------------------------------------------------------------
// Arguments of the passes over x; a pass reads the fields it needs, the others are null.
template <typename T>
struct CbamArgs {
  const T* x;
  const T* go;           // grad_out (backward)
  const float* ca;       // (N, C)
  const float* pooled;   // (N, 2, C); pmax[n, c] = pooled[n*2C + C + c]
  const float* spatial;  // (N, 2, HW); s1[n, p] = spatial[(2n + 1)*HW + p]
  const float* sa;       // (N, HW)
  const float* dsw;      // (N, 2, HW): [ds0 / C, ds1 / |T1|]
  const float* coef;     // (N, 2, C): [dpavg / HW, dpmax / |T2|]
  T* out;                // out (forward) or grad_x (backward)
};

// Where a reduction's two results go: out0[n*ld + i] = scale0 * v0 and out1[n*ld + i] = v1 (i = c or p),
// or, when the reduction is split S ways, partial[((n*L + i)*S + s)*2 + {0, 1}] for the finishing kernel.
struct RedOut {
  float* out0;
  float* out1;
  int64_t ld;
  float scale0;
  float* partial;
};

// ---------------------------------------------------------------------------------------------------
// P1 / B2: per (n, c), reductions over pixels. Forward: (sum x, max x). Backward: (sum dx1 * x, #(x == pmax)).

template <bool BWD>
__device__ __forceinline__ void emit_hw(const RedOut& o, int64_t n, int64_t c, int64_t C, int64_t s, int64_t S,
                                        float v0, float v1) {
  if (S == 1) {
    o.out0[n * o.ld + c] = v0 * o.scale0;
    o.out1[n * o.ld + c] = v1;
  } else {
    float* p = o.partial + ((n * C + c) * S + s) * 2;
    p[0] = v0;
    p[1] = v1;
  }
}

// NCHW: item = (n, pixel tile t of 32*V pixels, channel chunk cc); the split index of a result is t.
template <typename T, int V, bool BWD>
__global__ void __launch_bounds__(kThreads)
hw_reduce_nchw_kernel(const CbamArgs<T> a, const RedOut o, const int64_t N, const int64_t C, const int64_t HW,
                      const int64_t CC, const int64_t CH) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t nvec = HW / V, tiles = ceil_div(nvec, 32);
  const int64_t items = N * tiles * CC;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t cc = item % CC, r = item / CC;
    const int64_t t = r % tiles, n = r / tiles;
    const int64_t pv = t * 32 + lane;
    const bool valid = pv < nvec;
    const int64_t p0 = pv * V;
    float psa[V], pd0[V], pd1[V], ps1[V];
    if constexpr (BWD) {
      if (valid) {
        const Vec<float, V> v_sa = load_vec<V>(a.sa + n * HW + p0);
        const Vec<float, V> v_d0 = load_vec<V>(a.dsw + 2 * n * HW + p0);
        const Vec<float, V> v_d1 = load_vec<V>(a.dsw + (2 * n + 1) * HW + p0);
        const Vec<float, V> v_s1 = load_vec<V>(a.spatial + (2 * n + 1) * HW + p0);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          psa[j] = v_sa.v[j];
          pd0[j] = v_d0.v[j];
          pd1[j] = v_d1.v[j];
          ps1[j] = v_s1.v[j];
        }
      }
    }
    const int64_t c_end = (cc + 1) * CH < C ? (cc + 1) * CH : C;
    for (int64_t c = cc * CH + warp; c < c_end; c += kWarps) {  // warp-uniform
      const int64_t k = n * C + c;
      float v0 = 0.f, v1 = BWD ? 0.f : -INFINITY;
      if (valid) {
        const Vec<T, V> xv = load_vec<V>(a.x + k * HW + p0);
        if constexpr (BWD) {
          const Vec<T, V> gv = load_vec<V>(a.go + k * HW + p0);
          const float cac = a.ca[k];
          const float pm = a.pooled[(2 * n + 1) * C + c];
#pragma unroll
          for (int j = 0; j < V; ++j) {
            const float xf = static_cast<float>(xv.v[j]);
            const float x1 = mul_x1(xf, cac);
            const float dx1 = static_cast<float>(gv.v[j]) * psa[j] + pd0[j] + (x1 == ps1[j] ? pd1[j] : 0.f);
            v0 += dx1 * xf;
            v1 += xf == pm ? 1.f : 0.f;
          }
        } else {
#pragma unroll
          for (int j = 0; j < V; ++j) {
            const float xf = static_cast<float>(xv.v[j]);
            v0 += xf;
            v1 = nanmax(v1, xf);
          }
        }
      }
      v0 = warp_sum(v0);
      v1 = BWD ? warp_sum(v1) : warp_max(v1);
      if (lane == 0) emit_hw<BWD>(o, n, c, C, t, tiles, v0, v1);
    }
  }
}

// channels_last: item = (n, channel tile ct of TX*V channels, pixel split s of seg pixels).
template <typename T, int V, bool BWD>
__global__ void __launch_bounds__(kThreads)
hw_reduce_nhwc_kernel(const CbamArgs<T> a, const RedOut o, const int64_t N, const int64_t C, const int64_t HW,
                      const int64_t S, const int64_t seg) {
  __shared__ float red0[kThreads * V];
  __shared__ float red1[kThreads * V];
  const int TX = blockDim.x, TY = blockDim.y, tx = threadIdx.x, ty = threadIdx.y;
  const int tid = ty * TX + tx;
  const int64_t cvec = C / V, ctiles = ceil_div(cvec, TX);
  const int64_t items = N * ctiles * S;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t s = item % S, r = item / S;
    const int64_t ct = r % ctiles, n = r / ctiles;
    const int64_t cv = ct * TX + tx;
    const int64_t c0 = cv * V;
    float acc0[V], acc1[V];
#pragma unroll
    for (int j = 0; j < V; ++j) {
      acc0[j] = 0.f;
      acc1[j] = BWD ? 0.f : -INFINITY;
    }
    if (cv < cvec) {
      float cca[V], cpm[V];
      if constexpr (BWD) {
        const Vec<float, V> v_ca = load_vec<V>(a.ca + n * C + c0);
        const Vec<float, V> v_pm = load_vec<V>(a.pooled + (2 * n + 1) * C + c0);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          cca[j] = v_ca.v[j];
          cpm[j] = v_pm.v[j];
        }
      }
      const int64_t p1 = (s + 1) * seg < HW ? (s + 1) * seg : HW;
      for (int64_t p = s * seg + ty; p < p1; p += TY) {
        const int64_t off = (n * HW + p) * C + c0;
        const Vec<T, V> xv = load_vec<V>(a.x + off);
        if constexpr (BWD) {
          const Vec<T, V> gv = load_vec<V>(a.go + off);
          const float sap = a.sa[n * HW + p];
          const float d0 = a.dsw[2 * n * HW + p];
          const float d1 = a.dsw[(2 * n + 1) * HW + p];
          const float s1p = a.spatial[(2 * n + 1) * HW + p];
#pragma unroll
          for (int j = 0; j < V; ++j) {
            const float xf = static_cast<float>(xv.v[j]);
            const float x1 = mul_x1(xf, cca[j]);
            const float dx1 = static_cast<float>(gv.v[j]) * sap + d0 + (x1 == s1p ? d1 : 0.f);
            acc0[j] += dx1 * xf;
            acc1[j] += xf == cpm[j] ? 1.f : 0.f;
          }
        } else {
#pragma unroll
          for (int j = 0; j < V; ++j) {
            const float xf = static_cast<float>(xv.v[j]);
            acc0[j] += xf;
            acc1[j] = nanmax(acc1[j], xf);
          }
        }
      }
    }
    __syncthreads();  // the previous item's reads of red0 / red1 are done
#pragma unroll
    for (int j = 0; j < V; ++j) {
      red0[tid * V + j] = acc0[j];
      red1[tid * V + j] = acc1[j];
    }
    __syncthreads();
    // Element e = tx * V + j of the tile is channel ct*TX*V + e; rows are combined in order.
    for (int e = tid; e < TX * V; e += TX * TY) {
      float v0 = 0.f, v1 = BWD ? 0.f : -INFINITY;
      for (int t = 0; t < TY; ++t) {
        v0 += red0[t * TX * V + e];
        v1 = BWD ? v1 + red1[t * TX * V + e] : nanmax(v1, red1[t * TX * V + e]);
      }
      const int64_t c = ct * TX * V + e;
      if (c < C) emit_hw<BWD>(o, n, c, C, s, S, v0, v1);
    }
  }
}

// Combines the S partials of each (n, c) in order.
template <bool BWD>
__global__ void __launch_bounds__(kThreads)
hw_finish_kernel(const RedOut o, const int64_t N, const int64_t C, const int64_t S) {
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < N * C; k += int64_t(gridDim.x) * blockDim.x) {
    const float* p = o.partial + k * S * 2;
    float v0 = 0.f, v1 = BWD ? 0.f : -INFINITY;
    for (int64_t s = 0; s < S; ++s) {
      v0 += p[2 * s];
      v1 = BWD ? v1 + p[2 * s + 1] : nanmax(v1, p[2 * s + 1]);
    }
    const int64_t n = k / C, c = k - n * C;
    o.out0[n * o.ld + c] = v0 * o.scale0;
    o.out1[n * o.ld + c] = v1;
  }
}

// ---------------------------------------------------------------------------------------------------
// P2 / B1: per (n, p), reductions over channels. Forward: (sum x1, max x1). Backward: (sum go * x1,
// #(x1 == s1)).

// NCHW: item = (n, pixel tile t, channel chunk cc); the 8 warps' partial results meet in shared memory.
// With CC > 1 chunks, partial[((n*CC + cc)*2 + {0, 1})*HW + p] and chan_finish_kernel combines them.
template <typename T, int V, bool BWD>
__global__ void __launch_bounds__(kThreads)
chan_reduce_nchw_kernel(const CbamArgs<T> a, const RedOut o, const int64_t N, const int64_t C, const int64_t HW,
                        const int64_t CC, const int64_t CH) {
  __shared__ float red0[kThreads * V];
  __shared__ float red1[kThreads * V];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, tid = threadIdx.x;
  const int64_t nvec = HW / V, tiles = ceil_div(nvec, 32);
  const int64_t items = N * tiles * CC;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t cc = item % CC, r = item / CC;
    const int64_t t = r % tiles, n = r / tiles;
    const int64_t pv = t * 32 + lane;
    const int64_t p0 = pv * V;
    float acc0[V], acc1[V];
#pragma unroll
    for (int j = 0; j < V; ++j) {
      acc0[j] = 0.f;
      acc1[j] = BWD ? 0.f : -INFINITY;
    }
    if (pv < nvec) {
      float ps1[V];
      if constexpr (BWD) {
        const Vec<float, V> v_s1 = load_vec<V>(a.spatial + (2 * n + 1) * HW + p0);
#pragma unroll
        for (int j = 0; j < V; ++j) ps1[j] = v_s1.v[j];
      }
      const int64_t c_end = (cc + 1) * CH < C ? (cc + 1) * CH : C;
      for (int64_t c = cc * CH + warp; c < c_end; c += kWarps) {
        const int64_t k = n * C + c;
        const float cac = a.ca[k];
        const Vec<T, V> xv = load_vec<V>(a.x + k * HW + p0);
        if constexpr (BWD) {
          const Vec<T, V> gv = load_vec<V>(a.go + k * HW + p0);
#pragma unroll
          for (int j = 0; j < V; ++j) {
            const float x1 = mul_x1(static_cast<float>(xv.v[j]), cac);
            acc0[j] += static_cast<float>(gv.v[j]) * x1;
            acc1[j] += x1 == ps1[j] ? 1.f : 0.f;
          }
        } else {
#pragma unroll
          for (int j = 0; j < V; ++j) {
            const float x1 = mul_x1(static_cast<float>(xv.v[j]), cac);
            acc0[j] += x1;
            acc1[j] = nanmax(acc1[j], x1);
          }
        }
      }
    }
    __syncthreads();  // the previous item's reads of red0 / red1 are done
#pragma unroll
    for (int j = 0; j < V; ++j) {
      red0[warp * 32 * V + lane * V + j] = acc0[j];
      red1[warp * 32 * V + lane * V + j] = acc1[j];
    }
    __syncthreads();
    // Element e = lane * V + j of a warp's slice is pixel t*32*V + e; warps are combined in order.
    for (int e = tid; e < 32 * V; e += kThreads) {
      const int64_t p = t * 32 * V + e;
      if (p >= HW) continue;
      float v0 = 0.f, v1 = BWD ? 0.f : -INFINITY;
      for (int w = 0; w < kWarps; ++w) {
        v0 += red0[w * 32 * V + e];
        v1 = BWD ? v1 + red1[w * 32 * V + e] : nanmax(v1, red1[w * 32 * V + e]);
      }
      if (CC == 1) {
        o.out0[n * o.ld + p] = v0 * o.scale0;
        o.out1[n * o.ld + p] = v1;
      } else {
        o.partial[((n * CC + cc) * 2) * HW + p] = v0;
        o.partial[((n * CC + cc) * 2 + 1) * HW + p] = v1;
      }
    }
  }
}

template <bool BWD>
__global__ void __launch_bounds__(kThreads)
chan_finish_kernel(const RedOut o, const int64_t N, const int64_t HW, const int64_t CC) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < N * HW; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / HW, p = i - n * HW;
    float v0 = 0.f, v1 = BWD ? 0.f : -INFINITY;
    for (int64_t cc = 0; cc < CC; ++cc) {
      v0 += o.partial[((n * CC + cc) * 2) * HW + p];
      const float b = o.partial[((n * CC + cc) * 2 + 1) * HW + p];
      v1 = BWD ? v1 + b : nanmax(v1, b);
    }
    o.out0[n * o.ld + p] = v0 * o.scale0;
    o.out1[n * o.ld + p] = v1;
  }
}

// channels_last: LP lanes (a power of two <= 32) per pixel, each V channels at a time; 32 / LP pixels per
// warp. The group reduces with xor shuffles (offsets < LP stay inside an aligned group).
template <typename T, int V, bool BWD>
__global__ void __launch_bounds__(kThreads)
chan_reduce_nhwc_kernel(const CbamArgs<T> a, const RedOut o, const int64_t N, const int64_t C, const int64_t HW,
                        const int LP) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane / LP, l = lane % LP, ppw = 32 / LP;
  const int64_t cvec = C / V, NHW = N * HW;
  for (int64_t base = (int64_t(blockIdx.x) * kWarps + warp) * ppw; base < NHW;
       base += int64_t(gridDim.x) * kWarps * ppw) {  // warp-uniform
    const int64_t q = base + g;
    const bool valid = q < NHW;
    const int64_t n = valid ? q / HW : 0, p = valid ? q - n * HW : 0;
    float v0 = 0.f, v1 = BWD ? 0.f : -INFINITY;
    if (valid) {
      const float s1p = BWD ? a.spatial[(2 * n + 1) * HW + p] : 0.f;
      for (int64_t cv = l; cv < cvec; cv += LP) {
        const int64_t c0 = cv * V;
        const Vec<T, V> xv = load_vec<V>(a.x + q * C + c0);
        const Vec<float, V> cav = load_vec<V>(a.ca + n * C + c0);
        if constexpr (BWD) {
          const Vec<T, V> gv = load_vec<V>(a.go + q * C + c0);
#pragma unroll
          for (int j = 0; j < V; ++j) {
            const float x1 = mul_x1(static_cast<float>(xv.v[j]), cav.v[j]);
            v0 += static_cast<float>(gv.v[j]) * x1;
            v1 += x1 == s1p ? 1.f : 0.f;
          }
        } else {
#pragma unroll
          for (int j = 0; j < V; ++j) {
            const float x1 = mul_x1(static_cast<float>(xv.v[j]), cav.v[j]);
            v0 += x1;
            v1 = nanmax(v1, x1);
          }
        }
      }
    }
    for (int off = LP / 2; off > 0; off >>= 1) {
      v0 += __shfl_xor_sync(0xffffffffu, v0, off);
      const float b = __shfl_xor_sync(0xffffffffu, v1, off);
      v1 = BWD ? v1 + b : nanmax(v1, b);
    }
    if (valid && l == 0) {
      o.out0[n * o.ld + p] = v0 * o.scale0;
      o.out1[n * o.ld + p] = v1;
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// P3 / B3: elementwise. Forward: out = x1 * sa. Backward: gx = dx1 * ca + dpavg / HW + [x == pmax] dpmax / |T2|.

template <bool BWD>
__device__ __forceinline__ float apply_one(float xf, float gof, float cac, float sap, float d0, float d1, float s1p,
                                           float ca_coef, float cm_coef, float pm) {
  const float x1 = mul_x1(xf, cac);
  if constexpr (!BWD) {
    return x1 * sap;
  } else {
    const float dx1 = gof * sap + d0 + (x1 == s1p ? d1 : 0.f);
    return dx1 * cac + ca_coef + (xf == pm ? cm_coef : 0.f);
  }
}

// NCHW: item = (n, pixel tile t, channel chunk cc), as the reductions.
template <typename T, int V, bool BWD>
__global__ void __launch_bounds__(kThreads)
apply_nchw_kernel(const CbamArgs<T> a, const int64_t N, const int64_t C, const int64_t HW, const int64_t CC,
                  const int64_t CH) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t nvec = HW / V, tiles = ceil_div(nvec, 32);
  const int64_t items = N * tiles * CC;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t cc = item % CC, r = item / CC;
    const int64_t t = r % tiles, n = r / tiles;
    const int64_t pv = t * 32 + lane;
    if (pv >= nvec) continue;  // no barrier or shuffle in this kernel
    const int64_t p0 = pv * V;
    float psa[V], pd0[V], pd1[V], ps1[V];
    {
      const Vec<float, V> v_sa = load_vec<V>(a.sa + n * HW + p0);
#pragma unroll
      for (int j = 0; j < V; ++j) psa[j] = v_sa.v[j];
    }
    if constexpr (BWD) {
      const Vec<float, V> v_d0 = load_vec<V>(a.dsw + 2 * n * HW + p0);
      const Vec<float, V> v_d1 = load_vec<V>(a.dsw + (2 * n + 1) * HW + p0);
      const Vec<float, V> v_s1 = load_vec<V>(a.spatial + (2 * n + 1) * HW + p0);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        pd0[j] = v_d0.v[j];
        pd1[j] = v_d1.v[j];
        ps1[j] = v_s1.v[j];
      }
    }
    const int64_t c_end = (cc + 1) * CH < C ? (cc + 1) * CH : C;
    for (int64_t c = cc * CH + warp; c < c_end; c += kWarps) {
      const int64_t k = n * C + c, off = k * HW + p0;
      const float cac = a.ca[k];
      const Vec<T, V> xv = load_vec<V>(a.x + off);
      Vec<T, V> ov;
      if constexpr (BWD) {
        const float cA = a.coef[2 * n * C + c], cM = a.coef[(2 * n + 1) * C + c];
        const float pm = a.pooled[(2 * n + 1) * C + c];
        const Vec<T, V> gv = load_vec<V>(a.go + off);
#pragma unroll
        for (int j = 0; j < V; ++j)
          ov.v[j] = static_cast<T>(apply_one<true>(static_cast<float>(xv.v[j]), static_cast<float>(gv.v[j]), cac,
                                                   psa[j], pd0[j], pd1[j], ps1[j], cA, cM, pm));
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j)
          ov.v[j] = static_cast<T>(
              apply_one<false>(static_cast<float>(xv.v[j]), 0.f, cac, psa[j], 0.f, 0.f, 0.f, 0.f, 0.f, 0.f));
      }
      store_vec<V>(a.out + off, ov);
    }
  }
}

// channels_last: item = (n, channel tile ct, pixel split s), as the reductions.
template <typename T, int V, bool BWD>
__global__ void __launch_bounds__(kThreads)
apply_nhwc_kernel(const CbamArgs<T> a, const int64_t N, const int64_t C, const int64_t HW, const int64_t S,
                  const int64_t seg) {
  const int TX = blockDim.x, TY = blockDim.y, tx = threadIdx.x, ty = threadIdx.y;
  const int64_t cvec = C / V, ctiles = ceil_div(cvec, TX);
  const int64_t items = N * ctiles * S;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t s = item % S, r = item / S;
    const int64_t ct = r % ctiles, n = r / ctiles;
    const int64_t cv = ct * TX + tx;
    if (cv >= cvec) continue;  // no barrier in this kernel
    const int64_t c0 = cv * V;
    float cca[V], cA[V], cM[V], cpm[V];
    {
      const Vec<float, V> v_ca = load_vec<V>(a.ca + n * C + c0);
#pragma unroll
      for (int j = 0; j < V; ++j) cca[j] = v_ca.v[j];
    }
    if constexpr (BWD) {
      const Vec<float, V> v_a = load_vec<V>(a.coef + 2 * n * C + c0);
      const Vec<float, V> v_m = load_vec<V>(a.coef + (2 * n + 1) * C + c0);
      const Vec<float, V> v_pm = load_vec<V>(a.pooled + (2 * n + 1) * C + c0);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        cA[j] = v_a.v[j];
        cM[j] = v_m.v[j];
        cpm[j] = v_pm.v[j];
      }
    }
    const int64_t p1 = (s + 1) * seg < HW ? (s + 1) * seg : HW;
    for (int64_t p = s * seg + ty; p < p1; p += TY) {
      const int64_t off = (n * HW + p) * C + c0;
      const float sap = a.sa[n * HW + p];
      const Vec<T, V> xv = load_vec<V>(a.x + off);
      Vec<T, V> ov;
      if constexpr (BWD) {
        const float d0 = a.dsw[2 * n * HW + p], d1 = a.dsw[(2 * n + 1) * HW + p];
        const float s1p = a.spatial[(2 * n + 1) * HW + p];
        const Vec<T, V> gv = load_vec<V>(a.go + off);
#pragma unroll
        for (int j = 0; j < V; ++j)
          ov.v[j] = static_cast<T>(apply_one<true>(static_cast<float>(xv.v[j]), static_cast<float>(gv.v[j]), cca[j],
                                                   sap, d0, d1, s1p, cA[j], cM[j], cpm[j]));
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j)
          ov.v[j] = static_cast<T>(
              apply_one<false>(static_cast<float>(xv.v[j]), 0.f, cca[j], sap, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f));
      }
      store_vec<V>(a.out + off, ov);
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// The small maps.

// k x k correlation, padding k / 2, on 16 x 16 output tiles with their input rectangle in shared memory.
// Forward: u (N, HW) = sum_{j, a, b} w[j, a, b] * spatial_j[h + a - P, w + b - P].
// Backward (transposed conv = correlation with the flipped kernel, since k - 1 = 2P):
//   ds_j[h, w] = sum_{a, b} du[h - a + P, w - b + P] w[j, a, b] = sum_{a', b'} du[h + a' - P, w + b' - P]
//   w[j, k-1-a', k-1-b'], stored as dsw[n, 0] = ds0 / C and dsw[n, 1] = ds1 / |T1| (0 where |T1| = 0).
template <bool BWD>
__global__ void __launch_bounds__(kThreads)
conv_kernel(const float* __restrict__ src, const float* __restrict__ w, float* __restrict__ dst,
            const float* __restrict__ cnt1, const int64_t N, const int H, const int W, const int k, const float inv_c) {
  constexpr int CIN = BWD ? 1 : 2, COUT = BWD ? 2 : 1;
  __shared__ float ws[2 * kMaxK * kMaxK];
  __shared__ float tile[CIN][kHalo * kHalo];
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * kConvTile + tx;
  const int P = k / 2, kk = k * k, TW = kConvTile + k - 1;
  for (int i = tid; i < 2 * kk; i += kThreads) {
    if (BWD) {
      const int j = i / kk, a = (i % kk) / k, b = i % k;
      ws[i] = w[j * kk + (k - 1 - a) * k + (k - 1 - b)];
    } else {
      ws[i] = w[i];
    }
  }
  const int64_t HW = int64_t(H) * W;
  const int64_t tiles_h = ceil_div(H, kConvTile), tiles_w = ceil_div(W, kConvTile);
  const int64_t items = N * tiles_h * tiles_w;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t n = item / (tiles_h * tiles_w), r = item % (tiles_h * tiles_w);
    const int h0 = static_cast<int>(r / tiles_w) * kConvTile, w0 = static_cast<int>(r % tiles_w) * kConvTile;
    __syncthreads();  // previous tile's reads done (and, the first time, ws written)
    for (int i = tid; i < CIN * TW * TW; i += kThreads) {
      const int ci = i / (TW * TW), rem = i % (TW * TW);
      const int ih = h0 - P + rem / TW, iw = w0 - P + rem % TW;
      tile[ci][rem] = (ih >= 0 && ih < H && iw >= 0 && iw < W) ? src[(n * CIN + ci) * HW + int64_t(ih) * W + iw] : 0.f;
    }
    __syncthreads();
    const int oh = h0 + ty, ow = w0 + tx;
    if (oh >= H || ow >= W) continue;
    const int64_t pix = int64_t(oh) * W + ow;
#pragma unroll
    for (int co = 0; co < COUT; ++co) {
      float acc = 0.f;
#pragma unroll
      for (int ci = 0; ci < CIN; ++ci) {
        const float* wp = ws + (co + ci) * kk;  // ws[co] (backward, CIN = 1) or ws[ci] (forward, COUT = 1)
        const float* tp = tile[ci] + ty * TW + tx;
        for (int a = 0; a < k; ++a)
          for (int b = 0; b < k; ++b) acc += wp[a * k + b] * tp[a * TW + b];
      }
      if constexpr (!BWD) {
        dst[n * HW + pix] = acc;
      } else if (co == 0) {
        dst[2 * n * HW + pix] = acc * inv_c;
      } else {
        const float cnt = cnt1[n * HW + pix];
        dst[(2 * n + 1) * HW + pix] = cnt > 0.f ? acc / cnt : 0.f;
      }
    }
  }
}

// gconv_w[j, a, b] = sum_{n, h, w} du[n, h, w] * spatial_j[n, h + a - P, w + b - P]. A block loops over
// 16 x 16 tiles (du tile and spatial rectangle in shared memory). Its threads own "slots" (tap, part): a
// tap's sum over a tile's 256 positions is split into `parts` strided subsets when there are fewer than 256
// taps, so every thread works. partial[block * nslots + slot]; conv_wgrad_finish_kernel adds them in order.
__global__ void __launch_bounds__(kThreads)
conv_wgrad_kernel(const float* __restrict__ du, const float* __restrict__ spatial, float* __restrict__ partial,
                  const int64_t N, const int H, const int W, const int k) {
  __shared__ float tile[2][kHalo * kHalo];
  __shared__ float dut[kConvTile * kConvTile];
  const int tid = threadIdx.x;
  const int P = k / 2, kk = k * k, TW = kConvTile + k - 1, taps = 2 * kk;
  const int parts = taps >= kThreads ? 1 : kThreads / taps, nslots = taps * parts;  // nslots <= 2 * kThreads
  int sci[2], soff[2], spart[2];
  bool sval[2];
  float acc[2] = {0.f, 0.f};
#pragma unroll
  for (int u = 0; u < 2; ++u) {
    const int sl = tid + u * kThreads;
    sval[u] = sl < nslots;
    const int tap = sl % taps;
    sci[u] = tap / kk;
    soff[u] = ((tap % kk) / k) * TW + tap % k;  // a * TW + b
    spart[u] = sl / taps;
  }
  const int64_t HW = int64_t(H) * W;
  const int64_t tiles_h = ceil_div(H, kConvTile), tiles_w = ceil_div(W, kConvTile);
  const int64_t items = N * tiles_h * tiles_w;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t n = item / (tiles_h * tiles_w), r = item % (tiles_h * tiles_w);
    const int h0 = static_cast<int>(r / tiles_w) * kConvTile, w0 = static_cast<int>(r % tiles_w) * kConvTile;
    __syncthreads();  // previous tile's reads done
    for (int i = tid; i < 2 * TW * TW; i += kThreads) {
      const int ci = i / (TW * TW), rem = i % (TW * TW);
      const int ih = h0 - P + rem / TW, iw = w0 - P + rem % TW;
      tile[ci][rem] =
          (ih >= 0 && ih < H && iw >= 0 && iw < W) ? spatial[(2 * n + ci) * HW + int64_t(ih) * W + iw] : 0.f;
    }
    {
      const int y = tid / kConvTile, x = tid % kConvTile;  // kThreads == kConvTile^2
      const int oh = h0 + y, ow = w0 + x;
      dut[tid] = (oh < H && ow < W) ? du[n * HW + int64_t(oh) * W + ow] : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      if (!sval[u]) continue;
      const float* tp = tile[sci[u]] + soff[u];
      float s = 0.f;
      for (int pos = spart[u]; pos < kConvTile * kConvTile; pos += parts)
        s += dut[pos] * tp[(pos / kConvTile) * TW + pos % kConvTile];
      acc[u] += s;
    }
  }
#pragma unroll
  for (int u = 0; u < 2; ++u)
    if (sval[u]) partial[int64_t(blockIdx.x) * nslots + tid + u * kThreads] = acc[u];
}

__global__ void __launch_bounds__(kThreads)
conv_wgrad_finish_kernel(const float* __restrict__ partial, float* __restrict__ gw, const int64_t blocks,
                         const int taps, const int parts) {
  const int tap = blockIdx.x * blockDim.x + threadIdx.x;
  if (tap >= taps) return;
  const int64_t nslots = int64_t(taps) * parts;
  float s = 0.f;
  for (int64_t b = 0; b < blocks; ++b)
    for (int q = 0; q < parts; ++q) s += partial[b * nslots + int64_t(q) * taps + tap];
  gw[tap] = s;
}

// BN + gate on u: sa = gate((u - mean) * rstd * bn_w + bn_b). stats = [mean, var]; bn = [bn_w, bn_b] (fp32).
__global__ void __launch_bounds__(kThreads)
bn_gate_kernel(const float* __restrict__ u, const float* __restrict__ stats, const float* __restrict__ bnw,
               const float* __restrict__ bnb, const float eps, const Act gate, float* __restrict__ sa, const int64_t M) {
  const float mean = stats[0], rstd = rsqrtf(stats[1] + eps), w = bnw[0], b = bnb[0];
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < M; i += int64_t(gridDim.x) * blockDim.x)
    sa[i] = gate_fwd(gate, (u[i] - mean) * rstd * w + b);
}

// Backward, first half: sa (for B2 / B3), dv = dsa * gate'(v) and dv * vhat.
__global__ void __launch_bounds__(kThreads)
bn_gate_backward_kernel(const float* __restrict__ u, const float* __restrict__ stats, const float* __restrict__ bnw,
                        const float* __restrict__ bnb, const float eps, const Act gate, const float* __restrict__ dsa,
                        float* __restrict__ sa, float* __restrict__ dv, float* __restrict__ dvh, const int64_t M) {
  const float mean = stats[0], rstd = rsqrtf(stats[1] + eps), w = bnw[0], b = bnb[0];
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < M; i += int64_t(gridDim.x) * blockDim.x) {
    const float vhat = (u[i] - mean) * rstd;
    const float v = vhat * w + b;
    sa[i] = gate_fwd(gate, v);
    const float d = dsa[i] * gate_grad(gate, v);
    dv[i] = d;
    dvh[i] = d * vhat;
  }
}

// Backward, second half: du. Eval: dv * bn_w * rstd. Training (batch stats): rstd * bn_w * (dv - mean(dv)
// - vhat * mean(dv * vhat)); sums = [sum dv, sum dv * vhat] over the M = N*H*W values.
__global__ void __launch_bounds__(kThreads)
bn_du_kernel(const float* __restrict__ u, const float* __restrict__ stats, const float* __restrict__ bnw,
             const float eps, const float* __restrict__ dv, const float* __restrict__ sum_dv,
             const float* __restrict__ sum_dvh, const bool training, float* __restrict__ du, const int64_t M) {
  const float mean = stats[0], rstd = rsqrtf(stats[1] + eps), g = rstd * bnw[0];
  const float inv_m = 1.f / static_cast<float>(M);
  const float m_dv = training ? sum_dv[0] * inv_m : 0.f, m_dvh = training ? sum_dvh[0] * inv_m : 0.f;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < M; i += int64_t(gridDim.x) * blockDim.x) {
    if (training) {
      const float vhat = (u[i] - mean) * rstd;
      du[i] = g * (dv[i] - m_dv - vhat * m_dvh);
    } else {
      du[i] = g * dv[i];
    }
  }
}

// coef[n, 0, c] = dpavg / HW, coef[n, 1, c] = dpmax / |T2| (0 where |T2| = 0); dp is (2N, C), rows 2n / 2n+1.
__global__ void __launch_bounds__(kThreads)
coef_kernel(const float* __restrict__ dp, const float* __restrict__ cnt2, float* __restrict__ coef, const int64_t N,
            const int64_t C, const float inv_hw) {
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < N * C; k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = k / C, c = k - n * C;
    const float cnt = cnt2[k];
    coef[2 * n * C + c] = dp[2 * n * C + c] * inv_hw;
    coef[(2 * n + 1) * C + c] = cnt > 0.f ? dp[(2 * n + 1) * C + c] / cnt : 0.f;
  }
}

// ---------------------------------------------------------------------------------------------------
// Host side: launch plans.

struct Geom {
  int64_t N, C, H, W, HW;
  bool cl;
};

// NCHW tiles: 32*V pixels per tile, channel chunks so that about 8 blocks per SM run.
struct NchwPlan {
  int64_t tiles, CC, CH;
};

NchwPlan plan_nchw(const Geom& g, int V) {
  NchwPlan p;
  p.tiles = ceil_div(g.HW / V, 32);
  const int64_t cc = pick_splits(g.N * p.tiles, g.C, 4 * kWarps, sm_count() * 8);
  p.CH = ceil_div(g.C, cc);
  p.CC = ceil_div(g.C, p.CH);
  return p;
}

// channels_last tiles: TX threads across channel vectors, TY rows across pixels, S pixel splits.
struct NhwcPlan {
  int TX, TY;
  int64_t ctiles, S, seg;
};

NhwcPlan plan_nhwc(const Geom& g, int V) {
  NhwcPlan p;
  const int64_t cvec = g.C / V;
  p.TX = static_cast<int>(std::min<int64_t>(32, next_pow2(cvec)));
  p.TY = kThreads / p.TX;
  p.ctiles = ceil_div(cvec, p.TX);
  p.S = pick_splits(g.N * p.ctiles, g.HW, int64_t(p.TY) * 8, sm_count() * 8);
  p.seg = ceil_div(g.HW, p.S);
  p.S = ceil_div(g.HW, p.seg);
  return p;
}

template <typename T, int V, bool BWD>
void launch_hw_reduce(const CbamArgs<T>& a, RedOut o, const Geom& g, const at::TensorOptions& f32,
                      cudaStream_t stream) {
  at::Tensor partial;
  int64_t S;
  if (!g.cl) {
    const NchwPlan p = plan_nchw(g, V);
    S = p.tiles;
    if (S > 1) {
      partial = at::empty({g.N * g.C * S * 2}, f32);
      o.partial = partial.data_ptr<float>();
    }
    hw_reduce_nchw_kernel<T, V, BWD><<<blocks_for(g.N * p.tiles * p.CC, 1), kThreads, 0, stream>>>(
        a, o, g.N, g.C, g.HW, p.CC, p.CH);
  } else {
    const NhwcPlan p = plan_nhwc(g, V);
    S = p.S;
    if (S > 1) {
      partial = at::empty({g.N * g.C * S * 2}, f32);
      o.partial = partial.data_ptr<float>();
    }
    hw_reduce_nhwc_kernel<T, V, BWD><<<blocks_for(g.N * p.ctiles * p.S, 1), dim3(p.TX, p.TY), 0, stream>>>(
        a, o, g.N, g.C, g.HW, p.S, p.seg);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (S > 1) {
    hw_finish_kernel<BWD><<<blocks_for(g.N * g.C, kThreads), kThreads, 0, stream>>>(o, g.N, g.C, S);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T, int V, bool BWD>
void launch_chan_reduce(const CbamArgs<T>& a, RedOut o, const Geom& g, const at::TensorOptions& f32,
                        cudaStream_t stream) {
  if (!g.cl) {
    const NchwPlan p = plan_nchw(g, V);
    at::Tensor partial;
    if (p.CC > 1) {
      partial = at::empty({g.N * p.CC * 2 * g.HW}, f32);
      o.partial = partial.data_ptr<float>();
    }
    chan_reduce_nchw_kernel<T, V, BWD><<<blocks_for(g.N * p.tiles * p.CC, 1), kThreads, 0, stream>>>(
        a, o, g.N, g.C, g.HW, p.CC, p.CH);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (p.CC > 1) {
      chan_finish_kernel<BWD><<<blocks_for(g.N * g.HW, kThreads), kThreads, 0, stream>>>(o, g.N, g.HW, p.CC);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  } else {
    const int LP = static_cast<int>(std::min<int64_t>(32, next_pow2(g.C / V)));
    const int64_t pixels_per_block = int64_t(kWarps) * (32 / LP);
    chan_reduce_nhwc_kernel<T, V, BWD><<<blocks_for(g.N * g.HW, pixels_per_block, sm_count() * 16), kThreads, 0,
                                         stream>>>(a, o, g.N, g.C, g.HW, LP);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T, int V, bool BWD>
void launch_apply(const CbamArgs<T>& a, const Geom& g, cudaStream_t stream) {
  if (!g.cl) {
    const NchwPlan p = plan_nchw(g, V);
    apply_nchw_kernel<T, V, BWD><<<blocks_for(g.N * p.tiles * p.CC, 1), kThreads, 0, stream>>>(a, g.N, g.C, g.HW,
                                                                                              p.CC, p.CH);
  } else {
    const NhwcPlan p = plan_nhwc(g, V);
    apply_nhwc_kernel<T, V, BWD><<<blocks_for(g.N * p.ctiles * p.S, 1), dim3(p.TX, p.TY), 0, stream>>>(
        a, g.N, g.C, g.HW, p.S, p.seg);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The vector width of a pass: V | HW (NCHW, vectors along pixels) or V | C (channels_last), and every
// pointer the pass reads V at a time aligned for it.
template <typename T>
int pass_vec(const CbamArgs<T>& a, const Geom& g) {
  if (!g.cl) return pick_vec<T>(g.HW, {a.x, a.go, a.out}, {a.sa, a.dsw, a.spatial});
  return pick_vec<T>(g.C, {a.x, a.go, a.out}, {a.ca, a.pooled, a.coef});
}

template <typename T, bool BWD>
void hw_reduce(const CbamArgs<T>& a, const RedOut& o, const Geom& g, const at::TensorOptions& f32,
               cudaStream_t stream) {
#define CBAM_LAUNCH(V) launch_hw_reduce<T, V, BWD>(a, o, g, f32, stream)
  ATTN_DISPATCH_VEC(T, pass_vec(a, g), CBAM_LAUNCH)
#undef CBAM_LAUNCH
}

template <typename T, bool BWD>
void chan_reduce(const CbamArgs<T>& a, const RedOut& o, const Geom& g, const at::TensorOptions& f32,
                 cudaStream_t stream) {
#define CBAM_LAUNCH(V) launch_chan_reduce<T, V, BWD>(a, o, g, f32, stream)
  ATTN_DISPATCH_VEC(T, pass_vec(a, g), CBAM_LAUNCH)
#undef CBAM_LAUNCH
}

template <typename T, bool BWD>
void apply_pass(const CbamArgs<T>& a, const Geom& g, cudaStream_t stream) {
#define CBAM_LAUNCH(V) launch_apply<T, V, BWD>(a, g, stream)
  ATTN_DISPATCH_VEC(T, pass_vec(a, g), CBAM_LAUNCH)
#undef CBAM_LAUNCH
}

void launch_conv(bool bwd, const float* src, const float* w, float* dst, const float* cnt1, const Geom& g, int k,
                 cudaStream_t stream) {
  const int64_t items = g.N * ceil_div(g.H, kConvTile) * ceil_div(g.W, kConvTile);
  const dim3 block(kConvTile, kConvTile);
  const float inv_c = 1.f / static_cast<float>(g.C);
  const int H = static_cast<int>(g.H), W = static_cast<int>(g.W);
  if (bwd) conv_kernel<true><<<blocks_for(items, 1), block, 0, stream>>>(src, w, dst, cnt1, g.N, H, W, k, inv_c);
  else conv_kernel<false><<<blocks_for(items, 1), block, 0, stream>>>(src, w, dst, cnt1, g.N, H, W, k, inv_c);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------------
// Channel MLP (fp32): h (2N, R) = act(pooled (2N, C) @ w1^T + b1) for both branches at once (pooled rows
// 2n / 2n+1 are the avg / max of sample n); zsum (N, C) = [h_avg, h_max] (N, 2R) @ [w2, w2]^T + 2 b2 =
// mlp(pavg) + mlp(pmax); ca = gate(zsum).

struct CbamMlp {
  at::Tensor w1, b1, w2, b2, w2cat;  // fp32; w2cat = [w2, w2] (C, 2R)
  at::Tensor z1, h, zsum, ca;
};

at::Tensor f32_or_undefined(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->contiguous().to(at::kFloat) : at::Tensor();
}

const float* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr<float>() : nullptr; }

CbamMlp cbam_mlp_forward(const at::Tensor& pooled, const at::Tensor& w1, const c10::optional<at::Tensor>& b1,
                         const at::Tensor& w2, const c10::optional<at::Tensor>& b2, Act act, Act gate, bool keep_pre,
                         cudaStream_t stream) {
  CbamMlp m;
  m.w1 = w1.contiguous().to(at::kFloat);
  m.w2 = w2.contiguous().to(at::kFloat);
  m.b1 = f32_or_undefined(b1);
  m.b2 = f32_or_undefined(b2);
  m.w2cat = at::cat({m.w2, m.w2}, 1).contiguous();
  const int64_t N = pooled.size(0), C = pooled.size(2), R = m.w1.size(0);
  const auto f32 = pooled.options();
  m.h = at::empty({2 * N, R}, f32);
  m.ca = at::empty({N, C}, f32);
  if (keep_pre) {
    m.z1 = at::empty({2 * N, R}, f32);
    m.zsum = at::empty({N, C}, f32);
  }
  // z1 (2N, R) = pooled (2N, C) @ w1^T: B(k=c, j=r) = w1[r*C + c].
  attn_cuda::gemm_f32(stream, 2 * N, R, C, pooled.const_data_ptr<float>(), C, 1, m.w1.const_data_ptr<float>(), 1, C,
                      ptr_or_null(m.b1), 1.f, keep_pre ? m.z1.data_ptr<float>() : nullptr, m.h.data_ptr<float>(), act);
  // zsum (N, C) = h as (N, 2R) @ w2cat^T: B(k=q, j=c) = w2cat[c*2R + q].
  attn_cuda::gemm_f32(stream, N, C, 2 * R, m.h.const_data_ptr<float>(), 2 * R, 1, m.w2cat.const_data_ptr<float>(), 1,
                      2 * R, ptr_or_null(m.b2), 2.f, keep_pre ? m.zsum.data_ptr<float>() : nullptr,
                      m.ca.data_ptr<float>(), gate);
  return m;
}

// ---------------------------------------------------------------------------------------------------
// Checks and entry points.

constexpr const char* kOp = "cbam";
constexpr const char* kOpBwd = "cbam_backward";

void check_f32(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x, at::IntArrayRef shape) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.device() == x.device() && t.sizes() == shape, "fastops.", op, ": ",
              name, " must be a float32 tensor of shape ", shape, " on x's device, got ", t.scalar_type(), " ",
              t.sizes(), " on ", t.device());
}

// Checks shared by both entry points; returns k.
int64_t check_cbam_args(const char* op, const at::Tensor& x, const at::Tensor& w1,
                        const c10::optional<at::Tensor>& b1, const at::Tensor& w2,
                        const c10::optional<at::Tensor>& b2, const at::Tensor& conv_w, const at::Tensor& bn_w,
                        const at::Tensor& bn_b) {
  check_mlp_args(op, x, w1, b1, w2, b2);
  TORCH_CHECK(x.size(2) < (int64_t(1) << 30) && x.size(3) < (int64_t(1) << 30), "fastops.", op,
              ": H and W must be below 2^30, got ", x.sizes());
  TORCH_CHECK(conv_w.dim() == 4 && conv_w.size(0) == 1 && conv_w.size(1) == 2 && conv_w.size(2) == conv_w.size(3) &&
                  conv_w.size(2) % 2 == 1 && conv_w.size(2) <= kMaxK,
              "fastops.", op, ": conv_weight must have shape (1, 2, k, k) with odd k <= ", kMaxK, ", got ",
              conv_w.sizes());
  check_same(op, "conv_weight", conv_w, x);
  TORCH_CHECK(bn_w.numel() == 1, "fastops.", op, ": bn_weight must have one element, got ", bn_w.sizes());
  TORCH_CHECK(bn_b.numel() == 1, "fastops.", op, ": bn_bias must have one element, got ", bn_b.sizes());
  // The BN scalars are converted to fp32 on the host side: x's dtype or fp32 (fp32 BN next to a half x).
  const auto check_bn = [&](const char* name, const at::Tensor& t) {
    TORCH_CHECK(t.scalar_type() == x.scalar_type() || t.scalar_type() == at::kFloat, "fastops.", op, ": ", name,
                " must be of x's dtype or float32, got ", t.scalar_type());
    TORCH_CHECK(t.device() == x.device(), "fastops.", op, ": ", name, " is on ", t.device(), " but x is on ",
                x.device());
  };
  check_bn("bn_weight", bn_w);
  check_bn("bn_bias", bn_b);
  return conv_w.size(2);
}

Geom geom_of(const at::Tensor& x) {
  Geom g;
  g.N = x.size(0);
  g.C = x.size(1);
  g.H = x.size(2);
  g.W = x.size(3);
  g.HW = g.H * g.W;
  g.cl = is_channels_last(x);
  return g;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cbam_cuda(
    const at::Tensor& x_in, const at::Tensor& w1, const c10::optional<at::Tensor>& b1, const at::Tensor& w2,
    const c10::optional<at::Tensor>& b2, const at::Tensor& conv_w, const at::Tensor& bn_w, const at::Tensor& bn_b,
    const at::Tensor& bn_mean, const at::Tensor& bn_var, double eps, bool training, c10::string_view act_name,
    c10::string_view gate_name) {
  const Act act = attn_cuda::parse_act(act_name, kOp, "act");
  const Act gate = attn_cuda::parse_act(gate_name, kOp, "gate");
  const int64_t k = check_cbam_args(kOp, x_in, w1, b1, w2, b2, conv_w, bn_w, bn_b);
  TORCH_CHECK(bn_mean.numel() == 1 && bn_mean.device() == x_in.device(), "fastops.", kOp,
              ": bn_running_mean must have one element on x's device, got ", bn_mean.sizes(), " on ", bn_mean.device());
  TORCH_CHECK(bn_var.numel() == 1 && bn_var.device() == x_in.device(), "fastops.", kOp,
              ": bn_running_var must have one element on x's device, got ", bn_var.sizes(), " on ", bn_var.device());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Geom g = geom_of(x_in);
  const auto fmt = g.cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor x = x_in.contiguous(fmt);
  const auto f32 = x.options().dtype(at::kFloat);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(fmt));
  at::Tensor pooled = at::empty({g.N, 2, g.C}, f32);
  at::Tensor spatial = at::empty({g.N, 2, g.H, g.W}, f32);
  float* pooled_p = pooled.data_ptr<float>();
  float* spatial_p = spatial.data_ptr<float>();

  // P1: pooled = [mean_hw x, max_hw x].
  ATTN_DISPATCH(x.scalar_type(), "cbam_cuda", [&] {
    CbamArgs<scalar_t> a{};
    a.x = x.const_data_ptr<scalar_t>();
    hw_reduce<scalar_t, false>(a, RedOut{pooled_p, pooled_p + g.C, 2 * g.C, 1.f / static_cast<float>(g.HW), nullptr},
                               g, f32, stream);
  });
  const CbamMlp m = cbam_mlp_forward(pooled, w1, b1, w2, b2, act, gate, /*keep_pre=*/false, stream);
  // P2: spatial = [mean_c x1, max_c x1].
  ATTN_DISPATCH(x.scalar_type(), "cbam_cuda", [&] {
    CbamArgs<scalar_t> a{};
    a.x = x.const_data_ptr<scalar_t>();
    a.ca = m.ca.const_data_ptr<float>();
    chan_reduce<scalar_t, false>(
        a, RedOut{spatial_p, spatial_p + g.HW, 2 * g.HW, 1.f / static_cast<float>(g.C), nullptr}, g, f32, stream);
  });
  // u = conv(spatial); stats; sa = gate(BN(u)).
  const at::Tensor cw = conv_w.contiguous().to(at::kFloat);
  at::Tensor u = at::empty({g.N, g.H, g.W}, f32);
  launch_conv(false, spatial_p, cw.const_data_ptr<float>(), u.data_ptr<float>(), nullptr, g, static_cast<int>(k),
              stream);
  at::Tensor stats;
  if (training) {
    // Mean and biased variance of the (N, H, W) fp32 map: an ATen reduction (Welford, fp32) on a map C
    // times smaller than x.
    const auto [var, mean] = at::var_mean(u, at::IntArrayRef({0, 1, 2}), at::Scalar(0), /*keepdim=*/false);
    stats = at::stack({mean, var});
  } else {
    stats = at::cat({bn_mean.reshape({1}).to(at::kFloat), bn_var.reshape({1}).to(at::kFloat)});
  }
  const at::Tensor bnw = bn_w.reshape({1}).to(at::kFloat), bnb = bn_b.reshape({1}).to(at::kFloat);
  at::Tensor sa = at::empty({g.N, g.HW}, f32);
  bn_gate_kernel<<<blocks_for(g.N * g.HW, kThreads, sm_count() * 8), kThreads, 0, stream>>>(
      u.const_data_ptr<float>(), stats.const_data_ptr<float>(), bnw.const_data_ptr<float>(),
      bnb.const_data_ptr<float>(), static_cast<float>(eps), gate, sa.data_ptr<float>(), g.N * g.HW);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // P3: out = x1 * sa.
  ATTN_DISPATCH(x.scalar_type(), "cbam_cuda", [&] {
    CbamArgs<scalar_t> a{};
    a.x = x.const_data_ptr<scalar_t>();
    a.ca = m.ca.const_data_ptr<float>();
    a.sa = sa.const_data_ptr<float>();
    a.out = out.data_ptr<scalar_t>();
    apply_pass<scalar_t, false>(a, g, stream);
  });
  return {out, pooled, spatial, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
cbam_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x_in, const at::Tensor& pooled_in,
                   const at::Tensor& spatial_in, const at::Tensor& stats_in, const at::Tensor& w1,
                   const c10::optional<at::Tensor>& b1, const at::Tensor& w2, const c10::optional<at::Tensor>& b2,
                   const at::Tensor& conv_w, const at::Tensor& bn_w, const at::Tensor& bn_b, double eps,
                   bool training, c10::string_view act_name, c10::string_view gate_name) {
  const Act act = attn_cuda::parse_act(act_name, kOpBwd, "act");
  const Act gate = attn_cuda::parse_act(gate_name, kOpBwd, "gate");
  const int64_t k = check_cbam_args(kOpBwd, x_in, w1, b1, w2, b2, conv_w, bn_w, bn_b);
  TORCH_CHECK(grad_out.sizes() == x_in.sizes(), "fastops.", kOpBwd, ": grad_out must have x's shape ", x_in.sizes(),
              ", got ", grad_out.sizes());
  check_same(kOpBwd, "grad_out", grad_out, x_in);
  const Geom g = geom_of(x_in);
  check_f32(kOpBwd, "pooled", pooled_in, x_in, {g.N, 2, g.C});
  check_f32(kOpBwd, "spatial", spatial_in, x_in, {g.N, 2, g.H, g.W});
  check_f32(kOpBwd, "stats", stats_in, x_in, {2});
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto fmt = g.cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor go = grad_out.contiguous(fmt);
  const at::Tensor pooled = pooled_in.contiguous(), spatial = spatial_in.contiguous(), stats = stats_in.contiguous();
  const auto f32 = x.options().dtype(at::kFloat);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t M = g.N * g.HW;
  const unsigned int map_blocks = blocks_for(M, kThreads, sm_count() * 8);

  // Recompute ca (bit-identical to the forward's) and u.
  const CbamMlp m = cbam_mlp_forward(pooled, w1, b1, w2, b2, act, gate, /*keep_pre=*/true, stream);
  const int64_t R = m.w1.size(0);
  const at::Tensor cw = conv_w.contiguous().to(at::kFloat);
  at::Tensor u = at::empty({g.N, g.H, g.W}, f32);
  launch_conv(false, spatial.const_data_ptr<float>(), cw.const_data_ptr<float>(), u.data_ptr<float>(), nullptr, g,
              static_cast<int>(k), stream);

  // B1: dsa = sum_c go * x1, cnt1 = |T1|.
  at::Tensor dsa = at::empty({g.N, g.HW}, f32), cnt1 = at::empty({g.N, g.HW}, f32);
  ATTN_DISPATCH(x.scalar_type(), "cbam_backward_cuda", [&] {
    CbamArgs<scalar_t> a{};
    a.x = x.const_data_ptr<scalar_t>();
    a.go = go.const_data_ptr<scalar_t>();
    a.ca = m.ca.const_data_ptr<float>();
    a.spatial = spatial.const_data_ptr<float>();
    chan_reduce<scalar_t, true>(a, RedOut{dsa.data_ptr<float>(), cnt1.data_ptr<float>(), g.HW, 1.f, nullptr}, g, f32,
                                stream);
  });

  // BN + gate backward on the (N, H, W) map.
  const at::Tensor bnw = bn_w.reshape({1}).to(at::kFloat), bnb = bn_b.reshape({1}).to(at::kFloat);
  at::Tensor sa = at::empty({g.N, g.HW}, f32), dv = at::empty({g.N, g.HW}, f32), dvh = at::empty({g.N, g.HW}, f32);
  bn_gate_backward_kernel<<<map_blocks, kThreads, 0, stream>>>(
      u.const_data_ptr<float>(), stats.const_data_ptr<float>(), bnw.const_data_ptr<float>(),
      bnb.const_data_ptr<float>(), static_cast<float>(eps), gate, dsa.const_data_ptr<float>(), sa.data_ptr<float>(),
      dv.data_ptr<float>(), dvh.data_ptr<float>(), M);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // gbn_b = sum dv, gbn_w = sum dv * vhat: ATen sums over the small fp32 map.
  const at::Tensor sum_dv = dv.sum(), sum_dvh = dvh.sum();
  at::Tensor du = at::empty({g.N, g.H, g.W}, f32);
  bn_du_kernel<<<map_blocks, kThreads, 0, stream>>>(u.const_data_ptr<float>(), stats.const_data_ptr<float>(),
                                                    bnw.const_data_ptr<float>(), static_cast<float>(eps),
                                                    dv.const_data_ptr<float>(), sum_dv.const_data_ptr<float>(),
                                                    sum_dvh.const_data_ptr<float>(), training, du.data_ptr<float>(), M);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // dS = conv_transpose(du) stored as [ds0 / C, ds1 / |T1|]; gconv_w.
  at::Tensor dsw = at::empty({g.N, 2, g.HW}, f32);
  launch_conv(true, du.const_data_ptr<float>(), cw.const_data_ptr<float>(), dsw.data_ptr<float>(),
              cnt1.const_data_ptr<float>(), g, static_cast<int>(k), stream);
  at::Tensor gcw = at::empty({1, 2, k, k}, f32);
  {
    const int taps = static_cast<int>(2 * k * k);
    const int parts = taps >= kThreads ? 1 : kThreads / taps;
    const int64_t items = g.N * ceil_div(g.H, kConvTile) * ceil_div(g.W, kConvTile);
    const int64_t blocks = std::min<int64_t>(items, sm_count() * 4);
    at::Tensor partial = at::empty({blocks * taps * parts}, f32);
    conv_wgrad_kernel<<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
        du.const_data_ptr<float>(), spatial.const_data_ptr<float>(), partial.data_ptr<float>(), g.N,
        static_cast<int>(g.H), static_cast<int>(g.W), static_cast<int>(k));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    conv_wgrad_finish_kernel<<<blocks_for(taps, kThreads), kThreads, 0, stream>>>(
        partial.const_data_ptr<float>(), gcw.data_ptr<float>(), blocks, taps, parts);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // B2: dca = sum_p dx1 * x, cnt2 = |T2|.
  at::Tensor dca = at::empty({g.N, g.C}, f32), cnt2 = at::empty({g.N, g.C}, f32);
  ATTN_DISPATCH(x.scalar_type(), "cbam_backward_cuda", [&] {
    CbamArgs<scalar_t> a{};
    a.x = x.const_data_ptr<scalar_t>();
    a.go = go.const_data_ptr<scalar_t>();
    a.ca = m.ca.const_data_ptr<float>();
    a.pooled = pooled.const_data_ptr<float>();
    a.spatial = spatial.const_data_ptr<float>();
    a.sa = sa.const_data_ptr<float>();
    a.dsw = dsw.const_data_ptr<float>();
    hw_reduce<scalar_t, true>(a, RedOut{dca.data_ptr<float>(), cnt2.data_ptr<float>(), g.C, 1.f, nullptr}, g, f32,
                              stream);
  });

  // MLP backward (fp32). zsum = w2 (h_avg + h_max) + 2 b2, so both branches share dz and dh.
  const int64_t N = g.N, C = g.C;
  at::Tensor dz = at::empty({N, C}, f32);
  attn_cuda::act_backward_f32(stream, dca.const_data_ptr<float>(), 1, m.zsum.const_data_ptr<float>(),
                              dz.data_ptr<float>(), N, C, gate);
  at::Tensor gw2cat = at::empty({C, 2 * R}, f32);  // dz^T (C, N) @ [h_avg, h_max] (N, 2R)
  attn_cuda::gemm_f32(stream, C, 2 * R, N, dz.const_data_ptr<float>(), 1, C, m.h.const_data_ptr<float>(), 2 * R, 1,
                      nullptr, 0.f, gw2cat.data_ptr<float>(), nullptr, Act::kNone);
  at::Tensor dh = at::empty({N, R}, f32);  // dz (N, C) @ w2 (C, R)
  attn_cuda::gemm_f32(stream, N, R, C, dz.const_data_ptr<float>(), C, 1, m.w2.const_data_ptr<float>(), R, 1, nullptr,
                      0.f, dh.data_ptr<float>(), nullptr, Act::kNone);
  at::Tensor dz1 = at::empty({2 * N, R}, f32);  // row 2n + b: dh[n] * act'(z1[2n + b])
  attn_cuda::act_backward_f32(stream, dh.const_data_ptr<float>(), 2, m.z1.const_data_ptr<float>(),
                              dz1.data_ptr<float>(), 2 * N, R, act);
  at::Tensor gw1 = at::empty({R, C}, f32);  // dz1^T (R, 2N) @ pooled (2N, C)
  attn_cuda::gemm_f32(stream, R, C, 2 * N, dz1.const_data_ptr<float>(), 1, R, pooled.const_data_ptr<float>(), C, 1,
                      nullptr, 0.f, gw1.data_ptr<float>(), nullptr, Act::kNone);
  at::Tensor dp = at::empty({2 * N, C}, f32);  // dz1 (2N, R) @ w1 (R, C): rows 2n = dpavg, 2n + 1 = dpmax
  attn_cuda::gemm_f32(stream, 2 * N, C, R, dz1.const_data_ptr<float>(), R, 1, m.w1.const_data_ptr<float>(), C, 1,
                      nullptr, 0.f, dp.data_ptr<float>(), nullptr, Act::kNone);
  // Small fp32 reductions / adds in ATen: bias grads (b2 enters both branches) and the two halves of gw2.
  const at::Tensor gb1 = dz1.sum(0);
  const at::Tensor gb2 = dz.sum(0).mul_(2.f);
  const at::Tensor gw2 = gw2cat.narrow(1, 0, R) + gw2cat.narrow(1, R, R);

  // B3: gx = dx1 * ca + dpavg / HW + [x == pmax] dpmax / |T2|.
  at::Tensor coef = at::empty({N, 2, C}, f32);
  coef_kernel<<<blocks_for(N * C, kThreads, sm_count() * 8), kThreads, 0, stream>>>(
      dp.const_data_ptr<float>(), cnt2.const_data_ptr<float>(), coef.data_ptr<float>(), N, C,
      1.f / static_cast<float>(g.HW));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor gx = at::empty(x.sizes(), x.options().memory_format(fmt));
  ATTN_DISPATCH(x.scalar_type(), "cbam_backward_cuda", [&] {
    CbamArgs<scalar_t> a{};
    a.x = x.const_data_ptr<scalar_t>();
    a.go = go.const_data_ptr<scalar_t>();
    a.ca = m.ca.const_data_ptr<float>();
    a.pooled = pooled.const_data_ptr<float>();
    a.spatial = spatial.const_data_ptr<float>();
    a.sa = sa.const_data_ptr<float>();
    a.dsw = dsw.const_data_ptr<float>();
    a.coef = coef.const_data_ptr<float>();
    a.out = gx.data_ptr<scalar_t>();
    apply_pass<scalar_t, true>(a, g, stream);
  });

  const auto wt = w1.scalar_type();
  const auto bt = bn_w.scalar_type();
  return {gx,
          gw1.to(wt),
          gb1.to(wt),
          gw2.to(wt),
          gb2.to(wt),
          gcw.to(conv_w.scalar_type()),
          sum_dvh.reshape(bn_w.sizes()).to(bt, /*non_blocking=*/false, /*copy=*/true),
          sum_dv.reshape(bn_b.sizes()).to(bt, /*non_blocking=*/false, /*copy=*/true)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastops, CUDA, m) {
  m.impl("cbam", &cbam_cuda);
  m.impl("cbam_backward", &cbam_backward_cuda);
}

}  // namespace fastops
