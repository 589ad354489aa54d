#include "geko/sample_table.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <stdexcept>
#include <string>

#ifdef __linux__
#include <sys/mman.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

namespace geko {

namespace {

constexpr size_t kHugePage = size_t{2} << 20;
// A batch smaller than this is applied by one thread: a parallel region costs
// more than it saves.
constexpr size_t kMinParallelBatch = size_t{1} << 15;
// Records requested this many batch positions ahead of the one being applied:
// enough misses in flight to cover DRAM latency (on a 10 M-sample table, one
// thread goes from ~20 to ~55 M random updates/s).
constexpr size_t kPrefetchDistance = 16;

inline void prefetch_for_write(const void* address) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(address, 1, 3);
#else
  (void)address;
#endif
}

// Bit-exact arithmetic whatever the compiler contracts into FMAs: the rule's
// coefficients are rounded to float, so each product of a coefficient and a
// stored float is exact in double, and a sum of two such products is rounded
// once (fused or not) before the one rounding to float. The numpy oracle
// (geko_core/reference_table.py) reproduces every stored value bit for bit.
// Stored values are clamped to the float range: the difference of two extreme
// losses can exceed it.
inline float to_stored_float(double value) {
  return static_cast<float>(std::min(std::max(value, -static_cast<double>(FLT_MAX)), static_cast<double>(FLT_MAX)));
}

struct RuleParams {
  explicit RuleParams(const Config& c)
      : config(c),
        loss_scale(c.loss_scale),
        q_keep(static_cast<float>(1.0 - c.q_alpha)),
        q_take(static_cast<float>(c.q_alpha)),
        ema_keep(static_cast<float>(c.loss_ema_beta)),
        ema_take(static_cast<float>(1.0 - c.loss_ema_beta)),
        diff_keep(static_cast<float>(c.loss_diff_ema_beta)),
        diff_take(static_cast<float>(1.0 - c.loss_diff_ema_beta)),
        freeze_q(static_cast<float>(c.freeze_q)),
        noise_guard_visits(c.noise_guard_visits) {}
  Config config;
  double loss_scale;
  float q_keep, q_take, ema_keep, ema_take, diff_keep, diff_take;
  float freeze_q;
  int32_t noise_guard_visits;
};

// keep * a + take * b, each product exact in double, rounded once.
inline double blend(float keep, float a, float take, float b) {
  return static_cast<double>(keep) * static_cast<double>(a) + static_cast<double>(take) * static_cast<double>(b);
}

// One update of one sample with finite statistics (DESIGN.md §3).
inline void apply_update(SampleRecord& r, float loss, float confidence, float correct, int32_t step,
                         const RuleParams& p) {
  // 1. Q-value: reward 1 for a zero loss, 0 from loss_scale on. The clamp only
  //    absorbs the rounding of the float coefficients (q_keep + q_take may be 1 + 1 ulp).
  const double loss_d = loss;
  const float reward = static_cast<float>(1.0 - std::min(std::max(loss_d, 0.0) / p.loss_scale, 1.0));
  const float q = static_cast<float>(std::min(std::max(blend(p.q_keep, r.q, p.q_take, reward), 0.0), 1.0));
  r.q = q;
  // 2. Loss EMAs (ES): seeded by the first loss; the difference needs a previous loss.
  if (r.visits == 0) {
    r.loss_ema = loss;
    r.loss_diff_ema = 0.0f;
  } else {
    const float diff = to_stored_float(loss_d - static_cast<double>(r.last_loss));
    r.loss_diff_ema = to_stored_float(blend(p.diff_keep, r.loss_diff_ema, p.diff_take, diff));
    r.loss_ema = to_stored_float(blend(p.ema_keep, r.loss_ema, p.ema_take, loss));
  }
  // 3. Bucket: the instant bucket, FREEZE gated by Q, HARD lowered to FOCUS by
  //    the noise guard once a sample has stayed HARD too long.
  int8_t bucket = instant_bucket(confidence, correct, p.config);
  uint8_t streak = 0;
  if (bucket == kHard) streak = r.hard_streak == UINT8_MAX ? UINT8_MAX : static_cast<uint8_t>(r.hard_streak + 1);
  uint8_t flags = static_cast<uint8_t>(r.flags & ~kFlagSuspectedNoisy);
  if (bucket == kFreeze && q < p.freeze_q) {
    bucket = kLight;
  } else if (bucket == kHard && p.noise_guard_visits > 0 && streak >= p.noise_guard_visits) {
    bucket = kFocus;
    flags |= kFlagSuspectedNoisy;
  }
  r.bucket = bucket;
  r.hard_streak = streak;
  r.flags = flags;
  // 4. History.
  if (r.visits != UINT32_MAX) ++r.visits;
  r.last_step = step;
  r.last_loss = loss;
  r.last_confidence = confidence;
  r.last_correct = static_cast<uint8_t>(std::nearbyint(static_cast<double>(correct) * 255.0));
}

inline bool all_finite(float a, float b, float c) { return std::isfinite(a) && std::isfinite(b) && std::isfinite(c); }

// A finite value outside [0, 1] is an error; NaN and +-inf are skipped samples.
inline bool finite_outside_unit(float v) {
  return (v < 0.0f && v >= -FLT_MAX) || (v > 1.0f && v <= FLT_MAX);
}

template <typename Index>
inline bool index_out_of_range(Index index, int64_t num_samples) {
  return static_cast<uint64_t>(static_cast<int64_t>(index)) >= static_cast<uint64_t>(num_samples);
}

template <typename Index>
void check_indices(const Index* indices, size_t count, int64_t num_samples) {
  bool bad = false;
  for (size_t i = 0; i < count; ++i) bad |= index_out_of_range(indices[i], num_samples);
  if (!bad) return;
  for (size_t i = 0; i < count; ++i) {
    if (index_out_of_range(indices[i], num_samples)) {
      throw std::out_of_range("index " + std::to_string(static_cast<int64_t>(indices[i])) + " at position " +
                              std::to_string(i) + " is out of range for a table of " +
                              std::to_string(num_samples) + " samples");
    }
  }
}

void check_unit_interval(const float* values, size_t count, const char* name) {
  bool bad = false;
  for (size_t i = 0; i < count; ++i) bad |= finite_outside_unit(values[i]);
  if (!bad) return;
  for (size_t i = 0; i < count; ++i) {
    if (finite_outside_unit(values[i])) {
      throw std::invalid_argument(std::string(name) + "[" + std::to_string(i) + "] = " + std::to_string(values[i]) +
                                  " is outside [0, 1]");
    }
  }
}

void check_num_threads(int num_threads) {
  if (num_threads < 0 || num_threads > kMaxThreads) {
    throw std::invalid_argument("num_threads must be in [0, " + std::to_string(kMaxThreads) + "] (0: OpenMP's default), got " +
                                std::to_string(num_threads));
  }
}

// Applies the updates whose index lies in [lo, lo + span), in batch order.
// Each thread owns one range of the table, so no record is touched by two
// threads and every sample sees its updates in order.
template <typename Index>
void apply_range(SampleRecord* records, const Index* indices, const float* loss, const float* confidence,
                 const float* correct, size_t count, int32_t step, const RuleParams& params, uint64_t lo,
                 uint64_t span, uint64_t& applied, uint64_t& skipped) {
  for (size_t i = 0; i < count; ++i) {
    if (i + kPrefetchDistance < count) {
      const uint64_t ahead = static_cast<uint64_t>(indices[i + kPrefetchDistance]);
      if (ahead - lo < span) prefetch_for_write(records + ahead);
    }
    const uint64_t index = static_cast<uint64_t>(indices[i]);
    if (index - lo >= span) continue;
    if (!all_finite(loss[i], confidence[i], correct[i])) {
      ++skipped;
      continue;
    }
    apply_update(records[index], loss[i], confidence[i], correct[i], step, params);
    ++applied;
  }
}

}  // namespace

