// Per-sample state of a whole dataset: one 32-byte record per sample.
//
// Two access patterns share the layout: batched random updates (one record is
// half a cache line, so an update touches one line) and full scans when an epoch
// is planned (32 B read per sample). Records live in one 32-byte aligned block,
// backed by transparent huge pages on Linux so random updates do not also pay a
// page walk per access.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "geko/config.h"
#include "geko/record_table.h"

namespace geko {

// Bits of SampleRecord::flags.
enum SampleFlag : uint8_t {
  // The sample stayed HARD for noise_guard_visits consecutive visits: its
  // bucket was lowered to FOCUS. Cleared as soon as it leaves HARD.
  kFlagSuspectedNoisy = 1u << 0,
};
constexpr uint8_t kKnownFlags = kFlagSuspectedNoisy;

// The record layout below is a versioned format: state dicts and checkpoint files
// (geko_core/_table_file.py, docs/design.md §3) store records byte for byte, with this
// version and the field list of record_fields(). Any change to a field, its offset or
// what it means bumps the version. The record holds what every policy reads; a policy's
// own per-sample state (e.g. GEKO's visit counters) lives in the policy, never here.
constexpr uint32_t kTableFormatVersion = 1;

struct alignas(32) SampleRecord {
  float q;                // Q-value (learnability), in [0, 1]; q_init until the first update
  float loss_ema;         // EMA of the loss (ES's beta1); the first loss on the first visit
  float loss_diff_ema;    // signed EMA of (loss - previous loss) (ES's beta2); 0 after one visit
  float last_loss;        // loss of the latest update
  float last_confidence;  // confidence of the latest update
  uint32_t visits;        // number of applied updates, saturating at UINT32_MAX
  int32_t last_step;      // step of the latest update, -1 when never updated
  uint8_t last_correct;   // correct fraction of the latest update, round(255 * correct)
  int8_t bucket;          // FREEZE..HARD, or UNSEEN when never updated
  uint8_t hard_streak;    // consecutive visits in the instant bucket HARD, saturating at 255
  uint8_t flags;          // SampleFlag bits
};
static_assert(sizeof(SampleRecord) == kRecordSize, "a sample record must stay 32 bytes");
static_assert(alignof(SampleRecord) == 32, "records are aligned to half a cache line");

// The record a never-updated sample holds.
SampleRecord unseen_record(const Config& config);

// The fields of SampleRecord, described for the bindings, state dicts and files.
const std::vector<FieldInfo>& record_fields();

// Counters of a table (they travel with its state).
struct TableCounters {
  uint64_t updates = 0;            // sample-updates applied
  uint64_t nonfinite_skipped = 0;  // sample-updates skipped for a NaN/inf loss, confidence or correct
};

// Checks one record against the invariants of the update rule; returns an
// empty string when it holds, else what is wrong.
std::string check_record(const SampleRecord& record);

struct SampleTableTraits {
  using Record = SampleRecord;
  using Config = geko::Config;
  using Counters = TableCounters;
  static const std::vector<FieldInfo>& fields() { return record_fields(); }
  static std::string check(const SampleRecord& record) { return check_record(record); }
  static SampleRecord blank(const Config& config) { return unseen_record(config); }
};

// The per-sample state table (reads, loads, lock and threads: RecordTable). update()
// applies its batch under the lock.
//
// num_threads: one thread with software prefetch already exceeds the design goal (20 M
// random updates/s), and on a machine whose cores are busy (data-loader workers, other
// jobs) a parallel region waits for its slowest thread, so 1 is the default. With more
// threads, each thread owns one contiguous range of the table and walks the whole batch,
// applying only its own indices: per-sample order is kept and the result does not depend
// on the thread count.
class SampleTable : public RecordTable<SampleTableTraits> {
 public:
  // Throws std::invalid_argument for num_samples < 1, an invalid config or
  // num_threads outside [0, kMaxThreads]; std::bad_alloc when the records do
  // not fit in memory.
  SampleTable(int64_t num_samples, const Config& config, int num_threads = 1)
      : RecordTable(num_samples, config, num_threads) {}

  // Applies one batch of statistics (docs/design.md §3), in batch order (a duplicate
  // index is applied once per occurrence). Everything is validated before any
  // record changes:
  //   std::out_of_range    an index outside [0, num_samples), naming the first one;
  //   std::invalid_argument a step outside [0, kMaxStep], or a finite confidence
  //                         or correct outside [0, 1].
  // A sample whose loss, confidence or correct is NaN or infinite is skipped and
  // counted in TableCounters::nonfinite_skipped. Index type: int32_t or int64_t.
  //
  // The report, for policies that keep state of their own (GEKO's visit counters and
  // revisit count): when given, before[i] / after[i] (count entries each) receive row i's
  // bucket code just before the batch and just after it, in the same locked call. A
  // repeated index reports the same pair on each of its rows.
  template <typename Index>
  void update(const Index* indices, const float* loss, const float* confidence, const float* correct,
              size_t count, int64_t step, int8_t* before = nullptr, int8_t* after = nullptr);
};

}  // namespace geko
