// Issue 18 (Forecast): the burn model (budget/forecast.hpp) against oracles
// computed here, Accountant::forecast fed through reserve/settle and
// rebuilt from a ledger, the Prometheus text, and the model's accuracy on
// seeded synthetic months.
#include "ratekeeper/budget/forecast.hpp"

#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "ratekeeper/budget/accountant.hpp"
#include "ratekeeper/budget/forecast_metrics.hpp"
#include "ratekeeper/budget/ledger.hpp"
#include "ratekeeper/budget/pacing.hpp"
#include "test_prices.hpp"
#include "test_util.hpp"

using namespace ratekeeper;

namespace {

constexpr std::int64_t kHour = 3'600'000'000'000;
const Nanos kT0{1'796'083'200LL * 1'000'000'000};  // 2026-12-01 00:00 UTC

Nanos hours(double h) {
  return Nanos{static_cast<std::int64_t>(h * static_cast<double>(kHour))};
}

// The day of the week of Unix hour `h`, Monday 0 (the epoch: a Thursday).
int weekday(std::int64_t h) { return static_cast<int>((h / 24 + 3) % 7); }

// A weekly shape: weekday office hours busy, nights and weekends quiet.
double true_weight(std::int64_t h) {
  const int d = weekday(h);
  const auto hod = h % 24;
  if (d >= 5) return 0.3;
  if (hod >= 9 && hod < 18) return 3.0;
  return hod < 6 ? 0.2 : 0.7;
}

BudgetSpec token_month(std::uint64_t limit) {
  return BudgetSpec{"month",
                    Field::kTeam,
                    BudgetUnit::kTokens,
                    limit,
                    Period::calendar(PeriodKind::kMonth).value(),
                    {}};
}

}  // namespace

