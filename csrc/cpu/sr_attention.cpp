// PVT spatial-reduction attention on the CPU: forward and backward, float / double / half / bf16.
//
// Every query of a (batch, head) attends to the same Nr keys, usually few (49 in PVTv2 classification), so a
// thread gathers that head's K^T and V (strided in kv, row stride 2C) once into the matrix micro-kernel's
// packed panels and keeps them for all its query blocks of the head; scores, softmax and P.V of a block of
// query rows then run from L1 / L2, reading q and writing out in place. Up to kSinglePass keys a score row is
// formed whole (plain softmax); beyond, keys go in blocks of kKeyBlock with an online softmax. The softmax
// works in base 2 (scale * log2(e) folded into the scores) for a cheaper vector exp. Arithmetic in
// at::opmath_type (fp32; fp64 for double).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu/attn_kernels.h"
#include "cpu/simd.h"

namespace fastops {
namespace {

using attn::gemm;
using attn::load_row;
using attn::round_up;
using attn::scale_row;
using attn::dot_row;
using attn::store_row;
using attn::VExp2;
using attn::kLn2;
using attn::kLog2e;

constexpr const char* kFwd = "fastops::sr_attention";
constexpr const char* kBwd = "fastops::sr_attention_backward";

constexpr int64_t kSinglePass = 512;  // keys whose score rows a block holds whole
constexpr int64_t kKeyBlock = 256;    // key block of the online softmax beyond that
constexpr int64_t kQueryBlock = 60;   // most query rows per block: a multiple of the micro-kernel's 6 rows
// A key block starts at a packed panel of K^T / V^T (gemm_packed's column offsets are whole panels).
static_assert(kKeyBlock % (attn::kVecs * attn::kLanes<float>) == 0 &&
                  kKeyBlock % (attn::kVecs * attn::kLanes<double>) == 0,
              "kKeyBlock must be a multiple of the packed panel width");

// The next task's q rows and out rows, prefetched a few rows at a time between pieces of the current task's
// work: issued all at once they fill the miss buffers and stall the core instead.
template <typename scalar_t>
struct NextRows {
  const scalar_t* q = nullptr;
  scalar_t* out = nullptr;
  int64_t rows = 0, stride = 0, len = 0;
  void prefetch(int64_t r0, int64_t n) const {
    n = std::min(n, rows - r0);
    if (n <= 0) return;
    attn::prefetch_rows(q + r0 * stride, n, stride, len);
    attn::prefetch_rows<true>(out + r0 * stride, n, stride, len);
  }
};

struct Dims {
  int64_t B, N, Nr, C, heads, hd;
  int64_t qb, nqb;  // query rows per block, blocks per (batch, head)
  int64_t kb;       // keys per block
};

Dims check_args(const char* op, const at::Tensor& q, const at::Tensor& kv, int64_t num_heads) {
  TORCH_CHECK(q.dim() == 3, op, ": q must be 3-D (B, N, C), got ", q.dim(), "-D");
  TORCH_CHECK(kv.dim() == 3, op, ": kv must be 3-D (B, Nr, 2*C), got ", kv.dim(), "-D");
  TORCH_CHECK(q.device().is_cpu(), op, ": q must be a CPU tensor here, got ", q.device());
  TORCH_CHECK(kv.device().is_cpu(), op, ": kv must be a CPU tensor here, got ", kv.device());
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, op,
              ": q must be float32, float64, float16 or bfloat16, got ", dt);
  TORCH_CHECK(kv.scalar_type() == dt, op, ": kv dtype ", kv.scalar_type(), " differs from q dtype ", dt);
  TORCH_CHECK(q.is_contiguous(), op, ": q must be contiguous");
  TORCH_CHECK(kv.is_contiguous(), op, ": kv must be contiguous");
  TORCH_CHECK(num_heads > 0, op, ": num_heads must be positive, got ", num_heads);
  Dims d;
  d.B = q.size(0); d.N = q.size(1); d.C = q.size(2); d.Nr = kv.size(1); d.heads = num_heads;
  TORCH_CHECK(d.C > 0 && d.C % num_heads == 0, op, ": q's channel count C = ", d.C,
              " must be a positive multiple of num_heads = ", num_heads);
  TORCH_CHECK(kv.size(0) == d.B && kv.size(2) == 2 * d.C && d.Nr > 0, op,
              ": kv must have shape (B, Nr, 2*C) with B = ", d.B, ", C = ", d.C, " and Nr >= 1, got ", kv.sizes());
  d.hd = d.C / num_heads;
  d.nqb = std::max<int64_t>(1, (d.N + kQueryBlock - 1) / kQueryBlock);
  // Blocks of equal size (rounded to the micro-kernel's rows) rather than full blocks and a ragged last one.
  d.qb = std::max<int64_t>(1, round_up((d.N + d.nqb - 1) / d.nqb, attn::kRows));
  d.nqb = std::max<int64_t>(1, (d.N + d.qb - 1) / d.qb);
  d.kb = d.Nr <= kSinglePass ? d.Nr : kKeyBlock;
  return d;
}

at::ScalarType acc_type_of(const at::Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// A head's keys and values, gathered from kv's token rows into gemm_packed's panels: K^T (hd x Nrp) for the
// scores and V (Nr x hdp) for P.V, and for the backward V^T (for dP) and K (for dQ) too.
template <typename scalar_t, typename T>
struct HeadKV {
  int64_t hd, hdp, Nr, Nrp, cur = -1;
  std::vector<T> kt, v, k, vt;
  HeadKV(const Dims& d, bool backward)
      : hd(d.hd), hdp(round_up(d.hd, attn::kLanes<T>)), Nr(d.Nr), Nrp(round_up(d.Nr, attn::kLanes<T>)),
        kt(hd * Nrp), v(Nr * hdp), k(backward ? Nr * hdp : 0), vt(backward ? hd * Nrp : 0) {}

  void gather(const scalar_t* kv, const Dims& d, int64_t bh) {
    if (bh == cur) return;
    cur = bh;
    const int64_t b = bh / d.heads, h = bh % d.heads, C2 = 2 * d.C;
    const scalar_t* kb = kv + b * Nr * C2 + h * hd;
    const scalar_t* vb = kb + d.C;
    attn::pack_transposed(kb, C2, hd, Nr, Nrp, kt.data());
    attn::pack_rows(vb, C2, Nr, hd, hdp, v.data());
    if (!k.empty()) {
      attn::pack_transposed(vb, C2, hd, Nr, Nrp, vt.data());
      attn::pack_rows(kb, C2, Nr, hd, hdp, k.data());
    }
  }
};

// Scores s (R <= kQueryBlock rows of nkp = round_up(nk, attn::kLanes<T>) <= ld columns) -> 2^(scale2 * s - m)
// in place, columns nk .. nkp set to 0; everything in base 2 (scale2 = scale * log2(e), m and lse in log2
// units). With lse given, m is that (the rows become the softmax itself); otherwise m = max(m_run, the row's
// max over its nk columns), stored back to m_run (the running max of an online softmax; -inf before the first
// block), and the row sums of the exponentials go to sum. Each pass keeps one vector per row and reduces
// them afterwards, so that the rows' horizontal reductions overlap instead of each stalling its row.
template <typename T>
inline void exp_rows(int64_t R, int64_t nk, int64_t ld, T* s, T scale2, const T* lse, T* m_run, T* sum) {
  using S = simd::Vec<T>;
  using V = typename S::V;
  const int64_t full = nk / S::N * S::N, rem = nk - full, nkp = round_up(nk, attn::kLanes<T>);
  V tail_mask;  // added to the last, partial vector: -inf on the lanes past nk
  for (int i = 0; i < S::N; ++i) tail_mask[i] = i < rem ? T(0) : -std::numeric_limits<T>::infinity();
  const V sc = S::splat(scale2);
  V part[kQueryBlock];
  T m[kQueryBlock];
  if (lse) {
    std::copy(lse, lse + R, m);
  } else {
    for (int64_t r = 0; r < R; ++r) {
      const T* row = s + r * ld;
      V mv = S::splat(m_run[r]);
      for (int64_t j = 0; j < full; j += S::N) {
        const V x = S::load(row + j) * sc;
        mv = x > mv ? x : mv;
      }
      if (rem) {
        const V x = S::load(row + full) * sc + tail_mask;
        mv = x > mv ? x : mv;
      }
      part[r] = mv;
    }
    for (int64_t r = 0; r < R; ++r) m_run[r] = m[r] = attn::hmax<T>(part[r]);
  }
  for (int64_t r = 0; r < R; ++r) {
    T* row = s + r * ld;
    const V mvec = S::splat(m[r]);
    V acc = S::splat(T(0));
    for (int64_t j = 0; j < full; j += S::N) {
      const V e = VExp2<T>::run(S::load(row + j) * sc - mvec);
      S::store(row + j, e);
      acc += e;
    }
    if (rem) {
      const V e = VExp2<T>::run(S::load(row + full) * sc + tail_mask - mvec);
      S::store(row + full, e);
      acc += e;
    }
    // The rest of the padding up to the products' width: whole vectors of zeros.
    for (int64_t j = round_up(nk, S::N); j < nkp; j += S::N) S::store(row + j, S::splat(T(0)));
    part[r] = acc;
  }
  if (sum)
    for (int64_t r = 0; r < R; ++r) sum[r] = attn::hsum<T>(part[r]);
}

// ---------------------------------------------------------------------------------------------------------
// Tasks are (batch, head, query block), consecutive tasks mostly sharing the head: its K^T / V are gathered
// once per thread and head. Out rows are written straight into out's (B, N, C) layout.
template <typename scalar_t>
struct ForwardWorker {
  using T = at::opmath_type<scalar_t>;
  static constexpr bool kInPlace = std::is_same_v<T, scalar_t>;  // fp32 / fp64 q is read where it lies
  static constexpr int Wd = attn::kLanes<T>;
  const Dims& d;
  const scalar_t* q;
  const scalar_t* kv;
  scalar_t* out;
  T* lse;
  const T scale2;
  const int64_t hd, hdp, QB, KB, KBp;
  HeadKV<scalar_t, T> hk;
  std::vector<T> qbuf, s, o, m, l, m_old, lb;

  ForwardWorker(const Dims& d_, const scalar_t* q_, const scalar_t* kv_, scalar_t* out_, T* lse_, T scale2_)
      : d(d_), q(q_), kv(kv_), out(out_), lse(lse_), scale2(scale2_), hd(d.hd), hdp(round_up(d.hd, Wd)), QB(d.qb),
        KB(d.kb), KBp(round_up(d.kb, Wd)), hk(d, false), qbuf(kInPlace ? 0 : QB * hd), s(QB * KBp), o(QB * hdp),
        m(QB), l(QB), m_old(QB), lb(QB) {}

  int64_t row_offset(int64_t t) const {  // of task t's first q / out value
    const int64_t bh = t / d.nqb;
    return (bh / d.heads * d.N + t % d.nqb * QB) * d.C + bh % d.heads * hd;
  }

  void run(int64_t t, int64_t t_next) {
    const int64_t bh = t / d.nqb, i0 = t % d.nqb * QB, R = std::min(QB, d.N - i0), off = row_offset(t);
    if (R <= 0) return;
    NextRows<scalar_t> next;
    if (t_next >= 0) {
      const int64_t off1 = row_offset(t_next);
      next = {q + off1, out + off1, std::min(QB, d.N - t_next % d.nqb * QB), d.C, hd};
    }
    hk.gather(kv, d, bh);
    const T* A;
    int64_t lda;
    if constexpr (kInPlace) {
      A = q + off;
      lda = d.C;
    } else {
      for (int64_t r = 0; r < R; ++r) load_row(q + off + r * d.C, &qbuf[r * hd], hd, T(1));
      A = qbuf.data();
      lda = hd;
    }
    std::fill(m.begin(), m.begin() + R, -std::numeric_limits<T>::infinity());
    for (int64_t j0 = 0; j0 < d.Nr; j0 += KB) {
      const int64_t nk = std::min(KB, d.Nr - j0), nkp = round_up(nk, Wd);
      attn::gemm_packed<T, false>(R, nkp, hd, A, lda, hk.kt.data() + j0 * hd, hd, 0, s.data(), KBp);
      // Online softmax: what earlier blocks summed is rescaled to the new running max.
      std::copy(m.begin(), m.begin() + R, m_old.begin());
      for (int64_t r0 = 0; r0 < R; r0 += attn::kRows) {
        const int64_t rr = std::min<int64_t>(attn::kRows, R - r0);
        exp_rows<T>(rr, nk, KBp, &s[r0 * KBp], scale2, nullptr, &m[r0], &lb[r0]);
        if (j0 == 0) next.prefetch(r0, rr);
      }
      if (j0 == 0) {
        std::copy(lb.begin(), lb.begin() + R, l.begin());
        attn::gemm_packed<T, false, false>(R, hdp, nk, s.data(), KBp, hk.v.data(), d.Nr, j0, o.data(), hdp);
      } else {
        for (int64_t r = 0; r < R; ++r) {
          const T a = std::exp2(m_old[r] - m[r]);
          l[r] = l[r] * a + lb[r];
          scale_row(&o[r * hdp], hdp, a);
        }
        attn::gemm_packed<T, false, true>(R, hdp, nk, s.data(), KBp, hk.v.data(), d.Nr, j0, o.data(), hdp);
      }
    }
    T* lrow = lse + bh * d.N + i0;
    for (int64_t r = 0; r < R; ++r) {
      store_row(&o[r * hdp], out + off + r * d.C, hd, T(1) / l[r]);
      lrow[r] = m[r] * T(kLn2) + std::log(l[r]);
    }
  }
};

template <typename scalar_t>
void forward_kernel(const Dims& d, const at::Tensor& q, const at::Tensor& kv, double scale, at::Tensor& out,
                    at::Tensor& lse) {
  using T = at::opmath_type<scalar_t>;
  const scalar_t* pq = q.data_ptr<scalar_t>();
  const scalar_t* pkv = kv.data_ptr<scalar_t>();
  scalar_t* po = out.data_ptr<scalar_t>();
  T* pl = lse.data_ptr<T>();
  const T scale2 = static_cast<T>(scale * kLog2e);
  // Chunks of a few consecutive blocks: they share a head's K / V, and the next block is known for prefetching.
  attn::parallel_dynamic(d.B * d.heads * d.nqb, 4, [&](auto&& grab) {
    ForwardWorker<scalar_t> w(d, pq, pkv, po, pl, scale2);
    int64_t t0, t1;
    while (grab(t0, t1))
      for (int64_t t = t0; t < t1; ++t) w.run(t, t + 1 < t1 ? t + 1 : -1);
  });
}

std::tuple<at::Tensor, at::Tensor> sr_attention_cpu(const at::Tensor& q, const at::Tensor& kv, int64_t num_heads,
                                                    double scale) {
  const Dims d = check_args(kFwd, q, kv, num_heads);
  at::Tensor out = at::empty({d.B, d.N, d.C}, q.options());
  at::Tensor lse = at::empty({d.B, d.heads, d.N}, q.options().dtype(acc_type_of(q)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "sr_attention_cpu", [&] {
    forward_kernel<scalar_t>(d, q, kv, scale, out, lse);
  });
  return {out, lse};
}

// ---------------------------------------------------------------------------------------------------------
// Per query block: P recomputed (a whole row from its own max and sum; with keys in several blocks from the
// saved lse); dP = dO V^T; D_r = sum_j P dP (the row sums autograd's softmax backward forms, from fp32 values
// rather than from the rounded output; with keys in several blocks D_r = dO . O from out instead, as the row
// is never whole); dS = P (dP - D); dQ = scale dS K, written out; dV += P^T dO and dK += dS^T Q summed over
// the query blocks. Tasks are (batch, head, chunk of query blocks) with as few chunks per head as keep the
// threads busy; several chunks' dK / dV go to a workspace summed in chunk order afterwards, so results repeat
// exactly from run to run (for a given thread count, which sets the chunks).
template <typename scalar_t>
struct BackwardWorker {
  using T = at::opmath_type<scalar_t>;
  using S = simd::Vec<T>;
  static constexpr int Wd = attn::kLanes<T>;
  const Dims& d;
  const scalar_t *go, *q, *kv, *out;
  const T* lse;
  scalar_t* gq;
  const T scale, scale2;
  const int64_t hd, hdp, QB, KB, KBp;
  const bool whole_rows;
  HeadKV<scalar_t, T> hk;
  // Padding columns of the Q and dO blocks stay 0: they are B operands read hdp wide.
  std::vector<T> qs, dO, p, dp, dq, D, lr, mrow, orow;

  BackwardWorker(const Dims& d_, const scalar_t* go_, const scalar_t* q_, const scalar_t* kv_, const scalar_t* out_,
                 const T* lse_, scalar_t* gq_, T scale_, T scale2_)
      : d(d_), go(go_), q(q_), kv(kv_), out(out_), lse(lse_), gq(gq_), scale(scale_), scale2(scale2_), hd(d.hd),
        hdp(round_up(d.hd, Wd)), QB(d.qb), KB(d.kb), KBp(round_up(d.kb, Wd)), whole_rows(d.kb == d.Nr),
        hk(d, true), qs(QB * hdp, T(0)), dO(QB * hdp, T(0)), p(QB * KBp), dp(QB * KBp), dq(QB * hdp), D(QB),
        lr(QB), mrow(QB), orow(hd) {}

  // Query block qb of head bh: writes its dQ rows, adds to dk / dv (Nr x hdp each).
  void block(int64_t bh, int64_t qb, T* dk, T* dv) {
    const int64_t i0 = qb * QB, R = std::min(QB, d.N - i0), Nr = d.Nr, C = d.C;
    if (R <= 0) return;
    const int64_t off = (bh / d.heads * d.N + i0) * C + bh % d.heads * hd;
    for (int64_t r = 0; r < R; ++r) {
      load_row(q + off + r * C, &qs[r * hdp], hd, T(1));
      load_row(go + off + r * C, &dO[r * hdp], hd, T(1));
      if (!whole_rows) {
        lr[r] = lse[bh * d.N + i0 + r] * T(kLog2e);
        load_row(out + off + r * C, orow.data(), hd, T(1));
        D[r] = dot_row(&dO[r * hdp], orow.data(), hd);
      }
    }
    for (int64_t j0 = 0; j0 < Nr; j0 += KB) {
      const int64_t nk = std::min(KB, Nr - j0), nkp = round_up(nk, Wd);
      attn::gemm_packed<T, false>(R, nkp, hd, qs.data(), hdp, hk.kt.data() + j0 * hd, hd, 0, p.data(), KBp);
      if (whole_rows) {
        // Renormalised by the row's own sum rather than by the saved lse: P sums to 1 as exactly as the
        // arithmetic allows (a single key gets P = 1 and dQ = 0 exactly, as autograd's softmax gives).
        std::fill(mrow.begin(), mrow.begin() + R, -std::numeric_limits<T>::infinity());
        exp_rows<T>(R, nk, KBp, p.data(), scale2, nullptr, mrow.data(), D.data());
        for (int64_t r = 0; r < R; ++r) scale_row(&p[r * KBp], nkp, T(1) / D[r]);
      } else {
        exp_rows<T>(R, nk, KBp, p.data(), scale2, lr.data(), nullptr, nullptr);
      }
      attn::gemm_packed<T, false>(R, nkp, hd, dO.data(), hdp, hk.vt.data() + j0 * hd, hd, 0, dp.data(), KBp);
      for (int64_t r = 0; r < R; ++r) {
        const T* prow = &p[r * KBp];
        T* drow = &dp[r * KBp];
        if (whole_rows) D[r] = dot_row(prow, drow, nkp);
        const typename S::V Dv = S::splat(D[r]);
        for (int64_t j = 0; j < nkp; j += S::N) S::store(drow + j, S::load(prow + j) * (S::load(drow + j) - Dv));
      }
      gemm<T, true, true>(nk, hdp, R, p.data(), KBp, dO.data(), hdp, dv + j0 * hdp, hdp);
      gemm<T, true, true>(nk, hdp, R, dp.data(), KBp, qs.data(), hdp, dk + j0 * hdp, hdp);
      if (j0 == 0)
        attn::gemm_packed<T, false, false>(R, hdp, nk, dp.data(), KBp, hk.k.data(), Nr, j0, dq.data(), hdp);
      else
        attn::gemm_packed<T, false, true>(R, hdp, nk, dp.data(), KBp, hk.k.data(), Nr, j0, dq.data(), hdp);
    }
    for (int64_t r = 0; r < R; ++r) store_row(&dq[r * hdp], gq + off + r * C, hd, scale);
  }
};

template <typename scalar_t>
void backward_kernel(const Dims& d, const at::Tensor& go, const at::Tensor& q, const at::Tensor& kv,
                     const at::Tensor& out, const at::Tensor& lse, double scale_d, at::Tensor& gq, at::Tensor& gkv) {
  using T = at::opmath_type<scalar_t>;
  const int64_t hd = d.hd, hdp = round_up(hd, attn::kLanes<T>), C = d.C, C2 = 2 * C, Nr = d.Nr;
  const T scale = static_cast<T>(scale_d);
  scalar_t* pgkv = gkv.data_ptr<scalar_t>();
  const int64_t nbh = d.B * d.heads, nthreads = at::get_num_threads();
  const int64_t nch = std::clamp<int64_t>((4 * nthreads + nbh - 1) / nbh, 1, d.nqb);
  const int64_t slot = 2 * Nr * hdp;  // dK then dV of one chunk
  std::vector<T> ws(nch > 1 ? nbh * nch * slot : 0);

  auto write_kv_rows = [&](int64_t bh, const T* dk, const T* dv) {
    scalar_t* g = pgkv + bh / d.heads * Nr * C2 + bh % d.heads * hd;
    for (int64_t j = 0; j < Nr; ++j) {
      store_row(dk + j * hdp, g + j * C2, hd, scale);
      store_row(dv + j * hdp, g + j * C2 + C, hd, T(1));
    }
  };

  attn::parallel_dynamic(nbh * nch, 1, [&](auto&& grab) {
    BackwardWorker<scalar_t> w(d, go.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), kv.data_ptr<scalar_t>(),
                               out.data_ptr<scalar_t>(), lse.data_ptr<T>(), gq.data_ptr<scalar_t>(), scale,
                               static_cast<T>(scale_d * kLog2e));
    std::vector<T> own(nch > 1 ? 0 : slot);
    int64_t t, t_end;
    while (grab(t, t_end)) {
      const int64_t bh = t / nch, c = t % nch;
      w.hk.gather(w.kv, d, bh);
      T* dk = nch > 1 ? &ws[t * slot] : own.data();
      std::fill(dk, dk + slot, T(0));
      for (int64_t qb = d.nqb * c / nch; qb < d.nqb * (c + 1) / nch; ++qb) w.block(bh, qb, dk, dk + Nr * hdp);
      if (nch == 1) write_kv_rows(bh, dk, dk + Nr * hdp);
    }
  });

  if (nch > 1) {
    at::parallel_for(0, nbh, 1, [&](int64_t b0, int64_t b1) {
      std::vector<T> acc(slot);
      for (int64_t bh = b0; bh < b1; ++bh) {
        const T* src = &ws[bh * nch * slot];
        std::copy(src, src + slot, acc.begin());
        for (int64_t c = 1; c < nch; ++c) attn::add_row(src + c * slot, acc.data(), slot);
        write_kv_rows(bh, acc.data(), acc.data() + Nr * hdp);
      }
    });
  }
}

std::tuple<at::Tensor, at::Tensor> sr_attention_backward_cpu(const at::Tensor& grad_out, const at::Tensor& q,
                                                             const at::Tensor& kv, const at::Tensor& out,
                                                             const at::Tensor& lse, int64_t num_heads, double scale) {
  const Dims d = check_args(kBwd, q, kv, num_heads);
  const std::vector<int64_t> osz{d.B, d.N, d.C};
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(osz) && grad_out.scalar_type() == q.scalar_type() &&
                  grad_out.device().is_cpu(),
              kBwd, ": grad_out must be a CPU ", q.scalar_type(), " tensor of shape ", at::IntArrayRef(osz), ", got ",
              grad_out.scalar_type(), " ", grad_out.sizes(), " on ", grad_out.device());
  TORCH_CHECK(out.sizes() == at::IntArrayRef(osz) && out.scalar_type() == q.scalar_type() && out.device().is_cpu(),
              kBwd, ": out must be the forward's output, a CPU ", q.scalar_type(), " tensor of shape ",
              at::IntArrayRef(osz), ", got ", out.scalar_type(), " ", out.sizes(), " on ", out.device());
  const auto acc = acc_type_of(q);
  const std::vector<int64_t> lsz{d.B, d.heads, d.N};
  TORCH_CHECK(lse.sizes() == at::IntArrayRef(lsz) && lse.scalar_type() == acc && lse.device().is_cpu(), kBwd,
              ": lse must be the forward's CPU ", acc, " tensor of shape ", at::IntArrayRef(lsz), ", got ",
              lse.scalar_type(), " ", lse.sizes(), " on ", lse.device());
  // Incoming gradients are often expanded or transposed views; the kernel reads them densely.
  const at::Tensor go = grad_out.contiguous(), o = out.contiguous(), ls = lse.contiguous();
  at::Tensor gq = at::empty_like(q, at::MemoryFormat::Contiguous);
  at::Tensor gkv = at::empty_like(kv, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "sr_attention_backward_cpu", [&] {
    backward_kernel<scalar_t>(d, go, q, kv, o, ls, scale, gq, gkv);
  });
  return {gq, gkv};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastops, CPU, m) {
  m.impl("sr_attention", &sr_attention_cpu);
  m.impl("sr_attention_backward", &sr_attention_backward_cpu);
}

}  // namespace fastops
