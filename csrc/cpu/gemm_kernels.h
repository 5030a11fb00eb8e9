// fp32 GEMM with a fused epilogue, for 1x1 convolutions (stride 1, no padding, groups 1) over channels_last
// maps, and so for the Linear layers that linear_act passes as such:
//
//   y[m, n] = act(sum_k x[m, k] w[n, k] + bias[n] + r[m, n]),  x (M, K), w (N, K), r and y (M, N), row-major,
//   optionally with the sum and the bias multiplied by a scale first (Args::scale);
//
// and over NCHW maps (run_nchw, at the end), where the same tiles run with the roles of x and w swapped.
//
// Why not oneDNN here: the Linear layers of Swin-T / PVTv2 and the 1x1 convolutions of MobileNetV2 have
// few input or output channels (K or N of 16-384) and many tokens. Timed inside those models on a 2-core
// AVX-512 EPYC (FMA ceiling ~230 GFLOP/s), oneDNN ran them at 135-180 GFLOP/s; this kernel, with all of the
// weight packed in L2 and the activation applied to the accumulators, took 5-24% less time on the layers
// with K or N <= 192 (GELU ones included) and as long at K = 768. In a hot loop the two were within 10%.
//
// Structure: the weight is packed once into panels of kNR columns ([K][nv * kL] each, zero-padded to whole
// vectors). Each thread takes a range of rows of x and walks it in chunks of kChunkRows rows; for every
// panel it runs register tiles of rows_for(nv) rows x nv vectors over the chunk, so the chunk of x stays in
// L2 while every panel passes over it, and the panel is read from L1 (small K) or L2 by the chunk's tiles.
// Accumulation in fp32, starting from the bias; rows and columns past the ends are computed on clamped rows
// and zero-padded columns and never stored, so no read or write leaves the tensors.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <numeric>
#include <vector>

#include "cpu/depthwise_kernels.h"
#include "cpu/packed_weights.h"
#include "cpu/simd.h"
#include "cpu/stream_store.h"

namespace fastops {
namespace gemm {

using bnact::Act;
using W = simd::Vec<float, simd::kWideBytes>;
constexpr int kL = W::N;
// Vectors per panel row, and so the panel width: 4 x 16 floats with AVX-512's 32 registers, 2 x 8 with
// AVX2's 16.
constexpr int kMaxNV = simd::kWideBytes == 64 ? 4 : 2;
constexpr int64_t kNR = kMaxNV * kL;

// Built for AVX2 + FMA or AVX-512 only: on narrower vector units the tiles would spill their accumulators,
// and oneDNN, which picks its kernels for the CPU at run time, is the better choice there.
constexpr bool kEnabled = simd::kFmaVectors;

// Tile rows for nv vectors per row: rows x nv accumulators plus nv panel vectors and a broadcast must fit
// the registers (AVX-512: 6 x 4, 8 x 3, 12 x 2, 12 x 1; AVX2: 6 x 2, 12 x 1).
constexpr int rows_for(int nv) {
  return nv == 1 ? 12 : nv == 2 ? (kMaxNV == 4 ? 12 : 6) : nv == 3 ? 8 : 6;
}
// Rows a thread runs every panel over before it moves on: a multiple of every tile height.
constexpr int64_t kChunkRows = 72;

// K beyond which the 1x1 path leaves the GEMM to oneDNN: the kernel does not block K; at K = 768 the two
// ran alike (Swin-T stage 4), at 1024 this one was 10% slower (PVTv2-b0 stage 4 fc2).
constexpr int64_t kMaxK = 768;

// Weight elements (N K) beyond which the NCHW path leaves the GEMM to oneDNN: run_nchw reads the whole weight
// once per panel of pixels, and past the L2 it comes from L3. Timed in hot loops on two 2-core hosts (AMD
// EPYC, Intel Xeon) over ResNet-50 / MobileNetV2 layers: at 256 K elements (1 MB) and above neither was
// consistently faster; at 154 K and below this kernel was ahead on most layers (the limit lies between).
constexpr int64_t kMaxNchwWeight = 192 * 1024;

// Floats of the packed weight of an (N, K) one: every panel as wide as its whole vectors.
inline int64_t packed_numel(int64_t N, int64_t K) { return (N + kL - 1) / kL * kL * K; }

inline int panel_vectors(int64_t N, int64_t p) {
  const int64_t cols = std::min<int64_t>(kNR, N - p * kNR);
  return static_cast<int>((cols + kL - 1) / kL);
}

// w (N, K) row-major -> panels: panel p (columns [p kNR, p kNR + nv kL)) at p * kNR * K, laid out [K][nv kL].
inline void pack(const float* w, int64_t N, int64_t K, float* out) {
  const int64_t panels = (N + kNR - 1) / kNR;
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t width = panel_vectors(N, p) * kL, n0 = p * kNR;
      float* dst = out + p * kNR * K;
      for (int64_t k = 0; k < K; ++k)
        for (int64_t j = 0; j < width; ++j) dst[k * width + j] = n0 + j < N ? w[(n0 + j) * K + k] : 0.f;
    }
  });
}

