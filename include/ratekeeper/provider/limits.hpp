// ratekeeper/provider/limits.hpp: client-side limits that count the way
// each LLM provider counts at admission (issue 18, "Following the
// provider").
//
// Defines:
//   ProviderKind     OpenAI, Anthropic, Azure OpenAI
//   ProviderRequest  the shape of a call before it is sent
//   ProviderLimits   a provider's published numbers (rpm, tpm / itpm, otpm)
//                    with a preset per provider: openai(), anthropic(),
//                    azure_openai()
//   admission_costs  what the provider charges a call when it admits it,
//                    per Dimension
//   usage_costs      what it counts once the call is done (Usage), per
//                    Dimension: what a local limit is settled to
//   bucket_for       the TokenBucket of one dimension
//
// The counting rules (../shared/LLM-ACCOUNTING.md, "Rate limits as the
// providers count them"):
//   OpenAI      RPM, and TPM charged max(max_tokens, estimated prompt
//               tokens) at admission. Settled to the call's total tokens
//               (input, cached included, + output): the headers' remaining
//               (provider/resync.hpp) corrects whatever the provider kept.
//   Anthropic   RPM, ITPM and OTPM apart, each a continuously refilled
//               token bucket. ITPM counts the uncached input and the cache
//               writes; cache reads do not count on most models
//               (ProviderLimits::cache_reads_count for those where they
//               do). OTPM is charged max_tokens at admission and settled
//               to the output the call made.
//   Azure       prompt + max_tokens x best_of per minute, counted when the
//               request arrives and kept (it is the provider's estimate,
//               not the billed usage); RPM checked over short windows (1 s
//               or 10 s): the request bucket's burst is the RPM's share of
//               that window (request_window, 10 s by default).
// Every limit is a TokenBucket of the published number per minute with a
// burst of that number (a request limit: its share of request_window).
#ifndef RATEKEEPER_PROVIDER_LIMITS_HPP_
#define RATEKEEPER_PROVIDER_LIMITS_HPP_

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdint>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "ratekeeper/budget/usage.hpp"
#include "ratekeeper/decision.hpp"
#include "ratekeeper/detail/math.hpp"
#include "ratekeeper/detail/strings.hpp"
#include "ratekeeper/policy/token_bucket.hpp"
#include "ratekeeper/provider/headers.hpp"

namespace ratekeeper::provider {

enum class ProviderKind : std::uint8_t { kOpenAI, kAnthropic, kAzureOpenAI };

// ProviderRequest: a call before it is sent.
struct ProviderRequest {
  std::uint64_t prompt_tokens = 0;  // estimated input, cached part included
  std::uint64_t max_tokens = 0;     // the request's max_tokens (0: unset)
  std::uint64_t best_of = 1;        // Azure's best_of (n completions)
  // The part of prompt_tokens expected to be read from the cache (a known
  // cached prefix): Anthropic leaves it out of ITPM on most models.
  std::uint64_t cache_read_tokens = 0;
};

// What a call costs per dimension; nullopt for a dimension the limits do
// not have.
using DimensionCosts = std::array<std::optional<Cost>, kDimensions>;

// ProviderLimits: a provider's published limits for one account and model
// class. A number of 0 means that limit is not configured.
struct ProviderLimits {
  ProviderKind kind = ProviderKind::kOpenAI;
  std::uint64_t rpm = 0;   // requests per minute
  std::uint64_t tpm = 0;   // tokens per minute (OpenAI, Azure)
  std::uint64_t itpm = 0;  // input tokens per minute (Anthropic)
  std::uint64_t otpm = 0;  // output tokens per minute (Anthropic)
  // The window the provider checks requests over: the request bucket holds
  // rpm x request_window / 1 min (at least 1).
  Nanos request_window = std::chrono::minutes(1);
  bool cache_reads_count = false;  // Anthropic models that count them
  std::string name = "provider";   // limit names: name + "." + dimension

  static ProviderLimits openai(std::uint64_t rpm, std::uint64_t tpm) {
    ProviderLimits l;
    l.kind = ProviderKind::kOpenAI;
    l.rpm = rpm;
    l.tpm = tpm;
    l.name = "openai";
    return l;
  }
  static ProviderLimits anthropic(std::uint64_t rpm, std::uint64_t itpm,
                                  std::uint64_t otpm) {
    ProviderLimits l;
    l.kind = ProviderKind::kAnthropic;
    l.rpm = rpm;
    l.itpm = itpm;
    l.otpm = otpm;
    l.name = "anthropic";
    return l;
  }
  static ProviderLimits azure_openai(std::uint64_t rpm, std::uint64_t tpm) {
    ProviderLimits l;
    l.kind = ProviderKind::kAzureOpenAI;
    l.rpm = rpm;
    l.tpm = tpm;
    l.request_window = std::chrono::seconds(10);
    l.name = "azure";
    return l;
  }

