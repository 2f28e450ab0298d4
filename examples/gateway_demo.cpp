// gateway_demo: a simulated day of LLM API traffic through ratekeeper.
//
// Users of three tiers (free, pro, enterprise), in teams of up to five, call a
// chat model all day; each call carries a token estimate (prompt + max output).
// Every call goes through its tier's chain of limits, all or nothing:
//   requests per minute per user   SlidingWindow
//   tokens per minute per user     TokenBucket, weighted by the estimate
//   tokens per day per team        FixedWindow, weighted by the estimate
// and each team has a daily budget in money, set per tier, reserved in the
// same all-or-nothing decision as the rate limits (Accountant::reserve): the
// worst case (prompt + max output), priced from a catalogue, is held before
// the call and settled to the usage after it. When a later limit refuses,
// the earlier ones give back what they took, so a refused call consumes
// nothing. After an admitted call the tokens it did not use (the estimate
// minus the usage the provider reports) go back, to the rate limits and to
// the budget. A call its team's budget cannot cover is first shrunk
// (max_output_that_fits: a lower max_tokens) and refused (429
// insufficient_quota, x-should-retry: false) only when
// even a short answer does not fit.
//
// Time is a ManualClock, so the day (2026-11-30, UTC) runs at full speed. At
// the end it prints a table per tier, spend per tier, the answers to the
// first refused calls (rate limit and budget), and the measured cost of a check
// on the real clock.
//
//   gateway_demo [--users N] [--seed S] [--ledger PATH]
//       --ledger: every reserve, denial and settle appended to the ledger
//       PATH (a new file), which tools/whatif.cpp replays (docs/whatif.md)
//   gateway_demo --pacing-only [--seed S]
//       only the month of pacing (pacing_month.hpp; scripts/plot-pacing.sh)
//   gateway_demo --redis host:port [--seconds S] [--users N]
//       two instances sharing limits and budgets in Redis (demo_redis.cpp)
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <optional>
#include <queue>
#include <random>
#include <string>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "ratekeeper/budget/accountant.hpp"
#include "ratekeeper/budget/json.hpp"
#include "ratekeeper/budget/ledger.hpp"
#include "ratekeeper/errors.hpp"
#include "ratekeeper/fmt.hpp"
#include "ratekeeper/http/headers.hpp"
#include "ratekeeper/ratekeeper.hpp"

// Issue 18: a paced and an unpaced month, side by side.
#include "pacing_month.hpp"

namespace rk = ratekeeper;
using std::chrono::hours;
using std::chrono::minutes;
using std::chrono::seconds;

