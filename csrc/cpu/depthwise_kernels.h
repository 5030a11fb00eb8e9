// Depthwise conv2d loops on the CPU (forward and backward, NCHW and channels_last), shared by
// fastops::depthwise_conv2d and the depthwise case of fastops::conv_bias_act, plus the per-channel
// elementwise epilogue loops of bn_act / conv_bias_act.
//
// NCHW: one (n, c) plane at a time is copied, zero-padded and split into `stride` column phases in a
// thread-local fp32 buffer: column j of phase p holds padded column j*stride + p, so every tap of every
// stride reads a *contiguous* run of the buffer and the inner loop is a plain SIMD FMA over a tile of
// outputs kept in registers. Converting half/bf16 to fp32 happens in that same copy.
// channels_last: channels are contiguous, so the SIMD loop runs over a tile of channels for one output
// pixel, with the weights pre-transposed to (kh, kw, C). The common kernel widths and strides (3/5/7 at
// stride 1, 3/5 at stride 2) go through register tiles of 8 pixels that load each input pixel once for all
// the taps it feeds (namespace slide), in the widest vectors the build has (AVX-512: 16 channels a vector).
// Accumulation is in at::opmath_type<T> (fp32 for half/bf16/float, fp64 for double).
//
// The forward loops take a `post` callback, called once a unit of output is written and still in
// cache (an NCHW plane index n*C + c, or a channels_last output row index n*OH + oh), so that a caller
// can apply an epilogue (residual, activation) in place without another trip through memory.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "bn_act_common.h"
#include "common.h"
#include "cpu/attn_kernels.h"
#include "cpu/simd.h"
#include "cpu/stream_store.h"

// Rows here are short (7..112 elements): GCC's rewrite of copy loops into memmove/memset calls costs
// more per call than the copy itself.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-tree-loop-distribute-patterns")
#endif

namespace fastops {
namespace dw {

constexpr int64_t kTile = 32;   // the widest register tile, in elements (4 AVX2 fp32 vectors)
constexpr int64_t kTileRows = 8;  // the most output rows one NCHW tile covers (for narrow planes)

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The phase-split, zero-padded copy of one plane (see the file comment). It is larger than the padded
// plane so that the last tile may run past OW / OH: its extra lanes read zeros and are discarded.
struct PhasePlane {
  int64_t S, Hp, Wq;
  PhasePlane(const Conv2dGeom& g) : S(g.SW) {
    const int64_t Wp = g.W + g.PL + g.PR;
    Wq = std::max(ceil_div(Wp, S), (g.DW * (g.KW - 1)) / S + ceil_div(g.OW, kTile) * kTile);
    Hp = std::max(g.H + g.PT + g.PB, (ceil_div(g.OH, kTileRows) * kTileRows - 1) * g.SH + g.DH * (g.KH - 1) + 1);
  }
  int64_t size() const { return S * Hp * Wq; }
  // Offset of padded position (row, col) in the buffer.
  int64_t at(int64_t row, int64_t col) const { return ((col % S) * Hp + row) * Wq + col / S; }
  // Offset of every tap (kh, kw) relative to output (0, 0); output (oh, ow) adds oh*SH*Wq + ow, so the
  // hot loops do no division.
  std::vector<int64_t> tap_offsets(const Conv2dGeom& g) const {
    std::vector<int64_t> off(g.KH * g.KW);
    for (int64_t kh = 0; kh < g.KH; ++kh)
      for (int64_t kw = 0; kw < g.KW; ++kw) off[kh * g.KW + kw] = at(kh * g.DH, kw * g.DW);
    return off;
  }
};

// Copies one input plane into the buffer's interior; col_off[i] is the buffer offset of input column i
// in row 0 (precomputed: the phase split needs a division per column).
// Stride 1 and 2 copy whole vectors (stride 2: two vectors of input deinterleaved into one of each phase,
// since column 2m of a row lands at col_off[0] + m and column 2m + 1 at col_off[1] + m); element by element,
// the copy of a stride-2 plane took longer than its convolution.
template <typename scalar_t, typename acc_t>
void fill_phase_plane(const PhasePlane& pp, const Conv2dGeom& g, const int64_t* col_off,
                      const scalar_t* __restrict__ src, acc_t* __restrict__ buf) {
  using Vec = simd::Vec<acc_t>;
  constexpr int64_t N = Vec::N;
  for (int64_t r = 0; r < g.H; ++r) {
    const scalar_t* __restrict__ s = src + r * g.W;
    acc_t* __restrict__ d = buf + (r + g.PT) * pp.Wq;
    int64_t done = 0;  // input columns [0, done) copied by whole vectors
    if (pp.S == 1) {
      acc_t* __restrict__ d0 = d + col_off[0];
      for (; done + N <= g.W; done += N) Vec::store(d0 + done, Vec::load_from(s + done));
    } else if (pp.S == 2 && g.W >= 2) {
      acc_t* __restrict__ d0 = d + col_off[0];
      acc_t* __restrict__ d1 = d + col_off[1];
      for (; done + 2 * N <= g.W; done += 2 * N) {
        typename Vec::V even, odd;
        simd::deinterleave<acc_t>(Vec::load_from(s + done), Vec::load_from(s + done + N), even, odd);
        Vec::store(d0 + done / 2, even);
        Vec::store(d1 + done / 2, odd);
      }
    }
    for (int64_t i = done; i < g.W; ++i) d[col_off[i]] = static_cast<acc_t>(s[i]);
  }
}

inline std::vector<int64_t> phase_col_offsets(const PhasePlane& pp, const Conv2dGeom& g) {
  std::vector<int64_t> off(std::max<int64_t>(g.W, 1));
  for (int64_t i = 0; i < g.W; ++i) off[i] = pp.at(0, i + g.PL);
  return off;
}

// Hardware prefetchers stop at page boundaries and know nothing of the next plane; asking for the next
// plane a slice at a time while this one is computed overlaps its memory reads with arithmetic.
inline void prefetch_range(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 3);
}

inline void prefetch_slice(const char* p, int64_t bytes, int64_t slice, int64_t nslices) {
  if (!p) return;
  const int64_t lines = (bytes + 63) / 64, per = (lines + nslices - 1) / nslices;
  for (int64_t l = slice * per; l < std::min(lines, (slice + 1) * per); ++l) __builtin_prefetch(p + l * 64, 0, 3);
}

// R output rows x NV vectors of one NCHW plane, accumulated in R*NV registers over all taps; written to
// `out` (R rows of NV*N values, row pitch NV*N).
template <int R, int NV, int KKc, typename acc_t>
inline void plane_tile(const acc_t* base, int64_t row_stride, const int64_t* taps, const acc_t* wc, int64_t KK_,
                       acc_t bias, acc_t* out) {
  // KKc > 0: the tap count is known at compile time (3x3, 7x7) and the tap loop unrolls completely.
  const int64_t KK = KKc > 0 ? KKc : KK_;
  using Vec = simd::Vec<acc_t>;
  using V = typename Vec::V;
  V acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) acc[r][j] = Vec::splat(bias);
  for (int64_t k = 0; k < KK; ++k) {
    const V wv = Vec::splat(wc[k]);
    const acc_t* s = base + taps[k];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < NV; ++j) acc[r][j] += wv * Vec::load(s + r * row_stride + j * Vec::N);
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) Vec::store(out + (r * NV + j) * Vec::N, acc[r][j]);
}

template <int R, int NV, int KKc, typename scalar_t, typename acc_t>
void forward_plane(const PhasePlane& pp, const Conv2dGeom& g, const acc_t* buf, const int64_t* taps,
                   const acc_t* wc, acc_t bias, scalar_t* yplane, const char* next, int64_t next_bytes) {
  constexpr int64_t TW = NV * simd::Vec<acc_t>::N;
  const int64_t row_stride = g.SH * pp.Wq;
  const int64_t KK = g.KH * g.KW;
  const int64_t ntiles = ceil_div(g.OH, R);
  acc_t tmp[R * TW];
  for (int64_t oh0 = 0; oh0 < g.OH; oh0 += R) {
    prefetch_slice(next, next_bytes, oh0 / R, ntiles);
    const int64_t nr = std::min<int64_t>(R, g.OH - oh0);
    for (int64_t ow0 = 0; ow0 < g.OW; ow0 += TW) {
      plane_tile<R, NV, KKc>(buf + oh0 * row_stride + ow0, row_stride, taps, wc, KK, bias, tmp);
      const int64_t nc = std::min(TW, g.OW - ow0);
      for (int64_t r = 0; r < nr; ++r) {
        scalar_t* d = yplane + (oh0 + r) * g.OW + ow0;
        if (nc == TW) {
          for (int64_t i = 0; i < TW; ++i) d[i] = static_cast<scalar_t>(tmp[r * TW + i]);
        } else {
          for (int64_t i = 0; i < nc; ++i) d[i] = static_cast<scalar_t>(tmp[r * TW + i]);
        }
      }
    }
  }
}

// Valid kernel-row range for output row `o`: taps with 0 <= o*S - P + k*D < L.
inline void tap_range(int64_t o, int64_t S, int64_t P, int64_t D, int64_t K, int64_t L, int64_t& k0, int64_t& k1) {
  const int64_t base = o * S - P;
  k0 = base >= 0 ? 0 : ceil_div(-base, D);
  k1 = base + (K - 1) * D < L ? K : std::max<int64_t>(0, ceil_div(L - base, D));
  k1 = std::min(k1, K);
}

// grad_input as a convolution: of grad_output, padded by k - 1 - padding, with the flipped kernel. Sets gt to
// that convolution's geometry; true where it holds (stride 1, dilation 1, padding < kernel).
inline bool grad_input_as_conv(const Conv2dGeom& g, Conv2dGeom& gt) {
  gt = g;
  gt.H = g.OH, gt.W = g.OW, gt.OH = g.H, gt.OW = g.W;
  gt.PT = g.KH - 1 - g.PT, gt.PL = g.KW - 1 - g.PL, gt.PB = g.KH - 1 - g.PB, gt.PR = g.KW - 1 - g.PR;
  return g.SH == 1 && g.SW == 1 && g.DH == 1 && g.DW == 1 && gt.PT >= 0 && gt.PL >= 0;
}

