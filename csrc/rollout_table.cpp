#include "geko/rollout_table.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "geko/check.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace geko {

namespace {

using detail::fmt;
using detail::require;

struct Rule {
  explicit Rule(const RolloutConfig& c)
      : keep(static_cast<float>(1.0 - c.alpha)), take(static_cast<float>(c.alpha)),
        light_above(static_cast<float>(c.light_above)) {}
  float keep, take, light_above;
};

// keep * a + take * b: the coefficients are floats, so each product of two floats is exact
// in double and the sum is rounded once, fused or not (the numpy reference,
// geko_core/reference_rollouts.py, gets the same bits).
inline double blend(float keep, float a, float take, float b) {
  return static_cast<double>(keep) * static_cast<double>(a) + static_cast<double>(take) * static_cast<double>(b);
}

inline uint16_t run_after(uint16_t run, bool on) {
  if (!on) return 0;
  return run == UINT16_MAX ? run : static_cast<uint16_t>(run + 1);
}

// Bucket of a group from its pass rate: no reward spread means no gradient, whatever the
// pass rate (FREEZE when mostly solved, HARD otherwise); a mixed group is LIGHT when nearly
// solved, else FOCUS.
inline int8_t rollout_bucket(float pass_rate, bool zero_variance, const Rule& rule) {
  if (zero_variance) return pass_rate >= 0.5f ? kFreeze : kHard;
  return pass_rate > rule.light_above ? kLight : kFocus;
}

inline void apply_row(RolloutRecord& r, const ConstGroupStats& s, size_t i, int32_t step, const Rule& rule) {
  const float p = s.pass_rate[i];
  const float length = s.mean_length[i];
  const bool flat = s.zero_variance[i] != 0;
  if (r.visits == 0) {
    r.pass_ema = p;
    r.length_ema = length;
  } else {
    // The clamps only absorb the rounding of the float coefficients (keep + take may be 1 + 1 ulp).
    r.pass_ema = static_cast<float>(std::min(std::max(blend(rule.keep, r.pass_ema, rule.take, p), 0.0), 1.0));
    r.length_ema = static_cast<float>(std::min(blend(rule.keep, r.length_ema, rule.take, length), double{FLT_MAX}));
  }
  r.last_pass = p;
  r.last_spread = s.spread[i];
  r.flat_run = run_after(r.flat_run, flat);
  r.solved_run = run_after(r.solved_run, s.all_right[i] != 0);
  r.failed_run = run_after(r.failed_run, s.all_wrong[i] != 0);
  r.bucket = rollout_bucket(p, flat, rule);
  if (r.visits != UINT32_MAX) ++r.visits;
  r.last_step = step;
}

// "" when row i of precomputed statistics is one rollout_group_stats can produce.
std::string check_stats_row(const ConstGroupStats& s, size_t i) {
  const float p = s.pass_rate[i], spread = s.spread[i], length = s.mean_length[i];
  if (!(p >= 0.0f && p <= 1.0f)) return "pass_rate[" + std::to_string(i) + "] = " + fmt(p) + " is not in [0, 1]";
  if (!(std::isfinite(spread) && spread >= 0.0f)) {
    return "spread[" + std::to_string(i) + "] = " + fmt(spread) + " is not finite and >= 0";
  }
  if (!(std::isfinite(length) && length >= 0.0f)) {
    return "mean_length[" + std::to_string(i) + "] = " + fmt(length) + " is not finite and >= 0";
  }
  if (s.zero_variance[i] > 1 || s.all_right[i] > 1 || s.all_wrong[i] > 1) {
    return "row " + std::to_string(i) + ": zero_variance, all_right and all_wrong must be 0 or 1";
  }
  if (s.all_right[i] && s.all_wrong[i]) return "row " + std::to_string(i) + " is both all right and all wrong";
  return "";
}

}  // namespace

RolloutRecord RolloutTableTraits::blank(const RolloutConfig&) {
  RolloutRecord r;
  std::memset(static_cast<void*>(&r), 0, sizeof(r));
  r.last_step = -1;
  r.bucket = kUnseen;
  return r;
}

void RolloutConfig::validate() const {
  const auto ok = [](bool good, const std::string& what) { require(good, "RolloutConfig: " + what); };
  ok(std::isfinite(right_at) && std::isfinite(wrong_at), "right_at and wrong_at must be finite, got " +
                                                             fmt(right_at) + " and " + fmt(wrong_at));
  ok(right_at > wrong_at, "right_at (" + fmt(right_at) + ") must be above wrong_at (" + fmt(wrong_at) + ")");
  ok(std::isfinite(alpha) && alpha > 0.0 && alpha <= 1.0, "alpha must be in (0, 1], got " + fmt(alpha));
  ok(std::isfinite(light_above) && light_above >= 0.0 && light_above <= 1.0,
     "light_above must be in [0, 1], got " + fmt(light_above));
  ok(std::isfinite(flat_tol) && flat_tol >= 0.0, "flat_tol must be finite and >= 0, got " + fmt(flat_tol));
}

