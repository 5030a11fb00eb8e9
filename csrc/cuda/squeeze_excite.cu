// Squeeze-and-excitation on CUDA: forward and backward, NCHW and channels_last, float / half / bf16
// (the oracle: fastops/reference/squeeze_excite.py).
//
// Forward, three steps:
//   1. pooled[n, c] = mean_hw x (fp32). NCHW: a warp per (plane, split of the plane), V-wide loads along the
//      plane. channels_last: a (TX x TY) block per (n, tile of TX*V channels, split of the pixels); the TX
//      threads of a row read TX*V adjacent channels of one pixel, the TY rows take every TY-th pixel, and
//      shared memory sums the rows. A plane split over several warps / blocks leaves one fp32 partial per
//      split and a second kernel adds them in order (deterministic, no atomics).
//   2. The per-sample MLP z1 = w1 p + b1, h = act(z1), z2 = w2 h + b2, g = gate(z2), all fp32, as two
//      launches of a small tiled fp32 GEMM whose epilogue adds the bias and applies the activation (see
//      "Channel MLP" below: batched over N it is a real GEMM, and written here it never uses TF32).
//   3. out = out_act(x * g[n, c] + residual): one elementwise pass, 16-byte loads and stores.
// Backward: dg[n, c] = sum_hw dy * x (the reduction kernels of step 1, which also write grad_residual = dy),
// the MLP backward (GEMMs of the same kernel plus an activation-derivative kernel), then one elementwise
// pass gx = dy * g + dp / HW (dy read back from grad_residual when that exists: one stream instead of two).
//
// The channel MLP kernels (fp32 GEMM, activation derivative) and the activation-name parser are shared
// with cbam.cu through cuda/channel_attn.cuh.
//
// Accumulation is fp32. Element offsets are int64; the elementwise passes decompose their index in 32 bits
// when x has fewer than 2^31 elements. Every kernel loops grid-stride, so grids stay within CUDA's limits.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <string_view>
#include <tuple>

#include "common.h"
#include "cuda/channel_attn.cuh"

