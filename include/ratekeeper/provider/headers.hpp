// ratekeeper/provider/headers.hpp: reading an LLM provider's rate-limit
// answer: its headers and its status (issue 18, "Following the provider").
//
// Defines (the value parsers are in provider/formats.hpp):
//
//   Dimension           requests, tokens, input-tokens, output-tokens
//   classify_status     200 / 429 / 529 (Anthropic overloaded) / 503 / other
//   read_provider_headers  a whole answer -> ProviderReading
//
// What the headers mean (../shared/LLM-ACCOUNTING.md, "Rate limits as the
// providers count them"; OpenAI's "Rate limits" guide, "Rate limits in
// headers"; Anthropic's "Rate limits" page, "Response headers"):
//
//   x-ratelimit-limit-{requests,tokens}      OpenAI, Azure OpenAI: the limit
//   x-ratelimit-remaining-{requests,tokens}  what is left now
//   x-ratelimit-reset-{requests,tokens}      Go duration until it is full
//   anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-
//     {limit,remaining,reset}                Anthropic; reset an RFC 3339
//                                            time (converted to a delay
//                                            from the `now` passed in)
//   retry-after-ms, retry-after              the wait a refusal asks for;
//                                            retry-after-ms wins when both
//                                            are present, as in the SDKs
//
// Header names match case-insensitively, values are read with their
// surrounding spaces and tabs trimmed (RFC 9110 OWS); other headers are
// ignored; a header given twice: the last one counts.
#ifndef RATEKEEPER_PROVIDER_HEADERS_HPP_
#define RATEKEEPER_PROVIDER_HEADERS_HPP_

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <ranges>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "ratekeeper/decision.hpp"
#include "ratekeeper/detail/math.hpp"
#include "ratekeeper/detail/strings.hpp"
#include "ratekeeper/provider/formats.hpp"

namespace ratekeeper::provider {

// Dimension: what a provider counts, one header family each.
enum class Dimension : std::uint8_t {
  kRequests,      // RPM
  kTokens,        // TPM (OpenAI, Azure), anthropic-ratelimit-tokens-*
  kInputTokens,   // Anthropic ITPM
  kOutputTokens,  // Anthropic OTPM
};
inline constexpr std::size_t kDimensions = 4;

constexpr std::string_view dimension_name(Dimension d) noexcept {
  switch (d) {
    case Dimension::kRequests:
      return "requests";
    case Dimension::kTokens:
      return "tokens";
    case Dimension::kInputTokens:
      return "input-tokens";
    case Dimension::kOutputTokens:
      return "output-tokens";
  }
  return "requests";
}

// ResponseClass: what an answer's status says about the provider's limits.
enum class ResponseClass : std::uint8_t {
  kOk,           // 2xx
  kRateLimited,  // 429: a rate limit refused the call (retryable)
  kOverloaded,   // 529: Anthropic's overloaded_error (retryable)
  kUnavailable,  // 503: the service is unavailable (retryable)
  kOther,        // anything else: says nothing about the limits
};

constexpr ResponseClass classify_status(int status) noexcept {
  if (status >= 200 && status <= 299) return ResponseClass::kOk;
  if (status == 429) return ResponseClass::kRateLimited;
  if (status == 529) return ResponseClass::kOverloaded;
  if (status == 503) return ResponseClass::kUnavailable;
  return ResponseClass::kOther;
}

// Whether the provider asks the caller to slow down (429, 529, 503).
constexpr bool backs_off(ResponseClass c) noexcept {
  return c == ResponseClass::kRateLimited || c == ResponseClass::kOverloaded ||
         c == ResponseClass::kUnavailable;
}

// DimensionReading: one dimension's headers; each field present only when
// its header was.
struct DimensionReading {
  std::optional<std::uint64_t> limit;
  std::optional<std::uint64_t> remaining;
  std::optional<Nanos> reset;  // the delay until it is full again, >= 0
  bool any() const noexcept {
    return limit.has_value() || remaining.has_value() || reset.has_value();
  }
};

// ProviderReading: what one answer said.
struct ProviderReading {
  int status = 200;
  ResponseClass response = ResponseClass::kOk;
  std::array<DimensionReading, kDimensions> dims{};
  std::optional<Nanos> retry_after;  // retry-after-ms, else retry-after

