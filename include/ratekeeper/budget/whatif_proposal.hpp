// ratekeeper/budget/whatif_proposal.hpp: the proposal a what-if replay
// (budget/replay.hpp, tools/whatif.cpp) runs against, read from JSON.
//
//   {"tiers":   {"free": [{"name": "rpm", "scope": "user",
//                          "policy": "sliding_window", "unit": "requests",
//                          "limit": 10, "per": "minute"}, ...], ...},
//    "budgets": [{"name": "team_day", "scope": "team", "unit": "usd",
//                 "limit": "0.50", "period": "day", "tier": "free"}],
//    "prices":  {"gpt-4o-mini": {"input_cost_per_token": 1.5e-07, ...}},
//    "price_file": "model_prices_and_context_window.json",
//    "first": 5}
//
// Limits become TierTable LimitSpecs, budgets Accountant BudgetSpecs, prices
// a PriceTable read by load_price_catalogue (LiteLLM's JSON shape; entries
// of "prices" replace price_file's entries of the same model). docs/whatif.md
// lists every field.
#ifndef RATEKEEPER_BUDGET_WHATIF_PROPOSAL_HPP_
#define RATEKEEPER_BUDGET_WHATIF_PROPOSAL_HPP_

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "ratekeeper/budget/accountant.hpp"
#include "ratekeeper/budget/json.hpp"
#include "ratekeeper/budget/ledger.hpp"
#include "ratekeeper/tiers.hpp"

