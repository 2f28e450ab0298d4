// pacing_month.hpp: a simulated calendar month of bursty LLM traffic
// against a monthly budget, with and without a Pacer (budget/pacing.hpp).
// Used by gateway_demo (the side-by-side table and the gnuplot data) and by
// tests/pacing_test.cpp.
//
// December 2026 (UTC), minute by minute: each minute's calls are Poisson
// with a mean that follows a weekly profile (weekday office hours weigh 3,
// evenings 1, nights and weekends 0.4) times bursts (on a third of the
// days, 2 to 6 hours at 4x), scaled so that the month's expected spend is
// `demand` x the budget. A call prompts 2,000 tokens and asks 2,000 output
// tokens at most, uses 200..2,000; model "m" costs 1 micro-USD a token.
// Each call is reserved and settled at once; a refused call is dropped.
#ifndef RATEKEEPER_EXAMPLES_PACING_MONTH_HPP_
#define RATEKEEPER_EXAMPLES_PACING_MONTH_HPP_

#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "ratekeeper/budget/accountant.hpp"
#include "ratekeeper/budget/pacing.hpp"
#include "ratekeeper/clock.hpp"

namespace pacing_month {

inline constexpr std::int64_t kMinuteNs = 60'000'000'000;
// 2026-12-01T00:00:00Z (a Tuesday) and 2027-01-01T00:00:00Z.
inline constexpr std::int64_t kStartNs = 1796083200LL * 1'000'000'000;
inline constexpr int kDays = 31;
inline constexpr std::uint64_t kBudgetNanoUsd = 100'000'000'000;  // $100

// The demand's weekly shape (Monday 00:00 first), also the pacer's profile.
inline std::vector<double> weekly_weights() {
  std::vector<double> w(168);
  for (std::size_t h = 0; h < 168; ++h) {
    const std::size_t day = h / 24, hour = h % 24;
    const bool weekday = day < 5;
    w[h] = !weekday                    ? 0.4
           : (hour >= 9 && hour < 18)  ? 3.0
           : (hour >= 18 && hour < 23) ? 1.0
                                       : 0.4;
  }
  return w;
}

struct Options {
  bool paced = true;
  double demand = 1.5;  // expected spend / budget
  std::uint64_t seed = 1;
  double burst_hours = 24;
};

struct Result {
  std::vector<double> spend_usd;  // per day
  int exhausted_day = 0;          // first day (1..31) a call was refused by the
                                  // budget itself; 0: never
  std::uint64_t calls = 0, admitted = 0, paced_refusals = 0,
                budget_refusals = 0;
  double total_usd = 0;
  double budget_usd = static_cast<double>(kBudgetNanoUsd) / 1e9;
};

inline Result run(const Options& o) {
  namespace rk = ratekeeper;
  rk::PriceTable prices;
  const auto p = rk::TokenPrice::per_million_micros(1'000'000);
  prices.set("m", {.base = {.input = p, .output = p}}).IgnoreError();
  rk::ManualClock clock(rk::Nanos{kStartNs});
  rk::Accountant<rk::ManualClock> acct(prices, clock);
  acct.add_budget(
          {.name = "month",
           .scope = rk::Field::kTeam,
           .unit = rk::BudgetUnit::kNanoUsd,
           .limit = kBudgetNanoUsd,
           .period = rk::Period::calendar(rk::PeriodKind::kMonth).value()})
      .IgnoreError();
  const std::vector<double> w = weekly_weights();
  rk::Pacer<rk::ManualClock> pacer(acct, clock);
  pacer
      .add({.budget = "month",
            .profile = rk::WeeklyProfile::from_weights(w).value(),
            .burst_hours = o.burst_hours,
            .on_risk = {.alert = false}})
      .IgnoreError();
  const rk::WeeklyProfile prof = rk::WeeklyProfile::from_weights(w).value();

  std::mt19937_64 rng(o.seed);
  // Bursts: a third of the days, 2..6 hours at 4x from a random hour.
  const std::int64_t minutes = std::int64_t{kDays} * 24 * 60;
  std::vector<double> mult(static_cast<std::size_t>(minutes), 1.0);
  for (int d = 0; d < kDays; ++d) {
    if (std::uniform_int_distribution<int>(0, 2)(rng) != 0) continue;
    const int start = std::uniform_int_distribution<int>(0, 23)(rng) * 60;
    const int len = std::uniform_int_distribution<int>(2, 6)(rng) * 60;
    for (int m = start; m < start + len && d * 1440 + m < minutes; ++m) {
      mult[static_cast<std::size_t>(d * 1440 + m)] = 4.0;
    }
  }
  double weight_sum = 0;
  for (std::int64_t m = 0; m < minutes; ++m) {
    mult[static_cast<std::size_t>(m)] *=
        prof.weight(rk::Nanos{kStartNs + m * kMinuteNs});
    weight_sum += mult[static_cast<std::size_t>(m)];
  }
  constexpr std::uint64_t kPrompt = 2000, kMaxOut = 2000;
  // Output uniform in 200..2000: mean 1100 tokens; a call costs 3.1 mUSD.
  const double mean_cost = (kPrompt + 1100) * 1000.0;
  const double per_weight =
      o.demand * static_cast<double>(kBudgetNanoUsd) / mean_cost / weight_sum;

  Result r;
  r.spend_usd.assign(kDays, 0.0);
  const std::string team = "t";
  const rk::Subject who{.team = team};
  std::uniform_int_distribution<std::uint64_t> out_tokens(200, kMaxOut);
  std::uint64_t id = 0;
  for (std::int64_t m = 0; m < minutes; ++m) {
    const int day = static_cast<int>(m / 1440);
    std::poisson_distribution<int> calls(per_weight *
                                         mult[static_cast<std::size_t>(m)]);
    const int n = calls(rng);
    for (int c = 0; c < n; ++c) {
      // Spread over the minute.
      clock.set(
          rk::Nanos{kStartNs + m * kMinuteNs + c * (kMinuteNs / (n + 1))});
      ++r.calls;
      const rk::Estimate e{.prompt_tokens = kPrompt,
                           .max_output_tokens = kMaxOut};
      std::string rid = absl::StrCat("r", ++id);
      std::optional<rk::Reservation<rk::ManualClock>> res;
      if (o.paced) {
        auto pr = pacer.reserve(who, "m", e, std::move(rid));
        if (!pr.ok()) continue;
        if (!pr->reservation) {
          ++r.paced_refusals;
          continue;
        }
        res.emplace(std::move(*pr->reservation));
      } else {
        auto ar = acct.reserve(who, "m", e, std::move(rid));
        if (!ar.ok()) continue;
        res.emplace(*std::move(ar));
      }
      if (!res->granted()) {
        ++r.budget_refusals;
        if (r.exhausted_day == 0) r.exhausted_day = day + 1;
        continue;
      }
      rk::Usage u;
      u.input_uncached = kPrompt;
      u.output = out_tokens(rng);
      auto st = res->settle(u);
      if (!st.ok()) continue;
      ++r.admitted;
      const double usd = static_cast<double>(st->cost.nanos) / 1e9;
      r.spend_usd[static_cast<std::size_t>(day)] += usd;
      r.total_usd += usd;
    }
  }
  return r;
}

// Prints the paced and unpaced months side by side, then a data block for
// gnuplot between "# pacing-data begin" and "# pacing-data end": day,
// paced and unpaced spend that day, both cumulative, and the even line
// (USD).
inline void print_side_by_side(std::uint64_t seed, double demand = 1.5) {
  const Result p = run({.paced = true, .demand = demand, .seed = seed});
  const Result u = run({.paced = false, .demand = demand, .seed = seed});
  std::printf(
      "\nA month of bursty demand at %.1fx a $%.0f monthly budget "
      "(December 2026, seed %llu)\n",
      demand, p.budget_usd, static_cast<unsigned long long>(seed));
  std::printf("%-22s %12s %12s\n", "", "paced", "unpaced");
  std::printf("%-22s %12llu %12llu\n", "calls",
              static_cast<unsigned long long>(p.calls),
              static_cast<unsigned long long>(u.calls));
  std::printf("%-22s %12llu %12llu\n", "admitted",
              static_cast<unsigned long long>(p.admitted),
              static_cast<unsigned long long>(u.admitted));
  std::printf("%-22s %12llu %12llu\n", "refused by the pace",
              static_cast<unsigned long long>(p.paced_refusals),
              static_cast<unsigned long long>(u.paced_refusals));
  std::printf("%-22s %12llu %12llu\n", "refused by the budget",
              static_cast<unsigned long long>(p.budget_refusals),
              static_cast<unsigned long long>(u.budget_refusals));
  std::printf("%-22s %12.2f %12.2f\n", "spent (USD)", p.total_usd, u.total_usd);
  const auto day = [](int d) {
    return d == 0 ? std::string("never") : absl::StrCat("Dec ", d);
  };
  std::printf("%-22s %12s %12s\n", "budget ran out",
              day(p.exhausted_day).c_str(), day(u.exhausted_day).c_str());
  std::printf("%-22s %12.2f %12.2f\n", "spent on Dec 31 (USD)",
              p.spend_usd.back(), u.spend_usd.back());
  std::printf("# pacing-data begin\n");
  std::printf("# day paced unpaced paced_cum unpaced_cum even\n");
  double pc = 0, uc = 0;
  for (int d = 0; d < kDays; ++d) {
    const auto i = static_cast<std::size_t>(d);
    pc += p.spend_usd[i];
    uc += u.spend_usd[i];
    std::printf("%d %.4f %.4f %.4f %.4f %.4f\n", d + 1, p.spend_usd[i],
                u.spend_usd[i], pc, uc, p.budget_usd * (d + 1) / kDays);
  }
  std::printf("# pacing-data end\n");
}

}  // namespace pacing_month

#endif  // RATEKEEPER_EXAMPLES_PACING_MONTH_HPP_
