// Chain, Limit, PolicyLimit: several limits on one call, all or nothing.
// The 8-thread runs are in concurrency_test.cpp ("[chain]").
#include "ratekeeper/chain.hpp"

#include <memory>
#include <string>

#include "ratekeeper/errors.hpp"
#include "ratekeeper/policy/fixed_window.hpp"
#include "ratekeeper/policy/sliding_window.hpp"
#include "ratekeeper/policy/token_bucket.hpp"
#include "ratekeeper/store/in_memory.hpp"
#include "ratekeeper/store/sharded.hpp"
#include "test_util.hpp"

using namespace ratekeeper;
using rk_test::kSec;

namespace {

template <template <class> class S>
struct StoreTag {
  template <class State>
  using Store = S<State>;
};

// Requests per minute (fixed, 3) and tokens (bucket of 100, 100 per minute).
template <template <class> class S>
struct Rig {
  ManualClock clock{std::chrono::hours(1)};
  Chain<ManualClock> chain{clock};
  std::unique_ptr<PolicyLimit<FixedWindow, S>> rpm =
      make_limit<S>({.name = "rpm"}, FixedWindow::create(per_minute(3)).value())
          .value();
  std::unique_ptr<PolicyLimit<TokenBucket, S>> tpm =
      make_limit<S>({.name = "tpm", .unit = Unit::kTokens},
                    TokenBucket::create(per_minute(100), 100).value())
          .value();

  ChainDecision call(std::string_view user, Cost tokens) {
    return chain.acquire({{rpm.get(), user, 1}, {tpm.get(), user, tokens}});
  }
  std::uint64_t rpm_left(std::string_view user) {
    return rpm->peek(user, 0, clock.now()).remaining;
  }
  std::uint64_t tpm_left(std::string_view user) {
    return tpm->peek(user, 0, clock.now()).remaining;
  }
};

}  // namespace

