// libFuzzer target (TESTPLAN T8): header rendering from any decision.
//
// Decisions with arbitrary numbers go through the three dialects; every
// value must be printable ASCII (no CR/LF to split a response), Retry-After
// and the Go durations must read back as at least the wait they stand for
// (never early) and less than a unit above it.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

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
  const rk::http::Headers hs = rk::http::rate_limit_headers(
      {.name = "fuzz",
       .unit = (w[4] & 2) ? rk::Unit::kTokens : rk::Unit::kRequests,
       .decision = d,
       .window = rk::Nanos{static_cast<std::int64_t>(w[4] >> 2)}});
  for (const rk::http::Header& h : hs) {
    for (const char c : h.name + h.value) check(c >= 0x20 && c < 0x7F);
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
