// ratekeeper/chain.hpp: several limits on one call, all or nothing.
//
// Defines:
//   Unit          what a limit counts: requests or tokens (for the headers).
//   LimitOptions  a limit's name, unit, charge-on-reject, shadow mode and
//                 near-limit threshold.
//   Limit         one named limit, any policy on any store, behind one
//                 interface: what a chain and a tier table hold.
//   PolicyLimit   the Limit of a Policy on a Store; reconfigure() changes its
//                 policy at run time and keeps every key's state.
//   make_limit    builds a PolicyLimit, validating its options.
//   Chain         acquires a list of (limit, key, cost) all or nothing.
//   ChainDecision what a chain decided: the binding limit, the largest
//                 retry_after, and every limit's own decision.
//
//   auto rpm = ratekeeper::make_limit(
//       {.name = "rpm"},
//       ratekeeper::SlidingWindow::create(per_minute(60)).value()) .value();
//   auto tpm = ratekeeper::make_limit(
//       {.name = "tpm", .unit = ratekeeper::Unit::kTokens},
//       ratekeeper::TokenBucket::create(per_minute(90'000), 90'000).value())
//       .value();
//   ratekeeper::Chain<> chain;
//   auto d = chain.acquire({{rpm.get(), user, 1}, {tpm.get(), user, tokens}});
//   if (!d) reply_429(d.retry_after);
//
// All or nothing: the chain acquires its limits in order; when one refuses,
// it gives back what the earlier ones took (and takes nothing from the later
// ones, which it only peeks, to report their remaining). Between the take
// and the give-back (a few hundred nanoseconds on the in-process stores)
// that capacity is unavailable to other calls: a concurrent call can be
// refused that a moment later would pass. The chain can under-admit in that
// window; it never over-admits on any limit (docs/chains.md).
#ifndef RATEKEEPER_CHAIN_HPP_
#define RATEKEEPER_CHAIN_HPP_

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <initializer_list>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/container/inlined_vector.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "ratekeeper/clock.hpp"
#include "ratekeeper/config.hpp"
#include "ratekeeper/decision.hpp"
#include "ratekeeper/detail/math.hpp"
#include "ratekeeper/detail/mutex.hpp"
#include "ratekeeper/detail/reclaim.hpp"
#include "ratekeeper/detail/strings.hpp"
#include "ratekeeper/limiter.hpp"
#include "ratekeeper/listener.hpp"
#include "ratekeeper/metrics.hpp"
#include "ratekeeper/overrides.hpp"
#include "ratekeeper/policy/policy.hpp"
#include "ratekeeper/receipt.hpp"
#include "ratekeeper/store/sharded.hpp"
#include "ratekeeper/store/store.hpp"

namespace ratekeeper {

// Unit: what a limit's costs count. The HTTP headers report request limits
// and token limits apart (x-ratelimit-*-requests, x-ratelimit-*-tokens);
// kNanoUsd is money, for budgets (budget/accountant.hpp).
enum class Unit : std::uint8_t { kRequests, kTokens, kNanoUsd };

// The unit's name in metric labels: "requests", "tokens", "nano_usd".
constexpr std::string_view unit_name(Unit u) noexcept {
  switch (u) {
    case Unit::kRequests:
      return "requests";
    case Unit::kTokens:
      return "tokens";
    case Unit::kNanoUsd:
      return "nano_usd";
  }
  return "requests";
}

// LimitOptions: how a limit behaves in a chain.
//
//   name              [A-Za-z0-9_.:-], 1 to 64 characters: it appears in
//                     headers and metric labels as it is.
//   unit              requests or tokens.
//   charge_on_reject  count denied attempts too (anti-abuse: a client that
//                     keeps hammering stays locked out). A refused call is
//                     charged to this limit whichever limit refused it, and
//                     never given back. Needs a ChargingPolicy.
//   shadow            decide and count, never deny: a refusal is reported
//                     (LimitResult::shadow_denied, the shadow_denied metric)
//                     and the call goes ahead. For rolling out a new limit.
//                     Can be switched at run time (Limit::set_shadow).
//   near_limit_permille  an allowed call with remaining <= this many
//                     thousandths of the limit counts as a near-limit event.
struct LimitOptions {
  std::string name;
  Unit unit = Unit::kRequests;
  bool charge_on_reject = false;
  bool shadow = false;
  std::uint32_t near_limit_permille = 100;
};

namespace detail {

inline absl::Status check_limit_options(const LimitOptions& o) {
  if (o.name.empty() || o.name.size() > 64) {
    return absl::InvalidArgumentError(absl::StrCat(
        "limit name must be 1 to 64 characters, got ", o.name.size()));
  }
  for (const char c : o.name) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                    (c >= '0' && c <= '9') || c == '_' || c == '.' ||
                    c == ':' || c == '-';
    if (!ok) {
      return absl::InvalidArgumentError(absl::StrCat(
          "limit name \"", absl::CEscape(o.name),
          "\" may hold only letters, digits and _ . : - (it is written into "
          "HTTP headers and metric labels as it is)"));
    }
  }
  if (o.near_limit_permille > 1000) {
    return absl::InvalidArgumentError(
        absl::StrCat("limit \"", o.name,
                     "\": near_limit_permille must be at most 1000, got ",
                     o.near_limit_permille));
  }
  return absl::OkStatus();
}

// The length of time a policy's quota is stated over, for the headers: a
// window policy's period, or the time a token bucket takes to refill a whole
// burst (rounded up).
template <class P>
Nanos quota_window(const P& p) noexcept {
  if constexpr (requires {
                  p.burst();
                  p.rate();
                }) {
    const Rate r = p.rate();
    const i128 t = ceil_div(static_cast<i128>(p.burst()) * r.period.count(),
                            static_cast<i128>(r.count));
    return Nanos{clamp_i64(t)};
  } else if constexpr (requires { p.rate(); }) {
    return p.rate().period;
  } else {
    return Nanos{0};
  }
}

}  // namespace detail

namespace detail {
// Whether `a` has less room than `b` relative to capacity
// (a.remaining / a.limit < b.remaining / b.limit), exactly.
inline bool less_room(const Decision& a, const Decision& b) noexcept {
  return static_cast<u128>(a.remaining) * b.limit <
         static_cast<u128>(b.remaining) * a.limit;
}
}  // namespace detail

// Limit: one named limit over keys, behind a virtual interface so that one
// chain or tier mixes policies and stores. Every call takes `now` from the
// caller: a chain reads its clock once for all its limits.
//
// Thread safety: all members, concurrently.
class Limit {
 public:
  virtual ~Limit() = default;
  Limit(const Limit&) = delete;
  Limit& operator=(const Limit&) = delete;

