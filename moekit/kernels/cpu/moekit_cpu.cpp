// moekit CPU kernels for decode-sized batches (a few tokens): memory-bound GEMV, a fused
// SwiGLU MLP, a fused MoE layer and RMSNorm. Weights are read in place from the model's
// stacked tensors (no packing). bf16 uses AVX512-BF16 dot products (vdpbf16ps) with float32
// accumulation; float32 uses AVX512F FMAs; other builds fall back to scalar loops.
// Threads come from torch (at::parallel_for). The plain PyTorch twin, moekit/kernels/reference.py,
// is the oracle these are tested against.
//
// Shape legend: T tokens, D model width, N output rows, E experts, K experts per token,
// F (padded) expert width.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <vector>

namespace {

using bf16 = uint16_t;

inline float bf2f(bf16 v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline bf16 f2bf(float f) {  // round to nearest even, as torch does
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16((u >> 16) | 64u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16(u >> 16);
}

template <typename A> inline float to_f(A v);
template <> inline float to_f<float>(float v) { return v; }
template <> inline float to_f<bf16>(bf16 v) { return bf2f(v); }
template <typename A> inline A from_f(float v);
template <> inline float from_f<float>(float v) { return v; }
template <> inline bf16 from_f<bf16>(float v) { return f2bf(v); }

#if defined(__AVX512F__)
// exp(x) for 16 floats: 2^n * p(r) with x = n ln2 + r, |r| <= ln2/2 (Cephes polynomial, rel. error ~1e-7).
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-88.0f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const bf16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline __m256i bf16x16(__m512 v) {  // round to nearest even (NaNs are not produced by these kernels)
  __m512i u = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  u = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16));
}
inline void store16(bf16* p, __m512 v) { _mm256_storeu_si256((__m256i*)p, bf16x16(v)); }
// v rounded to the activation dtype and back (torch rounds after every bf16 op)
inline __m512 rnd(__m512 v, const float*) { return v; }
inline __m512 rnd(__m512 v, const bf16*) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16x16(v)), 16));
}

// Horizontal sums of 16 vectors at once: lane i of the result = sum of the lanes of v[i].
// Four rounds of shuffles and adds (about 30 instructions instead of 16 separate reductions).
inline __m512 reduce16(const __m512* v) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [v2i(0+2), v2i+1(0+2), v2i(1+3), v2i+1(1+3)]
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)  // per 128-bit lane: the lane's full sums of v4i .. v4i+3
    b[i] = _mm512_add_ps(_mm512_shuffle_ps(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int i = 0; i < 2; ++i)  // 128-bit lanes [b2i.L0+L2, b2i.L1+L3, b2i+1.L0+L2, b2i+1.L1+L3]
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// out[t * ldo + r] += horizontal sum of acc[t][r] for TB x RR accumulators (TB * RR <= 16).
template <int TB, int RR>
inline void add_sums(__m512 (&acc)[TB][RR], float* out, int64_t ldo) {
  static_assert(TB * RR <= 16, "at most 16 accumulators");
  __m512 v[16];
  for (int i = 0; i < 16; ++i) v[i] = i < TB * RR ? acc[i / RR][i % RR] : _mm512_setzero_ps();
  alignas(64) float sums[16];
  _mm512_store_ps(sums, reduce16(v));
  for (int i = 0; i < TB * RR; ++i) out[(i / RR) * ldo + i % RR] += sums[i];
}
#endif

// out[t * ldo + r] += sum_d W[r * ldw + d] * X[t * ldx + d] for RR weight rows and TB tokens.
// The next RR rows are prefetched while these are computed: with several tokens the core is busy
// long enough that the hardware prefetcher alone falls behind (2x at 8 tokens).
template <int TB, int RR>
inline void dot_block(const bf16* W, int64_t ldw, const bf16* X, int64_t ldx, int64_t D, float* out, int64_t ldo) {
#if defined(__AVX512BF16__)
  __m512 acc[TB][RR];
  for (int t = 0; t < TB; ++t)
    for (int r = 0; r < RR; ++r) acc[t][r] = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + 32 <= D; d += 32) {
    __m512bh w[RR];
    for (int r = 0; r < RR; ++r) _mm_prefetch((const char*)(W + (r + RR) * ldw + d), _MM_HINT_T0);
    for (int r = 0; r < RR; ++r) w[r] = (__m512bh)_mm512_loadu_si512(W + r * ldw + d);
    for (int t = 0; t < TB; ++t) {
      __m512bh x = (__m512bh)_mm512_loadu_si512(X + t * ldx + d);
      for (int r = 0; r < RR; ++r) acc[t][r] = _mm512_dpbf16_ps(acc[t][r], w[r], x);
    }
  }
  if (d < D) {
    __mmask32 m = (__mmask32)((1ull << (D - d)) - 1);
    __m512bh w[RR];
    for (int r = 0; r < RR; ++r) w[r] = (__m512bh)_mm512_maskz_loadu_epi16(m, W + r * ldw + d);
    for (int t = 0; t < TB; ++t) {
      __m512bh x = (__m512bh)_mm512_maskz_loadu_epi16(m, X + t * ldx + d);
      for (int r = 0; r < RR; ++r) acc[t][r] = _mm512_dpbf16_ps(acc[t][r], w[r], x);
    }
  }
  add_sums<TB, RR>(acc, out, ldo);
#else
  for (int t = 0; t < TB; ++t)
    for (int r = 0; r < RR; ++r) {
      float s = 0.f;
      for (int64_t d = 0; d < D; ++d) s += bf2f(W[r * ldw + d]) * bf2f(X[t * ldx + d]);
      out[t * ldo + r] += s;
    }
#endif
}

