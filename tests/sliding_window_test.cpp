// Exact semantics of SlidingWindow (two-window weighted counter).
#include "ratekeeper/policy/sliding_window.hpp"

#include <limits>

#include "ratekeeper/ratekeeper.hpp"
#include "test_util.hpp"

using namespace ratekeeper;
using rk_test::drive;
using rk_test::kMs;
using rk_test::kSec;

namespace {
SlidingWindow make(Rate r) {
  auto w = SlidingWindow::create(r);
  REQUIRE(w.ok());
  return *w;
}
}  // namespace

TEST_CASE("bad configuration is kInvalidArgument", "[policy][sliding]") {
  CHECK(SlidingWindow::create(per_minute(0)).status().code() ==
        absl::StatusCode::kInvalidArgument);
  CHECK(SlidingWindow::create(Rate{5, Nanos{0}}).status().code() ==
        absl::StatusCode::kInvalidArgument);
  CHECK(SlidingWindow::create(per_second(SlidingWindow::kMaxLimit + 1))
            .status()
            .code() == absl::StatusCode::kInvalidArgument);
  CHECK(SlidingWindow::create(per_second(SlidingWindow::kMaxLimit)).ok());
}

TEST_CASE("the previous window weighs by the share still covered",
          "[policy][sliding]") {
  auto d = drive(make(per_second(10)));
  REQUIRE(d.at(500 * kMs, 10).allowed);  // window 0 full
  CHECK_FALSE(d.at(900 * kMs).allowed);
  // At 1.25 s the previous window weighs 0.75: estimate 7.5, room 2.5 -> 2.
  const auto r = d.at(1250 * kMs, 0);
  CHECK(r.remaining == 2);
  CHECK(d.at(1250 * kMs, 2).allowed);
  // Estimate now 7.5 + 2 = 9.5: one more needs prev weight <= 0.7, i.e.
  // e >= 300 ms.
  const auto denied = d.at(1250 * kMs);
  CHECK_FALSE(denied.allowed);
  CHECK(denied.retry_after == Nanos{50 * kMs});
  CHECK_FALSE(d.at(1300 * kMs - 1).allowed);
  CHECK(d.at(1300 * kMs).allowed);
  // reset_after: the current window's units are forgotten at the end of the
  // next window.
  CHECK(d.peek(1300 * kMs, 0).reset_after == Nanos{1700 * kMs});
}

TEST_CASE("retry_after into the next window", "[policy][sliding]") {
  auto d = drive(make(per_second(10)));
  REQUIRE(d.at(0, 4).allowed);
  REQUIRE(d.at(900 * kMs, 6).allowed);  // cur = 10 in window 0
  // cost 8: the next window needs 10 * (1 - e) + 8 <= 10 -> e >= 0.8 s.
  const auto r = d.at(950 * kMs, 8);
  CHECK_FALSE(r.allowed);
  CHECK(r.retry_after == Nanos{850 * kMs});
  CHECK_FALSE(d.at(1800 * kMs - 1, 8).allowed);
  CHECK(d.at(1800 * kMs, 8).allowed);
}

TEST_CASE("retry_after when the wait ends exactly at the boundary",
          "[policy][sliding]") {
  auto d = drive(make(per_second(10)));
  REQUIRE(d.at(100 * kMs, 10).allowed);
  const auto r = d.at(200 * kMs, 10);  // needs prev == 0: window 2
  CHECK(r.retry_after == Nanos{1800 * kMs});
  CHECK_FALSE(d.at(2 * kSec - 1, 10).allowed);
  CHECK(d.at(2 * kSec, 10).allowed);
}

TEST_CASE("the worst case is 2L-1 in a sliding window", "[policy][sliding]") {
  const std::uint64_t limit = 10;
  auto d = drive(make(per_second(limit)));
  // L at the very end of window 0, then greedy through window 1.
  REQUIRE(d.at(kSec - 1, limit).allowed);
  std::uint64_t second = 0;
  for (std::int64_t t = kSec; t < 2 * kSec - 1; t += kMs) {
    while (d.at(t).allowed) ++second;
  }
  // Within (kSec - 1, 2 kSec - 1): one sliding window of length 1 s.
  CHECK(limit + second == 2 * limit - 1);
}

