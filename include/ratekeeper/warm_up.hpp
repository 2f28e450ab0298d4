// ratekeeper/warm_up.hpp: a token bucket that starts cold and reaches its
// rate over a stated time (issue 17; Guava's SmoothWarmingUp).
//
// Defines WarmUp (the ramp: how long, in how many steps) and WarmUpLimit, a
// Limit over a token bucket whose numbers climb a staircase after a start
// time (its creation, or restart_warm_up(now)): during step k (k = 1 ..
// steps, each duration / steps long) the bucket refills at rate * k / steps
// with a burst of max(1, floor(burst * k / steps)); from step `steps` on
// (the last step already is the full rate) it is the full token bucket.
//
//   auto limit = ratekeeper::make_warm_up_limit(
//       {.name = "upstream"},
//       ratekeeper::TokenBucket::create(per_second(100), 100).value(),
//       {.duration = std::chrono::minutes(5), .steps = 5}, clock.now())
//       .value();  // 20/s (burst 20), 40/s (40) ... 100/s (100) from 4 min
//
// Exact: every decision is exactly a token bucket's (TokenBucket::step) at
// the numbers of the step in force; the step changes at the first call at
// or after each step's start (any of acquire, peek, take, charge, reserve,
// settle), by PolicyLimit::reconfigure(next, Carry::kAsStored, start): each
// key keeps its stored state (its TAT: the instant its bucket is full
// again), read under the next step's numbers. Rate and burst scale
// together, so a bucket's refill time burst / rate is the same in every
// step (up to the burst's rounding): a key keeps the share of its bucket it
// had. Receipts taken in an earlier step settle as any receipt across a
// reconfigure: given back at the rate they were taken at.
//
// The step in force never goes back (until restart_warm_up): a call whose
// `now` is earlier than the step's start (a thread that read its clock
// before another thread's later call moved the step) is decided under the
// later step's numbers. docs/policies.md, "Warm-up".
//
// Thread safety: all members, concurrently. A step change runs under a
// mutex and publishes the next step's policy with one atomic store (inside
// reconfigure); each call reads the policy once, so a call racing a step
// change is decided wholly under one step's numbers or the next's, never a
// mix.
#ifndef RATEKEEPER_WARM_UP_HPP_
#define RATEKEEPER_WARM_UP_HPP_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <numeric>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "ratekeeper/chain.hpp"
#include "ratekeeper/decision.hpp"
#include "ratekeeper/detail/math.hpp"
#include "ratekeeper/detail/mutex.hpp"
#include "ratekeeper/listener.hpp"
#include "ratekeeper/overrides.hpp"
#include "ratekeeper/policy/token_bucket.hpp"
#include "ratekeeper/store/sharded.hpp"

namespace ratekeeper {

// WarmUp: the ramp. `steps` levels (1 to kMaxSteps), each duration / steps
// long; level k refills at rate * k / steps. steps == 1 is no ramp.
struct WarmUp {
  Nanos duration{0};
  std::uint32_t steps = 1;
  static constexpr std::uint32_t kMaxSteps = 1000;
};

// WarmUpLimit: a token bucket on StoreT that warms up (the file comment).
//
// What passes through to the PolicyLimit<TokenBucket> inside (inner()):
// receipts and settle, reserve (a token bucket's exact reservation, at the
// step's numbers), reset, overrides (set_override: a key's own bucket, not
// ramped), the store's statistics. The listener set on this limit
// (Limit::set_listener) hears the inner limit's decisions as this limit's
// (LimitEvent::limit is this one), near-limit judged by this limit's
// threshold; give-backs count in this limit's statistics.
//
// One deviation from a token bucket, stated: a cost above the step's burst
// but within the full burst is not kNever (a later step admits it): it is
// refused with retry_after = the start of the first step whose burst holds
// it, less now (at least 1 ns), a lower bound of the wait. A reservation of
// such a cost holds nothing (held false, go_at then).
template <template <class> class StoreT = ShardedStore>
class WarmUpLimit final : public Limit {
 public:
  using Inner = PolicyLimit<TokenBucket, StoreT>;
  using StoreOptions = typename Inner::StoreType::Options;

