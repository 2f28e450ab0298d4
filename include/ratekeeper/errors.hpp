// ratekeeper/errors.hpp: why a call was refused, and what a server answers.
//
// Defines Refusal (the taxonomy), Rejection (one refusal with what the
// client needs to act on it) and the HTTP status and error body ratekeeper
// recommends for each kind. docs/chains.md explains the choices.
//
//   kind              retryable  status  the client should
//   kRateLimited      yes        429     wait retry_after (Retry-After)
//   kTooLarge         no         413     send a smaller call: its cost is
//                                        above a limit's capacity
//   kBudgetExhausted  no         429     stop until resets_at (a spend cap:
//                                        insufficient_quota, as OpenAI; 403
//                                        as an option of http/headers.hpp)
//   kBadRequest       no         400     fix the request (a malformed
//                                        forwarding header, no identity)
//   kConfiguration    no         500     nothing: the server is misconfigured
#ifndef RATEKEEPER_ERRORS_HPP_
#define RATEKEEPER_ERRORS_HPP_

#include <fmt/format.h>

#include <chrono>
#include <cstdint>
#include <iterator>
#include <optional>
#include <string>
#include <string_view>

#include "ratekeeper/chain.hpp"
#include "ratekeeper/config.hpp"
#include "ratekeeper/decision.hpp"
#include "ratekeeper/detail/math.hpp"