// An fp32 1x1 weight (N, K, 1, 1) or (N, K) packed into pack()'s panels: kept between calls in PackedWeights
// (cpu/packed_weights.h), packed anew on every call where w is not to be cached.
inline at::Tensor cached_panels(const at::Tensor& w) {
  auto make = [&] {
    const at::Tensor wc = w.contiguous();
    at::Tensor out = at::empty({packed_numel(w.size(0), w.size(1))}, w.options());
    pack(wc.data_ptr<float>(), w.size(0), w.size(1), out.data_ptr<float>());
    return out;
  };
  if (!PackedWeights::cacheable(w)) return make();
  // No input size in the key (the panels do not depend on it), but the weight's geometry: a `.data` swap
  // can change it under the same data pointer and version.
  return PackedWeights::get().find_or_make(w, {kConvGemmKey, w.size(0), w.size(1), w.stride(0), w.stride(1)}, make);
}

// A per-column bias as the tiles read it: packed_numel(N, 1) floats, zero-padded (all zeros without a bias).
inline std::vector<float> padded_bias(const at::Tensor* bias, int64_t N) {
  std::vector<float> v(packed_numel(N, 1), 0.f);
  if (bias) {
    const at::Tensor f = bias->to(at::kFloat).contiguous();
    std::copy(f.data_ptr<float>(), f.data_ptr<float>() + N, v.begin());
  }
  return v;
}

// The first n (< kL) floats at p as a vector, zeros after; and its inverse for stores.
inline W::V load_part(const float* p, int64_t n) {
  float t[kL] = {};
  std::memcpy(t, p, sizeof(float) * n);
  return W::load(t);
}
inline void store_part(float* p, W::V v, int64_t n) {
  float t[kL];
  W::store(t, v);
  std::memcpy(p, t, sizeof(float) * n);
}

struct Args {
  const float* x;       // (M, K), row stride lda
  int64_t lda;
  const float* packed;  // pack()'s panels
  const float* bias;    // per column: packed_numel(N, 1) floats, zero-padded; per row: M floats
  bool bias_rows;
  const float* r;       // (M, N) residual, row stride ldy, or null
  float* y;             // (M, N), row stride ldy
  int64_t ldy;
  int64_t M, K, N;
  bool stream;          // y written around the cache (AVX-512, ldy % 16 == 0, y 64-byte aligned)
  bool prefetch;        // x's and r's rows asked for one tile ahead (see tile): false where x is hot
  // Optional: the accumulators (bias included) are multiplied by a scale before the residual is added. Where
  // bias_rows, one per row (scale[m]); else one per column for each group of scale_rows rows: rows
  // [s scale_rows, (s + 1) scale_rows) take scale + s packed_numel(N, 1), zero-padded like the bias. A 1x1
  // convolution over channels_last maps so applies a per-sample, per-channel gate (conv1x1_squeeze_excite).
  const float* scale = nullptr;
  int64_t scale_rows = 0;
};

// Floats per cache line.
constexpr int64_t kLine = 64 / sizeof(float);

