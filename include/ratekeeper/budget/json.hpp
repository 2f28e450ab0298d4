// ratekeeper/budget/json.hpp: provider JSON into usage structs and prices.
//
// The one header that needs nlohmann-json (Debian: nlohmann-json3-dev).
//
//   read_openai_chat_usage(text)       a Chat Completions response body, or
//                                      the final stream chunk's JSON
//   read_openai_responses_usage(text)  a Responses body, or its
//                                      "response.completed" stream event
//   read_anthropic_usage(text)         a Messages response body
//   AnthropicStreamUsage               message_start + message_delta events
//                                      (delta usage is cumulative: the last
//                                      value wins, never a sum); complete
//                                      or partial (cut, or an error event)
//   read_provider_error(text, p)       an error body or event (ProviderError)
//   load_price_catalogue(text)         LiteLLM's price file, with a report
//                                      per model (budget/catalogue.hpp)
//
// Errors are statuses, never a zero charge: malformed JSON, a wrong type, a
// negative count or a missing required field (OpenAI prompt_tokens and
// completion_tokens, Responses input_tokens and output_tokens, Anthropic
// input_tokens and output_tokens) is kInvalidArgument naming it; a
// well-formed body without usage is kNotFound (the caller falls back to its
// own count, flagged estimated); an error body is the provider's error
// (ProviderError::status(): its type and message). Whole SSE streams:
// ratekeeper/budget/stream.hpp.
#ifndef RATEKEEPER_BUDGET_JSON_HPP_
#define RATEKEEPER_BUDGET_JSON_HPP_

#include <cstdint>
#include <initializer_list>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "ratekeeper/budget/catalogue.hpp"
#include "ratekeeper/budget/money.hpp"
#include "ratekeeper/budget/prices.hpp"
#include "ratekeeper/budget/usage.hpp"
#include "ratekeeper/detail/strings.hpp"

