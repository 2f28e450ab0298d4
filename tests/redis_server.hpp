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
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
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
      : extra_(std::move(extra)), port_(free_port()) {
    start();
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
  static int free_port() {
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = 0;
    socklen_t len = sizeof(a);
    if (fd < 0 || bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 ||
        getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
      if (fd >= 0) close(fd);
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
      ok = r != nullptr && r->type == REDIS_REPLY_STATUS;
      if (r != nullptr) freeReplyObject(r);
    }
    if (c != nullptr) redisFree(c);
    return ok;
  }

  std::vector<std::string> extra_;
  int port_;
  pid_t pid_ = -1;
};

}  // namespace rk_test

#endif  // RATEKEEPER_TESTS_REDIS_SERVER_HPP_
