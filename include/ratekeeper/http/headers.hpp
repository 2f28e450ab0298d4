// ratekeeper/http/headers.hpp: a decision as the HTTP answer a server sends.
//
// Defines rate_limit_headers(), rendering a ChainDecision (or one Decision)
// in four dialects at once, each optional, and refusal_response() /
// budget_exhausted_response(), the whole answer to a refused call (status,
// headers, an OpenAI-shaped JSON error body):
//
//   Retry-After: 2                 refusals only; whole seconds, rounded up
//   retry-after-ms: 1500           (RFC 9110); retry-after-ms, which both
//                                  official OpenAI SDKs read first, in ms
//                                  rounded up (so Retry-After is always
//                                  ceil(retry-after-ms / 1000))
//   x-should-retry: false          where no retry can help: a call larger
//                                  than a limit (413), an exhausted budget,
//                                  a wait above HeaderOptions::max_retry_wait.
//                                  Never "true": the SDKs retry a 429 on
//                                  their own
//   x-ratelimit-limit-requests: 60       OpenAI's six headers: the binding
//   x-ratelimit-remaining-requests: 59   request limit and the binding token
//   x-ratelimit-reset-requests: 1s       limit, resets (to full) as Go
//   x-ratelimit-limit-tokens: 90000      durations ("1s", "6m0s", "12ms"),
//   x-ratelimit-remaining-tokens: 89000  rounded up to the ms
//   x-ratelimit-reset-tokens: 667ms
//   RateLimit-Policy: "rpm";q=60;w=60,
//   "tpm";q=90000;w=60;qu="ratekeeper-tokens" RateLimit: "rpm";r=59;t=1,
//   "tpm";r=89000;t=1
//                                  draft-ietf-httpapi-ratelimit-headers-10:
//                                  Structured Field lists (RFC 8941), one
//                                  item per limit
//
// The IETF fields:
//   q, r   the capacity and what remains, saturated at 999999999999999
//          (the largest sf-integer).
//   w      the window in whole seconds, rounded up: a window policy's period,
//          or the time a token bucket takes to refill its burst. A budget
//          (PeriodBudget: per calendar day, week or month, or a rolling
//          period) has no fixed window the Limit reports, and the draft
//          requires w > 0: its item leaves `w` out. Never `w=0`.
//   t      the seconds until more quota is available, rounded up: for a
//          limit that refuses the call, the wait after which it admits it
//          (never later than Retry-After, which is the longest such wait);
//          for a limit that admits it, the wait until it is full again.
//   qu     request limits use the draft's default unit and carry none;
//          tokens and money need a vendor-prefixed unit
//          ("ratekeeper-tokens", "ratekeeper-nano-usd" unless you name
//          others).
//
// Shadow limits are left out: they do not bind the client. OpenAI's headers
// have no money dialect and leave budgets in money out.
//
// The answer to a refusal, directly usable by an HTTP server:
//
//   const http::Response a = http::refusal_response(d);   // or a Reservation
//   res.status = a.status;
//   for (const http::Header& h : a.headers) res.set_header(h.name, h.value);
//   res.body = a.body;  // Content-Type is among the headers
#ifndef RATEKEEPER_HTTP_HEADERS_HPP_
#define RATEKEEPER_HTTP_HEADERS_HPP_

#include <fmt/format.h>

#include <chrono>
#include <concepts>
#include <cstdint>
#include <iterator>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "ratekeeper/chain.hpp"
#include "ratekeeper/config.hpp"
#include "ratekeeper/decision.hpp"
#include "ratekeeper/errors.hpp"

