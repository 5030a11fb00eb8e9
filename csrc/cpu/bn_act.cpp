// BatchNorm (+ residual) + activation on the CPU: forward and backward, NCHW and channels_last,
// float / double / half / bf16.
//
// Training forward: one statistics pass (sums of x - shift per channel, the shift being one sample of the
// channel so that the sums do not cancel; fp32 partials over short fixed blocks, combined in fp64 in a
// fixed order) and one normalise + residual + activation pass. Eval: one pass.
// Backward: one reduction pass (sum dz, sum dz * (x - mean), with z recomputed from x) and one
// elementwise pass; in eval mode grad_x is written in the reduction pass itself.
// NCHW is walked by (n, c) planes, channels_last by pixel rows of C channels (cpu/depthwise_kernels.h).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "bn_act_common.h"
#include "common.h"
#include "conv_bn_checks.h"
#include "cpu/depthwise_kernels.h"

namespace fastops {
namespace {

using bnact::Act;
using chan::Geom;

using convbn::check_like;
using convbn::opt;
constexpr convbn::Dev kDev = convbn::Dev::kCpu;

// Per-channel parameter as a std::vector of acc_t (default `dflt` when absent).
template <typename acc_t>
std::vector<acc_t> param_vec(const at::Tensor* t, int64_t C, acc_t dflt) {
  std::vector<acc_t> v(C, dflt);
  if (t) {
    const at::Tensor f = t->to(at::kDouble).contiguous();
    const double* p = f.data_ptr<double>();
    for (int64_t c = 0; c < C; ++c) v[c] = static_cast<acc_t>(p[c]);
  }
  return v;
}

// Training statistics: mean and biased variance per channel, in double.
template <typename scalar_t>
void batch_stats(const Geom& g, const scalar_t* x, std::vector<double>& mean, std::vector<double>& var) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = g.C;
  // The shift: the channel's first element (0 if that is inf or NaN, which would make every difference NaN
  // where torch gives an inf mean).
  std::vector<acc_t> shift(C);
  for (int64_t c = 0; c < C; ++c) {
    const acc_t x0 = static_cast<acc_t>(g.cl ? x[c] : x[c * g.HW]);
    shift[c] = std::isfinite(static_cast<double>(x0)) ? x0 : acc_t(0);
  }
  std::vector<double> sums(2 * C);
  using V = simd::Vec<acc_t>;
  auto plane_fn = [&](int64_t p, acc_t* out) {
    const int64_t c = p % C;
    const scalar_t* xp = x + p * g.HW;
    const acc_t k = shift[c];
    const typename V::V kv = V::splat(k);
    typename V::V s0 = V::splat(0), s1 = V::splat(0), q0 = V::splat(0), q1 = V::splat(0);
    int64_t i = 0;
    for (; i + 2 * V::N <= g.HW; i += 2 * V::N) {
      const auto d0 = V::load_from(xp + i) - kv, d1 = V::load_from(xp + i + V::N) - kv;
      s0 += d0; q0 += d0 * d0;
      s1 += d1; q1 += d1 * d1;
    }
    acc_t s = V::sum(s0 + s1), q = V::sum(q0 + q1);
    for (; i < g.HW; ++i) {
      const acc_t d = static_cast<acc_t>(xp[i]) - k;
      s += d; q += d * d;
    }
    out[0] = s; out[1] = q;
  };
  auto rows_fn = [&](int64_t r0, int64_t r1, acc_t* acc) {
    acc_t* __restrict__ s = acc;
    acc_t* __restrict__ q = acc + C;
    const acc_t* __restrict__ k = shift.data();
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* __restrict__ xr = x + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const acc_t d = static_cast<acc_t>(xr[c]) - k[c];
        s[c] += d;
        q[c] += d * d;
      }
    }
  };
  chan::reduce_channels<acc_t, 2>(g, plane_fn, rows_fn, sums.data());
  const double M = static_cast<double>(g.N * g.HW);
  mean.resize(C); var.resize(C);
  for (int64_t c = 0; c < C; ++c) {
    const double m = sums[c] / M;
    mean[c] = static_cast<double>(shift[c]) + m;
    const double v = sums[C + c] / M - m * m;
    var[c] = v < 0 ? 0.0 : v;  // rounding can take it below 0; a NaN (inf or NaN inputs) stays NaN, as in torch
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_cpu(const at::Tensor& x_in, const c10::optional<at::Tensor>& weight,
                                                          const c10::optional<at::Tensor>& bias,
                                                          const c10::optional<at::Tensor>& mean,
                                                          const c10::optional<at::Tensor>& var,
                                                          const c10::optional<at::Tensor>& residual, double eps,
                                                          c10::string_view act_name, bool training) {
  const char* op = "bn_act";
  const Act act = bnact::parse_act(std::string(act_name), op);
  convbn::check_bn_x(op, "x", x_in, kDev);
  const int64_t C = x_in.size(1);
  const at::Tensor *w = opt(weight), *b = opt(bias), *m = opt(mean), *v = opt(var), *r = opt(residual);
  convbn::check_channel_param(op, "weight", w, x_in, C, kDev);
  convbn::check_channel_param(op, "bias", b, x_in, C, kDev);
  if (!training) TORCH_CHECK(m && v, "fastops.bn_act: mean and var are required when training=False");
  convbn::check_channel_param(op, "mean", m, x_in, C, kDev);
  convbn::check_channel_param(op, "var", v, x_in, C, kDev);
  TORCH_CHECK(eps >= 0, "fastops.bn_act: eps must be >= 0, got ", eps);
  const bool cl = is_channels_last(x_in);
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor x = x_in.contiguous(fmt);
  at::Tensor res;
  if (r) {
    check_like(op, "residual", *r, x, x.sizes());
    res = r->contiguous(fmt);
  }
  const bool f64 = x.scalar_type() == at::kDouble;
  const auto stat_type = f64 ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty_like(x, x.options(), fmt);
  at::Tensor save_mean = at::empty({C}, x.options().dtype(stat_type));
  at::Tensor save_var = at::empty({C}, x.options().dtype(stat_type));
  if (!training) {
    save_mean.copy_(*m);
    save_var.copy_(*v);
  }
  const Geom g = chan::geom_of(x, cl);
  if (training) TORCH_CHECK(g.N * g.HW > 0, "fastops.bn_act: training needs at least one value per channel");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_act_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    std::vector<double> mu, sig;
    if (training) {
      if (x.numel() > 0) batch_stats(g, xp, mu, sig);
      for (int64_t c = 0; c < C; ++c) {
        if (f64) {
          save_mean.data_ptr<double>()[c] = mu[c];
          save_var.data_ptr<double>()[c] = sig[c];
        } else {
          save_mean.data_ptr<float>()[c] = static_cast<float>(mu[c]);
          save_var.data_ptr<float>()[c] = static_cast<float>(sig[c]);
        }
      }
    } else {
      mu = param_vec<double>(m, C, 0.0);
      sig = param_vec<double>(v, C, 1.0);
    }
    if (x.numel() == 0) return;
    const std::vector<double> wv = param_vec<double>(w, C, 1.0), bv = param_vec<double>(b, C, 0.0);
    std::vector<acc_t> a(C), s(C);
    for (int64_t c = 0; c < C; ++c) {
      const double k = wv[c] / std::sqrt(sig[c] + eps);
      a[c] = static_cast<acc_t>(k);
      s[c] = static_cast<acc_t>(bv[c] - mu[c] * k);
    }
    chan::affine_act<scalar_t, scalar_t, acc_t>(g, act, xp, r ? res.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(),
                                      a.data(), s.data());
  });
  return {out, save_mean, save_var};
}

