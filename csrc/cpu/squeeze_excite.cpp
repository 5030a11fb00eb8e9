// Squeeze-and-excitation on the CPU: forward and backward, NCHW and channels_last, float / double / half / bf16.
//
// out = out_act(x * gate(W2 act(W1 mean_hw(x) + b1) + b2) + residual)
//
// x is pooled (one read), the MLP evaluated for all samples with the threads splitting its weights, then x
// scaled (second read, from the cache). An x too large for the cache goes in blocks of samples instead, each
// pooled, its MLP run, and scaled while its slice is still in cache (with at least as many samples as
// threads each thread owns whole samples). The residual add and the final activation happen in the scale
// pass, whose output goes around the cache when it is too large to stay there (stream_store.h).
// Accumulation in at::opmath_type<T>.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "cpu/channel_attn.h"
#include "cpu/stream_store.h"

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
      // Four independent sums: one chain of dependent adds runs at one vector per add latency, below
      // the bandwidth of a plane that is already in cache.
      typename V::V s = V::splat(0), s1 = s, s2 = s, s3 = s;
      int64_t i = 0;
      for (; i + 4 * V::N <= g.HW; i += 4 * V::N) {
        s += V::load_from(p + i);
        s1 += V::load_from(p + i + V::N);
        s2 += V::load_from(p + i + 2 * V::N);
        s3 += V::load_from(p + i + 3 * V::N);
      }
      for (; i + V::N <= g.HW; i += V::N) s += V::load_from(p + i);
      acc_t t = V::sum((s + s1) + (s2 + s3));
      for (; i < g.HW; ++i) t += static_cast<acc_t>(p[i]);
      acc[c - c0] = t;
    }
  } else {
    // Four pixels of float / half / bf16 are added in float before one add into the double sums: the sums'
    // loads and stores in L1, one pair per pixel and channel otherwise, would cost more than reading x.
    using F = simd::Vec<float>;
    static_assert(F::N == 2 * V::N, "a float vector converts to two double vectors");
    for (int64_t c = c0; c < c1; ++c) acc[c - c0] = 0;
    int64_t q = 0;
    if constexpr (!std::is_same_v<scalar_t, double>) {
      for (; q + 4 <= g.HW; q += 4) {
        const scalar_t *p0 = xs + q * g.C, *p1 = p0 + g.C, *p2 = p1 + g.C, *p3 = p2 + g.C;
        int64_t c = c0;
        for (; c + F::N <= c1; c += F::N) {
          const typename F::V f = (F::load_from(p0 + c) + F::load_from(p1 + c)) +
                                  (F::load_from(p2 + c) + F::load_from(p3 + c));
          typename V::V lo, hi;
          for (int i = 0; i < V::N; ++i) lo[i] = f[i], hi[i] = f[V::N + i];
          V::store(acc + c - c0, V::load(acc + c - c0) + lo);
          V::store(acc + c - c0 + V::N, V::load(acc + c - c0 + V::N) + hi);
        }
        auto f32 = [](scalar_t v) { return static_cast<float>(v); };
        for (; c < c1; ++c) acc[c - c0] += static_cast<acc_t>((f32(p0[c]) + f32(p1[c])) + (f32(p2[c]) + f32(p3[c])));
      }
    }
    for (; q < g.HW; ++q) {
      const scalar_t* p = xs + q * g.C;
      for (int64_t c = c0; c < c1; ++c) acc[c - c0] += static_cast<acc_t>(p[c]);
    }
  }
}

