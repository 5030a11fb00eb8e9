// Argument checks of the bn_act and conv_bias_act entry points, shared by the CPU and CUDA backends. The
// Python front checks first with friendlier messages; these guard direct torch.ops calls, so that no input
// can make a kernel read or write out of bounds. Host code only.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <array>

#include "common.h"

namespace fastops {
namespace convbn {

enum class Dev { kCpu, kCuda };

inline const char* dev_tag(Dev d) { return d == Dev::kCuda ? " (cuda)" : " (cpu)"; }

inline const at::Tensor* opt(const c10::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined()) ? &*t : nullptr;
}

// x / the tensor every other argument is compared with: on the backend's device, a floating dtype the
// backend's kernels take (float64 on the CPU only).
inline void check_device_dtype(const char* op, const char* name, const at::Tensor& x, Dev d) {
  const bool on = d == Dev::kCuda ? x.is_cuda() : x.device().is_cpu();
  TORCH_CHECK(on, "fastops.", op, dev_tag(d), ": ", name, " must be a ", d == Dev::kCuda ? "CUDA" : "CPU",
              " tensor, got ", x.device());
  const auto st = x.scalar_type();
  const bool ok = st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || (d == Dev::kCpu && st == at::kDouble);
  TORCH_CHECK(ok, "fastops.", op, dev_tag(d), ": ", name, " must be float16, bfloat16 or float32",
              d == Dev::kCpu ? " (or float64)" : "", ", got ", st);
}

// A (C,) per-channel parameter on x's device: float32 (float64 also taken on the CPU).
inline void check_channel_param(const char* op, const char* name, const at::Tensor* t, const at::Tensor& x,
                                int64_t C, Dev d) {
  if (!t) return;
  TORCH_CHECK(t->device() == x.device(), "fastops.", op, ": ", name, " is on ", t->device(), " but x is on ",
              x.device());
  TORCH_CHECK(t->dim() == 1 && t->size(0) == C, "fastops.", op, ": ", name, " must have shape (", C, ",), got ",
              t->sizes());
  const auto st = t->scalar_type();
  TORCH_CHECK(st == at::kFloat || (d == Dev::kCpu && st == at::kDouble), "fastops.", op, dev_tag(d), ": ", name,
              " must be float32, got ", st);
}

// A tensor of a given shape with x's dtype and device (residual, grad_out, out).
inline void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x,
                       c10::IntArrayRef shape) {
  TORCH_CHECK(t.device() == x.device(), "fastops.", op, ": ", name, " is on ", t.device(), " but x is on ",
              x.device());
  TORCH_CHECK(t.sizes() == shape, "fastops.", op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "fastops.", op, ": ", name, " dtype ", t.scalar_type(),
              " differs from x's ", x.scalar_type());
}

// bn_act's x: 4-D, NCHW- or channels_last-contiguous.
inline void check_bn_x(const char* op, const char* name, const at::Tensor& x, Dev d) {
  check_device_dtype(op, name, x, d);
  TORCH_CHECK(x.dim() == 4, "fastops.", op, ": ", name, " must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK(x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast), "fastops.", op, ": ", name,
              " must be NCHW-contiguous or channels_last-contiguous");
}

struct ConvArgs {
  Conv2dGeom g;  // g.C is Cin
  int64_t Cout;
  bool depthwise;  // groups == Cin == Cout
  bool cl;
  at::MemoryFormat fmt;
  std::array<int64_t, 4> out_shape() const { return {g.N, Cout, g.OH, g.OW}; }
};

// conv_bias_act's x, weight (Cout, Cin / groups, kh, kw), bias (Cout,) and geometry.
inline ConvArgs check_conv(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor* bias,
                           c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                           int64_t groups, Dev d) {
  check_device_dtype(op, "x", x, d);
  TORCH_CHECK(x.dim() == 4, "fastops.", op, ": x must be 4-D (N, Cin, H, W), got ", x.dim(), "-D");
  TORCH_CHECK(weight.device() == x.device(), "fastops.", op, ": weight is on ", weight.device(), " but x is on ",
              x.device());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "fastops.", op, ": weight dtype ", weight.scalar_type(),
              " differs from x's ", x.scalar_type());
  TORCH_CHECK(groups >= 1, "fastops.", op, ": groups must be >= 1, got ", groups);
  const int64_t Cin = x.size(1);
  TORCH_CHECK(Cin % groups == 0, "fastops.", op, ": x's channels (", Cin, ") must be divisible by groups (", groups,
              ")");
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == Cin / groups && weight.size(0) % groups == 0 &&
                  weight.size(0) > 0,
              "fastops.", op, ": weight must have shape (Cout, Cin/groups, kh, kw) with Cin/groups = ", Cin / groups,
              " and Cout a positive multiple of groups = ", groups, ", got ", weight.sizes());
  ConvArgs a;
  a.Cout = weight.size(0);
  check_channel_param(op, "bias", bias, x, a.Cout, d);
  a.g = make_conv2d_geom(x, weight, stride, padding, dilation);
  a.depthwise = groups == Cin && a.Cout == Cin;
  a.cl = is_channels_last(x);
  a.fmt = a.cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  return a;
}

// residual / grad_out / out of conv_bias_act: the output's shape, x's dtype and device.
inline void check_like_out(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x,
                           const ConvArgs& a) {
  check_like(op, name, t, x, a.out_shape());
}

}  // namespace convbn
}  // namespace fastops
