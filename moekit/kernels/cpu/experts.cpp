// SwiGLU MLP and the fused MoE layer (routed experts + optional shared expert), each weight plain
// (the activation dtype) or quantised (qgemm.h).
//
// Shape legend: T tokens, D model width, F expert width, E experts, K experts per token.

#include "moe.h"

namespace moekit {

// Rows [r, r + n) of a plain [*, K] weight, or of a quantised one dequantised into `tile`.
template <typename A>
inline const A* weight_rows(const A* w, const QMat& q, int64_t r, int64_t n, int64_t K, std::vector<A>& tile,
                            int64_t at = 0) {
  if (!q) return w + r * K;
  tile.resize(std::max<int64_t>(tile.size(), (at + n) * K));
  dequant_rows<A>(q, r, n, tile.data() + at * K);
  return tile.data() + at * K;
}

// A plain weight as it is, or a quantised one dequantised into `buf` (in parallel).
template <typename A>
inline const A* whole(const A* w, const QMat& q, std::vector<A>& buf) {
  if (!q) return w;
  buf.resize(q.N * q.K);
  at::parallel_for(0, (q.N + BLOCK - 1) / BLOCK, 1, [&](int64_t b0, int64_t b1) {
    dequant_rows<A>(q, b0 * BLOCK, std::min(q.N, b1 * BLOCK) - b0 * BLOCK, buf.data() + b0 * BLOCK * q.K);
  });
  return buf.data();
}

// The pair kernel (two 32-row blocks per pass) applies: bf16 with AVX512-BF16 and enough tokens.
template <typename A>
bool pairs(int64_t n, int64_t K) {
#if defined(__AVX512BF16__)
  return std::is_same_v<A, bf16> && n >= VNNI_MIN_TOKENS && K % 2 == 0;
#else
  return false;
#endif
}
template <typename A>
bool paired_down(const Job<A>& job) { return pairs<A>(job.tok.size(), job.F); }

template <typename A>
inline void pair_rows(const A* Wa, const A* Wb, int64_t rows, const A* X, int64_t T, int64_t K, float* Ya, float* Yb,
                      int64_t ldo, std::vector<uint32_t>& pack) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<A, bf16>) gemm_pair_vnni(Wa, Wb, rows, X, T, K, Ya, Yb, ldo, pack);
#endif
}

// One expert over its gathered tokens with ATen's GEMMs (oneDNN: AMX tiles where the CPU has them),
// the activation rounded as torch rounds it; out [n, D] float32 holds the (rounded) expert output.
template <typename A>
void expert_aten(Job<A>& job, int64_t D, const torch::Tensor& like, std::vector<float>& out) {
  const int64_t n = job.tok.size(), F = job.F;
  auto x = torch::from_blob(job.x.data(), {n, D}, like.options());
  std::vector<A> t13, t2;  // quantised weights dequantised whole
  auto w13 = torch::from_blob(const_cast<A*>(whole(job.w13, job.q13, t13)), {2 * F, D}, like.options());
  auto w2 = torch::from_blob(const_cast<A*>(whole(job.w2, job.q2, t2)), {D, F}, like.options());
  torch::Tensor h = at::mm(x, w13.t()).to(torch::kFloat32).contiguous();  // [n, 2F], rounded to A by the GEMM
  const float* H = h.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) swiglu_row<A>(H + i * 2 * F, H + i * 2 * F + F, F, job.act.data() + i * F);
  auto act = torch::from_blob(job.act.data(), {n, F}, like.options());
  torch::Tensor y = at::mm(act, w2.t()).to(torch::kFloat32).contiguous();
  std::memcpy(out.data(), y.data_ptr<float>(), n * D * sizeof(float));
}

