// Depthwise conv2d CUDA kernels with a pluggable epilogue, shared by depthwise_conv2d.cu (plain conv + bias)
// and conv_bias_act.cu (conv + fp32 bias + residual + activation fused into the same kernels, and the
// backward's dz = grad_out * act'(z) computed by re-running the forward with a different epilogue).
//
// Forward, NCHW: a block owns a tile of outputs of one (n, c) plane. It copies the input rectangle that
// tile reads (halo included, padding as zeros, already converted to the accumulation type) and the
// channel's weights into shared memory once, so each input element leaves global memory about once
// instead of kh*kw times. Where that rectangle does not fit (large dilation) or the plane is too small to
// keep a block busy, a direct kernel with one thread per output reads global memory instead.
// Forward, channels_last: channels are contiguous, so a thread computes V adjacent channels of one output
// pixel with V-wide loads (16 bytes when C and the pointers allow, narrower or scalar otherwise) and a
// warp reads one contiguous run of channels per tap. Weights are pre-transposed to (kh*kw, C).
// Backward, grad_input: a gather (each input element sums the taps whose output lands on it), so every
// element has exactly one writer and no atomics are needed; same layouts and vector widths as forward.
// Backward, grad_weight / grad_bias: two stages, deterministic (no atomics, fixed summation order).
// Stage 1: a block per (channel or chunk of 32 channels, split of the N*OH*OW output positions, tap) sums
// grad_out * input over its split into a partial buffer; tap == kh*kw stands for the bias (a plain sum of
// grad_out). Stage 2: one thread per (channel, tap) adds that tap's partials over the splits in order.
//
// Epilogue: the forward kernels start each output's accumulator at epi.init(c) and, once the taps are
// summed, call epi.finish<V>(acc, offset, c) on V adjacent outputs (offset is the element offset of the
// first one in the output, c its channel) before storing. BiasEpilogue (below) is the plain conv's.
//
// Accumulation is in at::opmath_type<T> (fp32 for half / bf16 / float). Element offsets are int64, and
// every kernel loops grid-stride over its work, so a grid stays within CUDA's limits for any shape.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <algorithm>
#include <cstdint>
#include <tuple>
#include "common.h"
#include "cuda/launch_common.cuh"

namespace fastops {
namespace dw_cuda {

using namespace launch;  // kThreads, kMaxBlocks, kMaxSplits, ceil_div, next_pow2, Vec / load_vec / store_vec

constexpr int64_t kSmemBudget = 48 * 1024;          // the default dynamic shared-memory limit (no opt-in)
constexpr int kWgChannels = 32;                     // channels_last weight grad: channels per block (a warp)
constexpr int kWgRows = kThreads / kWgChannels;     // ... and output positions summed side by side

inline unsigned int grid_for(int64_t work_items, int64_t per_block) {
  return static_cast<unsigned int>(std::min(ceil_div(work_items, per_block), kMaxBlocks));
}

// acc[0:V] += w * x, with x converted to the accumulation type.
template <int V, typename acc_t, typename scalar_t>
__device__ __forceinline__ void fma_vec(acc_t* acc, const Vec<acc_t, V>& w, const Vec<scalar_t, V>& x) {
#pragma unroll
  for (int j = 0; j < V; ++j) acc[j] += w.v[j] * static_cast<acc_t>(x.v[j]);
}

// Stores acc[0:V] converted to scalar_t as one V-wide store.
template <int V, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_acc(scalar_t* p, const acc_t* acc) {
  Vec<scalar_t, V> out;
#pragma unroll
  for (int j = 0; j < V; ++j) out.v[j] = static_cast<scalar_t>(acc[j]);
  store_vec<V>(p, out);
}

// The plain conv's epilogue: the bias (in the tensor's dtype, or none) starts the accumulator.
template <typename scalar_t, typename acc_t>
struct BiasEpilogue {
  const scalar_t* bias;
  __device__ __forceinline__ acc_t init(int64_t c) const {
    return bias != nullptr ? static_cast<acc_t>(bias[c]) : acc_t(0);
  }
  template <int V>
  __device__ __forceinline__ void finish(acc_t*, int64_t, int64_t) const {}
};

template <typename scalar_t>
constexpr int kMaxVec = 16 / static_cast<int>(sizeof(scalar_t));

// Taps k in [k0, k1) are those with 0 <= o*S - P + k*D < L (the CPU kernel's tap_range).
__device__ __forceinline__ void tap_range(int64_t o, int64_t S, int64_t P, int64_t D, int64_t K, int64_t L,
                                          int64_t& k0, int64_t& k1) {
  const int64_t base = o * S - P;
  k0 = base >= 0 ? 0 : (-base + D - 1) / D;
  k1 = base + (K - 1) * D < L ? K : (L - base > 0 ? (L - base + D - 1) / D : 0);
  k1 = k1 < K ? k1 : K;
}

// Sum of v over a 1-D block whose size is a multiple of 32; the result is valid in thread 0. `shared`
// holds one value per warp. The fixed shuffle tree keeps the summation order, hence the result, stable.
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t v, acc_t* shared) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // a previous call may still be reading `shared`
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = acc_t(0);
  if (warp == 0) {
    const int nwarps = static_cast<int>(blockDim.x) >> 5;
    v = lane < nwarps ? shared[lane] : acc_t(0);
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  }
  return v;
}