TEST_CASE("refund goes to the window that was charged", "[policy][sliding]") {
  auto d = drive(make(per_second(10)));
  REQUIRE(d.at(100 * kMs, 2).allowed);
  const auto old = d.last;
  REQUIRE(d.at(1800 * kMs, 6).allowed);
  const auto in1 = d.last;
  REQUIRE(d.at(2100 * kMs, 3).allowed);
  const auto in2 = d.last;
  // Give back 2 charged in window 1 (now the previous window).
  d.give_back(2100 * kMs, in1, 2);
  CHECK(d.state.prev == 4);
  CHECK(d.state.cur == 3);
  d.give_back(2100 * kMs, in2, 9);  // capped at the take
  CHECK(d.state.cur == 0);
  // Charged two windows ago: dropped.
  d.give_back(2100 * kMs, old, 2);
  CHECK(d.state.prev == 4);
}

TEST_CASE("idle and the zeroed state", "[policy][sliding]") {
  auto d = drive(make(per_second(3)));
  CHECK(d.policy.idle(SlidingWindow::State{}, Nanos{0}));
  CHECK(d.peek(-7 * kSec, 3).allowed);
  REQUIRE(d.at(500 * kMs).allowed);
  CHECK_FALSE(d.policy.idle(d.state, Nanos{2 * kSec - 1}));
  CHECK(d.policy.idle(d.state, Nanos{2 * kSec}));
}

TEST_CASE("a clock stepping back is read at the start of the state's window",
          "[policy][sliding]") {
  auto d = drive(make(per_second(10)));
  REQUIRE(d.at(500 * kMs, 10).allowed);
  REQUIRE(d.at(1500 * kMs, 5).allowed);  // estimate at 1.5 s: 5 + 5 = 10
  const auto fwd = d.peek(1500 * kMs, 0).remaining;
  const auto back = d.peek(800 * kMs, 0).remaining;  // behind window 1
  CHECK(back <= fwd);
  CHECK(back == 0);
  // While behind, give-backs are dropped: the charge cannot be placed.
  const auto before = d.state;
  d.give_back(800 * kMs, d.last, 5);
  CHECK(d.state == before);
}

// Issue 17 (examiner's w12): "a zero cost is always allowed, counts nothing
// and changes no state" (docs/policies.md), the count above the limit too:
// charged, settled above the take, or the limit lowered below it by
// reconfigure(). Windows of 1 s; at 0.25 s a count above the limit leaves
// remaining 0 and, as a denial's, reset_after 1'750 ms (the state idle then).
TEST_CASE("sliding window: a zero cost is allowed above the limit",
          "[i17][policy][sliding]") {
  const Nanos at{250 * kMs};
  const Nanos reset{1'750 * kMs};
  const auto zero_over = [&](const Decision& d) {
    CHECK(d.allowed);
    CHECK(d.remaining == 0);
    CHECK(d.retry_after == Nanos{0});
    CHECK(d.reset_after == reset);
  };
  SECTION("policy: charged, and settled above the take") {
    const SlidingWindow w = SlidingWindow::create(per_second(4)).value();
    const auto full = w.step(SlidingWindow::State{}, at, 4);
    REQUIRE(full.decision.allowed);
    const auto charged = w.charge(full.next, at, 3);  // 7 of 4
    const auto z = w.step(charged, at, 0);
    zero_over(z.decision);
    CHECK(z.next == charged);
    const auto took = w.step(SlidingWindow::State{}, at, 2);
    const auto settled =
        w.settle(took.next, at, w.place(SlidingWindow::State{}, at, 2), 2, 6);
    const auto z2 = w.step(settled, at, 0);
    zero_over(z2.decision);
    CHECK(z2.next == settled);
    CHECK_FALSE(w.step(settled, at, 1).decision.allowed);
  }
  SECTION("Limit: the limit lowered below the count, and charge-on-reject") {
    auto l = make_limit({.name = "w", .charge_on_reject = true},
                        SlidingWindow::create(per_second(10)).value())
                 .value();
    REQUIRE(l->acquire("k", 4, at).allowed);
    REQUIRE(l->reconfigure(SlidingWindow::create(per_second(2)).value()).ok());
    zero_over(l->acquire("k", 0, at));
    zero_over(l->peek("k", 0, at));
    CHECK_FALSE(l->peek("k", 1, at).allowed);  // 4 of 2: nothing freed
    ManualClock clock{at};
    Chain<ManualClock> chain(clock);
    CHECK_FALSE(chain.acquire({{l.get(), "k", 2}}).allowed);  // charged
    zero_over(l->acquire("k", 0, at));
    CHECK(chain.acquire({{l.get(), "k", 0}}).allowed);
  }
}
