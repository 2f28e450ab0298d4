// Redis in production (issue 16): a Cluster master SIGKILLed under load and
// its replica promoted; what asynchronous replication loses, and WAIT;
// bounded pools under a slowdown; a breaker that probes a Redis that is
// back. Every test starts its own servers on loopback.
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <mutex>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "ratekeeper/store/redis.hpp"
#include "redis_server.hpp"
#include "redis_wait.hpp"
#include "test_util.hpp"

using namespace ratekeeper;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;
using std::chrono::seconds;

namespace {

std::int64_t ns_of(Clock::time_point t) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             t.time_since_epoch())
      .count();
}
double ms_between(std::int64_t from_ns, std::int64_t to_ns) {
  return static_cast<double>(to_ns - from_ns) / 1e6;
}

// `n` keys of limit `name` whose slots the node on `port` serves.
std::vector<std::string> keys_on(RedisClient& c, std::string_view prefix,
                                 std::string_view name, int port,
                                 std::size_t n) {
  const std::string want = "127.0.0.1:" + std::to_string(port);
  std::vector<std::string> out;
  for (int k = 0; out.size() < n && k < 100'000; ++k) {
    std::string key = "k" + std::to_string(k);
    if (c.node_of(redis_key(prefix, name, "", key)) == want) {
      out.push_back(std::move(key));
    }
  }
  REQUIRE(out.size() == n);
  return out;
}

double quantile_ms(std::vector<std::int64_t> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const auto i =
      static_cast<std::size_t>(q * static_cast<double>(v.size() - 1));
  return static_cast<double>(v[i]) / 1e6;
}

// The loopback TCP connections this process (and any other) holds to
// `port`, as the kernel lists them (/proc/net/tcp): an oracle for the
// client's own count. Established, connecting or half-closed by the peer.
int connections_to(int port) {
  std::ifstream in("/proc/net/tcp");
  std::string line;
  std::getline(in, line);  // the header
  int n = 0;
  while (std::getline(in, line)) {
    std::istringstream fields(line);
    std::string sl, local, remote, state, queues, timer, retr, uid, tout;
    std::string inode;
    fields >> sl >> local >> remote >> state >> queues >> timer >> retr >>
        uid >> tout >> inode;
    const std::size_t colon = remote.find(':');
    if (colon == std::string::npos) continue;
    const int rport = static_cast<int>(
        std::strtol(remote.substr(colon + 1).c_str(), nullptr, 16));
    // A socket a process holds (inode 0: closed by its process, orphaned
    // in the kernel until the close completes).
    if (rport == port && inode != "0" &&
        (state == "01" || state == "02" || state == "08")) {
      ++n;
    }
  }
  return n;
}

}  // namespace

