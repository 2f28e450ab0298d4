// ratekeeper/policy/policy.hpp: the contract every rate-limiting policy meets.
//
// Defines the Policy concept and Step<State>, the result of one pure step.
// The three policies (TokenBucket, FixedWindow, SlidingWindow) meet it; a
// policy of your own that meets it runs on every store.
#ifndef RATEKEEPER_POLICY_POLICY_HPP_
#define RATEKEEPER_POLICY_POLICY_HPP_

#include <bit>
#include <concepts>
#include <cstdint>
#include <type_traits>

#include "ratekeeper/decision.hpp"

namespace ratekeeper {

// Step: what one step of a policy produces. `next` is the key's new state,
// to be published only if `decision.allowed` or the policy changed it.
template <class State>
struct Step {
  State next;
  Decision decision;
};

namespace detail {
// A State whose bytes are all 0xFF: reserved for stores (see Policy).
template <class State>
struct AllOnes {
  unsigned char bytes[sizeof(State)];
  constexpr AllOnes() : bytes{} {
    for (auto& b : bytes) b = 0xFF;
  }
};
template <class State>
inline constexpr State kReservedState = std::bit_cast<State>(AllOnes<State>{});
}  // namespace detail

// Policy: a limit as a pure state machine over a small per-key State.
//
// Requires:
//   - State is trivially copyable, at most 16 bytes, equality-comparable, and
//     a value-initialised (all-zero) State means "never seen": a store hands
//     out zeroed slots and may reclaim any state for which idle() is true.
//   - The State with every byte 0xFF is never produced by step() or settle():
//     stores reserve it (a lock-free store marks a slot being reclaimed with
//     it). detail::kReservedState<State> is that value.
//   - step(s, now, cost) is pure: no allocation, no clock read, no floating
//     point, no side effect. A store may run it several times for one call
//     (a lost compare-and-swap re-runs it) and keep only the last result.
//   - Placement is trivially copyable and at most 64 bytes: where one
//     admitted take sits in the state (a token bucket's stretch of its
//     timeline, a window's index), recorded in the take's Receipt.
//   - place(before, now, cost) is the Placement of a take of `cost` admitted
//     at `now` from state `before` (step(before, now, cost) allowed). Pure.
//   - settle(s, now, placement, taken, actual) settles a take of `taken`
//     units placed at `placement` to its actual cost: below `taken`, it
//     gives back at most taken - actual, and never more than is still
//     outstanding of that take at `now` (what time has already returned is
//     not returned twice); above `taken`, it counts the excess whether or not
//     it fits (a debt, stated by each policy). Pure.
//   - idle(s, now): the state is now equivalent to a zeroed one.
//   - idle_at(s): the first time at which idle(s, t) holds (Nanos::min() for
//     a state idle at every time). Stores evict the state that becomes idle
//     soonest, the stalest.
//   - merge(a, b): a state at least as restrictive as both a and b at any
//     time from the later of their windows on: a store keeps the merge of
//     evicted states, so that an evicted key that returns is never admitted
//     more than its old state allowed.
//   - limit(): the capacity reported in every Decision.
// Thread safety: a Policy is immutable after construction; all members are
// safe to call concurrently.
template <class P>
concept Policy = requires(const P& p, const typename P::State& s, Nanos now,
                          Cost cost) {
  requires std::is_trivially_copyable_v<typename P::State>;
  requires sizeof(typename P::State) <= 16;
  requires std::equality_comparable<typename P::State>;
  { p.step(s, now, cost) }
  noexcept->std::same_as<Step<typename P::State>>;
  typename P::Placement;
  requires std::is_trivially_copyable_v<typename P::Placement>;
  requires sizeof(typename P::Placement) <= 64;
  { p.place(s, now, cost) }
  noexcept->std::same_as<typename P::Placement>;
  { p.settle(s, now, p.place(s, now, cost), cost, cost) }
  noexcept->std::same_as<typename P::State>;
  { p.idle(s, now) }
  noexcept->std::same_as<bool>;
  { p.limit() }
  noexcept->std::same_as<std::uint64_t>;
};

// ChargingPolicy: a Policy that can also count a call it denies.
//
// Requires: charge(s, now, cost) returns the state with `cost` counted at
// `now` whether or not it fits (an anti-abuse limit counts denied attempts),
// saturating, and with a bounded excess: a key that stops calling is
// admitted again after a bounded time, stated by each policy. Pure.
template <class P>
concept ChargingPolicy = Policy<P> &&
    requires(const P& p, const typename P::State& s, Nanos now, Cost cost) {
  { p.charge(s, now, cost) }
  noexcept->std::same_as<typename P::State>;
};

}  // namespace ratekeeper

#endif  // RATEKEEPER_POLICY_POLICY_HPP_
