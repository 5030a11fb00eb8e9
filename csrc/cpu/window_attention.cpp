// Swin (shifted-)window attention on the CPU: forward and backward, float / double / half / bf16.
//
// Tokens are found by index arithmetic (the roll, pad and window partition are never materialised). A task
// gathers the q / k / v head slices of one window into small buffers in the layouts the matrix micro-kernel
// wants (K transposed for the scores, V row-major for P.V), so scores, softmax and P.V stay in L1; padding
// keys carry pad_qkv. Forward tasks are (window, group of heads), backward tasks (window, head). Arithmetic
// in at::opmath_type (fp32; fp64 for double).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "common.h"
#include "cpu/attn_kernels.h"
#include "cpu/simd.h"
#include "cpu/stream_store.h"

namespace fastops {
namespace {

constexpr const char* kFwd = "fastops.window_attention";
constexpr const char* kBwd = "fastops.window_attention_backward";

using attn::add_row;
using attn::gemm;
using attn::hmax;
using attn::hsum;
using attn::kLn2;
using attn::kLog2e;
using attn::load_row;
using attn::round_up;
using attn::store_row;
using attn::transpose;
using attn::VExp2;
using simd::vlog;

// ---------------------------------------------------------------------------------------------------------
struct Geom {
  int64_t B, H, W, C, heads, hd, wh, ww, sh, sw, N, nWh, nWw, nW, Hp, Wp;
  bool shifted;
};

// Region of a padded-grid coordinate for the shift mask (timm's three slices per dimension).
inline int region_1d(int64_t p, int64_t P, int64_t win, int64_t s) {
  if (s == 0) return 0;
  return p < P - win ? 0 : (p < P - s ? 1 : 2);
}

// The tokens of window bw (= b * nW + w): orig[i] = y * W + x of token i on the original map, or -1 for a
// padding token; reg[i] = its shift region (as T, so that the mask is a vector compare); qi[0..nq) = the real
// tokens, i.e. the query rows that are computed.
template <typename T>
struct WinMap {
  int64_t bw = -1, nq = 0;
  std::vector<int64_t> orig, qi;
  std::vector<T> reg;
  WinMap(int64_t N, int64_t Np) : orig(N), qi(N), reg(Np, T(0)) {}

