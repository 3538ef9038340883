// Low-bit weights (moekit/kernels/weights.py: int8 or int4 values with float16 group scales) x tokens.
// - Few tokens (decode): the activations are quantised once per call to int8 in 32-column blocks
//   (llama.cpp's Q8_0, qact.h; 256 against per-channel int8, its Q8_K), then vpdpbusd multiplies
//   unsigned weight bytes (int8 q + 128 here, int4 q + 8 as stored: qgemm4.h) by the signed
//   activations; the offset is taken out through the accumulator's start value, and the block and
//   weight scales are applied in float. Each weight byte is read once, with rows 16 ahead
//   prefetched, so decode runs near memory speed.
// - Weights in 16-row panels (per-channel int8: qpanel.h; int4, grouped int8: qpanelg.h) run one kernel at
//   every token count, each 64-byte weight load serving up to 8 tokens.
// - Many tokens (prefill), weights in rows: int4 and grouped int8 are unpacked 16 rows at a time into a
//   panel tile (qtile.h) for the same reuse; per-channel int8 rows (where panels do not apply) dequantise
//   32-row weight tiles to the activation dtype, exactly the reference's q * scale rounded to bf16, for
//   gemm.h's kernels (the packed bf16 microkernel).
//
// Shape legend: T tokens, N weight rows, K input columns, G = K / group scale groups per row,
// C = ceil(K / 64) int8 column chunks (two blocks each).
#pragma once

#include "qgemm4.h"
#include "qpanel.h"
#include "qpanelg.h"
#include "qtile.h"

namespace moekit {

// Whether W meets `tokens` tokens with int8 activations (VNNI dot products, qact.h) rather than with
// dequantised tiles (bench/cpu_quant_kernels.py, EPYC Zen 4, 2 threads, Mixtral- and XVERSE-shaped layers at
// 128 and 512 tokens, against the dequantised tiles' 0.8-0.97x bf16's speed):
// - panels (int8: qpanel.h, int4 and grouped int8: qpanelg.h): at every count, each 64-byte weight load
//   reused over up to 8 tokens (per-channel int8 1.6-2.1x as fast as with bf16 weights);
// - int4 and grouped int8 rows: below QGEMM_MIN_TOKENS the row kernels, from it on 16-row tiles unpacked into
//   panels (qtile.h: int4 1.0-1.3x bf16's speed; int8 in groups of 32 1.14-1.26x faster than its tiles);
// - per-channel int8 rows (no panels): below QGEMM_MIN_TOKENS. On one Mixtral-sized expert, one thread, at 8
//   tokens the decode path was 1.2-1.4x faster than the tiles, at 16 within 10%, at 32 the tiles 1.2x faster.
constexpr int64_t QGEMM_MIN_TOKENS = 16;
inline bool qdecode(const QMat& W, int64_t tokens) {
#if defined(__AVX512VNNI__)
  return W.panels || !W.per_channel() || tokens < QGEMM_MIN_TOKENS;
#else
  return false;  // no vpdpbusd: every token count dequantises tiles
#endif
}

#if defined(__AVX512VNNI__)
// A 64-column chunk of an int8 weight row (at p, `left` bytes before the row ends) as 64 unsigned bytes
// (q + 128, the xor of the sign bit); bytes past the row load as 0 and meet zero activations.
__attribute__((always_inline)) inline __m512i load_chunk(const uint8_t* p, int64_t left, bool full) {
  const __m512i v = full ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi8((__mmask64)((1ull << left) - 1), p);
  return _mm512_xor_si512(v, _mm512_set1_epi8((char)0x80));
}

// How an int8 chunk's lanes get their weight scales: one per row (per channel, applied to the sum), the
// pair of group 32, one per chunk (a group of 64k), or any two (groups of 32 + 64k).
enum { SC_ROW, SC_G32, SC_ONE, SC_TWO };

// The rows' float scales and where each 32-column block finds its group.
struct QScales {
  std::vector<float> f;     // [rows, G] (int8; int4 kernels read the float16 scales in place)
  std::vector<int32_t> gi;  // [2C]: the group of each block (SC_ONE, SC_TWO)
  std::vector<uint8_t> tile;  // int4 and grouped int8 with many tokens: 16 rows unpacked (qtile.h)
};

// One int8 chunk c of RR rows (pointers rp, float scales sp) against TB tokens, into acc.
template <int TB, int RR, int SC>
__attribute__((always_inline)) inline void qchunk(__m512 (&acc)[TB][RR], const uint8_t* const* rp, int64_t rb,
                                                  const float* const* sp, const int32_t* gi, int64_t G,
                                                  const ActView& a, int64_t c, bool full, int64_t pf) {
  const int64_t C = a.C;
  const __m512i pair = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  __m512i w[RR];
  __m512 dw[RR];
  for (int i = 0; i < RR; ++i) {
    _mm_prefetch((const char*)(rp[i] + c * 64 + pf), _MM_HINT_T1);
    w[i] = in_register(load_chunk(rp[i] + c * 64, rb - c * 64, full));
    if constexpr (SC == SC_G32)  // a last chunk of one block reads one scale
      dw[i] = _mm512_permutexvar_ps(
          pair, _mm512_castps128_ps512(_mm_maskz_loadu_ps(full || 2 * c + 1 < G ? 3 : 1, sp[i] + 2 * c)));
    if constexpr (SC == SC_TWO)
      dw[i] = _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(sp[i][gi[2 * c]]), _mm512_set1_ps(sp[i][gi[2 * c + 1]]));
  }
  for (int t = 0; t < TB; ++t) {
    const int64_t at = t * C + c;
    const __m512i x = in_register(_mm512_loadu_si512(a.q + at * 64));
    const __m512i b = in_register(_mm512_loadu_si512(a.bias + at * 16));
    const __m512 dx = in_register(_mm512_loadu_ps(a.dx + at * 16));
    for (int i = 0; i < RR; ++i) {
      const __m512 p = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(b, w[i], x));
      if constexpr (SC == SC_ROW) acc[t][i] = _mm512_fmadd_ps(p, dx, acc[t][i]);
      else if constexpr (SC == SC_ONE)  // a broadcast memory operand: no register held across tokens
        acc[t][i] = _mm512_fmadd_ps(p, _mm512_mul_ps(dx, _mm512_set1_ps(sp[i][gi[2 * c]])), acc[t][i]);
      else acc[t][i] = _mm512_fmadd_ps(p, _mm512_mul_ps(dx, dw[i]), acc[t][i]);
    }
  }
}

