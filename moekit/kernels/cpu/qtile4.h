// int4 (GGUF Q4_0 layout) weights x many tokens (prefill): 16 rows at a time are unpacked once into a
// panel tile, as per-channel int8 panels are stored (qpanel.h), so that each 64-byte tile load meets 8
// tokens' activations. A tile quad holds four nibbles (values q + 8) of 16 rows, in QAct's int4 column
// order: for chunk c, block j, half h (low nibbles: block columns 0-15, high: 16-31) and quad m, the
// nibble h of row bytes c * 64 + 16 j + 4 m .. + 3, which meet the activation bytes c * 128 + 64 h +
// 16 j + 4 m .. + 3. A block's 8 quads are stored side by side, so one int32 sum per row and token covers
// the block, from the bias that takes the offset 8 out (qact.h); a conversion and an fma with the weight
// scale times the activation block's scale finish it.
//
// Shape legend: T tokens, K columns (a multiple of 32), B = K / 32 blocks per row, G = K / group scale
// groups, TB tokens at a time.
#pragma once

#include "qpanel.h"

namespace moekit {

#if defined(__AVX512VNNI__)
// Rows r0 .. r0 + 15 of int4 W unpacked into tile [B, 8 quads, 16 rows, 4] (q + 8) and their float scales
// into ws [G, 16].
inline void unpack_tile4(const QMat& W, int64_t r0, std::vector<uint8_t>& tile, std::vector<float>& ws) {
  const int64_t B = W.K / 32, rb = W.row_bytes(), G = W.G();
  tile.resize(B * 8 * 64);
  ws.resize(G * 16);
  const __m512i idx = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                         _mm512_set1_epi32((int)rb));
  const __m512i low = _mm512_set1_epi8(0x0f);
  const uint8_t* base = W.row(r0);
  for (int64_t b = 0; b < B; ++b) {
    const uint8_t* blk = base + (b / 4) * 64 + (b % 4) * 16;  // block b's 16 bytes in its chunk of each row
    for (int m = 0; m < 4; ++m) {
      const __m512i v = _mm512_i32gather_epi32(idx, (const void*)(blk + 4 * m), 1);  // 4 bytes of 16 rows
      _mm512_storeu_si512(tile.data() + (b * 8 + m) * 64, _mm512_and_si512(v, low));
      _mm512_storeu_si512(tile.data() + (b * 8 + 4 + m) * 64, _mm512_and_si512(_mm512_srli_epi16(v, 4), low));
    }
  }
  for (int64_t i = 0; i < 16; ++i)
    for (int64_t g = 0; g < G; ++g) ws[g * 16 + i] = h2f(W.srow(r0 + i)[g]);
}

// Y[t * ldo + l] += tile row l . token t, for TB tokens of a (from its token 0); per: blocks per scale group.
template <int TB>
__attribute__((always_inline)) inline void tile4_block(const uint8_t* tile, const float* ws, int64_t B, int64_t per,
                                                       const ActView& a, float* Y, int64_t ldo) {
  __m512 f[TB];
  for (int t = 0; t < TB; ++t) f[t] = _mm512_setzero_ps();
  const int64_t tb = a.C * 128;  // activation bytes per token
  for (int64_t b = 0; b < B; ++b) {
    const int64_t c = b / 4, j = b % 4;
    __m512i s[TB];
    for (int t = 0; t < TB; ++t) s[t] = _mm512_set1_epi32(a.bias[(t * a.C + c) * 16 + 4 * j]);
    const uint8_t* w = tile + b * 8 * 64;
    const int8_t* x = a.q + c * 128 + 16 * j;
    for (int h = 0; h < 2; ++h)
      for (int m = 0; m < 4; ++m) {
        const __m512i wv = in_register(_mm512_loadu_si512(w + (4 * h + m) * 64));
        for (int t = 0; t < TB; ++t) {
          int32_t v;
          std::memcpy(&v, x + t * tb + 64 * h + 4 * m, 4);
          s[t] = _mm512_dpbusd_epi32(s[t], wv, _mm512_set1_epi32(v));
        }
      }
    const __m512 sc = _mm512_loadu_ps(ws + (b / per) * 16);
    for (int t = 0; t < TB; ++t)
      f[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[t]), _mm512_mul_ps(sc, _mm512_set1_ps(a.db[t * a.C * 4 + b])), f[t]);
  }
  for (int t = 0; t < TB; ++t) {
    float* y = Y + t * ldo;
    _mm512_storeu_ps(y, _mm512_add_ps(f[t], _mm512_loadu_ps(y)));
  }
}

// Y[t * ldo + r] += W[r] . token t for rows [r0, r1) of int4 W, every token of a: whole 16-row tiles here
// (returns the first row not done; the rest go to the row kernel).
inline int64_t qgemm4_tiles(const QMat& W, int64_t r0, int64_t r1, const QAct& a, float* Y, int64_t ldo,
                            std::vector<uint8_t>& tile, std::vector<float>& ws) {
  const int64_t B = W.K / 32, per = W.group / 32;
  int64_t r = r0;
  for (; r + 16 <= r1; r += 16) {
    unpack_tile4(W, r, tile, ws);
    int64_t t = 0;
    for (; t + 8 <= a.T; t += 8) tile4_block<8>(tile.data(), ws.data(), B, per, ActView(a, t), Y + t * ldo + r, ldo);
    for (; t + 4 <= a.T; t += 4) tile4_block<4>(tile.data(), ws.data(), B, per, ActView(a, t), Y + t * ldo + r, ldo);
    for (; t + 2 <= a.T; t += 2) tile4_block<2>(tile.data(), ws.data(), B, per, ActView(a, t), Y + t * ldo + r, ldo);
    if (t < a.T) tile4_block<1>(tile.data(), ws.data(), B, per, ActView(a, t), Y + t * ldo + r, ldo);
  }
  return r;
}
#endif

}  // namespace moekit
