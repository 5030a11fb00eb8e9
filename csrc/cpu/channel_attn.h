// Pieces shared by the CPU channel-attention kernels (squeeze_excite.cpp, cbam.cpp): activations by
// name, the per-sample channel MLP and its backward, and the per-sample pipeline driver.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu/simd.h"

namespace fastops {
namespace attn {

// Sums over pixels (or channels) accumulate in double: their terms often cancel (zero-mean activations
// times zero-mean gradients), and a plain fp32 running sum then loses digits that PyTorch's pairwise
// sums keep. The loops are memory-bound, so the wider accumulator costs nothing measurable.
using red_t = double;

// x as the kernels read it: NCHW- or channels_last-contiguous (a strided view becomes an NCHW copy).
inline at::Tensor dense(const at::Tensor& t) {
  return (t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast)) ? t : t.contiguous();
}

// x (N, C, H, W) on the CPU and the channel MLP's fc1_weight (R, C), fc2_weight (C, R), optional biases (R,),
// (C,), all of x's dtype.
inline void check_mlp_args(const char* op, const at::Tensor& x, const at::Tensor& w1, const c10::optional<at::Tensor>& b1,
                const at::Tensor& w2, const c10::optional<at::Tensor>& b2) {
  TORCH_CHECK(x.dim() == 4 && x.numel() > 0, op, ": x must be a non-empty 4-D (N, C, H, W) tensor, got ", x.sizes());
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor here, got ", x.device());
  const int64_t C = x.size(1);
  TORCH_CHECK(w1.dim() == 2 && w1.size(1) == C && w1.size(0) >= 1, op, ": fc1_weight must be (R, C) with C = ", C,
              ", got ", w1.sizes());
  const int64_t R = w1.size(0);
  TORCH_CHECK(w2.dim() == 2 && w2.size(0) == C && w2.size(1) == R, op, ": fc2_weight must be (C, R) = (", C, ", ",
              R, "), got ", w2.sizes());
  for (const auto* t : {&w1, &w2})
    TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->device() == x.device(), op,
                ": fc weights must match x's dtype and device");
  if (b1.has_value() && b1->defined())
    TORCH_CHECK(b1->dim() == 1 && b1->size(0) == R && b1->scalar_type() == x.scalar_type() && b1->device().is_cpu(),
                op, ": fc1_bias must be (R,) = (", R, ",) with x's dtype, got ", b1->sizes());
  if (b2.has_value() && b2->defined())
    TORCH_CHECK(b2->dim() == 1 && b2->size(0) == C && b2->scalar_type() == x.scalar_type() && b2->device().is_cpu(),
                op, ": fc2_bias must be (C,) = (", C, ",) with x's dtype, got ", b2->sizes());
}

enum class Act { kNone, kRelu, kSilu, kGelu, kSigmoid, kHardSigmoid };

inline Act parse_act(c10::string_view name, const char* arg, std::initializer_list<Act> allowed) {
  static const std::pair<const char*, Act> kNames[] = {{"none", Act::kNone},       {"relu", Act::kRelu},
                                                       {"silu", Act::kSilu},       {"gelu", Act::kGelu},
                                                       {"sigmoid", Act::kSigmoid}, {"hard_sigmoid", Act::kHardSigmoid}};
  for (const auto& [n, a] : kNames)
    if (name == n && std::find(allowed.begin(), allowed.end(), a) != allowed.end()) return a;
  TORCH_CHECK(false, "fastops: ", arg, " '", std::string(name), "' is not supported here");
}

template <typename acc_t>
inline acc_t act_fwd(Act a, acc_t z) {
  switch (a) {
    case Act::kRelu: return z < 0 ? acc_t(0) : z;  // NaN stays NaN, as torch.relu
    case Act::kSilu: return z / (acc_t(1) + std::exp(-z));
    case Act::kGelu: return acc_t(0.5) * z * (acc_t(1) + std::erf(z * acc_t(M_SQRT1_2)));
    case Act::kSigmoid: return acc_t(1) / (acc_t(1) + std::exp(-z));
    case Act::kHardSigmoid: return std::min(std::max(z + acc_t(3), acc_t(0)), acc_t(6)) / acc_t(6);
    default: return z;
  }
}

