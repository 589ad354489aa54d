#include "geko/cpu_stats.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace geko {

namespace {

template <typename To, typename From>
inline To bit_cast(From from) {
  static_assert(sizeof(To) == sizeof(From), "size mismatch");
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
// Exponents are computed in log2 units, clamped at 2^-125 (~2e-38): below that an
// element adds nothing next to the max's 1, and the clamp keeps e * (x - m) finite
// (and 2^n normal) when x is far below the max.
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLog2eLow = static_cast<float>(1.44269504088896341 - static_cast<double>(kLog2e));  // log2(e) - kLog2e
constexpr float kLn2 = 0.693147180559945309f;
constexpr float kExp2Underflow = -125.0f;
constexpr float kExpUnderflow = kExp2Underflow * kLn2;

}  // namespace

// ---------------------------------------------------------------- conversions

float bf16_to_float(uint16_t bits) { return bit_cast<float>(static_cast<uint32_t>(bits) << 16); }

uint16_t float_to_bf16(float value) {
  uint32_t bits = bit_cast<uint32_t>(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x0040u);  // quiet NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>(bits >> 16);
}

float fp16_to_float(uint16_t bits) {
  const uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
  const uint32_t magnitude = bits & 0x7fffu;
  // Placing the half exponent/mantissa at float positions and scaling by 2^112
  // rebiases the exponent and handles subnormals exactly; inf/NaN keep all-ones.
  uint32_t out = bit_cast<uint32_t>(bit_cast<float>(magnitude << 13) * 0x1p112f);
  if (magnitude >= 0x7c00u) out = (magnitude << 13) | 0x7f800000u;
  return bit_cast<float>(out | sign);
}

uint16_t float_to_fp16(float value) {
  uint32_t bits = bit_cast<uint32_t>(value);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  bits &= 0x7fffffffu;
  if (bits >= 0x7f800000u) return static_cast<uint16_t>(sign | 0x7c00u | (bits > 0x7f800000u ? 0x0200u : 0u));
  if (bits >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to inf (>= 65520)
  if (bits < 0x38800000u) {
    // Below the smallest normal half: adding 0.5f rounds (to nearest even) to a
    // multiple of 2^-24, the half subnormal step, which lands in the low mantissa bits.
    const float rounded = bit_cast<float>(bits) + 0.5f;
    return static_cast<uint16_t>(sign | (bit_cast<uint32_t>(rounded) - 0x3f000000u));
  }
  bits += 0xc8000fffu + ((bits >> 13) & 1u);  // exponent -= 112, round to nearest even
  return static_cast<uint16_t>(sign | (bits >> 13));
}

namespace {

// ---------------------------------------------------------------- element access

template <typename T>
struct Elem;

template <>
struct Elem<float> {
  static float load(const float* p) { return *p; }
  static void store(float* p, float v) { *p = v; }
};
template <>
struct Elem<double> {
  static float load(const double* p) { return static_cast<float>(*p); }
  static void store(double* p, float v) { *p = static_cast<double>(v); }
};
struct BF16 {
  uint16_t bits;
};
struct FP16 {
  uint16_t bits;
};
template <>
struct Elem<BF16> {
  static float load(const BF16* p) { return bf16_to_float(p->bits); }
  static void store(BF16* p, float v) { p->bits = float_to_bf16(v); }
};
template <>
struct Elem<FP16> {
  static float load(const FP16* p) { return fp16_to_float(p->bits); }
  static void store(FP16* p, float v) { p->bits = float_to_fp16(v); }
};

#ifdef __AVX2__

// exp(t) for t <= 0 (the kernels only exponentiate x - max or x - lse), as 2^u with
// u = t log2(e), clamped at kExp2Underflow (NaN passes through). u = n + f with
// n = round(u), whose bits also give 2^n by an integer add to the exponent field;
// 2^f (|f| <= 1/2) is a degree-5 minimax polynomial with p(0) = 1 exactly. Max relative
// error ~2e-7. Callers keep u: the row sums use it (s1 is accumulated in log2 units and
// rescaled once per row).
inline __m256 log2_units(__m256 t) {
  return _mm256_max_ps(_mm256_set1_ps(kExp2Underflow), _mm256_mul_ps(t, _mm256_set1_ps(kLog2e)));
}

// 2^f for f in [-1/2, 1/2]: the degree-5 polynomial both exponentials scale by 2^n.
inline __m256 exp2_fraction(__m256 f) {
  __m256 p = _mm256_fmadd_ps(f, _mm256_set1_ps(1.330221421e-03f), _mm256_set1_ps(9.672933258e-03f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550615117e-02f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402221709e-01f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931470633e-01f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  return p;
}

inline __m256 exp2_clamped(__m256 u) {
  const __m256 n = _mm256_round_ps(u, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(u, n);
  const __m256 p = exp2_fraction(f);
  // 2^n * p by adding n to p's exponent field (n >= -125 keeps the result normal).
  const __m256i pow2n = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), pow2n));
}

// exp2_clamped() for the row sums, whose rows are known finite (u is never NaN), two
// instructions cheaper: adding 1.5 * 2^23 rounds u to an integer (to nearest even, as
// _mm256_round_ps) held in the low mantissa bits, whose shift into the exponent field
// is 2^n (the low 9 bits of n are n modulo 2^32 once in place), and subtracting it back
// gives n exactly: two adds instead of a round (2 uops) and a conversion. Same n, f and
// result bits as exp2_clamped() for the same degree. kDegree 5 for fp32/fp64 logits;
// kDegree 4 for bf16/fp16 logits, one FMA less per 8 elements for a max relative error
// of ~3e-6 instead of ~2e-7: a thousandth of the rounding of the 16-bit inputs themselves
// and well within the 2e-5 the parity tests allow against float64.
template <int kDegree>
inline __m256 exp2_finite(__m256 u) {
  static_assert(kDegree == 4 || kDegree == 5, "degree 4 or 5");
  const __m256 shifter = _mm256_set1_ps(0x1.8p23f);
  const __m256 big = _mm256_add_ps(u, shifter);
  const __m256 n = _mm256_sub_ps(big, shifter);
  const __m256 f = _mm256_sub_ps(u, n);
  __m256 p;
  if (kDegree == 5) {
    p = _mm256_fmadd_ps(f, _mm256_set1_ps(1.330221421e-03f), _mm256_set1_ps(9.672933258e-03f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550615117e-02f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402221709e-01f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931470633e-01f));
  } else {
    p = _mm256_fmadd_ps(f, _mm256_set1_ps(9.582829662e-03f), _mm256_set1_ps(5.590640008e-02f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402409911e-01f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931241751e-01f));
  }
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  const __m256i pow2n = _mm256_slli_epi32(_mm256_castps_si256(big), 23);
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), pow2n));
}

template <typename T>
struct Vec;

template <>
struct Vec<float> {
  static __m256 load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
};
template <>
struct Vec<double> {
  static __m256 load(const double* p) {
    return _mm256_set_m128(_mm256_cvtpd_ps(_mm256_loadu_pd(p + 4)), _mm256_cvtpd_ps(_mm256_loadu_pd(p)));
  }
  static void store(double* p, __m256 v) {
    _mm256_storeu_pd(p, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
    _mm256_storeu_pd(p + 4, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
  }
};
template <>
struct Vec<BF16> {
  static __m256 load(const BF16* p) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
  }
  static void store(BF16* p, __m256 v) {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(0x0040));
    rounded = _mm256_and_si256(_mm256_blendv_epi8(rounded, quiet, nan), _mm256_set1_epi32(0xffff));
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(rounded, rounded), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
};
template <>
struct Vec<FP16> {
  static __m256 load(const FP16* p) {
    const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(h, _mm256_set1_epi32(0x8000)), 16);
    const __m256i magnitude = _mm256_and_si256(h, _mm256_set1_epi32(0x7fff));
    const __m256i shifted = _mm256_slli_epi32(magnitude, 13);
    const __m256i scaled = _mm256_castps_si256(_mm256_mul_ps(_mm256_castsi256_ps(shifted), _mm256_set1_ps(0x1p112f)));
    const __m256i special = _mm256_cmpgt_epi32(magnitude, _mm256_set1_epi32(0x7bff));
    const __m256i inf_nan = _mm256_or_si256(shifted, _mm256_set1_epi32(0x7f800000));
    return _mm256_castsi256_ps(_mm256_or_si256(_mm256_blendv_epi8(scaled, inf_nan, special), sign));
  }
  static void store(FP16* p, __m256 v) {
    alignas(32) float tmp[8];
    _mm256_store_ps(tmp, v);
    for (int i = 0; i < 8; ++i) p[i].bits = float_to_fp16(tmp[i]);
  }
};

// Sixteen elements as two float vectors, in some lane order: the row sums do not care
// which lane holds which element, and offset_a/offset_b say it where they do (the
// argmax's lane is masked out). bf16 widens by interleaving zeros below each value (one
// unpack per 8 elements, no shift), which leaves elements 0-3, 8-11 in a and 4-7, 12-15 in b.
template <typename T>
struct Vec16 {
  static void load(const T* p, __m256& a, __m256& b) {
    a = Vec<T>::load(p);
    b = Vec<T>::load(p + 8);
  }
  static __m256i offset_a() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }
  static __m256i offset_b() { return _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15); }
};
template <>
struct Vec16<BF16> {
  static void load(const BF16* p, __m256& a, __m256& b) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    a = _mm256_castsi256_ps(_mm256_unpacklo_epi16(_mm256_setzero_si256(), raw));
    b = _mm256_castsi256_ps(_mm256_unpackhi_epi16(_mm256_setzero_si256(), raw));
  }
  static __m256i offset_a() { return _mm256_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11); }
  static __m256i offset_b() { return _mm256_setr_epi32(4, 5, 6, 7, 12, 13, 14, 15); }
};

