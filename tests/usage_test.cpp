// Provider usage objects: golden vectors per provider, normalization rules
// and invariants (../shared/LLM-ACCOUNTING.md), and the JSON readers.
#include "ratekeeper/budget/usage.hpp"

#include <string>

#include "ratekeeper/budget/json.hpp"
#include "test_util.hpp"

using namespace ratekeeper;

TEST_CASE("OpenAI Chat Completions: cached tokens are part of prompt_tokens",
          "[usage]") {
  // A response body as the API returns it (golden vector).
  const char* body = R"({
    "id": "chatcmpl-abc", "object": "chat.completion", "model": "gpt-4o",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 2006, "completion_tokens": 300,
              "total_tokens": 2306,
              "prompt_tokens_details": {"cached_tokens": 1920,
                                        "audio_tokens": 0},
              "completion_tokens_details": {"reasoning_tokens": 192,
                                            "audio_tokens": 0,
                                            "accepted_prediction_tokens": 0,
                                            "rejected_prediction_tokens": 0}}})";
  const auto raw = read_openai_chat_usage(body);
  REQUIRE(raw.ok());
  CHECK(raw->prompt_tokens == 2006);
  CHECK(raw->prompt_tokens_details.cached_tokens == 1920);
  CHECK(raw->completion_tokens_details.reasoning_tokens == 192);
  const auto u = normalize(*raw);
  REQUIRE(u.ok());
  CHECK(u->input_uncached == 86);  // 2006 - 1920: never 2006 + 1920
  CHECK(u->cache_read == 1920);
  CHECK(u->output == 300);     // reasoning included
  CHECK(u->reasoning == 192);  // a subset, not added
  CHECK(u->input_total() == 2006);
  CHECK(u->total() == 2306);
  CHECK(u->provider == Provider::kOpenAIChat);
}

TEST_CASE("OpenAI: the final stream chunk, and a body without usage",
          "[usage]") {
  const auto chunk = read_openai_chat_usage(
      R"({"id":"c","object":"chat.completion.chunk","choices":[],)"
      R"("usage":{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15,)"
      R"("prompt_tokens_details":{"cached_tokens":0,"cache_write_tokens":4}}})");
  REQUIRE(chunk.ok());
  const auto u = normalize(*chunk);
  REQUIRE(u.ok());
  CHECK(u->input_uncached == 6);
  CHECK(u->cache_write_5m == 4);
  // A chunk with "usage": null (every chunk but the last) or none at all.
  CHECK(read_openai_chat_usage(R"({"choices":[],"usage":null})")
            .status()
            .code() == absl::StatusCode::kNotFound);
  CHECK(read_openai_chat_usage(R"({"choices":[]})").status().code() ==
        absl::StatusCode::kNotFound);
}

TEST_CASE("OpenAI Responses: input_tokens includes cached ones", "[usage]") {
  const char* body = R"({"id":"resp_1","object":"response","status":"completed",
    "usage":{"input_tokens":328,"input_tokens_details":{"cached_tokens":128},
             "output_tokens":52,"output_tokens_details":{"reasoning_tokens":20},
             "total_tokens":380}})";
  const auto raw = read_openai_responses_usage(body);
  REQUIRE(raw.ok());
  const auto u = normalize(*raw);
  REQUIRE(u.ok());
  CHECK(u->input_uncached == 200);
  CHECK(u->cache_read == 128);
  CHECK(u->output == 52);
  CHECK(u->reasoning == 20);
  CHECK(u->provider == Provider::kOpenAIResponses);
  // The same inside a response.completed stream event.
  const auto ev = read_openai_responses_usage(
      std::string(R"({"type":"response.completed","response":)") +
      R"({"id":"resp_1","usage":{"input_tokens":328,"output_tokens":52,)"
      R"("total_tokens":380,"input_tokens_details":{"cached_tokens":128}}}})");
  REQUIRE(ev.ok());
  CHECK(normalize(*ev)->input_uncached == 200);
}