// ---------------------------------------------------------------------------------------------------
// Forward, NCHW.

// Tile plan of the shared-memory kernel. The block is bx x by threads; a thread owns one output column
// of the tile and every by-th row of it.
struct TileCfg {
  int bx, by;                 // threads; bx == tile_ow
  int tile_oh, tile_ow;       // outputs per tile
  int tin_h, tin_w;           // input rectangle they read, halo included
  int row_step, col_step;     // shared-memory distance between vertically / horizontally adjacent outputs
  int kh_step, kw_step;       // ... and between adjacent kernel rows / columns
  int64_t tiles_h, tiles_w;   // tiles per plane
  size_t smem;                // bytes: weights, then the input rectangle
};

// Picks a tile whose weights + input rectangle fit the shared-memory budget; false when none is worth
// it (tiny planes leave most of a block idle; huge dilations make even one output row overflow).
template <typename acc_t>
bool plan_tiles(const Conv2dGeom& g, TileCfg& t) {
  constexpr int64_t kBig = int64_t(1) << 20;  // keeps every product below in range
  if (g.SH >= kBig || g.SW >= kBig || g.DH >= kBig || g.DW >= kBig) return false;
  t.bx = static_cast<int>(std::min<int64_t>(32, next_pow2(g.OW)));
  t.by = static_cast<int>(std::min<int64_t>(kThreads / t.bx, next_pow2(g.OH)));
  if (t.bx * t.by < 64) return false;
  const int64_t KK = g.KH * g.KW;
  // Several rows per thread amortise the halo rows; fall back to fewer when they do not fit.
  for (int64_t rpt = std::min<int64_t>(4, ceil_div(g.OH, t.by)); rpt >= 1; rpt /= 2) {
    const int64_t toh = t.by * rpt, tow = t.bx;
    const int64_t tin_h = (toh - 1) * g.SH + (g.KH - 1) * g.DH + 1;
    const int64_t tin_w = (tow - 1) * g.SW + (g.KW - 1) * g.DW + 1;
    const int64_t bytes = (KK + tin_h * tin_w) * static_cast<int64_t>(sizeof(acc_t));
    if (bytes > kSmemBudget) continue;
    t.tile_oh = static_cast<int>(toh);
    t.tile_ow = static_cast<int>(tow);
    t.tin_h = static_cast<int>(tin_h);
    t.tin_w = static_cast<int>(tin_w);
    // A step that is never taken (a single output or tap along that axis) is 0, so no pointer is ever
    // formed past the rectangle; every other step is below tin_h * tin_w.
    t.row_step = toh > 1 ? static_cast<int>(g.SH * tin_w) : 0;
    t.col_step = tow > 1 ? static_cast<int>(g.SW) : 0;
    t.kh_step = g.KH > 1 ? static_cast<int>(g.DH * tin_w) : 0;
    t.kw_step = g.KW > 1 ? static_cast<int>(g.DW) : 0;
    t.tiles_h = ceil_div(g.OH, toh);
    t.tiles_w = ceil_div(g.OW, tow);
    t.smem = static_cast<size_t>(bytes);
    return true;
  }
  return false;
}

