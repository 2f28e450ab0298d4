// guarded_call: one LLM call guarded by a budget, from start to end.
//
// The flow docs/budgets.md explains, as a whole program: prices from the
// open catalogue's JSON, a monthly team budget in dollars with soft alerts,
// a daily token budget per user, a ledger with group commit, the tier's
// rate limits in the same all-or-nothing reservation, the provider's usage
// read from its response body, a stream that ends without usage, a forecast,
// and the ledger verified and replayed at the end. The "provider" is a
// function returning an OpenAI-shaped body; nothing leaves the process.
//
//   guarded_call [LEDGER_PATH]
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <string>

#include "ratekeeper/budget/accountant.hpp"
#include "ratekeeper/budget/json.hpp"
#include "ratekeeper/budget/ledger.hpp"
#include "ratekeeper/errors.hpp"
#include "ratekeeper/tiers.hpp"

namespace rk = ratekeeper;

namespace {

constexpr char kCatalogue[] = R"({
  "gpt-4o": {"input_cost_per_token": 2.5e-06,
             "cache_read_input_token_cost": 1.25e-06,
             "output_cost_per_token": 1e-05}
})";

// The provider: an OpenAI Chat Completions body with its usage object.
std::string call_provider(std::uint64_t prompt, std::uint64_t max_tokens) {
  const std::uint64_t output = max_tokens / 3;
  return "{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion\",\"usage\":"
         "{\"prompt_tokens\":" +
         std::to_string(prompt) +
         ",\"completion_tokens\":" + std::to_string(output) +
         ",\"total_tokens\":" + std::to_string(prompt + output) +
         ",\"prompt_tokens_details\":{\"cached_tokens\":" +
         std::to_string(prompt / 2) + "}}}";
}

// $50 a month per team (Paris months), 200k tokens a day per user; alerts
// at 50%, 80% and 100% of the team's. The accountant rebuilt from the
// ledger needs the same budgets.
absl::Status add_budgets(rk::Accountant<>& acct) {
  if (auto st = acct.add_budget(
          {.name = "team_month",
           .scope = rk::Field::kTeam,
           .unit = rk::BudgetUnit::kNanoUsd,
           .limit = static_cast<std::uint64_t>(rk::Money::usd(50).nanos),
           .period =
               rk::Period::calendar(rk::PeriodKind::kMonth, "Europe/Paris")
                   .value(),
           .soft_permille = {500, 800, 1000}});
      !st.ok()) {
    return st;
  }
  return acct.add_budget(
      {.name = "user_day",
       .scope = rk::Field::kUser,
       .unit = rk::BudgetUnit::kTokens,
       .limit = 200'000,
       .period = rk::Period::calendar(rk::PeriodKind::kDay).value()});
}

