// pacing_test: Pacer (budget/pacing.hpp). The pace, its waits and the
// graded actions against a model computed here by hand from the calendar
// (a flat profile: weighted hours are hours), and a simulated month
// (examples/pacing_month.hpp) paced and unpaced.
#include "ratekeeper/budget/pacing.hpp"

#include <unistd.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "../examples/pacing_month.hpp"
#include "ratekeeper/budget/ledger.hpp"
#include "ratekeeper/clock.hpp"

namespace rk = ratekeeper;
using rk::Nanos;

namespace {

constexpr std::int64_t kHour = 3'600'000'000'000;
// 2026-12-01T00:00:00Z; the month has 744 hours.
constexpr std::int64_t kDec1 = 1796083200LL * 1'000'000'000;
constexpr std::int64_t kJan1 = kDec1 + 744 * kHour;

// "big": 10 micro-USD a token; "small": 1 micro-USD a token.
rk::PriceTable two_models() {
  rk::PriceTable t;
  const auto big = rk::TokenPrice::per_million_micros(10'000'000);
  const auto small = rk::TokenPrice::per_million_micros(1'000'000);
  t.set("big", {.base = {.input = big, .output = big}}).IgnoreError();
  t.set("small", {.base = {.input = small, .output = small}}).IgnoreError();
  return t;
}

struct Fixture {
  explicit Fixture(rk::BudgetUnit unit, std::uint64_t limit)
      : clock(Nanos{kDec1}), acct(two_models(), clock) {
    REQUIRE(acct.add_budget(
                    {.name = "b",
                     .scope = rk::Field::kTeam,
                     .unit = unit,
                     .limit = limit,
                     .period =
                         rk::Period::calendar(rk::PeriodKind::kMonth).value()})
                .ok());
  }
  // Spends `tokens` of "small" (input only) outside the pacer.
  void spend(std::uint64_t tokens, const std::string& id) {
    auto r = acct.reserve(who, "small", {.prompt_tokens = tokens}, id);
    REQUIRE(r.ok());
    REQUIRE(r->granted());
    rk::Usage u;
    u.input_uncached = tokens;
    REQUIRE(r->settle(u).ok());
  }
  rk::ManualClock clock;
  rk::Accountant<rk::ManualClock> acct;
  std::string team = "t";
  rk::Subject who{.team = team};
};

}  // namespace