template <typename scalar_t, typename acc_t, typename Epi>
__global__ void __launch_bounds__(kThreads)
fwd_nchw_tiled_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w, const Epi epi,
                      scalar_t* __restrict__ y, const Conv2dGeom g, const TileCfg t) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int KK = static_cast<int>(g.KH * g.KW);
  acc_t* ws = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* tile = ws + KK;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int tid = ty * blockDim.x + tx, nthreads = blockDim.x * blockDim.y;
  const int64_t tiles_per_plane = t.tiles_h * t.tiles_w;
  const int64_t total = g.N * g.C * tiles_per_plane;

  for (int64_t blk = blockIdx.x; blk < total; blk += gridDim.x) {
    const int64_t plane = blk / tiles_per_plane;  // n * C + c
    const int64_t r = blk % tiles_per_plane;
    const int64_t c = plane % g.C;
    const int64_t oh0 = (r / t.tiles_w) * t.tile_oh, ow0 = (r % t.tiles_w) * t.tile_ow;
    const int64_t ih0 = oh0 * g.SH - g.PT, iw0 = ow0 * g.SW - g.PL;
    const scalar_t* xp = x + plane * g.H * g.W;

    __syncthreads();  // every thread is done reading the previous tile
    for (int i = tid; i < KK; i += nthreads) ws[i] = static_cast<acc_t>(w[c * KK + i]);
    for (int rr = ty; rr < t.tin_h; rr += blockDim.y) {
      const int64_t ih = ih0 + rr;
      const bool row_ok = ih >= 0 && ih < g.H;
      for (int cc = tx; cc < t.tin_w; cc += blockDim.x) {
        const int64_t iw = iw0 + cc;
        tile[rr * t.tin_w + cc] =
            (row_ok && iw >= 0 && iw < g.W) ? static_cast<acc_t>(xp[ih * g.W + iw]) : acc_t(0);
      }
    }
    __syncthreads();

    const int64_t ow = ow0 + tx;
    if (ow >= g.OW) continue;  // no barrier below, so leaving early is safe
    const acc_t bias = epi.init(c);
    const int64_t yoff = plane * g.OH * g.OW + ow;
    scalar_t* yp = y + yoff;
    for (int oy = ty; oy < t.tile_oh; oy += blockDim.y) {
      const int64_t oh = oh0 + oy;
      if (oh >= g.OH) break;
      const acc_t* src = tile + oy * t.row_step + tx * t.col_step;
      const acc_t* wk = ws;
      acc_t acc = bias;
      for (int64_t kh = 0; kh < g.KH; ++kh) {
        const acc_t* s = src;
        for (int64_t kw = 0; kw < g.KW; ++kw) {
          acc += *wk++ * *s;
          s += t.kw_step;
        }
        src += t.kh_step;
      }
      epi.template finish<1>(&acc, yoff + oh * g.OW, c);
      yp[oh * g.OW] = static_cast<scalar_t>(acc);
    }
  }
}