// channels_last tiles with the kernel width KW and the stride S known at compile time (dilation 1 along the
// width): P neighbouring output pixels of one row x one 64-byte group of channels. For each kernel row the
// KW weight vectors are loaded once and stay in registers, and each of the J = (P-1)*S + KW input pixels
// the tile reads is loaded once and multiplied into every output it is a tap of. An FMA then costs a
// fraction of a load, where the generic tiles (pixels_tile, channel_tile) load an input vector per FMA and
// their tap offsets from memory, which keeps them load-bound at well under the FMA peak (7x7: 40% of it).
// With kEdge, input pixels outside [jlo, jhi) are left-right padding and skipped, so that the same tiles
// cover the row's edges.
namespace slide {

template <typename acc_t>
using W = simd::Vec<acc_t, simd::kWideBytes>;
// Vectors per 64-byte group: whole cache lines per pixel, so that streaming stores never write half a line.
constexpr int kNV = 64 / simd::kWideBytes;
template <typename acc_t>
constexpr int64_t kGroup = kNV * W<acc_t>::N;
// Pixels per tile, largest first: 8 keeps the loads per FMA well under one and, with KW weights and an
// input vector, within the registers of AVX-512 (AVX2 spills some weights to the stack, reloaded by the
// FMAs, which is what the generic tiles do anyway). Rows of 7 and 14 pixels (the 7x7 and 14x14 maps of
// ImageNet nets) go in tiles of 7 (kPix[3]), which cover them exactly, where 8 + 4 + 4 or 4 + 4 computed
// two or one pixels twice, and 4-pixel tiles (AVX-512: 4 accumulators) do not hide the FMA latency.
constexpr int kPix[4] = {8, 4, 1, 7};

template <int KW, int S, int P, bool kEdge, bool kStream, int kOS, typename scalar_t, typename acc_t>
__attribute__((always_inline)) inline void group_tile(const scalar_t* __restrict__ src, int64_t row_pitch, int64_t C,
                                                      const acc_t* __restrict__ w, int64_t nkh, int jlo, int jhi,
                                                      const acc_t* init, scalar_t* out) {
  using Vw = W<acc_t>;
  using V = typename Vw::V;
  constexpr int NV = kNV;
  constexpr int J = (P - 1) * S + KW;
  V acc[P][NV];
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p)
    for (int v = 0; v < NV; ++v) acc[p][v] = init ? Vw::load(init + v * Vw::N) : V{};
  // The input and weight pointers step by C from one pixel to the next through an empty asm, which keeps the
  // compiler from turning each of the J offsets j * C into a register of its own (more than x86 has: it
  // then parks them in vector registers and spends more instructions on addresses than on FMAs).
  auto step = [C](const auto* p) {
    p += C;
    asm("" : "+r"(p));
    return p;
  };
  const acc_t* wr = w;
  for (int64_t r = 0; r < nkh; ++r) {
    const scalar_t* s = src + r * row_pitch;
    V wv[KW][NV];
#pragma GCC unroll 16
    for (int k = 0; k < KW; ++k) {
      for (int v = 0; v < NV; ++v) wv[k][v] = Vw::load(wr + v * Vw::N);
      wr = step(wr);
    }
#pragma GCC unroll 64
    for (int j = 0; j < J; ++j) {
      if (!kEdge || (j >= jlo && j < jhi)) {
        V xv[NV];
        for (int v = 0; v < NV; ++v) xv[v] = Vw::load_from(s + v * Vw::N);
#pragma GCC unroll 16
        for (int p = 0; p < P; ++p) {
          const int k = j - p * S;  // a constant once unrolled: the branch folds away
          if (k >= 0 && k < KW)
            for (int v = 0; v < NV; ++v) acc[p][v] += wv[k][v] * xv[v];
        }
      }
      s = step(s);
    }
  }
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p)
    for (int v = 0; v < NV; ++v)
      simd::store_vec<kStream, acc_t, scalar_t, simd::kWideBytes>(out + p * kOS * C + v * Vw::N, acc[p][v]);
}

// One output row (all its pixels, all channels) from x_row (the input row of the first valid kernel row, at
// input column 0), w (the weights of that kernel row) and nkh kernel rows. One 64-byte group of channels at a
// time goes along the whole row, so that its slice of the nkh input rows (a few KiB) stays in L1 from one
// tile to the next, which re-reads the input pixels the two overlap on. Tiles
// of 8, then 4 pixels; a remainder of 1-3 pixels is the row's last 4 pixels again (recomputing a few outputs
// costs less than narrow tiles), or single pixels in a row narrower than 4; rows of 7 or 14 pixels go in
// tiles of 7. The channels past the last group go one by one. Output pixels are kOS pixels apart (kOS = 2:
// one column phase of a stride-2 grad_input, see Stride2GradInput).
template <int KW, int S, bool kStream, typename scalar_t, typename acc_t, int kOS = 1>
void row(const Conv2dGeom& g, const scalar_t* x_row, const acc_t* w, int64_t nkh, int64_t row_pitch,
         const acc_t* init, scalar_t* y_row) {
  const int64_t C = g.C;
  auto tile = [&](auto pix_i, auto edge, int64_t c, int64_t ow0, int jlo, int jhi) {
    constexpr int P = kPix[decltype(pix_i)::value];
    group_tile<KW, S, P, decltype(edge)::value, kStream, kOS>(x_row + (ow0 * S - g.PL) * C + c, row_pitch, C, w + c,
                                                              nkh, jlo, jhi, init ? init + c : nullptr,
                                                              y_row + ow0 * kOS * C + c);
  };
  using B0 = std::false_type;
  using B1 = std::true_type;
  using I0 = std::integral_constant<int, 0>;
  using I1 = std::integral_constant<int, 1>;
  using I2 = std::integral_constant<int, 2>;
  using I3 = std::integral_constant<int, 3>;
  const bool sevens = g.OW == kPix[3] || g.OW == 2 * kPix[3];
  int64_t c = 0;
  for (; c + kGroup<acc_t> <= C; c += kGroup<acc_t>) {
    for (int64_t ow = 0; ow < g.OW;) {
      const int64_t left = g.OW - ow;
      int64_t ow0 = ow;
      int i = 2;
      if (sevens) {
        i = 3;
      } else if (left >= kPix[0]) {
        i = 0;
      } else if (left >= kPix[1]) {
        i = 1;
      } else if (g.OW >= kPix[1]) {
        i = 1;
        ow0 = g.OW - kPix[1];
      }
      const int64_t iw0 = ow0 * S - g.PL;  // input column of the tile's first tap
      const int64_t J = (kPix[i] - 1) * S + KW;
      const int jlo = static_cast<int>(std::clamp<int64_t>(-iw0, 0, J));
      const int jhi = static_cast<int>(std::clamp<int64_t>(g.W - iw0, 0, J));
      const bool edge = jlo > 0 || jhi < J;
      switch (i * 2 + edge) {
        case 0: tile(I0{}, B0{}, c, ow0, jlo, jhi); break;
        case 1: tile(I0{}, B1{}, c, ow0, jlo, jhi); break;
        case 2: tile(I1{}, B0{}, c, ow0, jlo, jhi); break;
        case 3: tile(I1{}, B1{}, c, ow0, jlo, jhi); break;
        case 4: tile(I2{}, B0{}, c, ow0, jlo, jhi); break;
        case 5: tile(I2{}, B1{}, c, ow0, jlo, jhi); break;
        case 6: tile(I3{}, B0{}, c, ow0, jlo, jhi); break;
        default: tile(I3{}, B1{}, c, ow0, jlo, jhi); break;
      }
      ow = ow0 + kPix[i];
    }
  }
  for (; c < C; ++c)
    for (int64_t ow = 0; ow < g.OW; ++ow) {
      const int64_t iw0 = ow * S - g.PL;
      acc_t acc = init ? init[c] : acc_t(0);
      for (int64_t r = 0; r < nkh; ++r)
        for (int64_t k = std::max<int64_t>(0, -iw0); k < std::min<int64_t>(KW, g.W - iw0); ++k)
          acc += w[(r * KW + k) * C + c] * static_cast<acc_t>(x_row[r * row_pitch + (iw0 + k) * C + c]);
      y_row[ow * kOS * C + c] = static_cast<scalar_t>(acc);
    }
}

template <typename scalar_t, typename acc_t>
using RowFn = void (*)(const Conv2dGeom&, const scalar_t*, const acc_t*, int64_t, int64_t, const acc_t*, scalar_t*);

// The compiled (KW, S) pairs (the kernels of MobileNet, EfficientNet, ConvNeXt, FastViT, PVTv2); null for
// any other, and for fp64 (its gradcheck runs need no speed).
template <bool kStream, typename scalar_t, typename acc_t>
RowFn<scalar_t, acc_t> row_for(const Conv2dGeom& g) {
  if constexpr (!std::is_same_v<acc_t, float>) {
    return nullptr;
  } else {
    if (g.DW != 1) return nullptr;
    if (g.SW == 1) {
      if (g.KW == 3) return &row<3, 1, kStream, scalar_t, acc_t>;
      if (g.KW == 5) return &row<5, 1, kStream, scalar_t, acc_t>;
      if (g.KW == 7) return &row<7, 1, kStream, scalar_t, acc_t>;
    } else if (g.SW == 2) {
      if (g.KW == 3) return &row<3, 2, kStream, scalar_t, acc_t>;
      if (g.KW == 5) return &row<5, 2, kStream, scalar_t, acc_t>;
    }
    return nullptr;
  }
}

}  // namespace slide

// grad_input of a stride-2 convolution (dilation 1) as stride-1 row tiles, two per input row, one per column
// phase q: input columns iw = 2m + q take the taps kw = q + PL (mod 2), from grad_output column
// m + (q + PL - kw) / 2, so a phase is the stride-1 convolution of grad_output rows with the sub-kernel of
// those taps (in reverse order), written to every other input pixel (kOS = 2). Rows alike: input row ih takes
// the kernel rows kh = ih + PT (mod 2), from grad_output rows (ih + PT - kh) / 2. Each input pixel is then
// written once, with every FMA it needs, where the gather of the generic loops loaded a tap's offsets and
// weight for every FMA. For kernels 3 and 5 wide, at least 2 high (both phases have taps).
template <typename scalar_t>
struct Stride2GradInput {
  using RowFn2 = slide::RowFn<scalar_t, float>;
  Conv2dGeom gq[2];         // column phase q: grad_output row -> input pixels 2m + q
  RowFn2 fn[2] = {nullptr, nullptr};
  std::vector<float> w[2][2];  // [row parity][q]: kernel rows by increasing grad_output row, taps, C
  int64_t kh_top[2] = {0, 0}, nrows[2] = {0, 0};  // per row parity: largest kh, number of kernel rows
  const Conv2dGeom g;

