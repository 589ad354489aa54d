#include "geko/check.h"
#include "geko/planner.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

#include "geko/curriculum.h"
#include "geko/rng.h"

namespace geko {

namespace {

// Every parallel loop works on chunks of this many elements: the chunking (and
// so the order in which partial results are combined) is fixed by n alone.
constexpr int64_t kChunk = int64_t{1} << 15;

int64_t num_chunks(int64_t n) { return (n + kChunk - 1) / kChunk; }

using detail::fmt;
using detail::require;

// ---------------------------------------------------------------------------
// Shuffle: Rao-Sandelius. Each element goes to one of `blocks` blocks chosen by
// a counter-based random number of its position, blocks are laid out in order,
// then each block gets a Fisher-Yates shuffle from its own stream. Independent
// uniform block labels followed by uniform orders inside blocks give a
// uniformly random permutation, and both passes parallelise over fixed chunks.

constexpr int64_t kSerialShuffleBelow = int64_t{1} << 16;
constexpr int64_t kTargetBlock = int64_t{1} << 14;  // ~128 KiB of int64 per block: cache-resident

void fisher_yates(int64_t* data, int64_t n, uint64_t key) {
  CounterRng rng(key);
  for (int64_t i = n - 1; i > 0; --i) {
    const int64_t j = static_cast<int64_t>(rng.below(static_cast<uint64_t>(i) + 1));
    std::swap(data[i], data[j]);
  }
}

}  // namespace

void shuffle_in_place(std::vector<int64_t>& v, uint64_t seed, uint64_t epoch, uint64_t sub) {
  const int64_t n = static_cast<int64_t>(v.size());
  if (n < kSerialShuffleBelow) {
    fisher_yates(v.data(), n, stream_key(seed, epoch, RngPurpose::kShuffleBlock, sub << 32));
    return;
  }
  int log2_blocks = 1;
  while (log2_blocks < 16 && (n >> log2_blocks) > kTargetBlock) ++log2_blocks;
  const int64_t blocks = int64_t{1} << log2_blocks;
  const int shift = 64 - log2_blocks;
  const uint64_t scatter_key = stream_key(seed, epoch, RngPurpose::kShuffleScatter, sub);
  const int64_t chunks = num_chunks(n);

  // 1. histogram of block labels per chunk
  std::vector<int64_t> offsets(static_cast<size_t>(chunks * blocks), 0);
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < chunks; ++c) {
    int64_t* hist = offsets.data() + c * blocks;
    const int64_t end = std::min(n, (c + 1) * kChunk);
    for (int64_t t = c * kChunk; t < end; ++t) ++hist[random_u64(scatter_key, static_cast<uint64_t>(t)) >> shift];
  }
  // 2. block-major exclusive prefix: block b's elements from chunk c go to offsets[c][b]
  std::vector<int64_t> block_start(static_cast<size_t>(blocks + 1), 0);
  int64_t running = 0;
  for (int64_t b = 0; b < blocks; ++b) {
    block_start[b] = running;
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t count = offsets[c * blocks + b];
      offsets[c * blocks + b] = running;
      running += count;
    }
  }
  block_start[blocks] = running;
  // 3. scatter (a stable scatter: the block contents depend only on the labels)
  std::vector<int64_t> scattered(static_cast<size_t>(n));
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < chunks; ++c) {
    int64_t* cursor = offsets.data() + c * blocks;
    const int64_t end = std::min(n, (c + 1) * kChunk);
    for (int64_t t = c * kChunk; t < end; ++t) {
      scattered[cursor[random_u64(scatter_key, static_cast<uint64_t>(t)) >> shift]++] = v[t];
    }
  }
  // 4. Fisher-Yates inside each block, each from its own stream
#pragma omp parallel for schedule(dynamic, 8)
  for (int64_t b = 0; b < blocks; ++b) {
    fisher_yates(scattered.data() + block_start[b], block_start[b + 1] - block_start[b],
                 stream_key(seed, epoch, RngPurpose::kShuffleBlock, (sub << 32) + static_cast<uint64_t>(b) + 1));
  }
  v.swap(scattered);
}

