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
//                         audio in and out, web searches, the service tier
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

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>
#include <string_view>

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
  // DeepSeek's OpenAI-compatible usage: hit + miss == prompt_tokens; the
  // hits are cache reads. Absent (nullopt) elsewhere.
  std::optional<std::uint64_t> prompt_cache_hit_tokens;
  std::optional<std::uint64_t> prompt_cache_miss_tokens;
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
  struct ServerToolUse {
    std::uint64_t web_search_requests = 0;  // billed per search
    friend bool operator==(const ServerToolUse&,
                           const ServerToolUse&) = default;
  } server_tool_use;
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

// ServiceTier: the price list a request was served under. Anthropic reports
// it in its usage ("standard", "priority", "batch"); an OpenAI caller knows
// it from its request (`service_tier`: "flex", "priority"; the Batch API)
// and sets Usage::service_tier itself.
enum class ServiceTier : std::uint8_t {
  kStandard,
  kPriority,
  kFlex,
  kBatch,
};
inline constexpr std::size_t kServiceTiers = 4;

inline constexpr std::string_view service_tier_name(ServiceTier t) noexcept {
  switch (t) {
    case ServiceTier::kStandard:
      return "standard";
    case ServiceTier::kPriority:
      return "priority";
    case ServiceTier::kFlex:
      return "flex";
    case ServiceTier::kBatch:
      return "batch";
  }
  return "unknown";
}

// parse_service_tier
//
// A provider's tier name: "standard" (and OpenAI's "default", "auto", and
// the empty string) is kStandard; "priority", "flex", "batch". Anything
// else is kInvalidArgument: its prices are unknown, and ratekeeper does not
// guess them.
inline absl::StatusOr<ServiceTier> parse_service_tier(std::string_view name) {
  if (name.empty() || name == "standard" || name == "default" ||
      name == "auto") {
    return ServiceTier::kStandard;
  }
  if (name == "priority") return ServiceTier::kPriority;
  if (name == "flex") return ServiceTier::kFlex;
  if (name == "batch") return ServiceTier::kBatch;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown service tier \"", std::string(name.substr(0, 64)),
                   "\": its prices are unknown"));
}

// SearchContextSize: how much a web search put into the context (OpenAI's
// `web_search_options.search_context_size`; medium is its default). The
// price files price a search by it.
enum class SearchContextSize : std::uint8_t { kLow, kMedium, kHigh };

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

// Usage: one call's tokens and per-request units, normalized. Every input
// token is in exactly one of input_uncached, cache_read, cache_write_5m,
// cache_write_1h, input_audio and cache_read_audio; reasoning and
// output_audio are disjoint parts of output.
struct Usage {
  std::uint64_t input_uncached = 0;  // billed at the input price
  std::uint64_t cache_read = 0;      // billed at the cached-input price
  std::uint64_t cache_write_5m = 0;  // billed at the 5-minute write price
  std::uint64_t cache_write_1h = 0;  // billed at the 1-hour write price
  std::uint64_t output = 0;          // all output, reasoning and audio incl.
  std::uint64_t reasoning = 0;       // part of output, at the reasoning price
  // Per-request units beside the text tokens (issue 14). Audio tokens are
  // billed at the audio prices where the model has them, else as text.
  std::uint64_t output_audio = 0;         // part of output (OpenAI audio out)
  std::uint64_t input_audio = 0;          // uncached audio input
  std::uint64_t cache_read_audio = 0;     // cached audio input
  std::uint64_t web_search_requests = 0;  // server-side searches, per search
  SearchContextSize search_context = SearchContextSize::kMedium;
  ServiceTier service_tier = ServiceTier::kStandard;
  Provider provider = Provider::kOther;
  UsageSource source = UsageSource::kReported;

