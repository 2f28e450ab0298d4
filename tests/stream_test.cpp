// The SSE usage reader (budget/stream.hpp) on recorded provider streams
// (tests/data/provider-samples, see tests/data/README.md), fed whole, byte
// by byte and in random splits, with LF, CRLF and CR line ends; streams cut
// at every byte; error events; and a partial stream settled through the
// accountant. Expected numbers are read from the recordings by hand and
// written here as literals.
#include "ratekeeper/budget/stream.hpp"

#include <cstdint>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "ratekeeper/budget/accountant.hpp"
#include "test_util.hpp"

using namespace ratekeeper;

namespace {

std::string read_sample(const std::string& rel) {
  const std::string path = std::string(RK_TEST_DATA_DIR) + "/" + rel;
  std::ifstream in(path, std::ios::binary);
  REQUIRE(in.good());
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

StreamUsageResult whole(StreamFormat f, std::string_view text) {
  StreamUsageReader r(f);
  r.feed(text);
  return r.finish();
}

StreamUsageResult bytewise(StreamFormat f, std::string_view text) {
  StreamUsageReader r(f);
  for (const char c : text) r.feed(std::string_view(&c, 1));
  return r.finish();
}

// Random splits (fixed seed), empty chunks included.
StreamUsageResult random_splits(StreamFormat f, std::string_view text,
                                std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<std::size_t> len(0, 97);
  StreamUsageReader r(f);
  std::size_t i = 0;
  while (i < text.size()) {
    const std::size_t n = std::min(len(rng), text.size() - i);
    r.feed(text.substr(i, n));
    i += n;
  }
  return r.finish();
}

std::string with_line_ends(std::string_view text, std::string_view eol) {
  std::string out;
  for (const char c : text) {
    if (c == '\n') {
      out.append(eol);
    } else {
      out.push_back(c);
    }
  }
  return out;
}

// Every way of feeding `text` gives `expected`.
void check_all_splits(StreamFormat f, const std::string& text,
                      const StreamUsageResult& expected) {
  for (const std::string_view eol : {"\n", "\r\n", "\r"}) {
    const std::string t = with_line_ends(text, eol);
    CAPTURE(eol.size(), eol[0] == '\r');
    CHECK(whole(f, t) == expected);
    CHECK(bytewise(f, t) == expected);
    for (std::uint32_t seed = 1; seed <= 20; ++seed) {
      CAPTURE(seed);
      CHECK(random_splits(f, t, seed) == expected);
    }
  }
}

struct ChatSample {
  const char* file;
  std::uint64_t prompt, completion;
  std::uint64_t events;  // data: lines, [DONE] included
};

// Read from each recording's last chunk (usage) by hand.
constexpr ChatSample kChat[] = {
    {"173417d553406f034f643e5db3f8d591fb691ebac56f5ae39a22cc7d455c5353.sse", 79,
     11, 14},
    {"2018feb66ae13fcf5333d61b95849decc68d3f63bd38172889367e1afb1e04f7.sse", 44,
     16, 11},
    {"4cc50a6135d254573a502310e6af1246f55edb6ad95fa24059f160996b68866d.sse", 79,
     1, 5},
    {"569c877e69429d4cbc1577d2cd6dd33878095c68badc6b6654a69769b391a1c1.sse", 79,
     12, 15},
    {"7e5ea4d12e7cc064399b6631415e65923f182256b6e6b752950a3aaa2ad2320a.sse", 79,
     14, 18},
    {"83b060bae42eb41c4f1edbb7c1542b954b37d9dfd1910b964ddebc9677e6ae85.sse", 9,
     2, 6},
    {"a247c49c5fcd492bfb7a02a3306ad615ed8d8f649888ebfddfbc3ee151f44d46.sse", 48,
     19, 14},
    {"a491adda08c3d4fde95f5b2ee3f60f7f745f1a56d82e62f58031cc2add502380.sse", 79,
     42, 50},
    {"c6aa7e397b7123c3501f25df3a05d4daf7e8ad6d61ffa406ab5361fe36a8d5b1.sse", 76,
     24, 18},
    {"d615580118391ee13492193e3a8bb74642d23ac1ca13fe37cb6e889b66f759f6.sse", 19,
     177, 181},
    {"e2aad469b71d1d4894ff833ea147020a9d875eb7ce644a0ff355581690a4cbfd.sse", 14,
     30, 34},
    {"f82268f2fefd5cfbc7eeb59c297688be2f6ca0849a6e4f17851b517310841d9b.sse",
     149, 60, 26},
};

struct AnthropicSample {
  const char* file;
  std::uint64_t input;   // message_start's input_tokens
  std::uint64_t output;  // the last message_delta's output_tokens
  std::uint64_t events;  // data: lines
};

constexpr AnthropicSample kAnthropic[] = {
    {"basic_response.txt", 11, 6, 9},
    {"compaction_response.txt", 30, 8, 10},
    {"fallback_credit_response.txt", 25, 8, 6},
    {"fallback_response.txt", 25, 8, 8},
    // Cut by max_tokens mid tool input (the tool's partial_json never
    // closes), but the stream itself ends: message_delta carries the final
    // usage (stop_reason "max_tokens", 124 output tokens) and message_stop
    // follows. Its usage is complete; the cut streams are made below.
    {"incomplete_partial_json_response.txt", 450, 124, 16},
    {"refusal_response.txt", 20, 0, 5},
    {"tool_use_response.txt", 377, 65, 15},
};

// The end of the data line holding `marker` (its last '}' + 1): a cut at or
// past it leaves that event whole.
std::size_t end_of_event(const std::string& text, std::string_view marker) {
  const std::size_t at = text.find(marker);
  REQUIRE(at != std::string::npos);
  const std::size_t eol = text.find('\n', at);
  const std::size_t brace = text.rfind('}', eol);
  return brace + 1;
}

}  // namespace

TEST_CASE("OpenAI Chat recordings: usage from the last chunk, any split",
          "[i14][stream]") {
  for (const ChatSample& s : kChat) {
    CAPTURE(s.file);
    const std::string text = read_sample(
        std::string("provider-samples/openai-chat-streams/") + s.file);
    StreamUsageResult expected;
    Usage u;
    u.input_uncached = s.prompt;
    u.output = s.completion;
    u.provider = Provider::kOpenAIChat;
    u.source = UsageSource::kReported;
    expected.usage = u;
    expected.complete = true;
    expected.ended = true;
    expected.events = s.events;
    expected.parsed = 1;  // only the usage chunk
    CHECK(whole(StreamFormat::kOpenAIChat, text) == expected);
    check_all_splits(StreamFormat::kOpenAIChat, text, expected);
  }
}

TEST_CASE("Anthropic recordings: message_start + message_delta, any split",
          "[i14][stream]") {
  for (const AnthropicSample& s : kAnthropic) {
    CAPTURE(s.file);
    const std::string text = read_sample(
        std::string("provider-samples/anthropic-sdk-streams/") + s.file);
    StreamUsageResult expected;
    Usage u;
    u.input_uncached = s.input;
    u.output = s.output;
    u.provider = Provider::kAnthropic;
    u.source = UsageSource::kReported;
    expected.usage = u;
    expected.complete = true;
    expected.ended = true;  // message_stop (some files lack the last LF)
    expected.events = s.events;
    expected.parsed = 2;  // message_start and message_delta only
    CHECK(whole(StreamFormat::kAnthropic, text) == expected);
    check_all_splits(StreamFormat::kAnthropic, text, expected);
  }
}

TEST_CASE("a recorded stream cut at any byte is partial until its usage",
          "[i14][stream]") {
  SECTION("Anthropic: complete only once the message_delta is whole") {
    for (const AnthropicSample& s : kAnthropic) {
      CAPTURE(s.file);
      const std::string text = read_sample(
          std::string("provider-samples/anthropic-sdk-streams/") + s.file);
      const std::size_t start = end_of_event(text, "\"message_start\"");
      const std::size_t delta = end_of_event(text, "\"message_delta\"");
      for (std::size_t k = 0; k <= text.size(); ++k) {
        CAPTURE(k);
        const StreamUsageResult r = whole(StreamFormat::kAnthropic,
                                          std::string_view(text).substr(0, k));
        REQUIRE(r.complete == (k >= delta));
        REQUIRE(r.usage.has_value() == (k >= start));
        if (k >= start && k < delta) {
          // message_start's counts: the input, and output 1 (a lower bound).
          REQUIRE(r.usage->source == UsageSource::kPartial);
          REQUIRE(r.usage->input_uncached == s.input);
          REQUIRE(r.usage->output == 1);
        }
        REQUIRE(r.status.ok());
        REQUIRE_FALSE(r.error.has_value());
      }
    }
  }
  SECTION("OpenAI Chat: no usage until the usage chunk is whole") {
    for (const ChatSample& s : kChat) {
      CAPTURE(s.file);
      const std::string text = read_sample(
          std::string("provider-samples/openai-chat-streams/") + s.file);
      const std::size_t usage = end_of_event(text, "\"usage\"");
      for (std::size_t k = 0; k <= text.size(); ++k) {
        CAPTURE(k);
        const StreamUsageResult r = whole(StreamFormat::kOpenAIChat,
                                          std::string_view(text).substr(0, k));
        REQUIRE(r.complete == (k >= usage));
        REQUIRE(r.usage.has_value() == (k >= usage));
        REQUIRE(r.status.ok());
      }
    }
  }
}

namespace {

// Built from a recording (basic_response.txt): its message_start, then
// 4,000 text deltas, then nothing: the connection dropped.
std::string anthropic_cut_after_start() {
  std::string s =
      "event: message_start\n"
      "data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_4QpJur2dWW"
      "DjF6C758FbBw5vm12BaVipnK\",\"type\":\"message\",\"role\":\"assistant\","
      "\"content\":[],\"model\":\"claude-3-opus-latest\",\"stop_reason\":null,"
      "\"stop_sequence\":null,\"usage\":{\"input_tokens\":11,\"output_tokens\":"
      "1}}}\n\n"
      "event: content_block_start\n"
      "data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":"
      "{\"type\":\"text\",\"text\":\"\"}}\n\n";
  for (int i = 0; i < 4000; ++i) {
    s += "event: content_block_delta\n"
         "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":"
         "{\"type\":\"text_delta\",\"text\":\" word\"}}\n\n";
  }
  return s;
}

// Anthropic's documented streaming error event (Messages streaming docs,
// "Error events": overloaded_error mid-stream, sent with HTTP 200). No
// recording holds one.
constexpr std::string_view kAnthropicErrorEvent =
    "event: error\n"
    "data: {\"type\": \"error\", \"error\": {\"type\": \"overloaded_error\", "
    "\"message\": \"Overloaded\"}}\n\n";

}  // namespace

TEST_CASE("an Anthropic stream cut after message_start is partial",
          "[i14][stream][usage]") {
  const std::string text = anthropic_cut_after_start();
  const StreamUsageResult r = whole(StreamFormat::kAnthropic, text);
  CHECK_FALSE(r.complete);
  CHECK_FALSE(r.ended);
  REQUIRE(r.usage.has_value());
  CHECK(r.usage->source == UsageSource::kPartial);
  CHECK(r.usage->input_uncached == 11);
  CHECK(r.usage->output == 1);  // 4,000 deltas later: only a lower bound
  CHECK(r.events == 4002);
  CHECK(r.parsed == 1);  // the deltas were never parsed
  CHECK(random_splits(StreamFormat::kAnthropic, text, 7) == r);

  // The event-level accumulator says the same.
  AnthropicStreamUsage a;
  REQUIRE(a.feed(R"({"type":"message_start","message":{"usage":)"
                 R"({"input_tokens":11,"output_tokens":1}}})")
              .ok());
  CHECK_FALSE(a.complete());
  CHECK(a.usage().status().code() == absl::StatusCode::kFailedPrecondition);
  CHECK(a.usage_so_far()->output_tokens == 1);
  CHECK(a.to_usage()->source == UsageSource::kPartial);
}

TEST_CASE("an Anthropic stream ending in an error event is partial",
          "[i14][stream][usage]") {
  const std::string text =
      anthropic_cut_after_start() + std::string(kAnthropicErrorEvent);
  const StreamUsageResult r = whole(StreamFormat::kAnthropic, text);
  CHECK_FALSE(r.complete);
  REQUIRE(r.usage.has_value());
  CHECK(r.usage->source == UsageSource::kPartial);
  CHECK(r.usage->output == 1);
  REQUIRE(r.error.has_value());
  CHECK(r.error->type == "overloaded_error");
  CHECK(r.error->message == "Overloaded");
  const absl::Status st = r.error->status();
  CHECK(st.code() == absl::StatusCode::kUnavailable);
  CHECK(st.message() == "Anthropic error overloaded_error: Overloaded");
  CHECK(r.parsed == 2);
  check_all_splits(StreamFormat::kAnthropic, text, r);

  // An error event after a whole message_delta still makes it partial.
  const std::string done =
      read_sample("provider-samples/anthropic-sdk-streams/basic_response.txt");
  const StreamUsageResult late =
      whole(StreamFormat::kAnthropic,
            done + "\n\n" + std::string(kAnthropicErrorEvent));
  CHECK_FALSE(late.complete);
  CHECK(late.usage->output == 6);
  CHECK(late.usage->source == UsageSource::kPartial);
}

TEST_CASE("OpenAI Responses stream: usage from response.completed",
          "[i14][stream]") {
  // No recording: built from OpenAI's documented streaming example (API
  // reference, Responses, "Streaming events": response.created,
  // response.in_progress, output item and text events, response.completed
  // whose response carries the usage; no [DONE]). response.created and
  // in_progress carry "usage":null and "error":null: never parsed.
  const std::string created =
      R"({"type":"response.created","sequence_number":0,"response":{"id":"resp_67c9fdcecf488190bdd9a0409de3a1ec07b8b0ad4e5eb654","object":"response","created_at":1741290958,"status":"in_progress","error":null,"incomplete_details":null,"instructions":"You are a helpful assistant.","max_output_tokens":null,"model":"gpt-4.1-2025-04-14","output":[],"parallel_tool_calls":true,"previous_response_id":null,"reasoning":{"effort":null,"summary":null},"store":true,"temperature":1.0,"text":{"format":{"type":"text"}},"tool_choice":"auto","tools":[],"top_p":1.0,"truncation":"disabled","usage":null,"user":null,"metadata":{}}})";
  std::string in_progress = created;
  in_progress.replace(in_progress.find("response.created"), 16,
                      "response.in_progress");
  const std::string text =
      "event: response.created\ndata: " + created +
      "\n\nevent: response.in_progress\ndata: " + in_progress +
      "\n\n"
      "event: response.output_item.added\n"
      R"(data: {"type":"response.output_item.added","sequence_number":2,"output_index":0,"item":{"id":"msg_67c9fdcf37fc8190ba82116e33fb28c507b8b0ad4e5eb654","type":"message","status":"in_progress","role":"assistant","content":[]}})"
      "\n\n"
      "event: response.output_text.delta\n"
      R"(data: {"type":"response.output_text.delta","sequence_number":3,"item_id":"msg_67c9fdcf37fc8190ba82116e33fb28c507b8b0ad4e5eb654","output_index":0,"content_index":0,"delta":"Hi"})"
      "\n\n"
      "event: response.output_text.delta\n"
      R"(data: {"type":"response.output_text.delta","sequence_number":4,"item_id":"msg_67c9fdcf37fc8190ba82116e33fb28c507b8b0ad4e5eb654","output_index":0,"content_index":0,"delta":" there! How can I assist you today? \u00e9\u2014"})"
      "\n\n"
      "event: response.completed\n"
      R"(data: {"type":"response.completed","sequence_number":5,"response":{"id":"resp_67c9fdcecf488190bdd9a0409de3a1ec07b8b0ad4e5eb654","object":"response","created_at":1741290958,"status":"completed","error":null,"incomplete_details":null,"model":"gpt-4.1-2025-04-14","output":[{"id":"msg_67c9fdcf37fc8190ba82116e33fb28c507b8b0ad4e5eb654","type":"message","status":"completed","role":"assistant","content":[{"type":"output_text","text":"Hi there! How can I assist you today? é—","annotations":[]}]}],"usage":{"input_tokens":37,"input_tokens_details":{"cached_tokens":0},"output_tokens":11,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":48},"user":null,"metadata":{}}})"
      "\n\n";
  StreamUsageResult expected;
  Usage u;
  u.input_uncached = 37;
  u.output = 11;
  u.provider = Provider::kOpenAIResponses;
  expected.usage = u;
  expected.complete = true;
  expected.ended = true;
  expected.events = 6;
  expected.parsed = 1;
  CHECK(whole(StreamFormat::kOpenAIResponses, text) == expected);
  check_all_splits(StreamFormat::kOpenAIResponses, text, expected);

  // Cut before response.completed: no usage, not ended.
  const std::string cut =
      text.substr(0, text.find("event: response.completed"));
  const StreamUsageResult c = whole(StreamFormat::kOpenAIResponses, cut);
  CHECK_FALSE(c.complete);
  CHECK_FALSE(c.usage.has_value());
  CHECK_FALSE(c.ended);
  CHECK(c.parsed == 0);

  // response.failed (documented shape: the response's error object).
  const std::string failed =
      cut +
      "event: response.failed\n"
      R"(data: {"type":"response.failed","sequence_number":5,"response":{"id":"resp_1","object":"response","status":"failed","error":{"code":"server_error","message":"The model failed to generate a response."},"usage":null}})"
      "\n\n";
  const StreamUsageResult f = whole(StreamFormat::kOpenAIResponses, failed);
  CHECK_FALSE(f.complete);
  CHECK(f.ended);
  REQUIRE(f.error.has_value());
  CHECK(f.error->type == "server_error");
  CHECK(f.error->status().code() == absl::StatusCode::kUnavailable);
  CHECK(f.error->status().message() ==
        "OpenAI Responses error server_error: The model failed to generate a "
        "response.");

  // The documented `error` event: fields at the top level.
  const StreamUsageResult e = whole(
      StreamFormat::kOpenAIResponses,
      cut +
          "event: error\n"
          R"(data: {"type":"error","code":"ERR_SOMETHING","message":"Something went wrong","param":null,"sequence_number":5})"
          "\n\n");
  REQUIRE(e.error.has_value());
  CHECK(e.error->type == "ERR_SOMETHING");
  CHECK(e.error->status().code() == absl::StatusCode::kFailedPrecondition);
  CHECK_FALSE(e.complete);
}