namespace {

// ---------------------------------------------------------------------------
// Shared machinery: per-sample copy counts -> expanded index list -> shuffle ->
// DistributedSampler-style shard with weights.

struct Expanded {
  std::vector<int64_t> ids;
  std::array<int64_t, kNumBuckets> category_draws{};
};

// copies_of(i) -> copies of id i (0..255); category_of(i) -> 0..kNumBuckets-1.
template <class CopiesFn, class CategoryFn>
Expanded expand(int64_t n, CopiesFn copies_of, CategoryFn category_of) {
  const int64_t chunks = num_chunks(n);
  std::vector<uint8_t> copies(static_cast<size_t>(n));
  std::vector<int64_t> chunk_start(static_cast<size_t>(chunks + 1), 0);
  std::vector<std::array<int64_t, kNumBuckets>> chunk_draws(static_cast<size_t>(chunks));
#pragma omp parallel for schedule(static) if (chunks > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t end = std::min(n, (c + 1) * kChunk);
    int64_t total = 0;
    std::array<int64_t, kNumBuckets> draws{};
    for (int64_t i = c * kChunk; i < end; ++i) {
      const uint8_t k = copies_of(i);
      copies[i] = k;
      total += k;
      draws[category_of(i)] += k;
    }
    chunk_start[c + 1] = total;
    chunk_draws[c] = draws;
  }
  Expanded out;
  for (int64_t c = 0; c < chunks; ++c) {
    chunk_start[c + 1] += chunk_start[c];
    for (int b = 0; b < kNumBuckets; ++b) out.category_draws[b] += chunk_draws[c][b];
  }
  out.ids.resize(static_cast<size_t>(chunk_start[chunks]));
#pragma omp parallel for schedule(static) if (chunks > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t end = std::min(n, (c + 1) * kChunk);
    int64_t pos = chunk_start[c];
    for (int64_t i = c * kChunk; i < end; ++i) {
      for (uint8_t r = 0; r < copies[i]; ++r) out.ids[pos++] = i;
    }
  }
  return out;
}

// ids: the global epoch in id space (all ranks hold the same list). index_of
// and weight_of map an id to the sample index and its importance weight.
// chunk_size >= 0 keeps only the first chunk_size entries of the shuffled plan:
// a uniformly random part of it, so scaling the weights by m / chunk_size keeps
// weighted sums unbiased. The global plan is then split by shard_plan, the one
// sharder of the project.
template <class IndexFn, class WeightFn>
PlanResult finish(std::vector<int64_t> ids, int64_t epoch, const ShardOptions& o, uint64_t shuffle_sub,
                  IndexFn index_of, WeightFn weight_of, int64_t chunk_size = -1) {
  if (o.shuffle) shuffle_in_place(ids, o.seed, static_cast<uint64_t>(epoch), shuffle_sub);
  const int64_t drawn = static_cast<int64_t>(ids.size());
  float scale = 1.0f;
  if (chunk_size >= 0 && chunk_size < drawn) {
    scale = chunk_size > 0 ? static_cast<float>(static_cast<double>(drawn) / static_cast<double>(chunk_size)) : 0.0f;
    ids.resize(static_cast<size_t>(chunk_size));
  }
  const int64_t m = static_cast<int64_t>(ids.size());
  std::vector<int64_t> indices(static_cast<size_t>(m));
  std::vector<float> weights(static_cast<size_t>(m));
  const int64_t chunks = num_chunks(m);
#pragma omp parallel for schedule(static) if (chunks > 1)
  for (int64_t j = 0; j < m; ++j) {
    indices[j] = index_of(ids[j]);
    weights[j] = weight_of(ids[j]) * scale;
  }
  PlanResult result;
  result.epoch_size = drawn;
  if (o.num_replicas == 1) {  // the global plan is this rank's: no copy
    result.total_size = m;
    result.real = m;
    result.indices = std::move(indices);
    result.weights = std::move(weights);
  } else {
    Shard shard = shard_plan(indices.data(), weights.data(), m, o.num_replicas, o.rank, o.drop_last);
    result.total_size = shard.total_size;
    result.real = shard.real;
    result.indices = std::move(shard.indices);
    result.weights = std::move(shard.weights);
  }
  return result;
}