  // As Limiter::acquire, peek and take, at time `now` (a limit kept in
  // Redis decides by Redis's clock instead). take() fills `receipt` when it
  // admits (an empty one when it refuses).
  virtual Decision acquire(std::string_view key, Cost cost, Nanos now) = 0;
  virtual Decision peek(std::string_view key, Cost cost, Nanos now) const = 0;
  virtual Decision take(std::string_view key, Cost cost, Nanos now,
                        Receipt& receipt) = 0;
  // Counts `cost` whether or not it fits (charge-on-reject); the decision is
  // the step's, a denial when it did not fit. `receipt` as take(): filled
  // only when the cost fitted (a counted refusal is never given back).
  virtual Decision charge(std::string_view key, Cost cost, Nanos now,
                          Receipt& receipt) = 0;
  // As Limiter::settle, at time `now` (the limit's own clock for one kept
  // in Redis): settles a receipt this limit issued to its actual cost, and
  // returns what a zero-cost call would now be told.
  virtual absl::StatusOr<Decision> settle(Receipt& receipt, Cost actual,
                                          Nanos now) = 0;

  // Issue 17: whether a take holds its capacity for as long as the call
  // runs (a concurrency permit, permits.hpp) rather than counting an
  // amount. Chain::settle(d, unit, n) leaves such a result held (a call's
  // tokens are settled while its stream may still run); Chain::release(d)
  // ends it when the call ends, give_back(d) when it never ran.
  virtual bool held_while_running() const noexcept { return false; }

  // Waiting (issue 17, waiting.hpp). reserve: as Limiter::reserve, at
  // `now`. This default holds only what take() admits now, and otherwise
  // promises go_at = now + retry_after (how a window policy waits);
  // PolicyLimit of a token bucket holds the wait exactly, and says so in
  // reserves_exactly().
  virtual Reserved reserve(std::string_view key, Cost cost, Nanos now,
                           Nanos max_wait) {
    static_cast<void>(max_wait);
    Reserved r;
    r.at = now;
    r.decision = take(key, cost, now, r.receipt);
    r.held = r.decision.allowed;
    r.go_at =
        r.decision.never()
            ? Nanos::max()
            : Nanos{detail::clamp_i64(static_cast<detail::i128>(now.count()) +
                                      r.decision.retry_after.count())};
    return r;
  }
  virtual bool reserves_exactly() const noexcept { return false; }

  // The capacity (as in every Decision) and the time it is stated over.
  virtual std::uint64_t limit() const noexcept = 0;
  virtual Nanos window() const noexcept = 0;
  virtual StoreStats store_stats() const = 0;

  const std::string& name() const noexcept { return name_; }
  Unit unit() const noexcept { return unit_; }
  bool charge_on_reject() const noexcept { return charge_on_reject_; }
  bool shadow() const noexcept {
    return shadow_.load(std::memory_order_relaxed);
  }
  void set_shadow(bool on) noexcept {
    shadow_.store(on, std::memory_order_relaxed);
  }
  std::uint32_t near_limit_permille() const noexcept {
    return near_permille_.load(std::memory_order_relaxed);
  }
  // Changes the near-limit threshold (0 to 1000; larger is clamped): a
  // metrics setting, so a TierTable sets it on a limit it reuses rather
  // than keeping one object per threshold.
  void set_near_limit_permille(std::uint32_t permille) noexcept {
    near_permille_.store(permille > 1000 ? 1000 : permille,
                         std::memory_order_relaxed);
  }
  LimitMetrics& metrics() noexcept { return metrics_; }
  LimitCounts counts() const noexcept { return metrics_.snapshot(); }

  // --- issue 17: reset, listeners, statistics ---
  //
  // reset: `key` starts fresh at `now` (support staff clearing a user's
  // lockout): as a key never seen, and a receipt taken before gives nothing
  // back into it (docs/chains.md). kUnimplemented for a limit that cannot
  // (this default; PolicyLimit can).
  virtual absl::Status reset(std::string_view key, Nanos /*now*/) {
    return absl::UnimplementedError(
        absl::StrCat("limit \"", name_, "\" cannot reset key \"",
                     absl::CEscape(detail::av(key)), "\""));
  }
  // set_listener: the listener this limit calls (listener.hpp), or none
  // (nullptr). The limit keeps every listener it was given until it is
  // destroyed, so a call in flight never reads a freed one. Thread-safe.
  void set_listener(std::shared_ptr<LimitListener> listener) {
    detail::MutexLock lock(&listeners_mu_);
    LimitListener* raw = listener.get();
    if (raw != nullptr) listeners_.push_back(std::move(listener));
    listener_.store(raw, std::memory_order_release);
  }
  LimitListener* listener() const noexcept {
    return listener_.load(std::memory_order_acquire);
  }
  // statistics: what this limit counted and reports, read once: what
  // prometheus_text() writes for it.
  LimitStatistics statistics() const {
    LimitStatistics s;
    s.counts = metrics_.snapshot();
    s.given_back = metrics_.total(LimitMetrics::kGivenBack);
    s.given_back_units = metrics_.total(LimitMetrics::kGivenBackUnits);
    s.listener_errors = metrics_.total(LimitMetrics::kListenerErrors);
    s.capacity = limit();
    s.shadow = shadow();
    s.keys = keys_held();
    return s;
  }
  // keys_held: the keys this limit holds now: its store's, and, on a
  // PolicyLimit with overrides, its override store's too (statistics().keys,
  // ratekeeper_store_keys). store_stats() is the limit's own store alone.
  virtual std::uint64_t keys_held() const { return store_stats().keys; }
  // --- end issue 17 ---

 protected:
  explicit Limit(const LimitOptions& o)
      : name_(o.name),
        unit_(o.unit),
        charge_on_reject_(o.charge_on_reject),
        near_permille_(o.near_limit_permille),
        shadow_(o.shadow) {}

 private:
  const std::string name_;
  const Unit unit_;
  const bool charge_on_reject_;
  std::atomic<std::uint32_t> near_permille_;
  std::atomic<bool> shadow_;
  std::atomic<LimitListener*> listener_{nullptr};  // issue 17
  LimitMetrics metrics_;
  mutable detail::Mutex listeners_mu_;                     // issue 17
  std::vector<std::shared_ptr<LimitListener>> listeners_;  // listeners_mu_
};

