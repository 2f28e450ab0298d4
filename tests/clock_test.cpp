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
