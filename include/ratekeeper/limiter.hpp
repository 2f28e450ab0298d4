// ratekeeper/limiter.hpp: a policy, a store and a clock, put together.
//
// Defines Limiter<Policy, Store, Clock>: acquire(key, cost) decides and
// counts, peek(key, cost) decides without counting, take(key, cost) decides
// and counts and returns a Receipt, which settle(receipt, actual) settles to
// the call's actual cost. One clock read and one store apply per call.
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

#include <concepts>
#include <cstdint>
#include <string_view>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "ratekeeper/clock.hpp"
#include "ratekeeper/decision.hpp"
#include "ratekeeper/policy/policy.hpp"
#include "ratekeeper/receipt.hpp"
#include "ratekeeper/store/in_memory.hpp"
#include "ratekeeper/store/sharded.hpp"
#include "ratekeeper/store/store.hpp"

namespace ratekeeper {

// Taken: a decision, and the receipt of what it took (empty when refused).
struct [[nodiscard]] Taken {
  Decision decision;
  Receipt receipt;
  constexpr explicit operator bool() const noexcept { return decision.allowed; }
};

namespace detail {

// What every limiter StoreOp shares: the policy and the time, and the
// policy's idle, idle_at and merge for the store. `before` receives the state
// a published run started from (StoreOp::published), for a receipt.
template <class P>
struct OpBase {
  const P* policy;
  Nanos now;
  typename P::State* before = nullptr;
  // Where a take records its key's give-back counter (see
  // TokenBucket::kGiveBacksMoveLaterTakes); stores hand it over through
  // aux_in() before they read the state.
  std::uint64_t* mark = nullptr;
  void aux_in(std::uint64_t aux) const {
    if (mark != nullptr) *mark = aux;
  }
  bool idle(const typename P::State& s) const { return policy->idle(s, now); }
  Nanos idle_at(const typename P::State& s) const { return policy->idle_at(s); }
  typename P::State merge(const typename P::State& a,
                          const typename P::State& b) const {
    return policy->merge(a, b);
  }
  void published(const typename P::State& s) const {
    if (before != nullptr) *before = s;
  }
};

// One limiter call as a StoreOp: the policy's step at a fixed time and cost.
template <class P>
struct AcquireOp : OpBase<P> {
  Cost cost;
  AcquireOp(const P* p, Nanos t, Cost c, typename P::State* b = nullptr)
      : OpBase<P>{p, t, b}, cost(c) {}
  // Inlined always into the store's apply: the check's path.
  [[gnu::always_inline]] Step<typename P::State> operator()(
      const typename P::State& s) const {
    return this->policy->step(s, this->now, cost);
  }
};

// A receipt's settlement as a StoreOp: the policy's settle(), and the
// decision a zero-cost call would then get (what is left after it).
template <class P>
struct SettleOp : OpBase<P> {
  typename P::Placement place;
  Cost taken;
  Cost actual;
  // The key's give-back counter, from the store (aux_in()), and the
  // placement as last settled (moved by what was returned since the take).
  mutable std::uint64_t aux = 0;
  mutable typename P::Placement moved{};
  SettleOp(const P* p, Nanos t, const typename P::Placement& pl, Cost tk,
           Cost ac)
      : OpBase<P>{p, t}, place(pl), taken(tk), actual(ac) {}
  void aux_in(std::uint64_t a) const { aux = a; }
  static constexpr bool kWantsAux = requires { P::kGiveBacksMoveLaterTakes; };
  Step<typename P::State> operator()(const typename P::State& s) const {
    typename P::Placement p = place;
    if constexpr (requires { P::kGiveBacksMoveLaterTakes; }) {
      // What give-backs returned since the take moved its stretch earlier.
      if (aux > p.mark) p = this->policy->shift(p, aux - p.mark);
      moved = p;
    }
    const typename P::State next =
        this->policy->settle(s, this->now, p, taken, actual);
    return {next, this->policy->step(next, this->now, 0).decision};
  }
  // What the store adds to the key's give-back counter once it published.
  std::uint64_t aux_add(const typename P::State& from,
                        const typename P::State& to) const {
    if constexpr (requires { P::kGiveBacksMoveLaterTakes; }) {
      return this->policy->returned_ns(from, to, moved);
    } else {
      return 0;
    }
  }
  // A debt must be counted, on a key the store let go too.
  bool forces_insert() const noexcept { return actual > taken; }
};

// A counted attempt as a StoreOp: the policy's step, and when it denies, the
// policy's charge() instead (the attempt is counted all the same). The
// decision stays a denial, with the wait the charge left.
template <ChargingPolicy P>
struct ChargeOp : OpBase<P> {
  Cost cost;
  ChargeOp(const P* p, Nanos t, Cost c, typename P::State* b = nullptr)
      : OpBase<P>{p, t, b}, cost(c) {}
  Step<typename P::State> operator()(const typename P::State& s) const {
    Step<typename P::State> st = this->policy->step(s, this->now, cost);
    if (st.decision.allowed) return st;
    const typename P::State next = this->policy->charge(s, this->now, cost);
    Decision d = this->policy->step(next, this->now, cost).decision;
    d.allowed = false;
    return {next, d};
  }
};

// A take that learns whether the store kept it, and (for a policy whose
// give-backs move later takes) the key's give-back counter.
template <class P, class Op>
struct MarkedTake : Op {
  static constexpr bool kWantsAux = requires { P::kGiveBacksMoveLaterTakes; };
  bool* flag;
  void published(const typename P::State& s) const {
    Op::published(s);
    *flag = true;
  }
};

// take_on
//
// `op` (an AcquireOp or ChargeOp) on `store`, with a receipt from `issuer`
// when the take was admitted and the store kept it.
template <class P, class StoreT, class Op>
Decision take_on(StoreT& store, std::string_view key, Op op, const P& policy,
                 const void* issuer, std::uint64_t serial, Receipt& out) {
  typename P::State before{};
  std::uint64_t mark = 0;
  bool kept = false;
  op.before = &before;
  op.mark = &mark;
  const MarkedTake<P, Op> marked{op, &kept};
  const Decision d = store.apply(key, marked);
  if (d.allowed && kept) {
    typename P::Placement placed = policy.place(before, op.now, op.cost);
    if constexpr (requires { P::kGiveBacksMoveLaterTakes; }) {
      placed.mark = mark;
    }
    out = Receipt::issue(issuer, key, op.cost, op.now, placed, serial);
  } else {
    out = Receipt();
  }
  return d;
}

// settle_on
//
// Settles `r` (checked to come from `issuer`) on `store`: an update when it
// gives back (a forgotten key stays forgotten), an apply when it charges a
// debt (the debt is counted even on a key the store let go).
template <class P, class StoreT>
absl::StatusOr<Decision> settle_on(StoreT& store, const P& policy,
                                   const void* issuer, std::uint64_t serial,
                                   Receipt& r, Cost actual, Nanos now) {
  if (!r.open()) {
    return absl::FailedPreconditionError(
        "receipt already settled, or empty (a refused call takes nothing)");
  }
  if (r.issuer() != issuer || r.serial() != serial) {
    return absl::InvalidArgumentError(
        "receipt issued by another limit: a receipt is settled by the limit "
        "that took it");
  }
  if (actual <= r.cost()) {
    const SettleOp<P> op(&policy, now, r.placement<typename P::Placement>(),
                         r.cost(), actual);
    const Decision d = store.update(r.key(), op);
    r.close();
    return d;
  }
  // A debt: counted on the key even if the store had let it go.
  bool kept = false;
  struct Marked : SettleOp<P> {
    bool* flag;
    void published(const typename P::State&) const { *flag = true; }
  };
  const Marked op{
      SettleOp<P>(&policy, now, r.placement<typename P::Placement>(), r.cost(),
                  actual),
      &kept};
  const Decision d = store.apply(r.key(), op);
  if (!kept) {
    // A full store that does not evict (WhenFull::kDenyNew,
    // kAdmitUncounted) and had let the key go: the receipt stays open, so
    // the caller may settle it again once the store has room.
    return absl::ResourceExhaustedError(absl::StrCat(
        "store full: the excess of ", actual - r.cost(),
        " over the take could not be counted; the receipt is still open"));
  }
  r.close();
  return d;
}

}  // namespace detail

// --- Reservations (issue 17: waiting instead of refusing; waiting.hpp) ---

// ReservingPolicy: a Policy that can hold capacity for a call that goes
// later (TokenBucket): reserve(s, now, cost, max_wait) is step(), and when
// step() denies with retry_after <= max_wait, counts the cost all the same
// where a step at now + retry_after would have; holds(placement) is the
// time such a take occupies, in whole ns rounded down.
template <class P>
concept ReservingPolicy = Policy<P> &&
    requires(const P& p, const typename P::State& s, Nanos now, Cost cost,
             const typename P::Placement& pl) {
  { p.reserve(s, now, cost, now) }
  noexcept->std::same_as<Step<typename P::State>>;
  { p.holds(pl) }
  noexcept->std::same_as<Nanos>;
};

// Reserved: a place for a call, now or later.
//
//   decision  what acquire() would have answered at `at`: allowed, or
//             denied with the exact retry_after (kNever: no wait admits it).
//   held      the cost is counted for this caller: at once when admitted;
//             for a ReservingPolicy (token bucket), also when the wait was
//             within max_wait, so no later call can take it first. A
//             window policy holds only what it admits now: otherwise the
//             reservation is a promise of when its window opens (go_at),
//             and the caller tries again then.
//   at        the time it was decided, by the limit's clock.
//   go_at     when the call may go: at + decision.retry_after (Nanos::max()
//             when never). Held capacity is the caller's from go_at on.
//   holds     the time of the limit's timeline the held cost occupies (a
//             token bucket's cost * period / rate, rounded down): what a
//             give-back before go_at moves every later reservation earlier.
//   receipt   what was taken, when held (give_back() cancels, exactly).
struct [[nodiscard]] Reserved {
  Decision decision;
  bool held = false;
  Nanos at{0};
  Nanos go_at{0};
  Nanos holds{0};
  Receipt receipt;
  constexpr explicit operator bool() const noexcept { return held; }
};

namespace detail {

template <ReservingPolicy P>
struct ReserveOp : OpBase<P> {
  Cost cost;
  Nanos max_wait;
  ReserveOp(const P* p, Nanos t, Cost c, Nanos w)
      : OpBase<P>{p, t}, cost(c), max_wait(w) {}
  Step<typename P::State> operator()(const typename P::State& s) const {
    return this->policy->reserve(s, this->now, cost, max_wait);
  }
};

// reserve_on
//
// A reservation of `cost` on `key` at `now` waiting at most `max_wait`: a
// ReservingPolicy holds it exactly; any other policy takes it if it fits
// now, and otherwise promises go_at (the time a retry is admitted if
// nothing else happens) and holds nothing.
template <class P, class StoreT>
Reserved reserve_on(StoreT& store, std::string_view key, const P& policy,
                    Nanos now, Cost cost, Nanos max_wait, const void* issuer,
                    std::uint64_t serial) {
  Reserved r;
  r.at = now;
  if constexpr (ReservingPolicy<P>) {
    typename P::State before{};
    std::uint64_t mark = 0;
    bool kept = false;
    ReserveOp<P> op(&policy, now, cost, max_wait);
    op.before = &before;
    op.mark = &mark;
    const MarkedTake<P, ReserveOp<P>> marked{op, &kept};
    r.decision = store.apply(key, marked);
    const bool debt = !r.decision.allowed && !r.decision.never() &&
                      r.decision.retry_after <= max_wait && cost != 0;
    r.held = r.decision.allowed || (debt && kept);
    if (r.held && kept) {
      typename P::Placement placed = policy.place(before, now, cost);
      if constexpr (requires { P::kGiveBacksMoveLaterTakes; }) {
        placed.mark = mark;
      }
      r.holds = policy.holds(placed);
      r.receipt = Receipt::issue(issuer, key, cost, now, placed, serial);
    }
  } else {
    static_cast<void>(max_wait);
    r.decision = take_on(store, key, AcquireOp<P>{&policy, now, cost}, policy,
                         issuer, serial, r.receipt);
    r.held = r.decision.allowed;
  }
  r.go_at = r.decision.never()
                ? Nanos::max()
                : Nanos{clamp_i64(static_cast<i128>(now.count()) +
                                  r.decision.retry_after.count())};
  return r;
}

}  // namespace detail
// --- end of reservations ---

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

