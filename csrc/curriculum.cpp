#include "geko/check.h"
#include "geko/curriculum.h"

#include <algorithm>
#include <cmath>
#include <sstream>
#include <stdexcept>
#include <utility>

namespace geko {

namespace {

using detail::fmt;
using detail::require;

void check_progress(double p) {
  require(std::isfinite(p) && p >= 0.0 && p <= 1.0, "MountainCurriculum: progress must be in [0, 1], got " + fmt(p));
}

}  // namespace

std::vector<CurriculumPhase> default_curriculum_phases() {
  // name, end, (HARD, FOCUS, LIGHT), lr multiplier
  return {
      {"WARMUP", 0.15, 1.0, 2.0, 3.0, 1.0},
      {"ASCENT", 0.35, 2.0, 3.0, 1.0, 1.0},
      {"PEAK", 0.65, 5.0, 2.0, 0.0, 1.0},
      {"DESCENT", 0.85, 2.0, 3.0, 1.0, 1.0},
      {"CONSOLIDATE", 1.0, 1.0, 2.0, 3.0, 1.0},
  };
}

MountainCurriculum::MountainCurriculum(std::vector<CurriculumPhase> phases, bool smooth, double max_rate,
                                       double min_rate, double freeze_revisit)
    : phases_(std::move(phases)), smooth_(smooth), max_rate_(max_rate), min_rate_(min_rate),
      freeze_revisit_(freeze_revisit) {
  require(!phases_.empty(), "MountainCurriculum: at least one phase is needed");
  double previous_end = 0.0;
  for (size_t i = 0; i < phases_.size(); ++i) {
    const CurriculumPhase& ph = phases_[i];
    const std::string where = "MountainCurriculum: phase " + std::to_string(i) + " (" + ph.name + ")";
    require(std::isfinite(ph.end) && ph.end > previous_end && ph.end <= 1.0,
            where + ": end must be in (" + fmt(previous_end) + ", 1] (ends strictly increasing), got " + fmt(ph.end));
    for (auto [label, w] : {std::pair<const char*, double>{"hard", ph.hard}, {"focus", ph.focus}, {"light", ph.light}}) {
      require(std::isfinite(w) && w >= 0.0, where + ": weight " + label + " must be finite and >= 0, got " + fmt(w));
    }
    require(ph.hard + ph.focus + ph.light > 0.0, where + ": the weights (hard, focus, light) are all zero");
    require(std::isfinite(ph.lr_multiplier) && ph.lr_multiplier >= 0.0,
            where + ": lr_multiplier must be finite and >= 0, got " + fmt(ph.lr_multiplier));
    previous_end = ph.end;
  }
  require(phases_.back().end == 1.0, "MountainCurriculum: the last phase must end at 1.0, got " + fmt(phases_.back().end));
  require(std::isfinite(max_rate_) && max_rate_ >= 1.0 && max_rate_ <= kMaxRate,
          "MountainCurriculum: max_rate must be in [1, " + fmt(kMaxRate) + "], got " + fmt(max_rate_));
  require(std::isfinite(min_rate_) && (min_rate_ == 0.0 || (min_rate_ >= kMinPositiveRate && min_rate_ <= 1.0)),
          "MountainCurriculum: min_rate must be 0 or in [" + fmt(kMinPositiveRate) + ", 1], got " + fmt(min_rate_));
  require(std::isfinite(freeze_revisit_) && freeze_revisit_ >= 0.0 && freeze_revisit_ <= 1.0,
          "MountainCurriculum: freeze_revisit must be in [0, 1], got " + fmt(freeze_revisit_));
  double start = 0.0;
  for (const CurriculumPhase& ph : phases_) {
    midpoints_.push_back(0.5 * (start + ph.end));
    start = ph.end;
  }
}

int MountainCurriculum::phase_index(double p) const {
  check_progress(p);
  // Phase i covers [end_{i-1}, end_i); p == 1 belongs to the last phase.
  for (size_t i = 0; i < phases_.size(); ++i) {
    if (p < phases_[i].end) return static_cast<int>(i);
  }
  return static_cast<int>(phases_.size()) - 1;
}

template <class Getter>
double MountainCurriculum::interpolate(double p, Getter get) const {
  const size_t last = phases_.size() - 1;
  if (p <= midpoints_.front()) return get(phases_.front());
  if (p >= midpoints_[last]) return get(phases_[last]);
  size_t i = 0;
  while (p > midpoints_[i + 1]) ++i;  // midpoints_[i] < p <= midpoints_[i + 1]
  const double t = (p - midpoints_[i]) / (midpoints_[i + 1] - midpoints_[i]);
  return (1.0 - t) * get(phases_[i]) + t * get(phases_[i + 1]);
}

CurriculumWeights MountainCurriculum::weights(double p) const {
  const int index = phase_index(p);  // validates p
  if (!smooth_) {
    const CurriculumPhase& ph = phases_[index];
    return {ph.hard, ph.focus, ph.light};
  }
  return {interpolate(p, [](const CurriculumPhase& ph) { return ph.hard; }),
          interpolate(p, [](const CurriculumPhase& ph) { return ph.focus; }),
          interpolate(p, [](const CurriculumPhase& ph) { return ph.light; })};
}

double MountainCurriculum::lr_multiplier(double p) const {
  const int index = phase_index(p);
  if (!smooth_) return phases_[index].lr_multiplier;
  return interpolate(p, [](const CurriculumPhase& ph) { return ph.lr_multiplier; });
}

std::array<double, kNumBuckets> MountainCurriculum::rates(double p) const {
  const CurriculumWeights w = weights(p);
  // Interpolating two valid phases can never give all-zero weights (each
  // phase has a positive sum and the mix is convex), so reference > 0.
  const double reference = w.focus > 0.0 ? w.focus : std::max(w.hard, w.light);
  auto rate = [&](double weight) {
    const double r = std::clamp(weight / reference, min_rate_, max_rate_);
    return r > 0.0 && r < kMinPositiveRate ? kMinPositiveRate : r;
  };
  std::array<double, kNumBuckets> out{};
  out[kFreeze] = freeze_revisit_;
  out[kLight] = rate(w.light);
  out[kFocus] = rate(w.focus);
  out[kHard] = rate(w.hard);
  out[kUnseen] = 1.0;
  return out;
}

double curriculum_progress(int64_t step, int64_t total_steps) {
  require(total_steps > 0, "progress: total_steps must be positive, got " + std::to_string(total_steps));
  require(step >= 0 && step <= total_steps,
          "progress: step must be in [0, total_steps=" + std::to_string(total_steps) + "], got " + std::to_string(step));
  return static_cast<double>(step) / static_cast<double>(total_steps);
}

double gainrl_update_mu(double mu, double accuracy, double angle, double n, double alpha, double beta,
                        double acc_scale, double adj_min, double adj_max, int64_t num_positions) {
  require(num_positions >= 1, "gainrl_update_mu: num_positions must be >= 1, got " + std::to_string(num_positions));
  require(std::isfinite(mu), "gainrl_update_mu: mu must be finite, got " + fmt(mu));
  require(std::isfinite(accuracy), "gainrl_update_mu: accuracy must be finite, got " + fmt(accuracy));
  require(std::isfinite(angle), "gainrl_update_mu: angle must be finite, got " + fmt(angle));
  require(std::isfinite(n) && n >= 0.0, "gainrl_update_mu: n must be finite and >= 0, got " + fmt(n));
  require(std::isfinite(alpha), "gainrl_update_mu: alpha must be finite, got " + fmt(alpha));
  require(std::isfinite(beta), "gainrl_update_mu: beta must be finite, got " + fmt(beta));
  require(std::isfinite(acc_scale) && acc_scale > 0.0, "gainrl_update_mu: acc_scale must be positive, got " + fmt(acc_scale));
  require(!std::isnan(adj_min) && !std::isnan(adj_max) && adj_min <= adj_max,
          "gainrl_update_mu: need adj_min <= adj_max, got [" + fmt(adj_min) + ", " + fmt(adj_max) + "]");
  double dmu = n * std::tanh(alpha * (accuracy / acc_scale - beta)) + n * std::tanh(alpha * angle);
  dmu = std::clamp(dmu, adj_min, adj_max);
  return std::clamp(mu + dmu, 0.0, static_cast<double>(num_positions - 1));
}

}  // namespace geko