// One thread per output, straight from global memory (the fallback of the tiled kernel).
template <typename scalar_t, typename acc_t, typename Epi>
__global__ void __launch_bounds__(kThreads)
fwd_nchw_direct_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w, const Epi epi,
                       scalar_t* __restrict__ y, const Conv2dGeom g) {
  const int64_t total = g.N * g.C * g.OH * g.OW;
  const int64_t KK = g.KH * g.KW;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t ow = i % g.OW;
    const int64_t r = i / g.OW;
    const int64_t oh = r % g.OH;
    const int64_t plane = r / g.OH;
    const int64_t c = plane % g.C;
    int64_t kh0, kh1, kw0, kw1;
    tap_range(oh, g.SH, g.PT, g.DH, g.KH, g.H, kh0, kh1);
    tap_range(ow, g.SW, g.PL, g.DW, g.KW, g.W, kw0, kw1);
    const scalar_t* xp = x + plane * g.H * g.W;
    const scalar_t* wc = w + c * KK;
    acc_t acc = epi.init(c);
    for (int64_t kh = kh0; kh < kh1; ++kh) {
      const int64_t ih = oh * g.SH - g.PT + kh * g.DH;
      for (int64_t kw = kw0; kw < kw1; ++kw) {
        const int64_t iw = ow * g.SW - g.PL + kw * g.DW;
        acc += static_cast<acc_t>(wc[kh * g.KW + kw]) * static_cast<acc_t>(xp[ih * g.W + iw]);
      }
    }
    epi.template finish<1>(&acc, i, c);
    y[i] = static_cast<scalar_t>(acc);
  }
}

// ---------------------------------------------------------------------------------------------------
// Forward, channels_last. wt is the weight as (kh*kw, C) in acc_t.

template <typename scalar_t, typename acc_t, int V, typename Epi>
__global__ void __launch_bounds__(kThreads)
fwd_nhwc_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ wt, const Epi epi,
                scalar_t* __restrict__ y, const Conv2dGeom g) {
  const int64_t CV = g.C / V;
  const int64_t total = g.N * g.OH * g.OW * CV;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = (i % CV) * V;
    const int64_t pix = i / CV;  // (n * OH + oh) * OW + ow
    const int64_t ow = pix % g.OW;
    const int64_t r = pix / g.OW;
    const int64_t oh = r % g.OH;
    const int64_t n = r / g.OH;
    acc_t acc[V];
#pragma unroll
    for (int j = 0; j < V; ++j) acc[j] = epi.init(c + j);
    int64_t kh0, kh1, kw0, kw1;
    tap_range(oh, g.SH, g.PT, g.DH, g.KH, g.H, kh0, kh1);
    tap_range(ow, g.SW, g.PL, g.DW, g.KW, g.W, kw0, kw1);
    for (int64_t kh = kh0; kh < kh1; ++kh) {
      const int64_t ih = oh * g.SH - g.PT + kh * g.DH;
      const scalar_t* xrow = x + (n * g.H + ih) * g.W * g.C + c;
      for (int64_t kw = kw0; kw < kw1; ++kw) {
        const int64_t iw = ow * g.SW - g.PL + kw * g.DW;
        fma_vec<V>(acc, load_vec<V>(wt + (kh * g.KW + kw) * g.C + c), load_vec<V>(xrow + iw * g.C));
      }
    }
    epi.template finish<V>(acc, pix * g.C + c, c);
    store_acc<V>(y + pix * g.C + c, acc);
  }
}

// ---------------------------------------------------------------------------------------------------
// Backward, grad_input: gi[n, c, ih, iw] = sum over (kh, kw) with ih + PT - kh*DH = oh*SH and
// iw + PL - kw*DW = ow*SW for some in-range (oh, ow) of w[c, kh, kw] * go[n, c, oh, ow].
// t = ih + PT - kh*DH only falls as kh grows, so the first negative t ends the loop.

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
bwd_input_nchw_kernel(const scalar_t* __restrict__ go, const scalar_t* __restrict__ w, scalar_t* __restrict__ gi,
                      const Conv2dGeom g) {
  const int64_t total = g.N * g.C * g.H * g.W;
  const int64_t KK = g.KH * g.KW;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t iw = i % g.W;
    const int64_t r = i / g.W;
    const int64_t ih = r % g.H;
    const int64_t plane = r / g.H;
    const int64_t c = plane % g.C;
    const scalar_t* gop = go + plane * g.OH * g.OW;
    const scalar_t* wc = w + c * KK;
    acc_t acc = acc_t(0);
    for (int64_t kh = 0; kh < g.KH; ++kh) {
      const int64_t t = ih + g.PT - kh * g.DH;
      if (t < 0) break;
      if (t % g.SH != 0) continue;
      const int64_t oh = t / g.SH;
      if (oh >= g.OH) continue;
      for (int64_t kw = 0; kw < g.KW; ++kw) {
        const int64_t u = iw + g.PL - kw * g.DW;
        if (u < 0) break;
        if (u % g.SW != 0) continue;
        const int64_t ow = u / g.SW;
        if (ow >= g.OW) continue;
        acc += static_cast<acc_t>(wc[kh * g.KW + kw]) * static_cast<acc_t>(gop[oh * g.OW + ow]);
      }
    }
    gi[i] = static_cast<scalar_t>(acc);
  }
}