// d act(z) / dz, with the same conventions as PyTorch's backward formulas (relu'(0) = 0; hard_sigmoid's
// slope is 0 at -3 and 3 exactly).
template <typename acc_t>
inline acc_t act_grad(Act a, acc_t z) {
  switch (a) {
    case Act::kRelu: return z > 0 ? acc_t(1) : acc_t(0);
    case Act::kSilu: {
      const acc_t s = acc_t(1) / (acc_t(1) + std::exp(-z));
      return s * (acc_t(1) + z * (acc_t(1) - s));
    }
    case Act::kGelu:
      return acc_t(0.5) * (acc_t(1) + std::erf(z * acc_t(M_SQRT1_2))) +
             z * std::exp(acc_t(-0.5) * z * z) * acc_t(0.3989422804014327);  // 1/sqrt(2 pi)
    case Act::kSigmoid: {
      const acc_t s = acc_t(1) / (acc_t(1) + std::exp(-z));
      return s * (acc_t(1) - s);
    }
    case Act::kHardSigmoid: return (z > acc_t(-3) && z < acc_t(3)) ? acc_t(1) / acc_t(6) : acc_t(0);
    default: return acc_t(1);
  }
}

// z[i] = act(z[i]) over n values; when dz is set, also dz[i] *= act'(z[i]) (of the old z). fp32 sigmoid,
// SiLU and hard sigmoid run on whole vectors (exp through simd::VExp): the channel gates of a batch are tens
// of thousands of values, and value by value (a switch and a libm exp each) they took about a third of the
// time of SE-ResNet-50 layer 4's batch-8 MLP. Everything else goes value by value through act_fwd / act_grad.
template <typename acc_t>
void act_inplace(Act a, acc_t* z, acc_t* dz, int64_t n) {
  int64_t i = 0;
  if constexpr (std::is_same_v<acc_t, float>) {
    using Vt = simd::Vec<float>;
    using V = Vt::V;
    const V one = Vt::splat(1.f), zero = Vt::splat(0.f);
    auto sigmoid = [&](V v) { return one / (one + simd::VExp<float>::run(-v)); };
    if (a == Act::kSigmoid || a == Act::kSilu || a == Act::kHardSigmoid) {
      for (; i + Vt::N <= n; i += Vt::N) {
        const V v = Vt::load(z + i);
        V y, g;
        if (a == Act::kHardSigmoid) {
          const V t = v + Vt::splat(3.f);
          y = (t < zero ? zero : (t > Vt::splat(6.f) ? Vt::splat(6.f) : t)) / Vt::splat(6.f);
          g = (v > Vt::splat(-3.f)) & (v < Vt::splat(3.f)) ? Vt::splat(1.f / 6.f) : zero;
        } else {
          const V sg = sigmoid(v);
          y = a == Act::kSilu ? v * sg : sg;
          g = a == Act::kSilu ? sg * (one + v * (one - sg)) : sg * (one - sg);
        }
        if (dz) Vt::store(dz + i, Vt::load(dz + i) * g);
        Vt::store(z + i, y);
      }
    }
  }
  for (; i < n; ++i) {
    if (dz) dz[i] *= act_grad(a, z[i]);
    z[i] = act_fwd(a, z[i]);
  }
}

// Grain (in units of the split dimension) that gives each chunk about 32K elements of work.
inline int64_t grain_for(int64_t inner) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, inner)); }

// y (K, O) = x (K, I) w (O, I)^T + b (O), all row-major: every sample row dotted with every weight row.
// Tiles of kO weight rows by kK sample rows share their loads: each loaded vector feeds kK or kO multiply-
// adds, where a plain dot product spends two loads on one. The loads, not the arithmetic, bound these
// short GEMMs.
template <int kO, int kK, typename acc_t>
inline void linear_tile(int64_t I, int64_t O, const acc_t* x, const acc_t* w, const acc_t* b, acc_t* y) {
  using Vt = simd::Vec<acc_t>;
  using V = typename Vt::V;
  V a[kO][kK];
  for (int o = 0; o < kO; ++o)
    for (int k = 0; k < kK; ++k) a[o][k] = Vt::splat(0);
  int64_t i = 0;
  for (; i + Vt::N <= I; i += Vt::N) {
    V xv[kK];
    for (int k = 0; k < kK; ++k) xv[k] = Vt::load(x + k * I + i);
    for (int o = 0; o < kO; ++o) {
      const V wv = Vt::load(w + o * I + i);
      for (int k = 0; k < kK; ++k) a[o][k] += wv * xv[k];
    }
  }
  for (int o = 0; o < kO; ++o)
    for (int k = 0; k < kK; ++k) {
      acc_t s = Vt::sum(a[o][k]);
      for (int64_t j = i; j < I; ++j) s += w[o * I + j] * x[k * I + j];
      y[k * O + o] = s + b[o];
    }
}

