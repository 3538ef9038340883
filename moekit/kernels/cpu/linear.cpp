// Linear layers y = x W^T (+ b): plain weights for a few tokens (ATen's GEMMs take more), int8 /
// int4 weights (qgemm.h) for any number. The MLP and MoE layers (experts.cpp) run the same kernels.
//
// Shape legend: T tokens, K input width, N output rows.

#include "qgemm.h"

namespace moekit {

// y [T, N] in x's dtype from the float32 sums acc, plus the bias.
template <typename A>
torch::Tensor finish(const std::vector<float>& acc, const torch::Tensor& x, int64_t N,
                     const c10::optional<torch::Tensor>& b) {
  const int64_t T = x.size(0);
  auto y = torch::empty({T, N}, x.options());
  A* Y = (A*)y.data_ptr();
  const A* B = b.has_value() ? (const A*)b->data_ptr() : nullptr;
  for (int64_t i = 0; i < T * N; ++i) Y[i] = from_f<A>(acc[i] + (B ? to_f<A>(B[i % N]) : 0.f));
  return y;
}

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
  return finish<A>(acc, x, N, b);
}

// A few-token quantised linear: one contiguous part a thread, the blocks split evenly, as moe.h gives each
// thread whole experts. Each part's rows start cold and split into four streams (qact.h), so fewer, longer
// parts stream better. In-process A/B on the engine's batch-1 decode (EPYC Zen 4, 2 threads) against two
// parts a thread handed out to whichever thread was free: Mixtral-shaped int4 +3.4% and +2.6% (two runs),
// int8 +3.0%; XVERSE-shaped int4 -0.6% and +1.3%, int8 +4.0%. Rows are summed alike whatever the split,
// so one and two threads give the same bits (tests/test_kernels_quant.py).
template <typename Fn>
void thread_parts(int64_t blocks, Fn fn) {
  const int64_t threads = at::get_num_threads();
  if (threads == 1 || at::in_parallel_region() || blocks < threads) return fn(0, blocks);
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) fn(blocks * t / threads, blocks * (t + 1) / threads);
  });
}

template <typename A>
torch::Tensor qlinear_impl(const torch::Tensor& x, const QMat& W, const c10::optional<torch::Tensor>& b) {
  const int64_t T = x.size(0), K = x.size(1), N = W.N, blocks = (N + BLOCK - 1) / BLOCK;
  std::vector<float> acc(T * N, 0.f);
  const A* X = (const A*)x.data_ptr();
#if defined(__AVX512VNNI__)
  if (qdecode(W, T)) {
    QAct a;
    quantize_act<A>(X, T, K, K, W, a);
    thread_parts(blocks, [&](int64_t b0, int64_t b1) {
      QScales blk;
      const int64_t r0 = b0 * BLOCK, r1 = std::min(N, b1 * BLOCK);
      qgemv_rows(stream(W, r0, r1), r0, r1, a, acc.data(), N, blk);
    });
  } else
#endif
  {
    const std::vector<double> cost(blocks, 1.0);  // handed out in chunks: a stalled thread does not hold the rest
    balanced_for(cost, [&](int64_t b0, int64_t b1) {
      std::vector<A> tile;
      std::vector<uint32_t> pack;
      qmatmul_rows<A>(W, b0 * BLOCK, std::min(N, b1 * BLOCK), X, T, acc.data(), N, tile, pack);
    });
  }
  return finish<A>(acc, x, N, b);
}

torch::Tensor linear(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> b) {
  check_pair(x, w);
  check(w.dim() == 2 && w.size(1) == x.size(1), "weight must be [N, D]");
  return is_bf16(x) ? linear_impl<bf16>(x, w, b) : linear_impl<float>(x, w, b);
}

torch::Tensor qlinear(torch::Tensor x, torch::Tensor w, torch::Tensor scale, c10::optional<torch::Tensor> b) {
  check(x.dim() == 2 && x.is_contiguous() && (is_bf16(x) || x.scalar_type() == torch::kFloat32),
        "x must be contiguous bfloat16 or float32 [T, K]");
  check(w.dim() == 2, "weight must be [N, K] (int4: [N, K / 2])");
  const QMat W = qmat(w, scale, x.size(1));
  check(!b.has_value() || (b->scalar_type() == x.scalar_type() && b->is_contiguous() && b->numel() == W.N),
        "bias must be [N] in x's dtype");
  return is_bf16(x) ? qlinear_impl<bf16>(x, W, b) : qlinear_impl<float>(x, W, b);
}

}  // namespace moekit
