// int4 (GGUF Q4_0 layout) and grouped int8 weights in rows x many tokens (prefill; with rows a multiple of 32
// they are in panels once loaded, qpanelg.h, but offloaded experts stay in rows): 16 rows at a time are unpacked
// once into a panel tile, as per-channel int8 panels are stored (qpanel.h), so that each 64-byte tile load
// meets 8 tokens' activations. Each 32-column block of a row becomes 8 tile quads of 16 rows x 4 bytes, in
// the order of its activation bytes (qact.h), stored side by side, so one int32 sum per row and token covers
// the block, from the bias that takes the weights' offset out; a conversion and an fma with the weight
// scale times the activation block's scale finish it.
// - int4: quad q = 4 h + m holds nibble h (low: block columns 0-15, high: 16-31) of row bytes 16 j + 4 m ..
//   + 3 of the block's 64-byte chunk c (block b = 4 c + j), values q + 8; they meet the activation bytes
//   c * 128 + 64 h + 16 j + 4 m .. + 3 (QAct's int4 order).
// - grouped int8: quad q holds row bytes 32 b + 4 q .. + 3 as q + 128 (the xor of the sign bit); they meet
//   the activation bytes 32 b + 4 q .. + 3.
//
// Shape legend: T tokens, K columns (a multiple of 32), B = K / 32 blocks per row, G = K / group scale
// groups, TB tokens at a time.
#pragma once

#include "qpanel.h"

namespace moekit {

#if defined(__AVX512VNNI__)
// Rows r0 .. r0 + 15 of W (int4 or grouped int8) unpacked into tile [B, 8 quads, 16 rows, 4] and their float
// scales into ws [G, 16].
inline void unpack_tile(const QMat& W, int64_t r0, std::vector<uint8_t>& tile, std::vector<float>& ws) {
  const int64_t B = W.K / 32, rb = W.row_bytes(), G = W.G();
  tile.resize(B * 8 * 64);
  ws.resize(G * 16);
  const __m512i idx = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                         _mm512_set1_epi32((int)rb));
  const __m512i low = _mm512_set1_epi8(0x0f), sign = _mm512_set1_epi8((char)0x80);
  const uint8_t* base = W.row(r0);
  uint8_t* out = tile.data();
  for (int64_t b = 0; b < B; ++b, out += 8 * 64) {
    if (W.int4) {
      const uint8_t* blk = base + (b / 4) * 64 + (b % 4) * 16;  // block b's 16 bytes in its chunk of each row
      for (int m = 0; m < 4; ++m) {
        const __m512i v = _mm512_i32gather_epi32(idx, (const void*)(blk + 4 * m), 1);  // 4 bytes of 16 rows
        _mm512_storeu_si512(out + m * 64, _mm512_and_si512(v, low));
        _mm512_storeu_si512(out + (4 + m) * 64, _mm512_and_si512(_mm512_srli_epi16(v, 4), low));
      }
    } else {
      for (int q = 0; q < 8; ++q)
        _mm512_storeu_si512(out + q * 64,
                            _mm512_xor_si512(_mm512_i32gather_epi32(idx, (const void*)(base + 32 * b + 4 * q), 1), sign));
    }
  }
  for (int64_t i = 0; i < 16; ++i)
    for (int64_t g = 0; g < G; ++g) ws[g * 16 + i] = h2f(W.srow(r0 + i)[g]);
}

// Y[t * ldo + l] += tile row l . token t, for TB tokens of a (from its token 0); per: blocks per scale group.
template <int TB, bool INT4>
__attribute__((always_inline)) inline void tile_block(const uint8_t* tile, const float* ws, int64_t B, int64_t per,
                                                      const ActView& a, float* Y, int64_t ldo) {
  __m512 f[TB];
  for (int t = 0; t < TB; ++t) f[t] = _mm512_setzero_ps();
  const int64_t tb = a.C * (INT4 ? 128 : 64);  // activation bytes per token
  for (int64_t b = 0; b < B; ++b) {
    // the block's int32 lane in QAct's bias / dx arrays (token 0), and its first activation byte
    const int64_t lane = INT4 ? (b / 4) * 16 + 4 * (b % 4) : (b / 2) * 16 + 8 * (b % 2);
    const int8_t* x = a.q + (INT4 ? (b / 4) * 128 + 16 * (b % 4) : 32 * b);
    __m512i s[TB];
    for (int t = 0; t < TB; ++t) s[t] = _mm512_set1_epi32(a.bias[t * a.C * 16 + lane]);
    const uint8_t* w = tile + b * 8 * 64;
    for (int q = 0; q < 8; ++q) {
      const __m512i wv = in_register(_mm512_loadu_si512(w + q * 64));
      const int64_t xo = INT4 ? 64 * (q / 4) + 4 * (q % 4) : 4 * q;
      for (int t = 0; t < TB; ++t) {
        int32_t v;
        std::memcpy(&v, x + t * tb + xo, 4);
        s[t] = _mm512_dpbusd_epi32(s[t], wv, _mm512_set1_epi32(v));
      }
    }
    const __m512 sc = _mm512_loadu_ps(ws + (b / per) * 16);
    for (int t = 0; t < TB; ++t) {
      const float d = INT4 ? a.db[t * a.C * 4 + b] : a.dx[t * a.C * 16 + lane];
      f[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[t]), _mm512_mul_ps(sc, _mm512_set1_ps(d)), f[t]);
    }
  }
  for (int t = 0; t < TB; ++t) {
    float* y = Y + t * ldo;
    _mm512_storeu_ps(y, _mm512_add_ps(f[t], _mm512_loadu_ps(y)));
  }
}

template <bool INT4>
inline void tile_tokens(const uint8_t* tile, const float* ws, int64_t B, int64_t per, const QAct& a, float* Y,
                        int64_t ldo) {
  int64_t t = 0;
  for (; t + 8 <= a.T; t += 8) tile_block<8, INT4>(tile, ws, B, per, ActView(a, t), Y + t * ldo, ldo);
  for (; t + 4 <= a.T; t += 4) tile_block<4, INT4>(tile, ws, B, per, ActView(a, t), Y + t * ldo, ldo);
  for (; t + 2 <= a.T; t += 2) tile_block<2, INT4>(tile, ws, B, per, ActView(a, t), Y + t * ldo, ldo);
  if (t < a.T) tile_block<1, INT4>(tile, ws, B, per, ActView(a, t), Y + t * ldo, ldo);
}

// Y[t * ldo + r] += W[r] . token t for rows [r0, r1) of W (int4 or grouped int8), every token of a: whole
// 16-row tiles here (returns the first row not done; the rest go to the row kernels).
inline int64_t qgemm_tiles(const QMat& W, int64_t r0, int64_t r1, const QAct& a, float* Y, int64_t ldo,
                           std::vector<uint8_t>& tile, std::vector<float>& ws) {
  const int64_t B = W.K / 32, per = W.group / 32;
  int64_t r = r0;
  for (; r + 16 <= r1; r += 16) {
    unpack_tile(W, r, tile, ws);
    if (W.int4) tile_tokens<true>(tile.data(), ws.data(), B, per, a, Y + r, ldo);
    else tile_tokens<false>(tile.data(), ws.data(), B, per, a, Y + r, ldo);
  }
  return r;
}
#endif

}  // namespace moekit
