// Waiting for a condition with a deadline, never a fixed sleep.
#ifndef RATEKEEPER_TESTS_WAIT_HPP_
#define RATEKEEPER_TESTS_WAIT_HPP_

#include <chrono>
#include <thread>

namespace rk_test {

// Polls `done` every millisecond until it holds (true) or `within` passes
// (false): for a state that a loaded machine reaches late, never for a
// duration that is the subject of a test.
template <class F>
bool eventually(F&& done,
                std::chrono::nanoseconds within = std::chrono::seconds(30)) {
  const auto deadline = std::chrono::steady_clock::now() + within;
  while (!done()) {
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return true;
}

}  // namespace rk_test

#endif  // RATEKEEPER_TESTS_WAIT_HPP_