template <int TB, int RR>
inline void dot_block(const float* W, int64_t ldw, const float* X, int64_t ldx, int64_t D, float* out, int64_t ldo) {
#if defined(__AVX512F__)
  __m512 acc[TB][RR];
  for (int t = 0; t < TB; ++t)
    for (int r = 0; r < RR; ++r) acc[t][r] = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    __m512 w[RR];
    for (int r = 0; r < RR; ++r) _mm_prefetch((const char*)(W + (r + RR) * ldw + d), _MM_HINT_T0);
    for (int r = 0; r < RR; ++r) w[r] = _mm512_loadu_ps(W + r * ldw + d);
    for (int t = 0; t < TB; ++t) {
      __m512 x = _mm512_loadu_ps(X + t * ldx + d);
      for (int r = 0; r < RR; ++r) acc[t][r] = _mm512_fmadd_ps(w[r], x, acc[t][r]);
    }
  }
  if (d < D) {
    __mmask16 m = (__mmask16)((1u << (D - d)) - 1);
    __m512 w[RR];
    for (int r = 0; r < RR; ++r) w[r] = _mm512_maskz_loadu_ps(m, W + r * ldw + d);
    for (int t = 0; t < TB; ++t) {
      __m512 x = _mm512_maskz_loadu_ps(m, X + t * ldx + d);
      for (int r = 0; r < RR; ++r) acc[t][r] = _mm512_fmadd_ps(w[r], x, acc[t][r]);
    }
  }
  add_sums<TB, RR>(acc, out, ldo);
#else
  for (int t = 0; t < TB; ++t)
    for (int r = 0; r < RR; ++r) {
      float s = 0.f;
      for (int64_t d = 0; d < D; ++d) s += W[r * ldw + d] * X[t * ldx + d];
      out[t * ldo + r] += s;
    }
#endif
}

// Token blocks of up to 4; with 1-2 tokens, 8 weight rows per pass keep 8-16 accumulator chains
// in flight (vdpbf16ps is latency-bound with fewer), with 3-4 tokens 4 rows (12-16 chains).
template <int RR, typename A>
inline void rows_times_tokens(const A* W, int64_t ldw, const A* X, int64_t T, int64_t K, int64_t ldx, float* out,
                              int64_t ldo) {
  int64_t t = 0;
  if constexpr (RR <= 4) {
    for (; t + 4 <= T; t += 4) dot_block<4, RR>(W, ldw, X + t * ldx, ldx, K, out + t * ldo, ldo);
    if (T - t == 3) {
      dot_block<3, RR>(W, ldw, X + t * ldx, ldx, K, out + t * ldo, ldo);
      t += 3;
    }
  }
  for (; t + 2 <= T; t += 2) dot_block<2, RR>(W, ldw, X + t * ldx, ldx, K, out + t * ldo, ldo);
  if (T - t == 1) dot_block<1, RR>(W, ldw, X + t * ldx, ldx, K, out + t * ldo, ldo);
}

// Y[t, r] += ... (float, row stride ldo) for weight rows [r0, r1) of W [*, D] against X [T, D].
// With many tokens K is walked in chunks of KC so that the activation chunk stays in L2 while every
// weight row block reuses it; Y must be zeroed by the caller.
constexpr int64_t KC = 512;