// PolicyLimit: the Limit of policy P over store StoreT<P::State>.
//
// reconfigure() swaps the policy at run time; every key keeps its state,
// read under the new policy (docs/chains.md, "Changing limits"): a window
// policy keeps each key's count in the current window (a lowered limit can
// leave it above the new limit: remaining 0 until the window turns), a
// token bucket keeps the time until each key's bucket is full again. A
// window policy's period cannot change (its window indices would mean other
// instants): that needs a new limit, with fresh state. reconfigure(next,
// carry, now) chooses otherwise (Carry, overrides.hpp).
//
// Issue 17 (kHooks, the default): per-key overrides (set_override), reset,
// listeners (listener.hpp) and give-back statistics. With none set, the
// call path pays two atomic loads and a branch for them;
// PolicyLimit<P, StoreT, false> is the limit built without them (for the
// benchmark that measures that: BM_Listener_Off).
template <Policy P, template <class> class StoreT = ShardedStore,
          bool kHooks = true>
class PolicyLimit final : public Limit {
 public:
  using PolicyType = P;
  using State = typename P::State;
  using StoreType = StoreT<State>;

  static_assert(Store<StoreType>, "StoreT<State> must meet ratekeeper::Store");

  // Use make_limit(), which validates the options.
  PolicyLimit(const LimitOptions& o, P policy,
              typename StoreType::Options store_options)
      : Limit(o), store_(store_options), store_options_(store_options) {
    versions_.push_back(std::move(policy));
    current_.store(&versions_.back(), std::memory_order_release);
  }

  Decision acquire(std::string_view key, Cost cost, Nanos now) override {
    const detail::ReadSection section(deferred_);
    if constexpr (kHooks) {
      if (hooked()) [[unlikely]] {
        const detail::ReadSection hooks;
        const Route r = route(key);
        const Decision d =
            r.store->apply(key, detail::AcquireOp<P>{r.policy, now, cost});
        notify(key, cost, d, now);
        return d;
      }
    }
    return store_.apply(key, detail::AcquireOp<P>{policy_ptr(), now, cost});
  }

  Decision peek(std::string_view key, Cost cost, Nanos now) const override {
    const detail::ReadSection section(deferred_);
    if constexpr (kHooks) {
      if (overrides_.load(std::memory_order_relaxed) != nullptr) [[unlikely]] {
        const detail::ReadSection hooks;
        const Route r = route(key);
        return r.store->peek(key, detail::AcquireOp<P>{r.policy, now, cost});
      }
    }
    return store_.peek(key, detail::AcquireOp<P>{policy_ptr(), now, cost});
  }

  Decision take(std::string_view key, Cost cost, Nanos now,
                Receipt& receipt) override {
    const detail::ReadSection section(deferred_);
    // The serial before the policy (acquire): restart() publishes a new
    // serial after the policy it goes with.
    const std::uint64_t serial = serial_.load(std::memory_order_acquire);
    if constexpr (kHooks) {
      if (hooked()) [[unlikely]] {
        const detail::ReadSection hooks;
        const Route r = route(key);
        const Decision d =
            take_in(*r.store, key, detail::AcquireOp<P>{r.policy, now, cost},
                    *r.policy, r.issuer, serial, receipt);
        notify(key, cost, d, now);
        return d;
      }
      const P* p = policy_ptr();
      return take_in(store_, key, detail::AcquireOp<P>{p, now, cost}, *p, this,
                     serial, receipt);
    } else {
      const P* p = policy_ptr();
      return detail::take_on(store_, key, detail::AcquireOp<P>{p, now, cost},
                             *p, this, serial, receipt);
    }
  }

  Decision charge(std::string_view key, Cost cost, Nanos now,
                  Receipt& receipt) override {
    if constexpr (ChargingPolicy<P>) {
      const detail::ReadSection section(deferred_);
      const std::uint64_t serial = serial_.load(std::memory_order_acquire);
      if constexpr (kHooks) {
        const detail::ReadSection hooks;
        const Route r = route(key);
        const Decision d =
            take_in(*r.store, key, detail::ChargeOp<P>{r.policy, now, cost},
                    *r.policy, r.issuer, serial, receipt);
        notify(key, cost, d, now);
        return d;
      } else {
        const P* p = policy_ptr();
        return detail::take_on(store_, key, detail::ChargeOp<P>{p, now, cost},
                               *p, this, serial, receipt);
      }
    } else {
      // make_limit refuses charge_on_reject for such a policy; a caller
      // reaching here directly gets the plain take.
      return take(key, cost, now, receipt);
    }
  }

  // Waiting (issue 17): a token bucket reserves exactly (reserve_on), in
  // the key's override if it has one, heard by the listener (a reservation
  // held as allowed, one refused as denied). A window policy holds only
  // what take() admits now (with its overrides, epochs and listener), and
  // otherwise promises go_at: Limit::reserve.
  Reserved reserve(std::string_view key, Cost cost, Nanos now,
                   Nanos max_wait) override {
    if constexpr (!ReservingPolicy<P>) {
      return Limit::reserve(key, cost, now, max_wait);
    } else {
      const detail::ReadSection section(deferred_);
      const std::uint64_t serial = serial_.load(std::memory_order_acquire);
      if constexpr (kHooks) {
        if (hooked()) [[unlikely]] {
          const detail::ReadSection hooks;
          const Route r = route(key);
          Reserved res = detail::reserve_on(*r.store, key, *r.policy, now, cost,
                                            max_wait, r.issuer, serial);
          Decision heard = res.decision;
          heard.allowed = res.held;
          notify(key, cost, heard, now);
          return res;
        }
      }
      const P* p = policy_ptr();
      return detail::reserve_on(store_, key, *p, now, cost, max_wait, this,
                                serial);
    }
  }
  bool reserves_exactly() const noexcept override { return ReservingPolicy<P>; }

  // Settled under the policy in force now; the receipt's placement says
  // what it took under the policy it was taken under (a token bucket's
  // receipt keeps its rate), so a reconfigure() between take and settle
  // gives back what was taken, never the same count at the new rate.
  //
  // A receipt from before a restart() (a limit TierTable replaced and then
  // reused) is refused, kFailedPrecondition, before anything is read.
  absl::StatusOr<Decision> settle(Receipt& receipt, Cost actual,
                                  Nanos now) override {
    const detail::ReadSection section(deferred_);
    const std::uint64_t serial = serial_.load(std::memory_order_acquire);
    if (deferred_ && receipt.open() &&
        (receipt.issuer() == this || receipt.issuer() == &ovr_tag_) &&
        receipt.serial() != serial) {
      return absl::FailedPreconditionError(absl::StrCat(
          "receipt issued by limit \"", name(),
          "\" before it was replaced (TierTable::set_tier): what it took was "
          "forgotten with the limit's keys"));
    }
    if constexpr (kHooks) {
      const detail::ReadSection hooks;
      const Cost taken = receipt.cost();
      const std::string& key = receipt.key();
      // A receipt of an overridden key's take is settled in the override
      // store, under the key's override (the limit's policy once cleared).
      Route r{policy_ptr(), &store_, this};
      if (receipt.issuer() == &ovr_tag_ && ovr_store_ != nullptr) {
        r = route(key);
        r.store = ovr_store_.get();
        r.issuer = &ovr_tag_;
      }
      absl::StatusOr<Decision> d = settle_in(*r.store, *r.policy, r.issuer,
                                             serial, receipt, actual, now);
      if (d.ok() && actual < taken) {
        metrics().add(LimitMetrics::kGivenBack);
        metrics().add(LimitMetrics::kGivenBackUnits, taken - actual);
        if (LimitListener* l = listener()) {
          call_listener(&LimitListener::on_given_back, l,
                        LimitEvent{this, key, taken - actual, *d, now});
        }
      }
      return d;
    } else {
      return detail::settle_on(store_, *policy_ptr(), this, serial, receipt,
                               actual, now);
    }
  }

