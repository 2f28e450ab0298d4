// Exact semantics of TokenBucket (GCRA) on hand-driven time.
#include "ratekeeper/policy/token_bucket.hpp"

#include <limits>

#include "test_util.hpp"

using namespace ratekeeper;
using rk_test::drive;
using rk_test::kMs;
using rk_test::kSec;

namespace {
TokenBucket make(Rate r, std::uint64_t burst) {
  auto b = TokenBucket::create(r, burst);
  REQUIRE(b.ok());
  return *b;
}
}  // namespace

TEST_CASE("bad configuration is kInvalidArgument", "[policy][bucket]") {
  const auto code = [](Rate r, std::uint64_t b) {
    return TokenBucket::create(r, b).status().code();
  };
  CHECK(code(per_second(0), 1) == absl::StatusCode::kInvalidArgument);
  CHECK(code(Rate{1, Nanos{0}}, 1) == absl::StatusCode::kInvalidArgument);
  CHECK(code(Rate{1, Nanos{-5}}, 1) == absl::StatusCode::kInvalidArgument);
  CHECK(code(per_second(1), 0) == absl::StatusCode::kInvalidArgument);
  CHECK(code(per_second(std::numeric_limits<std::uint64_t>::max()), 1) ==
        absl::StatusCode::kInvalidArgument);
  CHECK(code(per_second(1), std::numeric_limits<std::uint64_t>::max()) ==
        absl::StatusCode::kInvalidArgument);
  // A burst that takes more than 292 years to refill.
  CHECK(code(per_day(1), 200'000) == absl::StatusCode::kInvalidArgument);
  CHECK(code(per_day(1), 100'000) == absl::StatusCode::kOk);
  const auto st = TokenBucket::create(per_second(1), 0).status();
  CHECK(std::string(st.message()).find("burst") != std::string::npos);
}

TEST_CASE("a full bucket admits burst, then exactly one per interval",
          "[policy][bucket]") {
  auto d = drive(make(per_second(10), 5));
  for (std::uint64_t i = 0; i < 5; ++i) {
    const auto r = d.at(0);
    REQUIRE(r.allowed);
    CHECK(r.limit == 5);
    CHECK(r.remaining == 4 - i);
    CHECK(r.retry_after == Nanos{0});
    CHECK(r.reset_after == Nanos{(i + 1) * 100 * kMs});
  }
  const auto denied = d.at(0);
  CHECK_FALSE(denied.allowed);
  CHECK_FALSE(denied);
  CHECK(denied.remaining == 0);
  CHECK(denied.retry_after == Nanos{100 * kMs});
  CHECK(denied.reset_after == Nanos{500 * kMs});
  // The nanosecond before the refill, and at it.
  CHECK_FALSE(d.at(100 * kMs - 1).allowed);
  const auto at = d.at(100 * kMs);
  CHECK(at.allowed);
  CHECK(at.remaining == 0);
  CHECK(at.reset_after == Nanos{500 * kMs});
}

TEST_CASE("fractional emission intervals are exact", "[policy][bucket]") {
  // 7 per second: tokens at 1/7 s, 2/7 s, ... never drift.
  auto d = drive(make(per_second(7), 1));
  REQUIRE(d.at(0).allowed);
  const auto r = d.at(0);
  CHECK(r.retry_after == Nanos{142'857'143});  // ceil(1e9 / 7)
  CHECK_FALSE(d.at(142'857'142).allowed);
  REQUIRE(d.at(142'857'143).allowed);
  // Second token at 2e9/7 = 285714285.71 ns: allowed at ...286, not ...285.
  CHECK(d.peek(285'714'285).retry_after == Nanos{1});
  CHECK_FALSE(d.at(285'714'285).allowed);
  CHECK(d.at(285'714'286).allowed);
}

TEST_CASE("a busy bucket at 7/s never drifts by a nanosecond",
          "[policy][bucket]") {
  // Burst 2, emptied at 0: from then on token k is due at exactly
  // (k - 2) / 7 s, rounded up to the nanosecond, for thousands of tokens.
  auto d = drive(make(per_second(7), 2));
  REQUIRE(d.at(0, 2).allowed);
  for (std::int64_t k = 3; k <= 7002; ++k) {
    const std::int64_t due = ((k - 2) * kSec + 6) / 7;
    const auto before = d.at(due - 1);
    REQUIRE_FALSE(before.allowed);
    REQUIRE(before.retry_after == Nanos{1});
    REQUIRE(d.at(due).allowed);
  }
}

TEST_CASE("weighted costs", "[policy][bucket]") {
  auto d = drive(make(per_second(10), 100));  // 10 tokens/s, 100 capacity
  CHECK(d.at(0, 30).remaining == 70);
  CHECK(d.at(0, 30).remaining == 40);
  CHECK(d.at(0, 30).remaining == 10);
  const auto r = d.at(0, 30);
  CHECK_FALSE(r.allowed);
  CHECK(r.remaining == 10);
  CHECK(r.retry_after == Nanos{2 * kSec});  // 20 more tokens at 10/s
  CHECK(r.reset_after == Nanos{9 * kSec});
  CHECK_FALSE(d.at(2 * kSec - 1, 30).allowed);
  CHECK(d.at(2 * kSec, 30).allowed);
  // Zero cost: always allowed, counts nothing.
  const auto z = d.at(2 * kSec, 0);
  CHECK(z.allowed);
  CHECK(z.remaining == 0);
}

TEST_CASE("a cost above the burst is never admitted", "[policy][bucket]") {
  auto d = drive(make(per_second(10), 5));
  const auto before = d.state;
  const auto r = d.at(0, 6);
  CHECK_FALSE(r.allowed);
  CHECK(r.never());
  CHECK(r.retry_after == kNever);
  CHECK(r.remaining == 5);
  CHECK(d.state == before);
  CHECK(d.at(1000 * kSec, std::numeric_limits<Cost>::max()).never());
  CHECK(d.at(0, 5).allowed);
}

TEST_CASE("settle gives back at most what was taken", "[policy][bucket]") {
  auto d = drive(make(per_second(1), 10));
  REQUIRE(d.at(0, 5).allowed);
  const auto first = d.last;
  REQUIRE(d.at(0, 3).allowed);
  const auto second = d.last;
  d.give_back(0, second, 1000);  // more than was taken: only its 3 come back
  CHECK(d.peek(0, 0).remaining == 5);
  d.settle(0, first, 2);  // used 2 of 5
  CHECK(d.peek(0, 0).remaining == 8);
  // A give-back to a full bucket changes nothing.
  REQUIRE(d.at(0, 2).allowed);
  const auto third = d.last;
  const auto full_at = 4 * kSec;
  const auto before = d.state;
  d.give_back(full_at, third, 2);
  CHECK(d.state == before);
}

TEST_CASE("settle above the take is a debt of exactly the excess",
          "[policy][bucket][seams]") {
  auto d = drive(make(per_second(1), 10));
  REQUIRE(d.at(0, 4).allowed);
  d.settle(0, d.last, 7);  // the provider counted 3 more than estimated
  CHECK(d.peek(0, 0).remaining == 3);
  // A debt past the burst: the key waits exactly the excess.
  REQUIRE(d.at(0, 3).allowed);
  d.settle(0, d.last, 8);  // 5 more than the bucket held
  CHECK(d.peek(0, 0).remaining == 0);
  const Decision w = d.peek(0, 1);
  CHECK(w.retry_after == Nanos{6 * kSec});  // 5 s of debt, then 1 s a token
  CHECK_FALSE(d.peek(6 * kSec - 1, 1).allowed);
  CHECK(d.peek(6 * kSec, 1).allowed);
}

TEST_CASE("idle once full again; zero state is full at any time",
          "[policy][bucket]") {
  auto d = drive(make(per_second(2), 4));
  CHECK(d.policy.idle(TokenBucket::State{}, Nanos{0}));
  CHECK(d.policy.idle(TokenBucket::State{},
                      Nanos{std::numeric_limits<std::int64_t>::min()}));
  CHECK(d.peek(-5 * kSec, 4).allowed);  // negative times: zero is far past
  REQUIRE(d.at(0, 4).allowed);
  CHECK_FALSE(d.policy.idle(d.state, Nanos{2 * kSec - 1}));
  CHECK(d.policy.idle(d.state, Nanos{2 * kSec}));
}

TEST_CASE("a clock stepping back never adds capacity", "[policy][bucket]") {
  auto d = drive(make(per_second(10), 10));
  REQUIRE(d.at(10 * kSec, 10).allowed);
  const auto at_now = d.peek(10 * kSec + 500 * kMs, 0).remaining;
  CHECK(at_now == 5);
  CHECK(d.peek(10 * kSec, 0).remaining == 0);
  CHECK(d.peek(9 * kSec, 0).remaining == 0);
  // Retry-after measured from the earlier time is longer, not shorter.
  CHECK(d.peek(9 * kSec).retry_after == Nanos{1100 * kMs});
}

TEST_CASE("remaining is exactly what one more call could take",
          "[policy][bucket]") {
  auto d = drive(make(per(3, std::chrono::milliseconds(7)), 50));
  std::mt19937_64 rng(rk_test::seed_or(42));
  std::int64_t t = 0;
  for (int i = 0; i < 20'000; ++i) {
    t += static_cast<std::int64_t>(rng() % 5'000'000);
    const Cost c = rng() % 12;
    const auto r = d.at(t, c);
    const auto rem = r.remaining;
    if (rem > 0) REQUIRE(d.peek(t, rem).allowed);
    REQUIRE_FALSE(d.peek(t, rem + 1).allowed);
    if (!r.allowed) {
      REQUIRE_FALSE(d.peek(t + r.retry_after.count() - 1, c).allowed);
      REQUIRE(d.peek(t + r.retry_after.count(), c).allowed);
    }
  }
}

// Found under UBSan in CI (property_test's edge hammer): an excess of 2^64
// tokens at 2^63 ns each, and a placement of a cost never admitted, took
// 128-bit products past their range. Both saturate: a settle far above its
// take leaves the bucket empty to the end of the clock's range.
TEST_CASE("a settle's debt and a placement saturate at the largest values",
          "[policy][bucket][seams]") {
  const auto tb =
      TokenBucket::create(Rate{std::uint64_t{1} << 62,
                               Nanos{std::numeric_limits<std::int64_t>::max()}},
                          std::uint64_t{1} << 62)
          .value();
  const Nanos now{std::numeric_limits<std::int64_t>::max() / 2};
  const TokenBucket::State s0{};
  const auto st = tb.step(s0, now, 1);
  REQUIRE(st.decision.allowed);
  const auto placed = tb.place(s0, now, 1);
  const TokenBucket::State debt =
      tb.settle(st.next, now, placed, 1, std::numeric_limits<Cost>::max());
  CHECK(tb.idle_at(debt) == Nanos{std::numeric_limits<std::int64_t>::max()});
  // A cost above any burst, placed and settled: no overflow, nothing back
  // beyond the take.
  const auto big = tb.place(s0, now, std::numeric_limits<Cost>::max());
  const TokenBucket::State back =
      tb.settle(st.next, now, big, std::numeric_limits<Cost>::max(), 0);
  CHECK(tb.idle(back, now));
}