template <typename A>
inline void gemv_rows(const A* W, int64_t r0, int64_t r1, const A* X, int64_t T, int64_t D, float* Y, int64_t ldo) {
  const int64_t step = T > 16 ? KC : D;  // few tokens: whole rows keep the weight streams sequential
  for (int64_t k0 = 0; k0 < D; k0 += step) {
    const int64_t kc = std::min(step, D - k0);
    int64_t r = r0;
    if (T <= 2) {
      for (; r + 8 <= r1; r += 8) rows_times_tokens<8>(W + r * D + k0, D, X + k0, T, kc, D, Y + r, ldo);
    } else {
      for (; r + 4 <= r1; r += 4) rows_times_tokens<4>(W + r * D + k0, D, X + k0, T, kc, D, Y + r, ldo);
    }
    for (; r < r1; ++r) rows_times_tokens<1>(W + r * D + k0, D, X + k0, T, kc, D, Y + r, ldo);
  }
}

constexpr int64_t BLOCK = 16;  // weight rows per parallel work item

inline float silu(float v) { return v / (1.f + std::exp(-v)); }

template <typename A>
torch::Tensor linear_impl(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& b) {
  const int64_t T = x.size(0), D = x.size(1), N = w.size(0);
  std::vector<float> acc(T * N);
  const A* W = (const A*)w.data_ptr();
  const A* X = (const A*)x.data_ptr();
  at::parallel_for(0, (N + BLOCK - 1) / BLOCK, 4, [&](int64_t b0, int64_t b1) {
    gemv_rows<A>(W, b0 * BLOCK, std::min(N, b1 * BLOCK), X, T, D, acc.data(), N);
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
  const A* w13;
  const A* w2;
  std::vector<A> x, act;
};

// SwiGLU experts over a few tokens: y[t] = sum_j wt_j * down_j(silu(gate_j x_t) * up_j x_t).
// Phase 1 (parallel over (expert, F-block)): activations. Phase 2 (parallel over (expert, D-block)):
// down projections, then a combine in a fixed order, so results are deterministic.
template <typename A>
torch::Tensor experts_impl(const torch::Tensor& x, std::vector<Job<A>>& jobs, int64_t F) {
  const int64_t T = x.size(0), D = x.size(1);
  const A* X = (const A*)x.data_ptr();
  std::vector<int64_t> item_job, item_blk;
  for (size_t j = 0; j < jobs.size(); ++j) {
    auto& job = jobs[j];
    const int64_t n = job.tok.size();
    job.x.resize(n * D);
    job.act.resize(n * F);
    for (int64_t i = 0; i < n; ++i) std::memcpy(job.x.data() + i * D, X + job.tok[i] * D, D * sizeof(A));
    for (int64_t blk = 0; blk < (F + BLOCK - 1) / BLOCK; ++blk) {
      item_job.push_back(j);
      item_blk.push_back(blk);
    }
  }
  at::parallel_for(0, (int64_t)item_job.size(), 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> g, u;
    for (int64_t it = i0; it < i1; ++it) {
      auto& job = jobs[item_job[it]];
      const int64_t n = job.tok.size(), f0 = item_blk[it] * BLOCK, f1 = std::min(F, f0 + BLOCK), nf = f1 - f0;
      g.assign(n * nf, 0.f);
      u.assign(n * nf, 0.f);
      gemv_rows<A>(job.w13 + f0 * D, 0, nf, job.x.data(), n, D, g.data(), nf);
      gemv_rows<A>(job.w13 + (F + f0) * D, 0, nf, job.x.data(), n, D, u.data(), nf);
      for (int64_t i = 0; i < n; ++i)  // round like torch: gate, up and silu(gate) land in the activation dtype
        swiglu_row<A>(g.data() + i * nf, u.data() + i * nf, nf, job.act.data() + i * F + f0);
    }
  });
  // Phase 2: each work item streams one expert's down-projection rows for one D-block.
  const int64_t nblk = (D + BLOCK - 1) / BLOCK;
  std::vector<std::vector<float>> out(jobs.size());
  for (size_t j = 0; j < jobs.size(); ++j) out[j].assign(jobs[j].tok.size() * D, 0.f);
  at::parallel_for(0, (int64_t)jobs.size() * nblk, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t it = i0; it < i1; ++it) {
      auto& job = jobs[it / nblk];
      const int64_t d0 = (it % nblk) * BLOCK, d1 = std::min(D, d0 + BLOCK);
      gemv_rows<A>(job.w2, d0, d1, job.act.data(), job.tok.size(), F, out[it / nblk].data(), D);
    }
  });
  std::vector<float> acc(T * D, 0.f);  // combine in a fixed order: deterministic
  for (size_t j = 0; j < jobs.size(); ++j)
    for (size_t i = 0; i < jobs[j].tok.size(); ++i) {
      float* dst = acc.data() + jobs[j].tok[i] * D;
      const float* src = out[j].data() + i * D;
      const float w = jobs[j].wt[i];
      for (int64_t c = 0; c < D; ++c) dst[c] += w * to_f<A>(from_f<A>(src[c]));
    }
  auto y = torch::empty({T, D}, x.options());
  A* Y = (A*)y.data_ptr();
  for (int64_t i = 0; i < T * D; ++i) Y[i] = from_f<A>(acc[i]);
  return y;
}

