// TierTable: tiers of scoped limits, chosen per call, changed at run time.
#include "ratekeeper/tiers.hpp"

#include <atomic>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "ratekeeper/budget/accountant.hpp"
#include "ratekeeper/limiter.hpp"
#include "test_prices.hpp"
#include "test_util.hpp"

using namespace ratekeeper;

namespace {

std::vector<LimitSpec> free_tier(std::uint64_t rpm = 3,
                                 std::uint64_t tpd = 1000) {
  return {
      {{.name = "rpm"},
       Field::kUser,
       PolicyKind::kFixedWindow,
       per_minute(rpm)},
      {{.name = "tpm", .unit = Unit::kTokens},
       Field::kUser,
       PolicyKind::kTokenBucket,
       per_minute(600),
       600},
      {{.name = "tpd", .unit = Unit::kTokens},
       Field::kTeam,
       PolicyKind::kFixedWindow,
       per_day(tpd)},
  };
}

struct Rig {
  ManualClock clock{std::chrono::hours(24 * 1000)};
  TierTable<ManualClock> tiers{ShardedOptions{.capacity = 1024}, clock};
};

}  // namespace

TEST_CASE("a tier's chain: per user and per team", "[tiers]") {
  Rig rig;
  REQUIRE(rig.tiers.set_tier("free", free_tier()).ok());
  const Subject alice{.user = "alice", .team = "red"};
  const Subject bob{.user = "bob", .team = "red"};
  for (int i = 0; i < 3; ++i) {
    const auto d = rig.tiers.acquire("free", alice, 100);
    REQUIRE(d.ok());
    REQUIRE(d->allowed);
  }
  const auto d4 = rig.tiers.acquire("free", alice, 100);
  REQUIRE(d4.ok());
  CHECK_FALSE(d4->allowed);
  CHECK(d4->binding_result()->limit->name() == "rpm");
  // Bob has his own requests and tokens, and shares the team's day.
  const auto b = rig.tiers.acquire("free", bob, 600);
  REQUIRE(b.ok());
  CHECK(b->allowed);
  const auto b2 = rig.tiers.acquire("free", bob, 100);
  REQUIRE(b2.ok());
  CHECK_FALSE(b2->allowed);  // his tokens per minute are spent
  CHECK(b2->binding_result()->limit->name() == "tpm");
  // The team's day (300 + 600 of 1000 used) is reported as it stands: the
  // refused call took nothing from it.
  CHECK(b2->results[2].decision.allowed);
  CHECK(b2->results[2].decision.remaining == 100);
}

TEST_CASE("settle_tokens settles token limits only", "[tiers]") {
  Rig rig;
  REQUIRE(rig.tiers.set_tier("free", free_tier()).ok());
  const Subject who{.user = "u", .team = "t"};
  auto d = rig.tiers.acquire("free", who, 500);
  REQUIRE(d.ok());
  REQUIRE(d->allowed);
  REQUIRE(rig.tiers.settle_tokens(*d, 100).ok());
  const auto p = rig.tiers.peek("free", who, 0);
  REQUIRE(p.ok());
  // A peek reports what one more call would leave: rpm 3 - 1 - 1.
  CHECK(p->results[0].decision.remaining == 1);    // rpm: untouched
  CHECK(p->results[1].decision.remaining == 500);  // tpm: 600 - 100
  CHECK(p->results[2].decision.remaining == 900);  // tpd: 1000 - 100
}

