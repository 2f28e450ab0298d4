// TESTPLAN T1a-T1e: seeded random scenarios against exact bounds and against
// independent reference models; clock anomalies; overflow edges; a year of
// refills. Seeds: RATEKEEPER_SEED=<n> replays one scenario set.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <map>
#include <random>
#include <type_traits>
#include <vector>

#include "ratekeeper/detail/math.hpp"
#include "ratekeeper/limiter.hpp"
#include "ratekeeper/policy/fixed_window.hpp"
#include "ratekeeper/policy/sliding_window.hpp"
#include "ratekeeper/policy/token_bucket.hpp"
#include "test_util.hpp"

using namespace ratekeeper;
using ratekeeper::detail::i128;
using rk_test::kSec;

namespace {

constexpr int kScenarios = 10'000;
constexpr int kOpsPerScenario = 60;

using Rng = std::mt19937_64;

// Log-uniform integer in [lo, hi].
std::uint64_t log_uniform(Rng& rng, std::uint64_t lo, std::uint64_t hi) {
  std::uniform_real_distribution<double> u(std::log(static_cast<double>(lo)),
                                           std::log(static_cast<double>(hi)));
  const auto v = static_cast<std::uint64_t>(std::exp(u(rng)));
  return std::clamp(v, lo, hi);
}

std::uint64_t uniform(Rng& rng, std::uint64_t lo, std::uint64_t hi) {
  return std::uniform_int_distribution<std::uint64_t>(lo, hi)(rng);
}

struct Event {
  std::int64_t t;
  Cost cost;
};

// A time step scaled to `unit` ns: mostly small, sometimes several units,
// sometimes zero (bursts at one instant).
std::int64_t next_delta(Rng& rng, i128 unit) {
  const auto u =
      static_cast<std::uint64_t>(std::clamp<i128>(unit, 1, i128{1} << 50));
  switch (uniform(rng, 0, 5)) {
    case 0:
      return 0;
    case 1:
      return static_cast<std::int64_t>(uniform(rng, 1, 3));
    case 2:
      return static_cast<std::int64_t>(uniform(rng, 0, u));
    case 3:
      return static_cast<std::int64_t>(uniform(rng, 0, 4 * u));
    default:
      return static_cast<std::int64_t>(uniform(rng, 0, u / 8 + 1));
  }
}

Cost next_cost(Rng& rng, std::uint64_t limit) {
  switch (uniform(rng, 0, 9)) {
    case 0:
      return limit;
    case 1:
      return limit + uniform(rng, 1, 3);  // never admitted
    case 2:
      return 0;
    default:
      return uniform(rng, 1, std::max<std::uint64_t>(1, limit / 4));
  }
}

// retry_after and remaining must be exact for any policy: a call of
// `remaining` fits now and one more does not; a denied call is denied 1 ns
// before retry_after and allowed at it.
template <class P>
void check_exactness(const P& p, const typename P::State& before,
                     std::int64_t t, Cost cost, const Decision& d) {
  const typename P::State after =
      d.allowed ? p.step(before, Nanos{t}, cost).next : before;
  REQUIRE(d.remaining <= d.limit);
  if (d.remaining > 0) REQUIRE(p.step(after, Nanos{t}, d.remaining).decision);
  REQUIRE_FALSE(p.step(after, Nanos{t}, d.remaining + 1).decision);
  // reset_after: back to full capacity then, and not 1 ns before.
  const std::int64_t full = t + d.reset_after.count();
  REQUIRE(p.step(after, Nanos{full}, 0).decision.remaining == d.limit);
  if (d.reset_after > Nanos{0}) {
    REQUIRE(p.step(after, Nanos{full - 1}, 0).decision.reset_after > Nanos{0});
  }
  if (d.allowed) {
    REQUIRE(d.retry_after == Nanos{0});
    return;
  }
  if (cost > d.limit) {
    REQUIRE(d.never());
    return;
  }
  REQUIRE(d.retry_after > Nanos{0});
  const std::int64_t at = t + d.retry_after.count();
  REQUIRE_FALSE(p.step(before, Nanos{at - 1}, cost).decision);
  REQUIRE(p.step(before, Nanos{at}, cost).decision);
}

// The classic token bucket in exact arithmetic: tokens scaled by the period.
struct ReferenceBucket {
  i128 rate, period, burst;
  i128 tokens_s;  // tokens * period
  std::int64_t last;

