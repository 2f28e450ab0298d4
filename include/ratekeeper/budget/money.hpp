// ratekeeper/budget/money.hpp: money as integers, never floats.
//
// Defines Money (a count of nano-USD, 1e-9 USD, in 64 bits: up to about
// 9.2e9 USD), TokenPrice (a price per token in femto-USD, 1e-15 USD: every
// price in the providers' lists, written as USD per token, is a whole
// number of femto-USD), and parse_usd_per_token, which reads such a price
// from its decimal text exactly ("1.5e-07", "0.000003"), with no detour
// through double.
//
// Costs are summed exactly in 128 bits and rounded up to the nano-USD once,
// at the end: never in the favour of whoever is being charged less than the
// provider will bill. The worst case is under 1 nano-USD per call.
#ifndef RATEKEEPER_BUDGET_MONEY_HPP_
#define RATEKEEPER_BUDGET_MONEY_HPP_

#include <compare>
#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "ratekeeper/detail/math.hpp"
#include "ratekeeper/detail/strings.hpp"

namespace ratekeeper {

// Money: nano-USD. Plain value type; arithmetic is the caller's (sums of
// real costs stay far from 2^63).
struct Money {
  std::int64_t nanos = 0;

  static constexpr Money usd(std::int64_t dollars) noexcept {
    return Money{dollars * 1'000'000'000};
  }
  static constexpr Money cents(std::int64_t c) noexcept {
    return Money{c * 10'000'000};
  }

  constexpr Money& operator+=(Money o) noexcept {
    nanos += o.nanos;
    return *this;
  }
  constexpr Money& operator-=(Money o) noexcept {
    nanos -= o.nanos;
    return *this;
  }
  friend constexpr Money operator+(Money a, Money b) noexcept { return a += b; }
  friend constexpr Money operator-(Money a, Money b) noexcept { return a -= b; }
  friend constexpr auto operator<=>(Money, Money) = default;

  // "$1.500000000", "-$0.000000001": every digit, for ledgers and reports.
  std::string to_string() const {
    const bool neg = nanos < 0;
    const std::uint64_t mag = neg ? 0 - static_cast<std::uint64_t>(nanos)
                                  : static_cast<std::uint64_t>(nanos);
    std::string frac = std::to_string(mag % 1'000'000'000);
    frac.insert(0, 9 - frac.size(), '0');
    return absl::StrCat(neg ? "-$" : "$", mag / 1'000'000'000, ".", frac);
  }
};

// TokenPrice: femto-USD per token. $3 per million tokens (3e-6 USD per
// token) is 3,000,000,000.
struct TokenPrice {
  std::uint64_t femtos = 0;

  // A price per million tokens in micro-USD: per_million_micros(3'000'000)
  // is $3 per million tokens, per_million_micros(37'500) $0.0375.
  static constexpr TokenPrice per_million_micros(std::uint64_t micro_usd) {
    return TokenPrice{micro_usd * 1000};
  }
  friend constexpr auto operator<=>(TokenPrice, TokenPrice) = default;
};

// Largest price accepted: $1,000 per token (no model is within a million
// times of it), which keeps every product of a cost inside 128 bits.
inline constexpr std::uint64_t kMaxFemtosPerToken = 1'000'000'000'000'000'000;

// ParsedPrice: a price read from a catalogue, and whether it was rounded.
struct ParsedPrice {
  TokenPrice price{};
  bool rounded_up = false;  // float noise, rounded up to the femto-USD
};

// Significant digits above which a decimal is float noise: the shortest text
// of a binary double has up to 17 (2.9999900000000002e-06 is 2.99999e-06
// as a double prints it), a price set by a person 15 at most.
inline constexpr int kFloatNoiseDigits = 15;

namespace detail {

inline absl::StatusOr<ParsedPrice> parse_usd(std::string_view text,
                                             bool round_noise) {
  auto bad = [&](std::string_view why) {
    return absl::InvalidArgumentError(absl::StrCat(
        "price \"", absl::CHexEscape(detail::av(text.substr(0, 64))),
        "\" (USD per token): ", detail::av(why)));
  };
  std::size_t i = 0;
  // Digits before and after the point, as one integer and a scale.
  detail::u128 digits = 0;
  int scale = 0;  // value = digits * 10^-scale
  int significant = 0;
  bool any = false, point = false;
  for (; i < text.size(); ++i) {
    const char c = text[i];
    if (c >= '0' && c <= '9') {
      any = true;
      if (digits != 0 || c != '0') ++significant;
      if (significant > 30) return bad("too many digits");
      digits = digits * 10 + static_cast<unsigned>(c - '0');
      if (point) ++scale;
    } else if (c == '.' && !point) {
      point = true;
    } else {
      break;
    }
  }
  if (!any) return bad("not a decimal number");
  long exponent = 0;
  if (i < text.size() && (text[i] == 'e' || text[i] == 'E')) {
    ++i;
    bool neg = false;
    if (i < text.size() && (text[i] == '+' || text[i] == '-')) {
      neg = text[i] == '-';
      ++i;
    }
    if (i == text.size()) return bad("an exponent without digits");
    for (; i < text.size(); ++i) {
      const char c = text[i];
      if (c < '0' || c > '9') return bad("not a decimal number");
      exponent = exponent * 10 + (c - '0');
      if (exponent > 400) return bad("exponent out of range");
    }
    if (neg) exponent = -exponent;
  }
  if (i != text.size()) return bad("not a decimal number");
  if (digits == 0) return ParsedPrice{};
  // femtos = digits * 10^(15 - scale + exponent)
  long shift = 15 - scale + exponent;
  bool rounded = false;
  if (shift < 0) {
    // Finer than a femto-USD. Float noise rounds up (never in favour of the
    // party billed less than the provider bills); any other such price is
    // one ratekeeper cannot charge exactly.
    bool exact = true;
    for (; shift < 0 && digits != 0; ++shift) {
      if (digits % 10 != 0) exact = false;
      digits /= 10;
    }
    if (!exact) {
      if (!round_noise || significant <= kFloatNoiseDigits) {
        return bad(
            "more precise than 1e-15 USD, which ratekeeper cannot "
            "charge exactly");
      }
      digits += 1;
      rounded = true;
    }
    shift = 0;
  }
  for (; shift > 0; --shift) {
    digits *= 10;
    if (digits > kMaxFemtosPerToken) break;
  }
  if (digits > kMaxFemtosPerToken) return bad("above $1,000 per token");
  return ParsedPrice{TokenPrice{static_cast<std::uint64_t>(digits)}, rounded};
}

}  // namespace detail

// parse_usd_per_token
//
// A non-negative decimal ("0.000003", "3e-06", "1.5E-7", "2", "0.0") into
// femto-USD per token, exactly. kInvalidArgument for anything else: a sign,
// hex, inf/nan, more precision than 1e-15 USD, or above kMaxFemtosPerToken.
inline absl::StatusOr<TokenPrice> parse_usd_per_token(std::string_view text) {
  absl::StatusOr<ParsedPrice> p = detail::parse_usd(text, false);
  if (!p.ok()) return p.status();
  return p->price;
}

// parse_usd_per_token_rounding_noise
//
// As parse_usd_per_token, except for float noise: a decimal of more than
// kFloatNoiseDigits significant digits that is finer than 1e-15 USD
// ("2.9999900000000002e-06", a double printed in full) is rounded UP to the
// next femto-USD, and `rounded_up` says so. A short decimal finer than
// 1e-15 USD ("1e-17") is still kInvalidArgument: it is a price, not noise,
// and ratekeeper cannot charge it exactly.
inline absl::StatusOr<ParsedPrice> parse_usd_per_token_rounding_noise(
    std::string_view text) {
  return detail::parse_usd(text, true);
}

}  // namespace ratekeeper

#endif  // RATEKEEPER_BUDGET_MONEY_HPP_
