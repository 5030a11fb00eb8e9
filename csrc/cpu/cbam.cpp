// CBAM on the CPU: forward and backward, NCHW and channels_last, float / double / half / bf16.
//
//   ca = gate(mlp(mean_hw x) + mlp(max_hw x));  x1 = x * ca;  s = [mean_c x1, max_c x1]
//   sa = gate(bn(conv_kxk(s)));                 out = x1 * sa
//
// Three passes over each sample's slice of x: avg + max pooling; the channel mean / max of x * ca (x1 is
// never written); the final scale. In eval every stage of a sample runs back to back (its slice stays in
// cache); in training the BN's batch statistics need every sample's conv output first, so the work is
// split in two phases around that reduction. The conv, BN and gate work on the small (N, 2, H, W) map.
// The gradient of a max is split evenly among tied maxima, as torch.amax's is.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "cpu/channel_attn.h"
#include "cpu/stream_store.h"

namespace fastops {
namespace {

using attn::Act;
using attn::dense;

struct CbamGeom {
  int64_t N, C, H, W, HW, K, P;  // K: spatial kernel size, P = K / 2
  bool cl;
};


CbamGeom check_args(const char* op, const at::Tensor& x, const at::Tensor& w1, const c10::optional<at::Tensor>& b1,
                    const at::Tensor& w2, const c10::optional<at::Tensor>& b2, const at::Tensor& conv_w,
                    const at::Tensor& bn_w, const at::Tensor& bn_b) {
  attn::check_mlp_args(op, x, w1, b1, w2, b2);
  TORCH_CHECK(conv_w.dim() == 4 && conv_w.size(0) == 1 && conv_w.size(1) == 2 && conv_w.size(2) == conv_w.size(3) &&
                  conv_w.size(2) % 2 == 1,
              op, ": conv_weight must be (1, 2, k, k) with odd k, got ", conv_w.sizes());
  TORCH_CHECK(bn_w.numel() == 1 && bn_b.numel() == 1, op, ": bn_weight and bn_bias must have one element");
  TORCH_CHECK(conv_w.scalar_type() == x.scalar_type() && conv_w.device() == x.device(), op,
              ": conv_weight must match x's dtype and device");
  // The BN scalars are read as doubles: x's dtype or the accumulation dtype (fp32 BN next to a half x).
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const auto* t : {&bn_w, &bn_b})
    TORCH_CHECK((t->scalar_type() == x.scalar_type() || t->scalar_type() == acc) && t->device() == x.device(), op,
                ": bn_weight and bn_bias must be on x's device, in x's dtype or ", acc);
  const int64_t K = conv_w.size(2);
  return {x.size(0), x.size(1), x.size(2), x.size(3), x.size(2) * x.size(3), K, K / 2, is_channels_last(x)};
}

template <typename acc_t>
inline acc_t vmax(acc_t a, acc_t b) { return a > b ? a : b; }

// The maxima skip NaN (a NaN-propagating compare in the hot loops cost up to 2x); torch.amax returns NaN. The
// sums over the same values are NaN whenever one of them is, so where a sum is NaN the values are scanned
// again and the max made NaN if one of them is (an inf + -inf sum finds none and keeps the max).
template <typename acc_t, typename ValueAt>
inline acc_t nan_if_any(acc_t mx, double sum, int64_t n, ValueAt value_at) {
  if (!std::isnan(sum)) return mx;
  for (int64_t i = 0; i < n; ++i)
    if (std::isnan(value_at(i))) return std::numeric_limits<acc_t>::quiet_NaN();
  return mx;
}

// u[q - q0] for pixels [q0, q1) of one sample: the k x k conv (zero padding K/2) of the 2-channel map s (2, H, W).
template <typename acc_t, typename out_t>
void spatial_conv(const CbamGeom& g, const acc_t* s, const acc_t* w, int64_t q0, int64_t q1, out_t* u) {
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t h = q / g.W, x = q % g.W;
    const int64_t a0 = std::max<int64_t>(0, g.P - h), a1 = std::min<int64_t>(g.K, g.H + g.P - h);
    const int64_t b0 = std::max<int64_t>(0, g.P - x), b1 = std::min<int64_t>(g.K, g.W + g.P - x);
    attn::red_t acc = 0;
    for (int64_t j = 0; j < 2; ++j)
      for (int64_t a = a0; a < a1; ++a) {
        const acc_t* srow = s + j * g.HW + (h + a - g.P) * g.W + (x - g.P);
        const acc_t* wrow = w + (j * g.K + a) * g.K;
        for (int64_t b = b0; b < b1; ++b) acc += attn::red_t(wrow[b]) * srow[b];
      }
    u[q - q0] = static_cast<out_t>(acc);
  }
}