SampleRecord unseen_record(const Config& config) {
  SampleRecord r;
  std::memset(&r, 0, sizeof(r));
  r.q = static_cast<float>(config.q_init);
  r.last_step = -1;
  r.bucket = kUnseen;
  return r;
}

const std::vector<FieldInfo>& record_fields() {
#define GEKO_FIELD(name, kind) FieldInfo{#name, offsetof(SampleRecord, name), sizeof(SampleRecord::name), kind}
  static const std::vector<FieldInfo> fields = {
      GEKO_FIELD(q, 'f'),          GEKO_FIELD(loss_ema, 'f'),        GEKO_FIELD(loss_diff_ema, 'f'),
      GEKO_FIELD(last_loss, 'f'),  GEKO_FIELD(last_confidence, 'f'), GEKO_FIELD(visits, 'u'),
      GEKO_FIELD(last_step, 'i'),  GEKO_FIELD(last_correct, 'u'),    GEKO_FIELD(bucket, 'i'),
      GEKO_FIELD(hard_streak, 'u'), GEKO_FIELD(flags, 'u'),
  };
#undef GEKO_FIELD
  return fields;
}

std::string check_record(const SampleRecord& r) {
  if (r.bucket < kFreeze || r.bucket > kUnseen) return "bucket code " + std::to_string(r.bucket) + " is not in [0, 4]";
  if (r.flags & ~kKnownFlags) return "flags " + std::to_string(r.flags) + " hold unknown bits";
  if (!(std::isfinite(r.q) && r.q >= 0.0f && r.q <= 1.0f)) return "q " + std::to_string(r.q) + " is not in [0, 1]";
  if (r.visits == 0) {
    if (r.bucket != kUnseen) return "a never-updated sample (visits 0) has bucket " + std::to_string(r.bucket);
    if (r.last_step != -1) return "a never-updated sample (visits 0) has last_step " + std::to_string(r.last_step);
    if (r.hard_streak != 0 || r.flags != 0) return "a never-updated sample (visits 0) has a HARD streak or flags";
    return "";
  }
  if (r.bucket == kUnseen) return "an updated sample (visits " + std::to_string(r.visits) + ") has bucket UNSEEN";
  if (r.last_step < 0) return "an updated sample has last_step " + std::to_string(r.last_step);
  if (!(std::isfinite(r.loss_ema) && std::isfinite(r.loss_diff_ema) && std::isfinite(r.last_loss))) {
    return "a loss field is not finite";
  }
  if (!(std::isfinite(r.last_confidence) && r.last_confidence >= 0.0f && r.last_confidence <= 1.0f)) {
    return "last_confidence " + std::to_string(r.last_confidence) + " is not in [0, 1]";
  }
  if (r.bucket == kHard && r.hard_streak == 0) return "bucket HARD with a zero HARD streak";
  if (r.hard_streak != 0 && r.bucket != kHard && r.bucket != kFocus) {
    return "a HARD streak of " + std::to_string(r.hard_streak) + " on a sample in bucket " + std::to_string(r.bucket);
  }
  if ((r.flags & kFlagSuspectedNoisy) && (r.bucket != kFocus || r.hard_streak == 0)) {
    return "the suspected-noisy flag is set on a sample that is not a FOCUS sample with a HARD streak";
  }
  return "";
}

