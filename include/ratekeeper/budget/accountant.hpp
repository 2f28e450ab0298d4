// ratekeeper/budget/accountant.hpp: reserve before a call, settle after it.
//
// Defines BudgetSpec (a budget in money or tokens, per subject scope and
// period, with soft thresholds), Estimate (the worst case of a call), and
// Accountant, whose reserve() holds the worst case against every budget
// (and any rate limits given) all or nothing and returns an RAII
// Reservation; settle(usage) charges what was used, exactly once per
// request id; a reservation dropped unsettled gives everything back.
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

#include <array>
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
#include "ratekeeper/budget/money.hpp"
#include "ratekeeper/budget/period.hpp"
#include "ratekeeper/budget/prices.hpp"
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

// Estimate: the worst case of a call before it is made.
struct Estimate {
  std::uint64_t prompt_tokens = 0;      // estimated input
  std::uint64_t max_output_tokens = 0;  // the request's max_tokens
};

// Settlement: what a call was charged.
struct Settlement {
  Money cost;
  std::uint64_t tokens = 0;
  bool estimated = false;  // no usage from the provider: the counted estimate
  friend bool operator==(const Settlement&, const Settlement&) = default;
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
struct Forecast {
  std::uint64_t spent = 0;
  std::uint64_t limit = 0;
  Nanos now{0};
  Nanos period_start{0};
  Nanos period_end{0};
  std::uint64_t projected = 0;
  std::optional<Nanos> exhausts_at{};
  std::uint64_t pace_per_hour = 0;
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

// Whether a spend going from `before` to `after` reaches `permille`
// thousandths of `limit` (it was below, it is at or above).
inline bool crosses(std::uint64_t before, std::uint64_t after,
                    std::uint64_t limit, std::uint32_t permille) {
  const u128 mark = static_cast<u128>(limit) * permille;
  return static_cast<u128>(before) * 1000 < mark &&
         static_cast<u128>(after) * 1000 >= mark;
}

// A settlement's amount in one budget's unit: nano-USD or tokens.
inline Cost budget_amount(bool money, Money cost, std::uint64_t tokens) {
  return money ? static_cast<Cost>(std::max<std::int64_t>(0, cost.nanos))
               : tokens;
}

// What a call without a usage object is charged: the prompt estimate and
// the output the caller counted, flagged estimated.
inline Usage counted_usage(const Estimate& e, std::uint64_t output) {
  Usage u;
  u.input_uncached = e.prompt_tokens;
  u.output = output;
  u.source = UsageSource::kEstimated;
  return u;
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
// rarely meet. A shard's deque owns its entries in settle order (a deque
// never moves its elements); its hash set holds pointers to them (8 bytes a
// slot) and compares through them, with each entry's hash kept beside it: an
// id is hashed once per settle.
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
  };
  struct EntryHash {
    using is_transparent = void;
    std::size_t operator()(const Entry* e) const noexcept { return e->hash; }
    std::size_t operator()(const Key& k) const noexcept { return k.hash; }
  };
  struct EntryEq {
    using is_transparent = void;
    static absl::string_view id(const Entry* e) noexcept { return e->id; }
    static absl::string_view id(const Key& k) noexcept { return k.id; }
    template <class A, class B>
    bool operator()(const A& a, const B& b) const noexcept {
      return id(a) == id(b);
    }
  };

  struct alignas(64) Shard {
    Mutex mu;
    absl::flat_hash_set<const Entry*, EntryHash, EntryEq> ids
        ABSL_GUARDED_BY(mu);
    std::deque<Entry> order ABSL_GUARDED_BY(mu);  // oldest first
  };

  static Key key(std::string_view id) {
    return Key{av(id), absl::Hash<absl::string_view>{}(av(id))};
  }
  Shard& shard_of(const Key& k) { return shards_[(k.hash >> 40) % kShards]; }

  // At least `ids` ids are remembered (rounded up to whole shards).
  void set_window(std::size_t ids) {
    per_shard_ = ids / kShards + (ids % kShards != 0 ? 1 : 0);
    if (per_shard_ == 0) per_shard_ = 1;
  }

