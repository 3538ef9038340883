// Attention over a KV slice: a vectorised row kernel for a few query tokens (decode) and blocked
// ("flash") attention with an online softmax for many (prefill).

#include "common.h"

namespace moekit {

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

#if defined(__AVX512F__)
// Mask one query row's KB scores of a key block starting at key j0 (nk of them real): keys the
// mask hides (or, without a mask, keys after the query: causal, S - T keys of history) become
// -inf. Returns the row's maximum over the block.
template <int64_t KB>
inline float mask_row(float* sr, const bool* M, int64_t b, int64_t t, int64_t T, int64_t S, int64_t j0, int64_t nk) {
  const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512 ninf = _mm512_set1_ps(-INFINITY);
  __m512 vmax = ninf;
  for (int64_t c = 0; c < KB / 16; ++c) {
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
    const __m512 v = _mm512_mask_mov_ps(ninf, ok, _mm512_loadu_ps(sr + c * 16));
    _mm512_storeu_ps(sr + c * 16, v);
    vmax = _mm512_max_ps(vmax, v);
  }
  return _mm512_reduce_max_ps(vmax);
}
#endif

#if defined(__AVX512BF16__)
// bf16 flash attention with vdpbf16ps: keys packed as pairs over the head width ([A/2][KB] words),
// values as pairs over keys ([KB/2][A] words); scaled queries and softmax probabilities are rounded
// to bf16 pairs and broadcast. Softmax statistics stay in float32.
template <int NV>
inline void pv_tile_bf16(const uint32_t* pp, int64_t ldp, const uint32_t* vp, int64_t Dh, int64_t npairs, float* o,
                         const float* corr, int RB) {
  __m512 acc[4][NV];
  for (int r = 0; r < 4; ++r)
    for (int c = 0; c < NV; ++c)
      acc[r][c] = r < RB ? _mm512_mul_ps(_mm512_loadu_ps(o + r * Dh + c * 16), _mm512_set1_ps(corr[r])) : _mm512_setzero_ps();
  for (int64_t jj = 0; jj < npairs; ++jj) {
    __m512bh v[NV];
    for (int c = 0; c < NV; ++c) v[c] = (__m512bh)_mm512_loadu_si512(vp + jj * Dh + c * 16);
    for (int r = 0; r < 4; ++r) {
      const __m512bh pb = (__m512bh)_mm512_set1_epi32((int)pp[r * ldp + jj]);
      for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], v[c], pb);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int c = 0; c < NV; ++c) _mm512_storeu_ps(o + r * Dh + c * 16, acc[r][c]);
}

