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
//   4. One all-or-nothing reservation (Accountant::reserve): the per-IP
//      limit, the tier's limits per user and per team with the call's token
//      estimate (prompt characters / 4 + max_tokens), and the team's budget
//      in money, priced from the price file for the call's worst case.
//      Refused by a rate limit: 429 (413 for a call larger than a limit)
//      with Retry-After, retry-after-ms, x-ratelimit-* and RateLimit
//      headers; refused by the budget: 403 with the same headers,
//      x-should-retry: false and a budget_exhausted body. Both are
//      http::refusal_response, bodies in OpenAI's error shape.
//   5. Forwarded to the upstream over a pool of keep-alive connections
//      (TCP_NODELAY on both sides). A stream ("stream": true) is passed
//      through chunk by chunk as the upstream sends it; the gateway asks for
//      stream_options.include_usage and reads the final usage chunk
//      (StreamUsageReader: only events naming a usage are parsed). The
//      call is settled to the usage the upstream reported, in both
//      directions: unused tokens and money go back, an overage is charged.
//      No usage: the reservation's worst case is charged. An upstream error
//      (no answer, or a status other than 2xx) gives everything back. The
//      upstream's headers (x-request-id, openai-processing-ms, ...) are
//      forwarded, except hop-by-hop ones and its own rate-limit headers.
// GET /metrics: every limit's and budget's counters, Prometheus text.
// GET /v1/budget: the caller's team budget (spent and limit, nano-USD).
//
// The upstream is a stub started in-process on another loopback port unless
// --upstream HOST:PORT names a real one (plain HTTP).
//
//   http_gateway [--port N] [--ip-rpm N] [--trusted-proxy CIDR]...
//                [--upstream HOST:PORT] [--upstream-key KEY]
//                [--config FILE] [--prices FILE] [--team-budget-usd X]
//                [--threads N] [--no-tcp-nodelay] [--no-upstream-keep-alive]
//
// --no-tcp-nodelay and --no-upstream-keep-alive exist to measure what each
// saves (docs/benchmarks.md, "The HTTP gateway").
// --config names a JSON file of tiers and accounts (the built-in one,
// kDefaultConfig below, shows the shape); --prices a price catalogue in
// LiteLLM's shape (the built-in one prices gpt-4o and gpt-4o-mini).
// With --port 0 it picks a free port; it prints "listening on HOST:PORT"
// once it accepts connections.
#include <httplib.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <fstream>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "ratekeeper/budget/accountant.hpp"
#include "ratekeeper/budget/json.hpp"
#include "ratekeeper/budget/stream.hpp"
#include "ratekeeper/errors.hpp"
#include "ratekeeper/http/headers.hpp"
#include "ratekeeper/prometheus.hpp"
#include "ratekeeper/ratekeeper.hpp"

namespace rk = ratekeeper;
using nlohmann::json;

namespace {

// Time for the limits and the budgets alike: the accountant's chain takes
// the tiers' limits with its own clock, so both must count the same time.
// Budgets reset on calendar days, hence Unix time.
using Clock = rk::SystemClock;

// The built-in tiers and accounts. A real gateway looks keys up in its own
// store; --config FILE replaces this.
constexpr std::string_view kDefaultConfig = R"({
  "tiers": {
    "free": [
      {"name": "rpm", "scope": "user", "policy": "sliding_window",
       "limit": 5, "per_seconds": 60},
      {"name": "tpm", "unit": "tokens", "scope": "user",
       "policy": "token_bucket", "limit": 20000, "per_seconds": 60},
      {"name": "tpd", "unit": "tokens", "scope": "team",
       "policy": "fixed_window", "limit": 200000, "per_seconds": 86400}
    ],
    "pro": [
      {"name": "rpm", "scope": "user", "policy": "sliding_window",
       "limit": 60, "per_seconds": 60},
      {"name": "tpm", "unit": "tokens", "scope": "user",
       "policy": "token_bucket", "limit": 200000, "per_seconds": 60},
      {"name": "tpd", "unit": "tokens", "scope": "team",
       "policy": "fixed_window", "limit": 10000000, "per_seconds": 86400}
    ]
  },
  "accounts": {
    "sk-free-alice": {"user": "alice", "team": "red", "org": "acme",
                      "tier": "free"},
    "sk-free-bob": {"user": "bob", "team": "red", "org": "acme",
                    "tier": "free"},
    "sk-pro-carol": {"user": "carol", "team": "blue", "org": "acme",
                     "tier": "pro"}
  },
  "team_budget_usd": "5"
})";

// The built-in prices: LiteLLM's map for these two models (USD per token).
constexpr std::string_view kDefaultPrices = R"({
  "gpt-4o": {"input_cost_per_token": 2.5e-06,
             "cache_read_input_token_cost": 1.25e-06,
             "output_cost_per_token": 1e-05},
  "gpt-4o-mini": {"input_cost_per_token": 1.5e-07,
                  "cache_read_input_token_cost": 7.5e-08,
                  "output_cost_per_token": 6e-07}
})";

