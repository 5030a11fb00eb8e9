// Every fastops schema lives here: TORCH_LIBRARY(fastops, m). Kernels register per backend in
// csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cu (CUDA); fake kernels and autograd are registered from
// Python (fastops/ops/*.py).
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "cpu/packed_weights.h"
#include "cpu/simd.h"

namespace fastops {

static std::string build_info() {
  std::string s = "cuda_archs=";
  s += FASTOPS_CUDA_ARCHS;
#ifdef FASTOPS_WITH_CUDA
  s += ";with_cuda=1";
#else
  s += ";with_cuda=0";
#endif
#ifdef _OPENMP
  s += ";openmp=1";
#endif
#if defined(__AVX512F__)
  s += ";cpu_isa=avx512";
#elif defined(__AVX2__)
  s += ";cpu_isa=avx2";
#elif defined(__SSE2__)
  s += ";cpu_isa=sse2";
#endif
  // 1x1 fp32 convolutions (and linear_act) on fastops' own GEMM, cpu/gemm_kernels.h
  s += fastops::simd::kFmaVectors ? ";cpu_gemm=1" : ";cpu_gemm=0";
  return s;
}

TORCH_LIBRARY(fastops, m) {
  // padding is [top, left, bottom, right]; the Python front turns ints, pairs, "same" and "valid" into it.
  m.def("depthwise_conv2d(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[4] padding, "
        "int[2] dilation) -> Tensor");
  m.def("depthwise_conv2d_backward(Tensor grad_output, Tensor input, Tensor weight, int[2] stride, "
        "int[4] padding, int[2] dilation) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  // Squeeze-and-excitation: out = out_act(x * gate(fc2(act(fc1(mean_hw(x))))) + residual).
  // fc1_weight (R, C), fc2_weight (C, R); act relu|silu|gelu, gate sigmoid|hard_sigmoid, out_act none|relu.
  // pooled (N, C) fp32 = mean_hw(x), kept for the backward.
  m.def("squeeze_excite(Tensor x, Tensor fc1_weight, Tensor? fc1_bias, Tensor fc2_weight, Tensor? fc2_bias, "
        "Tensor? residual, str act, str gate, str out_act) -> (Tensor out, Tensor pooled)");
  // grad_residual is empty (numel 0) when has_residual is false. out's values are read only for
  // out_act="relu" (its mask); the autograd passes x in its place otherwise.
  m.def("squeeze_excite_backward(Tensor grad_out, Tensor x, Tensor out, Tensor pooled, Tensor fc1_weight, "
        "Tensor? fc1_bias, Tensor fc2_weight, Tensor? fc2_bias, bool has_residual, str act, str gate, "
        "str out_act) -> (Tensor grad_x, Tensor grad_fc1_weight, Tensor grad_fc1_bias, Tensor grad_fc2_weight, "
        "Tensor grad_fc2_bias, Tensor grad_residual)");
  // The same after a 1x1 convolution: x_se = conv1x1(x, weight) + bias, weight (C, C_in, 1, 1) in x's dtype,
  // bias (C,) fp32 (fp64 for fp64 x). CPU only; its backward is conv_bias_act's and squeeze_excite's.
  m.def("conv1x1_squeeze_excite(Tensor x, Tensor weight, Tensor? bias, Tensor fc1_weight, Tensor? fc1_bias, "
        "Tensor fc2_weight, Tensor? fc2_bias, Tensor? residual, str act, str gate, str out_act) -> "
        "(Tensor out, Tensor pooled)");
  // CBAM: ca = gate(mlp(mean_hw x) + mlp(max_hw x)); x1 = x * ca; s = [mean_c x1, max_c x1];
  // sa = gate(bn(conv_kxk(s))); out = x1 * sa. conv_weight (1, 2, k, k), odd k, padding k/2.
  // pooled (N, 2, C) fp32 = [mean_hw x, max_hw x]; spatial (N, 2, H, W) fp32 = s; stats (2,) fp32 = the
  // [mean, biased var] the BN normalised with (batch stats when training, else bn_mean / bn_var).
  m.def("cbam(Tensor x, Tensor fc1_weight, Tensor? fc1_bias, Tensor fc2_weight, Tensor? fc2_bias, "
        "Tensor conv_weight, Tensor bn_weight, Tensor bn_bias, Tensor bn_mean, Tensor bn_var, float eps, "
        "bool training, str act, str gate) -> (Tensor out, Tensor pooled, Tensor spatial, Tensor stats)");
  m.def("cbam_backward(Tensor grad_out, Tensor x, Tensor pooled, Tensor spatial, Tensor stats, "
        "Tensor fc1_weight, Tensor? fc1_bias, Tensor fc2_weight, Tensor? fc2_bias, Tensor conv_weight, "
        "Tensor bn_weight, Tensor bn_bias, float eps, bool training, str act, str gate) -> (Tensor grad_x, "
        "Tensor grad_fc1_weight, Tensor grad_fc1_bias, Tensor grad_fc2_weight, Tensor grad_fc2_bias, "
        "Tensor grad_conv_weight, Tensor grad_bn_weight, Tensor grad_bn_bias)");
  // Swin (shifted-)window attention over the un-shifted, un-padded map. qkv (B, H, W, 3C) contiguous,
  // channels [q | k | v], each num_heads x head_dim. Tokens are rolled by (-shift), zero-padded to window
  // multiples (padding tokens carry pad_qkv), split into windows; scores = q.k^T * scale + rel_pos_bias
  // (+ -100 between different shift regions when shift != 0); softmax; .v; results go back to their
  // original positions. rel_pos_bias (num_heads, N, N) fp32 with N = wh * ww; pad_qkv (3C,) fp32.
  // out (B, H, W, C) in qkv's dtype; lse (B, nW, num_heads, N) fp32: each query row's log-sum-exp, with
  // windows numbered row-major over the padded shifted grid (rows of padding queries are not used).
  m.def("window_attention(Tensor qkv, int num_heads, int[2] window_size, int[2] shift_size, "
        "Tensor? rel_pos_bias, float scale, Tensor? pad_qkv) -> (Tensor out, Tensor lse)");
  // grad_rel_pos_bias (num_heads, N, N) fp32, or empty when bias_grad is false; grad_pad_qkv (3C,) fp32
  // (the summed gradient of every padding token), or empty when pad_grad is false.
  m.def("window_attention_backward(Tensor grad_out, Tensor qkv, Tensor out, Tensor lse, int num_heads, "
        "int[2] window_size, int[2] shift_size, Tensor? rel_pos_bias, float scale, Tensor? pad_qkv, "
        "bool bias_grad, bool pad_grad) -> (Tensor grad_qkv, Tensor grad_rel_pos_bias, Tensor grad_pad_qkv)");
  // PVT spatial-reduction attention. q (B, N, C) contiguous (the q Linear's output), kv (B, Nr, 2C)
  // contiguous (the kv Linear's output, channels [k | v], each num_heads x head_dim). Per head:
  // softmax(scale * q k^T) v, written to out (B, N, C) in q's dtype; lse (B, num_heads, N) fp32 (fp64 for
  // fp64 inputs): each query row's natural-log log-sum-exp of the scaled scores, kept for the backward.
  m.def("sr_attention(Tensor q, Tensor kv, int num_heads, float scale) -> (Tensor out, Tensor lse)");
  m.def("sr_attention_backward(Tensor grad_out, Tensor q, Tensor kv, Tensor out, Tensor lse, int num_heads, "
        "float scale) -> (Tensor grad_q, Tensor grad_kv)");
  // PVT's spatial reduction of the keys' and values' source: x (B, N, C) contiguous tokens of an (H, W) map
  // (feat_size). linear=false: y = Conv2d(C, C, k = stride = sr_ratio)(x as a map), Nr = (H/sr)(W/sr);
  // linear=true: y = Conv2d 1x1 (weight (C, C, 1, 1)) of AdaptiveAvgPool2d(7)(x), Nr = 49. Then
  // out = LayerNorm(y) (eps, norm_weight, norm_bias), followed by exact GELU when linear. out (B, Nr, C) in
  // x's dtype; y (B, Nr, C) and stats (B, Nr, 2) = [mean, rstd] of y's rows are fp32 (fp64 for fp64 inputs),
  // kept for the backward.
  m.def("spatial_reduction(Tensor x, int[2] feat_size, Tensor weight, Tensor? bias, Tensor norm_weight, "
        "Tensor norm_bias, int sr_ratio, bool linear, float eps) -> (Tensor out, Tensor y, Tensor stats)");
  // grad_bias is empty (numel 0) when bias_grad is false; every gradient is in x's dtype.
  m.def("spatial_reduction_backward(Tensor grad_out, Tensor x, int[2] feat_size, Tensor weight, "
        "Tensor norm_weight, Tensor norm_bias, Tensor y, Tensor stats, int sr_ratio, bool linear, "
        "bool bias_grad) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias, Tensor grad_norm_weight, "
        "Tensor grad_norm_bias)");
  // BatchNorm (+ residual) + activation on x (N, C, H, W), NCHW or channels_last (out has x's layout):
  //   out = act((x - mean) * rsqrt(var + eps) * weight + bias + residual),
  // act one of none, relu, relu6, silu, gelu (exact), hardswish. weight / bias / mean / var are fp32 (C,)
  // (weight None = 1, bias None = 0). training=false: mean / var are the running statistics (required).
  // training=true: mean / var are ignored; the batch mean and biased variance over (N, H, W) are used.
  // save_mean / save_var (fp32 (C,)) are the statistics used (new tensors), kept for the backward; the
  // caller updates running statistics from them. residual, when given, has x's shape, dtype and layout.
  m.def("bn_act(Tensor x, Tensor? weight, Tensor? bias, Tensor? mean, Tensor? var, Tensor? residual, "
        "float eps, str act, bool training) -> (Tensor out, Tensor save_mean, Tensor save_var)");
  // grad_x and grad_residual in x's dtype and layout (grad_residual is empty, numel 0, without residual);
  // grad_weight and grad_bias fp32 (C,). training=true differentiates through the batch statistics.
  m.def("bn_act_backward(Tensor grad_out, Tensor x, Tensor? weight, Tensor? bias, Tensor save_mean, "
        "Tensor save_var, Tensor? residual, float eps, str act, bool training) -> (Tensor grad_x, "
        "Tensor grad_weight, Tensor grad_bias, Tensor grad_residual)");
  // Convolution with a fused epilogue: out = act(conv2d(x, weight, groups) + bias + residual).
  // x (N, Cin, H, W) NCHW or channels_last (out has x's layout); weight (Cout, Cin/groups, kh, kw) in x's
  // dtype; bias fp32 (Cout,) or None; residual the output's shape, dtype and layout, or None; padding is
  // [top, left, bottom, right]; act as in bn_act. Accumulation in fp32.
  m.def("conv_bias_act(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, int[2] stride, int[4] padding, "
        "int[2] dilation, int groups, str act) -> Tensor");
  // out: the forward's output, whose values are read only for relu / relu6 (act' from it); for none (act' = 1)
  // the autograd passes grad_out in its place, and other acts recompute the pre-activation. grad_x, grad_weight and grad_residual in x's dtype (grad_residual empty without
  // residual); grad_bias fp32 (Cout,) (empty when bias is None).
  m.def("conv_bias_act_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, Tensor? residual, "
        "Tensor out, int[2] stride, int[4] padding, int[2] dilation, int groups, str act) -> (Tensor grad_x, "
        "Tensor grad_weight, Tensor grad_bias, Tensor grad_residual)");
  m.def("_build_info() -> str", &build_info);
}

}  // namespace fastops

// _keep_packed_weights(flag) -> the previous flag: whether the calls that follow in this thread may keep
// packed weight copies between calls (cpu/packed_weights.h). A plain C function, not an op: it runs twice per
// eager call, where an op dispatch would cost microseconds.
static PyObject* keep_packed_weights(PyObject*, PyObject* flag) {
  const int on = PyObject_IsTrue(flag);
  if (on < 0) return nullptr;
  bool& keep = fastops::PackedWeights::keep_flag();
  const bool prev = keep;
  keep = on != 0;
  return PyBool_FromLong(prev);
}

// Loading fastops._C from Python runs the static registrations above; the module holds that one function.
extern "C" PyObject* PyInit__C(void) {
  static PyMethodDef methods[] = {{"_keep_packed_weights", keep_packed_weights, METH_O, nullptr},
                                  {nullptr, nullptr, 0, nullptr}};
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&def);
}
