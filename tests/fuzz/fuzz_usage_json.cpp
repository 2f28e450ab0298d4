// libFuzzer target (TESTPLAN T8): the usage JSON readers.
//
// Any bytes through the three readers and the Anthropic stream
// accumulator: no crash, no sanitizer report; whatever is accepted
// normalizes to a record whose parts add up (or is refused as
// inconsistent), and a refused stream event leaves the usage unchanged.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "ratekeeper/budget/json.hpp"

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
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data,
                                      std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  if (const auto c = rk::read_openai_chat_usage(text); c.ok()) {
    const auto u = rk::normalize(*c);
    check_usage(u);
    if (u.ok()) check(u->input_total() == c->prompt_tokens);
  } else {
    check(c.status().code() == absl::StatusCode::kInvalidArgument ||
          c.status().code() == absl::StatusCode::kNotFound);
  }
  if (const auto r = rk::read_openai_responses_usage(text); r.ok()) {
    check_usage(rk::normalize(*r));
  }
  if (const auto a = rk::read_anthropic_usage(text); a.ok()) {
    const auto u = rk::normalize(*a);
    check_usage(u);
    if (u.ok()) {
      check(u->input_total() == a->input_tokens + a->cache_read_input_tokens +
                                    a->cache_creation_input_tokens);
    }
  }
  rk::AnthropicStreamUsage s;
  const auto before = s.usage();
  if (!s.feed(text).ok()) {
    check(s.usage().status().code() == before.status().code());
  }
  return 0;
}