// One 256-column activation block u of RR per-channel int8 rows (rp, rb bytes long) against TB tokens, into
// acc: its chunks' dot products summed in int32 from the block's bias, then one conversion and one fma with
// the block's scale. NC > 0: NC whole chunks; NC = 0: the row's last block, nc chunks, the last one partial
// where the row ends inside it. (|sum| < 2^23: 256 x 255 x 127.)
template <int TB, int RR, int NC>
__attribute__((always_inline)) inline void qblock256(__m512 (&acc)[TB][RR], const uint8_t* const* rp, int64_t rb,
                                                     const ActView& a, int64_t u, int64_t pf, int64_t nc = NC) {
  __m512i s[TB][RR];
  for (int t = 0; t < TB; ++t) {
    const __m512i b = _mm512_loadu_si512(a.bias + (t * a.U + u) * 16);
    for (int i = 0; i < RR; ++i) s[t][i] = b;
  }
  const int64_t n = NC ? NC : nc;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t c = 4 * u + j;
    __m512i w[RR];
    for (int i = 0; i < RR; ++i) {
      _mm_prefetch((const char*)(rp[i] + c * 64 + pf), _MM_HINT_T1);
      w[i] = in_register(load_chunk(rp[i] + c * 64, rb - c * 64, NC || rb - c * 64 >= 64));
    }
    for (int t = 0; t < TB; ++t) {
      const __m512i x = in_register(_mm512_loadu_si512(a.q + (t * a.C + c) * 64));
      for (int i = 0; i < RR; ++i) s[t][i] = _mm512_dpbusd_epi32(s[t][i], w[i], x);
    }
  }
  for (int t = 0; t < TB; ++t) {
    const __m512 dx = _mm512_set1_ps(a.dx[(t * a.U + u) * 16]);
    for (int i = 0; i < RR; ++i) acc[t][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[t][i]), dx, acc[t][i]);
  }
}

