#include "geko/record_table.h"

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <new>

#ifdef __linux__
#include <sys/mman.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

namespace geko::detail {

namespace {

constexpr size_t kHugePage = size_t{2} << 20;
// A batch or scan smaller than this runs on one thread: a parallel region costs more than
// it saves.
constexpr size_t kMinParallelWork = size_t{1} << 15;

}  // namespace

void check_num_threads(int num_threads) {
  if (num_threads < 0 || num_threads > kMaxThreads) {
    throw std::invalid_argument("num_threads must be in [0, " + std::to_string(kMaxThreads) +
                                "] (0: OpenMP's default), got " + std::to_string(num_threads));
  }
}

void check_step(int64_t step) {
  if (step < 0 || step > kMaxStep) {
    throw std::invalid_argument("step must be in [0, " + std::to_string(kMaxStep) + "], got " + std::to_string(step));
  }
}

void check_num_samples(int64_t num_samples, size_t record_size) {
  const int64_t max_samples = static_cast<int64_t>(std::numeric_limits<size_t>::max() / (2 * record_size));
  if (num_samples < 1 || num_samples > max_samples) {
    throw std::invalid_argument("num_samples must be in [1, " + std::to_string(max_samples) + "], got " +
                                std::to_string(num_samples));
  }
}

int threads_for(size_t work, int num_threads) {
#ifdef _OPENMP
  if (work < kMinParallelWork) return 1;
  return num_threads == 0 ? std::max(1, omp_get_max_threads()) : num_threads;
#else
  (void)work;
  (void)num_threads;
  return 1;
#endif
}

RecordBlock::RecordBlock(size_t count, size_t record_size) {
  const size_t bytes = count * record_size;
  // Large tables: 2 MiB aligned and backed by huge pages when the kernel allows it (one TLB
  // entry covers 65536 records instead of 128).
  const size_t alignment = bytes >= kHugePage ? kHugePage : record_size;
  const size_t allocation = (bytes + alignment - 1) / alignment * alignment;
  memory_ = std::aligned_alloc(alignment, allocation);
  if (memory_ == nullptr) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (alignment == kHugePage) madvise(memory_, allocation, MADV_HUGEPAGE);  // a hint: failure is harmless
#endif
}

RecordBlock::~RecordBlock() { std::free(memory_); }

const FieldInfo& find_field(const std::vector<FieldInfo>& fields, const std::string& name) {
  const auto it = std::find_if(fields.begin(), fields.end(), [&](const FieldInfo& f) { return name == f.name; });
  if (it == fields.end()) throw std::invalid_argument("unknown field " + name);
  return *it;
}

void copy_field(const void* records, size_t record_size, int64_t count, const FieldInfo& field, void* out,
                int threads) {
  const auto* base = static_cast<const unsigned char*>(records) + field.offset;
  auto* dst = static_cast<unsigned char*>(out);
  const size_t size = field.size;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t i = 0; i < count; ++i) {
    std::memcpy(dst + static_cast<size_t>(i) * size, base + static_cast<size_t>(i) * record_size, size);
  }
}

void check_load_size(size_t nbytes, size_t expected, int64_t num_samples) {
  if (nbytes != expected) {
    throw std::invalid_argument("expected " + std::to_string(expected) + " bytes of records (" +
                                std::to_string(num_samples) + " samples), got " + std::to_string(nbytes));
  }
}

}  // namespace geko::detail