  void build(const Geom& g, int64_t bw_) {
    bw = bw_;
    const int64_t w = bw % g.nW, wy = w / g.nWw, wx = w % g.nWw;
    // Per-column pieces once per window; no division per token.
    int64_t xs[64], rw[64];
    const bool small = g.ww <= 64;
    for (int64_t tx = 0; small && tx < g.ww; ++tx) {
      const int64_t px = wx * g.ww + tx;
      xs[tx] = px < g.W ? (px + g.sw) % g.W : -1;
      rw[tx] = region_1d(px, g.Wp, g.ww, g.sw);
    }
    nq = 0;
    int64_t i = 0;
    for (int64_t ty = 0; ty < g.wh; ++ty) {
      const int64_t py = wy * g.wh + ty;
      const int64_t y = py < g.H ? (py + g.sh) % g.H : -1;
      const int64_t rh = region_1d(py, g.Hp, g.wh, g.sh) * 3;
      for (int64_t tx = 0; tx < g.ww; ++tx, ++i) {
        const int64_t px = wx * g.ww + tx;
        const int64_t x = small ? xs[tx] : (px < g.W ? (px + g.sw) % g.W : -1);
        if (y >= 0 && x >= 0) {
          orig[i] = y * g.W + x;
          qi[nq++] = i;
        } else {
          orig[i] = -1;
        }
        reg[i] = static_cast<T>(rh + (small ? rw[tx] : region_1d(px, g.Wp, g.ww, g.sw)));
      }
    }
  }
};

// A thread walks its tasks in order, all heads of a window in a row, and looks one task ahead to prefetch:
// two maps (current and next window) are enough.
template <typename T>
struct MapCache {
  WinMap<T> m[2];
  MapCache(int64_t N, int64_t Np) : m{WinMap<T>(N, Np), WinMap<T>(N, Np)} {}
  const WinMap<T>& get(const Geom& g, int64_t bw) {
    if (m[0].bw == bw) return m[0];
    if (m[1].bw == bw) return m[1];
    WinMap<T>& slot = m[0].bw < m[1].bw ? m[0] : m[1];
    slot.build(g, bw);
    return slot;
  }
};

// Prefetches (into L2) `len` elements at base + orig[j] * stride + part * part_stride for every real token j
// and part. A head slice of a window is 49 short runs scattered over the map: without this, the gathers
// stall on every line, which costs more than all the arithmetic of the task.
template <typename S>
inline void prefetch_slices(const S* base, const std::vector<int64_t>& orig, int64_t stride, int nparts,
                            int64_t part_stride, int64_t len) {
  const int64_t bytes = len * static_cast<int64_t>(sizeof(S));
  for (const int64_t o : orig) {
    if (o < 0) continue;
    for (int part = 0; part < nparts; ++part) {
      const char* p = reinterpret_cast<const char*>(base + o * stride + part * part_stride);
      for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0, 2);
      __builtin_prefetch(p + bytes - 1, 0, 2);
    }
  }
}

Geom check_and_geom(const char* op, const at::Tensor& qkv, int64_t num_heads, c10::IntArrayRef window,
                    c10::IntArrayRef shift) {
  TORCH_CHECK(qkv.dim() == 4, op, ": qkv must be 4-D (B, H, W, 3C), got ", qkv.dim(), "-D");
  TORCH_CHECK(qkv.device().is_cpu(), op, ": qkv must be a CPU tensor here, got ", qkv.device());
  TORCH_CHECK(qkv.is_contiguous(), op, ": qkv must be contiguous");
  const auto dt = qkv.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, op,
              ": qkv must be float32, float64, float16 or bfloat16, got ", dt);
  TORCH_CHECK(window.size() == 2, op, ": window_size must have 2 values, got ", window.size());
  TORCH_CHECK(shift.size() == 2, op, ": shift_size must have 2 values, got ", shift.size());
  TORCH_CHECK(window[0] > 0 && window[1] > 0, op, ": window_size must be positive, got ", window);
  TORCH_CHECK(shift[0] >= 0 && shift[0] < window[0] && shift[1] >= 0 && shift[1] < window[1], op,
              ": shift_size must satisfy 0 <= shift < window per dimension, got shift ", shift, " for window ",
              window);
  TORCH_CHECK(num_heads > 0, op, ": num_heads must be positive, got ", num_heads);
  const int64_t C3 = qkv.size(3);
  TORCH_CHECK(C3 > 0 && C3 % 3 == 0, op, ": qkv's last dim must be 3C > 0 (q | k | v), got ", C3);
  const int64_t C = C3 / 3;
  TORCH_CHECK(C % num_heads == 0, op, ": C = ", C, " (qkv's last dim / 3) must be divisible by num_heads = ",
              num_heads);
  TORCH_CHECK(qkv.size(0) > 0 && qkv.size(1) > 0 && qkv.size(2) > 0, op, ": qkv must be non-empty, got ",
              qkv.sizes());
  Geom g;
  g.B = qkv.size(0); g.H = qkv.size(1); g.W = qkv.size(2); g.C = C;
  g.heads = num_heads; g.hd = C / num_heads;
  g.wh = window[0]; g.ww = window[1]; g.sh = shift[0]; g.sw = shift[1];
  g.N = g.wh * g.ww;
  g.nWh = (g.H + g.wh - 1) / g.wh; g.nWw = (g.W + g.ww - 1) / g.ww;
  g.nW = g.nWh * g.nWw;
  g.Hp = g.nWh * g.wh; g.Wp = g.nWw * g.ww;
  g.shifted = g.sh > 0 || g.sw > 0;
  return g;
}