template <typename A>
torch::Tensor moe_impl(const torch::Tensor& x, const torch::Tensor& w13, const torch::Tensor& w2,
                       const torch::Tensor& ids, const torch::Tensor& wts, const torch::Tensor& s13,
                       const torch::Tensor& s2, const torch::Tensor& swts) {
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
            jobs.push_back(Job<A>{{}, {}, (const A*)w13.data_ptr() + e * 2 * F * D, (const A*)w2.data_ptr() + e * D * F});
          }
          jobs[slot[e]].tok.push_back(t);
          jobs[slot[e]].wt.push_back(Wt[t * K + k]);
        }
  torch::Tensor y = experts_impl<A>(x, jobs, F);
  if (!s13.defined()) return y;
  // The shared expert (its own width) runs as one more job over every token, added in the same order.
  std::vector<Job<A>> shared(1);
  shared[0].w13 = (const A*)s13.data_ptr();
  shared[0].w2 = (const A*)s2.data_ptr();
  const float* sw = swts.defined() ? swts.data_ptr<float>() : nullptr;
  for (int64_t t = 0; t < T; ++t) {
    shared[0].tok.push_back(t);
    shared[0].wt.push_back(sw ? sw[t] : 1.f);
  }
  torch::Tensor ys = experts_impl<A>(x, shared, s2.size(1));
  A* Y = (A*)y.data_ptr();
  const A* S = (const A*)ys.data_ptr();
  for (int64_t i = 0; i < T * D; ++i) Y[i] = from_f<A>(to_f<A>(Y[i]) + to_f<A>(S[i]));
  return y;
}

// Top-k routing of float32 logits [T, E]: softmax (or sigmoid) scores, the k largest (ties to the
// lower index), optionally divided by their sum (+ eps), times scale. Returns (weights, ids).
std::vector<torch::Tensor> route(torch::Tensor logits, int64_t k, bool softmax, bool renorm, double eps,
                                 double scale) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == torch::kFloat32 && logits.is_contiguous(),
              "moekit cpu kernel: logits must be contiguous float32 [T, E]");
  const int64_t T = logits.size(0), E = logits.size(1);
  TORCH_CHECK(0 < k && k <= E, "moekit cpu kernel: k out of range");
  auto wts = torch::empty({T, k}, logits.options());
  auto ids = torch::empty({T, k}, logits.options().dtype(torch::kLong));
  const float* L = logits.data_ptr<float>();
  float* Wp = wts.data_ptr<float>();
  int64_t* Ip = ids.data_ptr<int64_t>();
  std::vector<float> p(E);
  std::vector<int64_t> order(E);
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
    for (int64_t e = 0; e < E; ++e) order[e] = e;
    std::partial_sort(order.begin(), order.begin() + k, order.end(),
                      [&](int64_t a, int64_t b) { return p[a] > p[b] || (p[a] == p[b] && a < b); });
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
  return experts_impl<A>(x, jobs, w2.size(1));
}

template <typename A>
torch::Tensor rms_norm_impl(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  const int64_t T = x.size(0), D = x.size(1);
  auto y = torch::empty_like(x);
  const A* X = (const A*)x.data_ptr();
  const A* W = (const A*)w.data_ptr();
  A* Y = (A*)y.data_ptr();
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const A* xr = X + t * D;
      A* yr = Y + t * D;
      float ss = 0.f;
      int64_t d = 0;
#if defined(__AVX512F__)
      __m512 acc = _mm512_setzero_ps();
      for (; d + 16 <= D; d += 16) {
        __m512 v = load16(xr + d);
        acc = _mm512_fmadd_ps(v, v, acc);
      }
      ss = _mm512_reduce_add_ps(acc);
#endif
      for (int64_t e = d; e < D; ++e) ss += to_f<A>(xr[e]) * to_f<A>(xr[e]);
      const float r = 1.f / std::sqrt(ss / D + (float)eps);
      d = 0;
#if defined(__AVX512F__)  // normalised value lands in the activation dtype, then times the weight
      for (; d + 16 <= D; d += 16)
        store16(yr + d, _mm512_mul_ps(load16(W + d), rnd(_mm512_mul_ps(load16(xr + d), _mm512_set1_ps(r)), xr)));
#endif
      for (; d < D; ++d) yr[d] = from_f<A>(to_f<A>(W[d]) * to_f<A>(from_f<A>(to_f<A>(xr[d]) * r)));
    }
  });
  return y;
}


