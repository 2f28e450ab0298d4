// ratekeeper/budget/prices.hpp: what a call costs, by model and by date.
//
// Defines TokenPrices (per-token prices of one price list: input, cache
// read, cache write 5m and 1h, output, reasoning, audio in, cached audio,
// audio out; each may be left unset and then falls back, see below),
// PriceBand (the prices of a service tier from a total input size on: a
// long-context cliff, a priority/flex/batch list, or both), Prices (a
// model's standard prices, its bands and its per-search prices, from a
// date on) and PriceTable (prices per model with effective dates, so that a
// call is priced by its own time; an optional default for unknown models).
//
//   PriceTable table;
//   table.set("gpt-4o",
//             {.base = {.input = TokenPrice::per_million_micros(2'500'000),
//                       .cache_read =
//                       TokenPrice::per_million_micros(1'250'000), .output =
//                       TokenPrice::per_million_micros(10'000'000)}});
//   absl::StatusOr<Money> c = table.cost("gpt-4o", usage, call_time);
//
// Load LiteLLM's price file with ratekeeper/budget/catalogue.hpp.
#ifndef RATEKEEPER_BUDGET_PRICES_HPP_
#define RATEKEEPER_BUDGET_PRICES_HPP_

#include <algorithm>
#include <array>
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

// TokenPrices: one price per kind of token; unset means "not listed", and
// an explicit zero is a price of zero. In Prices::base an unset price falls
// back to a related one: cache read and 5-minute write to the input price
// (a provider without a discount bills cached input as input), the 1-hour
// write to the 5-minute one, reasoning and audio out to the output price,
// audio in to the input price and cached audio to the cache-read price;
// input and output themselves to zero. In a PriceBand, an unset price is
// carried over (see PriceTable::resolve).
struct TokenPrices {
  std::optional<TokenPrice> input{};
  std::optional<TokenPrice> cache_read{};
  std::optional<TokenPrice> cache_write_5m{};
  std::optional<TokenPrice> cache_write_1h{};
  std::optional<TokenPrice> output{};
  std::optional<TokenPrice> reasoning{};
  std::optional<TokenPrice> input_audio{};
  std::optional<TokenPrice> cache_read_audio{};
  std::optional<TokenPrice> output_audio{};
  friend constexpr bool operator==(const TokenPrices&,
                                   const TokenPrices&) = default;
};

// PriceBand: the prices of `tier` for a call whose total input
// (Usage::input_total) is at least `from_input`: `above_200k_tokens` is
// from 200,001, a `tiered_pricing` range [256000, ...] from 256,000. The
// band whose from_input is the largest that the call reaches bills every
// token of the call (a cliff, as the providers bill long context). The
// standard tier from 0 is Prices::base, not a band.
struct PriceBand {
  ServiceTier tier = ServiceTier::kStandard;
  std::uint64_t from_input = 0;
  TokenPrices prices{};
  friend bool operator==(const PriceBand&, const PriceBand&) = default;
};

// WebSearchPrices: USD per search (as femto-USD, the TokenPrice unit) by
// the search's context size. Unset: the model has no search price, and a
// usage with searches is refused rather than billed as free.
struct WebSearchPrices {
  std::optional<TokenPrice> low{};
  std::optional<TokenPrice> medium{};
  std::optional<TokenPrice> high{};
  friend constexpr bool operator==(const WebSearchPrices&,
                                   const WebSearchPrices&) = default;
};

// Prices: a model's prices from `effective_from` on.
struct Prices {
  TokenPrices base{};              // the standard tier, every call
  std::vector<PriceBand> bands{};  // cliffs and service tiers
  WebSearchPrices web_search{};
  SysTime effective_from{};
  friend bool operator==(const Prices&, const Prices&) = default;
};

// ResolvedPrices: every price of one call, fallbacks applied (femto-USD).
struct ResolvedPrices {
  std::uint64_t input = 0, cache_read = 0, cache_write_5m = 0,
                cache_write_1h = 0, output = 0, reasoning = 0, input_audio = 0,
                cache_read_audio = 0, output_audio = 0;
  friend constexpr bool operator==(const ResolvedPrices&,
                                   const ResolvedPrices&) = default;
};