template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kThreads)
bwd_input_nhwc_kernel(const scalar_t* __restrict__ go, const acc_t* __restrict__ wt, scalar_t* __restrict__ gi,
                      const Conv2dGeom g) {
  const int64_t CV = g.C / V;
  const int64_t total = g.N * g.H * g.W * CV;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = (i % CV) * V;
    const int64_t pix = i / CV;  // (n * H + ih) * W + iw
    const int64_t iw = pix % g.W;
    const int64_t r = pix / g.W;
    const int64_t ih = r % g.H;
    const int64_t n = r / g.H;
    acc_t acc[V];
#pragma unroll
    for (int j = 0; j < V; ++j) acc[j] = acc_t(0);
    for (int64_t kh = 0; kh < g.KH; ++kh) {
      const int64_t t = ih + g.PT - kh * g.DH;
      if (t < 0) break;
      if (t % g.SH != 0) continue;
      const int64_t oh = t / g.SH;
      if (oh >= g.OH) continue;
      const scalar_t* gorow = go + (n * g.OH + oh) * g.OW * g.C + c;
      for (int64_t kw = 0; kw < g.KW; ++kw) {
        const int64_t u = iw + g.PL - kw * g.DW;
        if (u < 0) break;
        if (u % g.SW != 0) continue;
        const int64_t ow = u / g.SW;
        if (ow >= g.OW) continue;
        fma_vec<V>(acc, load_vec<V>(wt + (kh * g.KW + kw) * g.C + c), load_vec<V>(gorow + ow * g.C));
      }
    }
    store_acc<V>(gi + pix * g.C + c, acc);
  }
}

// ---------------------------------------------------------------------------------------------------
// Backward, grad_weight / grad_bias. Output positions m = (n * OH + oh) * OW + ow, m in [0, N*OH*OW), are
// cut into `splits` chunks of `chunk`; partial[((c * (KK+1)) + tap) * splits + split] holds one chunk's
// sum. Work items are numbered with the tap fastest, so the blocks that re-read one chunk's grad_out and
// input for the different taps run side by side and mostly hit L2.

// NCHW: a 1-D block per (channel, split, tap), threads along m (contiguous in grad_out).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
bwd_weight_nchw_kernel(const scalar_t* __restrict__ go, const scalar_t* __restrict__ x, acc_t* __restrict__ partial,
                       const Conv2dGeom g, const int64_t splits, const int64_t chunk) {
  __shared__ acc_t red[32];
  const int64_t KK = g.KH * g.KW, KK1 = KK + 1;
  const int64_t M = g.N * g.OH * g.OW;
  const int64_t items = g.C * splits * KK1;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t tap = item % KK1;
    const int64_t rest = item / KK1;
    const int64_t split = rest % splits;
    const int64_t c = rest / splits;
    const bool is_bias = tap == KK;
    const int64_t kh = tap / g.KW, kw = tap % g.KW;  // meaningless for the bias, and unused then
    const int64_t start = split * chunk;
    const int64_t end = start + chunk < M ? start + chunk : M;
    acc_t acc = acc_t(0);
    for (int64_t m = start + threadIdx.x; m < end; m += blockDim.x) {
      const int64_t ow = m % g.OW;
      const int64_t r = m / g.OW;
      const int64_t oh = r % g.OH;
      const int64_t n = r / g.OH;
      const acc_t gv = static_cast<acc_t>(go[((n * g.C + c) * g.OH + oh) * g.OW + ow]);
      if (is_bias) {
        acc += gv;
      } else {
        const int64_t ih = oh * g.SH - g.PT + kh * g.DH;
        const int64_t iw = ow * g.SW - g.PL + kw * g.DW;
        if (ih >= 0 && ih < g.H && iw >= 0 && iw < g.W)
          acc += gv * static_cast<acc_t>(x[((n * g.C + c) * g.H + ih) * g.W + iw]);
      }
    }
    acc = block_sum(acc, red);
    if (threadIdx.x == 0) partial[(c * KK1 + tap) * splits + split] = acc;
  }
}

