// Shared helpers for fastops kernels (CPU and CUDA).
#pragma once

#include <algorithm>

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/util/ArrayRef.h>

namespace fastops {

// A 4-D tensor counts as channels_last when its strides say so and it is not also plain contiguous
// (tensors with C == 1 or H == W == 1 satisfy both; those take the NCHW path). The Python side uses
// the same rule (fastops/_layout.py), so the fake kernels agree with the real ones on output strides.
inline bool is_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

inline at::MemoryFormat layout_of(const at::Tensor& t) {
  return is_channels_last(t) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// Geometry of a 2-D sliding-window op; padding may differ before and after (padding="same").
struct Conv2dGeom {
  int64_t N, C, H, W;       // input
  int64_t KH, KW;           // kernel
  int64_t SH, SW;           // stride
  int64_t PT, PL, PB, PR;   // padding top / left / bottom / right
  int64_t DH, DW;           // dilation
  int64_t OH, OW;           // output
};

// padding is [top, left, bottom, right] (the order of the op schemas).
inline Conv2dGeom make_conv2d_geom(const at::Tensor& input, const at::Tensor& weight, c10::IntArrayRef stride,
                                   c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  TORCH_CHECK(stride.size() == 2, "fastops: stride must have 2 values, got ", stride.size());
  TORCH_CHECK(padding.size() == 4, "fastops: padding must have 4 values [top, left, bottom, right], got ",
              padding.size());
  TORCH_CHECK(dilation.size() == 2, "fastops: dilation must have 2 values, got ", dilation.size());
  Conv2dGeom g;
  g.N = input.size(0); g.C = input.size(1); g.H = input.size(2); g.W = input.size(3);
  g.KH = weight.size(2); g.KW = weight.size(3);
  g.SH = stride[0]; g.SW = stride[1];
  g.PT = padding[0]; g.PL = padding[1]; g.PB = padding[2]; g.PR = padding[3];
  g.DH = dilation[0]; g.DW = dilation[1];
  TORCH_CHECK(g.SH > 0 && g.SW > 0, "fastops: stride must be positive, got ", stride);
  TORCH_CHECK(g.DH > 0 && g.DW > 0, "fastops: dilation must be positive, got ", dilation);
  TORCH_CHECK(g.PT >= 0 && g.PL >= 0 && g.PB >= 0 && g.PR >= 0, "fastops: padding must be >= 0, got ", padding);
  // The Python fronts' MAX_CONV_ARG: the kernels' offsets and scratch sizes stay far from overflowing int64.
  constexpr int64_t kMaxArg = int64_t(1) << 20;
  TORCH_CHECK(std::max({g.SH, g.SW, g.DH, g.DW, g.PT, g.PL, g.PB, g.PR}) <= kMaxArg,
              "fastops: stride, padding and dilation must be <= ", kMaxArg, ", got stride ", stride, ", padding ",
              padding, ", dilation ", dilation);
  const int64_t eff_h = g.DH * (g.KH - 1) + 1, eff_w = g.DW * (g.KW - 1) + 1;
  TORCH_CHECK(g.H + g.PT + g.PB >= eff_h && g.W + g.PL + g.PR >= eff_w,
              "fastops: the dilated kernel (", eff_h, "x", eff_w, ") is larger than the padded input (",
              g.H + g.PT + g.PB, "x", g.W + g.PL + g.PR, ")");
  g.OH = (g.H + g.PT + g.PB - eff_h) / g.SH + 1;
  g.OW = (g.W + g.PL + g.PR - eff_w) / g.SW + 1;
  return g;
}

// Checks shared by every depthwise entry point; the Python front gives friendlier messages first,
// these guard direct torch.ops calls so that no input can read out of bounds.
inline void check_depthwise_args(const at::Tensor& input, const at::Tensor& weight,
                                 const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(input.dim() == 4, "fastops.depthwise_conv2d: input must be 4-D (N, C, H, W), got ", input.dim(), "-D");
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == input.size(1) && weight.size(1) == 1,
              "fastops.depthwise_conv2d: weight must have shape (C, 1, kh, kw) with C = ", input.size(1),
              ", got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == input.scalar_type(), "fastops.depthwise_conv2d: weight dtype ",
              weight.scalar_type(), " differs from input dtype ", input.scalar_type());
  TORCH_CHECK(weight.device() == input.device(), "fastops.depthwise_conv2d: weight is on ", weight.device(),
              " but input is on ", input.device());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == input.size(1),
                "fastops.depthwise_conv2d: bias must have shape (C,) with C = ", input.size(1), ", got ",
                bias->sizes());
    TORCH_CHECK(bias->scalar_type() == input.scalar_type() && bias->device() == input.device(),
                "fastops.depthwise_conv2d: bias must match input's dtype and device");
  }
}

// grad_output of depthwise_conv2d_backward must be the forward output's shape, dtype and device.
inline void check_depthwise_grad_output(const at::Tensor& grad_output, const at::Tensor& input, const Conv2dGeom& g) {
  TORCH_CHECK(grad_output.dim() == 4 && grad_output.size(0) == g.N && grad_output.size(1) == g.C &&
                  grad_output.size(2) == g.OH && grad_output.size(3) == g.OW,
              "fastops.depthwise_conv2d_backward: grad_output must have shape (", g.N, ", ", g.C, ", ", g.OH, ", ",
              g.OW, "), got ", grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(),
              "fastops.depthwise_conv2d_backward: grad_output dtype must match input");
  TORCH_CHECK(grad_output.device() == input.device(), "fastops.depthwise_conv2d_backward: grad_output is on ",
              grad_output.device(), " but input is on ", input.device());
}

}  // namespace fastops