TEST_CASE("DeepSeek and OpenAI-compatible Chat streams", "[i14][stream]") {
  // No recording: built from DeepSeek's documented Chat Completions stream
  // (OpenAI's format; with stream_options.include_usage the last chunk,
  // the one with the finish_reason, carries the usage, with DeepSeek's
  // prompt_cache_hit_tokens / prompt_cache_miss_tokens beside OpenAI's
  // fields), then [DONE].
  const std::string text =
      R"(data: {"id":"a1b2","object":"chat.completion.chunk","created":1718345013,"model":"deepseek-chat","system_fingerprint":"fp_a49d71b8a1","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],"usage":null})"
      "\n\n"
      R"(data: {"id":"a1b2","object":"chat.completion.chunk","created":1718345013,"model":"deepseek-chat","system_fingerprint":"fp_a49d71b8a1","choices":[{"index":0,"delta":{"content":"Hello!"},"logprobs":null,"finish_reason":null}],"usage":null})"
      "\n\n"
      R"(data: {"id":"a1b2","object":"chat.completion.chunk","created":1718345013,"model":"deepseek-chat","system_fingerprint":"fp_a49d71b8a1","choices":[{"index":0,"delta":{"content":""},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":16,"completion_tokens":10,"total_tokens":26,"prompt_tokens_details":{"cached_tokens":0},"prompt_cache_hit_tokens":0,"prompt_cache_miss_tokens":16}})"
      "\n\n"
      "data: [DONE]\n\n";
  const StreamUsageResult r = whole(StreamFormat::kOpenAIChat, text);
  CHECK(r.complete);
  CHECK(r.ended);
  REQUIRE(r.usage.has_value());
  CHECK(r.usage->input_total() == 16);
  CHECK(r.usage->output == 10);
  CHECK(r.parsed == 1);  // "usage":null chunks are not parsed
  check_all_splits(StreamFormat::kOpenAIChat, text, r);

  // Running usage on every chunk (as some OpenAI-compatible servers send):
  // the last wins, and a stream cut before the end is partial.
  const std::string running =
      R"(data: {"choices":[{"index":0,"delta":{"content":"a"},"finish_reason":null}],"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}})"
      "\n\n"
      R"(data: {"choices":[{"index":0,"delta":{"content":"b"},"finish_reason":null}],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}})"
      "\n\n";
  const StreamUsageResult p = whole(StreamFormat::kOpenAIChat, running);
  CHECK_FALSE(p.complete);
  CHECK(p.usage->output == 2);
  CHECK(p.usage->source == UsageSource::kPartial);
  const StreamUsageResult d =
      whole(StreamFormat::kOpenAIChat, running + "data: [DONE]\n\n");
  CHECK(d.complete);
  CHECK(d.usage->output == 2);
}

