// Dense linear, SwiGLU MLP, routing and the fused MoE layer (routed experts + optional shared expert).

#include "gemm.h"

namespace moekit {

template <typename A>
torch::Tensor linear_impl(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& b) {
  const int64_t T = x.size(0), D = x.size(1), N = w.size(0);
  std::vector<float> acc(T * N);
  const A* W = (const A*)w.data_ptr();
  const A* X = (const A*)x.data_ptr();
  at::parallel_for(0, (N + BLOCK - 1) / BLOCK, 1, [&](int64_t b0, int64_t b1) {
    std::vector<uint32_t> pack;
    matmul_rows<A>(W, b0 * BLOCK, std::min(N, b1 * BLOCK), X, T, D, acc.data(), N, pack);
  });
  auto y = torch::empty({T, N}, x.options());
  A* Y = (A*)y.data_ptr();
  const A* B = b.has_value() ? (const A*)b->data_ptr() : nullptr;
  for (int64_t i = 0; i < T * N; ++i) Y[i] = from_f<A>(acc[i] + (B ? to_f<A>(B[i % N]) : 0.f));
  return y;
}

// out[c] = silu(g[c]) * u[c] from float32 gate/up values, each rounded to the activation dtype first.
template <typename A>
inline void swiglu_row(const float* g, const float* u, int64_t n, A* out) {
  int64_t c = 0;
#if defined(__AVX512F__)
  const A* tag = nullptr;
  for (; c + 16 <= n; c += 16) {
    __m512 gv = rnd(_mm512_loadu_ps(g + c), tag), uv = rnd(_mm512_loadu_ps(u + c), tag);
    __m512 s = rnd(_mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv)))), tag);
    store16(out + c, _mm512_mul_ps(s, uv));
  }
#endif
  for (; c < n; ++c)
    out[c] = from_f<A>(to_f<A>(from_f<A>(silu(to_f<A>(from_f<A>(g[c]))))) * to_f<A>(from_f<A>(u[c])));
}

// A routed (or shared) expert's share of the batch: its tokens, their combine weights,
// where its gate/up rows and down rows live, and scratch for its gathered input/activation.
template <typename A>
struct Job {
  std::vector<int64_t> tok;
  std::vector<float> wt;
  const A* w13;  // [2F, D]: gate rows, then up rows
  const A* w2;   // [D, F]
  int64_t F;     // this expert's (padded) width
  std::vector<A> x, act;
};

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
  auto w13 = torch::from_blob(const_cast<A*>(job.w13), {2 * F, D}, like.options());
  auto w2 = torch::from_blob(const_cast<A*>(job.w2), {D, F}, like.options());
  torch::Tensor h = at::mm(x, w13.t()).to(torch::kFloat32).contiguous();  // [n, 2F], rounded to A by the GEMM
  const float* H = h.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) swiglu_row<A>(H + i * 2 * F, H + i * 2 * F + F, F, job.act.data() + i * F);
  auto act = torch::from_blob(job.act.data(), {n, F}, like.options());
  torch::Tensor y = at::mm(act, w2.t()).to(torch::kFloat32).contiguous();
  std::memcpy(out.data(), y.data_ptr<float>(), n * D * sizeof(float));
}

