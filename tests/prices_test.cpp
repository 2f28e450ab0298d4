// Money, prices and the price catalogue: exact integers, never floats.
#include "ratekeeper/budget/prices.hpp"

#include <cctype>
#include <chrono>
#include <cstdint>
#include <fstream>
#include <map>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <string>

#include "ratekeeper/budget/catalogue.hpp"
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
  REQUIRE(t.set("long", {.base = {.input = per_m(3'000'000),
                                  .output = per_m(15'000'000)},
                         .bands = {{.from_input = 200'001,
                                    .prices = {.input = per_m(6'000'000),
                                               .output = per_m(22'500'000)}}}})
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

TEST_CASE("max_output_within is the largest output a budget covers, exactly",
          "[prices]") {
  std::mt19937_64 rng(rk_test::seed_or(0x3A7));
  for (int i = 0; i < 20'000; ++i) {
    Prices p;
    p.base.input = TokenPrice{rng() % 20'000'000'000};
    p.base.output = TokenPrice{rng() % 4 == 0 ? 0 : rng() % 80'000'000'000};
    p.base.cache_read = TokenPrice{rng() % 2'000'000'000};
    if (rng() % 3 == 0) {
      p.bands.push_back(
          {.from_input = 2 + rng() % 300'000,
           .prices = {.input = TokenPrice{rng() % 40'000'000'000},
                      .output = TokenPrice{1 + rng() % 160'000'000'000}}});
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
    CAPTURE(i, budget.nanos, u.input_uncached, p.base.output->femtos);
    if (!n) {
      CHECK(cost_with(0) > budget);
      continue;
    }
    CHECK(cost_with(*n) <= budget);
    if (*n < kMaxUsageTokens) CHECK(cost_with(*n + 1) > budget);
  }
}

// ---------------------------------------------------------------------------
// Issue 14: LiteLLM's published price file, as users have it.
// tests/data/litellm-model-prices.json (BerriAI/litellm, MIT; see
// tests/data/README.md). Every figure below is computed by hand in the
// comments from the entry quoted beside it: the oracle is the file's text,
// not the code under test.

namespace {

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

std::string data_path(const char* name) {
  std::string here = __FILE__;
  return here.substr(0, here.find_last_of('/')) + "/data/" + name;
}

const PriceCatalogue& real_catalogue() {
  static const PriceCatalogue c = [] {
    const std::string text = read_file(data_path("litellm-model-prices.json"));
    REQUIRE(text.size() > 1'000'000);
    absl::StatusOr<PriceCatalogue> r = load_price_catalogue(text);
    REQUIRE(r.ok());
    return *std::move(r);
  }();
  return c;
}

Money cost_of(const char* model, const Usage& u) {
  const absl::StatusOr<Money> m = real_catalogue().table.cost(model, u, {});
  INFO(model << ": " << m.status().ToString());
  REQUIRE(m.ok());
  return *m;
}

// This test's own reading of a per-token key of the file (std::regex is
// not used: g++ 12 under ASan warns in it): a base name, then optionally
// "_above_<N>k_tokens", then optionally a tier suffix.
struct KeyParts {
  std::string base;
  std::optional<std::uint64_t> above_k;
  std::string tier;  // "", "_priority", "_flex", "_batches"
};
std::optional<KeyParts> split_key(const std::string& key) {
  static const char* const kBases[] = {
      "input_cost_per_token",
      "output_cost_per_token",
      "cache_read_input_token_cost",
      "input_cost_per_token_cache_hit",
      "cache_creation_input_token_cost",
      "cache_creation_input_token_cost_above_1hr",
      "output_cost_per_reasoning_token",
      "input_cost_per_audio_token",
      "cache_read_input_audio_token_cost",
      "output_cost_per_audio_token"};
  for (const std::string base : kBases) {
    if (key.rfind(base, 0) != 0) continue;
    std::string rest = key.substr(base.size());
    KeyParts k{base, std::nullopt, ""};
    if (rest.rfind("_above_", 0) == 0) {
      std::size_t i = 7, n = 0;
      while (i < rest.size() &&
             std::isdigit(static_cast<unsigned char>(rest[i]))) {
        ++i;
        ++n;
      }
      if (n == 0 || rest.compare(i, 8, "k_tokens") != 0) continue;
      k.above_k = std::stoull(rest.substr(7, n));
      rest = rest.substr(i + 8);
    }
    if (rest == "" || rest == "_priority" || rest == "_flex" ||
        rest == "_batches") {
      k.tier = rest;
      return k;
    }
  }
  return std::nullopt;
}

bool has_issue(const PriceCatalogue& c, std::string_view model,
               std::string_view field, CatalogueIssue::Kind kind) {
  for (const CatalogueIssue& i : c.issues) {
    if (i.model == model && i.field == field && i.kind == kind) return true;
  }
  return false;
}

}  // namespace

TEST_CASE("the real LiteLLM file loads entry by entry, none lost",
          "[i14][catalogue]") {
  const PriceCatalogue& c = real_catalogue();
  // Independent count with nlohmann's DOM: every top-level key but
  // sample_spec is an entry; those with a per-token price (flat or in
  // tiered_pricing) can be priced.
  const auto dom =
      nlohmann::json::parse(read_file(data_path("litellm-model-prices.json")));
  std::size_t entries = 0, priceable = 0;
  for (const auto& [model, e] : dom.items()) {
    if (model == "sample_spec") continue;
    ++entries;
    bool any = e.is_object() && (e.contains("input_cost_per_token") ||
                                 e.contains("output_cost_per_token"));
    if (e.is_object() && e.contains("tiered_pricing")) {
      for (const auto& t : e["tiered_pricing"]) {
        any = any || t.contains("input_cost_per_token") ||
              t.contains("output_cost_per_token");
      }
    }
    if (any) ++priceable;
  }
  CHECK(entries == 2983);
  CHECK(c.entries == entries);
  CHECK(c.table.size() == priceable);
  CHECK(priceable == 2539);
  CHECK(c.rejected() == 444);
  CHECK(c.table.size() + c.rejected() == c.entries);  // none lost silently
  CHECK_FALSE(c.table.contains("sample_spec"));
  // Each rejected model is named once, with a reason.
  std::set<std::string> rejected;
  for (const CatalogueIssue& i : c.issues) {
    if (i.kind != CatalogueIssue::Kind::kRejected) continue;
    CHECK(rejected.insert(i.model).second);
    CHECK_FALSE(c.table.contains(i.model));
    CHECK_FALSE(i.reason.empty());
  }
  CHECK(rejected.size() == c.rejected());
  CHECK(rejected.contains("dall-e-3"));  // priced per image only

  // Every key of a loaded entry whose name contains "cost" is priced (the
  // grammar of split_key, written apart from the loader's) or named in that
  // model's report.
  std::size_t keys = 0, reported = 0;
  for (const auto& [model, e] : dom.items()) {
    if (!c.table.contains(model)) continue;
    for (const auto& [key, v] : e.items()) {
      if (key.find("cost") == std::string::npos) continue;
      ++keys;
      if (split_key(key) || key == "search_context_cost_per_query") continue;
      ++reported;
      CAPTURE(model, key);
      CHECK(has_issue(c, model, key, CatalogueIssue::Kind::kNotPriced));
    }
  }
  // Counted apart with Python's json module and the same grammar as a
  // regular expression:
  // 7,905 cost keys in the 2,539 loaded entries, 304 of them not priced.
  CHECK(keys == 7905);
  CHECK(reported == 304);
  INFO("loaded " << c.table.size() << ", rejected " << c.rejected()
                 << ", cost keys of loaded entries " << keys << ", not priced "
                 << reported);
  CHECK(true);
}

TEST_CASE("every price of every loaded entry is where the file puts it",
          "[i14][catalogue]") {
  // The oracle: nlohmann's DOM reads each number as a double (good to far
  // better than a femto-USD at these magnitudes), and this test's own
  // reading of the key names says which tier, band and kind of token each
  // prices. The loader must agree on all of them, to the femto-USD.
  const PriceCatalogue& c = real_catalogue();
  const auto dom =
      nlohmann::json::parse(read_file(data_path("litellm-model-prices.json")));
  const std::map<std::string, std::optional<TokenPrice> TokenPrices::*> kinds =
      {
          {"input_cost_per_token", &TokenPrices::input},
          {"output_cost_per_token", &TokenPrices::output},
          {"cache_read_input_token_cost", &TokenPrices::cache_read},
          {"input_cost_per_token_cache_hit", &TokenPrices::cache_read},
          {"cache_creation_input_token_cost", &TokenPrices::cache_write_5m},
          {"cache_creation_input_token_cost_above_1hr",
           &TokenPrices::cache_write_1h},
          {"output_cost_per_reasoning_token", &TokenPrices::reasoning},
          {"input_cost_per_audio_token", &TokenPrices::input_audio},
          {"cache_read_input_audio_token_cost", &TokenPrices::cache_read_audio},
          {"output_cost_per_audio_token", &TokenPrices::output_audio},
      };
  auto band_of = [](const Prices& p, ServiceTier tier,
                    std::uint64_t from) -> const TokenPrices* {
    if (tier == ServiceTier::kStandard && from == 0) return &p.base;
    for (const PriceBand& b : p.bands) {
      if (b.tier == tier && b.from_input == from) return &b.prices;
    }
    return nullptr;
  };
  auto near = [](const std::optional<TokenPrice>& got, double usd) {
    if (!got) return false;
    const double want = usd * 1e15;
    const double diff = static_cast<double>(got->femtos) - want;
    const double eps = want * 4e-16 + 0.01;    // the double's own error
    return diff >= -eps && diff <= 1.0 + eps;  // exact, or noise rounded up
  };
  std::size_t checked = 0, zeros = 0;
  for (const auto& [model, e] : dom.items()) {
    if (!c.table.contains(model)) continue;
    const Prices p = c.table.prices(model, {}).value();
    for (const auto& [key, v] : e.items()) {
      const std::optional<KeyParts> k = split_key(key);
      if (!k) continue;
      const ServiceTier tier = k->tier == "_priority"  ? ServiceTier::kPriority
                               : k->tier == "_flex"    ? ServiceTier::kFlex
                               : k->tier == "_batches" ? ServiceTier::kBatch
                                                       : ServiceTier::kStandard;
      const std::uint64_t from = k->above_k ? *k->above_k * 1000 + 1 : 0;
      const TokenPrices* tp = band_of(p, tier, from);
      CAPTURE(model, key);
      REQUIRE(tp != nullptr);
      CHECK(near(tp->*kinds.at(k->base), v.get<double>()));
      ++checked;
      if (v.get<double>() == 0.0) ++zeros;
    }
    if (!e.contains("tiered_pricing")) continue;
    for (const auto& t : e["tiered_pricing"]) {
      if (!t.contains("range")) continue;
      const auto from = static_cast<std::uint64_t>(t["range"][0].get<double>());
      const TokenPrices* tp = band_of(p, ServiceTier::kStandard, from);
      CAPTURE(model, from);
      REQUIRE(tp != nullptr);
      for (const auto& [key, v] : t.items()) {
        if (!kinds.contains(key)) continue;
        CHECK(near(tp->*kinds.at(key), v.get<double>()));
        ++checked;
      }
    }
  }
  // Counted apart with Python over the same keys: 7,536 prices, 434 of
  // them an explicit 0.
  CHECK(checked == 7536);
  CHECK(zeros == 434);
  // Explicit zeros stay zeros: every "cache_read_input_token_cost": 0
  // resolves to a cache read price of 0, not the input price.
  std::size_t zero_cache = 0;
  for (const auto& [model, e] : dom.items()) {
    if (!c.table.contains(model)) continue;
    const Prices p = c.table.prices(model, {}).value();
    const ResolvedPrices r =
        PriceTable::resolve(p, ServiceTier::kStandard, 1000);
    if (e.contains("cache_read_input_token_cost") &&
        e["cache_read_input_token_cost"].get<double>() == 0.0) {
      CAPTURE(model);
      CHECK(r.cache_read == 0);
      if (r.input != 0) ++zero_cache;
    }
    if (e.contains("cache_creation_input_token_cost") &&
        e["cache_creation_input_token_cost"].get<double>() == 0.0) {
      CAPTURE(model);
      CHECK(r.cache_write_5m == 0);
      if (r.input != 0 &&
          !(e.contains("cache_read_input_token_cost") &&
            e["cache_read_input_token_cost"].get<double>() == 0.0)) {
        ++zero_cache;
      }
    }
  }
  // Models with a nonzero input price and a zero cache read or write price,
  // which the old loader billed at the input price: 41, counted apart with
  // Python.
  CHECK(zero_cache == 41);
}

TEST_CASE("float noise is rounded up and reported, never down",
          "[i14][catalogue]") {
  // databricks/databricks-claude-sonnet-4-5:
  //   "input_cost_per_token": 2.9999900000000002e-06,
  //   "input_dbu_cost_per_token": 4.2857e-05,
  //   "output_cost_per_token": 1.5000020000000002e-05,
  //   "output_dbu_cost_per_token": 0.000214286,
  // 2.9999900000000002e-06 USD = 2,999,990,000.0000002 femto-USD: up to
  // 2,999,990,001. 1.5000020000000002e-05 = 15,000,020,000.000002: up to
  // 15,000,020,001.
  const PriceCatalogue& c = real_catalogue();
  const char* m = "databricks/databricks-claude-sonnet-4-5";
  const Prices p = c.table.prices(m, {}).value();
  CHECK(p.base.input == TokenPrice{2'999'990'001});
  CHECK(p.base.output == TokenPrice{15'000'020'001});
  CHECK(has_issue(c, m, "input_cost_per_token",
                  CatalogueIssue::Kind::kRoundedUp));
  CHECK(has_issue(c, m, "output_cost_per_token",
                  CatalogueIssue::Kind::kRoundedUp));
  CHECK(has_issue(c, m, "input_dbu_cost_per_token",
                  CatalogueIssue::Kind::kNotPriced));
  // 1,000,000 input + 1,000 output: 2,999,990,001e6 + 15,000,020,001e3
  // femto = 2,999,990,001,000,000 + 15,000,020,001,000 = 3,014,990,021,001,000
  // femto-USD = 3,014,990,021.001 nano-USD: 3,014,990,022 rounded up.
  CHECK(cost_of(m, {.input_uncached = 1'000'000, .output = 1000}) ==
        Money{3'014'990'022});
  std::size_t rounded = 0;
  for (const CatalogueIssue& i : c.issues) {
    if (i.kind == CatalogueIssue::Kind::kRoundedUp) ++rounded;
  }
  // Counted apart (Python, the raw text): 31 priced keys of the file hold
  // a number of more than 15 significant digits.
  CHECK(rounded == 31);

  // The parser itself: noise rounds up; a short price finer than 1e-15 does
  // not (it is a price, not noise) and stays an error.
  const auto noisy =
      parse_usd_per_token_rounding_noise("2.9999900000000002e-06");
  REQUIRE(noisy.ok());
  CHECK(noisy->price.femtos == 2'999'990'001);
  CHECK(noisy->rounded_up);
  CHECK_FALSE(parse_usd_per_token("2.9999900000000002e-06").ok());
  const auto clean =
      parse_usd_per_token_rounding_noise("3.0000000000000000e-06");
  REQUIRE(clean.ok());
  CHECK(clean->price.femtos == 3'000'000'000);
  CHECK_FALSE(clean->rounded_up);
  CHECK_FALSE(parse_usd_per_token_rounding_noise("1e-17").ok());
  CHECK(parse_usd_per_token_rounding_noise("1.0000000000000001e-17")
            ->price.femtos == 1);
}

TEST_CASE("gpt-4o: standard, priority and batch prices", "[i14][catalogue]") {
  // gpt-4o:
  //   "cache_read_input_token_cost": 1.25e-06,
  //   "cache_read_input_token_cost_priority": 2.125e-06,
  //   "input_cost_per_token": 2.5e-06,
  //   "input_cost_per_token_batches": 1.25e-06,
  //   "input_cost_per_token_priority": 4.25e-06,
  //   "output_cost_per_token": 1e-05,
  //   "output_cost_per_token_batches": 5e-06,
  //   "output_cost_per_token_priority": 1.7e-05,
  Usage u{.input_uncached = 1000, .cache_read = 2000, .output = 500};
  // 1000*2.5e-6 + 2000*1.25e-6 + 500*1e-5 = 0.0025+0.0025+0.005 = $0.01
  CHECK(cost_of("gpt-4o", u) == Money{10'000'000});
  u.service_tier = ServiceTier::kPriority;
  // 1000*4.25e-6 + 2000*2.125e-6 + 500*1.7e-5 = 0.00425+0.00425+0.0085
  CHECK(cost_of("gpt-4o", u) == Money{17'000'000});
  u.service_tier = ServiceTier::kBatch;
  // 1000*1.25e-6 + 2000*1.25e-6 (no batch cache price: standard's) +
  // 500*5e-6 = 0.00125+0.0025+0.0025
  CHECK(cost_of("gpt-4o", u) == Money{6'250'000});
  u.service_tier = ServiceTier::kFlex;  // no flex prices: standard's
  CHECK(cost_of("gpt-4o", u) == Money{10'000'000});
}

TEST_CASE("claude-sonnet-4-5: long context, 1-hour writes, web search",
          "[i14][catalogue]") {
  // claude-sonnet-4-5:
  //   "cache_creation_input_token_cost": 3.75e-06,
  //   "cache_creation_input_token_cost_above_1hr": 6e-06,
  //   "cache_creation_input_token_cost_above_1hr_above_200k_tokens": 1.2e-05,
  //   "cache_read_input_token_cost": 3e-07,
  //   "input_cost_per_token": 3e-06,
  //   "input_cost_per_token_above_200k_tokens": 6e-06,
  //   "output_cost_per_token_above_200k_tokens": 2.25e-05,
  //   "cache_creation_input_token_cost_above_200k_tokens": 7.5e-06,
  //   "cache_read_input_token_cost_above_200k_tokens": 6e-07,
  //   "output_cost_per_token": 1.5e-05,
  //   "search_context_cost_per_query": {"search_context_size_high": 0.01,
  //     "search_context_size_low": 0.01, "search_context_size_medium": 0.01}
  const char* m = "claude-sonnet-4-5";
  // 1000*3e-6 + 10000*3e-7 + 2000*3.75e-6 + 3000*6e-6 + 800*1.5e-5
  // = 0.003 + 0.003 + 0.0075 + 0.018 + 0.012 = $0.0435
  const Usage small{.input_uncached = 1000,
                    .cache_read = 10'000,
                    .cache_write_5m = 2000,
                    .cache_write_1h = 3000,
                    .output = 800};
  CHECK(cost_of(m, small) == Money{43'500'000});
  // 205,000 input tokens, above 200k: every token at the long prices.
  // 150000*6e-6 + 40000*6e-7 + 5000*7.5e-6 + 10000*1.2e-5 + 1000*2.25e-5
  // = 0.9 + 0.024 + 0.0375 + 0.12 + 0.0225 = $1.104 (the old parser billed
  // the 1-hour writes at 6e-6: $1.044)
  const Usage long_call{.input_uncached = 150'000,
                        .cache_read = 40'000,
                        .cache_write_5m = 5000,
                        .cache_write_1h = 10'000,
                        .output = 1000};
  CHECK(cost_of(m, long_call) == Money{1'104'000'000});
  // Exactly 200,000 is not above 200k: 200000*3e-6 + 1000*1.5e-5 = 0.615.
  CHECK(cost_of(m, {.input_uncached = 200'000, .output = 1000}) ==
        Money{615'000'000});
  // 200,001: 200001*6e-6 + 1000*2.25e-5 = 1.200006 + 0.0225 = 1.222506.
  CHECK(cost_of(m, {.input_uncached = 200'001, .output = 1000}) ==
        Money{1'222'506'000});

  // A Messages body with server_tool_use (shape from Anthropic's web search
  // tool documentation; no recording in ../shared has one): 3 searches at
  // $0.01 beside the tokens of `small`: $0.0435 + $0.03.
  const auto au = read_anthropic_usage(R"({"usage":{"input_tokens":1000,
      "cache_creation_input_tokens":5000,"cache_read_input_tokens":10000,
      "cache_creation":{"ephemeral_5m_input_tokens":2000,
                        "ephemeral_1h_input_tokens":3000},
      "output_tokens":800,"server_tool_use":{"web_search_requests":3},
      "service_tier":"standard"}})");
  REQUIRE(au.ok());
  CHECK(au->server_tool_use.web_search_requests == 3);
  const Usage used = normalize(*au).value();
  CHECK(used.web_search_requests == 3);
  CHECK(used.service_tier == ServiceTier::kStandard);
  CHECK(cost_of(m, used) == Money{73'500'000});
  // A model the file gives no search price: searches are refused, not free.
  Usage searched{.input_uncached = 10, .web_search_requests = 1};
  const auto none = real_catalogue().table.cost("gpt-4o", searched, {});
  CHECK(none.status().code() == absl::StatusCode::kNotFound);
  // OpenAI's sizes: gpt-4o-search-preview "search_context_cost_per_query":
  // {"search_context_size_high": 0.05, "search_context_size_low": 0.03,
  //  "search_context_size_medium": 0.035}, "input_cost_per_token": 2.5e-06.
  // 10 tokens = 25,000 femto... 10*2.5e-6 = $0.000025; + one search.
  searched.search_context = SearchContextSize::kLow;
  CHECK(cost_of("gpt-4o-search-preview", searched) ==
        Money{25'000 + 30'000'000});
  searched.search_context = SearchContextSize::kHigh;
  CHECK(cost_of("gpt-4o-search-preview", searched) ==
        Money{25'000 + 50'000'000});
}

TEST_CASE("an explicit zero price is zero", "[i14][catalogue]") {
  // openrouter/z-ai/glm-4.7:
  //   "input_cost_per_token": 4e-07, "output_cost_per_token": 1.5e-06,
  //   "cache_creation_input_token_cost": 0.0,
  //   "cache_read_input_token_cost": 0.0,
  // 1000*4e-7 + (5000 reads + 2000 writes)*0 + 100*1.5e-6 = $0.00055 (the
  // old loader billed the 7,000 cached tokens as input: + $0.0028).
  CHECK(cost_of("openrouter/z-ai/glm-4.7", {.input_uncached = 1000,
                                            .cache_read = 5000,
                                            .cache_write_5m = 2000,
                                            .output = 100}) == Money{550'000});
  // sarvam/sarvam-m lists every price as 0: a free model, loaded as one.
  CHECK(cost_of("sarvam/sarvam-m", {.input_uncached = 1'000'000,
                                    .output = 1'000'000}) == Money{0});
  // Without a cache price the cache bills as input (deepseek-chat:
  // "cache_read_input_token_cost": 2.8e-08, "input_cost_per_token":
  // 2.8e-07, no cache write price): 1000 writes * 2.8e-7 = $0.00028.
  CHECK(cost_of("deepseek-chat", {.cache_write_5m = 1000}) == Money{280'000});
}

TEST_CASE("DeepSeek cache hits are cache reads", "[i14][catalogue]") {
  // deepseek/deepseek-chat:
  //   "cache_creation_input_token_cost": 0.0,
  //   "cache_read_input_token_cost": 2.8e-08,
  //   "input_cost_per_token": 2.8e-07,
  //   "input_cost_per_token_cache_hit": 2.8e-08,
  //   "output_cost_per_token": 4.2e-07,
  // A body in DeepSeek's documented usage shape (no recording in ../shared):
  const auto ds = read_openai_chat_usage(R"({"usage":{"prompt_tokens":1000,
      "completion_tokens":200,"total_tokens":1200,
      "prompt_cache_hit_tokens":600,"prompt_cache_miss_tokens":400}})");
  REQUIRE(ds.ok());
  CHECK(ds->prompt_cache_hit_tokens == 600u);
  const Usage u = normalize(*ds).value();
  CHECK(u.cache_read == 600);
  CHECK(u.input_uncached == 400);
  // 400*2.8e-7 + 600*2.8e-8 + 200*4.2e-7 = 0.000112 + 0.0000168 + 0.000084
  // = $0.0002128 (read as uncached input: $0.000364).
  CHECK(cost_of("deepseek/deepseek-chat", u) == Money{212'800});
  // Hits and misses that do not make up the prompt are an error.
  const auto bad = read_openai_chat_usage(R"({"usage":{"prompt_tokens":1000,
      "completion_tokens":200,"prompt_cache_hit_tokens":600,
      "prompt_cache_miss_tokens":300}})");
  REQUIRE(bad.ok());
  CHECK(normalize(*bad).status().code() == absl::StatusCode::kInvalidArgument);
}

TEST_CASE("tiered_pricing ranges bill the whole call", "[i14][catalogue]") {
  // dashscope/qwen3-coder-plus "tiered_pricing":
  //   [0, 32000):       cache_read 1e-07,   input 1e-06,   output 5e-06
  //   [32000, 128000):  cache_read 1.8e-07, input 1.8e-06, output 9e-06
  //   [128000, 256000): cache_read 3e-07,   input 3e-06,   output 1.5e-05
  //   [256000, 1e6):    cache_read 6e-07,   input 6e-06,   output 6e-05
  const char* m = "dashscope/qwen3-coder-plus";
  // 20000*1e-6 + 10000*1e-7 + 1000*5e-6 = 0.02 + 0.001 + 0.005
  CHECK(cost_of(m, {.input_uncached = 20'000,
                    .cache_read = 10'000,
                    .output = 1000}) == Money{26'000'000});
  // 31,999 input: the first range. 29999*1e-6 + 2000*1e-7 + 1000*5e-6
  CHECK(cost_of(m, {.input_uncached = 29'999,
                    .cache_read = 2000,
                    .output = 1000}) == Money{35'199'000});
  // 32,000: the second range (a shared bound goes to the dearer range).
  // 30000*1.8e-6 + 2000*1.8e-7 + 1000*9e-6 = 0.054 + 0.00036 + 0.009
  CHECK(cost_of(m, {.input_uncached = 30'000,
                    .cache_read = 2000,
                    .output = 1000}) == Money{63'360'000});
  // 300,000: the last. 300000*6e-6 + 1000*6e-5 = 1.8 + 0.06
  CHECK(cost_of(m, {.input_uncached = 300'000, .output = 1000}) ==
        Money{1'860'000'000});

  // dashscope/qwen-plus-latest "tiered_pricing": [0, 256000): input 4e-07,
  //   output_cost_per_reasoning_token 4e-06, output 1.2e-06; [256000, 1e6):
  //   input 1.2e-06, reasoning 1.2e-05, output 3.6e-06.
  // 1000 in, 3000 out of which 2000 reasoning:
  // 1000*4e-7 + 1000*1.2e-6 + 2000*4e-6 = 0.0004 + 0.0012 + 0.008
  CHECK(cost_of("dashscope/qwen-plus-latest",
                {.input_uncached = 1000, .output = 3000, .reasoning = 2000}) ==
        Money{9'600'000});
}

TEST_CASE("priority, flex and batch beside long-context bands",
          "[i14][catalogue]") {
  // gpt-5.4:
  //   "cache_read_input_token_cost": 2.5e-07,
  //   "cache_read_input_token_cost_above_272k_tokens": 5e-07,
  //   "cache_read_input_token_cost_flex": 1.3e-07,
  //   "cache_read_input_token_cost_priority": 5e-07,
  //   "input_cost_per_token": 2.5e-06,
  //   "input_cost_per_token_above_272k_tokens": 5e-06,
  //   "input_cost_per_token_flex": 1.25e-06,
  //   "input_cost_per_token_batches": 1.25e-06,
  //   "input_cost_per_token_priority": 5e-06,
  //   "output_cost_per_token": 1.5e-05,
  //   "output_cost_per_token_above_272k_tokens": 2.25e-05,
  //   "output_cost_per_token_flex": 7.5e-06,
  //   "output_cost_per_token_batches": 7.5e-06,
  //   "output_cost_per_token_priority": 3e-05,
  const char* m = "gpt-5.4";
  Usage u{.input_uncached = 10'000, .cache_read = 20'000, .output = 1000};
  // 10000*2.5e-6 + 20000*2.5e-7 + 1000*1.5e-5 = 0.025 + 0.005 + 0.015
  CHECK(cost_of(m, u) == Money{45'000'000});
  u.service_tier = ServiceTier::kFlex;
  // 10000*1.25e-6 + 20000*1.3e-7 + 1000*7.5e-6 = 0.0125 + 0.0026 + 0.0075
  CHECK(cost_of(m, u) == Money{22'600'000});
  u.service_tier = ServiceTier::kPriority;
  // 10000*5e-6 + 20000*5e-7 + 1000*3e-5 = 0.05 + 0.01 + 0.03
  CHECK(cost_of(m, u) == Money{90'000'000});
  u.service_tier = ServiceTier::kBatch;
  // 10000*1.25e-6 + 20000*2.5e-7 (standard's) + 1000*7.5e-6
  CHECK(cost_of(m, u) == Money{25'000'000});
  // Above 272k. Standard: 280000*5e-6 + 1000*2.25e-5 = 1.4 + 0.0225.
  Usage big{.input_uncached = 280'000, .output = 1000};
  CHECK(cost_of(m, big) == Money{1'422'500'000});
  // Flex lists no long-context price: never below standard's there
  // (max(1.25e-6, 5e-6), max(7.5e-6, 2.25e-5)): the same $1.4225.
  big.service_tier = ServiceTier::kFlex;
  CHECK(cost_of(m, big) == Money{1'422'500'000});
  // Priority: max(5e-6, 5e-6) and max(3e-5, 2.25e-5): 1.4 + 0.03.
  big.service_tier = ServiceTier::kPriority;
  CHECK(cost_of(m, big) == Money{1'430'000'000});

  // azure_ai/gpt-5.5 lists priority long-context prices:
  //   "cache_read_input_token_cost_above_272k_tokens": 1e-06,
  //   "cache_read_input_token_cost_above_272k_tokens_priority": 2e-06,
  //   "input_cost_per_token_above_272k_tokens": 1e-05,
  //   "input_cost_per_token_above_272k_tokens_priority": 2e-05,
  //   "output_cost_per_token_above_272k_tokens": 4.5e-05,
  //   "output_cost_per_token_above_272k_tokens_priority": 9e-05,
  Usage huge{.input_uncached = 300'000, .cache_read = 10'000, .output = 2000};
  // 300000*1e-5 + 10000*1e-6 + 2000*4.5e-5 = 3 + 0.01 + 0.09
  CHECK(cost_of("azure_ai/gpt-5.5", huge) == Money{3'100'000'000});
  huge.service_tier = ServiceTier::kPriority;
  // 300000*2e-5 + 10000*2e-6 + 2000*9e-5 = 6 + 0.02 + 0.18
  CHECK(cost_of("azure_ai/gpt-5.5", huge) == Money{6'200'000'000});

  // Anthropic reports its tier in usage; an unknown one is refused.
  AnthropicUsage a;
  a.input_tokens = 10;
  a.output_tokens = 1;
  a.service_tier = "priority";
  CHECK(normalize(a)->service_tier == ServiceTier::kPriority);
  a.service_tier = "batch";
  CHECK(normalize(a)->service_tier == ServiceTier::kBatch);
  a.service_tier = "turbo";
  CHECK(normalize(a).status().code() == absl::StatusCode::kInvalidArgument);
}

TEST_CASE("audio tokens at the audio prices", "[i14][catalogue]") {
  // gpt-4o-audio-preview:
  //   "input_cost_per_audio_token": 4e-05, "input_cost_per_token": 2.5e-06,
  //   "output_cost_per_audio_token": 8e-05, "output_cost_per_token": 1e-05,
  // A Chat Completions usage with audio (OpenAI's documented fields):
  const auto o = read_openai_chat_usage(R"({"usage":{"prompt_tokens":1000,
      "completion_tokens":500,"total_tokens":1500,
      "prompt_tokens_details":{"cached_tokens":0,"audio_tokens":600},
      "completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":400}}})");
  REQUIRE(o.ok());
  const Usage u = normalize(*o).value();
  CHECK(u.input_uncached == 400);
  CHECK(u.input_audio == 600);
  CHECK(u.output == 500);
  CHECK(u.output_audio == 400);
  CHECK(u.input_total() == 1000);
  // 400*2.5e-6 + 600*4e-5 + 100*1e-5 + 400*8e-5
  // = 0.001 + 0.024 + 0.001 + 0.032 = $0.058
  CHECK(cost_of("gpt-4o-audio-preview", u) == Money{58'000'000});
  // Audio beyond the uncached prompt was cached: 1000 prompt, 800 cached,
  // 300 audio: 200 uncached audio, 100 cached audio.
  OpenAIChatUsage c;
  c.prompt_tokens = 1000;
  c.completion_tokens = 1;
  c.prompt_tokens_details.cached_tokens = 800;
  c.prompt_tokens_details.audio_tokens = 300;
  const Usage v = normalize(c).value();
  CHECK(v.input_uncached == 0);
  CHECK(v.input_audio == 200);
  CHECK(v.cache_read_audio == 100);
  CHECK(v.cache_read == 700);
  CHECK(v.input_total() == 1000);
  c.completion_tokens_details.audio_tokens = 2;
  CHECK(normalize(c).status().code() == absl::StatusCode::kInvalidArgument);
}

TEST_CASE("an odd entry is that entry's error, never its neighbour's",
          "[i14][catalogue]") {
  // gpt-4o's prices as the file has them, then neighbours of every odd
  // shape: a top-level array (the old loader wrote its 1000 into gpt-4o's
  // last field), arrays and objects where a price belongs, strings, a
  // negative price, a short price finer than 1e-15, a duplicate key, two
  // different prices for the same tokens.
  const char* catalogue = R"({
    "sample_spec": {"input_cost_per_token": 0.0, "max_tokens": "LEGACY"},
    "gpt-4o": {"input_cost_per_token": 2.5e-06, "output_cost_per_token": 1e-05,
               "cache_read_input_token_cost": 1.25e-06,
               "supported_endpoints": ["/v1/chat/completions"],
               "metadata": {"notes": [1000]}},
    "notes": [1000],
    "arr": {"input_cost_per_token": [1000], "output_cost_per_token": 1e-05},
    "obj": {"output_cost_per_token": {"usd": 1000}},
    "str": {"input_cost_per_token": "3e-6"},
    "neg": {"input_cost_per_token": -1e-06},
    "fine": {"input_cost_per_token": 1e-17},
    "dup": {"input_cost_per_token": 1e-06, "input_cost_per_token": 2e-06},
    "hit": {"input_cost_per_token": 1e-06, "cache_read_input_token_cost": 1e-07,
            "input_cost_per_token_cache_hit": 2e-07},
    "deep": {"input_cost_per_token": 1e-06,
             "output_cost_per_token_flex": [[[[[[1]]]]]]},
    "scalar": 7,
    "ok-after": {"input_cost_per_token": 1e-06, "output_cost_per_token": 2e-06,
                 "output_cost_per_image": 0.04, "notes": [0]}
  })";
  const absl::StatusOr<PriceCatalogue> c = load_price_catalogue(catalogue);
  REQUIRE(c.ok());
  CHECK(c->entries == 12);
  CHECK(c->table.size() == 2);
  CHECK(c->rejected() == 10);
  const Prices g = c->table.prices("gpt-4o", {}).value();
  CHECK(g.base.input == TokenPrice{2'500'000'000});
  CHECK(g.base.output == TokenPrice{10'000'000'000});  // not $1,000, not 0
  CHECK(g.base.cache_read == TokenPrice{1'250'000'000});
  CHECK(g.bands.empty());
  const Prices after = c->table.prices("ok-after", {}).value();
  CHECK(after.base.output == TokenPrice{2'000'000'000});
  CHECK(has_issue(*c, "ok-after", "output_cost_per_image",
                  CatalogueIssue::Kind::kNotPriced));
  for (const char* m : {"notes", "arr", "obj", "str", "neg", "fine", "dup",
                        "hit", "deep", "scalar"}) {
    CAPTURE(m);
    CHECK_FALSE(c->table.contains(m));
    const auto issues = c->issues_for(m);
    REQUIRE(issues.size() == 1);
    CHECK(issues[0].kind == CatalogueIssue::Kind::kRejected);
  }
  CHECK(c->issues_for("notes")[0].reason.find("array") != std::string::npos);
  CHECK(c->issues_for("arr")[0].field == "input_cost_per_token");
  CHECK(c->issues_for("deep")[0].reason.find("array") != std::string::npos);
  CHECK(c->issues_for("fine")[0].reason.find("1e-15") != std::string::npos);

  // A model named twice is ambiguous: rejected, once.
  const auto twice = load_price_catalogue(
      R"({"m": {"input_cost_per_token": 1e-06},
          "m": {"input_cost_per_token": 1e-03}})");
  REQUIRE(twice.ok());
  CHECK(twice->entries == 1);
  CHECK(twice->rejected() == 1);
  CHECK_FALSE(twice->table.contains("m"));

  // Only a document that is not a JSON object fails as a whole.
  // A NUL byte: nlohmann would stop there and drop the rest (fuzzing found
  // `"fuzzed": 1}\0...` losing every later entry).
  const std::string nul("{\"a\": 1}\0, \"b\": {\"input_cost_per_token\": 1}}",
                        44);
  for (const std::string& bad :
       {std::string(""), std::string("[]"), std::string("{"), std::string("7"),
        std::string("\"x\""), std::string("{\"m\": {}} trailing"), nul}) {
    CAPTURE(bad);
    const auto r = load_price_catalogue(bad);
    REQUIRE_FALSE(r.ok());
    CHECK(r.status().code() == absl::StatusCode::kInvalidArgument);
  }
  const auto empty = load_price_catalogue("{}");
  REQUIRE(empty.ok());
  CHECK(empty->entries == 0);
}

TEST_CASE("bands a caller writes: carry-over and refusals", "[i14][prices]") {
  PriceTable t;
  // A standard band from 0 is `base`; two bands of a tier from one size
  // are ambiguous.
  CHECK_FALSE(t.set("x", {.bands = {{.from_input = 0}}}).ok());
  CHECK_FALSE(t.set("x", {.bands = {{.tier = ServiceTier::kFlex},
                                    {.tier = ServiceTier::kFlex}}})
                  .ok());
  // reasoning + audio above output does not hold together.
  const Prices p{
      .base = {.input = per_m(1'000'000), .output = per_m(1'000'000)}};
  CHECK(PriceTable::cost(p, {.output = 1, .reasoning = 2}).status().code() ==
        absl::StatusCode::kInvalidArgument);
  CHECK(PriceTable::cost(p, {.output = 3, .reasoning = 2, .output_audio = 2})
            .status()
            .code() == absl::StatusCode::kInvalidArgument);
  // max_output_within prices added output at the dearest output-side price:
  // reasoning at $4/M beside output at $1/M: $1 covers 250,000 tokens.
  const Prices r{.base = {.input = per_m(1'000'000),
                          .output = per_m(1'000'000),
                          .reasoning = per_m(4'000'000)}};
  CHECK(PriceTable::max_output_within(r, {}, Money::usd(1)) == 250'000u);
  CHECK(PriceTable::max_output_within(p, {}, Money::usd(1)) == 1'000'000u);
}
