// A price table for tests whose money is easy to compute by hand.
#ifndef RATEKEEPER_TESTS_TEST_PRICES_HPP_
#define RATEKEEPER_TESTS_TEST_PRICES_HPP_

#include "ratekeeper/budget/prices.hpp"

namespace rk_test {

// Model "m": one token of input or output costs exactly 1 micro-USD
// (1,000 nano-USD).
inline ratekeeper::PriceTable flat_prices() {
  ratekeeper::PriceTable t;
  const auto p = ratekeeper::TokenPrice::per_million_micros(1'000'000);
  t.set("m", {.base = {.input = p, .output = p}}).IgnoreError();
  return t;
}

}  // namespace rk_test

#endif  // RATEKEEPER_TESTS_TEST_PRICES_HPP_