namespace ratekeeper {

// WhatIfProposal: what to replay against (parse_whatif_proposal).
struct WhatIfProposal {
  std::vector<std::pair<std::string, std::vector<LimitSpec>>> tiers;
  std::vector<BudgetSpec> budgets;
  std::vector<std::string> budget_tiers;  // per budget; empty: every tier
  PriceTable prices;
  std::size_t first = 5;  // exhaustions listed per budget
};

namespace detail {

inline absl::Status whatif_error(absl::string_view where,
                                 absl::string_view why) {
  return absl::InvalidArgumentError(
      absl::StrCat("proposal: ", where, ": ", why));
}

inline absl::Status whatif_keys(const json& o, absl::string_view where,
                                std::initializer_list<std::string_view> known) {
  if (!o.is_object()) return whatif_error(where, "is not a JSON object");
  for (const auto& [k, v] : o.items()) {
    if (std::find(known.begin(), known.end(), k) == known.end()) {
      return whatif_error(where, absl::StrCat("unknown field \"", k, "\""));
    }
  }
  return absl::OkStatus();
}

inline absl::StatusOr<std::string> whatif_string(const json& o, const char* k,
                                                 absl::string_view where,
                                                 const char* fallback) {
  const auto it = o.find(k);
  if (it == o.end()) {
    if (fallback != nullptr) return std::string(fallback);
    return whatif_error(where, absl::StrCat("\"", k, "\" is missing"));
  }
  if (!it->is_string() || it->get<std::string>().empty()) {
    return whatif_error(where, absl::StrCat("\"", k, "\" is not a name"));
  }
  return it->get<std::string>();
}

inline absl::StatusOr<std::uint64_t> whatif_count(const json& o, const char* k,
                                                  absl::string_view where,
                                                  bool required) {
  const auto it = o.find(k);
  if (it == o.end()) {
    if (!required) return std::uint64_t{0};
    return whatif_error(where, absl::StrCat("\"", k, "\" is missing"));
  }
  if (!it->is_number_unsigned()) {
    return whatif_error(where,
                        absl::StrCat("\"", k, "\" is not a whole number >= 0"));
  }
  return it->get<std::uint64_t>();
}

// "user", "team+user", "global".
inline absl::StatusOr<Scope> whatif_scope(std::string_view s,
                                          absl::string_view where) {
  Scope out;
  if (s == "global") return out;
  while (!s.empty()) {
    const std::size_t plus = std::min(s.find('+'), s.size());
    const std::string_view name = s.substr(0, plus);
    bool found = false;
    for (const Field f : kAllFields) {
      if (field_name(f) == name) {
        out = out | Scope(f);
        found = true;
      }
    }
    if (!found) {
      return whatif_error(where, absl::StrCat("unknown scope field \"",
                                              detail::av(name), "\""));
    }
    s.remove_prefix(std::min(plus + 1, s.size()));
  }
  return out;
}

inline absl::StatusOr<LimitSpec> whatif_limit(const json& o,
                                              absl::string_view where) {
  if (absl::Status st = whatif_keys(
          o, where,
          {"name", "scope", "policy", "unit", "limit", "per", "burst"});
      !st.ok()) {
    return st;
  }
  absl::StatusOr<std::string> name = whatif_string(o, "name", where, nullptr);
  if (!name.ok()) return name.status();
  const std::string at = absl::StrCat(where, " \"", *name, "\"");
  absl::StatusOr<std::string> scope = whatif_string(o, "scope", at, nullptr);
  absl::StatusOr<std::string> policy =
      whatif_string(o, "policy", at, "token_bucket");
  absl::StatusOr<std::string> unit = whatif_string(o, "unit", at, "requests");
  absl::StatusOr<std::string> per = whatif_string(o, "per", at, nullptr);
  absl::StatusOr<std::uint64_t> limit = whatif_count(o, "limit", at, true);
  absl::StatusOr<std::uint64_t> burst = whatif_count(o, "burst", at, false);
  for (const absl::Status& st :
       {scope.status(), policy.status(), unit.status(), per.status(),
        limit.status(), burst.status()}) {
    if (!st.ok()) return st;
  }
  LimitSpec spec;
  spec.options.name = *name;
  if (*unit != "requests" && *unit != "tokens") {
    return whatif_error(at, "\"unit\" is \"requests\" or \"tokens\"");
  }
  spec.options.unit = *unit == "tokens" ? Unit::kTokens : Unit::kRequests;
  absl::StatusOr<Scope> sc = whatif_scope(*scope, at);
  if (!sc.ok()) return sc.status();
  spec.scope = *sc;
  if (*policy == "token_bucket") {
    spec.kind = PolicyKind::kTokenBucket;
  } else if (*policy == "fixed_window") {
    spec.kind = PolicyKind::kFixedWindow;
  } else if (*policy == "sliding_window") {
    spec.kind = PolicyKind::kSlidingWindow;
  } else {
    return whatif_error(at,
                        "\"policy\" is token_bucket, fixed_window or "
                        "sliding_window");
  }
  if (*limit == 0) return whatif_error(at, "\"limit\" is 0");
  if (*per == "second") {
    spec.rate = per_second(*limit);
  } else if (*per == "minute") {
    spec.rate = per_minute(*limit);
  } else if (*per == "hour") {
    spec.rate = per_hour(*limit);
  } else if (*per == "day") {
    spec.rate = per_day(*limit);
  } else {
    return whatif_error(at, "\"per\" is second, minute, hour or day");
  }
  spec.burst = *burst;
  return spec;
}

// "12.34" dollars to nano-USD, exactly (at most 9 decimals).
inline std::optional<std::uint64_t> whatif_usd(std::string_view s) {
  const std::size_t dot = std::min(s.find('.'), s.size());
  const std::string_view whole = s.substr(0, dot);
  std::string frac(s.substr(std::min(dot + 1, s.size())));
  if (whole.empty() || whole.size() > 9 || frac.size() > 9 ||
      (dot < s.size() && frac.empty()) ||
      (std::string(whole) + frac).find_first_not_of("0123456789") !=
          std::string::npos) {
    return std::nullopt;
  }
  frac.resize(9, '0');
  return std::stoull(std::string(whole)) * 1'000'000'000 + std::stoull(frac);
}

inline absl::StatusOr<BudgetSpec> whatif_budget(const json& o,
                                                absl::string_view where) {
  if (absl::Status st = whatif_keys(
          o, where,
          {"name", "scope", "unit", "limit", "period", "time_zone", "tier"});
      !st.ok()) {
    return st;
  }
  absl::StatusOr<std::string> name = whatif_string(o, "name", where, nullptr);
  if (!name.ok()) return name.status();
  const std::string at = absl::StrCat(where, " \"", *name, "\"");
  absl::StatusOr<std::string> scope = whatif_string(o, "scope", at, nullptr);
  absl::StatusOr<std::string> unit = whatif_string(o, "unit", at, "usd");
  absl::StatusOr<std::string> period = whatif_string(o, "period", at, nullptr);
  absl::StatusOr<std::string> tz = whatif_string(o, "time_zone", at, "UTC");
  for (const absl::Status& st :
       {scope.status(), unit.status(), period.status(), tz.status()}) {
    if (!st.ok()) return st;
  }
  BudgetSpec b;
  b.name = *name;
  absl::StatusOr<Scope> sc = whatif_scope(*scope, at);
  if (!sc.ok()) return sc.status();
  b.scope = *sc;
  const auto lim = o.find("limit");
  if (*unit == "usd") {
    b.unit = BudgetUnit::kNanoUsd;
    const std::optional<std::uint64_t> n =
        lim != o.end() && lim->is_string() ? whatif_usd(lim->get<std::string>())
                                           : std::nullopt;
    if (!n)
      return whatif_error(at,
                          "\"limit\" is dollars as a string such as "
                          "\"0.50\", at most 9 digits before the point and 9 "
                          "after");
    b.limit = *n;
  } else if (*unit == "tokens") {
    b.unit = BudgetUnit::kTokens;
    absl::StatusOr<std::uint64_t> n = whatif_count(o, "limit", at, true);
    if (!n.ok()) return n.status();
    b.limit = *n;
  } else {
    return whatif_error(at, "\"unit\" is \"usd\" or \"tokens\"");
  }
  const PeriodKind kind = *period == "day"    ? PeriodKind::kDay
                          : *period == "week" ? PeriodKind::kWeek
                                              : PeriodKind::kMonth;
  if (*period != "day" && *period != "week" && *period != "month") {
    return whatif_error(at, "\"period\" is day, week or month");
  }
  absl::StatusOr<Period> p = Period::calendar(kind, *tz);
  if (!p.ok()) return whatif_error(at, p.status().message());
  b.period = *p;
  return b;
}

}  // namespace detail

// parse_whatif_proposal
//
// {"tiers": {"<tier>": [{"name","scope","policy","unit","limit","per",
//  "burst"}, ...]}, "budgets": [{"name","scope","unit","limit","period",
//  "time_zone","tier"}], "prices": {<LiteLLM entries>}, "price_file": "<path>",
//  "first": N}. "prices" entries replace price_file's of the same model.
// kInvalidArgument naming the field for anything else (an unknown field, a
// wrong type, a zero limit, no prices at all).
inline absl::StatusOr<WhatIfProposal> parse_whatif_proposal(
    std::string_view text) {
  absl::StatusOr<detail::json> j = detail::parse_json(text, "proposal");
  if (!j.ok()) return j.status();
  if (absl::Status st = detail::whatif_keys(
          *j, "top level",
          {"tiers", "budgets", "prices", "price_file", "first"});
      !st.ok()) {
    return st;
  }
  WhatIfProposal p;
  if (const auto t = j->find("tiers"); t != j->end()) {
    if (!t->is_object()) return detail::whatif_error("tiers", "not an object");
    for (const auto& [name, limits] : t->items()) {
      const std::string where = absl::StrCat("tier \"", name, "\"");
      if (!limits.is_array()) return detail::whatif_error(where, "not a list");
      std::vector<LimitSpec> specs;
      for (const auto& l : limits) {
        absl::StatusOr<LimitSpec> s = detail::whatif_limit(l, where);
        if (!s.ok()) return s.status();
        specs.push_back(*std::move(s));
      }
      p.tiers.emplace_back(name, std::move(specs));
    }
  }
  if (const auto b = j->find("budgets"); b != j->end()) {
    if (!b->is_array()) return detail::whatif_error("budgets", "not a list");
    for (const auto& o : *b) {
      absl::StatusOr<BudgetSpec> s = detail::whatif_budget(o, "budget");
      if (!s.ok()) return s.status();
      std::string tier;
      if (const auto t = o.find("tier"); t != o.end()) {
        if (!t->is_string() || t->get<std::string>().empty()) {
          return detail::whatif_error(absl::StrCat("budget \"", s->name, "\""),
                                      "\"tier\" is not a name");
        }
        tier = t->get<std::string>();
      }
      for (std::size_t i = 0; i < p.budgets.size(); ++i) {
        if (p.budgets[i].name == s->name && p.budget_tiers[i] == tier) {
          return detail::whatif_error(absl::StrCat("budget \"", s->name, "\""),
                                      "named twice for one tier");
        }
      }
      p.budgets.push_back(*std::move(s));
      p.budget_tiers.push_back(std::move(tier));
    }
  }
  detail::json prices = detail::json::object();
  if (const auto f = j->find("price_file"); f != j->end()) {
    if (!f->is_string())
      return detail::whatif_error("price_file", "not a path");
    absl::StatusOr<std::string> text_of = read_file(f->get<std::string>());
    if (!text_of.ok())
      return detail::whatif_error("price_file", text_of.status().message());
    absl::StatusOr<detail::json> pf =
        detail::parse_json(*text_of, "price_file");
    if (!pf.ok() || !pf->is_object()) {
      return detail::whatif_error("price_file", "not a JSON object");
    }
    prices = *std::move(pf);
  }
  if (const auto o = j->find("prices"); o != j->end()) {
    if (!o->is_object()) return detail::whatif_error("prices", "not an object");
    for (const auto& [model, entry] : o->items()) prices[model] = entry;
  }
  if (prices.empty()) {
    return detail::whatif_error("prices", "none given (prices or price_file)");
  }
  absl::StatusOr<PriceCatalogue> cat = load_price_catalogue(prices.dump());
  if (!cat.ok()) return detail::whatif_error("prices", cat.status().message());
  p.prices = std::move(cat->table);
  if (const auto n = j->find("first"); n != j->end()) {
    if (!n->is_number_unsigned()) {
      return detail::whatif_error("first", "not a whole number >= 0");
    }
    p.first = n->get<std::size_t>();
  }
  return p;
}

}  // namespace ratekeeper

#endif  // RATEKEEPER_BUDGET_WHATIF_PROPOSAL_HPP_