namespace {

struct TierSpec {
  const char* name;
  std::uint64_t rpm;                   // requests per minute, per user
  std::uint64_t tpm;                   // tokens per minute, per user
  std::uint64_t tpd;                   // tokens per day, per team
  double share;                        // share of users
  double calls_per_hour;               // an average user's appetite
  std::uint64_t max_output;            // max_tokens the tier's clients ask for
  std::int64_t team_budget_usd_cents;  // money per team and day
};

constexpr TierSpec kTiers[] = {
    {"free", 10, 20'000, 1'500'000, 0.70, 25, 1'024, 50},
    {"pro", 60, 150'000, 40'000'000, 0.25, 90, 4'096, 1'500},
    {"enterprise", 600, 2'000'000, 1'000'000'000, 0.05, 900, 8'192, 30'000},
};

// The model every call uses, priced from the open catalogue's JSON shape
// (read exactly: no double on the way to nano-USD).
constexpr char kModel[] = "gpt-4o-mini";
constexpr char kCatalogue[] = R"({
  "gpt-4o-mini": {
    "input_cost_per_token": 1.5e-07,
    "cache_read_input_token_cost": 7.5e-08,
    "output_cost_per_token": 6e-07,
    "litellm_provider": "openai", "mode": "chat"
  }
})";

// A call is shrunk to fit a budget only down to this many output tokens.
constexpr std::uint64_t kMinUsefulOutput = 256;

// 2026-11-30 00:00:00 UTC: budgets follow the calendar, so the day is real.
constexpr std::int64_t kDayStart =
    1'796'083'200LL * 1'000'000'000 - 86'400LL * 1'000'000'000;

using Clock = rk::ManualClock;

std::vector<rk::LimitSpec> chain_of(const TierSpec& t) {
  return {
      {{.name = "rpm"},
       rk::Field::kUser,
       rk::PolicyKind::kSlidingWindow,
       rk::per_minute(t.rpm)},
      {{.name = "tpm", .unit = rk::Unit::kTokens},
       rk::Field::kUser,
       rk::PolicyKind::kTokenBucket,
       rk::per_minute(t.tpm),
       t.tpm},
      {{.name = "tpd", .unit = rk::Unit::kTokens},
       rk::Field::kTeam,
       rk::PolicyKind::kFixedWindow,
       rk::per_day(t.tpd)},
  };
}

struct TierStats {
  std::uint64_t users = 0, tried = 0, admitted = 0;
  std::uint64_t denied_rpm = 0, denied_tpm = 0, denied_tpd = 0;
  std::uint64_t denied_budget = 0, shrunk = 0;
  std::uint64_t tokens_admitted = 0, tokens_used = 0, tokens_denied = 0;
  std::int64_t spent_nanos = 0;  // settled, in nano-USD
  std::uint64_t alerts_80 = 0;   // teams alerted at 80% of their budget
  absl::flat_hash_set<std::string> teams;          // of the tier's users
  absl::flat_hash_set<std::string> teams_refused;  // by their budget
};

struct User {
  std::string id;    // an authenticated subject, not an IP
  std::string team;  // five users to a team
  int tier;
  double calls_per_hour;
  bool bursty;  // sends in bursts (a batch job or a retry loop)
};

// Traffic follows the working day: quiet at night, busiest mid-afternoon.
double daily_intensity(double hour_of_day) {
  const double x = (hour_of_day - 15.0) / 24.0 * 2.0 * 3.14159265358979;
  return 0.25 + 0.75 * (0.5 + 0.5 * std::cos(x));
}

struct Arrival {
  std::int64_t at_ns;
  std::size_t user;
  bool operator>(const Arrival& o) const { return at_ns > o.at_ns; }
};

std::uint64_t arg_or(int argc, char** argv, const char* flag,
                     std::uint64_t fallback) {
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::strcmp(argv[i], flag) == 0) {
      return std::strtoull(argv[i + 1], nullptr, 10);
    }
  }
  return fallback;
}

// Money to a hundredth of a cent, for the table (the books are exact).
std::string usd(rk::Money m) {
  return fmt::format("${}.{:04}", m.nanos / 1'000'000'000,
                     (m.nanos % 1'000'000'000) / 100'000);
}

// ns per check of `lim` over 1,000 keys, one thread.
template <class L>
double ns_per_check(L& lim, const std::vector<std::string>& keys, int calls) {
  std::uint64_t allowed = 0;
  const auto t0 = std::chrono::steady_clock::now();
  std::size_t k = 0;
  for (int i = 0; i < calls; ++i) {
    allowed += lim.acquire(keys[k]).allowed;
    if (++k == keys.size()) k = 0;
  }
  const auto t1 = std::chrono::steady_clock::now();
  if (allowed != static_cast<std::uint64_t>(calls)) std::abort();
  return std::chrono::duration<double, std::nano>(t1 - t0).count() / calls;
}

// The cost of one check on real clocks, beside its floor (one clock read),
// measured in this run. benchmarks/ has the careful version (make bench).
void measure_check_cost() {
  const auto policy =
      rk::TokenBucket::create(rk::per_second(1'000'000'000), 1'000'000'000)
          .value();
  std::vector<std::string> keys;
  for (int i = 0; i < 1000; ++i) keys.push_back("user:" + std::to_string(i));
  constexpr int kCalls = 2'000'000;
  rk::ShardedOptions small;
  small.capacity = 4096;
  rk::Limiter<rk::TokenBucket> sharded(policy, small);
  rk::Limiter<rk::TokenBucket, rk::ShardedStore, rk::CachedClock> cached(
      policy, small, rk::CachedClock{});
  rk::Limiter<rk::TokenBucket, rk::InMemoryStore> in_memory(policy);
  const double s = ns_per_check(sharded, keys, kCalls);
  const double c = ns_per_check(cached, keys, kCalls);
  const double m = ns_per_check(in_memory, keys, kCalls);
  // A chain of three limits over the same keys: one clock read, three CASes.
  auto a = rk::make_limit({.name = "a"}, policy, small).value();
  auto b = rk::make_limit({.name = "b"}, policy, small).value();
  auto t = rk::make_limit({.name = "t"}, policy, small).value();
  rk::Chain<> chain;
  std::uint64_t allowed = 0;
  const auto c0 = std::chrono::steady_clock::now();
  std::size_t k = 0;
  for (int i = 0; i < kCalls; ++i) {
    allowed += chain
                   .acquire({{a.get(), keys[k], 1},
                             {b.get(), keys[k], 100},
                             {t.get(), keys[k / 5], 100}})
                   .allowed;
    if (++k == keys.size()) k = 0;
  }
  const double chain_ns = std::chrono::duration<double, std::nano>(
                              std::chrono::steady_clock::now() - c0)
                              .count() /
                          kCalls;
  if (allowed != static_cast<std::uint64_t>(kCalls)) std::abort();
  std::int64_t sink = 0;
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < kCalls; ++i) sink += rk::SteadyClock{}.now().count() & 1;
  const double clock_ns = std::chrono::duration<double, std::nano>(
                              std::chrono::steady_clock::now() - t0)
                              .count() /
                          kCalls;
  fmt::print(
      "\nOne check (TokenBucket, 1,000 keys, one thread), measured now:\n"
      "  ShardedStore + SteadyClock  {:6.1f} ns   (one clock read alone: "
      "{:.1f} ns{})\n"
      "  ShardedStore + CachedClock  {:6.1f} ns\n"
      "  InMemoryStore + SteadyClock {:6.1f} ns\n"
      "  Chain of 3 limits, sharded  {:6.1f} ns   ({:.2f}x one check)\n",
      s, clock_ns, sink < 0 ? "?" : "", c, m, chain_ns, chain_ns / s);
}

}  // namespace

