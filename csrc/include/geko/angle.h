// CPU kernel of the angle concentration of token hidden states (GAIN-RL,
// docs/design.md §4): per sequence, the mean pairwise cosine similarity of its valid
// tokens in O(T·d) from  Σ_{i<j} cos(x_i, x_j) = (‖Σ x̂_i‖² − Σ ‖x̂_i‖²) / 2,
// and the mean cosine between prefix and non-prefix tokens, (s_P · s_Q) / (n_P n_Q).
// Plain C++17, OpenMP over sequences, loops shaped for AVX2 auto-vectorisation.
//
// Semantics (shared with geko_core.angle_concentration_reference and the Triton kernels):
// x̂ = x / ‖x‖, and x̂ = 0 when the fp32 sum of squares is 0 (the token still counts,
// its cosines are 0); a valid token whose fp32 sum of squares is not finite makes its
// sequence invalid (NaN outputs). Rows of tokens that are not valid are never read.
#pragma once

#include <cstdint>

namespace geko {

enum class HiddenDtype : int8_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// [B, T, D] hidden states with a contiguous last dimension; other strides in elements.
struct HiddenView {
  const void* data = nullptr;
  HiddenDtype dtype = HiddenDtype::kFloat32;
  int64_t batch = 0;
  int64_t tokens = 0;
  int64_t dim = 0;
  int64_t batch_stride = 0;
  int64_t token_stride = 0;
};

// Optional [B, T] byte mask (bool), nonzero = valid token; data == nullptr means all valid.
struct TokenMaskView {
  const uint8_t* data = nullptr;
  int64_t batch_stride = 0;
  int64_t token_stride = 0;
};

// Outputs, each contiguous [B]. `cross` is written only when a prefix is given.
struct AngleOutput {
  float* concentration = nullptr;
  int32_t* valid_tokens = nullptr;
  float* cross = nullptr;
};

// `prefix_len`: contiguous int64 [B] (positions < prefix_len form the prefix), or nullptr
// for no cross term (then out.cross is not written). Throws std::invalid_argument on
// inconsistent views, a missing output or a prefix length outside [0, T], before writing.
void angle_concentration_cpu(const HiddenView& hidden, const TokenMaskView& mask, const int64_t* prefix_len,
                             const AngleOutput& out);

}  // namespace geko