// One tile: `rows` (<= MR) rows from m0, the nv vectors of panel p.
//
// Inside a model x and r arrive from memory (the layer before wrote more than the cache keeps), and the hardware
// prefetcher did not keep up with the tiles' rows: with the cache flushed before each call ResNet-50's 256 -> 64
// layer at 56x56 took 3.17 ms (2-core Xeon). With PF the tile asks for the next tile's rows instead: in the first
// panel x's, a line of each row per kLine steps of k (later panels read them from L2, where the chunk keeps
// them), and in every panel r's columns of this panel (2.63 ms).
template <int NV, Act A, bool PF>
inline void tile(const Args& g, int64_t m0, int64_t rows, int64_t p) {
  constexpr int MR = rows_for(NV);
  const int64_t K = g.K, n0 = p * kNR, cols = std::min<int64_t>(NV * kL, g.N - n0);
  const int64_t ahead = PF ? std::clamp<int64_t>(g.M - m0 - MR, 0, MR) : 0;
  const float* xn = ahead > 0 && p == 0 ? g.x + (m0 + MR) * g.lda : nullptr;
  if (ahead > 0 && g.r) {
    const float* rn = g.r + (m0 + MR) * g.ldy + n0;
    for (int64_t i = 0; i < ahead; ++i) dw::prefetch_range(rn + i * g.ldy, cols * static_cast<int64_t>(sizeof(float)));
  }
  const float* __restrict__ bp = g.packed + p * kNR * K;
  const float* ap[MR];
  for (int i = 0; i < MR; ++i) ap[i] = g.x + (m0 + std::min<int64_t>(i, rows - 1)) * g.lda;
  typename W::V acc[MR][NV];
  if (g.bias_rows) {
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const typename W::V b = W::splat(g.bias[m0 + std::min<int64_t>(i, rows - 1)]);
#pragma GCC unroll 16
      for (int j = 0; j < NV; ++j) acc[i][j] = b;
    }
  } else {
#pragma GCC unroll 16
    for (int j = 0; j < NV; ++j) {
      const typename W::V b = W::load(g.bias + n0 + j * kL);
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) acc[i][j] = b;
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    if constexpr (PF) {
      if (xn && k % kLine == 0)
        for (int64_t i = 0; i < ahead; ++i) __builtin_prefetch(xn + i * g.lda + k, 0, 3);
    }
    typename W::V b[NV];
#pragma GCC unroll 16
    for (int j = 0; j < NV; ++j) b[j] = W::load(bp + k * (NV * kL) + j * kL);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      // x - 0 folds to a plain broadcast; 0 + x cannot be folded (it turns -0 into +0), so it costs an add.
      const typename W::V a = ap[i][k] - typename W::V{};
#pragma GCC unroll 16
      for (int j = 0; j < NV; ++j) acc[i][j] += a * b[j];
    }
  }
  const bool whole = cols == NV * kL;
  for (int i = 0; i < MR; ++i) {
    if (i >= rows) break;
    float* yr = g.y + (m0 + i) * g.ldy + n0;
    const float* rr = g.r ? g.r + (m0 + i) * g.ldy + n0 : nullptr;
    const float* sr =
        g.scale && !g.bias_rows ? g.scale + (m0 + i) / g.scale_rows * packed_numel(g.N, 1) + n0 : nullptr;
#pragma GCC unroll 16
    for (int j = 0; j < NV; ++j) {
      const int64_t left = cols - j * kL;
      if (left <= 0) break;
      typename W::V z = acc[i][j];
      if (sr) z *= W::load(sr + j * kL);
      else if (g.scale) z *= W::splat(g.scale[m0 + i]);
      if (rr) z += left >= kL ? W::load(rr + j * kL) : load_part(rr + j * kL, left);
      z = chan::act_v<A, simd::kWideBytes>(z);
      if (left < kL) store_part(yr + j * kL, z, left);
      else if (whole && g.stream) simd::store_vec<true, float, float, simd::kWideBytes>(yr + j * kL, z);
      else W::store(yr + j * kL, z);
    }
  }
}

template <int NV, Act A>
inline void panel_rows(const Args& g, int64_t m0, int64_t m1, int64_t p) {
  constexpr int MR = rows_for(NV);
  // The prefetching tiles only where they have something to fetch: the others keep the plain k loop.
  if (g.prefetch && (p == 0 || g.r))
    for (int64_t m = m0; m < m1; m += MR) tile<NV, A, true>(g, m, std::min<int64_t>(MR, m1 - m), p);
  else
    for (int64_t m = m0; m < m1; m += MR) tile<NV, A, false>(g, m, std::min<int64_t>(MR, m1 - m), p);
}

// Runs panel_rows for panel p with its vector count as a template argument.
template <Act A>
inline void panel_rows_any(const Args& g, int64_t m0, int64_t m1, int64_t p) {
  switch (panel_vectors(g.N, p)) {
    case 1: panel_rows<1, A>(g, m0, m1, p); break;
    case 2: panel_rows<2, A>(g, m0, m1, p); break;
    case 3: if constexpr (kMaxNV >= 3) panel_rows<3, A>(g, m0, m1, p); break;
    case 4: if constexpr (kMaxNV >= 4) panel_rows<4, A>(g, m0, m1, p); break;
    default: TORCH_INTERNAL_ASSERT(false, "gemm: a panel of ", panel_vectors(g.N, p), " vectors");
  }
}