// The transpose: ds[j][q] = sum_{a,b} w[j,a,b] du[q - (a - P, b - P)], for pixels [q0, q1).
template <typename acc_t>
void spatial_conv_transpose(const CbamGeom& g, const attn::red_t* du, const acc_t* w, int64_t q0, int64_t q1,
                            attn::red_t* ds) {
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t h = q / g.W, x = q % g.W;
    // source row h - a + P must lie in [0, H)
    const int64_t a0 = std::max<int64_t>(0, h + g.P - g.H + 1), a1 = std::min<int64_t>(g.K, h + g.P + 1);
    const int64_t b0 = std::max<int64_t>(0, x + g.P - g.W + 1), b1 = std::min<int64_t>(g.K, x + g.P + 1);
    attn::red_t d0 = 0, d1 = 0;
    for (int64_t a = a0; a < a1; ++a)
      for (int64_t b = b0; b < b1; ++b) {
        const attn::red_t d = du[(h - a + g.P) * g.W + (x - b + g.P)];
        d0 += w[a * g.K + b] * d;
        d1 += w[(g.K + a) * g.K + b] * d;
      }
    ds[q] = d0;
    ds[g.HW + q] = d1;
  }
}

// gw[j,a,b] += sum_q du[q] * s[j, q + (a - P, b - P)] over one sample.
template <typename acc_t>
void spatial_conv_weight_grad(const CbamGeom& g, const acc_t* s, const attn::red_t* du, attn::red_t* gw) {
  for (int64_t j = 0; j < 2; ++j)
    for (int64_t a = 0; a < g.K; ++a)
      for (int64_t b = 0; b < g.K; ++b) {
        attn::red_t acc = 0;
        const int64_t h0 = std::max<int64_t>(0, g.P - a), h1 = std::min<int64_t>(g.H, g.H + g.P - a);
        const int64_t x0 = std::max<int64_t>(0, g.P - b), x1 = std::min<int64_t>(g.W, g.W + g.P - b);
        for (int64_t h = h0; h < h1; ++h) {
          const attn::red_t* drow = du + h * g.W;
          const acc_t* srow = s + j * g.HW + (h + a - g.P) * g.W + (b - g.P);
          for (int64_t x = x0; x < x1; ++x) acc += drow[x] * srow[x];
        }
        gw[(j * g.K + a) * g.K + b] += acc;
      }
}

