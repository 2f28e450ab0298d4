// ratekeeper/tiers.hpp: plans (free, pro, enterprise...) as sets of limits.
//
// Defines LimitSpec (one limit of a tier, as data) and TierTable: tiers by
// name, each a chain of limits scoped by the caller's identity, chosen per
// call and changeable at run time.
//
//   ratekeeper::TierTable<> tiers;
//   tiers.set_tier("free", {
//       {{.name = "rpm"}, ratekeeper::Field::kUser,
//        ratekeeper::PolicyKind::kSlidingWindow, ratekeeper::per_minute(20)},
//       {{.name = "tpd", .unit = ratekeeper::Unit::kTokens},
//        ratekeeper::Field::kTeam, ratekeeper::PolicyKind::kFixedWindow,
//        ratekeeper::per_day(200'000)}}).IgnoreError();
//   absl::StatusOr<ChainDecision> d =
//       tiers.acquire("free", {.user = "u42", .team = "t7"}, /*tokens=*/1200);
//
// Changing a tier keeps state (set_tier on an existing tier): a limit that
// keeps its name, policy kind, scope, unit and (for windows) period keeps
// every key's state under its new numbers (PolicyLimit::reconfigure); any
// other change starts that limit afresh. docs/chains.md has the rules.
#ifndef RATEKEEPER_TIERS_HPP_
#define RATEKEEPER_TIERS_HPP_

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/inlined_vector.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "ratekeeper/chain.hpp"
#include "ratekeeper/clock.hpp"
#include "ratekeeper/detail/mutex.hpp"
#include "ratekeeper/detail/reclaim.hpp"
#include "ratekeeper/detail/strings.hpp"
#include "ratekeeper/identity.hpp"
#include "ratekeeper/policy/fixed_window.hpp"
#include "ratekeeper/policy/sliding_window.hpp"
#include "ratekeeper/policy/token_bucket.hpp"
#include "ratekeeper/store/sharded.hpp"

namespace ratekeeper {

enum class PolicyKind : std::uint8_t {
  kTokenBucket,
  kFixedWindow,
  kSlidingWindow
};

// LimitSpec: one limit of a tier. `burst` is the token bucket's capacity
// (0: rate.count); the window policies ignore it.
struct LimitSpec {
  LimitOptions options;
  Scope scope;
  PolicyKind kind = PolicyKind::kTokenBucket;
  Rate rate;
  std::uint64_t burst = 0;
  // What each key keeps when set_tier changes this limit in place (issue
  // 17, overrides.hpp): kAsStored, the default, as before.
  Carry carry = Carry::kAsStored;
};

// TierTable: tiers of limits, and the chain of a tier for one caller.
//
// Every limit has a ShardedStore of its own, built with `store` options
// (`capacity` is a cap: a store's memory grows with its live keys,
// docs/stores.md; `key_budget` shares one cap among many stores). Lookups on
// the call path take no lock: the table is an immutable snapshot swapped by
// set_tier().
//
// What set_tier() replaces is reclaimed before it returns, so that changing
// tiers again and again does not grow the process (docs/stores.md,
// "Replaced limits"). Table calls and calls on the table's limits run in
// read sections (detail/reclaim.hpp: two thread-local stores each, no
// atomic read-modify-write); set_tier() waits for the sections open when it
// published (detail::Reclaimer::synchronize) and then frees the old
// snapshot and the policy versions no longer in force. A replaced limit's
// store is cleared at once (ShardedStore::clear) and the limit object is
// kept for reuse: the next limit the table builds with the same name,
// policy kind, unit and options is that object, restarted
// (PolicyLimit::restart: fresh keys, a new serial). So a Limit pointer (in
// a decision, ChainItems, limits()) always points at a live limit of that
// name while the table lives, and memory is bounded by the limits that
// exist at once (at most twice the limits of a name), never by the number
// of set_tier calls. A receipt taken before its limit was replaced settles
// as kFailedPrecondition (the limit's serial is retired by set_tier), and
// nothing is given back or charged. Thread-safe; not
// from inside a callback of the table's own calls (there are none).
template <Clock C = SteadyClock>
class TierTable {
 public:
  explicit TierTable(ShardedOptions store = {}, C clock = C{})
      : store_options_(store), chain_(std::move(clock)) {
    detail::Reclaimer::instance().prepare();
    snapshot_ = std::make_unique<Snapshot>();
    current_.store(snapshot_.get(), std::memory_order_release);
  }

