// ratekeeper/store/store.hpp: the contract every state store meets.
//
// Defines the Store concept, the StoreOp a limiter hands to a store, WhenFull
// (what a store at capacity does with a new key) and StoreStats.
//
// A store keeps one policy State per key and applies a pure step to it
// atomically. It knows nothing of policies: the step arrives as a StoreOp.
#ifndef RATEKEEPER_STORE_STORE_HPP_
#define RATEKEEPER_STORE_STORE_HPP_

#include <concepts>
#include <cstdint>
#include <string_view>

#include "ratekeeper/decision.hpp"
#include "ratekeeper/policy/policy.hpp"

namespace ratekeeper {

// WhenFull: what a store at its key capacity does with a key it does not
// hold, once reclaiming idle states has freed nothing.
enum class WhenFull {
  // Deny the call (fail closed). Safe against a flood of new keys; a
  // legitimate new user waits until states go idle.
  kDenyNew,
  // Decide as for a fresh key and forget it (fail open): the call is admitted
  // when its cost fits a full limit, and is not counted. Availability first.
  kAdmitUncounted,
  // Evict the stalest state near the new key's slot (the one that becomes
  // idle soonest) and keep it, merged with others, in a small summary that a
  // returning key starts from: an evicted key that returns is never admitted
  // more than its evicted state allowed. Availability for new keys, safety
  // for old ones; the price is that keys sharing a summary cell share its
  // restriction until it recovers. ShardedStore only; InMemoryStore treats
  // it as kDenyNew.
  kEvictStalest,
};

// StoreStats: counters since construction. A snapshot; thread-safe to take.
struct StoreStats {
  std::uint64_t keys = 0;                // states held now
  std::uint64_t inserts = 0;             // keys added
  std::uint64_t reclaimed = 0;           // idle states dropped to make room
  std::uint64_t sweeps = 0;              // reclaim passes run
  std::uint64_t evicted = 0;             // non-idle states evicted
  std::uint64_t denied_full = 0;         // new keys denied (kDenyNew)
  std::uint64_t admitted_uncounted = 0;  // new keys decided uncounted
  std::uint64_t cas_retries = 0;         // lost compare-and-swaps re-run

  friend constexpr bool operator==(const StoreStats&,
                                   const StoreStats&) = default;
};

// StoreOp: one limiter call, as a store sees it.
//
// Requires: op(s) -> Step<State> is pure and may run several times for one
// call (a store that retries a lost compare-and-swap re-runs it, and keeps
// only the last result), so it has no side effects. op.idle(s) says whether a
// state is equivalent to a zeroed one at the op's time, so that the store may
// drop it; op.idle_at(s) and op.merge(a, b) are the policy's (see Policy),
// for stores that evict. op.published(before) is called exactly once when
// the store keeps the result of op(before) as the key's state (or, for a key
// it does not hold, when that result equals the state the key starts from):
// never for a run whose result was discarded (a lost compare-and-swap, a
// peek, a full store that denied the key or admitted it uncounted). It is
// how a take learns what it took from, for its Receipt.
template <class Op, class State>
concept StoreOp = requires(const Op& op, const State& s) {
  { op(s) } -> std::same_as<Step<State>>;
  op.published(s);
  { op.idle(s) } -> std::same_as<bool>;
  { op.idle_at(s) } -> std::same_as<Nanos>;
  { op.merge(s, s) } -> std::same_as<State>;
};

namespace detail {
// denied_full
//
// The decision for a new key refused because its store is full: what the
// key would have got as fresh, turned into a denial that says when to try
// again (unless no wait could ever admit it: then it stays kNever).
constexpr Decision denied_full(Decision fresh, Nanos retry_after) noexcept {
  fresh.allowed = false;
  fresh.remaining = 0;
  if (!fresh.never()) fresh.retry_after = retry_after;
  return fresh;
}

// A store keeps, per key, a 64-bit give-back counter next to the state (0,
// or the store's floor, for a new key): the time a policy's give-backs
// returned (TokenBucket::kGiveBacksMoveLaterTakes). A store hands it to an op
// with aux_in() before it reads the key's state, and, where it serialises
// the op with every other give-back on the key (update()), adds aux_add() to
// it once the op published. A key's counter never goes back: one dropped
// (reclaimed, evicted) raises the floor new keys start from. Ops without
// these members ignore the counter.
// An op takes part when it declares `static constexpr bool kWantsAux =
// true`.
template <class Op>
inline constexpr bool wants_aux = requires {
  requires Op::kWantsAux;
};
template <class Op>
void aux_in(const Op& op, std::uint64_t aux) {
  if constexpr (wants_aux<Op>) op.aux_in(aux);
}
template <class Op, class State>
std::uint64_t aux_add(const Op& op, const State& before, const State& after) {
  if constexpr (wants_aux<Op> && requires { op.aux_add(before, after); }) {
    return op.aux_add(before, after);
  } else {
    return 0;
  }
}

// The least StoreOp, for checking stores against the concept.
template <class State>
struct ArchetypeOp {
  Step<State> operator()(const State& s) const { return {s, Decision{}}; }
  bool idle(const State&) const { return true; }
  Nanos idle_at(const State&) const { return Nanos::min(); }
  State merge(const State& a, const State&) const { return a; }
  void published(const State&) const {}
};
}  // namespace detail

// Store: applies a pure step to one key's state atomically.
//
// Requires, for a key of arbitrary bytes (NUL, ':', '{' included):
//   apply(key, op)   runs op against the key's state (a zeroed State for a
//                    key not held), publishes op's next state atomically with
//                    respect to every other call on that key, and returns op's
//                    decision. A new key may be refused or left uncounted when
//                    the store is full (WhenFull).
//   peek(key, op)    op's decision on the current state; publishes nothing and
//                    inserts nothing.
//   update(key, op)  as apply, but for keys already held only: a key not held
//                    is left absent (a give-back to a forgotten key is a
//                    no-op). Exact with respect to moves and reclaims of the
//                    store's own: it is how receipts are given back.
//   stats()          a StoreStats snapshot.
// Thread safety: all members, concurrently.
template <class S>
concept Store = requires(S& s, const S& cs, std::string_view key,
                         const detail::ArchetypeOp<typename S::State>& op) {
  typename S::State;
  typename S::Options;
  { s.apply(key, op) } -> std::same_as<Decision>;
  { cs.peek(key, op) } -> std::same_as<Decision>;
  { s.update(key, op) } -> std::same_as<Decision>;
  { cs.stats() } -> std::same_as<StoreStats>;
};

}  // namespace ratekeeper

#endif  // RATEKEEPER_STORE_STORE_HPP_