  std::uint64_t limit() const noexcept override {
    const detail::ReadSection section(deferred_);
    return policy().limit();
  }
  Nanos window() const noexcept override {
    const detail::ReadSection section(deferred_);
    return detail::quota_window(policy());
  }
  StoreStats store_stats() const override { return store_.stats(); }

  // The policy in force now. The reference stays valid for the limit's
  // life, or, for a limit a TierTable owns, until the table changes it.
  const P& policy() const noexcept { return *policy_ptr(); }

  // reconfigure
  //
  // Puts `next` in force for every call that starts after it returns; keys
  // keep their state (see the class comment). kFailedPrecondition when a
  // window policy's period would change. Each past policy is kept until the
  // limit is destroyed (calls in flight may still read it): a few dozen bytes
  // per change; a TierTable's limits give them back (drop_versions_before).
  // Thread-safe.
  absl::Status reconfigure(P next) {
    return reconfigure(std::move(next), Carry::kAsStored, Nanos{0});
  }

  // reconfigure (issue 17)
  //
  // As above, each key held keeping what `carry` says (overrides.hpp), at
  // time `now`: Carry::kAsStored is the call above; the others rebuild
  // every key the store holds (ShardedStore/InMemoryStore::update_all, one
  // shard at a time) before `next` is published, so a call racing with the
  // pass is decided under the old numbers on the rebuilt state, or on the
  // state before it, which the pass then rebuilds. Keys with an override
  // keep theirs. kUnimplemented for those on a PolicyLimit built without
  // hooks or on a store without update_all.
  absl::Status reconfigure(P next, Carry carry, Nanos now) {
    detail::MutexLock lock(&mu_);
    if constexpr (requires { P::kWindowAligned; }) {
      if (next.rate().period != versions_.back().rate().period) {
        return absl::FailedPreconditionError(absl::StrCat(
            "limit \"", name(),
            "\": a window policy's period cannot change in place (its keys' "
            "window indices would mean other instants); make a new limit"));
      }
    }
    if (carry != Carry::kAsStored) {
      if constexpr (kHooks &&
                    requires(StoreType & st, const detail::RebuildOp<P>& op) {
                      st.update_all(op);
                    }) {
        store_.update_all(
            detail::RebuildOp<P>{&versions_.back(), &next, now, carry});
      } else {
        return absl::UnimplementedError(absl::StrCat(
            "limit \"", name(),
            "\": only Carry::kAsStored here (no hooks, or a store that "
            "cannot visit its keys)"));
      }
    }
    versions_.push_back(std::move(next));
    current_.store(&versions_.back(), std::memory_order_release);
    return absl::OkStatus();
  }

  // --- issue 17: per-key overrides and reset ---
  //
  // reset: `key` starts fresh at `now`, under the override it has, if any:
  // as a key never seen (a key the store evicted and remembers too). A
  // receipt taken before gives nothing back into the fresh state; an
  // excess it settles above its take is charged (overrides.hpp).
  // Thread-safe.
  absl::Status reset(std::string_view key, Nanos now) override {
    if constexpr (kHooks) {
      const detail::ReadSection section(deferred_);
      const detail::ReadSection hooks;
      const Route r = route(key);
      reset_in(*r.store, *r.policy, key, now);
      return absl::OkStatus();
    } else {
      return Limit::reset(key, now);
    }
  }

  // set_override
  //
  // Puts `policy` in force for `key` alone (an enterprise customer's own
  // rate) in place of the limit's, until clear_override(key); the limit's
  // reconfigure() and Carry leave it alone. The key starts fresh under it
  // at `now` (its state under the limit's policy, or an earlier override,
  // is reset), and again under the limit's policy when it is cleared.
  // Overridden keys live in a second store of the limit's kind, made on
  // the first override; a call on a key without an override pays one hash
  // lookup while any override exists, and none when none does. Overrides
  // live in memory only: nothing persists them, and a restart() (TierTable
  // rebuilding the limit) drops them. A window policy's override may have
  // another period. kUnimplemented without hooks. Thread-safe; not from
  // inside a listener or a ReadSection.
  absl::Status set_override(std::string_view key, P policy, Nanos now) {
    if constexpr (kHooks) {
      detail::MutexLock lock(&mu_);
      detail::Reclaimer::instance().prepare();
      if (ovr_store_ == nullptr) {
        ovr_store_ = std::make_unique<StoreType>(store_options_);
        ovr_seen_.store(ovr_store_.get(), std::memory_order_release);
      }
      auto next =
          overrides_owned_ == nullptr
              ? std::make_unique<detail::OverrideMap<P>>()
              : std::make_unique<detail::OverrideMap<P>>(*overrides_owned_);
      const auto it = next->find(detail::av(key));
      const bool had = it != next->end();
      // Its override-store state goes first (read under the override it had,
      // else under the new one), then calls move there, then its state under
      // the limit's policy goes: a call racing with this lands on a state
      // that is reset after it, or on the fresh one.
      reset_in(*ovr_store_, had ? it->second : policy, key, now);
      next->insert_or_assign(std::string(key), std::move(policy));
      publish(std::move(next));
      if (!had) reset_in(store_, versions_.back(), key, now);
      return absl::OkStatus();
    } else {
      return absl::UnimplementedError("PolicyLimit built without hooks");
    }
  }