// SwiGLU experts: y[t] = sum_j wt_j * down_j(silu(gate_j x_t) * up_j x_t).
// With `aten`, experts with at least VNNI_MIN_TOKENS tokens run on ATen's GEMMs one after the other
// (each parallel inside). Experts with few tokens run whole, one per thread at a time, where they balance
// (moe.h, whole_experts); the rest run here in two phases. Phase 1 (parallel over (expert, F-block)):
// activations. Phase 2 (parallel over (expert, D-block)): down projections. Then a combine in a fixed
// order, so results are deterministic.
template <typename A>
torch::Tensor experts_impl(const torch::Tensor& x, std::vector<Job<A>>& jobs, bool aten) {
  const int64_t T = x.size(0), D = x.size(1);
  const A* X = (const A*)x.data_ptr();
  std::vector<int64_t> item_job, item_blk;
  std::vector<std::vector<float>> out(jobs.size());
  std::vector<char> done(jobs.size(), 0);  // run on ATen, or whole on one thread: not in the blocks below
  const auto gather = [&](size_t j) {  // the job's tokens' rows, quantised for its gate/up rows where they are
    auto& job = jobs[j];
    const int64_t n = job.tok.size();
    job.x.resize(n * D);
    job.act.resize(n * job.F);
    out[j].assign(n * D, 0.f);
    for (int64_t i = 0; i < n; ++i) std::memcpy(job.x.data() + i * D, X + job.tok[i] * D, D * sizeof(A));
#if defined(__AVX512VNNI__)
    if (job.q13 && qdecode(job.q13, n)) quantize_act<A>(job.x.data(), n, D, D, job.q13, job.qx);
#endif
  };
  for (size_t j = 0; j < jobs.size(); ++j)
    if (aten && (int64_t)jobs[j].tok.size() >= VNNI_MIN_TOKENS) {
      gather(j);
      done[j] = 1;
      expert_aten<A>(jobs[j], D, x, out[j]);
    }
  const auto [whole, rest] = whole_experts(jobs, D);
  if (!whole.empty()) {  // each thread gathers its experts' tokens
    std::atomic<size_t> next{0};
    at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
      for (size_t i; (i = next.fetch_add(1)) < whole.size();) {
        gather(whole[i]);
        expert_stream<A>(jobs[whole[i]], D, out[whole[i]]);
      }
    });
    if (rest.empty()) return combine<A>(x, jobs, out);
    for (int64_t j : whole) done[j] = 1;
  }
  for (size_t j = 0; j < jobs.size(); ++j) {
    if (done[j]) continue;
    gather(j);
    for (int64_t blk = 0; blk < (jobs[j].F + BLOCK - 1) / BLOCK; ++blk) {
      item_job.push_back(j);
      item_blk.push_back(blk);
    }
  }
  std::vector<double> cost1(item_job.size());
  for (size_t i = 0; i < item_job.size(); ++i) cost1[i] = item_cost(jobs[item_job[i]]);
  balanced_for(cost1, [&](int64_t i0, int64_t i1) {
    std::vector<float> g, u;
    QScales blk;
    std::vector<uint32_t> pack;
    std::vector<A> tile;
    QMat gate, up;  // where this thread streams the current expert's gate and up rows
    for (int64_t it = i0; it < i1; ++it) {
      auto& job = jobs[item_job[it]];
      const int64_t F = job.F, n = job.tok.size(), f0 = item_blk[it] * BLOCK, f1 = std::min(F, f0 + BLOCK), nf = f1 - f0;
      g.assign(n * nf, 0.f);
      u.assign(n * nf, 0.f);
#if defined(__AVX512VNNI__)
      if (job.q13 && qdecode(job.q13, n)) {
        if (it == i0 || item_job[it - 1] != item_job[it]) {  // this thread's run of the expert's blocks
          int64_t e = it + 1;
          while (e < i1 && item_job[e] == item_job[it]) ++e;
          const int64_t fe = std::min(F, item_blk[e - 1] * BLOCK + BLOCK);
          gate = stream(job.q13, f0, fe);
          up = stream(job.q13, F + f0, F + fe);
        }
        qgemv_rows(gate.rows(f0, nf), 0, nf, job.qx, g.data(), nf, blk);
        qgemv_rows(up.rows(F + f0, nf), 0, nf, job.qx, u.data(), nf, blk);
      } else
#endif
      {
        if (job.q13) tile.resize(std::max<size_t>(tile.size(), 2 * nf * D));  // gate and up tiles, no realloc between
        const A* wg = weight_rows(job.w13, job.q13, f0, nf, D, tile);
        const A* wu = weight_rows(job.w13, job.q13, F + f0, nf, D, tile, nf);
        if (pairs<A>(n, D)) {
          pair_rows<A>(wg, wu, nf, job.x.data(), n, D, g.data(), u.data(), nf, pack);
        } else {
          matmul_rows<A>(wg, 0, nf, job.x.data(), n, D, g.data(), nf, pack);
          matmul_rows<A>(wu, 0, nf, job.x.data(), n, D, u.data(), nf, pack);
        }
      }
      for (int64_t i = 0; i < n; ++i)  // round like torch: gate, up and silu(gate) land in the activation dtype
        swiglu_row<A>(g.data() + i * nf, u.data() + i * nf, nf, job.act.data() + i * F + f0);
    }
  });