// First index in [begin, end) whose element equals m, or -1. bf16 compares the stored
// bits, 16 elements per instruction, when m is not a zero (+0 and -0 compare equal as
// floats but not as bits; a finite row has no NaN).
template <typename T>
int64_t find_first(const T* row, int64_t begin, int64_t end, float m) {
  int64_t i = begin;
  const __m256 vm = _mm256_set1_ps(m);
  for (; i + 32 <= end; i += 32) {  // test 32 at a time, locate within them after
    const __m256 eq = _mm256_or_ps(
        _mm256_or_ps(_mm256_cmp_ps(Vec<T>::load(row + i), vm, _CMP_EQ_OQ),
                     _mm256_cmp_ps(Vec<T>::load(row + i + 8), vm, _CMP_EQ_OQ)),
        _mm256_or_ps(_mm256_cmp_ps(Vec<T>::load(row + i + 16), vm, _CMP_EQ_OQ),
                     _mm256_cmp_ps(Vec<T>::load(row + i + 24), vm, _CMP_EQ_OQ)));
    if (_mm256_movemask_ps(eq) != 0) break;
  }
  for (; i + 8 <= end; i += 8) {
    const int mask = _mm256_movemask_ps(_mm256_cmp_ps(Vec<T>::load(row + i), vm, _CMP_EQ_OQ));
    if (mask != 0) return i + __builtin_ctz(static_cast<unsigned>(mask));
  }
  for (; i < end; ++i)
    if (Elem<T>::load(row + i) == m) return i;
  return -1;
}
template <>
int64_t find_first<BF16>(const BF16* row, int64_t begin, int64_t end, float m) {
  const uint16_t bits = float_to_bf16(m);  // exact: m is one of the row's values
  if ((bits & 0x7fffu) == 0) {
    for (int64_t i = begin; i < end; ++i)
      if (Elem<BF16>::load(row + i) == m) return i;
    return -1;
  }
  const __m256i vm = _mm256_set1_epi16(static_cast<int16_t>(bits));
  int64_t i = begin;
  for (; i + 32 <= end; i += 32) {
    const __m256i e0 = _mm256_cmpeq_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + i)), vm);
    const __m256i e1 = _mm256_cmpeq_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + i + 16)), vm);
    if (!_mm256_testz_si256(_mm256_or_si256(e0, e1), _mm256_or_si256(e0, e1))) {
      const uint32_t m0 = static_cast<uint32_t>(_mm256_movemask_epi8(e0));
      if (m0 != 0) return i + __builtin_ctz(m0) / 2;
      return i + 16 + __builtin_ctz(static_cast<uint32_t>(_mm256_movemask_epi8(e1))) / 2;
    }
  }
  for (; i < end; ++i)
    if (row[i].bits == bits) return i;
  return -1;
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

#endif  // __AVX2__

// Result of the bf16 max pass (bf16_bits_pass(), AVX2 builds).
struct BitsPass {
  float max;
  float lower;  // <= every element of a finite row
  bool finite;
  int64_t first_max_from;  // the first element equal to the max is at this index or after
};

// Whether a row whose quick check (sum of x * 0) found a non-finite element is usable: no
// NaN, no +inf, and some element above -inf. -inf logits (a masked vocabulary) are
// probability 0, as in torch; their exponentials clamp to nothing next to the max's 1 (and
// the row's max is then exact: -inf never wins it). Runs only for such rows.
template <typename T>
bool usable_row(const T* row, int64_t vocab) {
  bool above = false;
  for (int64_t i = 0; i < vocab; ++i) {
    const float x = Elem<T>::load(row + i);
    if (!(x < std::numeric_limits<float>::infinity())) return false;  // NaN or +inf
    above |= x > -std::numeric_limits<float>::infinity();
  }
  return above;
}

// Row reductions of one token: max m, its first index, and over the other elements
// d = sum exp(x - m), s1 = sum exp(x - m) (x - m), s2 = sum exp(2 (x - m)).
// The softmax denominator is D = 1 + d.
struct RowSums {
  float max = -std::numeric_limits<float>::infinity();
  int64_t argmax = 0;
  bool finite = true;
  float d = 0.0f;  // sums over every element but the argmax
  float s1 = 0.0f;
  float s2 = 0.0f;
};

#ifdef __AVX2__
// row_sums() of a row shorter than one 16-element block, all in two vectors: the row is
// copied into a 16-lane buffer whose padding repeats element 0 (a real element, so neither
// the max, nor the finiteness check, nor the first index of the max changes), and the
// exponential sums mask out the padding lanes and the argmax's lane. The same max, argmax
// and sums (up to summation order) as the general path.
template <typename T>
RowSums short_row_sums(const T* row, int64_t vocab) {
  RowSums out;
  alignas(32) float buf[16];
  for (int64_t j = 0; j < vocab; ++j) buf[j] = Elem<T>::load(row + j);
  for (int64_t j = vocab; j < 16; ++j) buf[j] = buf[0];
  const __m256 x0 = _mm256_load_ps(buf);
  const __m256 x1 = _mm256_load_ps(buf + 8);
  const __m256 zero = _mm256_setzero_ps();
  const float check = hsum(_mm256_fmadd_ps(x0, zero, _mm256_mul_ps(x1, zero)));
  __m256 vmax = _mm256_max_ps(x0, x1);
  vmax = _mm256_max_ps(vmax, _mm256_permute2f128_ps(vmax, vmax, 1));
  vmax = _mm256_max_ps(vmax, _mm256_shuffle_ps(vmax, vmax, _MM_SHUFFLE(1, 0, 3, 2)));
  vmax = _mm256_max_ps(vmax, _mm256_shuffle_ps(vmax, vmax, _MM_SHUFFLE(2, 3, 0, 1)));
  const float m = _mm256_cvtss_f32(vmax);
  out.max = m;
  out.finite = check == 0.0f || usable_row(row, vocab);
  if (!out.finite) return out;
  const __m256 vm = _mm256_set1_ps(m);
  const unsigned eq = static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(x0, vm, _CMP_EQ_OQ))) |
                      (static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(x1, vm, _CMP_EQ_OQ))) << 8);
  out.argmax = __builtin_ctz(eq);  // m is one of the row's values: some lane below vocab holds it
  const __m256i lane_a = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i lane_b = _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15);
  const __m256i count = _mm256_set1_epi32(static_cast<int>(vocab));
  const __m256i at = _mm256_set1_epi32(static_cast<int>(out.argmax));
  const __m256 keep0 =
      _mm256_castsi256_ps(_mm256_andnot_si256(_mm256_cmpeq_epi32(lane_a, at), _mm256_cmpgt_epi32(count, lane_a)));
  const __m256 keep1 =
      _mm256_castsi256_ps(_mm256_andnot_si256(_mm256_cmpeq_epi32(lane_b, at), _mm256_cmpgt_epi32(count, lane_b)));
  constexpr int kDegree = sizeof(T) == 2 ? 4 : 5;
  const __m256 u0 = log2_units(_mm256_sub_ps(x0, vm));
  const __m256 u1 = log2_units(_mm256_sub_ps(x1, vm));
  const __m256 e0 = _mm256_and_ps(keep0, exp2_finite<kDegree>(u0));
  const __m256 e1 = _mm256_and_ps(keep1, exp2_finite<kDegree>(u1));
  out.d = hsum(_mm256_add_ps(e0, e1));
  out.s1 = hsum(_mm256_fmadd_ps(e0, u0, _mm256_mul_ps(e1, u1))) * kLn2;
  out.s2 = hsum(_mm256_fmadd_ps(e0, e0, _mm256_mul_ps(e1, e1)));
  return out;
}
#endif  // __AVX2__

#ifdef __AVX2__
// Max, finiteness and a lower bound of a bf16 row, from its bits as 16-bit integers (16
// elements per instruction, no widening). Non-negative values (sign bit clear) order like
// their bits as signed integers, negative ones like their bits as unsigned integers in
// reverse, so:
// * the signed maximum of the bits is the largest value when some element is
//   non-negative; otherwise every element is negative and the largest is the one whose
//   bits are the smallest unsigned;
// * +inf and positive NaNs are the bits 0x7f80..0x7fff (a signed maximum >= 0x7f80),
//   -inf and negative NaNs 0xff80..0xffff (an unsigned maximum >= 0xff80): the row is
//   finite iff neither;
// * the unsigned maximum of the bits, when its sign bit is set, is the most negative value
//   (the row's minimum); with no negative element, +0 bounds the row below.

// Order of bf16 values as integers, from their bits: non-negative ones 0..0x7fff, negative
// ones below (-0 is -1, just below +0; otherwise the same order as the values).
inline int bf16_order_key(unsigned bits) {
  return bits < 0x8000u ? static_cast<int>(bits) : -static_cast<int>(bits & 0x7fffu) - 1;
}

