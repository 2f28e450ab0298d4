// ratekeeper/budget/stream.hpp: the usage of a streamed (SSE) answer.
//
// Defines StreamUsageReader, which reads an OpenAI Chat Completions, OpenAI
// Responses or Anthropic Messages server-sent-event stream as its bytes
// arrive and says at the end what the call used (StreamUsageResult): the
// normalized Usage, whether it is complete or partial, and the provider's
// error if the stream carried one. Prefer it to feeding each event to the
// readers of json.hpp yourself: it does the SSE framing, parses only the
// events that can carry usage or an error, and knows each API's end.
//
//   StreamUsageReader reader(StreamFormat::kAnthropic);
//   while (auto chunk = upstream.read()) {   // any split of the bytes
//     forward(*chunk);
//     reader.feed(*chunk);
//   }
//   const StreamUsageResult res = reader.finish();
//   if (res.usage) r->settle(*res.usage);  // partial: the worst case
//   else r->settle_without_usage(counted_output_tokens);
//
// With a count of the output streamed, settle a partial usage with
// r->settle_partial(*res.usage, counted_output_tokens) instead.
//
// Framing (the WHATWG SSE rules): lines end in LF, CRLF or CR, a chunk may
// end anywhere (mid-line, between CR and LF, mid-UTF-8); `data:` lines
// (one leading space dropped) are joined with LF into the event's data,
// which a blank line dispatches; comments (`:`), `event:`, `id:` and
// `retry:` lines are read and ignored (each payload's own "type" decides);
// a leading UTF-8 BOM is dropped. At finish() an unterminated last line
// and event are dispatched too (recordings often lack the final blank
// line); if that last event is cut mid-JSON, the stream is partial.
//
// Cost: one pass over each event's bytes looks for the member names
// `"usage"` (followed by an object), `"error"` (an object) and `"type"`
// valued "error"; only such events are JSON-parsed. Chat's `"usage":null`
// chunks and all text deltas are never parsed.
//
// Complete, per format (anything else is partial, usage flagged
// UsageSource::kPartial, or no usage at all):
//   kOpenAIChat       a usage object in the final chunk (choices empty, or
//                     a finish_reason set), or followed by [DONE]; also
//                     OpenAI-compatible APIs (DeepSeek, ...)
//   kOpenAIResponses  response.completed or response.incomplete with usage
//   kAnthropic        message_start and a message_delta with a stop_reason
//                     (AnthropicStreamUsage)
// and never when the stream carried an error event, when a usage event
// could not be read (status), or when the last event was cut.
#ifndef RATEKEEPER_BUDGET_STREAM_HPP_
#define RATEKEEPER_BUDGET_STREAM_HPP_

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "ratekeeper/budget/json.hpp"
#include "ratekeeper/budget/usage.hpp"