at::ScalarType acc_type_of(const at::Tensor& qkv) {
  return qkv.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_bias_pad(const char* op, const Geom& g, const at::Tensor& qkv, const c10::optional<at::Tensor>& bias,
                    const c10::optional<at::Tensor>& pad) {
  const auto acc = acc_type_of(qkv);
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 3 && bias->size(0) == g.heads && bias->size(1) == g.N && bias->size(2) == g.N, op,
                ": rel_pos_bias must be (num_heads, N, N) = (", g.heads, ", ", g.N, ", ", g.N, "), got ",
                bias->sizes());
    TORCH_CHECK(bias->scalar_type() == acc, op, ": rel_pos_bias must be ", acc, " for ", qkv.scalar_type(),
                " qkv, got ", bias->scalar_type());
    TORCH_CHECK(bias->device().is_cpu() && bias->is_contiguous(), op, ": rel_pos_bias must be a contiguous CPU tensor");
  }
  if (pad.has_value() && pad->defined()) {
    TORCH_CHECK(pad->dim() == 1 && pad->size(0) == 3 * g.C, op, ": pad_qkv must be (3C,) = (", 3 * g.C,
                ",), got ", pad->sizes());
    TORCH_CHECK(pad->scalar_type() == acc, op, ": pad_qkv must be ", acc, " for ", qkv.scalar_type(),
                " qkv, got ", pad->scalar_type());
    TORCH_CHECK(pad->device().is_cpu() && pad->is_contiguous(), op, ": pad_qkv must be a contiguous CPU tensor");
  }
}

// The additive score terms that do not depend on the window, in log2 units (see scores_to_probs):
// rel_pos_bias * log2(e) per head, or zeros, with the padded key columns N..Np set to -inf so that they drop
// out of the softmax. Head stride is 0 without bias.
template <typename T>
std::vector<T> padded_bias(const Geom& g, const c10::optional<at::Tensor>& bias, int64_t Np, int64_t* hstride) {
  const bool has = bias.has_value() && bias->defined();
  const int64_t nh = has ? g.heads : 1;
  std::vector<T> out(nh * g.N * Np, T(0));
  const T* src = has ? bias->data_ptr<T>() : nullptr;
  for (int64_t h = 0; h < nh; ++h)
    for (int64_t i = 0; i < g.N; ++i) {
      T* row = &out[(h * g.N + i) * Np];
      for (int64_t j = 0; j < g.N; ++j) row[j] = src ? src[(h * g.N + i) * g.N + j] * T(kLog2e) : T(0);
      for (int64_t j = g.N; j < Np; ++j) row[j] = -std::numeric_limits<T>::infinity();
    }
  *hstride = has ? g.N * Np : 0;
  return out;
}

// pad_qkv as the padding tokens hold it: rounded to qkv's dtype (as a materialised pad would be), or zeros.
template <typename scalar_t, typename T>
std::vector<T> pad_values(const Geom& g, const c10::optional<at::Tensor>& pad) {
  std::vector<T> out(3 * g.C, T(0));
  if (pad.has_value() && pad->defined()) {
    const T* p = pad->data_ptr<T>();
    for (int64_t c = 0; c < 3 * g.C; ++c) out[c] = static_cast<T>(static_cast<scalar_t>(p[c]));
  }
  return out;
}

