// gateway_demo --redis host:port: two gateway instances share one set of
// limits and budgets in Redis.
//
// The demo forks two instances (processes, as two servers behind a load
// balancer would be). Both serve the same users for a few seconds of real
// time, as fast as their threads go, so that every user asks for far more
// than its limits allow. Each call, in each instance:
//   - reserves, in one Redis script: requests per minute per user
//     (SlidingWindow), tokens per minute per user (TokenBucket, weighted by
//     the estimate) and the team's daily budget in dollars (RedisAccountant),
//     all or nothing, on Redis's clock;
//   - settles to the usage the provider reported (one more script): unused
//     tokens of the budget go back, exactly once per request id.
// Then the parent adds up what the two instances admitted and checks, per
// user, that together they stayed within each limit's bound (per-process
// limiters would have admitted up to twice as much), and, per team, that
// Redis's budget holds exactly what the two instances' settlements add up
// to.
//
//   gateway_demo --redis 127.0.0.1:6379 [--seconds S] [--users N]
//   (make demo-redis starts a redis-server of its own and runs this)
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "ratekeeper/budget/json.hpp"
#include "ratekeeper/fmt.hpp"
#include "ratekeeper/redis.hpp"
#include "ratekeeper/redis/accountant.hpp"

namespace rk = ratekeeper;

namespace {

constexpr char kModel[] = "gpt-4o-mini";
constexpr char kCatalogue[] = R"({
  "gpt-4o-mini": {
    "input_cost_per_token": 1.5e-07,
    "output_cost_per_token": 6e-07,
    "litellm_provider": "openai", "mode": "chat"
  }
})";

constexpr std::uint64_t kRpm = 60;       // requests per minute per user
constexpr std::uint64_t kTpm = 90'000;   // tokens per minute per user
constexpr std::int64_t kTeamCents = 10;  // dollars per team and day: $0.10
constexpr std::uint64_t kMaxOutput = 1'000;
constexpr int kThreads = 3;  // per instance
constexpr int kTeamSize = 5;

struct Setup {
  std::shared_ptr<rk::RedisClient> client;
  std::unique_ptr<rk::RedisLimit<rk::SlidingWindow>> rpm;
  std::unique_ptr<rk::RedisLimit<rk::TokenBucket>> tpm;
  std::unique_ptr<rk::RedisAccountant> acct;
};

// The same limits and budget in every instance (and in the parent, which
// reads the books). Fail closed: without Redis an instance admits nothing.
absl::StatusOr<Setup> connect(const std::string& host, int port,
                              const std::string& prefix) {
  Setup s;
  auto client = rk::RedisClient::create(
      {.host = host,
       .port = port,
       .prefix = prefix,
       .command_timeout = std::chrono::milliseconds(500)});
  if (!client.ok()) return client.status();
  s.client = *client;
  auto rpm = rk::RedisLimit<rk::SlidingWindow>::create(
      {.name = "rpm"}, rk::SlidingWindow::create(rk::per_minute(kRpm)).value(),
      s.client);
  if (!rpm.ok()) return rpm.status();
  s.rpm = *std::move(rpm);
  auto tpm = rk::RedisLimit<rk::TokenBucket>::create(
      {.name = "tpm", .unit = rk::Unit::kTokens},
      rk::TokenBucket::create(rk::per_minute(kTpm), kTpm).value(), s.client);
  if (!tpm.ok()) return tpm.status();
  s.tpm = *std::move(tpm);
  auto prices = rk::load_price_catalogue(kCatalogue);
  if (!prices.ok()) return prices.status();
  // Every key of a call under its team's hash tag: one slot on a Cluster.
  auto acct = rk::RedisAccountant::create(prices->table, s.client,
                                          {.tenant = rk::Field::kTeam});
  if (!acct.ok()) return acct.status();
  s.acct = *std::move(acct);
  if (absl::Status st = s.acct->add_budget(
          {.name = "team_day",
           .scope = rk::Field::kTeam,
           .unit = rk::BudgetUnit::kNanoUsd,
           .limit =
               static_cast<std::uint64_t>(rk::Money::cents(kTeamCents).nanos),
           .period = rk::Period::calendar(rk::PeriodKind::kDay).value()});
      !st.ok()) {
    return st;
  }
  return s;
}

struct UserTotals {
  std::uint64_t admitted = 0;
  std::uint64_t tokens = 0;  // estimates admitted (what tpm counted)
};