// Draw count of a sample with rate c: floor(c) + Bernoulli(frac(c)).
inline uint8_t draw_copies(double whole, double frac, uint64_t key, int64_t i) {
  return static_cast<uint8_t>(whole) + (frac > 0.0 && random_unit(key, static_cast<uint64_t>(i)) < frac ? 1 : 0);
}

// Shuffle streams of the different plan kinds never coincide.
constexpr uint64_t kSubBuckets = 1, kSubInfoBatch = 2, kSubWindow = 3, kSubSystematic = 4;

}  // namespace

void ShardOptions::validate() const {
  require(num_replicas >= 1, "num_replicas must be >= 1, got " + std::to_string(num_replicas));
  require(rank >= 0 && rank < num_replicas,
          "rank must be in [0, num_replicas=" + std::to_string(num_replicas) + "), got " + std::to_string(rank));
}

Shard shard_plan(const int64_t* indices, const float* weights, int64_t m, int64_t num_replicas, int64_t rank,
                 bool drop_last) {
  require(m >= 0, "a plan must have >= 0 entries, got " + std::to_string(m));
  require(num_replicas >= 1, "num_replicas must be >= 1, got " + std::to_string(num_replicas));
  require(rank >= 0 && rank < num_replicas,
          "rank must be in [0, num_replicas=" + std::to_string(num_replicas) + "), got " + std::to_string(rank));
  const int64_t per_rank = drop_last ? m / num_replicas : (m + num_replicas - 1) / num_replicas;
  Shard out;
  out.total_size = per_rank * num_replicas;
  out.real = std::max<int64_t>(0, std::min<int64_t>(per_rank, (m - rank + num_replicas - 1) / num_replicas));
  out.indices.resize(static_cast<size_t>(per_rank));
  out.weights.resize(static_cast<size_t>(per_rank));
  const int64_t chunks = num_chunks(per_rank);
#pragma omp parallel for schedule(static) if (chunks > 1)
  for (int64_t j = 0; j < per_rank; ++j) {
    const int64_t pos = rank + j * num_replicas;
    if (pos < m) {
      out.indices[j] = indices[pos];
      out.weights[j] = weights[pos];
    } else {  // padding wraps around (pos >= m implies m > 0); it carries no weight
      out.indices[j] = indices[(pos - m) % m];
      out.weights[j] = 0.0f;
    }
  }
  return out;
}

int64_t freeze_revisit_count(double fraction, int64_t n_freeze) {
  require(std::isfinite(fraction) && fraction >= 0.0 && fraction <= 1.0,
          "freeze revisit fraction must be in [0, 1], got " + fmt(fraction));
  if (n_freeze <= 0 || fraction == 0.0) return 0;
  const double x = fraction * static_cast<double>(n_freeze);
  const int64_t k = static_cast<int64_t>(std::ceil(x - 1e-9 * std::max(1.0, x)));
  return std::clamp<int64_t>(k, 1, n_freeze);
}

EpochPlanner::EpochPlanner(int64_t num_samples, const ShardOptions& options)
    : num_samples_(num_samples), options_(options) {
  require(num_samples >= 0, "num_samples must be >= 0, got " + std::to_string(num_samples));
  options_.validate();
}

