// Convolution with a fused epilogue on CUDA: out = act(conv2d(x, weight) + bias + residual), forward and
// backward, NCHW and channels_last, float / half / bf16 (the oracle: fastops/reference/bn_act.py).
//
// Depthwise (groups == Cin == Cout, weight (C, 1, kh, kw)): all hand-written. The forward runs the
// depthwise kernels of cuda/depthwise_kernels.cuh with the epilogue fused: the fp32 accumulator starts at
// bias, the residual and the activation are applied before the one rounding to x's dtype. Backward: dz =
// grad_out * act'(z), either read off `out` (relu / relu6 / none: an elementwise pass) or from z recomputed
// by the same forward kernels with a dz epilogue (silu / gelu / hardswish: the conv is redone, nothing is
// stored for it); then the depthwise backward kernels give grad_x, grad_weight and (their bias tap, fp32)
// grad_bias.
// Other convolutions (dense, or any other groups): the convolution itself is ATen's (at::convolution,
// cuDNN on CUDA) without bias; the epilogue (bias + residual + act) is one hand-written in-place pass over
// its output. Backward: a hand-written pass computes dz (act' from `out`, or from z = conv + bias +
// residual with the conv recomputed by ATen) and reduces it per channel into grad_bias (deterministic: per
// split partials, then an in-order combine); grad_x and grad_weight come from at::convolution_backward.
// fp32 convolutions follow torch's cuDNN TF32 setting (torch.backends.cudnn.allow_tf32), exactly as
// F.conv2d does. Asymmetric padding is applied by padding x explicitly first, as the reference does.
//
// Accumulation is fp32 in the hand-written kernels. Element offsets are int64; every kernel loops
// grid-stride, so grids stay within CUDA's limits for any shape.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <type_traits>
#include <string>
#include <tuple>

#include "bn_act_common.h"
#include "common.h"
#include "conv_bn_checks.h"
#include "cuda/channel_pass.cuh"
#include "cuda/depthwise_kernels.cuh"

namespace fastops {
namespace {

using bnact::Act;

// ---------------------------------------------------------------------------------------------------
// Depthwise epilogues (see depthwise_kernels.cuh: init(c) starts the accumulator, finish<V> transforms V
// adjacent accumulators before the store).

// out = act(acc + bias + residual).
template <typename T>
struct BiasResActEpilogue {
  const float* bias;  // null: no bias
  const T* res;       // null: no residual
  Act act;
  __device__ __forceinline__ float init(int64_t c) const { return bias != nullptr ? bias[c] : 0.f; }
  template <int V>
  __device__ __forceinline__ void finish(float* acc, int64_t off, int64_t) const {
    if (res != nullptr) {
      const dw_cuda::Vec<T, V> r = dw_cuda::load_vec<V>(res + off);
#pragma unroll
      for (int j = 0; j < V; ++j) acc[j] += static_cast<float>(r.v[j]);
    }
#pragma unroll
    for (int j = 0; j < V; ++j) acc[j] = bnact::act_forward<float>(act, acc[j]);
  }
};

// The same z as BiasResActEpilogue (same kernels, same summation order); stores dz = grad_out * act'(z).
template <typename T>
struct DzEpilogue {
  const float* bias;
  const T* res;
  const T* go;
  Act act;
  __device__ __forceinline__ float init(int64_t c) const { return bias != nullptr ? bias[c] : 0.f; }
  template <int V>
  __device__ __forceinline__ void finish(float* acc, int64_t off, int64_t) const {
    if (res != nullptr) {
      const dw_cuda::Vec<T, V> r = dw_cuda::load_vec<V>(res + off);
#pragma unroll
      for (int j = 0; j < V; ++j) acc[j] += static_cast<float>(r.v[j]);
    }
    const dw_cuda::Vec<T, V> g = dw_cuda::load_vec<V>(go + off);
#pragma unroll
    for (int j = 0; j < V; ++j) acc[j] = static_cast<float>(g.v[j]) * bnact::act_grad<float>(act, acc[j]);
  }
};

// ---------------------------------------------------------------------------------------------------
// Dense path, hand-written parts (chpass kernels).

// In place on the conv output y: y = act(y + bias + residual).
template <typename T>
struct DenseEpilogue {
  T* y;
  const T* res;
  const float* bias;
  Act act;
  template <int V>
  __device__ __forceinline__ void apply(int64_t off, int64_t c, int cstep) const {
    chpass::Vec<T, V> yv = chpass::load_vec<V>(y + off);
    chpass::Vec<T, V> rv{};
    if (res != nullptr) rv = chpass::load_vec<V>(res + off);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      float z = static_cast<float>(yv.v[j]);
      if (bias != nullptr) z += bias[c + j * cstep];
      if (res != nullptr) z += static_cast<float>(rv.v[j]);
      yv.v[j] = static_cast<T>(bnact::act_forward<float>(act, z));
    }
    chpass::store_vec<V>(y + off, yv);
  }
};

// dz = grad_out * act'(.) written to dz, and summed per channel in fp32 into gb_out (when not null).
// from_output: v is the forward's out and act' is read off it; else v is the recomputed conv output and
// z = v + bias + residual.
template <typename T>
struct DzReduceOp {
  using State = chpass::Sum2;  // a: sum dz
  const T* go;
  const T* v;
  const T* res;
  const float* bias;
  T* dz;
  float* gb_out;
  Act act;
  bool from_output;