// Rows [o0, o1) of y; weight-row tiles outermost: a tile is read from memory once and stays in L1/L2 for
// all K samples.
template <typename acc_t>
void linear_rows(int64_t K, int64_t O, int64_t I, const acc_t* x, const acc_t* w, const acc_t* b, acc_t* y,
                 int64_t o0, int64_t o1) {
  auto rows = [&](auto kO, int64_t o) {
    constexpr int R = decltype(kO)::value;
    // The next tile's weight rows are asked for now: the later samples' passes read this tile from L1, and
    // without it memory idled through them (SE-ResNet-50's last-stage MLP, 2 MiB, ~10 GB/s without, ~14 with).
    if (o + R < o1) {
      const char* next = reinterpret_cast<const char*>(w + (o + R) * I);
      const int64_t bytes = std::min<int64_t>(R, o1 - o - R) * I * static_cast<int64_t>(sizeof(acc_t));
      for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(next + off, 0, 3);
    }
    int64_t k = 0;
    for (; k + 2 <= K; k += 2) linear_tile<R, 2>(I, O, x + k * I, w + o * I, b + o, y + k * O + o);
    if (k < K) linear_tile<R, 1>(I, O, x + k * I, w + o * I, b + o, y + k * O + o);
  };
  int64_t o = o0;
  for (; o + 4 <= o1; o += 4) rows(std::integral_constant<int, 4>{}, o);
  for (; o < o1; ++o) rows(std::integral_constant<int, 1>{}, o);
}

// y (K, O) = x (K, I) w (I, O), all row-major: the products of the MLP's backward (dz2 W2, dz1 W1), whose
// weights are read along their rows. Tiles of kK sample rows by kV vectors of output columns: each loaded
// weight vector feeds kK multiply-adds.
template <int kK, int kV, typename acc_t>
inline void linear_t_tile(int64_t I, int64_t O, const acc_t* x, const acc_t* w, acc_t* y) {
  using Vt = simd::Vec<acc_t>;
  using V = typename Vt::V;
  V a[kK][kV];
  for (int k = 0; k < kK; ++k)
    for (int v = 0; v < kV; ++v) a[k][v] = Vt::splat(0);
  for (int64_t i = 0; i < I; ++i) {
    V wv[kV];
    for (int v = 0; v < kV; ++v) wv[v] = Vt::load(w + i * O + v * Vt::N);
    for (int k = 0; k < kK; ++k) {
      const V xv = Vt::splat(x[k * I + i]);
      for (int v = 0; v < kV; ++v) a[k][v] += xv * wv[v];
    }
  }
  for (int k = 0; k < kK; ++k)
    for (int v = 0; v < kV; ++v) Vt::store(y + k * O + v * Vt::N, a[k][v]);
}

// Columns [o0, o1) of y = x w as above.
template <typename acc_t>
void linear_t_cols(int64_t K, int64_t O, int64_t I, const acc_t* x, const acc_t* w, acc_t* y, int64_t o0,
                   int64_t o1) {
  constexpr int N = simd::Vec<acc_t>::N;
  auto cols = [&](auto kV, int64_t o) {
    constexpr int V = decltype(kV)::value;
    int64_t k = 0;
    for (; k + 4 <= K; k += 4) linear_t_tile<4, V>(I, O, x + k * I, w + o, y + k * O + o);
    for (; k < K; ++k) linear_t_tile<1, V>(I, O, x + k * I, w + o, y + k * O + o);
  };
  int64_t o = o0;
  for (; o + 2 * N <= o1; o += 2 * N) cols(std::integral_constant<int, 2>{}, o);
  for (; o + N <= o1; o += N) cols(std::integral_constant<int, 1>{}, o);
  for (; o < o1; ++o)
    for (int64_t k = 0; k < K; ++k) {
      acc_t s = 0;
      for (int64_t i = 0; i < I; ++i) s += x[k * I + i] * w[i * O + o];
      y[k * O + o] = s;
    }
}

