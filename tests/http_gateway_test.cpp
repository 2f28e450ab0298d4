// examples/http_gateway over real HTTP: the test starts the gateway on a free
// loopback port and drives it with an HTTP client.
#include <fcntl.h>
#include <httplib.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "test_util.hpp"

extern char** environ;

namespace {

// The gateway as a child process, stopped (SIGTERM, then waited for) when
// this goes out of scope.
class Gateway {
 public:
  explicit Gateway(std::vector<std::string> args) {
    args.insert(args.begin(), RK_HTTP_GATEWAY);
    args.insert(args.begin() + 1, {"--port", "0"});
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    int out[2];
    REQUIRE(pipe(out) == 0);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, out[1], STDOUT_FILENO);
    posix_spawn_file_actions_addclose(&fa, out[0]);
    REQUIRE(posix_spawn(&pid_, argv[0], &fa, nullptr, argv.data(), environ) ==
            0);
    posix_spawn_file_actions_destroy(&fa);
    close(out[1]);
    // "listening on 127.0.0.1:PORT\n", within 30 s.
    std::string line;
    const auto deadline =
        std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (line.find('\n') == std::string::npos &&
           std::chrono::steady_clock::now() < deadline) {
      pollfd p{out[0], POLLIN, 0};
      if (poll(&p, 1, 100) <= 0) continue;
      char buf[256];
      const ssize_t n = read(out[0], buf, sizeof(buf));
      if (n <= 0) break;
      line.append(buf, static_cast<std::size_t>(n));
    }
    close(out[0]);
    const std::size_t colon = line.rfind(':');
    INFO("gateway said: " << line);
    REQUIRE(line.rfind("listening on 127.0.0.1:", 0) == 0);
    port_ = std::atoi(line.c_str() + colon + 1);
    REQUIRE(port_ > 0);
  }
  ~Gateway() {
    kill(pid_, SIGTERM);
    int status = 0;
    waitpid(pid_, &status, 0);
  }
  Gateway(const Gateway&) = delete;
  Gateway& operator=(const Gateway&) = delete;

  httplib::Client client() const {
    httplib::Client c("127.0.0.1", port_);
    c.set_read_timeout(std::chrono::seconds(30));
    return c;
  }

 private:
  pid_t pid_ = -1;
  int port_ = 0;
};

const std::string kBody = R"({"model":"gpt-4o-mini","max_tokens":100,)"
                          R"("messages":[{"role":"user","content":"hello"}]})";

httplib::Result chat(httplib::Client& c, const std::string& key,
                     const std::string& xff = "") {
  httplib::Headers h = {{"Authorization", "Bearer " + key}};
  if (!xff.empty()) h.emplace("X-Forwarded-For", xff);
  return c.Post("/v1/chat/completions", h, kBody, "application/json");
}

std::string header(const httplib::Result& r, const char* name) {
  return r->has_header(name) ? r->get_header_value(name) : "<absent>";
}

}  // namespace

