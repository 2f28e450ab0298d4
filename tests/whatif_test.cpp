// What-if replay (issue 18): a ledger written by Accountants in the test,
// replayed through budget/replay.hpp against proposals, each checked against
// the recording or against a simple model computed here.
#include <unistd.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "ratekeeper/budget/json.hpp"
#include "ratekeeper/budget/ledger.hpp"
#include "ratekeeper/budget/replay.hpp"

using namespace ratekeeper;
namespace fs = std::filesystem;

namespace {

constexpr std::int64_t kSecond = 1'000'000'000;
// 2026-11-30 10:00:00 UTC.
constexpr std::int64_t kStart = 1'796'083'200LL * kSecond - 14 * 3600 * kSecond;

constexpr char kPrices[] =
    R"({"gpt-4o-mini": {"input_cost_per_token": 1.5e-07,
        "output_cost_per_token": 6e-07, "litellm_provider": "openai",
        "mode": "chat"}})";
constexpr char kHalfPrices[] =
    R"({"gpt-4o-mini": {"input_cost_per_token": 7.5e-08,
        "output_cost_per_token": 3e-07, "litellm_provider": "openai",
        "mode": "chat"}})";
// The model's price in nano-USD per token, for the models below.
constexpr std::int64_t kInNanos = 150, kOutNanos = 600;

struct Call {
  std::int64_t t;
  std::size_t tier;  // 0 free, 1 pro
  std::string user, team;
  std::uint64_t prompt, max_output, output;
};

const char* const kTierNames[] = {"free", "pro"};

// 600 calls over two hours by 8 users (4 per tier, 2 teams per tier), at
// seeded random times: bursts enough to meet every recorded limit.
std::vector<Call> make_calls() {
  std::mt19937_64 rng(18);
  std::vector<Call> calls;
  for (int i = 0; i < 600; ++i) {
    const std::size_t u = rng() % 8;
    const std::size_t tier = u / 4;
    const std::uint64_t max_output = 256 + rng() % 768;
    calls.push_back(
        {kStart + static_cast<std::int64_t>(rng() % 7200) * kSecond +
             static_cast<std::int64_t>(rng() % 1000) * 1'000'000,
         tier, "u" + std::to_string(u),
         std::string(kTierNames[tier]) + "-t" + std::to_string(u / 2),
         100 + rng() % 1900, max_output, rng() % (max_output + 1)});
  }
  std::stable_sort(calls.begin(), calls.end(),
                   [](const Call& a, const Call& b) { return a.t < b.t; });
  return calls;
}

std::vector<LimitSpec> recorded_limits(std::size_t tier) {
  const std::uint64_t rpm = tier == 0 ? 2 : 4, tpm = tier == 0 ? 4000 : 9000;
  return {{{.name = "rpm"},
           Field::kUser,
           PolicyKind::kSlidingWindow,
           per_minute(rpm)},
          {{.name = "tpm", .unit = Unit::kTokens},
           Field::kUser,
           PolicyKind::kTokenBucket,
           per_minute(tpm),
           tpm}};
}

// The same limits and budget, as a proposal.
std::string recorded_tiers_json() {
  return R"("tiers": {
    "free": [{"name": "rpm", "scope": "user", "policy": "sliding_window",
              "limit": 2, "per": "minute"},
             {"name": "tpm", "scope": "user", "unit": "tokens",
              "limit": 4000, "per": "minute", "burst": 4000}],
    "pro":  [{"name": "rpm", "scope": "user", "policy": "sliding_window",
              "limit": 4, "per": "minute"},
             {"name": "tpm", "scope": "user", "unit": "tokens",
              "limit": 9000, "per": "minute", "burst": 9000}]})";
}
constexpr char kRecordedBudget[] =
    R"("budgets": [{"name": "team_day", "scope": "team", "unit": "usd",
                    "limit": "0.03", "period": "day"}])";

struct Tally {
  std::uint64_t granted = 0;
  std::map<std::string, std::uint64_t> refused;
  std::int64_t spend = 0;
};

struct Recording {
  std::string path;
  std::vector<Tally> tiers{2};
  ~Recording() { fs::remove_all(path); }
};

