// Depthwise conv2d on the CPU: forward and backward, NCHW and channels_last, float / double / half / bf16.
//
// NCHW: one (n, c) plane at a time is copied, zero-padded and split into `stride` column phases in a
// thread-local fp32 buffer: column j of phase p holds padded column j*stride + p, so every tap of every
// stride reads a *contiguous* run of the buffer and the inner loop is a plain SIMD FMA over a tile of
// outputs kept in registers. Converting half/bf16 to fp32 happens in that same copy.
// channels_last: channels are contiguous, so the SIMD loop runs over a tile of channels for one output
// pixel, with the weights pre-transposed to (kh, kw, C).
// Accumulation is in at::opmath_type<T> (fp32 for half/bf16/float, fp64 for double).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common.h"

namespace fastops {
namespace {

constexpr int64_t kTile = 32;  // outputs (NCHW) or channels (NHWC) per register tile

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The phase-split, zero-padded copy of one plane (see the file comment).
struct PhasePlane {
  int64_t S, Hp, Wq;
  PhasePlane(const Conv2dGeom& g) : S(g.SW), Hp(g.H + g.PT + g.PB) {
    const int64_t Wp = g.W + g.PL + g.PR;
    // Room for the last output tile to run past OW (its extra lanes are computed and discarded).
    Wq = std::max(ceil_div(Wp, S), (g.DW * (g.KW - 1)) / S + ceil_div(g.OW, kTile) * kTile);
  }
  int64_t size() const { return S * Hp * Wq; }
  // Offset of padded position (row, col) in the buffer.
  int64_t at(int64_t row, int64_t col) const { return ((col % S) * Hp + row) * Wq + col / S; }
};

template <typename scalar_t, typename acc_t>
void fill_phase_plane(const PhasePlane& pp, const Conv2dGeom& g, const scalar_t* src, acc_t* buf) {
  for (int64_t r = 0; r < g.H; ++r) {
    const scalar_t* s = src + r * g.W;
    if (pp.S == 1) {
      acc_t* d = buf + pp.at(r + g.PT, g.PL);
#pragma omp simd
      for (int64_t i = 0; i < g.W; ++i) d[i] = static_cast<acc_t>(s[i]);
    } else {
      for (int64_t i = 0; i < g.W; ++i) buf[pp.at(r + g.PT, i + g.PL)] = static_cast<acc_t>(s[i]);
    }
  }
}

template <typename scalar_t>
void forward_nchw(const at::Tensor& x, const at::Tensor& w, const at::Tensor* b, at::Tensor& y, const Conv2dGeom& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const at::Tensor wf = w.contiguous().to(c10::CppTypeToScalarType<acc_t>::value);
  const acc_t* wp = wf.data_ptr<acc_t>();
  at::Tensor bf;
  if (b) bf = b->to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  const acc_t* bp = b ? bf.data_ptr<acc_t>() : nullptr;
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  const PhasePlane pp(g);
  const int64_t KK = g.KH * g.KW;

  at::parallel_for(0, g.N * g.C, 1, [&](int64_t begin, int64_t end) {
    // Padding cells are never written, so zeroing once per chunk keeps them zero for every plane.
    std::vector<acc_t> buf(pp.size(), acc_t(0));
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t c = plane % g.C;
      fill_phase_plane(pp, g, xp + plane * g.H * g.W, buf.data());
      const acc_t* wc = wp + c * KK;
      const acc_t bias = bp ? bp[c] : acc_t(0);
      scalar_t* yplane = yp + plane * g.OH * g.OW;
      for (int64_t oh = 0; oh < g.OH; ++oh) {
        for (int64_t ow0 = 0; ow0 < g.OW; ow0 += kTile) {
          acc_t acc[kTile];
#pragma omp simd
          for (int64_t i = 0; i < kTile; ++i) acc[i] = bias;
          for (int64_t kh = 0; kh < g.KH; ++kh) {
            const int64_t row = oh * g.SH + kh * g.DH;
            for (int64_t kw = 0; kw < g.KW; ++kw) {
              const acc_t wv = wc[kh * g.KW + kw];
              const acc_t* s = buf.data() + pp.at(row, ow0 * g.SW + kw * g.DW);
#pragma omp simd
              for (int64_t i = 0; i < kTile; ++i) acc[i] += wv * s[i];
            }
          }
          const int64_t n_out = std::min(kTile, g.OW - ow0);
          scalar_t* d = yplane + oh * g.OW + ow0;
          for (int64_t i = 0; i < n_out; ++i) d[i] = static_cast<scalar_t>(acc[i]);
        }
      }
    }
  });
}

// acc[0:n] += w[0:n] * x[0:n]; n == kTile is the hot, fully unrolled case.
template <typename scalar_t, typename acc_t, int64_t n>
inline void fma_tile(acc_t* acc, const acc_t* w, const scalar_t* x) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) acc[i] += w[i] * static_cast<acc_t>(x[i]);
}
template <typename scalar_t, typename acc_t>
inline void fma_tile_n(acc_t* acc, const acc_t* w, const scalar_t* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) acc[i] += w[i] * static_cast<acc_t>(x[i]);
}