  static bool applies(const Conv2dGeom& g) {
    return g.SH == 2 && g.SW == 2 && g.DH == 1 && g.DW == 1 && (g.KW == 3 || g.KW == 5) && g.KH >= 2;
  }
  // w_khkw_c: weights in (kh, kw, C) order, fp32. ok(): the geometry applies.
  Stride2GradInput(const Conv2dGeom& geom, const float* w_khkw_c) : g(geom) {
    if (!applies(g)) return;
    for (int p = 0; p < 2; ++p) {
      kh_top[p] = (g.KH - 1) % 2 == p ? g.KH - 1 : g.KH - 2;
      nrows[p] = kh_top[p] / 2 + 1;
    }
    for (int q = 0; q < 2; ++q) {
      const int64_t par = (q + g.PL) & 1, kw_top = (g.KW - 1) % 2 == par ? g.KW - 1 : g.KW - 2;
      const int64_t ntaps = kw_top / 2 + 1;
      gq[q] = g;
      gq[q].H = g.OH, gq[q].W = g.OW, gq[q].OW = (g.W - q + 1) / 2;
      gq[q].KW = ntaps, gq[q].SW = 1, gq[q].PL = (kw_top - q - g.PL) / 2;
      fn[q] = ntaps == 1 ? &slide::row<1, 1, false, scalar_t, float, 2>
            : ntaps == 2 ? &slide::row<2, 1, false, scalar_t, float, 2>
                         : &slide::row<3, 1, false, scalar_t, float, 2>;
      for (int p = 0; p < 2; ++p) {
        std::vector<float>& wq = w[p][q];
        wq.resize(nrows[p] * ntaps * g.C);
        for (int64_t r = 0; r < nrows[p]; ++r)
          for (int64_t t = 0; t < ntaps; ++t)
            std::copy_n(w_khkw_c + ((kh_top[p] - 2 * r) * g.KW + kw_top - 2 * t) * g.C, g.C,
                        wq.begin() + (r * ntaps + t) * g.C);
      }
    }
  }
  bool ok() const { return fn[0] != nullptr; }

  // Input row ih of grad_input (W pixels x C, pixel pitch C) from grad_output (OH rows of OW x C).
  void input_row(const scalar_t* go, int64_t ih, scalar_t* gi_row) const {
    const int p = static_cast<int>((ih + g.PT) & 1);
    const int64_t oh_first = (ih + g.PT - kh_top[p]) / 2;  // grad_output row of kernel row kh_top[p]
    const int64_t r0 = std::max<int64_t>(0, -oh_first), r1 = std::min<int64_t>(nrows[p], g.OH - oh_first);
    const int64_t nkh = std::max<int64_t>(0, r1 - r0);
    const int64_t pitch = g.OW * g.C;
    for (int q = 0; q < 2; ++q)
      if (gq[q].OW > 0)
        fn[q](gq[q], go + (oh_first + r0) * pitch, w[p][q].data() + r0 * gq[q].KW * g.C, nkh, pitch, nullptr,
              gi_row + q * g.C);
  }
};

// 16 planes of n pixels each (plane stride n) to n pixels of 16 fp32 channels, and back: 8 x 8 register
// transposes, the last n % 8 pixels one by one.
template <typename scalar_t>
void planes_to_pixels16(const scalar_t* src, int64_t n, float* dst) {
  using Vec = simd::Vec<float>;
  static_assert(Vec::N == 8, "8 x 8 transposes");
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int h = 0; h < 16; h += 8) {
      Vec::V r[8];
      for (int j = 0; j < 8; ++j) r[j] = Vec::load_from(src + (h + j) * n + i);
      attn::transpose8x8(r);
      for (int c = 0; c < 8; ++c) Vec::store(dst + (i + c) * 16 + h, r[c]);
    }
  for (; i < n; ++i)
    for (int j = 0; j < 16; ++j) dst[i * 16 + j] = static_cast<float>(src[j * n + i]);
}

template <typename scalar_t>
void pixels16_to_planes(const float* src, int64_t n, scalar_t* dst) {
  using Vec = simd::Vec<float>;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int h = 0; h < 16; h += 8) {
      Vec::V r[8];
      for (int c = 0; c < 8; ++c) r[c] = Vec::load(src + (i + c) * 16 + h);
      attn::transpose8x8(r);
      for (int j = 0; j < 8; ++j) Vec::store_to(dst + (h + j) * n + i, r[j]);
    }
  for (; i < n; ++i)
    for (int j = 0; j < 16; ++j) dst[j * n + i] = static_cast<scalar_t>(src[i * 16 + j]);
}

// Weights (C, kh * kw) -> (C / 16, kh * kw, 16): each block of 16 channels' taps in the row tiles' layout,
// in reverse tap order with `flip` (grad_input as a convolution).
inline std::vector<float> weights_c16(const float* wp, int64_t C, int64_t KK, bool flip) {
  std::vector<float> wb(C * KK);
  for (int64_t c = 0; c < C; ++c)
    for (int64_t k = 0; k < KK; ++k) wb[((c / 16) * KK + k) * 16 + c % 16] = wp[c * KK + (flip ? KK - 1 - k : k)];
  return wb;
}

// Small planes (MobileNet's 28x28 and below) spend much of their time on per-plane work (the phase copy,
// rows a few vectors long) rather than FMAs. Those go 16 planes at a time: transposed into pixels of 16
// channels (fp32), run through the channels_last row tiles with all 16 channels in one tile, and
// transposed back. Measured on the MobileNetV2 / FastViT layers (AVX-512): 1.0-2.8x faster than the plane
// loops up to 28 pixels wide, the more the narrower; at 56 the 3x3 case was 2x slower (its 200 KiB block no
// longer sits in L1 / L2 as the planes do), the 7x7 one, with 5x the arithmetic per byte, 1.8x faster.
// Returns false (nothing done) where that path does not apply: fp64, no row tiles for this kernel, C not a
// multiple of 16, planes wider than pixels16_max_ow.
inline int64_t pixels16_max_ow(const Conv2dGeom& g) { return g.KW >= 5 ? 64 : 32; }

template <typename scalar_t, typename acc_t, typename Post>
bool forward_nchw_pixels16(const scalar_t* xp, const acc_t* wp, const acc_t* bp, scalar_t* yp, const Conv2dGeom& g,
                           const Post& post) {
  if constexpr (!std::is_same_v<acc_t, float>) {
    return false;
  } else {
    constexpr int64_t B = 16;
    static_assert(slide::kGroup<float> == B, "one row tile per 16 channels");
    Conv2dGeom gb = g;
    gb.C = B;
    const slide::RowFn<float, float> row = slide::row_for<false, float, float>(gb);
    if (!row || g.C % B != 0 || g.OW > pixels16_max_ow(g)) return false;
    const int64_t KK = g.KH * g.KW, HW = g.H * g.W, OHW = g.OH * g.OW, nblk = g.C / B;
    const std::vector<float> wb = weights_c16(wp, g.C, KK, false);
    at::parallel_for(0, g.N * nblk, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> xb(HW * B), yb(OHW * B);
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t plane0 = blk * B, c0 = (blk % nblk) * B;  // planes n * C + c of one sample
        planes_to_pixels16(xp + plane0 * HW, HW, xb.data());
        for (int64_t oh = 0; oh < g.OH; ++oh) {
          int64_t kh0, kh1;
          tap_range(oh, g.SH, g.PT, g.DH, g.KH, g.H, kh0, kh1);
          row(gb, xb.data() + (oh * g.SH - g.PT + kh0 * g.DH) * g.W * B, wb.data() + ((c0 / B) * KK + kh0 * g.KW) * B,
              kh1 - kh0, g.DH * g.W * B, bp ? bp + c0 : nullptr, yb.data() + oh * g.OW * B);
        }
        pixels16_to_planes(yb.data(), OHW, yp + plane0 * OHW);
        for (int64_t p = plane0; p < plane0 + B; ++p) post(p);
      }
    });
    return true;
  }
}

#if defined(__AVX512F__)
// NCHW 3x3 planes 9-32 wide at stride 1 (MobileNet's 14x14 and 28x28 layers), fp32, straight from the planes:
// an output row is one or two 16-lane vectors, and each tap's input is a masked load of an input row, whose
// masked-off lanes are the left / right padding (no padded copy, and no read outside the row). A tile of R
// output rows loads each of its R + 2 input rows once per kernel column and feeds it to every output row of the
// tile it is a tap of. Measured per plane (one thread, AVX-512) against the 16-plane blocks, which spend
// about a third of their time transposing: 1.7-1.8x faster at 14 and 28 wide; 5x5 / 7x7 kernels, whose row
// tiles reuse each input pixel across the kernel width, and rows of 8 or fewer (half-empty vectors) were
// slower this way and stay with the blocks.
namespace rows {

constexpr int kR = 8;  // output rows per tile: 8 (or 16) accumulators, each input row loaded for 3 of them

template <int KH, int KW, int R, int NV>
__attribute__((always_inline)) inline void tile(const float* x, int64_t H, int64_t W, int64_t PT, int64_t PL,
                                                int64_t OW, const __mmask16* m, const __mmask16* om, const float* wc,
                                                float bias, int64_t oh0, float* y) {
  __m512 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_set1_ps(bias);
#pragma GCC unroll 32
  for (int j = 0; j < R + KH - 1; ++j) {
    const int64_t ih = oh0 - PT + j;
    if (ih < 0 || ih >= H) continue;  // top / bottom padding
    const float* xr = x + ih * W - PL;
#pragma GCC unroll 8
    for (int kw = 0; kw < KW; ++kw)
      for (int v = 0; v < NV; ++v) {
        const __m512 xv = _mm512_maskz_loadu_ps(m[kw * NV + v], xr + kw + 16 * v);
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {
          const int kh = j - r;  // a constant once unrolled
          if (kh >= 0 && kh < KH) acc[r][v] = _mm512_fmadd_ps(_mm512_set1_ps(wc[kh * KW + kw]), xv, acc[r][v]);
        }
      }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) _mm512_mask_storeu_ps(y + (oh0 + r) * OW + 16 * v, om[v], acc[r][v]);
}

// One plane. Tiles of kR rows, the last one moved up to end at the last row (recomputing a few rows costs
// less than a narrower tile); planes of fewer rows go one row at a time. The geometry goes to the tiles as
// values: read through the Conv2dGeom reference, the same loop ran 1.2x slower.
template <int KH, int KW, int NV>
void plane(const float* x, const Conv2dGeom& g, const float* wc, float bias, float* y) {
  __mmask16 m[KW * NV], om[NV];
  for (int kw = 0; kw < KW; ++kw)
    for (int v = 0; v < NV; ++v) {  // lanes l of vector v read input column 16 v + l + kw - PL, if inside the row
      const int64_t c0 = 16 * v + kw - g.PL;
      const int64_t lo = std::max<int64_t>(0, -c0), hi = std::min<int64_t>(16, g.W - c0);
      m[kw * NV + v] = hi > lo ? static_cast<__mmask16>(((1u << hi) - 1) & ~((1u << lo) - 1)) : 0;
    }
  for (int v = 0; v < NV; ++v)
    om[v] = static_cast<__mmask16>((1u << std::clamp<int64_t>(g.OW - 16 * v, 0, 16)) - 1);
  const int64_t H = g.H, W = g.W, PT = g.PT, PL = g.PL, OH = g.OH, OW = g.OW;
  if (OH < kR) {
    for (int64_t oh = 0; oh < OH; ++oh) tile<KH, KW, 1, NV>(x, H, W, PT, PL, OW, m, om, wc, bias, oh, y);
    return;
  }
  for (int64_t oh = 0; oh < OH; oh += kR)
    tile<KH, KW, kR, NV>(x, H, W, PT, PL, OW, m, om, wc, bias, std::min(oh, OH - kR), y);
}

}  // namespace rows
#endif

