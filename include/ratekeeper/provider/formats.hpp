// ratekeeper/provider/formats.hpp: the value formats of an LLM provider's
// rate-limit headers (issue 18, "Following the provider"), each parser
// total: bad input is a kInvalidArgument or kOutOfRange status naming what
// was wrong, never a crash or a guess.
//
//   parse_go_duration     "6m0s", "1s", "20ms", "1h2m3.5s" (Go's
//                         time.ParseDuration grammar; negative refused)
//   parse_rfc3339         "2026-12-07T13:40:40Z", "1996-12-19T16:39:57-08:00"
//                         -> Unix time in ns
//   parse_http_date       RFC 9110 HTTP-date, its three forms -> Unix ns
//   parse_count           1*DIGIT, up to 2^64 - 1
//   parse_retry_after     Retry-After: delay-seconds or an HTTP-date -> delay
//   parse_retry_after_ms  retry-after-ms: non-negative decimal milliseconds
//
// provider/headers.hpp reads whole answers with them.
#ifndef RATEKEEPER_PROVIDER_FORMATS_HPP_
#define RATEKEEPER_PROVIDER_FORMATS_HPP_

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "ratekeeper/decision.hpp"
#include "ratekeeper/detail/math.hpp"
#include "ratekeeper/detail/strings.hpp"

namespace ratekeeper::provider {

namespace detail {

using ratekeeper::detail::i128;

inline std::string_view trim(std::string_view s) noexcept {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) {
    s.remove_prefix(1);
  }
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) {
    s.remove_suffix(1);
  }
  return s;
}

// The value as it appears in a message: escaped, at most 64 bytes.
inline std::string shown(std::string_view s) {
  return absl::StrCat("\"",
                      absl::CEscape(ratekeeper::detail::av(s.substr(0, 64))),
                      s.size() > 64 ? "...\"" : "\"");
}

inline bool digit(char c) noexcept { return c >= '0' && c <= '9'; }

// Reads exactly `n` digits at `s[at]`.
inline bool fixed_digits(std::string_view s, std::size_t at, std::size_t n,
                         int& out) noexcept {
  if (at + n > s.size()) return false;
  int v = 0;
  for (std::size_t i = 0; i < n; ++i) {
    if (!digit(s[at + i])) return false;
    v = v * 10 + (s[at + i] - '0');
  }
  out = v;
  return true;
}

// Days from 1970-01-01 to y-m-d (proleptic Gregorian; H. Hinnant's
// days_from_civil).
constexpr std::int64_t days_from_civil(std::int64_t y, unsigned m,
                                       unsigned d) noexcept {
  y -= m <= 2 ? 1 : 0;
  const std::int64_t era = (y >= 0 ? y : y - 399) / 400;
  const auto yoe = static_cast<unsigned>(y - era * 400);
  const unsigned doy = (153 * (m > 2 ? m - 3 : m + 9) + 2) / 5 + d - 1;
  const unsigned doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
  return era * 146097 + static_cast<std::int64_t>(doe) - 719468;
}

constexpr unsigned days_in_month(std::int64_t y, unsigned m) noexcept {
  constexpr unsigned kDays[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
  const bool leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
  return m == 2 && leap ? 29 : kDays[m - 1];
}

// y-m-d h:m:s (s up to 60: a leap second reads as the next second) plus
// `frac_ns` minus `offset_s`, as Unix ns; kOutOfRange outside int64 ns.
inline absl::StatusOr<Nanos> civil_ns(std::int64_t y, int mo, int d, int h,
                                      int mi, int s, std::int64_t frac_ns,
                                      std::int64_t offset_s,
                                      std::string_view what) {
  if (mo < 1 || mo > 12 || d < 1 ||
      d > static_cast<int>(days_in_month(y, static_cast<unsigned>(mo))) ||
      h > 23 || mi > 59 || s > 60) {
    return absl::InvalidArgumentError(
        absl::StrCat("not a calendar date and time: ", shown(what)));
  }
  const i128 secs =
      static_cast<i128>(days_from_civil(y, static_cast<unsigned>(mo),
                                        static_cast<unsigned>(d))) *
          86400 +
      h * 3600 + mi * 60 + s - offset_s;
  const i128 ns = secs * 1'000'000'000 + frac_ns;
  if (ns > ratekeeper::detail::kI64Max || ns < ratekeeper::detail::kI64Min) {
    return absl::OutOfRangeError(
        absl::StrCat("time outside 1677..2262 (int64 ns): ", shown(what)));
  }
  return Nanos{static_cast<std::int64_t>(ns)};
}

inline int month_of(std::string_view m) noexcept {
  constexpr std::string_view kMonths[] = {"Jan", "Feb", "Mar", "Apr",
                                          "May", "Jun", "Jul", "Aug",
                                          "Sep", "Oct", "Nov", "Dec"};
  for (int i = 0; i < 12; ++i) {
    if (m == kMonths[i]) return i + 1;
  }
  return 0;
}

inline bool day_name(std::string_view d, bool long_form) noexcept {
  constexpr std::string_view kShort[] = {"Mon", "Tue", "Wed", "Thu",
                                         "Fri", "Sat", "Sun"};
  constexpr std::string_view kLong[] = {"Monday",   "Tuesday", "Wednesday",
                                        "Thursday", "Friday",  "Saturday",
                                        "Sunday"};
  for (int i = 0; i < 7; ++i) {
    if (d == (long_form ? kLong[i] : kShort[i])) return true;
  }
  return false;
}

// hh:mm:ss at s[at].
inline bool clock_time(std::string_view s, std::size_t at, int& h, int& m,
                       int& sec) noexcept {
  return fixed_digits(s, at, 2, h) && at + 2 < s.size() && s[at + 2] == ':' &&
         fixed_digits(s, at + 3, 2, m) && at + 5 < s.size() &&
         s[at + 5] == ':' && fixed_digits(s, at + 6, 2, sec);
}

}  // namespace detail

