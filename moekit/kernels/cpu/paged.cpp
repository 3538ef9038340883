// Attention of many requests' new tokens over a paged KV cache, the twin of reference.paged_attention.
// Key/value row j of request r and kv head g is k[table[r, j / C], g, j % C, :]. A request with a few
// new tokens (decode) reads the cache in place with a row kernel; a longer chunk packs its keys and
// values once per kv head into flash blocks (flash.h), gathering through the table. Every
// (request, head, query block) item then shares one cost-balanced loop, so a long prefill chunk and
// many decodes split evenly over the threads. Only the first lens[r] rows of a request are read:
// slots past them and blocks outside the table may hold anything (NaN from torch.empty).
//
// Shape legend: N new query tokens (all requests back to back), H query heads, A head width (Dh in
// code), P blocks in the pool, G kv heads, C tokens per block, R requests, M block-table width.

#include <optional>

#include "flash.h"

namespace moekit {

constexpr int64_t ROW_MAX = 4;    // a request with more new tokens takes the flash path
constexpr double ROW_COST = 4.0;  // cost of a row-kernel (query, key) pair in flash pairs (memory-bound)
constexpr double ITEM_KEYS = 64;  // fixed cost of a work item, in (query, key) pairs

// Where request r's cache rows live: pool strides of a block (p), a kv head (g) and a slot (c).
template <typename A>
struct Paged {
  const A *k, *v;
  const int32_t* table;
  int64_t M, C, kp, kg, kc, vp, vg, vc;
  const A* k_block(int64_t r, int64_t g, int64_t b) const { return k + table[r * M + b] * kp + g * kg; }
  const A* v_block(int64_t r, int64_t g, int64_t b) const { return v + table[r * M + b] * vp + g * vg; }
  const A* k_row(int64_t r, int64_t g, int64_t j) const { return k_block(r, g, j / C) + (j % C) * kc; }
  const A* v_row(int64_t r, int64_t g, int64_t j) const { return v_block(r, g, j / C) + (j % C) * vc; }
};

#if defined(__AVX512F__)
// out[c0 * 16 ..] = sum_j p[j] v[j] / sum over keys 0 .. len - 1, NV 16-wide slices of the row in registers.
template <int NV, typename A>
inline void pv_paged(const float* p, const Paged<A>& kv, int64_t r, int64_t g, int64_t len, int64_t c0, float sum,
                     A* out) {
  __m512 acc[NV];
  for (int c = 0; c < NV; ++c) acc[c] = _mm512_setzero_ps();
  for (int64_t j0 = 0, b = 0; j0 < len; j0 += kv.C, ++b) {
    const A* V = kv.v_block(r, g, b) + c0 * 16;
    const int64_t nk = std::min(kv.C, len - j0);
    for (int64_t j = 0; j < nk; ++j) {
      const __m512 pj = _mm512_set1_ps(p[j0 + j]);
      for (int c = 0; c < NV; ++c) acc[c] = _mm512_fmadd_ps(pj, load16(V + j * kv.vc + c * 16), acc[c]);
    }
  }
  for (int c = 0; c < NV; ++c) store16(out + (c0 + c) * 16, _mm512_div_ps(acc[c], _mm512_set1_ps(sum)));
}

// One query row q (unscaled) against keys 0 .. len - 1 of kv head g: out = softmax(scale q K^T) V.
// qf: Dh floats, s: len + 16 floats of scratch.
template <typename A>
void paged_row(const A* q, A* out, const Paged<A>& kv, int64_t r, int64_t g, int64_t len, int64_t Dh, float scale,
               float* qf, float* s) {
  const int64_t nv = Dh / 16;
  for (int64_t d = 0; d < Dh; d += 16) _mm512_storeu_ps(qf + d, _mm512_mul_ps(load16(q + d), _mm512_set1_ps(scale)));
  __m512 vmax = _mm512_set1_ps(-INFINITY);
  for (int64_t j0 = 0, b = 0; j0 < len; j0 += kv.C, ++b) {  // scores, block by block
    const A* K = kv.k_block(r, g, b);
    const int64_t nk = std::min(kv.C, len - j0);
    for (int64_t j = 0; j < nk; j += 16) {  // up to 16 keys at a time, summed with one reduce16
      const int64_t m = std::min<int64_t>(16, nk - j);
      __m512 acc[16];
      for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
      for (int64_t c = 0; c < nv; ++c) {  // slice by slice: 16 independent sums in flight, not one
        const __m512 qc = _mm512_loadu_ps(qf + c * 16);
        const A* kc = K + j * kv.kc + c * 16;
        if (m == 16)
          for (int i = 0; i < 16; ++i) acc[i] = _mm512_fmadd_ps(qc, load16(kc + i * kv.kc), acc[i]);
        else
          for (int i = 0; i < m; ++i) acc[i] = _mm512_fmadd_ps(qc, load16(kc + i * kv.kc), acc[i]);
      }
      const __mmask16 ok = (__mmask16)((1u << m) - 1);
      const __m512 sv = reduce16(acc);
      _mm512_mask_storeu_ps(s + j0 + j, ok, sv);
      vmax = _mm512_mask_max_ps(vmax, ok, vmax, sv);
    }
  }
  const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
  __m512 vsum = _mm512_setzero_ps();
  for (int64_t j = 0; j < len; j += 16) {  // probabilities in place
    const __mmask16 ok = (__mmask16)(len - j >= 16 ? 0xffffu : (1u << (len - j)) - 1);
    const __m512 p = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(ok, s + j), mx));
    _mm512_mask_storeu_ps(s + j, ok, p);
    vsum = _mm512_mask_add_ps(vsum, ok, vsum, p);
  }
  const float sum = _mm512_reduce_add_ps(vsum);
  for (int64_t c0 = 0; c0 < nv; c0 += 8) {  // P V, up to 8 slices of the head width per pass over V
    switch (std::min<int64_t>(8, nv - c0)) {
      case 1: pv_paged<1>(s, kv, r, g, len, c0, sum, out); break;
      case 2: pv_paged<2>(s, kv, r, g, len, c0, sum, out); break;
      case 3: pv_paged<3>(s, kv, r, g, len, c0, sum, out); break;
      case 4: pv_paged<4>(s, kv, r, g, len, c0, sum, out); break;
      case 5: pv_paged<5>(s, kv, r, g, len, c0, sum, out); break;
      case 6: pv_paged<6>(s, kv, r, g, len, c0, sum, out); break;
      case 7: pv_paged<7>(s, kv, r, g, len, c0, sum, out); break;
      default: pv_paged<8>(s, kv, r, g, len, c0, sum, out);
    }
  }
}
#endif

