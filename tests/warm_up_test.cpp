// Issue 17: warm-up (warm_up.hpp). Every expected decision comes from an
// independent model computed here: a GCRA kept as an exact fraction whose
// token interval and burst change at the staircase's step starts, its stored
// TAT (whole ns and a remainder) read under the step in force (the carry
// rule of Carry::kAsStored), the step moving at the first call at or after
// each start. The model is written from the stated rules, not from
// TokenBucket's code.
#include "ratekeeper/warm_up.hpp"

#include <algorithm>
#include <atomic>
#include <catch2/catch.hpp>
#include <cstdint>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "ratekeeper/chain.hpp"
#include "ratekeeper/listener.hpp"
#include "ratekeeper/policy/token_bucket.hpp"
#include "ratekeeper/waiting.hpp"
#include "test_util.hpp"
#include "wait.hpp"

using namespace ratekeeper;
using rk_test::kMs;
using rk_test::kSec;
using i128 = ratekeeper::detail::i128;

namespace {

i128 floor_div(i128 a, i128 b) {
  i128 q = a / b;
  if ((a % b != 0) && ((a < 0) != (b < 0))) --q;
  return q;
}
i128 ceil_div(i128 a, i128 b) { return -floor_div(-a, b); }

// The staircase, from the rules: step k of n refills one token every
// period * n / (count * k) ns, with a burst of max(1, floor(burst * k / n)).
struct Config {
  std::uint64_t count;
  std::int64_t period;
  std::uint64_t burst;
  std::uint32_t steps;
  std::int64_t duration;
};

struct Nums {
  i128 num;  // token interval = num / den ns
  i128 den;
  std::uint64_t burst;
};

Nums nums(const Config& c, std::uint32_t k) {
  const i128 a = static_cast<i128>(c.period) * c.steps;
  const i128 b = static_cast<i128>(c.count) * k;
  const auto g = static_cast<i128>(
      std::gcd(static_cast<std::uint64_t>(a), static_cast<std::uint64_t>(b)));
  const std::uint64_t burst = c.burst * k / c.steps;
  return Nums{a / g, b / g, burst == 0 ? 1 : burst};
}

// The model: one GCRA per key over the staircase.
struct Model {
  Model(const Config& config, std::int64_t t) : c(config), start(t) {}
  Config c;
  std::int64_t start;
  std::uint32_t step = 1;
  struct Tat {
    i128 whole = INT64_MIN;  // never seen: the far past
    i128 frac = 0;
  };
  std::map<std::string, Tat> keys;

