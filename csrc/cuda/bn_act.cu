// BatchNorm (+ residual) + activation on CUDA: forward and backward, NCHW and channels_last, float / half /
// bf16 (the oracle: fastops/reference/bn_act.py). Every kernel here is hand-written; the passes over x are
// the per-channel elementwise / reduction kernels of cuda/channel_pass.cuh.
//
// Forward, training: (1) a per-channel reduction computes the batch mean and biased variance with
// Welford's update per thread and Chan's pairwise merge across threads and splits, all fp32 and in a fixed
// order (partials to a buffer, then an in-order combine: deterministic, no atomics); its last stage writes
// save_mean / save_var. The reduction runs on x - k with k = the channel's first element, and the
// normalisation subtracts k and then the mean of x - k: with a mean far from 0 next to the spread (say 1000
// and 0.1) this keeps the digits an fp32 mean of x would lose. (2) One elementwise pass:
// out = act((x - mean) * rsqrt(var + eps) * weight + bias + residual). Eval: pass (2) alone, on the
// running statistics.
// Backward: (1) a reduction of dz = grad_out * act'(z) (z recomputed from x and the saved statistics) and
// of dz * xhat per channel; those are grad_bias and grad_weight. (2) One elementwise pass for grad_x (and
// grad_residual = dz): eval dz * w * rstd; training w * rstd * (dz - sum(dz) / M - xhat * sum(dz xhat) / M).
//
// Vector loads / stores are 16 bytes wide where the contiguous dimension and the pointers allow. Element
// offsets are int64 (the elementwise passes index in 32 bits when x has fewer than 2^31 elements); every
// kernel loops grid-stride, so grids stay within CUDA's limits for any shape.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>
#include <string>
#include <tuple>

#include "bn_act_common.h"
#include "common.h"
#include "conv_bn_checks.h"
#include "cuda/channel_pass.cuh"

namespace fastops {
namespace {

using bnact::Act;
using namespace chpass;

// Per-channel fp32 parameters; null pointers stand for the defaults (weight 1, bias 0).
struct BnParams {
  const float* mean;     // training forward: k, the channel's first element (see the header comment)
  const float* mean_lo;  // training forward: the mean of x - k; else null (0)
  const float* var;
  const float* w;
  const float* b;
  float eps;
};

__device__ __forceinline__ float rstd_of(const BnParams& p, int64_t c) { return rsqrtf(p.var[c] + p.eps); }
__device__ __forceinline__ float w_of(const BnParams& p, int64_t c) { return p.w != nullptr ? p.w[c] : 1.f; }
__device__ __forceinline__ float b_of(const BnParams& p, int64_t c) { return p.b != nullptr ? p.b[c] : 0.f; }

// ---------------------------------------------------------------------------------------------------
// Forward.

// Welford on x - k (for the variance and the normalisation) and, alongside, a running mean of x itself:
// near-zero means come out of the latter with their own digits, where k + mean(x - k) carries the
// rounding of mean(x - k) ~ eps * |k|; finalize keeps whichever the data favours.
struct ShiftedWelford {
  float n, mean, m2, mean_x;
  static __device__ __forceinline__ ShiftedWelford identity() { return {0.f, 0.f, 0.f, 0.f}; }
  __device__ __forceinline__ void add(float x, float k) {
    n += 1.f;
    const float y = x - k, d = y - mean;
    mean += d / n;
    m2 += d * (y - mean);
    mean_x += (x - mean_x) / n;
  }
  __device__ __forceinline__ void merge(const ShiftedWelford& o) {
    if (o.n == 0.f) return;
    if (n == 0.f) {
      *this = o;
      return;
    }
    const float nn = n + o.n, d = o.mean - mean, f = o.n / nn;
    mean += d * f;
    m2 += o.m2 + d * d * n * f;
    mean_x += (o.mean_x - mean_x) * f;
    n = nn;
  }
};

template <typename T>
struct StatsOp {
  using State = ShiftedWelford;
  const T* x;
  int64_t kstride;  // channel c's first element is x[c * kstride]
  float* mean_out;
  float* var_out;
  float* k_out;
  float* mean_lo_out;