TEST_CASE("errors: unknown tier, missing identity, bad specs", "[tiers]") {
  Rig rig;
  REQUIRE(rig.tiers.set_tier("free", free_tier()).ok());
  CHECK(rig.tiers.acquire("gold", {.user = "u", .team = "t"}, 1)
            .status()
            .code() == absl::StatusCode::kNotFound);
  const auto no_team = rig.tiers.acquire("free", {.user = "u"}, 1);
  REQUIRE_FALSE(no_team.ok());
  CHECK(no_team.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(std::string(no_team.status().message()).find("tpd") !=
        std::string::npos);
  // Nothing was taken for the call that failed (a peek reports what one
  // more call would leave: 3 - 1).
  CHECK(rig.tiers.peek("free", {.user = "u", .team = "t"}, 0)
            ->results[0]
            .decision.remaining == 2);
  CHECK(rig.tiers.limits("free")[2]->counts().errors == 1);

  std::vector<LimitSpec> dup = free_tier();
  dup[1].options.name = "rpm";
  CHECK_FALSE(rig.tiers.set_tier("pro", dup).ok());
  std::vector<LimitSpec> zero = free_tier();
  zero[0].rate = per_minute(0);
  const absl::Status st = rig.tiers.set_tier("pro", zero);
  CHECK(st.code() == absl::StatusCode::kInvalidArgument);
  CHECK(std::string(st.message()).find("tier \"pro\"") != std::string::npos);
  CHECK(rig.tiers.limits("pro").empty());  // nothing published
  CHECK_FALSE(rig.tiers.set_tier("", free_tier()).ok());
  std::vector<LimitSpec> money = free_tier();
  money[2].options.unit = Unit::kNanoUsd;
  const absl::Status m = rig.tiers.set_tier("pro", money);
  CHECK(m.code() == absl::StatusCode::kInvalidArgument);
  CHECK(std::string(m.message()).find("Accountant") != std::string::npos);
}

TEST_CASE("chain_items hands a tier's limits to another chain", "[tiers]") {
  Rig rig;
  REQUIRE(rig.tiers.set_tier("free", free_tier()).ok());
  const Subject who{.user = "u", .team = "t"};
  ChainItems items;
  REQUIRE(rig.tiers.chain_items("free", who, 250, items).ok());
  REQUIRE(items.size() == 3);
  CHECK(items[0].limit->name() == "rpm");
  CHECK(items[0].cost == 1);
  CHECK(items[1].cost == 250);
  CHECK(items[2].cost == 250);
  // The same keys the table's own acquire uses.
  Chain<ManualClock> other(rig.clock);
  REQUIRE(other.acquire(items.items()).allowed);
  CHECK(rig.tiers.peek("free", who, 0)->results[0].decision.remaining == 1);
  CHECK(rig.tiers.chain_items("gold", who, 1, items).code() ==
        absl::StatusCode::kNotFound);
}

TEST_CASE("changing a tier at run time keeps state where it can", "[tiers]") {
  Rig rig;
  REQUIRE(rig.tiers.set_tier("free", free_tier(3, 1000)).ok());
  const Subject who{.user = "u", .team = "t"};
  for (int i = 0; i < 3; ++i) {
    REQUIRE(rig.tiers.acquire("free", who, 100)->allowed);
  }
  Limit* const rpm_before = rig.tiers.limits("free")[0];
  SECTION("new numbers, same shape: every key keeps its count") {
    REQUIRE(rig.tiers.set_tier("free", free_tier(5, 2000)).ok());
    CHECK(rig.tiers.limits("free")[0] == rpm_before);
    const auto p = rig.tiers.peek("free", who, 0);
    CHECK(p->results[0].decision.limit == 5);
    CHECK(p->results[0].decision.remaining == 1);     // 3 of 5, + 1 peeked
    CHECK(p->results[2].decision.remaining == 1700);  // 300 of 2000 used
    CHECK(rig.tiers.acquire("free", who, 1)->allowed);
    CHECK(rig.tiers.acquire("free", who, 1)->allowed);
    CHECK_FALSE(rig.tiers.acquire("free", who, 1)->allowed);
  }
  SECTION("a lowered limit: counts above it deny until the window turns") {
    REQUIRE(rig.tiers.set_tier("free", free_tier(2, 1000)).ok());
    const auto d = rig.tiers.acquire("free", who, 1);
    CHECK_FALSE(d->allowed);
    CHECK(d->results[0].decision.remaining == 0);
    rig.clock.advance(std::chrono::minutes(1));
    CHECK(rig.tiers.acquire("free", who, 1)->allowed);
  }
  SECTION("another period or policy kind: that limit starts afresh") {
    std::vector<LimitSpec> hourly = free_tier();
    hourly[0].rate = per_hour(3);
    REQUIRE(rig.tiers.set_tier("free", hourly).ok());
    CHECK(rig.tiers.limits("free")[0] != rpm_before);
    const auto p = rig.tiers.peek("free", who, 0);
    CHECK(p->results[0].decision.remaining == 2);    // fresh, 1 peeked
    CHECK(p->results[2].decision.remaining == 700);  // tpd kept
  }
  SECTION("shadow mode switched by set_tier") {
    std::vector<LimitSpec> shadowed = free_tier();
    shadowed[0].options.shadow = true;
    REQUIRE(rig.tiers.set_tier("free", shadowed).ok());
    CHECK(rig.tiers.limits("free")[0] == rpm_before);
    const auto d = rig.tiers.acquire("free", who, 1);
    CHECK(d->allowed);
    CHECK(d->results[0].shadow_denied);
  }
  // Metrics list every limit of every tier.
  CHECK(rig.tiers.all_limits().size() == 3);
}

// Issue 15: what set_tier replaces is reclaimed, and receipts that outlive
// their limit are safe.

TEST_CASE(
    "i15: a replaced limit is reused by the next of its identity; its old "
    "receipts are refused and give back nothing",
    "[tiers][i15]") {
  Rig rig;
  REQUIRE(rig.tiers.set_tier("free", free_tier()).ok());
  const Subject who{.user = "u", .team = "t"};
  auto d1 = rig.tiers.acquire("free", who, 10);
  auto d2 = rig.tiers.acquire("free", who, 10);
  REQUIRE(d1.ok());
  REQUIRE(d2.ok());
  REQUIRE(d1->allowed);
  REQUIRE(d2->allowed);
  Limit* const rpm = rig.tiers.limits("free")[0];
  // Another period: the rpm limit is replaced (its store is cleared).
  std::vector<LimitSpec> hourly = free_tier();
  hourly[0].rate = per_hour(3);
  REQUIRE(rig.tiers.set_tier("free", hourly).ok());
  Limit* const rpm_hourly = rig.tiers.limits("free")[0];
  CHECK(rpm_hourly != rpm);
  // Back to per minute: the replaced object is reused, restarted.
  REQUIRE(rig.tiers.set_tier("free", free_tier()).ok());
  CHECK(rig.tiers.limits("free")[0] == rpm);
  CHECK(rpm->name() == "rpm");
  // The receipt of a take before the replacement: refused, clearly.
  const absl::Status st = rig.tiers.chain().settle(*d1, 0, 0);
  CHECK(st.code() == absl::StatusCode::kFailedPrecondition);
  CHECK(std::string(st.message()).find("replaced") != std::string::npos);
  // The restarted limit starts fresh: 3 calls a minute.
  for (int i = 0; i < 3; ++i) {
    const auto d = rig.tiers.acquire("free", who, 1);
    REQUIRE(d.ok());
    CHECK(d->allowed);
  }
  // A stale give-back returns nothing to the new incarnation (the oracle:
  // the limit's own count, 3 of 3 taken, stays).
  rig.tiers.give_back(*d2);
  const auto fourth = rig.tiers.acquire("free", who, 1);
  REQUIRE(fourth.ok());
  CHECK_FALSE(fourth->allowed);
  CHECK(fourth->binding_result()->limit == rpm);
  // The token limits were never replaced: their receipts still settle.
  // (d2's were given back above; d1's settle to what was used.)
  CHECK(rig.tiers.settle_tokens(*d1, 5).ok());
  // The hourly limit is in the pool now: its pointer is still a limit.
  CHECK(rpm_hourly->name() == "rpm");
  CHECK(rig.tiers.limit_objects() == 4);
  // Changing the period back and forth reuses the two rpm objects.
  for (int i = 0; i < 10; ++i) {
    REQUIRE(rig.tiers.set_tier("free", i % 2 == 0 ? hourly : free_tier()).ok());
  }
  CHECK(rig.tiers.limit_objects() == 4);
}

TEST_CASE(
    "i15: calls and settles racing set_tier rebuilds touch no freed memory "
    "(run under ASan)",
    "[tiers][i15]") {
  ManualClock clock{std::chrono::hours(1)};
  TierTable<ManualClock> tiers{ShardedOptions{.capacity = 4096}, clock};
  REQUIRE(tiers.set_tier("free", free_tier(1'000'000, 1'000'000'000)).ok());
  std::atomic<bool> stop{false};
  // Catch2 asserts from one thread only: the callers count what is wrong.
  std::atomic<std::uint64_t> calls{0}, refused_stale{0}, wrong{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 3; ++t) {
    threads.emplace_back([&, t] {
      std::vector<ChainDecision> kept;
      std::uint64_t i = 0;
      while (!stop.load(std::memory_order_relaxed)) {
        const std::string user =
            "u" + std::to_string(t) + "-" + std::to_string(i % 64);
        auto d = tiers.acquire("free", Subject{.user = user, .team = "x"}, 3);
        if (!d.ok()) {
          wrong.fetch_add(1);
          continue;
        }
        for (const LimitResult& r : d->results) {
          // rpm, tpm, tpd: live limits, whatever was replaced meanwhile.
          if (r.limit->name().size() != 3 || r.limit->limit() == 0) {
            wrong.fetch_add(1);
          }
        }
        if (d->allowed) kept.push_back(*std::move(d));
        if (kept.size() == 8) {
          // Settled a while after they were taken, across set_tier calls.
          for (ChainDecision& k : kept) {
            const absl::Status st = tiers.chain().settle(k, 0, 0);
            if (!st.ok()) {
              if (st.code() != absl::StatusCode::kFailedPrecondition) {
                wrong.fetch_add(1);
              }
              refused_stale.fetch_add(1, std::memory_order_relaxed);
            }
            const absl::Status tok = tiers.settle_tokens(k, 1);
            if (!tok.ok() &&
                tok.code() != absl::StatusCode::kFailedPrecondition) {
              wrong.fetch_add(1);
            }
            tiers.give_back(k);
          }
          kept.clear();
        }
        ++i;
        calls.fetch_add(1, std::memory_order_relaxed);
      }
    });
  }
  // Rebuilds every limit each time (kinds alternate), while the threads
  // call: replaced limits are reused under them.
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::seconds(20);
  int changes = 0;
  while (changes < 400 && std::chrono::steady_clock::now() < deadline) {
    std::vector<LimitSpec> spec = free_tier(1'000'000, 1'000'000'000);
    if (changes % 2 == 1) {
      for (LimitSpec& s : spec) {
        s.kind = s.kind == PolicyKind::kTokenBucket ? PolicyKind::kFixedWindow
                                                    : PolicyKind::kTokenBucket;
        s.burst = 0;
      }
    }
    REQUIRE(tiers.set_tier("free", spec).ok());
    ++changes;
    // Let the callers make progress between changes (a deadline, never a
    // fixed sleep).
    const std::uint64_t seen = calls.load();
    const auto wait =
        std::chrono::steady_clock::now() + std::chrono::seconds(1);
    while (calls.load() < seen + 8 && std::chrono::steady_clock::now() < wait) {
      std::this_thread::yield();
    }
  }
  stop.store(true);
  for (auto& th : threads) th.join();
  INFO("changes " << changes << ", calls " << calls.load()
                  << ", stale receipts refused " << refused_stale.load());
  CHECK(wrong.load() == 0);
  CHECK(changes >= 50);
  CHECK(calls.load() > 0);
  CHECK(refused_stale.load() > 0);
  // Three names in two kinds: six limit objects, reused in turn, however
  // many changes.
  CHECK(tiers.limit_objects() == 6);
}

// Issue 15: one process-wide cap on live keys (KeyBudget), shared by a tier
// table's limits, limiters of your own and an accountant's budget stores.

namespace {

using Bucket = Limiter<TokenBucket, ShardedStore, ManualClock>;

ShardedOptions one_shard(std::shared_ptr<KeyBudget> budget, WhenFull full) {
  return ShardedOptions{.capacity = 1 << 16,
                        .shards = 1,
                        .when_full = full,
                        .key_budget = std::move(budget)};
}

}  // namespace

TEST_CASE(
    "i15: a KeyBudget caps live keys across stores; a flood into one takes "
    "no slot another holds",
    "[tiers][i15]") {
  constexpr std::size_t kCap = 1000;
  auto budget = std::make_shared<KeyBudget>(kCap);
  ManualClock clock{std::chrono::hours(1)};
  // 1 token an hour, burst 1: a key that took its token stays empty (and
  // held: not idle) for the whole test.
  const TokenBucket slow = TokenBucket::create(per_hour(1), 1).value();
  Bucket victim(slow, one_shard(budget, WhenFull::kDenyNew), clock);
  Bucket flood(slow, one_shard(budget, WhenFull::kEvictStalest), clock);
  TierTable<ManualClock> tiers(
      ShardedOptions{.capacity = 1 << 16, .key_budget = budget}, clock);
  REQUIRE(tiers.set_tier("free", free_tier()).ok());

  for (int v = 0; v < 300; ++v) {
    REQUIRE(victim.acquire("v" + std::to_string(v)).allowed);
  }
  for (int u = 0; u < 100; ++u) {
    const auto d = tiers.acquire(
        "free", Subject{.user = "u" + std::to_string(u), .team = "t"}, 1);
    REQUIRE(d.ok());
    REQUIRE(d->allowed);
  }
  const std::size_t victim_keys = victim.stats().keys;
  std::size_t tier_keys = 0;
  for (Limit* l : tiers.limits("free")) tier_keys += l->store_stats().keys;
  CHECK(victim_keys == 300);
  CHECK(tier_keys == 201);  // rpm and tpm: 100 users each; tpd: one team

  // The flood: 20,000 distinct keys into one limiter.
  std::uint64_t flood_admitted = 0;
  for (int i = 0; i < 20'000; ++i) {
    flood_admitted += flood.acquire("f" + std::to_string(i)).allowed;
  }
  const std::size_t flood_keys = flood.stats().keys;
  INFO("flood keys " << flood_keys << ", evicted " << flood.stats().evicted
                     << ", budget available " << budget->available());
  // The cap holds across all the stores...
  CHECK(victim.stats().keys + flood_keys + tier_keys <= kCap);
  // ...the flood took only slots no one held (the others keep theirs, with
  // at most 2 x kChunk - 1 unused per shard) and then evicted its own keys.
  CHECK(flood_keys >= kCap - 300 - 201 - 16 * (2 * KeyBudget::kChunk) -
                          2 * KeyBudget::kChunk);
  CHECK(flood.stats().evicted > 0);
  CHECK(flood_admitted == 20'000);  // each new key evicts its own stalest
  CHECK(victim.store().key_budget_held() >= 300);
  CHECK(victim.store().key_budget_held() < 300 + 2 * KeyBudget::kChunk);
  // Every victim key kept its state: its bucket is still empty (the
  // oracle: one token an hour, taken at the start).
  std::uint64_t over = 0;
  for (int v = 0; v < 300; ++v) {
    over += victim.acquire("v" + std::to_string(v)).allowed;
  }
  CHECK(over == 0);
  CHECK(victim.stats().keys == 300);
  // New victim keys get the slots the victim drew and did not use (under
  // 2 x kChunk), then meet the exhausted cap: the store's own full
  // behaviour (deny new) applies.
  std::size_t new_admitted = 0;
  for (int v = 0; v < 100; ++v) {
    new_admitted += victim.acquire("vn" + std::to_string(v)).allowed;
  }
  CHECK(new_admitted < 2 * KeyBudget::kChunk);
  CHECK(victim.stats().denied_full == 100 - new_admitted);
  // The tier's users keep their counts too: 3 a minute, 1 taken.
  const auto p = tiers.peek("free", Subject{.user = "u7", .team = "t"}, 0);
  REQUIRE(p.ok());
  CHECK(p->results[0].decision.remaining == 1);  // 3 - 1 taken - 1 peeked

  // Slots held add up to the cap; a destroyed store gives its back.
  const std::size_t flood_held = flood.store().key_budget_held();
  CHECK(flood_held >= flood_keys);
  {
    Bucket extra(slow, one_shard(budget, WhenFull::kDenyNew), clock);
    CHECK_FALSE(extra.acquire("x").allowed);  // nothing left to draw
  }
  const std::size_t before_clear = budget->available();
  flood.store().clear();
  CHECK(flood.store().key_budget_held() == 0);
  CHECK(budget->available() == before_clear + flood_held);
  CHECK(victim.acquire("v-last").allowed);  // a slot is free again
}

TEST_CASE(
    "i15: a budget store under a shared KeyBudget refuses new subjects with "
    "kResourceExhausted and forgets no spend",
    "[tiers][i15]") {
  auto budget = std::make_shared<KeyBudget>(64);
  const Nanos t0{1'796'083'200LL * 1'000'000'000};  // 2026-12-01 UTC
  ManualClock clock(t0);
  Accountant<ManualClock> acct(
      rk_test::flat_prices(), clock,
      ShardedOptions{.capacity = 1 << 16, .shards = 1, .key_budget = budget});
  REQUIRE(
      acct.add_budget(BudgetSpec{"team-month",
                                 Scope{Field::kTeam},
                                 BudgetUnit::kNanoUsd,
                                 1'000'000,
                                 Period::calendar(PeriodKind::kMonth).value(),
                                 {}})
          .ok());
  const Estimate e{.prompt_tokens = 100, .max_output_tokens = 400};
  std::vector<Reservation<ManualClock>> held;
  for (int t = 0; t < 20; ++t) {
    auto r = acct.reserve(Subject{.team = "t" + std::to_string(t)}, "m", e,
                          "req-" + std::to_string(t));
    REQUIRE(r.ok());
    REQUIRE(r->granted());
    held.push_back(*std::move(r));
  }
  // A flood of other keys in a limiter sharing the cap takes the rest.
  Bucket flood(TokenBucket::create(per_hour(1), 1).value(),
               one_shard(budget, WhenFull::kEvictStalest), clock);
  for (int i = 0; i < 5000; ++i) {
    static_cast<void>(flood.acquire("f" + std::to_string(i)));
  }
  CHECK(budget->available() == 0);
  // New teams (their reservations kept open, so their holds are spend in
  // flight): the slots the budget store drew but did not use, then refused
  // with a clear status, never by forgetting spend.
  int exhausted = 0, granted = 0;
  for (int t = 0; t < 100; ++t) {
    auto r = acct.reserve(Subject{.team = "new" + std::to_string(t)}, "m", e,
                          "new-" + std::to_string(t));
    if (!r.ok()) {
      CHECK(r.status().code() == absl::StatusCode::kResourceExhausted);
      ++exhausted;
    } else {
      CHECK(r->granted());
      ++granted;
      held.push_back(*std::move(r));
    }
  }
  CHECK(granted < static_cast<int>(2 * KeyBudget::kChunk));
  CHECK(exhausted == 100 - granted);
  // Held teams still have exactly what they had: 500,000 of 1,000,000 left.
  Limit* team_budget = acct.budgets()[0];
  for (int t = 0; t < 20; ++t) {
    std::string key;
    REQUIRE(append_subject_key(Scope{Field::kTeam},
                               Subject{.team = "t" + std::to_string(t)}, key)
                .ok());
    CHECK(team_budget->peek(key, 0, clock.now()).remaining == 500'000);
  }
}

TEST_CASE(
    "i15: set_tier changing only a limit's near-limit threshold keeps at "
    "most two objects for the name and applies the threshold",
    "[tiers][i15]") {
  // Found by an examiner: the reuse pool was keyed by the threshold too,
  // so 1,000 set_tier calls each with a new threshold kept 1,001 objects.
  Rig rig;
  const Subject who{.user = "u", .team = "t"};
  auto tier_with = [](std::uint32_t permille) {
    std::vector<LimitSpec> t = free_tier();
    t[0].options.near_limit_permille = permille;
    return t;
  };
  REQUIRE(rig.tiers.set_tier("free", tier_with(0)).ok());
  const std::size_t base = rig.tiers.limit_objects();
  for (std::uint32_t p = 1; p <= 1000; ++p) {
    REQUIRE(rig.tiers.set_tier("free", tier_with(p)).ok());
    const auto d = rig.tiers.acquire("free", who, 1);
    REQUIRE(d.ok());
    REQUIRE(rig.tiers.limit_objects() <= base + 1);
    // The threshold in force is the one just set.
    const std::vector<Limit*> limits = rig.tiers.limits("free");
    REQUIRE_FALSE(limits.empty());
    REQUIRE(limits[0]->near_limit_permille() == p);
  }
  // A threshold out of range is refused, from the pool's path too.
  CHECK(rig.tiers.set_tier("free", tier_with(1001)).code() ==
        absl::StatusCode::kInvalidArgument);
}

TEST_CASE(
    "i15: stale receipts settled above their take after set_tier charge no "
    "debt into the replaced limit and hold no KeyBudget slots",
    "[tiers][i15]") {
  // Found by an examiner: before the replaced limit was reused, a stale
  // settle above its take charged a debt to a fresh key of the cleared
  // store, which no tier reads and nothing reclaimed: 600 such settles kept
  // 664 of a 1,000-key budget, and the live tier admitted 336 of 1,000 new
  // users.
  auto kb = std::make_shared<KeyBudget>(1000);
  ManualClock clock{std::chrono::hours(24 * 1000)};
  TierTable<ManualClock> tiers{
      ShardedOptions{.capacity = 1024, .key_budget = kb}, clock};
  auto bucket_tier =
      std::vector<LimitSpec>{{{.name = "tpm", .unit = Unit::kTokens},
                              Field::kUser,
                              PolicyKind::kTokenBucket,
                              per_minute(600),
                              600}};
  auto window_tier =
      std::vector<LimitSpec>{{{.name = "tpm", .unit = Unit::kTokens},
                              Field::kUser,
                              PolicyKind::kFixedWindow,
                              per_minute(600)}};
  REQUIRE(tiers.set_tier("free", bucket_tier).ok());
  std::vector<ChainDecision> old;
  for (int u = 0; u < 600; ++u) {
    auto d = tiers.acquire("free", Subject{.user = "u" + std::to_string(u)}, 1);
    REQUIRE(d.ok());
    REQUIRE(d->allowed);
    old.push_back(*std::move(d));
  }
  CHECK(kb->available() <= 400);
  // Another kind: the bucket limit is replaced and its keys let go.
  REQUIRE(tiers.set_tier("free", window_tier).ok());
  CHECK(kb->available() == 1000);
  for (auto& d : old) {
    const absl::Status st = tiers.settle_tokens(d, 100);
    CHECK(st.code() == absl::StatusCode::kFailedPrecondition);
  }
  CHECK(kb->available() == 1000);
  // The live tier has the whole budget for new users.
  int admitted = 0;
  for (int u = 0; u < 900; ++u) {
    auto d = tiers.acquire("free", Subject{.user = "n" + std::to_string(u)}, 1);
    REQUIRE(d.ok());
    if (d->allowed) ++admitted;
  }
  CHECK(admitted == 900);
}
