// Counter-based random numbers for the planner.
//
// Every random number the planner draws is a pure function of (key, counter):
// the key is derived from (seed, epoch, purpose) and the counter is the
// sample's index (or a position). So a plan depends only on its inputs, never
// on the number of OpenMP threads or on the order in which threads run, and
// every rank of a distributed job computes the same plan.
//
// The generator is SplitMix64 (Steele, Lea & Flood 2014) used as a hash: the
// value at `counter` of the stream `key` is mix(key + (counter + 1) * gamma),
// which is exactly the counter-th output of a SplitMix64 seeded with `key`.
#pragma once

#include <cstdint>

namespace geko {

// What a stream of random numbers is used for; part of the key so that two
// purposes never share numbers.
enum class RngPurpose : uint64_t {
  kCopies = 1,          // fractional copy of a sample (floor(c) + Bernoulli(frac c))
  kFreezeTies = 2,      // tie-break among equally stale FREEZE samples
  kShuffleScatter = 3,  // first pass of the shuffle: which block an element goes to
  kShuffleBlock = 4,    // second pass: Fisher-Yates inside a block
  kWeightedKeys = 5,    // exponential keys / systematic start and order
  kInfoBatch = 6,       // InfoBatch's random keep of well-learned samples
};

constexpr uint64_t kGoldenGamma = 0x9e3779b97f4a7c15ULL;

inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// Key of the stream for (seed, epoch, purpose, sub): each field goes through
// the mixer so nearby seeds or epochs give unrelated streams.
inline uint64_t stream_key(uint64_t seed, uint64_t epoch, RngPurpose purpose, uint64_t sub = 0) {
  uint64_t k = mix64(seed + kGoldenGamma);
  k = mix64(k ^ (epoch + 0x632be59bd9b4e019ULL));
  k = mix64(k ^ (static_cast<uint64_t>(purpose) * 0x8cb92ba72f3d8dd7ULL));
  k = mix64(k ^ (sub + 0xd1b54a32d192ed03ULL));
  return k;
}

// The counter-th 64-bit value of stream `key`.
inline uint64_t random_u64(uint64_t key, uint64_t counter) {
  return mix64(key + (counter + 1) * kGoldenGamma);
}

// Uniform in [0, 1) with 53 random bits.
inline double random_unit(uint64_t key, uint64_t counter) {
  return static_cast<double>(random_u64(key, counter) >> 11) * 0x1.0p-53;
}

// Uniform in (0, 1]: safe under log().
inline double random_unit_open0(uint64_t key, uint64_t counter) {
  return static_cast<double>((random_u64(key, counter) >> 11) + 1) * 0x1.0p-53;
}

// Sequential stream (for the serial parts: Fisher-Yates inside a block).
class CounterRng {
 public:
  explicit CounterRng(uint64_t key) : key_(key) {}
  uint64_t next() { return random_u64(key_, counter_++); }
  // Uniform integer in [0, bound), bound >= 1, exactly uniform (Lemire 2019:
  // multiply-shift with rejection of the biased low region).
  uint64_t below(uint64_t bound) {
    unsigned __int128 m = static_cast<unsigned __int128>(next()) * bound;
    uint64_t low = static_cast<uint64_t>(m);
    if (low < bound) {
      const uint64_t threshold = (0 - bound) % bound;
      while (low < threshold) {
        m = static_cast<unsigned __int128>(next()) * bound;
        low = static_cast<uint64_t>(m);
      }
    }
    return static_cast<uint64_t>(m >> 64);
  }

 private:
  uint64_t key_;
  uint64_t counter_ = 0;
};

}  // namespace geko
