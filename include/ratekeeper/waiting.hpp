// ratekeeper/waiting.hpp: waiting instead of refusing.
//
// Defines Waiter<Clock>: a blocking acquire with a deadline, on a Limiter
// or on any Limit (a chain's item, a tier's limit), as Guava's
// tryAcquire(n, timeout), Bucket4j's asBlocking().tryConsume(n, maxWait),
// governor's until_ready and .NET's AcquireAsync with a queue do.
//
//   ratekeeper::Waiter<> waiter;
//   ratekeeper::Waited w = waiter.acquire(limiter, "user:42", 1,
//                                         std::chrono::seconds(2));
//   if (!w) reply_429_or_503(w.status, w.decision.retry_after);
//
// What a wait holds depends on the policy (docs/waiting.md):
//   - a token bucket (Limit::reserves_exactly()) holds the caller's capacity
//     from the call on: reserve() counts it and says "go at T", T being
//     exactly when a plain acquire would first admit it; no later caller
//     overtakes it; a wait longer than max_wait is refused at once (nothing
//     taken), as Guava and Bucket4j do; a cancelled waiter gives its
//     capacity back through its receipt, exactly, and every waiter behind
//     it on that key moves earlier by what the give-back returned (the
//     time it held, or only the part still ahead when its go time had
//     passed), never by more (docs/waiting.md: to the ns, on the late
//     side). One that reserved is admitted by its deadline.
//   - a window policy cannot hold capacity in a future window: the head of
//     a key's queue waits until the window that can admit it opens
//     (retry_after) and tries then; the others wait behind it. A wait that
//     reaches its deadline gives up (kDeadlineExceeded), holding nothing.
// Either way the waiters of one key are served in arrival order (a FIFO
// queue per limit and key, in this process); a queue at its limit refuses
// at once (kResourceExhausted, "queue full"). Calls that do not wait
// (acquire(), take()) do not queue: on a window policy they can take a
// window's capacity before the head of the queue retries.
//
// The non-blocking form for event loops is Limiter::reserve and
// Limit::reserve (limiter.hpp, chain.hpp): "go at go_at", the capacity held
// (token bucket), and a receipt to give back on cancellation
// (examples/asio_wait.cpp).
#ifndef RATEKEEPER_WAITING_HPP_
#define RATEKEEPER_WAITING_HPP_

#include <algorithm>
#include <chrono>
#include <concepts>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <list>
#include <stop_token>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "ratekeeper/chain.hpp"
#include "ratekeeper/clock.hpp"
#include "ratekeeper/decision.hpp"
#include "ratekeeper/detail/math.hpp"
#include "ratekeeper/detail/mutex.hpp"
#include "ratekeeper/limiter.hpp"
#include "ratekeeper/receipt.hpp"