void flash_attention_bf16(const bf16* Q, const bf16* Kp, const bf16* Vp, const bool* M, bf16* O, int64_t B, int64_t H,
                          int64_t T, int64_t Dh, int64_t G, int64_t S, int64_t kb, int64_t kg, int64_t vb, int64_t vg,
                          float scale) {
  constexpr int64_t QB = 32, KB = 64, NC = KB / 16, KP = KB / 2;
  const int64_t group = H / G, nqb = (T + QB - 1) / QB, nkb = (S + KB - 1) / KB, D2 = Dh / 2, NVd = Dh / 16;
  std::vector<uint32_t> kt(B * G * nkb * D2 * KB), vt(B * G * nkb * KP * Dh);
  at::parallel_for(0, B * G * nkb, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t bg = it / nkb, j0 = (it % nkb) * KB, b = bg / G, g = bg % G, nk = std::min(KB, S - j0);
      const bf16* K = Kp + b * kb + g * kg;
      const bf16* V = Vp + b * vb + g * vg;
      uint32_t* kd = kt.data() + it * D2 * KB;
      uint32_t* vd = vt.data() + it * KP * Dh;
      for (int64_t j = 0; j < KB; ++j)
        for (int64_t kk = 0; kk < D2; ++kk)
          kd[kk * KB + j] = j < nk ? ((const uint32_t*)(K + (j0 + j) * Dh))[kk] : 0u;
      for (int64_t jj = 0; jj < KP; ++jj)
        for (int64_t d = 0; d < Dh; ++d) {
          const uint32_t lo = 2 * jj < nk ? V[(j0 + 2 * jj) * Dh + d] : 0u;
          const uint32_t hi = 2 * jj + 1 < nk ? V[(j0 + 2 * jj + 1) * Dh + d] : 0u;
          vd[jj * Dh + d] = lo | (hi << 16);
        }
    }
  });
  at::parallel_for(0, B * H * nqb, 1, [&](int64_t i0, int64_t i1) {
    std::vector<uint32_t> q((QB + 4) * D2, 0u), pp((QB + 4) * KP, 0u);
    std::vector<float> o((QB + 4) * Dh), s((QB + 4) * KB), mx(QB + 16), nmax(QB + 16), den(QB + 16), corr(QB + 16);
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t bh = it / nqb, t0 = (it % nqb) * QB, nq = std::min(QB, T - t0);
      const int64_t b = bh / H, h = bh % H, g = h / group;
      std::fill(mx.begin(), mx.end(), -INFINITY);
      std::fill(den.begin(), den.end(), 0.f);
      std::fill(o.begin(), o.end(), 0.f);
      for (int64_t r = 0; r < QB; ++r) {  // scaled query rows as bf16 (consecutive pairs = 32-bit words)
        const bf16* qr = Q + ((b * H + h) * T + t0 + r) * Dh;
        bf16* qd = (bf16*)&q[r * D2];
        if (r >= nq) {
          std::fill(qd, qd + Dh, (bf16)0);
          continue;
        }
        for (int64_t d = 0; d < Dh; d += 16) store16(qd + d, _mm512_mul_ps(load16(qr + d), _mm512_set1_ps(scale)));
      }
      const int64_t last = M ? S : std::min(S, t0 + nq + S - T);  // causal: later keys are never visible
      for (int64_t j0 = 0; j0 < last; j0 += KB) {
        const int64_t nk = std::min(KB, last - j0);
        const uint32_t* ktb = kt.data() + ((b * G + g) * nkb + j0 / KB) * D2 * KB;
        const uint32_t* vtb = vt.data() + ((b * G + g) * nkb + j0 / KB) * KP * Dh;
        for (int64_t r0 = 0; r0 < nq; r0 += 4) {  // scores: 4 query rows x KB keys
          __m512 acc[4][NC];
          for (int r = 0; r < 4; ++r)
            for (int c = 0; c < NC; ++c) acc[r][c] = _mm512_setzero_ps();
          for (int64_t kk = 0; kk < D2; ++kk) {
            __m512bh kv[NC];
            for (int c = 0; c < NC; ++c) kv[c] = (__m512bh)_mm512_loadu_si512(ktb + kk * KB + c * 16);
            for (int r = 0; r < 4; ++r) {
              const __m512bh qb = (__m512bh)_mm512_set1_epi32((int)q[(r0 + r) * D2 + kk]);
              for (int c = 0; c < NC; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], kv[c], qb);
            }
          }
          for (int r = 0; r < 4; ++r)
            for (int c = 0; c < NC; ++c) _mm512_storeu_ps(&s[(r0 + r) * KB + c * 16], acc[r][c]);
        }
        for (int64_t r = 0; r < nq; ++r)  // mask; nmax[r] = running max including this block
          nmax[r] = std::max(mx[r], mask_row<KB>(&s[r * KB], M, b, t0 + r, T, S, j0, nk));
        for (int64_t r = 0; r < nq; r += 16) {  // rescale factors of 16 rows at once (exp(-inf) -> ~0)
          const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(&mx[r]), _mm512_loadu_ps(&nmax[r]));
          _mm512_storeu_ps(&corr[r], exp512(_mm512_mask_mov_ps(d, _mm512_cmp_ps_mask(d, d, _CMP_UNORD_Q),
                                                             _mm512_set1_ps(-INFINITY))));
        }
        const bf16* tag = nullptr;
        for (int64_t r = 0; r < nq; ++r) {  // probabilities as bf16 pairs; numerator and denominator agree
          uint32_t* pr = &pp[r * KP];
          if (nmax[r] == -INFINITY) {  // nothing visible yet
            corr[r] = 1.f;
            std::fill(pr, pr + KP, 0u);
            continue;
          }
          mx[r] = nmax[r];
          const float* sr = &s[r * KB];
          __m512 vsum = _mm512_setzero_ps();
          for (int c = 0; c < NC; ++c) {
            const __m512 p = rnd(exp512(_mm512_sub_ps(_mm512_loadu_ps(sr + c * 16), _mm512_set1_ps(nmax[r]))), tag);
            store16((bf16*)pr + c * 16, p);  // consecutive bf16 = the (p[2j], p[2j+1]) pair words
            vsum = _mm512_add_ps(vsum, p);
          }
          den[r] = den[r] * corr[r] + _mm512_reduce_add_ps(vsum);
        }
        const int64_t np = (nk + 1) / 2;
        for (int64_t r0 = 0; r0 < nq; r0 += 4) {  // o = o * corr + P V
          const int rb = (int)std::min<int64_t>(4, nq - r0);
          switch (NVd) {
            case 4: pv_tile_bf16<4>(&pp[r0 * KP], KP, vtb, Dh, np, &o[r0 * Dh], &corr[r0], rb); break;
            case 5: pv_tile_bf16<5>(&pp[r0 * KP], KP, vtb, Dh, np, &o[r0 * Dh], &corr[r0], rb); break;
            case 8: pv_tile_bf16<8>(&pp[r0 * KP], KP, vtb, Dh, np, &o[r0 * Dh], &corr[r0], rb); break;
            default: TORCH_CHECK(false, "moekit cpu kernel: bf16 flash attention supports head widths 64, 80, 128");
          }
        }
      }
      for (int64_t r = 0; r < nq; ++r)
        for (int64_t d = 0; d < Dh; ++d)
          O[((b * H + h) * T + t0 + r) * Dh + d] = f2bf(den[r] > 0 ? o[r * Dh + d] / den[r] : 0.f);
    }
  });
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
        for (int64_t r = 0; r < nq; ++r) {  // mask, online softmax
          float* sr = &s[r * KB];
          const float nmax = std::max(mx[r], mask_row<KB>(sr, M, b, t0 + r, T, S, j0, nk));
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
#if defined(__AVX512BF16__)
    if constexpr (std::is_same_v<A, bf16>) {
      if (Dh == 64 || Dh == 80 || Dh == 128) {
        flash_attention_bf16(Q, Kp, Vp, M, O, B, H, T, Dh, G, S, kb, kg, vb, vg, (float)scale);
        return out;
      }
    }
#endif
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
