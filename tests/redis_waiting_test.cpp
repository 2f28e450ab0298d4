// Waiting on Redis (issue 17): RedisLimit<TokenBucket>::reserve holds a
// wait in Redis as Limiter<TokenBucket>::reserve does in process (the same
// decisions, go times and holds on the same times, test_time), gives back
// exactly, never over-admits with two clients (two "processes") on one key
// by Redis's clock, serves a Waiter on a driven clock, and answers by its
// fail mode while Redis is stopped.
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <stop_token>
#include <string>
#include <thread>
#include <vector>

#include "ratekeeper/limiter.hpp"
#include "ratekeeper/policy/fixed_window.hpp"
#include "ratekeeper/policy/token_bucket.hpp"
#include "ratekeeper/store/in_memory.hpp"
#include "ratekeeper/store/redis.hpp"
#include "ratekeeper/waiting.hpp"
#include "redis_server.hpp"
#include "redis_wait.hpp"
#include "test_util.hpp"
#include "wait.hpp"
#include "waiters.hpp"

using namespace ratekeeper;
using rk_test::RedisServer;
using std::chrono::milliseconds;
using std::chrono::seconds;

namespace {

constexpr std::int64_t kUs = 1'000;
// 2026-12-01 UTC, in us: the driven times start here.
constexpr std::int64_t kT0Us = 1'796'083'200LL * 1'000'000;

using i128 = ratekeeper::detail::i128;
using TBLimiter = Limiter<TokenBucket, InMemoryStore, ManualClock>;

std::shared_ptr<RedisClient> client_for(const RedisServer& s,
                                        std::size_t pool = 4) {
  auto c = RedisClient::create({.port = s.port(),
                                .prefix = "rkw:",
                                .connect_timeout = seconds(2),
                                .command_timeout = seconds(5),
                                .pool_size = pool});
  REQUIRE(c.ok());
  return *c;
}

// A wait in ns rounded up to the microsecond: what Redis answers.
Nanos ceil_us(Nanos d) {
  if (d <= Nanos{0}) return Nanos{0};
  if (d == kNever || d == Nanos::max()) return d;
  return Nanos{(d.count() + kUs - 1) / kUs * kUs};
}

void same(const Decision& got, const Decision& want) {
  REQUIRE(got.allowed == want.allowed);
  REQUIRE(got.limit == want.limit);
  REQUIRE(got.remaining == want.remaining);
  REQUIRE(got.retry_after == ceil_us(want.retry_after));
  REQUIRE(got.reset_after == ceil_us(want.reset_after));
}

// An independent GCRA for a whole number of ns per token: the TAT in ns.
// reserve() is what a token bucket's reservation must do: the wait is what
// a plain acquire reports; within max_wait the cost is counted at once.
struct Oracle {
  std::int64_t per;  // ns per token
  std::int64_t span;
  Cost burst;
  std::int64_t tat = std::numeric_limits<std::int64_t>::min();
  Oracle(Nanos per_token, Cost bk)
      : per(per_token.count()),
        span(per_token.count() * static_cast<std::int64_t>(bk)),
        burst(bk) {}
  Nanos wait(Nanos now, Cost cost) const {
    const std::int64_t base = std::max(tat, now.count());
    const std::int64_t over =
        base + static_cast<std::int64_t>(cost) * per - span - now.count();
    return Nanos{std::max<std::int64_t>(over, 0)};
  }
  // The go time of a held reservation, or nullopt when not held.
  std::optional<Nanos> reserve(Nanos now, Cost cost, Nanos max_wait) {
    if (cost > burst || wait(now, cost) > max_wait) return std::nullopt;
    const Nanos go = now + wait(now, cost);
    tat = std::max(tat, now.count()) + static_cast<std::int64_t>(cost) * per;
    return go;
  }
  void give_back(Cost cost) { tat -= static_cast<std::int64_t>(cost) * per; }
  Nanos reset_after(Nanos now) const {
    return Nanos{std::max<std::int64_t>(tat - now.count(), 0)};
  }
};

// RedisLimit<TokenBucket>::reserve against Limiter<TokenBucket>::reserve on
// the same random script of reserve, give_back (settle to 0) and acquire:
// the same decisions (waits to the microsecond), held, holds, go times and
// receipts. With a whole number of us per token (`whole`), go times are
// identical, and so are give-backs in any order; at other rates the
// give-back counter rounds at another grain (us in Redis, ns in process:
// docs/redis.md, both conservative), so there the script gives nothing
// back and the decisions, go times and holds are compared.
void differential(RedisServer& server, const TokenBucket& policy,
                  std::uint64_t seed, Cost max_cost, std::int64_t max_step_us,
                  std::int64_t max_wait_us, bool whole) {
  const bool give_backs = whole;
  auto client = client_for(server);
  auto redis = RedisLimit<TokenBucket>::create({.name = "wdiff"}, policy,
                                               client, {.test_time = true})
                   .value();
  REQUIRE(redis->reserves_exactly());
  ManualClock clock;
  TBLimiter local(policy, clock);
  std::mt19937_64 rng(seed);
  std::int64_t t_us = kT0Us + static_cast<std::int64_t>(rng() % 1'000'000);
  struct Kept {
    Receipt local, redis;
  };
  std::vector<Kept> kept;
  int held_later = 0, gave_back = 0, refused = 0;
  for (int i = 0; i < 3'000; ++i) {
    const std::string key = "k" + std::to_string(rng() % 2);
    t_us += static_cast<std::int64_t>(rng() %
                                      static_cast<std::uint64_t>(max_step_us));
    const Nanos now{t_us * kUs};
    clock.set(now);
    const Cost cost = rng() % (max_cost + 1);
    const int op = static_cast<int>(rng() % 10);
    CAPTURE(i, key, cost, t_us, op);
    if (op < 5) {
      // max_wait: none, random, or long. Redis holds waits in whole us: a
      // fraction of a us is added only where every wait is whole us (a
      // fractional wait between the two roundings would be held in process
      // and not in Redis, which reports it rounded up).
      const int w = static_cast<int>(rng() % 5);
      Nanos max_wait =
          w == 0 ? Nanos{0}
          : w == 3
              ? seconds(3'600)
              : Nanos{static_cast<std::int64_t>(
                          rng() % static_cast<std::uint64_t>(max_wait_us)) *
                      kUs};
      if (whole) max_wait += Nanos{static_cast<std::int64_t>(rng() % kUs)};
      // Exactly the wait Redis would report: held (a wait equal to
      // max_wait is held, in both).
      if (w == 4) max_wait = ceil_us(local.peek(key, cost).retry_after);
      const std::int64_t max_wait_ns = max_wait.count();
      CAPTURE(max_wait_ns);
      Reserved want = local.reserve(key, cost, max_wait);
      Reserved got = redis->reserve(key, cost, now, max_wait);
      same(got.decision, want.decision);
      // Redis holds a wait of at most max_wait in whole us: the same as in
      // process whenever the wait it reports is within max_wait.
      if (got.decision.retry_after <= max_wait || !want.held) {
        REQUIRE(got.held == want.held);
      } else {
        REQUIRE_FALSE(got.held);
      }
      REQUIRE(got.at == now);
      if (want.decision.never()) {
        REQUIRE(got.go_at == Nanos::max());
      } else {
        REQUIRE(got.go_at == now + ceil_us(want.go_at - now));
        if (whole) REQUIRE(got.go_at == want.go_at);
      }
      REQUIRE(got.receipt.open() == got.held);
      if (got.held) {
        REQUIRE(got.holds == want.holds);
        REQUIRE(got.receipt.at() == now);
        REQUIRE(got.receipt.cost() == cost);
        if (!got.decision.allowed) ++held_later;
        kept.push_back({std::move(want.receipt), std::move(got.receipt)});
        if (kept.size() > 10) kept.erase(kept.begin());
      } else {
        ++refused;
      }
    } else if (op < 8 && give_backs && !kept.empty()) {
      const std::size_t j = rng() % kept.size();
      Kept k = std::move(kept[j]);
      kept.erase(kept.begin() + static_cast<std::ptrdiff_t>(j));
      absl::StatusOr<Decision> w = local.give_back(k.local);
      absl::StatusOr<Decision> g = redis->settle(k.redis, 0, now);
      REQUIRE(w.ok());
      REQUIRE(g.ok());
      same(*g, *w);
      REQUIRE_FALSE(k.redis.open());
      ++gave_back;
    } else {
      same(redis->acquire(key, cost, now), local.acquire(key, cost));
    }
    // The keys' states agree after every step.
    same(redis->peek(key, 0, now), local.peek(key, 0));
  }
  CHECK(held_later > 100);
  CHECK((gave_back > 200 || !give_backs));
  CHECK(refused > 40);
  CHECK(redis->fallbacks() == 0);
}

}  // namespace

TEST_CASE("RedisLimit<TokenBucket>::reserve decides as Limiter::reserve",
          "[i17][redis]") {
  RedisServer server;
  const std::uint64_t seed = rk_test::seed_or(0x17AE5);
  CAPTURE(seed);
  SECTION("10 per second, burst 4 (a whole number of us per token)") {
    differential(server, TokenBucket::create(per_second(10), 4).value(), seed,
                 3, 150'000, 1'500'000, true);
  }
  SECTION("7 per second, burst 5 (a fraction of a us per token)") {
    differential(server, TokenBucket::create(per_second(7), 5).value(),
                 seed + 1, 4, 250'000, 2'000'000, false);
  }
  SECTION("1,000 per 3 s, burst 40") {
    differential(server,
                 TokenBucket::create(per(1'000, seconds(3)), 40).value(),
                 seed + 2, 30, 40'000, 400'000, true);
  }
}

TEST_CASE("a window policy in Redis reserves as its take: a promise",
          "[i17][redis]") {
  RedisServer server;
  auto fw = RedisLimit<FixedWindow>::create(
                {.name = "fw"}, FixedWindow::create(per_second(2)).value(),
                client_for(server), {.test_time = true})
                .value();
  CHECK_FALSE(fw->reserves_exactly());
  const Nanos t{(kT0Us + 250'000) * kUs};
  REQUIRE(fw->reserve("k", 2, t, seconds(5)).held);
  const Reserved r = fw->reserve("k", 1, t, seconds(5));
  CHECK_FALSE(r.held);
  CHECK_FALSE(r.receipt.open());
  CHECK(r.go_at == Nanos{(kT0Us + 1'000'000) * kUs});  // the next window
}

TEST_CASE("a reservation given back in Redis returns exactly its time",
          "[i17][redis]") {
  RedisServer server;
  // 10 per second (100 ms a token), burst 2.
  auto redis =
      RedisLimit<TokenBucket>::create(
          {.name = "gb"}, TokenBucket::create(per_second(10), 2).value(),
          client_for(server), {.test_time = true})
          .value();
  Oracle model(milliseconds(100), 2);
  const Nanos t0{kT0Us * kUs};
  REQUIRE(redis->acquire("k", 2, t0).allowed);
  REQUIRE(model.reserve(t0, 2, Nanos{0}));
  // A (1), B (2), C (1), each held behind the last; A's wait is exactly
  // its max_wait (held).
  Reserved a = redis->reserve("k", 1, t0, milliseconds(100));
  Reserved b = redis->reserve("k", 2, t0, seconds(2));
  Reserved c = redis->reserve("k", 1, t0, seconds(2));
  for (Reserved* r : {&a, &b, &c}) {
    REQUIRE(r->held);
    REQUIRE_FALSE(r->decision.allowed);
    REQUIRE(r->go_at ==
            *model.reserve(t0, r->receipt.cost(),
                           r == &a ? milliseconds(100) : seconds(2)));
  }
  CHECK(a.go_at == t0 + milliseconds(100));
  CHECK(b.go_at == t0 + milliseconds(300));
  CHECK(c.go_at == t0 + milliseconds(400));
  CHECK(a.holds == milliseconds(100));
  CHECK(b.holds == milliseconds(200));
  // A given back (B and C behind it): they move 100 ms earlier.
  const Nanos t1 = t0 + milliseconds(50);
  REQUIRE(redis->settle(a.receipt, 0, t1).ok());
  model.give_back(1);
  CHECK(redis->peek("k", 0, t1).reset_after == model.reset_after(t1));
  // B given back (C behind it; B's record moved with it): exact again.
  REQUIRE(redis->settle(b.receipt, 0, t1).ok());
  model.give_back(2);
  CHECK(redis->peek("k", 0, t1).reset_after == model.reset_after(t1));
  Reserved d = redis->reserve("k", 1, t1, seconds(2));
  REQUIRE(d.held);
  CHECK(d.go_at == *model.reserve(t1, 1, seconds(2)));
  CHECK(d.go_at == t0 + milliseconds(200));
  // C and D given back: the key holds only the first take's 200 ms.
  REQUIRE(redis->settle(c.receipt, 0, t1).ok());
  model.give_back(1);
  REQUIRE(redis->settle(d.receipt, 0, t1).ok());
  model.give_back(1);
  CHECK(model.reset_after(t1) == milliseconds(150));
  CHECK(redis->peek("k", 0, t1).reset_after == milliseconds(150));
  // Settled once.
  CHECK(redis->settle(d.receipt, 0, t1).status().code() ==
        absl::StatusCode::kFailedPrecondition);
  // A wait past max_wait holds nothing; a cost past the burst never.
  const Reserved far = redis->reserve("k", 2, t1, milliseconds(149));
  CHECK_FALSE(far.held);
  CHECK(far.decision.retry_after == milliseconds(150));
  CHECK(far.go_at == t1 + milliseconds(150));
  CHECK(redis->peek("k", 0, t1).reset_after == milliseconds(150));
  const Reserved never = redis->reserve("k", 3, t1, seconds(60));
  CHECK_FALSE(never.held);
  CHECK(never.decision.never());
  CHECK(never.go_at == Nanos::max());
}

TEST_CASE("a wait whose debt would leave the script's exact range is not held",
          "[i17][redis]") {
  RedisServer server;
  // 999,999,937 per second (a prime: 10^6 / 999,999,937 us a token), burst
  // 2 * 10^9: the script holds waits up to (2^52 - burst * num) / den us.
  const Cost burst = 2'000'000'000;
  const auto policy =
      TokenBucket::create(per(999'999'937, seconds(1)), burst).value();
  auto redis =
      RedisLimit<TokenBucket>::create({.name = "cap"}, policy,
                                      client_for(server), {.test_time = true})
          .value();
  const std::int64_t cap_us =
      ((std::int64_t{1} << 52) - static_cast<std::int64_t>(burst) * 1'000'000) /
      999'999'937;
  REQUIRE(cap_us == 2'503'599);
  const Nanos t{kT0Us * kUs};
  REQUIRE(redis->reserve("k", burst, t, seconds(10)).decision.allowed);
  // A wait of 2 s (under the cap): held.
  const Reserved second = redis->reserve("k", burst, t, seconds(10));
  CHECK(second.held);
  CHECK(second.decision.retry_after == Nanos{2'000'001 * kUs});
  // A wait of 4 s, within max_wait but past the cap: not held, nothing
  // counted; the decision is still the exact wait.
  const Reserved third = redis->reserve("k", burst, t, seconds(10));
  CHECK_FALSE(third.held);
  CHECK_FALSE(third.receipt.open());
  CHECK(third.decision.retry_after == Nanos{4'000'001 * kUs});
  CHECK(redis->peek("k", 0, t).reset_after == Nanos{4'000'001 * kUs});
  // A Waiter says so: the reservation could not be held.
  ManualClock clock{t};
  Waiter<ManualClock> waiter(clock);
  const Waited w = waiter.acquire(*redis, "k", burst, seconds(10));
  CHECK(w.status.code() == absl::StatusCode::kResourceExhausted);
}

TEST_CASE("two clients reserving on one key never over-admit by Redis's clock",
          "[i17][redis]") {
  RedisServer server;
  // 200 per second (5 ms a token), burst 5; waits of up to 100 ms held.
  const auto policy = TokenBucket::create(per_second(200), 5).value();
  const Nanos per_token = milliseconds(5);
  const Cost burst = 5;
  const Nanos max_wait = milliseconds(100);
  // Two "processes": a client and a limit object each, one name.
  auto ca = client_for(server), cb = client_for(server);
  auto la =
      RedisLimit<TokenBucket>::create({.name = "two"}, policy, ca).value();
  auto lb =
      RedisLimit<TokenBucket>::create({.name = "two"}, policy, cb).value();
  struct Held {
    std::int64_t at_us;  // Redis's TIME of the reservation
    std::int64_t go_us;  // when it goes, by Redis's clock
  };
  std::mutex mu;
  std::vector<Held> held;
  std::atomic<int> bad_refusals{0}, bad_go{0}, stuck{0};
  const int per_thread =
      std::max(15, static_cast<int>(60 * std::min(1.0, rk_test::scale())));
  const auto run = [&](RedisLimit<TokenBucket>* lim) {
    int n = 0;
    while (n < per_thread) {
      const Nanos before = SteadyClock{}.now();
      Reserved r = lim->reserve("k", 1, before, max_wait);
      const Nanos after = SteadyClock{}.now();
      if (!r.held) {
        // Refused only for a wait past max_wait.
        if (r.decision.retry_after <= max_wait) bad_refusals.fetch_add(1);
        // Until the key could hold a reservation again (a deadline wait).
        if (!rk_test::eventually([&] {
              return lim->peek("k", 1, SteadyClock{}.now()).retry_after <=
                     max_wait;
            })) {
          stuck.fetch_add(1);  // never again within max_wait: checked below
          return;
        }
        continue;
      }
      // go_at, on the caller's clock: never before the wait from the call,
      // at most the round trip after it.
      if (r.go_at < before + r.decision.retry_after ||
          r.go_at > after + r.decision.retry_after) {
        bad_go.fetch_add(1);
      }
      {
        std::lock_guard lock(mu);
        const std::int64_t at_us = r.receipt.at().count() / kUs;
        held.push_back({at_us, at_us + r.decision.retry_after.count() / kUs});
      }
      ++n;
      // The caller waits for its time, then goes (capacity held meanwhile).
      std::this_thread::sleep_until(std::chrono::steady_clock::time_point(
          std::chrono::duration_cast<std::chrono::steady_clock::duration>(
              r.go_at)));
    }
  };
  {
    std::vector<std::jthread> threads;
    for (int i = 0; i < 2; ++i) {
      threads.emplace_back(run, la.get());
      threads.emplace_back(run, lb.get());
    }
  }
  CHECK(bad_refusals.load() == 0);
  CHECK(stuck.load() == 0);
  CHECK(bad_go.load() == 0);
  CHECK(la->fallbacks() + lb->fallbacks() == 0);
  REQUIRE(held.size() == static_cast<std::size_t>(4 * per_thread));
  // Redis ran the scripts one at a time: in its order (its time, then the
  // go time, which grows with every held wait), an independent GCRA agrees
  // on every go time.
  std::sort(held.begin(), held.end(), [](const Held& x, const Held& y) {
    return x.at_us != y.at_us ? x.at_us < y.at_us : x.go_us < y.go_us;
  });
  Oracle model(per_token, burst);
  for (const Held& h : held) {
    const std::optional<Nanos> go =
        model.reserve(Nanos{h.at_us * kUs}, 1, max_wait);
    REQUIRE(go.has_value());
    REQUIRE(*go == Nanos{h.go_us * kUs});
  }
  // Never over-admitted: in any interval [g_i, g_j] of go times, at most
  // burst + (g_j - g_i) / per_token calls go.
  std::vector<std::int64_t> go;
  for (const Held& h : held) go.push_back(h.go_us);
  std::sort(go.begin(), go.end());
  for (std::size_t i = 0; i < go.size(); ++i) {
    for (std::size_t j = i; j < go.size(); ++j) {
      const auto count = static_cast<std::int64_t>(j - i + 1);
      const std::int64_t bound = static_cast<std::int64_t>(burst) +
                                 (go[j] - go[i]) * kUs / per_token.count();
      REQUIRE(count <= bound);
    }
  }
}

using rk_test::Waiters;

TEST_CASE(
    "Waiters of two processes on one Redis key: each its own FIFO, the "
    "capacity held in Redis, a cancellation exact",
    "[i17][redis]") {
  RedisServer server;
  const auto policy = TokenBucket::create(per_second(10), 1).value();
  // Two "processes": a limit object and a Waiter each, one key in Redis.
  auto pa = RedisLimit<TokenBucket>::create(
                {.name = "wq"}, policy, client_for(server), {.test_time = true})
                .value();
  auto pb = RedisLimit<TokenBucket>::create(
                {.name = "wq"}, policy, client_for(server), {.test_time = true})
                .value();
  ManualClock clock{Nanos{kT0Us * kUs}};
  Waiter<ManualClock> wa(clock), wb(clock);
  Oracle model(milliseconds(100), 1);
  const Nanos t0 = clock.now();
  REQUIRE(pa->acquire("k", 1, t0).allowed);
  REQUIRE(model.reserve(t0, 1, Nanos{0}));
  // Arrivals alternate: a0 b0 a1 b1 a2 b2; each reserves in Redis on
  // arrival, so the go times are in arrival order across both.
  constexpr int kN = 6;
  Waiters ws;
  std::vector<Nanos> want;
  for (int i = 0; i < kN; ++i) {
    want.push_back(*model.reserve(t0, 1, seconds(60)));
    const bool on_a = i % 2 == 0;
    Waiter<ManualClock>& w = on_a ? wa : wb;
    Limit& lim = on_a ? static_cast<Limit&>(*pa) : static_cast<Limit&>(*pb);
    ws.start([&w, &lim](std::stop_token st) {
      return w.acquire(lim, "k", 1, seconds(60), st);
    });
    const std::size_t mine = static_cast<std::size_t>(i / 2 + 1);
    REQUIRE(rk_test::eventually([&] { return w.queued(&lim, "k") == mine; }));
  }
  for (int i = 0; i < kN; ++i) {
    REQUIRE(want[static_cast<std::size_t>(i)] ==
            t0 + milliseconds(100) * (i + 1));
  }
  // b1 (index 3) cancelled before its time: Redis gets its 100 ms back;
  // its own Waiter moves b2 earlier by exactly that; a2, in the other
  // process, is not told (no order across processes) and keeps its time.
  ws.threads[3].request_stop();
  REQUIRE(rk_test::eventually([&] { return ws.finished(3); }));
  CHECK(ws.at(3).status.code() == absl::StatusCode::kCancelled);
  model.give_back(1);
  CHECK(pa->peek("k", 0, t0).reset_after == model.reset_after(t0));
  // a0, b0, a1 each exactly at its time.
  for (const int i : {0, 1, 2}) {
    const Nanos t = want[static_cast<std::size_t>(i)];
    clock.set(t - Nanos{kUs});
    CHECK_FALSE(ws.finished(static_cast<std::size_t>(i)));
    clock.set(t);
    REQUIRE(rk_test::eventually(
        [&] { return ws.finished(static_cast<std::size_t>(i)); }));
  }
  // b2, moved 100 ms earlier, and a2, not told, both at 500 ms: the two
  // go at one instant (docs/waiting.md, "Who is told"), while Redis counts
  // exactly the calls that went.
  const Nanos last = want[4];
  REQUIRE(want[5] - milliseconds(100) == last);
  clock.set(last - Nanos{kUs});
  CHECK_FALSE(ws.finished(4));
  CHECK_FALSE(ws.finished(5));
  clock.set(last);
  REQUIRE(
      rk_test::eventually([&] { return ws.finished(4) && ws.finished(5); }));
  for (const int i : {0, 1, 2, 4, 5}) {
    const Nanos t = i == 5 ? last : want[static_cast<std::size_t>(i)];
    Waited& w = ws.at(static_cast<std::size_t>(i));
    CAPTURE(i);
    REQUIRE(w.status.ok());
    CHECK(w.go_at == t);
    CHECK(w.admitted_at == t);
    CHECK(w.receipt.open());
  }
  // Each Waiter admitted its own in arrival order.
  CHECK(ws.at(0).sequence == 1);
  CHECK(ws.at(2).sequence == 2);
  CHECK(ws.at(4).sequence == 3);
  CHECK(ws.at(1).sequence == 1);
  CHECK(ws.at(5).sequence == 2);
  CHECK(wa.queued(static_cast<const Limit*>(pa.get()), "k") == 0);
  CHECK(wb.queued(static_cast<const Limit*>(pb.get()), "k") == 0);
  // Redis counted exactly the five that went.
  CHECK(pb->peek("k", 0, clock.now()).reset_after ==
        model.reset_after(clock.now()));
}

TEST_CASE("a reservation while Redis is stopped: the fail mode decides",
          "[i17][redis]") {
  RedisServer server;
  auto client = client_for(server);
  const auto policy = TokenBucket::create(per_second(10), 2).value();
  ManualClock clock{Nanos{kT0Us * kUs}};
  const auto make = [&](std::string name, FailMode mode) {
    return RedisLimit<TokenBucket>::create({.name = std::move(name)}, policy,
                                           client,
                                           {.fail = mode,
                                            .fail_retry = milliseconds(250),
                                            .instances = 2,
                                            .test_time = true})
        .value();
  };
  auto closed = make("closed", FailMode::kClosed);
  auto open = make("open", FailMode::kOpen);
  auto local = make("local", FailMode::kLocal);
  REQUIRE(closed->reserve("k", 1, clock.now(), seconds(1)).held);
  server.stop(SIGKILL);
  const Nanos t = clock.now();

  SECTION("kClosed: nothing held, refused with fail_retry") {
    const Reserved r = closed->reserve("k", 1, t, seconds(1));
    CHECK_FALSE(r.held);
    CHECK_FALSE(r.decision.allowed);
    CHECK_FALSE(r.receipt.open());
    CHECK(r.decision.retry_after == milliseconds(250));
    CHECK(r.go_at == t + milliseconds(250));
    CHECK(closed->fallbacks() == 1);
    CHECK_FALSE(closed->last_error().empty());
    // A Waiter: the reservation could not be held (within max_wait), or
    // the wait is past max_wait; either way at once, holding nothing.
    Waiter<ManualClock> waiter(clock);
    Waited w = waiter.acquire(*closed, "k", 1, seconds(1));
    CHECK(w.status.code() == absl::StatusCode::kResourceExhausted);
    w = waiter.acquire(*closed, "k", 1, milliseconds(100));
    CHECK(w.status.code() == absl::StatusCode::kDeadlineExceeded);
    CHECK(clock.now() == t);
    CHECK(closed->fallbacks() == 3);
  }
  SECTION("kOpen: admitted at once, nothing held to give back") {
    const Reserved r = open->reserve("k", 1, t, seconds(1));
    CHECK(r.held);
    CHECK(r.decision.allowed);
    CHECK(r.go_at == t);
    CHECK_FALSE(r.receipt.open());
    Waiter<ManualClock> waiter(clock);
    const Waited w = waiter.acquire(*open, "k", 2, seconds(1));
    CHECK(w.status.ok());
    CHECK(w.go_at == t);
    CHECK_FALSE(w.receipt.open());
    CHECK(open->fallbacks() == 2);
  }
  SECTION("kLocal: held exactly in the instance's share, given back there") {
    // The share of 2 instances: 5 per second, burst 1 (200 ms a token).
    ManualClock lc{t};
    Limiter<TokenBucket, InMemoryStore, ManualClock> share(
        TokenBucket::create(per_second(5), 1).value(), lc);
    Reserved first = local->reserve("k", 1, t, seconds(1));
    Reserved want_first = share.reserve("k", 1, seconds(1));
    Reserved second = local->reserve("k", 1, t, seconds(1));
    Reserved want_second = share.reserve("k", 1, seconds(1));
    for (auto [got, want] :
         {std::pair{&first, &want_first}, std::pair{&second, &want_second}}) {
      CHECK(got->held == want->held);
      CHECK(got->decision.allowed == want->decision.allowed);
      CHECK(got->decision.retry_after == want->decision.retry_after);
      CHECK(got->go_at == want->go_at);
      CHECK(got->holds == want->holds);
      CHECK(got->receipt.open());
    }
    CHECK(second.go_at == t + milliseconds(200));
    CHECK(local->fallbacks() == 2);
    // Given back through the RedisLimit: its local limit settles it.
    REQUIRE(local->settle(first.receipt, 0, t).ok());
    REQUIRE(share.give_back(want_first.receipt).ok());
    CHECK(local->local_limit()->peek("k", 0, t).reset_after ==
          share.peek("k", 0).reset_after);
    // Redis back: reservations are held in Redis again.
    server.start();
    rk_test::wait_answered(*client);
    const Reserved back = local->reserve("k", 1, t, seconds(1));
    CHECK(back.held);
    CHECK(back.decision.allowed);  // an empty Redis
    CHECK(back.receipt.issuer() == local.get());
    CHECK(local->fallbacks() == 2);
  }
}
