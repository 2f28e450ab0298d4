// Receipts at the seams (issue 13): give-backs that can never over-admit,
// across refunds, settles in both directions, reconfiguration, chains and
// tier keys; and the property test of every policy on both in-process stores
// against an independent oracle. The store's own interleavings (case 7) are
// in sharded_hooks_test.cpp; budgets in accountant_test.cpp; Redis in
// redis_test.cpp.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "ratekeeper/chain.hpp"
#include "ratekeeper/limiter.hpp"
#include "ratekeeper/policy/fixed_window.hpp"
#include "ratekeeper/policy/sliding_window.hpp"
#include "ratekeeper/policy/token_bucket.hpp"
#include "ratekeeper/receipt.hpp"
#include "ratekeeper/store/in_memory.hpp"
#include "ratekeeper/store/sharded.hpp"
#include "ratekeeper/tiers.hpp"
#include "test_util.hpp"

using namespace ratekeeper;
using rk_test::kMs;
using rk_test::kSec;
using std::chrono::seconds;

namespace {

TokenBucket bucket(Rate r, std::uint64_t burst) {
  return TokenBucket::create(r, burst).value();
}

template <class P, template <class> class S = ShardedStore>
using ManualLimiter = Limiter<P, S, ManualClock>;

}  // namespace

// Case 1: a give-back never returns capacity that time has already returned.
TEST_CASE("seams 1: a give-back of an old take does not refill a full bucket",
          "[seams][receipts]") {
  ManualClock clock;
  ManualLimiter<TokenBucket> lim(bucket(per_second(1), 10), clock);
  Taken a = lim.take("k", 10);
  REQUIRE(a);
  clock.advance(seconds(10));  // full again
  Taken b = lim.take("k", 10);
  REQUIRE(b);
  REQUIRE(lim.give_back(a.receipt).ok());
  // Before receipts: the give-back put 10 back, and a third 10 passed at the
  // same instant (20 tokens at once against a burst of 10).
  CHECK_FALSE(lim.acquire("k", 10).allowed);
  CHECK(lim.peek("k", 0).remaining == 0);
}

