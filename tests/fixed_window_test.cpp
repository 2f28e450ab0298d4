// Exact semantics of FixedWindow on hand-driven time.
#include "ratekeeper/policy/fixed_window.hpp"

#include <limits>

#include "ratekeeper/ratekeeper.hpp"
#include "test_util.hpp"

using namespace ratekeeper;
using rk_test::drive;
using rk_test::kMs;
using rk_test::kSec;

namespace {
FixedWindow make(Rate r) {
  auto w = FixedWindow::create(r);
  REQUIRE(w.ok());
  return *w;
}
}  // namespace

TEST_CASE("bad configuration is kInvalidArgument", "[policy][fixed]") {
  CHECK(FixedWindow::create(per_minute(0)).status().code() ==
        absl::StatusCode::kInvalidArgument);
  CHECK(FixedWindow::create(Rate{5, Nanos{0}}).status().code() ==
        absl::StatusCode::kInvalidArgument);
  CHECK(FixedWindow::create(Rate{5, Nanos{-1}}).status().code() ==
        absl::StatusCode::kInvalidArgument);
  CHECK(FixedWindow::create(
            Rate{std::numeric_limits<std::uint64_t>::max(), Nanos{1}})
            .status()
            .code() == absl::StatusCode::kInvalidArgument);
  CHECK(FixedWindow::create(Rate{FixedWindow::kMaxLimit, Nanos{1}}).ok());
}

TEST_CASE("windows are clock-aligned and reset at the boundary",
          "[policy][fixed]") {
  auto d = drive(make(per_second(3)));
  // Start mid-window: the window still ends at the next whole second.
  const std::int64_t t0 = 2 * kSec + 400 * kMs;
  for (std::uint64_t i = 0; i < 3; ++i) {
    const auto r = d.at(t0);
    REQUIRE(r.allowed);
    CHECK(r.remaining == 2 - i);
    CHECK(r.reset_after == Nanos{600 * kMs});
  }
  const auto r = d.at(t0 + 100 * kMs);
  CHECK_FALSE(r.allowed);
  CHECK(r.retry_after == Nanos{500 * kMs});
  CHECK(r.reset_after == Nanos{500 * kMs});
  CHECK_FALSE(d.at(3 * kSec - 1).allowed);
  const auto next = d.at(3 * kSec);
  CHECK(next.allowed);
  CHECK(next.remaining == 2);
  CHECK(next.reset_after == Nanos{kSec});
}

TEST_CASE("weighted costs and the never case", "[policy][fixed]") {
  auto d = drive(make(per_minute(100)));
  CHECK(d.at(0, 60).remaining == 40);
  const auto r = d.at(kSec, 41);
  CHECK_FALSE(r.allowed);
  CHECK(r.remaining == 40);
  CHECK(r.retry_after == Nanos{59 * kSec});
  CHECK(d.at(kSec, 40).allowed);
  const auto never = d.at(kSec, 101);
  CHECK(never.never());
  CHECK(never.remaining == 0);
  const auto fresh = d.peek(60 * kSec, 101);
  CHECK(fresh.never());
  CHECK(fresh.remaining == 100);
  CHECK(fresh.reset_after == Nanos{0});
}

TEST_CASE("settle returns to the window it was charged in", "[policy][fixed]") {
  auto d = drive(make(per_second(10)));
  REQUIRE(d.at(100 * kMs, 8).allowed);
  const auto take = d.last;
  d.give_back(200 * kMs, take, 5);
  CHECK(d.peek(200 * kMs, 0).remaining == 7);
  d.give_back(200 * kMs, take, 50);  // capped at the take
  CHECK(d.peek(200 * kMs, 0).remaining == 10);
  REQUIRE(d.at(900 * kMs, 10).allowed);
  const auto closing = d.last;
  REQUIRE(d.at(kSec + 1, 10).allowed);
  // Charged in the window that closed: dropped, the new window keeps its
  // count.
  d.give_back(kSec + 2, closing, 10);
  CHECK(d.peek(kSec + 2, 0).remaining == 0);
  // An excess is counted in now's window, whatever the take's.
  d.settle(kSec + 3, closing, 12);
  CHECK(d.state.count == 12);
}

TEST_CASE("idle and the zeroed state", "[policy][fixed]") {
  auto d = drive(make(per_second(2)));
  CHECK(d.policy.idle(FixedWindow::State{}, Nanos{0}));
  CHECK(d.peek(-3 * kSec, 2).allowed);
  REQUIRE(d.at(5 * kSec).allowed);
  CHECK_FALSE(d.policy.idle(d.state, Nanos{6 * kSec - 1}));
  CHECK(d.policy.idle(d.state, Nanos{6 * kSec}));
}

TEST_CASE("a clock stepping back keeps the newer window's count",
          "[policy][fixed]") {
  auto d = drive(make(per_second(5)));
  REQUIRE(d.at(10 * kSec + 1, 5).allowed);
  const auto back = d.at(9 * kSec + 500 * kMs);  // an earlier window
  CHECK_FALSE(back.allowed);
  CHECK(back.remaining == 0);
  // It resets when the clock reaches the end of the state's window.
  CHECK(back.retry_after == Nanos{1500 * kMs});
}

// Issue 17 (examiner's w12): "a zero cost is always allowed, counts nothing
// and changes no state" (docs/policies.md), the count above the limit too:
// charged, settled above the take, or the limit lowered below it by
// reconfigure(). Windows of 1 s; at 0.25 s a count above the limit leaves
// remaining 0 and, as a denial's, reset_after 750 ms (the state idle then).
TEST_CASE("fixed window: a zero cost is allowed above the limit",
          "[i17][policy][fixed]") {
  const Nanos at{250 * kMs};
  const Nanos reset{750 * kMs};
  const auto zero_over = [&](const Decision& d) {
    CHECK(d.allowed);
    CHECK(d.remaining == 0);
    CHECK(d.retry_after == Nanos{0});
    CHECK(d.reset_after == reset);
  };
  SECTION("policy: charged, and settled above the take") {
    const FixedWindow w = FixedWindow::create(per_second(4)).value();
    const auto full = w.step(FixedWindow::State{}, at, 4);
    REQUIRE(full.decision.allowed);
    const auto charged = w.charge(full.next, at, 3);  // 7 of 4
    const auto z = w.step(charged, at, 0);
    zero_over(z.decision);
    CHECK(z.next == charged);
    const auto took = w.step(FixedWindow::State{}, at, 2);
    const auto settled =
        w.settle(took.next, at, w.place(FixedWindow::State{}, at, 2), 2, 6);
    const auto z2 = w.step(settled, at, 0);
    zero_over(z2.decision);
    CHECK(z2.next == settled);
    CHECK_FALSE(w.step(settled, at, 1).decision.allowed);
  }
  SECTION("Limit: the limit lowered below the count, and charge-on-reject") {
    auto l = make_limit({.name = "w", .charge_on_reject = true},
                        FixedWindow::create(per_second(10)).value())
                 .value();
    REQUIRE(l->acquire("k", 4, at).allowed);
    REQUIRE(l->reconfigure(FixedWindow::create(per_second(2)).value()).ok());
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