constexpr std::string_view kBudgetName = "team_day";

struct Account {
  std::string user, team, org, tier;
};

struct Config {
  std::vector<std::pair<std::string, std::vector<rk::LimitSpec>>> tiers;
  absl::flat_hash_map<std::string, Account> accounts;
  std::uint64_t team_budget_nanos = 0;
};

struct Options {
  int port = 8080;
  std::uint64_t ip_rpm = 120;
  std::vector<std::string> trusted;
  std::string upstream;  // HOST:PORT; empty: the in-process stub
  std::string upstream_key;
  std::string config_file;
  std::string prices_file;
  std::string team_budget_usd;  // overrides the config's
  int threads = 32;
  // For measuring what they save (docs/benchmarks.md); on by default.
  bool tcp_nodelay = true;
  bool upstream_keep_alive = true;
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
    } else if (a == "--upstream-key" && (v = value())) {
      o.upstream_key = v;
    } else if (a == "--config" && (v = value())) {
      o.config_file = v;
    } else if (a == "--prices" && (v = value())) {
      o.prices_file = v;
    } else if (a == "--team-budget-usd" && (v = value())) {
      o.team_budget_usd = v;
    } else if (a == "--no-tcp-nodelay") {
      o.tcp_nodelay = false;
    } else if (a == "--no-upstream-keep-alive") {
      o.upstream_keep_alive = false;
    } else if (a == "--threads" && (v = value())) {
      o.threads = std::max(2, std::atoi(v));
    } else {
      std::fprintf(stderr,
                   "usage: http_gateway [--port N] [--ip-rpm N] "
                   "[--trusted-proxy CIDR]... [--upstream HOST:PORT] "
                   "[--upstream-key KEY] [--config FILE] [--prices FILE] "
                   "[--team-budget-usd X] [--threads N]\n");
      return false;
    }
  }
  return true;
}

absl::StatusOr<std::string> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError("cannot read " + path);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

// A file's text, or `fallback` when no path was given.
absl::StatusOr<std::string> text_of(const std::string& path,
                                    std::string_view fallback) {
  if (path.empty()) return std::string(fallback);
  return read_file(path);
}

// A start-up error, said on stderr: exit status 2.
int refuse_to_start(const absl::Status& s) {
  std::fprintf(stderr, "http_gateway: %s\n", std::string(s.message()).c_str());
  return 2;
}

// "5", "0.25", "0.000001": USD as nano-USD, exactly (at most 9 decimals).
absl::StatusOr<std::uint64_t> usd_to_nanos(std::string_view s) {
  std::uint64_t whole = 0, frac = 0;
  int frac_digits = 0;
  bool dot = false, any = false;
  for (const char c : s) {
    if (c == '.' && !dot) {
      dot = true;
      continue;
    }
    if (c < '0' || c > '9' || (dot && frac_digits == 9) ||
        (!dot && whole > 1'000'000'000)) {
      return absl::InvalidArgumentError(
          absl::StrCat("budget \"", std::string(s),
                       "\": want USD as a decimal (at most 9 decimals, "
                       "below $1e9)"));
    }
    any = true;
    if (dot) {
      frac = frac * 10 + static_cast<std::uint64_t>(c - '0');
      ++frac_digits;
    } else {
      whole = whole * 10 + static_cast<std::uint64_t>(c - '0');
    }
  }
  if (!any) return absl::InvalidArgumentError("budget: empty amount");
  for (int i = frac_digits; i < 9; ++i) frac *= 10;
  return whole * 1'000'000'000 + frac;
}

absl::StatusOr<Config> parse_config_or_throw(std::string_view text);

// The tiers, accounts and team budget of a config's JSON; a field of the
// wrong type is an error naming nlohmann's complaint.
absl::StatusOr<Config> parse_config(std::string_view text) {
  try {
    return parse_config_or_throw(text);
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("config: ", e.what()));
  }
}

