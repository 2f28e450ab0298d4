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
//   kBudgetExhausted  no         403     stop until resets_at (a spend cap;
//                                        429 would make SDKs retry in vain)
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

namespace ratekeeper {

enum class Refusal : std::uint8_t {
  kRateLimited,
  kTooLarge,
  kBudgetExhausted,
  kBadRequest,
  kConfiguration,
};

// The HTTP status recommended for a refusal of this kind.
constexpr int http_status(Refusal r) noexcept {
  switch (r) {
    case Refusal::kRateLimited:
      return 429;
    case Refusal::kTooLarge:
      return 413;
    case Refusal::kBudgetExhausted:
      return 403;
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

// The machine-readable code written into error bodies.
constexpr std::string_view error_code(Refusal r) noexcept {
  switch (r) {
    case Refusal::kRateLimited:
      return "rate_limit_exceeded";
    case Refusal::kTooLarge:
      return "request_too_large";
    case Refusal::kBudgetExhausted:
      return "budget_exhausted";
    case Refusal::kBadRequest:
      return "invalid_request";
    case Refusal::kConfiguration:
      return "server_misconfigured";
  }
  return "server_misconfigured";
}

// Rejection: one refused call.
//
//   limit        the binding limit or budget's name (may be empty).
//   retry_after  kRateLimited: the wait; else unused.
//   resets_at    kBudgetExhausted: when the budget's period ends.
//   message      for people; never holds secrets (no API keys).
struct Rejection {
  Refusal kind = Refusal::kRateLimited;
  std::string limit{};
  Nanos retry_after{0};
  std::optional<std::chrono::system_clock::time_point> resets_at{};
  std::string message{};

  int status() const noexcept { return http_status(kind); }

  // The refusal of a chain that refused: kTooLarge when no wait admits the
  // call, else kRateLimited. Call only on a refused decision.
  static Rejection from(const ChainDecision& d) {
    RATEKEEPER_ASSERT(!d.allowed, "Rejection::from an admitted call");
    Rejection r;
    const LimitResult* b = d.binding_result();
    r.limit = b == nullptr ? std::string() : b->limit->name();
    if (d.never()) {
      r.kind = Refusal::kTooLarge;
      r.message = fmt::format(
          "this call costs {} against limit \"{}\", whose capacity is {}",
          b == nullptr ? 0 : b->cost, r.limit,
          b == nullptr ? 0 : b->decision.limit);
    } else {
      r.kind = Refusal::kRateLimited;
      r.retry_after = d.retry_after;
      r.message = fmt::format("rate limit \"{}\" reached; retry in {} ms",
                              r.limit, ceil_ms(d.retry_after));
    }
    return r;
  }

  // The refusal of a budget (Reservation::refused_by_budget()): 403 until
  // the budget's period ends. `d.at` is Unix time (the accountant's
  // SystemClock), so resets_at is a calendar instant.
  static Rejection budget(const ChainDecision& d) {
    RATEKEEPER_ASSERT(!d.allowed, "Rejection::budget of an admitted call");
    Rejection r;
    r.kind = Refusal::kBudgetExhausted;
    const LimitResult* b = d.binding_result();
    r.limit = b == nullptr ? std::string() : b->limit->name();
    if (b != nullptr && b->decision.retry_after != kNever) {
      r.resets_at = std::chrono::system_clock::time_point(
          std::chrono::duration_cast<std::chrono::system_clock::duration>(
              d.at + b->decision.retry_after));
    }
    if (d.never()) {
      r.message = fmt::format(
          "this call's worst case ({}) is more than budget \"{}\" allows in "
          "a whole period ({}); lower max_tokens",
          b == nullptr ? 0 : b->cost, r.limit,
          b == nullptr ? 0 : b->decision.limit);
    } else {
      r.message =
          fmt::format("budget \"{}\" is spent for this period", r.limit);
    }
    return r;
  }

  // An OpenAI-compatible error body:
  // {"error":{"message":"...","type":"rate_limit_exceeded",
  //   "code":"rate_limit_exceeded","limit":"rpm","retry_after_ms":1500}}
  // with resets_at (RFC 3339, UTC) for budgets.
  std::string json_body() const {
    std::string out = "{\"error\":{\"message\":";
    append_json_string(out, message);
    fmt::format_to(std::back_inserter(out), ",\"type\":\"{}\",\"code\":\"{}\"",
                   error_code(kind), error_code(kind));
    if (!limit.empty()) {
      out += ",\"limit\":";
      append_json_string(out, limit);
    }
    if (kind == Refusal::kRateLimited) {
      fmt::format_to(std::back_inserter(out), ",\"retry_after_ms\":{}",
                     ceil_ms(retry_after));
    }
    if (resets_at) {
      const auto secs = std::chrono::duration_cast<std::chrono::seconds>(
                            resets_at->time_since_epoch())
                            .count();
      out += ",\"resets_at\":\"" + rfc3339(secs) + "\"";
    }
    out += "}}";
    return out;
  }

  // A wait in whole milliseconds, rounded up: never early. 0 for a
  // negative wait; exact up to Nanos::max() (no overflow near INT64_MAX).
  static std::int64_t ceil_ms(Nanos d) noexcept {
    if (d <= Nanos{0}) return 0;
    return d.count() / 1'000'000 + (d.count() % 1'000'000 != 0 ? 1 : 0);
  }

  // Seconds since the Unix epoch as "2026-12-01T00:00:00Z".
  static std::string rfc3339(std::int64_t secs) {
    const std::chrono::sys_seconds t{std::chrono::seconds(secs)};
    const auto day = std::chrono::floor<std::chrono::days>(t);
    const std::chrono::year_month_day ymd{day};
    const std::chrono::hh_mm_ss hms{t - day};
    return fmt::format(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z", static_cast<int>(ymd.year()),
        static_cast<unsigned>(ymd.month()), static_cast<unsigned>(ymd.day()),
        hms.hours().count(), hms.minutes().count(), hms.seconds().count());
  }

  static void append_json_string(std::string& out, std::string_view s) {
    out.push_back('"');
    for (const char c : s) {
      const auto u = static_cast<unsigned char>(c);
      if (c == '"' || c == '\\') {
        out.push_back('\\');
        out.push_back(c);
      } else if (u < 0x20) {
        fmt::format_to(std::back_inserter(out), "\\u{:04x}", u);
      } else {
        out.push_back(c);
      }
    }
    out.push_back('"');
  }
};

}  // namespace ratekeeper

#endif  // RATEKEEPER_ERRORS_HPP_
