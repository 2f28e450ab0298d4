// ratekeeper/overrides.hpp: per-key overrides, reset, and what a
// reconfiguration carries over (issue 17).
//
// Defines Carry (Bucket4j's TokensInheritanceStrategy), and the store ops
// PolicyLimit uses for PolicyLimit::reset, set_override and
// reconfigure(next, carry). docs/chains.md, "Overrides, reset and what a
// change carries over", states the rules; the tests are
// tests/overrides_test.cpp.
//
// Receipts across a reset. A store keeps a 64-bit counter per key next to
// its state (store.hpp, detail::aux_in). A reset (and a reconfigure that
// rebuilds states: kRemaining, kProportional, kReset) adds to it, under the
// store's update, so that a receipt taken before gives nothing back into
// the fresh state (its take was wiped with the state it sat in):
//   - token bucket: the counter is the time give-backs moved later takes
//     by, and a receipt's stretch is moved by what it grew since the take
//     (TokenBucket::shift). The reset adds the time the bucket was still
//     short (its TAT - now, rounded up): every earlier stretch then ends at
//     or before the reset, and a settle gives back only what of a stretch
//     is still ahead of its time;
//   - window policies: the counter is the key's reset epoch (+1 per reset);
//     a take records it in its receipt (EpochPlacement) and a settle whose
//     epoch is no longer the key's gives nothing back.
// An excess (a settle above the take) is charged either way: it is usage
// the provider counted, and charging is the side that never over-admits.
#ifndef RATEKEEPER_OVERRIDES_HPP_
#define RATEKEEPER_OVERRIDES_HPP_

#include <algorithm>
#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>

#include "absl/container/flat_hash_map.h"
#include "ratekeeper/decision.hpp"
#include "ratekeeper/detail/math.hpp"
#include "ratekeeper/limiter.hpp"
#include "ratekeeper/policy/fixed_window.hpp"
#include "ratekeeper/policy/policy.hpp"
#include "ratekeeper/policy/sliding_window.hpp"
#include "ratekeeper/policy/token_bucket.hpp"
#include "ratekeeper/receipt.hpp"

