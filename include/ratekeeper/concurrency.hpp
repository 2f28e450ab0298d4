// ratekeeper/concurrency.hpp: ConcurrencyLimit, the in-process concurrency
// (in-flight) limit of issue 17.
//
// Defines:
//   ConcurrencyOptions  a concurrency limit's size, TTL and key bound.
//   ConcurrencyLimit    at most `limit` slots per key held at once by
//                       permits (permits.hpp): a set of holders per key
//                       (holder id -> expiry, slots) in a sharded table.
//
//   auto streams = ratekeeper::ConcurrencyLimit::create(
//       {.name = "streams"}, {.limit = 4, .ttl = std::chrono::minutes(2)})
//       .value();
//   ratekeeper::Permits<> permits(streams.get());
//   ratekeeper::Permit p = permits.acquire(user);
//
// docs/concurrency.md; docs/design.md says why it is not a Store.
#ifndef RATEKEEPER_CONCURRENCY_HPP_
#define RATEKEEPER_CONCURRENCY_HPP_

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>

#include "absl/container/btree_map.h"
#include "absl/container/flat_hash_map.h"
#include "absl/hash/hash.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "ratekeeper/chain.hpp"
#include "ratekeeper/decision.hpp"
#include "ratekeeper/detail/math.hpp"
#include "ratekeeper/detail/mutex.hpp"
#include "ratekeeper/permits.hpp"
#include "ratekeeper/receipt.hpp"

namespace ratekeeper {

// ConcurrencyOptions: an in-process concurrency limit.
//   limit       slots per key held at once (each permit holds its cost)
//   ttl         a permit not released nor renewed within it stops counting
//   max_keys    keys with permits held at once (a key whose permits are all
//               gone is dropped); an acquire for a new key beyond it first
//               sweeps every shard of expired permits, then is refused:
//               kResourceExhausted in Permit::status(), counted in
//               StoreStats::denied_full, remaining 0, retry_after
//               full_retry (peek() answers the same)
//   full_retry  the wait such a refusal states
struct ConcurrencyOptions {
  std::uint64_t limit = 1;
  Nanos ttl = std::chrono::minutes(5);
  std::size_t max_keys = std::size_t{1} << 20;
  Nanos full_retry = std::chrono::seconds(1);
};

namespace detail {
// Where a permit sits, in its Receipt: its holder id and its expiry now
// (renew() issues the receipt again with the new one).
struct PermitPlace {
  std::int64_t expires = 0;
  std::uint64_t id = 0;
};
}  // namespace detail

// ConcurrencyLimit: at most `limit` slots per key held at once, in process.
//
// Each key holds its permits ordered by (expiry, holder id) -> slots, in
// one of 16 shards (an absl::flat_hash_map of keys under a detail::Mutex
// each): the expired ones are the first, swept when the key is touched;
// the wait of a refusal reads them in order. A key whose permits are all
// gone is dropped. Thread safety: all members, concurrently.
class ConcurrencyLimit final : public PermitLimit {
 public:
  // kInvalidArgument for bad LimitOptions (make_limit's rules), limit 0,
  // a TTL or full_retry not positive, max_keys 0, or charge_on_reject (a
  // refused permit holds nothing to charge).
  static absl::StatusOr<std::unique_ptr<ConcurrencyLimit>> create(
      const LimitOptions& options, const ConcurrencyOptions& c) {
    if (absl::Status st = detail::check_limit_options(options); !st.ok()) {
      return st;
    }
    if (options.charge_on_reject) {
      return absl::InvalidArgumentError(absl::StrCat(
          "concurrency limit \"", options.name,
          "\": charge_on_reject does not apply (a refused permit holds "
          "nothing)"));
    }
    if (c.limit == 0 || c.ttl <= Nanos{0} || c.max_keys == 0 ||
        c.full_retry <= Nanos{0}) {
      return absl::InvalidArgumentError(absl::StrCat(
          "concurrency limit \"", options.name,
          "\": limit and max_keys must be at least 1, ttl and full_retry "
          "positive"));
    }
    return std::unique_ptr<ConcurrencyLimit>(new ConcurrencyLimit(options, c));
  }

  Decision hold(std::string_view key, Cost cost, Nanos now, Receipt& receipt,
                absl::Status* why) override {
    receipt = Receipt();
    if (why != nullptr) *why = absl::OkStatus();
    Decision d;
    if (try_hold(key, cost, now, receipt, why, true, d)) return d;
    // The table is full: drop the keys whose permits have all expired,
    // every shard's, then once more.
    sweep_all(now);
    static_cast<void>(try_hold(key, cost, now, receipt, why, false, d));
    return d;
  }