// Scores of the nq compacted query rows against all keys, turned in place into exp(s - m_r). The softmax runs in
// base 2 for a cheaper exp: x = s * scale2 + bias2 (+ the mask), with scale2 = scale * log2(e) and bias2 from
// padded_bias, then 2^(x - m2). With lse given (natural units), m2 = lse * log2(e), so the rows are the softmax
// itself; without, m2 = the row max, and lse (natural units) and 1/sum go to lse_out / inv_out, which hold
// round_up(nq, SIMD width) entries.
template <typename T>
inline void scores_to_probs(const Geom& g, int64_t nq, int64_t Np, T* s, T scale2, const T* bias_h,
                            const int64_t* qi, const T* reg, const T* lse_in, T* lse_out, T* inv_out) {
  using S = simd::Vec<T>;
  using V = typename S::V;
  const V neg100 = S::splat(T(-100 * kLog2e)), zero = S::splat(T(0)), sc = S::splat(scale2);
  for (int64_t r = 0; r < nq; ++r) {
    const int64_t i = qi[r];
    T* row = s + r * Np;
    const T* brow = bias_h + i * Np;
    const V ri = S::splat(reg[i]);
    V mx = S::splat(-std::numeric_limits<T>::infinity());
    for (int64_t j = 0; j < Np; j += S::N) {
      V x = S::load(row + j) * sc + S::load(brow + j);
      if (g.shifted) x += S::load(reg + j) != ri ? neg100 : zero;
      S::store(row + j, x);
      if (!lse_in) mx = x > mx ? x : mx;
    }
    const T m = lse_in ? lse_in[r] * T(kLog2e) : hmax<T>(mx);
    const V mv = S::splat(m);
    V sum = zero;
    for (int64_t j = 0; j < Np; j += S::N) {
      const V e = VExp2<T>::run(S::load(row + j) - mv);
      S::store(row + j, e);
      sum += e;
    }
    if (!lse_in) {
      lse_out[r] = m;
      inv_out[r] = hsum<T>(sum);
    }
  }
  if (lse_in) return;
  // lse = m2 ln 2 + ln(sum) and 1/sum for a vector of rows at a time: a scalar log per row took ~5% of the
  // forward.
  for (int64_t r = nq; r < round_up(nq, S::N); ++r) {
    lse_out[r] = T(0);
    inv_out[r] = T(1);
  }
  for (int64_t r = 0; r < nq; r += S::N) {
    const V sum = S::load(inv_out + r);
    S::store(lse_out + r, S::load(lse_out + r) * S::splat(T(kLn2)) + vlog<T>(sum));
    S::store(inv_out + r, S::splat(T(1)) / sum);
  }
}

// dst[c] = src[c] * mul for c < n, a multiple of 16 with dst 64-byte aligned: whole lines, streamed.
template <typename T, typename S>
inline void stream_row(const T* src, S* dst, int64_t n, T mul) {
  using Wv = simd::Vec<T, 32>;
  for (int64_t c = 0; c < n; c += Wv::N)
    simd::store_vec<true, T, S, 32>(dst + c, Wv::load(src + c) * Wv::splat(mul));
}

