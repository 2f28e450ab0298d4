// Exact semantics of FixedWindow on hand-driven time.
#include "ratekeeper/policy/fixed_window.hpp"

#include <limits>

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