  // As hold() would decide, changing nothing: a new key (cost 1 to limit)
  // on a full table is refused as hold() refuses it (remaining 0,
  // retry_after full_retry) unless some key's permits have all expired by
  // `now` (hold() would sweep it): that check reads every shard.
  Decision peek(std::string_view key, Cost cost, Nanos now) const override {
    {
      Shard& sh = shard_of(key);
      detail::MutexLock lock(&sh.mu);
      const auto it = sh.keys.find(key);
      if (it != sh.keys.end()) {
        // Expired permits not yet swept are the first ones.
        const Holders& hs = it->second.holders;
        Cost used = it->second.in_use;
        auto first = hs.begin();
        for (; first != hs.end() && Nanos{first->first.first} <= now; ++first) {
          used -= first->second;
        }
        return decide(hs, used, cost, now, first);
      }
    }
    if (cost == 0 || cost > limit_ || !full_at(now)) {
      return decide(Holders{}, 0, cost, now);
    }
    return full_refusal();
  }

  // settle: releases the permit (whatever `actual`: a permit has no amount
  // to settle to). One whose TTL ended by `now` frees nothing (its slots
  // stopped counting then). kFailedPrecondition for a receipt settled
  // already or empty, kInvalidArgument for another limit's.
  absl::StatusOr<Decision> settle(Receipt& receipt, Cost /*actual*/,
                                  Nanos now) override {
    if (absl::Status st = check(receipt); !st.ok()) return st;
    const detail::PermitPlace place = receipt.placement<detail::PermitPlace>();
    const std::string key = receipt.key();
    receipt.close();
    Shard& sh = shard_of(key);
    detail::MutexLock lock(&sh.mu);
    auto it = sh.keys.find(key);
    if (it == sh.keys.end()) {
      late_.fetch_add(1, std::memory_order_relaxed);
      return Decision{true, limit_, limit_, Nanos{0}, Nanos{0}};
    }
    KeyState& ks = it->second;
    sweep(ks, now);
    const auto h = ks.holders.find({place.expires, place.id});
    if (h == ks.holders.end()) {
      late_.fetch_add(1, std::memory_order_relaxed);
    } else {
      ks.in_use -= h->second;
      ks.holders.erase(h);
      released_.fetch_add(1, std::memory_order_relaxed);
    }
    const Decision d{true, limit_, limit_ - ks.in_use, Nanos{0},
                     reset_of(ks.holders, now)};
    drop_if_empty(sh, it);
    return d;
  }

  absl::StatusOr<Decision> renew(Receipt& receipt, Nanos now) override {
    if (absl::Status st = check(receipt); !st.ok()) return st;
    detail::PermitPlace place = receipt.placement<detail::PermitPlace>();
    Shard& sh = shard_of(receipt.key());
    detail::MutexLock lock(&sh.mu);
    auto it = sh.keys.find(receipt.key());
    if (it != sh.keys.end()) {
      KeyState& ks = it->second;
      sweep(ks, now);
      const auto h = ks.holders.find({place.expires, place.id});
      if (h != ks.holders.end()) {
        const Cost slots = h->second;
        ks.holders.erase(h);
        place.expires = expiry(now).count();
        ks.holders.emplace(Slot{place.expires, place.id}, slots);
        receipt = Receipt::issue(this, receipt.key(), receipt.cost(),
                                 receipt.at(), place, serial_);
        return Decision{true, limit_, limit_ - ks.in_use, Nanos{0},
                        reset_of(ks.holders, now)};
      }
      drop_if_empty(sh, it);
    }
    return absl::NotFoundError(absl::StrCat(
        "concurrency limit \"", name(),
        "\": the permit expired (its TTL ended before the renewal); "
        "acquire again"));
  }

  std::uint64_t limit() const noexcept override { return limit_; }

  // keys: keys with permits (expired ones not yet swept included);
  // inserts; denied_full (max_keys); reclaimed: permits their TTL ended.
  StoreStats store_stats() const override {
    StoreStats s;
    s.keys = keys_.load(std::memory_order_relaxed);
    s.inserts = inserts_.load(std::memory_order_relaxed);
    s.denied_full = denied_full_.load(std::memory_order_relaxed);
    s.reclaimed = expired_.load(std::memory_order_relaxed);
    return s;
  }

