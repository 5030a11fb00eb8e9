// Squeeze-and-excitation on the CPU: forward and backward, NCHW and channels_last, float / double / half / bf16.
//
// out = out_act(x * gate(W2 act(W1 mean_hw(x) + b1) + b2) + residual)
//
// Each sample is pooled (one read of its slice of x), its MLP evaluated, then scaled (second read, while the
// slice is still in cache: with at least as many samples as threads each thread owns whole samples). The
// residual add and the final activation happen in the scale pass. Accumulation in at::opmath_type<T>.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "cpu/channel_attn.h"

namespace fastops {
namespace {

using attn::Act;
using attn::contig;
using attn::dense;

struct SeGeom {
  int64_t N, C, HW;
  bool cl;  // channels_last: element (n, c, p) at n*C*HW + p*C + c; else n*C*HW + c*HW + p
};

// Sum over pixels of channels [c0, c1) of one sample, into acc[c - c0].
template <typename scalar_t>
void pool_sum(const SeGeom& g, const scalar_t* xs, int64_t c0, int64_t c1, attn::red_t* acc) {
  using acc_t = attn::red_t;
  using V = simd::Vec<acc_t>;
  if (!g.cl) {
    for (int64_t c = c0; c < c1; ++c) {
      const scalar_t* p = xs + c * g.HW;
      typename V::V s = V::splat(0);
      int64_t i = 0;
      for (; i + V::N <= g.HW; i += V::N) s += V::load_from(p + i);
      acc_t t = V::sum(s);
      for (; i < g.HW; ++i) t += static_cast<acc_t>(p[i]);
      acc[c - c0] = t;
    }
  } else {
    for (int64_t c = c0; c < c1; ++c) acc[c - c0] = 0;
    for (int64_t q = 0; q < g.HW; ++q) {
      const scalar_t* p = xs + q * g.C;
      for (int64_t c = c0; c < c1; ++c) acc[c - c0] += static_cast<acc_t>(p[c]);
    }
  }
}

// out = oact(x * gate[c] + r) over channels [c0, c1) of one sample; r may be null.
template <typename scalar_t, typename acc_t, bool kRelu>
void scale(const SeGeom& g, const scalar_t* xs, const scalar_t* rs, const acc_t* gate, int64_t c0, int64_t c1,
           scalar_t* ys) {
  auto f = [](acc_t x, acc_t gc, acc_t r) {
    acc_t y = x * gc + r;
    return kRelu ? (y > 0 ? y : acc_t(0)) : y;
  };
  if (!g.cl) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t o = c * g.HW;
      const acc_t gc = gate[c];
      if (rs)
        for (int64_t i = 0; i < g.HW; ++i)
          ys[o + i] = static_cast<scalar_t>(f(static_cast<acc_t>(xs[o + i]), gc, static_cast<acc_t>(rs[o + i])));
      else
        for (int64_t i = 0; i < g.HW; ++i) ys[o + i] = static_cast<scalar_t>(f(static_cast<acc_t>(xs[o + i]), gc, 0));
    }
  } else {
    for (int64_t q = 0; q < g.HW; ++q) {
      const int64_t o = q * g.C;
      if (rs)
        for (int64_t c = c0; c < c1; ++c)
          ys[o + c] = static_cast<scalar_t>(f(static_cast<acc_t>(xs[o + c]), gate[c], static_cast<acc_t>(rs[o + c])));
      else
        for (int64_t c = c0; c < c1; ++c)
          ys[o + c] = static_cast<scalar_t>(f(static_cast<acc_t>(xs[o + c]), gate[c], 0));
    }
  }
}