// channels_last: a (kWgChannels x kWgRows) block per (chunk of 32 channels, split, tap); a warp reads 32
// adjacent channels of one position, the kWgRows warps take every kWgRows-th position of the split.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
bwd_weight_nhwc_kernel(const scalar_t* __restrict__ go, const scalar_t* __restrict__ x, acc_t* __restrict__ partial,
                       const Conv2dGeom g, const int64_t splits, const int64_t chunk) {
  __shared__ acc_t red[kWgRows][kWgChannels];
  const int64_t KK = g.KH * g.KW, KK1 = KK + 1;
  const int64_t M = g.N * g.OH * g.OW;
  const int64_t cgroups = ceil_div(g.C, kWgChannels);
  const int64_t items = cgroups * splits * KK1;
  const int tx = threadIdx.x, ty = threadIdx.y;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t tap = item % KK1;
    const int64_t rest = item / KK1;
    const int64_t split = rest % splits;
    const int64_t c = (rest / splits) * kWgChannels + tx;
    const bool is_bias = tap == KK;
    const int64_t kh = tap / g.KW, kw = tap % g.KW;  // meaningless for the bias, and unused then
    const int64_t start = split * chunk;
    const int64_t end = start + chunk < M ? start + chunk : M;
    acc_t acc = acc_t(0);
    if (c < g.C) {
      for (int64_t m = start + ty; m < end; m += kWgRows) {
        const acc_t gv = static_cast<acc_t>(go[m * g.C + c]);
        if (is_bias) {
          acc += gv;
          continue;
        }
        const int64_t ow = m % g.OW;
        const int64_t r = m / g.OW;
        const int64_t oh = r % g.OH;
        const int64_t n = r / g.OH;
        const int64_t ih = oh * g.SH - g.PT + kh * g.DH;
        const int64_t iw = ow * g.SW - g.PL + kw * g.DW;
        if (ih >= 0 && ih < g.H && iw >= 0 && iw < g.W)
          acc += gv * static_cast<acc_t>(x[((n * g.H + ih) * g.W + iw) * g.C + c]);
      }
    }
    __syncthreads();  // the previous item's reads of `red` are done
    red[ty][tx] = acc;
    __syncthreads();
    if (ty == 0 && c < g.C) {
      acc_t s = acc_t(0);
#pragma unroll
      for (int k = 0; k < kWgRows; ++k) s += red[k][tx];
      partial[(c * KK1 + tap) * splits + split] = s;
    }
  }
}

template <typename scalar_t, typename acc_t, typename bias_t>
__global__ void __launch_bounds__(kThreads)
bwd_weight_finalize_kernel(const acc_t* __restrict__ partial, scalar_t* __restrict__ gw, bias_t* __restrict__ gb,
                           const int64_t C, const int64_t KK, const int64_t splits) {
  const int64_t KK1 = KK + 1;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < C * KK1; i += int64_t(gridDim.x) * blockDim.x) {
    const acc_t* p = partial + i * splits;
    acc_t s = acc_t(0);
    for (int64_t k = 0; k < splits; ++k) s += p[k];
    const int64_t c = i / KK1, tap = i % KK1;
    if (tap < KK) gw[c * KK + tap] = static_cast<scalar_t>(s);
    else gb[c] = static_cast<bias_t>(s);
  }
}

// ---------------------------------------------------------------------------------------------------
// Host side.