// fn(o0, o1) over [0, O), each row costing `work`: split across the threads when split (the MLP of a whole
// batch, called outside any parallel region), else in one call (one block's MLP, inside a thread's work).
template <typename F>
void split_rows(bool split, int64_t O, int64_t work, const F& fn) {
  if (split) at::parallel_for(0, O, grain_for(work), fn);
  else fn(0, O);
}
// split_rows() over output columns, split in whole vectors so that each chunk keeps the vector tiles.
template <typename acc_t, typename F>
void split_cols(bool split, int64_t O, int64_t work, const F& fn) {
  constexpr int N = simd::Vec<acc_t>::N;
  split_rows(split, (O + N - 1) / N, work * N, [&](int64_t b0, int64_t b1) { fn(b0 * N, std::min(O, b1 * N)); });
}

// The channel MLP z2 = W2 act(W1 p + b1) + b2 of one sample; W1 (R, C), W2 (C, R) row-major. Weights
// already in acc_t are read in place; half / bf16 ones are converted once per call.
template <typename acc_t>
struct Mlp {
  int64_t C, R;
  const acc_t *w1, *b1, *w2, *b2;  // b* point at zeros when the bias is absent

  template <typename scalar_t>
  Mlp(const at::Tensor& fc1_w, const c10::optional<at::Tensor>& fc1_b, const at::Tensor& fc2_w,
      const c10::optional<at::Tensor>& fc2_b, scalar_t /*tag*/)
      : C(fc1_w.size(1)), R(fc1_w.size(0)) {
    // The pointers stay valid for the Mlp's life whatever the caller passed (a strided view, a temporary):
    // each tensor is held, contiguous, or copied to acc_t.
    auto take = [this](const at::Tensor& t, int i) -> const acc_t* {
      held_[i] = t.contiguous();
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        return held_[i].data_ptr<acc_t>();
      } else {
        const scalar_t* p = held_[i].data_ptr<scalar_t>();
        own_[i].assign(p, p + held_[i].numel());
        return own_[i].data();
      }
    };
    w1 = take(fc1_w, 0);
    w2 = take(fc2_w, 1);
    zeros_.assign(std::max(C, R), acc_t(0));
    b1 = (fc1_b.has_value() && fc1_b->defined()) ? take(*fc1_b, 2) : zeros_.data();
    b2 = (fc2_b.has_value() && fc2_b->defined()) ? take(*fc2_b, 3) : zeros_.data();
  }
  Mlp(const Mlp&) = delete;

  // K consecutive samples (p (K, C), z1 / h (K, R), z2 (K, C)): z1 = W1 p + b1, h = act(z1),
  // z2 = gate(W2 h + b2) (Act::kNone leaves W2 h + b2). Each weight row is read once for the K samples;
  // split: the threads split each layer's weight rows, so that every weight is read once per call.
  // SE-ResNet-50's last stage has 2 MiB of fc weights per 0.4 MiB sample.
  void forward(Act act, Act gate, int64_t K, const acc_t* p, acc_t* z1, acc_t* h, acc_t* z2, bool split) const {
    split_rows(split, R, C * K, [&](int64_t r0, int64_t r1) {
      linear_rows(K, R, C, p, w1, b1, z1, r0, r1);
      for (int64_t k = 0; k < K; ++k) {
        std::copy(z1 + k * R + r0, z1 + k * R + r1, h + k * R + r0);
        act_inplace<acc_t>(act, h + k * R + r0, nullptr, r1 - r0);
      }
    });
    split_rows(split, C, R * K, [&](int64_t c0, int64_t c1) {
      linear_rows(K, C, R, h, w2, b2, z2, c0, c1);
      for (int64_t k = 0; k < K; ++k) act_inplace<acc_t>(gate, z2 + k * C + c0, nullptr, c1 - c0);
    });
  }

  // Given dz2 (K, C), returns dz1 (K, R) = (dz2 W2) * act'(z1) and dp (K, C) = dz1 W1; z1 from forward().
  // split: the threads split each layer's output columns.
  void backward(Act act, int64_t K, const acc_t* z1, const acc_t* dz2, acc_t* dz1, acc_t* dp, bool split) const {
    split_cols<acc_t>(split, R, C * K, [&](int64_t r0, int64_t r1) {
      linear_t_cols(K, R, C, dz2, w2, dz1, r0, r1);
      for (int64_t k = 0; k < K; ++k)
        for (int64_t r = r0; r < r1; ++r) dz1[k * R + r] *= act_grad(act, z1[k * R + r]);
    });
    split_cols<acc_t>(split, C, R * K, [&](int64_t c0, int64_t c1) { linear_t_cols(K, C, R, dz1, w1, dp, c0, c1); });
  }

  // CBAM's avg and max branches, whose fc2 outputs are summed before the gate: for K samples with rows
  // (avg, max) in p (2K, C), z1 and h (2K, R), hs (K, R) = h_avg + h_max and s (K, C) = W2 hs + 2 b2
  // = z2_avg + z2_max, so fc2 runs once per sample, not once per branch. split: the threads split the weight
  // rows.
  void forward_pairs(Act act, int64_t K, const acc_t* p, acc_t* z1, acc_t* h, acc_t* hs, acc_t* s, bool split) const {
    std::vector<acc_t> b2x2(C);
    for (int64_t c = 0; c < C; ++c) b2x2[c] = 2 * b2[c];
    auto fc1 = [&](int64_t r0, int64_t r1) {
      linear_rows(2 * K, R, C, p, w1, b1, z1, r0, r1);
      for (int64_t k = 0; k < K; ++k)
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t a = 2 * k * R + r, m = a + R;
          h[a] = act_fwd(act, z1[a]);
          h[m] = act_fwd(act, z1[m]);
          hs[k * R + r] = h[a] + h[m];
        }
    };
    split_rows(split, R, 2 * C * K, fc1);
    split_rows(split, C, R * K, [&](int64_t c0, int64_t c1) { linear_rows(K, C, R, hs, w2, b2x2.data(), s, c0, c1); });
  }
  // Given ds (K, C), the gradient of s that both branches' z2 receive: dz1 (2K, R) = (ds W2) * act'(z1) per
  // branch (ds W2 is computed once for both) and dp (2K, C) = dz1 W1; z1 from forward_pairs().
  void backward_pairs(Act act, int64_t K, const acc_t* z1, const acc_t* ds, acc_t* dz1, acc_t* dp, bool split) const {
    std::vector<acc_t> t(K * R);
    auto back2 = [&](int64_t r0, int64_t r1) {
      linear_t_cols(K, R, C, ds, w2, t.data(), r0, r1);
      for (int64_t k = 0; k < K; ++k)
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t a = 2 * k * R + r, m = a + R;
          dz1[a] = t[k * R + r] * act_grad(act, z1[a]);
          dz1[m] = t[k * R + r] * act_grad(act, z1[m]);
        }
    };
    split_cols<acc_t>(split, R, C * K, back2);
    split_cols<acc_t>(split, C, 2 * R * K,
                      [&](int64_t c0, int64_t c1) { linear_t_cols(2 * K, C, R, dz1, w1, dp, c0, c1); });
  }

 private:
  at::Tensor held_[4];
  std::vector<acc_t> own_[4], zeros_;
};