  template <int V>
  __device__ __forceinline__ void accumulate(State* st, int64_t off, int64_t c, int cstep) const {
    const chpass::Vec<T, V> gv = chpass::load_vec<V>(go + off);
    const chpass::Vec<T, V> vv = chpass::load_vec<V>(v + off);
    chpass::Vec<T, V> rv{};
    if (!from_output && res != nullptr) rv = chpass::load_vec<V>(res + off);
    chpass::Vec<T, V> dv;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      float g;
      if (from_output) {
        g = bnact::act_grad_from_output<float>(act, static_cast<float>(vv.v[j]));
      } else {
        float z = static_cast<float>(vv.v[j]);
        if (bias != nullptr) z += bias[c + j * cstep];
        if (res != nullptr) z += static_cast<float>(rv.v[j]);
        g = bnact::act_grad<float>(act, z);
      }
      const float d = static_cast<float>(gv.v[j]) * g;
      dv.v[j] = static_cast<T>(d);
      st[j * cstep].a += d;
    }
    chpass::store_vec<V>(dz + off, dv);
  }
  __device__ __forceinline__ void finalize(int64_t c, const State& st) const {
    if (gb_out != nullptr) gb_out[c] = st.a;
  }
};

// ---------------------------------------------------------------------------------------------------
// Host side.

using convbn::check_like_out;
using convbn::ConvArgs;
using convbn::opt;


chpass::Layout out_layout(const ConvArgs& a) { return chpass::Layout{a.g.N, a.Cout, a.g.OH * a.g.OW, a.cl}; }

bool asymmetric(const Conv2dGeom& g) { return g.PT != g.PB || g.PL != g.PR; }

// x as ATen's convolution gets it: explicitly padded when the padding is asymmetric (then the conv's own
// padding is 0).
at::Tensor conv_input(const at::Tensor& x, const Conv2dGeom& g) {
  return asymmetric(g) ? at::constant_pad_nd(x, {g.PL, g.PR, g.PT, g.PB}, 0) : x;
}

std::array<int64_t, 2> conv_padding(const Conv2dGeom& g) {
  return asymmetric(g) ? std::array<int64_t, 2>{0, 0} : std::array<int64_t, 2>{g.PT, g.PL};
}

// conv2d(x, weight) without bias through ATen, in the layout fmt.
at::Tensor aten_conv(const at::Tensor& x, const at::Tensor& weight, const ConvArgs& a, int64_t groups) {
  const std::array<int64_t, 2> pad = conv_padding(a.g);
  at::Tensor y = at::convolution(conv_input(x, a.g), weight, c10::nullopt, {a.g.SH, a.g.SW}, pad, {a.g.DH, a.g.DW},
                                 /*transposed=*/false, {0, 0}, groups);
  return y.contiguous(a.fmt);
}