// The rows path above where it applies (fp32, 3x3, stride 1, dilation 1, rows 9-32 wide); false otherwise.
template <typename scalar_t, typename acc_t, typename Post>
bool forward_nchw_rows(const scalar_t* xp, const acc_t* wp, const acc_t* bp, scalar_t* yp, const Conv2dGeom& g,
                       const Post& post) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (g.KH != 3 || g.KW != 3 || g.SH != 1 || g.SW != 1 || g.DH != 1 || g.DW != 1 || g.OW <= 8 || g.OW > 32)
      return false;
    const auto run = g.OW <= 16 ? &rows::plane<3, 3, 1> : &rows::plane<3, 3, 2>;
    at::parallel_for(0, g.N * g.C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t c = p % g.C;
        run(xp + p * g.H * g.W, g, wp + c * 9, bp ? bp[c] : 0.f, yp + p * g.OH * g.OW);
        post(p);
      }
    });
    return true;
  }
#endif
  return false;
}

struct NoPost {
  void operator()(int64_t) const {}
};

template <typename scalar_t, typename Post = NoPost>
void forward_nhwc(const at::Tensor& x, const at::Tensor& w, const at::Tensor* b, at::Tensor& y, const Conv2dGeom& g,
                  const Post& post = Post());
template <typename scalar_t>
void backward_nhwc(const at::Tensor& go, const at::Tensor& x, const at::Tensor& w, at::Tensor& gi, at::Tensor& gw,
                   at::Tensor& gb, const Conv2dGeom& g);

// Each of the SW column phases of a phase plane is padded to whole tiles, and its rows to whole tile rows SH
// apart: at large strides or paddings (stride 1000 on a 5x6 plane: ~380 MB a thread) the plane is mostly
// zeros. Such convolutions go through the channels_last loops, which need no padded copy, on channels_last
// copies of the tensors.
inline bool phase_plane_oversized(const Conv2dGeom& g) {
  return PhasePlane(g).size() > 4 * g.H * g.W + (int64_t(1) << 16);
}

template <typename scalar_t, typename Post = NoPost>
void forward_nchw(const at::Tensor& x, const at::Tensor& w, const at::Tensor* b, at::Tensor& y, const Conv2dGeom& g,
                  const Post& post = Post()) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = simd::Vec<acc_t>;
  const at::Tensor wf = w.contiguous().to(c10::CppTypeToScalarType<acc_t>::value);
  const acc_t* wp = wf.data_ptr<acc_t>();
  at::Tensor bf;
  if (b) bf = b->to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  const acc_t* bp = b ? bf.data_ptr<acc_t>() : nullptr;
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  if (forward_nchw_rows(xp, wp, bp, yp, g, post) || forward_nchw_pixels16(xp, wp, bp, yp, g, post)) return;
  if (phase_plane_oversized(g)) {
    at::Tensor yc = at::empty_like(y, y.options(), at::MemoryFormat::ChannelsLast);
    forward_nhwc<scalar_t>(x.contiguous(at::MemoryFormat::ChannelsLast), w, b, yc, g);
    y.copy_(yc);
    for (int64_t plane = 0; plane < g.N * g.C; ++plane) post(plane);
    return;
  }

  // The plane loops: a phase-split copy of each plane and register tiles.
  const PhasePlane pp(g);
  const int64_t KK = g.KH * g.KW;
  const std::vector<int64_t> taps = pp.tap_offsets(g);
  const std::vector<int64_t> cols = phase_col_offsets(pp, g);
  // Register tile by plane width: 8 accumulators (6 for rows of 3 vectors), enough to keep two FMA pipes
  // of 4-cycle latency busy (4 were measurably short of it), spread over rows when a row is narrow.
  const int64_t nvec = ceil_div(g.OW, Vec::N);
  auto pick = [&](auto kk) {
    constexpr int KKc = decltype(kk)::value;
    return nvec == 1 ? &forward_plane<8, 1, KKc, scalar_t, acc_t>
         : nvec == 2 ? &forward_plane<4, 2, KKc, scalar_t, acc_t>
         : nvec == 3 ? &forward_plane<2, 3, KKc, scalar_t, acc_t>
                     : &forward_plane<2, kTile / Vec::N, KKc, scalar_t, acc_t>;
  };
  auto run = KK == 9                 ? pick(std::integral_constant<int, 9>{})
           : KK == 49 && g.SW == 1   ? pick(std::integral_constant<int, 49>{})
                                     : pick(std::integral_constant<int, 0>{});

  at::parallel_for(0, g.N * g.C, 1, [&](int64_t begin, int64_t end) {
    // Padding cells are never written, so zeroing once per chunk keeps them zero for every plane.
    std::vector<acc_t> buf(pp.size(), acc_t(0));
    const int64_t plane_bytes = g.H * g.W * static_cast<int64_t>(sizeof(scalar_t));
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t c = plane % g.C;
      fill_phase_plane(pp, g, cols.data(), xp + plane * g.H * g.W, buf.data());
      const char* next = plane + 1 < end ? reinterpret_cast<const char*>(xp + (plane + 1) * g.H * g.W) : nullptr;
      run(pp, g, buf.data(), taps.data(), wp + c * KK, bp ? bp[c] : acc_t(0), yp + plane * g.OH * g.OW, next,
          plane_bytes);
      post(plane);
    }
  });
}

// NV vectors of channels of one channels_last pixel: out = init + sum_t w[w_off[t]] * src[src_off[t]]
// (all pointers already offset to the tile's first channel).
template <int NV, bool kStream = false, typename scalar_t, typename acc_t>
inline void channel_tile(const scalar_t* src, const acc_t* w, const int64_t* src_off, const int64_t* w_off,
                         int64_t T, const acc_t* init, scalar_t* out) {
  using Vec = simd::Vec<acc_t>;
  using V = typename Vec::V;
  V acc[NV];
  for (int j = 0; j < NV; ++j) acc[j] = init ? Vec::load(init + j * Vec::N) : V{};
  for (int64_t t = 0; t < T; ++t) {
    const scalar_t* s = src + src_off[t];
    const acc_t* ww = w + w_off[t];
    for (int j = 0; j < NV; ++j) acc[j] += Vec::load(ww + j * Vec::N) * Vec::load_from(s + j * Vec::N);
  }
  for (int j = 0; j < NV; ++j) simd::store_vec<kStream, acc_t>(out + j * Vec::N, acc[j]);
}

// All C channels of one channels_last pixel: wide tiles, then one-vector tiles, then a scalar tail.
// kStream: vector stores bypass the cache (stream_store.h).
template <bool kStream = false, typename scalar_t, typename acc_t>
void pixel_channels(int64_t C, const scalar_t* src, const acc_t* w, const int64_t* src_off, const int64_t* w_off,
                    int64_t T, const acc_t* init, scalar_t* out) {
  constexpr int64_t N = simd::Vec<acc_t>::N;
  int64_t c = 0;
  for (; c + kTile <= C; c += kTile)
    channel_tile<kTile / N, kStream>(src + c, w + c, src_off, w_off, T, init ? init + c : nullptr, out + c);
  for (; c + N <= C; c += N)
    channel_tile<1, kStream>(src + c, w + c, src_off, w_off, T, init ? init + c : nullptr, out + c);
  for (; c < C; ++c) {
    acc_t acc = init ? init[c] : acc_t(0);
    for (int64_t t = 0; t < T; ++t) acc += w[w_off[t] + c] * static_cast<acc_t>(src[src_off[t] + c]);
    out[c] = static_cast<scalar_t>(acc);
  }
}

// P neighbouring pixels x NV vectors of channels sharing one tap list (pixels `src_px` / `out_px` elements
// apart): each weight vector is loaded once for P pixels.
template <int P, int NV, bool kStream, typename scalar_t, typename acc_t>
inline void pixels_tile(const scalar_t* src, int64_t src_px, const acc_t* w, const int64_t* src_off,
                        const int64_t* w_off, int64_t T, const acc_t* init, scalar_t* out, int64_t out_px) {
  using Vec = simd::Vec<acc_t>;
  using V = typename Vec::V;
  V acc[P][NV];
  for (int p = 0; p < P; ++p)
    for (int j = 0; j < NV; ++j) acc[p][j] = init ? Vec::load(init + j * Vec::N) : V{};
  for (int64_t t = 0; t < T; ++t) {
    V wv[NV];
    for (int j = 0; j < NV; ++j) wv[j] = Vec::load(w + w_off[t] + j * Vec::N);
    const scalar_t* s = src + src_off[t];
    for (int p = 0; p < P; ++p)
      for (int j = 0; j < NV; ++j) acc[p][j] += wv[j] * Vec::load_from(s + p * src_px + j * Vec::N);
  }
  for (int p = 0; p < P; ++p)
    for (int j = 0; j < NV; ++j) simd::store_vec<kStream, acc_t>(out + p * out_px + j * Vec::N, acc[p][j]);
}

// kPix pixels of one output row that share their tap list: all channels.
constexpr int kPix = 4;
constexpr int64_t kPrefetchPx = 3 * kPix;
template <bool kStream, typename scalar_t, typename acc_t>
void pixels_channels(int64_t C, const scalar_t* src, int64_t src_px, const acc_t* w, const int64_t* src_off,
                     const int64_t* w_off, int64_t T, const acc_t* init, scalar_t* out) {
  constexpr int64_t N = simd::Vec<acc_t>::N;
  int64_t c = 0;
  for (; c + 2 * N <= C; c += 2 * N)
    pixels_tile<kPix, 2, kStream>(src + c, src_px, w + c, src_off, w_off, T, init ? init + c : nullptr, out + c, C);
  for (; c + N <= C; c += N)
    pixels_tile<kPix, 1, kStream>(src + c, src_px, w + c, src_off, w_off, T, init ? init + c : nullptr, out + c, C);
  for (; c < C; ++c)
    for (int p = 0; p < kPix; ++p) {
      acc_t acc = init ? init[c] : acc_t(0);
      for (int64_t t = 0; t < T; ++t) acc += w[w_off[t] + c] * static_cast<acc_t>(src[src_off[t] + p * src_px + c]);
      out[p * C + c] = static_cast<scalar_t>(acc);
    }
}

