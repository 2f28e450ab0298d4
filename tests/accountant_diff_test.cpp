// One semantics for both accountants (issue 16): every scenario is written
// once against a small backend adaptor and run against the in-process
// Accountant (a ManualClock) and the RedisAccountant (a redis-server of the
// test's own, its scripts run at the same driven time through
// RedisAccountantOptions::test_clock). Each observation (statuses, grants,
// settlements, spend per budget in the open period, forecasts, rate limits
// left, threshold events) is checked against a value the test states (or
// an oracle of its own computes), and the two backends' traces must be
// equal, line by line.
//
// In-process scenarios that do not apply to Redis, and why:
//   - max_output_that_fits: RedisAccountant has no such call.
//   - reset() and set_budget_limit() (and so a refund after a limit
//     change): RedisAccountant has no administrator calls; its limits are
//     what add_budget() was given.
//   - the ledger (set_audit, replay, checkpoints) and a full budget store
//     (kResourceExhausted): Redis keeps no ledger (its AOF is the record)
//     and never fills.
//   - the idempotency window counted in ids (set_idempotency_window): Redis
//     remembers a settled id for a time (settled_ttl) instead.
//   - forgetting fired thresholds of ended periods (threshold_memory):
//     Redis's "fired" keys expire with their period.
//   - request ids and models outside printable ASCII: the in-process
//     accountant refuses them because the ledger writes them; Redis keys
//     are hex and keep any bytes.
//   - a subject lacking the tenant's field (by default the org): Redis
//     needs it for the hash tag (kInvalidArgument), in process only the
//     budgets' fields matter; every subject here has an org.
//   - how long an ended period's spend is remembered (what a late stream of
//     that period grows against): in process until the store reclaims the
//     idle state, in Redis until the key expires at the period's end. On
//     the test clock Redis keeps keys 10 minutes of real time, so here both
//     still hold it (docs/budgets.md, rule 2).
//   - T6a (64 racing reservations): a race, not a deterministic trace; each
//     backend's own test runs it (accountant_test, redis_accountant_test).
// And the other way: what only Redis has (its fail modes, the journal, a
// reservation whose holds Redis lost) is in redis_accountant_test, except
// the duplicate settle of a reservation held by a kLocal share, which is
// the rule of this file (below).
#include <signal.h>
#include <stdlib.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <type_traits>
#include <vector>

#include "absl/strings/escaping.h"
#include "ratekeeper/budget/accountant.hpp"
#include "ratekeeper/budget/redis_accountant.hpp"
#include "ratekeeper/errors.hpp"
#include "ratekeeper/policy/fixed_window.hpp"
#include "ratekeeper/policy/token_bucket.hpp"
#include "redis_server.hpp"
#include "redis_wait.hpp"
#include "test_prices.hpp"
#include "test_util.hpp"

using namespace ratekeeper;
using rk_test::RedisServer;

namespace {

const Nanos kT0{1'796'083'200LL * 1'000'000'000};  // 2026-12-01 UTC
constexpr Nanos kMinute = std::chrono::minutes(1);
constexpr Nanos kHour = std::chrono::hours(1);
constexpr Nanos kDay = std::chrono::hours(24);

// ---- what an observation looks like in a trace ---------------------------

std::string show(const absl::Status& s) {
  return s.ok() ? "OK" : absl::StatusCodeToString(s.code());
}
std::string show(absl::StatusCode c) { return absl::StatusCodeToString(c); }
std::string show(bool b) { return b ? "true" : "false"; }
template <class T>
requires(std::is_integral_v<T> && !std::is_same_v<T, bool>) std::string
    show(T v) {
  return std::to_string(v);
}
std::string show(const std::string& s) { return s; }
std::string show(const char* s) { return s; }
std::string show(Money m) { return std::to_string(m.nanos) + " nUSD"; }
std::string show(Nanos t) { return std::to_string(t.count()) + " ns"; }
std::string show(const Settlement& s) {
  return absl::StrCat(s.cost.nanos, " nUSD ", s.tokens, " tokens",
                      s.estimated ? " estimated" : "");
}
std::string show(const std::optional<Settlement>& s) {
  return s ? show(*s) : "none";
}
std::string show(const std::optional<Nanos>& t) {
  return t ? show(*t) : "none";
}
std::string show(const ThresholdEvent& e) {
  return absl::StrCat(e.budget, "/", absl::CEscape(e.key), "/", e.permille, "/",
                      e.spent, "/", e.limit);
}
std::string show(const std::vector<ThresholdEvent>& v) {
  std::string out = "[";
  for (const ThresholdEvent& e : v) out += show(e) + " ";
  return out + "]";
}
std::string show(const std::vector<std::uint64_t>& v) {
  std::string out = "[";
  for (const std::uint64_t e : v) out += std::to_string(e) + " ";
  return out + "]";
}
template <class T>
std::string show(const absl::StatusOr<T>& s) {
  return s.ok() ? show(*s) : show(s.status().code());
}

Usage used(std::uint64_t in, std::uint64_t out) {
  Usage u;
  u.input_uncached = in;
  u.output = out;
  return u;
}

BudgetSpec budget(std::string name, Field scope, BudgetUnit unit,
                  std::uint64_t limit, PeriodKind kind,
                  std::vector<std::uint32_t> soft = {}) {
  return BudgetSpec{std::move(name),
                    Scope(scope),
                    unit,
                    limit,
                    Period::calendar(kind).value(),
                    std::move(soft)};
}

// ---- the backends --------------------------------------------------------

// What both adaptors share: the driven clock, the trace, the thresholds
// fired (in the order their callbacks ran).
struct Backend {
  explicit Backend(const char* n) : name(n) {}
  const char* name;
  ManualClock clock{kT0};
  std::vector<std::string> trace;
  std::vector<ThresholdEvent> fired;