namespace ratekeeper {

// WaitOptions
//
//   queue_limit  waiters at once per limit and key; one more is refused at
//                once with kResourceExhausted. 0: never wait (a call
//                admitted at once still passes).
//   jitter       each wake-up is later by a random time in [0, jitter]
//                (governor's Jitter), against waiters waking together. It
//                delays, never advances: a call never goes before its time.
//                A waiter that reserved (token bucket) wakes by the earliest
//                deadline of the waiters that reserved on its key, so each
//                of them is admitted by its own deadline.
//   seed         the jitter's pseudo-random sequence (deterministic).
struct WaitOptions {
  std::size_t queue_limit = 1024;
  Nanos jitter{0};
  std::uint64_t seed = 0x9E3779B97F4A7C15u;
};

// Waited: the end of one wait.
//
//   status       OK: admitted, and the cost is counted. kDeadlineExceeded:
//                not admitted within max_wait (refused at once when the
//                limit knew the wait was longer); kResourceExhausted: the
//                key's queue was full, or a store at capacity could not
//                hold the reservation; kOutOfRange: the cost exceeds the
//                capacity (no wait admits it); kCancelled: the stop token
//                was triggered. Nothing is held unless OK.
//   decision     the decision that admitted it, or the last refusal (its
//                retry_after is what a plain acquire reported).
//   receipt      what the call holds (settle or give it back as a take's).
//   arrived      the clock's time at the call.
//   go_at        when the capacity became the caller's: a token bucket's
//                reserved time (moved earlier by cancellations ahead of
//                it), or the time of a window policy's admitting retry.
//   admitted_at  the clock's time when the call returned admitted: go_at,
//                or later by the jitter, by waiting for the waiter ahead,
//                or by the time a thread takes to wake. Never earlier.
//   sequence     this Waiter's admission count (1, 2, ...): the order it
//                admitted calls in.
struct [[nodiscard]] Waited {
  absl::Status status;
  Decision decision;
  Receipt receipt;
  Nanos arrived{0};
  Nanos go_at{0};
  Nanos admitted_at{0};
  std::uint64_t sequence = 0;
  explicit operator bool() const noexcept { return status.ok(); }
};

// Waiter: blocking acquires with a deadline, FIFO per limit and key.
//
// C is the clock the waits are timed by: it must be the limit's clock (a
// ManualClock copy shares its time; a Chain's limits take the caller's
// time, so pass the chain's clock). With a ManualClock, waits end exactly
// when a test moves the clock to their time (ManualClock::subscribe), or at
// once in simulated time (ManualClock::set_auto_advance). SteadyClock waits
// on a condition variable until the steady time; any other clock is read
// again every millisecond at most.
//
// One Waiter serves any number of limits, keys and threads. It must outlive
// its waits. A cancellation moves the go times of this Waiter's waiters
// behind it; a reservation held elsewhere on the same key (reserve() called
// directly, another Waiter) keeps its go_at, later than it needs to be: wait
// on a limit through one Waiter where the instants matter.
// Thread safety: all members, concurrently.
template <Clock C = SteadyClock>
class Waiter {
 public:
  explicit Waiter(C clock = C{}, WaitOptions options = {})
      : clock_(std::move(clock)), options_(options), rng_(options.seed) {
    if (options_.jitter < Nanos{0}) options_.jitter = Nanos{0};
    if constexpr (std::same_as<C, ManualClock>) {
      sub_ = clock_.subscribe([this] { wake_all(); });
    }
  }
  Waiter(const Waiter&) = delete;
  Waiter& operator=(const Waiter&) = delete;

  // acquire
  //
  // Waits until `limit` admits `cost` on `key`, at most `max_wait` by the
  // clock, in arrival order among this Waiter's calls on that limit and
  // key; `stop` cancels (a waiter holding capacity gives it back).
  Waited acquire(Limit& limit, std::string_view key, Cost cost, Nanos max_wait,
                 std::stop_token stop = {}) {
    return run(
        &limit, key, limit.reserves_exactly(), max_wait, std::move(stop),
        [&](Nanos now, Nanos w) { return limit.reserve(key, cost, now, w); },
        [&](Receipt& r, Nanos now) {
          // The key's timeline before and after, at one time: how much
          // earlier the give-back moved it (what it returned).
          const Decision before = limit.peek(key, 0, now);
          const absl::StatusOr<Decision> after = limit.settle(r, 0, now);
          if (!after.ok()) return Nanos{0};
          return before.reset_after - after->reset_after;
        });
  }

  // As above, on a Limiter (whose clock must be this Waiter's).
  template <Policy P, template <class> class S>
  Waited acquire(Limiter<P, S, C>& limiter, std::string_view key, Cost cost,
                 Nanos max_wait, std::stop_token stop = {}) {
    return run(
        &limiter, key, Limiter<P, S, C>::kReservesExactly, max_wait,
        std::move(stop),
        [&](Nanos, Nanos w) { return limiter.reserve(key, cost, w); },
        [&](Receipt& r, Nanos) {
          // As above: the limiter's give-back reads its own clock, at or
          // after t; both reads of the key's timeline are at t.
          const Nanos t = limiter.now();
          const auto read = [&] {
            return limiter.store()
                .peek(key, detail::AcquireOp<P>{&limiter.policy(), t, 0})
                .reset_after;
          };
          const Nanos before = read();
          if (!limiter.give_back(r).ok()) return Nanos{0};
          return before - read();
        });
  }