absl::StatusOr<Config> parse_config_or_throw(std::string_view text) {
  const json j = json::parse(text.begin(), text.end(), nullptr, false);
  if (!j.is_object() || !j.contains("tiers") || !j["tiers"].is_object() ||
      !j.contains("accounts") || !j["accounts"].is_object()) {
    return absl::InvalidArgumentError(
        "config: want a JSON object with \"tiers\" and \"accounts\"");
  }
  Config c;
  for (const auto& item : j["tiers"].items()) {
    // Named, not a structured binding: clang 14 cannot capture one.
    const std::string tier = item.key();
    const json& limits = item.value();
    if (!limits.is_array()) {
      return absl::InvalidArgumentError("config: tier \"" + tier +
                                        "\" is not an array of limits");
    }
    std::vector<rk::LimitSpec> specs;
    for (const json& l : limits) {
      const auto bad = [&](std::string_view why) {
        return absl::InvalidArgumentError(
            absl::StrCat("config: tier \"", tier, "\": ", std::string(why)));
      };
      if (!l.is_object() || !l.value("name", json()).is_string() ||
          !l.value("limit", json()).is_number_unsigned() ||
          !l.value("per_seconds", json()).is_number_unsigned()) {
        return bad(
            "each limit wants \"name\", \"limit\" and \"per_seconds\" "
            "(non-negative integers)");
      }
      rk::LimitSpec s;
      s.options.name = l["name"].get<std::string>();
      const std::string unit = l.value("unit", "requests");
      if (unit == "tokens") {
        s.options.unit = rk::Unit::kTokens;
      } else if (unit != "requests") {
        return bad("unit is \"requests\" or \"tokens\"");
      }
      const std::string scope = l.value("scope", "user");
      static const absl::flat_hash_map<std::string, rk::Field> kScopes = {
          {"api_key", rk::Field::kApiKey}, {"user", rk::Field::kUser},
          {"team", rk::Field::kTeam},      {"org", rk::Field::kOrg},
          {"model", rk::Field::kModel},    {"ip", rk::Field::kIp}};
      const auto sc = kScopes.find(scope);
      if (sc == kScopes.end()) return bad("unknown scope \"" + scope + "\"");
      s.scope = sc->second;
      const std::string policy = l.value("policy", "token_bucket");
      if (policy == "token_bucket") {
        s.kind = rk::PolicyKind::kTokenBucket;
      } else if (policy == "fixed_window") {
        s.kind = rk::PolicyKind::kFixedWindow;
      } else if (policy == "sliding_window") {
        s.kind = rk::PolicyKind::kSlidingWindow;
      } else {
        return bad("unknown policy \"" + policy + "\"");
      }
      s.rate =
          rk::per(l["limit"].get<std::uint64_t>(),
                  std::chrono::seconds(l["per_seconds"].get<std::int64_t>()));
      if (l.contains("burst")) {
        if (!l["burst"].is_number_unsigned()) return bad("bad burst");
        s.burst = l["burst"].get<std::uint64_t>();
      }
      specs.push_back(std::move(s));
    }
    c.tiers.emplace_back(tier, std::move(specs));
  }
  for (const auto& [key, a] : j["accounts"].items()) {
    if (!a.is_object()) {
      return absl::InvalidArgumentError("config: account is not an object");
    }
    Account acct{a.value("user", ""), a.value("team", ""), a.value("org", ""),
                 a.value("tier", "")};
    if (acct.user.empty() || acct.team.empty() || acct.tier.empty()) {
      return absl::InvalidArgumentError(
          "config: an account wants \"user\", \"team\" and \"tier\"");
    }
    c.accounts.emplace(key, std::move(acct));
  }
  const json budget = j.value("team_budget_usd", json("5"));
  if (!budget.is_string()) {
    return absl::InvalidArgumentError(
        "config: \"team_budget_usd\" is a decimal string, e.g. \"5.00\"");
  }
  absl::StatusOr<std::uint64_t> nanos = usd_to_nanos(budget.get<std::string>());
  if (!nanos.ok()) return nanos.status();
  c.team_budget_nanos = *nanos;
  return c;
}

// The stub upstream: answers like OpenAI's chat completions, with a usage
// object: the prompt at 4 characters a token, and a reply of at most 16.
// With "stream": true, an SSE stream of 4 chunks and, when asked
// (stream_options.include_usage), a final usage chunk.
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
    const std::string model =
        body.is_object() ? body.value("model", "") : std::string();
    const json usage = {{"prompt_tokens", prompt},
                        {"completion_tokens", max_out},
                        {"total_tokens", prompt + max_out}};
    res.set_header("x-request-id", "req_stub");
    const bool stream = body.is_object() && body.contains("stream") &&
                        body["stream"].is_boolean() &&
                        body["stream"].get<bool>();
    if (stream) {
      std::string sse;
      for (int i = 0; i < 4; ++i) {
        const json chunk = {
            {"id", "chatcmpl-stub"},
            {"object", "chat.completion.chunk"},
            {"model", model},
            {"choices", json::array({{{"index", 0},
                                      {"delta", {{"content", "ok "}}},
                                      {"finish_reason", nullptr}}})}};
        sse += "data: " + chunk.dump() + "\n\n";
      }
      const json opts = body.value("stream_options", json::object());
      if (opts.is_object() && opts.contains("include_usage") &&
          opts["include_usage"] == true) {
        const json last = {{"id", "chatcmpl-stub"},
                           {"object", "chat.completion.chunk"},
                           {"model", model},
                           {"choices", json::array()},
                           {"usage", usage}};
        sse += "data: " + last.dump() + "\n\n";
      }
      sse += "data: [DONE]\n\n";
      res.set_content(sse, "text/event-stream");
      return;
    }
    const json reply = {
        {"id", "chatcmpl-stub"},
        {"object", "chat.completion"},
        {"model", model},
        {"choices",
         json::array({{{"index", 0},
                       {"message", {{"role", "assistant"}, {"content", "ok"}}},
                       {"finish_reason", "stop"}}})},
        {"usage", usage}};
    res.set_content(reply.dump(), "application/json");
  });
}