namespace detail {

using PriceField = std::optional<TokenPrice> TokenPrices::*;

// The fields in resolution order: a fallback names an earlier field.
inline constexpr std::array<PriceField, 9> kPriceFields = {
    &TokenPrices::input,          &TokenPrices::output,
    &TokenPrices::cache_read,     &TokenPrices::cache_write_5m,
    &TokenPrices::cache_write_1h, &TokenPrices::reasoning,
    &TokenPrices::input_audio,    &TokenPrices::cache_read_audio,
    &TokenPrices::output_audio};
inline constexpr std::array<std::uint64_t ResolvedPrices::*, 9>
    kResolvedFields = {
        &ResolvedPrices::input,          &ResolvedPrices::output,
        &ResolvedPrices::cache_read,     &ResolvedPrices::cache_write_5m,
        &ResolvedPrices::cache_write_1h, &ResolvedPrices::reasoning,
        &ResolvedPrices::input_audio,    &ResolvedPrices::cache_read_audio,
        &ResolvedPrices::output_audio};
// Index of the field each falls back to when unset everywhere (-1: zero).
inline constexpr std::array<int, 9> kFallback = {-1, -1, 0, 0, 3, 1, 0, 2, 1};

// What one tier lists for a call of total input `t`, in one pass over its
// bands: the furthest band the call reaches (`top_from`) and, per field,
// the furthest band that lists it.
struct TierScan {
  bool any = false;
  std::uint64_t top_from = 0;
  std::array<std::optional<std::uint64_t>, 9> best{};
  std::array<std::uint64_t, 9> best_from{};
};

inline TierScan scan_tier(const Prices& p, ServiceTier s, std::uint64_t t) {
  TierScan c;
  auto consider = [&](const TokenPrices& tp, std::uint64_t from) {
    if (from > t) return;
    if (!c.any || from > c.top_from) c.top_from = from;
    c.any = true;
    for (std::size_t i = 0; i < kPriceFields.size(); ++i) {
      const std::optional<TokenPrice>& v = tp.*kPriceFields[i];
      if (v && (!c.best[i] || from > c.best_from[i])) {
        c.best[i] = v->femtos;
        c.best_from[i] = from;
      }
    }
  };
  if (s == ServiceTier::kStandard) consider(p.base, 0);
  for (const PriceBand& b : p.bands) {
    if (b.tier == s) consider(b.prices, b.from_input);
  }
  return c;
}

// Exact cost of `u` at `r`, in femto-USD; nullopt when the usage does not
// hold together (reasoning + audio out above output).
inline std::optional<u128> femtos_at(const ResolvedPrices& r, const Usage& u) {
  if (u.reasoning > u.output || u.output_audio > u.output - u.reasoning) {
    return std::nullopt;
  }
  const std::uint64_t text_out = u.output - u.reasoning - u.output_audio;
  return static_cast<u128>(u.input_uncached) * r.input +
         static_cast<u128>(u.cache_read) * r.cache_read +
         static_cast<u128>(u.cache_write_5m) * r.cache_write_5m +
         static_cast<u128>(u.cache_write_1h) * r.cache_write_1h +
         static_cast<u128>(u.input_audio) * r.input_audio +
         static_cast<u128>(u.cache_read_audio) * r.cache_read_audio +
         static_cast<u128>(text_out) * r.output +
         static_cast<u128>(u.reasoning) * r.reasoning +
         static_cast<u128>(u.output_audio) * r.output_audio;
}

inline absl::StatusOr<Money> round_up_to_nanos(u128 femtos) {
  const u128 nanos = femtos / 1'000'000 + (femtos % 1'000'000 != 0 ? 1 : 0);
  if (nanos > static_cast<u128>(kI64Max)) {
    return absl::OutOfRangeError("cost above 9.2e9 USD: not a real call");
  }
  return Money{static_cast<std::int64_t>(nanos)};
}

inline absl::Status bad_usage() {
  return absl::InvalidArgumentError(
      "usage is inconsistent: reasoning + output_audio > output");
}

}  // namespace detail

