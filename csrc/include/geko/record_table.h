// What the compiled tables share (SampleTable, RolloutTable): one 32-byte aligned record per
// sample in one block, checked indices, steps and thread counts, and the scans that do not
// depend on a record's meaning (bucket counts, one field copied out, a load validated record
// by record). Each table keeps its own record, update rule and check_record().
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "geko/config.h"

namespace geko {

// Steps are stored as int32: a step must lie in [0, kMaxStep]; -1 in a record's last_step
// means "never updated".
constexpr int64_t kMaxStep = INT32_MAX;
constexpr int kMaxThreads = 1024;
// Both tables' records are 32 bytes, aligned to half a cache line.
constexpr size_t kRecordSize = 32;

// One field of a record, described for the bindings, state dicts and files.
struct FieldInfo {
  const char* name;
  size_t offset;
  size_t size;
  char kind;  // 'f' float, 'u' unsigned, 'i' signed (numpy dtype kinds)
};

// Number of samples per bucket code (FREEZE, LIGHT, FOCUS, HARD, UNSEEN).
using BucketCounts = std::array<int64_t, kNumBuckets>;

namespace detail {

// std::invalid_argument outside [0, kMaxThreads].
void check_num_threads(int num_threads);
// std::invalid_argument outside [0, kMaxStep].
void check_step(int64_t step);
// std::invalid_argument for num_samples outside [1, the most a size_t can address twice over].
void check_num_samples(int64_t num_samples, size_t record_size);
// OpenMP threads for `work` items: 1 below the size where a parallel region pays.
int threads_for(size_t work, int num_threads);

template <typename Index>
inline bool index_out_of_range(Index index, int64_t num_samples) {
  return static_cast<uint64_t>(static_cast<int64_t>(index)) >= static_cast<uint64_t>(num_samples);
}

// std::out_of_range naming the first index outside [0, num_samples) and its position.
template <typename Index>
void check_indices(const Index* indices, size_t count, int64_t num_samples) {
  bool bad = false;
  for (size_t i = 0; i < count; ++i) bad |= index_out_of_range(indices[i], num_samples);
  if (!bad) return;
  for (size_t i = 0; i < count; ++i) {
    if (index_out_of_range(indices[i], num_samples)) {
      throw std::out_of_range("index " + std::to_string(static_cast<int64_t>(indices[i])) + " at position " +
                              std::to_string(i) + " is out of range for a table of " + std::to_string(num_samples) +
                              " samples");
    }
  }
}

// The block of records: aligned to the record, or to a huge page (and advised to use huge
// pages on Linux) when the table spans at least one, so random updates do not also pay a
// page walk per access. Never moves while it lives.
class RecordBlock {
 public:
  RecordBlock(size_t count, size_t record_size);
  ~RecordBlock();
  RecordBlock(const RecordBlock&) = delete;
  RecordBlock& operator=(const RecordBlock&) = delete;
  void* data() const { return memory_; }

 private:
  void* memory_ = nullptr;
};

// The field called `name`; std::invalid_argument for an unknown name.
const FieldInfo& find_field(const std::vector<FieldInfo>& fields, const std::string& name);

// Copies one field of `count` records (record_size bytes apart) into out, densely.
void copy_field(const void* records, size_t record_size, int64_t count, const FieldInfo& field, void* out,
                int threads);

// Every record set to `blank`, in parallel so the pages spread over the threads that update them.
template <typename Record>
void fill_records(Record* records, int64_t n, const Record& blank, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t i = 0; i < n; ++i) records[i] = blank;
}

// Samples per bucket code. Every record's code must be in [0, kNumBuckets) (updates and
// loads keep it so).
template <typename Record>
BucketCounts count_buckets(const Record* records, int64_t n, int threads) {
  BucketCounts counts{};
#pragma omp parallel num_threads(threads)
  {
    int64_t local[kNumBuckets] = {};
#pragma omp for schedule(static) nowait
    for (int64_t i = 0; i < n; ++i) ++local[static_cast<uint8_t>(records[i].bucket)];
#pragma omp critical(geko_bucket_counts)
    for (int b = 0; b < kNumBuckets; ++b) counts[b] += local[b];
  }
  return counts;
}

template <typename Record, typename Index>
void gather_buckets(const Record* records, const Index* indices, size_t count, int8_t* out, int threads) {
  const int64_t m = static_cast<int64_t>(count);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t i = 0; i < m; ++i) out[i] = records[indices[i]].bucket;
}

// Checks `n` records at `src` (any alignment) with check(record) -> "" or what is wrong;
// std::invalid_argument naming the first bad sample.
template <typename Record, typename Check>
void check_records(const void* src, int64_t n, int threads, Check check) {
  const auto* bytes = static_cast<const unsigned char*>(src);
  int64_t first_bad = n;
#pragma omp parallel for schedule(static) reduction(min : first_bad) num_threads(threads)
  for (int64_t i = 0; i < n; ++i) {
    Record r;  // copied out: the source need not be aligned
    std::memcpy(static_cast<void*>(&r), bytes + static_cast<size_t>(i) * sizeof(Record), sizeof(Record));
    if (i < first_bad && !check(r).empty()) first_bad = i;
  }
  if (first_bad < n) {
    Record r;
    std::memcpy(static_cast<void*>(&r), bytes + static_cast<size_t>(first_bad) * sizeof(Record), sizeof(Record));
    throw std::invalid_argument("sample " + std::to_string(first_bad) + ": " + check(r));
  }
}