struct InstanceTotals {
  std::uint64_t tried = 0, admitted = 0, by_rpm = 0, by_tpm = 0, by_budget = 0,
                unavailable = 0;
  std::vector<UserTotals> users;
  std::map<std::string, std::int64_t> team_settled;   // nano-USD
  std::map<std::string, std::uint64_t> team_refused;  // by the budget
};

std::string user_id(std::size_t u) { return "user-" + std::to_string(u); }
std::string team_of(std::size_t u) {
  return "team-" + std::to_string(u / kTeamSize);
}

// One instance: kThreads threads calling for random users until `seconds`
// have passed. Writes its totals to `fd` as lines.
int run_instance(const std::string& host, int port, const std::string& prefix,
                 int instance, double seconds, std::size_t n_users, int fd) {
  absl::StatusOr<Setup> s = connect(host, port, prefix);
  if (!s.ok()) {
    fmt::print(stderr, "instance {}: {}\n", instance, s.status().ToString());
    return 1;
  }
  std::vector<InstanceTotals> per_thread(kThreads);
  const auto end = std::chrono::steady_clock::now() +
                   std::chrono::duration_cast<std::chrono::nanoseconds>(
                       std::chrono::duration<double>(seconds));
  std::atomic<bool> failed{false};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      InstanceTotals& tot = per_thread[static_cast<std::size_t>(t)];
      tot.users.resize(n_users);
      std::mt19937_64 rng(static_cast<std::uint64_t>(instance * 100 + t));
      std::lognormal_distribution<double> prompt_tokens(6.0, 0.8);
      for (std::uint64_t i = 0; std::chrono::steady_clock::now() < end; ++i) {
        const std::size_t u = rng() % n_users;
        const std::string user = user_id(u), team = team_of(u);
        const rk::Subject who{.user = user, .team = team};
        const auto prompt = std::min<std::uint64_t>(
            static_cast<std::uint64_t>(prompt_tokens(rng)), 4'000);
        const std::uint64_t estimate = prompt + kMaxOutput;
        const rk::ChainItem limits[] = {{s->rpm.get(), user, 1},
                                        {s->tpm.get(), user, estimate}};
        const std::string id =
            fmt::format("i{}-t{}-{}-{}", instance, t, i, prefix);
        ++tot.tried;
        auto r = s->acct->reserve(
            who, kModel,
            {.prompt_tokens = prompt, .max_output_tokens = kMaxOutput}, id,
            limits);
        if (!r.ok()) {
          fmt::print(stderr, "instance {}: {}\n", instance,
                     r.status().ToString());
          failed = true;
          return;
        }
        if (!r->granted()) {
          if (!r->backed()) {
            ++tot.unavailable;
          } else if (r->refused_by_budget()) {
            ++tot.by_budget;
            ++tot.team_refused[team];
          } else if (r->decision().binding_result()->limit == s->rpm.get()) {
            ++tot.by_rpm;
          } else {
            ++tot.by_tpm;
          }
          continue;
        }
        ++tot.admitted;
        ++tot.users[u].admitted;
        rk::Usage used;  // what the provider reports
        used.input_uncached = prompt;
        used.output = rng() % (kMaxOutput + 1);
        // The settle gives the token limit back what the estimate held and
        // the call did not use, so a user's tokens are the used ones: what
        // the bound below is on.
        tot.users[u].tokens += used.total();
        auto settled = r->settle(used);
        if (!settled.ok()) {
          fmt::print(stderr, "instance {}: {}\n", instance,
                     settled.status().ToString());
          failed = true;
          return;
        }
        tot.team_settled[team] += settled->cost.nanos;
      }
    });
  }
  for (auto& th : threads) th.join();
  if (failed) return 1;
  InstanceTotals all;
  all.users.resize(n_users);
  for (const InstanceTotals& t : per_thread) {
    all.tried += t.tried;
    all.admitted += t.admitted;
    all.by_rpm += t.by_rpm;
    all.by_tpm += t.by_tpm;
    all.by_budget += t.by_budget;
    all.unavailable += t.unavailable;
    for (std::size_t u = 0; u < n_users; ++u) {
      all.users[u].admitted += t.users[u].admitted;
      all.users[u].tokens += t.users[u].tokens;
    }
    for (const auto& [team, n] : t.team_settled) all.team_settled[team] += n;
    for (const auto& [team, n] : t.team_refused) all.team_refused[team] += n;
  }
  std::string out =
      fmt::format("S {} {} {} {} {} {}\n", all.tried, all.admitted, all.by_rpm,
                  all.by_tpm, all.by_budget, all.unavailable);
  for (std::size_t u = 0; u < n_users; ++u) {
    out += fmt::format("U {} {} {}\n", u, all.users[u].admitted,
                       all.users[u].tokens);
  }
  for (const auto& [team, n] : all.team_settled) {
    out += fmt::format("T {} {}\n", team, n);
  }
  for (const auto& [team, n] : all.team_refused) {
    out += fmt::format("B {} {}\n", team, n);
  }
  for (std::string_view rest = out; !rest.empty();) {
    const ssize_t w = write(fd, rest.data(), rest.size());
    if (w <= 0) return 1;
    rest.remove_prefix(static_cast<std::size_t>(w));
  }
  return 0;
}