TEST_CASE("Anthropic: input_tokens excludes cache reads and writes",
          "[usage]") {
  const char* body = R"({"id":"msg_1","type":"message","role":"assistant",
    "model":"claude-sonnet-4-5","content":[{"type":"text","text":"hi"}],
    "usage":{"input_tokens":50,"cache_creation_input_tokens":1000,
             "cache_read_input_tokens":20000,
             "cache_creation":{"ephemeral_5m_input_tokens":400,
                               "ephemeral_1h_input_tokens":600},
             "output_tokens":503,"service_tier":"standard"}})";
  const auto raw = read_anthropic_usage(body);
  REQUIRE(raw.ok());
  CHECK(raw->service_tier == "standard");
  const auto u = normalize(*raw);
  REQUIRE(u.ok());
  CHECK(u->input_uncached == 50);  // not 50 - 21000, not 50 alone in total
  CHECK(u->cache_read == 20000);
  CHECK(u->cache_write_5m == 400);
  CHECK(u->cache_write_1h == 600);
  CHECK(u->input_total() == 21050);
  CHECK(u->output == 503);
  // Without the split, a write is billed as 5-minute.
  AnthropicUsage plain;
  plain.input_tokens = 3;
  plain.cache_creation_input_tokens = 7;
  CHECK(normalize(plain)->cache_write_5m == 7);
}

TEST_CASE("Anthropic streams: message_delta usage is cumulative", "[usage]") {
  AnthropicStreamUsage s;
  CHECK(s.usage().status().code() == absl::StatusCode::kNotFound);
  REQUIRE(s.feed(R"({"type":"message_start","message":{"id":"m","usage":)"
                 R"({"input_tokens":472,"cache_read_input_tokens":100,)"
                 R"("output_tokens":2}}})")
              .ok());
  REQUIRE(s.feed(R"({"type":"content_block_delta","index":0,)"
                 R"("delta":{"type":"text_delta","text":"Hi"}})")
              .ok());
  REQUIRE(s.feed(R"({"type":"message_delta","delta":{"stop_reason":null},)"
                 R"("usage":{"output_tokens":15}})")
              .ok());
  REQUIRE(s.feed(R"({"type":"message_delta","delta":{"stop_reason":)"
                 R"("end_turn"},"usage":{"output_tokens":40}})")
              .ok());
  const auto u = normalize(*s.usage());
  REQUIRE(u.ok());
  CHECK(u->output == 40);  // the last value, not 2 + 15 + 40
  CHECK(u->input_uncached == 472);
  CHECK(u->cache_read == 100);
  // A malformed event changes nothing.
  CHECK_FALSE(
      s.feed(R"({"type":"message_delta","usage":{"output_tokens":-1}})").ok());
  CHECK(s.usage()->output_tokens == 40);
}

TEST_CASE("inconsistent usage is an error, never a guess", "[usage]") {
  OpenAIChatUsage o;
  o.prompt_tokens = 10;
  o.prompt_tokens_details.cached_tokens = 11;
  CHECK(normalize(o).status().code() == absl::StatusCode::kInvalidArgument);
  o.prompt_tokens_details.cached_tokens = 5;
  o.prompt_tokens_details.cache_write_tokens = 6;
  CHECK_FALSE(normalize(o).ok());
  o.prompt_tokens_details.cache_write_tokens = 0;
  o.completion_tokens = 3;
  o.completion_tokens_details.reasoning_tokens = 4;
  CHECK_FALSE(normalize(o).ok());
  o.completion_tokens_details.reasoning_tokens = 1;
  o.total_tokens = 12;  // != 10 + 3
  CHECK_FALSE(normalize(o).ok());
  o.total_tokens = 13;
  CHECK(normalize(o).ok());
  o.prompt_tokens = kMaxUsageTokens + 1;
  o.total_tokens = 0;
  CHECK_FALSE(normalize(o).ok());

  AnthropicUsage a;
  a.cache_creation_input_tokens = 10;
  a.has_cache_creation_split = true;
  a.cache_creation.ephemeral_5m_input_tokens = 4;
  a.cache_creation.ephemeral_1h_input_tokens = 5;
  CHECK_FALSE(normalize(a).ok());
  a.cache_creation.ephemeral_1h_input_tokens = 6;
  CHECK(normalize(a).ok());
  a.output_tokens = 1;
  a.output_tokens_details.thinking_tokens = 2;
  CHECK_FALSE(normalize(a).ok());
}

