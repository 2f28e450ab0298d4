// ratekeeper/redis/accountant.hpp: budgets kept in Redis, shared by
// every instance, with settles journaled while Redis is away.
//
// Defines RedisAccountant: reserve / settle / release as one script each,
// the facade over its parts, one header each:
//   redis/reservation.hpp     RedisAccountantOptions, RedisReservation
//   redis/books.hpp           the accountant's state; settle, release and
//                             extension of a reservation, thresholds
//   redis/budget_scripts.hpp  the budget scripts' KEYS/ARGV and replies
//   redis/local_shares.hpp    the fail modes' grants while Redis is away
//   redis/journal_replay.hpp  the journal's use: sliced replay, stale
//                             settles set aside (the file: redis/journal.hpp)
//
// The budgets are those of Accountant (budget/accountant.hpp: BudgetSpec,
// prices, exactly-once settles by request id), decided by the same rules
// (budget/rules.hpp: what is held, which period a change goes to, what a
// duplicate settle gives back, when a threshold fires), with their state in
// Redis:
//
//   - reserve: every budget of the subject, and any Redis rate limits passed
//     along, in one script, all or nothing on the server; admitted, the
//     reservation's key is set ("its holds are out").
//   - settle: one script that, exactly once per request id across all
//     instances, refunds what was held and not used or charges an overage,
//     and records the settlement (a retry, here or on another instance,
//     gets the first settlement and its own holds given back).
//   - release: one script that gives the holds back if they are still out.
//
// Every key of one reservation carries the tenant's hash tag (the subject's
// key under options.tenant, by default the org), so the scripts are atomic
// on Redis Cluster. Budget periods come from the C++ calendar for the time
// of the call and are checked against Redis's TIME (see redis/limit.hpp).
//
// When Redis cannot answer:
//   - reserve: each budget's FailMode (add_budget) decides: kClosed refuses,
//     kOpen admits without holding, kLocal holds against an in-process
//     budget at the instance's share. A reservation that may have run on
//     the server (a time-out) is released there later through the journal.
//   - settle and release: appended to the journal (fsync'd before settle
//     returns, one sync shared by the settlers that wait at once) and
//     replayed when Redis answers again, a slice of at most replay_slice
//     before each reserve and settle (no call waits on the whole of it); a
//     settle pending longer than settled_ttl is set aside, reported, never
//     run (its id may no longer be known settled). The scripts are
//     idempotent (the reservation's key and the settlement's key say what
//     already happened), so a replay, a replay cut short and replayed again,
//     or a settle that timed out after it ran, all apply exactly once. A
//     reservation whose holds are not in Redis (admitted while it was away,
//     or lost by a restart without persistence) is settled by charging the
//     whole actual cost. Without a journal (no path), a settle Redis cannot
//     take returns kUnavailable and may be called again.
//
// Needs ratekeeper::redis (hiredis) and the budget headers.
#ifndef RATEKEEPER_REDIS_ACCOUNTANT_HPP_
#define RATEKEEPER_REDIS_ACCOUNTANT_HPP_

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
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
#include "absl/strings/str_cat.h"
#include "ratekeeper/budget/accountant.hpp"
#include "ratekeeper/budget/money.hpp"
#include "ratekeeper/budget/period.hpp"
#include "ratekeeper/budget/prices.hpp"
#include "ratekeeper/budget/usage.hpp"
#include "ratekeeper/chain.hpp"
#include "ratekeeper/detail/strings.hpp"
#include "ratekeeper/identity.hpp"
#include "ratekeeper/redis/books.hpp"
#include "ratekeeper/redis/chain.hpp"
#include "ratekeeper/redis/limit.hpp"
#include "ratekeeper/redis/reservation.hpp"