// Weights (C, 1, kh, kw) -> (kh*kw, C) in acc_t, so channels_last loops read them contiguously.
template <typename acc_t>
at::Tensor weights_khkw_c(const at::Tensor& w) {
  return w.reshape({w.size(0), w.size(2) * w.size(3)}).t().contiguous().to(c10::CppTypeToScalarType<acc_t>::value);
}

template <typename scalar_t, typename Post>
void forward_nhwc(const at::Tensor& x, const at::Tensor& w, const at::Tensor* b, at::Tensor& y, const Conv2dGeom& g,
                  const Post& post) {
  using acc_t = at::opmath_type<scalar_t>;
  const at::Tensor wt = weights_khkw_c<acc_t>(w);
  const acc_t* wp = wt.data_ptr<acc_t>();
  at::Tensor bf;
  if (b) bf = b->to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  const acc_t* bp = b ? bf.data_ptr<acc_t>() : nullptr;
  const scalar_t* xp = x.data_ptr<scalar_t>();  // channels_last: (n, h, w, c) in memory
  scalar_t* yp = y.data_ptr<scalar_t>();
  const int64_t C = g.C, KK = g.KH * g.KW;
  // A large output goes around the cache (stream_store.h), unless an epilogue (post) re-reads it. Only
  // with whole 16-channel tiles per pixel: each tile is then one full 64-byte line of y.
  constexpr bool kMayStream = std::is_same_v<Post, NoPost> && std::is_same_v<scalar_t, float>;
  const bool stream = kMayStream && C % 16 == 0 && simd::should_stream(static_cast<int64_t>(y.nbytes()));

  const int64_t row_pitch = g.DH * g.W * C;

  auto rows = [&](auto stream_c) {
    constexpr bool kStream = decltype(stream_c)::value;
    const slide::RowFn<scalar_t, acc_t> slide_row = slide::row_for<kStream, scalar_t, acc_t>(g);
    at::parallel_for(0, g.N * g.OH, 1, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> x_off(KK), w_off(KK);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row / g.OH, oh = row % g.OH;
        int64_t kh0, kh1;
        tap_range(oh, g.SH, g.PT, g.DH, g.KH, g.H, kh0, kh1);
        // The kernel's bottom input row is the one not yet in cache (the rows above were read for the
        // previous output rows); the pixel-by-channel access order hides its stream from the hardware
        // prefetcher, so fetch it kPrefetchPx pixels ahead.
        const int64_t ih_new = oh * g.SH - g.PT + (g.KH - 1) * g.DH;
        const scalar_t* new_row = (ih_new >= 0 && ih_new < g.H) ? xp + (n * g.H + ih_new) * g.W * C : nullptr;
        int64_t prefetched = 0;  // input columns of new_row already requested
        auto prefetch = [&](int64_t ow) {
          if (!new_row) return;
          const int64_t want = std::min(g.W, (ow + kPrefetchPx) * g.SW + (g.KW - 1) * g.DW - g.PL + 1);
          if (want > prefetched) {
            prefetch_range(new_row + prefetched * C, (want - prefetched) * C * static_cast<int64_t>(sizeof(scalar_t)));
            prefetched = want;
          }
        };
        if (slide_row) {
          if (new_row) prefetch_range(new_row, g.W * C * static_cast<int64_t>(sizeof(scalar_t)));
          slide_row(g, xp + (n * g.H + oh * g.SH - g.PT + kh0 * g.DH) * g.W * C, wp + kh0 * g.KW * C, kh1 - kh0,
                    row_pitch, bp, yp + (n * g.OH + oh) * g.OW * C);
          post(row);
          continue;
        }
        for (int64_t ow = 0; ow < g.OW;) {
          prefetch(ow);
          int64_t kw0, kw1;
          tap_range(ow, g.SW, g.PL, g.DW, g.KW, g.W, kw0, kw1);
          // Taps inside the input, as offsets from this pixel's window origin.
          int64_t T = 0;
          for (int64_t kh = kh0; kh < kh1; ++kh)
            for (int64_t kw = kw0; kw < kw1; ++kw, ++T) {
              x_off[T] = (kh * g.DH * g.W + kw * g.DW) * C;
              w_off[T] = (kh * g.KW + kw) * C;
            }
          const scalar_t* origin = xp + ((n * g.H + oh * g.SH - g.PT) * g.W + ow * g.SW - g.PL) * C;
          scalar_t* out = yp + ((n * g.OH + oh) * g.OW + ow) * C;
          // Away from the left/right border, kPix neighbours have every tap in the input.
          const bool interior = kw0 == 0 && kw1 == g.KW && ow + kPix <= g.OW &&
                                (ow + kPix - 1) * g.SW - g.PL + (g.KW - 1) * g.DW < g.W;
          if (interior) {
            pixels_channels<kStream>(C, origin, g.SW * C, wp, x_off.data(), w_off.data(), T, bp, out);
            ow += kPix;
          } else {
            pixel_channels<kStream>(C, origin, wp, x_off.data(), w_off.data(), T, bp, out);
            ow += 1;
          }
        }
        post(row);
      }
      if (kStream) simd::stream_fence();
    });
  };
  if (stream) rows(std::true_type{});
  else rows(std::false_type{});
}

// ---------------------------------------------------------------------------------------------------
// Backward.

// channels_last grad_weight of one kernel row, for the kernel widths and strides the row tiles have: for
// every tap kw of the row, sum over the row's outputs ow of grad_output[ow] * x[ow * S - PL + kw], one
// 64-byte group of channels, added to ws[kw * C]. The KW input pixels of an output's window stay in
// registers and slide by S pixels from one output to the next, so an output costs one grad_output load and
// S input loads for KW FMAs (summing each tap separately took two loads an FMA). Input pixels outside the
// row are zeros. Two sets of accumulators (even / odd outputs) give the FMAs 2 * KW independent chains.
template <int KW, int S, typename scalar_t>
__attribute__((always_inline)) inline void grad_weight_group(const scalar_t* go_row, const scalar_t* x_row, int64_t C,
                                                             int64_t OW, int64_t W, int64_t PL, float* ws) {
  using Vw = slide::W<float>;
  using V = typename Vw::V;
  constexpr int NV = slide::kNV;
  V acc[2][KW][NV], xw[KW][NV];
  for (int e = 0; e < 2; ++e)
    for (int k = 0; k < KW; ++k)
      for (int v = 0; v < NV; ++v) acc[e][k][v] = V{};
  auto load_px = [&](int64_t iw, V* out) {
    for (int v = 0; v < NV; ++v) out[v] = iw >= 0 && iw < W ? Vw::load_from(x_row + iw * C + v * Vw::N) : V{};
  };
  auto step = [&](int64_t ow, auto e) {
    if (ow > 0) {  // slide the window by S pixels
      for (int k = 0; k + S < KW; ++k)
        for (int v = 0; v < NV; ++v) xw[k][v] = xw[k + S][v];
      for (int k = std::max(0, KW - S); k < KW; ++k) load_px(ow * S - PL + k, xw[k]);
    }
    for (int v = 0; v < NV; ++v) {
      const V gv = Vw::load_from(go_row + ow * C + v * Vw::N);
      for (int k = 0; k < KW; ++k) acc[decltype(e)::value][k][v] += gv * xw[k][v];
    }
  };
  for (int k = 0; k < KW; ++k) load_px(k - PL, xw[k]);
  int64_t ow = 0;
  for (; ow + 2 <= OW; ow += 2) {
    step(ow, std::integral_constant<int, 0>{});
    step(ow + 1, std::integral_constant<int, 1>{});
  }
  if (ow < OW) step(ow, std::integral_constant<int, 0>{});
  for (int k = 0; k < KW; ++k)
    for (int v = 0; v < NV; ++v) {
      float* d = ws + k * C + v * Vw::N;
      Vw::store(d, Vw::load(d) + (acc[0][k][v] + acc[1][k][v]));
    }
}

template <typename scalar_t>
using GradWeightFn = void (*)(const scalar_t*, const scalar_t*, int64_t, int64_t, int64_t, int64_t, float*);

template <int KW, int S, typename scalar_t>
void grad_weight_groups(const scalar_t* go_row, const scalar_t* x_row, int64_t C, int64_t OW, int64_t W, int64_t PL,
                        float* ws) {
  for (int64_t c = 0; c + slide::kGroup<float> <= C; c += slide::kGroup<float>)
    grad_weight_group<KW, S>(go_row + c, x_row + c, C, OW, W, PL, ws + c);
}

// grad_weight_groups for the row tiles' (KW, S) pairs with dilation 1 along the width, fp32 sums; null
// otherwise.
template <typename scalar_t, typename acc_t>
GradWeightFn<scalar_t> grad_weight_for(const Conv2dGeom& g) {
  if constexpr (!std::is_same_v<acc_t, float>) {
    return nullptr;
  } else {
    if (g.DW != 1) return nullptr;
    if (g.SW == 1) {
      if (g.KW == 3) return &grad_weight_groups<3, 1, scalar_t>;
      if (g.KW == 5) return &grad_weight_groups<5, 1, scalar_t>;
      if (g.KW == 7) return &grad_weight_groups<7, 1, scalar_t>;
    } else if (g.SW == 2) {
      if (g.KW == 3) return &grad_weight_groups<3, 2, scalar_t>;
      if (g.KW == 5) return &grad_weight_groups<5, 2, scalar_t>;
    }
    return nullptr;
  }
}