  // The configured number of `d` per minute (0: none).
  std::uint64_t configured(Dimension d) const noexcept {
    switch (d) {
      case Dimension::kRequests:
        return rpm;
      case Dimension::kTokens:
        return tpm;
      case Dimension::kInputTokens:
        return itpm;
      case Dimension::kOutputTokens:
        return otpm;
    }
    return 0;
  }
};

// validate
//
// kInvalidArgument when no limit is set, a limit is set that the provider
// does not have (ITPM on OpenAI, TPM on Anthropic), a number is above
// TokenBucket::kMaxCount, request_window is not in (0, 1 min], or the name
// is empty.
inline absl::Status validate(const ProviderLimits& l) {
  const bool anthropic = l.kind == ProviderKind::kAnthropic;
  if (anthropic ? l.tpm != 0 : (l.itpm != 0 || l.otpm != 0)) {
    return absl::InvalidArgumentError(
        anthropic ? "ProviderLimits: Anthropic counts ITPM and OTPM apart; "
                    "set itpm and otpm, not tpm"
                  : "ProviderLimits: OpenAI and Azure count one TPM; set "
                    "tpm, not itpm or otpm");
  }
  if (l.rpm == 0 && l.tpm == 0 && l.itpm == 0 && l.otpm == 0) {
    return absl::InvalidArgumentError("ProviderLimits: no limit is set");
  }
  for (const std::uint64_t v : {l.rpm, l.tpm, l.itpm, l.otpm}) {
    if (v > TokenBucket::kMaxCount) {
      return absl::InvalidArgumentError(
          absl::StrCat("ProviderLimits: a limit of ", v, " is above 2^62"));
    }
  }
  if (l.request_window <= Nanos{0} ||
      l.request_window > std::chrono::minutes(1)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ProviderLimits: request_window must be in (0, 1 min], got ",
        l.request_window.count(), " ns"));
  }
  if (l.name.empty()) {
    return absl::InvalidArgumentError("ProviderLimits: empty name");
  }
  return absl::OkStatus();
}

// The burst of dimension `d`: its per-minute number, or for requests its
// share of request_window (rounded up, at least 1).
inline std::uint64_t burst_of(const ProviderLimits& l, Dimension d) noexcept {
  const std::uint64_t n = l.configured(d);
  if (d != Dimension::kRequests) return n;
  const auto minute = static_cast<detail::i128>(
      std::chrono::duration_cast<Nanos>(std::chrono::minutes(1)).count());
  const detail::i128 b = ratekeeper::detail::ceil_div(
      static_cast<detail::i128>(n) * l.request_window.count(), minute);
  return std::max<std::uint64_t>(1, static_cast<std::uint64_t>(b));
}

// bucket_for
//
// The TokenBucket of dimension `d`: configured(d) per minute, burst_of(d).
// kInvalidArgument when `d` is not configured.
inline absl::StatusOr<TokenBucket> bucket_for(const ProviderLimits& l,
                                              Dimension d) {
  if (l.configured(d) == 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ProviderLimits: no ", ratekeeper::detail::av(dimension_name(d)),
        " limit configured"));
  }
  return TokenBucket::create(per_minute(l.configured(d)), burst_of(l, d));
}

namespace detail {
inline Cost sat_add(Cost a, Cost b) noexcept {
  return a > UINT64_MAX - b ? UINT64_MAX : a + b;
}
inline Cost sat_mul(Cost a, Cost b) noexcept {
  return b != 0 && a > UINT64_MAX / b ? UINT64_MAX : a * b;
}
}  // namespace detail

// admission_costs
//
// What the provider charges `r` when it admits it, per configured
// dimension (the rules above):
//   requests   1
//   OpenAI     tokens: max(max_tokens, prompt_tokens)
//   Azure      tokens: prompt_tokens + max_tokens x best_of (best_of 0
//              read as 1)
//   Anthropic  input-tokens: prompt_tokens - cache_read_tokens (all of it
//              when cache_reads_count); output-tokens: max_tokens
inline DimensionCosts admission_costs(const ProviderLimits& l,
                                      const ProviderRequest& r) {
  DimensionCosts c{};
  const auto set = [&](Dimension d, Cost v) {
    if (l.configured(d) != 0) c[static_cast<std::size_t>(d)] = v;
  };
  set(Dimension::kRequests, 1);
  switch (l.kind) {
    case ProviderKind::kOpenAI:
      set(Dimension::kTokens, std::max(r.max_tokens, r.prompt_tokens));
      break;
    case ProviderKind::kAzureOpenAI:
      set(Dimension::kTokens,
          detail::sat_add(
              r.prompt_tokens,
              detail::sat_mul(r.max_tokens, std::max<Cost>(r.best_of, 1))));
      break;
    case ProviderKind::kAnthropic: {
      const Cost cached = std::min(r.cache_read_tokens, r.prompt_tokens);
      set(Dimension::kInputTokens,
          l.cache_reads_count ? r.prompt_tokens : r.prompt_tokens - cached);
      set(Dimension::kOutputTokens, r.max_tokens);
      break;
    }
  }
  return c;
}

// usage_costs
//
// What the provider counts of a finished call `r` that used `u`, per
// configured dimension: what each local limit is settled to.
//   requests   1
//   OpenAI     tokens: u.total() (input, cached included, + output)
//   Azure      tokens: the admission count (kept)
//   Anthropic  input-tokens: uncached input + cache writes (+ cache reads
//              when cache_reads_count); output-tokens: u.output
inline DimensionCosts usage_costs(const ProviderLimits& l,
                                  const ProviderRequest& r, const Usage& u) {
  DimensionCosts c = admission_costs(l, r);
  const auto set = [&](Dimension d, Cost v) {
    if (l.configured(d) != 0) c[static_cast<std::size_t>(d)] = v;
  };
  switch (l.kind) {
    case ProviderKind::kOpenAI:
      set(Dimension::kTokens, u.total());
      break;
    case ProviderKind::kAzureOpenAI:
      break;
    case ProviderKind::kAnthropic: {
      Cost in = u.input_uncached + u.input_audio + u.cache_write_5m +
                u.cache_write_1h;
      if (l.cache_reads_count) in += u.cache_read + u.cache_read_audio;
      set(Dimension::kInputTokens, in);
      set(Dimension::kOutputTokens, u.output);
      break;
    }
  }
  return c;
}

}  // namespace ratekeeper::provider

#endif  // RATEKEEPER_PROVIDER_LIMITS_HPP_
