// HTTP answers: headers in three dialects, the error taxonomy and bodies,
// and Prometheus text; exact formats against golden strings.
#include "ratekeeper/http/headers.hpp"

#include <cctype>
#include <chrono>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <variant>
#include <vector>

#include "ratekeeper/budget/accountant.hpp"
#include "ratekeeper/budget/period.hpp"
#include "ratekeeper/chain.hpp"
#include "ratekeeper/errors.hpp"
#include "ratekeeper/policy/fixed_window.hpp"
#include "ratekeeper/policy/sliding_window.hpp"
#include "ratekeeper/policy/token_bucket.hpp"
#include "ratekeeper/prometheus.hpp"
#include "sf_parser.hpp"
#include "test_prices.hpp"
#include "test_util.hpp"

using namespace ratekeeper;
using http::Header;
using http::HeaderOptions;
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
  // The wait (78.5 s) is above max_retry_wait (60 s): x-should-retry: false.
  // rpm's `t` is the time until it admits the call, the same 79 s as
  // Retry-After (the time to a full reset, 119 s, stays in OpenAI's
  // x-ratelimit-reset-requests).
  const Headers want = {
      {"Retry-After", "79"},
      {"retry-after-ms", "78500"},
      {"x-should-retry", "false"},
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
       "\"rpm\";r=0;t=79, \"tpm\";r=89250;t=1, \"tpd\";r=997000;t=82799"},
  };
  CHECK(http::rate_limit_headers(d) == want);

  SECTION("dialects are optional; the token unit is yours to name") {
    const Headers only =
        http::rate_limit_headers(d, {.retry_after = true,
                                     .openai = false,
                                     .ietf = true,
                                     .token_unit = "acme-tokens"});
    REQUIRE(only.size() == 5);
    CHECK(only[0] == Header{"Retry-After", "79"});
    CHECK(only[1] == Header{"retry-after-ms", "78500"});
    CHECK(only[2] == Header{"x-should-retry", "false"});
    CHECK(only[3].value.find("qu=\"acme-tokens\"") != std::string::npos);
    HeaderOptions patient;
    patient.max_retry_wait = std::chrono::seconds(79);
    for (const Header& h : http::rate_limit_headers(d, patient)) {
      CHECK(h.name != "x-should-retry");  // 78.5 s <= 79 s: worth a retry
    }
  }
  SECTION("the error body and status") {
    const Rejection r = Rejection::from(d);
    CHECK(r.kind == Refusal::kRateLimited);
    CHECK(r.status() == 429);
    CHECK(retryable(r.kind));
    CHECK(r.type() == "requests");
    CHECK(r.json_body() ==
          "{\"error\":{\"message\":\"rate limit \\\"rpm\\\" reached: 3 "
          "requests per 1m0s, 0 remaining, this call costs 1; retry in "
          "1m18.5s\",\"type\":\"requests\",\"param\":null,\"code\":\"rate_"
          "limit_exceeded\"}}");
    // http::refusal_response is the same answer with the headers.
    const http::Response a = http::refusal_response(d);
    CHECK(a.status == r.status());
    CHECK(a.body == r.json_body());
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
  CHECK(h.front() == Header{"x-should-retry", "false"});
  for (const Header& x : h) {
    CHECK(x.name != "Retry-After");
    CHECK(x.name != "retry-after-ms");
  }
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
      {"retry-after-ms", "2500"},
      {"x-ratelimit-limit-requests", "20"},
      {"x-ratelimit-remaining-requests", "0"},
      {"x-ratelimit-reset-requests", "10s"},
      {"RateLimit-Policy", "\"api\";q=20;w=10"},
      {"RateLimit", "\"api\";r=0;t=3"},
  };
  CHECK(h == want);
}