// NCHW backward of small planes (the planes forward_nchw_pixels16 takes, at stride 1, or at stride 2 up to 32
// wide), 16 channels at a time: per sample, x and grad_output are transposed to pixels of 16 channels;
// grad_input is the row tiles' convolution of grad_output, padded by k - 1 - padding, with the flipped kernel
// (stride 1) or Stride2GradInput's two phases per row (stride 2), transposed back; the weight gradients are
// grad_weight_groups' sums (one 16-channel group), the bias gradient a sum over the pixels in vectors.
// Parallel over the blocks, so that each thread owns its channels' weight and bias gradients. Returns false
// (nothing done) where it does not apply.
template <typename scalar_t>
bool backward_nchw_pixels16(const at::Tensor& go, const at::Tensor& x, const at::Tensor& w, at::Tensor& gi,
                            at::Tensor& gw, at::Tensor& gb, const Conv2dGeom& g) {
  using acc_t = at::opmath_type<scalar_t>;
  if constexpr (!std::is_same_v<acc_t, float>) {
    return false;
  } else {
    constexpr int64_t B = 16;
    Conv2dGeom gt;  // grad_output -> grad_input, for one block, at stride 1
    const bool conv = grad_input_as_conv(g, gt);
    gt.C = B;
    Conv2dGeom gblk = g;  // the convolution of one block
    gblk.C = B;
    const bool fits = g.C % B == 0 && g.OW <= pixels16_max_ow(g);
    const slide::RowFn<float, float> row = fits && conv ? slide::row_for<false, float, float>(gt) : nullptr;
    // stride 2 for planes up to 32 wide: a 56-wide block took longer than the plane loops in the forward
    const bool s2 = fits && !conv && g.W <= 32 && Stride2GradInput<float>::applies(gblk);
    const GradWeightFn<float> gw_row = grad_weight_for<float, float>(g);
    if (!(row || s2) || !gw_row) return false;
    using Vec = simd::Vec<float>;
    const int64_t KK = g.KH * g.KW, HW = g.H * g.W, OHW = g.OH * g.OW, nblk = g.C / B;
    const at::Tensor wf = w.contiguous().to(at::kFloat);
    const float* wp = wf.data_ptr<float>();
    const std::vector<float> wflip = weights_c16(wp, g.C, KK, conv);  // flipped for the stride-1 convolution
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gop = go.data_ptr<scalar_t>();
    scalar_t* gip = gi.data_ptr<scalar_t>();
    scalar_t* gwp = gw.data_ptr<scalar_t>();
    scalar_t* gbp = gb.data_ptr<scalar_t>();
    at::parallel_for(0, nblk, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> xb(HW * B), gob(OHW * B), gib(HW * B), gwacc(KK * B), gbacc(B);
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t c0 = blk * B;
        const Stride2GradInput<float> s2gi(s2 ? gblk : Conv2dGeom{}, wflip.data() + blk * KK * B);
        std::fill(gwacc.begin(), gwacc.end(), 0.f);
        std::fill(gbacc.begin(), gbacc.end(), 0.f);
        for (int64_t n = 0; n < g.N; ++n) {
          const int64_t plane0 = n * g.C + c0;
          planes_to_pixels16(xp + plane0 * HW, HW, xb.data());
          planes_to_pixels16(gop + plane0 * OHW, OHW, gob.data());
          for (int64_t ih = 0; ih < g.H; ++ih) {
            if (s2) {
              s2gi.input_row(gob.data(), ih, gib.data() + ih * g.W * B);
              continue;
            }
            int64_t kh0, kh1;
            tap_range(ih, 1, gt.PT, 1, g.KH, g.OH, kh0, kh1);
            row(gt, gob.data() + (ih - gt.PT + kh0) * g.OW * B, wflip.data() + (blk * KK + kh0 * g.KW) * B,
                kh1 - kh0, g.OW * B, nullptr, gib.data() + ih * g.W * B);
          }
          pixels16_to_planes(gib.data(), HW, gip + plane0 * HW);
          for (int64_t oh = 0; oh < g.OH; ++oh) {
            int64_t kh0, kh1;
            tap_range(oh, g.SH, g.PT, 1, g.KH, g.H, kh0, kh1);
            const float* gr = gob.data() + oh * g.OW * B;
            for (int64_t ow = 0; ow < g.OW; ++ow)
              for (int64_t v = 0; v < B; v += Vec::N)
                Vec::store(gbacc.data() + v, Vec::load(gbacc.data() + v) + Vec::load(gr + ow * B + v));
            for (int64_t kh = kh0; kh < kh1; ++kh)
              gw_row(gr, xb.data() + (oh * g.SH - g.PT + kh) * g.W * B, B, g.OW, g.W, g.PL,
                     gwacc.data() + kh * g.KW * B);
          }
        }
        for (int64_t c = 0; c < B; ++c) {
          for (int64_t k = 0; k < KK; ++k) gwp[(c0 + c) * KK + k] = static_cast<scalar_t>(gwacc[k * B + c]);
          gbp[c0 + c] = static_cast<scalar_t>(gbacc[c]);
        }
      }
    });
    return true;
  }
}

// NCHW: parallel over channels (each thread owns its channels' weight/bias gradients, no reduction
// across threads). For every plane the input's phase buffer gives grad_weight as contiguous dot
// products, and grad_input is scattered into a second phase buffer (contiguous again), then cropped.
template <typename scalar_t>
void backward_nchw(const at::Tensor& go, const at::Tensor& x, const at::Tensor& w, at::Tensor& gi, at::Tensor& gw,
                   at::Tensor& gb, const Conv2dGeom& g) {
  if (backward_nchw_pixels16<scalar_t>(go, x, w, gi, gw, gb, g)) return;
  if (phase_plane_oversized(g)) {
    const auto cl = at::MemoryFormat::ChannelsLast;
    at::Tensor gic = at::empty_like(gi, gi.options(), cl);
    backward_nhwc<scalar_t>(go.contiguous(cl), x.contiguous(cl), w, gic, gw, gb, g);
    gi.copy_(gic);
    return;
  }
  using acc_t = at::opmath_type<scalar_t>;
  const at::Tensor wf = w.contiguous().to(c10::CppTypeToScalarType<acc_t>::value);
  const acc_t* wp = wf.data_ptr<acc_t>();
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* gop = go.data_ptr<scalar_t>();
  scalar_t* gip = gi.data_ptr<scalar_t>();
  scalar_t* gwp = gw.data_ptr<scalar_t>();
  scalar_t* gbp = gb.data_ptr<scalar_t>();
  const PhasePlane pp(g);
  const int64_t KK = g.KH * g.KW;
  const int64_t OWr = ceil_div(g.OW, simd::Vec<acc_t>::N) * simd::Vec<acc_t>::N;
  const std::vector<int64_t> taps = pp.tap_offsets(g);
  const std::vector<int64_t> cols = phase_col_offsets(pp, g);
  const int64_t row_stride = g.SH * pp.Wq;
  using Vec = simd::Vec<acc_t>;
  using V = typename Vec::V;

  at::parallel_for(0, g.C, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xbuf(pp.size(), acc_t(0)), gbuf(pp.size()), gorow(OWr, acc_t(0)), gwacc(KK);
    for (int64_t c = begin; c < end; ++c) {
      std::fill(gwacc.begin(), gwacc.end(), acc_t(0));
      acc_t gbacc = 0;
      const acc_t* wc = wp + c * KK;
      for (int64_t n = 0; n < g.N; ++n) {
        const int64_t plane = n * g.C + c;
        fill_phase_plane(pp, g, cols.data(), xp + plane * g.H * g.W, xbuf.data());
        std::fill(gbuf.begin(), gbuf.end(), acc_t(0));
        const scalar_t* goplane = gop + plane * g.OH * g.OW;
        for (int64_t oh = 0; oh < g.OH; ++oh) {
          // Lanes past OW stay zero, so whole-tile loops below add nothing there.
          for (int64_t i = 0; i < g.OW; ++i) gorow[i] = static_cast<acc_t>(goplane[oh * g.OW + i]);
          const acc_t* gr = gorow.data();
          for (int64_t i = 0; i < g.OW; ++i) gbacc += gr[i];
          for (int64_t k = 0; k < KK; ++k) {
            const int64_t off = oh * row_stride + taps[k];
            const acc_t* xs = xbuf.data() + off;
            acc_t* gs = gbuf.data() + off;
            const V wv = Vec::splat(wc[k]);
            V dot{};
            for (int64_t i = 0; i < OWr; i += Vec::N) {
              const V gv = Vec::load(gr + i);
              dot += gv * Vec::load(xs + i);
              Vec::store(gs + i, Vec::load(gs + i) + wv * gv);
            }
            gwacc[k] += Vec::sum(dot);
          }
        }
        scalar_t* giplane = gip + plane * g.H * g.W;
        for (int64_t ih = 0; ih < g.H; ++ih)
          for (int64_t iw = 0; iw < g.W; ++iw)
            giplane[ih * g.W + iw] = static_cast<scalar_t>(gbuf[(ih + g.PT) * pp.Wq + cols[iw]]);
      }
      for (int64_t k = 0; k < KK; ++k) gwp[c * KK + k] = static_cast<scalar_t>(gwacc[k]);
      gbp[c] = static_cast<scalar_t>(gbacc);
    }
  });
}

// For each input index i along one axis: the taps k and output indices o with o*S - P + k*D == i.
struct TapTable {
  std::vector<int64_t> begin, k, out;  // entries of index i are [begin[i], begin[i+1])
  TapTable(int64_t L, int64_t OL, int64_t K, int64_t S, int64_t P, int64_t D) : begin(L + 1, 0) {
    for (int64_t i = 0; i < L; ++i) {
      begin[i] = static_cast<int64_t>(k.size());
      for (int64_t kk = 0; kk < K; ++kk) {
        const int64_t t = i + P - kk * D;
        if (t < 0 || t % S != 0 || t / S >= OL) continue;
        k.push_back(kk);
        out.push_back(t / S);
      }
    }
    begin[L] = static_cast<int64_t>(k.size());
  }
};

// channels_last grad_input through Stride2GradInput, a row of input pixels per task, for rows up to 32 pixels;
// false (nothing done) otherwise.
template <typename scalar_t, typename acc_t>
bool stride2_grad_input_nhwc(const scalar_t* gop, const acc_t* wp, const Conv2dGeom& g, scalar_t* gip) {
  if constexpr (!std::is_same_v<acc_t, float>) {
    return false;
  } else {
    // Rows up to 32 wide: there the phases took 1.1-1.2x less time than the gather (backward of MobileNetV2's
    // 28 x 28 stride-2 layer); at 112 wide, where each phase's strided stores cross a row of 40 KiB, 1.07-1.17x more.
    if (g.W > 32) return false;
    const Stride2GradInput<scalar_t> s2(g, wp);
    if (!s2.ok()) return false;
    at::parallel_for(0, g.N * g.H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        s2.input_row(gop + (r / g.H) * g.OH * g.OW * g.C, r % g.H, gip + r * g.W * g.C);
    });
    return true;
  }
}

