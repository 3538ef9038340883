// Weights with group scales in panels (QuantWeight.to_panels, moekit/kernels/weights.py): int4 and grouped
// int8, the decode and prefill kernel. A panel is 16 rows stored four row bytes at a time, [row bytes / 4,
// 16, 4], and its scales float16 [G, 16] (a group's 16 rows side by side):
// - int4: word s (0-3) of a 32-column block b of row l is the row's Q4_0 bytes 16 b + 4 s .. + 3, whose low
//   nibbles are columns 32 b + 4 s .. + 3 and high nibbles columns 32 b + 16 + 4 s .. + 3 (values q + 8). An
//   and and a shift (qgemm4.h's high_nibbles) split a 64-byte load into two vpdpbusd operands of 16 rows x 4
//   columns, against a token's matching activation bytes, broadcast (QAct's int4 order);
// - grouped int8 (a GGUF Q8_0 file kept as int8): word s (0-7) of block b is columns 32 b + 4 s .. + 3 as
//   q + 128, one vpdpbusd operand against the token's activation bytes in column order.
// A block's 16 row sums (int32, from the bias that takes the offset out) take one conversion and one fma
// with the rows' scales times the block's activation scale: no horizontal reduction, every load a whole
// cache line whatever K, and each load serves up to 8 tokens, so prefill needs no unpacked tiles (qtile.h).
//
// Shape legend: T tokens, N rows (a multiple of 16), K columns (a multiple of 32), B = K / 32 blocks per
// row, G = K / group scale groups, per = group / 32 blocks per group, RP panels side by side, TB tokens.
#pragma once

#include "qgemm4.h"

namespace moekit {

#if defined(__AVX512VNNI__)
// Y[t * ldo + 16 r + l] += panel r's row l . token t, for RP panels from p (pb bytes apart; their scales
// from sc, sb apart) and TB tokens of a; each weight line is prefetched pf bytes ahead (pf 0: not at all).
template <int TB, int RP, bool INT4>
__attribute__((always_inline)) inline void panelg_block(const uint8_t* p, int64_t pb, const uint16_t* sc, int64_t sb,
                                                        int64_t B, int64_t per, const ActView& a, float* Y,
                                                        int64_t ldo, int64_t pf) {
  constexpr int LOADS = INT4 ? 4 : 8;  // 64-byte loads a block takes
  __m512 f[TB][RP], w[RP];
  for (int t = 0; t < TB; ++t)
    for (int r = 0; r < RP; ++r) f[t][r] = _mm512_setzero_ps();
  const int64_t tb = a.C * (INT4 ? 128 : 64);  // activation bytes per token
  const __m512i m4 = _mm512_set1_epi8(15);
  for (int64_t b = 0; b < B; ++b) {
    // the block's int32 lane in QAct's bias / dx arrays (token 0), and its first activation byte
    const int64_t lane = INT4 ? (b / 4) * 16 + 4 * (b % 4) : (b / 2) * 16 + 8 * (b % 2);
    const int8_t* x = a.q + (INT4 ? (b / 4) * 128 + 16 * (b % 4) : 32 * b);
    __m512i s[TB][RP];  // exact int32 sums of the block (|sum| < 2^23: 32 x 255 x 127)
    for (int t = 0; t < TB; ++t) {
      const __m512i bias = _mm512_set1_epi32(a.bias[t * a.C * 16 + lane]);
      for (int r = 0; r < RP; ++r) s[t][r] = bias;
    }
    for (int m = 0; m < LOADS; ++m) {
      __m512i lo[RP], hi[RP];
      for (int r = 0; r < RP; ++r) {
        const uint8_t* at = p + r * pb + (LOADS * b + m) * 64;
        if (pf) _mm_prefetch((const char*)(at + pf), _MM_HINT_T1);
        lo[r] = in_register(_mm512_loadu_si512(at));
        if constexpr (INT4) {
          hi[r] = high_nibbles(lo[r]);
          lo[r] = _mm512_and_si512(lo[r], m4);
        }
      }
      for (int t = 0; t < TB; ++t) {
        int32_t xl, xh = 0;
        std::memcpy(&xl, x + t * tb + 4 * m, 4);
        if constexpr (INT4) std::memcpy(&xh, x + t * tb + 64 + 4 * m, 4);
        const __m512i vl = _mm512_set1_epi32(xl), vh = _mm512_set1_epi32(xh);
        for (int r = 0; r < RP; ++r) {
          s[t][r] = _mm512_dpbusd_epi32(s[t][r], lo[r], vl);
          if constexpr (INT4) s[t][r] = _mm512_dpbusd_epi32(s[t][r], hi[r], vh);
        }
      }
    }
    if (b % per == 0)
      for (int r = 0; r < RP; ++r)
        w[r] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(sc + r * sb + (b / per) * 16)));
    for (int t = 0; t < TB; ++t) {
      const __m512 d = _mm512_set1_ps(INT4 ? a.db[t * a.C * 4 + b] : a.dx[t * a.C * 16 + lane]);
      for (int r = 0; r < RP; ++r) f[t][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[t][r]), _mm512_mul_ps(w[r], d), f[t][r]);
    }
  }
  for (int t = 0; t < TB; ++t)
    for (int r = 0; r < RP; ++r) {
      float* y = Y + t * ldo + 16 * r;
      _mm512_storeu_ps(y, _mm512_add_ps(f[t][r], _mm512_loadu_ps(y)));
    }
}