void reply_error(httplib::Response& res, const rk::Rejection& r) {
  res.status = r.status();
  res.set_content(r.json_body(), "application/json");
}

void reply_json(httplib::Response& res, int status, std::string_view message,
                std::string_view type, std::string_view code) {
  res.status = status;
  const json body = {{"error",
                      {{"message", message},
                       {"type", type},
                       {"param", nullptr},
                       {"code", code}}}};
  res.set_content(body.dump(), "application/json");
}

// A refusal's whole answer (status, headers, OpenAI-shaped body), as
// http::refusal_response builds it.
void send(httplib::Response& res, const rk::http::Response& a) {
  res.status = a.status;
  std::string type = "application/json";
  for (const rk::http::Header& h : a.headers) {
    if (h.name == "Content-Type") {
      type = h.value;
    } else {
      res.set_header(h.name, h.value);
    }
  }
  res.set_content(a.body, type);
}

// Budgets answer 403 here (a spend cap the client cannot wait out);
// x-should-retry: false either way.
const rk::http::HeaderOptions kAnswers{
    .budget_status = rk::http::BudgetStatus::k403Forbidden};

void set_headers(httplib::Response& res, const rk::http::Headers& headers) {
  for (const rk::http::Header& h : headers) res.set_header(h.name, h.value);
}

bool iequals(std::string_view a, std::string_view b) {
  return a.size() == b.size() &&
         std::equal(a.begin(), a.end(), b.begin(), [](char x, char y) {
           return std::tolower(static_cast<unsigned char>(x)) ==
                  std::tolower(static_cast<unsigned char>(y));
         });
}

bool istarts_with(std::string_view s, std::string_view prefix) {
  return s.size() >= prefix.size() &&
         iequals(s.substr(0, prefix.size()), prefix);
}

// The upstream's headers worth passing on: not hop-by-hop ones, not those
// httplib writes itself (framing, type), and not the upstream's own rate
// limit headers, which describe the gateway's quota, not the caller's.
void forward_headers(const httplib::Headers& from, httplib::Response& res) {
  static constexpr std::string_view kDrop[] = {"connection",
                                               "keep-alive",
                                               "transfer-encoding",
                                               "content-length",
                                               "content-type",
                                               "content-encoding",
                                               "te",
                                               "trailer",
                                               "upgrade",
                                               "proxy-authenticate",
                                               "proxy-connection",
                                               "retry-after",
                                               "retry-after-ms",
                                               "ratelimit",
                                               "ratelimit-policy",
                                               "x-should-retry",
                                               "set-cookie"};
  for (const auto& [name, value] : from) {
    bool drop = istarts_with(name, "x-ratelimit-");
    for (const std::string_view d : kDrop) drop = drop || iequals(name, d);
    if (!drop) res.headers.emplace(name, value);
  }
}

// UpstreamPool: keep-alive connections to the upstream, one request at a
// time each (an httplib::Client serializes its requests), reused across
// requests: a request takes one (or makes one) and puts it back when its
// answer was read whole. Connections idle for longer than kIdle are dropped
// rather than reused, so that a reuse rarely meets a connection the
// upstream is closing.
class UpstreamPool {
 public:
  UpstreamPool(std::string host, int port, std::string key, bool nodelay,
               bool keep_alive)
      : host_(std::move(host)),
        port_(port),
        key_(std::move(key)),
        nodelay_(nodelay),
        keep_alive_(keep_alive) {}

  std::unique_ptr<httplib::Client> take() {
    const auto now = std::chrono::steady_clock::now();
    {
      std::lock_guard<std::mutex> lock(mu_);
      while (!idle_.empty()) {
        Idle i = std::move(idle_.back());
        idle_.pop_back();
        if (now - i.since < kIdle) return std::move(i.client);
      }
    }
    auto c = std::make_unique<httplib::Client>(host_, port_);
    c->set_keep_alive(keep_alive_);
    c->set_tcp_nodelay(nodelay_);
    c->set_connection_timeout(std::chrono::seconds(5));
    c->set_read_timeout(std::chrono::seconds(300));
    c->set_write_timeout(std::chrono::seconds(30));
    return c;
  }

  void put(std::unique_ptr<httplib::Client> c) {
    if (!keep_alive_) return;
    std::lock_guard<std::mutex> lock(mu_);
    idle_.push_back({std::move(c), std::chrono::steady_clock::now()});
  }