// Weights (C, 1, kh, kw) -> (kh*kw, C) in acc_t, so channels_last loops read them contiguously.
template <typename acc_t>
at::Tensor weights_khkw_c(const at::Tensor& w) {
  return w.reshape({w.size(0), w.size(2) * w.size(3)}).t().contiguous().to(c10::CppTypeToScalarType<acc_t>::value);
}

// Valid kernel-row range for output row `o`: taps with 0 <= o*S - P + k*D < L.
inline void tap_range(int64_t o, int64_t S, int64_t P, int64_t D, int64_t K, int64_t L, int64_t& k0, int64_t& k1) {
  const int64_t base = o * S - P;
  k0 = base >= 0 ? 0 : ceil_div(-base, D);
  k1 = base + (K - 1) * D < L ? K : std::max<int64_t>(0, ceil_div(L - base, D));
  k1 = std::min(k1, K);
}

template <typename scalar_t>
void forward_nhwc(const at::Tensor& x, const at::Tensor& w, const at::Tensor* b, at::Tensor& y, const Conv2dGeom& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const at::Tensor wt = weights_khkw_c<acc_t>(w);
  const acc_t* wp = wt.data_ptr<acc_t>();
  at::Tensor bf = b ? b->to(c10::CppTypeToScalarType<acc_t>::value).contiguous()
                    : at::zeros({g.C}, wt.options());
  const acc_t* bp = bf.data_ptr<acc_t>();
  const scalar_t* xp = x.data_ptr<scalar_t>();  // channels_last: (n, h, w, c) in memory
  scalar_t* yp = y.data_ptr<scalar_t>();
  const int64_t C = g.C;

  at::parallel_for(0, g.N * g.OH, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / g.OH, oh = row % g.OH;
      int64_t kh0, kh1;
      tap_range(oh, g.SH, g.PT, g.DH, g.KH, g.H, kh0, kh1);
      for (int64_t ow = 0; ow < g.OW; ++ow) {
        int64_t kw0, kw1;
        tap_range(ow, g.SW, g.PL, g.DW, g.KW, g.W, kw0, kw1);
        scalar_t* out = yp + ((n * g.OH + oh) * g.OW + ow) * C;
        for (int64_t c0 = 0; c0 < C; c0 += kTile) {
          const int64_t nc = std::min(kTile, C - c0);
          acc_t acc[kTile];
          for (int64_t i = 0; i < nc; ++i) acc[i] = bp[c0 + i];
          for (int64_t kh = kh0; kh < kh1; ++kh) {
            const int64_t ih = oh * g.SH - g.PT + kh * g.DH;
            for (int64_t kw = kw0; kw < kw1; ++kw) {
              const int64_t iw = ow * g.SW - g.PL + kw * g.DW;
              const scalar_t* xs = xp + ((n * g.H + ih) * g.W + iw) * C + c0;
              const acc_t* ws = wp + (kh * g.KW + kw) * C + c0;
              if (nc == kTile) fma_tile<scalar_t, acc_t, kTile>(acc, ws, xs);
              else fma_tile_n(acc, ws, xs, nc);
            }
          }
          for (int64_t i = 0; i < nc; ++i) out[c0 + i] = static_cast<scalar_t>(acc[i]);
        }
      }
    }
  });
}

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

