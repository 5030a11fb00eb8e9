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
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "cpu/channel_attn.h"
#include "cpu/gemm_kernels.h"
#include "cpu/stream_store.h"

namespace fastops {
namespace {

using attn::Act;
using attn::dense;

struct SeGeom {
  int64_t N, C, HW;
  bool cl;  // channels_last: element (n, c, p) at n*C*HW + p*C + c; else n*C*HW + c*HW + p
};

// Sums over the pixels of channels [c0, c1) of one sample, into acc[c - c0], of a value given per element
// offset o (n * C * HW excluded): vec(o) = the values at o .. o + N - 1 along the row (a plane in NCHW, a
// pixel's channels in channels_last) as Vec<T>, one(o) = the value at o. T is float, double for double x.
template <typename T, typename VecFn, typename OneFn>
void channel_sums(const SeGeom& g, int64_t c0, int64_t c1, attn::red_t* acc, VecFn vec, OneFn one) {
  using D = simd::Vec<attn::red_t>;
  using F = simd::Vec<T>;
  const auto add = simd::add_widened<T>;
  if (!g.cl) {
    // Four consecutive vectors of a plane are added in T before one add into the double sums: widening every
    // vector would cost more than reading x.
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t o = c * g.HW;
      typename D::V lo = D::splat(0), hi = lo;
      int64_t i = 0;
      for (; i + 4 * F::N <= g.HW; i += 4 * F::N)
        add(lo, hi, (vec(o + i) + vec(o + i + F::N)) + (vec(o + i + 2 * F::N) + vec(o + i + 3 * F::N)));
      for (; i + F::N <= g.HW; i += F::N) add(lo, hi, vec(o + i));
      attn::red_t t = D::sum(lo + hi);
      for (; i < g.HW; ++i) t += static_cast<attn::red_t>(one(o + i));
      acc[c - c0] = t;
    }
    return;
  }
  // channels_last: blocks of pixels, a few vectors of channels at a time with their sums in registers: eight
  // pixels added in T (two partial sums), then into double sums, like the four-pixel groups above. A block is
  // min(8192, 8 (c1 - c0)) elements of x (64 pixels of conv1x1_squeeze_excite's 64-channel units, 32 of a
  // 256-channel row, 8 of rows from 1024 channels up), so that it stays in L1 or L2 while the register blocks
  // pass over it. In a standalone test of the two loops on a 2-core EPYC this read x faster, from memory and
  // from cache, than adding every four pixels into double sums kept in memory, which wide rows did before.
  for (int64_t c = c0; c < c1; ++c) acc[c - c0] = 0;
  const int64_t q_block = std::clamp<int64_t>(8192 / (c1 - c0) / 8 * 8, 8, 64);
  auto block = [&](auto nv, int64_t c, int64_t q0, int64_t q1) {
    constexpr int NV = decltype(nv)::value;
    typename D::V lo[NV], hi[NV];
    for (int j = 0; j < NV; ++j) {
      lo[j] = D::load(acc + c - c0 + j * F::N);
      hi[j] = F::N != D::N ? D::load(acc + c - c0 + j * F::N + D::N) : D::splat(0);
    }
    for (int64_t p0 = q0; p0 < q1; p0 += 8) {
      const int64_t p1 = std::min(q1, p0 + 8);
      typename F::V s0[NV], s1[NV];
      for (int j = 0; j < NV; ++j) s0[j] = s1[j] = F::splat(0);
      int64_t q = p0;
      for (; q + 2 <= p1; q += 2)
        for (int j = 0; j < NV; ++j) {
          s0[j] += vec(q * g.C + c + j * F::N);
          s1[j] += vec((q + 1) * g.C + c + j * F::N);
        }
      if (q < p1)
        for (int j = 0; j < NV; ++j) s0[j] += vec(q * g.C + c + j * F::N);
      for (int j = 0; j < NV; ++j) add(lo[j], hi[j], s0[j] + s1[j]);
    }
    for (int j = 0; j < NV; ++j) {
      D::store(acc + c - c0 + j * F::N, lo[j]);
      if constexpr (F::N != D::N) D::store(acc + c - c0 + j * F::N + D::N, hi[j]);
    }
  };
  for (int64_t q0 = 0; q0 < g.HW; q0 += q_block) {
    const int64_t q1 = std::min(g.HW, q0 + q_block);
    int64_t c = c0;
    for (; c + 2 * F::N <= c1; c += 2 * F::N) block(std::integral_constant<int, 2>{}, c, q0, q1);
    for (; c + F::N <= c1; c += F::N) block(std::integral_constant<int, 1>{}, c, q0, q1);
    for (; c < c1; ++c)
      for (int64_t q = q0; q < q1; ++q) acc[c - c0] += static_cast<attn::red_t>(one(q * g.C + c));
  }
}

// fn(stream, relu) with both flags as std::bool_constant, so that the passes compile once per combination.
template <typename Fn>
void with_flags(bool stream, bool relu, const Fn& fn) {
  using T = std::true_type;
  using F = std::false_type;
  if (stream && relu) fn(T{}, T{});
  else if (stream) fn(T{}, F{});
  else if (relu) fn(F{}, T{});
  else fn(F{}, F{});
}

// Calls run(o, n, at_vec, at_one) for each contiguous row of [b, e) of one sample: whole planes (NCHW, b / e
// are channels) or whole pixels (channels_last, b / e are pixels), o its offset, n its length. at_vec(v, i) /
// at_one(v, i) give a per-channel vector v's values for the row's values from i (a splat of v[c] in NCHW).
template <typename acc_t, typename Run>
void for_each_row(const SeGeom& g, int64_t b, int64_t e, const Run& run) {
  using Vec = simd::Vec<acc_t>;
  if (!g.cl) {
    for (int64_t c = b; c < e; ++c)
      run(c * g.HW, g.HW, [c](const acc_t* v, int64_t) { return Vec::splat(v[c]); },
          [c](const acc_t* v, int64_t) { return v[c]; });
  } else {
    for (int64_t q = b; q < e; ++q)
      run(q * g.C, g.C, [](const acc_t* v, int64_t i) { return Vec::load(v + i); },
          [](const acc_t* v, int64_t i) { return v[i]; });
  }
}

// out = oact(x * gate[c] + r) over [b, e) of one sample (for_each_row's rows); r may be null. kStream: the
// output bypasses the cache (see stream_store.h).
template <bool kStream, bool kRelu, typename scalar_t, typename acc_t>
void scale(const SeGeom& g, const scalar_t* xs, const scalar_t* rs, const acc_t* gate, int64_t b, int64_t e,
           scalar_t* ys) {
  using Vec = simd::Vec<acc_t>;
  using V = typename Vec::V;
  auto out_act = [](auto y) {
    if constexpr (kRelu) return decltype(y)(y < 0 ? decltype(y){} : y);  // NaN stays NaN, as torch.relu
    else return y;
  };
  for_each_row<acc_t>(g, b, e, [&](int64_t o, int64_t n, auto at_vec, auto at_one) {
    const scalar_t* x = xs + o;
    const scalar_t* r = rs ? rs + o : nullptr;
    simd::write_row<kStream, acc_t>(
        ys + o, n,
        [&](int64_t i) {
          V y = Vec::load_from(x + i) * at_vec(gate, i);
          if (r) y += Vec::load_from(r + i);
          return out_act(y);
        },
        [&](int64_t i) {
          acc_t y = static_cast<acc_t>(x[i]) * at_one(gate, i);
          if (r) y += static_cast<acc_t>(r[i]);
          return out_act(y);
        });
  });
  if (kStream) simd::stream_fence();
}

// The backward's second pass over [b, e) of one sample (for_each_row's rows): gx = dy * gate[c] + dp[c] and,
// when gr is set, grad_residual = dy, where dy = go, or go where out > 0 under kRelu.
template <bool kStream, bool kRelu, typename scalar_t, typename acc_t>
void grad_x(const SeGeom& g, const scalar_t* gos, const scalar_t* outs, const acc_t* gate, const acc_t* dp,
            int64_t b, int64_t e, scalar_t* gxs, scalar_t* grs) {
  using Vec = simd::Vec<acc_t>;
  for_each_row<acc_t>(g, b, e, [&](int64_t o, int64_t n, auto at_vec, auto at_one) {
    const scalar_t *go = gos + o, *out = outs + o;
    auto dy_vec = [&](int64_t i) {
      const auto d = Vec::load_from(go + i);
      if constexpr (kRelu) return decltype(d)(Vec::load_from(out + i) > 0 ? d : Vec::splat(0));
      else return d;
    };
    auto dy_one = [&](int64_t i) {
      const acc_t d = static_cast<acc_t>(go[i]);
      return (!kRelu || static_cast<acc_t>(out[i]) > 0) ? d : acc_t(0);
    };
    simd::write_row<kStream, acc_t>(
        gxs + o, n, [&](int64_t i) { return dy_vec(i) * at_vec(gate, i) + at_vec(dp, i); },
        [&](int64_t i) { return dy_one(i) * at_one(gate, i) + at_one(dp, i); });
    if (grs) simd::write_row<kStream, acc_t>(grs + o, n, dy_vec, dy_one);
  });
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
    const attn::Mlp<acc_t> mlp(w1, fc1_b, w2, fc2_b, scalar_t{});
    const int64_t R = mlp.R, C = g.C, sz = C * g.HW;
    const scalar_t* px = x.data_ptr<scalar_t>();
    const scalar_t* pr = r.defined() ? r.data_ptr<scalar_t>() : nullptr;
    scalar_t* py = out.data_ptr<scalar_t>();
    acc_t* pp = pooled.data_ptr<acc_t>();
    std::vector<acc_t> z1(g.N * R), h(g.N * R), gt(g.N * C);
    const auto pool = attn::range(C, attn::grain_for(g.HW), [&](int64_t n, int64_t c0, int64_t c1) {
      std::vector<attn::red_t> sums(c1 - c0);
      const scalar_t* xs = px + n * sz;
      channel_sums<acc_t>(
          g, c0, c1, sums.data(), [xs](int64_t o) { return simd::Vec<acc_t>::load_from(xs + o); },
          [xs](int64_t o) { return static_cast<acc_t>(xs[o]); });
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
        mlp.forward(act, gate, g.N, pp, z1.data(), h.data(), gt.data(), true);
        attn::per_sample(g.N, scale_pass(stream, relu));
      } else {
        attn::per_block(g.N, B, pool,
                        attn::block([&](int64_t n0, int64_t n1) {
                          mlp.forward(act, gate, n1 - n0, pp + n0 * C, &z1[n0 * R], &h[n0 * R], &gt[n0 * C], false);
                        }),
                        scale_pass(stream, relu));
      }
    };
    with_flags(simd::should_stream(out.nbytes()), out_act == Act::kRelu, run);
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
    const attn::Mlp<acc_t> mlp(w1, fc1_b, w2, fc2_b, scalar_t{});
    const int64_t sz = C * g.HW;
    const scalar_t *px = x.data_ptr<scalar_t>(), *pgo = go.data_ptr<scalar_t>(), *pout = out.data_ptr<scalar_t>();
    scalar_t* pgx = gx.data_ptr<scalar_t>();
    scalar_t* pgr = has_residual ? gres.data_ptr<scalar_t>() : nullptr;
    const acc_t* pp = pooled.data_ptr<acc_t>();
    // Per sample: z1, h (R); gate value, dz2 (C); dz1 (R); dp (C).
    std::vector<acc_t> z1(g.N * R), h(g.N * R), gt(g.N * C), dz2(g.N * C), dz1(g.N * R), dp(g.N * C);
    const acc_t inv_hw = acc_t(1) / static_cast<acc_t>(g.HW);
    // On entry gt holds z2 = W2 h + b2 and dz2 holds dg, over elements [i0, i1) of (N, C); on exit gt holds
    // the gate and dz2 = dg * gate'(z2).
    auto gate_back = [&](int64_t i0, int64_t i1) { attn::act_inplace<acc_t>(gate, &gt[i0], &dz2[i0], i1 - i0); };
    auto run = [&](auto stream, auto relu_t) {
      constexpr bool kRelu = decltype(relu_t)::value;
      using Vec = simd::Vec<acc_t>;
      // dg[c] = sum_p dy * x  (kept in dz2 until gate_back turns it into dz2)
      const auto dgate_pass = attn::range(C, attn::grain_for(g.HW), [&](int64_t n, int64_t c0, int64_t c1) {
        const scalar_t *xs = px + n * sz, *gos = pgo + n * sz, *outs = pout + n * sz;
        std::vector<attn::red_t> sums(c1 - c0);
        channel_sums<acc_t>(
            g, c0, c1, sums.data(),
            [&](int64_t o) {
              auto d = Vec::load_from(gos + o);
              if constexpr (kRelu) d = Vec::load_from(outs + o) > 0 ? d : Vec::splat(0);
              return d * Vec::load_from(xs + o);
            },
            [&](int64_t o) {
              const acc_t d = (!kRelu || static_cast<acc_t>(outs[o]) > 0) ? static_cast<acc_t>(gos[o]) : acc_t(0);
              return d * static_cast<acc_t>(xs[o]);
            });
        for (int64_t c = c0; c < c1; ++c) dz2[n * C + c] = static_cast<acc_t>(sums[c - c0]);
      });
      // gx = dy * gate[c] + dp[c] / HW (dp already divided); grad_residual = dy
      const auto gx_pass = attn::range(g.cl ? g.HW : C, attn::grain_for(g.cl ? C : g.HW),
                                       [&](int64_t n, int64_t b, int64_t e) {
                                         grad_x<decltype(stream)::value, kRelu>(
                                             g, pgo + n * sz, pout + n * sz, &gt[n * C], &dp[n * C], b, e,
                                             pgx + n * sz, pgr ? pgr + n * sz : nullptr);
                                       });
      // The same two schedules as the forward, for the tensors the first pass reads (dy, x and, under relu,
      // out), of which the second re-reads dy and out: all samples' first pass, the MLP and its backward for
      // all samples with the threads splitting the weights, then the second pass; or, for larger tensors,
      // blocks of samples that run both passes and their MLP while their slices are in cache.
      const int64_t read_bytes = (kRelu ? 3 : 2) * static_cast<int64_t>(x.nbytes());
      if (read_bytes <= 2 * simd::llc_share_bytes()) {
        attn::per_sample(g.N, dgate_pass);
        mlp.forward(act, Act::kNone, g.N, pp, z1.data(), h.data(), gt.data(), true);
        at::parallel_for(0, g.N * C, attn::grain_for(64), gate_back);
        mlp.backward(act, g.N, z1.data(), dz2.data(), dz1.data(), dp.data(), true);
        for (auto& v : dp) v *= inv_hw;
        attn::per_sample(g.N, gx_pass);
      } else {
        const int64_t B =
            std::max<int64_t>(1, simd::llc_share_bytes() / 4 / std::max<int64_t>(1, read_bytes / g.N));
        attn::per_block(g.N, B, dgate_pass,
                        attn::block([&](int64_t n0, int64_t n1) {
                          const int64_t K = n1 - n0;
                          mlp.forward(act, Act::kNone, K, pp + n0 * C, &z1[n0 * R], &h[n0 * R], &gt[n0 * C], false);
                          gate_back(n0 * C, n1 * C);
                          mlp.backward(act, K, &z1[n0 * R], &dz2[n0 * C], &dz1[n0 * R], &dp[n0 * C], false);
                          for (int64_t i = n0 * C; i < n1 * C; ++i) dp[i] *= inv_hw;
                        }),
                        gx_pass);
      }
    };
    // grad_x and grad_residual are written around the cache when they are too large to stay there.
    with_flags(simd::should_stream(gx.nbytes()), out_act == Act::kRelu, run);
    attn::linear_weight_grad<scalar_t, acc_t>(g.N, C, R, dz2.data(), h.data(), gw2, gb2);
    attn::linear_weight_grad<scalar_t, acc_t>(g.N, R, C, dz1.data(), pp, gw1, gb1);
  });
  return {gx, gw1, gb1, gw2, gb2, gres};
}