InstanceTotals parse(const std::string& text, std::size_t n_users) {
  InstanceTotals t;
  t.users.resize(n_users);
  std::size_t pos = 0;
  while (pos < text.size()) {
    const std::size_t nl = text.find('\n', pos);
    const std::string line = text.substr(pos, nl - pos);
    pos = nl == std::string::npos ? text.size() : nl + 1;
    char kind = 0;
    char name[128] = {};
    unsigned long long a = 0, b = 0, c = 0, d = 0, e = 0, f = 0;
    long long n = 0;
    if (std::sscanf(line.c_str(), "S %llu %llu %llu %llu %llu %llu", &a, &b, &c,
                    &d, &e, &f) == 6) {
      t.tried = a, t.admitted = b, t.by_rpm = c, t.by_tpm = d, t.by_budget = e,
      t.unavailable = f;
    } else if (std::sscanf(line.c_str(), "U %llu %llu %llu", &a, &b, &c) == 3 &&
               a < n_users) {
      t.users[a] = {b, c};
    } else if (std::sscanf(line.c_str(), "%c %127s %lld", &kind, name, &n) ==
                   3 &&
               (kind == 'T' || kind == 'B')) {
      if (kind == 'T') t.team_settled[name] = n;
      if (kind == 'B') t.team_refused[name] = static_cast<std::uint64_t>(n);
    }
  }
  return t;
}

}  // namespace

