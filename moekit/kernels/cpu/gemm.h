// Weight-rows x tokens products on the model's own row-major weights:
// - few tokens: streaming dot products (vdpbf16ps / FMA), prefetching the next row block, so decode
//   reads weights at memory speed;
// - many tokens (bf16): 32-row blocks repacked on the fly into "VNNI" pairs and a broadcast
//   microkernel with no horizontal reductions, the next block prefetched under the arithmetic.
#pragma once

#include "common.h"

namespace moekit {

// out[t * ldo + r] += sum_d W[r * ldw + d] * X[t * ldx + d] for RR weight rows and TB tokens.
// The next RR rows are prefetched while these are computed: with several tokens the core is busy
// long enough that the hardware prefetcher alone falls behind (2x at 8 tokens).
template <int TB, int RR>
inline void dot_block(const bf16* W, int64_t ldw, const bf16* X, int64_t ldx, int64_t D, float* out, int64_t ldo) {
#if defined(__AVX512BF16__)
  __m512 acc[TB][RR];
  for (int t = 0; t < TB; ++t)
    for (int r = 0; r < RR; ++r) acc[t][r] = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + 32 <= D; d += 32) {
    __m512bh w[RR];
    for (int r = 0; r < RR; ++r) _mm_prefetch((const char*)(W + (r + 2 * RR) * ldw + d), _MM_HINT_T1);
    for (int r = 0; r < RR; ++r) w[r] = (__m512bh)_mm512_loadu_si512(W + r * ldw + d);
    for (int t = 0; t < TB; ++t) {
      __m512bh x = (__m512bh)_mm512_loadu_si512(X + t * ldx + d);
      for (int r = 0; r < RR; ++r) acc[t][r] = _mm512_dpbf16_ps(acc[t][r], w[r], x);
    }
  }
  if (d < D) {
    __mmask32 m = (__mmask32)((1ull << (D - d)) - 1);
    __m512bh w[RR];
    for (int r = 0; r < RR; ++r) w[r] = (__m512bh)_mm512_maskz_loadu_epi16(m, W + r * ldw + d);
    for (int t = 0; t < TB; ++t) {
      __m512bh x = (__m512bh)_mm512_maskz_loadu_epi16(m, X + t * ldx + d);
      for (int r = 0; r < RR; ++r) acc[t][r] = _mm512_dpbf16_ps(acc[t][r], w[r], x);
    }
  }
  add_sums<TB, RR>(acc, out, ldo);
#else
  for (int t = 0; t < TB; ++t)
    for (int r = 0; r < RR; ++r) {
      float s = 0.f;
      for (int64_t d = 0; d < D; ++d) s += bf2f(W[r * ldw + d]) * bf2f(X[t * ldx + d]);
      out[t * ldo + r] += s;
    }
#endif
}

template <int TB, int RR>
inline void dot_block(const float* W, int64_t ldw, const float* X, int64_t ldx, int64_t D, float* out, int64_t ldo) {
#if defined(__AVX512F__)
  __m512 acc[TB][RR];
  for (int t = 0; t < TB; ++t)
    for (int r = 0; r < RR; ++r) acc[t][r] = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    __m512 w[RR];
    for (int r = 0; r < RR; ++r) _mm_prefetch((const char*)(W + (r + 2 * RR) * ldw + d), _MM_HINT_T1);
    for (int r = 0; r < RR; ++r) w[r] = _mm512_loadu_ps(W + r * ldw + d);
    for (int t = 0; t < TB; ++t) {
      __m512 x = _mm512_loadu_ps(X + t * ldx + d);
      for (int r = 0; r < RR; ++r) acc[t][r] = _mm512_fmadd_ps(w[r], x, acc[t][r]);
    }
  }
  if (d < D) {
    __mmask16 m = (__mmask16)((1u << (D - d)) - 1);
    __m512 w[RR];
    for (int r = 0; r < RR; ++r) w[r] = _mm512_maskz_loadu_ps(m, W + r * ldw + d);
    for (int t = 0; t < TB; ++t) {
      __m512 x = _mm512_maskz_loadu_ps(m, X + t * ldx + d);
      for (int r = 0; r < RR; ++r) acc[t][r] = _mm512_fmadd_ps(w[r], x, acc[t][r]);
    }
  }
  add_sums<TB, RR>(acc, out, ldo);
#else
  for (int t = 0; t < TB; ++t)
    for (int r = 0; r < RR; ++r) {
      float s = 0.f;
      for (int64_t d = 0; d < D; ++d) s += W[r * ldw + d] * X[t * ldx + d];
      out[t * ldo + r] += s;
    }
#endif
}

