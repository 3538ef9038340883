// Shared helpers of moekit's CPU kernels: bf16 <-> float32, AVX-512 vector helpers, argument checks,
// and a cost-balanced parallel loop. Threads come from torch (at::parallel_for); the plain PyTorch
// twin, moekit/kernels/reference.py, is the oracle every kernel is tested against.
//
// Shape legend: T tokens, D model width, N output rows, E experts, K experts per token,
// F (padded) expert width, A head width.
#pragma once

#include <torch/types.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace moekit {

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

// out[t * ldo + r * rs] += horizontal sum of acc[t][r] for TB x RR accumulators (TB * RR <= 16).
template <int TB, int RR>
inline void add_sums(__m512 (&acc)[TB][RR], float* out, int64_t ldo, int64_t rs = 1) {
  static_assert(TB * RR <= 16, "at most 16 accumulators");
  __m512 v[16];
  for (int i = 0; i < 16; ++i) v[i] = i < TB * RR ? acc[i / RR][i % RR] : _mm512_setzero_ps();
  alignas(64) float sums[16];
  _mm512_store_ps(sums, reduce16(v));
  for (int i = 0; i < TB * RR; ++i) out[(i / RR) * ldo + (i % RR) * rs] += sums[i];
}
#endif

// One head of rotate-half RoPE: o = x * cos + [-x2, x1] * sin over a row of 2 * half values (rotary() and the
// fused decode step share it, so both round alike).
template <typename A>
inline void rope_row(const A* x, const A* c, const A* s, A* o, int64_t half) {
  int64_t d = 0;
#if defined(__AVX512F__)
  for (; d + 16 <= half; d += 16) {
    const __m512 x1 = load16(x + d), x2 = load16(x + d + half);
    store16(o + d, _mm512_fmsub_ps(x1, load16(c + d), _mm512_mul_ps(x2, load16(s + d))));
    store16(o + d + half, _mm512_fmadd_ps(x2, load16(c + d + half), _mm512_mul_ps(x1, load16(s + d + half))));
  }
#endif
  for (; d < half; ++d) {
    const float x1 = to_f<A>(x[d]), x2 = to_f<A>(x[d + half]);
    o[d] = from_f<A>(x1 * to_f<A>(c[d]) - x2 * to_f<A>(s[d]));
    o[d + half] = from_f<A>(x2 * to_f<A>(c[d + half]) + x1 * to_f<A>(s[d + half]));
  }
}

inline float silu(float v) { return v / (1.f + std::exp(-v)); }

// A work item costs about ITEM_COST tokens' worth of arithmetic just to stream its weight rows from
// memory (at ~45 GB/s and ~900 GFLOP/s the two balance near 4 tokens), plus one unit per token.
constexpr double ITEM_COST = 4.0;
// Panels spend much less per token: per weight byte, 8 tokens took 1.2-1.3x the time of one in the
// stand-alone int8 panel kernel (qpanel.h), cold weights, two threads (EPYC Zen 4), about 32 tokens' worth to
// stream; int4 panels (qpanelg.h) 0.9-1.1x in a Mixtral-shaped layer (bench/cpu_quant_kernels.py, 2 runs).
// Whole experts to threads by this count: XVERSE-shaped int8 batch-8 decode +4.6% (8 of 8 rounds) at 16
// against 4, +2.0% more at 32; Mixtral-shaped within noise (in-process A/B, two builds).
constexpr double PANEL_ITEM_COST = 32.0;

// Run fn(i0, i1) over [0, n) in contiguous chunks of (nearly) equal total cost, `chunks` per thread,
// handed out in order to whichever thread is free. Items are ordered by expert and routing can be very
// uneven, so splitting by count would idle a thread; and on a shared or virtual machine a thread can
// stall, so a fixed split by cost would idle the other. Each item writes its own outputs: the result
// does not depend on which thread ran it.
constexpr int64_t CHUNKS = 8;

template <typename Fn>
void balanced_for(const std::vector<double>& cost, Fn fn, int64_t chunks = CHUNKS) {
  const int64_t n = cost.size(), threads = at::get_num_threads();
  std::vector<double> prefix(n + 1, 0.0);
  for (int64_t i = 0; i < n; ++i) prefix[i + 1] = prefix[i] + cost[i];
  if (n && (threads == 1 || at::in_parallel_region())) return fn(0, n);
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(threads * chunks, n));
  std::vector<int64_t> cut(parts + 1, n);
  cut[0] = 0;
  for (int64_t p = 1; p < parts; ++p)
    cut[p] = std::lower_bound(prefix.begin(), prefix.end(), prefix[n] * p / parts) - prefix.begin();
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(threads, parts), 1, [&](int64_t, int64_t) {
    for (int64_t p = next++; p < parts; p = next++)
      if (cut[p] < cut[p + 1]) fn(cut[p], cut[p + 1]);
  });
}

inline void check(bool ok, const char* what) { TORCH_CHECK(ok, "moekit cpu kernel: ", what); }

inline bool is_bf16(const torch::Tensor& t) { return t.scalar_type() == torch::kBFloat16; }

inline void check_pair(const torch::Tensor& x, const torch::Tensor& w) {
  check(x.dim() == 2 && x.is_contiguous() && w.is_contiguous(), "x must be [T, D] and both contiguous");
  check(x.scalar_type() == w.scalar_type() && (is_bf16(x) || x.scalar_type() == torch::kFloat32),
        "x and weights must both be bfloat16 or both float32");
}

// Entry points (bindings.cpp exposes them to Python).
torch::Tensor linear(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> b);
torch::Tensor qlinear(torch::Tensor x, torch::Tensor w, torch::Tensor scale, c10::optional<torch::Tensor> b);
torch::Tensor mlp(torch::Tensor x, torch::Tensor w13, torch::Tensor w2, c10::optional<torch::Tensor> q13,
                  c10::optional<torch::Tensor> q2);
torch::Tensor moe(torch::Tensor x, torch::Tensor w13, torch::Tensor w2, torch::Tensor ids, torch::Tensor wts,
                  c10::optional<torch::Tensor> s13, c10::optional<torch::Tensor> s2, c10::optional<torch::Tensor> swts,
                  bool aten, c10::optional<torch::Tensor> q13, c10::optional<torch::Tensor> q2,
                  c10::optional<torch::Tensor> qs13, c10::optional<torch::Tensor> qs2);
std::vector<torch::Tensor> route(torch::Tensor logits, int64_t k, bool softmax, bool renorm, double eps, double scale,
                                 c10::optional<torch::Tensor> bias);
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps);
torch::Tensor silu_mul(torch::Tensor h);
torch::Tensor rotary(torch::Tensor x, torch::Tensor cos, torch::Tensor sin);
torch::Tensor attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, c10::optional<torch::Tensor> mask,
                        double scale);
torch::Tensor paged_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor table,
                              torch::Tensor starts, torch::Tensor lens, double scale);

}  // namespace moekit
