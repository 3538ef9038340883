// Top-k routing of router logits (the reference: moekit/kernels/reference.py route).
//
// Shape legend: T tokens, E experts, k experts per token.

#include "common.h"

namespace moekit {

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

}  // namespace moekit