TEST_CASE(
    "Cluster failover: a master SIGKILLed under load, its replica promoted: "
    "its slots resume, the other masters never notice",
    "[redis][i16][failover]") {
  rk_test::RedisCluster cluster(/*replicas=*/true);
  // The client learns the cluster from the master about to die (the hard
  // case: its first node is the dead one). Time-outs generous: a killed
  // node refuses at once, and the other masters' calls must not be lost
  // to a loaded machine.
  auto client = RedisClient::create({.port = cluster.port(0),
                                     .prefix = "rkf:",
                                     .connect_timeout = seconds(1),
                                     .command_timeout = seconds(2),
                                     .cluster = true})
                    .value();
  // A bucket that never runs dry here (one token a minute back, a million
  // in it): every refusal is the fail mode's (kClosed), and what Redis
  // took from a key is what its peek says is gone.
  constexpr Cost kBurst = 1'000'000;
  auto limit =
      RedisLimit<TokenBucket>::create(
          {.name = "fo"}, TokenBucket::create(per_minute(1), kBurst).value(),
          client, {.fail = FailMode::kClosed})
          .value();
  const std::vector<std::string> dead =
      keys_on(*client, "rkf:", "fo", cluster.port(0), 4);
  std::vector<std::string> live =
      keys_on(*client, "rkf:", "fo", cluster.port(1), 4);
  for (auto& k : keys_on(*client, "rkf:", "fo", cluster.port(2), 4)) {
    live.push_back(std::move(k));
  }
  const std::size_t nkeys = dead.size() + live.size();

  std::atomic<bool> stop{false};
  std::atomic<std::int64_t> kill_ns{std::numeric_limits<std::int64_t>::max()};
  std::atomic<std::int64_t> promote_ns{
      std::numeric_limits<std::int64_t>::max()};
  std::atomic<std::int64_t> resumed_ns{0};
  std::vector<std::atomic<std::uint64_t>> acks(nkeys);
  std::atomic<std::uint64_t> live_calls{0}, live_refused{0}, dead_refused{0},
      dead_refused_between{0}, dead_admitted_between{0};
  struct Sample {
    std::int64_t at_ns, latency_ns;
  };
  std::mutex samples_mu;
  std::vector<Sample> live_samples;
  constexpr int kThreads = 4;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::vector<Sample> mine;
      // Paced: one call every 250 us at most, so that the other masters'
      // rate is the same before and after the kill (the dead master's
      // calls, answered at once by the fail mode, would otherwise speed
      // the loop up and load the machine more after the kill than before).
      auto next = Clock::now();
      for (std::size_t i = static_cast<std::size_t>(t);
           !stop.load(std::memory_order_relaxed); ++i) {
        next += std::chrono::microseconds(250);
        std::this_thread::sleep_until(next);
        const std::size_t k = i % nkeys;
        const bool on_dead = k < dead.size();
        const std::string& key = on_dead ? dead[k] : live[k - dead.size()];
        const std::int64_t start = ns_of(Clock::now());
        const Decision d = limit->acquire(key, 1, Nanos{0});
        const std::int64_t end = ns_of(Clock::now());
        if (d.allowed) acks[k].fetch_add(1);
        if (!on_dead) {
          mine.push_back({start, end - start});
          live_calls.fetch_add(1);
          if (!d.allowed) live_refused.fetch_add(1);
          continue;
        }
        if (!d.allowed) dead_refused.fetch_add(1);
        const bool between = start > kill_ns.load() && end < promote_ns.load();
        if (between) {
          (d.allowed ? dead_admitted_between : dead_refused_between)
              .fetch_add(1);
        }
        if (d.allowed && start >= promote_ns.load()) {
          std::int64_t none = 0;
          resumed_ns.compare_exchange_strong(none, end);
        }
      }
      std::lock_guard<std::mutex> lock(samples_mu);
      live_samples.insert(live_samples.end(), mine.begin(), mine.end());
    });
  }
  const auto dead_acks = [&] {
    std::uint64_t n = 0;
    for (std::size_t k = 0; k < dead.size(); ++k) n += acks[k].load();
    return n;
  };
  // Enough of the other masters' calls for a p99 (at least 2,000, over at
  // least 1.25 s; a slow sanitizer build takes longer), with a deadline.
  const auto enough_calls = [&](std::uint64_t from, Clock::time_point until) {
    const auto give_up = Clock::now() + seconds(60);
    while (live_calls.load() < from + 2'000 || Clock::now() < until) {
      REQUIRE(Clock::now() < give_up);
      std::this_thread::sleep_for(milliseconds(5));  // a poll
    }
  };
  // Load for a while (the "before" latencies), then the master dies; 250
  // ms of its admissions before that are the window the loss bound below
  // allows for replication lag.
  enough_calls(0, Clock::now() + milliseconds(1'250));
  const std::uint64_t acks_window_start = dead_acks();
  std::this_thread::sleep_for(milliseconds(250));
  cluster.node(0).stop(SIGKILL);  // returns once the master is reaped
  kill_ns = ns_of(Clock::now());
  const std::uint64_t acks_at_kill = dead_acks();
  // The fail mode answers its keys until the replica is promoted: for 500
  // ms at least, and until it has answered some (on a loaded machine the
  // callers may not run in any given 500 ms), with a deadline.
  {
    const auto until = Clock::now() + milliseconds(500);
    REQUIRE(rk_test::eventually([&] {
      return dead_refused_between.load() != 0 && Clock::now() >= until;
    }));
  }
  promote_ns = ns_of(Clock::now());
  const std::int64_t sent_ns = ns_of(cluster.takeover(3));
  const std::int64_t master_ns = ns_of(Clock::now());
  const auto deadline = Clock::now() + seconds(30);
  while (resumed_ns.load() == 0) {
    REQUIRE(Clock::now() < deadline);
    std::this_thread::sleep_for(milliseconds(5));  // a poll
  }
  // Load on the new topology for a while (the "after" latencies).
  enough_calls(live_calls.load(), Clock::now() + milliseconds(750));
  stop = true;
  for (auto& th : threads) th.join();

  const double resume_ms = ms_between(sent_ns, resumed_ns.load());
  std::vector<std::int64_t> before, after, gap, resumed;
  for (const Sample& s : live_samples) {
    (s.at_ns < kill_ns.load() ? before : after).push_back(s.latency_ns);
    if (s.at_ns >= kill_ns.load()) {
      (s.at_ns < resumed_ns.load() ? gap : resumed).push_back(s.latency_ns);
    }
  }
  std::printf(
      "[i16] p99 while the master was away %.3f ms (%zu calls), "
      "after the resume %.3f ms (%zu calls); p50 before %.3f, after "
      "%.3f\n",
      quantile_ms(gap, 0.99), gap.size(), quantile_ms(resumed, 0.99),
      resumed.size(), quantile_ms(before, 0.5), quantile_ms(after, 0.5));
  const double p99_before = quantile_ms(before, 0.99);
  const double p99_after = quantile_ms(after, 0.99);
  // Replication loss: what each dead-master key's acknowledged admissions
  // exceed what the promoted replica took from it (its peek).
  std::uint64_t lost = 0;
  for (std::size_t k = 0; k < nkeys; ++k) {
    const std::string& key = k < dead.size() ? dead[k] : live[k - dead.size()];
    const Decision p = limit->peek(key, 0, Nanos{0});
    INFO("key " << key << ": " << p.remaining << " left, " << acks[k].load()
                << " admitted");
    REQUIRE(limit->fallbacks() == dead_refused.load());  // peek answered
    const std::uint64_t taken = kBurst - p.remaining;
    if (k < dead.size()) {
      lost += acks[k].load() > taken ? acks[k].load() - taken : 0;
    } else {
      CHECK(taken == acks[k].load());  // the other masters lost nothing
    }
  }
  std::printf(
      "[i16] cluster failover: decisions for the dead master's slots "
      "resumed %.1f ms after CLUSTER FAILOVER TAKEOVER was sent (%.1f ms "
      "after the replica said master); other masters: %zu calls before the "
      "kill, %zu after, p99 %.3f ms before, %.3f ms after, %llu refused; "
      "fail mode between kill and promotion: %llu answers; %llu slot map "
      "reads; replication loss: %llu admissions (of %llu in the last 250 ms "
      "before the kill)\n",
      resume_ms, ms_between(master_ns, resumed_ns.load()), before.size(),
      after.size(), p99_before, p99_after,
      static_cast<unsigned long long>(live_refused.load()),
      static_cast<unsigned long long>(dead_refused_between.load()),
      static_cast<unsigned long long>(client->slot_refreshes()),
      static_cast<unsigned long long>(lost),
      static_cast<unsigned long long>(acks_at_kill - acks_window_start));
  std::fflush(stdout);
  // Decisions for its slots resume within 2 s of the promotion.
  CHECK(resume_ms <= 2'000.0);
  // The other masters' keys: no error, no fail-mode answer, and a p99
  // within twice the one before the kill, or a floor of 10 ms where that
  // is more: on a loaded 2-core machine (four client threads, six
  // redis-servers) the scheduler, not the client, sets a p99 below it
  // (runs here: 0.38 ms before, 0.39 ms after on a quiet moment; 2 to 7 ms
  // in one phase or another, before the kill too, at a load average of 6
  // to 20). The
  // sanitizer presets (RATEKEEPER_TEST_SCALE < 1) get 40 ms.
  CHECK(live_refused.load() == 0);
  CHECK(before.size() >= 2'000);
  CHECK(after.size() >= 2'000);
  const double floor_ms = rk_test::scale() < 1.0 ? 40.0 : 10.0;
  CHECK(p99_after <= std::max(2.0 * p99_before, floor_ms));
  // The dead master's keys meanwhile: the fail mode's answers (kClosed
  // refuses), every one counted, none admitted.
  CHECK(dead_refused_between.load() > 0);
  CHECK(dead_admitted_between.load() == 0);
  CHECK(limit->fallbacks() == dead_refused.load());
  // The map was read again after the failure (not learned from MOVED only).
  CHECK(client->slot_refreshes() >= 1);
  CHECK(client->node_of(redis_key("rkf:", "fo", "", dead[0])) ==
        "127.0.0.1:" + std::to_string(cluster.port(3)));
  // The breakers answer for the nodes that serve slots now: the dead
  // master's, open, no longer counts; the promoted replica's is closed.
  CHECK(client->breaker_state() == detail::Breaker::State::kClosed);
  CHECK_FALSE(client->breaker_refuses());
  CHECK(client->breaker_state(redis_key("rkf:", "fo", "", dead[0])) ==
        detail::Breaker::State::kClosed);
  CHECK(client->breaker_trips() >= 1);  // the dead master's opened
  // What asynchronous replication lost: at most the admissions of the
  // replica's lag (here under 250 ms: lag x rate).
  CHECK(lost <= acks_at_kill - acks_window_start);
}

namespace {

// One replication lost on purpose: a key of master 0 takes 40 admissions,
// all replicated; then its replica is stopped and its link cut (the lag),
// 6 more calls are made (a batch of two among them), the master is SIGKILLed
// and the replica promoted. What the promoted replica still admits is counted
// by a client without WAIT, until Redis itself refuses.
struct LossRun {
  int acked_lagging = 0;    // admissions answered from Redis during the lag
  int refused_lagging = 0;  // fail-mode answers during the lag
  int admitted_after = 0;   // what the promoted replica still allowed
  double lag_ms = 0;
  bool breaker_closed_in_lag = false;
  std::string last_error;                        // the limit's, after the lag
  absl::Status unreplicated = absl::OkStatus();  // a plain script's, in it
};
constexpr Cost kLossBurst = 100;
constexpr int kLossLimit = static_cast<int>(kLossBurst);
constexpr int kReplicated = 40;
constexpr int kLagging = 6;

LossRun lose_replication(int wait_replicas) {
  rk_test::RedisCluster cluster(/*replicas=*/true);
  RedisOptions o{.port = cluster.port(1),
                 .prefix = "rkl:",
                 .connect_timeout = seconds(1),
                 .command_timeout = seconds(2),
                 .cluster = true};
  o.wait_replicas = wait_replicas;
  // Room for a replica's acknowledgement on a loaded machine (a sanitizer
  // run once missed 100 ms); each call of the lag waits this long.
  o.wait_timeout = milliseconds(500);
  auto client = RedisClient::create(o).value();
  const auto policy = TokenBucket::create(per_hour(1), kLossBurst).value();
  auto limit = RedisLimit<TokenBucket>::create({.name = "loss"}, policy, client,
                                               {.fail = FailMode::kClosed})
                   .value();
  const std::string key =
      keys_on(*client, "rkl:", "loss", cluster.port(0), 1).front();
  // Single calls, and a pipelined batch of two (one WAIT for the batch).
  const auto call_on = [&](RedisLimit<TokenBucket>& l, bool batch) {
    if (!batch) return std::vector<Decision>{l.acquire(key, 1, Nanos{0})};
    const RedisLimit<TokenBucket>::Request two[] = {{key, 1}, {key, 1}};
    return l.acquire_batch(two, Nanos{0});
  };
  const auto call = [&](bool batch) { return call_on(*limit, batch); };
  // The replicated admissions are not the subject: they go through the same
  // limit on a client that waits up to 10 s for each acknowledgement (an
  // ASan run under ctest's parallel load once missed 500 ms here).
  RedisOptions patient = o;
  patient.wait_timeout = seconds(10);
  patient.command_timeout = seconds(12);  // above wait_timeout
  auto patient_client = RedisClient::create(patient).value();
  auto replicated =
      RedisLimit<TokenBucket>::create({.name = "loss"}, policy, patient_client,
                                      {.fail = FailMode::kClosed})
          .value();
  for (int i = 0; i < kReplicated - 2; ++i) {
    REQUIRE(call_on(*replicated, false)[0].allowed);
  }
  for (const Decision& d : call_on(*replicated, true)) REQUIRE(d.allowed);
  cluster.wait_replicated(0);
  // The lag: the replica stopped, and the master's link to it cut, so that
  // nothing more reaches even its socket buffer.
  cluster.node(3).signal(SIGSTOP);
  REQUIRE(cluster.command(0, "CLIENT KILL TYPE replica") == "1");
  LossRun run;
  const auto lag_start = Clock::now();
  for (int i = 0; i < kLagging - 1; ++i) {
    for (const Decision& d : call(i == 0)) {
      (d.allowed ? run.acked_lagging : run.refused_lagging) += 1;
    }
  }
  run.last_error = limit->last_error();
  // Any script that writes, by the client itself (a key of the same node).
  const std::string other =
      redis_key("rkl:", "other", "",
                keys_on(*client, "rkl:", "other", cluster.port(0), 1).front());
  const RedisScript incr("return redis.call('INCR', KEYS[1])");
  const std::string_view incr_keys[] = {other};
  const auto incr_r = client->eval_ints(incr, incr_keys, {});
  run.unreplicated = incr_r.ok() ? absl::OkStatus() : incr_r.status();
  run.breaker_closed_in_lag =
      client->breaker_state(redis_key("rkl:", "loss", "", key)) ==
      detail::Breaker::State::kClosed;
  cluster.node(0).stop(SIGKILL);
  run.lag_ms =
      std::chrono::duration<double, std::milli>(Clock::now() - lag_start)
          .count();
  cluster.node(3).signal(SIGCONT);
  cluster.takeover(3);
  // The promoted replica's view, by a client without WAIT (the new master
  // has no replica left to wait for).
  auto checker = RedisClient::create({.port = cluster.port(1),
                                      .prefix = "rkl:",
                                      .connect_timeout = seconds(1),
                                      .command_timeout = seconds(2),
                                      .cluster = true})
                     .value();
  auto seen = RedisLimit<TokenBucket>::create({.name = "loss"}, policy, checker,
                                              {.fail = FailMode::kClosed})
                  .value();
  const auto deadline = Clock::now() + seconds(30);
  for (;;) {
    REQUIRE(Clock::now() < deadline);
    const std::uint64_t fallbacks = seen->fallbacks();
    const Decision d = seen->acquire(key, 1, Nanos{0});
    if (d.allowed) {
      ++run.admitted_after;
    } else if (seen->fallbacks() == fallbacks) {
      break;  // Redis's own refusal: the bucket is empty
    } else {
      // The checker's map still names the dead master: a poll while it
      // reads the map again.
      std::this_thread::sleep_for(milliseconds(5));
    }
  }
  return run;
}

}  // namespace

TEST_CASE(
    "Cluster failover: asynchronous replication loses what the replica "
    "never got (lag x rate); with WAIT nothing acknowledged is lost",
    "[redis][i16][failover]") {
  SECTION("without WAIT: the admissions of the lag are admitted again") {
    const LossRun r = lose_replication(0);
    const int over =
        kReplicated + r.acked_lagging + r.admitted_after - kLossLimit;
    std::printf(
        "[i16] replication loss without WAIT: %d admissions acknowledged "
        "during %.1f ms of replication lag; the promoted replica admitted "
        "%d above the limit of %d\n",
        r.acked_lagging, r.lag_ms, over, kLossLimit);
    std::fflush(stdout);
    CHECK(r.acked_lagging == kLagging);  // the master alone acknowledged
    CHECK(over == r.acked_lagging);      // every one of them lost
    CHECK(r.unreplicated.ok());          // no WAIT: the master's answer
  }
  SECTION("with WAIT 1: a write no replica acknowledged is the fail mode's") {
    const LossRun r = lose_replication(1);
    const int over =
        kReplicated + r.acked_lagging + r.admitted_after - kLossLimit;
    std::printf(
        "[i16] replication loss with wait_replicas = 1: %d admissions "
        "acknowledged during %.1f ms of lag (%d fail-mode answers); %d above "
        "the limit after the failover\n",
        r.acked_lagging, r.lag_ms, r.refused_lagging, over);
    std::fflush(stdout);
    CHECK(r.acked_lagging == 0);
    CHECK(r.refused_lagging == kLagging);
    // Why, and that the write may have run (the master ran it).
    CHECK(r.last_error.find("WAIT") != std::string::npos);
    CHECK(absl::IsUnavailable(r.unreplicated));
    CHECK(RedisClient::may_have_run(r.unreplicated));
    // A WAIT the replicas did not meet is the node's answer: its breaker
    // stays closed (no "Redis is away").
    CHECK(r.breaker_closed_in_lag);
    // Nothing acknowledged was lost: the promoted replica admitted exactly
    // what was left of the limit after the acknowledged admissions.
    CHECK(over == 0);
  }
}

TEST_CASE(
    "a slow Redis: a node's pool never opens more than max_connections; a "
    "call waits for one until its deadline, then the fail mode answers",
    "[redis][i16]") {
  rk_test::RedisServer server;
  constexpr std::size_t kMax = 4;
  const Nanos timeout = milliseconds(300);
  auto client = RedisClient::create({.port = server.port(),
                                     .prefix = "rkp:",
                                     .connect_timeout = seconds(1),
                                     .command_timeout = timeout,
                                     .pool_size = 2,
                                     // every call tries: the pool is the
                                     // subject, not the breaker
                                     .breaker_failures = 1'000'000,
                                     .max_connections = kMax})
                    .value();
  auto limit =
      RedisLimit<TokenBucket>::create(
          {.name = "pool"},
          TokenBucket::create(per_second(1'000'000), 1'000'000).value(), client,
          {.fail = FailMode::kClosed})
          .value();
  std::atomic<bool> stop{false};
  std::atomic<std::int64_t> slowest{0};
  std::atomic<std::uint64_t> refused{0}, calls{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 16; ++t) {
    threads.emplace_back([&, t] {
      const std::string key = "k" + std::to_string(t);
      while (!stop.load()) {
        const auto start = Clock::now();
        if (!limit->acquire(key, 1, Nanos{0}).allowed) refused.fetch_add(1);
        calls.fetch_add(1);
        const std::int64_t took = (Clock::now() - start).count();
        std::int64_t seen = slowest.load();
        while (took > seen && !slowest.compare_exchange_weak(seen, took)) {
        }
      }
    });
  }
  std::atomic<int> most{0};
  std::atomic<bool> sampling{true};
  std::thread sampler([&] {
    while (sampling.load()) {
      // /proc/net/tcp is not one snapshot: a socket closed and another
      // opened while it is read may both be listed. A connection the pool
      // really holds is there in two reads in a row.
      const int a = connections_to(server.port());
      const int b = connections_to(server.port());
      most = std::max(most.load(), std::min(a, b));
      std::this_thread::sleep_for(milliseconds(2));  // a sampling period
    }
  });
  // The callers under way (320 calls made), with a deadline.
  REQUIRE(rk_test::eventually([&] { return calls.load() >= 16 * 20; }));
  server.signal(SIGSTOP);  // the slowdown: every call now waits
  std::this_thread::sleep_for(seconds(1));
  const std::uint64_t refused_in_pause = refused.load();
  server.signal(SIGCONT);
  rk_test::wait_answered(*client);
  stop = true;
  for (auto& th : threads) th.join();
  sampling = false;
  sampler.join();
  INFO(calls.load() << " calls, " << refused.load() << " refused, at most "
                    << most.load() << " connections, slowest "
                    << static_cast<double>(slowest.load()) / 1e6 << " ms");
  // 16 threads, a stalled server: at most max_connections connections.
  CHECK(most.load() <= static_cast<int>(kMax));
  CHECK(most.load() >= 1);
  // The calls beyond them waited for a connection until their deadline,
  // then the fail mode answered (counted): none waited without bound.
  CHECK(refused_in_pause > 0);
  CHECK(limit->fallbacks() == refused.load());
  // A call waits at most its time-out (here no call opens a connection
  // while the server is stalled; slack for a loaded machine).
  CHECK(slowest.load() <= (timeout + milliseconds(500)).count());
}

TEST_CASE(
    "the breaker probes: a Redis that is back is used within about one "
    "probe_interval, not after the breaker's open time",
    "[redis][i16]") {
  // The figure: a breaker open for 10 s kept answering by the fail
  // mode for up to 10 s after Redis was back. Here it opens for 10 s, and
  // the background PING (every 50 ms by default) closes it.
  rk_test::RedisServer server;
  const auto make = [&](Nanos probe) {
    RedisOptions o{.port = server.port(),
                   .prefix = "rkb:",
                   .connect_timeout = seconds(1),
                   .command_timeout = seconds(2),
                   .breaker_failures = 1,
                   .breaker_open = seconds(10),
                   .breaker_max_open = seconds(10)};
    o.probe_interval = probe;
    return RedisClient::create(o).value();
  };
  auto probing = make(milliseconds(50));
  auto silent = make(Nanos{0});  // no prober: the half-open call alone
  REQUIRE(probing->options().probe_interval == milliseconds(50));
  REQUIRE(probing->command({"PING"}).ok());
  REQUIRE(silent->command({"PING"}).ok());
  server.stop(SIGKILL);
  CHECK_FALSE(probing->command({"PING"}).ok());
  CHECK_FALSE(silent->command({"PING"}).ok());
  CHECK(probing->breaker_refuses());
  CHECK(silent->breaker_refuses());
  server.start();
  const auto back = Clock::now();
  const auto deadline = back + seconds(30);
  while (!probing->command({"PING"}).ok()) {
    REQUIRE(Clock::now() < deadline);
    std::this_thread::sleep_for(milliseconds(5));  // a poll
  }
  const double took_ms =
      std::chrono::duration<double, std::milli>(Clock::now() - back).count();
  std::printf(
      "[i16] breaker open for 10 s: Redis used again %.1f ms after it was "
      "back (probe_interval 50 ms)\n",
      took_ms);
  std::fflush(stdout);
  CHECK(probing->breaker_state() == detail::Breaker::State::kClosed);
  // About one interval; the bound leaves room for a loaded machine, and is
  // a tenth of the open time the breaker alone would keep.
  CHECK(took_ms < 1'000.0);
  // The control: without the prober the breaker still refuses.
  CHECK(silent->breaker_refuses());
  CHECK_FALSE(silent->command({"PING"}).ok());
  CHECK(silent->breaker_trips() == 1);
}

TEST_CASE("create refuses failover options it cannot honour", "[redis][i16]") {
  const auto code = [](const RedisOptions& o) {
    return RedisClient::create(o).status().code();
  };
  const auto invalid = absl::StatusCode::kInvalidArgument;
  RedisOptions o;
  o.max_connections = 0;
  CHECK(code(o) == invalid);
  o = {};
  o.probe_interval = Nanos{-1};
  CHECK(code(o) == invalid);
  o = {};
  o.slots_refresh_interval = Nanos{-1};
  CHECK(code(o) == invalid);
  o = {};
  o.wait_replicas = -1;
  CHECK(code(o) == invalid);
  o = {};
  o.wait_replicas = 1;
  o.wait_timeout = Nanos{0};
  CHECK(code(o) == invalid);
  o.wait_timeout = o.command_timeout;  // WAIT's answer would come too late
  CHECK(code(o) == invalid);
  // Just below the time-out is accepted (nothing listens on port 1: the
  // client is returned all the same with start_unreachable).
  o.wait_timeout = o.command_timeout - Nanos{1};
  o.port = 1;
  o.start_unreachable = true;
  CHECK(RedisClient::create(o).ok());
}

TEST_CASE(
    "WAIT after a script Redis no longer holds: NOSCRIPT is seen even when "
    "WAIT's answer comes in a later read, and the script runs from source",
    "[redis][i16]") {
  // A server with no replica: WAIT 1 answers 0 only at its time-out, so
  // its reply always arrives after the EVALSHA's, in a read of its own.
  // The EVALSHA's error must be judged on its own bytes: a reader that
  // lets WAIT's answer land over them once took "-NOSCRIPT ..." for
  // "1\r\nCRIPT ..." and failed the call instead of running the source.
  rk_test::RedisServer server;
  RedisOptions o{.port = server.port(),
                 .prefix = "rkn:",
                 .connect_timeout = seconds(5),
                 .command_timeout = seconds(5)};
  o.wait_replicas = 1;
  o.wait_timeout = milliseconds(50);
  auto client = RedisClient::create(o).value();
  const auto policy = TokenBucket::create(per_hour(1), 10).value();
  auto limit = RedisLimit<TokenBucket>::create({.name = "ns"}, policy, client,
                                               {.fail = FailMode::kClosed})
                   .value();
  // A client without WAIT, to read what Redis holds.
  auto plain = RedisClient::create({.port = server.port(),
                                    .prefix = "rkn:",
                                    .connect_timeout = seconds(5),
                                    .command_timeout = seconds(5)})
                   .value();
  auto reader = RedisLimit<TokenBucket>::create({.name = "ns"}, policy, plain,
                                                {.fail = FailMode::kClosed})
                    .value();
  // The first call loads the script (its SHA is then known); no replica
  // acknowledges it, so its answer is the fail mode's, but it ran.
  const std::uint64_t fresh = reader->peek("u", 1, Nanos{0}).remaining;
  CHECK_FALSE(limit->acquire("u", 1, Nanos{0}).allowed);
  CHECK(limit->last_error().find("WAIT") != std::string::npos);
  CHECK(reader->peek("u", 1, Nanos{0}).remaining == fresh - 1);
  for (int round = 0; round < 3; ++round) {
    REQUIRE(plain->command({"SCRIPT", "FLUSH"}).ok());
    const Decision d = limit->acquire("u", 1, Nanos{0});
    INFO("round " << round << ": " << limit->last_error());
    CHECK_FALSE(d.allowed);  // still no replica: the fail mode's answer
    // Why: the replicas, not a garbled error.
    CHECK(limit->last_error().find("WAIT") != std::string::npos);
    CHECK(limit->last_error().find("CRIPT") == std::string::npos);
    // NOSCRIPT was seen and the source run: the token is taken in Redis.
    CHECK(reader->peek("u", 1, Nanos{0}).remaining ==
          fresh - 2 - static_cast<std::uint64_t>(round));
  }
}
