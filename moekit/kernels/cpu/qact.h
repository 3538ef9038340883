// Low-bit decode inputs: a quantised weight matrix (QMat) and activations quantised for it (QAct), shared by
// the int8 (qgemm.h) and int4 (qgemm4.h) decode kernels.
//
// Shape legend: T tokens, N weight rows, K input columns, G = K / group scale groups per row,
// C column chunks per token (64 columns for int8, 128 for int4).
#pragma once

#include "gemm.h"

namespace moekit {

inline float h2f(uint16_t h) { return _cvtsh_ss(h); }

// One quantised matrix [N, K] (a view into a QuantWeight's buffers).
struct QMat {
  const uint8_t* data = nullptr;    // int8 [N, K], or int4 [N, K / 2] in Q4_0's nibble layout (q + 8)
  const uint16_t* scale = nullptr;  // float16 [N, G]
  int64_t N = 0, K = 0, group = 0;
  bool int4 = false;
  const uint8_t* stream_end = nullptr;  // where this thread's rows end: prefetch no further (null: anywhere)
  int64_t groups = 0;                   // K / group, stored: the kernels read it per row block
  bool panels = false;  // 16-row panels (qpanel.h, qpanelg.h), not rows; with groups, scales [N / 16, G, 16]
  explicit operator bool() const { return data != nullptr; }
  int64_t G() const { return groups; }
  int64_t row_bytes() const { return int4 ? K / 2 : K; }
  const uint8_t* row(int64_t r) const { return data + r * row_bytes(); }
  const uint16_t* srow(int64_t r) const { return scale + r * G(); }  // in panels: the panel's scales, r % 16 == 0
  uint16_t scale_at(int64_t r, int64_t g) const {
    return panels ? scale[(r - r % 16) * G() + g * 16 + r % 16] : srow(r)[g];  // (one per row: the same)
  }
  QMat rows(int64_t r0, int64_t n) const {
    QMat m = *this;
    m.data = row(r0);
    m.scale = srow(r0);
    m.N = n;
    return m;
  }
  bool per_channel() const { return !int4 && group == K; }
};

// Activations quantised for one matrix: per token and block of columns, q = round(x * (127 / max|x|))
// (to nearest even) with scale d = max|x| / 127. Blocks of 32 columns (llama.cpp's Q8_0) against int4 and
// grouped int8 weights; of 256 (as llama.cpp's Q8_K) against per-channel int8 weights, whose rows have no
// scale inside them, so a block's four 64-column chunks sum in int32 and take one conversion and one fma
// (1.25 FMA-pipe operations a chunk and token instead of 2). Stored in the order of the weight bytes:
// - int8: 64-column chunks, columns in order;
// - int4: 128-column chunks (four Q4_0 blocks, 64 weight bytes): 64 bytes for the low nibbles (columns
//   0-15 of each block), then 64 for the high ones (16-31), so int32 lane 4j + m of both belongs to block j.
// `bias` starts the int32 sums of a 64-column chunk (a 256-column block) at -offset * sum(q) of its blocks,
// which takes the weights' unsigned offset (128 for int8, 8 for int4) out of the dot products; `dx` holds
// each int32 lane's block scale.
struct QAct {
  int64_t T = 0, K = 0, C = 0;  // C chunks per token (64 columns for int8, 128 for int4)
  int64_t U = 0;                // scale units per token: C, or 256-column blocks (per-channel int8)
  bool int4 = false;
  std::vector<int8_t> q;      // [T, C, 64] (int8) or [T, C, 2, 64] (int4), zero past K
  std::vector<float> dx;      // [T, U, 16]
  std::vector<int32_t> bias;  // [T, U, 16]
  std::vector<float> db;      // int4: [T, C, 4], each block's scale
  int64_t chunk_bytes() const { return int4 ? 128 : 64; }
};

// QAct's arrays from token t0 on, as plain pointers: the kernels copy it by value, so the pointers stay in
// registers (read through a QAct reference, the compiler reloads them after every accumulator store).
struct ActView {
  const int8_t* q;
  const int32_t* bias;
  const float* dx;
  const float* db;
  int64_t C, U;  // chunks and scale units per token
  ActView(const QAct& a, int64_t t0)
      : q(a.q.data() + t0 * a.C * a.chunk_bytes()), bias(a.bias.data() + t0 * a.U * 16),
        dx(a.dx.data() + t0 * a.U * 16), db(a.int4 ? a.db.data() + t0 * a.C * 4 : nullptr), C(a.C), U(a.U) {}
};

// Software prefetch distance (bytes ahead of each row pointer, into L2): 16 rows of the matrix, within
// [4, 32] KiB. This machine's hardware prefetcher hardly follows four interleaved row streams: on the
// 2-core EPYC, int4 decode read 7 GB/s without, 17-20 with, one thread; 16 rows ahead beat 4 and 8 rows
// (int8: 36-40 against 33-36 GB/s on two threads), into L1 (T0) halved it.
inline int64_t prefetch_distance(int64_t row_bytes) { return std::clamp<int64_t>(16 * row_bytes, 4096, 32768); }

// The prefetch distance for rows [r, r + rr) of W: none where it would reach past W.stream_end, into
// rows that another thread streams (bandwidth spent twice, and lines in the wrong core's L2).
inline int64_t prefetch_at(const QMat& W, int64_t r, int64_t rr) {
  const int64_t pf = prefetch_distance(W.row_bytes());
  return W.stream_end && W.row(r + rr) + pf > W.stream_end ? 0 : pf;
}

// W for a thread about to stream its rows [r0, r1): prefetches stop at r1, and the first prefetch distance
// of the rows, with their scales, goes into L2 now, so their first blocks do not wait on memory one line at
// a time. (A stand-alone int4 kernel over 1024 x 3584 matrices, two threads: each matrix in 16 parts
// 27 GB/s, 30 with this, in 2 contiguous halves 37-39; hence also moe.h's whole experts per thread.)
inline QMat stream(QMat W, int64_t r0, int64_t r1) {
  W.stream_end = W.row(r1);
  const int64_t rb = W.row_bytes(), pf = prefetch_distance(rb), n = std::min(pf, (r1 - r0) * rb);
  const char* p = (const char*)W.row(r0);
  for (int64_t o = 0; o < n; o += 64) _mm_prefetch(p + o, _MM_HINT_T1);
  const char* s = (const char*)W.srow(r0);
  const int64_t ns = std::min(r1 - r0, pf / rb + 4) * W.G() * 2;
  for (int64_t o = 0; o < ns; o += 64) _mm_prefetch(s + o, _MM_HINT_T1);
  return W;
}

// The few-token schedule of both decode kernels over rows [r0, r1): four regions of Q rows each (Q a
// multiple of 4, 4Q <= r1 - r0; the rows past them go on as before), read side by side, so a thread reads
// four streams far apart. The hardware prefetcher follows those; four adjacent rows read side by side it
// follows poorly (a stand-alone int4 kernel, 2 threads, cold 1024- and 3584-column rows: 27-30 GB/s, 33-36
// this way, against 35-40 for a plain 4-stream read; 8 or 16 regions were slower than 4). Returns Q, with
// the first rows of regions 1-3 prefetched (region 0's: stream()).
inline int64_t regions(const QMat& W, int64_t r0, int64_t r1) {
  const int64_t Q = (r1 - r0) / 16 * 4, rb = W.row_bytes(), n = std::min(prefetch_distance(rb), Q * rb);
  for (int s = 1; s < 4 && Q; ++s) {
    const char* p = (const char*)W.row(r0 + s * Q);
    for (int64_t o = 0; o < n; o += 64) _mm_prefetch(p + o, _MM_HINT_T1);
  }
  return Q;
}

// The prefetch distance for a block of region rows ending at row `end` of Q: none past the region's end.
inline int64_t region_pf(const QMat& W, int64_t end, int64_t Q) {
  const int64_t rb = W.row_bytes(), pf = prefetch_distance(rb);
  return end * rb + pf > Q * rb ? 0 : pf;
}

// Few tokens: quad(r, rs, pf) computes rows r + i * rs (i < 4) for every token, for each row r of region 0.
// Returns the first row not done.
template <typename Quad>
inline int64_t region_quads(const QMat& W, int64_t r0, int64_t r1, Quad&& quad) {
  const int64_t Q = regions(W, r0, r1);
  for (int64_t o = 0; o < Q; ++o) quad(r0 + o, Q, region_pf(W, o + 1, Q));
  return r0 + 4 * Q;
}

#if defined(__AVX512F__)
// One token: block(r, rs, pf, acc, mul) fills acc[i] with the lanes of row r + i * rs (i < 4) and mul[i]
// with the factor its sum takes (a per-channel scale, else 1); four blocks (rows o .. o + 3 of every
// region) share one horizontal reduction. Returns the first row not done.
template <typename Block>
__attribute__((flatten)) inline int64_t one_token_rows(const QMat& W, int64_t r0, int64_t r1, float* Y, Block&& block) {
  const int64_t Q = regions(W, r0, r1);
  for (int64_t o = 0; o < Q; o += 4) {
    const int64_t pf = region_pf(W, o + 4, Q);
    __m512 v[16];
    float mul[16];
    for (int g = 0; g < 4; ++g) {
      __m512 acc[4];
      float m[4];
      block(r0 + o + g, Q, pf, acc, m);
      for (int i = 0; i < 4; ++i) v[4 * i + g] = acc[i], mul[4 * i + g] = m[i];
    }
    alignas(64) float sums[16];
    _mm512_store_ps(sums, reduce16(v));
    for (int i = 0; i < 4; ++i)
      for (int g = 0; g < 4; ++g) Y[r0 + i * Q + o + g] += sums[4 * i + g] * mul[4 * i + g];
  }
  return r0 + 4 * Q;
}
#endif

#if defined(__AVX512VNNI__)
// v, held in a register from here: the compiler would otherwise fold its load into every instruction that
// reads it, and a row block's kernels then issue one 64-byte load per use (activations once per row, weight
// bytes twice): more loads than the core retires in a cycle, where one each suffices.
template <typename V>
__attribute__((always_inline)) inline V in_register(V v) {
  asm("" : "+v"(v));
  return v;
}

template <typename A>
inline __m512 load16_masked(const A* p, __mmask16 m) {
  if constexpr (std::is_same_v<A, float>) return _mm512_maskz_loadu_ps(m, p);
  else return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

// Rows of X [T, K] (row stride ldx) quantised as above for the weight W (int4, or int8 grouped or per channel).
template <typename A>
void quantize_act(const A* X, int64_t T, int64_t K, int64_t ldx, const QMat& W, QAct& a) {
  const bool int4 = W.int4;
  const int64_t span = int4 ? 128 : 64;
  a.T = T, a.K = K, a.C = (K + span - 1) / span, a.int4 = int4;
  const int64_t block = W.per_channel() ? 256 : 32;
  a.U = block == 256 ? (K + 255) / 256 : a.C;
  a.q.assign(T * a.C * 64 * (int4 ? 2 : 1), 0);
  a.dx.assign(T * a.U * 16, 0.f);
  a.bias.assign(T * a.U * 16, 0);
  a.db.assign(int4 ? T * a.C * 4 : 0, 0.f);
  const auto mask = [](int64_t n) { return (__mmask16)(n >= 16 ? 0xffff : n <= 0 ? 0 : (1u << n) - 1); };
  for (int64_t t = 0; t < T; ++t)
    for (int64_t k0 = 0; k0 < K; k0 += block) {
      const A* x = X + t * ldx + k0;
      const int64_t n = std::min<int64_t>(block, K - k0);
      __m512 m = _mm512_setzero_ps();
      for (int64_t j = 0; j < n; j += 16) m = _mm512_max_ps(m, _mm512_abs_ps(load16_masked(x + j, mask(n - j))));
      const float amax = _mm512_reduce_max_ps(m);
      const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
      __m512i sum = _mm512_setzero_si512();
      for (int64_t j = 0; j < n; j += 16) {  // 16 columns at a time: k0 + j lies in one 32-column block
        const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(load16_masked(x + j, mask(n - j)), inv));
        sum = _mm512_add_epi32(sum, q);
        const int64_t k = k0 + j, at = t * a.C + k / span, jb = k % span / 32, hi = k % 32 / 16;
        int8_t* dst = a.q.data() + at * a.chunk_bytes() + (int4 ? 64 * hi + 16 * jb : k % 64);
        _mm_storeu_si128((__m128i*)dst, _mm512_cvtsepi32_epi8(q));
      }
      const float d = amax / 127.f;
      const int32_t b = -(int4 ? 8 : 128) * _mm512_reduce_add_epi32(sum);
      if (block == 256) {
        const int64_t u = t * a.U + k0 / 256;
        std::fill_n(a.dx.data() + u * 16, 16, d);
        a.bias[u * 16] = b;
        continue;
      }
      const int64_t at = t * a.C + k0 / span, j = k0 % span / 32;
      const int64_t lane = at * 16 + (int4 ? 4 : 8) * j;  // int32 lanes of this block: 4 (int4) or 8 in a row
      std::fill_n(a.dx.data() + lane, int4 ? 4 : 8, d);
      a.bias[lane] = b;
      if (int4) a.db[t * a.C * 4 + k0 / 32] = d;
    }
}
#endif

}  // namespace moekit
