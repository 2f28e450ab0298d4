// TESTPLAN T2a-T2c: in-process concurrency, run more threads than cores so
// that threads are preempted between reading and writing a state. Built alone
// in the TSan preset (T2b) and with everything else under ASan+UBSan.
//
// Chains get the same treatment: 8 threads on three limits at once must
// never over-admit any of them, and roll-backs must give back exactly what
// they took.
//
// Budgets too: 8 threads reserve and settle through a group-commit ledger,
// retrying each other's request ids, and period bounds are cached under
// races (T6a, T6d, T7a under TSan).
//
// RATEKEEPER_TEST_SCALE scales the run time (1.0: 10 s per policy in T2a).
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <iterator>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "ratekeeper/budget/accountant.hpp"
#include "ratekeeper/budget/ledger.hpp"
#include "ratekeeper/budget/redis_accountant.hpp"
#include "ratekeeper/chain.hpp"
#include "ratekeeper/limiter.hpp"
#include "ratekeeper/policy/fixed_window.hpp"
#include "ratekeeper/policy/sliding_window.hpp"
#include "ratekeeper/policy/token_bucket.hpp"
#include "ratekeeper/store/in_memory.hpp"
#include "ratekeeper/store/redis.hpp"
#include "ratekeeper/store/sharded.hpp"
#include "ratekeeper/tiers.hpp"
#include "redis_server.hpp"
#include "redis_wait.hpp"
#include "test_prices.hpp"
#include "test_util.hpp"

using namespace ratekeeper;
using rk_test::kMs;

namespace {

// A policy and a store, as one test type.
template <class P, template <class> class S>
struct Combo {
  using Policy = P;
  template <class State>
  using Store = S<State>;
};

constexpr int kThreads = 8;
constexpr int kZipfKeys = 1000;

template <class P>
P make_policy();
template <>
TokenBucket make_policy<TokenBucket>() {
  return TokenBucket::create(per(50, std::chrono::milliseconds(10)), 40)
      .value();
}
template <>
FixedWindow make_policy<FixedWindow>() {
  return FixedWindow::create(per(40, std::chrono::milliseconds(10))).value();
}
template <>
SlidingWindow make_policy<SlidingWindow>() {
  return SlidingWindow::create(per(40, std::chrono::milliseconds(10))).value();
}

// Key 0 is the hot key (30% of calls); keys 1..1000 follow Zipf(1.1).
class KeyPicker {
 public:
  KeyPicker() {
    double sum = 0;
    for (int k = 1; k <= kZipfKeys; ++k) {
      sum += 1.0 / std::pow(k, 1.1);
      cdf_.push_back(sum);
    }
    for (double& c : cdf_) c /= sum;
    for (int k = 0; k <= kZipfKeys; ++k)
      names_.push_back("key:" + std::to_string(k));
  }
  int pick(std::mt19937_64& rng) const {
    std::uniform_real_distribution<double> u(0, 1);
    if (u(rng) < 0.3) return 0;
    const double x = u(rng);
    const auto it = std::lower_bound(cdf_.begin(), cdf_.end(), x);
    return 1 + static_cast<int>(
                   std::min<std::ptrdiff_t>(it - cdf_.begin(), kZipfKeys - 1));
  }
  const std::string& name(int k) const {
    return names_[static_cast<std::size_t>(k)];
  }

