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

#include <pthread.h>

#include <atomic>
#include <chrono>
#include <concepts>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

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
// Waiting on it (waiting.hpp, issue 17): subscribe() registers a callback
// run after every set(), advance() and advance_to(), so a Waiter sleeping
// until a time of this clock wakes when a test moves the clock there, and
// at no other time. With set_auto_advance(true) a waiter does not sleep at
// all: it moves the clock to the time it waits for (simulated time, as
// tokio's paused clock: a day of waits runs in a moment).
//
// Thread safety: all members, concurrently.
// Memory ordering: set()/advance() publish with release and now() reads with
// acquire, so a thread that reads the new time also sees everything the
// setting thread wrote before it (a test driver can write expectations, then
// move time).
class ManualClock {
  struct Shared;

 public:
  explicit ManualClock(Nanos start = Nanos{0})
      : s_(std::make_shared<Shared>(start.count())) {}

  // Thread-safe.
  Nanos now() const noexcept {
    return Nanos{s_->ns.load(std::memory_order_acquire)};
  }

  // Thread-safe. Time may go backwards.
  void set(Nanos t) noexcept {
    s_->ns.store(t.count(), std::memory_order_release);
    s_->changed();
  }

  // Thread-safe. Adds `d` (which may be negative), saturating at the ends of
  // the 64-bit range. Returns the new time.
  Nanos advance(Nanos d) noexcept {
    std::int64_t cur = s_->ns.load(std::memory_order_relaxed);
    std::int64_t next = 0;
    do {
      next = detail::clamp_i64(static_cast<detail::i128>(cur) + d.count());
      // Success is release (pairs with now()'s acquire); failure only reloads
      // `cur` for the retry, so relaxed.
    } while (!s_->ns.compare_exchange_weak(cur, next, std::memory_order_release,
                                           std::memory_order_relaxed));
    s_->changed();
    return Nanos{next};
  }

  // Thread-safe. Moves the time to `t` if it is earlier (never back).
  // Returns the new time.
  Nanos advance_to(Nanos t) noexcept {
    std::int64_t cur = s_->ns.load(std::memory_order_relaxed);
    while (cur < t.count() && !s_->ns.compare_exchange_weak(
                                  cur, t.count(), std::memory_order_release,
                                  std::memory_order_relaxed)) {
    }
    s_->changed();
    return now();
  }

  // Whether a waiter moves this clock to the time it waits for instead of
  // sleeping (see the class comment). Off by default. Thread-safe.
  void set_auto_advance(bool on) noexcept {
    s_->auto_advance.store(on, std::memory_order_release);
  }
  bool auto_advance() const noexcept {
    return s_->auto_advance.load(std::memory_order_acquire);
  }

  // Subscription: a callback run after every change of the time, until the
  // subscription is destroyed (which waits for a run in progress). The
  // callback runs on the thread that moved the clock, under the clock's
  // lock: it must not subscribe or unsubscribe.
  class Subscription {
   public:
    Subscription() = default;
    Subscription(Subscription&& o) noexcept : s_(std::move(o.s_)), id_(o.id_) {}
    Subscription& operator=(Subscription&& o) noexcept {
      if (this != &o) {
        reset();
        s_ = std::move(o.s_);
        id_ = o.id_;
      }
      return *this;
    }
    ~Subscription() { reset(); }
    void reset() {
      if (!s_) return;
      const std::lock_guard lock(s_->mu);
      for (auto it = s_->subs.begin(); it != s_->subs.end(); ++it) {
        if (it->first == id_) {
          s_->subs.erase(it);
          break;
        }
      }
      s_->listening.store(s_->subs.size(), std::memory_order_release);
      s_.reset();
    }

   private:
    friend class ManualClock;
    std::shared_ptr<Shared> s_;
    std::uint64_t id_ = 0;
  };