namespace ratekeeper {

namespace detail {

using json = nlohmann::json;

inline absl::StatusOr<json> parse_json(std::string_view text,
                                       std::string_view what) {
  json j = json::parse(text.begin(), text.end(), nullptr,
                       /*allow_exceptions=*/false);
  if (j.is_discarded()) {
    return absl::InvalidArgumentError(
        absl::StrCat(detail::av(what), ": not well-formed JSON"));
  }
  if (!j.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(detail::av(what), ": not a JSON object"));
  }
  return j;
}

// Reads obj[key] as a token count into `out`: absent or null leaves it;
// anything but a non-negative integer is an error.
inline absl::Status read_count(const json& obj, const char* key,
                               std::uint64_t& out, std::string_view what) {
  const auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return absl::OkStatus();
  if (it->is_number_unsigned()) {
    out = it->get<std::uint64_t>();
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(absl::StrCat(
      detail::av(what), ": \"", key, "\" is not a non-negative integer"));
}

// obj[key] as an object: nullptr when absent or null; an error when it is
// something else.
inline absl::StatusOr<const json*> read_object(const json& obj, const char* key,
                                               std::string_view what) {
  const auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return nullptr;
  if (!it->is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(detail::av(what), ": \"", key, "\" is not an object"));
  }
  return &*it;
}

// kNotFound for a body without usage. OpenAI's streams carry usage only
// with stream_options.include_usage; the hint names it only for them.
inline absl::Status no_usage(std::string_view what, bool openai = false) {
  return absl::NotFoundError(absl::StrCat(
      detail::av(what), ": no usage object (",
      openai ? "a stream without stream_options.include_usage, or cut short"
             : "cut short",
      "): charge the counted estimate"));
}

// kInvalidArgument naming the first of `keys` that `u` lacks (absent or
// null): fields the provider always sends, so a usage without them is
// broken or not a usage, never one to settle at $0.
inline absl::Status require_fields(const json& u,
                                   std::initializer_list<const char*> keys,
                                   std::string_view what) {
  for (const char* key : keys) {
    const auto it = u.find(key);
    if (it == u.end() || it->is_null()) {
      return absl::InvalidArgumentError(absl::StrCat(
          detail::av(what), ": \"", key,
          "\" is missing (the provider always sends it): refusing to "
          "charge zero"));
    }
  }
  return absl::OkStatus();
}

#define RATEKEEPER_RETURN_IF_ERROR(expr)                           \
  do {                                                             \
    if (absl::Status rk_st_ = (expr); !rk_st_.ok()) return rk_st_; \
  } while (false)

inline absl::StatusOr<OpenAIChatUsage> openai_chat_usage(const json& u) {
  constexpr std::string_view kWhat = "OpenAI usage";
  RATEKEEPER_RETURN_IF_ERROR(
      require_fields(u, {"prompt_tokens", "completion_tokens"}, kWhat));
  OpenAIChatUsage out;
  RATEKEEPER_RETURN_IF_ERROR(
      read_count(u, "prompt_tokens", out.prompt_tokens, kWhat));
  RATEKEEPER_RETURN_IF_ERROR(
      read_count(u, "completion_tokens", out.completion_tokens, kWhat));
  RATEKEEPER_RETURN_IF_ERROR(
      read_count(u, "total_tokens", out.total_tokens, kWhat));
  absl::StatusOr<const json*> pd =
      read_object(u, "prompt_tokens_details", kWhat);
  if (!pd.ok()) return pd.status();
  if (*pd != nullptr) {
    auto& d = out.prompt_tokens_details;
    RATEKEEPER_RETURN_IF_ERROR(
        read_count(**pd, "cached_tokens", d.cached_tokens, kWhat));
    RATEKEEPER_RETURN_IF_ERROR(
        read_count(**pd, "cache_write_tokens", d.cache_write_tokens, kWhat));
    RATEKEEPER_RETURN_IF_ERROR(
        read_count(**pd, "audio_tokens", d.audio_tokens, kWhat));
  }
  absl::StatusOr<const json*> cd =
      read_object(u, "completion_tokens_details", kWhat);
  if (!cd.ok()) return cd.status();
  if (*cd != nullptr) {
    auto& d = out.completion_tokens_details;
    RATEKEEPER_RETURN_IF_ERROR(
        read_count(**cd, "reasoning_tokens", d.reasoning_tokens, kWhat));
    RATEKEEPER_RETURN_IF_ERROR(
        read_count(**cd, "audio_tokens", d.audio_tokens, kWhat));
    RATEKEEPER_RETURN_IF_ERROR(read_count(**cd, "accepted_prediction_tokens",
                                          d.accepted_prediction_tokens, kWhat));
    RATEKEEPER_RETURN_IF_ERROR(read_count(**cd, "rejected_prediction_tokens",
                                          d.rejected_prediction_tokens, kWhat));
  }
  // DeepSeek: cache hits and misses beside prompt_tokens.
  for (auto [key, slot] :
       {std::pair{"prompt_cache_hit_tokens", &out.prompt_cache_hit_tokens},
        std::pair{"prompt_cache_miss_tokens", &out.prompt_cache_miss_tokens}}) {
    if (const auto it = u.find(key); it != u.end() && !it->is_null()) {
      RATEKEEPER_RETURN_IF_ERROR(read_count(u, key, slot->emplace(), kWhat));
    }
  }
  return out;
}

// The Chat Completions usage object `u`, its required fields checked.
}  // namespace detail

// ProviderError: an error a provider answered with, as a body or as a
// stream event, instead of (or after part of) an answer:
//
//   Anthropic  {"type":"error","error":{"type":"overloaded_error",
//                                       "message":"Overloaded"}}
//   OpenAI     {"error":{"message":"...","type":"server_error",
//                        "param":null,"code":null}}
//   Responses  {"type":"error","code":"...","message":"...",...} and
//              {"type":"response.failed","response":{"error":{"code":...,
//                                                   "message":...}}}
//
// status() names the provider, the type and the message. Its code says
// what the caller may do, never kInvalidArgument or kNotFound (those keep
// their meaning for usage: malformed, absent):
//   rate_limit_error, rate_limit_exceeded, insufficient_quota
//                                                 kResourceExhausted
//   overloaded_error, api_error, server_error, server_is_overloaded,
//   slow_down, timeout_error                      kUnavailable (retryable)
//   authentication_error, invalid_api_key         kUnauthenticated
//   permission_error                              kPermissionDenied
//   anything else (invalid_request_error, ...)    kFailedPrecondition
struct ProviderError {
  Provider provider = Provider::kOther;
  std::string type;     // Anthropic error.type; OpenAI error.type, else code
  std::string code;     // OpenAI's error.code; may be empty
  std::string message;  // as the provider wrote it

