// PVT spatial reduction on CUDA: forward and backward, float / half / bf16, fp32 accumulation (the oracle:
// fastops/reference/spatial_reduction.py).
//
// The conv (kernel = stride = sr_ratio, no padding) is a GEMM y = A W^T + bias with M = B * Nr output tokens,
// K = C * k * k and C output channels, whose A rows are gathered from x's token layout in place: with
// kk = (ky * k + kx) * C + ci, every (ky, kx) tap is a contiguous run of C channels of one input token. In
// linear mode A is the AdaptiveAvgPool2d(7) of x (computed first into an fp32 buffer) and K = C.
//
// One tiled GEMM kernel (kBM x kBN output tiles, kBK-deep shared-memory slices, kTM x kTN outputs per thread)
// serves every product through accessor functors: the forward conv, grad_weight = dY^T A and
// grad_A = dY W. M = B * Nr is small while K is large in PVT's first stages (e.g. 392 x 4096 for 56x56,
// sr 8, batch 8), so the forward and grad_weight products split their reduction over blocks; each split
// writes fp32 partial sums and the next pass adds the splits in a fixed order. That pass is, for the forward,
// the LayerNorm (+ GELU) over full rows of y (one warp per row, any C), which also writes y (incl. bias) and
// stats = [mean, rstd] for the backward.
//
// Backward: a row pass recomputes xhat (and z for GELU') from y / stats and writes dy = LN backward (fp32);
// a column pass reduces grad_norm_weight, grad_norm_bias and grad_bias over the B * Nr rows in row splits
// added in order. grad_x: non-linear, each input pixel is read by at most one output token, so grad_A is
// written straight into grad_x (pixels past Hr * k or Wr * k stay zero); linear, dpooled = dY W is formed
// first and each pixel sums dpooled / bin area over the (possibly overlapping, possibly repeated) bins that
// contain it. No atomics: the same inputs give the same bits.
//
// Limits (checked): float64 is not supported on CUDA; C * k * k <= 64 * 65535; B * Nr < 2^33.
// Element offsets are int64.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>

#include "common.h"
#include "cuda/channel_attn.cuh"