// PriceTable: prices per model and date. Not thread-safe to change while
// read: build it, then share it const (or swap a shared_ptr).
class PriceTable {
 public:
  // set
  //
  // Adds prices for `model` from `p.effective_from` on (replacing prices
  // with the same date). kInvalidArgument for an empty model name, a price
  // above kMaxFemtosPerToken, a standard band from 0 (that is `base`) or
  // two bands of one tier from the same size.
  absl::Status set(std::string_view model, const Prices& p) {
    if (model.empty()) {
      return absl::InvalidArgumentError("price table: empty model name");
    }
    auto too_high = [&] {
      return absl::InvalidArgumentError(
          absl::StrCat("price table: ", detail::av(model),
                       ": a price above $1,000 per "
                       "token or search"));
    };
    auto check = [&](const TokenPrices& tp) {
      for (const detail::PriceField f : detail::kPriceFields) {
        if ((tp.*f) && (tp.*f)->femtos > kMaxFemtosPerToken) return false;
      }
      return true;
    };
    if (!check(p.base)) return too_high();
    for (const auto& w :
         {p.web_search.low, p.web_search.medium, p.web_search.high}) {
      if (w && w->femtos > kMaxFemtosPerToken) return too_high();
    }
    for (std::size_t i = 0; i < p.bands.size(); ++i) {
      const PriceBand& b = p.bands[i];
      if (!check(b.prices)) return too_high();
      if (static_cast<std::size_t>(b.tier) >= kServiceTiers) {
        return absl::InvalidArgumentError(absl::StrCat(
            "price table: ", detail::av(model), ": unknown service tier"));
      }
      if (b.tier == ServiceTier::kStandard && b.from_input == 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("price table: ", detail::av(model),
                         ": a standard band from 0 tokens is `base`"));
      }
      for (std::size_t j = 0; j < i; ++j) {
        if (p.bands[j].tier == b.tier &&
            p.bands[j].from_input == b.from_input) {
          return absl::InvalidArgumentError(
              absl::StrCat("price table: ", detail::av(model), ": two ",
                           detail::av(service_tier_name(b.tier)),
                           " bands from ", b.from_input, " tokens"));
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
  // What `u` costs on `model` at `at`: every kind of token at its price for
  // the call's service tier and total input (resolve), plus its web
  // searches at the price of their context size, summed exactly, rounded up
  // to the nano-USD once. kInvalidArgument when reasoning + output_audio
  // exceed output; kNotFound for searches on a model without a search
  // price (never free).
  absl::StatusOr<Money> cost(std::string_view model, const Usage& u,
                             SysTime at) const {
    absl::StatusOr<Prices> p = prices(model, at);
    if (!p.ok()) return p.status();
    return cost(*p, u);
  }

  static absl::StatusOr<Money> cost(const Prices& p, const Usage& u) {
    absl::StatusOr<detail::u128> f =
        femtos(p, resolve(p, u.service_tier, u.input_total()), u);
    if (!f.ok()) return f.status();
    return detail::round_up_to_nanos(*f);
  }

  // resolve
  //
  // The prices a call of tier `tier` with `input_total` input tokens pays.
  // Each price is the one listed by the band of that tier that the call
  // reaches furthest (the standard tier's bands include `base` from 0).
  // Where that band does not list it: for the standard tier, the nearest
  // lower band that does (a cliff lists only what changes); for another
  // tier, the higher of its own nearest lower band's and the standard
  // tier's price at this size (a tier with no bands at all bills standard
  // prices). The same maximum when the standard tier has a cliff that the
  // call passes and the tier has none that far (gpt-5.4 flex lists no
  // long-context price: a flex call above 272k pays at least standard's),
  // so an unlisted price is never guessed low. Listed nowhere: the
  // fallbacks of TokenPrices, resolved at the same tier and size.
  static ResolvedPrices resolve(const Prices& p, ServiceTier tier,
                                std::uint64_t input_total) {
    const detail::TierScan st =
        detail::scan_tier(p, ServiceTier::kStandard, input_total);
    const detail::TierScan tc = tier == ServiceTier::kStandard
                                    ? st
                                    : detail::scan_tier(p, tier, input_total);
    ResolvedPrices r;
    for (std::size_t i = 0; i < detail::kPriceFields.size(); ++i) {
      std::optional<std::uint64_t> v;
      if (tier == ServiceTier::kStandard) {
        v = st.best[i];  // the nearest band at or below that lists it
      } else if (tc.best[i] && tc.best_from[i] == tc.top_from &&
                 tc.top_from >= st.top_from) {
        v = tc.best[i];  // listed by the tier where the call lands
      } else {
        // Not listed there, or the standard tier has a cliff further on
        // that the tier does not mirror: never below either reading.
        v = st.best[i];
        if (tc.best[i]) v = std::max(v.value_or(0), *tc.best[i]);
      }
      const int fb = detail::kFallback[i];
      r.*detail::kResolvedFields[i] =
          v        ? *v
          : fb < 0 ? 0
                   : r.*detail::kResolvedFields[static_cast<std::size_t>(fb)];
    }
    return r;
  }

  // max_output_within
  //
  // The largest n such that `u` with n more output tokens costs at most
  // `budget` (exactly: the cost's rounding included), each added token at
  // the highest output-side price of the call (output, reasoning, audio
  // out: a worst case), capped so that the output stays within
  // kMaxUsageTokens; nullopt when `u` alone costs more (or does not hold
  // together). Output does not move a call across a band (bands count
  // input), so the cost is linear in n and this is one division.
  static std::optional<std::uint64_t> max_output_within(const Prices& p,
                                                        const Usage& u,
                                                        Money budget) {
    if (budget.nanos < 0) return std::nullopt;
    const ResolvedPrices r = resolve(p, u.service_tier, u.input_total());
    const absl::StatusOr<detail::u128> spent = femtos(p, r, u);
    if (!spent.ok()) return std::nullopt;
    // cost = ceil(femtos / 10^6) <= budget  <=>  femtos <= budget * 10^6.
    const detail::u128 cap =
        static_cast<detail::u128>(budget.nanos) * 1'000'000;
    if (*spent > cap) return std::nullopt;
    const std::uint64_t room =
        u.output >= kMaxUsageTokens ? 0 : kMaxUsageTokens - u.output;
    const std::uint64_t per = std::max({r.output, r.reasoning, r.output_audio});
    if (per == 0) return room;
    const detail::u128 n = (cap - *spent) / per;
    return n > room ? room : static_cast<std::uint64_t>(n);
  }

  bool contains(std::string_view model) const {
    return models_.contains(detail::av(model));
  }
  std::size_t size() const { return models_.size(); }

 private:
  // The exact cost of `u` at `r`, its searches included, in femto-USD.
  static absl::StatusOr<detail::u128> femtos(const Prices& p,
                                             const ResolvedPrices& r,
                                             const Usage& u) {
    const std::optional<detail::u128> tokens = detail::femtos_at(r, u);
    if (!tokens) return detail::bad_usage();
    if (u.web_search_requests == 0) return *tokens;
    const std::optional<TokenPrice>& w =
        u.search_context == SearchContextSize::kLow    ? p.web_search.low
        : u.search_context == SearchContextSize::kHigh ? p.web_search.high
                                                       : p.web_search.medium;
    if (!w) {
      return absl::NotFoundError(
          absl::StrCat("no web search price for ", u.web_search_requests,
                       " searches: refusing to charge them as free"));
    }
    return *tokens +
           static_cast<detail::u128>(u.web_search_requests) * w->femtos;
  }

  absl::flat_hash_map<std::string, std::vector<Prices>> models_;
  std::optional<Prices> default_;
};

}  // namespace ratekeeper

#endif  // RATEKEEPER_BUDGET_PRICES_HPP_