namespace ratekeeper {

// RedisAccountant: budgets in Redis, priced from a PriceTable. Thread-safe.
//
//   auto redis = RedisClient::create({.host = "10.0.0.7"}).value();
//   auto acct = RedisAccountant::create(prices, redis,
//                   {.journal_path = "/var/lib/app/settles.journal"}).value();
//   acct->add_budget({.name = "team_daily", .scope = Scope(Field::kTeam),
//                     .limit = 50'000'000'000, .period = Period::day(tz)});
//   auto r = acct->reserve(who, "gpt-4o", {prompt, max_tokens}, request_id);
//   ... call the provider ...
//   r->settle(normalize(response.usage).value());
class RedisAccountant {
 public:
  // create
  //
  // kInvalidArgument without a client; the journal's error (kDataLoss for
  // a damaged journal) when it cannot be opened. A journal left by a
  // previous run is replayed when Redis first answers.
  static absl::StatusOr<std::unique_ptr<RedisAccountant>> create(
      PriceTable prices, std::shared_ptr<RedisClient> client,
      RedisAccountantOptions options = {}) {
    if (client == nullptr) {
      return absl::InvalidArgumentError("RedisAccountant: no client");
    }
    auto a = std::unique_ptr<RedisAccountant>(new RedisAccountant(
        std::move(prices), std::move(client), std::move(options)));
    const std::string& path = a->books_.options_.journal_path;
    if (!path.empty()) {
      if (absl::Status st = a->books_.journal_.open(path); !st.ok()) return st;
    }
    return a;
  }

  RedisAccountant(const RedisAccountant&) = delete;
  RedisAccountant& operator=(const RedisAccountant&) = delete;

  // Called once per soft threshold, key and period across every instance
  // (Redis remembers which fired), from the thread whose reserve, extension
  // or settled overage crossed it. Set before the first reserve.
  using ThresholdCallback = std::function<void(const ThresholdEvent&)>;
  void on_threshold(ThresholdCallback cb) {
    books_.on_threshold_ = std::move(cb);
  }

  // add_budget
  //
  // As Accountant::add_budget, with the budget's behaviour when Redis
  // cannot answer (`redis.fail`; kLocal with `redis.instances`). Before the
  // first reserve. A budget is kept under its tenant: `redis.scope`
  // kGlobal is kInvalidArgument.
  absl::Status add_budget(const BudgetSpec& spec,
                          RedisLimitOptions redis = {}) {
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
    if (redis.scope != RedisScope::kTenant) {
      // Its keys, reservation and settlement live in the tenant's slot, in
      // the scripts that settle them.
      return absl::InvalidArgumentError(absl::StrCat(
          "budget \"", spec.name,
          "\": a budget is kept under its tenant (RedisScope::kTenant); a "
          "spend shared across tenants is a budget whose scope holds the "
          "tenant's fields, or a kGlobal rate limit passed to reserve()"));
    }
    redis.test_time = static_cast<bool>(books_.options_.test_clock);
    auto limit = RedisLimit<PeriodBudget>::create(
        {.name = spec.name,
         .unit =
             spec.unit == BudgetUnit::kTokens ? Unit::kTokens : Unit::kNanoUsd},
        *std::move(policy), books_.client_, redis);
    if (!limit.ok()) return limit.status();
    books_.budgets_.push_back(detail::RedisBudget{spec, *std::move(limit)});
    return absl::OkStatus();
  }

