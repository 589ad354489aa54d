// Epoch planner: from per-sample buckets (or scores) and a seed, the list of
// samples to train on next, with an importance weight beside each one.
//
// Every plan is a pure function of its inputs and (seed, epoch): random
// numbers come from the counter-based generator of rng.h, and every parallel
// loop runs over fixed-size chunks whose results are combined in chunk order,
// so the output never depends on the number of OpenMP threads. All ranks of a
// distributed job compute the same global plan and keep their own shard.
#pragma once

#include <array>
#include <cstdint>
#include <vector>

#include "geko/config.h"
#include "geko/curriculum.h"  // kMaxRate, kMinPositiveRate

namespace geko {

// How the global plan is ordered and split across ranks (as
// torch.utils.data.DistributedSampler does it).
struct ShardOptions {
  uint64_t seed = 0;
  int64_t num_replicas = 1;
  int64_t rank = 0;
  bool shuffle = true;
  // false: pad by wrapping around to a multiple of num_replicas (padded
  // entries get weight 0, so weighted sums stay unbiased); true: drop the tail.
  bool drop_last = false;

  void validate() const;  // std::invalid_argument
};

// One rank's share of a global plan, split as torch's DistributedSampler does:
// pad by wrapping around to a multiple of num_replicas (padding weighs 0) or,
// with drop_last, drop the tail; rank r takes positions r, r + R, r + 2R, ...
// The only sharder of the project: planner functions and the Python epoch
// object (geko_core/epoch.py) both call it.
struct Shard {
  std::vector<int64_t> indices;
  std::vector<float> weights;
  int64_t total_size = 0;  // shard length * num_replicas
  int64_t real = 0;        // leading entries of this shard that are not padding
};

// std::invalid_argument for a bad rank / replica count.
Shard shard_plan(const int64_t* indices, const float* weights, int64_t m, int64_t num_replicas, int64_t rank,
                 bool drop_last);

struct PlanResult {
  std::vector<int64_t> indices;  // this rank's shard, in training order
  std::vector<float> weights;    // importance weight of each entry (0 for padding)
  int64_t epoch_size = 0;        // global number of draws of the epoch, before chunking / padding / dropping
  int64_t total_size = 0;        // global length after chunking, padding / dropping (= shard length * num_replicas)
  int64_t real = 0;              // leading entries of this shard that are not padding
  // Global draws per bucket (bucket plans); draws of kept / pruned-but-kept
  // samples for InfoBatch are in [kFocus] / [kLight]; zeros otherwise.
  std::array<int64_t, kNumBuckets> bucket_draws{};
};

class EpochPlanner {
 public:
  EpochPlanner(int64_t num_samples, const ShardOptions& options);

  // buckets: [num_samples] codes 0..4. rates: expected copies per epoch of a
  // sample in each bucket (bucket-code order), finite, 0 or in [kMinPositiveRate, kMaxRate];
  // rates[kFreeze] is the revisit fraction, in [0, 1].
  // last_visit: optional [num_samples] (exactly one of the two pointers or
  // none); FREEZE revisits go to the smallest values first.
  //
  // A non-FREEZE sample with rate c gets floor(c) copies plus one more with
  // probability frac(c): E[copies] = c and each copy weighs 1/c. FREEZE: the
  // ceil(rates[kFreeze] * n_freeze) stalest frozen samples (ties broken at
  // random; a uniformly random subset without last_visit), each weighing
  // n_freeze / n_revisited.
  //
  // chunk_size >= 0 (step-based training; needs shuffle): keep only the first
  // chunk_size entries of the shuffled global plan, weights scaled by
  // epoch_size / chunk_size (a uniformly random part of an unbiased plan stays
  // unbiased after that rescaling). -1: the whole epoch.
  PlanResult plan(const int8_t* buckets, int64_t n, const std::array<double, kNumBuckets>& rates, int64_t epoch,
                  const int64_t* last_visit64, const int32_t* last_visit32, int64_t chunk_size = -1) const;

  int64_t num_samples() const { return num_samples_; }
  const ShardOptions& options() const { return options_; }

 private:
  int64_t num_samples_;
  ShardOptions options_;
};

// The number of frozen samples revisited: ceil(fraction * n_freeze), with a
// relative tolerance of 1e-9 so that e.g. 0.05 * 200 gives 10, not 11.
int64_t freeze_revisit_count(double fraction, int64_t n_freeze);

// InfoBatch (docs/design.md §4): samples with score < mean(score) are well learned;
// before epoch delta * num_epochs each is kept with probability 1 - prune_ratio
// and weighs 1 / (1 - prune_ratio); every other sample is kept with weight 1.
// From that epoch on, the full data with weight 1.
template <class T>
PlanResult infobatch_plan(const T* scores, int64_t n, int64_t epoch, int64_t num_epochs, double prune_ratio,
                          double delta, const ShardOptions& options);

enum class WeightedMethod { kSystematic, kExponential };

struct WeightedSampleResult {
  std::vector<int64_t> indices;  // k distinct indices (order carries no meaning)
  std::vector<double> inclusion;  // [k] inclusion probability of each (see weighted_sample)
};

// k distinct indices in [0, n), drawn without replacement with weights w >= 0.
//  kSystematic: randomized systematic PPS. Inclusion probability exactly
//    pi_i = min(1, c w_i) with c solving sum_i pi_i = k (capping iterated).
//  kExponential: Efraimidis-Spirakis keys -log(u_i) / w_i, the k smallest
//    kept. Its marginal inclusion has no closed form; `inclusion` holds the
//    rank-conditioned probability 1 - exp(-w_i tau) with tau the (k+1)-th
//    smallest key, for which Horvitz-Thompson estimates are unbiased.
// Zero weights are never drawn; k must not exceed the number of positive weights.
template <class T>
WeightedSampleResult weighted_sample(const T* w, int64_t n, int64_t k, uint64_t seed, uint64_t epoch,
                                     WeightedMethod method);

// GAIN-RL (docs/design.md §4): position j of `order` (sample indices sorted by the
// policy's score) has weight exp(-(j - mu)^2 / (2 sigma^2)); draw k distinct
// positions with weighted_sample, plan order[position] with weight 1 / pi.
PlanResult gaussian_window_plan(const int64_t* order, int64_t n, double mu, double sigma, int64_t k, int64_t epoch,
                                WeightedMethod method, const ShardOptions& options);

// O(n) uniformly random permutation of v in place (Rao-Sandelius: scatter to
// random blocks, then Fisher-Yates inside each block), deterministic for (seed,
// epoch, sub) whatever the thread count.
void shuffle_in_place(std::vector<int64_t>& v, uint64_t seed, uint64_t epoch, uint64_t sub);

}  // namespace geko