#if defined(__AVX512VNNI__)
  std::vector<int64_t> todo;  // jobs whose activations are quantised for their down rows
  int64_t elements = 0;
  for (size_t j = 0; j < jobs.size(); ++j)
    if (!done[j] && jobs[j].q2 && qdecode(jobs[j].q2, jobs[j].tok.size())) {
      todo.push_back(j);
      elements += jobs[j].tok.size() * jobs[j].F;
    }
  // a parallel region only where it pays: each one waits for every thread, a descheduled one included
  at::parallel_for(0, todo.size(), elements < (1 << 16) ? todo.size() : 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      auto& job = jobs[todo[i]];
      quantize_act<A>(job.act.data(), job.tok.size(), job.F, job.F, job.q2, job.qact);
    }
  });
#endif
  // Phase 2: each work item streams one expert's down-projection rows for one D-block (two blocks at
  // once where the pair kernel applies: many tokens, bf16).
  std::vector<int64_t> item_d0, item_d1;
  item_job.clear();
  for (size_t j = 0; j < jobs.size(); ++j) {
    if (done[j]) continue;
    const int64_t step = paired_down<A>(jobs[j]) ? 2 * BLOCK : BLOCK;
    for (int64_t d0 = 0; d0 < D; d0 += step) {
      item_job.push_back(j);
      item_d0.push_back(d0);
      item_d1.push_back(std::min(D, d0 + step));
    }
  }
  std::vector<double> cost2(item_job.size());
  for (size_t i = 0; i < cost2.size(); ++i)
    cost2[i] = item_cost(jobs[item_job[i]]) * (item_d1[i] - item_d0[i]) / BLOCK;
  balanced_for(cost2, [&](int64_t i0, int64_t i1) {
    std::vector<uint32_t> pack;
    QScales blk;
    std::vector<A> tile;
    QMat down;  // where this thread streams the current expert's down rows
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t j = item_job[it], d0 = item_d0[it], d1 = item_d1[it];
      auto& job = jobs[j];
      const int64_t n = job.tok.size(), F = job.F;
#if defined(__AVX512VNNI__)
      if (job.q2 && qdecode(job.q2, n)) {
        if (it == i0 || item_job[it - 1] != j) {
          int64_t e = it + 1;
          while (e < i1 && item_job[e] == j) ++e;
          down = stream(job.q2, d0, item_d1[e - 1]);
        }
        qgemv_rows(down, d0, d1, job.qact, out[j].data(), D, blk);
        continue;
      }
#endif
      const A* w = weight_rows(job.w2, job.q2, d0, d1 - d0, F, tile);
      if (d1 - d0 == 2 * BLOCK && paired_down<A>(job))
        pair_rows(w, w + BLOCK * F, BLOCK, job.act.data(), n, F, out[j].data() + d0, out[j].data() + d0 + BLOCK, D,
                  pack);
      else
        matmul_rows<A>(w, 0, d1 - d0, job.act.data(), n, F, out[j].data() + d0, D, pack);
    }
  });
  return combine<A>(x, jobs, out);
}

