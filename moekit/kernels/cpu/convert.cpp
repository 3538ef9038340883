// Weight conversion while loading, for the CPU backend (moekit/weights reads checkpoints through it):
//
// - dequant: llama.cpp's K-quant and IQ3_XXS blocks to float32; gguf-py's numpy code (reference.dequantize)
//   is the oracle. raw [R, K / 256 * block bytes] uint8 -> out [R, K] float32; a super-block holds 256
//   values. Each value is computed with the operations of llama.cpp's dequantize_row_* in the same order,
//   as gguf-py does, so the results are bit for bit gguf-py's.
// - quantize: float32 / bfloat16 rows to moekit's int8 / int4 layouts; kernels/weights.py's quantize_into
//   is the oracle (the same data and scales bit for bit). w [R, K] -> data [R, K] int8 or [R, K / 2] uint8,
//   scale [R, G] float16, G = K / group.
//
// Block layouts (ggml-common.h), bytes per block:
//   Q2_K  84: scales[16] (low 4 bits scale, high 4 bits min), qs[64] (2 bits), d, dmin (float16)
//   Q3_K 110: hmask[32] (third bit), qs[64] (low 2 bits), scales[12] (6-bit, packed), d
//   Q4_K 144: d, dmin, scales[12] (6-bit scales and mins, packed), qs[128] (4 bits)
//   Q5_K 176: d, dmin, scales[12], qh[32] (fifth bit), qs[128]
//   Q6_K 210: ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] (int8), d
//   IQ3_XXS 98: d, qs[64] (grid indices of 4 values), 8 x uint32 (4-bit scale, 4 x 7-bit sign indices)

#include "common.h"

