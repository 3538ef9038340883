// Per-channel int8 weights in panels (QuantWeight.to_panels, moekit/kernels/weights.py): the decode kernel.
// A panel is 16 rows stored as [K / 4, 16, 4] bytes (q + 128, unsigned), so one 64-byte load holds four
// columns of 16 rows, and vpdpbusd against a token's four activation bytes, broadcast, adds to those 16
// rows' sums at once. A row's sum never needs a horizontal reduction, and each 256-column activation block
// (qact.h) costs one int32 -> float conversion and one fma per 16 rows and token: per 64 weight bytes and
// token about one FMA-pipe operation, against 1.25 plus a reduction for rows (qgemm.h).
//
// Shape legend: T tokens, N rows (a multiple of 16), K columns (a multiple of 4), U = ceil(K / 256)
// activation blocks per token, RP panels side by side, TB tokens at a time.
#pragma once

#include "qact.h"

namespace moekit {

#if defined(__AVX512VNNI__)
// Token t's activation bytes of columns 4j .. 4j + 3, in every int32 lane.
__attribute__((always_inline)) inline __m512i act4(const ActView& a, int64_t t, int64_t j) {
  int32_t v;
  std::memcpy(&v, a.q + t * a.C * 64 + 4 * j, 4);
  return _mm512_set1_epi32(v);
}

// Y[t * ldo + 16 r + l] += panel r's row l . token t (scales ws [RP * 16]), for RP panels from p (each pb
// bytes) and TB tokens of a; each weight line is prefetched pf bytes ahead (pf 0: not at all).
template <int TB, int RP>
__attribute__((always_inline)) inline void panel_block(const uint8_t* p, int64_t pb, int64_t K, const ActView& a,
                                                       const float* ws, float* Y, int64_t ldo, int64_t pf) {
  __m512 f[TB][RP];
  for (int t = 0; t < TB; ++t)
    for (int r = 0; r < RP; ++r) f[t][r] = _mm512_setzero_ps();
  const int64_t steps = K / 4;
  for (int64_t u = 0; u < a.U; ++u) {
    __m512i s[TB][RP];  // exact int32 sums of the block, from its bias (|sum| < 2^23: 256 x 255 x 127)
    for (int t = 0; t < TB; ++t) {
      const __m512i b = _mm512_set1_epi32(a.bias[(t * a.U + u) * 16]);
      for (int r = 0; r < RP; ++r) s[t][r] = b;
    }
    const int64_t j1 = std::min(steps, 64 * u + 64);
    for (int64_t j = 64 * u; j < j1; ++j) {
      __m512i w[RP];
      for (int r = 0; r < RP; ++r) {
        if (pf) _mm_prefetch((const char*)(p + r * pb + 64 * j + pf), _MM_HINT_T1);
        w[r] = in_register(_mm512_loadu_si512(p + r * pb + 64 * j));
      }
      for (int t = 0; t < TB; ++t) {
        const __m512i x = act4(a, t, j);
        for (int r = 0; r < RP; ++r) s[t][r] = _mm512_dpbusd_epi32(s[t][r], w[r], x);
      }
    }
    for (int t = 0; t < TB; ++t) {
      const __m512 d = _mm512_set1_ps(a.dx[(t * a.U + u) * 16]);
      for (int r = 0; r < RP; ++r) f[t][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[t][r]), d, f[t][r]);
    }
  }
  for (int t = 0; t < TB; ++t)
    for (int r = 0; r < RP; ++r) {
      float* y = Y + t * ldo + 16 * r;
      _mm512_storeu_ps(y, _mm512_fmadd_ps(f[t][r], _mm512_loadu_ps(ws + 16 * r), _mm512_loadu_ps(y)));
    }
}

