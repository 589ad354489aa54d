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
#include <type_traits>

#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace geko {

namespace {

// Records requested this many batch positions ahead of the one being applied.
// Measured on this project's 2-core VM (DRAM latency ~390 ns, about 16 misses in
// flight per core): random updates on a 10 M-sample table are bound by the ~22 ns
// per random line that the memory system delivers once 16 are in flight; 32, 64
// and 128 positions ahead, or prefetching to L2 first, measured the same.
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

// One update of one sample with finite statistics (docs/design.md §3).
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

#ifdef __AVX2__

// Eight updates at once. A record is eight 32-bit words, so eight records
// transposed are one vector per field; the rule is then the scalar rule lane by
// lane, with the same operations (IEEE double arithmetic, one rounding to float
// where the scalar code rounds), hence the same bits, and no branch on the data.
// On this project's machine the scalar rule cost 17-33 ns per update on records
// already in cache (a branch-free scalar version measured no faster), as much as
// fetching a record from DRAM; eight at a time leave the memory as the bound
// (4096 random updates on 10 M samples: 40 -> 22 ns per update in alternating runs).

// In-place 8x8 transpose of 32-bit lanes (its own inverse).
inline void transpose8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// std::max(a, b) and std::min(a, b) lane by lane, NaN and signed zeros included
// (MAXPD/MINPD return their second operand where std::max/min return a).
inline __m256d max_pd(__m256d a, __m256d b) { return _mm256_max_pd(b, a); }
inline __m256d min_pd(__m256d a, __m256d b) { return _mm256_min_pd(b, a); }
inline __m128 stored_ps(__m256d v) {
  return _mm256_cvtpd_ps(min_pd(max_pd(v, _mm256_set1_pd(-static_cast<double>(FLT_MAX))),
                                _mm256_set1_pd(static_cast<double>(FLT_MAX))));
}
inline __m256 join(__m128 lo, __m128 hi) { return _mm256_set_m128(hi, lo); }
inline __m256d lo_pd(__m256 v) { return _mm256_cvtps_pd(_mm256_castps256_ps128(v)); }
inline __m256d hi_pd(__m256 v) { return _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)); }

struct RuleVectors {
  explicit RuleVectors(const RuleParams& p)
      : loss_scale(_mm256_set1_pd(p.loss_scale)),
        q_keep(_mm256_set1_pd(p.q_keep)),
        q_take(_mm256_set1_pd(p.q_take)),
        ema_keep(_mm256_set1_pd(p.ema_keep)),
        ema_take(_mm256_set1_pd(p.ema_take)),
        diff_keep(_mm256_set1_pd(p.diff_keep)),
        diff_take(_mm256_set1_pd(p.diff_take)),
        freeze_q(_mm256_set1_ps(p.freeze_q)),
        correct_threshold(_mm256_set1_ps(static_cast<float>(p.config.correct_threshold))),
        freeze_confidence(_mm256_set1_ps(static_cast<float>(p.config.freeze_confidence))),
        hard_confidence(_mm256_set1_ps(static_cast<float>(p.config.hard_confidence))),
        noise_guard_visits(_mm256_set1_epi32(p.noise_guard_visits)),
        guard_on(_mm256_set1_epi32(p.noise_guard_visits > 0 ? -1 : 0)) {}
  __m256d loss_scale, q_keep, q_take, ema_keep, ema_take, diff_keep, diff_take;
  __m256 freeze_q, correct_threshold, freeze_confidence, hard_confidence;
  __m256i noise_guard_visits, guard_on;
};

// keep * a + take * b: both products exact, so fused or not the sum rounds once.
inline __m256d blend_pd(__m256d keep, __m256d a, __m256d take, __m256d b) {
  return _mm256_fmadd_pd(keep, a, _mm256_mul_pd(take, b));
}