int run_redis_demo(const std::string& where, double seconds,
                   std::size_t n_users) {
  const std::size_t colon = where.rfind(':');
  if (colon == std::string::npos) {
    fmt::print(stderr, "gateway_demo: --redis wants host:port, got {}\n",
               where);
    return 2;
  }
  const std::string host = where.substr(0, colon);
  const int port = std::atoi(where.c_str() + colon + 1);
  // A fresh namespace per run: its keys expire by themselves.
  const std::string prefix =
      fmt::format("rk-demo-{}-{}:", getpid(),
                  std::chrono::system_clock::now().time_since_epoch().count());
  {
    // Fail early, in the parent, when Redis is not there.
    absl::StatusOr<Setup> s = connect(host, port, prefix);
    if (!s.ok()) {
      fmt::print(stderr, "gateway_demo: Redis at {}: {}\n", where,
                 s.status().ToString());
      return 1;
    }
  }
  fmt::print(
      "ratekeeper gateway demo on Redis {}: 2 instances x {} threads, {} "
      "users in teams of {}, {:.0f} s of real time\n"
      "limits per user: {} requests/min (sliding window), {} tokens/min "
      "(token bucket); per team: ${}.{:02} a day; all decided in Redis, "
      "on Redis's clock\n\n",
      where, kThreads, n_users, kTeamSize, seconds, kRpm, kTpm,
      kTeamCents / 100, kTeamCents % 100);
  std::fflush(stdout);
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<InstanceTotals> inst;
  pid_t pids[2];
  int fds[2];
  for (int i = 0; i < 2; ++i) {
    int p[2];
    if (pipe(p) != 0) return 1;
    pids[i] = fork();
    if (pids[i] < 0) return 1;
    if (pids[i] == 0) {
      close(p[0]);
      _exit(run_instance(host, port, prefix, i, seconds, n_users, p[1]));
    }
    close(p[1]);
    fds[i] = p[0];
  }
  bool ok = true;
  for (int i = 0; i < 2; ++i) {
    std::string text;
    char buf[4096];
    for (ssize_t n; (n = read(fds[i], buf, sizeof buf)) > 0;) {
      text.append(buf, static_cast<std::size_t>(n));
    }
    close(fds[i]);
    int status = 0;
    waitpid(pids[i], &status, 0);
    ok = ok && WIFEXITED(status) && WEXITSTATUS(status) == 0;
    inst.push_back(parse(text, n_users));
  }
  if (!ok) {
    fmt::print(stderr, "gateway_demo: an instance failed\n");
    return 1;
  }
  const double elapsed =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0)
          .count();

  fmt::print("{:<10} {:>8} {:>9} {:>9} {:>9} {:>10} {:>12}\n", "instance",
             "tried", "admitted", "rpm-deny", "tpm-deny", "budget-deny",
             "redis-away");
  for (int i = 0; i < 2; ++i) {
    const InstanceTotals& t = inst[static_cast<std::size_t>(i)];
    fmt::print("{:<10} {:>8} {:>9} {:>9} {:>9} {:>10} {:>12}\n", i, t.tried,
               t.admitted, t.by_rpm, t.by_tpm, t.by_budget, t.unavailable);
  }
  const std::uint64_t calls = inst[0].tried + inst[1].tried;
  fmt::print(
      "{} decisions in {:.1f} s: {:.0f} per second (a reserve is one Redis "
      "round trip, an admitted call's settle one more)\n",
      calls, elapsed, static_cast<double>(calls) / elapsed);

  // Per user, both instances together within each limit's bound over the
  // run: a sliding window of 60 per minute admits at most 60 x (1 + T/60 s)
  // in T seconds, a bucket its burst plus its rate x T.
  const double minutes = elapsed / 60.0;
  const auto rpm_bound =
      static_cast<std::uint64_t>(std::ceil(kRpm * (1.0 + minutes)));
  const auto tpm_bound = static_cast<std::uint64_t>(
      std::ceil(static_cast<double>(kTpm) * (1.0 + minutes)));
  std::uint64_t worst_requests = 0, worst_tokens = 0, shared_users = 0;
  for (std::size_t u = 0; u < n_users; ++u) {
    const std::uint64_t req =
        inst[0].users[u].admitted + inst[1].users[u].admitted;
    const std::uint64_t tok = inst[0].users[u].tokens + inst[1].users[u].tokens;
    worst_requests = std::max(worst_requests, req);
    worst_tokens = std::max(worst_tokens, tok);
    if (inst[0].users[u].admitted > 0 && inst[1].users[u].admitted > 0) {
      ++shared_users;
    }
    if (req > rpm_bound || tok > tpm_bound) {
      fmt::print(stderr, "gateway_demo: {} admitted {} requests, {} tokens\n",
                 user_id(u), req, tok);
      ok = false;
    }
  }
  fmt::print(
      "\nPer user, both instances together: at most {} requests (bound {}) "
      "and {} tokens used (bound {}); {} of {} users were served by both "
      "instances.\nPer-process limiters would have let each instance admit "
      "as much again.\n",
      worst_requests, rpm_bound, worst_tokens, tpm_bound, shared_users,
      n_users);

  // The books: Redis's budget of every team equals what both instances'
  // settlements add up to, to the nano-dollar.
  absl::StatusOr<Setup> s = connect(host, port, prefix);
  if (!s.ok()) return 1;
  std::int64_t total = 0;
  std::size_t teams = 0, stopped = 0;
  for (std::size_t u = 0; u < n_users; u += kTeamSize) {
    const std::string team = team_of(u);
    ++teams;
    std::int64_t settled = 0;
    for (const auto& i : inst) {
      const auto it = i.team_settled.find(team);
      if (it != i.team_settled.end()) settled += it->second;
    }
    const absl::StatusOr<std::uint64_t> books =
        s->acct->spent("team_day", {.team = team});
    if (!books.ok() || static_cast<std::int64_t>(*books) != settled) {
      fmt::print(stderr, "gateway_demo: {}: Redis holds {}, settled {}\n", team,
                 books.ok() ? std::to_string(*books) : "?", settled);
      ok = false;
    }
    total += settled;
    if (inst[0].team_refused.count(team) + inst[1].team_refused.count(team) >
        0) {
      ++stopped;
    }
  }
  fmt::print(
      "Budgets: {} teams spent ${:.4f} in all; {} were stopped by their "
      "${}.{:02} budget; every team's budget in Redis equals the sum of its "
      "settlements in both instances.\n",
      teams, static_cast<double>(total) / 1e9, stopped, kTeamCents / 100,
      kTeamCents % 100);
  return ok ? 0 : 1;
}