  void at(Nanos t) { clock.set(t); }
  Nanos now() const { return clock.now(); }
};

class InProcess : public Backend {
 public:
  using Res = Reservation<ManualClock>;
  InProcess() : Backend("in-process"), acct_(rk_test::flat_prices(), clock) {
    acct_.on_threshold([this](const ThresholdEvent& e) { fired.push_back(e); });
  }
  absl::Status add_budget(const BudgetSpec& s) { return acct_.add_budget(s); }
  absl::StatusOr<Res> reserve(const Subject& who, std::string_view model,
                              const Estimate& e, std::string id,
                              std::span<const ChainItem> limits = {}) {
    return acct_.reserve(who, model, e, std::move(id), limits);
  }
  // Spend of budget `b` for `who` in the period open now.
  std::uint64_t spent(std::string_view b, const Subject& who) {
    const absl::StatusOr<Forecast> f = acct_.forecast(b, who);
    REQUIRE(f.ok());
    return f->spent;
  }
  absl::StatusOr<Forecast> forecast(std::string_view b, const Subject& who) {
    return acct_.forecast(b, who);
  }
  std::optional<Settlement> settlement(const Subject&, std::string_view id) {
    return acct_.find_settlement(id);
  }
  Limit* token_limit(std::string n, Rate r, Cost burst) {
    limits_.push_back(make_limit({.name = std::move(n), .unit = Unit::kTokens},
                                 TokenBucket::create(r, burst).value())
                          .value());
    return limits_.back().get();
  }
  Limit* request_limit(std::string n, Rate r) {
    limits_.push_back(
        make_limit({.name = std::move(n)}, FixedWindow::create(r).value())
            .value());
    return limits_.back().get();
  }
  // What each of `limits` has left for its key now.
  std::vector<std::uint64_t> left(const Subject&,
                                  std::span<const ChainItem> limits) {
    std::vector<std::uint64_t> out;
    for (const ChainItem& it : limits) {
      out.push_back(it.limit->peek(it.key, 0, now()).remaining);
    }
    return out;
  }

 private:
  Accountant<ManualClock> acct_;
  std::vector<std::unique_ptr<Limit>> limits_;
};

// One redis-server for the scenarios; each backend its own key prefix.
RedisServer& shared_server() {
  static RedisServer server;
  return server;
}

std::shared_ptr<RedisClient> client_for(int port, const std::string& prefix) {
  auto c =
      RedisClient::create({.port = port,
                           .prefix = prefix,
                           .connect_timeout = std::chrono::seconds(5),
                           .command_timeout = std::chrono::seconds(5),
                           .breaker_open = std::chrono::milliseconds(50),
                           .breaker_max_open = std::chrono::milliseconds(200)});
  REQUIRE(c.ok());
  return *c;
}

class InRedis : public Backend {
 public:
  using Res = RedisReservation;
  explicit InRedis(int port = shared_server().port(),
                   std::string journal = std::string())
      : Backend("redis"),
        client_(client_for(port, absl::StrCat("d", next_prefix(), ":"))) {
    acct_ =
        RedisAccountant::create(rk_test::flat_prices(), client_,
                                {.journal_path = std::move(journal),
                                 .test_clock = [c = clock] { return c.now(); }})
            .value();
    acct_->on_threshold(
        [this](const ThresholdEvent& e) { fired.push_back(e); });
  }
  absl::Status add_budget(const BudgetSpec& s, RedisLimitOptions o = {}) {
    return acct_->add_budget(s, o);
  }
  absl::StatusOr<Res> reserve(const Subject& who, std::string_view model,
                              const Estimate& e, std::string id,
                              std::span<const ChainItem> limits = {}) {
    return acct_->reserve(who, model, e, std::move(id), limits);
  }
  std::uint64_t spent(std::string_view b, const Subject& who) {
    const absl::StatusOr<std::uint64_t> s = acct_->spent(b, who);
    REQUIRE(s.ok());
    return *s;
  }
  absl::StatusOr<Forecast> forecast(std::string_view b, const Subject& who) {
    return acct_->forecast(b, who);
  }
  std::optional<Settlement> settlement(const Subject& who,
                                       std::string_view id) {
    return acct_->find_settlement(who, id).value();
  }
  Limit* token_limit(std::string n, Rate r, Cost burst) {
    limits_.push_back(RedisLimit<TokenBucket>::create(
                          {.name = std::move(n), .unit = Unit::kTokens},
                          TokenBucket::create(r, burst).value(), client_,
                          {.test_time = true})
                          .value());
    return limits_.back().get();
  }
  Limit* request_limit(std::string n, Rate r) {
    limits_.push_back(
        RedisLimit<FixedWindow>::create({.name = std::move(n)},
                                        FixedWindow::create(r).value(), client_,
                                        {.test_time = true})
            .value());
    return limits_.back().get();
  }
  // A rate limit of a reservation is keyed under the tenant in Redis: read
  // through a reservation of zero-cost takes, released at once.
  std::vector<std::uint64_t> left(const Subject& who,
                                  std::span<const ChainItem> limits) {
    std::vector<ChainItem> zero(limits.begin(), limits.end());
    for (ChainItem& z : zero) z.cost = 0;
    auto p = acct_->reserve(who, "m", {1, 0}, absl::StrCat("probe-", probes_++),
                            zero);
    REQUIRE(p.ok());
    REQUIRE(p->granted());
    std::vector<std::uint64_t> out;
    for (std::size_t i = 0; i < limits.size(); ++i) {
      out.push_back(p->decision().results[i].decision.remaining);
    }
    p->release();
    return out;
  }
  RedisAccountant& acct() { return *acct_; }