  // clear_override
  //
  // `key` goes back to the limit's policy, fresh at `now`. kNotFound when
  // it has no override. Thread-safe; as set_override.
  absl::Status clear_override(std::string_view key, Nanos now) {
    detail::MutexLock lock(&mu_);
    if (overrides_owned_ == nullptr ||
        !overrides_owned_->contains(detail::av(key))) {
      return absl::NotFoundError(
          absl::StrCat("limit \"", name(), "\": no override for key \"",
                       absl::CEscape(detail::av(key)), "\""));
    }
    auto next = std::make_unique<detail::OverrideMap<P>>(*overrides_owned_);
    const auto it = next->find(detail::av(key));
    const P was = it->second;
    next->erase(it);
    reset_in(store_, versions_.back(), key, now);
    publish(next->empty() ? nullptr : std::move(next));
    reset_in(*ovr_store_, was, key, now);
    return absl::OkStatus();
  }

  // The keys of both stores: the limit's and the override store's (a key
  // overridden, or cleared and still held there until it is idle).
  std::uint64_t keys_held() const override {
    std::uint64_t n = store_.stats().keys;
    if (const StoreType* o = ovr_seen_.load(std::memory_order_acquire)) {
      n += o->stats().keys;
    }
    return n;
  }

  // The override in force for `key`, if any.
  std::optional<P> override_for(std::string_view key) const {
    detail::MutexLock lock(&mu_);
    if (overrides_owned_ == nullptr) return std::nullopt;
    const auto it = overrides_owned_->find(detail::av(key));
    if (it == overrides_owned_->end()) return std::nullopt;
    return it->second;
  }
  // Keys with an override now.
  std::size_t override_count() const {
    detail::MutexLock lock(&mu_);
    return overrides_owned_ == nullptr ? 0 : overrides_owned_->size();
  }
  // --- end issue 17 ---

  StoreType& store() noexcept { return store_; }
  // With the limit's address, what names it as the issuer of its receipts.
  std::uint64_t serial() const noexcept {
    return serial_.load(std::memory_order_acquire);
  }

  // For TierTable, which owns, replaces and reuses limits (tiers.hpp).
  //
  // defer_reclaim: every later call on the limit runs in a
  // detail::ReadSection, so that the table can give back policy versions
  // and reuse the limit once detail::Reclaimer::synchronize() returns.
  // Call before the limit is published to other threads.
  void defer_reclaim() noexcept {
    detail::Reclaimer::instance().prepare();
    deferred_ = true;
  }

  // retire
  //
  // Refuses every receipt issued so far (a new serial; settles and
  // give-backs with them are kFailedPrecondition and touch nothing): for a
  // limit TierTable has replaced, before it clears the store. Needs
  // defer_reclaim(). Thread-safe.
  void retire() {
    detail::MutexLock lock(&mu_);
    serial_.store(detail::next_issuer_serial(), std::memory_order_release);
  }

  // restart
  //
  // Starts the limit afresh under `next`, whatever its period: every key
  // forgotten (overrides too), receipts issued before refused (a new
  // serial). For a limit
  // no table call uses any more (TierTable reuses a replaced limit of the
  // same name, kind and options with it); calls that still arrive (a caller
  // who kept a ChainItem past set_tier) are safe: each is decided by the old
  // incarnation or the new one, and a take of the old one cannot be settled
  // against the new one. The serial stays retired while the store is
  // cleared, so receipts from that interval are refused too. Needs
  // defer_reclaim(); not from inside a detail::ReadSection. Thread-safe.
  void restart(P next) {
    detail::MutexLock lock(&mu_);
    serial_.store(detail::next_issuer_serial(), std::memory_order_release);
    // Settles that read the old serial have finished.
    detail::Reclaimer::instance().synchronize();
    store_.clear();
    if constexpr (kHooks) {
      if (overrides_owned_ != nullptr) publish(nullptr);
      if constexpr (requires(StoreType & st) { st.clear(); }) {
        if (ovr_store_ != nullptr) ovr_store_->clear();
      }
    }
    versions_.push_back(std::move(next));
    current_.store(&versions_.back(), std::memory_order_release);
    serial_.store(detail::next_issuer_serial(), std::memory_order_release);
  }

  // Policy versions made so far (reconfigure, restart), the one in force
  // being the last: drop_versions_before(versions_made() - 1) keeps only it.
  std::uint64_t versions_made() const {
    detail::MutexLock lock(&mu_);
    return dropped_ + versions_.size();
  }

  // Frees the versions before the `n`th. Only once no call can be reading
  // them: with defer_reclaim(), after a Reclaimer::synchronize() that
  // follows the reconfigure or restart that replaced them.
  void drop_versions_before(std::uint64_t n) {
    detail::MutexLock lock(&mu_);
    while (dropped_ < n && versions_.size() > 1) {
      versions_.pop_front();
      ++dropped_;
    }
  }

 private:
  const P* policy_ptr() const noexcept {
    return current_.load(std::memory_order_acquire);
  }

