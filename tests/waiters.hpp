// Waiters: Waiter::acquire calls started on threads one at a time, their
// results by index (waiting_test, redis_waiting_test).
#ifndef RATEKEEPER_TESTS_WAITERS_HPP_
#define RATEKEEPER_TESTS_WAITERS_HPP_

#include <atomic>
#include <cstddef>
#include <mutex>
#include <optional>
#include <stop_token>
#include <thread>
#include <utility>
#include <vector>

#include "ratekeeper/waiting.hpp"

namespace rk_test {

// start(f) runs f(stop_token) on a thread of its own and keeps what it
// returns at the next index; a test that waits for each call to queue
// before it starts the next makes the arrival order the index order.
struct Waiters {
  std::vector<std::optional<ratekeeper::Waited>> results;
  std::vector<std::jthread> threads;
  std::mutex mu;
  std::atomic<int> done{0};

  template <class F>
  void start(F&& f) {
    const std::size_t i = results.size();
    {
      std::lock_guard lock(mu);
      results.emplace_back();
    }
    threads.emplace_back([this, i, f](std::stop_token st) {
      ratekeeper::Waited w = f(st);
      std::lock_guard lock(mu);
      results[i].emplace(std::move(w));
      done.fetch_add(1);
    });
  }
  bool finished(std::size_t i) {
    std::lock_guard lock(mu);
    return results[i].has_value();
  }
  ratekeeper::Waited& at(std::size_t i) {
    std::lock_guard lock(mu);
    return *results[i];
  }
};

}  // namespace rk_test

#endif  // RATEKEEPER_TESTS_WAITERS_HPP_
