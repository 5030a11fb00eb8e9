// Channel-MLP pieces shared by the CUDA channel-attention kernels (squeeze_excite.cu defines them, cbam.cu
// uses them too): the activation names, a small fp32 GEMM with a fused bias + activation epilogue, and the
// activation-derivative kernel.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string_view>

namespace fastops {
namespace attn_cuda {

enum class Act : int { kNone = 0, kRelu = 1, kSilu = 2, kGelu = 3, kSigmoid = 4, kHardSigmoid = 5 };

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

}  // namespace attn_cuda
}  // namespace fastops