  // subscribe: runs `f` after every change of the time (see Subscription).
  Subscription subscribe(std::function<void()> f) const {
    Subscription sub;
    const std::lock_guard lock(s_->mu);
    sub.id_ = ++s_->next_id;
    s_->subs.emplace_back(sub.id_, std::move(f));
    s_->listening.store(s_->subs.size(), std::memory_order_release);
    sub.s_ = s_;
    return sub;
  }

 private:
  struct Shared {
    explicit Shared(std::int64_t t) : ns(t) {}
    std::atomic<std::int64_t> ns;
    std::atomic<bool> auto_advance{false};
    // Subscribers, guarded by mu; `listening` their count, so a clock with
    // none (every clock but a Waiter's) pays one load per change.
    std::atomic<std::size_t> listening{0};
    std::mutex mu;
    std::vector<std::pair<std::uint64_t, std::function<void()>>> subs;
    std::uint64_t next_id = 0;
    void changed() noexcept {
      if (listening.load(std::memory_order_acquire) == 0) return;
      const std::lock_guard lock(mu);
      for (auto& sub : subs) sub.second();
    }
  };

  std::shared_ptr<Shared> s_;
};

namespace detail {

// How many forks this process descends from: incremented by a pthread_atfork
// child handler (one relaxed atomic add, async-signal-safe), so a CachedClock
// can tell that its ticker thread stayed behind in the parent. Registered
// once per process by the first CachedClock; handlers are inherited by the
// child, so grandchildren count too.
inline std::atomic<std::uint64_t> fork_generation{0};

inline void count_forks() noexcept {
  static const bool registered = [] {
    ::pthread_atfork(nullptr, nullptr, [] {
      fork_generation.fetch_add(1, std::memory_order_relaxed);
    });
    return true;
  }();
  static_cast<void>(registered);
}

}  // namespace detail

// CachedClock: SteadyClock's time as of the last tick of a ticker thread.
//
// now() is one relaxed atomic load, after two loads that check for a fork
// (this clock's generation, acquire, and the process's fork count, relaxed:
// plain loads on x86-64, predicted not taken). The time it returns lags
// SteadyClock::now() by at most `resolution` plus the ticker's scheduling
// delay, and never goes backwards (steady_clock does not). Effect on exactness:
// every decision is exact for the time it was given, which is up to one
// resolution late. A late time means less refill, so nothing is ever admitted
// early; a caller who waits exactly retry_after in real time may be denied once
// more, until the next tick. Keep `resolution` well below the shortest emission
// interval or window you configure.
//
// The ticker is one thread per CachedClock and its copies (they share it),
// stopped when the last copy is destroyed. Thread safety: all members,
// concurrently. Memory ordering: the ticker's store and now()'s load are
// relaxed; the time is the only thing published.
//
// fork(): a child keeps only the thread that forked, so the ticker stays in
// the parent. The first now() in the child sees that the fork count changed
// and starts a new ticker there (and stores the time at once, so no read in
// the child returns the time frozen at the fork). The parent's ticker is
// never touched in the child: not joined (it does not exist there: a join
// would wait forever or on a thread that reused its stack), not signalled
// (its mutex may have been held at the fork). Its few bytes are kept, not
// freed, on a list that lives as long as the process.
class CachedClock {
 public:
  explicit CachedClock(Nanos resolution = std::chrono::microseconds(100))
      : state_(std::make_shared<State>(resolution)) {}

  // Thread-safe. In a forked child, the first call restarts the ticker.
  Nanos now() const noexcept {
    if (state_->generation.load(std::memory_order_acquire) !=
        detail::fork_generation.load(std::memory_order_relaxed)) [[unlikely]] {
      state_->restart();
    }
    return Nanos{state_->ns.load(std::memory_order_relaxed)};
  }

  Nanos resolution() const noexcept { return state_->resolution; }