// RP panels against every token of a, TB tokens at a time, then blocks of 4, 2 and 1 for the rest; only the
// first block prefetches (the panels are in cache for the rest: issued anyway, the prefetches cost grouped
// int8 prefill about a third, bench/cpu_quant_kernels.py).
template <int TB, int RP, bool INT4>
inline void panelg_tokens(const uint8_t* p, int64_t pb, const uint16_t* sc, int64_t sb, int64_t B, int64_t per,
                          const QAct& a, float* Y, int64_t ldo, int64_t pf) {
  int64_t t = 0;
  for (; t + TB <= a.T; t += TB, pf = 0)
    panelg_block<TB, RP, INT4>(p, pb, sc, sb, B, per, ActView(a, t), Y + t * ldo, ldo, pf);
  if constexpr (TB > 4)
    for (; t + 4 <= a.T; t += 4) panelg_block<4, RP, INT4>(p, pb, sc, sb, B, per, ActView(a, t), Y + t * ldo, ldo, pf);
  if constexpr (TB > 2)
    for (; t + 2 <= a.T; t += 2) panelg_block<2, RP, INT4>(p, pb, sc, sb, B, per, ActView(a, t), Y + t * ldo, ldo, pf);
  if constexpr (TB > 1)
    if (t < a.T) panelg_block<1, RP, INT4>(p, pb, sc, sb, B, per, ActView(a, t), Y + t * ldo, ldo, pf);
}

// Groups of RP panels against every token: one token takes them side by side, 2-7 tokens two at a time,
// 8 or more one (registers: TB x RP int32 and float sums, RP or 2 RP weight vectors, RP scale vectors).
template <int RP, bool INT4>
inline void panelg_group(const uint8_t* p, int64_t pb, const uint16_t* sc, int64_t sb, int64_t B, int64_t per,
                         const QAct& a, float* Y, int64_t ldo, int64_t pf) {
  if (a.T == 1) return panelg_tokens<1, RP, INT4>(p, pb, sc, sb, B, per, a, Y, ldo, pf);
  constexpr int R2 = RP >= 2 ? 2 : 1;
  for (int r = 0; r < RP; r += R2) {
    if (a.T < 8) {
      panelg_tokens<4, R2, INT4>(p + r * pb, pb, sc + r * sb, sb, B, per, a, Y + 16 * r, ldo, pf);
      continue;
    }
    for (int q = r; q < r + R2; ++q)
      panelg_tokens<8, 1, INT4>(p + q * pb, pb, sc + q * sb, sb, B, per, a, Y + 16 * q, ldo, pf);
  }
}

// Y[t * ldo + r] += W[r] . token t for rows [r0, r1) (multiples of 16) of W in panels with group scales;
// groups of 4 panels, the next group's lines prefetched meanwhile (its scales at the start).
template <bool INT4>
inline void qgemv_panelsg(const QMat& W, int64_t r0, int64_t r1, const QAct& a, float* Y, int64_t ldo) {
  check(r0 % 16 == 0 && r1 % 16 == 0, "panels: a row range that does not start and end on a panel");
  constexpr int PG = 4;
  const int64_t pb = 16 * W.row_bytes(), sb = 16 * W.G(), B = W.K / 32, per = W.group / 32;
  for (int64_t r = r0; r < r1; r += PG * 16) {
    const int64_t n = std::min<int64_t>(PG, (r1 - r) / 16);
    const uint8_t* p = W.row(r);
    const uint16_t* sc = W.srow(r);
    const bool ahead = !W.stream_end || p + 2 * PG * pb <= W.stream_end;  // none past this thread's rows
    if (ahead && n == PG)
      for (int64_t o = 0; o < PG * sb * 2; o += 64) _mm_prefetch((const char*)(sc + PG * sb) + o, _MM_HINT_T1);
    const int64_t pf = ahead ? PG * pb : 0;
    if (n == PG) panelg_group<PG, INT4>(p, pb, sc, sb, B, per, a, Y + r, ldo, pf);
    else
      for (int64_t i = 0; i < n; ++i)
        panelg_group<1, INT4>(p + i * pb, pb, sc + i * sb, sb, B, per, a, Y + r + 16 * i, ldo, pf);
  }
}
#endif

}  // namespace moekit
