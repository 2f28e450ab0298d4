// ratekeeper_bench: the cost of a check, beside its physical floor.
//
// Run with `make bench` (JSON + Markdown into build/bench/). Compare within
// one run only: the floor (one clock read, one compare-and-swap) is measured
// in the same binary, so ratios hold on a noisy machine.
#include <benchmark/benchmark.h>
#include <hiredis/hiredis.h>
#include <malloc.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <time.h>

#include <atomic>
#include <cstdint>
#include <fstream>
#include <iterator>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "ratekeeper/budget/accountant.hpp"
#include "ratekeeper/budget/stream.hpp"
#include "ratekeeper/concurrency.hpp"  // issue 17
#include "ratekeeper/ratekeeper.hpp"
#include "ratekeeper/redis/permits.hpp"  // issue 17
#include "ratekeeper/store/redis.hpp"
#include "redis_server.hpp"   // tests/: a redis-server of our own
#include "redis_tb_prev.hpp"  // tests/: the previous token_bucket.lua

namespace rk = ratekeeper;

namespace {

// ---------------------------------------------------------------- floor --

void BM_Floor_ClockRead(benchmark::State& state) {
  rk::SteadyClock clock;
  for (auto _ : state) benchmark::DoNotOptimize(clock.now());
}
BENCHMARK(BM_Floor_ClockRead);

void BM_Floor_Cas(benchmark::State& state) {
  std::atomic<std::uint64_t> word{0};
  std::uint64_t v = 0;
  for (auto _ : state) {
    benchmark::DoNotOptimize(word.compare_exchange_strong(v, v + 1));
  }
}
BENCHMARK(BM_Floor_Cas);

// One uncontended lock and unlock: std::mutex (detail::Mutex) against
// Debian's prebuilt absl::Mutex, which runs its deadlock detector on every
// Lock (why detail/mutex.hpp wraps std::mutex).
void BM_Floor_Mutex_Std(benchmark::State& state) {
  std::mutex mu;
  for (auto _ : state) {
    mu.lock();
    mu.unlock();
  }
}
BENCHMARK(BM_Floor_Mutex_Std);

void BM_Floor_Mutex_Absl(benchmark::State& state) {
  absl::Mutex mu;
  for (auto _ : state) {
    mu.Lock();
    mu.Unlock();
  }
}
BENCHMARK(BM_Floor_Mutex_Absl);

void BM_Floor_Cas16(benchmark::State& state) {
  rk::detail::Atomic16 cell;
  rk::detail::u128 v = 0;
  for (auto _ : state) {
    benchmark::DoNotOptimize(cell.compare_exchange(v, v + 1));
  }
}
BENCHMARK(BM_Floor_Cas16);

// The floor of issue #3: one clock read and one 8-byte CAS. Kept to compare
// with older runs; a check's state is 16 bytes, so its floor is the next one.
void BM_Floor_ClockPlusCas8(benchmark::State& state) {
  rk::SteadyClock clock;
  std::atomic<std::uint64_t> word{0};
  std::uint64_t v = 0;
  for (auto _ : state) {
    const auto t = static_cast<std::uint64_t>(clock.now().count());
    benchmark::DoNotOptimize(word.compare_exchange_strong(v, t));
  }
}
BENCHMARK(BM_Floor_ClockPlusCas8);

// The floor of one check on the default configuration: one read of the
// clock the default Limiter uses (SteadyClock) and one 16-byte CAS
// (detail::Atomic16, the store's cell) that lands. Pairs with
// BM_Acquire_TokenBucket_Sharded_OneKey_Allowed / _Denied
// (benchmarks/ratios.py).
void BM_Floor_ClockPlusCas16(benchmark::State& state) {
  rk::SteadyClock clock;
  rk::detail::Atomic16 cell;
  rk::detail::u128 v = 0;
  for (auto _ : state) {
    const auto t = static_cast<rk::detail::u128>(clock.now().count());
    const rk::detail::u128 want = (t << 64) | static_cast<std::uint64_t>(v + 1);
    if (cell.compare_exchange(v, want)) v = want;
    benchmark::DoNotOptimize(v);
  }
}
BENCHMARK(BM_Floor_ClockPlusCas16);

// The contended floor: every thread reads the clock and lands one 16-byte
// CAS on the same cell (one cache line), retrying with the value a lost CAS
// returns, as a check on one hot key must. Pairs with
// BM_Acquire_TokenBucket_Sharded_HotKey at the same thread count.
struct alignas(64) SharedCell {
  rk::detail::Atomic16 cell;
};
SharedCell g_shared_cell;

void BM_Floor_ClockPlusCas16_SharedLine(benchmark::State& state) {
  rk::SteadyClock clock;
  rk::detail::Atomic16& cell = g_shared_cell.cell;
  rk::detail::u128 v = cell.load();
  std::uint64_t lost = 0;
  for (auto _ : state) {
    const auto t = static_cast<rk::detail::u128>(clock.now().count());
    rk::detail::u128 want = (t << 64) | static_cast<std::uint64_t>(v + 1);
    while (!cell.compare_exchange(v, want)) {
      ++lost;
      want = (t << 64) | static_cast<std::uint64_t>(v + 1);
    }
    v = want;
    benchmark::DoNotOptimize(v);
  }
  state.SetItemsProcessed(state.iterations());
  state.counters["cas_retries_per_call"] = benchmark::Counter(
      static_cast<double>(lost) / static_cast<double>(state.iterations()),
      benchmark::Counter::kAvgThreads);
}
BENCHMARK(BM_Floor_ClockPlusCas16_SharedLine)->ThreadRange(1, 2)->UseRealTime();

// One dependent load from a random place in 256 MiB on huge pages (as the
// sharded store's table): what a key whose state is in no cache costs at
// least, one DRAM access.
void BM_Floor_CacheMiss(benchmark::State& state) {
  const std::size_t bytes = std::size_t{256} << 20;
  const std::size_t n = bytes / sizeof(std::uint32_t);
  auto* raw = static_cast<std::uint32_t*>(
      ::operator new (bytes, std::align_val_t{std::size_t{2} << 20}));
  ::madvise(raw, bytes, MADV_HUGEPAGE);
  std::unique_ptr<std::uint32_t, void (*)(std::uint32_t*)> owner(
      raw, [](std::uint32_t* p) {
        ::operator delete (p, std::align_val_t{std::size_t{2} << 20});
      });
  std::uint32_t* next = raw;
  // A single random cycle through all slots (Sattolo's algorithm).
  for (std::size_t i = 0; i < n; ++i) next[i] = static_cast<std::uint32_t>(i);
  std::uint64_t x = 88172645463325252ull;
  for (std::size_t i = n - 1; i > 0; --i) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    std::swap(next[i], next[x % i]);
  }
  std::uint32_t at = 0;
  for (auto _ : state) {
    at = next[at];
    benchmark::DoNotOptimize(at);
  }
}
BENCHMARK(BM_Floor_CacheMiss);

void BM_Floor_CachedClockRead(benchmark::State& state) {
  rk::CachedClock clock;
  for (auto _ : state) benchmark::DoNotOptimize(clock.now());
}
BENCHMARK(BM_Floor_CachedClockRead);

// Two threads CAS two counters: on one cache line, then 64 bytes apart.
// Why ShardedStore pads each shard's counters and mutex to a line of its own.
struct TwoCounters {
  alignas(128) std::atomic<std::uint64_t> a{0};
  std::atomic<std::uint64_t> b{0};               // same line as a
  alignas(128) std::atomic<std::uint64_t> c{0};  // a line of its own
};
TwoCounters g_counters;

void BM_Floor_Cas_SharedLine(benchmark::State& state) {
  auto& w = state.thread_index() == 0 ? g_counters.a : g_counters.b;
  for (auto _ : state) w.fetch_add(1, std::memory_order_relaxed);
}
BENCHMARK(BM_Floor_Cas_SharedLine)->Threads(2)->UseRealTime();

