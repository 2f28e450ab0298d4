// ratekeeper/budget/usage.hpp: what a provider says a call used.
//
// Defines the usage objects of three APIs field for field, and Usage, the
// one normalized record every budget counts:
//
//   OpenAIChatUsage       Chat Completions `usage`
//   OpenAIResponsesUsage  Responses `usage`
//   AnthropicUsage        Messages `usage`
//   Usage                 uncached input, cache read, cache write (5m, 1h),
//                         output (reasoning included), reasoning (a subset),
//                         and where the numbers came from (reported,
//                         estimated, or partial: a stream cut short)
//   normalize(...)        provider object -> Usage, checking the provider's
//                         invariants (kInvalidArgument when they do not hold)
//
// The inclusion rules differ, and mixing them is the classic bug: OpenAI's
// prompt_tokens / input_tokens INCLUDE cached tokens; Anthropic's
// input_tokens EXCLUDES cache reads and writes. Reasoning (OpenAI) and
// thinking (Anthropic) tokens are a subset of output, never added to it.
// ratekeeper/budget/json.hpp reads these structs from response bodies and
// stream chunks.
#ifndef RATEKEEPER_BUDGET_USAGE_HPP_
#define RATEKEEPER_BUDGET_USAGE_HPP_

#include <cstdint>
#include <initializer_list>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

namespace ratekeeper {

// OpenAI Chat Completions `usage`.
struct OpenAIChatUsage {
  std::uint64_t prompt_tokens = 0;      // all input, cached included
  std::uint64_t completion_tokens = 0;  // all output, reasoning included
  std::uint64_t total_tokens = 0;       // prompt + completion
  struct PromptDetails {
    std::uint64_t cached_tokens = 0;       // subset of prompt_tokens
    std::uint64_t cache_write_tokens = 0;  // subset of prompt_tokens
    std::uint64_t audio_tokens = 0;
    friend bool operator==(const PromptDetails&,
                           const PromptDetails&) = default;
  } prompt_tokens_details;
  struct CompletionDetails {
    std::uint64_t reasoning_tokens = 0;  // subset of completion_tokens
    std::uint64_t audio_tokens = 0;
    std::uint64_t accepted_prediction_tokens = 0;
    std::uint64_t rejected_prediction_tokens = 0;
    friend bool operator==(const CompletionDetails&,
                           const CompletionDetails&) = default;
  } completion_tokens_details;
  friend bool operator==(const OpenAIChatUsage&,
                         const OpenAIChatUsage&) = default;
};

// OpenAI Responses `usage`.
struct OpenAIResponsesUsage {
  std::uint64_t input_tokens = 0;   // cached included
  std::uint64_t output_tokens = 0;  // reasoning included
  std::uint64_t total_tokens = 0;
  struct InputDetails {
    std::uint64_t cached_tokens = 0;
    std::uint64_t cache_write_tokens = 0;
    friend bool operator==(const InputDetails&, const InputDetails&) = default;
  } input_tokens_details;
  struct OutputDetails {
    std::uint64_t reasoning_tokens = 0;
    friend bool operator==(const OutputDetails&,
                           const OutputDetails&) = default;
  } output_tokens_details;
  friend bool operator==(const OpenAIResponsesUsage&,
                         const OpenAIResponsesUsage&) = default;
};

// Anthropic Messages `usage`.
struct AnthropicUsage {
  std::uint64_t input_tokens = 0;  // uncached input only
  std::uint64_t cache_creation_input_tokens = 0;
  std::uint64_t cache_read_input_tokens = 0;
  std::uint64_t output_tokens = 0;  // billed output, thinking included
  struct CacheCreation {
    std::uint64_t ephemeral_5m_input_tokens = 0;
    std::uint64_t ephemeral_1h_input_tokens = 0;
    friend bool operator==(const CacheCreation&,
                           const CacheCreation&) = default;
  } cache_creation;
  bool has_cache_creation_split = false;  // cache_creation was present
  struct OutputDetails {
    std::uint64_t thinking_tokens = 0;  // subset of output_tokens
    friend bool operator==(const OutputDetails&,
                           const OutputDetails&) = default;
  } output_tokens_details;
  std::string service_tier;  // "standard", "priority", "batch"; may be empty
  friend bool operator==(const AnthropicUsage&,
                         const AnthropicUsage&) = default;
};

enum class Provider : std::uint8_t {
  kOpenAIChat,
  kOpenAIResponses,
  kAnthropic,
  kOther
};

// Where a Usage's numbers came from.
enum class UsageSource : std::uint8_t {
  kReported,   // the provider's own usage object
  kEstimated,  // counted by the caller (a stream that ended without usage)
  // The provider's counts so far from a stream that did not finish (cut
  // after Anthropic's message_start, or ended by an error event): a lower
  // bound, never a final figure. Reservation::settle charges the
  // reservation's worst-case output for it (settle_partial: the caller's
  // count), never these numbers as final.
  kPartial,
};

// Usage: one call's tokens, normalized. Every input token is in exactly
// one of the first four fields; reasoning is a part of output.
struct Usage {
  std::uint64_t input_uncached = 0;  // billed at the input price
  std::uint64_t cache_read = 0;      // billed at the cached-input price
  std::uint64_t cache_write_5m = 0;  // billed at the 5-minute write price
  std::uint64_t cache_write_1h = 0;  // billed at the 1-hour write price
  std::uint64_t output = 0;          // billed at the output price
  std::uint64_t reasoning = 0;       // subset of output, for reports
  Provider provider = Provider::kOther;
  UsageSource source = UsageSource::kReported;