// A stack of matrices [.., N, K] (or one): plain in the activation dtype, or quantised (`scale` defined).
template <typename A>
struct Stack {
  const A* w = nullptr;
  QMat q;
  int64_t N, K;
  Stack(const torch::Tensor& t, const torch::Tensor& scale, int64_t K) : N(t.size(-2)), K(K) {
    if (scale.defined()) q = qmat(t, scale, K);
    else w = (const A*)t.data_ptr();
  }
  Job<A> job(int64_t e, const Stack& down) const {  // expert e with its down projection
    Job<A> j{{}, {}, w ? w + e * N * K : nullptr, down.w ? down.w + e * down.N * down.K : nullptr, down.K};
    if (q) j.q13 = q.rows(e * N, N);
    if (down.q) j.q2 = down.q.rows(e * down.N, down.N);
    return j;
  }
};

template <typename A>
torch::Tensor moe_impl(const torch::Tensor& x, int64_t E, const Stack<A>& w13, const Stack<A>& w2,
                       const torch::Tensor& ids, const torch::Tensor& wts, const Stack<A>* s13, const Stack<A>* s2,
                       const torch::Tensor& swts, bool aten) {
  const int64_t T = ids.size(0), K = ids.size(1);
  const int64_t* I = ids.data_ptr<int64_t>();
  const float* Wt = wts.data_ptr<float>();
  std::vector<Job<A>> jobs;
  std::vector<int64_t> slot(E, -1);
  for (int64_t e = 0; e < E; ++e)  // experts in index order, tokens in order: deterministic
    for (int64_t t = 0; t < T; ++t)
      for (int64_t k = 0; k < K; ++k)
        if (I[t * K + k] == e) {
          if (slot[e] < 0) {
            slot[e] = jobs.size();
            jobs.push_back(w13.job(e, w2));
          }
          jobs[slot[e]].tok.push_back(t);
          jobs[slot[e]].wt.push_back(Wt[t * K + k]);
        }
  if (s13) {  // the shared expert (its own width): one more job over every token, in the same pass
    Job<A> shared = s13->job(0, *s2);
    const float* sw = swts.defined() ? swts.data_ptr<float>() : nullptr;
    for (int64_t t = 0; t < T; ++t) {
      shared.tok.push_back(t);
      shared.wt.push_back(sw ? sw[t] : 1.f);
    }
    jobs.push_back(std::move(shared));
  }
  return experts_impl<A>(x, jobs, aten);
}

// x [T, D] against a weight [.., N, K]: plain in x's dtype, or quantised (scale defined; qmat() checks its data
// against K: int4 and int8 panels are both uint8, told apart by their width).
inline void check_weight(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scale, int64_t K) {
  if (!scale.defined()) {
    check_pair(x, w);
    return check(w.size(-1) == K, "a weight's columns do not match the input width");
  }
  check(x.dim() == 2 && x.is_contiguous() && (is_bf16(x) || x.scalar_type() == torch::kFloat32),
        "x must be contiguous bfloat16 or float32 [T, D]");
}

inline torch::Tensor opt(const c10::optional<torch::Tensor>& t) { return t.has_value() ? *t : torch::Tensor(); }

template <typename A>
torch::Tensor mlp_impl(const torch::Tensor& x, const Stack<A>& w13, const Stack<A>& w2) {
  std::vector<Job<A>> jobs{w13.job(0, w2)};
  for (int64_t t = 0; t < x.size(0); ++t) {
    jobs[0].tok.push_back(t);
    jobs[0].wt.push_back(1.f);
  }
  return experts_impl<A>(x, jobs, false);
}

