// GEKO's per-epoch visit counters: the streak gate and stagnation.
//
// These are the policy's state, not the table's: a sample's record is 32 bytes for every
// policy, while the counters exist only when GEKO's freeze_streak or stall_visits is on
// (10 bytes per sample). The Selector calls count_visits once per step, right after the
// table applied the batch, with the bucket of every row before and after that update.
#pragma once

#include <cstddef>
#include <cstdint>

namespace geko {

// The counter arrays, each num_samples long, owned by the caller.
struct VisitCounters {
  size_t num_samples = 0;
  int32_t* seen_epoch = nullptr;  // the epoch of a sample's latest first visit (-1: none); required
  uint8_t* streak = nullptr;      // epochs in a row right and confident; nullptr: the streak gate is off
  uint8_t* stall = nullptr;       // epochs in a row wrong without a stall_drop fall; nullptr: off
  float* ref_loss = nullptr;      // the loss at the first visit of the latest epoch; required with stall
};

struct VisitCounterParams {
  int32_t freeze_streak = 0;        // streak length that makes a LIGHT sample FREEZE (0: unused)
  float freeze_confidence = 0.85f;  // the table's instant-FREEZE confidence
  float stall_drop = 0.1f;          // relative fall per epoch below which a wrong visit is stagnant
};

struct RevisitCount {
  int64_t revisits = 0;  // rows frozen before the batch with a finite correct value
  int64_t failed = 0;    // of those, rows FOCUS or HARD after the batch
};

// Advances the counters with one applied batch and counts its FREEZE revisits.
//
// Rows are taken as visits in order. A row with a non-finite loss, confidence or correct
// value was skipped by the table and is skipped here too. Only a sample's first visit in
// `epoch` can advance a counter; any visit can reset one:
// * streak: right and confident after the batch (bucket FREEZE or LIGHT, confidence above
//   freeze_confidence) keeps the streak, plus one on a first visit (saturating at 255);
//   anything else resets it to 0;
// * stall: a wrong row (FOCUS or HARD after the batch) whose loss is not at most
//   (1 - stall_drop) times the reference is stagnant: a first visit counts one more
//   (saturating at 255), a repeated visit keeps the count; a row that is not stagnant resets
//   it to 0. A first visit makes its loss the reference for the rest of the epoch.
// A row is frozen before the batch when its bucket was FREEZE, or LIGHT with a streak
// (before the batch) of at least freeze_streak when the streak gate is on.
//
// before/after: the rows' bucket codes before and after the table's update. Every index is
// checked against num_samples (std::out_of_range) and the arrays against the enabled
// counters (std::invalid_argument) before anything is written.
template <typename Index>
RevisitCount count_visits(const VisitCounters& counters, const VisitCounterParams& params, const Index* indices,
                          const float* loss, const float* confidence, const float* correct, const int8_t* before,
                          const int8_t* after, size_t count, int32_t epoch);

}  // namespace geko
