#include "geko/visit_counters.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "geko/config.h"

namespace geko {

template <typename Index>
RevisitCount count_visits(const VisitCounters& counters, const VisitCounterParams& params, const Index* indices,
                          const float* loss, const float* confidence, const float* correct, const int8_t* before,
                          const int8_t* after, size_t count, int64_t epoch) {
  if (counters.seen_epoch == nullptr) throw std::invalid_argument("seen_epoch is required");
  if (counters.stall != nullptr && counters.ref_loss == nullptr) {
    throw std::invalid_argument("ref_loss is required when stall is given");
  }
  if (epoch < 0 || epoch > std::numeric_limits<int32_t>::max()) {
    throw std::invalid_argument("epoch must lie in [0, 2**31 - 1], got " + std::to_string(epoch));
  }
  if (params.freeze_streak < 0 || params.freeze_streak > 255) {
    throw std::invalid_argument("freeze_streak must lie in [0, 255], got " + std::to_string(params.freeze_streak));
  }
  if (!(params.stall_drop >= 0.0f && params.stall_drop <= 1.0f)) {
    throw std::invalid_argument("stall_drop must lie in [0, 1]");
  }
  for (size_t i = 0; i < count; ++i) {
    const Index index = indices[i];
    if (index < 0 || static_cast<uint64_t>(index) >= counters.num_samples) {
      throw std::out_of_range("index " + std::to_string(static_cast<long long>(index)) + " is out of range for " +
                              std::to_string(counters.num_samples) + " samples");
    }
  }
  const int32_t epoch32 = static_cast<int32_t>(epoch);
  RevisitCount result;
  // Frozen before the batch, from the streaks before it (a repeated index sees the same).
  std::vector<uint8_t> frozen(count, 0);
  for (size_t i = 0; i < count; ++i) {
    const size_t s = static_cast<size_t>(indices[i]);
    bool was_frozen = before[i] == kFreeze;
    if (!was_frozen && counters.streak != nullptr && params.freeze_streak > 0) {
      was_frozen = before[i] == kLight && counters.streak[s] >= params.freeze_streak;
    }
    frozen[i] = was_frozen ? 1 : 0;
  }
  const float keep = static_cast<float>(1.0 - static_cast<double>(params.stall_drop));
  for (size_t i = 0; i < count; ++i) {
    const size_t s = static_cast<size_t>(indices[i]);
    const bool fresh = counters.seen_epoch[s] != epoch32;
    const bool wrong = after[i] == kFocus || after[i] == kHard;
    if (fresh && frozen[i] && std::isfinite(correct[i])) {
      ++result.revisits;
      result.failed += wrong ? 1 : 0;
    }
    if (!(std::isfinite(loss[i]) && std::isfinite(confidence[i]) && std::isfinite(correct[i]))) continue;
    if (counters.streak != nullptr) {
      const bool right_confident =
          (after[i] == kFreeze || after[i] == kLight) && confidence[i] > params.freeze_confidence;
      const int next = std::min(255, counters.streak[s] + (fresh ? 1 : 0));
      counters.streak[s] = right_confident ? static_cast<uint8_t>(next) : 0;
    }
    if (counters.stall != nullptr) {
      const float ref = counters.ref_loss[s];
      const bool stagnant = wrong && std::isfinite(ref) && !(loss[i] <= keep * ref);
      if (!stagnant) {
        counters.stall[s] = 0;
      } else if (fresh) {
        counters.stall[s] = static_cast<uint8_t>(std::min(255, counters.stall[s] + 1));
      }
      if (fresh) counters.ref_loss[s] = loss[i];
    }
    counters.seen_epoch[s] = epoch32;
  }
  return result;
}

template RevisitCount count_visits<int32_t>(const VisitCounters&, const VisitCounterParams&, const int32_t*,
                                            const float*, const float*, const float*, const int8_t*, const int8_t*,
                                            size_t, int64_t);
template RevisitCount count_visits<int64_t>(const VisitCounters&, const VisitCounterParams&, const int64_t*,
                                            const float*, const float*, const float*, const int8_t*, const int8_t*,
                                            size_t, int64_t);

}  // namespace geko