int SampleTable::threads_for(size_t work) const {
#ifdef _OPENMP
  if (work < kMinParallelBatch) return 1;
  return num_threads_ == 0 ? std::max(1, omp_get_max_threads()) : num_threads_;
#else
  (void)work;
  return 1;
#endif
}

int SampleTable::num_threads() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return num_threads_;
}

void SampleTable::set_num_threads(int num_threads) {
  check_num_threads(num_threads);
  std::lock_guard<std::mutex> lock(mutex_);
  num_threads_ = num_threads;
}

SampleTable::SampleTable(int64_t num_samples, const Config& config, int num_threads)
    : num_samples_(num_samples), config_(config), num_threads_(num_threads) {
  config_.validate();
  check_num_threads(num_threads);
  const int64_t max_samples = static_cast<int64_t>(std::numeric_limits<size_t>::max() / (2 * sizeof(SampleRecord)));
  if (num_samples < 1 || num_samples > max_samples) {
    throw std::invalid_argument("num_samples must be in [1, " + std::to_string(max_samples) + "], got " +
                                std::to_string(num_samples));
  }
  const size_t bytes = nbytes();
  // Large tables: 2 MiB aligned and backed by huge pages when the kernel allows
  // it (one TLB entry covers 65536 records instead of 128).
  const size_t alignment = bytes >= kHugePage ? kHugePage : alignof(SampleRecord);
  allocation_bytes_ = (bytes + alignment - 1) / alignment * alignment;
  void* memory = std::aligned_alloc(alignment, allocation_bytes_);
  if (memory == nullptr) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (alignment == kHugePage) madvise(memory, allocation_bytes_, MADV_HUGEPAGE);  // a hint: failure is harmless
#endif
  records_ = static_cast<SampleRecord*>(memory);
  const SampleRecord blank = unseen_record(config_);
  const int64_t n = num_samples_;
  SampleRecord* records = records_;
  // First touch in parallel, so the pages spread over the threads that update them.
#pragma omp parallel for schedule(static) num_threads(threads_for(static_cast<size_t>(n)))
  for (int64_t i = 0; i < n; ++i) records[i] = blank;
}

SampleTable::~SampleTable() { std::free(records_); }

template <typename Index>
void SampleTable::update(const Index* indices, const float* loss, const float* confidence, const float* correct,
                         size_t count, int64_t step) {
  if (step < 0 || step > kMaxStep) {
    throw std::invalid_argument("step must be in [0, " + std::to_string(kMaxStep) + "], got " + std::to_string(step));
  }
  std::lock_guard<std::mutex> lock(mutex_);
  check_indices(indices, count, num_samples_);
  check_unit_interval(confidence, count, "confidence");
  check_unit_interval(correct, count, "correct");

  const RuleParams params(config_);
  const int32_t step32 = static_cast<int32_t>(step);
  uint64_t applied = 0;
  uint64_t skipped = 0;
  const int threads = threads_for(count);
  SampleRecord* records = records_;
  const uint64_t n = static_cast<uint64_t>(num_samples_);
  if (threads == 1) {
    apply_range(records, indices, loss, confidence, correct, count, step32, params, 0, n, applied, skipped);
  } else {
#pragma omp parallel num_threads(threads) reduction(+ : applied, skipped)
    {
#ifdef _OPENMP
      const uint64_t t = static_cast<uint64_t>(omp_get_thread_num());
      const uint64_t workers = static_cast<uint64_t>(omp_get_num_threads());
#else
      const uint64_t t = 0, workers = 1;
#endif
      const uint64_t lo = n * t / workers;
      const uint64_t hi = n * (t + 1) / workers;
      apply_range(records, indices, loss, confidence, correct, count, step32, params, lo, hi - lo, applied, skipped);
    }
  }
  counters_.updates += applied;
  counters_.nonfinite_skipped += skipped;
}