// ---------------------------------------------------------------------------------------------------------
// Forward tasks are (window, group of heads): the group's q / k / v of every token are read once, as three
// runs per token (consecutive tokens of a window row are adjacent in memory, so the reads stream), into a
// window buffer that then serves every head of the group from L1 / L2. Every query row is computed, padding
// rows too (their results are dropped): that keeps Q and V usable in place as operands.
template <typename scalar_t>
void forward_kernel(const Geom& g, const at::Tensor& qkv, const c10::optional<at::Tensor>& bias,
                    const c10::optional<at::Tensor>& pad, double scale_d, at::Tensor& out, at::Tensor& lse) {
  using T = at::opmath_type<scalar_t>;
  constexpr int Wd = attn::kLanes<T>;
  const int64_t N = g.N, Np = round_up(N, Wd), hd = g.hd, hdp = round_up(hd, Wd), C = g.C, C3 = 3 * C;
  const int64_t HW = g.H * g.W;
  const T scale2 = static_cast<T>(scale_d * kLog2e);
  int64_t bias_hs = 0;
  const std::vector<T> biasp = padded_bias<T>(g, bias, Np, &bias_hs);
  const std::vector<T> padv = pad_values<scalar_t, T>(g, pad);
  const scalar_t* px = qkv.data_ptr<scalar_t>();
  scalar_t* po = out.data_ptr<scalar_t>();
  T* pl = lse.data_ptr<T>();
  // An output larger than the cache keeps for it goes around the cache (stream_store.h), in whole lines:
  // each head's slice of a token row must be whole 64-byte lines. Stage 1 of Swin-T at batch 8 (9.6 MB):
  // ~5% less time.
  const bool stream = std::is_same_v<scalar_t, float> && hd % 16 == 0 && C % 16 == 0 &&
                      reinterpret_cast<uintptr_t>(po) % 64 == 0 &&
                      simd::should_stream(static_cast<int64_t>(out.nbytes()));
  // Heads per task: the group's buffer should stay well inside L2, and there should be a few tasks per
  // thread for balance.
  const int64_t nbw = g.B * g.nW, nthreads = at::get_num_threads();
  int64_t hpg = std::max<int64_t>(1, std::min<int64_t>(g.heads, 256 / hd));
  while (hpg > 1 && nbw * ((g.heads + hpg - 1) / hpg) < 4 * nthreads) hpg = (hpg + 1) / 2;
  const int64_t ngroups = (g.heads + hpg - 1) / hpg;
  const int64_t ldw = 3 * hpg * hd;
  std::vector<int64_t> iota(N);
  for (int64_t i = 0; i < N; ++i) iota[i] = i;

  at::parallel_for(0, nbw * ngroups, 1, [&](int64_t t0, int64_t t1) {
    // Columns past N of K^T are never written, so they stay 0. The V operand reads hdp columns of a row of
    // the window buffer, past hd into the next slice (finite values whose results are not stored); the
    // slack at the end covers the last row.
    std::vector<T> wb(N * ldw + Wd, T(0)), kt(hd * Np, T(0)), s(N * Np), o(N * hdp), lse_r(Np), inv_r(Np);
    MapCache<T> maps(N, Np);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bw = t / ngroups, b = bw / g.nW, h0 = (t % ngroups) * hpg;
      const int64_t h1 = std::min(g.heads, h0 + hpg), gw = (h1 - h0) * hd;
      if (t + 1 < t1) {  // the next task's token runs, while this one computes
        const int64_t bwn = (t + 1) / ngroups, h0n = ((t + 1) % ngroups) * hpg;
        const int64_t gwn = (std::min(g.heads, h0n + hpg) - h0n) * hd;
        prefetch_slices(px + bwn / g.nW * HW * C3 + h0n * hd, maps.get(g, bwn).orig, C3, 3, C, gwn);
      }
      const WinMap<T>& mp = maps.get(g, bw);
      const scalar_t* xb = px + b * HW * C3;
      for (int64_t j = 0; j < N; ++j) {
        T* row = &wb[j * ldw];
        if (mp.orig[j] >= 0) {
          const scalar_t* tok = xb + mp.orig[j] * C3 + h0 * hd;
          for (int part = 0; part < 3; ++part) load_row(tok + part * C, row + part * gw, gw, T(1));
        } else {
          for (int part = 0; part < 3; ++part) load_row(&padv[part * C + h0 * hd], row + part * gw, gw, T(1));
        }
      }
      for (int64_t h = h0; h < h1; ++h) {
        const int64_t off = (h - h0) * hd;
        transpose(&wb[gw + off], N, hd, ldw, kt.data(), Np);
        gemm<T, false>(N, Np, hd, &wb[off], ldw, kt.data(), Np, s.data(), Np);
        scores_to_probs<T>(g, N, Np, s.data(), scale2, biasp.data() + h * bias_hs, iota.data(), mp.reg.data(),
                           nullptr, lse_r.data(), inv_r.data());
        gemm<T, false>(N, hdp, N, s.data(), Np, &wb[2 * gw + off], ldw, o.data(), hdp);
        scalar_t* ob = po + b * HW * C + h * hd;
        T* lrow = pl + (bw * g.heads + h) * N;
        for (int64_t i = 0; i < N; ++i) {
          if (mp.orig[i] >= 0) {
            if (stream) {
              stream_row(&o[i * hdp], ob + mp.orig[i] * C, hd, inv_r[i]);
            } else {
              store_row(&o[i * hdp], ob + mp.orig[i] * C, hd, inv_r[i]);
            }
            lrow[i] = lse_r[i];
          } else {
            lrow[i] = T(0);
          }
        }
      }
    }
    if (stream) simd::stream_fence();
  });
}

