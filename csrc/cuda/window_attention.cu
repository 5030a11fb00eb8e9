// Swin (shifted-)window attention on CUDA: forward and backward, float / half / bf16, fp32 accumulation and
// fp32 softmax (the oracle: fastops/reference/window_attention.py).
//
// Nothing is materialised: the roll, the padding to window multiples and the window partition are index
// arithmetic (token_pixel), and the shift mask is recomputed from region ids (region_of), so every kernel
// reads qkv / grad_out / out straight from the (B, H, W, *) maps and writes results at the tokens' original
// positions. Padding tokens read pad_qkv (or zeros) as their q, k, v.
//
// Layout of work: one block of kWarps warps per (batch * window, head, tile of at most kRowTile rows). Each
// warp owns kRowsPerWarp rows and keeps their running state in registers; the other side of the attention
// matrix streams through shared memory 32 tokens at a time, one token per lane, so a score is one lane's dot
// product and a warp reduction gives the row's max / sum. Head slices are converted to fp32 on their way into
// shared memory; tiles whose rows are read by every lane at once (one token per lane) get a row stride of
// hd | 1 (odd), which keeps those reads free of bank conflicts. Shared memory is dynamic and sized from hd.
//
//   forward    rows = queries, columns = keys: online softmax (running max / sum, rescaled accumulator),
//              o = P V, lse = max + log(sum). Padding queries are computed like the others but never stored
//              (their lse is written as 0).
//   backward   1. rows = queries: D_i = dO_i . O_i, P recomputed from lse, dS = P (dO V^T - D),
//                 dQ = scale dS K, dBias += dS (fp32 atomics into (heads, N, N)); D is kept for step 2.
//              2. rows = keys, columns = queries: dV = P^T dO, dK = scale dS^T Q. Padding keys add their
//                 dK / dV to grad_pad_qkv (fp32 atomics); real tokens write grad_qkv once each.
//              Padding queries have dO = 0 (their outputs are cropped), hence dS = 0: both steps skip them.
//
// Limits (checked, errors otherwise): head_dim <= 128 (the row accumulators are ceil(hd / 32) registers per
// lane), N = wh * ww <= 4096. Element offsets into the maps are int64.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "common.h"
#include "cuda/attn_common.cuh"
#include "cuda/channel_attn.cuh"