TEMPLATE_TEST_CASE("a chain is all or nothing", "[chain]",
                   StoreTag<InMemoryStore>, StoreTag<ShardedStore>) {
  Rig<TestType::template Store> rig;

  SECTION("allowed: every limit holds its cost") {
    const ChainDecision d = rig.call("u", 40);
    REQUIRE(d.allowed);
    CHECK(d.retry_after == Nanos{0});
    REQUIRE(d.results.size() == 2);
    CHECK(d.results[0].counted);
    CHECK(d.results[1].counted);
    CHECK(d.results[0].decision.remaining == 2);
    CHECK(d.results[1].decision.remaining == 60);
    CHECK(rig.rpm_left("u") == 2);
    CHECK(rig.tpm_left("u") == 60);
    // Binding when allowed: the least room relative to capacity (2/3 of
    // requests left against 60/100 of tokens).
    CHECK(d.binding == 1);
  }

  SECTION("a later limit refuses: the earlier one gives back its take") {
    REQUIRE(rig.call("u", 90).allowed);
    const ChainDecision d = rig.call("u", 20);  // 10 tokens left
    REQUIRE_FALSE(d.allowed);
    CHECK(d.binding == 1);
    CHECK(d.binding_result()->limit->name() == "tpm");
    // 10 tokens left, 20 wanted: 10 more at 100/min is 6 s.
    CHECK(d.retry_after == Nanos{6 * kSec});
    CHECK(d.results[0].decision.allowed);  // rpm admitted, then vetoed
    CHECK_FALSE(d.results[0].counted);
    CHECK(d.results[0].decision.remaining == 2);  // after the give-back
    CHECK(rig.rpm_left("u") == 2);
    CHECK(rig.tpm_left("u") == 10);
    CHECK(rig.rpm->counts().vetoed == 1);
    CHECK(rig.tpm->counts().denied == 1);
  }

  SECTION("the first limit refuses: later ones are peeked, not taken") {
    for (int i = 0; i < 3; ++i) REQUIRE(rig.call("u", 1).allowed);
    rig.clock.advance(std::chrono::seconds(10));
    const ChainDecision d = rig.call("u", 200);  // above tpm's capacity too
    REQUIRE_FALSE(d.allowed);
    // Both refuse; the chain waits for the longer: the bucket never admits
    // 200 tokens.
    CHECK(d.retry_after == kNever);
    CHECK(d.never());
    CHECK(d.binding == 1);
    CHECK_FALSE(d.results[1].counted);
    CHECK(rig.tpm_left("u") == 100);
    const Rejection r = Rejection::from(d);
    CHECK(r.kind == Refusal::kTooLarge);
    CHECK(r.status() == 413);
  }

  SECTION("the wait is the largest of every refusing limit's") {
    for (int i = 0; i < 3; ++i) REQUIRE(rig.call("u", 30).allowed);
    // rpm: window ends in 60 s; tpm: 10 left, 50 wanted: 24 s.
    const ChainDecision d = rig.call("u", 50);
    REQUIRE_FALSE(d.allowed);
    CHECK(d.results[0].decision.retry_after == Nanos{60 * kSec});
    CHECK(d.results[1].decision.retry_after == Nanos{24 * kSec});
    CHECK(d.retry_after == Nanos{60 * kSec});
    CHECK(d.binding == 0);
    // Every limit's remaining is reported.
    CHECK(d.results[0].decision.remaining == 0);
    CHECK(d.results[1].decision.remaining == 10);
    rig.clock.advance(d.retry_after - Nanos{1});
    CHECK_FALSE(rig.call("u", 50).allowed);
    rig.clock.advance(Nanos{1});
    CHECK(rig.call("u", 50).allowed);
  }

  SECTION("keys are apart, and peek counts nothing") {
    REQUIRE(rig.call("a", 100).allowed);
    const ChainDecision p = rig.chain.peek(std::initializer_list<ChainItem>{
        {rig.rpm.get(), "b", 1}, {rig.tpm.get(), "b", 100}});
    CHECK(p.allowed);
    CHECK(rig.tpm_left("b") == 100);
    CHECK(rig.rpm->counts().allowed == 1);
    CHECK_FALSE(rig.call("a", 1).allowed);
    CHECK(rig.call("b", 100).allowed);
  }

  SECTION("settle gives back the unused part of an estimate") {
    ChainDecision d = rig.call("u", 80);
    REQUIRE(d.allowed);
    rig.clock.advance(std::chrono::milliseconds(1));
    REQUIRE(rig.chain.settle(d, Unit::kTokens, 30).ok());
    // 20 + 50 back + 1 ms of refill (100 per minute: 0.0017 tokens).
    CHECK(rig.tpm_left("u") == 70);
    CHECK(rig.rpm_left("u") == 2);
    CHECK(d.results[1].decision.remaining == 70);
    // Once only.
    CHECK(rig.chain.settle(d, 1, 0).code() ==
          absl::StatusCode::kFailedPrecondition);
    CHECK(rig.chain.settle(d, 7, 0).code() == absl::StatusCode::kOutOfRange);
    // give_back returns what is still held: the request.
    rig.chain.give_back(d);
    CHECK(rig.rpm_left("u") == 3);
    CHECK(rig.tpm_left("u") == 70);
  }

  SECTION("an empty chain admits and names no binding limit") {
    const ChainDecision d = rig.chain.acquire(std::span<const ChainItem>{});
    CHECK(d.allowed);
    CHECK(d.binding == ChainDecision::npos);
    CHECK(d.binding_result() == nullptr);
  }
}