TEST_CASE("seams 1: 60k tokens/min, a late refund of 36k of a 40k take",
          "[seams][receipts]") {
  ManualClock clock;
  ManualLimiter<TokenBucket> lim(bucket(per_minute(60'000), 60'000), clock);
  Taken a = lim.take("org", 40'000);  // A at 0 s
  REQUIRE(a);
  clock.advance(seconds(30));
  Taken b = lim.take("org", 50'000);  // B at 30 s
  REQUIRE(b);
  clock.advance(seconds(15));
  // A used 4,000 of its 40,000; its stretch of the bucket ran out at 40 s.
  REQUIRE(lim.settle(a.receipt, 4'000).ok());
  // The most [30 s, 45 s] may pass is burst + rate * 15 s = 75,000: B took
  // 50,000, so at most 25,000 more (before receipts, 51,000 passed).
  const Decision d = lim.peek("org", 0);
  CHECK(d.remaining <= 25'000);
  CHECK(d.remaining == 15'000);
}

// Case 2: settling in both directions; no caller subtracts.
TEST_CASE("seams 2: usage above the estimate is charged, never wrapped",
          "[seams][receipts]") {
  ManualClock clock;
  ManualLimiter<TokenBucket> lim(bucket(per_minute(40'000), 40'000), clock);
  // Calls estimating 2,000 tokens and using 2,100, for 60 s, as fast as the
  // limiter lets them through.
  std::uint64_t admitted_tokens = 0;
  const Nanos end = clock.now() + seconds(60);
  while (clock.now() < end) {
    Taken t = lim.take("u", 2'000);
    if (!t) {
      clock.advance(t.decision.retry_after);
      continue;
    }
    REQUIRE(lim.settle(t.receipt, 2'100).ok());
    admitted_tokens += 2'100;
  }
  // Before: prompt + max_tokens - used wrapped to ~2^64 and the refund
  // refilled the bucket (1,260,000 tokens in 60 s). Now: burst + rate * 60 s,
  // plus at most one call's debt.
  CHECK(admitted_tokens <= 80'000 + 2'100);
  CHECK(admitted_tokens >= 80'000 - 2 * 2'100);
}

// Case 3: a receipt is given back at the rate it was taken at.
TEST_CASE("seams 3: a give-back after a downgrade converts what it took",
          "[seams][receipts]") {
  ManualClock clock;
  auto tpm = make_limit({.name = "tpm", .unit = Unit::kTokens},
                        bucket(per_minute(60'000), 60'000))
                 .value();
  Receipt r;
  REQUIRE(tpm->take("org", 60'000, clock.now(), r).allowed);
  REQUIRE(tpm->reconfigure(bucket(per_minute(600), 600)).ok());
  CHECK(tpm->peek("org", 0, clock.now()).remaining == 0);
  // 600 of the 60,000 tokens were 600 ms of the bucket's time: 6 tokens at
  // the new rate (before: 600).
  auto left = tpm->settle(r, 60'000 - 600, clock.now());
  REQUIRE(left.ok());
  CHECK(left->remaining == 6);
  CHECK(tpm->peek("org", 0, clock.now()).remaining == 6);
}

TEST_CASE("seams 3: an upgrade gives back no more than was taken",
          "[seams][receipts]") {
  ManualClock clock;
  auto tpm = make_limit({.name = "tpm", .unit = Unit::kTokens},
                        bucket(per_minute(600), 600))
                 .value();
  Receipt r;
  REQUIRE(tpm->take("org", 600, clock.now(), r).allowed);
  REQUIRE(tpm->reconfigure(bucket(per_minute(60'000), 60'000)).ok());
  // The take holds 60 s of the timeline: 60,000 tokens now; giving all of it
  // back leaves the bucket full, never fuller.
  CHECK(tpm->peek("org", 0, clock.now()).remaining == 0);
  auto left = tpm->settle(r, 0, clock.now());
  REQUIRE(left.ok());
  CHECK(left->remaining == 60'000);
  CHECK_FALSE(tpm->peek("org", 60'001, clock.now()).allowed);
}

// Exactness where the counter can be exact: one call at a time, and two
// overlapping calls settled in either order, give back all they did not use.
template <template <class> class S>
void overlapping_exact() {
  for (int order = 0; order < 2; ++order) {
    ManualClock clock;
    Limiter<TokenBucket, S, ManualClock> lim(bucket(per_minute(60'000), 60'000),
                                             clock);
    Taken a = lim.take("k", 20'000);
    Taken b = lim.take("k", 20'000);
    REQUIRE(a);
    REQUIRE(b);
    clock.advance(seconds(1));  // 1,000 tokens refill
    Receipt& first = order == 0 ? a.receipt : b.receipt;
    Receipt& second = order == 0 ? b.receipt : a.receipt;
    REQUIRE(lim.settle(first, 5'000).ok());
    REQUIRE(lim.settle(second, 5'000).ok());
    // 60,000 - 10,000 used + 1,000 refilled.
    CHECK(lim.peek("k", 0).remaining == 51'000);
    // One at a time.
    Taken c = lim.take("k", 30'000);
    REQUIRE(lim.settle(c.receipt, 1'000).ok());
    CHECK(lim.peek("k", 0).remaining == 50'000);
  }
}

TEST_CASE("receipts: overlapping calls give back exactly",
          "[seams][receipts]") {
  overlapping_exact<ShardedStore>();
  overlapping_exact<InMemoryStore>();
}

// Case 6 for chains, and a receipt from another limit.
TEST_CASE("seams: a receipt is settled once, by the limit that issued it",
          "[seams][receipts]") {
  ManualClock clock;
  Chain<ManualClock> chain(clock);
  auto a = make_limit({.name = "a"}, FixedWindow::create(per_minute(5)).value())
               .value();
  auto b = make_limit({.name = "b"}, FixedWindow::create(per_minute(5)).value())
               .value();
  ChainDecision d = chain.acquire({{a.get(), "k", 1}, {b.get(), "k", 1}});
  REQUIRE(d.allowed);
  CHECK(b->settle(d.results[0].receipt, 0, clock.now()).status().code() ==
        absl::StatusCode::kInvalidArgument);
  CHECK(d.results[0].receipt.open());  // refused, so nothing was lost
  chain.give_back(d);
  CHECK(a->peek("k", 0, clock.now()).remaining == 5);
  CHECK(b->peek("k", 0, clock.now()).remaining == 5);
  chain.give_back(d);  // twice: nothing more comes back
  REQUIRE(a->acquire("k", 5, clock.now()).allowed);
  CHECK_FALSE(a->acquire("k", 1, clock.now()).allowed);
}

// Case 8: tier items own their keys.
TEST_CASE("seams 8: ten users behind one IP share its per-IP limit",
          "[seams][tiers]") {
  ManualClock clock(std::chrono::hours(1000));
  TierTable<ManualClock> tiers(ShardedOptions{.capacity = 1024}, clock);
  REQUIRE(tiers
              .set_tier("ip", {{{.name = "per_ip"},
                                Field::kIp,
                                PolicyKind::kFixedWindow,
                                per_hour(2)}})
              .ok());
  REQUIRE(tiers
              .set_tier("free", {{{.name = "rpm"},
                                  Field::kUser,
                                  PolicyKind::kFixedWindow,
                                  per_minute(100)}})
              .ok());
  int admitted = 0;
  for (int u = 0; u < 10; ++u) {
    const std::string user = "user-" + std::to_string(u);
    const Subject who{.user = user, .ip = "203.0.113.9"};
    ChainItems per_ip;
    REQUIRE(tiers.chain_items("ip", who, 1, per_ip).ok());
    // The tier's own items are built after the IP's; before, both viewed
    // one thread_local buffer, and the IP item ended up keyed by the user.
    auto d = tiers.acquire("free", who, 1, per_ip.items());
    REQUIRE(d.ok());
    admitted += d->allowed ? 1 : 0;
  }
  CHECK(admitted == 2);
}

TEST_CASE("ChainItems keep their keys through copies and moves",
          "[seams][tiers]") {
  auto l = make_limit({.name = "l"}, FixedWindow::create(per_minute(1)).value())
               .value();
  ChainItems items;
  std::string key(300, 'x');  // longer than the inline buffer
  items.add(l.get(), key, 1);
  items.add(l.get(), "short", 2);
  key.assign(300, 'y');
  ChainItems copy = items;
  ChainItems moved = std::move(items);
  for (const ChainItems* c : {&copy, &moved}) {
    REQUIRE(c->size() == 2);
    CHECK((*c)[0].key == std::string(300, 'x'));
    CHECK((*c)[1].key == "short");
    CHECK(c->items()[1].cost == 2);
  }
}

// ---------------------------------------------------------------------------
// The property test: random scripts of take / settle (both directions) /
// give_back / chain roll-back / reconfigure / time, on both in-process stores
// (the sharded one small enough to evict), against an oracle that knows
// nothing of the implementation.
//
// Token bucket oracle: each admitted take is attributed to the time it was
// admitted, at its final amount (what it was settled to, never more than
// it took); an excess settled above a take is a debt, a forced take at the
// settle's time. GCRA run over those events must find every admitted take
// conformant: for every interval, the takes in it sum to at most
// burst + rate * length (with the rate and burst in force at each take).
// Window oracle: per aligned window, the final amounts of the takes admitted
// in it, and the debts counted in it before each take, never exceed the
// limit at that take.
namespace {

using i128 = detail::i128;

// Rates with whole or fractional nanoseconds per token, all multiples of
// 1 / kScale ns per token.
constexpr i128 kScale = 21;  // 3 * 7
struct BucketChoice {
  Rate rate;
  std::uint64_t burst;
};
const BucketChoice kBuckets[] = {
    {per_second(10), 10},     {per_second(7), 20},  {per_second(3), 5},
    {per_minute(600), 50},    {per_second(21), 21}, {per_second(1), 1},
    {per(4, seconds(1)), 40},
};

i128 interval_scaled(Rate r) {  // ns per token, times kScale
  return static_cast<i128>(r.period.count()) * kScale /
         static_cast<i128>(r.count);
}

struct Event {
  i128 t = 0;  // ns
  bool debt = false;
  Cost amount = 0;    // a take's final amount (updated on settle), or a debt
  Cost taken = 0;     // what the take took (a zero take is a read: always in)
  i128 interval = 0;  // ns per token * kScale, at the event
  i128 span = 0;      // burst * interval at a take
  std::int64_t window = 0;
  std::uint64_t limit = 0;
};

struct Held {
  Receipt receipt;
  std::size_t event;
  std::size_t key;
};

template <class P>
P make_window(std::uint64_t n) {
  return P::create(per_second(n)).value();
}

// One script on one store. `windows`: P is a window policy.
template <class P, template <class> class S>
void script(std::uint64_t seed, int steps, bool debts) {
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  ManualClock clock(Nanos{static_cast<std::int64_t>(rng() % (5 * kSec))});
  constexpr bool kBucket = std::is_same_v<P, TokenBucket>;
  const BucketChoice first = kBuckets[rng() % std::size(kBuckets)];
  auto make_policy = [&](std::uint64_t n) {
    if constexpr (kBucket) {
      const BucketChoice c = kBuckets[n % std::size(kBuckets)];
      return TokenBucket::create(c.rate, c.burst).value();
    } else {
      return make_window<P>(5 + n % 20);
    }
  };
  typename S<typename P::State>::Options opts{};
  if constexpr (std::is_same_v<S<typename P::State>,
                               ShardedStore<typename P::State>>) {
    opts.capacity = 4;
    opts.shards = 1;
    opts.seed = seed | 1;
    opts.when_full = WhenFull::kEvictStalest;
  } else {
    opts.max_keys = 4;
    opts.when_full = WhenFull::kDenyNew;
  }
  P initial = kBucket
                  ? make_policy(static_cast<std::uint64_t>(&first - kBuckets))
                  : make_policy(rng());
  auto limit =
      make_limit<S>({.name = "l", .unit = Unit::kTokens}, initial, opts)
          .value();
  // A second limit that refuses now and then, so chains roll back.
  auto gate =
      make_limit({.name = "gate"}, FixedWindow::create(per_second(3)).value())
          .value();
  Chain<ManualClock> chain(clock);
  constexpr std::size_t kKeys = 6;
  const std::string keys[kKeys] = {"a", "b", "c", "d", "e", "f"};
  std::vector<Event> events[kKeys];
  std::vector<Held> held;
  std::uint64_t admitted = 0;
  auto period_ns = [&] { return limit->policy().rate().period.count(); };
  // An admitted take: its event for the oracle, its receipt held.
  auto admit = [&](std::size_t k, Cost cost, Nanos now, Receipt r) {
    ++admitted;
    Event e;
    e.t = now.count();
    e.amount = cost;
    e.taken = cost;
    if constexpr (kBucket) {
      e.interval = interval_scaled(limit->policy().rate());
      e.span = e.interval * static_cast<i128>(limit->policy().burst());
    } else {
      e.window = detail::floor_div_i64(now.count(), period_ns());
      e.limit = limit->limit();
    }
    events[k].push_back(e);
    held.push_back(Held{std::move(r), events[k].size() - 1, k});
  };
  for (int step = 0; step < steps; ++step) {
    const std::uint64_t pick = rng() % 100;
    const std::size_t k = rng() % kKeys;
    const Nanos now = clock.now();
    const std::uint64_t cap = limit->limit();
    if (pick < 25) {
      const auto dt = static_cast<std::int64_t>(
          rng() % 3 == 0
              ? 0
              : rng() % static_cast<std::uint64_t>(period_ns() / 4 + 1));
      clock.advance(Nanos{dt});
    } else if (pick < 60) {
      const Cost cost = rng() % (cap / 2 + 2);
      Receipt r;
      const Decision d = limit->take(keys[k], cost, now, r);
      if (d.allowed && r) {
        admit(k, cost, now, std::move(r));
      }
    } else if (pick < 70) {
      // A chain through the gate: refused chains roll back through receipts.
      const Cost cost = rng() % (cap / 2 + 2);
      const ChainItem items[] = {{limit.get(), keys[k], cost},
                                 {gate.get(), keys[k], 1}};
      ChainDecision d = chain.acquire_at(items, now);
      if (d.allowed && d.results[0].receipt) {
        admit(k, cost, now, std::move(d.results[0].receipt));
        chain.give_back(d);  // the gate's take
      } else if (!d.allowed && d.results[0].counted) {
        FAIL("a refused chain kept its take");
      }
    } else if (pick < 92 && !held.empty()) {
      const std::size_t i = rng() % held.size();
      Held h = std::move(held[i]);
      held[i] = std::move(held.back());
      held.pop_back();
      Event& e = events[h.key][h.event];
      const Cost taken = h.receipt.cost();
      Cost actual = rng() % 4 == 0 ? 0 : rng() % (taken + 1);
      if (debts && rng() % 3 == 0) actual = taken + rng() % (cap / 3 + 2);
      auto left = limit->settle(h.receipt, actual, now);
      REQUIRE(left.ok());
      REQUIRE_FALSE(h.receipt.open());
      CHECK(limit->settle(h.receipt, 0, now).status().code() ==
            absl::StatusCode::kFailedPrecondition);
      if (actual <= taken) {
        e.amount = actual;
      } else {
        Event debt;
        debt.t = now.count();
        debt.debt = true;
        debt.amount = actual - taken;
        if constexpr (kBucket) {
          debt.interval = interval_scaled(limit->policy().rate());
        } else {
          debt.window = detail::floor_div_i64(now.count(), period_ns());
        }
        events[h.key].push_back(debt);
        // h.event stays valid: indices, not pointers.
      }
    } else if (pick < 95) {
      if constexpr (kBucket) {
        REQUIRE(limit->reconfigure(make_policy(rng())).ok());
      } else {
        REQUIRE(limit->reconfigure(make_window<P>(5 + rng() % 20)).ok());
      }
    }
  }
  REQUIRE(admitted > static_cast<std::uint64_t>(steps) / 20);
  // The oracle.
  for (std::size_t k = 0; k < kKeys; ++k) {
    INFO("key " << keys[k]);
    if constexpr (kBucket) {
      i128 tat = INT64_MIN;  // scaled
      bool fresh = true;
      for (const Event& e : events[k]) {
        const i128 t = e.t * kScale;
        const i128 base = fresh ? t : std::max(tat, t);
        fresh = false;
        const i128 next = base + static_cast<i128>(e.amount) * e.interval;
        if (!e.debt && e.taken != 0) {
          INFO("take of " << e.amount << " (took " << e.taken << ") at "
                          << static_cast<std::int64_t>(e.t) << ", event "
                          << (&e - events[k].data()) << ", lead "
                          << static_cast<double>(next - t) / kScale
                          << " ns, span "
                          << static_cast<double>(e.span) / kScale);
          REQUIRE(next - t <= e.span);
        }
        tat = next;
      }
    } else {
      std::map<std::int64_t, std::uint64_t> count;
      for (const Event& e : events[k]) {
        std::uint64_t& c = count[e.window];
        c += e.amount;
        if (!e.debt && e.taken != 0) {
          INFO("take of " << e.amount << " in window " << e.window);
          REQUIRE(c <= e.limit);
        }
      }
    }
  }
}

template <class P>
void run_scripts(int total_steps, bool debts) {
  const std::uint64_t base = rk_test::seed_or(0x5ea45);
  const int per = 20'000;
  const int n = std::max(1, total_steps / per);
  for (int i = 0; i < n; ++i) {
    const std::uint64_t seed = base + static_cast<std::uint64_t>(i);
    script<P, ShardedStore>(seed, per, debts);
    script<P, InMemoryStore>(seed, per, debts);
  }
}

}  // namespace

TEST_CASE("receipts property: token bucket against GCRA on final amounts",
          "[seams][property][receipts]") {
  run_scripts<TokenBucket>(1'000'000, /*debts=*/true);
}

TEST_CASE("receipts property: fixed window, per window, on final amounts",
          "[seams][property][receipts]") {
  run_scripts<FixedWindow>(1'000'000, /*debts=*/true);
}

TEST_CASE("receipts property: sliding window, per aligned window",
          "[seams][property][receipts]") {
  run_scripts<SlidingWindow>(1'000'000, /*debts=*/true);
}

// Found by an examiner (issue 13): a charge on reject capped the bucket's
// debt at two bursts from now, so a denial charged after a settled debt (or
// a burst lowered at run time) moved the TAT earlier and wiped the debt.
TEST_CASE("seams: a charged denial never shortens a debt",
          "[seams][receipts]") {
  ManualClock clock(seconds(1000));
  auto ip = make_limit({.name = "ip", .charge_on_reject = true},
                       bucket(per_second(1), 10))
                .value();
  Chain<ManualClock> chain(clock);
  ChainDecision d = chain.acquire({{ip.get(), "k", 10}});
  REQUIRE(d.allowed);
  REQUIRE(chain.settle(d, 0, 100).ok());  // a debt of 90 tokens: 90 s more
  CHECK(ip->peek("k", 10, clock.now()).retry_after == seconds(100));
  ChainDecision denied = chain.acquire({{ip.get(), "k", 1}});
  CHECK_FALSE(denied.allowed);  // charged, and the debt still stands
  CHECK(ip->peek("k", 10, clock.now()).retry_after >= seconds(100));
  clock.advance(seconds(20));
  CHECK_FALSE(chain.acquire({{ip.get(), "k", 10}}).allowed);
  // A lowered burst: the state's lead above the new burst is kept.
  auto tb = make_limit({.name = "tb", .charge_on_reject = true},
                       bucket(per_second(1), 100))
                .value();
  REQUIRE(tb->acquire("k", 100, clock.now()).allowed);
  REQUIRE(tb->reconfigure(bucket(per_second(1), 10)).ok());
  const Nanos before = tb->peek("k", 1, clock.now()).retry_after;
  Receipt none;
  CHECK_FALSE(tb->charge("k", 1, clock.now(), none).allowed);
  CHECK(tb->peek("k", 1, clock.now()).retry_after >= before);
}

// Found by an examiner: a receipt of a destroyed limiter was accepted by a
// new one built at the same address.
TEST_CASE("seams: a receipt names its limiter, not an address",
          "[seams][receipts]") {
  ManualClock clock(seconds(1000));
  const TokenBucket tb = bucket(per_second(1), 10);
  using Lim = Limiter<TokenBucket, InMemoryStore, ManualClock>;
  auto lim = std::make_unique<Lim>(tb, clock);
  Taken t = lim->take("k", 10);
  REQUIRE(t);
  lim.reset();
  lim = std::make_unique<Lim>(tb, clock);  // often the same address
  Taken u = lim->take("k", 10);
  REQUIRE(u);
  CHECK(lim->settle(t.receipt, 0).status().code() ==
        absl::StatusCode::kInvalidArgument);
  CHECK(lim->peek("k", 0).remaining == 0);
}

// Found by an examiner: the span items() returned was freed by the next
// call with more than four items.
TEST_CASE("seams 8: ChainItems views stay valid across items() calls",
          "[seams][tiers]") {
  auto l = make_limit({.name = "a"}, bucket(per_second(1), 10)).value();
  ChainItems items;
  for (int i = 0; i < 6; ++i) items.add(l.get(), "key-" + std::to_string(i), 1);
  const std::span<const ChainItem> first = items.items();
  const std::span<const ChainItem> second = items.items();
  CHECK(first[0].key == "key-0");
  CHECK(second[5].key == "key-5");
  items.add(l.get(), items[2].key, 3);  // a key viewing its own bytes
  CHECK(items[6].key == "key-2");
  CHECK(items[6].cost == 3);
}

namespace {
// Two takes at one instant, both given back at it: the bucket ends full.
// `last_first`: the later take (B) is given back first; as the last take it
// moves nothing, so A's receipt is not moved and gives back exactly. Else
// A first moves B earlier, and B's record is moved by A's time rounded up
// to the nanosecond: at most 1 ns short (docs/policies.md).
template <template <class> class S>
void two_takes_back(Rate rate, bool last_first) {
  const TokenBucket tb = bucket(rate, 10);
  auto limit = make_limit<S>({.name = "l"}, tb).value();
  const Nanos t{1'796'000'000'000'000'000LL};
  Receipt a, b;
  REQUIRE(limit->take("k", 1, t, a).allowed);
  REQUIRE(limit->take("k", 2, t, b).allowed);
  if (last_first) {
    REQUIRE(limit->settle(b, 0, t).ok());
    REQUIRE(limit->settle(a, 0, t).ok());
  } else {
    REQUIRE(limit->settle(a, 0, t).ok());
    REQUIRE(limit->settle(b, 0, t).ok());
  }
  const Decision at_t = limit->peek("k", 0, t);
  if (last_first) {
    CHECK(at_t.remaining == 10);
    CHECK(at_t.reset_after == Nanos{0});
  } else {
    CHECK(at_t.remaining >= 9);
    CHECK(at_t.reset_after <= Nanos{1});
    CHECK(limit->peek("k", 0, t + Nanos{1}).remaining == 10);
  }
}
}  // namespace

TEST_CASE(
    "a fractional rate: the last take given back moves nothing, so an "
    "earlier take's receipt then gives back exactly",
    "[receipts]") {
  for (const Rate rate : {per_second(7), per_minute(13), per_second(3),
                          per_hour(1), per_second(10)}) {
    for (const bool last_first : {true, false}) {
      CAPTURE(rate.count, rate.period.count(), last_first);
      two_takes_back<ShardedStore>(rate, last_first);
      two_takes_back<InMemoryStore>(rate, last_first);
    }
  }
}
