// Per-prompt reward history for RL fine-tuning: one 32-byte record per prompt.
//
// A rollout batch is B prompts with G completions each, scored by any verifier: rewards
// [B, G] (and optionally completion lengths [B, G]). Each prompt's group is reduced to its
// statistics (pass rate, spread, zero variance, all right, all wrong, mean length), which
// update the prompt's record (docs/design.md, "RolloutTable"). The statistics alone are
// also available (rollout_group_stats), and a batch of statistics computed elsewhere (on a
// GPU) updates the table by the same rule (update_stats).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "geko/config.h"
#include "geko/record_table.h"

namespace geko {

// The record below is a versioned format, as SampleRecord's (docs/design.md): state dicts
// and checkpoint files store records byte for byte with this version and the field list of
// rollout_record_fields(). Any change to a field, its offset or its meaning bumps it.
constexpr uint32_t kRolloutFormatVersion = 1;

// Thresholds and rates of the rollout rule. Python's RolloutConfig reads its defaults here.
struct RolloutConfig {
  double right_at = 1.0;      // a reward >= right_at is right
  double wrong_at = 0.0;      // a reward <= wrong_at is wrong; right_at > wrong_at
  double alpha = 0.5;         // EMA weight of the new pass rate (and mean length), in (0, 1]
  double light_above = 0.75;  // a mixed group with a pass rate above this is LIGHT, else FOCUS
  double flat_tol = 1e-6;     // a group is zero-variance when max(r) - min(r) <= flat_tol

  // Throws std::invalid_argument naming the offending field.
  void validate() const;
};

struct alignas(32) RolloutRecord {
  float pass_ema;       // EMA of the group's pass rate; the first pass rate on the first visit
  float last_pass;      // pass rate of the latest visit
  float last_spread;    // population std of the latest group's rewards
  float length_ema;     // EMA of the group's mean completion length; first value on first visit
  uint32_t visits;      // applied updates, saturating at UINT32_MAX
  int32_t last_step;    // step of the latest update, -1 when never updated
  uint16_t flat_run;    // consecutive zero-variance visits, saturating
  uint16_t solved_run;  // consecutive all-right visits, saturating
  uint16_t failed_run;  // consecutive all-wrong visits, saturating
  int8_t bucket;        // FREEZE..HARD, or UNSEEN when never updated
  uint8_t flags;        // reserved, 0
};
static_assert(sizeof(RolloutRecord) == kRecordSize, "a rollout record must stay 32 bytes");
static_assert(alignof(RolloutRecord) == 32, "records are aligned to half a cache line");

const std::vector<FieldInfo>& rollout_record_fields();

// Checks one record against the invariants of the update rule; "" when it holds.
std::string check_rollout_record(const RolloutRecord& record);

// Per-group statistics, one entry per group (flags are 0/1 bytes). The update reads them
// through the const form.
template <typename Float, typename Flag>
struct GroupStatsOf {
  Float* pass_rate;
  Float* spread;
  Flag* zero_variance;
  Flag* all_right;
  Flag* all_wrong;
  Float* mean_length;
};
using GroupStats = GroupStatsOf<float, uint8_t>;
using ConstGroupStats = GroupStatsOf<const float, const uint8_t>;

// Statistics of `count` groups of `group` rewards, row-major [count, group]; lengths
// (same shape, tokens) may be null: mean length 0. Throws std::invalid_argument, before
// writing anything, for group < 1, a non-finite reward or a non-finite or negative length.
void rollout_group_stats(const float* rewards, const float* lengths, size_t count, size_t group,
                         const RolloutConfig& config, const GroupStats& out, int num_threads = 1);

// Counters of a rollout table (they travel with its state).
struct RolloutCounters {
  uint64_t updates = 0;  // prompt-updates applied
};

struct RolloutTableTraits {
  using Record = RolloutRecord;
  using Config = RolloutConfig;
  using Counters = RolloutCounters;
  static const std::vector<FieldInfo>& fields() { return rollout_record_fields(); }
  static std::string check(const RolloutRecord& record) { return check_rollout_record(record); }
  static RolloutRecord blank(const RolloutConfig& config);
};

// The per-prompt table (reads, loads, lock and threads: RecordTable). Batches are applied
// in batch order (a repeated index once per occurrence) under the lock; with several
// threads each owns one range of the table, so the result never depends on the thread count.
class RolloutTable : public RecordTable<RolloutTableTraits> {
 public:
  // std::invalid_argument for num_samples < 1, an invalid config or num_threads outside
  // [0, kMaxThreads]; std::bad_alloc when the records do not fit in memory.
  RolloutTable(int64_t num_samples, const RolloutConfig& config, int num_threads = 1)
      : RecordTable(num_samples, config, num_threads) {}

  // One rollout batch: computes every group's statistics into `stats` (count entries each)
  // and applies them, in one locked call. Everything is validated first (std::out_of_range
  // for an index, std::invalid_argument for a bad step or a reward/length as in
  // rollout_group_stats); the table is unchanged on error. before/after (optional, count
  // entries) receive each row's bucket just before and just after the batch.
  template <typename Index>
  void update(const Index* indices, const float* rewards, const float* lengths, size_t count, size_t group,
              int64_t step, const GroupStats& stats, int8_t* before = nullptr, int8_t* after = nullptr);

  // Applies statistics computed elsewhere (e.g. on a GPU) by the same rule. Validated first:
  // pass rates in [0, 1], spreads and mean lengths finite and >= 0, flags 0/1, never both
  // all right and all wrong (std::invalid_argument naming the first bad row).
  template <typename Index>
  void update_stats(const Index* indices, const ConstGroupStats& stats, size_t count, int64_t step,
                    int8_t* before = nullptr, int8_t* after = nullptr);

 private:
  template <typename Index>
  void apply_locked(const Index* indices, const ConstGroupStats& stats, size_t count, int32_t step, int8_t* before,
                    int8_t* after);
};

}  // namespace geko
