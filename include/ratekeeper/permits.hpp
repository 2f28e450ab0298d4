// ratekeeper/permits.hpp: concurrency (in-flight) limits, issue 17.
//
// Defines:
//   PermitLimit       a Limit whose take holds a permit while a call runs
//                     (Limit::held_while_running), with a TTL: the base of
//                     the in-process ConcurrencyLimit and of RedisPermits
//                     (redis/permits.hpp).
//   ConcurrencyOptions  a concurrency limit's size, TTL and key bound.
//   ConcurrencyLimit  at most `limit` permits per key held at once, in
//                     process: a set of holders per key (holder id ->
//                     expiry) in a sharded table.
//   Permit            one call's permit, RAII: released when destroyed;
//                     release() and renew() explicit.
//   Permits<Clock>    acquires Permits on a PermitLimit, reading its clock.
//
//   auto streams = ratekeeper::ConcurrencyLimit::create(
//       {.name = "streams"}, {.limit = 4, .ttl = std::chrono::minutes(2)})
//       .value();
//   ratekeeper::Permits<> permits(streams.get());
//   ratekeeper::Permit p = permits.acquire(user);
//   if (!p) return reply_429(p.decision().retry_after);
//   // ... stream; every minute or so: p.renew() ...
//   // ~Permit releases it.
//
// Identity, not a counter: every permit has a holder id of its own. A
// permit not released within its TTL (a leaked or detached one, a thread
// that died) stops counting when its TTL ends; its late release then
// removes nothing (its id is gone), so it never frees a slot another
// holder took since. docs/concurrency.md.
#ifndef RATEKEEPER_PERMITS_HPP_
#define RATEKEEPER_PERMITS_HPP_

#include <algorithm>
#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/hash/hash.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "ratekeeper/chain.hpp"
#include "ratekeeper/clock.hpp"
#include "ratekeeper/decision.hpp"
#include "ratekeeper/detail/mutex.hpp"
#include "ratekeeper/receipt.hpp"

namespace ratekeeper {

// PermitLimit: a Limit counted in calls running at once per key. A take
// (Chain::acquire's, or Permits::acquire's) holds `cost` slots of the key
// until the receipt is settled (any settle releases: there is no amount to
// settle to), or its TTL ends. renew() starts the TTL again.
//
//   acquire()  without a receipt: the permit cannot be released, so it
//              holds its slots for one whole TTL (a call counted for the
//              TTL). For callers that want starts per TTL; use take() or
//              Permits for calls.
//   charge()   as take() (a refused permit holds nothing).
//   window()   the TTL.
class PermitLimit : public Limit {
 public:
  bool held_while_running() const noexcept final { return true; }
  Nanos ttl() const noexcept { return ttl_; }
  Nanos window() const noexcept override { return ttl_; }

  // hold
  //
  // take(), and why a refusal was not the limit's own (`why`, when given):
  // kResourceExhausted when the table of keys is full (max_keys), the
  // status Redis answered when a fail mode decided. OK otherwise.
  virtual Decision hold(std::string_view key, Cost cost, Nanos now,
                        Receipt& receipt, absl::Status* why) = 0;

  // renew
  //
  // The permit of `receipt` expires one TTL after `now` (Redis's time for
  // RedisPermits): for a holder that streams. kNotFound when it had
  // expired already (its slots may be someone else's now: acquire again);
  // kFailedPrecondition for a released receipt; kInvalidArgument for
  // another limit's. The decision is what a zero-cost call is told.
  virtual absl::StatusOr<Decision> renew(Receipt& receipt, Nanos now) = 0;

  Decision take(std::string_view key, Cost cost, Nanos now,
                Receipt& receipt) override {
    return hold(key, cost, now, receipt, nullptr);
  }
  Decision charge(std::string_view key, Cost cost, Nanos now,
                  Receipt& receipt) override {
    return hold(key, cost, now, receipt, nullptr);
  }
  Decision acquire(std::string_view key, Cost cost, Nanos now) override {
    Receipt dropped;  // held until its TTL ends (see the class comment)
    return hold(key, cost, now, dropped, nullptr);
  }

 protected:
  PermitLimit(const LimitOptions& o, Nanos ttl) : Limit(o), ttl_(ttl) {}