namespace ratekeeper::http {

struct Header {
  std::string name;
  std::string value;
  friend bool operator==(const Header&, const Header&) = default;
};
using Headers = std::vector<Header>;

// BudgetStatus: how an exhausted budget answers.
//   k429InsufficientQuota  as OpenAI answers exhausted quota: 429, type and
//                          code "insufficient_quota", x-should-retry: false
//                          (the default: SDKs raise their RateLimitError,
//                          and do not retry it)
//   k403Forbidden          403, type "budget_exhausted": a spend cap as a
//                          permission (errors.hpp's taxonomy)
enum class BudgetStatus : std::uint8_t { k429InsufficientQuota, k403Forbidden };

// HeaderOptions: which dialects to write, and how a refusal answers.
struct HeaderOptions {
  bool retry_after = true;  // Retry-After
  bool openai = true;       // x-ratelimit-*
  bool ietf = true;         // RateLimit-Policy, RateLimit
  // The IETF quota units ("qu") of token limits and of money budgets
  // (nano-USD); request limits use the draft's default unit and carry no
  // "qu". Characters outside printable ASCII are written as '?'.
  std::string token_unit = "ratekeeper-tokens";
  std::string money_unit = "ratekeeper-nano-usd";
  bool retry_after_ms = true;  // retry-after-ms, beside Retry-After
  bool should_retry = true;    // x-should-retry: false where no retry helps
  // A refusal whose wait is longer than this is told x-should-retry: false
  // (it still carries Retry-After): an SDK that honours any Retry-After
  // sleeps it out, even hours, inside one call; the Python SDKs
  // (_calculate_retry_timeout) take one only if 0 < wait <= 60 s and
  // otherwise retry on their own backoff (0.5 s to 8 s), in vain. Hence 60 s
  // by default; kNever: no maximum.
  Nanos max_retry_wait = std::chrono::seconds(60);
  BudgetStatus budget_status = BudgetStatus::k429InsufficientQuota;
};

// go_duration
//
// `d` rounded up to the millisecond, written as Go's time.Duration.String()
// writes it: "0s", "12ms", "1s", "1.5s", "6m0s", "1h0m0s", "26h3m4.005s".
// Negative durations are "0s"; kNever is written as its value (about 292
// years).
inline std::string go_duration(Nanos d) {
  return ratekeeper::detail::go_duration(d);
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

// delta_milliseconds
//
// Whole milliseconds, rounded up, for retry-after-ms: never early, and
// delta_seconds(d) == ceil(delta_milliseconds(d) / 1000) for every d.
inline std::uint64_t delta_milliseconds(Nanos d) noexcept {
  if (d <= Nanos{0}) return 0;
  const auto ns = static_cast<std::uint64_t>(d.count());
  return ns / 1'000'000 + (ns % 1'000'000 != 0 ? 1 : 0);
}

// The largest Integer a Structured Field carries (RFC 8941 §3.3.1: at most
// 15 digits); q and r saturate there.
inline constexpr std::uint64_t kMaxSfInteger = 999'999'999'999'999;

// LimitView: what the headers say of one limit. `window` 0: no fixed window
// (the IETF item leaves `w` out).
struct LimitView {
  std::string_view name;
  Unit unit = Unit::kRequests;
  Decision decision;
  Nanos window{0};
};

// Response: a whole HTTP answer. `headers` includes Content-Type.
struct Response {
  int status = 200;
  Headers headers;
  std::string body;
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

// An sf-string (RFC 8941 §4.1.6): '"' and '\' escaped; a character outside
// %x20-7E, which no sf-string can carry, written as '?'.
inline void append_sf_string(std::string& out, std::string_view s) {
  out.push_back('"');
  for (const char c : s) {
    if (c == '"' || c == '\\') {
      out.push_back('\\');
      out.push_back(c);
    } else if (c < 0x20 || c > 0x7E) {
      out.push_back('?');
    } else {
      out.push_back(c);
    }
  }
  out.push_back('"');
}

inline std::uint64_t sf_integer(std::uint64_t v) noexcept {
  return v > kMaxSfInteger ? kMaxSfInteger : v;
}

// The IETF `t` of one limit (see the file comment): the wait until it
// admits the call when it refuses it (and some wait can), else the wait
// until it is full.
inline Nanos ietf_reset(const Decision& d) noexcept {
  return !d.allowed && !d.never() ? d.retry_after : d.reset_after;
}

// Whether a retry cannot help this refusal.
inline bool retry_futile(Nanos retry_after, bool budget,
                         const HeaderOptions& o) noexcept {
  return budget || retry_after == kNever || retry_after > o.max_retry_wait;
}

inline void append_headers(const std::vector<LimitView>& views, bool refused,
                           Nanos retry_after, bool budget,
                           const HeaderOptions& o, Headers& out) {
  if (refused && retry_after != kNever) {
    if (o.retry_after) {
      out.push_back(
          {"Retry-After", fmt::format("{}", delta_seconds(retry_after))});
    }
    if (o.retry_after_ms) {
      out.push_back({"retry-after-ms",
                     fmt::format("{}", delta_milliseconds(retry_after))});
    }
  }
  if (o.should_retry && refused && retry_futile(retry_after, budget, o)) {
    out.push_back({"x-should-retry", "false"});
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
      append_sf_string(policy, v.name);
      fmt::format_to(std::back_inserter(policy), ";q={}",
                     sf_integer(v.decision.limit));
      if (v.window > Nanos{0}) {
        fmt::format_to(std::back_inserter(policy), ";w={}",
                       delta_seconds(v.window));
      }
      if (v.unit != Unit::kRequests) {
        policy += ";qu=";
        append_sf_string(policy,
                         v.unit == Unit::kTokens ? o.token_unit : o.money_unit);
      }
      append_sf_string(state, v.name);
      fmt::format_to(std::back_inserter(state), ";r={};t={}",
                     sf_integer(v.decision.remaining),
                     delta_seconds(ietf_reset(v.decision)));
    }
    out.push_back({"RateLimit-Policy", std::move(policy)});
    out.push_back({"RateLimit", std::move(state)});
  }
}

inline std::vector<LimitView> views_of(const ChainDecision& d) {
  std::vector<LimitView> views;
  for (const LimitResult& r : d.results) {
    if (r.limit->shadow() || r.shadow_denied) continue;
    views.push_back(
        {r.limit->name(), r.limit->unit(), r.decision, r.limit->window()});
  }
  return views;
}

}  // namespace detail

// rate_limit_headers
//
// The headers of a chain's decision. A refusal carries Retry-After and
// retry-after-ms unless no wait can admit the call (ChainDecision::never());
// x-should-retry: false when no wait can, or the wait is longer than
// max_retry_wait.
inline Headers rate_limit_headers(const ChainDecision& d,
                                  const HeaderOptions& o = {}) {
  Headers out;
  detail::append_headers(detail::views_of(d), !d.allowed, d.retry_after,
                         /*budget=*/false, o, out);
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
                         view.decision.retry_after, /*budget=*/false, o, out);
  return out;
}

