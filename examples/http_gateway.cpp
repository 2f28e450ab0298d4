// http_gateway: an OpenAI-compatible gateway with ratekeeper in front.
//
// POST /v1/chat/completions
//   1. The client address: the connecting peer, or (behind proxies you list
//      with --trusted-proxy) the right-most untrusted X-Forwarded-For hop.
//      A malformed hop is a 400, never a shared "unknown" bucket.
//   2. A per-IP limit (--ip-rpm, charge-on-reject: attempts count even when
//      refused, so a client cannot hammer its way through).
//   3. "Authorization: Bearer <key>" names an account (user, team, org,
//      tier); an unknown key is a 401 after the per-IP limit.
//   4. The tier's limits, per user and per team, with the call's token
//      estimate (prompt characters / 4 + max_tokens): one all-or-nothing
//      chain with the per-IP limit. Refused: 429 (413 for a call larger than
//      a limit) with Retry-After, x-ratelimit-* and RateLimit headers.
//   5. Forwarded to the upstream; the tokens it did not use (from its
//      usage object) go back to the token limits.
// GET /metrics: every limit's counters, Prometheus text.
//
// The upstream is a stub started in-process on another loopback port unless
// --upstream HOST:PORT names a real one.
//
//   http_gateway [--port N] [--ip-rpm N] [--trusted-proxy CIDR]...
//                [--upstream HOST:PORT]
//
// With --port 0 it picks a free port; it prints "listening on HOST:PORT"
// once it accepts connections.
#include <httplib.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "ratekeeper/errors.hpp"
#include "ratekeeper/http/headers.hpp"
#include "ratekeeper/prometheus.hpp"
#include "ratekeeper/ratekeeper.hpp"

namespace rk = ratekeeper;
using nlohmann::json;