  // The calls waiting now on `key` of `limit` (a Limit or a Limiter).
  std::size_t queued(const void* limit, std::string_view key) const {
    detail::MutexLock lock(&mu_);
    const auto it = queues_.find(queue_key(limit, key));
    return it == queues_.end() ? 0 : it->second.entries.size();
  }

  const C& clock() const noexcept { return clock_; }

 private:
  // One waiting call, on its thread's stack while it waits.
  struct Entry {
    bool held = false;    // capacity counted (token bucket)
    bool has_go = false;  // go_at known (held, or a window's head)
    Nanos arrived{0};
    Nanos deadline{0};
    Nanos go_at{0};
    Nanos jitter{0};  // this waiter's extra wait
    Nanos holds{0};   // what a give-back moves later waiters by
    Receipt receipt;
  };
  struct Queue {
    std::list<Entry*> entries;
  };

  static std::string queue_key(const void* limit, std::string_view key) {
    std::string k(sizeof(limit) + key.size(), '\0');
    std::memcpy(k.data(), &limit, sizeof(limit));
    if (!key.empty()) {
      std::memcpy(k.data() + sizeof(limit), key.data(), key.size());
    }
    return k;
  }

  static Nanos sat_add(Nanos a, Nanos b) noexcept {
    return Nanos{
        detail::clamp_i64(static_cast<detail::i128>(a.count()) + b.count())};
  }

  void wake_all() {
    { detail::MutexLock lock(&mu_); }
    cv_.notify_all();
  }

  Nanos draw_jitter() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (options_.jitter <= Nanos{0}) return Nanos{0};
    // splitmix64
    std::uint64_t z = (rng_ += 0x9E3779B97F4A7C15u);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9u;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBu;
    z ^= z >> 31;
    const auto span = static_cast<std::uint64_t>(options_.jitter.count()) + 1;
    return Nanos{static_cast<std::int64_t>(z % span)};
  }

  // When `e` wakes: its go time plus its jitter, but never past `cap`
  // unless go_at itself is.
  static Nanos wake_of(const Entry& e, Nanos cap) noexcept {
    const Nanos w = sat_add(e.go_at, e.jitter);
    return std::max(e.go_at, std::min(w, cap));
  }

  // The earliest deadline of the held waiters of `q`: the head's jitter
  // ends by then, so that each one that reserved is admitted by its own
  // deadline (their go times are in queue order, each within its deadline).
  static Nanos held_cap(const Queue& q) noexcept {
    Nanos cap = Nanos::max();
    for (const Entry* x : q.entries) {
      if (x->held) cap = std::min(cap, x->deadline);
    }
    return cap;
  }

  // How far a give-back that moved the key's timeline by `moved` (as
  // measured: its returned time, rounded to the ns either way) moves the
  // go times behind it, on the safe side: `holds` when it returned the
  // whole (go times then move by holds or holds + 1 ns), else 1 ns less
  // than measured (a part returned moves go times by its time rounded
  // down or up to the ns), and never less than nothing. A part within 1 ns
  // of the whole reads as whole (a period not a whole number of ns):
  // docs/waiting.md says so.
  static Nanos move_of(Nanos moved, Nanos holds) noexcept {
    if (moved >= holds) return holds;
    return std::max(Nanos{0}, moved - Nanos{1});
  }

