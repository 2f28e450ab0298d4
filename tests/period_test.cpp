// Budget periods: calendar days, weeks and months in time zones (DST
// included), rolling windows, and PeriodBudget as a policy.
#include "ratekeeper/budget/period.hpp"

#include <chrono>
#include <cstdint>
#include <ratio>

#include "ratekeeper/chain.hpp"
#include "ratekeeper/detail/math.hpp"
#include "ratekeeper/errors.hpp"
#include "ratekeeper/policy/token_bucket.hpp"
#include "test_util.hpp"

using namespace ratekeeper;
using rk_test::kSec;

namespace {
// Unix nanoseconds of a UTC date and time.
Nanos utc(int y, unsigned mo, unsigned d, int h = 0, int mi = 0) {
  const std::chrono::sys_days day{std::chrono::year{y} /
                                  std::chrono::month{mo} / std::chrono::day{d}};
  return std::chrono::duration_cast<Nanos>(
      (day + std::chrono::hours(h) + std::chrono::minutes(mi))
          .time_since_epoch());
}
constexpr std::int64_t kHour = 3600 * kSec;
}  // namespace

TEST_CASE("calendar days follow the zone's midnight, DST included",
          "[period]") {
  const Period ny =
      Period::calendar(PeriodKind::kDay, "America/New_York").value();
  // 2026-03-08: clocks jump from 02:00 to 03:00, the day is 23 hours.
  const std::int64_t d = ny.index_of(utc(2026, 3, 8, 12));
  CHECK(ny.start_of(d) == utc(2026, 3, 8, 5));      // 00:00 EST
  CHECK(ny.start_of(d + 1) == utc(2026, 3, 9, 4));  // 00:00 EDT
  CHECK((ny.start_of(d + 1) - ny.start_of(d)).count() == 23 * kHour);
  CHECK(ny.index_of(utc(2026, 3, 9, 4) - Nanos{1}) == d);
  CHECK(ny.index_of(utc(2026, 3, 9, 4)) == d + 1);
  // 2026-11-01: a 25-hour day.
  const std::int64_t f = ny.index_of(utc(2026, 11, 1, 12));
  CHECK((ny.start_of(f + 1) - ny.start_of(f)).count() == 25 * kHour);
  // UTC days are 86,400 s, numbered from 1970-01-01.
  const Period utc_day = Period::calendar(PeriodKind::kDay).value();
  CHECK(utc_day.index_of(Nanos{0}) == 0);
  CHECK(utc_day.index_of(Nanos{-1}) == -1);
  CHECK(utc_day.start_of(20'000) == Nanos{20'000LL * 86'400 * kSec});
}

TEST_CASE("weeks start on Monday, months on the 1st", "[period]") {
  const Period week = Period::calendar(PeriodKind::kWeek, "UTC").value();
  // 2026-11-30 is a Monday.
  const std::int64_t w = week.index_of(utc(2026, 12, 2));
  CHECK(week.start_of(w) == utc(2026, 11, 30));
  CHECK(week.index_of(utc(2026, 11, 29, 23, 59)) == w - 1);
  const Period month =
      Period::calendar(PeriodKind::kMonth, "Asia/Tokyo").value();
  const std::int64_t m = month.index_of(utc(2026, 12, 15));
  CHECK(month.start_of(m) == utc(2026, 11, 30, 15));  // Dec 1, 00:00 JST
  CHECK(month.start_of(m + 1) == utc(2026, 12, 31, 15));
  CHECK(month.index_of(utc(2026, 11, 30, 14, 59)) == m - 1);
  // February of a leap year.
  const Period utc_month = Period::calendar(PeriodKind::kMonth).value();
  const std::int64_t feb = utc_month.index_of(utc(2028, 2, 10));
  CHECK((utc_month.start_of(feb + 1) - utc_month.start_of(feb)).count() ==
        29 * 24 * kHour);
}

TEST_CASE("rolling windows, and bad periods", "[period]") {
  const Period r = Period::rolling(std::chrono::hours(24 * 30)).value();
  CHECK(r.index_of(Nanos{30LL * 24 * kHour}) == 1);
  CHECK(r.start_of(2) == Nanos{60LL * 24 * kHour});
  CHECK_FALSE(Period::rolling(Nanos{0}).ok());
  CHECK_FALSE(Period::calendar(PeriodKind::kDay, "Mars/Olympus_Mons").ok());
  CHECK_FALSE(Period::calendar(PeriodKind::kRolling).ok());
}

TEST_CASE("a budget per period: hard stop, reset, refunds, overage",
          "[period]") {
  const Period month = Period::calendar(PeriodKind::kMonth).value();
  const auto b = PeriodBudget::create(1'000, month).value();
  rk_test::Driver<PeriodBudget> drv{b};
  const std::int64_t t0 = utc(2026, 11, 28).count();
  CHECK(drv.at(t0, 600).allowed);
  const auto take = drv.last;
  const Decision d = drv.at(t0, 500);
  CHECK_FALSE(d.allowed);
  CHECK(d.remaining == 400);
  CHECK(d.retry_after == utc(2026, 12, 1) - Nanos{t0});  // at month's end
  CHECK(b.resets_at(Nanos{t0}) == utc(2026, 12, 1));
  drv.give_back(t0 + kSec, take, 100);
  CHECK(drv.peek(t0, 0).remaining == 500);
  // An overage settled after the call is charged, never lost: 400 held, the
  // provider counted 900.
  REQUIRE(drv.at(t0 + kSec, 400).allowed);
  drv.settle(t0 + kSec, drv.last, 900);
  CHECK(drv.state.spent == 1'400);
  CHECK(drv.peek(t0, 0).remaining == 0);
  // Settled after the month ended, before another call opened the next
  // month: still the old month's.
  REQUIRE(drv.at(t0 + kSec, 0).allowed);
  const auto zero = drv.last;
  const std::int64_t t1 = utc(2026, 12, 1).count();
  drv.settle(t1 + kSec, zero, 50);
  CHECK(drv.state.spent == 1'450);
  CHECK(drv.state.period == b.period().index_of(Nanos{t0}));
  // The next month starts empty; a change to the last is dropped.
  CHECK(drv.at(t1, 1'000).allowed);
  drv.settle(t1 + 2 * kSec, zero, 500);
  drv.give_back(t1 + 2 * kSec, take, 500);
  CHECK(drv.peek(t1, 0).remaining == 0);
  CHECK(drv.state.spent == 1'000);
  CHECK(drv.at(t1, 1'001).never());
  CHECK_FALSE(PeriodBudget::create(0, month).ok());
}

TEST_CASE("a budget in a chain with a rate limit", "[period]") {
  ManualClock clock(utc(2026, 11, 28, 10));
  Chain<ManualClock> chain(clock);
  auto day = make_limit({.name = "usd_day", .unit = Unit::kTokens},
                        PeriodBudget::create(
                            2'000'000'000,  // $2 in nano-USD
                            Period::calendar(PeriodKind::kDay).value())
                            .value())
                 .value();
  int ok = 0;
  for (int i = 0; i < 5; ++i) {
    ok += chain.acquire({{day.get(), "team-red", 500'000'000}}).allowed;
  }
  CHECK(ok == 4);
  const ChainDecision d = chain.acquire({{day.get(), "team-red", 1}});
  CHECK_FALSE(d.allowed);
  CHECK(d.retry_after == std::chrono::hours(14));
  clock.set(utc(2026, 11, 29));
  CHECK(chain.acquire({{day.get(), "team-red", 500'000'000}}).allowed);
}

// UB at the extremes (issue 14, found under UBSan): each of these overflowed
// a signed 64-bit value before the fix; the asan preset (-fsanitize=
// undefined -fno-sanitize-recover) fails the test on any such overflow.
namespace {
// A value the compiler cannot fold: the arithmetic happens at run time,
// where UBSan sees it.
template <class T>
[[gnu::noinline]] T opaque(T v) {
  asm volatile("" : : "r"(&v) : "memory");
  return v;
}
}  // namespace

TEST_CASE("a budget after a far backward step of the clock saturates its waits",
          "[i14][ub][period]") {
  for (const Period& p : {Period::calendar(PeriodKind::kDay).value(),
                          Period::rolling(std::chrono::hours(24)).value()}) {
    const auto b = PeriodBudget::create(1'000, p).value();
    rk_test::Driver<PeriodBudget> drv{b};
    const std::int64_t t0 = utc(2026, 11, 28).count();
    REQUIRE(drv.at(t0, 600).allowed);
    // The clock steps back to the far past: the state keeps its (later)
    // period, whose end is more than 2^63 ns after `now`.
    const std::int64_t far = opaque(detail::kI64Min + 5);
    const Decision refused = drv.at(far, 500);
    CHECK_FALSE(refused.allowed);
    CHECK(refused.remaining == 400);
    // The true wait (about 349 years) does not fit in Nanos: the longest
    // finite wait, never kNever (which means "can never pass").
    CHECK(refused.retry_after == kNever - Nanos{1});
    CHECK_FALSE(refused.never());
    CHECK(refused.reset_after == kNever - Nanos{1});
    const Decision admitted = drv.at(far, 400);
    CHECK(admitted.allowed);
    CHECK(admitted.remaining == 0);
    CHECK(admitted.reset_after == kNever - Nanos{1});
    // Back at the present, the period and its spend are as they were.
    CHECK(drv.peek(t0, 0).remaining == 0);
    CHECK(drv.peek(t0, 0).reset_after == utc(2026, 11, 29) - Nanos{t0});
  }
}

TEST_CASE("Rejection::ceil_ms near INT64_MAX", "[i14][ub][period]") {
  // ceil(9223372036854775807 / 1e6) = 9223372036855, computed by hand.
  CHECK(Rejection::ceil_ms(opaque(Nanos::max())) == 9'223'372'036'855);
  CHECK(Rejection::ceil_ms(opaque(Nanos::max() - Nanos{775'807})) ==
        9'223'372'036'854);
  CHECK(Rejection::ceil_ms(opaque(Nanos{1})) == 1);
  CHECK(Rejection::ceil_ms(opaque(Nanos{1'000'000})) == 1);
  CHECK(Rejection::ceil_ms(opaque(Nanos{1'000'001})) == 2);
  CHECK(Rejection::ceil_ms(opaque(Nanos{0})) == 0);
  CHECK(Rejection::ceil_ms(opaque(Nanos::min())) == 0);  // never negative
}

TEST_CASE("per() with a period past 292 years saturates", "[i14][ub][period]") {
  // 2,628,000 h = 300 years = 9.4608e18 ns > INT64_MAX (9.22e18).
  const Rate r = per(1, opaque(std::chrono::hours(2'628'000)));
  CHECK(r.count == 1);
  CHECK(r.period == Nanos::max());
  CHECK(per(1, opaque(std::chrono::hours(-2'628'000))).period == Nanos::min());
  // In range, exactly duration_cast (truncation toward zero).
  CHECK(per(7, opaque(std::chrono::hours(2'562'047))).period ==
        Nanos{2'562'047LL * 3'600 * kSec});
  CHECK(per(1, opaque(std::chrono::duration<std::int64_t, std::pico>(1'999)))
            .period == Nanos{1});
  CHECK(per(1, opaque(std::chrono::duration<std::int64_t, std::pico>(-1'999)))
            .period == Nanos{-1});
  CHECK(per(1, opaque(std::chrono::duration<double>(1e300))).period ==
        Nanos::max());
  CHECK(per(1, opaque(std::chrono::duration<double>(1.5))).period ==
        Nanos{1'500'000'000});
  // The policies' factories still reject what cannot be a window.
  CHECK_FALSE(
      TokenBucket::create(per(1, opaque(std::chrono::hours(-2'628'000))), 1)
          .ok());
}