// Token blocks of up to 4; with 1-2 tokens, 8 weight rows per pass keep 8-16 accumulator chains
// in flight (vdpbf16ps is latency-bound with fewer), with 3-4 tokens 4 rows (12-16 chains).
template <int RR, typename A>
inline void rows_times_tokens(const A* W, int64_t ldw, const A* X, int64_t T, int64_t K, int64_t ldx, float* out,
                              int64_t ldo) {
  int64_t t = 0;
  if constexpr (RR <= 4) {
    for (; t + 4 <= T; t += 4) dot_block<4, RR>(W, ldw, X + t * ldx, ldx, K, out + t * ldo, ldo);
    if (T - t == 3) {
      dot_block<3, RR>(W, ldw, X + t * ldx, ldx, K, out + t * ldo, ldo);
      t += 3;
    }
  }
  for (; t + 2 <= T; t += 2) dot_block<2, RR>(W, ldw, X + t * ldx, ldx, K, out + t * ldo, ldo);
  if (T - t == 1) dot_block<1, RR>(W, ldw, X + t * ldx, ldx, K, out + t * ldo, ldo);
}

// Y[t, r] += ... (float, row stride ldo) for weight rows [r0, r1) of W [*, D] against X [T, D].
// With many tokens K is walked in chunks of KC so that the activation chunk stays in L2 while every
// weight row block reuses it; Y must be zeroed by the caller.
constexpr int64_t KC = 512;

template <typename A>
inline void gemv_rows(const A* W, int64_t r0, int64_t r1, const A* X, int64_t T, int64_t D, float* Y, int64_t ldo) {
  const int64_t step = T > 16 ? KC : D;  // few tokens: whole rows keep the weight streams sequential
  for (int64_t k0 = 0; k0 < D; k0 += step) {
    const int64_t kc = std::min(step, D - k0);
    int64_t r = r0;
    if (T <= 2) {
      for (; r + 8 <= r1; r += 8) rows_times_tokens<8>(W + r * D + k0, D, X + k0, T, kc, D, Y + r, ldo);
    } else {
      for (; r + 4 <= r1; r += 4) rows_times_tokens<4>(W + r * D + k0, D, X + k0, T, kc, D, Y + r, ldo);
    }
    for (; r < r1; ++r) rows_times_tokens<1>(W + r * D + k0, D, X + k0, T, kc, D, Y + r, ldo);
  }
}

#if defined(__AVX512BF16__)
// ---- many-token path: "VNNI" packing and a broadcast microkernel (no horizontal reductions) ----
// A block of 32 weight rows is repacked as P[kk][32] 32-bit words, each holding the bf16 pair
// (W[r][2kk], W[r][2kk+1]); one activation pair per token is broadcast and vdpbf16ps accumulates
// 32 output rows per token in two registers.