// refusal_response
//
// The whole answer to a refused chain (rate limits): 429 with the wait, or
// 413 when no wait can admit the call (its cost is above a limit's
// capacity; x-should-retry: false). The body is OpenAI's error shape:
//   429 {"error":{"message":"rate limit \"rpm\" reached: ...","type":
//        "requests","param":null,"code":"rate_limit_exceeded"}}
//        (type "tokens" when the binding limit counts tokens)
//   413 {"error":{"message":"this call costs ...","type":
//        "invalid_request_error","param":null,"code":"request_too_large"}}
// Call only on a refused decision (checked by RATEKEEPER_ASSERT).
inline Response refusal_response(const ChainDecision& d,
                                 const HeaderOptions& o = {}) {
  RATEKEEPER_ASSERT(!d.allowed, "refusal_response of an admitted call");
  const Rejection rejection = Rejection::from(d);
  Response r;
  r.status = rejection.status();
  r.headers.push_back({"Content-Type", "application/json"});
  Headers rest = rate_limit_headers(d, o);
  r.headers.insert(r.headers.end(), std::make_move_iterator(rest.begin()),
                   std::make_move_iterator(rest.end()));
  r.body = rejection.json_body();
  return r;
}

// budget_exhausted_response
//
// The whole answer to a call refused by a budget
// (Reservation::refused_by_budget(); `d` is Reservation::decision(), whose
// `at` is Unix time: the accountant's SystemClock). By default as OpenAI
// answers exhausted quota: 429, type and code "insufficient_quota",
// x-should-retry: false; with BudgetStatus::k403Forbidden, 403 and type and
// code "budget_exhausted". The message says when the budget's period ends
// (RFC 3339, UTC); Retry-After and retry-after-ms say it too. A call whose
// worst case is more than the budget allows in a whole period is 413, as in
// refusal_response. Call only on a refused decision.
inline Response budget_exhausted_response(const ChainDecision& d,
                                          const HeaderOptions& o = {}) {
  RATEKEEPER_ASSERT(!d.allowed,
                    "budget_exhausted_response of an admitted call");
  const Rejection rejection = Rejection::budget(d);
  Response r;
  r.headers.push_back({"Content-Type", "application/json"});
  detail::append_headers(detail::views_of(d), true, d.retry_after,
                         /*budget=*/true, o, r.headers);
  if (rejection.kind == Refusal::kBudgetExhausted &&
      o.budget_status == BudgetStatus::k403Forbidden) {
    r.status = 403;
    r.body = ratekeeper::detail::error_body(
        rejection.message, "budget_exhausted", "budget_exhausted");
  } else {
    r.status = rejection.status();
    r.body = rejection.json_body();
  }
  return r;
}

// refusal_response
//
// The whole answer to a refused Reservation (budget/accountant.hpp): a
// budget's refusal as budget_exhausted_response, a rate limit's as
// refusal_response of its decision.
template <class R>
requires requires(const R& r) {
  { r.refused_by_budget() } -> std::convertible_to<bool>;
  { r.decision() } -> std::convertible_to<const ChainDecision&>;
}
Response refusal_response(const R& reservation, const HeaderOptions& o = {}) {
  return reservation.refused_by_budget()
             ? budget_exhausted_response(reservation.decision(), o)
             : refusal_response(reservation.decision(), o);
}

}  // namespace ratekeeper::http

#endif  // RATEKEEPER_HTTP_HEADERS_HPP_