  // All input tokens, as the provider counts them toward a cliff tier.
  std::uint64_t input_total() const noexcept {
    return input_uncached + cache_read + cache_write_5m + cache_write_1h +
           input_audio + cache_read_audio;
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
// prompt_tokens (they are a part of it). Audio tokens are priced apart:
// completion audio is a part of output; prompt audio is taken out of the
// uncached input first, and only what exceeds it counts as cached audio
// (OpenAI does not split cached_tokens by kind; uncached audio is the
// dearer reading wherever audio's cache discount is at least text's, as
// for all 50 OpenAI and Azure audio models in LiteLLM's file). DeepSeek's
// prompt_cache_hit_tokens are cache reads (its miss count must complete
// prompt_tokens). kInvalidArgument when a subset is larger than its whole,
// hit + miss is not prompt_tokens, cached_tokens disagrees with the hits,
// or total_tokens (when given, i.e. nonzero) is not prompt + completion.
inline absl::StatusOr<Usage> normalize(const OpenAIChatUsage& u) {
  auto p = u.prompt_tokens_details;
  const auto& c = u.completion_tokens_details;
  if (absl::Status st = detail::check_tokens(
          "OpenAI", {u.prompt_tokens, u.completion_tokens, u.total_tokens,
                     p.cached_tokens, p.cache_write_tokens, p.audio_tokens,
                     c.reasoning_tokens, c.audio_tokens,
                     u.prompt_cache_hit_tokens.value_or(0),
                     u.prompt_cache_miss_tokens.value_or(0)});
      !st.ok()) {
    return st;
  }
  if (u.prompt_cache_hit_tokens || u.prompt_cache_miss_tokens) {
    const std::uint64_t hit = u.prompt_cache_hit_tokens.value_or(0);
    const std::uint64_t miss = u.prompt_cache_miss_tokens.value_or(
        hit <= u.prompt_tokens ? u.prompt_tokens - hit : 0);
    if (hit + miss != u.prompt_tokens) {
      return absl::InvalidArgumentError(absl::StrCat(
          "DeepSeek usage is inconsistent: prompt_cache_hit_tokens ", hit,
          " + prompt_cache_miss_tokens ", miss, " != prompt_tokens ",
          u.prompt_tokens));
    }
    if (p.cached_tokens != 0 && p.cached_tokens != hit) {
      return absl::InvalidArgumentError(
          absl::StrCat("DeepSeek usage is inconsistent: cached_tokens ",
                       p.cached_tokens, " != prompt_cache_hit_tokens ", hit));
    }
    p.cached_tokens = hit;
  }
  if (p.cached_tokens > u.prompt_tokens ||
      p.cache_write_tokens > u.prompt_tokens - p.cached_tokens) {
    return detail::usage_error("OpenAI", "cached + cache_write > prompt_tokens",
                               p.cached_tokens + p.cache_write_tokens,
                               u.prompt_tokens);
  }
  if (c.reasoning_tokens > u.completion_tokens ||
      c.audio_tokens > u.completion_tokens - c.reasoning_tokens) {
    return detail::usage_error(
        "OpenAI", "reasoning_tokens + audio_tokens > completion_tokens",
        c.reasoning_tokens + c.audio_tokens, u.completion_tokens);
  }
  if (p.audio_tokens > u.prompt_tokens - p.cache_write_tokens) {
    return detail::usage_error(
        "OpenAI", "audio_tokens > prompt_tokens - cache writes", p.audio_tokens,
        u.prompt_tokens - p.cache_write_tokens);
  }
  if (u.total_tokens != 0 &&
      u.total_tokens != u.prompt_tokens + u.completion_tokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("OpenAI usage is inconsistent: total_tokens ",
                     u.total_tokens, " != prompt_tokens ", u.prompt_tokens,
                     " + completion_tokens ", u.completion_tokens));
  }
  Usage n;
  const std::uint64_t uncached =
      u.prompt_tokens - p.cached_tokens - p.cache_write_tokens;
  n.input_audio = std::min(p.audio_tokens, uncached);
  n.cache_read_audio = p.audio_tokens - n.input_audio;  // <= cached_tokens
  n.input_uncached = uncached - n.input_audio;
  n.cache_read = p.cached_tokens - n.cache_read_audio;
  n.cache_write_5m = p.cache_write_tokens;
  n.output = u.completion_tokens;
  n.reasoning = c.reasoning_tokens;
  n.output_audio = c.audio_tokens;
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
// server_tool_use.web_search_requests are per-search units; service_tier
// picks the price list (parse_service_tier). kInvalidArgument when the
// split does not add up to the write total, thinking tokens exceed output,
// or the service tier is unknown.
inline absl::StatusOr<Usage> normalize(const AnthropicUsage& u) {
  const auto& cc = u.cache_creation;
  if (absl::Status st = detail::check_tokens(
          "Anthropic",
          {u.input_tokens, u.cache_creation_input_tokens,
           u.cache_read_input_tokens, u.output_tokens,
           cc.ephemeral_5m_input_tokens, cc.ephemeral_1h_input_tokens,
           u.output_tokens_details.thinking_tokens,
           u.server_tool_use.web_search_requests});
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
  absl::StatusOr<ServiceTier> tier = parse_service_tier(u.service_tier);
  if (!tier.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("Anthropic usage: ", tier.status().message()));
  }
  Usage n;
  n.service_tier = *tier;
  n.web_search_requests = u.server_tool_use.web_search_requests;
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