 private:
  const Nanos ttl_;
};

// Permit: one call's permit. Move-only; released when destroyed (or
// assigned over), or by release(); renew() for a holder that streams.
// Must not outlive its PermitLimit or the Permits that issued it.
class [[nodiscard]] Permit {
 public:
  Permit() = default;
  Permit(Permit&& o) noexcept
      : limit_(std::exchange(o.limit_, nullptr)),
        read_(o.read_),
        clock_(o.clock_),
        receipt_(std::move(o.receipt_)),
        decision_(o.decision_),
        status_(std::move(o.status_)) {}
  Permit& operator=(Permit&& o) noexcept {
    if (this != &o) {
      static_cast<void>(release());
      limit_ = std::exchange(o.limit_, nullptr);
      read_ = o.read_;
      clock_ = o.clock_;
      receipt_ = std::move(o.receipt_);
      decision_ = o.decision_;
      status_ = std::move(o.status_);
    }
    return *this;
  }
  Permit(const Permit&) = delete;
  Permit& operator=(const Permit&) = delete;
  ~Permit() { static_cast<void>(release()); }

  // Whether it was admitted and is held (not released or detached; its TTL
  // may have ended: renew() tells).
  bool held() const noexcept { return receipt_.open(); }
  explicit operator bool() const noexcept { return decision_.allowed; }
  // What the limit decided at the acquire: when refused, retry_after is
  // when enough held permits expire (sooner if they are released), kNever
  // for a cost above the limit.
  const Decision& decision() const noexcept { return decision_; }
  // Why a refusal was not the limit's (PermitLimit::hold): OK, or
  // kResourceExhausted (the key table is full), or Redis's error when a
  // fail mode answered.
  const absl::Status& status() const noexcept { return status_; }

  // release
  //
  // Gives the permit back now. kFailedPrecondition when not held (refused,
  // released, detached). A permit whose TTL had ended frees nothing.
  absl::Status release() {
    if (limit_ == nullptr || !receipt_.open()) {
      return absl::FailedPreconditionError("permit not held");
    }
    return limit_->settle(receipt_, 0, read_(clock_)).status();
  }

  // renew: PermitLimit::renew, at the clock's time now.
  absl::Status renew() {
    if (limit_ == nullptr || !receipt_.open()) {
      return absl::FailedPreconditionError("permit not held");
    }
    return limit_->renew(receipt_, read_(clock_)).status();
  }

  // detach
  //
  // Hands over the receipt (PermitLimit::settle releases it, renew renews
  // it); the Permit then releases nothing. A receipt dropped unsettled
  // holds its slots until its TTL ends.
  Receipt detach() noexcept { return std::move(receipt_); }

 private:
  template <Clock C>
  friend class Permits;
  Permit(PermitLimit* limit, Nanos (*read)(const void*), const void* clock,
         Receipt receipt, Decision d, absl::Status why)
      : limit_(limit),
        read_(read),
        clock_(clock),
        receipt_(std::move(receipt)),
        decision_(d),
        status_(std::move(why)) {}

  PermitLimit* limit_ = nullptr;
  Nanos (*read_)(const void*) = nullptr;
  const void* clock_ = nullptr;
  Receipt receipt_;
  Decision decision_;
  absl::Status status_;
};

// Permits: acquires Permits on one PermitLimit, reading clock C. Holds a
// pointer to the limit; thread-safe. Must outlive its Permits.
template <Clock C = SteadyClock>
class Permits {
 public:
  explicit Permits(PermitLimit* limit, C clock = C{})
      : limit_(limit), clock_(std::move(clock)) {}
  Permits(const Permits&) = delete;
  Permits& operator=(const Permits&) = delete;

  // `cost` slots of `key` for one call, if they are free now.
  Permit acquire(std::string_view key, Cost cost = 1) {
    Receipt r;
    absl::Status why;
    const Decision d = limit_->hold(key, cost, clock_.now(), r, &why);
    return Permit(limit_, &read, &clock_, std::move(r), d, std::move(why));
  }

  Nanos now() const noexcept { return clock_.now(); }
  PermitLimit* limit() const noexcept { return limit_; }

 private:
  static Nanos read(const void* c) noexcept {
    return static_cast<const C*>(c)->now();
  }
  PermitLimit* const limit_;
  const C clock_;
};

// ConcurrencyOptions: an in-process concurrency limit.
//   limit       slots per key held at once (each permit holds its cost)
//   ttl         a permit not released nor renewed within it stops counting
//   max_keys    keys with permits held at once (a key whose permits are all
//               gone is dropped); an acquire for a new key beyond it is
//               refused, kResourceExhausted in Permit::status(), counted in
//               StoreStats::denied_full, retry_after full_retry
//   full_retry  the wait such a refusal states
struct ConcurrencyOptions {
  std::uint64_t limit = 1;
  Nanos ttl = std::chrono::minutes(5);
  std::size_t max_keys = std::size_t{1} << 20;
  Nanos full_retry = std::chrono::seconds(1);
};

namespace detail {
// Where a permit sits, in its Receipt: the holder's id.
struct PermitPlace {
  std::uint64_t id = 0;
};
}  // namespace detail

// ConcurrencyLimit: at most `limit` slots per key held at once, in process.
//
// Per-holder state, not the 16-byte Store: each key holds a map of holder
// id -> (expiry, slots) in one of 16 shards (absl::flat_hash_map under a
// detail::Mutex each; docs/design.md says why). Expired holders are swept
// from a key when it is next touched at or after the earliest expiry. A
// key whose holders are all gone is dropped. Thread safety: all members,
// concurrently.
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