torch::Tensor mlp(torch::Tensor x, torch::Tensor w13, torch::Tensor w2, c10::optional<torch::Tensor> q13,
                  c10::optional<torch::Tensor> q2) {
  check(x.dim() == 2 && w13.dim() == 2 && w2.dim() == 2 && w13.size(0) % 2 == 0 && w2.size(0) == x.size(1),
        "MLP shapes");
  const int64_t D = x.size(1), F = w13.size(0) / 2;
  check_weight(x, w13, opt(q13), D);
  check_weight(x, w2, opt(q2), F);
  if (is_bf16(x)) return mlp_impl<bf16>(x, Stack<bf16>(w13, opt(q13), D), Stack<bf16>(w2, opt(q2), F));
  return mlp_impl<float>(x, Stack<float>(w13, opt(q13), D), Stack<float>(w2, opt(q2), F));
}

template <typename A>
torch::Tensor moe_t(const torch::Tensor& x, const torch::Tensor& w13, const torch::Tensor& w2, const torch::Tensor& ids,
                    const torch::Tensor& wts, const torch::Tensor& s13, const torch::Tensor& s2,
                    const torch::Tensor& swts, bool aten, const torch::Tensor* q) {
  const int64_t D = x.size(1);
  Stack<A> a13(w13, q[0], D), a2(w2, q[1], w13.size(1) / 2);
  if (!s13.defined()) return moe_impl<A>(x, w13.size(0), a13, a2, ids, wts, nullptr, nullptr, swts, aten);
  Stack<A> b13(s13, q[2], D), b2(s2, q[3], s13.size(0) / 2);
  return moe_impl<A>(x, w13.size(0), a13, a2, ids, wts, &b13, &b2, swts, aten);
}

// Routed experts w13 [E, 2F, D], w2 [E, D, F] and an optional shared expert s13 [2Fs, D], s2 [D, Fs];
// q13 .. qs2: the float16 scales of those that are quantised (their data int8 rows, or uint8: int4, int8 panels).
torch::Tensor moe(torch::Tensor x, torch::Tensor w13, torch::Tensor w2, torch::Tensor ids, torch::Tensor wts,
                  c10::optional<torch::Tensor> s13_opt, c10::optional<torch::Tensor> s2_opt,
                  c10::optional<torch::Tensor> swts_opt, bool aten, c10::optional<torch::Tensor> q13,
                  c10::optional<torch::Tensor> q2, c10::optional<torch::Tensor> qs13,
                  c10::optional<torch::Tensor> qs2) {
  const torch::Tensor s13 = opt(s13_opt), s2 = opt(s2_opt), swts = opt(swts_opt);
  const torch::Tensor q[4] = {opt(q13), opt(q2), opt(qs13), opt(qs2)};
  check(x.dim() == 2 && w13.dim() == 3 && w2.dim() == 3 && w13.size(0) == w2.size(0) && w13.size(1) % 2 == 0 &&
            w2.size(1) == x.size(1), "expert shapes");
  const int64_t D = x.size(1), F = w13.size(1) / 2;
  check_weight(x, w13, q[0], D);
  check_weight(x, w2, q[1], F);
  if (s13.defined()) {
    check(s13.dim() == 2 && s2.dim() == 2 && s13.size(0) % 2 == 0 && s2.size(0) == D, "shared MLP shapes");
    const int64_t Fs = s13.size(0) / 2;
    check_weight(x, s13, q[2], D);
    check_weight(x, s2, q[3], Fs);
    check(!swts.defined() || (swts.scalar_type() == torch::kFloat32 && swts.is_contiguous() &&
                              swts.numel() == x.size(0)), "shared weights must be float32 [T]");
  }
  check(ids.scalar_type() == torch::kLong && wts.scalar_type() == torch::kFloat32 && ids.is_contiguous() &&
            wts.is_contiguous() && ids.sizes() == wts.sizes() && ids.size(0) == x.size(0),
        "ids must be int64 [T, K] and weights float32 [T, K]");
  return is_bf16(x) ? moe_t<bf16>(x, w13, w2, ids, wts, s13, s2, swts, aten, q)
                    : moe_t<float>(x, w13, w2, ids, wts, s13, s2, swts, aten, q);
}

}  // namespace moekit
