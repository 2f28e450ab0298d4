// RedisAccountant: budgets in Redis shared by instances, exactly-once
// settles across them, the journal that keeps charges made while Redis is
// away; TESTPLAN T5a (zero lost budget charges), T6a and T6d across
// instances, and a Redis Cluster.
#include "ratekeeper/budget/redis_accountant.hpp"

#include <signal.h>
#include <stdlib.h>
#include <unistd.h>

#include <atomic>
#include <fstream>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "redis_server.hpp"
#include "redis_wait.hpp"
#include "test_prices.hpp"
#include "test_util.hpp"

using namespace ratekeeper;
using rk_test::RedisServer;

namespace {

const Nanos kT0{1'796'083'200LL * 1'000'000'000};  // 2026-12-01 UTC

BudgetSpec month_budget(std::string name, Scope scope, std::uint64_t nanos) {
  return BudgetSpec{std::move(name),
                    scope,
                    BudgetUnit::kNanoUsd,
                    nanos,
                    Period::calendar(PeriodKind::kMonth).value(),
                    {}};
}

std::shared_ptr<RedisClient> client_for(
    int port, Nanos timeout = std::chrono::seconds(5)) {
  auto c =
      RedisClient::create({.port = port,
                           .prefix = "rkt:",
                           .connect_timeout = timeout,
                           .command_timeout = timeout,
                           .breaker_open = std::chrono::milliseconds(50),
                           .breaker_max_open = std::chrono::milliseconds(200)});
  REQUIRE(c.ok());
  return *c;
}

using rk_test::TestClock;  // starts at kT0 (2026-12-01 UTC)

// An accountant with a journal and one team budget of 1,000,000 nano-USD
// that admits while Redis is away (kOpen), on the test clock.
std::unique_ptr<RedisAccountant> journaled_team(
    std::shared_ptr<RedisClient> client, const std::string& journal,
    const TestClock& clock) {
  auto acct = RedisAccountant::create(
                  rk_test::flat_prices(), std::move(client),
                  {.journal_path = journal, .test_clock = clock.fn()})
                  .value();
  REQUIRE(acct->add_budget(month_budget("team", Field::kTeam, 1'000'000),
                           {.fail = FailMode::kOpen})
              .ok());
  return acct;
}

Usage used_tokens(std::uint64_t in, std::uint64_t out) {
  Usage u;
  u.input_uncached = in;
  u.output = out;
  return u;
}

// After Redis is back: waits (with a deadline) until the accountant's
// client reaches it (its breaker half-opens within 200 ms here), then until
// its journal has run.
void replay_until_ok(RedisAccountant& a) {
  rk_test::wait_answered(*a.client());
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (!a.replay_journal().ok() &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  REQUIRE(a.journal_pending() == 0);
}

std::string temp_path(const char* name) {
  char tmpl[] = "/tmp/rk_journal_XXXXXX";
  REQUIRE(mkdtemp(tmpl) != nullptr);
  return std::string(tmpl) + "/" + name;
}

}  // namespace

TEST_CASE("RedisAccountant: reserve holds in Redis, settle keeps what was used",
          "[redis][budget]") {
  RedisServer server;
  TestClock clock;
  auto acct =
      RedisAccountant::create(rk_test::flat_prices(), client_for(server.port()),
                              {.test_clock = clock.fn()})
          .value();
  REQUIRE(acct->add_budget(month_budget("team", Field::kTeam, 1'000'000)).ok());
  REQUIRE(acct->add_budget(month_budget("org", Field::kOrg, 10'000'000)).ok());
  const Subject who{.user = "u", .team = "t", .org = "o"};
  auto r = acct->reserve(
      who, "m", {.prompt_tokens = 100, .max_output_tokens = 400}, "req-1");
  REQUIRE(r.ok());
  REQUIRE(r->granted());
  CHECK(r->backed());
  CHECK(r->reserved_money() == Money{500'000});
  CHECK(acct->spent("team", who).value() == 500'000);
  CHECK(acct->spent("org", who).value() == 500'000);
  const auto s = r->settle(used_tokens(100, 50));
  REQUIRE(s.ok());
  CHECK(s->cost == Money{150'000});
  CHECK(acct->spent("team", who).value() == 150'000);
  CHECK(acct->spent("org", who).value() == 150'000);
  // Again: the same answer, nothing moves.
  CHECK(r->settle(used_tokens(100, 400)).value() == *s);
  CHECK(acct->spent("team", who).value() == 150'000);

  SECTION(
      "a reserve under a settled id is refused (case 10); of two in flight "
      "at once, the first settle stands and the other's holds go back") {
    auto again = acct->reserve(
        who, "m", {.prompt_tokens = 100, .max_output_tokens = 400}, "req-1");
    REQUIRE(again.status().code() == absl::StatusCode::kAlreadyExists);
    CHECK(again.status().message().find("\"req-1\"") != std::string::npos);
    CHECK(again.status().message().find("150000 nano-USD") !=
          std::string::npos);
    CHECK(acct->spent("team", who).value() == 150'000);  // nothing held
    // Another instance, the same Redis: refused there too.
    auto other = RedisAccountant::create(rk_test::flat_prices(),
                                         client_for(server.port()),
                                         {.test_clock = clock.fn()})
                     .value();
    REQUIRE(
        other->add_budget(month_budget("team", Field::kTeam, 1'000'000)).ok());
    CHECK(other->reserve(who, "m", {1, 1}, "req-1").status().code() ==
          absl::StatusCode::kAlreadyExists);
    auto x = acct->reserve(
        who, "m", {.prompt_tokens = 100, .max_output_tokens = 100}, "req-7");
    auto y = other->reserve(
        who, "m", {.prompt_tokens = 100, .max_output_tokens = 100}, "req-7");
    REQUIRE(x->granted());
    REQUIRE(y->granted());
    CHECK(acct->spent("team", who).value() == 550'000);
    const Settlement first = x->settle(used_tokens(100, 50)).value();
    CHECK(y->settle(used_tokens(100, 100)).value() == first);
    CHECK(acct->spent("team", who).value() == 300'000);
    CHECK(acct->reserve(who, "m", {1, 1}, "req-7").status().code() ==
          absl::StatusCode::kAlreadyExists);
  }
  SECTION("an overage past the limit is charged; then 403") {
    auto big = acct->reserve(
        who, "m", {.prompt_tokens = 100, .max_output_tokens = 700}, "req-2");
    REQUIRE(big->granted());
    CHECK(big->settle(used_tokens(100, 1'000)).value().cost ==
          Money{1'100'000});
    CHECK(acct->spent("team", who).value() == 1'250'000);
    auto refused = acct->reserve(
        who, "m", {.prompt_tokens = 1, .max_output_tokens = 0}, "req-3");
    REQUIRE(refused.ok());
    CHECK_FALSE(refused->granted());
    CHECK(refused->refused_by_budget());
    CHECK(refused->settle(used_tokens(1, 0)).status().code() ==
          absl::StatusCode::kFailedPrecondition);
  }
  SECTION("release, and the destructor, give everything back") {
    {
      auto held = acct->reserve(
          who, "m", {.prompt_tokens = 10, .max_output_tokens = 10}, "req-4");
      REQUIRE(held->granted());
      CHECK(acct->spent("team", who).value() == 170'000);
    }
    CHECK(acct->spent("team", who).value() == 150'000);
    auto held = acct->reserve(
        who, "m", {.prompt_tokens = 10, .max_output_tokens = 10}, "req-5");
    held->release();
    CHECK(acct->spent("team", who).value() == 150'000);
    CHECK(held->settle(used_tokens(1, 1)).status().code() ==
          absl::StatusCode::kFailedPrecondition);
  }
  SECTION(
      "a period turns: the new month starts empty, a late settle stays "
      "in the month it was reserved in") {
    auto late = acct->reserve(
        who, "m", {.prompt_tokens = 100, .max_output_tokens = 100}, "req-6");
    REQUIRE(late->granted());
    clock.t->store((kT0 + std::chrono::hours(24 * 31)).count());
    CHECK(acct->spent("team", who).value() == 0);
    REQUIRE(late->settle(used_tokens(100, 0)).ok());
    CHECK(acct->spent("team", who).value() == 0);
  }
  SECTION("bad input is a status, nothing held") {
    CHECK(acct->reserve({.user = "u", .team = "t"}, "m", {1, 1}, "x")
              .status()
              .code() == absl::StatusCode::kInvalidArgument);  // no org
    CHECK(acct->reserve(who, "nope", {1, 1}, "x").status().code() ==
          absl::StatusCode::kNotFound);
    CHECK(acct->reserve(who, "m", {1, 1}, "").status().code() ==
          absl::StatusCode::kInvalidArgument);
    CHECK(acct->spent("team", who).value() == 150'000);
    CHECK(acct->spent("nope", who).status().code() ==
          absl::StatusCode::kNotFound);
  }
}

TEST_CASE(
    "T6a across instances: 64 reservations from 2 accountants against "
    "a budget for 10, exactly 10 every round",
    "[redis][budget][T6a]") {
  RedisServer server;
  TestClock clock;
  std::vector<std::unique_ptr<RedisAccountant>> instances;
  for (int i = 0; i < 2; ++i) {
    instances.push_back(RedisAccountant::create(rk_test::flat_prices(),
                                                client_for(server.port()),
                                                {.test_clock = clock.fn()})
                            .value());
    REQUIRE(instances.back()
                ->add_budget(month_budget("team", Field::kTeam, 10'000))
                .ok());
  }
  const Subject who{.user = "u", .team = "t", .org = "o"};
  const int rounds = 100;
  for (int round = 0; round < rounds; ++round) {
    std::atomic<int> granted{0};
    std::vector<std::vector<RedisReservation>> held(8);
    std::vector<std::thread> threads;
    for (int t = 0; t < 8; ++t) {
      threads.emplace_back([&, t] {
        RedisAccountant& a = *instances[static_cast<std::size_t>(t % 2)];
        for (int k = 0; k < 8; ++k) {
          auto r = a.reserve(
              who, "m", {.prompt_tokens = 1, .max_output_tokens = 0},
              "r" + std::to_string(round) + "-" + std::to_string(t * 8 + k));
          if (r.ok() && r->granted()) {
            granted.fetch_add(1);
            held[static_cast<std::size_t>(t)].push_back(*std::move(r));
          }
        }
      });
    }
    for (auto& th : threads) th.join();
    REQUIRE(granted.load() == 10);
    held.clear();  // released: the budget is whole for the next round
    REQUIRE(instances[0]->spent("team", who).value() == 0);
  }
}

TEST_CASE(
    "T6d across instances: random lifecycles, twins in flight and calls "
    "retried on other instances, Redis's books equal the oracle",
    "[redis][budget][T6d]") {
  RedisServer server;
  TestClock clock;
  std::vector<std::unique_ptr<RedisAccountant>> instances;
  for (int i = 0; i < 3; ++i) {
    instances.push_back(RedisAccountant::create(rk_test::flat_prices(),
                                                client_for(server.port()),
                                                {.test_clock = clock.fn()})
                            .value());
    REQUIRE(instances.back()
                ->add_budget(month_budget("team", Field::kTeam, 1'000'000'000))
                .ok());
  }
  std::mt19937_64 rng(rk_test::seed_or(0x6D));
  std::map<std::string, std::int64_t> oracle;  // team -> nano-USD
  const int calls = 2'000;
  for (int i = 0; i < calls; ++i) {
    const std::string team = "t" + std::to_string(rng() % 4);
    const Subject who{.team = team, .org = "o"};
    const std::string id = "call-" + std::to_string(i);
    const Estimate e{.prompt_tokens = rng() % 500,
                     .max_output_tokens = rng() % 500};
    auto r = instances[rng() % 3]->reserve(who, "m", e, id);
    REQUIRE(r->granted());
    const int what = static_cast<int>(rng() % 4);
    if (what == 0) continue;  // dropped: released by the destructor
    // A twin in flight at the same time on another instance (the same id
    // reserved twice before either settled).
    std::optional<RedisReservation> twin;
    if (what == 3) {
      auto t = instances[rng() % 3]->reserve(who, "m", e, id);
      REQUIRE(t->granted());
      twin = *std::move(t);
    }
    const Usage u = used_tokens(e.prompt_tokens, rng() % 800);  // above too
    const auto first = r->settle(u);
    REQUIRE(first.ok());
    oracle[team] += first->cost.nanos;
    // The twin's settle: the first settlement, its holds given back.
    if (twin) CHECK(twin->settle(used_tokens(1, 1)).value() == *first);
    // The whole call retried 0-2 times on other instances: refused, the
    // first settlement there to answer with, nothing held or charged.
    for (int k = static_cast<int>(rng() % 3); k-- > 0;) {
      RedisAccountant& other = *instances[rng() % 3];
      auto retry = other.reserve(who, "m", e, id);
      REQUIRE(retry.status().code() == absl::StatusCode::kAlreadyExists);
      CHECK(other.find_settlement(who, id).value() == *first);
    }
  }
  for (const auto& [team, nanos] : oracle) {
    CAPTURE(team);
    CHECK(
        static_cast<std::int64_t>(
            instances[0]->spent("team", {.team = team, .org = "o"}).value()) ==
        nanos);
  }
}

TEST_CASE(
    "journal: torn tail cut, damage refused, replayed by the next "
    "process",
    "[redis][budget][journal]") {
  const std::string path = temp_path("settles.journal");
  {
    auto j = detail::SettleJournal::open(path).value();
    REQUIRE(j->append({{"k1", "k 2"}, {"", "settle", std::string("\0\xff", 2)}})
                .ok());
    REQUIRE(j->append({{"a"}, {"b"}}).ok());
  }
  {
    std::ofstream f(path, std::ios::app);
    f << "j 1 6b";  // torn: no checksum, no newline
  }
  {
    auto j = detail::SettleJournal::open(path).value();
    REQUIRE(j->pending().size() == 2);
    CHECK(j->pending()[0].keys[1] == "k 2");
    CHECK(j->pending()[0].args[0].empty());
    CHECK(j->pending()[0].args[2] == std::string("\0\xff", 2));
    CHECK(j->pending()[1].args[0] == "b");
  }
  {
    std::fstream f(path, std::ios::in | std::ios::out);
    f.seekp(5);
    f.put('0');  // a flipped digit in an acknowledged line
  }
  CHECK(detail::SettleJournal::open(path).status().code() ==
        absl::StatusCode::kDataLoss);
}

TEST_CASE(
    "T5a for budgets: Redis SIGKILLed mid-run and restarted: zero "
    "lost budget charges",
    "[redis][budget][T5a]") {
  // Persistence as docs/redis.md recommends for budgets: what Redis
  // acknowledged survives its restart; what it could not take waits in the
  // journal. The books must equal every settle acknowledged, exactly.
  char dir[] = "/tmp/rk_aof_XXXXXX";
  REQUIRE(mkdtemp(dir) != nullptr);
  RedisServer server(
      {"--dir", dir, "--appendonly", "yes", "--appendfsync", "always"});
  const std::string journal = std::string(dir) + "/settles.journal";
  // Time-outs are not this test's subject (a killed Redis refuses at once):
  // the client's default generous ones, so that a loaded machine's slow
  // fsyncs do not open the breaker after the restart.
  auto client = client_for(server.port());
  auto acct = RedisAccountant::create(rk_test::flat_prices(), client,
                                      {.journal_path = journal})
                  .value();
  REQUIRE(acct->add_budget(
                  month_budget("team", Field::kTeam, std::uint64_t{1} << 50),
                  {.fail = FailMode::kOpen})
              .ok());
  std::atomic<bool> stop{false};
  std::atomic<std::int64_t> acknowledged{0};
  std::atomic<int> settles{0};
  std::atomic<int> errors{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(static_cast<std::uint64_t>(t) + 1);
      const std::string team = "t" + std::to_string(t % 2);
      const Subject who{.team = team, .org = "o"};  // views: team outlives
      for (int i = 0; !stop.load(); ++i) {
        auto r = acct->reserve(
            who, "m", {.prompt_tokens = 100, .max_output_tokens = 200},
            "w" + std::to_string(t) + "-" + std::to_string(i));
        if (!r.ok() || !r->granted()) {
          errors.fetch_add(1);
          continue;
        }
        const auto s = r->settle(used_tokens(100, rng() % 400));
        if (!s.ok()) {
          errors.fetch_add(1);
          continue;
        }
        acknowledged.fetch_add(s->cost.nanos);
        settles.fetch_add(1);
      }
    });
  }
  std::this_thread::sleep_for(std::chrono::seconds(1));
  server.stop(SIGKILL);
  std::this_thread::sleep_for(std::chrono::seconds(1));
  const std::uint64_t journaled_while_down = acct->journaled();
  server.start();  // the same directory: its AOF
  std::this_thread::sleep_for(std::chrono::milliseconds(1'500));
  stop = true;
  for (auto& th : threads) th.join();
  // Whatever is still journaled goes now, once the client reaches Redis.
  rk_test::wait_answered(*client);
  const auto replay = acct->replay_journal();
  REQUIRE(replay.ok());
  CHECK(acct->journal_pending() == 0);
  INFO("settles " << settles.load() << ", journaled while down "
                  << journaled_while_down << ", reserves by the fail mode "
                  << acct->fallback_reserves());
  CHECK(errors.load() == 0);
  CHECK(journaled_while_down > 0);
  CHECK(acct->fallback_reserves() > 0);
  const std::int64_t books = static_cast<std::int64_t>(
      acct->spent("team", {.team = "t0", .org = "o"}).value() +
      acct->spent("team", {.team = "t1", .org = "o"}).value());
  CHECK(books == acknowledged.load());
  const std::string rm = std::string("rm -rf ") + dir;
  CHECK(std::system(rm.c_str()) == 0);
}

TEST_CASE(
    "a journal left by a crashed process is replayed by the next one, "
    "once",
    "[redis][budget][journal]") {
  RedisServer server;
  const std::string journal = temp_path("settles.journal");
  TestClock clock;
  const Subject who{.team = "t", .org = "o"};
  {
    // Redis is away for this whole "process": reserved by the fail mode,
    // settled into the journal.
    auto acct = journaled_team(client_for(server.port()), journal, clock);
    server.stop(SIGKILL);
    for (int i = 0; i < 5; ++i) {
      auto r = acct->reserve(who, "m", {10, 10}, "c" + std::to_string(i));
      REQUIRE(r->granted());
      CHECK_FALSE(r->backed());
      REQUIRE(r->settle(used_tokens(10, 5)).ok());
    }
    CHECK(acct->journaled() >= 5);  // the settles (and any release of a
                                    // reserve that may have run)
  }
  server.start();
  for (int run = 0; run < 2; ++run) {
    // The next process: the journal replays on its first call (a second
    // run of the same journal, as after a crash mid-replay, changes
    // nothing).
    auto acct = journaled_team(client_for(server.port()), journal, clock);
    CHECK((acct->journal_pending() >= 5) == (run == 0));
    auto r = acct->reserve(who, "m", {1, 0}, "probe" + std::to_string(run));
    REQUIRE(r->granted());
    r->release();
    CHECK(acct->journal_pending() == 0);
    CHECK(acct->spent("team", who).value() == 5 * 15'000);
  }
}

TEST_CASE("a crash mid-replay: the same journal run twice applies once",
          "[redis][budget][journal]") {
  RedisServer server;
  const std::string journal = temp_path("settles.journal");
  TestClock clock;
  const Subject who{.team = "t", .org = "o"};
  {
    auto acct = journaled_team(client_for(server.port()), journal, clock);
    server.stop(SIGKILL);
    for (int i = 0; i < 3; ++i) {
      auto r = acct->reserve(who, "m", {10, 10}, "c" + std::to_string(i));
      REQUIRE(r->settle(used_tokens(10, 10)).ok());
    }
  }
  server.start();
  // Copy the journal, replay it, put the copy back: a crash after running
  // the lines and before emptying the file.
  const std::string copy = journal + ".copy";
  REQUIRE(std::system(("cp " + journal + " " + copy).c_str()) == 0);
  for (int run = 0; run < 2; ++run) {
    auto acct = journaled_team(client_for(server.port()), journal, clock);
    CHECK(acct->replay_journal().value() >= 3);
    CHECK(acct->spent("team", who).value() == 3 * 20'000);
    REQUIRE(std::system(("cp " + copy + " " + journal).c_str()) == 0);
  }
}

TEST_CASE(
    "fail modes for budgets: closed refuses, local holds at the "
    "instance's share; both counted",
    "[redis][budget]") {
  RedisServer server;
  const std::string journal = temp_path("settles.journal");
  TestClock clock;
  auto acct = RedisAccountant::create(
                  rk_test::flat_prices(), client_for(server.port()),
                  {.journal_path = journal, .test_clock = clock.fn()})
                  .value();
  REQUIRE(acct->add_budget(month_budget("team", Field::kTeam, 100'000),
                           {.fail = FailMode::kLocal, .instances = 4})
              .ok());
  REQUIRE(acct->add_budget(month_budget("org", Field::kOrg, 1'000'000),
                           {.fail = FailMode::kOpen})
              .ok());
  const Subject who{.team = "t", .org = "o"};
  server.stop(SIGKILL);
  // The team's share here: 25,000 nano-USD: two calls of 10,000 fit.
  std::vector<RedisReservation> held;
  for (int i = 0; i < 3; ++i) {
    auto r = acct->reserve(who, "m", {5, 5}, "l" + std::to_string(i));
    REQUIRE(r.ok());
    CHECK_FALSE(r->backed());
    CHECK(r->granted() == (i < 2));
    held.push_back(*std::move(r));
  }
  CHECK(held[2].refused_by_budget());
  REQUIRE(held[0].settle(used_tokens(5, 1)).ok());  // 6,000: journaled
  REQUIRE(held[1].settle(used_tokens(5, 5)).ok());  // 10,000
  CHECK(acct->journaled() >= 2);
  CHECK(acct->budgets()[0]->fallbacks() == 3);
  server.start();
  replay_until_ok(*acct);
  CHECK(acct->spent("team", who).value() == 16'000);
  CHECK(acct->spent("org", who).value() == 16'000);

  SECTION("closed") {
    auto closed = RedisAccountant::create(rk_test::flat_prices(),
                                          client_for(server.port()),
                                          {.test_clock = clock.fn()})
                      .value();
    REQUIRE(
        closed->add_budget(month_budget("team", Field::kTeam, 100'000)).ok());
    server.stop(SIGKILL);
    auto r = closed->reserve(who, "m", {5, 5}, "c1");
    REQUIRE(r.ok());
    CHECK_FALSE(r->granted());
    CHECK(r->decision().retry_after == std::chrono::seconds(1));
    CHECK(closed->fallback_reserves() == 1);
  }
}

TEST_CASE(
    "budgets on a 3-master Redis Cluster: one tenant's reservation in "
    "one slot",
    "[redis][budget][T4d]") {
  rk_test::RedisCluster cluster;
  auto client = RedisClient::create({.port = cluster.port(0),
                                     .prefix = "rkt:",
                                     .command_timeout = std::chrono::seconds(5),
                                     .cluster = true})
                    .value();
  TestClock clock;
  auto acct = RedisAccountant::create(rk_test::flat_prices(), client,
                                      {.test_clock = clock.fn()})
                  .value();
  REQUIRE(acct->add_budget(month_budget("user", Field::kUser, 1'000'000)).ok());
  REQUIRE(acct->add_budget(month_budget("team", Field::kTeam, 1'000'000)).ok());
  REQUIRE(acct->add_budget(month_budget("org", Field::kOrg, 10'000'000)).ok());
  auto rpm = RedisLimit<FixedWindow>::create(
                 {.name = "rpm"}, FixedWindow::create(per_minute(100)).value(),
                 client, {.test_time = true})
                 .value();
  std::set<std::string> nodes;
  for (int o = 0; o < 30; ++o) {
    const std::string org = "org" + std::to_string(o);
    const Subject who{.user = "u", .team = "t", .org = org};
    const ChainItem limits[] = {{rpm.get(), "u", 1}};
    auto r = acct->reserve(who, "m", {10, 10}, "id", limits);
    REQUIRE(r.ok());
    REQUIRE(r->granted());
    REQUIRE(r->backed());
    REQUIRE(r->settle(used_tokens(10, 0)).ok());
    CHECK(acct->spent("org", who).value() == 10'000);
    nodes.insert(client->node_of(redis_key(
        "rkt:", "org", subject_key(Scope(Field::kOrg), who).value(), "")));
  }
  CHECK(nodes.size() == 3);
  for (RedisLimitBase* b : acct->budgets()) CHECK(b->fallbacks() == 0);
  CHECK(rpm->fallbacks() == 0);
}

TEST_CASE("soft thresholds fire once per key and period across instances",
          "[redis][budget]") {
  RedisServer server;
  TestClock clock;
  std::vector<std::unique_ptr<RedisAccountant>> instances;
  std::vector<ThresholdEvent> fired;
  std::mutex mu;
  for (int i = 0; i < 2; ++i) {
    instances.push_back(RedisAccountant::create(rk_test::flat_prices(),
                                                client_for(server.port()),
                                                {.test_clock = clock.fn()})
                            .value());
    BudgetSpec spec = month_budget("team", Field::kTeam, 100'000);
    spec.soft_permille = {500, 800};
    REQUIRE(instances.back()->add_budget(spec).ok());
    instances.back()->on_threshold([&](const ThresholdEvent& e) {
      std::lock_guard<std::mutex> lock(mu);
      fired.push_back(e);
    });
  }
  CHECK(
      instances[0]
          ->add_budget({.name = "bad",
                        .scope = Field::kTeam,
                        .limit = 1,
                        .period = Period::calendar(PeriodKind::kMonth).value(),
                        .soft_permille = {0}})
          .code() == absl::StatusCode::kInvalidArgument);
  const Subject who{.team = "t", .org = "o"};
  // 10,000 nano-USD a call; alternate instances: 50% at the 5th call, 80%
  // at the 8th, each once.
  for (int i = 0; i < 9; ++i) {
    auto r = instances[static_cast<std::size_t>(i % 2)]->reserve(
        who, "m", {5, 5}, "c" + std::to_string(i));
    REQUIRE(r->granted());
    REQUIRE(r->settle(used_tokens(5, 5)).ok());
  }
  REQUIRE(fired.size() == 2);
  CHECK(fired[0].permille == 500);
  CHECK(fired[0].spent == 50'000);
  CHECK(fired[1].permille == 800);
  CHECK(fired[1].limit == 100'000);
  // The forecast reads Redis's books (both instances' spend).
  clock.t->store((kT0 + std::chrono::hours(24)).count());
  const Forecast f = instances[0]->forecast("team", who).value();
  CHECK(f.spent == 90'000);
  CHECK(f.limit == 100'000);
  CHECK(f.period_start == kT0);
  CHECK(f.period_end == kT0 + std::chrono::hours(24 * 31));
  CHECK(f.projected == 90'000 * 31);
  REQUIRE(f.exhausts_at.has_value());
  CHECK(*f.exhausts_at > f.now);
  CHECK(instances[0]->forecast("nope", who).status().code() ==
        absl::StatusCode::kNotFound);
  // An overage settled past the limit crosses nothing new (all fired); the
  // next month fires again.
  clock.t->store((kT0 + std::chrono::hours(24 * 31)).count());
  auto r = instances[1]->reserve(who, "m", {5, 5}, "next-month");
  REQUIRE(r->granted());
  REQUIRE(r->settle(used_tokens(5, 80)).ok());  // 85,000: an overage
  CHECK(fired.size() == 4);
}

TEST_CASE(
    "streams: next_chunk_fits grows the reservation in Redis, all or "
    "nothing; the settle is exact",
    "[redis][budget]") {
  RedisServer server;
  TestClock clock;
  const std::string journal = temp_path("settles.journal");
  auto acct = RedisAccountant::create(
                  rk_test::flat_prices(), client_for(server.port()),
                  {.journal_path = journal, .test_clock = clock.fn()})
                  .value();
  REQUIRE(acct->add_budget(month_budget("team", Field::kTeam, 100'000),
                           {.fail = FailMode::kOpen})
              .ok());
  REQUIRE(acct->add_budget(month_budget("org", Field::kOrg, 1'000'000),
                           {.fail = FailMode::kClosed})
              .ok());
  const Subject who{.team = "t", .org = "o"};
  auto r = acct->reserve(who, "m", {10, 10}, "stream");
  REQUIRE(r->granted());
  CHECK(r->next_chunk_fits(5, 5).value());  // within the 20 tokens held
  CHECK(acct->spent("team", who).value() == 20'000);
  CHECK(r->next_chunk_fits(10, 40).value());  // grows to 60 tokens
  CHECK(acct->spent("team", who).value() == 60'000);
  CHECK(acct->spent("org", who).value() == 60'000);
  CHECK_FALSE(r->next_chunk_fits(50, 45).value());    // 105 > 100: cut
  CHECK(acct->spent("team", who).value() == 60'000);  // nothing taken
  CHECK(acct->spent("org", who).value() == 60'000);
  REQUIRE(r->settle(used_tokens(10, 45)).value().cost == Money{55'000});
  CHECK(acct->spent("team", who).value() == 55'000);
  CHECK(r->next_chunk_fits(1, 1).status().code() ==
        absl::StatusCode::kFailedPrecondition);

  SECTION(
      "Redis away mid-stream: the fail modes answer; the settle charges "
      "what Redis did not hold") {
    auto s = acct->reserve(who, "m", {5, 5}, "stream-2");
    REQUIRE(s->granted());
    CHECK(acct->spent("team", who).value() == 65'000);
    server.stop(SIGKILL);
    // The org budget fails closed: the stream is cut.
    CHECK_FALSE(s->next_chunk_fits(5, 20).value());
    server.start();  // empty: what Redis held is gone
    replay_until_ok(*acct);
    REQUIRE(s->settle(used_tokens(5, 5)).ok());
    // Its holds went with Redis's memory: the whole actual is charged.
    CHECK(acct->spent("team", who).value() == 10'000);
  }
  SECTION(
      "kOpen grants an extension while Redis is away, charged in full "
      "at the settle") {
    auto open_acct =
        RedisAccountant::create(
            rk_test::flat_prices(), client_for(server.port()),
            {.journal_path = journal + "2", .test_clock = clock.fn()})
            .value();
    REQUIRE(open_acct
                ->add_budget(month_budget("team", Field::kTeam, 100'000),
                             {.fail = FailMode::kOpen})
                .ok());
    auto s = open_acct->reserve(who, "m", {5, 5}, "stream-3");
    REQUIRE(s->granted());
    CHECK(open_acct->spent("team", who).value() == 65'000);
    server.stop(SIGKILL);
    CHECK(s->next_chunk_fits(5, 20).value());  // 30 tokens, 20 unrecorded
    server.start();
    // Redis (restarted empty) gets the settle: the 25 tokens used, in full.
    replay_until_ok(*open_acct);
    REQUIRE(s->settle(used_tokens(5, 20)).ok());
    replay_until_ok(*open_acct);
    CHECK(open_acct->spent("team", who).value() == 25'000);
  }
}

TEST_CASE(
    "a journal Redis refuses (an error reply) is kept whole and runs "
    "once Redis takes it",
    "[redis][budget][journal]") {
  RedisServer server;
  const std::string journal = temp_path("settles.journal");
  TestClock clock;
  auto client = client_for(server.port());
  auto acct = journaled_team(client, journal, clock);
  const Subject who{.team = "t", .org = "o"};
  server.stop(SIGKILL);
  for (int i = 0; i < 3; ++i) {
    auto r = acct->reserve(who, "m", {10, 10}, "e" + std::to_string(i));
    REQUIRE(r->settle(used_tokens(10, 0)).ok());
  }
  server.start();
  // The outage opened the client's breaker; within its breaker_max_open
  // (200 ms here) the client reaches Redis again. Only then can Redis
  // refuse anything.
  const auto back = std::chrono::steady_clock::now();
  const auto waited = rk_test::answered_within_bound(*client, back);
  INFO("the client reached Redis " << waited.count() / 1'000'000
                                   << " ms after it was back");
  // The budget's key holds a hash now: its GET answers WRONGTYPE.
  const std::string key =
      redis_key("rkt:", "team", subject_key(Scope(Field::kOrg), who).value(),
                subject_key(Scope(Field::kTeam), who).value());
  auto admin = client_for(server.port());
  REQUIRE(admin->command({"HSET", key, "f", "v"}).ok());
  const std::uint64_t stopped = acct->replay_errors();
  const auto failed = acct->replay_journal();
  CHECK(failed.status().code() == absl::StatusCode::kInternal);
  CHECK(acct->journal_pending() >= 3);
  CHECK(acct->replay_errors() == stopped + 1);
  REQUIRE(admin->command({"DEL", key}).ok());
  replay_until_ok(*acct);
  CHECK(acct->spent("team", who).value() == 3 * 10'000);
}

TEST_CASE(
    "T5a for budgets, Redis restarted empty: every charge the old "
    "Redis never acknowledged reaches the new one",
    "[redis][budget][T5a]") {
  // Without persistence, what Redis acknowledged dies with it (docs/redis.md:
  // use AOF for budgets). What it never acknowledged, the journal keeps: the
  // settles of the outage, and the first settles after it (their holds gone,
  // charged in full), must all be in the new Redis's books, exactly.
  RedisServer server;
  const std::string journal = temp_path("settles.journal");
  auto client = client_for(server.port());
  auto acct = RedisAccountant::create(rk_test::flat_prices(), client,
                                      {.journal_path = journal})
                  .value();
  REQUIRE(acct->add_budget(
                  month_budget("team", Field::kTeam, std::uint64_t{1} << 50),
                  {.fail = FailMode::kOpen})
              .ok());
  const Subject who{.team = "t", .org = "o"};
  std::atomic<bool> stop{false};
  std::atomic<std::int64_t> killed_at{std::numeric_limits<std::int64_t>::max()};
  std::int64_t expected = 0;  // what the new Redis must hold
  int settles = 0, journaled = 0, errors = 0;
  std::thread worker([&] {
    std::mt19937_64 rng(5);
    for (int i = 0; !stop.load(); ++i) {
      auto r = acct->reserve(who, "m", {100, 200}, "e-" + std::to_string(i));
      if (!r.ok() || !r->granted()) {
        ++errors;  // (Catch's assertions stay on the main thread)
        continue;
      }
      const std::int64_t started =
          std::chrono::steady_clock::now().time_since_epoch().count();
      const std::uint64_t before = acct->journaled();
      const auto s = r->settle(used_tokens(100, rng() % 400));
      if (!s.ok()) {
        ++errors;
        continue;
      }
      ++settles;
      const bool kept = acct->journaled() > before;
      journaled += kept ? 1 : 0;
      if (kept || started > killed_at.load()) expected += s->cost.nanos;
    }
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(700));
  server.stop(SIGKILL);
  killed_at = std::chrono::steady_clock::now().time_since_epoch().count();
  std::this_thread::sleep_for(std::chrono::milliseconds(700));
  server.start();  // empty
  std::this_thread::sleep_for(std::chrono::milliseconds(700));
  stop = true;
  worker.join();
  replay_until_ok(*acct);
  INFO("settles " << settles << ", journaled " << journaled);
  CHECK(errors == 0);
  CHECK(journaled > 0);
  CHECK(static_cast<std::int64_t>(acct->spent("team", who).value()) ==
        expected);
}

TEST_CASE(
    "case 6 in Redis: a released or dropped reservation gives back its rate "
    "limits too; settle takes them to the actual tokens",
    "[redis][budget][seams]") {
  RedisServer server;
  TestClock clock;
  auto client = client_for(server.port());
  auto acct = RedisAccountant::create(rk_test::flat_prices(), client,
                                      {.test_clock = clock.fn()})
                  .value();
  REQUIRE(
      acct->add_budget(month_budget("team", Field::kTeam, 1'000'000'000)).ok());
  auto tpm =
      RedisLimit<TokenBucket>::create(
          {.name = "tpm", .unit = Unit::kTokens},
          TokenBucket::create(per_minute(10'000), 10'000).value(), client)
          .value();
  auto rpm =
      RedisLimit<FixedWindow>::create(
          {.name = "rpm"}, FixedWindow::create(per_minute(100)).value(), client)
          .value();
  const Subject who{.user = "u", .team = "t", .org = "o"};
  const ChainItem limits[] = {{rpm.get(), "u", 1}, {tpm.get(), "u", 2'000}};
  const Estimate e{.prompt_tokens = 1'000, .max_output_tokens = 1'000};
  // What the rate limits have left, as a zero-cost reserve sees them.
  int probes = 0;
  const auto left = [&] {
    const ChainItem zero[] = {{rpm.get(), "u", 0}, {tpm.get(), "u", 0}};
    auto p = acct->reserve(who, "m", {1, 0},
                           "probe-" + std::to_string(probes++), zero);
    REQUIRE(p->granted());
    const std::pair<std::uint64_t, std::uint64_t> out{
        p->decision().results[0].decision.remaining,
        p->decision().results[1].decision.remaining};
    p->release();
    return out;
  };
  using L = std::pair<std::uint64_t, std::uint64_t>;
  {
    auto r = acct->reserve(who, "m", e, "dropped", limits);
    REQUIRE(r->granted());
    CHECK(left() == L{99, 8'000});
  }
  CHECK(left() == L{100, 10'000});  // dropped: all of it back
  auto released = acct->reserve(who, "m", e, "released", limits);
  REQUIRE(released->granted());
  released->release();
  CHECK(left() == L{100, 10'000});
  // Settled: the token limit goes to what the provider counted, in both
  // directions; the request limit keeps its request.
  auto over = acct->reserve(who, "m", e, "over", limits);
  REQUIRE(over->settle(used_tokens(1'000, 1'100)).ok());  // 2,100 > 2,000
  CHECK(left() == L{99, 10'000 - 2'100});
  clock.t->store((kT0 + std::chrono::minutes(1)).count());  // full again
  auto under = acct->reserve(who, "m", e, "under", limits);
  REQUIRE(under->settle(used_tokens(1'000, 0)).ok());  // 1,000 < 2,000
  CHECK(left() == L{99, 10'000 - 1'000});
  // A settle of an id another reservation settled first gives this one's
  // rate limits back with its holds.
  auto twin = acct->reserve(who, "m", e, "twin", limits);
  auto twin2 = acct->reserve(who, "m", e, "twin", limits);
  REQUIRE(twin->settle(used_tokens(1'000, 0)).ok());
  REQUIRE(twin2->settle(used_tokens(1'000, 0)).ok());
  CHECK(left() == L{98, 10'000 - 2'000});
}