namespace ratekeeper {

// StreamFormat: which API's stream a StreamUsageReader reads.
enum class StreamFormat : std::uint8_t {
  kOpenAIChat,       // Chat Completions (and OpenAI-compatible APIs)
  kOpenAIResponses,  // Responses
  kAnthropic,        // Messages
};

// StreamUsageResult: what a stream said about its usage.
//
//   usage     normalized; source kReported when complete, kPartial when
//             not; nullopt when the stream carried no usage (a Chat stream
//             without stream_options.include_usage, or one cut before it)
//   complete  usage is the provider's final count (see stream.hpp's top)
//   ended     the stream's own end was seen: [DONE], message_stop, or
//             response.completed / incomplete / failed
//   error     the provider's error event, if any (the first one)
//   status    OK, or why an event that carried usage could not be read
//             (malformed JSON, a missing required field, inconsistent
//             counts, an event over the size limit): the first such
//   events    SSE events dispatched; parsed: how many were JSON-parsed
struct StreamUsageResult {
  std::optional<Usage> usage;
  bool complete = false;
  bool ended = false;
  std::optional<ProviderError> error;
  absl::Status status;
  std::uint64_t events = 0;
  std::uint64_t parsed = 0;
  friend bool operator==(const StreamUsageResult&,
                         const StreamUsageResult&) = default;
};

namespace detail {

// What one pass over an event's bytes found (see stream.hpp's top).
struct SseMarks {
  bool usage = false;         // "usage": {
  bool error = false;         // "error": {
  bool type_error = false;    // "type": "error"
  bool message_stop = false;  // "message_stop"
  bool candidate() const noexcept { return usage || error || type_error; }
};

inline const char* skip_json_ws(const char* p, const char* end) noexcept {
  while (p != end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) {
    ++p;
  }
  return p;
}

// Whether a member's value, after the key's closing quote at `p`, starts
// with `value`.
inline bool value_starts(const char* p, const char* end,
                         std::string_view value) noexcept {
  p = skip_json_ws(p, end);
  if (p == end || *p != ':') return false;
  p = skip_json_ws(p + 1, end);
  return static_cast<std::size_t>(end - p) >= value.size() &&
         std::memcmp(p, value.data(), value.size()) == 0;
}

// One pass: at each '"', the names that matter. An escaped quote inside a
// string (\") never starts a match: the name must end in a bare quote.
inline SseMarks scan_sse_payload(std::string_view s) noexcept {
  SseMarks m;
  const char* p = s.data();
  const char* const end = p + s.size();
  const auto at = [&](std::string_view word) {
    return static_cast<std::size_t>(end - p) >= word.size() &&
           std::memcmp(p, word.data(), word.size()) == 0;
  };
  while (p != end) {
    p = static_cast<const char*>(
        std::memchr(p, '"', static_cast<std::size_t>(end - p)));
    if (p == nullptr) break;
    ++p;
    if (at("usage\"")) {
      p += 6;
      m.usage = m.usage || value_starts(p, end, "{");
    } else if (at("error\"")) {
      p += 6;
      m.error = m.error || value_starts(p, end, "{");
    } else if (at("type\"")) {
      p += 5;
      m.type_error = m.type_error || value_starts(p, end, "\"error\"");
    } else if (at("message_stop\"")) {
      p += 13;
      m.message_stop = true;
    }
  }
  return m;
}

inline std::string_view trim_sse(std::string_view s) noexcept {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) {
    s.remove_prefix(1);
  }
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) {
    s.remove_suffix(1);
  }
  return s;
}

}  // namespace detail

// StreamUsageReader: one stream's usage, fed its bytes as they arrive.
// Memory: the current line and event (at most max_event_bytes each) and
// the usage so far. Not thread-safe (one stream, one reader).
class StreamUsageReader {
 public:
  // Largest SSE line or event kept by default (a Responses
  // response.completed carries the whole answer).
  static constexpr std::size_t kDefaultMaxEventBytes = std::size_t{16} << 20;

  explicit StreamUsageReader(
      StreamFormat format,
      std::size_t max_event_bytes = kDefaultMaxEventBytes) noexcept
      : format_(format), max_event_bytes_(max_event_bytes) {}

  // feed
  //
  // The next bytes of the stream, split anywhere. Never fails: what cannot
  // be read shows in finish()'s result. Ignored after finish().
  void feed(std::string_view bytes) {
    if (finished_ || bytes.empty()) return;
    std::size_t i = 0;
    if (skip_lf_) {
      skip_lf_ = false;
      if (bytes[0] == '\n') i = 1;
    }
    const char* const base = bytes.data();
    while (i < bytes.size()) {
      const std::size_t n = bytes.size() - i;
      const char* lf = static_cast<const char*>(std::memchr(base + i, '\n', n));
      const std::size_t upto =
          lf == nullptr ? n : static_cast<std::size_t>(lf - (base + i));
      const char* cr =
          static_cast<const char*>(std::memchr(base + i, '\r', upto));
      const char* eol = cr != nullptr ? cr : lf;
      if (eol == nullptr) {
        append_line(bytes.substr(i));
        return;
      }
      const std::size_t j = static_cast<std::size_t>(eol - base);
      if (line_.empty() && !too_long_) {
        on_line(bytes.substr(i, j - i), false);
      } else {
        append_line(bytes.substr(i, j - i));
        end_buffered_line(false);
      }
      i = j + 1;
      if (*eol == '\r') {
        if (i < bytes.size()) {
          if (bytes[i] == '\n') ++i;
        } else {
          skip_lf_ = true;
        }
      }
    }
  }

