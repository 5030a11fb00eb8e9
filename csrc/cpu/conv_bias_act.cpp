// Convolution + bias (+ residual) + activation on the CPU, forward and backward, NCHW and channels_last,
// float / double / half / bf16.
//
// Depthwise (groups == Cin == Cout): the depthwise loops of cpu/depthwise_kernels.h with the bias as the
// accumulator's initial value and the residual + activation applied to each output plane / row while it
// is still in cache. fp32 1x1 / stride-1 / ungrouped convolutions, either layout: the GEMM of
// cpu/gemm_kernels.h with bias, residual and activation applied to its accumulators. Other convolutions:
// ATen's convolution as the dense core, then either oneDNN's fused post-ops (fp32, when available: no extra
// pass over the output) or one in-place epilogue pass.
// Backward: one pass for dz = grad_out * act'(z) (act' read from the output for relu / relu6, 1 for none,
// whose `out` is a stand-in, else z recomputed) that also sums grad_bias, then the depthwise backward loops or
// at::convolution_backward.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "bn_act_common.h"
#include "common.h"
#include "conv_bn_checks.h"
#include "cpu/depthwise_kernels.h"
#include "cpu/gemm_kernels.h"
#include "cpu/packed_weights.h"

namespace fastops {
namespace {

using bnact::Act;

using convbn::check_like_out;
using convbn::ConvArgs;
using convbn::opt;


template <typename acc_t>
std::vector<acc_t> bias_vec(const at::Tensor* bias, int64_t C) {
  std::vector<acc_t> v(C, acc_t(0));
  if (bias) {
    const at::Tensor f = bias->to(at::kDouble).contiguous();
    for (int64_t c = 0; c < C; ++c) v[c] = static_cast<acc_t>(f.data_ptr<double>()[c]);
  }
  return v;
}

bool symmetric(c10::IntArrayRef p) { return p[0] == p[2] && p[1] == p[3]; }

// x zero-padded so that the convolution needs symmetric padding only (ATen's convolution takes one
// value per side pair); `pad` receives what is left to pass to it.
at::Tensor pad_for_aten(const at::Tensor& x, c10::IntArrayRef padding, std::vector<int64_t>& pad) {
  if (symmetric(padding)) {
    pad = {padding[0], padding[1]};
    return x;
  }
  pad = {0, 0};
  return at::constant_pad_nd(x, {padding[1], padding[3], padding[0], padding[2]}, 0)
      .contiguous(is_channels_last(x) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
}

// Plain convolution without bias, output in x's layout and in the accumulation type: half / bf16 inputs
// are convolved in fp32 so that conv + bias (+ residual) is rounded once, by the epilogue.
at::Tensor aten_conv(const at::Tensor& x, const at::Tensor& w, const ConvArgs& a, c10::IntArrayRef stride,
                     c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups) {
  std::vector<int64_t> pad;
  const bool low = x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
  const at::Tensor xp = pad_for_aten(low ? x.to(at::kFloat) : x, padding, pad);
  return at::convolution(xp, low ? w.to(at::kFloat) : w, c10::nullopt, stride, pad, dilation, false, {0, 0}, groups)
      .contiguous(a.fmt);
}

// oneDNN post-op names for the activations; every act has one.
void onednn_unary(Act act, std::string& name, c10::List<c10::optional<at::Scalar>>& scalars,
                  c10::optional<c10::string_view>& algorithm) {
  algorithm = c10::nullopt;
  switch (act) {
    case Act::kRelu: name = "relu"; break;
    case Act::kRelu6:
      name = "hardtanh";
      scalars.push_back(at::Scalar(0.0));
      scalars.push_back(at::Scalar(6.0));
      break;
    case Act::kSilu: name = "swish"; break;
    case Act::kGelu: name = "gelu"; algorithm = c10::string_view("none"); break;
    case Act::kHardswish: name = "hardswish"; break;
    default: name = "none"; break;
  }
}

// The oneDNN fused path: fp32 only (its bias is fp32 there and the accumulation matches), symmetric
// padding (its padding is one value per side pair). Measured (batch 8, 2 threads) it beats ATen's
// convolution + our epilogue pass except on NCHW layers whose weight outgrows their output (ResNet-50
// stages 3-4 3x3): there its per-call weight reorder costs more than the saved pass.
bool use_onednn(const at::Tensor& x, const at::Tensor& w, c10::IntArrayRef padding, const ConvArgs& a) {
  if (!at::hasMKLDNN() || x.scalar_type() != at::kFloat || !symmetric(padding)) return false;
  return a.cl || w.numel() <= a.g.N * a.Cout * a.g.OH * a.g.OW;
}

// Weights reordered into oneDNN's blocked layout, or packed into gemm_kernels.h's panels, kept between
// calls for channels_last inputs (see cpu/packed_weights.h for when a copy is kept and for how long). Given a
// plain weight, oneDNN reorders it on every call: at batch 1 that is most of a ResNet-50 layer 4 3x3
// convolution (2.2 ms of it against 1.0 ms prepacked, 2 threads), at batch 8 still ~15% (8.2 against 6.8 ms).
// The key is what the weight was packed for: oneDNN, the input size and conv arguments; the GEMM panels,
// the weight's shape and strides. Mostly the weights kept are the eval-mode folded weights that fastops.nn's
// conv modules keep: the same prepacking torch.compile's freezing does.

// The oneDNN-reordered form of w for this call, or w itself when it is not to be cached.
at::Tensor onednn_weight(const at::Tensor& x, const at::Tensor& w, c10::IntArrayRef stride, c10::IntArrayRef padding,
                         c10::IntArrayRef dilation, int64_t groups) {
  // NCHW input with a packed weight comes back channels_last and would need a transpose: slower than
  // the per-call reorder it saves (ResNet-50 1x1 convolutions at batch 8: up to 2x).
  if (!is_channels_last(x) || !PackedWeights::cacheable(w)) return w;
  static const auto reorder = c10::Dispatcher::singleton().findSchema({"mkldnn::_reorder_convolution_weight", ""});
  if (!reorder) return w;
  std::vector<int64_t> key{kConvOneDnnKey};
  key.insert(key.end(), x.sizes().begin(), x.sizes().end());
  for (c10::IntArrayRef a : {stride, padding, dilation}) key.insert(key.end(), a.begin(), a.end());
  key.push_back(groups);
  return PackedWeights::get().find_or_make(w, std::move(key), [&] {
    return reorder->typed<at::Tensor(const at::Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t,
                                     at::OptionalIntArrayRef)>()
        .call(w.contiguous(), padding, stride, dilation, groups, x.sizes());
  });
}

at::Tensor onednn_conv_act(const at::Tensor& x, const at::Tensor& w_plain, const at::Tensor* bias,
                           const at::Tensor* res, Act act, c10::IntArrayRef stride, c10::IntArrayRef padding,
                           c10::IntArrayRef dilation, int64_t groups) {
  const std::vector<int64_t> pad = {padding[0], padding[1]};
  const at::Tensor w = onednn_weight(x, w_plain, stride, pad, dilation, groups);
  std::string uname;
  c10::List<c10::optional<at::Scalar>> scalars;
  c10::optional<c10::string_view> algo;
  onednn_unary(act, uname, scalars, algo);
  c10::optional<at::Tensor> b;
  if (bias) b = bias->to(at::kFloat).contiguous();
  if (!res) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("mkldnn::_convolution_pointwise", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                                           at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t,
                                           c10::string_view, c10::List<c10::optional<at::Scalar>>,
                                           c10::optional<c10::string_view>)>();
    return op.call(x, w, b, pad, stride, dilation, groups, uname, scalars, algo);
  }
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mkldnn::_convolution_pointwise", "binary")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const c10::optional<at::Tensor>&, at::IntArrayRef, at::IntArrayRef,
                                         at::IntArrayRef, int64_t, c10::string_view, c10::optional<at::Scalar>,
                                         c10::optional<c10::string_view>, c10::List<c10::optional<at::Scalar>>,
                                         c10::optional<c10::string_view>)>();
  // After a binary post-op oneDNN (through ATen) takes relu only; other activations are left to the caller.
  const c10::optional<c10::string_view> un =
      act == Act::kRelu ? c10::optional<c10::string_view>(c10::string_view(uname)) : c10::nullopt;
  return op.call(x, *res, w, b, pad, stride, dilation, groups, "add", c10::nullopt, un,
                 c10::List<c10::optional<at::Scalar>>(), c10::nullopt);
}

// fp32 1x1 convolutions with stride 1, no padding and one group are a GEMM over the pixels, which
// gemm_kernels.h runs with the epilogue in its accumulators (for K up to its kMaxK), in either layout. NCHW
// maps of one pixel (single tokens, squeezed maps) stay with oneDNN: per sample they are a matrix-vector
// product, one lane of each vector of the NCHW path's tiles in use.
bool use_gemm(const at::Tensor& x, const ConvArgs& a, int64_t groups) {
  const Conv2dGeom& g = a.g;
  return gemm::kEnabled && x.scalar_type() == at::kFloat && groups == 1 && g.KH == 1 && g.KW == 1 &&
         g.SH == 1 && g.SW == 1 && g.PT == 0 && g.PL == 0 && g.PB == 0 && g.PR == 0 && g.C <= gemm::kMaxK &&
         (a.cl || (g.H * g.W > 1 && g.C * a.Cout <= gemm::kMaxNchwWeight)) && x.numel() > 0;
}

at::Tensor gemm_conv_act(const at::Tensor& x, const at::Tensor& w, const at::Tensor* bias, const at::Tensor* res,
                         Act act, const ConvArgs& a) {
  at::Tensor y = at::empty({a.g.N, a.Cout, a.g.OH, a.g.OW}, x.options().memory_format(a.fmt));
  const std::vector<float> b = gemm::padded_bias(bias, a.Cout);
  gemm::conv1x1(x, gemm::conv1x1_weight(w, a.cl), a.Cout, b.data(), res ? res->data_ptr<float>() : nullptr, nullptr,
                act, a.cl, y);
  return y;
}

// Depthwise forward with bias folded into the accumulator; when `act` or `res` is there it is applied to
// each finished plane / output row in place.
template <typename scalar_t>
void depthwise_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor* bias, const scalar_t* rp, Act act,
                       bool epilogue, at::Tensor& y, const ConvArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const chan::Geom go = chan::geom_of(y, a.cl);
  const std::vector<acc_t> ones(a.Cout, acc_t(1)), zeros(a.Cout, acc_t(0));
  scalar_t* yp = y.data_ptr<scalar_t>();
  if (!epilogue) {
    if (a.cl) dw::forward_nhwc<scalar_t>(x, w, bias, y, a.g);
    else dw::forward_nchw<scalar_t>(x, w, bias, y, a.g);
    return;
  }
  chan::dispatch_act(act, [&](auto ac) {
    constexpr Act A = decltype(ac)::value;
    if (a.cl) {
      const int64_t OW = a.g.OW;
      auto post = [&](int64_t row) {
        for (int64_t p = row * OW; p < (row + 1) * OW; ++p)
          chan::unit_affine_act<A>(go, p, yp, rp, yp, ones.data(), zeros.data());
      };
      dw::forward_nhwc<scalar_t>(x, w, bias, y, a.g, post);
    } else {
      auto post = [&](int64_t plane) { chan::unit_affine_act<A>(go, plane, yp, rp, yp, ones.data(), zeros.data()); };
      dw::forward_nchw<scalar_t>(x, w, bias, y, a.g, post);
    }
  });
}