TEMPLATE_TEST_CASE("a shadow limit decides and counts but never denies",
                   "[chain]", StoreTag<InMemoryStore>, StoreTag<ShardedStore>) {
  ManualClock clock{std::chrono::hours(1)};
  Chain<ManualClock> chain{clock};
  auto enforced =
      make_limit<TestType::template Store>(
          {.name = "enforced"}, FixedWindow::create(per_minute(10)).value())
          .value();
  auto trial = make_limit<TestType::template Store>(
                   {.name = "trial", .shadow = true},
                   FixedWindow::create(per_minute(2)).value())
                   .value();
  auto call = [&] {
    return chain.acquire({{trial.get(), "k", 1}, {enforced.get(), "k", 1}});
  };
  REQUIRE(call().allowed);
  REQUIRE(call().allowed);
  const ChainDecision d = call();
  CHECK(d.allowed);
  CHECK(d.results[0].shadow_denied);
  CHECK_FALSE(d.results[0].counted);
  CHECK(d.results[1].counted);
  CHECK(trial->counts().shadow_denied == 1);
  CHECK(trial->counts().allowed == 2);
  CHECK(enforced->counts().allowed == 3);
  // Switched to enforcing at run time: it denies now.
  trial->set_shadow(false);
  const ChainDecision e = call();
  CHECK_FALSE(e.allowed);
  CHECK(e.binding == 0);
  CHECK(enforced->peek("k", 0, clock.now()).remaining == 7);
}

