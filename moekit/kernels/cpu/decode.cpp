// A whole decoder's forward pass over a paged KV cache in one call, for the engine's decode steps
// (moekit/kernels/cpu_decode.py builds it from a model; the engine runs it).
//
// A decode step of a small model is short (a few ms), and running it layer by layer from Python
// costs about as much again: some 20 Python-level ops per layer, each a few microseconds of argument
// checks, dispatch and allocation. Decoder holds every layer's weights once and runs the same
// kernels in the same order with the same arguments as the per-op path (linear / qlinear, RMSNorm,
// rotate-half RoPE, paged attention, routing, the fused MoE and MLP kernels; ATen where the per-op
// path uses ATen), so its logits are the per-op path's, bit for bit. The only fused piece: each
// token's q and k heads are rotated straight into the query buffer and the cache pool, and its v
// heads copied there (rope_row, shared with rotary()).
//
// Shape legend: N tokens of the step (one per request at decode), D model width, H query heads,
// G key/value heads, A head width, L layers, P pool blocks, C tokens per block, R requests, M
// block-table width, V vocabulary, E routed experts, K experts per token.

#include <torch/extension.h>

#include <cmath>
#include <string>

#include "common.h"

namespace moekit {
namespace {

namespace py = pybind11;
using Opt = c10::optional<torch::Tensor>;

Opt opt(const torch::Tensor& t) { return t.defined() ? Opt(t) : c10::nullopt; }

// A weight as the per-op path passes it: plain (scale undefined) or int8 / int4 data with float16 scales.
struct Mat {
  torch::Tensor data, scale;
  bool defined() const { return data.defined(); }
};

torch::Tensor tensor(const py::dict& d, const char* key) {
  if (!d.contains(key) || d[key].is_none()) return {};
  return d[key].cast<torch::Tensor>();
}

Mat mat(const py::dict& d, const char* key) {
  return {tensor(d, key), tensor(d, (std::string(key) + "_scale").c_str())};
}

torch::Tensor lin(const torch::Tensor& x, const Mat& w, const torch::Tensor& b = {}) {
  return w.scale.defined() ? qlinear(x, w.data, w.scale, opt(b)) : moekit::linear(x, w.data, opt(b));
}

struct Norm {
  torch::Tensor w, b;  // b defined: LayerNorm, else RMSNorm
  double eps = 0;

  Norm() = default;
  Norm(const py::dict& d, const char* key)
      : w(tensor(d, key)), b(tensor(d, (std::string(key) + "_bias").c_str())), eps(d["norm_eps"].cast<double>()) {}

  torch::Tensor operator()(const torch::Tensor& x) const {
    return b.defined() ? at::layer_norm(x, {x.size(1)}, w, b, eps) : moekit::rms_norm(x, w, eps);
  }
};

struct Layer {
  Norm attn_norm, ffn_norm;
  Mat qkv, o;
  torch::Tensor bqkv;
  bool moe = false;
  Mat w13, w2, s13, s2;  // experts (or a dense MLP) and the shared expert
  torch::Tensor router, router2, bias, shared_gate;
  bool router_fp32 = false, softmax = true, renorm = true;
  int64_t top_k = 0;
  double eps = 0, scale = 1;

  explicit Layer(const py::dict& d)
      : attn_norm(d, "attn_norm"), ffn_norm(d, "ffn_norm"), qkv(mat(d, "wqkv")), o(mat(d, "wo")),
        bqkv(tensor(d, "bqkv")), moe(d["moe"].cast<bool>()), w13(mat(d, "w13")), w2(mat(d, "w2")),
        s13(mat(d, "shared_w13")), s2(mat(d, "shared_w2")) {
    if (!moe) return;
    router = tensor(d, "router");
    router2 = tensor(d, "router2");
    bias = tensor(d, "router_bias");
    shared_gate = tensor(d, "shared_gate");
    router_fp32 = d["router_fp32"].cast<bool>();
    // the per-op path converts the router weights to the logits' dtype on every call; here once (same values)
    const auto logits_dtype = router_fp32 ? torch::kFloat : attn_norm.w.scalar_type();
    if (router.scalar_type() != logits_dtype) router = router.to(logits_dtype);
    if (router2.defined() && router2.scalar_type() != logits_dtype) router2 = router2.to(logits_dtype);
    softmax = d["softmax"].cast<bool>();
    renorm = d["renormalize"].cast<bool>();
    top_k = d["top_k"].cast<int64_t>();
    eps = d["renormalize_eps"].cast<double>();
    scale = d["routed_scale"].cast<double>();
  }

