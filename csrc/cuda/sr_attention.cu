// PVT spatial-reduction attention on CUDA: forward and backward, float / half / bf16, fp32 accumulation and
// fp32 softmax (the oracle: fastops/reference/sr_attention.py).
//
// q (B, N, C) and kv (B, Nr, 2C) are read in place: head h of token n is the channel run [h*hd, (h+1)*hd) of
// q's row (k: the same run of kv's row, v: that run shifted by C), so no head permute is ever materialised.
//
// Layout of work: blocks of kWarps warps; a block owns (batch, head, tiles of at most kRowTile query rows).
// Each warp keeps kRowsPerWarp rows' running state in registers while keys stream through shared memory, one
// key per lane in steps of 32: a score is one lane's dot product, a warp reduction gives the row's max / sum.
// Head slices are converted to fp32 on their way into shared memory; tiles read one row per lane get an odd
// row stride (hd | 1), which keeps those reads free of bank conflicts.
//
// Keys come in chunks. When a head's whole K and V fit in kResidentBytes of shared memory (Nr = 49, the
// PVTv2 case, for every head_dim <= 128), the block loads them once and runs several query tiles against
// them; otherwise chunks of at most kStreamBytes are streamed with an online softmax (running max / sum,
// rescaled accumulator), so any Nr works.
//
//   forward    o = softmax(scale q k^T) v, lse = max + log(sum).
//   backward   1. rows = queries: D_i = dO_i . O_i (kept for step 2), P recomputed from lse,
//                 dS = P (dO V^T - D), dQ = scale dS K.
//              2. rows = keys, columns = queries: dV = P^T dO, dK = scale dS^T Q. The queries are split over
//                 blocks when (batch, head, key tile) alone gives too few blocks (few keys, many queries):
//                 each split writes fp32 partial sums to a workspace and a last kernel adds the splits in a
//                 fixed order. No atomics anywhere: the same inputs give the same bits.
//
// Limits (checked, errors otherwise): head_dim <= 128 (ceil(hd / 32) accumulator registers per lane and
// row), num_heads <= 65535, B <= 65535, N and Nr < 2^30, Nr >= 1. float64 is not supported on CUDA.
// Element offsets are int64.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "common.h"
#include "cuda/attn_common.cuh"
#include "cuda/channel_attn.cuh"