// Writes the ledger of `calls` through two Accountants (one per tier, each
// with the tier's limits and a $0.03 team budget per day) sharing a Ledger,
// each call settled at once to its usage; tallies what they decided.
void record(const std::vector<Call>& calls, Recording& rec,
            std::uint64_t segment_bytes = 0) {
  rec.path = (fs::temp_directory_path() /
              ("rk_whatif_" + std::to_string(::getpid()) +
               (segment_bytes != 0 ? "_segments" : ".jsonl")))
                 .string();
  fs::remove_all(rec.path);
  ManualClock clock(Nanos{kStart});
  TierTable<ManualClock> tiers({}, clock);
  PriceTable prices = load_price_catalogue(kPrices).value().table;
  auto ledger = Ledger::open(rec.path, {.durability = Durability::kNone,
                                        .segment_bytes = segment_bytes})
                    .value();
  std::vector<std::unique_ptr<Accountant<ManualClock>>> accts;
  for (std::size_t t = 0; t < 2; ++t) {
    REQUIRE(tiers.set_tier(kTierNames[t], recorded_limits(t)).ok());
    accts.push_back(std::make_unique<Accountant<ManualClock>>(prices, clock));
    REQUIRE(
        accts[t]
            ->add_budget({.name = "team_day",
                          .scope = Field::kTeam,
                          .limit = 30'000'000,
                          .period = Period::calendar(PeriodKind::kDay).value()})
            .ok());
    accts[t]->set_audit(ledger.get());
    accts[t]->set_audit_tier(kTierNames[t]);
  }
  for (std::size_t i = 0; i < calls.size(); ++i) {
    const Call& c = calls[i];
    clock.set(Nanos{c.t});
    const Subject who{.user = c.user, .team = c.team};
    ChainItems items;
    REQUIRE(tiers
                .chain_items(kTierNames[c.tier], who, c.prompt + c.max_output,
                             items)
                .ok());
    auto r =
        accts[c.tier]->reserve(who, "gpt-4o-mini", {c.prompt, c.max_output},
                               "req-" + std::to_string(i), items);
    REQUIRE(r.ok());
    Tally& tally = rec.tiers[c.tier];
    if (!r->granted()) {
      ++tally.refused[r->decision().binding_result()->limit->name()];
      continue;
    }
    Usage u;
    u.input_uncached = c.prompt;
    u.output = c.output;
    const auto s = r->settle(u);
    REQUIRE(s.ok());
    ++tally.granted;
    tally.spend += s->cost.nanos;
  }
}

WhatIfReport replay(const std::string& ledger, const std::string& proposal) {
  const auto p = parse_whatif_proposal(proposal);
  INFO(p.status().ToString());
  REQUIRE(p.ok());
  const auto records = read_whatif_records(ledger);
  INFO(records.status().ToString());
  REQUIRE(records.ok());
  const auto rep = replay_whatif(*records, *p);
  INFO(rep.status().ToString());
  REQUIRE(rep.ok());
  return *rep;
}

const WhatIfTierReport& tier(const WhatIfReport& r, const std::string& name) {
  for (const auto& t : r.tiers) {
    if (t.tier == name) return t;
  }
  FAIL("no tier " << name);
  return r.tiers.front();
}

// Calls the recording admitted, by index, to tell the usage a replay settles.
std::vector<bool> recorded_grants(const std::vector<Call>& calls,
                                  const std::string& ledger) {
  std::vector<bool> out(calls.size(), false);
  const auto records = read_whatif_records(ledger).value();
  for (const auto& r : records) {
    if (r.kind == WhatIfRecord::Kind::kAttempt && r.recorded_granted) {
      out[std::stoul(r.request.substr(4))] = true;
    }
  }
  return out;
}

}  // namespace

