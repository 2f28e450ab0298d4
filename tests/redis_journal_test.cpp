// The settle journal's recovery (issue 16): a replay in bounded slices that
// no reserve or settle waits on for longer than its command_timeout, with
// settles made meanwhile counted once; settles pending longer than the
// settled_ttl window set aside instead of charged twice; the journal's
// group commit (settlers sharing one fdatasync, no lock held while they
// wait).
#include <signal.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "ratekeeper/budget/redis_accountant.hpp"
#include "ratekeeper/detail/group_sync.hpp"
#include "redis_server.hpp"
#include "redis_wait.hpp"
#include "test_prices.hpp"
#include "test_util.hpp"

using namespace ratekeeper;
using rk_test::RedisServer;

namespace {

const Nanos kT0{1'796'083'200LL * 1'000'000'000};  // 2026-12-01 UTC
constexpr Nanos kDay = std::chrono::hours(24);

BudgetSpec month_budget(std::string name, Scope scope, std::uint64_t nanos) {
  return BudgetSpec{std::move(name),
                    scope,
                    BudgetUnit::kNanoUsd,
                    nanos,
                    Period::calendar(PeriodKind::kMonth).value(),
                    {}};
}

std::shared_ptr<RedisClient> client_for(int port, Nanos timeout,
                                        bool start_unreachable = false) {
  auto c =
      RedisClient::create({.port = port,
                           .prefix = "rkj:",
                           .connect_timeout = timeout,
                           .command_timeout = timeout,
                           .breaker_open = std::chrono::milliseconds(50),
                           .breaker_max_open = std::chrono::milliseconds(200),
                           .start_unreachable = start_unreachable});
  REQUIRE(c.ok());
  return *c;
}

using rk_test::TestClock;  // starts at kT0 (2026-12-01 UTC)

Usage used_tokens(std::uint64_t in, std::uint64_t out) {
  Usage u;
  u.input_uncached = in;
  u.output = out;
  return u;
}

std::string temp_dir() {
  char tmpl[] = "/tmp/rk_jrec_XXXXXX";
  REQUIRE(mkdtemp(tmpl) != nullptr);
  return tmpl;
}

// A loopback port nothing listens on: a client there is refused at once
// (Redis away for a whole "process").
int dead_port() {
  RedisServer s;
  const int p = s.port();
  s.stop(SIGKILL);
  return p;
}

std::uint64_t fnv(std::string_view s) {
  std::uint64_t h = 1469598103934665603ull;
  for (const char c : s) {
    h ^= static_cast<unsigned char>(c);
    h *= 1099511628211ull;
  }
  return h;
}

}  // namespace