void BM_Floor_Cas_PaddedLine(benchmark::State& state) {
  auto& w = state.thread_index() == 0 ? g_counters.a : g_counters.c;
  for (auto _ : state) w.fetch_add(1, std::memory_order_relaxed);
}
BENCHMARK(BM_Floor_Cas_PaddedLine)->Threads(2)->UseRealTime();

// ------------------------------------------------------------ one key --

template <class P>
P allow_all();
// 1 token per second, a billion in the bucket: every call in a run is
// admitted, and no key's state goes idle (the store never reclaims it), so
// the many-key runs measure lookups of resident keys.
template <>
rk::TokenBucket allow_all<rk::TokenBucket>() {
  return rk::TokenBucket::create(rk::per_second(1), 1'000'000'000).value();
}
template <>
rk::FixedWindow allow_all<rk::FixedWindow>() {
  return rk::FixedWindow::create(rk::per_second(1'000'000'000'000)).value();
}
template <>
rk::SlidingWindow allow_all<rk::SlidingWindow>() {
  return rk::SlidingWindow::create(rk::per_second(4'000'000'000)).value();
}

template <class P>
P deny_all() {
  return P::create(rk::per_day(1)).value();
}
template <>
rk::TokenBucket deny_all<rk::TokenBucket>() {
  return rk::TokenBucket::create(rk::per_day(1), 1).value();
}

template <class P, template <class> class S, class C = rk::SteadyClock>
void one_key(benchmark::State& state, P policy, C clock = C{}) {
  rk::Limiter<P, S, C> lim(std::move(policy), clock);
  static_cast<void>(lim.acquire("user:42"));
  std::uint64_t allowed = 0;
  for (auto _ : state) allowed += lim.acquire("user:42").allowed;
  state.counters["allowed_ratio"] =
      static_cast<double>(allowed) / static_cast<double>(state.iterations());
}

#define RK_ONE_KEY(Policy, S)                                                \
  void BM_Acquire_##Policy##_##S##_OneKey_Allowed(benchmark::State& state) { \
    one_key<rk::Policy, rk::S##Store>(state, allow_all<rk::Policy>());       \
  }                                                                          \
  BENCHMARK(BM_Acquire_##Policy##_##S##_OneKey_Allowed);                     \
  void BM_Acquire_##Policy##_##S##_OneKey_Denied(benchmark::State& state) {  \
    one_key<rk::Policy, rk::S##Store>(state, deny_all<rk::Policy>());        \
  }                                                                          \
  BENCHMARK(BM_Acquire_##Policy##_##S##_OneKey_Denied);

RK_ONE_KEY(TokenBucket, InMemory)
RK_ONE_KEY(TokenBucket, Sharded)
RK_ONE_KEY(FixedWindow, InMemory)
RK_ONE_KEY(FixedWindow, Sharded)
RK_ONE_KEY(SlidingWindow, InMemory)
RK_ONE_KEY(SlidingWindow, Sharded)

void BM_Acquire_TokenBucket_Sharded_OneKey_Allowed_FastClock(
    benchmark::State& state) {
  one_key<rk::TokenBucket, rk::ShardedStore, rk::CachedClock>(
      state, allow_all<rk::TokenBucket>(), rk::CachedClock{});
}
BENCHMARK(BM_Acquire_TokenBucket_Sharded_OneKey_Allowed_FastClock);

// ----------------------------------------------------------- many keys --

// Bytes the process has allocated (glibc: arenas plus mmapped blocks). The
// sharded store allocates everything at construction and writes all of it,
// so its share is resident; glibc reuses freed memory between benchmarks,
// which makes RSS deltas unreliable here.
std::int64_t allocated_bytes() {
  const struct mallinfo2 mi = mallinfo2();
  return static_cast<std::int64_t>(mi.uordblks + mi.hblkhd);
}

std::vector<std::string> make_keys(std::size_t n) {
  std::vector<std::string> keys;
  keys.reserve(n);
  for (std::size_t i = 0; i < n; ++i)
    keys.push_back("user:" + std::to_string(i));
  return keys;
}

// N keys, each touched in turn: the key strings are read in order (the CPU
// prefetches them), the table in hash order (it cannot). bytes_per_key is
// what the store allocated for them, its capacity being N.
template <template <class> class S>
void many_keys(benchmark::State& state,
               typename S<rk::TokenBucket::State>::Options options) {
  const auto n = static_cast<std::size_t>(state.range(0));
  const auto keys = make_keys(n);
  const std::int64_t before = allocated_bytes();
  rk::Limiter<rk::TokenBucket, S> lim(allow_all<rk::TokenBucket>(), options);
  for (const auto& k : keys) static_cast<void>(lim.acquire(k));
  const std::int64_t after = allocated_bytes();
  std::size_t i = 0;
  for (auto _ : state) {
    benchmark::DoNotOptimize(lim.acquire(keys[i]));
    if (++i == n) i = 0;
  }
  state.counters["bytes_per_key"] =
      static_cast<double>(after - before) / static_cast<double>(n);
  state.counters["keys"] = static_cast<double>(lim.stats().keys);
}

void BM_Acquire_TokenBucket_Sharded_Keys(benchmark::State& state) {
  rk::ShardedOptions o;
  o.capacity = static_cast<std::size_t>(state.range(0));
  many_keys<rk::ShardedStore>(state, o);
}
BENCHMARK(BM_Acquire_TokenBucket_Sharded_Keys)
    ->Arg(1'000)
    ->Arg(100'000)
    ->Arg(1'000'000);

void BM_Acquire_TokenBucket_InMemory_Keys(benchmark::State& state) {
  rk::InMemoryOptions o;
  o.max_keys = static_cast<std::size_t>(state.range(0));
  many_keys<rk::InMemoryStore>(state, o);
}
BENCHMARK(BM_Acquire_TokenBucket_InMemory_Keys)
    ->Arg(1'000)
    ->Arg(100'000)
    ->Arg(1'000'000);

// ------------------------------------------------------------- threads --

// One limiter shared by all threads of a benchmark run: created by thread 0
// in the setup, before any thread times anything.
template <template <class> class S>
struct Shared {
  static inline std::unique_ptr<rk::Limiter<rk::TokenBucket, S>> lim;
  static inline std::vector<std::string> keys;
  static void setup(const benchmark::State&) {
    lim = std::make_unique<rk::Limiter<rk::TokenBucket, S>>(
        allow_all<rk::TokenBucket>());
    keys = make_keys(1 << 16);
    for (const auto& k : keys) static_cast<void>(lim->acquire(k));
  }
  static void teardown(const benchmark::State&) { lim.reset(); }
};

template <template <class> class S>
void distinct_keys(benchmark::State& state) {
  auto& lim = *Shared<S>::lim;
  const auto& keys = Shared<S>::keys;
  // Each thread works its own slice of keys.
  const std::size_t slice =
      keys.size() / static_cast<std::size_t>(state.threads());
  const std::size_t base =
      slice * static_cast<std::size_t>(state.thread_index());
  std::size_t i = 0;
  for (auto _ : state) {
    benchmark::DoNotOptimize(lim.acquire(keys[base + i]));
    if (++i == slice) i = 0;
  }
  state.SetItemsProcessed(state.iterations());
}

template <template <class> class S>
void hot_key(benchmark::State& state) {
  auto& lim = *Shared<S>::lim;
  const auto before = lim.stats().cas_retries;
  for (auto _ : state) benchmark::DoNotOptimize(lim.acquire("hot"));
  state.SetItemsProcessed(state.iterations());
  // Lost CASes per call, across threads (an estimate: threads end apart).
  state.counters["cas_retries_per_call"] =
      benchmark::Counter(static_cast<double>(lim.stats().cas_retries - before) /
                             static_cast<double>(state.iterations()) /
                             static_cast<double>(state.threads()),
                         benchmark::Counter::kAvgThreads);
}

void BM_Acquire_TokenBucket_Sharded_DistinctKeys(benchmark::State& state) {
  distinct_keys<rk::ShardedStore>(state);
}
void BM_Acquire_TokenBucket_InMemory_DistinctKeys(benchmark::State& state) {
  distinct_keys<rk::InMemoryStore>(state);
}
void BM_Acquire_TokenBucket_Sharded_HotKey(benchmark::State& state) {
  hot_key<rk::ShardedStore>(state);
}
void BM_Acquire_TokenBucket_InMemory_HotKey(benchmark::State& state) {
  hot_key<rk::InMemoryStore>(state);
}

// -------------------------------------------------------------- chains --

// Requests per minute per user (sliding), tokens per minute per user
// (bucket), tokens per day per team (fixed): the issue's three limits, set
// so that every call is admitted (or, in _Denied, refused by the last).
struct ChainRig {
  std::unique_ptr<rk::PolicyLimit<rk::SlidingWindow>> rpm =
      rk::make_limit({.name = "rpm"}, allow_all<rk::SlidingWindow>()).value();
  std::unique_ptr<rk::PolicyLimit<rk::TokenBucket>> tpm =
      rk::make_limit({.name = "tpm", .unit = rk::Unit::kTokens},
                     rk::TokenBucket::create(rk::per_second(1'000'000'000),
                                             1'000'000'000'000'000)
                         .value())
          .value();
  std::unique_ptr<rk::PolicyLimit<rk::FixedWindow>> tpd;
  explicit ChainRig(bool deny_last)
      : tpd(rk::make_limit({.name = "tpd", .unit = rk::Unit::kTokens},
                           deny_last
                               ? rk::FixedWindow::create(rk::per_day(1)).value()
                               : allow_all<rk::FixedWindow>())
                .value()) {}
};

void chain_run(benchmark::State& state, bool deny_last, bool deferred = false) {
  ChainRig rig(deny_last);
  if (deferred) {  // as a TierTable's limits: each call in a read section
    rig.rpm->defer_reclaim();
    rig.tpm->defer_reclaim();
    rig.tpd->defer_reclaim();
  }
  rk::Chain<> chain;
  const rk::ChainItem items[] = {{rig.rpm.get(), "user:42", 1},
                                 {rig.tpm.get(), "user:42", 100},
                                 {rig.tpd.get(), "team:7", 100}};
  static_cast<void>(chain.acquire(items));
  std::uint64_t allowed = 0;
  for (auto _ : state) allowed += chain.acquire(items).allowed;
  state.counters["allowed_ratio"] =
      static_cast<double>(allowed) / static_cast<double>(state.iterations());
}

// One chain of three limits, all admitting: one clock read, three CASes.
void BM_Chain_3Limits_Sharded(benchmark::State& state) {
  chain_run(state, false);
}
BENCHMARK(BM_Chain_3Limits_Sharded);

// The last limit refuses: two takes given back, one peek.
void BM_Chain_3Limits_Sharded_Denied(benchmark::State& state) {
  chain_run(state, true);
}
BENCHMARK(BM_Chain_3Limits_Sharded_Denied);

// Issue 15: BM_Chain_3Limits_Sharded with the limits a TierTable owns
// would have: each call on a limit in a read section (detail/reclaim.hpp),
// so that set_tier can reclaim what it replaces.
void BM_Chain_3Limits_Sharded_ReadSections(benchmark::State& state) {
  chain_run(state, false, true);
}
BENCHMARK(BM_Chain_3Limits_Sharded_ReadSections);

// One read section, entered and left: two stores to the thread's own slot.
void BM_Floor_ReadSection(benchmark::State& state) {
  rk::detail::Reclaimer::instance().prepare();  // as a TierTable does
  for (auto _ : state) {
    const rk::detail::ReadSection section;
    benchmark::ClobberMemory();
  }
}
BENCHMARK(BM_Floor_ReadSection);

// The same three limits as three Limiters acquired one after the other (no
// roll-back, three clock reads): what callers do without chains.
void BM_Chain_3SeparateAcquires_Sharded(benchmark::State& state) {
  rk::Limiter<rk::SlidingWindow> rpm(allow_all<rk::SlidingWindow>());
  rk::Limiter<rk::TokenBucket> tpm(
      rk::TokenBucket::create(rk::per_second(1'000'000'000),
                              1'000'000'000'000'000)
          .value());
  rk::Limiter<rk::FixedWindow> tpd(allow_all<rk::FixedWindow>());
  std::uint64_t allowed = 0;
  for (auto _ : state) {
    allowed += rpm.acquire("user:42", 1).allowed &&
               tpm.acquire("user:42", 100).allowed &&
               tpd.acquire("team:7", 100).allowed;
  }
  state.counters["allowed_ratio"] =
      static_cast<double>(allowed) / static_cast<double>(state.iterations());
}
BENCHMARK(BM_Chain_3SeparateAcquires_Sharded);

// A tier's chain from identities: three subject keys built per call.
void BM_Tier_3Limits_Sharded(benchmark::State& state) {
  rk::TierTable<> tiers;
  tiers
      .set_tier("pro", {{{.name = "rpm"},
                         rk::Field::kUser,
                         rk::PolicyKind::kSlidingWindow,
                         rk::per_second(4'000'000'000)},
                        {{.name = "tpm", .unit = rk::Unit::kTokens},
                         rk::Field::kUser,
                         rk::PolicyKind::kTokenBucket,
                         rk::per_second(1'000'000'000),
                         1'000'000'000'000'000},
                        {{.name = "tpd", .unit = rk::Unit::kTokens},
                         rk::Field::kTeam,
                         rk::PolicyKind::kFixedWindow,
                         rk::per_second(1'000'000'000'000)}})
      .IgnoreError();
  const rk::Subject who{.user = "user:42", .team = "team:7"};
  std::uint64_t allowed = 0;
  for (auto _ : state) allowed += tiers.acquire("pro", who, 100)->allowed;
  state.counters["allowed_ratio"] =
      static_cast<double>(allowed) / static_cast<double>(state.iterations());
}
BENCHMARK(BM_Tier_3Limits_Sharded);

// ------------------------------------------------------------- budgets --

// The two budgets of the benchmarks below, as the accountant builds them: a
// monthly money budget per team and a daily token budget per user.
std::unique_ptr<rk::PolicyLimit<rk::PeriodBudget>> budget_limit(
    const char* name, rk::PeriodKind kind) {
  return rk::make_limit(
             {.name = name},
             rk::PeriodBudget::create(rk::PeriodBudget::kMaxLimit,
                                      rk::Period::calendar(kind).value())
                 .value(),
             rk::ShardedOptions{.capacity = 4096})
      .value();
}

// The store work a reserve and settle cannot avoid, without the accountant:
// one clock read, a chain acquire of both budgets, a settle of each (its
// receipt, below the estimate).
void BM_Budget_Floor_ChainAcquireRefund(benchmark::State& state) {
  auto team = budget_limit("team_month", rk::PeriodKind::kMonth);
  auto user = budget_limit("user_day", rk::PeriodKind::kDay);
  rk::Chain<rk::SystemClock> chain;
  const rk::ChainItem items[] = {{team.get(), "\x04\x06team:7", 1'900'000},
                                 {user.get(), "\x02\x07user:42", 1'900}};
  std::uint64_t allowed = 0;
  for (auto _ : state) {
    rk::ChainDecision d = chain.acquire(items);
    allowed += d.allowed;
    static_cast<void>(chain.settle(d, 0, 1'200'000));
    static_cast<void>(chain.settle(d, 1, 1'200));
  }
  state.counters["allowed_ratio"] =
      static_cast<double>(allowed) / static_cast<double>(state.iterations());
}
BENCHMARK(BM_Budget_Floor_ChainAcquireRefund);

// One call's reserve and settle against the same two budgets: pricing, two
// subject keys, a two-limit chain, a settle that refunds the unused part,
// exactly-once bookkeeping of the request id in a window of 2^arg ids
// (2^18 is the default; a larger window is a larger table, colder lines).
void BM_Budget_ReserveSettle_Sharded(benchmark::State& state) {
  rk::PriceTable prices;
  const rk::TokenPrice p = rk::TokenPrice::per_million_micros(1'000'000);
  prices.set("m", {.base = {.input = p, .output = p}}).IgnoreError();
  rk::Accountant<> acct(std::move(prices), rk::SystemClock{},
                        rk::ShardedOptions{.capacity = 4096});
  acct.add_budget({"team_month", rk::Field::kTeam, rk::BudgetUnit::kNanoUsd,
                   rk::PeriodBudget::kMaxLimit,
                   rk::Period::calendar(rk::PeriodKind::kMonth).value()})
      .IgnoreError();
  acct.add_budget({"user_day", rk::Field::kUser, rk::BudgetUnit::kTokens,
                   rk::PeriodBudget::kMaxLimit,
                   rk::Period::calendar(rk::PeriodKind::kDay).value()})
      .IgnoreError();
  acct.set_idempotency_window(std::size_t{1} << state.range(0));
  const rk::Subject who{.user = "user:42", .team = "team:7"};
  rk::Usage used;
  used.input_uncached = 900;
  used.output = 300;
  std::uint64_t n = 0, granted = 0;
  std::string id = "req-0000000000";
  for (auto _ : state) {
    // A distinct request id per call, written in place.
    std::uint64_t v = n++;
    for (std::size_t i = id.size(); i-- > 4; v /= 10) {
      id[i] = static_cast<char>('0' + v % 10);
    }
    auto r = acct.reserve(
        who, "m", {.prompt_tokens = 900, .max_output_tokens = 1000}, id);
    if (r.ok() && r->granted() && r->settle(used).ok()) ++granted;
  }
  state.counters["allowed_ratio"] =
      static_cast<double>(granted) / static_cast<double>(state.iterations());
}
BENCHMARK(BM_Budget_ReserveSettle_Sharded)->Arg(10)->Arg(18)->Arg(20);

// -------------------------------------------------------------- stream --

// A recorded Chat Completions stream (tests/data/provider-samples: 181
// events, usage in the last), as the chunks an upstream sends: one SSE
// event each.
const std::vector<std::string>& recorded_chat_chunks() {
  static const std::vector<std::string> chunks = [] {
    std::ifstream in(std::string(RK_BENCH_DATA_DIR) +
                         "/provider-samples/openai-chat-streams/"
                         "d615580118391ee13492193e3a8bb74642d23ac1ca13fe37cb6e8"
                         "89b66f759f6.sse",
                     std::ios::binary);
    const std::string text((std::istreambuf_iterator<char>(in)),
                           std::istreambuf_iterator<char>());
    std::vector<std::string> out;
    for (std::size_t i = 0; i < text.size();) {
      std::size_t end = text.find("\n\n", i);
      end = end == std::string::npos ? text.size() : end + 2;
      out.push_back(text.substr(i, end - i));
      i = end;
    }
    return out;
  }();
  return chunks;
}

// The stream reader: SSE framing, then a scan for "usage" / "error"; one
// chunk of 181 is JSON-parsed. per_chunk: seconds per chunk.
// The time per chunk, and a checksum: the recording's 177 output tokens,
// every iteration.
void stream_counters(benchmark::State& state, std::size_t chunks,
                     std::uint64_t output) {
  state.counters["per_chunk"] =
      benchmark::Counter(static_cast<double>(chunks),
                         benchmark::Counter::kIsIterationInvariantRate |
                             benchmark::Counter::kInvert);
  state.counters["output_ok"] =
      output == 177 * static_cast<std::uint64_t>(state.iterations());
}

void BM_Stream_Usage_Reader_Chat(benchmark::State& state) {
  const auto& chunks = recorded_chat_chunks();
  std::uint64_t output = 0;
  for (auto _ : state) {
    rk::StreamUsageReader reader(rk::StreamFormat::kOpenAIChat);
    for (const std::string& c : chunks) reader.feed(c);
    const rk::StreamUsageResult& r = reader.finish();
    if (r.usage) output += r.usage->output;
  }
  stream_counters(state, chunks.size(), output);
}
BENCHMARK(BM_Stream_Usage_Reader_Chat);

// The floor it replaces: every chunk's data JSON-parsed with nlohmann and
// its usage looked up (what a gateway does without the reader).
void BM_Stream_Usage_NlohmannEveryChunk_Chat(benchmark::State& state) {
  const auto& chunks = recorded_chat_chunks();
  std::uint64_t output = 0;
  for (auto _ : state) {
    std::uint64_t last = 0;
    for (const std::string& c : chunks) {
      std::string_view data(c);
      if (!data.starts_with("data: ")) continue;
      data.remove_prefix(6);
      while (!data.empty() && (data.back() == '\n' || data.back() == '\r')) {
        data.remove_suffix(1);
      }
      if (data == "[DONE]") continue;
      const nlohmann::json j = nlohmann::json::parse(
          data.begin(), data.end(), nullptr, /*allow_exceptions=*/false);
      if (j.is_discarded()) continue;
      const auto u = j.find("usage");
      if (u != j.end() && u->is_object()) {
        last = u->value("completion_tokens", std::uint64_t{0});
      }
    }
    output += last;
  }
  stream_counters(state, chunks.size(), output);
}
BENCHMARK(BM_Stream_Usage_NlohmannEveryChunk_Chat);

// ------------------------------------------------- permits (issue 17) --

// A permit acquired and released on one key, nothing else held: a clock
// read, the shard lock twice, the key made and dropped again.
void BM_Permit_AcquireRelease(benchmark::State& state) {
  auto lim =
      rk::ConcurrencyLimit::create({.name = "streams"}, {.limit = 64}).value();
  rk::Permits<> permits(lim.get());
  std::uint64_t allowed = 0;
  for (auto _ : state) {
    rk::Permit p = permits.acquire("user:42");
    allowed += p ? 1 : 0;
  }  // ~Permit releases
  state.counters["allowed_ratio"] =
      static_cast<double>(allowed) / static_cast<double>(state.iterations());
}
BENCHMARK(BM_Permit_AcquireRelease);

// The same while `range(0)` other permits of the key are held (the key
// stays; the holder map is not empty).
void BM_Permit_AcquireRelease_Held(benchmark::State& state) {
  auto lim = rk::ConcurrencyLimit::create({.name = "streams"}, {.limit = 1024})
                 .value();
  rk::Permits<> permits(lim.get());
  std::vector<rk::Permit> held;
  for (int64_t i = 0; i < state.range(0); ++i) {
    held.push_back(permits.acquire("user:42"));
  }
  std::uint64_t allowed = 0;
  for (auto _ : state) {
    rk::Permit p = permits.acquire("user:42");
    allowed += p ? 1 : 0;
  }
  state.counters["allowed_ratio"] =
      static_cast<double>(allowed) / static_cast<double>(state.iterations());
}
BENCHMARK(BM_Permit_AcquireRelease_Held)->Arg(8)->Arg(256);

// A permit refused (the key full, 8 held): the wait computed from the
// holders' expiries.
void BM_Permit_Refused(benchmark::State& state) {
  auto lim =
      rk::ConcurrencyLimit::create({.name = "streams"}, {.limit = 8}).value();
  rk::Permits<> permits(lim.get());
  std::vector<rk::Permit> held;
  for (int i = 0; i < 8; ++i) held.push_back(permits.acquire("user:42"));
  std::uint64_t allowed = 0;
  for (auto _ : state) allowed += permits.acquire("user:42") ? 1 : 0;
  state.counters["allowed_ratio"] =
      static_cast<double>(allowed) / static_cast<double>(state.iterations());
}
BENCHMARK(BM_Permit_Refused);

// --------------------------------------------------------------- redis --

// One redis-server for every Redis benchmark, started on first use on a free
// loopback port; null (and the benchmarks skipped, saying why) when none
// can be started.
struct RedisRig {
  std::unique_ptr<rk_test::RedisServer> server;
  std::shared_ptr<rk::RedisClient> client;
  std::string error;

  static RedisRig& get() {
    static RedisRig rig;
    return rig;
  }

  // Server-side microseconds per EVALSHA so far, and how many.
  std::pair<double, double> evalsha_stats() {
    const std::string info =
        client->command({"INFO", "commandstats"}).value_or("");
    const auto at = info.find("cmdstat_evalsha:calls=");
    if (at == std::string::npos) return {0, 0};
    const double calls = std::stod(info.substr(at + 22));
    const auto u = info.find("usec=", at);
    const double usec = std::stod(info.substr(u + 5));
    return {calls, usec};
  }

  // The redis-server process's CPU time so far (INFO cpu: its getrusage,
  // user and system, to the microsecond). Unlike commandstats' usec, which
  // is wall time around each call, a script preempted by another process
  // of a shared machine is not charged for the time it waited; it does
  // include the server's own work around each call (reading and parsing
  // the request, writing the reply, its event loop), the same for every
  // script.
  double server_cpu_us() {
    const std::string info = client->command({"INFO", "cpu"}).value_or("");
    const auto field = [&](const char* name) {
      const auto at = info.find(name);
      return at == std::string::npos
                 ? 0.0
                 : std::stod(info.substr(at + std::string_view(name).size()));
    };
    return (field("used_cpu_sys:") + field("used_cpu_user:")) * 1e6;
  }

 private:
  RedisRig() {
    try {
      server = std::make_unique<rk_test::RedisServer>();
      auto c = rk::RedisClient::create(
          {.port = server->port(),
           .prefix = "bench:",
           // The cost of decisions, not time-outs: a loaded machine can
           // stall a call past the default 100 ms.
           .command_timeout = std::chrono::seconds(2),
           .pool_size = 64});
      if (c.ok()) {
        client = *c;
      } else {
        error = std::string(c.status().message());
      }
    } catch (const std::exception& e) {
      error = e.what();
    }
  }
};

// The rig, or nullptr with the benchmark skipped, saying why.
RedisRig* redis_rig_or_skip(benchmark::State& state) {
  RedisRig& rig = RedisRig::get();
  if (!rig.client) {
    state.SkipWithError(("no redis-server: " + rig.error).c_str());
    return nullptr;
  }
  return &rig;
}

// A bucket in Redis that never refuses here (10^9 a second).
std::unique_ptr<rk::RedisLimit<rk::TokenBucket>> open_bucket(RedisRig& rig,
                                                             const char* name) {
  return rk::RedisLimit<rk::TokenBucket>::create(
             {.name = name},
             rk::TokenBucket::create(rk::per_second(1'000'000'000),
                                     1'000'000'000)
                 .value(),
             rig.client)
      .value();
}

// This thread's CPU time so far, in microseconds (the client's own work:
// Redis's is server_us_per_call).
double thread_cpu_us() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) * 1e6 +
         static_cast<double>(ts.tv_nsec) / 1e3;
}

// This thread's CPU time in user space so far, in microseconds: the
// library's and hiredis's own work, without the system calls'.
double thread_user_us() {
  rusage ru{};
  getrusage(RUSAGE_THREAD, &ru);
  return static_cast<double>(ru.ru_utime.tv_sec) * 1e6 +
         static_cast<double>(ru.ru_utime.tv_usec);
}

// What a Redis benchmark's decisions cost, from its start to report():
//   server_us_per_call           Redis's time per EVALSHA (INFO
//                                commandstats; only this benchmark's calls):
//                                wall time, so on a shared machine it counts
//                                the time the server waited for a core
//   server_cpu_us_per_call       redis-server's CPU time (INFO cpu) per
//                                EVALSHA over the benchmark: what a call
//                                costs the server, its script and its share
//                                of the event loop's work, not charged for
//                                preemption (issue 16's target (a))
//   client_cpu_us_per_decision   this thread's CPU per decision, the
//                                kernel's included (its system calls; on
//                                loopback a write also runs the receiving
//                                side of TCP)
//   client_user_us_per_decision  the same in user space only (the
//                                library's and hiredis's code; getrusage's
//                                tick-sampled split, so read it over many
//                                decisions)
//   decisions_per_s              decisions over the wall time
class RedisCost {
 public:
  explicit RedisCost(RedisRig& rig) : rig_(rig) {
    std::tie(calls0_, usec0_) = rig_.evalsha_stats();
    server_cpu0_ = rig_.server_cpu_us();
    cpu0_ = thread_cpu_us();
    user0_ = thread_user_us();
  }
  void report(benchmark::State& state, double per_iteration) {
    const double cpu = thread_cpu_us() - cpu0_;
    const double user = thread_user_us() - user0_;
    const double server_cpu = rig_.server_cpu_us();
    const auto [calls, usec] = rig_.evalsha_stats();
    const double decisions =
        static_cast<double>(state.iterations()) * per_iteration;
    const auto per = [&](double x) {
      return decisions > 0 ? x / decisions : 0;
    };
    state.counters["server_us_per_call"] =
        calls > calls0_ ? (usec - usec0_) / (calls - calls0_) : 0;
    state.counters["server_cpu_us_per_call"] =
        calls > calls0_ ? (server_cpu - server_cpu0_) / (calls - calls0_) : 0;
    state.counters["client_cpu_us_per_decision"] = per(cpu);
    state.counters["client_user_us_per_decision"] = per(user);
    state.counters["decisions_per_s"] =
        benchmark::Counter(decisions, benchmark::Counter::kIsRate);
  }

 private:
  RedisRig& rig_;
  double calls0_ = 0, usec0_ = 0, server_cpu0_ = 0, cpu0_ = 0, user0_ = 0;
};

// One decision per call, one connection, waiting for each reply: the
// round trip, the script's time inside Redis and the client's CPU
// (RedisCost).
void BM_Redis_TokenBucket_Sequential(benchmark::State& state) {
  RedisRig* rigp = redis_rig_or_skip(state);
  if (rigp == nullptr) return;
  RedisRig& rig = *rigp;
  auto limit = open_bucket(rig, "seq");
  static_cast<void>(limit->acquire("k", 1, rk::Nanos{0}));
  RedisCost cost(rig);
  std::uint64_t allowed = 0;
  for (auto _ : state) allowed += limit->acquire("k", 1, rk::Nanos{0}).allowed;
  cost.report(state, 1);
  state.counters["allowed_ratio"] =
      static_cast<double>(allowed) / static_cast<double>(state.iterations());
  state.counters["fallbacks"] = static_cast<double>(limit->fallbacks());
}
BENCHMARK(BM_Redis_TokenBucket_Sequential)->UseRealTime();

// Issue 17: a Redis permit acquired and released: two script calls (the
// acquire's ZREMRANGEBYSCORE, ZRANGEBYSCORE, ZADD, PEXPIRE; the release's
// ZREM), one connection, waiting for each reply.
void BM_Redis_Permit_AcquireRelease(benchmark::State& state) {
  RedisRig* rigp = redis_rig_or_skip(state);
  if (rigp == nullptr) return;
  RedisRig& rig = *rigp;
  auto lim =
      rk::RedisPermits::create({.name = "streams"}, {.limit = 64}, rig.client)
          .value();
  rk::Permits<> permits(lim.get());
  RedisCost cost(rig);
  std::uint64_t allowed = 0;
  for (auto _ : state) {
    rk::Permit p = permits.acquire("user:42");
    allowed += p ? 1 : 0;
  }
  cost.report(state, 1);
  state.counters["allowed_ratio"] =
      static_cast<double>(allowed) / static_cast<double>(state.iterations());
  state.counters["fallbacks"] = static_cast<double>(lim->fallbacks());
}
BENCHMARK(BM_Redis_Permit_AcquireRelease)->UseRealTime();

// A chain of three limits (sliding, bucket, fixed) in one script.
void BM_Redis_Chain_3Limits(benchmark::State& state) {
  RedisRig* rigp = redis_rig_or_skip(state);
  if (rigp == nullptr) return;
  RedisRig& rig = *rigp;
  auto rpm = rk::RedisLimit<rk::SlidingWindow>::create(
                 {.name = "rpm"}, allow_all<rk::SlidingWindow>(), rig.client)
                 .value();
  auto tpm =
      rk::RedisLimit<rk::TokenBucket>::create(
          {.name = "tpm", .unit = rk::Unit::kTokens},
          rk::TokenBucket::create(rk::per_second(1'000'000'000), 1'000'000'000)
              .value(),
          rig.client)
          .value();
  auto tpd = rk::RedisLimit<rk::FixedWindow>::create(
                 {.name = "tpd", .unit = rk::Unit::kTokens},
                 allow_all<rk::FixedWindow>(), rig.client)
                 .value();
  rk::RedisChain chain(rig.client);
  const rk::ChainItem items[] = {{rpm.get(), "user:42", 1},
                                 {tpm.get(), "user:42", 100},
                                 {tpd.get(), "", 100}};
  const auto [c0, u0] = rig.evalsha_stats();
  std::uint64_t allowed = 0;
  for (auto _ : state) allowed += chain.acquire("team:7", items).allowed;
  const auto [c1, u1] = rig.evalsha_stats();
  state.counters["allowed_ratio"] =
      static_cast<double>(allowed) / static_cast<double>(state.iterations());
  state.counters["server_us_per_call"] = c1 > c0 ? (u1 - u0) / (c1 - c0) : 0;
}
BENCHMARK(BM_Redis_Chain_3Limits)->UseRealTime();

// Quota leasing: tokens taken from Redis 100 at a time and served in
// process (against BM_Redis_TokenBucket_Sequential: the plain path).
void BM_Redis_Lease_Batch100(benchmark::State& state) {
  RedisRig* rigp = redis_rig_or_skip(state);
  if (rigp == nullptr) return;
  RedisRig& rig = *rigp;
  auto limit = open_bucket(rig, "lease");
  rk::RedisLease lease(*limit, "k", 100);
  std::uint64_t allowed = 0;
  for (auto _ : state) allowed += lease.acquire(1).allowed;
  state.counters["allowed_ratio"] =
      static_cast<double>(allowed) / static_cast<double>(state.iterations());
  state.counters["calls_per_round_trip"] =
      static_cast<double>(state.iterations()) /
      static_cast<double>(std::max<std::uint64_t>(1, lease.round_trips()));
  state.counters["decisions_per_s"] = benchmark::Counter(
      static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
}
BENCHMARK(BM_Redis_Lease_Batch100)->UseRealTime();

// 50 decisions in flight on one connection (acquire_batch: one pipeline of
// 50 scripts per iteration, one thread).
void BM_Redis_TokenBucket_50InFlight(benchmark::State& state) {
  RedisRig* rigp = redis_rig_or_skip(state);
  if (rigp == nullptr) return;
  RedisRig& rig = *rigp;
  auto limit = open_bucket(rig, "fifty");
  std::vector<std::string> keys;
  for (int i = 0; i < 50; ++i) {
    keys.emplace_back(1, 'k');
    keys.back() += std::to_string(i);
  }
  std::vector<rk::RedisLimit<rk::TokenBucket>::Request> reqs;
  for (const auto& k : keys) reqs.push_back({k, 1});
  static_cast<void>(limit->acquire_batch(reqs, rk::Nanos{0}));
  RedisCost cost(rig);
  std::uint64_t allowed = 0;
  for (auto _ : state) {
    for (const rk::Decision& d : limit->acquire_batch(reqs, rk::Nanos{0})) {
      allowed += d.allowed;
    }
  }
  cost.report(state, 50);
  if (allowed != static_cast<std::uint64_t>(state.iterations()) * 50) {
    state.SkipWithError("a pipelined decision was refused");
  }
}
BENCHMARK(BM_Redis_TokenBucket_50InFlight)->UseRealTime();

// The same 50 in flight as 50 threads with a connection each (what a
// thread-per-request server gets without batching).
void BM_Redis_TokenBucket_50Threads(benchmark::State& state) {
  RedisRig* rigp = redis_rig_or_skip(state);
  if (rigp == nullptr) return;
  RedisRig& rig = *rigp;
  static std::unique_ptr<rk::RedisLimit<rk::TokenBucket>> limit;
  if (state.thread_index() == 0) {
    limit = open_bucket(rig, "fifty_threads");
  }
  const std::string key = "k" + std::to_string(state.thread_index());
  std::uint64_t allowed = 0;
  for (auto _ : state) allowed += limit->acquire(key, 1, rk::Nanos{0}).allowed;
  benchmark::DoNotOptimize(allowed);
  state.counters["decisions_per_s"] = benchmark::Counter(
      static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
}
BENCHMARK(BM_Redis_TokenBucket_50Threads)->Threads(50)->UseRealTime();

// ------------------------------------------------------- redis floor --
//
// The floor of a Redis rate limit: a minimal GCRA script driven by plain
// hiredis, on the same redis-server, beside BM_Redis_TokenBucket_*
// (benchmarks/ratios.py --redis divides them). The script is fixed: TIME,
// GET, and SET with PX only when it admits (no write on a denial), exact
// GCRA in integer microseconds. KEYS[1] holds the key's theoretical
// arrival time (TAT, us); ARGV: the emission interval T (us), the
// tolerance tau = burst * T (us), the cost. The reply: {1, 0} admitted,
// {0, retry after (us)} refused.
constexpr const char* kFloorGcra = R"lua(
local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local new = tat + ARGV[3] * ARGV[1]
local over = new - now - tonumber(ARGV[2])
if over > 0 then return {0, over} end
redis.call('SET', KEYS[1], string.format('%d', new), 'PX',
           math.floor((new - now) / 1000) + 1)
return {1, 0}
)lua";

// A blocking hiredis connection to the rig's server with the floor script
// loaded (SCRIPT LOAD): its SHA in `sha`.
struct FloorConn {
  redisContext* c = nullptr;
  std::string sha;
  std::string error;

  explicit FloorConn(RedisRig& rig) {
    c = redisConnect("127.0.0.1", rig.server->port());
    if (c == nullptr || c->err != 0) {
      error = c == nullptr ? "cannot allocate a context" : c->errstr;
      return;
    }
    auto* r =
        static_cast<redisReply*>(redisCommand(c, "SCRIPT LOAD %s", kFloorGcra));
    if (r != nullptr && r->type == REDIS_REPLY_STRING) {
      sha.assign(r->str, r->len);
    } else {
      error = r != nullptr && r->type == REDIS_REPLY_ERROR
                  ? std::string(r->str, r->len)
                  : "SCRIPT LOAD failed";
    }
    if (r != nullptr) freeReplyObject(r);
  }
  ~FloorConn() {
    if (c != nullptr) redisFree(c);
  }
  FloorConn(const FloorConn&) = delete;
  FloorConn& operator=(const FloorConn&) = delete;

  // Whether `r` is the floor's admission ({1, 0}); frees it.
  static bool admitted(void* reply) {
    auto* r = static_cast<redisReply*>(reply);
    const bool ok = r != nullptr && r->type == REDIS_REPLY_ARRAY &&
                    r->elements == 2 &&
                    r->element[0]->type == REDIS_REPLY_INTEGER &&
                    r->element[0]->integer == 1;
    if (r != nullptr) freeReplyObject(r);
    return ok;
  }
};

// The floor's emission interval (1 us: 10^6 a second, never reached here)
// and tolerance (a burst of 10^9), as BM_Redis_TokenBucket_* never refuse.
constexpr const char* kFloorT = "1";
constexpr const char* kFloorTau = "1000000000";

// One floor decision per call: redisCommand on a blocking context (the
// client's CPU of a plain blocking call, against
// BM_Redis_TokenBucket_Sequential).
void BM_Redis_Floor_Sequential(benchmark::State& state) {
  RedisRig* rigp = redis_rig_or_skip(state);
  if (rigp == nullptr) return;
  RedisRig& rig = *rigp;
  FloorConn f(rig);
  if (f.sha.empty()) return state.SkipWithError(f.error.c_str());
  const char* key = "bench:floor:seq";
  RedisCost cost(rig);
  std::uint64_t allowed = 0;
  for (auto _ : state) {
    allowed += FloorConn::admitted(redisCommand(f.c, "EVALSHA %s 1 %s %s %s 1",
                                                f.sha.c_str(), key, kFloorT,
                                                kFloorTau));
  }
  cost.report(state, 1);
  if (allowed != static_cast<std::uint64_t>(state.iterations())) {
    state.SkipWithError("a floor decision was refused or failed");
  }
}
BENCHMARK(BM_Redis_Floor_Sequential)->UseRealTime();

// 50 floor decisions in flight on one connection: redisAppendCommand x50,
// then redisGetReply x50 (against BM_Redis_TokenBucket_50InFlight).
void BM_Redis_Floor_50InFlight(benchmark::State& state) {
  RedisRig* rigp = redis_rig_or_skip(state);
  if (rigp == nullptr) return;
  RedisRig& rig = *rigp;
  FloorConn f(rig);
  if (f.sha.empty()) return state.SkipWithError(f.error.c_str());
  std::vector<std::string> keys;
  for (int i = 0; i < 50; ++i) {
    keys.push_back("bench:floor:k" + std::to_string(i));
  }
  RedisCost cost(rig);
  std::uint64_t allowed = 0;
  for (auto _ : state) {
    for (const std::string& k : keys) {
      redisAppendCommand(f.c, "EVALSHA %s 1 %s %s %s 1", f.sha.c_str(),
                         k.c_str(), kFloorT, kFloorTau);
    }
    for (std::size_t i = 0; i < keys.size(); ++i) {
      void* r = nullptr;
      if (redisGetReply(f.c, &r) != REDIS_OK) break;
      allowed += FloorConn::admitted(r);
    }
  }
  cost.report(state, 50);
  if (allowed != static_cast<std::uint64_t>(state.iterations()) * 50) {
    state.SkipWithError("a floor decision was refused or failed");
  }
}
BENCHMARK(BM_Redis_Floor_50InFlight)->UseRealTime();

// The token bucket's own script (lua/token_bucket.lua, the one
// BM_Redis_TokenBucket_* run), and the previous release's (Prev:
// tests/redis_tb_prev.hpp, limits.lua's 10 arguments), driven as the floor
// is: redisCommandArgv on a blocking hiredis context one call at a time
// (Sequential), or 50 appended then 50 read (50InFlight). Against
// BM_Redis_Floor_* they measure the script alone (same driver); against
// BM_Redis_TokenBucket_*, the client's share of Redis's time (same
// script); Prev against the current, the script's change (same run).
void tb_script_run(benchmark::State& state, bool prev, bool pipelined) {
  RedisRig* rigp = redis_rig_or_skip(state);
  if (rigp == nullptr) return;
  RedisRig& rig = *rigp;
  FloorConn f(rig);
  if (f.sha.empty()) return state.SkipWithError(f.error.c_str());
  const std::string src = prev ? std::string(rk_test::kPrevTokenBucketScript)
                               : rk::detail::redis_tb_script().source();
  auto* loaded = static_cast<redisReply*>(redisCommand(
      f.c, "SCRIPT LOAD %b", src.data(), static_cast<size_t>(src.size())));
  if (loaded == nullptr || loaded->type != REDIS_REPLY_STRING) {
    if (loaded != nullptr) freeReplyObject(loaded);
    return state.SkipWithError("SCRIPT LOAD of the token bucket's failed");
  }
  const std::string sha(loaded->str, loaded->len);
  freeReplyObject(loaded);
  auto limit = open_bucket(rig, "tbscript");
  const rk::detail::TwinParams twin = limit->twin_at(rk::Nanos{0});
  // ARGV as the library sends them: Redis's time, the op, then the
  // current script's num, den, burst, cost, nonce (RedisLimit's
  // append_lean), or the previous one's limits.lua item ("tb", the four
  // parameters, the cost, the flags, a nonce).
  std::vector<std::string> argv = {"EVALSHA", sha, "1", "", "", "acquire"};
  if (prev) {
    argv.insert(argv.end(), twin.begin(), twin.end());
    argv.insert(argv.end(), {"1", "0", "12345"});
  } else {
    argv.insert(argv.end(), {twin[1], twin[2], twin[3], "1", "12345"});
  }
  const int n = pipelined ? 50 : 1;
  std::vector<std::string> keys;
  for (int i = 0; i < n; ++i) {
    keys.push_back("bench:tbscript" + std::string(prev ? "p" : "") + ":k" +
                   std::to_string(i));
  }
  std::vector<const char*> ptrs;
  std::vector<size_t> lens;
  for (const std::string& a : argv) {
    ptrs.push_back(a.data());
    lens.push_back(a.size());
  }
  const auto with_key = [&](const std::string& k) {
    ptrs[3] = k.data();
    lens[3] = k.size();
  };
  // Its short reply (lua/token_bucket.lua): {1, now, after, aux} admitted.
  const auto admitted = [](void* reply) {
    auto* r = static_cast<redisReply*>(reply);
    const bool ok = r != nullptr && r->type == REDIS_REPLY_ARRAY &&
                    r->elements == 4 && r->element[0]->integer == 1;
    if (r != nullptr) freeReplyObject(r);
    return ok;
  };
  const auto round = [&] {
    std::uint64_t ok = 0;
    if (!pipelined) {
      with_key(keys[0]);
      return admitted(redisCommandArgv(f.c, static_cast<int>(ptrs.size()),
                                       ptrs.data(), lens.data()))
                 ? std::uint64_t{1}
                 : 0;
    }
    for (const std::string& k : keys) {
      with_key(k);
      redisAppendCommandArgv(f.c, static_cast<int>(ptrs.size()), ptrs.data(),
                             lens.data());
    }
    for (std::size_t i = 0; i < keys.size(); ++i) {
      void* r = nullptr;
      if (redisGetReply(f.c, &r) != REDIS_OK) break;
      ok += admitted(r);
    }
    return ok;
  };
  static_cast<void>(round());
  RedisCost cost(rig);
  std::uint64_t allowed = 0;
  for (auto _ : state) allowed += round();
  cost.report(state, n);
  if (allowed != static_cast<std::uint64_t>(state.iterations()) *
                     static_cast<std::uint64_t>(n)) {
    state.SkipWithError("a token-bucket script call was refused or failed");
  }
}
void BM_Redis_TokenBucketScript_Sequential(benchmark::State& state) {
  tb_script_run(state, false, false);
}
BENCHMARK(BM_Redis_TokenBucketScript_Sequential)->UseRealTime();
void BM_Redis_TokenBucketScriptPrev_Sequential(benchmark::State& state) {
  tb_script_run(state, true, false);
}
BENCHMARK(BM_Redis_TokenBucketScriptPrev_Sequential)->UseRealTime();
void BM_Redis_TokenBucketScript_50InFlight(benchmark::State& state) {
  tb_script_run(state, false, true);
}
BENCHMARK(BM_Redis_TokenBucketScript_50InFlight)->UseRealTime();
void BM_Redis_TokenBucketScriptPrev_50InFlight(benchmark::State& state) {
  tb_script_run(state, true, true);
}
BENCHMARK(BM_Redis_TokenBucketScriptPrev_50InFlight)->UseRealTime();

#define RK_THREADED(fn, S)                                                     \
  BENCHMARK(fn)                                                                \
      ->Setup(Shared<rk::S>::setup)                                            \
      ->Teardown(Shared<rk::S>::teardown)                                      \
      ->ThreadRange(1, static_cast<int>(                                       \
                           std::max(2u, std::thread::hardware_concurrency()))) \
      ->UseRealTime()

RK_THREADED(BM_Acquire_TokenBucket_Sharded_DistinctKeys, ShardedStore);
RK_THREADED(BM_Acquire_TokenBucket_InMemory_DistinctKeys, InMemoryStore);
RK_THREADED(BM_Acquire_TokenBucket_Sharded_HotKey, ShardedStore);
RK_THREADED(BM_Acquire_TokenBucket_InMemory_HotKey, InMemoryStore);

// ------------------------------------------------------ issue 17 hooks --
// The acquire path of one limit (one key, through Limit's virtual acquire,
// one clock read) built without listener and override support (Off), built
// with it and none set (None: the default PolicyLimit), and with a listener
// set that does nothing (Set). Ratio of medians, --benchmark_repetitions=5:
// benchmarks/ratios.py --filter hooks.
template <bool kHooks>
void hooks_run(benchmark::State& state, bool listen, bool override = false) {
  struct Quiet : rk::LimitListener {
    void on_allowed(const rk::LimitEvent& e) override {
      benchmark::DoNotOptimize(e.decision.remaining);
    }
  };
  rk::PolicyLimit<rk::TokenBucket, rk::ShardedStore, kHooks> limit(
      {.name = "rpm"}, allow_all<rk::TokenBucket>(), {});
  if (listen) limit.set_listener(std::make_shared<Quiet>());
  const rk::SteadyClock clock;
  if constexpr (kHooks) {
    if (override) {  // another key's: this one pays the map lookup
      static_cast<void>(limit.set_override(
          "user:7", allow_all<rk::TokenBucket>(), clock.now()));
    }
  }
  rk::Limit& l = limit;
  static_cast<void>(l.acquire("user:42", 1, clock.now()));
  std::uint64_t allowed = 0;
  for (auto _ : state) allowed += l.acquire("user:42", 1, clock.now()).allowed;
  state.counters["allowed_ratio"] =
      static_cast<double>(allowed) / static_cast<double>(state.iterations());
}
void BM_Listener_Off(benchmark::State& state) {
  hooks_run<false>(state, false);
}
BENCHMARK(BM_Listener_Off);
void BM_Listener_None(benchmark::State& state) {
  hooks_run<true>(state, false);
}
BENCHMARK(BM_Listener_None);
void BM_Listener_Set(benchmark::State& state) { hooks_run<true>(state, true); }
BENCHMARK(BM_Listener_Set);
// An override exists (on another key): the call looks its key up.
void BM_Override_OtherKey(benchmark::State& state) {
  hooks_run<true>(state, false, true);
}
BENCHMARK(BM_Override_OtherKey);
// --- Issue 17: waiting instead of refusing (waiting.hpp) ---

// A blocked-then-admitted acquire on a driven clock: each call finds the
// bucket (burst 1) emptied by the one before, reserves its place (the
// bucket goes into debt), queues, "sleeps" on a ManualClock in simulated
// time (auto-advance: the clock moves to the go time, waking the waiter
// through its subscription) and is admitted. The cost of the path, not of
// the wait: no thread blocks.
void BM_Wait_BlockedThenAdmitted(benchmark::State& state) {
  rk::ManualClock clock;
  clock.set_auto_advance(true);
  rk::Limiter<rk::TokenBucket, rk::ShardedStore, rk::ManualClock> lim(
      rk::TokenBucket::create(rk::per_second(1000), 1).value(), clock);
  rk::Waiter<rk::ManualClock> waiter(clock);
  static_cast<void>(lim.acquire("user:42", 1));
  std::uint64_t blocked = 0;
  for (auto _ : state) {
    rk::Waited w = waiter.acquire(lim, "user:42", 1, std::chrono::seconds(1));
    blocked += w.status.ok() && w.go_at > w.arrived;
    benchmark::DoNotOptimize(w.receipt);
  }
  if (blocked != static_cast<std::uint64_t>(state.iterations())) {
    state.SkipWithError("a call was not blocked, or not admitted");
  }
}
BENCHMARK(BM_Wait_BlockedThenAdmitted);

// The same Waiter on a bucket that always has room: admitted at once, the
// Waiter's overhead over a take (its lock and queue lookup).
void BM_Wait_AdmittedAtOnce(benchmark::State& state) {
  rk::ManualClock clock;
  rk::Limiter<rk::TokenBucket, rk::ShardedStore, rk::ManualClock> lim(
      rk::TokenBucket::create(rk::per_second(1'000'000'000),
                              1'000'000'000'000'000)
          .value(),
      clock);
  rk::Waiter<rk::ManualClock> waiter(clock);
  std::uint64_t admitted = 0;
  for (auto _ : state) {
    rk::Waited w = waiter.acquire(lim, "user:42", 1, std::chrono::seconds(1));
    admitted += w.status.ok() && w.go_at == w.arrived;
    benchmark::DoNotOptimize(w.receipt);
  }
  if (admitted != static_cast<std::uint64_t>(state.iterations())) {
    state.SkipWithError("a call was not admitted at once");
  }
}
BENCHMARK(BM_Wait_AdmittedAtOnce);

// A reservation in the future and its cancellation (Limiter::reserve, then
// give_back): the bucket (1 per hour, burst 1, emptied) goes into debt
// and back, exactly, every iteration. SteadyClock, ShardedStore.
void BM_Reserve_GiveBack(benchmark::State& state) {
  rk::Limiter<rk::TokenBucket> lim(
      rk::TokenBucket::create(rk::per_hour(1), 1).value());
  static_cast<void>(lim.acquire("user:42", 1));
  std::uint64_t ok = 0;
  for (auto _ : state) {
    rk::Reserved r = lim.reserve("user:42", 1, std::chrono::hours(2));
    ok += r.held && r.go_at > r.at && lim.give_back(r.receipt).ok();
  }
  if (ok != static_cast<std::uint64_t>(state.iterations())) {
    state.SkipWithError("a reservation was not held or not given back");
  }
}
BENCHMARK(BM_Reserve_GiveBack);

// The take and give-back it is compared with: a take admitted now, given
// back (the same store and key).
void BM_Take_GiveBack(benchmark::State& state) {
  rk::Limiter<rk::TokenBucket> lim(
      rk::TokenBucket::create(rk::per_second(1), 1).value());
  std::uint64_t ok = 0;
  for (auto _ : state) {
    rk::Taken t = lim.take("user:42", 1);
    ok += t.decision.allowed && lim.give_back(t.receipt).ok();
  }
  if (ok != static_cast<std::uint64_t>(state.iterations())) {
    state.SkipWithError("a take was not admitted or not given back");
  }
}
BENCHMARK(BM_Take_GiveBack);
// --- end of issue 17 ---

// --- Issue 17: warm-up (warm_up.hpp) ---
//
// WarmUpLimit's acquire (Limit::acquire through the virtual interface, one
// steady_clock read, one key, always admitted), beside
// BM_Acquire_TokenBucket_Sharded_OneKey_Allowed (Limiter) and
// BM_Listener_None (the PolicyLimit inside, called directly): Warm is past
// its ramp (full rate), Warming inside its first step (a ramp of 1,000
// hours). The wrapper adds one atomic load of the next step's time and one
// of the listener per call.
void warm_up_run(benchmark::State& state, bool warm) {
  const rk::SteadyClock clock;
  const rk::Nanos now = clock.now();
  const rk::Nanos hours{3600LL * 1'000'000'000LL};
  auto made =
      rk::make_warm_up_limit({.name = "upstream"}, allow_all<rk::TokenBucket>(),
                             rk::WarmUp{warm ? rk::Nanos{1} : 1000 * hours, 10},
                             warm ? now - hours : now);
  if (!made.ok()) {
    state.SkipWithError("make_warm_up_limit failed");
    return;
  }
  rk::Limit& l = **made;
  static_cast<void>(l.acquire("user:42", 1, clock.now()));
  std::uint64_t allowed = 0;
  for (auto _ : state) allowed += l.acquire("user:42", 1, clock.now()).allowed;
  state.counters["allowed_ratio"] =
      static_cast<double>(allowed) / static_cast<double>(state.iterations());
  state.counters["step"] = static_cast<double>((*made)->step());
}
void BM_WarmUp_Acquire(benchmark::State& state) { warm_up_run(state, true); }
BENCHMARK(BM_WarmUp_Acquire);
void BM_WarmUp_Acquire_Warming(benchmark::State& state) {
  warm_up_run(state, false);
}
BENCHMARK(BM_WarmUp_Acquire_Warming);
// --- end of warm-up ---

}  // namespace

BENCHMARK_MAIN();