// conv1x1_squeeze_excite: out = out_act(y * gate(W2 act(W1 mean_hw(y) + b1) + b2) + residual), y = W x + b.
//
// Inside SE-ResNet-50 (batch 8, 2 threads) the separate conv and SE write y to memory and read it twice more:
// the SE's tensors arrive from DRAM, and the SE took ~10% of the forward. The pooling commutes with the 1x1
// conv, mean_hw(W x + b) = W mean_hw(x) + b, so the gate is known before y exists: x (a quarter of y's size in
// a bottleneck) is pooled, the pooled y and the MLP follow for every sample, and then the conv's GEMM
// (gemm_kernels.h) runs once with the gate applied in its epilogue, ahead of the residual and out_act. y is
// never stored; the op moves what the conv with a fused residual would, plus one more read of x.
//
// That schedule serves fp32 with the GEMM's shapes (K <= gemm::kMaxK; NCHW also within kMaxNchwWeight and
// more than one pixel). Everything else runs the two CPU kernels in turn: fastops::conv_bias_act, then
// squeeze_excite.
bool conv_se_fused(const at::Tensor& x, int64_t Cout) {
  const int64_t K = x.size(1), P = x.size(2) * x.size(3);
  const bool shape_ok = K <= gemm::kMaxK && (is_channels_last(x) || (P > 1 && K * Cout <= gemm::kMaxNchwWeight));
  return gemm::kEnabled && x.scalar_type() == at::kFloat && shape_ok;
}