  const DimensionReading& operator[](Dimension d) const noexcept {
    return dims[static_cast<std::size_t>(d)];
  }
  DimensionReading& operator[](Dimension d) noexcept {
    return dims[static_cast<std::size_t>(d)];
  }
};

// read_provider_headers
//
// Reads an answer's status and its rate-limit headers (the families
// above; `headers`: any range of objects with `name` and `value` that
// convert to std::string_view, such as http::Header or a pair-like struct
// of your HTTP client) at `now_unix` (the wall clock, Unix ns: Anthropic's
// resets and an HTTP-date Retry-After are times, read as the delay from it; a
// reset already past reads as 0). The first malformed header makes the whole
// answer kInvalidArgument (or kOutOfRange) naming it: a reading is either
// what the provider said or refused, never half guessed.
template <std::ranges::input_range Headers>
requires requires(std::ranges::range_reference_t<const Headers> h) {
  std::string_view(h.name);
  std::string_view(h.value);
}
absl::StatusOr<ProviderReading> read_provider_headers(int status,
                                                      const Headers& headers,
                                                      Nanos now_unix) {
  ProviderReading out;
  out.status = status;
  out.response = classify_status(status);
  std::optional<Nanos> after_s;
  std::optional<Nanos> after_ms;
  for (const auto& h : headers) {
    const std::string_view raw_name(h.name);
    const std::string_view value(h.value);
    const std::string name =
        absl::AsciiStrToLower(ratekeeper::detail::av(raw_name));
    const std::string_view n = name;
    const auto fail = [&](const absl::Status& st) {
      return absl::Status(
          st.code(), absl::StrCat("header ", ratekeeper::detail::av(raw_name),
                                  ": ", st.message()));
    };
    if (n == "retry-after") {
      absl::StatusOr<Nanos> v = parse_retry_after(value, now_unix);
      if (!v.ok()) return fail(v.status());
      after_s = *v;
      continue;
    }
    if (n == "retry-after-ms") {
      absl::StatusOr<Nanos> v = parse_retry_after_ms(value);
      if (!v.ok()) return fail(v.status());
      after_ms = *v;
      continue;
    }
    bool anthropic = false;
    std::string_view rest;
    if (absl::StartsWith(ratekeeper::detail::av(n), "x-ratelimit-")) {
      rest = n.substr(12);  // {limit,remaining,reset}-{requests,tokens}
    } else if (absl::StartsWith(ratekeeper::detail::av(n),
                                "anthropic-ratelimit-")) {
      rest = n.substr(20);  // {dimension}-{limit,remaining,reset}
      anthropic = true;
    } else {
      continue;
    }
    constexpr std::string_view kFields[] = {"limit", "remaining", "reset"};
    int field = -1;
    std::optional<Dimension> dim;
    for (std::size_t f = 0; f < 3 && !dim; ++f) {
      for (std::size_t d = 0; d < kDimensions && !dim; ++d) {
        const auto dd = static_cast<Dimension>(d);
        if (!anthropic && d >= 2) break;  // OpenAI: requests and tokens only
        const std::string want =
            anthropic
                ? absl::StrCat(ratekeeper::detail::av(dimension_name(dd)), "-",
                               ratekeeper::detail::av(kFields[f]))
                : absl::StrCat(ratekeeper::detail::av(kFields[f]), "-",
                               ratekeeper::detail::av(dimension_name(dd)));
        if (rest == want) {
          dim = dd;
          field = static_cast<int>(f);
        }
      }
    }
    if (!dim) continue;  // another header of the family (unified-*, ...)
    DimensionReading& r = out[*dim];
    if (field == 2) {
      absl::StatusOr<Nanos> v = Nanos{0};
      if (anthropic) {
        const absl::StatusOr<Nanos> at = parse_rfc3339(value);
        if (!at.ok()) return fail(at.status());
        const detail::i128 d =
            static_cast<detail::i128>(at->count()) - now_unix.count();
        v = Nanos{d <= 0 ? 0 : ratekeeper::detail::clamp_i64(d)};
      } else {
        v = parse_go_duration(value);
        if (!v.ok()) return fail(v.status());
      }
      r.reset = *v;
    } else {
      const absl::StatusOr<std::uint64_t> v = parse_count(value);
      if (!v.ok()) return fail(v.status());
      (field == 0 ? r.limit : r.remaining) = *v;
    }
  }
  out.retry_after = after_ms ? after_ms : after_s;
  return out;
}

}  // namespace ratekeeper::provider

#endif  // RATEKEEPER_PROVIDER_HEADERS_HPP_