// The dilation ATen and oneDNN get: 1 along a kernel dimension of size 1, where it has no effect. oneDNN's fused
// convolution (torch 2.14, oneDNN 3.12) crashed on a 1x1 kernel with dilation 2 over a 1-pixel-wide input with
// stride 2 and padding 1; with dilation 1 the same convolution runs.
std::vector<int64_t> effective_dilation(const ConvArgs& a) {
  return {a.g.KH == 1 ? 1 : a.g.DH, a.g.KW == 1 ? 1 : a.g.DW};
}

at::Tensor conv_bias_act_cpu(const at::Tensor& x_in, const at::Tensor& weight, const c10::optional<at::Tensor>& bias_opt,
                             const c10::optional<at::Tensor>& residual, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                             c10::string_view act_name) {
  const char* op = "conv_bias_act";
  const Act act = bnact::parse_act(std::string(act_name), op);
  const at::Tensor *bias = opt(bias_opt), *r = opt(residual);
  const ConvArgs a = convbn::check_conv(op, x_in, weight, bias, stride, padding, dilation, groups, convbn::Dev::kCpu);
  const std::vector<int64_t> dil = effective_dilation(a);
  const at::Tensor x = x_in.contiguous(a.fmt);
  at::Tensor res;
  if (r) {
    check_like_out(op, "residual", *r, x, a);
    res = r->contiguous(a.fmt);
  }
  if (a.depthwise) {
    at::Tensor y = at::empty({a.g.N, a.Cout, a.g.OH, a.g.OW}, x.options().memory_format(a.fmt));
    if (y.numel() == 0) return y;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv_bias_act_cpu_dw", [&] {
      depthwise_forward<scalar_t>(x, weight, bias, r ? res.data_ptr<scalar_t>() : nullptr, act,
                                  r || act != Act::kNone, y, a);
    });
    return y;
  }
  if (use_gemm(x, a, groups)) return gemm_conv_act(x, weight, bias, r ? &res : nullptr, act, a);
  if (use_onednn(x, weight, padding, a) && x.numel() > 0) {
    at::Tensor y =
        onednn_conv_act(x, weight, bias, r ? &res : nullptr, act, stride, padding, dil, groups).contiguous(a.fmt);
    if (r && act != Act::kNone && act != Act::kRelu) {
      AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_bias_act_cpu_act", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const std::vector<acc_t> ones(a.Cout, acc_t(1)), zeros(a.Cout, acc_t(0));
        scalar_t* yp = y.data_ptr<scalar_t>();
        chan::affine_act<scalar_t, scalar_t, acc_t>(chan::geom_of(y, a.cl), act, yp, nullptr, yp, ones.data(),
                                                    zeros.data());
      });
    }
    return y;
  }
  const at::Tensor yc = aten_conv(x, weight, a, stride, padding, dil, groups);
  const bool same = yc.scalar_type() == x.scalar_type();
  if (same && (yc.numel() == 0 || (!bias && !r && act == Act::kNone))) return yc;
  // In place for fp32 / fp64; half / bf16 round the fp32 convolution here.
  at::Tensor y = same ? yc : at::empty_like(yc, x.options(), a.fmt);
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv_bias_act_cpu_epilogue", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const std::vector<acc_t> ones(a.Cout, acc_t(1)), b = bias_vec<acc_t>(bias, a.Cout);
    chan::affine_act<acc_t, scalar_t, acc_t>(chan::geom_of(y, a.cl), act, yc.data_ptr<acc_t>(),
                                             r ? res.data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(),
                                             ones.data(), b.data());
  });
  return y;
}

