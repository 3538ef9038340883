// Blocked ("flash") attention with an online softmax, shared by attention.cpp (contiguous keys and
// values) and paged.cpp (keys and values read through a block table). A sequence's keys and values are
// packed once per kv head into blocks of KB keys (pack_block*); then each work item, one head's block
// of up to QB query rows, streams those blocks through register tiles (flash_block*): float32 FMAs, or
// vdpbf16ps for bf16 at head widths 64, 80 and 128. Softmax statistics stay in float32.
//
// Shape legend: T query tokens, S keys, A head width (Dh in code), KB keys per packed block, QB query
// rows per work item. A mask is one sequence's [T, S] bool (True = attend); without one, attention is
// causal: key j is visible to query t iff j <= t + S - T.
#pragma once

#include "common.h"

namespace moekit {

constexpr int64_t FLASH_QB = 32, FLASH_KB = 64;

// A work item's buffers (head width up to Dh), reused across the items one thread runs.
struct FlashScratch {
  std::vector<float> q, o, s, mx, nmax, den, corr;
  std::vector<uint32_t> qw, pp;  // bf16 pairs: scaled queries, probabilities
  explicit FlashScratch(int64_t Dh)
      : q((FLASH_QB + 4) * Dh, 0.f), o((FLASH_QB + 4) * Dh), s((FLASH_QB + 4) * FLASH_KB), mx(FLASH_QB + 16),
        nmax(FLASH_QB + 16), den(FLASH_QB + 16), corr(FLASH_QB + 16), qw((FLASH_QB + 4) * Dh / 2, 0u),
        pp((FLASH_QB + 4) * FLASH_KB / 2, 0u) {}
};

// Pack keys j0 .. j0 + nk - 1 (nk <= KB; the rest of the block zero) as float32: kd [A][KB] (keys
// transposed), vd [KB][A]. k_row(j), v_row(j): key/value row j. Rows past nk are never read.
template <typename A, typename KRow, typename VRow>
inline void pack_block(KRow k_row, VRow v_row, int64_t j0, int64_t nk, int64_t Dh, float* kd, float* vd) {
  constexpr int64_t KB = FLASH_KB;
  for (int64_t j = 0; j < KB; ++j) {
    const A* K = j < nk ? k_row(j0 + j) : nullptr;
    const A* V = j < nk ? v_row(j0 + j) : nullptr;
    for (int64_t d = 0; d < Dh; ++d) {
      kd[d * KB + j] = K ? to_f<A>(K[d]) : 0.f;
      vd[j * Dh + d] = V ? to_f<A>(V[d]) : 0.f;
    }
  }
}

// The same for the bf16 path: keys as pairs over the head width ([A/2][KB] words), values as pairs
// over keys ([KB/2][A] words).
template <typename KRow, typename VRow>
inline void pack_block_bf16(KRow k_row, VRow v_row, int64_t j0, int64_t nk, int64_t Dh, uint32_t* kd, uint32_t* vd) {
  constexpr int64_t KB = FLASH_KB;
  const int64_t D2 = Dh / 2;
  for (int64_t j = 0; j < KB; ++j) {
    const uint32_t* K = j < nk ? (const uint32_t*)k_row(j0 + j) : nullptr;
    for (int64_t kk = 0; kk < D2; ++kk) kd[kk * KB + j] = K ? K[kk] : 0u;
  }
  for (int64_t jj = 0; jj < KB / 2; ++jj) {
    const bf16* lo = 2 * jj < nk ? v_row(j0 + 2 * jj) : nullptr;
    const bf16* hi = 2 * jj + 1 < nk ? v_row(j0 + 2 * jj + 1) : nullptr;
    for (int64_t d = 0; d < Dh; ++d) vd[jj * Dh + d] = (lo ? lo[d] : 0u) | (uint32_t(hi ? hi[d] : 0u) << 16);
  }
}

#if defined(__AVX512F__)
// P.V for RB query rows: o[r][c*16..] = o[r][c*16..] * corr[r] + sum_j p[r][j] * v[j][c*16..], NV = A / 16.
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

// Mask query row t's KB scores of the key block starting at key j0 (nk keys real): keys the mask M
// ([T, S]) hides, or without a mask keys after the query (causal), become -inf. Returns the row's
// maximum over the block.
inline float mask_row(float* sr, const bool* M, int64_t t, int64_t T, int64_t S, int64_t j0, int64_t nk) {
  const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512 ninf = _mm512_set1_ps(-INFINITY);
  __m512 vmax = ninf;
  for (int64_t c = 0; c < FLASH_KB / 16; ++c) {
    const __m512i j = _mm512_add_epi32(iota, _mm512_set1_epi32((int)(c * 16)));
    __mmask16 ok = _mm512_cmplt_epi32_mask(j, _mm512_set1_epi32((int)nk));
    if (M) {
      const bool* mrow = M + t * S + j0 + c * 16;
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

// One head's query rows t0 .. t0 + nq - 1 (nq <= QB; row r at Q + r * ldq, written to O + r * ldo)
// against the S keys packed by pack_block (block i at kt + i * A * KB, vf + i * KB * A).
template <typename A>
void flash_block(const A* Q, int64_t ldq, A* O, int64_t ldo, const float* kt, const float* vf, const bool* M,
                 int64_t t0, int64_t nq, int64_t T, int64_t S, int64_t Dh, float scale, FlashScratch& w) {
  constexpr int64_t QB = FLASH_QB, KB = FLASH_KB, NC = KB / 16;
  float *q = w.q.data(), *o = w.o.data(), *s = w.s.data(), *mx = w.mx.data(), *den = w.den.data(),
        *corr = w.corr.data();
  std::fill(mx, mx + QB, -INFINITY);
  std::fill(den, den + QB, 0.f);
  std::fill(o, o + QB * Dh, 0.f);
  for (int64_t r = 0; r < QB; ++r)
    for (int64_t d = 0; d < Dh; ++d) q[r * Dh + d] = r < nq ? to_f<A>(Q[r * ldq + d]) * scale : 0.f;
  const int64_t last = M ? S : std::min(S, t0 + nq + S - T);  // causal: later keys are never visible
  for (int64_t j0 = 0; j0 < last; j0 += KB) {
    const int64_t nk = std::min(KB, last - j0);
    const float* ktb = kt + (j0 / KB) * Dh * KB;
    const float* vfb = vf + (j0 / KB) * KB * Dh;
    for (int64_t r0 = 0; r0 < nq; r0 += 4)  // scores, 4 query rows x KB keys in 16 registers
      qk_tile<NC>(&q[r0 * Dh], Dh, ktb, &s[r0 * KB]);
    for (int64_t r = 0; r < nq; ++r) {  // mask, online softmax
      float* sr = &s[r * KB];
      const float nmax = std::max(mx[r], mask_row(sr, M, t0 + r, T, S, j0, nk));
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
    switch (Dh / 16) {  // o = o * corr + P V
      case 2: pv_rows<2>(s, KB, vfb, Dh, nk, o, corr, nq); break;
      case 4: pv_rows<4>(s, KB, vfb, Dh, nk, o, corr, nq); break;
      case 5: pv_rows<5>(s, KB, vfb, Dh, nk, o, corr, nq); break;
      case 8: pv_rows<8>(s, KB, vfb, Dh, nk, o, corr, nq); break;
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
    for (int64_t d = 0; d < Dh; ++d) O[r * ldo + d] = from_f<A>(den[r] > 0 ? o[r * Dh + d] / den[r] : 0.f);
}
#endif

#if defined(__AVX512BF16__)
// P.V on bf16 pairs for RB <= 4 rows: probabilities pp [rows][KB/2] words, values vp [KB/2][A] words.
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

// flash_block on the bf16 path (keys and values packed by pack_block_bf16; A = 64, 80 or 128):
// scaled queries and softmax probabilities are rounded to bf16 pairs and broadcast.
inline void flash_block_bf16(const bf16* Q, int64_t ldq, bf16* O, int64_t ldo, const uint32_t* kt, const uint32_t* vt,
                             const bool* M, int64_t t0, int64_t nq, int64_t T, int64_t S, int64_t Dh, float scale,
                             FlashScratch& w) {
  constexpr int64_t QB = FLASH_QB, KB = FLASH_KB, NC = KB / 16, KP = KB / 2;
  const int64_t D2 = Dh / 2;
  uint32_t *q = w.qw.data(), *pp = w.pp.data();
  float *o = w.o.data(), *s = w.s.data(), *mx = w.mx.data(), *nmax = w.nmax.data(), *den = w.den.data(),
        *corr = w.corr.data();
  std::fill(mx, mx + QB + 16, -INFINITY);
  std::fill(den, den + QB + 16, 0.f);
  std::fill(o, o + (QB + 4) * Dh, 0.f);
  for (int64_t r = 0; r < QB; ++r) {  // scaled query rows as bf16 (consecutive pairs = 32-bit words)
    bf16* qd = (bf16*)&q[r * D2];
    if (r >= nq) {
      std::fill(qd, qd + Dh, (bf16)0);
      continue;
    }
    for (int64_t d = 0; d < Dh; d += 16) store16(qd + d, _mm512_mul_ps(load16(Q + r * ldq + d), _mm512_set1_ps(scale)));
  }
  const int64_t last = M ? S : std::min(S, t0 + nq + S - T);  // causal: later keys are never visible
  for (int64_t j0 = 0; j0 < last; j0 += KB) {
    const int64_t nk = std::min(KB, last - j0);
    const uint32_t* ktb = kt + (j0 / KB) * D2 * KB;
    const uint32_t* vtb = vt + (j0 / KB) * KP * Dh;
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
      nmax[r] = std::max(mx[r], mask_row(&s[r * KB], M, t0 + r, T, S, j0, nk));
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
      switch (Dh / 16) {
        case 4: pv_tile_bf16<4>(&pp[r0 * KP], KP, vtb, Dh, np, &o[r0 * Dh], &corr[r0], rb); break;
        case 5: pv_tile_bf16<5>(&pp[r0 * KP], KP, vtb, Dh, np, &o[r0 * Dh], &corr[r0], rb); break;
        case 8: pv_tile_bf16<8>(&pp[r0 * KP], KP, vtb, Dh, np, &o[r0 * Dh], &corr[r0], rb); break;
        default: TORCH_CHECK(false, "moekit cpu kernel: bf16 flash attention supports head widths 64, 80, 128");
      }
    }
  }
  for (int64_t r = 0; r < nq; ++r)
    for (int64_t d = 0; d < Dh; ++d) O[r * ldo + d] = f2bf(den[r] > 0 ? o[r * Dh + d] / den[r] : 0.f);
}
#endif

// Whether flash_block_bf16 takes this head width (and vdpbf16ps was compiled in).
inline bool bf16_flash_fits(int64_t Dh) {
#if defined(__AVX512BF16__)
  return Dh == 64 || Dh == 80 || Dh == 128;
#else
  return false;
#endif
}

}  // namespace moekit