  // Permits ended by their TTL (swept), released in time, and released
  // after their TTL had ended (which freed nothing).
  std::uint64_t expired() const noexcept {
    return expired_.load(std::memory_order_relaxed);
  }
  std::uint64_t released() const noexcept {
    return released_.load(std::memory_order_relaxed);
  }
  std::uint64_t late_releases() const noexcept {
    return late_.load(std::memory_order_relaxed);
  }

 private:
  // (expiry in ns, holder id) -> slots, earliest expiry first.
  using Slot = std::pair<std::int64_t, std::uint64_t>;
  using Holders = absl::btree_map<Slot, Cost>;
  struct KeyState {
    Holders holders;
    Cost in_use = 0;  // the slots of every permit in `holders`
  };
  struct StringHash {
    using is_transparent = void;
    std::size_t operator()(std::string_view s) const noexcept {
      return absl::Hash<std::string_view>{}(s);
    }
  };
  struct StringEq {
    using is_transparent = void;
    bool operator()(std::string_view a, std::string_view b) const noexcept {
      return a == b;
    }
  };
  using Map = absl::flat_hash_map<std::string, KeyState, StringHash, StringEq>;
  struct alignas(64) Shard {
    detail::Mutex mu;
    Map keys ABSL_GUARDED_BY(mu);
  };
  static constexpr std::size_t kShards = 16;

  ConcurrencyLimit(const LimitOptions& o, const ConcurrencyOptions& c)
      : PermitLimit(o, c.ttl),
        opts_(c),
        limit_(c.limit),
        serial_(detail::next_issuer_serial()),
        shards_(std::make_unique<Shard[]>(kShards)) {}

  Shard& shard_of(std::string_view key) const {
    // The hash's high bits: the map inside uses the low ones.
    return shards_[(StringHash{}(key) >> 56) % kShards];
  }

  absl::Status check(const Receipt& r) const {
    if (!r.open()) {
      return absl::FailedPreconditionError(
          "permit already released, or empty (a refused call holds "
          "nothing)");
    }
    if (r.issuer() != this || r.serial() != serial_) {
      return absl::InvalidArgumentError(
          "permit issued by another limit: a permit is released by the "
          "limit that issued it");
    }
    return absl::OkStatus();
  }

  Nanos expiry(Nanos now) const noexcept {
    return Nanos{detail::clamp_i64(static_cast<detail::i128>(now.count()) +
                                   opts_.ttl.count())};
  }

  // The decision for `cost` with `used` slots held by the permits from
  // `first` on (the live ones), as a take answers it: remaining and reset
  // with its own permit when it admits.
  Decision decide(const Holders& hs, Cost used, Cost cost, Nanos now) const {
    return decide(hs, used, cost, now, hs.begin());
  }
  Decision decide(const Holders& hs, Cost used, Cost cost, Nanos now,
                  Holders::const_iterator first) const {
    const Nanos reset =
        first == hs.end() ? Nanos{0} : Nanos{hs.rbegin()->first.first} - now;
    if (cost > limit_) {
      return Decision{false, limit_, limit_ - used, kNever, reset};
    }
    if (used + cost <= limit_) {
      return Decision{true, limit_, limit_ - used - cost, Nanos{0},
                      cost == 0 ? reset : expiry(now) - now};
    }
    // The wait: until enough permits expire, earliest first.
    Cost left = used;
    for (auto h = first; h != hs.end(); ++h) {
      left -= h->second;
      if (left + cost <= limit_) {
        return Decision{false, limit_, limit_ - used,
                        Nanos{h->first.first} - now, reset};
      }
    }
    return Decision{false, limit_, limit_ - used, kNever, reset};  // unreached
  }