TEST_CASE("OpenAI error chunk, malformed usage, SSE framing", "[i14][stream]") {
  SECTION("an error chunk mid-stream") {
    const std::string text =
        R"(data: {"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]})"
        "\n\n"
        R"(data: {"error":{"message":"The server had an error while processing your request.","type":"server_error","param":null,"code":null}})"
        "\n\n";
    const StreamUsageResult r = whole(StreamFormat::kOpenAIChat, text);
    CHECK_FALSE(r.complete);
    CHECK_FALSE(r.usage.has_value());
    REQUIRE(r.error.has_value());
    CHECK(r.error->status().code() == absl::StatusCode::kUnavailable);
    CHECK(r.error->status().message() ==
          "OpenAI error server_error: The server had an error while "
          "processing your request.");
  }
  SECTION("an error after the usage chunk, whole or cut, makes it partial") {
    const std::string usage =
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,"
        "\"completion_tokens\":2}}\n\n";
    const std::string error =
        R"(data: {"error":{"message":"boom","type":"server_error"}})";
    const StreamUsageResult whole_error =
        whole(StreamFormat::kOpenAIChat, usage + error + "\n\n");
    CHECK_FALSE(whole_error.complete);
    REQUIRE(whole_error.usage.has_value());
    CHECK(whole_error.usage->source == UsageSource::kPartial);
    CHECK(whole_error.error.has_value());
    // The connection dropped inside an event that names an error.
    const StreamUsageResult cut_error = whole(
        StreamFormat::kOpenAIChat, usage + error.substr(0, error.size() - 9));
    CHECK_FALSE(cut_error.complete);
    CHECK_FALSE(cut_error.error.has_value());
    CHECK(cut_error.status.ok());
    CHECK(cut_error.usage->source == UsageSource::kPartial);
  }
  SECTION("a usage chunk without completion_tokens is an error, not $0") {
    const StreamUsageResult r =
        whole(StreamFormat::kOpenAIChat,
              "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9}}\n\n"
              "data: [DONE]\n\n");
    CHECK_FALSE(r.complete);
    CHECK_FALSE(r.usage.has_value());
    CHECK(r.status.code() == absl::StatusCode::kInvalidArgument);
    CHECK(r.status.message().find("completion_tokens") !=
          std::string_view::npos);
  }
  SECTION("a usage event that is not JSON, mid-stream") {
    const StreamUsageResult r =
        whole(StreamFormat::kOpenAIChat,
              "data: {\"usage\":{\"prompt_tokens\":1,\n\ndata: [DONE]\n\n");
    CHECK(r.status.code() == absl::StatusCode::kInvalidArgument);
    CHECK_FALSE(r.complete);
  }
  SECTION("multi-line data, comments, other fields, a BOM, no space") {
    const std::string text =
        "\xEF\xBB\xBF: a comment\n"
        "id: 7\nretry: 1000\nevent: message\n"
        "data:{\"choices\":[],\n"
        "data: \"usage\" :\n"
        "data:  {\"prompt_tokens\":3,\"completion_tokens\":4}}\n"
        "\n"
        "data:[DONE]\n\n";
    const StreamUsageResult r = whole(StreamFormat::kOpenAIChat, text);
    CHECK(r.status.ok());
    CHECK(r.complete);
    REQUIRE(r.usage.has_value());
    CHECK(r.usage->input_uncached == 3);
    CHECK(r.usage->output == 4);
    CHECK(r.events == 2);
    check_all_splits(StreamFormat::kOpenAIChat, text, r);
  }
  SECTION("an event over the size limit is dropped and said") {
    StreamUsageReader reader(StreamFormat::kOpenAIChat, 64);
    reader.feed("data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,");
    reader.feed(std::string(100, ' '));
    reader.feed("\"completion_tokens\":4}}\n\ndata: [DONE]\n\n");
    const StreamUsageResult r = reader.finish();
    CHECK(r.status.code() == absl::StatusCode::kOutOfRange);
    CHECK_FALSE(r.usage.has_value());
    CHECK_FALSE(r.complete);
    CHECK(r.ended);
  }
  SECTION("finish() is final") {
    StreamUsageReader reader(StreamFormat::kOpenAIChat);
    reader.feed("data: [DONE]\n\n");
    const StreamUsageResult first = reader.finish();
    reader.feed(
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,"
        "\"completion_tokens\":4}}\n\n");
    CHECK(reader.finish() == first);
    CHECK_FALSE(first.usage.has_value());
  }
}