  // Closes every idle connection (at shutdown).
  void clear() {
    std::lock_guard<std::mutex> lock(mu_);
    idle_.clear();
  }

  // The request headers the upstream gets.
  httplib::Headers headers() const {
    // Identity: the gateway reads JSON answers whole and passes streams
    // through untouched.
    httplib::Headers h = {{"Accept-Encoding", "identity"}};
    if (!key_.empty()) h.emplace("Authorization", "Bearer " + key_);
    return h;
  }

 private:
  static constexpr std::chrono::seconds kIdle{4};
  struct Idle {
    std::unique_ptr<httplib::Client> client;
    std::chrono::steady_clock::time_point since;
  };
  const std::string host_;
  const int port_;
  const std::string key_;
  const bool nodelay_;
  const bool keep_alive_;
  std::mutex mu_;
  std::vector<Idle> idle_;
};

// StreamCall: one streamed call, shared by the thread that reads the
// upstream and the server thread that writes to the client. The upstream
// thread appends chunks as they arrive; the server thread takes them,
// reads the usage on the way, writes them to the client, and settles the
// reservation when the stream ends.
struct StreamCall {
  std::mutex mu;
  std::condition_variable cv;
  bool have_headers = false;  // guarded by mu
  int status = 0;
  httplib::Headers headers;
  std::deque<std::string> chunks;  // guarded by mu
  bool done = false;               // guarded by mu
  bool failed = false;             // guarded by mu: no full answer
  std::atomic<bool> cancel{false};

  std::unique_ptr<httplib::Client> client;
  std::thread reader;
  std::optional<rk::Reservation<Clock>> reservation;
  std::uint64_t max_output = 0;
  // The usage of the stream, read as it passes: only the events that name
  // a usage object are parsed.
  rk::StreamUsageReader usage{rk::StreamFormat::kOpenAIChat};
  bool settled = false;

  // Everything until the end, as one body (for non-stream answers).
  std::string drain() {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return done; });
    std::string body;
    for (const std::string& c : chunks) body += c;
    chunks.clear();
    return body;
  }
};

class Gateway {
 public:
  Gateway(const Options& o, Config config, rk::TrustedProxies proxies,
          rk::PriceTable prices, std::string up_host, int up_port)
      : proxies_(std::move(proxies)),
        accounts_(std::move(config.accounts)),
        tiers_(rk::ShardedOptions{.capacity = 1 << 16}),
        acct_(std::move(prices), Clock{},
              rk::ShardedOptions{.capacity = 1 << 16}),
        pool_(std::move(up_host), up_port, o.upstream_key, o.tcp_nodelay,
              o.upstream_keep_alive) {
    ip_limit_ =
        rk::make_limit({.name = "ip_rpm", .charge_on_reject = true},
                       rk::SlidingWindow::create(
                           rk::per_minute(std::max<std::uint64_t>(1, o.ip_rpm)))
                           .value(),
                       rk::ShardedOptions{.capacity = 1 << 16})
            .value();
    for (auto& [name, limits] : config.tiers) {
      if (absl::Status st = tiers_.set_tier(name, std::move(limits));
          !st.ok()) {
        error_ = std::string(st.message());
        return;
      }
    }
    if (absl::Status st = acct_.add_budget(
            {.name = std::string(kBudgetName),
             .scope = rk::Field::kTeam,
             .unit = rk::BudgetUnit::kNanoUsd,
             .limit = config.team_budget_nanos,
             .period = rk::Period::calendar(rk::PeriodKind::kDay).value()});
        !st.ok()) {
      error_ = std::string(st.message());
    }
  }

  // Closes the idle upstream connections (the server has stopped).
  void close_upstream() { pool_.clear(); }

  // Why the gateway cannot start (a bad tier or budget), or empty.
  const std::string& error() const { return error_; }

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
                          ? accounts_.find(auth.substr(kBearer.size()))
                          : accounts_.end();
    if (acct == accounts_.end()) {
      const rk::ChainDecision d =
          tiers_.chain().acquire(std::span<const rk::ChainItem>(&ip_item, 1));
      if (!d) return refuse(res, d);
      return reply_json(res, 401, "unknown API key", "invalid_request_error",
                        "invalid_api_key");
    }
    const Account& a = acct->second;