PlanResult EpochPlanner::plan(const int8_t* buckets, int64_t n, const std::array<double, kNumBuckets>& rates,
                              int64_t epoch, const int64_t* last_visit64, const int32_t* last_visit32,
                              int64_t chunk_size) const {
  // 1. validate everything before any work
  require(chunk_size >= -1, "chunk_size must be >= 0 (or absent), got " + std::to_string(chunk_size));
  require(chunk_size < 0 || options_.shuffle,
          "chunk_size needs shuffle=True: a chunk is the head of the shuffled epoch, a uniformly random part of it");
  require(n == num_samples_, "buckets has " + std::to_string(n) + " entries, the planner was built for num_samples=" +
                                 std::to_string(num_samples_));
  require(epoch >= 0, "epoch must be >= 0, got " + std::to_string(epoch));
  require(!(last_visit64 && last_visit32), "pass last_visit_step once (int32 or int64), not both");
  static const char* kNames[kNumBuckets] = {"FREEZE", "LIGHT", "FOCUS", "HARD", "UNSEEN"};
  for (int b = 0; b < kNumBuckets; ++b) {
    const double hi = b == kFreeze ? 1.0 : kMaxRate;
    require(std::isfinite(rates[b]) && rates[b] >= 0.0 && rates[b] <= hi,
            std::string("rate of ") + kNames[b] + " must be finite and in [0, " + fmt(hi) + "], got " + fmt(rates[b]));
    require(b == kFreeze || rates[b] == 0.0 || rates[b] >= kMinPositiveRate,  // FREEZE weighs n_freeze / k
            std::string("rate of ") + kNames[b] + " must be 0 or >= " + fmt(kMinPositiveRate) +
                " (its importance weight 1/rate must stay representable), got " + fmt(rates[b]));
  }
  int64_t n_freeze = 0;
  for (int64_t start = 0; start < n; start += 4096) {
    const int64_t end = std::min(n, start + 4096);
    uint8_t bad = 0;
    int64_t frozen = 0;
    for (int64_t i = start; i < end; ++i) {
      const uint8_t code = static_cast<uint8_t>(buckets[i]);
      bad |= static_cast<uint8_t>(code > kUnseen);
      frozen += code == kFreeze;
    }
    if (bad) {
      for (int64_t i = start; i < end; ++i) {
        if (buckets[i] < 0 || buckets[i] > kUnseen) {
          throw std::invalid_argument("buckets[" + std::to_string(i) + "] = " + std::to_string(int(buckets[i])) +
                                      " is not a bucket code (0..4: FREEZE, LIGHT, FOCUS, HARD, UNSEEN)");
        }
      }
    }
    n_freeze += frozen;
  }

  // 2. FREEZE revisits: the n_revisit stalest, ties (and everything, without
  // last_visit) ordered by a random key
  const uint64_t ep = static_cast<uint64_t>(epoch);
  const int64_t n_revisit = freeze_revisit_count(rates[kFreeze], n_freeze);
  std::vector<uint8_t> revisit;  // only when a strict subset is revisited
  if (n_revisit > 0 && n_revisit < n_freeze) {
    struct Candidate {
      int64_t staleness;
      uint64_t tie;
      int64_t index;
    };
    const uint64_t tie_key = stream_key(options_.seed, ep, RngPurpose::kFreezeTies);
    std::vector<Candidate> candidates;
    candidates.reserve(static_cast<size_t>(n_freeze));
    for (int64_t i = 0; i < n; ++i) {
      if (buckets[i] != kFreeze) continue;
      const int64_t last = last_visit64 ? last_visit64[i] : last_visit32 ? last_visit32[i] : 0;
      candidates.push_back({last, random_u64(tie_key, static_cast<uint64_t>(i)), i});
    }
    std::nth_element(candidates.begin(), candidates.begin() + (n_revisit - 1), candidates.end(),
                     [](const Candidate& a, const Candidate& b) {
                       return a.staleness != b.staleness ? a.staleness < b.staleness : a.tie < b.tie;
                     });
    revisit.assign(static_cast<size_t>(n), 0);
    for (int64_t j = 0; j < n_revisit; ++j) revisit[candidates[j].index] = 1;
  }
  const bool revisit_all = n_revisit > 0 && n_revisit == n_freeze;

  // 3. copies per sample and the expanded epoch
  std::array<double, kNumBuckets> whole{}, frac{};
  std::array<float, kNumBuckets> weight{};
  for (int b = 0; b < kNumBuckets; ++b) {
    whole[b] = std::floor(rates[b]);
    frac[b] = rates[b] - whole[b];
    weight[b] = rates[b] > 0.0 ? static_cast<float>(1.0 / rates[b]) : 0.0f;
  }
  weight[kFreeze] = n_revisit > 0 ? static_cast<float>(static_cast<double>(n_freeze) / static_cast<double>(n_revisit)) : 0.0f;
  const uint64_t copy_key = stream_key(options_.seed, ep, RngPurpose::kCopies);
  const uint8_t* revisit_mask = revisit.empty() ? nullptr : revisit.data();
  Expanded expanded = expand(
      n,
      [&](int64_t i) -> uint8_t {
        const int8_t b = buckets[i];
        if (b == kFreeze) return revisit_all || (revisit_mask && revisit_mask[i]) ? 1 : 0;
        return draw_copies(whole[b], frac[b], copy_key, i);
      },
      [&](int64_t i) { return static_cast<int>(buckets[i]); });

  // 4. shuffle, shard, weights
  PlanResult result = finish(
      std::move(expanded.ids), epoch, options_, kSubBuckets, [](int64_t i) { return i; },
      [&](int64_t i) { return weight[buckets[i]]; }, chunk_size);
  result.bucket_draws = expanded.category_draws;
  return result;
}