TEMPLATE_TEST_CASE("charge-on-reject counts denied attempts", "[chain]",
                   StoreTag<InMemoryStore>, StoreTag<ShardedStore>) {
  ManualClock clock{std::chrono::hours(1)};
  Chain<ManualClock> chain{clock};
  // Anti-abuse: 3 attempts per 10 s per IP, counted whatever happens.
  auto abuse =
      make_limit<TestType::template Store>(
          {.name = "attempts", .charge_on_reject = true},
          TokenBucket::create(per(3, std::chrono::seconds(10)), 3).value())
          .value();
  auto rpm = make_limit<TestType::template Store>(
                 {.name = "rpm"}, FixedWindow::create(per_minute(1)).value())
                 .value();

  SECTION("kept when another limit refuses") {
    REQUIRE(chain.acquire({{abuse.get(), "ip", 1}, {rpm.get(), "u", 1}}));
    const ChainDecision d =
        chain.acquire({{abuse.get(), "ip", 1}, {rpm.get(), "u", 1}});
    REQUIRE_FALSE(d.allowed);
    CHECK(d.results[0].counted);
    CHECK(abuse->peek("ip", 0, clock.now()).remaining == 1);
  }

  SECTION("a key that keeps hammering stays locked, up to a bound") {
    for (int i = 0; i < 3; ++i) {
      REQUIRE(chain.acquire({{abuse.get(), "ip", 1}}).allowed);
    }
    Nanos last{0};
    for (int i = 0; i < 10; ++i) {
      const ChainDecision d = chain.acquire({{abuse.get(), "ip", 1}});
      REQUIRE_FALSE(d.allowed);
      CHECK(d.results[0].counted);
      CHECK(d.retry_after >= last);
      last = d.retry_after;
    }
    // Debt is capped at one more burst: full again 2 * burst / rate = 20 s
    // after the attempts, one token back after 13.33 s.
    CHECK(last == Nanos{13'333'333'334});
    clock.advance(last);
    CHECK(chain.acquire({{abuse.get(), "ip", 1}}).allowed);
  }

  SECTION("without it, denied attempts cost nothing") {
    auto plain =
        make_limit<TestType::template Store>(
            {.name = "plain"},
            TokenBucket::create(per(3, std::chrono::seconds(10)), 3).value())
            .value();
    for (int i = 0; i < 3; ++i) {
      REQUIRE(chain.acquire({{plain.get(), "ip", 1}}).allowed);
    }
    for (int i = 0; i < 10; ++i) {
      CHECK(chain.acquire({{plain.get(), "ip", 1}}).retry_after ==
            Nanos{3'333'333'334});
    }
  }
}

TEST_CASE("policies' charge() counts past the limit, boundedly", "[chain]") {
  SECTION("fixed window: until the window ends") {
    const auto p = FixedWindow::create(per_second(2)).value();
    FixedWindow::State s{};
    for (int i = 0; i < 5; ++i) s = p.charge(s, Nanos{kSec}, 1);
    CHECK(s.count == 5);
    const Decision d = p.step(s, Nanos{kSec}, 1).decision;
    CHECK_FALSE(d.allowed);
    CHECK(d.remaining == 0);
    CHECK(d.retry_after == Nanos{kSec});
    CHECK(p.step(s, Nanos{2 * kSec}, 2).decision.allowed);
    // Saturates instead of wrapping.
    s = p.charge(s, Nanos{kSec}, UINT64_MAX);
    CHECK(s.count == FixedWindow::kMaxLimit);
  }
  SECTION("sliding window: weighs on the next window, not after") {
    const auto p = SlidingWindow::create(per_second(2)).value();
    SlidingWindow::State s{};
    s = p.charge(s, Nanos{kSec}, 4);
    CHECK_FALSE(p.step(s, Nanos{2 * kSec + kSec / 2}, 1).decision.allowed);
    CHECK(p.step(s, Nanos{3 * kSec}, 2).decision.allowed);
    s = p.charge(s, Nanos{kSec}, UINT64_MAX);
    CHECK(s.cur == SlidingWindow::kMaxLimit);
  }
  SECTION("token bucket: at most one more burst of debt") {
    const auto p = TokenBucket::create(per_second(1), 5).value();
    TokenBucket::State s{};
    s = p.charge(s, Nanos{kSec}, UINT64_MAX);
    // Full again 10 s later (2 * burst / rate), not before.
    CHECK_FALSE(p.idle(s, Nanos{11 * kSec - 1}));
    CHECK(p.idle(s, Nanos{11 * kSec}));
  }
}

TEST_CASE("reconfigure keeps every key's state", "[chain]") {
  const Nanos t0{std::chrono::hours(1)};
  SECTION("token bucket: the time until full carries over") {
    auto l = make_limit({.name = "tpm"},
                        TokenBucket::create(per_second(10), 10).value())
                 .value();
    REQUIRE(l->acquire("k", 6, t0).allowed);  // 4 left, full in 0.6 s
    REQUIRE(
        l->reconfigure(TokenBucket::create(per_second(10), 20).value()).ok());
    CHECK(l->limit() == 20);
    CHECK(l->peek("k", 0, t0).remaining == 14);  // 6 still used
    // Another rate: the 0.6 s debt is now 0.6 s * 100/s = 60 tokens of 100.
    REQUIRE(
        l->reconfigure(TokenBucket::create(per_second(100), 100).value()).ok());
    CHECK(l->peek("k", 0, t0).remaining == 40);
    // A rate whose emission interval is a fraction of a nanosecond
    // (1e9/7 ns): remainders written under it are read under others.
    REQUIRE(l->reconfigure(TokenBucket::create(per_second(7), 7).value()).ok());
    REQUIRE(l->acquire("k", 1, t0).allowed);
    REQUIRE(l->reconfigure(TokenBucket::create(per_second(1), 1).value()).ok());
    CHECK_FALSE(l->peek("k", 1, t0).allowed);
    CHECK(l->peek("k", 1, t0 + Nanos{2 * kSec}).allowed);
  }
  SECTION("window: the count carries over, above a lowered limit too") {
    auto l =
        make_limit({.name = "rpm"}, FixedWindow::create(per_minute(10)).value())
            .value();
    REQUIRE(l->acquire("k", 8, t0).allowed);
    REQUIRE(l->reconfigure(FixedWindow::create(per_minute(20)).value()).ok());
    CHECK(l->peek("k", 0, t0).remaining == 12);
    REQUIRE(l->reconfigure(FixedWindow::create(per_minute(5)).value()).ok());
    const Decision d = l->peek("k", 1, t0);
    CHECK_FALSE(d.allowed);
    CHECK(d.remaining == 0);
    CHECK(d.retry_after == Nanos{60 * kSec});
    CHECK_FALSE(l->acquire("k", 1, t0).allowed);
    CHECK(l->acquire("k", 5, t0 + std::chrono::minutes(1)).allowed);
  }
  SECTION("sliding window above a lowered limit") {
    auto l = make_limit({.name = "rpm"},
                        SlidingWindow::create(per_minute(10)).value())
                 .value();
    REQUIRE(l->acquire("k", 9, t0).allowed);
    REQUIRE(l->reconfigure(SlidingWindow::create(per_minute(3)).value()).ok());
    const Decision d = l->peek("k", 1, t0);
    CHECK_FALSE(d.allowed);
    CHECK(d.remaining == 0);
    // Next window: 9 * (60 - e) / 60 <= 2 from e = 46.67 s; window starts
    // 60 s after t0 (t0 is a whole hour).
    CHECK(d.retry_after == Nanos{60 * kSec + 46'666'666'667});
  }
  SECTION("a window's period cannot change in place") {
    auto l =
        make_limit({.name = "rpm"}, FixedWindow::create(per_minute(10)).value())
            .value();
    const absl::Status st =
        l->reconfigure(FixedWindow::create(per_hour(10)).value());
    CHECK(st.code() == absl::StatusCode::kFailedPrecondition);
    CHECK(l->limit() == 10);
  }
}

namespace chain_test {
// A policy without charge(): charge_on_reject is refused for it.
struct NoCharge {
  struct State {
    std::uint64_t n = 0;
    friend constexpr bool operator==(const State&, const State&) = default;
  };
  Step<State> step(const State& s, Nanos, Cost c) const noexcept {
    return {State{s.n + c}, Decision{true, 10, 10, Nanos{0}, Nanos{0}}};
  }
  struct Placement {};
  Placement place(const State&, Nanos, Cost) const noexcept { return {}; }
  State settle(const State& s, Nanos, const Placement&, Cost,
               Cost) const noexcept {
    return s;
  }
  bool idle(const State& s, Nanos) const noexcept { return s.n == 0; }
  Nanos idle_at(const State&) const noexcept { return Nanos::min(); }
  State merge(const State& a, const State&) const noexcept { return a; }
  std::uint64_t limit() const noexcept { return 10; }
};
static_assert(Policy<NoCharge>);
static_assert(!ChargingPolicy<NoCharge>);
}  // namespace chain_test
using chain_test::NoCharge;

TEST_CASE("make_limit refuses bad options with a clear error", "[chain]") {
  const auto p = FixedWindow::create(per_minute(1)).value();
  CHECK(make_limit({.name = ""}, p).status().code() ==
        absl::StatusCode::kInvalidArgument);
  CHECK(make_limit({.name = std::string(65, 'a')}, p).status().code() ==
        absl::StatusCode::kInvalidArgument);
  const auto quoted = make_limit({.name = "a\"b"}, p);
  REQUIRE_FALSE(quoted.ok());
  CHECK(std::string(quoted.status().message()).find("may hold only") !=
        std::string::npos);
  CHECK_FALSE(make_limit({.name = "a b"}, p).ok());
  CHECK_FALSE(make_limit({.name = "x", .near_limit_permille = 1001}, p).ok());
  CHECK(make_limit({.name = "ok_name-1.2:3"}, p).ok());
  CHECK_FALSE(
      make_limit({.name = "x", .charge_on_reject = true}, NoCharge{}).ok());
  CHECK(make_limit({.name = "x"}, NoCharge{}).ok());
}

TEST_CASE("near-limit events are counted at the threshold", "[chain]") {
  ManualClock clock{std::chrono::hours(1)};
  Chain<ManualClock> chain{clock};
  auto l = make_limit({.name = "rpm", .near_limit_permille = 200},
                      FixedWindow::create(per_minute(10)).value())
               .value();
  for (int i = 0; i < 10; ++i) {
    REQUIRE(chain.acquire({{l.get(), "k", 1}}).allowed);
  }
  // remaining 2, 1, 0 are at or below 20% of 10.
  CHECK(l->counts().near_limit == 3);
  CHECK(l->counts().allowed == 10);
  CHECK_FALSE(chain.acquire({{l.get(), "k", 1}}).allowed);
  CHECK(l->counts() == LimitCounts{10, 1, 0, 0, 0, 3});
  l->metrics().record_error();
  CHECK(l->counts().errors == 1);
}