// 16 x 16 transpose of 32-bit words: rows in[i] (16 words each) -> out[j][i] = in[i][j].
inline void transpose16(const __m512i* in, __m512i* out) {
  __m512i a[16], b[16];
  for (int i = 0; i < 16; i += 2) {
    a[i] = _mm512_unpacklo_epi32(in[i], in[i + 1]);
    a[i + 1] = _mm512_unpackhi_epi32(in[i], in[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    b[i] = _mm512_unpacklo_epi64(a[i], a[i + 2]);
    b[i + 1] = _mm512_unpackhi_epi64(a[i], a[i + 2]);
    b[i + 2] = _mm512_unpacklo_epi64(a[i + 1], a[i + 3]);
    b[i + 3] = _mm512_unpackhi_epi64(a[i + 1], a[i + 3]);
  }
  for (int i = 0; i < 4; ++i) {  // 128-bit lanes: gather lane i of b[0..3], b[4..7], ... then interleave
    a[i] = _mm512_shuffle_i32x4(b[i], b[i + 4], 0x88);
    a[i + 4] = _mm512_shuffle_i32x4(b[i], b[i + 4], 0xdd);
    a[i + 8] = _mm512_shuffle_i32x4(b[i + 8], b[i + 12], 0x88);
    a[i + 12] = _mm512_shuffle_i32x4(b[i + 8], b[i + 12], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    out[i] = _mm512_shuffle_i32x4(a[i], a[i + 8], 0x88);
    out[i + 8] = _mm512_shuffle_i32x4(a[i], a[i + 8], 0xdd);
    out[i + 4] = _mm512_shuffle_i32x4(a[i + 4], a[i + 12], 0x88);
    out[i + 12] = _mm512_shuffle_i32x4(a[i + 4], a[i + 12], 0xdd);
  }
}

// Pack rows [0, rows) (rows <= 32, missing rows zero) of W [*, K] (K even) into P [K/2][S] words
// (columns 0-31 of each row of S; S = 32 for one block, 64 when two blocks share a pack).
inline void pack_vnni(const bf16* W, int64_t ldw, int64_t rows, int64_t K, uint32_t* P, int64_t S = 32) {
  const int64_t K2 = K / 2;
  for (int half = 0; half < 2; ++half) {
    int64_t kk = 0;
    for (; kk + 16 <= K2; kk += 16) {
      __m512i in[16], out[16];
      for (int i = 0; i < 16; ++i) {
        const int64_t r = half * 16 + i;
        in[i] = r < rows ? _mm512_loadu_si512((const uint32_t*)(W + r * ldw) + kk) : _mm512_setzero_si512();
      }
      transpose16(in, out);
      for (int j = 0; j < 16; ++j) _mm512_storeu_si512(P + (kk + j) * S + half * 16, out[j]);
    }
    for (; kk < K2; ++kk)
      for (int i = 0; i < 16; ++i) {
        const int64_t r = half * 16 + i;
        P[kk * S + half * 16 + i] = r < rows ? ((const uint32_t*)(W + r * ldw))[kk] : 0u;
      }
  }
}

// out[t * ldo + r] += sum_k W[r, k] X[t, k] for 32 packed rows (first `rows` stored) and TB tokens.
// `next` (optional): the following 32-row block of W, prefetched two cache lines per k-pair so that
// its DRAM traffic overlaps this block's arithmetic (32 rows x 2 bytes = 64 bytes per k).
template <int TB>
inline void vnni_block(const uint32_t* P, int64_t K2, const bf16* X, int64_t ldx, float* out, int64_t ldo,
                       int64_t rows, const char* next) {
  __m512 acc[TB][2];
  for (int t = 0; t < TB; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < K2; ++kk) {
    if (next) {
      _mm_prefetch(next + kk * 128, _MM_HINT_T1);
      _mm_prefetch(next + kk * 128 + 64, _MM_HINT_T1);
    }
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(P + kk * 32), w1 = (__m512bh)_mm512_loadu_si512(P + kk * 32 + 16);
    for (int t = 0; t < TB; ++t) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32((int)((const uint32_t*)(X + t * ldx))[kk]);
      acc[t][0] = _mm512_dpbf16_ps(acc[t][0], w0, xb);
      acc[t][1] = _mm512_dpbf16_ps(acc[t][1], w1, xb);
    }
  }
  const __mmask16 m0 = (__mmask16)(rows >= 16 ? 0xffff : (1u << rows) - 1);
  const __mmask16 m1 = (__mmask16)(rows >= 32 ? 0xffff : rows <= 16 ? 0 : (1u << (rows - 16)) - 1);
  for (int t = 0; t < TB; ++t) {
    float* o = out + t * ldo;
    _mm512_mask_storeu_ps(o, m0, _mm512_add_ps(_mm512_maskz_loadu_ps(m0, o), acc[t][0]));
    _mm512_mask_storeu_ps(o + 16, m1, _mm512_add_ps(_mm512_maskz_loadu_ps(m1, o + 16), acc[t][1]));
  }
}

// Two 32-row blocks packed side by side (P [K/2][64]) against TB tokens: ya[t * ldo + r] += block a,
// yb[t * ldo + r] += block b. Each broadcast activation pair feeds four vectors (gate and up rows of
// an expert at once), so a 6-token tile keeps 24 accumulators with 10 loads per 24 dot products.
// `next_a`, `next_b` (optional): the following blocks, prefetched under the arithmetic as in vnni_block.
template <int TB>
inline void vnni_pair(const uint32_t* P, int64_t K2, const bf16* X, int64_t ldx, float* ya, float* yb, int64_t ldo,
                      int64_t rows, const char* next_a, const char* next_b) {
  __m512 acc[TB][4];
  for (int t = 0; t < TB; ++t)
    for (int v = 0; v < 4; ++v) acc[t][v] = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < K2; ++kk) {
    if (next_a) {
      _mm_prefetch(next_a + kk * 128, _MM_HINT_T1);
      _mm_prefetch(next_a + kk * 128 + 64, _MM_HINT_T1);
      _mm_prefetch(next_b + kk * 128, _MM_HINT_T1);
      _mm_prefetch(next_b + kk * 128 + 64, _MM_HINT_T1);
    }
    __m512bh w[4];
    for (int v = 0; v < 4; ++v) w[v] = (__m512bh)_mm512_loadu_si512(P + kk * 64 + v * 16);
    for (int t = 0; t < TB; ++t) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32((int)((const uint32_t*)(X + t * ldx))[kk]);
      for (int v = 0; v < 4; ++v) acc[t][v] = _mm512_dpbf16_ps(acc[t][v], w[v], xb);
    }
  }
  const __mmask16 m0 = (__mmask16)(rows >= 16 ? 0xffff : (1u << rows) - 1);
  const __mmask16 m1 = (__mmask16)(rows >= 32 ? 0xffff : rows <= 16 ? 0 : (1u << (rows - 16)) - 1);
  for (int t = 0; t < TB; ++t) {
    float* dst[4] = {ya + t * ldo, ya + t * ldo + 16, yb + t * ldo, yb + t * ldo + 16};
    for (int v = 0; v < 4; ++v) {
      const __mmask16 m = v % 2 ? m1 : m0;
      _mm512_mask_storeu_ps(dst[v], m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, dst[v]), acc[t][v]));
    }
  }
}