template <class T>
PlanResult infobatch_plan(const T* scores, int64_t n, int64_t epoch, int64_t num_epochs, double prune_ratio,
                          double delta, const ShardOptions& options) {
  options.validate();
  require(n >= 0, "scores must have >= 0 entries");
  require(num_epochs >= 1, "num_epochs must be >= 1, got " + std::to_string(num_epochs));
  require(epoch >= 0, "epoch must be >= 0, got " + std::to_string(epoch));
  require(std::isfinite(prune_ratio) && prune_ratio >= 0.0 && prune_ratio < 1.0,
          "prune_ratio must be in [0, 1), got " + fmt(prune_ratio));
  require(std::isfinite(delta) && delta >= 0.0 && delta <= 1.0, "delta must be in [0, 1], got " + fmt(delta));
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(static_cast<double>(scores[i]))) {
      throw std::invalid_argument("scores[" + std::to_string(i) + "] = " + fmt(static_cast<double>(scores[i])) +
                                  " is not finite");
    }
  }
  // Mean from fixed chunks summed in order: the same bits for any thread count.
  const int64_t chunks = num_chunks(n);
  std::vector<double> partial(static_cast<size_t>(chunks), 0.0);
#pragma omp parallel for schedule(static) if (chunks > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    double s = 0.0;
    for (int64_t i = c * kChunk; i < std::min(n, (c + 1) * kChunk); ++i) s += static_cast<double>(scores[i]);
    partial[c] = s;
  }
  double total = 0.0;
  for (double s : partial) total += s;
  const double mean = n > 0 ? total / static_cast<double>(n) : 0.0;

  const bool pruning = static_cast<double>(epoch) < delta * static_cast<double>(num_epochs);
  const double keep = 1.0 - prune_ratio;
  const float well_learned_weight = pruning ? static_cast<float>(1.0 / keep) : 1.0f;
  const uint64_t key = stream_key(options.seed, static_cast<uint64_t>(epoch), RngPurpose::kInfoBatch);
  auto well_learned = [&](int64_t i) { return static_cast<double>(scores[i]) < mean; };
  // Categories: kLight = well learned, kFocus = the rest (draw counts only).
  Expanded expanded = expand(
      n,
      [&](int64_t i) -> uint8_t {
        if (!pruning || !well_learned(i)) return 1;
        return random_unit(key, static_cast<uint64_t>(i)) < keep ? 1 : 0;
      },
      [&](int64_t i) { return well_learned(i) ? static_cast<int>(kLight) : static_cast<int>(kFocus); });
  PlanResult result = finish(
      std::move(expanded.ids), epoch, options, kSubInfoBatch, [](int64_t i) { return i; },
      [&](int64_t i) { return well_learned(i) ? well_learned_weight : 1.0f; });
  result.bucket_draws = expanded.category_draws;
  return result;
}

template PlanResult infobatch_plan<float>(const float*, int64_t, int64_t, int64_t, double, double, const ShardOptions&);
template PlanResult infobatch_plan<double>(const double*, int64_t, int64_t, int64_t, double, double, const ShardOptions&);