  std::int64_t step_start(std::uint32_t k) const {
    return start + static_cast<std::int64_t>(static_cast<i128>(c.duration) *
                                             (k - 1) / c.steps);
  }
  void restart(std::int64_t t) {
    start = t;
    step = 1;
  }
  void move(std::int64_t t) {
    while (step < c.steps && t >= step_start(step + 1)) ++step;
  }
  i128 decode(const Tat& s, const Nums& n) const {
    return s.whole * n.den + std::min(s.frac, n.den - 1);
  }
  static Tat encode(i128 v, const Nums& n) {
    const i128 w = floor_div(v, n.den);
    return Tat{w, v - w * n.den};
  }
  static std::uint64_t rem(i128 tat, i128 now_s, const Nums& n) {
    const i128 room = static_cast<i128>(n.burst) * n.num - (tat - now_s);
    return room <= 0 ? 0 : static_cast<std::uint64_t>(room / n.num);
  }
  static Nanos ceil_ns(i128 v, const Nums& n) {
    return v <= 0 ? Nanos{0}
                  : Nanos{static_cast<std::int64_t>(ceil_div(v, n.den))};
  }
  // What the call decides; with `commit`, its state kept. `placed` gets the
  // take's stretch [from, until) and its units.
  Decision decide(const std::string& key, std::uint64_t cost, std::int64_t t,
                  bool commit, i128* from = nullptr, Nums* unit = nullptr) {
    move(t);
    const Nums n = nums(c, step);
    Tat& s = keys[key];
    const i128 now_s = static_cast<i128>(t) * n.den;
    const i128 base = std::max(decode(s, n), now_s);
    Decision d;
    d.limit = n.burst;
    if (cost > n.burst) {
      d.allowed = false;
      d.remaining = rem(base, now_s, n);
      d.reset_after = ceil_ns(base - now_s, n);
      d.retry_after = kNever;
      if (cost <= c.burst) {
        std::uint32_t j = 1;
        while (nums(c, j).burst < cost) ++j;
        const std::int64_t w = step_start(j) - t;
        d.retry_after = Nanos{std::max<std::int64_t>(w, 1)};
      }
      return d;
    }
    const i128 next = base + static_cast<i128>(cost) * n.num;
    const i128 span = static_cast<i128>(n.burst) * n.num;
    // A zero cost is always allowed, in debt too (docs/policies.md).
    if (next - now_s <= span || cost == 0) {
      d.allowed = true;
      d.remaining = rem(next, now_s, n);
      d.reset_after = ceil_ns(next - now_s, n);
      if (commit && cost != 0) s = encode(next, n);
      if (from != nullptr) *from = base;
      if (unit != nullptr) *unit = n;
      return d;
    }
    d.allowed = false;
    d.remaining = rem(base, now_s, n);
    d.reset_after = ceil_ns(base - now_s, n);
    const i128 at = base - (span - static_cast<i128>(cost) * n.num);
    d.retry_after = Nanos{static_cast<std::int64_t>(ceil_div(at, n.den) - t)};
    return d;
  }
};

void same(const Decision& got, const Decision& want) {
  INFO("allowed " << got.allowed << "/" << want.allowed << " remaining "
                  << got.remaining << "/" << want.remaining << " retry "
                  << got.retry_after.count() << "/" << want.retry_after.count()
                  << " reset " << got.reset_after.count() << "/"
                  << want.reset_after.count() << " limit " << got.limit << "/"
                  << want.limit);
  REQUIRE(got.allowed == want.allowed);
  REQUIRE(got.limit == want.limit);
  REQUIRE(got.remaining == want.remaining);
  REQUIRE(got.retry_after == want.retry_after);
  REQUIRE(got.reset_after == want.reset_after);
}

std::unique_ptr<WarmUpLimit<>> make(const Config& c, std::int64_t start) {
  auto full = TokenBucket::create(Rate{c.count, Nanos{c.period}}, c.burst);
  REQUIRE(full.ok());
  auto l = make_warm_up_limit({.name = "warm"}, *full,
                              WarmUp{Nanos{c.duration}, c.steps}, Nanos{start});
  REQUIRE(l.ok());
  return *std::move(l);
}

constexpr std::int64_t kT0 = 3600 * kSec;

// Whole-ns intervals in every step (den 1), and fractional ones.
const Config kConfigs[] = {
    {10, 60 * kSec, 10, 5, 50 * kSec},  // 60/k s per token: whole
    {12, kSec, 12, 4, 4 * kSec},        // 1/(3k) s: fractions of a ns
    {7, kSec, 20, 3, 3 * kSec + 1},     // 7k/3 per s, burst 6, 13, 20
    {100, kSec, 3, 6, 600 * kMs},       // bursts 1 (rounded up), 1, 1, 2, 2, 3
    {5, 2 * kSec, 8, 1, kSec},          // one step: no ramp
};

}  // namespace