  Decision peek(std::string_view key, Cost cost, Nanos now) const override {
    Shard& sh = shard_of(key);
    detail::MutexLock lock(&sh.mu);
    const auto it = sh.keys.find(key);
    Cost used = 0;
    Nanos latest = now;
    std::vector<std::pair<Nanos, Cost>> live;
    if (it != sh.keys.end()) {
      for (const auto& [id, h] : it->second.holders) {
        if (h.expires <= now) continue;
        used += h.count;
        latest = std::max(latest, h.expires);
        live.emplace_back(h.expires, h.count);
      }
    }
    if (cost > limit_) {
      return Decision{false, limit_, limit_ - used, kNever, latest - now};
    }
    if (used + cost <= limit_) {
      // As a take would answer: its own permit counted.
      return Decision{true, limit_, limit_ - used - cost, Nanos{0},
                      cost == 0 ? latest - now : expiry(now) - now};
    }
    return Decision{false, limit_, limit_ - used,
                    wait_in(live, used, cost, limit_, now), latest - now};
  }

  // settle: releases the permit (whatever `actual`: a permit has no amount
  // to settle to). A permit whose TTL ended by `now` frees nothing (its
  // slots stopped counting then). kFailedPrecondition for a receipt
  // settled already or empty, kInvalidArgument for another limit's.
  absl::StatusOr<Decision> settle(Receipt& receipt, Cost /*actual*/,
                                  Nanos now) override {
    if (absl::Status st = check(receipt); !st.ok()) return st;
    const std::uint64_t id = receipt.placement<detail::PermitPlace>().id;
    Shard& sh = shard_of(receipt.key());
    detail::MutexLock lock(&sh.mu);
    receipt.close();
    auto it = sh.keys.find(receipt.key());
    if (it == sh.keys.end()) {
      late_.fetch_add(1, std::memory_order_relaxed);
      return Decision{true, limit_, limit_, Nanos{0}, Nanos{0}};
    }
    KeyState& ks = it->second;
    sweep(ks, now);
    const auto h = ks.holders.find(id);
    if (h == ks.holders.end()) {
      late_.fetch_add(1, std::memory_order_relaxed);
    } else {
      ks.in_use -= h->second.count;
      const Nanos gone = h->second.expires;
      ks.holders.erase(h);
      if (gone == ks.earliest || gone == ks.latest) bounds(ks, now);
      released_.fetch_add(1, std::memory_order_relaxed);
    }
    const Decision d{true, limit_, limit_ - ks.in_use, Nanos{0},
                     reset_of(ks, now)};
    drop_if_empty(sh, it);
    return d;
  }

  absl::StatusOr<Decision> renew(Receipt& receipt, Nanos now) override {
    if (absl::Status st = check(receipt); !st.ok()) return st;
    const std::uint64_t id = receipt.placement<detail::PermitPlace>().id;
    Shard& sh = shard_of(receipt.key());
    detail::MutexLock lock(&sh.mu);
    auto it = sh.keys.find(receipt.key());
    if (it != sh.keys.end()) sweep(it->second, now);
    if (it == sh.keys.end() || !it->second.holders.contains(id)) {
      if (it != sh.keys.end()) drop_if_empty(sh, it);
      return absl::NotFoundError(absl::StrCat(
          "concurrency limit \"", name(),
          "\": the permit expired (its TTL ended before the renewal); "
          "acquire again"));
    }
    KeyState& ks = it->second;
    Held& h = ks.holders.find(id)->second;
    const Nanos old = h.expires;
    h.expires = expiry(now);
    if (old == ks.earliest) bounds(ks, now);
    ks.latest = std::max(ks.latest, h.expires);
    return Decision{true, limit_, limit_ - ks.in_use, Nanos{0},
                    reset_of(ks, now)};
  }

  std::uint64_t limit() const noexcept override { return limit_; }

