// libFuzzer target (TESTPLAN T8): header rendering from any decision.
//
// Decisions with arbitrary numbers (and a limit name of arbitrary bytes)
// go through every dialect; every value must be printable ASCII (no CR/LF
// to split a response), Retry-After and the Go durations must read back as
// at least the wait they stand for (never early) and less than a unit above
// it, retry-after-ms must round up to Retry-After, and the IETF fields must
// parse as RFC 8941 lists (tests/sf_parser.hpp) with q and r within the
// sf-integer range, `w` positive or absent, and the name read back.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>

#include "../sf_parser.hpp"
#include "ratekeeper/http/headers.hpp"

namespace rk = ratekeeper;

namespace {

void check(bool ok) {
  if (!ok) std::abort();
}

// Go's duration text back to milliseconds ("1h2m3.5s", "12ms", "0s").
long double go_ms(const std::string& s) {
  long double total = 0, num = 0, frac_scale = 0;
  for (std::size_t i = 0; i < s.size(); ++i) {
    const char c = s[i];
    if (c >= '0' && c <= '9') {
      if (frac_scale > 0) {
        num += (c - '0') * frac_scale;
        frac_scale /= 10;
      } else {
        num = num * 10 + (c - '0');
      }
    } else if (c == '.') {
      frac_scale = 0.1L;
    } else if (c == 'h') {
      total += num * 3'600'000;
      num = 0, frac_scale = 0;
    } else if (c == 'm' && i + 1 < s.size() && s[i + 1] == 's') {
      total += num;
      ++i;
      num = 0, frac_scale = 0;
    } else if (c == 'm') {
      total += num * 60'000;
      num = 0, frac_scale = 0;
    } else if (c == 's') {
      total += num * 1000;
      num = 0, frac_scale = 0;
    } else {
      check(false);
    }
  }
  return total;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data,
                                      std::size_t size) {
  std::uint64_t w[5] = {};
  std::memcpy(w, data, std::min(size, sizeof(w)));
  const rk::Nanos retry{static_cast<std::int64_t>(w[2])};
  const rk::Nanos reset{static_cast<std::int64_t>(w[3])};
  const rk::Decision d{(w[4] & 1) != 0, w[0], w[1], retry, reset};
  const std::string_view name =
      size > sizeof(w)
          ? std::string_view(reinterpret_cast<const char*>(data) + sizeof(w),
                             size - sizeof(w))
          : std::string_view("fuzz");
  const rk::Nanos window{static_cast<std::int64_t>(w[4] >> 3)};
  rk::http::HeaderOptions o;
  o.max_retry_wait = rk::Nanos{static_cast<std::int64_t>(w[1] >> 1)};
  const rk::http::Headers hs =
      rk::http::rate_limit_headers({.name = name,
                                    .unit = (w[4] & 2)   ? rk::Unit::kTokens
                                            : (w[4] & 4) ? rk::Unit::kNanoUsd
                                                         : rk::Unit::kRequests,
                                    .decision = d,
                                    .window = window},
                                   o);
  std::string retry_after, retry_after_ms;
  for (const rk::http::Header& h : hs) {
    for (const char c : h.name + h.value) check(c >= 0x20 && c < 0x7F);
    if (h.name == "Retry-After") retry_after = h.value;
    if (h.name == "retry-after-ms") retry_after_ms = h.value;
    if (h.name == "RateLimit-Policy" || h.name == "RateLimit") {
      const auto l = sf::parse_list(h.value);
      check(l.has_value() && l->size() == 1);
      const auto* item = std::get_if<sf::Item>(&(*l)[0]);
      check(item != nullptr);
      const auto* text = std::get_if<std::string>(&item->bare);
      check(text != nullptr && text->size() == name.size());
      for (std::size_t i = 0; i < name.size(); ++i) {
        const auto u = static_cast<unsigned char>(name[i]);
        check((*text)[i] == (u < 0x20 || u > 0x7E ? '?' : name[i]));
      }
      for (const char* key : {"q", "r", "w", "t"}) {
        const sf::Bare* v = item->param(key);
        if (v == nullptr) continue;
        const auto* n = std::get_if<std::int64_t>(v);
        check(n != nullptr && *n >= 0 &&
              static_cast<std::uint64_t>(*n) <= rk::http::kMaxSfInteger);
        if (std::string_view(key) == "w") check(*n > 0);
      }
      if (h.name == "RateLimit-Policy") {
        check((item->param("w") != nullptr) == (window > rk::Nanos{0}));
      }
    }
  }
  if (!retry_after.empty()) {
    const std::uint64_t s = std::stoull(retry_after);
    const std::uint64_t ms = std::stoull(retry_after_ms);
    check(s == ms / 1000 + (ms % 1000 != 0 ? 1 : 0));
  }
  // Go durations: never early, less than a millisecond late.
  const std::string g = rk::http::go_duration(reset);
  const long double ms = go_ms(g);
  const long double want =
      reset.count() <= 0 ? 0 : static_cast<long double>(reset.count()) / 1e6L;
  check(ms + 1e-6L >= want);
  check(ms < want + 1.0L + 1e-6L * want);
  // Whole seconds: never early, less than a second late.
  const std::uint64_t s = rk::http::delta_seconds(retry);
  if (retry.count() > 0) {
    check(static_cast<long double>(s) * 1e9L >=
          static_cast<long double>(retry.count()));
    check(static_cast<long double>(s - 1) * 1e9L <
          static_cast<long double>(retry.count()));
  } else {
    check(s == 0);
  }
  return 0;
}