 private:
  std::vector<double> cdf_;
  std::vector<std::string> names_;
};

std::uint64_t attempt_seed(std::uint64_t base, int step, int worker) {
  return base * 1'000'003u + static_cast<std::uint64_t>(step) * 131u +
         static_cast<std::uint64_t>(worker);
}

// T2a, driven clock: at each step the driver moves time, then 8 workers make
// a seeded set of cost-1 calls at that instant. At one instant the number a
// key admits is min(calls, capacity) whatever the order, so the total per key
// must equal a sequential replay of the same calls exactly.
template <class P, template <class> class S>
void driven_clock_run(std::uint64_t seed, double seconds) {
  const KeyPicker keys;
  ManualClock clock(std::chrono::seconds(1));
  Limiter<P, S, ManualClock> lim(make_policy<P>(), clock);
  constexpr int kCallsPerStep = 150;
  std::vector<std::int64_t> deltas;
  std::vector<std::vector<std::uint64_t>> admitted(
      kThreads, std::vector<std::uint64_t>(kZipfKeys + 1, 0));
  std::atomic<bool> stop{false};
  int step = 0;
  int phase = 0;
  std::mt19937_64 time_rng(seed);
  // The completion step runs in one thread while all others wait: it is
  // where the driver moves the clock, on every other phase (the one that
  // releases the workers).
  auto on_phase = [&]() noexcept {
    if (++phase % 2 == 0 || stop.load(std::memory_order_relaxed)) return;
    const auto d = static_cast<std::int64_t>(time_rng() % (3 * kMs));
    deltas.push_back(d);
    clock.advance(Nanos{d});
    ++step;
  };
  std::barrier sync(kThreads + 1, on_phase);
  std::vector<std::thread> workers;
  for (int w = 0; w < kThreads; ++w) {
    workers.emplace_back([&, w] {
      for (;;) {
        sync.arrive_and_wait();  // the clock has moved (or we stop)
        if (stop.load(std::memory_order_acquire)) return;
        std::mt19937_64 rng(attempt_seed(seed, step, w));
        for (int i = 0; i < kCallsPerStep; ++i) {
          const int k = keys.pick(rng);
          admitted[static_cast<std::size_t>(w)][static_cast<std::size_t>(k)] +=
              lim.acquire(keys.name(k)).allowed;
        }
        sync.arrive_and_wait();  // every call of this step is done
      }
    });
  }
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  // At least 12 steps however slow the machine (qemu-user, a loaded CI
  // host): the deadline bounds the time, not the work a run must do.
  for (int done = 0; done < 12 || std::chrono::steady_clock::now() < deadline;
       ++done) {
    sync.arrive_and_wait();  // release this step (the clock moved)
    sync.arrive_and_wait();  // wait for it to finish
  }
  stop.store(true, std::memory_order_release);
  sync.arrive_and_wait();
  for (auto& t : workers) t.join();
  const int steps = step;
  REQUIRE(steps > 10);

  // Sequential replay of exactly the same calls at the same instants.
  ManualClock seq_clock(std::chrono::seconds(1));
  Limiter<P, InMemoryStore, ManualClock> seq(make_policy<P>(), seq_clock);
  std::vector<std::uint64_t> want(kZipfKeys + 1, 0);
  for (int s = 1; s <= steps; ++s) {
    seq_clock.advance(Nanos{deltas[static_cast<std::size_t>(s - 1)]});
    for (int w = kThreads - 1; w >= 0; --w) {  // another order on purpose
      std::mt19937_64 rng(attempt_seed(seed, s, w));
      for (int i = 0; i < kCallsPerStep; ++i) {
        const int k = keys.pick(rng);
        want[static_cast<std::size_t>(k)] += seq.acquire(keys.name(k)).allowed;
      }
    }
  }
  std::uint64_t total = 0, want_total = 0;
  for (int k = 0; k <= kZipfKeys; ++k) {
    std::uint64_t got = 0;
    for (int w = 0; w < kThreads; ++w) {
      got += admitted[static_cast<std::size_t>(w)][static_cast<std::size_t>(k)];
    }
    CAPTURE(k);
    REQUIRE(got == want[static_cast<std::size_t>(k)]);
    total += got;
    want_total += want[static_cast<std::size_t>(k)];
  }
  CHECK(total == want_total);
  CHECK(total > 0);
  INFO("steps " << steps << " admitted " << total);
  CHECK(want[0] > 0);
}

// The most a key may admit over [start, end] of real time.
std::uint64_t bound(const TokenBucket& p, std::int64_t start,
                    std::int64_t end) {
  const auto r = p.rate();
  return p.burst() +
         static_cast<std::uint64_t>(static_cast<detail::i128>(end - start) *
                                    r.count / r.period.count());
}
template <class W>
std::uint64_t bound(const W& p, std::int64_t start, std::int64_t end) {
  const std::int64_t period = p.rate().period.count();
  const auto windows =
      static_cast<std::uint64_t>(end / period - start / period + 1);
  return p.limit() * windows;
}

// T2a, real clock: 8 threads on SteadyClock, keys from the same mix; no key
// may admit more than its policy allows over the run's wall-clock span.
template <class P, template <class> class S>
void real_clock_run(std::uint64_t seed, double seconds) {
  const KeyPicker keys;
  const P policy = make_policy<P>();
  Limiter<P, S> lim(policy);
  std::vector<std::vector<std::uint64_t>> admitted(
      kThreads, std::vector<std::uint64_t>(kZipfKeys + 1, 0));
  const std::int64_t start = SteadyClock{}.now().count();
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  std::vector<std::thread> workers;
  for (int w = 0; w < kThreads; ++w) {
    workers.emplace_back([&, w] {
      std::mt19937_64 rng(attempt_seed(seed, 0, w));
      auto& mine = admitted[static_cast<std::size_t>(w)];
      // One batch at least, however late this thread starts (under
      // qemu-user 8 threads may start after the deadline).
      do {
        for (int i = 0; i < 64; ++i) {
          const int k = keys.pick(rng);
          mine[static_cast<std::size_t>(k)] +=
              lim.acquire(keys.name(k)).allowed;
        }
      } while (std::chrono::steady_clock::now() < deadline);
    });
  }
  for (auto& t : workers) t.join();
  const std::int64_t end = SteadyClock{}.now().count();
  const std::uint64_t most = bound(policy, start, end);
  std::uint64_t hot = 0;
  for (int k = 0; k <= kZipfKeys; ++k) {
    std::uint64_t got = 0;
    for (int w = 0; w < kThreads; ++w) {
      got += admitted[static_cast<std::size_t>(w)][static_cast<std::size_t>(k)];
    }
    CAPTURE(k, got, most);
    REQUIRE(got <= most);
    if (k == 0) hot = got;
  }
  CHECK(hot > 0);
}

// T2c: 8 threads released together on a key nobody has touched.
template <class P, template <class> class S>
void first_touch_run(int rounds) {
  ManualClock clock(std::chrono::seconds(5));
  Limiter<P, S, ManualClock> lim(make_policy<P>(), clock);
  const std::uint64_t capacity = lim.policy().limit();
  std::string key;
  std::barrier sync(kThreads + 1);
  std::vector<std::thread> workers;
  std::atomic<std::uint64_t> denied{0};
  for (int w = 0; w < kThreads; ++w) {
    workers.emplace_back([&] {
      for (int r = 0; r < rounds; ++r) {
        sync.arrive_and_wait();  // key is set
        if (!lim.acquire(key).allowed)
          denied.fetch_add(1, std::memory_order_relaxed);
        sync.arrive_and_wait();  // all 8 acquired
      }
    });
  }
  for (int r = 0; r < rounds; ++r) {
    key = "first-touch:" + std::to_string(r);
    sync.arrive_and_wait();
    sync.arrive_and_wait();
    const auto d = lim.peek(key, 0);
    REQUIRE(d.remaining == capacity - kThreads);
  }
  for (auto& t : workers) t.join();
  CHECK(denied.load() == 0);
  CHECK(lim.stats().keys == static_cast<std::uint64_t>(rounds));
}

// 10 s per policy and store, half on the driven clock, half on the real.
double t2a_seconds() { return 10.0 * rk_test::scale(); }

}  // namespace