  absl::Status status() const {
    const char* who = provider == Provider::kAnthropic ? "Anthropic"
                      : provider == Provider::kOpenAIResponses
                          ? "OpenAI Responses"
                      : provider == Provider::kOpenAIChat ? "OpenAI"
                                                          : "provider";
    std::string text = absl::StrCat(who, " error ", type, ": ", message);
    if (!code.empty() && code != type)
      absl::StrAppend(&text, " (code ", code, ")");
    const auto is = [&](std::initializer_list<std::string_view> names) {
      for (const std::string_view n : names) {
        if (type == n || code == n) return true;
      }
      return false;
    };
    if (is({"rate_limit_error", "rate_limit_exceeded", "insufficient_quota"})) {
      return absl::ResourceExhaustedError(text);
    }
    if (is({"overloaded_error", "api_error", "server_error",
            "server_is_overloaded", "slow_down", "timeout_error"})) {
      return absl::UnavailableError(text);
    }
    if (is({"authentication_error", "invalid_api_key"})) {
      return absl::UnauthenticatedError(text);
    }
    if (is({"permission_error"})) return absl::PermissionDeniedError(text);
    return absl::FailedPreconditionError(text);
  }
  friend bool operator==(const ProviderError&, const ProviderError&) = default;
};

namespace detail {

inline std::string string_member(const json& obj, const char* key) {
  const auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return {};
  if (it->is_string()) return it->get<std::string>();
  return it->dump();  // a numeric code, say
}

inline ProviderError error_of(const json& e, Provider p) {
  ProviderError out;
  out.provider = p;
  out.type = string_member(e, "type");
  out.code = string_member(e, "code");
  out.message = string_member(e, "message");
  if (out.type.empty()) out.type = out.code.empty() ? "error" : out.code;
  return out;
}

// The error a parsed body or event carries (see ProviderError), if any.
inline std::optional<ProviderError> find_provider_error(const json& j,
                                                        Provider p) {
  if (const auto e = j.find("error"); e != j.end() && e->is_object()) {
    return error_of(*e, p);
  }
  const auto type = j.find("type");
  if (type == j.end() || !type->is_string()) return std::nullopt;
  if (*type == "error") {  // Responses' error event: the fields at the top
    ProviderError out = error_of(j, p);
    if (out.type == "error" && !out.code.empty()) out.type = out.code;
    return out;
  }
  if (*type == "response.failed") {
    const auto r = j.find("response");
    if (r != j.end() && r->is_object()) {
      if (const auto e = r->find("error"); e != r->end() && e->is_object()) {
        return error_of(*e, p);
      }
    }
    ProviderError out;
    out.provider = p;
    out.type = "response.failed";
    out.message = "the response failed without an error object";
    return out;
  }
  return std::nullopt;
}

}  // namespace detail

