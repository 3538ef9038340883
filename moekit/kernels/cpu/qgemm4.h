// int4 (GGUF Q4_0 layout) weights x few tokens: the decode kernels. Each 64-byte chunk of a row holds four
// 32-column blocks; its low nibbles meet the activations of columns 0-15 of each block and its high nibbles
// those of columns 16-31 (QAct's int4 order), both in the block's int32 lanes, so two vpdpbusd, one
// conversion and one fma per chunk and row; float16 scales are read in place.
//
// Shape legend: T tokens, N weight rows, K input columns, PER 32-column blocks per scale group.
#pragma once

#include "qact.h"

namespace moekit {

#if defined(__AVX512VNNI__)
// The high nibbles of 64 bytes, as bytes: one GFNI affine transform (a right shift by 4 within each byte)
// where the CPU has it, else a 16-bit shift and a mask.
__attribute__((always_inline)) inline __m512i high_nibbles(__m512i v) {
#if defined(__GFNI__)
  return _mm512_gf2p8affine_epi64_epi8(v, _mm512_set1_epi64(0x1020408000000000ll), 0);
#else
  return _mm512_and_si512(_mm512_srli_epi16(v, 4), _mm512_set1_epi8(15));
#endif
}

// acc[t][i] += chunk c of RR rows (nibbles lo, hi; weight scale dw per int32 lane) . token t, TB tokens.
template <int TB, int RR>
__attribute__((always_inline)) inline void qtokens4(__m512 (&acc)[TB][RR], const __m512i* lo, const __m512i* hi,
                                                    const __m512* dw, const ActView& x, int64_t c) {
  for (int t = 0; t < TB; ++t) {
    const int64_t at = t * x.C + c;
    const __m512i xl = in_register(_mm512_loadu_si512(x.q + at * 128));
    const __m512i xh = in_register(_mm512_loadu_si512(x.q + at * 128 + 64));
    const __m512i b = in_register(_mm512_loadu_si512(x.bias + at * 16));
    const __m512 dx = in_register(_mm512_loadu_ps(x.dx + at * 16));
    for (int i = 0; i < RR; ++i) {
      const __m512i s = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(b, lo[i], xl), hi[i], xh);
      acc[t][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(dx, dw[i]), acc[t][i]);
    }
  }
}

// One int4 chunk c (128 columns, 64 bytes a row) of RR rows (from w, rb bytes apart; their float16 scales
// from sc, G apart) against TB tokens, into acc; nb: its blocks (4 but in a row's last chunk). The low and
// high nibbles of a byte both meet block j's activations in int32 lane 4j + m, so two vpdpbusd fill one
// int32 sum per lane and one float conversion and fma finish it. The scales are read in place.
template <int TB, int RR, int PER>
__attribute__((always_inline)) inline void qchunk4(__m512 (&acc)[TB][RR], const uint8_t* w, int64_t rb,
                                                   const uint16_t* sc, int64_t G, const ActView& x, int64_t c,
                                                   int nb, int64_t pf) {
  // int32 lane -> its block's scale among those the chunk loads
  const __m512i lanes = PER == 1 ? _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0)
                      : PER == 2 ? _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0)
                                 : _mm512_setzero_si512();
  constexpr int SCALES = 4 / PER;  // scales a whole chunk spans
  const __m512i m4 = _mm512_set1_epi8(15);
  __m512i lo[RR], hi[RR];
  __m512 dw[RR];
  for (int i = 0; i < RR; ++i) {
    const uint8_t* p = w + i * rb + c * 64;
    _mm_prefetch((const char*)(p + pf), _MM_HINT_T1);
    const __m512i v = in_register(nb == 4 ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi8((__mmask64)((1ull << (16 * nb)) - 1), p));
    lo[i] = _mm512_and_si512(v, m4);
    hi[i] = high_nibbles(v);
    const int n = nb == 4 ? SCALES : (nb + PER - 1) / PER;
    const __m128 s4 = _mm_cvtph_ps(_mm_maskz_loadu_epi16((__mmask8)((1u << n) - 1), sc + i * G + c * SCALES));
    dw[i] = _mm512_permutexvar_ps(lanes, _mm512_castps128_ps512(s4));
  }
  qtokens4<TB, RR>(acc, lo, hi, dw, x, c);
}