TEST_CASE("warm-up: random calls across the ramp give the model's decisions",
          "[i17]") {
  std::mt19937_64 rng(1717);
  for (const Config& c : kConfigs) {
    INFO("config count " << c.count << " period " << c.period << " burst "
                         << c.burst << " steps " << c.steps);
    auto limit = make(c, kT0);
    Model m{c, kT0};
    const std::string keys[] = {"a", "b", "c"};
    std::int64_t t = kT0 - c.duration / 10;  // a little before the start too
    const std::int64_t end = kT0 + c.duration + c.duration / 2;
    const std::int64_t stride = std::max<std::int64_t>(1, (end - t) / 6000);
    int restarts = 0;
    // Allowed at full rate, allowed warming, kNever, refused until a later
    // step holds the cost, refused with a wait.
    int seen[5] = {0, 0, 0, 0, 0};
    for (int i = 0; i < 12000; ++i) {
      const int r = static_cast<int>(rng() % 100);
      std::int64_t now = t;
      if (r < 5)
        now = t - static_cast<std::int64_t>(
                      rng() % static_cast<std::uint64_t>(2 * stride + 1));
      if (r >= 95 && m.step < c.steps) {
        // Exactly at the next step's start, or 1 ns before it.
        now = m.step_start(m.step + 1) - static_cast<std::int64_t>(rng() % 2);
        t = std::max(t, now);
      }
      const std::string& key = keys[rng() % 3];
      const std::uint64_t cost = rng() % (c.burst + 2);
      INFO("call " << i << " at " << now - kT0 << " cost " << cost);
      if (r < 50) {
        const Decision want = m.decide(key, cost, now, true);
        same(limit->acquire(key, cost, Nanos{now}), want);
        ++seen[want.allowed ? (m.step == c.steps ? 0 : 1)
                            : (want.never() ? 2 : (cost > want.limit ? 3 : 4))];
      } else if (r < 70) {
        same(limit->peek(key, cost, Nanos{now}),
             m.decide(key, cost, now, false));
      } else if (r < 99 || restarts >= 2) {
        Receipt rec;
        const Decision want = m.decide(key, cost, now, true);
        same(limit->take(key, cost, Nanos{now}, rec), want);
        if (!want.allowed) REQUIRE_FALSE(rec.open());
        if (want.allowed && cost != 0) REQUIRE(rec.open());
        REQUIRE(limit->step() == m.step);
      } else {
        limit->restart_warm_up(Nanos{now});
        m.restart(now);
        ++restarts;
        REQUIRE(limit->step() == 1);
      }
      t += static_cast<std::int64_t>(
          rng() % static_cast<std::uint64_t>(2 * stride + 1));
    }
    REQUIRE(limit->step() == m.step);
    CHECK(seen[0] > 0);
    CHECK(seen[2] > 0);
    CHECK(seen[4] > 0);
    if (c.steps > 1) {
      CHECK(seen[1] > 0);
      CHECK(seen[3] > 0);
    }
  }
}

TEST_CASE("warm-up: admitted units per step never exceed the step's allowance",
          "[i17]") {
  // One key hammered at random times: in step k (length L), at most
  // burst_k + L / interval_k units (the GCRA bound over the step).
  std::mt19937_64 rng(42);
  for (const Config& c : kConfigs) {
    auto limit = make(c, kT0);
    std::vector<std::uint64_t> admitted(c.steps + 1, 0);
    std::int64_t t = kT0;
    const std::int64_t end = kT0 + c.duration;
    const std::int64_t stride = std::max<std::int64_t>(1, c.duration / 4000);
    while (t < end) {
      const std::uint64_t cost = 1 + rng() % 2;
      const Decision d = limit->acquire("k", cost, Nanos{t});
      if (d.allowed) admitted[limit->step()] += cost;
      t += static_cast<std::int64_t>(
          rng() % static_cast<std::uint64_t>(2 * stride + 1));
    }
    Model m{c, kT0};
    for (std::uint32_t k = 1; k <= c.steps; ++k) {
      const Nums n = nums(c, k);
      const i128 len = m.step_start(k + 1) - m.step_start(k);
      const i128 len_k = k == c.steps ? end - m.step_start(k) : len;
      INFO("step " << k << " admitted " << admitted[k]);
      // admitted * num <= burst * num + len * den
      REQUIRE(static_cast<i128>(admitted[k]) * n.num <=
              static_cast<i128>(n.burst) * n.num + len_k * n.den);
      // And the hammering got close to it: the ramp is not just refusing.
      REQUIRE(static_cast<i128>(admitted[k] + 2 + n.burst) * n.num >=
              len_k * n.den);
    }
  }
}

TEST_CASE("warm-up: after the ramp the limit is the plain token bucket",
          "[i17]") {
  const Config c = kConfigs[1];
  auto limit = make(c, kT0);
  auto plain =
      make_limit(
          {.name = "plain"},
          TokenBucket::create(Rate{c.count, Nanos{c.period}}, c.burst).value())
          .value();
  std::mt19937_64 rng(7);
  std::int64_t t = kT0 + c.duration;
  static_cast<void>(limit->acquire("warm-key", 3, Nanos{kT0}));
  REQUIRE(limit->step() == 1);
  for (int i = 0; i < 5000; ++i) {
    const std::string key = "k" + std::to_string(rng() % 4);
    const std::uint64_t cost = rng() % (c.burst + 2);
    same(limit->acquire(key, cost, Nanos{t}),
         plain->acquire(key, cost, Nanos{t}));
    t += static_cast<std::int64_t>(rng() % (30 * kMs));
  }
  REQUIRE(limit->step() == c.steps);
  REQUIRE(limit->limit() == c.burst);
  REQUIRE(limit->window() == plain->window());
}

