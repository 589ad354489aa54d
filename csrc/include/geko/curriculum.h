// Mountain curriculum (docs/design.md §3): training progress p in [0, 1] -> bucket
// weights (HARD, FOCUS, LIGHT) -> per-bucket sampling rates for the planner.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "geko/config.h"

namespace geko {

// One phase covers progress [previous end, end). Weights are relative
// (HARD, FOCUS, LIGHT); lr_multiplier is only reported, never applied here.
struct CurriculumPhase {
  std::string name;
  double end = 1.0;
  double hard = 1.0;
  double focus = 1.0;
  double light = 1.0;
  double lr_multiplier = 1.0;
};

// The five phases of docs/design.md §3, defined once.
std::vector<CurriculumPhase> default_curriculum_phases();

// The largest rate the planner accepts for any bucket: a sample appears at
// most this many times in one epoch (HARD's "up to 5x").
constexpr double kMaxRate = 5.0;
// The smallest positive rate: importance weights (1 / rate) stay <= 1e6.
constexpr double kMinPositiveRate = 1e-6;
// Defaults of the curriculum's rate mapping (see MountainCurriculum::rates).
// No bucket below half rate: thinned samples keep weight <= 2 (as InfoBatch rescales by 2), and
// on the benchmark's validation splits a floor of 0.25 cost about 0.3 pt more accuracy than 0.5
// (docs/tuning.md).
constexpr double kDefaultMinRate = 0.5;
constexpr double kDefaultFreezeRevisit = 0.05;  // fraction of FREEZE samples revisited per epoch

struct CurriculumWeights {
  double hard = 0.0;
  double focus = 0.0;
  double light = 0.0;
};

class MountainCurriculum {
 public:
  // Throws std::invalid_argument naming the first bad phase or option.
  MountainCurriculum(std::vector<CurriculumPhase> phases, bool smooth, double max_rate, double min_rate,
                     double freeze_revisit);

  // p must be finite and in [0, 1] (else std::invalid_argument).
  CurriculumWeights weights(double p) const;
  int phase_index(double p) const;
  double lr_multiplier(double p) const;
  // Expected copies per epoch of a sample in each bucket, in bucket-code order
  // (FREEZE, LIGHT, FOCUS, HARD, UNSEEN):
  //   reference = focus weight if > 0, else the largest of (hard, light);
  //   HARD  = clamp(hard / reference, min_rate, max_rate)
  //   FOCUS = clamp(focus / reference, min_rate, max_rate)   (1 when focus > 0)
  //   LIGHT = clamp(light / reference, min_rate, max_rate)
  //   (a positive rate below kMinPositiveRate, possible only with min_rate 0,
  //   becomes kMinPositiveRate)
  //   UNSEEN = 1 (a sample must be seen once to be scored)
  //   FREEZE = freeze_revisit (the fraction of frozen samples revisited)
  // All weights zero cannot happen (refused at construction).
  std::array<double, kNumBuckets> rates(double p) const;

  const std::vector<CurriculumPhase>& phases() const { return phases_; }
  bool smooth() const { return smooth_; }
  double max_rate() const { return max_rate_; }
  double min_rate() const { return min_rate_; }
  double freeze_revisit() const { return freeze_revisit_; }

 private:
  // Smooth mode: a value at each phase midpoint, linear in between, constant
  // before the first midpoint and after the last one.
  template <class Getter>
  double interpolate(double p, Getter get) const;

  std::vector<CurriculumPhase> phases_;
  std::vector<double> midpoints_;
  bool smooth_;
  double max_rate_;
  double min_rate_;
  double freeze_revisit_;
};

// step / total_steps, refused unless 0 <= step <= total_steps and total_steps > 0.
double curriculum_progress(int64_t step, int64_t total_steps);

// GAIN-RL window update (docs/design.md §4):
//   dmu = n tanh(alpha (accuracy / acc_scale - beta)) + n tanh(alpha angle),
// clamped to [adj_min, adj_max]; the new mu is clamped to [0, num_positions - 1].
double gainrl_update_mu(double mu, double accuracy, double angle, double n, double alpha, double beta,
                        double acc_scale, double adj_min, double adj_max, int64_t num_positions);

}  // namespace geko
