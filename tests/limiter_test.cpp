// Limiter: acquire, peek, refund, over every policy, on a ManualClock.
#include "ratekeeper/limiter.hpp"

#include "ratekeeper/policy/fixed_window.hpp"
#include "ratekeeper/policy/sliding_window.hpp"
#include "ratekeeper/policy/token_bucket.hpp"
#include "test_util.hpp"

using namespace ratekeeper;
using rk_test::kMs;

namespace {
template <class P>
using ManualLimiter = Limiter<P, InMemoryStore, ManualClock>;

template <class P>
P make();
template <>
TokenBucket make<TokenBucket>() {
  return TokenBucket::create(per_second(10), 10).value();
}
template <>
FixedWindow make<FixedWindow>() {
  return FixedWindow::create(per_second(10)).value();
}
template <>
SlidingWindow make<SlidingWindow>() {
  return SlidingWindow::create(per_second(10)).value();
}
}  // namespace

TEMPLATE_TEST_CASE("acquire counts, peek does not", "[limiter]", TokenBucket,
                   FixedWindow, SlidingWindow) {
  ManualClock clock;
  ManualLimiter<TestType> lim(make<TestType>(), clock);
  for (int i = 0; i < 5; ++i) {
    const auto p = lim.peek("k", 10);
    CHECK(p.allowed);
    CHECK(p.remaining == 0);
  }
  CHECK(lim.peek("k", 0).remaining == 10);
  CHECK(lim.acquire("k", 4).remaining == 6);
  CHECK(lim.peek("k", 6).allowed);
  CHECK_FALSE(lim.peek("k", 7).allowed);
  CHECK(lim.acquire("k", 6).allowed);
  const auto d = lim.acquire("k");
  CHECK_FALSE(d.allowed);
  CHECK(d.retry_after > Nanos{0});
  // Keys are independent.
  CHECK(lim.acquire("other", 10).allowed);
  // After retry_after, the same call passes.
  clock.advance(d.retry_after);
  CHECK(lim.acquire("k").allowed);
}

TEMPLATE_TEST_CASE("settle gives back what was not used", "[limiter]",
                   TokenBucket, FixedWindow, SlidingWindow) {
  ManualClock clock(std::chrono::milliseconds(100));
  ManualLimiter<TestType> lim(make<TestType>(), clock);
  Taken a = lim.take("k", 5);
  Taken b = lim.take("k", 3);
  REQUIRE(a);
  REQUIRE(b);
  CHECK(a.receipt.cost() == 5);
  CHECK(a.receipt.key() == "k");
  CHECK(a.receipt.at() == lim.now());
  clock.advance(Nanos{1});
  auto left = lim.settle(a.receipt, 2);  // used 2 of 5
  REQUIRE(left.ok());
  CHECK(left->remaining == 5);
  CHECK(lim.peek("k", 0).remaining == 5);
  CHECK_FALSE(a.receipt.open());
  // Once only: the settled receipt is refused, and nothing changes.
  CHECK(lim.settle(a.receipt, 0).status().code() ==
        absl::StatusCode::kFailedPrecondition);
  CHECK(lim.give_back(b.receipt).ok());  // never more than was taken
  CHECK(lim.peek("k", 0).remaining == 8);
  CHECK(lim.acquire("k", 8).allowed);
  CHECK_FALSE(lim.acquire("k", 1).allowed);
  // A refusal has nothing to settle; a receipt of another limiter is
  // refused.
  Taken refused = lim.take("k", 1);
  CHECK_FALSE(refused);
  CHECK_FALSE(refused.receipt.open());
  ManualLimiter<TestType> other(make<TestType>(), clock);
  Taken o = other.take("k", 1);
  REQUIRE(o);
  CHECK(lim.settle(o.receipt, 0).status().code() ==
        absl::StatusCode::kInvalidArgument);
  CHECK(o.receipt.open());
}

TEMPLATE_TEST_CASE("a cost above the limit is never admitted", "[limiter]",
                   TokenBucket, FixedWindow, SlidingWindow) {
  ManualClock clock;
  ManualLimiter<TestType> lim(make<TestType>(), clock);
  const auto d = lim.acquire("k", 11);
  CHECK(d.never());
  CHECK(d.limit == 10);
  clock.advance(std::chrono::hours(24 * 365));
  CHECK(lim.acquire("k", 11).never());
  CHECK(lim.acquire("k", 10).allowed);
}

TEST_CASE("a limiter on the steady clock", "[limiter]") {
  Limiter<TokenBucket> lim(TokenBucket::create(per_minute(3), 3).value());
  CHECK(lim.acquire("user:1").allowed);
  CHECK(lim.acquire("user:1", 2).allowed);
  const auto d = lim.acquire("user:1");
  CHECK_FALSE(d);
  CHECK(d.retry_after > Nanos{19'000 * kMs});
  CHECK(d.retry_after <= Nanos{20'000 * kMs});
  CHECK(lim.stats().keys == 1);
}