  __device__ __forceinline__ float k_of(int64_t c) const { return static_cast<float>(x[c * kstride]); }
  template <int V>
  __device__ __forceinline__ void accumulate(State* st, int64_t off, int64_t c, int cstep) const {
    const Vec<T, V> xv = load_vec<V>(x + off);
#pragma unroll
    for (int j = 0; j < V; ++j) st[j * cstep].add(static_cast<float>(xv.v[j]), k_of(c + j * cstep));
  }
  __device__ __forceinline__ void finalize(int64_t c, const State& st) const {
    const float k = k_of(c);
    // |mean(x)| below |mean(x - k)|: the direct mean has the smaller rounding error.
    mean_out[c] = fabsf(st.mean_x) < fabsf(st.mean) ? st.mean_x : k + st.mean;
    var_out[c] = st.m2 / st.n;  // biased; the host refuses M == 0 in training
    k_out[c] = k;
    mean_lo_out[c] = st.mean;
  }
};

template <typename T>
struct BnForward {
  const T* x;
  const T* res;  // null without residual
  T* out;
  BnParams p;
  Act act;

  template <int V>
  __device__ __forceinline__ void apply(int64_t off, int64_t c, int cstep) const {
    const Vec<T, V> xv = load_vec<V>(x + off);
    Vec<T, V> rv{};
    if (res != nullptr) rv = load_vec<V>(res + off);
    Vec<T, V> ov;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const int64_t ch = c + j * cstep;
      const float scale = rstd_of(p, ch) * w_of(p, ch);
      float d = static_cast<float>(xv.v[j]) - p.mean[ch];
      if (p.mean_lo != nullptr) d -= p.mean_lo[ch];
      float z = d * scale + b_of(p, ch);
      if (res != nullptr) z += static_cast<float>(rv.v[j]);
      ov.v[j] = static_cast<T>(bnact::act_forward<float>(act, z));
    }
    store_vec<V>(out + off, ov);
  }
};

// ---------------------------------------------------------------------------------------------------
// Backward.

// dz and xhat of V elements (shared by the reduction and the elementwise pass, so both see the same dz).
template <typename T, int V>
__device__ __forceinline__ void dz_xhat(const T* go, const T* x, const T* res, const BnParams& p, Act act, int64_t off,
                                        int64_t c, int cstep, float* dz, float* xhat) {
  const Vec<T, V> gv = load_vec<V>(go + off);
  const Vec<T, V> xv = load_vec<V>(x + off);
  Vec<T, V> rv{};
  if (res != nullptr && act != Act::kNone) rv = load_vec<V>(res + off);
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const int64_t ch = c + j * cstep;
    xhat[j] = (static_cast<float>(xv.v[j]) - p.mean[ch]) * rstd_of(p, ch);
    float d = static_cast<float>(gv.v[j]);
    if (act != Act::kNone) {
      float z = xhat[j] * w_of(p, ch) + b_of(p, ch);
      if (res != nullptr) z += static_cast<float>(rv.v[j]);
      d *= bnact::act_grad<float>(act, z);
    }
    dz[j] = d;
  }
}

template <typename T>
struct BwdReduceOp {
  using State = Sum2;  // a: sum dz, b: sum dz * xhat
  const T* go;
  const T* x;
  const T* res;
  BnParams p;
  Act act;
  float* gw_out;
  float* gb_out;

  template <int V>
  __device__ __forceinline__ void accumulate(State* st, int64_t off, int64_t c, int cstep) const {
    float dz[V], xhat[V];
    dz_xhat<T, V>(go, x, res, p, act, off, c, cstep, dz, xhat);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      st[j * cstep].a += dz[j];
      st[j * cstep].b += dz[j] * xhat[j];
    }
  }
  __device__ __forceinline__ void finalize(int64_t c, const State& st) const {
    gb_out[c] = st.a;
    gw_out[c] = st.b;
  }
};

template <typename T>
struct BnBackward {
  const T* go;
  const T* x;
  const T* res;
  T* gx;
  T* gres;  // null without residual
  BnParams p;
  const float* sum_dz;    // grad_bias
  const float* sum_dzx;   // grad_weight
  float inv_m;            // 1 / (N * H * W)
  Act act;
  bool training;