TEST_CASE("warm-up: restart_warm_up starts the staircase over", "[i17]") {
  // 30/s burst 30 in 3 steps of 1 s: 10/s (10), 20/s (20), 30/s (30).
  auto limit = make({30, kSec, 30, 3, 3 * kSec}, kT0);
  const std::int64_t t = kT0 + 10 * kSec;
  Decision d = limit->acquire("u", 30, Nanos{t});
  REQUIRE(d.allowed);  // warm: the full burst
  REQUIRE(limit->step() == 3);
  limit->restart_warm_up(Nanos{t + 2 * kSec});  // full again by then
  REQUIRE(limit->step() == 1);
  REQUIRE(limit->started_at() == Nanos{t + 2 * kSec});
  d = limit->acquire("u", 11, Nanos{t + 2 * kSec});
  REQUIRE_FALSE(d.allowed);  // above step 1's burst: not before step 2
  REQUIRE(d.limit == 10);
  REQUIRE(d.retry_after == Nanos{kSec});
  d = limit->acquire("u", 10, Nanos{t + 2 * kSec});
  REQUIRE(d.allowed);
  REQUIRE(d.remaining == 0);
  REQUIRE(d.reset_after == Nanos{kSec});  // 10 tokens at 10/s
  // Step 2 at +1 s: the TAT (full at +1 s) is kept: 20 tokens.
  d = limit->acquire("u", 0, Nanos{t + 3 * kSec});
  REQUIRE(limit->step() == 2);
  REQUIRE(d.remaining == 20);
  REQUIRE(d.limit == 20);
}

TEST_CASE("warm-up: a receipt taken in step 1 and settled in step 3", "[i17]") {
  // 30/s burst 30, 3 steps of 1 s. In step 1 (10/s, burst 10, 100 ms a
  // token): 10 taken at 0.5 s (full at 1.5 s), then 10 reserved (held in
  // debt: go at 1.5 s, full at 2.5 s). At 2.2 s (step 3: 30/s, burst 30)
  // the reservation settles to 8: 2 tokens at step 1's 100 ms give back
  // 200 ms (its stretch [1.5 s, 2.5 s) still has 300 ms ahead): full at
  // 2.3 s, so 100 ms short: 27 tokens, full in 100 ms.
  const Config c{30, kSec, 30, 3, 3 * kSec};
  auto limit = make(c, kT0);
  REQUIRE(limit->acquire("u", 10, Nanos{kT0 + 500 * kMs}).allowed);
  Reserved r = limit->reserve("u", 10, Nanos{kT0 + 500 * kMs}, Nanos{2 * kSec});
  REQUIRE(r.held);
  REQUIRE(r.go_at == Nanos{kT0 + 1500 * kMs});
  REQUIRE(r.holds == Nanos{kSec});
  const Nanos at{kT0 + 2200 * kMs};
  absl::StatusOr<Decision> d = limit->settle(r.receipt, 8, at);
  REQUIRE(d.ok());
  REQUIRE(limit->step() == 3);
  REQUIRE(d->remaining == 27);
  REQUIRE(d->reset_after == Nanos{100 * kMs});
  REQUIRE(limit->statistics().given_back == 1);
  REQUIRE(limit->statistics().given_back_units == 2);

  // The same through a PolicyLimit reconfigured by hand at the same
  // instants: the warm-up's receipts settle as PolicyLimit's do.
  auto plain = make_limit({.name = "p"}, limit->step_policy(1)).value();
  REQUIRE(plain->acquire("u", 10, Nanos{kT0 + 500 * kMs}).allowed);
  Reserved pr =
      plain->reserve("u", 10, Nanos{kT0 + 500 * kMs}, Nanos{2 * kSec});
  REQUIRE(plain
              ->reconfigure(limit->step_policy(2), Carry::kAsStored,
                            Nanos{kT0 + kSec})
              .ok());
  REQUIRE(plain
              ->reconfigure(limit->step_policy(3), Carry::kAsStored,
                            Nanos{kT0 + 2 * kSec})
              .ok());
  absl::StatusOr<Decision> pd = plain->settle(pr.receipt, 8, at);
  REQUIRE(pd.ok());
  same(*d, *pd);
  // Settled once.
  REQUIRE(limit->settle(r.receipt, 0, at).status().code() ==
          absl::StatusCode::kFailedPrecondition);
}

