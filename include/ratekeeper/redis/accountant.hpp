// ratekeeper/redis/accountant.hpp: budgets kept in Redis, shared by
// every instance, with settles journaled while Redis is away.
//
// Defines:
//   RedisAccountantOptions  the tenant (hash tag), TTLs, the journal's path,
//                           a test clock
//   RedisReservation        one call's worst case held in Redis (move-only,
//                           released by its destructor unless settled)
//   RedisAccountant         reserve / settle / release as one script each
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

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/container/inlined_vector.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "ratekeeper/budget/accountant.hpp"
#include "ratekeeper/budget/money.hpp"
#include "ratekeeper/budget/period.hpp"
#include "ratekeeper/budget/prices.hpp"
#include "ratekeeper/budget/usage.hpp"
#include "ratekeeper/chain.hpp"
#include "ratekeeper/detail/group_sync.hpp"
#include "ratekeeper/detail/mutex.hpp"
#include "ratekeeper/detail/strings.hpp"
#include "ratekeeper/identity.hpp"
#include "ratekeeper/redis/chain.hpp"
#include "ratekeeper/redis/journal.hpp"
#include "ratekeeper/redis/limit.hpp"

namespace ratekeeper {

// RedisAccountantOptions
//   tenant           the subject fields whose key is every key's hash tag:
//                    one tenant's budgets (and the rate limits reserved
//                    with them) share one Redis Cluster slot. Every budget's
//                    scope should contain it (a team budget under an org
//                    tenant), and a subject must have its fields.
//   reservation_ttl  how long a reservation's key ("its holds are out")
//                    lives; a settle after it charges the whole actual cost
//                    (the holds stay until their period ends): over-counts,
//                    never loses a charge
//   settled_ttl      how long a request id stays settled (exactly-once
//                    window: a retry after it is charged again)
//   journal_path     where settles and releases wait while Redis is away
//                    (one file per instance; empty: no journal)
//   test_clock       tests: run the scripts at this Unix time instead of
//                    Redis's TIME (budgets created with test_time)
//   replay_slice     the most time a reserve or settle spends replaying the
//                    journal before its own call (0: an eighth of the
//                    client's command_timeout); the rest waits for the next
//                    calls (docs/redis.md, "The journal")
struct RedisAccountantOptions {
  Scope tenant = Scope(Field::kOrg);
  Nanos reservation_ttl = std::chrono::hours(24);
  Nanos settled_ttl = std::chrono::hours(24 * 7);
  std::string journal_path{};
  std::function<Nanos()> test_clock{};
  Nanos replay_slice = Nanos{0};
};

class RedisAccountant;

// RedisReservation: the worst case of one call, held in Redis. Move-only.
// settle() once; unsettled, the destructor releases it.
class RedisReservation {
 public:
  RedisReservation() = default;
  RedisReservation(RedisReservation&& o) noexcept { *this = std::move(o); }
  RedisReservation& operator=(RedisReservation&& o) noexcept;
  RedisReservation(const RedisReservation&) = delete;
  RedisReservation& operator=(const RedisReservation&) = delete;
  ~RedisReservation() { release(); }

  bool granted() const noexcept { return decision_.allowed; }
  // Refused by one of the budgets (403) rather than a rate limit (429).
  bool refused_by_budget() const noexcept {
    if (decision_.allowed) return false;
    return decision_.binding != ChainDecision::npos &&
           decision_.binding >= first_budget_;
  }
  // Redis decided it (false: the budgets' fail modes did, Redis being away).
  bool backed() const noexcept { return backed_; }
  const ChainDecision& decision() const noexcept { return decision_; }
  const std::string& request_id() const noexcept { return request_id_; }
  Money reserved_money() const noexcept { return reserved_money_; }
  std::uint64_t reserved_tokens() const noexcept { return reserved_tokens_; }

  // settle
  //
  // As Reservation::settle (accountant.hpp): the actual cost replaces the
  // hold, exactly once per request id across every instance; a retry gets
  // the first settlement. While Redis is away the settle is journaled and
  // this instance's pricing returned (if the id turns out to be settled
  // already when it replays, the first settlement stands). kUnavailable
  // only without a journal, or when the journal's write or sync failed
  // (then it may be called again);
  // kFailedPrecondition for a refused or released reservation. A partial
  // usage (UsageSource::kPartial) is charged as Reservation::settle does:
  // the worst-case output, flagged estimated.
  absl::StatusOr<Settlement> settle(const Usage& used);

  // As Reservation::settle_partial: the caller's count of the output of a
  // stream that did not finish.
  absl::StatusOr<Settlement> settle_partial(
      const Usage& partial, std::uint64_t counted_output_tokens) {
    Usage u = partial;
    u.source = UsageSource::kPartial;
    return settle(detail::partial_charge(u, estimate_, counted_output_tokens));
  }

  // A stream without a usage object: the prompt estimate and the counted
  // output, flagged estimated.
  absl::StatusOr<Settlement> settle_without_usage(
      std::uint64_t counted_output_tokens) {
    return settle(detail::counted_usage(estimate_, counted_output_tokens));
  }
  absl::StatusOr<Settlement> cancel_after_dispatch(
      std::uint64_t counted_output_tokens = 0) {
    return settle_without_usage(counted_output_tokens);
  }

