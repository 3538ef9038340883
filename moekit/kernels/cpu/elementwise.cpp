// Elementwise kernels: RMSNorm, silu(gate) * up, rotate-half RoPE.

#include "common.h"

namespace moekit {

// Elements below which a kernel runs on the calling thread: waking the pool costs more than it saves.
constexpr int64_t MIN_PARALLEL = 1 << 15;

template <typename A>
torch::Tensor rms_norm_impl(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  const int64_t T = x.size(0), D = x.size(1);
  auto y = torch::empty_like(x);
  const A* X = (const A*)x.data_ptr();
  const A* W = (const A*)w.data_ptr();
  A* Y = (A*)y.data_ptr();
  at::parallel_for(0, T, std::max<int64_t>(1, MIN_PARALLEL / D), [&](int64_t t0, int64_t t1) {
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

// act[m, f] = silu(h[m, f]) * h[m, F + f] for rows h = [gate | up] of width 2F.
template <typename A>
torch::Tensor silu_mul_impl(const torch::Tensor& h) {
  const int64_t M = h.size(0), F = h.size(1) / 2;
  auto out = torch::empty({M, F}, h.options());
  const A* H = (const A*)h.data_ptr();
  A* O = (A*)out.data_ptr();
  at::parallel_for(0, M, std::max<int64_t>(1, MIN_PARALLEL / F), [&](int64_t m0, int64_t m1) {
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
  at::parallel_for(0, B * N * T, std::max<int64_t>(1, MIN_PARALLEL / Dh), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (N * T), t = i % T;
      rope_row(X + i * Dh, C + (b * T + t) * Dh, S + (b * T + t) * Dh, O + i * Dh, half);
    }
  });
  return out;
}

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  check_pair(x, w);
  return is_bf16(x) ? rms_norm_impl<bf16>(x, w, eps) : rms_norm_impl<float>(x, w, eps);
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

}  // namespace moekit
