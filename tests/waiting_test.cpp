// Waiting instead of refusing (issue 17): reservations on the token bucket
// and the window policies, and Waiter's blocking acquire with a deadline,
// FIFO per key, a queue limit, cancellation and jitter. Driven clock for
// exact waits and orders; real threads (SteadyClock, deadlines) for the
// concurrency case, which runs under TSan too.
#include "ratekeeper/waiting.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <stop_token>
#include <thread>
#include <vector>

#include "ratekeeper/chain.hpp"
#include "ratekeeper/limiter.hpp"
#include "ratekeeper/listener.hpp"
#include "ratekeeper/policy/fixed_window.hpp"
#include "ratekeeper/policy/sliding_window.hpp"
#include "ratekeeper/policy/token_bucket.hpp"
#include "test_util.hpp"
#include "wait.hpp"
#include "waiters.hpp"

using namespace ratekeeper;
using std::chrono::milliseconds;
using std::chrono::seconds;

namespace {

using i128 = ratekeeper::detail::i128;

// An independent GCRA: the bucket's TAT in units of 1/den ns, the emission
// interval num/den ns per token, the burst's span burst * num. reserve()
// is what a token bucket's reservation must do: the wait is what a plain
// acquire reports; within max_wait the cost is counted at once.
struct Oracle {
  i128 num, den, span;
  i128 tat;
  Cost burst;
  Oracle(std::uint64_t count, Nanos period, std::uint64_t bk)
      : tat(std::numeric_limits<std::int64_t>::min()), burst(bk) {
    const i128 p = period.count();
    const i128 c = count;
    i128 a = p, b = c;
    while (b != 0) {
      const i128 t = a % b;
      a = b;
      b = t;
    }
    num = p / a;
    den = c / a;
    span = static_cast<i128>(bk) * num;
    tat *= den;
  }
  static i128 ceil_div(i128 a, i128 b) {
    return a >= 0 ? (a + b - 1) / b : -((-a) / b);
  }
  // The wait a plain acquire of `cost` at `now` reports (0: admitted).
  Nanos wait(Nanos now, Cost cost) const {
    const i128 now_s = static_cast<i128>(now.count()) * den;
    const i128 base = std::max(tat, now_s);
    const i128 over = base + static_cast<i128>(cost) * num - span - now_s;
    if (over <= 0) return Nanos{0};
    return Nanos{static_cast<std::int64_t>(ceil_div(over, den))};
  }
  // A reservation: held (and counted) when the wait is within max_wait.
  bool reserve(Nanos now, Cost cost, Nanos max_wait) {
    if (cost > burst || wait(now, cost) > max_wait) return false;
    const i128 now_s = static_cast<i128>(now.count()) * den;
    tat = std::max(tat, now_s) + static_cast<i128>(cost) * num;
    return true;
  }
  void give_back(Cost cost) { tat -= static_cast<i128>(cost) * num; }
  // What a zero-cost call is told: the wait until the bucket is full.
  Nanos reset_after(Nanos now) const {
    const i128 d = tat - static_cast<i128>(now.count()) * den;
    return d <= 0 ? Nanos{0}
                  : Nanos{static_cast<std::int64_t>(ceil_div(d, den))};
  }
};

using TBLimiter = Limiter<TokenBucket, ShardedStore, ManualClock>;

}  // namespace