// Applies apply_update() to eight distinct records with finite statistics.
inline void apply_update8(SampleRecord* const target[8], __m256 loss, __m256 confidence, __m256 correct,
                          __m256i step, const RuleVectors& v) {
  __m256 r[8];
  for (int k = 0; k < 8; ++k) r[k] = _mm256_load_ps(reinterpret_cast<const float*>(target[k]));
  transpose8(r);  // r[field word][sample]: q, loss_ema, loss_diff_ema, last_loss, last_confidence, visits, last_step, bytes
  const __m256i visits = _mm256_castps_si256(r[5]);
  const __m256i bytes = _mm256_castps_si256(r[7]);
  const __m256d one = _mm256_set1_pd(1.0), zero = _mm256_setzero_pd();
  __m128 q_half[2], diff_ema_half[2], loss_ema_half[2];
  __m128i correct_half[2];
  for (int h = 0; h < 2; ++h) {
    const auto half = [h](__m256 x) { return h == 0 ? lo_pd(x) : hi_pd(x); };
    // 1. Q-value.
    const __m256d loss_d = half(loss);
    const __m128 reward = _mm256_cvtpd_ps(_mm256_sub_pd(one, min_pd(_mm256_div_pd(max_pd(loss_d, zero), v.loss_scale), one)));
    q_half[h] = _mm256_cvtpd_ps(
        min_pd(max_pd(blend_pd(v.q_keep, half(r[0]), v.q_take, _mm256_cvtps_pd(reward)), zero), one));
    // 2. Loss EMAs (selected against the first-visit values below).
    const __m128 diff = stored_ps(_mm256_sub_pd(loss_d, half(r[3])));
    diff_ema_half[h] = stored_ps(blend_pd(v.diff_keep, half(r[2]), v.diff_take, _mm256_cvtps_pd(diff)));
    loss_ema_half[h] = stored_ps(blend_pd(v.ema_keep, half(r[1]), v.ema_take, loss_d));
    // round(255 * correct), to nearest even as std::nearbyint.
    correct_half[h] = _mm256_cvtpd_epi32(_mm256_round_pd(_mm256_mul_pd(half(correct), _mm256_set1_pd(255.0)),
                                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  const __m256 q = join(q_half[0], q_half[1]);
  const __m256 first = _mm256_castsi256_ps(_mm256_cmpeq_epi32(visits, _mm256_setzero_si256()));
  // 3. Bucket: instant bucket as instant_bucket() (statistics are finite: never INVALID).
  const __m256i is_correct = _mm256_castps_si256(_mm256_cmp_ps(correct, v.correct_threshold, _CMP_GE_OQ));
  const __m256i above_freeze = _mm256_castps_si256(_mm256_cmp_ps(confidence, v.freeze_confidence, _CMP_GT_OQ));
  const __m256i above_hard = _mm256_castps_si256(_mm256_cmp_ps(confidence, v.hard_confidence, _CMP_GT_OQ));
  const __m256i one_i = _mm256_set1_epi32(1);
  const __m256i instant = _mm256_blendv_epi8(_mm256_sub_epi32(_mm256_set1_epi32(kFocus), above_hard),    // wrong
                                             _mm256_add_epi32(_mm256_set1_epi32(kLight), above_freeze),  // correct
                                             is_correct);
  const __m256i hard = _mm256_cmpeq_epi32(instant, _mm256_set1_epi32(kHard));
  const __m256i byte_mask = _mm256_set1_epi32(0xff);
  const __m256i old_streak = _mm256_and_si256(_mm256_srli_epi32(bytes, 16), byte_mask);
  const __m256i old_flags = _mm256_srli_epi32(bytes, 24);
  // streak + 1, saturating at 255 (cmpeq is -1 where it saturates).
  const __m256i increment = _mm256_add_epi32(_mm256_add_epi32(old_streak, one_i),
                                             _mm256_cmpeq_epi32(old_streak, byte_mask));
  const __m256i streak = _mm256_and_si256(hard, increment);
  const __m256i gated = _mm256_and_si256(_mm256_cmpeq_epi32(instant, _mm256_set1_epi32(kFreeze)),
                                         _mm256_castps_si256(_mm256_cmp_ps(q, v.freeze_q, _CMP_LT_OQ)));
  const __m256i noisy = _mm256_and_si256(_mm256_and_si256(hard, v.guard_on),
                                         _mm256_andnot_si256(_mm256_cmpgt_epi32(v.noise_guard_visits, streak),
                                                             _mm256_set1_epi32(-1)));
  // FREEZE -> LIGHT when gated (+1), HARD -> FOCUS when noisy (-1).
  const __m256i bucket = _mm256_add_epi32(_mm256_sub_epi32(instant, gated), noisy);
  const __m256i flags = _mm256_or_si256(_mm256_andnot_si256(_mm256_set1_epi32(kFlagSuspectedNoisy), old_flags),
                                        _mm256_and_si256(noisy, _mm256_set1_epi32(kFlagSuspectedNoisy)));
  const __m256i last_correct = _mm256_set_m128i(correct_half[1], correct_half[0]);
  // 4. History.
  r[0] = q;
  r[1] = _mm256_blendv_ps(join(loss_ema_half[0], loss_ema_half[1]), loss, first);
  r[2] = _mm256_andnot_ps(first, join(diff_ema_half[0], diff_ema_half[1]));
  r[3] = loss;
  r[4] = confidence;
  // visits + 1, saturating at UINT32_MAX.
  r[5] = _mm256_castsi256_ps(
      _mm256_add_epi32(_mm256_add_epi32(visits, one_i), _mm256_cmpeq_epi32(visits, _mm256_set1_epi32(-1))));
  r[6] = _mm256_castsi256_ps(step);
  r[7] = _mm256_castsi256_ps(_mm256_or_si256(
      _mm256_or_si256(last_correct, _mm256_slli_epi32(_mm256_and_si256(bucket, byte_mask), 8)),
      _mm256_or_si256(_mm256_slli_epi32(streak, 16), _mm256_slli_epi32(flags, 24))));
  transpose8(r);
  for (int k = 0; k < 8; ++k) _mm256_store_ps(reinterpret_cast<float*>(target[k]), r[k]);
}

// True when the eight indices are pairwise distinct.
inline bool distinct8(const int64_t* index) {
  const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(index));
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(index + 4));
  const __m256i a1 = _mm256_permute4x64_epi64(a, 0x39), a2 = _mm256_permute4x64_epi64(a, 0x4e);
  const __m256i b1 = _mm256_permute4x64_epi64(b, 0x39), b2 = _mm256_permute4x64_epi64(b, 0x4e);
  const __m256i b3 = _mm256_permute4x64_epi64(b, 0x93);
  // Rotations by 1 and 2 cover the 6 pairs within a half; b and its 3 rotations the 16 across.
  __m256i same = _mm256_or_si256(_mm256_cmpeq_epi64(a, a1), _mm256_cmpeq_epi64(a, a2));
  same = _mm256_or_si256(same, _mm256_or_si256(_mm256_cmpeq_epi64(b, b1), _mm256_cmpeq_epi64(b, b2)));
  same = _mm256_or_si256(same, _mm256_or_si256(_mm256_cmpeq_epi64(a, b), _mm256_cmpeq_epi64(a, b1)));
  same = _mm256_or_si256(same, _mm256_or_si256(_mm256_cmpeq_epi64(a, b2), _mm256_cmpeq_epi64(a, b3)));
  return _mm256_testz_si256(same, same) != 0;
}

inline bool all_finite8(__m256 a, __m256 b, __m256 c) {
  // x - x is 0 for a finite x and NaN otherwise.
  const __m256 sum = _mm256_add_ps(_mm256_add_ps(_mm256_sub_ps(a, a), _mm256_sub_ps(b, b)), _mm256_sub_ps(c, c));
  return _mm256_movemask_ps(_mm256_cmp_ps(sum, _mm256_setzero_ps(), _CMP_EQ_OQ)) == 0xff;
}

#endif  // __AVX2__

// Applies positions [0, count) of a batch whose indices are all in range.
void apply_all(SampleRecord* records, const int64_t* indices, const float* loss, const float* confidence,
               const float* correct, size_t count, int32_t step, const RuleParams& params, uint64_t& applied,
               uint64_t& skipped) {
  // Local copies: the compiler cannot tell that record stores leave these alone.
  const RuleParams p = params;
  uint64_t applied_here = 0;
  uint64_t skipped_here = 0;
  // The first records are requested together, before any is needed.
  for (size_t i = 0; i < std::min(count, kPrefetchDistance); ++i) prefetch_for_write(records + indices[i]);
  const auto scalar = [&](size_t i) {
    if (i + kPrefetchDistance < count) prefetch_for_write(records + indices[i + kPrefetchDistance]);
    if (!all_finite(loss[i], confidence[i], correct[i])) {
      ++skipped_here;
      return;
    }
    apply_update(records[indices[i]], loss[i], confidence[i], correct[i], step, p);
    ++applied_here;
  };
  size_t i = 0;
#ifdef __AVX2__
  const RuleVectors vectors(p);
  const __m256i step_vector = _mm256_set1_epi32(step);
  for (; i + 8 <= count; i += 8) {
    for (size_t k = i + kPrefetchDistance; k < std::min(i + kPrefetchDistance + 8, count); ++k) {
      prefetch_for_write(records + indices[k]);
    }
    const __m256 l = _mm256_loadu_ps(loss + i);
    const __m256 c = _mm256_loadu_ps(confidence + i);
    const __m256 k = _mm256_loadu_ps(correct + i);
    if (all_finite8(l, c, k) && distinct8(indices + i)) {
      SampleRecord* target[8];
      for (int j = 0; j < 8; ++j) target[j] = records + indices[i + j];
      apply_update8(target, l, c, k, step_vector, vectors);
      applied_here += 8;
    } else {
      // A duplicate must see its earlier occurrence applied; a non-finite value is skipped.
      for (size_t j = i; j < i + 8; ++j) {
        if (!all_finite(loss[j], confidence[j], correct[j])) {
          ++skipped_here;
          continue;
        }
        apply_update(records[indices[j]], loss[j], confidence[j], correct[j], step, p);
        ++applied_here;
      }
    }
  }
#endif
  for (; i < count; ++i) scalar(i);
  applied += applied_here;
  skipped += skipped_here;
}

// Applies, in batch order, the updates whose index lies in [lo, lo + span): each
// thread owns one range of the table, so no record is touched by two threads and
// every sample sees its updates in order. The positions of the range are gathered
// a block at a time into small arrays (on the stack: no allocation per call).
template <typename Index>
void apply_range(SampleRecord* records, const Index* indices, const float* loss, const float* confidence,
                 const float* correct, size_t count, int32_t step, const RuleParams& params, uint64_t lo,
                 uint64_t span, uint64_t& applied, uint64_t& skipped) {
  constexpr size_t kBlock = 256;
  int64_t block_index[kBlock];
  float block_loss[kBlock], block_confidence[kBlock], block_correct[kBlock];
  size_t start = 0;
  while (start < count) {
    size_t n = 0;
    size_t i = start;
    for (; i < count && n < kBlock; ++i) {
      const uint64_t index = static_cast<uint64_t>(indices[i]);
      if (index - lo >= span) continue;
      block_index[n] = static_cast<int64_t>(index);
      block_loss[n] = loss[i];
      block_confidence[n] = confidence[i];
      block_correct[n] = correct[i];
      ++n;
    }
    apply_all(records, block_index, block_loss, block_confidence, block_correct, n, step, params, applied, skipped);
    start = i;
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

template <typename Index>
void SampleTable::update(const Index* indices, const float* loss, const float* confidence, const float* correct,
                         size_t count, int64_t step, int8_t* before, int8_t* after) {
  detail::check_step(step);
  std::lock_guard<std::mutex> lock(mutex_);
  detail::check_indices(indices, count, num_samples_);
  check_unit_interval(confidence, count, "confidence");
  check_unit_interval(correct, count, "correct");

  // Everything is checked: from here on the call writes.
  if (before != nullptr) {
    for (size_t i = 0; i < count; ++i) before[i] = records_[indices[i]].bucket;
  }
  const RuleParams params(config_);
  const int32_t step32 = static_cast<int32_t>(step);
  uint64_t applied = 0;
  uint64_t skipped = 0;
  const int threads = threads_for(count);
  SampleRecord* records = records_;
  const uint64_t n = static_cast<uint64_t>(num_samples_);
  if (threads == 1 && std::is_same<Index, int64_t>::value) {
    // Every index was checked above: the whole batch applies, in place.
    apply_all(records, reinterpret_cast<const int64_t*>(indices), loss, confidence, correct, count, step32, params,
              applied, skipped);
  } else if (threads == 1) {
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
  if (after != nullptr) {
    for (size_t i = 0; i < count; ++i) after[i] = records_[indices[i]].bucket;
  }
}

template void SampleTable::update<int32_t>(const int32_t*, const float*, const float*, const float*, size_t, int64_t,
                                           int8_t*, int8_t*);
template void SampleTable::update<int64_t>(const int64_t*, const float*, const float*, const float*, size_t, int64_t,
                                           int8_t*, int8_t*);

}  // namespace geko