// Weight and bias gradients of a linear layer from per-row (sample) vectors: gw (O, I) = sum_k dz[k] in[k]^T,
// gb (O) = sum_k dz[k], over K rows; dz (K, O), in (K, I). Written into gw / gb (input dtype), parallel over O.
// A chunk of 4 vectors of a weight row stays in registers while the K samples are added into it.
template <typename scalar_t, typename acc_t>
void linear_weight_grad(int64_t K, int64_t O, int64_t I, const acc_t* dz, const acc_t* in, at::Tensor& gw,
                        at::Tensor& gb) {
  using Vt = simd::Vec<acc_t>;
  using V = typename Vt::V;
  constexpr int N = Vt::N;
  scalar_t* pw = gw.data_ptr<scalar_t>();
  scalar_t* pb = gb.data_ptr<scalar_t>();
  at::parallel_for(0, O, grain_for(I * K), [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) {
      scalar_t* w = pw + o * I;
      int64_t i = 0;
      for (; i + 4 * N <= I; i += 4 * N) {
        V a0 = Vt::splat(0), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t k = 0; k < K; ++k) {
          const V d = Vt::splat(dz[k * O + o]);
          const acc_t* x = in + k * I + i;
          a0 += d * Vt::load(x);
          a1 += d * Vt::load(x + N);
          a2 += d * Vt::load(x + 2 * N);
          a3 += d * Vt::load(x + 3 * N);
        }
        Vt::store_to(w + i, a0);
        Vt::store_to(w + i + N, a1);
        Vt::store_to(w + i + 2 * N, a2);
        Vt::store_to(w + i + 3 * N, a3);
      }
      for (; i + N <= I; i += N) {
        V a = Vt::splat(0);
        for (int64_t k = 0; k < K; ++k) a += Vt::splat(dz[k * O + o]) * Vt::load(in + k * I + i);
        Vt::store_to(w + i, a);
      }
      for (; i < I; ++i) {
        acc_t a = 0;
        for (int64_t k = 0; k < K; ++k) a += dz[k * O + o] * in[k * I + i];
        w[i] = static_cast<scalar_t>(a);
      }
      acc_t sb = 0;
      for (int64_t k = 0; k < K; ++k) sb += dz[k * O + o];
      pb[o] = static_cast<scalar_t>(sb);
    }
  });
}