TEST_CASE("allowed calls pass; the N+1st gets 429 with the headers",
          "[http_gateway]") {
  Gateway gw({"--ip-rpm", "1000"});
  httplib::Client c = gw.client();
  // The free tier: 5 requests per minute per user.
  for (int i = 0; i < 5; ++i) {
    const httplib::Result r = chat(c, "sk-free-alice");
    REQUIRE(r);
    CAPTURE(i, r->body);
    REQUIRE(r->status == 200);
    CHECK(header(r, "x-ratelimit-limit-requests") == "5");
    CHECK(header(r, "x-ratelimit-remaining-requests") == std::to_string(4 - i));
    CHECK(header(r, "x-ratelimit-limit-tokens") == "20000");
    CHECK_FALSE(r->has_header("Retry-After"));
    const auto body = nlohmann::json::parse(r->body);
    CHECK(body["usage"]["completion_tokens"] == 16);
  }
  const httplib::Result r = chat(c, "sk-free-alice");
  REQUIRE(r);
  CAPTURE(r->body);
  CHECK(r->status == 429);
  const int retry = std::atoi(header(r, "Retry-After").c_str());
  CHECK(retry >= 1);
  CHECK(retry <= 120);
  CHECK(header(r, "x-ratelimit-limit-requests") == "5");
  CHECK(header(r, "x-ratelimit-remaining-requests") == "0");
  const std::string policy = header(r, "RateLimit-Policy");
  CHECK(policy.find("\"rpm\";q=5;w=60") != std::string::npos);
  CHECK(policy.find("\"tpm\";q=20000;w=60;qu=\"ratekeeper-tokens\"") !=
        std::string::npos);
  CHECK(policy.find("\"ip_rpm\";q=1000;w=60") != std::string::npos);
  CHECK(header(r, "RateLimit").find("\"rpm\";r=0;t=") != std::string::npos);
  const auto err = nlohmann::json::parse(r->body);
  CHECK(err["error"]["code"] == "rate_limit_exceeded");
  CHECK(err["error"]["limit"] == "rpm");
  // Another user of the same tier is not affected.
  const httplib::Result bob = chat(c, "sk-free-bob");
  REQUIRE(bob);
  CHECK(bob->status == 200);
  // An unknown key: 401.
  const httplib::Result nobody = chat(c, "sk-nope");
  REQUIRE(nobody);
  CHECK(nobody->status == 401);
  // Metrics count all of it.
  const httplib::Result m = c.Get("/metrics");
  REQUIRE(m);
  CHECK(m->body.find("ratekeeper_decisions_total{tier=\"free\",limit=\"rpm\","
                     "outcome=\"allowed\"} 6") != std::string::npos);
  CHECK(m->body.find("ratekeeper_decisions_total{tier=\"free\",limit=\"rpm\","
                     "outcome=\"denied\"} 1") != std::string::npos);
}

TEST_CASE(
    "T10a over HTTP: a spoofed X-Forwarded-For from an untrusted peer "
    "does not escape its bucket",
    "[http_gateway][T10a]") {
  Gateway gw({"--ip-rpm", "3"});
  httplib::Client c = gw.client();
  int ok = 0, limited = 0;
  for (int i = 0; i < 40; ++i) {
    // A fresh forged address on every call.
    const std::string fake =
        "198.51.100." + std::to_string(i) + ", 10.0.0." + std::to_string(i);
    const httplib::Result r = chat(c, "sk-pro-carol", fake);
    REQUIRE(r);
    if (r->status == 200) {
      ++ok;
    } else {
      CAPTURE(i, r->body);
      REQUIRE(r->status == 429);
      CHECK(header(r, "RateLimit").find("\"ip_rpm\";r=0") != std::string::npos);
      ++limited;
    }
  }
  CHECK(ok == 3);
  CHECK(limited == 37);
}

TEST_CASE("behind a trusted proxy, each client has its own bucket",
          "[http_gateway][T10a]") {
  Gateway gw({"--ip-rpm", "3", "--trusted-proxy", "127.0.0.1/32"});
  httplib::Client c = gw.client();
  // Ten clients, one call each: all pass.
  for (int i = 0; i < 10; ++i) {
    const httplib::Result r =
        chat(c, "sk-pro-carol", "198.51.100." + std::to_string(i));
    REQUIRE(r);
    CHECK(r->status == 200);
  }
  // One client prepending forged hops is still itself: 2 more pass, then
  // its bucket is full.
  int ok = 0;
  for (int i = 0; i < 6; ++i) {
    const httplib::Result r = chat(
        c, "sk-pro-carol", "6.6.6." + std::to_string(i) + ", 198.51.100.0");
    REQUIRE(r);
    ok += r->status == 200;
  }
  CHECK(ok == 2);
  // A malformed hop to believe: 400, not a shared bucket.
  const httplib::Result bad = chat(c, "sk-pro-carol", "not-an-address");
  REQUIRE(bad);
  CHECK(bad->status == 400);
  CHECK(nlohmann::json::parse(bad->body)["error"]["code"] == "invalid_request");
}