  // --- issue 17 ---
  // Where a key's calls go: its override and the override store, or the
  // limit's policy and store; and who issues its receipts.
  struct Route {
    const P* policy;
    StoreType* store;
    const void* issuer;
  };
  // Any override or listener set: the call takes the hooked path.
  bool hooked() const noexcept {
    return overrides_.load(std::memory_order_relaxed) != nullptr ||
           listener() != nullptr;
  }
  // Inside a ReadSection (the override map is reclaimed by synchronize()).
  Route route(std::string_view key) const {
    auto* self = const_cast<PolicyLimit*>(this);
    if (const detail::OverrideMap<P>* m =
            overrides_.load(std::memory_order_acquire)) {
      if (const auto it = m->find(detail::av(key)); it != m->end()) {
        return Route{&it->second, self->ovr_store_.get(), &ovr_tag_};
      }
    }
    return Route{policy_ptr(), &self->store_, this};
  }
  // A take with a receipt: a window policy's records the key's epoch.
  template <class Op>
  static Decision take_in(StoreType& st, std::string_view key, Op op,
                          const P& p, const void* issuer, std::uint64_t serial,
                          Receipt& receipt) {
    if constexpr (detail::kTimeline<P>) {
      return detail::take_on(st, key, op, p, issuer, serial, receipt);
    } else {
      return detail::take_epoch_on(st, key, op, p, issuer, serial, receipt);
    }
  }
  static absl::StatusOr<Decision> settle_in(StoreType& st, const P& p,
                                            const void* issuer,
                                            std::uint64_t serial, Receipt& r,
                                            Cost actual, Nanos now) {
    if constexpr (detail::kTimeline<P>) {
      return detail::settle_on(st, p, issuer, serial, r, actual, now);
    } else {
      return detail::settle_epoch_on(st, p, issuer, serial, r, actual, now);
    }
  }
  // Resets `key` in `st` (its state written under `p`): the update for a
  // key held (bumping its counter), else an apply, for a key the store
  // evicted and remembers (a key not held at all stays absent).
  static void reset_in(StoreType& st, const P& p, std::string_view key,
                       Nanos now) {
    bool ran = false;
    const detail::RebuildOp<P> op{&p, &p, now, Carry::kReset, &ran};
    static_cast<void>(st.update(key, op));
    if (!ran) static_cast<void>(st.apply(key, op));
  }
  // Publishes `next` as the override map and frees the one it replaces
  // once no call can be reading it. Under mu_, outside any ReadSection.
  void publish(std::unique_ptr<detail::OverrideMap<P>> next)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    overrides_.store(next.get(), std::memory_order_release);
    std::unique_ptr<const detail::OverrideMap<P>> old =
        std::exchange(overrides_owned_, std::move(next));
    if (old != nullptr) detail::Reclaimer::instance().synchronize();
  }
  // Tells the listener, if any, what this limit decided.
  void notify(std::string_view key, Cost cost, const Decision& d, Nanos now) {
    LimitListener* l = listener();
    if (l == nullptr) return;
    const LimitEvent e{this, key, cost, d, now};
    if (!d.allowed) {
      call_listener(&LimitListener::on_denied, l, e);
      return;
    }
    call_listener(&LimitListener::on_allowed, l, e);
    const detail::u128 lhs = static_cast<detail::u128>(d.remaining) * 1000;
    const detail::u128 rhs =
        static_cast<detail::u128>(d.limit) * near_limit_permille();
    if (lhs <= rhs) call_listener(&LimitListener::on_near_limit, l, e);
  }
  // A listener's exception is counted, never passed on (listener.hpp).
  void call_listener(void (LimitListener::*fn)(const LimitEvent&),
                     LimitListener* l, const LimitEvent& e) noexcept {
    try {
      (l->*fn)(e);
    } catch (...) {
      metrics().add(LimitMetrics::kListenerErrors);
    }
  }
  // --- end issue 17 ---

  StoreType store_;
  std::atomic<std::uint64_t> serial_{detail::next_issuer_serial()};
  std::atomic<const P*> current_{nullptr};
  bool deferred_ = false;
  mutable detail::Mutex mu_;
  std::deque<P> versions_;     // stable addresses; guarded by mu_ after ctor
  std::uint64_t dropped_ = 0;  // versions popped; guarded by mu_
  // Issue 17: overrides. The map calls read (null: none), the one this
  // limit owns (mu_), the store of overridden keys (made once, under mu_,
  // before the first map that routes calls to it is published), and the
  // byte whose address issues that store's receipts.
  std::atomic<const detail::OverrideMap<P>*> overrides_{nullptr};
  std::unique_ptr<const detail::OverrideMap<P>> overrides_owned_;  // mu_
  std::unique_ptr<StoreType> ovr_store_;
  // ovr_store_ for keys_held(), which takes no lock (statistics() may run
  // in a listener, while set_override holds mu_): set once, never reset.
  std::atomic<const StoreType*> ovr_seen_{nullptr};
  const typename StoreType::Options store_options_;
  char ovr_tag_ = 0;
};

// make_limit
//
// A PolicyLimit of `policy` on StoreT (ShardedStore by default), or
// kInvalidArgument for a bad name or threshold, or charge_on_reject with a
// policy that cannot charge.
template <template <class> class StoreT = ShardedStore, Policy P>
absl::StatusOr<std::unique_ptr<PolicyLimit<P, StoreT>>> make_limit(
    const LimitOptions& options, P policy,
    typename StoreT<typename P::State>::Options store_options = {}) {
  if (absl::Status st = detail::check_limit_options(options); !st.ok()) {
    return st;
  }
  if (options.charge_on_reject && !ChargingPolicy<P>) {
    return absl::InvalidArgumentError(
        absl::StrCat("limit \"", options.name,
                     "\": charge_on_reject needs a policy with charge()"));
  }
  return std::make_unique<PolicyLimit<P, StoreT>>(options, std::move(policy),
                                                  store_options);
}

// ChainItem: one limit of a chain, the key it is counted under, and the cost
// of this call in the limit's unit. The key's bytes must outlive the call.
struct ChainItem {
  Limit* limit = nullptr;
  std::string_view key;
  Cost cost = 1;
};

// ChainItems: chain items that own their keys' bytes, for items built from
// keys made on the fly (TierTable::chain_items). items() views them; the
// view is valid until the ChainItems is changed, moved or destroyed. Keys of
// up to 256 bytes in all are kept inline. Not thread-safe.
class ChainItems {
 public:
  ChainItems() = default;
  ChainItems(const ChainItems& o) : buf_(o.buf_), parts_(o.parts_) {
    rebuild();
  }
  ChainItems(ChainItems&& o) noexcept
      : buf_(std::move(o.buf_)), parts_(std::move(o.parts_)) {
    rebuild();
    o.clear();
  }
  ChainItems& operator=(const ChainItems& o) {
    if (this != &o) {
      buf_ = o.buf_;
      parts_ = o.parts_;
      rebuild();
    }
    return *this;
  }
  ChainItems& operator=(ChainItems&& o) noexcept {
    if (this != &o) {
      buf_ = std::move(o.buf_);
      parts_ = std::move(o.parts_);
      rebuild();
      o.clear();
    }
    return *this;
  }

  // Appends an item; its key's bytes are copied (a key viewing this
  // object's own bytes included).
  void add(Limit* limit, std::string_view key, Cost cost) {
    const std::string copy(key);
    parts_.push_back(Part{limit, buf_.size(), copy.size(), cost});
    buf_.insert(buf_.end(), copy.begin(), copy.end());
    rebuild();
  }
  void add(const ChainItem& item) { add(item.limit, item.key, item.cost); }
  void clear() {
    buf_.clear();
    parts_.clear();
    view_.clear();
  }

  std::size_t size() const noexcept { return parts_.size(); }
  bool empty() const noexcept { return parts_.empty(); }
  ChainItem operator[](std::size_t i) const { return view_[i]; }

  // The items, with keys viewing this object's bytes: valid until the
  // object is changed, moved from or destroyed.
  std::span<const ChainItem> items() const noexcept {
    return std::span<const ChainItem>(view_.data(), view_.size());
  }
  operator std::span<const ChainItem>() const noexcept {  // NOLINT
    return items();
  }

 private:
  struct Part {
    Limit* limit;
    std::size_t offset;
    std::size_t size;
    Cost cost;
  };
  // The views, made again whenever the bytes may have moved.
  // resize rather than clear: g++ -O1 sees clear()'s deallocation test on
  // a just-constructed vector as a read of uninitialised storage.
  void rebuild() {
    view_.resize(parts_.size());
    for (std::size_t i = 0; i < parts_.size(); ++i) {
      const Part& p = parts_[i];
      view_[i] = ChainItem{
          p.limit, std::string_view(buf_.data() + p.offset, p.size), p.cost};
    }
  }
  absl::InlinedVector<char, 256> buf_;
  absl::InlinedVector<Part, 4> parts_;
  absl::InlinedVector<ChainItem, 4> view_;
};