// acc[t][i] = the lanes of row r + i * rs of int8 W . token t0 + t (scales: s.f, qscales), RR rows, TB
// tokens; pf: the prefetch distance (prefetch_at).
template <int TB, int RR, int SC>
inline void qacc(const QMat& W, int64_t r, const QScales& s, const QAct& a, int64_t t0, __m512 (&acc)[TB][RR],
                 int64_t pf, int64_t rs) {
  const int64_t rb = W.row_bytes(), G = W.G();
  const uint8_t* rp[RR];
  const float* sp[RR];
  for (int i = 0; i < RR; ++i) rp[i] = W.row(r + i * rs), sp[i] = s.f.data() + i * G;
  for (int t = 0; t < TB; ++t)
    for (int i = 0; i < RR; ++i) acc[t][i] = _mm512_setzero_ps();
  const int64_t whole = W.K / 64;  // chunks inside every row
  const ActView x(a, t0);
  if constexpr (SC == SC_ROW) {  // 256-column activation blocks
    const int64_t full = W.K / 256, tail = a.C - 4 * full;  // whole blocks, then the last one's chunks
    for (int64_t u = 0; u < full; ++u) qblock256<TB, RR, 4>(acc, rp, rb, x, u, pf);
    if (!tail) return;
    if (W.K % 64) return qblock256<TB, RR, 0>(acc, rp, rb, x, full, pf, tail);  // a partial last chunk
    if (tail == 1) qblock256<TB, RR, 1>(acc, rp, rb, x, full, pf);
    else if (tail == 2) qblock256<TB, RR, 2>(acc, rp, rb, x, full, pf);
    else qblock256<TB, RR, 3>(acc, rp, rb, x, full, pf);
    return;
  }
  const int32_t* gi = s.gi.data();
  for (int64_t c = 0; c < whole; ++c) qchunk<TB, RR, SC>(acc, rp, rb, sp, gi, G, x, c, true, pf);
  if (whole < a.C) qchunk<TB, RR, SC>(acc, rp, rb, sp, gi, G, x, whole, false, pf);
}

// out[t * ldo + i * rs] += row r + i * rs of W . token t0 + t, for RR rows and TB tokens. Flattened: with
// reduce16 called out of line here, int8 GEMVs of 2-8 tokens ran 4-7% slower (in-process A/B, EPYC Zen 4).
template <int TB, int RR, int SC>
__attribute__((flatten)) inline void qdot_block(const QMat& W, int64_t r, const QScales& s, const QAct& a, int64_t t0,
                                                float* out, int64_t ldo, int64_t pf, int64_t rs) {
  __m512 acc[TB][RR];
  qacc<TB, RR, SC>(W, r, s, a, t0, acc, pf, rs);
  __m512 v[16];
  for (int t = 0; t < TB; ++t)
    for (int i = 0; i < RR; ++i) v[t * RR + i] = acc[t][i];
  for (int i = TB * RR; i < 16; ++i) v[i] = _mm512_setzero_ps();
  alignas(64) float sums[16];
  _mm512_store_ps(sums, reduce16(v));
  for (int t = 0; t < TB; ++t)
    for (int i = 0; i < RR; ++i) out[t * ldo + i * rs] += sums[t * RR + i] * (SC == SC_ROW ? s.f[i * W.G()] : 1.f);
}

// The float scales of RR int8 rows r + i * rs into s.f [RR, G].
template <int RR>
inline void qscales(const QMat& W, int64_t r, QScales& s, int64_t rs) {
  const int64_t G = W.G();
  s.f.resize(RR * G);
  for (int i = 0; i < RR; ++i) {
    const uint16_t* h = W.srow(r + i * rs);
    int64_t g = 0;
    for (; g + 16 <= G; g += 16)
      _mm512_storeu_ps(s.f.data() + i * G + g, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(h + g))));
    for (; g < G; ++g) s.f[i * G + g] = h2f(h[g]);
  }
}

// RR rows r + i * rs of int8 W against all tokens: their scales in float, then blocks of up to 4 tokens.
// Per channel (int32 sums beside the float ones), blocks of 2 tokens but at 8 or more: in-process A/B, cold
// Mixtral-shaped expert matrices, 4-token blocks were 2-6% slower at 4 tokens, 3-13% faster at 8.
template <int RR, int SC>
inline void qrows(const QMat& W, int64_t r, QScales& s, const QAct& a, float* Y, int64_t ldo, int64_t pf,
                  int64_t rs = 1) {
  const int64_t T = a.T;
  qscales<RR>(W, r, s, rs);
  int64_t t = 0;
  for (; (SC != SC_ROW || T >= 8) && t + 4 <= T; t += 4)
    qdot_block<4, RR, SC>(W, r, s, a, t, Y + t * ldo + r, ldo, pf, rs);
  if (SC != SC_ROW && T - t == 3) {
    qdot_block<3, RR, SC>(W, r, s, a, t, Y + t * ldo + r, ldo, pf, rs);
    t += 3;
  }
  for (; t + 2 <= T; t += 2) qdot_block<2, RR, SC>(W, r, s, a, t, Y + t * ldo + r, ldo, pf, rs);
  if (T - t == 1) qdot_block<1, RR, SC>(W, r, s, a, t, Y + t * ldo + r, ldo, pf, rs);
}