inline bool aligned_to(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

// Widest V (<= 16 bytes of scalar_t) with C % V == 0 and every pointer aligned for V-wide accesses (the
// offsets the kernels add are multiples of V elements once C % V == 0). wt holds acc_t; e1 / e2 are the
// epilogue's scalar_t streams (null when it has none).
template <typename scalar_t, typename acc_t>
int pick_vec(int64_t C, const void* a, const void* b, const void* wt, const void* e1 = nullptr,
             const void* e2 = nullptr) {
  for (int v = kMaxVec<scalar_t>; v > 1; v /= 2) {
    const int64_t sb = v * static_cast<int64_t>(sizeof(scalar_t)), wb = v * static_cast<int64_t>(sizeof(acc_t));
    if (C % v == 0 && aligned_to(a, sb) && aligned_to(b, sb) && aligned_to(wt, wb) && aligned_to(e1, sb) &&
        aligned_to(e2, sb))
      return v;
  }
  return 1;
}

// Weights (C, 1, kh, kw) -> (kh*kw, C) contiguous in acc_t, one copy kernel.
template <typename acc_t>
at::Tensor weights_khkw_c(const at::Tensor& w) {
  const int64_t C = w.size(0), KK = w.size(2) * w.size(3);
  at::Tensor wt = at::empty({KK, C}, w.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  wt.copy_(w.reshape({C, KK}).t());
  return wt;
}

template <typename scalar_t, typename acc_t, int V, typename Epi>
void launch_fwd_nhwc(const scalar_t* x, const acc_t* wt, const Epi& epi, scalar_t* y, const Conv2dGeom& g,
                     cudaStream_t stream) {
  const int64_t total = g.N * g.OH * g.OW * (g.C / V);
  fwd_nhwc_kernel<scalar_t, acc_t, V, Epi><<<grid_for(total, kThreads), kThreads, 0, stream>>>(x, wt, epi, y, g);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename acc_t, int V>
void launch_bwd_input_nhwc(const scalar_t* go, const acc_t* wt, scalar_t* gi, const Conv2dGeom& g,
                           cudaStream_t stream) {
  const int64_t total = g.N * g.H * g.W * (g.C / V);
  bwd_input_nhwc_kernel<scalar_t, acc_t, V><<<grid_for(total, kThreads), kThreads, 0, stream>>>(go, wt, gi, g);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Runs LAUNCH(V) for the width v that pick_vec chose; the std::min keeps widths a type never gets
// (8 floats, 4 or 8 doubles) from being instantiated at all.
#define FASTOPS_DISPATCH_VEC(scalar_t, v, LAUNCH)               \
  switch (v) {                                                  \
    case 8: LAUNCH(std::min(8, kMaxVec<scalar_t>)); break;      \
    case 4: LAUNCH(std::min(4, kMaxVec<scalar_t>)); break;      \
    case 2: LAUNCH(2); break;                                   \
    default: LAUNCH(1); break;                                  \
  }

template <typename scalar_t, typename Epi>
void forward_nchw(const at::Tensor& x, const at::Tensor& weight, const Epi& epi, at::Tensor& y,
                  const Conv2dGeom& g, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const at::Tensor w = weight.contiguous();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* wp = w.const_data_ptr<scalar_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  TileCfg t;
  if (plan_tiles<acc_t>(g, t)) {
    const int64_t total = g.N * g.C * t.tiles_h * t.tiles_w;
    const dim3 block(t.bx, t.by);
    fwd_nchw_tiled_kernel<scalar_t, acc_t, Epi><<<grid_for(total, 1), block, t.smem, stream>>>(xp, wp, epi, yp, g, t);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    const int64_t total = g.N * g.C * g.OH * g.OW;
    fwd_nchw_direct_kernel<scalar_t, acc_t, Epi><<<grid_for(total, kThreads), kThreads, 0, stream>>>(xp, wp, epi, yp,
                                                                                                     g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// e1 / e2: the epilogue's scalar_t streams, so that the vector width also suits them.
template <typename scalar_t, typename Epi>
void forward_nhwc(const at::Tensor& x, const at::Tensor& weight, const Epi& epi, at::Tensor& y,
                  const Conv2dGeom& g, cudaStream_t stream, const void* e1 = nullptr, const void* e2 = nullptr) {
  using acc_t = at::opmath_type<scalar_t>;
  const at::Tensor wt = weights_khkw_c<acc_t>(weight);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const acc_t* wtp = wt.const_data_ptr<acc_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  const int v = pick_vec<scalar_t, acc_t>(g.C, xp, yp, wtp, e1, e2);
#define FASTOPS_LAUNCH(V) launch_fwd_nhwc<scalar_t, acc_t, V, Epi>(xp, wtp, epi, yp, g, stream)
  FASTOPS_DISPATCH_VEC(scalar_t, v, FASTOPS_LAUNCH)
#undef FASTOPS_LAUNCH
}

template <typename scalar_t>
void backward_input(const at::Tensor& go, const at::Tensor& weight, at::Tensor& gi, const Conv2dGeom& g, bool cl,
                    cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* gop = go.const_data_ptr<scalar_t>();
  scalar_t* gip = gi.data_ptr<scalar_t>();
  if (!cl) {
    const at::Tensor w = weight.contiguous();
    const int64_t total = g.N * g.C * g.H * g.W;
    bwd_input_nchw_kernel<scalar_t, acc_t><<<grid_for(total, kThreads), kThreads, 0, stream>>>(
        gop, w.const_data_ptr<scalar_t>(), gip, g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const at::Tensor wt = weights_khkw_c<acc_t>(weight);
  const acc_t* wtp = wt.const_data_ptr<acc_t>();
  const int v = pick_vec<scalar_t, acc_t>(g.C, gop, gip, wtp);
#define FASTOPS_LAUNCH(V) launch_bwd_input_nhwc<scalar_t, acc_t, V>(gop, wtp, gip, g, stream)
  FASTOPS_DISPATCH_VEC(scalar_t, v, FASTOPS_LAUNCH)
#undef FASTOPS_LAUNCH
}

// gw: (C, 1, kh, kw) in scalar_t; gb: (C,) in bias_t (scalar_t for the plain conv, fp32 for conv_bias_act).
template <typename scalar_t, typename bias_t = scalar_t>
void backward_weight(const at::Tensor& go, const at::Tensor& x, at::Tensor& gw, at::Tensor& gb, const Conv2dGeom& g,
                     bool cl, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t KK = g.KH * g.KW, KK1 = KK + 1;
  const int64_t M = g.N * g.OH * g.OW;
  const int64_t groups = cl ? ceil_div(g.C, kWgChannels) : g.C;
  // Enough blocks to fill the GPU a few times over, but each split long enough (min_chunk positions) that
  // its block does real work; the split count only changes the summation order, never the values' range.
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t min_chunk = cl ? int64_t(kWgRows) * 64 : int64_t(kThreads) * 8;
  int64_t splits = ceil_div(sms * 8, groups * KK1);
  splits = std::min({splits, ceil_div(M, min_chunk), kMaxSplits});
  splits = std::max<int64_t>(splits, 1);
  const int64_t chunk = ceil_div(M, splits);
  splits = ceil_div(M, chunk);  // drop splits that would start past M
  at::Tensor partial = at::empty({g.C * KK1 * splits}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  acc_t* pp = partial.data_ptr<acc_t>();
  const scalar_t* gop = go.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const int64_t items = groups * splits * KK1;
  if (cl) {
    const dim3 block(kWgChannels, kWgRows);
    bwd_weight_nhwc_kernel<scalar_t, acc_t><<<grid_for(items, 1), block, 0, stream>>>(gop, xp, pp, g, splits, chunk);
  } else {
    bwd_weight_nchw_kernel<scalar_t, acc_t><<<grid_for(items, 1), kThreads, 0, stream>>>(gop, xp, pp, g, splits, chunk);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  bwd_weight_finalize_kernel<scalar_t, acc_t, bias_t><<<grid_for(g.C * KK1, kThreads), kThreads, 0, stream>>>(
      pp, gw.data_ptr<scalar_t>(), gb.data_ptr<bias_t>(), g.C, KK, splits);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace dw_cuda
}  // namespace fastops