std::tuple<at::Tensor, at::Tensor> squeeze_excite_cpu(const at::Tensor& x_in, const at::Tensor& fc1_w,
                                                      const c10::optional<at::Tensor>& fc1_b, const at::Tensor& fc2_w,
                                                      const c10::optional<at::Tensor>& fc2_b,
                                                      const c10::optional<at::Tensor>& residual, c10::string_view act_s,
                                                      c10::string_view gate_s, c10::string_view out_act_s) {
  attn::check_mlp_args("fastops.squeeze_excite", x_in, fc1_w, fc1_b, fc2_w, fc2_b);
  const Act act = attn::parse_act(act_s, "act", {Act::kRelu, Act::kSilu, Act::kGelu});
  const Act gate = attn::parse_act(gate_s, "gate", {Act::kSigmoid, Act::kHardSigmoid});
  const Act out_act = attn::parse_act(out_act_s, "out_act", {Act::kNone, Act::kRelu});
  const at::Tensor x = dense(x_in);
  const SeGeom g{x.size(0), x.size(1), x.size(2) * x.size(3), is_channels_last(x)};
  at::Tensor r;
  if (residual.has_value() && residual->defined()) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type() &&
                    residual->device() == x.device(),
                "fastops.squeeze_excite: residual must match x's shape, dtype and device, got ", residual->sizes());
    r = residual->contiguous(layout_of(x));
  }
  at::Tensor out = at::empty_like(x, layout_of(x));
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor pooled = at::empty({g.N, g.C}, x.options().dtype(acc_type));
  const at::Tensor w1 = fc1_w.contiguous(), w2 = fc2_w.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "squeeze_excite_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const attn::Mlp<acc_t> mlp(w1, contig(fc1_b), w2, contig(fc2_b), scalar_t{});
    const int64_t R = mlp.R, C = g.C, sz = C * g.HW;
    const scalar_t* px = x.data_ptr<scalar_t>();
    const scalar_t* pr = r.defined() ? r.data_ptr<scalar_t>() : nullptr;
    scalar_t* py = out.data_ptr<scalar_t>();
    acc_t* pp = pooled.data_ptr<acc_t>();
    std::vector<acc_t> z1(g.N * R), h(g.N * R), gt(g.N * C);
    attn::per_sample(
        g.N,
        attn::range(C, attn::grain_for(g.HW),
                    [&](int64_t n, int64_t c0, int64_t c1) {
                      std::vector<attn::red_t> sums(c1 - c0);
                      pool_sum(g, px + n * sz, c0, c1, sums.data());
                      for (int64_t c = c0; c < c1; ++c) pp[n * C + c] = static_cast<acc_t>(sums[c - c0] / g.HW);
                    }),
        attn::serial([&](int64_t n) {
          acc_t* gn = &gt[n * C];
          mlp.forward(act, pp + n * C, &z1[n * R], &h[n * R], gn);
          for (int64_t c = 0; c < C; ++c) gn[c] = attn::act_fwd(gate, gn[c]);
        }),
        attn::range(C, attn::grain_for(g.HW), [&](int64_t n, int64_t c0, int64_t c1) {
          const scalar_t* rn = pr ? pr + n * sz : nullptr;
          if (out_act == Act::kRelu)
            scale<scalar_t, acc_t, true>(g, px + n * sz, rn, &gt[n * C], c0, c1, py + n * sz);
          else
            scale<scalar_t, acc_t, false>(g, px + n * sz, rn, &gt[n * C], c0, c1, py + n * sz);
        }));
  });
  return {out, pooled};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> squeeze_excite_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& out_in, const at::Tensor& pooled_in,
    const at::Tensor& fc1_w, const c10::optional<at::Tensor>& fc1_b, const at::Tensor& fc2_w,
    const c10::optional<at::Tensor>& fc2_b, bool has_residual, c10::string_view act_s, c10::string_view gate_s,
    c10::string_view out_act_s) {
  attn::check_mlp_args("fastops.squeeze_excite_backward", x_in, fc1_w, fc1_b, fc2_w, fc2_b);
  const Act act = attn::parse_act(act_s, "act", {Act::kRelu, Act::kSilu, Act::kGelu});
  const Act gate = attn::parse_act(gate_s, "gate", {Act::kSigmoid, Act::kHardSigmoid});
  const Act out_act = attn::parse_act(out_act_s, "out_act", {Act::kNone, Act::kRelu});
  const at::Tensor x = dense(x_in);
  const auto fmt = layout_of(x);
  const SeGeom g{x.size(0), x.size(1), x.size(2) * x.size(3), is_channels_last(x)};
  for (const auto* t : {&grad_out_in, &out_in})
    TORCH_CHECK(t->sizes() == x.sizes() && t->scalar_type() == x.scalar_type() && t->device() == x.device(),
                "fastops.squeeze_excite_backward: grad_out and out must match x's shape, dtype and device");
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(pooled_in.sizes() == at::IntArrayRef({g.N, g.C}) && pooled_in.scalar_type() == acc_type,
              "fastops.squeeze_excite_backward: pooled must be (N, C) = (", g.N, ", ", g.C, ") ", acc_type,
              ", got ", pooled_in.sizes(), " ", pooled_in.scalar_type());
  const at::Tensor go = grad_out_in.contiguous(fmt), out = out_in.contiguous(fmt), pooled = pooled_in.contiguous();
  const at::Tensor w1 = fc1_w.contiguous(), w2 = fc2_w.contiguous();
  const int64_t R = w1.size(0), C = g.C;
  at::Tensor gx = at::empty_like(x, fmt);
  at::Tensor gres = has_residual ? at::empty_like(x, fmt) : at::empty({0}, x.options());
  at::Tensor gw1 = at::empty_like(w1), gb1 = at::empty({R}, w1.options());
  at::Tensor gw2 = at::empty_like(w2), gb2 = at::empty({C}, w2.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "squeeze_excite_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const attn::Mlp<acc_t> mlp(w1, contig(fc1_b), w2, contig(fc2_b), scalar_t{});
    const int64_t sz = C * g.HW;
    const scalar_t *px = x.data_ptr<scalar_t>(), *pgo = go.data_ptr<scalar_t>(), *pout = out.data_ptr<scalar_t>();
    scalar_t* pgx = gx.data_ptr<scalar_t>();
    scalar_t* pgr = has_residual ? gres.data_ptr<scalar_t>() : nullptr;
    const acc_t* pp = pooled.data_ptr<acc_t>();
    const bool relu = out_act == Act::kRelu;
    // Per sample: z1, h (R); gate value, dz2 (C); dz1 (R); dp (C).
    std::vector<acc_t> z1(g.N * R), h(g.N * R), gt(g.N * C), dz2(g.N * C), dz1(g.N * R), dp(g.N * C);
    const acc_t inv_hw = acc_t(1) / static_cast<acc_t>(g.HW);
    auto dy_of = [relu](scalar_t go_v, scalar_t out_v) {
      return (!relu || static_cast<acc_t>(out_v) > 0) ? static_cast<acc_t>(go_v) : acc_t(0);
    };
    attn::per_sample(
        g.N,
        // dg[c] = sum_p dy * x  (kept in dz2 until the MLP backward turns it into dz2)
        attn::range(C, attn::grain_for(g.HW),
                    [&](int64_t n, int64_t c0, int64_t c1) {
                      const int64_t b = n * sz;
                      acc_t* dg = &dz2[n * C];
                      using red_t = attn::red_t;
                      if (!g.cl) {
                        using V = simd::Vec<red_t>;
                        for (int64_t c = c0; c < c1; ++c) {
                          const int64_t o = b + c * g.HW;
                          typename V::V s = V::splat(0);
                          int64_t i = 0;
                          for (; i + V::N <= g.HW; i += V::N) {
                            typename V::V d = V::load_from(pgo + o + i);
                            if (relu) d = V::load_from(pout + o + i) > 0 ? d : V::splat(0);
                            s += d * V::load_from(px + o + i);
                          }
                          red_t t = V::sum(s);
                          for (; i < g.HW; ++i)
                            t += red_t(dy_of(pgo[o + i], pout[o + i])) * static_cast<red_t>(px[o + i]);
                          dg[c] = static_cast<acc_t>(t);
                        }
                      } else {
                        std::vector<red_t> sums(c1 - c0, red_t(0));
                        for (int64_t q = 0; q < g.HW; ++q) {
                          const int64_t o = b + q * C;
                          for (int64_t c = c0; c < c1; ++c)
                            sums[c - c0] += red_t(dy_of(pgo[o + c], pout[o + c])) * static_cast<red_t>(px[o + c]);
                        }
                        for (int64_t c = c0; c < c1; ++c) dg[c] = static_cast<acc_t>(sums[c - c0]);
                      }
                    }),
        attn::serial([&](int64_t n) {
          acc_t *z2 = &gt[n * C], *d2 = &dz2[n * C];
          mlp.forward(act, pp + n * C, &z1[n * R], &h[n * R], z2);
          for (int64_t c = 0; c < C; ++c) {
            d2[c] *= attn::act_grad(gate, z2[c]);
            z2[c] = attn::act_fwd(gate, z2[c]);
          }
          mlp.backward(act, &z1[n * R], d2, &dz1[n * R], &dp[n * C]);
          for (int64_t c = 0; c < C; ++c) dp[n * C + c] *= inv_hw;
        }),
        // gx = dy * gate[c] + dp[c] / HW; grad_residual = dy
        attn::range(C, attn::grain_for(g.HW), [&](int64_t n, int64_t c0, int64_t c1) {
          const int64_t b = n * sz;
          const acc_t *gn = &gt[n * C], *dpn = &dp[n * C];
          auto one = [&](int64_t o, int64_t c) {
            const acc_t dy = dy_of(pgo[o], pout[o]);
            pgx[o] = static_cast<scalar_t>(dy * gn[c] + dpn[c]);
            if (pgr) pgr[o] = static_cast<scalar_t>(dy);
          };
          if (!g.cl) {
            for (int64_t c = c0; c < c1; ++c)
              for (int64_t i = 0; i < g.HW; ++i) one(b + c * g.HW + i, c);
          } else {
            for (int64_t q = 0; q < g.HW; ++q)
              for (int64_t c = c0; c < c1; ++c) one(b + q * C + c, c);
          }
        }));
    attn::linear_weight_grad<scalar_t, acc_t>(g.N, C, R, dz2.data(), h.data(), gw2, gb2);
    attn::linear_weight_grad<scalar_t, acc_t>(g.N, R, C, dz1.data(), pp, gw1, gb1);
  });
  return {gx, gw1, gb1, gw2, gb2, gres};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastops, CPU, m) {
  m.impl("squeeze_excite", &squeeze_excite_cpu);
  m.impl("squeeze_excite_backward", &squeeze_excite_backward_cpu);
}

}  // namespace fastops