  static const Settlement* find(Shard& s, const Key& k)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu) {
    const auto it = s.ids.find(k);
    return it == s.ids.end() ? nullptr : &(*it)->settlement;
  }

  // Records the settlement of `k` unless it has one; the shard's oldest id
  // beyond the window is forgotten.
  void remember(Shard& s, const Key& k, const Settlement& st)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu) {
    s.order.push_back(Entry{std::string(k.id), k.hash, st});
    if (!s.ids.insert(&s.order.back()).second) {
      s.order.pop_back();
      return;
    }
    while (s.order.size() > per_shard_) {
      s.ids.erase(&s.order.front());
      s.order.pop_front();
    }
  }

 private:
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
  // Charges `used` (priced at the reservation's time): what was held and
  // not used goes back, an overage is charged (past the limit if need be:
  // the provider billed it). Exactly once per request id: a second settle,
  // here or through another Reservation of the same id, returns the first
  // result and changes nothing. kFailedPrecondition on a refused or
  // released reservation.
  absl::StatusOr<Settlement> settle(const Usage& used) {
    if (acct_ == nullptr || !granted()) {
      return absl::FailedPreconditionError(
          "settle: the reservation was not granted or was released");
    }
    return acct_->settle_reservation(*this, used);
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
  // grows by the difference if every budget allows it (all or nothing),
  // else false and the caller cuts the stream.
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
    return acct_->extend(*this, output_so_far + next_tokens);
  }

  // release
  //
  // Gives back everything held (a call that failed before dispatch). Done
  // by the destructor of an unsettled reservation.
  void release() noexcept {
    if (acct_ != nullptr && granted() && !done_)
      acct_->release_reservation(*this);
    acct_ = nullptr;
  }

 private:
  friend class Accountant<C>;
  struct Item {
    Limit* limit;
    std::string key;
    Cost held;
    bool money;  // a money budget (else tokens)
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
  bool done_ = false;
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
        store_(store) {}

  Accountant(const Accountant&) = delete;
  Accountant& operator=(const Accountant&) = delete;

  // Every reserve, denial, extension, settle, release, reset and limit
  // change is appended to `sink` (a Ledger) before it is acknowledged:
  // settle() returns only once its record is durable, and returns the
  // sink's error otherwise, with nothing applied. Set before the first
  // reserve (nullptr: no records); the sink must outlive its use here.
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
  // budget's field) are statuses.
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
    if (!prices.ok()) return prices.status();
    absl::StatusOr<Money> cost = PriceTable::cost(*prices, worst);
    if (!cost.ok()) return cost.status();
    r.request_id_ = std::move(request_id);
    if (audit_ != nullptr) r.model_ = std::string(model);
    r.prices_ = *prices;
    r.estimate_ = e;
    r.reserved_money_ = *cost;
    r.reserved_tokens_ = worst.total();
    absl::InlinedVector<ChainItem, 8> items(limits.begin(), limits.end());
    for (const Budget& b : budgets_) {
      std::string key;
      if (absl::Status st = append_subject_key(b.spec.scope, who, key);
          !st.ok()) {
        b.limit->metrics().record_error();
        return absl::InvalidArgumentError(
            absl::StrCat("budget \"", b.spec.name, "\": ", st.message()));
      }
      const bool money = b.spec.unit == BudgetUnit::kNanoUsd;
      r.items_.push_back(
          {b.limit.get(), std::move(key),
           money ? static_cast<Cost>(cost->nanos) : r.reserved_tokens_, money});
    }
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
        if (auto st = audit_->append(f, now); !st.ok()) return st.status();
      }
      return absl::OkStatus();
    }
    if (audit_ != nullptr) {
      std::string f = record_head("reserve", r);
      absl::StrAppend(&f, ",\"at\":", now.count(),
                      ",\"prompt\":", e.prompt_tokens,
                      ",\"max_output\":", e.max_output_tokens);
      append_items(f, r, [](const auto& it) { return it.held; });
      if (auto st = audit_->append(f, now); !st.ok()) {
        // Not recorded, not granted: give it all back.
        for (const auto& it : r.items_) {
          static_cast<void>(it.limit->refund(it.key, it.held, now, now));
        }
        return st.status();
      }
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
  // ledger was written, and settled request ids stay settled. Reservations
  // open at the end (a crash between reserve and settle) stay held, as in
  // the process that wrote them. kInvalidArgument for a record it cannot
  // read.
  template <class Json>
  absl::Status replay(const Json& j) {
    const std::string event = j.value("event", "");
    const std::string id = j.value("request", "");
    if (event == "deny" || event.empty()) return absl::OkStatus();
    const Nanos t{j.value("t", std::int64_t{0})};
    if (event == "limit") {
      const std::size_t b = j.value("b", budgets_.size());
      if (b >= budgets_.size())
        return absl::InvalidArgumentError("unknown budget");
      absl::StatusOr<PeriodBudget> next = PeriodBudget::create(
          j.value("limit", std::uint64_t{0}), *budgets_[b].spec.period);
      if (!next.ok()) return next.status();
      return budgets_[b].limit->reconfigure(*std::move(next));
    }
    if (!j.contains("items") || !j["items"].is_array()) {
      return absl::InvalidArgumentError(
          absl::StrCat("ledger record ", event, " without items"));
    }
    std::vector<std::pair<std::string, Cost>> amounts;
    for (const auto& it : j["items"]) {
      amounts.emplace_back(unhex(it.value("key", "")),
                           it.value("amount", Cost{0}));
    }
    const auto limit_of = [&](std::size_t i) -> Limit* {
      const auto& it = j["items"][i];
      const std::size_t b = it.value("b", std::size_t{0});
      return b < budgets_.size() ? budgets_[b].limit.get() : nullptr;
    };
    if (event == "reset") {
      for (std::size_t i = 0; i < amounts.size(); ++i) {
        Limit* l = limit_of(i);
        if (l == nullptr) return absl::InvalidArgumentError("unknown budget");
        static_cast<void>(
            l->refund(amounts[i].first, PeriodBudget::kMaxLimit, t, t));
      }
      return absl::OkStatus();
    }
    auto& held = replay_held_[id];
    // As reserve(), extend() and settle() did: at the reservation's time.
    const auto at_it = replay_at_.find(id);
    Nanos at = at_it == replay_at_.end() ? t : at_it->second;
    if (event == "reserve" || event == "extend") {
      if (event == "reserve") {
        at = Nanos{j.value("at", t.count())};
        replay_at_[id] = at;
      }
      held.resize(std::max(held.size(), amounts.size()));
      for (std::size_t i = 0; i < amounts.size(); ++i) {
        Limit* l = limit_of(i);
        if (l == nullptr) return absl::InvalidArgumentError("unknown budget");
        static_cast<void>(l->charge(amounts[i].first, amounts[i].second, at));
        held[i] += amounts[i].second;
      }
      return absl::OkStatus();
    }
    held.resize(std::max(held.size(), amounts.size()));
    for (std::size_t i = 0; i < amounts.size(); ++i) {
      Limit* l = limit_of(i);
      if (l == nullptr) return absl::InvalidArgumentError("unknown budget");
      const Cost target = event == "settle" ? amounts[i].second : 0;
      if (target < held[i]) {
        static_cast<void>(
            l->refund(amounts[i].first, held[i] - target, at, at));
      } else if (target > held[i]) {
        static_cast<void>(l->charge(amounts[i].first, target - held[i], at));
      }
    }
    if (event == "settle") {
      const auto key = detail::SettledIds::key(id);
      auto& shard = settled_.shard_of(key);
      detail::MutexLock lock(&shard.mu);
      settled_.remember(
          shard, key,
          Settlement{Money{j.value("cost_nanos", std::int64_t{0})},
                     j.value("tokens", std::uint64_t{0}),
                     j.value("estimated", false)});
    }
    replay_held_.erase(id);
    replay_at_.erase(id);
    return absl::OkStatus();
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
  // minutes at 1,000 settles a second): a settle of an id forgotten since is
  // charged again. Memory is about 90 bytes per id (ids of up to 15
  // characters; a longer id adds its own allocation). Set before the first
  // reserve.
  void set_idempotency_window(std::size_t ids) { settled_.set_window(ids); }

  // find_settlement
  //
  // The settlement recorded for `request_id` (settled here, or replayed
  // from a ledger), if any.
  std::optional<Settlement> find_settlement(std::string_view request_id) {
    const auto key = detail::SettledIds::key(request_id);
    auto& shard = settled_.shard_of(key);
    detail::MutexLock lock(&shard.mu);
    const Settlement* s = detail::SettledIds::find(shard, key);
    if (s == nullptr) return std::nullopt;
    return *s;
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
    const Decision d = budget.limit->peek(key, 0, now);
    return detail::forecast_of(d.limit - d.remaining, d.limit,
                               budget.spec.period->span_of(now), now);
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
    Limit* l = budgets_[*b].limit.get();
    const Decision d = l->peek(key, 0, now);
    const Cost cleared = d.limit - d.remaining;
    if (audit_ != nullptr) {
      std::string f = absl::StrCat("\"event\":\"reset\",\"budget\":");
      detail::append_json_quoted(f, budgets_[*b].spec.name);
      absl::StrAppend(&f, ",\"items\":[{\"b\":", *b, ",\"key\":\"", hex(key),
                      "\",\"amount\":", cleared, "}]");
      if (auto st = audit_->append(f, now); !st.ok()) return st.status();
    }
    // Clears everything counted now, whatever arrived since the peek too.
    static_cast<void>(l->refund(key, PeriodBudget::kMaxLimit, now, now));
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

  static SysTime to_sys(Nanos n) {
    return SysTime(std::chrono::duration_cast<SysTime::duration>(n));
  }

  // What `used` costs, in each item's unit.
  absl::StatusOr<Settlement> price(const Reservation<C>& r,
                                   const Usage& used) const {
    absl::StatusOr<Money> cost = PriceTable::cost(r.prices_, used);
    if (!cost.ok()) return cost.status();
    return Settlement{*cost, used.total(),
                      used.source == UsageSource::kEstimated};
  }

  absl::StatusOr<Settlement> settle_reservation(Reservation<C>& r,
                                                const Usage& used) {
    const auto key = detail::SettledIds::key(r.request_id_);
    auto& shard = settled_.shard_of(key);
    detail::MutexLock lock(&shard.mu);
    if (const Settlement* first = detail::SettledIds::find(shard, key);
        first != nullptr) {
      // Settled already (a retried call): this reservation's holds go back,
      // the first settlement stands.
      give_back(r);
      return *first;
    }
    if (r.done_) {
      return absl::FailedPreconditionError("settle: already released");
    }
    absl::StatusOr<Settlement> s = price(r, used);
    if (!s.ok()) return s.status();
    // A call's spend belongs to the period it was reserved in: refunds and
    // overages apply at the reservation's time (no clock read without a
    // ledger, which stamps its record with the time of the settle).
    const Nanos at = r.decision_.at;
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
      // Acknowledged only once recorded: on error nothing is applied.
      if (auto st = audit_->append(f, now); !st.ok()) return st.status();
    }
    for (auto& it : r.items_) {
      const Cost actual = detail::budget_amount(it.money, s->cost, s->tokens);
      if (actual < it.held) {
        static_cast<void>(it.limit->refund(it.key, it.held - actual, at, at));
      } else if (actual > it.held) {
        const Decision d = it.limit->charge(it.key, actual - it.held, at);
        if (on_threshold_) {
          const std::uint64_t after = d.limit - d.remaining;
          const std::uint64_t extra = actual - it.held;
          fire_crossed(static_cast<std::size_t>(&it - r.items_.data()), it.key,
                       after >= extra ? after - extra : 0, after, d.limit, at);
        }
      }
      it.held = actual;
    }
    r.done_ = true;
    settled_.remember(shard, key, *s);
    return *s;
  }

  void release_reservation(Reservation<C>& r) noexcept {
    auto& shard = settled_.shard_of(detail::SettledIds::key(r.request_id_));
    detail::MutexLock lock(&shard.mu);
    give_back(r);
  }

  // Releases what `r` holds; the shard of its id locked (a settle of the
  // same id through another reservation waits).
  void give_back(Reservation<C>& r) noexcept {
    if (r.done_) return;
    const Nanos at = r.decision_.at;
    if (audit_ != nullptr) {
      std::string f = record_head("release", r);
      append_items(f, r, [](const auto& it) { return it.held; });
      // A release that cannot be recorded is still applied: holding the
      // budget forever would be worse, and replay of a ledger without it
      // keeps the reservation held (the conservative side).
      static_cast<void>(audit_->append(f, clock_.now()));
    }
    for (const auto& it : r.items_) {
      static_cast<void>(it.limit->refund(it.key, it.held, at, at));
    }
    r.done_ = true;
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
      const Cost want = detail::budget_amount(it.money, s->cost, s->tokens);
      add.push_back(want > it.held ? want - it.held : 0);
      if (add.back() != 0) {
        more.push_back({it.limit, it.key, add.back()});
        which.push_back(i);
      }
    }
    if (more.empty()) return true;
    // Like settle: in the period of the reservation.
    const Nanos at = r.decision_.at;
    const ChainDecision d =
        chain_.acquire_at(std::span<const ChainItem>(more), at);
    if (!d.allowed) return false;
    if (audit_ != nullptr) {
      std::string f = record_head("extend", r);
      std::size_t i = 0;
      append_items(f, r, [&](const auto&) { return add[i++]; });
      if (auto st = audit_->append(f, clock_.now()); !st.ok()) {
        for (const ChainItem& it : more) {
          static_cast<void>(it.limit->refund(it.key, it.cost, at, at));
        }
        return st.status();
      }
    }
    for (std::size_t i = 0; i < r.items_.size(); ++i) {
      r.items_[i].held += add[i];
    }
    if (on_threshold_) {
      for (std::size_t j = 0; j < more.size(); ++j) {
        const Decision& dj = d.results[j].decision;
        const std::uint64_t after = dj.limit - dj.remaining;
        fire_crossed(which[j], more[j].key,
                     after >= more[j].cost ? after - more[j].cost : 0, after,
                     dj.limit, at);
      }
    }
    return true;
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

  static std::string record_head(const char* event, const Reservation<C>& r) {
    std::string f = absl::StrCat("\"event\":\"", event, "\",\"request\":");
    detail::append_json_quoted(f, r.request_id_);
    f += ",\"model\":";
    detail::append_json_quoted(f, r.model_);
    return f;
  }

  // ,"items":[{"b":<budget index>,"key":"<hex>","amount":N},...]
  template <class Amount>
  void append_items(std::string& f, const Reservation<C>& r,
                    const Amount& amount) const {
    f += ",\"items\":[";
    for (std::size_t i = 0; i < r.items_.size(); ++i) {
      const auto& it = r.items_[i];
      absl::StrAppend(&f, i == 0 ? "" : ",", "{\"b\":", i, ",\"key\":\"",
                      hex(it.key), "\",\"amount\":", amount(it), "}");
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

  static std::string hex(std::string_view bytes) {
    static constexpr char kHex[] = "0123456789abcdef";
    std::string out;
    out.reserve(2 * bytes.size());
    for (const char c : bytes) {
      const auto u = static_cast<unsigned char>(c);
      out.push_back(kHex[u >> 4]);
      out.push_back(kHex[u & 15]);
    }
    return out;
  }

  static std::string unhex(std::string_view h) {
    std::string out;
    auto val = [](char c) { return c >= 'a' ? c - 'a' + 10 : c - '0'; };
    for (std::size_t i = 0; i + 1 < h.size(); i += 2) {
      out.push_back(static_cast<char>(val(h[i]) * 16 + val(h[i + 1])));
    }
    return out;
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
  mutable detail::Mutex fired_mu_;
  // "budget/permille/key" -> the period it last fired in.
  absl::flat_hash_map<std::string, Fired> fired_ ABSL_GUARDED_BY(fired_mu_);
  std::size_t prune_at_ ABSL_GUARDED_BY(fired_mu_) = 4096;
  AuditSink* audit_ = nullptr;
  // Replay only (single-threaded, before serving): what each open request
  // holds per item, and when it reserved.
  absl::flat_hash_map<std::string, std::vector<Cost>> replay_held_;
  absl::flat_hash_map<std::string, Nanos> replay_at_;
};

}  // namespace ratekeeper

#endif  // RATEKEEPER_BUDGET_ACCOUNTANT_HPP_
