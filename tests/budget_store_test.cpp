// Issue 15: budget stores never forget spend while its period is open. A
// full budget store refuses a subject it does not hold with a status that
// names the budget and its capacity; subjects it holds carry on, and what
// they spent is still counted (the oracle: the sums this test reserves).
#include <string>
#include <vector>

#include "ratekeeper/budget/accountant.hpp"
#include "ratekeeper/chain.hpp"
#include "ratekeeper/policy/fixed_window.hpp"
#include "test_prices.hpp"
#include "test_util.hpp"

using namespace ratekeeper;

namespace {

const Nanos kT0{1'796'083'200LL * 1'000'000'000};  // 2026-12-01 UTC

BudgetSpec team_budget(std::uint64_t nanos) {
  return BudgetSpec{"team-month",
                    Scope{Field::kTeam},
                    BudgetUnit::kNanoUsd,
                    nanos,
                    Period::calendar(PeriodKind::kMonth).value(),
                    {}};
}

}  // namespace

TEST_CASE(
    "i15: a full budget store refuses new teams with kResourceExhausted and "
    "forgets no spend",
    "[i15][flood]") {
  ManualClock clock(kT0);
  // Even an evicting configuration is turned into refusing: spend is money.
  Accountant<ManualClock> acct(
      rk_test::flat_prices(), clock,
      ShardedOptions{
          .capacity = 64, .shards = 1, .when_full = WhenFull::kEvictStalest});
  REQUIRE(acct.add_budget(team_budget(1'000'000)).ok());
  const Estimate e{.prompt_tokens = 100, .max_output_tokens = 400};
  // 64 teams each hold 500,000 of their 1,000,000 nano-USD.
  std::vector<Reservation<ManualClock>> held;
  for (int t = 0; t < 64; ++t) {
    const std::string team = "t" + std::to_string(t);
    auto r =
        acct.reserve(Subject{.team = team}, "m", e, "req-" + std::to_string(t));
    REQUIRE(r.ok());
    REQUIRE(r->granted());
    held.push_back(*std::move(r));
  }
  // 1,000 brand-new teams: refused with a clear status, never by evicting
  // someone's spend.
  int exhausted = 0;
  std::string message;
  for (int t = 0; t < 1000; ++t) {
    const std::string team = "new" + std::to_string(t);
    auto r =
        acct.reserve(Subject{.team = team}, "m", e, "new-" + std::to_string(t));
    if (!r.ok() && r.status().code() == absl::StatusCode::kResourceExhausted) {
      ++exhausted;
      message = std::string(r.status().message());
    } else {
      REQUIRE(r.ok());
      CHECK_FALSE(r->granted());  // never granted past the capacity
    }
  }
  CHECK(exhausted == 1000);
  CHECK(message.find("team-month") != std::string::npos);
  CHECK(message.find("capacity 64") != std::string::npos);
  // Every held team still has exactly what it had: 500,000 left, so a
  // second hold of 500,000 fits and a third does not.
  Limit* budget = acct.budgets()[0];
  for (int t = 0; t < 64; ++t) {
    const std::string team = "t" + std::to_string(t);
    std::string key;
    REQUIRE(append_subject_key(Scope{Field::kTeam}, Subject{.team = team}, key)
                .ok());
    CHECK(budget->peek(key, 0, clock.now()).remaining == 500'000);
  }
  auto again = acct.reserve(Subject{.team = "t0"}, "m", e, "req-again");
  REQUIRE(again.ok());
  CHECK(again->granted());
  auto third = acct.reserve(Subject{.team = "t0"}, "m", e, "req-third");
  REQUIRE(third.ok());
  CHECK_FALSE(third->granted());  // an ordinary refusal: the money is spent
}

TEST_CASE(
    "i15: once a budget store has been full, a rate limit's refusal of a new "
    "subject is still an ordinary refusal, not kResourceExhausted",
    "[i15][flood]") {
  // Found by an examiner: the check read the store's running count of
  // full-store denials, so every later refusal of a subject the store did
  // not hold (by a rate limit ahead of the budget too) came back as
  // "its store is full".
  ManualClock clock(kT0);
  Accountant<ManualClock> acct(
      rk_test::flat_prices(), clock,
      ShardedOptions{
          .capacity = 8, .shards = 1, .when_full = WhenFull::kDenyNew});
  REQUIRE(acct.add_budget(team_budget(1'000'000)).ok());
  const Estimate e{.prompt_tokens = 10, .max_output_tokens = 10};
  std::vector<Reservation<ManualClock>> held;
  for (int t = 0; t < 8; ++t) {
    auto r = acct.reserve(Subject{.team = "t" + std::to_string(t)}, "m", e,
                          "r" + std::to_string(t));
    REQUIRE(r.ok());
    REQUIRE(r->granted());
    held.push_back(*std::move(r));
  }
  // The store is full once: a new team is kResourceExhausted.
  auto full = acct.reserve(Subject{.team = "n0"}, "m", e, "n0");
  REQUIRE_FALSE(full.ok());
  CHECK(full.status().code() == absl::StatusCode::kResourceExhausted);
  // Room again (a held team's reservations end and its state is reset), and
  // a rate limit ahead of the budget that refuses the next call.
  held.clear();
  REQUIRE(acct.reset("team-month", Subject{.team = "t0"}).ok());
  auto rpm =
      make_limit({.name = "rpm"}, FixedWindow::create(per_minute(1)).value())
          .value();
  const ChainItem limits[] = {{rpm.get(), "u", 1}};
  auto first = acct.reserve(Subject{.team = "n1"}, "m", e, "n1", limits);
  REQUIRE(first.ok());
  REQUIRE(first->granted());
  auto refused = acct.reserve(Subject{.team = "n2"}, "m", e, "n2", limits);
  REQUIRE(refused.ok());  // an ordinary refusal, not a status
  CHECK_FALSE(refused->granted());
  CHECK_FALSE(refused->refused_by_budget());
}