#if defined(__AVX512F__)
// P.V for RB query rows: o[r][c*16..] += sum_j p[r][j] * v[j][c*16..], NV = head width / 16.
template <int RB, int NV>
inline void pv_tile(const float* p, int64_t ldp, const float* vf, int64_t Dh, int64_t nk, float* o, const float* corr) {
  __m512 acc[RB][NV];
  for (int r = 0; r < RB; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_mul_ps(_mm512_loadu_ps(o + r * Dh + c * 16), _mm512_set1_ps(corr[r]));
  for (int64_t j = 0; j < nk; ++j) {
    __m512 v[NV];
    for (int c = 0; c < NV; ++c) v[c] = _mm512_loadu_ps(vf + j * Dh + c * 16);
    for (int r = 0; r < RB; ++r) {
      __m512 pr = _mm512_set1_ps(p[r * ldp + j]);
      for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_fmadd_ps(pr, v[c], acc[r][c]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int c = 0; c < NV; ++c) _mm512_storeu_ps(o + r * Dh + c * 16, acc[r][c]);
}

// Scores of 4 query rows (scaled, float32, zero-padded) against KB = 16 * NC keys: s[r][j] = q[r] . k[j].
template <int NC>
inline void qk_tile(const float* q, int64_t Dh, const float* kt, float* s) {
  __m512 acc[4][NC];
  for (int r = 0; r < 4; ++r)
    for (int c = 0; c < NC; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t d = 0; d < Dh; ++d) {
    __m512 kv[NC];
    for (int c = 0; c < NC; ++c) kv[c] = _mm512_loadu_ps(kt + d * NC * 16 + c * 16);
    for (int r = 0; r < 4; ++r) {
      const __m512 qd = _mm512_set1_ps(q[r * Dh + d]);
      for (int c = 0; c < NC; ++c) acc[r][c] = _mm512_fmadd_ps(qd, kv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < 4; ++r)
    for (int c = 0; c < NC; ++c) _mm512_storeu_ps(s + r * NC * 16 + c * 16, acc[r][c]);
}

template <int NV>
inline void pv_rows(const float* p, int64_t ldp, const float* vf, int64_t Dh, int64_t nk, float* o, const float* corr,
                    int64_t rows) {
  constexpr int RB = NV <= 4 ? 4 : NV <= 5 ? 3 : NV <= 8 ? 2 : 1;
  int64_t r = 0;
  for (; r + RB <= rows; r += RB) pv_tile<RB, NV>(p + r * ldp, ldp, vf, Dh, nk, o + r * Dh, corr + r);
  for (; r < rows; ++r) pv_tile<1, NV>(p + r * ldp, ldp, vf, Dh, nk, o + r * Dh, corr + r);
}

#endif

// Blocked ("flash") attention for many query tokens: float32 FMAs and an online softmax.
// Pass 1 converts each (batch, kv head)'s keys once to float32 blocks transposed to [A][KB], and
// values to [S][A]. Pass 2 runs over (batch, head, block of QB queries), every key block feeding
// 4-row x KB-key register tiles for the scores and 4-row tiles for P.V.
// mask: [B, T, S] bool, or causal (key j visible to query t iff j <= t + S - T) when absent.
template <typename A>
void flash_attention(const A* Q, const A* Kp, const A* Vp, const bool* M, A* O, int64_t B, int64_t H, int64_t T,
                     int64_t Dh, int64_t G, int64_t S, int64_t kb, int64_t kg, int64_t vb, int64_t vg, float scale) {
#if defined(__AVX512F__)
  constexpr int64_t QB = 32, KB = 64, NC = KB / 16;
  const int64_t group = H / G, nqb = (T + QB - 1) / QB, nkb = (S + KB - 1) / KB, NVd = Dh / 16;
  std::vector<float> kt(B * G * nkb * Dh * KB), vf(B * G * nkb * KB * Dh);
  at::parallel_for(0, B * G * nkb, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t bg = it / nkb, j0 = (it % nkb) * KB, b = bg / G, g = bg % G, nk = std::min(KB, S - j0);
      const A* K = Kp + b * kb + g * kg;
      const A* V = Vp + b * vb + g * vg;
      float* kd = kt.data() + it * Dh * KB;
      float* vd = vf.data() + it * KB * Dh;
      for (int64_t j = 0; j < KB; ++j)
        for (int64_t d = 0; d < Dh; ++d) {
          kd[d * KB + j] = j < nk ? to_f<A>(K[(j0 + j) * Dh + d]) : 0.f;
          vd[j * Dh + d] = j < nk ? to_f<A>(V[(j0 + j) * Dh + d]) : 0.f;
        }
    }
  });
  const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  at::parallel_for(0, B * H * nqb, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> q((QB + 4) * Dh, 0.f), o(QB * Dh), s((QB + 4) * KB), mx(QB), den(QB), corr(QB);
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t bh = it / nqb, t0 = (it % nqb) * QB, nq = std::min(QB, T - t0);
      const int64_t b = bh / H, h = bh % H, g = h / group;
      std::fill(mx.begin(), mx.end(), -INFINITY);
      std::fill(den.begin(), den.end(), 0.f);
      std::fill(o.begin(), o.end(), 0.f);
      for (int64_t r = 0; r < QB; ++r)
        for (int64_t d = 0; d < Dh; ++d) q[r * Dh + d] = r < nq ? to_f<A>(Q[((b * H + h) * T + t0 + r) * Dh + d]) * scale : 0.f;
      const int64_t last = M ? S : std::min(S, t0 + nq + S - T);  // causal: later keys are never visible
      for (int64_t j0 = 0; j0 < last; j0 += KB) {
        const int64_t nk = std::min(KB, last - j0);
        const float* ktb = kt.data() + ((b * G + g) * nkb + j0 / KB) * Dh * KB;
        const float* vfb = vf.data() + ((b * G + g) * nkb + j0 / KB) * KB * Dh;
        for (int64_t r0 = 0; r0 < nq; r0 += 4)  // scores, 4 query rows x KB keys in 16 registers
          qk_tile<NC>(&q[r0 * Dh], Dh, ktb, &s[r0 * KB]);
        const __m512 ninf = _mm512_set1_ps(-INFINITY);
        for (int64_t r = 0; r < nq; ++r) {  // mask, online softmax
          const int64_t t = t0 + r;
          float* sr = &s[r * KB];
          __m512 vmaxb = ninf;
          for (int c = 0; c < NC; ++c) {
            const __m512i j = _mm512_add_epi32(iota, _mm512_set1_epi32((int)(c * 16)));
            __mmask16 ok = _mm512_cmplt_epi32_mask(j, _mm512_set1_epi32((int)nk));
            if (M) {
              const bool* mrow = M + (b * T + t) * S + j0 + c * 16;
              __mmask16 mm = 0;
              for (int l = 0; l < 16 && c * 16 + l < nk; ++l) mm |= (__mmask16)(mrow[l] ? 1u << l : 0u);
              ok &= mm;
            } else {
              ok &= _mm512_cmple_epi32_mask(j, _mm512_set1_epi32((int)(t + S - T - j0)));
            }
            __m512 v = _mm512_mask_mov_ps(ninf, ok, _mm512_loadu_ps(sr + c * 16));
            _mm512_storeu_ps(sr + c * 16, v);
            vmaxb = _mm512_max_ps(vmaxb, v);
          }
          const float nmax = std::max(mx[r], _mm512_reduce_max_ps(vmaxb));
          if (nmax == -INFINITY) {  // nothing visible yet
            corr[r] = 1.f;
            std::fill(sr, sr + KB, 0.f);
            continue;
          }
          corr[r] = std::exp(mx[r] - nmax);
          mx[r] = nmax;
          __m512 vmax = _mm512_set1_ps(nmax), vsum = _mm512_setzero_ps();
          for (int c = 0; c < NC; ++c) {
            __m512 p = exp512(_mm512_sub_ps(_mm512_loadu_ps(sr + c * 16), vmax));
            _mm512_storeu_ps(sr + c * 16, p);
            vsum = _mm512_add_ps(vsum, p);
          }
          den[r] = den[r] * corr[r] + _mm512_reduce_add_ps(vsum);
        }
        switch (NVd) {  // o = o * corr + P V
          case 4: pv_rows<4>(s.data(), KB, vfb, Dh, nk, o.data(), corr.data(), nq); break;
          case 5: pv_rows<5>(s.data(), KB, vfb, Dh, nk, o.data(), corr.data(), nq); break;
          case 8: pv_rows<8>(s.data(), KB, vfb, Dh, nk, o.data(), corr.data(), nq); break;
          default:
            for (int64_t r = 0; r < nq; ++r)
              for (int64_t d = 0; d < Dh; ++d) {
                float a2 = o[r * Dh + d] * corr[r];
                for (int64_t j = 0; j < nk; ++j) a2 += s[r * KB + j] * vfb[j * Dh + d];
                o[r * Dh + d] = a2;
              }
        }
      }
      for (int64_t r = 0; r < nq; ++r)
        for (int64_t d = 0; d < Dh; ++d)
          O[((b * H + h) * T + t0 + r) * Dh + d] = from_f<A>(den[r] > 0 ? o[r * Dh + d] / den[r] : 0.f);
    }
  });
#else
  TORCH_CHECK(false, "moekit cpu kernel: flash attention needs AVX-512");
#endif
}

// Attention over a KV slice: the row kernel below for a few query tokens, flash_attention otherwise.
// q [B, H, T, A] contiguous; k, v [B, G, S, A] with unit stride in A and row stride A; mask [B, T, S] bool
// (True = attend) or absent for plain causal attention.
template <typename A>
torch::Tensor attention_impl(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                             const torch::Tensor& mask, double scale) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), Dh = q.size(3), G = k.size(1), S = k.size(2);
  const int64_t group = H / G;
  auto out = torch::empty_like(q);
  const A* Q = (const A*)q.data_ptr();
  const A* Kp = (const A*)k.data_ptr();
  const A* Vp = (const A*)v.data_ptr();
  const bool* M = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  A* O = (A*)out.data_ptr();
  const int64_t kb = k.stride(0), kg = k.stride(1), vb = v.stride(0), vg = v.stride(1);
  if (T > 4 || !M) {
    flash_attention<A>(Q, Kp, Vp, M, O, B, H, T, Dh, G, S, kb, kg, vb, vg, (float)scale);
    return out;
  }
  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> s(S), qf(Dh), o(Dh);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, h = i % H, g = h / group;
      const A* K = Kp + b * kb + g * kg;
      const A* V = Vp + b * vb + g * vg;
      for (int64_t t = 0; t < T; ++t) {
        const A* qv = Q + ((b * H + h) * T + t) * Dh;
        for (int64_t d = 0; d < Dh; ++d) qf[d] = to_f<A>(qv[d]) * (float)scale;
        const bool* mrow = M + (b * T + t) * S;
        float mx = -INFINITY;
        for (int64_t j = 0; j < S; ++j) {
          if (!mrow[j]) { s[j] = -INFINITY; continue; }
          float acc = 0.f;
          const A* kr = K + j * Dh;
          for (int64_t d = 0; d < Dh; ++d) acc += qf[d] * to_f<A>(kr[d]);
          s[j] = acc;
          mx = std::max(mx, acc);
        }
        float sum = 0.f;
        std::fill(o.begin(), o.end(), 0.f);
        for (int64_t j = 0; j < S; ++j) {
          if (s[j] == -INFINITY) continue;
          const float p = std::exp(s[j] - mx);
          sum += p;
          const A* vr = V + j * Dh;
          for (int64_t d = 0; d < Dh; ++d) o[d] += p * to_f<A>(vr[d]);
        }
        A* ov = O + ((b * H + h) * T + t) * Dh;
        for (int64_t d = 0; d < Dh; ++d) ov[d] = from_f<A>(o[d] / sum);
      }
    }
  });
  return out;
}

