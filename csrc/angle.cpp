#include "geko/angle.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace geko {

namespace {

// Independent accumulator lanes: a multiple of the AVX2 width (8 floats) so the compiler
// keeps two vector accumulators and the FMA latency is hidden; the fixed-size inner loops
// vectorise without -ffast-math because each lane is its own sum.
constexpr int kLanes = 16;

inline float bf16_bits_to_float(uint16_t bits) {
  uint32_t word = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &word, sizeof(value));
  return value;
}

// Branch-free IEEE half -> float, so the conversion loop vectorises: the half's exponent
// and mantissa placed in a float's bit positions and scaled by 2^(127-15) give normals and
// subnormals exactly; exponent 31 (inf/NaN) maps to exponent 255.
inline float fp16_bits_to_float(uint16_t bits) {
  const uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
  const uint32_t magnitude = bits & 0x7fffu;
  const uint32_t shifted = magnitude << 13;
  float scaled;
  std::memcpy(&scaled, &shifted, sizeof(scaled));
  scaled *= 0x1p112f;
  uint32_t word;
  std::memcpy(&word, &scaled, sizeof(word));
  const uint32_t special = shifted | 0x7f800000u;
  word = magnitude >= 0x7c00u ? special : word;
  word |= sign;
  float value;
  std::memcpy(&value, &word, sizeof(value));
  return value;
}

// One token's row as fp32: the row itself for fp32 input, else converted into `buffer`.
const float* row_as_float(const HiddenView& h, const char* row, float* buffer) {
  const int64_t d = h.dim;
  switch (h.dtype) {
    case HiddenDtype::kFloat32:
      return reinterpret_cast<const float*>(row);
    case HiddenDtype::kBFloat16: {
      const auto* src = reinterpret_cast<const uint16_t*>(row);
      for (int64_t i = 0; i < d; ++i) buffer[i] = bf16_bits_to_float(src[i]);
      return buffer;
    }
    case HiddenDtype::kFloat16: {
      const auto* src = reinterpret_cast<const uint16_t*>(row);
      for (int64_t i = 0; i < d; ++i) buffer[i] = fp16_bits_to_float(src[i]);
      return buffer;
    }
  }
  return buffer;
}

float sum_of_squares(const float* x, int64_t d) {
  float lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes)
    for (int k = 0; k < kLanes; ++k) lanes[k] += x[i + k] * x[i + k];
  for (int k = 0; i < d; ++i, ++k) lanes[k] += x[i] * x[i];
  float total = 0.0f;
  for (int k = 0; k < kLanes; ++k) total += lanes[k];
  return total;
}

// Dot product of two fp32 vectors, accumulated in double (d terms: cheap, and the result is
// then differenced with a count).
double dot(const float* a, const float* b, int64_t d) {
  double lanes[4] = {};
  int64_t i = 0;
  for (; i + 4 <= d; i += 4)
    for (int k = 0; k < 4; ++k) lanes[k] += static_cast<double>(a[i + k]) * b[i + k];
  for (int k = 0; i < d; ++i, ++k) lanes[k] += static_cast<double>(a[i]) * b[i];
  return (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
}

size_t element_size(HiddenDtype dtype) { return dtype == HiddenDtype::kFloat32 ? 4 : 2; }

void check(const HiddenView& h, const int64_t* prefix_len, const AngleOutput& out) {
  if (h.data == nullptr && h.batch * h.tokens * h.dim != 0)
    throw std::invalid_argument("angle_concentration_cpu: null hidden data");
  if (h.batch < 0 || h.tokens < 0 || h.dim < 1)
    throw std::invalid_argument("angle_concentration_cpu: hidden must be [B, T, d] with d >= 1");
  if (h.tokens > std::numeric_limits<int32_t>::max())
    throw std::invalid_argument("angle_concentration_cpu: more than 2^31 - 1 tokens per sequence");
  if (h.dtype != HiddenDtype::kFloat32 && h.dtype != HiddenDtype::kBFloat16 && h.dtype != HiddenDtype::kFloat16)
    throw std::invalid_argument("angle_concentration_cpu: unknown hidden dtype");
  if (h.batch > 0 && (out.concentration == nullptr || out.valid_tokens == nullptr))
    throw std::invalid_argument("angle_concentration_cpu: concentration and valid_tokens outputs are required");
  if (prefix_len != nullptr && h.batch > 0 && out.cross == nullptr)
    throw std::invalid_argument("angle_concentration_cpu: a prefix length needs the cross output");
  if (prefix_len != nullptr) {
    for (int64_t b = 0; b < h.batch; ++b) {
      if (prefix_len[b] < 0 || prefix_len[b] > h.tokens)
        throw std::invalid_argument("angle_concentration_cpu: prefix_len[" + std::to_string(b) + "] = " +
                                    std::to_string(prefix_len[b]) + " is outside [0, T] = [0, " +
                                    std::to_string(h.tokens) + "]");
    }
  }
}

}  // namespace