TEST_CASE("malformed or partial JSON is an error, never a zero charge",
          "[usage]") {
  for (const char* bad :
       {"", "{", "[]", "null", "42", R"({"usage":{"prompt_tokens":1)",
        R"({"usage":[]})", R"({"usage":{"prompt_tokens":-1}})",
        R"({"usage":{"prompt_tokens":1.5}})",
        R"({"usage":{"prompt_tokens":"12"}})",
        R"({"usage":{"prompt_tokens_details":7}})",
        R"({"usage":{"completion_tokens":1e3}})"}) {
    CAPTURE(bad);
    const auto r = read_openai_chat_usage(bad);
    REQUIRE_FALSE(r.ok());
    CHECK(r.status().code() == absl::StatusCode::kInvalidArgument);
  }
  CHECK(read_anthropic_usage(R"({"usage":{"output_tokens":true}})")
            .status()
            .code() == absl::StatusCode::kInvalidArgument);
  CHECK(
      read_anthropic_usage(R"({"usage":{"service_tier":3}})").status().code() ==
      absl::StatusCode::kInvalidArgument);
  CHECK(read_openai_responses_usage(R"({"response":5})").status().code() ==
        absl::StatusCode::kInvalidArgument);
  AnthropicStreamUsage s;
  CHECK_FALSE(s.feed(R"({"no_type":1})").ok());
  CHECK_FALSE(s.feed(R"({"type":"message_start"})").ok());
}

TEST_CASE("a usage without its required fields is an error naming the field",
          "[i14][usage]") {
  const auto names = [](const absl::Status& st, std::string_view field) {
    return st.code() == absl::StatusCode::kInvalidArgument &&
           st.message().find(std::string("\"") + std::string(field) + "\"") !=
               std::string_view::npos &&
           st.message().find("missing") != std::string_view::npos;
  };
  // OpenAI Chat: prompt_tokens and completion_tokens are always sent.
  CHECK(names(read_openai_chat_usage(R"({"usage":{}})").status(),
              "prompt_tokens"));
  CHECK(names(read_openai_chat_usage(
                  R"({"usage":{"prompt_tokens":10,"total_tokens":10}})")
                  .status(),
              "completion_tokens"));
  CHECK(names(read_openai_chat_usage(
                  R"({"usage":{"prompt_tokens":10,"completion_tokens":null}})")
                  .status(),
              "completion_tokens"));
  CHECK(names(
      read_openai_chat_usage(R"({"usage":{"completion_tokens":3}})").status(),
      "prompt_tokens"));
  // total_tokens and the details are optional.
  const auto minimal = read_openai_chat_usage(
      R"({"usage":{"prompt_tokens":10,"completion_tokens":3}})");
  REQUIRE(minimal.ok());
  CHECK(normalize(*minimal)->total() == 13);

  // Responses: input_tokens and output_tokens.
  CHECK(names(read_openai_responses_usage(R"({"usage":{}})").status(),
              "input_tokens"));
  CHECK(names(read_openai_responses_usage(
                  R"({"type":"response.completed","response":{"usage":)"
                  R"({"input_tokens":5,"total_tokens":5}}})")
                  .status(),
              "output_tokens"));

  // Anthropic bodies: input_tokens and output_tokens; the cache fields are
  // optional (older models, and the recordings, leave them out).
  CHECK(
      names(read_anthropic_usage(R"({"usage":{}})").status(), "input_tokens"));
  CHECK(names(read_anthropic_usage(R"({"usage":{"input_tokens":5}})").status(),
              "output_tokens"));
  const auto plain =
      read_anthropic_usage(R"({"usage":{"input_tokens":5,"output_tokens":2}})");
  REQUIRE(plain.ok());
  CHECK(normalize(*plain)->total() == 7);

  // Anthropic streams: message_start needs both; a message_delta's usage
  // carries output_tokens only (as every recording shows), which it needs.
  AnthropicStreamUsage s;
  CHECK(names(s.feed(R"({"type":"message_start","message":{"usage":)"
                     R"({"output_tokens":1}}})"),
              "input_tokens"));
  CHECK(s.usage_so_far().status().code() == absl::StatusCode::kNotFound);
  REQUIRE(s.feed(R"({"type":"message_start","message":{"usage":)"
                 R"({"input_tokens":7,"output_tokens":1}}})")
              .ok());
  CHECK(names(s.feed(R"({"type":"message_delta","delta":{"stop_reason":)"
                     R"("end_turn"},"usage":{}})"),
              "output_tokens"));
  CHECK_FALSE(s.complete());  // the bad delta changed nothing
  REQUIRE(s.feed(R"({"type":"message_delta","delta":{"stop_reason":)"
                 R"("end_turn"},"usage":{"output_tokens":9}})")
              .ok());
  CHECK(s.complete());
  CHECK(s.usage()->output_tokens == 9);
  CHECK(s.to_usage()->source == UsageSource::kReported);
}