// Horizontal signed maximum / unsigned minimum of sixteen 16-bit lanes (phminposuw finds an
// unsigned minimum of eight; x ^ 0x7fff turns a signed maximum into one).
inline int hmax_epi16(__m256i v) {
  const __m128i h = _mm_max_epi16(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  const __m128i flip = _mm_set1_epi16(0x7fff);
  return static_cast<int16_t>(_mm_cvtsi128_si32(_mm_xor_si128(_mm_minpos_epu16(_mm_xor_si128(h, flip)), flip)));
}
inline unsigned hmin_epu16(__m256i v) {
  const __m128i h = _mm_min_epu16(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  return static_cast<unsigned>(_mm_cvtsi128_si32(_mm_minpos_epu16(h))) & 0xffffu;
}
inline unsigned hmax_epu16(__m256i v) {
  const __m128i h = _mm_max_epu16(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  const __m128i ones = _mm_set1_epi16(-1);
  return ~static_cast<unsigned>(_mm_cvtsi128_si32(_mm_minpos_epu16(_mm_xor_si128(h, ones)))) & 0xffffu;
}

// The bf16 max pass in pieces, so that the exponential pass of one row can carry the max
// pass of the row read next (bits_step() between its exponentials: the integer max/min fill
// issue slots the exponentials leave, instead of a pass of their own).
constexpr int64_t kBitsChunk = 2048;
struct BitsAcc {
  __m256i smax = _mm256_set1_epi16(std::numeric_limits<int16_t>::min());
  __m256i umin = _mm256_set1_epi16(-1);
  __m256i umax = _mm256_setzero_si256();
  int best_key = std::numeric_limits<int>::min();
  int64_t from = 0;
};
inline void bits_step(BitsAcc& acc, const BF16* p) {  // 16 elements
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  acc.smax = _mm256_max_epi16(acc.smax, v);
  acc.umin = _mm256_min_epu16(acc.umin, v);
  acc.umax = _mm256_max_epu16(acc.umax, v);
}
// At the end of the chunk starting at chunk_begin (in order, every kBitsChunk elements and at
// the last multiple of 16): where the running maximum last grew is the chunk holding the max's
// first occurrence, so that the argmax search starts there.
inline void bits_chunk_end(BitsAcc& acc, int64_t chunk_begin) {
  const int smax = hmax_epi16(acc.smax);
  const int key = smax >= 0 ? smax : bf16_order_key(hmin_epu16(acc.umin));
  if (key > acc.best_key) {
    acc.best_key = key;
    acc.from = chunk_begin;
  }
}
// The last vocab % 16 elements (from vec16_end) and the result.
inline BitsPass bits_finish(const BitsAcc& acc, const BF16* row, int64_t vec16_end, int64_t vocab) {
  int smax = hmax_epi16(acc.smax);
  unsigned umin = hmin_epu16(acc.umin);
  unsigned umax = hmax_epu16(acc.umax);
  int best_key = acc.best_key;
  int64_t from = acc.from;
  for (int64_t i = vec16_end; i < vocab; ++i) {
    const uint16_t bits = row[i].bits;
    smax = std::max<int>(smax, static_cast<int16_t>(bits));
    umin = std::min<unsigned>(umin, bits);
    umax = std::max<unsigned>(umax, bits);
    const int key = bf16_order_key(bits);
    if (key > best_key) {
      best_key = key;
      from = i;
    }
  }
  BitsPass out;
  out.finite = smax < 0x7f80 && umax < 0xff80u;
  const unsigned max_bits = smax >= 0 ? static_cast<unsigned>(smax) : umin;
  out.max = bf16_to_float(static_cast<uint16_t>(max_bits));
  out.lower = umax >= 0x8000u ? bf16_to_float(static_cast<uint16_t>(umax)) : 0.0f;
  // A zero max equals both zeros, which the keys tell apart: search from the start.
  out.first_max_from = (max_bits & 0x7fffu) == 0 ? 0 : from;
  return out;
}

inline BitsPass bf16_bits_pass(const BF16* row, int64_t vocab) {
  BitsAcc acc;
  const int64_t vec16_end = vocab & ~int64_t{15};
  for (int64_t c = 0; c < vec16_end; c += kBitsChunk) {
    const int64_t chunk_end = std::min(c + kBitsChunk, vec16_end);
    for (int64_t i = c; i < chunk_end; i += 16) bits_step(acc, row + i);
    bits_chunk_end(acc, c);
  }
  return bits_finish(acc, row, vec16_end, vocab);
}

// exp(t) for t in [kExpUnderflow, 0] (t = x - max, clamped), for the row sums. As in
// exp2_finite(), t log2(e) is split into an integer and a fraction by adding 1.5 * 2^23, but
// from t by one FMA (t log2(e) + 1.5 * 2^23 rounds the exact product), and the fraction is
// the exact t log2(e) minus that integer rounded once (a second FMA): no intermediate
// rounding of t log2(e), one instruction less than exp2_finite(log2_units(t)).
// t >= kExpUnderflow keeps the result normal.
// * kDegree 5 (fp32/fp64 logits): 2^n 2^f, f in [-1/2, 1/2], the degree-5 polynomial of
//   exp2_finite() (max relative error ~2e-7).
// * kDegree 2 (bf16/fp16 logits): N = round(8 t log2(e)) = 8 n + k, k in 0..7, and
//   exp(t) = 2^n 2^(k/8) 2^(r/8), r = 8 t log2(e) - N in [-1/2, 1/2]. 2^(k/8) comes from an
//   8-entry table indexed by the low 3 bits of the rounded value (vpermd reads only those),
//   2^(r/8) from a degree-2 minimax polynomial with p(0) = 1 exactly; max relative error
//   ~3.5e-6, as the degree-4 exp2_finite() (~3e-6), for two FMAs and a multiply instead of
//   four FMAs: the FMA ports are this loop's bottleneck. exp(0) = 1 exactly (k = 0, r = 0).
template <int kDegree>
inline __m256 exp_natural(__m256 t) {
  static_assert(kDegree == 2 || kDegree == 5, "degree 2 (with the table) or 5");
  const __m256 shifter = _mm256_set1_ps(0x1.8p23f);
  if (kDegree == 2) {
    const __m256 log2e8 = _mm256_set1_ps(8.0f * kLog2e);
    const __m256 big = _mm256_fmadd_ps(t, log2e8, shifter);
    const __m256 r = _mm256_fmsub_ps(t, log2e8, _mm256_sub_ps(big, shifter));
    __m256 p = _mm256_fmadd_ps(r, _mm256_set1_ps(3.7535287e-03f), _mm256_set1_ps(8.66636e-02f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    // big's low 12 bits hold N (|N| <= 1000); shifted by 20 they are (n << 23) + (k << 20),
    // n added to the exponent field and k << 20 cancelled by the table entries, which are
    // the bits of 2^(k/8) minus k << 20.
    const __m256i table = _mm256_setr_epi32(0x3f800000 - (0 << 20), 0x3f8b95c2 - (1 << 20), 0x3f9837f0 - (2 << 20),
                                            0x3fa5fed7 - (3 << 20), 0x3fb504f3 - (4 << 20), 0x3fc5672a - (5 << 20),
                                            0x3fd744fd - (6 << 20), 0x3feac0c7 - (7 << 20));
    const __m256i bits = _mm256_castps_si256(big);
    const __m256i scale = _mm256_add_epi32(_mm256_permutevar8x32_epi32(table, bits), _mm256_slli_epi32(bits, 20));
    return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
  }
  const __m256 log2e = _mm256_set1_ps(kLog2e);
  const __m256 big = _mm256_fmadd_ps(t, log2e, shifter);
  const __m256 f = _mm256_fmsub_ps(t, log2e, _mm256_sub_ps(big, shifter));
  const __m256 p = exp2_fraction(f);
  const __m256i pow2n = _mm256_slli_epi32(_mm256_castps_si256(big), 23);
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), pow2n));
}

// exp(t) for t in [kExpUnderflow, 0] to float precision, for the backward's softmax: as
// exp_natural<5>(), with log2(e) split in two floats (Cody-Waite), so that the fraction f is
// t log2(e) - n to float precision even for |t| in the tens (a float log2(e) alone is off by
// 1.3e-8 relative, an error of |t| 1.3e-8 in f: 6e-7 relative at t = -50, where torch's expf
// is ~1e-7). One FMA more than exp_natural<5>().
inline __m256 exp_precise(__m256 t) {
  const __m256 shifter = _mm256_set1_ps(0x1.8p23f);
  const __m256 log2e = _mm256_set1_ps(kLog2e);
  const __m256 big = _mm256_fmadd_ps(t, log2e, shifter);
  __m256 f = _mm256_fmsub_ps(t, log2e, _mm256_sub_ps(big, shifter));
  f = _mm256_fmadd_ps(t, _mm256_set1_ps(kLog2eLow), f);
  const __m256 p = exp2_fraction(f);
  const __m256i pow2n = _mm256_slli_epi32(_mm256_castps_si256(big), 23);
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), pow2n));
}

// The exponential sums of eight elements x (see row_sums): t = x - m, e = exp(t),
// d += e, a += e t, b += e e; lanes where keep is 0 add nothing. t is clamped at
// kExpUnderflow (below it e adds nothing next to the max's 1) unless kClamp is false: when
// no element of the row is below the clamp (max(t, kExpUnderflow) == t for all of them:
// the same t, one instruction less).
template <int kDegree, bool kClamp>
inline void exp_sums8(__m256 x, __m256 vm, __m256& d, __m256& a, __m256& b) {
  __m256 t = _mm256_sub_ps(x, vm);
  if (kClamp) t = _mm256_max_ps(_mm256_set1_ps(kExpUnderflow), t);
  const __m256 e = exp_natural<kDegree>(t);
  d = _mm256_add_ps(d, e);
  a = _mm256_fmadd_ps(e, t, a);
  b = _mm256_fmadd_ps(e, e, b);
}
template <int kDegree, bool kClamp>
inline void exp_sums8_masked(__m256 x, __m256 keep, __m256 vm, __m256& d, __m256& a, __m256& b) {
  __m256 t = _mm256_sub_ps(x, vm);
  if (kClamp) t = _mm256_max_ps(_mm256_set1_ps(kExpUnderflow), t);
  const __m256 e = _mm256_and_ps(keep, exp_natural<kDegree>(t));
  d = _mm256_add_ps(d, e);
  a = _mm256_fmadd_ps(e, t, a);
  b = _mm256_fmadd_ps(e, e, b);
}