// read_provider_error
//
// The error a body (or one stream event's JSON) carries, in any of the
// shapes ProviderError lists; nullopt when it carries none or is not JSON.
inline std::optional<ProviderError> read_provider_error(std::string_view text,
                                                        Provider provider) {
  const detail::json j = detail::json::parse(text.begin(), text.end(), nullptr,
                                             /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return std::nullopt;
  return detail::find_provider_error(j, provider);
}

// read_openai_chat_usage
//
// The `usage` of a Chat Completions body or final stream chunk.
// prompt_tokens and completion_tokens are required (kInvalidArgument naming
// the missing one); an error body ({"error":{...}}) is its
// ProviderError::status().
inline absl::StatusOr<OpenAIChatUsage> read_openai_chat_usage(
    std::string_view text) {
  absl::StatusOr<detail::json> j = detail::parse_json(text, "OpenAI body");
  if (!j.ok()) return j.status();
  if (auto e = detail::find_provider_error(*j, Provider::kOpenAIChat)) {
    return e->status();
  }
  absl::StatusOr<const detail::json*> u =
      detail::read_object(*j, "usage", "OpenAI body");
  if (!u.ok()) return u.status();
  if (*u == nullptr) return detail::no_usage("OpenAI body", true);
  return detail::openai_chat_usage(**u);
}

namespace detail {

// A Responses usage object; input_tokens and output_tokens are required.
inline absl::StatusOr<OpenAIResponsesUsage> openai_responses_usage(
    const json& o) {
  constexpr std::string_view kWhat = "OpenAI Responses usage";
  RATEKEEPER_RETURN_IF_ERROR(
      require_fields(o, {"input_tokens", "output_tokens"}, kWhat));
  OpenAIResponsesUsage out;
  RATEKEEPER_RETURN_IF_ERROR(
      read_count(o, "input_tokens", out.input_tokens, kWhat));
  RATEKEEPER_RETURN_IF_ERROR(
      read_count(o, "output_tokens", out.output_tokens, kWhat));
  RATEKEEPER_RETURN_IF_ERROR(
      read_count(o, "total_tokens", out.total_tokens, kWhat));
  absl::StatusOr<const json*> in =
      read_object(o, "input_tokens_details", kWhat);
  if (!in.ok()) return in.status();
  if (*in != nullptr) {
    RATEKEEPER_RETURN_IF_ERROR(read_count(
        **in, "cached_tokens", out.input_tokens_details.cached_tokens, kWhat));
    RATEKEEPER_RETURN_IF_ERROR(
        read_count(**in, "cache_write_tokens",
                   out.input_tokens_details.cache_write_tokens, kWhat));
  }
  absl::StatusOr<const json*> od =
      read_object(o, "output_tokens_details", kWhat);
  if (!od.ok()) return od.status();
  if (*od != nullptr) {
    RATEKEEPER_RETURN_IF_ERROR(
        read_count(**od, "reasoning_tokens",
                   out.output_tokens_details.reasoning_tokens, kWhat));
  }
  return out;
}

}  // namespace detail

// read_openai_responses_usage
//
// The `usage` of a Responses body, or of the `response` inside a
// "response.completed" stream event. input_tokens and output_tokens are
// required (kInvalidArgument naming the missing one); an error (a body's
// `error` object, an "error" or "response.failed" event) is its
// ProviderError::status().
inline absl::StatusOr<OpenAIResponsesUsage> read_openai_responses_usage(
    std::string_view text) {
  constexpr std::string_view kWhat = "OpenAI Responses usage";
  absl::StatusOr<detail::json> j = detail::parse_json(text, kWhat);
  if (!j.ok()) return j.status();
  if (auto e = detail::find_provider_error(*j, Provider::kOpenAIResponses)) {
    return e->status();
  }
  const detail::json* root = &*j;
  absl::StatusOr<const detail::json*> inner =
      detail::read_object(*j, "response", kWhat);
  if (!inner.ok()) return inner.status();
  if (*inner != nullptr) {
    root = *inner;
    if (auto e =
            detail::find_provider_error(*root, Provider::kOpenAIResponses)) {
      return e->status();
    }
  }
  absl::StatusOr<const detail::json*> u =
      detail::read_object(*root, "usage", kWhat);
  if (!u.ok()) return u.status();
  if (*u == nullptr) return detail::no_usage(kWhat);
  return detail::openai_responses_usage(**u);
}

namespace detail {

// Reads the fields of an Anthropic usage object present in `u` into `out`
// (absent fields keep their value: a message_delta carries only some).
inline absl::Status anthropic_fields(const json& u, AnthropicUsage& out) {
  constexpr std::string_view kWhat = "Anthropic usage";
  RATEKEEPER_RETURN_IF_ERROR(
      read_count(u, "input_tokens", out.input_tokens, kWhat));
  RATEKEEPER_RETURN_IF_ERROR(read_count(u, "cache_creation_input_tokens",
                                        out.cache_creation_input_tokens,
                                        kWhat));
  RATEKEEPER_RETURN_IF_ERROR(read_count(u, "cache_read_input_tokens",
                                        out.cache_read_input_tokens, kWhat));
  RATEKEEPER_RETURN_IF_ERROR(
      read_count(u, "output_tokens", out.output_tokens, kWhat));
  absl::StatusOr<const json*> cc = read_object(u, "cache_creation", kWhat);
  if (!cc.ok()) return cc.status();
  if (*cc != nullptr) {
    out.has_cache_creation_split = true;
    RATEKEEPER_RETURN_IF_ERROR(
        read_count(**cc, "ephemeral_5m_input_tokens",
                   out.cache_creation.ephemeral_5m_input_tokens, kWhat));
    RATEKEEPER_RETURN_IF_ERROR(
        read_count(**cc, "ephemeral_1h_input_tokens",
                   out.cache_creation.ephemeral_1h_input_tokens, kWhat));
  }
  absl::StatusOr<const json*> od =
      read_object(u, "output_tokens_details", kWhat);
  if (!od.ok()) return od.status();
  if (*od != nullptr) {
    RATEKEEPER_RETURN_IF_ERROR(
        read_count(**od, "thinking_tokens",
                   out.output_tokens_details.thinking_tokens, kWhat));
  }
  absl::StatusOr<const json*> st = read_object(u, "server_tool_use", kWhat);
  if (!st.ok()) return st.status();
  if (*st != nullptr) {
    RATEKEEPER_RETURN_IF_ERROR(
        read_count(**st, "web_search_requests",
                   out.server_tool_use.web_search_requests, kWhat));
  }
  const auto tier = u.find("service_tier");
  if (tier != u.end() && !tier->is_null()) {
    if (!tier->is_string()) {
      return absl::InvalidArgumentError(
          "Anthropic usage: \"service_tier\" is not a string");
    }
    out.service_tier = tier->get<std::string>();
  }
  return absl::OkStatus();
}

}  // namespace detail

// read_anthropic_usage
//
// The `usage` of a Messages response body. input_tokens and output_tokens
// are required (kInvalidArgument naming the missing one); the cache fields
// are optional (older models leave them out). An error body
// ({"type":"error","error":{...}}) is its ProviderError::status().
inline absl::StatusOr<AnthropicUsage> read_anthropic_usage(
    std::string_view text) {
  absl::StatusOr<detail::json> j = detail::parse_json(text, "Anthropic body");
  if (!j.ok()) return j.status();
  if (auto e = detail::find_provider_error(*j, Provider::kAnthropic)) {
    return e->status();
  }
  absl::StatusOr<const detail::json*> u =
      detail::read_object(*j, "usage", "Anthropic body");
  if (!u.ok()) return u.status();
  if (*u == nullptr) return detail::no_usage("Anthropic body");
  RATEKEEPER_RETURN_IF_ERROR(detail::require_fields(
      **u, {"input_tokens", "output_tokens"}, "Anthropic usage"));
  AnthropicUsage out;
  RATEKEEPER_RETURN_IF_ERROR(detail::anthropic_fields(**u, out));
  return out;
}

// AnthropicStreamUsage: the usage of a Messages stream, fed the JSON of
// each event. message_start carries the input side (and a first output
// count, 1 or so); each message_delta carries cumulative counts: the last
// wins. The usage is complete once a message_delta with a stop_reason has
// carried its usage and no `error` event came; a stream cut before that
// (after message_start, say) or ended by an error event is partial: its
// counts are a lower bound (to_usage() flags them UsageSource::kPartial).
// Not thread-safe.
class AnthropicStreamUsage {
 public:
  // feed
  //
  // One event's JSON ("data:" payload). message_start and message_delta
  // are read (message_start needs input_tokens and output_tokens, a
  // message_delta's usage output_tokens), an `error` event is recorded
  // (error()), others are accepted and ignored. kInvalidArgument for
  // malformed JSON or usage; the accumulated usage is then unchanged.
  absl::Status feed(std::string_view event) {
    absl::StatusOr<detail::json> j =
        detail::parse_json(event, "Anthropic stream event");
    if (!j.ok()) return j.status();
    return feed_json(*j);
  }

  // feed_json
  //
  // As feed(), for an event already parsed.
  absl::Status feed_json(const detail::json& j) {
    const auto type = j.find("type");
    if (type == j.end() || !type->is_string()) {
      return absl::InvalidArgumentError(
          "Anthropic stream event: no \"type\" string");
    }
    const std::string& t = type->get_ref<const std::string&>();
    const detail::json* usage = nullptr;
    bool stops = false;
    if (t == "message_start") {
      absl::StatusOr<const detail::json*> msg =
          detail::read_object(j, "message", "message_start");
      if (!msg.ok()) return msg.status();
      if (*msg == nullptr) {
        return absl::InvalidArgumentError("message_start without a message");
      }
      absl::StatusOr<const detail::json*> u =
          detail::read_object(**msg, "usage", "message_start");
      if (!u.ok()) return u.status();
      usage = *u;
      if (usage != nullptr) {
        RATEKEEPER_RETURN_IF_ERROR(
            detail::require_fields(*usage, {"input_tokens", "output_tokens"},
                                   "Anthropic message_start usage"));
      }
    } else if (t == "message_delta") {
      absl::StatusOr<const detail::json*> u =
          detail::read_object(j, "usage", "message_delta");
      if (!u.ok()) return u.status();
      usage = *u;
      if (usage != nullptr) {
        RATEKEEPER_RETURN_IF_ERROR(detail::require_fields(
            *usage, {"output_tokens"}, "Anthropic message_delta usage"));
      }
      absl::StatusOr<const detail::json*> d =
          detail::read_object(j, "delta", "message_delta");
      if (!d.ok()) return d.status();
      if (*d != nullptr) {
        const auto sr = (*d)->find("stop_reason");
        stops = sr != (*d)->end() && !sr->is_null();
      }
    } else if (t == "error") {
      if (!error_) {
        error_ = detail::find_provider_error(j, Provider::kAnthropic);
      }
      return absl::OkStatus();
    } else {
      return absl::OkStatus();
    }
    if (usage == nullptr) return absl::OkStatus();
    AnthropicUsage next = usage_;
    RATEKEEPER_RETURN_IF_ERROR(detail::anthropic_fields(*usage, next));
    usage_ = std::move(next);
    if (t == "message_start") started_ = true;
    if (stops) stopped_ = true;
    return absl::OkStatus();
  }

  // Whether the counts are final: message_start and a message_delta with a
  // stop_reason read, and no error event.
  bool complete() const noexcept { return started_ && stopped_ && !error_; }

  // The error event the stream carried, if any.
  const std::optional<ProviderError>& error() const noexcept { return error_; }

  // usage
  //
  // The complete usage. kNotFound before a message_start with usage;
  // kFailedPrecondition while the stream is partial (no final
  // message_delta yet, or an error event: its type and message named):
  // take to_usage(), flagged partial, or the counts so far from
  // usage_so_far().
  absl::StatusOr<AnthropicUsage> usage() const {
    if (!started_) return detail::no_usage("Anthropic stream");
    if (error_) {
      return absl::FailedPreconditionError(
          absl::StrCat("Anthropic stream ended by an error event (",
                       error_->status().message(),
                       "): its usage is partial, a lower bound"));
    }
    if (!stopped_) {
      return absl::FailedPreconditionError(
          "Anthropic stream is partial (no message_delta with a stop_reason "
          "and usage: cut short): its usage is a lower bound");
    }
    return usage_;
  }

  // The counts so far, complete or not; kNotFound before message_start.
  absl::StatusOr<AnthropicUsage> usage_so_far() const {
    if (!started_) return detail::no_usage("Anthropic stream");
    return usage_;
  }

  // to_usage
  //
  // The counts so far, normalized: UsageSource::kReported when complete(),
  // kPartial otherwise (Reservation::settle then charges the worst case).
  // kNotFound before message_start; kInvalidArgument as normalize().
  absl::StatusOr<Usage> to_usage() const {
    if (!started_) return detail::no_usage("Anthropic stream");
    absl::StatusOr<Usage> u = normalize(usage_);
    if (u.ok() && !complete()) u->source = UsageSource::kPartial;
    return u;
  }

 private:
  AnthropicUsage usage_;
  std::optional<ProviderError> error_;
  bool started_ = false;
  bool stopped_ = false;
};

#undef RATEKEEPER_RETURN_IF_ERROR

}  // namespace ratekeeper

#endif  // RATEKEEPER_BUDGET_JSON_HPP_
