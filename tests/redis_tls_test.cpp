// TLS through a local stunnel4 tunnel (issue 16; docs/redis.md "TLS"):
// Debian 12's hiredis 0.14 speaks no TLS, so the client talks plain TCP to
// a tunnel on loopback that speaks TLS to redis-server's --tls-port. The
// test makes a throwaway CA and server certificate with openssl, starts
// redis-server with TLS only (--port 0: no plain port at all) and stunnel4
// in the foreground, and kills both at the end. It fails (never skips) when
// stunnel4 or openssl is missing: scripts/install-deps.sh --test installs
// them. The tunnel's configuration is docs/redis.md's recipe, read from
// the docs and run as it stands, with the test's addresses, CA and host name
// in its accept, connect, CAfile and checkHost lines.
#include <arpa/inet.h>
#include <fcntl.h>
#include <hiredis/hiredis.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "ratekeeper/store/redis.hpp"

using namespace ratekeeper;
using namespace std::chrono_literals;

namespace {

constexpr const char* kPw = "tls-Secret-5e1d";
const Nanos kFrozen{1'796'083'200'000'000'000};  // 2026-12-01 UTC

// Runs `cmd` with /bin/sh; its exit status.
int shell(const std::string& cmd) { return std::system(cmd.c_str()); }

void require_tools() {
  INFO("stunnel4 and openssl are needed: scripts/install-deps.sh");
  REQUIRE(shell("command -v stunnel4 >/dev/null 2>&1") == 0);
  REQUIRE(shell("command -v openssl >/dev/null 2>&1") == 0);
}

// A directory of the test's own, removed at the end.
struct TempDir {
  std::string path;
  TempDir() {
    char tmpl[] = "/tmp/rk_tls_XXXXXX";
    REQUIRE(mkdtemp(tmpl) != nullptr);
    path = tmpl;
  }
  ~TempDir() { static_cast<void>(shell("rm -rf " + path)); }
};

std::string slurp(const std::string& file) {
  std::ifstream in(file);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// A CA (`name`.crt, `name`.key) in `dir`; with `server`, a certificate
// for localhost / 127.0.0.1 signed by it (server.crt, server.key).
void make_ca(const std::string& dir, const std::string& name, bool server) {
  const std::string q = " >>" + dir + "/openssl.log 2>&1";
  const std::string ec = " -newkey ec -pkeyopt ec_paramgen_curve:prime256v1";
  INFO(slurp(dir + "/openssl.log"));
  REQUIRE(shell("cd " + dir + " && openssl req -x509" + ec +
                " -nodes -keyout " + name + ".key -out " + name +
                ".crt -days 2 -subj /CN=" + name + q) == 0);
  if (!server) return;
  REQUIRE(shell("cd " + dir + " && openssl req" + ec +
                " -nodes -keyout server.key -out server.csr -subj "
                "/CN=localhost" +
                q) == 0);
  std::ofstream(dir + "/ext.cnf")
      << "subjectAltName=DNS:localhost,IP:127.0.0.1\n";
  REQUIRE(shell("cd " + dir + " && openssl x509 -req -in server.csr -CA " +
                name + ".crt -CAkey " + name +
                ".key -CAcreateserial -out server.crt -days 2 -extfile "
                "ext.cnf" +
                q) == 0);
}

// A child process, its output in `log`; SIGTERM and reaped at the end.
class Child {
 public:
  Child(std::vector<std::string> argv, std::string log, std::string dir = {})
      : log_(std::move(log)) {
    pid_ = fork();
    REQUIRE(pid_ >= 0);
    if (pid_ == 0) {
      const int fd = open(log_.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
      if (fd >= 0) {
        dup2(fd, 1);
        dup2(fd, 2);
      }
      if (!dir.empty() && chdir(dir.c_str()) != 0) _exit(126);
      std::vector<char*> args;
      for (auto& a : argv) args.push_back(a.data());
      args.push_back(nullptr);
      execvp(args[0], args.data());
      _exit(127);
    }
  }
  ~Child() { stop(); }
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;

  void stop() {
    if (pid_ <= 0) return;
    ::kill(pid_, SIGTERM);
    int status = 0;
    waitpid(pid_, &status, 0);
    pid_ = -1;
  }
  bool alive() {
    if (pid_ <= 0) return false;
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      return false;
    }
    return true;
  }
  const std::string& log() const { return log_; }

 private:
  std::string log_;
  pid_t pid_ = -1;
};

bool accepts(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(static_cast<std::uint16_t>(port));
  const bool ok =
      fd >= 0 && connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0;
  if (fd >= 0) close(fd);
  return ok;
}

// Waits (10 s at most) until `port` accepts connections, failing with the
// child's log if it died first.
void wait_port(Child& c, int port) {
  const auto deadline = std::chrono::steady_clock::now() + 10s;
  while (!accepts(port)) {
    INFO(c.log() << ":\n" << slurp(c.log()));
    REQUIRE(c.alive());
    REQUIRE(std::chrono::steady_clock::now() < deadline);
    std::this_thread::sleep_for(10ms);
  }
}

// A free loopback port; for a cluster node, one whose bus port (+10000) is
// free too.
int free_port(bool cluster = false) {
  static std::mt19937 rng(
      static_cast<unsigned>(getpid()) ^
      static_cast<unsigned>(
          std::chrono::steady_clock::now().time_since_epoch().count()));
  const auto is_free = [](int p) {
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(static_cast<std::uint16_t>(p));
    const bool ok =
        fd >= 0 && bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0;
    if (fd >= 0) close(fd);
    return ok;
  };
  for (int attempt = 0; attempt < 1000; ++attempt) {
    const int p = 20000 + static_cast<int>(rng() % 30000);
    if (is_free(p) && (!cluster || is_free(p + 10000))) return p;
  }
  FAIL("no free loopback port");
  return 0;
}

// redis-server with TLS only, on `port`, certificates from `dir`.
std::unique_ptr<Child> tls_redis(const std::string& dir, int port,
                                 std::vector<std::string> extra = {}) {
  std::vector<std::string> argv = {"redis-server",
                                   "--port",
                                   "0",
                                   "--tls-port",
                                   std::to_string(port),
                                   "--bind",
                                   "127.0.0.1",
                                   "--tls-cert-file",
                                   dir + "/server.crt",
                                   "--tls-key-file",
                                   dir + "/server.key",
                                   "--tls-ca-cert-file",
                                   dir + "/ca.crt",
                                   "--tls-auth-clients",
                                   "no",
                                   "--save",
                                   "",
                                   "--appendonly",
                                   "no",
                                   "--requirepass",
                                   kPw,
                                   "--masterauth",
                                   kPw,
                                   "--loglevel",
                                   "warning"};
  argv.insert(argv.end(), extra.begin(), extra.end());
  auto c = std::make_unique<Child>(
      argv, dir + "/redis-" + std::to_string(port) + ".log", dir);
  wait_port(*c, port);
  return c;
}

// docs/redis.md's stunnel configuration: the lines of the first ```ini
// block after "## TLS".
std::vector<std::string> recipe_lines() {
  std::ifstream in(std::string(RK_SOURCE_DIR) + "/docs/redis.md");
  REQUIRE(in.good());
  std::vector<std::string> out;
  std::string line;
  bool in_tls = false, in_block = false;
  while (std::getline(in, line)) {
    if (!in_tls) {
      in_tls = line == "## TLS";
    } else if (!in_block) {
      if (line.rfind("## ", 0) == 0) break;  // the section ended first
      in_block = line == "```ini";
    } else if (line.rfind("```", 0) == 0) {
      return out;
    } else {
      out.push_back(line);
    }
  }
  FAIL("docs/redis.md: no ```ini block under \"## TLS\"");
  return out;
}

// stunnel4 in client mode, in the foreground: plain TCP on loopback port
// `accept`, TLS to `connect` verified against `ca` (chain and host name):
// the docs' recipe with these four values put in.
std::unique_ptr<Child> tunnel(const std::string& dir, int accept, int connect,
                              const std::string& ca) {
  const std::string conf = dir + "/stunnel-" + std::to_string(accept) + ".conf";
  const std::map<std::string, std::string> mine = {
      {"accept", "127.0.0.1:" + std::to_string(accept)},
      {"connect", "127.0.0.1:" + std::to_string(connect)},
      {"CAfile", ca},
      {"checkHost", "localhost"}};
  std::set<std::string> put;
  {
    std::ofstream f(conf);
    for (const std::string& line : recipe_lines()) {
      const std::size_t eq = line.find(" = ");
      const auto it = eq == std::string::npos || line.rfind(";", 0) == 0
                          ? mine.end()
                          : mine.find(line.substr(0, eq));
      if (it == mine.end()) {
        f << line << "\n";
      } else {
        f << it->first << " = " << it->second << "\n";
        put.insert(it->first);
      }
    }
  }
  INFO("the recipe's accept, connect, CAfile and checkHost lines");
  REQUIRE(put.size() == mine.size());
  auto c = std::make_unique<Child>(
      std::vector<std::string>{"stunnel4", conf},
      dir + "/stunnel-" + std::to_string(accept) + ".log");
  wait_port(*c, accept);
  return c;
}

RedisOptions through(int port) {
  RedisOptions o;
  o.port = port;
  o.prefix = "rktls:";
  o.connect_timeout = 5s;
  o.command_timeout = 5s;
  o.password = kPw;
  return o;
}

std::unique_ptr<RedisLimit<FixedWindow>> fixed(
    const std::shared_ptr<RedisClient>& c, std::uint64_t per_min,
    FailMode fail) {
  return RedisLimit<FixedWindow>::create(
             {.name = "rpm"}, FixedWindow::create(per_minute(per_min)).value(),
             c, {.fail = fail, .test_time = true})
      .value();
}

// One command (`line`, split at spaces) on a raw hiredis connection
// through tunnel `port`, as the default user: the reply as text (an
// integer in decimal, an error as "ERROR: ...").
std::string raw(int port, const std::string& line) {
  redisContext* c = redisConnectWithTimeout("127.0.0.1", port, timeval{5, 0});
  REQUIRE(c != nullptr);
  REQUIRE(c->err == 0);
  auto* a = static_cast<redisReply*>(redisCommand(c, "AUTH %s", kPw));
  REQUIRE(a != nullptr);
  freeReplyObject(a);
  std::vector<std::string> words;
  std::istringstream in(line);
  for (std::string w; in >> w;) words.push_back(w);
  std::vector<const char*> p;
  std::vector<std::size_t> l;
  for (const auto& w : words) {
    p.push_back(w.data());
    l.push_back(w.size());
  }
  auto* r = static_cast<redisReply*>(
      redisCommandArgv(c, static_cast<int>(words.size()), p.data(), l.data()));
  REQUIRE(r != nullptr);
  std::string out;
  if (r->type == REDIS_REPLY_INTEGER) {
    out = std::to_string(r->integer);
  } else if (r->type == REDIS_REPLY_ERROR) {
    out = "ERROR: " + std::string(r->str, r->len);
  } else if (r->str != nullptr) {
    out.assign(r->str, r->len);
  }
  freeReplyObject(r);
  redisFree(c);
  return out;
}

}  // namespace

TEST_CASE(
    "[i16] TLS through stunnel4: decisions and AUTH over the tunnel; a "
    "tunnel that cannot verify the server never admits",
    "[redis][i16][tls]") {
  require_tools();
  TempDir dir;
  make_ca(dir.path, "ca", true);
  make_ca(dir.path, "wrong_ca", false);
  const int tls_port = free_port();
  auto redis = tls_redis(dir.path, tls_port);
  const int good_port = free_port();
  auto good = tunnel(dir.path, good_port, tls_port, dir.path + "/ca.crt");

  SECTION("through the tunnel: AUTH, exact decisions, a chain, a batch") {
    auto client = RedisClient::create(through(good_port));
    INFO(client.status());
    REQUIRE(client.ok());
    auto rpm = fixed(*client, 5, FailMode::kOpen);
    int admitted = 0;
    for (int i = 0; i < 8; ++i) {
      admitted += rpm->acquire("u", 1, kFrozen).allowed;
    }
    CHECK(admitted == 5);  // Redis counted: the only way in is TLS
    std::vector<RedisLimit<FixedWindow>::Request> batch(7, {"v", 1});
    int batched = 0;
    for (const Decision& d : rpm->acquire_batch(batch, kFrozen)) {
      batched += d.allowed;
    }
    CHECK(batched == 5);
    RedisChain chain(*client);
    const ChainItem items[] = {{rpm.get(), "w", 1}};
    int chains = 0;
    for (int i = 0; i < 6; ++i) {
      chains += chain.acquire("team", items, kFrozen).allowed;
    }
    CHECK(chains == 5);
    CHECK(rpm->fallbacks() == 0);
    CHECK(rpm->auth_failures() == 0);
    CHECK(raw(good_port, "DBSIZE") == "3");
    // A wrong password through the tunnel: refused as such, not "down".
    RedisOptions wrong = through(good_port);
    wrong.password = "wrong-Secret";
    CHECK(RedisClient::create(wrong).status().code() ==
          absl::StatusCode::kUnauthenticated);
  }
  SECTION("the wrong CA: create() fails with kUnavailable; kClosed refuses") {
    const int bad_port = free_port();
    auto bad = tunnel(dir.path, bad_port, tls_port, dir.path + "/wrong_ca.crt");
    const auto c = RedisClient::create(through(bad_port));
    INFO(c.status());
    REQUIRE(!c.ok());
    CHECK(c.status().code() == absl::StatusCode::kUnavailable);
    // Started anyway: every call is the fail mode's, counted; nothing
    // reached Redis.
    RedisOptions o = through(bad_port);
    o.start_unreachable = true;
    auto lenient = RedisClient::create(o).value();
    auto rpm = fixed(lenient, 1'000, FailMode::kClosed);
    for (int i = 0; i < 5; ++i) CHECK_FALSE(rpm->acquire("u", 1, kFrozen));
    CHECK(rpm->fallbacks() == 5);
    CHECK(raw(good_port, "DBSIZE") == "0");
    // stunnel says why.
    bad->stop();
    CHECK(slurp(bad->log()).find("certificate verify failed") !=
          std::string::npos);
  }
  SECTION("plain TCP to the TLS port is no connection (never admits)") {
    RedisOptions o = through(tls_port);
    o.connect_timeout = 1s;
    o.command_timeout = 1s;
    const auto c = RedisClient::create(o);
    REQUIRE(!c.ok());
    CHECK(c.status().code() == absl::StatusCode::kUnavailable);
  }
}

TEST_CASE(
    "[i16] a TLS Cluster through one tunnel per node: address_map "
    "routes the nodes CLUSTER SLOTS names to their tunnels",
    "[redis][i16][tls]") {
  require_tools();
  TempDir dir;
  make_ca(dir.path, "ca", true);
  std::vector<int> ports, tunnel_ports;
  std::vector<std::unique_ptr<Child>> nodes, tunnels;
  for (std::size_t i = 0; i < 3; ++i) {
    ports.push_back(free_port(true));
    const std::string d = dir.path + "/" + std::to_string(i);
    REQUIRE(shell("mkdir -p " + d) == 0);
    nodes.push_back(
        tls_redis(dir.path, ports.back(),
                  {"--tls-cluster", "yes", "--cluster-enabled", "yes", "--dir",
                   d, "--cluster-config-file", "nodes.conf",
                   "--cluster-node-timeout", "3000"}));
    tunnel_ports.push_back(free_port());
    tunnels.push_back(tunnel(dir.path, tunnel_ports.back(), ports.back(),
                             dir.path + "/ca.crt"));
  }
  // Slots and MEETs through the tunnels (the bus itself speaks TLS).
  {
    auto admin = [&](std::size_t i, const std::string& line) {
      return raw(tunnel_ports[i], line);
    };
    const int ranges[3][2] = {{0, 5460}, {5461, 10922}, {10923, 16383}};
    for (std::size_t i = 0; i < 3; ++i) {
      REQUIRE(admin(i, "CLUSTER ADDSLOTSRANGE " + std::to_string(ranges[i][0]) +
                           " " + std::to_string(ranges[i][1])) == "OK");
    }
    for (std::size_t i = 1; i < 3; ++i) {
      REQUIRE(admin(0, "CLUSTER MEET 127.0.0.1 " + std::to_string(ports[i])) ==
              "OK");
    }
    const auto deadline = std::chrono::steady_clock::now() + 30s;
    for (;;) {
      bool ok = true;
      for (std::size_t i = 0; i < 3 && ok; ++i) {
        ok = admin(i, "CLUSTER INFO").find("cluster_state:ok") !=
             std::string::npos;
      }
      if (ok) break;
      REQUIRE(std::chrono::steady_clock::now() < deadline);
      std::this_thread::sleep_for(50ms);
    }
  }
  RedisOptions o = through(tunnel_ports[0]);
  o.cluster = true;
  for (std::size_t i = 0; i < 3; ++i) {
    o.address_map["127.0.0.1:" + std::to_string(ports[i])] =
        "127.0.0.1:" + std::to_string(tunnel_ports[i]);
  }
  auto client = RedisClient::create(o);
  INFO(client.status());
  REQUIRE(client.ok());
  auto rpm = fixed(*client, 3, FailMode::kOpen);
  std::set<std::string> owners;
  int admitted = 0;
  for (int k = 0; k < 60; ++k) {
    const std::string key = "user-" + std::to_string(k);
    for (int i = 0; i < 4; ++i)
      admitted += rpm->acquire(key, 1, kFrozen).allowed;
    owners.insert((*client)->node_of(redis_key("rktls:", "rpm", {}, key)));
  }
  CHECK(admitted == 60 * 3);  // exact: every call decided in Redis
  CHECK(rpm->fallbacks() == 0);
  CHECK(owners.size() == 3);  // named as CLUSTER SLOTS names them
  for (std::size_t i = 0; i < 3; ++i) {
    CHECK(owners.count("127.0.0.1:" + std::to_string(ports[i])) == 1);
  }
  long long keys = 0;
  for (std::size_t i = 0; i < 3; ++i) {
    const long long n = std::stoll(raw(tunnel_ports[i], "DBSIZE"));
    CHECK(n > 0);
    keys += n;
  }
  CHECK(keys == 60);

  // The control: without the map the client dials the TLS ports in plain
  // TCP: the other nodes' keys get no answer (the fail mode's, counted).
  RedisOptions no_map = o;
  no_map.address_map.clear();
  no_map.start_unreachable = true;  // its probe may meet such a node
  auto unmapped = RedisClient::create(no_map).value();
  auto closed =
      RedisLimit<FixedWindow>::create(
          {.name = "other"}, FixedWindow::create(per_minute(1'000)).value(),
          unmapped, {.fail = FailMode::kClosed, .test_time = true})
          .value();
  int refused = 0;
  for (int k = 0; k < 30; ++k) {
    refused +=
        !closed->acquire("user-" + std::to_string(k), 1, kFrozen).allowed;
  }
  CHECK(refused > 0);
  CHECK(closed->fallbacks() == static_cast<std::uint64_t>(refused));
}
