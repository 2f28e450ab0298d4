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
//                                      value wins, never a sum)
//   load_price_catalogue(text)         LiteLLM's price file, with a report
//                                      per model (budget/catalogue.hpp)
//
// Errors are statuses, never a zero charge: malformed JSON, a wrong type or
// a negative count is kInvalidArgument; a well-formed body without usage is
// kNotFound (the caller falls back to its own count, flagged estimated).
#ifndef RATEKEEPER_BUDGET_JSON_HPP_
#define RATEKEEPER_BUDGET_JSON_HPP_

#include <cstdint>
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

inline absl::Status no_usage(std::string_view what) {
  return absl::NotFoundError(absl::StrCat(
      detail::av(what),
      ": no usage object (a stream without stream_options.include_usage, "
      "or cut short): charge the counted estimate"));
}

#define RATEKEEPER_RETURN_IF_ERROR(expr)                           \
  do {                                                             \
    if (absl::Status rk_st_ = (expr); !rk_st_.ok()) return rk_st_; \
  } while (false)

inline absl::StatusOr<OpenAIChatUsage> openai_chat_usage(const json& u) {
  constexpr std::string_view kWhat = "OpenAI usage";
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

}  // namespace detail

// read_openai_chat_usage
//
// The `usage` of a Chat Completions body or final stream chunk.
inline absl::StatusOr<OpenAIChatUsage> read_openai_chat_usage(
    std::string_view text) {
  absl::StatusOr<detail::json> j = detail::parse_json(text, "OpenAI body");
  if (!j.ok()) return j.status();
  absl::StatusOr<const detail::json*> u =
      detail::read_object(*j, "usage", "OpenAI body");
  if (!u.ok()) return u.status();
  if (*u == nullptr) return detail::no_usage("OpenAI body");
  return detail::openai_chat_usage(**u);
}

// read_openai_responses_usage
//
// The `usage` of a Responses body, or of the `response` inside a
// "response.completed" stream event.
inline absl::StatusOr<OpenAIResponsesUsage> read_openai_responses_usage(
    std::string_view text) {
  constexpr std::string_view kWhat = "OpenAI Responses usage";
  absl::StatusOr<detail::json> j = detail::parse_json(text, kWhat);
  if (!j.ok()) return j.status();
  const detail::json* root = &*j;
  absl::StatusOr<const detail::json*> inner =
      detail::read_object(*j, "response", kWhat);
  if (!inner.ok()) return inner.status();
  if (*inner != nullptr) root = *inner;
  absl::StatusOr<const detail::json*> u =
      detail::read_object(*root, "usage", kWhat);
  if (!u.ok()) return u.status();
  if (*u == nullptr) return detail::no_usage(kWhat);
  OpenAIResponsesUsage out;
  const detail::json& o = **u;
  RATEKEEPER_RETURN_IF_ERROR(
      detail::read_count(o, "input_tokens", out.input_tokens, kWhat));
  RATEKEEPER_RETURN_IF_ERROR(
      detail::read_count(o, "output_tokens", out.output_tokens, kWhat));
  RATEKEEPER_RETURN_IF_ERROR(
      detail::read_count(o, "total_tokens", out.total_tokens, kWhat));
  absl::StatusOr<const detail::json*> in =
      detail::read_object(o, "input_tokens_details", kWhat);
  if (!in.ok()) return in.status();
  if (*in != nullptr) {
    RATEKEEPER_RETURN_IF_ERROR(detail::read_count(
        **in, "cached_tokens", out.input_tokens_details.cached_tokens, kWhat));
    RATEKEEPER_RETURN_IF_ERROR(
        detail::read_count(**in, "cache_write_tokens",
                           out.input_tokens_details.cache_write_tokens, kWhat));
  }
  absl::StatusOr<const detail::json*> od =
      detail::read_object(o, "output_tokens_details", kWhat);
  if (!od.ok()) return od.status();
  if (*od != nullptr) {
    RATEKEEPER_RETURN_IF_ERROR(
        detail::read_count(**od, "reasoning_tokens",
                           out.output_tokens_details.reasoning_tokens, kWhat));
  }
  return out;
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
// The `usage` of a Messages response body.
inline absl::StatusOr<AnthropicUsage> read_anthropic_usage(
    std::string_view text) {
  absl::StatusOr<detail::json> j = detail::parse_json(text, "Anthropic body");
  if (!j.ok()) return j.status();
  absl::StatusOr<const detail::json*> u =
      detail::read_object(*j, "usage", "Anthropic body");
  if (!u.ok()) return u.status();
  if (*u == nullptr) return detail::no_usage("Anthropic body");
  AnthropicUsage out;
  RATEKEEPER_RETURN_IF_ERROR(detail::anthropic_fields(**u, out));
  return out;
}

// AnthropicStreamUsage: the usage of a Messages stream, fed the JSON of
// each event. message_start carries the input side (and a first output
// count); each message_delta carries cumulative counts: the last wins.
class AnthropicStreamUsage {
 public:
  // feed
  //
  // One event's JSON ("data:" payload). Events other than message_start and
  // message_delta are accepted and ignored. kInvalidArgument for malformed
  // JSON or usage; the accumulated usage is then unchanged.
  absl::Status feed(std::string_view event) {
    absl::StatusOr<detail::json> j =
        detail::parse_json(event, "Anthropic stream event");
    if (!j.ok()) return j.status();
    const auto type = j->find("type");
    if (type == j->end() || !type->is_string()) {
      return absl::InvalidArgumentError(
          "Anthropic stream event: no \"type\" string");
    }
    const std::string& t = type->get_ref<const std::string&>();
    const detail::json* usage = nullptr;
    if (t == "message_start") {
      absl::StatusOr<const detail::json*> msg =
          detail::read_object(*j, "message", "message_start");
      if (!msg.ok()) return msg.status();
      if (*msg == nullptr) {
        return absl::InvalidArgumentError("message_start without a message");
      }
      absl::StatusOr<const detail::json*> u =
          detail::read_object(**msg, "usage", "message_start");
      if (!u.ok()) return u.status();
      usage = *u;
    } else if (t == "message_delta") {
      absl::StatusOr<const detail::json*> u =
          detail::read_object(*j, "usage", "message_delta");
      if (!u.ok()) return u.status();
      usage = *u;
    } else {
      return absl::OkStatus();
    }
    if (usage == nullptr) return absl::OkStatus();
    AnthropicUsage next = usage_;
    RATEKEEPER_RETURN_IF_ERROR(detail::anthropic_fields(*usage, next));
    usage_ = std::move(next);
    if (t == "message_start") started_ = true;
    return absl::OkStatus();
  }

  // The usage so far; kNotFound before a message_start with usage.
  absl::StatusOr<AnthropicUsage> usage() const {
    if (!started_) return detail::no_usage("Anthropic stream");
    return usage_;
  }

 private:
  AnthropicUsage usage_;
  bool started_ = false;
};

#undef RATEKEEPER_RETURN_IF_ERROR

}  // namespace ratekeeper

#endif  // RATEKEEPER_BUDGET_JSON_HPP_