TEST_CASE("the error taxonomy", "[headers]") {
  CHECK(http_status(Refusal::kRateLimited) == 429);
  CHECK(http_status(Refusal::kTooLarge) == 413);
  CHECK(http_status(Refusal::kBudgetExhausted) == 429);  // as OpenAI
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
        "spent\",\"type\":\"insufficient_quota\",\"param\":null,\"code\":"
        "\"insufficient_quota\"}}");
  CHECK(Rejection{.kind = Refusal::kConfiguration}.type() == "server_error");
  CHECK(Rejection{.kind = Refusal::kBadRequest}.json_body().find(
            "\"type\":\"invalid_request_error\",\"param\":null,\"code\":"
            "\"invalid_request\"") != std::string::npos);
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
      "# HELP ratekeeper_given_back_total Receipts settled below their take "
      "(unused estimates, calls given back, chain roll-backs).\n"
      "# TYPE ratekeeper_given_back_total counter\n"
      "ratekeeper_given_back_total{tier=\"free\",limit=\"rpm\"} 0\n"
      "ratekeeper_given_back_total{tier=\"fr\\\"ee\",limit=\"tpd\"} 0\n"
      "# HELP ratekeeper_given_back_units_total Units those settles asked "
      "back, in each limit's unit.\n"
      "# TYPE ratekeeper_given_back_units_total counter\n"
      "ratekeeper_given_back_units_total{tier=\"free\",limit=\"rpm\",unit="
      "\"requests\"} 0\n"
      "ratekeeper_given_back_units_total{tier=\"fr\\\"ee\",limit=\"tpd\","
      "unit=\"tokens\"} 0\n"
      "# HELP ratekeeper_listener_errors_total Exceptions a limit's listener "
      "threw (caught and counted).\n"
      "# TYPE ratekeeper_listener_errors_total counter\n"
      "ratekeeper_listener_errors_total{tier=\"free\",limit=\"rpm\"} 0\n"
      "ratekeeper_listener_errors_total{tier=\"fr\\\"ee\",limit=\"tpd\"} 0\n"
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

// ---------------------------------------------------------------------------
// Issue 14: the headers parsed back by an independent RFC 8941 parser
// (tests/sf_parser.hpp), itself checked against the published test vectors;
// the answers to refusals (status, headers, OpenAI's error body).

