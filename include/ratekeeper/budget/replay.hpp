// ratekeeper/budget/replay.hpp: what-if replay of a ledger (issue 18).
//
// Replays the calls an Accountant recorded (reserve, deny, settle, release
// records: budget/accountant.hpp) against proposed rate limits per tier,
// budgets and prices, through the library's own TierTable, Chain and
// Accountant on a ManualClock set to each record's time, and reports per
// tier what would have been admitted, refused (by which limit) and spent,
// and when each budget would have run out. tools/whatif.cpp is its command
// line; docs/whatif.md has the proposal format and a worked example.
//
//   absl::StatusOr<WhatIfProposal> p = parse_whatif_proposal(json_text);
//   absl::StatusOr<std::vector<WhatIfRecord>> r = read_whatif_records(path);
//   absl::StatusOr<WhatIfReport> rep = replay_whatif(*r, *p);
//
// Each recorded attempt (a reserve or a deny record) is reserved again, with
// its tier's proposed limits weighted by prompt + max_output tokens, as the
// demo's gateway does; a recorded settle settles the replayed reservation to
// the recorded usage at the settle's time, a release releases it. A call the
// recording refused has no usage: if the proposal admits it, it is settled at
// once to its estimate (the worst case; counted in worst_case_settled), and a
// later attempt under its request id (the recording's retry) is not replayed.
// A budget "runs out" for a subject and period at its first refusal there.
// Budgets are kept per tier (one Accountant per tier, as the demo keeps
// them): a budget named for a tier counts that tier's calls, one named for
// none counts each tier's calls on books of that tier's own.
// Extensions (streamed calls) are not replayed: the settle has the usage.
#ifndef RATEKEEPER_BUDGET_REPLAY_HPP_
#define RATEKEEPER_BUDGET_REPLAY_HPP_

#include <sys/stat.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "ratekeeper/budget/accountant.hpp"
#include "ratekeeper/budget/json.hpp"
#include "ratekeeper/budget/ledger.hpp"
#include "ratekeeper/budget/whatif_proposal.hpp"
#include "ratekeeper/clock.hpp"
#include "ratekeeper/tiers.hpp"

