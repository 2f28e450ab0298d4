// ratekeeper/budget/prices.hpp: what a call costs, by model and by date.
//
// Defines Prices (per-token prices of one model: input, cache read, cache
// write 5m and 1h, output, and an optional cliff tier that bills the whole
// call at other prices past a total-input threshold), and PriceTable (prices
// per model with effective dates, so that a call is priced by its own
// time; an optional default for unknown models).
//
//   PriceTable table;
//   table.set("gpt-4o",
//             {.base = {.input = TokenPrice::per_million_micros(2'500'000),
//                       .cache_read =
//                       TokenPrice::per_million_micros(1'250'000), .output =
//                       TokenPrice::per_million_micros(10'000'000)}});
//   absl::StatusOr<Money> c = table.cost("gpt-4o", usage, call_time);
//
// Load the open catalogue's JSON with ratekeeper/budget/json.hpp.
#ifndef RATEKEEPER_BUDGET_PRICES_HPP_
#define RATEKEEPER_BUDGET_PRICES_HPP_

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "ratekeeper/budget/money.hpp"
#include "ratekeeper/budget/usage.hpp"
#include "ratekeeper/detail/math.hpp"
#include "ratekeeper/detail/strings.hpp"

namespace ratekeeper {

using SysTime = std::chrono::system_clock::time_point;

// TokenPrices: one price per kind of token. A cache price left at zero is
// taken as the input price (a provider without a discount bills cached
// input as input): see Prices::effective().
struct TokenPrices {
  TokenPrice input{};
  TokenPrice cache_read{};
  TokenPrice cache_write_5m{};
  TokenPrice cache_write_1h{};
  TokenPrice output{};
  friend constexpr bool operator==(const TokenPrices&,
                                   const TokenPrices&) = default;
};

// Prices: a model's prices from `effective_from` on.
//
//   cliff_above  0: no cliff. Else a call whose total input (uncached, cache
//                read and writes) is above it is billed, every token of it,
//                at `cliff`.
struct Prices {
  TokenPrices base{};
  std::uint64_t cliff_above = 0;
  TokenPrices cliff{};
  SysTime effective_from{};
};

namespace detail {

// Exact cost of `u` at `p`, rounded up to the nano-USD once.
inline absl::StatusOr<Money> cost_at(const TokenPrices& p, const Usage& u) {
  const u128 femtos =
      static_cast<u128>(u.input_uncached) * p.input.femtos +
      static_cast<u128>(u.cache_read) * p.cache_read.femtos +
      static_cast<u128>(u.cache_write_5m) * p.cache_write_5m.femtos +
      static_cast<u128>(u.cache_write_1h) * p.cache_write_1h.femtos +
      static_cast<u128>(u.output) * p.output.femtos;
  const u128 nanos = femtos / 1'000'000 + (femtos % 1'000'000 != 0 ? 1 : 0);
  if (nanos > static_cast<u128>(kI64Max)) {
    return absl::OutOfRangeError("cost above 9.2e9 USD: not a real call");
  }
  return Money{static_cast<std::int64_t>(nanos)};
}

}  // namespace detail

// PriceTable: prices per model and date. Not thread-safe to change while
// read: build it, then share it const (or swap a shared_ptr).
class PriceTable {
 public:
  // set
  //
  // Adds prices for `model` from `p.effective_from` on (replacing prices
  // with the same date). kInvalidArgument for an empty model name or a
  // price above kMaxFemtosPerToken.
  absl::Status set(std::string_view model, const Prices& p) {
    if (model.empty()) {
      return absl::InvalidArgumentError("price table: empty model name");
    }
    for (const TokenPrices& tp : {p.base, p.cliff}) {
      for (const TokenPrice t : {tp.input, tp.cache_read, tp.cache_write_5m,
                                 tp.cache_write_1h, tp.output}) {
        if (t.femtos > kMaxFemtosPerToken) {
          return absl::InvalidArgumentError(
              absl::StrCat("price table: ", detail::av(model),
                           ": a price above $1,000 per "
                           "token"));
        }
      }
    }
    auto& list = models_[std::string(model)];
    const auto it = std::find_if(
        list.begin(), list.end(),
        [&](const Prices& q) { return q.effective_from == p.effective_from; });
    if (it != list.end()) {
      *it = p;
    } else {
      list.push_back(p);
      std::sort(list.begin(), list.end(), [](const Prices& a, const Prices& b) {
        return a.effective_from < b.effective_from;
      });
    }
    return absl::OkStatus();
  }