template <typename A>
torch::Tensor paged_impl(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                         const torch::Tensor& table, const torch::Tensor& starts, const torch::Tensor& lens,
                         float scale) {
#if defined(__AVX512F__)
  constexpr int64_t QB = FLASH_QB, KB = FLASH_KB;
  const int64_t N = q.size(0), H = q.size(1), Dh = q.size(2), G = k.size(1), R = lens.size(0);
  const int64_t group = H / G, qn = q.stride(0), qh = q.stride(1), block = Dh * KB;
  auto out = torch::empty({N, H, Dh}, q.options());
  const A* Q = (const A*)q.data_ptr();
  A* O = (A*)out.data_ptr();
  const int32_t *st = starts.data_ptr<int32_t>(), *ln = lens.data_ptr<int32_t>();
  const Paged<A> kv{(const A*)k.data_ptr(), (const A*)v.data_ptr(), table.data_ptr<int32_t>(), table.size(1),
                    k.size(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2)};
  bool dp = false;  // bf16 pairs and vdpbf16ps
  if constexpr (std::is_same_v<A, bf16>) dp = bf16_flash_fits(Dh);

  // Pass 1: each long chunk's keys and values, packed once per kv head (G x nkb blocks from first[r]).
  std::vector<int64_t> first(R, 0), owner;  // a request's first packed block; each block's request
  for (int64_t r = 0; r < R; ++r)
    if (st[r + 1] - st[r] > ROW_MAX) {
      first[r] = owner.size();
      owner.insert(owner.end(), G * ((ln[r] + KB - 1) / KB), r);
    }
  const int64_t nb = owner.size();
  std::vector<float> kt(dp ? 0 : nb * block), vf(dp ? 0 : nb * block);
  std::vector<uint32_t> kw(dp ? nb * block / 2 : 0), vw(dp ? nb * block / 2 : 0);
  at::parallel_for(0, nb, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t r = owner[it], nkb = (ln[r] + KB - 1) / KB, g = (it - first[r]) / nkb;
      const int64_t j0 = (it - first[r]) % nkb * KB, nk = std::min<int64_t>(KB, ln[r] - j0);
      auto k_row = [&](int64_t j) { return kv.k_row(r, g, j); };
      auto v_row = [&](int64_t j) { return kv.v_row(r, g, j); };
      if constexpr (std::is_same_v<A, bf16>)
        if (dp) {
          pack_block_bf16(k_row, v_row, j0, nk, Dh, kw.data() + it * block / 2, vw.data() + it * block / 2);
          continue;
        }
      pack_block<A>(k_row, v_row, j0, nk, Dh, kt.data() + it * block, vf.data() + it * block);
    }
  });

  // Pass 2: (request, head) items of the row kernel, (request, head, QB queries) items of flash.
  struct Item {
    int64_t r, h, t0, nq;
  };
  std::vector<Item> items;
  std::vector<double> cost;
  int64_t row_keys = 0;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t n = st[r + 1] - st[r], S = ln[r];
    for (int64_t h = 0; h < H && n > 0; ++h) {
      if (n <= ROW_MAX) {
        items.push_back({r, h, 0, n});
        cost.push_back(ROW_COST * n * S + ITEM_KEYS);
        row_keys = std::max(row_keys, S);
        continue;
      }
      for (int64_t t0 = 0; t0 < n; t0 += QB) {  // a block's queries see up to t0 + nq + S - n keys
        items.push_back({r, h, t0, std::min(QB, n - t0)});
        cost.push_back(double(items.back().nq) * (t0 + items.back().nq + S - n) + ITEM_KEYS);
      }
    }
  }
  balanced_for(cost, [&](int64_t i0, int64_t i1) {
    std::optional<FlashScratch> w;  // flash items only: its buffers are some 40 KB to zero
    if (nb) w.emplace(Dh);
    std::vector<float> qf(Dh), s(row_keys + 16);
    for (int64_t i = i0; i < i1; ++i) {
      const Item& it = items[i];
      const int64_t r = it.r, g = it.h / group, n = st[r + 1] - st[r], S = ln[r];
      const A* qr = Q + (st[r] + it.t0) * qn + it.h * qh;
      A* orow = O + ((st[r] + it.t0) * H + it.h) * Dh;
      if (n <= ROW_MAX) {  // query t sits at position S - n + t
        for (int64_t t = 0; t < n; ++t)
          paged_row(qr + t * qn, orow + t * H * Dh, kv, r, g, S - n + t + 1, Dh, scale, qf.data(), s.data());
        continue;
      }
      const int64_t f = (first[r] + g * ((S + KB - 1) / KB)) * block;
#if defined(__AVX512BF16__)
      if constexpr (std::is_same_v<A, bf16>)
        if (dp) {
          flash_block_bf16(qr, qn, orow, H * Dh, kw.data() + f / 2, vw.data() + f / 2, nullptr, it.t0, it.nq, n, S,
                           Dh, scale, *w);
          continue;
        }
#endif
      flash_block<A>(qr, qn, orow, H * Dh, kt.data() + f, vf.data() + f, nullptr, it.t0, it.nq, n, S, Dh, scale, *w);
    }
  }, nb ? CHUNKS : 1);  // decode only: one part a thread, contiguous heads (a kv group's cached rows mostly
  // read by one thread); Mixtral-shaped int4 decode over some 64 cached keys: 8.3 us a layer, 12.6 on one thread
  return out;