const std::vector<FieldInfo>& rollout_record_fields() {
#define GEKO_FIELD(name, kind) FieldInfo{#name, offsetof(RolloutRecord, name), sizeof(RolloutRecord::name), kind}
  static const std::vector<FieldInfo> fields = {
      GEKO_FIELD(pass_ema, 'f'), GEKO_FIELD(last_pass, 'f'),  GEKO_FIELD(last_spread, 'f'),
      GEKO_FIELD(length_ema, 'f'), GEKO_FIELD(visits, 'u'),   GEKO_FIELD(last_step, 'i'),
      GEKO_FIELD(flat_run, 'u'), GEKO_FIELD(solved_run, 'u'), GEKO_FIELD(failed_run, 'u'),
      GEKO_FIELD(bucket, 'i'),   GEKO_FIELD(flags, 'u'),
  };
#undef GEKO_FIELD
  return fields;
}

std::string check_rollout_record(const RolloutRecord& r) {
  if (r.bucket < kFreeze || r.bucket > kUnseen) return "bucket code " + std::to_string(r.bucket) + " is not in [0, 4]";
  if (r.flags != 0) return "flags " + std::to_string(r.flags) + " hold unknown bits";
  if (r.visits == 0) {
    const RolloutRecord blank = RolloutTableTraits::blank(RolloutConfig{});
    if (std::memcmp(&r, &blank, sizeof(r)) != 0) return "a never-updated prompt (visits 0) is not blank";
    return "";
  }
  if (r.bucket == kUnseen) return "an updated prompt (visits " + std::to_string(r.visits) + ") has bucket UNSEEN";
  if (r.last_step < 0) return "an updated prompt has last_step " + std::to_string(r.last_step);
  for (const float p : {r.pass_ema, r.last_pass}) {
    if (!(p >= 0.0f && p <= 1.0f)) return "a pass rate " + fmt(p) + " is not in [0, 1]";
  }
  for (const float x : {r.last_spread, r.length_ema}) {
    if (!(std::isfinite(x) && x >= 0.0f)) return "last_spread or length_ema " + fmt(x) + " is not finite and >= 0";
  }
  if (r.solved_run != 0 && r.failed_run != 0) return "both an all-right and an all-wrong run";
  const uint64_t longest = std::max({r.flat_run, r.solved_run, r.failed_run});
  if (longest > r.visits) return "a run of " + std::to_string(longest) + " is longer than its visits";
  const bool flat_bucket = r.bucket == kFreeze || r.bucket == kHard;
  if (flat_bucket != (r.flat_run != 0)) return "bucket " + std::to_string(r.bucket) + " with a zero-variance run of " +
                                               std::to_string(r.flat_run);
  if ((r.bucket == kFreeze) != (flat_bucket && r.last_pass >= 0.5f)) {
    return "bucket " + std::to_string(r.bucket) + " with a latest pass rate of " + fmt(r.last_pass);
  }
  return "";
}

void rollout_group_stats(const float* rewards, const float* lengths, size_t count, size_t group,
                         const RolloutConfig& config, const GroupStats& out, int num_threads) {
  require(group >= 1, "a group must hold at least one reward (G >= 1)");
  const size_t total = count * group;
  bool bad = false;
  for (size_t k = 0; k < total; ++k) bad |= !std::isfinite(rewards[k]);
  if (lengths != nullptr) {
    for (size_t k = 0; k < total; ++k) bad |= !(std::isfinite(lengths[k]) && lengths[k] >= 0.0f);
  }
  if (bad) {
    for (size_t k = 0; k < total; ++k) {
      const std::string at = "[" + std::to_string(k / group) + ", " + std::to_string(k % group) + "]";
      require(std::isfinite(rewards[k]), "rewards" + at + " = " + fmt(rewards[k]) + " is not finite");
      require(lengths == nullptr || (std::isfinite(lengths[k]) && lengths[k] >= 0.0f),
              "lengths" + at + " = " + fmt(lengths == nullptr ? 0.0 : lengths[k]) + " is not finite and >= 0");
    }
  }
  // Everything is checked: from here on the call writes.
  const double wrong = config.wrong_at, range = config.right_at - config.wrong_at, tol = config.flat_tol;
  const float right_f = static_cast<float>(config.right_at), wrong_f = static_cast<float>(config.wrong_at);
  const double g = static_cast<double>(group);
  const int64_t n = static_cast<int64_t>(count);
#pragma omp parallel for schedule(static) num_threads(detail::threads_for(total, num_threads))
  for (int64_t b = 0; b < n; ++b) {
    const float* r = rewards + static_cast<size_t>(b) * group;
    // Sums in double, in order: the reference sums the same way, so pass rate, zero variance,
    // the flags and the mean length agree bit for bit (the spread to rounding).
    double pass = 0.0, sum = 0.0, length = 0.0;
    float lo = r[0], hi = r[0];
    bool right = true, wrong_all = true;
    for (size_t j = 0; j < group; ++j) {
      pass += std::min(std::max((static_cast<double>(r[j]) - wrong) / range, 0.0), 1.0);
      sum += r[j];
      lo = std::min(lo, r[j]);
      hi = std::max(hi, r[j]);
      right &= r[j] >= right_f;
      wrong_all &= r[j] <= wrong_f;
      if (lengths != nullptr) length += lengths[static_cast<size_t>(b) * group + j];
    }
    const double mean = sum / g;
    double squares = 0.0;
    for (size_t j = 0; j < group; ++j) squares += (r[j] - mean) * (r[j] - mean);
    out.pass_rate[b] = static_cast<float>(pass / g);
    out.spread[b] = static_cast<float>(std::sqrt(squares / g));
    out.zero_variance[b] = static_cast<double>(hi) - static_cast<double>(lo) <= tol;
    out.all_right[b] = right;
    out.all_wrong[b] = wrong_all;
    out.mean_length[b] = static_cast<float>(length / g);
  }
}

