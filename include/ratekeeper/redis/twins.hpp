// ratekeeper/redis/twins.hpp: what each policy's Lua twin needs (its kind
// and parameters), checked for exactness in Lua's doubles.
#ifndef RATEKEEPER_REDIS_TWINS_HPP_
#define RATEKEEPER_REDIS_TWINS_HPP_

#include <array>
#include <cstdint>
#include <string>
#include <string_view>

#include "absl/container/inlined_vector.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "ratekeeper/budget/period.hpp"
#include "ratekeeper/detail/math.hpp"
#include "ratekeeper/policy/fixed_window.hpp"
#include "ratekeeper/policy/sliding_window.hpp"
#include "ratekeeper/policy/token_bucket.hpp"
#include "ratekeeper/redis/scripts.hpp"

namespace ratekeeper::detail {

// What a policy's Lua twin needs: its script and parameters, checked for
// exactness in doubles.
template <class P>
struct RedisTwin;

inline constexpr std::uint64_t kExact = std::uint64_t{1} << 53;

inline absl::StatusOr<std::uint64_t> whole_micros(std::string_view policy,
                                                  Nanos period) {
  if (period.count() % 1000 != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        detail::av(policy), " in Redis: the period (", period.count(),
        " ns) must be a whole number of microseconds (Redis's TIME unit)"));
  }
  return static_cast<std::uint64_t>(period.count() / 1000);
}

// A twin's arguments: its kind and four parameters.
using TwinParams = std::array<std::string, 5>;

template <>
struct RedisTwin<TokenBucket> {
  static absl::StatusOr<TwinParams> params(const TokenBucket& p) {
    absl::StatusOr<std::uint64_t> period =
        whole_micros("TokenBucket", p.rate().period);
    if (!period.ok()) return period.status();
    const std::uint64_t g = gcd(*period, p.rate().count);
    const std::uint64_t num = *period / g, den = p.rate().count / g;
    if (static_cast<u128>(p.burst()) * num * 4 >= kExact || den >= kExact) {
      return absl::InvalidArgumentError(absl::StrCat(
          "TokenBucket in Redis: burst ", p.burst(), " at ", p.rate().count,
          " per ", *period, " us needs more than 2^53 (Lua's exact integers)"));
    }
    return TwinParams{"tb", std::to_string(num), std::to_string(den),
                      std::to_string(p.burst()), "0"};
  }
};

template <>
struct RedisTwin<FixedWindow> {
  static absl::StatusOr<TwinParams> params(const FixedWindow& p) {
    absl::StatusOr<std::uint64_t> period =
        whole_micros("FixedWindow", p.rate().period);
    if (!period.ok()) return period.status();
    if (p.limit() >= kExact / 2) {
      return absl::InvalidArgumentError(
          "FixedWindow in Redis: the limit must be below 2^52");
    }
    return TwinParams{"fw", std::to_string(*period), std::to_string(p.limit()),
                      "0", "0"};
  }
};

template <>
struct RedisTwin<SlidingWindow> {
  static absl::StatusOr<TwinParams> params(const SlidingWindow& p) {
    absl::StatusOr<std::uint64_t> period =
        whole_micros("SlidingWindow", p.rate().period);
    if (!period.ok()) return period.status();
    if (static_cast<u128>(p.limit()) * *period * 2 >= kExact) {
      return absl::InvalidArgumentError(
          absl::StrCat("SlidingWindow in Redis: ", p.limit(), " per ", *period,
                       " us needs more than 2^53 (Lua's exact integers)"));
    }
    return TwinParams{"sw", std::to_string(*period), std::to_string(p.limit()),
                      "0", "0"};
  }
};

// PeriodBudget: the limit here; the period's index and bounds per call
// (RedisLimit asks the policy's calendar for the period of its time).
template <>
struct RedisTwin<PeriodBudget> {
  static absl::StatusOr<TwinParams> params(const PeriodBudget& p) {
    if (p.limit() >= kExact / 2) {
      return absl::InvalidArgumentError(
          "PeriodBudget in Redis: the limit must be below 2^52");
    }
    return TwinParams{"pb", std::to_string(p.limit()), "0", "0", "0"};
  }
  // The arguments for the period holding `t` (Unix time).
  static TwinParams at(const PeriodBudget& p, Nanos t) {
    const Period::Span span = p.period().span_of(t);
    return TwinParams{"pb", std::to_string(p.limit()),
                      std::to_string(span.index),
                      std::to_string(span.start.count() / 1000),
                      std::to_string((span.end.count() + 999) / 1000)};
  }
};

// A policy's share for one of `n` instances (FailMode::kLocal).
inline absl::StatusOr<TokenBucket> share_of(const TokenBucket& p,
                                            std::uint64_t n) {
  const std::uint64_t count = std::max<std::uint64_t>(1, p.rate().count / n);
  return TokenBucket::create(Rate{count, p.rate().period},
                             std::max<std::uint64_t>(1, p.burst() / n));
}
inline absl::StatusOr<FixedWindow> share_of(const FixedWindow& p,
                                            std::uint64_t n) {
  return FixedWindow::create(
      Rate{std::max<std::uint64_t>(1, p.rate().count / n), p.rate().period});
}
inline absl::StatusOr<SlidingWindow> share_of(const SlidingWindow& p,
                                              std::uint64_t n) {
  return SlidingWindow::create(
      Rate{std::max<std::uint64_t>(1, p.rate().count / n), p.rate().period});
}

inline absl::StatusOr<PeriodBudget> share_of(const PeriodBudget& p,
                                             std::uint64_t n) {
  return PeriodBudget::create(std::max<std::uint64_t>(1, p.limit() / n),
                              p.period());
}

}  // namespace ratekeeper::detail

#endif  // RATEKEEPER_REDIS_TWINS_HPP_