at::Tensor conv_bias_act_cuda(const at::Tensor& x_in, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                              const c10::optional<at::Tensor>& residual, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                              c10::string_view act_name) {
  const char* op = "conv_bias_act";
  const Act act = bnact::parse_act(std::string(act_name), op);
  const at::Tensor *b = opt(bias), *r = opt(residual);
  const ConvArgs a = convbn::check_conv(op, x_in, weight, b, stride, padding, dilation, groups, convbn::Dev::kCuda);
  if (r) check_like_out(op, "residual", *r, x_in, a);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(a.fmt);
  const at::Tensor res = r ? r->contiguous(a.fmt) : at::Tensor();
  const at::Tensor bc = b ? b->contiguous() : at::Tensor();
  const float* bp = b ? bc.const_data_ptr<float>() : nullptr;
  const auto out_opts = x.options().memory_format(a.fmt);
  if (a.g.N * a.Cout * a.g.OH * a.g.OW == 0) return at::empty({a.g.N, a.Cout, a.g.OH, a.g.OW}, out_opts);
  TORCH_CHECK(x.numel() > 0, "fastops.", op, " (cuda): x is empty but the output is not (H or W is 0)");
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  if (a.depthwise) {
    at::Tensor y = at::empty({a.g.N, a.Cout, a.g.OH, a.g.OW}, out_opts);
    FASTOPS_DISPATCH_FP32_FP16_BF16(x.scalar_type(), "conv_bias_act_cuda", [&] {
      using T = scalar_t;
      static_assert(std::is_same_v<at::opmath_type<T>, float>, "the epilogues accumulate in float");
      const T* rp = r ? res.const_data_ptr<T>() : nullptr;
      const BiasResActEpilogue<T> epi{bp, rp, act};
      if (a.cl) dw_cuda::forward_nhwc<T>(x, weight, epi, y, a.g, stream, rp);
      else dw_cuda::forward_nchw<T>(x, weight, epi, y, a.g, stream);
    });
    return y;
  }

  at::Tensor y = aten_conv(x, weight.contiguous(), a, groups);
  const chpass::Layout L = out_layout(a);
  FASTOPS_DISPATCH_FP32_FP16_BF16(x.scalar_type(), "conv_bias_act_cuda", [&] {
    using T = scalar_t;
    const DenseEpilogue<T> f{y.data_ptr<T>(), r ? res.const_data_ptr<T>() : nullptr, bp, act};
    chpass::launch_elementwise<T>(f, L, chpass::can_vectorise<T>(L, {f.y, f.res}), stream);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bias_act_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x_in, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& residual, const at::Tensor& out_in, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, c10::string_view act_name) {
  const char* op = "conv_bias_act_backward";
  const Act act = bnact::parse_act(std::string(act_name), op);
  const at::Tensor *b = opt(bias), *r = opt(residual);
  const ConvArgs a = convbn::check_conv(op, x_in, weight, b, stride, padding, dilation, groups, convbn::Dev::kCuda);
  check_like_out(op, "grad_out", grad_out, x_in, a);
  const bool from_output = bnact::grad_from_output(act);
  if (from_output) check_like_out(op, "out", out_in, x_in, a);
  if (r) check_like_out(op, "residual", *r, x_in, a);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Conv2dGeom& g = a.g;
  const at::Tensor x = x_in.contiguous(a.fmt);
  const at::Tensor go = grad_out.contiguous(a.fmt);
  const at::Tensor res = r ? r->contiguous(a.fmt) : at::Tensor();
  const at::Tensor bc = b ? b->contiguous() : at::Tensor();
  const float* bp = b ? bc.const_data_ptr<float>() : nullptr;
  const auto f32 = x.options().dtype(at::kFloat);
  const auto out_opts = x.options().memory_format(a.fmt);
  at::Tensor gb = b ? at::zeros({a.Cout}, f32) : at::empty({0}, f32);
  if (go.numel() == 0 || x.numel() == 0) {
    // Nothing flows back through the conv; only an empty output is possible with x non-empty here, and an
    // empty x with a non-empty output is refused by the forward.
    TORCH_CHECK(go.numel() == 0, "fastops.", op, " (cuda): x is empty but the output is not (H or W is 0)");
    at::Tensor gres = r ? at::empty({g.N, a.Cout, g.OH, g.OW}, out_opts) : at::empty({0}, x.options());
    return {at::zeros(x.sizes(), x.options().memory_format(a.fmt)), at::zeros(weight.sizes(), weight.options()), gb,
            gres};
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const chpass::Layout L = out_layout(a);
  at::Tensor dz = at::empty({g.N, a.Cout, g.OH, g.OW}, out_opts);

  if (a.depthwise) {
    at::Tensor gx = at::empty(x.sizes(), x.options().memory_format(a.fmt));
    at::Tensor gw = at::empty({g.C, 1, g.KH, g.KW}, weight.options());
    at::Tensor gb_all = at::empty({g.C}, f32);
    const at::Tensor out = from_output ? out_in.contiguous(a.fmt) : at::Tensor();
    FASTOPS_DISPATCH_FP32_FP16_BF16(x.scalar_type(), "conv_bias_act_backward_cuda", [&] {
      using T = scalar_t;
      const T* rp = r ? res.const_data_ptr<T>() : nullptr;
      const T* gop = go.const_data_ptr<T>();
      if (from_output) {
        // grad_bias comes from the weight kernels' bias tap below, so this pass only writes dz.
        const DzReduceOp<T> dop{gop, out.const_data_ptr<T>(), nullptr, nullptr, dz.data_ptr<T>(), nullptr, act, true};
        chpass::launch_reduce<T>(dop, L, chpass::can_vectorise<T>(L, {dop.go, dop.v, dop.dz}), f32, stream);
      } else {
        const DzEpilogue<T> epi{bp, rp, gop, act};
        if (a.cl) dw_cuda::forward_nhwc<T>(x, weight, epi, dz, g, stream, rp, gop);
        else dw_cuda::forward_nchw<T>(x, weight, epi, dz, g, stream);
      }
      dw_cuda::backward_input<T>(dz, weight, gx, g, a.cl, stream);
      dw_cuda::backward_weight<T, float>(dz, x, gw, gb_all, g, a.cl, stream);
    });
    return {gx, gw, b ? gb_all : gb, r ? dz : at::empty({0}, x.options())};
  }

  // Dense / grouped: dz (and grad_bias) by hand, the conv's gradients by ATen.
  const at::Tensor w = weight.contiguous();
  const at::Tensor v = from_output ? out_in.contiguous(a.fmt) : aten_conv(x, w, a, groups);
  FASTOPS_DISPATCH_FP32_FP16_BF16(x.scalar_type(), "conv_bias_act_backward_cuda", [&] {
    using T = scalar_t;
    const DzReduceOp<T> dop{go.const_data_ptr<T>(), v.const_data_ptr<T>(), r ? res.const_data_ptr<T>() : nullptr, bp,
                            dz.data_ptr<T>(), b ? gb.data_ptr<float>() : nullptr, act, from_output};
    chpass::launch_reduce<T>(dop, L, chpass::can_vectorise<T>(L, {dop.go, dop.v, dop.res, dop.dz}), f32, stream);
  });
  at::Tensor gx, gw;
  {
    const std::array<int64_t, 2> pad = conv_padding(g);
    const at::Tensor xin = conv_input(x, g);
    auto grads = at::convolution_backward(dz, xin, w, c10::nullopt, {g.SH, g.SW}, pad, {g.DH, g.DW},
                                          /*transposed=*/false, {0, 0}, groups, {true, true, false});
    gx = std::get<0>(grads);
    gw = std::get<1>(grads);
  }
  if (asymmetric(g)) gx = gx.slice(2, g.PT, g.PT + g.H).slice(3, g.PL, g.PL + g.W);
  return {gx.contiguous(a.fmt), gw.contiguous(), gb, r ? dz : at::empty({0}, x.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastops, CUDA, m) {
  m.impl("conv_bias_act", &conv_bias_act_cuda);
  m.impl("conv_bias_act_backward", &conv_bias_act_backward_cuda);
}

}  // namespace fastops