namespace fastops {

namespace {

constexpr const char* kFwdOp = "window_attention";
constexpr const char* kBwdOp = "window_attention_backward";

constexpr int kWarps = 4;
constexpr int kBlock = 32 * kWarps;
constexpr int kRowsPerWarp = 4;
constexpr int kRowTile = kWarps * kRowsPerWarp;  // rows per block at most
constexpr int kColTile = 32;                     // streamed tokens per shared tile: one per lane
constexpr int kMaxHeadDim = 128;
constexpr int kMaxTokens = 4096;
constexpr float kMaskValue = -100.f;  // timm's value for scores across shift regions

struct Geom {
  int64_t H, W;  // map
  int64_t C3;    // qkv channels
  int C, heads, hd;
  int wh, ww, sh, sw;
  int nWw, nW, Hp, Wp, N;
  int rows_per_block;
  int ld;  // row stride of the lane-indexed shared tiles (odd)
  bool shifted;
  float scale;
};

struct Window {
  int64_t b;
  int wy, wx;
};

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }

__device__ __forceinline__ Window window_of(const Geom& g, int64_t bw) {
  Window w;
  w.b = bw / g.nW;
  const int wi = static_cast<int>(bw - w.b * g.nW);
  w.wy = wi / g.nWw;
  w.wx = wi - w.wy * g.nWw;
  return w;
}

// Pixel index (b * H + y) * W + x of in-window token i, or -1 for a padding token.
__device__ __forceinline__ int64_t token_pixel(const Geom& g, const Window& w, int i) {
  const int ty = i / g.ww;
  const int py = w.wy * g.wh + ty, px = w.wx * g.ww + (i - ty * g.ww);
  if (py >= g.H || px >= g.W) return -1;
  const int64_t oy = (py + g.sh) % g.H, ox = (px + g.sw) % g.W;
  return (w.b * g.H + oy) * g.W + ox;
}

__device__ __forceinline__ int region_1d(int p, int P, int win, int s) {
  return s == 0 ? 0 : (p < P - win ? 0 : (p < P - s ? 1 : 2));
}

// Shift region of in-window token i over the padded grid; tokens of different regions are masked.
__device__ __forceinline__ int region_of(const Geom& g, const Window& w, int i) {
  const int ty = i / g.ww;
  const int py = w.wy * g.wh + ty, px = w.wx * g.ww + (i - ty * g.ww);
  return region_1d(py, g.Hp, g.wh, g.sh) * 3 + region_1d(px, g.Wp, g.ww, g.sw);
}

// dst[r * ld + d] = mul * head slice d of token first + r, for r < rows (rows >= count are zero-filled).
// The slice starts at channel col of a row of `stride` channels; padding tokens read pad[d] (zeros when
// pad is null).
template <typename T>
__device__ __forceinline__ void load_rows(float* dst, int ld, const T* __restrict__ src, int64_t stride, int64_t col,
                                          const float* __restrict__ pad, const Geom& g, const Window& w, int first,
                                          int count, int rows, float mul) {
  const int hd = g.hd;
  for (int e = threadIdx.x; e < rows * hd; e += kBlock) {
    const int r = e / hd, d = e - r * hd;
    float v = 0.f;
    if (r < count) {
      const int64_t pix = token_pixel(g, w, first + r);
      if (pix >= 0) {
        v = static_cast<float>(src[pix * stride + col + d]);
      } else if (pad != nullptr) {
        v = pad[d];
      }
    }
    dst[r * ld + d] = v * mul;
  }
}

// ---------------------------------------------------------------------------------------------------
// Forward. Shared: q rows (pre-scaled, stride hd), then the key and value tiles (stride ld).

template <typename T, int HDV>
__global__ void __launch_bounds__(kBlock)
window_attn_fwd_kernel(const T* __restrict__ qkv, const float* __restrict__ bias, const float* __restrict__ pad,
                       T* __restrict__ out, float* __restrict__ lse, const Geom g) {
  extern __shared__ float wa_smem[];
  const int hd = g.hd, ld = g.ld, N = g.N;
  float* qs = wa_smem;
  float* ks = qs + kRowTile * hd;
  float* vs = ks + kColTile * ld;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t bw = blockIdx.x;
  const Window win = window_of(g, bw);
  const int h = blockIdx.y;
  const int r0 = blockIdx.z * g.rows_per_block;
  const int nrows = imin(g.rows_per_block, N - r0);
  const int64_t qcol = int64_t(h) * hd, kcol = g.C + qcol, vcol = 2 * int64_t(g.C) + qcol;

  load_rows(qs, hd, qkv, g.C3, qcol, pad ? pad + qcol : nullptr, g, win, r0, nrows, kRowTile, g.scale);

  int reg_i[kRowsPerWarp];
  float m[kRowsPerWarp], l[kRowsPerWarp], o[kRowsPerWarp][HDV];
#pragma unroll
  for (int k = 0; k < kRowsPerWarp; ++k) {
    const int rl = warp + kWarps * k;
    reg_i[k] = rl < nrows ? region_of(g, win, r0 + rl) : 0;
    m[k] = -INFINITY;
    l[k] = 0.f;
#pragma unroll
    for (int c = 0; c < HDV; ++c) o[k][c] = 0.f;
  }

  for (int j0 = 0; j0 < N; j0 += kColTile) {
    const int nk = imin(kColTile, N - j0);
    __syncthreads();  // the previous tile is consumed
    load_rows(ks, ld, qkv, g.C3, kcol, pad ? pad + kcol : nullptr, g, win, j0, nk, kColTile, 1.f);
    load_rows(vs, ld, qkv, g.C3, vcol, pad ? pad + vcol : nullptr, g, win, j0, nk, kColTile, 1.f);
    __syncthreads();

    const int j = j0 + lane;
    const bool jv = lane < nk;
    const int reg_j = jv ? region_of(g, win, j) : -1;
    float s[kRowsPerWarp];
    attn_cuda::row_dots(s, qs + warp * hd, kWarps * hd, ks + lane * ld, hd);
#pragma unroll
    for (int k = 0; k < kRowsPerWarp; ++k) {
      const int i = r0 + warp + kWarps * k;
      float sk = s[k];
      if (bias != nullptr && jv && i < N) sk += bias[(int64_t(h) * N + i) * N + j];
      if (g.shifted && reg_i[k] != reg_j) sk += kMaskValue;
      // the running max is finite: key 0 of the first tile is always valid
      s[k] = attn_cuda::online_softmax_step(sk, jv, m[k], l[k], o[k]);
    }
    attn_cuda::accum_rows(o, s, vs, ld, nk, hd);
  }

#pragma unroll
  for (int k = 0; k < kRowsPerWarp; ++k) {
    const int rl = warp + kWarps * k;
    if (rl >= nrows) continue;
    const int i = r0 + rl;
    const int64_t pix = token_pixel(g, win, i);
    if (lane == 0) lse[(bw * g.heads + h) * N + i] = pix >= 0 ? m[k] + logf(l[k]) : 0.f;
    if (pix >= 0) attn_cuda::store_row(out + pix * g.C + qcol, o[k], 1.f / l[k], hd);
  }
}

// ---------------------------------------------------------------------------------------------------
// Backward step 1: rows = queries. Shared: pre-scaled q rows and dO rows (stride hd), key and value tiles
// (stride ld). Writes grad_qkv's q part, D (for step 2) and adds dS into grad_bias.

template <typename T, int HDV>
__global__ void __launch_bounds__(kBlock)
window_attn_bwd_dq_kernel(const T* __restrict__ grad_out, const T* __restrict__ qkv, const T* __restrict__ out,
                          const float* __restrict__ lse, const float* __restrict__ bias,
                          const float* __restrict__ pad, T* __restrict__ grad_qkv, float* __restrict__ dvec,
                          float* __restrict__ grad_bias, const Geom g) {
  extern __shared__ float wa_smem[];
  const int hd = g.hd, ld = g.ld, N = g.N;
  float* qs = wa_smem;
  float* dos = qs + kRowTile * hd;
  float* ks = dos + kRowTile * hd;
  float* vs = ks + kColTile * ld;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t bw = blockIdx.x;
  const Window win = window_of(g, bw);
  const int h = blockIdx.y;
  const int r0 = blockIdx.z * g.rows_per_block;
  const int nrows = imin(g.rows_per_block, N - r0);
  const int64_t qcol = int64_t(h) * hd, kcol = g.C + qcol, vcol = 2 * int64_t(g.C) + qcol;

  load_rows(qs, hd, qkv, g.C3, qcol, pad ? pad + qcol : nullptr, g, win, r0, nrows, kRowTile, g.scale);
  load_rows(dos, hd, grad_out, g.C, qcol, static_cast<const float*>(nullptr), g, win, r0, nrows, kRowTile, 1.f);
  __syncthreads();

  // Padding queries (and rows past the tile) are inactive: their dS is 0.
  int reg_i[kRowsPerWarp];
  bool act[kRowsPerWarp];
  int64_t pix_i[kRowsPerWarp];
  float lse_i[kRowsPerWarp], D[kRowsPerWarp], dq[kRowsPerWarp][HDV];
#pragma unroll
  for (int k = 0; k < kRowsPerWarp; ++k) {
    const int rl = warp + kWarps * k;
    const int i = r0 + rl;
    pix_i[k] = rl < nrows ? token_pixel(g, win, i) : -1;
    act[k] = pix_i[k] >= 0;
    reg_i[k] = act[k] ? region_of(g, win, i) : 0;
    lse_i[k] = act[k] ? lse[(bw * g.heads + h) * N + i] : 0.f;
    float part = 0.f;
    if (act[k]) {
      const T* orow = out + pix_i[k] * g.C + qcol;
      for (int d = lane; d < hd; d += 32) part = fmaf(dos[rl * hd + d], static_cast<float>(orow[d]), part);
    }
    D[k] = attn_cuda::warp_sum(part);
    if (lane == 0 && rl < nrows) dvec[(bw * g.heads + h) * N + i] = D[k];
#pragma unroll
    for (int c = 0; c < HDV; ++c) dq[k][c] = 0.f;
  }

  for (int j0 = 0; j0 < N; j0 += kColTile) {
    const int nk = imin(kColTile, N - j0);
    __syncthreads();  // the previous tile is consumed
    load_rows(ks, ld, qkv, g.C3, kcol, pad ? pad + kcol : nullptr, g, win, j0, nk, kColTile, 1.f);
    load_rows(vs, ld, qkv, g.C3, vcol, pad ? pad + vcol : nullptr, g, win, j0, nk, kColTile, 1.f);
    __syncthreads();

    const int j = j0 + lane;
    const bool jv = lane < nk;
    const int reg_j = jv ? region_of(g, win, j) : -1;
    float s[kRowsPerWarp], dp[kRowsPerWarp];
    attn_cuda::row_dots2(s, qs + warp * hd, ks + lane * ld, dp, dos + warp * hd, vs + lane * ld, kWarps * hd, hd);
#pragma unroll
    for (int k = 0; k < kRowsPerWarp; ++k) {
      const int i = r0 + warp + kWarps * k;
      const bool live = jv && act[k];
      float sk = s[k];
      if (bias != nullptr && live) sk += bias[(int64_t(h) * N + i) * N + j];
      if (g.shifted && reg_i[k] != reg_j) sk += kMaskValue;
      const float p = live ? __expf(sk - lse_i[k]) : 0.f;
      const float ds = p * (dp[k] - D[k]);
      if (grad_bias != nullptr && live) atomicAdd(grad_bias + (int64_t(h) * N + i) * N + j, ds);
      s[k] = ds;
    }
    attn_cuda::accum_rows(dq, s, ks, ld, nk, hd);
  }

#pragma unroll
  for (int k = 0; k < kRowsPerWarp; ++k) {
    if (act[k]) attn_cuda::store_row(grad_qkv + pix_i[k] * g.C3 + qcol, dq[k], g.scale, hd);
  }
}

// ---------------------------------------------------------------------------------------------------
// Backward step 2: rows = keys, columns = queries. Shared: k and v rows (stride hd), then the pre-scaled q
// and dO tiles (stride ld), then per-query lse, D, region and an active flag.

template <typename T, int HDV>
__global__ void __launch_bounds__(kBlock)
window_attn_bwd_dkv_kernel(const T* __restrict__ grad_out, const T* __restrict__ qkv,
                           const float* __restrict__ lse, const float* __restrict__ dvec,
                           const float* __restrict__ bias, const float* __restrict__ pad,
                           T* __restrict__ grad_qkv, float* __restrict__ grad_pad, const Geom g) {
  extern __shared__ float wa_smem[];
  const int hd = g.hd, ld = g.ld, N = g.N;
  float* kr = wa_smem;
  float* vr = kr + kRowTile * hd;
  float* qt = vr + kRowTile * hd;
  float* dot = qt + kColTile * ld;
  float* lse_t = dot + kColTile * ld;
  float* d_t = lse_t + kColTile;
  int* reg_t = reinterpret_cast<int*>(d_t + kColTile);
  int* act_t = reg_t + kColTile;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t bw = blockIdx.x;
  const Window win = window_of(g, bw);
  const int h = blockIdx.y;
  const int r0 = blockIdx.z * g.rows_per_block;
  const int nrows = imin(g.rows_per_block, N - r0);
  const int64_t qcol = int64_t(h) * hd, kcol = g.C + qcol, vcol = 2 * int64_t(g.C) + qcol;
  const int64_t row_base = (bw * g.heads + h) * N;

  load_rows(kr, hd, qkv, g.C3, kcol, pad ? pad + kcol : nullptr, g, win, r0, nrows, kRowTile, 1.f);
  load_rows(vr, hd, qkv, g.C3, vcol, pad ? pad + vcol : nullptr, g, win, r0, nrows, kRowTile, 1.f);

  int reg_j[kRowsPerWarp];
  float dk[kRowsPerWarp][HDV], dv[kRowsPerWarp][HDV];
#pragma unroll
  for (int k = 0; k < kRowsPerWarp; ++k) {
    const int rl = warp + kWarps * k;
    reg_j[k] = rl < nrows ? region_of(g, win, r0 + rl) : 0;
#pragma unroll
    for (int c = 0; c < HDV; ++c) dk[k][c] = dv[k][c] = 0.f;
  }

  for (int i0 = 0; i0 < N; i0 += kColTile) {
    const int ni = imin(kColTile, N - i0);
    __syncthreads();  // the previous tile is consumed (and the k / v rows are written)
    load_rows(qt, ld, qkv, g.C3, qcol, pad ? pad + qcol : nullptr, g, win, i0, ni, kColTile, g.scale);
    load_rows(dot, ld, grad_out, g.C, qcol, static_cast<const float*>(nullptr), g, win, i0, ni, kColTile, 1.f);
    if (threadIdx.x < kColTile) {
      const int t = threadIdx.x, i = i0 + t;
      const bool a = t < ni && token_pixel(g, win, i) >= 0;
      act_t[t] = a;
      lse_t[t] = a ? lse[row_base + i] : 0.f;
      d_t[t] = a ? dvec[row_base + i] : 0.f;
      reg_t[t] = a ? region_of(g, win, i) : 0;
    }
    __syncthreads();

    const int i = i0 + lane;
    const bool live = act_t[lane] != 0;
    const int reg_i = reg_t[lane];
    const float lse_i = lse_t[lane], D_i = d_t[lane];
    float s[kRowsPerWarp], dp[kRowsPerWarp];
    attn_cuda::row_dots2(s, kr + warp * hd, qt + lane * ld, dp, vr + warp * hd, dot + lane * ld, kWarps * hd, hd);
#pragma unroll
    for (int k = 0; k < kRowsPerWarp; ++k) {
      const int j = r0 + warp + kWarps * k;
      float sk = s[k];
      if (bias != nullptr && live && j < N) sk += bias[(int64_t(h) * N + i) * N + j];
      if (g.shifted && reg_i != reg_j[k]) sk += kMaskValue;
      const float p = live ? __expf(sk - lse_i) : 0.f;
      dp[k] = p * (dp[k] - D_i);
      s[k] = p;
    }
    attn_cuda::accum_rows2(dv, s, dot, dk, dp, qt, ld, ni, hd);
  }

#pragma unroll
  for (int k = 0; k < kRowsPerWarp; ++k) {
    const int rl = warp + kWarps * k;
    if (rl >= nrows) continue;
    const int64_t pix = token_pixel(g, win, r0 + rl);
    if (pix >= 0) {
      T* dst = grad_qkv + pix * g.C3;
#pragma unroll
      for (int c = 0; c < HDV; ++c) {
        const int d = lane + 32 * c;
        if (d < hd) {
          dst[kcol + d] = static_cast<T>(dk[k][c]);
          dst[vcol + d] = static_cast<T>(dv[k][c]);
        }
      }
    } else if (grad_pad != nullptr) {
#pragma unroll
      for (int c = 0; c < HDV; ++c) {
        const int d = lane + 32 * c;
        if (d < hd) {
          atomicAdd(grad_pad + kcol + d, dk[k][c]);
          atomicAdd(grad_pad + vcol + d, dv[k][c]);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Host side.

// Checks every argument shared by forward and backward and derives the geometry.
Geom make_geom(const char* op, const at::Tensor& qkv, int64_t num_heads, at::IntArrayRef window_size,
               at::IntArrayRef shift_size, const c10::optional<at::Tensor>& rel_pos_bias, double scale,
               const c10::optional<at::Tensor>& pad_qkv) {
  TORCH_CHECK(qkv.is_cuda(), "fastops.", op, " (cuda): qkv must be a CUDA tensor, got ", qkv.device());
  TORCH_CHECK(qkv.dim() == 4, "fastops.", op, ": qkv must be 4-D (B, H, W, 3C), got ", qkv.dim(), "-D");
  const auto st = qkv.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, "fastops.", op,
              " (cuda): qkv must be float32, float16 or bfloat16, got ", st);
  TORCH_CHECK(qkv.is_contiguous(), "fastops.", op, ": qkv must be contiguous (B, H, W, 3C), got strides ",
              qkv.strides());
  const int64_t B = qkv.size(0), H = qkv.size(1), W = qkv.size(2), C3 = qkv.size(3);
  TORCH_CHECK(B >= 1 && H >= 1 && W >= 1, "fastops.", op, ": qkv must have B, H, W >= 1, got shape ", qkv.sizes());
  TORCH_CHECK(C3 >= 3 && C3 % 3 == 0, "fastops.", op, ": qkv's last dim (3C) must be a positive multiple of 3, got ",
              C3);
  const int64_t C = C3 / 3;
  TORCH_CHECK(num_heads >= 1 && C % num_heads == 0, "fastops.", op, ": num_heads must be >= 1 and divide C = ", C,
              ", got ", num_heads);
  const int64_t hd = C / num_heads;
  TORCH_CHECK(hd <= kMaxHeadDim, "fastops.", op, " (cuda): head_dim = C / num_heads must be <= ", kMaxHeadDim,
              ", got ", hd);
  TORCH_CHECK(window_size.size() == 2, "fastops.", op, ": window_size must have 2 values, got ",
              window_size.size());
  TORCH_CHECK(shift_size.size() == 2, "fastops.", op, ": shift_size must have 2 values, got ", shift_size.size());
  const int64_t wh = window_size[0], ww = window_size[1], sh = shift_size[0], sw = shift_size[1];
  TORCH_CHECK(wh >= 1 && ww >= 1, "fastops.", op, ": window_size must be positive, got ", window_size);
  TORCH_CHECK(sh >= 0 && sh < wh && sw >= 0 && sw < ww, "fastops.", op,
              ": shift_size must satisfy 0 <= shift < window in each dim, got shift ", shift_size, " for window ",
              window_size);
  const int64_t N = wh * ww;
  TORCH_CHECK(N <= kMaxTokens, "fastops.", op, " (cuda): window_size[0] * window_size[1] must be <= ", kMaxTokens,
              ", got ", N);
  TORCH_CHECK(H < (int64_t(1) << 30) && W < (int64_t(1) << 30), "fastops.", op, ": H and W must be < 2^30, got ",
              qkv.sizes());
  const int64_t nWh = attn_cuda::ceil_div(H, wh), nWw = attn_cuda::ceil_div(W, ww);
  const int64_t nW = nWh * nWw;
  TORCH_CHECK(nW < (int64_t(1) << 31) && B * nW < (int64_t(1) << 31), "fastops.", op, ": B * number of windows (",
              B, " * ", nW, ") must be < 2^31");
  TORCH_CHECK(num_heads <= 65535, "fastops.", op, " (cuda): num_heads must be <= 65535, got ", num_heads);
  TORCH_CHECK(std::isfinite(scale), "fastops.", op, ": scale must be finite, got ", scale);
  if (rel_pos_bias.has_value() && rel_pos_bias->defined()) {
    const at::Tensor& b = *rel_pos_bias;
    TORCH_CHECK(b.scalar_type() == at::kFloat, "fastops.", op, " (cuda): rel_pos_bias must be float32, got ",
                b.scalar_type());
    TORCH_CHECK(b.device() == qkv.device(), "fastops.", op, ": rel_pos_bias is on ", b.device(), " but qkv is on ",
                qkv.device());
    TORCH_CHECK(b.dim() == 3 && b.size(0) == num_heads && b.size(1) == N && b.size(2) == N, "fastops.", op,
                ": rel_pos_bias must have shape (num_heads, N, N) = (", num_heads, ", ", N, ", ", N, "), got ",
                b.sizes());
    TORCH_CHECK(b.is_contiguous(), "fastops.", op, ": rel_pos_bias must be contiguous");
  }
  if (pad_qkv.has_value() && pad_qkv->defined()) {
    const at::Tensor& p = *pad_qkv;
    TORCH_CHECK(p.scalar_type() == at::kFloat, "fastops.", op, " (cuda): pad_qkv must be float32, got ",
                p.scalar_type());
    TORCH_CHECK(p.device() == qkv.device(), "fastops.", op, ": pad_qkv is on ", p.device(), " but qkv is on ",
                qkv.device());
    TORCH_CHECK(p.dim() == 1 && p.size(0) == C3, "fastops.", op, ": pad_qkv must have shape (3C,) = (", C3,
                ",), got ", p.sizes());
    TORCH_CHECK(p.is_contiguous(), "fastops.", op, ": pad_qkv must be contiguous");
  }
  Geom g;
  g.H = H;
  g.W = W;
  g.C3 = C3;
  g.C = static_cast<int>(C);
  g.heads = static_cast<int>(num_heads);
  g.hd = static_cast<int>(hd);
  g.wh = static_cast<int>(wh);
  g.ww = static_cast<int>(ww);
  g.sh = static_cast<int>(sh);
  g.sw = static_cast<int>(sw);
  g.nWw = static_cast<int>(nWw);
  g.nW = static_cast<int>(nW);
  g.Hp = static_cast<int>(nWh * wh);
  g.Wp = static_cast<int>(nWw * ww);
  g.N = static_cast<int>(N);
  // Rows spread evenly over the fewest tiles of <= kRowTile rows (49 -> 13, 13, 13, 10 rather than 16 x 3 + 1).
  const int64_t tiles = attn_cuda::ceil_div(N, kRowTile);
  g.rows_per_block = static_cast<int>(attn_cuda::ceil_div(N, tiles));
  g.ld = static_cast<int>(hd | 1);
  g.shifted = sh > 0 || sw > 0;
  g.scale = static_cast<float>(scale);
  return g;
}

int64_t num_row_tiles(const Geom& g) { return attn_cuda::ceil_div(g.N, g.rows_per_block); }

size_t fwd_smem(const Geom& g) { return sizeof(float) * (size_t(kRowTile) * g.hd + 2 * size_t(kColTile) * g.ld); }
size_t dq_smem(const Geom& g) { return sizeof(float) * (2 * size_t(kRowTile) * g.hd + 2 * size_t(kColTile) * g.ld); }
size_t dkv_smem(const Geom& g) {
  return sizeof(float) * (2 * size_t(kRowTile) * g.hd + 2 * size_t(kColTile) * g.ld + 4 * size_t(kColTile));
}

dim3 grid_of(const at::Tensor& qkv, const Geom& g) {
  const int64_t rows = qkv.size(0) * int64_t(g.nW);
  return dim3(static_cast<unsigned int>(rows), static_cast<unsigned int>(g.heads),
              static_cast<unsigned int>(num_row_tiles(g)));
}

const float* opt_ptr(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->const_data_ptr<float>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor> window_attention_cuda(const at::Tensor& qkv, int64_t num_heads,
                                                         at::IntArrayRef window_size, at::IntArrayRef shift_size,
                                                         const c10::optional<at::Tensor>& rel_pos_bias, double scale,
                                                         const c10::optional<at::Tensor>& pad_qkv) {
  const Geom g = make_geom(kFwdOp, qkv, num_heads, window_size, shift_size, rel_pos_bias, scale, pad_qkv);
  const c10::cuda::CUDAGuard guard(qkv.device());
  const int64_t B = qkv.size(0);
  at::Tensor out = at::empty({B, g.H, g.W, g.C}, qkv.options());
  at::Tensor lse = at::empty({B, g.nW, g.heads, g.N}, qkv.options().dtype(at::kFloat));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid = grid_of(qkv, g);
  const size_t smem = fwd_smem(g);
  const float* bias = opt_ptr(rel_pos_bias);
  const float* pad = opt_ptr(pad_qkv);
  ATTN_DISPATCH(qkv.scalar_type(), "window_attention_cuda", [&] {
    using T = scalar_t;
    attn_cuda::dispatch_hdv(g.hd, [&](auto hdv) {
      constexpr int HDV = decltype(hdv)::value;
      attn_cuda::prepare_smem(window_attn_fwd_kernel<T, HDV>, smem, kFwdOp);
      window_attn_fwd_kernel<T, HDV><<<grid, kBlock, smem, stream>>>(qkv.const_data_ptr<T>(), bias, pad,
                                                                     out.data_ptr<T>(), lse.data_ptr<float>(), g);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> window_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& out, const at::Tensor& lse,
    int64_t num_heads, at::IntArrayRef window_size, at::IntArrayRef shift_size,
    const c10::optional<at::Tensor>& rel_pos_bias, double scale, const c10::optional<at::Tensor>& pad_qkv,
    bool bias_grad, bool pad_grad) {
  const Geom g = make_geom(kBwdOp, qkv, num_heads, window_size, shift_size, rel_pos_bias, scale, pad_qkv);
  const int64_t B = qkv.size(0);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"grad_out", &grad_out}, {"out", &out}}) {
    TORCH_CHECK(t->scalar_type() == qkv.scalar_type(), "fastops.", kBwdOp, ": ", name, " dtype ", t->scalar_type(),
                " differs from qkv dtype ", qkv.scalar_type());
    TORCH_CHECK(t->device() == qkv.device(), "fastops.", kBwdOp, ": ", name, " is on ", t->device(),
                " but qkv is on ", qkv.device());
    TORCH_CHECK(t->dim() == 4 && t->size(0) == B && t->size(1) == g.H && t->size(2) == g.W && t->size(3) == g.C,
                "fastops.", kBwdOp, ": ", name, " must have shape (", B, ", ", g.H, ", ", g.W, ", ", g.C, "), got ",
                t->sizes());
    TORCH_CHECK(t->is_contiguous(), "fastops.", kBwdOp, ": ", name, " must be contiguous");
  }
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "fastops.", kBwdOp, " (cuda): lse must be float32, got ",
              lse.scalar_type());
  TORCH_CHECK(lse.device() == qkv.device(), "fastops.", kBwdOp, ": lse is on ", lse.device(), " but qkv is on ",
              qkv.device());
  TORCH_CHECK(lse.dim() == 4 && lse.size(0) == B && lse.size(1) == g.nW && lse.size(2) == g.heads &&
                  lse.size(3) == g.N,
              "fastops.", kBwdOp, ": lse must have shape (B, nW, num_heads, N) = (", B, ", ", g.nW, ", ", g.heads,
              ", ", g.N, "), got ", lse.sizes());
  TORCH_CHECK(lse.is_contiguous(), "fastops.", kBwdOp, ": lse must be contiguous");

  const c10::cuda::CUDAGuard guard(qkv.device());
  const auto f32 = qkv.options().dtype(at::kFloat);
  at::Tensor grad_qkv = at::empty_like(qkv);  // every element is written once (q by step 1, k / v by step 2)
  at::Tensor grad_bias = bias_grad ? at::zeros({g.heads, g.N, g.N}, f32) : at::empty({0}, f32);
  at::Tensor grad_pad = pad_grad ? at::zeros({g.C3}, f32) : at::empty({0}, f32);
  at::Tensor dvec = at::empty({B, g.nW, g.heads, g.N}, f32);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid = grid_of(qkv, g);
  const float* bias = opt_ptr(rel_pos_bias);
  const float* pad = opt_ptr(pad_qkv);
  ATTN_DISPATCH(qkv.scalar_type(), "window_attention_backward_cuda", [&] {
    using T = scalar_t;
    attn_cuda::dispatch_hdv(g.hd, [&](auto hdv) {
      constexpr int HDV = decltype(hdv)::value;
      const size_t smem1 = dq_smem(g);
      attn_cuda::prepare_smem(window_attn_bwd_dq_kernel<T, HDV>, smem1, kBwdOp);
      window_attn_bwd_dq_kernel<T, HDV><<<grid, kBlock, smem1, stream>>>(
          grad_out.const_data_ptr<T>(), qkv.const_data_ptr<T>(), out.const_data_ptr<T>(),
          lse.const_data_ptr<float>(), bias, pad, grad_qkv.data_ptr<T>(), dvec.data_ptr<float>(),
          bias_grad ? grad_bias.data_ptr<float>() : nullptr, g);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const size_t smem2 = dkv_smem(g);
      attn_cuda::prepare_smem(window_attn_bwd_dkv_kernel<T, HDV>, smem2, kBwdOp);
      window_attn_bwd_dkv_kernel<T, HDV><<<grid, kBlock, smem2, stream>>>(
          grad_out.const_data_ptr<T>(), qkv.const_data_ptr<T>(), lse.const_data_ptr<float>(),
          dvec.const_data_ptr<float>(), bias, pad, grad_qkv.data_ptr<T>(),
          pad_grad ? grad_pad.data_ptr<float>() : nullptr, g);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {grad_qkv, grad_bias, grad_pad};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastops, CUDA, m) {
  m.impl("window_attention", &window_attention_cuda);
  m.impl("window_attention_backward", &window_attention_backward_cuda);
}

}  // namespace fastops
