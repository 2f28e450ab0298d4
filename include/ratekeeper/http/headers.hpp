// ratekeeper/http/headers.hpp: a decision as the HTTP headers a server sends.
//
// Defines rate_limit_headers(), rendering a ChainDecision (or one Decision)
// in three dialects at once, each optional:
//
//   Retry-After: 2                           refusals only; whole seconds,
//                                            rounded up (RFC 9110)
//   x-ratelimit-limit-requests: 60           OpenAI's six headers: the
//   x-ratelimit-remaining-requests: 59       binding request limit and the
//   x-ratelimit-reset-requests: 1s           binding token limit, resets as
//   x-ratelimit-limit-tokens: 90000          Go durations ("1s", "6m0s",
//   x-ratelimit-remaining-tokens: 89000      "12ms"), rounded up to the ms
//   x-ratelimit-reset-tokens: 667ms
//   RateLimit-Policy: "rpm";q=60;w=60,
//   "tpm";q=90000;w=60;qu="ratekeeper-tokens" RateLimit: "rpm";r=59;t=1,
//   "tpm";r=89000;t=1
//                                            draft-ietf-httpapi-ratelimit-
//                                            headers-10: Structured Field
//                                            lists, one item per limit
//
// Shadow limits are left out: they do not bind the client. The IETF draft's
// quota units are requests, content-bytes and concurrent-requests; tokens
// need a vendor-prefixed unit ("ratekeeper-tokens" unless you name another),
// and so do budgets in money ("ratekeeper-nano-usd"); OpenAI's headers have
// no money dialect and leave budgets in money out.
// A token bucket's window `w` is the time it takes to refill its burst.
#ifndef RATEKEEPER_HTTP_HEADERS_HPP_
#define RATEKEEPER_HTTP_HEADERS_HPP_

#include <fmt/format.h>

#include <cstdint>
#include <iterator>
#include <string>
#include <string_view>
#include <vector>

#include "ratekeeper/chain.hpp"
#include "ratekeeper/decision.hpp"

namespace ratekeeper::http {

struct Header {
  std::string name;
  std::string value;
  friend bool operator==(const Header&, const Header&) = default;
};
using Headers = std::vector<Header>;

// HeaderOptions: which dialects to write.
struct HeaderOptions {
  bool retry_after = true;
  bool openai = true;
  bool ietf = true;
  // The IETF quota units ("qu") of token limits and of money budgets
  // (nano-USD); request limits use the draft's default unit and carry no
  // "qu".
  std::string token_unit = "ratekeeper-tokens";
  std::string money_unit = "ratekeeper-nano-usd";
};

// go_duration
//
// `d` rounded up to the millisecond, written as Go's time.Duration.String()
// writes it: "0s", "12ms", "1s", "1.5s", "6m0s", "1h0m0s", "26h3m4.005s".
// Negative durations are "0s"; kNever is written as its value (about 292
// years).
inline std::string go_duration(Nanos d) {
  if (d <= Nanos{0}) return "0s";
  const std::uint64_t ns = static_cast<std::uint64_t>(d.count());
  const std::uint64_t ms = ns / 1'000'000 + (ns % 1'000'000 != 0 ? 1 : 0);
  if (ms < 1000) return fmt::format("{}ms", ms);
  const std::uint64_t total_s = ms / 1000;
  const std::uint64_t frac = ms % 1000;
  std::string secs = fmt::format("{}", total_s % 60);
  if (frac != 0) {
    std::string f = fmt::format("{:03}", frac);
    while (f.back() == '0') f.pop_back();
    secs += "." + f;
  }
  const std::uint64_t total_m = total_s / 60;
  if (total_m == 0) return secs + "s";
  const std::uint64_t h = total_m / 60;
  if (h == 0) return fmt::format("{}m{}s", total_m % 60, secs);
  return fmt::format("{}h{}m{}s", h, total_m % 60, secs);
}

// delta_seconds
//
// Whole seconds, rounded up, for Retry-After and the IETF fields: a client
// told to wait 1 s for a 300 ms wait is early never.
inline std::uint64_t delta_seconds(Nanos d) noexcept {
  if (d <= Nanos{0}) return 0;
  const auto ns = static_cast<std::uint64_t>(d.count());
  return ns / 1'000'000'000 + (ns % 1'000'000'000 != 0 ? 1 : 0);
}