// LimitResult: what one limit of a chain decided.
//
//   decision       the limit's own decision. For a limit that admitted but
//                  was vetoed by another, `allowed` stays true and
//                  `remaining` is what its key has left once the chain's
//                  takes are all given back.
//   counted        the cost is held by this limit now (the chain went ahead,
//                  or the limit charges on reject).
//   shadow_denied  a shadow limit that would have refused.
//   receipt        what this limit took, open while the chain holds it: the
//                  chain's settle() and give_back() consume it. Empty for a
//                  refused chain (everything was given back, apart from
//                  charges on reject, which are never given back).
//
// A copy is a report: it has everything but the receipt (the original keeps
// it; a copy's settle is kFailedPrecondition), so one take is never given
// back twice through copies. Moves carry the receipt.
struct LimitResult {
  Limit* limit = nullptr;
  Cost cost = 0;
  Decision decision;
  bool counted = false;
  bool shadow_denied = false;
  Receipt receipt;

  LimitResult() = default;
  LimitResult(LimitResult&&) noexcept = default;
  LimitResult& operator=(LimitResult&&) noexcept = default;
  LimitResult(const LimitResult& o)
      : limit(o.limit),
        cost(o.cost),
        decision(o.decision),
        counted(o.counted),
        shadow_denied(o.shadow_denied) {}
  LimitResult& operator=(const LimitResult& o) {
    if (this != &o) {
      limit = o.limit;
      cost = o.cost;
      decision = o.decision;
      counted = o.counted;
      shadow_denied = o.shadow_denied;
      receipt = Receipt();
    }
    return *this;
  }
};

// ChainDecision: the answer of a chain.
//
//   allowed      every enforced limit admitted, and all hold their cost.
//   retry_after  0 when allowed; else the largest retry_after of the limits
//                that refused (kNever when one can never admit the cost).
//   at           the time the chain decided (by the chain's clock).
//   binding      index in results of the limit that decided: when refused,
//                the refusing limit with the longest wait; when allowed, the
//                limit with the least remaining relative to its capacity
//                (what the headers report). npos for an empty chain.
//   results      one per item, in the order given.
struct [[nodiscard]] ChainDecision {
  static constexpr std::size_t npos = static_cast<std::size_t>(-1);

  bool allowed = true;
  Nanos retry_after{0};
  Nanos at{0};
  std::size_t binding = npos;
  absl::InlinedVector<LimitResult, 4> results;

  constexpr explicit operator bool() const noexcept { return allowed; }

  // The binding limit's result, or nullptr for an empty chain.
  const LimitResult* binding_result() const noexcept {
    return binding == npos ? nullptr : &results[binding];
  }
  // True when no wait can admit this call (a cost above some capacity).
  bool never() const noexcept { return retry_after == kNever; }
};

namespace detail {

// The binding limit and the wait of a chain's results; with `metrics`, each
// limit's outcome counted too (a peek counts nothing). Shared by Chain and
// RedisChain.
inline void finish_chain(ChainDecision& out, bool metrics) {
  out.retry_after = Nanos{0};
  out.binding = ChainDecision::npos;
  for (std::size_t i = 0; i < out.results.size(); ++i) {
    const LimitResult& r = out.results[i];
    if (out.allowed) {
      // The least remaining relative to capacity: remaining / limit.
      if (out.binding == ChainDecision::npos ||
          less_room(r.decision, out.results[out.binding].decision)) {
        out.binding = i;
      }
    } else if (!r.decision.allowed && !r.shadow_denied &&
               (out.binding == ChainDecision::npos ||
                r.decision.retry_after > out.retry_after)) {
      out.binding = i;
      out.retry_after = r.decision.retry_after;
    }
  }
  if (!metrics) return;
  for (const LimitResult& r : out.results) {
    LimitMetrics& m = r.limit->metrics();
    if (r.shadow_denied) {
      m.add(LimitMetrics::kShadowDenied);
    } else if (!r.decision.allowed) {
      m.add(LimitMetrics::kDenied);
    } else if (!out.allowed) {
      m.add(LimitMetrics::kVetoed);
    } else {
      m.add(LimitMetrics::kAllowed);
      const u128 lhs = static_cast<u128>(r.decision.remaining) * 1000;
      const u128 rhs =
          static_cast<u128>(r.decision.limit) * r.limit->near_limit_permille();
      if (lhs <= rhs) m.add(LimitMetrics::kNearLimit);
    }
  }
}

}  // namespace detail

// Chain: acquires several limits for one call, all or nothing, reading the
// clock `C` once. Stateless apart from its clock: one Chain serves any
// number of threads and limits. Thread-safe.
template <Clock C = SteadyClock>
class Chain {
 public:
  explicit Chain(C clock = C{}) : clock_(std::move(clock)) {}

  // acquire
  //
  // Decides the call against every item in order. Allowed: each enforced
  // limit admitted and holds its cost. Refused: nothing stays consumed,
  // except on limits that charge on reject. A shadow limit's refusal is
  // reported, never enforced.
  ChainDecision acquire(std::span<const ChainItem> items) {
    return acquire_at(items, clock_.now());
  }
  ChainDecision acquire(std::initializer_list<ChainItem> items) {
    return acquire(std::span<const ChainItem>(items.begin(), items.size()));
  }

  // acquire_at
  //
  // As acquire, at a time the caller read (a ManualClock in tests, or one
  // clock read shared with other work).
  ChainDecision acquire_at(std::span<const ChainItem> items, Nanos now) {
    ChainDecision out;
    out.at = now;
    out.results.resize(items.size());
    bool refused = false;
    for (std::size_t i = 0; i < items.size(); ++i) {
      const ChainItem& it = items[i];
      RATEKEEPER_ASSERT(it.limit != nullptr, "ChainItem without a limit");
      LimitResult& r = out.results[i];
      r.limit = it.limit;
      r.cost = it.cost;
      if (it.limit->charge_on_reject()) {
        // Taken if it fits, charged if not: counted either way.
        r.decision = it.limit->charge(it.key, it.cost, now, r.receipt);
        r.counted = true;
      } else if (!refused) {
        r.decision = it.limit->take(it.key, it.cost, now, r.receipt);
        r.counted = r.decision.allowed;
      } else {
        // Refused already: what this limit would say, without taking. An
        // admission reports remaining and reset as they stand (the call
        // took nothing), as a vetoed limit's do after its give-back.
        r.decision = it.limit->peek(it.key, it.cost, now);
        if (r.decision.allowed && it.cost != 0) {
          const Decision now_left = it.limit->peek(it.key, 0, now);
          r.decision.remaining = now_left.remaining;
          r.decision.reset_after = now_left.reset_after;
        }
      }
      if (!r.decision.allowed) {
        if (it.limit->shadow()) {
          r.shadow_denied = true;
        } else {
          refused = true;
        }
      }
    }
    out.allowed = !refused;
    if (refused) roll_back(out, items, now);
    detail::finish_chain(out, true);
    return out;
  }

