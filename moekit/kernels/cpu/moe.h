// The fused MoE layer's pieces shared by its two schedules (experts.cpp): an expert's job, the SwiGLU
// row, the combine, and the decode schedule that gives whole experts to threads.
//
// Shape legend: T tokens, D model width, F expert width, n an expert's tokens.
#pragma once

#include <numeric>

#include "qgemm.h"

namespace moekit {

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
  QMat q13, q2;   // quantised weights instead of w13 / w2, where set
  QAct qx, qact;  // x and act quantised for them (few tokens)
};

// y [T, D] = sum over jobs of each token's combine weight times its expert output (out[j] [n_j, D]).
template <typename A>
torch::Tensor combine(const torch::Tensor& x, const std::vector<Job<A>>& jobs, const std::vector<std::vector<float>>& out) {
  const int64_t T = x.size(0), D = x.size(1);
  // Combine in a fixed job order (deterministic), parallel over column blocks, each expert output
  // rounded to the activation dtype first as torch's bf16 linear would leave it.
  auto y = torch::empty({T, D}, x.options());
  A* Y = (A*)y.data_ptr();
  const int64_t blocks = (D + 255) / 256, combined = T * D * (int64_t)jobs.size();
  at::parallel_for(0, blocks, combined < (1 << 16) ? blocks : 1, [&](int64_t b0, int64_t b1) {  // decode: inline
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

// Whether an expert's job streams its rows at its token count (the GEMV kernels) rather than tiling them.
template <typename A>
bool streams(const Job<A>& job) {
  const int64_t n = job.tok.size();
  return (job.q13 ? qdecode(job.q13, n) : n < VNNI_MIN_TOKENS) && (job.q2 ? qdecode(job.q2, n) : n < VNNI_MIN_TOKENS);
}

// What a work item of the job costs per weight row, in tokens' worth (ITEM_COST, PANEL_ITEM_COST).
template <typename A>
double item_cost(const Job<A>& job) {
  return (job.q13.panels ? PANEL_ITEM_COST : ITEM_COST) + job.tok.size();
}

// Few tokens, at least as many experts as threads: whole experts to threads. Returns (the experts to run
// whole, largest first; the rest, split by blocks). Each thread takes the next whole expert when it is free,
// so one whose experts stream slower than their cost says (or that the machine stalls) does not hold up
// the other, and streams its gate+up rows and down rows front to back, with no barrier between the two.
// The whole set is the largest prefix that a largest-first assignment by cost spreads within 5% of even:
// an odd expert left over (7 of Mixtral's 8 at batch 8) goes to the blocks, shared by all threads, instead
// of idling a thread for most of an expert (a Mixtral-shaped int8 layer of 8 tokens on 5 experts: +7.9%;
// on 7 or 8 within noise, as a thread left alone streams faster; engine batch 8 +0.9% int8, +1.6% bf16,
// in-process A/B). Failing that, all whole where within 15%; else none (all blocks: each thread restarts
// its prefetch at every part and waits for the other before the down rows).
template <typename A>
std::pair<std::vector<int64_t>, std::vector<int64_t>> whole_experts(const std::vector<Job<A>>& jobs, int64_t D) {
  const int64_t threads = at::get_num_threads(), J = jobs.size();
  if (threads < 2 || J < threads || at::in_parallel_region()) return {};
  std::vector<double> cost(J);
  for (int64_t j = 0; j < J; ++j) {
    if (!streams(jobs[j])) return {};
    cost[j] = 3.0 * jobs[j].F * D * item_cost(jobs[j]);
  }
  std::vector<int64_t> order(J);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  std::vector<double> load(threads, 0.0);  // the assignment of the first n experts, n = 1 .. J in turn
  double total = 0, over = 0;              // over: how far the busiest thread is above the mean (a fraction)
  int64_t n = 0;                           // the largest prefix within 5%
  for (int64_t i = 0; i < J; ++i) {
    *std::min_element(load.begin(), load.end()) += cost[order[i]];
    total += cost[order[i]];
    over = *std::max_element(load.begin(), load.end()) / (total / threads) - 1.0;
    if (i + 1 >= threads && over <= 0.05) n = i + 1;
  }
  if (!n && over <= 0.15) n = J;
  if (!n) return {};
  return {std::vector<int64_t>(order.begin(), order.begin() + n), std::vector<int64_t>(order.begin() + n, order.end())};
}

// One expert over its few tokens on this thread: gate and up rows as one stream, SwiGLU, down rows.
template <typename A>
void expert_stream(Job<A>& job, int64_t D, std::vector<float>& out) {
  const int64_t n = job.tok.size(), F = job.F;
  std::vector<float> gu(n * 2 * F, 0.f);
#if defined(__AVX512VNNI__)
  QScales blk;
  if (job.q13) qgemv_rows(stream(job.q13, 0, 2 * F), 0, 2 * F, job.qx, gu.data(), 2 * F, blk);
  else
#endif
    gemv_rows<A>(job.w13, 0, 2 * F, job.x.data(), n, D, gu.data(), 2 * F);
  for (int64_t i = 0; i < n; ++i)
    swiglu_row<A>(gu.data() + i * 2 * F, gu.data() + i * 2 * F + F, F, job.act.data() + i * F);
#if defined(__AVX512VNNI__)
  if (job.q2) {
    quantize_act<A>(job.act.data(), n, F, F, job.q2, job.qact);
    qgemv_rows(stream(job.q2, 0, D), 0, D, job.qact, out.data(), D, blk);
    return;
  }
#endif
  gemv_rows<A>(job.w2, 0, D, job.act.data(), n, F, out.data(), D);
}

}  // namespace moekit