namespace moekit {
namespace {

constexpr int QK = 256;

inline float half(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

// The 6-bit scale and min of sub-block j of a Q4_K / Q5_K block (llama.cpp's get_scale_min_k4).
inline void scale_min_k4(int j, const uint8_t* q, uint8_t& d, uint8_t& m) {
  if (j < 4) {
    d = q[j] & 63;
    m = q[j + 4] & 63;
  } else {
    d = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    m = (q[j + 4] >> 4) | ((q[j - 0] >> 6) << 4);
  }
}

void q2_k(const uint8_t* b, float* y, const float*, const uint8_t*) {
  const uint8_t *sc = b, *q = b + 16;
  const float d = half(b + 80), min = half(b + 82);
  int is = 0;
  for (int n = 0; n < QK; n += 128, q += 32)
    for (int shift = 0; shift < 8; shift += 2)
      for (int h = 0; h < 32; h += 16, ++is) {
        const float dl = d * (sc[is] & 0xF), ml = min * (sc[is] >> 4);
        for (int l = 0; l < 16; ++l) *y++ = dl * ((q[l + h] >> shift) & 3) - ml;
      }
}

void q3_k(const uint8_t* b, float* y, const float*, const uint8_t*) {
  const uint8_t *hm = b, *q = b + 32;
  const float d = half(b + 108);
  uint32_t aux[4];
  std::memcpy(aux, b + 96, 12);
  const uint32_t k1 = 0x03030303, k2 = 0x0f0f0f0f, tmp = aux[2];
  aux[2] = ((aux[0] >> 4) & k2) | (((tmp >> 4) & k1) << 4);
  aux[3] = ((aux[1] >> 4) & k2) | (((tmp >> 6) & k1) << 4);
  aux[0] = (aux[0] & k2) | (((tmp >> 0) & k1) << 4);
  aux[1] = (aux[1] & k2) | (((tmp >> 2) & k1) << 4);
  const int8_t* scales = (const int8_t*)aux;
  int is = 0;
  uint8_t m = 1;
  for (int n = 0; n < QK; n += 128, q += 32)
    for (int shift = 0; shift < 8; shift += 2, m <<= 1)
      for (int h = 0; h < 32; h += 16, ++is) {
        const float dl = d * (scales[is] - 32);
        for (int l = 0; l < 16; ++l) *y++ = dl * (((q[l + h] >> shift) & 3) - ((hm[l + h] & m) ? 0 : 4));
      }
}

void q4_k(const uint8_t* b, float* y, const float*, const uint8_t*) {
  const float d = half(b), min = half(b + 2);
  const uint8_t *s = b + 4, *q = b + 16;
  for (int j = 0, is = 0; j < QK; j += 64, q += 32, is += 2) {
    uint8_t sc, m;
    scale_min_k4(is, s, sc, m);
    const float d1 = d * sc, m1 = min * m;
    scale_min_k4(is + 1, s, sc, m);
    const float d2 = d * sc, m2 = min * m;
    for (int l = 0; l < 32; ++l) y[l] = d1 * (q[l] & 0xF) - m1;
    for (int l = 0; l < 32; ++l) y[l + 32] = d2 * (q[l] >> 4) - m2;
    y += 64;
  }
}

void q5_k(const uint8_t* b, float* y, const float*, const uint8_t*) {
  const float d = half(b), min = half(b + 2);
  const uint8_t *s = b + 4, *qh = b + 16, *ql = b + 48;
  uint8_t u1 = 1, u2 = 2;
  for (int j = 0, is = 0; j < QK; j += 64, ql += 32, is += 2, u1 <<= 2, u2 <<= 2) {
    uint8_t sc, m;
    scale_min_k4(is, s, sc, m);
    const float d1 = d * sc, m1 = min * m;
    scale_min_k4(is + 1, s, sc, m);
    const float d2 = d * sc, m2 = min * m;
    for (int l = 0; l < 32; ++l) y[l] = d1 * ((ql[l] & 0xF) + (qh[l] & u1 ? 16 : 0)) - m1;
    for (int l = 0; l < 32; ++l) y[l + 32] = d2 * ((ql[l] >> 4) + (qh[l] & u2 ? 16 : 0)) - m2;
    y += 64;
  }
}

void q6_k(const uint8_t* b, float* y, const float*, const uint8_t*) {
  const uint8_t *ql = b, *qh = b + 128;
  const int8_t* sc = (const int8_t*)(b + 192);
  const float d = half(b + 208);
  for (int n = 0; n < QK; n += 128, y += 128, ql += 64, qh += 32, sc += 8)
    for (int k = 0; k < 4; ++k) {  // y[32 k + l]: low or high nibbles of ql[l] / ql[l + 32], bits 2k of qh[l]
      const uint8_t* L = ql + (k & 1) * 32;
      const int ls = (k >> 1) * 4, hs = 2 * k;
      for (int h = 0; h < 32; h += 16) {
        const float ds = d * sc[2 * k + h / 16];
        for (int l = h; l < h + 16; ++l) y[32 * k + l] = ds * ((((L[l] >> ls) & 0xF) | (((qh[l] >> hs) & 3) << 4)) - 32);
      }
    }
}

// grid: [256, 4] float32 values of the 3-bit grid; ksigns: [128] sign bytes (gguf-py's tables, llama.cpp's).
// A value is db * grid, negated where its sign bit is set (the same float as multiplying by -1).
void iq3_xxs(const uint8_t* b, float* y, const float* grid, const uint8_t* ksigns) {
  const float d = half(b);
  const uint8_t *qs = b + 2, *ss = b + 2 + QK / 4;
  for (int ib = 0; ib < QK / 32; ++ib, qs += 8, y += 32) {
    uint32_t aux;
    std::memcpy(&aux, ss + 4 * ib, 4);
    const float db = d * (0.5f + (aux >> 28)) * 0.5f;
    uint32_t signs = 0;  // bit j: the sign of value j of the 32
    for (int l = 0; l < 4; ++l) signs |= uint32_t(ksigns[(aux >> 7 * l) & 127]) << (8 * l);
#if defined(__AVX512F__)
    const __m512i lane = _mm512_set_epi32(3, 2, 1, 0, 3, 2, 1, 0, 3, 2, 1, 0, 3, 2, 1, 0);
    for (int h = 0; h < 2; ++h) {  // 16 values: grid rows qs[4h .. 4h + 3]
      int32_t four;
      std::memcpy(&four, qs + 4 * h, 4);
      const __m128i rows = _mm_cvtepu8_epi32(_mm_cvtsi32_si128(four));
      const __m512i r4 = _mm512_permutexvar_epi32(
          _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0), _mm512_castsi128_si512(rows));
      const __m512 g = _mm512_i32gather_ps(_mm512_add_epi32(_mm512_slli_epi32(r4, 2), lane), grid, 4);
      const __m512i v = _mm512_castps_si512(_mm512_mul_ps(_mm512_set1_ps(db), g));  // sign bit flipped: x -1
      _mm512_storeu_ps(y + 16 * h, _mm512_castsi512_ps(_mm512_mask_xor_epi32(
                                       v, (__mmask16)(signs >> (16 * h)), v, _mm512_set1_epi32(INT32_MIN))));
    }
#else
    for (int j = 0; j < 32; ++j) {
      const float v = db * grid[4 * qs[j / 4] + j % 4];
      y[j] = signs >> j & 1 ? -v : v;
    }
#endif
  }
}

struct Kind {
  const char* name;
  int64_t bytes;
  void (*fn)(const uint8_t*, float*, const float*, const uint8_t*);
};
constexpr Kind KINDS[] = {{"Q2_K", 84, q2_k},   {"Q3_K", 110, q3_k},   {"Q4_K", 144, q4_k},
                          {"Q5_K", 176, q5_k},  {"Q6_K", 210, q6_k},   {"IQ3_XXS", 98, iq3_xxs}};

// One group of ``n`` values into int8 (qmax 127) or int4 (qmax 7, packed as the Q4_0 layout: byte j of each
// 32 values holds value j + 8 low and value j + 16 + 8 high): the scale is the float16 nearest absmax / qmax,
// one step up if that is below it (no value clips), 1 for an all-zero group; q = round-half-even(v / scale).
template <typename A>
uint16_t quantize_group(const A* w, int64_t n, bool round_bf16, bool int4, float* v, uint8_t* out) {
  const int qmax = int4 ? 7 : 127, qmin = int4 ? -8 : -127;
  float absmax = 0.f;
  int64_t i = 0;
#if defined(__AVX512F__)
  __m512 am = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    __m512 x = load16(w + i);
    if (round_bf16) x = rnd(x, (const bf16*)nullptr);
    _mm512_storeu_ps(v + i, x);
    am = _mm512_max_ps(am, _mm512_abs_ps(x));
  }
  absmax = _mm512_reduce_max_ps(am);
#endif
  for (; i < n; ++i) {
    v[i] = round_bf16 ? bf2f(f2bf(to_f<A>(w[i]))) : to_f<A>(w[i]);
    absmax = std::max(absmax, std::fabs(v[i]));
  }
  const float s = absmax / qmax;
  uint16_t h = _cvtss_sh(s, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  if (_cvtsh_ss(h) < s && h != 0x7C00) ++h;  // the next float16 up (s > 0)
  if (!(absmax > 0.f)) h = 0x3C00;  // 1.0
  const float sc = _cvtsh_ss(h);
  i = 0;
#if defined(__AVX512F__)
  const __m512 vs = _mm512_set1_ps(sc), lo = _mm512_set1_ps(qmin), hi = _mm512_set1_ps(qmax);
  auto q16 = [&](int64_t at) {
    __m512 q = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(v + at), vs),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(q, lo), hi));
  };
  if (int4) {
    const __m512i eight = _mm512_set1_epi32(8);
    for (; i + 32 <= n; i += 32) {
      const __m512i a = _mm512_add_epi32(q16(i), eight), b = _mm512_add_epi32(q16(i + 16), eight);
      _mm_storeu_si128((__m128i*)(out + i / 2), _mm512_cvtepi32_epi8(_mm512_or_si512(a, _mm512_slli_epi32(b, 4))));
    }
  } else {
    for (; i + 16 <= n; i += 16) _mm_storeu_si128((__m128i*)(out + i), _mm512_cvtepi32_epi8(q16(i)));
  }