// parse_go_duration
//
// Go's time.ParseDuration: an optional '+', then "0" or one or more
// decimal numbers each with a unit (ns, us, µs, μs, ms, s, m, h), as
// "300ms", "1.5h", "2h45m", "1h15m30.918273645s". Fractions below a
// nanosecond are dropped (as Go does). kInvalidArgument for anything else
// and for a negative duration (a reset or wait is never negative);
// kOutOfRange above INT64_MAX ns (about 292 years).
inline absl::StatusOr<Nanos> parse_go_duration(std::string_view text) {
  using detail::i128;
  std::string_view s = detail::trim(text);
  const auto bad = [&](std::string_view why) {
    return absl::InvalidArgumentError(absl::StrCat("not a Go duration (",
                                                   ratekeeper::detail::av(why),
                                                   "): ", detail::shown(text)));
  };
  if (!s.empty() && s.front() == '-') return bad("negative");
  if (!s.empty() && s.front() == '+') s.remove_prefix(1);
  if (s == "0") return Nanos{0};
  if (s.empty()) return bad("empty");
  i128 total = 0;
  constexpr i128 kMax = ratekeeper::detail::kI64Max;
  while (!s.empty()) {
    i128 whole = 0;
    bool any = false;
    bool big = false;
    while (!s.empty() && detail::digit(s.front())) {
      whole = whole * 10 + (s.front() - '0');
      if (whole > kMax) big = true, whole = kMax + 1;
      any = true;
      s.remove_prefix(1);
    }
    i128 frac = 0;
    i128 scale = 1;
    if (!s.empty() && s.front() == '.') {
      s.remove_prefix(1);
      while (!s.empty() && detail::digit(s.front())) {
        if (scale < 1'000'000'000'000'000'000) {  // 18 digits kept
          frac = frac * 10 + (s.front() - '0');
          scale *= 10;
        }
        any = true;
        s.remove_prefix(1);
      }
    }
    if (!any) return bad("a number is missing");
    std::size_t n = 0;
    while (n < s.size() && !detail::digit(s[n]) && s[n] != '.') ++n;
    const std::string_view unit = s.substr(0, n);
    s.remove_prefix(n);
    i128 per = 0;
    if (unit == "ns") {
      per = 1;
    } else if (unit == "us" || unit == "\xC2\xB5s" || unit == "\xCE\xBCs") {
      per = 1'000;
    } else if (unit == "ms") {
      per = 1'000'000;
    } else if (unit == "s") {
      per = 1'000'000'000;
    } else if (unit == "m") {
      per = 60'000'000'000;
    } else if (unit == "h") {
      per = 3'600'000'000'000;
    } else {
      return bad(unit.empty() ? "a unit is missing" : "unknown unit");
    }
    if (big || whole > kMax / per) {
      return absl::OutOfRangeError(
          absl::StrCat("Go duration above 2^63 ns: ", detail::shown(text)));
    }
    total += whole * per + frac * per / scale;
    if (total > kMax) {
      return absl::OutOfRangeError(
          absl::StrCat("Go duration above 2^63 ns: ", detail::shown(text)));
    }
  }
  return Nanos{static_cast<std::int64_t>(total)};
}

