// Depthwise conv2d on CUDA: forward and backward, NCHW and channels_last, float / half / bf16 (double too,
// though the Python registry does not route float64 here). The kernels live in cuda/depthwise_kernels.cuh
// (shared with conv_bias_act.cu, which fuses its epilogue into them); this file holds the entry points.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "common.h"
#include "cuda/depthwise_kernels.cuh"

namespace fastops {
namespace {

using namespace dw_cuda;

at::Tensor depthwise_conv2d_cuda(const at::Tensor& input, const at::Tensor& weight,
                                 const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_depthwise_args(input, weight, bias);
  TORCH_CHECK(input.is_cuda(), "fastops.depthwise_conv2d (cuda): input must be a CUDA tensor, got ", input.device());
  const c10::cuda::CUDAGuard guard(input.device());
  const Conv2dGeom g = make_conv2d_geom(input, weight, stride, padding, dilation);
  const bool cl = is_channels_last(input);
  const at::Tensor x = cl ? input : input.contiguous();
  at::Tensor y = at::empty({g.N, g.C, g.OH, g.OW}, input.options().memory_format(layout_of(input)));
  if (y.numel() == 0) return y;
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "depthwise_conv2d_cuda", [&] {
    const scalar_t* bp = has_bias ? b.const_data_ptr<scalar_t>() : nullptr;
    const BiasEpilogue<scalar_t, at::opmath_type<scalar_t>> epi{bp};
    if (cl) forward_nhwc<scalar_t>(x, weight, epi, y, g, stream);
    else forward_nchw<scalar_t>(x, weight, epi, y, g, stream);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> depthwise_conv2d_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_depthwise_args(input, weight, c10::nullopt);
  TORCH_CHECK(input.is_cuda(), "fastops.depthwise_conv2d_backward (cuda): input must be a CUDA tensor, got ",
              input.device());
  const c10::cuda::CUDAGuard guard(input.device());
  const Conv2dGeom g = make_conv2d_geom(input, weight, stride, padding, dilation);
  check_depthwise_grad_output(grad_output, input, g);
  const bool cl = is_channels_last(input);
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor x = input.contiguous(fmt);
  const at::Tensor go = grad_output.contiguous(fmt);
  at::Tensor gi = at::empty({g.N, g.C, g.H, g.W}, x.options().memory_format(fmt));
  at::Tensor gw = at::empty({g.C, 1, g.KH, g.KW}, weight.options());
  at::Tensor gb = at::empty({g.C}, weight.options());
  if (go.numel() == 0) {  // N == 0 or C == 0: nothing flows back
    gi.zero_();
    gw.zero_();
    gb.zero_();
    return {gi, gw, gb};
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "depthwise_conv2d_backward_cuda", [&] {
    // An empty input (H or W == 0 with padding) still has a grad_output: gi is empty, gw is zero (every
    // tap reads padding) and gb is the sum of grad_output, which the weight kernels give as they are.
    if (gi.numel() > 0) backward_input<scalar_t>(go, weight, gi, g, cl, stream);
    backward_weight<scalar_t>(go, x, gw, gb, g, cl, stream);
  });
  return {gi, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastops, CUDA, m) {
  m.impl("depthwise_conv2d", &depthwise_conv2d_cuda);
  m.impl("depthwise_conv2d_backward", &depthwise_conv2d_backward_cuda);
}

}  // namespace fastops