std::tuple<at::Tensor, at::Tensor> window_attention_cpu(const at::Tensor& qkv, int64_t num_heads,
                                                        c10::IntArrayRef window_size, c10::IntArrayRef shift_size,
                                                        const c10::optional<at::Tensor>& rel_pos_bias, double scale,
                                                        const c10::optional<at::Tensor>& pad_qkv) {
  const Geom g = check_and_geom(kFwd, qkv, num_heads, window_size, shift_size);
  check_bias_pad(kFwd, g, qkv, rel_pos_bias, pad_qkv);
  at::Tensor out = at::empty({g.B, g.H, g.W, g.C}, qkv.options());
  at::Tensor lse = at::empty({g.B, g.nW, g.heads, g.N}, qkv.options().dtype(acc_type_of(qkv)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qkv.scalar_type(), "window_attention_cpu", [&] {
    forward_kernel<scalar_t>(g, qkv, rel_pos_bias, pad_qkv, scale, out, lse);
  });
  return {out, lse};
}

// ---------------------------------------------------------------------------------------------------------
// Per task: P recomputed from the saved lse; dV = P^T dO; dP = dO V^T; D_r = sum_j P dP (the same row sums
// autograd's softmax backward forms, from fp32 values rather than from the rounded output); dS = P (dP - D);
// dQ = scale dS K; dK = dS^T (scale Q); dV / dK of padding keys and dS go to per-chunk accumulators that are
// summed in chunk order at the end, so results repeat exactly from run to run (for a given thread count).
template <typename scalar_t>
void backward_kernel(const Geom& g, const at::Tensor& go, const at::Tensor& qkv, const at::Tensor& lse,
                     const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& pad, double scale_d,
                     bool bias_grad, bool pad_grad, at::Tensor& gqkv, at::Tensor& gbias, at::Tensor& gpad) {
  using T = at::opmath_type<scalar_t>;
  constexpr int Wd = attn::kLanes<T>;
  const int64_t N = g.N, Np = round_up(N, Wd), hd = g.hd, hdp = round_up(hd, Wd), C = g.C, C3 = 3 * C;
  const int64_t HW = g.H * g.W;
  const T scale = static_cast<T>(scale_d);
  int64_t bias_hs = 0;
  const std::vector<T> biasp = padded_bias<T>(g, bias, Np, &bias_hs);
  const std::vector<T> padv = pad_values<scalar_t, T>(g, pad);
  const scalar_t* px = qkv.data_ptr<scalar_t>();
  const scalar_t* pgo = go.data_ptr<scalar_t>();
  const T* pl = lse.data_ptr<T>();
  scalar_t* pg = gqkv.data_ptr<scalar_t>();
  const int64_t ntask = g.B * g.nW * g.heads;
  const int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>(ntask, at::get_num_threads()));
  const int64_t bsz = g.heads * N * N;
  std::vector<T> bacc(bias_grad ? nchunks * bsz : 0, T(0)), pacc(pad_grad ? nchunks * C3 : 0, T(0));

  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<T> qs(N * hdp, T(0)), kt(hd * Np, T(0)), kr(N * hdp, T(0)), vr(N * hdp), vt(hd * Np, T(0));
    std::vector<T> dO(N * hdp, T(0)), p(N * Np), dp(N * Np), dv(N * hdp), dk(N * hdp), dq(N * hdp);
    std::vector<T> lse_r(N);
    MapCache<T> maps(N, Np);
    for (int64_t chunk = c0; chunk < c1; ++chunk) {
      T* ba = bias_grad ? &bacc[chunk * bsz] : nullptr;
      T* pa = pad_grad ? &pacc[chunk * C3] : nullptr;
      const int64_t tend = ntask * (chunk + 1) / nchunks;
      for (int64_t t = ntask * chunk / nchunks; t < tend; ++t) {
        const int64_t h = t % g.heads, bw = t / g.heads, b = bw / g.nW;
        if (t + 1 < tend) {
          const int64_t h1 = (t + 1) % g.heads, bw1 = (t + 1) / g.heads, b1 = bw1 / g.nW;
          const std::vector<int64_t>& o1 = maps.get(g, bw1).orig;
          prefetch_slices(px + b1 * HW * C3 + h1 * hd, o1, C3, 3, C, hd);
          prefetch_slices(pgo + b1 * HW * C + h1 * hd, o1, C, 1, 0, hd);
        }
        const WinMap<T>& mp = maps.get(g, bw);
        const std::vector<int64_t>& orig = mp.orig;
        const std::vector<int64_t>& qi = mp.qi;
        const std::vector<T>& reg = mp.reg;
        const int64_t nq = mp.nq;
        const scalar_t* xb = px + b * HW * C3;
        const int64_t off = h * hd;
        for (int64_t j = 0; j < N; ++j) {
          if (orig[j] >= 0) {
            const scalar_t* tok = xb + orig[j] * C3 + off;
            load_row(tok + C, &kr[j * hdp], hd, T(1));
            load_row(tok + 2 * C, &vr[j * hdp], hd, T(1));
          } else {
            load_row(&padv[C + off], &kr[j * hdp], hd, T(1));
            load_row(&padv[2 * C + off], &vr[j * hdp], hd, T(1));
          }
        }
        transpose(kr.data(), N, hd, hdp, kt.data(), Np);
        transpose(vr.data(), N, hd, hdp, vt.data(), Np);
        const T* lrow = pl + bw * g.heads * N + h * N;
        for (int64_t r = 0; r < nq; ++r) {
          const int64_t o = orig[qi[r]];
          load_row(xb + o * C3 + off, &qs[r * hdp], hd, scale);
          load_row(pgo + (b * HW + o) * C + off, &dO[r * hdp], hd, T(1));
          lse_r[r] = lrow[qi[r]];
        }
        gemm<T, false>(nq, Np, hd, qs.data(), hdp, kt.data(), Np, p.data(), Np);
        // qs holds scale * q already.
        scores_to_probs<T>(g, nq, Np, p.data(), T(kLog2e), biasp.data() + h * bias_hs, qi.data(), reg.data(),
                           lse_r.data(), nullptr, nullptr);
        gemm<T, false>(nq, Np, hd, dO.data(), hdp, vt.data(), Np, dp.data(), Np);
        {
          using S = simd::Vec<T>;
          using V = typename S::V;
          // Each row of P is divided by its sum: recomputed from the forward's lse, it sums to 1 only within the
          // rounding of the logits (~1e-7 of their size), and when the softmax is peaked the true dS is tiny
          // while (1 - sum P) * D, the part of every dS row that the mismatch leaves, is not: q and k gradients
          // were 10-100x less accurate than autograd's on logits of ~100.
          for (int64_t r = 0; r < nq; ++r) {
            T* prow = &p[r * Np];
            T* drow = &dp[r * Np];
            V acc = S::splat(0), psum = S::splat(0);
            for (int64_t j = 0; j < Np; j += S::N) {
              const V pj = S::load(prow + j);
              acc += pj * S::load(drow + j);
              psum += pj;
            }
            const T sum = hsum<T>(psum);
            const V inv = S::splat(sum > T(0) ? T(1) / sum : T(0));  // a row with every key masked stays 0
            const V D = S::splat(hsum<T>(acc)) * inv;
            for (int64_t j = 0; j < Np; j += S::N) {
              const V pj = S::load(prow + j) * inv;
              S::store(prow + j, pj);
              S::store(drow + j, pj * (S::load(drow + j) - D));
            }
          }
        }
        gemm<T, true>(N, hdp, nq, p.data(), Np, dO.data(), hdp, dv.data(), hdp);
        gemm<T, true>(N, hdp, nq, dp.data(), Np, qs.data(), hdp, dk.data(), hdp);
        gemm<T, false>(nq, hdp, N, dp.data(), Np, kr.data(), hdp, dq.data(), hdp);
        scalar_t* gb = pg + b * HW * C3 + off;
        for (int64_t r = 0; r < nq; ++r) store_row(&dq[r * hdp], gb + orig[qi[r]] * C3, hd, scale);
        for (int64_t j = 0; j < N; ++j) {
          if (orig[j] >= 0) {
            scalar_t* dst = gb + orig[j] * C3;
            store_row(&dk[j * hdp], dst + C, hd, T(1));
            store_row(&dv[j * hdp], dst + 2 * C, hd, T(1));
          } else if (pa) {
            add_row(&dk[j * hdp], pa + C + off, hd);
            add_row(&dv[j * hdp], pa + 2 * C + off, hd);
          }
        }
        if (ba) {
          T* bh = ba + h * N * N;
          for (int64_t r = 0; r < nq; ++r) add_row(&dp[r * Np], bh + qi[r] * N, N);
        }
      }
    }
  });

  auto reduce = [nchunks](const std::vector<T>& acc, int64_t n, T* dst) {
    for (int64_t e = 0; e < n; ++e) dst[e] = acc[e];
    for (int64_t k = 1; k < nchunks; ++k)
      for (int64_t e = 0; e < n; ++e) dst[e] += acc[k * n + e];
  };
  if (bias_grad) reduce(bacc, bsz, gbias.data_ptr<T>());
  if (pad_grad) reduce(pacc, C3, gpad.data_ptr<T>());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> window_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& out, const at::Tensor& lse,
    int64_t num_heads, c10::IntArrayRef window_size, c10::IntArrayRef shift_size,
    const c10::optional<at::Tensor>& rel_pos_bias, double scale, const c10::optional<at::Tensor>& pad_qkv,
    bool bias_grad, bool pad_grad) {
  const Geom g = check_and_geom(kBwd, qkv, num_heads, window_size, shift_size);
  check_bias_pad(kBwd, g, qkv, rel_pos_bias, pad_qkv);
  const std::vector<int64_t> osz{g.B, g.H, g.W, g.C};
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(osz) && grad_out.scalar_type() == qkv.scalar_type() &&
                  grad_out.device().is_cpu(),
              kBwd, ": grad_out must be a CPU ", qkv.scalar_type(), " tensor of shape ", at::IntArrayRef(osz),
              ", got ", grad_out.scalar_type(), " ", grad_out.sizes());
  TORCH_CHECK(out.sizes() == at::IntArrayRef(osz) && out.scalar_type() == qkv.scalar_type(), kBwd,
              ": out must be the forward's output, ", qkv.scalar_type(), " of shape ", at::IntArrayRef(osz),
              ", got ", out.scalar_type(), " ", out.sizes());
  const auto acc = acc_type_of(qkv);
  const std::vector<int64_t> lsz{g.B, g.nW, g.heads, g.N};
  TORCH_CHECK(lse.sizes() == at::IntArrayRef(lsz) && lse.scalar_type() == acc && lse.device().is_cpu(), kBwd,
              ": lse must be the forward's ", acc, " tensor of shape ", at::IntArrayRef(lsz), ", got ",
              lse.scalar_type(), " ", lse.sizes());
  // Incoming gradients are often expanded or transposed views; the kernel reads them densely.
  const at::Tensor go = grad_out.contiguous(), ls = lse.contiguous();
  at::Tensor gqkv = at::empty_like(qkv, at::MemoryFormat::Contiguous);
  at::Tensor gbias = at::empty(bias_grad ? std::vector<int64_t>{g.heads, g.N, g.N} : std::vector<int64_t>{0},
                               qkv.options().dtype(acc));
  at::Tensor gpad = at::empty({pad_grad ? 3 * g.C : 0}, qkv.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qkv.scalar_type(), "window_attention_backward_cpu", [&] {
    backward_kernel<scalar_t>(g, go, qkv, ls, rel_pos_bias, pad_qkv, scale, bias_grad, pad_grad, gqkv, gbias, gpad);
  });
  return {gqkv, gbias, gpad};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastops, CPU, m) {
  m.impl("window_attention", &window_attention_cpu);
  m.impl("window_attention_backward", &window_attention_backward_cpu);
}

}  // namespace fastops