TEST_CASE(
    "what-if: the recorded limits, budget and prices replay to the "
    "recorded decisions and spend",
    "[i18]") {
  const std::vector<Call> calls = make_calls();
  Recording rec;
  record(calls, rec);
  // The recording meets every limit: the replay has something to match.
  const auto refused = [&](std::size_t t, const char* by) {
    const auto it = rec.tiers[t].refused.find(by);
    return it == rec.tiers[t].refused.end() ? std::uint64_t{0} : it->second;
  };
  REQUIRE(refused(0, "rpm") > 0);
  REQUIRE(refused(0, "team_day") > 0);
  REQUIRE(refused(1, "rpm") + refused(1, "tpm") > 0);
  const WhatIfReport r = replay(
      rec.path, absl::StrCat("{", recorded_tiers_json(), ",", kRecordedBudget,
                             ",\"prices\":", kPrices, "}"));
  CHECK(r.records ==
        calls.size() + rec.tiers[0].granted + rec.tiers[1].granted);
  REQUIRE(r.tiers.size() == 2);
  for (std::size_t t = 0; t < 2; ++t) {
    const WhatIfTierReport& got = tier(r, kTierNames[t]);
    const Tally& want = rec.tiers[t];
    CHECK(got.has_limits);
    CHECK(got.changed == 0);
    CHECK(got.granted == want.granted);
    CHECK(got.recorded_granted == want.granted);
    CHECK(got.refused_by == want.refused);
    CHECK(got.recorded_refused_by == want.refused);
    CHECK(got.spend_nanos == want.spend);
    CHECK(got.recorded_spend_nanos == want.spend);
    CHECK(got.attempts == got.granted + [&] {
      std::uint64_t n = 0;
      for (const auto& [k, v] : got.refused_by) n += v;
      return n;
    }());
  }
}

TEST_CASE(
    "what-if: a tighter limit refuses exactly the calls a per-minute "
    "count refuses; halved prices halve the spend",
    "[i18]") {
  const std::vector<Call> calls = make_calls();
  Recording rec;
  record(calls, rec);
  const std::vector<bool> granted = recorded_grants(calls, rec.path);
  // Proposal: free users get 1 request per calendar minute (fixed window),
  // pro has no limits, and no budgets.
  const std::string tighter = R"({"tiers": {"free": [{"name": "rpm1",
      "scope": "user", "policy": "fixed_window", "limit": 1, "per": "minute"}],
      "pro": []}, "prices": )";
  const WhatIfReport r = replay(rec.path, tighter + kPrices + "}");
  // The model: per free user and minute, the first attempt is admitted.
  std::map<std::pair<std::string, std::int64_t>, int> seen;
  std::vector<std::uint64_t> admitted(2), refused(2), worst(2);
  std::vector<std::int64_t> spend(2);
  for (std::size_t i = 0; i < calls.size(); ++i) {
    const Call& c = calls[i];
    const bool ok = c.tier == 1 || seen[{c.user, c.t / (60 * kSecond)}]++ == 0;
    if (!ok) {
      ++refused[c.tier];
      continue;
    }
    ++admitted[c.tier];
    // Admitted: charged its usage, or its worst case when it had none.
    const std::uint64_t out = granted[i] ? c.output : c.max_output;
    worst[c.tier] += granted[i] ? 0 : 1;
    spend[c.tier] += static_cast<std::int64_t>(c.prompt) * kInNanos +
                     static_cast<std::int64_t>(out) * kOutNanos;
  }
  REQUIRE(refused[0] > 0);
  for (std::size_t t = 0; t < 2; ++t) {
    const WhatIfTierReport& got = tier(r, kTierNames[t]);
    CHECK(got.granted == admitted[t]);
    CHECK(got.worst_case_settled == worst[t]);
    CHECK(got.spend_nanos == spend[t]);
    const std::map<std::string, std::uint64_t> want =
        refused[t] == 0
            ? std::map<std::string, std::uint64_t>{}
            : std::map<std::string, std::uint64_t>{{"rpm1", refused[t]}};
    CHECK(got.refused_by == want);
  }
  // Halved prices, the same limits: every charge is halved exactly.
  const WhatIfReport half = replay(rec.path, tighter + kHalfPrices + "}");
  for (std::size_t t = 0; t < 2; ++t) {
    CHECK(tier(half, kTierNames[t]).granted == admitted[t]);
    CHECK(tier(half, kTierNames[t]).spend_nanos * 2 == spend[t]);
    CHECK(tier(half, kTierNames[t]).recorded_spend_nanos == rec.tiers[t].spend);
  }
}

