// ratekeeper/decision.hpp: the answer to "may this call go ahead?", and units.
//
// Defines:
//   Nanos     integer nanoseconds (std::chrono::nanoseconds): every time and
//             duration in ratekeeper, so a unit can never be mixed up.
//   Cost      what one call weighs: 1 for a request, N for N tokens.
//   Rate      `count` units per `period`, built with per_second(),
//   per_minute(),
//             per_hour(), per_day() or per(count, any_period).
//   Decision  allowed, limit, remaining, retry_after, reset_after.
//   kNever    the retry_after of a call that can never be admitted (its cost
//             exceeds the limit's capacity): no amount of waiting helps.
//
// A deny is a Decision, not an error; configuration errors are absl::Status
// values returned by the policies' factories.
#ifndef RATEKEEPER_DECISION_HPP_
#define RATEKEEPER_DECISION_HPP_

#include <chrono>
#include <cstdint>
#include <ratio>

#include "ratekeeper/detail/math.hpp"

namespace ratekeeper {

// Integer nanoseconds: times since a clock's epoch and durations alike.
using Nanos = std::chrono::nanoseconds;
static_assert(sizeof(Nanos::rep) == 8, "ratekeeper needs 64-bit nanoseconds");

// Cost of one call in the limit's unit (requests, tokens, ...).
using Cost = std::uint64_t;

// retry_after of a call that no wait can admit: its cost exceeds the capacity.
inline constexpr Nanos kNever = Nanos::max();

// Rate: `count` units per `period`. Plain data; validated by the policies'
// factories (a zero count or a non-positive period is kInvalidArgument there).
struct Rate {
  std::uint64_t count = 0;
  Nanos period{0};

  friend constexpr bool operator==(const Rate&, const Rate&) = default;
};

// per
//
// `count` per any period, e.g. per(500, std::chrono::minutes(5)). The
// period is converted to Nanos as std::chrono::duration_cast does
// (truncated toward zero), saturated where it does not fit: a period longer
// than Nanos::max() (about 292 years) becomes Nanos::max(), one below
// Nanos::min() becomes Nanos::min() (rejected by every policy's factory as
// non-positive), a NaN becomes 0 (rejected too). Never undefined behaviour.
template <class Rep, class Period>
constexpr Rate per(std::uint64_t count,
                   std::chrono::duration<Rep, Period> period) noexcept {
  if constexpr (std::chrono::treat_as_floating_point_v<Rep>) {
    const long double ns =
        std::chrono::duration<long double, std::nano>(period).count();
    if (!(ns == ns)) return Rate{count, Nanos{0}};
    // 2^63, exact in a long double.
    constexpr long double kLimit = 9223372036854775808.0L;
    if (ns >= kLimit) return Rate{count, Nanos::max()};
    if (ns <= -kLimit) return Rate{count, Nanos::min()};
    return Rate{count, Nanos{static_cast<Nanos::rep>(ns)}};
  } else {
    static_assert(sizeof(Rep) <= 8, "per: at most 64-bit counts");
    using R = std::ratio_divide<Period, std::nano>;
    const detail::i128 ns = static_cast<detail::i128>(period.count()) *
                            static_cast<detail::i128>(R::num) /
                            static_cast<detail::i128>(R::den);
    return Rate{count, Nanos{detail::clamp_i64(ns)}};
  }
}

constexpr Rate per_second(std::uint64_t count) noexcept {
  return Rate{count, std::chrono::seconds(1)};
}
constexpr Rate per_minute(std::uint64_t count) noexcept {
  return Rate{count, std::chrono::minutes(1)};
}
constexpr Rate per_hour(std::uint64_t count) noexcept {
  return Rate{count, std::chrono::hours(1)};
}
constexpr Rate per_day(std::uint64_t count) noexcept {
  return Rate{count, std::chrono::hours(24)};
}

// Decision: the answer of a limit to one call.
//
//   allowed      the call may go ahead (and, from acquire(), was counted).
//   limit        the limit's capacity: the burst of a token bucket, the count
//                per window of a window policy.
//   remaining    what a call could still take right now, after this decision
//                (0..limit). A call of cost <= remaining made at the same
//                instant would be allowed.
//   retry_after  0 when allowed. When denied, the exact wait after which the
//                same call would be allowed if nothing else happened: denied
//                1 ns before it, allowed at it. kNever when cost > limit.
//   reset_after  the wait until the limit is back to full capacity.
//
// `if (decision)` tests `allowed`.
struct [[nodiscard]] Decision {
  bool allowed = false;
  std::uint64_t limit = 0;
  std::uint64_t remaining = 0;
  Nanos retry_after{0};
  Nanos reset_after{0};

  constexpr explicit operator bool() const noexcept { return allowed; }

  // never
  //
  // True when the call can never be admitted by this limit, however long the
  // caller waits (its cost exceeds the capacity).
  constexpr bool never() const noexcept { return retry_after == kNever; }

  friend constexpr bool operator==(const Decision&, const Decision&) = default;
};

}  // namespace ratekeeper

#endif  // RATEKEEPER_DECISION_HPP_
