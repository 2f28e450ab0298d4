// ratekeeper/budget/accountant.hpp: reserve before a call, settle after it.
//
// Defines BudgetSpec (a budget in money or tokens, per subject scope and
// period, with soft thresholds), Estimate (the worst case of a call), and
// Accountant, whose reserve() holds the worst case against every budget
// (and any rate limits given) all or nothing and returns an RAII
// Reservation holding the receipt of each take; settle(usage) settles every
// receipt to what was used (budgets and rate limits, both directions, each
// budget in the period it counted the call in), exactly once per request id
// (a new reserve under a settled id is refused); a reservation dropped
// unsettled gives everything back through its receipts.
//
//   Accountant<> acct(prices);
//   acct.add_budget({.name = "team_month", .scope = Field::kTeam,
//                    .unit = BudgetUnit::kNanoUsd, .limit = 100'000'000'000,
//                    .period = Period::calendar(PeriodKind::kMonth).value(),
//                    .soft_permille = {500, 800, 1000}});
//   auto r = acct.reserve(who, "gpt-4o", {.prompt_tokens = 900,
//                                         .max_output_tokens = 1000}, req_id);
//   if (!r.ok()) return reply_500(r.status());
//   if (!r->granted()) return reply(Rejection::budget(*r));
//   ... call the provider ...
//   r->settle(usage);  // or ~Reservation() releases it all
#ifndef RATEKEEPER_BUDGET_ACCOUNTANT_HPP_
#define RATEKEEPER_BUDGET_ACCOUNTANT_HPP_

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/container/inlined_vector.h"
#include "absl/hash/hash.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "ratekeeper/budget/audit.hpp"
#include "ratekeeper/budget/forecast.hpp"
#include "ratekeeper/budget/money.hpp"
#include "ratekeeper/budget/period.hpp"
#include "ratekeeper/budget/prices.hpp"
#include "ratekeeper/budget/rules.hpp"
#include "ratekeeper/budget/usage.hpp"
#include "ratekeeper/chain.hpp"
#include "ratekeeper/detail/mutex.hpp"
#include "ratekeeper/detail/strings.hpp"
#include "ratekeeper/identity.hpp"
#include "ratekeeper/store/sharded.hpp"

namespace ratekeeper {

enum class BudgetUnit : std::uint8_t { kNanoUsd, kTokens };

// BudgetSpec: one budget, applied to every subject by its `scope`.
//   soft_permille  thresholds in thousandths of the limit (500 = 50%); each
//                  fires the accountant's callback once per key and period.
struct BudgetSpec {
  std::string name;
  Scope scope;
  BudgetUnit unit = BudgetUnit::kNanoUsd;
  std::uint64_t limit = 0;
  std::optional<Period> period;
  std::vector<std::uint32_t> soft_permille{};
};

// Forecast: where one subject's budget stands in its period, and where it
// is heading at the pace of the period so far.
//
//   spent, limit       in the budget's unit (nano-USD or tokens), spent
//                      counting what open reservations hold
//   period_start/end   the period's bounds (Unix time)
//   projected          spent + (spent per ns so far) x (time left): the
//                      period's total at this pace (saturating)
//   exhausts_at        when the budget runs out at this pace, if within the
//                      period (nullopt: it lasts)
//   pace_per_hour      what may be spent per hour from now on to last the
//                      period: (limit - spent) / hours left
// and what the burn model says (budget/forecast.hpp; for a subject with no
// settlement yet: no rates, model_projected = low = high = spent):
//   burn_per_hour      the short-term rate (EWMA of settled spend)
//   level_per_hour     the deseasonalised rate (spend per average hour)
//   model_projected    spent + level x profile mass of the time left
//   projected_low/high the band around it, holding the period's total with
//                      frequency `band` (0.8 by default)
//   model_exhausts_at  the first time the model's spend reaches the limit
//                      within the period (nullopt: it lasts)
//   history_hours      hours of settlement history the model knows
//   seasonal           the weekly profile was learned (a week or more)
struct Forecast {
  std::uint64_t spent = 0;
  std::uint64_t limit = 0;
  Nanos now{0};
  Nanos period_start{0};
  Nanos period_end{0};
  std::uint64_t projected = 0;
  std::optional<Nanos> exhausts_at{};
  std::uint64_t pace_per_hour = 0;
  // issue 18: the burn model.
  std::uint64_t burn_per_hour = 0;
  std::uint64_t level_per_hour = 0;
  std::uint64_t model_projected = 0;
  std::uint64_t projected_low = 0;
  std::uint64_t projected_high = 0;
  double band = 0;
  std::optional<Nanos> model_exhausts_at{};
  std::uint32_t history_hours = 0;
  bool seasonal = false;
};

namespace detail {

// Where a budget stands at `now` (see Forecast), from its spend, limit and
// period; shared by Accountant and RedisAccountant.
inline Forecast forecast_of(std::uint64_t spent, std::uint64_t limit,
                            const Period::Span& span, Nanos now) {
  Forecast f;
  f.now = now;
  f.limit = limit;
  f.spent = spent;
  f.period_start = span.start;
  f.period_end = span.end;
  const auto elapsed = static_cast<u128>(
      std::max<std::int64_t>(1, (f.now - span.start).count()));
  const auto left =
      static_cast<u128>(std::max<std::int64_t>(0, (span.end - f.now).count()));
  const u128 projected = f.spent + f.spent * left / elapsed;
  f.projected = projected > ~std::uint64_t{0}
                    ? ~std::uint64_t{0}
                    : static_cast<std::uint64_t>(projected);
  if (f.spent > 0 && f.spent < f.limit) {
    // Time to spend what is left at spent/elapsed per ns.
    const u128 to_empty = (f.limit - f.spent) * elapsed / f.spent;
    if (to_empty < left) {
      f.exhausts_at = f.now + Nanos{static_cast<std::int64_t>(to_empty)};
    }
  } else if (f.spent >= f.limit) {
    f.exhausts_at = f.now;
  }
  const u128 hour = 3600000000000ULL;
  if (f.spent < f.limit) {
    const u128 per_hour = left == 0 ? u128{f.limit - f.spent}
                                    : u128{f.limit - f.spent} * hour / left;
    f.pace_per_hour = per_hour > ~std::uint64_t{0}
                          ? ~std::uint64_t{0}
                          : static_cast<std::uint64_t>(per_hour);
  }
  return f;
}

// Fills the burn model's fields of `f` from `p` (amounts rounded,
// saturating). model_projected, projected_low and projected_high are the
// exact f.spent plus the model's rounded remaining part (saturating at
// 2^64 - 1), never a double of spent: with no settlement yet they are
// spent exactly, at any size. history_hours is clamped to 0..2^32 - 1.
inline Forecast with_burn(Forecast f, const BurnProjection& p) {
  const auto u = [](double v) -> std::uint64_t {
    if (!(v > 0)) return 0;
    if (v >= 9.2e18) return ~std::uint64_t{0};
    return static_cast<std::uint64_t>(std::llround(v));
  };
  const auto plus_spent = [&](double rest) -> std::uint64_t {
    const std::uint64_t r = u(rest);
    return r > ~std::uint64_t{0} - f.spent ? ~std::uint64_t{0} : f.spent + r;
  };
  f.burn_per_hour = u(p.burn_per_hour);
  f.level_per_hour = u(p.level_per_hour);
  f.model_projected = plus_spent(p.remaining);
  f.projected_low = plus_spent(p.remaining_low);
  f.projected_high = plus_spent(p.remaining_high);
  f.band = p.band;
  f.model_exhausts_at = p.exhausts_at;
  f.history_hours =
      p.history_hours > 0
          ? static_cast<std::uint32_t>(std::min(p.history_hours, 4294967295.0))
          : 0;
  f.seasonal = p.seasonal;
  return f;
}

}  // namespace detail

// ThresholdEvent: a soft threshold crossed.
struct ThresholdEvent {
  std::string budget;
  std::string key;  // the subject key (see identity.hpp)
  std::uint32_t permille = 0;
  std::uint64_t spent = 0;
  std::uint64_t limit = 0;
};

namespace detail {

// SettledIds: the settlement of each of the last `window` settled request
// ids, in shards by id with a mutex each, so that settles of different ids
// rarely meet. A shard keeps its entries in a ring (oldest overwritten
// first; an entry's id string keeps its buffer when reused, so a settle
// allocates nothing once the ring is full) and an index into it: an
// open-addressed, linearly probed table of 8-byte slots, each the low 32
// bits of the id's hash (its home slot and fingerprint) and the entry's
// ring position. A look-up of an id that is not there (every new request)
// reads only the index (an entry is read only when its fingerprint
// matches); forgetting the oldest entry finds its slot by position and
// shifts its cluster back (no tombstones). The index is kept at most half
// full (doubled as the ring grows). An id is hashed once per call.
class SettledIds {
 public:
  static constexpr std::size_t kShards = 16;

  struct Key {
    absl::string_view id;
    std::size_t hash = 0;
  };
  struct Entry {
    std::string id;
    std::size_t hash = 0;
    Settlement settlement;
    // A settlement whose record never became durable (its sync failed):
    // kept in the ring and the index, but never found (find() probes past
    // it), so the id counts as unsettled.
    bool revoked = false;
  };

  struct alignas(64) Shard {
    Mutex mu;
    std::vector<Entry> ring ABSL_GUARDED_BY(mu);
    std::size_t head ABSL_GUARDED_BY(mu) = 0;  // the oldest, once full
    std::size_t cap ABSL_GUARDED_BY(mu) = 0;   // the ring's window
    // 0: empty; else (low 32 bits of the hash) << 32 | (ring position + 1).
    std::vector<std::uint64_t> slots ABSL_GUARDED_BY(mu);
    // The low 32 bits of each ring entry's hash, packed (16 a cache line):
    // the next entry to forget is found without reading the entry itself.
    std::vector<std::uint32_t> fps ABSL_GUARDED_BY(mu);
    // slots.data() and its size - 1, for prefetch() without the lock.
    std::atomic<const std::uint64_t*> slots_hint{nullptr};
    std::atomic<std::size_t> mask_hint{0};
  };

  static Key key(std::string_view id) {
    return Key{av(id), absl::Hash<absl::string_view>{}(av(id))};
  }
  Shard& shard_of(const Key& k) { return shards_[(k.hash >> 40) % kShards]; }

  // Every remembered settlement, shard by shard, oldest first in each.
  template <class F>
  void for_each(const F& f) {
    for (Shard& s : shards_) {
      MutexLock lock(&s.mu);
      const std::size_t n = s.ring.size();
      // Oldest first: from head when the ring is full, else from 0.
      const std::size_t start = n == s.cap && n != 0 ? s.head : 0;
      for (std::size_t i = 0; i < n; ++i) {
        const Entry& e = s.ring[(start + i) % n];
        if (!e.revoked) f(e);
      }
    }
  }
  void copy_window(const SettledIds& o) { per_shard_ = o.per_shard_; }

  // Starts fetching the index slot where `k` is looked up (no lock: the
  // index's address is read from relaxed copies, and a prefetch of a stale
  // one is harmless).
  void prefetch(const Key& k) const noexcept {
    const Shard& s = shards_[(k.hash >> 40) % kShards];
    const std::uint64_t* slots = s.slots_hint.load(std::memory_order_relaxed);
    if (slots == nullptr) return;
    __builtin_prefetch(slots + (static_cast<std::uint32_t>(k.hash) &
                                s.mask_hint.load(std::memory_order_relaxed)));
  }

  // At least `ids` ids are remembered (rounded up to whole shards). A
  // shard takes a new size at its next remember(): a smaller one keeps
  // its newest ids.
  void set_window(std::size_t ids) {
    per_shard_ = ids / kShards + (ids % kShards != 0 ? 1 : 0);
    if (per_shard_ == 0) per_shard_ = 1;
  }

