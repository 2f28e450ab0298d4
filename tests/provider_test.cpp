// Issue 18, "Following the provider": provider/headers.hpp,
// provider/limits.hpp and provider/resync.hpp.
//
// Golden values come from the documents that define each format: Go's
// time.ParseDuration documentation (pkg.go.dev/time), OpenAI's "Rate
// limits" guide ("Rate limits in headers": 60 / 150000 / 59 / 149984 /
// "1s" / "6m0s"), Anthropic's "Rate limits" page ("Response headers":
// anthropic-ratelimit-*-{limit,remaining,reset}, reset in RFC 3339),
// RFC 3339 section 5.8 and RFC 9110 sections 5.6.7 and 10.2.3; the Unix
// times of the dates were computed apart (Python's datetime).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>
#include <thread>
#include <vector>

#include "catch2/catch.hpp"
#include "ratekeeper/clock.hpp"
#include "ratekeeper/errors.hpp"
#include "ratekeeper/http/headers.hpp"
#include "ratekeeper/provider/headers.hpp"
#include "ratekeeper/provider/limits.hpp"
#include "ratekeeper/provider/resync.hpp"

namespace rk = ratekeeper;
namespace pv = ratekeeper::provider;
using namespace std::chrono_literals;
using rk::Nanos;

namespace {

constexpr std::int64_t kS = 1'000'000'000;

Nanos go(std::string_view s) {
  const absl::StatusOr<Nanos> d = pv::parse_go_duration(s);
  INFO(s << ": " << d.status());
  REQUIRE(d.ok());
  return *d;
}

}  // namespace

TEST_CASE("Go durations: the documented examples read exactly", "[i18]") {
  // OpenAI's guide and LLM-ACCOUNTING.md.
  CHECK(go("1s") == 1s);
  CHECK(go("6m0s") == 6min);
  CHECK(go("12ms") == 12ms);
  CHECK(go("20ms") == 20ms);
  CHECK(go("1h2m3.5s") == 1h + 2min + 3500ms);
  // Go's time.ParseDuration examples.
  CHECK(go("300ms") == 300ms);
  CHECK(go("2h45m") == 2h + 45min);
  CHECK(go("1h15m30.918273645s") == 1h + 15min + 30s + Nanos{918'273'645});
  CHECK(go("1.5h") == 90min);
  // The rest of the grammar.
  CHECK(go("0") == 0ns);
  CHECK(go("+5s") == 5s);
  CHECK(go(".5s") == 500ms);
  CHECK(go("1.s") == 1s);
  CHECK(go("7ns") == 7ns);
  CHECK(go("3us") == 3us);
  CHECK(go("3\xC2\xB5s") == 3us);    // U+00B5
  CHECK(go("3\xCE\xBCs") == 3us);    // U+03BC
  CHECK(go("1.0000000009s") == 1s);  // below a nanosecond: dropped
  CHECK(go("  6m0s\t") == 6min);     // OWS trimmed
  CHECK(go("9223372036854775807ns") == Nanos::max());
}

TEST_CASE("Go durations: bad input is a clear status", "[i18]") {
  struct Bad {
    const char* text;
    absl::StatusCode code;
    const char* says;
  };
  const Bad bad[] = {
      {"", absl::StatusCode::kInvalidArgument, "empty"},
      {"-1.5h", absl::StatusCode::kInvalidArgument, "negative"},
      {"1", absl::StatusCode::kInvalidArgument, "unit is missing"},
      {"1x", absl::StatusCode::kInvalidArgument, "unknown unit"},
      {"s", absl::StatusCode::kInvalidArgument, "number is missing"},
      {".s", absl::StatusCode::kInvalidArgument, "number is missing"},
      {"1s2", absl::StatusCode::kInvalidArgument, "unit is missing"},
      {"1 s", absl::StatusCode::kInvalidArgument, "unknown unit"},
      {"9223372036854775808ns", absl::StatusCode::kOutOfRange, "2^63"},
      {"2562048h", absl::StatusCode::kOutOfRange, "2^63"},
      {"2562047h48m", absl::StatusCode::kOutOfRange, "2^63"},
      {"99999999999999999999999s", absl::StatusCode::kOutOfRange, "2^63"},
  };
  for (const Bad& b : bad) {
    const absl::StatusOr<Nanos> d = pv::parse_go_duration(b.text);
    INFO(b.text << " -> " << d.status());
    REQUIRE_FALSE(d.ok());
    CHECK(d.status().code() == b.code);
    CHECK(d.status().message().find(b.says) != std::string::npos);
  }
}