// Four whole int4 chunks from c0 (512 columns): as qchunk4, with each row's scales of all four chunks
// loaded and converted once.
template <int TB, int RR, int PER>
__attribute__((always_inline)) inline void qquad4(__m512 (&acc)[TB][RR], const uint8_t* w, int64_t rb,
                                                  const uint16_t* sp, int64_t G, const ActView& x, int64_t c0,
                                                  int64_t pf) {
  constexpr int SCALES = 4 / PER;  // per chunk
  const __m512i lanes = PER == 1 ? _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0)
                      : PER == 2 ? _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0)
                                 : _mm512_setzero_si512();
  const __m512i m4 = _mm512_set1_epi8(15);
  __m512 sc[RR];  // the rows' 4 * SCALES scales, as float
  for (int i = 0; i < RR; ++i)
    sc[i] = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16((__mmask16)((1u << (4 * SCALES)) - 1), sp + i * G + c0 * SCALES));
  if constexpr (TB == 1) {  // each row's scales times the token's, block by block, once for the four chunks
    const __m512i expand = PER == 1 ? _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0)
                         : PER == 2 ? _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0)
                                    : _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    const __m512i g32 = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    const __m512 db = _mm512_loadu_ps(x.db + c0 * 4);
    __m512 pr[RR];
    for (int i = 0; i < RR; ++i) pr[i] = _mm512_mul_ps(db, PER == 1 ? sc[i] : _mm512_permutexvar_ps(expand, sc[i]));
    for (int k = 0; k < 4; ++k) {
      const int64_t c = c0 + k;
      const __m512i pick = _mm512_add_epi32(g32, _mm512_set1_epi32(4 * k));
      const __m512i xl = in_register(_mm512_loadu_si512(x.q + c * 128));
      const __m512i xh = in_register(_mm512_loadu_si512(x.q + c * 128 + 64));
      const __m512i b = in_register(_mm512_loadu_si512(x.bias + c * 16));
      for (int i = 0; i < RR; ++i) {
        const uint8_t* p = w + i * rb + c * 64;
        _mm_prefetch((const char*)(p + pf), _MM_HINT_T1);
        const __m512i v = in_register(_mm512_loadu_si512(p));
        const __m512i s = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(b, _mm512_and_si512(v, m4), xl), high_nibbles(v), xh);
        acc[0][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_permutexvar_ps(pick, pr[i]), acc[0][i]);
      }
    }
    return;
  }
  for (int k = 0; k < 4; ++k) {
    const int64_t c = c0 + k;
    const __m512i pick = _mm512_add_epi32(lanes, _mm512_set1_epi32(k * SCALES));
    __m512i lo[RR], hi[RR];
    for (int i = 0; i < RR; ++i) {
      const uint8_t* p = w + i * rb + c * 64;
      _mm_prefetch((const char*)(p + pf), _MM_HINT_T1);
      const __m512i v = in_register(_mm512_loadu_si512(p));
      lo[i] = _mm512_and_si512(v, m4);
      hi[i] = high_nibbles(v);
    }
    __m512 dw[RR];
    for (int i = 0; i < RR; ++i) dw[i] = _mm512_permutexvar_ps(pick, sc[i]);
    qtokens4<TB, RR>(acc, lo, hi, dw, x, c);
  }
}