template <typename scalar_t>
void backward_nhwc(const at::Tensor& go, const at::Tensor& x, const at::Tensor& w, at::Tensor& gi, at::Tensor& gw,
                   at::Tensor& gb, const Conv2dGeom& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const at::Tensor wt = weights_khkw_c<acc_t>(w);
  const acc_t* wp = wt.data_ptr<acc_t>();
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* gop = go.data_ptr<scalar_t>();
  scalar_t* gip = gi.data_ptr<scalar_t>();
  const int64_t C = g.C, KK = g.KH * g.KW;

  // grad_input where it is a convolution (grad_input_as_conv) through the forward's row tiles (the whole
  // forward + backward of the stride-1 MobileNetV2 / FastViT layers took 1.1-1.6x less time than with the
  // gather below).
  using Vec = simd::Vec<acc_t>;
  using V = typename Vec::V;
  Conv2dGeom gt;
  const slide::RowFn<scalar_t, acc_t> gi_row =
      grad_input_as_conv(g, gt) ? slide::row_for<false, scalar_t, acc_t>(gt) : nullptr;
  std::vector<acc_t> wflip;
  if (gi_row) {
    wflip.resize(KK * C);
    for (int64_t k = 0; k < KK; ++k) std::copy(wp + (KK - 1 - k) * C, wp + (KK - k) * C, wflip.begin() + k * C);
  }
  auto input_row_conv = [&](int64_t r) {  // grad_input row r = n * H + ih, through gi_row
    const int64_t n = r / g.H, ih = r % g.H;
    int64_t kh0, kh1;
    tap_range(ih, 1, gt.PT, 1, g.KH, g.OH, kh0, kh1);
    gi_row(gt, gop + (n * g.OH + ih - gt.PT + kh0) * g.OW * C, wflip.data() + kh0 * g.KW * C, kh1 - kh0, g.OW * C,
           nullptr, gip + r * g.W * C);
  };
  if (gi_row) {
    // with the weight gradient below, in one pass
  } else if (stride2_grad_input_nhwc<scalar_t, acc_t>(gop, wp, g, gip)) {
  } else {
    // Otherwise a gather over the outputs each input pixel fed (no write conflicts). Which taps reach an
    // input row / column depends only on that row / column: tabulate them once.
    const TapTable rows_t(g.H, g.OH, g.KH, g.SH, g.PT, g.DH), cols_t(g.W, g.OW, g.KW, g.SW, g.PL, g.DW);
    at::parallel_for(0, g.N * g.H, 1, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> go_off(KK), w_off(KK);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t n = r / g.H, ih = r % g.H;
        for (int64_t iw = 0; iw < g.W; ++iw) {
          int64_t T = 0;
          for (int64_t a = rows_t.begin[ih]; a < rows_t.begin[ih + 1]; ++a)
            for (int64_t bb = cols_t.begin[iw]; bb < cols_t.begin[iw + 1]; ++bb, ++T) {
              go_off[T] = ((n * g.OH + rows_t.out[a]) * g.OW + cols_t.out[bb]) * C;
              w_off[T] = (rows_t.k[a] * g.KW + cols_t.k[bb]) * C;
            }
          pixel_channels(C, gop, wp, go_off.data(), w_off.data(), T, static_cast<const acc_t*>(nullptr),
                         gip + ((n * g.H + ih) * g.W + iw) * C);
        }
      }
    });
  }

  // grad_weight, grad_bias: partial sums over fixed chunks of output rows (one buffer per chunk, so
  // the result does not depend on which thread ran what), then one reduction.
  const GradWeightFn<scalar_t> gw_row = grad_weight_for<scalar_t, acc_t>(g);
  auto weight_row = [&](int64_t row, acc_t* pw) {  // grad_output row n * OH + oh into the partial sums pw
    acc_t* pb = pw + KK * C;
    const int64_t n = row / g.OH, oh = row % g.OH;
    int64_t kh0, kh1;
    tap_range(oh, g.SH, g.PT, g.DH, g.KH, g.H, kh0, kh1);
    const scalar_t* go_row = gop + row * g.OW * C;
    for (int64_t ow = 0; ow < g.OW; ++ow) {
      int64_t c = 0;
      for (; c + Vec::N <= C; c += Vec::N)
        Vec::store(pb + c, Vec::load(pb + c) + Vec::load_from(go_row + ow * C + c));
      for (; c < C; ++c) pb[c] += static_cast<acc_t>(go_row[ow * C + c]);
    }
    // The row tiles' kernels go through grad_weight_groups for whole 64-byte groups of channels (channels_last
    // forward + backward of the MobileNetV2 / FastViT / ConvNeXt layers: geomean 1.57 -> 1.91x eager, up to
    // 1.7x less time). The other channels and kernels: each (tap, channel vector) sums its products over the
    // row's outputs in registers (four chains, for the FMA latency) and adds them to the partial sums once,
    // two loads an FMA.
    for (int64_t kh = kh0; kh < kh1; ++kh) {
      const scalar_t* x_row = xp + (n * g.H + oh * g.SH - g.PT + kh * g.DH) * g.W * C;
      int64_t c_done = 0;  // channels whose sums gw_row took
      if constexpr (std::is_same_v<acc_t, float>) {
        if (gw_row) {
          gw_row(go_row, x_row, C, g.OW, g.W, g.PL, pw + kh * g.KW * C);
          c_done = C / slide::kGroup<float> * slide::kGroup<float>;
        }
      }
      for (int64_t kw = 0; kw < g.KW; ++kw) {
        // outputs ow whose tap kw is inside the input: 0 <= ow * SW - PL + kw * DW < W
        const int64_t left = g.PL - kw * g.DW, right = g.W - 1 + g.PL - kw * g.DW;
        const int64_t hi = right < 0 ? 0 : std::min(g.OW, right / g.SW + 1);
        const int64_t lo = std::min(hi, left <= 0 ? int64_t(0) : ceil_div(left, g.SW));
        const scalar_t* xk = x_row + (kw * g.DW - g.PL) * C;  // the tap's input for output ow: + ow * SW * C
        const int64_t xs = g.SW * C;
        acc_t* ws = pw + (kh * g.KW + kw) * C;
        int64_t c = c_done;
        for (; c + Vec::N <= C; c += Vec::N) {
          V a0{}, a1{}, a2{}, a3{};
          int64_t ow = lo;
          for (; ow + 4 <= hi; ow += 4) {
            a0 += Vec::load_from(go_row + ow * C + c) * Vec::load_from(xk + ow * xs + c);
            a1 += Vec::load_from(go_row + (ow + 1) * C + c) * Vec::load_from(xk + (ow + 1) * xs + c);
            a2 += Vec::load_from(go_row + (ow + 2) * C + c) * Vec::load_from(xk + (ow + 2) * xs + c);
            a3 += Vec::load_from(go_row + (ow + 3) * C + c) * Vec::load_from(xk + (ow + 3) * xs + c);
          }
          for (; ow < hi; ++ow) a0 += Vec::load_from(go_row + ow * C + c) * Vec::load_from(xk + ow * xs + c);
          Vec::store(ws + c, Vec::load(ws + c) + ((a0 + a1) + (a2 + a3)));
        }
        for (; c < C; ++c) {
          acc_t a = 0;
          for (int64_t ow = lo; ow < hi; ++ow)
            a += static_cast<acc_t>(go_row[ow * C + c]) * static_cast<acc_t>(xk[ow * xs + c]);
          ws[c] += a;
        }
      }
    }
  };
  // At stride 1 each thread's chunk of rows does both: grad_input row r and grad_output row r's weight sums
  // read the same few grad_output rows, which are then read from memory once, not twice.
  const int64_t R = gi_row ? std::max(g.H, g.OH) : g.OH;  // rows per sample in the chunked loop
  const int64_t rows = g.N * R;
  const int64_t nchunks = std::min<int64_t>(rows, at::get_num_threads());
  std::vector<acc_t> partial(static_cast<size_t>(nchunks) * (KK + 1) * C, acc_t(0));
  at::parallel_for(0, nchunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      acc_t* pw = partial.data() + static_cast<size_t>(chunk) * (KK + 1) * C;
      for (int64_t t = chunk * rows / nchunks; t < (chunk + 1) * rows / nchunks; ++t) {
        const int64_t n = t / R, r = t % R;
        if (gi_row && r < g.H) input_row_conv(n * g.H + r);
        if (r < g.OH) weight_row(n * g.OH + r, pw);
      }
    }
  });
  std::vector<acc_t> total((KK + 1) * C, acc_t(0));
  for (int64_t t = 0; t < nchunks; ++t) {
    const acc_t* p = partial.data() + static_cast<size_t>(t) * (KK + 1) * C;
    for (int64_t i = 0; i < (KK + 1) * C; ++i) total[i] += p[i];
  }
  scalar_t* gwp = gw.data_ptr<scalar_t>();  // (C, 1, kh, kw) contiguous
  for (int64_t c = 0; c < C; ++c)
    for (int64_t k = 0; k < KK; ++k) gwp[c * KK + k] = static_cast<scalar_t>(total[k * C + c]);
  scalar_t* gbp = gb.data_ptr<scalar_t>();
  for (int64_t c = 0; c < C; ++c) gbp[c] = static_cast<scalar_t>(total[KK * C + c]);
}

}  // namespace dw

// ---------------------------------------------------------------------------------------------------
// Per-channel elementwise loops of bn_act / conv_bias_act: a 4-D (N, C, H, W) tensor is walked as NCHW
// planes (one channel, HW contiguous elements) or channels_last rows (one pixel, C contiguous channels).
namespace chan {

using bnact::Act;

struct Geom {
  int64_t N, C, HW;
  bool cl;
  int64_t planes() const { return N * C; }  // NCHW units
  int64_t rows() const { return N * HW; }   // channels_last units
};

inline Geom geom_of(const at::Tensor& t, bool cl) { return {t.size(0), t.size(1), t.size(2) * t.size(3), cl}; }

// Calls f(std::integral_constant<Act, a>) so that the activation is a compile-time constant in the loops
// (relu / relu6 / hardswish then vectorise).
template <typename F>
void dispatch_act(Act a, F&& f) {
  switch (a) {
    case Act::kRelu: f(std::integral_constant<Act, Act::kRelu>{}); break;
    case Act::kRelu6: f(std::integral_constant<Act, Act::kRelu6>{}); break;
    case Act::kSilu: f(std::integral_constant<Act, Act::kSilu>{}); break;
    case Act::kGelu: f(std::integral_constant<Act, Act::kGelu>{}); break;
    case Act::kHardswish: f(std::integral_constant<Act, Act::kHardswish>{}); break;
    default: f(std::integral_constant<Act, Act::kNone>{}); break;
  }
}

template <Act A, typename T>
inline T act_f(T z) {
  return bnact::act_forward(A, z);
}
// relu / relu6 masks as arithmetic rather than branches: on random signs a branch mispredicts half the
// time and the loops stay scalar.
template <Act A, typename T>
inline T act_g(T z) {
  // (z == z: false only for NaN, where z > 0 is false too; written so, GCC keeps the select branch-free
  // and vectorised, as it does for relu6, instead of turning `go * (z > 0)` back into a branch.)
  if constexpr (A == Act::kRelu) return static_cast<T>((z > T(0)) & (z == z));
  else if constexpr (A == Act::kRelu6) return static_cast<T>((z > T(0)) & (z < T(6)));
  else return bnact::act_grad(A, z);
}
template <Act A, typename T>
inline T act_g_out(T y) {
  if constexpr (A == Act::kRelu || A == Act::kRelu6) return act_g<A>(y);
  else return bnact::act_grad_from_output(A, y);
}

// Rows per parallel task for channels_last loops: enough elements per task to amortise the dispatch.
inline int64_t row_grain(int64_t C) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)); }

