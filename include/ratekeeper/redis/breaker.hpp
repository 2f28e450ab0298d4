// ratekeeper/redis/breaker.hpp: a circuit breaker over the calls to one
// Redis node.
#ifndef RATEKEEPER_REDIS_BREAKER_HPP_
#define RATEKEEPER_REDIS_BREAKER_HPP_

#include <chrono>
#include <cstdint>
#include <mutex>

#include "ratekeeper/decision.hpp"

namespace ratekeeper::detail {

class Breaker {
 public:
  enum class State : std::uint8_t { kClosed, kOpen, kHalfOpen };

  Breaker(int failures, Nanos first_open, Nanos max_open)
      : failures_to_open_(failures < 1 ? 1 : failures),
        first_open_(first_open),
        max_open_(max_open < first_open ? first_open : max_open),
        backoff_(first_open) {}

  // Whether a call may go to Redis at `now`; `probe` says it is the probe.
  bool admit(Nanos now, bool& probe) {
    std::lock_guard<std::mutex> lock(mu_);
    probe = false;
    switch (state_) {
      case State::kClosed:
        return true;
      case State::kOpen:
        if (now < open_until_) return false;
        state_ = State::kHalfOpen;
        probe = true;
        return true;
      case State::kHalfOpen:
        return false;  // the probe is out
    }
    return false;
  }

  void success() {
    std::lock_guard<std::mutex> lock(mu_);
    failures_ = 0;
    state_ = State::kClosed;
    backoff_ = first_open_;
  }

  void failure(Nanos now, bool probe) {
    std::lock_guard<std::mutex> lock(mu_);
    if (probe || state_ == State::kHalfOpen) {
      // Twice as long, up to the cap (without overflowing near Nanos::max).
      backoff_ = backoff_ > max_open_ / 2 ? max_open_ : backoff_ * 2;
      open(now);
      return;
    }
    if (state_ == State::kClosed && ++failures_ >= failures_to_open_) {
      open(now);
    }
  }

  State state() const {
    std::lock_guard<std::mutex> lock(mu_);
    return state_;
  }
  // Whether a call at `now` would be turned away without being tried:
  // open with its open time not yet over, or half-open with the probe out.
  bool refuses(Nanos now) const {
    std::lock_guard<std::mutex> lock(mu_);
    return (state_ == State::kOpen && now < open_until_) ||
           state_ == State::kHalfOpen;
  }
  std::uint64_t trips() const {
    std::lock_guard<std::mutex> lock(mu_);
    return trips_;
  }

 private:
  void open(Nanos now) {
    state_ = State::kOpen;
    open_until_ = now > Nanos::max() - backoff_ ? Nanos::max() : now + backoff_;
    failures_ = 0;
    ++trips_;
  }

  const int failures_to_open_;
  const Nanos first_open_;
  const Nanos max_open_;
  mutable std::mutex mu_;
  State state_ = State::kClosed;
  int failures_ = 0;
  Nanos backoff_;
  Nanos open_until_{0};
  std::uint64_t trips_ = 0;
};

}  // namespace ratekeeper::detail

#endif  // RATEKEEPER_REDIS_BREAKER_HPP_