  TierTable(const TierTable&) = delete;
  TierTable& operator=(const TierTable&) = delete;

  // set_tier
  //
  // Adds tier `name` or changes it to exactly `limits` (in chain order: put
  // the limit most likely to refuse first). kInvalidArgument on a bad spec
  // (names repeated or malformed, a rate a policy refuses), leaving the
  // table as it was.
  absl::Status set_tier(std::string_view name, std::vector<LimitSpec> limits) {
    if (name.empty()) return absl::InvalidArgumentError("tier name is empty");
    detail::MutexLock lock(&mu_);
    // Limits taken from the pool for this change go back to it unless
    // published.
    std::vector<Limit*> from_pool;
    struct Unwind {
      TierTable* t;
      std::vector<Limit*>* taken;
      ~Unwind() {
        for (Limit* l : *taken) t->pool_[t->hooks_.at(l).identity].push_back(l);
      }
    } unwind{this, &from_pool};
    const Snapshot& old = *snapshot_;
    const auto prev_it = old.tiers.find(detail::av(name));
    const Tier* prev = prev_it == old.tiers.end() ? nullptr : &prev_it->second;
    Tier next;
    // Build (or find) every limit first; publish nothing until all are good.
    for (std::size_t i = 0; i < limits.size(); ++i) {
      const LimitSpec& spec = limits[i];
      if (spec.options.unit == Unit::kNanoUsd) {
        return absl::InvalidArgumentError(absl::StrCat(
            "tier \"", detail::av(name), "\": limit \"", spec.options.name,
            "\" counts money: budgets in money belong to an Accountant "
            "(budget/accountant.hpp), whose reserve() takes a tier's "
            "chain_items()"));
      }
      for (std::size_t j = 0; j < i; ++j) {
        if (limits[j].options.name == spec.options.name) {
          return absl::InvalidArgumentError(
              absl::StrCat("tier \"", detail::av(name),
                           "\": two limits named \"", spec.options.name, "\""));
        }
      }
      const Entry* same = prev ? find_entry(*prev, spec.options.name) : nullptr;
      absl::StatusOr<Entry> e =
          same ? reuse(*same, spec, from_pool) : build(spec, from_pool);
      if (!e.ok()) {
        return absl::Status(e.status().code(),
                            absl::StrCat("tier \"", detail::av(name),
                                         "\": ", e.status().message()));
      }
      next.push_back(*e);
    }
    // All built: apply the in-place changes, then publish.
    std::vector<Limit*> changed;
    for (std::size_t i = 0; i < limits.size(); ++i) {
      if (next[i].reconfigure) {
        if (absl::Status st = next[i].reconfigure(); !st.ok()) return st;
        next[i].reconfigure = nullptr;
        changed.push_back(next[i].limit);
      }
      next[i].limit->set_shadow(limits[i].options.shadow);
    }
    from_pool.clear();  // all published below
    // A limit that `next` no longer has is retired: its store forgets its
    // keys and gives its memory back now, and once no call can be using it
    // the object waits in the pool for the next limit of its identity.
    std::vector<Limit*> retired;
    if (prev != nullptr) {
      for (const Entry& e : *prev) {
        bool kept = false;
        for (const Entry& n : next) kept = kept || n.limit == e.limit;
        if (!kept) retired.push_back(e.limit);
      }
    }
    auto snap = std::make_unique<Snapshot>(old);
    snap->tiers[std::string(name)] = std::move(next);
    current_.store(snap.get(), std::memory_order_release);
    std::unique_ptr<Snapshot> replaced =
        std::exchange(snapshot_, std::move(snap));
    // Receipts of the retired limits are refused from here on (a settle
    // with one would put a debt key into a store no tier reads, holding a
    // KeyBudget's slots until the limit is reused: an examiner's 600 stale
    // settles kept 664 of 1,000 slots); settles that read the old serial
    // finish before the synchronize below returns.
    for (Limit* l : retired) hooks_.at(l).retire();
    // Every call that could have read the old snapshot, an old policy
    // version or a retired limit through the table has returned.
    detail::Reclaimer::instance().synchronize();
    // Then their keys go, those of calls that were in flight too.
    for (Limit* l : retired) hooks_.at(l).clear();
    replaced.reset();
    for (Limit* l : changed) hooks_.at(l).trim();
    for (Limit* l : retired) pool_[hooks_.at(l).identity].push_back(l);
    return absl::OkStatus();
  }