namespace fastops {

namespace {

constexpr const char* kFwdOp = "sr_attention";
constexpr const char* kBwdOp = "sr_attention_backward";

constexpr int kWarps = 4;
constexpr int kBlock = 32 * kWarps;
constexpr int kRowsPerWarp = 4;
constexpr int kRowTile = kWarps * kRowsPerWarp;  // rows per tile at most
constexpr int kMaxHeadDim = 128;
constexpr int64_t kResidentBytes = 72 * 1024;  // a head's K + V kept on chip for the whole block up to this
constexpr int64_t kStreamBytes = 48 * 1024;    // K + V chunk size otherwise
constexpr int kMaxTilesPerBlock = 8;
constexpr int64_t kMinQueriesPerSplit = 256;
constexpr int64_t kMaxQuerySplits = 64;

struct Geom {
  int64_t B, N, Nr;
  int C, heads, hd;
  int ld;  // row stride of the lane-indexed shared tiles (odd)
  // query tiles (forward, dQ)
  int rows_per_tile, ntiles, tiles_per_block;
  // key chunks (forward, dQ): chunk is a multiple of 32; nchunks == 1 means K / V stay resident
  int chunk, nchunks;
  // dK / dV: key tiles and query splits
  int keys_per_tile, nktiles, qtile;
  int64_t q_per_split;
  int splits;
  float scale;
};

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t lmin(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int round32(int v) { return (v + 31) & ~31; }

// dst[r * ld + d] = mul * src[(row0 + r) * stride + col + d] for r < count; rows count .. rows - 1 are zeroed
// (lanes past the last token read them).
template <typename T>
__device__ __forceinline__ void load_rows(float* dst, int ld, const T* __restrict__ src, int64_t row0,
                                          int64_t stride, int64_t col, int count, int rows, int hd, float mul) {
  for (int e = threadIdx.x; e < rows * hd; e += kBlock) {
    const int r = e / hd, d = e - r * hd;
    const float v = r < count ? static_cast<float>(src[(row0 + r) * stride + col + d]) : 0.f;
    dst[r * ld + d] = v * mul;
  }
}

// Key chunk ch of batch b, head column qcol: K to ks, V to vs (stride ld, rows up to a multiple of 32), then
// a barrier; returns its key count. load is false for a block's later tiles when K / V are resident.
template <typename T>
__device__ __forceinline__ int load_kv_chunk(float* ks, float* vs, const T* __restrict__ kv, const Geom& g, int64_t b,
                                             int64_t qcol, int ch, bool load) {
  const int j0 = ch * g.chunk;
  const int nk = imin(g.chunk, static_cast<int>(g.Nr - j0));
  if (load) {
    const int64_t C2 = 2 * int64_t(g.C);
    if (ch > 0) __syncthreads();  // the previous chunk is consumed
    load_rows(ks, g.ld, kv, b * g.Nr + j0, C2, qcol, nk, round32(nk), g.hd, 1.f);
    load_rows(vs, g.ld, kv, b * g.Nr + j0, C2, g.C + qcol, nk, round32(nk), g.hd, 1.f);
  }
  __syncthreads();
  return nk;
}

// ---------------------------------------------------------------------------------------------------
// Forward. Shared: q rows (pre-scaled, stride hd), then the key and value chunks (stride ld).

template <typename T, int HDV>
__global__ void __launch_bounds__(kBlock)
sr_attn_fwd_kernel(const T* __restrict__ q, const T* __restrict__ kv, T* __restrict__ out,
                   float* __restrict__ lse, const Geom g) {
  extern __shared__ float sra_smem[];
  const int hd = g.hd, ld = g.ld;
  float* qs = sra_smem;
  float* ks = qs + kRowTile * hd;
  float* vs = ks + g.chunk * ld;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t b = blockIdx.z;
  const int h = blockIdx.y;
  const int64_t C = g.C;
  const int64_t qcol = int64_t(h) * hd;
  const int t0 = blockIdx.x * g.tiles_per_block;
  const int t1 = imin(t0 + g.tiles_per_block, g.ntiles);
  const bool resident = g.nchunks == 1;

  for (int t = t0; t < t1; ++t) {
    const int r0 = t * g.rows_per_tile;
    const int nrows = imin(g.rows_per_tile, static_cast<int>(g.N - r0));
    __syncthreads();  // the previous tile's q rows are consumed
    load_rows(qs, hd, q, b * g.N + r0, C, qcol, nrows, kRowTile, hd, g.scale);

    float m[kRowsPerWarp], l[kRowsPerWarp], o[kRowsPerWarp][HDV];
#pragma unroll
    for (int k = 0; k < kRowsPerWarp; ++k) {
      m[k] = -INFINITY;
      l[k] = 0.f;
#pragma unroll
      for (int c = 0; c < HDV; ++c) o[k][c] = 0.f;
    }

    for (int ch = 0; ch < g.nchunks; ++ch) {
      const int nk = load_kv_chunk(ks, vs, kv, g, b, qcol, ch, !resident || t == t0);
      for (int s0 = 0; s0 < nk; s0 += 32) {
        const int ns = imin(32, nk - s0);
        const bool jv = lane < ns;
        float s[kRowsPerWarp];
        attn_cuda::row_dots(s, qs + warp * hd, kWarps * hd, ks + (s0 + lane) * ld, hd);
        // the running max is finite: lane 0 always holds a key
#pragma unroll
        for (int k = 0; k < kRowsPerWarp; ++k) s[k] = attn_cuda::online_softmax_step(s[k], jv, m[k], l[k], o[k]);
        attn_cuda::accum_rows(o, s, vs + s0 * ld, ld, ns, hd);
      }
    }

#pragma unroll
    for (int k = 0; k < kRowsPerWarp; ++k) {
      const int rl = warp + kWarps * k;
      if (rl >= nrows) continue;
      const int64_t i = r0 + rl;
      if (lane == 0) lse[(b * g.heads + h) * g.N + i] = m[k] + logf(l[k]);
      attn_cuda::store_row(out + (b * g.N + i) * C + qcol, o[k], 1.f / l[k], hd);
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Backward step 1: rows = queries. Shared: pre-scaled q rows and dO rows (stride hd), key and value chunks
// (stride ld). Writes grad_q and D (for step 2).

template <typename T, int HDV>
__global__ void __launch_bounds__(kBlock)
sr_attn_bwd_dq_kernel(const T* __restrict__ grad_out, const T* __restrict__ q, const T* __restrict__ kv,
                      const T* __restrict__ out, const float* __restrict__ lse, T* __restrict__ grad_q,
                      float* __restrict__ dvec, const Geom g) {
  extern __shared__ float sra_smem[];
  const int hd = g.hd, ld = g.ld;
  float* qs = sra_smem;
  float* dos = qs + kRowTile * hd;
  float* ks = dos + kRowTile * hd;
  float* vs = ks + g.chunk * ld;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t b = blockIdx.z;
  const int h = blockIdx.y;
  const int64_t C = g.C;
  const int64_t qcol = int64_t(h) * hd;
  const int64_t row_base = (b * g.heads + h) * g.N;
  const int t0 = blockIdx.x * g.tiles_per_block;
  const int t1 = imin(t0 + g.tiles_per_block, g.ntiles);
  const bool resident = g.nchunks == 1;

  for (int t = t0; t < t1; ++t) {
    const int r0 = t * g.rows_per_tile;
    const int nrows = imin(g.rows_per_tile, static_cast<int>(g.N - r0));
    __syncthreads();  // the previous tile's q / dO rows are consumed
    load_rows(qs, hd, q, b * g.N + r0, C, qcol, nrows, kRowTile, hd, g.scale);
    load_rows(dos, hd, grad_out, b * g.N + r0, C, qcol, nrows, kRowTile, hd, 1.f);

    float lse_r[kRowsPerWarp], D[kRowsPerWarp], dq[kRowsPerWarp][HDV];
#pragma unroll
    for (int k = 0; k < kRowsPerWarp; ++k) {
      const int rl = warp + kWarps * k;
      float part = 0.f;
      if (rl < nrows) {
        const int64_t off = (b * g.N + r0 + rl) * C + qcol;
#pragma unroll
        for (int c = 0; c < HDV; ++c) {
          const int d = lane + 32 * c;
          if (d < hd) part = fmaf(static_cast<float>(grad_out[off + d]), static_cast<float>(out[off + d]), part);
        }
      }
      D[k] = attn_cuda::warp_sum(part);
      lse_r[k] = rl < nrows ? lse[row_base + r0 + rl] : 0.f;
      if (lane == 0 && rl < nrows) dvec[row_base + r0 + rl] = D[k];
#pragma unroll
      for (int c = 0; c < HDV; ++c) dq[k][c] = 0.f;
    }

    for (int ch = 0; ch < g.nchunks; ++ch) {
      const int nk = load_kv_chunk(ks, vs, kv, g, b, qcol, ch, !resident || t == t0);
      for (int s0 = 0; s0 < nk; s0 += 32) {
        const int ns = imin(32, nk - s0);
        const bool jv = lane < ns;
        float s[kRowsPerWarp], dp[kRowsPerWarp];
        attn_cuda::row_dots2(s, qs + warp * hd, ks + (s0 + lane) * ld, dp, dos + warp * hd, vs + (s0 + lane) * ld,
                             kWarps * hd, hd);
#pragma unroll
        for (int k = 0; k < kRowsPerWarp; ++k) {
          const float p = jv ? __expf(s[k] - lse_r[k]) : 0.f;
          s[k] = p * (dp[k] - D[k]);
        }
        attn_cuda::accum_rows(dq, s, ks + s0 * ld, ld, ns, hd);
      }
    }

#pragma unroll
    for (int k = 0; k < kRowsPerWarp; ++k) {
      const int rl = warp + kWarps * k;
      if (rl >= nrows) continue;
      attn_cuda::store_row(grad_q + (b * g.N + r0 + rl) * C + qcol, dq[k], g.scale, hd);
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Backward step 2: rows = keys, columns = the queries of one split. Shared: k and v rows (stride hd), then the
// pre-scaled q and dO tiles (stride ld), then per-query lse and D. With one split the result is written to
// grad_kv directly, otherwise as fp32 partial sums to ws (splits, B, Nr, 2C).

template <typename T, int HDV>
__global__ void __launch_bounds__(kBlock)
sr_attn_bwd_dkv_kernel(const T* __restrict__ grad_out, const T* __restrict__ q, const T* __restrict__ kv,
                       const float* __restrict__ lse, const float* __restrict__ dvec, T* __restrict__ grad_kv,
                       float* __restrict__ ws, const Geom g) {
  extern __shared__ float sra_smem[];
  const int hd = g.hd, ld = g.ld, qtile = g.qtile;
  float* kr = sra_smem;
  float* vr = kr + kRowTile * hd;
  float* qt = vr + kRowTile * hd;
  float* dot = qt + qtile * ld;
  float* lse_t = dot + qtile * ld;
  float* d_t = lse_t + qtile;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t b = blockIdx.z;
  const int h = blockIdx.y;
  const int kt = blockIdx.x % g.nktiles;
  const int split = blockIdx.x / g.nktiles;
  const int64_t C = g.C, C2 = 2 * C;
  const int64_t qcol = int64_t(h) * hd, vcol = C + qcol;
  const int64_t row_base = (b * g.heads + h) * g.N;
  const int j0 = kt * g.keys_per_tile;
  const int nkeys = imin(g.keys_per_tile, static_cast<int>(g.Nr - j0));
  const int64_t qb = split * g.q_per_split;
  const int64_t qe = lmin(g.N, qb + g.q_per_split);

  load_rows(kr, hd, kv, b * g.Nr + j0, C2, qcol, nkeys, kRowTile, hd, 1.f);
  load_rows(vr, hd, kv, b * g.Nr + j0, C2, vcol, nkeys, kRowTile, hd, 1.f);

  float dk[kRowsPerWarp][HDV], dv[kRowsPerWarp][HDV];
#pragma unroll
  for (int k = 0; k < kRowsPerWarp; ++k) {
#pragma unroll
    for (int c = 0; c < HDV; ++c) dk[k][c] = dv[k][c] = 0.f;
  }

  for (int64_t i0 = qb; i0 < qe; i0 += qtile) {
    const int ni = static_cast<int>(lmin(qtile, qe - i0));
    __syncthreads();  // the previous tile is consumed (and the k / v rows are written)
    load_rows(qt, ld, q, b * g.N + i0, C, qcol, ni, round32(ni), hd, g.scale);
    load_rows(dot, ld, grad_out, b * g.N + i0, C, qcol, ni, round32(ni), hd, 1.f);
    for (int e = threadIdx.x; e < qtile; e += kBlock) {
      lse_t[e] = e < ni ? lse[row_base + i0 + e] : 0.f;
      d_t[e] = e < ni ? dvec[row_base + i0 + e] : 0.f;
    }
    __syncthreads();

    for (int s0 = 0; s0 < ni; s0 += 32) {
      const int ns = imin(32, ni - s0);
      const bool live = lane < ns;
      float s[kRowsPerWarp], dp[kRowsPerWarp];
      attn_cuda::row_dots2(s, kr + warp * hd, qt + (s0 + lane) * ld, dp, vr + warp * hd, dot + (s0 + lane) * ld,
                           kWarps * hd, hd);
      const float lse_i = lse_t[s0 + lane], D_i = d_t[s0 + lane];
#pragma unroll
      for (int k = 0; k < kRowsPerWarp; ++k) {
        const float p = live ? __expf(s[k] - lse_i) : 0.f;
        dp[k] = p * (dp[k] - D_i);
        s[k] = p;
      }
      attn_cuda::accum_rows2(dv, s, dot + s0 * ld, dk, dp, qt + s0 * ld, ld, ns, hd);
    }
  }

#pragma unroll
  for (int k = 0; k < kRowsPerWarp; ++k) {
    const int rl = warp + kWarps * k;
    if (rl >= nkeys) continue;
    const int64_t row = b * g.Nr + j0 + rl;
#pragma unroll
    for (int c = 0; c < HDV; ++c) {
      const int d = lane + 32 * c;
      if (d >= hd) continue;
      if (g.splits == 1) {
        grad_kv[row * C2 + qcol + d] = static_cast<T>(dk[k][c]);
        grad_kv[row * C2 + vcol + d] = static_cast<T>(dv[k][c]);
      } else {
        float* dst = ws + (int64_t(split) * g.B * g.Nr + row) * C2;
        dst[qcol + d] = dk[k][c];
        dst[vcol + d] = dv[k][c];
      }
    }
  }
}

// grad_kv[e] = sum over splits s (in order) of ws[s * n + e].
template <typename T>
__global__ void __launch_bounds__(256)
sr_attn_sum_splits_kernel(const float* __restrict__ ws, int splits, int64_t n, T* __restrict__ grad_kv) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    float acc = 0.f;
    for (int s = 0; s < splits; ++s) acc += ws[s * n + e];
    grad_kv[e] = static_cast<T>(acc);
  }
}

// ---------------------------------------------------------------------------------------------------
// Host side.

void check_input(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "fastops.", op, ": ", name, " dtype ", t.scalar_type(),
              " differs from q dtype ", q.scalar_type());
  TORCH_CHECK(t.device() == q.device(), "fastops.", op, ": ", name, " is on ", t.device(), " but q is on ",
              q.device());
  TORCH_CHECK(t.is_contiguous(), "fastops.", op, ": ", name, " must be contiguous, got strides ", t.strides());
}

// Checks every argument shared by forward and backward and derives the geometry.
Geom make_geom(const char* op, const at::Tensor& q, const at::Tensor& kv, int64_t num_heads, double scale) {
  TORCH_CHECK(q.is_cuda(), "fastops.", op, " (cuda): q must be a CUDA tensor, got ", q.device());
  const auto st = q.scalar_type();
  TORCH_CHECK(st != at::kDouble, "fastops.", op, " (cuda): float64 is not supported on CUDA (use the cpu or ",
              "reference backend)");
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, "fastops.", op,
              " (cuda): q must be float32, float16 or bfloat16, got ", st);
  TORCH_CHECK(q.dim() == 3, "fastops.", op, ": q must be 3-D (B, N, C), got ", q.dim(), "-D");
  TORCH_CHECK(q.is_contiguous(), "fastops.", op, ": q must be contiguous, got strides ", q.strides());
  const int64_t B = q.size(0), N = q.size(1), C = q.size(2);
  TORCH_CHECK(C >= 1, "fastops.", op, ": q must have C >= 1, got shape ", q.sizes());
  TORCH_CHECK(num_heads >= 1 && C % num_heads == 0, "fastops.", op, ": num_heads must be >= 1 and divide C = ", C,
              ", got ", num_heads);
  const int64_t hd = C / num_heads;
  TORCH_CHECK(hd <= kMaxHeadDim, "fastops.", op, " (cuda): head_dim = C / num_heads must be <= ", kMaxHeadDim,
              ", got ", hd);
  TORCH_CHECK(num_heads <= 65535, "fastops.", op, " (cuda): num_heads must be <= 65535, got ", num_heads);
  TORCH_CHECK(kv.dim() == 3 && kv.size(0) == B && kv.size(2) == 2 * C, "fastops.", op,
              ": kv must have shape (B, Nr, 2C) = (", B, ", Nr, ", 2 * C, "), got ", kv.sizes());
  check_input(op, "kv", kv, q);
  const int64_t Nr = kv.size(1);
  TORCH_CHECK(Nr >= 1, "fastops.", op, ": kv must hold at least one token (Nr >= 1), got shape ", kv.sizes());
  TORCH_CHECK(B <= 65535, "fastops.", op, " (cuda): batch size must be <= 65535, got ", B);
  TORCH_CHECK(N < (int64_t(1) << 30) && Nr < (int64_t(1) << 30), "fastops.", op,
              " (cuda): N and Nr must be < 2^30, got N = ", N, ", Nr = ", Nr);
  TORCH_CHECK(std::isfinite(scale), "fastops.", op, ": scale must be finite, got ", scale);

  Geom g;
  g.B = B;
  g.N = N;
  g.Nr = Nr;
  g.C = static_cast<int>(C);
  g.heads = static_cast<int>(num_heads);
  g.hd = static_cast<int>(hd);
  g.ld = static_cast<int>(hd | 1);
  g.scale = static_cast<float>(scale);
  const int64_t sms = N > 0 && B > 0 ? attn_cuda::sm_count() : 1;
  const int64_t target_blocks = 4 * sms;

  // Query tiles: rows spread evenly over the fewest tiles of <= kRowTile rows (49 -> 13, 12, 12, 12).
  const int64_t ntiles = std::max<int64_t>(1, attn_cuda::ceil_div(N, kRowTile));
  g.rows_per_tile = static_cast<int>(std::max<int64_t>(1, attn_cuda::ceil_div(N, ntiles)));
  g.ntiles = static_cast<int>(attn_cuda::ceil_div(std::max<int64_t>(N, 1), g.rows_per_tile));
  const int64_t key_bytes = 2 * int64_t(g.ld) * int64_t(sizeof(float));
  const int64_t nr32 = round32(static_cast<int>(Nr));
  if (nr32 * key_bytes <= kResidentBytes) {
    g.chunk = static_cast<int>(nr32);
    g.nchunks = 1;
    // K / V are loaded once per block: give each block several query tiles while enough blocks remain.
    const int64_t per = B * num_heads * g.ntiles / target_blocks;
    g.tiles_per_block = static_cast<int>(std::clamp<int64_t>(per, 1, kMaxTilesPerBlock));
  } else {
    g.chunk = static_cast<int>(std::max<int64_t>(32, kStreamBytes / key_bytes / 32 * 32));
    g.nchunks = static_cast<int>(attn_cuda::ceil_div(Nr, g.chunk));
    g.tiles_per_block = 1;
  }

  // dK / dV: key tiles like the query tiles; queries split while blocks are too few.
  g.nktiles = static_cast<int>(attn_cuda::ceil_div(Nr, kRowTile));
  g.keys_per_tile = static_cast<int>(attn_cuda::ceil_div(Nr, g.nktiles));
  g.nktiles = static_cast<int>(attn_cuda::ceil_div(Nr, g.keys_per_tile));
  g.qtile = hd <= 64 ? 64 : 32;
  const int64_t items = std::max<int64_t>(1, B * num_heads * g.nktiles);  // B = 0 launches nothing
  int64_t splits = items >= target_blocks ? 1 : attn_cuda::ceil_div(target_blocks, items);
  splits = std::clamp<int64_t>(splits, 1, std::min(kMaxQuerySplits, std::max<int64_t>(1, N / kMinQueriesPerSplit)));
  g.q_per_split = std::max<int64_t>(g.qtile, attn_cuda::ceil_div(attn_cuda::ceil_div(N, splits), g.qtile) * g.qtile);
  g.splits = static_cast<int>(std::max<int64_t>(1, attn_cuda::ceil_div(N, g.q_per_split)));
  TORCH_CHECK(int64_t(g.nktiles) * g.splits < (int64_t(1) << 31), "fastops.", op, " (cuda): too many key tiles");
  return g;
}

size_t fwd_smem(const Geom& g) { return sizeof(float) * (size_t(kRowTile) * g.hd + 2 * size_t(g.chunk) * g.ld); }
size_t dq_smem(const Geom& g) { return sizeof(float) * (2 * size_t(kRowTile) * g.hd + 2 * size_t(g.chunk) * g.ld); }
size_t dkv_smem(const Geom& g) {
  return sizeof(float) * (2 * size_t(kRowTile) * g.hd + 2 * size_t(g.qtile) * g.ld + 2 * size_t(g.qtile));
}

dim3 query_grid(const Geom& g) {
  return dim3(static_cast<unsigned int>(attn_cuda::ceil_div(g.ntiles, g.tiles_per_block)),
              static_cast<unsigned int>(g.heads), static_cast<unsigned int>(g.B));
}

std::tuple<at::Tensor, at::Tensor> sr_attention_cuda(const at::Tensor& q, const at::Tensor& kv, int64_t num_heads,
                                                     double scale) {
  const Geom g = make_geom(kFwdOp, q, kv, num_heads, scale);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({g.B, g.N, int64_t(g.C)}, q.options());
  at::Tensor lse = at::empty({g.B, int64_t(g.heads), g.N}, q.options().dtype(at::kFloat));
  if (g.B == 0 || g.N == 0) return {out, lse};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const size_t smem = fwd_smem(g);
  ATTN_DISPATCH(q.scalar_type(), "sr_attention_cuda", [&] {
    using T = scalar_t;
    attn_cuda::dispatch_hdv(g.hd, [&](auto hdv) {
      constexpr int HDV = decltype(hdv)::value;
      attn_cuda::prepare_smem(sr_attn_fwd_kernel<T, HDV>, smem, kFwdOp);
      sr_attn_fwd_kernel<T, HDV><<<query_grid(g), kBlock, smem, stream>>>(
          q.const_data_ptr<T>(), kv.const_data_ptr<T>(), out.data_ptr<T>(), lse.data_ptr<float>(), g);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> sr_attention_backward_cuda(const at::Tensor& grad_out, const at::Tensor& q,
                                                              const at::Tensor& kv, const at::Tensor& out,
                                                              const at::Tensor& lse, int64_t num_heads,
                                                              double scale) {
  const Geom g = make_geom(kBwdOp, q, kv, num_heads, scale);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"grad_out", &grad_out}, {"out", &out}}) {
    TORCH_CHECK(t->dim() == 3 && t->size(0) == g.B && t->size(1) == g.N && t->size(2) == g.C, "fastops.", kBwdOp,
                ": ", name, " must have shape (", g.B, ", ", g.N, ", ", g.C, "), got ", t->sizes());
    check_input(kBwdOp, name, *t, q);
  }
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "fastops.", kBwdOp, " (cuda): lse must be float32, got ",
              lse.scalar_type());
  TORCH_CHECK(lse.device() == q.device(), "fastops.", kBwdOp, ": lse is on ", lse.device(), " but q is on ",
              q.device());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == g.B && lse.size(1) == g.heads && lse.size(2) == g.N, "fastops.",
              kBwdOp, ": lse must have shape (B, num_heads, N) = (", g.B, ", ", g.heads, ", ", g.N, "), got ",
              lse.sizes());
  TORCH_CHECK(lse.is_contiguous(), "fastops.", kBwdOp, ": lse must be contiguous");

  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor grad_q = at::empty_like(q);
  if (g.B == 0) return {grad_q, at::empty_like(kv)};
  if (g.N == 0) return {grad_q, at::zeros_like(kv)};
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor grad_kv = at::empty_like(kv);  // every element is written once (or by the split sum)
  at::Tensor dvec = at::empty({g.B, int64_t(g.heads), g.N}, f32);
  const int64_t n_kv = kv.numel();
  at::Tensor ws = g.splits > 1 ? at::empty({int64_t(g.splits) * n_kv}, f32) : at::empty({0}, f32);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  ATTN_DISPATCH(q.scalar_type(), "sr_attention_backward_cuda", [&] {
    using T = scalar_t;
    attn_cuda::dispatch_hdv(g.hd, [&](auto hdv) {
      constexpr int HDV = decltype(hdv)::value;
      const size_t smem1 = dq_smem(g);
      attn_cuda::prepare_smem(sr_attn_bwd_dq_kernel<T, HDV>, smem1, kBwdOp);
      sr_attn_bwd_dq_kernel<T, HDV><<<query_grid(g), kBlock, smem1, stream>>>(
          grad_out.const_data_ptr<T>(), q.const_data_ptr<T>(), kv.const_data_ptr<T>(), out.const_data_ptr<T>(),
          lse.const_data_ptr<float>(), grad_q.data_ptr<T>(), dvec.data_ptr<float>(), g);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const size_t smem2 = dkv_smem(g);
      attn_cuda::prepare_smem(sr_attn_bwd_dkv_kernel<T, HDV>, smem2, kBwdOp);
      const dim3 grid2(static_cast<unsigned int>(int64_t(g.nktiles) * g.splits), static_cast<unsigned int>(g.heads),
                       static_cast<unsigned int>(g.B));
      sr_attn_bwd_dkv_kernel<T, HDV><<<grid2, kBlock, smem2, stream>>>(
          grad_out.const_data_ptr<T>(), q.const_data_ptr<T>(), kv.const_data_ptr<T>(), lse.const_data_ptr<float>(),
          dvec.const_data_ptr<float>(), grad_kv.data_ptr<T>(), g.splits > 1 ? ws.data_ptr<float>() : nullptr, g);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    if (g.splits > 1) {
      sr_attn_sum_splits_kernel<T><<<attn_cuda::blocks_for(n_kv, 256, int64_t(1) << 20), 256, 0, stream>>>(
          ws.const_data_ptr<float>(), g.splits, n_kv, grad_kv.data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {grad_q, grad_kv};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastops, CUDA, m) {
  m.impl("sr_attention", &sr_attention_cuda);
  m.impl("sr_attention_backward", &sr_attention_backward_cuda);
}

}  // namespace fastops