  // Router.logits + kernels.route + MoE.forward's scale (inference: no noise, jitter or capacity).
  std::vector<torch::Tensor> route_tokens(const torch::Tensor& x) const {
    const torch::Tensor xr = router_fp32 ? x.to(torch::kFloat) : x;
    torch::Tensor h = moekit::linear(xr, router, c10::nullopt);
    if (router2.defined()) h = at::linear(at::tanh(h), router2);
    auto r = moekit::route(h.to(torch::kFloat).contiguous(), top_k, softmax, renorm, eps, 1.0,
                   bias.defined() ? Opt(bias.to(torch::kFloat).contiguous()) : c10::nullopt);
    if (scale != 1.0) r[0] = r[0] * scale;
    return r;
  }

  // MLP.forward, or MoE.forward: routing, the shared expert's gate, the fused experts kernel.
  torch::Tensor ffn(const torch::Tensor& x, bool aten) const {
    if (!moe) return moekit::mlp(x, w13.data, w2.data, opt(w13.scale), opt(w2.scale));
    const auto r = route_tokens(x);
    torch::Tensor gate;
    if (shared_gate.defined())
      gate = at::sigmoid(moekit::linear(x, shared_gate, c10::nullopt)).view(-1).to(torch::kFloat);
    return moekit::moe(x, w13.data, w2.data, r[1], r[0], opt(s13.data), opt(s2.data), opt(gate), aten,
                       opt(w13.scale), opt(w2.scale), opt(s13.scale), opt(s2.scale));
  }
};

// Rotate each token's q heads into q [N, H, A] and its k heads into the pool slot slots[n], copy its v heads
// there; token n's cos/sin are row rows[n] of the tables cos, sin [*, A].
template <typename A>
void rope_store(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin, const int64_t* rows,
                torch::Tensor& q, A* K, A* V, const int64_t* slots, int64_t H, int64_t G, int64_t Dh, int64_t C) {
  const int64_t N = qkv.size(0), W = (H + 2 * G) * Dh, half = Dh / 2;
  const A *X = (const A*)qkv.data_ptr(), *Cs = (const A*)cos.data_ptr(), *Sn = (const A*)sin.data_ptr();
  A* Q = (A*)q.data_ptr();
  for (int64_t n = 0; n < N; ++n) {
    const A *row = X + n * W, *c = Cs + rows[n] * Dh, *s = Sn + rows[n] * Dh;
    for (int64_t h = 0; h < H; ++h) rope_row(row + h * Dh, c, s, Q + (n * H + h) * Dh, half);
    const int64_t blk = slots[n] / C, off = slots[n] % C;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t at = ((blk * G + g) * C + off) * Dh;
      rope_row(row + (H + g) * Dh, c, s, K + at, half);
      std::memcpy(V + at, row + (H + G + g) * Dh, Dh * sizeof(A));
    }
  }
}

// The index of x's first maximum over V values, a NaN counting as the maximum (torch.argmax), read as float.
template <typename A>
int64_t argmax_row(const A* x, int64_t V) {
  float best = -INFINITY;
  int64_t i = 0;
#if defined(__AVX512F__)
  __m512 m = _mm512_set1_ps(-INFINITY);
  for (; i + 16 <= V; i += 16) {
    const __m512 v = load16(x + i);
    if (_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q)) break;  // a NaN among these: the loop below finds the first
    m = _mm512_max_ps(m, v);
  }
  best = _mm512_reduce_max_ps(m);
#endif
  for (; i < V; ++i) {
    const float v = to_f<A>(x[i]);
    if (std::isnan(v)) return i;
    best = std::max(best, v);
  }
  for (i = 0; i < V; ++i)  // the first value equal to the maximum (-0 equals +0, as torch compares)
    if (to_f<A>(x[i]) == best) return i;
  return 0;
}