// A per-sample pipeline: the stages run in order for each sample; a Range stage covers [0, extent) of that
// sample (its channels or pixels) in chunks, a Serial stage runs once per sample (the small MLP), a Block
// stage once per block of consecutive samples (fn(n0, n1): the MLP of several samples together). With at
// least as many samples as threads, each thread takes whole samples, walked in blocks of up to B, so a
// block's slice of x is still in cache when a later pass re-reads it; otherwise each Range stage is split
// across the threads, one sample at a time.
template <typename F>
struct Range {
  int64_t extent, grain;
  F fn;  // fn(n, begin, end)
};
template <typename F>
struct Serial {
  F fn;  // fn(n)
};
template <typename F>
struct Block {
  F fn;  // fn(n0, n1)
};
template <typename F>
Range<F> range(int64_t extent, int64_t grain, F fn) { return {extent, std::max<int64_t>(1, grain), fn}; }
template <typename F>
Serial<F> serial(F fn) { return {fn}; }
template <typename F>
Block<F> block(F fn) { return {fn}; }

template <typename F>
inline void run_block(const Range<F>& s, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) s.fn(n, 0, s.extent);
}
template <typename F>
inline void run_block(const Serial<F>& s, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) s.fn(n);
}
template <typename F>
inline void run_block(const Block<F>& s, int64_t n0, int64_t n1) { s.fn(n0, n1); }
template <typename F>
inline void run_split(const Range<F>& s, int64_t n) {
  at::parallel_for(0, s.extent, s.grain, [&](int64_t b, int64_t e) { s.fn(n, b, e); });
}
template <typename F>
inline void run_split(const Serial<F>& s, int64_t n) { s.fn(n); }
template <typename F>
inline void run_split(const Block<F>& s, int64_t n) { s.fn(n, n + 1); }

template <typename... Stages>
void per_block(int64_t N, int64_t B, const Stages&... stages) {
  if (N >= at::get_num_threads()) {
    at::parallel_for(0, N, 1, [&](int64_t s0, int64_t s1) {
      for (int64_t n0 = s0; n0 < s1; n0 += B) (run_block(stages, n0, std::min(s1, n0 + B)), ...);
    });
  } else {
    for (int64_t n = 0; n < N; ++n) (run_split(stages, n), ...);
  }
}

template <typename... Stages>
void per_sample(int64_t N, const Stages&... stages) {
  per_block(N, 1, stages...);
}

}  // namespace attn
}  // namespace fastops