std::tuple<at::Tensor, at::Tensor> conv1x1_squeeze_excite_cpu(
    const at::Tensor& x_in, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& fc1_w, const c10::optional<at::Tensor>& fc1_b, const at::Tensor& fc2_w,
    const c10::optional<at::Tensor>& fc2_b, const c10::optional<at::Tensor>& residual, c10::string_view act_s,
    c10::string_view gate_s, c10::string_view out_act_s) {
  const char* op = "fastops.conv1x1_squeeze_excite";
  TORCH_CHECK(x_in.dim() == 4 && x_in.numel() > 0 && x_in.device().is_cpu(), op,
              ": x must be a non-empty 4-D (N, C_in, H, W) CPU tensor, got ", x_in.sizes());
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == x_in.size(1) && weight.size(2) == 1 && weight.size(3) == 1 &&
                  weight.size(0) >= 1 && weight.scalar_type() == x_in.scalar_type() && weight.device().is_cpu(),
              op, ": weight must be (C, C_in, 1, 1) with C_in = ", x_in.size(1), " and x's dtype, got ",
              weight.sizes(), " ", weight.scalar_type());
  const at::Tensor* b = bias.has_value() && bias->defined() ? &*bias : nullptr;
  const int64_t C = weight.size(0);
  const auto acc_type = x_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (b)
    TORCH_CHECK(b->dim() == 1 && b->size(0) == C && b->scalar_type() == acc_type && b->device().is_cpu(), op,
                ": bias must be (C,) = (", C, ",) ", acc_type, ", got ", b->sizes(), " ", b->scalar_type());
  const at::Tensor x = dense(x_in);
  const auto fmt = layout_of(x);
  at::Tensor out = at::empty({x.size(0), C, x.size(2), x.size(3)}, x.options().memory_format(fmt));
  attn::check_mlp_args(op, out, fc1_w, fc1_b, fc2_w, fc2_b);
  at::Tensor r;
  if (residual.has_value() && residual->defined()) {
    TORCH_CHECK(residual->sizes() == out.sizes() && residual->scalar_type() == x.scalar_type() &&
                    residual->device() == x.device(),
                op, ": residual must be (N, C, H, W) = ", out.sizes(), " with x's dtype, got ", residual->sizes());
    r = residual->contiguous(fmt);
  }
  if (!conv_se_fused(x, C)) {
    static const auto conv = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("fastops::conv_bias_act", "")
                                 .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                                   const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
                                                   at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t,
                                                   c10::string_view)>();
    const at::Tensor y = conv.call(x, weight, bias, c10::nullopt, {1, 1}, {0, 0, 0, 0}, {1, 1}, 1, "none");
    return squeeze_excite_cpu(y, fc1_w, fc1_b, fc2_w, fc2_b, r.defined() ? c10::optional<at::Tensor>(r) : c10::nullopt,
                              act_s, gate_s, out_act_s);
  }
  const Act act = attn::parse_act(act_s, "act", {Act::kRelu, Act::kSilu, Act::kGelu});
  const Act gate = attn::parse_act(gate_s, "gate", {Act::kSigmoid, Act::kHardSigmoid});
  const Act out_act = attn::parse_act(out_act_s, "out_act", {Act::kNone, Act::kRelu});
  const int64_t N = x.size(0), K = x.size(1), P = x.size(2) * x.size(3), Cp = gemm::packed_numel(C, 1);
  const SeGeom gx{1, K, P, fmt == at::MemoryFormat::ChannelsLast};
  // x's means per sample and input channel; the threads share (sample, block of channels) units, of 64
  // channels, or fewer (whole vectors) where there would be too few units for the threads (batch 1).
  const int64_t per = (K * N + at::get_num_threads() - 1) / at::get_num_threads();
  const int64_t block = std::clamp<int64_t>(per / simd::Vec<float>::N * simd::Vec<float>::N, simd::Vec<float>::N, 64);
  const int64_t blocks = (K + block - 1) / block;
  std::vector<float> mx(N * K);
  const float* px = x.data_ptr<float>();
  at::parallel_for(0, N * blocks, 1, [&](int64_t u0, int64_t u1) {
    std::vector<attn::red_t> sums(block);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t n = u / blocks, c0 = u % blocks * block, c1 = std::min(K, c0 + block);
      const float* xs = px + n * K * P;
      channel_sums<float>(
          gx, c0, c1, sums.data(), [xs](int64_t o) { return simd::Vec<float>::load(xs + o); },
          [xs](int64_t o) { return xs[o]; });
      for (int64_t c = c0; c < c1; ++c) mx[n * K + c] = static_cast<float>(sums[c - c0] / P);
    }
  });
  // pooled = W mean(x) + b for all samples, each row or panel of W read once for them.
  const at::Tensor wt = gemm::conv1x1_weight(weight, gx.cl);
  const std::vector<float> bv = gemm::padded_bias(b, C);
  at::Tensor pooled = at::empty({N, C}, x.options());
  float* pp = pooled.data_ptr<float>();
  if (gx.cl) {
    // On the GEMM's own panels (the threads split them), which the conv then finds in the cache: with W's rows
    // read here instead, the last stage's 4 MiB weight came from memory twice.
    const gemm::Args pa{mx.data(), K, wt.data_ptr<float>(), bv.data(), false, nullptr, pp, C, N, K, C, false, false};
    at::parallel_for(0, (C + gemm::kNR - 1) / gemm::kNR, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) gemm::panel_rows_any<bnact::Act::kNone>(pa, 0, N, p);
    });
  } else {
    attn::split_rows(true, C, K * N, [&](int64_t c0, int64_t c1) {
      attn::linear_rows(N, C, K, mx.data(), wt.data_ptr<float>(), bv.data(), pp, c0, c1);
    });
  }
  // The MLP for all samples, then the gates zero-padded per sample as the GEMM's epilogue reads them.
  const attn::Mlp<float> mlp(fc1_w, fc1_b, fc2_w, fc2_b, float{});
  std::vector<float> z1(N * mlp.R), h(N * mlp.R), gt(N * C), gates(N * Cp, 0.f);
  mlp.forward(act, gate, N, pp, z1.data(), h.data(), gt.data(), true);
  for (int64_t n = 0; n < N; ++n) std::copy(gt.begin() + n * C, gt.begin() + (n + 1) * C, gates.begin() + n * Cp);
  gemm::conv1x1(x, wt, C, bv.data(), r.defined() ? r.data_ptr<float>() : nullptr, gates.data(),
                out_act == Act::kRelu ? bnact::Act::kRelu : bnact::Act::kNone, gx.cl, out);
  return {out, pooled};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastops, CPU, m) {
  m.impl("squeeze_excite", &squeeze_excite_cpu);
  m.impl("conv1x1_squeeze_excite", &conv1x1_squeeze_excite_cpu);
  m.impl("squeeze_excite_backward", &squeeze_excite_backward_cpu);
}

}  // namespace fastops