TEST_CASE("Pacer: the level, remaining and the wait follow left / hours left",
          "[i18]") {
  // A token budget of 744,000 over December: 1,000 an hour when nothing
  // is spent.
  Fixture fx(rk::BudgetUnit::kTokens, 744'000);
  rk::Pacer<rk::ManualClock> pacer(fx.acct, fx.clock);
  REQUIRE(pacer.add({.budget = "b", .burst_hours = 2}).ok());
  REQUIRE(pacer.add({.budget = "nope"}).code() == absl::StatusCode::kNotFound);
  REQUIRE(pacer.add({.budget = "b", .burst_hours = 0}).code() ==
          absl::StatusCode::kInvalidArgument);

  // Day 4 00:00 (648 hours left), 96,000 spent outside the pacer: the
  // rate is (744,000 - 96,000) / 648 = 1,000 an hour, the allowance 2,000.
  fx.clock.set(Nanos{kDec1 + 96 * kHour});
  fx.spend(96'000, "pre");
  auto a = pacer.reserve(
      fx.who, "small", {.prompt_tokens = 1000, .max_output_tokens = 200}, "a");
  REQUIRE(a.ok());
  CHECK(a->granted());
  CHECK(a->action == rk::PaceAction::kNone);
  CHECK(a->pace.limit == 2000);
  CHECK(a->pace.remaining == 800);
  // A call of 1,000 more: 200 short. It settles 1,100 (100 given back).
  rk::Usage u;
  u.input_uncached = 1000;
  u.output = 100;
  REQUIRE(a->reservation->settle(u).ok());
  // Level now 2,000 - 1,100 = 900; left 646,900 over 648 h.
  auto b = pacer.reserve(fx.who, "small", {.prompt_tokens = 1000}, "b");
  REQUIRE(b.ok());
  CHECK_FALSE(b->granted());
  CHECK_FALSE(b->reservation.has_value());
  CHECK(b->action == rk::PaceAction::kPaced);
  CHECK(b->paced_by == "b");
  CHECK(b->pace.remaining == 900);
  // Oracle: what the level does not hold of what is left, 646,900 - 900,
  // flows in over the 648 hours left: 100 more take t = 100 x 648 /
  // 646,000 hours.
  const double t_hours = 100.0 * 648.0 / 646'000.0;
  const auto want = static_cast<std::int64_t>(t_hours * kHour);
  CHECK(std::llabs(b->pace.retry_after.count() - want) < 1000);
  // 1 ms before it, still refused; at it, admitted.
  fx.clock.set(Nanos{kDec1 + 96 * kHour} + b->pace.retry_after -
               std::chrono::milliseconds(1));
  auto c = pacer.reserve(fx.who, "small", {.prompt_tokens = 1000}, "c");
  REQUIRE(c.ok());
  CHECK_FALSE(c->granted());
  fx.clock.set(Nanos{kDec1 + 96 * kHour} + b->pace.retry_after);
  auto d = pacer.reserve(fx.who, "small", {.prompt_tokens = 1000}, "d");
  REQUIRE(d.ok());
  CHECK(d->granted());
  // A call larger than what is left of the budget waits for the period.
  auto e = pacer.reserve(fx.who, "small", {.prompt_tokens = 700'000}, "e");
  REQUIRE(e.ok());
  CHECK_FALSE(e->granted());
  CHECK(e->pace.retry_after == Nanos{kJan1} - fx.clock.now());
}

TEST_CASE("Pacer: a weekly profile shapes the pace", "[i18]") {
  // Weight 3 on Saturdays (Dec 5, 12, 19, 26 2026), 1 elsewhere.
  std::vector<double> w(168, 1.0);
  for (std::size_t h = 5 * 24; h < 6 * 24; ++h) w[h] = 3.0;
  const auto prof = rk::WeeklyProfile::from_weights(w).value();
  Fixture fx(rk::BudgetUnit::kTokens, 1'000'000);
  rk::Pacer<rk::ManualClock> pacer(fx.acct, fx.clock);
  REQUIRE(pacer.add({.budget = "b", .profile = prof, .burst_hours = 1}).ok());
  // Oracle by hand: the month has 4 Saturdays (96 h at 3) and 648 hours
  // at 1; the mean weight of the week is (144 + 72) / 168.
  const double mean = (144.0 + 72.0) / 168.0;
  const double mass = (648.0 + 3.0 * 96.0) / mean;
  auto a = pacer.reserve(fx.who, "small", {.prompt_tokens = 1}, "a");
  REQUIRE(a.ok());
  CHECK(a->pace.limit == static_cast<std::uint64_t>(1'000'000.0 / mass * 1.0));
}

TEST_CASE("Pacer: graded actions when the forecast runs out early", "[i18]") {
  SECTION("alert once per crossing, route to the cheaper model") {
    // $10 over December; $6 spent in the first 3 days: at that pace it
    // runs out long before the month ends.
    Fixture fx(rk::BudgetUnit::kNanoUsd, 10'000'000'000);
    rk::Pacer<rk::ManualClock> pacer(fx.acct, fx.clock);
    std::vector<rk::PaceAlert> alerts;
    pacer.on_alert([&](const rk::PaceAlert& a) { alerts.push_back(a); });
    REQUIRE(pacer
                .add({.budget = "b",
                      .burst_hours = 48,
                      .enforce = false,  // actions only: the pace is far
                                         // behind after the $6
                      .on_risk = {.route_to = "small"}})
                .ok());
    REQUIRE(pacer.add({.budget = "b", .on_risk = {.route_to = "unpriced"}})
                .code() == absl::StatusCode::kInvalidArgument);
    auto calm = pacer.reserve(fx.who, "big", {.prompt_tokens = 10}, "calm");
    REQUIRE(calm.ok());
    CHECK(calm->action == rk::PaceAction::kNone);
    CHECK(calm->model == "big");
    CHECK(calm->reservation->reserved_money().nanos == 10 * 10'000);
    REQUIRE(calm->reservation->settle({.input_uncached = 10}).ok());
    fx.clock.set(Nanos{kDec1 + 72 * kHour});
    fx.spend(6'000'000, "pre");  // 6 M tokens of small: $6
    auto r = pacer.reserve(
        fx.who, "big", {.prompt_tokens = 100, .max_output_tokens = 50}, "r1");
    REQUIRE(r.ok());
    REQUIRE(r->granted());
    CHECK(r->at_risk);
    CHECK(r->routed);
    CHECK(r->action == rk::PaceAction::kRoute);
    CHECK(r->model == "small");
    CHECK(r->max_tokens == 50);
    // Priced as "small": 150 tokens at 1 micro-USD.
    CHECK(r->reservation->reserved_money().nanos == 150'000);
    REQUIRE(alerts.size() == 1);
    CHECK(alerts[0].budget == "b");
    CHECK(alerts[0].forecast.exhausts_at.has_value());
    auto r2 = pacer.reserve(fx.who, "big", {.prompt_tokens = 1}, "r2");
    REQUIRE(r2.ok());
    CHECK(r2->routed);
    CHECK(alerts.size() == 1);  // still at risk: no second alert
    // Day 25, nothing spent since: at the month's pace ($6.0 over 24 days)
    // the budget lasts; the call goes to "big" again.
    fx.clock.set(Nanos{kDec1 + 24 * 24 * kHour});
    auto r3 = pacer.reserve(fx.who, "big", {.prompt_tokens = 1}, "r3");
    REQUIRE(r3.ok());
    CHECK_FALSE(r3->at_risk);
    CHECK(r3->model == "big");
    CHECK(r3->action == rk::PaceAction::kNone);
    // Spending $3.5 more crosses again: a second alert.
    fx.spend(3'500'000, "more");
    auto r4 = pacer.reserve(fx.who, "big", {.prompt_tokens = 1}, "r4");
    REQUIRE(r4.ok());
    CHECK(r4->at_risk);
    CHECK(alerts.size() == 2);
  }
  SECTION("clamp max_tokens to what the pace allows") {
    // 744,000 tokens; 200,000 spent by day 4 00:00 (648 h left): at risk.
    // Rate (744,000 - 200,000) / 648 an hour, allowance 1 hour of it.
    Fixture fx(rk::BudgetUnit::kTokens, 744'000);
    rk::Pacer<rk::ManualClock> pacer(fx.acct, fx.clock);
    REQUIRE(pacer
                .add({.budget = "b",
                      .burst_hours = 1,
                      .on_risk = {.alert = false, .clamp = true}})
                .ok());
    fx.clock.set(Nanos{kDec1 + 96 * kHour});
    fx.spend(200'000, "pre");
    const auto level =
        static_cast<std::uint64_t>((744'000.0 - 200'000.0) / 648.0);
    auto r = pacer.reserve(
        fx.who, "big", {.prompt_tokens = 300, .max_output_tokens = 4000}, "r");
    REQUIRE(r.ok());
    CHECK(r->at_risk);
    CHECK(r->clamped);
    CHECK(r->action == rk::PaceAction::kClamp);
    CHECK(r->max_tokens == level - 300);
    CHECK(r->reservation->reserved_tokens() == level);
    CHECK(r->pace.remaining == 0);
    // A prompt larger than the allowance cannot be clamped: paced.
    auto big = pacer.reserve(
        fx.who, "big", {.prompt_tokens = 5000, .max_output_tokens = 10}, "big");
    REQUIRE(big.ok());
    CHECK(big->action == rk::PaceAction::kPaced);
    CHECK_FALSE(big->granted());
  }
  SECTION("deny while at risk") {
    Fixture fx(rk::BudgetUnit::kTokens, 744'000);
    rk::Pacer<rk::ManualClock> pacer(fx.acct, fx.clock);
    REQUIRE(pacer
                .add({.budget = "b",
                      .burst_hours = 24,
                      .on_risk = {.alert = false, .deny = true}})
                .ok());
    fx.clock.set(Nanos{kDec1 + 96 * kHour});
    auto ok = pacer.reserve(fx.who, "small", {.prompt_tokens = 10}, "ok");
    REQUIRE(ok.ok());
    CHECK(ok->granted());
    REQUIRE(ok->reservation->settle({.input_uncached = 10}).ok());
    fx.spend(200'000, "pre");
    auto r = pacer.reserve(fx.who, "small", {.prompt_tokens = 10}, "r");
    REQUIRE(r.ok());
    CHECK_FALSE(r->granted());
    CHECK_FALSE(r->reservation.has_value());
    CHECK(r->action == rk::PaceAction::kDeny);
    CHECK(r->paced_by == "b");
    CHECK(r->pace.retry_after > Nanos{0});
  }
}

TEST_CASE("Pacer: a simulated month", "[i18]") {
  SECTION("demand above the budget") {
    const pacing_month::Result paced =
        pacing_month::run({.paced = true, .demand = 1.5, .seed = 7});
    const pacing_month::Result unpaced =
        pacing_month::run({.paced = false, .demand = 1.5, .seed = 7});
    std::printf(
        "month, demand 1.5x: paced $%.2f of $%.2f, exhausted day %d; "
        "unpaced $%.2f, ran out on day %d\n",
        paced.total_usd, paced.budget_usd, paced.exhausted_day,
        unpaced.total_usd, unpaced.exhausted_day);
    CHECK(std::abs(paced.total_usd - paced.budget_usd) <=
          0.05 * paced.budget_usd);
    CHECK((paced.exhausted_day == 0 ||
           paced.exhausted_day == pacing_month::kDays));
    // Spend every day, the last included.
    for (double d : paced.spend_usd) CHECK(d > 0);
    CHECK(paced.paced_refusals > 0);
    CHECK(paced.budget_refusals < paced.calls / 1000);
    CHECK(unpaced.exhausted_day > 0);
    CHECK(unpaced.exhausted_day < pacing_month::kDays);
    CHECK(unpaced.spend_usd.back() == 0);
  }
  SECTION("demand below the budget") {
    for (std::uint64_t seed = 1; seed <= 3; ++seed) {
      const pacing_month::Result r =
          pacing_month::run({.paced = true, .demand = 0.6, .seed = seed});
      std::printf("month, demand 0.6x, seed %llu: %llu calls, %llu paced\n",
                  static_cast<unsigned long long>(seed),
                  static_cast<unsigned long long>(r.calls),
                  static_cast<unsigned long long>(r.paced_refusals));
      CHECK(r.paced_refusals * 100 < r.calls);
      CHECK(r.budget_refusals == 0);
    }
  }
}

TEST_CASE("Pacer: several paced budgets, the tightest binds", "[i18]") {
  // Over December from Dec 1 00:00 (744 h), 2 hours of allowance each:
  // "b" 744,000 tokens (2,000), "half" 372,000 (1,000).
  Fixture fx(rk::BudgetUnit::kTokens, 744'000);
  REQUIRE(
      fx.acct
          .add_budget(
              {.name = "half",
               .scope = rk::Field::kTeam,
               .unit = rk::BudgetUnit::kTokens,
               .limit = 372'000,
               .period = rk::Period::calendar(rk::PeriodKind::kMonth).value()})
          .ok());
  rk::Pacer<rk::ManualClock> pacer(fx.acct, fx.clock);
  REQUIRE(pacer.add({.budget = "b", .burst_hours = 2}).ok());
  REQUIRE(pacer.add({.budget = "half", .burst_hours = 2}).ok());
  auto big = pacer.reserve(fx.who, "small", {.prompt_tokens = 1500}, "big");
  REQUIRE(big.ok());
  CHECK_FALSE(big->granted());
  CHECK(big->paced_by == "half");
  CHECK(big->pace.limit == 1000);
  CHECK(big->pace.remaining == 1000);
  auto ok = pacer.reserve(fx.who, "small", {.prompt_tokens = 800}, "ok");
  REQUIRE(ok.ok());
  CHECK(ok->granted());
  CHECK(ok->paced_by == "half");
  CHECK(ok->pace.remaining == 200);
  CHECK(ok->pace.retry_after == Nanos{0});
}

TEST_CASE("Pacer: concurrent reserves overrun the pace by the calls in flight",
          "[i18]") {
  // The clock stands still: the allowance (2,000 tokens) is all there is.
  // Each thread reserves 100-token calls and settles each at once; a
  // reserve may see a level from before another thread's hold counted, so
  // at most one call per thread more than the allowance gets through.
  Fixture fx(rk::BudgetUnit::kTokens, 744'000);
  rk::Pacer<rk::ManualClock> pacer(fx.acct, fx.clock);
  REQUIRE(pacer.add({.budget = "b", .burst_hours = 2}).ok());
  constexpr int kThreads = 4, kCalls = 200;
  std::atomic<int> admitted{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kCalls; ++i) {
        auto r = pacer.reserve(fx.who, "small", {.prompt_tokens = 100},
                               absl::StrCat("t", t, "-", i));
        if (!r.ok() || !r->granted()) continue;
        if (r->reservation->settle({.input_uncached = 100}).ok()) ++admitted;
      }
    });
  }
  for (auto& th : threads) th.join();
  CHECK(admitted.load() >= 20);
  CHECK(admitted.load() <= 20 + kThreads);
}

TEST_CASE("Pacer: the paces of ended periods are forgotten", "[i18]") {
  Fixture fx(rk::BudgetUnit::kTokens, 744'000);
  rk::Pacer<rk::ManualClock> pacer(fx.acct, fx.clock);
  REQUIRE(pacer.add({.budget = "b"}).ok());
  std::vector<std::string> teams;
  for (int i = 0; i < 8192; ++i) teams.push_back(absl::StrCat("team", i));
  const auto call = [&](int i) {
    auto r =
        pacer.reserve({.team = teams[static_cast<std::size_t>(i)]}, "small",
                      {.prompt_tokens = 1}, absl::StrCat("id", i));
    REQUIRE(r.ok());
    REQUIRE(r->granted());
  };
  // 4,096 subjects in December (the first prune finds nothing ended).
  for (int i = 0; i < 4096; ++i) call(i);
  CHECK(pacer.pace_memory() == 4096);
  // 4,096 others in January: at 8,192 December's are dropped.
  fx.clock.set(Nanos{kJan1 + kHour});
  for (int i = 4096; i < 8192; ++i) call(i);
  CHECK(pacer.pace_memory() == 4096);
}

TEST_CASE("Pacer: learn_profile spreads the budget by the subject's own week",
          "[i18]") {
  // Two weeks of November spend, 1,000 tokens in each office hour
  // (Monday to Friday, 09:00 to 17:00 UTC) and none otherwise: the learned
  // profile weighs each office hour 168/40 = 4.2 and every other hour 0.
  // December has 23 weekdays, so from Dec 1 00:00 its weighted length is
  // 23 x 8 x 4.2 = 772.8 hours (flat: 744); from Saturday Dec 5 10:00 it
  // is 19 x 8 x 4.2 = 638.4.
  constexpr std::int64_t kNov16 = kDec1 - 15 * 24 * kHour;  // a Monday
  Fixture fx(rk::BudgetUnit::kTokens, 744'000);
  rk::Pacer<rk::ManualClock> learned(fx.acct, fx.clock);
  REQUIRE(learned.add({.budget = "b", .learn_profile = true, .burst_hours = 2})
              .ok());
  // No week of history yet: nothing learned, the flat profile paces.
  fx.clock.set(Nanos{kNov16 + 9 * kHour});
  auto none = fx.acct.learned_profile("b", fx.who);
  REQUIRE(none.ok());
  CHECK_FALSE(none->has_value());
  int n = 0;
  for (int day = 0; day < 15; ++day) {
    if (day % 7 >= 5) continue;  // Saturday, Sunday
    for (int h = 9; h < 17; ++h) {
      fx.clock.set(Nanos{kNov16 + (day * 24 + h) * kHour + kHour / 2});
      fx.spend(1000, absl::StrCat("nov", n++));
    }
  }
  fx.clock.set(Nanos{kDec1});
  auto prof = fx.acct.learned_profile("b", fx.who);
  REQUIRE(prof.ok());
  REQUIRE(prof->has_value());
  // Tuesday 10:00 weighs 4.2, Saturday 10:00 nothing.
  CHECK((*prof)->weight(Nanos{kDec1 + 10 * kHour}) == Approx(4.2));
  CHECK((*prof)->weight(Nanos{kDec1 + (4 * 24 + 10) * kHour}) == 0.0);
  auto a = learned.reserve(fx.who, "small", {.prompt_tokens = 1}, "dec0");
  REQUIRE(a.ok());
  REQUIRE(a->granted());
  CHECK(a->pace.limit == static_cast<std::uint64_t>(744'000.0 / 772.8 * 2));
  REQUIRE(a->reservation->settle({.input_uncached = 1}).ok());

  // Another accountant, the same office hours from Monday Nov 16 to Friday
  // Nov 27 (80,000 tokens), first paced on Saturday Nov 28 10:00: the
  // profile learned from the week before is the same, and what is left of
  // November's weighted hours is Monday Nov 30's 8 x 4.2 = 33.6. It drains
  // its allowance: nothing flows in before Monday 09:00, then 4.2 weighted
  // hours an hour.
  Fixture fy(rk::BudgetUnit::kTokens, 744'000);
  n = 0;
  for (int day = 0; day < 12; ++day) {
    if (day % 7 >= 5) continue;
    for (int h = 9; h < 17; ++h) {
      fy.clock.set(Nanos{kNov16 + (day * 24 + h) * kHour + kHour / 2});
      fy.spend(1000, absl::StrCat("nov", n++));
    }
  }
  rk::Pacer<rk::ManualClock> pacer(fy.acct, fy.clock);
  REQUIRE(
      pacer.add({.budget = "b", .learn_profile = true, .burst_hours = 2}).ok());
  const std::int64_t sat = kNov16 + (12 * 24 + 10) * kHour;
  fy.clock.set(Nanos{sat});
  const double left = 744'000.0 - 80'000.0;
  const auto cap = static_cast<std::uint64_t>(left / 33.6 * 2);
  auto all = pacer.reserve(fy.who, "small", {.prompt_tokens = cap}, "all");
  REQUIRE(all.ok());
  REQUIRE(all->granted());
  CHECK(all->pace.limit == cap);
  CHECK(all->pace.remaining == 0);
  REQUIRE(all->reservation->settle({.input_uncached = cap}).ok());
  auto more = pacer.reserve(fy.who, "small", {.prompt_tokens = 100}, "more");
  REQUIRE(more.ok());
  CHECK_FALSE(more->granted());
  // 100 tokens at (left - cap) / 33.6 per weighted hour, 4.2 of them an
  // hour from Monday Nov 30 09:00.
  const double per_hour = (left - static_cast<double>(cap)) / 33.6 * 4.2;
  const double want_ns =
      static_cast<double>(kNov16 + (14 * 24 + 9) * kHour - sat) +
      100.0 / per_hour * static_cast<double>(kHour);
  CHECK(std::abs(static_cast<double>(more->pace.retry_after.count()) -
                 want_ns) < 1e9);
  // A flat pace would have let it through within minutes.
  CHECK(more->pace.retry_after > Nanos{40 * kHour});
}

TEST_CASE("Pacer: the graded actions follow the burn model once it has a day",
          "[i18]") {
  // 100 tokens every hour from Nov 10, and one burst of 300,000 in the
  // first hour of December. On Dec 10 the period average (321,600 in 216 h:
  // 1.1 M by the end) says the 744,000 run out; the burn model, which sees
  // the steady hours since and the burst as a spike of its week, does not.
  // A budget that denies at risk follows the model.
  Fixture fx(rk::BudgetUnit::kTokens, 744'000);
  rk::Pacer<rk::ManualClock> pacer(fx.acct, fx.clock);
  REQUIRE(pacer
              .add({.budget = "b",
                    .enforce = false,
                    .on_risk = {.alert = false, .deny = true}})
              .ok());
  const std::int64_t nov10 = kDec1 - 21 * 24 * kHour;
  int n = 0;
  for (std::int64_t t = nov10 + kHour / 2; t < kDec1 + 9 * 24 * kHour;
       t += kHour) {
    fx.clock.set(Nanos{t});
    fx.spend(100, absl::StrCat("h", n++));
    if (t == kDec1 + kHour / 2) fx.spend(300'000, "burst");
  }
  fx.clock.set(Nanos{kDec1 + 9 * 24 * kHour});
  auto f = fx.acct.forecast("b", fx.who);
  REQUIRE(f.ok());
  CHECK(f->spent == 321'600);
  CHECK(f->history_hours >= 24);
  REQUIRE(f->exhausts_at.has_value());  // the period average runs out
  CHECK(*f->exhausts_at < f->period_end);
  CHECK_FALSE(f->model_exhausts_at.has_value());  // the model lasts
  CHECK(f->model_projected < 744'000);
  auto r = pacer.reserve(fx.who, "small", {.prompt_tokens = 10}, "r");
  REQUIRE(r.ok());
  CHECK_FALSE(r->at_risk);
  CHECK(r->granted());
  CHECK(r->action == rk::PaceAction::kNone);
}

TEST_CASE("Pacer: a refusal by the pace or a deny is in the ledger", "[i18]") {
  // What the Pacer refuses never reaches Accountant::reserve; it is written
  // as a "deny" record all the same, naming the pace or the risk, with the
  // call's subject and estimate (what a what-if replay reads).
  const std::string path =
      (std::filesystem::temp_directory_path() /
       ("rk_pacing_" + std::to_string(::getpid()) + ".jsonl"))
          .string();
  std::filesystem::remove(path);
  {
    Fixture fx(rk::BudgetUnit::kTokens, 744'000);
    auto ledger =
        rk::Ledger::open(path, {.durability = rk::Durability::kNone}).value();
    fx.acct.set_audit(ledger.get());
    rk::Pacer<rk::ManualClock> pacer(fx.acct, fx.clock);
    REQUIRE(pacer.add({.budget = "b", .burst_hours = 2}).ok());
    // The allowance is 2,000 (744,000 over 744 h, 2 h of it).
    auto big = pacer.reserve(fx.who, "small",
                             {.prompt_tokens = 2500, .max_output_tokens = 7},
                             "too-big");
    REQUIRE(big.ok());
    REQUIRE(big->action == rk::PaceAction::kPaced);
    // A budget at risk that denies: 400,000 spent in the first day.
    fx.clock.set(Nanos{kDec1 + 24 * kHour});
    fx.spend(400'000, "pre");
    rk::Pacer<rk::ManualClock> deny(fx.acct, fx.clock);
    REQUIRE(deny.add({.budget = "b",
                      .enforce = false,
                      .on_risk = {.alert = false, .deny = true}})
                .ok());
    auto d = deny.reserve(fx.who, "small", {.prompt_tokens = 5}, "denied");
    REQUIRE(d.ok());
    REQUIRE(d->action == rk::PaceAction::kDeny);
  }
  std::vector<nlohmann::json> denies;
  REQUIRE(rk::read_ledger(path, [&](const nlohmann::json& j) {
            if (j.value("event", "") == "deny") denies.push_back(j);
            return absl::OkStatus();
          }).ok());
  std::filesystem::remove(path);
  REQUIRE(denies.size() == 2);
  CHECK(denies[0]["request"] == "too-big");
  CHECK(denies[0]["binding"] == "pace:b");
  CHECK(denies[0]["model"] == "small");
  CHECK(denies[0]["prompt"] == 2500);
  CHECK(denies[0]["max_output"] == 7);
  CHECK(denies[0]["subject"]["team"] == "t");
  CHECK(denies[1]["request"] == "denied");
  CHECK(denies[1]["binding"] == "at_risk:b");
  CHECK(denies[1]["t"] == kDec1 + 24 * kHour);
}

TEST_CASE("Pacer: a first call early in the period is not a risk", "[i18]") {
  // $100 for December in nano-USD; a call of 1,000 tokens of "small"
  // ($0.001) one second into the month. The period average projects
  // $2,678 by the end (exhausts_at is within the period), but the spend
  // is within the burst allowance ahead of an even share: not at risk, and
  // a budget that denies at risk admits the next call.
  Fixture fx(rk::BudgetUnit::kNanoUsd, 100'000'000'000);
  rk::Pacer<rk::ManualClock> pacer(fx.acct, fx.clock);
  REQUIRE(pacer.add({.budget = "b", .on_risk = {.deny = true}}).ok());
  fx.clock.set(Nanos{kDec1 + 1'000'000'000});
  fx.spend(1000, "first");
  auto f = fx.acct.forecast("b", fx.who);
  REQUIRE(f.ok());
  REQUIRE(f->exhausts_at.has_value());
  CHECK(*f->exhausts_at < f->period_end);
  fx.clock.set(Nanos{kDec1 + 2'000'000'000});
  auto r = pacer.reserve(fx.who, "small", {.prompt_tokens = 10}, "second");
  REQUIRE(r.ok());
  CHECK_FALSE(r->at_risk);
  CHECK(r->granted());
  // Ahead of the even share by more than the allowance (24 weighted hours
  // of pace, about $3.2): at risk, denied.
  fx.spend(10'000'000, "burst");  // $10
  auto d = pacer.reserve(fx.who, "small", {.prompt_tokens = 10}, "third");
  REQUIRE(d.ok());
  CHECK(d->at_risk);
  CHECK(d->action == rk::PaceAction::kDeny);
}