namespace {

using Json = nlohmann::ordered_json;

std::string data_file(const std::string& name) {
  const std::string path = std::string(RK_TEST_DATA_DIR) + "/" + name;
  std::ifstream in(path, std::ios::binary);
  REQUIRE(in.good());
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// RFC 4648 §6 base32, padded: how the vectors write binary content.
std::string base32(std::string_view bytes) {
  static constexpr char kAlphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
  std::string out;
  std::uint64_t acc = 0;
  int bits = 0;
  for (const char c : bytes) {
    acc = (acc << 8) | static_cast<unsigned char>(c);
    bits += 8;
    while (bits >= 5) {
      bits -= 5;
      out.push_back(kAlphabet[(acc >> bits) & 31]);
    }
  }
  if (bits > 0) out.push_back(kAlphabet[(acc << (5 - bits)) & 31]);
  while (out.size() % 8 != 0) out.push_back('=');
  return out;
}

bool bare_eq(const sf::Bare& b, const Json& j) {
  if (j.is_boolean()) {
    return std::holds_alternative<bool>(b) &&
           std::get<bool>(b) == j.get<bool>();
  }
  if (j.is_number_integer()) {
    return std::holds_alternative<std::int64_t>(b) &&
           std::get<std::int64_t>(b) == j.get<std::int64_t>();
  }
  if (j.is_number_float()) {
    return std::holds_alternative<double>(b) &&
           std::get<double>(b) == j.get<double>();
  }
  if (j.is_string()) {
    return std::holds_alternative<std::string>(b) &&
           std::get<std::string>(b) == j.get<std::string>();
  }
  if (j.is_object() && j.contains("__type")) {
    const std::string type = j["__type"].get<std::string>();
    const std::string value = j["value"].get<std::string>();
    if (type == "token") {
      return std::holds_alternative<sf::Token>(b) &&
             std::get<sf::Token>(b).value == value;
    }
    if (type == "binary") {
      return std::holds_alternative<sf::Bytes>(b) &&
             base32(std::get<sf::Bytes>(b).value) == value;
    }
  }
  return false;
}

// Parameters: an object (older vector files) or an array of [name, value].
bool params_eq(const sf::Parameters& p, const Json& j) {
  if (j.size() != p.size()) return false;
  std::size_t i = 0;
  if (j.is_object()) {
    for (const auto& [k, v] : j.items()) {
      if (p[i].first != k || !bare_eq(p[i].second, v)) return false;
      ++i;
    }
    return true;
  }
  for (const Json& kv : j) {
    if (p[i].first != kv[0].get<std::string>() || !bare_eq(p[i].second, kv[1]))
      return false;
    ++i;
  }
  return true;
}

bool item_eq(const sf::Item& it, const Json& j) {
  return j.is_array() && j.size() == 2 && bare_eq(it.bare, j[0]) &&
         params_eq(it.params, j[1]);
}

bool member_eq(const sf::Member& m, const Json& j) {
  if (!j.is_array() || j.size() != 2) return false;
  if (j[0].is_array()) {  // an inner list: [[items...], params]
    if (!std::holds_alternative<sf::InnerList>(m)) return false;
    const sf::InnerList& l = std::get<sf::InnerList>(m);
    if (l.items.size() != j[0].size()) return false;
    for (std::size_t i = 0; i < l.items.size(); ++i) {
      if (!item_eq(l.items[i], j[0][i])) return false;
    }
    return params_eq(l.params, j[1]);
  }
  return std::holds_alternative<sf::Item>(m) &&
         item_eq(std::get<sf::Item>(m), j);
}

bool list_eq(const sf::List& l, const Json& j) {
  if (!j.is_array() || j.size() != l.size()) return false;
  for (std::size_t i = 0; i < l.size(); ++i) {
    if (!member_eq(l[i], j[i])) return false;
  }
  return true;
}

// The value of header `name` (case-insensitive), or nullopt.
std::optional<std::string> header(const Headers& hs, std::string_view name) {
  std::optional<std::string> out;
  for (const Header& h : hs) {
    if (h.name.size() != name.size()) continue;
    bool same = true;
    for (std::size_t i = 0; i < name.size(); ++i) {
      const auto a = static_cast<unsigned char>(h.name[i]);
      const auto b = static_cast<unsigned char>(name[i]);
      if (std::tolower(a) != std::tolower(b)) same = false;
    }
    if (same) {
      REQUIRE_FALSE(out.has_value());  // each header at most once
      out = h.value;
    }
  }
  return out;
}

std::uint64_t ceil_div_u(std::uint64_t a, std::uint64_t b) {
  return a / b + (a % b != 0 ? 1 : 0);
}

}  // namespace

TEST_CASE("the test's RFC 8941 parser passes the published test vectors",
          "[i14][sf]") {
  int checked = 0;
  int must_fail = 0;
  for (const char* file :
       {"list.json", "param-list.json", "item.json", "number.json",
        "string.json", "token.json", "boolean.json", "binary.json"}) {
    const Json cases =
        Json::parse(data_file(std::string("structured-field-tests/") + file));
    for (const Json& c : cases) {
      const std::string name = c["name"].get<std::string>();
      INFO(file << ": " << name);
      std::vector<std::string> raw;
      for (const Json& r : c["raw"]) raw.push_back(r.get<std::string>());
      const std::string field = sf::detail::combine(raw);
      const std::string type = c["header_type"].get<std::string>();
      const bool fail = c.value("must_fail", false);
      const bool can_fail = c.value("can_fail", false);
      bool parsed = false;
      bool equal = false;
      if (type == "list") {
        const std::optional<sf::List> l = sf::parse_list(field);
        parsed = l.has_value();
        equal = parsed && !fail && list_eq(*l, c["expected"]);
      } else if (type == "item") {
        const std::optional<sf::Item> i = sf::parse_item(field);
        parsed = i.has_value();
        equal = parsed && !fail && item_eq(*i, c["expected"]);
      } else {
        FAIL("unexpected header_type " << type);
      }
      if (fail) {
        CHECK_FALSE(parsed);
        ++must_fail;
      } else if (can_fail) {
        CHECK((!parsed || equal));
      } else {
        CHECK(equal);
      }
      ++checked;
    }
  }
  // The eight files hold 99 cases, 46 of them must fail (counted with
  // Python's json module).
  CHECK(checked == 99);
  CHECK(must_fail == 46);
}

namespace {

// One limit of a random chain, with what the test knows of it on its own.
struct Made {
  std::unique_ptr<Limit> limit;
  std::uint64_t window_s = 0;  // the expected `w`; 0: no `w`
};

// A count drawn log-uniformly in 1..max.
std::uint64_t log_uniform(std::mt19937_64& rng, std::uint64_t max) {
  const int bits = std::uniform_int_distribution<int>(0, 63)(rng);
  const std::uint64_t hi = bits == 0 ? 1 : (std::uint64_t{1} << bits);
  const std::uint64_t v =
      std::uniform_int_distribution<std::uint64_t>(1, std::min(hi, max))(rng);
  return v;
}

Made make_random_limit(std::mt19937_64& rng, int index) {
  const std::string name = fmt::format("l{}.{}", index, rng() % 1000);
  const Unit units[] = {Unit::kRequests, Unit::kTokens, Unit::kNanoUsd};
  const Unit unit = units[rng() % 3];
  const bool shadow = rng() % 8 == 0;
  const LimitOptions lo{.name = name, .unit = unit, .shadow = shadow};
  // Windows from 1 ms to 30 days.
  const auto period = Nanos{static_cast<std::int64_t>(
      log_uniform(rng, 30ULL * 86'400 * 1'000'000'000) + 1'000'000)};
  for (;;) {
    switch (rng() % 4) {
      case 0: {
        auto p = SlidingWindow::create(
            {log_uniform(rng, SlidingWindow::kMaxLimit), period});
        REQUIRE(p.ok());
        return {make_limit(lo, *p).value(),
                ceil_div_u(static_cast<std::uint64_t>(period.count()), kSec)};
      }
      case 1: {
        auto p = FixedWindow::create(
            {log_uniform(rng, FixedWindow::kMaxLimit), period});
        REQUIRE(p.ok());
        return {make_limit(lo, *p).value(),
                ceil_div_u(static_cast<std::uint64_t>(period.count()), kSec)};
      }
      case 2: {
        const std::uint64_t count = log_uniform(rng, TokenBucket::kMaxCount);
        const std::uint64_t burst = log_uniform(rng, TokenBucket::kMaxCount);
        auto p = TokenBucket::create({count, period}, burst);
        if (!p.ok()) continue;  // refilling the burst takes > 292 years
        // w: the time to refill the burst, burst * period / count ns, in
        // whole seconds rounded up.
        using U128 = ratekeeper::detail::u128;
        const U128 num = static_cast<U128>(burst) *
                         static_cast<std::uint64_t>(period.count());
        const U128 den = static_cast<U128>(count) * kSec;
        const auto w =
            static_cast<std::uint64_t>(num / den + (num % den != 0 ? 1 : 0));
        return {make_limit(lo, *p).value(), w};
      }
      default: {
        // A budget: a calendar day or month, or a rolling period; no `w`.
        const Period per_kind =
            rng() % 3 == 0   ? Period::calendar(PeriodKind::kDay).value()
            : rng() % 2 == 0 ? Period::calendar(PeriodKind::kMonth).value()
                             : Period::rolling(period).value();
        auto p = PeriodBudget::create(log_uniform(rng, PeriodBudget::kMaxLimit),
                                      per_kind);
        REQUIRE(p.ok());
        return {make_limit(lo, *p).value(), 0};
      }
    }
  }
}

std::uint64_t as_uint(const sf::Bare* b) {
  REQUIRE(b != nullptr);
  REQUIRE(std::holds_alternative<std::int64_t>(*b));
  REQUIRE(std::get<std::int64_t>(*b) >= 0);
  return static_cast<std::uint64_t>(std::get<std::int64_t>(*b));
}

std::string as_string(const sf::Bare* b) {
  REQUIRE(b != nullptr);
  REQUIRE(std::holds_alternative<std::string>(*b));
  return std::get<std::string>(*b);
}

// What an sf-string can carry of `s`: printable ASCII, else '?'.
std::string sf_printable(std::string_view s) {
  std::string out;
  for (const char c : s) {
    const auto u = static_cast<unsigned char>(c);
    out.push_back(u < 0x20 || u > 0x7E ? '?' : c);
  }
  return out;
}

}  // namespace

TEST_CASE("every header parses as RFC 8941 and says what the decisions say",
          "[i14][headers][sf]") {
  const std::uint64_t seed = rk_test::seed_or(14);
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  const std::string units[] = {"ratekeeper-tokens", "acme-tokens",
                               "we\"ird\\unit", "caf\xc3\xa9"};
  int decisions = 0;
  int refusals = 0;
  int too_large = 0;
  int futile = 0;
  int budgets_seen = 0;
  for (int chain_no = 0; chain_no < 300; ++chain_no) {
    ManualClock clock(Nanos{1'796'083'200LL * kSec});  // 2026-12-01 UTC
    Chain<ManualClock> chain(clock);
    std::vector<Made> made;
    const int n = 1 + static_cast<int>(rng() % 4);
    for (int i = 0; i < n; ++i) made.push_back(make_random_limit(rng, i));
    HeaderOptions o;
    o.token_unit = units[rng() % 4];
    o.money_unit = units[rng() % 4];
    o.max_retry_wait = Nanos{
        static_cast<std::int64_t>(log_uniform(rng, 3'600ULL * 1'000'000'000))};
    o.budget_status = rng() % 2 == 0
                          ? http::BudgetStatus::k403Forbidden
                          : http::BudgetStatus::k429InsufficientQuota;
    for (int call = 0; call < 20; ++call) {
      clock.advance(Nanos{static_cast<std::int64_t>(
          log_uniform(rng, 86'400ULL * 1'000'000'000))});
      std::vector<ChainItem> items;
      for (const Made& m : made) {
        const std::uint64_t cap = m.limit->limit();
        // Mostly within the capacity, sometimes past it (never admitted).
        const std::uint64_t cost =
            rng() % 10 == 0 ? cap + 1 + rng() % 5 : log_uniform(rng, cap);
        items.push_back({m.limit.get(), "k", cost});
      }
      const ChainDecision d =
          chain.acquire(std::span<const ChainItem>(items.data(), items.size()));
      const Headers hs = http::rate_limit_headers(d, o);
      ++decisions;
      INFO("chain " << chain_no << " call " << call);

      // The limits the headers describe: the enforced ones, in order.
      std::vector<std::size_t> shown;
      for (std::size_t i = 0; i < d.results.size(); ++i) {
        const LimitResult& r = d.results[i];
        if (!r.limit->shadow() && !r.shadow_denied) shown.push_back(i);
      }
      // The wait: the longest of the refusing enforced limits.
      bool refused = false;
      bool never = false;
      Nanos wait{0};
      for (const std::size_t i : shown) {
        const Decision& dec = d.results[i].decision;
        if (dec.allowed) continue;
        refused = true;
        if (dec.retry_after == kNever) never = true;
        wait = std::max(wait, dec.retry_after);
      }
      // Limits after the refusing one are only peeked: their refusals are
      // reported too, and the chain's wait is the longest of all.
      REQUIRE(refused == !d.allowed);

      const std::optional<std::string> policy = header(hs, "RateLimit-Policy");
      const std::optional<std::string> state = header(hs, "RateLimit");
      if (shown.empty()) {
        CHECK_FALSE(policy.has_value());
        CHECK_FALSE(state.has_value());
      } else {
        REQUIRE(policy.has_value());
        REQUIRE(state.has_value());
        const std::optional<sf::List> pl = sf::parse_list(*policy);
        const std::optional<sf::List> sl = sf::parse_list(*state);
        INFO("RateLimit-Policy: " << *policy);
        INFO("RateLimit: " << *state);
        REQUIRE(pl.has_value());
        REQUIRE(sl.has_value());
        REQUIRE(pl->size() == shown.size());
        REQUIRE(sl->size() == shown.size());
        for (std::size_t k = 0; k < shown.size(); ++k) {
          const LimitResult& r = d.results[shown[k]];
          const Made& m = made[shown[k]];
          REQUIRE(std::holds_alternative<sf::Item>((*pl)[k]));
          REQUIRE(std::holds_alternative<sf::Item>((*sl)[k]));
          const sf::Item& p = std::get<sf::Item>((*pl)[k]);
          const sf::Item& s = std::get<sf::Item>((*sl)[k]);
          CHECK(std::get<std::string>(p.bare) == r.limit->name());
          CHECK(std::get<std::string>(s.bare) == r.limit->name());
          // q: the capacity, as much of it as an sf-integer holds.
          CHECK(as_uint(p.param("q")) ==
                std::min<std::uint64_t>(r.decision.limit, 999'999'999'999'999));
          // w: present and positive exactly when the limit has a window.
          if (m.window_s == 0) {
            CHECK(p.param("w") == nullptr);
            ++budgets_seen;
          } else {
            CHECK(as_uint(p.param("w")) == m.window_s);
            CHECK(as_uint(p.param("w")) > 0);
          }
          switch (r.limit->unit()) {
            case Unit::kRequests:
              CHECK(p.param("qu") == nullptr);
              break;
            case Unit::kTokens:
              CHECK(as_string(p.param("qu")) == sf_printable(o.token_unit));
              break;
            case Unit::kNanoUsd:
              CHECK(as_string(p.param("qu")) == sf_printable(o.money_unit));
              break;
          }
          CHECK(p.param("pk") == nullptr);
          CHECK(as_uint(s.param("r")) ==
                std::min<std::uint64_t>(r.decision.remaining,
                                        999'999'999'999'999));
          // t: a refusing limit's wait until it admits the call; else the
          // wait until it is full. Seconds, rounded up.
          const Nanos t_ns =
              !r.decision.allowed && r.decision.retry_after != kNever
                  ? r.decision.retry_after
                  : r.decision.reset_after;
          const std::uint64_t t_s =
              t_ns <= Nanos{0}
                  ? 0
                  : ceil_div_u(static_cast<std::uint64_t>(t_ns.count()), kSec);
          CHECK(as_uint(s.param("t")) == t_s);
          if (!r.decision.allowed && !never) {
            // Retry-After never points earlier than a refusing limit's t.
            CHECK(t_s <=
                  ceil_div_u(static_cast<std::uint64_t>(wait.count()), kSec));
          }
        }
      }

      const std::optional<std::string> ra = header(hs, "Retry-After");
      const std::optional<std::string> ra_ms = header(hs, "retry-after-ms");
      const std::optional<std::string> xsr = header(hs, "x-should-retry");
      if (!refused || never) {
        CHECK_FALSE(ra.has_value());
        CHECK_FALSE(ra_ms.has_value());
      } else {
        ++refusals;
        REQUIRE(ra.has_value());
        REQUIRE(ra_ms.has_value());
        const auto w = static_cast<std::uint64_t>(wait.count());
        CHECK(std::stoull(*ra) == ceil_div_u(w, kSec));
        CHECK(std::stoull(*ra_ms) == ceil_div_u(w, kMs));
        // Consistent: Retry-After is retry-after-ms in seconds, rounded up.
        CHECK(std::stoull(*ra) == ceil_div_u(std::stoull(*ra_ms), 1000));
        // Both parse as sf-integers too.
        CHECK(sf::parse_item(*ra).has_value());
        CHECK(sf::parse_item(*ra_ms).has_value());
      }
      const bool want_false = refused && (never || wait > o.max_retry_wait);
      if (want_false) {
        ++futile;
        REQUIRE(xsr.has_value());
        CHECK(*xsr == "false");
      } else {
        CHECK_FALSE(xsr.has_value());
      }

      if (refused) {
        // The whole answer: the same headers after Content-Type, 413 when
        // no wait admits the call, else 429; OpenAI's error body.
        const http::Response a = http::refusal_response(d, o);
        CHECK(a.status == (never ? 413 : 429));
        REQUIRE(!a.headers.empty());
        CHECK(a.headers.front() == Header{"Content-Type", "application/json"});
        CHECK(Headers(a.headers.begin() + 1, a.headers.end()) == hs);
        const Json body = Json::parse(a.body);
        REQUIRE(body.size() == 1);
        const Json& e = body.at("error");
        CHECK(e.size() == 4);
        CHECK(e.at("message").is_string());
        CHECK(e.at("param").is_null());
        CHECK(e.at("code") ==
              (never ? "request_too_large" : "rate_limit_exceeded"));
        if (never) {
          ++too_large;
          CHECK(e.at("type") == "invalid_request_error");
        } else {
          const Unit u = d.binding_result()->limit->unit();
          CHECK(e.at("type") == (u == Unit::kTokens    ? "tokens"
                                 : u == Unit::kNanoUsd ? "cost"
                                                       : "requests"));
        }
        // The same refusal, as a budget's: never worth a retry.
        const bool forbid =
            o.budget_status == http::BudgetStatus::k403Forbidden;
        const http::Response b = http::budget_exhausted_response(d, o);
        CHECK(b.status == (never ? 413 : forbid ? 403 : 429));
        CHECK(b.headers.front() == Header{"Content-Type", "application/json"});
        CHECK(header(b.headers, "x-should-retry") == "false");
        CHECK(header(b.headers, "Retry-After") == ra);
        CHECK(header(b.headers, "RateLimit") == state);
        const Json be = Json::parse(b.body).at("error");
        CHECK(be.size() == 4);
        CHECK(be.at("code") == (never    ? "request_too_large"
                                : forbid ? "budget_exhausted"
                                         : "insufficient_quota"));
      }
    }
  }
  // The draw covers each case many times.
  CHECK(decisions == 6000);
  CHECK(refusals > 300);
  CHECK(too_large > 100);
  CHECK(futile > 300);
  CHECK(budgets_seen > 500);
}

TEST_CASE("a refusal's t is the time until more quota, not a full reset",
          "[i14][headers]") {
  // A sliding window of 3 per minute: 3 calls at 0 s, then a call at 72 s.
  // It is refused until the previous window's weight drops enough, far
  // before the limit is full again.
  ManualClock clock(std::chrono::hours(1));
  Chain<ManualClock> chain(clock);
  auto rpm =
      make_limit({.name = "rpm"}, SlidingWindow::create(per_minute(3)).value())
          .value();
  for (int i = 0; i < 3; ++i) REQUIRE(chain.acquire({{rpm.get(), "u", 1}}));
  clock.advance(std::chrono::seconds(72));
  const ChainDecision d = chain.acquire({{rpm.get(), "u", 1}});
  REQUIRE_FALSE(d.allowed);
  // Window [60 s, 120 s) is 12 s in; the previous holds 3: the estimate
  // 3 * (60 - e) / 60 + 1 <= 3 first holds at e = 20 s, 8 s from now; the
  // limit is full when the previous window stops counting, at 120 s, 48 s
  // from now (what `t` said before).
  CHECK(d.results[0].decision.reset_after == std::chrono::seconds(48));
  const Headers h = http::rate_limit_headers(d, {.openai = false});
  const Headers want = {{"Retry-After", "8"},
                        {"retry-after-ms", "8000"},
                        {"RateLimit-Policy", "\"rpm\";q=3;w=60"},
                        {"RateLimit", "\"rpm\";r=0;t=8"}};
  CHECK(h == want);
}

TEST_CASE("a budget in a chain has no w, never w=0", "[i14][headers]") {
  ManualClock clock(Nanos{1'796'083'200LL * kSec});  // 2026-12-01 UTC
  Chain<ManualClock> chain(clock);
  auto month = make_limit({.name = "usd_month", .unit = Unit::kNanoUsd},
                          PeriodBudget::create(
                              5'000'000'000,
                              Period::calendar(PeriodKind::kMonth).value())
                              .value())
                   .value();
  auto day =
      make_limit({.name = "tok_day", .unit = Unit::kTokens},
                 PeriodBudget::create(
                     1'000, Period::rolling(std::chrono::hours(24)).value())
                     .value())
          .value();
  const ChainDecision d =
      chain.acquire({{month.get(), "t", 750'000'000}, {day.get(), "t", 10}});
  REQUIRE(d.allowed);
  const Headers h = http::rate_limit_headers(d, {.openai = false});
  const Headers want = {
      {"RateLimit-Policy",
       "\"usd_month\";q=5000000000;qu=\"ratekeeper-nano-usd\", "
       "\"tok_day\";q=1000;qu=\"ratekeeper-tokens\""},
      // December has 31 days: 2,678,400 s to its end; the rolling day
      // started at the epoch's midnight, 86,400 s ago.
      {"RateLimit",
       "\"usd_month\";r=4250000000;t=2678400, \"tok_day\";r=990;t=86400"},
  };
  CHECK(h == want);
  // Refused (as a plain chain, not through the accountant): 429 with the
  // wait to December's end, too long to be worth an SDK's retry.
  const ChainDecision no =
      chain.acquire({{month.get(), "t", 4'500'000'000}, {day.get(), "t", 10}});
  REQUIRE_FALSE(no.allowed);
  const http::Response a = http::refusal_response(no);
  CHECK(a.status == 429);
  CHECK(header(a.headers, "Retry-After") == "2678400");
  CHECK(header(a.headers, "x-should-retry") == "false");
  CHECK(Json::parse(a.body)["error"]["message"] ==
        "rate limit \"usd_month\" reached: 5000000000 nano-USD, 4250000000 "
        "remaining, this call costs 4500000000; retry in 744h0m0s");
}

TEST_CASE("q and r saturate at the largest sf-integer", "[i14][headers][sf]") {
  const Decision d{true, std::uint64_t{1} << 62, (std::uint64_t{1} << 62) - 5,
                   Nanos{0}, Nanos{kSec}};
  const Headers h = http::rate_limit_headers({.name = "big",
                                              .unit = Unit::kNanoUsd,
                                              .decision = d,
                                              .window = Nanos{0}},
                                             {.openai = false});
  REQUIRE(h.size() == 2);
  CHECK(h[0].value == "\"big\";q=999999999999999;qu=\"ratekeeper-nano-usd\"");
  CHECK(h[1].value == "\"big\";r=999999999999999;t=1");
  const std::optional<sf::List> l = sf::parse_list(h[0].value);
  CHECK(l.has_value());
  // 4611686018427387904 (2^62) would not parse: 19 digits.
  CHECK_FALSE(sf::parse_list("\"big\";q=4611686018427387904").has_value());
}

TEST_CASE("an exhausted budget answers as OpenAI answers exhausted quota",
          "[i14][headers][budget]") {
  const Nanos t0{1'796'083'200LL * kSec};          // 2026-12-01 00:00 UTC
  ManualClock clock(t0 + std::chrono::hours(30));  // Dec 2, 06:00
  Accountant<ManualClock> acct(rk_test::flat_prices(), clock);
  REQUIRE(acct.add_budget({"team_month", Field::kTeam, BudgetUnit::kNanoUsd,
                           1'000'000,  // $0.001: 1,000 tokens
                           Period::calendar(PeriodKind::kMonth).value()})
              .ok());
  auto rpm =
      make_limit({.name = "rpm"}, FixedWindow::create(per_minute(100)).value())
          .value();
  const Subject who{.user = "u", .team = "red"};
  const ChainItem limits[] = {{rpm.get(), "u", 1}};
  auto first =
      acct.reserve(who, "m", {.prompt_tokens = 400, .max_output_tokens = 400},
                   "req-1", limits);
  REQUIRE(first.ok());
  REQUIRE(first->granted());
  auto second =
      acct.reserve(who, "m", {.prompt_tokens = 200, .max_output_tokens = 200},
                   "req-2", limits);
  REQUIRE(second.ok());
  REQUIRE_FALSE(second->granted());
  REQUIRE(second->refused_by_budget());

  // The end of December is 29 days 18 hours away: 2,570,400 s.
  const std::uint64_t wait_s = 29ULL * 86'400 + 18 * 3'600;
  SECTION("429 insufficient_quota by default, from the Reservation") {
    const http::Response a = http::refusal_response(*second);
    CHECK(a.status == 429);
    const Headers want = {
        {"Content-Type", "application/json"},
        {"Retry-After", std::to_string(wait_s)},
        {"retry-after-ms", std::to_string(wait_s * 1000)},
        {"x-should-retry", "false"},
        {"x-ratelimit-limit-requests", "100"},
        {"x-ratelimit-remaining-requests", "99"},
        {"x-ratelimit-reset-requests", "1m0s"},
        {"RateLimit-Policy",
         "\"rpm\";q=100;w=60, "
         "\"team_month\";q=1000000;qu=\"ratekeeper-nano-usd\""},
        {"RateLimit", fmt::format("\"rpm\";r=99;t=60, "
                                  "\"team_month\";r=200000;t={}",
                                  wait_s)},
    };
    CHECK(a.headers == want);
    CHECK(a.body ==
          "{\"error\":{\"message\":\"budget \\\"team_month\\\" is spent for "
          "this period (800000 nano-USD of 1000000); it resets at "
          "2027-01-01T00:00:00Z\",\"type\":\"insufficient_quota\",\"param\":"
          "null,\"code\":\"insufficient_quota\"}}");
    CHECK(Json::parse(a.body)["error"]["code"] == "insufficient_quota");
    CHECK(http::budget_exhausted_response(second->decision()).body == a.body);
  }
  SECTION("403 as an option") {
    const http::Response a = http::refusal_response(
        *second, {.budget_status = http::BudgetStatus::k403Forbidden});
    CHECK(a.status == 403);
    const Json e = Json::parse(a.body)["error"];
    CHECK(e["type"] == "budget_exhausted");
    CHECK(e["code"] == "budget_exhausted");
    CHECK(header(a.headers, "x-should-retry") == "false");
  }
  SECTION("a call larger than the whole budget is 413") {
    auto huge =
        acct.reserve(who, "m", {.prompt_tokens = 600, .max_output_tokens = 600},
                     "req-3", limits);
    REQUIRE(huge.ok());
    REQUIRE(huge->refused_by_budget());
    const http::Response a = http::refusal_response(*huge);
    CHECK(a.status == 413);
    CHECK(header(a.headers, "x-should-retry") == "false");
    CHECK_FALSE(header(a.headers, "Retry-After").has_value());
    const Json e = Json::parse(a.body)["error"];
    CHECK(e["code"] == "request_too_large");
    CHECK(e["message"] ==
          "this call costs 1200000 nano-USD against limit \"team_month\", "
          "whose capacity is 1000000: no wait admits it; send a smaller call "
          "(lower max_tokens)");
  }
  SECTION("a rate limit's refusal through the same call is a 429 to retry") {
    auto rpm1 =
        make_limit({.name = "rpm1"}, FixedWindow::create(per_minute(1)).value())
            .value();
    const ChainItem tight[] = {{rpm1.get(), "u", 1}};
    auto ok = acct.reserve(who, "m", {.prompt_tokens = 1}, "req-4", tight);
    REQUIRE(ok.ok());
    REQUIRE(ok->granted());
    auto limited = acct.reserve(who, "m", {.prompt_tokens = 1}, "req-5", tight);
    REQUIRE(limited.ok());
    REQUIRE_FALSE(limited->refused_by_budget());
    const http::Response a = http::refusal_response(*limited);
    CHECK(a.status == 429);
    CHECK_FALSE(header(a.headers, "x-should-retry").has_value());
    CHECK(header(a.headers, "Retry-After") == "60");
    CHECK(header(a.headers, "retry-after-ms") == "60000");
    const Json e = Json::parse(a.body)["error"];
    CHECK(e["type"] == "requests");
    CHECK(e["code"] == "rate_limit_exceeded");
    CHECK(e["message"] ==
          "rate limit \"rpm1\" reached: 1 requests per 1m0s, 0 remaining, "
          "this call costs 1; retry in 1m0s");
  }
}

TEST_CASE("error bodies are valid JSON whatever the names hold",
          "[i14][headers]") {
  // A LimitView's name comes from the caller: quotes, backslashes, control
  // characters and broken UTF-8 must not break the body (nor the sf-string).
  const std::string name = "a\"b\\c\n\x01\xc3\xa9\xff\xe2\x82";
  std::string body = ratekeeper::detail::error_body(name, "t", "c");
  const Json j = Json::parse(body);  // throws on invalid JSON
  CHECK(j["error"]["message"] ==
        "a\"b\\c\n\x01\xc3\xa9\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd");
  const Decision d{false, 5, 0, Nanos{kSec}, Nanos{kSec}};
  const Headers h = http::rate_limit_headers(
      {.name = name, .decision = d, .window = Nanos{kSec}}, {.openai = false});
  const std::optional<std::string> policy = header(h, "RateLimit-Policy");
  REQUIRE(policy.has_value());
  const std::optional<sf::List> l = sf::parse_list(*policy);
  REQUIRE(l.has_value());
  CHECK(std::get<std::string>(std::get<sf::Item>((*l)[0]).bare) ==
        "a\"b\\c???????");
}