template <int SC>
inline void qgemv_t(const QMat& W, int64_t r0, int64_t r1, const QAct& a, float* Y, int64_t ldo, QScales& s) {
  int64_t r;  // rows from four regions (qact.h), then the rest
  if (a.T == 1)
    r = one_token_rows(W, r0, r1, Y, [&](int64_t rr, int64_t rs, int64_t pf, __m512* out, float* mul) {
      qscales<4>(W, rr, s, rs);
      __m512 acc[1][4];
      qacc<1, 4, SC>(W, rr, s, a, 0, acc, pf, rs);
      for (int i = 0; i < 4; ++i) out[i] = acc[0][i], mul[i] = SC == SC_ROW ? s.f[i * W.G()] : 1.f;
    });
  else
    r = region_quads(W, r0, r1, [&](int64_t rr, int64_t rs, int64_t pf) { qrows<4, SC>(W, rr, s, a, Y, ldo, pf, rs); });
  for (; r + 4 <= r1; r += 4) qrows<4, SC>(W, r, s, a, Y, ldo, prefetch_at(W, r, 4));
  for (; r < r1; ++r) qrows<1, SC>(W, r, s, a, Y, ldo, prefetch_at(W, r, 1));
}

// Y[t * ldo + r] += W[r] . X[t] for rows [r0, r1) of W and the activations `a` (quantised for W).
inline void qgemv_rows(const QMat& W, int64_t r0, int64_t r1, const QAct& a, float* Y, int64_t ldo, QScales& s) {
  if (W.panels) {
    if (W.per_channel()) return qgemv_panels(W, r0, r1, a, Y, ldo, s.f);
    return W.int4 ? qgemv_panelsg<true>(W, r0, r1, a, Y, ldo) : qgemv_panelsg<false>(W, r0, r1, a, Y, ldo);
  }
  if (a.T >= QGEMM_MIN_TOKENS && !W.per_channel() &&
      (r0 = qgemm_tiles(W, r0, r1, a, Y, ldo, s.tile, s.f)) == r1)
    return;
  if (W.int4) {
    if (W.group == 32) return qgemv4<1>(W, r0, r1, a, Y, ldo);
    if (W.group == 64) return qgemv4<2>(W, r0, r1, a, Y, ldo);
    return qgemv4<4>(W, r0, r1, a, Y, ldo);  // group 128
  }
  if (W.per_channel()) return qgemv_t<SC_ROW>(W, r0, r1, a, Y, ldo, s);
  if (W.group == 32) return qgemv_t<SC_G32>(W, r0, r1, a, Y, ldo, s);
  s.gi.resize(2 * a.C);  // the scale group of each 32-column block (past K: the last), without divisions
  for (int64_t b = 0, g = 0; b < 2 * a.C; ++b) {
    while (g + 1 < W.G() && (g + 1) * W.group <= b * 32) ++g;
    s.gi[b] = g;
  }
  if (W.group % 64 == 0) return qgemv_t<SC_ONE>(W, r0, r1, a, Y, ldo, s);
  return qgemv_t<SC_TWO>(W, r0, r1, a, Y, ldo, s);
}
#endif

// Rows [r0, r0 + rows) of W dequantised into out [rows, K] in the activation dtype: q * scale in
// float32, then rounded (to nearest even for bf16), as QuantWeight.dequantize(dtype) computes it.
#if defined(__AVX512F__)
inline void store32(float* o, __m512 lo, __m512 hi) {  // 32 values: lo then hi
  _mm512_storeu_ps(o, lo);
  _mm512_storeu_ps(o + 16, hi);
}
inline void store32(bf16* o, __m512 lo, __m512 hi) {
#if defined(__AVX512BF16__)
  _mm512_storeu_si512(o, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));  // round to nearest even, as store16
#else
  store16(o, lo);
  store16(o + 16, hi);
#endif
}
#endif