  // take
  //
  // As acquire(), with a Receipt of what was taken when admitted (an empty
  // one when refused): settle it once the call's real cost is known, or
  // give it back if the call did not happen. Thread-safe.
  Taken take(std::string_view key, Cost cost) {
    Taken t;
    t.decision = detail::take_on(
        store_, key, detail::AcquireOp<P>{&policy_, clock_.now(), cost},
        policy_, this, serial_, t.receipt);
    return t;
  }

  // settle
  //
  // Settles a take to its actual cost, in both directions: below what was
  // taken, the unused part is given back (never more than is still
  // outstanding of that take now); above it, the excess is charged at once
  // as a debt, whether or not it fits, so that later calls wait for it.
  // Returns what a zero-cost call would now be told. The receipt is closed.
  // kFailedPrecondition for a receipt already settled (or empty),
  // kInvalidArgument for one from another limiter; either way nothing
  // changes. Thread-safe.
  absl::StatusOr<Decision> settle(Receipt& receipt, Cost actual) {
    return detail::settle_on(store_, policy_, this, serial_, receipt, actual,
                             clock_.now());
  }

  // give_back
  //
  // settle(receipt, 0): the call did not happen (cancelled, failed before
  // the provider counted anything).
  absl::StatusOr<Decision> give_back(Receipt& receipt) {
    return settle(receipt, 0);
  }

  // reserve
  //
  // A place for a call of `cost` on `key` that may wait up to `max_wait`
  // (see Reserved): a token bucket counts it now and answers "go at
  // go_at", exactly when a plain acquire would first admit it, and no later
  // call can take it first; give_back(receipt) cancels it exactly. A window
  // policy holds only what fits now, else promises go_at. A wait above
  // max_wait holds nothing. For a blocking wait with a deadline, a FIFO
  // queue per key and jitter, see Waiter (waiting.hpp). Thread-safe.
  Reserved reserve(std::string_view key, Cost cost, Nanos max_wait) {
    return detail::reserve_on(store_, key, policy_, clock_.now(), cost,
                              max_wait, this, serial_);
  }
  static constexpr bool kReservesExactly = ReservingPolicy<P>;
  const C& clock() const noexcept { return clock_; }

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
  const std::uint64_t serial_ = detail::next_issuer_serial();
};

}  // namespace ratekeeper

#endif  // RATEKEEPER_LIMITER_HPP_