namespace fastops {

namespace {

constexpr const char* kFwdOp = "spatial_reduction";
constexpr const char* kBwdOp = "spatial_reduction_backward";

constexpr int kPool = 7;  // AdaptiveAvgPool2d output size of linear mode
constexpr int kGemmThreads = 256;
constexpr int kBM = 64, kBN = 64, kBK = 16;
constexpr int kTX = 16, kTY = kGemmThreads / kTX;  // thread grid over an output tile
constexpr int kTM = kBM / kTY, kTN = kBN / kTX;
constexpr int kRowWarps = 8;                         // rows (one warp each) per block of the row passes
constexpr int kColThreads = 256;                     // column pass: 32 columns x 8 row lanes
constexpr int kColRows = kColThreads / 32;
constexpr int64_t kMaxSplits = 64;
constexpr int kElemThreads = 256;
constexpr float kSqrtHalf = 0.70710678118654752440f;
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;

struct Geom {
  int64_t B, N, C, H, W;
  int64_t k;               // kernel = stride (1 in linear mode)
  int64_t Hr, Wr, Nr, M;   // output map, tokens per image, B * Nr
  int64_t K;               // reduction length of the forward product: C * k * k
  bool linear;
};

__device__ __forceinline__ int64_t lmin(int64_t a, int64_t b) { return a < b ? a : b; }

__device__ __forceinline__ float gelu(float z) { return 0.5f * z * (1.f + erff(z * kSqrtHalf)); }
__device__ __forceinline__ float gelu_grad(float z) {
  return 0.5f * (1.f + erff(z * kSqrtHalf)) + z * kInvSqrt2Pi * expf(-0.5f * z * z);
}

// Row bin i of AdaptiveAvgPool2d(P) over L pixels: [floor(i L / P), ceil((i + 1) L / P)).
__host__ __device__ __forceinline__ int64_t bin_begin(int64_t i, int64_t L) { return (i * L) / kPool; }
__host__ __device__ __forceinline__ int64_t bin_end(int64_t i, int64_t L) { return ((i + 1) * L + kPool - 1) / kPool; }

// ---------------------------------------------------------------------------------------------------
// Accessors of the GEMM operands and result. A product is out(i, j) = sum_r L(i, r) R(r, j).

// The conv's input patches in place: patch(m, kk) = x[b, (ry k + ky) W + rx k + kx, ci].
template <typename T>
struct Patch {
  const T* x;
  int64_t N, C, W, k, Wr, Nr;
  __device__ __forceinline__ int64_t row_base(int64_t m) const {
    const int64_t b = m / Nr, r = m - b * Nr;
    const int64_t ry = r / Wr, rx = r - ry * Wr;
    return (b * N + ry * k * W + rx * k) * C;
  }
  __device__ __forceinline__ int64_t tap_off(int64_t kk) const {
    const int64_t tap = kk / C, ci = kk - tap * C;
    const int64_t ky = tap / k, kx = tap - ky * k;
    return (ky * W + kx) * C + ci;
  }
  __device__ __forceinline__ float get(int64_t m, int64_t kk) const {
    return static_cast<float>(x[row_base(m) + tap_off(kk)]);
  }
};

// Conv weight (C, C, k, k) at (co, kk): kk's channel-major order -> PyTorch's [co][ci][ky][kx].
template <typename T>
struct Weight {
  const T* w;
  int64_t C, kk2;
  __device__ __forceinline__ int64_t index(int64_t co, int64_t kk) const {
    const int64_t tap = kk / C;
    return (co * C + (kk - tap * C)) * kk2 + tap;
  }
  __device__ __forceinline__ float get(int64_t co, int64_t kk) const { return static_cast<float>(w[index(co, kk)]); }
};

// Forward: L = patches (or pooled), R(kk, co) = weight.
template <typename T>
struct PatchL {
  Patch<T> p;
  static constexpr bool kFast = false;  // consecutive r (kk) are contiguous
  __device__ __forceinline__ float operator()(int64_t m, int64_t kk) const { return p.get(m, kk); }
};
struct MatF32 {  // p[a * sa + b * sb]; kFast says whether the first index is the contiguous one
  const float* p;
  int64_t sa, sb;
  __device__ __forceinline__ float operator()(int64_t a, int64_t b) const { return p[a * sa + b * sb]; }
};
template <bool FastFirst>
struct MatL : MatF32 {
  static constexpr bool kFast = FastFirst;
};
template <typename T>
struct WeightKC {  // R(kk, co)
  Weight<T> w;
  static constexpr bool kFast = false;  // consecutive j (co) are not contiguous
  __device__ __forceinline__ float operator()(int64_t kk, int64_t co) const { return w.get(co, kk); }
};
template <typename T>
struct WeightCK {  // R(co, kk), for grad_A = dY W
  Weight<T> w;
  static constexpr bool kFast = true;
  __device__ __forceinline__ float operator()(int64_t co, int64_t kk) const { return w.get(co, kk); }
};
template <typename T>
struct PatchR {  // R(m, kk), for grad_weight = dY^T patches
  Patch<T> p;
  static constexpr bool kFast = true;
  __device__ __forceinline__ float operator()(int64_t m, int64_t kk) const { return p.get(m, kk); }
};
template <bool FastSecond>
struct MatR : MatF32 {
  static constexpr bool kFast = FastSecond;
};

// Result stores. split indexes the reduction split of the block.
struct StoreF32 {  // p[split * split_stride + i * ld + j]
  float* p;
  int64_t ld, split_stride;
  __device__ __forceinline__ void operator()(int64_t i, int64_t j, int split, float v) const {
    p[split * split_stride + i * ld + j] = v;
  }
};
template <typename T>
struct StoreGradWeight {  // (co, kk) -> PyTorch's weight layout, fp32 partials per split
  float* p;
  Weight<T> w;
  int64_t split_stride;
  __device__ __forceinline__ void operator()(int64_t co, int64_t kk, int split, float v) const {
    p[split * split_stride + w.index(co, kk)] = v;
  }
};
template <typename T>
struct StoreGradX {  // (m, kk) -> the one input pixel / channel that patch element was read from
  T* gx;
  Patch<T> p;
  __device__ __forceinline__ void operator()(int64_t m, int64_t kk, int, float v) const {
    gx[p.row_base(m) + p.tap_off(kk)] = static_cast<T>(v);
  }
};

// out(i, j) = sum over r in this block's split [z * r_split, ...) of L(i, r) R(r, j), for i < I, j < J.
template <class LA, class RB, class ST>
__global__ void __launch_bounds__(kGemmThreads)
sr_gemm_kernel(int64_t I, int64_t J, int64_t R, int64_t r_split, const LA la, const RB rb, const ST st) {
  __shared__ float ls[kBK][kBM + 1];
  __shared__ float rs[kBK][kBN + 1];
  const int tid = threadIdx.x, tx = tid % kTX, ty = tid / kTX;
  const int64_t i0 = int64_t(blockIdx.x) * kBM, j0 = int64_t(blockIdx.y) * kBN;
  const int split = blockIdx.z;
  const int64_t rb0 = split * r_split, re = lmin(R, rb0 + r_split);
  float acc[kTM][kTN];
#pragma unroll
  for (int a = 0; a < kTM; ++a) {
#pragma unroll
    for (int c = 0; c < kTN; ++c) acc[a][c] = 0.f;
  }
  for (int64_t r0 = rb0; r0 < re; r0 += kBK) {
    for (int e = tid; e < kBM * kBK; e += kGemmThreads) {
      const int il = LA::kFast ? e % kBM : e / kBK;
      const int rl = LA::kFast ? e / kBM : e % kBK;
      const int64_t i = i0 + il, r = r0 + rl;
      ls[rl][il] = i < I && r < re ? la(i, r) : 0.f;
    }
    for (int e = tid; e < kBN * kBK; e += kGemmThreads) {
      const int jl = RB::kFast ? e % kBN : e / kBK;
      const int rl = RB::kFast ? e / kBN : e % kBK;
      const int64_t j = j0 + jl, r = r0 + rl;
      rs[rl][jl] = j < J && r < re ? rb(r, j) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int rl = 0; rl < kBK; ++rl) {
      float a[kTM], bv[kTN];
#pragma unroll
      for (int t = 0; t < kTM; ++t) a[t] = ls[rl][ty + kTY * t];
#pragma unroll
      for (int t = 0; t < kTN; ++t) bv[t] = rs[rl][tx + kTX * t];
#pragma unroll
      for (int u = 0; u < kTM; ++u) {
#pragma unroll
        for (int t = 0; t < kTN; ++t) acc[u][t] = fmaf(a[u], bv[t], acc[u][t]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int u = 0; u < kTM; ++u) {
    const int64_t i = i0 + ty + kTY * u;
    if (i >= I) continue;
#pragma unroll
    for (int t = 0; t < kTN; ++t) {
      const int64_t j = j0 + tx + kTX * t;
      if (j < J) st(i, j, split, acc[u][t]);
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Element-wise and row / column passes.

// pooled[b, r, ci] = mean of x over bin r = (i, j) of AdaptiveAvgPool2d(7), fp32.
template <typename T>
__global__ void __launch_bounds__(kElemThreads)
sr_pool_kernel(const T* __restrict__ x, float* __restrict__ pooled, int64_t B, int64_t H, int64_t W, int64_t C) {
  const int64_t total = B * kPool * kPool * C;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t ci = e % C, br = e / C;
    const int64_t r = br % (kPool * kPool), b = br / (kPool * kPool);
    const int64_t i = r / kPool, j = r - i * kPool;
    const int64_t hs = bin_begin(i, H), he = bin_end(i, H), ws = bin_begin(j, W), we = bin_end(j, W);
    float acc = 0.f;
    for (int64_t hy = hs; hy < he; ++hy) {
      const T* row = x + ((b * H + hy) * W) * C + ci;
      for (int64_t wx = ws; wx < we; ++wx) acc += static_cast<float>(row[wx * C]);
    }
    pooled[e] = acc / static_cast<float>((he - hs) * (we - ws));
  }
}

// grad_x[b, hy * W + wx, ci] = sum over the bins (i, j) containing the pixel of dpooled[b, (i, j), ci] / area.
template <typename T>
__global__ void __launch_bounds__(kElemThreads)
sr_pool_backward_kernel(const float* __restrict__ dpooled, T* __restrict__ grad_x, int64_t B, int64_t H, int64_t W,
                        int64_t C) {
  const int64_t total = B * H * W * C;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t ci = e % C, bp = e / C;
    const int64_t pix = bp % (H * W), b = bp / (H * W);
    const int64_t hy = pix / W, wx = pix - hy * W;
    float acc = 0.f;
    for (int i = 0; i < kPool; ++i) {
      const int64_t hs = bin_begin(i, H), he = bin_end(i, H);
      if (hy < hs || hy >= he) continue;
      for (int j = 0; j < kPool; ++j) {
        const int64_t ws = bin_begin(j, W), we = bin_end(j, W);
        if (wx < ws || wx >= we) continue;
        acc += dpooled[(b * kPool * kPool + i * kPool + j) * C + ci] / static_cast<float>((he - hs) * (we - ws));
      }
    }
    grad_x[e] = static_cast<T>(acc);
  }
}

// One warp per row m: y = bias + sum of the GEMM's split partials (in order), then LayerNorm (+ GELU).
// parts may alias y (one split): each element is read and then written by the same lane.
template <typename T>
__global__ void __launch_bounds__(kRowWarps * 32)
sr_norm_forward_kernel(const float* parts, int splits, const T* __restrict__ bias, const T* __restrict__ nw,
                       const T* __restrict__ nb, float* y, T* __restrict__ out, float* __restrict__ stats, int64_t M,
                       int64_t C, float eps, bool linear) {
  const int lane = threadIdx.x & 31;
  const int64_t m = int64_t(blockIdx.x) * kRowWarps + (threadIdx.x >> 5);
  if (m >= M) return;  // whole warps leave; no block barrier follows
  const int64_t row = m * C, MC = M * C;
  float sum = 0.f;
  for (int64_t c = lane; c < C; c += 32) {
    float v = bias != nullptr ? static_cast<float>(bias[c]) : 0.f;
    for (int s = 0; s < splits; ++s) v += parts[s * MC + row + c];
    y[row + c] = v;
    sum += v;
  }
  const float inv_c = 1.f / static_cast<float>(C);
  const float mean = attn_cuda::warp_sum(sum) * inv_c;
  float sq = 0.f;
  for (int64_t c = lane; c < C; c += 32) {
    const float d = y[row + c] - mean;
    sq = fmaf(d, d, sq);
  }
  const float rstd = 1.f / sqrtf(attn_cuda::warp_sum(sq) * inv_c + eps);
  for (int64_t c = lane; c < C; c += 32) {
    float z = (y[row + c] - mean) * rstd * static_cast<float>(nw[c]) + static_cast<float>(nb[c]);
    if (linear) z = gelu(z);
    out[row + c] = static_cast<T>(z);
  }
  if (lane == 0) {
    stats[2 * m] = mean;
    stats[2 * m + 1] = rstd;
  }
}

// dz of row m (GELU' applied in linear mode) and xhat, recomputed from y and the stats.
template <typename T>
__device__ __forceinline__ void dz_xhat(const T* __restrict__ grad_out, const float* __restrict__ y,
                                        const T* __restrict__ nw, const T* __restrict__ nb, int64_t idx, int64_t c,
                                        float mean, float rstd, bool linear, float& dz, float& xhat) {
  xhat = (y[idx] - mean) * rstd;
  dz = static_cast<float>(grad_out[idx]);
  if (linear) dz *= gelu_grad(xhat * static_cast<float>(nw[c]) + static_cast<float>(nb[c]));
}

// One warp per row m: dy = rstd (g - mean_c(g) - xhat mean_c(g xhat)) with g = dz * norm_weight.
template <typename T>
__global__ void __launch_bounds__(kRowWarps * 32)
sr_norm_backward_kernel(const T* __restrict__ grad_out, const float* __restrict__ y, const float* __restrict__ stats,
                        const T* __restrict__ nw, const T* __restrict__ nb, float* __restrict__ dy, int64_t M,
                        int64_t C, bool linear) {
  const int lane = threadIdx.x & 31;
  const int64_t m = int64_t(blockIdx.x) * kRowWarps + (threadIdx.x >> 5);
  if (m >= M) return;  // whole warps leave; no block barrier follows
  const int64_t row = m * C;
  const float mean = stats[2 * m], rstd = stats[2 * m + 1];
  float sg = 0.f, sgx = 0.f;
  for (int64_t c = lane; c < C; c += 32) {
    float dz, xh;
    dz_xhat(grad_out, y, nw, nb, row + c, c, mean, rstd, linear, dz, xh);
    const float gv = dz * static_cast<float>(nw[c]);
    sg += gv;
    sgx = fmaf(gv, xh, sgx);
  }
  const float inv_c = 1.f / static_cast<float>(C);
  const float mg = attn_cuda::warp_sum(sg) * inv_c, mgx = attn_cuda::warp_sum(sgx) * inv_c;
  for (int64_t c = lane; c < C; c += 32) {
    float dz, xh;
    dz_xhat(grad_out, y, nw, nb, row + c, c, mean, rstd, linear, dz, xh);
    const float gv = dz * static_cast<float>(nw[c]);
    dy[row + c] = rstd * (gv - mg - xh * mgx);
  }
}

// Column sums over the rows of split blockIdx.y: part[(q * splits + s) * C + c] for q = 0: dz * xhat
// (grad_norm_weight), 1: dz (grad_norm_bias), 2: dy (grad_bias, when dy is given).
template <typename T>
__global__ void __launch_bounds__(kColThreads)
sr_column_sums_kernel(const T* __restrict__ grad_out, const float* __restrict__ y, const float* __restrict__ stats,
                      const T* __restrict__ nw, const T* __restrict__ nb, const float* __restrict__ dy,
                      float* __restrict__ part, int64_t M, int64_t C, int64_t rows_per_split, bool linear) {
  __shared__ float red[3][kColRows][32];
  const int cx = threadIdx.x & 31, ry = threadIdx.x >> 5;
  const int64_t c = int64_t(blockIdx.x) * 32 + cx;
  const int s = blockIdx.y, splits = gridDim.y;
  const int64_t mb = s * rows_per_split, me = lmin(M, mb + rows_per_split);
  float a = 0.f, bsum = 0.f, e = 0.f;
  if (c < C) {
    for (int64_t m = mb + ry; m < me; m += kColRows) {
      float dz, xh;
      dz_xhat(grad_out, y, nw, nb, m * C + c, c, stats[2 * m], stats[2 * m + 1], linear, dz, xh);
      a = fmaf(dz, xh, a);
      bsum += dz;
      if (dy != nullptr) e += dy[m * C + c];
    }
  }
  red[0][ry][cx] = a;
  red[1][ry][cx] = bsum;
  red[2][ry][cx] = e;
  __syncthreads();
  if (ry < 3 && c < C && (ry < 2 || dy != nullptr)) {
    float v = 0.f;
    for (int t = 0; t < kColRows; ++t) v += red[ry][t][cx];
    part[(int64_t(ry) * splits + s) * C + c] = v;
  }
}

// out[e] = sum over splits s (in order) of part[s * n + e].
template <typename T>
__global__ void __launch_bounds__(kElemThreads)
sr_sum_splits_kernel(const float* __restrict__ part, int splits, int64_t n, T* __restrict__ out) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    float acc = 0.f;
    for (int s = 0; s < splits; ++s) acc += part[s * n + e];
    out[e] = static_cast<T>(acc);
  }
}

// ---------------------------------------------------------------------------------------------------
// Host side.

void check_param(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x,
                 c10::IntArrayRef shape) {
  TORCH_CHECK(t.sizes() == shape, "fastops.", op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "fastops.", op, ": ", name, " dtype ", t.scalar_type(),
              " differs from x dtype ", x.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "fastops.", op, ": ", name, " is on ", t.device(), " but x is on ",
              x.device());
  TORCH_CHECK(t.is_contiguous(), "fastops.", op, ": ", name, " must be contiguous");
}

void check_f32(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x, c10::IntArrayRef shape) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, "fastops.", op, " (cuda): ", name, " must be float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "fastops.", op, ": ", name, " is on ", t.device(), " but x is on ",
              x.device());
  TORCH_CHECK(t.sizes() == shape, "fastops.", op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "fastops.", op, ": ", name, " must be contiguous");
}

// Checks the arguments shared by forward and backward and derives the geometry.
Geom make_geom(const char* op, const at::Tensor& x, at::IntArrayRef feat_size, const at::Tensor& weight,
               const at::Tensor& norm_weight, const at::Tensor& norm_bias, int64_t sr_ratio, bool linear) {
  TORCH_CHECK(x.is_cuda(), "fastops.", op, " (cuda): x must be a CUDA tensor, got ", x.device());
  const auto st = x.scalar_type();
  TORCH_CHECK(st != at::kDouble, "fastops.", op, " (cuda): float64 is not supported on CUDA (use the cpu or ",
              "reference backend)");
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, "fastops.", op,
              " (cuda): x must be float32, float16 or bfloat16, got ", st);
  TORCH_CHECK(x.dim() == 3, "fastops.", op, ": x must be 3-D (B, N, C), got ", x.dim(), "-D");
  TORCH_CHECK(x.is_contiguous(), "fastops.", op, ": x must be contiguous, got strides ", x.strides());
  TORCH_CHECK(feat_size.size() == 2, "fastops.", op, ": feat_size must have 2 values [H, W], got ",
              feat_size.size());
  Geom g;
  g.B = x.size(0);
  g.N = x.size(1);
  g.C = x.size(2);
  g.H = feat_size[0];
  g.W = feat_size[1];
  g.linear = linear;
  TORCH_CHECK(g.C >= 1, "fastops.", op, ": x must have C >= 1, got shape ", x.sizes());
  TORCH_CHECK(g.H >= 1 && g.W >= 1 && g.H * g.W == g.N, "fastops.", op, ": feat_size ", feat_size,
              " must be positive with H * W = N = ", g.N);
  if (linear) {
    g.k = 1;
    g.Hr = g.Wr = kPool;
  } else {
    TORCH_CHECK(sr_ratio >= 1, "fastops.", op, ": sr_ratio must be >= 1, got ", sr_ratio);
    TORCH_CHECK(g.H >= sr_ratio && g.W >= sr_ratio, "fastops.", op, ": feat_size ", feat_size,
                " must be >= sr_ratio = ", sr_ratio, " in each dim");
    g.k = sr_ratio;
    g.Hr = g.H / sr_ratio;
    g.Wr = g.W / sr_ratio;
  }
  g.Nr = g.Hr * g.Wr;
  g.M = g.B * g.Nr;
  g.K = g.C * g.k * g.k;
  TORCH_CHECK(attn_cuda::ceil_div(g.K, kBN) <= 65535, "fastops.", op, " (cuda): C * k * k must be <= ",
              65535 * kBN, ", got ", g.K);
  check_param(op, "weight", weight, x, {g.C, g.C, g.k, g.k});
  check_param(op, "norm_weight", norm_weight, x, {g.C});
  check_param(op, "norm_bias", norm_bias, x, {g.C});
  return g;
}

// Number of splits of a reduction of `len` elements for a product with `tiles` output tiles: enough blocks
// to fill the device, each split at least 4 kBK-slices deep. r_split is a multiple of kBK.
std::pair<int, int64_t> pick_gemm_splits(int64_t tiles, int64_t len) {
  const int64_t target = 2 * attn_cuda::sm_count();
  const int64_t slices = attn_cuda::ceil_div(len, kBK);
  int64_t s = tiles >= target ? 1 : attn_cuda::ceil_div(target, std::max<int64_t>(tiles, 1));
  s = std::clamp<int64_t>(s, 1, std::min(kMaxSplits, std::max<int64_t>(1, slices / 4)));
  const int64_t r_split = attn_cuda::ceil_div(slices, s) * kBK;
  return {static_cast<int>(attn_cuda::ceil_div(len, r_split)), r_split};
}

template <class LA, class RB, class ST>
void launch_gemm(cudaStream_t stream, int64_t I, int64_t J, int64_t R, int splits, int64_t r_split, const LA& la,
                 const RB& rb, const ST& st) {
  const dim3 grid(static_cast<unsigned int>(attn_cuda::ceil_div(I, kBM)),
                  static_cast<unsigned int>(attn_cuda::ceil_div(J, kBN)), static_cast<unsigned int>(splits));
  sr_gemm_kernel<LA, RB, ST><<<grid, kGemmThreads, 0, stream>>>(I, J, R, r_split, la, rb, st);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

unsigned int elem_blocks(int64_t n) { return attn_cuda::blocks_for(n, kElemThreads, int64_t(1) << 20); }
unsigned int row_blocks(int64_t rows) { return attn_cuda::blocks_for(rows, kRowWarps); }

template <typename T>
Patch<T> patch_of(const Geom& g, const T* x) {
  return Patch<T>{x, g.N, g.C, g.W, g.k, g.Wr, g.Nr};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> spatial_reduction_cuda(
    const at::Tensor& x, at::IntArrayRef feat_size, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& norm_weight, const at::Tensor& norm_bias, int64_t sr_ratio, bool linear, double eps) {
  const Geom g = make_geom(kFwdOp, x, feat_size, weight, norm_weight, norm_bias, sr_ratio, linear);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) check_param(kFwdOp, "bias", *bias, x, {g.C});
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "fastops.", kFwdOp, ": eps must be finite and >= 0, got ", eps);
  TORCH_CHECK(g.M < (int64_t(1) << 33), "fastops.", kFwdOp, " (cuda): B * Nr must be < 2^33, got ", g.M);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor out = at::empty({g.B, g.Nr, g.C}, x.options());
  at::Tensor y = at::empty({g.B, g.Nr, g.C}, f32);
  at::Tensor stats = at::empty({g.B, g.Nr, 2}, f32);
  if (g.M == 0) return {out, y, stats};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const std::pair<int, int64_t> split_of = pick_gemm_splits(attn_cuda::ceil_div(g.M, kBM) * attn_cuda::ceil_div(g.C, kBN), g.K);
  const int splits = split_of.first;
  const int64_t r_split = split_of.second;
  const int64_t MC = g.M * g.C;
  at::Tensor parts = splits > 1 ? at::empty({splits * MC}, f32) : y;
  ATTN_DISPATCH(x.scalar_type(), "spatial_reduction_cuda", [&] {
    using T = scalar_t;
    const Weight<T> w{weight.const_data_ptr<T>(), g.C, g.k * g.k};
    const StoreF32 store{parts.data_ptr<float>(), g.C, MC};
    if (linear) {
      at::Tensor pooled = at::empty({g.M, g.C}, f32);
      sr_pool_kernel<T><<<elem_blocks(pooled.numel()), kElemThreads, 0, stream>>>(
          x.const_data_ptr<T>(), pooled.data_ptr<float>(), g.B, g.H, g.W, g.C);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      launch_gemm(stream, g.M, g.C, g.K, splits, r_split, MatL<false>{{pooled.const_data_ptr<float>(), g.C, 1}},
                  WeightKC<T>{w}, store);
    } else {
      launch_gemm(stream, g.M, g.C, g.K, splits, r_split, PatchL<T>{patch_of(g, x.const_data_ptr<T>())},
                  WeightKC<T>{w}, store);
    }
    sr_norm_forward_kernel<T><<<row_blocks(g.M), kRowWarps * 32, 0, stream>>>(
        parts.const_data_ptr<float>(), splits, has_bias ? bias->const_data_ptr<T>() : nullptr,
        norm_weight.const_data_ptr<T>(), norm_bias.const_data_ptr<T>(), y.data_ptr<float>(), out.data_ptr<T>(),
        stats.data_ptr<float>(), g.M, g.C, static_cast<float>(eps), linear);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, y, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> spatial_reduction_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, at::IntArrayRef feat_size, const at::Tensor& weight,
    const at::Tensor& norm_weight, const at::Tensor& norm_bias, const at::Tensor& y, const at::Tensor& stats,
    int64_t sr_ratio, bool linear, bool bias_grad) {
  const Geom g = make_geom(kBwdOp, x, feat_size, weight, norm_weight, norm_bias, sr_ratio, linear);
  check_param(kBwdOp, "grad_out", grad_out, x, {g.B, g.Nr, g.C});
  check_f32(kBwdOp, "y", y, x, {g.B, g.Nr, g.C});
  check_f32(kBwdOp, "stats", stats, x, {g.B, g.Nr, 2});
  TORCH_CHECK(g.M < (int64_t(1) << 33), "fastops.", kBwdOp, " (cuda): B * Nr must be < 2^33, got ", g.M);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto f32 = x.options().dtype(at::kFloat);
  const bool all_read = linear || (g.H % g.k == 0 && g.W % g.k == 0);
  at::Tensor grad_x = all_read && g.M > 0 ? at::empty_like(x) : at::zeros_like(x);
  at::Tensor grad_weight = at::empty_like(weight);
  at::Tensor grad_bias = bias_grad ? at::empty({g.C}, x.options()) : at::empty({0}, x.options());
  at::Tensor grad_nw = at::empty_like(norm_weight);
  at::Tensor grad_nb = at::empty_like(norm_bias);
  if (g.M == 0) {
    grad_weight.zero_();
    grad_bias.zero_();
    grad_nw.zero_();
    grad_nb.zero_();
    return {grad_x, grad_weight, grad_bias, grad_nw, grad_nb};
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor dy = at::empty({g.M, g.C}, f32);
  const int64_t col_blocks = attn_cuda::ceil_div(g.C, 32);
  const int64_t target = 2 * attn_cuda::sm_count();
  int64_t csplits = col_blocks >= target ? 1 : attn_cuda::ceil_div(target, col_blocks);
  csplits = std::clamp<int64_t>(csplits, 1, std::min<int64_t>(256, std::max<int64_t>(1, g.M / 64)));
  const int64_t rows_per_split = attn_cuda::ceil_div(g.M, csplits);
  csplits = attn_cuda::ceil_div(g.M, rows_per_split);
  at::Tensor col_part = at::empty({3 * csplits * g.C}, f32);
  const std::pair<int, int64_t> wsplit_of =
      pick_gemm_splits(attn_cuda::ceil_div(g.C, kBM) * attn_cuda::ceil_div(g.K, kBN), g.M);
  const int wsplits = wsplit_of.first;
  const int64_t wr_split = wsplit_of.second;
  at::Tensor gw_part = at::empty({wsplits * weight.numel()}, f32);
  ATTN_DISPATCH(x.scalar_type(), "spatial_reduction_backward_cuda", [&] {
    using T = scalar_t;
    const T* go = grad_out.const_data_ptr<T>();
    const T* nw = norm_weight.const_data_ptr<T>();
    const T* nb = norm_bias.const_data_ptr<T>();
    sr_norm_backward_kernel<T><<<row_blocks(g.M), kRowWarps * 32, 0, stream>>>(
        go, y.const_data_ptr<float>(), stats.const_data_ptr<float>(), nw, nb, dy.data_ptr<float>(), g.M, g.C,
        linear);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const dim3 cgrid(static_cast<unsigned int>(col_blocks), static_cast<unsigned int>(csplits));
    sr_column_sums_kernel<T><<<cgrid, kColThreads, 0, stream>>>(
        go, y.const_data_ptr<float>(), stats.const_data_ptr<float>(), nw, nb,
        bias_grad ? dy.const_data_ptr<float>() : nullptr, col_part.data_ptr<float>(), g.M, g.C, rows_per_split,
        linear);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const float* cp = col_part.const_data_ptr<float>();
    sr_sum_splits_kernel<T><<<elem_blocks(g.C), kElemThreads, 0, stream>>>(cp, static_cast<int>(csplits), g.C,
                                                                            grad_nw.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sr_sum_splits_kernel<T><<<elem_blocks(g.C), kElemThreads, 0, stream>>>(
        cp + csplits * g.C, static_cast<int>(csplits), g.C, grad_nb.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (bias_grad) {
      sr_sum_splits_kernel<T><<<elem_blocks(g.C), kElemThreads, 0, stream>>>(
          cp + 2 * csplits * g.C, static_cast<int>(csplits), g.C, grad_bias.data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }

    const Weight<T> w{weight.const_data_ptr<T>(), g.C, g.k * g.k};
    const MatL<true> dyT{{dy.const_data_ptr<float>(), 1, g.C}};   // dY^T (co, m)
    const MatL<false> dyL{{dy.const_data_ptr<float>(), g.C, 1}};  // dY (m, co)
    const StoreGradWeight<T> gw_store{gw_part.data_ptr<float>(), w, weight.numel()};
    if (linear) {
      at::Tensor pooled = at::empty({g.M, g.C}, f32);
      sr_pool_kernel<T><<<elem_blocks(pooled.numel()), kElemThreads, 0, stream>>>(
          x.const_data_ptr<T>(), pooled.data_ptr<float>(), g.B, g.H, g.W, g.C);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      launch_gemm(stream, g.C, g.K, g.M, wsplits, wr_split, dyT, MatR<true>{{pooled.const_data_ptr<float>(), g.C, 1}},
                  gw_store);
      at::Tensor dpooled = pooled;  // reused: the grad_weight product above has consumed it (same stream)
      launch_gemm(stream, g.M, g.K, g.C, 1, g.C, dyL, WeightCK<T>{w}, StoreF32{dpooled.data_ptr<float>(), g.C, 0});
      sr_pool_backward_kernel<T><<<elem_blocks(x.numel()), kElemThreads, 0, stream>>>(
          dpooled.const_data_ptr<float>(), grad_x.data_ptr<T>(), g.B, g.H, g.W, g.C);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      const Patch<T> p = patch_of(g, x.const_data_ptr<T>());
      launch_gemm(stream, g.C, g.K, g.M, wsplits, wr_split, dyT, PatchR<T>{p}, gw_store);
      launch_gemm(stream, g.M, g.K, g.C, 1, g.C, dyL, WeightCK<T>{w}, StoreGradX<T>{grad_x.data_ptr<T>(), p});
    }
    sr_sum_splits_kernel<T><<<elem_blocks(weight.numel()), kElemThreads, 0, stream>>>(
        gw_part.const_data_ptr<float>(), wsplits, weight.numel(), grad_weight.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_x, grad_weight, grad_bias, grad_nw, grad_nb};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastops, CUDA, m) {
  m.impl("spatial_reduction", &spatial_reduction_cuda);
  m.impl("spatial_reduction_backward", &spatial_reduction_backward_cuda);
}

}  // namespace fastops