  static const Settlement* find(Shard& s, const Key& k)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu) {
    const Entry* e = find_entry(s, k);
    return e != nullptr ? &e->settlement : nullptr;
  }

  // The live (not revoked) entry of `k`, or nullptr.
  static Entry* find_entry(Shard& s, const Key& k)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu) {
    if (s.slots.empty()) return nullptr;
    const std::size_t mask = s.slots.size() - 1;
    const auto fp = static_cast<std::uint32_t>(k.hash);
    for (std::size_t i = fp & mask;; i = (i + 1) & mask) {
      const std::uint64_t v = s.slots[i];
      if (v == 0) return nullptr;
      if (static_cast<std::uint32_t>(v >> 32) == fp) {
        Entry& e = s.ring[(v & 0xffffffffU) - 1];
        if (!e.revoked && e.hash == k.hash && absl::string_view(e.id) == k.id) {
          return &e;
        }
      }
    }
  }

  // Forgets the settlement of `k` (its record was not made durable): the id
  // is unsettled again.
  static void revoke(Shard& s, const Key& k)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu) {
    if (Entry* e = find_entry(s, k); e != nullptr) e->revoked = true;
  }

  // Records the settlement of `k` unless it has one; the shard's oldest id
  // beyond the window is forgotten.
  void remember(Shard& s, const Key& k, const Settlement& st)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu) {
    if (find(s, k) != nullptr) return;
    if (s.cap != per_shard_) relayout(s, per_shard_);
    std::size_t pos = 0;
    if (s.ring.size() < s.cap) {
      pos = s.ring.size();
      if (2 * (pos + 1) > s.slots.size()) {
        grow_index(s, std::max<std::size_t>(16, 2 * s.slots.size()));
      }
      s.ring.push_back(Entry{});
      s.fps.push_back(0);
    } else {
      pos = s.head;
      s.head = s.head + 1 == s.cap ? 0 : s.head + 1;
      unindex(s, pos);
    }
    Entry& e = s.ring[pos];
    e.id.assign(k.id.data(), k.id.size());
    e.hash = k.hash;
    e.settlement = st;
    e.revoked = false;
    s.fps[pos] = static_cast<std::uint32_t>(k.hash);
    place(s, k.hash, pos);
    if (s.ring.size() == s.cap) {
      // The next remember() here overwrites ring[head] and clears its
      // slot: both lines are far from anything touched since (a random
      // slot, an entry written a window ago), so they are fetched now.
      __builtin_prefetch(&s.ring[s.head], 1);
      __builtin_prefetch(&s.slots[s.fps[s.head] & (s.slots.size() - 1)], 1);
    }
  }

 private:
  static void place(Shard& s, std::size_t hash, std::size_t pos)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu) {
    const std::size_t mask = s.slots.size() - 1;
    const auto fp = static_cast<std::uint32_t>(hash);
    std::size_t i = fp & mask;
    while (s.slots[i] != 0) i = (i + 1) & mask;
    s.slots[i] = std::uint64_t{fp} << 32 | (pos + 1);
  }

  // Removes the slot of ring position `pos`, shifting back the rest of its
  // cluster (each slot's home is its fingerprint's low bits).
  static void unindex(Shard& s, std::size_t pos)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu) {
    const std::size_t mask = s.slots.size() - 1;
    std::size_t i = s.fps[pos] & mask;
    while ((s.slots[i] & 0xffffffffU) != pos + 1) i = (i + 1) & mask;
    for (std::size_t j = i;;) {
      j = (j + 1) & mask;
      const std::uint64_t v = s.slots[j];
      if (v == 0) break;
      const std::size_t home = static_cast<std::uint32_t>(v >> 32) & mask;
      // v may fill the hole at i unless its home lies cyclically in (i, j].
      const bool stays =
          i <= j ? (home > i && home <= j) : (home > i || home <= j);
      if (!stays) {
        s.slots[i] = v;
        i = j;
      }
    }
    s.slots[i] = 0;
  }

  static void grow_index(Shard& s, std::size_t size)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu) {
    s.slots.assign(size, 0);
    for (std::size_t p = 0; p < s.ring.size(); ++p) place(s, s.ring[p].hash, p);
    s.slots_hint.store(s.slots.data(), std::memory_order_relaxed);
    s.mask_hint.store(size - 1, std::memory_order_relaxed);
  }

  // The ring laid out oldest first for a window of `cap`, keeping the
  // newest entries that fit.
  static void relayout(Shard& s, std::size_t cap)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu) {
    std::vector<Entry> old = std::move(s.ring);
    s.ring.clear();
    s.fps.clear();
    const std::size_t n = old.size();
    const std::size_t keep = std::min(n, cap);
    s.ring.reserve(keep);
    s.fps.reserve(keep);
    // Oldest first: from head when the old ring was full, else from 0.
    const std::size_t start = n == s.cap && n != 0 ? s.head : 0;
    for (std::size_t i = n - keep; i < n; ++i) {
      s.ring.push_back(std::move(old[(start + i) % n]));
      s.fps.push_back(static_cast<std::uint32_t>(s.ring.back().hash));
    }
    s.head = 0;
    s.cap = cap;
    std::size_t size = 16;
    while (size < 2 * (keep + 1)) size *= 2;
    grow_index(s, size);
  }

  std::array<Shard, kShards> shards_;
  std::size_t per_shard_ = (std::size_t{1} << 18) / kShards;
};

}  // namespace detail

template <Clock C>
class Accountant;

// Reservation: the worst case of one call, held against every budget and
// limit. Move-only. settle() once; unsettled, the destructor releases it.
template <Clock C = SystemClock>
class Reservation {
 public:
  // Made by Accountant::reserve only (the key's constructor is private).
  class Key {
    friend class Accountant<C>;
    Key() = default;
  };
  explicit Reservation(Key) {}

  Reservation(Reservation&& o) noexcept { *this = std::move(o); }
  Reservation& operator=(Reservation&& o) noexcept {
    if (this != &o) {
      release();
      acct_ = std::exchange(o.acct_, nullptr);
      decision_ = std::move(o.decision_);
      request_id_ = std::move(o.request_id_);
      model_ = std::move(o.model_);
      prices_ = o.prices_;
      estimate_ = o.estimate_;
      items_ = std::move(o.items_);
      reserved_money_ = o.reserved_money_;
      reserved_tokens_ = o.reserved_tokens_;
      first_budget_ = o.first_budget_;
      seq_ = o.seq_;
      worst_output_ = o.worst_output_;
      done_ = o.done_;
    }
    return *this;
  }
  Reservation(const Reservation&) = delete;
  Reservation& operator=(const Reservation&) = delete;
  ~Reservation() { release(); }

  bool granted() const noexcept { return decision_.allowed; }
  // Refused by one of the accountant's budgets (403, Rejection::budget),
  // rather than by a rate limit passed to reserve() (429,
  // Rejection::from).
  bool refused_by_budget() const noexcept {
    if (decision_.allowed) return false;
    const LimitResult* by = decision_.binding_result();
    if (by == nullptr) return false;
    for (const Item& it : items_) {
      if (it.limit == by->limit) return true;
    }
    return false;
  }
  const ChainDecision& decision() const noexcept { return decision_; }
  const std::string& request_id() const noexcept { return request_id_; }
  Money reserved_money() const noexcept { return reserved_money_; }
  std::uint64_t reserved_tokens() const noexcept { return reserved_tokens_; }

  // settle
  //
  // Charges `used` (priced at the reservation's time) through the
  // reservation's receipts: what was held and not used goes back, an
  // overage is charged (past the limit if need be: the provider billed
  // it), each budget in the period it counted the call in; the rate limits
  // given to reserve() are settled too (a token limit to the tokens used,
  // in both directions; a request limit keeps its request). Exactly once
  // per request id: a second settle,
  // here or through another Reservation of the same id, returns the first
  // result and changes nothing. kFailedPrecondition on a refused or
  // released reservation. A partial usage (UsageSource::kPartial, a stream
  // cut short) is never final: its output is charged at the reservation's
  // worst case (max_output_tokens, or what next_chunk_fits grew it to),
  // flagged estimated (detail::partial_charge); settle_partial() charges
  // the caller's count instead.
  absl::StatusOr<Settlement> settle(const Usage& used) {
    if (acct_ == nullptr || !granted()) {
      return absl::FailedPreconditionError(
          "settle: the reservation was not granted or was released");
    }
    return acct_->settle_reservation(
        *this, detail::partial_charge(used, estimate_, worst_output()));
  }

  // settle_partial
  //
  // A stream that did not finish (StreamUsageResult::complete false): the
  // input side of `partial` as reported (else the prompt estimate) and, as
  // output, the tokens the caller counted (never fewer than `partial`
  // reported), flagged estimated.
  absl::StatusOr<Settlement> settle_partial(
      const Usage& partial, std::uint64_t counted_output_tokens) {
    Usage u = partial;
    u.source = UsageSource::kPartial;
    return settle(detail::partial_charge(u, estimate_, counted_output_tokens));
  }

  // settle_without_usage
  //
  // A stream that ended without a usage object: charges the prompt estimate
  // and the output tokens the caller counted, flagged estimated.
  absl::StatusOr<Settlement> settle_without_usage(
      std::uint64_t counted_output_tokens) {
    return settle(detail::counted_usage(estimate_, counted_output_tokens));
  }

  // cancel_after_dispatch
  //
  // The call was sent and then cancelled: the provider bills the input it
  // read, so at least the prompt is charged (and any output counted).
  absl::StatusOr<Settlement> cancel_after_dispatch(
      std::uint64_t counted_output_tokens = 0) {
    return settle_without_usage(counted_output_tokens);
  }

  // next_chunk_fits
  //
  // Streaming: whether `next_tokens` more output, after `output_so_far`,
  // still fits. Within the reservation it does; beyond, the reservation
  // grows by the difference if every budget allows it (all or nothing) in
  // the period the reservation counts in, else false and the caller cuts
  // the stream. Once a later period has opened on a budget's key, the
  // reservation's period cannot grow there (its room is no longer known,
  // and a later period never pays for it): false.
  absl::StatusOr<bool> next_chunk_fits(std::uint64_t output_so_far,
                                       std::uint64_t next_tokens) {
    if (acct_ == nullptr || !granted() || done_) {
      return absl::FailedPreconditionError(
          "next_chunk_fits: the reservation is not live");
    }
    if (output_so_far > kMaxUsageTokens || next_tokens > kMaxUsageTokens) {
      return absl::InvalidArgumentError(
          "next_chunk_fits: token counts must be at most 2^48");
    }
    absl::StatusOr<bool> fits =
        acct_->extend(*this, output_so_far + next_tokens);
    if (fits.ok() && *fits) {
      worst_output_ = std::max(worst_output_, output_so_far + next_tokens);
    }
    return fits;
  }

  // release
  //
  // Gives back everything held, through the receipts: the budgets and the
  // rate limits given to reserve() (a call that failed before dispatch).
  // Done by the destructor of an unsettled reservation.
  void release() noexcept {
    if (acct_ != nullptr && granted() && !done_)
      acct_->release_reservation(*this);
    acct_ = nullptr;
  }

 private:
  friend class Accountant<C>;
  // One budget of the reservation: what it holds, in which period, and the
  // receipts of the extensions (the reserve's own receipt is in decision_).
  struct Item {
    Limit* limit;
    std::string key;
    Cost held;
    bool money;               // a money budget (else tokens)
    std::int64_t period = 0;  // the period the reserve was counted in
    std::vector<Receipt> more{};
  };