int fail(const absl::Status& st) {
  std::fprintf(stderr, "guarded_call: %s\n", st.ToString().c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string path =
      argc > 1 ? argv[1]
               : (std::filesystem::temp_directory_path() /
                  ("guarded_call_" + std::to_string(::getpid()) + ".jsonl"))
                     .string();

  // 1. Prices, read exactly from the catalogue's decimal text.
  absl::StatusOr<rk::PriceCatalogue> prices =
      rk::load_price_catalogue(kCatalogue);
  if (!prices.ok()) return fail(prices.status());

  // 2. Budgets (add_budgets above) and their alerts.
  const rk::ShardedOptions small{.capacity = 4096};  // states preallocated
  rk::Accountant<> acct(prices->table, rk::SystemClock{}, small);
  if (auto st = add_budgets(acct); !st.ok()) return fail(st);
  acct.on_threshold([](const rk::ThresholdEvent& e) {
    std::printf("alert: %s at %u permille\n", e.budget.c_str(), e.permille);
  });

  // 3. The ledger: every reserve, settle and release, durable before a
  //    settle returns (one fdatasync per 2 ms for everything written).
  absl::StatusOr<std::unique_ptr<rk::Ledger>> ledger =
      rk::Ledger::open(path, {.durability = rk::Durability::kGroupCommit});
  if (!ledger.ok()) return fail(ledger.status());
  acct.set_audit(ledger->get());

  // 4. The tier's rate limits, taken in the same decision as the budgets.
  rk::TierTable<> tiers(small);
  if (auto st =
          tiers.set_tier("pro", {{{.name = "rpm"},
                                  rk::Field::kUser,
                                  rk::PolicyKind::kSlidingWindow,
                                  rk::per_minute(60)},
                                 {{.name = "tpm", .unit = rk::Unit::kTokens},
                                  rk::Field::kUser,
                                  rk::PolicyKind::kTokenBucket,
                                  rk::per_minute(150'000),
                                  150'000}});
      !st.ok()) {
    return fail(st);
  }

  const std::string user = "user:42", team = "team:7";
  const rk::Subject who{.user = user, .team = team};

  // 5. A guarded call: reserve the worst case, call, settle the usage.
  const std::uint64_t prompt = 1'200, max_tokens = 4'000;
  rk::ChainItems limits;  // owns the keys it makes for `who`
  if (auto st = tiers.chain_items("pro", who, prompt + max_tokens, limits);
      !st.ok()) {
    return fail(st);
  }
  absl::StatusOr<rk::Reservation<>> r = acct.reserve(
      who, "gpt-4o", {.prompt_tokens = prompt, .max_output_tokens = max_tokens},
      "req-0001", limits.items());
  if (!r.ok()) return fail(r.status());  // 500: unknown model, no team...
  if (!r->granted()) {
    const rk::Rejection no = r->refused_by_budget()
                                 ? rk::Rejection::budget(r->decision())
                                 : rk::Rejection::from(r->decision());
    std::printf("HTTP %d %s\n", no.status(), no.json_body().c_str());
    return 0;
  }
  std::printf("reserved %s for the worst case\n",
              r->reserved_money().to_string().c_str());
  const std::string body = call_provider(prompt, max_tokens);
  absl::StatusOr<rk::OpenAIChatUsage> raw = rk::read_openai_chat_usage(body);
  absl::StatusOr<rk::Usage> used =
      raw.ok() ? rk::normalize(*raw) : absl::StatusOr<rk::Usage>(raw.status());
  // Without a usable usage object: the prompt estimate and the output the
  // server counted itself, flagged estimated (never $0). The settle takes
  // the budgets and the tier's token limit to what was used, both ways
  // (unused estimate back, an excess charged): nothing to subtract here.
  absl::StatusOr<rk::Settlement> paid =
      used.ok() ? r->settle(*used) : r->settle_without_usage(0);
  if (!paid.ok()) return fail(paid.status());  // e.g. the ledger's fsync
  std::printf("settled %s for %llu tokens\n", paid->cost.to_string().c_str(),
              static_cast<unsigned long long>(paid->tokens));
  // The tier's token limit now holds what the provider counted.
  const rk::ChainItem tpm = limits.items()[1];
  std::printf("tpm: %llu of 150000 tokens left\n",
              static_cast<unsigned long long>(
                  tpm.limit->peek(tpm.key, 0, r->decision().at).remaining));
  // A retried settle of the same id changes nothing; a new call under the
  // id is refused, so a retry never reaches the provider twice.
  if (r->settle(rk::Usage{}).value() != *paid) return 1;
  if (acct.reserve(who, "gpt-4o", {.prompt_tokens = prompt}, "req-0001")
          .status()
          .code() != absl::StatusCode::kAlreadyExists) {
    return 1;
  }

  // 6. A stream that ends without a usage chunk: grow the reservation as
  //    chunks arrive, settle the counted tokens, flagged estimated.
  {
    auto s = acct.reserve(who, "gpt-4o",
                          {.prompt_tokens = 800, .max_output_tokens = 500},
                          "req-0002");
    if (!s.ok() || !s->granted()) return 1;
    std::uint64_t out = 0;
    for (int chunk = 0; chunk < 12; ++chunk) {
      absl::StatusOr<bool> fits = s->next_chunk_fits(out, 64);
      if (!fits.ok()) return fail(fits.status());
      if (!*fits) break;  // cut the stream: the budget is spent
      out += 64;
    }
    absl::StatusOr<rk::Settlement> est = s->settle_without_usage(out);
    if (!est.ok()) return fail(est.status());
    std::printf("stream without usage: %llu output tokens counted, %s%s\n",
                static_cast<unsigned long long>(out),
                est->cost.to_string().c_str(),
                est->estimated ? " (estimated)" : "");
  }

  // 7. A forecast: at this pace, when does the team's month run out?
  absl::StatusOr<rk::Forecast> f = acct.forecast("team_month", who);
  if (!f.ok()) return fail(f.status());
  std::printf(
      "team_month: %s of %s spent; %s may be spent per hour\n",
      rk::Money{static_cast<std::int64_t>(f->spent)}.to_string().c_str(),
      rk::Money{static_cast<std::int64_t>(f->limit)}.to_string().c_str(),
      rk::Money{static_cast<std::int64_t>(f->pace_per_hour)}
          .to_string()
          .c_str());
  std::printf("largest max_tokens that fits a 1,000-token prompt now: %llu\n",
              static_cast<unsigned long long>(
                  acct.max_output_that_fits(who, "gpt-4o", 1'000).value()));

  // 8. The ledger verifies, and a restart rebuilds the books from it.
  acct.set_audit(nullptr);
  ledger->reset();  // closed: everything it acknowledged is on disk
  absl::StatusOr<std::string> text = rk::read_file(path);
  if (!text.ok()) return fail(text.status());
  const rk::VerifyResult v = rk::verify_ledger(*text);
  std::printf("ledger %s: %llu records, chain %s\n", path.c_str(),
              static_cast<unsigned long long>(v.records),
              v.ok() ? "verified" : v.error.c_str());
  rk::Accountant<> again(prices->table, rk::SystemClock{}, small);
  if (auto st = add_budgets(again); !st.ok()) return fail(st);
  if (auto st = rk::read_ledger(
          path, [&](const nlohmann::json& j) { return again.replay(j); });
      !st.ok()) {
    return fail(st);
  }
  const bool same = again.forecast("team_month", who)->spent == f->spent &&
                    again.find_settlement("req-0001") == *paid;
  std::printf("replayed: %s\n", same ? "the same books" : "DIFFERENT");
  if (argc <= 1) std::filesystem::remove(path);
  return v.ok() && same ? 0 : 1;
}
