// libFuzzer target (issue 18): the provider's rate-limit answers
// (ratekeeper/provider/headers.hpp) and what ProviderChain does with them
// (provider/resync.hpp).
//
// The input is read three ways: whole, by every parser (Go duration,
// RFC 3339, HTTP-date, Retry-After, retry-after-ms, count); and as an
// answer: two bytes of status, then "name: value" lines, through
// read_provider_headers and ProviderChain::observe. Invariants: no crash
// (ASan, UBSan); every duration and delay parsed is >= 0; a Go duration
// written back by ratekeeper's own formatter (rounded up to the ms) reads
// back as exactly that rounding; an RFC 3339 time's whole second written
// back by ratekeeper's formatter reads back as that second; a reading's
// class is classify_status of its status; after observe, every factor is
// in [1 ppm, 1] and no local limit holds more than its burst.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "ratekeeper/errors.hpp"
#include "ratekeeper/provider/headers.hpp"
#include "ratekeeper/provider/limits.hpp"
#include "ratekeeper/provider/resync.hpp"

namespace rk = ratekeeper;
namespace pv = ratekeeper::provider;

namespace {

void check(bool ok) {
  if (!ok) std::abort();
}

struct Field {
  std::string name;
  std::string value;
};

constexpr std::int64_t kS = 1'000'000'000;
// A fixed wall clock (2026), so that runs reproduce.
constexpr rk::Nanos kNow{1'796'000'000 * kS};

void parsers(std::string_view s) {
  if (const auto d = pv::parse_go_duration(s); d.ok()) {
    check(d->count() >= 0);
    if (d->count() <= rk::detail::kI64Max - 1'000'000) {
      const std::int64_t ms = (d->count() + 999'999) / 1'000'000;
      const auto back = pv::parse_go_duration(rk::detail::go_duration(*d));
      check(back.ok() && back->count() == ms * 1'000'000);
    }
  }
  if (const auto t = pv::parse_rfc3339(s); t.ok()) {
    const std::int64_t secs = rk::detail::floor_div_i64(t->count(), kS);
    if (secs >= 0) {  // the formatter writes years from 1970 on
      const auto back = pv::parse_rfc3339(rk::detail::rfc3339(secs));
      check(back.ok() && back->count() == secs * kS);
    }
  }
  (void)pv::parse_http_date(s, kNow);
  if (const auto d = pv::parse_retry_after(s, kNow); d.ok()) {
    check(d->count() >= 0);
  }
  if (const auto d = pv::parse_retry_after_ms(s); d.ok()) {
    check(d->count() >= 0);
  }
  (void)pv::parse_count(s);
}

pv::ProviderChain& chain(bool anthropic) {
  static std::unique_ptr<pv::ProviderChain> oa =
      pv::ProviderChain::create(pv::ProviderLimits::openai(600, 60000)).value();
  static std::unique_ptr<pv::ProviderChain> an =
      pv::ProviderChain::create(pv::ProviderLimits::anthropic(50, 40000, 8000))
          .value();
  return anthropic ? *an : *oa;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data,
                                      std::size_t size) {
  const std::string_view in(reinterpret_cast<const char*>(data), size);
  parsers(in);
  if (size < 2) return 0;
  const int status = data[0] * 4 + (data[1] & 3);  // 0..1023: 429, 503, 529
  std::vector<Field> fields;
  std::string_view rest = in.substr(2);
  while (!rest.empty()) {
    const std::size_t nl = rest.find('\n');
    const std::string_view line = rest.substr(0, nl);
    rest =
        nl == std::string_view::npos ? std::string_view{} : rest.substr(nl + 1);
    const std::size_t colon = line.find(':');
    if (colon == std::string_view::npos) {
      parsers(line);
      continue;
    }
    fields.push_back({std::string(line.substr(0, colon)),
                      std::string(line.substr(colon + 1))});
    parsers(fields.back().value);
  }
  const auto r = pv::read_provider_headers(status, fields, kNow);
  if (!r.ok()) {
    check(!r.status().message().empty());
    return 0;
  }
  check(r->status == status);
  check(r->response == pv::classify_status(status));
  if (r->retry_after) check(r->retry_after->count() >= 0);
  for (const pv::DimensionReading& d : r->dims) {
    if (d.reset) check(d.reset->count() >= 0);
  }
  // Follow it: a local clock that moves with the input.
  static rk::Nanos local{0};
  local += rk::Nanos{static_cast<std::int64_t>(data[1]) * 10'000'000};
  pv::ProviderChain& c = chain((data[1] & 4) != 0);
  c.observe("k", *r, local);
  for (std::size_t i = 0; i < pv::kDimensions; ++i) {
    const auto d = static_cast<pv::Dimension>(i);
    if (c.limit(d) == nullptr) continue;
    const std::uint32_t f = c.factor_ppm(d, local);
    check(f >= 1 && f <= pv::ProviderChain::kOne);
    check(c.effective_limit(d, local) <= c.limits().configured(d));
    check(c.limit(d)->peek("k", 0, local).remaining <=
          pv::burst_of(c.limits(), d));
  }
  pv::ProviderRequest req;
  req.prompt_tokens = data[0];
  req.max_tokens = data[1];
  rk::ChainDecision dec = c.admit("k", req, local);
  if (dec.allowed) {
    rk::Usage u;
    u.output = data[0];
    check(c.settle(dec, req, u, local).ok());
  }
  return 0;
}