  // Use make_warm_up_limit(), which validates.
  WarmUpLimit(const LimitOptions& o, std::vector<TokenBucket> ladder,
              WarmUp ramp, Nanos start, StoreOptions store_options)
      : Limit(o),
        ladder_(std::move(ladder)),
        ramp_(ramp),
        inner_(std::make_unique<Inner>(o, ladder_.front(), store_options)),
        forwarder_(std::make_shared<Forwarder>(this)) {
    detail::MutexLock lock(&mu_);
    begin(start);
  }

  Decision acquire(std::string_view key, Cost cost, Nanos now) override {
    enter(now);
    return widen(inner_->acquire(key, cost, now), cost, now);
  }
  Decision peek(std::string_view key, Cost cost, Nanos now) const override {
    enter(now);
    return widen(inner_->peek(key, cost, now), cost, now);
  }
  Decision take(std::string_view key, Cost cost, Nanos now,
                Receipt& receipt) override {
    enter(now);
    return widen(inner_->take(key, cost, now, receipt), cost, now);
  }
  Decision charge(std::string_view key, Cost cost, Nanos now,
                  Receipt& receipt) override {
    enter(now);
    return widen(inner_->charge(key, cost, now, receipt), cost, now);
  }
  absl::StatusOr<Decision> settle(Receipt& receipt, Cost actual,
                                  Nanos now) override {
    enter(now);
    const Cost taken = receipt.cost();
    absl::StatusOr<Decision> d = inner_->settle(receipt, actual, now);
    if (d.ok() && actual < taken) {
      metrics().add(LimitMetrics::kGivenBack);
      metrics().add(LimitMetrics::kGivenBackUnits, taken - actual);
    }
    return d;
  }
  Reserved reserve(std::string_view key, Cost cost, Nanos now,
                   Nanos max_wait) override {
    enter(now);
    Reserved r = inner_->reserve(key, cost, now, max_wait);
    if (r.decision.never()) {
      r.decision = widen(r.decision, cost, now);
      if (!r.decision.never()) {
        r.go_at =
            Nanos{detail::clamp_i64(static_cast<detail::i128>(now.count()) +
                                    r.decision.retry_after.count())};
      }
    }
    return r;
  }
  bool reserves_exactly() const noexcept override { return true; }

  // The step in force's burst, and its refill time.
  std::uint64_t limit() const noexcept override { return inner_->limit(); }
  Nanos window() const noexcept override { return inner_->window(); }
  StoreStats store_stats() const override { return inner_->store_stats(); }
  // The inner limit's keys, its overrides' too (statistics().keys).
  std::uint64_t keys_held() const override { return inner_->keys_held(); }
  absl::Status reset(std::string_view key, Nanos now) override {
    enter(now);
    return inner_->reset(key, now);
  }

  // restart_warm_up
  //
  // The upstream is cold again (redeployed): the ramp starts over at `now`,
  // step 1's numbers in force from this call on (Carry::kAsStored, as every
  // step change). Thread-safe.
  void restart_warm_up(Nanos now) {
    detail::MutexLock lock(&mu_);
    begin(now);
    publish(1, now);
  }

  // The step in force (1 .. steps; steps is the full rate), as of the last
  // call that moved it.
  std::uint32_t step() const noexcept {
    return step_seen_.load(std::memory_order_acquire);
  }
  // The numbers of step k (1 .. steps): the token bucket then in force.
  const TokenBucket& step_policy(std::uint32_t k) const {
    return ladder_.at(k - 1);
  }
  // When step k (1 .. steps) starts for the ramp that started at `start`:
  // start + floor(duration * (k - 1) / steps).
  Nanos step_start(std::uint32_t k, Nanos start) const noexcept {
    const detail::i128 off = static_cast<detail::i128>(ramp_.duration.count()) *
                             (k - 1) / ramp_.steps;
    return Nanos{
        detail::clamp_i64(static_cast<detail::i128>(start.count()) + off)};
  }
  // The start of the ramp in force.
  Nanos started_at() const noexcept {
    return Nanos{start_.load(std::memory_order_acquire)};
  }
  const WarmUp& ramp() const noexcept { return ramp_; }
  const TokenBucket& full() const noexcept { return ladder_.back(); }

  // The token-bucket limit inside: overrides (set_override, clear_override,
  // override_for), its store. Do not reconfigure it: the ramp does.
  Inner& inner() noexcept { return *inner_; }
  absl::Status set_override(std::string_view key, TokenBucket policy,
                            Nanos now) {
    return inner_->set_override(key, std::move(policy), now);
  }
  absl::Status clear_override(std::string_view key, Nanos now) {
    return inner_->clear_override(key, now);
  }