// Backward. Per channel: d = x - mean, z = d * a + bias + r (a = w * rstd), dz = g * act'(z).
// Reduction: sdz = sum dz, sdzd = sum dz * d. grad_bias = sdz, grad_weight = rstd * sdzd.
// training: grad_x = p * dz + q * d + s with p = w * rstd, q = -p * rstd^2 * sdzd / M, s = -p * sdz / M.
// eval: grad_x = p * dz (written during the reduction pass).
template <Act A, typename scalar_t>
void bn_backward_kernel(const Geom& g, bool training, const scalar_t* gop, const scalar_t* xp, const scalar_t* rp,
                        scalar_t* gxp, scalar_t* grp, const std::vector<double>& mu, const std::vector<double>& rstd,
                        const std::vector<double>& wv, const std::vector<double>& bv, double* gw, double* gb) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = g.C;
  std::vector<acc_t> meanv(C), av(C), biasv(C), pv(C);
  for (int64_t c = 0; c < C; ++c) {
    meanv[c] = static_cast<acc_t>(mu[c]);
    av[c] = static_cast<acc_t>(wv[c] * rstd[c]);
    biasv[c] = static_cast<acc_t>(bv[c]);
    pv[c] = av[c];
  }
  // eval: the reduction pass also writes grad_x (and grad_residual) since nothing depends on the sums.
  const bool write1 = !training;
  auto plane_fn = [&](int64_t p, acc_t* out) {
    const int64_t c = p % C, o = p * g.HW;
    const acc_t mc = meanv[c], ac = av[c], bc = biasv[c], pc = pv[c];
    const scalar_t *x = xp + o, *go = gop + o, *r = rp ? rp + o : nullptr;
    acc_t s0 = 0, s1 = 0;
    if (write1) {
      scalar_t* gx = gxp + o;
      scalar_t* gr = grp ? grp + o : nullptr;
#pragma omp simd reduction(+ : s0, s1)
      for (int64_t i = 0; i < g.HW; ++i) {
        const acc_t d = static_cast<acc_t>(x[i]) - mc;
        const acc_t z = d * ac + bc + (r ? static_cast<acc_t>(r[i]) : acc_t(0));
        const acc_t dz = static_cast<acc_t>(go[i]) * chan::act_g<A>(z);
        s0 += dz; s1 += dz * d;
        gx[i] = static_cast<scalar_t>(pc * dz);
        if (gr) gr[i] = static_cast<scalar_t>(dz);
      }
    } else if (r) {
#pragma omp simd reduction(+ : s0, s1)
      for (int64_t i = 0; i < g.HW; ++i) {
        const acc_t d = static_cast<acc_t>(x[i]) - mc;
        const acc_t dz = static_cast<acc_t>(go[i]) * chan::act_g<A>(d * ac + bc + static_cast<acc_t>(r[i]));
        s0 += dz; s1 += dz * d;
      }
    } else {
#pragma omp simd reduction(+ : s0, s1)
      for (int64_t i = 0; i < g.HW; ++i) {
        const acc_t d = static_cast<acc_t>(x[i]) - mc;
        const acc_t dz = static_cast<acc_t>(go[i]) * chan::act_g<A>(d * ac + bc);
        s0 += dz; s1 += dz * d;
      }
    }
    out[0] = s0; out[1] = s1;
  };
  auto rows_fn = [&](int64_t r0, int64_t r1, acc_t* acc) {
    acc_t* __restrict__ s0 = acc;
    acc_t* __restrict__ s1 = acc + C;
    const acc_t *__restrict__ mc = meanv.data(), *__restrict__ ac = av.data(), *__restrict__ bc = biasv.data(),
                 *__restrict__ pc = pv.data();
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t o = row * C;
      const scalar_t *x = xp + o, *go = gop + o, *r = rp ? rp + o : nullptr;
      if (write1) {
        scalar_t* gx = gxp + o;
        scalar_t* gr = grp ? grp + o : nullptr;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const acc_t d = static_cast<acc_t>(x[c]) - mc[c];
          const acc_t z = d * ac[c] + bc[c] + (r ? static_cast<acc_t>(r[c]) : acc_t(0));
          const acc_t dz = static_cast<acc_t>(go[c]) * chan::act_g<A>(z);
          s0[c] += dz; s1[c] += dz * d;
          gx[c] = static_cast<scalar_t>(pc[c] * dz);
          if (gr) gr[c] = static_cast<scalar_t>(dz);
        }
      } else if (r) {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const acc_t d = static_cast<acc_t>(x[c]) - mc[c];
          const acc_t dz = static_cast<acc_t>(go[c]) * chan::act_g<A>(d * ac[c] + bc[c] + static_cast<acc_t>(r[c]));
          s0[c] += dz; s1[c] += dz * d;
        }
      } else {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const acc_t d = static_cast<acc_t>(x[c]) - mc[c];
          const acc_t dz = static_cast<acc_t>(go[c]) * chan::act_g<A>(d * ac[c] + bc[c]);
          s0[c] += dz; s1[c] += dz * d;
        }
      }
    }
  };
  std::vector<double> sums(2 * C);
  chan::reduce_channels<acc_t, 2>(g, plane_fn, rows_fn, sums.data());
  for (int64_t c = 0; c < C; ++c) {
    gb[c] = sums[c];
    gw[c] = sums[C + c] * rstd[c];
  }
  if (!training) return;

  const double M = static_cast<double>(g.N * g.HW);
  std::vector<acc_t> qv(C), sv(C);
  for (int64_t c = 0; c < C; ++c) {
    const double p = wv[c] * rstd[c];
    qv[c] = static_cast<acc_t>(-p * rstd[c] * rstd[c] * sums[C + c] / M);
    sv[c] = static_cast<acc_t>(-p * sums[c] / M);
  }
  auto unit = [&](int64_t u) {
    if (!g.cl) {
      const int64_t c = u % C, o = u * g.HW;
      const acc_t mc = meanv[c], ac = av[c], bc = biasv[c], pc = pv[c], qc = qv[c], sc = sv[c];
      const scalar_t *x = xp + o, *go = gop + o;
      scalar_t* gx = gxp + o;
      if (rp) {
        const scalar_t* r = rp + o;
        scalar_t* gr = grp + o;
#pragma omp simd
        for (int64_t i = 0; i < g.HW; ++i) {
          const acc_t d = static_cast<acc_t>(x[i]) - mc;
          const acc_t dz = static_cast<acc_t>(go[i]) * chan::act_g<A>(d * ac + bc + static_cast<acc_t>(r[i]));
          gx[i] = static_cast<scalar_t>(pc * dz + qc * d + sc);
          gr[i] = static_cast<scalar_t>(dz);
        }
      } else {
#pragma omp simd
        for (int64_t i = 0; i < g.HW; ++i) {
          const acc_t d = static_cast<acc_t>(x[i]) - mc;
          const acc_t dz = static_cast<acc_t>(go[i]) * chan::act_g<A>(d * ac + bc);
          gx[i] = static_cast<scalar_t>(pc * dz + qc * d + sc);
        }
      }
    } else {
      const int64_t o = u * C;
      const acc_t *__restrict__ mc = meanv.data(), *__restrict__ ac = av.data(), *__restrict__ bc = biasv.data(),
                   *__restrict__ pc = pv.data(), *__restrict__ qc = qv.data(), *__restrict__ sc = sv.data();
      const scalar_t *x = xp + o, *go = gop + o;
      scalar_t* gx = gxp + o;
      if (rp) {
        const scalar_t* r = rp + o;
        scalar_t* gr = grp + o;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const acc_t d = static_cast<acc_t>(x[c]) - mc[c];
          const acc_t dz = static_cast<acc_t>(go[c]) * chan::act_g<A>(d * ac[c] + bc[c] + static_cast<acc_t>(r[c]));
          gx[c] = static_cast<scalar_t>(pc[c] * dz + qc[c] * d + sc[c]);
          gr[c] = static_cast<scalar_t>(dz);
        }
      } else {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const acc_t d = static_cast<acc_t>(x[c]) - mc[c];
          const acc_t dz = static_cast<acc_t>(go[c]) * chan::act_g<A>(d * ac[c] + bc[c]);
          gx[c] = static_cast<scalar_t>(pc[c] * dz + qc[c] * d + sc[c]);
        }
      }
    }
  };
  const int64_t units = g.cl ? g.rows() : g.planes();
  const int64_t grain = g.cl ? chan::row_grain(C) : std::max<int64_t>(1, 16384 / std::max<int64_t>(g.HW, 1));
  at::parallel_for(0, units, grain, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) unit(u);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x_in, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& save_mean, const at::Tensor& save_var,
    const c10::optional<at::Tensor>& residual, double eps, c10::string_view act_name, bool training) {
  const char* op = "bn_act_backward";
  const Act act = bnact::parse_act(std::string(act_name), op);
  convbn::check_bn_x(op, "x", x_in, kDev);
  const int64_t C = x_in.size(1);
  const at::Tensor *w = opt(weight), *b = opt(bias), *r = opt(residual);
  convbn::check_channel_param(op, "weight", w, x_in, C, kDev);
  convbn::check_channel_param(op, "bias", b, x_in, C, kDev);
  convbn::check_channel_param(op, "save_mean", &save_mean, x_in, C, kDev);
  convbn::check_channel_param(op, "save_var", &save_var, x_in, C, kDev);
  TORCH_CHECK(eps >= 0, "fastops.bn_act_backward: eps must be >= 0, got ", eps);
  check_like(op, "grad_out", grad_out, x_in, x_in.sizes());
  const bool cl = is_channels_last(x_in);
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor go = grad_out.contiguous(fmt);
  at::Tensor res;
  if (r) {
    check_like(op, "residual", *r, x, x.sizes());
    res = r->contiguous(fmt);
  }
  const bool f64 = x.scalar_type() == at::kDouble;
  const auto stat_type = f64 ? at::kDouble : at::kFloat;
  at::Tensor gx = at::empty_like(x, x.options(), fmt);
  at::Tensor gr = r ? at::empty_like(x, x.options(), fmt) : at::empty({0}, x.options());
  const Geom g = chan::geom_of(x, cl);
  std::vector<double> gw(C, 0.0), gb(C, 0.0);
  if (x.numel() > 0) {
    TORCH_CHECK(!training || g.N * g.HW > 0, "fastops.bn_act_backward: training needs at least one value per channel");
    const std::vector<double> mu = param_vec<double>(&save_mean, C, 0.0), sig = param_vec<double>(&save_var, C, 1.0);
    const std::vector<double> wv = param_vec<double>(w, C, 1.0), bv = param_vec<double>(b, C, 0.0);
    std::vector<double> rstd(C);
    for (int64_t c = 0; c < C; ++c) rstd[c] = 1.0 / std::sqrt(sig[c] + eps);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_act_backward_cpu", [&] {
      chan::dispatch_act(act, [&](auto ac) {
        bn_backward_kernel<decltype(ac)::value, scalar_t>(
            g, training, go.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), r ? res.data_ptr<scalar_t>() : nullptr,
            gx.data_ptr<scalar_t>(), r ? gr.data_ptr<scalar_t>() : nullptr, mu, rstd, wv, bv, gw.data(), gb.data());
      });
    });
  }
  at::Tensor gw_t = at::from_blob(gw.data(), {C}, at::TensorOptions().dtype(at::kDouble)).to(stat_type);
  at::Tensor gb_t = at::from_blob(gb.data(), {C}, at::TensorOptions().dtype(at::kDouble)).to(stat_type);
  if (!f64) return {gx, gw_t, gb_t, gr};
  return {gx, gw_t.clone(), gb_t.clone(), gr};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastops, CPU, m) {
  m.impl("bn_act", &bn_act_cpu);
  m.impl("bn_act_backward", &bn_act_backward_cpu);
}

}  // namespace fastops
