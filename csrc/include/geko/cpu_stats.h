// CPU kernels of the per-sample statistics (docs/design.md §2) and of the fused
// cross-entropy (forward statistics + token loss + log-sum-exp, backward
// softmax - onehot). Plain C++17, OpenMP over rows, AVX2/FMA when compiled for it.
//
// Layout contract (shared with the Triton kernels): logits are a [S, T, V] view
// whose last dimension is contiguous (other strides arbitrary, in elements);
// labels are a [S, T] int64 view. A [N, V] input is [N, 1, V].
#pragma once

#include <cstdint>

#include "geko/config.h"

namespace geko {

enum class ScalarType : int8_t { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// Largest vocabulary the kernels accept (a 1 MB fp32 row still fits in L2 for the second pass).
constexpr int64_t kMaxVocab = 262144;

struct LogitsView {
  const void* data = nullptr;
  ScalarType dtype = ScalarType::kFloat32;
  int64_t samples = 0;
  int64_t tokens = 0;
  int64_t vocab = 0;
  int64_t sample_stride = 0;  // elements
  int64_t token_stride = 0;   // elements
};

struct LabelsView {
  const int64_t* data = nullptr;
  int64_t sample_stride = 0;  // elements
  int64_t token_stride = 0;   // elements
};

// Per-sample outputs, each contiguous [S]; all required.
struct SampleStatsOutput {
  float* loss = nullptr;
  float* confidence = nullptr;
  float* label_prob = nullptr;
  float* correct = nullptr;
  float* entropy = nullptr;
  float* el2n = nullptr;
  int32_t* valid_tokens = nullptr;
  int8_t* bucket = nullptr;
};

// Per-token outputs, each contiguous [S, T]; any may be null (not written).
// Tokens that are not valid (ignored or out-of-range label) get 0 everywhere
// (valid = 0, lse = 0). A valid token whose row holds a NaN or +inf logit, or only -inf
// logits, gets NaN in every float field (its sample is invalid); -inf logits (a masked
// vocabulary) are otherwise probability 0, as in torch (a -inf label logit: loss +inf).
// lse is double: the backward reads it to float precision whatever the logits' magnitude.
struct TokenStatsOutput {
  float* loss = nullptr;
  float* confidence = nullptr;
  float* label_prob = nullptr;
  float* correct = nullptr;
  float* entropy = nullptr;
  float* el2n = nullptr;
  uint8_t* valid = nullptr;
  double* lse = nullptr;
};

// One pass over the logits: token statistics, their per-sample means over valid
// tokens (accumulated in double) and the instant bucket. A sample with no valid
// token, or with a counted token whose label is out of [0, V) or whose row is not
// finite, gets NaN floats and bucket kInvalid. Labels are never used to index
// outside [0, V). Throws std::invalid_argument on inconsistent views.
void sample_stats_cpu(const LogitsView& logits, const LabelsView& labels, int64_t ignore_index,
                      const Config& config, const SampleStatsOutput& out, const TokenStatsOutput& tokens);

// grad[s, t, :] = (softmax(x[s, t, :]) - onehot(y[s, t])) * token_scale[s, t] for valid
// tokens, 0 for the others, written in the logits' dtype. `lse` (double) and `token_scale`
// (float) are contiguous [S, T]; `grad` has the logits' shape and dtype, last stride 1, and
// may be the logits storage itself (in place: each element is read before it is written).
void cross_entropy_backward_cpu(const LogitsView& logits, const LabelsView& labels, const double* lse,
                                const float* token_scale, int64_t ignore_index, void* grad,
                                int64_t grad_sample_stride, int64_t grad_token_stride);

// Scalar conversions (round to nearest even), exposed for tests of the kernels.
float bf16_to_float(uint16_t bits);
uint16_t float_to_bf16(float value);
float fp16_to_float(uint16_t bits);
uint16_t float_to_fp16(float value);

}  // namespace geko
