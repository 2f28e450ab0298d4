// ratekeeper/budget/period.hpp: budget periods, and a budget as a Policy.
//
// Defines:
//   SystemClock   a Clock of Unix time (budgets reset on calendar dates, so
//                 their clock is the wall clock; rate limits keep SteadyClock)
//   Period        a calendar day, week (from Monday) or month in a time zone
//                 (abseil's zones: DST-correct, a spring day is 23 hours), or
//                 a rolling window of fixed length
//   PeriodBudget  a Policy: at most `limit` units (nano-USD or tokens) per
//                 period, reset at the period's start; charge() counts an
//                 overage that settles above the limit
//
// A budget's state is a period index and what was spent in it, 16 bytes like
// every state, so budgets live in any store (in-memory, sharded, Redis).
#ifndef RATEKEEPER_BUDGET_PERIOD_HPP_
#define RATEKEEPER_BUDGET_PERIOD_HPP_

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/time/civil_time.h"
#include "absl/time/time.h"
#include "ratekeeper/decision.hpp"
#include "ratekeeper/detail/math.hpp"
#include "ratekeeper/detail/strings.hpp"
#include "ratekeeper/policy/policy.hpp"

namespace ratekeeper {

// SystemClock: nanoseconds since the Unix epoch.
struct SystemClock {
  Nanos now() const noexcept {
    return std::chrono::duration_cast<Nanos>(
        std::chrono::system_clock::now().time_since_epoch());
  }
};

enum class PeriodKind : std::uint8_t { kDay, kWeek, kMonth, kRolling };

// Period: how a budget's time is cut.
class Period {
 public:
  // calendar
  //
  // Days, weeks (Monday to Sunday) or months in `time_zone` ("UTC",
  // "Europe/Paris", "America/New_York"). kInvalidArgument for an unknown
  // zone (tzdata must be installed) or kRolling.
  static absl::StatusOr<Period> calendar(PeriodKind kind,
                                         std::string_view time_zone = "UTC") {
    if (kind == PeriodKind::kRolling) {
      return absl::InvalidArgumentError(
          "Period::calendar: use Period::rolling for a rolling window");
    }
    absl::TimeZone tz;
    if (!absl::LoadTimeZone(std::string(time_zone), &tz)) {
      return absl::InvalidArgumentError(
          absl::StrCat("unknown time zone \"", detail::av(time_zone),
                       "\" (is tzdata installed?)"));
    }
    return Period(kind, tz, Nanos{0});
  }

  // rolling
  //
  // Consecutive windows of `length` from the Unix epoch: a "30 days"
  // budget that does not follow the calendar. kInvalidArgument unless
  // positive.
  static absl::StatusOr<Period> rolling(Nanos length) {
    if (length <= Nanos{0}) {
      return absl::InvalidArgumentError(
          "Period::rolling: the length must be positive");
    }
    return Period(PeriodKind::kRolling, absl::UTCTimeZone(), length);
  }

  // Span: one period, [start, end) in Unix time.
  struct Span {
    std::int64_t index = 0;
    Nanos start{0};
    Nanos end{0};
  };

  // The period holding Unix time `t`: consecutive periods have consecutive
  // indices. A calendar period answers from the bounds of the last period
  // it computed (shared by copies) when `t` is inside them: a time-zone
  // conversion only when a period turns.
  Span span_of(Nanos t) const noexcept {
    if (kind_ == PeriodKind::kRolling) {
      const std::int64_t i = detail::floor_div_i64(t.count(), length_.count());
      return Span{i, start_of(i), start_of(i == INT64_MAX ? i : i + 1)};
    }
    const std::uint64_t v1 = cache_->version.load(std::memory_order_acquire);
    if ((v1 & 1) == 0) {
      const std::int64_t start = cache_->start.load(std::memory_order_relaxed);
      const std::int64_t end = cache_->end.load(std::memory_order_relaxed);
      const std::int64_t index = cache_->index.load(std::memory_order_relaxed);
      std::atomic_thread_fence(std::memory_order_acquire);
      if (cache_->version.load(std::memory_order_relaxed) == v1 &&
          start <= t.count() && t.count() < end) {
        return Span{index, Nanos{start}, Nanos{end}};
      }
    }
    const std::int64_t index = index_slow(t);
    const Span span{index, start_of(index), start_of(index + 1)};
    std::uint64_t v = v1;
    if ((v & 1) == 0 && cache_->version.compare_exchange_strong(
                            v, v + 1, std::memory_order_acquire)) {
      cache_->start.store(span.start.count(), std::memory_order_relaxed);
      cache_->end.store(span.end.count(), std::memory_order_relaxed);
      cache_->index.store(index, std::memory_order_relaxed);
      cache_->version.store(v + 2, std::memory_order_release);
    }
    return span;
  }