// Ya[t, r] += rows [0, rows) of Wa, Yb[t, r] += the same rows of Wb (rows <= 32), against X [T, K].
inline void gemm_pair_vnni(const bf16* Wa, const bf16* Wb, int64_t rows, const bf16* X, int64_t T, int64_t K,
                           float* Ya, float* Yb, int64_t ldo, std::vector<uint32_t>& pack) {
  const int64_t K2 = K / 2;
  pack.resize(K2 * 64);
  pack_vnni(Wa, K, rows, K, pack.data(), 64);
  pack_vnni(Wb, K, rows, K, pack.data() + 32, 64);
  const char *na = (const char*)(Wa + 32 * K), *nb = (const char*)(Wb + 32 * K);  // may lie past W: never fault
  int64_t t = 0;
  for (; t + 6 <= T; t += 6, na = nb = nullptr)
    vnni_pair<6>(pack.data(), K2, X + t * K, K, Ya + t * ldo, Yb + t * ldo, ldo, rows, na, nb);
  for (; t + 2 <= T; t += 2, na = nb = nullptr)
    vnni_pair<2>(pack.data(), K2, X + t * K, K, Ya + t * ldo, Yb + t * ldo, ldo, rows, na, nb);
  for (; t < T; ++t, na = nb = nullptr)
    vnni_pair<1>(pack.data(), K2, X + t * K, K, Ya + t * ldo, Yb + t * ldo, ldo, rows, na, nb);
}

// Y[t, r] += for weight rows [r0, r1) of W [*, K] against X [T, K], through packed 32-row blocks.
inline void gemm_rows_vnni(const bf16* W, int64_t r0, int64_t r1, const bf16* X, int64_t T, int64_t K, float* Y,
                           int64_t ldo, std::vector<uint32_t>& pack) {
  const int64_t K2 = K / 2;
  pack.resize(K2 * 32);
  for (int64_t r = r0; r < r1; r += 32) {
    const int64_t rows = std::min<int64_t>(32, r1 - r);
    pack_vnni(W + r * K, K, rows, K, pack.data());
    const char* next = (const char*)(W + (r + 32) * K);  // may lie past W: prefetches never fault
    int64_t t = 0;
    for (; t + 12 <= T; t += 12, next = nullptr)
      vnni_block<12>(pack.data(), K2, X + t * K, K, Y + t * ldo + r, ldo, rows, next);
    for (; t + 4 <= T; t += 4, next = nullptr)
      vnni_block<4>(pack.data(), K2, X + t * K, K, Y + t * ldo + r, ldo, rows, next);
    for (; t < T; ++t, next = nullptr) vnni_block<1>(pack.data(), K2, X + t * K, K, Y + t * ldo + r, ldo, rows, next);
  }
}
#endif

// Rows [r0, r1) of W against X for any number of tokens: the packed microkernel when there are
// enough tokens to amortise packing (bf16, even K), the streaming dot-product kernel otherwise.
// Measured here: at 8 tokens packing halves the weight-streaming speed; the two meet near 16.
constexpr int64_t VNNI_MIN_TOKENS = 16;

template <typename A>
inline void matmul_rows(const A* W, int64_t r0, int64_t r1, const A* X, int64_t T, int64_t K, float* Y, int64_t ldo,
                        std::vector<uint32_t>& pack) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<A, bf16>) {
    if (T >= VNNI_MIN_TOKENS && K % 2 == 0) {
      gemm_rows_vnni(W, r0, r1, X, T, K, Y, ldo, pack);
      return;
    }
  }
#endif
  gemv_rows<A>(W, r0, r1, X, T, K, Y, ldo);
}

constexpr int64_t BLOCK = 32;  // weight rows per parallel work item (one packed block)

}  // namespace moekit