// SiLU and GELU need exp / erf, which the auto-vectoriser leaves as scalar library calls (several times
// slower than the pass's memory traffic): in fp32 they run on whole vectors through simd::VExp / VGelu.
template <Act A, typename acc_t>
constexpr bool kVecAct = std::is_same_v<acc_t, float> && (A == Act::kSilu || A == Act::kGelu);

// act on a whole fp32 vector, with act_forward's conventions (relu(NaN) = NaN included).
template <Act A, int kB = 32>
inline typename simd::Vec<float, kB>::V act_v(typename simd::Vec<float, kB>::V z) {
  using S = simd::Vec<float, kB>;
  using V = typename S::V;
  const V zero{}, six = S::splat(6.f);
  if constexpr (A == Act::kGelu) return simd::VGelu<float, kB>::run(z);
  else if constexpr (A == Act::kSilu) return z / (S::splat(1.f) + simd::VExp<float, kB>::run(-z));
  else if constexpr (A == Act::kRelu) return z < 0.f ? zero : z;
  else if constexpr (A == Act::kRelu6) return z < 0.f ? zero : (z > 6.f ? six : z);
  else if constexpr (A == Act::kHardswish) {
    const V r = z + 3.f;
    return z * (r > 0.f ? (r < 6.f ? r : six) : zero) * S::splat(1.f / 6.f);
  } else return z;
}

// y[i] = act(x[i] * a[i] + b[i] + r[i]) for i < n on whole fp32 vectors, the rest lane by lane; a and b are
// loaded (Step = 1, per-channel rows) or broadcast (Step = 0, one channel's plane). y may alias x unless
// kStream (y written around the cache, see stream_store.h).
template <Act A, int Step, bool kStream = false, typename in_t, typename scalar_t>
inline void vec_affine_act(const in_t* x, const scalar_t* r, scalar_t* y, int64_t n, const float* a,
                           const float* b) {
  if constexpr (simd::kWideBytes > 32 && kVecAct<A, float>) {
    int64_t i0 = 0;
    // GELU and SiLU are bound by their arithmetic, which takes less time per element on the widest vectors:
    // GELU 1.4 against 2.3 cycles per element on 32-byte ones (AVX-512 EPYC, a timing loop on L1 data).
    // A streamed row streams its 64-byte-aligned vectors, each a whole cache line (write_row's rules).
    using W = simd::Vec<float, simd::kWideBytes>;
    const bool stream = kStream && n >= simd::kMinStreamRow;
    for (; i0 + W::N <= n; i0 += W::N) {
      typename W::V z = Step ? W::load_from(x + i0) * W::load(a + i0) + W::load(b + i0)
                             : W::load_from(x + i0) * W::splat(*a) + W::splat(*b);
      if (r) z += W::load_from(r + i0);
      z = act_v<A, simd::kWideBytes>(z);
      if (stream) simd::store_vec<true, float, scalar_t, simd::kWideBytes>(y + i0, z);
      else W::store_to(y + i0, z);
    }
    x += i0, y += i0, n -= i0;
    if (r) r += i0;
    if (Step) a += i0, b += i0;
  }
  using S = simd::Vec<float>;
  simd::write_row<kStream, float>(
      y, n,
      [&](int64_t i) {
        S::V z = Step ? S::load_from(x + i) * S::load(a + i) + S::load(b + i)
                      : S::load_from(x + i) * S::splat(*a) + S::splat(*b);
        if (r) z += S::load_from(r + i);
        return act_v<A>(z);
      },
      [&](int64_t i) {
        const float z = static_cast<float>(x[i]) * a[Step * i] + b[Step * i] + (r ? static_cast<float>(r[i]) : 0.f);
        return bnact::act_forward(A, z);
      });
}

// y = act(x * a + b + r) over n elements of one channel (NCHW plane); r may be null, y may alias x.
// x may be of a wider type than y (a half / bf16 result computed in fp32 is rounded once, here).
template <Act A, bool kStream, typename in_t, typename scalar_t, typename acc_t>
inline void plane_affine_act(const in_t* x, const scalar_t* r, scalar_t* y, int64_t n, acc_t a, acc_t b) {
  if constexpr (kVecAct<A, acc_t> || kStream) {
    vec_affine_act<A, 0, kStream>(x, r, y, n, &a, &b);
  } else if (r) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i)
      y[i] = static_cast<scalar_t>(act_f<A>(static_cast<acc_t>(x[i]) * a + b + static_cast<acc_t>(r[i])));
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] = static_cast<scalar_t>(act_f<A>(static_cast<acc_t>(x[i]) * a + b));
  }
}

// The same over one channels_last pixel (C channels, per-channel a and b).
template <Act A, bool kStream, typename in_t, typename scalar_t, typename acc_t>
inline void row_affine_act(const in_t* x, const scalar_t* r, scalar_t* y, int64_t C, const acc_t* a,
                           const acc_t* b) {
  if constexpr (kVecAct<A, acc_t> || kStream) {
    vec_affine_act<A, 1, kStream>(x, r, y, C, a, b);
  } else if (r) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c)
      y[c] = static_cast<scalar_t>(act_f<A>(static_cast<acc_t>(x[c]) * a[c] + b[c] + static_cast<acc_t>(r[c])));
  } else {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) y[c] = static_cast<scalar_t>(act_f<A>(static_cast<acc_t>(x[c]) * a[c] + b[c]));
  }
}

// One unit (NCHW plane index or channels_last row index) of y = act(x * a[c] + b[c] + r).
template <Act A, bool kStream = false, typename in_t, typename scalar_t, typename acc_t>
inline void unit_affine_act(const Geom& g, int64_t u, const in_t* x, const scalar_t* r, scalar_t* y,
                            const acc_t* a, const acc_t* b) {
  if (g.cl) {
    const int64_t o = u * g.C;
    row_affine_act<A, kStream>(x + o, r ? r + o : nullptr, y + o, g.C, a, b);
  } else {
    const int64_t c = u % g.C, o = u * g.HW;
    plane_affine_act<A, kStream>(x + o, r ? r + o : nullptr, y + o, g.HW, a[c], b[c]);
  }
}

// The whole tensor, in parallel; y may alias x (an in-place epilogue). A separate fp32 output too large to
// stay in cache is written around it (stream_store.h); in place there is no read to save.
template <typename in_t, typename scalar_t, typename acc_t>
void affine_act(const Geom& g, Act act, const in_t* x, const scalar_t* r, scalar_t* y, const acc_t* a,
                const acc_t* b) {
  constexpr bool kCanStream = std::is_same_v<in_t, float> && std::is_same_v<scalar_t, float>;
  const bool stream = kCanStream && static_cast<const void*>(x) != static_cast<const void*>(y) &&
                      simd::should_stream(g.N * g.C * g.HW * static_cast<int64_t>(sizeof(scalar_t)));
  dispatch_act(act, [&](auto ac) {
    constexpr Act A = decltype(ac)::value;
    const int64_t units = g.cl ? g.rows() : g.planes();
    const int64_t grain = g.cl ? row_grain(g.C) : std::max<int64_t>(1, 16384 / std::max<int64_t>(g.HW, 1));
    at::parallel_for(0, units, grain, [&](int64_t u0, int64_t u1) {
      if constexpr (kCanStream) {
        if (stream) {
          for (int64_t u = u0; u < u1; ++u) unit_affine_act<A, true>(g, u, x, r, y, a, b);
          simd::stream_fence();
          return;
        }
      }
      for (int64_t u = u0; u < u1; ++u) unit_affine_act<A>(g, u, x, r, y, a, b);
    });
  });
}

// Deterministic per-channel reduction of K sums. NCHW: plane_fn(plane, acc_t out[K]) reduces one plane;
// channels_last: rows_fn(row0, row1, acc_t* acc) adds rows [row0, row1) into acc[k * C + c]. The
// partition into planes / blocks of rows is fixed (independent of the thread count) and the partials
// are combined in a fixed order in double, so results are reproducible.
template <typename acc_t, int K, typename PlaneFn, typename RowsFn>
void reduce_channels(const Geom& g, const PlaneFn& plane_fn, const RowsFn& rows_fn, double* out /* K*C */) {
  std::fill(out, out + K * g.C, 0.0);
  if (!g.cl) {
    std::vector<acc_t> part(static_cast<size_t>(g.planes()) * K);
    at::parallel_for(0, g.planes(), std::max<int64_t>(1, 4096 / std::max<int64_t>(g.HW, 1)),
                     [&](int64_t p0, int64_t p1) {
                       for (int64_t p = p0; p < p1; ++p) plane_fn(p, part.data() + p * K);
                     });
    for (int64_t n = 0; n < g.N; ++n)
      for (int64_t c = 0; c < g.C; ++c)
        for (int k = 0; k < K; ++k) out[k * g.C + c] += static_cast<double>(part[(n * g.C + c) * K + k]);
    return;
  }
  const int64_t M = g.rows();
  // Blocks of at least 16 rows, at most 128 of them: short fp32 sums per block, little combining.
  const int64_t rb = std::max<int64_t>(16, (M + 127) / 128);
  const int64_t nb = (M + rb - 1) / rb;
  std::vector<acc_t> part(static_cast<size_t>(nb) * K * g.C, acc_t(0));
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk)
      rows_fn(blk * rb, std::min(M, (blk + 1) * rb), part.data() + static_cast<size_t>(blk) * K * g.C);
  });
  for (int64_t blk = 0; blk < nb; ++blk) {
    const acc_t* p = part.data() + static_cast<size_t>(blk) * K * g.C;
    for (int64_t i = 0; i < K * g.C; ++i) out[i] += static_cast<double>(p[i]);
  }
}

}  // namespace chan
}  // namespace fastops