namespace ratekeeper {

// WhatIfRecord: one ledger record the replay acts on.
struct WhatIfRecord {
  enum class Kind : std::uint8_t { kAttempt, kSettle, kRelease };
  Kind kind = Kind::kAttempt;
  std::uint64_t seq = 0, of = 0;  // of: the reserve a settle/release ends
  Nanos t{};
  std::string tier, request, model, binding;  // binding: a deny's limit
  bool recorded_granted = false;              // a reserve (not a deny)
  std::array<std::string, kAllFields.size()> subject{};  // by kAllFields
  Estimate estimate;
  Usage usage;                     // a settle's
  std::int64_t recorded_cost = 0;  // a settle's, nano-USD
};

struct WhatIfTierReport {
  std::string tier;
  bool has_limits = false;  // the proposal names the tier
  std::uint64_t attempts = 0, granted = 0, recorded_granted = 0;
  std::uint64_t changed = 0;             // decided otherwise than recorded
  std::uint64_t worst_case_settled = 0;  // recorded refusals admitted now
  std::uint64_t retries_skipped = 0;     // attempts of an id admitted before
  std::map<std::string, std::uint64_t> refused_by, recorded_refused_by;
  std::int64_t spend_nanos = 0, recorded_spend_nanos = 0;
};

struct WhatIfExhaustion {
  std::string tier, subject;  // subject: the budget's scope, "team=t1"
  std::int64_t period = 0;    // the budget period's index
  Nanos at{};                 // the first refusal by the budget there
};

struct WhatIfBudgetReport {
  std::string name, tier;       // tier: empty for a budget of every tier
  std::uint64_t exhausted = 0;  // subjects x periods run out
  std::vector<WhatIfExhaustion> first;  // the first `first`, by time
};

struct WhatIfReport {
  std::vector<WhatIfTierReport> tiers;  // in order of first appearance
  std::vector<WhatIfBudgetReport> budgets;
  std::uint64_t records = 0;  // replayed
  Nanos from{}, to{};
};

// read_whatif_records
//
// The records of a ledger (a file or a segment directory, every record from
// the first) that replay_whatif acts on, sorted by time (ledger order among
// equal times). kInvalidArgument for an attempt without its estimate or
// subject (a ledger written before issue 18 added them).
inline absl::StatusOr<std::vector<WhatIfRecord>> read_whatif_records(
    const std::string& path, LedgerReadOptions options = {}) {
  // read_ledger takes a missing file for an empty ledger (one not written
  // yet); a replay of a path that is not there is a mistake.
  struct stat sb;
  if (::stat(path.c_str(), &sb) != 0) {
    return absl::NotFoundError(
        absl::StrCat("ledger \"", path, "\": ", std::strerror(errno)));
  }
  options.from_checkpoint = false;
  std::vector<WhatIfRecord> out;
  const auto u64 = [](const nlohmann::json& j, const char* k) {
    const auto it = j.find(k);
    return it != j.end() && it->is_number_unsigned() ? it->get<std::uint64_t>()
                                                     : std::uint64_t{0};
  };
  absl::Status st = read_ledger(
      path,
      [&](const nlohmann::json& j) -> absl::Status {
        const auto ev = j.find("event");
        if (ev == j.end() || !ev->is_string()) return absl::OkStatus();
        const std::string e = ev->get<std::string>();
        WhatIfRecord r;
        r.seq = u64(j, "seq");
        r.of = u64(j, "of");
        r.t = Nanos{j.value("t", std::int64_t{0})};
        if (e == "settle") {
          r.kind = WhatIfRecord::Kind::kSettle;
          r.usage.input_uncached = u64(j, "input");
          r.usage.cache_read = u64(j, "cache_read");
          r.usage.cache_write_5m = u64(j, "cache_write");
          r.usage.output = u64(j, "output");
          r.recorded_cost = j.value("cost_nanos", std::int64_t{0});
        } else if (e == "release") {
          r.kind = WhatIfRecord::Kind::kRelease;
        } else if (e == "reserve" || e == "deny") {
          const auto sub = j.find("subject");
          if (sub == j.end() || !sub->is_object() || !j.contains("prompt")) {
            return absl::InvalidArgumentError(absl::StrCat(
                "ledger record ", r.seq, ": a ", e,
                " without its subject or estimate (written before issue 18's "
                "what-if fields): it cannot be replayed"));
          }
          r.recorded_granted = e == "reserve";
          r.tier = j.value("tier", std::string("-"));
          r.request = j.value("request", std::string());
          r.model = j.value("model", std::string());
          r.binding = j.value("binding", std::string());
          r.estimate = {u64(j, "prompt"), u64(j, "max_output")};
          for (std::size_t i = 0; i < kAllFields.size(); ++i) {
            const auto f = sub->find(std::string(field_name(kAllFields[i])));
            if (f != sub->end() && f->is_string()) {
              r.subject[i] = f->get<std::string>();
            }
          }
        } else {
          return absl::OkStatus();  // extend, reset, limit, checkpoint
        }
        out.push_back(std::move(r));
        return absl::OkStatus();
      },
      std::move(options));
  if (!st.ok()) return st;
  std::stable_sort(out.begin(), out.end(),
                   [](const auto& a, const auto& b) { return a.t < b.t; });
  return out;
}

// replay_whatif
//
// Replays `records` against `p` (see the top of this file). Errors: a
// record's model without a price in the proposal, a subject lacking a field
// a proposed limit or budget is scoped by (statuses from the library,
// prefixed with the record's sequence number).
inline absl::StatusOr<WhatIfReport> replay_whatif(
    const std::vector<WhatIfRecord>& records, const WhatIfProposal& p) {
  WhatIfReport rep;
  const Nanos start = records.empty() ? Nanos{} : records.front().t;
  ManualClock clock(start);
  const ShardedOptions store{.capacity = 4 * records.size() + 1024};
  TierTable<ManualClock> tiers(store, clock);
  std::set<std::string> proposed;
  for (const auto& [name, limits] : p.tiers) {
    if (absl::Status st = tiers.set_tier(name, limits); !st.ok()) return st;
    proposed.insert(name);
  }
  for (std::size_t b = 0; b < p.budgets.size(); ++b) {
    rep.budgets.emplace_back();
    rep.budgets.back().name = p.budgets[b].name;
    rep.budgets.back().tier = p.budget_tiers[b];
  }
  // One Accountant per tier (as the demo has): the budgets of every tier
  // and those of its own; `budgets`: their indices in p.budgets, in order.
  struct Books {
    std::unique_ptr<Accountant<ManualClock>> acct;
    std::vector<std::size_t> budgets;
  };
  std::unordered_map<std::string, Books> books;
  const auto books_of = [&](const std::string& t) -> absl::StatusOr<Books*> {
    auto [it, fresh] = books.try_emplace(t);
    if (!fresh) return &it->second;
    it->second.acct =
        std::make_unique<Accountant<ManualClock>>(p.prices, clock, store);
    for (std::size_t b = 0; b < p.budgets.size(); ++b) {
      if (!p.budget_tiers[b].empty() && p.budget_tiers[b] != t) continue;
      if (absl::Status st = it->second.acct->add_budget(p.budgets[b]);
          !st.ok()) {
        return st;
      }
      it->second.budgets.push_back(b);
    }
    return &it->second;
  };
  std::unordered_map<std::string, std::size_t> tier_index;
  const auto tier_of = [&](const std::string& t) -> WhatIfTierReport& {
    auto [it, fresh] = tier_index.try_emplace(t, rep.tiers.size());
    if (fresh) {
      WhatIfTierReport fresh_tier;
      fresh_tier.tier = t;
      fresh_tier.has_limits = proposed.count(t) != 0;
      rep.tiers.push_back(std::move(fresh_tier));
    }
    return rep.tiers[it->second];
  };
  std::unordered_map<std::uint64_t, Reservation<ManualClock>> open;
  std::unordered_map<std::uint64_t, std::string> tier_of_seq;
  std::set<std::string> admitted_ids, ran_out;
  const auto fail = [](const WhatIfRecord& r, const absl::Status& st) {
    return absl::Status(st.code(),
                        absl::StrCat("record ", r.seq, ": ", st.message()));
  };
  for (const WhatIfRecord& r : records) {
    clock.set(std::max(clock.now(), r.t));
    ++rep.records;
    if (r.kind != WhatIfRecord::Kind::kAttempt) {
      const auto tn = tier_of_seq.find(r.of);
      WhatIfTierReport& t = tier_of(tn == tier_of_seq.end() ? "-" : tn->second);
      if (r.kind == WhatIfRecord::Kind::kSettle) {
        t.recorded_spend_nanos += r.recorded_cost;
      }
      auto it = open.find(r.of);
      if (it == open.end()) continue;
      if (r.kind == WhatIfRecord::Kind::kSettle) {
        absl::StatusOr<Settlement> s = it->second.settle(r.usage);
        if (!s.ok()) return fail(r, s.status());
        t.spend_nanos += s->cost.nanos;
      }
      open.erase(it);  // a release, or done: the destructor gives back
      continue;
    }
    WhatIfTierReport& t = tier_of(r.tier);
    tier_of_seq[r.seq] = r.tier;
    if (r.recorded_granted) {
      ++t.recorded_granted;
    } else {
      ++t.recorded_refused_by[r.binding];
    }
    if (admitted_ids.count(r.request) != 0) {
      ++t.retries_skipped;
      continue;
    }
    ++t.attempts;
    Subject who;
    for (std::size_t i = 0; i < kAllFields.size(); ++i) {
      who.*Subject::member(kAllFields[i]) = r.subject[i];
    }
    ChainItems limits;
    if (t.has_limits) {
      if (absl::Status st = tiers.chain_items(
              r.tier, who,
              r.estimate.prompt_tokens + r.estimate.max_output_tokens, limits);
          !st.ok()) {
        return fail(r, st);
      }
    }
    absl::StatusOr<Books*> bk = books_of(r.tier);
    if (!bk.ok()) return bk.status();
    absl::StatusOr<Reservation<ManualClock>> res = (*bk)->acct->reserve(
        who, r.model, r.estimate, absl::StrCat("whatif-", r.seq), limits);
    if (!res.ok()) return fail(r, res.status());
    if (res->granted() != r.recorded_granted) ++t.changed;
    if (!res->granted()) {
      const LimitResult* by = res->decision().binding_result();
      const std::string name = by == nullptr ? "" : by->limit->name();
      ++t.refused_by[name];
      if (!res->refused_by_budget()) continue;
      for (const std::size_t b : (*bk)->budgets) {
        if (p.budgets[b].name != name) continue;
        std::string key, label;
        for (const Field f : kAllFields) {
          if (!p.budgets[b].scope.contains(f)) continue;
          absl::StrAppend(&label, label.empty() ? "" : ",",
                          detail::av(field_name(f)), "=",
                          detail::av(who.get(f)));
        }
        const std::int64_t period = p.budgets[b].period->index_of(clock.now());
        if (!ran_out.insert(absl::StrCat(b, "/", period, "/", label)).second) {
          break;
        }
        WhatIfBudgetReport& br = rep.budgets[b];
        ++br.exhausted;
        if (br.first.size() < p.first) {
          br.first.push_back(
              {r.tier, label.empty() ? "global" : label, period, clock.now()});
        }
      }
      continue;
    }
    ++t.granted;
    admitted_ids.insert(r.request);
    if (r.recorded_granted) {
      open.emplace(r.seq, *std::move(res));
      continue;
    }
    // Refused when recorded: no usage exists; charged its worst case.
    Usage worst;
    worst.input_uncached = r.estimate.prompt_tokens;
    worst.output = r.estimate.max_output_tokens;
    absl::StatusOr<Settlement> s = res->settle(worst);
    if (!s.ok()) return fail(r, s.status());
    t.spend_nanos += s->cost.nanos;
    ++t.worst_case_settled;
  }
  if (!records.empty()) {
    rep.from = records.front().t;
    rep.to = records.back().t;
  }
  return rep;
}

}  // namespace ratekeeper

#endif  // RATEKEEPER_BUDGET_REPLAY_HPP_
