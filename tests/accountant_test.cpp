// The accountant: reserve the worst case, settle what was used, exactly
// once; TESTPLAN T6a-T6d.
#include "ratekeeper/budget/accountant.hpp"

#include <array>
#include <atomic>
#include <barrier>
#include <deque>
#include <map>
#include <nlohmann/json.hpp>  // header-only: the property test's books
#include <optional>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "ratekeeper/errors.hpp"
#include "ratekeeper/policy/fixed_window.hpp"
#include "ratekeeper/policy/token_bucket.hpp"
#include "test_prices.hpp"
#include "test_util.hpp"

using namespace ratekeeper;

namespace {

const Nanos kT0{1'796'083'200LL * 1'000'000'000};  // 2026-12-01 UTC

BudgetSpec money_budget(std::string name, Scope scope, std::uint64_t nanos,
                        std::vector<std::uint32_t> soft = {}) {
  return BudgetSpec{std::move(name),
                    scope,
                    BudgetUnit::kNanoUsd,
                    nanos,
                    Period::calendar(PeriodKind::kMonth).value(),
                    std::move(soft)};
}

// An AuditSink that keeps every record in memory, or fails every append
// from the `fail_from`-th on.
class MemorySink final : public AuditSink {
 public:
  explicit MemorySink(int fail_from = 1 << 30) : fail_from_(fail_from) {}
  absl::StatusOr<std::uint64_t> append(std::string_view fields,
                                       Nanos) override {
    if (++calls_ >= fail_from_) {
      return absl::UnavailableError("append: injected failure");
    }
    records.emplace_back(fields);
    return static_cast<std::uint64_t>(records.size());
  }
  std::vector<std::string> records;

 private:
  int calls_ = 0;
  int fail_from_;
};

}  // namespace