  // acquire
  //
  // The chain of tier `tier` for `who`, each limit costing 1 (requests) or
  // `tokens` (tokens). kNotFound for an unknown tier; kInvalidArgument when
  // `who` lacks a field a limit is scoped by (counted as an error on that
  // limit). A refusal is a ChainDecision, not an error.
  absl::StatusOr<ChainDecision> acquire(std::string_view tier,
                                        const Subject& who, Cost tokens) {
    return acquire(tier, who, tokens, {});
  }

  // acquire
  //
  // As above, with `first` (limits of your own: a per-IP limit shared by
  // every tier, say) acquired ahead of the tier's limits, in the same all or
  // nothing chain. Their results come first in the decision.
  absl::StatusOr<ChainDecision> acquire(std::string_view tier,
                                        const Subject& who, Cost tokens,
                                        std::span<const ChainItem> first) {
    const detail::ReadSection section;
    ChainItems items;
    for (const ChainItem& it : first) items.add(it);
    if (absl::Status st = items_for(tier, who, tokens, items); !st.ok()) {
      return st;
    }
    return chain_.acquire(items.items());
  }

  // chain_items
  //
  // The items acquire() would take, appended to `out`: to hand the tier's
  // limits to another all-or-nothing chain (Accountant::reserve's `limits`,
  // so that a call's rate limits and budgets are one decision). `out` owns
  // the keys' bytes. Errors as acquire().
  absl::Status chain_items(std::string_view tier, const Subject& who,
                           Cost tokens, ChainItems& out) const {
    const detail::ReadSection section;
    return items_for(tier, who, tokens, out);
  }

  // peek
  //
  // What acquire would decide, counting nothing.
  absl::StatusOr<ChainDecision> peek(std::string_view tier, const Subject& who,
                                     Cost tokens) const {
    const detail::ReadSection section;
    ChainItems items;
    if (absl::Status st = items_for(tier, who, tokens, items); !st.ok()) {
      return st;
    }
    return chain_.peek(items.items());
  }

  // settle_tokens
  //
  // Settles the token limits of a decision acquire() allowed to the tokens
  // the provider counted (`used`): the unused part of the estimate is given
  // back, an excess charged as a debt (Chain::settle); request limits are
  // left alone. Errors as Chain::settle.
  absl::Status settle_tokens(ChainDecision& d, Cost used) {
    return chain_.settle(d, Unit::kTokens, used);
  }

  // give_back
  //
  // Gives back everything an allowed decision holds (the call never
  // happened).
  void give_back(ChainDecision& d) { chain_.give_back(d); }

  // The limits of a tier in chain order (empty for an unknown tier).
  std::vector<Limit*> limits(std::string_view tier) const {
    const detail::ReadSection section;
    std::vector<Limit*> out;
    if (const Tier* t = find_tier(tier)) {
      for (const Entry& e : *t) out.push_back(e.limit);
    }
    return out;
  }