template <typename Index>
void SampleTable::buckets(const Index* indices, size_t count, int8_t* out) const {
  std::lock_guard<std::mutex> lock(mutex_);
  check_indices(indices, count, num_samples_);
  const SampleRecord* records = records_;
  const int64_t m = static_cast<int64_t>(count);
#pragma omp parallel for schedule(static) num_threads(threads_for(count))
  for (int64_t i = 0; i < m; ++i) out[i] = records[indices[i]].bucket;
}

BucketCounts SampleTable::bucket_counts() const {
  std::lock_guard<std::mutex> lock(mutex_);
  BucketCounts counts{};
  const SampleRecord* records = records_;
  const int64_t n = num_samples_;
#pragma omp parallel num_threads(threads_for(static_cast<size_t>(n)))
  {
    // Every code is in [0, kNumBuckets): update() and load() keep it so.
    int64_t local[kNumBuckets] = {};
#pragma omp for schedule(static) nowait
    for (int64_t i = 0; i < n; ++i) ++local[static_cast<uint8_t>(records[i].bucket)];
#pragma omp critical(geko_bucket_counts)
    for (int b = 0; b < kNumBuckets; ++b) counts[b] += local[b];
  }
  return counts;
}

void SampleTable::copy_field(const std::string& name, void* out) const {
  const auto& fields = record_fields();
  const auto it = std::find_if(fields.begin(), fields.end(), [&](const FieldInfo& f) { return name == f.name; });
  if (it == fields.end()) throw std::invalid_argument("unknown field " + name);
  std::lock_guard<std::mutex> lock(mutex_);
  const auto* base = reinterpret_cast<const unsigned char*>(records_) + it->offset;
  auto* dst = static_cast<unsigned char*>(out);
  const int64_t n = num_samples_;
  const size_t size = it->size;
#pragma omp parallel for schedule(static) num_threads(threads_for(static_cast<size_t>(n)))
  for (int64_t i = 0; i < n; ++i) {
    std::memcpy(dst + static_cast<size_t>(i) * size, base + static_cast<size_t>(i) * sizeof(SampleRecord), size);
  }
}

void SampleTable::load(const void* records, size_t nbytes_in, const Config& config, const TableCounters& counters) {
  config.validate();
  if (nbytes_in != nbytes()) {
    throw std::invalid_argument("expected " + std::to_string(nbytes()) + " bytes of records (" +
                                std::to_string(num_samples_) + " samples), got " + std::to_string(nbytes_in));
  }
  // Validate from an unaligned source: copy each record out before reading it.
  const auto* src = static_cast<const unsigned char*>(records);
  const int64_t n = num_samples_;
  int64_t first_bad = n;
  int threads;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    threads = threads_for(static_cast<size_t>(n));
  }
#pragma omp parallel for schedule(static) reduction(min : first_bad) num_threads(threads)
  for (int64_t i = 0; i < n; ++i) {
    SampleRecord r;
    std::memcpy(&r, src + static_cast<size_t>(i) * sizeof(SampleRecord), sizeof(r));
    if (i < first_bad && !check_record(r).empty()) first_bad = i;
  }
  if (first_bad < n) {
    SampleRecord r;
    std::memcpy(&r, src + static_cast<size_t>(first_bad) * sizeof(SampleRecord), sizeof(r));
    throw std::invalid_argument("sample " + std::to_string(first_bad) + ": " + check_record(r));
  }
  std::lock_guard<std::mutex> lock(mutex_);
  std::memcpy(static_cast<void*>(records_), records, nbytes_in);
  config_ = config;
  counters_ = counters;
}

Config SampleTable::config() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return config_;
}

TableCounters SampleTable::counters() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return counters_;
}

template void SampleTable::update<int32_t>(const int32_t*, const float*, const float*, const float*, size_t, int64_t);
template void SampleTable::update<int64_t>(const int64_t*, const float*, const float*, const float*, size_t, int64_t);
template void SampleTable::buckets<int32_t>(const int32_t*, size_t, int8_t*) const;
template void SampleTable::buckets<int64_t>(const int64_t*, size_t, int8_t*) const;

}  // namespace geko