// RP panels from p against every token of a, TB tokens at a time, then blocks of 4, 2 and 1 for the rest; only
// the first block prefetches (as qpanelg.h's: 3-17% faster prefill than prefetching in every block).
template <int TB, int RP>
inline void panel_tokens(const uint8_t* p, int64_t pb, int64_t K, const QAct& a, const float* ws, float* Y,
                         int64_t ldo, int64_t pf) {
  int64_t t = 0;
  for (; t + TB <= a.T; t += TB, pf = 0) panel_block<TB, RP>(p, pb, K, ActView(a, t), ws, Y + t * ldo, ldo, pf);
  if constexpr (TB > 4)
    for (; t + 4 <= a.T; t += 4) panel_block<4, RP>(p, pb, K, ActView(a, t), ws, Y + t * ldo, ldo, pf);
  if constexpr (TB > 2)
    for (; t + 2 <= a.T; t += 2) panel_block<2, RP>(p, pb, K, ActView(a, t), ws, Y + t * ldo, ldo, pf);
  if constexpr (TB > 1)
    if (t < a.T) panel_block<1, RP>(p, pb, K, ActView(a, t), ws, Y + t * ldo, ldo, pf);
}

// Groups of PG panels: each group against every token, the next group's lines prefetched meanwhile (one
// group ahead: every panel of it warms at once). Token blocks of 1-2 take four panels side by side, of 4
// two, of 8 one (registers: TB x RP int32 and float sums, RP weight vectors).
template <int RP>
inline void panel_group(const uint8_t* p, int64_t pb, int64_t K, const QAct& a, const float* ws, float* Y,
                        int64_t ldo, int64_t pf) {
  if (a.T < 4) return panel_tokens<2, RP>(p, pb, K, a, ws, Y, ldo, pf);
  constexpr int R2 = RP >= 2 ? 2 : 1;
  for (int r = 0; r < RP; r += R2) {
    if (a.T < 8) {
      panel_tokens<4, R2>(p + r * pb, pb, K, a, ws + 16 * r, Y + 16 * r, ldo, pf);
      continue;
    }
    for (int q = r; q < r + R2; ++q) panel_tokens<8, 1>(p + q * pb, pb, K, a, ws + 16 * q, Y + 16 * q, ldo, pf);
  }
}

// Y[t * ldo + r] += W[r] . token t for rows [r0, r1) (multiples of 16) of panel-layout W.
inline void qgemv_panels(const QMat& W, int64_t r0, int64_t r1, const QAct& a, float* Y, int64_t ldo,
                         std::vector<float>& ws) {
  check(r0 % 16 == 0 && r1 % 16 == 0, "int8 panels: a row range that does not start and end on a panel");
  constexpr int PG = 4;
  const int64_t K = W.K, pb = 16 * K;
  ws.resize(PG * 16);
  for (int64_t r = r0; r < r1; r += PG * 16) {
    const int64_t n = std::min<int64_t>(PG, (r1 - r) / 16);
    for (int64_t i = 0; i < 16 * n; ++i) ws[i] = h2f(W.srow(r + i)[0]);
    const uint8_t* p = W.row(r);
    const int64_t pf = W.stream_end && p + 2 * PG * pb > W.stream_end ? 0 : PG * pb;  // none past this thread's rows
    if (n == PG) panel_group<PG>(p, pb, K, a, ws.data(), Y + r, ldo, pf);
    else
      for (int64_t i = 0; i < n; ++i) panel_group<1>(p + i * pb, pb, K, a, ws.data() + 16 * i, Y + r + 16 * i, ldo, pf);
  }
}
#endif

// Row r of panel-layout W in its row layout (64 bytes at a time: one gather of 16 four-byte pieces): int8
// values q, or int4 Q4_0 bytes.
inline void panel_row(const QMat& W, int64_t r, uint8_t* out) {
  const uint8_t* p = W.row(r - r % 16) + 4 * (r % 16);
  const uint8_t flip = W.int4 ? 0 : 0x80;  // int8 panels hold q + 128
  const int64_t words = W.row_bytes() / 4;
  int64_t j = 0;
#if defined(__AVX512F__)
  const __m512i idx = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                         _mm512_set1_epi32(64));
  for (; j + 16 <= words; j += 16) {
    const __m512i v = _mm512_i32gather_epi32(idx, (const void*)(p + 64 * j), 1);
    _mm512_storeu_si512(out + 4 * j, _mm512_xor_si512(v, _mm512_set1_epi8((char)flip)));
  }
#endif
  for (; j < words; ++j)
    for (int b = 0; b < 4; ++b) out[4 * j + b] = p[64 * j + b] ^ flip;
}

}  // namespace moekit