  template <int V>
  __device__ __forceinline__ void apply(int64_t off, int64_t c, int cstep) const {
    float dz[V], xhat[V];
    dz_xhat<T, V>(go, x, res, p, act, off, c, cstep, dz, xhat);
    Vec<T, V> gv, rv;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const int64_t ch = c + j * cstep;
      const float wr = w_of(p, ch) * rstd_of(p, ch);
      const float g = training ? wr * (dz[j] - sum_dz[ch] * inv_m - xhat[j] * (sum_dzx[ch] * inv_m)) : dz[j] * wr;
      gv.v[j] = static_cast<T>(g);
      rv.v[j] = static_cast<T>(dz[j]);
    }
    store_vec<V>(gx + off, gv);
    if (gres != nullptr) store_vec<V>(gres + off, rv);
  }
};

// ---------------------------------------------------------------------------------------------------
// Host side: argument checks (the Python front checks first; these guard direct torch.ops calls).

using convbn::check_like;
using convbn::opt;
constexpr convbn::Dev kDev = convbn::Dev::kCuda;

at::Tensor contig_f32(const at::Tensor* t) { return t ? t->contiguous() : at::Tensor(); }
const float* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr<float>() : nullptr; }

Layout layout_of_x(const at::Tensor& x, bool cl) { return Layout{x.size(0), x.size(1), x.size(2) * x.size(3), cl}; }

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_cuda(const at::Tensor& x_in,
                                                           const c10::optional<at::Tensor>& weight,
                                                           const c10::optional<at::Tensor>& bias,
                                                           const c10::optional<at::Tensor>& mean,
                                                           const c10::optional<at::Tensor>& var,
                                                           const c10::optional<at::Tensor>& residual, double eps,
                                                           c10::string_view act_name, bool training) {
  const char* op = "bn_act";
  const Act act = bnact::parse_act(std::string(act_name), op);
  convbn::check_bn_x(op, "x", x_in, kDev);
  const at::Tensor *w = opt(weight), *b = opt(bias), *m = opt(mean), *v = opt(var), *r = opt(residual);
  convbn::check_channel_param(op, "weight", w, x_in, x_in.size(1), kDev);
  convbn::check_channel_param(op, "bias", b, x_in, x_in.size(1), kDev);
  if (!training) {  // in training mean / var are not read, so they are not checked either
    TORCH_CHECK(m && v, "fastops.bn_act: mean and var are required when training=False");
    convbn::check_channel_param(op, "mean", m, x_in, x_in.size(1), kDev);
    convbn::check_channel_param(op, "var", v, x_in, x_in.size(1), kDev);
  }
  TORCH_CHECK(eps >= 0, "fastops.bn_act: eps must be >= 0, got ", eps);
  if (r) check_like(op, "residual", *r, x_in, x_in.sizes());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const bool cl = is_channels_last(x_in);
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor res = r ? r->contiguous(fmt) : at::Tensor();
  const Layout L = layout_of_x(x, cl);
  if (training) TORCH_CHECK(L.N * L.HW > 0, "fastops.bn_act: training needs at least one value per channel");
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(fmt));
  at::Tensor save_mean, save_var, k_lo;
  if (training) {
    save_mean = at::empty({L.C}, f32);
    save_var = at::empty({L.C}, f32);
    k_lo = at::empty({2, L.C}, f32);
  } else {
    save_mean = m->contiguous().clone();
    save_var = v->contiguous().clone();
  }
  if (x.numel() == 0) return {out, save_mean, save_var};
  const at::Tensor wc = contig_f32(w), bc = contig_f32(b);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  FASTOPS_DISPATCH_FP32_FP16_BF16(x.scalar_type(), "bn_act_cuda", [&] {
    using T = scalar_t;
    const T* xp = x.const_data_ptr<T>();
    if (training) {
      const StatsOp<T> sop{xp, cl ? 1 : L.HW, save_mean.data_ptr<float>(), save_var.data_ptr<float>(),
                           k_lo.data_ptr<float>(), k_lo.data_ptr<float>() + L.C};
      launch_reduce<T>(sop, L, can_vectorise<T>(L, {xp}), f32, stream);
    }
    const float* mean_p = training ? k_lo.const_data_ptr<float>() : save_mean.const_data_ptr<float>();
    const float* lo_p = training ? k_lo.const_data_ptr<float>() + L.C : nullptr;
    const BnParams p{mean_p, lo_p, save_var.const_data_ptr<float>(), ptr_or_null(wc), ptr_or_null(bc),
                     static_cast<float>(eps)};
    const BnForward<T> f{xp, r ? res.const_data_ptr<T>() : nullptr, out.data_ptr<T>(), p, act};
    launch_elementwise<T>(f, L, can_vectorise<T>(L, {f.x, f.res, f.out}), stream);
  });
  return {out, save_mean, save_var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x_in, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& save_mean_in, const at::Tensor& save_var_in,
    const c10::optional<at::Tensor>& residual, double eps, c10::string_view act_name, bool training) {
  const char* op = "bn_act_backward";
  const Act act = bnact::parse_act(std::string(act_name), op);
  convbn::check_bn_x(op, "x", x_in, kDev);
  const at::Tensor *w = opt(weight), *b = opt(bias), *r = opt(residual);
  convbn::check_channel_param(op, "weight", w, x_in, x_in.size(1), kDev);
  convbn::check_channel_param(op, "bias", b, x_in, x_in.size(1), kDev);
  TORCH_CHECK(save_mean_in.defined() && save_var_in.defined(),
              "fastops.bn_act_backward: save_mean and save_var are required");
  convbn::check_channel_param(op, "save_mean", &save_mean_in, x_in, x_in.size(1), kDev);
  convbn::check_channel_param(op, "save_var", &save_var_in, x_in, x_in.size(1), kDev);
  TORCH_CHECK(eps >= 0, "fastops.bn_act_backward: eps must be >= 0, got ", eps);
  check_like(op, "grad_out", grad_out, x_in, x_in.sizes());
  if (r) check_like(op, "residual", *r, x_in, x_in.sizes());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const bool cl = is_channels_last(x_in);
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor go = grad_out.contiguous(fmt);
  const at::Tensor res = r ? r->contiguous(fmt) : at::Tensor();
  const Layout L = layout_of_x(x, cl);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor gx = at::empty(x.sizes(), x.options().memory_format(fmt));
  at::Tensor gres = r ? at::empty(x.sizes(), x.options().memory_format(fmt)) : at::empty({0}, x.options());
  at::Tensor gw = at::zeros({L.C}, f32);
  at::Tensor gb = at::zeros({L.C}, f32);
  if (x.numel() == 0) return {gx, gw, gb, gres};
  TORCH_CHECK(!training || L.N * L.HW > 0, "fastops.bn_act_backward: training needs at least one value per channel");
  const at::Tensor sm = save_mean_in.contiguous(), sv = save_var_in.contiguous();
  const at::Tensor wc = contig_f32(w), bc = contig_f32(b);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  FASTOPS_DISPATCH_FP32_FP16_BF16(x.scalar_type(), "bn_act_backward_cuda", [&] {
    using T = scalar_t;
    const BnParams p{sm.const_data_ptr<float>(), nullptr, sv.const_data_ptr<float>(), ptr_or_null(wc),
                     ptr_or_null(bc), static_cast<float>(eps)};
    const T* gop = go.const_data_ptr<T>();
    const T* xp = x.const_data_ptr<T>();
    const T* rp = r ? res.const_data_ptr<T>() : nullptr;
    const BwdReduceOp<T> rop{gop, xp, rp, p, act, gw.data_ptr<float>(), gb.data_ptr<float>()};
    launch_reduce<T>(rop, L, can_vectorise<T>(L, {gop, xp, rp}), f32, stream);
    const BnBackward<T> f{gop, xp, rp, gx.data_ptr<T>(), r ? gres.data_ptr<T>() : nullptr, p,
                          gb.const_data_ptr<float>(), gw.const_data_ptr<float>(),
                          static_cast<float>(1.0 / static_cast<double>(L.N * L.HW)), act, training};
    launch_elementwise<T>(f, L, can_vectorise<T>(L, {gop, xp, rp, f.gx, f.gres}), stream);
  });
  return {gx, gw, gb, gres};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastops, CUDA, m) {
  m.impl("bn_act", &bn_act_cuda);
  m.impl("bn_act_backward", &bn_act_backward_cuda);
}

}  // namespace fastops