namespace fastops {

namespace {

using namespace attn_cuda;

// Grid of an elementwise pass: enough blocks to fill the GPU, each thread then loops.
inline unsigned int elementwise_blocks(int64_t units) { return blocks_for(units, kThreads, sm_count() * 16); }

// Position (a, b, n) of flat element i of an (n, b, a) array: NCHW a = pixel, b = channel; channels_last
// a = channel, b = pixel. next() steps to element i + 1 without dividing.
template <typename I>
struct Pos3 {
  I a, b, n;
  __device__ __forceinline__ Pos3(I i, I A, I B) {
    const I t = i / A;
    a = i - t * A;
    n = t / B;
    b = t - n * B;
  }
  __device__ __forceinline__ void next(I A, I B) {
    if (++a == A) {
      a = 0;
      if (++b == B) {
        b = 0;
        ++n;
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------------
// Activations (fp32). --use_fast_math turns expf into __expf; the errors stay far below the fp32 tolerance.

__device__ __forceinline__ float sigmoidf_(float z) { return 1.f / (1.f + __expf(-z)); }

__device__ __forceinline__ float act_fwd(Act a, float z) {
  switch (a) {
    case Act::kRelu: return z < 0.f ? 0.f : z;  // NaN stays NaN, as torch.relu
    case Act::kSilu: return z * sigmoidf_(z);
    case Act::kGelu: return 0.5f * z * (1.f + erff(z * 0.70710678118654752f));
    case Act::kSigmoid: return sigmoidf_(z);
    case Act::kHardSigmoid: return hard_sigmoidf_(z);
    default: return z;
  }
}

// d act(z) / dz, with torch's conventions (relu' = [z > 0], hard_sigmoid' = 1/6 on -3 < z < 3).
__device__ __forceinline__ float act_grad(Act a, float z) {
  switch (a) {
    case Act::kRelu: return z > 0.f ? 1.f : 0.f;
    case Act::kSilu: {
      const float s = sigmoidf_(z);
      return s * (1.f + z * (1.f - s));
    }
    case Act::kGelu: {
      const float cdf = 0.5f * (1.f + erff(z * 0.70710678118654752f));
      const float pdf = 0.39894228040143268f * __expf(-0.5f * z * z);
      return cdf + z * pdf;
    }
    case Act::kSigmoid: {
      const float s = sigmoidf_(z);
      return s * (1.f - s);
    }
    case Act::kHardSigmoid: return (z > -3.f && z < 3.f) ? (1.f / 6.f) : 0.f;
    default: return 1.f;
  }
}

// ---------------------------------------------------------------------------------------------------
// Channel MLP: C = A @ B with strided fp32 operands. A 64 x 64 output tile per 256-thread block, 4 x 4
// outputs per thread (rows ty + 16 i, columns tx + 16 j, so shared-memory reads are broadcasts or
// conflict-free), K in steps of 16 through shared memory. Each operand tile is loaded with the index
// that has stride 1 running fastest across threads, so both A and A^T (W and W^T) load coalesced. The
// summation order over K is fixed, so results are deterministic (cbam relies on this: its backward
// recomputes ca bit-identically to find the channel-max ties).
// The MLP is small next to the passes over x for early layers but not for late ones (N*C*R MACs per
// layer against N*C*H*W elements); a hand-written GEMM keeps it fp32 (cuBLAS / cuDNN would switch to
// TF32 under torch's allow_tf32 flags) and fuses bias and activation.

constexpr int kGemmBM = 64, kGemmBN = 64, kGemmBK = 16;

__global__ void __launch_bounds__(kThreads)
gemm_f32_kernel(const int64_t M, const int64_t J, const int64_t K, const float* __restrict__ A, const int64_t sam,
                const int64_t sak, const float* __restrict__ B, const int64_t sbk, const int64_t sbj,
                const float* __restrict__ bias, const float bias_mult, float* __restrict__ pre,
                float* __restrict__ post, const Act act) {
  __shared__ float As[kGemmBK][kGemmBM + 4];
  __shared__ float Bs[kGemmBK][kGemmBN + 4];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t m0 = int64_t(blockIdx.x) * kGemmBM, j0 = int64_t(blockIdx.y) * kGemmBN;
  const bool a_k_fast = sak == 1, b_k_fast = sbk == 1;
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

  for (int64_t k0 = 0; k0 < K; k0 += kGemmBK) {
#pragma unroll
    for (int l = 0; l < (kGemmBM * kGemmBK) / kThreads; ++l) {
      const int e = tid + l * kThreads;
      const int am = a_k_fast ? e / kGemmBK : e % kGemmBM;
      const int ak = a_k_fast ? e % kGemmBK : e / kGemmBM;
      const int64_t m = m0 + am, ka = k0 + ak;
      As[ak][am] = (m < M && ka < K) ? A[m * sam + ka * sak] : 0.f;
      const int bj = b_k_fast ? e / kGemmBK : e % kGemmBN;
      const int bk = b_k_fast ? e % kGemmBK : e / kGemmBN;
      const int64_t j = j0 + bj, kb = k0 + bk;
      Bs[bk][bj] = (j < J && kb < K) ? B[kb * sbk + j * sbj] : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kGemmBK; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = As[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = Bs[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();  // the tiles are overwritten next step
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + ty + 16 * i;
    if (m >= M) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t jj = j0 + tx + 16 * j;
      if (jj >= J) continue;
      const float z = acc[i][j] + (bias != nullptr ? bias_mult * bias[jj] : 0.f);
      if (pre != nullptr) pre[m * J + jj] = z;
      if (post != nullptr) post[m * J + jj] = act_fwd(act, z);
    }
  }
}

__global__ void __launch_bounds__(kThreads)
act_backward_kernel(const float* __restrict__ grad, const int64_t grad_row_div, const float* __restrict__ z,
                    float* __restrict__ out, const int64_t rows, const int64_t cols, const Act act) {
  const int64_t total = rows * cols;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, c = i - r * cols;
    out[i] = grad[(r / grad_row_div) * cols + c] * act_grad(act, z[i]);
  }
}

// ---------------------------------------------------------------------------------------------------
// Step 1 / backward reduction: per (n, c), the sum over pixels of x (forward) or of dy * x (backward).

template <typename T>
struct SeReduceArgs {
  const T* x;
  const T* go;   // backward: grad_out
  const T* out;  // backward, out_act == relu: dy = go * (out > 0); else null
  T* gres;       // backward with a residual: dy is written here; else null
};

// The V elements at off: adds x (forward) or dy * x (backward) into acc[j] (ACC_PER_ELEM) or acc[0].
template <bool BWD, bool ACC_PER_ELEM, int V, typename T>
__device__ __forceinline__ void se_reduce_vec(const SeReduceArgs<T>& a, int64_t off, float* acc) {
  const Vec<T, V> xv = load_vec<V>(a.x + off);
  if constexpr (BWD) {
    const Vec<T, V> gv = load_vec<V>(a.go + off);
    Vec<T, V> ov{};
    if (a.out != nullptr) ov = load_vec<V>(a.out + off);
    Vec<T, V> dy;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const bool keep = a.out == nullptr || static_cast<float>(ov.v[j]) > 0.f;
      dy.v[j] = keep ? gv.v[j] : static_cast<T>(0.f);
      acc[ACC_PER_ELEM ? j : 0] += static_cast<float>(dy.v[j]) * static_cast<float>(xv.v[j]);
    }
    if (a.gres != nullptr) store_vec<V>(a.gres + off, dy);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) acc[ACC_PER_ELEM ? j : 0] += static_cast<float>(xv.v[j]);
  }
}

// NCHW: a warp per (plane, split); the split covers vectors [s*seg, (s+1)*seg) of the plane's HW / V.
// dst[plane * S + s] = scale * sum.
template <typename T, int V, bool BWD>
__global__ void __launch_bounds__(kThreads)
se_reduce_nchw_kernel(const SeReduceArgs<T> a, float* __restrict__ dst, const int64_t planes, const int64_t HW,
                      const int64_t S, const int64_t seg, const float scale) {
  const int lane = threadIdx.x & 31;
  const int64_t wpb = blockDim.x >> 5;
  const int64_t items = planes * S, nvec = HW / V;
  for (int64_t item = int64_t(blockIdx.x) * wpb + (threadIdx.x >> 5); item < items; item += int64_t(gridDim.x) * wpb) {
    const int64_t plane = item / S, s = item - plane * S;
    const int64_t v1 = (s + 1) * seg < nvec ? (s + 1) * seg : nvec;
    float acc = 0.f;
    for (int64_t v = s * seg + lane; v < v1; v += 32) se_reduce_vec<BWD, false, V>(a, plane * HW + v * V, &acc);
    acc = warp_sum(acc);  // item is warp-uniform, so the whole warp is here
    if (lane == 0) dst[item] = acc * scale;
  }
}

// channels_last: a (TX, TY) block per (n, channel tile of TX*V, split of seg pixels).
// dst[(n*C + c) * S + s] = scale * sum.
template <typename T, int V, bool BWD>
__global__ void __launch_bounds__(kThreads)
se_reduce_nhwc_kernel(const SeReduceArgs<T> a, float* __restrict__ dst, const int64_t N, const int64_t C,
                      const int64_t HW, const int64_t S, const int64_t seg, const float scale) {
  __shared__ float red[kThreads * V];
  const int TX = blockDim.x, TY = blockDim.y, tx = threadIdx.x, ty = threadIdx.y;
  const int tid = ty * TX + tx;
  const int64_t cvec = C / V, ctiles = ceil_div(cvec, TX);
  const int64_t items = N * ctiles * S;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t s = item % S, r = item / S;
    const int64_t ct = r % ctiles, n = r / ctiles;
    const int64_t cv = ct * TX + tx;
    float acc[V];
#pragma unroll
    for (int j = 0; j < V; ++j) acc[j] = 0.f;
    if (cv < cvec) {
      const int64_t p1 = (s + 1) * seg < HW ? (s + 1) * seg : HW;
      for (int64_t p = s * seg + ty; p < p1; p += TY) se_reduce_vec<BWD, true, V>(a, (n * HW + p) * C + cv * V, acc);
    }
    __syncthreads();  // the previous item's reads of red are done
#pragma unroll
    for (int j = 0; j < V; ++j) red[tid * V + j] = acc[j];
    __syncthreads();
    // Element e = tx * V + j of the tile is channel ct*TX*V + e; rows are summed in order.
    for (int e = tid; e < TX * V; e += TX * TY) {
      float sum = 0.f;
      for (int t = 0; t < TY; ++t) sum += red[t * TX * V + e];
      const int64_t c = ct * TX * V + e;
      if (c < C) dst[(n * C + c) * S + s] = sum * scale;
    }
  }
}

// dst[k] = scale * sum_s partial[k * S + s], in order.
__global__ void __launch_bounds__(kThreads)
sum_splits_kernel(const float* __restrict__ partial, float* __restrict__ dst, const int64_t K, const int64_t S,
                  const float scale) {
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < K; k += int64_t(gridDim.x) * blockDim.x) {
    const float* p = partial + k * S;
    float sum = 0.f;
    for (int64_t s = 0; s < S; ++s) sum += p[s];
    dst[k] = sum * scale;
  }
}

template <typename T, int V, bool BWD>
void launch_se_reduce(const SeReduceArgs<T>& a, float* dst_final, float scale, int64_t N, int64_t C, int64_t HW,
                      bool cl, const at::TensorOptions& f32, cudaStream_t stream) {
  const int64_t sms = sm_count();
  const int64_t K = N * C;
  at::Tensor partial;
  int64_t S;
  if (!cl) {
    const int64_t nvec = HW / V;
    S = pick_splits(K, nvec, 32 * 4, sms * 64);  // a warp per item; 64 warps fill an SM
    const int64_t seg = ceil_div(nvec, S);
    S = ceil_div(nvec, seg);
    float* dst = dst_final;
    if (S > 1) {
      partial = at::empty({K * S}, f32);
      dst = partial.data_ptr<float>();
    }
    se_reduce_nchw_kernel<T, V, BWD><<<blocks_for(K * S, kThreads / 32), kThreads, 0, stream>>>(
        a, dst, K, HW, S, seg, S > 1 ? 1.f : scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    const int64_t cvec = C / V;
    const int TX = static_cast<int>(std::min<int64_t>(32, next_pow2(cvec))), TY = kThreads / TX;
    const int64_t ctiles = ceil_div(cvec, TX);
    S = pick_splits(N * ctiles, HW, int64_t(TY) * 8, sms * 8);  // 8 blocks of 256 threads fill an SM
    const int64_t seg = ceil_div(HW, S);
    S = ceil_div(HW, seg);
    float* dst = dst_final;
    if (S > 1) {
      partial = at::empty({K * S}, f32);
      dst = partial.data_ptr<float>();
    }
    se_reduce_nhwc_kernel<T, V, BWD><<<blocks_for(N * ctiles * S, 1), dim3(TX, TY), 0, stream>>>(
        a, dst, N, C, HW, S, seg, S > 1 ? 1.f : scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (S > 1) {
    sum_splits_kernel<<<blocks_for(K, kThreads), kThreads, 0, stream>>>(partial.const_data_ptr<float>(), dst_final,
                                                                       K, S, scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T, bool BWD>
void se_reduce(const SeReduceArgs<T>& a, float* dst, float scale, int64_t N, int64_t C, int64_t HW, bool cl,
               const at::TensorOptions& f32, cudaStream_t stream) {
  const int v = pick_vec<T>(cl ? C : HW, {a.x, a.go, a.out, a.gres});
#define SE_LAUNCH(V) launch_se_reduce<T, V, BWD>(a, dst, scale, N, C, HW, cl, f32, stream)
  ATTN_DISPATCH_VEC(T, v, SE_LAUNCH)
#undef SE_LAUNCH
}

// ---------------------------------------------------------------------------------------------------
// Step 3 and the backward's gx: elementwise passes over x's memory order. A thread handles V adjacent
// elements (16 bytes) and finds the (n, c) of each by stepping a Pos3; the tail of numel % V elements goes
// one at a time.

template <typename T>
struct SeScaleArgs {
  const T* x;
  const T* res;  // null without a residual
  const float* g;
  T* out;
  bool relu;
};

template <int W, typename T, typename I>
__device__ __forceinline__ void se_scale_at(const SeScaleArgs<T>& p, I i, I A, I B, I C, bool cl) {
  Pos3<I> pos(i, A, B);
  const Vec<T, W> xv = load_vec<W>(p.x + i);
  Vec<T, W> rv{};
  if (p.res != nullptr) rv = load_vec<W>(p.res + i);
  Vec<T, W> o;
#pragma unroll
  for (int j = 0; j < W; ++j) {
    float y = static_cast<float>(xv.v[j]) * p.g[pos.n * C + (cl ? pos.a : pos.b)];
    if (p.res != nullptr) y += static_cast<float>(rv.v[j]);
    if (p.relu) y = y < 0.f ? 0.f : y;
    o.v[j] = static_cast<T>(y);
    pos.next(A, B);
  }
  store_vec<W>(p.out + i, o);
}

template <typename T, int V, typename I>
__global__ void __launch_bounds__(kThreads)
se_scale_kernel(const SeScaleArgs<T> p, const I numel, const I A, const I B, const I C, const bool cl) {
  const I tid = static_cast<I>(blockIdx.x) * blockDim.x + threadIdx.x;
  const I stride = static_cast<I>(gridDim.x) * blockDim.x;
  const I nvec = numel / V;
  for (I v = tid; v < nvec; v += stride) se_scale_at<V>(p, v * V, A, B, C, cl);
  if constexpr (V > 1)
    for (I i = nvec * V + tid; i < numel; i += stride) se_scale_at<1>(p, i, A, B, C, cl);
}

template <typename T>
struct SeGradArgs {
  const T* dy;   // grad_out, or grad_residual (already masked) when that exists
  const T* out;  // out_act == relu and dy is grad_out: dy *= (out > 0); else null
  const float* g;
  const float* dp;
  float inv_hw;
  T* gx;
};

template <int W, typename T, typename I>
__device__ __forceinline__ void se_grad_at(const SeGradArgs<T>& p, I i, I A, I B, I C, bool cl) {
  Pos3<I> pos(i, A, B);
  const Vec<T, W> dv = load_vec<W>(p.dy + i);
  Vec<T, W> ov{};
  if (p.out != nullptr) ov = load_vec<W>(p.out + i);
  Vec<T, W> o;
#pragma unroll
  for (int j = 0; j < W; ++j) {
    float d = static_cast<float>(dv.v[j]);
    if (p.out != nullptr && !(static_cast<float>(ov.v[j]) > 0.f)) d = 0.f;
    const I k = pos.n * C + (cl ? pos.a : pos.b);
    o.v[j] = static_cast<T>(d * p.g[k] + p.dp[k] * p.inv_hw);
    pos.next(A, B);
  }
  store_vec<W>(p.gx + i, o);
}

template <typename T, int V, typename I>
__global__ void __launch_bounds__(kThreads)
se_grad_kernel(const SeGradArgs<T> p, const I numel, const I A, const I B, const I C, const bool cl) {
  const I tid = static_cast<I>(blockIdx.x) * blockDim.x + threadIdx.x;
  const I stride = static_cast<I>(gridDim.x) * blockDim.x;
  const I nvec = numel / V;
  for (I v = tid; v < nvec; v += stride) se_grad_at<V>(p, v * V, A, B, C, cl);
  if constexpr (V > 1)
    for (I i = nvec * V + tid; i < numel; i += stride) se_grad_at<1>(p, i, A, B, C, cl);
}

// Launches KERNEL<T, V, I> over numel elements: V = 16 bytes when every pointer allows, else 1; I = uint32_t
// when numel < 2^31 (then i + stride never wraps), else int64_t.
#define SE_LAUNCH_ELEMENTWISE(KERNEL, T, args, aligned, numel, N, C, HW, cl, stream)                          \
  do {                                                                                                        \
    constexpr int VM = kMaxVec<T>;                                                                            \
    const int64_t A_ = (cl) ? (C) : (HW), B_ = (cl) ? (HW) : (C);                                             \
    const unsigned int grid_ = elementwise_blocks((aligned) ? (numel) / VM : (numel));                        \
    if ((numel) < (int64_t(1) << 31)) {                                                                       \
      using I_ = uint32_t;                                                                                    \
      if (aligned) KERNEL<T, VM, I_><<<grid_, kThreads, 0, stream>>>(args, I_(numel), I_(A_), I_(B_), I_(C), cl); \
      else KERNEL<T, 1, I_><<<grid_, kThreads, 0, stream>>>(args, I_(numel), I_(A_), I_(B_), I_(C), cl);      \
    } else {                                                                                                  \
      if (aligned) KERNEL<T, VM, int64_t><<<grid_, kThreads, 0, stream>>>(args, numel, A_, B_, C, cl);         \
      else KERNEL<T, 1, int64_t><<<grid_, kThreads, 0, stream>>>(args, numel, A_, B_, C, cl);                  \
    }                                                                                                         \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                                           \
  } while (0)

// ---------------------------------------------------------------------------------------------------
// Host side.

constexpr const char* kOp = "squeeze_excite";
constexpr const char* kOpBwd = "squeeze_excite_backward";


at::Tensor f32_or_undefined(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->contiguous().to(at::kFloat) : at::Tensor();
}

const float* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr<float>() : nullptr; }

// The MLP on pooled (N, C) fp32: h = act(w1 p + b1) (N, R), g = gate(w2 h + b2) (N, C); z1 / z2 (the
// pre-activations) are kept when keep_pre (the backward needs them).
struct SeMlp {
  at::Tensor w1, b1, w2, b2;  // fp32 copies (or the tensors themselves when already fp32)
  at::Tensor z1, h, z2, g;
};

SeMlp se_mlp_forward(const at::Tensor& pooled, const at::Tensor& w1, const c10::optional<at::Tensor>& b1,
                     const at::Tensor& w2, const c10::optional<at::Tensor>& b2, Act act, Act gate, bool keep_pre,
                     cudaStream_t stream) {
  SeMlp m;
  m.w1 = w1.contiguous().to(at::kFloat);
  m.w2 = w2.contiguous().to(at::kFloat);
  m.b1 = f32_or_undefined(b1);
  m.b2 = f32_or_undefined(b2);
  const int64_t N = pooled.size(0), C = pooled.size(1), R = m.w1.size(0);
  const auto f32 = pooled.options();
  m.h = at::empty({N, R}, f32);
  m.g = at::empty({N, C}, f32);
  if (keep_pre) {
    m.z1 = at::empty({N, R}, f32);
    m.z2 = at::empty({N, C}, f32);
  }
  // z1 (N, R) = p (N, C) @ w1^T: B(k=c, j=r) = w1[r*C + c].
  attn_cuda::gemm_f32(stream, N, R, C, pooled.const_data_ptr<float>(), C, 1, m.w1.const_data_ptr<float>(), 1, C,
                      ptr_or_null(m.b1), 1.f, keep_pre ? m.z1.data_ptr<float>() : nullptr, m.h.data_ptr<float>(), act);
  // z2 (N, C) = h (N, R) @ w2^T: B(k=r, j=c) = w2[c*R + r].
  attn_cuda::gemm_f32(stream, N, C, R, m.h.const_data_ptr<float>(), R, 1, m.w2.const_data_ptr<float>(), 1, R,
                      ptr_or_null(m.b2), 1.f, keep_pre ? m.z2.data_ptr<float>() : nullptr, m.g.data_ptr<float>(), gate);
  return m;
}

std::tuple<at::Tensor, at::Tensor> squeeze_excite_cuda(const at::Tensor& x_in, const at::Tensor& w1,
                                                       const c10::optional<at::Tensor>& b1, const at::Tensor& w2,
                                                       const c10::optional<at::Tensor>& b2,
                                                       const c10::optional<at::Tensor>& residual,
                                                       c10::string_view act_name, c10::string_view gate_name,
                                                       c10::string_view out_act_name) {
  const Act act = attn_cuda::parse_act(act_name, kOp, "act");
  const Act gate = attn_cuda::parse_act(gate_name, kOp, "gate");
  const Act out_act = attn_cuda::parse_act(out_act_name, kOp, "out_act");
  check_mlp_args(kOp, x_in, w1, b1, w2, b2);
  const bool has_res = residual.has_value() && residual->defined();
  if (has_res) {
    TORCH_CHECK(residual->sizes() == x_in.sizes(), "fastops.", kOp, ": residual must have x's shape ", x_in.sizes(),
                ", got ", residual->sizes());
    check_same(kOp, "residual", *residual, x_in);
  }
  const c10::cuda::CUDAGuard guard(x_in.device());
  const bool cl = is_channels_last(x_in);
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor res = has_res ? residual->contiguous(fmt) : at::Tensor();
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(fmt));
  at::Tensor pooled = at::empty({N, C}, f32);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  ATTN_DISPATCH(x.scalar_type(), "squeeze_excite_cuda", [&] {
    using T = scalar_t;
    const SeReduceArgs<T> ra{x.const_data_ptr<T>(), nullptr, nullptr, nullptr};
    se_reduce<T, false>(ra, pooled.data_ptr<float>(), 1.f / static_cast<float>(HW), N, C, HW, cl, f32, stream);
  });
  const SeMlp m = se_mlp_forward(pooled, w1, b1, w2, b2, act, gate, /*keep_pre=*/false, stream);
  ATTN_DISPATCH(x.scalar_type(), "squeeze_excite_cuda", [&] {
    using T = scalar_t;
    const SeScaleArgs<T> p{x.const_data_ptr<T>(), has_res ? res.const_data_ptr<T>() : nullptr,
                           m.g.const_data_ptr<float>(), out.data_ptr<T>(), out_act == Act::kRelu};
    const bool aligned = aligned_to(p.x, 16) && aligned_to(p.res, 16) && aligned_to(p.out, 16);
    const int64_t numel = x.numel();
    SE_LAUNCH_ELEMENTWISE(se_scale_kernel, T, p, aligned, numel, N, C, HW, cl, stream);
  });
  return {out, pooled};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> squeeze_excite_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x_in, const at::Tensor& out_in, const at::Tensor& pooled_in,
    const at::Tensor& w1, const c10::optional<at::Tensor>& b1, const at::Tensor& w2,
    const c10::optional<at::Tensor>& b2, bool has_residual, c10::string_view act_name, c10::string_view gate_name,
    c10::string_view out_act_name) {
  const Act act = attn_cuda::parse_act(act_name, kOpBwd, "act");
  const Act gate = attn_cuda::parse_act(gate_name, kOpBwd, "gate");
  const Act out_act = attn_cuda::parse_act(out_act_name, kOpBwd, "out_act");
  check_mlp_args(kOpBwd, x_in, w1, b1, w2, b2);
  TORCH_CHECK(grad_out.sizes() == x_in.sizes(), "fastops.", kOpBwd, ": grad_out must have x's shape ", x_in.sizes(),
              ", got ", grad_out.sizes());
  check_same(kOpBwd, "grad_out", grad_out, x_in);
  const bool relu = out_act == Act::kRelu;
  if (relu) {
    TORCH_CHECK(out_in.sizes() == x_in.sizes(), "fastops.", kOpBwd, ": out must have x's shape ", x_in.sizes(),
                ", got ", out_in.sizes());
    check_same(kOpBwd, "out", out_in, x_in);
  }
  const int64_t N = x_in.size(0), C = x_in.size(1), HW = x_in.size(2) * x_in.size(3);
  TORCH_CHECK(pooled_in.dim() == 2 && pooled_in.size(0) == N && pooled_in.size(1) == C &&
                  pooled_in.scalar_type() == at::kFloat && pooled_in.device() == x_in.device(),
              "fastops.", kOpBwd, ": pooled must be a float32 (", N, ", ", C, ") tensor on x's device, got ",
              pooled_in.scalar_type(), " ", pooled_in.sizes(), " on ", pooled_in.device());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const bool cl = is_channels_last(x_in);
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor go = grad_out.contiguous(fmt);
  const at::Tensor out = relu ? out_in.contiguous(fmt) : at::Tensor();
  const at::Tensor pooled = pooled_in.contiguous();
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor gx = at::empty(x.sizes(), x.options().memory_format(fmt));
  at::Tensor gres = has_residual ? at::empty(x.sizes(), x.options().memory_format(fmt)) : x.new_empty({0});
  at::Tensor dg = at::empty({N, C}, f32);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  // dg = sum_hw dy * x (and grad_residual = dy).
  ATTN_DISPATCH(x.scalar_type(), "squeeze_excite_backward_cuda", [&] {
    using T = scalar_t;
    const SeReduceArgs<T> ra{x.const_data_ptr<T>(), go.const_data_ptr<T>(), relu ? out.const_data_ptr<T>() : nullptr,
                             has_residual ? gres.data_ptr<T>() : nullptr};
    se_reduce<T, true>(ra, dg.data_ptr<float>(), 1.f, N, C, HW, cl, f32, stream);
  });

  // MLP backward, fp32.
  const SeMlp m = se_mlp_forward(pooled, w1, b1, w2, b2, act, gate, /*keep_pre=*/true, stream);
  const int64_t R = m.w1.size(0);
  at::Tensor dz2 = at::empty({N, C}, f32);
  attn_cuda::act_backward_f32(stream, dg.const_data_ptr<float>(), 1, m.z2.const_data_ptr<float>(),
                              dz2.data_ptr<float>(), N, C, gate);
  at::Tensor gw2 = at::empty({C, R}, f32);  // dz2^T (C, N) @ h (N, R)
  attn_cuda::gemm_f32(stream, C, R, N, dz2.const_data_ptr<float>(), 1, C, m.h.const_data_ptr<float>(), R, 1,
                      nullptr, 0.f, gw2.data_ptr<float>(), nullptr, Act::kNone);
  at::Tensor dh = at::empty({N, R}, f32);  // dz2 (N, C) @ w2 (C, R)
  attn_cuda::gemm_f32(stream, N, R, C, dz2.const_data_ptr<float>(), C, 1, m.w2.const_data_ptr<float>(), R, 1,
                      nullptr, 0.f, dh.data_ptr<float>(), nullptr, Act::kNone);
  at::Tensor dz1 = at::empty({N, R}, f32);
  attn_cuda::act_backward_f32(stream, dh.const_data_ptr<float>(), 1, m.z1.const_data_ptr<float>(),
                              dz1.data_ptr<float>(), N, R, act);
  at::Tensor gw1 = at::empty({R, C}, f32);  // dz1^T (R, N) @ p (N, C)
  attn_cuda::gemm_f32(stream, R, C, N, dz1.const_data_ptr<float>(), 1, R, pooled.const_data_ptr<float>(), C, 1,
                      nullptr, 0.f, gw1.data_ptr<float>(), nullptr, Act::kNone);
  at::Tensor dp = at::empty({N, C}, f32);  // dz1 (N, R) @ w1 (R, C)
  attn_cuda::gemm_f32(stream, N, C, R, dz1.const_data_ptr<float>(), R, 1, m.w1.const_data_ptr<float>(), C, 1,
                      nullptr, 0.f, dp.data_ptr<float>(), nullptr, Act::kNone);
  // Bias grads: column sums over the batch of small (N, R) / (N, C) fp32 maps (ATen reductions, fp32).
  const at::Tensor gb1 = dz1.sum(0);
  const at::Tensor gb2 = dz2.sum(0);

  // gx = dy * g + dp / HW.
  ATTN_DISPATCH(x.scalar_type(), "squeeze_excite_backward_cuda", [&] {
    using T = scalar_t;
    const bool from_gres = has_residual;  // grad_residual holds dy already masked
    const SeGradArgs<T> p{from_gres ? gres.const_data_ptr<T>() : go.const_data_ptr<T>(),
                          (relu && !from_gres) ? out.const_data_ptr<T>() : nullptr,
                          m.g.const_data_ptr<float>(),
                          dp.const_data_ptr<float>(),
                          1.f / static_cast<float>(HW),
                          gx.data_ptr<T>()};
    const bool aligned = aligned_to(p.dy, 16) && aligned_to(p.out, 16) && aligned_to(p.gx, 16);
    const int64_t numel = x.numel();
    SE_LAUNCH_ELEMENTWISE(se_grad_kernel, T, p, aligned, numel, N, C, HW, cl, stream);
  });
  const auto wt = w1.scalar_type();
  return {gx, gw1.to(wt), gb1.to(wt), gw2.to(wt), gb2.to(wt), gres};
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// Shared helpers (definitions).
namespace attn_cuda {

Act parse_act(std::string_view name, const char* op, std::string_view arg) {
  if (arg == "act") {
    if (name == "relu") return Act::kRelu;
    if (name == "silu") return Act::kSilu;
    if (name == "gelu") return Act::kGelu;
    TORCH_CHECK(false, "fastops.", op, ": act must be one of relu, silu, gelu, got '", name, "'");
  } else if (arg == "gate") {
    if (name == "sigmoid") return Act::kSigmoid;
    if (name == "hard_sigmoid") return Act::kHardSigmoid;
    TORCH_CHECK(false, "fastops.", op, ": gate must be one of sigmoid, hard_sigmoid, got '", name, "'");
  } else {
    if (name == "none") return Act::kNone;
    if (name == "relu") return Act::kRelu;
    TORCH_CHECK(false, "fastops.", op, ": ", arg, " must be one of none, relu, got '", name, "'");
  }
  return Act::kNone;  // unreachable
}

void gemm_f32(cudaStream_t stream, int64_t M, int64_t J, int64_t K, const float* A, int64_t sam, int64_t sak,
              const float* B, int64_t sbk, int64_t sbj, const float* bias, float bias_mult, float* pre,
              float* post, Act act) {
  if (M <= 0 || J <= 0) return;
  const int64_t gm = ceil_div(M, kGemmBM), gj = ceil_div(J, kGemmBN);
  TORCH_CHECK(gm < (int64_t(1) << 31) && gj <= 65535, "fastops: channel MLP of ", M, " x ", J,
              " outputs is too large for one launch");
  gemm_f32_kernel<<<dim3(static_cast<unsigned int>(gm), static_cast<unsigned int>(gj)), kThreads, 0, stream>>>(
      M, J, K, A, sam, sak, B, sbk, sbj, bias, bias_mult, pre, post, act);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void act_backward_f32(cudaStream_t stream, const float* grad, int64_t grad_row_div, const float* z, float* out,
                      int64_t rows, int64_t cols, Act act) {
  if (rows <= 0 || cols <= 0) return;
  act_backward_kernel<<<blocks_for(rows * cols, kThreads, sm_count() * 8), kThreads, 0, stream>>>(
      grad, grad_row_div, z, out, rows, cols, act);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace attn_cuda

TORCH_LIBRARY_IMPL(fastops, CUDA, m) {
  m.impl("squeeze_excite", &squeeze_excite_cuda);
  m.impl("squeeze_excite_backward", &squeeze_excite_backward_cuda);
}

}  // namespace fastops