void angle_concentration_cpu(const HiddenView& h, const TokenMaskView& mask, const int64_t* prefix_len,
                             const AngleOutput& out) {
  check(h, prefix_len, out);
  const int64_t d = h.dim;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const char* base = static_cast<const char*>(h.data);
  const size_t esize = element_size(h.dtype);

#pragma omp parallel
  {
    // Per-thread scratch, reused across sequences: the converted row, s and s_P.
    std::vector<float> row_buffer(h.dtype == HiddenDtype::kFloat32 ? 0 : static_cast<size_t>(d));
    std::vector<float> total(static_cast<size_t>(d));
    std::vector<float> prefix_total(prefix_len != nullptr ? static_cast<size_t>(d) : 0);

#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < h.batch; ++b) {
      std::fill(total.begin(), total.end(), 0.0f);
      std::fill(prefix_total.begin(), prefix_total.end(), 0.0f);
      const int64_t prefix = prefix_len != nullptr ? prefix_len[b] : 0;
      int64_t valid = 0, nonzero = 0, valid_prefix = 0;
      bool bad = false;
      for (int64_t t = 0; t < h.tokens; ++t) {
        if (mask.data != nullptr && mask.data[b * mask.batch_stride + t * mask.token_stride] == 0) continue;
        ++valid;
        const bool in_prefix = t < prefix;
        valid_prefix += in_prefix;
        if (bad) continue;  // the sequence is already invalid: only count
        const char* row = base + static_cast<size_t>(b * h.batch_stride + t * h.token_stride) * esize;
        const float* x = row_as_float(h, row, row_buffer.data());
        const float sumsq = sum_of_squares(x, d);
        if (!std::isfinite(sumsq)) {
          bad = true;
          continue;
        }
        if (sumsq == 0.0f) continue;  // x̂ = 0: counted, contributes nothing
        ++nonzero;
        const float inv_norm = 1.0f / std::sqrt(sumsq);
        float* s = total.data();
        for (int64_t i = 0; i < d; ++i) s[i] += x[i] * inv_norm;
        if (in_prefix) {
          float* sp = prefix_total.data();
          for (int64_t i = 0; i < d; ++i) sp[i] += x[i] * inv_norm;
        }
      }
      out.valid_tokens[b] = static_cast<int32_t>(valid);
      const bool ok = valid >= 2 && !bad;
      if (ok) {
        const double n = static_cast<double>(valid);
        const double squared = dot(total.data(), total.data(), d);
        out.concentration[b] = static_cast<float>((squared - static_cast<double>(nonzero)) / (n * (n - 1.0)));
      } else {
        out.concentration[b] = nan;
      }
      if (prefix_len != nullptr) {
        const int64_t valid_rest = valid - valid_prefix;
        if (bad || valid_prefix == 0 || valid_rest == 0) {
          out.cross[b] = nan;
        } else {
          // s_Q = s - s_P, formed in place in `total` (no longer needed)
          float* s = total.data();
          const float* sp = prefix_total.data();
          for (int64_t i = 0; i < d; ++i) s[i] -= sp[i];
          const double pairs = static_cast<double>(valid_prefix) * static_cast<double>(valid_rest);
          out.cross[b] = static_cast<float>(dot(prefix_total.data(), s, d) / pairs);
        }
      }
    }
  }
}

}  // namespace geko