  std::int64_t index_of(Nanos t) const noexcept {
    if (kind_ == PeriodKind::kRolling) {
      return detail::floor_div_i64(t.count(), length_.count());
    }
    return span_of(t).index;
  }

 private:
  std::int64_t index_slow(Nanos t) const noexcept {
    const absl::CivilSecond cs =
        absl::ToCivilSecond(absl::FromUnixNanos(t.count()), tz_);
    const absl::CivilDay day(cs);
    switch (kind_) {
      case PeriodKind::kDay:
        return day - absl::CivilDay(1970, 1, 1);
      case PeriodKind::kWeek:
        // 1970-01-05 was a Monday.
        return detail::floor_div_i64(day - absl::CivilDay(1970, 1, 5), 7);
      case PeriodKind::kMonth: {
        const absl::CivilMonth m(cs);
        return m - absl::CivilMonth(1970, 1);
      }
      case PeriodKind::kRolling:
        break;
    }
    return 0;
  }

 public:
  // The Unix time at which period `index` starts (for a calendar period in
  // a zone whose midnight is skipped by a DST jump, the first instant of
  // that day).
  Nanos start_of(std::int64_t index) const noexcept {
    if (kind_ == PeriodKind::kRolling) {
      return Nanos{detail::clamp_i64(static_cast<detail::i128>(index) *
                                     length_.count())};
    }
    absl::CivilDay day;
    switch (kind_) {
      case PeriodKind::kDay:
        day = absl::CivilDay(1970, 1, 1) + index;
        break;
      case PeriodKind::kWeek:
        day = absl::CivilDay(1970, 1, 5) + index * 7;
        break;
      case PeriodKind::kMonth:
        day = absl::CivilDay(absl::CivilMonth(1970, 1) + index);
        break;
      case PeriodKind::kRolling:
        break;
    }
    // A midnight skipped by a DST jump starts the day at the jump; one that
    // happens twice starts it at the first.
    const absl::TimeZone::TimeInfo ti = tz_.At(absl::CivilSecond(day));
    const absl::Time t =
        ti.kind == absl::TimeZone::TimeInfo::SKIPPED ? ti.trans : ti.pre;
    return Nanos{absl::ToUnixNanos(t)};
  }

  PeriodKind kind() const noexcept { return kind_; }
  Nanos length() const noexcept { return length_; }
  std::string time_zone() const { return tz_.name(); }

 private:
  Period(PeriodKind k, absl::TimeZone tz, Nanos length)
      : kind_(k), tz_(tz), length_(length), cache_(std::make_shared<Cache>()) {}

  // The bounds of one period, published under a sequence count (odd while
  // written); empty at first.
  struct Cache {
    std::atomic<std::uint64_t> version{0};
    std::atomic<std::int64_t> start{1};
    std::atomic<std::int64_t> end{0};
    std::atomic<std::int64_t> index{0};
  };

  PeriodKind kind_;
  absl::TimeZone tz_;
  Nanos length_;
  std::shared_ptr<Cache> cache_;
};

// PeriodBudget: at most `limit` units per period, the count starting again
// at each period's start. A Policy (and a ChargingPolicy), so a budget runs
// on any store and in any chain. retry_after of a refusal is the time to
// the next period: a budget is not retryable before (errors.hpp:
// kBudgetExhausted, 403).
class PeriodBudget {
 public:
  struct State {
    std::int64_t period = 0;
    std::uint64_t spent = 0;
    friend constexpr bool operator==(const State&, const State&) = default;
  };

  // Largest limit: 2^62 (nano-USD: 4.6e9 USD; or tokens).
  static constexpr std::uint64_t kMaxLimit = std::uint64_t{1} << 62;

  static absl::StatusOr<PeriodBudget> create(std::uint64_t limit,
                                             Period period) {
    if (limit == 0 || limit > kMaxLimit) {
      return absl::InvalidArgumentError(absl::StrCat(
          "PeriodBudget: the limit must be within 1..2^62, got ", limit));
    }
    return PeriodBudget(limit, period);
  }

