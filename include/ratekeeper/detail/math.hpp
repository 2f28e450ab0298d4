// ratekeeper/detail/math.hpp: exact integer helpers shared by the policies.
//
// Internal. 128-bit intermediates, floor and ceiling division, saturating
// conversions. Every policy computes with these and nothing else, so that no
// product overflows and no quotient rounds the wrong way.
#ifndef RATEKEEPER_DETAIL_MATH_HPP_
#define RATEKEEPER_DETAIL_MATH_HPP_

#include <cstdint>
#include <limits>

#include "ratekeeper/config.hpp"

namespace ratekeeper::detail {

// GCC and Clang provide __int128 on every 64-bit target ratekeeper supports;
// __extension__ keeps -Wpedantic quiet about it.
__extension__ using i128 = __int128;
__extension__ using u128 = unsigned __int128;

inline constexpr std::int64_t kI64Max =
    std::numeric_limits<std::int64_t>::max();
inline constexpr std::int64_t kI64Min =
    std::numeric_limits<std::int64_t>::min();
inline constexpr std::uint64_t kU64Max =
    std::numeric_limits<std::uint64_t>::max();

// floor_div
//
// Floor of a / b for b > 0, also for negative a (C++ division truncates).
constexpr i128 floor_div(i128 a, i128 b) noexcept {
  RATEKEEPER_ASSERT(b > 0, "floor_div needs a positive divisor");
  i128 q = a / b;
  if (a % b != 0 && a < 0) --q;
  return q;
}

// ceil_div
//
// Ceiling of a / b for b > 0, also for negative a.
constexpr i128 ceil_div(i128 a, i128 b) noexcept {
  RATEKEEPER_ASSERT(b > 0, "ceil_div needs a positive divisor");
  i128 q = a / b;
  if (a % b != 0 && a > 0) ++q;
  return q;
}

// floor_div_i64
//
// floor_div for 64-bit operands, b > 0: one 64-bit division.
constexpr std::int64_t floor_div_i64(std::int64_t a, std::int64_t b) noexcept {
  RATEKEEPER_ASSERT(b > 0, "floor_div_i64 needs a positive divisor");
  std::int64_t q = a / b;
  if (a % b != 0 && a < 0) --q;
  return q;
}

// div_pos
//
// a / b for a >= 0, b > 0, with one 64-bit division when both fit (the
// usual case), instead of the 128-bit library call.
constexpr i128 div_pos(i128 a, i128 b) noexcept {
  RATEKEEPER_ASSERT(a >= 0 && b > 0, "div_pos needs a >= 0 and b > 0");
  if (((a | b) >> 64) == 0) {
    return static_cast<i128>(static_cast<std::uint64_t>(a) /
                             static_cast<std::uint64_t>(b));
  }
  return a / b;
}

// DivBy
//
// floor(n / d) for a divisor d >= 1 fixed in advance and any 64-bit n, with
// two 64x64->128 multiplications instead of a division (a DIV costs 10 to
// 40+ cycles, depending on the CPU; the policies divide by one constant per
// call on the hot path). m = ceil(2^128 / d): then n * m / 2^128 =
// n / d + n * e / (d * 2^128) with e = m * d - 2^128 in [0, d), and the
// second term is below 2^-64 <= 1 / d, too little to carry n / d past the
// next integer, so the floor is exact (the round-up method of Granlund and
// Montgomery, with a 128-bit multiplier so that no shift is needed).
// Checked against the hardware division in math_test (token_bucket_test).
class DivBy {
 public:
  constexpr DivBy() noexcept = default;
  constexpr explicit DivBy(std::uint64_t d) noexcept
      : m_(d > 1 ? ~u128{0} / d + 1 : 0) {
    RATEKEEPER_ASSERT(d > 0, "DivBy needs a positive divisor");
  }
  // floor(n / d). Pure.
  constexpr std::uint64_t operator()(std::uint64_t n) const noexcept {
    if (m_ == 0) return n;  // d == 1
    const u128 lo = static_cast<u128>(n) * static_cast<std::uint64_t>(m_);
    const u128 hi =
        static_cast<u128>(n) * static_cast<std::uint64_t>(m_ >> 64) +
        (lo >> 64);
    return static_cast<std::uint64_t>(hi >> 64);
  }

 private:
  u128 m_ = 0;  // ceil(2^128 / d); 0 for d == 1 (2^128 does not fit)
};

// clamp_i64 / clamp_u64
//
// The value saturated into the target's range.
constexpr std::int64_t clamp_i64(i128 v) noexcept {
  if (v > kI64Max) return kI64Max;
  if (v < kI64Min) return kI64Min;
  return static_cast<std::int64_t>(v);
}

constexpr std::uint64_t clamp_u64(i128 v) noexcept {
  if (v < 0) return 0;
  if (v > static_cast<i128>(kU64Max)) return kU64Max;
  return static_cast<std::uint64_t>(v);
}

// gcd of two positive numbers.
constexpr std::uint64_t gcd(std::uint64_t a, std::uint64_t b) noexcept {
  while (b != 0) {
    const std::uint64_t t = a % b;
    a = b;
    b = t;
  }
  return a;
}

}  // namespace ratekeeper::detail

#endif  // RATEKEEPER_DETAIL_MATH_HPP_