namespace {

// claude-3-opus's list prices: $15 per million input tokens (15,000
// nano-USD a token), $75 per million output tokens (75,000 a token).
PriceTable opus_prices() {
  PriceTable t;
  REQUIRE(
      t.set("claude-3-opus",
            {.base = {.input = TokenPrice::per_million_micros(15'000'000),
                      .output = TokenPrice::per_million_micros(75'000'000)}})
          .ok());
  return t;
}

const Nanos kT0{1'796'083'200LL * 1'000'000'000};  // 2026-12-01 UTC

}  // namespace

TEST_CASE("a partial stream settles at the worst case or the caller's count",
          "[i14][stream][accountant]") {
  ManualClock clock(kT0);
  Accountant<ManualClock> acct(opus_prices(), clock);
  constexpr std::uint64_t kLimit = 1'000'000'000'000;  // $1,000
  REQUIRE(
      acct.add_budget({.name = "team",
                       .scope = Field::kTeam,
                       .unit = BudgetUnit::kNanoUsd,
                       .limit = kLimit,
                       .period = Period::calendar(PeriodKind::kMonth).value()})
          .ok());
  const Subject who{.user = "u", .team = "t"};
  Limit* team = acct.budgets()[0];
  const auto spent = [&] {
    return kLimit - team->peek("\x04\x01t", 0, clock.now()).remaining;
  };
  const StreamUsageResult cut =
      whole(StreamFormat::kAnthropic, anthropic_cut_after_start());
  REQUIRE(cut.usage.has_value());
  REQUIRE_FALSE(cut.complete);

  SECTION("settle(partial): the reservation's worst-case output") {
    auto r = acct.reserve(who, "claude-3-opus",
                          {.prompt_tokens = 11, .max_output_tokens = 4096},
                          "req-cut-1");
    REQUIRE(r.ok());
    REQUIRE(r->granted());
    // 11 x 15,000 + 4,096 x 75,000 = 165,000 + 307,200,000.
    CHECK(r->reserved_money() == Money{307'365'000});
    const auto s = r->settle(*cut.usage);
    REQUIRE(s.ok());
    CHECK(s->cost == Money{307'365'000});  // not 11 x 15,000 + 1 x 75,000
    CHECK(s->cost != Money{240'000});
    CHECK(s->tokens == 11 + 4096);
    CHECK(s->estimated);
    CHECK(spent() == 307'365'000);
  }
  SECTION("settle_partial: the caller's count of the deltas") {
    auto r = acct.reserve(who, "claude-3-opus",
                          {.prompt_tokens = 11, .max_output_tokens = 4096},
                          "req-cut-2");
    REQUIRE(r.ok());
    // 4,000 deltas counted: 11 x 15,000 + 4,000 x 75,000.
    const auto s = r->settle_partial(*cut.usage, 4000);
    REQUIRE(s.ok());
    CHECK(s->cost == Money{300'165'000});
    CHECK(s->tokens == 4011);
    CHECK(s->estimated);
    CHECK(spent() == 300'165'000);
  }
  SECTION("the worst case includes what next_chunk_fits grew it to") {
    auto r = acct.reserve(who, "claude-3-opus",
                          {.prompt_tokens = 11, .max_output_tokens = 100},
                          "req-cut-3");
    REQUIRE(r.ok());
    REQUIRE(*r->next_chunk_fits(100, 50));
    const auto s = r->settle(*cut.usage);
    REQUIRE(s.ok());
    // 11 x 15,000 + 150 x 75,000 = 165,000 + 11,250,000.
    CHECK(s->cost == Money{11'415'000});
    CHECK(spent() == 11'415'000);
  }
  SECTION("a complete stream settles to its reported usage") {
    const StreamUsageResult done =
        whole(StreamFormat::kAnthropic,
              read_sample(
                  "provider-samples/anthropic-sdk-streams/basic_response.txt"));
    REQUIRE(done.complete);
    auto r = acct.reserve(who, "claude-3-opus",
                          {.prompt_tokens = 11, .max_output_tokens = 4096},
                          "req-done");
    REQUIRE(r.ok());
    const auto s = r->settle(*done.usage);
    REQUIRE(s.ok());
    // 11 x 15,000 + 6 x 75,000 = 165,000 + 450,000.
    CHECK(s->cost == Money{615'000});
    CHECK_FALSE(s->estimated);
    CHECK(spent() == 615'000);
  }
  SECTION("a partial usage with no input side charges the prompt estimate") {
    Usage nothing;
    nothing.provider = Provider::kOpenAIChat;
    nothing.source = UsageSource::kPartial;
    auto r = acct.reserve(who, "claude-3-opus",
                          {.prompt_tokens = 200, .max_output_tokens = 300},
                          "req-none");
    REQUIRE(r.ok());
    const auto s = r->settle(nothing);
    REQUIRE(s.ok());
    // 200 x 15,000 + 300 x 75,000 = 3,000,000 + 22,500,000.
    CHECK(s->cost == Money{25'500'000});
    CHECK(spent() == 25'500'000);
  }
}