  // hold, under the key's shard lock; false (nothing done) when the key
  // is new, the table full and `may_sweep`.
  bool try_hold(std::string_view key, Cost cost, Nanos now, Receipt& receipt,
                absl::Status* why, bool may_sweep, Decision& out) {
    Shard& sh = shard_of(key);
    detail::MutexLock lock(&sh.mu);
    auto it = sh.keys.find(key);
    if (it == sh.keys.end()) {
      if (cost > limit_ || cost == 0) {
        out = decide(Holders{}, 0, cost, now);
        return true;
      }
      if (!claim_key()) {
        if (may_sweep) return false;
        denied_full_.fetch_add(1, std::memory_order_relaxed);
        if (why != nullptr) {
          *why = absl::ResourceExhaustedError(absl::StrCat(
              "concurrency limit \"", name(), "\": ", opts_.max_keys,
              " keys hold permits already (max_keys)"));
        }
        out = full_refusal();
        return true;
      }
      it = sh.keys.try_emplace(std::string(key)).first;
      inserts_.fetch_add(1, std::memory_order_relaxed);
    }
    KeyState& ks = it->second;
    sweep(ks, now);
    out = decide(ks.holders, ks.in_use, cost, now);
    if (!out.allowed || cost == 0) {
      drop_if_empty(sh, it);
      return true;
    }
    const detail::PermitPlace place{
        expiry(now).count(), next_id_.fetch_add(1, std::memory_order_relaxed)};
    ks.holders.emplace(Slot{place.expires, place.id}, cost);
    ks.in_use += cost;
    receipt = Receipt::issue(this, key, cost, now, place, serial_);
    return true;
  }

  // A new key's refusal when the table is full: nothing may be held there
  // now (remaining 0, so that a call of cost <= remaining is allowed: a
  // cost of 0), until full_retry.
  Decision full_refusal() const {
    return Decision{false, limit_, 0, opts_.full_retry, Nanos{0}};
  }

  // Whether a new key would be refused at `now`: max_keys keys hold
  // permits that have not all expired by then (the keys hold() would keep
  // after sweeping every shard). Reads one shard at a time.
  bool full_at(Nanos now) const {
    if (keys_.load(std::memory_order_relaxed) < opts_.max_keys) return false;
    std::size_t live = 0;
    for (std::size_t i = 0; i < kShards; ++i) {
      Shard& sh = shards_[i];
      detail::MutexLock lock(&sh.mu);
      for (const auto& [k, ks] : sh.keys) {
        if (!ks.holders.empty() &&
            Nanos{ks.holders.rbegin()->first.first} > now) {
          ++live;
        }
      }
    }
    return live >= opts_.max_keys;
  }

  bool claim_key() {
    std::size_t k = keys_.load(std::memory_order_relaxed);
    do {
      if (k >= opts_.max_keys) return false;
    } while (!keys_.compare_exchange_weak(k, k + 1, std::memory_order_relaxed,
                                          std::memory_order_relaxed));
    return true;
  }

  // Drops the permits whose TTL ended by `now` (expiry <= now): the first.
  void sweep(KeyState& ks, Nanos now) {
    std::uint64_t gone = 0;
    auto h = ks.holders.begin();
    for (; h != ks.holders.end() && Nanos{h->first.first} <= now; ++h) {
      ks.in_use -= h->second;
      ++gone;
    }
    if (gone == 0) return;
    ks.holders.erase(ks.holders.begin(), h);
    expired_.fetch_add(gone, std::memory_order_relaxed);
  }
  // reset_after: until every permit held now has expired.
  static Nanos reset_of(const Holders& hs, Nanos now) noexcept {
    return hs.empty() ? Nanos{0} : Nanos{hs.rbegin()->first.first} - now;
  }
  void drop_if_empty(Shard& sh, Map::iterator it)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(sh.mu) {
    if (!it->second.holders.empty()) return;
    sh.keys.erase(it);
    keys_.fetch_sub(1, std::memory_order_relaxed);
  }

  // Drops every key whose permits have all expired by `now`, one shard at
  // a time (no other lock held).
  void sweep_all(Nanos now) {
    for (std::size_t i = 0; i < kShards; ++i) {
      Shard& sh = shards_[i];
      detail::MutexLock lock(&sh.mu);
      for (auto it = sh.keys.begin(); it != sh.keys.end();) {
        sweep(it->second, now);
        if (it->second.holders.empty()) {
          sh.keys.erase(it++);
          keys_.fetch_sub(1, std::memory_order_relaxed);
        } else {
          ++it;
        }
      }
    }
  }

  const ConcurrencyOptions opts_;
  const Cost limit_;
  const std::uint64_t serial_;
  std::unique_ptr<Shard[]> shards_;
  std::atomic<std::uint64_t> next_id_{1};
  std::atomic<std::size_t> keys_{0};
  std::atomic<std::uint64_t> inserts_{0};
  std::atomic<std::uint64_t> denied_full_{0};
  std::atomic<std::uint64_t> expired_{0};
  std::atomic<std::uint64_t> released_{0};
  std::atomic<std::uint64_t> late_{0};
};

}  // namespace ratekeeper

#endif  // RATEKEEPER_CONCURRENCY_HPP_