  Accountant<C>* acct_ = nullptr;
  ChainDecision decision_;
  std::string request_id_;
  std::string model_;  // for the ledger's records: kept with an audit sink
  Prices prices_;      // the model's prices at the reservation's time
  Estimate estimate_;
  absl::InlinedVector<Item, 4> items_;
  Money reserved_money_;
  std::uint64_t reserved_tokens_ = 0;
  // decision_.results: the rate limits passed to reserve(), then one result
  // per budget from this index on.
  std::size_t first_budget_ = 0;
  std::uint64_t seq_ = 0;  // the ledger's sequence number of the reserve
  // The most output next_chunk_fits has held room for (0: none asked).
  std::uint64_t worst_output_ = 0;
  bool done_ = false;

  std::uint64_t worst_output() const noexcept {
    return std::max(estimate_.max_output_tokens, worst_output_);
  }
};

// Accountant: budgets per subject and period, priced from a PriceTable.
// Budget states live in ShardedStores (one per budget); decisions are
// chains, so a reservation is all or nothing across budgets and limits.
// Thread-safe: reserve, settle and release from any thread.
template <Clock C = SystemClock>
class Accountant {
 public:
  using ThresholdCallback = std::function<void(const ThresholdEvent&)>;

  explicit Accountant(PriceTable prices, C clock = C{},
                      ShardedOptions store = {})
      : prices_(std::move(prices)),
        chain_(clock),
        clock_(clock),
        store_(budget_store(store)) {}

  Accountant(const Accountant&) = delete;
  Accountant& operator=(const Accountant&) = delete;

  // Every reserve, denial, extension, settle, release, reset and limit
  // change is appended to `sink` (a Ledger) before it is acknowledged.
  // settle(), extensions, resets and limit changes return only once their
  // record is durable (money), and return the sink's error otherwise:
  // a write or sync error applies nothing of the settle (the id stays
  // unsettled, its holds stay held until the reservation is released or
  // dropped; the record may still be on disk, and the ledger refuses every
  // record after it, so a retried settle gets the error too). Denials, releases
  // and reserves are written without waiting for a sync (append_nowait): a
  // denial costs no flush, and a reserve's hold is made durable by the sync of
  // its settle (a crash before then loses the hold of a call still in flight,
  // never a charge). settle waits for its sync with no lock held, so concurrent
  // settles share one group sync. Set before the first reserve (nullptr: no
  // records); the sink must outlive its use here.
  void set_audit(AuditSink* sink) { audit_ = sink; }

  // Called (from the thread that crossed it) once per threshold, key and
  // period. Set before the first reserve.
  void on_threshold(ThresholdCallback cb) { on_threshold_ = std::move(cb); }