TEST_CASE("Go durations: what the headers write reads back", "[i18]") {
  // ratekeeper's own x-ratelimit-reset-* (errors.hpp go_duration) rounds up
  // to the millisecond; reading it gives that rounding exactly.
  const std::int64_t samples[] = {0,
                                  1,
                                  999'999,
                                  1'000'000,
                                  1'500'000'000,
                                  59'999'000'001,
                                  3'723'500'000'000,
                                  93'784'005'000'000,
                                  360'000'000'000};
  for (const std::int64_t ns : samples) {
    const std::int64_t ms = (ns + 999'999) / 1'000'000;
    INFO(ns << " -> " << rk::detail::go_duration(Nanos{ns}));
    CHECK(go(rk::detail::go_duration(Nanos{ns})) == Nanos{ms * 1'000'000});
  }
}

TEST_CASE("RFC 3339: section 5.8's examples", "[i18]") {
  const auto at = [](std::string_view s) {
    const absl::StatusOr<Nanos> t = pv::parse_rfc3339(s);
    INFO(s << ": " << t.status());
    REQUIRE(t.ok());
    return t->count();
  };
  CHECK(at("1985-04-12T23:20:50.52Z") == 482'196'050 * kS + 520'000'000);
  CHECK(at("1996-12-19T16:39:57-08:00") == 851'042'397 * kS);
  CHECK(at("1990-12-31T23:59:60Z") == 662'688'000 * kS);  // leap second
  CHECK(at("1990-12-31T15:59:60-08:00") == 662'688'000 * kS);
  CHECK(at("1937-01-01T12:00:27.87+00:20") ==
        -1'041'337'173 * kS + 870'000'000);
  // Anthropic's reset header, as the API writes it.
  CHECK(at("2024-08-21T17:54:32Z") == 1'724'262'872 * kS);
  CHECK(at("2024-08-21t17:54:32z") == 1'724'262'872 * kS);
  CHECK(at("2024-08-21 17:54:32Z") == 1'724'262'872 * kS);
  // ratekeeper's own formatting reads back.
  for (const std::int64_t secs : {0LL, 1'724'262'872LL, 951'782'400LL}) {
    CHECK(at(rk::detail::rfc3339(secs)) == secs * kS);
  }
  for (const char* b :
       {"", "2024-08-21", "2024-08-21T17:54:32", "2024-02-30T00:00:00Z",
        "2023-02-29T00:00:00Z", "2024-13-01T00:00:00Z", "2024-08-21T24:00:00Z",
        "2024-08-21T17:60:00Z", "2024-08-21T17:54:61Z", "2024-08-21T17:54:32.Z",
        "2024-08-21T17:54:32+0100", "2024-08-21T17:54:32+24:00",
        "2024-08-21T17:54:32Zjunk", "24-08-21T17:54:32Z",
        "2024-08-21X17:54:32Z"}) {
    const absl::StatusOr<Nanos> t = pv::parse_rfc3339(b);
    INFO(b);
    CHECK(t.status().code() == absl::StatusCode::kInvalidArgument);
  }
  CHECK(pv::parse_rfc3339("2024-02-29T00:00:00Z").ok());  // leap year
  CHECK(pv::parse_rfc3339("9999-12-31T23:59:59Z").status().code() ==
        absl::StatusCode::kOutOfRange);
}

TEST_CASE("HTTP-date: RFC 9110's three forms of one time", "[i18]") {
  const Nanos now{1'724'262'872 * kS};  // 2024
  for (const char* s :
       {"Sun, 06 Nov 1994 08:49:37 GMT", "Sunday, 06-Nov-94 08:49:37 GMT",
        "Sun Nov  6 08:49:37 1994"}) {
    const absl::StatusOr<Nanos> t = pv::parse_http_date(s, now);
    INFO(s << ": " << t.status());
    REQUIRE(t.ok());
    CHECK(t->count() == 784'111'777 * kS);
  }
  // RFC 850's two-digit year: more than 50 years ahead means the past.
  CHECK(pv::parse_http_date("Monday, 06-Nov-23 08:49:37 GMT", now)->count() ==
        1'699'260'577 * kS);
  for (const char* b :
       {"", "Sun, 06 Nov 1994 08:49:37 UTC", "Sun, 31 Feb 1994 08:49:37 GMT",
        "Sun, 06 Foo 1994 08:49:37 GMT", "Xyz, 06 Nov 1994 08:49:37 GMT",
        "Sun, 6 Nov 1994 08:49:37 GMT", "Sunday, 06-Nov-1994 08:49:37 GMT",
        "Sun Nov 6 08:49:37 1994", "Sun, 06 Nov 1994 25:49:37 GMT"}) {
    INFO(b);
    CHECK(pv::parse_http_date(b, now).status().code() ==
          absl::StatusCode::kInvalidArgument);
  }
}

TEST_CASE("Retry-After and retry-after-ms", "[i18]") {
  const Nanos now{784'111'777 * kS};
  CHECK(*pv::parse_retry_after("120", now) == 120s);
  CHECK(*pv::parse_retry_after(" 0 ", now) == 0s);
  CHECK(*pv::parse_retry_after("Sun, 06 Nov 1994 08:50:07 GMT", now) == 30s);
  CHECK(*pv::parse_retry_after("Sun, 06 Nov 1994 08:49:00 GMT", now) == 0s);
  for (const char* b : {"", "1.5", "-1", "soon", "12s", "Sun, 06 Nov"}) {
    INFO(b);
    CHECK(pv::parse_retry_after(b, now).status().code() ==
          absl::StatusCode::kInvalidArgument);
  }
  CHECK(pv::parse_retry_after("99999999999", now).status().code() ==
        absl::StatusCode::kOutOfRange);
  CHECK(*pv::parse_retry_after_ms("1500") == 1500ms);
  CHECK(*pv::parse_retry_after_ms("20.5") == 20500us);
  CHECK(*pv::parse_retry_after_ms(".25") == 250us);
  for (const char* b : {"", ".", "-5", "1e3", "1,5", "abc"}) {
    INFO(b);
    CHECK(pv::parse_retry_after_ms(b).status().code() ==
          absl::StatusCode::kInvalidArgument);
  }
  CHECK(pv::parse_retry_after_ms("99999999999999999").status().code() ==
        absl::StatusCode::kOutOfRange);
}

TEST_CASE("Statuses: 429, 529 and 503 back off", "[i18]") {
  CHECK(pv::classify_status(200) == pv::ResponseClass::kOk);
  CHECK(pv::classify_status(201) == pv::ResponseClass::kOk);
  CHECK(pv::classify_status(429) == pv::ResponseClass::kRateLimited);
  CHECK(pv::classify_status(529) == pv::ResponseClass::kOverloaded);
  CHECK(pv::classify_status(503) == pv::ResponseClass::kUnavailable);
  CHECK(pv::classify_status(500) == pv::ResponseClass::kOther);
  CHECK(pv::classify_status(-1) == pv::ResponseClass::kOther);
  for (const int s : {429, 529, 503}) {
    CHECK(pv::backs_off(pv::classify_status(s)));
  }
  for (const int s : {200, 400, 500, 502}) {
    CHECK_FALSE(pv::backs_off(pv::classify_status(s)));
  }
}

TEST_CASE("OpenAI's documented headers read into a ProviderReading", "[i18]") {
  const std::vector<rk::http::Header> h = {
      {"x-ratelimit-limit-requests", "60"},
      {"x-ratelimit-limit-tokens", "150000"},
      {"x-ratelimit-remaining-requests", "59"},
      {"X-RateLimit-Remaining-Tokens", "149984"},  // case-insensitive
      {"x-ratelimit-reset-requests", "1s"},
      {"x-ratelimit-reset-tokens", "6m0s"},
      {"content-type", "application/json"},
  };
  const auto r = pv::read_provider_headers(200, h, Nanos{0});
  REQUIRE(r.ok());
  CHECK(r->response == pv::ResponseClass::kOk);
  const pv::DimensionReading& q = (*r)[pv::Dimension::kRequests];
  const pv::DimensionReading& t = (*r)[pv::Dimension::kTokens];
  CHECK(q.limit == 60u);
  CHECK(q.remaining == 59u);
  CHECK(q.reset == Nanos{1s});
  CHECK(t.limit == 150000u);
  CHECK(t.remaining == 149984u);
  CHECK(t.reset == Nanos{6min});
  CHECK_FALSE((*r)[pv::Dimension::kInputTokens].any());
  CHECK_FALSE(r->retry_after.has_value());
}

TEST_CASE("Anthropic's headers: RFC 3339 resets become delays", "[i18]") {
  const Nanos now{1'724'262'842 * kS};  // 30 s before the resets
  const std::vector<rk::http::Header> h = {
      {"anthropic-ratelimit-requests-limit", "50"},
      {"anthropic-ratelimit-requests-remaining", "0"},
      {"anthropic-ratelimit-requests-reset", "2024-08-21T17:54:32Z"},
      {"anthropic-ratelimit-input-tokens-limit", "40000"},
      {"anthropic-ratelimit-input-tokens-remaining", "31000"},
      {"anthropic-ratelimit-input-tokens-reset", "2024-08-21T17:54:12.5Z"},
      {"anthropic-ratelimit-output-tokens-limit", "8000"},
      {"anthropic-ratelimit-output-tokens-remaining", "8000"},
      {"anthropic-ratelimit-output-tokens-reset", "2024-01-01T00:00:00Z"},
      {"anthropic-ratelimit-tokens-remaining", "39000"},
      {"anthropic-ratelimit-unified-status", "allowed"},  // ignored
      {"retry-after", "30"},
  };
  const auto r = pv::read_provider_headers(429, h, now);
  REQUIRE(r.ok());
  CHECK(r->response == pv::ResponseClass::kRateLimited);
  CHECK((*r)[pv::Dimension::kRequests].remaining == 0u);
  CHECK((*r)[pv::Dimension::kRequests].reset == Nanos{30s});
  CHECK((*r)[pv::Dimension::kInputTokens].limit == 40000u);
  CHECK((*r)[pv::Dimension::kInputTokens].reset == Nanos{10500ms});
  CHECK((*r)[pv::Dimension::kOutputTokens].reset == Nanos{0});  // past
  CHECK((*r)[pv::Dimension::kTokens].remaining == 39000u);
  CHECK(r->retry_after == Nanos{30s});

  // retry-after-ms wins over retry-after, in either order.
  const std::vector<rk::http::Header> both = {{"retry-after-ms", "1500"},
                                              {"retry-after", "2"}};
  CHECK(pv::read_provider_headers(529, both, now)->retry_after ==
        Nanos{1500ms});
}

TEST_CASE("A malformed header refuses the reading and names it", "[i18]") {
  const std::pair<const char*, const char*> bad[] = {
      {"x-ratelimit-reset-tokens", "6 minutes"},
      {"x-ratelimit-remaining-tokens", "-3"},
      {"x-ratelimit-limit-requests", "1e3"},
      {"anthropic-ratelimit-requests-reset", "tomorrow"},
      {"retry-after", "later"},
      {"retry-after-ms", "x"},
  };
  for (const auto& [name, value] : bad) {
    const std::vector<rk::http::Header> h = {{"x-ratelimit-limit-tokens", "5"},
                                             {name, value}};
    const auto r = pv::read_provider_headers(200, h, Nanos{0});
    INFO(name << ": " << value << " -> " << r.status());
    REQUIRE_FALSE(r.ok());
    CHECK(r.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK(r.status().message().find(name) != std::string::npos);
  }
}

// --- presets: what each provider counts ---

TEST_CASE("Presets count a call the way each provider does", "[i18]") {
  const pv::ProviderRequest r{.prompt_tokens = 1200,
                              .max_tokens = 500,
                              .best_of = 3,
                              .cache_read_tokens = 1000};
  using D = pv::Dimension;
  const auto at = [](const pv::DimensionCosts& c, D d) {
    return c[static_cast<std::size_t>(d)];
  };
  // OpenAI: max(max_tokens, estimated prompt) against TPM.
  const pv::ProviderLimits oa = pv::ProviderLimits::openai(500, 30000);
  CHECK(at(pv::admission_costs(oa, r), D::kRequests) == 1u);
  CHECK(at(pv::admission_costs(oa, r), D::kTokens) == 1200u);
  CHECK(at(pv::admission_costs(oa, {.prompt_tokens = 10, .max_tokens = 900}),
           D::kTokens) == 900u);
  CHECK_FALSE(at(pv::admission_costs(oa, r), D::kInputTokens).has_value());
  // Azure: prompt + max_tokens x best_of.
  const pv::ProviderLimits az = pv::ProviderLimits::azure_openai(600, 60000);
  CHECK(at(pv::admission_costs(az, r), D::kTokens) == 1200u + 500u * 3u);
  CHECK(at(pv::admission_costs(
               az, {.prompt_tokens = 7, .max_tokens = 5, .best_of = 0}),
           D::kTokens) == 12u);
  // Anthropic: ITPM without the cache reads, OTPM from max_tokens.
  pv::ProviderLimits an = pv::ProviderLimits::anthropic(50, 40000, 8000);
  CHECK(at(pv::admission_costs(an, r), D::kInputTokens) == 200u);
  CHECK(at(pv::admission_costs(an, r), D::kOutputTokens) == 500u);
  CHECK_FALSE(at(pv::admission_costs(an, r), D::kTokens).has_value());
  an.cache_reads_count = true;
  CHECK(at(pv::admission_costs(an, r), D::kInputTokens) == 1200u);

  // Settled to the usage, as each counts it.
  rk::Usage u;
  u.input_uncached = 150;
  u.cache_read = 1000;
  u.cache_write_5m = 40;
  u.output = 321;
  u.reasoning = 100;  // part of output, never added
  CHECK(at(pv::usage_costs(oa, r, u), D::kTokens) == 150u + 1000 + 40 + 321);
  CHECK(at(pv::usage_costs(az, r, u), D::kTokens) == 2700u);  // kept
  an.cache_reads_count = false;
  CHECK(at(pv::usage_costs(an, r, u), D::kInputTokens) == 190u);
  CHECK(at(pv::usage_costs(an, r, u), D::kOutputTokens) == 321u);
  an.cache_reads_count = true;
  CHECK(at(pv::usage_costs(an, r, u), D::kInputTokens) == 1190u);
}

TEST_CASE("Presets build their buckets; bad numbers are refused", "[i18]") {
  const pv::ProviderLimits az = pv::ProviderLimits::azure_openai(600, 60000);
  CHECK(pv::burst_of(az, pv::Dimension::kRequests) == 100u);  // 10 s of 600
  CHECK(pv::burst_of(az, pv::Dimension::kTokens) == 60000u);
  const auto b = pv::bucket_for(az, pv::Dimension::kRequests);
  REQUIRE(b.ok());
  CHECK(b->rate() == rk::per_minute(600));
  CHECK(b->burst() == 100u);
  CHECK(pv::bucket_for(az, pv::Dimension::kInputTokens).status().code() ==
        absl::StatusCode::kInvalidArgument);

  pv::ProviderLimits bad = pv::ProviderLimits::openai(10, 10);
  bad.itpm = 5;
  CHECK(pv::validate(bad).code() == absl::StatusCode::kInvalidArgument);
  CHECK(pv::validate(pv::ProviderLimits::openai(0, 0)).code() ==
        absl::StatusCode::kInvalidArgument);
  pv::ProviderLimits w = pv::ProviderLimits::openai(10, 10);
  w.request_window = 2min;
  CHECK_FALSE(pv::ProviderChain::create(w).ok());
  pv::ResyncOptions o;
  o.decrease_permille = 1000;
  CHECK_FALSE(
      pv::ProviderChain::create(pv::ProviderLimits::openai(10, 10), o).ok());
}

TEST_CASE("ProviderChain admits and settles as the provider counts", "[i18]") {
  auto c =
      pv::ProviderChain::create(pv::ProviderLimits::anthropic(50, 40000, 8000));
  REQUIRE(c.ok());
  pv::ProviderChain& pc = **c;
  const Nanos t0{0};
  const pv::ProviderRequest r{
      .prompt_tokens = 3000, .max_tokens = 2000, .cache_read_tokens = 1000};
  rk::ChainDecision d = pc.admit("k", r, t0);
  REQUIRE(d.allowed);
  auto left = [&](pv::Dimension dim) {
    return pc.limit(dim)->peek("k", 0, t0).remaining;
  };
  CHECK(left(pv::Dimension::kRequests) == 49u);
  CHECK(left(pv::Dimension::kInputTokens) == 40000u - 2000u);
  CHECK(left(pv::Dimension::kOutputTokens) == 8000u - 2000u);
  rk::Usage u;
  u.input_uncached = 1800;
  u.cache_read = 1000;
  u.cache_write_1h = 100;
  u.output = 700;
  REQUIRE(pc.settle(d, r, u, t0).ok());
  CHECK(left(pv::Dimension::kRequests) == 49u);
  CHECK(left(pv::Dimension::kInputTokens) == 40000u - 1900u);
  CHECK(left(pv::Dimension::kOutputTokens) == 8000u - 700u);
  // A call larger than OTPM can never pass; a refused decision holds
  // nothing to settle.
  rk::ChainDecision big = pc.admit("k", {.max_tokens = 9000}, t0);
  CHECK(big.never());
  CHECK(pc.settle(big, r, u, t0).code() ==
        absl::StatusCode::kFailedPrecondition);
}

// --- resync: headers lower, time restores ---

namespace {

pv::ProviderReading reading(int status) {
  pv::ProviderReading r;
  r.status = status;
  r.response = pv::classify_status(status);
  return r;
}

}  // namespace

TEST_CASE("Remaining headers lower the local limit, never raise it", "[i18]") {
  auto c = pv::ProviderChain::create(pv::ProviderLimits::openai(600, 60000));
  REQUIRE(c.ok());
  pv::ProviderChain& pc = **c;
  rk::ManualClock clock;
  rk::Limit* tpm = pc.limit(pv::Dimension::kTokens);
  REQUIRE(pc.admit("k", {.prompt_tokens = 1000}, clock.now()).allowed);
  CHECK(tpm->peek("k", 0, clock.now()).remaining == 59000u);

  // The provider has seen the rest of the fleet: 20000 left.
  pv::ProviderReading r = reading(200);
  r[pv::Dimension::kTokens].remaining = 20000;
  pc.observe("k", r, clock.now());
  CHECK(tpm->peek("k", 0, clock.now()).remaining == 20000u);
  // A larger remaining raises nothing.
  r[pv::Dimension::kTokens].remaining = 50000;
  pc.observe("k", r, clock.now());
  CHECK(tpm->peek("k", 0, clock.now()).remaining == 20000u);
  // Nor does a limit above the configured one.
  r[pv::Dimension::kTokens].limit = 1'000'000;
  pc.observe("k", r, clock.now());
  CHECK(pc.factor_ppm(pv::Dimension::kTokens, clock.now()) ==
        pv::ProviderChain::kOne);
  // Time refills it at the configured rate: 1000 tokens a second.
  clock.advance(10s);
  CHECK(tpm->peek("k", 0, clock.now()).remaining == 30000u);
  clock.advance(60s);
  CHECK(tpm->peek("k", 0, clock.now()).remaining == 60000u);
}

TEST_CASE("A lower published limit lowers f; it climbs back by the rule",
          "[i18]") {
  pv::ResyncOptions o;
  o.increase_permille = 100;
  o.increase_interval = 2s;
  auto c = pv::ProviderChain::create(pv::ProviderLimits::openai(600, 60000), o);
  REQUIRE(c.ok());
  pv::ProviderChain& pc = **c;
  rk::ManualClock clock(Nanos{5 * kS});
  pv::ProviderReading r = reading(200);
  r[pv::Dimension::kTokens].limit = 15000;  // a quarter
  pc.observe("k", r, clock.now());
  const Nanos lowered = clock.now();
  CHECK(pc.effective_limit(pv::Dimension::kTokens, lowered) == 15000u);
  CHECK(pc.effective_limit(pv::Dimension::kRequests, lowered) == 600u);
  // A call of 15000 tokens is counted as 60000 in the configured bucket:
  // one fits, the next does not.
  CHECK(pc.admit("k", {.prompt_tokens = 15000}, lowered).allowed);
  CHECK_FALSE(pc.admit("k", {.prompt_tokens = 1}, lowered).allowed);
  // The oracle: f = 0.25 + 0.1 per whole 2 s, at most 1.
  for (int s = 0; s <= 20; ++s) {
    const Nanos at = lowered + std::chrono::seconds(s);
    const std::uint64_t expect_ppm = std::min<std::uint64_t>(
        250'000 + 100'000 * static_cast<std::uint64_t>(s / 2), 1'000'000);
    INFO("after " << s << " s");
    CHECK(pc.factor_ppm(pv::Dimension::kTokens, at) == expect_ppm);
  }
  // Back at the configured value: the bucket holds its whole burst again.
  const Nanos back = lowered + 16s;
  CHECK(pc.effective_limit(pv::Dimension::kTokens, back) == 60000u);
  clock.set(back + 60s);
  CHECK(pc.admit("k", {.prompt_tokens = 60000}, clock.now()).allowed);
}

TEST_CASE("AIMD: one decrease per 429 burst, floor, additive climb", "[i18]") {
  pv::ResyncOptions o;       // 0.5 per burst of 1 s, floor 0.02
  o.increase_permille = 50;  // +0.05 per 1 s
  auto c = pv::ProviderChain::create(pv::ProviderLimits::openai(600, 60000), o);
  REQUIRE(c.ok());
  pv::ProviderChain& pc = **c;
  const auto f = [&](Nanos t) {
    return pc.factor_ppm(pv::Dimension::kTokens, t);
  };
  Nanos t{0};
  pc.observe("k", reading(429), t);
  CHECK(f(t) == 500'000u);
  pc.observe("k", reading(429), t + 999ms);  // the same burst
  CHECK(f(t + 999ms) == 500'000u);
  t += 1s;  // a new burst (f has climbed by 0.05 meanwhile)
  CHECK(f(t) == 550'000u);
  pc.observe("k", reading(529), t);
  CHECK(f(t) == 275'000u);
  for (int i = 0; i < 10; ++i) pc.observe("k", reading(503), t + i * 1s);
  // Ten more bursts, each after a climb of 0.05: never below 0.02.
  CHECK(f(t + 9s) >= 20'000u);
  // Only the dimension the headers name at 0 is lowered.
  auto c2 =
      pv::ProviderChain::create(pv::ProviderLimits::openai(600, 60000), o);
  REQUIRE(c2.ok());
  pv::ProviderReading r = reading(429);
  r[pv::Dimension::kRequests].remaining = 0;
  r[pv::Dimension::kTokens].remaining = 30000;
  (*c2)->observe("k", r, Nanos{0});
  CHECK((*c2)->factor_ppm(pv::Dimension::kRequests, Nanos{0}) == 500'000u);
  CHECK((*c2)->factor_ppm(pv::Dimension::kTokens, Nanos{0}) ==
        pv::ProviderChain::kOne);
  // A 200 lowers nothing; a 500 neither.
  (*c2)->observe("k", reading(200), 10s);
  (*c2)->observe("k", reading(500), 10s);
  CHECK((*c2)->factor_ppm(pv::Dimension::kTokens, 10s) ==
        pv::ProviderChain::kOne);
  // Climbing back: 0.5 + 0.05 per second, at 1 after exactly 10 s.
  CHECK((*c2)->factor_ppm(pv::Dimension::kRequests, 9999ms) == 950'000u);
  CHECK((*c2)->factor_ppm(pv::Dimension::kRequests, 10s) ==
        pv::ProviderChain::kOne);
}

TEST_CASE("A 429 after a limit below the floor does not raise f", "[i18]") {
  // A published limit of 300 of the configured 30,000 tokens puts f at
  // 0.01, under the AIMD floor (0.02): a 429 then, in the same answer or a
  // later one, leaves f where it is; nothing an answer says raises it.
  for (const bool same_answer : {false, true}) {
    auto c = pv::ProviderChain::create(pv::ProviderLimits::openai(500, 30000),
                                       pv::ResyncOptions{});
    REQUIRE(c.ok());
    pv::ProviderChain& pc = **c;
    const Nanos t{5 * kS};
    pv::ProviderReading low = reading(same_answer ? 429 : 200);
    low[pv::Dimension::kTokens].limit = 300;
    pc.observe("k", low, t);
    if (!same_answer) pc.observe("k", reading(429), t);
    INFO("one answer: " << same_answer);
    CHECK(pc.factor_ppm(pv::Dimension::kTokens, t) == 10'000u);
    CHECK(pc.effective_limit(pv::Dimension::kTokens, t) == 300u);
  }
}

TEST_CASE("The defaults: a 429 halves f, 50 s bring it back", "[i18]") {
  // docs/provider.md's example, with the default ResyncOptions.
  auto c = pv::ProviderChain::create(pv::ProviderLimits::openai(500, 30000));
  REQUIRE(c.ok());
  const Nanos t0{7 * kS};
  (*c)->observe("k", reading(429), t0);
  CHECK((*c)->factor_ppm(pv::Dimension::kTokens, t0) == 500'000u);
  CHECK((*c)->effective_limit(pv::Dimension::kTokens, t0) == 15000u);
  CHECK((*c)->effective_limit(pv::Dimension::kTokens, t0 + 49s) == 29700u);
  CHECK((*c)->effective_limit(pv::Dimension::kTokens, t0 + 50s) == 30000u);
  // A nearly empty provider holds it: the climb restarts.
  pv::ProviderReading low = reading(200);
  low[pv::Dimension::kTokens].remaining = 2999;  // below 10% of 30000
  (*c)->observe("k", low, t0 + 30s);
  CHECK((*c)->factor_ppm(pv::Dimension::kTokens, t0 + 30s) == 500'000u);
  CHECK((*c)->factor_ppm(pv::Dimension::kTokens, t0 + 40s) == 600'000u);
  // 10% or more does not hold it.
  low[pv::Dimension::kTokens].remaining = 3000;
  (*c)->observe("k", low, t0 + 40s);
  CHECK((*c)->factor_ppm(pv::Dimension::kTokens, t0 + 40s) == 600'000u);
  CHECK((*c)->factor_ppm(pv::Dimension::kTokens, t0 + 80s) ==
        pv::ProviderChain::kOne);
}

TEST_CASE("A 429's Retry-After holds every call until it ends", "[i18]") {
  pv::ResyncOptions o;
  o.aimd = false;  // the wait alone
  auto c = pv::ProviderChain::create(pv::ProviderLimits::openai(60, 60000), o);
  REQUIRE(c.ok());
  pv::ProviderChain& pc = **c;
  Nanos base{0};
  for (const Nanos wait : {Nanos{5s}, Nanos{1500ms}, Nanos{30s}}) {
    base += 200s;  // the bucket full again between rounds
    pv::ProviderReading r = reading(429);
    r.retry_after = wait;
    pc.observe("k", r, base);
    // The first instant (ms) a call passes: at or after the wait, within
    // one request's refill (1 s at 60 rpm) of it.
    Nanos first{-1};
    for (Nanos t = base; t <= base + wait + 2s; t += 1ms) {
      if (pc.limit(pv::Dimension::kRequests)->peek("k", 1, t).allowed) {
        first = t - base;
        break;
      }
    }
    INFO("wait " << wait.count());
    CHECK(first >= wait);
    CHECK(first <= wait + 1s);
  }
}

// --- a fleet against a simulated provider ---

namespace {

// The provider: its published limits as exact token buckets (the oracle),
// each counting the call as the provider does (admission_costs: the
// simulated calls use what they asked for, so the usage equals it),
// answering with its own headers (OpenAI's Go durations or Anthropic's
// RFC 3339 times), which the instances read back with
// read_provider_headers as a client would.
struct SimProvider {
  pv::ProviderLimits published;
  struct Dim {
    pv::Dimension d;
    rk::TokenBucket bucket;
    rk::TokenBucket::State s{};
  };
  std::vector<Dim> dims;
  int ok = 0;
  int refused = 0;
  static constexpr std::int64_t kEpoch = 1'800'000'000;  // wall clock base

  explicit SimProvider(const pv::ProviderLimits& l) : published(l) {
    for (std::size_t i = 0; i < pv::kDimensions; ++i) {
      const auto d = static_cast<pv::Dimension>(i);
      if (l.configured(d) != 0)
        dims.push_back({d, pv::bucket_for(l, d).value()});
    }
  }

  std::vector<rk::http::Header> call(const pv::ProviderRequest& req, Nanos now,
                                     int& status) {
    const pv::DimensionCosts c = pv::admission_costs(published, req);
    Nanos wait{0};
    bool all = true;
    for (Dim& x : dims) {
      const auto st =
          x.bucket.step(x.s, now, *c[static_cast<std::size_t>(x.d)]);
      if (!st.decision.allowed) {
        all = false;
        wait = std::max(wait, st.decision.retry_after);
      }
    }
    std::vector<rk::http::Header> h;
    if (all) {
      for (Dim& x : dims) {
        x.s = x.bucket.step(x.s, now, *c[static_cast<std::size_t>(x.d)]).next;
      }
      status = 200;
      ++ok;
    } else {
      status = 429;
      ++refused;
      h.push_back({"retry-after-ms",
                   std::to_string((wait.count() + 999'999) / 1'000'000)});
    }
    const bool anthropic = published.kind == pv::ProviderKind::kAnthropic;
    for (Dim& x : dims) {
      const rk::Decision q = x.bucket.step(x.s, now, 0).decision;
      const std::string n(pv::dimension_name(x.d));
      const auto name = [&](const char* field) {
        return anthropic ? "anthropic-ratelimit-" + n + "-" + field
                         : std::string("x-ratelimit-") + field + "-" + n;
      };
      h.push_back({name("limit"), std::to_string(q.limit)});
      h.push_back({name("remaining"), std::to_string(q.remaining)});
      const std::int64_t reset_s = (now + q.reset_after).count() / kS +
                                   ((now + q.reset_after).count() % kS != 0);
      h.push_back(
          {name("reset"), anthropic ? rk::detail::rfc3339(kEpoch + reset_s)
                                    : rk::detail::go_duration(q.reset_after)});
    }
    return h;
  }
};

struct FleetResult {
  int provider_ok = 0;
  int provider_429 = 0;
  int provider_429_late = 0;  // after the first minute
  int local_refused = 0;
};

// `n` instances, each configured with the whole published limit (each
// thinks it has all the headroom), each trying `req` once a second
// (staggered), for `seconds`; with `resync`, each follows the answers.
FleetResult run_fleet(const pv::ProviderLimits& published, int n, int seconds,
                      bool resync, const pv::ProviderRequest& req) {
  SimProvider p(published);
  std::vector<std::unique_ptr<pv::ProviderChain>> fleet;
  for (int i = 0; i < n; ++i) {
    fleet.push_back(pv::ProviderChain::create(published).value());
  }
  rk::ManualClock clock;
  FleetResult out;
  rk::Usage used;  // what the call used: what it asked for
  used.input_uncached = req.prompt_tokens;
  used.output = req.max_tokens;
  const Nanos step = std::chrono::duration_cast<Nanos>(1s) / n;
  for (int k = 0; k < seconds * n; ++k) {
    clock.advance(step);
    pv::ProviderChain& me = *fleet[static_cast<std::size_t>(k % n)];
    const Nanos now = clock.now();
    rk::ChainDecision d = me.admit("org", req, now);
    if (!d.allowed) {
      ++out.local_refused;
      continue;
    }
    int status = 0;
    const std::vector<rk::http::Header> h = p.call(req, now, status);
    if (status == 429 && now > 60s) ++out.provider_429_late;
    if (status == 200) REQUIRE(me.settle(d, req, used, now).ok());
    if (resync) {
      const Nanos wall = now + Nanos{SimProvider::kEpoch * kS};
      const auto r = pv::read_provider_headers(status, h, wall);
      REQUIRE(r.ok());
      me.observe("org", *r, now);
    }
  }
  out.provider_ok = p.ok;
  out.provider_429 = p.refused;
  return out;
}

}  // namespace

TEST_CASE(
    "A fleet that follows the headers stops before the provider "
    "refuses",
    "[i18]") {
  // 8 instances, each sure it has the whole limit; demand: 8 calls a
  // second. The provider admits a tokens-bound 200 calls a minute.
  struct Case {
    const char* name;
    pv::ProviderLimits published;
    pv::ProviderRequest req;
    rk::Cost per_minute_calls;  // what binds: tokens / cost
    rk::Cost burst_calls;
  };
  const Case cases[] = {
      {"openai",
       pv::ProviderLimits::openai(600, 60000),
       {.prompt_tokens = 150, .max_tokens = 300},
       200,
       200},
      {"anthropic",
       pv::ProviderLimits::anthropic(600, 40000, 60000),
       {.prompt_tokens = 200, .max_tokens = 300},
       200,
       200},
      {"azure",
       pv::ProviderLimits::azure_openai(600, 90000),
       {.prompt_tokens = 150, .max_tokens = 150, .best_of = 2},
       200,
       200},
  };
  const int n = 8;
  const int seconds = 600;
  for (const Case& c : cases) {
    const FleetResult off = run_fleet(c.published, n, seconds, false, c.req);
    const FleetResult on = run_fleet(c.published, n, seconds, true, c.req);
    // The oracle: the provider admits at most its burst plus its rate for
    // the time, in calls.
    const int capacity =
        static_cast<int>(c.burst_calls + c.per_minute_calls * seconds / 60);
    WARN(c.name << " without resync: " << off.provider_ok << " ok, "
                << off.provider_429 << " 429s (" << off.provider_429_late
                << " after the first minute), " << off.local_refused
                << " refused locally");
    WARN(c.name << " with resync:    " << on.provider_ok << " ok, "
                << on.provider_429 << " 429s (" << on.provider_429_late
                << " after the first minute), " << on.local_refused
                << " refused locally; capacity " << capacity);
    INFO(c.name);
    CHECK(off.provider_ok <= capacity);
    CHECK(on.provider_ok <= capacity);
    // Without: every call the provider cannot take is a 429.
    CHECK(off.local_refused == 0);
    CHECK(off.provider_429 == n * seconds - off.provider_ok);
    CHECK(off.provider_429_late * 10 >= off.provider_429 * 8);
    // With: the 429s all but vanish once the fleet has learnt (a handful
    // in nine minutes), and the provider is still used to the full.
    CHECK(on.provider_429 * 40 <= off.provider_429);
    CHECK(on.provider_429_late <= 10);
    CHECK(on.provider_ok * 100 >= capacity * 95);
  }
}

TEST_CASE(
    "ProviderChain from several threads: never above the configured "
    "limit",
    "[i18]") {
  // Time stands still: nothing refills, so whatever the threads do (admit,
  // follow answers that lower, 429s), the calls admitted cost at most the
  // configured burst, and f stays in [floor, 1].
  auto c = pv::ProviderChain::create(pv::ProviderLimits::openai(100000, 60000));
  REQUIRE(c.ok());
  pv::ProviderChain& pc = **c;
  const Nanos now{kS};
  std::atomic<std::uint64_t> admitted{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 400; ++i) {
        rk::ChainDecision d = pc.admit("k", {.prompt_tokens = 100}, now);
        if (d.allowed) admitted.fetch_add(100);
        pv::ProviderReading r = reading(i % 7 == t ? 429 : 200);
        r[pv::Dimension::kTokens].remaining =
            static_cast<std::uint64_t>(60000 - 97 * i);
        pc.observe("k", r, now);
      }
    });
  }
  for (std::thread& th : threads) th.join();
  CHECK(admitted.load() <= 60000u);
  CHECK(admitted.load() > 0u);
  for (const auto d : {pv::Dimension::kRequests, pv::Dimension::kTokens}) {
    const std::uint32_t f = pc.factor_ppm(d, now);
    CHECK(f >= 20'000u);
    CHECK(f <= pv::ProviderChain::kOne);
  }
}