    // 4. The estimate, then one reservation: the IP's limit, the tier's
    // and the team's budget.
    json body = json::parse(req.body, nullptr, false);
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
    const auto stream_it = body.find("stream");
    const bool stream = stream_it != body.end() && stream_it->is_boolean() &&
                        stream_it->get<bool>();
    const std::uint64_t prompt = (req.body.size() + 3) / 4;
    const std::uint64_t estimate = prompt + max_tokens;
    const rk::Subject who{.api_key = acct->first,
                          .user = a.user,
                          .team = a.team,
                          .org = a.org,
                          .model = model,
                          .ip = ip_key};
    rk::ChainItems limits;
    limits.add(ip_item.limit, ip_item.key, ip_item.cost);
    if (absl::Status st = tiers_.chain_items(a.tier, who, estimate, limits);
        !st.ok()) {
      return reply_error(res, {.kind = rk::Refusal::kConfiguration,
                               .message = std::string(st.message())});
    }
    absl::StatusOr<rk::Reservation<Clock>> r = acct_.reserve(
        who, model, {.prompt_tokens = prompt, .max_output_tokens = max_tokens},
        absl::StrCat("gw-", next_id_.fetch_add(1, std::memory_order_relaxed)),
        limits.items());
    if (!r.ok()) {
      if (absl::IsNotFound(r.status())) {
        return reply_json(res, 404, std::string(r.status().message()),
                          "invalid_request_error", "model_not_found");
      }
      return reply_error(res, {.kind = rk::Refusal::kConfiguration,
                               .message = std::string(r.status().message())});
    }
    if (!r->granted())
      return send(res, rk::http::refusal_response(*r, kAnswers));
    set_headers(res, rk::http::rate_limit_headers(r->decision()));