namespace ratekeeper {

// Carry: what each key keeps when PolicyLimit::reconfigure puts new numbers
// in force. R is what the key has left under the old numbers at that time
// (Decision::remaining, whole units), C and C' the old and new capacities.
//
//   kAsStored      the default, and the only behaviour before issue 17:
//                  the stored state is read under the new numbers, no pass
//                  over the keys (O(1)). A window keeps its count in the
//                  current window (remaining = C' - count, 0 if above); a
//                  token bucket keeps its time until full (remaining =
//                  C' - that time x the new rate). Receipts from before
//                  give back what they took, converted.
//   kRemaining     each key keeps R, at most C' (Bucket4j AS_IS); a debt
//                  (R below 0) as it is.
//   kProportional  each key keeps floor(R x C' / C) (Bucket4j
//                  PROPORTIONALLY): the share it had left; a debt scaled
//                  the same way, rounded to the larger debt (never below
//                  the exact proportion).
//   kReset         each key starts fresh (full) under the new numbers,
//                  any debt forgotten.
// R is signed: a key in debt has R < 0, -R being the units counted above
// its capacity (whole units, rounded to the larger debt): a token bucket
// reserved into the future (TokenBucket::reserve), a settle above its take,
// a charged rejection (charge_on_reject), a window's count above a limit
// lowered under kAsStored. For the three policies here R is read exactly
// (debt_left); a policy of your own carries Decision::remaining (>= 0):
// no debt.
// For the last three, each key held is rebuilt as a fresh key that took
// C' - R' units at that time (a token bucket refills from there at the
// new rate: a partly refilled token's progress, under one token's time, is
// not kept; a sliding window's units all count in the current window; the
// units above C' are counted as a settle's excess is, so a token bucket
// keeps a debt of any size, a window's count saturates at its kMaxLimit),
// a key with nothing counted stays fresh (full under C'), and receipts
// from before give nothing back (their takes, and the debts they made, are
// folded into R). They cost a pass over the store's keys (update_all), one
// shard at a time.
enum class Carry : std::uint8_t {
  kAsStored,
  kRemaining,
  kProportional,
  kReset
};

namespace detail {

// The policies whose receipts sit on a timeline moved by a counter
// (TokenBucket).
template <class P>
inline constexpr bool kTimeline = requires {
  P::kGiveBacksMoveLaterTakes;
};

// A window policy's take, placed, with the key's reset epoch plus one. The
// policy's placement comes first: settle_on reads it from the receipt's
// first bytes. A receipt issued with the bare placement (a path that does
// not record the epoch, such as Accountant::change's receipts) reads
// `epoch` as 0 (a receipt's bytes past its placement are zero) and is
// settled as before, unchecked.
template <class P>
struct EpochPlacement {
  typename P::Placement inner;
  std::uint64_t epoch = 0;  // the key's counter + 1; 0: not recorded
};

// What a reset of a key in state `before` adds to its counter (above).
template <class P>
std::uint64_t reset_mark(const P& p, const typename P::State& before,
                         Nanos now) noexcept {
  if constexpr (kTimeline<P>) {
    const i128 lead = static_cast<i128>(p.idle_at(before).count()) -
                      static_cast<i128>(now.count());
    return lead <= 0 ? 0 : clamp_u64(lead);
  } else {
    return 1;
  }
}

// debt_left
//
// R, signed: what `s` has left under `p` at `now`, in whole units, below 0
// by the units counted above the capacity (rounded to the larger debt).
// Decision::remaining where it is >= 0. Read from the policies' public
// state: a token bucket's TAT (State and rate(), as TokenBucket encodes
// it), a window's counts. Clamped at -2^64 (a debt that large saturates
// the rebuilt state anyway). Pure.
template <class P>
i128 debt_left(const P& p, const typename P::State& s, Nanos now) noexcept {
  constexpr i128 kFloor = -(i128{1} << 64);
  i128 left = 0;
  if constexpr (std::is_same_v<P, TokenBucket>) {
    // Emission interval num/den ns per token, as TokenBucket::create.
    const auto period = static_cast<std::uint64_t>(p.rate().period.count());
    const std::uint64_t g = gcd(period, p.rate().count);
    const i128 num = static_cast<i128>(period / g);
    const i128 den = static_cast<i128>(p.rate().count / g);
    const i128 tat = (static_cast<i128>(s.tat_biased) + kI64Min) * den +
                     std::min(static_cast<i128>(s.tat_frac), den - 1);
    const i128 lead =
        std::max(tat - static_cast<i128>(now.count()) * den, i128{0});
    left = floor_div(static_cast<i128>(p.burst()) * num - lead, num);
  } else if constexpr (std::is_same_v<P, FixedWindow>) {
    const std::int64_t w = floor_div_i64(now.count(), p.rate().period.count());
    const i128 count = w > s.window ? 0 : static_cast<i128>(s.count);
    left = static_cast<i128>(p.limit()) - count;
  } else if constexpr (std::is_same_v<P, SlidingWindow>) {
    // SlidingWindow's estimate: limit - prev x (period - e) / period - cur.
    const i128 period = p.rate().period.count();
    const std::int64_t w = floor_div_i64(now.count(), p.rate().period.count());
    i128 prev = s.prev;
    i128 cur = s.cur;
    i128 start = static_cast<i128>(s.window) * period;
    if (w > s.window) {
      prev = static_cast<i128>(w) - s.window == 1 ? cur : 0;
      cur = 0;
      start = static_cast<i128>(w) * period;
    }
    const i128 e = std::max(static_cast<i128>(now.count()) - start, i128{0});
    left = floor_div(static_cast<i128>(p.limit()) * period -
                         prev * (period - e) - cur * period,
                     period);
  } else {
    left = static_cast<i128>(p.step(s, now, 0).decision.remaining);
  }
  return std::max(left, kFloor);
}

// The state a key keeps (Carry) going from policy `from` to `to` at `now`.
template <class P>
typename P::State carried(const P& from, const P& to,
                          const typename P::State& s, Nanos now,
                          Carry how) noexcept {
  using State = typename P::State;
  if (how == Carry::kAsStored) return s;
  if (how == Carry::kReset || from.idle(s, now)) return State{};
  const i128 left = debt_left(from, s, now);
  const i128 cap_old = static_cast<i128>(from.limit());
  const i128 cap_new = static_cast<i128>(to.limit());
  // |left| <= 2^64 and caps <= 2^64: the product fits 127 bits. floor_div
  // rounds a debt's share up (the larger debt).
  const i128 keep = how == Carry::kRemaining
                        ? std::min(left, cap_new)
                        : floor_div(std::min(left, cap_old) * cap_new, cap_old);
  const std::uint64_t used = clamp_u64(cap_new - keep);
  if (used == 0) return State{};
  if (keep >= 0) return to.step(State{}, now, used).next;
  // Above C': counted as a settle's excess is, whether or not it fits.
  const State fresh{};
  return to.settle(fresh, now, to.place(fresh, now, 0), 0, used);
}

// A reset or carry of one key's state, as a store op: the store's update
// (one key) or update_all (every key) runs it, and adds reset_mark to the
// key's counter once it published.
template <class P>
struct RebuildOp {
  using State = typename P::State;
  const P* from;
  const P* to;
  Nanos now;
  Carry how;
  bool* ran = nullptr;  // set when the store ran it on a key it holds
  static constexpr bool kWantsAux = true;
  void aux_in(std::uint64_t) const noexcept {}
  Step<State> operator()(const State& s) const {
    const State next = carried(*from, *to, s, now, how);
    return {next, to->step(next, now, 0).decision};
  }
  std::uint64_t aux_add(const State& before, const State&) const {
    return reset_mark(*from, before, now);
  }
  void published(const State&) const {
    if (ran != nullptr) *ran = true;
  }
  bool idle(const State& s) const { return to->idle(s, now); }
  Nanos idle_at(const State& s) const { return to->idle_at(s); }
  State merge(const State& a, const State& b) const { return to->merge(a, b); }
};

// A take that learns whether the store kept it and the key's epoch.
template <class P, class Op>
struct EpochTake : Op {
  static constexpr bool kWantsAux = true;
  bool* flag;
  std::uint64_t* seen;
  void aux_in(std::uint64_t a) const { *seen = a; }
  void published(const typename P::State& s) const {
    Op::published(s);
    *flag = true;
  }
};

// A give-back that lands only while the key's epoch is the take's.
template <class P>
struct EpochSettle : SettleOp<P> {
  static constexpr bool kWantsAux = true;
  std::uint64_t epoch;
  mutable std::uint64_t seen = 0;
  void aux_in(std::uint64_t a) const { seen = a; }
  std::uint64_t aux_add(const typename P::State&,
                        const typename P::State&) const {
    return 0;
  }
  Step<typename P::State> operator()(const typename P::State& s) const {
    if (epoch != 0 && seen + 1 != epoch) {
      return {s, this->policy->step(s, this->now, 0).decision};
    }
    return SettleOp<P>::operator()(s);
  }
};

// take_epoch_on
//
// detail::take_on for a window policy: the receipt records the key's reset
// epoch (read with the state) next to the placement.
template <class P, class StoreT, class Op>
Decision take_epoch_on(StoreT& store, std::string_view key, Op op,
                       const P& policy, const void* issuer,
                       std::uint64_t serial, Receipt& out) {
  typename P::State before{};
  std::uint64_t epoch = 0;
  bool kept = false;
  op.before = &before;
  const EpochTake<P, Op> marked{op, &kept, &epoch};
  const Decision d = store.apply(key, marked);
  if (d.allowed && kept) {
    const EpochPlacement<P> placed{policy.place(before, op.now, op.cost),
                                   epoch + 1};
    out = Receipt::issue(issuer, key, op.cost, op.now, placed, serial);
  } else {
    out = Receipt();
  }
  return d;
}

// settle_epoch_on
//
// detail::settle_on for a window policy's receipt (EpochPlacement): a
// give-back lands only while the key's epoch is the one the take recorded.
template <class P, class StoreT>
absl::StatusOr<Decision> settle_epoch_on(StoreT& store, const P& policy,
                                         const void* issuer,
                                         std::uint64_t serial, Receipt& r,
                                         Cost actual, Nanos now) {
  if (!r.open() || r.issuer() != issuer || r.serial() != serial ||
      actual > r.cost()) {
    // Refusals and debts as settle_on: a debt is charged whatever the epoch.
    return settle_on(store, policy, issuer, serial, r, actual, now);
  }
  const auto placed = r.placement<EpochPlacement<P>>();
  const EpochSettle<P> op{
      SettleOp<P>(&policy, now, placed.inner, r.cost(), actual), placed.epoch};
  const Decision d = store.update(r.key(), op);
  r.close();
  return d;
}

// The overrides of one PolicyLimit: key bytes to the policy in force for
// that key. Immutable once published (a change publishes a copy).
template <class P>
using OverrideMap = absl::flat_hash_map<std::string, P>;

}  // namespace detail
}  // namespace ratekeeper

#endif  // RATEKEEPER_OVERRIDES_HPP_
