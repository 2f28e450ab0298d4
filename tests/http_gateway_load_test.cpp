// examples/http_gateway under load: 8 keep-alive clients on loopback, a
// fake upstream that answers at once, and every answer checked against
// what the limits allow, computed here from the config the test writes.
#include <httplib.h>

#include <chrono>
#include <cstdlib>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "http_gateway_harness.hpp"
#include "test_util.hpp"

namespace {

// kUsers users in teams of 8, each allowed kBurst calls: a token bucket of
// kBurst requests that refills kBurst per 10^9 s (less than one call over
// the test), so what each user may do is exactly kBurst calls, whenever
// they come. Tokens and money are far from binding.
constexpr int kUsers = 64;
constexpr int kBurst = 40;
constexpr int kClients = 8;
constexpr int kPerClient = 480;  // 3,840 calls: 60 per user

std::string load_config() {
  const std::string accounts = rk_gw::accounts_json(kUsers, "load");
  return R"({"tiers": {"load": [
      {"name": "calls", "scope": "user", "policy": "token_bucket",
       "limit": )" +
         std::to_string(kBurst) + R"(, "per_seconds": 1000000000},
      {"name": "tpm", "unit": "tokens", "scope": "user",
       "policy": "token_bucket", "limit": 100000000, "per_seconds": 60}]},
    "accounts": {)" +
         accounts + R"(}, "team_budget_usd": "1000"})";
}

}  // namespace

TEST_CASE(
    "under load from 8 keep-alive clients every answer is right: the "
    "allowed calls and no more, each with its headers",
    "[i14][gateway][load]") {
  rk_gw::TempDir dir;
  rk_gw::FakeUpstream up;
  rk_gw::GatewayProcess gw(
      RK_HTTP_GATEWAY, {"--upstream", up.address(), "--ip-rpm", "1000000000",
                        "--config", dir.write("config.json", load_config())});
  std::vector<std::string> keys;
  for (int u = 0; u < kUsers; ++u) keys.push_back("sk-u" + std::to_string(u));
  const std::string body = rk_gw::body_with_estimate(72, "gpt-4o-mini", false);
  double wall = 0;
  const std::vector<rk_gw::Answer> answers =
      rk_gw::run_load(gw, kClients, kPerClient, keys, body, &wall);
  REQUIRE(answers.size() == static_cast<std::size_t>(kClients * kPerClient));
  std::map<std::string, int> allowed;
  std::map<std::string, std::multiset<int>> remaining;
  int refused = 0;
  for (const rk_gw::Answer& a : answers) {
    CAPTURE(a.key, a.status, a.body);
    REQUIRE(a.status != 0);
    const auto h = [&](const char* name) {
      return rk_gw::header_of(a.headers, name);
    };
    if (a.status == 200) {
      ++allowed[a.key];
      CHECK(h("x-ratelimit-limit-requests") == std::to_string(kBurst));
      remaining[a.key].insert(
          std::atoi(h("x-ratelimit-remaining-requests").c_str()));
      CHECK(h("x-ratelimit-reset-requests") != "<absent>");
      CHECK(h("x-ratelimit-limit-tokens") == "100000000");
      CHECK(h("x-ratelimit-remaining-tokens") != "<absent>");
      CHECK(
          h("RateLimit-Policy").find("\"calls\";q=" + std::to_string(kBurst)) !=
          std::string::npos);
      CHECK(h("RateLimit").find("\"calls\";r=") != std::string::npos);
      CHECK(h("Retry-After") == "<absent>");
      CHECK(h("x-request-id") == "req_fake");
      CHECK(a.body.find("\"usage\"") != std::string::npos);
    } else {
      REQUIRE(a.status == 429);
      ++refused;
      CHECK(std::atoll(h("Retry-After").c_str()) >= 1);
      CHECK(h("x-ratelimit-limit-requests") == std::to_string(kBurst));
      CHECK(h("x-ratelimit-remaining-requests") == "0");
      CHECK(h("RateLimit").find("\"calls\";r=0") != std::string::npos);
      CHECK(h("x-request-id") == "<absent>");  // never reached the upstream
      const auto err = nlohmann::json::parse(a.body);
      CHECK(err["error"]["code"] == "rate_limit_exceeded");
      CHECK(err["error"]["type"] == "requests");
      CHECK(err["error"]["param"].is_null());
      CHECK(err["error"]["message"].get<std::string>().find("\"calls\"") !=
            std::string::npos);
    }
  }
  // Each user got exactly kBurst calls, whose remaining counts were
  // kBurst-1 down to 0, each once: no call was admitted twice or lost.
  std::multiset<int> expected;
  for (int i = 0; i < kBurst; ++i) expected.insert(i);
  CHECK(allowed.size() == static_cast<std::size_t>(kUsers));
  for (const std::string& k : keys) {
    CAPTURE(k);
    CHECK(allowed[k] == kBurst);
    CHECK(remaining[k] == expected);
  }
  CHECK(refused == kClients * kPerClient - kUsers * kBurst);
  // The upstream saw the allowed calls and no others, over few
  // connections (keep-alive: at most one per gateway worker).
  CHECK(up.bodies().size() == static_cast<std::size_t>(kUsers * kBurst));
  CHECK(up.connections() <= 32);
  WARN("load: " << answers.size() << " calls in " << wall << " s");
}