    // 5. Upstream.
    if (stream) {
      // Ask for the usage chunk: without it the call is charged its worst
      // case. (Callers that did not ask see one more chunk, with empty
      // choices, before [DONE], as the API documents.)
      json& opts = body["stream_options"];
      if (!opts.is_object()) opts = json::object();
      opts["include_usage"] = true;
      return chat_stream(body.dump(), *std::move(r), max_tokens, res);
    }
    std::unique_ptr<httplib::Client> up = pool_.take();
    httplib::Result got = up->Post("/v1/chat/completions", pool_.headers(),
                                   req.body, "application/json");
    if (!got) {
      // Nothing was served: the whole call goes back.
      r->release();
      return reply_json(res, 502, "upstream unreachable", "upstream_error",
                        "upstream_error");
    }
    const int status = got->status;
    httplib::Headers up_headers = std::move(got->headers);
    std::string answer = std::move(got->body);
    pool_.put(std::move(up));
    finish_json(*r, status, up_headers, std::move(answer), max_tokens, res);
  }

  void metrics(const httplib::Request&, httplib::Response& res) {
    std::vector<std::pair<std::string, rk::Limit*>> all = tiers_.all_limits();
    all.insert(all.begin(), {"", ip_limit_.get()});
    for (rk::Limit* b : acct_.budgets()) all.emplace_back("budget", b);
    res.set_content(rk::prometheus_text(all), "text/plain; version=0.0.4");
  }

  // GET /v1/budget: the caller's team budget today.
  void budget(const httplib::Request& req, httplib::Response& res) {
    const std::string auth = req.get_header_value("Authorization");
    constexpr std::string_view kBearer = "Bearer ";
    const auto acct = auth.rfind(kBearer, 0) == 0
                          ? accounts_.find(auth.substr(kBearer.size()))
                          : accounts_.end();
    if (acct == accounts_.end()) {
      return reply_json(res, 401, "unknown API key", "invalid_request_error",
                        "invalid_api_key");
    }
    const rk::Subject who{.team = acct->second.team};
    absl::StatusOr<rk::Forecast> f = acct_.forecast(kBudgetName, who);
    if (!f.ok()) {
      return reply_json(res, 500, std::string(f.status().message()),
                        "server_error", "server_error");
    }
    const json out = {{"team", acct->second.team},
                      {"budget", kBudgetName},
                      {"spent_nano_usd", f->spent},
                      {"limit_nano_usd", f->limit}};
    res.set_content(out.dump(), "application/json");
  }

 private:
  static void refuse(httplib::Response& res, const rk::ChainDecision& d) {
    send(res, rk::http::refusal_response(d, kAnswers));
  }

  // Settles a call to its answer: the reported usage, or (none readable)
  // the worst case; an answer other than 2xx gives everything back.
  // A partial usage (a stream cut short) settles at the reported input
  // and the worst-case output, never as final.
  static void settle(rk::Reservation<Clock>& r, int status,
                     const std::optional<rk::Usage>& reported,
                     std::uint64_t max_output) {
    if (status < 200 || status > 299) {
      r.release();  // not served: the provider does not bill it
      return;
    }
    if (reported && r.settle(*reported).ok()) return;
    // No usage (or one that does not hold together): the worst case.
    r.settle_without_usage(max_output).IgnoreError();
  }

  static void finish_json(rk::Reservation<Clock>& r, int status,
                          const httplib::Headers& up_headers,
                          std::string answer, std::uint64_t max_output,
                          httplib::Response& res) {
    std::optional<rk::Usage> reported;
    if (status >= 200 && status <= 299) {
      absl::StatusOr<rk::OpenAIChatUsage> u =
          rk::read_openai_chat_usage(answer);
      absl::StatusOr<rk::Usage> n =
          u.ok() ? rk::normalize(*u) : absl::StatusOr<rk::Usage>(u.status());
      if (n.ok()) reported = *n;
    }
    settle(r, status, reported, max_output);
    forward_headers(up_headers, res);
    res.status = status;
    std::string type = "application/json";
    for (const auto& [name, value] : up_headers) {
      if (iequals(name, "content-type")) type = value;
    }
    res.set_content(std::move(answer), type.c_str());
  }

  // A stream: a thread reads the upstream; this thread waits for its
  // status line and headers, then answers: a 2xx event stream is passed
  // through chunk by chunk (chunked transfer encoding), anything else is
  // read whole and answered as a JSON call is.
  void chat_stream(std::string upstream_body, rk::Reservation<Clock> r,
                   std::uint64_t max_output, httplib::Response& res) {
    auto call = std::make_shared<StreamCall>();
    call->reservation.emplace(std::move(r));
    call->max_output = max_output;
    call->client = pool_.take();
    httplib::Request q;
    q.method = "POST";
    q.path = "/v1/chat/completions";
    q.headers = pool_.headers();
    q.headers.emplace("Content-Type", "application/json");
    q.body = std::move(upstream_body);
    call->reader = std::thread([call, q = std::move(q)]() mutable {
      StreamCall& c = *call;
      q.response_handler = [&c](const httplib::Response& head) {
        std::lock_guard<std::mutex> lock(c.mu);
        c.status = head.status;
        c.headers = head.headers;
        c.have_headers = true;
        c.cv.notify_all();
        return true;
      };
      q.content_receiver = [&c](const char* data, std::size_t len,
                                std::uint64_t, std::uint64_t) {
        if (c.cancel.load(std::memory_order_relaxed)) return false;
        std::lock_guard<std::mutex> lock(c.mu);
        c.chunks.emplace_back(data, len);
        c.cv.notify_all();
        return true;
      };
      const httplib::Result got = c.client->send(q);
      std::lock_guard<std::mutex> lock(c.mu);
      c.failed = !got;
      c.done = true;
      c.cv.notify_all();
    });

    int status = 0;
    bool have_headers = false;
    {
      std::unique_lock<std::mutex> lock(call->mu);
      call->cv.wait(lock, [&] { return call->have_headers || call->done; });
      status = call->status;
      have_headers = call->have_headers;
    }
    std::string type;
    for (const auto& [name, value] : call->headers) {
      if (iequals(name, "content-type")) type = value;
    }
    const bool sse = have_headers && status >= 200 && status <= 299 &&
                     istarts_with(type, "text/event-stream");
    if (!sse) {
      std::string answer = call->drain();
      bool failed = false;
      {
        std::lock_guard<std::mutex> lock(call->mu);
        failed = call->failed;
      }
      end_reader(*call);
      if (!have_headers || failed) {
        call->reservation->release();
        return reply_json(res, 502, "upstream unreachable", "upstream_error",
                          "upstream_error");
      }
      return finish_json(*call->reservation, status, call->headers,
                         std::move(answer), max_output, res);
    }
    forward_headers(call->headers, res);
    res.status = status;
    res.set_chunked_content_provider(
        type,
        [call](std::size_t, httplib::DataSink& sink) {
          std::deque<std::string> got;
          bool done = false, failed = false;
          {
            std::unique_lock<std::mutex> lock(call->mu);
            // Wake up now and then to notice a client that went away while
            // the upstream is quiet.
            while (call->chunks.empty() && !call->done) {
              call->cv.wait_for(lock, std::chrono::milliseconds(500));
              if (call->chunks.empty() && !call->done && !sink.is_writable()) {
                return false;
              }
            }
            got.swap(call->chunks);
            done = call->done;
            failed = call->failed;
          }
          for (const std::string& c : got) {
            call->usage.feed(c);
            if (!sink.write(c.data(), c.size())) return false;
          }
          if (!done) return true;
          // Settled before the client sees the end of the stream.
          settle_stream(*call, failed);
          if (failed) return false;  // cut short: the client sees it cut
          sink.done();
          return true;
        },
        [this, call](bool) {
          // The client went away (or the stream ended): stop reading the
          // upstream, settle what was not settled, and keep the connection
          // if its answer was read whole.
          bool done = false;
          {
            std::lock_guard<std::mutex> lock(call->mu);
            done = call->done;
          }
          if (!done) {
            call->cancel.store(true, std::memory_order_relaxed);
            call->client->stop();
          }
          settle_stream(*call, true);
          end_reader(*call);
        });
  }

  // Settles a streamed call once: to the usage of its final chunk, or (cut
  // short, or no usage) to the reservation's worst case.
  static void settle_stream(StreamCall& c, bool cut) {
    if (c.settled) return;
    c.settled = true;
    const rk::StreamUsageResult& read = c.usage.finish();
    if (cut && !read.usage) {
      // The provider billed what it generated before the cut: count the
      // worst case, as no usage says otherwise.
      c.reservation->cancel_after_dispatch(c.max_output).IgnoreError();
      return;
    }
    settle(*c.reservation, c.status, read.usage, c.max_output);
  }

  // Joins the upstream reader; its connection goes back to the pool if the
  // answer was read whole.
  void end_reader(StreamCall& c) {
    if (c.reader.joinable()) c.reader.join();
    bool reusable = false;
    {
      std::lock_guard<std::mutex> lock(c.mu);
      reusable =
          c.done && !c.failed && !c.cancel.load(std::memory_order_relaxed);
    }
    if (reusable && c.client) pool_.put(std::move(c.client));
  }

  rk::TrustedProxies proxies_;
  absl::flat_hash_map<std::string, Account> accounts_;
  std::unique_ptr<rk::PolicyLimit<rk::SlidingWindow>> ip_limit_;
  rk::TierTable<Clock> tiers_;
  rk::Accountant<Clock> acct_;
  UpstreamPool pool_;
  std::atomic<std::uint64_t> next_id_{1};
  std::string error_;
};

