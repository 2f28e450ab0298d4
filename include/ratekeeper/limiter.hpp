// ratekeeper/limiter.hpp: a policy, a store and a clock, put together.
//
// Defines Limiter<Policy, Store, Clock>: acquire(key, cost) decides and
// counts, peek(key, cost) decides without counting, refund(key, cost) gives
// back what a call did not use. One clock read and one store apply per call.
//
//   auto bucket = ratekeeper::TokenBucket::create(ratekeeper::per_second(10),
//                                                 20).value();
//   ratekeeper::Limiter<ratekeeper::TokenBucket> limiter(bucket);
//   if (auto d = limiter.acquire("user:42"); !d) {
//     reply_429(d.retry_after);
//   }
//
// Keys are std::string_view of arbitrary bytes (NUL, ':', '{' included).
// InMemoryStore tells any two byte strings apart; the default ShardedStore
// keeps a 64-bit seeded hash, so two keys share a limit only if their hashes
// collide (docs/stores.md: about 4e-5 expected pairs among 10M live keys),
// which can deny early and never over-admits.
#ifndef RATEKEEPER_LIMITER_HPP_
#define RATEKEEPER_LIMITER_HPP_

#include <string_view>
#include <utility>

#include "ratekeeper/clock.hpp"
#include "ratekeeper/decision.hpp"
#include "ratekeeper/policy/policy.hpp"
#include "ratekeeper/store/in_memory.hpp"
#include "ratekeeper/store/sharded.hpp"
#include "ratekeeper/store/store.hpp"

namespace ratekeeper {

namespace detail {

// What every limiter StoreOp shares: the policy and the time, and the
// policy's idle, idle_at and merge for the store.
template <class P>
struct OpBase {
  const P* policy;
  Nanos now;
  bool idle(const typename P::State& s) const { return policy->idle(s, now); }
  Nanos idle_at(const typename P::State& s) const { return policy->idle_at(s); }
  typename P::State merge(const typename P::State& a,
                          const typename P::State& b) const {
    return policy->merge(a, b);
  }
};

// One limiter call as a StoreOp: the policy's step at a fixed time and cost.
template <class P>
struct AcquireOp : OpBase<P> {
  Cost cost;
  AcquireOp(const P* p, Nanos t, Cost c) : OpBase<P>{p, t}, cost(c) {}
  Step<typename P::State> operator()(const typename P::State& s) const {
    return this->policy->step(s, this->now, cost);
  }
};

// A refund as a StoreOp: the new state, and the decision a zero-cost call
// would then get (what is left after the refund).
template <class P>
struct RefundOp : OpBase<P> {
  Cost cost;
  Nanos charged_at;
  RefundOp(const P* p, Nanos t, Cost c, Nanos at)
      : OpBase<P>{p, t}, cost(c), charged_at(at) {}
  Step<typename P::State> operator()(const typename P::State& s) const {
    const typename P::State next =
        this->policy->refund(s, this->now, cost, charged_at);
    return {next, this->policy->step(next, this->now, 0).decision};
  }
};

// A counted attempt as a StoreOp: the policy's step, and when it denies, the
// policy's charge() instead (the attempt is counted all the same). The
// decision stays a denial, with the wait the charge left.
template <ChargingPolicy P>
struct ChargeOp : OpBase<P> {
  Cost cost;
  ChargeOp(const P* p, Nanos t, Cost c) : OpBase<P>{p, t}, cost(c) {}
  Step<typename P::State> operator()(const typename P::State& s) const {
    Step<typename P::State> st = this->policy->step(s, this->now, cost);
    if (st.decision.allowed) return st;
    const typename P::State next = this->policy->charge(s, this->now, cost);
    Decision d = this->policy->step(next, this->now, cost).decision;
    d.allowed = false;
    return {next, d};
  }
};

}  // namespace detail

// Limiter: decides and counts calls against one limit, per key.
//
// Template parameters:
//   P       a Policy (TokenBucket, FixedWindow, SlidingWindow, or your own).
//   StoreT  a class template of one State parameter meeting Store; default
//           ShardedStore (lock-free), or InMemoryStore (one mutex, exact
//           introspection).
//   C       a Clock; default SteadyClock. A ManualClock copy shares its time
//           with the caller's, so tests move the limiter's time.
//
// Thread safety: all members, concurrently. Not copyable or movable (the
// store holds a lock); hold it by reference or in a std::unique_ptr.
template <Policy P, template <class> class StoreT = ShardedStore,
          Clock C = SteadyClock>
class Limiter {
 public:
  using PolicyType = P;
  using State = typename P::State;
  using StoreType = StoreT<State>;
  using ClockType = C;

  static_assert(Store<StoreType>,
                "StoreT<State> must meet ratekeeper::Store: apply(), peek(), "
                "update(), stats(), and nested State and Options types");

  explicit Limiter(P policy, C clock = C{})
      : policy_(std::move(policy)), clock_(std::move(clock)) {}

  Limiter(P policy, typename StoreType::Options store_options, C clock = C{})
      : policy_(std::move(policy)),
        store_(store_options),
        clock_(std::move(clock)) {}

  Limiter(const Limiter&) = delete;
  Limiter& operator=(const Limiter&) = delete;

  // acquire
  //
  // Decides whether a call of `cost` on `key` may go ahead now, and counts it
  // if so. A cost above the limit is denied with retry_after == kNever. A
  // zero cost is always allowed and counts nothing (a way to read remaining).
  // Thread-safe.
  Decision acquire(std::string_view key, Cost cost = 1) {
    return store_.apply(key,
                        detail::AcquireOp<P>{&policy_, clock_.now(), cost});
  }

  // peek
  //
  // The decision acquire(key, cost) would return now, without counting
  // anything. Thread-safe; may be stale on return.
  Decision peek(std::string_view key, Cost cost = 1) const {
    return store_.peek(key, detail::AcquireOp<P>{&policy_, clock_.now(), cost});
  }

  // refund
  //
  // Gives back `cost` units of a call that was admitted at `charged_at` and
  // did not use them (cancelled, or used fewer tokens than reserved). Never
  // gives back more than is counted; a window policy drops a refund whose
  // window has closed. A key not held is left alone. Thread-safe.
  void refund(std::string_view key, Cost cost, Nanos charged_at) {
    static_cast<void>(store_.update(
        key, detail::RefundOp<P>{&policy_, clock_.now(), cost, charged_at}));
  }

  // refund
  //
  // As above, for a call charged just now (in the current window).
  void refund(std::string_view key, Cost cost) {
    const Nanos now = clock_.now();
    static_cast<void>(
        store_.update(key, detail::RefundOp<P>{&policy_, now, cost, now}));
  }

  // Thread-safe.
  Nanos now() const noexcept { return clock_.now(); }
  const P& policy() const noexcept { return policy_; }
  StoreType& store() noexcept { return store_; }
  const StoreType& store() const noexcept { return store_; }
  StoreStats stats() const { return store_.stats(); }

 private:
  const P policy_;
  StoreType store_;
  const C clock_;
};

}  // namespace ratekeeper

#endif  // RATEKEEPER_LIMITER_HPP_