 private:
  static int next_prefix() {
    static std::atomic<int> n{0};
    return n.fetch_add(1);
  }
  std::shared_ptr<RedisClient> client_;
  std::unique_ptr<RedisAccountant> acct_;
  std::vector<std::unique_ptr<RedisLimitBase>> limits_;
  int probes_ = 0;
};

// Records `got` in the backend's trace and checks it against `want`.
template <class B, class T, class U>
void expect(B& b, const std::string& what, const T& got, const U& want) {
  INFO(b.name << ": " << what);
  const std::string g = show(got);
  CHECK(g == show(want));
  b.trace.push_back(what + ": " + g);
}

// Runs `scenario` against both backends, then compares their traces.
template <class F>
void both(const F& scenario) {
  InProcess a;
  scenario(a);
  InRedis r;
  scenario(r);
  if (std::getenv("RK_DIFF_TRACE") != nullptr) {  // to read a scenario
    for (const std::string& line : a.trace) std::printf("%s\n", line.c_str());
  }
  CHECK(a.trace.size() == r.trace.size());
  for (std::size_t i = 0; i < std::min(a.trace.size(), r.trace.size()); ++i) {
    INFO("observation " << i);
    CHECK(a.trace[i] == r.trace[i]);
  }
}

const Subject kWho{.user = "u", .team = "t", .org = "o"};

std::string temp_path(const char* name) {
  char tmpl[] = "/tmp/rk_diff_XXXXXX";
  REQUIRE(mkdtemp(tmpl) != nullptr);
  return std::string(tmpl) + "/" + name;
}

}  // namespace

// ---- the scenarios --------------------------------------------------------