template <Act A>
void run_act(const Args& g) {
  TORCH_INTERNAL_ASSERT(!g.scale || g.bias_rows || g.scale_rows > 0, "gemm: per-column scales need scale_rows");
  const int64_t panels = (g.N + kNR - 1) / kNR;
  // The threads split the rows in units of the tile heights in use, not of whole chunks: Swin-T stage 4's
  // 392 rows in chunks of 72 gave the threads 216 and 176 rows (~10% of the layer lost waiting).
  const int64_t last = rows_for(panel_vectors(g.N, panels - 1)), full = panels > 1 ? rows_for(kMaxNV) : last;
  const int64_t unit = std::lcm(last, full), units = (g.M + unit - 1) / unit;
  at::parallel_for(0, units, std::max<int64_t>(1, kChunkRows / unit), [&](int64_t u0, int64_t u1) {
    const int64_t end = std::min(g.M, u1 * unit);
    for (int64_t m0 = u0 * unit; m0 < end; m0 += kChunkRows) {
      const int64_t m1 = std::min(end, m0 + kChunkRows);
      for (int64_t p = 0; p < panels; ++p) panel_rows_any<A>(g, m0, m1, p);
    }
    if (g.stream) simd::stream_fence();
  });
}

inline void run(const Args& g, Act act) {
  chan::dispatch_act(act, [&](auto ac) { run_act<decltype(ac)::value>(g); });
}

// NCHW maps: per sample b, y_b (N, P) = act(s_b (w (N, K) x_b (K, P) + bias) + r_b) over the P = H W pixels,
// s_b a scale per row where NchwArgs::scale is set, else 1.
// Here the weight's rows are the tile rows (broadcast) and the pixels the columns: a unit of work copies one
// panel of up to kNR pixels of x_b ([K][nv kL], zero-padded) into a per-thread buffer, which stays in L2 while the
// weight's rows pass over it in tiles, with the bias per row. Nothing of x is packed between calls, so no
// cache is involved.
struct NchwArgs {
  const float* x;     // (B, K, P)
  const float* w;     // (N, K), row-major
  const float* bias;  // N floats
  const float* r;     // (B, N, P) or null
  float* y;           // (B, N, P)
  int64_t B, K, N, P;
  bool stream;        // as Args::stream, for P % 16 == 0
  const float* scale = nullptr;  // optional, per sample and row: b's at scale + b packed_numel(N, 1)
};