  // reserve
  //
  // Holds the worst case of the call against every budget of `who`, with
  // `limits` (RedisLimits of this client, acquired first, keyed under the
  // same tenant) in one script. A refusal is a reservation that is not
  // granted(); errors (unknown model, a subject lacking a field, bad text)
  // are statuses, and so is a request id already settled within
  // settled_ttl (kAlreadyExists, checked in the same script on any
  // instance: the call must not reach the provider again; nothing is held).
  // The rate limits are settled with the reservation: at settle() a token
  // limit to the tokens used and a money limit to the cost (a request limit
  // keeps its request); at release() or drop, given back.
  //
  // A kGlobal limit (RedisScope) counts once across tenants; on a Cluster,
  // when its key is outside the tenant's slot, it is one more round trip
  // (RedisChain: all or nothing still).
  absl::StatusOr<RedisReservation> reserve(
      const Subject& who, std::string_view model, const Estimate& e,
      std::string request_id, std::span<const ChainItem> limits = {}) {
    books_.journal_.replay_if_due();
    for (const auto& [what, v] :
         {std::pair{"request id", std::string_view(request_id)},
          std::pair{"model", model}}) {
      if (v.empty() || v.size() > 256) {
        return absl::InvalidArgumentError(
            absl::StrCat(what, " must be 1 to 256 characters"));
      }
    }
    if (e.prompt_tokens > kMaxUsageTokens ||
        e.max_output_tokens > kMaxUsageTokens) {
      return absl::InvalidArgumentError(absl::StrCat(
          "estimate of ", e.prompt_tokens, " prompt and ", e.max_output_tokens,
          " output tokens: each must be at most 2^48"));
    }
    absl::StatusOr<std::string> tenant =
        subject_key(books_.options_.tenant, who);
    if (!tenant.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("tenant: ", tenant.status().message()));
    }
    const Nanos now = detail::unix_now(books_.options_);
    Usage worst;
    worst.input_uncached = e.prompt_tokens;
    worst.output = e.max_output_tokens;
    absl::StatusOr<Prices> prices = books_.prices_.prices(model, to_sys(now));
    if (!prices.ok()) return prices.status();
    absl::StatusOr<Money> cost = PriceTable::cost(*prices, worst);
    if (!cost.ok()) return cost.status();
    if (cost->nanos < 0 ||
        static_cast<std::uint64_t>(cost->nanos) >= detail::kExact / 2) {
      return absl::InvalidArgumentError(
          "reserve: a worst case above 2^52 nano-USD (Lua's exact range)");
    }
    const std::vector<detail::RedisBudget>& budgets = books_.budgets_;
    RedisReservation r;
    r.request_id_ = std::move(request_id);
    r.tenant_ = *std::move(tenant);
    r.prices_ = *prices;
    r.estimate_ = e;
    r.reserved_money_ = *cost;
    r.reserved_tokens_ = worst.total();
    absl::InlinedVector<ChainItem, 8> items(limits.begin(), limits.end());
    r.first_budget_ = items.size();
    for (std::size_t b = 0; b < budgets.size(); ++b) {
      std::string key;
      if (absl::Status st = append_subject_key(budgets[b].spec.scope, who, key);
          !st.ok()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "budget \"", budgets[b].spec.name, "\": ", st.message()));
      }
      const bool money = budgets[b].spec.unit == BudgetUnit::kNanoUsd;
      // At least one unit, as in process (rules.hpp, rule 1).
      r.items_.push_back({b, std::move(key),
                          detail::hold_amount(money, *cost, r.reserved_tokens_),
                          money});
    }
    for (const auto& it : r.items_) {
      items.push_back({budgets[it.budget].limit.get(), it.key, it.held});
    }
    r.mark_ = books_.mark_key(r.tenant_);
    RedisChain::Outcome o = books_.chain_.reserve(
        r.tenant_, std::span<const ChainItem>(items), r.mark_,
        books_.options_.reservation_ttl, books_.scripts_.settled_key(r),
        detail::test_now(books_.options_));
    if (o.settled) {
      // Retried after its settle: the call must not reach the provider
      // again (its settle would be answered with the first settlement
      // after the provider billed it twice). Nothing was taken.
      return absl::AlreadyExistsError(absl::StrCat(
          "request id \"", detail::av(r.request_id_),
          "\" was already settled (", (*o.settled)[0], " nano-USD, ",
          (*o.settled)[1],
          " tokens): a new call needs a new id; find_settlement() has the "
          "first settlement"));
    }
    r.decision_ = std::move(o.decision);
    r.backed_ = o.reached;
    if (!o.reached && RedisClient::is_auth_error(o.error)) {
      // Credentials or permissions refused: refused whatever the fail
      // modes say (RedisLimitBase::fail), counted on their own; nothing ran.
      books_.auth_refusals_.fetch_add(1, std::memory_order_relaxed);
    } else if (!o.reached) {
      books_.fallback_reserves_.fetch_add(1, std::memory_order_relaxed);
      for (const auto& it : r.items_) {
        if (budgets[it.budget].limit->local_limit() != nullptr) r.local_ = true;
      }
      // Sent and not answered (a time-out): it may have run and set its
      // key; a journaled release gives those holds back once Redis answers.
      if (RedisClient::may_have_run(o.error) && books_.journal_.enabled()) {
        static_cast<void>(books_.journal_.append(
            books_.scripts_.settle_or_release(r, "release", {}, nullptr)));
      }
    }
    if (r.decision_.allowed) {
      r.acct_ = &books_;
      if (r.backed_ && books_.on_threshold_) {
        for (std::size_t i = 0; i < r.items_.size(); ++i) {
          const Decision& d = r.decision_.results[r.first_budget_ + i].decision;
          const std::uint64_t after = d.limit - d.remaining;
          books_.fire_crossed(
              r, i, after >= r.items_[i].held ? after - r.items_[i].held : 0,
              after, d.limit);
        }
      }
    }
    return r;
  }

  // replay_journal
  //
  // Runs every journaled settle and release in order; the journal is
  // emptied once all have run. Returns how many ran, or the error that
  // stopped it (kUnavailable: no answer; kInternal: an error reply such as
  // Redis's OOM), the journal then kept whole to run again (its lines are
  // idempotent). reserve and settle call it when lines wait, at most once
  // a second after a failure.
  //
  // A settle journaled longer ago than settled_ttl allows (see
  // stale_settle) is not run but set aside: appended to
  // journal_stale_path() and counted in journal_stale().
  absl::StatusOr<std::size_t> replay_journal() {
    return books_.journal_.replay_all();
  }

  // Journaled calls not yet run in Redis.
  std::size_t journal_pending() const noexcept {
    return books_.journal_.pending();
  }
  // Journaled settles set aside unrun, pending longer than the settled_ttl
  // window (a replay could charge them twice): each a line of
  // journal_stale_path() (the journal's path + ".stale", in the journal's
  // format) for an operator to reconcile.
  std::uint64_t journal_stale() const noexcept {
    return books_.journal_.stale();
  }
  std::string journal_stale_path() const {
    return books_.journal_.stale_path();
  }
  // The journal's fdatasyncs (one covers every settle journaled while the
  // previous one ran).
  std::uint64_t journal_syncs() const noexcept {
    return books_.journal_.syncs();
  }
  // Reservations decided by the fail modes, and settles/releases journaled.
  std::uint64_t fallback_reserves() const noexcept {
    return books_.fallback_reserves_.load(std::memory_order_relaxed);
  }
  // Reservations refused because Redis refused the client's credentials
  // or the user's permissions (RedisClient::is_auth_error).
  std::uint64_t auth_refusals() const noexcept {
    return books_.auth_refusals_.load(std::memory_order_relaxed);
  }
  std::uint64_t journaled() const noexcept {
    return books_.journal_.journaled();
  }
  // Replays that stopped (no answer, or an error reply; the journal kept).
  std::uint64_t replay_errors() const noexcept {
    return books_.journal_.replay_errors();
  }

  // spent
  //
  // What `who` has spent of budget `name` this period (reservations
  // holding included), by Redis. kNotFound for an unknown budget,
  // kUnavailable when Redis cannot answer.
  absl::StatusOr<std::uint64_t> spent(std::string_view name,
                                      const Subject& who) {
    absl::StatusOr<const detail::RedisBudget*> b = books_.find_budget(name);
    if (!b.ok()) return b.status();
    absl::StatusOr<std::string> tenant =
        subject_key(books_.options_.tenant, who);
    if (!tenant.ok()) return tenant.status();
    absl::StatusOr<std::string> key = subject_key((*b)->spec.scope, who);
    if (!key.ok()) return key.status();
    const Nanos at = detail::test_now(books_.options_)
                         .value_or(detail::unix_now(books_.options_));
    return books_.scripts_.spent(
        books_.scripts_.key((*b)->spec.name, *tenant, *key),
        (*b)->spec.period->index_of(at));
  }

  // forecast
  //
  // As Accountant::forecast, from Redis's books: where `who`'s budget
  // `name` stands this period and where it is heading at this period's
  // pace. kNotFound for an unknown budget; kUnavailable when Redis cannot
  // answer.
  absl::StatusOr<Forecast> forecast(std::string_view name, const Subject& who) {
    absl::StatusOr<std::uint64_t> s = spent(name, who);
    if (!s.ok()) return s.status();
    const detail::RedisBudget& b = **books_.find_budget(name);  // spent() did
    const Nanos now = detail::test_now(books_.options_)
                          .value_or(detail::unix_now(books_.options_));
    const Forecast f = detail::forecast_of(*s, b.limit->limit(),
                                           b.spec.period->span_of(now), now);
    // issue 18: the burn model, from the hourly buckets every instance
    // writes (redis/burn.hpp).
    absl::StatusOr<std::string> tenant =
        subject_key(books_.options_.tenant, who);
    absl::StatusOr<std::string> key = subject_key(b.spec.scope, who);
    if (!tenant.ok() || !key.ok()) return f;  // spent() checked both
    absl::StatusOr<BurnTracker> t = books_.burn_.load(name, *tenant, *key, now);
    if (!t.ok()) return t.status();
    return detail::with_burn(
        f, t->project(static_cast<double>(f.spent),
                      static_cast<double>(f.limit), now, f.period_end));
  }

  // set_forecast_options
  //
  // The burn model's options (budget/forecast.hpp). Every instance sharing
  // the books must use the same. Set before the first reserve.
  // kInvalidArgument (nothing changed) as check_forecast_options says.
  absl::Status set_forecast_options(const ForecastOptions& o) {
    if (absl::Status st = check_forecast_options(o); !st.ok()) return st;
    books_.burn_ = detail::RedisBurn(books_.client_, o);
    return absl::OkStatus();
  }

  // find_settlement
  //
  // The settlement Redis holds for `request_id` of `who`'s tenant (nullopt:
  // not settled, or settled longer than settled_ttl ago). kUnavailable when
  // Redis cannot answer.
  absl::StatusOr<std::optional<Settlement>> find_settlement(
      const Subject& who, std::string_view request_id) {
    absl::StatusOr<std::string> tenant =
        subject_key(books_.options_.tenant, who);
    if (!tenant.ok()) return tenant.status();
    return books_.scripts_.settlement(
        books_.scripts_.settled_key(*tenant, request_id));
  }

  std::vector<RedisLimitBase*> budgets() const {
    std::vector<RedisLimitBase*> out;
    for (const detail::RedisBudget& b : books_.budgets_) {
      out.push_back(b.limit.get());
    }
    return out;
  }
  const PriceTable& prices() const noexcept { return books_.prices_; }
  const std::shared_ptr<RedisClient>& client() const noexcept {
    return books_.client_;
  }

 private:
  RedisAccountant(PriceTable prices, std::shared_ptr<RedisClient> client,
                  RedisAccountantOptions options)
      : books_(std::move(prices), std::move(client), std::move(options)) {}

  static SysTime to_sys(Nanos n) {
    return SysTime(std::chrono::duration_cast<SysTime::duration>(n));
  }

  // Reservations point at it: it does not move.
  detail::RedisBooks books_;
};

}  // namespace ratekeeper

#endif  // RATEKEEPER_REDIS_ACCOUNTANT_HPP_