  // finish
  //
  // The end of the stream (the upstream closed it, or the caller stopped
  // reading): dispatches what is pending and returns the result. Call it
  // once; later calls return the same result.
  const StreamUsageResult& finish() {
    if (finished_) return result_;
    if (!line_.empty() || too_long_) end_buffered_line(true);
    dispatch(true);
    finished_ = true;
    StreamUsageResult& r = result_;
    r.events = events_;
    r.parsed = parsed_;
    r.status = status_;
    switch (format_) {
      case StreamFormat::kAnthropic: {
        r.error = anthropic_.error();
        absl::StatusOr<Usage> u = anthropic_.to_usage();
        if (u.ok()) {
          usage_ = *u;
        } else if (u.status().code() != absl::StatusCode::kNotFound &&
                   r.status.ok()) {
          r.status = u.status();
        }
        final_ = anthropic_.complete();
        break;
      }
      case StreamFormat::kOpenAIChat:
        r.error = error_;
        final_ = final_ || (usage_ && done_after_usage_);
        break;
      case StreamFormat::kOpenAIResponses:
        r.error = error_;
        break;
    }
    r.ended = ended_;
    r.complete =
        usage_.has_value() && final_ && !r.error && r.status.ok() && !cut_;
    r.usage = usage_;
    if (r.usage) {
      r.usage->source =
          r.complete ? UsageSource::kReported : UsageSource::kPartial;
    }
    return result_;
  }

 private:
  void append_line(std::string_view part) {
    if (too_long_) return;
    if (line_.size() + part.size() > max_event_bytes_) {
      too_long_ = true;
      line_.clear();
      return;
    }
    line_.append(part);
  }

  void end_buffered_line(bool at_end) {
    if (too_long_) {
      too_long_ = false;
      note(absl::OutOfRangeError(
          absl::StrCat("SSE stream: a line longer than ", max_event_bytes_,
                       " bytes was dropped; its event is lost")));
      broken_ = true;
      line_.clear();
      return;
    }
    std::string line = std::move(line_);
    line_.clear();
    on_line(line, at_end);
  }

  void on_line(std::string_view line, bool at_end) {
    if (first_line_) {
      first_line_ = false;
      if (line.starts_with("\xEF\xBB\xBF")) line.remove_prefix(3);
    }
    if (line.empty()) {
      dispatch(at_end);
      return;
    }
    if (line[0] == ':') return;  // a comment
    const std::size_t colon = line.find(':');
    const std::string_view field = line.substr(0, colon);
    if (field != "data") return;  // event, id, retry: the payload decides
    std::string_view value = colon == std::string_view::npos
                                 ? std::string_view{}
                                 : line.substr(colon + 1);
    if (!value.empty() && value[0] == ' ') value.remove_prefix(1);
    if (has_data_) {
      if (data_.size() + 1 + value.size() > max_event_bytes_) {
        note(absl::OutOfRangeError(
            absl::StrCat("SSE stream: an event longer than ", max_event_bytes_,
                         " bytes was dropped")));
        broken_ = true;
        return;
      }
      data_.push_back('\n');
    }
    data_.append(value);
    has_data_ = true;
  }

  void dispatch(bool at_end) {
    if (!has_data_) {
      broken_ = false;
      return;
    }
    ++events_;
    if (!broken_) process(data_, at_end);
    data_.clear();
    has_data_ = false;
    broken_ = false;
  }

  void note(absl::Status st) {
    if (status_.ok()) status_ = std::move(st);
  }

