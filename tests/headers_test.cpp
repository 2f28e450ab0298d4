// HTTP answers: headers in three dialects, the error taxonomy and bodies,
// and Prometheus text; exact formats against golden strings.
#include "ratekeeper/http/headers.hpp"

#include <chrono>
#include <string>

#include "ratekeeper/chain.hpp"
#include "ratekeeper/errors.hpp"
#include "ratekeeper/policy/fixed_window.hpp"
#include "ratekeeper/policy/sliding_window.hpp"
#include "ratekeeper/policy/token_bucket.hpp"
#include "ratekeeper/prometheus.hpp"
#include "test_util.hpp"

using namespace ratekeeper;
using http::Header;
using http::Headers;
using rk_test::kMs;
using rk_test::kSec;

namespace Catch {
template <>
struct StringMaker<Header> {
  static std::string convert(const Header& h) {
    return h.name + ": " + h.value;
  }
};
}  // namespace Catch

TEST_CASE("Go durations, as OpenAI writes its resets", "[headers]") {
  using http::go_duration;
  CHECK(go_duration(Nanos{0}) == "0s");
  CHECK(go_duration(Nanos{-5}) == "0s");
  CHECK(go_duration(Nanos{1}) == "1ms");  // rounded up, never early
  CHECK(go_duration(Nanos{12 * kMs}) == "12ms");
  CHECK(go_duration(Nanos{12 * kMs + 1}) == "13ms");
  CHECK(go_duration(Nanos{999 * kMs}) == "999ms");
  CHECK(go_duration(Nanos{kSec}) == "1s");
  CHECK(go_duration(Nanos{1500 * kMs}) == "1.5s");
  CHECK(go_duration(Nanos{1020 * kMs}) == "1.02s");
  CHECK(go_duration(Nanos{59'999 * kMs + 1}) == "1m0s");
  CHECK(go_duration(Nanos{360 * kSec}) == "6m0s");
  CHECK(go_duration(Nanos{3600 * kSec}) == "1h0m0s");
  CHECK(go_duration(Nanos{26 * 3600 * kSec + 184 * kSec + 5 * kMs}) ==
        "26h3m4.005s");
  CHECK(http::delta_seconds(Nanos{0}) == 0);
  CHECK(http::delta_seconds(Nanos{1}) == 1);
  CHECK(http::delta_seconds(Nanos{kSec}) == 1);
  CHECK(http::delta_seconds(Nanos{kSec + 1}) == 2);
}

namespace {

struct Rig {
  ManualClock clock{std::chrono::hours(1)};
  Chain<ManualClock> chain{clock};
  std::unique_ptr<Limit> rpm =
      make_limit({.name = "rpm"}, SlidingWindow::create(per_minute(3)).value())
          .value();
  std::unique_ptr<Limit> tpm =
      make_limit({.name = "tpm", .unit = Unit::kTokens},
                 TokenBucket::create(per_minute(90'000), 90'000).value())
          .value();
  std::unique_ptr<Limit> tpd =
      make_limit({.name = "tpd", .unit = Unit::kTokens},
                 FixedWindow::create(per_day(1'000'000)).value())
          .value();
  ChainDecision call(Cost tokens) {
    return chain.acquire({{rpm.get(), "u", 1},
                          {tpm.get(), "u", tokens},
                          {tpd.get(), "t", tokens}});
  }
};

}  // namespace

TEST_CASE("headers of an allowed chain", "[headers]") {
  Rig rig;
  const ChainDecision d = rig.call(1000);
  REQUIRE(d.allowed);
  const Headers want = {
      {"x-ratelimit-limit-requests", "3"},
      {"x-ratelimit-remaining-requests", "2"},
      {"x-ratelimit-reset-requests", "2m0s"},
      {"x-ratelimit-limit-tokens", "90000"},
      {"x-ratelimit-remaining-tokens", "89000"},
      {"x-ratelimit-reset-tokens", "667ms"},
      {"RateLimit-Policy",
       "\"rpm\";q=3;w=60, \"tpm\";q=90000;w=60;qu=\"ratekeeper-tokens\", "
       "\"tpd\";q=1000000;w=86400;qu=\"ratekeeper-tokens\""},
      {"RateLimit",
       "\"rpm\";r=2;t=120, \"tpm\";r=89000;t=1, \"tpd\";r=999000;t=82800"},
  };
  CHECK(http::rate_limit_headers(d) == want);
}

TEST_CASE("headers of a refused chain", "[headers]") {
  Rig rig;
  for (int i = 0; i < 3; ++i) REQUIRE(rig.call(1000).allowed);
  rig.clock.advance(std::chrono::milliseconds(1500));
  const ChainDecision d = rig.call(1000);
  REQUIRE_FALSE(d.allowed);
  // rpm: 3 in the current window; the next window's estimate admits one
  // more once 3 * (60 - e) / 60 <= 2, e = 20 s: 60 + 20 - 1.5 = 78.5 s.
  CHECK(d.retry_after == Nanos{78'500 * kMs});
  const Headers want = {
      {"Retry-After", "79"},
      {"x-ratelimit-limit-requests", "3"},
      {"x-ratelimit-remaining-requests", "0"},
      {"x-ratelimit-reset-requests", "1m58.5s"},
      {"x-ratelimit-limit-tokens", "90000"},
      {"x-ratelimit-remaining-tokens", "89250"},
      {"x-ratelimit-reset-tokens", "500ms"},
      {"RateLimit-Policy",
       "\"rpm\";q=3;w=60, \"tpm\";q=90000;w=60;qu=\"ratekeeper-tokens\", "
       "\"tpd\";q=1000000;w=86400;qu=\"ratekeeper-tokens\""},
      {"RateLimit",
       "\"rpm\";r=0;t=119, \"tpm\";r=89250;t=1, \"tpd\";r=997000;t=82799"},
  };
  CHECK(http::rate_limit_headers(d) == want);

  SECTION("dialects are optional; the token unit is yours to name") {
    const Headers only =
        http::rate_limit_headers(d, {.retry_after = true,
                                     .openai = false,
                                     .ietf = true,
                                     .token_unit = "acme-tokens"});
    REQUIRE(only.size() == 3);
    CHECK(only[0] == Header{"Retry-After", "79"});
    CHECK(only[1].value.find("qu=\"acme-tokens\"") != std::string::npos);
  }
  SECTION("the error body and status") {
    const Rejection r = Rejection::from(d);
    CHECK(r.kind == Refusal::kRateLimited);
    CHECK(r.status() == 429);
    CHECK(retryable(r.kind));
    CHECK(r.json_body() ==
          "{\"error\":{\"message\":\"rate limit \\\"rpm\\\" reached; retry "
          "in 78500 ms\",\"type\":\"rate_limit_exceeded\",\"code\":\"rate_"
          "limit_exceeded\",\"limit\":\"rpm\",\"retry_after_ms\":78500}}");
  }
}

TEST_CASE("shadow limits stay out of the headers", "[headers]") {
  Rig rig;
  rig.rpm->set_shadow(true);
  const ChainDecision d = rig.call(10);
  const Headers h =
      http::rate_limit_headers(d, {.openai = true, .ietf = false});
  REQUIRE(h.size() == 3);
  CHECK(h[0].name == "x-ratelimit-limit-tokens");
}

TEST_CASE("a call that can never pass gets no Retry-After", "[headers]") {
  Rig rig;
  const ChainDecision d = rig.call(100'000);
  REQUIRE(d.never());
  const Headers h = http::rate_limit_headers(d);
  CHECK(h.front().name != "Retry-After");
  const Rejection r = Rejection::from(d);
  CHECK(r.kind == Refusal::kTooLarge);
  CHECK(r.status() == 413);
  CHECK(r.json_body().find("\"code\":\"request_too_large\"") !=
        std::string::npos);
}

TEST_CASE("a budget in money: IETF headers in nano-USD, no OpenAI header",
          "[headers]") {
  const Decision d{true, 5'000'000'000, 4'250'000'000, Nanos{0},
                   Nanos{3'600 * kSec}};
  const Headers h = http::rate_limit_headers({.name = "team_day",
                                              .unit = Unit::kNanoUsd,
                                              .decision = d,
                                              .window = Nanos{86'400 * kSec}});
  const Headers want = {
      {"RateLimit-Policy",
       "\"team_day\";q=5000000000;w=86400;qu=\"ratekeeper-nano-usd\""},
      {"RateLimit", "\"team_day\";r=4250000000;t=3600"},
  };
  CHECK(h == want);
  CHECK(unit_name(Unit::kNanoUsd) == "nano_usd");
}

TEST_CASE("one limiter's decision as headers", "[headers]") {
  const Decision d{false, 20, 0, Nanos{2500 * kMs}, Nanos{10 * kSec}};
  const Headers h = http::rate_limit_headers({.name = "api",
                                              .unit = Unit::kRequests,
                                              .decision = d,
                                              .window = Nanos{10 * kSec}});
  const Headers want = {
      {"Retry-After", "3"},
      {"x-ratelimit-limit-requests", "20"},
      {"x-ratelimit-remaining-requests", "0"},
      {"x-ratelimit-reset-requests", "10s"},
      {"RateLimit-Policy", "\"api\";q=20;w=10"},
      {"RateLimit", "\"api\";r=0;t=10"},
  };
  CHECK(h == want);
}

TEST_CASE("the error taxonomy", "[headers]") {
  CHECK(http_status(Refusal::kRateLimited) == 429);
  CHECK(http_status(Refusal::kTooLarge) == 413);
  CHECK(http_status(Refusal::kBudgetExhausted) == 403);
  CHECK(http_status(Refusal::kBadRequest) == 400);
  CHECK(http_status(Refusal::kConfiguration) == 500);
  CHECK(retryable(Refusal::kRateLimited));
  CHECK_FALSE(retryable(Refusal::kBudgetExhausted));
  CHECK_FALSE(retryable(Refusal::kTooLarge));
  Rejection b{.kind = Refusal::kBudgetExhausted,
              .limit = "monthly",
              .resets_at = std::chrono::system_clock::time_point(
                  std::chrono::seconds(1'796'083'200)),
              .message = "monthly budget of team \"red\"\n spent"};
  CHECK(b.json_body() ==
        "{\"error\":{\"message\":\"monthly budget of team \\\"red\\\"\\u000a "
        "spent\",\"type\":\"budget_exhausted\",\"code\":\"budget_exhausted\","
        "\"limit\":\"monthly\",\"resets_at\":\"2026-12-01T00:00:00Z\"}}");
  CHECK(Rejection::rfc3339(0) == "1970-01-01T00:00:00Z");
}

TEST_CASE("Prometheus text exposition", "[headers][metrics]") {
  Rig rig;
  for (int i = 0; i < 4; ++i) static_cast<void>(rig.call(100));
  rig.tpd->metrics().record_error();
  const MetricSource sources[] = {{"free", rig.rpm.get()},
                                  {"fr\"ee", rig.tpd.get()}};
  const std::string want =
      "# HELP ratekeeper_decisions_total Calls decided by each limit, by "
      "outcome.\n"
      "# TYPE ratekeeper_decisions_total counter\n"
      "ratekeeper_decisions_total{tier=\"free\",limit=\"rpm\",outcome="
      "\"allowed\"} 3\n"
      "ratekeeper_decisions_total{tier=\"free\",limit=\"rpm\",outcome="
      "\"denied\"} 1\n"
      "ratekeeper_decisions_total{tier=\"free\",limit=\"rpm\",outcome="
      "\"shadow_denied\"} 0\n"
      "ratekeeper_decisions_total{tier=\"free\",limit=\"rpm\",outcome="
      "\"vetoed\"} 0\n"
      "ratekeeper_decisions_total{tier=\"fr\\\"ee\",limit=\"tpd\",outcome="
      "\"allowed\"} 3\n"
      "ratekeeper_decisions_total{tier=\"fr\\\"ee\",limit=\"tpd\",outcome="
      "\"denied\"} 0\n"
      "ratekeeper_decisions_total{tier=\"fr\\\"ee\",limit=\"tpd\",outcome="
      "\"shadow_denied\"} 0\n"
      "ratekeeper_decisions_total{tier=\"fr\\\"ee\",limit=\"tpd\",outcome="
      "\"vetoed\"} 1\n"
      "# HELP ratekeeper_errors_total Calls a limit could not decide (bad "
      "key, store failure).\n"
      "# TYPE ratekeeper_errors_total counter\n"
      "ratekeeper_errors_total{tier=\"free\",limit=\"rpm\"} 0\n"
      "ratekeeper_errors_total{tier=\"fr\\\"ee\",limit=\"tpd\"} 1\n"
      "# HELP ratekeeper_near_limit_total Allowed calls that left a limit at "
      "or below its near-limit threshold.\n"
      "# TYPE ratekeeper_near_limit_total counter\n"
      "ratekeeper_near_limit_total{tier=\"free\",limit=\"rpm\"} 1\n"
      "ratekeeper_near_limit_total{tier=\"fr\\\"ee\",limit=\"tpd\"} 0\n"
      "# HELP ratekeeper_limit_capacity Capacity of each limit, in its "
      "unit.\n"
      "# TYPE ratekeeper_limit_capacity gauge\n"
      "ratekeeper_limit_capacity{tier=\"free\",limit=\"rpm\",unit="
      "\"requests\"} 3\n"
      "ratekeeper_limit_capacity{tier=\"fr\\\"ee\",limit=\"tpd\",unit="
      "\"tokens\"} 1000000\n"
      "# HELP ratekeeper_limit_shadow 1 while a limit is in shadow mode "
      "(decides, never denies).\n"
      "# TYPE ratekeeper_limit_shadow gauge\n"
      "ratekeeper_limit_shadow{tier=\"free\",limit=\"rpm\"} 0\n"
      "ratekeeper_limit_shadow{tier=\"fr\\\"ee\",limit=\"tpd\"} 0\n"
      "# HELP ratekeeper_store_keys Keys each limit's store holds.\n"
      "# TYPE ratekeeper_store_keys gauge\n"
      "ratekeeper_store_keys{tier=\"free\",limit=\"rpm\"} 1\n"
      "ratekeeper_store_keys{tier=\"fr\\\"ee\",limit=\"tpd\"} 1\n";
  CHECK(prometheus_text(std::span<const MetricSource>(sources)) == want);
}
