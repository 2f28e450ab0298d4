// Money, prices and the price catalogue: exact integers, never floats.
#include "ratekeeper/budget/prices.hpp"

#include <chrono>
#include <cstdint>
#include <random>
#include <string>

#include "ratekeeper/budget/json.hpp"
#include "ratekeeper/budget/money.hpp"
#include "test_util.hpp"

using namespace ratekeeper;

namespace {
SysTime day(int y, unsigned m, unsigned d) {
  return std::chrono::sys_days{std::chrono::year{y} / std::chrono::month{m} /
                               std::chrono::day{d}};
}
TokenPrice per_m(std::uint64_t micro_usd) {
  return TokenPrice::per_million_micros(micro_usd);
}
}  // namespace

TEST_CASE("USD-per-token decimals read exactly", "[money]") {
  auto femtos = [](const char* s) { return parse_usd_per_token(s)->femtos; };
  CHECK(femtos("0") == 0);
  CHECK(femtos("0.0") == 0);
  CHECK(femtos("3e-06") == 3'000'000'000);  // $3 per million
  CHECK(femtos("0.000003") == 3'000'000'000);
  CHECK(femtos("1.5e-07") == 150'000'000);
  CHECK(femtos("1.5E-7") == 150'000'000);
  CHECK(femtos("3.75e-08") == 37'500'000);
  CHECK(femtos("1.25e-6") == 1'250'000'000);
  CHECK(femtos("2") == 2'000'000'000'000'000);
  CHECK(femtos("1e-15") == 1);
  CHECK(femtos("0.000000000000001") == 1);
  CHECK(femtos("1.0000000000000000e-06") == 1'000'000'000);
  // A double would read 1.5e-07 as 1.4999999999999999e-07.
  for (const char* bad :
       {"", "-1e-6", "+1e-6", "1e-16", "0.0000000000000001", "abc", "1e", "1e+",
        "0x10", "inf", "nan", "1.2.3", "1e-6 ", " 1e-6", "1001", "1e400"}) {
    CAPTURE(bad);
    CHECK_FALSE(parse_usd_per_token(bad).ok());
  }
  CHECK(Money{1'500'000'000}.to_string() == "$1.500000000");
  CHECK(Money{-1}.to_string() == "-$0.000000001");
  CHECK(Money::usd(2) + Money::cents(5) == Money{2'050'000'000});
}

TEST_CASE("cost: every kind of token at its price, rounded up once",
          "[prices]") {
  PriceTable t;
  REQUIRE(t.set("m", {.base = {.input = per_m(3'000'000),
                               .cache_read = per_m(300'000),
                               .cache_write_5m = per_m(3'750'000),
                               .cache_write_1h = per_m(6'000'000),
                               .output = per_m(15'000'000)}})
              .ok());
  Usage u{.input_uncached = 50,
          .cache_read = 20'000,
          .cache_write_5m = 400,
          .cache_write_1h = 600,
          .output = 503};
  // 50*3 + 20000*0.3 + 400*3.75 + 600*6 + 503*15 = 18,795 micro-USD.
  CHECK(t.cost("m", u, SysTime{}).value() == Money{18'795'000});
  // One token at $0.30 per million is 0.3 micro-USD = 300 nano-USD; at
  // $0.0000001 per million it is 0.1 femto... rounds up to 1 nano-USD.
  REQUIRE(
      t.set("tiny", {.base = {.input = TokenPrice{1}, .output = TokenPrice{1}}})
          .ok());
  CHECK(t.cost("tiny", Usage{.input_uncached = 1}, SysTime{}).value() ==
        Money{1});
  CHECK(t.cost("tiny", Usage{.input_uncached = 1'000'000}, SysTime{}).value() ==
        Money{1});
  CHECK(t.cost("tiny", Usage{.input_uncached = 1'000'001}, SysTime{}).value() ==
        Money{2});
  CHECK(t.cost("tiny", Usage{}, SysTime{}).value() == Money{0});
}

TEST_CASE("cliff tiers bill the whole call above the threshold", "[prices]") {
  PriceTable t;
  REQUIRE(
      t.set("long",
            {.base = {.input = per_m(3'000'000), .output = per_m(15'000'000)},
             .cliff_above = 200'000,
             .cliff = {.input = per_m(6'000'000), .output = per_m(22'500'000)}})
          .ok());
  const Usage at{.input_uncached = 200'000, .output = 1000};
  const Usage above{
      .input_uncached = 150'000, .cache_read = 50'001, .output = 1000};
  CHECK(t.cost("long", at, SysTime{}).value() ==
        Money{600'000'000 + 15'000'000});
  // Cache reads count toward the threshold and are billed at the cliff's
  // cache price (here unset: its input price).
  CHECK(t.cost("long", above, SysTime{}).value() ==
        Money{(150'000 + 50'001) * 6'000 + 1000 * 22'500});
}

TEST_CASE("prices by date, defaults, unknown models", "[prices]") {
  PriceTable t;
  REQUIRE(t.set("m", {.base = {.input = per_m(10'000'000),
                               .output = per_m(10'000'000)},
                      .effective_from = day(2026, 1, 1)})
              .ok());
  REQUIRE(t.set("m", {.base = {.input = per_m(2'000'000),
                               .output = per_m(2'000'000)},
                      .effective_from = day(2026, 6, 1)})
              .ok());
  const Usage u{.input_uncached = 1'000'000};
  CHECK(t.cost("m", u, day(2026, 5, 31) + std::chrono::hours(23)).value() ==
        Money::usd(10));
  CHECK(t.cost("m", u, day(2026, 6, 1)).value() == Money::usd(2));
  const auto early = t.cost("m", u, day(2025, 12, 31));
  CHECK(early.status().code() == absl::StatusCode::kNotFound);
  const auto unknown = t.cost("nope", u, day(2026, 7, 1));
  REQUIRE_FALSE(unknown.ok());
  CHECK(unknown.status().code() == absl::StatusCode::kNotFound);
  CHECK(std::string(unknown.status().message()).find("free") !=
        std::string::npos);
  t.set_default(
      {.base = {.input = per_m(50'000'000), .output = per_m(50'000'000)}});
  CHECK(t.cost("nope", u, day(2026, 7, 1)).value() == Money::usd(50));
  CHECK_FALSE(t.set("", {}).ok());
  CHECK_FALSE(
      t.set("x", {.base = {.input = TokenPrice{kMaxFemtosPerToken + 1}}}).ok());
}

TEST_CASE("10^8 charges add up exactly", "[money]") {
  // $0.10 a call, as a float gateway would keep it, drifts; as Money it is
  // exact. Then random costs: the running Money total equals the sum of
  // each call's exact femto cost rounded up, computed apart in 128 bits.
  const auto n =
      static_cast<std::uint64_t>(100'000'000 * std::min(1.0, rk_test::scale()));
  Money total;
  double drift = 0;
  for (std::uint64_t i = 0; i < n; ++i) {
    total += Money::cents(10);
    drift += 0.10;
  }
  CHECK(total == Money{static_cast<std::int64_t>(n) * 100'000'000});
  if (n == 100'000'000) CHECK(drift != 10'000'000.0);  // the float is off

  const std::uint64_t seed = rk_test::seed_or(0x5EED);
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  const Prices p{.base = {.input = per_m(2'500'000),
                          .cache_read = TokenPrice{1'250'000'001},
                          .output = TokenPrice{9'999'999'999}}};
  Money sum;
  detail::u128 want = 0;
  const std::uint64_t m = n / 20;
  for (std::uint64_t i = 0; i < m; ++i) {
    const Usage u{.input_uncached = rng() % 100'000,
                  .cache_read = rng() % 100'000,
                  .output = rng() % 10'000};
    sum += PriceTable::cost(p, u).value();
    const detail::u128 f =
        static_cast<detail::u128>(u.input_uncached) * 2'500'000'000 +
        static_cast<detail::u128>(u.cache_read) * 1'250'000'001 +
        static_cast<detail::u128>(u.output) * 9'999'999'999;
    want += (f + 999'999) / 1'000'000;
  }
  CHECK(static_cast<detail::u128>(sum.nanos) == want);
}

TEST_CASE("the open catalogue's JSON shape", "[prices]") {
  const char* catalogue = R"({
    "sample_spec": {"max_tokens": "LEGACY parameter", "input_cost_per_token": 0,
                    "litellm_provider": "one of https://docs.litellm.ai"},
    "gpt-4o": {"max_tokens": 16384, "input_cost_per_token": 2.5e-06,
               "output_cost_per_token": 1e-05,
               "cache_read_input_token_cost": 1.25e-06,
               "litellm_provider": "openai", "mode": "chat",
               "supports_vision": true, "supported_regions": ["global"]},
    "claude-sonnet-4-5": {"input_cost_per_token": 3e-06,
               "output_cost_per_token": 1.5e-05,
               "cache_creation_input_token_cost": 3.75e-06,
               "cache_creation_input_token_cost_above_1hr": 6e-06,
               "cache_read_input_token_cost": 3e-07,
               "input_cost_per_token_above_200k_tokens": 6e-06,
               "output_cost_per_token_above_200k_tokens": 2.25e-05,
               "cache_read_input_token_cost_above_200k_tokens": 6e-07},
    "dall-e-3": {"output_cost_per_image": 0.04, "mode": "image_generation"},
    "gpt-4o-mini": {"input_cost_per_token": 1.5e-07,
                    "output_cost_per_token": 6e-07}
  })";
  std::vector<std::string> skipped;
  const auto t = load_price_catalogue(catalogue, SysTime{}, &skipped);
  REQUIRE(t.ok());
  CHECK(skipped == std::vector<std::string>{"dall-e-3"});
  CHECK(t->contains("gpt-4o"));
  CHECK(t->contains("sample_spec"));  // has an input price (of 0)
  const Prices mini = t->prices("gpt-4o-mini", SysTime{}).value();
  CHECK(mini.base.input.femtos == 150'000'000);  // exact, not 1.4999...e-7
  CHECK(mini.base.output.femtos == 600'000'000);
  const Prices s = t->prices("claude-sonnet-4-5", SysTime{}).value();
  CHECK(s.base.cache_write_5m.femtos == 3'750'000'000);
  CHECK(s.base.cache_write_1h.femtos == 6'000'000'000);
  CHECK(s.cliff_above == 200'000);
  CHECK(s.cliff.input.femtos == 6'000'000'000);
  CHECK(s.cliff.cache_read.femtos == 600'000'000);
  CHECK(s.cliff.cache_write_5m.femtos == 3'750'000'000);  // carried over
  // 1M tokens of gpt-4o-mini input: exactly $0.15.
  CHECK(t->cost("gpt-4o-mini", Usage{.input_uncached = 1'000'000}, SysTime{})
            .value() == Money{150'000'000});

  for (const char* bad :
       {"", "[]", "{", R"({"m":{"input_cost_per_token":-1e-6}})",
        R"({"m":{"input_cost_per_token":"3e-6"}})",
        R"({"m":{"input_cost_per_token":1e-17}})",
        R"({"m":{"input_cost_per_token":1e-6,)"
        R"("input_cost_per_token_above_200k_tokens":2e-6,)"
        R"("input_cost_per_token_above_128k_tokens":2e-6}})"}) {
    CAPTURE(bad);
    const auto r = load_price_catalogue(bad);
    REQUIRE_FALSE(r.ok());
    CHECK(r.status().code() == absl::StatusCode::kInvalidArgument);
  }
}

TEST_CASE("max_output_within is the largest output a budget covers, exactly",
          "[prices]") {
  std::mt19937_64 rng(rk_test::seed_or(0x3A7));
  for (int i = 0; i < 20'000; ++i) {
    Prices p;
    p.base.input.femtos = rng() % 20'000'000'000;
    p.base.output.femtos = rng() % 4 == 0 ? 0 : rng() % 80'000'000'000;
    p.base.cache_read.femtos = rng() % 2'000'000'000;
    if (rng() % 3 == 0) {
      p.cliff_above = 1 + rng() % 300'000;
      p.cliff.input.femtos = rng() % 40'000'000'000;
      p.cliff.output.femtos = 1 + rng() % 160'000'000'000;
    }
    Usage u;
    u.input_uncached = rng() % 400'000;
    u.cache_read = rng() % 4 == 0 ? rng() % 100'000 : 0;
    const Money budget{static_cast<std::int64_t>(rng() % 5'000'000'000)};
    const std::optional<std::uint64_t> n =
        PriceTable::max_output_within(p, u, budget);
    const auto cost_with = [&](std::uint64_t out) {
      Usage v = u;
      v.output = out;
      return PriceTable::cost(p, v).value();
    };
    CAPTURE(i, budget.nanos, u.input_uncached, p.base.output.femtos);
    if (!n) {
      CHECK(cost_with(0) > budget);
      continue;
    }
    CHECK(cost_with(*n) <= budget);
    if (*n < kMaxUsageTokens) CHECK(cost_with(*n + 1) > budget);
  }
}