// parse_rfc3339
//
// An RFC 3339 date-time (section 5.6): "1985-04-12T23:20:50.52Z",
// "1996-12-19T16:39:57-08:00"; 't', 'z' and a space for the 'T' accepted
// (section 5.6's note). A leap second (":60") reads as the second after
// ":59". Fractions below a nanosecond are dropped. Returns Unix time in
// ns; kOutOfRange outside what int64 ns holds (years 1677 to 2262).
inline absl::StatusOr<Nanos> parse_rfc3339(std::string_view text) {
  const std::string_view s = detail::trim(text);
  const auto bad = [&] {
    return absl::InvalidArgumentError(
        absl::StrCat("not an RFC 3339 date-time: ", detail::shown(text)));
  };
  int y = 0, mo = 0, d = 0, h = 0, mi = 0, sec = 0;
  if (!detail::fixed_digits(s, 0, 4, y) || s.size() < 20 || s[4] != '-' ||
      !detail::fixed_digits(s, 5, 2, mo) || s[7] != '-' ||
      !detail::fixed_digits(s, 8, 2, d) ||
      (s[10] != 'T' && s[10] != 't' && s[10] != ' ') ||
      !detail::clock_time(s, 11, h, mi, sec)) {
    return bad();
  }
  std::size_t at = 19;
  std::int64_t frac_ns = 0;
  if (s[at] == '.') {
    ++at;
    std::int64_t scale = 100'000'000;
    const std::size_t start = at;
    while (at < s.size() && detail::digit(s[at])) {
      frac_ns += (s[at] - '0') * scale;
      scale /= 10;
      ++at;
    }
    if (at == start) return bad();
  }
  if (at >= s.size()) return bad();
  std::int64_t offset = 0;
  if (s[at] == 'Z' || s[at] == 'z') {
    ++at;
  } else if (s[at] == '+' || s[at] == '-') {
    int oh = 0, om = 0;
    if (!detail::fixed_digits(s, at + 1, 2, oh) || at + 3 >= s.size() ||
        s[at + 3] != ':' || !detail::fixed_digits(s, at + 4, 2, om) ||
        oh > 23 || om > 59) {
      return bad();
    }
    offset = (s[at] == '-' ? -1 : 1) * (oh * 3600 + om * 60);
    at += 6;
  } else {
    return bad();
  }
  if (at != s.size()) return bad();
  return detail::civil_ns(y, mo, d, h, mi, sec, frac_ns, offset, text);
}