#else
  TORCH_CHECK(false, "moekit cpu kernel: paged attention needs AVX-512");
#endif
}

torch::Tensor paged_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor table,
                              torch::Tensor starts, torch::Tensor lens, double scale) {
  check(q.dim() == 3 && k.dim() == 4 && v.sizes() == k.sizes(), "q must be [N, H, A], k and v [P, G, C, A]");
  check(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type() &&
            (is_bf16(q) || q.scalar_type() == torch::kFloat32), "q, k, v must share a bfloat16 or float32 dtype");
  check(q.stride(2) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "q, k, v rows must be contiguous");
  check(q.size(2) == k.size(3) && q.size(2) % 16 == 0, "head widths must match and be a multiple of 16");
  check(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "query heads must be a multiple of kv heads");
  for (const auto* t : {&table, &starts, &lens})
    check(t->scalar_type() == torch::kInt32 && t->is_contiguous(), "table, starts, lens must be contiguous int32");
  const int64_t R = lens.size(0), M = table.dim() == 2 ? table.size(1) : -1, P = k.size(0), C = k.size(2);
  check(lens.dim() == 1 && starts.dim() == 1 && starts.size(0) == R + 1 && table.dim() == 2 && table.size(0) == R,
        "table must be [R, M], starts [R + 1], lens [R]");
  const int32_t *st = starts.data_ptr<int32_t>(), *ln = lens.data_ptr<int32_t>(), *tab = table.data_ptr<int32_t>();
  check(st[0] == 0 && st[R] == q.size(0), "starts must run from 0 to the number of query tokens");
  for (int64_t r = 0; r < R; ++r) {  // what the kernel reads must be in bounds
    const int64_t n = st[r + 1] - st[r];
    check(n >= 0 && ln[r] >= n, "starts must not decrease, and lens[r] must count request r's new tokens");
    if (n == 0) continue;
    check((ln[r] + C - 1) / C <= M, "lens[r] needs more blocks than the table has columns");
    for (int64_t b = 0; b < (ln[r] + C - 1) / C; ++b)
      check(tab[r * M + b] >= 0 && tab[r * M + b] < P, "block table entries must index the pool");
  }
  return is_bf16(q) ? paged_impl<bf16>(q, k, v, table, starts, lens, (float)scale)
                    : paged_impl<float>(q, k, v, table, starts, lens, (float)scale);
}

}  // namespace moekit