// out = oact(x * gate[c] + r) over [b, e) of one sample: channels (NCHW) or pixels (channels_last), so
// that every written run is a whole plane or a whole pixel; r may be null. kStream: the output bypasses
// the cache (see stream_store.h).
template <bool kStream, bool kRelu, typename scalar_t, typename acc_t>
void scale(const SeGeom& g, const scalar_t* xs, const scalar_t* rs, const acc_t* gate, int64_t b, int64_t e,
           scalar_t* ys) {
  using Vec = simd::Vec<acc_t>;
  using V = typename Vec::V;
  auto out_act = [](auto y) {
    if constexpr (kRelu) return decltype(y)(y > 0 ? y : decltype(y){});
    else return y;
  };
  // One contiguous run of n values starting at offset o; value i is scaled by gate_vec(i) / gate_one(i).
  auto run = [&](int64_t o, int64_t n, auto gate_vec, auto gate_one) {
    const scalar_t* x = xs + o;
    const scalar_t* r = rs ? rs + o : nullptr;
    simd::write_row<kStream, acc_t>(
        ys + o, n,
        [&](int64_t i) {
          V y = Vec::load_from(x + i) * gate_vec(i);
          if (r) y += Vec::load_from(r + i);
          return out_act(y);
        },
        [&](int64_t i) {
          acc_t y = static_cast<acc_t>(x[i]) * gate_one(i);
          if (r) y += static_cast<acc_t>(r[i]);
          return out_act(y);
        });
  };
  if (!g.cl) {
    for (int64_t c = b; c < e; ++c) {
      const acc_t gc = gate[c];
      const V gv = Vec::splat(gc);
      run(c * g.HW, g.HW, [&](int64_t) { return gv; }, [&](int64_t) { return gc; });
    }
  } else {
    for (int64_t q = b; q < e; ++q)
      run(q * g.C, g.C, [&](int64_t i) { return Vec::load(gate + i); }, [&](int64_t i) { return gate[i]; });
  }
  if (kStream) simd::stream_fence();
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
    const auto pool = attn::range(C, attn::grain_for(g.HW), [&](int64_t n, int64_t c0, int64_t c1) {
      std::vector<attn::red_t> sums(c1 - c0);
      pool_sum(g, px + n * sz, c0, c1, sums.data());
      for (int64_t c = c0; c < c1; ++c) pp[n * C + c] = static_cast<acc_t>(sums[c - c0] / g.HW);
    });
    auto scale_pass = [&](auto stream, auto relu) {
      const int64_t extent = g.cl ? g.HW : C, grain = attn::grain_for(g.cl ? C : g.HW);
      return attn::range(extent, grain, [&, stream, relu](int64_t n, int64_t b, int64_t e) {
        scale<decltype(stream)::value, decltype(relu)::value>(g, px + n * sz, pr ? pr + n * sz : nullptr, &gt[n * C],
                                                               b, e, py + n * sz);
      });
    };
    // Up to twice the cache share, x stays in cache between the two passes whatever their order: pool every
    // sample, run the MLP of all samples with the threads splitting its weight rows (each weight read once,
    // not once per thread), then scale. A larger x goes in blocks of samples whose slices fit a quarter of
    // the share together: a block is pooled, its MLP run at once (weights read once per block) and scaled
    // while its slice of x is still in cache.
    const bool whole = static_cast<int64_t>(x.nbytes()) <= 2 * simd::llc_share_bytes();
    const int64_t B = std::max<int64_t>(
        1, simd::llc_share_bytes() / 4 / std::max<int64_t>(1, sz * static_cast<int64_t>(sizeof(scalar_t))));
    auto run = [&](auto stream, auto relu) {
      if (whole) {
        attn::per_sample(g.N, pool);
        mlp.forward_parallel(act, gate, g.N, pp, z1.data(), h.data(), gt.data());
        attn::per_sample(g.N, scale_pass(stream, relu));
      } else {
        attn::per_block(g.N, B, pool,
                        attn::block([&](int64_t n0, int64_t n1) {
                          mlp.forward_batch(act, n1 - n0, pp + n0 * C, &z1[n0 * R], &h[n0 * R], &gt[n0 * C]);
                          for (int64_t i = n0 * C; i < n1 * C; ++i) gt[i] = attn::act_fwd(gate, gt[i]);
                        }),
                        scale_pass(stream, relu));
      }
    };
    using T = std::true_type;
    using F = std::false_type;
    const bool stream = simd::should_stream(out.nbytes()), relu = out_act == Act::kRelu;
    if (stream && relu) run(T{}, T{});
    else if (stream) run(T{}, F{});
    else if (relu) run(F{}, T{});
    else run(F{}, F{});
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
    // dg[c] = sum_p dy * x  (kept in dz2 until the gate's backward turns it into dz2)
    const auto dgate_pass = attn::range(C, attn::grain_for(g.HW), [&](int64_t n, int64_t c0, int64_t c1) {
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
    });
    // On entry gt holds z2 = W2 h + b2 and dz2 holds dg, over elements [i0, i1) of (N, C); on exit gt holds
    // the gate and dz2 = dg * gate'(z2).
    auto gate_back = [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        dz2[i] *= attn::act_grad(gate, gt[i]);
        gt[i] = attn::act_fwd(gate, gt[i]);
      }
    };
    // gx = dy * gate[c] + dp[c] / HW; grad_residual = dy
    const auto gx_pass = attn::range(C, attn::grain_for(g.HW), [&](int64_t n, int64_t c0, int64_t c1) {
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
    });
    // The same two schedules as the forward, for the tensors the first pass reads (dy, x and, under relu,
    // out), of which the second re-reads dy and out: all samples' first pass, the MLP and its backward for
    // all samples with the threads splitting the weights, then the second pass; or, for larger tensors,
    // blocks of samples that run both passes and their MLP while their slices are in cache.
    const int64_t read_bytes = (relu ? 3 : 2) * static_cast<int64_t>(x.nbytes());
    if (read_bytes <= 2 * simd::llc_share_bytes()) {
      attn::per_sample(g.N, dgate_pass);
      mlp.forward_parallel(act, Act::kNone, g.N, pp, z1.data(), h.data(), gt.data());
      at::parallel_for(0, g.N * C, attn::grain_for(64), gate_back);
      mlp.backward_parallel(act, g.N, z1.data(), dz2.data(), dz1.data(), dp.data());
      for (auto& v : dp) v *= inv_hw;
      attn::per_sample(g.N, gx_pass);
    } else {
      const int64_t B = std::max<int64_t>(1, simd::llc_share_bytes() / 4 / std::max<int64_t>(1, read_bytes / g.N));
      attn::per_block(g.N, B, dgate_pass,
                      attn::block([&](int64_t n0, int64_t n1) {
                        const int64_t K = n1 - n0;
                        mlp.forward_batch(act, K, pp + n0 * C, &z1[n0 * R], &h[n0 * R], &gt[n0 * C]);
                        gate_back(n0 * C, n1 * C);
                        mlp.backward_batch(act, K, &z1[n0 * R], &dz2[n0 * C], &dz1[n0 * R], &dp[n0 * C]);
                        for (int64_t i = n0 * C; i < n1 * C; ++i) dp[i] *= inv_hw;
                      }),
                      gx_pass);
    }
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