// parse_http_date
//
// An HTTP-date (RFC 9110 section 5.6.7), all three forms a recipient must
// accept: IMF-fixdate "Sun, 06 Nov 1994 08:49:37 GMT", the obsolete RFC 850
// "Sunday, 06-Nov-94 08:49:37 GMT" (a two-digit year more than 50 years
// after `now_unix` is the last such year in the past, as the RFC says) and
// asctime "Sun Nov  6 08:49:37 1994". The day name is checked to be one,
// not checked against the date. Returns Unix time in ns.
inline absl::StatusOr<Nanos> parse_http_date(std::string_view text,
                                             Nanos now_unix) {
  const std::string_view s = detail::trim(text);
  const auto bad = [&] {
    return absl::InvalidArgumentError(
        absl::StrCat("not an HTTP-date: ", detail::shown(text)));
  };
  int y = 0, d = 0, h = 0, mi = 0, sec = 0;
  const std::size_t comma = s.find(',');
  if (comma == 3) {  // IMF-fixdate
    if (s.size() != 29 || !detail::day_name(s.substr(0, 3), false) ||
        s[4] != ' ' || !detail::fixed_digits(s, 5, 2, d) || s[7] != ' ' ||
        s[11] != ' ' || !detail::fixed_digits(s, 12, 4, y) || s[16] != ' ' ||
        !detail::clock_time(s, 17, h, mi, sec) || s.substr(25) != " GMT") {
      return bad();
    }
    const int mo = detail::month_of(s.substr(8, 3));
    if (mo == 0) return bad();
    return detail::civil_ns(y, mo, d, h, mi, sec, 0, 0, text);
  }
  if (comma != std::string_view::npos) {  // RFC 850
    const std::string_view r = s.substr(comma);
    int yy = 0;
    if (!detail::day_name(s.substr(0, comma), true) || r.size() != 24 ||
        r[1] != ' ' || !detail::fixed_digits(r, 2, 2, d) || r[4] != '-' ||
        r[8] != '-' || !detail::fixed_digits(r, 9, 2, yy) || r[11] != ' ' ||
        !detail::clock_time(r, 12, h, mi, sec) || r.substr(20) != " GMT") {
      return bad();
    }
    const int mo = detail::month_of(r.substr(5, 3));
    if (mo == 0) return bad();
    // The year now, from now_unix (days / 365.2425 is close enough to
    // pick the century: the 50-year rule has years of slack).
    const std::int64_t now_year =
        1970 + ratekeeper::detail::floor_div_i64(now_unix.count(),
                                                 31'556'952'000'000'000);
    std::int64_t full = now_year - now_year % 100 + yy;
    if (full > now_year + 50) full -= 100;
    if (full < now_year - 50) full += 100;
    return detail::civil_ns(full, mo, d, h, mi, sec, 0, 0, text);
  }
  // asctime: "Sun Nov  6 08:49:37 1994" (day padded with a space).
  if (s.size() != 24 || !detail::day_name(s.substr(0, 3), false) ||
      s[3] != ' ' || s[7] != ' ' || s[10] != ' ' ||
      !detail::clock_time(s, 11, h, mi, sec) || s[19] != ' ' ||
      !detail::fixed_digits(s, 20, 4, y)) {
    return bad();
  }
  const int mo = detail::month_of(s.substr(4, 3));
  if (mo == 0) return bad();
  if (s[8] == ' ' && detail::digit(s[9])) {
    d = s[9] - '0';
  } else if (!detail::fixed_digits(s, 8, 2, d)) {
    return bad();
  }
  return detail::civil_ns(y, mo, d, h, mi, sec, 0, 0, text);
}

// parse_count
//
// A header's count (x-ratelimit-remaining-tokens: 149984): 1*DIGIT,
// kOutOfRange above 2^64 - 1.
inline absl::StatusOr<std::uint64_t> parse_count(std::string_view text) {
  const std::string_view s = detail::trim(text);
  if (s.empty()) {
    return absl::InvalidArgumentError("empty count, expected digits");
  }
  std::uint64_t v = 0;
  for (const char c : s) {
    if (!detail::digit(c)) {
      return absl::InvalidArgumentError(
          absl::StrCat("not a count (digits only): ", detail::shown(text)));
    }
    const auto digit = static_cast<std::uint64_t>(c - '0');
    if (v > (UINT64_MAX - digit) / 10) {
      return absl::OutOfRangeError(
          absl::StrCat("count above 2^64 - 1: ", detail::shown(text)));
    }
    v = v * 10 + digit;
  }
  return v;
}

// parse_retry_after
//
// Retry-After (RFC 9110 section 10.2.3): delay-seconds ("120") or an
// HTTP-date, as the delay from `now_unix` (0 for a date already past).
// kOutOfRange for a delay above INT64_MAX ns.
inline absl::StatusOr<Nanos> parse_retry_after(std::string_view text,
                                               Nanos now_unix) {
  const std::string_view s = detail::trim(text);
  if (!s.empty() && detail::digit(s.front())) {
    const absl::StatusOr<std::uint64_t> secs = parse_count(s);
    if (!secs.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("Retry-After is neither seconds nor an HTTP-date: ",
                       detail::shown(text)));
    }
    if (*secs > static_cast<std::uint64_t>(ratekeeper::detail::kI64Max) /
                    1'000'000'000) {
      return absl::OutOfRangeError(
          absl::StrCat("Retry-After above 2^63 ns: ", detail::shown(text)));
    }
    return Nanos{static_cast<std::int64_t>(*secs) * 1'000'000'000};
  }
  const absl::StatusOr<Nanos> at = parse_http_date(s, now_unix);
  if (!at.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("Retry-After is neither seconds nor an HTTP-date: ",
                     detail::shown(text)));
  }
  const detail::i128 d =
      static_cast<detail::i128>(at->count()) - now_unix.count();
  return Nanos{d <= 0 ? 0 : ratekeeper::detail::clamp_i64(d)};
}

// parse_retry_after_ms
//
// retry-after-ms: a non-negative decimal number of milliseconds ("1500",
// "20.5"); fractions below a nanosecond dropped.
inline absl::StatusOr<Nanos> parse_retry_after_ms(std::string_view text) {
  const std::string_view s = detail::trim(text);
  const std::size_t dot = s.find('.');
  const std::string_view whole = s.substr(0, dot);
  const std::string_view frac =
      dot == std::string_view::npos ? std::string_view{} : s.substr(dot + 1);
  bool ok = !whole.empty() || !frac.empty();
  for (const char c : whole) ok = ok && detail::digit(c);
  for (const char c : frac) ok = ok && detail::digit(c);
  if (!ok || (dot != std::string_view::npos && frac.empty() && whole.empty())) {
    return absl::InvalidArgumentError(
        absl::StrCat("retry-after-ms is not a number of milliseconds: ",
                     detail::shown(text)));
  }
  detail::i128 ns = 0;
  for (const char c : whole) {
    ns = ns * 10 + (c - '0');
    if (ns > ratekeeper::detail::kI64Max) break;
  }
  ns *= 1'000'000;
  detail::i128 scale = 100'000;
  for (const char c : frac) {
    if (scale == 0) break;
    ns += (c - '0') * scale;
    scale /= 10;
  }
  if (ns > ratekeeper::detail::kI64Max) {
    return absl::OutOfRangeError(
        absl::StrCat("retry-after-ms above 2^63 ns: ", detail::shown(text)));
  }
  return Nanos{static_cast<std::int64_t>(ns)};
}

}  // namespace ratekeeper::provider

#endif  // RATEKEEPER_PROVIDER_FORMATS_HPP_