namespace ratekeeper {

enum class Refusal : std::uint8_t {
  kRateLimited,
  kTooLarge,
  kBudgetExhausted,
  kBadRequest,
  kConfiguration,
};

// The HTTP status recommended for a refusal of this kind. An exhausted
// budget is answered as OpenAI answers exhausted quota (429,
// insufficient_quota, with x-should-retry: false so that SDKs do not retry);
// http::HeaderOptions::budget_status makes it a 403.
constexpr int http_status(Refusal r) noexcept {
  switch (r) {
    case Refusal::kRateLimited:
      return 429;
    case Refusal::kTooLarge:
      return 413;
    case Refusal::kBudgetExhausted:
      return 429;
    case Refusal::kBadRequest:
      return 400;
    case Refusal::kConfiguration:
      return 500;
  }
  return 500;
}

// Whether waiting alone can turn this refusal into an admission soon (a
// budget also clears, but at its period's end: not worth an SDK's retries).
constexpr bool retryable(Refusal r) noexcept {
  return r == Refusal::kRateLimited;
}

// The machine-readable code written into error bodies ("code").
constexpr std::string_view error_code(Refusal r) noexcept {
  switch (r) {
    case Refusal::kRateLimited:
      return "rate_limit_exceeded";
    case Refusal::kTooLarge:
      return "request_too_large";
    case Refusal::kBudgetExhausted:
      return "insufficient_quota";
    case Refusal::kBadRequest:
      return "invalid_request";
    case Refusal::kConfiguration:
      return "server_misconfigured";
  }
  return "server_misconfigured";
}

namespace detail {

// A JSON string (RFC 8259): '"', '\' and control characters escaped, valid
// UTF-8 kept, each byte of an invalid sequence written as U+FFFD.
inline void append_json_string(std::string& out, std::string_view s) {
  out.push_back('"');
  for (std::size_t i = 0; i < s.size();) {
    const auto u = static_cast<unsigned char>(s[i]);
    if (u == '"' || u == '\\') {
      out.push_back('\\');
      out.push_back(static_cast<char>(u));
      ++i;
    } else if (u < 0x20 || u == 0x7F) {
      fmt::format_to(std::back_inserter(out), "\\u{:04x}", u);
      ++i;
    } else if (u < 0x80) {
      out.push_back(static_cast<char>(u));
      ++i;
    } else {
      // The length of a well-formed sequence starting here (RFC 3629), or 0.
      std::size_t n = 0;
      std::uint32_t cp = 0;
      if (u >= 0xC2 && u <= 0xDF) {
        n = 2;
        cp = u & 0x1Fu;
      } else if (u >= 0xE0 && u <= 0xEF) {
        n = 3;
        cp = u & 0x0Fu;
      } else if (u >= 0xF0 && u <= 0xF4) {
        n = 4;
        cp = u & 0x07u;
      }
      bool ok = n != 0 && i + n <= s.size();
      for (std::size_t k = 1; ok && k < n; ++k) {
        const auto c = static_cast<unsigned char>(s[i + k]);
        ok = (c & 0xC0u) == 0x80u;
        cp = (cp << 6) | (c & 0x3Fu);
      }
      // No overlong forms, surrogates or code points past U+10FFFF.
      ok = ok && !(n == 3 && cp < 0x800) && !(n == 4 && cp < 0x10000) &&
           !(cp >= 0xD800 && cp <= 0xDFFF) && cp <= 0x10FFFF;
      if (ok) {
        out.append(s.substr(i, n));
        i += n;
      } else {
        out += "\\ufffd";
        ++i;
      }
    }
  }
  out.push_back('"');
}

// OpenAI's error shape:
// {"error":{"message":...,"type":...,"param":null,"code":...}}
inline std::string error_body(std::string_view message, std::string_view type,
                              std::string_view code) {
  std::string out = "{\"error\":{\"message\":";
  append_json_string(out, message);
  out += ",\"type\":";
  append_json_string(out, type);
  out += ",\"param\":null,\"code\":";
  append_json_string(out, code);
  out += "}}";
  return out;
}

// What a limit counts, for messages: unit_name(), money written "nano-USD".
inline std::string_view quantity(Unit u) noexcept {
  return u == Unit::kNanoUsd ? "nano-USD" : unit_name(u);
}

// Seconds since the Unix epoch as "2026-12-01T00:00:00Z" (from 1970 on).
inline std::string rfc3339(std::int64_t secs) {
  const std::chrono::sys_seconds t{std::chrono::seconds(secs)};
  const auto day = std::chrono::floor<std::chrono::days>(t);
  const std::chrono::year_month_day ymd{day};
  const std::chrono::hh_mm_ss hms{t - day};
  return fmt::format(
      "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z", static_cast<int>(ymd.year()),
      static_cast<unsigned>(ymd.month()), static_cast<unsigned>(ymd.day()),
      hms.hours().count(), hms.minutes().count(), hms.seconds().count());
}

// `d` rounded up to the millisecond, as Go's time.Duration.String() writes
// it ("12ms", "1.5s", "6m0s", "26h3m4.005s"); "0s" for d <= 0.
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

// The message of a call no wait admits: its cost is above `b`'s capacity.
inline std::string too_large_message(const LimitResult* b) {
  if (b == nullptr) return "this call can never be admitted";
  return fmt::format(
      "this call costs {} {} against limit \"{}\", whose capacity is {}: no "
      "wait admits it; send a smaller call",
      b->cost, quantity(b->limit->unit()), b->limit->name(), b->decision.limit);
}

}  // namespace detail

// Rejection: one refused call, and the answer a server sends for it.
//
//   kind         the taxonomy above: status(), error_code(), retryable().
//   limit        the binding limit or budget's name (may be empty).
//   unit         what the binding limit counts (the body's "type" of a rate
//                limit: "requests", "tokens" or "cost", as OpenAI's are).
//   retry_after  kRateLimited: the wait; else unused.
//   resets_at    kBudgetExhausted: when the budget's period ends.
//   message      for people; never holds secrets (no API keys).
//
// http::refusal_response (http/headers.hpp) is this with the headers.
struct Rejection {
  Refusal kind = Refusal::kRateLimited;
  std::string limit{};
  Unit unit = Unit::kRequests;
  Nanos retry_after{0};
  std::optional<std::chrono::system_clock::time_point> resets_at{};
  std::string message{};

  int status() const noexcept { return http_status(kind); }