template <typename A>
void dequant_rows(const QMat& W, int64_t r0, int64_t rows, A* out) {
  const int64_t K = W.K, G = W.G();
  std::vector<uint8_t> unpanelled(W.panels ? W.row_bytes() : 0);
  std::vector<uint16_t> scales(G);
  for (int64_t i = 0; i < rows; ++i) {
    const uint8_t* p = W.row(r0 + i);
    if (W.panels) {
      panel_row(W, r0 + i, unpanelled.data());
      p = unpanelled.data();
    }
    for (int64_t g = 0; g < G; ++g) scales[g] = W.scale_at(r0 + i, g);
    const uint16_t* s = scales.data();
    A* o = out + i * K;
    for (int64_t g = 0; g < G; ++g) {
      const float sc = h2f(s[g]);
      int64_t k = g * W.group;
      const int64_t end = k + W.group;
#if defined(__AVX512F__)
      const __m512 vs = _mm512_set1_ps(sc), m8 = _mm512_set1_ps(-8.f * sc);
      for (; W.int4 && k < end; k += 32) {  // a 32-column block: byte j holds column j (low nibble), j + 16 (high)
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(p + k / 2)));
        store32(o + k, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15))), vs, m8),
                _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), vs, m8));  // (q + 8) s - 8 s, exact
      }
      for (; !W.int4 && k + 32 <= end; k += 32) {
        const __m256i v = _mm256_loadu_si256((const __m256i*)(p + k));
        store32(o + k, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(v))), vs),
                _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(v, 1))), vs));
      }
#endif
      for (; k < end; ++k) {
        const int q = W.int4 ? ((p[k / 32 * 16 + k % 16] >> (k % 32 >= 16 ? 4 : 0)) & 15) - 8 : (int8_t)p[k];
        o[k] = from_f<A>(q * sc);
      }
    }
  }
}

// Rows [r0, r1) of W against X [T, K] in the activation dtype, many tokens: 32-row tiles dequantised
// into `tile`, then gemm.h's kernels (the packed bf16 microkernel for bf16).
template <typename A>
inline void qmatmul_rows(const QMat& W, int64_t r0, int64_t r1, const A* X, int64_t T, float* Y, int64_t ldo,
                         std::vector<A>& tile, std::vector<uint32_t>& pack) {
  tile.resize(BLOCK * W.K);
  for (int64_t r = r0; r < r1; r += BLOCK) {
    const int64_t rows = std::min(BLOCK, r1 - r);
    dequant_rows<A>(W, r, rows, tile.data());
    matmul_rows<A>(tile.data(), 0, rows, X, T, W.K, Y + r, ldo, pack);
  }
}

// The weight `w` as a QMat when `scale` is given, with K input columns: int8 data [N, K] in rows, uint8 data
// [N, K / 2] (int4) or [N, K] (int8 in panels, qpanel.h / qpanelg.h); with group scales in panels (int4,
// grouped int8: qpanelg.h) the float16 scales are [N / 16, G, 16] (a dim more than the data), else [N, G].
inline QMat qmat(const torch::Tensor& w, const torch::Tensor& scale, int64_t K) {
  check(w.is_contiguous() && scale.is_contiguous() && scale.scalar_type() == torch::kHalf,
        "quantised weights: contiguous data and float16 scales");
  check(w.scalar_type() == torch::kByte || w.scalar_type() == torch::kChar,
        "quantised weights: int8 data, or uint8 (int4, int8 panels)");
  const bool bytes = w.scalar_type() == torch::kByte, int4 = bytes && w.size(-1) != K, panels8 = bytes && !int4;
  const bool gpanels = scale.dim() == w.dim() + 1;
  check(!gpanels || bytes, "quantised weights: scales in panels need data in panels");
  const int64_t N = w.size(-2), G = scale.size(gpanels ? -2 : -1);
  check(G > 0 && K % G == 0 && w.size(-1) == (int4 ? K / 2 : K) &&
            (gpanels ? scale.size(-1) == 16 && scale.size(-3) * 16 == N : scale.size(-2) == N),
        "quantised weight shapes");
  const int64_t group = K / G;
  check(int4 ? group % 32 == 0 : (group == K || group % 32 == 0), "quantised weights: group size");
  check(!panels8 || ((gpanels || G == 1) && N % 16 == 0 && K % 4 == 0),
        "int8 panels: rows a multiple of 16, columns of 4, scales one per row or in panels");
  QMat m{(const uint8_t*)w.data_ptr(), (const uint16_t*)scale.data_ptr(), N, K, group, int4, nullptr, G};
  m.panels = panels8 || gpanels;
  return m;
}

}  // namespace moekit