 private:
  // Relays the inner limit's events to this limit's listener, as this
  // limit's. The inner limit's threshold is 1000 (every admission is
  // "near"): the relay judges by this limit's.
  struct Forwarder final : LimitListener {
    explicit Forwarder(WarmUpLimit* o) : outer(o) {}
    WarmUpLimit* outer;
    void on_allowed(const LimitEvent& e) override {
      outer->relay(&LimitListener::on_allowed, e);
    }
    void on_denied(const LimitEvent& e) override {
      outer->relay(&LimitListener::on_denied, e);
    }
    void on_near_limit(const LimitEvent& e) override {
      const detail::u128 lhs =
          static_cast<detail::u128>(e.decision.remaining) * 1000;
      const detail::u128 rhs = static_cast<detail::u128>(e.decision.limit) *
                               outer->near_limit_permille();
      if (lhs <= rhs) outer->relay(&LimitListener::on_near_limit, e);
    }
    void on_given_back(const LimitEvent& e) override {
      outer->relay(&LimitListener::on_given_back, e);
    }
  };

  void relay(void (LimitListener::*fn)(const LimitEvent&),
             const LimitEvent& e) noexcept {
    LimitListener* l = listener();
    if (l == nullptr) return;
    LimitEvent mine = e;
    mine.limit = this;
    try {
      (l->*fn)(mine);
    } catch (...) {
      metrics().add(LimitMetrics::kListenerErrors);
    }
  }

  // Before every call: the step for `now` in force, and the relay to a
  // listener set since. One atomic load each when nothing is to do.
  [[gnu::always_inline]] void enter(Nanos now) const {
    if (now.count() >= next_change_.load(std::memory_order_acquire))
        [[unlikely]] {
      advance(now);
    }
    if (listener() != nullptr && !forwarding_.load(std::memory_order_acquire))
        [[unlikely]] {
      forward();
    }
  }

  [[gnu::noinline]] void advance(Nanos now) const {
    detail::MutexLock lock(&mu_);
    const Nanos start{start_.load(std::memory_order_relaxed)};
    std::uint32_t k = step_;
    while (k < ramp_.steps && now >= step_start(k + 1, start)) ++k;
    if (k != step_) publish(k, step_start(k, start));
  }

  [[gnu::noinline]] void forward() const {
    detail::MutexLock lock(&mu_);
    if (forwarding_.load(std::memory_order_relaxed)) return;
    inner_->set_near_limit_permille(1000);
    inner_->set_listener(forwarder_);
    forwarding_.store(true, std::memory_order_release);
  }

  // The ramp starts at `start`, at step 1 (the policy is published by the
  // caller: the constructor's inner limit already holds step 1).
  void begin(Nanos start) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    start_.store(start.count(), std::memory_order_release);
    step_ = 1;
    step_seen_.store(1, std::memory_order_release);
    next_change_.store(
        ramp_.steps > 1 ? step_start(2, start).count() : detail::kI64Max,
        std::memory_order_release);
  }

  // Puts step k in force (as of `at`, its start) and the next change's time.
  void publish(std::uint32_t k, Nanos at) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    // A token bucket's reconfigure with kAsStored cannot fail.
    static_cast<void>(
        inner_->reconfigure(ladder_[k - 1], Carry::kAsStored, at));
    step_ = k;
    step_seen_.store(k, std::memory_order_release);
    const Nanos start{start_.load(std::memory_order_relaxed)};
    next_change_.store(
        k < ramp_.steps ? step_start(k + 1, start).count() : detail::kI64Max,
        std::memory_order_release);
  }

  // A cost above the step's burst that a later step holds: refused until
  // that step starts (a lower bound), not kNever.
  Decision widen(Decision d, Cost cost, Nanos now) const noexcept {
    if (!d.never() || cost > ladder_.back().burst()) [[likely]] {
      return d;
    }
    std::uint32_t j = 1;
    while (ladder_[j - 1].burst() < cost) ++j;
    const Nanos from = step_start(j, started_at());
    const detail::i128 wait = static_cast<detail::i128>(from.count()) -
                              static_cast<detail::i128>(now.count());
    d.retry_after = Nanos{wait < 1 ? 1 : detail::clamp_i64(wait)};
    return d;
  }

  const std::vector<TokenBucket> ladder_;  // ladder_[k - 1]: step k
  const WarmUp ramp_;
  std::unique_ptr<Inner> inner_;
  std::shared_ptr<Forwarder> forwarder_;
  mutable detail::Mutex mu_;
  mutable std::uint32_t step_ ABSL_GUARDED_BY(mu_) = 1;
  mutable std::atomic<std::uint32_t> step_seen_{1};
  mutable std::atomic<std::int64_t> start_{0};
  // The time the next step starts (INT64_MAX: at the full rate).
  mutable std::atomic<std::int64_t> next_change_{detail::kI64Max};
  mutable std::atomic<bool> forwarding_{false};
};