// SwiGLU experts: y[t] = sum_j wt_j * down_j(silu(gate_j x_t) * up_j x_t).
// With `aten`, experts with at least VNNI_MIN_TOKENS tokens run on ATen's GEMMs one after the other
// (each parallel inside); the rest run here in two phases. Phase 1 (parallel over (expert, F-block)):
// activations. Phase 2 (parallel over (expert, D-block)): down projections. Then a combine in a fixed
// order, so results are deterministic.
template <typename A>
torch::Tensor experts_impl(const torch::Tensor& x, std::vector<Job<A>>& jobs, bool aten) {
  const int64_t T = x.size(0), D = x.size(1);
  const A* X = (const A*)x.data_ptr();
  std::vector<int64_t> item_job, item_blk;
  std::vector<std::vector<float>> out(jobs.size());
  std::vector<char> big(jobs.size(), 0);
  for (size_t j = 0; j < jobs.size(); ++j) {
    auto& job = jobs[j];
    const int64_t n = job.tok.size();
    job.x.resize(n * D);
    job.act.resize(n * job.F);
    out[j].assign(n * D, 0.f);
    for (int64_t i = 0; i < n; ++i) std::memcpy(job.x.data() + i * D, X + job.tok[i] * D, D * sizeof(A));
    if (aten && n >= VNNI_MIN_TOKENS) {
      big[j] = 1;
      expert_aten<A>(job, D, x, out[j]);
      continue;
    }
    for (int64_t blk = 0; blk < (job.F + BLOCK - 1) / BLOCK; ++blk) {
      item_job.push_back(j);
      item_blk.push_back(blk);
    }
  }
  std::vector<double> cost1(item_job.size());
  for (size_t i = 0; i < item_job.size(); ++i) cost1[i] = ITEM_COST + jobs[item_job[i]].tok.size();
  balanced_for(cost1, [&](int64_t i0, int64_t i1) {
    std::vector<float> g, u;
    std::vector<uint32_t> pack;
    for (int64_t it = i0; it < i1; ++it) {
      auto& job = jobs[item_job[it]];
      const int64_t F = job.F, n = job.tok.size(), f0 = item_blk[it] * BLOCK, f1 = std::min(F, f0 + BLOCK), nf = f1 - f0;
      g.assign(n * nf, 0.f);
      u.assign(n * nf, 0.f);
      if (pairs<A>(n, D)) {
        pair_rows<A>(job.w13 + f0 * D, job.w13 + (F + f0) * D, nf, job.x.data(), n, D, g.data(), u.data(), nf, pack);
      } else {
        matmul_rows<A>(job.w13 + f0 * D, 0, nf, job.x.data(), n, D, g.data(), nf, pack);
        matmul_rows<A>(job.w13 + (F + f0) * D, 0, nf, job.x.data(), n, D, u.data(), nf, pack);
      }
      for (int64_t i = 0; i < n; ++i)  // round like torch: gate, up and silu(gate) land in the activation dtype
        swiglu_row<A>(g.data() + i * nf, u.data() + i * nf, nf, job.act.data() + i * F + f0);
    }
  });
  // Phase 2: each work item streams one expert's down-projection rows for one D-block (two blocks at
  // once where the pair kernel applies: many tokens, bf16).
  std::vector<int64_t> item_d0, item_d1;
  item_job.clear();
  for (size_t j = 0; j < jobs.size(); ++j) {
    if (big[j]) continue;
    const int64_t step = paired_down<A>(jobs[j]) ? 2 * BLOCK : BLOCK;
    for (int64_t d0 = 0; d0 < D; d0 += step) {
      item_job.push_back(j);
      item_d0.push_back(d0);
      item_d1.push_back(std::min(D, d0 + step));
    }
  }
  std::vector<double> cost2(item_job.size());
  for (size_t i = 0; i < cost2.size(); ++i)
    cost2[i] = (ITEM_COST + jobs[item_job[i]].tok.size()) * (item_d1[i] - item_d0[i]) / BLOCK;
  balanced_for(cost2, [&](int64_t i0, int64_t i1) {
    std::vector<uint32_t> pack;
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t j = item_job[it], d0 = item_d0[it], d1 = item_d1[it];
      auto& job = jobs[j];
      const int64_t n = job.tok.size(), F = job.F;
      if (d1 - d0 == 2 * BLOCK && paired_down<A>(job))
        pair_rows(job.w2 + d0 * F, job.w2 + (d0 + BLOCK) * F, BLOCK, job.act.data(), n, F, out[j].data() + d0,
                  out[j].data() + d0 + BLOCK, D, pack);
      else
        matmul_rows<A>(job.w2, d0, d1, job.act.data(), n, F, out[j].data(), D, pack);
    }
  });
  // Combine in a fixed job order (deterministic), parallel over column blocks, each expert output
  // rounded to the activation dtype first as torch's bf16 linear would leave it.
  auto y = torch::empty({T, D}, x.options());
  A* Y = (A*)y.data_ptr();
  at::parallel_for(0, (D + 255) / 256, 1, [&](int64_t b0, int64_t b1) {
    const int64_t c0 = b0 * 256, c1 = std::min(D, b1 * 256);
    std::vector<float> acc(T * (c1 - c0), 0.f);
    const int64_t w = c1 - c0;
    const A* tag = nullptr;
    for (size_t j = 0; j < jobs.size(); ++j)
      for (size_t i = 0; i < jobs[j].tok.size(); ++i) {
        float* dst = acc.data() + jobs[j].tok[i] * w;
        const float* src = out[j].data() + i * D + c0;
        const float wt = jobs[j].wt[i];
        int64_t c = 0;
#if defined(__AVX512F__)
        for (; c + 16 <= w; c += 16)
          _mm512_storeu_ps(dst + c, _mm512_fmadd_ps(_mm512_set1_ps(wt), rnd(_mm512_loadu_ps(src + c), tag),
                                                    _mm512_loadu_ps(dst + c)));
#endif
        for (; c < w; ++c) dst[c] += wt * to_f<A>(from_f<A>(src[c]));
      }
    for (int64_t t = 0; t < T; ++t) {
      int64_t c = 0;
#if defined(__AVX512F__)
      for (; c + 16 <= w; c += 16) store16(Y + t * D + c0 + c, _mm512_loadu_ps(acc.data() + t * w + c));
#endif
      for (; c < w; ++c) Y[t * D + c0 + c] = from_f<A>(acc[t * w + c]);
    }
  });
  return y;
}