// The exponential sums over the row (see row_sums), every element but the argmax `skip`:
// d, s1 and s2. With kFuse, also the max pass of the bf16 row `fuse` (same length) into fuse_acc
// (its last vocab % 16 elements are left to bits_finish()).
template <typename T, int kDegree, bool kClamp, bool kFuse>
void exp_row_sums(const T* row, int64_t vocab, int64_t skip, float m, const T* next_row, const BF16* fuse,
                  BitsAcc* fuse_acc, float& d_out, float& s1_out, float& s2_out) {
  const int64_t vec16_end = vocab & ~int64_t{15};
  const __m256 vm = _mm256_set1_ps(m);
  // Two sets of accumulators (FMA latency); locals of this function, so that they stay in
  // registers (captured by a lambda, they were kept on the stack: a store and a reload in
  // every accumulator chain).
  __m256 d0 = _mm256_setzero_ps(), a0 = _mm256_setzero_ps(), b0 = _mm256_setzero_ps();
  __m256 d1 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps();
  // Multiples of 16 elements; one prefetch per 64-byte line of the next row: while this
  // row is exponentiated from L2, the next one comes in from DRAM, so its max pass does
  // not wait for memory.
  constexpr int64_t kLine = 64 / sizeof(T) >= 16 ? 64 / sizeof(T) : 16;
  const auto body = [&](int64_t lo, int64_t hi) {
    __m256 x0, x1;
    int64_t j = lo;
    if (next_row != nullptr) {
      for (; j + kLine <= hi; j += kLine) {
        const char* ahead = reinterpret_cast<const char*>(next_row + j);
        for (size_t q = 0; q < (kLine * sizeof(T) + 63) / 64; ++q) _mm_prefetch(ahead + 64 * q, _MM_HINT_T1);
        for (int64_t k = 0; k < kLine; k += 16) {
          if (kFuse) bits_step(*fuse_acc, fuse + j + k);
          Vec16<T>::load(row + j + k, x0, x1);
          exp_sums8<kDegree, kClamp>(x0, vm, d0, a0, b0);
          exp_sums8<kDegree, kClamp>(x1, vm, d1, a1, b1);
        }
      }
    }
    for (; j < hi; j += 16) {
      if (next_row != nullptr) _mm_prefetch(reinterpret_cast<const char*>(next_row + j), _MM_HINT_T1);
      if (kFuse) bits_step(*fuse_acc, fuse + j);
      Vec16<T>::load(row + j, x0, x1);
      exp_sums8<kDegree, kClamp>(x0, vm, d0, a0, b0);
      exp_sums8<kDegree, kClamp>(x1, vm, d1, a1, b1);
    }
  };
  // In chunks of kBitsChunk (the fused max pass notes where its running max grows).
  const int64_t skip_block = skip & ~int64_t{15};
  for (int64_t c = 0; c < vec16_end; c += kBitsChunk) {
    const int64_t chunk_end = std::min(c + kBitsChunk, vec16_end);
    if (skip_block >= c && skip_block < chunk_end) {
      body(c, skip_block);
      // The block holding the argmax, with its lane masked out.
      const __m256i at = _mm256_set1_epi32(static_cast<int>(skip - skip_block));
      const __m256 keep0 = _mm256_castsi256_ps(
          _mm256_xor_si256(_mm256_cmpeq_epi32(Vec16<T>::offset_a(), at), _mm256_set1_epi32(-1)));
      const __m256 keep1 = _mm256_castsi256_ps(
          _mm256_xor_si256(_mm256_cmpeq_epi32(Vec16<T>::offset_b(), at), _mm256_set1_epi32(-1)));
      __m256 x0, x1;
      if (kFuse) bits_step(*fuse_acc, fuse + skip_block);
      Vec16<T>::load(row + skip_block, x0, x1);
      exp_sums8_masked<kDegree, kClamp>(x0, keep0, vm, d0, a0, b0);
      exp_sums8_masked<kDegree, kClamp>(x1, keep1, vm, d1, a1, b1);
      body(skip_block + 16, chunk_end);
    } else {
      body(c, chunk_end);
    }
    if (kFuse) bits_chunk_end(*fuse_acc, c);
  }
  int64_t i = vec16_end;
  if (i < vocab) {
    // The last vocab % 16 elements, through the same vector code: copied into a 16-lane
    // buffer padded with the max (a finite value whose exponent is computed and then
    // dropped), with the padding lanes and the argmax's lane masked out as in the argmax
    // block above. Only the row's own elements are read.
    const int64_t n = vocab - i;
    alignas(32) float tail[16];
    for (int64_t j = 0; j < 16; ++j) tail[j] = j < n ? Elem<T>::load(row + i + j) : m;
    const __m256i lane_a = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i lane_b = _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15);
    const __m256i count = _mm256_set1_epi32(static_cast<int>(n));
    // skip - i is negative when the argmax lies before the tail: no lane matches it.
    const __m256i at = _mm256_set1_epi32(skip >= i ? static_cast<int>(skip - i) : -1);
    const __m256 keep0 =
        _mm256_castsi256_ps(_mm256_andnot_si256(_mm256_cmpeq_epi32(lane_a, at), _mm256_cmpgt_epi32(count, lane_a)));
    const __m256 keep1 =
        _mm256_castsi256_ps(_mm256_andnot_si256(_mm256_cmpeq_epi32(lane_b, at), _mm256_cmpgt_epi32(count, lane_b)));
    exp_sums8_masked<kDegree, kClamp>(_mm256_load_ps(tail), keep0, vm, d0, a0, b0);
    exp_sums8_masked<kDegree, kClamp>(_mm256_load_ps(tail + 8), keep1, vm, d1, a1, b1);
  }
  d_out = hsum(_mm256_add_ps(d0, d1));
  s1_out = hsum(_mm256_add_ps(a0, a1));
  s2_out = hsum(_mm256_add_ps(b0, b1));
}
#endif  // __AVX2__

// `known`: this row's bf16 max pass, done already (or null). `fuse`: a bf16 row whose max pass
// to carry in this row's exponential pass (or null); *fused is its result when *fused_done.
template <typename T>
RowSums row_sums(const T* row, int64_t vocab, const T* next_row, const BitsPass* known = nullptr,
                 const BF16* fuse = nullptr, BitsPass* fused = nullptr, bool* fused_done = nullptr) {
  RowSums out;
  if (fused_done != nullptr) *fused_done = false;
#ifdef __AVX2__
  if (vocab < 16) return short_row_sums(row, vocab);
#endif
  // 1. max and finiteness (sum of x * 0 is 0 for a finite row, NaN otherwise).
  //    The row (<= 1 MB) stays in L2 for the passes below, so DRAM is read once.
  int64_t i = 0;
  float check = 0.0f;
  float m = -std::numeric_limits<float>::infinity();
#ifdef __AVX2__
  // A lower bound of the row's elements (-inf: unknown, the exponentials clamp), and an
  // index at or before the max's first occurrence.
  float lower = -std::numeric_limits<float>::infinity();
  int64_t argmax_from = 0;
  const int64_t vec32_end = vocab & ~int64_t{31};
  const int64_t vec16_end = vocab & ~int64_t{15};
  if (std::is_same<T, BF16>::value) {
    const BitsPass bp = known != nullptr ? *known : bf16_bits_pass(reinterpret_cast<const BF16*>(row), vocab);
    m = bp.max;
    lower = bp.lower;
    argmax_from = bp.first_max_from;
    check = bp.finite ? 0.0f : kNaN;
    i = vocab;
  } else if (vec16_end > 0) {
    const __m256 zero = _mm256_setzero_ps();
    const __m256 neg_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    __m256 m0 = neg_inf, m1 = neg_inf, m2 = neg_inf, m3 = neg_inf;
    __m256 c0 = zero, c1 = zero, c2 = zero, c3 = zero;
    __m256 x0, x1, x2, x3;
    for (; i < vec32_end; i += 32) {  // four independent chains: max/fma latency, not throughput
      Vec16<T>::load(row + i, x0, x1);
      Vec16<T>::load(row + i + 16, x2, x3);
      m0 = _mm256_max_ps(m0, x0);
      m1 = _mm256_max_ps(m1, x1);
      m2 = _mm256_max_ps(m2, x2);
      m3 = _mm256_max_ps(m3, x3);
      c0 = _mm256_fmadd_ps(x0, zero, c0);
      c1 = _mm256_fmadd_ps(x1, zero, c1);
      c2 = _mm256_fmadd_ps(x2, zero, c2);
      c3 = _mm256_fmadd_ps(x3, zero, c3);
    }
    for (; i < vec16_end; i += 16) {
      Vec16<T>::load(row + i, x0, x1);
      m0 = _mm256_max_ps(m0, x0);
      m1 = _mm256_max_ps(m1, x1);
      c0 = _mm256_fmadd_ps(x0, zero, c0);
      c1 = _mm256_fmadd_ps(x1, zero, c1);
    }
    const __m256 vmax = _mm256_max_ps(_mm256_max_ps(m0, m1), _mm256_max_ps(m2, m3));
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, vmax);
    for (int l = 0; l < 8; ++l) m = std::max(m, lanes[l]);
    check = hsum(_mm256_add_ps(_mm256_add_ps(c0, c1), _mm256_add_ps(c2, c3)));
  }
#endif
  for (; i < vocab; ++i) {
    const float x = Elem<T>::load(row + i);
    check += x * 0.0f;
    m = std::max(m, x);
  }
  out.max = m;
  out.finite = check == 0.0f || usable_row(row, vocab);
  if (!out.finite) return out;

  // 2. argmax: the first index equal to the max (ties -> lowest index); stops there.