// LimitView: what the headers say of one limit.
struct LimitView {
  std::string_view name;
  Unit unit = Unit::kRequests;
  Decision decision;
  Nanos window{0};
};

namespace detail {

inline void append_openai(const std::vector<LimitView>& views, Unit unit,
                          std::string_view suffix, Headers& out) {
  const LimitView* pick = nullptr;
  for (const LimitView& v : views) {
    if (v.unit != unit) continue;
    if (pick == nullptr) {
      pick = &v;
      continue;
    }
    const Decision& a = v.decision;
    const Decision& b = pick->decision;
    // A refusal binds over an admission; among refusals the longest wait;
    // among admissions the least room relative to capacity.
    if (a.allowed != b.allowed) {
      if (!a.allowed) pick = &v;
    } else if (!a.allowed) {
      if (a.retry_after > b.retry_after) pick = &v;
    } else if (ratekeeper::detail::less_room(a, b)) {
      pick = &v;
    }
  }
  if (pick == nullptr) return;
  out.push_back({fmt::format("x-ratelimit-limit-{}", suffix),
                 fmt::format("{}", pick->decision.limit)});
  out.push_back({fmt::format("x-ratelimit-remaining-{}", suffix),
                 fmt::format("{}", pick->decision.remaining)});
  out.push_back({fmt::format("x-ratelimit-reset-{}", suffix),
                 go_duration(pick->decision.reset_after)});
}

inline void append_headers(const std::vector<LimitView>& views, bool refused,
                           Nanos retry_after, const HeaderOptions& o,
                           Headers& out) {
  if (o.retry_after && refused && retry_after != kNever) {
    out.push_back(
        {"Retry-After", fmt::format("{}", delta_seconds(retry_after))});
  }
  if (o.openai) {
    append_openai(views, Unit::kRequests, "requests", out);
    append_openai(views, Unit::kTokens, "tokens", out);
  }
  if (o.ietf && !views.empty()) {
    std::string policy;
    std::string state;
    for (const LimitView& v : views) {
      if (!policy.empty()) {
        policy += ", ";
        state += ", ";
      }
      // Names are [A-Za-z0-9_.:-] (LimitOptions), valid in an sf-string.
      fmt::format_to(std::back_inserter(policy), "\"{}\";q={};w={}", v.name,
                     v.decision.limit, delta_seconds(v.window));
      if (v.unit != Unit::kRequests) {
        fmt::format_to(std::back_inserter(policy), ";qu=\"{}\"",
                       v.unit == Unit::kTokens ? o.token_unit : o.money_unit);
      }
      fmt::format_to(std::back_inserter(state), "\"{}\";r={};t={}", v.name,
                     v.decision.remaining,
                     delta_seconds(v.decision.reset_after));
    }
    out.push_back({"RateLimit-Policy", std::move(policy)});
    out.push_back({"RateLimit", std::move(state)});
  }
}

}  // namespace detail

// rate_limit_headers
//
// The headers of a chain's decision. A refusal carries Retry-After unless
// no wait can admit the call (ChainDecision::never()).
inline Headers rate_limit_headers(const ChainDecision& d,
                                  const HeaderOptions& o = {}) {
  std::vector<LimitView> views;
  for (const LimitResult& r : d.results) {
    if (r.limit->shadow() || r.shadow_denied) continue;
    views.push_back(
        {r.limit->name(), r.limit->unit(), r.decision, r.limit->window()});
  }
  Headers out;
  detail::append_headers(views, !d.allowed, d.retry_after, o, out);
  return out;
}

// rate_limit_headers
//
// The headers of one limit's decision (a Limiter's), described by `view`.
inline Headers rate_limit_headers(const LimitView& view,
                                  const HeaderOptions& o = {}) {
  std::vector<LimitView> views;
  views.push_back(view);
  Headers out;
  detail::append_headers(views, !view.decision.allowed,
                         view.decision.retry_after, o, out);
  return out;
}

}  // namespace ratekeeper::http

#endif  // RATEKEEPER_HTTP_HEADERS_HPP_