TEST_CASE(
    "20,000 journaled settles replay in slices: no call waits past its "
    "command_timeout, settles made meanwhile count once, the books equal "
    "the tally",
    "[redis][budget][journal][i16]") {
  RedisServer server;
  const std::string dir = temp_dir();
  TestClock clock;
  // The time-out is the subject: each call must return within it while the
  // journal replays. 250 ms: far more than a loopback call takes on a
  // loaded machine, less than 20,000 lines in one go take (535 ms one by
  // one before slices; 360 to 550 ms pipelined in one call, measured with
  // replay_slice set to an hour: this test then fails).
  const Nanos timeout = std::chrono::milliseconds(250);
  // Up to three runs, each on a tenant of its own, until one where Redis
  // answered every call in time.
  auto run = [&](int attempt) -> bool {
    auto client = client_for(server.port(), timeout);
    auto acct = RedisAccountant::create(
                    rk_test::flat_prices(), client,
                    {.journal_path = dir + "/settles" + std::to_string(attempt),
                     .test_clock = clock.fn()})
                    .value();
    REQUIRE(acct->add_budget(
                    month_budget("team", Field::kTeam, std::uint64_t{1} << 50),
                    {.fail = FailMode::kOpen})
                .ok());
    constexpr int kTeams = 4, kThreads = 8;
    // 20,000 in release; fewer under the sanitizer presets' scale.
    const int n = std::max(2'000, static_cast<int>(20'000 * rk_test::scale()));
    // A Subject views its fields: the names live here.
    const std::string org = "o" + std::to_string(attempt);
    const std::vector<std::string> teams = {"t0", "t1", "t2", "t3"};
    static_assert(kTeams == 4);
    auto who = [&](int i) {
      return Subject{.team = teams[static_cast<std::size_t>(i % kTeams)],
                     .org = org};
    };
    auto id = [](int i) { return "r" + std::to_string(i); };

    // Holds taken in Redis, then Redis killed: every settle is journaled. (A
    // reserve that timed out on a loaded machine was the fail mode's, and a
    // release of it is journaled too: it charges nothing.)
    std::vector<std::optional<RedisReservation>> held(
        static_cast<std::size_t>(n));
    {
      std::vector<std::thread> ts;
      for (int t = 0; t < kThreads; ++t) {
        ts.emplace_back([&, t] {
          for (int i = t; i < n; i += kThreads) {
            auto r = acct->reserve(who(i), "m", {10, 10}, id(i));
            if (r.ok() && r->granted()) {
              held[static_cast<std::size_t>(i)] = *std::move(r);
            }
          }
        });
      }
      for (auto& th : ts) th.join();
    }
    for (int i = 0; i < n; ++i) {
      REQUIRE(held[static_cast<std::size_t>(i)].has_value());
    }
    server.stop(SIGKILL);
    // What each id is charged, by this test's own count: the journaled
    // settle's cost unless a retry below settles the id first.
    std::vector<std::int64_t> expect(static_cast<std::size_t>(n));
    {
      std::vector<std::thread> ts;
      std::atomic<int> failed{0};
      for (int t = 0; t < kThreads; ++t) {
        ts.emplace_back([&, t] {
          for (int i = t; i < n; i += kThreads) {
            auto& r = *held[static_cast<std::size_t>(i)];
            auto s =
                r.settle(used_tokens(10, static_cast<std::uint64_t>(i % 7)));
            if (!s.ok()) {
              failed.fetch_add(1);
              continue;
            }
            expect[static_cast<std::size_t>(i)] = s->cost.nanos;
          }
        });
      }
      for (auto& th : ts) th.join();
      REQUIRE(failed.load() == 0);
    }
    REQUIRE(acct->journal_pending() >= static_cast<std::size_t>(n));
    INFO("journal syncs for " << n << " settles from " << kThreads
                              << " threads: " << acct->journal_syncs());
    CHECK(acct->journal_syncs() <= static_cast<std::uint64_t>(n));

    server.start();  // empty: the holds are gone, each settle charges in full
    rk_test::wait_answered(*client);
    // Replays tried while Redis was away failed; none may fail from now on.
    const std::uint64_t errors_before = acct->replay_errors();
    const std::uint64_t journaled_before = acct->journaled();
    const std::uint64_t fallbacks_before = acct->fallback_reserves();
    const std::uint64_t trips_before = client->breaker_trips();

    // Calls from 4 threads while the journal replays: new reservations, and
    // retries of journaled ids (a retry reserved before its journaled settle
    // ran is settled directly, and the journaled one then changes nothing).
    std::atomic<std::int64_t> max_call{0};
    std::atomic<int> calls_while_pending{0}, retried{0}, retry_refused{0};
    std::atomic<int> bad{0};
    std::mutex mu;
    std::map<std::string, std::pair<int, std::int64_t>>
        fresh;                               // id: team, cost
    std::map<int, std::int64_t> retry_cost;  // journaled id: the retry's cost
    const auto deadline =
        std::chrono::steady_clock::now() + std::chrono::seconds(120);
    {
      std::vector<std::thread> ts;
      for (int t = 0; t < 4; ++t) {
        ts.emplace_back([&, t] {
          for (int k = 0; acct->journal_pending() > 0; ++k) {
            if (std::chrono::steady_clock::now() > deadline) return;
            // A retry of one of the last journaled ids (replayed last).
            const int j = n - 1 - (4 * k + t);
            const bool retry = k % 2 == 0 && j >= 0;
            const std::string rid =
                retry ? id(j)
                      : "f" + std::to_string(t) + "-" + std::to_string(k);
            const int team = retry ? j : k;
            const bool pending = acct->journal_pending() > 0;
            auto t0 = std::chrono::steady_clock::now();
            auto r = acct->reserve(who(team), "m", {10, 10}, rid);
            auto t1 = std::chrono::steady_clock::now();
            std::int64_t worst = (t1 - t0).count();
            std::optional<std::int64_t> cost;
            if (r.ok() && r->granted()) {
              const auto u = used_tokens(10, retry ? 9 : 3);
              t0 = std::chrono::steady_clock::now();
              auto s = r->settle(u);
              t1 = std::chrono::steady_clock::now();
              worst = std::max<std::int64_t>(worst, (t1 - t0).count());
              if (!s.ok()) {
                bad.fetch_add(1);
                continue;
              }
              cost = s->cost.nanos;
            } else if (retry &&
                       r.status().code() == absl::StatusCode::kAlreadyExists) {
              retry_refused.fetch_add(1);
            } else {
              bad.fetch_add(1);  // no other outcome: the budget is huge
            }
            if (pending) calls_while_pending.fetch_add(1);
            std::int64_t m = max_call.load();
            while (worst > m && !max_call.compare_exchange_weak(m, worst)) {
            }
            if (!cost) continue;
            std::lock_guard<std::mutex> lock(mu);
            if (retry) {
              retried.fetch_add(1);
              retry_cost[j] = *cost;
            } else {
              fresh[rid] = {team, *cost};
            }
          }
        });
      }
      for (auto& th : ts) th.join();
    }
    REQUIRE(bad.load() == 0);
    REQUIRE(acct->journal_pending() == 0);
    INFO("slowest reserve or settle during the replay: "
         << max_call.load() / 1'000 << " us (timeout "
         << timeout.count() / 1'000 << " us), " << calls_while_pending.load()
         << " calls while lines waited, " << retried.load()
         << " retries settled directly, " << retry_refused.load()
         << " found settled; during it " << acct->journaled() - journaled_before
         << " journaled, " << acct->fallback_reserves() - fallbacks_before
         << " reserves by the fail mode, breaker opened "
         << client->breaker_trips() - trips_before << " times");
    CHECK(calls_while_pending.load() > 0);
    CHECK(acct->journal_stale() == 0);
    // Redis answered every call in time: nothing by the fail mode, nothing
    // journaled, no replay stopped. Otherwise (a loaded machine starved
    // Redis or this process past the time-out) the run says nothing about
    // the replay's bound, and the books are checked against Redis's own
    // record of each id only.
    const bool clean = acct->replay_errors() == errors_before &&
                       acct->journaled() == journaled_before &&
                       acct->fallback_reserves() == fallbacks_before;
    if (clean) CHECK(max_call.load() <= timeout.count());

    // Every id settled exactly once: each team's books are the sum of the
    // settlements Redis recorded for its ids.
    std::map<int, std::int64_t> recorded;
    std::map<int, std::int64_t> recorded_cost;
    for (int i = 0; i < n; ++i) {
      CAPTURE(i, retry_cost.count(i));
      const auto s = acct->find_settlement(who(i), id(i)).value();
      REQUIRE(s.has_value());
      recorded[i % kTeams] += s->cost.nanos;
      recorded_cost[i] = s->cost.nanos;
    }
    for (const auto& [rid, tc] : fresh) {
      const auto s = acct->find_settlement(who(tc.first), rid).value();
      REQUIRE(s.has_value());
      recorded[tc.first % kTeams] += s->cost.nanos;
    }
    for (int team = 0; team < kTeams; ++team) {
      CAPTURE(team);
      CHECK(static_cast<std::int64_t>(acct->spent("team", who(team)).value()) ==
            recorded[team]);
    }
    if (!clean) return false;

    // And by this test's own tally. Each id once: a retry that settled is
    // the id's settlement (its settle
    // returned the first one Redis recorded: its own, or the journaled one if
    // that ran between its reserve and its settle).
    for (const auto& [j, c] : retry_cost)
      expect[static_cast<std::size_t>(j)] = c;
    std::map<int, std::int64_t> tally;
    for (int i = 0; i < n; ++i) {
      tally[i % kTeams] += expect[static_cast<std::size_t>(i)];
    }
    for (const auto& [rid, tc] : fresh) tally[tc.first % kTeams] += tc.second;
    for (int team = 0; team < kTeams; ++team) {
      CAPTURE(team);
      CHECK(static_cast<std::int64_t>(acct->spent("team", who(team)).value()) ==
            tally[team]);
    }
    for (int i = 0; i < n; ++i) {
      CAPTURE(i);
      CHECK(recorded_cost[i] == expect[static_cast<std::size_t>(i)]);
    }
    return true;
  };
  int clean_runs = 0;
  for (int attempt = 0; attempt < 3 && clean_runs == 0; ++attempt) {
    if (run(attempt)) ++clean_runs;
  }
  CHECK(clean_runs == 1);
}