  // Sleeps until the clock reaches `t` (Nanos::max(): until notified), or
  // until notified. May return early; callers re-check.
  void sleep_until(Nanos t)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) ABSL_NO_THREAD_SAFETY_ANALYSIS {
    if constexpr (std::same_as<C, ManualClock>) {
      if (t != Nanos::max() && clock_.auto_advance()) {
        // Simulated time: move the clock (its subscribers take mu_).
        mu_.unlock();
        clock_.advance_to(t);
        mu_.lock();
        return;
      }
      cv_.wait(mu_);
    } else if constexpr (std::same_as<C, SteadyClock>) {
      const Nanos now = clock_.now();
      if (t == Nanos::max() || t - now > std::chrono::hours(1)) {
        cv_.wait_for(mu_, std::chrono::hours(1));
      } else {
        cv_.wait_until(
            mu_,
            std::chrono::steady_clock::time_point(
                std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                    t)));
      }
    } else {
      const Nanos now = clock_.now();
      const Nanos d =
          t <= now ? Nanos{0}
                   : std::min<Nanos>(t - now, std::chrono::milliseconds(1));
      cv_.wait_for(mu_, std::max<Nanos>(d, std::chrono::microseconds(50)));
    }
  }

  template <class ReserveFn, class GiveBackFn>
  Waited run(const void* target, std::string_view key, bool exact,
             Nanos max_wait, std::stop_token stop, ReserveFn&& reserve,
             GiveBackFn&& give_back) {
    Waited w;
    const std::string qk = queue_key(target, key);
    // Before the lock: a stop already requested runs the callback here.
    const std::stop_callback on_stop(stop, [this] { wake_all(); });
    detail::MutexLock lock(&mu_);
    const Nanos arrived = clock_.now();
    w.arrived = arrived;
    if (max_wait < Nanos{0}) max_wait = Nanos{0};
    const Nanos deadline = sat_add(arrived, max_wait);
    // The key's queue is made only when the call must wait: one admitted
    // at once allocates nothing here.
    const auto found = queues_.find(qk);
    const std::size_t ahead =
        found == queues_.end() ? 0 : found->second.entries.size();
    if (on_stop_requested(stop)) {
      w.status = absl::CancelledError("wait cancelled before it began");
      return w;
    }
    const bool must_queue = ahead != 0;
    if (must_queue && ahead >= options_.queue_limit) {
      w.status = absl::ResourceExhaustedError(
          absl::StrCat("queue full: ", ahead,
                       " calls already wait on this key "
                       "(WaitOptions::queue_limit)"));
      return w;
    }
    Entry e;
    e.arrived = arrived;
    e.deadline = deadline;
    if (exact || !must_queue) {
      Reserved r = reserve(arrived, max_wait);
      w.decision = r.decision;
      if (r.decision.never()) {
        w.status = absl::OutOfRangeError(
            "cost above the limit's capacity: no wait admits it");
        return w;
      }
      if (r.held && r.decision.allowed && !must_queue) {
        w.receipt = std::move(r.receipt);
        w.go_at = w.admitted_at = std::max(arrived, r.at);
        w.sequence = ++admitted_;
        return w;
      }
      if (!r.held && (exact || r.go_at > deadline)) {
        if (r.decision.retry_after <= max_wait) {
          w.status = absl::ResourceExhaustedError(absl::StrCat(
              "the limit could not hold the reservation (a full store, or a "
              "cost only a later warm-up step holds); it said retry after ",
              r.decision.retry_after.count(), " ns"));
        } else {
          w.status = absl::DeadlineExceededError(absl::StrCat(
              "the limit admits this call in ", r.decision.retry_after.count(),
              " ns, beyond the wait of ", max_wait.count(), " ns"));
        }
        return w;
      }
      if (ahead >= options_.queue_limit) {
        if (r.held) give_back(r.receipt, arrived);
        w.status = absl::ResourceExhaustedError(absl::StrCat(
            "queue full: the call must wait and ", ahead,
            " calls already wait on this key (WaitOptions::queue_limit)"));
        return w;
      }
      e.held = r.held;
      e.has_go = true;
      e.go_at = r.go_at;
      e.holds = r.holds;
      e.receipt = std::move(r.receipt);
    }
    Queue& q = must_queue ? found->second : queues_[qk];
    const auto drop_if_empty = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      if (q.entries.empty()) queues_.erase(qk);
    };
    e.jitter = draw_jitter();
    const auto self = q.entries.insert(q.entries.end(), &e);
    // A held waiter's deadline may end the head's jitter earlier.
    if (e.held) cv_.notify_all();
    // Leaves the queue without admission: gives back what it held, moves
    // the held waiters behind it earlier by what the give-back returned.
    const auto leave = [&](absl::Status st) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      const Nanos now = clock_.now();
      auto next = q.entries.erase(self);
      if (e.held) {
        // The waiters behind move earlier by what the give-back returned
        // (a reservation whose go time has passed returns only what is
        // still ahead of now), never by more.
        const Nanos by =
            e.receipt ? move_of(give_back(e.receipt, now), e.holds) : Nanos{0};
        for (; next != q.entries.end(); ++next) {
          Entry& later = **next;
          if (!later.held) continue;
          later.go_at = std::max(later.arrived, later.go_at - by);
        }
      }
      drop_if_empty();
      cv_.notify_all();
      w.status = std::move(st);
      return std::move(w);
    };
    for (;;) {
      if (on_stop_requested(stop)) {
        return leave(absl::CancelledError("wait cancelled"));
      }
      Nanos now = clock_.now();
      const bool head = q.entries.front() == &e;
      if (head && !e.held && (!e.has_go || now >= wake_of(e, deadline))) {
        // A window policy: try now, the queue's head.
        Reserved r = reserve(now, Nanos{0});
        w.decision = r.decision;
        if (r.held) {
          e.held = true;
          e.go_at = r.at;  // the take's own time
          e.jitter = Nanos{0};
          e.receipt = std::move(r.receipt);
          now = std::max(now, r.at);
        } else if (r.decision.never()) {
          return leave(absl::OutOfRangeError(
              "cost above the limit's capacity: no wait admits it"));
        } else {
          e.has_go = true;
          e.go_at = r.go_at;
          e.jitter = draw_jitter();
          if (e.go_at > deadline) {
            return leave(absl::DeadlineExceededError(absl::StrCat(
                "the limit admits this call only in ",
                r.decision.retry_after.count(), " ns, past the deadline")));
          }
        }
      }
      // A held head wakes by the earliest deadline of the held waiters.
      const Nanos cap = head && e.held ? held_cap(q) : deadline;
      if (head && e.held && now >= wake_of(e, cap)) {
        q.entries.erase(self);
        drop_if_empty();
        cv_.notify_all();
        w.receipt = std::move(e.receipt);
        w.go_at = e.go_at;
        w.admitted_at = now;
        w.decision.allowed = true;
        w.decision.retry_after = Nanos{0};
        w.sequence = ++admitted_;
        return w;
      }
      if (!e.held && now >= deadline) {
        return leave(absl::DeadlineExceededError(
            "not admitted within the wait: gave up at the deadline"));
      }
      Nanos until = Nanos::max();
      if (head && e.has_go) {
        until =
            e.held ? wake_of(e, cap) : std::min(wake_of(e, deadline), deadline);
      } else if (!e.held) {
        until = deadline;
      }
      sleep_until(until);
    }
  }

  static bool on_stop_requested(const std::stop_token& t) noexcept {
    return t.stop_requested();
  }

  C clock_;
  WaitOptions options_;
  mutable detail::Mutex mu_;
  std::condition_variable_any cv_;
  std::unordered_map<std::string, Queue> queues_ ABSL_GUARDED_BY(mu_);
  std::uint64_t rng_ ABSL_GUARDED_BY(mu_);
  std::uint64_t admitted_ ABSL_GUARDED_BY(mu_) = 0;
  ManualClock::Subscription sub_;
};

}  // namespace ratekeeper

#endif  // RATEKEEPER_WAITING_HPP_