#ifdef __AVX2__
  out.argmax = find_first(row, argmax_from, vocab, m);
#else
  (void)next_row;  // prefetched, carried and fused by the vector code only
  (void)known;
  (void)fuse;
  (void)fused;
  out.argmax = -1;
  for (i = 0; i < vocab; ++i) {
    if (Elem<T>::load(row + i) == m) {
      out.argmax = i;
      break;
    }
  }
#endif

  // 3. exponential sums around the max over every element except the argmax (it
  //    contributes exactly 1 to the softmax denominator and to sum p^2 numerators, 0 to
  //    s1). Leaving it out keeps D - 1 exact, so a confident row's loss = log1p(D - 1)
  //    and its el2n = ||p - onehot|| do not drown in the rounding of 1 + tiny. s1 uses
  //    x - m, so the entropy has no cancellation either.
  const int64_t skip = out.argmax;
  i = 0;
  float s1_log2 = 0.0f;
#ifdef __AVX2__
  {
    constexpr int kDegree = sizeof(T) == 2 ? 2 : 5;
    // lower - m is computed as every element's x - m is, which grows with x: when it is
    // not below the clamp, no element's is.
    const bool clamp = !(lower - m >= kExpUnderflow);
    if (std::is_same<T, BF16>::value && fuse != nullptr && vocab >= 16) {
      BitsAcc acc;
      if (clamp)
        exp_row_sums<T, kDegree, true, true>(row, vocab, skip, m, next_row, fuse, &acc, out.d, out.s1, out.s2);
      else
        exp_row_sums<T, kDegree, false, true>(row, vocab, skip, m, next_row, fuse, &acc, out.d, out.s1, out.s2);
      *fused = bits_finish(acc, fuse, vocab & ~int64_t{15}, vocab);
      *fused_done = true;
    } else if (clamp) {
      exp_row_sums<T, kDegree, true, false>(row, vocab, skip, m, next_row, nullptr, nullptr, out.d, out.s1, out.s2);
    } else {
      exp_row_sums<T, kDegree, false, false>(row, vocab, skip, m, next_row, nullptr, nullptr, out.d, out.s1, out.s2);
    }
    i = vocab;
  }
#endif
  for (; i < vocab; ++i) {
    if (i == skip) continue;
    const float u = std::max((Elem<T>::load(row + i) - m) * kLog2e, kExp2Underflow);
    const float e = std::exp2(u);
    out.d += e;
    s1_log2 += e * u;
    out.s2 += e * e;
  }
  out.s1 += s1_log2 * kLn2;  // the vector code's s1 is in natural units already
  return out;
}

struct TokenValues {
  float loss, confidence, label_prob, correct, entropy, el2n;
  double lse;  // m + log D in double: the backward's exp(x - lse) keeps x - m's precision
};

inline TokenValues token_values(const RowSums& r, float x_label, int64_t label) {
  if (!r.finite) return {kNaN, kNaN, kNaN, kNaN, kNaN, kNaN, static_cast<double>(kNaN)};
  // D = 1 + d; d = D - 1 is exact, however small.
  const float denom = 1.0f + r.d;
  const float log_denom = std::log1p(r.d);
  const bool label_is_argmax = r.argmax == label;
  TokenValues v;
  v.lse = static_cast<double>(r.max) + static_cast<double>(log_denom);
  v.loss = label_is_argmax ? log_denom : (r.max - x_label) + log_denom;  // lse - x[y] without cancelling m
  v.confidence = 1.0f / denom;  // exp(m - lse)
  v.label_prob = std::exp(-v.loss);
  v.correct = label_is_argmax ? 1.0f : 0.0f;
  v.entropy = log_denom - r.s1 / denom;  // lse - sum p x, written around m
  float el2n_sq;
  if (label_is_argmax) {
    // ||p - onehot||^2 = (1 - p_y)^2 + sum_{i != y} p_i^2, with 1 - p_y = d / D.
    const float one_minus_py = r.d / denom;
    el2n_sq = one_minus_py * one_minus_py + r.s2 / (denom * denom);
  } else {
    // p_y <= 1/2 here: no cancellation in sum p^2 - 2 p_y + 1.
    el2n_sq = (1.0f + r.s2) / (denom * denom) - 2.0f * v.label_prob + 1.0f;
  }
  v.el2n = std::sqrt(std::max(el2n_sq, 0.0f));
  return v;
}

// Below this many logits a pass runs on the calling thread: waking an OpenMP team costs
// more than the work, and its spinning workers would compete with torch's own threads.
constexpr int64_t kParallelMinElements = int64_t{1} << 18;

// Rows are handed out in chunks of kRowChunk from a shared counter (dynamic scheduling: the
// machine may be shared), each thread claiming its next chunk when it starts one, so that a
// thread always knows the rows it reads next: bf16 rows carry the max pass of the next row in
// their exponential pass and prefetch the one after; other rows prefetch the next.
constexpr int64_t kRowChunk = 8;

template <typename T>
void token_pass(const LogitsView& lv, const LabelsView& yv, int64_t ignore_index, float* const tok[6],
                double* lse_out, uint8_t* valid_out, uint8_t* bad_out) {
  const T* base = static_cast<const T*>(lv.data);
  const int64_t rows = lv.samples * lv.tokens;
  const int64_t vocab = lv.vocab;
  constexpr bool kCarry = std::is_same<T, BF16>::value;
  const auto row_at = [&](int64_t r) -> const T* {
    return r < rows ? base + (r / lv.tokens) * lv.sample_stride + (r % lv.tokens) * lv.token_stride : nullptr;
  };
  std::atomic<int64_t> next_chunk{0};
#pragma omp parallel if (rows * vocab >= kParallelMinElements)
  {
    BitsPass carried;  // the max pass of carried_row, done in the previous row's exponential pass
    const T* carried_row = nullptr;
    int64_t begin = next_chunk.fetch_add(kRowChunk, std::memory_order_relaxed);
    while (begin < rows) {
      const int64_t end = std::min(begin + kRowChunk, rows);
      const int64_t following = next_chunk.fetch_add(kRowChunk, std::memory_order_relaxed);
      for (int64_t r = begin; r < end; ++r) {
        // The two rows this thread reads next (kRowChunk >= 2: the second is in this chunk or
        // the next one).
        const int64_t r1 = r + 1 < end ? r + 1 : following;
        const int64_t r2 = r1 == following ? following + 1 : (r + 2 < end ? r + 2 : following);
        const int64_t s = r / lv.tokens;
        const int64_t t = r % lv.tokens;
        const int64_t label = yv.data[s * yv.sample_stride + t * yv.token_stride];
        const bool counted = label != ignore_index;
        const bool in_range = label >= 0 && label < vocab;
        const bool valid = counted && in_range;
        valid_out[r] = valid ? 1 : 0;
        const T* row = base + s * lv.sample_stride + t * lv.token_stride;
        if (!valid) {
          // Never read a row whose label is not usable; an out-of-range counted label
          // spoils its sample, as in the reference.
          bad_out[r] = counted ? 1 : 0;
          for (int k = 0; k < 6; ++k)
            if (tok[k] != nullptr) tok[k][r] = 0.0f;
          if (lse_out != nullptr) lse_out[r] = 0.0;
          carried_row = nullptr;
          continue;
        }
        const T* next1 = row_at(r1);
        RowSums sums;
        if (kCarry) {
          const BitsPass* known = carried_row == row ? &carried : nullptr;
          // The next row is read now only if it will be read anyway (its label is usable).
          const BF16* fuse = nullptr;
          if (next1 != nullptr) {
            const int64_t label1 = yv.data[(r1 / lv.tokens) * yv.sample_stride + (r1 % lv.tokens) * yv.token_stride];
            if (label1 != ignore_index && label1 >= 0 && label1 < vocab) fuse = reinterpret_cast<const BF16*>(next1);
          }
          BitsPass fused;
          bool fused_done = false;
          sums = row_sums(row, vocab, row_at(r2), known, fuse, &fused, &fused_done);
          carried = fused;
          carried_row = fused_done ? next1 : nullptr;
        } else {
          sums = row_sums(row, vocab, next1);
        }
        const TokenValues v = token_values(sums, Elem<T>::load(row + label), label);
        bad_out[r] = sums.finite ? 0 : 1;
        const float values[6] = {v.loss, v.confidence, v.label_prob, v.correct, v.entropy, v.el2n};
        for (int k = 0; k < 6; ++k)
          if (tok[k] != nullptr) tok[k][r] = values[k];
        if (lse_out != nullptr) lse_out[r] = v.lse;
      }
      begin = following;
    }
  }
}