  // peek
  //
  // What acquire would decide now, counting nothing.
  ChainDecision peek(std::span<const ChainItem> items) const {
    const Nanos now = clock_.now();
    ChainDecision out;
    out.at = now;
    out.results.resize(items.size());
    for (std::size_t i = 0; i < items.size(); ++i) {
      LimitResult& r = out.results[i];
      r.limit = items[i].limit;
      r.cost = items[i].cost;
      r.decision = items[i].limit->peek(items[i].key, items[i].cost, now);
      if (!r.decision.allowed) {
        if (r.limit->shadow()) {
          r.shadow_denied = true;
        } else {
          out.allowed = false;
        }
      }
    }
    detail::finish_chain(out, false);
    return out;
  }

  // settle
  //
  // Settles result `index` of an allowed chain to its actual cost (the
  // tokens the provider counted, against the estimate taken): the unused
  // part is given back, an excess is charged as a debt (see
  // Limiter::settle). kOutOfRange for a bad index; kFailedPrecondition for
  // a result already settled, or one that holds nothing (a refused chain).
  absl::Status settle(ChainDecision& d, std::size_t index, Cost actual) {
    if (index >= d.results.size()) {
      return absl::OutOfRangeError(
          absl::StrCat("chain result ", index, " of ", d.results.size()));
    }
    return settle_result(d.results[index], actual, clock_.now());
  }

  // settle
  //
  // Settles every open result of `unit` (every token limit, say) to
  // `actual`: what a call does once the provider reports its usage.
  // kFailedPrecondition when none was open.
  // A permit (Limit::held_while_running) is left held: Chain::release.
  absl::Status settle(ChainDecision& d, Unit unit, Cost actual) {
    bool any = false;
    for (std::size_t i = 0; i < d.results.size(); ++i) {
      if (d.results[i].limit->unit() != unit || !d.results[i].receipt ||
          d.results[i].limit->held_while_running()) {
        continue;
      }
      any = true;
      if (absl::Status st = settle(d, i, actual); !st.ok()) return st;
    }
    if (!any) {
      return absl::FailedPreconditionError(absl::StrCat(
          "no open ", detail::av(unit_name(unit)), " receipt in the chain"));
    }
    return absl::OkStatus();
  }

  // give_back
  //
  // Gives back everything an allowed chain still holds (the call did not
  // happen): each open result settled to 0, each reporting what is left
  // after its own give-back. Charges on reject of a refused chain are never
  // given back; a result settled already is left alone. In the order taken,
  // as RedisChain does: a limit that appears twice gives its earlier take
  // back first, which moves the later one, and the key's give-back counter
  // moves that one's receipt with it (exact for a token bucket whatever
  // else took after, docs/policies.md).
  void give_back(ChainDecision& d) {
    const Nanos now = clock_.now();
    for (LimitResult& r : d.results) {
      if (r.receipt) static_cast<void>(settle_result(r, 0, now));
    }
  }

  // release (issue 17)
  //
  // The call has ended: releases every permit the chain still holds (the
  // results of limits that hold while the call runs, permits.hpp), and
  // leaves every other result as it is (settle the tokens first or after,
  // in any order). Returns how many it released. settle(d, i, n) on a
  // permit's result releases that one; give_back(d) releases them too.
  std::size_t release(ChainDecision& d) {
    const Nanos now = clock_.now();
    std::size_t n = 0;
    for (LimitResult& r : d.results) {
      if (r.receipt && r.limit->held_while_running() &&
          settle_result(r, 0, now).ok()) {
        ++n;
      }
    }
    return n;
  }

  Nanos now() const noexcept { return clock_.now(); }

  // reset (issue 17)
  //
  // Limit::reset of every item's key on its limit, at the chain's time:
  // support staff clearing a caller's lockout on a chain's limits. Stops at
  // the first limit that cannot (kUnimplemented), the earlier ones reset.
  absl::Status reset(std::span<const ChainItem> items) {
    const Nanos now = clock_.now();
    for (const ChainItem& it : items) {
      if (absl::Status st = it.limit->reset(it.key, now); !st.ok()) return st;
    }
    return absl::OkStatus();
  }

 private:
  // Settles one result's receipt; the result then reports what is left.
  static absl::Status settle_result(LimitResult& r, Cost actual, Nanos now) {
    absl::StatusOr<Decision> left = r.limit->settle(r.receipt, actual, now);
    if (!left.ok()) return left.status();
    r.counted = actual != 0;
    r.decision.remaining = left->remaining;
    r.decision.reset_after = left->reset_after;
    return absl::OkStatus();
  }

  // Gives back what limits that do not charge on reject took, each with
  // its receipt (judged in that limit's own time), in the order taken; a
  // charge on reject keeps its count and its receipt is dropped (a refused
  // call's charge is never given back). Each result given back reports what
  // its limit and key have left once all is given back (a limit twice in
  // the chain: both report the end), as a refused RedisChain does.
  static void roll_back(ChainDecision& out, std::span<const ChainItem> items,
                        Nanos now) {
    absl::InlinedVector<bool, 8> rolled(out.results.size(), false);
    for (std::size_t i = 0; i < out.results.size(); ++i) {
      LimitResult& r = out.results[i];
      if (!r.counted) continue;
      if (r.limit->charge_on_reject()) {
        r.receipt = Receipt();
        continue;
      }
      static_cast<void>(settle_result(r, 0, now));
      r.counted = false;
      rolled[i] = true;
    }
    for (std::size_t i = 0; i < out.results.size(); ++i) {
      if (!rolled[i]) continue;
      for (std::size_t j = out.results.size(); --j > i;) {
        if (rolled[j] && items[j].limit == items[i].limit &&
            items[j].key == items[i].key) {
          out.results[i].decision.remaining = out.results[j].decision.remaining;
          out.results[i].decision.reset_after =
              out.results[j].decision.reset_after;
          break;
        }
      }
    }
  }

  C clock_;
};

}  // namespace ratekeeper

#endif  // RATEKEEPER_CHAIN_HPP_
