// Dequantisation of llama.cpp's K-quant and IQ3_XXS blocks to float32 (moekit/weights/gguf_tensors.py reads
// GGUF files through it when the CPU backend is chosen; gguf-py's numpy code is the reference and the oracle).
//
// Shapes: raw [R, K / 256 * block bytes] uint8 -> out [R, K] float32. Every super-block holds 256 values.
// Each value is computed with the operations of llama.cpp's dequantize_row_* in the same order (as gguf-py
// does), so the results are bit for bit gguf-py's.
//
// Layouts (ggml-common.h), bytes per block:
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
    for (int l = 0; l < 32; ++l) {
      const int is = l / 16;
      y[l + 0] = d * sc[is + 0] * (((ql[l + 0] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32);
      y[l + 32] = d * sc[is + 2] * (((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32);
      y[l + 64] = d * sc[is + 4] * (((ql[l + 0] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
      y[l + 96] = d * sc[is + 6] * (((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
    }
}

// grid: [256, 4] float32 values of the 3-bit grid; ksigns: [128] sign bytes (gguf-py's tables, llama.cpp's).
void iq3_xxs(const uint8_t* b, float* y, const float* grid, const uint8_t* ksigns) {
  const float d = half(b);
  const uint8_t *qs = b + 2, *ss = b + 2 + QK / 4;
  for (int ib = 0; ib < QK / 32; ++ib, qs += 8) {
    uint32_t aux;
    std::memcpy(&aux, ss + 4 * ib, 4);
    const float db = d * (0.5f + (aux >> 28)) * 0.5f;
    for (int l = 0; l < 4; ++l, y += 8) {
      const uint8_t signs = ksigns[(aux >> 7 * l) & 127];
      const float *g1 = grid + 4 * qs[2 * l], *g2 = grid + 4 * qs[2 * l + 1];
      for (int j = 0; j < 4; ++j) {
        y[j] = db * g1[j] * (signs & (1 << j) ? -1.f : 1.f);
        y[j + 4] = db * g2[j] * (signs & (1 << (j + 4)) ? -1.f : 1.f);
      }
    }
  }
}

struct Kind {
  const char* name;
  int64_t bytes;
  void (*fn)(const uint8_t*, float*, const float*, const uint8_t*);
};
constexpr Kind KINDS[] = {{"Q2_K", 84, q2_k},   {"Q3_K", 110, q3_k},   {"Q4_K", 144, q4_k},
                          {"Q5_K", 176, q5_k},  {"Q6_K", 210, q6_k},   {"IQ3_XXS", 98, iq3_xxs}};

}  // namespace

std::vector<std::string> dequant_kinds() {
  std::vector<std::string> out;
  for (const Kind& k : KINDS) out.emplace_back(k.name);
  return out;
}

torch::Tensor dequant(const torch::Tensor& raw, const std::string& kind, int64_t K, const torch::Tensor& grid,
                      const torch::Tensor& ksigns) {
  const Kind* k = nullptr;
  for (const Kind& c : KINDS)
    if (kind == c.name) k = &c;
  TORCH_CHECK(k, "dequant: no kernel for GGML type ", kind);
  TORCH_CHECK(raw.dtype() == torch::kUInt8 && raw.dim() == 2 && raw.is_contiguous(), "dequant: raw must be contiguous uint8 [R, bytes]");
  TORCH_CHECK(K % QK == 0 && raw.size(1) == K / QK * k->bytes, "dequant: ", kind, " rows of ", K, " values take ",
              K / QK * k->bytes, " bytes, not ", raw.size(1));
  TORCH_CHECK(grid.dtype() == torch::kFloat32 && grid.numel() == 1024 && ksigns.dtype() == torch::kUInt8 &&
                  ksigns.numel() == 128, "dequant: grid must be float32 [256, 4] and ksigns uint8 [128]");
  auto out = torch::empty({raw.size(0), K}, raw.options().dtype(torch::kFloat32));
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