#endif
  auto q1 = [&](int64_t at) { return (int)std::min<float>(std::max<float>(std::nearbyint(v[at] / sc), qmin), qmax); };
  if (int4) {
    for (; i + 32 <= n; i += 32)
      for (int j = 0; j < 16; ++j) out[i / 2 + j] = uint8_t((q1(i + j) + 8) | ((q1(i + j + 16) + 8) << 4));
  } else {
    for (; i < n; ++i) out[i] = uint8_t(int8_t(q1(i)));
  }
  return h;
}

}  // namespace

void quantize(const torch::Tensor& w, torch::Tensor& data, torch::Tensor& scale, bool round_bf16) {
  const bool int4 = data.scalar_type() == torch::kUInt8;
  TORCH_CHECK(w.dim() == 2 && data.dim() == 2 && scale.dim() == 2 && w.stride(1) == 1 && data.stride(1) == 1 &&
                  scale.stride(1) == 1, "quantize: w, data and scale must be matrices with contiguous rows");
  TORCH_CHECK(w.scalar_type() == torch::kFloat32 || w.scalar_type() == torch::kBFloat16,
              "quantize: w must be float32 or bfloat16");
  TORCH_CHECK((int4 || data.scalar_type() == torch::kInt8) && scale.scalar_type() == torch::kHalf,
              "quantize: data must be int8 or uint8 (int4), scale float16");
  const int64_t R = w.size(0), K = w.size(1), G = scale.size(1), group = G ? K / G : 0;
  TORCH_CHECK(data.size(0) == R && scale.size(0) == R && G * group == K && data.size(1) == (int4 ? K / 2 : K) &&
                  (!int4 || group % 32 == 0), "quantize: ", R, " x ", K, " values do not fit data ", data.sizes(),
              " and scale ", scale.sizes());
  const bool bf = w.scalar_type() == torch::kBFloat16;
  const uint8_t* wp = (const uint8_t*)w.data_ptr();
  uint8_t* dp = (uint8_t*)data.data_ptr();
  uint16_t* sp = (uint16_t*)scale.data_ptr();
  const int64_t ws = w.stride(0) * w.element_size(), ds = data.stride(0), ss = scale.stride(0);
  at::parallel_for(0, R, std::max<int64_t>(1, (1 << 16) / K), [&](int64_t r0, int64_t r1) {
    std::vector<float> v(group);
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t g = 0; g < G; ++g) {
        uint8_t* out = dp + r * ds + g * (int4 ? group / 2 : group);
        sp[r * ss + g] = bf ? quantize_group((const bf16*)(wp + r * ws) + g * group, group, false, int4, v.data(), out)
                            : quantize_group((const float*)(wp + r * ws) + g * group, group, round_bf16, int4,
                                             v.data(), out);
      }
  });
}

