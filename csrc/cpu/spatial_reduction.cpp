// PVT spatial reduction on the CPU: strided Conv2d (or AdaptiveAvgPool2d(7) + 1x1 conv) from the token layout,
// LayerNorm (+ exact GELU) fused as the epilogue; forward and backward, float / double / half / bf16.
//
// The conv is a GEMM y = A W with one row of A per output token r = (b, ry, rx). For a kernel row ky the
// k taps of that row are k adjacent tokens, i.e. one contiguous run of k*C values of x: a row of A is k such
// runs, read in place through row pointers (fp32 / fp64; half and bf16 are converted into a per-thread
// buffer first). The weight is packed to (ky, kx, ci) x C_out: once per call, or once for as long as it is
// unchanged where it does not require grad (cpu/packed_weights.h; at batch 8 packing a 1 MB weight was
// ~15% of the forward). Each thread owns whole output rows, so the LayerNorm epilogue sees a finished row in
// cache. Arithmetic in at::opmath_type (fp32; fp64 for double).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu/attn_kernels.h"
#include "cpu/packed_weights.h"
#include "cpu/simd.h"

namespace fastops {
namespace {

using attn::load_row;
using simd::VGelu;
using attn::round_up;
using attn::store_row;

constexpr const char* kFwd = "fastops::spatial_reduction";
constexpr const char* kBwd = "fastops::spatial_reduction_backward";
constexpr int64_t kPool = 7;  // AdaptiveAvgPool2d(7) of the linear mode

// The GEMM's register tile and vector width: attn's (see attn::kVecs).
constexpr int kMR = attn::kRows, kNV = attn::kVecs;
using attn::kLanes;

struct Geom {
  int64_t B, H, W, N, C, k, Hr, Wr, Nr, K;  // K = k * k * C, the GEMM's inner dimension
  bool linear;
};

void check_param(const char* op, const char* name, const at::Tensor& p, const at::Tensor& x,
                 c10::IntArrayRef shape) {
  TORCH_CHECK(p.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", p.sizes());
  TORCH_CHECK(p.scalar_type() == x.scalar_type(), op, ": ", name, " dtype ", p.scalar_type(),
              " differs from x dtype ", x.scalar_type());
  TORCH_CHECK(p.device().is_cpu(), op, ": ", name, " must be a CPU tensor here, got ", p.device());
  TORCH_CHECK(p.is_contiguous(), op, ": ", name, " must be contiguous");
}

Geom check_args(const char* op, const at::Tensor& x, c10::IntArrayRef feat_size, const at::Tensor& weight,
                const at::Tensor& norm_weight, const at::Tensor& norm_bias, int64_t sr_ratio, bool linear) {
  TORCH_CHECK(x.dim() == 3, op, ": x must be 3-D (B, N, C), got ", x.dim(), "-D");
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor here, got ", x.device());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, op,
              ": x must be float32, float64, float16 or bfloat16, got ", dt);
  TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous");
  TORCH_CHECK(feat_size.size() == 2, op, ": feat_size must have 2 values [H, W], got ", feat_size.size());
  Geom g;
  g.B = x.size(0); g.N = x.size(1); g.C = x.size(2); g.H = feat_size[0]; g.W = feat_size[1];
  g.linear = linear;
  TORCH_CHECK(g.H > 0 && g.W > 0 && g.H * g.W == g.N, op, ": feat_size ", feat_size,
              " must be positive with H * W = N = ", g.N, " (x's dim 1)");
  TORCH_CHECK(g.C > 0, op, ": x must have C >= 1 channels, got ", x.sizes());
  g.k = linear ? 1 : sr_ratio;  // linear mode ignores sr_ratio
  if (linear) {
    g.Hr = g.Wr = kPool;
  } else {
    TORCH_CHECK(sr_ratio >= 1, op, ": sr_ratio must be >= 1, got ", sr_ratio);
    TORCH_CHECK(g.H >= g.k && g.W >= g.k, op, ": the map (", g.H, "x", g.W, ") must be at least sr_ratio = ", g.k,
                " in each dimension");
    g.Hr = g.H / g.k;
    g.Wr = g.W / g.k;
  }
  g.Nr = g.Hr * g.Wr;
  g.K = g.k * g.k * g.C;
  check_param(op, "weight", weight, x, {g.C, g.C, g.k, g.k});
  check_param(op, "norm_weight", norm_weight, x, {g.C});
  check_param(op, "norm_bias", norm_bias, x, {g.C});
  return g;
}

at::ScalarType acc_type_of(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// Bounds of adaptive-pool bin i over n positions: [floor(i n / P), ceil((i + 1) n / P)).
inline int64_t bin_start(int64_t i, int64_t n) { return i * n / kPool; }
inline int64_t bin_end(int64_t i, int64_t n) { return ((i + 1) * n + kPool - 1) / kPool; }

template <typename T>
std::vector<T> to_acc(const at::Tensor& t, int64_t n, int64_t padded) {
  std::vector<T> out(padded, T(0));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "to_acc", [&] {
    const scalar_t* p = t.data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(p[i]);
  });
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// The packed weight: column tiles of the micro-kernel's width (kNV vectors; the last one may be narrower),
// each stored as its own contiguous (K x width) panel, so that a micro-kernel call streams one sequential
// block of B instead of a strided one. Row j = (ky * k + kx) * C + ci of a panel holds weight[co, ci, ky, kx]
// for the tile's co, zero past C.
template <typename T>
struct PackedW {
  int64_t K = 0, Cp = 0, tile = 0;
  at::Tensor buf;  // K * Cp values of T
  const T* data = nullptr;
  int64_t width(int64_t n0) const { return std::min(tile, Cp - n0); }
  const T* panel(int64_t n0) const { return data + n0 * K; }  // tiles before n0 are all full width
};

template <typename scalar_t, typename T>
void pack_weight(const Geom& g, const scalar_t* w, const PackedW<T>& p, T* out) {
  const int64_t C = g.C, K = g.K, kk = g.k * g.k;
  constexpr int64_t kB = simd::Vec<T>::N;  // output channels per block: one vector (an 8 x 8 transpose in fp32)
  // Weight rows are K apart (a power of two in PVT, e.g. 16 KB): reading one value from each of 16 rows at a
  // time maps them all onto one L1 set. Blocks of 8 rows x 8 consecutive values are transposed in registers
  // instead, every load and store a whole vector. Blocks of 8 columns of w outside, output channels inside:
  // each group of 8 packed rows is written whole before the next. The other order wrote every packed line in
  // pieces far apart in time, and packing took a third of the forward at PVTv2-b2 stage 1.
  at::parallel_for(0, (K + kB - 1) / kB, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t jb = b0; jb < b1; ++jb) {
      const int64_t jj = jb * kB, nj = std::min(kB, K - jj);
      for (int64_t co0 = 0; co0 < p.Cp; co0 += kB) {
        const int64_t nco = std::min(kB, C - co0), n0 = co0 / p.tile * p.tile, wd = p.width(n0);
        T* dst = out + n0 * K + (co0 - n0);
        if constexpr (std::is_same_v<T, float> && kB == 8) {
          if (nco == kB && nj == kB) {
            using S = simd::Vec<float>;
            S::V r[kB];
            for (int i = 0; i < kB; ++i) r[i] = S::load_from(w + (co0 + i) * K + jj);
            attn::transpose8x8(r);
            int64_t ci = jj / kk, tap = jj % kk;  // column jj = ci * kk + (ky * k + kx)
            for (int c = 0; c < kB; ++c) {
              S::store(dst + (tap * C + ci) * wd, r[c]);
              if (++tap == kk) tap = 0, ++ci;
            }
            continue;
          }
        }
        for (int64_t j = jj; j < jj + nj; ++j) {
          const int64_t ci = j / kk, tap = j % kk;
          T* row = dst + (tap * C + ci) * wd;
          for (int64_t i = 0; i < kB; ++i) row[i] = i < nco ? static_cast<T>(w[(co0 + i) * K + j]) : T(0);
        }
      }
    }
  });
}

template <typename scalar_t, typename T>
PackedW<T> packed_weight(const Geom& g, const at::Tensor& weight) {
  PackedW<T> p;
  p.K = g.K;
  p.Cp = round_up(g.C, kLanes<T>);
  p.tile = kNV * kLanes<T>;
  auto make = [&] {
    at::Tensor t = at::empty({p.K * p.Cp}, weight.options().dtype(c10::CppTypeToScalarType<T>::value));
    pack_weight<scalar_t, T>(g, weight.template data_ptr<scalar_t>(), p, t.template data_ptr<T>());
    return t;
  };
  // The weight is checked contiguous with shape (C, C, k, k); its dtype joins the key against a `.data` swap.
  p.buf = PackedWeights::cacheable(weight)
              ? PackedWeights::get().find_or_make(
                    weight, {kSpatialReductionKey, g.C, g.k, static_cast<int64_t>(weight.scalar_type())}, make)
              : make();
  p.data = p.buf.template data_ptr<T>();
  return p;
}

// acc (nrows x Cp) = A Wp for rows whose ky-th run (kC values) starts at rows[r] + ky * ky_stride. The inner
// dimension goes in chunks (at most one run) whose packed weight (chunk x Cp) stays in L2 while every row
// group of the block uses it; a row group's A chunk (6 rows) stays in L1 across the column tiles.
template <typename T>
void gemm_rows(int64_t nrows, const T* const* rows, int64_t ky_stride, int64_t nky, int64_t kC, const PackedW<T>& w,
               int64_t kc, T* acc) {
  constexpr int Wd = kLanes<T>;
  const int64_t Cp = w.Cp;
  attn::RowPtrsA<T, kMR> a;
  for (int64_t ky = 0; ky < nky; ++ky) {
    for (int64_t c0 = 0; c0 < kC; c0 += kc) {
      const int64_t kd = std::min(kc, kC - c0), j0 = ky * kC + c0;
      const bool first = j0 == 0;
      for (int64_t g0 = 0; g0 < nrows; g0 += kMR) {
        const int R = static_cast<int>(std::min<int64_t>(kMR, nrows - g0));
        for (int r = 0; r < R; ++r) a.p[r] = rows[g0 + r] + ky * ky_stride + c0;
        // The next group's runs of this chunk, while this group computes: x is read once, from L3 or DRAM,
        // and broadcast loads would otherwise wait on every line.
        for (int64_t r = g0 + kMR; r < std::min(g0 + 2 * kMR, nrows); ++r)
          attn::prefetch_rows(rows[r] + ky * ky_stride + c0, 1, 0, kd);
        for (int64_t n0 = 0; n0 < Cp; n0 += w.tile) {
          const int64_t wd = w.width(n0);
          const int nv = static_cast<int>(wd / Wd);
          const T* Bp = w.panel(n0) + j0 * wd;
          if (first)
            attn::micro_any<T, false, kMR, kNV>(R, nv, kd, a, Bp, wd, acc + g0 * Cp + n0, Cp);
          else
            attn::micro_any<T, true, kMR, kNV>(R, nv, kd, a, Bp, wd, acc + g0 * Cp + n0, Cp);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// The epilogue of one output row: y = acc + bias (kept, fp32), LayerNorm statistics over the C channels,
// out = LN(y) (then GELU in linear mode). p* are fp32 / fp64 parameter copies padded to Cp with zeros.
template <typename T, typename scalar_t>
inline void norm_row(const T* __restrict__ acc, int64_t C, const T* bias, const T* nw, const T* nb, T eps,
                     bool gelu, T* __restrict__ y, T* __restrict__ stats, scalar_t* __restrict__ out,
                     T* __restrict__ tmp) {
  using S = simd::Vec<T>;
  using V = typename S::V;
  const int64_t full = C / S::N * S::N;
  V sv = S::splat(T(0));
  int64_t c = 0;
  for (; c < full; c += S::N) {
    const V v = S::load(acc + c) + S::load(bias + c);
    S::store(tmp + c, v);
    sv += v;
  }
  T sum = attn::hsum<T>(sv);
  for (; c < C; ++c) {
    tmp[c] = acc[c] + bias[c];
    sum += tmp[c];
  }
  const T mean = sum / static_cast<T>(C);
  const V mv = S::splat(mean);
  V qv = S::splat(T(0));
  for (c = 0; c < full; c += S::N) {
    const V d = S::load(tmp + c) - mv;
    qv += d * d;
  }
  T sq = attn::hsum<T>(qv);
  for (; c < C; ++c) sq += (tmp[c] - mean) * (tmp[c] - mean);
  const T rstd = T(1) / std::sqrt(sq / static_cast<T>(C) + eps);
  stats[0] = mean;
  stats[1] = rstd;
  std::copy(tmp, tmp + C, y);
  // Whole vectors of the build's widest kind over the padded width (a multiple of kLanes<T>), since the GELU
  // is arithmetic-bound: the padding lanes hold finite values and are not stored.
  using SW = simd::Vec<T, attn::kWB>;
  const typename SW::V mw = SW::splat(mean), rw = SW::splat(rstd);
  for (c = 0; c < C; c += SW::N) {
    typename SW::V z = (SW::load(tmp + c) - mw) * rw * SW::load(nw + c) + SW::load(nb + c);
    if (gelu) z = VGelu<T, attn::kWB>::run(z);
    SW::store(tmp + c, z);
  }
  store_row(tmp, out, C, T(1));
}

// The sum over a pooling bin's tokens of nv vectors of channels from c0, accumulated in registers.
template <int NV, typename scalar_t, typename T>
inline void bin_sum(const scalar_t* xb, int64_t W, int64_t C, int64_t h0, int64_t h1, int64_t w0, int64_t w1,
                    int64_t c0, T inv_area, T* dst) {
  using S = simd::Vec<T>;
  typename S::V acc[NV];
  for (int v = 0; v < NV; ++v) acc[v] = S::splat(T(0));
  for (int64_t hy = h0; hy < h1; ++hy)
    for (int64_t wx = w0; wx < w1; ++wx) {
      const scalar_t* src = xb + (hy * W + wx) * C + c0;
      for (int v = 0; v < NV; ++v) acc[v] += S::load_from(src + v * S::N);
    }
  for (int v = 0; v < NV; ++v) S::store(dst + c0 + v * S::N, acc[v] * S::splat(inv_area));
}

// Adaptive average pool of one image's tokens xb into bin (i, j) of a 7 x 7 grid: dst (C values, fp32 / fp64).
template <typename scalar_t, typename T>
void pool_bin(const Geom& g, const scalar_t* xb, int64_t i, int64_t j, T* dst) {
  constexpr int64_t Wd = simd::Vec<T>::N, kChunk = 8;  // vectors summed in registers at a time
  const int64_t C = g.C, Cv = C / Wd * Wd, h0 = bin_start(i, g.H), h1 = bin_end(i, g.H);
  const int64_t w0 = bin_start(j, g.W), w1 = bin_end(j, g.W);
  const T inv_area = T(1) / static_cast<T>((h1 - h0) * (w1 - w0));
  int64_t c0 = 0;
  for (; c0 + kChunk * Wd <= Cv; c0 += kChunk * Wd) bin_sum<kChunk>(xb, g.W, C, h0, h1, w0, w1, c0, inv_area, dst);
  for (; c0 < Cv; c0 += Wd) bin_sum<1>(xb, g.W, C, h0, h1, w0, w1, c0, inv_area, dst);
  for (; c0 < C; ++c0) {
    T acc = 0;
    for (int64_t hy = h0; hy < h1; ++hy)
      for (int64_t wx = w0; wx < w1; ++wx) acc += static_cast<T>(xb[(hy * g.W + wx) * C + c0]);
    dst[c0] = acc * inv_area;
  }
}

// Pooled token r = (b, i, j) of the batch (the GEMM's row r in linear mode) into dst.
template <typename scalar_t, typename T>
inline void pool_token(const Geom& g, const scalar_t* px, int64_t r, T* dst) {
  const int64_t b = r / g.Nr, bin = r % g.Nr;
  pool_bin(g, px + b * g.N * g.C, bin / kPool, bin % kPool, dst);
}

template <typename scalar_t, typename T>
void pool_all(const Geom& g, const scalar_t* px, T* pooled) {
  at::parallel_for(0, g.B * g.Nr, 7, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) pool_token(g, px, r, pooled + r * g.C);
  });
}

// First value of output row r = (b, ry, rx) in x: its (ky = 0, kx = 0) tap.
inline int64_t row_origin(const Geom& g, int64_t r) {
  const int64_t b = r / g.Nr, rr = r % g.Nr, ry = rr / g.Wr, rx = rr % g.Wr;
  return (b * g.N + ry * g.k * g.W + rx * g.k) * g.C;
}

template <typename scalar_t>
void forward_kernel(const Geom& g, const at::Tensor& x, const at::Tensor& weight,
                    const c10::optional<at::Tensor>& bias, const at::Tensor& norm_weight,
                    const at::Tensor& norm_bias, double eps_d, at::Tensor& out, at::Tensor& y, at::Tensor& stats) {
  using T = at::opmath_type<scalar_t>;
  constexpr bool kInPlace = std::is_same_v<T, scalar_t>;
  const int64_t C = g.C, Cp = round_up(C, kLanes<T>), K = g.K, kC = g.k * C, M = g.B * g.Nr;
  const scalar_t* px = x.data_ptr<scalar_t>();
  const PackedW<T> Wp = packed_weight<scalar_t, T>(g, weight);
  const bool has_bias = bias.has_value() && bias->defined();
  const std::vector<T> bv = has_bias ? to_acc<T>(*bias, C, Cp) : std::vector<T>(Cp, T(0));
  const std::vector<T> nw = to_acc<T>(norm_weight, C, Cp), nb = to_acc<T>(norm_bias, C, Cp);
  const T eps = static_cast<T>(eps_d);
  // Linear mode pools each row block's tokens just before its product, into a per-thread buffer that the
  // product then reads from cache. A 7 x 7 map (PVTv2-li's last stage at 224 x 224) pools to itself: its
  // tokens are the GEMM's rows.
  const bool pool_rows = g.linear && !(kInPlace && g.H == kPool && g.W == kPool);
  scalar_t* po = out.data_ptr<scalar_t>();
  T* py = y.data_ptr<T>();
  T* ps = stats.data_ptr<T>();
  // Row blocks: as many rows as keep their accumulators within ~64 KB (each block streams the whole packed
  // weight through L2 once per call, so bigger blocks read it less often), but at least ~2 blocks per thread
  // for balance (4 read the weight twice as often: ~5% slower at PVTv2-b2 stages 1-2); a multiple of the
  // micro-kernel's rows. Inner chunks: equal parts of a run, at most 512 and with the packed weight's chunk
  // within ~256 KB.
  const int64_t nthreads = at::get_num_threads();
  const int64_t MB = round_up(std::clamp<int64_t>(std::min<int64_t>(65536 / static_cast<int64_t>(Cp * sizeof(T)),
                                                                    (M + 2 * nthreads - 1) / (2 * nthreads)),
                                                  attn::kRows, 512),
                              attn::kRows);
  const int64_t kc_max = std::clamp<int64_t>(262144 / static_cast<int64_t>(Cp * sizeof(T)), 32, 512);
  const int64_t nchunk = (kC + kc_max - 1) / kc_max, kc = (kC + nchunk - 1) / nchunk;
  attn::parallel_dynamic((M + MB - 1) / MB, 1, [&](auto&& grab) {
    std::vector<T> acc(MB * Cp), tmp(Cp), abuf((!g.linear && !kInPlace) || pool_rows ? MB * K : 0);
    std::vector<const T*> rows(MB);
    int64_t t0, t1;
    while (grab(t0, t1)) {
      const int64_t r0 = t0 * MB, nr = std::min(MB, M - r0);
      int64_t ky_stride = 0;
      if (pool_rows) {
        for (int64_t i = 0; i < nr; ++i) {
          pool_token(g, px, r0 + i, &abuf[i * K]);  // K = C here
          rows[i] = &abuf[i * K];
        }
      } else if constexpr (kInPlace) {  // also the 7 x 7 linear mode: k = 1, and row r starts at token r
        for (int64_t i = 0; i < nr; ++i) rows[i] = px + row_origin(g, r0 + i);
        ky_stride = g.W * C;
      } else {
        for (int64_t i = 0; i < nr; ++i) {
          const scalar_t* src = px + row_origin(g, r0 + i);
          T* dst = &abuf[i * K];
          for (int64_t ky = 0; ky < g.k; ++ky) load_row(src + ky * g.W * C, dst + ky * kC, kC, T(1));
          rows[i] = dst;
        }
        ky_stride = kC;
      }
      gemm_rows<T>(nr, rows.data(), ky_stride, g.k, kC, Wp, kc, acc.data());
      for (int64_t i = 0; i < nr; ++i) {
        const int64_t r = r0 + i;
        norm_row<T, scalar_t>(&acc[i * Cp], C, bv.data(), nw.data(), nb.data(), eps, g.linear, py + r * C,
                              ps + 2 * r, po + r * C, tmp.data());
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> spatial_reduction_cpu(
    const at::Tensor& x, c10::IntArrayRef feat_size, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& norm_weight, const at::Tensor& norm_bias, int64_t sr_ratio, bool linear, double eps) {
  const Geom g = check_args(kFwd, x, feat_size, weight, norm_weight, norm_bias, sr_ratio, linear);
  if (bias.has_value() && bias->defined()) check_param(kFwd, "bias", *bias, x, {g.C});
  const auto acc = acc_type_of(x);
  at::Tensor out = at::empty({g.B, g.Nr, g.C}, x.options());
  at::Tensor y = at::empty({g.B, g.Nr, g.C}, x.options().dtype(acc));
  at::Tensor stats = at::empty({g.B, g.Nr, 2}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "spatial_reduction_cpu", [&] {
    forward_kernel<scalar_t>(g, x, weight, bias, norm_weight, norm_bias, eps, out, y, stats);
  });
  return {out, y, stats};
}

// ---------------------------------------------------------------------------------------------------------
// Backward. Per row: dz = grad_out (times GELU'(z), z recomputed from y, stats and the norm parameters, in
// linear mode); dy = rstd (g - mean(g) - xhat mean(g xhat)) with g = dz * norm_weight. The parameter sums over
// rows go to partial sums of a fixed set of row chunks, added in chunk order (repeatable for any thread
// count). Then the two dense products grad_weight = dy^T A and dA = dy W, A the patch matrix (M x K, or the
// pooled tokens), one column panel of A at a time (see panel_products); dA goes back to the pixels it was
// read from (each pixel is read by at most one patch, since stride = kernel), or through the pooling bins.

// One row of the LayerNorm (+ GELU) backward on whole vectors: g holds grad_out's row and xh y's, both zero
// past C up to their padded length Cp (both are overwritten: scratch); dy (Cp values) gets the row of dy, and
// the parameter sums pw (dz xhat), pb (dz), pyb (dy) are added to. The padding lanes have dz = 0 and add
// nothing to the means; past C, dy and pyb get values that are never read.
template <typename T>
inline void norm_row_backward(int64_t C, int64_t Cp, T mean, T rstd, const T* nw, const T* nb, bool gelu,
                              T* __restrict__ g, T* __restrict__ xh, T* __restrict__ dy, T* __restrict__ pw,
                              T* __restrict__ pb, T* __restrict__ pyb) {
  using S = simd::Vec<T, attn::kWB>;  // the widest vectors: the GELU derivative is arithmetic-bound
  using V = typename S::V;
  const V mv = S::splat(mean), rv = S::splat(rstd);
  V sg = S::splat(T(0)), sgx = S::splat(T(0));
  for (int64_t c = 0; c < Cp; c += S::N) {
    const V xhat = (S::load(xh + c) - mv) * rv;
    V dz = S::load(g + c);
    if (gelu) dz *= simd::VGeluGrad<T, attn::kWB>::run(xhat * S::load(nw + c) + S::load(nb + c));
    S::store(pw + c, S::load(pw + c) + dz * xhat);
    S::store(pb + c, S::load(pb + c) + dz);
    const V gc = dz * S::load(nw + c);
    S::store(g + c, gc);
    S::store(xh + c, xhat);
    sg += gc;
    sgx += gc * xhat;
  }
  const V mg = S::splat(S::sum(sg) / static_cast<T>(C)), mgx = S::splat(S::sum(sgx) / static_cast<T>(C));
  for (int64_t c = 0; c < Cp; c += S::N) {
    const V d = rv * (S::load(g + c) - mg - S::load(xh + c) * mgx);
    S::store(dy + c, d);
    S::store(pyb + c, S::load(pyb + c) + d);
  }
}

// Runs f(j, len, a_off) over the pieces of A's columns [j0, j0 + n) that are contiguous in x: column
// j = ky * kC + o of patch row r is x[row_origin(r) + ky * W * C + o], and a piece ends where ky changes.
template <typename F>
inline void patch_pieces(const Geom& g, int64_t j0, int64_t n, F f) {
  const int64_t kC = g.k * g.C;
  for (int64_t j = j0; j < j0 + n;) {
    const int64_t ky = j / kC, o = j % kC, len = std::min(j0 + n - j, kC - o);
    f(j - j0, len, ky * g.W * g.C + o);
    j += len;
  }
}

// out (rows x w, ldc) = A (rows x kd) B (kd x w), or += with `accumulate`; kd >= 1, B a panel (row stride w).
// make_a(r0, k0) is the accessor of A from row r0 and inner index k0. The inner dimension goes in chunks whose
// rows of B (at most 32 KB) stay in L1 while every row tile passes.
template <typename T, typename MakeA>
void panel_gemm(int64_t rows, int64_t kd, int64_t w, bool accumulate, MakeA make_a, const T* B, T* out, int64_t ldc) {
  const int nv = static_cast<int>(w / kLanes<T>);
  const int64_t kc_max = std::max<int64_t>(16, 32768 / static_cast<int64_t>(w * sizeof(T)));
  const int64_t nchunk = (kd + kc_max - 1) / kc_max, kc = (kd + nchunk - 1) / nchunk;
  for (int64_t k0 = 0; k0 < kd; k0 += kc) {
    const int64_t kn = std::min(kc, kd - k0);
    for (int64_t r0 = 0; r0 < rows; r0 += kMR) {
      const int R = static_cast<int>(std::min<int64_t>(kMR, rows - r0));
      if (k0 == 0 && !accumulate)
        attn::micro_any<T, false, kMR, kNV>(R, nv, kn, make_a(r0, k0), B, w, out + r0 * ldc, ldc);
      else
        attn::micro_any<T, true, kMR, kNV>(R, nv, kn, make_a(r0, k0), B + k0 * w, w, out + r0 * ldc, ldc);
    }
  }
}

// The backward's two products, panel by panel: for a panel of A's columns [j0, j0 + w) (the micro-kernel's
// width) and a block of rows, the panel P of A (rows x w) is gathered into a per-thread buffer, then
// grad_weight[:, panel] (+)= dy^T P and dA[:, panel] = dy Q with Q = W's columns [j0, j0 + w) (C x w); dA
// goes straight to grad x (or to the pooled tokens' gradient dpooled). dy (M x C) is the operand both products
// broadcast from and stays in L2; x is read once and grad x written once. Few panels (small C k^2) are split
// into row blocks too (a count from the shapes alone, so that results repeat for any thread count), so that
// every thread has work; their grad_weight parts are added in block order.
// Writes grad_weight to pgw.
template <typename scalar_t, typename T>
void panel_products(const Geom& g, const scalar_t* px, const T* pooled, const scalar_t* pw, const T* pdy,
                    scalar_t* pgx, T* dpooled, scalar_t* pgw) {
  constexpr int Wd = kLanes<T>;
  const int64_t C = g.C, K = g.K, M = g.B * g.Nr, kk = g.k * g.k, tile = kNV * Wd;
  const int64_t Kp = round_up(K, Wd), npanel = (Kp + tile - 1) / tile;
  const int64_t nmb = std::clamp<int64_t>((16 + npanel - 1) / npanel, 1, std::max<int64_t>(1, M / 48));
  constexpr int64_t kRowBlock = 256;  // rows of P and D at a time: with Q and G they stay in L2
  std::unique_ptr<T[]> part(new T[nmb * C * Kp]);  // every value is written by one task
  std::vector<int64_t> origin(g.linear ? 0 : M);
  for (int64_t r = 0; r < static_cast<int64_t>(origin.size()); ++r) origin[r] = row_origin(g, r);
  // W as (C_out x K): column j = tap * C + ci is weight[co, ci, ky, kx] with tap = ky * k + kx. Gathered per
  // panel from the weight itself, each value would cost a cache line of its own (they are k^2 apart).
  // A 1 x 1 weight in the accumulation type is that matrix already; others are transposed per output channel
  // (C_in x k^2 -> k^2 x C_in) by attn::transpose: 8 x 8 register blocks for fp32 with k^2 >= 8, a plain copy
  // for k = 1, its strip loops otherwise. The former per-element loops, here and for grad_weight at the end,
  // took ~20% of PVTv2-b2 stage 3's backward in a profile.
  std::unique_ptr<T[]> wm;
  const T* wmat = nullptr;
  if constexpr (std::is_same_v<scalar_t, T>) {
    if (kk == 1) wmat = pw;
  }
  if (!wmat) {
    wm.reset(new T[C * K]);
    at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t co = c0; co < c1; ++co) attn::transpose(pw + co * K, C, kk, kk, &wm[co * K], C);
    });
    wmat = wm.get();
  }
  attn::parallel_dynamic(npanel * nmb, 1, [&](auto&& grab) {
    std::vector<T> P(kRowBlock * tile), D(kRowBlock * tile), Q(C * tile), G(C * tile);
    int64_t t0, t1;
    while (grab(t0, t1)) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t pn = t / nmb, mb = t % nmb, j0 = pn * tile, w = std::min(tile, Kp - j0);
        const int64_t n = std::min(w, K - j0), m0 = M * mb / nmb, m1 = M * (mb + 1) / nmb;
        for (int64_t co = 0; co < C; ++co) {
          std::copy(wmat + co * K + j0, wmat + co * K + j0 + n, &Q[co * w]);
          std::fill(&Q[co * w] + n, &Q[(co + 1) * w], T(0));
        }
        if (m0 == m1) std::fill(G.begin(), G.end(), T(0));
        for (int64_t rb = m0; rb < m1; rb += kRowBlock) {
          const int64_t rows = std::min(kRowBlock, m1 - rb);
          for (int64_t r = 0; r < rows; ++r) {
            T* dst = &P[r * w];
            if (g.linear)
              std::copy(pooled + (rb + r) * C + j0, pooled + (rb + r) * C + j0 + n, dst);
            else
              patch_pieces(g, j0, n, [&](int64_t at, int64_t len, int64_t off) {
                load_row(px + origin[rb + r] + off, dst + at, len, T(1));
              });
            std::fill(dst + n, dst + w, T(0));
          }
          const T* dyb = pdy + rb * C;  // this block's rows of dy
          panel_gemm<T>(C, rows, w, rb > m0,
                        [&](int64_t c0, int64_t k0) { return attn::TransposedA<T>{dyb + k0 * C + c0, C}; }, P.data(),
                        G.data(), w);
          panel_gemm<T>(rows, C, w, false,
                        [&](int64_t r0, int64_t k0) { return attn::RowMajorA<T>{dyb + r0 * C + k0, C}; }, Q.data(),
                        D.data(), w);
          for (int64_t r = 0; r < rows; ++r) {
            const T* src = &D[r * w];
            if (g.linear)
              std::copy(src, src + n, dpooled + (rb + r) * C + j0);
            else
              patch_pieces(g, j0, n, [&](int64_t at, int64_t len, int64_t off) {
                store_row(src + at, pgx + origin[rb + r] + off, len, T(1));
              });
          }
        }
        // Into the (C x Kp) partial sum only now: accumulating there (rows Kp apart, often a power of two)
        // would map the tile's rows onto a few cache sets.
        for (int64_t co = 0; co < C; ++co) std::copy(&G[co * w], &G[(co + 1) * w], &part[(mb * C + co) * Kp + j0]);
      }
    }
  });
  // grad_weight[co, ci, ky, kx]: the block parts' column tap * C + ci, added in block order.
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    std::vector<T> row(K);
    for (int64_t co = c0; co < c1; ++co) {
      std::copy(&part[co * Kp], &part[co * Kp] + K, row.data());
      for (int64_t mb = 1; mb < nmb; ++mb) attn::add_row(&part[(mb * C + co) * Kp], row.data(), K);
      attn::transpose(row.data(), kk, C, C, pgw + co * K, kk);
    }
  });
}

template <typename scalar_t>
void backward_kernel(const Geom& g, const at::Tensor& go, const at::Tensor& x, const at::Tensor& weight,
                     const at::Tensor& norm_weight, const at::Tensor& norm_bias, const at::Tensor& y,
                     const at::Tensor& stats, bool bias_grad, at::Tensor& gx, at::Tensor& gw, at::Tensor& gb,
                     at::Tensor& gnw, at::Tensor& gnb) {
  using T = at::opmath_type<scalar_t>;
  const int64_t C = g.C, M = g.B * g.Nr;
  const int64_t Cp = round_up(C, kLanes<T>);
  const std::vector<T> nw = to_acc<T>(norm_weight, C, Cp), nb = to_acc<T>(norm_bias, C, Cp);
  const scalar_t* pgo = go.data_ptr<scalar_t>();
  const scalar_t* px = x.data_ptr<scalar_t>();
  const T* py = y.data_ptr<T>();
  const T* pst = stats.data_ptr<T>();
  at::Tensor dy = at::empty({M, C}, y.options());
  T* pdy = dy.data_ptr<T>();
  const int64_t nch = std::max<int64_t>(1, std::min<int64_t>(M, 64));
  std::vector<T> part(nch * 3 * Cp, T(0));  // per chunk: sum dz xhat | sum dz | sum dy

  at::parallel_for(0, nch, 1, [&](int64_t c0, int64_t c1) {
    std::vector<T> gbuf(Cp, T(0)), xh(Cp, T(0)), dbuf(Cp);
    for (int64_t ch = c0; ch < c1; ++ch) {
      T* pw = &part[ch * 3 * Cp];
      for (int64_t r = M * ch / nch; r < M * (ch + 1) / nch; ++r) {
        load_row(pgo + r * C, gbuf.data(), C, T(1));
        std::copy(py + r * C, py + (r + 1) * C, xh.data());
        std::fill(gbuf.begin() + C, gbuf.end(), T(0));
        std::fill(xh.begin() + C, xh.end(), T(0));
        norm_row_backward<T>(C, Cp, pst[2 * r], pst[2 * r + 1], nw.data(), nb.data(), g.linear, gbuf.data(),
                             xh.data(), dbuf.data(), pw, pw + Cp, pw + 2 * Cp);
        std::copy(dbuf.data(), dbuf.data() + C, pdy + r * C);
      }
    }
  });
  {
    std::vector<T> tot(3 * Cp, T(0));
    for (int64_t ch = 0; ch < nch; ++ch) attn::add_row(&part[ch * 3 * Cp], tot.data(), 3 * Cp);
    store_row(tot.data(), gnw.data_ptr<scalar_t>(), C, T(1));
    store_row(tot.data() + Cp, gnb.data_ptr<scalar_t>(), C, T(1));
    if (bias_grad) store_row(tot.data() + 2 * Cp, gb.data_ptr<scalar_t>(), C, T(1));
  }

  scalar_t* pgx = gx.data_ptr<scalar_t>();
  // Both fully written before they are read (pool_all; panel_products' panels cover every column).
  std::unique_ptr<T[]> pooled(new T[g.linear ? M * C : 0]), dpooled(new T[g.linear ? M * C : 0]);
  if (g.linear) pool_all<scalar_t, T>(g, px, pooled.get());
  panel_products<scalar_t, T>(g, px, pooled.get(), weight.data_ptr<scalar_t>(), pdy, pgx, dpooled.get(),
                              gw.data_ptr<scalar_t>());
  if (g.linear) {
    at::parallel_for(0, g.B * g.H, 1, [&](int64_t t0, int64_t t1) {
      std::vector<T> rowacc(g.W * C);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / g.H, hy = t % g.H;
        std::fill(rowacc.begin(), rowacc.end(), T(0));
        for (int64_t i = 0; i < kPool; ++i) {
          const int64_t h0 = bin_start(i, g.H), h1 = bin_end(i, g.H);
          if (hy < h0 || hy >= h1) continue;
          for (int64_t j = 0; j < kPool; ++j) {
            const int64_t w0 = bin_start(j, g.W), w1 = bin_end(j, g.W);
            const T inv_area = T(1) / static_cast<T>((h1 - h0) * (w1 - w0));
            const T* src = &dpooled[(b * g.Nr + i * kPool + j) * C];
            for (int64_t wx = w0; wx < w1; ++wx) {
              T* dst = &rowacc[wx * C];
              for (int64_t c = 0; c < C; ++c) dst[c] += src[c] * inv_area;
            }
          }
        }
        store_row(rowacc.data(), pgx + (b * g.N + hy * g.W) * C, g.W * C, T(1));
      }
    });
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> spatial_reduction_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, c10::IntArrayRef feat_size, const at::Tensor& weight,
    const at::Tensor& norm_weight, const at::Tensor& norm_bias, const at::Tensor& y, const at::Tensor& stats,
    int64_t sr_ratio, bool linear, bool bias_grad) {
  const Geom g = check_args(kBwd, x, feat_size, weight, norm_weight, norm_bias, sr_ratio, linear);
  const auto acc = acc_type_of(x);
  const std::vector<int64_t> osz{g.B, g.Nr, g.C}, ssz{g.B, g.Nr, 2};
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(osz) && grad_out.scalar_type() == x.scalar_type() &&
                  grad_out.device().is_cpu(),
              kBwd, ": grad_out must be a CPU ", x.scalar_type(), " tensor of shape ", at::IntArrayRef(osz), ", got ",
              grad_out.scalar_type(), " ", grad_out.sizes(), " on ", grad_out.device());
  TORCH_CHECK(y.sizes() == at::IntArrayRef(osz) && y.scalar_type() == acc && y.device().is_cpu(), kBwd,
              ": y must be the forward's CPU ", acc, " tensor of shape ", at::IntArrayRef(osz), ", got ",
              y.scalar_type(), " ", y.sizes(), " on ", y.device());
  TORCH_CHECK(stats.sizes() == at::IntArrayRef(ssz) && stats.scalar_type() == acc && stats.device().is_cpu(), kBwd,
              ": stats must be the forward's CPU ", acc, " tensor of shape ", at::IntArrayRef(ssz), ", got ",
              stats.scalar_type(), " ", stats.sizes(), " on ", stats.device());
  // Incoming gradients are often expanded or transposed views; the kernel reads them densely.
  const at::Tensor go = grad_out.contiguous(), yc = y.contiguous(), sc = stats.contiguous();
  // Pixels that no patch reads (rows / columns past Hr * k, Wr * k) get zero.
  const bool covered = linear || (g.Hr * g.k == g.H && g.Wr * g.k == g.W);
  at::Tensor gx = covered ? at::empty_like(x, at::MemoryFormat::Contiguous)
                          : at::zeros_like(x, at::MemoryFormat::Contiguous);
  at::Tensor gw = at::empty_like(weight, at::MemoryFormat::Contiguous);
  at::Tensor gb = at::empty({bias_grad ? g.C : 0}, x.options());
  at::Tensor gnw = at::empty({g.C}, x.options()), gnb = at::empty({g.C}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "spatial_reduction_backward_cpu", [&] {
    backward_kernel<scalar_t>(g, go, x, weight, norm_weight, norm_bias, yc, sc, bias_grad, gx, gw, gb, gnw, gnb);
  });
  return {gx, gw, gb, gnw, gnb};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastops, CPU, m) {
  m.impl("spatial_reduction", &spatial_reduction_cpu);
  m.impl("spatial_reduction_backward", &spatial_reduction_backward_cpu);
}

}  // namespace fastops