template <typename A>
torch::Tensor moe_impl(const torch::Tensor& x, const torch::Tensor& w13, const torch::Tensor& w2,
                       const torch::Tensor& ids, const torch::Tensor& wts, const torch::Tensor& s13,
                       const torch::Tensor& s2, const torch::Tensor& swts, bool aten) {
  const int64_t T = ids.size(0), K = ids.size(1), E = w13.size(0), F = w2.size(2), D = x.size(1);
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
            jobs.push_back(Job<A>{{}, {}, (const A*)w13.data_ptr() + e * 2 * F * D, (const A*)w2.data_ptr() + e * D * F, F});
          }
          jobs[slot[e]].tok.push_back(t);
          jobs[slot[e]].wt.push_back(Wt[t * K + k]);
        }
  if (s13.defined()) {  // the shared expert (its own width): one more job over every token, in the same pass
    Job<A> shared{{}, {}, (const A*)s13.data_ptr(), (const A*)s2.data_ptr(), s2.size(1)};
    const float* sw = swts.defined() ? swts.data_ptr<float>() : nullptr;
    for (int64_t t = 0; t < T; ++t) {
      shared.tok.push_back(t);
      shared.wt.push_back(sw ? sw[t] : 1.f);
    }
    jobs.push_back(std::move(shared));
  }
  return experts_impl<A>(x, jobs, aten);
}

// Top-k routing of float32 logits [T, E]: softmax (or sigmoid) scores, the k largest (ties to the
// lower index), optionally divided by their sum (+ eps), times scale. Returns (weights, ids).
std::vector<torch::Tensor> route(torch::Tensor logits, int64_t k, bool softmax, bool renorm, double eps,
                                 double scale, c10::optional<torch::Tensor> bias_opt) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == torch::kFloat32 && logits.is_contiguous(),
              "moekit cpu kernel: logits must be contiguous float32 [T, E]");
  const int64_t T = logits.size(0), E = logits.size(1);
  TORCH_CHECK(0 < k && k <= E, "moekit cpu kernel: k out of range");
  auto wts = torch::empty({T, k}, logits.options());
  auto ids = torch::empty({T, k}, logits.options().dtype(torch::kLong));
  const float* L = logits.data_ptr<float>();
  float* Wp = wts.data_ptr<float>();
  int64_t* Ip = ids.data_ptr<int64_t>();
  std::vector<float> p(E), pick(E);
  std::vector<int64_t> order(E);
  const float* bias = nullptr;
  if (bias_opt.has_value()) {
    TORCH_CHECK(bias_opt->scalar_type() == torch::kFloat32 && bias_opt->is_contiguous() && bias_opt->numel() == E,
                "moekit cpu kernel: bias must be contiguous float32 [E]");
    bias = bias_opt->data_ptr<float>();
  }
  for (int64_t t = 0; t < T; ++t) {
    const float* l = L + t * E;
    if (softmax) {
      float mx = -INFINITY, sum = 0.f;
      for (int64_t e = 0; e < E; ++e) mx = std::max(mx, l[e]);
      for (int64_t e = 0; e < E; ++e) sum += (p[e] = std::exp(l[e] - mx));
      for (int64_t e = 0; e < E; ++e) p[e] /= sum;
    } else {
      for (int64_t e = 0; e < E; ++e) p[e] = 1.f / (1.f + std::exp(-l[e]));
    }
    for (int64_t e = 0; e < E; ++e) {  // the bias (DeepSeek-V3 balancing) shifts the selection only
      order[e] = e;
      pick[e] = bias ? p[e] + bias[e] : p[e];
    }
    std::partial_sort(order.begin(), order.begin() + k, order.end(),
                      [&](int64_t a, int64_t b) { return pick[a] > pick[b] || (pick[a] == pick[b] && a < b); });
    float total = 0.f;
    for (int64_t j = 0; j < k; ++j) total += p[order[j]];
    const float div = renorm ? total + (float)eps : 1.f;
    for (int64_t j = 0; j < k; ++j) {
      Ip[t * k + j] = order[j];
      Wp[t * k + j] = p[order[j]] / div * (float)scale;
    }
  }
  return {wts, ids};
}