  // The body's "type": a rate limit's unit; "insufficient_quota" for a
  // budget, "invalid_request_error" for a call too large or a bad request,
  // "server_error" for a misconfiguration.
  std::string_view type() const noexcept {
    switch (kind) {
      case Refusal::kRateLimited:
        return unit == Unit::kTokens    ? "tokens"
               : unit == Unit::kNanoUsd ? "cost"
                                        : "requests";
      case Refusal::kTooLarge:
      case Refusal::kBadRequest:
        return "invalid_request_error";
      case Refusal::kBudgetExhausted:
        return "insufficient_quota";
      case Refusal::kConfiguration:
        return "server_error";
    }
    return "server_error";
  }

  // The refusal of a chain that refused: kTooLarge when no wait admits the
  // call, else kRateLimited. Call only on a refused decision.
  static Rejection from(const ChainDecision& d) {
    RATEKEEPER_ASSERT(!d.allowed, "Rejection::from an admitted call");
    Rejection r;
    const LimitResult* b = d.binding_result();
    r.limit = b == nullptr ? std::string() : b->limit->name();
    r.unit = b == nullptr ? Unit::kRequests : b->limit->unit();
    if (d.never() || b == nullptr) {
      r.kind = Refusal::kTooLarge;
      r.message = detail::too_large_message(b);
    } else {
      r.kind = Refusal::kRateLimited;
      r.retry_after = d.retry_after;
      r.message = fmt::format(
          "rate limit \"{}\" reached: {} {}{}, {} remaining, this call costs "
          "{}; retry in {}",
          r.limit, b->decision.limit, detail::quantity(r.unit),
          b->limit->window() > Nanos{0}
              ? " per " + detail::go_duration(b->limit->window())
              : std::string(),
          b->decision.remaining, b->cost, detail::go_duration(d.retry_after));
    }
    return r;
  }

  // The refusal of a budget (Reservation::refused_by_budget()): until the
  // budget's period ends, or kTooLarge when the call's worst case is more
  // than the budget allows in a whole period. `d.at` is Unix time (the
  // accountant's SystemClock), so resets_at is a calendar instant.
  static Rejection budget(const ChainDecision& d) {
    RATEKEEPER_ASSERT(!d.allowed, "Rejection::budget of an admitted call");
    Rejection r;
    const LimitResult* b = d.binding_result();
    r.limit = b == nullptr ? std::string() : b->limit->name();
    r.unit = b == nullptr ? Unit::kNanoUsd : b->limit->unit();
    if (d.never() || b == nullptr) {
      r.kind = Refusal::kTooLarge;
      r.message = detail::too_large_message(b) + " (lower max_tokens)";
      return r;
    }
    r.kind = Refusal::kBudgetExhausted;
    std::string when;
    if (b->decision.retry_after != kNever) {
      using detail::i128;
      const i128 end = static_cast<i128>(d.at.count()) +
                       static_cast<i128>(b->decision.retry_after.count());
      const Nanos at{detail::clamp_i64(end)};
      r.resets_at = std::chrono::system_clock::time_point(
          std::chrono::duration_cast<std::chrono::system_clock::duration>(at));
      when =
          "; it resets at " +
          detail::rfc3339(std::chrono::floor<std::chrono::seconds>(at).count());
    }
    r.message =
        fmt::format("budget \"{}\" is spent for this period ({} {} of {}){}",
                    r.limit, b->decision.limit - b->decision.remaining,
                    detail::quantity(r.unit), b->decision.limit, when);
    return r;
  }

  // OpenAI's error body: {"error":{"message":"...","type":"requests",
  // "param":null,"code":"rate_limit_exceeded"}} (type() and
  // error_code(kind)); what the official SDKs parse into their errors.
  std::string json_body() const {
    return detail::error_body(message, type(), error_code(kind));
  }

  // A wait in whole milliseconds, rounded up: never early. 0 for a
  // negative wait; exact up to Nanos::max() (no overflow near INT64_MAX).
  static std::int64_t ceil_ms(Nanos d) noexcept {
    if (d <= Nanos{0}) return 0;
    return d.count() / 1'000'000 + (d.count() % 1'000'000 != 0 ? 1 : 0);
  }
};

}  // namespace ratekeeper

#endif  // RATEKEEPER_ERRORS_HPP_
