// journal_bench: journaled settles per second while Redis is away, on this
// machine's disk.
//
//   journal_bench [dir] [threads] [seconds]
//
// (defaults: the current directory, 8 threads, 3 seconds). A RedisAccountant
// whose client points at a loopback port nothing listens on (Redis stopped):
// every reserve is the budget's fail mode's (kOpen) and every settle goes to
// the journal in `dir`, durable before settle returns. Prints settles/s
// from `threads` threads, and, where the accountant reports it, the
// journal's fdatasyncs (settles per sync shows the group commit), with the
// disk's fdatasync time alone (one thread, 200 appends, each synced).
//
// Uses only the accountant's public API, so that the same source measures
// an earlier version of the headers (compiled against them) for a before /
// after figure.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "ratekeeper/budget/redis_accountant.hpp"

namespace rk = ratekeeper;

namespace {

// A free loopback port (bound, then closed: nothing listens there).
int dead_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(a);
  if (fd < 0 || ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
    std::perror("socket");
    std::exit(1);
  }
  ::close(fd);
  return ntohs(a.sin_port);
}

double fdatasync_ms(const std::string& dir) {
  const std::string path = dir + "/journal_bench.sync";
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
  if (fd < 0) return -1;
  const std::string line(120, 'x');
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < 200; ++i) {
    if (::write(fd, line.data(), line.size()) < 0 || ::fdatasync(fd) != 0) {
      break;
    }
  }
  const auto t1 = std::chrono::steady_clock::now();
  ::close(fd);
  ::unlink(path.c_str());
  return std::chrono::duration<double, std::milli>(t1 - t0).count() / 200;
}

template <class A>
long long journal_syncs(const A& a) {
  if constexpr (requires { a.journal_syncs(); }) {
    return static_cast<long long>(a.journal_syncs());
  } else {
    return -1;
  }
}

}  // namespace

int main(int argc, char** argv) {
  const std::string dir = argc > 1 ? argv[1] : ".";
  const int threads = argc > 2 ? std::atoi(argv[2]) : 8;
  const double seconds = argc > 3 ? std::atof(argv[3]) : 3.0;
  std::printf("fdatasync alone: %.3f ms\n", fdatasync_ms(dir));

  auto client = rk::RedisClient::create(
      {.port = dead_port(), .prefix = "bench:", .start_unreachable = true});
  if (!client.ok()) {
    std::fprintf(stderr, "%s\n", client.status().ToString().c_str());
    return 1;
  }
  const std::string journal = dir + "/journal_bench.journal";
  ::unlink(journal.c_str());
  rk::PriceTable prices;
  const auto p = rk::TokenPrice::per_million_micros(1'000'000);
  if (!prices.set("m", {.base = {.input = p, .output = p}}).ok()) return 1;
  auto acct =
      rk::RedisAccountant::create(prices, *client, {.journal_path = journal});
  if (!acct.ok()) {
    std::fprintf(stderr, "%s\n", acct.status().ToString().c_str());
    return 1;
  }
  rk::BudgetSpec spec{"team",
                      rk::Scope(rk::Field::kTeam),
                      rk::BudgetUnit::kNanoUsd,
                      std::uint64_t{1} << 50,
                      rk::Period::calendar(rk::PeriodKind::kMonth).value(),
                      {}};
  if (!(*acct)->add_budget(spec, {.fail = rk::FailMode::kOpen}).ok()) return 1;

  std::atomic<bool> stop{false};
  std::atomic<long long> settled{0}, failed{0};
  std::vector<std::thread> ts;
  const auto t0 = std::chrono::steady_clock::now();
  for (int t = 0; t < threads; ++t) {
    ts.emplace_back([&, t] {
      const std::string team = "t" + std::to_string(t);  // who views it
      const rk::Subject who{.team = team, .org = "o"};
      for (long long i = 0; !stop.load(std::memory_order_relaxed); ++i) {
        auto r = (*acct)->reserve(who, "m", {10, 10},
                                  std::to_string(t) + "-" + std::to_string(i));
        rk::Usage u;
        u.input_uncached = 10;
        u.output = 5;
        if (r.ok() && r->granted() && r->settle(u).ok()) {
          settled.fetch_add(1, std::memory_order_relaxed);
        } else {
          failed.fetch_add(1, std::memory_order_relaxed);
        }
      }
    });
  }
  std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
  stop.store(true);
  for (auto& th : ts) th.join();
  const double wall =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0)
          .count();
  const long long syncs = journal_syncs(**acct);
  std::printf(
      "journaled settles/s: %.0f (%d threads, %.1f s, %lld settles, %lld "
      "failed, %llu journaled",
      static_cast<double>(settled.load()) / wall, threads, wall, settled.load(),
      failed.load(), static_cast<unsigned long long>((*acct)->journaled()));
  if (syncs >= 0) {
    std::printf(", %lld syncs: %.1f settles per sync", syncs,
                syncs > 0 ? static_cast<double>(settled.load()) /
                                static_cast<double>(syncs)
                          : 0.0);
  }
  std::printf(")\n");
  acct->reset();
  ::unlink(journal.c_str());
  return failed.load() == 0 ? 0 : 1;
}
