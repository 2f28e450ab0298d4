// ratekeeper_whatif: replays a ledger against proposed limits, budgets and
// prices, and reports per tier what would have been refused, spent, and
// when each budget would have run out (budget/replay.hpp; docs/whatif.md).
//
//   ratekeeper_whatif [--json] [--key-file FILE] [--out FILE] LEDGER PROPOSAL
//
// LEDGER: a ledger file or a segmented ledger's directory, written by an
// Accountant (its reserve and deny records carry the subject, the estimate
// and the tier). PROPOSAL: a JSON file (budget/whatif_proposal.hpp).
// --json: the report as JSON; --out: written to FILE (only on success)
// instead of standard output; --key-file: a keyed ledger's key.
//
// Exit 0: the report. Exit 2: bad arguments, a bad proposal, a ledger that
// cannot be read or replayed; the message says why, and nothing is written.
#include <cstdint>
#include <cstdio>
#include <ctime>
#include <nlohmann/json.hpp>
#include <string>

#include "ratekeeper/budget/replay.hpp"
#include "ratekeeper/fmt.hpp"

namespace rk = ratekeeper;

namespace {

int usage() {
  std::fprintf(stderr,
               "usage: ratekeeper_whatif [--json] [--key-file FILE] "
               "[--out FILE] LEDGER PROPOSAL\n");
  return 2;
}

int fail(const absl::Status& st) {
  std::fprintf(stderr, "ratekeeper_whatif: %s\n",
               std::string(st.message()).c_str());
  return 2;
}

std::string utc(rk::Nanos t) {
  const std::time_t s = static_cast<std::time_t>(t.count() / 1'000'000'000);
  std::tm tm{};
  gmtime_r(&s, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

std::string usd(std::int64_t nanos) {
  const char* sign = nanos < 0 ? "-" : "";
  const std::uint64_t n =
      static_cast<std::uint64_t>(nanos < 0 ? -nanos : nanos);
  return fmt::format("{}${}.{:04}", sign, n / 1'000'000'000,
                     (n % 1'000'000'000) / 100'000);
}

std::string counts(const std::map<std::string, std::uint64_t>& m) {
  std::string out;
  for (const auto& [name, n] : m) {
    out += fmt::format("{}{}:{}", out.empty() ? "" : " ",
                       name.empty() ? "?" : name, n);
  }
  return out.empty() ? "-" : out;
}

nlohmann::json to_json(const rk::WhatIfReport& r) {
  nlohmann::json j;
  j["records"] = r.records;
  j["from"] = utc(r.from);
  j["to"] = utc(r.to);
  j["tiers"] = nlohmann::json::array();
  for (const auto& t : r.tiers) {
    j["tiers"].push_back({{"tier", t.tier},
                          {"proposed_limits", t.has_limits},
                          {"attempts", t.attempts},
                          {"granted", t.granted},
                          {"refused_by", t.refused_by},
                          {"recorded_granted", t.recorded_granted},
                          {"recorded_refused_by", t.recorded_refused_by},
                          {"changed", t.changed},
                          {"worst_case_settled", t.worst_case_settled},
                          {"retries_skipped", t.retries_skipped},
                          {"spend_nanos", t.spend_nanos},
                          {"recorded_spend_nanos", t.recorded_spend_nanos}});
  }
  j["budgets"] = nlohmann::json::array();
  for (const auto& b : r.budgets) {
    nlohmann::json first = nlohmann::json::array();
    for (const auto& e : b.first) {
      first.push_back({{"at", utc(e.at)},
                       {"at_ns", e.at.count()},
                       {"tier", e.tier},
                       {"subject", e.subject},
                       {"period", e.period}});
    }
    j["budgets"].push_back({{"budget", b.name},
                            {"tier", b.tier},
                            {"exhausted", b.exhausted},
                            {"first", first}});
  }
  return j;
}

std::string to_text(const rk::WhatIfReport& r) {
  std::string out = fmt::format("what-if replay of {} records, {} to {}\n\n",
                                r.records, utc(r.from), utc(r.to));
  out += fmt::format("{:<11} {:>6} {:>9} {:>9} {:>9} {:>8} {:>12} {:>12}\n",
                     "tier", "limits", "attempts", "granted", "rec-grant",
                     "changed", "spend", "rec-spend");
  for (const auto& t : r.tiers) {
    out += fmt::format("{:<11} {:>6} {:>9} {:>9} {:>9} {:>8} {:>12} {:>12}\n",
                       t.tier, t.has_limits ? "yes" : "none", t.attempts,
                       t.granted, t.recorded_granted, t.changed,
                       usd(t.spend_nanos), usd(t.recorded_spend_nanos));
  }
  out +=
      "(attempts: reserve and deny records replayed; granted: admitted by "
      "the proposal; rec-grant: admitted when recorded; changed: decided "
      "otherwise than recorded; spend: under the proposed prices; rec-spend: "
      "as recorded)\n";
  out += "\nrefused, by the limit or budget that refused:\n";
  for (const auto& t : r.tiers) {
    out += fmt::format("  {:<11} proposed: {}\n  {:<11} recorded: {}\n", t.tier,
                       counts(t.refused_by), "", counts(t.recorded_refused_by));
    if (t.worst_case_settled + t.retries_skipped != 0) {
      out += fmt::format(
          "  {:<11} {} recorded refusals admitted (charged their estimate), "
          "{} retries of them not replayed\n",
          "", t.worst_case_settled, t.retries_skipped);
    }
  }
  for (const auto& b : r.budgets) {
    out += fmt::format(
        "\nbudget {}{}: ran out {} times (subject x period)", b.name,
        b.tier.empty() ? "" : fmt::format(" ({})", b.tier), b.exhausted);
    out += b.first.empty() ? "\n" : "; the first:\n";
    for (const auto& e : b.first) {
      out += fmt::format("  {}  {:<11} {}\n", utc(e.at), e.tier, e.subject);
    }
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  bool json = false;
  std::string out_path, ledger, proposal;
  rk::LedgerReadOptions options;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--json") {
      json = true;
    } else if (a == "--out" && i + 1 < argc) {
      out_path = argv[++i];
    } else if (a == "--key-file" && i + 1 < argc) {
      absl::StatusOr<std::string> key = rk::read_file(argv[++i]);
      if (!key.ok() || key->empty()) return usage();
      if (key->back() == '\n') key->pop_back();
      options.key = *key;
    } else if (!a.empty() && a[0] != '-' && ledger.empty()) {
      ledger = a;
    } else if (!a.empty() && a[0] != '-' && proposal.empty()) {
      proposal = a;
    } else {
      return usage();
    }
  }
  if (ledger.empty() || proposal.empty()) return usage();
  const absl::StatusOr<std::string> text = rk::read_file(proposal);
  if (!text.ok()) return fail(text.status());
  const absl::StatusOr<rk::WhatIfProposal> p = rk::parse_whatif_proposal(*text);
  if (!p.ok()) return fail(p.status());
  const absl::StatusOr<std::vector<rk::WhatIfRecord>> records =
      rk::read_whatif_records(ledger, options);
  if (!records.ok()) return fail(records.status());
  const absl::StatusOr<rk::WhatIfReport> report =
      rk::replay_whatif(*records, *p);
  if (!report.ok()) return fail(report.status());
  const std::string body =
      json ? to_json(*report).dump(2) + "\n" : to_text(*report);
  if (out_path.empty()) {
    std::fwrite(body.data(), 1, body.size(), stdout);
    return 0;
  }
  std::FILE* f = std::fopen(out_path.c_str(), "wb");
  if (f == nullptr ||
      std::fwrite(body.data(), 1, body.size(), f) != body.size() ||
      std::fclose(f) != 0) {
    std::fprintf(stderr, "ratekeeper_whatif: cannot write %s\n",
                 out_path.c_str());
    return 2;
  }
  return 0;
}