  Step<State> step(const State& s, Nanos now, Cost cost) const noexcept {
    const Period::Span span = period_.span_of(now);
    const State cur = current(s, span.index);
    const std::uint64_t room = cur.spent >= limit_ ? 0 : limit_ - cur.spent;
    const Nanos until_next = wait_until(
        cur.period == span.index ? span.end : next_start(cur.period), now);
    const Nanos reset = cur.spent == 0 ? Nanos{0} : until_next;
    if (cost > limit_) return {s, Decision{false, limit_, room, kNever, reset}};
    if (cost <= room) {
      const State next{cur.period, cur.spent + cost};
      return {cost == 0 ? s : next,
              Decision{true, limit_, room - cost, Nanos{0},
                       next.spent == 0 ? Nanos{0} : until_next}};
    }
    return {s, Decision{false, limit_, room, until_next, reset}};
  }

  // Placement: the index of the period a take was counted in.
  struct Placement {
    std::int64_t period = 0;
  };

  Placement place(const State& before, Nanos now,
                  Cost /*cost*/) const noexcept {
    return Placement{current(before, period_.index_of(now)).period};
  }

  // settle
  //
  // A take's spend belongs to the period it was taken in, in both
  // directions (budget/rules.hpp, rule 2): below `taken`, the unused part is
  // given back to that period (never below zero, and only while the state
  // holds that period); above, the overage is charged to that period
  // (saturating at kMaxLimit), even when it is settled after the period
  // ended, as long as no later period has spend on this key. Once one has,
  // the state holds only the new period and the old one's change is dropped
  // from it: the new period is never charged for the old one's call (the
  // accountant's books still record it, in the old period). A state with
  // nothing spent is as good as none (the store may reclaim it at any
  // time, and Redis deletes it): it holds no period.
  State settle(const State& s, Nanos /*now*/, const Placement& p, Cost taken,
               Cost actual) const noexcept {
    if (s.spent != 0 && s.period > p.period) return s;
    if (actual > taken) {
      State cur = current(s, p.period);
      const Cost over = actual - taken;
      cur.spent = over >= kMaxLimit - cur.spent ? kMaxLimit : cur.spent + over;
      return cur;
    }
    if (s.period != p.period) return s;  // nothing of that period to refund
    State cur = s;
    cur.spent -= std::min(taken - actual, cur.spent);
    return cur;
  }

  // Counts `cost` whether or not it fits: an overage settled after the call
  // is charged, never lost (saturating at kMaxLimit).
  State charge(const State& s, Nanos now, Cost cost) const noexcept {
    State cur = current(s, period_.index_of(now));
    cur.spent = cost >= kMaxLimit - cur.spent ? kMaxLimit : cur.spent + cost;
    return cur;
  }

  bool idle(const State& s, Nanos now) const noexcept {
    return s.spent == 0 || period_.index_of(now) > s.period;
  }
  Nanos idle_at(const State& s) const noexcept {
    if (s.spent == 0) return Nanos::min();
    return next_start(s.period);
  }
  State merge(const State& a, const State& b) const noexcept {
    if (a.period != b.period) return a.period > b.period ? a : b;
    return a.spent >= b.spent ? a : b;
  }
  std::uint64_t limit() const noexcept { return limit_; }
  const Period& period() const noexcept { return period_; }

  // When the period holding `now` ends: a refusal's resets_at.
  Nanos resets_at(Nanos now) const noexcept { return period_.span_of(now).end; }

 private:
  PeriodBudget(std::uint64_t limit, Period period)
      : limit_(limit), period_(period) {}

  // `s` in period `p` (now's): a state from an earlier period, or with
  // nothing spent, starts empty; one from a later period with spend (the
  // clock stepped back) stays as it is: capacity never grows.
  static State current(const State& s, std::int64_t p) noexcept {
    return p > s.period || s.spent == 0 ? State{p, 0} : s;
  }
  // The wait from `now` to `end`, saturated below kNever: after a far
  // backward step of the clock (a state from a later period) it can exceed
  // 2^63 ns; such a wait is the longest finite one, never kNever, which
  // means "can never pass".
  static Nanos wait_until(Nanos end, Nanos now) noexcept {
    const detail::i128 w = static_cast<detail::i128>(end.count()) - now.count();
    return w >= kNever.count() ? kNever - Nanos{1}
                               : Nanos{detail::clamp_i64(w)};
  }
  Nanos next_start(std::int64_t period) const noexcept {
    return period_.start_of(period == INT64_MAX ? period : period + 1);
  }

  std::uint64_t limit_;
  Period period_;
};

static_assert(ChargingPolicy<PeriodBudget>);

}  // namespace ratekeeper

#endif  // RATEKEEPER_BUDGET_PERIOD_HPP_
