// Exact semantics of TokenBucket (GCRA) on hand-driven time.
#include "ratekeeper/policy/token_bucket.hpp"

#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "ratekeeper/ratekeeper.hpp"
#include "ratekeeper/waiting.hpp"
#include "test_util.hpp"

using namespace ratekeeper;
using rk_test::drive;
using rk_test::kMs;
using rk_test::kSec;

namespace {
TokenBucket make(Rate r, std::uint64_t burst) {
  auto b = TokenBucket::create(r, burst);
  REQUIRE(b.ok());
  return *b;
}
}  // namespace

TEST_CASE("bad configuration is kInvalidArgument", "[policy][bucket]") {
  const auto code = [](Rate r, std::uint64_t b) {
    return TokenBucket::create(r, b).status().code();
  };
  CHECK(code(per_second(0), 1) == absl::StatusCode::kInvalidArgument);
  CHECK(code(Rate{1, Nanos{0}}, 1) == absl::StatusCode::kInvalidArgument);
  CHECK(code(Rate{1, Nanos{-5}}, 1) == absl::StatusCode::kInvalidArgument);
  CHECK(code(per_second(1), 0) == absl::StatusCode::kInvalidArgument);
  CHECK(code(per_second(std::numeric_limits<std::uint64_t>::max()), 1) ==
        absl::StatusCode::kInvalidArgument);
  CHECK(code(per_second(1), std::numeric_limits<std::uint64_t>::max()) ==
        absl::StatusCode::kInvalidArgument);
  // A burst that takes more than 292 years to refill.
  CHECK(code(per_day(1), 200'000) == absl::StatusCode::kInvalidArgument);
  CHECK(code(per_day(1), 100'000) == absl::StatusCode::kOk);
  const auto st = TokenBucket::create(per_second(1), 0).status();
  CHECK(std::string(st.message()).find("burst") != std::string::npos);
}

TEST_CASE("a full bucket admits burst, then exactly one per interval",
          "[policy][bucket]") {
  auto d = drive(make(per_second(10), 5));
  for (std::uint64_t i = 0; i < 5; ++i) {
    const auto r = d.at(0);
    REQUIRE(r.allowed);
    CHECK(r.limit == 5);
    CHECK(r.remaining == 4 - i);
    CHECK(r.retry_after == Nanos{0});
    CHECK(r.reset_after == Nanos{(i + 1) * 100 * kMs});
  }
  const auto denied = d.at(0);
  CHECK_FALSE(denied.allowed);
  CHECK_FALSE(denied);
  CHECK(denied.remaining == 0);
  CHECK(denied.retry_after == Nanos{100 * kMs});
  CHECK(denied.reset_after == Nanos{500 * kMs});
  // The nanosecond before the refill, and at it.
  CHECK_FALSE(d.at(100 * kMs - 1).allowed);
  const auto at = d.at(100 * kMs);
  CHECK(at.allowed);
  CHECK(at.remaining == 0);
  CHECK(at.reset_after == Nanos{500 * kMs});
}

TEST_CASE("fractional emission intervals are exact", "[policy][bucket]") {
  // 7 per second: tokens at 1/7 s, 2/7 s, ... never drift.
  auto d = drive(make(per_second(7), 1));
  REQUIRE(d.at(0).allowed);
  const auto r = d.at(0);
  CHECK(r.retry_after == Nanos{142'857'143});  // ceil(1e9 / 7)
  CHECK_FALSE(d.at(142'857'142).allowed);
  REQUIRE(d.at(142'857'143).allowed);
  // Second token at 2e9/7 = 285714285.71 ns: allowed at ...286, not ...285.
  CHECK(d.peek(285'714'285).retry_after == Nanos{1});
  CHECK_FALSE(d.at(285'714'285).allowed);
  CHECK(d.at(285'714'286).allowed);
}

TEST_CASE("a busy bucket at 7/s never drifts by a nanosecond",
          "[policy][bucket]") {
  // Burst 2, emptied at 0: from then on token k is due at exactly
  // (k - 2) / 7 s, rounded up to the nanosecond, for thousands of tokens.
  auto d = drive(make(per_second(7), 2));
  REQUIRE(d.at(0, 2).allowed);
  for (std::int64_t k = 3; k <= 7002; ++k) {
    const std::int64_t due = ((k - 2) * kSec + 6) / 7;
    const auto before = d.at(due - 1);
    REQUIRE_FALSE(before.allowed);
    REQUIRE(before.retry_after == Nanos{1});
    REQUIRE(d.at(due).allowed);
  }
}

TEST_CASE("weighted costs", "[policy][bucket]") {
  auto d = drive(make(per_second(10), 100));  // 10 tokens/s, 100 capacity
  CHECK(d.at(0, 30).remaining == 70);
  CHECK(d.at(0, 30).remaining == 40);
  CHECK(d.at(0, 30).remaining == 10);
  const auto r = d.at(0, 30);
  CHECK_FALSE(r.allowed);
  CHECK(r.remaining == 10);
  CHECK(r.retry_after == Nanos{2 * kSec});  // 20 more tokens at 10/s
  CHECK(r.reset_after == Nanos{9 * kSec});
  CHECK_FALSE(d.at(2 * kSec - 1, 30).allowed);
  CHECK(d.at(2 * kSec, 30).allowed);
  // Zero cost: always allowed, counts nothing.
  const auto z = d.at(2 * kSec, 0);
  CHECK(z.allowed);
  CHECK(z.remaining == 0);
}

TEST_CASE("a cost above the burst is never admitted", "[policy][bucket]") {
  auto d = drive(make(per_second(10), 5));
  const auto before = d.state;
  const auto r = d.at(0, 6);
  CHECK_FALSE(r.allowed);
  CHECK(r.never());
  CHECK(r.retry_after == kNever);
  CHECK(r.remaining == 5);
  CHECK(d.state == before);
  CHECK(d.at(1000 * kSec, std::numeric_limits<Cost>::max()).never());
  CHECK(d.at(0, 5).allowed);
}

TEST_CASE("settle gives back at most what was taken", "[policy][bucket]") {
  auto d = drive(make(per_second(1), 10));
  REQUIRE(d.at(0, 5).allowed);
  const auto first = d.last;
  REQUIRE(d.at(0, 3).allowed);
  const auto second = d.last;
  d.give_back(0, second, 1000);  // more than was taken: only its 3 come back
  CHECK(d.peek(0, 0).remaining == 5);
  d.settle(0, first, 2);  // used 2 of 5
  CHECK(d.peek(0, 0).remaining == 8);
  // A give-back to a full bucket changes nothing.
  REQUIRE(d.at(0, 2).allowed);
  const auto third = d.last;
  const auto full_at = 4 * kSec;
  const auto before = d.state;
  d.give_back(full_at, third, 2);
  CHECK(d.state == before);
}

TEST_CASE("settle above the take is a debt of exactly the excess",
          "[policy][bucket][seams]") {
  auto d = drive(make(per_second(1), 10));
  REQUIRE(d.at(0, 4).allowed);
  d.settle(0, d.last, 7);  // the provider counted 3 more than estimated
  CHECK(d.peek(0, 0).remaining == 3);
  // A debt past the burst: the key waits exactly the excess.
  REQUIRE(d.at(0, 3).allowed);
  d.settle(0, d.last, 8);  // 5 more than the bucket held
  CHECK(d.peek(0, 0).remaining == 0);
  const Decision w = d.peek(0, 1);
  CHECK(w.retry_after == Nanos{6 * kSec});  // 5 s of debt, then 1 s a token
  CHECK_FALSE(d.peek(6 * kSec - 1, 1).allowed);
  CHECK(d.peek(6 * kSec, 1).allowed);
}

TEST_CASE("idle once full again; zero state is full at any time",
          "[policy][bucket]") {
  auto d = drive(make(per_second(2), 4));
  CHECK(d.policy.idle(TokenBucket::State{}, Nanos{0}));
  CHECK(d.policy.idle(TokenBucket::State{},
                      Nanos{std::numeric_limits<std::int64_t>::min()}));
  CHECK(d.peek(-5 * kSec, 4).allowed);  // negative times: zero is far past
  REQUIRE(d.at(0, 4).allowed);
  CHECK_FALSE(d.policy.idle(d.state, Nanos{2 * kSec - 1}));
  CHECK(d.policy.idle(d.state, Nanos{2 * kSec}));
}

TEST_CASE("a clock stepping back never adds capacity", "[policy][bucket]") {
  auto d = drive(make(per_second(10), 10));
  REQUIRE(d.at(10 * kSec, 10).allowed);
  const auto at_now = d.peek(10 * kSec + 500 * kMs, 0).remaining;
  CHECK(at_now == 5);
  CHECK(d.peek(10 * kSec, 0).remaining == 0);
  CHECK(d.peek(9 * kSec, 0).remaining == 0);
  // Retry-after measured from the earlier time is longer, not shorter.
  CHECK(d.peek(9 * kSec).retry_after == Nanos{1100 * kMs});
}

TEST_CASE("remaining is exactly what one more call could take",
          "[policy][bucket]") {
  auto d = drive(make(per(3, std::chrono::milliseconds(7)), 50));
  std::mt19937_64 rng(rk_test::seed_or(42));
  std::int64_t t = 0;
  for (int i = 0; i < 20'000; ++i) {
    t += static_cast<std::int64_t>(rng() % 5'000'000);
    const Cost c = rng() % 12;
    const auto r = d.at(t, c);
    const auto rem = r.remaining;
    if (rem > 0) REQUIRE(d.peek(t, rem).allowed);
    REQUIRE_FALSE(d.peek(t, rem + 1).allowed);
    if (!r.allowed) {
      REQUIRE_FALSE(d.peek(t + r.retry_after.count() - 1, c).allowed);
      REQUIRE(d.peek(t + r.retry_after.count(), c).allowed);
    }
  }
}

// Found under UBSan in CI (property_test's edge hammer): an excess of 2^64
// tokens at 2^63 ns each, and a placement of a cost never admitted, took
// 128-bit products past their range. Both saturate: a settle far above its
// take leaves the bucket empty to the end of the clock's range.
TEST_CASE("a settle's debt and a placement saturate at the largest values",
          "[policy][bucket][seams]") {
  const auto tb =
      TokenBucket::create(Rate{std::uint64_t{1} << 62,
                               Nanos{std::numeric_limits<std::int64_t>::max()}},
                          std::uint64_t{1} << 62)
          .value();
  const Nanos now{std::numeric_limits<std::int64_t>::max() / 2};
  const TokenBucket::State s0{};
  const auto st = tb.step(s0, now, 1);
  REQUIRE(st.decision.allowed);
  const auto placed = tb.place(s0, now, 1);
  const TokenBucket::State debt =
      tb.settle(st.next, now, placed, 1, std::numeric_limits<Cost>::max());
  CHECK(tb.idle_at(debt) == Nanos{std::numeric_limits<std::int64_t>::max()});
  // A cost above any burst, placed and settled: no overflow, nothing back
  // beyond the take.
  const auto big = tb.place(s0, now, std::numeric_limits<Cost>::max());
  const TokenBucket::State back =
      tb.settle(st.next, now, big, std::numeric_limits<Cost>::max(), 0);
  CHECK(tb.idle(back, now));
}

// ------------------------------------------------------------ issue 15 --
//
// The check's arithmetic was made cheaper (issue 15): step() takes a 64-bit
// path when a token is a whole number of ns (den == 1) and divides by the
// emission interval with a multiplication (detail::DivBy). Both are checked
// here against independent models: DivBy against the CPU's division, step()
// against GCRA written out below in 128-bit arithmetic from its definition,
// on random states and times and on the edges where a 64-bit sum or
// difference would overflow.

TEST_CASE("DivBy is floor division for every divisor and numerator",
          "[i15][math]") {
  std::mt19937_64 rng(rk_test::seed_or(0xD1B));
  std::vector<std::uint64_t> divisors = {1,
                                         2,
                                         3,
                                         7,
                                         10,
                                         1'000'000'000,
                                         86'400'000'000'000ULL,
                                         (std::uint64_t{1} << 32) - 1,
                                         std::uint64_t{1} << 32,
                                         (std::uint64_t{1} << 32) + 1,
                                         (std::uint64_t{1} << 63) - 1,
                                         std::uint64_t{1} << 63,
                                         (std::uint64_t{1} << 63) + 1,
                                         ~std::uint64_t{0} - 1,
                                         ~std::uint64_t{0}};
  for (int i = 0; i < 200; ++i) {
    // Divisors of every bit length.
    divisors.push_back((rng() >> (rng() % 64)) | 1);
    divisors.push_back(rng() >> (rng() % 64) << 1);
  }
  std::uint64_t checked = 0;
  for (const std::uint64_t d : divisors) {
    if (d == 0) continue;
    const ratekeeper::detail::DivBy div(d);
    std::vector<std::uint64_t> ns = {
        0, 1, d - 1, d, ~std::uint64_t{0}, ~std::uint64_t{0} - 1};
    // Around multiples of d, where a rounding error would show.
    for (int k = 0; k < 64; ++k) {
      const std::uint64_t qmax = ~std::uint64_t{0} / d;
      const std::uint64_t q =
          qmax == ~std::uint64_t{0} ? rng() : rng() % (qmax + 1);
      ns.push_back(q * d);
      if (q * d != 0) ns.push_back(q * d - 1);
      if (q * d != ~std::uint64_t{0}) ns.push_back(q * d + 1);
      ns.push_back(rng());
      ns.push_back(rng() >> (rng() % 64));
    }
    for (const std::uint64_t n : ns) {
      if (div(n) != n / d) {
        FAIL("DivBy(" << d << ")(" << n << ") = " << div(n) << ", not "
                      << n / d);
      }
      ++checked;
    }
  }
  CHECK(checked > 50'000);
}

namespace {

__extension__ using m128 = __int128;

m128 floor_div(m128 a, m128 b) {
  m128 q = a / b;
  if (a % b != 0 && a < 0) --q;
  return q;
}
m128 ceil_div(m128 a, m128 b) {
  m128 q = a / b;
  if (a % b != 0 && a > 0) ++q;
  return q;
}
std::int64_t sat64(m128 v) {
  if (v > std::numeric_limits<std::int64_t>::max())
    return std::numeric_limits<std::int64_t>::max();
  if (v < std::numeric_limits<std::int64_t>::min())
    return std::numeric_limits<std::int64_t>::min();
  return static_cast<std::int64_t>(v);
}

// GCRA from its definition (docs/policies.md): T = period / count ns per
// token (num / den in lowest terms), tau = burst * T. A state is its TAT,
// tat_biased - 2^63 ns plus tat_frac / den ns (a fraction of den or more
// counts as den - 1). A call of cost c at t is allowed iff
// max(TAT, t) + c T - t <= tau, or c == 0 (a zero cost is always allowed,
// in debt too); then TAT' = max(TAT, t) + c T (c > 0).
// Everything in units of 1/den ns, in 128 bits.
struct Gcra {
  std::uint64_t num, den, burst;
  Step<TokenBucket::State> step(const TokenBucket::State& s, std::int64_t t,
                                Cost cost) const {
    const m128 D = den, N = num;
    const m128 tau = static_cast<m128>(burst) * N;
    const m128 frac = std::min<m128>(s.tat_frac, D - 1);
    const m128 tat =
        (static_cast<m128>(s.tat_biased) - (static_cast<m128>(1) << 63)) * D +
        frac;
    const m128 now = static_cast<m128>(t) * D;
    const m128 base = tat > now ? tat : now;
    const auto left = [&](m128 at) -> std::uint64_t {
      const m128 room = tau - (at - now);
      return room <= 0 ? 0 : static_cast<std::uint64_t>(room / N);
    };
    const auto ns_until = [&](m128 at) {
      return at - now <= 0 ? Nanos{0} : Nanos{sat64(ceil_div(at - now, D))};
    };
    if (cost > burst) {
      return {s, Decision{false, burst, left(base), kNever, ns_until(base)}};
    }
    const m128 next = base + static_cast<m128>(cost) * N;
    if (next - now <= tau || cost == 0) {
      TokenBucket::State out = s;
      if (cost != 0) {
        m128 whole = floor_div(next, D);
        m128 rem = next - whole * D;
        if (whole > std::numeric_limits<std::int64_t>::max()) {
          whole = std::numeric_limits<std::int64_t>::max();
          rem = D - 1;
        }
        out = TokenBucket::State{
            static_cast<std::uint64_t>(whole + (static_cast<m128>(1) << 63)),
            static_cast<std::uint64_t>(rem)};
      }
      return {out, Decision{true, burst, left(next), Nanos{0}, ns_until(next)}};
    }
    const m128 at = ceil_div(base - (tau - static_cast<m128>(cost) * N), D);
    return {s, Decision{false, burst, left(base), Nanos{sat64(at - t)},
                        ns_until(base)}};
  }
};

}  // namespace

TEST_CASE("step() agrees with GCRA in 128 bits, on the 64-bit path's edges too",
          "[i15][policy][bucket]") {
  std::mt19937_64 rng(rk_test::seed_or(0x15B));
  constexpr std::int64_t kMax = std::numeric_limits<std::int64_t>::max();
  constexpr std::int64_t kMin = std::numeric_limits<std::int64_t>::min();
  struct Config {
    Rate rate;
    std::uint64_t burst;
  };
  // den == 1 (the 64-bit path) and den > 1 (the 128-bit one), small and
  // extreme: a burst whose refill is just under 292 years, 1 ns per token.
  std::vector<Config> configs = {
      {per_second(10), 20},
      {per_second(1), 1'000'000'000},
      {per_day(1), 1},
      {per_day(1), 100'000},
      {Rate{1, Nanos{1}}, 1},
      {Rate{1, Nanos{1}}, std::uint64_t{1} << 62},
      {Rate{1, Nanos{kMax}}, 1},
      {Rate{3, Nanos{kMax - 1}}, 2},
      {per_second(7), 5},
      {per_second(999), 1000},
      {per(3, std::chrono::milliseconds(10)), 3},
  };
  for (int i = 0; i < 40; ++i) {
    const std::uint64_t count = 1 + rng() % 1000;
    const auto period = static_cast<std::int64_t>(1 + rng() % (kSec * 100));
    configs.push_back({Rate{count, Nanos{period}}, 1 + rng() % 1000});
  }
  std::uint64_t unit = 0, checked = 0;
  for (const Config& c : configs) {
    auto made = TokenBucket::create(c.rate, c.burst);
    if (!made.ok()) continue;
    const TokenBucket& b = *made;
    const auto period = static_cast<std::uint64_t>(c.rate.period.count());
    const std::uint64_t g = std::gcd(period, c.rate.count);
    const Gcra model{period / g, c.rate.count / g, c.burst};
    if (model.den == 1) ++unit;
    const std::int64_t edges[] = {kMin, kMin + 1, -1, 0, 1, kMax - 1, kMax};
    std::vector<std::int64_t> times(std::begin(edges), std::end(edges));
    for (int k = 0; k < 24; ++k) {
      times.push_back(static_cast<std::int64_t>(rng()));
      times.push_back(static_cast<std::int64_t>(rng() % (kSec * 3600)));
    }
    for (const std::int64_t t : times) {
      // States: never seen, around now (from half a burst behind to a
      // burst and a half ahead: in debt too), at the ends of the range,
      // random.
      std::vector<TokenBucket::State> states = {
          TokenBucket::State{},
          TokenBucket::State{~std::uint64_t{0}, model.den - 1},
          TokenBucket::State{~std::uint64_t{0}, 0},
          TokenBucket::State{rng(), rng() % model.den}};
      for (int k = 0; k < 6; ++k) {
        const m128 span = static_cast<m128>(c.burst) * model.num;
        const m128 off =
            static_cast<m128>(rng() % 4096) * (span / 1024 + 1) / 2 - span / 2;
        const m128 tat = static_cast<m128>(t) + off / model.den;
        const m128 whole = tat > kMax ? kMax : tat < kMin ? kMin : tat;
        states.push_back(TokenBucket::State{
            static_cast<std::uint64_t>(whole + (static_cast<m128>(1) << 63)),
            model.den == 1 ? (k == 5 ? 3 : 0) : rng() % model.den});
      }
      for (const auto& s : states) {
        const Cost costs[] = {0,       1,           c.burst / 2,
                              c.burst, c.burst + 1, 1 + rng() % c.burst,
                              ~Cost{0}};
        for (const Cost cost : costs) {
          const auto got = b.step(s, Nanos{t}, cost);
          const auto want = model.step(s, t, cost);
          if (!(got.decision == want.decision && got.next == want.next)) {
            FAIL("rate " << c.rate.count << "/" << c.rate.period.count()
                         << "ns burst " << c.burst << " t " << t << " tat "
                         << s.tat_biased << "+" << s.tat_frac << " cost "
                         << cost << ": allowed " << got.decision.allowed
                         << " vs " << want.decision.allowed << ", remaining "
                         << got.decision.remaining << " vs "
                         << want.decision.remaining << ", retry "
                         << got.decision.retry_after.count() << " vs "
                         << want.decision.retry_after.count() << ", reset "
                         << got.decision.reset_after.count() << " vs "
                         << want.decision.reset_after.count() << ", next "
                         << got.next.tat_biased << " vs "
                         << want.next.tat_biased);
          }
          ++checked;
        }
      }
    }
  }
  CHECK(unit >= 6);  // the 64-bit path was exercised
  CHECK(checked > 20'000);
}

// Issue 17 (examiner's w12): "a zero cost is always allowed, counts nothing
// and changes no state" (docs/policies.md), with the bucket in debt too: a
// held reservation, a settle above the take, a charge. The oracle: GCRA by
// hand, rate 1/s and burst 2 (span 2 s); in debt the TAT is past now + 2 s,
// so a zero cost is told remaining 0, retry_after 0 and reset_after the
// TAT - now, and a cost 1 waits until TAT - 1 s.
TEST_CASE("a zero cost is allowed when the bucket is in debt",
          "[i17][bucket]") {
  const TokenBucket policy = make(per_second(1), 2);
  const auto zero_in_debt = [](const Decision& d, Nanos tat_ahead) {
    CHECK(d.allowed);
    CHECK(d.remaining == 0);
    CHECK(d.retry_after == Nanos{0});
    CHECK(d.reset_after == tat_ahead);
  };

  SECTION("policy: step(s, now, 0) in debt, 64-bit and 128-bit paths") {
    // TAT 3.5 s ahead at now 10 s: 1.5 s past the span.
    const TokenBucket::State s{
        static_cast<std::uint64_t>(13'500 * kMs) ^ (std::uint64_t{1} << 63), 0};
    for (const auto& st : {policy.step(s, Nanos{10 * kSec}, 0),
                           policy.step_exact(s, Nanos{10 * kSec}, 0)}) {
      zero_in_debt(st.decision, Nanos{3'500 * kMs});
      CHECK(st.next == s);  // nothing counted
    }
    // A fractional interval (7/s: the 128-bit path only).
    const TokenBucket seven = make(per_second(7), 1);
    const auto charged = seven.charge(TokenBucket::State{}, Nanos{0}, 2);
    const auto st = seven.step(charged, Nanos{0}, 0);
    CHECK(st.decision.allowed);
    CHECK(st.decision.remaining == 0);
    CHECK(st.decision.retry_after == Nanos{0});
    CHECK(st.decision.reset_after == Nanos{(2 * kSec + 6) / 7});
    CHECK(st.next == charged);
  }

  ManualClock clock;
  Limiter<TokenBucket, InMemoryStore, ManualClock> lim(policy, clock);

  SECTION("Limiter: after a held reservation") {
    REQUIRE(lim.acquire("k", 2).allowed);  // TAT 2 s
    const Reserved r = lim.reserve("k", 1, std::chrono::seconds(10));
    REQUIRE(r.held);
    REQUIRE(r.go_at == Nanos{kSec});  // TAT 3 s: 1 s past the span
    for (int i = 0; i < 3; ++i) {
      zero_in_debt(lim.acquire("k", 0), Nanos{3 * kSec});
      zero_in_debt(lim.peek("k", 0), Nanos{3 * kSec});
    }
    // Nothing counted: a cost of 1 still waits until TAT - 1 s = 2 s.
    CHECK(lim.peek("k", 1).retry_after == Nanos{2 * kSec});
    // A Waiter with cost 0 is admitted at once, holding nothing.
    Waiter<ManualClock> waiter(clock);
    Waited w = waiter.acquire(lim, "k", 0, std::chrono::seconds(10));
    CHECK(w.status.ok());
    CHECK(w.go_at == Nanos{0});
    CHECK(w.decision.allowed);
    CHECK(lim.peek("k", 1).retry_after == Nanos{2 * kSec});
  }

  SECTION("Limiter: after a settle above the take") {
    Taken t = lim.take("k", 1);  // TAT 1 s
    REQUIRE(t.decision.allowed);
    REQUIRE(lim.settle(t.receipt, 4).ok());  // + 3 s: TAT 4 s
    zero_in_debt(lim.acquire("k", 0), Nanos{4 * kSec});
    zero_in_debt(lim.peek("k", 0), Nanos{4 * kSec});
    clock.advance(Nanos{1'500 * kMs});  // still in debt: TAT 2.5 s ahead
    zero_in_debt(lim.acquire("k", 0), Nanos{2'500 * kMs});
    CHECK(lim.peek("k", 1).retry_after == Nanos{1'500 * kMs});
  }

  SECTION("Limit and Chain: after charge-on-reject and a reservation") {
    auto l =
        make_limit({.name = "a", .charge_on_reject = true}, policy).value();
    auto other = make_limit({.name = "b"}, policy).value();
    Receipt rr;
    REQUIRE(l->acquire("k", 2, Nanos{0}).allowed);
    Chain<ManualClock> chain(clock);
    // Refused in a chain: charged all the same (TAT 4 s).
    CHECK_FALSE(chain.acquire({{l.get(), "k", 2}}).allowed);
    zero_in_debt(l->acquire("k", 0, Nanos{0}), Nanos{4 * kSec});
    zero_in_debt(l->peek("k", 0, Nanos{0}), Nanos{4 * kSec});
    auto plain = make_limit({.name = "c"}, policy).value();
    REQUIRE(plain->take("k", 2, Nanos{0}, rr).allowed);
    const Reserved r =
        plain->reserve("k", 2, Nanos{0}, std::chrono::seconds(9));
    REQUIRE(r.held);  // TAT 4 s
    const ChainDecision cd = chain.acquire(
        {{plain.get(), "k", 0}, {l.get(), "k", 0}, {other.get(), "k", 1}});
    CHECK(cd.allowed);
    // The cost-1 item was counted, the zero ones nothing.
    CHECK(other->peek("k", 0, Nanos{0}).remaining == 1);
    CHECK(plain->peek("k", 1, Nanos{0}).retry_after == Nanos{3 * kSec});
    Waiter<ManualClock> waiter(clock);
    Waited w = waiter.acquire(*plain, "k", 0, std::chrono::seconds(10));
    CHECK(w.status.ok());
    CHECK(plain->peek("k", 1, Nanos{0}).retry_after == Nanos{3 * kSec});
  }
}
