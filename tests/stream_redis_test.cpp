// A partial stream's usage settled through RedisAccountant: the same rule
// as the in-process accountant (stream_test), the worst-case output or the
// caller's count, never the partial figure (issue 14).
#include <memory>
#include <string>

#include "ratekeeper/budget/redis_accountant.hpp"
#include "ratekeeper/budget/stream.hpp"
#include "redis_server.hpp"
#include "test_util.hpp"

using namespace ratekeeper;

TEST_CASE("RedisAccountant settles a partial stream at the worst case",
          "[i14][stream][redis]") {
  rk_test::RedisServer server;
  auto client = RedisClient::create({.port = server.port(), .prefix = "rkt:"});
  REQUIRE(client.ok());
  // claude-3-opus's list prices: 15,000 nano-USD an input token, 75,000 an
  // output token.
  PriceTable prices;
  REQUIRE(
      prices
          .set("claude-3-opus",
               {.base = {.input = TokenPrice::per_million_micros(15'000'000),
                         .output = TokenPrice::per_million_micros(75'000'000)}})
          .ok());
  auto acct = RedisAccountant::create(std::move(prices), *client).value();
  REQUIRE(
      acct->add_budget({.name = "team",
                        .scope = Field::kTeam,
                        .unit = BudgetUnit::kNanoUsd,
                        .limit = 1'000'000'000'000,
                        .period = Period::calendar(PeriodKind::kMonth).value()})
          .ok());
  const Subject who{.user = "u", .team = "t", .org = "o"};

  // An Anthropic stream cut after message_start (from basic_response.txt's
  // first event), then text deltas, then nothing.
  StreamUsageReader reader(StreamFormat::kAnthropic);
  reader.feed(
      "event: message_start\n"
      "data: {\"type\":\"message_start\",\"message\":{\"usage\":"
      "{\"input_tokens\":11,\"output_tokens\":1}}}\n\n");
  for (int i = 0; i < 100; ++i) {
    reader.feed(
        "event: content_block_delta\n"
        "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":"
        "{\"type\":\"text_delta\",\"text\":\" word\"}}\n\n");
  }
  const StreamUsageResult res = reader.finish();
  REQUIRE_FALSE(res.complete);
  REQUIRE(res.usage.has_value());
  REQUIRE(res.usage->source == UsageSource::kPartial);

  auto r = acct->reserve(who, "claude-3-opus",
                         {.prompt_tokens = 11, .max_output_tokens = 4096},
                         "req-redis-cut");
  INFO(r.status().ToString());
  REQUIRE(r.ok());
  REQUIRE(r->granted());
  REQUIRE(r->next_chunk_fits(4096, 4).value());  // room for 4,100
  const auto s = r->settle(*res.usage);
  REQUIRE(s.ok());
  // 11 x 15,000 + 4,100 x 75,000 = 165,000 + 307,500,000.
  CHECK(s->cost == Money{307'665'000});
  CHECK(s->estimated);
  CHECK(acct->spent("team", who).value() == 307'665'000);

  auto counted = acct->reserve(who, "claude-3-opus",
                               {.prompt_tokens = 11, .max_output_tokens = 4096},
                               "req-redis-counted");
  REQUIRE(counted.ok());
  const auto c = counted->settle_partial(*res.usage, 100);
  REQUIRE(c.ok());
  // 11 x 15,000 + 100 x 75,000 = 165,000 + 7,500,000.
  CHECK(c->cost == Money{7'665'000});
  CHECK(acct->spent("team", who).value() == 307'665'000 + 7'665'000);
}