// grad_x and grad_weight of the dense convolution, from dz, by at::convolution_backward, around two of its
// defects in torch 2.14 (oneDNN 3.12), both seen on channels_last inputs: half / bf16 weight gradients came
// out as garbage (up to 1e38, inf) for a 1x3 kernel over a 1-pixel-wide map at stride 2, so those dtypes go
// through fp32 (also the accumulation type of the rest of the op); a 1x1 kernel at stride 2 corrupted the heap
// with two threads (8 x 10 maps, 5 or 8 channels), so a strided channels_last 1x1 convolution is run as the
// unstrided one of the pixels it reads, whose grad_x is scattered back into zeros.
std::tuple<at::Tensor, at::Tensor> aten_conv_backward(const at::Tensor& dz_in, const at::Tensor& x_in,
                                                      const at::Tensor& w_in, const ConvArgs& a,
                                                      c10::IntArrayRef stride, c10::IntArrayRef padding,
                                                      c10::IntArrayRef dilation, int64_t groups) {
  const auto type = x_in.scalar_type();
  const bool low = type == at::kHalf || type == at::kBFloat16;
  const at::Tensor dz = low ? dz_in.to(at::kFloat) : dz_in, x = low ? x_in.to(at::kFloat) : x_in;
  const at::Tensor w = low ? w_in.to(at::kFloat) : w_in;
  at::Tensor gx, gw;
  if (a.cl && a.g.KH == 1 && a.g.KW == 1 && (a.g.SH > 1 || a.g.SW > 1)) {
    const bool padded = padding[0] || padding[1] || padding[2] || padding[3];
    const at::Tensor xp = padded ? at::constant_pad_nd(x, {padding[1], padding[3], padding[0], padding[2]}, 0) : x;
    auto taps = [&](const at::Tensor& t) {
      return t.slice(2, 0, a.g.OH * a.g.SH, a.g.SH).slice(3, 0, a.g.OW * a.g.SW, a.g.SW);
    };
    auto grads = at::convolution_backward(dz, taps(xp).contiguous(a.fmt), w, c10::nullopt, {1, 1}, {0, 0}, {1, 1},
                                          false, {0, 0}, groups, {true, true, false});
    gx = at::zeros_like(xp, xp.options(), a.fmt);
    taps(gx).copy_(std::get<0>(grads));
    gw = std::get<1>(grads);
    if (padded) gx = gx.slice(2, padding[0], padding[0] + a.g.H).slice(3, padding[1], padding[1] + a.g.W);
  } else {
    std::vector<int64_t> pad;
    const at::Tensor xp = pad_for_aten(x, padding, pad);
    auto grads = at::convolution_backward(dz, xp, w, c10::nullopt, stride, pad, dilation, false, {0, 0}, groups,
                                          {true, true, false});
    gx = std::get<0>(grads);
    gw = std::get<1>(grads);
    if (!symmetric(padding))
      gx = gx.slice(2, padding[0], padding[0] + a.g.H).slice(3, padding[1], padding[1] + a.g.W);
  }
  return {gx.to(type).contiguous(a.fmt), gw.to(type).contiguous()};
}