namespace detail {

// The numbers of step k of `steps`: rate * k / steps exactly (a fraction
// of the rate's count over its period), burst max(1, floor(burst * k /
// steps)).
inline absl::StatusOr<TokenBucket> warm_step(const TokenBucket& full,
                                             std::uint32_t k,
                                             std::uint32_t steps) {
  const std::uint32_t g = std::gcd(k, steps);
  const std::uint64_t mul = k / g;
  const std::uint64_t div = steps / g;
  const Rate r = full.rate();
  const u128 count = static_cast<u128>(r.count) * mul;
  const i128 period = static_cast<i128>(r.period.count()) * div;
  if (count > TokenBucket::kMaxCount || period > kI64Max) {
    return absl::InvalidArgumentError(absl::StrCat(
        "warm-up step ", k, " of ", steps, ": the rate ", r.count, " per ",
        r.period.count(), " ns times ", mul, "/", div, " does not fit"));
  }
  const u128 b = static_cast<u128>(full.burst()) * k / steps;
  const std::uint64_t burst = b == 0 ? 1 : static_cast<std::uint64_t>(b);
  absl::StatusOr<TokenBucket> tb =
      TokenBucket::create(Rate{static_cast<std::uint64_t>(count),
                               Nanos{static_cast<std::int64_t>(period)}},
                          burst);
  if (!tb.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "warm-up step ", k, " of ", steps, ": ", tb.status().message()));
  }
  return tb;
}

}  // namespace detail

// make_warm_up_limit
//
// A WarmUpLimit reaching `full` over `ramp`, its ramp starting at `start`
// (the deploy: the caller's clock now). kInvalidArgument for bad options
// (as make_limit; charge_on_reject is allowed), a duration that is not
// positive, steps outside 1 .. WarmUp::kMaxSteps, or a step's numbers that
// do not fit a TokenBucket.
template <template <class> class StoreT = ShardedStore>
absl::StatusOr<std::unique_ptr<WarmUpLimit<StoreT>>> make_warm_up_limit(
    const LimitOptions& options, const TokenBucket& full, WarmUp ramp,
    Nanos start,
    typename WarmUpLimit<StoreT>::StoreOptions store_options = {}) {
  if (absl::Status st = detail::check_limit_options(options); !st.ok()) {
    return st;
  }
  if (ramp.duration <= Nanos{0}) {
    return absl::InvalidArgumentError(absl::StrCat(
        "limit \"", options.name, "\": warm-up duration must be positive, got ",
        ramp.duration.count(), " ns"));
  }
  if (ramp.steps == 0 || ramp.steps > WarmUp::kMaxSteps) {
    return absl::InvalidArgumentError(absl::StrCat(
        "limit \"", options.name, "\": warm-up steps must be 1 to ",
        WarmUp::kMaxSteps, ", got ", ramp.steps));
  }
  std::vector<TokenBucket> ladder;
  ladder.reserve(ramp.steps);
  for (std::uint32_t k = 1; k <= ramp.steps; ++k) {
    absl::StatusOr<TokenBucket> tb = detail::warm_step(full, k, ramp.steps);
    if (!tb.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "limit \"", options.name, "\": ", tb.status().message()));
    }
    ladder.push_back(*std::move(tb));
  }
  return std::make_unique<WarmUpLimit<StoreT>>(options, std::move(ladder), ramp,
                                               start, store_options);
}

}  // namespace ratekeeper

#endif  // RATEKEEPER_WARM_UP_HPP_