template <typename T>
void backward_pass(const LogitsView& lv, const LabelsView& yv, const double* lse, const float* token_scale,
                   int64_t ignore_index, T* grad, int64_t grad_sample_stride, int64_t grad_token_stride) {
  const T* base = static_cast<const T*>(lv.data);
  const int64_t rows = lv.samples * lv.tokens;
  const int64_t vocab = lv.vocab;
#pragma omp parallel for schedule(dynamic, 8) if (rows * vocab >= kParallelMinElements)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t s = r / lv.tokens;
    const int64_t t = r % lv.tokens;
    const int64_t label = yv.data[s * yv.sample_stride + t * yv.token_stride];
    const T* row = base + s * lv.sample_stride + t * lv.token_stride;
    T* out = grad + s * grad_sample_stride + t * grad_token_stride;
    const bool valid = label != ignore_index && label >= 0 && label < vocab;
    int64_t i = 0;
    if (!valid) {
#ifdef __AVX2__
      for (; i + 8 <= vocab; i += 8) Vec<T>::store(out + i, _mm256_setzero_ps());
#endif
      for (; i < vocab; ++i) Elem<T>::store(out + i, 0.0f);
      continue;
    }
    // The double lse as hi + lo, hi its float rounding: p = exp(x - lse) = exp(x - hi) exp(-lo),
    // exp(-lo) folded into the row's scale. x - hi is exact near the max, where the
    // probabilities are not small, so p keeps float precision however large the logits (a
    // float lse alone is off by half its ulp, 5e-4 at |x| = 1e4, a relative error of every p).
    const double l = lse[r];
    const float hi = static_cast<float>(l);
    const float scale = token_scale[r];
    if (!(l == l)) {
      // A row that invalidated its sample (NaN or +inf logits, or only -inf): NaN, as torch.
      for (int64_t k = 0; k < vocab; ++k) Elem<T>::store(out + k, kNaN);
      continue;
    }
    const float exp_neg_lo = static_cast<float>(std::exp(static_cast<double>(hi) - l));
    const float row_scale = scale * exp_neg_lo;
    // Read x[y] first: in place, the row is overwritten by the loop below.
    const float x_label = Elem<T>::load(row + label);
#ifdef __AVX2__
    const __m256 vh = _mm256_set1_ps(hi);
    const __m256 vs = _mm256_set1_ps(row_scale);
    const __m256 underflow = _mm256_set1_ps(kExpUnderflow);
    // p below the clamp is 0: a -inf logit (a masked class) gives exactly 0.
    const auto prob = [&](__m256 x) {
      const __m256 tt = _mm256_sub_ps(x, vh);
      const __m256 keep = _mm256_cmp_ps(tt, underflow, _CMP_GE_OQ);
      return _mm256_and_ps(keep, exp_precise(_mm256_max_ps(tt, underflow)));
    };
    for (; i + 8 <= vocab; i += 8) Vec<T>::store(out + i, _mm256_mul_ps(prob(Vec<T>::load(row + i)), vs));
    if (i < vocab) {
      // The last vocab % 8 elements through the same vector code, via an 8-lane buffer
      // (padded with hi, dropped): only the row's own elements are read and written.
      const int64_t n = vocab - i;
      alignas(32) float tail[8];
      for (int64_t j = 0; j < 8; ++j) tail[j] = j < n ? Elem<T>::load(row + i + j) : hi;
      _mm256_store_ps(tail, _mm256_mul_ps(prob(_mm256_load_ps(tail)), vs));
      for (int64_t j = 0; j < n; ++j) Elem<T>::store(out + i + j, tail[j]);
      i = vocab;
    }
#endif
    for (; i < vocab; ++i) {
      const float tt = Elem<T>::load(row + i) - hi;
      const float p = tt >= kExpUnderflow ? std::exp(tt) : 0.0f;
      Elem<T>::store(out + i, p * row_scale);
    }
    const float tl = x_label - hi;
    const float p_label = tl >= kExpUnderflow ? std::exp(tl) * exp_neg_lo : 0.0f;
    Elem<T>::store(out + label, (p_label - 1.0f) * scale);
  }
}

// ---------------------------------------------------------------- loss options
//
// The options' path reads each row once into a float buffer of z (the transformed logits)
// and runs the plain path's float row code on it; the plain path itself is not touched.

// What the options' kernels read per call: the options, their float constants and the class
// weights as a contiguous copy (V floats) with their sum W.
struct OptionsPlan {
  const LossOptions* options;
  float inv_temperature;
  float one_minus_eps;  // 1 - label_smoothing, rounded once as the reference's scalar is
  float eps_over_v;     // label_smoothing / V
  float z_loss;
  const float* weight = nullptr;  // contiguous [V], or null: all 1
  double weight_sum;              // W
  std::vector<float> weight_copy;
};

void make_plan(const LossOptions& o, int64_t vocab, OptionsPlan& plan) {
  plan.options = &o;
  plan.inv_temperature = static_cast<float>(1.0 / o.temperature);
  plan.one_minus_eps = static_cast<float>(1.0 - o.label_smoothing);
  plan.eps_over_v = static_cast<float>(o.label_smoothing / static_cast<double>(vocab));
  plan.z_loss = static_cast<float>(o.z_loss);
  plan.weight_sum = static_cast<double>(vocab);
  if (o.class_weight != nullptr) {
    plan.weight_copy.resize(static_cast<size_t>(vocab));
    double sum = 0.0;
    for (int64_t j = 0; j < vocab; ++j) {
      plan.weight_copy[static_cast<size_t>(j)] = o.class_weight[j * o.class_weight_stride];
      sum += static_cast<double>(plan.weight_copy[static_cast<size_t>(j)]);
    }
    plan.weight = plan.weight_copy.data();
    plan.weight_sum = sum;
  }
}

#ifdef __AVX2__
// tanh(a) for finite a, to a few float ulps: for |a| < 1/2 the odd Taylor series through a^15
// (truncation < 1e-8 relative there), above it (1 - e) / (1 + e) with e = exp(-2 |a|) <= 1/e,
// where nothing cancels; the sign put back.
inline __m256 tanh8(__m256 a) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 x = _mm256_andnot_ps(sign, a);
  const __m256 e = exp_precise(_mm256_max_ps(_mm256_mul_ps(x, _mm256_set1_ps(-2.0f)), _mm256_set1_ps(kExpUnderflow)));
  const __m256 far = _mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e));
  const __m256 x2 = _mm256_mul_ps(x, x);
  __m256 p = _mm256_set1_ps(-929569.0f / 638512875.0f);
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(21844.0f / 6081075.0f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-1382.0f / 155925.0f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(62.0f / 2835.0f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-17.0f / 315.0f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(2.0f / 15.0f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-1.0f / 3.0f));
  const __m256 near = _mm256_fmadd_ps(_mm256_mul_ps(p, x2), x, x);
  const __m256 r = _mm256_blendv_ps(far, near, _mm256_cmp_ps(x, _mm256_set1_ps(0.5f), _CMP_LT_OQ));
  return _mm256_or_ps(r, _mm256_and_ps(a, sign));
}

// z of eight float logits (see transformed_row).
inline __m256 transformed8(__m256 x, __m256 temperature, bool scaled, bool capped, __m256 cap) {
  const __m256 u = scaled ? _mm256_div_ps(x, temperature) : x;
  if (!capped) return u;
  const __m256 v = _mm256_mul_ps(cap, tanh8(_mm256_div_ps(u, cap)));
  // -inf (masked) and +inf / NaN (a row to refuse) pass through.
  const __m256 finite = _mm256_and_ps(_mm256_cmp_ps(u, _mm256_set1_ps(-std::numeric_limits<float>::infinity()), _CMP_NEQ_OQ),
                                      _mm256_cmp_ps(u, _mm256_set1_ps(std::numeric_limits<float>::infinity()), _CMP_LT_OQ));
  return _mm256_blendv_ps(u, _mm256_andnot_ps(_mm256_cmp_ps(u, u, _CMP_UNORD_Q), v), finite);
}
#endif

// z of one row into `z`, computed as the torch reference computes it: in float (double for
// float64 logits), u = x / temperature, then softcap * tanh(u / softcap). -inf stays -inf
// (a masked class); +inf and NaN stay non-finite, so that the row is refused as without
// options. float, bf16 and fp16 rows take the vector code (its tanh within a few ulps of
// torch's), the last vocab % 8 elements through an 8-lane buffer so that every element of a
// row is computed alike.
template <typename T>
void transformed_row(const T* row, int64_t vocab, const LossOptions& o, float* z) {
  using C = typename std::conditional<std::is_same<T, double>::value, double, float>::type;
  const auto load = [row](int64_t i) -> C {
    if constexpr (std::is_same<T, double>::value)
      return row[i];
    else
      return Elem<T>::load(row + i);
  };
  const C temperature = static_cast<C>(o.temperature);
  int64_t i = 0;
#ifdef __AVX2__
  if constexpr (!std::is_same<T, double>::value) {
    const bool scaled = temperature != 1.0f;
    const bool capped = o.softcap != 0.0;
    const __m256 vt = _mm256_set1_ps(temperature);
    const __m256 vc = _mm256_set1_ps(static_cast<float>(o.softcap));
    for (; i + 8 <= vocab; i += 8) _mm256_storeu_ps(z + i, transformed8(Vec<T>::load(row + i), vt, scaled, capped, vc));
    if (i < vocab) {
      alignas(32) float tail[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int64_t j = i; j < vocab; ++j) tail[j - i] = Elem<T>::load(row + j);
      _mm256_store_ps(tail, transformed8(_mm256_load_ps(tail), vt, scaled, capped, vc));
      for (int64_t j = i; j < vocab; ++j) z[j] = tail[j - i];
    }
    return;
  }
#endif
  if (o.softcap == 0.0) {
    for (; i < vocab; ++i) z[i] = static_cast<float>(load(i) / temperature);
    return;
  }
  const C cap = static_cast<C>(o.softcap);
  constexpr C kInf = std::numeric_limits<C>::infinity();
  for (; i < vocab; ++i) {
    C u = load(i);
    if (temperature != C(1)) u = u / temperature;
    // -inf: a masked class; +inf and NaN: not finite, the row is refused.
    const C v = (u == -kInf || !(u < kInf)) ? u : cap * static_cast<C>(std::tanh(static_cast<double>(u / cap)));
    z[i] = static_cast<float>(v);
  }
}

