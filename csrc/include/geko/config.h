// Every GEKO threshold and rate, defined once. Python's GekoConfig reads its
// defaults from this struct (through _C.Config), so nothing is typed twice.
#pragma once

#include <cstdint>
#include <string>

namespace geko {

// Bucket codes shared by the kernels, the table and the planner.
// FREEZE..HARD are the four GEKO buckets (docs/design.md §3). UNSEEN marks a table
// entry that was never updated; INVALID marks a statistics row with no valid
// token or a non-finite value (never stored in the table).
enum Bucket : int8_t {
  kInvalid = -1,
  kFreeze = 0,
  kLight = 1,
  kFocus = 2,
  kHard = 3,
  kUnseen = 4,
};
constexpr int kNumBuckets = 5;  // FREEZE, LIGHT, FOCUS, HARD, UNSEEN

struct Config {
  // Instant bucket: correct & confidence > freeze_confidence -> FREEZE
  // (the table also requires q >= freeze_q), correct otherwise -> LIGHT,
  // wrong & confidence > hard_confidence -> HARD, wrong otherwise -> FOCUS.
  double freeze_confidence = 0.85;
  double freeze_q = 0.80;
  double hard_confidence = 0.60;
  // A sequence counts as correct when its token accuracy (over its valid, i.e.
  // unmasked, tokens) reaches this. 1.0: every response token argmax-right, the
  // exact match greedy decoding reproduces, so "learned" means "answered right";
  // for a classifier (one token) any threshold in (0, 1] is the same rule. Lower it
  // (e.g. 0.9) for pre-training-like data where no sequence is ever exact.
  double correct_threshold = 1.0;
  // Q-value: q <- (1 - q_alpha) q + q_alpha r, r = 1 - min(loss / loss_scale, 1).
  // 0.1, chosen on the benchmark's validation splits (docs/tuning.md): 0.3 freezes samples after
  // fewer visits and saves more, but fell further behind full training on validation.
  double q_alpha = 0.1;
  double q_init = 0.5;
  double loss_scale = 2.0;
  // EMA of loss (beta1) and of loss differences (beta2): x <- b x + (1 - b) v.
  double loss_ema_beta = 0.9;
  double loss_diff_ema_beta = 0.9;
  // Noise guard: after this many consecutive HARD visits a sample loses its
  // extra weight (its bucket becomes FOCUS). 0 disables the guard.
  int32_t noise_guard_visits = 8;
  // Margin rule of "correct": with correct_margin > 0, a sample is correct only when,
  // besides reaching correct_threshold, the lowest label probability over its valid
  // tokens is at least correct_margin (every response token predicted with at least
  // that probability). 0 turns the rule off (the minimum of probabilities is always
  // >= 0), so the default is the accuracy rule alone. In [0, 1].
  double correct_margin = 0.0;

  // Throws std::invalid_argument naming the offending field.
  void validate() const;
};

// Instant bucket of one sample from its statistics (no Q gate). Thresholds are
// compared in float32, as the torch reference and the Triton kernels compare them,
// so every path agrees exactly. NaN confidence -> INVALID. `min_label_prob` is the
// lowest label probability over the sample's valid tokens (the margin rule).
inline int8_t instant_bucket(float confidence, float correct, float min_label_prob, const Config& c) {
  if (confidence != confidence) return kInvalid;
  const bool is_correct = correct >= static_cast<float>(c.correct_threshold) &&
                          (c.correct_margin <= 0.0 || min_label_prob >= static_cast<float>(c.correct_margin));
  if (is_correct) {
    return confidence > static_cast<float>(c.freeze_confidence) ? kFreeze : kLight;
  }
  return confidence > static_cast<float>(c.hard_confidence) ? kHard : kFocus;
}

// The table's form: the table keeps no label probabilities, so the margin rule is not
// applied here; the Selector folds it into the `correct` it stores (a sample failing the
// margin is stored just below correct_threshold), so both forms give the same bucket.
inline int8_t instant_bucket(float confidence, float correct, const Config& c) {
  Config accuracy_only = c;
  accuracy_only.correct_margin = 0.0;
  return instant_bucket(confidence, correct, 1.0f, accuracy_only);
}

}  // namespace geko