namespace {

struct Account {
  std::string user, team, org, tier;
};

// Demo accounts. A real gateway looks keys up in its own store.
const absl::flat_hash_map<std::string, Account>& accounts() {
  static const auto* m = new absl::flat_hash_map<std::string, Account>{
      {"sk-free-alice", {"alice", "red", "acme", "free"}},
      {"sk-free-bob", {"bob", "red", "acme", "free"}},
      {"sk-pro-carol", {"carol", "blue", "acme", "pro"}},
  };
  return *m;
}

std::vector<rk::LimitSpec> tier_limits(std::uint64_t rpm, std::uint64_t tpm,
                                       std::uint64_t tpd) {
  return {
      {{.name = "rpm"},
       rk::Field::kUser,
       rk::PolicyKind::kSlidingWindow,
       rk::per_minute(rpm)},
      {{.name = "tpm", .unit = rk::Unit::kTokens},
       rk::Field::kUser,
       rk::PolicyKind::kTokenBucket,
       rk::per_minute(tpm),
       tpm},
      {{.name = "tpd", .unit = rk::Unit::kTokens},
       rk::Field::kTeam,
       rk::PolicyKind::kFixedWindow,
       rk::per_day(tpd)},
  };
}

struct Options {
  int port = 8080;
  std::uint64_t ip_rpm = 120;
  std::vector<std::string> trusted;
  std::string upstream;  // HOST:PORT; empty: the in-process stub
};

bool parse_args(int argc, char** argv, Options& o) {
  for (int i = 1; i < argc; ++i) {
    const std::string_view a = argv[i];
    auto value = [&]() -> const char* {
      return i + 1 < argc ? argv[++i] : nullptr;
    };
    const char* v = nullptr;
    if (a == "--port" && (v = value())) {
      o.port = std::atoi(v);
    } else if (a == "--ip-rpm" && (v = value())) {
      o.ip_rpm = std::strtoull(v, nullptr, 10);
    } else if (a == "--trusted-proxy" && (v = value())) {
      o.trusted.emplace_back(v);
    } else if (a == "--upstream" && (v = value())) {
      o.upstream = v;
    } else {
      std::fprintf(stderr,
                   "usage: http_gateway [--port N] [--ip-rpm N] "
                   "[--trusted-proxy CIDR]... [--upstream HOST:PORT]\n");
      return false;
    }
  }
  return true;
}

// The stub upstream: answers like OpenAI's chat completions, with a usage
// object: the prompt at 4 characters a token, and a reply of at most 16.
void serve_stub(httplib::Server& stub) {
  stub.Post("/v1/chat/completions", [](const httplib::Request& req,
                                       httplib::Response& res) {
    const json body = json::parse(req.body, nullptr, false);
    const std::uint64_t prompt = (req.body.size() + 3) / 4;
    std::uint64_t max_out = 16;
    if (body.is_object() && body.contains("max_tokens") &&
        body["max_tokens"].is_number_unsigned()) {
      max_out =
          std::min<std::uint64_t>(16, body["max_tokens"].get<std::uint64_t>());
    }
    const json reply = {
        {"id", "chatcmpl-stub"},
        {"object", "chat.completion"},
        {"model", body.is_object() ? body.value("model", "") : ""},
        {"choices",
         json::array({{{"index", 0},
                       {"message", {{"role", "assistant"}, {"content", "ok"}}},
                       {"finish_reason", "stop"}}})},
        {"usage",
         {{"prompt_tokens", prompt},
          {"completion_tokens", max_out},
          {"total_tokens", prompt + max_out}}}};
    res.set_content(reply.dump(), "application/json");
  });
}

void reply_error(httplib::Response& res, const rk::Rejection& r) {
  res.status = r.status();
  res.set_content(r.json_body(), "application/json");
}

void set_headers(httplib::Response& res, const rk::http::Headers& headers) {
  for (const rk::http::Header& h : headers) res.set_header(h.name, h.value);
}

class Gateway {
 public:
  Gateway(const Options& o, rk::TrustedProxies proxies, std::string up_host,
          int up_port)
      : proxies_(std::move(proxies)),
        tiers_(rk::ShardedOptions{.capacity = 1 << 16}),
        up_host_(std::move(up_host)),
        up_port_(up_port) {
    ip_limit_ =
        rk::make_limit({.name = "ip_rpm", .charge_on_reject = true},
                       rk::SlidingWindow::create(
                           rk::per_minute(std::max<std::uint64_t>(1, o.ip_rpm)))
                           .value(),
                       rk::ShardedOptions{.capacity = 1 << 16})
            .value();
    // Limits above what one day of the demo needs; the free tier is small
    // on purpose so that its limits are easy to reach.
    tiers_.set_tier("free", tier_limits(5, 20'000, 200'000)).IgnoreError();
    tiers_.set_tier("pro", tier_limits(60, 200'000, 10'000'000)).IgnoreError();
  }

  void chat(const httplib::Request& req, httplib::Response& res) {
    // 1. Who is calling, as far as we can tell.
    absl::StatusOr<rk::IpAddress> peer = rk::IpAddress::parse(req.remote_addr);
    if (!peer.ok()) {
      ip_limit_->metrics().record_error();
      return reply_error(res, {.kind = rk::Refusal::kConfiguration,
                               .message = "cannot read the peer address"});
    }
    std::vector<std::string> xff_lines;
    const std::size_t n = req.get_header_value_count("X-Forwarded-For");
    for (std::size_t i = 0; i < n; ++i) {
      xff_lines.push_back(req.get_header_value("X-Forwarded-For", i));
    }
    const std::vector<std::string_view> xff(xff_lines.begin(), xff_lines.end());
    absl::StatusOr<rk::IpAddress> client =
        proxies_.client_from_x_forwarded_for(*peer, xff);
    if (!client.ok()) {
      ip_limit_->metrics().record_error();
      return reply_error(res,
                         {.kind = rk::Refusal::kBadRequest,
                          .message = std::string(client.status().message())});
    }
    const std::string ip_key = rk::ip_key(*client);
    const rk::ChainItem ip_item{ip_limit_.get(), ip_key, 1};

    // 3. Authentication; unknown keys still count against the IP.
    const std::string auth = req.get_header_value("Authorization");
    constexpr std::string_view kBearer = "Bearer ";
    const auto acct = auth.rfind(kBearer, 0) == 0
                          ? accounts().find(auth.substr(kBearer.size()))
                          : accounts().end();
    if (acct == accounts().end()) {
      const rk::ChainDecision d =
          tiers_.chain().acquire(std::span<const rk::ChainItem>(&ip_item, 1));
      if (!d) return refuse(res, d);
      res.status = 401;
      res.set_content(
          "{\"error\":{\"message\":\"unknown API key\",\"type\":"
          "\"invalid_api_key\",\"code\":\"invalid_api_key\"}}",
          "application/json");
      return;
    }
    const Account& a = acct->second;

    // 4. The estimate, then one chain: the IP's limit and the tier's.
    const json body = json::parse(req.body, nullptr, false);
    if (!body.is_object() || !body.contains("model") ||
        !body["model"].is_string()) {
      return reply_error(res, {.kind = rk::Refusal::kBadRequest,
                               .message = "the body must be a JSON object "
                                          "with a \"model\""});
    }
    const std::string model = body["model"].get<std::string>();
    std::uint64_t max_tokens = 256;
    if (body.contains("max_tokens") &&
        body["max_tokens"].is_number_unsigned()) {
      max_tokens = body["max_tokens"].get<std::uint64_t>();
    }
    const std::uint64_t estimate = (req.body.size() + 3) / 4 + max_tokens;
    const rk::Subject who{.api_key = acct->first,
                          .user = a.user,
                          .team = a.team,
                          .org = a.org,
                          .model = model,
                          .ip = ip_key};
    absl::StatusOr<rk::ChainDecision> d = tiers_.acquire(
        a.tier, who, estimate, std::span<const rk::ChainItem>(&ip_item, 1));
    if (!d.ok()) {
      return reply_error(res, {.kind = rk::Refusal::kConfiguration,
                               .message = std::string(d.status().message())});
    }
    if (!*d) return refuse(res, *d);

    // 5. Upstream, then give back what the call did not use.
    httplib::Client up(up_host_, up_port_);
    up.set_connection_timeout(std::chrono::seconds(5));
    up.set_read_timeout(std::chrono::seconds(60));
    httplib::Result r =
        up.Post("/v1/chat/completions", req.body, "application/json");
    if (!r) {
      // Nothing was served: the whole call goes back.
      tiers_.give_back(*d);
      res.status = 502;
      res.set_content(
          "{\"error\":{\"message\":\"upstream unreachable\",\"type\":"
          "\"upstream_error\",\"code\":\"upstream_error\"}}",
          "application/json");
      return;
    }
    std::uint64_t used = estimate;  // no usage reported: charge the estimate
    const json reply = json::parse(r->body, nullptr, false);
    if (reply.is_object() && reply.contains("usage") &&
        reply["usage"].is_object() && reply["usage"].contains("total_tokens") &&
        reply["usage"]["total_tokens"].is_number_unsigned()) {
      used = reply["usage"]["total_tokens"].get<std::uint64_t>();
    }
    // The tokens the provider counted, below or above the estimate: the
    // unused part goes back, an excess is charged (no caller subtracts).
    tiers_.settle_tokens(*d, used).IgnoreError();
    set_headers(res, rk::http::rate_limit_headers(*d));
    res.status = r->status;
    res.set_content(r->body, "application/json");
  }

  void metrics(const httplib::Request&, httplib::Response& res) {
    std::vector<std::pair<std::string, rk::Limit*>> all = tiers_.all_limits();
    all.insert(all.begin(), {"", ip_limit_.get()});
    res.set_content(rk::prometheus_text(all), "text/plain; version=0.0.4");
  }

 private:
  static void refuse(httplib::Response& res, const rk::ChainDecision& d) {
    set_headers(res, rk::http::rate_limit_headers(d));
    reply_error(res, rk::Rejection::from(d));
  }

  rk::TrustedProxies proxies_;
  std::unique_ptr<rk::PolicyLimit<rk::SlidingWindow>> ip_limit_;
  rk::TierTable<> tiers_;
  std::string up_host_;
  int up_port_;
};

httplib::Server* g_server = nullptr;

extern "C" void on_signal(int) {
  if (g_server != nullptr) g_server->stop();
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  if (!parse_args(argc, argv, o)) return 2;
  std::vector<std::string_view> cidrs(o.trusted.begin(), o.trusted.end());
  absl::StatusOr<rk::TrustedProxies> proxies =
      rk::TrustedProxies::create(std::span<const std::string_view>(cidrs));
  if (!proxies.ok()) {
    std::fprintf(stderr, "http_gateway: %s\n",
                 std::string(proxies.status().message()).c_str());
    return 2;
  }

  // The upstream: the stub on a free loopback port, or the one given.
  httplib::Server stub;
  std::thread stub_thread;
  std::string up_host = "127.0.0.1";
  int up_port = 0;
  if (o.upstream.empty()) {
    serve_stub(stub);
    up_port = stub.bind_to_any_port("127.0.0.1");
    if (up_port <= 0) {
      std::fprintf(stderr, "http_gateway: cannot bind the stub upstream\n");
      return 1;
    }
    stub_thread = std::thread([&] { stub.listen_after_bind(); });
  } else {
    const std::size_t colon = o.upstream.rfind(':');
    if (colon == std::string::npos) {
      std::fprintf(stderr, "http_gateway: --upstream wants HOST:PORT\n");
      return 2;
    }
    up_host = o.upstream.substr(0, colon);
    up_port = std::atoi(o.upstream.c_str() + colon + 1);
  }

  Gateway gw(o, *std::move(proxies), up_host, up_port);
  httplib::Server server;
  server.Post(
      "/v1/chat/completions",
      [&](const httplib::Request& q, httplib::Response& r) { gw.chat(q, r); });
  server.Get("/metrics", [&](const httplib::Request& q, httplib::Response& r) {
    gw.metrics(q, r);
  });
  server.Get("/healthz", [](const httplib::Request&, httplib::Response& r) {
    r.set_content("ok\n", "text/plain");
  });
  const int port =
      o.port == 0 ? server.bind_to_any_port("127.0.0.1")
                  : (server.bind_to_port("127.0.0.1", o.port) ? o.port : -1);
  if (port <= 0) {
    std::fprintf(stderr, "http_gateway: cannot bind 127.0.0.1:%d\n", o.port);
    stub.stop();
    if (stub_thread.joinable()) stub_thread.join();
    return 1;
  }
  g_server = &server;
  std::signal(SIGTERM, on_signal);
  std::signal(SIGINT, on_signal);
  std::printf("listening on 127.0.0.1:%d\n", port);
  std::fflush(stdout);
  server.listen_after_bind();
  stub.stop();
  if (stub_thread.joinable()) stub_thread.join();
  return 0;
}