// sum_j w_j (-logp_j) = W (lse - m) + sum_j w_j (m - z_j): positive terms, added in double.
// A -inf z_j makes it +inf (NaN with w_j = 0, as the reference's inf * 0).
double smoothing_sum(const float* z, int64_t vocab, float m, double lse, const OptionsPlan& plan) {
  int64_t j = 0;
  double total = 0.0;
#ifdef __AVX2__
  const __m256d vm = _mm256_set1_pd(static_cast<double>(m));
  __m256d acc0 = _mm256_setzero_pd(), acc1 = _mm256_setzero_pd();
  if (plan.weight == nullptr) {
    for (; j + 8 <= vocab; j += 8) {
      acc0 = _mm256_add_pd(acc0, _mm256_sub_pd(vm, _mm256_cvtps_pd(_mm_loadu_ps(z + j))));
      acc1 = _mm256_add_pd(acc1, _mm256_sub_pd(vm, _mm256_cvtps_pd(_mm_loadu_ps(z + j + 4))));
    }
  } else {
    for (; j + 8 <= vocab; j += 8) {
      acc0 = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm_loadu_ps(plan.weight + j)),
                             _mm256_sub_pd(vm, _mm256_cvtps_pd(_mm_loadu_ps(z + j))), acc0);
      acc1 = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm_loadu_ps(plan.weight + j + 4)),
                             _mm256_sub_pd(vm, _mm256_cvtps_pd(_mm_loadu_ps(z + j + 4))), acc1);
    }
  }
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, _mm256_add_pd(acc0, acc1));
  total = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
#endif
  for (; j < vocab; ++j) {
    const double w = plan.weight == nullptr ? 1.0 : static_cast<double>(plan.weight[j]);
    total += w * (static_cast<double>(m) - static_cast<double>(z[j]));
  }
  return plan.weight_sum * (lse - static_cast<double>(m)) + total;
}

// The options' token loss l of a valid token whose statistics on z are `v`, in float in the
// reference's order of operations.
float option_token_loss(const TokenValues& v, const RowSums& sums, const float* z, int64_t vocab, int64_t label,
                        const OptionsPlan& plan) {
  if (!sums.finite) return kNaN;
  const float w_label = plan.weight == nullptr ? 1.0f : plan.weight[label];
  float loss = w_label * plan.one_minus_eps * v.loss;
  if (plan.options->label_smoothing != 0.0)
    loss += plan.eps_over_v * static_cast<float>(smoothing_sum(z, vocab, sums.max, v.lse, plan));
  if (plan.options->z_loss != 0.0) {
    const float lse = static_cast<float>(v.lse);
    loss += plan.z_loss * lse * lse;
  }
  return loss;
}

template <typename T>
void token_pass_options(const LogitsView& lv, const LabelsView& yv, int64_t ignore_index, const OptionsPlan& plan,
                        float* const tok[6], float* train_loss, double* lse_out, uint8_t* valid_out, uint8_t* bad_out) {
  const T* base = static_cast<const T*>(lv.data);
  const int64_t rows = lv.samples * lv.tokens;
  const int64_t vocab = lv.vocab;
#pragma omp parallel if (rows * vocab >= kParallelMinElements)
  {
    std::vector<float> z(static_cast<size_t>(vocab));
#pragma omp for schedule(dynamic, kRowChunk)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t s = r / lv.tokens;
      const int64_t t = r % lv.tokens;
      const int64_t label = yv.data[s * yv.sample_stride + t * yv.token_stride];
      const bool counted = label != ignore_index;
      const bool valid = counted && label >= 0 && label < vocab;
      valid_out[r] = valid ? 1 : 0;
      if (!valid) {
        bad_out[r] = counted ? 1 : 0;
        for (int k = 0; k < 6; ++k)
          if (tok[k] != nullptr) tok[k][r] = 0.0f;
        if (lse_out != nullptr) lse_out[r] = 0.0;
        if (train_loss != nullptr) train_loss[r] = 0.0f;
        continue;
      }
      transformed_row(base + s * lv.sample_stride + t * lv.token_stride, vocab, *plan.options, z.data());
      const RowSums sums = row_sums<float>(z.data(), vocab, nullptr);
      const TokenValues v = token_values(sums, z[static_cast<size_t>(label)], label);
      bad_out[r] = sums.finite ? 0 : 1;
      const float values[6] = {v.loss, v.confidence, v.label_prob, v.correct, v.entropy, v.el2n};
      for (int k = 0; k < 6; ++k)
        if (tok[k] != nullptr) tok[k][r] = values[k];
      if (lse_out != nullptr) lse_out[r] = v.lse;
      if (train_loss != nullptr) train_loss[r] = option_token_loss(v, sums, z.data(), vocab, label, plan);
    }
  }
}

template <typename T>
void backward_pass_options(const LogitsView& lv, const LabelsView& yv, const double* lse, const float* token_scale,
                           int64_t ignore_index, T* grad, int64_t grad_sample_stride, int64_t grad_token_stride,
                           const OptionsPlan& plan) {
  const T* base = static_cast<const T*>(lv.data);
  const int64_t rows = lv.samples * lv.tokens;
  const int64_t vocab = lv.vocab;
  const LossOptions& o = *plan.options;
  const bool capped = o.softcap != 0.0;
  const float inv_cap = capped ? static_cast<float>(1.0 / o.softcap) : 0.0f;
  const float neg_inf = -std::numeric_limits<float>::infinity();
#pragma omp parallel if (rows * vocab >= kParallelMinElements)
  {
    std::vector<float> z(static_cast<size_t>(vocab));
#pragma omp for schedule(dynamic, 8)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t s = r / lv.tokens;
      const int64_t t = r % lv.tokens;
      const int64_t label = yv.data[s * yv.sample_stride + t * yv.token_stride];
      const T* row = base + s * lv.sample_stride + t * lv.token_stride;
      T* out = grad + s * grad_sample_stride + t * grad_token_stride;
      const bool valid = label != ignore_index && label >= 0 && label < vocab;
      if (!valid) {
        for (int64_t k = 0; k < vocab; ++k) Elem<T>::store(out + k, 0.0f);
        continue;
      }
      const double l = lse[r];
      if (!(l == l)) {
        for (int64_t k = 0; k < vocab; ++k) Elem<T>::store(out + k, kNaN);
        continue;
      }
      // The whole row is read (into z) before anything is written: grad may be the logits.
      transformed_row(row, vocab, o, z.data());
      const float hi = static_cast<float>(l);
      const float exp_neg_lo = static_cast<float>(std::exp(static_cast<double>(hi) - l));
      const float scale = token_scale[r];
      const float w_label = plan.weight == nullptr ? 1.0f : plan.weight[label];
      // d l / d z_k = a p_k - b w_k - [k = y] w_y (1 - eps)
      const float a = static_cast<float>(static_cast<double>(w_label) * static_cast<double>(plan.one_minus_eps) +
                                         static_cast<double>(plan.eps_over_v) * plan.weight_sum +
                                         2.0 * o.z_loss * l);
      const float b = plan.eps_over_v;
      // d z / d x times the token's scale; p's exp(-lo) folded into a.
      const float dzs = plan.inv_temperature * scale;
      const float a_lo = a * exp_neg_lo;
      const auto dz_of = [&](float zk) {
        if (!capped || zk == neg_inf) return dzs;
        const float c = zk * inv_cap;
        return (1.0f - c * c) * dzs;
      };
      int64_t i = 0;
#ifdef __AVX2__
      {
        const __m256 vh = _mm256_set1_ps(hi);
        const __m256 underflow = _mm256_set1_ps(kExpUnderflow);
        const __m256 va = _mm256_set1_ps(a_lo);
        const __m256 vb = _mm256_set1_ps(b);
        const __m256 vdzs = _mm256_set1_ps(dzs);
        const __m256 vinv_cap = _mm256_set1_ps(inv_cap);
        const __m256 one = _mm256_set1_ps(1.0f);
        const __m256 vneg_inf = _mm256_set1_ps(neg_inf);
        for (; i + 8 <= vocab; i += 8) {
          const __m256 zk = _mm256_loadu_ps(z.data() + i);
          const __m256 tt = _mm256_sub_ps(zk, vh);
          const __m256 keep = _mm256_cmp_ps(tt, underflow, _CMP_GE_OQ);
          const __m256 p = _mm256_and_ps(keep, exp_precise(_mm256_max_ps(tt, underflow)));
          const __m256 w = plan.weight == nullptr ? one : _mm256_loadu_ps(plan.weight + i);
          const __m256 dl = _mm256_fnmadd_ps(vb, w, _mm256_mul_ps(p, va));  // a p - b w
          __m256 dz = vdzs;
          if (capped) {
            const __m256 c = _mm256_mul_ps(zk, vinv_cap);
            const __m256 masked = _mm256_cmp_ps(zk, vneg_inf, _CMP_EQ_OQ);
            dz = _mm256_blendv_ps(_mm256_mul_ps(_mm256_fnmadd_ps(c, c, one), vdzs), vdzs, masked);
          }
          Vec<T>::store(out + i, _mm256_mul_ps(dl, dz));
        }
      }
#endif
      for (; i < vocab; ++i) {
        const float zk = z[static_cast<size_t>(i)];
        const float tt = zk - hi;
        const float p = tt >= kExpUnderflow ? std::exp(tt) : 0.0f;
        const float w = plan.weight == nullptr ? 1.0f : plan.weight[i];
        Elem<T>::store(out + i, (p * a_lo - b * w) * dz_of(zk));
      }
      const float zl = z[static_cast<size_t>(label)];
      const float tl = zl - hi;
      const float p_label = tl >= kExpUnderflow ? std::exp(tl) * exp_neg_lo : 0.0f;
      Elem<T>::store(out + label, (p_label * a - b * w_label - w_label * plan.one_minus_eps) * dz_of(zl));
    }
  }
}

