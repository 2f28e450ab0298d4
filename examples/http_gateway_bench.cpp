// http_gateway_bench: the gateway's figures for `make bench`
// (docs/benchmarks.md), over loopback, against a fake upstream that answers
// at once (tests/http_gateway_harness.hpp):
//
//   - requests/s and p50/p99 latency with 8 keep-alive clients, as built,
//     and with TCP_NODELAY off or the upstream pool off (what each saves);
//   - chunk latency: from the upstream handing an SSE chunk to its socket
//     to the client receiving it through the gateway.
//
//   http_gateway_bench [--calls N] [--md FILE]
//
// The limits are far from binding: this measures the gateway's path, not
// refusals (tests/http_gateway_load_test.cpp checks those under load).
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "http_gateway_harness.hpp"

namespace {

constexpr int kClients = 8;
constexpr int kUsers = 64;

std::string bench_config() {
  const std::string accounts = rk_gw::accounts_json(kUsers, "pro");
  return R"({"tiers": {"pro": [
      {"name": "rpm", "scope": "user", "policy": "sliding_window",
       "limit": 100000000, "per_seconds": 60},
      {"name": "tpm", "unit": "tokens", "scope": "user",
       "policy": "token_bucket", "limit": 100000000000, "per_seconds": 60},
      {"name": "tpd", "unit": "tokens", "scope": "team",
       "policy": "fixed_window", "limit": 1000000000000,
       "per_seconds": 86400}]},
    "accounts": {)" +
         accounts + R"(}, "team_budget_usd": "1000000"})";
}

struct Figures {
  std::string name;
  int calls = 0;
  int ok = 0;
  double rps = 0, p50 = 0, p99 = 0;
};

Figures measure(const std::string& name, const std::vector<std::string>& extra,
                int per_client, const std::string& config,
                const std::string& accept_encoding = "identity",
                int clients = kClients) {
  rk_gw::FakeUpstream up;
  std::vector<std::string> args = {"--upstream", up.address(), "--ip-rpm",
                                   "1000000000", "--config",   config};
  args.insert(args.end(), extra.begin(), extra.end());
  rk_gw::GatewayProcess gw(RK_HTTP_GATEWAY, args);
  std::vector<std::string> keys;
  for (int u = 0; u < kUsers; ++u) keys.push_back("sk-u" + std::to_string(u));
  const std::string body = rk_gw::body_with_estimate(72, "gpt-4o-mini", false);
  // Warm up: connections open, shards and caches touched.
  rk_gw::run_load(gw, clients, std::max(5, per_client / 10), keys, body,
                  nullptr, accept_encoding);
  double wall = 0;
  const std::vector<rk_gw::Answer> a = rk_gw::run_load(
      gw, clients, per_client, keys, body, &wall, accept_encoding);
  Figures f;
  f.name = name;
  f.calls = static_cast<int>(a.size());
  std::vector<double> lat;
  for (const rk_gw::Answer& x : a) {
    f.ok += x.status == 200;
    lat.push_back(x.latency_ms);
  }
  f.rps = static_cast<double>(a.size()) / wall;
  f.p50 = rk_gw::percentile(lat, 0.50);
  f.p99 = rk_gw::percentile(lat, 0.99);
  return f;
}

}  // namespace

int main(int argc, char** argv) {
  int per_client = 2000;
  std::string md;
  for (int i = 1; i < argc; ++i) {
    const std::string_view a = argv[i];
    if (a == "--calls" && i + 1 < argc) {
      per_client = std::max(10, std::atoi(argv[++i]) / kClients);
    } else if (a == "--md" && i + 1 < argc) {
      md = argv[++i];
    } else {
      std::fprintf(stderr,
                   "usage: http_gateway_bench [--calls N] [--md FILE]\n");
      return 2;
    }
  }
  try {
    rk_gw::TempDir dir;
    const std::string config = dir.write("config.json", bench_config());
    std::vector<Figures> rows;
    rows.push_back(measure("as built (TCP_NODELAY, upstream pool)", {},
                           per_client, config));
    rows.push_back(
        measure("as built, clients ask for br/gzip (answers "
                "compressed)",
                {}, per_client, config, ""));
    rows.push_back(measure("one client, one call at a time", {}, per_client,
                           config, "identity", 1));
    rows.push_back(measure("upstream pool off (a connection per call)",
                           {"--no-upstream-keep-alive"}, per_client / 4,
                           config));
    rows.push_back(measure("TCP_NODELAY off in the gateway (both hops)",
                           {"--no-tcp-nodelay"}, 25, config));

    // Chunk latency: 20 streams of 20 chunks, 10 ms apart.
    std::vector<double> chunk_ms;
    {
      rk_gw::FakeUpstream up;
      rk_gw::GatewayProcess gw(RK_HTTP_GATEWAY,
                               {"--upstream", up.address(), "--ip-rpm",
                                "1000000000", "--config", config});
      rk_gw::Script s;
      s.chunks = 20;
      s.delay = std::chrono::milliseconds(10);
      up.set(s);
      auto c = gw.client();
      const std::string body =
          rk_gw::body_with_estimate(72, "gpt-4o-mini", true);
      for (int k = 0; k < 20; ++k) {
        const rk_gw::Streamed got =
            rk_gw::stream_chat(*c, {{"Authorization", "Bearer sk-u0"}}, body);
        const std::vector<rk_gw::SteadyTime> sent = up.sent();
        if (!got.ok || got.status != 200 || got.received.size() != 20 ||
            sent.size() < 20) {
          std::fprintf(stderr, "http_gateway_bench: a stream failed\n");
          return 1;
        }
        for (std::size_t i = 0; i < 20; ++i) {
          chunk_ms.push_back(std::chrono::duration<double, std::milli>(
                                 got.received[i] - sent[i])
                                 .count());
        }
      }
    }
    std::ostringstream out;
    out << "| gateway (" << kClients
        << " keep-alive clients unless said) | calls | 200s | requests/s | "
           "p50 ms | p99 ms |\n|---|---:|---:|---:|---:|---:|\n";
    for (const Figures& f : rows) {
      char line[256];
      std::snprintf(line, sizeof(line),
                    "| %s | %d | %d | %.0f | %.3f | %.3f |\n", f.name.c_str(),
                    f.calls, f.ok, f.rps, f.p50, f.p99);
      out << line;
    }
    char line[256];
    std::snprintf(
        line, sizeof(line),
        "\nSSE chunk latency, upstream socket to client (%zu chunks): "
        "p50 %.3f ms, p99 %.3f ms, max %.3f ms\n",
        chunk_ms.size(), rk_gw::percentile(chunk_ms, 0.5),
        rk_gw::percentile(chunk_ms, 0.99), rk_gw::percentile(chunk_ms, 1.0));
    out << line;
    std::fputs(out.str().c_str(), stdout);
    if (!md.empty()) std::ofstream(md) << out.str();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "http_gateway_bench: %s\n", e.what());
    return 1;
  }
  return 0;
}
