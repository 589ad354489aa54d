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

// The fused losses' options (geko_core/loss_options.py holds their definition and torch
// reference). For a token with logits x and label y: u = x / temperature, z = softcap *
// tanh(u / softcap) when softcap > 0 (a -inf logit stays -inf, a +inf or NaN logit stays
// non-finite and spoils its row as without options), else z = u; lse = logsumexp(z),
// logp = z - lse; the token loss is
//   l = w_y (1 - eps) (-logp_y) + (eps / V) sum_j w_j (-logp_j) + zeta lse^2
// (eps = label_smoothing, zeta = z_loss, w the class weights, all 1 without them), and a
// "mean" divides by the sum of the counted tokens' w_y. The statistics describe softmax(z).
// With every field at its default the kernels take the plain cross-entropy's path, bit for bit.
struct LossOptions {
  double temperature = 1.0;      // finite, > 0
  double softcap = 0.0;          // 0: off; else finite, > 0
  double label_smoothing = 0.0;  // in [0, 1]
  double z_loss = 0.0;           // finite, >= 0
  const float* class_weight = nullptr;  // [V] float32 (finite, >= 0), or null: all 1
  int64_t class_weight_stride = 1;      // elements, >= 0

  bool plain() const {
    return temperature == 1.0 && softcap == 0.0 && label_smoothing == 0.0 && z_loss == 0.0 && class_weight == nullptr;
  }
  // Throws std::invalid_argument naming the first bad option (the class weights are read,
  // elements [0, vocab) at class_weight_stride, to check each is finite and >= 0).
  void validate(int64_t vocab) const;
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
  float* loss = nullptr;  // the statistic -logp_y
  float* confidence = nullptr;
  float* label_prob = nullptr;
  float* correct = nullptr;
  float* entropy = nullptr;
  float* el2n = nullptr;
  uint8_t* valid = nullptr;
  double* lse = nullptr;  // logsumexp(z) under options
  // The token loss a reduction sums: the options' l (equal to `loss` without options), 0 for
  // tokens that are not valid, NaN where `loss` is NaN.
  float* train_loss = nullptr;
};

// One pass over the logits: token statistics, their per-sample means over valid
// tokens (accumulated in double) and the instant bucket. A sample with no valid
// token, or with a counted token whose label is out of [0, V) or whose row is not
// finite, gets NaN floats and bucket kInvalid. Labels are never used to index
// outside [0, V). Throws std::invalid_argument on inconsistent views.
// `options` (validated here, before anything is written) change the token loss, the
// statistics' distribution (softmax(z)) and lse as described at LossOptions.
void sample_stats_cpu(const LogitsView& logits, const LabelsView& labels, int64_t ignore_index,
                      const Config& config, const SampleStatsOutput& out, const TokenStatsOutput& tokens,
                      const LossOptions& options = LossOptions{});

// grad[s, t, :] = (softmax(x[s, t, :]) - onehot(y[s, t])) * token_scale[s, t] for valid
// tokens, 0 for the others, written in the logits' dtype. `lse` (double) and `token_scale`
// (float) are contiguous [S, T]; `grad` has the logits' shape and dtype, last stride 1, and
// may be the logits storage itself (in place: each element is read before it is written).
// Under `options` (validated here; lse is then the forward's logsumexp(z)) grad is
// d l / d x * token_scale, through z:
//   d l / d z_k = w_y (1 - eps) (p_k - [k = y]) + (eps / V) (W p_k - w_k) + 2 zeta lse p_k,
//   d z_k / d x_k = (1 - (z_k / softcap)^2) / temperature (1 / temperature without softcap,
//   or for a -inf logit), with p = softmax(z) and W = sum_j w_j.
void cross_entropy_backward_cpu(const LogitsView& logits, const LabelsView& labels, const double* lse,
                                const float* token_scale, int64_t ignore_index, void* grad,
                                int64_t grad_sample_stride, int64_t grad_token_stride,
                                const LossOptions& options = LossOptions{});

// Scalar conversions (round to nearest even), exposed for tests of the kernels.
float bf16_to_float(uint16_t bits);
uint16_t float_to_bf16(float value);
float fp16_to_float(uint16_t bits);
uint16_t float_to_fp16(float value);

}  // namespace geko