httplib::Server* g_server = nullptr;

extern "C" void on_signal(int) {
  if (g_server != nullptr) g_server->stop();
}

// A server with TCP_NODELAY (without it, Nagle's algorithm and delayed
// ACKs hold each small answer ~40 ms), keep-alive without a cap on the
// calls per connection (httplib's default closes it after 5), `threads`
// workers (each keep-alive connection holds one while it is open).
void tune(httplib::Server& s, int threads, bool nodelay) {
  s.set_tcp_nodelay(nodelay);
  s.set_keep_alive_max_count(1'000'000);
  s.new_task_queue = [threads] {
    return new httplib::ThreadPool(static_cast<std::size_t>(threads));
  };
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  if (!parse_args(argc, argv, o)) return 2;
  std::vector<std::string_view> cidrs(o.trusted.begin(), o.trusted.end());
  absl::StatusOr<rk::TrustedProxies> proxies =
      rk::TrustedProxies::create(std::span<const std::string_view>(cidrs));
  if (!proxies.ok()) return refuse_to_start(proxies.status());
  absl::StatusOr<std::string> config_text =
      text_of(o.config_file, kDefaultConfig);
  if (!config_text.ok()) return refuse_to_start(config_text.status());
  absl::StatusOr<Config> config = parse_config(*config_text);
  if (config.ok() && !o.team_budget_usd.empty()) {
    absl::StatusOr<std::uint64_t> nanos = usd_to_nanos(o.team_budget_usd);
    if (nanos.ok()) {
      config->team_budget_nanos = *nanos;
    } else {
      config = nanos.status();
    }
  }
  if (!config.ok()) return refuse_to_start(config.status());
  absl::StatusOr<std::string> prices_text =
      text_of(o.prices_file, kDefaultPrices);
  if (!prices_text.ok()) return refuse_to_start(prices_text.status());
  absl::StatusOr<rk::PriceCatalogue> catalogue =
      rk::load_price_catalogue(*prices_text);
  if (!catalogue.ok()) return refuse_to_start(catalogue.status());
  // What the file could not price is reported, model by model; the rest is
  // served.
  for (const rk::CatalogueIssue& i : catalogue->issues) {
    if (i.kind == rk::CatalogueIssue::Kind::kRejected) {
      std::fprintf(stderr, "http_gateway: price file: %s\n",
                   i.to_string().c_str());
    }
  }
  rk::PriceTable prices = std::move(catalogue->table);

  // The upstream: the stub on a free loopback port, or the one given.
  httplib::Server stub;
  std::thread stub_thread;
  std::string up_host = "127.0.0.1";
  int up_port = 0;
  if (o.upstream.empty()) {
    serve_stub(stub);
    tune(stub, o.threads, true);
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

  Gateway gw(o, *std::move(config), *std::move(proxies), std::move(prices),
             up_host, up_port);
  if (!gw.error().empty()) {
    std::fprintf(stderr, "http_gateway: %s\n", gw.error().c_str());
    stub.stop();
    if (stub_thread.joinable()) stub_thread.join();
    return 2;
  }
  httplib::Server server;
  tune(server, o.threads, o.tcp_nodelay);
  server.Post(
      "/v1/chat/completions",
      [&](const httplib::Request& q, httplib::Response& r) { gw.chat(q, r); });
  server.Get("/metrics", [&](const httplib::Request& q, httplib::Response& r) {
    gw.metrics(q, r);
  });
  server.Get("/v1/budget", [&](const httplib::Request& q,
                               httplib::Response& r) { gw.budget(q, r); });
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
  // The stub's workers wait on idle keep-alive connections: close them.
  gw.close_upstream();
  stub.stop();
  if (stub_thread.joinable()) stub_thread.join();
  return 0;
}
