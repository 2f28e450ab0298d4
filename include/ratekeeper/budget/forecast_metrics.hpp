// ratekeeper/budget/forecast_metrics.hpp: budget forecasts as Prometheus
// text.
//
// Defines ForecastSource (a budget, a subject label and its Forecast) and
// forecast_prometheus_text(), gauges in the text format (0.0.4), labeled
// budget="...",subject="..." (escaped as prometheus.hpp escapes labels):
//
//   ratekeeper_budget_spent               spent this period (budget's unit)
//   ratekeeper_budget_limit               the limit
//   ratekeeper_budget_projected{bound=}   the model's total at period end:
//                                         "low", "expected", "high"
//   ratekeeper_budget_projected_band      the band's stated frequency
//   ratekeeper_budget_burn_per_hour       the short-term rate (EWMA)
//   ratekeeper_budget_exhausts_at_seconds Unix time the model runs out
//                                         (only when it does this period)
#ifndef RATEKEEPER_BUDGET_FORECAST_METRICS_HPP_
#define RATEKEEPER_BUDGET_FORECAST_METRICS_HPP_

#include <fmt/format.h>

#include <cstdint>
#include <iterator>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "ratekeeper/budget/accountant.hpp"
#include "ratekeeper/prometheus.hpp"

namespace ratekeeper {

struct ForecastSource {
  std::string_view budget;
  std::string_view subject;  // a readable label: the caller's choice
  Forecast forecast;
};

// forecast_prometheus_text
//
// The gauges of every source, grouped by family.
inline std::string forecast_prometheus_text(
    std::span<const ForecastSource> sources) {
  std::string out;
  auto it = std::back_inserter(out);
  std::vector<std::string> labels;
  for (const ForecastSource& s : sources) {
    labels.push_back(fmt::format("budget=\"{}\",subject=\"{}\"",
                                 detail::prom_label(s.budget),
                                 detail::prom_label(s.subject)));
  }
  const auto family = [&](std::string_view name, std::string_view help) {
    fmt::format_to(it, "# HELP {} {}\n# TYPE {} gauge\n", name, help, name);
  };
  family("ratekeeper_budget_spent",
         "Spent on the budget this period, in its unit.");
  for (std::size_t i = 0; i < sources.size(); ++i) {
    fmt::format_to(it, "ratekeeper_budget_spent{{{}}} {}\n", labels[i],
                   sources[i].forecast.spent);
  }
  family("ratekeeper_budget_limit", "The budget's limit this period.");
  for (std::size_t i = 0; i < sources.size(); ++i) {
    fmt::format_to(it, "ratekeeper_budget_limit{{{}}} {}\n", labels[i],
                   sources[i].forecast.limit);
  }
  family("ratekeeper_budget_projected",
         "The burn model's total at period end: the band's bounds and the "
         "expected value.");
  for (std::size_t i = 0; i < sources.size(); ++i) {
    const Forecast& f = sources[i].forecast;
    fmt::format_to(it,
                   "ratekeeper_budget_projected{{{},bound=\"low\"}} {}\n"
                   "ratekeeper_budget_projected{{{},bound=\"expected\"}} {}\n"
                   "ratekeeper_budget_projected{{{},bound=\"high\"}} {}\n",
                   labels[i], f.projected_low, labels[i], f.model_projected,
                   labels[i], f.projected_high);
  }
  family("ratekeeper_budget_projected_band",
         "How often the projected band should hold the period's total.");
  for (std::size_t i = 0; i < sources.size(); ++i) {
    fmt::format_to(it, "ratekeeper_budget_projected_band{{{}}} {}\n", labels[i],
                   sources[i].forecast.band);
  }
  family("ratekeeper_budget_burn_per_hour",
         "The short-term spend rate per hour (EWMA of settlements).");
  for (std::size_t i = 0; i < sources.size(); ++i) {
    fmt::format_to(it, "ratekeeper_budget_burn_per_hour{{{}}} {}\n", labels[i],
                   sources[i].forecast.burn_per_hour);
  }
  family("ratekeeper_budget_exhausts_at_seconds",
         "Unix time the burn model runs the budget out this period.");
  for (std::size_t i = 0; i < sources.size(); ++i) {
    const auto& at = sources[i].forecast.model_exhausts_at;
    if (!at) continue;
    const std::int64_t ns = at->count();
    const std::int64_t sec = ns / 1'000'000'000;
    std::int64_t frac = ns % 1'000'000'000;
    std::string value = fmt::format("{}", sec);
    if (frac != 0) {
      std::string digits = fmt::format("{:09d}", frac < 0 ? -frac : frac);
      while (!digits.empty() && digits.back() == '0') digits.pop_back();
      value =
          fmt::format("{}{}.{}", ns < 0 && sec == 0 ? "-" : "", sec, digits);
    }
    fmt::format_to(it, "ratekeeper_budget_exhausts_at_seconds{{{}}} {}\n",
                   labels[i], value);
  }
  return out;
}

}  // namespace ratekeeper

#endif  // RATEKEEPER_BUDGET_FORECAST_METRICS_HPP_