 private:
  // One ticker thread with what stops it. Owned by the process that started
  // it; in a child it is abandoned (see the class comment).
  struct Ticker {
    std::mutex mu;
    std::condition_variable cv;
    bool stop = false;  // guarded by mu
    std::thread thread;
    Ticker* next_abandoned = nullptr;
  };

  // Tickers left behind by forks, reachable for the life of the process (so
  // a leak checker does not report them). A lock-free push: a lock here
  // could have been held by a thread that the fork did not copy.
  static void abandon(Ticker* t) noexcept {
    static std::atomic<Ticker*> abandoned{nullptr};
    Ticker* head = abandoned.load(std::memory_order_relaxed);
    do {
      t->next_abandoned = head;
    } while (!abandoned.compare_exchange_weak(
        head, t, std::memory_order_release, std::memory_order_relaxed));
  }

  struct State {
    explicit State(Nanos res)
        : resolution(res > Nanos{0} ? res : Nanos{1}),
          ns(SteadyClock{}.now().count()) {
      detail::count_forks();
      const std::uint64_t g =
          detail::fork_generation.load(std::memory_order_relaxed);
      ticker = start();
      claimed.store(g + 1, std::memory_order_relaxed);
      generation.store(g, std::memory_order_release);
    }
    ~State() {
      if (ticker == nullptr) return;  // a restart that found no thread
      if (generation.load(std::memory_order_acquire) !=
          detail::fork_generation.load(std::memory_order_relaxed)) {
        abandon(ticker);  // the parent's thread: not ours to join
        return;
      }
      {
        std::lock_guard lock(ticker->mu);
        ticker->stop = true;
      }
      ticker->cv.notify_all();
      ticker->thread.join();
      delete ticker;
    }

    Ticker* start() {
      auto* t = new Ticker;
      t->thread = std::thread([this, t] { run(*t); });
      return t;
    }

    void run(Ticker& t) {
      std::unique_lock lock(t.mu);
      while (!t.stop) {
        ns.store(SteadyClock{}.now().count(), std::memory_order_relaxed);
        t.cv.wait_for(lock, resolution, [&t] { return t.stop; });
      }
    }

    // In a forked child: one caller claims the restart for this fork count
    // (a CAS on `claimed`, not a mutex: a mutex could have been held by a
    // parent thread at the fork), abandons the old ticker, stores the time
    // and starts a new ticker; the others wait (yielding) until it is done.
    void restart() noexcept {
      const std::uint64_t g =
          detail::fork_generation.load(std::memory_order_relaxed);
      std::uint64_t c = claimed.load(std::memory_order_acquire);
      while (c != g + 1) {
        if (claimed.compare_exchange_weak(c, g + 1, std::memory_order_acq_rel,
                                          std::memory_order_acquire)) {
          ns.store(SteadyClock{}.now().count(), std::memory_order_relaxed);
          if (ticker != nullptr) abandon(std::exchange(ticker, nullptr));
          try {
            ticker = start();
          } catch (...) {
            // No thread to be had: the time stays as stored just now. The
            // generation stays stale, so the next now() tries again.
            claimed.store(0, std::memory_order_release);
            return;
          }
          // Release: a reader that sees the new generation sees `ticker`.
          generation.store(g, std::memory_order_release);
          return;
        }
      }
      while (generation.load(std::memory_order_acquire) != g &&
             claimed.load(std::memory_order_acquire) == g + 1) {
        std::this_thread::yield();
      }
    }

    const Nanos resolution;
    std::atomic<std::int64_t> ns;
    // The fork count the running ticker belongs to, and the fork count + 1
    // whose restart a thread has claimed.
    std::atomic<std::uint64_t> generation{0};
    std::atomic<std::uint64_t> claimed{0};
    Ticker* ticker = nullptr;
  };

  std::shared_ptr<State> state_;
};

static_assert(Clock<SteadyClock>);
static_assert(Clock<ManualClock>);
static_assert(Clock<CachedClock>);

}  // namespace ratekeeper

#endif  // RATEKEEPER_CLOCK_HPP_