  // All input tokens, as the provider counts them toward a cliff tier.
  std::uint64_t input_total() const noexcept {
    return input_uncached + cache_read + cache_write_5m + cache_write_1h;
  }
  std::uint64_t total() const noexcept { return input_total() + output; }

  friend bool operator==(const Usage&, const Usage&) = default;
};

// Largest token count a usage field may hold: 2^48 (about 2.8e14, far above
// any call), so that sums of fields and costs never overflow.
inline constexpr std::uint64_t kMaxUsageTokens = std::uint64_t{1} << 48;

namespace detail {
inline absl::Status check_tokens(const char* provider,
                                 std::initializer_list<std::uint64_t> counts) {
  for (const std::uint64_t c : counts) {
    if (c > kMaxUsageTokens) {
      return absl::InvalidArgumentError(
          absl::StrCat(provider, " usage holds a token count of ", c,
                       ", above 2^48: not a real call"));
    }
  }
  return absl::OkStatus();
}

inline absl::Status usage_error(const char* provider, const char* what,
                                std::uint64_t part, std::uint64_t whole) {
  return absl::InvalidArgumentError(
      absl::StrCat(provider, " usage is inconsistent: ", what, " (", part,
                   " > ", whole, "); refusing to guess what to charge"));
}
}  // namespace detail

// normalize
//
// OpenAI Chat Completions: cached and cache-write tokens are taken out of
// prompt_tokens (they are a part of it). kInvalidArgument when a subset is
// larger than its whole, or total_tokens (when given, i.e. nonzero) is not
// prompt + completion.
inline absl::StatusOr<Usage> normalize(const OpenAIChatUsage& u) {
  const auto& p = u.prompt_tokens_details;
  if (absl::Status st = detail::check_tokens(
          "OpenAI", {u.prompt_tokens, u.completion_tokens, u.total_tokens,
                     p.cached_tokens, p.cache_write_tokens,
                     u.completion_tokens_details.reasoning_tokens});
      !st.ok()) {
    return st;
  }
  if (p.cached_tokens > u.prompt_tokens ||
      p.cache_write_tokens > u.prompt_tokens - p.cached_tokens) {
    return detail::usage_error("OpenAI", "cached + cache_write > prompt_tokens",
                               p.cached_tokens + p.cache_write_tokens,
                               u.prompt_tokens);
  }
  if (u.completion_tokens_details.reasoning_tokens > u.completion_tokens) {
    return detail::usage_error("OpenAI", "reasoning_tokens > completion_tokens",
                               u.completion_tokens_details.reasoning_tokens,
                               u.completion_tokens);
  }
  if (u.total_tokens != 0 &&
      u.total_tokens != u.prompt_tokens + u.completion_tokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("OpenAI usage is inconsistent: total_tokens ",
                     u.total_tokens, " != prompt_tokens ", u.prompt_tokens,
                     " + completion_tokens ", u.completion_tokens));
  }
  Usage n;
  n.input_uncached = u.prompt_tokens - p.cached_tokens - p.cache_write_tokens;
  n.cache_read = p.cached_tokens;
  n.cache_write_5m = p.cache_write_tokens;
  n.output = u.completion_tokens;
  n.reasoning = u.completion_tokens_details.reasoning_tokens;
  n.provider = Provider::kOpenAIChat;
  return n;
}