TEST_CASE("what-if: a token budget runs out when a running sum says", "[i18]") {
  const std::vector<Call> calls = make_calls();
  Recording rec;
  record(calls, rec);
  const std::vector<bool> granted = recorded_grants(calls, rec.path);
  constexpr std::uint64_t kLimit = 60'000;
  const WhatIfReport r = replay(
      rec.path,
      absl::StrCat(R"({"budgets": [{"name": "team_tokens", "scope": "team",
          "unit": "tokens", "limit": )",
                   kLimit, R"(, "period": "day"}], "first": 100, "prices": )",
                   kPrices, "}"));
  // The model: a call holds prompt + max_output; admitted if it fits what
  // the team has not spent; then charged its usage (its worst case when the
  // recording refused it). A team's budget runs out at its first refusal.
  std::map<std::string, std::uint64_t> spent;
  std::vector<std::pair<std::int64_t, std::string>> ran_out;
  std::uint64_t refused = 0;
  for (std::size_t i = 0; i < calls.size(); ++i) {
    const Call& c = calls[i];
    std::uint64_t& s = spent[c.team];
    if (s + c.prompt + c.max_output > kLimit) {
      ++refused;
      if (std::none_of(ran_out.begin(), ran_out.end(), [&](const auto& e) {
            return e.second == "team=" + c.team;
          })) {
        ran_out.emplace_back(c.t, "team=" + c.team);
      }
      continue;
    }
    s += c.prompt + (granted[i] ? c.output : c.max_output);
  }
  REQUIRE(ran_out.size() >= 2);
  REQUIRE(r.budgets.size() == 1);
  CHECK(r.budgets[0].name == "team_tokens");
  CHECK(r.budgets[0].exhausted == ran_out.size());
  REQUIRE(r.budgets[0].first.size() == ran_out.size());
  for (std::size_t i = 0; i < ran_out.size(); ++i) {
    CHECK(r.budgets[0].first[i].at.count() == ran_out[i].first);
    CHECK(r.budgets[0].first[i].subject == ran_out[i].second);
  }
  const auto by_budget = [&](const char* t) {
    const auto& m = tier(r, t).refused_by;
    const auto it = m.find("team_tokens");
    return it == m.end() ? std::uint64_t{0} : it->second;
  };
  CHECK(by_budget("free") + by_budget("pro") == refused);

  // The same budget for the pro tier only: free calls never meet it, and
  // pro's teams run out when the model says.
  const WhatIfReport pro = replay(
      rec.path,
      absl::StrCat(R"({"budgets": [{"name": "team_tokens", "scope": "team",
          "unit": "tokens", "tier": "pro", "limit": )",
                   kLimit, R"(, "period": "day"}], "first": 100, "prices": )",
                   kPrices, "}"));
  std::vector<std::pair<std::int64_t, std::string>> pro_ran_out;
  for (const auto& e : ran_out) {
    if (e.second.rfind("team=pro-", 0) == 0) pro_ran_out.push_back(e);
  }
  REQUIRE_FALSE(pro_ran_out.empty());
  REQUIRE(pro.budgets.size() == 1);
  CHECK(pro.budgets[0].tier == "pro");
  CHECK(tier(pro, "free").refused_by.empty());
  REQUIRE(pro.budgets[0].first.size() == pro_ran_out.size());
  for (std::size_t i = 0; i < pro_ran_out.size(); ++i) {
    CHECK(pro.budgets[0].first[i].at.count() == pro_ran_out[i].first);
    CHECK(pro.budgets[0].first[i].subject == pro_ran_out[i].second);
  }
}

