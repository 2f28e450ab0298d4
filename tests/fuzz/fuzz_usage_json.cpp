// libFuzzer target (TESTPLAN T8): the usage JSON readers.
//
// Any bytes through the three readers, the Anthropic stream accumulator
// and the SSE stream reader (budget/stream.hpp): no crash, no sanitizer
// report; whatever is accepted normalizes to a record whose parts add up
// (or is refused as inconsistent); an error body is refused with the
// provider's error; a refused stream event leaves the usage unchanged; the
// stream reader answers the same whole, byte by byte and in the input's
// own split, and never calls a partial usage complete.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "ratekeeper/budget/json.hpp"
#include "ratekeeper/budget/stream.hpp"

namespace rk = ratekeeper;

namespace {
void check(bool ok) {
  if (!ok) std::abort();
}

void check_usage(const absl::StatusOr<rk::Usage>& u) {
  if (!u.ok()) {
    check(u.status().code() == absl::StatusCode::kInvalidArgument);
    return;
  }
  check(u->reasoning <= u->output);
  check(u->total() == u->input_total() + u->output);
}

// A reader's refusal: malformed or missing (kInvalidArgument, kNotFound),
// or, only for a body that carries an error, that error's status.
void check_refusal(const absl::Status& st, std::string_view text,
                   rk::Provider p) {
  if (st.code() == absl::StatusCode::kInvalidArgument ||
      st.code() == absl::StatusCode::kNotFound) {
    return;
  }
  const auto e = rk::read_provider_error(text, p);
  check(e.has_value() && e->status() == st);
}

void check_stream(rk::StreamFormat f, std::string_view text) {
  rk::StreamUsageReader a(f);
  a.feed(text);
  const rk::StreamUsageResult whole = a.finish();
  if (whole.complete) {
    check(whole.usage.has_value() && !whole.error && whole.status.ok());
    check(whole.usage->source == rk::UsageSource::kReported);
  } else if (whole.usage) {
    check(whole.usage->source == rk::UsageSource::kPartial);
  }
  if (whole.usage) {
    check(whole.usage->reasoning <= whole.usage->output);
  }
  check(whole.parsed <= whole.events);
  rk::StreamUsageReader b(f);
  for (const char c : text) b.feed(std::string_view(&c, 1));
  check(b.finish() == whole);
  // Split where the input's own bytes say (byte value as chunk length).
  rk::StreamUsageReader c(f);
  std::size_t i = 0;
  while (i < text.size()) {
    const std::size_t n = std::min<std::size_t>(
        text.size() - i, static_cast<unsigned char>(text[i]) % 17 + 1);
    c.feed(text.substr(i, n));
    i += n;
  }
  check(c.finish() == whole);
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data,
                                      std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  if (const auto c = rk::read_openai_chat_usage(text); c.ok()) {
    const auto u = rk::normalize(*c);
    check_usage(u);
    if (u.ok()) check(u->input_total() == c->prompt_tokens);
  } else {
    check_refusal(c.status(), text, rk::Provider::kOpenAIChat);
  }
  if (const auto r = rk::read_openai_responses_usage(text); r.ok()) {
    check_usage(rk::normalize(*r));
  } else if (r.status().code() != absl::StatusCode::kInvalidArgument &&
             r.status().code() != absl::StatusCode::kNotFound) {
    // The error of the body, or of the response inside an event.
    check(r.status().message().substr(0, 23) == "OpenAI Responses error ");
  }
  if (const auto a = rk::read_anthropic_usage(text); a.ok()) {
    const auto u = rk::normalize(*a);
    check_usage(u);
    if (u.ok()) {
      check(u->input_total() == a->input_tokens + a->cache_read_input_tokens +
                                    a->cache_creation_input_tokens);
    }
  } else {
    check_refusal(a.status(), text, rk::Provider::kAnthropic);
  }
  rk::AnthropicStreamUsage s;
  const auto before = s.usage();
  if (!s.feed(text).ok()) {
    check(s.usage().status().code() == before.status().code());
  }
  check_stream(rk::StreamFormat::kOpenAIChat, text);
  check_stream(rk::StreamFormat::kOpenAIResponses, text);
  check_stream(rk::StreamFormat::kAnthropic, text);
  return 0;
}