template <Act A>
void run_nchw_act(const NchwArgs& a) {
  // The pixels' vectors shared out evenly over the fewest panels: 196 pixels (13 vectors) as 4 + 3 + 3 + 3
  // rather than 4 + 4 + 4 + 1, whose last panel would run one-vector tiles (a broadcast per FMA).
  const int64_t vecs = (a.P + kL - 1) / kL, panels = (vecs + kMaxNV - 1) / kMaxNV, pairs = a.B * panels;
  const int64_t base = vecs / panels, extra = vecs % panels;
  auto span = [&](int64_t p, int64_t& c0, int64_t& cols) {
    c0 = (p * base + std::min(p, extra)) * kL;
    cols = std::min((base + (p < extra)) * kL, a.P - c0);
  };
  // Where the (sample, panel) pairs are too few to share out (batch 1 at 7x7 is one pair), the rows are split
  // too, in blocks of whole tiles of every height; each block copies its panel again.
  int64_t unit = 1;
  for (int nv = 1; nv <= kMaxNV; ++nv) unit = std::lcm<int64_t>(unit, rows_for(nv));
  const int64_t want = 4 * at::get_num_threads();
  const int64_t asked = std::clamp<int64_t>((want + pairs - 1) / pairs, 1, (a.N + unit - 1) / unit);
  const int64_t block_rows = ((a.N + asked - 1) / asked + unit - 1) / unit * unit;
  // Rounding the blocks up to whole units can leave fewer of them than asked for (none empty).
  const int64_t blocks = (a.N + block_rows - 1) / block_rows;
  at::parallel_for(0, pairs * blocks, 1, [&](int64_t u0, int64_t u1) {
    // 64-byte aligned (K kNR floats are a multiple of 64 bytes), so that no panel load splits a cache line.
    std::unique_ptr<float, decltype(&std::free)> buf(
        static_cast<float*>(std::aligned_alloc(64, sizeof(float) * a.K * kNR)), &std::free);
    TORCH_CHECK(buf, "gemm: out of memory for a ", a.K, " x ", kNR, " panel");
    int64_t packed = -1;
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t pair = u / blocks, blk = u % blocks, b = pair / panels;
      int64_t c0, cols;
      span(pair % panels, c0, cols);
      const int nv = static_cast<int>((cols + kL - 1) / kL);
      if (pair != packed) {
        const float* xs = a.x + (b * a.K) * a.P + c0;
        for (int64_t k = 0; k < a.K; ++k) {
          float* d = buf.get() + k * nv * kL;
          std::memcpy(d, xs + k * a.P, sizeof(float) * cols);
          std::fill(d + cols, d + nv * kL, 0.f);
        }
        packed = pair;
      }
      const int64_t out = b * a.N * a.P + c0;
      Args g{a.w, a.K, buf.get(), a.bias, true, a.r ? a.r + out : nullptr, a.y + out, a.P, a.N, a.K, cols,
             a.stream, false};
      if (a.scale) g.scale = a.scale + b * packed_numel(a.N, 1);
      // The next pair's rows of x are scattered over K rows, which the hardware prefetcher does not follow:
      // they are asked for a share at a time between this unit's tiles, so that they arrive while this panel
      // is computed.
      const int64_t next = pair + 1, m_begin = blk * block_rows, m_end = std::min(a.N, m_begin + block_rows);
      const int64_t step = rows_for(nv), share = (a.K * step + (m_end - m_begin) - 1) / (m_end - m_begin);
      const bool ahead = blk == blocks - 1 && next * blocks < u1;
      int64_t nc0 = 0, ncols = 0;
      if (ahead) span(next % panels, nc0, ncols);
      const float* xn = ahead ? a.x + (next / panels * a.K) * a.P + nc0 : a.x;
      for (int64_t m0 = m_begin, k0 = 0; m0 < m_end; m0 += step, k0 += share) {
        panel_rows_any<A>(g, m0, std::min(m_end, m0 + step), 0);
        for (int64_t k = k0; ahead && k < std::min(a.K, k0 + share); ++k)
          for (int64_t c = 0; c < ncols; c += kLine) __builtin_prefetch(xn + k * a.P + c, 0, 2);
      }
    }
    if (a.stream) simd::stream_fence();
  });
}

inline void run_nchw(const NchwArgs& a, Act act) {
  chan::dispatch_act(act, [&](auto ac) { run_nchw_act<decltype(ac)::value>(a); });
}

// The weight of a 1x1 convolution (Cout, K, 1, 1) as conv1x1() reads it: packed panels for channels_last maps
// (cached between calls), its rows for NCHW ones.
inline at::Tensor conv1x1_weight(const at::Tensor& w, bool cl) { return cl ? cached_panels(w) : w.contiguous(); }

// A 1x1 convolution (stride 1, no padding, one group) of fp32 maps through the GEMMs above:
// y = act(scale (w x + bias) + r), x (N, K, H, W), y and r (N, Cout, H, W), all dense in one layout (cl:
// channels_last), wt = conv1x1_weight(w, cl). bias: packed_numel(Cout, 1) floats, zero-padded; r and scale may
// be null, scale is (N, packed_numel(Cout, 1)) floats, one per sample and output channel, zero-padded.
inline void conv1x1(const at::Tensor& x, const at::Tensor& wt, int64_t Cout, const float* bias, const float* r,
                    const float* scale, Act act, bool cl, at::Tensor& y) {
  const int64_t N = x.size(0), K = x.size(1), P = x.size(2) * x.size(3);
  float* yp = y.data_ptr<float>();
  // Streamed stores write whole 64-byte lines: y's rows (channels_last: a pixel's channels, NCHW: a channel's
  // pixels) must be whole multiples of them, from an aligned start.
  const int64_t ld = cl ? Cout : P;
  const bool stream = simd::kWideBytes == 64 && ld % 16 == 0 && (reinterpret_cast<uintptr_t>(yp) & 63) == 0 &&
                      simd::should_stream(y.nbytes());
  if (!cl) {
    NchwArgs a{x.data_ptr<float>(), wt.data_ptr<float>(), bias, r, yp, N, K, Cout, P, stream};
    a.scale = scale;
    run_nchw(a, act);
    return;
  }
  Args a{x.data_ptr<float>(), K, wt.data_ptr<float>(), bias, false, r, yp, Cout, N * P, K, Cout, stream, true};
  a.scale = scale;
  a.scale_rows = P;
  run(a, act);
}

}  // namespace gemm
}  // namespace fastops
