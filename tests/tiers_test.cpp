// TierTable: tiers of scoped limits, chosen per call, changed at run time.
#include "ratekeeper/tiers.hpp"

#include <string>
#include <vector>

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
