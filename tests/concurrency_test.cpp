// TESTPLAN T2a-T2c: in-process concurrency, run more threads than cores so
// that threads are preempted between reading and writing a state. Built alone
// in the TSan preset (T2b) and with everything else under ASan+UBSan.
//
// RATEKEEPER_TEST_SCALE scales the run time (1.0: 10 s per policy in T2a).
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "ratekeeper/limiter.hpp"
#include "ratekeeper/policy/fixed_window.hpp"
#include "ratekeeper/policy/sliding_window.hpp"
#include "ratekeeper/policy/token_bucket.hpp"
#include "ratekeeper/store/in_memory.hpp"
#include "ratekeeper/store/sharded.hpp"
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
  while (std::chrono::steady_clock::now() < deadline) {
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
      while (std::chrono::steady_clock::now() < deadline) {
        for (int i = 0; i < 64; ++i) {
          const int k = keys.pick(rng);
          mine[static_cast<std::size_t>(k)] +=
              lim.acquire(keys.name(k)).allowed;
        }
      }
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