// act[m, f] = silu(h[m, f]) * h[m, F + f] for rows h = [gate | up] of width 2F.
template <typename A>
torch::Tensor silu_mul_impl(const torch::Tensor& h) {
  const int64_t M = h.size(0), F = h.size(1) / 2;
  auto out = torch::empty({M, F}, h.options());
  const A* H = (const A*)h.data_ptr();
  A* O = (A*)out.data_ptr();
  at::parallel_for(0, M, 8, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const A* g = H + m * 2 * F;
      const A* u = g + F;
      A* o = O + m * F;
      int64_t f = 0;
#if defined(__AVX512F__)
      for (; f + 16 <= F; f += 16) {
        __m512 gv = load16(g + f);
        __m512 s = rnd(_mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv)))), g);
        store16(o + f, _mm512_mul_ps(s, load16(u + f)));
      }
#endif
      for (; f < F; ++f) o[f] = from_f<A>(to_f<A>(from_f<A>(silu(to_f<A>(g[f])))) * to_f<A>(u[f]));
    }
  });
  return out;
}

// Rotate-half RoPE: out = x * cos + [-x2, x1] * sin for x [B, N, T, A], cos/sin [B, T, A].
template <typename A>
torch::Tensor rotary_impl(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  const int64_t B = x.size(0), N = x.size(1), T = x.size(2), Dh = x.size(3), half = Dh / 2;
  auto out = torch::empty_like(x);
  const A* X = (const A*)x.data_ptr();
  const A* C = (const A*)cos.data_ptr();
  const A* S = (const A*)sin.data_ptr();
  A* O = (A*)out.data_ptr();
  at::parallel_for(0, B * N * T, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (N * T), t = i % T;
      const A* xr = X + i * Dh;
      const A* c = C + (b * T + t) * Dh;
      const A* s = S + (b * T + t) * Dh;
      A* o = O + i * Dh;
      for (int64_t d = 0; d < half; ++d) {
        const float x1 = to_f<A>(xr[d]), x2 = to_f<A>(xr[d + half]);
        o[d] = from_f<A>(x1 * to_f<A>(c[d]) - x2 * to_f<A>(s[d]));
        o[d + half] = from_f<A>(x2 * to_f<A>(c[d + half]) + x1 * to_f<A>(s[d + half]));
      }
    }
  });
  return out;
}