TEST_CASE(
    "a settle journaled longer ago than the settled_ttl window is set "
    "aside, never charged twice; younger ones replay",
    "[redis][budget][journal][i16]") {
  RedisServer server;
  const std::string dir = temp_dir();
  const std::string journal = dir + "/settles.journal";
  TestClock clock;
  const Nanos timeout = std::chrono::seconds(5);
  const Subject who{.team = "t", .org = "o"};
  auto make = [&](std::shared_ptr<RedisClient> c) {
    auto a = RedisAccountant::create(
                 rk_test::flat_prices(), std::move(c),
                 {.journal_path = journal, .test_clock = clock.fn()})
                 .value();
    REQUIRE(a->add_budget(month_budget("team", Field::kTeam, 1'000'000'000),
                          {.fail = FailMode::kOpen})
                .ok());
    return a;
  };
  // "dup" settled in Redis at T0 (12,000 nano-USD).
  {
    auto live = make(client_for(server.port(), timeout));
    auto r = live->reserve(who, "m", {10, 10}, "dup");
    REQUIRE(r->settle(used_tokens(10, 2)).ok());
    CHECK(live->spent("team", who).value() == 12'000);
  }
  // A process that never reaches Redis journals settles: "dup" again (its
  // reserve admitted by the fail mode, which cannot see it settled) and
  // "old" at T0; "edge" at the last moment that is not stale when the next
  // process replays at T0 + 8 days (settled_ttl 7 days less its margin, 1
  // hour), "late" one second after it; "young" at T0 + 8 days.
  const Nanos replay_at = kT0 + 8 * kDay;
  const Nanos window = std::chrono::hours(24 * 7) - std::chrono::hours(1);
  {
    auto away = make(client_for(dead_port(), timeout, true));
    auto journal_at = [&](Nanos t, const std::string& rid, std::uint64_t out) {
      clock.t->store(t.count());
      auto r = away->reserve(who, "m", {10, 10}, rid);
      REQUIRE(r->granted());
      REQUIRE_FALSE(r->backed());
      REQUIRE(r->settle(used_tokens(10, out)).ok());
    };
    journal_at(kT0, "dup", 3);
    journal_at(kT0, "old", 4);
    journal_at(replay_at - window, "stale-edge", 5);
    journal_at(replay_at - window + std::chrono::seconds(1), "edge", 6);
    journal_at(replay_at, "young", 7);
    CHECK(away->journal_pending() >= 5);
  }
  auto admin = client_for(server.port(), timeout);
  REQUIRE(make(admin)->find_settlement(who, "dup").value().has_value());
  // Seven days on, "dup"'s #settled key has expired: a replay of its
  // journaled settle would charge it a second time.
  const std::string settled_key = redis_key(
      "rkj:", "#settled", subject_key(Scope(Field::kOrg), who).value(), "dup");
  REQUIRE(admin->command({"DEL", settled_key}).value() == "1");

  clock.t->store(replay_at.count());
  auto acct = make(client_for(server.port(), timeout));
  const auto ran = acct->replay_journal();
  REQUIRE(ran.ok());
  CHECK(acct->journal_pending() == 0);
  CHECK(acct->journal_stale() == 3);
  // dup's first charge, then edge (16,000) and young (17,000) only.
  CHECK(acct->spent("team", who).value() == 12'000 + 16'000 + 17'000);
  for (const char* rid : {"dup", "old", "stale-edge"}) {
    CAPTURE(rid);
    CHECK_FALSE(acct->find_settlement(who, rid).value().has_value());
  }
  CHECK(acct->find_settlement(who, "edge").value()->cost.nanos == 16'000);
  CHECK(acct->find_settlement(who, "young").value()->cost.nanos == 17'000);
  // The report: each stale settle, in the journal's format, with its time.
  auto stale = detail::SettleJournal::open(acct->journal_stale_path()).value();
  const auto lines = stale->pending();
  REQUIRE(lines.size() == 3);
  const std::vector<Nanos> times = {kT0, kT0, replay_at - window};
  for (std::size_t i = 0; i < lines.size(); ++i) {
    CHECK(lines[i].t == times[i]);
    REQUIRE(lines[i].args.size() > 1);
    CHECK(lines[i].args[1] == "settle");
  }
  // Set aside, not kept: the next process finds an empty journal.
  acct.reset();
  CHECK(detail::SettleJournal::open(journal).value()->size() == 0);
}

TEST_CASE(
    "a journal of an earlier version (lines without a time) is read, its "
    "lines dated by the file",
    "[budget][journal][i16]") {
  const std::string path = temp_dir() + "/settles.journal";
  const std::string body = "j 1 6b 76";  // key "k", argument "v"
  {
    std::ofstream f(path);
    char sum[17];
    std::snprintf(sum, sizeof sum, "%016llx",
                  static_cast<unsigned long long>(fnv(body)));
    f << body << " " << sum << "\n";
  }
  struct stat st {};
  REQUIRE(::stat(path.c_str(), &st) == 0);
  auto j = detail::SettleJournal::open(path).value();
  const auto e = j->pending();
  REQUIRE(e.size() == 1);
  CHECK(e[0].keys == std::vector<std::string>{"k"});
  CHECK(e[0].args == std::vector<std::string>{"v"});
  CHECK(e[0].t == Nanos{std::int64_t{st.st_mtim.tv_sec} * 1'000'000'000 +
                        st.st_mtim.tv_nsec});
}

TEST_CASE(
    "group sync: writers arriving during a sync share the next one, "
    "none holding a lock while it waits; a failed sync fails every wait",
    "[journal][i16]") {
  constexpr int kWriters = 8;
  detail::GroupSync g;
  std::mutex writer;  // the log's own lock: held only to write
  std::uint64_t seq = 0;
  std::atomic<int> written{0}, syncs{0};
  auto write = [&] {
    std::lock_guard<std::mutex> lock(writer);
    g.written(++seq);
    written.fetch_add(1);
    return seq;
  };
  // The first sync waits (with a deadline) until every writer has written:
  // they can, since none waits holding the writer's lock.
  auto sync = [&] {
    if (syncs.fetch_add(1) == 0) {
      const auto deadline =
          std::chrono::steady_clock::now() + std::chrono::seconds(30);
      while (written.load() < kWriters &&
             std::chrono::steady_clock::now() < deadline) {
        std::this_thread::yield();
      }
    }
    return absl::OkStatus();
  };
  std::vector<std::thread> ts;
  std::atomic<int> ok{0};
  const std::uint64_t first = write();
  ts.emplace_back([&] { ok.fetch_add(g.wait(first, sync).ok() ? 1 : 0); });
  while (syncs.load() == 0) std::this_thread::yield();
  for (int i = 1; i < kWriters; ++i) {
    ts.emplace_back([&] {
      const std::uint64_t s = write();
      ok.fetch_add(g.wait(s, sync).ok() ? 1 : 0);
    });
  }
  for (auto& t : ts) t.join();
  CHECK(written.load() == kWriters);
  CHECK(ok.load() == kWriters);
  // The first covered record 1; the seven others share the second.
  CHECK(g.syncs() == 2);

  const std::uint64_t bad = write();
  CHECK(g.wait(bad, [] {
           return absl::UnavailableError("disk gone");
         }).code() == absl::StatusCode::kUnavailable);
  const std::uint64_t after = write();
  CHECK(g.wait(after, sync).message() == "disk gone");
  CHECK(g.failed().message() == "disk gone");
}

TEST_CASE(
    "journal appends from 8 threads: every line durable and read back in "
    "each thread's order, fewer syncs than lines",
    "[journal][i16]") {
  const std::string path = temp_dir() + "/settles.journal";
  constexpr int kThreads = 8, kEach = 100;
  {
    auto j = detail::SettleJournal::open(path).value();
    std::vector<std::thread> ts;
    std::atomic<int> failed{0};
    for (int t = 0; t < kThreads; ++t) {
      ts.emplace_back([&, t] {
        for (int i = 0; i < kEach; ++i) {
          detail::SettleJournal::Entry e{
              {"t" + std::to_string(t)}, {std::to_string(i)}, Nanos{i + 1}};
          if (!j->append(std::move(e)).ok()) failed.fetch_add(1);
        }
      });
    }
    for (auto& th : ts) th.join();
    CHECK(failed.load() == 0);
    CHECK(j->size() == std::size_t{kThreads * kEach});
    INFO("syncs: " << j->syncs() << " for " << kThreads * kEach << " lines");
    CHECK(j->syncs() <= static_cast<std::uint64_t>(kThreads * kEach));
  }
  auto j = detail::SettleJournal::open(path).value();
  const auto lines = j->pending();
  REQUIRE(lines.size() == static_cast<std::size_t>(kThreads * kEach));
  std::map<std::string, int> next;
  for (const auto& e : lines) {
    REQUIRE(e.keys.size() == 1);
    CHECK(e.args[0] == std::to_string(next[e.keys[0]]));
    CHECK(e.t == Nanos{next[e.keys[0]] + 1});
    ++next[e.keys[0]];
  }
  // Popped to the end, the file is emptied.
  REQUIRE(j->pop(lines.size()).ok());
  struct stat st {};
  REQUIRE(::stat(path.c_str(), &st) == 0);
  CHECK(st.st_size == 0);
}
