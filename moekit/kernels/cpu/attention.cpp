// Attention over a KV slice: a vectorised row kernel for a few query tokens (decode) and blocked
// ("flash") attention with an online softmax for many (prefill).

#include "flash.h"

namespace moekit {

// Flash attention over a contiguous KV slice: pass 1 packs each (batch, kv head)'s keys and values
// once (flash.h), pass 2 runs over (batch, head, block of QB queries).
// mask: [B, T, S] bool, or causal (key j visible to query t iff j <= t + S - T) when absent.
template <typename A>
void flash_attention(const A* Q, const A* Kp, const A* Vp, const bool* M, A* O, int64_t B, int64_t H, int64_t T,
                     int64_t Dh, int64_t G, int64_t S, int64_t kb, int64_t kg, int64_t vb, int64_t vg, float scale) {
#if defined(__AVX512F__)
  constexpr int64_t QB = FLASH_QB, KB = FLASH_KB;
  bool dp = false;  // bf16 pairs and vdpbf16ps
  if constexpr (std::is_same_v<A, bf16>) dp = bf16_flash_fits(Dh);
  const int64_t group = H / G, nqb = (T + QB - 1) / QB, nkb = (S + KB - 1) / KB, block = Dh * KB;
  std::vector<float> kt(dp ? 0 : B * G * nkb * block), vf(dp ? 0 : B * G * nkb * block);
  std::vector<uint32_t> kw(dp ? B * G * nkb * block / 2 : 0), vw(dp ? B * G * nkb * block / 2 : 0);
  at::parallel_for(0, B * G * nkb, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t bg = it / nkb, j0 = (it % nkb) * KB, b = bg / G, g = bg % G, nk = std::min(KB, S - j0);
      const A* K = Kp + b * kb + g * kg;
      const A* V = Vp + b * vb + g * vg;
      auto k_row = [&](int64_t j) { return K + j * Dh; };
      auto v_row = [&](int64_t j) { return V + j * Dh; };
      if constexpr (std::is_same_v<A, bf16>)
        if (dp) {
          pack_block_bf16(k_row, v_row, j0, nk, Dh, kw.data() + it * block / 2, vw.data() + it * block / 2);
          continue;
        }
      pack_block<A>(k_row, v_row, j0, nk, Dh, kt.data() + it * block, vf.data() + it * block);
    }
  });
  at::parallel_for(0, B * H * nqb, 1, [&](int64_t i0, int64_t i1) {
    FlashScratch w(Dh);
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t bh = it / nqb, t0 = (it % nqb) * QB, nq = std::min(QB, T - t0);
      const int64_t b = bh / H, h = bh % H, g = h / group, first = (b * G + g) * nkb * block;
      const A* q = Q + ((b * H + h) * T + t0) * Dh;
      A* o = O + ((b * H + h) * T + t0) * Dh;
      const bool* Mb = M ? M + b * T * S : nullptr;
#if defined(__AVX512BF16__)
      if constexpr (std::is_same_v<A, bf16>)
        if (dp) {
          flash_block_bf16(q, Dh, o, Dh, kw.data() + first / 2, vw.data() + first / 2, Mb, t0, nq, T, S, Dh, scale, w);
          continue;
        }
#endif
      flash_block<A>(q, Dh, o, Dh, kt.data() + first, vf.data() + first, Mb, t0, nq, T, S, Dh, scale, w);
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
    std::vector<float> s(S + 16), qf(Dh + 16, 0.f), o(Dh + 16);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, h = i % H, g = h / group;
      const A* K = Kp + b * kb + g * kg;
      const A* V = Vp + b * vb + g * vg;
      for (int64_t t = 0; t < T; ++t) {
        const A* qv = Q + ((b * H + h) * T + t) * Dh;
        for (int64_t d = 0; d < Dh; ++d) qf[d] = to_f<A>(qv[d]) * (float)scale;
        const bool* mrow = M + (b * T + t) * S;
        int64_t j = 0;
#if defined(__AVX512F__)
        if (Dh % 16 == 0) {  // 16 keys at a time: 16 dot products, summed with one reduce16
          const int64_t nv = Dh / 16;
          for (; j + 16 <= S; j += 16) {
            __m512 acc[16];
            for (int r = 0; r < 16; ++r) {
              acc[r] = _mm512_setzero_ps();
              for (int64_t c = 0; c < nv; ++c)
                acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(&qf[c * 16]), load16(K + (j + r) * Dh + c * 16), acc[r]);
            }
            _mm512_storeu_ps(&s[j], reduce16(acc));
          }
        }
#endif
        for (; j < S; ++j) {
          float acc = 0.f;
          for (int64_t d = 0; d < Dh; ++d) acc += qf[d] * to_f<A>(K[j * Dh + d]);
          s[j] = acc;
        }
        float mx = -INFINITY;
        for (j = 0; j < S; ++j) {
          if (!mrow[j]) s[j] = -INFINITY;
          mx = std::max(mx, s[j]);
        }
        float sum = 0.f;
        j = 0;
#if defined(__AVX512F__)
        __m512 vs = _mm512_setzero_ps();
        for (; j + 16 <= S; j += 16) {
          __m512 p = exp512(_mm512_sub_ps(_mm512_loadu_ps(&s[j]), _mm512_set1_ps(mx)));
          _mm512_storeu_ps(&s[j], p);
          vs = _mm512_add_ps(vs, p);
        }
        sum = _mm512_reduce_add_ps(vs);
#endif
        for (; j < S; ++j) sum += (s[j] = std::exp(s[j] - mx));
        std::fill(o.begin(), o.end(), 0.f);
        for (j = 0; j < S; ++j) {
          const float p = s[j];
          if (p == 0.f) continue;
          const A* vr = V + j * Dh;
          int64_t d = 0;
#if defined(__AVX512F__)
          for (; d + 16 <= Dh; d += 16)
            _mm512_storeu_ps(&o[d], _mm512_fmadd_ps(_mm512_set1_ps(p), load16(vr + d), _mm512_loadu_ps(&o[d])));
#endif
          for (; d < Dh; ++d) o[d] += p * to_f<A>(vr[d]);
        }
        A* ov = O + ((b * H + h) * T + t) * Dh;
        for (int64_t d = 0; d < Dh; ++d) ov[d] = from_f<A>(o[d] / sum);
      }
    }
  });
  return out;
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

}  // namespace moekit