void check(bool ok, const char* what) { TORCH_CHECK(ok, "moekit cpu kernel: ", what); }

bool is_bf16(const torch::Tensor& t) { return t.scalar_type() == torch::kBFloat16; }

void check_pair(const torch::Tensor& x, const torch::Tensor& w) {
  check(x.dim() == 2 && x.is_contiguous() && w.is_contiguous(), "x must be [T, D] and both contiguous");
  check(x.scalar_type() == w.scalar_type() && (is_bf16(x) || x.scalar_type() == torch::kFloat32),
        "x and weights must both be bfloat16 or both float32");
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
                  c10::optional<torch::Tensor> swts_opt) {
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
  return is_bf16(x) ? moe_impl<bf16>(x, w13, w2, ids, wts, s13, s2, swts)
                    : moe_impl<float>(x, w13, w2, ids, wts, s13, s2, swts);
}

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  check_pair(x, w);
  return is_bf16(x) ? rms_norm_impl<bf16>(x, w, eps) : rms_norm_impl<float>(x, w, eps);
}

torch::Tensor attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, c10::optional<torch::Tensor> mask_opt,
                        double scale) {
  torch::Tensor mask = mask_opt.has_value() ? *mask_opt : torch::Tensor();
  check(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q.is_contiguous(), "q must be contiguous [B, H, T, A]");
  check(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type() &&
            (is_bf16(q) || q.scalar_type() == torch::kFloat32), "q, k, v must share a bfloat16 or float32 dtype");
  check(k.stride(3) == 1 && k.stride(2) == k.size(3) && v.stride(3) == 1 && v.stride(2) == v.size(3) &&
            k.sizes() == v.sizes() && q.size(1) % k.size(1) == 0 && q.size(3) == k.size(3),
        "k, v must be [B, G, S, A] with contiguous rows");
  check(!mask.defined() || (mask.scalar_type() == torch::kBool && mask.is_contiguous() &&
            mask.size(0) == q.size(0) && mask.size(1) == q.size(2) && mask.size(2) == k.size(2)),
        "mask must be bool [B, T, S]");
  check(q.size(3) % 16 == 0 || (mask.defined() && q.size(2) <= 4), "head width must be a multiple of 16");
  return is_bf16(q) ? attention_impl<bf16>(q, k, v, mask, scale) : attention_impl<float>(q, k, v, mask, scale);
}