TEST_CASE("reserve: go_at is exactly the wait a plain acquire reports",
          "[i17]") {
  // A whole number of ns per token, and 3 per second (a fraction of a ns).
  for (const std::uint64_t count : {10u, 3u}) {
    CAPTURE(count);
    ManualClock clock{seconds(100)};
    TBLimiter lim(TokenBucket::create(per_second(count), 4).value(), clock);
    Oracle model(count, seconds(1), 4);
    std::mt19937_64 rng(count);
    for (int i = 0; i < 2000; ++i) {
      clock.advance(Nanos{static_cast<std::int64_t>(rng() % 400'000'000)});
      const Cost cost = 1 + rng() % 4;
      const Nanos max_wait{static_cast<std::int64_t>(rng() % 2'000'000'000)};
      const Nanos now = clock.now();
      const Nanos want = model.wait(now, cost);
      // A plain peek reports the same wait.
      REQUIRE(lim.peek("k", cost).retry_after == want);
      Reserved r = lim.reserve("k", cost, max_wait);
      const bool held = model.reserve(now, cost, max_wait);
      REQUIRE(r.held == held);
      REQUIRE(r.at == now);
      REQUIRE(r.decision.retry_after == want);
      REQUIRE(r.decision.allowed == (want == Nanos{0}));
      REQUIRE(r.go_at == now + want);
      REQUIRE(r.receipt.open() == held);
      if (held) {
        REQUIRE(r.receipt.cost() == cost);
        // The time it holds: cost tokens' worth, rounded down.
        REQUIRE(r.holds.count() ==
                static_cast<std::int64_t>(static_cast<i128>(cost) * model.num /
                                          model.den));
      }
      // A later caller's wait includes every held reservation.
      REQUIRE(lim.peek("k", 0).reset_after == model.reset_after(now));
      // At go_at a reserved call is where a plain acquire would have been:
      // a reservation is never admitted early nor late.
    }
  }
}

TEST_CASE("reserve: the reserved call goes exactly when an acquire would",
          "[i17]") {
  ManualClock a_clock, b_clock;
  auto tb = TokenBucket::create(per_second(10), 2).value();
  TBLimiter a(tb, a_clock), b(tb, b_clock);
  // Both buckets emptied at 0.
  REQUIRE(a.acquire("k", 2));
  REQUIRE(b.acquire("k", 2));
  Reserved r = a.reserve("k", 1, seconds(1));
  REQUIRE(r.held);
  REQUIRE(r.go_at == milliseconds(100));
  // The plain acquire is admitted at go_at, not 1 ns before.
  b_clock.set(r.go_at - Nanos{1});
  REQUIRE_FALSE(b.acquire("k", 1));
  b_clock.set(r.go_at);
  REQUIRE(b.acquire("k", 1));
  // From then on both buckets are in the same state.
  a_clock.set(r.go_at);
  REQUIRE(a.peek("k", 0) == b.peek("k", 0));
}

TEST_CASE("give_back cancels a reservation exactly, with others behind it",
          "[i17]") {
  ManualClock clock{seconds(5)};
  TBLimiter lim(TokenBucket::create(per_second(10), 3).value(), clock);
  Oracle model(10, seconds(1), 3);
  REQUIRE(lim.acquire("k", 3));  // drained: TAT at 5.3 s
  REQUIRE(model.reserve(clock.now(), 3, Nanos{0}));
  const auto reserve = [&](Cost c) {
    const Nanos now = clock.now();
    const Nanos want = now + model.wait(now, c);
    REQUIRE(model.reserve(now, c, seconds(10)));
    Reserved r = lim.reserve("k", c, seconds(10));
    REQUIRE(r.held);
    REQUIRE(r.go_at == want);
    return r;
  };
  Reserved a = reserve(1);  // go at +100 ms
  Reserved b = reserve(2);  // go at +300 ms
  Reserved c = reserve(3);  // go at +600 ms
  Reserved d = reserve(1);  // go at +700 ms
  REQUIRE(a.go_at == seconds(5) + milliseconds(100));
  REQUIRE(b.go_at == seconds(5) + milliseconds(300));
  REQUIRE(c.go_at == seconds(5) + milliseconds(600));
  REQUIRE(d.go_at == seconds(5) + milliseconds(700));
  clock.advance(milliseconds(30));
  // The middle one, with c and d behind it: exactly its 200 ms come back.
  REQUIRE(lim.give_back(b.receipt).ok());
  model.give_back(2);
  REQUIRE(lim.peek("k", 0).reset_after == model.reset_after(clock.now()));
  // A new caller now waits 200 ms less than before the cancellation.
  REQUIRE(lim.peek("k", 1).retry_after == model.wait(clock.now(), 1));
  REQUIRE(model.wait(clock.now(), 1) ==
          seconds(5) + milliseconds(600) - clock.now());
  // Then the one ahead of c (moved by the give-back counter): exact too.
  clock.advance(milliseconds(20));
  REQUIRE(lim.give_back(c.receipt).ok());
  model.give_back(3);
  REQUIRE(lim.peek("k", 0).reset_after == model.reset_after(clock.now()));
  // d is the last: its whole stretch comes back.
  REQUIRE(lim.give_back(d.receipt).ok());
  model.give_back(1);
  REQUIRE(lim.peek("k", 0).reset_after == model.reset_after(clock.now()));
  // a, ahead of all three, was moved by their give-backs (the key's counter
  // does not say where they were): it gives back less than the 100 ms it
  // holds, never more.
  const Nanos before = lim.peek("k", 0).reset_after;
  REQUIRE(lim.give_back(a.receipt).ok());
  const Nanos after = lim.peek("k", 0).reset_after;
  REQUIRE(after <= before);
  REQUIRE(after >= before - milliseconds(100));
}

TEST_CASE("a wait beyond max_wait, or a cost beyond the burst, holds nothing",
          "[i17]") {
  ManualClock clock;
  TBLimiter lim(TokenBucket::create(per_second(10), 2).value(), clock);
  REQUIRE(lim.acquire("k", 2));
  const Decision before = lim.peek("k", 0);
  Reserved r = lim.reserve("k", 2, milliseconds(199));
  REQUIRE_FALSE(r.held);
  REQUIRE_FALSE(r.receipt.open());
  REQUIRE(r.decision.retry_after == milliseconds(200));
  REQUIRE(r.go_at == milliseconds(200));
  REQUIRE(lim.peek("k", 0) == before);
  Reserved never = lim.reserve("k", 3, seconds(100));
  REQUIRE_FALSE(never.held);
  REQUIRE(never.decision.never());
  REQUIRE(never.go_at == Nanos::max());
  REQUIRE(lim.peek("k", 0) == before);
  // Exactly max_wait is within it.
  Reserved ok = lim.reserve("k", 2, milliseconds(200));
  REQUIRE(ok.held);
}

TEMPLATE_TEST_CASE("a window policy promises when its window opens", "[i17]",
                   FixedWindow, SlidingWindow) {
  ManualClock clock{milliseconds(250)};
  Limiter<TestType, InMemoryStore, ManualClock> lim(
      TestType::create(per_second(2)).value(), clock);
  STATIC_REQUIRE_FALSE(
      Limiter<TestType, InMemoryStore, ManualClock>::kReservesExactly);
  Reserved first = lim.reserve("k", 2, seconds(10));
  REQUIRE(first.held);
  REQUIRE(first.go_at == clock.now());
  const Decision before = lim.peek("k", 0);
  Reserved r = lim.reserve("k", 1, seconds(10));
  REQUIRE_FALSE(r.held);
  REQUIRE_FALSE(r.receipt.open());
  // The promise is the plain acquire's retry_after, and it holds nothing.
  REQUIRE(lim.peek("k", 0) == before);
  REQUIRE(r.go_at == clock.now() + r.decision.retry_after);
  clock.set(r.go_at - Nanos{1});
  REQUIRE_FALSE(lim.acquire("k", 1));
  clock.set(r.go_at);
  REQUIRE(lim.acquire("k", 1));
}

TEST_CASE("Limit::reserve: exact on a token bucket, a promise on a window",
          "[i17]") {
  auto tb = make_limit({.name = "tpm"},
                       TokenBucket::create(per_second(10), 1).value())
                .value();
  auto fw =
      make_limit({.name = "rpm"}, FixedWindow::create(per_second(1)).value())
          .value();
  REQUIRE(tb->reserves_exactly());
  REQUIRE_FALSE(fw->reserves_exactly());
  const Nanos t0 = seconds(10);
  Reserved a = tb->reserve("k", 1, t0, seconds(1));
  Reserved b = tb->reserve("k", 1, t0, seconds(1));
  REQUIRE(a.go_at == t0);
  REQUIRE(b.held);
  REQUIRE(b.go_at == t0 + milliseconds(100));
  REQUIRE(tb->peek("k", 1, t0).retry_after == milliseconds(200));
  REQUIRE(tb->settle(b.receipt, 0, t0).ok());
  REQUIRE(tb->peek("k", 1, t0).retry_after == milliseconds(100));
  Reserved w1 = fw->reserve("k", 1, t0 + milliseconds(300), seconds(5));
  Reserved w2 = fw->reserve("k", 1, t0 + milliseconds(300), seconds(5));
  REQUIRE(w1.held);
  REQUIRE_FALSE(w2.held);
  REQUIRE(w2.go_at == seconds(11));
}

namespace {

// Counts what a limit's listener hears.
struct Heard : LimitListener {
  std::atomic<int> allowed{0}, denied{0};
  void on_allowed(const LimitEvent&) override { allowed.fetch_add(1); }
  void on_denied(const LimitEvent&) override { denied.fetch_add(1); }
};

}  // namespace

// Where waiting meets issue 17's overrides and listeners: a key with its
// own numbers reserves under them (and its receipt gives back there), and
// the listener hears a held reservation as allowed, a refused one denied.
TEST_CASE("Limit::reserve: a key's override and the limit's listener",
          "[i17]") {
  auto tb = make_limit({.name = "tpm"},
                       TokenBucket::create(per_second(10), 1).value())
                .value();
  const Nanos t0 = seconds(10);
  REQUIRE(tb->set_override("vip",
                           TokenBucket::create(per_second(100), 1).value(), t0)
              .ok());
  auto heard = std::make_shared<Heard>();
  tb->set_listener(heard);
  // The limit's numbers: 100 ms per token; the override's: 10 ms.
  Reserved a = tb->reserve("k", 1, t0, seconds(1));
  Reserved b = tb->reserve("k", 1, t0, seconds(1));
  REQUIRE((a.held && b.held));
  CHECK(b.go_at == t0 + milliseconds(100));
  Reserved v1 = tb->reserve("vip", 1, t0, seconds(1));
  Reserved v2 = tb->reserve("vip", 1, t0, seconds(1));
  Reserved v3 = tb->reserve("vip", 1, t0, seconds(1));
  REQUIRE((v1.held && v2.held && v3.held));
  CHECK(v2.go_at == t0 + milliseconds(10));
  CHECK(v3.go_at == t0 + milliseconds(20));
  // Beyond max_wait: refused, holding nothing.
  Reserved no = tb->reserve("k", 1, t0, milliseconds(150));
  CHECK_FALSE(no.held);
  CHECK(heard->allowed.load() == 5);
  CHECK(heard->denied.load() == 1);
  // Cancelling the override's middle reservation gives back there: the
  // key's next reservation goes 10 ms earlier than it would have.
  REQUIRE(tb->settle(v2.receipt, 0, t0).ok());
  CHECK(tb->peek("vip", 1, t0).retry_after == milliseconds(20));
  CHECK(tb->peek("k", 1, t0).retry_after == milliseconds(200));
  // A window policy's reservation is its take: heard as the take is.
  auto fw =
      make_limit({.name = "rpm"}, FixedWindow::create(per_second(1)).value())
          .value();
  auto fheard = std::make_shared<Heard>();
  fw->set_listener(fheard);
  CHECK(fw->reserve("k", 1, t0, seconds(5)).held);
  CHECK_FALSE(fw->reserve("k", 1, t0, seconds(5)).held);
  CHECK(fheard->allowed.load() == 1);
  CHECK(fheard->denied.load() == 1);
}

using rk_test::Waiters;

TEST_CASE(
    "Waiter: N waiters on one key go in arrival order, each exactly "
    "at its time",
    "[i17]") {
  ManualClock clock{seconds(1)};
  TBLimiter lim(TokenBucket::create(per_second(10), 1).value(), clock);
  Waiter<ManualClock> waiter(clock);
  Oracle model(10, seconds(1), 1);
  REQUIRE(lim.acquire("k", 1));
  REQUIRE(model.reserve(clock.now(), 1, Nanos{0}));
  constexpr int kN = 6;
  Waiters ws;
  std::vector<Nanos> want;
  for (int i = 0; i < kN; ++i) {
    Cost cost = 1;
    want.push_back(clock.now() + model.wait(clock.now(), cost));
    REQUIRE(model.reserve(clock.now(), cost, seconds(60)));
    ws.start([&, cost](std::stop_token st) {
      return waiter.acquire(lim, "k", cost, seconds(60), st);
    });
    REQUIRE(rk_test::eventually([&] {
      return waiter.queued(&lim, "k") == static_cast<std::size_t>(i + 1);
    }));
  }
  for (int i = 0; i < kN; ++i) {
    REQUIRE(want[static_cast<std::size_t>(i)] ==
            seconds(1) + milliseconds(100) * (i + 1));
    // 1 ns early: nobody more is admitted.
    clock.set(want[static_cast<std::size_t>(i)] - Nanos{1});
    REQUIRE(ws.done.load() == i);
    clock.set(want[static_cast<std::size_t>(i)]);
    REQUIRE(rk_test::eventually([&] { return ws.done.load() == i + 1; }));
    REQUIRE(ws.finished(static_cast<std::size_t>(i)));
    Waited& w = ws.at(static_cast<std::size_t>(i));
    REQUIRE(w.status.ok());
    REQUIRE(w.go_at == want[static_cast<std::size_t>(i)]);
    REQUIRE(w.admitted_at == want[static_cast<std::size_t>(i)]);
    REQUIRE(w.sequence == static_cast<std::uint64_t>(i + 1));
    REQUIRE(w.receipt.open());
  }
  REQUIRE(waiter.queued(&lim, "k") == 0);
  REQUIRE(lim.peek("k", 0).reset_after == model.reset_after(clock.now()));
}

TEST_CASE("Waiter: a full queue refuses at once, holding nothing", "[i17]") {
  ManualClock clock;
  TBLimiter lim(TokenBucket::create(per_second(10), 1).value(), clock);
  Waiter<ManualClock> waiter(clock, WaitOptions{.queue_limit = 2});
  REQUIRE(lim.acquire("k", 1));
  Waiters ws;
  for (int i = 0; i < 2; ++i) {
    ws.start([&](std::stop_token st) {
      return waiter.acquire(lim, "k", 1, seconds(60), st);
    });
    REQUIRE(rk_test::eventually([&] {
      return waiter.queued(&lim, "k") == static_cast<std::size_t>(i + 1);
    }));
  }
  const Decision before = lim.peek("k", 0);
  Waited third = waiter.acquire(lim, "k", 1, seconds(60));
  REQUIRE(third.status.code() == absl::StatusCode::kResourceExhausted);
  REQUIRE(std::string(third.status.message()).find("queue full") !=
          std::string::npos);
  REQUIRE_FALSE(third.receipt.open());
  REQUIRE(lim.peek("k", 0) == before);
  // Another key has its own queue.
  Waited other = waiter.acquire(lim, "other", 1, seconds(60));
  REQUIRE(other.status.ok());
  REQUIRE(other.admitted_at == Nanos{0});
  clock.set(milliseconds(200));
  REQUIRE(rk_test::eventually([&] { return ws.done.load() == 2; }));
  REQUIRE(ws.at(0).go_at == milliseconds(100));
  REQUIRE(ws.at(1).go_at == milliseconds(200));
}

TEST_CASE(
    "Waiter: a cancelled waiter gives back, and the ones behind it move "
    "earlier by exactly its cost's time",
    "[i17]") {
  ManualClock clock;
  TBLimiter lim(TokenBucket::create(per_second(10), 3).value(), clock);
  Waiter<ManualClock> waiter(clock);
  Oracle model(10, seconds(1), 3);
  REQUIRE(lim.acquire("k", 3));
  REQUIRE(model.reserve(clock.now(), 3, Nanos{0}));
  Waiters ws;
  const Cost costs[] = {1, 3, 2};  // go at 100, 400 and 600 ms
  for (int i = 0; i < 3; ++i) {
    const Cost c = costs[i];
    REQUIRE(model.reserve(clock.now(), c, seconds(60)));
    ws.start([&, c](std::stop_token st) {
      return waiter.acquire(lim, "k", c, seconds(60), st);
    });
    REQUIRE(rk_test::eventually([&] {
      return waiter.queued(&lim, "k") == static_cast<std::size_t>(i + 1);
    }));
  }
  REQUIRE(lim.peek("k", 0).reset_after == milliseconds(900));
  clock.set(milliseconds(50));
  ws.threads[1].request_stop();
  REQUIRE(rk_test::eventually([&] { return ws.finished(1); }));
  REQUIRE(ws.at(1).status.code() == absl::StatusCode::kCancelled);
  REQUIRE_FALSE(ws.at(1).receipt.open());
  model.give_back(3);
  REQUIRE(lim.peek("k", 0).reset_after == model.reset_after(clock.now()));
  // The last waiter now goes at 300 ms, not 600 ms: 300 ms earlier.
  clock.set(milliseconds(100));
  REQUIRE(rk_test::eventually([&] { return ws.finished(0); }));
  REQUIRE(ws.at(0).admitted_at == milliseconds(100));
  clock.set(milliseconds(300) - Nanos{1});
  REQUIRE_FALSE(ws.finished(2));
  clock.set(milliseconds(300));
  REQUIRE(rk_test::eventually([&] { return ws.finished(2); }));
  REQUIRE(ws.at(2).status.ok());
  REQUIRE(ws.at(2).go_at == milliseconds(300));
  REQUIRE(ws.at(2).admitted_at == milliseconds(300));
  REQUIRE(lim.peek("k", 0).reset_after == model.reset_after(clock.now()));
}

TEST_CASE("Waiter: deadlines", "[i17]") {
  SECTION("a token bucket refuses at once a wait past the deadline") {
    ManualClock clock;
    TBLimiter lim(TokenBucket::create(per_second(10), 1).value(), clock);
    Waiter<ManualClock> waiter(clock);
    REQUIRE(lim.acquire("k", 1));
    const Decision before = lim.peek("k", 0);
    Waited w = waiter.acquire(lim, "k", 1, milliseconds(99));
    REQUIRE(w.status.code() == absl::StatusCode::kDeadlineExceeded);
    REQUIRE(w.decision.retry_after == milliseconds(100));
    REQUIRE(lim.peek("k", 0) == before);
    Waited never = waiter.acquire(lim, "k", 2, seconds(100));
    REQUIRE(never.status.code() == absl::StatusCode::kOutOfRange);
  }
  SECTION("a window head whose window opens past its deadline: at once") {
    ManualClock clock{milliseconds(100)};
    Limiter<FixedWindow, ShardedStore, ManualClock> lim(
        FixedWindow::create(per_second(1)).value(), clock);
    Waiter<ManualClock> waiter(clock);
    REQUIRE(lim.acquire("k", 1));
    const Decision before = lim.peek("k", 0);
    Waited w = waiter.acquire(lim, "k", 1, milliseconds(899));
    REQUIRE(w.status.code() == absl::StatusCode::kDeadlineExceeded);
    REQUIRE(w.decision.retry_after == milliseconds(900));
    REQUIRE(lim.peek("k", 0) == before);
    REQUIRE(waiter.queued(&lim, "k") == 0);
    REQUIRE(clock.now() == milliseconds(100));
  }
  SECTION("a window waiter gives up at its deadline; the queue moves on") {
    ManualClock clock{milliseconds(100)};
    Limiter<FixedWindow, ShardedStore, ManualClock> lim(
        FixedWindow::create(per_second(1)).value(), clock);
    Waiter<ManualClock> waiter(clock);
    REQUIRE(lim.acquire("k", 1));
    Waiters ws;
    const Nanos waits[] = {seconds(5), milliseconds(300), seconds(5)};
    for (int i = 0; i < 3; ++i) {
      const Nanos mw = waits[i];
      ws.start([&, mw](std::stop_token st) {
        return waiter.acquire(lim, "k", 1, mw, st);
      });
      REQUIRE(rk_test::eventually([&] {
        return waiter.queued(&lim, "k") == static_cast<std::size_t>(i + 1);
      }));
    }
    const Decision before = lim.peek("k", 0);
    clock.set(milliseconds(400) - Nanos{1});
    REQUIRE(ws.done.load() == 0);
    clock.set(milliseconds(400));
    REQUIRE(rk_test::eventually([&] { return ws.finished(1); }));
    REQUIRE(ws.at(1).status.code() == absl::StatusCode::kDeadlineExceeded);
    REQUIRE_FALSE(ws.at(1).receipt.open());
    // Nothing taken: the window's count and end are as they were.
    REQUIRE(lim.peek("k", 0).remaining == before.remaining);
    REQUIRE(lim.peek("k", 0).reset_after ==
            before.reset_after - milliseconds(300));
    REQUIRE(waiter.queued(&lim, "k") == 2);
    // The head goes when its window opens, the third a window later.
    clock.set(seconds(1));
    REQUIRE(rk_test::eventually([&] { return ws.finished(0); }));
    REQUIRE(ws.at(0).status.ok());
    REQUIRE(ws.at(0).admitted_at == seconds(1));
    clock.set(seconds(2) - Nanos{1});
    REQUIRE_FALSE(ws.finished(2));
    clock.set(seconds(2));
    REQUIRE(rk_test::eventually([&] { return ws.finished(2); }));
    REQUIRE(ws.at(2).status.ok());
    REQUIRE(ws.at(2).admitted_at == seconds(2));
    REQUIRE(ws.at(2).sequence == ws.at(0).sequence + 1);
  }
}

TEST_CASE("Waiter on a Limit: a window waiter behind the head, in order",
          "[i17]") {
  ManualClock clock{milliseconds(100)};
  Chain<ManualClock> chain(clock);
  auto rpm =
      make_limit({.name = "rps"}, SlidingWindow::create(per_second(2)).value())
          .value();
  Waiter<ManualClock> waiter(clock);
  REQUIRE(rpm->acquire("k", 2, clock.now()));
  const Decision promise = rpm->peek("k", 1, clock.now());
  Waiters ws;
  for (int i = 0; i < 3; ++i) {
    ws.start([&](std::stop_token st) {
      return waiter.acquire(*rpm, "k", 1, seconds(10), st);
    });
    REQUIRE(rk_test::eventually([&] {
      return waiter.queued(rpm.get(), "k") == static_cast<std::size_t>(i + 1);
    }));
  }
  // The head goes exactly when the sliding window first admits one.
  const Nanos go = milliseconds(100) + promise.retry_after;
  clock.set(go - Nanos{1});
  REQUIRE(ws.done.load() == 0);
  clock.set(go);
  REQUIRE(rk_test::eventually([&] { return ws.done.load() >= 1; }));
  REQUIRE(ws.finished(0));
  REQUIRE(ws.at(0).admitted_at == go);
  // The rest, each when the window admits it, in order.
  for (int expect = 2; expect <= 3; ++expect) {
    for (int step = 0; step < 1000 && ws.done.load() < expect; ++step) {
      const Decision d = rpm->peek("k", 1, clock.now());
      if (d.allowed) {
        clock.advance(Nanos{0});  // wakes the head, which takes it
        rk_test::eventually([&] { return ws.done.load() >= expect; },
                            milliseconds(50));
      } else {
        clock.advance(d.retry_after);
      }
    }
    REQUIRE(ws.done.load() >= expect);
  }
  REQUIRE(rk_test::eventually([&] { return ws.done.load() == 3; }));
  for (std::size_t i = 0; i < 3; ++i) REQUIRE(ws.at(i).status.ok());
  REQUIRE(ws.at(1).sequence == ws.at(0).sequence + 1);
  REQUIRE(ws.at(2).sequence == ws.at(1).sequence + 1);
  REQUIRE(ws.at(1).admitted_at <= ws.at(2).admitted_at);
}

TEST_CASE("Waiter: jitter delays the wake-up, never admits early", "[i17]") {
  ManualClock clock;
  clock.set_auto_advance(true);  // simulated time: no thread sleeps
  TBLimiter lim(TokenBucket::create(per_second(10), 1).value(), clock);
  Waiter<ManualClock> waiter(
      clock, WaitOptions{.jitter = milliseconds(30), .seed = 7});
  Oracle model(10, seconds(1), 1);
  std::vector<std::int64_t> extra;
  for (int i = 0; i < 200; ++i) {
    const Nanos now = clock.now();
    const Nanos go = now + model.wait(now, 1);
    REQUIRE(model.reserve(now, 1, seconds(1)));
    Waited w = waiter.acquire(lim, "k", 1, seconds(1));
    REQUIRE(w.status.ok());
    REQUIRE(w.go_at == go);
    REQUIRE(w.admitted_at >= w.go_at);
    REQUIRE(w.admitted_at <= w.go_at + milliseconds(30));
    REQUIRE(clock.now() == w.admitted_at);
    extra.push_back((w.admitted_at - w.go_at).count());
  }
  std::sort(extra.begin(), extra.end());
  // Spread over [0, 30 ms]: many distinct values, both halves used.
  REQUIRE(std::unique(extra.begin(), extra.end()) - extra.begin() > 150);
  REQUIRE(extra.front() < milliseconds(5).count());
  REQUIRE(extra.back() > milliseconds(25).count());
}

TEST_CASE(
    "Waiter: real threads never exceed the limit and go in arrival "
    "order",
    "[i17][concurrency]") {
  // 2 ms per token, burst 1: each admission's go_at is at least 2 ms after
  // the previous one's, whatever the threads' timing.
  constexpr std::uint64_t kRate = 500;
  const Nanos interval = milliseconds(2);
  Limiter<TokenBucket, ShardedStore, SteadyClock> lim(
      TokenBucket::create(per_second(kRate), 1).value());
  Waiter<SteadyClock> waiter;
  constexpr int kThreads = 8;
  constexpr int kRounds = 3;
  for (int round = 0; round < kRounds; ++round) {
    REQUIRE(lim.reserve("k", 1, seconds(1)).held);  // no burst left
    Waiters ws;
    std::stop_source cancel_one;
    for (int i = 0; i < kThreads; ++i) {
      ws.start([&, i](std::stop_token) {
        // One waiter in the middle is cancelled by the test.
        return waiter.acquire(
            lim, "k", 1, seconds(30),
            i == 3 ? cancel_one.get_token() : std::stop_token{});
      });
      // Arrival order is the index order: each queued (or through)
      // before the next starts.
      REQUIRE(rk_test::eventually([&] {
        return ws.done.load() + static_cast<int>(waiter.queued(&lim, "k")) >=
               i + 1;
      }));
    }
    cancel_one.request_stop();
    REQUIRE(rk_test::eventually([&] { return ws.done.load() == kThreads; }));
    std::vector<const Waited*> admitted;
    for (std::size_t i = 0; i < kThreads; ++i) {
      const Waited& w = ws.at(i);
      if (i == 3 && !w.status.ok()) {
        REQUIRE(w.status.code() == absl::StatusCode::kCancelled);
        continue;
      }
      REQUIRE(w.status.ok());
      REQUIRE(w.admitted_at >= w.go_at);
      admitted.push_back(&w);
    }
    for (std::size_t i = 1; i < admitted.size(); ++i) {
      // Arrival order, and the limit over every window: with burst 1, any
      // two admissions are at least one interval apart.
      REQUIRE(admitted[i]->sequence > admitted[i - 1]->sequence);
      REQUIRE(admitted[i]->go_at - admitted[i - 1]->go_at >= interval);
    }
    for (auto& t : ws.threads) t.join();
    REQUIRE(waiter.queued(&lim, "k") == 0);
  }
}

TEST_CASE(
    "Waiter on a chain's token-bucket Limit: exact, and its receipt "
    "settles on the limit",
    "[i17]") {
  ManualClock clock;
  clock.set_auto_advance(true);  // simulated time
  Chain<ManualClock> chain(clock);
  auto tpm = make_limit({.name = "tpm", .unit = Unit::kTokens},
                        TokenBucket::create(per_second(1000), 500).value())
                 .value();
  Waiter<ManualClock> waiter(clock);  // the chain's clock
  ChainDecision d = chain.acquire({{tpm.get(), "k", 500}});
  REQUIRE(d.allowed);
  Waited w = waiter.acquire(*tpm, "k", 200, seconds(1));
  REQUIRE(w.status.ok());
  REQUIRE(w.go_at == milliseconds(200));
  REQUIRE(w.admitted_at == milliseconds(200));
  REQUIRE(clock.now() == milliseconds(200));
  // Settled to 100 of its 200 tokens: 100 ms of its stretch come back.
  REQUIRE(tpm->settle(w.receipt, 100, clock.now()).ok());
  REQUIRE(tpm->peek("k", 0, clock.now()).reset_after == milliseconds(400));
}

TEST_CASE("Waiter with queue_limit 0: admitted at once or refused at once",
          "[i17]") {
  ManualClock clock;
  TBLimiter lim(TokenBucket::create(per_second(10), 1).value(), clock);
  Waiter<ManualClock> waiter(clock, WaitOptions{.queue_limit = 0});
  Waited first = waiter.acquire(lim, "k", 1, seconds(10));
  REQUIRE(first.status.ok());
  const Decision before = lim.peek("k", 0);
  Waited second = waiter.acquire(lim, "k", 1, seconds(10));
  REQUIRE(second.status.code() == absl::StatusCode::kResourceExhausted);
  REQUIRE_FALSE(second.receipt.open());
  REQUIRE(lim.peek("k", 0) == before);
  REQUIRE(waiter.queued(&lim, "k") == 0);
}

TEST_CASE("ManualClock: subscriptions, advance_to, auto-advance", "[i17]") {
  ManualClock clock{seconds(1)};
  int calls = 0;
  std::vector<Nanos> seen;
  {
    ManualClock::Subscription sub = clock.subscribe([&] {
      ++calls;
      seen.push_back(clock.now());
    });
    clock.advance(milliseconds(5));
    clock.set(seconds(3));
    // advance_to never moves the clock back, and still notifies.
    REQUIRE(clock.advance_to(seconds(2)) == seconds(3));
    REQUIRE(clock.advance_to(seconds(4)) == seconds(4));
    REQUIRE(calls == 4);
    REQUIRE(seen == std::vector<Nanos>{seconds(1) + milliseconds(5), seconds(3),
                                       seconds(3), seconds(4)});
    // A copy shares the time and the subscribers.
    ManualClock copy = clock;
    copy.advance(Nanos{1});
    REQUIRE(calls == 5);
    ManualClock::Subscription moved = std::move(sub);
    clock.advance(Nanos{1});
    REQUIRE(calls == 6);
  }
  // Unsubscribed with the subscription's end.
  clock.advance(Nanos{1});
  REQUIRE(calls == 6);
  REQUIRE_FALSE(clock.auto_advance());
  clock.set_auto_advance(true);
  REQUIRE(clock.auto_advance());
}

TEST_CASE(
    "Waiter: real threads on a fixed window: at most the limit per "
    "window, in arrival order",
    "[i17][concurrency]") {
  // 2 per 20 ms window; 8 waiters need 4 windows.
  constexpr std::uint64_t kLimit = 2;
  const Nanos period = milliseconds(20);
  Limiter<FixedWindow, ShardedStore, SteadyClock> lim(
      FixedWindow::create(per(kLimit, period)).value());
  Waiter<SteadyClock> waiter;
  constexpr int kThreads = 8;
  Waiters ws;
  for (int i = 0; i < kThreads; ++i) {
    ws.start([&](std::stop_token st) {
      return waiter.acquire(lim, "k", 1, seconds(30), st);
    });
    REQUIRE(rk_test::eventually([&] {
      return ws.done.load() + static_cast<int>(waiter.queued(&lim, "k")) >=
             i + 1;
    }));
  }
  REQUIRE(rk_test::eventually([&] { return ws.done.load() == kThreads; }));
  std::map<std::int64_t, std::uint64_t> per_window;
  for (std::size_t i = 0; i < kThreads; ++i) {
    const Waited& w = ws.at(i);
    REQUIRE(w.status.ok());
    REQUIRE(w.admitted_at >= w.go_at);
    // go_at is the admitting take's own time: its window is the one it
    // counted in.
    ++per_window[w.go_at.count() / period.count()];
    if (i > 0) {
      REQUIRE(w.sequence > ws.at(i - 1).sequence);
      REQUIRE(w.go_at >= ws.at(i - 1).go_at);
    }
  }
  for (const auto& [window, n] : per_window) REQUIRE(n <= kLimit);
  for (auto& t : ws.threads) t.join();
}

// --- Findings of the issue 17 examination (exam18b) ---

TEST_CASE(
    "Waiter: a late cancel moves the waiters behind by what the give-back "
    "returned, never more",
    "[i17]") {
  // Bucket 1/s burst 1; Z takes at 0; A, B, C, D reserve go 1, 2, 3, 4 s.
  // Jitter 2 s, seed 127: A's 1.843 s keeps it asleep past B's turn; B is
  // cancelled at 2.5 s: its give-back returns only the 0.5 s still ahead,
  // so the model bucket places C at [2.5, 3.5) and D at [3.5, 4.5).
  ManualClock clock;
  TBLimiter lim(TokenBucket::create(per_second(1), 1).value(), clock);
  Waiter<ManualClock> waiter(
      clock, WaitOptions{.queue_limit = 64, .jitter = seconds(2), .seed = 127});
  Oracle model(1, seconds(1), 1);
  REQUIRE(lim.acquire("k", 1));
  REQUIRE(model.reserve(Nanos{0}, 1, Nanos{0}));
  Waiters ws;
  for (int i = 0; i < 4; ++i) {
    REQUIRE(model.reserve(Nanos{0}, 1, seconds(100)));
    ws.start([&](std::stop_token st) {
      return waiter.acquire(lim, "k", 1, seconds(100), st);
    });
    REQUIRE(rk_test::eventually([&] {
      return waiter.queued(&lim, "k") == static_cast<std::size_t>(i + 1);
    }));
  }
  clock.set(milliseconds(2500));
  ws.threads[1].request_stop();
  REQUIRE(rk_test::eventually([&] { return ws.finished(1); }));
  REQUIRE(ws.at(1).status.code() == absl::StatusCode::kCancelled);
  // The model: B's stretch [2, 3) gives back only [2.5, 3).
  model.tat -= static_cast<i128>(Nanos{milliseconds(500)}.count());
  REQUIRE(lim.peek("k", 0).reset_after == model.reset_after(clock.now()));
  const Nanos d_own = Nanos{static_cast<std::int64_t>(model.tat)} - seconds(1);
  REQUIRE(d_own == milliseconds(3500));
  // 1 ns before D's capacity is its own: A and C go (C's jitter is below
  // 0.85 s, the examiner's run), D does not.
  clock.set(d_own - Nanos{1});
  REQUIRE(rk_test::eventually([&] { return ws.done.load() == 3; }));
  REQUIRE(!ws.finished(3));
  REQUIRE(waiter.queued(&lim, "k") == 1);
  clock.set(seconds(7));
  REQUIRE(rk_test::eventually([&] { return ws.done.load() == 4; }));
  for (std::size_t i : {0u, 2u, 3u}) {
    const Waited& w = ws.at(i);
    REQUIRE(w.status.ok());
    REQUIRE(w.admitted_at >= w.go_at);
  }
  // Moved by the 0.5 s returned, at most (less 1 ns: docs/waiting.md).
  REQUIRE(ws.at(2).go_at >= milliseconds(2500));
  REQUIRE(ws.at(2).go_at <= milliseconds(2500) + Nanos{1});
  REQUIRE(ws.at(3).go_at >= d_own);
  REQUIRE(ws.at(3).go_at <= d_own + Nanos{1});
  REQUIRE(ws.at(3).admitted_at >= d_own);
}

TEST_CASE(
    "Waiter: a give-back that returns less than it held (a later one given "
    "back first) moves the waiters behind by what it returned",
    "[i17]") {
  // Bucket 1/s burst 1; Z at 0; A, B, C reserve go 1, 2, 3 s. B cancelled
  // at 0 (returns 1 s: C's go 2 s), then A at 0.5 s: the bucket moves A's
  // record by B's give-back too (token_bucket.hpp, shift()), so A returns
  // only 0.5 s: C's capacity is C's from 1.5 s, not 1 s.
  ManualClock clock;
  TBLimiter lim(TokenBucket::create(per_second(1), 1).value(), clock);
  Waiter<ManualClock> waiter(clock);
  REQUIRE(lim.acquire("k", 1));
  Waiters ws;
  for (int i = 0; i < 3; ++i) {
    ws.start([&](std::stop_token st) {
      return waiter.acquire(lim, "k", 1, seconds(100), st);
    });
    REQUIRE(rk_test::eventually([&] {
      return waiter.queued(&lim, "k") == static_cast<std::size_t>(i + 1);
    }));
  }
  ws.threads[1].request_stop();
  REQUIRE(rk_test::eventually([&] { return ws.finished(1); }));
  clock.set(milliseconds(500));
  ws.threads[0].request_stop();
  REQUIRE(rk_test::eventually([&] { return ws.finished(0); }));
  REQUIRE(ws.at(0).status.code() == absl::StatusCode::kCancelled);
  // What the limit says: full again at 2.5 s, so C (burst 1) goes at 1.5 s.
  const Nanos tat = clock.now() + lim.peek("k", 0).reset_after;
  REQUIRE(tat == milliseconds(2500));
  clock.set(milliseconds(1500) - Nanos{1});
  clock.set(milliseconds(1500) + Nanos{1});
  REQUIRE(rk_test::eventually([&] { return ws.done.load() == 3; }));
  REQUIRE(ws.at(2).status.ok());
  REQUIRE(ws.at(2).go_at >= milliseconds(1500));
  REQUIRE(ws.at(2).go_at <= milliseconds(1500) + Nanos{1});
  REQUIRE(ws.at(2).admitted_at >= ws.at(2).go_at);
}

TEST_CASE(
    "Waiter: every reserved waiter is admitted by its own deadline, even "
    "behind a head whose jitter runs past it",
    "[i17]") {
  // Bucket 1/s burst 1, jitter 2 s, seed 127: A (max_wait 100 s, go 1 s)
  // would wake at 2.843 s; B (max_wait 2.2 s, go 2 s) must be admitted by
  // 2.2 s, so A is too.
  ManualClock clock;
  TBLimiter lim(TokenBucket::create(per_second(1), 1).value(), clock);
  Waiter<ManualClock> waiter(
      clock, WaitOptions{.queue_limit = 64, .jitter = seconds(2), .seed = 127});
  REQUIRE(lim.acquire("k", 1));
  Waiters ws;
  const Nanos waits[] = {seconds(100), milliseconds(2200)};
  for (int i = 0; i < 2; ++i) {
    const Nanos mw = waits[i];
    ws.start([&, mw](std::stop_token st) {
      return waiter.acquire(lim, "k", 1, mw, st);
    });
    REQUIRE(rk_test::eventually([&] {
      return waiter.queued(&lim, "k") == static_cast<std::size_t>(i + 1);
    }));
  }
  clock.set(milliseconds(2200));
  REQUIRE(rk_test::eventually([&] { return ws.done.load() == 2; }));
  for (std::size_t i = 0; i < 2; ++i) {
    const Waited& w = ws.at(i);
    REQUIRE(w.status.ok());
    REQUIRE(w.admitted_at >= w.go_at);
    REQUIRE(w.admitted_at <= w.arrived + waits[i]);
  }
  REQUIRE(ws.at(0).go_at == seconds(1));
  REQUIRE(ws.at(1).go_at == seconds(2));
}

TEST_CASE(
    "give-backs move later reservations by holds or holds + 1 ns; a "
    "Waiter's cancel moves its waiters by at most that",
    "[i17]") {
  // 3/s burst 3 and other periods that are not whole ns: a reservation
  // given back whole moves the next one by its holds or holds + 1 ns (go
  // times are rounded up); the Waiter moves by holds, never more.
  std::mt19937_64 rng(20261207);
  int plus_one = 0;
  for (int round = 0; round < 120; ++round) {
    const std::uint64_t rate = 1 + rng() % 9;
    const Cost cost = 1 + rng() % 3;
    const std::uint64_t burst = cost + rng() % 3;
    const Nanos t0{static_cast<std::int64_t>(rng() % 1'000'000'000)};
    const auto tb = TokenBucket::create(per_second(rate), burst).value();
    // The model: B alone behind Z.
    ManualClock mc{t0};
    TBLimiter m(tb, mc);
    REQUIRE(m.acquire("k", burst));
    const Reserved mb = m.reserve("k", cost, seconds(100));
    REQUIRE(mb.held);
    // Plain reserve/give_back: holds or holds + 1.
    {
      ManualClock c{t0};
      TBLimiter l(tb, c);
      REQUIRE(l.acquire("k", burst));
      Reserved a = l.reserve("k", cost, seconds(100));
      const Reserved b = l.reserve("k", cost, seconds(100));
      REQUIRE(l.give_back(a.receipt).ok());
      const Nanos moved = b.go_at - mb.go_at;
      REQUIRE((moved == a.holds || moved == a.holds + Nanos{1}));
      if (moved != a.holds) ++plus_one;
    }
    // Through a Waiter: A cancelled before its go time.
    ManualClock clock{t0};
    TBLimiter lim(tb, clock);
    Waiter<ManualClock> waiter(clock);
    REQUIRE(lim.acquire("k", burst));
    Waiters ws;
    for (int i = 0; i < 2; ++i) {
      ws.start([&](std::stop_token st) {
        return waiter.acquire(lim, "k", cost, seconds(100), st);
      });
      REQUIRE(rk_test::eventually([&] {
        return waiter.queued(&lim, "k") == static_cast<std::size_t>(i + 1);
      }));
    }
    ws.threads[0].request_stop();
    REQUIRE(rk_test::eventually([&] { return ws.finished(0); }));
    clock.set(mb.go_at - Nanos{1});
    clock.set(mb.go_at + Nanos{2});
    REQUIRE(rk_test::eventually([&] { return ws.done.load() == 2; }));
    const Waited& b = ws.at(1);
    REQUIRE(b.status.ok());
    REQUIRE(b.go_at >= mb.go_at);
    REQUIRE(b.go_at <= mb.go_at + Nanos{1});
    REQUIRE(b.admitted_at >= b.go_at);
  }
  REQUIRE(plus_one > 0);  // the rounding case was met
}

TEST_CASE(
    "Waiter: reset(key) forgets what reservations held; they still go, "
    "uncounted",
    "[i17]") {
  auto lim =
      make_limit({.name = "tpm"}, TokenBucket::create(per_second(1), 1).value())
          .value();
  ManualClock clock;
  Waiter<ManualClock> waiter(clock);
  REQUIRE(lim->acquire("k", 1, Nanos{0}).allowed);
  Waiters ws;
  for (int i = 0; i < 2; ++i) {
    ws.start([&](std::stop_token st) {
      return waiter.acquire(*lim, "k", 1, seconds(100), st);
    });
    REQUIRE(rk_test::eventually([&] {
      return waiter.queued(lim.get(), "k") == static_cast<std::size_t>(i + 1);
    }));
  }
  clock.set(milliseconds(500));
  REQUIRE(lim->reset("k", clock.now()).ok());
  // As a fresh key: a plain call is admitted (the model: an empty bucket's
  // TAT is now + 1 s after it).
  REQUIRE(lim->acquire("k", 1, clock.now()).allowed);
  REQUIRE(lim->peek("k", 0, clock.now()).reset_after == seconds(1));
  // B's give-back returns nothing into the fresh state, and moves nobody.
  ws.threads[1].request_stop();
  REQUIRE(rk_test::eventually([&] { return ws.finished(1); }));
  REQUIRE(ws.at(1).status.code() == absl::StatusCode::kCancelled);
  REQUIRE(lim->peek("k", 0, clock.now()).reset_after == seconds(1));
  // A still goes at its go time, 1 s, uncounted by the fresh state.
  clock.set(seconds(1) - Nanos{1});
  clock.set(seconds(1));
  REQUIRE(rk_test::eventually([&] { return ws.finished(0); }));
  REQUIRE(ws.at(0).status.ok());
  REQUIRE(ws.at(0).go_at == seconds(1));
  REQUIRE(ws.at(0).admitted_at == seconds(1));
  REQUIRE(lim->peek("k", 0, clock.now()).reset_after == milliseconds(500));
}

TEST_CASE("Waiter: a shadow limit still waits (shadow is Chain's)", "[i17]") {
  auto lim = make_limit({.name = "tpm", .shadow = true},
                        TokenBucket::create(per_second(1), 1).value())
                 .value();
  ManualClock clock;
  clock.set_auto_advance(true);
  Waiter<ManualClock> waiter(clock);
  REQUIRE(lim->acquire("k", 1, Nanos{0}).allowed);
  Waited w = waiter.acquire(*lim, "k", 1, seconds(5));
  REQUIRE(w.status.ok());
  REQUIRE(w.go_at == seconds(1));
  REQUIRE(w.admitted_at == seconds(1));
  // A wait beyond max_wait is refused as on an enforced limit.
  Waited late = waiter.acquire(*lim, "k", 1, milliseconds(500));
  REQUIRE(late.status.code() == absl::StatusCode::kDeadlineExceeded);
}
