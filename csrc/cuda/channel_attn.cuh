// Channel-MLP pieces shared by the CUDA channel-attention kernels (squeeze_excite.cu defines them, cbam.cu
// uses them too): the activation names, a small fp32 GEMM with a fused bias + activation epilogue, and the
// activation-derivative kernel.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <string_view>

#include "cuda/launch_common.cuh"

namespace fastops {
namespace attn_cuda {

enum class Act : int { kNone = 0, kRelu = 1, kSilu = 2, kGelu = 3, kSigmoid = 4, kHardSigmoid = 5 };

// relu6(z + 3) / 6 written so that NaN stays NaN, as in torch (fmaxf / fminf would turn it into 0 / 6).
__device__ __forceinline__ float hard_sigmoidf_(float z) {
  const float t = z + 3.f;
  return (t < 0.f ? 0.f : t > 6.f ? 6.f : t) / 6.f;
}

// arg is "act" (relu|silu|gelu), "gate" (sigmoid|hard_sigmoid) or "out_act" (none|relu).
Act parse_act(std::string_view name, const char* op, std::string_view arg);

// C[m, j] = sum_k A(m, k) * B(k, j) in fp32, with A(m, k) = A[m*sam + k*sak], B(k, j) = B[k*sbk + j*sbj].
// Epilogue: z = C + bias_mult * bias[j] (bias may be null); pre[m*J + j] = z and post[m*J + j] = act(z)
// where those are non-null. Fixed summation order: the same call gives the same bits. Written here rather
// than taken from cuBLAS because cuBLAS may use TF32 for fp32 under torch's allow_tf32 settings.
void gemm_f32(cudaStream_t stream, int64_t M, int64_t J, int64_t K, const float* A, int64_t sam, int64_t sak,
              const float* B, int64_t sbk, int64_t sbj, const float* bias, float bias_mult, float* pre,
              float* post, Act act);

// out[r, c] = grad[(r / grad_row_div) * cols + c] * act'(z[r, c]) for a (rows, cols) row-major z.
void act_backward_f32(cudaStream_t stream, const float* grad, int64_t grad_row_div, const float* z, float* out,
                      int64_t rows, int64_t cols, Act act);

// Host-side argument checks shared by both ops (the Python front gives friendlier errors first; these
// guard direct torch.ops calls). -----------------------------------------------------------------------

inline void check_same(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "fastops.", op, ": ", name, " dtype ", t.scalar_type(),
              " differs from x dtype ", x.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "fastops.", op, ": ", name, " is on ", t.device(), " but x is on ",
              x.device());
}

// x (N, C, H, W) on CUDA in fp32 / fp16 / bf16 and the channel MLP: fc1_weight (R, C), fc2_weight (C, R),
// optional biases (R,), (C,), all of x's dtype and device.
inline void check_mlp_args(const char* op, const at::Tensor& x, const at::Tensor& w1,
                           const c10::optional<at::Tensor>& b1,
                           const at::Tensor& w2, const c10::optional<at::Tensor>& b2) {
  TORCH_CHECK(x.is_cuda(), "fastops.", op, " (cuda): x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 4, "fastops.", op, ": x must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, "fastops.", op,
              " (cuda): x must be float32, float16 or bfloat16, got ", st);
  TORCH_CHECK(x.size(0) >= 1 && x.size(1) >= 1 && x.size(2) * x.size(3) >= 1, "fastops.", op,
              ": x must have N, C >= 1 and H * W >= 1, got shape ", x.sizes());
  const int64_t C = x.size(1);
  TORCH_CHECK(w1.dim() == 2 && w1.size(1) == C && w1.size(0) >= 1, "fastops.", op,
              ": fc1_weight must have shape (R, C) with C = ", C, ", got ", w1.sizes());
  const int64_t R = w1.size(0);
  TORCH_CHECK(w2.dim() == 2 && w2.size(0) == C && w2.size(1) == R, "fastops.", op,
              ": fc2_weight must have shape (C, R) = (", C, ", ", R, "), got ", w2.sizes());
  check_same(op, "fc1_weight", w1, x);
  check_same(op, "fc2_weight", w2, x);
  if (b1.has_value() && b1->defined()) {
    TORCH_CHECK(b1->dim() == 1 && b1->size(0) == R, "fastops.", op, ": fc1_bias must have shape (", R, ",), got ",
                b1->sizes());
    check_same(op, "fc1_bias", *b1, x);
  }
  if (b2.has_value() && b2->defined()) {
    TORCH_CHECK(b2->dim() == 1 && b2->size(0) == C, "fastops.", op, ": fc2_bias must have shape (", C, ",), got ",
                b2->sizes());
    check_same(op, "fc2_bias", *b2, x);
  }
}

// Launch geometry and vector access shared by the kernels of both ops. ---------------------------------

using namespace launch;  // kThreads, ceil_div, blocks_for, Vec / load_vec / store_vec, ...

// Widest V (<= 16 bytes of T) with inner % V == 0, every T pointer aligned for V-wide accesses and every
// float pointer (fp32 maps read V at a time) aligned for V floats.
template <typename T>
int pick_vec(int64_t inner, std::initializer_list<const void*> tptrs, std::initializer_list<const float*> fptrs = {}) {
  for (int v = kMaxVec<T>; v > 1; v /= 2) {
    bool ok = inner % v == 0;
    for (const void* p : tptrs) ok = ok && aligned_to(p, v * static_cast<int64_t>(sizeof(T)));
    for (const float* p : fptrs) ok = ok && aligned_to(p, v * static_cast<int64_t>(sizeof(float)));
    if (ok) return v;
  }
  return 1;
}

// Number of splits of a reduction of `len` units done by `items` independent workers, so that about
// `target` workers run and each split keeps at least `min_chunk` units.
inline int64_t pick_splits(int64_t items, int64_t len, int64_t min_chunk, int64_t target) {
  int64_t s = items >= target ? 1 : ceil_div(target, items);
  s = std::min({s, ceil_div(len, min_chunk), kMaxSplits});
  return std::max<int64_t>(s, 1);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

}  // namespace attn_cuda
}  // namespace fastops

// LAUNCH(V) with V the vector width picked at run time (a compile-time constant in each case).
#define ATTN_DISPATCH_VEC(T, v, LAUNCH)                        \
  switch (v) {                                                 \
    case 8: LAUNCH(std::min(8, ::fastops::attn_cuda::kMaxVec<T>)); break; \
    case 4: LAUNCH(4); break;                                  \
    case 2: LAUNCH(2); break;                                  \
    default: LAUNCH(1); break;                                 \
  }

// fp32 / fp16 / bf16 only: the Python front sends float64 CUDA tensors elsewhere.
#define ATTN_DISPATCH(TYPE, NAME, ...)                                    \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                          \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))