// Each row's argmax of logits [N, V].
std::vector<int64_t> argmax_rows(const torch::Tensor& logits) {
  const int64_t N = logits.size(0), V = logits.size(1);
  std::vector<int64_t> out(N);
  for (int64_t n = 0; n < N; ++n)
    out[n] = is_bf16(logits) ? argmax_row((const bf16*)logits.data_ptr() + n * V, V)
                             : argmax_row(logits.data_ptr<float>() + n * V, V);
  return out;
}

// A list of lists (a step's block tables) as a contiguous int32 tensor [R, M] padded with block 0.
torch::Tensor int32_table(const std::vector<std::vector<int64_t>>& rows) {
  size_t M = 1;
  for (const auto& r : rows) M = std::max(M, r.size());
  torch::Tensor t = torch::zeros({(int64_t)rows.size(), (int64_t)M}, torch::kInt32);
  int32_t* p = t.data_ptr<int32_t>();
  for (size_t i = 0; i < rows.size(); ++i)
    for (size_t j = 0; j < rows[i].size(); ++j) {
      check(rows[i][j] >= 0 && rows[i][j] < INT32_MAX, "decoder: block table entries must be int32 indices");
      p[i * M + j] = (int32_t)rows[i][j];
    }
  return t;
}

torch::Tensor int32_vector(const std::vector<int64_t>& v) {
  torch::Tensor t = torch::empty({(int64_t)v.size()}, torch::kInt32);
  int32_t* p = t.data_ptr<int32_t>();
  for (size_t i = 0; i < v.size(); ++i) {
    check(v[i] >= 0 && v[i] < INT32_MAX, "decoder: request lengths must be int32");
    p[i] = (int32_t)v[i];
  }
  return t;
}

}  // namespace

class Decoder {
 public:
  Decoder(const py::list& layers, const py::dict& top)
      : final_norm(top, "norm"), head(mat(top, "lm_head")), embed(tensor(top, "embed")),
        H(top["num_heads"].cast<int64_t>()), G(top["num_kv_heads"].cast<int64_t>()), Dh(top["head_dim"].cast<int64_t>()),
        aten(top["aten"].cast<bool>()) {
    for (const auto& l : layers) layers_.emplace_back(l.cast<py::dict>());
    check(embed.dim() == 2 && Dh % 16 == 0 && H % G == 0, "decoder: embedding [V, D], head width a multiple of 16");
  }