#if defined(RATEKEEPER_DEMO_REDIS)
int run_redis_demo(const std::string& where, double seconds,
                   std::size_t n_users);
#endif

int main(int argc, char** argv) {
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::strcmp(argv[i], "--redis") == 0) {
#if defined(RATEKEEPER_DEMO_REDIS)
      return run_redis_demo(
          argv[i + 1], static_cast<double>(arg_or(argc, argv, "--seconds", 8)),
          static_cast<std::size_t>(arg_or(argc, argv, "--users", 40)));
#else
      fmt::print(stderr,
                 "gateway_demo: built without hiredis (libhiredis-dev)\n");
      return 2;
#endif
    }
  }
  // Issue 18: a month of a paced budget beside the same month unpaced.
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--pacing-only") == 0) {
      pacing_month::print_side_by_side(arg_or(argc, argv, "--seed", 7));
      return 0;
    }
  }
  const auto n_users = arg_or(argc, argv, "--users", 2'000);
  const auto seed = arg_or(argc, argv, "--seed", 20261128);
  std::mt19937_64 rng(seed);

  Clock clock(rk::Nanos{kDayStart});  // the simulated day, from midnight
  // Each limit's store sized for this demo's users: its memory (about 30
  // bytes per key of capacity) is allocated up front.
  const rk::ShardedOptions store{.capacity = 16'384};
  rk::TierTable<Clock> tiers(store, clock);
  for (const auto& t : kTiers) {
    if (const absl::Status st = tiers.set_tier(t.name, chain_of(t)); !st.ok()) {
      fmt::print(stderr, "gateway_demo: {}\n", st.ToString());
      return 1;
    }
  }
  std::vector<TierStats> stats(std::size(kTiers));

  // One accountant per tier: its teams' daily budgets, in money.
  const absl::StatusOr<rk::PriceCatalogue> prices =
      rk::load_price_catalogue(kCatalogue);
  if (!prices.ok()) {
    fmt::print(stderr, "gateway_demo: {}\n", prices.status().ToString());
    return 1;
  }
  std::vector<std::unique_ptr<rk::Accountant<Clock>>> accountants;
  for (std::size_t t = 0; t < std::size(kTiers); ++t) {
    auto acct =
        std::make_unique<rk::Accountant<Clock>>(prices->table, clock, store);
    if (const absl::Status st = acct->add_budget(
            {.name = "team_day",
             .scope = rk::Field::kTeam,
             .unit = rk::BudgetUnit::kNanoUsd,
             .limit = static_cast<std::uint64_t>(
                 rk::Money::cents(kTiers[t].team_budget_usd_cents).nanos),
             .period = rk::Period::calendar(rk::PeriodKind::kDay).value(),
             .soft_permille = {800}});
        !st.ok()) {
      fmt::print(stderr, "gateway_demo: {}\n", st.ToString());
      return 1;
    }
    // A soft alert: once per team and day at 80% (a real server would
    // email the team's owner). The hard stop is the budget itself.
    acct->on_threshold(
        [&stats, t](const rk::ThresholdEvent&) { ++stats[t].alerts_80; });
    accountants.push_back(std::move(acct));
  }
  // --ledger PATH (issue 18, what-if): the day's records, for
  // ratekeeper_whatif. One ledger for the three accountants, each naming
  // its tier in its records; page-cache durability (a demo, not money).
  std::unique_ptr<rk::Ledger> ledger;
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::strcmp(argv[i], "--ledger") != 0) continue;
    if (std::FILE* f = std::fopen(argv[i + 1], "rb")) {  // one day a ledger
      std::fclose(f);
      fmt::print(stderr, "gateway_demo: {} exists: give a new path\n",
                 argv[i + 1]);
      return 2;
    }
    absl::StatusOr<std::unique_ptr<rk::Ledger>> l =
        rk::Ledger::open(argv[i + 1], {.durability = rk::Durability::kNone});
    if (!l.ok()) {
      fmt::print(stderr, "gateway_demo: {}\n", l.status().ToString());
      return 1;
    }
    ledger = *std::move(l);
    for (std::size_t t = 0; t < std::size(kTiers); ++t) {
      accountants[t]->set_audit(ledger.get());
      accountants[t]->set_audit_tier(kTiers[t].name);
    }
  }

  std::vector<User> users;
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  for (std::uint64_t i = 0; i < n_users; ++i) {
    const double u = unit(rng);
    int tier = 0;
    double acc = 0;
    for (int t = 0; t < static_cast<int>(std::size(kTiers)); ++t) {
      acc += kTiers[t].share;
      if (u <= acc) {
        tier = t;
        break;
      }
    }
    // Appetites vary tenfold between users of one tier.
    const double appetite =
        kTiers[tier].calls_per_hour * std::exp(unit(rng) * 2.3 - 1.15);
    users.push_back({"user-" + std::to_string(i),
                     fmt::format("{}-team-{}", kTiers[tier].name, i / 5), tier,
                     appetite, unit(rng) < 0.1});
    ++stats[static_cast<std::size_t>(tier)].users;
    stats[static_cast<std::size_t>(tier)].teams.insert(users.back().team);
  }

  constexpr std::int64_t kDay = 86'400'000'000'000;
  std::priority_queue<Arrival, std::vector<Arrival>, std::greater<>> queue;
  auto schedule = [&](std::size_t u, std::int64_t now) {
    const User& user = users[u];
    const double hour = static_cast<double>(now % kDay) / 3.6e12;
    const double rate_per_ns =
        user.calls_per_hour * daily_intensity(hour) / 3.6e12;
    double gap = std::exponential_distribution<double>(rate_per_ns)(rng);
    // A bursty client fires most calls back to back.
    if (user.bursty && unit(rng) < 0.8) gap = unit(rng) * 2e8;
    queue.push({now + static_cast<std::int64_t>(gap) + 1, u});
  };
  for (std::size_t u = 0; u < users.size(); ++u) schedule(u, 0);
  // What each team's settled calls cost, to check the budgets' books.
  absl::flat_hash_map<std::string, std::int64_t> team_settled;

  std::lognormal_distribution<double> prompt_tokens(6.5, 1.0);  // ~665 median
  std::optional<rk::ChainDecision> first_denial, first_budget_denial;
  std::string first_denial_who, first_budget_denial_who;
  std::uint64_t calls = 0;
  const auto wall0 = std::chrono::steady_clock::now();
  while (!queue.empty()) {
    const Arrival a = queue.top();
    queue.pop();
    if (a.at_ns >= kDay) continue;
    clock.set(rk::Nanos{kDayStart + a.at_ns});
    const User& user = users[a.user];
    const auto tier = static_cast<std::size_t>(user.tier);
    TierStats& st = stats[tier];
    rk::Accountant<Clock>& acct = *accountants[tier];
    // Reserve the worst case: prompt estimate plus max output tokens.
    const auto prompt = std::min<std::uint64_t>(
        static_cast<std::uint64_t>(prompt_tokens(rng)), kTiers[tier].tpm / 2);
    std::uint64_t max_output = kTiers[tier].max_output;
    ++st.tried;
    ++calls;

    // The tier's rate limits and the team's budget: one decision.
    const rk::Subject who{.user = user.id, .team = user.team};
    const std::string request_id = fmt::format("req-{}", calls);
    auto reserve = [&]() -> absl::StatusOr<rk::Reservation<Clock>> {
      rk::ChainItems limits;
      if (absl::Status e = tiers.chain_items(kTiers[tier].name, who,
                                             prompt + max_output, limits);
          !e.ok()) {
        return e;
      }
      return acct.reserve(
          who, kModel,
          {.prompt_tokens = prompt, .max_output_tokens = max_output},
          request_id, limits);
    };
    absl::StatusOr<rk::Reservation<Clock>> r = reserve();
    if (r.ok() && r->refused_by_budget()) {
      // Lower max_tokens to what the budget still covers, if that is a
      // useful answer, rather than refuse.
      const absl::StatusOr<std::uint64_t> fits =
          acct.max_output_that_fits(who, kModel, prompt);
      if (fits.ok() && *fits >= kMinUsefulOutput) {
        max_output = std::min(max_output, *fits);
        ++st.shrunk;
        r = reserve();
      }
    }
    if (!r.ok()) {
      fmt::print(stderr, "gateway_demo: {}\n", r.status().ToString());
      return 1;
    }
    const std::uint64_t estimate = prompt + max_output;
    if (r->granted()) {
      ++st.admitted;
      st.tokens_admitted += estimate;
      // The provider's usage: the prompt, and some of max_tokens.
      const auto output = static_cast<std::uint64_t>(
          unit(rng) * static_cast<double>(max_output));
      st.tokens_used += prompt + output;
      rk::Usage used;
      used.input_uncached = prompt;
      used.output = output;
      const absl::StatusOr<rk::Settlement> s = r->settle(used);
      if (!s.ok()) {
        fmt::print(stderr, "gateway_demo: {}\n", s.status().ToString());
        return 1;
      }
      st.spent_nanos += s->cost.nanos;
      team_settled[user.team] += s->cost.nanos;
      // The settle also settled the tier's token limits to the usage: the
      // reservation holds their receipts.
    } else if (r->refused_by_budget()) {
      ++st.denied_budget;
      st.teams_refused.insert(user.team);
      st.tokens_denied += estimate;
      if (!first_budget_denial) {
        first_budget_denial = r->decision();
        first_budget_denial_who =
            fmt::format("{} of {} ({} tier), {} tokens", user.id, user.team,
                        kTiers[tier].name, estimate);
      }
    } else {
      st.tokens_denied += estimate;
      const std::string& by = r->decision().binding_result()->limit->name();
      if (by == "rpm") ++st.denied_rpm;
      if (by == "tpm") ++st.denied_tpm;
      if (by == "tpd") ++st.denied_tpd;
      if (!first_denial) {
        first_denial = r->decision();
        first_denial_who = fmt::format("{} of {} ({} tier), {} tokens", user.id,
                                       user.team, kTiers[tier].name, estimate);
      }
    }
    schedule(a.user, a.at_ns);
  }
  const double wall_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - wall0)
          .count();

  fmt::print("ratekeeper gateway demo: one simulated day, {} users, seed {}\n",
             n_users, seed);
  fmt::print(
      "{} calls checked in {:.2f} s of CPU ({:.0f} ns per call: the priced "
      "worst case reserved against a chain of 3 limits and a team budget, "
      "settled to the usage, unused tokens refunded)\n\n",
      calls, wall_s,
      wall_s * 1e9 / static_cast<double>(std::max<std::uint64_t>(calls, 1)));
  fmt::print(
      "{:<11} {:>6} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8} {:>13} {:>13} "
      "{:>13}\n",
      "tier", "users", "tried", "admitted", "rpm-deny", "tpm-deny", "tpd-deny",
      "budget", "tokens-held", "tokens-used", "tokens-denied");
  for (std::size_t t = 0; t < std::size(kTiers); ++t) {
    const TierStats& s = stats[t];
    fmt::print(
        "{:<11} {:>6} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8} {:>13} {:>13} "
        "{:>13}\n",
        kTiers[t].name, s.users, s.tried, s.admitted, s.denied_rpm,
        s.denied_tpm, s.denied_tpd, s.denied_budget, s.tokens_admitted,
        s.tokens_used, s.tokens_denied);
  }
  fmt::print("\nLimits: ");
  for (const auto& t : kTiers) {
    fmt::print(
        "{} {} req/min and {} tokens/min per user, {} tokens/day per "
        "team; ",
        t.name, t.rpm, t.tpm, t.tpd);
  }
  fmt::print("\n");

  // Spend per tier, from the settlements (exact nano-USD).
  fmt::print(
      "\nSpend per tier ({}, priced from the catalogue; a budget per team "
      "and day, a soft alert at 80%):\n",
      kModel);
  fmt::print("{:<11} {:>6} {:>12} {:>14} {:>13} {:>10} {:>9} {:>8} {:>9}\n",
             "tier", "teams", "budget/team", "spent", "avg/team", "alerted",
             "stopped", "shrunk", "refused");
  for (std::size_t t = 0; t < std::size(kTiers); ++t) {
    const TierStats& s = stats[t];
    const std::uint64_t teams = s.teams.size();
    const rk::Money spent{s.spent_nanos};
    fmt::print(
        "{:<11} {:>6} {:>12} {:>14} {:>13} {:>10} {:>9} {:>8} {:>9}\n",
        kTiers[t].name, teams,
        fmt::format("${}.{:02}", kTiers[t].team_budget_usd_cents / 100,
                    kTiers[t].team_budget_usd_cents % 100),
        usd(spent),
        usd(rk::Money{spent.nanos / static_cast<std::int64_t>(
                                        std::max<std::uint64_t>(teams, 1))}),
        s.alerts_80, s.teams_refused.size(), s.shrunk, s.denied_budget);
  }
  fmt::print(
      "(alerted: teams past 80%; stopped: teams refused by their budget; "
      "shrunk: calls whose max_tokens was lowered to fit; refused: 429 "
      "insufficient_quota, not even {} output tokens fit)\n",
      kMinUsefulOutput);
  // A refusal's whole answer, as http::refusal_response builds it.
  const auto print_answer = [](const rk::http::Response& a) {
    fmt::print("HTTP/1.1 {} {}\n", a.status,
               a.status == 429   ? "Too Many Requests"
               : a.status == 413 ? "Content Too Large"
                                 : "Forbidden");
    for (const auto& h : a.headers) fmt::print("{}: {}\n", h.name, h.value);
    fmt::print("\n{}\n", a.body);
  };
  if (first_budget_denial) {
    fmt::print(
        "\nThe first call refused by a budget ({}), as OpenAI answers "
        "exhausted quota:\n",
        first_budget_denial_who);
    print_answer(rk::http::budget_exhausted_response(*first_budget_denial));
  }
  if (first_denial) {
    fmt::print("\nThe first refused call ({}), as a server answers it:\n",
               first_denial_who);
    print_answer(rk::http::refusal_response(*first_denial));
  }
  std::uint64_t held = 0;
  for (const auto& [tier, limit] : tiers.all_limits()) {
    held += limit->store_stats().keys;
  }
  fmt::print("\nStates held at the end of the day: {}\n", held);

  measure_check_cost();
  pacing_month::print_side_by_side(7);  // issue 18: paced vs unpaced month

  // The books must balance: every call is admitted or refused exactly once,
  // the limits counted as many admissions as the table, and every team's
  // budget holds exactly what its calls settled to.
  std::uint64_t admitted = 0;
  for (const auto& s : stats) {
    if (s.admitted + s.denied_rpm + s.denied_tpm + s.denied_tpd +
            s.denied_budget !=
        s.tried) {
      return 1;
    }
    admitted += s.admitted;
  }
  for (const User& u : users) {
    rk::Limit* budget =
        accountants[static_cast<std::size_t>(u.tier)]->budgets()[0];
    std::string key;
    if (!rk::append_subject_key(rk::Field::kTeam, {.team = u.team}, key).ok()) {
      return 1;
    }
    const rk::Decision d = budget->peek(key, 0, clock.now());
    const auto it = team_settled.find(u.team);
    const std::int64_t settled = it == team_settled.end() ? 0 : it->second;
    if (d.limit - d.remaining != static_cast<std::uint64_t>(settled)) {
      fmt::print(stderr, "gateway_demo: team {} budget {} != settled {}\n",
                 u.team, d.limit - d.remaining, settled);
      return 1;
    }
  }
  std::uint64_t counted = 0;
  for (const auto& [tier, limit] : tiers.all_limits()) {
    if (limit->name() == "rpm") counted += limit->counts().allowed;
  }
  return calls > 0 && counted == admitted ? 0 : 1;
}
