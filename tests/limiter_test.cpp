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

TEMPLATE_TEST_CASE("refund gives back what was not used", "[limiter]",
                   TokenBucket, FixedWindow, SlidingWindow) {
  ManualClock clock(std::chrono::milliseconds(100));
  ManualLimiter<TestType> lim(make<TestType>(), clock);
  const Nanos charged = lim.now();
  REQUIRE(lim.acquire("k", 8).allowed);
  clock.advance(Nanos{1});
  lim.refund("k", 5, charged);
  CHECK(lim.peek("k", 0).remaining == 7);
  lim.refund("k", 3);
  CHECK(lim.peek("k", 0).remaining == 10);
  lim.refund("k", 100);  // never more than was counted
  CHECK(lim.peek("k", 0).remaining == 10);
  CHECK(lim.acquire("k", 10).allowed);
  CHECK_FALSE(lim.acquire("k", 1).allowed);
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