TEST_CASE("warm-up: listener, statistics, overrides, reset pass through",
          "[i17]") {
  struct Heard : LimitListener {
    std::atomic<int> allowed{0}, denied{0}, near{0}, back{0};
    std::atomic<const Limit*> who{nullptr};
    void on_allowed(const LimitEvent& e) override {
      ++allowed;
      who = e.limit;
    }
    void on_denied(const LimitEvent&) override { ++denied; }
    void on_near_limit(const LimitEvent&) override { ++near; }
    void on_given_back(const LimitEvent&) override { ++back; }
  };
  auto limit = make({30, kSec, 30, 3, 3 * kSec}, kT0);
  auto heard = std::make_shared<Heard>();
  limit->set_listener(heard);
  limit->set_near_limit_permille(500);  // near: remaining <= half
  const Nanos t0{kT0};
  REQUIRE(limit->acquire("u", 4, t0).allowed);  // 6 of 10 left: not near
  REQUIRE(limit->acquire("u", 2, t0).allowed);  // 4 left: near
  REQUIRE_FALSE(limit->acquire("u", 5, t0).allowed);
  Receipt rec;
  REQUIRE(limit->take("u", 2, t0, rec).allowed);
  REQUIRE(limit->settle(rec, 0, t0).ok());
  REQUIRE(heard->allowed == 3);
  REQUIRE(heard->near == 2);
  REQUIRE(heard->denied == 1);
  REQUIRE(heard->back == 1);
  REQUIRE(heard->who.load() == limit.get());

  // Chain counts land on the warm-up limit.
  Chain<ManualClock> chain{ManualClock{t0}};
  auto cd = chain.acquire({{limit.get(), "v", 1}});
  REQUIRE(cd.allowed);
  REQUIRE(limit->statistics().counts.allowed == 1);
  REQUIRE(limit->statistics().capacity == 10);

  // An override is the key's own bucket, not ramped.
  REQUIRE(limit
              ->set_override(
                  "vip", TokenBucket::create(per_second(100), 50).value(), t0)
              .ok());
  Decision d = limit->acquire("vip", 50, t0);
  REQUIRE(d.allowed);
  REQUIRE(d.limit == 50);
  // statistics() counts the overridden key with the others.
  const std::uint64_t plain = limit->store_stats().keys;
  REQUIRE(limit->statistics().keys == plain + 1);
  REQUIRE(limit->clear_override("vip", t0).ok());

  // reset: the key is full again under the step in force.
  REQUIRE(limit->reset("u", t0).ok());
  d = limit->acquire("u", 0, t0);
  REQUIRE(d.remaining == 10);
}

TEST_CASE("warm-up: bad options are refused", "[i17]") {
  const TokenBucket tb = TokenBucket::create(per_second(10), 10).value();
  REQUIRE(make_warm_up_limit({.name = "w"}, tb, WarmUp{Nanos{0}, 3}, Nanos{0})
              .status()
              .code() == absl::StatusCode::kInvalidArgument);
  REQUIRE(
      make_warm_up_limit({.name = "w"}, tb, WarmUp{Nanos{kSec}, 0}, Nanos{0})
          .status()
          .code() == absl::StatusCode::kInvalidArgument);
  REQUIRE(make_warm_up_limit({.name = "w"}, tb,
                             WarmUp{Nanos{kSec}, WarmUp::kMaxSteps + 1},
                             Nanos{0})
              .status()
              .code() == absl::StatusCode::kInvalidArgument);
  REQUIRE(make_warm_up_limit({.name = "bad name"}, tb, WarmUp{Nanos{kSec}, 2},
                             Nanos{0})
              .status()
              .code() == absl::StatusCode::kInvalidArgument);
  // A period times the steps past 292 years.
  const TokenBucket slow =
      TokenBucket::create(Rate{1, Nanos{INT64_MAX / 2}}, 1).value();
  REQUIRE(
      make_warm_up_limit({.name = "w"}, slow, WarmUp{Nanos{kSec}, 3}, Nanos{0})
          .status()
          .code() == absl::StatusCode::kInvalidArgument);
}

