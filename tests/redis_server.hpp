// A redis-server of a test's own, on a free loopback port: started empty (no
// persistence), stopped at the end. Tests that need Redis use it, so ctest
// needs nothing running beforehand.
#ifndef RATEKEEPER_TESTS_REDIS_SERVER_HPP_
#define RATEKEEPER_TESTS_REDIS_SERVER_HPP_

#include <arpa/inet.h>
#include <fcntl.h>
#include <hiredis/hiredis.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace rk_test {

class RedisServer {
 public:
  // Starts redis-server on a free port; throws std::runtime_error (with
  // what to install) when it cannot.
  explicit RedisServer(std::vector<std::string> extra = {})
      : extra_(std::move(extra)), port_(pick_port(extra_)) {
    // A port found free can be taken before redis-server binds it (tests
    // run in parallel; a cluster node needs its bus port too): a server
    // that exits at once is started again on another port, a few times.
    for (int attempt = 1;; ++attempt) {
      try {
        start();
        return;
      } catch (const std::runtime_error&) {
        if (attempt == 5) throw;
        port_ = pick_port(extra_);
      }
    }
  }
  ~RedisServer() { stop(SIGTERM); }
  RedisServer(const RedisServer&) = delete;
  RedisServer& operator=(const RedisServer&) = delete;

  int port() const { return port_; }

  // (Re)starts it on the same port, empty; waits until it answers PING.
  void start() {
    if (pid_ > 0) return;
    const std::string port = std::to_string(port_);
    std::vector<std::string> args = {
        "redis-server", "--port",     port,     "--bind",
        "127.0.0.1",    "--save",     "",       "--appendonly",
        "no",           "--loglevel", "warning"};
    args.insert(args.end(), extra_.begin(), extra_.end());
    const pid_t pid = fork();
    if (pid < 0) throw std::runtime_error("fork failed");
    if (pid == 0) {
      const int null = open("/dev/null", O_WRONLY);
      if (null >= 0) {
        dup2(null, 1);
        dup2(null, 2);
      }
      std::vector<char*> argv;
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      execvp("redis-server", argv.data());
      _exit(127);
    }
    pid_ = pid;
    const auto deadline =
        std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (std::chrono::steady_clock::now() < deadline) {
      int status = 0;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        throw std::runtime_error(
            "redis-server did not start (is it installed? "
            "scripts/install-deps.sh installs redis-server)");
      }
      if (ping()) return;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    stop(SIGKILL);
    throw std::runtime_error("redis-server did not answer PING in 10 s");
  }

  // Sends `sig` (SIGSTOP, SIGCONT).
  void signal(int sig) {
    if (pid_ > 0) ::kill(pid_, sig);
  }

  // Stops it with `sig` and reaps it.
  void stop(int sig = SIGKILL) {
    if (pid_ <= 0) return;
    ::kill(pid_, SIGCONT);
    ::kill(pid_, sig);
    int status = 0;
    waitpid(pid_, &status, 0);
    pid_ = -1;
  }

  bool running() const { return pid_ > 0; }

 private:
  // A free port; for a cluster node one whose bus port (+10000) is free
  // and below 65536 too.
  static int pick_port(const std::vector<std::string>& extra) {
    bool cluster = false;
    for (const auto& a : extra) cluster = cluster || a == "--cluster-enabled";
    if (!cluster) return free_port();
    std::mt19937 rng(
        static_cast<unsigned>(getpid()) ^
        static_cast<unsigned>(
            std::chrono::steady_clock::now().time_since_epoch().count()));
    for (int attempt = 0; attempt < 1000; ++attempt) {
      const int p = 20000 + static_cast<int>(rng() % 30000);
      if (free_port(p) == p && free_port(p + 10000) == p + 10000) return p;
    }
    throw std::runtime_error("no free loopback port pair for a cluster node");
  }

