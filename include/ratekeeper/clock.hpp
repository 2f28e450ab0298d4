// ratekeeper/clock.hpp: where a limiter gets the time.
//
// Defines the Clock concept and two clocks:
//   SteadyClock  std::chrono::steady_clock in integer nanoseconds. The default.
//   ManualClock  a time you set and advance by hand, for tests and simulations
//                (a day of traffic runs in a second of CPU).
//
//   CachedClock  SteadyClock read by a ticker thread every `resolution`; a
//                check reads one atomic (about 1 ns instead of 20-45 ns).
//
// Prefer SteadyClock unless time is an argument of what you are doing (tests,
// simulations, replays): then use ManualClock. Use CachedClock when the clock
// read dominates the cost of a check and decisions may lag real time by one
// resolution (see its comment). A wall clock (system_clock) is
// a poor choice: it steps when NTP corrects it. The policies survive a clock
// that steps back (capacity never grows on a backward step) but a monotonic
// clock gives exact answers.
#ifndef RATEKEEPER_CLOCK_HPP_
#define RATEKEEPER_CLOCK_HPP_

#include <atomic>
#include <chrono>
#include <concepts>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>

#include "ratekeeper/decision.hpp"
#include "ratekeeper/detail/math.hpp"

namespace ratekeeper {

// Clock: a source of integer nanoseconds since the clock's own epoch.
//
// Requires: now() is noexcept and returns Nanos. It should be monotonic; when
// it is not, decisions stay safe (see docs/policies.md, "Clock anomalies").
// Thread safety: now() is called concurrently from every thread that uses the
// limiter, so it must be thread-safe. A Limiter stores its clock by value.
template <class C>
concept Clock = requires(const C& c) {
  { c.now() }
  noexcept->std::same_as<Nanos>;
};

// SteadyClock: std::chrono::steady_clock, as integer nanoseconds since its
// epoch (boot, on Linux). Thread-safe. Stateless.
struct SteadyClock {
  static_assert(std::chrono::steady_clock::is_steady,
                "SteadyClock needs a monotonic std::chrono::steady_clock");

  Nanos now() const noexcept {
    return std::chrono::duration_cast<Nanos>(
        std::chrono::steady_clock::now().time_since_epoch());
  }
};

// ManualClock: a clock that moves only when told to.
//
// A ManualClock is a handle: copies share one time, so the copy held by a
// Limiter moves when the test's copy is advanced. It starts at `start`
// (default 0). set() may move time backwards, which is how tests step a clock
// back. advance() saturates at Nanos::max() rather than wrapping.
//
// Thread safety: all members, concurrently.
// Memory ordering: set()/advance() publish with release and now() reads with
// acquire, so a thread that reads the new time also sees everything the
// setting thread wrote before it (a test driver can write expectations, then
// move time).
class ManualClock {
 public:
  explicit ManualClock(Nanos start = Nanos{0})
      : ns_(std::make_shared<std::atomic<std::int64_t>>(start.count())) {}

  // Thread-safe.
  Nanos now() const noexcept {
    return Nanos{ns_->load(std::memory_order_acquire)};
  }

  // Thread-safe. Time may go backwards.
  void set(Nanos t) noexcept {
    ns_->store(t.count(), std::memory_order_release);
  }

  // Thread-safe. Adds `d` (which may be negative), saturating at the ends of
  // the 64-bit range. Returns the new time.
  Nanos advance(Nanos d) noexcept {
    std::int64_t cur = ns_->load(std::memory_order_relaxed);
    std::int64_t next = 0;
    do {
      next = detail::clamp_i64(static_cast<detail::i128>(cur) + d.count());
      // Success is release (pairs with now()'s acquire); failure only reloads
      // `cur` for the retry, so relaxed.
    } while (!ns_->compare_exchange_weak(cur, next, std::memory_order_release,
                                         std::memory_order_relaxed));
    return Nanos{next};
  }

 private:
  std::shared_ptr<std::atomic<std::int64_t>> ns_;
};

// CachedClock: SteadyClock's time as of the last tick of a ticker thread.
//
// now() is one relaxed atomic load. The time it returns lags
// SteadyClock::now() by at most `resolution` plus the ticker's scheduling
// delay, and never goes backwards (steady_clock does not). Effect on
// exactness: every decision is exact for the time it was given, which is up
// to one resolution late. A late time means less refill, so nothing is ever
// admitted early; a caller who waits exactly retry_after in real time may be
// denied once more, until the next tick. Keep `resolution` well below the
// shortest emission interval or window you configure.
//
// The ticker is one thread per CachedClock and its copies (they share it),
// stopped when the last copy is destroyed. Thread safety: all members,
// concurrently. Memory ordering: the ticker's store and now()'s load are
// relaxed; the time is the only thing published.
class CachedClock {
 public:
  explicit CachedClock(Nanos resolution = std::chrono::microseconds(100))
      : state_(std::make_shared<State>(resolution)) {}

  // Thread-safe.
  Nanos now() const noexcept {
    return Nanos{state_->ns.load(std::memory_order_relaxed)};
  }

  Nanos resolution() const noexcept { return state_->resolution; }

 private:
  struct State {
    explicit State(Nanos res)
        : resolution(res > Nanos{0} ? res : Nanos{1}),
          ns(SteadyClock{}.now().count()),
          ticker([this](std::stop_token stop) { run(stop); }) {}
    ~State() {
      ticker.request_stop();
      cv.notify_all();
    }

    void run(std::stop_token stop) {
      std::unique_lock lock(mu);
      while (!stop.stop_requested()) {
        ns.store(SteadyClock{}.now().count(), std::memory_order_relaxed);
        cv.wait_for(lock, stop, resolution, [] { return false; });
      }
    }

    const Nanos resolution;
    std::atomic<std::int64_t> ns;
    std::mutex mu;
    std::condition_variable_any cv;
    std::jthread ticker;  // last: started after the fields it reads
  };

  std::shared_ptr<State> state_;
};

static_assert(Clock<SteadyClock>);
static_assert(Clock<ManualClock>);
static_assert(Clock<CachedClock>);

}  // namespace ratekeeper

#endif  // RATEKEEPER_CLOCK_HPP_