void check_views(const LogitsView& lv, const LabelsView& yv) {
  if (lv.data == nullptr && lv.samples * lv.tokens > 0) throw std::invalid_argument("logits: null data pointer");
  if (yv.data == nullptr && lv.samples * lv.tokens > 0) throw std::invalid_argument("labels: null data pointer");
  if (lv.samples < 0 || lv.tokens < 0) throw std::invalid_argument("logits: negative shape");
  if (lv.vocab < 2 || lv.vocab > kMaxVocab)
    throw std::invalid_argument("logits: vocabulary size must be in [2, " + std::to_string(kMaxVocab) + "], got " +
                                std::to_string(lv.vocab));
  if (lv.sample_stride < 0 || lv.token_stride < 0 || yv.sample_stride < 0 || yv.token_stride < 0)
    throw std::invalid_argument("negative strides are not supported");
}

}  // namespace

void LossOptions::validate(int64_t vocab) const {
  if (!(std::isfinite(temperature) && temperature > 0.0))
    throw std::invalid_argument("temperature must be finite and > 0, got " + std::to_string(temperature));
  if (!(std::isfinite(softcap) && softcap >= 0.0))
    throw std::invalid_argument("softcap must be 0 (off) or finite and > 0, got " + std::to_string(softcap));
  if (!(label_smoothing >= 0.0 && label_smoothing <= 1.0))
    throw std::invalid_argument("label_smoothing must be in [0, 1], got " + std::to_string(label_smoothing));
  if (!(std::isfinite(z_loss) && z_loss >= 0.0))
    throw std::invalid_argument("z_loss must be finite and >= 0, got " + std::to_string(z_loss));
  if (class_weight != nullptr) {
    if (class_weight_stride < 0) throw std::invalid_argument("class_weight: negative stride");
    for (int64_t j = 0; j < vocab; ++j) {
      const float w = class_weight[j * class_weight_stride];
      if (!(std::isfinite(w) && w >= 0.0f))
        throw std::invalid_argument("class_weight must hold finite values >= 0, got " + std::to_string(w) +
                                    " at class " + std::to_string(j));
    }
  }
}

void sample_stats_cpu(const LogitsView& logits, const LabelsView& labels, int64_t ignore_index,
                      const Config& config, const SampleStatsOutput& out, const TokenStatsOutput& tokens,
                      const LossOptions& options) {
  check_views(logits, labels);
  options.validate(logits.vocab);
  if (logits.samples == 0) return;  // empty batch: nothing to write (outputs may be null)
  if (out.loss == nullptr || out.confidence == nullptr || out.label_prob == nullptr || out.correct == nullptr ||
      out.entropy == nullptr || out.el2n == nullptr || out.valid_tokens == nullptr || out.bucket == nullptr)
    throw std::invalid_argument("sample_stats_cpu: every per-sample output is required");
  const int64_t S = logits.samples;
  const int64_t T = logits.tokens;
  const int64_t rows = S * T;

  // Token values go to the caller's buffers when given, else to scratch (O(S T), small).
  std::vector<float> scratch;
  float* tok[6] = {tokens.loss, tokens.confidence, tokens.label_prob, tokens.correct, tokens.entropy, tokens.el2n};
  int missing = 0;
  for (int k = 0; k < 6; ++k) missing += tok[k] == nullptr ? 1 : 0;
  scratch.resize(static_cast<size_t>(missing) * static_cast<size_t>(rows));
  for (int k = 0, used = 0; k < 6; ++k) {
    if (tok[k] == nullptr) tok[k] = scratch.data() + static_cast<size_t>(used++) * static_cast<size_t>(rows);
  }
  std::vector<uint8_t> valid_scratch;
  uint8_t* valid = tokens.valid;
  if (valid == nullptr) {
    valid_scratch.resize(static_cast<size_t>(rows));
    valid = valid_scratch.data();
  }
  std::vector<uint8_t> bad(static_cast<size_t>(rows));

  if (options.plain()) {
    switch (logits.dtype) {
      case ScalarType::kFloat32: token_pass<float>(logits, labels, ignore_index, tok, tokens.lse, valid, bad.data()); break;
      case ScalarType::kFloat64: token_pass<double>(logits, labels, ignore_index, tok, tokens.lse, valid, bad.data()); break;
      case ScalarType::kBFloat16: token_pass<BF16>(logits, labels, ignore_index, tok, tokens.lse, valid, bad.data()); break;
      case ScalarType::kFloat16: token_pass<FP16>(logits, labels, ignore_index, tok, tokens.lse, valid, bad.data()); break;
      default: throw std::invalid_argument("sample_stats_cpu: unsupported logits dtype");
    }
    if (tokens.train_loss != nullptr) std::memcpy(tokens.train_loss, tok[0], static_cast<size_t>(rows) * sizeof(float));
  } else {
    OptionsPlan plan;
    make_plan(options, logits.vocab, plan);
    float* tl = tokens.train_loss;
    switch (logits.dtype) {
      case ScalarType::kFloat32: token_pass_options<float>(logits, labels, ignore_index, plan, tok, tl, tokens.lse, valid, bad.data()); break;
      case ScalarType::kFloat64: token_pass_options<double>(logits, labels, ignore_index, plan, tok, tl, tokens.lse, valid, bad.data()); break;
      case ScalarType::kBFloat16: token_pass_options<BF16>(logits, labels, ignore_index, plan, tok, tl, tokens.lse, valid, bad.data()); break;
      case ScalarType::kFloat16: token_pass_options<FP16>(logits, labels, ignore_index, plan, tok, tl, tokens.lse, valid, bad.data()); break;
      default: throw std::invalid_argument("sample_stats_cpu: unsupported logits dtype");
    }
  }

  // 3. per-sample means over valid tokens, in double like the reference, and the bucket.
#pragma omp parallel for schedule(static) if (S * T >= kParallelMinElements)
  for (int64_t s = 0; s < S; ++s) {
    double sums[6] = {0, 0, 0, 0, 0, 0};
    int64_t count = 0;
    bool spoiled = false;
    // Lowest label probability over the valid tokens (the margin rule of "correct").
    float min_label_prob = std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < T; ++t) {
      const int64_t r = s * T + t;
      spoiled |= bad[r] != 0;
      if (!valid[r]) continue;
      ++count;
      for (int k = 0; k < 6; ++k) sums[k] += static_cast<double>(tok[k][r]);
      min_label_prob = std::min(min_label_prob, tok[2][r]);
    }
    float means[6];
    for (int k = 0; k < 6; ++k)
      means[k] = (spoiled || count == 0) ? kNaN : static_cast<float>(sums[k] / static_cast<double>(count));
    out.loss[s] = means[0];
    out.confidence[s] = means[1];
    out.label_prob[s] = means[2];
    out.correct[s] = means[3];
    out.entropy[s] = means[4];
    out.el2n[s] = means[5];
    out.valid_tokens[s] = static_cast<int32_t>(count);
    out.bucket[s] = instant_bucket(means[1], means[3], min_label_prob, config);
  }
}

void cross_entropy_backward_cpu(const LogitsView& logits, const LabelsView& labels, const double* lse,
                                const float* token_scale, int64_t ignore_index, void* grad,
                                int64_t grad_sample_stride, int64_t grad_token_stride, const LossOptions& options) {
  check_views(logits, labels);
  options.validate(logits.vocab);
  if (logits.samples * logits.tokens == 0) return;
  if (lse == nullptr || token_scale == nullptr || grad == nullptr)
    throw std::invalid_argument("cross_entropy_backward_cpu: lse, token_scale and grad are required");
  if (grad_sample_stride < 0 || grad_token_stride < 0) throw std::invalid_argument("grad: negative strides");
  if (!options.plain()) {
    OptionsPlan plan;
    make_plan(options, logits.vocab, plan);
    switch (logits.dtype) {
      case ScalarType::kFloat32:
        backward_pass_options<float>(logits, labels, lse, token_scale, ignore_index, static_cast<float*>(grad),
                                     grad_sample_stride, grad_token_stride, plan);
        return;
      case ScalarType::kFloat64:
        backward_pass_options<double>(logits, labels, lse, token_scale, ignore_index, static_cast<double*>(grad),
                                      grad_sample_stride, grad_token_stride, plan);
        return;
      case ScalarType::kBFloat16:
        backward_pass_options<BF16>(logits, labels, lse, token_scale, ignore_index, static_cast<BF16*>(grad),
                                    grad_sample_stride, grad_token_stride, plan);
        return;
      case ScalarType::kFloat16:
        backward_pass_options<FP16>(logits, labels, lse, token_scale, ignore_index, static_cast<FP16*>(grad),
                                    grad_sample_stride, grad_token_stride, plan);
        return;
      default: throw std::invalid_argument("cross_entropy_backward_cpu: unsupported logits dtype");
    }
  }
  switch (logits.dtype) {
    case ScalarType::kFloat32:
      backward_pass<float>(logits, labels, lse, token_scale, ignore_index, static_cast<float*>(grad),
                           grad_sample_stride, grad_token_stride);
      break;
    case ScalarType::kFloat64:
      backward_pass<double>(logits, labels, lse, token_scale, ignore_index, static_cast<double*>(grad),
                            grad_sample_stride, grad_token_stride);
      break;
    case ScalarType::kBFloat16:
      backward_pass<BF16>(logits, labels, lse, token_scale, ignore_index, static_cast<BF16*>(grad),
                          grad_sample_stride, grad_token_stride);
      break;
    case ScalarType::kFloat16:
      backward_pass<FP16>(logits, labels, lse, token_scale, ignore_index, static_cast<FP16*>(grad),
                          grad_sample_stride, grad_token_stride);
      break;
    default: throw std::invalid_argument("cross_entropy_backward_cpu: unsupported logits dtype");
  }
}

}  // namespace geko