  // `want` if it is free (0: any free port); -1 if not.
  static int free_port(int want = 0) {
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(static_cast<std::uint16_t>(want));
    socklen_t len = sizeof(a);
    if (fd < 0 || bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 ||
        getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
      if (fd >= 0) close(fd);
      if (want != 0) return -1;
      throw std::runtime_error("no free loopback port");
    }
    close(fd);
    return ntohs(a.sin_port);
  }

  bool ping() const {
    redisContext* c =
        redisConnectWithTimeout("127.0.0.1", port_, timeval{0, 200'000});
    bool ok = false;
    if (c != nullptr && c->err == 0) {
      auto* r = static_cast<redisReply*>(redisCommand(c, "PING"));
      // A server started with --requirepass answers NOAUTH: it is up.
      ok = r != nullptr &&
           (r->type == REDIS_REPLY_STATUS ||
            (r->type == REDIS_REPLY_ERROR &&
             std::string(r->str, r->len).rfind("NOAUTH", 0) == 0));
      if (r != nullptr) freeReplyObject(r);
    }
    if (c != nullptr) redisFree(c);
    return ok;
  }

  std::vector<std::string> extra_;
  int port_;
  pid_t pid_ = -1;
};

// A Redis Cluster on loopback, each node in a directory of its own: three
// masters with the slots split in three and, with `replicas`, one replica
// of each (node 3 + i replicates master i, by CLUSTER REPLICATE). Ready
// (cluster_state:ok on every node, each replica's link to its master up)
// when the constructor returns.
class RedisCluster {
 public:
  explicit RedisCluster(bool replicas = false) {
    char tmpl[] = "/tmp/rk_cluster_XXXXXX";
    if (mkdtemp(tmpl) == nullptr) throw std::runtime_error("mkdtemp failed");
    dir_ = tmpl;
    const int count = replicas ? 6 : 3;
    for (int i = 0; i < count; ++i) {
      const std::string d = dir_ + "/" + std::to_string(i);
      mkdir(d.c_str(), 0755);
      // A node timeout long enough that a test's own failover (CLUSTER
      // FAILOVER TAKEOVER) comes first on a loaded machine.
      nodes_.push_back(std::make_unique<RedisServer>(std::vector<std::string>{
          "--cluster-enabled", "yes", "--dir", d, "--cluster-config-file",
          "nodes.conf", "--cluster-node-timeout", replicas ? "8000" : "3000"}));
    }
    const int ranges[3][2] = {{0, 5460}, {5461, 10922}, {10923, 16383}};
    for (int i = 0; i < 3; ++i) {
      command(i, "CLUSTER ADDSLOTSRANGE " + std::to_string(ranges[i][0]) + " " +
                     std::to_string(ranges[i][1]));
    }
    for (int i = 1; i < count; ++i) {
      command(0, "CLUSTER MEET 127.0.0.1 " + std::to_string(port(i)));
    }
    const auto deadline =
        std::chrono::steady_clock::now() + std::chrono::seconds(30);
    if (replicas) {
      // Every node knows every other before a replica names its master.
      wait_for(deadline, "every node to know the others", [&] {
        for (int i = 0; i < count; ++i) {
          if (command(i, "CLUSTER INFO").find("cluster_known_nodes:6") ==
              std::string::npos) {
            return false;
          }
        }
        return true;
      });
      for (int i = 0; i < 3; ++i) {
        const std::string id = command(i, "CLUSTER MYID");
        wait_for(deadline, "CLUSTER REPLICATE", [&] {
          return command(3 + i, "CLUSTER REPLICATE " + id) == "OK";
        });
      }
      for (int i = 3; i < count; ++i) {
        wait_for(deadline, "a replica's link to its master", [&] {
          return command(i, "INFO replication").find("master_link_status:up") !=
                 std::string::npos;
        });
      }
    }
    wait_for(deadline, "the test cluster to become ready", [&] {
      for (int i = 0; i < count; ++i) {
        if (command(i, "CLUSTER INFO").find("cluster_state:ok") ==
            std::string::npos) {
          return false;
        }
      }
      return true;
    });
  }
  ~RedisCluster() {
    nodes_.clear();
    const std::string rm = "rm -rf " + dir_;
    if (std::system(rm.c_str()) != 0) {
      // a leftover temporary directory; nothing to do
    }
  }

  int port(int i) const { return nodes_[static_cast<std::size_t>(i)]->port(); }
  RedisServer& node(int i) { return *nodes_[static_cast<std::size_t>(i)]; }

  // One command to node `i` (space-separated words), its reply as text
  // (arrays: their elements, one a line).
  std::string command(int i, const std::string& line) const {
    redisContext* c =
        redisConnectWithTimeout("127.0.0.1", port(i), timeval{1, 0});
    std::string out;
    if (c != nullptr && c->err == 0) {
      auto* r = static_cast<redisReply*>(redisCommand(c, line.c_str()));
      if (r != nullptr) {
        append(*r, out);
        freeReplyObject(r);
      }
    }
    if (c != nullptr) redisFree(c);
    return out;
  }

  // Waits, up to 30 s, until every write master `i` acknowledged has
  // reached its replica (the replica's offset in the master's INFO
  // replication equals the master's own).
  void wait_replicated(int i) const {
    const auto deadline =
        std::chrono::steady_clock::now() + std::chrono::seconds(30);
    wait_for(deadline, "the replica to catch up", [&] {
      const std::string info = command(i, "INFO replication");
      const std::string own = field(info, "master_repl_offset:");
      const std::size_t at = info.find("slave0:");
      return !own.empty() && at != std::string::npos &&
             field(info.substr(at), "offset=") == own;
    });
  }

  // Promotes replica `i` by CLUSTER FAILOVER TAKEOVER (no vote of the
  // masters, no wait for the node timeout) and waits, up to 30 s, until it
  // says it is a master. When the command was sent.
  std::chrono::steady_clock::time_point takeover(int i) const {
    const auto sent = std::chrono::steady_clock::now();
    if (command(i, "CLUSTER FAILOVER TAKEOVER") != "OK") {
      throw std::runtime_error("CLUSTER FAILOVER TAKEOVER refused");
    }
    wait_for(sent + std::chrono::seconds(30), "the replica to be promoted",
             [&] { return command(i, "ROLE").rfind("master", 0) == 0; });
    return sent;
  }

 private:
  template <class F>
  static void wait_for(std::chrono::steady_clock::time_point deadline,
                       const char* what, F&& done) {
    while (!done()) {
      if (std::chrono::steady_clock::now() > deadline) {
        throw std::runtime_error(std::string("timed out waiting for ") + what);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));  // a poll
    }
  }
  // The value after `key` in `text`, up to the next ',', '\r' or '\n'.
  static std::string field(const std::string& text, const std::string& key) {
    const std::size_t at = text.find(key);
    if (at == std::string::npos) return {};
    const std::size_t from = at + key.size();
    return text.substr(from, text.find_first_of(",\r\n", from) - from);
  }
  static void append(const redisReply& r, std::string& out) {
    if (r.type == REDIS_REPLY_STRING || r.type == REDIS_REPLY_STATUS ||
        r.type == REDIS_REPLY_ERROR) {
      out.append(r.str, r.len);
    } else if (r.type == REDIS_REPLY_INTEGER) {
      out += std::to_string(r.integer);
    } else if (r.type == REDIS_REPLY_ARRAY) {
      for (std::size_t k = 0; k < r.elements; ++k) {
        if (k != 0) out += '\n';
        append(*r.element[k], out);
      }
    }
  }

  std::string dir_;
  std::vector<std::unique_ptr<RedisServer>> nodes_;
};

}  // namespace rk_test

#endif  // RATEKEEPER_TESTS_REDIS_SERVER_HPP_