// normalize
//
// OpenAI Responses: as Chat Completions, with input/output names.
inline absl::StatusOr<Usage> normalize(const OpenAIResponsesUsage& u) {
  OpenAIChatUsage c;
  c.prompt_tokens = u.input_tokens;
  c.completion_tokens = u.output_tokens;
  c.total_tokens = u.total_tokens;
  c.prompt_tokens_details.cached_tokens = u.input_tokens_details.cached_tokens;
  c.prompt_tokens_details.cache_write_tokens =
      u.input_tokens_details.cache_write_tokens;
  c.completion_tokens_details.reasoning_tokens =
      u.output_tokens_details.reasoning_tokens;
  absl::StatusOr<Usage> n = normalize(c);
  if (n.ok()) n->provider = Provider::kOpenAIResponses;
  return n;
}

// normalize
//
// Anthropic Messages: input_tokens is already the uncached part; cache
// reads and writes are added, never taken out. A write without the
// 5m/1h split is billed at the 5-minute price (the default TTL).
// kInvalidArgument when the split does not add up to the write total, or
// thinking tokens exceed output.
inline absl::StatusOr<Usage> normalize(const AnthropicUsage& u) {
  const auto& cc = u.cache_creation;
  if (absl::Status st = detail::check_tokens(
          "Anthropic",
          {u.input_tokens, u.cache_creation_input_tokens,
           u.cache_read_input_tokens, u.output_tokens,
           cc.ephemeral_5m_input_tokens, cc.ephemeral_1h_input_tokens,
           u.output_tokens_details.thinking_tokens});
      !st.ok()) {
    return st;
  }
  if (u.has_cache_creation_split &&
      cc.ephemeral_5m_input_tokens + cc.ephemeral_1h_input_tokens !=
          u.cache_creation_input_tokens) {
    return absl::InvalidArgumentError(absl::StrCat(
        "Anthropic usage is inconsistent: cache_creation split ",
        cc.ephemeral_5m_input_tokens, " + ", cc.ephemeral_1h_input_tokens,
        " != cache_creation_input_tokens ", u.cache_creation_input_tokens));
  }
  if (u.output_tokens_details.thinking_tokens > u.output_tokens) {
    return detail::usage_error("Anthropic", "thinking_tokens > output_tokens",
                               u.output_tokens_details.thinking_tokens,
                               u.output_tokens);
  }
  Usage n;
  n.input_uncached = u.input_tokens;
  n.cache_read = u.cache_read_input_tokens;
  if (u.has_cache_creation_split) {
    n.cache_write_5m = cc.ephemeral_5m_input_tokens;
    n.cache_write_1h = cc.ephemeral_1h_input_tokens;
  } else {
    n.cache_write_5m = u.cache_creation_input_tokens;
  }
  n.output = u.output_tokens;
  n.reasoning = u.output_tokens_details.thinking_tokens;
  n.provider = Provider::kAnthropic;
  return n;
}

}  // namespace ratekeeper

#endif  // RATEKEEPER_BUDGET_USAGE_HPP_
