// Depthwise conv2d on the CPU: forward and backward, NCHW and channels_last, float / double / half / bf16.
//
// NCHW: one (n, c) plane at a time is copied, zero-padded and split into `stride` column phases in a
// thread-local fp32 buffer: column j of phase p holds padded column j*stride + p, so every tap of every
// stride reads a *contiguous* run of the buffer and the inner loop is a plain SIMD FMA over a tile of
// outputs kept in registers. Converting half/bf16 to fp32 happens in that same copy.
// channels_last: channels are contiguous, so the SIMD loop runs over a tile of channels for one output
// pixel, with the weights pre-transposed to (kh, kw, C).
// The loops live in cpu/depthwise_kernels.h (shared with conv_bias_act).
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "common.h"
#include "cpu/depthwise_kernels.h"

namespace fastops {
namespace {

using dw::backward_nchw;
using dw::backward_nhwc;
using dw::forward_nchw;
using dw::forward_nhwc;

at::Tensor depthwise_conv2d_cpu(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_depthwise_args(input, weight, bias);
  TORCH_CHECK(input.device().is_cpu(), "fastops.depthwise_conv2d (cpu): input must be a CPU tensor");
  const Conv2dGeom g = make_conv2d_geom(input, weight, stride, padding, dilation);
  const bool cl = is_channels_last(input);
  const at::Tensor x = cl ? input : input.contiguous();
  at::Tensor y = at::empty({g.N, g.C, g.OH, g.OW}, input.options().memory_format(layout_of(input)));
  if (y.numel() == 0) return y;
  const at::Tensor* b = (bias.has_value() && bias->defined()) ? &*bias : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "depthwise_conv2d_cpu", [&] {
    if (cl) forward_nhwc<scalar_t>(x, weight, b, y, g);
    else forward_nchw<scalar_t>(x, weight, b, y, g);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> depthwise_conv2d_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_depthwise_args(input, weight, c10::nullopt);
  TORCH_CHECK(input.device().is_cpu(), "fastops.depthwise_conv2d_backward (cpu): input must be a CPU tensor");
  const Conv2dGeom g = make_conv2d_geom(input, weight, stride, padding, dilation);
  check_depthwise_grad_output(grad_output, input, g);
  const bool cl = is_channels_last(input);
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor x = input.contiguous(fmt);
  const at::Tensor go = grad_output.contiguous(fmt);
  at::Tensor gi = at::empty_like(x, x.options(), fmt);
  at::Tensor gw = at::empty({g.C, 1, g.KH, g.KW}, weight.options());
  at::Tensor gb = at::empty({g.C}, weight.options());
  // x may be empty while the output is not (H or W == 0 with padding): the kernels handle that.
  if (go.numel() == 0) {
    gi.zero_(); gw.zero_(); gb.zero_();
    return {gi, gw, gb};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "depthwise_conv2d_backward_cpu", [&] {
    if (cl) backward_nhwc<scalar_t>(go, x, weight, gi, gw, gb, g);
    else backward_nchw<scalar_t>(go, x, weight, gi, gw, gb, g);
  });
  return {gi, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastops, CPU, m) {
  m.impl("depthwise_conv2d", &depthwise_conv2d_cpu);
  m.impl("depthwise_conv2d_backward", &depthwise_conv2d_backward_cpu);
}

}  // namespace fastops