  void process(std::string_view payload, bool at_end) {
    if (format_ == StreamFormat::kOpenAIChat &&
        detail::trim_sse(payload) == "[DONE]") {
      ended_ = true;
      if (usage_) done_after_usage_ = true;
      return;
    }
    const detail::SseMarks m = detail::scan_sse_payload(payload);
    if (m.message_stop && format_ == StreamFormat::kAnthropic) {
      ended_ = true;
    }
    if (!m.candidate()) return;
    detail::json j = detail::json::parse(payload.begin(), payload.end(),
                                         nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.is_object()) {
      if (at_end) {
        cut_ = true;  // the last event, cut mid-way
      } else {
        note(absl::InvalidArgumentError(
            absl::StrCat("SSE stream: event ", events_,
                         " names usage or an error but is not a JSON "
                         "object")));
      }
      return;
    }
    ++parsed_;
    switch (format_) {
      case StreamFormat::kAnthropic:
        if (absl::Status st = anthropic_.feed_json(j); !st.ok()) note(st);
        return;
      case StreamFormat::kOpenAIChat:
        chat_event(j);
        return;
      case StreamFormat::kOpenAIResponses:
        responses_event(j);
        return;
    }
  }

  void chat_event(const detail::json& j) {
    if (!error_) error_ = detail::find_provider_error(j, Provider::kOpenAIChat);
    const auto u = j.find("usage");
    if (u == j.end() || !u->is_object()) return;
    absl::StatusOr<OpenAIChatUsage> raw = detail::openai_chat_usage(*u);
    if (!raw.ok()) return note(raw.status());
    absl::StatusOr<Usage> n = normalize(*raw);
    if (!n.ok()) return note(n.status());
    usage_ = *n;
    done_after_usage_ = false;
    // OpenAI's final chunk has no choices; OpenAI-compatible APIs put the
    // usage on the chunk with the finish_reason. Usage on other chunks
    // (running counts) is final only once [DONE] follows.
    bool last = true;
    if (const auto c = j.find("choices"); c != j.end() && c->is_array()) {
      last = c->empty();
      for (const auto& choice : *c) {
        const auto fr = choice.find("finish_reason");
        if (choice.is_object() && fr != choice.end() && !fr->is_null()) {
          last = true;
        }
      }
    }
    final_ = last;
  }

  void responses_event(const detail::json& j) {
    if (!error_) {
      error_ = detail::find_provider_error(j, Provider::kOpenAIResponses);
    }
    const auto type = j.find("type");
    const bool terminal =
        type != j.end() && type->is_string() &&
        (*type == "response.completed" || *type == "response.incomplete" ||
         *type == "response.failed");
    if (terminal) ended_ = true;
    const auto r = j.find("response");
    if (r == j.end() || !r->is_object()) return;
    const auto u = r->find("usage");
    if (u == r->end() || !u->is_object()) return;
    absl::StatusOr<OpenAIResponsesUsage> raw =
        detail::openai_responses_usage(*u);
    if (!raw.ok()) return note(raw.status());
    absl::StatusOr<Usage> n = normalize(*raw);
    if (!n.ok()) return note(n.status());
    usage_ = *n;
    final_ = terminal && *type != "response.failed";
  }

  StreamFormat format_;
  std::size_t max_event_bytes_;
  std::string line_;  // the current line, when it spans chunks
  std::string data_;  // the current event's data
  bool has_data_ = false;
  bool skip_lf_ = false;    // the last chunk ended in CR
  bool too_long_ = false;   // the current line is past the limit
  bool broken_ = false;     // the current event lost a line
  bool first_line_ = true;  // a BOM may open it
  bool finished_ = false;
  bool ended_ = false;
  bool cut_ = false;
  bool final_ = false;
  bool done_after_usage_ = false;
  std::uint64_t events_ = 0;
  std::uint64_t parsed_ = 0;
  absl::Status status_;
  std::optional<Usage> usage_;
  std::optional<ProviderError> error_;
  AnthropicStreamUsage anthropic_;
  StreamUsageResult result_;
};

}  // namespace ratekeeper

#endif  // RATEKEEPER_BUDGET_STREAM_HPP_