TEST_CASE("what-if: a bad proposal is a clear error", "[i18]") {
  const std::string prices = absl::StrCat("\"prices\": ", kPrices);
  const std::vector<std::pair<std::string, std::string>> bad = {
      {"{", "not well-formed"},
      {"[]", "not a JSON object"},
      {"{\"tiers\": {}}", "prices"},
      {"{\"limits\": {}, " + prices + "}", "unknown field \"limits\""},
      {"{\"tiers\": {\"free\": [{\"name\": \"rpm\", \"scope\": \"user\", "
       "\"limit\": 0, \"per\": \"minute\"}]}, " +
           prices + "}",
       "\"limit\" is 0"},
      {"{\"tiers\": {\"free\": [{\"name\": \"rpm\", \"scope\": \"usr\", "
       "\"limit\": 5, \"per\": \"minute\"}]}, " +
           prices + "}",
       "unknown scope field \"usr\""},
      {"{\"tiers\": {\"free\": [{\"name\": \"rpm\", \"scope\": \"user\", "
       "\"limit\": 5, \"per\": \"fortnight\"}]}, " +
           prices + "}",
       "\"per\""},
      {"{\"tiers\": {\"free\": [{\"name\": \"rpm\", \"scope\": \"user\", "
       "\"limit\": -5, \"per\": \"minute\"}]}, " +
           prices + "}",
       "whole number"},
      {"{\"budgets\": [{\"name\": \"b\", \"scope\": \"team\", \"limit\": 5, "
       "\"period\": \"day\"}], " +
           prices + "}",
       "dollars as a string"},
      {"{\"budgets\": [{\"name\": \"b\", \"scope\": \"team\", \"limit\": "
       "\"1.5\", \"period\": \"year\"}], " +
           prices + "}",
       "\"period\""},
      {"{\"price_file\": \"/nonexistent/prices.json\"}", "price_file"},
      {"{\"budgets\": [{\"name\": \"b\", \"scope\": \"team\", \"limit\": "
       "\"1.5\", \"period\": \"day\"}, {\"name\": \"b\", \"scope\": "
       "\"user\", \"limit\": \"2\", \"period\": \"day\"}], " +
           prices + "}",
       "named twice"},
  };
  for (const auto& [text, why] : bad) {
    const auto p = parse_whatif_proposal(text);
    INFO(text);
    REQUIRE_FALSE(p.ok());
    CHECK(p.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK_THAT(std::string(p.status().message()),
               Catch::Contains("proposal") && Catch::Contains(why));
  }
  // A model the proposal has no price for: the replay names the record.
  const std::vector<Call> calls = make_calls();
  Recording rec;
  record(calls, rec);
  const auto p = parse_whatif_proposal(
      R"({"prices": {"other": {"input_cost_per_token": 1e-07,
          "output_cost_per_token": 1e-07, "mode": "chat"}}})");
  REQUIRE(p.ok());
  const auto rep = replay_whatif(read_whatif_records(rec.path).value(), *p);
  REQUIRE_FALSE(rep.ok());
  CHECK_THAT(std::string(rep.status().message()), Catch::Contains("record 1:"));
}

TEST_CASE(
    "what-if: a segmented ledger replays as one file does; a ledger "
    "without the what-if fields is refused, saying why",
    "[i18]") {
  const std::vector<Call> calls = make_calls();
  Recording one, segments;
  record(calls, one);
  record(calls, segments, 16 * 1024);
  REQUIRE(fs::is_directory(segments.path));
  REQUIRE(std::distance(fs::directory_iterator(segments.path),
                        fs::directory_iterator{}) > 3);
  const std::string proposal =
      absl::StrCat("{", recorded_tiers_json(), ",", kRecordedBudget,
                   ",\"prices\":", kPrices, "}");
  const WhatIfReport a = replay(one.path, proposal);
  const WhatIfReport b = replay(segments.path, proposal);
  CHECK(a.records == b.records);
  REQUIRE(a.tiers.size() == b.tiers.size());
  for (std::size_t t = 0; t < a.tiers.size(); ++t) {
    CHECK(a.tiers[t].granted == b.tiers[t].granted);
    CHECK(a.tiers[t].refused_by == b.tiers[t].refused_by);
    CHECK(a.tiers[t].spend_nanos == b.tiers[t].spend_nanos);
    CHECK(b.tiers[t].changed == 0);
  }

  // A reserve record as written before issue 18: no subject, no tier.
  Recording old;
  old.path = (fs::temp_directory_path() /
              ("rk_whatif_old_" + std::to_string(::getpid()) + ".jsonl"))
                 .string();
  fs::remove(old.path);
  {
    auto ledger =
        Ledger::open(old.path, {.durability = Durability::kNone}).value();
    REQUIRE(ledger
                ->append_nowait(
                    R"("event":"reserve","request":"r","model":"gpt-4o-mini",)"
                    R"("at":1,"prompt":10,"max_output":10,"items":[])",
                    Nanos{kStart})
                .ok());
  }
  const auto records = read_whatif_records(old.path);
  REQUIRE_FALSE(records.ok());
  CHECK(records.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(records.status().message()),
             Catch::Contains("record 1") && Catch::Contains("before issue 18"));
}

TEST_CASE(
    "What-if: a ledger path that is not there is an error, not a "
    "replay of nothing",
    "[i18]") {
  const std::string missing =
      (fs::temp_directory_path() /
       ("rk_whatif_missing_" + std::to_string(::getpid())))
          .string();
  fs::remove_all(missing);
  const auto records = read_whatif_records(missing);
  REQUIRE_FALSE(records.ok());
  CHECK(records.status().code() == absl::StatusCode::kNotFound);
  CHECK(std::string(records.status().message()).find(missing) !=
        std::string::npos);
}