namespace {

// Sum of f(i) over [0, n) from fixed chunks combined in order.
template <class F>
double chunked_sum(int64_t n, F f) {
  const int64_t chunks = num_chunks(n);
  std::vector<double> partial(static_cast<size_t>(chunks), 0.0);
#pragma omp parallel for schedule(static) if (chunks > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    double s = 0.0;
    for (int64_t i = c * kChunk; i < std::min(n, (c + 1) * kChunk); ++i) s += f(i);
    partial[c] = s;
  }
  double total = 0.0;
  for (double s : partial) total += s;
  return total;
}

// Inclusion probabilities of systematic PPS: pi_i = min(1, w_i * k_rem / s_rem)
// where the capped set {w >= threshold} and (k_rem, s_rem) are consistent.
struct Capping {
  double threshold = std::numeric_limits<double>::infinity();  // w >= threshold -> pi = 1
  double scale = 0.0;                                          // pi = w * scale below it
};

template <class T>
Capping solve_capping(const T* w, int64_t n, int64_t k, double total) {
  Capping cap;
  int64_t capped = 0;
  double rest = total;
  for (int iteration = 0; iteration < 32; ++iteration) {
    const int64_t k_rest = k - capped;
    if (k_rest == 0) {
      cap.scale = 0.0;
      return cap;
    }
    const double t = rest / static_cast<double>(k_rest);
    // Capped sets grow as t falls; at most k_rest weights reach t.
    int64_t count = 0;
    const int64_t chunks = num_chunks(n);
    std::vector<int64_t> counts(static_cast<size_t>(chunks), 0);
#pragma omp parallel for schedule(static) if (chunks > 1)
    for (int64_t c = 0; c < chunks; ++c) {
      int64_t local = 0;
      for (int64_t i = c * kChunk; i < std::min(n, (c + 1) * kChunk); ++i) local += static_cast<double>(w[i]) >= t;
      counts[c] = local;
    }
    for (int64_t x : counts) count += x;
    if (count == capped) {
      cap.threshold = capped > 0 ? cap.threshold : std::numeric_limits<double>::infinity();
      cap.scale = static_cast<double>(k_rest) / rest;
      return cap;
    }
    capped = count;
    cap.threshold = t;
    rest = chunked_sum(n, [&](int64_t i) { const double x = static_cast<double>(w[i]); return x < t ? x : 0.0; });
  }
  // Slowly converging weights (e.g. geometric): sort once, scan for the cap.
  std::vector<double> sorted;
  sorted.reserve(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    if (w[i] > 0) sorted.push_back(static_cast<double>(w[i]));
  }
  std::sort(sorted.begin(), sorted.end(), std::greater<double>());
  std::vector<double> suffix(sorted.size() + 1, 0.0);
  for (size_t j = sorted.size(); j-- > 0;) suffix[j] = suffix[j + 1] + sorted[j];
  for (int64_t m = 0; m < k; ++m) {  // m = number capped
    const double t = suffix[m] / static_cast<double>(k - m);
    if (sorted[m] < t) {  // first m with the (m+1)-th largest below its cap; then sorted[m - 1] >= t
      cap.threshold = m > 0 ? t : std::numeric_limits<double>::infinity();
      cap.scale = static_cast<double>(k - m) / suffix[m];
      return cap;
    }
  }
  cap.threshold = sorted[k - 1];
  cap.scale = 0.0;
  return cap;
}

}  // namespace

