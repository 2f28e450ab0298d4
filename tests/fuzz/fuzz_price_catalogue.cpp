// libFuzzer target (TESTPLAN T8): the price catalogue loader and the exact
// decimal price parser, checked for what they read, not only for crashes.
//
// 1. The input as a price: an accepted decimal is exact (printing it back
//    as femtos and parsing "<femtos>e-15" gives the same value); with float
//    noise rounding, the result is the strict one when that exists, else
//    rounded up by less than one femto-USD and flagged.
// 2. The input as a whole file: refused only with kInvalidArgument; loaded,
//    every entry is in the table or rejected in the report, never both,
//    never neither.
// 3. The input as the entry between two known ones (gpt-4o before, a
//    claude entry after): whatever it holds, the known entries' prices are
//    exactly those written, or (when the input names one of them again or
//    breaks the JSON) the entry is reported or the file refused: never
//    another price.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "ratekeeper/budget/catalogue.hpp"

namespace rk = ratekeeper;

namespace {
void check(bool ok) {
  if (!ok) std::abort();
}

constexpr std::string_view kBefore =
    R"({"gpt-4o": {"input_cost_per_token": 2.5e-06,
  "output_cost_per_token": 1e-05, "cache_read_input_token_cost": 1.25e-06,
  "input_cost_per_token_priority": 4.25e-06, "notes": [1]},
  "fuzzed": )";
constexpr std::string_view kAfter = R"(,
  "claude-after": {"input_cost_per_token": 3e-06, "output_cost_per_token": 1.5e-05,
  "cache_creation_input_token_cost_above_1hr_above_200k_tokens": 1.2e-05}})";

void check_report(const rk::PriceCatalogue& c) {
  check(c.table.size() + c.rejected() == c.entries);
  for (const rk::CatalogueIssue& i : c.issues) {
    if (i.kind == rk::CatalogueIssue::Kind::kRejected) {
      check(!c.table.contains(i.model));
    }
  }
}

bool rejected(const rk::PriceCatalogue& c, std::string_view model) {
  for (const rk::CatalogueIssue& i : c.issues) {
    if (i.model == model && i.kind == rk::CatalogueIssue::Kind::kRejected) {
      return true;
    }
  }
  return false;
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data,
                                      std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);

  // 1. As a price.
  const auto strict = rk::parse_usd_per_token(text);
  const auto noisy = rk::parse_usd_per_token_rounding_noise(text);
  if (strict.ok()) {
    check(strict->femtos <= rk::kMaxFemtosPerToken);
    const auto back =
        rk::parse_usd_per_token(std::to_string(strict->femtos) + "e-15");
    check(back.ok() && back->femtos == strict->femtos);
    check(noisy.ok() && noisy->price == *strict && !noisy->rounded_up);
  } else if (noisy.ok()) {
    // Rounded: above the exact value by less than one femto-USD, so the
    // femto below it is strictly under the value (its text, with more
    // digits, does not parse exactly) and the result is at least 1.
    check(noisy->rounded_up && noisy->price.femtos >= 1);
    check(noisy->price.femtos <= rk::kMaxFemtosPerToken);
  }

  // 2. As a whole file.
  if (const auto whole = rk::load_price_catalogue(text); whole.ok()) {
    check_report(*whole);
  } else {
    check(whole.status().code() == absl::StatusCode::kInvalidArgument);
  }

  // 3. As the entry between two known ones.
  std::string file(kBefore);
  file.append(text);
  file.append(kAfter);
  const auto c = rk::load_price_catalogue(file);
  if (!c.ok()) {
    check(c.status().code() == absl::StatusCode::kInvalidArgument);
    return 0;
  }
  check_report(*c);
  if (c->table.contains("gpt-4o")) {
    const rk::Prices p = c->table.prices("gpt-4o", {}).value();
    check(p.base.input == rk::TokenPrice{2'500'000'000});
    check(p.base.output == rk::TokenPrice{10'000'000'000});
    check(p.base.cache_read == rk::TokenPrice{1'250'000'000});
    check(p.bands.size() == 1 &&
          p.bands[0].tier == rk::ServiceTier::kPriority &&
          p.bands[0].prices.input == rk::TokenPrice{4'250'000'000});
    // $0.01 as the hand computes it: 1000*2.5e-6 + 2000*1.25e-6 + 500*1e-5.
    check(c->table
              .cost("gpt-4o",
                    {.input_uncached = 1000, .cache_read = 2000, .output = 500},
                    {})
              .value() == rk::Money{10'000'000});
  } else {
    check(rejected(*c, "gpt-4o"));  // named twice by the input
  }
  if (c->table.contains("claude-after")) {
    const rk::Prices p = c->table.prices("claude-after", {}).value();
    check(p.base.input == rk::TokenPrice{3'000'000'000});
    check(p.base.output == rk::TokenPrice{15'000'000'000});
    check(p.bands.size() == 1 && p.bands[0].from_input == 200'001 &&
          p.bands[0].prices.cache_write_1h == rk::TokenPrice{12'000'000'000});
  } else {
    // The input closed the document early (then it is not well-formed
    // after all) or named the model again.
    check(rejected(*c, "claude-after"));
  }
  return 0;
}