  Decision step(std::int64_t t, Cost cost) {
    tokens_s = std::min(burst * period, tokens_s + (t - last) * rate);
    last = t;
    const i128 need = static_cast<i128>(cost) * period;
    Decision d;
    d.limit = static_cast<std::uint64_t>(burst);
    if (static_cast<i128>(cost) <= burst && tokens_s >= need) {
      tokens_s -= need;
      d.allowed = true;
    } else if (static_cast<i128>(cost) > burst) {
      d.retry_after = kNever;
    } else {
      d.retry_after =
          Nanos{detail::clamp_i64(detail::ceil_div(need - tokens_s, rate))};
    }
    d.remaining = static_cast<std::uint64_t>(tokens_s / period);
    d.reset_after = Nanos{
        detail::clamp_i64(detail::ceil_div(burst * period - tokens_s, rate))};
    return d;
  }
};

}  // namespace

TEST_CASE(
    "T1a: token bucket never exceeds burst + rate*t, matches the "
    "reference bucket, and retry_after is exact",
    "[T1a][property][bucket]") {
  const std::uint64_t seed = rk_test::seed_or(0x7A1A);
  CAPTURE(seed);
  Rng rng(seed);
  for (int sc = 0; sc < kScenarios; ++sc) {
    CAPTURE(sc);
    const std::uint64_t r = log_uniform(rng, 1, 1'000'000'000);
    const std::uint64_t period = log_uniform(rng, 1, 86'400ull * kSec);
    const std::uint64_t b = log_uniform(rng, 1, 1'000'000);
    auto made = TokenBucket::create(
        per(r, Nanos{static_cast<std::int64_t>(period)}), b);
    if (!made.ok()) {
      // Only a refill time above 292 years is refused.
      REQUIRE(static_cast<i128>(b) * period >
              static_cast<i128>(detail::kI64Max) * r);
      --sc;
      continue;
    }
    CAPTURE(r, period, b);
    const TokenBucket& p = *made;
    ReferenceBucket ref{r, static_cast<i128>(period), b,
                        static_cast<i128>(b) * static_cast<i128>(period), 0};
    TokenBucket::State s{};
    const i128 unit = static_cast<i128>(period) / r + 1;  // about 1 token
    std::int64_t t = static_cast<std::int64_t>(uniform(rng, 0, 1'000'000));
    ref.last = t;
    std::vector<Event> admitted;
    for (int op = 0; op < kOpsPerScenario; ++op) {
      t += next_delta(
          rng, unit * static_cast<i128>(std::max<std::uint64_t>(1, b / 8)));
      const Cost c = next_cost(rng, b);
      const auto out = p.step(s, Nanos{t}, c);
      const Decision want = ref.step(t, c);
      REQUIRE(out.decision == want);
      check_exactness(p, s, t, c, out.decision);
      if (out.decision.allowed && c > 0) admitted.push_back({t, c});
      s = out.next;
      REQUIRE_FALSE(s == detail::kReservedState<TokenBucket::State>);
    }
    // Every interval [t_i, t_j]: sum * period <= b * period + r * (t_j - t_i).
    i128 best = std::numeric_limits<i128>::min();
    i128 prefix = 0;
    for (const Event& e : admitted) {
      best = std::max(best, static_cast<i128>(r) * e.t - prefix * period);
      prefix += e.cost;
      const i128 lhs = prefix * period - static_cast<i128>(r) * e.t + best;
      REQUIRE(lhs <= static_cast<i128>(b) * period);
    }
  }
}

namespace {

// Fixed and sliding windows, read off a log of counts per aligned window.
struct ReferenceWindows {
  bool sliding;
  i128 limit, period;
  std::map<i128, i128> counts;  // window index -> units admitted
  i128 high = std::numeric_limits<i128>::min();  // newest window seen

  Decision step(std::int64_t t, Cost cost) {
    i128 w = detail::floor_div(t, period);
    i128 e = t - w * period;
    if (w < high) {  // clock behind: read at the start of the newest window
      w = high;
      e = 0;
    }
    const i128 cur = counts.count(w) ? counts[w] : 0;
    const i128 prev = sliding && counts.count(w - 1) ? counts[w - 1] : 0;
    const i128 room = limit * period - prev * (period - e) - cur * period;
    Decision d;
    d.limit = static_cast<std::uint64_t>(limit);
    const i128 c = static_cast<i128>(cost);
    if (c <= limit && c * period <= room) {
      if (c > 0 || counts.count(w)) {
        counts[w] += c;
        high = std::max(high, w);
      }
      d.allowed = true;
      d.remaining = static_cast<std::uint64_t>((room - c * period) / period);
    } else {
      d.remaining = room <= 0 ? 0 : static_cast<std::uint64_t>(room / period);
    }
    return d;
  }
};

template <class P>
void run_window_scenarios(bool sliding, std::uint64_t seed) {
  Rng rng(seed);
  for (int sc = 0; sc < kScenarios; ++sc) {
    CAPTURE(sc);
    const std::uint64_t limit = log_uniform(rng, 1, 1'000'000'000);
    const std::uint64_t period = log_uniform(rng, 1, 86'400ull * kSec);
    CAPTURE(limit, period);
    const P p =
        P::create(per(limit, Nanos{static_cast<std::int64_t>(period)})).value();
    ReferenceWindows ref{sliding, limit, static_cast<i128>(period), {}};
    typename P::State s{};
    std::int64_t t = static_cast<std::int64_t>(uniform(rng, 0, 4 * period));
    std::vector<Event> admitted;
    for (int op = 0; op < kOpsPerScenario; ++op) {
      t += next_delta(rng, static_cast<i128>(period) / 3 + 1);
      const Cost c = next_cost(rng, limit);
      const auto out = p.step(s, Nanos{t}, c);
      const Decision want = ref.step(t, c);
      REQUIRE(out.decision.allowed == want.allowed);
      REQUIRE(out.decision.remaining == want.remaining);
      check_exactness(p, s, t, c, out.decision);
      if (out.decision.allowed && c > 0) admitted.push_back({t, c});
      s = out.next;
      REQUIRE_FALSE(s == detail::kReservedState<typename P::State>);
    }
    // At most `limit` per aligned window.
    std::map<i128, i128> per_window;
    for (const Event& e : admitted) {
      per_window[detail::floor_div(e.t, period)] += e.cost;
    }
    for (const auto& [w, n] : per_window)
      REQUIRE(n <= static_cast<i128>(limit));
    if (!sliding) continue;
    // At most 2 * limit - 1 in any sliding window (t - period, t].
    i128 sum = 0;
    std::size_t lo = 0;
    for (std::size_t hi = 0; hi < admitted.size(); ++hi) {
      sum += admitted[hi].cost;
      while (admitted[lo].t <=
             admitted[hi].t - static_cast<std::int64_t>(period)) {
        sum -= admitted[lo++].cost;
      }
      REQUIRE(sum <= 2 * static_cast<i128>(limit) - 1);
    }
  }
}

}  // namespace

TEST_CASE("T1b: fixed window admits at most L per aligned window",
          "[T1b][property][fixed]") {
  const std::uint64_t seed = rk_test::seed_or(0x7B1F);
  CAPTURE(seed);
  run_window_scenarios<FixedWindow>(false, seed);
}

TEST_CASE(
    "T1b: sliding window admits at most L per aligned window and "
    "2L-1 per sliding window",
    "[T1b][property][sliding]") {
  const std::uint64_t seed = rk_test::seed_or(0x7B15);
  CAPTURE(seed);
  run_window_scenarios<SlidingWindow>(true, seed);
}

TEST_CASE("T1b: the sliding window's 2L-1 bound is reached",
          "[T1b][property][sliding]") {
  for (std::uint64_t limit : {1ull, 2ull, 7ull, 100ull}) {
    const std::int64_t period = kSec;
    const auto p = SlidingWindow::create(per(limit, Nanos{period})).value();
    SlidingWindow::State s{};
    auto take = [&](std::int64_t t, Cost c) {
      auto r = p.step(s, Nanos{t}, c);
      s = r.next;
      return r.decision.allowed;
    };
    REQUIRE(take(period - 1, limit));
    std::uint64_t more = 0;
    for (std::int64_t t = period; t < 2 * period - 1; t += period / 1000) {
      while (take(t, 1)) ++more;
    }
    while (take(2 * period - 2, 1)) ++more;
    CAPTURE(limit);
    CHECK(limit + more == 2 * limit - 1);
  }
}

namespace {

template <class P>
void run_clock_anomalies(const P& p, std::uint64_t seed) {
  Rng rng(seed);
  const std::int64_t steps_back[] = {-1'000'000, -kSec, -3600 * kSec};
  const std::int64_t jumps[] = {3600 * kSec, 100ll * 365 * 86'400 * kSec};
  typename P::State s{};
  std::int64_t t = 1000 * kSec;
  int big_jumps = 0;
  for (int op = 0; op < 2000; ++op) {
    const auto kind = uniform(rng, 0, 19);
    if (kind == 0) {
      const std::int64_t back = steps_back[uniform(rng, 0, 2)];
      const auto before = p.step(s, Nanos{t}, 0).decision.remaining;
      t += back;
      const auto after = p.step(s, Nanos{t}, 0).decision.remaining;
      REQUIRE(after <= before);
    } else if (kind == 1) {
      std::int64_t jump = jumps[uniform(rng, 0, 1)];
      if (jump > 3600 * kSec && big_jumps++ >= 2) jump = 3600 * kSec;
      t += jump;
      const auto d = p.step(s, Nanos{t}, 0).decision;
      REQUIRE(d.remaining <= d.limit);
      // Service resumes: a call of 1 is admitted by reset_after at the latest.
      REQUIRE(p.step(s, Nanos{t} + d.reset_after, 1).decision);
    } else {
      t += static_cast<std::int64_t>(uniform(rng, 0, 50'000'000));
    }
    const auto r = p.step(s, Nanos{t}, uniform(rng, 1, 3));
    REQUIRE(r.decision.remaining <= r.decision.limit);
    s = r.next;
  }
}

}  // namespace

TEST_CASE("T1c: clock steps back and jumps forward", "[T1c][property]") {
  const std::uint64_t seed = rk_test::seed_or(0x71C);
  CAPTURE(seed);
  for (std::uint64_t i = 0; i < 20; ++i) {
    CAPTURE(i);
    run_clock_anomalies(TokenBucket::create(per_second(10), 20).value(),
                        seed + i);
    run_clock_anomalies(TokenBucket::create(per_second(7), 1).value(),
                        seed + i);
    run_clock_anomalies(FixedWindow::create(per_second(20)).value(), seed + i);
    run_clock_anomalies(SlidingWindow::create(per_second(20)).value(),
                        seed + i);
    run_clock_anomalies(
        SlidingWindow::create(per(5, std::chrono::milliseconds(3))).value(),
        seed + i);
  }
}

namespace {

template <class P>
void hammer_edges(const P& p) {
  const std::int64_t times[] = {0,
                                1,
                                -1,
                                detail::kI64Max,
                                detail::kI64Min,
                                detail::kI64Max - 1,
                                detail::kI64Min + 1};
  const Cost costs[] = {0,
                        1,
                        2,
                        detail::kU64Max,
                        static_cast<Cost>(detail::kI64Max),
                        p.limit(),
                        p.limit() - 1};
  typename P::State s{};
  for (const auto t : times) {
    for (const auto c : costs) {
      for (const auto t2 : times) {
        const auto r = p.step(s, Nanos{t}, c);
        REQUIRE(r.decision.remaining <= r.decision.limit);
        REQUIRE(r.decision.retry_after >= Nanos{0});
        REQUIRE(r.decision.reset_after >= Nanos{0});
        if (r.decision.allowed) REQUIRE(r.decision.retry_after == Nanos{0});
        if (c > p.limit()) REQUIRE(r.decision.never());
        const auto placed = p.place(s, Nanos{t}, c);
        s = r.next;
        REQUIRE_FALSE(s == detail::kReservedState<typename P::State>);
        for (const Cost actual : {Cost{0}, c / 2, c, detail::kU64Max}) {
          const auto settled = p.settle(s, Nanos{t2}, placed, c, actual);
          REQUIRE_FALSE(settled == detail::kReservedState<typename P::State>);
        }
        s = p.settle(s, Nanos{t2}, placed, c, c / 2);
        REQUIRE_FALSE(s == detail::kReservedState<typename P::State>);
        static_cast<void>(p.idle(s, Nanos{t2}));
      }
    }
  }
}

}  // namespace

TEST_CASE("T1d: 0, 1, INT64_MAX and UINT64_MAX for every parameter",
          "[T1d][property]") {
  const std::uint64_t values[] = {0,
                                  1,
                                  2,
                                  static_cast<std::uint64_t>(detail::kI64Max),
                                  detail::kU64Max,
                                  TokenBucket::kMaxCount,
                                  SlidingWindow::kMaxLimit};
  const std::int64_t periods[] = {
      0, 1, -1, detail::kI64Max, detail::kI64Min, 1'000'000'000};
  int buckets = 0, fixed = 0, sliding = 0;
  for (const auto count : values) {
    for (const auto period : periods) {
      const Rate rate{count, Nanos{period}};
      auto f = FixedWindow::create(rate);
      REQUIRE(f.ok() ==
              (count > 0 && period > 0 && count <= FixedWindow::kMaxLimit));
      if (f.ok()) {
        ++fixed;
        hammer_edges(*f);
      }
      auto sw = SlidingWindow::create(rate);
      REQUIRE(sw.ok() ==
              (count > 0 && period > 0 && count <= SlidingWindow::kMaxLimit));
      if (sw.ok()) {
        ++sliding;
        hammer_edges(*sw);
      }
      for (const auto burst : values) {
        auto b = TokenBucket::create(rate, burst);
        if (!b.ok()) {
          REQUIRE(b.status().code() == absl::StatusCode::kInvalidArgument);
          continue;
        }
        ++buckets;
        hammer_edges(*b);
      }
    }
  }
  CHECK(buckets > 20);
  CHECK(fixed > 10);
  CHECK(sliding > 5);
}

namespace {

// A year of greedy use at irregular spacing: whatever is available is taken
// at each step. The bucket never fills between steps (burst covers the
// longest gap), so exactly burst + floor(rate * elapsed) is admitted.
void run_year(Rate rate, std::int64_t max_gap, std::uint64_t seed) {
  const i128 gap_tokens =
      static_cast<i128>(max_gap) * rate.count / rate.period.count();
  const auto burst = static_cast<std::uint64_t>(gap_tokens + 2);
  ManualClock clock(Nanos{12345});
  Limiter<TokenBucket, InMemoryStore, ManualClock> lim(
      TokenBucket::create(rate, burst).value(), clock);
  Rng rng(seed);
  const std::int64_t t0 = clock.now().count();
  const std::int64_t year = 365ll * 86'400 * kSec;
  i128 admitted = 0;
  int steps = 0;
  while (clock.now().count() - t0 < year) {
    const auto avail = lim.peek("k", 0).remaining;
    if (avail > 0) {
      REQUIRE(lim.acquire("k", avail).allowed);
      admitted += avail;
    }
    REQUIRE_FALSE(lim.peek("k", 1).allowed);
    const i128 elapsed = clock.now().count() - t0;
    REQUIRE(admitted == burst + elapsed * rate.count / rate.period.count());
    // Irregular: half the gaps under a second, some of a single ns.
    std::int64_t gap = 0;
    switch (uniform(rng, 0, 3)) {
      case 0:
        gap = static_cast<std::int64_t>(uniform(rng, 1, 1000));
        break;
      case 1:
        gap = static_cast<std::int64_t>(uniform(rng, 1, kSec));
        break;
      default:
        gap = static_cast<std::int64_t>(
            uniform(rng, 1, static_cast<std::uint64_t>(max_gap)));
    }
    clock.advance(Nanos{gap});
    ++steps;
  }
  CHECK(steps > 1000);
}

}  // namespace

TEST_CASE("T1e: a year of refills is exact to the token", "[T1e][property]") {
  const std::uint64_t seed = rk_test::seed_or(0x71E);
  CAPTURE(seed);
  run_year(per_second(7), 3600 * kSec, seed);
  run_year(per_second(999), 3600 * kSec, seed + 1);
  run_year(per(1, std::chrono::seconds(3600)), 10 * 3600 * kSec, seed + 2);
  run_year(per(1'000'000'000, std::chrono::seconds(10)), 3600 * kSec, seed + 3);
}

namespace {

// States a random run leaves behind, for checking idle_at and merge.
template <class P>
std::vector<typename P::State> random_states(const P& p, Rng& rng,
                                             std::int64_t& t) {
  std::vector<typename P::State> out;
  typename P::State s{};
  for (int i = 0; i < 30; ++i) {
    t += static_cast<std::int64_t>(uniform(rng, 0, 200'000'000));
    s = p.step(s, Nanos{t}, uniform(rng, 0, p.limit())).next;
    out.push_back(s);
  }
  return out;
}

template <class P>
void check_idle_at_and_merge(const P& p, std::uint64_t seed) {
  Rng rng(seed);
  std::int64_t t = 1000 * kSec;
  const auto a = random_states(p, rng, t);
  const auto b = random_states(p, rng, t);
  for (std::size_t i = 0; i < a.size(); ++i) {
    for (const auto& s : {a[i], b[i]}) {
      const Nanos at = p.idle_at(s);
      if (at == Nanos::min()) {
        REQUIRE(p.idle(s, Nanos{0}));
        continue;
      }
      REQUIRE(p.idle(s, at));
      REQUIRE_FALSE(p.idle(s, at - Nanos{1}));
    }
    const auto m = p.merge(a[i], b[i]);
    REQUIRE(p.idle_at(m) >= std::max(p.idle_at(a[i]), p.idle_at(b[i])));
    // From now on (later than both states' windows), the merge is at least
    // as restrictive as each.
    for (const std::int64_t dt :
         {std::int64_t{0}, std::int64_t{1}, kSec / 3, kSec, 5 * kSec}) {
      const Nanos at{t + dt};
      const auto rm = p.step(m, at, 0).decision.remaining;
      REQUIRE(rm <= p.step(a[i], at, 0).decision.remaining);
      REQUIRE(rm <= p.step(b[i], at, 0).decision.remaining);
    }
  }
}

}  // namespace

TEST_CASE(
    "idle_at is the first idle instant; merge is at least as "
    "restrictive as both",
    "[property][policy]") {
  const std::uint64_t seed = rk_test::seed_or(0x1D1E);
  CAPTURE(seed);
  for (std::uint64_t i = 0; i < 200; ++i) {
    CAPTURE(i);
    check_idle_at_and_merge(TokenBucket::create(per_second(7), 13).value(),
                            seed + i);
    check_idle_at_and_merge(FixedWindow::create(per_second(20)).value(),
                            seed + i);
    check_idle_at_and_merge(
        SlidingWindow::create(per(20, std::chrono::milliseconds(700))).value(),
        seed + i);
  }
}

// Issue 17 (examiner's w12): "a zero cost is always allowed, counts nothing
// and changes no state" (docs/policies.md), for every state a key can reach:
// random walks of takes, charges, settles above the take (debts), and for a
// token bucket reservations held in debt. At each state, the zero-cost step
// is checked against oracles built from the policy's own nonzero steps:
// remaining is the largest cost a step would admit (a search), reset_after
// what a cost above the limit (never admitted) is told.
namespace {

template <class P>
void zero_cost_walk(const P& p, std::uint64_t seed, std::int64_t max_step_ns,
                    int& indebted, int& in_debt) {
  Rng rng(seed);
  const std::uint64_t limit = p.limit();
  typename P::State s{};
  std::int64_t t = static_cast<std::int64_t>(uniform(rng, 0, kSec));
  for (int i = 0; i < 3'000; ++i) {
    if (uniform(rng, 0, 2) != 0) {
      t += static_cast<std::int64_t>(
          uniform(rng, 0, static_cast<std::uint64_t>(max_step_ns)));
    }
    const Nanos now{t};
    const Cost c = uniform(rng, 1, limit);
    switch (uniform(rng, 0, 3)) {
      case 0:
        s = p.step(s, now, c).next;
        break;
      case 1:
        s = p.charge(s, now, uniform(rng, 1, 3 * limit));
        break;
      case 2: {
        const auto st = p.step(s, now, c);
        if (st.decision.allowed) {
          s = p.settle(st.next, now, p.place(s, now, c), c,
                       c + uniform(rng, 1, 2 * limit));
        }
        break;
      }
      default:
        if constexpr (requires { p.reserve(s, now, c, now); }) {
          s = p.reserve(s, now, c, Nanos{10 * kSec}).next;
        } else {
          s = p.step(s, now, c).next;
        }
    }
    const auto z = p.step(s, now, 0);
    CAPTURE(i, t);
    REQUIRE(z.decision.allowed);
    REQUIRE(z.next == s);
    REQUIRE(z.decision.retry_after == Nanos{0});
    // Oracle: the largest cost admitted now, by search over step().
    std::uint64_t lo = 0, hi = limit;
    while (lo < hi) {
      const std::uint64_t mid = lo + (hi - lo + 1) / 2;
      if (p.step(s, now, mid).decision.allowed) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    REQUIRE(z.decision.remaining == lo);
    const Decision never = p.step(s, now, limit + 1).decision;
    REQUIRE(z.decision.reset_after == never.reset_after);
    if (lo == 0 && !p.step(s, now, 1).decision.allowed) ++indebted;
    if constexpr (std::is_same_v<P, TokenBucket>) {
      // In debt: full again only after more than a burst's refill.
      const Rate r = p.rate();
      if (static_cast<i128>(z.decision.reset_after.count()) * r.count >
          static_cast<i128>(p.burst()) * r.period.count()) {
        ++in_debt;
      }
    }
  }
}

}  // namespace

TEST_CASE("a zero cost is allowed in every reachable state, debts included",
          "[i17][property]") {
  const std::uint64_t seed = rk_test::seed_or(0x17C0);
  CAPTURE(seed);
  int indebted = 0, in_debt = 0;
  SECTION("token bucket, whole interval") {
    zero_cost_walk(TokenBucket::create(per_second(10), 20).value(), seed,
                   300 * kSec / 1000, indebted, in_debt);
    CHECK(in_debt > 100);  // past a full bucket
  }
  SECTION("token bucket, 7 per second") {
    zero_cost_walk(TokenBucket::create(per_second(7), 5).value(), seed + 1,
                   500 * kSec / 1000, indebted, in_debt);
    CHECK(in_debt > 100);  // past a full bucket
  }
  SECTION("fixed window") {
    zero_cost_walk(FixedWindow::create(per_second(12)).value(), seed + 2,
                   200 * kSec / 1000, indebted, in_debt);
  }
  SECTION("sliding window") {
    zero_cost_walk(SlidingWindow::create(per_second(12)).value(), seed + 3,
                   150 * kSec / 1000, indebted, in_debt);
  }
  CHECK(indebted > 100);  // full or in debt often
}