template <class T>
WeightedSampleResult weighted_sample(const T* w, int64_t n, int64_t k, uint64_t seed, uint64_t epoch,
                                     WeightedMethod method) {
  require(n >= 0, "weights must have >= 0 entries");
  int64_t positive = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double x = static_cast<double>(w[i]);
    if (!(std::isfinite(x) && x >= 0.0)) {  // message built only on failure: this loop is hot
      throw std::invalid_argument("weights[" + std::to_string(i) + "] = " + fmt(x) + " must be finite and >= 0");
    }
    positive += x > 0.0;
  }
  require(k >= 0 && k <= positive, "k must be in [0, number of positive weights = " + std::to_string(positive) +
                                       "], got " + std::to_string(k));
  WeightedSampleResult out;
  if (k == 0) return out;
  const uint64_t key = stream_key(seed, epoch, RngPurpose::kWeightedKeys);

  if (method == WeightedMethod::kExponential) {
    // 1. keys E_i / w_i with E_i ~ Exp(1); the k smallest win
    std::vector<double> keys(static_cast<size_t>(n));
    const double inf = std::numeric_limits<double>::infinity();
#pragma omp parallel for schedule(static) if (n > kChunk)
    for (int64_t i = 0; i < n; ++i) {
      const double x = static_cast<double>(w[i]);
      keys[i] = x > 0.0 ? -std::log(random_unit_open0(key, static_cast<uint64_t>(i))) / x : inf;
    }
    std::vector<double> order(keys);
    std::nth_element(order.begin(), order.begin() + (k - 1), order.end());
    const double kth = order[k - 1];
    // 2. tau = (k+1)-th smallest key: the rank-conditioned inclusion 1 - exp(-w tau)
    const double tau = k < positive ? *std::min_element(order.begin() + k, order.end()) : inf;
    std::vector<double>().swap(order);
    int64_t below = 0;
    for (int64_t i = 0; i < n; ++i) below += keys[i] < kth;
    int64_t ties_needed = k - below;
    out.indices.reserve(static_cast<size_t>(k));
    out.inclusion.reserve(static_cast<size_t>(k));
    for (int64_t i = 0; i < n; ++i) {
      if (keys[i] < kth || (keys[i] == kth && ties_needed-- > 0)) {
        out.indices.push_back(i);
        out.inclusion.push_back(k < positive ? -std::expm1(-static_cast<double>(w[i]) * tau) : 1.0);
      }
    }
    return out;
  }

  // Systematic PPS over a random order of the positive-weight indices.
  // 1. inclusion probabilities with the cap at 1
  const double total_weight = chunked_sum(n, [&](int64_t i) { return static_cast<double>(w[i]); });
  const Capping cap = solve_capping(w, n, k, total_weight);
  auto pi_of = [&](int64_t i) {
    const double x = static_cast<double>(w[i]);
    return x >= cap.threshold ? 1.0 : std::min(1.0, x * cap.scale);
  };
  // 2. random order
  std::vector<int64_t> perm;
  perm.reserve(static_cast<size_t>(positive));
  for (int64_t i = 0; i < n; ++i) {
    if (w[i] > 0) perm.push_back(i);
  }
  shuffle_in_place(perm, seed, epoch, kSubSystematic);
  // 3. points (u + j) * total / k, j < k, over the running sum of pi in that
  // order; a unit is drawn when a point falls in its interval. Chunk ends use
  // the exact chunk prefix so that the counts telescope to k.
  const int64_t m = positive;
  const int64_t chunks = num_chunks(m);
  std::vector<double> prefix(static_cast<size_t>(chunks + 1), 0.0);
  std::vector<double> pi_in_order(static_cast<size_t>(m));  // gathered once: the walk below reads it in order
#pragma omp parallel for schedule(static) if (chunks > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    double s = 0.0;
    for (int64_t j = c * kChunk; j < std::min(m, (c + 1) * kChunk); ++j) {
      pi_in_order[j] = pi_of(perm[j]);
      s += pi_in_order[j];
    }
    prefix[c + 1] = s;
  }
  for (int64_t c = 0; c < chunks; ++c) prefix[c + 1] += prefix[c];
  const double total_pi = prefix[chunks];
  const double u = random_unit(key, 0);
  const double points_per_unit = static_cast<double>(k) / total_pi;
  auto points_below = [&](double x) {
    const double y = std::ceil(x * points_per_unit - u);
    return y <= 0.0 ? int64_t{0} : std::min<int64_t>(k, static_cast<int64_t>(y));
  };
  std::vector<uint8_t> drawn(static_cast<size_t>(m), 0);
  std::vector<int64_t> drawn_per_chunk(static_cast<size_t>(chunks + 1), 0);