template <typename A>
torch::Tensor mlp_impl(const torch::Tensor& x, const torch::Tensor& w13, const torch::Tensor& w2) {
  const int64_t T = x.size(0);
  std::vector<Job<A>> jobs(1);
  for (int64_t t = 0; t < T; ++t) {
    jobs[0].tok.push_back(t);
    jobs[0].wt.push_back(1.f);
  }
  jobs[0].w13 = (const A*)w13.data_ptr();
  jobs[0].w2 = (const A*)w2.data_ptr();
  jobs[0].F = w2.size(1);
  return experts_impl<A>(x, jobs, false);
}

torch::Tensor linear(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> b) {
  check_pair(x, w);
  check(w.dim() == 2 && w.size(1) == x.size(1), "weight must be [N, D]");
  return is_bf16(x) ? linear_impl<bf16>(x, w, b) : linear_impl<float>(x, w, b);
}

torch::Tensor mlp(torch::Tensor x, torch::Tensor w13, torch::Tensor w2) {
  check_pair(x, w13);
  check_pair(x, w2);
  check(w13.size(0) == 2 * w2.size(1) && w13.size(1) == x.size(1) && w2.size(0) == x.size(1), "MLP shapes");
  return is_bf16(x) ? mlp_impl<bf16>(x, w13, w2) : mlp_impl<float>(x, w13, w2);
}

torch::Tensor moe(torch::Tensor x, torch::Tensor w13, torch::Tensor w2, torch::Tensor ids, torch::Tensor wts,
                  c10::optional<torch::Tensor> s13_opt, c10::optional<torch::Tensor> s2_opt,
                  c10::optional<torch::Tensor> swts_opt, bool aten) {
  check_pair(x, w13);
  check_pair(x, w2);
  torch::Tensor s13 = s13_opt.has_value() ? *s13_opt : torch::Tensor();
  torch::Tensor s2 = s2_opt.has_value() ? *s2_opt : torch::Tensor();
  torch::Tensor swts = swts_opt.has_value() ? *swts_opt : torch::Tensor();
  if (s13.defined()) {
    check_pair(x, s13);
    check_pair(x, s2);
    check(s13.size(0) == 2 * s2.size(1) && s13.size(1) == x.size(1) && s2.size(0) == x.size(1), "shared MLP shapes");
    check(!swts.defined() || (swts.scalar_type() == torch::kFloat32 && swts.is_contiguous() &&
                              swts.numel() == x.size(0)), "shared weights must be float32 [T]");
  }
  check(w13.dim() == 3 && w2.dim() == 3 && w13.size(1) == 2 * w2.size(2) && w13.size(2) == x.size(1), "expert shapes");
  check(ids.scalar_type() == torch::kLong && wts.scalar_type() == torch::kFloat32 && ids.is_contiguous() &&
            wts.is_contiguous() && ids.sizes() == wts.sizes() && ids.size(0) == x.size(0),
        "ids must be int64 [T, K] and weights float32 [T, K]");
  return is_bf16(x) ? moe_impl<bf16>(x, w13, w2, ids, wts, s13, s2, swts, aten)
                    : moe_impl<float>(x, w13, w2, ids, wts, s13, s2, swts, aten);
}

}  // namespace moekit