TEST_CASE("provider error bodies name the provider's error, not usage",
          "[i14][usage]") {
  // Anthropic's documented error shape (Errors page: HTTP 529).
  const char* anthropic =
      R"({"type":"error","error":{"type":"overloaded_error",)"
      R"("message":"Overloaded"},"request_id":"req_011CSHoEeqs5C35K2UUqR7Fy"})";
  const absl::Status a = read_anthropic_usage(anthropic).status();
  CHECK(a.code() == absl::StatusCode::kUnavailable);
  CHECK(a.message() == "Anthropic error overloaded_error: Overloaded");
  CHECK(a.message().find("stream_options") == std::string_view::npos);
  const auto ae = read_provider_error(anthropic, Provider::kAnthropic);
  REQUIRE(ae.has_value());
  CHECK(ae->type == "overloaded_error");
  CHECK(ae->message == "Overloaded");

  const absl::Status limited =
      read_anthropic_usage(R"({"type":"error","error":{"type":)"
                           R"("rate_limit_error","message":"slow down"}})")
          .status();
  CHECK(limited.code() == absl::StatusCode::kResourceExhausted);
  CHECK(limited.message() == "Anthropic error rate_limit_error: slow down");
  CHECK(read_anthropic_usage(R"({"type":"error","error":{"type":)"
                             R"("invalid_request_error","message":"bad"}})")
            .status()
            .code() == absl::StatusCode::kFailedPrecondition);

  // OpenAI's shape: {"error":{"message","type","param","code"}}.
  const char* openai =
      R"({"error":{"message":"You exceeded your current quota.",)"
      R"("type":"insufficient_quota","param":null,)"
      R"("code":"insufficient_quota"}})";
  const absl::Status o = read_openai_chat_usage(openai).status();
  CHECK(o.code() == absl::StatusCode::kResourceExhausted);
  CHECK(o.message() ==
        "OpenAI error insufficient_quota: You exceeded your current quota.");
  const absl::Status key =
      read_openai_chat_usage(
          R"({"error":{"message":"Incorrect API key provided.",)"
          R"("type":"invalid_request_error","param":null,)"
          R"("code":"invalid_api_key"}})")
          .status();
  CHECK(key.code() == absl::StatusCode::kUnauthenticated);
  CHECK(key.message() ==
        "OpenAI error invalid_request_error: Incorrect API key provided. "
        "(code invalid_api_key)");
  CHECK(read_openai_responses_usage(openai).status().code() ==
        absl::StatusCode::kResourceExhausted);

  // Without an error, a body without usage is still kNotFound, and only
  // OpenAI's message names stream_options.
  const absl::Status none =
      read_anthropic_usage(R"({"type":"message"})").status();
  CHECK(none.code() == absl::StatusCode::kNotFound);
  CHECK(none.message().find("stream_options") == std::string_view::npos);
  CHECK(read_openai_chat_usage(R"({"choices":[]})")
            .status()
            .message()
            .find("stream_options") != std::string_view::npos);
  CHECK_FALSE(read_provider_error(R"({"error":null})", Provider::kOpenAIChat));
  CHECK_FALSE(read_provider_error("not json", Provider::kOpenAIChat));
}