  // keys: keys with permits (expired ones not yet swept included);
  // inserts; denied_full (max_keys). reclaimed: permits their TTL took back.
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
  // hold, under the key's shard lock; false (nothing done) when the key
  // is new, the table full and `may_sweep`.
  bool try_hold(std::string_view key, Cost cost, Nanos now, Receipt& receipt,
                absl::Status* why, bool may_sweep, Decision& out) {
    Shard& sh = shard_of(key);
    detail::MutexLock lock(&sh.mu);
    auto it = sh.keys.find(key);
    if (it == sh.keys.end()) {
      if (cost > limit_ || cost == 0) {
        out = Decision{cost == 0, limit_, limit_, cost == 0 ? Nanos{0} : kNever,
                       Nanos{0}};
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
        out = Decision{false, limit_, limit_, opts_.full_retry, Nanos{0}};
        return true;
      }
      it = sh.keys.try_emplace(std::string(key)).first;
      inserts_.fetch_add(1, std::memory_order_relaxed);
    }
    KeyState& ks = it->second;
    sweep(ks, now);
    if (cost > limit_) {
      const Decision d{false, limit_, limit_ - ks.in_use, kNever,
                       reset_of(ks, now)};
      drop_if_empty(sh, it);
      out = d;
      return true;
    }
    if (ks.in_use + cost > limit_) {
      out = Decision{false, limit_, limit_ - ks.in_use, wait_for(ks, cost, now),
                     reset_of(ks, now)};
      return true;
    }
    if (cost == 0) {
      const Decision d{true, limit_, limit_ - ks.in_use, Nanos{0},
                       reset_of(ks, now)};
      drop_if_empty(sh, it);
      out = d;
      return true;
    }
    const std::uint64_t id = next_id_.fetch_add(1, std::memory_order_relaxed);
    const Nanos expires = expiry(now);
    ks.holders.emplace(id, Held{expires, cost});
    ks.in_use += cost;
    ks.earliest = std::min(ks.earliest, expires);
    ks.latest = std::max(ks.latest, expires);
    receipt =
        Receipt::issue(this, key, cost, now, detail::PermitPlace{id}, serial_);
    out =
        Decision{true, limit_, limit_ - ks.in_use, Nanos{0}, reset_of(ks, now)};
    return true;
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

  struct Held {
    Nanos expires;
    Cost count;
  };
  struct KeyState {
    absl::flat_hash_map<std::uint64_t, Held> holders;
    Cost in_use = 0;
    Nanos earliest = Nanos::max();  // the first expiry, a sweep's trigger
    Nanos latest = Nanos::min();    // the last expiry, reset_after
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
    const std::size_t h = StringHash{}(key);
    return shards_[(h >> 56) % kShards];
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

  bool claim_key() {
    std::size_t k = keys_.load(std::memory_order_relaxed);
    do {
      if (k >= opts_.max_keys) return false;
    } while (!keys_.compare_exchange_weak(k, k + 1, std::memory_order_relaxed,
                                          std::memory_order_relaxed));
    return true;
  }

  // Drops the holders whose TTL ended by `now` (expiry <= now).
  void sweep(KeyState& ks, Nanos now) {
    if (now < ks.earliest) return;
    std::uint64_t gone = 0;
    absl::erase_if(ks.holders, [&](const auto& e) {
      if (e.second.expires > now) return false;
      ks.in_use -= e.second.count;
      ++gone;
      return true;
    });
    expired_.fetch_add(gone, std::memory_order_relaxed);
    bounds(ks, now);
  }
  // reset_after: until every permit held now has expired.
  static Nanos reset_of(const KeyState& ks, Nanos now) noexcept {
    return ks.holders.empty() || ks.latest <= now ? Nanos{0} : ks.latest - now;
  }
  static void bounds(KeyState& ks, Nanos now) {
    ks.earliest = Nanos::max();
    ks.latest = now;
    for (const auto& [id, h] : ks.holders) {
      ks.earliest = std::min(ks.earliest, h.expires);
      ks.latest = std::max(ks.latest, h.expires);
    }
  }
  void drop_if_empty(Shard& sh, Map::iterator it)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(sh.mu) {
    if (!it->second.holders.empty()) return;
    sh.keys.erase(it);
    keys_.fetch_sub(1, std::memory_order_relaxed);
  }

  // How long until enough holders expire that `cost` fits, if none is
  // released before.
  Nanos wait_for(const KeyState& ks, Cost cost, Nanos now) const {
    std::vector<std::pair<Nanos, Cost>> live;
    live.reserve(ks.holders.size());
    for (const auto& [id, h] : ks.holders)
      live.emplace_back(h.expires, h.count);
    return wait_in(live, ks.in_use, cost, limit_, now);
  }
  static Nanos wait_in(std::vector<std::pair<Nanos, Cost>>& live, Cost used,
                       Cost cost, Cost limit, Nanos now) {
    std::sort(live.begin(), live.end());
    for (const auto& [at, count] : live) {
      used -= count;
      if (used + cost <= limit) return at - now;
    }
    return kNever;  // not reached for cost <= limit
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

#endif  // RATEKEEPER_PERMITS_HPP_