  // next_chunk_fits
  //
  // Streaming, as Reservation::next_chunk_fits: within the reservation the
  // next chunk fits; beyond it, every budget grows by the difference (one
  // script, all or nothing, in the reservation's period) or the answer is
  // false and the caller cuts the stream. While Redis is away the budgets'
  // fail modes answer (kClosed: false; kOpen: true; kLocal: the share).
  absl::StatusOr<bool> next_chunk_fits(std::uint64_t output_so_far,
                                       std::uint64_t next_tokens);

  // Gives back everything held (journaled while Redis is away).
  void release() noexcept;

 private:
  friend class RedisAccountant;
  struct Item {
    std::size_t budget;  // index in the accountant
    std::string key;     // the subject's key under the budget's scope
    Cost held;
    bool money;
    Cost unrecorded = 0;  // of `held`, granted while Redis was away
    // Receipts of what this budget's kLocal share took while Redis was away
    // (extensions; the reserve's own is in decision_ when the chain fell
    // back): settle_local settles them.
    std::vector<Receipt> local{};
  };

  RedisAccountant* acct_ = nullptr;
  ChainDecision decision_;
  std::size_t first_budget_ = 0;  // decision_.results index of budget 0
  std::string request_id_;
  std::string tenant_;
  std::string mark_;  // the reservation's key
  Prices prices_;
  Estimate estimate_;
  absl::InlinedVector<Item, 4> items_;
  Money reserved_money_;
  std::uint64_t reserved_tokens_ = 0;
  bool backed_ = false;
  bool local_ = false;  // holds taken from kLocal shares (Redis away)
  bool done_ = false;
  std::optional<Settlement> settled_;
  // The most output next_chunk_fits has held room for (0: none asked).
  std::uint64_t worst_output_ = 0;
};

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
    if (!a->options_.journal_path.empty()) {
      auto j = detail::SettleJournal::open(a->options_.journal_path);
      if (!j.ok()) return j.status();
      a->journal_ = *std::move(j);
    }
    return a;
  }

  RedisAccountant(const RedisAccountant&) = delete;
  RedisAccountant& operator=(const RedisAccountant&) = delete;

  // Called once per soft threshold, key and period across every instance
  // (Redis remembers which fired), from the thread whose reserve, extension
  // or settled overage crossed it. Set before the first reserve.
  using ThresholdCallback = std::function<void(const ThresholdEvent&)>;
  void on_threshold(ThresholdCallback cb) { on_threshold_ = std::move(cb); }

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
    redis.test_time = static_cast<bool>(options_.test_clock);
    auto limit = RedisLimit<PeriodBudget>::create(
        {.name = spec.name,
         .unit =
             spec.unit == BudgetUnit::kTokens ? Unit::kTokens : Unit::kNanoUsd},
        *std::move(policy), client_, redis);
    if (!limit.ok()) return limit.status();
    budgets_.push_back(Budget{spec, *std::move(limit)});
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
    replay_if_due();
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
    absl::StatusOr<std::string> tenant = subject_key(options_.tenant, who);
    if (!tenant.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("tenant: ", tenant.status().message()));
    }
    const Nanos now = unix_now();
    Usage worst;
    worst.input_uncached = e.prompt_tokens;
    worst.output = e.max_output_tokens;
    absl::StatusOr<Prices> prices = prices_.prices(model, to_sys(now));
    if (!prices.ok()) return prices.status();
    absl::StatusOr<Money> cost = PriceTable::cost(*prices, worst);
    if (!cost.ok()) return cost.status();
    if (cost->nanos < 0 ||
        static_cast<std::uint64_t>(cost->nanos) >= detail::kExact / 2) {
      return absl::InvalidArgumentError(
          "reserve: a worst case above 2^52 nano-USD (Lua's exact range)");
    }
    RedisReservation r;
    r.request_id_ = std::move(request_id);
    r.tenant_ = *std::move(tenant);
    r.prices_ = *prices;
    r.estimate_ = e;
    r.reserved_money_ = *cost;
    r.reserved_tokens_ = worst.total();
    absl::InlinedVector<ChainItem, 8> items(limits.begin(), limits.end());
    r.first_budget_ = items.size();
    for (std::size_t b = 0; b < budgets_.size(); ++b) {
      std::string key;
      if (absl::Status st =
              append_subject_key(budgets_[b].spec.scope, who, key);
          !st.ok()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "budget \"", budgets_[b].spec.name, "\": ", st.message()));
      }
      const bool money = budgets_[b].spec.unit == BudgetUnit::kNanoUsd;
      // At least one unit, as in process (rules.hpp, rule 1).
      r.items_.push_back({b, std::move(key),
                          detail::hold_amount(money, *cost, r.reserved_tokens_),
                          money});
    }
    for (const auto& it : r.items_) {
      items.push_back({budgets_[it.budget].limit.get(), it.key, it.held});
    }
    r.mark_ = mark_key(r.tenant_);
    RedisChain::Outcome o =
        chain_.reserve(r.tenant_, std::span<const ChainItem>(items), r.mark_,
                       options_.reservation_ttl, settled_key(r), test_now());
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
      auth_refusals_.fetch_add(1, std::memory_order_relaxed);
    } else if (!o.reached) {
      fallback_reserves_.fetch_add(1, std::memory_order_relaxed);
      for (const auto& it : r.items_) {
        if (budgets_[it.budget].limit->local_limit() != nullptr)
          r.local_ = true;
      }
      // Sent and not answered (a time-out): it may have run and set its
      // key; a journaled release gives those holds back once Redis answers.
      if (RedisClient::may_have_run(o.error) && journal_ != nullptr) {
        static_cast<void>(journal_release(r));
      }
    }
    if (r.decision_.allowed) {
      r.acct_ = this;
      if (r.backed_ && on_threshold_) {
        for (std::size_t i = 0; i < r.items_.size(); ++i) {
          const Decision& d = r.decision_.results[r.first_budget_ + i].decision;
          const std::uint64_t after = d.limit - d.remaining;
          fire_crossed(r, i,
                       after >= r.items_[i].held ? after - r.items_[i].held : 0,
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
    if (journal_ == nullptr) return 0;
    detail::MutexLock lock(&replay_mu_);
    return replay_locked(std::nullopt);
  }

  // Journaled calls not yet run in Redis.
  std::size_t journal_pending() const noexcept {
    return journal_ == nullptr ? 0 : journal_->size();
  }
  // Journaled settles set aside unrun, pending longer than the settled_ttl
  // window (a replay could charge them twice): each a line of
  // journal_stale_path() (the journal's path + ".stale", in the journal's
  // format) for an operator to reconcile.
  std::uint64_t journal_stale() const noexcept {
    return stale_.load(std::memory_order_relaxed);
  }
  std::string journal_stale_path() const {
    return journal_ == nullptr ? std::string() : journal_->stale_path();
  }
  // The journal's fdatasyncs (one covers every settle journaled while the
  // previous one ran).
  std::uint64_t journal_syncs() const noexcept {
    return journal_ == nullptr ? 0 : journal_->syncs();
  }
  // Reservations decided by the fail modes, and settles/releases journaled.
  std::uint64_t fallback_reserves() const noexcept {
    return fallback_reserves_.load(std::memory_order_relaxed);
  }
  // Reservations refused because Redis refused the client's credentials
  // or the user's permissions (RedisClient::is_auth_error).
  std::uint64_t auth_refusals() const noexcept {
    return auth_refusals_.load(std::memory_order_relaxed);
  }
  std::uint64_t journaled() const noexcept {
    return journaled_.load(std::memory_order_relaxed);
  }
  // Replays that stopped (no answer, or an error reply; the journal kept).
  std::uint64_t replay_errors() const noexcept {
    return replay_errors_.load(std::memory_order_relaxed);
  }

  // spent
  //
  // What `who` has spent of budget `name` this period (reservations
  // holding included), by Redis. kNotFound for an unknown budget,
  // kUnavailable when Redis cannot answer.
  absl::StatusOr<std::uint64_t> spent(std::string_view name,
                                      const Subject& who) {
    absl::StatusOr<const Budget*> b = find_budget(name);
    if (!b.ok()) return b.status();
    absl::StatusOr<std::string> tenant = subject_key(options_.tenant, who);
    if (!tenant.ok()) return tenant.status();
    absl::StatusOr<std::string> key = subject_key((*b)->spec.scope, who);
    if (!key.ok()) return key.status();
    const std::string k =
        redis_key(client_->options().prefix, (*b)->spec.name, *tenant, *key);
    const Nanos at = test_now().value_or(unix_now());
    const std::string index = std::to_string((*b)->spec.period->index_of(at));
    const std::string_view keys[] = {k};
    const std::string now = now_arg();
    const std::string_view args[] = {now, "spent", index};
    auto r = client_->eval_ints(detail::redis_script(), keys, args);
    if (!r.ok()) return r.status();
    if (r->size() != 2) return absl::InternalError("redis: malformed reply");
    return static_cast<std::uint64_t>((*r)[0]);
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
    const Budget& b = **find_budget(name);  // spent() found it
    const Nanos now = test_now().value_or(unix_now());
    return detail::forecast_of(*s, b.limit->limit(),
                               b.spec.period->span_of(now), now);
  }

  // find_settlement
  //
  // The settlement Redis holds for `request_id` of `who`'s tenant (nullopt:
  // not settled, or settled longer than settled_ttl ago). kUnavailable when
  // Redis cannot answer.
  absl::StatusOr<std::optional<Settlement>> find_settlement(
      const Subject& who, std::string_view request_id) {
    absl::StatusOr<std::string> tenant = subject_key(options_.tenant, who);
    if (!tenant.ok()) return tenant.status();
    const std::string k =
        redis_key(client_->options().prefix, "#settled", *tenant, request_id);
    const std::string_view keys[] = {k};
    const std::string now = now_arg();
    const std::string_view args[] = {now, "settled"};
    auto r = client_->eval_ints(detail::redis_script(), keys, args);
    if (!r.ok()) return r.status();
    if (r->size() == 2 && (*r)[0] == 0) return std::optional<Settlement>();
    if (r->size() != 5) return absl::InternalError("redis: malformed reply");
    return std::optional<Settlement>(Settlement{
        Money{(*r)[2]}, static_cast<std::uint64_t>((*r)[3]), (*r)[4] != 0});
  }

  std::vector<RedisLimitBase*> budgets() const {
    std::vector<RedisLimitBase*> out;
    for (const Budget& b : budgets_) out.push_back(b.limit.get());
    return out;
  }
  const PriceTable& prices() const noexcept { return prices_; }
  const std::shared_ptr<RedisClient>& client() const noexcept {
    return client_;
  }

 private:
  friend class RedisReservation;

  struct Budget {
    BudgetSpec spec;
    std::unique_ptr<RedisLimit<PeriodBudget>> limit;
  };

  RedisAccountant(PriceTable prices, std::shared_ptr<RedisClient> client,
                  RedisAccountantOptions options)
      : prices_(std::move(prices)),
        client_(std::move(client)),
        chain_(client_),
        options_(std::move(options)) {
    std::random_device rd;
    instance_ = (std::uint64_t{rd()} << 32) ^ rd();
  }

  absl::StatusOr<const Budget*> find_budget(std::string_view name) const {
    for (const Budget& b : budgets_) {
      if (b.spec.name == name) return &b;
    }
    return absl::NotFoundError(
        absl::StrCat("no budget named \"", detail::av(name), "\""));
  }

  static SysTime to_sys(Nanos n) {
    return SysTime(std::chrono::duration_cast<SysTime::duration>(n));
  }
  Nanos unix_now() const {
    if (options_.test_clock) return options_.test_clock();
    return std::chrono::duration_cast<Nanos>(
        std::chrono::system_clock::now().time_since_epoch());
  }
  std::optional<Nanos> test_now() const {
    if (options_.test_clock) return options_.test_clock();
    return std::nullopt;
  }
  std::string now_arg() const {
    return options_.test_clock
               ? std::to_string(options_.test_clock().count() / 1000)
               : std::string();
  }

  // A key of the tenant's slot per reservation: the instance and a count,
  // under a name no budget can have ('#').
  std::string mark_key(std::string_view tenant) {
    char id[16];
    const std::uint64_t n =
        instance_ + next_.fetch_add(1, std::memory_order_relaxed);
    for (int i = 0; i < 8; ++i) {
      id[i] = static_cast<char>(instance_ >> (8 * i));
      id[8 + i] = static_cast<char>(n >> (8 * i));
    }
    return redis_key(client_->options().prefix, "#res", tenant,
                     std::string_view(id, sizeof id));
  }
  std::string settled_key(const RedisReservation& r) const {
    return redis_key(client_->options().prefix, "#settled", r.tenant_,
                     r.request_id_);
  }

  // What every script on a reservation starts with (lua/limits.lua): KEYS
  // the budgets' states and the reservation's key; ARGV now, `op` and the
  // budget count.
  detail::SettleJournal::Entry script_head(const RedisReservation& r,
                                           std::string_view op) const {
    detail::SettleJournal::Entry e;
    for (const auto& it : r.items_) {
      e.keys.push_back(redis_key(client_->options().prefix,
                                 budgets_[it.budget].spec.name, r.tenant_,
                                 it.key));
    }
    e.keys.push_back(r.mark_);
    e.args.push_back(now_arg());
    e.args.emplace_back(op);
    e.args.push_back(std::to_string(r.items_.size()));
    return e;
  }

  // Item `i`'s period, the reservation's: its index and end (us).
  void append_period(const RedisReservation& r, std::size_t i,
                     std::vector<std::string>& args) const {
    detail::TwinParams p = detail::RedisTwin<PeriodBudget>::at(
        budgets_[r.items_[i].budget].limit->policy(), r.decision_.at);
    args.push_back(std::move(p[2]));
    args.push_back(std::move(p[4]));
  }

  // The settle/release script's keys and arguments for `r`; `actual` per
  // item for settle (empty for release).
  detail::SettleJournal::Entry script_call(const RedisReservation& r,
                                           std::string_view op,
                                           std::span<const Cost> actual,
                                           const Settlement* s) const {
    detail::SettleJournal::Entry e = script_head(r, op);
    if (s != nullptr) e.keys.push_back(settled_key(r));
    for (std::size_t i = 0; i < r.items_.size(); ++i) {
      const auto& it = r.items_[i];
      append_period(r, i, e.args);
      // What Redis holds: extensions granted while it was away are not.
      e.args.push_back(
          std::to_string(std::min<Cost>(it.held - it.unrecorded, kCap)));
      e.args.push_back(
          std::to_string(actual.empty() ? 0 : std::min<Cost>(actual[i], kCap)));
    }
    if (s != nullptr) {
      e.args.push_back(std::to_string(
          std::max<std::int64_t>(1, options_.settled_ttl.count() / 1'000'000)));
      e.args.push_back(std::to_string(std::min<std::int64_t>(
          s->cost.nanos, static_cast<std::int64_t>(kCap))));
      e.args.push_back(std::to_string(std::min<Cost>(s->tokens, kCap)));
      e.args.emplace_back(s->estimated ? "1" : "0");
    }
    return e;
  }

  absl::StatusOr<absl::InlinedVector<std::int64_t, 8>> run(
      const detail::SettleJournal::Entry& e) {
    absl::InlinedVector<std::string_view, 8> k(e.keys.begin(), e.keys.end());
    absl::InlinedVector<std::string_view, 24> a(e.args.begin(), e.args.end());
    return client_->eval_ints(detail::redis_script(), k, a);
  }

  absl::Status journal_entry(detail::SettleJournal::Entry e) {
    if (journal_ == nullptr) {
      return absl::UnavailableError("redis away and no journal configured");
    }
    e.t = unix_now();
    if (absl::Status st = journal_->append(std::move(e)); !st.ok()) return st;
    journaled_.fetch_add(1, std::memory_order_relaxed);
    return absl::OkStatus();
  }
  absl::Status journal_release(const RedisReservation& r) {
    return journal_entry(script_call(r, "release", {}, nullptr));
  }

  // Replays a slice of the journal before a reserve or settle: at most
  // replay_slice (by default an eighth of command_timeout) of batches,
  // started only while the breaker lets calls through, one replayer at a
  // time (a call finding another replaying goes on at once), and at most
  // one try a second after a failed one, so that a journal Redis keeps
  // refusing does not cost every call a round trip.
  void replay_if_due() {
    if (journal_ == nullptr || journal_->size() == 0) return;
    if (client_->breaker_refuses()) return;
    const auto now = std::chrono::steady_clock::now();
    if (now.time_since_epoch().count() <
        next_replay_.load(std::memory_order_relaxed)) {
      return;
    }
    if (!replay_mu_.try_lock()) return;
    const Nanos slice = options_.replay_slice > Nanos{0}
                            ? options_.replay_slice
                            : client_->options().command_timeout / 8;
    if (!replay_locked(now + slice).ok()) {
      next_replay_.store(
          (now + std::chrono::seconds(1)).time_since_epoch().count(),
          std::memory_order_relaxed);
    }
    replay_mu_.unlock();
  }

  // Whether a journaled settle may find its request id's #settled key
  // expired: journaled settled_ttl ago, less a margin (a tenth of it, at
  // most an hour) for a settle that ran before it was journaled (a
  // time-out) and for clocks. Replayed, it could charge a second time.
  bool stale_settle(const detail::SettleJournal::Entry& e, Nanos now) const {
    if (e.t <= Nanos{0} || e.args.size() < 2 || e.args[1] != "settle") {
      return false;
    }
    const Nanos ttl = options_.settled_ttl;
    const Nanos margin = std::min<Nanos>(ttl / 10, std::chrono::hours(1));
    return now - e.t >= ttl - margin;
  }

  // Runs the journal in order, in pipelined batches, until it is empty or
  // (with a deadline) no batch may start after `until`. A stale settle is
  // set aside, never run. A batch's first failure (no answer, or an error
  // reply: Redis out of memory, a key of ours overwritten) stops the
  // replay there, reported; that entry and those after it stay, to run
  // again later (every line is idempotent: a batch's later entries that
  // ran already change nothing the second time).
  absl::StatusOr<std::size_t> replay_locked(
      std::optional<std::chrono::steady_clock::time_point> until)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(replay_mu_) {
    std::size_t ran = 0;
    for (;;) {
      const std::vector<const detail::SettleJournal::Entry*> batch =
          journal_->front(kReplayBatch);
      if (batch.empty()) return ran;
      const Nanos now = unix_now();
      std::size_t stale = 0;
      while (stale < batch.size() && stale_settle(*batch[stale], now)) {
        ++stale;
      }
      if (stale > 0) {
        // The stale settles at the front: set aside together, one sync.
        if (absl::Status st = journal_->set_aside(stale); !st.ok()) {
          replay_errors_.fetch_add(1, std::memory_order_relaxed);
          return st;
        }
        stale_.fetch_add(stale, std::memory_order_relaxed);
        if (until && std::chrono::steady_clock::now() >= *until) return ran;
        continue;
      }
      std::size_t n = 0;
      while (n < batch.size() && !stale_settle(*batch[n], now)) ++n;
      std::vector<std::vector<std::string_view>> views(2 * n);
      std::vector<RedisClient::EvalCall> calls(n);
      for (std::size_t i = 0; i < n; ++i) {
        views[2 * i].assign(batch[i]->keys.begin(), batch[i]->keys.end());
        views[2 * i + 1].assign(batch[i]->args.begin(), batch[i]->args.end());
        calls[i] = {views[2 * i], views[2 * i + 1]};
      }
      const std::vector<RedisClient::IntsOr> replies =
          client_->eval_pipelined(detail::redis_script(), calls);
      std::size_t done = 0;
      while (done < n && replies[done].ok()) ++done;
      if (absl::Status st = journal_->pop(done); !st.ok()) {
        replay_errors_.fetch_add(1, std::memory_order_relaxed);
        return st;
      }
      ran += done;
      if (done < n) {
        replay_errors_.fetch_add(1, std::memory_order_relaxed);
        return replies[done].status();
      }
      if (until && std::chrono::steady_clock::now() >= *until) return ran;
    }
  }

  absl::StatusOr<Settlement> settle_reservation(RedisReservation& r,
                                                const Usage& used) {
    replay_if_due();
    absl::StatusOr<Money> cost = PriceTable::cost(r.prices_, used);
    if (!cost.ok()) return cost.status();
    const Settlement s{*cost, used.total(),
                       used.source != UsageSource::kReported};
    absl::InlinedVector<Cost, 4> actual;
    for (const auto& it : r.items_) {
      actual.push_back(detail::settle_target(false, it.money, s));
    }
    const auto e = script_call(r, "settle", actual, &s);
    absl::StatusOr<absl::InlinedVector<std::int64_t, 8>> reply = run(e);
    Settlement out = s;
    // The id was settled before (here or on another instance): the first
    // settlement stands, and every hold of this reservation goes back
    // (rules.hpp, rule 3): the script gave back its holds in Redis, the
    // kLocal shares and the rate limits are settled to nothing below.
    bool duplicate = false;
    if (reply.ok()) {
      if (reply->size() < 5) {
        return absl::InternalError("redis: malformed settle reply");
      }
      if ((*reply)[0] == 2) {
        duplicate = true;
        out = Settlement{Money{(*reply)[2]},
                         static_cast<std::uint64_t>((*reply)[3]),
                         (*reply)[4] != 0};
      } else if (on_threshold_ && reply->size() == 5 + r.items_.size()) {
        // An overage crosses thresholds too, in the period open now only
        // (rules.hpp, rule 4): one counted in a period that has ended
        // changes nothing now.
        for (std::size_t i = 0; i < r.items_.size(); ++i) {
          if (!period_open_now(r, i)) continue;
          const std::int64_t after = (*reply)[5 + i];
          const Cost held = r.items_[i].held - r.items_[i].unrecorded;
          if (after < 0 || actual[i] <= held) continue;
          const auto a = static_cast<std::uint64_t>(after);
          const Cost extra = actual[i] - held;
          fire_crossed(r, i, a >= extra ? a - extra : 0, a,
                       budgets_[r.items_[i].budget].limit->limit());
        }
      }
    } else if (absl::IsUnavailable(reply.status()) ||
               (RedisClient::is_auth_error(reply.status()) &&
                journal_ != nullptr)) {
      // Credentials refused: nothing ran, and the charge is kept in the
      // journal until they work again (without a journal, the status).
      if (absl::Status st = journal_entry(e); !st.ok()) {
        // Not journaled: nothing happened that a later settle cannot do.
        return st;
      }
    } else {
      return reply.status();
    }
    if (duplicate) {
      for (std::size_t i = 0; i < r.items_.size(); ++i) {
        actual[i] = detail::settle_target(true, r.items_[i].money, s);
      }
    }
    settle_local(r, actual);
    settle_limits(r, duplicate ? nullptr : &s);
    r.done_ = true;
    r.settled_ = out;
    return out;
  }

  // The rate limits passed to reserve(), through their receipts, as the
  // in-process Accountant settles them: given back (`s` null: released, or
  // settled as a duplicate); settled, each to its unit's amount
  // (detail::limit_target; a request limit keeps its request). Each limit
  // by its own clock (Redis's, or a kLocal share's). A settle Redis does
  // not answer leaves that limit holding its take (the conservative side:
  // it ends with the take's window or stretch).
  void settle_limits(RedisReservation& r, const Settlement* s) {
    for (std::size_t i = 0; i < r.first_budget_; ++i) {
      LimitResult& lr = r.decision_.results[i];
      if (!lr.receipt) continue;
      Cost actual = 0;
      if (s != nullptr) {
        const std::optional<Cost> to =
            detail::limit_target(false, lr.limit->unit(), *s);
        if (!to) {
          lr.receipt = Receipt();  // the request happened: it stays counted
          continue;
        }
        actual = *to;
      }
      if (absl::Status st = chain_.settle(r.decision_, i, actual, test_now());
          !st.ok()) {
        lr.receipt = Receipt();
      }
    }
  }

  absl::StatusOr<bool> extend(RedisReservation& r, std::uint64_t output) {
    Usage u;
    u.input_uncached = r.estimate_.prompt_tokens;
    u.output = output;
    absl::StatusOr<Money> cost = PriceTable::cost(r.prices_, u);
    if (!cost.ok()) return cost.status();
    absl::InlinedVector<Cost, 4> add;
    bool any = false;
    for (const auto& it : r.items_) {
      add.push_back(detail::growth(
          it.held, detail::budget_amount(it.money, *cost, u.total())));
      any = any || add.back() != 0;
    }
    if (!any) return true;
    if (r.backed_) {
      detail::SettleJournal::Entry e = script_head(r, "extend");
      for (std::size_t i = 0; i < r.items_.size(); ++i) {
        append_period(r, i, e.args);
        e.args.push_back(
            std::to_string(budgets_[r.items_[i].budget].limit->limit()));
        e.args.push_back(std::to_string(std::min<Cost>(add[i], kCap)));
      }
      absl::StatusOr<absl::InlinedVector<std::int64_t, 8>> reply = run(e);
      if (reply.ok()) {
        if (reply->size() == 2 && (*reply)[0] == -3) {
          return absl::FailedPreconditionError(
              "next_chunk_fits: the reservation's holds are gone (released, "
              "or its key expired)");
        }
        if (reply->size() >= 2 && (*reply)[0] == 0) return false;
        if (reply->size() != 2 + r.items_.size()) {
          return absl::InternalError("redis: malformed extend reply");
        }
        for (std::size_t i = 0; i < r.items_.size(); ++i) {
          r.items_[i].held += add[i];
          // Growth in a period that has ended fires nothing now (rules.hpp,
          // rule 4).
          if (on_threshold_ && add[i] > 0 && period_open_now(r, i)) {
            const auto after = static_cast<std::uint64_t>((*reply)[2 + i]);
            fire_crossed(r, i, after >= add[i] ? after - add[i] : 0, after,
                         budgets_[r.items_[i].budget].limit->limit());
          }
        }
        return true;
      }
      if (!absl::IsUnavailable(reply.status())) return reply.status();
    }
    // Redis away: each budget's fail mode; the extension is not in Redis
    // (`unrecorded`), so a settle charges it there in full.
    absl::InlinedVector<ChainItem, 4> local;
    for (std::size_t i = 0; i < r.items_.size(); ++i) {
      if (add[i] == 0) continue;
      RedisLimit<PeriodBudget>& l = *budgets_[r.items_[i].budget].limit;
      l.note_fallback(absl::UnavailableError("redis away: extension"));
      if (l.redis_options().fail == FailMode::kClosed) return false;
      if (l.local_limit() != nullptr) {
        local.push_back({l.local_limit(), r.items_[i].key, add[i]});
      }
    }
    if (!local.empty()) {
      Chain<ManualClock> c{ManualClock(r.decision_.at)};
      ChainDecision taken =
          c.acquire_at(std::span<const ChainItem>(local), r.decision_.at);
      if (!taken.allowed) return false;
      // Each take's receipt goes with its budget, to be settled with it.
      std::size_t j = 0;
      for (std::size_t i = 0; i < r.items_.size(); ++i) {
        if (add[i] == 0 ||
            budgets_[r.items_[i].budget].limit->local_limit() == nullptr) {
          continue;
        }
        r.items_[i].local.push_back(std::move(taken.results[j++].receipt));
      }
      r.local_ = true;
    }
    for (std::size_t i = 0; i < r.items_.size(); ++i) {
      r.items_[i].held += add[i];
      r.items_[i].unrecorded += add[i];
    }
    return true;
  }

  // Whether item `i`'s period (the reservation's) is the one open now.
  bool period_open_now(const RedisReservation& r, std::size_t i) const {
    const Period& p = *budgets_[r.items_[i].budget].spec.period;
    return detail::fires_now(p.index_of(r.decision_.at),
                             p.index_of(unix_now()));
  }

  // Fires each soft threshold of item `i`'s budget that its spend crossed
  // going from `before` to `after`, once per key and period across every
  // instance (a key in Redis remembers it; Redis away: not fired).
  void fire_crossed(const RedisReservation& r, std::size_t i,
                    std::uint64_t before, std::uint64_t after,
                    std::uint64_t limit) {
    const Budget& b = budgets_[r.items_[i].budget];
    for (const std::uint32_t t : b.spec.soft_permille) {
      if (!detail::crosses(before, after, limit, t)) continue;
      const Period::Span span = b.spec.period->span_of(r.decision_.at);
      std::string what =
          absl::StrCat(b.spec.name, "/", t, "/", span.index, "/");
      what += r.items_[i].key;
      const std::string k =
          redis_key(client_->options().prefix, "#fired", r.tenant_, what);
      const std::string_view keys[] = {k};
      const std::string now = now_arg();
      const std::string ttl = std::to_string(std::max<std::int64_t>(
          1, (span.end - r.decision_.at).count() / 1'000'000 + 3'600'000));
      const std::string_view args[] = {now, "fire", ttl};
      auto fired = client_->eval_ints(detail::redis_script(), keys, args);
      if (fired.ok() && fired->size() == 2 && (*fired)[0] == 1) {
        on_threshold_(
            ThresholdEvent{b.spec.name, r.items_[i].key, t, after, limit});
      }
    }
  }

  // kLocal holds (taken while Redis was away) settle in process too, so the
  // instance's share keeps counting what it admitted.
  //
  // Through the receipts of the local takes: the reserve's (in decision_,
  // when the chain fell back to the local shares) and each extension's;
  // the give-backs bounded by each receipt, an excess on the last one, all
  // in the period each was counted in (PeriodBudget::settle).
  void settle_local(RedisReservation& r, std::span<const Cost> actual) {
    if (!r.local_) return;
    const Nanos at = r.decision_.at;
    for (std::size_t i = 0; i < r.items_.size(); ++i) {
      auto& it = r.items_[i];
      Limit* l = budgets_[it.budget].limit->local_limit();
      if (l == nullptr) continue;
      absl::InlinedVector<Receipt*, 4> receipts;
      if (!r.backed_) {
        Receipt& first = r.decision_.results[r.first_budget_ + i].receipt;
        if (first) receipts.push_back(&first);
      }
      for (Receipt& x : it.local) {
        if (x) receipts.push_back(&x);
      }
      Cost left = actual.empty() ? 0 : actual[i];
      for (std::size_t k = 0; k < receipts.size(); ++k) {
        const bool last = k + 1 == receipts.size();
        const Cost to = last ? left : std::min(left, receipts[k]->cost());
        left -= to;
        static_cast<void>(l->settle(*receipts[k], to, at));
      }
      it.local.clear();
    }
  }

  void release_reservation(RedisReservation& r) noexcept {
    if (r.done_) return;
    r.done_ = true;
    settle_local(r, {});
    settle_limits(r, nullptr);
    if (!r.backed_) return;  // nothing held in Redis
    const auto e = script_call(r, "release", {}, nullptr);
    absl::StatusOr<absl::InlinedVector<std::int64_t, 8>> reply = run(e);
    if (!reply.ok() && (absl::IsUnavailable(reply.status()) ||
                        RedisClient::is_auth_error(reply.status()))) {
      // Journaled, or (no journal) held until the period ends: the
      // conservative side.
      static_cast<void>(journal_entry(e));
    }
  }

  static constexpr Cost kCap = detail::kExact / 2;
  // Journal entries per pipelined replay batch: a few hundred microseconds
  // of Redis's time, so a slice stops close to its deadline.
  static constexpr std::size_t kReplayBatch = 64;

  const PriceTable prices_;
  const std::shared_ptr<RedisClient> client_;
  RedisChain chain_;
  const RedisAccountantOptions options_;
  std::vector<Budget> budgets_;
  std::uint64_t instance_ = 0;
  std::atomic<std::uint64_t> next_{0};
  // Set by create, then only read (the journal locks itself).
  std::unique_ptr<detail::SettleJournal> journal_;
  // The replayer's: one at a time (a slice before a call, or
  // replay_journal()).
  detail::Mutex replay_mu_;
  std::atomic<std::uint64_t> stale_{0};
  std::atomic<std::uint64_t> fallback_reserves_{0};
  std::atomic<std::uint64_t> auth_refusals_{0};
  std::atomic<std::uint64_t> journaled_{0};
  std::atomic<std::uint64_t> replay_errors_{0};
  std::atomic<std::int64_t> next_replay_{0};  // steady clock ticks
  ThresholdCallback on_threshold_;
};

inline RedisReservation& RedisReservation::operator=(
    RedisReservation&& o) noexcept {
  if (this != &o) {
    release();
    acct_ = std::exchange(o.acct_, nullptr);
    decision_ = std::move(o.decision_);
    first_budget_ = o.first_budget_;
    request_id_ = std::move(o.request_id_);
    tenant_ = std::move(o.tenant_);
    mark_ = std::move(o.mark_);
    prices_ = o.prices_;
    estimate_ = o.estimate_;
    items_ = std::move(o.items_);
    reserved_money_ = o.reserved_money_;
    reserved_tokens_ = o.reserved_tokens_;
    backed_ = o.backed_;
    local_ = o.local_;
    done_ = o.done_;
    settled_ = o.settled_;
    worst_output_ = o.worst_output_;
  }
  return *this;
}

inline absl::StatusOr<Settlement> RedisReservation::settle(const Usage& used) {
  if (settled_) return *settled_;
  if (acct_ == nullptr || !granted() || done_) {
    return absl::FailedPreconditionError(
        "settle: the reservation was not granted or was released");
  }
  return acct_->settle_reservation(
      *this, detail::partial_charge(
                 used, estimate_,
                 std::max(estimate_.max_output_tokens, worst_output_)));
}

inline absl::StatusOr<bool> RedisReservation::next_chunk_fits(
    std::uint64_t output_so_far, std::uint64_t next_tokens) {
  if (acct_ == nullptr || !granted() || done_) {
    return absl::FailedPreconditionError(
        "next_chunk_fits: the reservation is not live");
  }
  if (output_so_far > kMaxUsageTokens || next_tokens > kMaxUsageTokens) {
    return absl::InvalidArgumentError(
        "next_chunk_fits: token counts must be at most 2^48");
  }
  absl::StatusOr<bool> fits = acct_->extend(*this, output_so_far + next_tokens);
  if (fits.ok() && *fits) {
    worst_output_ = std::max(worst_output_, output_so_far + next_tokens);
  }
  return fits;
}

inline void RedisReservation::release() noexcept {
  if (acct_ != nullptr && granted() && !done_)
    acct_->release_reservation(*this);
  acct_ = nullptr;
}

}  // namespace ratekeeper

#endif  // RATEKEEPER_REDIS_ACCOUNTANT_HPP_
