// The activations of bn_act / conv_bias_act (and their derivatives), shared by the CPU and CUDA kernels.
// Everything is computed in the accumulation type (fp32, or fp64 for fp64 tensors).
#pragma once

#include <c10/util/Exception.h>

#include <cmath>
#include <string>

#ifdef __CUDACC__
#define FASTOPS_HD __host__ __device__ __forceinline__
#else
#define FASTOPS_HD inline
#endif

namespace fastops {
namespace bnact {

enum class Act : int { kNone = 0, kRelu = 1, kRelu6 = 2, kSilu = 3, kGelu = 4, kHardswish = 5 };

inline Act parse_act(const std::string& name, const char* op) {
  if (name == "none") return Act::kNone;
  if (name == "relu") return Act::kRelu;
  if (name == "relu6") return Act::kRelu6;
  if (name == "silu") return Act::kSilu;
  if (name == "gelu") return Act::kGelu;
  if (name == "hardswish") return Act::kHardswish;
  TORCH_CHECK(false, "fastops.", op, ": act must be one of none, relu, relu6, silu, gelu, hardswish; got '", name,
              "'");
  return Act::kNone;
}

// act' can be read from the activation's output for these (no need to recompute the pre-activation).
inline bool grad_from_output(Act a) { return a == Act::kNone || a == Act::kRelu || a == Act::kRelu6; }

template <typename T>
FASTOPS_HD T act_forward(Act a, T z) {
  switch (a) {
    // Written so that NaN stays NaN, as in torch.relu / relu6 (z > 0 ? z : 0 would turn it into 0).
    case Act::kRelu: return z < T(0) ? T(0) : z;
    case Act::kRelu6: return z < T(0) ? T(0) : (z > T(6) ? T(6) : z);
    case Act::kSilu: return z / (T(1) + exp(-z));
    case Act::kGelu: return T(0.5) * z * (T(1) + erf(z * T(0.70710678118654752440)));
    case Act::kHardswish: {
      const T r = z + T(3);
      return z * (r > T(0) ? (r < T(6) ? r : T(6)) : T(0)) * T(1.0 / 6.0);
    }
    default: return z;
  }
}

// d act / dz at the pre-activation z.
template <typename T>
FASTOPS_HD T act_grad(Act a, T z) {
  switch (a) {
    case Act::kRelu: return z > T(0) ? T(1) : T(0);
    case Act::kRelu6: return (z > T(0) && z < T(6)) ? T(1) : T(0);
    case Act::kSilu: {
      const T s = T(1) / (T(1) + exp(-z));
      return s * (T(1) + z * (T(1) - s));
    }
    case Act::kGelu:
      return T(0.5) * (T(1) + erf(z * T(0.70710678118654752440))) +
             z * exp(T(-0.5) * z * z) * T(0.39894228040143267794);
    case Act::kHardswish:
      // As PyTorch's CPU hardswish backward: 0 for z <= -3, 1 for z >= 3, z / 3 + 1/2 between.
      return z <= T(-3) ? T(0) : (z < T(3) ? z * T(1.0 / 3.0) + T(0.5) : T(1));
    default: return T(1);
  }
}

// d act / dz read from the output y = act(z); only for grad_from_output(a) activations.
template <typename T>
FASTOPS_HD T act_grad_from_output(Act a, T y) {
  switch (a) {
    case Act::kRelu: return y > T(0) ? T(1) : T(0);
    case Act::kRelu6: return (y > T(0) && y < T(6)) ? T(1) : T(0);
    default: return T(1);
  }
}

}  // namespace bnact
}  // namespace fastops