  // Logits [N, V] of one decode step (one new token per request) and each row's argmax: token ids [N], their
  // keys/values stored at slots [N] (block * C + offset) of the pools k, v [L, P, G, C, A], RoPE from rows
  // rope_rows [N] of the tables cos, sin [*, A] (the positions, or 0..N-1 for per-token tables); each
  // request's block table and length (its cached tokens with this one). Python lists, not tensors: with the
  // argmax returned here, an int4 Mixtral-shaped batch-1 step spends 0.13-0.15 ms outside this call, where
  // building six small tensors, gathering RoPE rows and sampling in Python took about 0.27 (AMD EPYC).
  std::pair<torch::Tensor, std::vector<int64_t>> step(
      const std::vector<int64_t>& ids, const std::vector<int64_t>& rope_rows, const std::vector<int64_t>& slots,
      const std::vector<std::vector<int64_t>>& tables, const std::vector<int64_t>& lens, const torch::Tensor& cos,
      const torch::Tensor& sin, const torch::Tensor& kpool, const torch::Tensor& vpool) const {
    const int64_t N = ids.size(), L = layers_.size();
    check(N > 0 && rope_rows.size() == ids.size() && slots.size() == ids.size() && tables.size() == ids.size() &&
              lens.size() == ids.size(), "decoder: ids, rope_rows, slots, tables and lens must have one entry a token");
    check(cos.dim() == 2 && cos.size(1) == Dh && cos.is_contiguous() && sin.is_contiguous() &&
              sin.sizes() == cos.sizes() && cos.scalar_type() == embed.scalar_type() &&
              sin.scalar_type() == embed.scalar_type(), "decoder: cos/sin must be [*, A] in the model's dtype");
    check(kpool.dim() == 5 && kpool.size(0) == L && kpool.size(2) == G && kpool.size(4) == Dh &&
              kpool.is_contiguous() && vpool.is_contiguous() && vpool.sizes() == kpool.sizes() &&
              kpool.scalar_type() == embed.scalar_type() && vpool.scalar_type() == embed.scalar_type(),
          "decoder: k/v pools must be contiguous [L, P, G, C, A] in the model's dtype");
    const int64_t P = kpool.size(1), C = kpool.size(3);
    for (int64_t n = 0; n < N; ++n) {
      check(slots[n] >= 0 && slots[n] < P * C, "decoder: a slot outside the pool");
      check(rope_rows[n] >= 0 && rope_rows[n] < cos.size(0), "decoder: a RoPE row outside the cos/sin tables");
      check(ids[n] >= 0 && ids[n] < embed.size(0), "decoder: a token id outside the vocabulary");
    }
    const torch::Tensor table = int32_table(tables), lens_t = int32_vector(lens);
    const torch::Tensor starts = torch::arange(N + 1, torch::kInt32);  // one new token a request
    const double att_scale = std::pow((double)Dh, -0.5);
    torch::Tensor x = at::embedding(embed, torch::from_blob((void*)ids.data(), {N}, torch::kLong));
    for (int64_t l = 0; l < L; ++l) {
      const Layer& ly = layers_[l];
      torch::Tensor qkv = lin(ly.attn_norm(x), ly.qkv, ly.bqkv);
      torch::Tensor q = torch::empty({N, H, Dh}, x.options());
      torch::Tensor kl = kpool.select(0, l), vl = vpool.select(0, l);
      if (is_bf16(x))
        rope_store<bf16>(qkv, cos, sin, rope_rows.data(), q, (bf16*)kl.data_ptr(), (bf16*)vl.data_ptr(),
                         slots.data(), H, G, Dh, C);
      else
        rope_store<float>(qkv, cos, sin, rope_rows.data(), q, (float*)kl.data_ptr(), (float*)vl.data_ptr(),
                          slots.data(), H, G, Dh, C);
      torch::Tensor att = moekit::paged_attention(q, kl, vl, table, starts, lens_t, att_scale);
      x = x + lin(att.view({N, H * Dh}), ly.o);
      x = x + ly.ffn(ly.ffn_norm(x), aten);
    }
    torch::Tensor logits = lin(final_norm(x), head);
    return {logits, argmax_rows(logits)};  // while the logits are in cache: greedy sampling's token
  }

  int64_t num_layers() const { return layers_.size(); }

 private:
  std::vector<Layer> layers_;
  Norm final_norm;
  Mat head;
  torch::Tensor embed;
  int64_t H, G, Dh;
  bool aten;
};

void bind_decoder(py::module_& m) {
  // module_local: two builds of this extension (say, before and after a kernel change) load side by side in one
  // process, for in-process A/B timing
  py::class_<Decoder>(m, "Decoder", py::module_local(),
                      "a whole decoder's paged-cache forward pass in one call (cpu_decode.py)")
      .def(py::init<const py::list&, const py::dict&>(), py::arg("layers"), py::arg("top"))
      .def("step", &Decoder::step, py::arg("ids"), py::arg("rope_rows"), py::arg("slots"), py::arg("tables"),
           py::arg("lens"), py::arg("cos"), py::arg("sin"), py::arg("k"), py::arg("v"))
      .def_property_readonly("num_layers", &Decoder::num_layers);
}

}  // namespace moekit