TEST_CASE("a constant rate: level, projection and exhaustion are exact",
          "[i18]") {
  BurnTracker t({.ewma_weight = 0});
  const Nanos start = kT0 - hours(21 * 24);
  for (int h = 0; h < 21 * 24; ++h) t.add(100, start + hours(h + 0.5));
  // At the month's start: 0 spent, 100 an hour for 31 days.
  const Nanos end = kT0 + hours(31 * 24);
  BurnProjection p = t.project(0, 50'000, kT0, end);
  CHECK(p.seasonal);
  CHECK(p.level_per_hour == Approx(100).epsilon(1e-12));
  CHECK(p.projected == Approx(100.0 * 31 * 24).epsilon(1e-12));
  // Every day was exactly as predicted: no error, no band.
  CHECK(p.low == Approx(p.projected).epsilon(1e-12));
  CHECK(p.high == Approx(p.projected).epsilon(1e-12));
  REQUIRE(p.exhausts_at.has_value());
  CHECK(std::llabs((*p.exhausts_at - (kT0 + hours(500))).count()) <= 1'000'000);
  for (const double w : t.profile().weights()) CHECK(w == Approx(1.0));
  // Spent at or over the limit: exhausted now; a low projection lasts.
  CHECK(t.project(50'000, 50'000, kT0, end).exhausts_at == kT0);
  CHECK_FALSE(t.project(0, 1e9, kT0, end).exhausts_at.has_value());
}

TEST_CASE("a noise-free weekly shape is learned: the projection is the truth",
          "[i18]") {
  BurnTracker t({.ewma_weight = 0});
  const std::int64_t h0 = kT0.count() / kHour;
  for (std::int64_t h = h0 - 28 * 24; h < h0; ++h) {
    t.add(40 * true_weight(h), Nanos{h * kHour + kHour / 2});
  }
  // The oracle: the future at the same rates, hour by hour.
  double truth = 0;
  const double limit = 20'000;
  std::optional<std::int64_t> out_hour;
  for (std::int64_t h = h0; h < h0 + 30 * 24; ++h) {
    truth += 40 * true_weight(h);
    if (!out_hour && truth >= limit) out_hour = h;
  }
  const BurnProjection p = t.project(0, limit, kT0, kT0 + hours(30 * 24));
  CHECK(p.projected == Approx(truth).epsilon(1e-9));
  CHECK(p.high - p.low == Approx(0).margin(1e-6 * truth));
  // Exhaustion lands within the hour the oracle crosses the limit.
  REQUIRE(p.exhausts_at.has_value());
  REQUIRE(out_hour.has_value());
  CHECK(p.exhausts_at->count() > *out_hour * kHour);
  CHECK(p.exhausts_at->count() <= (*out_hour + 1) * kHour);
  // The learned weights are the true ones, scaled to a mean of 1.
  double mean = 0;
  for (std::int64_t h = h0; h < h0 + 168; ++h) mean += true_weight(h) / 168;
  for (std::int64_t h = h0; h < h0 + 168; ++h) {
    CHECK(t.profile().weight(Nanos{h * kHour}) ==
          Approx(true_weight(h) / mean).epsilon(1e-9));
  }
}

TEST_CASE("the EWMA halves every half-life; history stays within its ring",
          "[i18]") {
  BurnTracker t({.weeks = 2, .ewma_half_life = std::chrono::minutes(20)});
  t.add(600, kT0);
  const double k = std::log(2.0) / (20.0 / 60);  // per hour
  CHECK(t.project(600, 1e9, kT0, kT0 + hours(1)).burn_per_hour ==
        Approx(600 * k));
  CHECK(t.project(600, 1e9, kT0 + std::chrono::minutes(40), kT0 + hours(1))
            .burn_per_hour == Approx(600 * k / 4));
  const std::size_t bytes = t.memory_bytes();
  for (int h = 1; h < 10 * 168; ++h) t.add(1, kT0 + hours(h));
  CHECK(t.memory_bytes() == bytes);
  const std::int64_t h0 = kT0.count() / kHour;
  CHECK(t.hour_spend(h0) == 0);  // older than 2 weeks: forgotten
  CHECK(t.hour_spend(h0 + 10 * 168 - 1) == 1);
  const BurnProjection p =
      t.project(0, 1e9, kT0 + hours(10 * 168), kT0 + hours(11 * 168));
  CHECK(p.history_hours == 2 * 168);
  // Too little history to test itself: the wide band, v = 0.25.
  BurnTracker young({.ewma_weight = 0});
  for (int h = 0; h < 48; ++h) young.add(10, kT0 + hours(h + 0.5));
  const BurnProjection y =
      young.project(100, 1e9, kT0 + hours(48), kT0 + hours(48 + 240));
  const double z = 1.2815515655446004;  // the 90th percentile: an 80% band
  CHECK_FALSE(y.seasonal);
  CHECK(y.projected == Approx(100 + 2400));
  CHECK(y.low == Approx(100 + 2400 * std::exp(-z * 0.5)).epsilon(1e-6));
  CHECK(y.high == Approx(100 + 2400 * std::exp(z * 0.5)).epsilon(1e-6));
  // A 50% band: z is the 75th percentile.
  BurnTracker half({.band = 0.5, .ewma_weight = 0});
  for (int h = 0; h < 48; ++h) half.add(10, kT0 + hours(h + 0.5));
  const BurnProjection hp =
      half.project(100, 1e9, kT0 + hours(48), kT0 + hours(48 + 240));
  CHECK(hp.band == 0.5);
  CHECK(hp.high ==
        Approx(100 + 2400 * std::exp(0.6744897501960817 * 0.5)).epsilon(1e-6));
}

TEST_CASE("forecast options out of range are refused, nothing changed",
          "[i18]") {
  Accountant<ManualClock> acct(rk_test::flat_prices(), ManualClock(kT0));
  REQUIRE(acct.add_budget(token_month(1'000'000)).ok());
  CHECK(acct.set_forecast_options({.weeks = 8, .band = 0.9}).ok());
  for (const ForecastOptions& bad :
       {ForecastOptions{.weeks = 1}, ForecastOptions{.weeks = 54},
        ForecastOptions{.ewma_half_life = std::chrono::minutes(0)},
        ForecastOptions{.band = 1.0}, ForecastOptions{.band = 0},
        ForecastOptions{.band = std::nan("")},
        ForecastOptions{.month_weight = 0.7, .day_weight = 0.4},
        ForecastOptions{.day_weight = -0.1}}) {
    CHECK(acct.set_forecast_options(bad).code() ==
          absl::StatusCode::kInvalidArgument);
  }
  CHECK(acct.forecast("month", {.team = "t"})->band == 0.9);
}

TEST_CASE("Accountant::forecast learns from settles and from its ledger",
          "[i18]") {
  const std::string path =
      (std::filesystem::temp_directory_path() /
       ("rk_" + std::to_string(::getpid()) + "_forecast.jsonl"))
          .string();
  std::filesystem::remove(path);
  ManualClock clock(kT0 - hours(15 * 24));
  const Subject who{.team = "t"};
  BurnTracker oracle;  // fed the same settlements, alone
  Forecast live;
  {
    Accountant<ManualClock> acct(rk_test::flat_prices(), clock);
    REQUIRE(acct.add_budget(token_month(1'000'000'000)).ok());
    auto ledger = Ledger::open(path, {.durability = Durability::kNone});
    REQUIRE(ledger.ok());
    acct.set_audit(ledger->get());
    // Nothing settled yet: the model says what is spent, nothing more.
    const Forecast none = acct.forecast("month", who).value();
    CHECK(none.model_projected == 0);
    CHECK(none.history_hours == 0);
    std::mt19937_64 rng(7);
    std::uniform_int_distribution<int> tokens(100, 900);
    for (int h = 0; h < 20 * 24; ++h) {
      clock.set(kT0 - hours(15 * 24) + hours(h + 0.25));
      Usage u;
      u.input_uncached = static_cast<std::uint64_t>(tokens(rng));
      auto r = acct.reserve(who, "m", {.prompt_tokens = u.input_uncached},
                            "r" + std::to_string(h));
      REQUIRE(r->granted());
      REQUIRE(r->settle(u).ok());
      oracle.add(static_cast<double>(u.input_uncached), clock.now());
    }
    // A released reservation spends nothing and teaches nothing.
    auto gone = acct.reserve(who, "m", {.prompt_tokens = 5'000}, "gone");
    gone->release();
    live = acct.forecast("month", who).value();
  }
  const BurnProjection want = oracle.project(static_cast<double>(live.spent),
                                             static_cast<double>(live.limit),
                                             live.now, live.period_end);
  // Exact spent plus the model's rounded rest (detail::with_burn).
  CHECK(live.model_projected ==
        live.spent + static_cast<std::uint64_t>(std::llround(want.remaining)));
  CHECK(live.projected_low ==
        live.spent +
            static_cast<std::uint64_t>(std::llround(want.remaining_low)));
  CHECK(live.projected_high ==
        live.spent +
            static_cast<std::uint64_t>(std::llround(want.remaining_high)));
  CHECK(live.burn_per_hour ==
        static_cast<std::uint64_t>(std::llround(want.burn_per_hour)));
  CHECK(live.seasonal);
  CHECK(live.history_hours == 20 * 24);
  CHECK(live.band == 0.8);
  CHECK(live.projected_low < live.model_projected);
  CHECK(live.model_projected < live.projected_high);
  // A restart: the ledger's settlements rebuild the same model.
  Accountant<ManualClock> again(rk_test::flat_prices(), clock);
  REQUIRE(again.add_budget(token_month(1'000'000'000)).ok());
  REQUIRE(read_ledger(path, [&](const nlohmann::json& j) {
            return again.replay(j);
          }).ok());
  const Forecast replayed = again.forecast("month", who).value();
  CHECK(replayed.spent == live.spent);
  CHECK(replayed.model_projected == live.model_projected);
  CHECK(replayed.projected_low == live.projected_low);
  CHECK(replayed.projected_high == live.projected_high);
  CHECK(replayed.burn_per_hour == live.burn_per_hour);
  CHECK(replayed.history_hours == live.history_hours);
  std::filesystem::remove(path);
}

TEST_CASE("the forecast's Prometheus text parses back to the forecast",
          "[i18]") {
  Forecast f;
  f.spent = 1'500;
  f.limit = 10'000;
  f.model_projected = 9'000;
  f.projected_low = 8'000;
  f.projected_high = 11'000;
  f.band = 0.8;
  f.burn_per_hour = 42;
  f.model_exhausts_at = Nanos{1'800'000'000LL * 1'000'000'000 + 500'000'000};
  Forecast g;  // lasts: no exhaustion sample
  g.spent = 3;
  g.limit = 4;
  const std::vector<ForecastSource> src = {{"month", "te\"a\\m\n1", f},
                                           {"day", "u", g}};
  const std::string text = forecast_prometheus_text(src);
  // name{labels} value, each family announced once with HELP and TYPE.
  std::map<std::string, std::string> samples;
  std::map<std::string, int> types;
  std::size_t pos = 0;
  while (pos < text.size()) {
    const std::size_t nl = text.find('\n', pos);
    REQUIRE(nl != std::string::npos);
    const std::string line = text.substr(pos, nl - pos);
    pos = nl + 1;
    if (line.rfind("# TYPE ", 0) == 0) {
      ++types[line.substr(7, line.find(' ', 7) - 7)];
      CHECK(line.substr(line.rfind(' ') + 1) == "gauge");
      continue;
    }
    if (line.rfind("# HELP ", 0) == 0) continue;
    const std::size_t sp = line.rfind(' ');
    REQUIRE(sp != std::string::npos);
    samples[line.substr(0, sp)] = line.substr(sp + 1);
  }
  for (const auto& [name, n] : types) CHECK(n == 1);
  const std::string a = "budget=\"month\",subject=\"te\\\"a\\\\m\\n1\"";
  CHECK(samples.at("ratekeeper_budget_spent{" + a + "}") == "1500");
  CHECK(samples.at("ratekeeper_budget_limit{" + a + "}") == "10000");
  CHECK(samples.at("ratekeeper_budget_projected{" + a + ",bound=\"low\"}") ==
        "8000");
  CHECK(samples.at("ratekeeper_budget_projected{" + a +
                   ",bound=\"expected\"}") == "9000");
  CHECK(samples.at("ratekeeper_budget_projected{" + a + ",bound=\"high\"}") ==
        "11000");
  CHECK(samples.at("ratekeeper_budget_projected_band{" + a + "}") == "0.8");
  CHECK(samples.at("ratekeeper_budget_burn_per_hour{" + a + "}") == "42");
  CHECK(samples.at("ratekeeper_budget_exhausts_at_seconds{" + a + "}") ==
        "1800000000.5");
  const std::string b = "budget=\"day\",subject=\"u\"";
  CHECK(samples.at("ratekeeper_budget_spent{" + b + "}") == "3");
  CHECK(samples.count("ratekeeper_budget_exhausts_at_seconds{" + b + "}") == 0);
  CHECK(samples.size() == 8 + 7);
}

// ---------------------------------------------------------------------------
// Accuracy on synthetic months.

namespace {

enum class Shape { kSeasonal, kTrend, kHoliday };

struct Event {
  Nanos at;
  std::uint64_t amount;
};

// Hourly spend with known rates: a month's rate (uniform in 2e4..2e5 a
// weighted hour), the weekly shape (true_weight), a lognormal day factor
// (sd 0.05) and hour noise (sd 0.3), bursts (2% of hours, 3-9 average
// hours' spend at once); a trend change (x1.6 from mid-month) or a holiday
// week (days 8-14 at 15%) for the shapes the model does not assume.
std::vector<Event> synth(Shape shape, std::uint32_t seed, Nanos from,
                         Nanos mstart, Nanos mend) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> rate_d(2e4, 2e5), u01(0, 1),
      burst(3, 9);
  std::normal_distribution<double> day_n(0, 0.05), hour_n(0, 0.3);
  const double rate = rate_d(rng);
  std::vector<Event> out;
  double day_f = 1;
  const Nanos mid = mstart + (mend - mstart) / 2;
  for (Nanos t = from; t < mend; t += Nanos{kHour}) {
    const std::int64_t h = t.count() / kHour;
    if (h % 24 == 0 || t == from) day_f = std::exp(day_n(rng));
    double r = rate * true_weight(h) * day_f;
    if (shape == Shape::kTrend && t >= mid) r *= 1.6;
    if (shape == Shape::kHoliday && t >= mstart + hours(7 * 24) &&
        t < mstart + hours(14 * 24)) {
      r *= 0.15;
    }
    const double x = r * std::exp(hour_n(rng));
    const auto minute = static_cast<std::int64_t>(u01(rng) * 59);
    out.push_back({t + std::chrono::minutes(minute),
                   static_cast<std::uint64_t>(std::max(1.0, x))});
    if (u01(rng) < 0.02) {
      out.push_back({t + std::chrono::minutes(59),
                     static_cast<std::uint64_t>(rate * burst(rng))});
    }
  }
  return out;
}

struct Outcome {
  std::array<double, 3> err{};  // (projected - truth) / truth
  std::array<bool, 3> inside{};
};

constexpr std::array<double, 3> kChecks = {0.25, 0.5, 0.75};

// One month with 4 weeks of history. Seasonal months go through an
// Accountant (reserve/settle on a ManualClock, forecast()); the others
// through a BurnTracker alone.
Outcome run_month(Shape shape, std::uint32_t seed, int month) {
  const Period cal = Period::calendar(PeriodKind::kMonth).value();
  const Period::Span span =
      cal.span_of(kT0 + hours(24 * (31 * (month + 1) + 15)));
  const Nanos from = span.start - hours(28 * 24);
  const std::vector<Event> ev = synth(shape, seed, from, span.start, span.end);
  double truth = 0;
  for (const Event& e : ev) {
    if (e.at >= span.start) truth += static_cast<double>(e.amount);
  }
  Outcome o;
  ManualClock clock(from);
  Accountant<ManualClock> acct(rk_test::flat_prices(), clock);
  REQUIRE(acct.add_budget(token_month(1'000'000'000'000)).ok());
  const Subject who{.team = "t"};
  BurnTracker tracker;
  double spent = 0;
  std::size_t i = 0;
  int id = 0;
  for (std::size_t c = 0; c < kChecks.size(); ++c) {
    const Nanos at =
        span.start +
        Nanos{static_cast<std::int64_t>(
            kChecks[c] * static_cast<double>((span.end - span.start).count()))};
    for (; i < ev.size() && ev[i].at < at; ++i) {
      if (ev[i].at >= span.start) spent += static_cast<double>(ev[i].amount);
      if (shape != Shape::kSeasonal) {
        tracker.add(static_cast<double>(ev[i].amount), ev[i].at);
        continue;
      }
      clock.set(ev[i].at);
      Usage u;
      u.input_uncached = ev[i].amount;
      auto r = acct.reserve(who, "m", {.prompt_tokens = ev[i].amount},
                            std::to_string(id++));
      REQUIRE(r->granted());
      REQUIRE(r->settle(u).ok());
    }
    double proj = 0, low = 0, high = 0;
    if (shape == Shape::kSeasonal) {
      clock.set(at);
      const Forecast f = acct.forecast("month", who).value();
      REQUIRE(static_cast<double>(f.spent) == spent);
      proj = static_cast<double>(f.model_projected);
      low = static_cast<double>(f.projected_low);
      high = static_cast<double>(f.projected_high);
    } else {
      const BurnProjection p = tracker.project(spent, 1e18, at, span.end);
      proj = p.projected;
      low = p.low;
      high = p.high;
    }
    o.err[c] = (proj - truth) / truth;
    o.inside[c] = low <= truth && truth <= high;
  }
  return o;
}

}  // namespace

TEST_CASE("accuracy on 20 seasonal months and on shapes it does not assume",
          "[i18]") {
  struct Row {
    const char* name;
    Shape shape;
    int months;
    std::uint32_t seed0;
  };
  const std::array<Row, 3> rows = {{{"seasonal", Shape::kSeasonal, 20, 1000},
                                    {"trend x1.6", Shape::kTrend, 10, 2000},
                                    {"holiday", Shape::kHoliday, 10, 3000}}};
  std::printf(
      "forecast accuracy: |projected - truth| / truth at 25%% / 50%% / 75%% "
      "of the month (mean, max), and how often the 80%% band held the truth\n"
      "%-12s %6s  %-15s %-15s %-15s %s\n",
      "shape", "months", "25%", "50%", "75%", "band");
  std::map<int, std::array<double, 3>> max_err;
  std::map<int, double> coverage;
  for (const Row& row : rows) {
    std::array<double, 3> sum{}, worst{};
    int inside = 0;
    for (int m = 0; m < row.months; ++m) {
      const Outcome o =
          run_month(row.shape, row.seed0 + static_cast<std::uint32_t>(m), m);
      for (std::size_t c = 0; c < 3; ++c) {
        sum[c] += std::abs(o.err[c]);
        worst[c] = std::max(worst[c], std::abs(o.err[c]));
        inside += o.inside[c] ? 1 : 0;
      }
    }
    const double cov = inside / (3.0 * row.months);
    std::printf(
        "%-12s %6d  %5.1f%% %6.1f%%  %5.1f%% %6.1f%%  %5.1f%% %6.1f%%  "
        "%4.0f%%\n",
        row.name, row.months, 100 * sum[0] / row.months, 100 * worst[0],
        100 * sum[1] / row.months, 100 * worst[1], 100 * sum[2] / row.months,
        100 * worst[2], 100 * cov);
    max_err[static_cast<int>(row.shape)] = worst;
    coverage[static_cast<int>(row.shape)] = cov;
  }
  // The bounds docs/budgets.md states ("Forecast").
  const auto& s = max_err[static_cast<int>(Shape::kSeasonal)];
  CHECK(s[0] <= 0.12);
  CHECK(s[1] <= 0.10);
  CHECK(s[2] <= 0.06);
  CHECK(coverage[static_cast<int>(Shape::kSeasonal)] >= 0.70);
  CHECK(coverage[static_cast<int>(Shape::kSeasonal)] <= 0.90);
  // Shapes it does not assume: a change is seen only once it has happened.
  for (const Shape sh : {Shape::kTrend, Shape::kHoliday}) {
    const auto& e = max_err[static_cast<int>(sh)];
    CHECK(e[0] <= 0.30);
    CHECK(e[1] <= 0.30);
    CHECK(e[2] <= 0.10);
  }
}

TEST_CASE("settles from many threads and forecasts at once: none is lost",
          "[i18]") {
  // The burn book's shards lock; a forecast during settles sees a
  // consistent model, and at the end every settle is in it.
  ManualClock clock(kT0 + hours(1));
  Accountant<ManualClock> acct(rk_test::flat_prices(), clock);
  REQUIRE(acct.add_budget(token_month(1'000'000'000)).ok());
  constexpr int kThreads = 4, kEach = 300;
  std::vector<std::thread> ts;
  std::atomic<bool> done{false};
  for (int t = 0; t < kThreads; ++t) {
    ts.emplace_back([&, t] {
      Usage u;
      u.input_uncached = 10;
      for (int i = 0; i < kEach; ++i) {
        const Subject who{.team = t % 2 == 0 ? "a" : "b"};
        auto r = acct.reserve(who, "m", {.prompt_tokens = 10},
                              std::to_string(t) + "-" + std::to_string(i));
        if (r.ok() && r->granted()) static_cast<void>(r->settle(u));
      }
    });
  }
  std::atomic<int> reads{0}, bad{0};  // Catch2 asserts on this thread only
  std::thread reader([&] {
    do {
      const Forecast f = acct.forecast("month", {.team = "a"}).value();
      if (f.model_projected < f.spent) bad.fetch_add(1);
      reads.fetch_add(1);
    } while (!done.load());
  });
  for (auto& t : ts) t.join();
  done.store(true);
  reader.join();
  CHECK(bad.load() == 0);
  CHECK(reads.load() > 0);
  // All at one time: the EWMA holds each amount at full weight.
  const double k = std::log(2.0) / 0.5;
  for (const char* team : {"a", "b"}) {
    const Forecast f = acct.forecast("month", {.team = team}).value();
    CHECK(f.spent == 2 * kEach * 10);
    CHECK(f.burn_per_hour ==
          static_cast<std::uint64_t>(std::llround(2 * kEach * 10 * k)));
  }
}

// Examiner's finding (clock stepped back): with the latest settlement at
// 10:59 and the clock set back to 08:30, history_hours wrapped to 2^32 - 1
// (a float-cast overflow), which a Pacer reads as "a day of history known".
TEST_CASE("a clock stepped back behind the latest settlement: sane fields",
          "[i18]") {
  SECTION("the tracker: hours counted up to now only, spend after now unseen") {
    BurnTracker t({.ewma_weight = 0});
    const std::int64_t h_first = kT0.count() / kHour;
    // 100 an hour, at each half hour, for 3 weeks.
    for (std::int64_t h = h_first; h < h_first + 21 * 24; ++h) {
      t.add(100, Nanos{h * kHour + kHour / 2});
    }
    const Nanos end = kT0 + hours(31 * 24);
    // Back to before the first spend (and past the ring's reach).
    for (const Nanos back : {kT0 - hours(0.5), kT0 - hours(6 * 168)}) {
      const BurnProjection p = t.project(700, 50'000, back, end);
      CHECK(p.history_hours == 0);
      CHECK(p.level_per_hour == 0);
      CHECK(p.remaining == 0);
      CHECK(p.projected == 700);
      CHECK(p.low == 700);
      CHECK(p.high == 700);
      CHECK_FALSE(p.exhausts_at.has_value());
    }
    // Back into the history: a week and a half hour known (169 hours); the
    // level comes from those hours alone, 100 an hour.
    const Nanos mid = kT0 + hours(168.5);
    const BurnProjection p = t.project(0, 1e9, mid, end);
    CHECK(p.history_hours == 169);
    // The oracle: that week's profile is flat (mass = hours); the 28 and 7
    // day windows hold its 168 hours and the current one (100 spent at its
    // half hour, now), the day window 24 hours and the current one.
    const double want =
        0.85 * (168 * 100 + 100) / 168.5 + 0.15 * (24 * 100 + 100) / 24.5;
    CHECK(p.level_per_hour == Approx(want).epsilon(1e-9));
    CHECK(p.remaining ==
          Approx(want * static_cast<double>((end - mid).count()) /
                 static_cast<double>(kHour))
              .epsilon(1e-9));
    CHECK(p.low <= p.projected);
    CHECK(p.projected <= p.high);
  }
  SECTION("the examiner's Accountant: settle at 10:59, clock back to 08:30") {
    ManualClock clock(kT0 + hours(10) + std::chrono::minutes(59));
    const Subject who{.team = "t"};
    Accountant<ManualClock> acct(rk_test::flat_prices(), clock);
    REQUIRE(acct.add_budget(token_month(10'000'000)).ok());
    auto r = acct.reserve(who, "m", {.prompt_tokens = 100'000}, "r1");
    REQUIRE(r->granted());
    Usage u;
    u.input_uncached = 100'000;
    REQUIRE(r->settle(u).ok());
    clock.set(kT0 + hours(8.5));
    const Forecast f = acct.forecast("month", who).value();
    CHECK(f.spent == 100'000);
    CHECK(f.history_hours == 0);  // now is before the first hour known
    CHECK(f.history_hours < 24);  // the Pacer does not trust the model
    CHECK(f.level_per_hour == 0);
    CHECK(f.model_projected == f.spent);
    CHECK(f.projected_low == f.spent);
    CHECK(f.projected_high == f.spent);
    CHECK_FALSE(f.model_exhausts_at.has_value());
    // Forward again to 11:30: the hours 10 and 11 are known.
    clock.set(kT0 + hours(11.5));
    CHECK(acct.forecast("month", who).value().history_hours == 2);
  }
}

// Examiner's finding (exactness): the model's totals were a double of spent
// plus the remaining part, so 1e16 + 1 came out as 1e16. They are exact
// spent plus the rounded remaining part, saturating.
TEST_CASE("the model's totals are exact spent plus the rounded rest", "[i18]") {
  SECTION("no settlement yet: spent exactly, at any size") {
    ManualClock clock(kT0 + hours(200));
    const Subject who{.team = "t"};
    // The examiner's: 1e13 prompt tokens at 1,000 nano-dollars and one
    // output token at 1: an open hold of 1e16 + 1 nano-dollars.
    PriceTable prices;
    REQUIRE(prices
                .set("m", {.base = {.input = TokenPrice{1'000'000'000},
                                    .output = TokenPrice{1'000'000}}})
                .ok());
    Accountant<ManualClock> acct(std::move(prices), clock);
    REQUIRE(acct.add_budget({"month",
                             Field::kTeam,
                             BudgetUnit::kNanoUsd,
                             std::uint64_t{1} << 62,
                             Period::calendar(PeriodKind::kMonth).value(),
                             {}})
                .ok());
    const std::uint64_t big = 10'000'000'000'000'001ULL;  // 1e16 + 1
    auto r = acct.reserve(
        who, "m",
        {.prompt_tokens = 10'000'000'000'000ULL, .max_output_tokens = 1},
        "big");
    INFO(r.status().ToString());
    REQUIRE(r.ok());
    REQUIRE(r->granted());
    const Forecast f = acct.forecast("month", who).value();
    CHECK(f.spent == big);
    CHECK(f.model_projected == big);
    CHECK(f.projected_low == big);
    CHECK(f.projected_high == big);
    r->release();
  }
  SECTION("with_burn: spent + llround(rest), saturating at 2^64 - 1") {
    const std::uint64_t max = ~std::uint64_t{0};
    Forecast f;
    f.spent = 10'000'000'000'000'001ULL;
    BurnProjection p;
    p.remaining = 2.4;
    p.remaining_low = 0.6;
    p.remaining_high = 1e19;  // past 2^63: saturates
    p.history_hours = 1e12;   // past 2^32: clamps
    Forecast g = detail::with_burn(f, p);
    CHECK(g.model_projected == 10'000'000'000'000'003ULL);
    CHECK(g.projected_low == 10'000'000'000'000'002ULL);
    CHECK(g.projected_high == max);
    CHECK(g.history_hours == 4294967295U);
    f.spent = max - 5;
    p.remaining = 10;
    p.history_hours = -3;
    g = detail::with_burn(f, p);
    CHECK(g.model_projected == max);
    CHECK(g.projected_low == max - 4);
    CHECK(g.history_hours == 0);
  }
}

// Examiner's finding (pacing2): four weeks of office hours, then a burst at
// Monday 20:20; by 22:20 the learned profile weighed Mon 20h 11.9 against
// 2.9 for an office hour, teaching a Pacer with learn_profile the burst.
TEST_CASE("one week's burst does not become the learned profile", "[i18]") {
  const std::int64_t mon = 1'796'601'600LL / 3600;  // Mon 2026-12-07 00:00
  REQUIRE(weekday(mon) == 0);
  const auto office = [](std::int64_t h) {
    const auto hod = h % 24;
    return weekday(h) < 5 && hod >= 9 && hod < 18;
  };
  ManualClock clock(Nanos{mon * kHour});
  const Subject who{.team = "t"};
  Accountant<ManualClock> acct(rk_test::flat_prices(), clock);
  REQUIRE(acct.add_budget(token_month(400'000'000)).ok());
  int id = 0;
  const auto spend = [&](std::uint64_t tokens) {
    auto r = acct.reserve(who, "m", {.prompt_tokens = tokens},
                          "r" + std::to_string(++id));
    REQUIRE(r->granted());
    Usage u;
    u.input_uncached = tokens;
    REQUIRE(r->settle(u).ok());
  };
  // 4 weeks (Dec 7 .. Jan 3) and Monday Jan 4's office hours: 50k an hour.
  const std::int64_t burst_h = mon + 28 * 24 + 20;  // Mon 2027-01-04 20h
  for (std::int64_t h = mon; h < burst_h; ++h) {
    if (!office(h)) continue;
    clock.set(Nanos{h * kHour + kHour / 2});
    spend(50'000);
  }
  // The burst: 100 x 20k at 20:20.
  clock.set(Nanos{burst_h * kHour + kHour / 3});
  for (int k = 0; k < 100; ++k) spend(20'000);
  clock.set(Nanos{(burst_h + 2) * kHour + kHour / 3});  // 22:20
  const std::optional<WeeklyProfile> lp =
      acct.learned_profile("month", who).value();
  REQUIRE(lp.has_value());
  // The oracle: every complete week (counted back from 22h) spent 50k in
  // each of its 45 office hours and nothing else but the one burst hour,
  // which the trimmed mean drops: office hours 168/45, the rest 0.
  for (std::int64_t h = burst_h - 168; h < burst_h + 168; ++h) {
    CAPTURE(h - mon);
    CHECK(lp->weight(Nanos{h * kHour}) ==
          Approx(office(h) ? 168.0 / 45 : 0.0).margin(1e-9));
  }
  // A Pacer spreading by that week (the examiner's pacing2): drained at
  // 22:20, it gains nothing over the night, whose learned weight is 0
  // (before, Mon 20h weighed 11.9 and it was full again by 22:20).
  Pacer<ManualClock> pacer(acct, clock);
  REQUIRE(pacer
              .add({.budget = "month",
                    .learn_profile = true,
                    .burst_hours = 1,
                    .on_risk = {.alert = false}})
              .ok());
  int drained = 0;
  for (; drained < 100; ++drained) {
    auto d = pacer.reserve(who, "m", {.prompt_tokens = 20'000},
                           "d" + std::to_string(drained));
    REQUIRE(d.ok());
    if (!d->reservation) break;
    Usage u;
    u.input_uncached = 20'000;
    REQUIRE(d->reservation->settle(u).ok());
  }
  CHECK(drained < 100);  // the Pacer refused: drained
  std::vector<std::uint64_t> left;
  for (const double at : {0.0, 4.0, 8.0}) {  // 22:20, 02:20, 06:20
    clock.set(Nanos{(burst_h + 2) * kHour + kHour / 3} + hours(at));
    auto d =
        pacer.reserve(who, "m", {.prompt_tokens = 1}, "p" + std::to_string(at));
    REQUIRE(d.ok());
    REQUIRE(d->reservation);
    left.push_back(d->pace.remaining);
    Usage u;
    u.input_uncached = 1;
    REQUIRE(d->reservation->settle(u).ok());
  }
  CHECK(left[0] < 20'000);
  CHECK(left[1] <= left[0]);
  CHECK(left[2] <= left[1]);
}

// Examiner's finding (accuracy claims): the 20 seeded months above are one
// draw; the examiner's generator over 30 seeds broke their bounds in 13.
// This measures the distribution over 30 seeds x 20 seasonal months (the
// seeds the examiner used are not these: the same recipe, other draws) and
// asserts what docs/budgets.md states of it, with margin; and the holiday
// months' error at 25% against the holiday's share of the rest.
TEST_CASE("accuracy across 30 seeds: the distribution docs/budgets.md states",
          "[i18]") {
  constexpr int kSeeds = 30, kMonths = 20;
  std::array<std::vector<double>, 3> worst;  // per seed, per checkpoint
  std::vector<double> cover;                 // per seed: band held / 60
  std::array<double, 3> mean_err{};
  for (int s = 0; s < kSeeds; ++s) {
    std::array<double, 3> w{};
    int inside = 0;
    for (int m = 0; m < kMonths; ++m) {
      const Outcome o =
          run_month(Shape::kSeasonal,
                    static_cast<std::uint32_t>(10'000 + 100 * s + m), m);
      for (std::size_t c = 0; c < 3; ++c) {
        w[c] = std::max(w[c], std::abs(o.err[c]));
        mean_err[c] += std::abs(o.err[c]) / (kSeeds * kMonths);
        inside += o.inside[c] ? 1 : 0;
      }
    }
    for (std::size_t c = 0; c < 3; ++c) worst[c].push_back(w[c]);
    cover.push_back(inside / (3.0 * kMonths));
  }
  // The 95th percentile of the 30 per-seed maxima: the 29th smallest.
  const auto p95 = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[static_cast<std::size_t>(
                 std::ceil(0.95 * static_cast<double>(v.size()))) -
             1];
  };
  const auto vmax = [](const std::vector<double>& v) {
    return *std::max_element(v.begin(), v.end());
  };
  std::printf(
      "30 seeds x 20 seasonal months: |error| mean over all months; per "
      "seed's worst month: 95th percentile and max\n");
  for (std::size_t c = 0; c < 3; ++c) {
    std::printf("  at %2.0f%%: mean %4.1f%%  worst p95 %5.1f%%  max %5.1f%%\n",
                100 * kChecks[c], 100 * mean_err[c], 100 * p95(worst[c]),
                100 * vmax(worst[c]));
  }
  const auto [cmin, cmax] = std::minmax_element(cover.begin(), cover.end());
  double cmean = 0;
  for (const double c : cover) cmean += c / kSeeds;
  std::printf("  band held: mean %.0f%%, seeds from %.0f%% to %.0f%%\n",
              100 * cmean, 100 * *cmin, 100 * *cmax);
  // Holiday months (days 8-14 at 15%): at 25% of the month the holiday is
  // barely seen; the error is its share of the rest of the month. The
  // oracle: the expected spend the holiday takes away after the checkpoint
  // (0.85 x the weights of its hours), over the month's expected total.
  double worst_excess = -1, worst_hol = 0;
  int within = 0;
  for (int s = 0; s < kSeeds; ++s) {
    for (int m = 0; m < 12; ++m) {
      const Outcome o = run_month(
          Shape::kHoliday, static_cast<std::uint32_t>(20'000 + 100 * s + m), m);
      const Period::Span span =
          Period::calendar(PeriodKind::kMonth)
              .value()
              .span_of(kT0 + hours(24 * (31 * (m + 1) + 15)));
      const Nanos at =
          span.start +
          Nanos{static_cast<std::int64_t>(
              0.25 * static_cast<double>((span.end - span.start).count()))};
      double total = 0, lost = 0;
      for (Nanos t = span.start; t < span.end; t += Nanos{kHour}) {
        const std::int64_t h = t.count() / kHour;
        const bool hol =
            t >= span.start + hours(7 * 24) && t < span.start + hours(14 * 24);
        total += true_weight(h) * (hol ? 0.15 : 1.0);
        if (hol && t >= at) lost += 0.85 * true_weight(h);
      }
      const double share = lost / total;
      worst_hol = std::max(worst_hol, o.err[0]);
      worst_excess = std::max(worst_excess, o.err[0] - share);
      within += o.err[0] <= share + 0.05 ? 1 : 0;
    }
  }
  std::printf(
      "30 seeds x 12 holiday months at 25%%: worst error %.1f%%; error at "
      "most the holiday's share of the rest + 5 points in %d of 360, worst "
      "excess %.1f points\n",
      100 * worst_hol, within, 100 * worst_excess);
  // What docs/budgets.md states, with margin.
  CHECK(p95(worst[0]) <= 0.20);
  CHECK(vmax(worst[0]) <= 0.25);
  CHECK(p95(worst[1]) <= 0.12);
  CHECK(vmax(worst[1]) <= 0.15);
  CHECK(p95(worst[2]) <= 0.08);
  CHECK(vmax(worst[2]) <= 0.10);
  CHECK(mean_err[0] <= 0.05);
  CHECK(mean_err[1] <= 0.04);
  CHECK(mean_err[2] <= 0.03);
  CHECK(*cmin >= 0.55);
  CHECK(*cmax <= 0.97);
  CHECK(cmean >= 0.70);
  CHECK(cmean <= 0.90);
  CHECK(within >= 340);
  CHECK(worst_excess <= 0.30);
}