  // Every limit of every tier now, tiers in name order: for metrics.
  std::vector<std::pair<std::string, Limit*>> all_limits() const {
    const detail::ReadSection section;
    const Snapshot& s = *current_.load(std::memory_order_acquire);
    std::vector<std::pair<std::string, Limit*>> out;
    for (const auto& [name, tier] : s.tiers) {
      for (const Entry& e : tier) out.emplace_back(name, e.limit);
    }
    std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) {
      return a.first != b.first ? a.first < b.first
                                : a.second->name() < b.second->name();
    });
    return out;
  }

  Chain<C>& chain() noexcept { return chain_; }

  // --- issue 17: per-subject overrides and reset ---
  //
  // set_override: limit `limit` of tier `tier` counts `who`'s key (by the
  // limit's scope) at `rate` (and `burst`, for a token bucket; 0: the
  // rate's count) instead of the tier's numbers: an enterprise customer's
  // own RPM without a tier of its own. The key starts fresh under it
  // (PolicyLimit::set_override). It stays through set_tier changes that
  // keep the limit in place, and is dropped with the limit's keys when
  // set_tier rebuilds it (docs/chains.md); it lives in memory only.
  // kNotFound for an unknown tier or limit; kInvalidArgument for a subject
  // lacking the limit's field or a rate the policy refuses.
  absl::Status set_override(std::string_view tier, std::string_view limit,
                            const Subject& who, Rate rate,
                            std::uint64_t burst = 0) {
    detail::MutexLock lock(&mu_);
    std::string key;
    absl::StatusOr<const Entry*> e = entry_for(tier, limit, who, key);
    if (!e.ok()) return e.status();
    return hooks_.at((*e)->limit).set_override(key, rate, burst, chain_.now());
  }

  // clear_override: `who`'s key goes back to the tier's numbers, fresh.
  // kNotFound also when it has no override.
  absl::Status clear_override(std::string_view tier, std::string_view limit,
                              const Subject& who) {
    detail::MutexLock lock(&mu_);
    std::string key;
    absl::StatusOr<const Entry*> e = entry_for(tier, limit, who, key);
    if (!e.ok()) return e.status();
    return hooks_.at((*e)->limit).clear_override(key, chain_.now());
  }

  // reset: `who` starts fresh on every limit of `tier` (Limit::reset of its
  // key on each), or on `limit` alone when named. Errors as set_override.
  absl::Status reset(std::string_view tier, const Subject& who,
                     std::string_view limit = {}) {
    const detail::ReadSection section;
    const Tier* t = find_tier(tier);
    if (t == nullptr) return unknown(tier);
    bool any = false;
    std::string key;
    for (const Entry& e : *t) {
      if (!limit.empty() && e.limit->name() != limit) continue;
      any = true;
      key.clear();
      if (absl::Status st = append_subject_key(e.scope, who, key); !st.ok()) {
        return absl::InvalidArgumentError(
            absl::StrCat("limit \"", e.limit->name(), "\": ", st.message()));
      }
      if (absl::Status st = e.limit->reset(key, chain_.now()); !st.ok()) {
        return st;
      }
    }
    if (!any) return no_limit(tier, limit);
    return absl::OkStatus();
  }
  // --- end issue 17 ---

  // Limit objects the table holds: those of its tiers and replaced ones
  // kept for reuse (at most two per name, policy kind and options).
  std::size_t limit_objects() const {
    detail::MutexLock lock(&mu_);
    return owned_.size();
  }

 private:
  struct Entry {
    Limit* limit = nullptr;
    Scope scope;
    PolicyKind kind = PolicyKind::kTokenBucket;
    Unit unit = Unit::kRequests;
    bool charge_on_reject = false;
    Nanos period{0};
    // Set between validation and publication in set_tier only.
    std::function<absl::Status()> reconfigure;
  };
  using Tier = std::vector<Entry>;
  struct Snapshot {
    absl::flat_hash_map<std::string, Tier> tiers;
  };

  static const Entry* find_entry(const Tier& t, std::string_view name) {
    for (const Entry& e : t) {
      if (e.limit->name() == name) return &e;
    }
    return nullptr;
  }

  const Tier* find_tier(std::string_view name) const {
    const Snapshot& s = *current_.load(std::memory_order_acquire);
    const auto it = s.tiers.find(detail::av(name));
    return it == s.tiers.end() ? nullptr : &it->second;
  }

  static absl::Status unknown(std::string_view tier) {
    return absl::NotFoundError(
        absl::StrCat("no tier named \"", detail::av(tier), "\""));
  }

  // Issue 17: the entry of limit `limit` in tier `tier` and `who`'s key in
  // it. Under mu_ (the snapshot it reads stays current).
  absl::StatusOr<const Entry*> entry_for(std::string_view tier,
                                         std::string_view limit,
                                         const Subject& who, std::string& key)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const auto it = snapshot_->tiers.find(detail::av(tier));
    if (it == snapshot_->tiers.end()) return unknown(tier);
    const Entry* e = find_entry(it->second, limit);
    if (e == nullptr) return no_limit(tier, limit);
    if (absl::Status st = append_subject_key(e->scope, who, key); !st.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("limit \"", e->limit->name(), "\": ", st.message()));
    }
    return e;
  }
  static absl::Status no_limit(std::string_view tier, std::string_view limit) {
    return absl::NotFoundError(absl::StrCat("tier \"", detail::av(tier),
                                            "\" has no limit named \"",
                                            detail::av(limit), "\""));
  }

  // Appends tier `tier`'s items for `who` to `items`, which owns their keys.
  absl::Status items_for(std::string_view tier, const Subject& who, Cost tokens,
                         ChainItems& items) const {
    const Tier* found = find_tier(tier);
    if (found == nullptr) return unknown(tier);
    const Tier& t = *found;
    std::string key;
    for (const Entry& e : t) {
      key.clear();
      if (absl::Status st = append_subject_key(e.scope, who, key); !st.ok()) {
        e.limit->metrics().record_error();
        return absl::InvalidArgumentError(
            absl::StrCat("limit \"", e.limit->name(), "\": ", st.message()));
      }
      items.add(e.limit, key, e.unit == Unit::kTokens ? tokens : Cost{1});
    }
    return absl::OkStatus();
  }

  template <class P>
  static absl::StatusOr<P> make_policy(const LimitSpec& s) {
    if constexpr (std::is_same_v<P, TokenBucket>) {
      return TokenBucket::create(s.rate, s.burst == 0 ? s.rate.count : s.burst);
    } else {
      return P::create(s.rate);
    }
  }

  // What a limit object keeps for life (Limit's constant fields, and its
  // policy type): a replaced limit is reused only for a spec that agrees.
  // The near-limit threshold is set anew on reuse, not part of it (an
  // examiner found one object kept per threshold value: 1,001 objects and
  // +6.4 MiB after 1,000 set_tier calls that changed only the threshold).
  static std::string identity(const LimitSpec& spec) {
    return absl::StrCat(
        static_cast<int>(spec.kind), "/", static_cast<int>(spec.options.unit),
        "/", spec.options.charge_on_reject ? 1 : 0, "/", spec.options.name);
  }

  // A limit for `spec`, owned by the table: a replaced one of the same
  // identity from the pool (restarted when published), else a new one.
  absl::StatusOr<Entry> build(const LimitSpec& spec,
                              std::vector<Limit*>& from_pool) {
    switch (spec.kind) {
      case PolicyKind::kTokenBucket:
        return build_as<TokenBucket>(spec, from_pool);
      case PolicyKind::kFixedWindow:
        return build_as<FixedWindow>(spec, from_pool);
      case PolicyKind::kSlidingWindow:
        return build_as<SlidingWindow>(spec, from_pool);
    }
    return absl::InvalidArgumentError("unknown PolicyKind");
  }

  template <class P>
  absl::StatusOr<Entry> build_as(const LimitSpec& spec,
                                 std::vector<Limit*>& from_pool) {
    // Checked here too: a limit taken from the pool skips make_limit's.
    if (absl::Status st = detail::check_limit_options(spec.options); !st.ok()) {
      return st;
    }
    absl::StatusOr<P> p = make_policy<P>(spec);
    if (!p.ok()) return p.status();
    Entry e{nullptr,
            spec.scope,
            spec.kind,
            spec.options.unit,
            spec.options.charge_on_reject,
            spec.rate.period,
            nullptr};
    std::string id = identity(spec);
    if (auto it = pool_.find(id); it != pool_.end() && !it->second.empty()) {
      auto* raw = static_cast<PolicyLimit<P, ShardedStore>*>(it->second.back());
      it->second.pop_back();
      if (it->second.empty()) pool_.erase(it);
      from_pool.push_back(raw);
      e.limit = raw;
      e.reconfigure = [raw, policy = *std::move(p),
                       permille = spec.options.near_limit_permille]() mutable {
        raw->set_near_limit_permille(permille);
        raw->restart(std::move(policy));
        return absl::OkStatus();
      };
      return e;
    }
    auto l =
        make_limit<ShardedStore>(spec.options, *std::move(p), store_options_);
    if (!l.ok()) return l.status();
    PolicyLimit<P, ShardedStore>* raw = l->get();
    raw->defer_reclaim();
    e.limit = raw;
    hooks_[raw] = Hooks{
        std::move(id), [raw] { raw->store().clear(); },
        [raw] { raw->drop_versions_before(raw->versions_made() - 1); },
        [raw] { raw->retire(); },
        // Issue 17: overrides, built as the spec's policy at another rate.
        [raw, kind = spec.kind](std::string_view key, Rate rate,
                                std::uint64_t burst,
                                Nanos now) -> absl::Status {
          LimitSpec o;
          o.kind = kind;
          o.rate = rate;
          o.burst = burst;
          absl::StatusOr<P> policy = make_policy<P>(o);
          if (!policy.ok()) return policy.status();
          return raw->set_override(key, *std::move(policy), now);
        },
        [raw](std::string_view key, Nanos now) {
          return raw->clear_override(key, now);
        }};
    owned_.push_back(*std::move(l));
    return e;
  }

  // The existing limit changed in place when its state carries over, else
  // a new one.
  absl::StatusOr<Entry> reuse(const Entry& old, const LimitSpec& spec,
                              std::vector<Limit*>& from_pool) {
    const bool windowed = spec.kind != PolicyKind::kTokenBucket;
    if (old.kind != spec.kind || !(old.scope == spec.scope) ||
        old.unit != spec.options.unit ||
        old.charge_on_reject != spec.options.charge_on_reject ||
        (windowed && old.period != spec.rate.period) ||
        spec.options.near_limit_permille != old.limit->near_limit_permille()) {
      return build(spec, from_pool);
    }
    if (absl::Status st = detail::check_limit_options(spec.options); !st.ok()) {
      return st;
    }
    Entry e = old;
    e.period = spec.rate.period;
    switch (spec.kind) {
      case PolicyKind::kTokenBucket:
        return reuse_as<TokenBucket>(e, spec, chain_.now());
      case PolicyKind::kFixedWindow:
        return reuse_as<FixedWindow>(e, spec, chain_.now());
      case PolicyKind::kSlidingWindow:
        return reuse_as<SlidingWindow>(e, spec, chain_.now());
    }
    return absl::InvalidArgumentError("unknown PolicyKind");
  }

  template <class P>
  static absl::StatusOr<Entry> reuse_as(Entry e, const LimitSpec& spec,
                                        Nanos now) {
    absl::StatusOr<P> p = make_policy<P>(spec);
    if (!p.ok()) return p.status();
    auto* limit = static_cast<PolicyLimit<P, ShardedStore>*>(e.limit);
    e.reconfigure = [limit, policy = *std::move(p), carry = spec.carry,
                     now]() mutable {
      return limit->reconfigure(std::move(policy), carry, now);
    };
    return e;
  }

  // What the table does to a limit it owns, by its concrete type.
  struct Hooks {
    std::string identity;
    std::function<void()> clear;   // forget every key (once replaced)
    std::function<void()> trim;    // free policy versions no longer in force
    std::function<void()> retire;  // refuse the receipts issued so far
    // Issue 17: PolicyLimit::set_override / clear_override.
    std::function<absl::Status(std::string_view, Rate, std::uint64_t, Nanos)>
        set_override;
    std::function<absl::Status(std::string_view, Nanos)> clear_override;
  };

  const ShardedOptions store_options_;
  Chain<C> chain_;
  mutable detail::Mutex mu_;
  std::atomic<const Snapshot*> current_{nullptr};
  std::unique_ptr<Snapshot> snapshot_;              // the current one; mu_
  std::deque<std::unique_ptr<Limit>> owned_;        // every limit made; mu_
  absl::flat_hash_map<const Limit*, Hooks> hooks_;  // guarded by mu_
  // Replaced limits no call uses any more, by identity(): reused by the
  // next limit built with that identity.
  absl::flat_hash_map<std::string, std::vector<Limit*>> pool_;  // mu_
};

}  // namespace ratekeeper

#endif  // RATEKEEPER_TIERS_HPP_