#pragma omp parallel for schedule(static) if (chunks > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t end = std::min(m, (c + 1) * kChunk);
    double cum = prefix[c];
    int64_t before = points_below(cum);
    int64_t local = 0;
    for (int64_t j = c * kChunk; j < end; ++j) {
      cum = j + 1 == end ? prefix[c + 1] : std::min(cum + pi_in_order[j], prefix[c + 1]);
      const int64_t after = points_below(cum);
      if (after > before) {
        drawn[j] = 1;
        ++local;
      }
      before = after;
    }
    drawn_per_chunk[c + 1] = local;
  }
  int64_t got = 0;
  for (int64_t c = 0; c < chunks; ++c) got += drawn_per_chunk[c + 1];
  out.indices.reserve(static_cast<size_t>(k));
  out.inclusion.reserve(static_cast<size_t>(k));
  for (int64_t j = 0; j < m; ++j) {
    if (drawn[j]) {
      out.indices.push_back(perm[j]);
      out.inclusion.push_back(pi_in_order[j]);
    }
  }
  // Rounding can, in principle, put two points in one unit of probability ~1;
  // fill such a shortfall with the largest undrawn inclusion probabilities.
  if (got < k) {
    std::vector<int64_t> rest;
    for (int64_t j = 0; j < m; ++j) {
      if (!drawn[j]) rest.push_back(perm[j]);
    }
    const int64_t need = k - got;
    std::nth_element(rest.begin(), rest.begin() + (need - 1), rest.end(),
                     [&](int64_t a, int64_t b) { return pi_of(a) != pi_of(b) ? pi_of(a) > pi_of(b) : a < b; });
    for (int64_t j = 0; j < need; ++j) {
      out.indices.push_back(rest[j]);
      out.inclusion.push_back(pi_of(rest[j]));
    }
  }
  return out;
}

template WeightedSampleResult weighted_sample<float>(const float*, int64_t, int64_t, uint64_t, uint64_t, WeightedMethod);
template WeightedSampleResult weighted_sample<double>(const double*, int64_t, int64_t, uint64_t, uint64_t, WeightedMethod);

PlanResult gaussian_window_plan(const int64_t* order, int64_t n, double mu, double sigma, int64_t k, int64_t epoch,
                                WeightedMethod method, const ShardOptions& options) {
  options.validate();
  require(n >= 0, "order must have >= 0 entries");
  require(epoch >= 0, "epoch must be >= 0, got " + std::to_string(epoch));
  require(std::isfinite(mu), "mu must be finite, got " + fmt(mu));
  require(std::isfinite(sigma) && sigma > 0.0, "sigma must be positive and finite, got " + fmt(sigma));
  require(k >= 0 && k <= n, "num_samples_to_draw must be in [0, len(order)=" + std::to_string(n) + "], got " +
                                std::to_string(k));
  for (int64_t j = 0; j < n; ++j) {
    if (order[j] < 0) {
      throw std::invalid_argument("order[" + std::to_string(j) + "] = " + std::to_string(order[j]) + " is negative");
    }
  }
  std::vector<double> window(static_cast<size_t>(n));
  const double inv = 1.0 / (2.0 * sigma * sigma);
  int64_t positive = 0;
  for (int64_t j = 0; j < n; ++j) {
    const double d = static_cast<double>(j) - mu;
    window[j] = std::exp(-d * d * inv);
    positive += window[j] > 0.0;
  }
  require(k <= positive, "only " + std::to_string(positive) + " positions have a nonzero window weight around mu=" +
                             fmt(mu) + " with sigma=" + fmt(sigma) + "; cannot draw " + std::to_string(k));
  WeightedSampleResult drawn = weighted_sample(window.data(), n, k, options.seed, static_cast<uint64_t>(epoch), method);
  std::vector<int64_t> slots(drawn.indices.size());
  for (size_t s = 0; s < slots.size(); ++s) slots[s] = static_cast<int64_t>(s);
  return finish(
      std::move(slots), epoch, options, kSubWindow, [&](int64_t s) { return order[drawn.indices[s]]; },
      [&](int64_t s) { return static_cast<float>(1.0 / drawn.inclusion[s]); });
}

}  // namespace geko
