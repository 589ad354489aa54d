// GEKO's per-epoch visit counters (the streak gate and stagnation) and the quality guard's
// revisit count.
//
// These are the policy's state, not the table's: a sample's record is 32 bytes for every
// policy, while these arrays exist only in a GEKO policy (4 bytes per sample for the guard,
// 10 with freeze_streak and stall_visits on). GekoPolicy.observe calls count_visits once per
// batch, right after SampleTable::update applied it and reported every row's bucket before
// and after the batch.
#pragma once

#include <cstddef>
#include <cstdint>

namespace geko {

// The counter arrays, each num_samples long, owned by the caller (the policy).
struct VisitCounters {
  size_t num_samples = 0;
  int32_t* seen_epoch = nullptr;  // the epoch of a sample's latest counted visit (-1: none); required
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
  int64_t revisits = 0;  // first visits of the epoch to samples frozen before them, with a finite correct value
  int64_t failed = 0;    // of those, rows FOCUS or HARD after the batch
};

// Advances the counters with one applied batch and counts its FREEZE revisits.
//
// Rows are taken as visits in order. A row is the sample's *first visit of `epoch`* when
// seen_epoch[s] != epoch at that row; a row with a finite loss, confidence and correct value
// (one the table applied) sets seen_epoch[s] = epoch, a row with a non-finite one was skipped
// by the table and leaves every counter as it is. Only a first visit can advance a counter;
// any applied visit can reset one:
// * streak: right and confident after the batch (bucket FREEZE or LIGHT, confidence above
//   freeze_confidence) keeps the streak, plus one on a first visit (saturating at 255);
//   anything else resets it to 0;
// * stall: a wrong row (FOCUS or HARD after the batch) whose loss is not at most
//   (1 - stall_drop) times the reference is stagnant: a first visit counts one more
//   (saturating at 255), a repeated visit keeps the count; a row that is not stagnant resets
//   it to 0. A first visit makes its loss the reference for the rest of the epoch.
// * revisits: a first visit with a finite correct value to a sample frozen before the batch
//   (bucket FREEZE, or LIGHT with a streak of at least freeze_streak before the batch when
//   the streak gate is on) is a revisit; it failed when the row is FOCUS or HARD after the
//   batch. A sample frozen during the epoch (on an earlier copy) and drawn again is not a
//   revisit: it was not drawn as one and its check would measure the same epoch's learning.
//
// before/after: the rows' bucket codes before and after the table's update. Everything is
// checked before anything is written: every index against num_samples (std::out_of_range),
// the arrays against the enabled counters, epoch in [0, INT32_MAX], freeze_streak in
// [0, 255], stall_drop in [0, 1] (std::invalid_argument).
template <typename Index>
RevisitCount count_visits(const VisitCounters& counters, const VisitCounterParams& params, const Index* indices,
                          const float* loss, const float* confidence, const float* correct, const int8_t* before,
                          const int8_t* after, size_t count, int64_t epoch);

}  // namespace geko