TEST_CASE(
    "both accountants: reserve holds the worst case, settle keeps what was "
    "used, a retried settle or reserve changes nothing, an overage is charged "
    "past the limit",
    "[i16][redis][budget]") {
  both([](auto& b) {
    REQUIRE(b.add_budget(budget("team", Field::kTeam, BudgetUnit::kNanoUsd,
                                1'000'000, PeriodKind::kMonth))
                .ok());
    auto r = b.reserve(kWho, "m", {100, 400}, "req-1");
    REQUIRE(r.ok());
    expect(b, "granted", r->granted(), true);
    expect(b, "reserved", r->reserved_money(), Money{500'000});
    expect(b, "spent held", b.spent("team", kWho), 500'000u);
    const auto s = r->settle(used(100, 50));
    expect(b, "settled", s, Settlement{Money{150'000}, 150, false});
    expect(b, "spent settled", b.spent("team", kWho), 150'000u);
    expect(b, "settled again", r->settle(used(100, 400)),
           Settlement{Money{150'000}, 150, false});
    expect(b, "spent after retry", b.spent("team", kWho), 150'000u);
    expect(b, "found", b.settlement(kWho, "req-1"),
           Settlement{Money{150'000}, 150, false});
    expect(b, "found unknown", b.settlement(kWho, "req-x"),
           std::optional<Settlement>());
    expect(b, "reserve a settled id",
           b.reserve(kWho, "m", {100, 400}, "req-1").status().code(),
           absl::StatusCode::kAlreadyExists);
    expect(b, "spent after refused retry", b.spent("team", kWho), 150'000u);
    auto big = b.reserve(kWho, "m", {10, 10}, "req-2");
    REQUIRE(big.ok());
    expect(b, "big granted", big->granted(), true);
    expect(b, "overage", big->settle(used(10, 2'000)),
           Settlement{Money{2'010'000}, 2'010, false});
    expect(b, "spent past the limit", b.spent("team", kWho), 2'160'000u);
    auto refused = b.reserve(kWho, "m", {1, 0}, "req-3");
    REQUIRE(refused.ok());
    expect(b, "refused", refused->granted(), false);
    expect(b, "by the budget", refused->refused_by_budget(), true);
    // The refusal as the gateway answers it: 429 insufficient_quota until
    // the month ends.
    expect(b, "retry after", refused->decision().retry_after, 31 * kDay);
    const Rejection rej = Rejection::budget(refused->decision());
    expect(b, "refusal status", rej.status(), 429);
    expect(b, "refusal limit", rej.limit, std::string("team"));
    expect(b, "refusal message", rej.message,
           std::string("budget \"team\" is spent for this period (1000000 "
                       "nano-USD of 1000000); it resets at "
                       "2027-01-01T00:00:00Z"));
    expect(b, "settle refused", refused->settle(used(1, 0)).status().code(),
           absl::StatusCode::kFailedPrecondition);
    expect(b, "spent after refusal", b.spent("team", kWho), 2'160'000u);
  });
}

TEST_CASE(
    "both accountants: a dropped or released reservation gives everything "
    "back, a cancel charges the prompt, bad input holds nothing",
    "[i16][redis][budget]") {
  both([](auto& b) {
    REQUIRE(b.add_budget(budget("user", Field::kUser, BudgetUnit::kNanoUsd,
                                1'000'000, PeriodKind::kMonth))
                .ok());
    {
      auto r = b.reserve(kWho, "m", {500, 500}, "a");
      expect(b, "a granted", r->granted(), true);
      expect(b, "spent held", b.spent("user", kWho), 1'000'000u);
    }
    expect(b, "spent dropped", b.spent("user", kWho), 0u);
    auto r = b.reserve(kWho, "m", {1'000, 0}, "b");
    expect(b, "b granted", r->granted(), true);
    r->release();
    expect(b, "spent released", b.spent("user", kWho), 0u);
    expect(b, "settle released", r->settle(used(1, 1)).status().code(),
           absl::StatusCode::kFailedPrecondition);
    expect(b, "grow released", r->next_chunk_fits(0, 1).status().code(),
           absl::StatusCode::kFailedPrecondition);
    auto c = b.reserve(kWho, "m", {300, 700}, "c");
    expect(b, "cancelled", c->cancel_after_dispatch(),
           Settlement{Money{300'000}, 300, true});
    expect(b, "spent cancelled", b.spent("user", kWho), 300'000u);
    const auto code = [&](const Subject& who, std::string_view model,
                          Estimate e, std::string id) {
      return b.reserve(who, model, e, std::move(id)).status().code();
    };
    expect(b, "unknown model", code(kWho, "nope", {1, 1}, "d"),
           absl::StatusCode::kNotFound);
    expect(b, "no user", code({.team = "t", .org = "o"}, "m", {1, 1}, "e"),
           absl::StatusCode::kInvalidArgument);
    expect(b, "estimate past 2^48",
           code(kWho, "m", {kMaxUsageTokens + 1, 0}, "f"),
           absl::StatusCode::kInvalidArgument);
    expect(b, "output past 2^48", code(kWho, "m", {1, ~std::uint64_t{0}}, "g"),
           absl::StatusCode::kInvalidArgument);
    expect(b, "empty id", code(kWho, "m", {1, 1}, ""),
           absl::StatusCode::kInvalidArgument);
    expect(b, "long id", code(kWho, "m", {1, 1}, std::string(257, 'x')),
           absl::StatusCode::kInvalidArgument);
    expect(b, "empty model", code(kWho, "", {1, 1}, "h"),
           absl::StatusCode::kInvalidArgument);
    expect(b, "spent after errors", b.spent("user", kWho), 300'000u);
  });
}

TEST_CASE(
    "both accountants: one request id reserved twice in flight, the first "
    "settle stands and the other's holds go back",
    "[i16][redis][budget]") {
  both([](auto& b) {
    REQUIRE(b.add_budget(budget("team", Field::kTeam, BudgetUnit::kNanoUsd,
                                1'000'000, PeriodKind::kMonth))
                .ok());
    auto x = b.reserve(kWho, "m", {100, 100}, "req-7");
    auto y = b.reserve(kWho, "m", {100, 100}, "req-7");
    auto z = b.reserve(kWho, "m", {50, 50}, "req-7");
    expect(b, "x granted", x->granted(), true);
    expect(b, "y granted", y->granted(), true);
    expect(b, "z granted", z->granted(), true);
    expect(b, "spent three held", b.spent("team", kWho), 500'000u);
    const Settlement first{Money{150'000}, 150, false};
    expect(b, "x settles", x->settle(used(100, 50)), first);
    expect(b, "y settles second", y->settle(used(100, 100)), first);
    expect(b, "spent after y", b.spent("team", kWho), 250'000u);
    z->release();
    expect(b, "spent after z", b.spent("team", kWho), 150'000u);
    expect(b, "z settles after release", z->settle(used(1, 1)).status().code(),
           absl::StatusCode::kFailedPrecondition);
    expect(b, "reserve again",
           b.reserve(kWho, "m", {1, 1}, "req-7").status().code(),
           absl::StatusCode::kAlreadyExists);
    expect(b, "found", b.settlement(kWho, "req-7"), first);
    expect(b, "spent at the end", b.spent("team", kWho), 150'000u);
  });
}

TEST_CASE(
    "both accountants: a stream grows its reservation all or nothing; a "
    "partial or counted usage is settled at the worst case or the count",
    "[i16][redis][budget]") {
  both([](auto& b) {
    REQUIRE(b.add_budget(budget("user", Field::kUser, BudgetUnit::kNanoUsd,
                                1'000'000, PeriodKind::kMonth))
                .ok());
    REQUIRE(b.add_budget(budget("tokens", Field::kUser, BudgetUnit::kTokens,
                                800, PeriodKind::kDay))
                .ok());
    const auto spent = [&] {
      return absl::StrCat(b.spent("user", kWho), "/", b.spent("tokens", kWho));
    };
    auto r = b.reserve(kWho, "m", {100, 100}, "s");
    expect(b, "granted", r->granted(), true);
    expect(b, "spent held", spent(), "200000/200");
    expect(b, "within", r->next_chunk_fits(0, 100), true);
    expect(b, "spent within", spent(), "200000/200");
    expect(b, "grows", r->next_chunk_fits(100, 500), true);
    expect(b, "spent grown", spent(), "700000/700");
    expect(b, "past the tokens", r->next_chunk_fits(600, 200), false);
    expect(b, "spent cut", spent(), "700000/700");
    expect(b, "wrapping", r->next_chunk_fits(~std::uint64_t{0}, 1).status(),
           absl::InvalidArgumentError(""));
    expect(b, "counted", r->settle_without_usage(650),
           Settlement{Money{750'000}, 750, true});
    expect(b, "spent counted", spent(), "750000/750");
    expect(b, "grow settled", r->next_chunk_fits(1, 1).status().code(),
           absl::StatusCode::kFailedPrecondition);
    // A partial usage: the output at the worst case the stream grew to.
    auto p = b.reserve(kWho, "m", {10, 20}, "p");
    expect(b, "p granted", p->granted(), true);
    expect(b, "p grows", p->next_chunk_fits(0, 40), true);
    Usage part = used(10, 5);
    part.source = UsageSource::kPartial;
    expect(b, "partial", p->settle(part), Settlement{Money{50'000}, 50, true});
    expect(b, "spent partial", spent(), "800000/800");
    auto q = b.reserve(kWho, "m", {5, 5}, "q");
    expect(b, "q refused", q->granted(), false);
    expect(b, "q by the budget", q->refused_by_budget(), true);
    // settle_partial: the caller's count, never below the stream's.
    b.at(kT0 + kDay);
    auto c = b.reserve(kWho, "m", {10, 100}, "c");
    expect(b, "c granted", c->granted(), true);
    expect(b, "settle_partial", c->settle_partial(part, 30),
           Settlement{Money{40'000}, 40, true});
    expect(b, "spent next day", spent(), "840000/40");
  });
}

TEST_CASE(
    "both accountants: soft thresholds fire once per key and period, from a "
    "reserve, an overage and an extension",
    "[i16][redis][budget]") {
  both([](auto& b) {
    REQUIRE(b.add_budget(budget("team", Field::kTeam, BudgetUnit::kNanoUsd,
                                1'000'000, PeriodKind::kMonth, {500, 800}))
                .ok());
    for (int i = 0; i < 10; ++i) {
      auto r = b.reserve(kWho, "m", {100, 0}, "r" + std::to_string(i));
      REQUIRE(r->granted());
      REQUIRE(r->settle(used(100, 0)).ok());
    }
    const std::string key = "\x04\x01t";
    expect(b, "november", b.fired,
           std::vector<ThresholdEvent>{{"team", key, 500, 500'000, 1'000'000},
                                       {"team", key, 800, 800'000, 1'000'000}});
    b.fired.clear();
    b.at(kT0 + 31 * kDay);  // January
    auto r = b.reserve(kWho, "m", {600, 0}, "jan");
    REQUIRE(r->granted());
    REQUIRE(r->settle(used(600, 250)).ok());  // 850,000: past 80%
    b.at(kT0 + 62 * kDay);                    // February
    auto s = b.reserve(kWho, "m", {100, 0}, "feb");
    REQUIRE(s->next_chunk_fits(0, 500).value());  // 600,000: past 50%
    // An overage past the limit: the event carries the spend itself.
    auto t = b.reserve(kWho, "m", {100, 0}, "feb-2");
    REQUIRE(t->settle(used(100, 1'100)).ok());  // 600,000 + 1,200,000
    expect(
        b, "january and february", b.fired,
        std::vector<ThresholdEvent>{{"team", key, 500, 600'000, 1'000'000},
                                    {"team", key, 800, 850'000, 1'000'000},
                                    {"team", key, 500, 600'000, 1'000'000},
                                    {"team", key, 800, 1'800'000, 1'000'000}});
  });
}

TEST_CASE(
    "both accountants: a call's spend belongs to its reservation's period; "
    "after the turn it never charges, refunds or grows into the new one",
    "[i16][redis][budget]") {
  both([](auto& b) {
    b.at(kT0 - kMinute);  // Nov 30, 23:59 UTC
    REQUIRE(b.add_budget(budget("team_day", Field::kTeam, BudgetUnit::kNanoUsd,
                                100'000'000, PeriodKind::kDay, {500}))
                .ok());
    auto late = b.reserve(kWho, "m", {10, 10}, "late");
    auto stream = b.reserve(kWho, "m", {10, 10}, "stream");
    auto kept = b.reserve(kWho, "m", {10, 10}, "kept");
    auto under = b.reserve(kWho, "m", {10, 500}, "under");
    expect(b, "spent yesterday", b.spent("team_day", kWho), 570'000u);
    b.at(kT0 + kMinute);  // Dec 1, 00:01
    expect(b, "today starts empty", b.spent("team_day", kWho), 0u);
    // Nobody has opened today on this key: the stream grows in yesterday.
    expect(b, "grows in yesterday", kept->next_chunk_fits(0, 1'000), true);
    expect(b, "today untouched", b.spent("team_day", kWho), 0u);
    auto today = b.reserve(kWho, "m", {100, 0}, "today");
    expect(b, "today granted", today->granted(), true);
    expect(b, "today's spend", b.spent("team_day", kWho), 100'000u);
    // Yesterday's overage stays in yesterday (the provider billed it; the
    // settlement says so), not in today's state.
    expect(b, "late overage", late->settle(used(10, 52'510)),
           Settlement{Money{52'520'000}, 52'520, false});
    expect(b, "today after the overage", b.spent("team_day", kWho), 100'000u);
    // Yesterday's refund does not inflate today either.
    expect(b, "late refund", under->settle(used(10, 0)),
           Settlement{Money{10'000}, 10, false});
    expect(b, "today after the refund", b.spent("team_day", kWho), 100'000u);
    // A stream of yesterday cannot grow once today is open on its key:
    // yesterday's room is no longer known and today never pays for it.
    expect(b, "cannot grow into today", stream->next_chunk_fits(0, 5'000),
           false);
    expect(b, "today after the cut", b.spent("team_day", kWho), 100'000u);
    kept->release();
    stream->release();
    expect(b, "today after the releases", b.spent("team_day", kWho), 100'000u);
    // A threshold fires for today's own spend only (50% of 100,000,000).
    auto big = b.reserve(kWho, "m", {60'000, 0}, "big");
    expect(b, "big granted", big->granted(), true);
    expect(b, "fired", b.fired,
           std::vector<ThresholdEvent>{
               {"team_day", "\x04\x01t", 500, 60'100'000, 100'000'000}});
  });
}

TEST_CASE(
    "both accountants: an empty estimate still holds a unit, so a spent "
    "budget refuses it",
    "[i16][redis][budget]") {
  both([](auto& b) {
    REQUIRE(b.add_budget(budget("tokens", Field::kUser, BudgetUnit::kTokens,
                                100, PeriodKind::kDay))
                .ok());
    auto all = b.reserve(kWho, "m", {100, 0}, "all");
    REQUIRE(all->settle(used(100, 0)).ok());
    expect(b, "spent", b.spent("tokens", kWho), 100u);
    auto zero = b.reserve(kWho, "m", {0, 0}, "zero");
    REQUIRE(zero.ok());
    expect(b, "zero refused", zero->granted(), false);
    expect(b, "by the budget", zero->refused_by_budget(), true);
    const Subject v{.user = "v", .team = "t", .org = "o"};
    auto other = b.reserve(v, "m", {0, 0}, "zero-2");
    expect(b, "zero granted with room", other->granted(), true);
    expect(b, "holds one", b.spent("tokens", v), 1u);
    expect(b, "settles to nothing", other->settle(Usage{}),
           Settlement{Money{0}, 0, false});
    expect(b, "spent nothing", b.spent("tokens", v), 0u);
  });
}

TEST_CASE(
    "both accountants: forecast reads the spend, the pace and when it runs "
    "out, past the limit too",
    "[i16][redis][budget]") {
  both([](auto& b) {
    REQUIRE(b.add_budget(budget("team_day", Field::kTeam, BudgetUnit::kNanoUsd,
                                1'000'000, PeriodKind::kDay))
                .ok());
    b.at(kT0 + 6 * kHour);
    auto r = b.reserve(kWho, "m", {300, 0}, "a");
    REQUIRE(r->granted());
    const Forecast f = b.forecast("team_day", kWho).value();
    expect(b, "spent", f.spent, 300'000u);
    expect(b, "limit", f.limit, 1'000'000u);
    expect(b, "start", f.period_start, kT0);
    expect(b, "end", f.period_end, kT0 + kDay);
    expect(b, "projected", f.projected, 1'200'000u);
    expect(b, "exhausts", f.exhausts_at,
           std::optional<Nanos>(kT0 + 20 * kHour));
    expect(b, "pace", f.pace_per_hour, 38'888u);
    const Subject idle_who{.team = "idle", .org = "o"};
    const Forecast idle = b.forecast("team_day", idle_who).value();
    expect(b, "idle spent", idle.spent, 0u);
    expect(b, "idle lasts", idle.exhausts_at, std::optional<Nanos>());
    expect(b, "idle pace", idle.pace_per_hour, 55'555u);
    expect(b, "unknown budget", b.forecast("nope", kWho).status().code(),
           absl::StatusCode::kNotFound);
    REQUIRE(r->settle(used(100, 299'900)).ok());  // $0.30 on $0.001
    const Forecast over = b.forecast("team_day", kWho).value();
    expect(b, "over spent", over.spent, 300'000'000u);
    expect(b, "over exhausts now", over.exhausts_at,
           std::optional<Nanos>(b.now()));
    expect(b, "over pace", over.pace_per_hour, 0u);
  });
}

TEST_CASE(
    "both accountants: the rate limits of a reservation are settled with it "
    "and given back with it",
    "[i16][redis][budget]") {
  both([](auto& b) {
    REQUIRE(b.add_budget(budget("team", Field::kTeam, BudgetUnit::kNanoUsd,
                                1'000'000'000, PeriodKind::kMonth))
                .ok());
    Limit* rpm = b.request_limit("rpm", per_minute(100));
    Limit* tpm = b.token_limit("tpm", per_minute(10'000), 10'000);
    const ChainItem limits[] = {{rpm, "u", 1}, {tpm, "u", 2'000}};
    const Estimate e{1'000, 1'000};
    const auto left = [&] { return show(b.left(kWho, limits)); };
    {
      auto r = b.reserve(kWho, "m", e, "dropped", limits);
      expect(b, "granted", r->granted(), true);
      expect(b, "held", left(), "[99 8000 ]");
    }
    expect(b, "dropped", left(), "[100 10000 ]");
    auto released = b.reserve(kWho, "m", e, "released", limits);
    released->release();
    expect(b, "released", left(), "[100 10000 ]");
    auto over = b.reserve(kWho, "m", e, "over", limits);
    REQUIRE(over->settle(used(1'000, 1'100)).ok());
    expect(b, "over", left(), "[99 7900 ]");
    b.at(kT0 + kMinute);
    auto under = b.reserve(kWho, "m", e, "under", limits);
    REQUIRE(under->settle(used(1'000, 0)).ok());
    expect(b, "under", left(), "[99 9000 ]");
    auto twin = b.reserve(kWho, "m", e, "twin", limits);
    auto twin2 = b.reserve(kWho, "m", e, "twin", limits);
    REQUIRE(twin->settle(used(1'000, 0)).ok());
    REQUIRE(twin2->settle(used(1'000, 0)).ok());
    expect(b, "twins", left(), "[98 8000 ]");
    // A rate limit refuses: a 429, not the budget's.
    const ChainItem hogs[] = {{tpm, "u", 9'000}};
    auto hog = b.reserve(kWho, "m", {9'000, 0}, "hog", hogs);
    expect(b, "hog refused", hog->granted(), false);
    expect(b, "hog not by the budget", hog->refused_by_budget(), false);
  });
}

namespace {

// The oracle of the random scripts: the rule stated in docs/budgets.md,
// written from it and not from either accountant. Each budget's key holds
// the spend of one period (none once it is back to zero). A reservation
// holds max(amount, 1) of each budget in the period open at its reserve;
// every later change of it (growth, settle, release, a duplicate settle's
// give-back) goes to that period: applied while the key holds that period
// (or nothing, or an earlier one, for a charge), dropped once the key holds
// a later one; growth is refused then. A threshold fires for a change that
// lands in the period open now, once per key and period.
struct Oracle {
  struct Budget {
    std::string name;
    Field field;
    bool money;
    std::uint64_t limit;
    Period period;
    std::vector<std::uint32_t> soft;
  };
  struct State {
    std::int64_t period = 0;
    std::uint64_t spent = 0;  // 0: the key holds nothing
  };
  struct Open {
    std::string id;
    Subject who;
    Estimate e;
    std::vector<std::int64_t> period;
    std::vector<std::uint64_t> held;
    std::uint64_t worst = 0;  // the output grown to
  };
  std::vector<Budget> budgets;
  std::map<std::pair<std::size_t, std::string>, State> books;
  std::map<std::string, Settlement> settled;
  std::set<std::string> fired;  // budget/permille/key/period
  std::vector<ThresholdEvent> events;
  // How often the script met each case (each must be met).
  int refused = 0, dropped = 0, cut_by_later = 0, cut_by_limit = 0,
      ended_changes = 0, duplicates = 0;

  static std::string key_of(Field f, const Subject& who) {
    return subject_key(Scope(f), who).value();
  }
  static std::uint64_t amount(bool money, std::uint64_t tokens) {
    return money ? tokens * 1'000 : tokens;  // flat prices: 1,000 nUSD
  }
  State& state(std::size_t b, const Subject& who) {
    return books[{b, key_of(budgets[b].field, who)}];
  }
  // What the key has spent in period p (0 when it holds another).
  static std::uint64_t in(const State& st, std::int64_t p) {
    return st.spent != 0 && st.period == p ? st.spent : 0;
  }
  void cross(std::size_t b, const Subject& who, std::int64_t period,
             std::uint64_t before, std::uint64_t after) {
    const std::string key = key_of(budgets[b].field, who);
    for (const std::uint32_t t : budgets[b].soft) {
      if (!detail::crosses(before, after, budgets[b].limit, t)) continue;
      if (!fired.insert(absl::StrCat(b, "/", t, "/", key, "/", period)).second)
        continue;
      events.push_back({budgets[b].name, key, t, after, budgets[b].limit});
    }
  }
  std::uint64_t spent(std::size_t b, const Subject& who, Nanos now) {
    return in(state(b, who), budgets[b].period.index_of(now));
  }
  // A reserve at `now`: granted (and held) or not.
  bool reserve(Open& o, Nanos now) {
    const std::uint64_t tokens = o.e.prompt_tokens + o.e.max_output_tokens;
    for (std::size_t b = 0; b < budgets.size(); ++b) {
      const std::uint64_t h =
          std::max<std::uint64_t>(1, amount(budgets[b].money, tokens));
      const std::int64_t p = budgets[b].period.index_of(now);
      const std::uint64_t s = in(state(b, o.who), p);
      if (h > budgets[b].limit || s + h > budgets[b].limit) {
        ++refused;
        return false;
      }
      o.period.push_back(p);
      o.held.push_back(h);
    }
    for (std::size_t b = 0; b < budgets.size(); ++b) {
      State& st = state(b, o.who);
      const std::int64_t p = o.period[b];
      if (in(st, p) == 0) st = {p, 0};
      const std::uint64_t before = st.spent;
      st.spent += o.held[b];
      cross(b, o.who, p, before, st.spent);
    }
    return true;
  }
  // Moves `o`'s item `b` from what it holds to `to`, by the rule above.
  void move(Open& o, std::size_t b, std::uint64_t to, Nanos now) {
    State& st = state(b, o.who);
    const std::int64_t p = o.period[b];
    const std::uint64_t held = o.held[b];
    o.held[b] = to;
    if (to == held) return;
    if (st.spent != 0 && st.period > p) {  // a later period: dropped
      ++dropped;
      return;
    }
    if (p != budgets[b].period.index_of(now)) ++ended_changes;
    if (to > held) {
      if (in(st, p) == 0) st = {p, 0};
      const std::uint64_t before = st.spent;
      st.spent += to - held;
      if (p == budgets[b].period.index_of(now)) {
        cross(b, o.who, p, before, st.spent);
      }
    } else if (in(st, p) != 0) {
      st.spent -= std::min(st.spent, held - to);
    }
  }
  Settlement settle(Open& o, const Usage& u, Nanos now) {
    if (const auto f = settled.find(o.id); f != settled.end()) {
      ++duplicates;
      for (std::size_t b = 0; b < budgets.size(); ++b) move(o, b, 0, now);
      return f->second;
    }
    Usage charged = u;
    if (u.source == UsageSource::kPartial) {
      charged.output =
          std::max(u.output, std::max(o.e.max_output_tokens, o.worst));
      charged.source = UsageSource::kEstimated;
    }
    const Settlement s{
        Money{static_cast<std::int64_t>(charged.total() * 1'000)},
        charged.total(), charged.source != UsageSource::kReported};
    for (std::size_t b = 0; b < budgets.size(); ++b) {
      move(o, b, amount(budgets[b].money, s.tokens), now);
    }
    settled.emplace(o.id, s);
    return s;
  }
  void release(Open& o, Nanos now) {
    for (std::size_t b = 0; b < budgets.size(); ++b) move(o, b, 0, now);
  }
  bool grow(Open& o, std::uint64_t output, Nanos now) {
    std::vector<std::uint64_t> add;
    for (std::size_t b = 0; b < budgets.size(); ++b) {
      const std::uint64_t want =
          amount(budgets[b].money, o.e.prompt_tokens + output);
      add.push_back(want > o.held[b] ? want - o.held[b] : 0);
    }
    for (std::size_t b = 0; b < budgets.size(); ++b) {
      if (add[b] == 0) continue;
      const State& st = state(b, o.who);
      const std::int64_t p = o.period[b];
      if (st.spent != 0 && st.period > p) {  // cut
        ++cut_by_later;
        return false;
      }
      if (add[b] > budgets[b].limit || in(st, p) + add[b] > budgets[b].limit) {
        ++cut_by_limit;
        return false;
      }
    }
    for (std::size_t b = 0; b < budgets.size(); ++b) {
      if (add[b] != 0) move(o, b, o.held[b] + add[b], now);
    }
    o.worst = std::max(o.worst, output);
    return true;
  }
};

// One random script, the same for both backends (the same seed): reserves,
// settles below and above the estimate, partial usage, cancels, releases,
// drops, stream growth, retried settles and reserves, twins in flight, and
// time moving on across day and month ends. Every answer and every spend
// is checked against the oracle and traced.
template <class B>
void random_script(B& b, std::uint64_t seed, int steps) {
  std::mt19937_64 rng(seed);
  Oracle o;
  o.budgets = {{"team",
                Field::kTeam,
                true,
                6'000'000,
                Period::calendar(PeriodKind::kDay).value(),
                {500, 900}},
               {"user",
                Field::kUser,
                false,
                3'000,
                Period::calendar(PeriodKind::kDay).value(),
                {800}},
               {"org",
                Field::kOrg,
                true,
                200'000'000,
                Period::calendar(PeriodKind::kMonth).value(),
                {}}};
  for (const auto& x : o.budgets) {
    REQUIRE(b.add_budget(BudgetSpec{x.name, Scope(x.field),
                                    x.money ? BudgetUnit::kNanoUsd
                                            : BudgetUnit::kTokens,
                                    x.limit, x.period, x.soft})
                .ok());
  }
  const std::vector<Subject> subjects = {
      {.user = "a", .team = "red", .org = "o"},
      {.user = "b", .team = "red", .org = "o"},
      {.user = "c", .team = "blue", .org = "o"}};
  b.at(kT0 + 20 * kHour);
  struct Live {
    typename B::Res res;
    Oracle::Open open;
  };
  std::vector<Live> live;
  std::vector<Oracle::Open> done;  // settled: retried later
  int next_id = 0;
  for (int step = 0; step < steps; ++step) {
    const int what = static_cast<int>(rng() % 100);
    const std::string tag = absl::StrCat("#", step, " ");
    if (what >= 86) {  // time moves on: minutes, or hours (days, months end)
      b.at(b.now() +
           (rng() % 6 == 0
                ? kHour * static_cast<std::int64_t>(1 + rng() % 30)
                : kMinute * static_cast<std::int64_t>(1 + rng() % 50)));
    } else if (what < 30 || live.empty()) {  // a new call, or a twin of one
      Oracle::Open open;
      const bool twin = what < 4 && !live.empty();
      if (twin) {
        const Oracle::Open& of = live[rng() % live.size()].open;
        open.id = of.id;
        open.who = of.who;
        open.e = of.e;
      } else {
        open.id = absl::StrCat("id", next_id++);
        open.who = subjects[rng() % subjects.size()];
        open.e = {rng() % 400, rng() % 400};
      }
      auto r = b.reserve(open.who, "m", open.e, open.id);
      if (o.settled.count(open.id) != 0) {  // a twin of one settled since
        expect(b, tag + "reserve settled " + open.id, r.status().code(),
               absl::StatusCode::kAlreadyExists);
        continue;
      }
      REQUIRE(r.ok());
      const bool granted = o.reserve(open, b.now());
      expect(b, tag + "reserve " + open.id, r->granted(), granted);
      if (granted) live.push_back({*std::move(r), std::move(open)});
    } else if (what < 55) {  // settle one, below, above, partial or counted
      const std::size_t i = rng() % live.size();
      Live& l = live[i];
      const int how = static_cast<int>(rng() % 4);
      Usage u = used(l.open.e.prompt_tokens, rng() % 700);
      if (how == 0) u.source = UsageSource::kPartial;
      if (how == 1) u.source = UsageSource::kEstimated;  // counted
      const Settlement want = o.settle(l.open, u, b.now());
      const absl::StatusOr<Settlement> got =
          how == 1 ? l.res.settle_without_usage(u.output) : l.res.settle(u);
      expect(b, tag + "settle " + l.open.id, got, want);
      done.push_back(l.open);
      live.erase(live.begin() + static_cast<std::ptrdiff_t>(i));
    } else if (what < 62) {  // released, or dropped
      const std::size_t i = rng() % live.size();
      o.release(live[i].open, b.now());
      if (rng() % 2 == 0) live[i].res.release();
      live.erase(live.begin() + static_cast<std::ptrdiff_t>(i));
    } else if (what < 80) {  // a stream grows: often the oldest one
      Live& l = live[rng() % 2 == 0 ? 0 : rng() % live.size()];
      const std::uint64_t so_far = rng() % 500, next = rng() % 300;
      const bool want = o.grow(l.open, so_far + next, b.now());
      expect(b, tag + "grow " + l.open.id, l.res.next_chunk_fits(so_far, next),
             want);
    } else if (!done.empty()) {  // the whole call retried
      const Oracle::Open& d = done[rng() % done.size()];
      expect(b, tag + "retry " + d.id,
             b.reserve(d.who, "m", d.e, d.id).status().code(),
             absl::StatusCode::kAlreadyExists);
      expect(b, tag + "found " + d.id, b.settlement(d.who, d.id),
             o.settled.at(d.id));
    }
    for (std::size_t k = 0; k < o.budgets.size(); ++k) {
      for (const Subject& who : subjects) {
        expect(b,
               absl::StrCat(tag, "spent ", o.budgets[k].name, " ",
                            detail::av(who.user)),
               b.spent(o.budgets[k].name, who), o.spent(k, who, b.now()));
      }
    }
  }
  for (Live& l : live) o.release(l.open, b.now());
  live.clear();
  for (std::size_t k = 0; k < o.budgets.size(); ++k) {
    for (const Subject& who : subjects) {
      expect(b,
             absl::StrCat("end spent ", o.budgets[k].name, " ",
                          detail::av(who.user)),
             b.spent(o.budgets[k].name, who), o.spent(k, who, b.now()));
    }
  }
  expect(b, "thresholds", b.fired, o.events);
  INFO(b.name << ": refused " << o.refused << ", dropped " << o.dropped
              << ", cut by a later period " << o.cut_by_later
              << ", cut by the limit " << o.cut_by_limit
              << ", changes in an ended period " << o.ended_changes
              << ", duplicate settles " << o.duplicates << ", thresholds "
              << o.events.size());
  CHECK(o.refused > 0);
  CHECK(o.dropped > 0);
  CHECK(o.cut_by_later > 0);
  CHECK(o.cut_by_limit > 0);
  CHECK(o.ended_changes > 0);
  CHECK(o.duplicates > 0);
  CHECK(o.events.size() > 3);
}

}  // namespace

TEST_CASE(
    "both accountants: random lifecycles across period turns equal the "
    "oracle of the rule, and each other",
    "[i16][redis][budget][property]") {
  const std::uint64_t seed = rk_test::seed_or(0x16D);
  CAPTURE(seed);
  const int steps = std::max(
      1'000, static_cast<int>(1'500 * std::min(1.0, rk_test::scale())));
  both([&](auto& b) { random_script(b, seed, steps); });
}

TEST_CASE(
    "RedisAccountant: a duplicate settle gives back holds taken by a kLocal "
    "share while Redis was away, as a duplicate settle in process releases "
    "its holds",
    "[i16][redis][budget]") {
  RedisServer server;
  InRedis b(server.port(), temp_path("diff.journal"));
  // The team's share here: 50,000 nano-USD (two instances).
  REQUIRE(b.add_budget(budget("team", Field::kTeam, BudgetUnit::kNanoUsd,
                              100'000, PeriodKind::kMonth),
                       {.fail = FailMode::kLocal, .instances = 2})
              .ok());
  Limit* share = b.acct().budgets()[0]->local_limit();
  REQUIRE(share != nullptr);
  const std::string key = "\x04\x01t";
  const auto share_left = [&] {
    return share->peek(key, 0, b.now()).remaining;
  };
  auto x = b.reserve(kWho, "m", {5, 5}, "dup");
  REQUIRE(x->granted());
  REQUIRE(x->backed());
  server.stop(SIGKILL);
  auto y = b.reserve(kWho, "m", {5, 5}, "dup");  // the share holds 10,000
  REQUIRE(y->granted());
  REQUIRE_FALSE(y->backed());
  CHECK(share_left() == 40'000);
  server.start();
  rk_test::wait_answered(*b.acct().client());
  const Settlement first = x->settle(used(5, 5)).value();
  // y's settle finds the id settled: the first settlement stands and every
  // hold y took goes back, the share's too.
  CHECK(y->settle(used(5, 1)).value() == first);
  CHECK(share_left() == 50'000);
  // Released rather than settled when the id was not settled: the same.
  server.stop(SIGKILL);
  auto z = b.reserve(kWho, "m", {5, 5}, "z");
  REQUIRE_FALSE(z->backed());
  CHECK(share_left() == 40'000);
  z->release();
  CHECK(share_left() == 50'000);
}