// ---------------------------------------------------------------------------------------------------
// Backward.

// NCHW: parallel over channels (each thread owns its channels' weight/bias gradients, no reduction
// across threads). For every plane the input's phase buffer gives grad_weight as contiguous dot
// products, and grad_input is scattered into a second phase buffer (contiguous again), then cropped.
template <typename scalar_t>
void backward_nchw(const at::Tensor& go, const at::Tensor& x, const at::Tensor& w, at::Tensor& gi, at::Tensor& gw,
                   at::Tensor& gb, const Conv2dGeom& g) {
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
  const int64_t OWr = ceil_div(g.OW, kTile) * kTile;

  at::parallel_for(0, g.C, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xbuf(pp.size(), acc_t(0)), gbuf(pp.size()), gorow(OWr, acc_t(0)), gwacc(KK);
    for (int64_t c = begin; c < end; ++c) {
      std::fill(gwacc.begin(), gwacc.end(), acc_t(0));
      acc_t gbacc = 0;
      const acc_t* wc = wp + c * KK;
      for (int64_t n = 0; n < g.N; ++n) {
        const int64_t plane = n * g.C + c;
        fill_phase_plane(pp, g, xp + plane * g.H * g.W, xbuf.data());
        std::fill(gbuf.begin(), gbuf.end(), acc_t(0));
        const scalar_t* goplane = gop + plane * g.OH * g.OW;
        for (int64_t oh = 0; oh < g.OH; ++oh) {
          // Lanes past OW stay zero, so whole-tile loops below add nothing there.
          for (int64_t i = 0; i < g.OW; ++i) gorow[i] = static_cast<acc_t>(goplane[oh * g.OW + i]);
          const acc_t* gr = gorow.data();
          acc_t rowsum = 0;
#pragma omp simd reduction(+ : rowsum)
          for (int64_t i = 0; i < OWr; ++i) rowsum += gr[i];
          gbacc += rowsum;
          for (int64_t kh = 0; kh < g.KH; ++kh) {
            const int64_t row = oh * g.SH + kh * g.DH;
            for (int64_t kw = 0; kw < g.KW; ++kw) {
              const int64_t off = pp.at(row, kw * g.DW);
              const acc_t* xs = xbuf.data() + off;
              acc_t* gs = gbuf.data() + off;
              const acc_t wv = wc[kh * g.KW + kw];
              acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
              for (int64_t i = 0; i < OWr; ++i) {
                dot += gr[i] * xs[i];
                gs[i] += wv * gr[i];
              }
              gwacc[kh * g.KW + kw] += dot;
            }
          }
        }
        scalar_t* giplane = gip + plane * g.H * g.W;
        for (int64_t ih = 0; ih < g.H; ++ih)
          for (int64_t iw = 0; iw < g.W; ++iw)
            giplane[ih * g.W + iw] = static_cast<scalar_t>(gbuf[pp.at(ih + g.PT, iw + g.PL)]);
      }
      for (int64_t k = 0; k < KK; ++k) gwp[c * KK + k] = static_cast<scalar_t>(gwacc[k]);
      gbp[c] = static_cast<scalar_t>(gbacc);
    }
  });
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

  // grad_input: a gather over the outputs each input pixel fed (no write conflicts).
  at::parallel_for(0, g.N * g.H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / g.H, ih = r % g.H;
      for (int64_t iw = 0; iw < g.W; ++iw) {
        scalar_t* out = gip + ((n * g.H + ih) * g.W + iw) * C;
        for (int64_t c0 = 0; c0 < C; c0 += kTile) {
          const int64_t nc = std::min(kTile, C - c0);
          acc_t acc[kTile] = {};
          for (int64_t kh = 0; kh < g.KH; ++kh) {
            const int64_t t = ih + g.PT - kh * g.DH;
            if (t < 0 || t % g.SH) continue;
            const int64_t oh = t / g.SH;
            if (oh >= g.OH) continue;
            for (int64_t kw = 0; kw < g.KW; ++kw) {
              const int64_t u = iw + g.PL - kw * g.DW;
              if (u < 0 || u % g.SW) continue;
              const int64_t ow = u / g.SW;
              if (ow >= g.OW) continue;
              const scalar_t* gs = gop + ((n * g.OH + oh) * g.OW + ow) * C + c0;
              const acc_t* ws = wp + (kh * g.KW + kw) * C + c0;
              if (nc == kTile) fma_tile<scalar_t, acc_t, kTile>(acc, ws, gs);
              else fma_tile_n(acc, ws, gs, nc);
            }
          }
          for (int64_t i = 0; i < nc; ++i) out[c0 + i] = static_cast<scalar_t>(acc[i]);
        }
      }
    }
  });

  // grad_weight, grad_bias: partial sums over fixed chunks of output rows (one buffer per chunk, so
  // the result does not depend on which thread ran what), then one reduction.
  const int64_t rows = g.N * g.OH;
  const int64_t nchunks = std::min<int64_t>(rows, at::get_num_threads());
  std::vector<acc_t> partial(static_cast<size_t>(nchunks) * (KK + 1) * C, acc_t(0));
  at::parallel_for(0, nchunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
   for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
    acc_t* pw = partial.data() + static_cast<size_t>(chunk) * (KK + 1) * C;
    acc_t* pb = pw + KK * C;
    std::vector<acc_t> gorow(C);
    for (int64_t row = chunk * rows / nchunks; row < (chunk + 1) * rows / nchunks; ++row) {
      const int64_t n = row / g.OH, oh = row % g.OH;
      int64_t kh0, kh1;
      tap_range(oh, g.SH, g.PT, g.DH, g.KH, g.H, kh0, kh1);
      for (int64_t ow = 0; ow < g.OW; ++ow) {
        int64_t kw0, kw1;
        tap_range(ow, g.SW, g.PL, g.DW, g.KW, g.W, kw0, kw1);
        const scalar_t* gs = gop + ((n * g.OH + oh) * g.OW + ow) * C;
        acc_t* gr = gorow.data();
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          gr[c] = static_cast<acc_t>(gs[c]);
          pb[c] += gr[c];
        }
        for (int64_t kh = kh0; kh < kh1; ++kh) {
          const int64_t ih = oh * g.SH - g.PT + kh * g.DH;
          for (int64_t kw = kw0; kw < kw1; ++kw) {
            const int64_t iw = ow * g.SW - g.PL + kw * g.DW;
            const scalar_t* xs = xp + ((n * g.H + ih) * g.W + iw) * C;
            acc_t* ws = pw + (kh * g.KW + kw) * C;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) ws[c] += gr[c] * static_cast<acc_t>(xs[c]);
          }
        }
      }
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> depthwise_conv2d_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_depthwise_args(input, weight, c10::nullopt);
  TORCH_CHECK(input.device().is_cpu(), "fastops.depthwise_conv2d_backward (cpu): input must be a CPU tensor");
  const Conv2dGeom g = make_conv2d_geom(input, weight, stride, padding, dilation);
  TORCH_CHECK(grad_output.dim() == 4 && grad_output.size(0) == g.N && grad_output.size(1) == g.C &&
                  grad_output.size(2) == g.OH && grad_output.size(3) == g.OW,
              "fastops.depthwise_conv2d_backward: grad_output must have shape (", g.N, ", ", g.C, ", ", g.OH, ", ",
              g.OW, "), got ", grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(),
              "fastops.depthwise_conv2d_backward: grad_output dtype must match input");
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