#define RK_COMBOS                                                             \
  (Combo<TokenBucket, InMemoryStore>), (Combo<FixedWindow, InMemoryStore>),   \
      (Combo<SlidingWindow, InMemoryStore>),                                  \
      (Combo<TokenBucket, ShardedStore>), (Combo<FixedWindow, ShardedStore>), \
      (Combo<SlidingWindow, ShardedStore>)

TEMPLATE_TEST_CASE(
    "T2a: 8 threads on a driven clock admit exactly the "
    "sequential result",
    "[T2a][T2b][concurrency]", RK_COMBOS) {
  const std::uint64_t seed = rk_test::seed_or(0x72A);
  CAPTURE(seed);
  driven_clock_run<typename TestType::Policy, TestType::template Store>(
      seed, t2a_seconds() / 2);
}

TEMPLATE_TEST_CASE("T2a: 8 threads on the real clock never over-admit a key",
                   "[T2a][T2b][concurrency]", RK_COMBOS) {
  const std::uint64_t seed = rk_test::seed_or(0x72B);
  CAPTURE(seed);
  real_clock_run<typename TestType::Policy, TestType::template Store>(
      seed, t2a_seconds() / 2);
}

TEMPLATE_TEST_CASE("T2c: 8 threads first touching a key leave capacity - 8",
                   "[T2c][T2b][concurrency]", RK_COMBOS) {
  const int rounds =
      std::max(100, static_cast<int>(10'000 * std::min(1.0, rk_test::scale())));
  first_touch_run<typename TestType::Policy, TestType::template Store>(rounds);
}

// Chains: requests per user (sliding), tokens per user (bucket), tokens per
// team (fixed), acquired together by 8 threads on 8 users in 2 teams.
namespace {

constexpr int kChainUsers = 8;

struct ChainRig {
  SlidingWindow rpm_policy =
      SlidingWindow::create(per(30, std::chrono::milliseconds(10))).value();
  TokenBucket tpm_policy =
      TokenBucket::create(per(400, std::chrono::milliseconds(10)), 300).value();
  FixedWindow tpd_policy =
      FixedWindow::create(per(1500, std::chrono::milliseconds(20))).value();
  std::vector<std::string> users, teams;
  ChainRig() {
    for (int u = 0; u < kChainUsers; ++u)
      users.push_back("u" + std::to_string(u));
    teams = {"t0", "t1"};
  }
  const std::string& team_of(int u) const {
    return teams[static_cast<std::size_t>(u % 2)];
  }
};

template <template <class> class S>
struct ChainLimits {
  std::unique_ptr<PolicyLimit<SlidingWindow, S>> rpm;
  std::unique_ptr<PolicyLimit<TokenBucket, S>> tpm;
  std::unique_ptr<PolicyLimit<FixedWindow, S>> tpd;
  explicit ChainLimits(const ChainRig& rig)
      : rpm(make_limit<S>({.name = "rpm"}, rig.rpm_policy).value()),
        tpm(make_limit<S>({.name = "tpm", .unit = Unit::kTokens},
                          rig.tpm_policy)
                .value()),
        tpd(make_limit<S>({.name = "tpd", .unit = Unit::kTokens},
                          rig.tpd_policy)
                .value()) {}
};

// Per thread: what its admitted chains took, per user and per team.
struct ChainTally {
  std::vector<std::uint64_t> user_calls =
      std::vector<std::uint64_t>(kChainUsers, 0);
  std::vector<std::uint64_t> user_tokens =
      std::vector<std::uint64_t>(kChainUsers, 0);
  std::vector<std::uint64_t> team_tokens = std::vector<std::uint64_t>(2, 0);
  std::uint64_t refused = 0;
};

template <template <class> class S, class C>
void chain_call(Chain<C>& chain, ChainLimits<S>& l, const ChainRig& rig,
                std::mt19937_64& rng, ChainTally& t, Nanos now) {
  const int u = static_cast<int>(rng() % kChainUsers);
  const Cost tokens = 1 + rng() % 60;
  const std::string& user = rig.users[static_cast<std::size_t>(u)];
  const std::string& team = rig.team_of(u);
  // The order varies so that every limit refuses first some of the time.
  ChainItem items[3] = {{l.rpm.get(), user, 1},
                        {l.tpm.get(), user, tokens},
                        {l.tpd.get(), team, tokens}};
  std::shuffle(std::begin(items), std::end(items), rng);
  const ChainDecision d = chain.acquire_at(items, now);
  if (d.allowed) {
    ++t.user_calls[static_cast<std::size_t>(u)];
    t.user_tokens[static_cast<std::size_t>(u)] += tokens;
    t.team_tokens[static_cast<std::size_t>(u % 2)] += tokens;
  } else {
    ++t.refused;
  }
}

// Real clock: no user or team ever gets more than its limit allows over the
// run's span, on any of the three limits.
template <template <class> class S>
void chain_real_clock_run(std::uint64_t seed, double seconds) {
  const ChainRig rig;
  ChainLimits<S> l(rig);
  Chain<> chain;
  std::vector<ChainTally> tallies(kThreads);
  const std::int64_t start = SteadyClock{}.now().count();
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  std::vector<std::thread> workers;
  for (int w = 0; w < kThreads; ++w) {
    workers.emplace_back([&, w] {
      std::mt19937_64 rng(attempt_seed(seed, 1, w));
      // One batch at least, however late this thread starts (under
      // qemu-user 8 threads may start after the deadline).
      do {
        for (int i = 0; i < 64; ++i) {
          chain_call(chain, l, rig, rng, tallies[static_cast<std::size_t>(w)],
                     chain.now());
        }
      } while (std::chrono::steady_clock::now() < deadline);
    });
  }
  for (auto& t : workers) t.join();
  const std::int64_t end = SteadyClock{}.now().count();
  std::uint64_t admitted = 0, refused = 0;
  for (int u = 0; u < kChainUsers; ++u) {
    std::uint64_t calls = 0, tokens = 0;
    for (const ChainTally& t : tallies) {
      calls += t.user_calls[static_cast<std::size_t>(u)];
      tokens += t.user_tokens[static_cast<std::size_t>(u)];
    }
    CAPTURE(u, calls, tokens);
    REQUIRE(calls <= bound(rig.rpm_policy, start, end));
    REQUIRE(tokens <= bound(rig.tpm_policy, start, end));
    admitted += calls;
  }
  for (int t = 0; t < 2; ++t) {
    std::uint64_t tokens = 0;
    for (const ChainTally& tl : tallies) {
      tokens += tl.team_tokens[static_cast<std::size_t>(t)];
    }
    CAPTURE(t, tokens);
    REQUIRE(tokens <= bound(rig.tpd_policy, start, end));
  }
  for (const ChainTally& t : tallies) refused += t.refused;
  CHECK(admitted > 0);
  CHECK(refused > 0);
  // Every admitted chain is counted as allowed by all three limits.
  CHECK(l.rpm->counts().allowed == admitted);
  CHECK(l.tpm->counts().allowed == admitted);
  CHECK(l.tpd->counts().allowed == admitted);
}

// Frozen clock: at one instant nothing refills, so once the threads are
// done every key's remaining must be exactly its capacity minus what the
// admitted chains took: a roll-back that leaked or gave back twice shows.
template <template <class> class S>
void chain_frozen_clock_run(std::uint64_t seed, int rounds) {
  const ChainRig rig;
  ChainLimits<S> l(rig);
  ManualClock clock(std::chrono::hours(1));
  Chain<ManualClock> chain(clock);
  std::uint64_t vetoed_before = 0;
  for (int r = 0; r < rounds; ++r) {
    clock.advance(std::chrono::hours(1));  // every state starts afresh
    std::vector<ChainTally> tallies(kThreads);
    std::barrier go(kThreads);
    std::vector<std::thread> workers;
    for (int w = 0; w < kThreads; ++w) {
      workers.emplace_back([&, w] {
        std::mt19937_64 rng(attempt_seed(seed, r, w));
        go.arrive_and_wait();
        for (int i = 0; i < 40; ++i) {
          chain_call(chain, l, rig, rng, tallies[static_cast<std::size_t>(w)],
                     clock.now());
        }
      });
    }
    for (auto& t : workers) t.join();
    const Nanos now = clock.now();
    for (int u = 0; u < kChainUsers; ++u) {
      std::uint64_t calls = 0, tokens = 0;
      for (const ChainTally& t : tallies) {
        calls += t.user_calls[static_cast<std::size_t>(u)];
        tokens += t.user_tokens[static_cast<std::size_t>(u)];
      }
      const std::string& user = rig.users[static_cast<std::size_t>(u)];
      CAPTURE(r, u, calls, tokens);
      REQUIRE(calls <= rig.rpm_policy.limit());
      REQUIRE(tokens <= rig.tpm_policy.limit());
      REQUIRE(l.rpm->peek(user, 0, now).remaining ==
              rig.rpm_policy.limit() - calls);
      REQUIRE(l.tpm->peek(user, 0, now).remaining ==
              rig.tpm_policy.limit() - tokens);
    }
    for (int t = 0; t < 2; ++t) {
      std::uint64_t tokens = 0;
      for (const ChainTally& tl : tallies) {
        tokens += tl.team_tokens[static_cast<std::size_t>(t)];
      }
      CAPTURE(r, t, tokens);
      REQUIRE(tokens <= rig.tpd_policy.limit());
      REQUIRE(l.tpd->peek(rig.teams[static_cast<std::size_t>(t)], 0, now)
                  .remaining == rig.tpd_policy.limit() - tokens);
    }
  }
  // Roll-backs happened: the test exercised them.
  vetoed_before =
      l.rpm->counts().vetoed + l.tpm->counts().vetoed + l.tpd->counts().vetoed;
  CHECK(vetoed_before > 0);
}

}  // namespace

TEMPLATE_TEST_CASE("T2a: a chain of 3 limits on 8 threads never over-admits",
                   "[T2a][T2b][chain][concurrency]",
                   (Combo<TokenBucket, InMemoryStore>),
                   (Combo<TokenBucket, ShardedStore>)) {
  const std::uint64_t seed = rk_test::seed_or(0xC4A1);
  CAPTURE(seed);
  chain_real_clock_run<TestType::template Store>(seed, t2a_seconds() / 4);
}

TEMPLATE_TEST_CASE(
    "T2a: chain roll-backs give back exactly what they took, 8 threads",
    "[T2a][T2b][chain][concurrency]", (Combo<TokenBucket, InMemoryStore>),
    (Combo<TokenBucket, ShardedStore>)) {
  const std::uint64_t seed = rk_test::seed_or(0xC4A2);
  CAPTURE(seed);
  chain_frozen_clock_run<TestType::template Store>(
      seed, std::max(20, static_cast<int>(300 * rk_test::scale())));
}

// Tiers changed while 4 threads acquire through them: the snapshot swap and
// reconfigure() under TSan (T2b), and no call lost or failed meanwhile.
TEST_CASE("set_tier while 4 threads acquire", "[tiers][T2b][concurrency]") {
  auto spec = [](std::uint64_t rpm) {
    return std::vector<LimitSpec>{{{.name = "rpm"},
                                   Field::kUser,
                                   PolicyKind::kFixedWindow,
                                   per_minute(rpm)},
                                  {{.name = "tpm", .unit = Unit::kTokens},
                                   Field::kUser,
                                   PolicyKind::kTokenBucket,
                                   per_minute(1'000'000'000),
                                   1'000'000'000},
                                  {{.name = "tpd", .unit = Unit::kTokens},
                                   Field::kTeam,
                                   PolicyKind::kSlidingWindow,
                                   per_day(1'000'000'000)}};
  };
  // Limits no run can reach, however long a loaded machine stretches it
  // (at 10^6 a minute, 4 threads descheduled from the main one for a
  // while could exhaust the window: a CI failure).
  constexpr std::uint64_t kRpm = 1'000'000'000'000;
  TierTable<> tiers(ShardedOptions{.capacity = 1024});
  REQUIRE(tiers.set_tier("t", spec(kRpm)).ok());
  std::atomic<bool> stop{false};
  std::atomic<std::uint64_t> ok{0}, failed{0};
  std::vector<std::thread> threads;
  for (int w = 0; w < 4; ++w) {
    threads.emplace_back([&, w] {
      const std::string user = "u" + std::to_string(w);
      while (!stop.load(std::memory_order_relaxed)) {
        const auto d = tiers.acquire("t", {.user = user, .team = "x"}, 1);
        if (d.ok() && d->allowed) {
          ok.fetch_add(1, std::memory_order_relaxed);
        } else {
          failed.fetch_add(1, std::memory_order_relaxed);
        }
      }
    });
  }
  auto wait_for_calls = [&](std::uint64_t n) {
    while (ok.load(std::memory_order_relaxed) < n) std::this_thread::yield();
  };
  wait_for_calls(100);
  for (int i = 0; i < 200; ++i) {
    const std::uint64_t before = ok.load(std::memory_order_relaxed);
    REQUIRE(
        tiers.set_tier("t", spec(kRpm + static_cast<std::uint64_t>(i))).ok());
    wait_for_calls(before + 4);  // calls go on between changes
  }
  stop.store(true);
  for (auto& t : threads) t.join();
  CHECK(failed.load() == 0);
  CHECK(tiers.limits("t")[0]->limit() == kRpm + 199);
  // Reconfigured in place: one rpm limit all along, its count intact.
  CHECK(tiers.limits("t")[0]->counts().allowed == ok.load());
}

namespace {

// What request `n` uses: deterministic, so that every settle of one id
// (first or retried) carries the same usage.
Usage usage_of(std::uint64_t n) {
  Usage u;
  u.input_uncached = 1 + n % 97;
  u.output = n % 301;
  return u;
}

absl::Status add_two_budgets(Accountant<ManualClock>& a) {
  if (absl::Status st = a.add_budget(
          {"team", Field::kTeam, BudgetUnit::kNanoUsd, PeriodBudget::kMaxLimit,
           Period::calendar(PeriodKind::kMonth, "Europe/Paris").value()});
      !st.ok()) {
    return st;
  }
  return a.add_budget({"user", Field::kUser, BudgetUnit::kTokens,
                       PeriodBudget::kMaxLimit,
                       Period::calendar(PeriodKind::kDay).value()});
}

std::uint64_t spent(Limit* l, std::string_view key, Nanos now) {
  return PeriodBudget::kMaxLimit - l->peek(key, 0, now).remaining;
}

}  // namespace

TEST_CASE(
    "8 threads reserve and settle through a group-commit ledger, racing "
    "retries of each other's ids: exactly once, and the ledger replays",
    "[budget][T6a][T6d][T7a][concurrency]") {
  namespace fs = std::filesystem;
  const std::string path =
      (fs::temp_directory_path() /
       ("rk_conc_" + std::to_string(::getpid()) + "_ledger.jsonl"))
          .string();
  fs::remove(path);
  const int per_thread =
      std::max(300, static_cast<int>(3'000 * std::min(1.0, rk_test::scale())));
  const Nanos t0{1'796'083'200LL * 1'000'000'000};  // 2026-12-01 UTC
  ManualClock clock(t0);
  std::atomic<std::uint64_t> next_id{0};
  std::mutex settled_mu;
  std::set<std::uint64_t> settled;  // ids settled at least once
  std::atomic<int> mismatches{0};
  {
    Accountant<ManualClock> acct(rk_test::flat_prices(), clock,
                                 ShardedOptions{.capacity = 4096});
    REQUIRE(add_two_budgets(acct).ok());
    auto ledger = Ledger::open(
        path, {.durability = Durability::kGroupCommit,
               .group_commit_interval = std::chrono::microseconds(200)});
    REQUIRE(ledger.ok());
    acct.set_audit(ledger->get());
    std::vector<std::thread> threads;
    for (int w = 0; w < kThreads; ++w) {
      threads.emplace_back([&, w] {
        std::mt19937_64 rng(rk_test::seed_or(0xB0D6E7) +
                            static_cast<unsigned>(w));
        for (int i = 0; i < per_thread; ++i) {
          // One call in four retries an id another thread may be settling.
          const std::uint64_t issued = next_id.load();
          const std::uint64_t n = rng() % 4 == 0 && issued > 8
                                      ? issued - 1 - rng() % 8
                                      : next_id.fetch_add(1);
          // Subject holds views: the strings outlive it.
          const std::string user = absl::StrCat("u", n % 5);
          const std::string team = absl::StrCat("t", n % 2);
          const Subject who{.user = user, .team = team};
          auto r = acct.reserve(
              who, "m", {.prompt_tokens = 100, .max_output_tokens = 300},
              absl::StrCat("req-", n));
          // A retry of an id already settled never reaches the provider
          // again: refused, with the first settlement named (issue 13).
          if (!r.ok() &&
              r.status().code() == absl::StatusCode::kAlreadyExists) {
            continue;
          }
          if (!r.ok() || !r->granted()) {
            mismatches.fetch_add(1);
            continue;
          }
          if (rng() % 10 == 0) {
            r->release();  // failed before dispatch
            continue;
          }
          const Usage u = usage_of(n);
          const absl::StatusOr<Settlement> s = r->settle(u);
          if (!s.ok() ||
              s->cost.nanos != static_cast<std::int64_t>(u.total()) * 1'000) {
            mismatches.fetch_add(1);
            continue;
          }
          std::lock_guard<std::mutex> lock(settled_mu);
          settled.insert(n);
        }
      });
    }
    for (auto& t : threads) t.join();
    CHECK(mismatches.load() == 0);
    // Every budget holds exactly the sum over distinct settled ids.
    std::uint64_t team_expect[2] = {0, 0}, user_expect[5] = {0, 0, 0, 0, 0};
    for (const std::uint64_t n : settled) {
      team_expect[n % 2] += usage_of(n).total() * 1'000;
      user_expect[n % 5] += usage_of(n).total();
    }
    const std::vector<Limit*> b = acct.budgets();
    for (int t = 0; t < 2; ++t) {
      std::string key;
      REQUIRE(
          append_subject_key(Field::kTeam, {.team = absl::StrCat("t", t)}, key)
              .ok());
      CHECK(spent(b[0], key, clock.now()) == team_expect[t]);
    }
    for (int u = 0; u < 5; ++u) {
      std::string key;
      REQUIRE(
          append_subject_key(Field::kUser, {.user = absl::StrCat("u", u)}, key)
              .ok());
      CHECK(spent(b[1], key, clock.now()) == user_expect[u]);
    }
  }
  // The ledger written by 8 threads verifies, and replays to the same books.
  const absl::StatusOr<std::string> text = read_file(path);
  REQUIRE(text.ok());
  const VerifyResult v = verify_ledger(*text);
  CHECK(v.ok());
  CHECK_FALSE(v.torn_tail);
  Accountant<ManualClock> again(rk_test::flat_prices(), clock,
                                ShardedOptions{.capacity = 4096});
  REQUIRE(add_two_budgets(again).ok());
  REQUIRE(read_ledger(path, [&](const nlohmann::json& j) {
            return again.replay(j);
          }).ok());
  std::uint64_t total = 0;
  for (const std::uint64_t n : settled) total += usage_of(n).total() * 1'000;
  std::uint64_t replayed = 0;
  for (int t = 0; t < 2; ++t) {
    std::string key;
    REQUIRE(
        append_subject_key(Field::kTeam, {.team = absl::StrCat("t", t)}, key)
            .ok());
    replayed += spent(again.budgets()[0], key, clock.now());
  }
  CHECK(replayed == total);
  for (const std::uint64_t n : settled) {
    REQUIRE(again.find_settlement(absl::StrCat("req-", n)).has_value());
  }
  fs::remove(path);
}

TEST_CASE("4 threads read one calendar period's cached bounds as it turns",
          "[budget][concurrency]") {
  const Period shared =
      Period::calendar(PeriodKind::kDay, "America/New_York").value();
  const Nanos t0{1'772'928'000LL * 1'000'000'000};  // 2026-03-08 00:00 UTC
  const std::int64_t hour = 3'600LL * 1'000'000'000;
  const int rounds = std::max(
      2'000, static_cast<int>(50'000 * std::min(1.0, rk_test::scale())));
  std::atomic<int> wrong{0};
  std::vector<std::thread> threads;
  for (int w = 0; w < 4; ++w) {
    threads.emplace_back([&, w] {
      // A copy: copies share the cache. The reference has its own.
      const Period mine = shared;
      const Period reference =
          Period::calendar(PeriodKind::kDay, "America/New_York").value();
      std::mt19937_64 rng(static_cast<unsigned>(w) + 1);
      for (int i = 0; i < rounds; ++i) {
        // Two days around the spring DST jump: the cached day keeps turning.
        const Nanos t{t0.count() +
                      static_cast<std::int64_t>(rng() % 48) * hour +
                      static_cast<std::int64_t>(rng() % hour)};
        const Period::Span got = mine.span_of(t);
        const std::int64_t want = reference.index_of(t);
        if (got.index != want || got.start != reference.start_of(want) ||
            got.end != reference.start_of(want + 1) || t < got.start ||
            t >= got.end) {
          wrong.fetch_add(1);
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  CHECK(wrong.load() == 0);
}

TEST_CASE(
    "8 threads share one Redis client while its scripts are flushed and "
    "Redis restarts: exact while it answers, fail mode while it does not",
    "[redis][concurrency]") {
  rk_test::RedisServer server;
  auto client =
      RedisClient::create({.port = server.port(),
                           .prefix = "conc:",
                           .connect_timeout = std::chrono::seconds(1),
                           .command_timeout = std::chrono::seconds(2),
                           .pool_size = 4,
                           .breaker_open = std::chrono::milliseconds(50),
                           .breaker_max_open = std::chrono::milliseconds(200)})
          .value();
  const std::uint64_t burst = 400;
  auto limit =
      RedisLimit<TokenBucket>::create(
          {.name = "c"}, TokenBucket::create(per_hour(1), burst).value(),
          client, {.fail = FailMode::kClosed, .test_time = true})
          .value();
  RedisChain chain(client);
  const Nanos frozen{1'796'083'200'000'000'000};
  std::atomic<std::uint64_t> admitted{0}, refused{0};
  std::atomic<bool> stop{false};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      while (!stop.load()) {
        const ChainItem items[] = {{limit.get(), "k", 1}};
        const bool ok = t % 2 == 0 ? limit->acquire("k", 1, frozen).allowed
                                   : chain.acquire("", items, frozen).allowed;
        (ok ? admitted : refused).fetch_add(1);
      }
    });
  }
  for (int i = 0; i < 3; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(30));
    static_cast<void>(client->command({"SCRIPT", "FLUSH"}));
  }
  const std::uint64_t before_restart = admitted.load();
  server.stop(SIGKILL);
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  server.start();  // empty: the bucket is full again
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  stop = true;
  for (auto& th : threads) th.join();
  // Before the restart, at most the burst; after it, at most one more: the
  // new Redis starts empty. While it was away, only the fail mode answered.
  CHECK(before_restart <= burst);
  CHECK(admitted.load() <= 2 * burst);
  CHECK(limit->fallbacks() > 0);
  CHECK(refused.load() >= limit->fallbacks());
}

TEST_CASE(
    "8 threads on two Redis accountants race retries of each other's ids "
    "while Redis is killed and restarted with its AOF: the books equal the "
    "first settlement of every id",
    "[redis][budget][concurrency]") {
  char dir[] = "/tmp/rk_conc_aof_XXXXXX";
  REQUIRE(mkdtemp(dir) != nullptr);
  rk_test::RedisServer server(
      {"--dir", dir, "--appendonly", "yes", "--appendfsync", "always"});
  PriceTable prices;
  const TokenPrice p = TokenPrice::per_million_micros(1'000'000);
  REQUIRE(prices.set("m", {.base = {.input = p, .output = p}}).ok());
  std::vector<std::unique_ptr<RedisAccountant>> accts;
  for (int i = 0; i < 2; ++i) {
    // Time-outs are not the subject (a killed Redis refuses at once):
    // generous ones, so that slow fsyncs on a loaded machine do not reopen
    // a breaker after the restart.
    auto client = RedisClient::create(
                      {.port = server.port(),
                       .prefix = "conc:",
                       .connect_timeout = std::chrono::seconds(2),
                       .command_timeout = std::chrono::seconds(5),
                       .breaker_open = std::chrono::milliseconds(50),
                       .breaker_max_open = std::chrono::milliseconds(200)})
                      .value();
    accts.push_back(
        RedisAccountant::create(
            prices, client,
            {.journal_path = std::string(dir) + "/j" + std::to_string(i)})
            .value());
    REQUIRE(accts.back()
                ->add_budget(
                    {.name = "team",
                     .scope = Field::kTeam,
                     .limit = std::uint64_t{1} << 50,
                     .period = Period::calendar(PeriodKind::kMonth).value()},
                    {.fail = FailMode::kOpen})
                .ok());
  }
  // Ids 0..N-1, each settled by whichever thread gets there first with its
  // own usage; the first settlement of each id is what must be charged.
  constexpr int kIds = 400;
  std::vector<std::atomic<std::int64_t>> first(kIds);
  for (auto& f : first) f.store(-1);
  std::atomic<int> next{0};
  std::atomic<int> errors{0};
  std::vector<std::thread> threads;
  const Subject who{.team = "t", .org = "o"};
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(static_cast<std::uint64_t>(t) + 7);
      for (;;) {
        const int id = next.fetch_add(1) / 2;  // every id twice
        if (id >= kIds) return;
        RedisAccountant& a = *accts[static_cast<std::size_t>(t % 2)];
        auto r = a.reserve(who, "m", {10, 90}, "id-" + std::to_string(id));
        // The other thread's settle of this id came first: a new reserve
        // under it is refused (a retried call never reaches the provider
        // twice), nothing held.
        if (r.status().code() == absl::StatusCode::kAlreadyExists) continue;
        if (!r.ok() || !r->granted()) {
          errors.fetch_add(1);
          continue;
        }
        Usage u;
        u.input_uncached = 10;
        u.output = rng() % 100;
        const auto s = r->settle(u);
        if (!s.ok()) {
          errors.fetch_add(1);
          continue;
        }
        std::int64_t expected = -1;
        // The first to record an id's settlement; a later one must agree
        // unless Redis was away for one of them (then each got its own
        // pricing, and Redis keeps whichever it applied first).
        first[static_cast<std::size_t>(id)].compare_exchange_strong(
            expected, s->cost.nanos);
        std::this_thread::sleep_for(std::chrono::microseconds(200));
      }
    });
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(150));
  server.stop(SIGKILL);
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  server.start();  // its AOF: what Redis acknowledged survives
  for (auto& th : threads) th.join();
  for (auto& a : accts) {
    // Each client reaches Redis again once its breaker lets a probe
    // through; then its journal runs.
    rk_test::wait_answered(*a->client());
    const auto deadline =
        std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (!a->replay_journal().ok() &&
           std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    REQUIRE(a->journal_pending() == 0);
  }
  CHECK(errors.load() == 0);
  // Every id charged exactly once: the books are the sum, over ids, of the
  // settlement Redis recorded for each (the first it applied).
  std::uint64_t sum = 0;
  std::size_t agreed = 0;
  for (int id = 0; id < kIds; ++id) {
    const auto s = accts[1]->find_settlement(who, "id-" + std::to_string(id));
    REQUIRE(s.ok());
    REQUIRE(s->has_value());
    sum += static_cast<std::uint64_t>((*s)->cost.nanos);
    agreed += (*s)->cost.nanos == first[static_cast<std::size_t>(id)].load();
  }
  const std::uint64_t books = accts[0]->spent("team", who).value();
  INFO("journaled " << accts[0]->journaled() << " + " << accts[1]->journaled()
                    << "; first answers agreeing with Redis: " << agreed);
  CHECK(books == sum);
  const std::string rm = std::string("rm -rf ") + dir;
  CHECK(std::system(rm.c_str()) == 0);
}

// Issue 13 (case 7, free-running): 8 threads take from one hot key and
// settle their receipts below the take, while a ninth floods the store with
// new keys so that the hot key's slot is moved, evicted and reclaimed under
// them. Time is frozen, so nothing refills: whatever the interleaving, the
// final amounts of everything admitted (what each take was settled to) and
// what is left never exceed the burst (a give-back that landed twice, or on
// another key's state, would break it).
template <template <class> class S>
void settle_under_flood(std::uint64_t seed, bool flood) {
  constexpr std::uint64_t kBurst = 5'000;
  ManualClock clock(std::chrono::seconds(100));
  typename S<TokenBucket::State>::Options opts{};
  if constexpr (std::is_same_v<S<TokenBucket::State>,
                               ShardedStore<TokenBucket::State>>) {
    opts.capacity = 64;
    opts.shards = 1;
    opts.seed = seed | 1;
    opts.when_full = WhenFull::kEvictStalest;
  } else {
    opts.max_keys = 64;
  }
  Limiter<TokenBucket, S, ManualClock> lim(
      TokenBucket::create(per_second(1), kBurst).value(), opts, clock);
  std::atomic<std::uint64_t> kept{0};
  std::atomic<int> failed{0};
  std::atomic<bool> stop{false};
  const int rounds = std::max(200, static_cast<int>(2'000 * rk_test::scale()));
  std::vector<std::thread> threads;
  for (int w = 0; w < kThreads; ++w) {
    threads.emplace_back([&, w] {
      std::mt19937_64 rng(seed * 31 + static_cast<std::uint64_t>(w));
      for (int i = 0; i < rounds; ++i) {
        const Cost c = 1 + rng() % 20;
        Taken t = lim.take("hot", c);
        if (!t) continue;
        const Cost actual = rng() % (c + 1);
        if (!lim.settle(t.receipt, actual).ok()) {
          failed.fetch_add(1, std::memory_order_relaxed);
        }
        kept.fetch_add(actual, std::memory_order_relaxed);
      }
    });
  }
  std::thread flooder([&] {
    std::mt19937_64 rng(seed);
    while (flood && !stop.load(std::memory_order_relaxed)) {
      static_cast<void>(lim.acquire("flood:" + std::to_string(rng() % 500), 1));
    }
  });
  for (auto& t : threads) t.join();
  stop = true;
  flooder.join();
  CHECK(failed.load() == 0);
  INFO("kept " << kept.load() << " of a burst of " << kBurst);
  const Decision left = lim.peek("hot", 0);
  CHECK(kept.load() + left.remaining <= kBurst);
  // Give-backs do land: most of what was given back is there to take.
  if (!flood) CHECK(kept.load() + left.remaining >= kBurst * 9 / 10);
}

TEMPLATE_TEST_CASE("seams 7: 8 threads settle receipts while keys flood",
                   "[seams][concurrency]", (Combo<TokenBucket, ShardedStore>),
                   (Combo<TokenBucket, InMemoryStore>)) {
  for (std::uint64_t s = 1; s <= 3; ++s) {
    settle_under_flood<TestType::template Store>(rk_test::seed_or(s), true);
    settle_under_flood<TestType::template Store>(rk_test::seed_or(s), false);
  }
}