// out[t][i] = the lanes of row r + i * rs of int4 W . token t of x, for RR rows and TB tokens (groups of
// PER blocks); pf: the prefetch distance (prefetch_at).
template <int TB, int RR, int PER>
inline void qacc4(const QMat& W, int64_t r, const ActView x, int64_t pf, __m512 (&out)[TB][RR], int64_t rs) {
  const uint8_t* const w = W.row(r);
  const uint16_t* const sp = W.srow(r);
  // rb, G: the byte and scale strides between the RR rows
  const int64_t rb = W.row_bytes() * rs, G = W.G() * rs, whole = W.K / 128, C = x.C;
  __m512 acc[TB][RR];
  for (int t = 0; t < TB; ++t)
    for (int i = 0; i < RR; ++i) acc[t][i] = _mm512_setzero_ps();
  // the scales are a second stream (2 bytes a block, rows back to back): fetch those 16 rows ahead
  for (int i = 0; i < RR; ++i) {
    const char* ahead = (const char*)(sp + i * G + (pf ? 16 : 0) * W.G());
    for (int64_t b = 0; b < W.G() * 2; b += 64) _mm_prefetch(ahead + b, _MM_HINT_T1);
  }
  int64_t c = 0;
  for (; c + 4 <= whole; c += 4) qquad4<TB, RR, PER>(acc, w, rb, sp, G, x, c, pf);
  for (; c < whole; ++c) qchunk4<TB, RR, PER>(acc, w, rb, sp, G, x, c, 4, pf);
  if (whole < C) qchunk4<TB, RR, PER>(acc, w, rb, sp, G, x, whole, int(W.K % 128 / 32), pf);
  for (int t = 0; t < TB; ++t)
    for (int i = 0; i < RR; ++i) out[t][i] = acc[t][i];
}

// out[t * ldo + i * rs] += row r + i * rs of W . token t0 + t, RR rows, TB tokens; pf: the prefetch distance.
template <int TB, int RR, int PER>
inline void qdot_block4(const QMat& W, int64_t r, const QAct& a, int64_t t0, float* out, int64_t ldo, int64_t pf,
                        int64_t rs = 1) {
  __m512 acc[TB][RR];
  qacc4<TB, RR, PER>(W, r, ActView(a, t0), pf, acc, rs);
  add_sums<TB, RR>(acc, out, ldo, rs);
}

// Rows r + i * rs (i < 4) of W against every token, in blocks of up to 4 tokens.
template <int PER>
inline void qrows4(const QMat& W, int64_t r, const QAct& a, float* Y, int64_t ldo, int64_t pf, int64_t rs) {
  int64_t t = 0;
  for (; t + 4 <= a.T; t += 4) qdot_block4<4, 4, PER>(W, r, a, t, Y + t * ldo + r, ldo, pf, rs);
  for (; t + 2 <= a.T; t += 2) qdot_block4<2, 4, PER>(W, r, a, t, Y + t * ldo + r, ldo, pf, rs);
  if (t < a.T) qdot_block4<1, 4, PER>(W, r, a, t, Y + t * ldo + r, ldo, pf, rs);
}

template <int PER>
inline void qgemv4(const QMat& W, int64_t r0, int64_t r1, const QAct& a, float* Y, int64_t ldo) {
  const int64_t T = a.T;
  int64_t r = r0;
  if (T == 1) {  // rows from four regions (qact.h)
    const ActView x(a, 0);
    r = one_token_rows(W, r0, r1, Y, [&](int64_t rr, int64_t rs, int64_t pf, __m512* out, float* mul) {
      __m512 acc[1][4];
      qacc4<1, 4, PER>(W, rr, x, pf, acc, rs);
      for (int i = 0; i < 4; ++i) out[i] = acc[0][i], mul[i] = 1.f;
    });
  } else {
    r = region_quads(W, r0, r1, [&](int64_t rr, int64_t rs, int64_t pf) { qrows4<PER>(W, rr, a, Y, ldo, pf, rs); });
  }
  for (; r + 4 <= r1; r += 4) qrows4<PER>(W, r, a, Y, ldo, prefetch_at(W, r, 4), 1);
  for (; r < r1; ++r)
    for (int64_t t = 0; t < T; ++t) qdot_block4<1, 1, PER>(W, r, a, t, Y + t * ldo + r, ldo, prefetch_at(W, r, 1));
}
#endif

}  // namespace moekit