// dz = grad_out * act'(.) in the output's layout, and sum dz per channel into gsum (double).
// from_out: src is the forward output; else src is the convolution (without bias and residual when
// `add_bias`), z = src + bias + r.
template <Act A, typename scalar_t, typename src_t>
void dz_pass(const chan::Geom& g, const scalar_t* gop, const src_t* src, const scalar_t* rp, const double* bias,
             bool from_out, scalar_t* dzp, double* gsum) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> bv(g.C);
  for (int64_t c = 0; c < g.C; ++c) bv[c] = static_cast<acc_t>(bias[c]);
  auto grad = [&](acc_t v, acc_t b, acc_t r) -> acc_t {
    return from_out ? chan::act_g_out<A>(v) : chan::act_g<A>(v + b + r);
  };
  auto plane_fn = [&](int64_t p, acc_t* out) {
    const int64_t c = p % g.C, o = p * g.HW;
    const acc_t bc = bv[c];
    acc_t s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < g.HW; ++i) {
      const acc_t r = rp ? static_cast<acc_t>(rp[o + i]) : acc_t(0);
      const acc_t dz = static_cast<acc_t>(gop[o + i]) * grad(static_cast<acc_t>(src[o + i]), bc, r);
      dzp[o + i] = static_cast<scalar_t>(dz);
      s += dz;
    }
    out[0] = s;
  };
  auto rows_fn = [&](int64_t r0, int64_t r1, acc_t* acc) {
    const acc_t* __restrict__ b = bv.data();
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t o = row * g.C;
#pragma omp simd
      for (int64_t c = 0; c < g.C; ++c) {
        const acc_t r = rp ? static_cast<acc_t>(rp[o + c]) : acc_t(0);
        const acc_t dz = static_cast<acc_t>(gop[o + c]) * grad(static_cast<acc_t>(src[o + c]), b[c], r);
        dzp[o + c] = static_cast<scalar_t>(dz);
        acc[c] += dz;
      }
    }
  };
  chan::reduce_channels<acc_t, 1>(g, plane_fn, rows_fn, gsum);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bias_act_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x_in, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias_opt, const c10::optional<at::Tensor>& residual, const at::Tensor& out,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    c10::string_view act_name) {
  const char* op = "conv_bias_act_backward";
  const Act act = bnact::parse_act(std::string(act_name), op);
  const at::Tensor *bias = opt(bias_opt), *r = opt(residual);
  const ConvArgs a = convbn::check_conv(op, x_in, weight, bias, stride, padding, dilation, groups, convbn::Dev::kCpu);
  const std::vector<int64_t> dil = effective_dilation(a);
  const at::Tensor x = x_in.contiguous(a.fmt);
  check_like_out(op, "grad_out", grad_out, x, a);
  const at::Tensor go = grad_out.contiguous(a.fmt);
  at::Tensor res;
  if (r) {
    check_like_out(op, "residual", *r, x, a);
    res = r->contiguous(a.fmt);
  }
  const bool from_out = bnact::grad_from_output(act);
  at::Tensor src;
  if (from_out) {
    check_like_out(op, "out", out, x, a);
    src = out.contiguous(a.fmt);
  }
  const at::Tensor w = weight.contiguous();
  const bool depthwise = a.depthwise;
  // The pre-activation for silu / gelu / hardswish (depthwise: with the bias already in), in the accumulation
  // type: rounded to half / bf16, a value just inside hardswish's kink at +-3 could land on it and take the
  // derivative of the other side. (The half / bf16 depthwise forward applies the activation to the rounded
  // value, as F.conv2d followed by the activation in that dtype does; the gradient is the one of the exact z.)
  std::vector<double> bias_d(a.Cout, 0.0);
  if (!from_out) {
    if (depthwise) {
      const bool low = x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
      const at::Tensor xz = low ? x.to(at::kFloat) : x, wz = low ? w.to(at::kFloat) : w;
      src = at::empty({a.g.N, a.Cout, a.g.OH, a.g.OW}, xz.options().memory_format(a.fmt));
      if (src.numel() > 0) {
        AT_DISPATCH_FLOATING_TYPES(xz.scalar_type(), "conv_bias_act_bwd_dw_z", [&] {
          depthwise_forward<scalar_t>(xz, wz, bias, nullptr, Act::kNone, false, src, a);
        });
      }
    } else {
      src = aten_conv(x, w, a, stride, padding, dil, groups);
      bias_d = bias_vec<double>(bias, a.Cout);
    }
  }
  at::Tensor dz = at::empty({a.g.N, a.Cout, a.g.OH, a.g.OW}, x.options().memory_format(a.fmt));
  std::vector<double> gsum(a.Cout, 0.0);
  const chan::Geom gg = chan::geom_of(dz, a.cl);
  if (dz.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv_bias_act_bwd_dz", [&] {
      chan::dispatch_act(act, [&](auto ac) {
        constexpr Act A = decltype(ac)::value;
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* rp = r ? res.data_ptr<scalar_t>() : nullptr;
        if (src.scalar_type() == x.scalar_type())
          dz_pass<A>(gg, go.data_ptr<scalar_t>(), src.data_ptr<scalar_t>(), rp, bias_d.data(), from_out,
                     dz.data_ptr<scalar_t>(), gsum.data());
        else  // the fp32 convolution of half / bf16 inputs
          dz_pass<A>(gg, go.data_ptr<scalar_t>(), src.data_ptr<acc_t>(), rp, bias_d.data(), from_out,
                     dz.data_ptr<scalar_t>(), gsum.data());
      });
    });
  }
  at::Tensor gx, gw;
  if (depthwise) {
    gx = at::empty_like(x, x.options(), a.fmt);
    gw = at::empty({a.Cout, 1, a.g.KH, a.g.KW}, x.options());
    at::Tensor gb_scratch = at::empty({a.Cout}, x.options());
    if (dz.numel() == 0) {
      gx.zero_();
      gw.zero_();
    } else {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv_bias_act_bwd_dw", [&] {
        if (a.cl) dw::backward_nhwc<scalar_t>(dz, x, w, gx, gw, gb_scratch, a.g);
        else dw::backward_nchw<scalar_t>(dz, x, w, gx, gw, gb_scratch, a.g);
      });
    }
  } else {
    std::tie(gx, gw) = aten_conv_backward(dz, x, w, a, stride, padding, dil, groups);
  }
  const bool f64 = x.scalar_type() == at::kDouble;
  at::Tensor gb = at::empty({bias ? a.Cout : 0}, x.options().dtype(f64 ? at::kDouble : at::kFloat));
  if (bias) {
    for (int64_t c = 0; c < a.Cout; ++c) {
      if (f64) gb.data_ptr<double>()[c] = gsum[c];
      else gb.data_ptr<float>()[c] = static_cast<float>(gsum[c]);
    }
  }
  at::Tensor gr = r ? dz : at::empty({0}, x.options());
  return {gx, gw, gb, gr};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastops, CPU, m) {
  m.impl("conv_bias_act", &conv_bias_act_cpu);
  m.impl("conv_bias_act_backward", &conv_bias_act_backward_cpu);
}

}  // namespace fastops