// std::invalid_argument unless nbytes holds exactly num_samples records.
void check_load_size(size_t nbytes, size_t expected, int64_t num_samples);

}  // namespace detail

// The part of a table that does not depend on what its records mean: the block, the lock,
// the thread count, config and counters, reads, field copies and checked loads. Every
// public member locks one mutex, so a table may be used from several threads. Traits gives
//   Record, Config (with validate()), Counters;
//   static const std::vector<FieldInfo>& fields();
//   static std::string check(const Record&)   "" when the update rule can produce it;
//   static Record blank(const Config&)         the record of a never-updated entry.
// num_threads: OpenMP threads of batch updates and scans (0: OpenMP's default; batches and
// scans below 32768 entries run on one thread).
template <typename Traits>
class RecordTable {
 public:
  using Record = typename Traits::Record;
  using Config = typename Traits::Config;
  using Counters = typename Traits::Counters;
  static_assert(sizeof(Record) == kRecordSize, "records are 32 bytes");

  RecordTable(const RecordTable&) = delete;
  RecordTable& operator=(const RecordTable&) = delete;

  // Bucket code of each index (std::out_of_range for an index outside [0, num_samples)).
  template <typename Index>
  void buckets(const Index* indices, size_t count, int8_t* out) const {
    std::lock_guard<std::mutex> lock(mutex_);
    detail::check_indices(indices, count, num_samples_);
    detail::gather_buckets(records_, indices, count, out, threads_for(count));
  }

  BucketCounts bucket_counts() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return detail::count_buckets(records_, num_samples_, threads_for(static_cast<size_t>(num_samples_)));
  }

  // Copies field `name` of every record into `out` (num_samples * field size bytes).
  // Throws std::invalid_argument for an unknown name.
  void copy_field(const std::string& name, void* out) const {
    const FieldInfo& field = detail::find_field(Traits::fields(), name);
    std::lock_guard<std::mutex> lock(mutex_);
    detail::copy_field(records_, sizeof(Record), num_samples_, field, out,
                       threads_for(static_cast<size_t>(num_samples_)));
  }

  // Replaces config, counters and every record by `records` (num_samples * 32 bytes, any
  // alignment), after checking the config and that every record is one the update rule can
  // produce (std::invalid_argument naming the first bad entry; the table is then unchanged).
  void load(const void* records, size_t nbytes_in, const Config& config, const Counters& counters) {
    config.validate();
    detail::check_load_size(nbytes_in, nbytes(), num_samples_);
    int threads;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      threads = threads_for(static_cast<size_t>(num_samples_));
    }
    detail::check_records<Record>(records, num_samples_, threads, Traits::check);
    std::lock_guard<std::mutex> lock(mutex_);
    std::memcpy(static_cast<void*>(records_), records, nbytes_in);
    config_ = config;
    counters_ = counters;
  }

  int num_threads() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return num_threads_;
  }
  void set_num_threads(int num_threads) {  // std::invalid_argument outside [0, kMaxThreads]
    detail::check_num_threads(num_threads);
    std::lock_guard<std::mutex> lock(mutex_);
    num_threads_ = num_threads;
  }

  int64_t num_samples() const { return num_samples_; }
  size_t nbytes() const { return static_cast<size_t>(num_samples_) * sizeof(Record); }
  Config config() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return config_;
  }
  Counters counters() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return counters_;
  }

  // The records, for zero-copy read-only views. The block never moves while the table
  // lives; load() copies into it. Readers that bypass the lock may see a batch half applied.
  const Record* data() const { return records_; }

 protected:
  // Throws std::invalid_argument for num_samples < 1, an invalid config or num_threads
  // outside [0, kMaxThreads]; std::bad_alloc when the records do not fit in memory.
  RecordTable(int64_t num_samples, const Config& config, int num_threads)
      : num_samples_(checked_size(num_samples, config, num_threads)),
        config_(config),
        block_(static_cast<size_t>(num_samples_), sizeof(Record)),
        records_(static_cast<Record*>(block_.data())),
        num_threads_(num_threads) {
    detail::fill_records(records_, num_samples_, Traits::blank(config_), threads_for(static_cast<size_t>(num_samples_)));
  }
  ~RecordTable() = default;

  int threads_for(size_t work) const { return detail::threads_for(work, num_threads_); }  // mutex_ held

  int64_t num_samples_;
  Config config_;
  Counters counters_;
  detail::RecordBlock block_;
  Record* records_;
  int num_threads_;
  mutable std::mutex mutex_;

 private:
  static int64_t checked_size(int64_t num_samples, const Config& config, int num_threads) {
    config.validate();
    detail::check_num_threads(num_threads);
    detail::check_num_samples(num_samples, sizeof(Record));
    return num_samples;
  }
};

}  // namespace geko