std::vector<std::string> dequant_kinds() {
  std::vector<std::string> out;
  for (const Kind& k : KINDS) out.emplace_back(k.name);
  return out;
}

torch::Tensor dequant(const torch::Tensor& raw, const std::string& kind, int64_t K, const torch::Tensor& grid,
                      const torch::Tensor& ksigns, const c10::optional<torch::Tensor>& into) {
  const Kind* k = nullptr;
  for (const Kind& c : KINDS)
    if (kind == c.name) k = &c;
  TORCH_CHECK(k, "dequant: no kernel for GGML type ", kind);
  TORCH_CHECK(raw.dtype() == torch::kUInt8 && raw.dim() == 2 && raw.is_contiguous(),
              "dequant: raw must be contiguous uint8 [R, bytes]");
  TORCH_CHECK(K % QK == 0 && raw.size(1) == K / QK * k->bytes, "dequant: ", kind, " rows of ", K, " values take ",
              K / QK * k->bytes, " bytes, not ", raw.size(1));
  TORCH_CHECK(grid.dtype() == torch::kFloat32 && grid.numel() == 1024 && ksigns.dtype() == torch::kUInt8 &&
                  ksigns.numel() == 128, "dequant: grid must be float32 [256, 4] and ksigns uint8 [128]");
  torch::Tensor out = into ? *into : torch::empty({raw.size(0), K}, raw.options().dtype(torch::kFloat32));
  TORCH_CHECK(out.dtype() == torch::kFloat32 && out.is_contiguous() && out.numel() == raw.size(0) * K,
              "dequant: out must be contiguous float32 with ", raw.size(0) * K, " values");
  const uint8_t* src = raw.data_ptr<uint8_t>();
  float* dst = out.data_ptr<float>();
  const float* g = grid.data_ptr<float>();
  const uint8_t* s = ksigns.data_ptr<uint8_t>();
  const int64_t blocks = raw.size(0) * (K / QK);
  at::parallel_for(0, blocks, 256, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) k->fn(src + b * k->bytes, dst + b * QK, g, s);
  });
  return out;
}

}  // namespace moekit