template <typename Index>
void RolloutTable::apply_locked(const Index* indices, const ConstGroupStats& stats, size_t count, int32_t step,
                                int8_t* before, int8_t* after) {
  if (before != nullptr) {
    for (size_t i = 0; i < count; ++i) before[i] = records_[indices[i]].bucket;
  }
  const Rule rule(config_);
  RolloutRecord* records = records_;
  const int threads = threads_for(count);
  if (threads == 1) {
    for (size_t i = 0; i < count; ++i) apply_row(records[indices[i]], stats, i, step, rule);
  } else {
    // Each thread owns one range of the table and walks the whole batch: per-prompt order is
    // kept and no record is touched by two threads.
    const uint64_t n = static_cast<uint64_t>(num_samples_);
#pragma omp parallel num_threads(threads)
    {
#ifdef _OPENMP
      const uint64_t t = static_cast<uint64_t>(omp_get_thread_num());
      const uint64_t workers = static_cast<uint64_t>(omp_get_num_threads());
#else
      const uint64_t t = 0, workers = 1;
#endif
      const uint64_t lo = n * t / workers, span = n * (t + 1) / workers - lo;
      for (size_t i = 0; i < count; ++i) {
        const uint64_t index = static_cast<uint64_t>(indices[i]);
        if (index - lo < span) apply_row(records[index], stats, i, step, rule);
      }
    }
  }
  counters_.updates += count;
  if (after != nullptr) {
    for (size_t i = 0; i < count; ++i) after[i] = records_[indices[i]].bucket;
  }
}

template <typename Index>
void RolloutTable::update(const Index* indices, const float* rewards, const float* lengths, size_t count,
                          size_t group, int64_t step, const GroupStats& stats, int8_t* before, int8_t* after) {
  detail::check_step(step);
  std::lock_guard<std::mutex> lock(mutex_);
  detail::check_indices(indices, count, num_samples_);
  rollout_group_stats(rewards, lengths, count, group, config_, stats, num_threads_);
  const ConstGroupStats in{stats.pass_rate, stats.spread,    stats.zero_variance,
                           stats.all_right, stats.all_wrong, stats.mean_length};
  apply_locked(indices, in, count, static_cast<int32_t>(step), before, after);
}

template <typename Index>
void RolloutTable::update_stats(const Index* indices, const ConstGroupStats& stats, size_t count, int64_t step,
                                int8_t* before, int8_t* after) {
  detail::check_step(step);
  std::lock_guard<std::mutex> lock(mutex_);
  detail::check_indices(indices, count, num_samples_);
  for (size_t i = 0; i < count; ++i) {
    const std::string problem = check_stats_row(stats, i);
    require(problem.empty(), problem);
  }
  apply_locked(indices, stats, count, static_cast<int32_t>(step), before, after);
}

#define GEKO_INSTANTIATE(Index)                                                                                     \
  template void RolloutTable::update<Index>(const Index*, const float*, const float*, size_t, size_t, int64_t,     \
                                            const GroupStats&, int8_t*, int8_t*);                                  \
  template void RolloutTable::update_stats<Index>(const Index*, const ConstGroupStats&, size_t, int64_t, int8_t*, \
                                                  int8_t*);
GEKO_INSTANTIATE(int32_t)
GEKO_INSTANTIATE(int64_t)
#undef GEKO_INSTANTIATE

}  // namespace geko