  // add_budget
  //
  // kInvalidArgument for a bad name, a zero limit, no period, or a
  // threshold above 1000. Add budgets before the first reserve.
  absl::Status add_budget(const BudgetSpec& spec) {
    if (!spec.period) {
      return absl::InvalidArgumentError(
          absl::StrCat("budget \"", spec.name, "\": no period"));
    }
    for (const std::uint32_t t : spec.soft_permille) {
      if (t == 0 || t > 1000) {
        return absl::InvalidArgumentError(absl::StrCat(
            "budget \"", spec.name, "\": thresholds are 1..1000 permille"));
      }
    }
    absl::StatusOr<PeriodBudget> policy =
        PeriodBudget::create(spec.limit, *spec.period);
    if (!policy.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "budget \"", spec.name, "\": ", policy.status().message()));
    }
    auto limit =
        make_limit({.name = spec.name,
                    .unit = spec.unit == BudgetUnit::kTokens ? Unit::kTokens
                                                             : Unit::kNanoUsd},
                   *std::move(policy), store_);
    if (!limit.ok()) return limit.status();
    budgets_.push_back(Budget{spec, std::move(*limit)});
    return absl::OkStatus();
  }

  // reserve
  //
  // Holds the worst case of a call (the estimate, priced for `model` now)
  // against every budget of `who`, with `limits` (rate limits, acquired
  // first) in the same all-or-nothing chain. A refusal is a Reservation
  // that is not granted(); errors (unknown model, a subject lacking a
  // budget's field) are statuses, and so is a request id already settled
  // within the remembered window (kAlreadyExists: the call must not reach
  // the provider again; find_settlement() has its settlement). Request ids
  // are made by the server, once per provider call. An id in flight (not
  // yet settled) may be reserved again: the first settle wins, the other
  // reservation's settle returns it and gives its holds back.
  absl::StatusOr<Reservation<C>> reserve(
      const Subject& who, std::string_view model, const Estimate& e,
      std::string request_id, std::span<const ChainItem> limits = {}) {
    // Built in place and returned as is (one object, no move).
    absl::StatusOr<Reservation<C>> out(absl::in_place,
                                       typename Reservation<C>::Key{});
    if (absl::Status st =
            reserve_into(*out, who, model, e, std::move(request_id), limits);
        !st.ok()) {
      out = std::move(st);
    }
    return out;
  }

 private:
  absl::Status reserve_into(Reservation<C>& r, const Subject& who,
                            std::string_view model, const Estimate& e,
                            std::string request_id,
                            std::span<const ChainItem> limits) {
    if (absl::Status st = check_text("request id", request_id); !st.ok()) {
      return st;
    }
    // The id's slot in the settled-id index is fetched while the call is
    // priced (a new id's slot is a cache miss in a large window).
    const auto id_key = detail::SettledIds::key(request_id);
    settled_.prefetch(id_key);
    if (absl::Status st = check_text("model", model); !st.ok()) return st;
    if (e.prompt_tokens > kMaxUsageTokens ||
        e.max_output_tokens > kMaxUsageTokens) {
      return absl::InvalidArgumentError(absl::StrCat(
          "estimate of ", e.prompt_tokens, " prompt and ", e.max_output_tokens,
          " output tokens: each must be at most 2^48"));
    }
    const Nanos now = clock_.now();
    Usage worst;
    worst.input_uncached = e.prompt_tokens;
    worst.output = e.max_output_tokens;
    absl::StatusOr<Prices> prices = prices_.prices(model, to_sys(now));
    absl::StatusOr<Money> cost = prices.ok()
                                     ? PriceTable::cost(*prices, worst)
                                     : absl::StatusOr<Money>(prices.status());
    // Each budget's subject key (an error here, like a pricing error, is
    // returned after the settled-id check, as it was before it).
    absl::Status key_error;
    const Budget* key_error_budget = nullptr;
    if (cost.ok()) {
      r.reserved_tokens_ = worst.total();
      for (const Budget& b : budgets_) {
        std::string key;
        if (absl::Status st = append_subject_key(b.spec.scope, who, key);
            !st.ok()) {
          key_error = absl::InvalidArgumentError(
              absl::StrCat("budget \"", b.spec.name, "\": ", st.message()));
          key_error_budget = &b;
          break;
        }
        const bool money = b.spec.unit == BudgetUnit::kNanoUsd;
        // At least one unit (a nano-USD, a token): every call holds
        // something of every budget, so a spent budget refuses even an
        // empty estimate (a zero-cost take is always admitted). The unit
        // goes back at settle (rules.hpp, rule 1).
        r.items_.push_back(
            {b.limit.get(), std::move(key),
             detail::hold_amount(money, *cost, r.reserved_tokens_), money});
      }
    }
    // Exactly once per call: a new reserve under an id settled within the
    // remembered window is refused, so a retried call never reaches the
    // provider twice (its settle would have been answered with the first
    // settlement anyway, after the provider billed it again). Looked up
    // last before the chain, so that the prefetch of its slot has had the
    // pricing and the subject keys to arrive; checked before their errors
    // are returned.
    if (std::optional<Settlement> done = find_settlement(id_key)) {
      return absl::AlreadyExistsError(absl::StrCat(
          "request id \"", detail::av(request_id), "\" was already settled (",
          done->cost.nanos, " nano-USD, ", done->tokens,
          " tokens): a new call needs a new id; find_settlement() has the "
          "first settlement"));
    }
    if (!prices.ok()) return prices.status();
    if (!cost.ok()) return cost.status();
    if (key_error_budget != nullptr) {
      key_error_budget->limit->metrics().record_error();
      return key_error;
    }
    r.request_id_ = std::move(request_id);
    if (audit_ != nullptr) r.model_ = std::string(model);
    r.prices_ = *prices;
    r.estimate_ = e;
    r.reserved_money_ = *cost;
    absl::InlinedVector<ChainItem, 8> items(limits.begin(), limits.end());
    r.first_budget_ = items.size();
    for (const auto& it : r.items_) {
      items.push_back({it.limit, it.key, it.held});
    }
    r.decision_ = chain_.acquire_at(std::span<const ChainItem>(items), now);
    if (!r.decision_.allowed) {
      if (audit_ != nullptr) {
        const LimitResult* by = r.decision_.binding_result();
        std::string f = record_head("deny", r);
        f += ",\"binding\":";
        detail::append_json_quoted(f, by == nullptr ? "" : by->limit->name());
        append_call(f, who, &e);  // issue 18: what-if replay
        // Written, not waited for: a denial is not money.
        if (auto st = audit_->append_nowait(f, now); !st.ok()) {
          return st.status();
        }
      }
      return full_budget_store(r, now);
    }
    // The period each budget counted the call in (its receipt's placement):
    // every later change of this call belongs to that period.
    for (std::size_t i = 0; i < r.items_.size(); ++i) {
      r.items_[i].period =
          r.decision_.results[r.first_budget_ + i]
              .receipt.template placement<PeriodBudget::Placement>()
              .period;
    }
    if (audit_ != nullptr) {
      std::string f = record_head("reserve", r);
      absl::StrAppend(&f, ",\"at\":", now.count(),
                      ",\"prompt\":", e.prompt_tokens,
                      ",\"max_output\":", e.max_output_tokens);
      append_items(f, r, [](const auto& it) { return it.held; });
      append_call(f, who, nullptr);  // issue 18: what-if replay
      // Written, not waited for: a hold is not a charge. The settle that
      // charges it is durable before it returns, and so, with it, is this
      // record (a sync covers every record written before it).
      absl::StatusOr<std::uint64_t> seq = audit_->append_nowait(f, now);
      if (!seq.ok()) {
        // Not recorded, not granted: give it all back, rate limits included.
        chain_.give_back(r.decision_);
        return seq.status();
      }
      r.seq_ = *seq;
    }
    r.acct_ = this;
    check_thresholds(r, now);
    return absl::OkStatus();
  }

 public:
  // replay
  //
  // Applies one ledger record (parsed JSON, from read_ledger) to this
  // accountant's budgets: after replaying a whole ledger into an accountant
  // with the same budgets, every budget holds exactly what it held when the
  // ledger was written, and settled request ids stay settled. Each
  // reservation is its own (one id reserved twice at once is two: "of"
  // names the reserve record a later record belongs to), and every change
  // goes to the period the record names. Reservations open at the end (a
  // crash between reserve and settle) stay held, as in the process that
  // wrote them. Every field is checked before anything is applied:
  // kInvalidArgument, with nothing applied, for a record it cannot read (a
  // field of the wrong type, a negative or fractional amount, an unknown
  // budget or event). Never throws.
  //
  // A checkpoint record (a segmented ledger's, handed on first by
  // read_ledger) loads the books it holds (see checkpoint_books): hand it
  // to an accountant that has replayed nothing else.
  template <class Json>
  absl::Status replay(const Json& j) {
    absl::Status st = replay_record(j);
    if (st.ok()) note_record_time(j);
    return st;
  }

  // checkpoint_books
  //
  // The books that replay() rebuilt, as one JSON object, for a segmented
  // ledger's checkpoint record:
  //   {"now":T,
  //    "budgets":[{"b":0,"limit":L,"keys":[["<hex key>",period,spent],..]}..],
  //    "open":[{"of":seq,"request":"id","items":[[period,held,b,"<hex>"],..]}..],
  //    "settled":[["id",cost_nanos,tokens,estimated],..]}
  // T: the latest record time replayed (the ledger's own clock); each
  // budget's limit; the state (period and spend) of each subject that
  // still matters: its period has not ended by T (T is at least
  // kCheckpointGrace past the period's end otherwise), or an open
  // reservation holds on that subject and budget (a late settle goes to the
  // reservation's own period: it must find that period's spend there);
  // the reservations open (by the sequence number of their reserve record),
  // each item with its period, amount held, budget and subject; and the
  // settled ids remembered (at most the idempotency window), oldest first.
  // Its size is therefore proportional to the subjects live in the open
  // period, the open reservations and the window, not to every subject
  // ever seen: a subject's spend in an ended period, which no open
  // reservation references, is dropped (it could only ever change a
  // period that has ended; the open period's books are the same).
  // Replaying it into an accountant with the same budgets and idempotency
  // window (replica()) and then the records after it gives the books of a
  // replay of the whole ledger for every period not ended, and for the
  // ended ones wherever an open reservation still counts (its settle is
  // exact). Only what replay built: an accountant that also serves calls
  // holds reservations it does not know of (the Ledger makes checkpoints
  // from a replica that only replays). Not thread-safe with replay.
  static constexpr Nanos kCheckpointGrace = std::chrono::minutes(10);

  std::string checkpoint_books() {
    std::string f =
        absl::StrCat("{\"now\":", replay_now_.count(), ",\"budgets\":[");
    const Nanos now = clock_.now();
    if (replay_keys_.size() < budgets_.size()) {
      replay_keys_.resize(budgets_.size());
    }
    // The subjects open reservations hold on, per budget; and, for items
    // loaded from an older checkpoint without their subject, the periods.
    std::vector<absl::flat_hash_set<std::string_view>> held(budgets_.size());
    std::vector<absl::flat_hash_set<std::int64_t>> held_periods(
        budgets_.size());
    for (const auto& [seq, open] : replay_open_) {
      for (std::size_t k = 0; k < open.items.size(); ++k) {
        const ReplayItem& it = open.items[k];
        const std::size_t b = it.keyed ? it.b : k;
        if (b >= budgets_.size()) continue;
        if (it.keyed) {
          held[b].insert(it.key);
        } else {
          held_periods[b].insert(it.period);
        }
      }
    }
    for (std::size_t b = 0; b < budgets_.size(); ++b) {
      absl::StrAppend(&f, b == 0 ? "" : ",", "{\"b\":", b,
                      ",\"limit\":", budgets_[b].limit->policy().limit(),
                      ",\"keys\":[");
      const std::int64_t open_period =
          budgets_[b].spec.period->index_of(replay_now_ - kCheckpointGrace);
      std::vector<std::pair<std::string, PeriodBudget::State>> keys;
      std::vector<std::string> dropped;
      for (const std::string& key : replay_keys_[b]) {
        PeriodBudget::State st = raw_state(budgets_[b], key, now);
        if (const auto p = pins_.find(std::make_pair(b, key));
            p != pins_.end()) {
          st = p->second.state;  // the store may have let it go
        }
        if (st.spent != 0 &&
            (st.period >= open_period || held[b].contains(key) ||
             held_periods[b].contains(st.period))) {
          keys.emplace_back(key, st);
        } else {
          dropped.push_back(key);
        }
      }
      // Forgotten until a record changes them again (replay_change).
      for (const std::string& key : dropped) replay_keys_[b].erase(key);
      std::sort(keys.begin(), keys.end(),
                [](const auto& x, const auto& y) { return x.first < y.first; });
      bool first = true;
      for (const auto& [key, st] : keys) {
        absl::StrAppend(&f, first ? "" : ",", "[\"", hex(key), "\",", st.period,
                        ",", st.spent, "]");
        first = false;
      }
      f += "]}";
    }
    f += "],\"open\":[";
    std::vector<std::uint64_t> seqs;
    for (const auto& [seq, open] : replay_open_) seqs.push_back(seq);
    std::sort(seqs.begin(), seqs.end());
    for (std::size_t i = 0; i < seqs.size(); ++i) {
      const ReplayOpen& open = replay_open_.at(seqs[i]);
      absl::StrAppend(&f, i == 0 ? "" : ",", "{\"of\":", seqs[i],
                      ",\"request\":");
      detail::append_json_quoted(f, open.id);
      f += ",\"items\":[";
      for (std::size_t k = 0; k < open.items.size(); ++k) {
        const ReplayItem& it = open.items[k];
        absl::StrAppend(&f, k == 0 ? "" : ",", "[", it.period, ",", it.held);
        if (it.keyed) absl::StrAppend(&f, ",", it.b, ",\"", hex(it.key), "\"");
        f += "]";
      }
      f += "]}";
    }
    f += "],\"settled\":[";
    bool first = true;
    settled_.for_each([&](const detail::SettledIds::Entry& e) {
      f += first ? "[" : ",[";
      first = false;
      detail::append_json_quoted(f, e.id);
      absl::StrAppend(&f, ",", e.settlement.cost.nanos, ",",
                      e.settlement.tokens, ",",
                      e.settlement.estimated ? "true" : "false", "]");
    });
    f += "]}";
    return f;
  }

 private:
  template <class Json>
  absl::Status replay_record(const Json& j) {
    if (!j.is_object()) return replay_error("is not a JSON object");
    const auto ev = j.find("event");
    if (ev == j.end()) return absl::OkStatus();  // not an accountant record
    if (!ev->is_string()) return replay_error("\"event\" is not a string");
    const std::string event = ev->template get<std::string>();
    if (event == "deny") return absl::OkStatus();
    if (event == "checkpoint") {
      const auto books = j.find("books");
      if (books == j.end()) return replay_error("a checkpoint without books");
      return load_books(*books);
    }
    absl::StatusOr<std::int64_t> t = replay_i64(j, "t", 0);
    if (!t.ok()) return t.status();
    if (event == "limit") {
      absl::StatusOr<std::uint64_t> b = replay_u64(j, "b", std::nullopt);
      if (!b.ok()) return b.status();
      if (*b >= budgets_.size()) return replay_error("unknown budget");
      absl::StatusOr<std::uint64_t> limit =
          replay_u64(j, "limit", std::nullopt);
      if (!limit.ok()) return limit.status();
      absl::StatusOr<PeriodBudget> next =
          PeriodBudget::create(*limit, *budgets_[*b].spec.period);
      if (!next.ok()) return next.status();
      return budgets_[*b].limit->reconfigure(*std::move(next));
    }
    const bool reserve = event == "reserve", extend = event == "extend",
               settle = event == "settle", release = event == "release";
    if (!reserve && !extend && !settle && !release && event != "reset") {
      return replay_error(absl::StrCat("unknown event \"", event, "\""));
    }
    const auto items = j.find("items");
    if (items == j.end() || !items->is_array()) {
      return replay_error(absl::StrCat(event, " without an items array"));
    }
    struct Read {
      std::size_t b = 0;
      std::string key;
      std::optional<std::int64_t> period;
      Cost amount = 0;
    };
    std::vector<Read> read;
    for (const auto& it : *items) {
      if (!it.is_object()) return replay_error("an item is not an object");
      Read r;
      absl::StatusOr<std::uint64_t> b = replay_u64(it, "b", std::nullopt);
      if (!b.ok()) return b.status();
      if (*b >= budgets_.size()) return replay_error("unknown budget");
      r.b = static_cast<std::size_t>(*b);
      const auto key = it.find("key");
      if (key == it.end() || !key->is_string()) {
        return replay_error("an item's \"key\" is not a string");
      }
      std::optional<std::string> bytes =
          unhex(key->template get<std::string>());
      if (!bytes) return replay_error("an item's \"key\" is not hex");
      r.key = *std::move(bytes);
      absl::StatusOr<std::uint64_t> amount =
          replay_u64(it, "amount", std::nullopt);
      if (!amount.ok()) return amount.status();
      r.amount = *amount;
      if (it.find("period") != it.end()) {
        absl::StatusOr<std::int64_t> p = replay_i64(it, "period", 0);
        if (!p.ok()) return p.status();
        r.period = *p;
      }
      read.push_back(std::move(r));
    }
    if (event == "reset") {
      for (const Read& r : read) {
        const std::int64_t p =
            r.period ? *r.period
                     : budgets_[r.b].spec.period->index_of(Nanos{*t});
        replay_change(r.b, r.key, p, 0, PeriodBudget::kMaxLimit, Nanos{*t});
      }
      return absl::OkStatus();
    }
    const auto id_it = j.find("request");
    if (id_it == j.end() || !id_it->is_string()) {
      return replay_error("\"request\" is not a string");
    }
    const std::string id = id_it->template get<std::string>();
    absl::StatusOr<std::int64_t> at = replay_i64(j, "at", *t);
    if (!at.ok()) return at.status();
    std::optional<Settlement> settled;
    if (settle) {
      absl::StatusOr<std::int64_t> cost =
          replay_i64(j, "cost_nanos", std::nullopt);
      if (!cost.ok()) return cost.status();
      if (*cost < 0) return replay_error("\"cost_nanos\" is negative");
      absl::StatusOr<std::uint64_t> tokens =
          replay_u64(j, "tokens", std::nullopt);
      if (!tokens.ok()) return tokens.status();
      const auto est = j.find("estimated");
      if (est != j.end() && !est->is_boolean()) {
        return replay_error("\"estimated\" is not a boolean");
      }
      settled = Settlement{Money{*cost}, *tokens,
                           est != j.end() && est->template get<bool>()};
    }
    if (reserve) {
      std::uint64_t seq = 0;
      if (j.find("seq") != j.end()) {
        absl::StatusOr<std::uint64_t> s = replay_u64(j, "seq", std::nullopt);
        if (!s.ok()) return s.status();
        seq = *s;
      } else {
        seq = replay_unnumbered_--;  // a sink without sequence numbers
      }
      ReplayOpen open{id, {}};
      for (const Read& r : read) {
        const std::int64_t p =
            r.period ? *r.period
                     : budgets_[r.b].spec.period->index_of(Nanos{*at});
        replay_change(r.b, r.key, p, r.amount, 0, Nanos{*at});
        open.items.push_back({p, r.amount, r.b, r.key, true});
      }
      if (const auto was = replay_open_.find(seq); was != replay_open_.end()) {
        unpin(was->second);
      }
      pin(open);
      replay_open_[seq] = std::move(open);
      replay_ids_[id].push_back(seq);
      return absl::OkStatus();
    }
    // extend, settle, release: of the reservation named by "of", or (a
    // ledger written before "of") the latest open one of the id.
    std::optional<std::uint64_t> of;
    if (j.find("of") != j.end()) {
      absl::StatusOr<std::uint64_t> o = replay_u64(j, "of", std::nullopt);
      if (!o.ok()) return o.status();
      of = *o;
    } else if (const auto ids = replay_ids_.find(id);
               ids != replay_ids_.end() && !ids->second.empty()) {
      of = ids->second.back();
    }
    ReplayOpen* open = nullptr;
    if (of) {
      const auto found = replay_open_.find(*of);
      if (found != replay_open_.end() && found->second.id == id) {
        open = &found->second;
      }
    }
    for (std::size_t i = 0; i < read.size(); ++i) {
      const Read& r = read[i];
      ReplayItem none{r.period
                          ? *r.period
                          : budgets_[r.b].spec.period->index_of(Nanos{*at}),
                      0, r.b, std::string(), false};
      ReplayItem& held =
          open != nullptr && i < open->items.size() ? open->items[i] : none;
      const std::int64_t p = r.period ? *r.period : held.period;
      const Cost target = extend ? held.held + r.amount : settle ? r.amount : 0;
      replay_change(r.b, r.key, p, target > held.held ? target - held.held : 0,
                    held.held > target ? held.held - target : 0, Nanos{*at});
      held.held = target;
      // issue 18: the burn model learns from the ledger's settlements.
      if (settle)
        burn_->add(r.b, r.key, static_cast<double>(r.amount), Nanos{*t});
    }
    if (extend) return absl::OkStatus();
    if (settled) {
      const auto key = detail::SettledIds::key(id);
      auto& shard = settled_.shard_of(key);
      detail::MutexLock lock(&shard.mu);
      settled_.remember(shard, key, *settled);
    }
    if (of && open != nullptr) {
      unpin(*open);
      replay_open_.erase(*of);
      auto& ids = replay_ids_[id];
      ids.erase(std::remove(ids.begin(), ids.end(), *of), ids.end());
      if (ids.empty()) replay_ids_.erase(id);
    }
    return absl::OkStatus();
  }

  // The latest time of a record replayed (not a checkpoint's: its books
  // carry the time of the records before it).
  template <class Json>
  void note_record_time(const Json& j) {
    if (!j.is_object()) return;
    const auto ev = j.find("event");
    if (ev != j.end() && ev->is_string() &&
        ev->template get<std::string>() == "checkpoint") {
      return;
    }
    absl::StatusOr<std::int64_t> t = replay_i64(j, "t", 0);
    if (t.ok() && Nanos{*t} > replay_now_) replay_now_ = Nanos{*t};
  }

 public:
  // replica
  //
  // A new accountant with this one's prices, clock, store options, budgets
  // (as added) and idempotency window, and nothing spent: what replays a
  // ledger to the same books (LedgerOptions::books: ReplayBooks over it).
  std::unique_ptr<Accountant> replica() const {
    auto a = std::make_unique<Accountant>(prices_, clock_, store_);
    for (const Budget& b : budgets_) static_cast<void>(a->add_budget(b.spec));
    a->settled_.copy_window(settled_);
    static_cast<void>(a->set_forecast_options(burn_->options()));  // issue 18
    return a;
  }

  // max_output_that_fits
  //
  // The largest max_tokens a call of `prompt_tokens` on `model` could
  // reserve now against every budget of `who` (0 when not even the prompt
  // fits): lower max_tokens instead of refusing.
  absl::StatusOr<std::uint64_t> max_output_that_fits(
      const Subject& who, std::string_view model,
      std::uint64_t prompt_tokens) const {
    const Nanos now = clock_.now();
    absl::StatusOr<Prices> p = prices_.prices(model, to_sys(now));
    if (!p.ok()) return p.status();
    std::uint64_t best = kMaxUsageTokens;
    for (const Budget& b : budgets_) {
      std::string key;
      if (absl::Status st = append_subject_key(b.spec.scope, who, key);
          !st.ok()) {
        return st;
      }
      const std::uint64_t left = b.limit->peek(key, 0, now).remaining;
      std::uint64_t n = 0;
      if (b.spec.unit == BudgetUnit::kTokens) {
        if (prompt_tokens > left) return std::uint64_t{0};
        n = left - prompt_tokens;
      } else {
        Usage u;
        u.input_uncached = prompt_tokens;
        const std::optional<std::uint64_t> m = PriceTable::max_output_within(
            *p, u, Money{static_cast<std::int64_t>(left)});
        if (!m) return std::uint64_t{0};
        n = *m;
      }
      best = std::min(best, n);
    }
    return best;
  }

  // set_idempotency_window
  //
  // How many settled request ids are remembered (default 2^18, about four
  // minutes at 1,000 settles a second): within the window a reserve under a
  // settled id is refused and a retried settle returns the first
  // settlement; an id forgotten since is a new call, charged again. Memory is
  // about 90 bytes per id (ids of up to 15 characters; a longer id adds its own
  // allocation). Set before the first reserve.
  void set_idempotency_window(std::size_t ids) { settled_.set_window(ids); }

  // find_settlement
  //
  // The settlement recorded for `request_id` (settled here, or replayed
  // from a ledger), if any.
  std::optional<Settlement> find_settlement(std::string_view request_id) {
    return find_settlement(detail::SettledIds::key(request_id));
  }

  // budget_spec (issue 18, pacing.hpp)
  //
  // The spec of budget `name` as added; kNotFound for an unknown budget.
  absl::StatusOr<BudgetSpec> budget_spec(std::string_view name) const {
    absl::StatusOr<std::size_t> b = budget_index(name);
    if (!b.ok()) return b.status();
    return budgets_[*b].spec;
  }

  // forecast
  //
  // Spend, projection and pacing of budget `name` for `who` now.
  // kNotFound for an unknown budget; kInvalidArgument when `who` lacks the
  // budget's field.
  absl::StatusOr<Forecast> forecast(std::string_view name,
                                    const Subject& who) const {
    absl::StatusOr<std::size_t> b = budget_index(name);
    if (!b.ok()) return b.status();
    const Budget& budget = budgets_[*b];
    std::string key;
    if (absl::Status st = append_subject_key(budget.spec.scope, who, key);
        !st.ok()) {
      return st;
    }
    const Nanos now = clock_.now();
    const Forecast f = detail::forecast_of(
        spent_now(budget, key, now), budget.limit->policy().limit(),
        budget.spec.period->span_of(now), now);
    // issue 18: the burn model's projection (budget/forecast.hpp).
    return detail::with_burn(
        f, burn_->project(*b, key, static_cast<double>(f.spent),
                          static_cast<double>(f.limit), now, f.period_end));
  }

  // learned_profile
  //
  // The weekly profile the burn model learned for `who` on budget `name`
  // from its settlements, once it holds a week of them (nullopt before):
  // what a Pacer with PacingSpec::learn_profile spreads the budget by.
  // kNotFound for an unknown budget; kInvalidArgument when `who` lacks the
  // budget's field.
  absl::StatusOr<std::optional<WeeklyProfile>> learned_profile(
      std::string_view name, const Subject& who) const {
    absl::StatusOr<std::size_t> b = budget_index(name);
    if (!b.ok()) return b.status();
    std::string key;
    if (absl::Status st = append_subject_key(budgets_[*b].spec.scope, who, key);
        !st.ok()) {
      return st;
    }
    return burn_->learned_profile(*b, key, clock_.now());
  }

  // set_forecast_options
  //
  // The burn model's options (history kept, EWMA half-life, band). Set
  // before the first reserve and replay: it forgets what was learned.
  // kInvalidArgument (nothing changed) as check_forecast_options says.
  absl::Status set_forecast_options(const ForecastOptions& o) {
    if (absl::Status st = check_forecast_options(o); !st.ok()) return st;
    burn_ = std::make_unique<BurnBook>(o);
    return absl::OkStatus();
  }

  // reset
  //
  // An administrator's reset: `who`'s spend on budget `name` in the current
  // period starts again from zero (recorded in the ledger as "reset").
  // Reservations open at the reset are forgiven with it: their settlements
  // can no longer take the count below zero. kNotFound for an unknown
  // budget.
  absl::Status reset(std::string_view name, const Subject& who) {
    absl::StatusOr<std::size_t> b = budget_index(name);
    if (!b.ok()) return b.status();
    std::string key;
    if (absl::Status st = append_subject_key(budgets_[*b].spec.scope, who, key);
        !st.ok()) {
      return st;
    }
    const Nanos now = clock_.now();
    const Cost cleared = spent_now(budgets_[*b], key, now);
    if (audit_ != nullptr) {
      std::string f = absl::StrCat("\"event\":\"reset\",\"budget\":");
      detail::append_json_quoted(f, budgets_[*b].spec.name);
      absl::StrAppend(&f, ",\"items\":[{\"b\":", *b, ",\"key\":\"", hex(key),
                      "\",\"amount\":", cleared, "}]");
      if (auto st = audit_->append(f, now); !st.ok()) return st.status();
    }
    // Clears everything counted now, whatever arrived since the peek too.
    change(*b, key, budgets_[*b].spec.period->index_of(now), 0,
           PeriodBudget::kMaxLimit, now);
    return absl::OkStatus();
  }

  // set_budget_limit
  //
  // An administrator's change of budget `name`'s limit, for every subject,
  // from now on (recorded in the ledger as "limit"); what was spent stays
  // spent. kNotFound for an unknown budget; kInvalidArgument for a limit
  // outside 1..2^62.
  absl::Status set_budget_limit(std::string_view name, std::uint64_t limit) {
    absl::StatusOr<std::size_t> b = budget_index(name);
    if (!b.ok()) return b.status();
    absl::StatusOr<PeriodBudget> next =
        PeriodBudget::create(limit, *budgets_[*b].spec.period);
    if (!next.ok()) return next.status();
    if (audit_ != nullptr) {
      std::string f = absl::StrCat("\"event\":\"limit\",\"budget\":");
      detail::append_json_quoted(f, budgets_[*b].spec.name);
      absl::StrAppend(&f, ",\"b\":", *b, ",\"limit\":", limit);
      if (auto st = audit_->append(f, clock_.now()); !st.ok()) {
        return st.status();
      }
    }
    return budgets_[*b].limit->reconfigure(*std::move(next));
  }

  // How many (budget, threshold, key) entries remember a fired threshold:
  // those of ended periods are dropped whenever the count doubles.
  std::size_t threshold_memory() const {
    detail::MutexLock lock(&fired_mu_);
    return fired_.size();
  }

  // The budgets, as limits (for metrics and peeks).
  std::vector<Limit*> budgets() const {
    std::vector<Limit*> out;
    for (const Budget& b : budgets_) out.push_back(b.limit.get());
    return out;
  }

  const PriceTable& prices() const noexcept { return prices_; }

 private:
  friend class Reservation<C>;

  struct Budget {
    BudgetSpec spec;
    std::unique_ptr<PolicyLimit<PeriodBudget>> limit;
  };

  // Budget stores never evict or forget spend while its period is open: a
  // full one refuses subjects it does not hold (kDenyNew); idle states
  // (nothing spent this period) are still reclaimed.
  std::optional<Settlement> find_settlement(
      const detail::SettledIds::Key& key) {
    auto& shard = settled_.shard_of(key);
    detail::MutexLock lock(&shard.mu);
    const Settlement* s = detail::SettledIds::find(shard, key);
    if (s == nullptr) return std::nullopt;
    return *s;
  }

  static ShardedOptions budget_store(ShardedOptions o) {
    o.when_full = WhenFull::kDenyNew;
    return o;
  }

  // A refusal by a budget whose store is full (the subject is not held and
  // the store has refused new keys): kResourceExhausted naming the budget
  // and its capacity, rather than a refusal that looks like spent money.
  // Otherwise OK (an ordinary refusal).
  absl::Status full_budget_store(const Reservation<C>& r, Nanos now) const {
    for (std::size_t i = 0; i < r.items_.size(); ++i) {
      const auto& it = r.items_[i];
      // Only the budget that refused the call: a refusal by a rate limit
      // (or another budget) is an ordinary one, whatever this store's
      // history (an examiner found a rate limit's refusal of a new subject
      // reported as a full store once the store had been full before).
      if (r.decision_.binding != r.first_budget_ + i) continue;
      auto* limit = static_cast<PolicyLimit<PeriodBudget>*>(it.limit);
      auto& store = limit->store();
      if (store.stats().denied_full == 0) continue;
      if (store.probe_distance(it.key).has_value()) continue;
      // Not held: a fresh state would admit the hold unless it exceeds the
      // limit itself (then it is an ordinary refusal).
      if (!limit->peek(it.key, it.held, now).allowed) continue;
      if (const auto& kb = store.options().key_budget;
          kb != nullptr && kb->available() == 0) {
        return absl::ResourceExhaustedError(absl::StrCat(
            "budget \"", limit->name(),
            "\": the key budget its store shares is spent (", kb->capacity(),
            " live keys across its stores, ShardedOptions::key_budget); "
            "spend is never evicted, so new subjects are refused until keys "
            "go idle or the key budget is raised"));
      }
      return absl::ResourceExhaustedError(absl::StrCat(
          "budget \"", limit->name(), "\": its store is full (capacity ",
          store.options().capacity,
          " subjects, none idle this period); spend is never evicted, so "
          "new subjects are refused until a period ends or capacity is "
          "raised (ShardedOptions::capacity)"));
    }
    return absl::OkStatus();
  }

  static SysTime to_sys(Nanos n) {
    return SysTime(std::chrono::duration_cast<SysTime::duration>(n));
  }

  // What `used` costs, in each item's unit.
  absl::StatusOr<Settlement> price(const Reservation<C>& r,
                                   const Usage& used) const {
    absl::StatusOr<Money> cost = PriceTable::cost(r.prices_, used);
    if (!cost.ok()) return cost.status();
    return Settlement{*cost, used.total(),
                      used.source != UsageSource::kReported};
  }

  // Records the settlement of `r` with the shard of its id locked (the
  // first settle of an id wins), waits for its record to be durable with no
  // lock held (so that one group sync covers the settles of every shard
  // written meanwhile), then applies it to the budgets. A sync error applies
  // nothing: `r` keeps its holds until released, and the ledger refuses
  // every later record.
  absl::StatusOr<Settlement> settle_reservation(Reservation<C>& r,
                                                const Usage& used) {
    std::uint64_t seq = 0;
    bool fresh = false;
    absl::StatusOr<Settlement> s = settle_locked(r, used, seq, fresh);
    if (!s.ok()) return s;
    if (seq != 0 && audit_ != nullptr) {
      if (absl::Status st = audit_->wait_durable(seq); !st.ok()) {
        // Never durable: nothing of it is applied, and the id is unsettled
        // again, so that a retry is refused by the failed ledger rather
        // than answered with this settlement (and the hold given back).
        if (fresh) {
          const auto key = detail::SettledIds::key(r.request_id_);
          auto& shard = settled_.shard_of(key);
          detail::MutexLock lock(&shard.mu);
          detail::SettledIds::revoke(shard, key);
        }
        return st;
      }
    }
    if (fresh) apply_settlement(r, *s);
    return s;
  }

  // `seq`: the record written (0: none); `fresh`: a new settlement, to be
  // applied.
  absl::StatusOr<Settlement> settle_locked(Reservation<C>& r, const Usage& used,
                                           std::uint64_t& seq, bool& fresh) {
    const auto key = detail::SettledIds::key(r.request_id_);
    auto& shard = settled_.shard_of(key);
    detail::MutexLock lock(&shard.mu);
    if (const Settlement* first = detail::SettledIds::find(shard, key);
        first != nullptr) {
      // Settled already (a retried settle, or two reservations of one id in
      // flight at once): this reservation's holds go back, the first
      // settlement stands (rules.hpp, rule 3: a duplicate settles every
      // hold to detail::settle_target(true, ...), nothing). Returned once
      // durable: the release record, written after the first settle's, is
      // waited for.
      seq = give_back(r);
      return *first;
    }
    if (r.done_) {
      return absl::FailedPreconditionError("settle: already released");
    }
    absl::StatusOr<Settlement> s = price(r, used);
    if (!s.ok()) return s.status();
    if (audit_ != nullptr) {
      const Nanos now = clock_.now();
      std::string f = record_head("settle", r);
      absl::StrAppend(
          &f, ",\"cost_nanos\":", s->cost.nanos, ",\"tokens\":", s->tokens,
          ",\"estimated\":", s->estimated ? "true" : "false",
          ",\"input\":", used.input_uncached,
          ",\"cache_read\":", used.cache_read,
          ",\"cache_write\":", used.cache_write_5m + used.cache_write_1h,
          ",\"output\":", used.output);
      append_items(f, r, [&](const auto& it) {
        return detail::budget_amount(it.money, s->cost, s->tokens);
      });
      // Written here, in the order of this id's settles; the caller waits
      // for it to be durable once the lock is released. A write error
      // applies nothing; a sync error, after, is returned (the ledger then
      // refuses every later record, so nothing more is granted).
      absl::StatusOr<std::uint64_t> w = audit_->append_nowait(f, now);
      if (!w.ok()) return w.status();
      seq = *w;
    }
    settled_.remember(shard, key, *s);
    fresh = true;
    return *s;
  }

  // Applies a recorded settlement to the budgets and rate limits of `r`
  // (only its owner's thread touches `r`; the limits are thread-safe).
  void apply_settlement(Reservation<C>& r, const Settlement& settled) {
    const Settlement* s = &settled;
    // A call's spend belongs to the period it was reserved in: each budget's
    // receipts carry that period, in both directions (PeriodBudget::settle;
    // rules.hpp, rule 2).
    const Nanos now = clock_.now();
    for (std::size_t i = 0; i < r.items_.size(); ++i) {
      auto& it = r.items_[i];
      const Cost actual = detail::settle_target(false, it.money, *s);
      const std::optional<Decision> d = settle_item(r, i, actual, now);
      if (d && actual > it.held && on_threshold_ &&
          detail::fires_now(it.period,
                            budgets_[i].spec.period->index_of(now))) {
        // An overage counted in the period now open fires its thresholds
        // (one that landed in a closed period changes nothing now), with
        // the spend itself (a Decision's remaining stops at the limit).
        const std::uint64_t after = spent_now(budgets_[i], it.key, now);
        const std::uint64_t extra = actual - it.held;
        fire_crossed(i, it.key, after >= extra ? after - extra : 0, after,
                     d->limit, now);
      }
      it.held = actual;
      // issue 18: the burn model learns each budget's settled amount.
      burn_->add(i, it.key, static_cast<double>(actual), now);
    }
    // The rate limits, each to its unit's amount (detail::limit_target).
    for (std::size_t i = 0; i < r.first_budget_; ++i) {
      LimitResult& lr = r.decision_.results[i];
      if (!lr.receipt) continue;
      if (const auto to = detail::limit_target(false, lr.limit->unit(), *s)) {
        static_cast<void>(chain_.settle(r.decision_, i, *to));
      } else {
        lr.receipt = Receipt();  // the request happened: it stays counted
      }
    }
    r.done_ = true;
  }

  // Settles budget `i` of `r` to `actual` through its receipts (the
  // reserve's, then each extension's): the give-backs bounded by each
  // receipt, the excess, if any, on the last. Returns the last settle's
  // decision.
  std::optional<Decision> settle_item(Reservation<C>& r, std::size_t i,
                                      Cost actual, Nanos now) {
    auto& it = r.items_[i];
    std::optional<Decision> last;
    Cost left = actual;
    const auto one = [&](Receipt& receipt, bool is_last) {
      if (!receipt) return;
      const Cost to = is_last ? left : std::min(left, receipt.cost());
      left -= to;
      absl::StatusOr<Decision> d = it.limit->settle(receipt, to, now);
      if (d.ok()) last = *d;
    };
    LimitResult& lr = r.decision_.results[r.first_budget_ + i];
    one(lr.receipt, it.more.empty());
    lr.counted = actual != 0;
    for (std::size_t k = 0; k < it.more.size(); ++k) {
      one(it.more[k], k + 1 == it.more.size());
    }
    it.more.clear();
    if (last) {
      lr.decision.remaining = last->remaining;
      lr.decision.reset_after = last->reset_after;
    }
    return last;
  }

  void release_reservation(Reservation<C>& r) noexcept {
    auto& shard = settled_.shard_of(detail::SettledIds::key(r.request_id_));
    detail::MutexLock lock(&shard.mu);
    static_cast<void>(give_back(r));
  }

  // Gives back everything `r` holds, through its receipts: the budgets (to
  // the period each was counted in) and the rate limits passed to
  // reserve(). The shard of its id locked (a settle of the same id through
  // another reservation waits).
  // Returns the release record's sequence number (0: none written).
  std::uint64_t give_back(Reservation<C>& r) noexcept {
    if (r.done_) return 0;
    std::uint64_t seq = 0;
    const Nanos now = clock_.now();
    if (audit_ != nullptr) {
      std::string f = record_head("release", r);
      append_items(f, r, [](const auto& it) { return it.held; });
      // A release that cannot be recorded is still applied: holding the
      // budget forever would be worse, and replay of a ledger without it
      // keeps the reservation held (the conservative side). Written, not
      // waited for (it gives money back).
      absl::StatusOr<std::uint64_t> w = audit_->append_nowait(f, now);
      if (w.ok()) seq = *w;
    }
    for (std::size_t i = 0; i < r.items_.size(); ++i) {
      static_cast<void>(settle_item(r, i, 0, now));
      r.items_[i].held = 0;
    }
    chain_.give_back(r.decision_);  // the rate limits' receipts
    r.done_ = true;
    return seq;
  }

  absl::StatusOr<bool> extend(Reservation<C>& r, std::uint64_t output) {
    Usage u;
    u.input_uncached = r.estimate_.prompt_tokens;
    u.output = output;
    absl::StatusOr<Settlement> s = price(r, u);
    if (!s.ok()) return s.status();
    absl::InlinedVector<ChainItem, 8> more;
    absl::InlinedVector<std::size_t, 8> which;  // r.items_ index of each
    absl::InlinedVector<Cost, 8> add;
    for (std::size_t i = 0; i < r.items_.size(); ++i) {
      const auto& it = r.items_[i];
      add.push_back(detail::growth(
          it.held, detail::budget_amount(it.money, s->cost, s->tokens)));
      if (add.back() != 0) {
        more.push_back({it.limit, it.key, add.back()});
        which.push_back(i);
      }
    }
    if (more.empty()) return true;
    // Like settle: in the period of the reservation, judged against what
    // that period has left. A take at the reservation's time counts in that
    // period while it is the key's current one; once a later period has
    // spend on the key, the take would land in the later one (its receipt's
    // placement says so): given back at once, and the stream is cut
    // (rules.hpp, rule 2: detail::may_grow). Its own period's room is no
    // longer known, and a call of yesterday never spends today's budget.
    const Nanos at = r.decision_.at;
    ChainDecision d = chain_.acquire_at(std::span<const ChainItem>(more), at);
    if (!d.allowed) return false;
    for (std::size_t j = 0; j < more.size(); ++j) {
      const std::int64_t p =
          d.results[j]
              .receipt.template placement<PeriodBudget::Placement>()
              .period;
      if (!detail::may_grow(p, r.items_[which[j]].period)) {
        chain_.give_back(d);
        return false;
      }
    }
    if (audit_ != nullptr) {
      std::string f = record_head("extend", r);
      std::size_t i = 0;
      append_items(f, r, [&](const auto&) { return add[i++]; });
      if (auto st = audit_->append(f, clock_.now()); !st.ok()) {
        chain_.give_back(d);
        return st.status();
      }
    }
    for (std::size_t j = 0; j < more.size(); ++j) {
      r.items_[which[j]].more.push_back(std::move(d.results[j].receipt));
    }
    for (std::size_t i = 0; i < r.items_.size(); ++i) {
      r.items_[i].held += add[i];
    }
    if (on_threshold_) {
      const Nanos now = clock_.now();
      for (std::size_t j = 0; j < more.size(); ++j) {
        // Growth of a reservation whose period has ended fires nothing now
        // (rules.hpp, rule 4).
        if (!detail::fires_now(r.items_[which[j]].period,
                               budgets_[which[j]].spec.period->index_of(now))) {
          continue;
        }
        const Decision& dj = d.results[j].decision;
        const std::uint64_t after = dj.limit - dj.remaining;
        fire_crossed(which[j], more[j].key,
                     after >= more[j].cost ? after - more[j].cost : 0, after,
                     dj.limit, at);
      }
    }
    return true;
  }

  // What `key` has spent on `budget` in the period holding `now`, exactly
  // (a Decision's remaining stops at 0: an overage settled past the limit
  // would not show).
  struct SpentOp : detail::OpBase<PeriodBudget> {
    Step<PeriodBudget::State> operator()(const PeriodBudget::State& s) const {
      const std::int64_t p = policy->period().index_of(now);
      return {s, Decision{true, policy->limit(), s.period >= p ? s.spent : 0,
                          Nanos{0}, Nanos{0}}};
    }
  };
  static std::uint64_t spent_now(const Budget& budget, std::string_view key,
                                 Nanos now) {
    const SpentOp op{{&budget.limit->policy(), now}};
    return budget.limit->store().peek(key, op).remaining;
  }

  // change
  //
  // Adds `add` to, or gives back `give` from, what `key` spent on budget `b`
  // in period `period`, through the budget's own receipts: PeriodBudget's
  // settle of a take placed in that period (dropped once a later period
  // opened on the key, never below zero). For an administrator's reset and
  // for replay, which apply amounts the ledger recorded, not takes.
  void change(std::size_t b, std::string_view key, std::int64_t period,
              Cost add, Cost give, Nanos now) {
    PolicyLimit<PeriodBudget>* l = budgets_[b].limit.get();
    if (add != 0) {
      Receipt r = Receipt::issue(l, key, 0, now,
                                 PeriodBudget::Placement{period}, l->serial());
      static_cast<void>(l->settle(r, add, now));
    }
    if (give != 0) {
      Receipt r = Receipt::issue(l, key, give, now,
                                 PeriodBudget::Placement{period}, l->serial());
      static_cast<void>(l->settle(r, 0, now));
    }
  }

  // change() from replay: the subject is remembered for checkpoint_books.
  void replay_change(std::size_t b, const std::string& key, std::int64_t period,
                     Cost add, Cost give, Nanos now) {
    if (replay_keys_.size() <= b) replay_keys_.resize(budgets_.size());
    replay_keys_[b].insert(key);
    const auto pinned =
        pins_.empty() ? pins_.end() : pins_.find(std::make_pair(b, key));
    if (pinned != pins_.end()) restore(b, key, pinned->second.state, now);
    change(b, key, period, add, give, now);
    if (pinned != pins_.end()) {
      pinned->second.state = raw_state(budgets_[b], key, now);
    }
  }

  // The state `key` holds on `budget` as stored (its period and spend).
  struct RawOp : detail::OpBase<PeriodBudget> {
    PeriodBudget::State* out = nullptr;
    Step<PeriodBudget::State> operator()(const PeriodBudget::State& s) const {
      *out = s;
      return {s, Decision{true, 0, 0, Nanos{0}, Nanos{0}}};
    }
  };
  static PeriodBudget::State raw_state(const Budget& budget,
                                       std::string_view key, Nanos now) {
    PeriodBudget::State st;
    RawOp op{{&budget.limit->policy(), now}, &st};
    static_cast<void>(budget.limit->store().peek(key, op));
    return st;
  }

  // Loads the books of a checkpoint record (checkpoint_books' form),
  // checking every field first: kInvalidArgument, with nothing applied,
  // for books it cannot read.
  template <class Json>
  absl::Status load_books(const Json& books) {
    if (!books.is_object())
      return replay_error("checkpoint books: not an object");
    const auto bs = books.find("budgets");
    const auto os = books.find("open");
    const auto ss = books.find("settled");
    if (bs == books.end() || !bs->is_array() || os == books.end() ||
        !os->is_array() || ss == books.end() || !ss->is_array()) {
      return replay_error("checkpoint books: budgets, open, settled arrays");
    }
    struct Key {
      std::size_t b;
      std::string key;
      std::int64_t period;
      std::uint64_t spent;
    };
    std::vector<Key> keys;
    std::vector<std::pair<std::size_t, std::uint64_t>> limits;

    auto u64 = [](const Json& v) -> std::optional<std::uint64_t> {
      if (v.is_number_unsigned()) return v.template get<std::uint64_t>();
      if (v.is_number_integer() && v.template get<std::int64_t>() >= 0) {
        return static_cast<std::uint64_t>(v.template get<std::int64_t>());
      }
      return std::nullopt;
    };
    auto i64 = [](const Json& v) -> std::optional<std::int64_t> {
      if (v.is_number_integer() && !v.is_number_unsigned()) {
        return v.template get<std::int64_t>();
      }
      if (v.is_number_unsigned() && v.template get<std::uint64_t>() <=
                                        static_cast<std::uint64_t>(INT64_MAX)) {
        return static_cast<std::int64_t>(v.template get<std::uint64_t>());
      }
      return std::nullopt;
    };
    // "now": the latest record time before the checkpoint (0 when absent,
    // as in checkpoints written before it was).
    std::int64_t books_now = 0;
    if (const auto n = books.find("now"); n != books.end()) {
      const std::optional<std::int64_t> t = i64(*n);
      if (!t) return replay_error("checkpoint books: \"now\" is not a time");
      books_now = *t;
    }
    for (const auto& bj : *bs) {
      if (!bj.is_object()) return replay_error("checkpoint books: a budget");
      absl::StatusOr<std::uint64_t> b = replay_u64(bj, "b", std::nullopt);
      if (!b.ok()) return b.status();
      if (*b >= budgets_.size()) return replay_error("unknown budget");
      absl::StatusOr<std::uint64_t> limit =
          replay_u64(bj, "limit", std::nullopt);
      if (!limit.ok()) return limit.status();
      limits.emplace_back(static_cast<std::size_t>(*b), *limit);
      const auto ks = bj.find("keys");
      if (ks == bj.end() || !ks->is_array()) {
        return replay_error("checkpoint books: a budget without keys");
      }
      for (const auto& k : *ks) {
        if (!k.is_array() || k.size() != 3 || !k[0].is_string()) {
          return replay_error("checkpoint books: a key is not [hex,p,n]");
        }
        std::optional<std::string> bytes =
            unhex(k[0].template get<std::string>());
        const std::optional<std::int64_t> p = i64(k[1]);
        const std::optional<std::uint64_t> n = u64(k[2]);
        if (!bytes || !p || !n) {
          return replay_error("checkpoint books: a key is not [hex,p,n]");
        }
        keys.push_back(
            {static_cast<std::size_t>(*b), *std::move(bytes), *p, *n});
      }
    }
    struct Open {
      std::uint64_t of;
      std::string id;
      std::vector<ReplayItem> items;
    };
    std::vector<Open> open;
    for (const auto& o : *os) {
      if (!o.is_object()) return replay_error("checkpoint books: an open");
      absl::StatusOr<std::uint64_t> of = replay_u64(o, "of", std::nullopt);
      if (!of.ok()) return of.status();
      const auto id = o.find("request");
      const auto items = o.find("items");
      if (id == o.end() || !id->is_string() || items == o.end() ||
          !items->is_array()) {
        return replay_error("checkpoint books: an open reservation");
      }
      Open x{*of, id->template get<std::string>(), {}};
      for (const auto& it : *items) {
        // [period, held], or [period, held, b, "<hex key>"].
        if (!it.is_array() || (it.size() != 2 && it.size() != 4)) {
          return replay_error("checkpoint books: an open item");
        }
        const std::optional<std::int64_t> p = i64(it[0]);
        const std::optional<std::uint64_t> n = u64(it[1]);
        if (!p || !n) return replay_error("checkpoint books: an open item");
        ReplayItem item{*p, *n, 0, std::string(), false};
        if (it.size() == 4) {
          const std::optional<std::uint64_t> b = u64(it[2]);
          std::optional<std::string> bytes;
          if (it[3].is_string()) {
            bytes = unhex(it[3].template get<std::string>());
          }
          if (!b || *b >= budgets_.size() || !bytes) {
            return replay_error("checkpoint books: an open item");
          }
          item.b = static_cast<std::size_t>(*b);
          item.key = *std::move(bytes);
          item.keyed = true;
        }
        x.items.push_back(std::move(item));
      }
      open.push_back(std::move(x));
    }
    std::vector<std::pair<std::string, Settlement>> settled;
    for (const auto& e : *ss) {
      if (!e.is_array() || e.size() != 4 || !e[0].is_string() ||
          !e[3].is_boolean()) {
        return replay_error("checkpoint books: a settled id");
      }
      const std::optional<std::int64_t> cost = i64(e[1]);
      const std::optional<std::uint64_t> tokens = u64(e[2]);
      if (!cost || *cost < 0 || !tokens) {
        return replay_error("checkpoint books: a settled id");
      }
      settled.emplace_back(
          e[0].template get<std::string>(),
          Settlement{Money{*cost}, *tokens, e[3].template get<bool>()});
    }
    for (const auto& [b, limit] : limits) {
      if (limit == budgets_[b].limit->policy().limit()) continue;
      absl::StatusOr<PeriodBudget> next =
          PeriodBudget::create(limit, *budgets_[b].spec.period);
      if (!next.ok()) return next.status();
      if (absl::Status st = budgets_[b].limit->reconfigure(*std::move(next));
          !st.ok()) {
        return st;
      }
    }
    if (Nanos{books_now} > replay_now_) replay_now_ = Nanos{books_now};
    const Nanos now = clock_.now();
    for (const Key& k : keys) {
      // A fresh state {0, 0} becomes {period, spent}: a settle of `spent`
      // placed in that period, or a give-back of 1 when nothing was spent.
      replay_change(k.b, k.key, k.period, k.spent, k.spent == 0 ? 1 : 0, now);
    }
    for (Open& o : open) {
      replay_ids_[o.id].push_back(o.of);
      ReplayOpen x{std::move(o.id), std::move(o.items)};
      if (const auto was = replay_open_.find(o.of); was != replay_open_.end()) {
        unpin(was->second);
      }
      pin(x);
      replay_open_[o.of] = std::move(x);
    }
    for (const auto& [id, s] : settled) {
      const auto key = detail::SettledIds::key(id);
      auto& shard = settled_.shard_of(key);
      detail::MutexLock lock(&shard.mu);
      settled_.remember(shard, key, s);
    }
    return absl::OkStatus();
  }

  static absl::Status replay_error(std::string_view why) {
    return absl::InvalidArgumentError(
        absl::StrCat("ledger record: ", detail::av(why)));
  }
  // Field `name` of `j` as an unsigned integer (`fallback` when absent, an
  // error when absent without one): never a negative or fractional number
  // read as a huge one.
  template <class Json>
  static absl::StatusOr<std::uint64_t> replay_u64(
      const Json& j, const char* name, std::optional<std::uint64_t> fallback) {
    const auto it = j.find(name);
    if (it == j.end()) {
      if (fallback) return *fallback;
      return replay_error(absl::StrCat("no \"", name, "\""));
    }
    if (it->is_number_unsigned()) return it->template get<std::uint64_t>();
    if (it->is_number_integer() && it->template get<std::int64_t>() >= 0) {
      return static_cast<std::uint64_t>(it->template get<std::int64_t>());
    }
    return replay_error(
        absl::StrCat("\"", name, "\" is not a non-negative integer"));
  }
  template <class Json>
  static absl::StatusOr<std::int64_t> replay_i64(
      const Json& j, const char* name, std::optional<std::int64_t> fallback) {
    const auto it = j.find(name);
    if (it == j.end()) {
      if (fallback) return *fallback;
      return replay_error(absl::StrCat("no \"", name, "\""));
    }
    if (it->is_number_unsigned()) {
      const auto u = it->template get<std::uint64_t>();
      if (u <= static_cast<std::uint64_t>(INT64_MAX)) {
        return static_cast<std::int64_t>(u);
      }
    } else if (it->is_number_integer()) {
      return it->template get<std::int64_t>();
    }
    return replay_error(absl::StrCat("\"", name, "\" is not a 64-bit integer"));
  }

  static absl::Status check_text(const char* what, std::string_view v) {
    if (v.empty() || v.size() > 256) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, " must be 1 to 256 characters"));
    }
    for (const char c : v) {
      if (c < 0x20 || c > 0x7E) {
        return absl::InvalidArgumentError(absl::StrCat(
            what, " must be printable ASCII (it is written to the ledger)"));
      }
    }
    return absl::OkStatus();
  }

  // "event", "request", "model"; for a record about a granted reservation
  // (extend, settle, release) also "of", the sequence number of its reserve
  // record (one id may be reserved twice at once), and "at", its time.
  // --- issue 18, what-if replay (tools/whatif.cpp, budget/replay.hpp) ---
  // Reserve and deny records end with what a replay against other limits
  // needs: ,"tier":"<set_audit_tier>" (when set), ,"subject":{"user":..,..}
  // (every field of the caller but api_key, which is a secret; empty ones
  // left out), and on a deny the estimate (,"prompt":P,"max_output":M: a
  // reserve has them already). Readers ignore fields they do not know.
 public:
  // The tier named in this accountant's reserve and deny records (one
  // accountant per tier, as examples/gateway_demo.cpp has). Set before the
  // first reserve.
  void set_audit_tier(std::string tier) { audit_tier_ = std::move(tier); }

  // record_refusal
  //
  // A call refused before it reached reserve() (a Pacer's pace or graded
  // deny), written to the ledger as a "deny" record like the accountant's
  // own, with `binding` naming what refused it: the audit trail and a
  // what-if replay see every attempt. Nothing is held or counted. Without
  // a ledger (set_audit) it does nothing; kInvalidArgument for a request
  // id or model that is not printable ASCII (nothing written).
  absl::Status record_refusal(const Subject& who, std::string_view model,
                              const Estimate& e, std::string_view request_id,
                              std::string_view binding) {
    if (audit_ == nullptr) return absl::OkStatus();
    if (absl::Status st = check_text("request id", request_id); !st.ok()) {
      return st;
    }
    if (absl::Status st = check_text("model", model); !st.ok()) return st;
    std::string f = "\"event\":\"deny\",\"request\":";
    detail::append_json_quoted(f, request_id);
    f += ",\"model\":";
    detail::append_json_quoted(f, model);
    f += ",\"binding\":";
    detail::append_json_quoted(f, binding);
    append_call(f, who, &e);
    if (auto st = audit_->append_nowait(f, clock_.now()); !st.ok()) {
      return st.status();
    }
    return absl::OkStatus();
  }

 private:
  void append_call(std::string& f, const Subject& who,
                   const Estimate* deny_estimate) const {
    if (deny_estimate != nullptr) {
      absl::StrAppend(&f, ",\"prompt\":", deny_estimate->prompt_tokens,
                      ",\"max_output\":", deny_estimate->max_output_tokens);
    }
    if (!audit_tier_.empty()) {
      f += ",\"tier\":";
      detail::append_json_quoted(f, audit_tier_);
    }
    f += ",\"subject\":{";
    bool first = true;
    for (const Field field : kAllFields) {
      if (field == Field::kApiKey || who.get(field).empty()) continue;
      absl::StrAppend(&f, first ? "\"" : ",\"", detail::av(field_name(field)),
                      "\":");
      detail::append_json_quoted(f, who.get(field));
      first = false;
    }
    f += "}";
  }
  std::string audit_tier_;
  // --- end issue 18, what-if replay ---

  static std::string record_head(const char* event, const Reservation<C>& r) {
    std::string f = absl::StrCat("\"event\":\"", event, "\",\"request\":");
    detail::append_json_quoted(f, r.request_id_);
    f += ",\"model\":";
    detail::append_json_quoted(f, r.model_);
    const std::string_view ev(event);
    if (ev != "reserve" && ev != "deny") {
      absl::StrAppend(&f, ",\"of\":", r.seq_,
                      ",\"at\":", r.decision_.at.count());
    }
    return f;
  }

  // ,"items":[{"b":<budget index>,"key":"<hex>","period":P,"amount":N},...]
  // P: the index of the period the reservation counts in, for that budget.
  template <class Amount>
  void append_items(std::string& f, const Reservation<C>& r,
                    const Amount& amount) const {
    f += ",\"items\":[";
    for (std::size_t i = 0; i < r.items_.size(); ++i) {
      const auto& it = r.items_[i];
      absl::StrAppend(&f, i == 0 ? "" : ",", "{\"b\":", i, ",\"key\":\"",
                      hex(it.key), "\",\"period\":", it.period,
                      ",\"amount\":", amount(it), "}");
    }
    f += "]";
  }

  absl::StatusOr<std::size_t> budget_index(std::string_view name) const {
    for (std::size_t i = 0; i < budgets_.size(); ++i) {
      if (budgets_[i].spec.name == name) return i;
    }
    return absl::NotFoundError(
        absl::StrCat("no budget named \"", detail::av(name), "\""));
  }

  static std::string hex(std::string_view bytes) { return detail::hex(bytes); }
  static std::optional<std::string> unhex(std::string_view h) {
    return detail::unhex(h);
  }

  // Fires each soft threshold that this reservation's take crossed.
  void check_thresholds(const Reservation<C>& r, Nanos now) {
    if (!on_threshold_) return;
    const std::size_t first = r.decision_.results.size() - r.items_.size();
    for (std::size_t i = 0; i < r.items_.size(); ++i) {
      const Decision& d = r.decision_.results[first + i].decision;
      const std::uint64_t after = d.limit - d.remaining;
      fire_crossed(i, r.items_[i].key,
                   after >= r.items_[i].held ? after - r.items_[i].held : 0,
                   after, d.limit, now);
    }
  }

  // Fires budget `b`'s thresholds that its spend crossed going from
  // `before` to `after` (of `limit`) at `at`: once per key and period.
  void fire_crossed(std::size_t b, std::string_view key, std::uint64_t before,
                    std::uint64_t after, std::uint64_t limit, Nanos at) {
    const BudgetSpec& spec = budgets_[b].spec;
    for (const std::uint32_t t : spec.soft_permille) {
      if (!detail::crosses(before, after, limit, t)) continue;
      const std::int64_t period = spec.period->index_of(at);
      bool fire = false;
      {
        detail::MutexLock lock(&fired_mu_);
        auto [it, fresh] = fired_.try_emplace(
            absl::StrCat(b, "/", t, "/", detail::av(key)), Fired{period, b});
        if (fresh || it->second.period < period) {
          it->second.period = period;
          fire = true;
        }
        if (fresh && fired_.size() >= prune_at_) prune_fired(at);
      }
      if (fire) {
        on_threshold_(
            ThresholdEvent{spec.name, std::string(key), t, after, limit});
      }
    }
  }

  // Forgets the thresholds fired in periods that have ended; fired_mu_
  // held. Amortised: the map is pruned when it doubles.
  void prune_fired(Nanos now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(fired_mu_) {
    absl::erase_if(fired_, [&](const auto& e) {
      return e.second.period <
             budgets_[e.second.budget].spec.period->index_of(now);
    });
    prune_at_ = std::max<std::size_t>(4096, 2 * fired_.size());
  }

  struct Fired {
    std::int64_t period = 0;
    std::size_t budget = 0;
  };

  PriceTable prices_;
  Chain<C> chain_;
  C clock_;
  ShardedOptions store_;
  std::deque<Budget> budgets_;
  ThresholdCallback on_threshold_;
  detail::SettledIds settled_;
  std::unique_ptr<BurnBook> burn_ = std::make_unique<BurnBook>();  // issue 18
  mutable detail::Mutex fired_mu_;
  // "budget/permille/key" -> the period it last fired in.
  absl::flat_hash_map<std::string, Fired> fired_ ABSL_GUARDED_BY(fired_mu_);
  std::size_t prune_at_ ABSL_GUARDED_BY(fired_mu_) = 4096;
  AuditSink* audit_ = nullptr;
  // Replay only (single-threaded, before serving): each open reservation
  // by the sequence number of its reserve record, what it holds per budget
  // and in which period; and the open reservations of each id.
  struct ReplayItem {
    std::int64_t period = 0;
    Cost held = 0;
    std::size_t b = 0;  // the budget and subject (when keyed: an item
    std::string key;    // loaded from an older checkpoint has neither)
    bool keyed = false;
  };
  struct ReplayOpen {
    std::string id;
    std::vector<ReplayItem> items;
  };
  // Pins: the state of each subject an open reservation holds on (replay
  // only). The store may reclaim a state once its period has ended (it is
  // then as good as never seen for the open period); a late settle of that
  // reservation goes to the ended period, so replay keeps the state here
  // and puts it back when the store has let it go.
  struct Pin {
    std::size_t refs = 0;
    PeriodBudget::State state;
  };
  void pin(const ReplayOpen& open) {
    for (const ReplayItem& it : open.items) {
      if (!it.keyed || it.b >= budgets_.size()) continue;
      Pin& p = pins_[std::make_pair(it.b, it.key)];
      if (p.refs++ == 0) p.state = raw_state(budgets_[it.b], it.key, Nanos{0});
    }
  }
  void unpin(const ReplayOpen& open) {
    for (const ReplayItem& it : open.items) {
      if (!it.keyed) continue;
      const auto p = pins_.find(std::make_pair(it.b, it.key));
      if (p != pins_.end() && --p->second.refs == 0) pins_.erase(p);
    }
  }
  // Puts pinned state `st` back where the store no longer holds it
  // (reclaimed, or evicted and replaced by a summary cell).
  struct SetOp : detail::OpBase<PeriodBudget> {
    PeriodBudget::State to;
    Step<PeriodBudget::State> operator()(const PeriodBudget::State&) const {
      return {to, Decision{true, 0, 0, Nanos{0}, Nanos{0}}};
    }
  };
  void restore(std::size_t b, const std::string& key,
               const PeriodBudget::State& st, Nanos now) {
    if (raw_state(budgets_[b], key, now) == st) return;
    const SetOp op{{&budgets_[b].limit->policy(), now}, st};
    static_cast<void>(budgets_[b].limit->store().apply(key, op));
  }
  absl::flat_hash_map<std::uint64_t, ReplayOpen> replay_open_;
  absl::flat_hash_map<std::string, std::vector<std::uint64_t>> replay_ids_;
  std::uint64_t replay_unnumbered_ = ~std::uint64_t{0};
  // Each budget's subjects that replay changed (for checkpoint_books; those
  // it drops are forgotten until changed again).
  std::vector<absl::flat_hash_set<std::string>> replay_keys_;
  // Pinned states by budget and subject (see Pin).
  absl::flat_hash_map<std::pair<std::size_t, std::string>, Pin> pins_;
  // The latest record time replayed (checkpoint_books' "now").
  Nanos replay_now_{0};
};

}  // namespace ratekeeper

#endif  // RATEKEEPER_BUDGET_ACCOUNTANT_HPP_
