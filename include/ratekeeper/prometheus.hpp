// ratekeeper/prometheus.hpp: limits' metrics as Prometheus text exposition.
//
// Defines prometheus_text(): for each limit, its outcomes (allowed, denied,
// shadow_denied, vetoed), errors, near-limit events, give-backs, listener
// errors, its capacity and the keys its store holds (Limit::statistics()), in
// the text format (version 0.0.4) that a /metrics endpoint serves:
//
//   # HELP ratekeeper_decisions_total Calls decided by each limit, by outcome.
//   # TYPE ratekeeper_decisions_total counter
//   ratekeeper_decisions_total{tier="free",limit="rpm",outcome="allowed"} 12
//
// Labeled by tier when given (TierTable::all_limits()).
#ifndef RATEKEEPER_PROMETHEUS_HPP_
#define RATEKEEPER_PROMETHEUS_HPP_

#include <fmt/format.h>

#include <cstdint>
#include <iterator>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "ratekeeper/chain.hpp"

namespace ratekeeper {

// MetricSource: one limit and the tier it belongs to (empty: no tier label).
struct MetricSource {
  std::string_view tier;
  const Limit* limit = nullptr;
};

namespace detail {

// A label value, escaped as the text format requires (\\, \", \n).
inline std::string prom_label(std::string_view v) {
  std::string out;
  out.reserve(v.size());
  for (const char c : v) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '"') {
      out += "\\\"";
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out.push_back(c);
    }
  }
  return out;
}

inline std::string prom_labels(const MetricSource& s) {
  std::string out;
  if (!s.tier.empty()) {
    out = fmt::format("tier=\"{}\",", prom_label(s.tier));
  }
  fmt::format_to(std::back_inserter(out), "limit=\"{}\"",
                 prom_label(s.limit->name()));
  return out;
}

}  // namespace detail

// prometheus_text
//
// The metrics of `sources`, grouped by metric family as the format asks.
inline std::string prometheus_text(std::span<const MetricSource> sources) {
  std::vector<std::string> labels;
  // Each limit's statistics, read once: the text and Limit::statistics()
  // say the same (issue 17; listener_test checks it).
  std::vector<LimitStatistics> stats;
  std::vector<LimitCounts> counts;
  for (const MetricSource& s : sources) {
    labels.push_back(detail::prom_labels(s));
    stats.push_back(s.limit->statistics());
    counts.push_back(stats.back().counts);
  }
  std::string out;
  auto family = [&](std::string_view name, std::string_view type,
                    std::string_view help) {
    fmt::format_to(std::back_inserter(out), "# HELP {} {}\n# TYPE {} {}\n",
                   name, help, name, type);
  };
  family("ratekeeper_decisions_total", "counter",
         "Calls decided by each limit, by outcome.");
  struct Outcome {
    std::string_view name;
    std::uint64_t LimitCounts::*field;
  };
  static constexpr Outcome kOutcomes[] = {
      {"allowed", &LimitCounts::allowed},
      {"denied", &LimitCounts::denied},
      {"shadow_denied", &LimitCounts::shadow_denied},
      {"vetoed", &LimitCounts::vetoed}};
  for (std::size_t i = 0; i < sources.size(); ++i) {
    for (const Outcome& o : kOutcomes) {
      fmt::format_to(std::back_inserter(out),
                     "ratekeeper_decisions_total{{{},outcome=\"{}\"}} {}\n",
                     labels[i], o.name, counts[i].*(o.field));
    }
  }
  // A family of one sample per limit, valued by `value(i)`.
  auto per_limit = [&](std::string_view name, std::string_view type,
                       std::string_view help, const auto& value) {
    family(name, type, help);
    for (std::size_t i = 0; i < sources.size(); ++i) {
      fmt::format_to(std::back_inserter(out), "{}{{{}}} {}\n", name, labels[i],
                     value(i));
    }
  };
  per_limit("ratekeeper_errors_total", "counter",
            "Calls a limit could not decide (bad key, store failure).",
            [&](std::size_t i) { return counts[i].errors; });
  per_limit("ratekeeper_near_limit_total", "counter",
            "Allowed calls that left a limit at or below its near-limit "
            "threshold.",
            [&](std::size_t i) { return counts[i].near_limit; });
  // Issue 17: give-backs and listener failures.
  per_limit("ratekeeper_given_back_total", "counter",
            "Receipts settled below their take (unused estimates, calls "
            "given back, chain roll-backs).",
            [&](std::size_t i) { return stats[i].given_back; });
  family("ratekeeper_given_back_units_total", "counter",
         "Units those settles asked back, in each limit's unit.");
  for (std::size_t i = 0; i < sources.size(); ++i) {
    fmt::format_to(std::back_inserter(out),
                   "ratekeeper_given_back_units_total{{{},unit=\"{}\"}} {}\n",
                   labels[i], unit_name(sources[i].limit->unit()),
                   stats[i].given_back_units);
  }
  per_limit("ratekeeper_listener_errors_total", "counter",
            "Exceptions a limit's listener threw (caught and counted).",
            [&](std::size_t i) { return stats[i].listener_errors; });
  family("ratekeeper_limit_capacity", "gauge",
         "Capacity of each limit, in its unit.");
  for (std::size_t i = 0; i < sources.size(); ++i) {
    fmt::format_to(std::back_inserter(out),
                   "ratekeeper_limit_capacity{{{},unit=\"{}\"}} {}\n",
                   labels[i], unit_name(sources[i].limit->unit()),
                   stats[i].capacity);
  }
  per_limit("ratekeeper_limit_shadow", "gauge",
            "1 while a limit is in shadow mode (decides, never denies).",
            [&](std::size_t i) { return stats[i].shadow ? 1 : 0; });
  per_limit("ratekeeper_store_keys", "gauge", "Keys each limit's store holds.",
            [&](std::size_t i) { return stats[i].keys; });
  return out;
}

// prometheus_text
//
// For limits with no tier label.
inline std::string prometheus_text(std::span<const Limit* const> limits) {
  std::vector<MetricSource> s;
  for (const Limit* l : limits) s.push_back({{}, l});
  return prometheus_text(std::span<const MetricSource>(s));
}

// prometheus_text
//
// For (tier, limit) pairs, as TierTable::all_limits() returns them.
inline std::string prometheus_text(
    const std::vector<std::pair<std::string, Limit*>>& limits) {
  std::vector<MetricSource> s;
  for (const auto& [tier, l] : limits) s.push_back({tier, l});
  return prometheus_text(std::span<const MetricSource>(s));
}

}  // namespace ratekeeper

#endif  // RATEKEEPER_PROMETHEUS_HPP_
