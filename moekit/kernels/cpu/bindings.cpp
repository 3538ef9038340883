// Python bindings of moekit's CPU kernels (compiled by moekit/kernels/cpu.py).

#include <torch/extension.h>

#include "common.h"

namespace moekit {
bool has_avx512_bf16() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}
void bind_decoder(pybind11::module_& m);  // decode.cpp
torch::Tensor dequant(const torch::Tensor& raw, const std::string& kind, int64_t K, const torch::Tensor& grid,
                      const torch::Tensor& ksigns, const c10::optional<torch::Tensor>& into);  // convert.cpp
std::vector<std::string> dequant_kinds();
void quantize(const torch::Tensor& w, torch::Tensor& data, torch::Tensor& scale, bool round_bf16);
}  // namespace moekit

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &moekit::linear, "y = x W^T (+ b) for a few tokens");
  m.def("qlinear", &moekit::qlinear, "y = x W^T (+ b) for int8 / int4 W (data, float16 scales)", py::arg("x"),
        py::arg("w"), py::arg("scale"), py::arg("b") = py::none());
  m.def("mlp", &moekit::mlp, "SwiGLU MLP (w13_scale, w2_scale: float16 scales of quantised weights)", py::arg("x"),
        py::arg("w13"), py::arg("w2"), py::arg("w13_scale") = py::none(), py::arg("w2_scale") = py::none());
  m.def("moe", &moekit::moe, "routed SwiGLU experts (plus an optional shared expert); aten: ATen GEMMs for experts "
        "with many tokens; *_scale: the float16 scales of quantised weights", py::arg("x"),
        py::arg("w13"), py::arg("w2"), py::arg("ids"), py::arg("weights"), py::arg("shared_w13") = py::none(),
        py::arg("shared_w2") = py::none(), py::arg("shared_weights") = py::none(), py::arg("aten") = false,
        py::arg("w13_scale") = py::none(), py::arg("w2_scale") = py::none(), py::arg("shared_w13_scale") = py::none(),
        py::arg("shared_w2_scale") = py::none());
  m.def("route", &moekit::route, "top-k routing of float32 logits", py::arg("logits"), py::arg("k"), py::arg("softmax"),
        py::arg("renorm"), py::arg("eps"), py::arg("scale"), py::arg("bias") = py::none());
  m.def("rms_norm", &moekit::rms_norm, "RMSNorm");
  m.def("silu_mul", &moekit::silu_mul, "silu(gate) * up over [gate | up] rows");
  m.def("rotary", &moekit::rotary, "rotate-half RoPE");
  m.def("attention", &moekit::attention, "attention of a few query tokens over a KV cache slice");
  m.def("paged_attention", &moekit::paged_attention, "causal attention of many requests' new tokens over a paged KV cache",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("table"), py::arg("starts"), py::arg("lens"), py::arg("scale"));
  m.def("dequant", &moekit::dequant, "GGUF K-quant / IQ3_XXS blocks [R, bytes] -> float32 [R, K]", py::arg("raw"),
        py::arg("kind"), py::arg("K"), py::arg("grid"), py::arg("ksigns"), py::arg("out") = py::none());
  m.def("dequant_kinds", &moekit::dequant_kinds, "the GGML types dequant takes");
  m.def("quantize", &moekit::quantize, "float32 / bfloat16 rows [R, K] into int8 / int4 data and float16 scales "
        "(round_bf16: round float32 values to bfloat16 first)", py::arg("w"), py::arg("data"), py::arg("scale"),
        py::arg("round_bf16"));
  moekit::bind_decoder(m);
  m.def("has_avx512_bf16", &moekit::has_avx512_bf16, "whether vdpbf16ps is compiled in");
}
