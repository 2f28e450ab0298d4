// Clocks: the concept, SteadyClock, ManualClock.
#include "ratekeeper/clock.hpp"

#include <limits>
#include <thread>
#include <vector>

#include "test_util.hpp"

using namespace ratekeeper;

namespace {
struct NotAClock {
  long now() const { return 0; }
};
}  // namespace

static_assert(Clock<SteadyClock>);
static_assert(Clock<ManualClock>);
static_assert(!Clock<NotAClock>, "now() must return Nanos, noexcept");

TEST_CASE("SteadyClock is monotonic", "[clock]") {
  SteadyClock c;
  Nanos prev = c.now();
  for (int i = 0; i < 10'000; ++i) {
    const Nanos t = c.now();
    REQUIRE(t >= prev);
    prev = t;
  }
}

TEST_CASE("ManualClock sets, advances, steps back and saturates", "[clock]") {
  ManualClock c;
  CHECK(c.now() == Nanos{0});
  c.advance(std::chrono::seconds(2));
  CHECK(c.now() == std::chrono::seconds(2));
  c.set(Nanos{5});
  CHECK(c.now() == Nanos{5});
  c.advance(Nanos{-10});
  CHECK(c.now() == Nanos{-5});
  c.set(Nanos{std::numeric_limits<std::int64_t>::max() - 1});
  CHECK(c.advance(std::chrono::hours(1)) == Nanos::max());
  c.set(Nanos::min());
  CHECK(c.advance(Nanos{-1}) == Nanos::min());
  ManualClock started(std::chrono::hours(3));
  CHECK(started.now() == std::chrono::hours(3));
}

TEST_CASE("ManualClock copies share one time", "[clock]") {
  ManualClock a;
  ManualClock b = a;
  a.advance(Nanos{42});
  CHECK(b.now() == Nanos{42});
}

TEST_CASE("ManualClock advances from many threads without losing a step",
          "[clock][concurrency]") {
  ManualClock c;
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 10'000; ++i) {
        c.advance(Nanos{1});
        static_cast<void>(c.now());
      }
    });
  }
  for (auto& t : threads) t.join();
  CHECK(c.now() == Nanos{80'000});
}

TEST_CASE("CachedClock never goes backwards and never runs ahead", "[clock]") {
  CachedClock c(std::chrono::milliseconds(1));
  CHECK(c.resolution() == std::chrono::milliseconds(1));
  SteadyClock steady;
  Nanos prev = c.now();
  for (int i = 0; i < 200'000; ++i) {
    const Nanos t = c.now();
    REQUIRE(t >= prev);
    REQUIRE(t <= steady.now());  // it is SteadyClock's time, late
    prev = t;
  }
}

TEST_CASE("CachedClock advances with its ticker, and copies share it",
          "[clock]") {
  CachedClock c(std::chrono::milliseconds(1));
  CachedClock copy = c;
  const Nanos start = c.now();
  // Not a timing assertion: only that time moves at all within 10 s.
  const auto give_up =
      std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (c.now() == start && std::chrono::steady_clock::now() < give_up) {
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  CHECK(c.now() > start);
  CHECK(copy.now() >= c.now() - std::chrono::seconds(1));
}

TEST_CASE("CachedClock stops its ticker promptly", "[clock]") {
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < 20; ++i) {
    CachedClock c(std::chrono::hours(1));  // a tick that would never come
    static_cast<void>(c.now());
  }
  // Twenty start/stop cycles of an hourly ticker end at once (a stop wakes
  // it): generous bound, catches a ticker that sleeps its full period.
  CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(30));
}