template <typename scalar_t, typename acc_t>
std::vector<acc_t> to_acc(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  const scalar_t* p = c.data_ptr<scalar_t>();
  return std::vector<acc_t>(p, p + c.numel());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cbam_cpu(
    const at::Tensor& x_in, const at::Tensor& fc1_w, const c10::optional<at::Tensor>& fc1_b, const at::Tensor& fc2_w,
    const c10::optional<at::Tensor>& fc2_b, const at::Tensor& conv_w, const at::Tensor& bn_w, const at::Tensor& bn_b,
    const at::Tensor& bn_mean, const at::Tensor& bn_var, double eps, bool training, c10::string_view act_s,
    c10::string_view gate_s) {
  const at::Tensor x = dense(x_in);
  const CbamGeom g = check_args("fastops.cbam", x, fc1_w, fc1_b, fc2_w, fc2_b, conv_w, bn_w, bn_b);
  const Act act = attn::parse_act(act_s, "act", {Act::kRelu, Act::kSilu, Act::kGelu});
  const Act gate = attn::parse_act(gate_s, "gate", {Act::kSigmoid, Act::kHardSigmoid});
  TORCH_CHECK(training || (bn_mean.numel() == 1 && bn_var.numel() == 1),
              "fastops.cbam: bn_mean and bn_var must have one element");
  TORCH_CHECK(!training || g.N * g.HW > 1, "fastops.cbam: training needs more than one value per BN channel");
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty_like(x, layout_of(x));
  at::Tensor pooled = at::empty({g.N, 2, g.C}, x.options().dtype(acc_type));
  at::Tensor spatial = at::empty({g.N, 2, g.H, g.W}, x.options().dtype(acc_type));
  at::Tensor stats = at::empty({2}, x.options().dtype(acc_type));
  const at::Tensor w1 = fc1_w.contiguous(), w2 = fc2_w.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cbam_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using V = simd::Vec<acc_t>;
    const attn::Mlp<acc_t> mlp(w1, fc1_b, w2, fc2_b, scalar_t{});
    const std::vector<acc_t> cw = to_acc<scalar_t, acc_t>(conv_w);
    const acc_t gamma = static_cast<acc_t>(bn_w.item<double>()), beta = static_cast<acc_t>(bn_b.item<double>());
    const int64_t C = g.C, HW = g.HW, R = mlp.R, sz = C * HW;
    const scalar_t* px = x.data_ptr<scalar_t>();
    scalar_t* py = out.data_ptr<scalar_t>();
    acc_t *pp = pooled.data_ptr<acc_t>(), *ps = spatial.data_ptr<acc_t>();
    // z1, h (2N, R), hs (N, R), s (N, C) of Mlp::forward_pairs for all samples
    std::vector<acc_t> ca(g.N * C), u(g.N * HW), tmp(g.N * (5 * R + C));
    acc_t mean = 0, rstd = 0;

    // 1. avg and max over pixels, channels [c0, c1)
    auto pool = attn::range(C, attn::grain_for(HW), [&](int64_t n, int64_t c0, int64_t c1) {
      using red_t = attn::red_t;
      using VR = simd::Vec<red_t>;
      const scalar_t* xs = px + n * sz;
      acc_t *avg = pp + n * 2 * C, *mx = avg + C;
      const red_t lowest = -std::numeric_limits<red_t>::infinity();
      if (!g.cl) {
        for (int64_t c = c0; c < c1; ++c) {
          const scalar_t* p = xs + c * HW;
          typename VR::V s = VR::splat(0), m = VR::splat(lowest);
          int64_t i = 0;
          for (; i + VR::N <= HW; i += VR::N) {
            const typename VR::V v = VR::load_from(p + i);
            s += v;
            m = v > m ? v : m;
          }
          red_t ts = VR::sum(s), tm = lowest;
          for (int k = 0; k < VR::N; ++k) tm = vmax(tm, m[k]);
          for (; i < HW; ++i) {
            const red_t v = static_cast<red_t>(p[i]);
            ts += v;
            tm = vmax(tm, v);
          }
          avg[c] = static_cast<acc_t>(ts / HW);
          // exact: the max of values that came from scalar_t
          mx[c] = nan_if_any(static_cast<acc_t>(tm), ts, HW, [p](int64_t i) { return static_cast<acc_t>(p[i]); });
        }
      } else {
        std::vector<red_t> sums(c1 - c0, red_t(0));
        for (int64_t c = c0; c < c1; ++c) mx[c] = -std::numeric_limits<acc_t>::infinity();
        for (int64_t q = 0; q < HW; ++q) {
          const scalar_t* p = xs + q * C;
          for (int64_t c = c0; c < c1; ++c) {
            const acc_t v = static_cast<acc_t>(p[c]);
            sums[c - c0] += v;
            mx[c] = vmax(mx[c], v);
          }
        }
        for (int64_t c = c0; c < c1; ++c) {
          avg[c] = static_cast<acc_t>(sums[c - c0] / HW);
          mx[c] = nan_if_any(mx[c], sums[c - c0], HW,
                             [xs, c, C](int64_t q) { return static_cast<acc_t>(xs[q * C + c]); });
        }
      }
    });
    // 2. the channel gate of samples [n0, n1): their avg and max branches as one batch, the weights read once
    //    for all of them
    auto gates_of = [&](int64_t n0, int64_t n1, bool split) {
      acc_t *z1 = &tmp[n0 * 2 * R], *h = &tmp[g.N * 2 * R + n0 * 2 * R], *hs = &tmp[g.N * 4 * R + n0 * R];
      mlp.forward_pairs(act, n1 - n0, pp + n0 * 2 * C, z1, h, hs, &ca[n0 * C], split);
      attn::act_inplace<acc_t>(gate, &ca[n0 * C], nullptr, (n1 - n0) * C);
    };
    auto channel_mlp = attn::serial([&](int64_t n) { gates_of(n, n + 1, false); });
    // 3. mean and max over channels of x * ca, pixels [q0, q1)
    auto channel_pool = attn::range(HW, attn::grain_for(C), [&](int64_t n, int64_t q0, int64_t q1) {
      const scalar_t* xs = px + n * sz;
      const acc_t* can = &ca[n * C];
      acc_t *s0 = ps + n * 2 * HW, *s1 = s0 + HW;
      if (!g.cl) {
        std::vector<attn::red_t> sum(q1 - q0, attn::red_t(0));
        for (int64_t q = q0; q < q1; ++q) s1[q] = -std::numeric_limits<acc_t>::infinity();
        // Four channels are added in acc_t before one add into the double sums: loading and storing the
        // per-pixel sums for every channel would cost more than reading x.
        int64_t c = 0;
        for (; c + 4 <= C; c += 4) {
          const scalar_t *p0 = xs + c * HW, *p1 = p0 + HW, *p2 = p1 + HW, *p3 = p2 + HW;
          const acc_t k0 = can[c], k1 = can[c + 1], k2 = can[c + 2], k3 = can[c + 3];
          for (int64_t q = q0; q < q1; ++q) {
            const acc_t v0 = static_cast<acc_t>(p0[q]) * k0, v1 = static_cast<acc_t>(p1[q]) * k1;
            const acc_t v2 = static_cast<acc_t>(p2[q]) * k2, v3 = static_cast<acc_t>(p3[q]) * k3;
            sum[q - q0] += static_cast<attn::red_t>((v0 + v1) + (v2 + v3));
            s1[q] = vmax(s1[q], vmax(vmax(v0, v1), vmax(v2, v3)));
          }
        }
        for (; c < C; ++c) {
          const scalar_t* p = xs + c * HW;
          const acc_t k = can[c];
          for (int64_t q = q0; q < q1; ++q) {
            const acc_t v = static_cast<acc_t>(p[q]) * k;
            sum[q - q0] += v;
            s1[q] = vmax(s1[q], v);
          }
        }
        for (int64_t q = q0; q < q1; ++q) {
          s0[q] = static_cast<acc_t>(sum[q - q0] / C);
          s1[q] = nan_if_any(s1[q], sum[q - q0], C, [xs, can, q, HW](int64_t c) {
            return static_cast<acc_t>(xs[c * HW + q]) * can[c];
          });
        }
      } else {
        // fp32 lanes summed over blocks of kBlock channels, the blocks summed in double (see red_t)
        constexpr int64_t kBlock = 16 * V::N;
        for (int64_t q = q0; q < q1; ++q) {
          const scalar_t* p = xs + q * C;
          typename V::V m = V::splat(-std::numeric_limits<acc_t>::infinity());
          attn::red_t ts = 0;
          int64_t c = 0;
          while (c + V::N <= C) {
            typename V::V s = V::splat(0);
            const int64_t end = std::min(C, c + kBlock);
            for (; c + V::N <= end; c += V::N) {
              const typename V::V v = V::load_from(p + c) * V::load(can + c);
              s += v;
              m = v > m ? v : m;
            }
            ts += V::sum(s);
          }
          acc_t tm = -std::numeric_limits<acc_t>::infinity();
          for (int k = 0; k < V::N; ++k) tm = vmax(tm, m[k]);
          for (; c < C; ++c) {
            const acc_t v = static_cast<acc_t>(p[c]) * can[c];
            ts += v;
            tm = vmax(tm, v);
          }
          s0[q] = static_cast<acc_t>(ts / C);
          s1[q] = nan_if_any(tm, ts, C, [p, can](int64_t c) { return static_cast<acc_t>(p[c]) * can[c]; });
        }
      }
    });
    // 4. the k x k conv of the spatial map
    auto conv = attn::range(HW, attn::grain_for(2 * g.K * g.K), [&](int64_t n, int64_t q0, int64_t q1) {
      spatial_conv(g, ps + n * 2 * HW, cw.data(), q0, q1, &u[n * HW + q0]);
    });
    // 5. out = x * ca * gate(bn(u)), channels [c0, c1); u is turned into sa in place first (per pixel range
    //    in the caller's stage order: see below).
    auto to_sa = attn::range(HW, 4096, [&](int64_t n, int64_t q0, int64_t q1) {
      acc_t* un = &u[n * HW];
      for (int64_t q = q0; q < q1; ++q) un[q] = attn::act_fwd(gate, (un[q] - mean) * rstd * gamma + beta);
    });
    auto scale = attn::range(C, attn::grain_for(HW), [&](int64_t n, int64_t c0, int64_t c1) {
      const scalar_t* xs = px + n * sz;
      scalar_t* ys = py + n * sz;
      const acc_t *can = &ca[n * C], *sa = &u[n * HW];
      if (!g.cl) {
        for (int64_t c = c0; c < c1; ++c) {
          const acc_t k = can[c];
          for (int64_t q = 0; q < HW; ++q)
            ys[c * HW + q] = static_cast<scalar_t>(static_cast<acc_t>(xs[c * HW + q]) * k * sa[q]);
        }
      } else {
        for (int64_t q = 0; q < HW; ++q)
          for (int64_t c = c0; c < c1; ++c)
            ys[q * C + c] = static_cast<scalar_t>(static_cast<acc_t>(xs[q * C + c]) * can[c] * sa[q]);
      }
    });

    // Up to twice the cache share, x stays in cache between the passes: every sample is pooled first, then the
    // channel MLP of all samples runs with the threads splitting its weights (each weight read once, not once
    // per sample), then the rest. A larger x goes sample by sample, each sample's passes close together.
    const bool whole = static_cast<int64_t>(x.nbytes()) <= 2 * simd::llc_share_bytes();
    if (whole) {
      attn::per_sample(g.N, pool);
      gates_of(0, g.N, true);
    }
    auto front = [&](auto... rest) {
      if (whole) attn::per_sample(g.N, channel_pool, conv, rest...);
      else attn::per_sample(g.N, pool, channel_mlp, channel_pool, conv, rest...);
    };
    acc_t* pst = stats.data_ptr<acc_t>();
    if (training) {
      front();
      double s = 0, s2 = 0;
      for (const acc_t v : u) s += v;
      const double m = s / static_cast<double>(u.size());
      for (const acc_t v : u) s2 += (v - m) * (v - m);
      pst[0] = static_cast<acc_t>(m);
      pst[1] = static_cast<acc_t>(s2 / static_cast<double>(u.size()));
    } else {
      pst[0] = static_cast<acc_t>(bn_mean.item<double>());
      pst[1] = static_cast<acc_t>(bn_var.item<double>());
    }
    mean = pst[0];
    rstd = acc_t(1) / std::sqrt(pst[1] + static_cast<acc_t>(eps));
    if (training)
      attn::per_sample(g.N, to_sa, scale);
    else
      front(to_sa, scale);
  });
  return {out, pooled, spatial, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
cbam_backward_cpu(const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& pooled_in,
                  const at::Tensor& spatial_in, const at::Tensor& stats_in, const at::Tensor& fc1_w,
                  const c10::optional<at::Tensor>& fc1_b, const at::Tensor& fc2_w,
                  const c10::optional<at::Tensor>& fc2_b, const at::Tensor& conv_w, const at::Tensor& bn_w,
                  const at::Tensor& bn_b, double eps, bool training, c10::string_view act_s, c10::string_view gate_s) {
  const at::Tensor x = dense(x_in);
  const CbamGeom g = check_args("fastops.cbam_backward", x, fc1_w, fc1_b, fc2_w, fc2_b, conv_w, bn_w, bn_b);
  const Act act = attn::parse_act(act_s, "act", {Act::kRelu, Act::kSilu, Act::kGelu});
  const Act gate = attn::parse_act(gate_s, "gate", {Act::kSigmoid, Act::kHardSigmoid});
  const auto fmt = layout_of(x);
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(grad_out_in.sizes() == x.sizes() && grad_out_in.scalar_type() == x.scalar_type() &&
                  grad_out_in.device() == x.device(),
              "fastops.cbam_backward: grad_out must match x's shape, dtype and device");
  TORCH_CHECK(pooled_in.sizes() == at::IntArrayRef({g.N, 2, g.C}) && pooled_in.scalar_type() == acc_type,
              "fastops.cbam_backward: pooled must be (N, 2, C) ", acc_type, ", got ", pooled_in.sizes());
  TORCH_CHECK(spatial_in.sizes() == at::IntArrayRef({g.N, 2, g.H, g.W}) && spatial_in.scalar_type() == acc_type,
              "fastops.cbam_backward: spatial must be (N, 2, H, W) ", acc_type, ", got ", spatial_in.sizes());
  TORCH_CHECK(stats_in.numel() == 2 && stats_in.scalar_type() == acc_type,
              "fastops.cbam_backward: stats must be (2,) ", acc_type);
  const at::Tensor go = grad_out_in.contiguous(fmt), pooled = pooled_in.contiguous(), spatial = spatial_in.contiguous();
  const at::Tensor w1 = fc1_w.contiguous(), w2 = fc2_w.contiguous();
  const int64_t C = g.C, HW = g.HW, R = w1.size(0), sz = C * HW, K2 = g.K * g.K;
  at::Tensor gx = at::empty_like(x, fmt);
  at::Tensor gw1 = at::empty_like(w1), gb1 = at::empty({R}, w1.options());
  at::Tensor gw2 = at::empty_like(w2), gb2 = at::empty({C}, w2.options());
  at::Tensor gcw = at::empty_like(conv_w, at::MemoryFormat::Contiguous);
  at::Tensor gbw = at::empty_like(bn_w), gbb = at::empty_like(bn_b);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cbam_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const attn::Mlp<acc_t> mlp(w1, fc1_b, w2, fc2_b, scalar_t{});
    const std::vector<acc_t> cw = to_acc<scalar_t, acc_t>(conv_w);
    const double gamma = bn_w.item<double>(), beta = bn_b.item<double>();
    const at::Tensor st = stats_in.contiguous();
    const acc_t* pst = st.data_ptr<acc_t>();
    // The spatial branch (maps of N*H*W values) runs in double: its BN gradients are sums that cancel by
    // construction (sum du = sum du * vhat = 0 in training), and the cost is negligible.
    using red_t = attn::red_t;
    const red_t mean = pst[0], rstd = red_t(1) / std::sqrt(red_t(pst[1]) + eps);
    const scalar_t *px = x.data_ptr<scalar_t>(), *pgo = go.data_ptr<scalar_t>();
    scalar_t* pgx = gx.data_ptr<scalar_t>();
    const acc_t *pp = pooled.data_ptr<acc_t>(), *ps = spatial.data_ptr<acc_t>();
    // Per sample: MLP activations for the avg and max branches (z1, h: (2, R); hs (R), the summed fc2
    // output zs (C), see Mlp::forward_pairs), the gate (ca, its slope), per-pixel values (vhat, sa, dv, du,
    // tie counts, ds (2, HW)), per-channel dca, dp (2, C) and the gradients each sample adds to the MLP
    // weights (dz1 (2, R), dzs (C)) and the conv weight.
    std::vector<acc_t> z1(g.N * 2 * R), h(g.N * 2 * R), hs(g.N * R), ca(g.N * C), dgate(g.N * C), dca(g.N * C),
        dp(g.N * 2 * C), dz1(g.N * 2 * R), dzs(g.N * C), sa(g.N * HW), ties(g.N * HW), coef_mean(g.N * HW),
        coef_max(g.N * HW);
    std::vector<red_t> vhat(g.N * HW), dv(g.N * HW), du(g.N * HW), ds(g.N * 2 * HW), gcw_n(g.N * 2 * K2, red_t(0));
    red_t mdv = 0, mdvv = 0;

    // The channel gates of all samples from the pooled maps (no pass over x): the avg and max branches of
    // every sample as one batch, the threads splitting the weights.
    mlp.forward_pairs(act, g.N, pp, z1.data(), h.data(), hs.data(), ca.data(), true);
    std::fill(dgate.begin(), dgate.end(), acc_t(1));
    attn::act_inplace<acc_t>(gate, ca.data(), dgate.data(), g.N * C);
    // dsa[q] = sum_c go * x * ca, the tie count of the channel max, and dv = dsa * gate'(v)
    auto pixel_pass = attn::range(HW, attn::grain_for(C), [&](int64_t n, int64_t q0, int64_t q1) {
      const scalar_t *xs = px + n * sz, *gs = pgo + n * sz;
      const acc_t *can = &ca[n * C], *smax = ps + n * 2 * HW + HW;
      std::vector<red_t> ub(q1 - q0);
      spatial_conv(g, ps + n * 2 * HW, cw.data(), q0, q1, ub.data());
      std::vector<red_t> dsa(q1 - q0, red_t(0));
      std::vector<acc_t> cnt(q1 - q0, acc_t(0));
      auto add = [&](int64_t c, int64_t q, int64_t o, red_t& s, acc_t& k) {
        const acc_t v = static_cast<acc_t>(xs[o]) * can[c];
        s += red_t(static_cast<acc_t>(gs[o])) * v;
        k += v == smax[q] ? acc_t(1) : acc_t(0);
      };
      // The loops nest so that the inner one is contiguous. channels_last sums a pixel's channels in fp32
      // lanes over blocks of kBlock channels, the blocks in double (as the forward's channel_pool does): one
      // double add chain through every channel would run at one add latency per value.
      if (g.cl) {
        using V = simd::Vec<acc_t>;
        constexpr int64_t kBlock = 16 * V::N;
        for (int64_t q = q0; q < q1; ++q) {
          const scalar_t *xq = xs + q * C, *gq = gs + q * C;
          const typename V::V mq = V::splat(smax[q]);
          typename V::V kv = V::splat(0);
          red_t s = 0;
          acc_t k = 0;
          int64_t c = 0;
          while (c + V::N <= C) {
            typename V::V sv = V::splat(0);
            for (const int64_t end = std::min(C, c + kBlock); c + V::N <= end; c += V::N) {
              const typename V::V v = V::load_from(xq + c) * V::load(can + c);
              sv += V::load_from(gq + c) * v;
              kv += v == mq ? V::splat(1) : V::splat(0);
            }
            s += V::sum(sv);
          }
          k = V::sum(kv);
          for (; c < C; ++c) add(c, q, q * C + c, s, k);
          dsa[q - q0] = s;
          cnt[q - q0] = k;
        }
      } else {
        for (int64_t c = 0; c < C; ++c)
          for (int64_t q = q0; q < q1; ++q) add(c, q, c * HW + q, dsa[q - q0], cnt[q - q0]);
      }
      for (int64_t q = q0; q < q1; ++q) {
        const red_t vh = (ub[q - q0] - mean) * rstd;
        const red_t z = vh * gamma + beta;
        vhat[n * HW + q] = vh;
        sa[n * HW + q] = static_cast<acc_t>(attn::act_fwd(gate, z));
        dv[n * HW + q] = dsa[q - q0] * attn::act_grad(gate, z);
        ties[n * HW + q] = cnt[q - q0];
      }
    });
    auto bn_back = attn::range(HW, 4096, [&](int64_t n, int64_t q0, int64_t q1) {
      for (int64_t q = n * HW + q0; q < n * HW + q1; ++q)
        du[q] = training ? rstd * gamma * (dv[q] - mdv - vhat[q] * mdvv) : dv[q] * gamma * rstd;
    });
    auto conv_back = attn::range(HW, attn::grain_for(2 * K2), [&](int64_t n, int64_t q0, int64_t q1) {
      red_t* dsn = &ds[n * 2 * HW];
      spatial_conv_transpose(g, &du[n * HW], cw.data(), q0, q1, dsn);
      for (int64_t q = q0; q < q1; ++q) {  // what each channel's x1 receives from the mean and the max
        coef_mean[n * HW + q] = static_cast<acc_t>(dsn[q] / C);
        coef_max[n * HW + q] = static_cast<acc_t>(dsn[HW + q] / ties[n * HW + q]);
      }
    });
    auto conv_wgrad = attn::serial([&](int64_t n) {
      spatial_conv_weight_grad(g, ps + n * 2 * HW, &du[n * HW], &gcw_n[n * 2 * K2]);
    });
    // dx1 = go * sa + ds0 / C + ds1 * [tie] / ties;  dca = sum_q dx1 * x;  gx = dx1 * ca
    auto channel_pass = attn::range(C, attn::grain_for(HW), [&](int64_t n, int64_t c0, int64_t c1) {
      const scalar_t *xs = px + n * sz, *gs = pgo + n * sz;
      scalar_t* gxs = pgx + n * sz;
      const acc_t *can = &ca[n * C], *san = &sa[n * HW], *cmean = &coef_mean[n * HW], *cmax = &coef_max[n * HW];
      const acc_t* smax = ps + n * 2 * HW + HW;
      using V = simd::Vec<acc_t>;
      using D = simd::Vec<red_t>;
      // Element o = (c, q): writes gx and returns its term of dca[c]. Whole vectors run the same arithmetic
      // below: along q (NCHW, dca[c] summed in double lanes) or along c (channels_last, one double sum per
      // channel); the fp32 product d * x is widened before it is added.
      auto one = [&](int64_t c, int64_t q, int64_t o) {
        const acc_t xv = static_cast<acc_t>(xs[o]), v = xv * can[c];
        const acc_t d0 = static_cast<acc_t>(gs[o]) * san[q] + cmean[q];
        const acc_t d = d0 + (v == smax[q] ? cmax[q] : acc_t(0));
        gxs[o] = static_cast<scalar_t>(d * can[c]);
        return static_cast<red_t>(d * xv);
      };
      const typename V::V zero = V::splat(0);
      if (!g.cl) {
        for (int64_t c = c0; c < c1; ++c) {
          const scalar_t *xc = xs + c * HW, *gc = gs + c * HW;
          scalar_t* gxc = gxs + c * HW;
          const typename V::V kc = V::splat(can[c]);
          typename D::V lo = D::splat(0), hi = lo;
          int64_t q = 0;
          for (; q + V::N <= HW; q += V::N) {
            const typename V::V xv = V::load_from(xc + q), v = xv * kc;
            typename V::V d = V::load_from(gc + q) * V::load(san + q) + V::load(cmean + q);
            d += v == V::load(smax + q) ? V::load(cmax + q) : zero;
            simd::add_widened<acc_t>(lo, hi, d * xv);
            V::store_to(gxc + q, d * kc);
          }
          red_t t = D::sum(lo + hi);
          for (; q < HW; ++q) t += one(c, q, c * HW + q);
          dca[n * C + c] = static_cast<acc_t>(t);
        }
      } else {
        std::vector<red_t> acc(c1 - c0, red_t(0));
        for (int64_t q = 0; q < HW; ++q) {
          const scalar_t *xq = xs + q * C, *gq = gs + q * C;
          scalar_t* gxq = gxs + q * C;
          const typename V::V sq = V::splat(san[q]), cm = V::splat(cmean[q]), mq = V::splat(smax[q]),
                              cx = V::splat(cmax[q]);
          int64_t c = c0;
          for (; c + V::N <= c1; c += V::N) {
            const typename V::V kc = V::load(can + c), xv = V::load_from(xq + c), v = xv * kc;
            typename V::V d = V::load_from(gq + c) * sq + cm;
            d += v == mq ? cx : zero;
            red_t* a = &acc[c - c0];
            typename D::V lo = D::load(a), hi = D::splat(0);
            if constexpr (V::N != D::N) hi = D::load(a + D::N);
            simd::add_widened<acc_t>(lo, hi, d * xv);
            D::store(a, lo);
            if constexpr (V::N != D::N) D::store(a + D::N, hi);
            V::store_to(gxq + c, d * kc);
          }
          for (; c < c1; ++c) acc[c - c0] += one(c, q, q * C + c);
        }
        for (int64_t c = c0; c < c1; ++c) dca[n * C + c] = static_cast<acc_t>(acc[c - c0]);
      }
    });
    // The MLP backward of samples [n0, n1), both branches: dzs = dca * gate'.
    auto mlp_back_of = [&](int64_t n0, int64_t n1, bool split) {
      for (int64_t i = n0 * C; i < n1 * C; ++i) dzs[i] = dca[i] * dgate[i];
      mlp.backward_pairs(act, n1 - n0, &z1[n0 * 2 * R], &dzs[n0 * C], &dz1[n0 * 2 * R], &dp[n0 * 2 * C], split);
    };
    auto mlp_back = attn::serial([&](int64_t n) { mlp_back_of(n, n + 1, false); });
    // gx += dpavg / HW + dpmax * [x == max_hw] / ties, channels [c0, c1)
    auto pool_back = attn::range(C, attn::grain_for(HW), [&](int64_t n, int64_t c0, int64_t c1) {
      const scalar_t* xs = px + n * sz;
      scalar_t* gxs = pgx + n * sz;
      const acc_t *pmax = pp + n * 2 * C + C, *dpa = &dp[n * 2 * C], *dpm = dpa + C;
      // Integer tie counts and a select instead of a branch: both let the compiler vectorise these loops.
      std::vector<int64_t> cnt(c1 - c0, 0);
      if (!g.cl) {
        for (int64_t c = c0; c < c1; ++c) {
          int64_t k = 0;
          for (int64_t q = 0; q < HW; ++q) k += static_cast<acc_t>(xs[c * HW + q]) == pmax[c];
          cnt[c - c0] = k;
        }
      } else {
        for (int64_t q = 0; q < HW; ++q) {
          const scalar_t* xq = xs + q * C;  // hoisted: an int64 store into cnt might alias C, and a gather follows
          for (int64_t c = c0; c < c1; ++c) cnt[c - c0] += static_cast<acc_t>(xq[c]) == pmax[c];
        }
      }
      const acc_t inv_hw = acc_t(1) / static_cast<acc_t>(HW);
      std::vector<acc_t> base(c1 - c0), tie(c1 - c0);
      for (int64_t c = c0; c < c1; ++c) {
        base[c - c0] = dpa[c] * inv_hw;
        tie[c - c0] = cnt[c - c0] > 0 ? dpm[c] / static_cast<acc_t>(cnt[c - c0]) : acc_t(0);
      }
      // element o of channel c; offsets spelled out per layout so that the compiler sees unit-stride inner
      // loops (through a layout-generic index it gathers)
      auto one = [&](int64_t c, int64_t o) {
        const acc_t d = static_cast<acc_t>(gxs[o]) + base[c - c0];
        gxs[o] = static_cast<scalar_t>(d + (static_cast<acc_t>(xs[o]) == pmax[c] ? tie[c - c0] : acc_t(0)));
      };
      if (!g.cl) {
        for (int64_t c = c0; c < c1; ++c)
          for (int64_t q = 0; q < HW; ++q) one(c, c * HW + q);
      } else {
        for (int64_t q = 0; q < HW; ++q)
          for (int64_t c = c0; c < c1; ++c) one(c, q * C + c);
      }
    });

    attn::per_sample(g.N, pixel_pass);
    double sdv = 0, sdvv = 0;
    for (int64_t i = 0; i < g.N * HW; ++i) {
      sdv += dv[i];
      sdvv += dv[i] * vhat[i];
    }
    mdv = sdv / static_cast<double>(g.N * HW);
    mdvv = sdvv / static_cast<double>(g.N * HW);
    // Up to twice the cache share (x and grad_out together), x stays in cache between channel_pass and
    // pool_back: the MLP backward of all samples runs between them with the threads splitting the weights.
    // Larger tensors go sample by sample.
    if (2 * static_cast<int64_t>(x.nbytes()) <= 2 * simd::llc_share_bytes()) {
      attn::per_sample(g.N, bn_back, conv_back, conv_wgrad, channel_pass);
      mlp_back_of(0, g.N, true);
      attn::per_sample(g.N, pool_back);
    } else {
      attn::per_sample(g.N, bn_back, conv_back, conv_wgrad, channel_pass, mlp_back, pool_back);
    }

    gbb.fill_(sdv);
    gbw.fill_(sdvv);
    scalar_t* pgcw = gcw.data_ptr<scalar_t>();
    for (int64_t i = 0; i < 2 * K2; ++i) {
      red_t s = 0;
      for (int64_t n = 0; n < g.N; ++n) s += gcw_n[n * 2 * K2 + i];
      pgcw[i] = static_cast<scalar_t>(s);
    }
    // fc2 saw hs with bias 2 b2: its weight gradient sums dzs hs^T, its bias gradient twice dzs
    attn::linear_weight_grad<scalar_t, acc_t>(g.N, C, R, dzs.data(), hs.data(), gw2, gb2);
    gb2.mul_(2);
    attn::linear_weight_grad<scalar_t, acc_t>(2 * g.N, R, C, dz1.data(), pp, gw1, gb1);
  });
  return {gx, gw1, gb1, gw2, gb2, gcw, gbw, gbb};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastops, CPU, m) {
  m.impl("cbam", &cbam_cpu);
  m.impl("cbam_backward", &cbam_backward_cpu);
}

}  // namespace fastops
