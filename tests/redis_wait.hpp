// Waiting for a RedisClient to reach Redis again after an outage, with a
// deadline (never a fixed sleep): what the Redis tests do after restarting
// the server of their own.
#ifndef RATEKEEPER_TESTS_REDIS_WAIT_HPP_
#define RATEKEEPER_TESTS_REDIS_WAIT_HPP_

#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>

#include "ratekeeper/store/redis.hpp"
#include "wait.hpp"

namespace rk_test {

// A driven clock for a RedisAccountant's test_clock, starting at
// 2026-12-01 UTC; copies share one time.
struct TestClock {
  static constexpr ratekeeper::Nanos kStart{1'796'083'200LL * 1'000'000'000};
  std::shared_ptr<std::atomic<std::int64_t>> t =
      std::make_shared<std::atomic<std::int64_t>>(kStart.count());
  std::function<ratekeeper::Nanos()> fn() const {
    return [t = t] { return ratekeeper::Nanos{t->load()}; };
  }
  void advance(ratekeeper::Nanos d) { t->fetch_add(d.count()); }
};

using SteadyTime = std::chrono::steady_clock::time_point;

// Calls `c` (a PING through its breaker) every 5 ms until Redis answers,
// and returns how long after `back` the first answer came. `back` is when
// Redis answered again (after RedisServer::start() returns). The client's
// promise (RedisOptions::breaker_max_open, docs/redis.md) is checked on
// the way: a call made breaker_max_open or more after `back` is not turned
// away. Only for a client no other thread is calling, whose calls during
// the outage were refused at once (a killed Redis): then nothing fails
// after `back` to reopen the breaker. Sanitizer builds on a loaded machine
// make calls late, never early, so the check cannot fail by load.
inline std::chrono::nanoseconds answered_within_bound(
    ratekeeper::RedisClient& c, SteadyTime back) {
  const SteadyTime bound = back + c.options().breaker_max_open;
  const SteadyTime deadline = bound + std::chrono::seconds(30);
  for (;;) {
    const SteadyTime t = std::chrono::steady_clock::now();
    const auto r = c.command({"PING"});
    if (r.ok()) return t - back;
    INFO("a call " << (t - back).count() / 1'000'000
                   << " ms after Redis was back: " << r.status());
    REQUIRE(t < bound);  // past the bound, a call must reach Redis
    REQUIRE(t < deadline);
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

// Waits, up to 30 s, until `c` reaches Redis (for clients other threads
// have been calling, which answered_within_bound does not cover).
inline void wait_answered(ratekeeper::RedisClient& c) {
  const SteadyTime deadline =
      std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (!c.command({"PING"}).ok()) {
    REQUIRE(std::chrono::steady_clock::now() < deadline);
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

}  // namespace rk_test

#endif  // RATEKEEPER_TESTS_REDIS_WAIT_HPP_