TEST_CASE("warm-up: threads racing the step changes admit exactly the model",
          "[i17]") {
  // Phases at driven instants on both sides of every step start: in each,
  // N threads take 1 or 2 units on one key until a unit is refused. All of
  // them read the same instant, so whatever the interleaving (and whichever
  // thread moves the step), the units admitted are exactly the whole tokens
  // the model has at that instant: never more.
  const Config c{40, kSec, 40, 4, 4 * kSec};
  auto limit = make(c, kT0);
  Model m{c, kT0};
  std::vector<std::int64_t> phases;
  for (std::uint32_t k = 1; k <= c.steps; ++k) {
    const std::int64_t s = m.step_start(k);
    for (const std::int64_t d : {-kMs, -1L, 0L, 1L, 37 * kMs, 300 * kMs}) {
      if (s + d >= kT0) phases.push_back(s + d);
    }
  }
  phases.push_back(kT0 + 5 * kSec);
  std::sort(phases.begin(), phases.end());
  constexpr int kThreads = 4;
  std::atomic<int> gen{0};
  std::atomic<int> done{0};
  std::atomic<std::int64_t> when{0};
  std::atomic<std::uint64_t> units{0};
  std::atomic<bool> stop{false};
  std::vector<std::thread> workers;
  for (int w = 0; w < kThreads; ++w) {
    workers.emplace_back([&, w] {
      int seen = 0;
      std::uint64_t cost = 1 + static_cast<std::uint64_t>(w % 2);
      while (true) {
        while (gen.load(std::memory_order_acquire) == seen &&
               !stop.load(std::memory_order_acquire)) {
          std::this_thread::yield();
        }
        if (stop.load(std::memory_order_acquire)) return;
        seen = gen.load(std::memory_order_acquire);
        const Nanos now{when.load(std::memory_order_acquire)};
        while (true) {
          const Decision d = limit->acquire("hot", cost, now);
          if (d.allowed) {
            units.fetch_add(cost, std::memory_order_relaxed);
          } else if (cost == 1) {
            break;
          } else {
            cost = 1;
          }
        }
        cost = 1 + static_cast<std::uint64_t>(w % 2);
        done.fetch_add(1, std::memory_order_acq_rel);
      }
    });
  }
  for (const std::int64_t t : phases) {
    INFO("phase at " << t - kT0);
    const Decision before = m.decide("hot", 0, t, false);
    units = 0;
    done = 0;
    when = t;
    gen.fetch_add(1, std::memory_order_acq_rel);
    REQUIRE(rk_test::eventually([&] { return done.load() == kThreads; }));
    REQUIRE(units.load() == before.remaining);
    // The model takes the same units (one take of all of them: the TAT
    // lands at the same place whatever the split).
    if (before.remaining != 0) {
      REQUIRE(m.decide("hot", before.remaining, t, true).allowed);
    }
    REQUIRE(limit->step() == m.step);
    same(limit->peek("hot", 0, Nanos{t}), m.decide("hot", 0, t, false));
  }
  stop = true;
  for (auto& th : workers) th.join();
}

TEST_CASE("warm-up: a cost only a later step holds, acquired and waited for",
          "[i17]") {
  // 30/s burst 30, 3 steps of 1 s: bursts 10, 20, 30.
  auto limit = make({30, kSec, 30, 3, 3 * kSec}, kT0);
  ManualClock clock{Nanos{kT0 + 200 * kMs}};
  // 15 units: step 2 (from 1 s) holds them; 31 never fit.
  Decision d = limit->acquire("k", 15, clock.now());
  REQUIRE_FALSE(d.allowed);
  REQUIRE(d.retry_after == Nanos{800 * kMs});
  REQUIRE(d.remaining == 10);
  REQUIRE(limit->acquire("k", 31, clock.now()).never());
  Reserved r = limit->reserve("k", 15, clock.now(), Nanos{5 * kSec});
  REQUIRE_FALSE(r.held);
  REQUIRE_FALSE(r.receipt.open());
  REQUIRE(r.go_at == Nanos{kT0 + kSec});
  Waiter<ManualClock> waiter(clock);
  Waited w = waiter.acquire(*limit, "k", 15, Nanos{5 * kSec});
  REQUIRE(w.status.code() == absl::StatusCode::kResourceExhausted);
  w = waiter.acquire(*limit, "k", 15, Nanos{100 * kMs});
  REQUIRE(w.status.code() == absl::StatusCode::kDeadlineExceeded);
  // Nothing was taken: at the step-2 start the 15 pass.
  d = limit->acquire("k", 15, Nanos{kT0 + kSec});
  REQUIRE(d.allowed);
  REQUIRE(d.remaining == 5);
  REQUIRE(limit->step() == 2);
}