TEST_CASE("reserve holds the worst case; settle keeps what was used",
          "[accountant]") {
  ManualClock clock(kT0);
  Accountant<ManualClock> acct(rk_test::flat_prices(), clock);
  REQUIRE(acct.add_budget(money_budget("team", Field::kTeam, 1'000'000)).ok());
  const Subject who{.user = "u", .team = "t"};
  auto r = acct.reserve(
      who, "m", {.prompt_tokens = 100, .max_output_tokens = 400}, "req-1");
  REQUIRE(r.ok());
  REQUIRE(r->granted());
  CHECK(r->reserved_money() == Money{500'000});
  Limit* team = acct.budgets()[0];
  CHECK(team->peek("\x04\x01t", 0, clock.now()).remaining == 500'000);
  Usage used;
  used.input_uncached = 100;
  used.output = 50;
  const auto s = r->settle(used);
  REQUIRE(s.ok());
  CHECK(s->cost == Money{150'000});
  CHECK(team->peek("\x04\x01t", 0, clock.now()).remaining == 850'000);
  // Settling again (this or another reservation of the id) changes nothing.
  CHECK(r->settle(used).value() == *s);
  // An overage is charged, never lost: past the limit if need be.
  auto big = acct.reserve(
      who, "m", {.prompt_tokens = 10, .max_output_tokens = 10}, "req-2");
  REQUIRE(big->granted());
  used.output = 2'000;
  CHECK(big->settle(used)->cost == Money{2'100'000});
  CHECK(team->peek("\x04\x01t", 0, clock.now()).remaining == 0);
  auto refused = acct.reserve(who, "m", {.prompt_tokens = 1}, "req-3");
  REQUIRE(refused.ok());
  CHECK_FALSE(refused->granted());
  CHECK(refused->settle(used).status().code() ==
        absl::StatusCode::kFailedPrecondition);
}

TEST_CASE("a dropped reservation gives everything back", "[accountant]") {
  ManualClock clock(kT0);
  Accountant<ManualClock> acct(rk_test::flat_prices(), clock);
  REQUIRE(acct.add_budget(money_budget("user", Field::kUser, 1'000'000)).ok());
  {
    auto r =
        acct.reserve({.user = "u"}, "m",
                     {.prompt_tokens = 500, .max_output_tokens = 500}, "a");
    REQUIRE(r->granted());
    CHECK(acct.budgets()[0]->peek("\x02\x01u", 0, clock.now()).remaining == 0);
  }
  CHECK(acct.budgets()[0]->peek("\x02\x01u", 0, clock.now()).remaining ==
        1'000'000);
  // Thrown through: released as the stack unwinds.
  try {
    auto r = acct.reserve({.user = "u"}, "m", {.prompt_tokens = 1000}, "b");
    REQUIRE(r->granted());
    throw std::runtime_error("upstream failed");
  } catch (const std::runtime_error&) {
  }
  CHECK(acct.budgets()[0]->peek("\x02\x01u", 0, clock.now()).remaining ==
        1'000'000);
  // Cancelled after dispatch: at least the input is charged.
  auto c = acct.reserve({.user = "u"}, "m",
                        {.prompt_tokens = 300, .max_output_tokens = 700}, "c");
  const auto s = c->cancel_after_dispatch();
  REQUIRE(s.ok());
  CHECK(s->cost == Money{300'000});
  CHECK(s->estimated);
  // Unknown model, missing identity: errors, nothing held.
  CHECK(acct.reserve({.user = "u"}, "nope", {}, "d").status().code() ==
        absl::StatusCode::kNotFound);
  CHECK(acct.reserve({.team = "t"}, "m", {}, "e").status().code() ==
        absl::StatusCode::kInvalidArgument);
  // Estimates at the edges of 64 bits: an error, never a wrapped hold of 0.
  for (const std::uint64_t big :
       {kMaxUsageTokens + 1, std::uint64_t{1} << 63, ~std::uint64_t{0}}) {
    CHECK(acct.reserve({.user = "u"}, "m", {.prompt_tokens = big}, "f")
              .status()
              .code() == absl::StatusCode::kInvalidArgument);
    CHECK(acct.reserve({.user = "u"}, "m",
                       {.prompt_tokens = big, .max_output_tokens = big}, "g")
              .status()
              .code() == absl::StatusCode::kInvalidArgument);
  }
  // Bad ids and models (they go into the ledger as they are).
  CHECK_FALSE(acct.reserve({.user = "u"}, "m", {}, "").ok());
  CHECK_FALSE(acct.reserve({.user = "u"}, "m", {}, "a\nb").ok());
  CHECK_FALSE(acct.reserve({.user = "u"}, "m", {}, std::string(257, 'x')).ok());
  CHECK_FALSE(acct.reserve({.user = "u"}, "", {}, "h").ok());
  CHECK(acct.budgets()[0]->peek("\x02\x01u", 0, clock.now()).remaining ==
        1'000'000 - 300'000);
}

TEST_CASE("max_output_that_fits and streaming extension", "[accountant]") {
  ManualClock clock(kT0);
  Accountant<ManualClock> acct(rk_test::flat_prices(), clock);
  REQUIRE(acct.add_budget(money_budget("user", Field::kUser, 1'000'000)).ok());
  REQUIRE(acct.add_budget({"tokens", Field::kUser, BudgetUnit::kTokens, 800,
                           Period::calendar(PeriodKind::kDay).value()})
              .ok());
  const Subject who{.user = "u"};
  CHECK(acct.max_output_that_fits(who, "m", 100).value() == 700);
  auto r = acct.reserve(who, "m",
                        {.prompt_tokens = 100, .max_output_tokens = 100}, "s");
  REQUIRE(r->granted());
  CHECK(r->next_chunk_fits(0, 100).value());          // within the reservation
  CHECK(r->next_chunk_fits(100, 500).value());        // grows to 700 output
  CHECK_FALSE(r->next_chunk_fits(600, 200).value());  // 900 > 800 tokens
  CHECK(r->next_chunk_fits(~std::uint64_t{0}, 1).status().code() ==
        absl::StatusCode::kInvalidArgument);  // never a wrapped sum
  CHECK(acct.max_output_that_fits(who, "m", 100).value() == 0);
  const auto s = r->settle_without_usage(650);
  REQUIRE(s.ok());
  CHECK(s->estimated);
  CHECK(s->tokens == 750);
  CHECK(s->cost == Money{750'000});
}

TEST_CASE("soft thresholds fire once per key and period", "[accountant]") {
  ManualClock clock(kT0);
  Accountant<ManualClock> acct(rk_test::flat_prices(), clock);
  std::vector<std::uint32_t> fired;
  acct.on_threshold(
      [&](const ThresholdEvent& e) { fired.push_back(e.permille); });
  REQUIRE(
      acct.add_budget(money_budget("team", Field::kTeam, 1'000'000, {500, 800}))
          .ok());
  const Subject who{.team = "t"};
  for (int i = 0; i < 10; ++i) {
    auto r =
        acct.reserve(who, "m", {.prompt_tokens = 100}, "r" + std::to_string(i));
    REQUIRE(r->granted());
    Usage u;
    u.input_uncached = 100;
    REQUIRE(r->settle(u).ok());
  }
  CHECK(fired == std::vector<std::uint32_t>{500, 800});
  clock.set(kT0 + std::chrono::hours(24 * 31));  // January
  auto r = acct.reserve(who, "m", {.prompt_tokens = 600}, "jan");
  REQUIRE(r->granted());
  CHECK(fired == std::vector<std::uint32_t>{500, 800, 500});
  // An overage settled past a threshold fires it too; so does a stream's
  // extension.
  Usage u;
  u.input_uncached = 600;
  u.output = 250;  // 850,000 of 1,000,000: past 80%
  REQUIRE(r->settle(u).ok());
  CHECK(fired == std::vector<std::uint32_t>{500, 800, 500, 800});
  clock.set(kT0 + std::chrono::hours(24 * 62));  // February
  auto s = acct.reserve(who, "m", {.prompt_tokens = 100}, "feb");
  REQUIRE(s->granted());
  REQUIRE(s->next_chunk_fits(0, 500).value());  // 600,000: past 50%
  CHECK(fired == std::vector<std::uint32_t>{500, 800, 500, 800, 500});
}

TEST_CASE("fired thresholds of ended periods are forgotten", "[accountant]") {
  ManualClock clock(kT0);
  Accountant<ManualClock> acct(rk_test::flat_prices(), clock);
  int fired = 0;
  acct.on_threshold([&](const ThresholdEvent&) { ++fired; });
  REQUIRE(acct.add_budget({"calls",
                           Field::kUser,
                           BudgetUnit::kTokens,
                           1,
                           Period::rolling(std::chrono::seconds(1)).value(),
                           {1000}})
              .ok());
  // 20,000 users over 20 periods, each at 100% once: every one fires, and
  // the memory of what fired stays bounded as periods end.
  for (int i = 0; i < 20'000; ++i) {
    if (i % 1'000 == 0) clock.advance(std::chrono::seconds(1));
    const std::string user = "u" + std::to_string(i);
    auto r = acct.reserve({.user = user}, "m", {.prompt_tokens = 1},
                          "r" + std::to_string(i));
    REQUIRE(r->granted());
  }
  CHECK(fired == 20'000);
  CHECK(acct.threshold_memory() <= 8'192);
}

TEST_CASE("T6a: 64 reservations race for a budget of 10, 1,000 rounds",
          "[accountant][T6a]") {
  const int rounds =
      std::max(50, static_cast<int>(1000 * std::min(1.0, rk_test::scale())));
  ManualClock clock(kT0);
  Accountant<ManualClock> acct(rk_test::flat_prices(), clock);
  REQUIRE(acct.add_budget({"calls", Field::kTeam, BudgetUnit::kTokens, 10,
                           Period::rolling(std::chrono::hours(1)).value()})
              .ok());
  std::barrier sync(8);
  std::vector<int> granted_per_round(static_cast<std::size_t>(rounds), 0);
  std::atomic<int> granted{0};
  std::vector<std::thread> threads;
  for (int w = 0; w < 8; ++w) {
    threads.emplace_back([&, w] {
      for (int round = 0; round < rounds; ++round) {
        const std::string team = "team-" + std::to_string(round);
        sync.arrive_and_wait();
        std::vector<Reservation<ManualClock>> held;
        for (int i = 0; i < 8; ++i) {
          auto r = acct.reserve({.team = team}, "m", {.prompt_tokens = 1},
                                absl::StrCat(round, "/", w, "/", i));
          if (r.ok() && r->granted()) {
            granted.fetch_add(1);
            Usage u;
            u.input_uncached = 1;
            if (r->settle(u).ok()) held.push_back(*std::move(r));
          }
        }
        sync.arrive_and_wait();
        if (w == 0) {
          granted_per_round[static_cast<std::size_t>(round)] =
              granted.exchange(0);
        }
        sync.arrive_and_wait();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (int round = 0; round < rounds; ++round) {
    CAPTURE(round);
    REQUIRE(granted_per_round[static_cast<std::size_t>(round)] == 10);
  }
}

TEST_CASE("T6b/T6d: 100,000 random lifecycles, settles replayed",
          "[accountant][T6b][T6d]") {
  const std::uint64_t seed = rk_test::seed_or(0x6B);
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  ManualClock clock(kT0);
  Accountant<ManualClock> acct(rk_test::flat_prices(), clock);
  REQUIRE(acct.add_budget(
                  money_budget("team", Field::kTeam, PeriodBudget::kMaxLimit))
              .ok());
  const int n = std::max(
      5000, static_cast<int>(100'000 * std::min(1.0, rk_test::scale())));
  std::int64_t charged = 0, actual = 0;
  std::vector<Reservation<ManualClock>> open;
  for (int i = 0; i < n; ++i) {
    const Estimate e{.prompt_tokens = 1 + rng() % 1000,
                     .max_output_tokens = rng() % 1000};
    auto r = acct.reserve({.team = "t"}, "m", e, "id" + std::to_string(i));
    REQUIRE(r.ok());
    REQUIRE(r->granted());
    switch (rng() % 5) {
      case 0:    // used less than the estimate
      case 1: {  // or more
        Usage u;
        u.input_uncached = e.prompt_tokens;
        u.output = rng() % 2 ? e.max_output_tokens / 2
                             : e.max_output_tokens + rng() % 500;
        const auto s = r->settle(u);
        REQUIRE(s.ok());
        charged += s->cost.nanos;
        actual += static_cast<std::int64_t>(u.total()) * 1000;
        // T6d: replayed 1-3 times, through this reservation: no change.
        for (std::uint64_t k = rng() % 3; k > 0; --k) {
          REQUIRE(r->settle(u).value() == *s);
        }
        break;
      }
      case 2: {  // cancelled after dispatch: the prompt is charged
        const auto s = r->cancel_after_dispatch();
        REQUIRE(s.ok());
        charged += s->cost.nanos;
        actual += static_cast<std::int64_t>(e.prompt_tokens) * 1000;
        break;
      }
      case 3:  // failed before dispatch: released
        r->release();
        break;
      default:  // dropped, some later
        open.push_back(*std::move(r));
        if (open.size() > 16) open.erase(open.begin());
        break;
    }
  }
  open.clear();
  CHECK(charged == actual);
  const std::uint64_t spent =
      PeriodBudget::kMaxLimit -
      acct.budgets()[0]->peek("\x04\x01t", 0, clock.now()).remaining;
  CHECK(spent == static_cast<std::uint64_t>(charged));  // zero lost refunds
}

TEST_CASE("a call's spend belongs to the period it was reserved in",
          "[accountant]") {
  // Reserved at 23:59:59 on Nov 30; settled after midnight (December).
  ManualClock clock(kT0 - Nanos{1'000'000'000});
  Accountant<ManualClock> acct(rk_test::flat_prices(), clock);
  REQUIRE(acct.add_budget(money_budget("team", Field::kTeam, 1'000'000)).ok());
  const Subject who{.user = "u", .team = "t"};
  Limit* team = acct.budgets()[0];
  auto over = acct.reserve(
      who, "m", {.prompt_tokens = 10, .max_output_tokens = 10}, "late-1");
  auto under = acct.reserve(
      who, "m", {.prompt_tokens = 10, .max_output_tokens = 500}, "late-2");
  REQUIRE(over->granted());
  REQUIRE(under->granted());
  CHECK(team->peek("\x04\x01t", 0, clock.now()).remaining == 470'000);
  clock.advance(Nanos{2'000'000'000});
  // December starts empty, whatever November's calls settle to: an overage
  // lands in November, and a refund to November never inflates December.
  CHECK(team->peek("\x04\x01t", 0, clock.now()).remaining == 1'000'000);
  Usage u;
  u.input_uncached = 10;
  u.output = 400;  // 390 more than held
  CHECK(over->settle(u)->cost == Money{410'000});
  u.output = 0;  // 500 less than held
  CHECK(under->settle(u)->cost == Money{10'000});
  CHECK(team->peek("\x04\x01t", 0, clock.now()).remaining == 1'000'000);
  auto dec = acct.reserve(
      who, "m", {.prompt_tokens = 10, .max_output_tokens = 90}, "dec-1");
  REQUIRE(dec->granted());
  CHECK(team->peek("\x04\x01t", 0, clock.now()).remaining == 900'000);
}

TEST_CASE("settled ids are remembered for the window, oldest forgotten first",
          "[accountant]") {
  ManualClock clock(kT0);
  Accountant<ManualClock> acct(rk_test::flat_prices(), clock);
  REQUIRE(
      acct.add_budget(money_budget("team", Field::kTeam, 1'000'000'000)).ok());
  acct.set_idempotency_window(1'000);  // 63 per shard of 16: 1,008 in all
  const Subject who{.user = "u", .team = "t"};
  Usage u;
  u.input_uncached = 1;
  u.output = 1;
  const auto settle = [&](const std::string& id) {
    auto r = acct.reserve(who, "m",
                          {.prompt_tokens = 1, .max_output_tokens = 1}, id);
    REQUIRE(r->granted());
    return r->settle(u).value();
  };
  for (int i = 0; i < 5'000; ++i) settle("id-" + std::to_string(i));
  int remembered = 0;
  for (int i = 0; i < 5'000; ++i) {
    const auto s = acct.find_settlement("id-" + std::to_string(i));
    if (s) {
      ++remembered;
      CHECK(*s == Settlement{Money{2'000}, 2, false});
    }
  }
  CHECK(remembered >= 1'000);
  CHECK(remembered <= 1'008);
  // The latest ids are all there (each shard forgets its oldest first).
  for (int i = 4'950; i < 5'000; ++i) {
    CHECK(acct.find_settlement("id-" + std::to_string(i)).has_value());
  }
  // A new call under a remembered id is refused, charging nothing; one
  // under an id forgotten since is a new call (the window is the horizon).
  Limit* team = acct.budgets()[0];
  const std::uint64_t before =
      team->peek("\x04\x01t", 0, clock.now()).remaining;
  CHECK(
      acct.reserve(who, "m", {.prompt_tokens = 1}, "id-4999").status().code() ==
      absl::StatusCode::kAlreadyExists);
  CHECK(team->peek("\x04\x01t", 0, clock.now()).remaining == before);
  CHECK_FALSE(acct.find_settlement("id-0").has_value());
  settle("id-0");
  CHECK(team->peek("\x04\x01t", 0, clock.now()).remaining == before - 2'000);
}

TEST_CASE("a refusal says whether a budget or a rate limit refused",
          "[accountant]") {
  ManualClock clock(kT0 + Nanos{3'600LL * 1'000'000'000});  // Dec 1, 01:00
  Accountant<ManualClock> acct(rk_test::flat_prices(), clock);
  REQUIRE(
      acct.add_budget(money_budget("team_month", Field::kTeam, 100'000)).ok());
  auto rpm =
      make_limit({.name = "rpm"}, FixedWindow::create(per_minute(1)).value())
          .value();
  const Subject who{.user = "u", .team = "t"};
  const ChainItem limits[] = {{rpm.get(), "u", 1}};
  auto ok = acct.reserve(
      who, "m", {.prompt_tokens = 50, .max_output_tokens = 10}, "a", limits);
  REQUIRE(ok->granted());
  // The rate limit refuses: a 429 to retry.
  auto rate = acct.reserve(who, "m", {.prompt_tokens = 1}, "b", limits);
  REQUIRE_FALSE(rate->granted());
  CHECK_FALSE(rate->refused_by_budget());
  CHECK(Rejection::from(rate->decision()).status() == 429);
  // The budget refuses until December ends: 429 insufficient_quota, as
  // OpenAI answers exhausted quota (403 is an option of http/headers.hpp).
  clock.advance(Nanos{61LL * 1'000'000'000});
  auto spent = acct.reserve(who, "m", {.prompt_tokens = 50}, "c", limits);
  REQUIRE_FALSE(spent->granted());
  CHECK(spent->refused_by_budget());
  const Rejection r = Rejection::budget(spent->decision());
  CHECK(r.status() == 429);
  CHECK(r.kind == Refusal::kBudgetExhausted);
  CHECK(r.limit == "team_month");
  REQUIRE(r.resets_at.has_value());
  CHECK(*r.resets_at == std::chrono::system_clock::time_point(
                            std::chrono::seconds(1'798'761'600)));  // Jan 1
  CHECK(r.json_body() ==
        "{\"error\":{\"message\":\"budget \\\"team_month\\\" is spent for this "
        "period (60000 nano-USD of 100000); it resets at "
        "2027-01-01T00:00:00Z\",\"type\":\"insufficient_quota\",\"param\":"
        "null,\"code\":\"insufficient_quota\"}}");
  // More than the whole budget: never fits, no reset to wait for.
  clock.advance(Nanos{61LL * 1'000'000'000});
  auto huge = acct.reserve(who, "m", {.prompt_tokens = 200}, "d", limits);
  REQUIRE_FALSE(huge->granted());
  CHECK(huge->refused_by_budget());
  const Rejection h = Rejection::budget(huge->decision());
  CHECK_FALSE(h.resets_at.has_value());
  CHECK(h.message.find("lower max_tokens") != std::string::npos);
}

TEST_CASE("forecast: spend so far, the pace, and when it runs out",
          "[accountant]") {
  // Six hours into a UTC day, a team has spent 300,000 of 1,000,000.
  ManualClock clock(kT0);
  Accountant<ManualClock> acct(rk_test::flat_prices(), clock);
  REQUIRE(
      acct.add_budget({"team_day", Field::kTeam, BudgetUnit::kNanoUsd,
                       1'000'000, Period::calendar(PeriodKind::kDay).value()})
          .ok());
  const Subject who{.team = "t"};
  clock.advance(std::chrono::hours(6));
  auto r = acct.reserve(who, "m", {.prompt_tokens = 300}, "a");
  REQUIRE(r->granted());
  const Forecast f = acct.forecast("team_day", who).value();
  CHECK(f.spent == 300'000);
  CHECK(f.limit == 1'000'000);
  CHECK(f.period_start == kT0);
  CHECK(f.period_end == kT0 + std::chrono::hours(24));
  CHECK(f.projected == 1'200'000);  // 300k per 6 h, for 24 h
  // 700,000 more at 50,000 an hour: 14 hours from now.
  REQUIRE(f.exhausts_at.has_value());
  CHECK(*f.exhausts_at == kT0 + std::chrono::hours(20));
  CHECK(f.pace_per_hour == 38'888);  // 700,000 over 18 hours
  // A team that has spent nothing lasts; an unknown budget is an error.
  const Forecast idle = acct.forecast("team_day", {.team = "u"}).value();
  CHECK(idle.spent == 0);
  CHECK_FALSE(idle.exhausts_at.has_value());
  CHECK(idle.pace_per_hour == 55'555);
  CHECK(acct.forecast("nope", who).status().code() ==
        absl::StatusCode::kNotFound);
  CHECK(acct.forecast("team_day", {.user = "x"}).status().code() ==
        absl::StatusCode::kInvalidArgument);
}

TEST_CASE("an administrator resets a spend or changes a limit",
          "[accountant]") {
  ManualClock clock(kT0);
  Accountant<ManualClock> acct(rk_test::flat_prices(), clock);
  REQUIRE(acct.add_budget(money_budget("team", Field::kTeam, 1'000'000)).ok());
  const Subject who{.team = "t"};
  auto r = acct.reserve(who, "m", {.prompt_tokens = 900}, "a");
  REQUIRE(r->granted());
  Usage u;
  u.input_uncached = 900;
  REQUIRE(r->settle(u).ok());
  CHECK_FALSE(acct.reserve(who, "m", {.prompt_tokens = 200}, "b")->granted());
  REQUIRE(acct.reset("team", who).ok());
  CHECK(acct.forecast("team", who)->spent == 0);
  CHECK(acct.reserve(who, "m", {.prompt_tokens = 200}, "c")->granted());
  REQUIRE(acct.set_budget_limit("team", 100'000).ok());
  CHECK(acct.forecast("team", who)->limit == 100'000);
  CHECK_FALSE(acct.reserve(who, "m", {.prompt_tokens = 200}, "d")->granted());
  CHECK(acct.set_budget_limit("team", 0).code() ==
        absl::StatusCode::kInvalidArgument);
  CHECK(acct.reset("nope", who).code() == absl::StatusCode::kNotFound);
}

// ---------------------------------------------------------------------------
// Issue 13: the promises at the seams between reservations, rate limits,
// periods, ids and forecasts.

TEST_CASE(
    "case 6: a released or dropped reservation gives back its rate "
    "limits too; settle takes them to the actual tokens",
    "[accountant][seams]") {
  ManualClock clock(kT0);
  Accountant<ManualClock> acct(rk_test::flat_prices(), clock);
  REQUIRE(
      acct.add_budget(money_budget("team", Field::kTeam, 1'000'000'000)).ok());
  auto tpm = make_limit({.name = "tpm", .unit = Unit::kTokens},
                        TokenBucket::create(per_minute(10'000), 10'000).value())
                 .value();
  auto rpm =
      make_limit({.name = "rpm"}, FixedWindow::create(per_minute(100)).value())
          .value();
  const Subject who{.user = "u", .team = "t"};
  const ChainItem limits[] = {{rpm.get(), "u", 1}, {tpm.get(), "u", 2'000}};
  const Estimate e{.prompt_tokens = 1'000, .max_output_tokens = 1'000};
  const auto tokens_left = [&] {
    return tpm->peek("u", 0, clock.now()).remaining;
  };
  const auto requests_left = [&] {
    return rpm->peek("u", 0, clock.now()).remaining;
  };
  {
    auto r = acct.reserve(who, "m", e, "dropped", limits);
    REQUIRE(r->granted());
    CHECK(tokens_left() == 8'000);
  }
  CHECK(tokens_left() == 10'000);  // dropped: all of it back
  CHECK(requests_left() == 100);
  auto released = acct.reserve(who, "m", e, "released", limits);
  REQUIRE(released->granted());
  released->release();
  CHECK(tokens_left() == 10'000);
  // Settled: the token limit goes to what the provider counted, in both
  // directions (more than the estimate is charged, never a wrapped refund).
  Usage u;
  u.input_uncached = 1'000;
  u.output = 1'100;  // 2,100 > 2,000
  auto over = acct.reserve(who, "m", e, "over", limits);
  REQUIRE(over->settle(u).ok());
  CHECK(tokens_left() == 10'000 - 2'100);
  CHECK(requests_left() == 99);
  clock.advance(std::chrono::minutes(1));  // full again
  u.output = 0;                            // 1,000 < 2,000
  auto under = acct.reserve(who, "m", e, "under", limits);
  REQUIRE(under->settle(u).ok());
  CHECK(tokens_left() == 10'000 - 1'000);
  // A reserve whose record cannot be written gives back the rate limits as
  // well as the budgets.
  clock.advance(std::chrono::minutes(1));
  MemorySink failing(1);
  acct.set_audit(&failing);
  const std::uint64_t team_before = acct.forecast("team", who)->spent;
  auto lost = acct.reserve(who, "m", e, "unrecorded", limits);
  CHECK_FALSE(lost.ok());
  CHECK(tokens_left() == 10'000);
  CHECK(requests_left() == 100);
  CHECK(acct.forecast("team", who)->spent == team_before);
}

TEST_CASE(
    "case 9: a call reserved at 23:59 and settled after midnight "
    "charges yesterday, even once today's period is open",
    "[accountant][seams]") {
  ManualClock clock(kT0 - std::chrono::minutes(1));  // Nov 30, 23:59 UTC
  Accountant<ManualClock> acct(rk_test::flat_prices(), clock);
  MemorySink books;
  acct.set_audit(&books);
  REQUIRE(
      acct.add_budget({"team_day", Field::kTeam, BudgetUnit::kNanoUsd,
                       100'000'000, Period::calendar(PeriodKind::kDay).value()})
          .ok());
  const Subject who{.team = "t"};
  Limit* day = acct.budgets()[0];
  const Nanos yesterday = kT0 - std::chrono::seconds(30);
  const std::int64_t yesterday_index =
      Period::calendar(PeriodKind::kDay).value().index_of(yesterday);
  // $0.0525 over: 10 + 10 held, 10 + 52,510 used.
  auto late = acct.reserve(
      who, "m", {.prompt_tokens = 10, .max_output_tokens = 10}, "late");
  auto stream = acct.reserve(
      who, "m", {.prompt_tokens = 10, .max_output_tokens = 10}, "stream");
  auto kept = acct.reserve(
      who, "m", {.prompt_tokens = 10, .max_output_tokens = 10}, "kept");
  REQUIRE(late->granted());
  REQUIRE(stream->granted());
  REQUIRE(kept->granted());
  clock.set(kT0 + std::chrono::minutes(1));  // Dec 1, 00:01
  // Nobody has opened today yet: a stream grows in yesterday's period.
  REQUIRE(kept->next_chunk_fits(0, 1'000).value());
  CHECK(acct.forecast("team_day", who)->spent == 0);
  CHECK(day->peek("\x04\x01t", 0, yesterday).remaining ==
        100'000'000 - 3 * 20'000 - 990'000);
  // Another call opens today.
  auto today = acct.reserve(who, "m", {.prompt_tokens = 100}, "today");
  REQUIRE(today->granted());
  CHECK(acct.forecast("team_day", who)->spent == 100'000);
  Usage u;
  u.input_uncached = 10;
  u.output = 52'510;
  const auto s = late->settle(u);
  REQUIRE(s.ok());
  CHECK(s->cost == Money{52'520'000});
  // Today is not charged for yesterday's call: not in the state, not in
  // the forecast.
  CHECK(acct.forecast("team_day", who)->spent == 100'000);
  CHECK(day->peek("\x04\x01t", 0, clock.now()).remaining ==
        100'000'000 - 100'000);
  // A stream reserved yesterday cannot grow into today's budget: its own
  // period is closed on this key, so it is cut, and today is untouched.
  CHECK_FALSE(stream->next_chunk_fits(0, 5'000).value());
  CHECK(acct.forecast("team_day", who)->spent == 100'000);
  // The books put the settle in yesterday's period.
  const std::string& rec = books.records.back();
  CHECK(rec.find("\"event\":\"settle\"") != std::string::npos);
  CHECK(rec.find(absl::StrCat("\"period\":", yesterday_index)) !=
        std::string::npos);
}

TEST_CASE(
    "case 10: a new reserve under a settled id is refused; a retried "
    "settle returns the first settlement",
    "[accountant][seams]") {
  ManualClock clock(kT0);
  Accountant<ManualClock> acct(rk_test::flat_prices(), clock);
  // $0.01 a month; each call costs $0.003.
  REQUIRE(acct.add_budget(money_budget("team", Field::kTeam, 10'000'000)).ok());
  const Subject who{.team = "t"};
  Usage u;
  u.input_uncached = 1'000;
  u.output = 2'000;
  int reached_provider = 0;
  Settlement first;
  std::optional<Reservation<ManualClock>> kept;
  for (int i = 0; i < 1'000; ++i) {
    auto r = acct.reserve(who, "m",
                          {.prompt_tokens = 1'000, .max_output_tokens = 2'000},
                          "same-id");
    if (!r.ok()) {
      CHECK(r.status().code() == absl::StatusCode::kAlreadyExists);
      CHECK(std::string(r.status().message()).find("same-id") !=
            std::string::npos);
      continue;
    }
    REQUIRE(r->granted());
    ++reached_provider;
    first = r->settle(u).value();
    kept.emplace(*std::move(r));
  }
  CHECK(reached_provider == 1);
  CHECK(first.cost == Money{3'000'000});
  CHECK(acct.forecast("team", who)->spent == 3'000'000);
  // A retried settle of the first reservation: the first settlement, no
  // charge.
  u.output = 9'000;
  CHECK(kept->settle(u).value() == first);
  CHECK(acct.forecast("team", who)->spent == 3'000'000);
  CHECK(acct.find_settlement("same-id") == first);
}

TEST_CASE("case 11: a zero-token estimate is refused on an exhausted budget",
          "[accountant][seams]") {
  ManualClock clock(kT0);
  Accountant<ManualClock> acct(rk_test::flat_prices(), clock);
  REQUIRE(acct.add_budget({"tokens", Field::kUser, BudgetUnit::kTokens, 100,
                           Period::calendar(PeriodKind::kDay).value()})
              .ok());
  const Subject who{.user = "u"};
  auto r = acct.reserve(who, "m", {.prompt_tokens = 100}, "all");
  REQUIRE(r->granted());
  Usage u;
  u.input_uncached = 100;
  REQUIRE(r->settle(u).ok());
  CHECK(acct.forecast("tokens", who)->spent == 100);
  auto zero = acct.reserve(who, "m", {}, "zero");
  REQUIRE(zero.ok());
  CHECK_FALSE(zero->granted());
  CHECK(zero->refused_by_budget());
  // With room left, an empty estimate is granted and settles to nothing.
  auto other = acct.reserve({.user = "v"}, "m", {}, "zero-2");
  REQUIRE(other->granted());
  REQUIRE(other->settle(Usage{}).ok());
  CHECK(acct.forecast("tokens", {.user = "v"})->spent == 0);
}

TEST_CASE("case 13: forecast().spent does not stop at the limit",
          "[accountant][seams]") {
  ManualClock clock(kT0);
  Accountant<ManualClock> acct(rk_test::flat_prices(), clock);
  REQUIRE(acct.add_budget(money_budget("team", Field::kTeam, 1'000'000)).ok());
  const Subject who{.team = "t"};
  auto r = acct.reserve(who, "m", {.prompt_tokens = 100}, "big");
  REQUIRE(r->granted());
  Usage u;
  u.input_uncached = 100;
  u.output = 299'900;  // $0.30 on a $0.001 budget
  REQUIRE(r->settle(u).value().cost == Money{300'000'000});
  const Forecast f = acct.forecast("team", who).value();
  CHECK(f.spent == 300'000'000);
  CHECK(f.limit == 1'000'000);
  CHECK(f.exhausts_at == f.now);
  CHECK(f.pace_per_hour == 0);
}

namespace {

// An AuditSink writing records as the Ledger does ({"seq":N,"t":T,...}),
// kept in memory, for the property test's books and replay.
class LedgerLikeSink final : public AuditSink {
 public:
  absl::StatusOr<std::uint64_t> append(std::string_view fields,
                                       Nanos t) override {
    const std::uint64_t seq = records.size() + 1;
    records.push_back(absl::StrCat("{\"seq\":", seq, ",\"t\":", t.count(), ",",
                                   detail::av(fields), "}"));
    return seq;
  }
  std::vector<std::string> records;
};

}  // namespace

TEST_CASE("budget property: random scripts against an oracle of the books",
          "[accountant][seams][property]") {
  const std::uint64_t seed = rk_test::seed_or(0x13B);
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  const int steps =
      std::max(5'000, static_cast<int>(100'000 * rk_test::scale()));
  // Two budgets: a day of money per team, ten minutes of tokens per user.
  constexpr std::uint64_t kMoney = 1'000'000'000;  // 1M tokens of 1 uUSD
  constexpr std::uint64_t kTokens = 15'000;
  const Period day = Period::calendar(PeriodKind::kDay).value();
  const Period ten = Period::rolling(std::chrono::minutes(10)).value();
  ManualClock clock(kT0 - std::chrono::hours(2));
  Accountant<ManualClock> acct(rk_test::flat_prices(), clock);
  LedgerLikeSink sink;
  acct.set_audit(&sink);
  REQUIRE(acct.add_budget(
                  {"team_day", Field::kTeam, BudgetUnit::kNanoUsd, kMoney, day})
              .ok());
  REQUIRE(acct.add_budget(
                  {"user_ten", Field::kUser, BudgetUnit::kTokens, kTokens, ten})
              .ok());
  const std::uint64_t limits[2] = {kMoney, kTokens};
  const Period* periods[2] = {&day, &ten};
  const std::string teams[2] = {"t0", "t1"};
  const std::string users[3] = {"u0", "u1", "u2"};

  // The oracle. Per budget and key: the period its state holds, and per
  // (budget, key, period): what open reservations hold and what settled.
  using BK = std::pair<int, std::string>;
  using BKP = std::tuple<int, std::string, std::int64_t>;
  std::map<BK, std::int64_t> state_period;
  std::map<BKP, std::uint64_t> live;     // held + settled, as the state has it
  std::map<BKP, std::uint64_t> settled;  // acknowledged settlements only
  struct Open {
    std::string id;
    std::string key[2];
    std::int64_t period[2];
    std::uint64_t held[2];
    std::uint64_t prompt;
    std::optional<Reservation<ManualClock>> r;
  };
  std::vector<std::unique_ptr<Open>> open;
  std::map<std::string, Settlement> first;  // settled ids
  std::vector<std::string> ids_in_flight;
  int next_id = 0, granted = 0, refused = 0, cut = 0, dup = 0;

  const auto spent_in_state = [&](int b, const std::string& key,
                                  std::int64_t p) -> std::uint64_t {
    const auto sp = state_period.find({b, key});
    if (sp == state_period.end() || sp->second != p) return 0;
    return live[{b, key, p}];
  };
  // What the state holds of (b, key) now: the state's period if it is the
  // current one (or later), else nothing.
  const auto expect_now = [&](int b, const std::string& key) {
    const std::int64_t now_p = periods[b]->index_of(clock.now());
    const auto sp = state_period.find({b, key});
    if (sp == state_period.end() || sp->second < now_p) return std::uint64_t{0};
    return live[{b, key, sp->second}];
  };
  const auto check_key = [&](int b, const std::string& key) {
    const Subject who = b == 0 ? Subject{.team = key} : Subject{.user = key};
    const std::uint64_t got =
        acct.forecast(b == 0 ? "team_day" : "user_ten", who).value().spent;
    REQUIRE(got == expect_now(b, key));
  };
  // Whether a later period than `p` has spend on (b, key): then changes of
  // a reservation of `p` are dropped and it cannot grow (a state with
  // nothing spent holds no period: budget/rules.hpp, rule 2).
  const auto later_open = [&](int b, const std::string& key, std::int64_t p) {
    const auto sp = state_period.find({b, key});
    return sp != state_period.end() && sp->second > p &&
           live[{b, key, sp->second}] != 0;
  };
  // Applies `target` for one budget of `o` to the oracle (settle, release,
  // growth): in the reservation's period, while no later one has spend; a
  // charge to a key holding nothing (or an earlier period) starts it over.
  const auto oracle_to = [&](Open& o, int b, std::uint64_t target) {
    const BKP at{b, o.key[b], o.period[b]};
    const std::uint64_t held = o.held[b];
    o.held[b] = target;
    if (later_open(b, o.key[b], o.period[b])) return;
    auto& sp = state_period[{b, o.key[b]}];
    const bool holds = sp == o.period[b] && live[at] != 0;
    if (target > held) {
      if (!holds) {
        sp = o.period[b];
        live[at] = 0;
      }
      live[at] += target - held;
    } else if (holds) {
      live[at] -= std::min(live[at], held - target);
    }
  };
  const auto settle_open = [&](std::size_t i, std::uint64_t output,
                               bool cancel) {
    Open& o = *open[i];
    Usage u;
    u.input_uncached = o.prompt;
    u.output = output;
    const auto s = cancel ? o.r->cancel_after_dispatch(output) : o.r->settle(u);
    REQUIRE(s.ok());
    if (const auto f = first.find(o.id); f != first.end()) {
      // Another reservation of the id settled first: that settlement, and
      // this one's holds go back.
      REQUIRE(*s == f->second);
      for (int b = 0; b < 2; ++b) oracle_to(o, b, 0);
    } else {
      const std::uint64_t tokens = o.prompt + output;
      REQUIRE(s->tokens == tokens);
      REQUIRE(s->cost.nanos == static_cast<std::int64_t>(tokens * 1'000));
      first[o.id] = *s;
      const std::uint64_t amount[2] = {tokens * 1'000, tokens};
      for (int b = 0; b < 2; ++b) {
        oracle_to(o, b, amount[b]);
        settled[{b, o.key[b], o.period[b]}] += amount[b];
      }
      // A retried settle: the first settlement, nothing changes.
      if (rng() % 4 == 0) REQUIRE(o.r->settle(u).value() == *s);
    }
    for (int b = 0; b < 2; ++b) check_key(b, o.key[b]);
    open.erase(open.begin() + static_cast<std::ptrdiff_t>(i));
  };

  for (int step = 0; step < steps; ++step) {
    const auto op = static_cast<unsigned>(rng() % 100);
    if (op < 40) {
      // reserve: a new id, or a retry of one settled or in flight
      std::string id = absl::StrCat("r", next_id++);
      if (op < 4 && !first.empty()) {
        auto it = first.begin();
        std::advance(it, static_cast<std::ptrdiff_t>(
                             rng() % std::min<std::size_t>(first.size(), 64)));
        id = it->first;
      } else if (op < 8 && !open.empty()) {
        id = open[rng() % open.size()]->id;
      }
      auto o = std::make_unique<Open>();
      o->id = id;
      o->key[0] = teams[rng() % 2];
      o->key[1] = users[rng() % 3];
      o->prompt = rng() % 8 == 0 ? 0 : rng() % 2'000;
      const std::uint64_t max_out = rng() % 8 == 0 ? 0 : rng() % 3'000;
      const Subject who{.user = o->key[1], .team = o->key[0]};
      auto r = acct.reserve(
          who, "m", {.prompt_tokens = o->prompt, .max_output_tokens = max_out},
          id);
      if (first.count(id) != 0) {
        REQUIRE(r.status().code() == absl::StatusCode::kAlreadyExists);
        ++dup;
        continue;
      }
      REQUIRE(r.ok());
      const std::uint64_t want[2] = {
          std::max<std::uint64_t>(1, (o->prompt + max_out) * 1'000),
          std::max<std::uint64_t>(1, o->prompt + max_out)};
      bool fits = true;
      for (int b = 0; b < 2; ++b) {
        const std::int64_t p = periods[b]->index_of(clock.now());
        o->period[b] = std::max(p, state_period.count({b, o->key[b]}) != 0
                                       ? state_period[{b, o->key[b]}]
                                       : p);
        fits = fits && spent_in_state(b, o->key[b], o->period[b]) + want[b] <=
                           limits[b];
      }
      REQUIRE(r->granted() == fits);  // never more than the limit allows
      if (!fits) {
        ++refused;
        continue;
      }
      ++granted;
      for (int b = 0; b < 2; ++b) {
        auto& sp = state_period[{b, o->key[b]}];
        if (sp < o->period[b]) sp = o->period[b];
        o->held[b] = want[b];
        live[{b, o->key[b], o->period[b]}] += want[b];
        check_key(b, o->key[b]);
      }
      o->r.emplace(*std::move(r));
      open.push_back(std::move(o));
      if (open.size() > 24) settle_open(0, rng() % 2'000, false);
    } else if (open.empty() || op >= 84) {
      // time passes: seconds, minutes, or past a midnight
      const auto k = static_cast<unsigned>(rng() % 16);
      clock.advance(
          k < 12 ? Nanos{static_cast<std::int64_t>(rng() % 20) * 1'000'000'000}
          : k < 15 ? std::chrono::minutes(1 + rng() % 9)
                   : std::chrono::hours(1 + rng() % 12));
    } else if (op < 62) {
      // settle below or above the estimate
      const std::size_t i = rng() % open.size();
      const std::uint64_t est_out = open[i]->held[1] > open[i]->prompt
                                        ? open[i]->held[1] - open[i]->prompt
                                        : 0;
      const std::uint64_t output =
          rng() % 2 ? est_out / 2 : est_out + rng() % 1'500;
      settle_open(i, output, false);
    } else if (op < 66) {
      settle_open(rng() % open.size(), rng() % 100, true);  // cancelled
    } else if (op < 74) {
      // released, or dropped
      const std::size_t i = rng() % open.size();
      Open& o = *open[i];
      if (rng() % 2) {
        o.r->release();
      }
      for (int b = 0; b < 2; ++b) oracle_to(o, b, 0);
      const std::string k0 = o.key[0], k1 = o.key[1];
      open.erase(open.begin() + static_cast<std::ptrdiff_t>(i));  // dropped
      check_key(0, k0);
      check_key(1, k1);
    } else if (op < 84) {
      // a stream grows
      Open& o = *open[rng() % open.size()];
      const std::uint64_t so_far = rng() % 2'000, next = rng() % 1'000;
      const std::uint64_t tokens = o.prompt + so_far + next;
      const std::uint64_t want[2] = {tokens * 1'000, tokens};
      bool fits = true, any = false;
      for (int b = 0; b < 2; ++b) {
        if (want[b] <= o.held[b]) continue;
        any = true;
        fits = fits && !later_open(b, o.key[b], o.period[b]) &&
               spent_in_state(b, o.key[b], o.period[b]) + want[b] - o.held[b] <=
                   limits[b];
      }
      const auto got = o.r->next_chunk_fits(so_far, next);
      REQUIRE(got.ok());
      REQUIRE(*got == (fits || !any));
      if (any && fits) {
        for (int b = 0; b < 2; ++b) {
          if (want[b] > o.held[b]) oracle_to(o, b, want[b]);
        }
      } else if (any) {
        ++cut;
      }
      check_key(0, o.key[0]);
      check_key(1, o.key[1]);
    }
  }
  CAPTURE(granted, refused, cut, dup);
  CHECK(granted > steps / 10);
  CHECK(refused > 0);
  CHECK(cut > 0);
  CHECK(dup > 0);
  // The books: the settle records, per budget, key and period, add up to
  // the acknowledged settlements.
  std::map<BKP, std::uint64_t> books;
  const auto key_of = [](const std::string& hex) {
    std::string out;
    for (std::size_t i = 0; i + 1 < hex.size(); i += 2) {
      out.push_back(
          static_cast<char>(std::stoi(hex.substr(i, 2), nullptr, 16)));
    }
    return out;
  };
  std::map<std::string, std::string> key_names;  // subject key -> name
  for (const auto& t : teams) key_names[std::string("\x04\x02") + t] = t;
  for (const auto& u : users) key_names[std::string("\x02\x02") + u] = u;
  std::set<std::string> settled_ids;
  for (const std::string& rec : sink.records) {
    const nlohmann::json j = nlohmann::json::parse(rec);
    if (j["event"] != "settle") continue;
    REQUIRE(settled_ids.insert(j["request"].get<std::string>()).second);
    for (const auto& it : j["items"]) {
      const int b = it["b"].get<int>();
      books[{b, key_names.at(key_of(it["key"].get<std::string>())),
             it["period"].get<std::int64_t>()}] +=
          it["amount"].get<std::uint64_t>();
    }
  }
  for (auto it = settled.begin(); it != settled.end();) {
    it = it->second == 0 ? settled.erase(it) : std::next(it);
  }
  for (auto it = books.begin(); it != books.end();) {
    it = it->second == 0 ? books.erase(it) : std::next(it);
  }
  CHECK(books == settled);
  CHECK(settled_ids.size() == first.size());
  // Replay rebuilds exactly what is live now, open reservations included.
  Accountant<ManualClock> again(rk_test::flat_prices(), clock);
  REQUIRE(again
              .add_budget(
                  {"team_day", Field::kTeam, BudgetUnit::kNanoUsd, kMoney, day})
              .ok());
  REQUIRE(again
              .add_budget(
                  {"user_ten", Field::kUser, BudgetUnit::kTokens, kTokens, ten})
              .ok());
  for (const std::string& rec : sink.records) {
    REQUIRE(again.replay(nlohmann::json::parse(rec)).ok());
  }
  for (const auto& t : teams) {
    CHECK(again.forecast("team_day", {.team = t})->spent ==
          acct.forecast("team_day", {.team = t})->spent);
  }
  for (const auto& u : users) {
    CHECK(again.forecast("user_ten", {.user = u})->spent ==
          acct.forecast("user_ten", {.user = u})->spent);
  }
  for (const auto& [id, s] : first) {
    REQUIRE(again.find_settlement(id) == s);
  }
}

TEST_CASE(
    "the settled-id window against a model: each shard keeps its newest "
    "ids, through wrap-around, index growth and window changes",
    "[accountant][i15]") {
  using detail::SettledIds;
  SettledIds ids;
  // The model: per shard, the ids oldest first and their settlements.
  struct ModelShard {
    std::deque<std::string> order;
    std::map<std::string, Settlement> by_id;
  };
  std::array<ModelShard, SettledIds::kShards> model;
  std::map<std::string, Settlement> remembered;  // the union of the shards
  std::size_t per_shard = 0;
  const auto set_window = [&](std::size_t w) {
    ids.set_window(w);
    per_shard = std::max<std::size_t>(
        1, w / SettledIds::kShards + (w % SettledIds::kShards != 0 ? 1 : 0));
  };
  std::mt19937_64 rng(15);
  std::vector<std::string> seen;
  const auto fresh_id = [&] {
    // 1 to 40 characters: short ids in the string's own buffer, long ones
    // on the heap (a reused entry keeps its buffer).
    std::string id(1 + rng() % 40, 'x');
    for (char& c : id) c = static_cast<char>('!' + rng() % 90);
    return id;
  };
  const std::size_t windows[] = {16, 160, 1'000, 4'000, 17, 1};
  set_window(160);
  std::uint64_t mismatches = 0;
  for (int step = 0; step < 60'000; ++step) {
    if (step % 7'500 == 7'499) set_window(windows[rng() % 6]);
    std::string id = !seen.empty() && rng() % 8 == 0 ? seen[rng() % seen.size()]
                                                     : fresh_id();
    if (seen.size() < 4'000) seen.push_back(id);
    const SettledIds::Key k = SettledIds::key(id);
    const Settlement st{Money{static_cast<std::int64_t>(step)},
                        static_cast<std::uint64_t>(step), step % 3 == 0};
    auto& shard = ids.shard_of(k);
    // The model's shard: the one SettledIds picks (its shards are an
    // array; this test checks what each keeps, not how ids spread).
    ModelShard* m = nullptr;
    for (std::size_t i = 0; i < SettledIds::kShards; ++i) {
      SettledIds::Key probe{};
      probe.hash = static_cast<std::size_t>(i) << 40;
      if (&ids.shard_of(probe) == &shard) m = &model[i];
    }
    REQUIRE(m != nullptr);
    {
      detail::MutexLock lock(&shard.mu);
      ids.remember(shard, k, st);
    }
    if (m->by_id.find(id) == m->by_id.end()) {
      m->order.push_back(id);
      m->by_id.emplace(id, st);
      remembered.emplace(id, st);
      while (m->order.size() > per_shard) {
        m->by_id.erase(m->order.front());
        remembered.erase(m->order.front());
        m->order.pop_front();
      }
    }
    if (step % 2'000 == 1'999 || step < 100) {
      // Every id ever used: remembered exactly when the model has it,
      // with the first settlement.
      for (const std::string& s : seen) {
        const SettledIds::Key sk = SettledIds::key(s);
        auto& sh = ids.shard_of(sk);
        std::optional<Settlement> got;
        {
          detail::MutexLock lock(&sh.mu);
          if (const Settlement* f = SettledIds::find(sh, sk)) got = *f;
        }
        std::optional<Settlement> want;
        if (auto it = remembered.find(s); it != remembered.end()) {
          want = it->second;
        }
        if (got != want) ++mismatches;
      }
    }
  }
  CHECK(mismatches == 0);
}

TEST_CASE("a smaller idempotency window keeps the newest ids, oldest first",
          "[accountant][i15]") {
  ManualClock clock(kT0);
  Accountant<ManualClock> acct(rk_test::flat_prices(), clock);
  REQUIRE(
      acct.add_budget(money_budget("team", Field::kTeam, 1'000'000'000)).ok());
  acct.set_idempotency_window(1'600);  // 100 per shard
  const Subject who{.user = "u", .team = "t"};
  Usage u;
  u.input_uncached = 1;
  const auto settle = [&](const std::string& id) {
    auto r = acct.reserve(who, "m", {.prompt_tokens = 1}, id);
    REQUIRE(r->granted());
    REQUIRE(r->settle(u).ok());
  };
  // 3,000 ids: every shard's ring is full and has wrapped around.
  for (int i = 0; i < 3'000; ++i) settle("a-" + std::to_string(i));
  acct.set_idempotency_window(160);  // 10 per shard
  // Each shard shrinks at its next settle: 800 new ids touch all 16
  // (about 50 each), so every shard ends with 10 of them.
  for (int i = 0; i < 800; ++i) settle("b-" + std::to_string(i));
  int remembered = 0;
  for (int i = 0; i < 3'000; ++i) {
    remembered += acct.find_settlement("a-" + std::to_string(i)) ? 1 : 0;
  }
  for (int i = 0; i < 800; ++i) {
    remembered += acct.find_settlement("b-" + std::to_string(i)) ? 1 : 0;
  }
  CHECK(remembered == 160);
  // The newest of the second batch are there; the first batch is gone.
  for (int i = 790; i < 800; ++i) {
    CHECK(acct.find_settlement("b-" + std::to_string(i)).has_value());
  }
  CHECK_FALSE(acct.find_settlement("a-2999").has_value());
  // Growing the window again keeps what is remembered and adds.
  acct.set_idempotency_window(1'600);
  for (int i = 0; i < 100; ++i) settle("c-" + std::to_string(i));
  for (int i = 0; i < 100; ++i) {
    CHECK(acct.find_settlement("c-" + std::to_string(i)).has_value());
  }
  CHECK(acct.find_settlement("b-799").has_value());
}