  // set_default
  //
  // Prices for models the table does not know. Without one, an unknown model
  // is kNotFound: never a silent zero.
  void set_default(const Prices& p) { default_ = p; }

  // prices
  //
  // The prices of `model` in force at `at`: the latest whose effective_from
  // is not after it. kNotFound when the model is unknown (and there is no
  // default) or has no prices yet at `at`.
  absl::StatusOr<Prices> prices(std::string_view model, SysTime at) const {
    const auto it = models_.find(detail::av(model));
    if (it == models_.end()) {
      if (default_) return *default_;
      return absl::NotFoundError(absl::StrCat(
          "no price for model \"", detail::av(model),
          "\" and no default price: refusing to charge it as free"));
    }
    const std::vector<Prices>& list = it->second;
    const Prices* found = nullptr;
    for (const Prices& p : list) {
      if (p.effective_from <= at) found = &p;
    }
    if (found == nullptr) {
      return absl::NotFoundError(
          absl::StrCat("model \"", detail::av(model),
                       "\" has no price in force at that "
                       "time (its first takes effect later)"));
    }
    return *found;
  }

  // cost
  //
  // What `u` costs on `model` at `at`: every kind of token at its price (the
  // cliff prices for all of them when total input is above the cliff),
  // summed exactly, rounded up to the nano-USD.
  absl::StatusOr<Money> cost(std::string_view model, const Usage& u,
                             SysTime at) const {
    absl::StatusOr<Prices> p = prices(model, at);
    if (!p.ok()) return p.status();
    return cost(*p, u);
  }

  static absl::StatusOr<Money> cost(const Prices& p, const Usage& u) {
    const bool cliff = p.cliff_above != 0 && u.input_total() > p.cliff_above;
    return detail::cost_at(effective(cliff ? p.cliff : p.base), u);
  }

  // max_output_within
  //
  // The largest n such that `u` with n more output tokens costs at most
  // `budget` (exactly: the cost's rounding included), capped so that the
  // output stays within kMaxUsageTokens; nullopt when `u` alone costs more.
  // Output does not move a call across a cliff (cliffs count input), so the
  // cost is linear in n and this is one division.
  static std::optional<std::uint64_t> max_output_within(const Prices& p,
                                                        const Usage& u,
                                                        Money budget) {
    const bool cliff = p.cliff_above != 0 && u.input_total() > p.cliff_above;
    const TokenPrices t = effective(cliff ? p.cliff : p.base);
    const detail::u128 spent =
        static_cast<detail::u128>(u.input_uncached) * t.input.femtos +
        static_cast<detail::u128>(u.cache_read) * t.cache_read.femtos +
        static_cast<detail::u128>(u.cache_write_5m) * t.cache_write_5m.femtos +
        static_cast<detail::u128>(u.cache_write_1h) * t.cache_write_1h.femtos +
        static_cast<detail::u128>(u.output) * t.output.femtos;
    if (budget.nanos < 0) return std::nullopt;
    // cost = ceil(femtos / 10^6) <= budget  <=>  femtos <= budget * 10^6.
    const detail::u128 cap =
        static_cast<detail::u128>(budget.nanos) * 1'000'000;
    if (spent > cap) return std::nullopt;
    const std::uint64_t room =
        u.output >= kMaxUsageTokens ? 0 : kMaxUsageTokens - u.output;
    if (t.output.femtos == 0) return room;
    const detail::u128 n = (cap - spent) / t.output.femtos;
    return n > room ? room : static_cast<std::uint64_t>(n);
  }

  // Cache prices left at zero bill as input (a provider without a cache
  // discount); a zero 1h write price bills as the 5m one.
  static TokenPrices effective(TokenPrices t) {
    if (t.cache_read.femtos == 0) t.cache_read = t.input;
    if (t.cache_write_5m.femtos == 0) t.cache_write_5m = t.input;
    if (t.cache_write_1h.femtos == 0) t.cache_write_1h = t.cache_write_5m;
    return t;
  }

  bool contains(std::string_view model) const {
    return models_.contains(detail::av(model));
  }
  std::size_t size() const { return models_.size(); }

 private:
  absl::flat_hash_map<std::string, std::vector<Prices>> models_;
  std::optional<Prices> default_;
};

}  // namespace ratekeeper

#endif  // RATEKEEPER_BUDGET_PRICES_HPP_
