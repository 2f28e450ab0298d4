// InMemoryStore: keys of arbitrary bytes, capacity, reclaiming, stats.
#include "ratekeeper/store/in_memory.hpp"

#include <string>

#include "ratekeeper/limiter.hpp"
#include "ratekeeper/policy/token_bucket.hpp"
#include "test_util.hpp"

using namespace ratekeeper;
using namespace std::string_view_literals;
using rk_test::kSec;

namespace {
using Bucket = Limiter<TokenBucket, InMemoryStore, ManualClock>;

TokenBucket one_per_second() {
  return TokenBucket::create(per_second(1), 1).value();
}
}  // namespace

static_assert(Store<InMemoryStore<TokenBucket::State>>);

TEST_CASE("keys are arbitrary bytes", "[store][in_memory]") {
  ManualClock clock;
  Bucket lim(one_per_second(), clock);
  const std::string_view keys[] = {"a\0b"sv, "a\0c"sv,  "a"sv,        ""sv,
                                   "a:b"sv,  "{a}:b"sv, "\xff\xfe"sv, "a\0"sv};
  for (auto k : keys) REQUIRE(lim.acquire(k).allowed);
  for (auto k : keys) CHECK_FALSE(lim.acquire(k).allowed);
  CHECK(lim.store().size() == std::size(keys));
}

TEST_CASE("nothing is stored for a call that changes nothing",
          "[store][in_memory]") {
  ManualClock clock;
  Bucket lim(one_per_second(), clock);
  CHECK(lim.acquire("never", 2).never());  // cost above burst
  CHECK(lim.acquire("zero", 0).allowed);   // zero cost
  CHECK(lim.peek("peeked").allowed);
  Taken t = lim.take("given back", 1);
  clock.advance(std::chrono::seconds(5));
  REQUIRE(lim.give_back(t.receipt).ok());
  CHECK(lim.store().size() == 1);
  CHECK(lim.stats().inserts == 1);
}

TEST_CASE("full store, deny new keys", "[store][in_memory]") {
  ManualClock clock;
  InMemoryOptions opts;
  opts.max_keys = 4;
  opts.when_full = WhenFull::kDenyNew;
  opts.full_retry_after = std::chrono::milliseconds(250);
  Bucket lim(one_per_second(), opts, clock);
  for (int i = 0; i < 4; ++i) REQUIRE(lim.acquire(std::to_string(i)).allowed);
  const auto d = lim.acquire("new");
  CHECK_FALSE(d.allowed);
  CHECK(d.remaining == 0);
  CHECK(d.retry_after == std::chrono::milliseconds(250));
  // Held keys are still served while full.
  CHECK_FALSE(lim.acquire("0").allowed);
  clock.advance(std::chrono::seconds(1));
  CHECK(lim.acquire("0").allowed);
  auto s = lim.stats();
  CHECK(s.keys == 4);
  CHECK(s.denied_full == 1);
  // Once the others are idle, a sweep reclaims them and the new key fits.
  clock.advance(std::chrono::seconds(1));
  CHECK(lim.acquire("new").allowed);
  s = lim.stats();
  CHECK(s.reclaimed == 4);
  CHECK(s.keys == 1);
  CHECK(s.sweeps == 2);
  // A key that returns after being reclaimed is fresh, as it was idle.
  CHECK(lim.acquire("1").allowed);
}

TEST_CASE("full store, admit new keys uncounted", "[store][in_memory]") {
  ManualClock clock;
  InMemoryOptions opts;
  opts.max_keys = 2;
  opts.when_full = WhenFull::kAdmitUncounted;
  Bucket lim(one_per_second(), opts, clock);
  REQUIRE(lim.acquire("a").allowed);
  REQUIRE(lim.acquire("b").allowed);
  CHECK(lim.acquire("c").allowed);
  CHECK(lim.acquire("c").allowed);  // uncounted: never remembered
  CHECK(lim.acquire("c", 2).never());
  CHECK(lim.store().size() == 2);
  CHECK(lim.stats().admitted_uncounted == 2);
}

TEST_CASE("memory is bounded whatever the number of keys",
          "[store][in_memory]") {
  ManualClock clock;
  InMemoryOptions opts;
  opts.max_keys = 1000;
  Bucket lim(one_per_second(), opts, clock);
  std::uint64_t allowed = 0;
  for (int i = 0; i < 100'000; ++i) {
    if (i % 5000 == 0) clock.advance(std::chrono::milliseconds(400));
    allowed += lim.acquire("k" + std::to_string(i)).allowed;
    REQUIRE(lim.store().size() <= 1000);
  }
  const auto s = lim.stats();
  CHECK(s.inserts == allowed);
  CHECK(s.denied_full + allowed == 100'000);
  CHECK(s.reclaimed > 0);
}

TEST_CASE("update leaves absent keys absent", "[store][in_memory]") {
  InMemoryStore<TokenBucket::State> store;
  const auto policy = one_per_second();
  detail::SettleOp<TokenBucket> op{&policy, Nanos{0}, TokenBucket::Placement{},
                                   1, 0};
  const auto d = store.update("ghost", op);
  CHECK(d.allowed);
  CHECK(store.size() == 0);
}