torch::Tensor silu_mul(torch::Tensor h) {
  check(h.dim() == 2 && h.is_contiguous() && h.size(1) % 2 == 0 &&
            (is_bf16(h) || h.scalar_type() == torch::kFloat32), "h must be contiguous [M, 2F] bf16/fp32");
  return is_bf16(h) ? silu_mul_impl<bf16>(h) : silu_mul_impl<float>(h);
}

torch::Tensor rotary(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  check(x.dim() == 4 && x.is_contiguous() && cos.is_contiguous() && sin.is_contiguous() && x.size(3) % 2 == 0,
        "x must be contiguous [B, N, T, A]");
  check(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type() && cos.dim() == 3 &&
            cos.size(0) == x.size(0) && cos.size(1) == x.size(2) && cos.size(2) == x.size(3) && sin.sizes() == cos.sizes() &&
            (is_bf16(x) || x.scalar_type() == torch::kFloat32), "cos/sin must be [B, T, A] in x's dtype");
  return is_bf16(x) ? rotary_impl<bf16>(x, cos, sin) : rotary_impl<float>(x, cos, sin);
}

bool has_avx512_bf16() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, "y = x W^T (+ b) for a few tokens");
  m.def("mlp", &mlp, "SwiGLU MLP for a few tokens");
  m.def("moe", &moe, "routed SwiGLU experts (plus an optional shared expert) for a few tokens", py::arg("x"),
        py::arg("w13"), py::arg("w2"), py::arg("ids"), py::arg("weights"), py::arg("shared_w13") = py::none(),
        py::arg("shared_w2") = py::none(), py::arg("shared_weights") = py::none());
  m.def("route", &route, "top-k routing of float32 logits");
  m.def("rms_norm", &rms_norm, "RMSNorm");
  m.def("silu_mul", &silu_mul, "silu(gate) * up over [gate | up] rows");
  m.def("rotary", &rotary, "rotate-half RoPE");
  m.def("attention", &attention, "attention of a few query tokens over a KV cache slice");
  m.def("has_avx512_bf16", &has_avx512_bf16, "whether vdpbf16ps is compiled in");
}
