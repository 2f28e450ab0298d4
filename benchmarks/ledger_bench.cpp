// ledger_bench: the ledger's throughput on this machine's disk.
//
//   ledger_bench [dir] [threads] [seconds] [sync_us]
//
// (defaults: the current directory, 8 threads, 3 seconds each). Prints, each
// measured with a fresh ledger file in `dir`:
//   pairs/s     reserve + settle pairs through an Accountant writing a
//               Ledger with Durability::kGroupCommit (each settle returns
//               once its record is synced), from `threads` threads
//   denials/s   reserves refused by a spent budget, same ledger, same
//               threads (written, never waited for), and without a ledger
//   records/s   Ledger::append (durable) alone, from `threads` threads
// and the syncs made, so that records per sync shows the batching, with the
// mean time of one of the ledger's syncs during the run and, before the
// runs, the disk's fdatasync time alone (one thread, 200 appends of 300
// bytes, each synced): pairs/s can be no more than threads / sync time.
//
// sync_us (optional, > 0): a simulated disk instead of fdatasync: records
// are written to the file, and each sync sleeps sync_us microseconds (no
// fdatasync), to show what the group commit reaches on a disk whose sync
// takes that long. Not a durable ledger; the output says so.
#include <sys/prctl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "ratekeeper/budget/accountant.hpp"
#include "ratekeeper/budget/ledger.hpp"

namespace rk = ratekeeper;
namespace fs = std::filesystem;

namespace {

rk::PriceTable prices() {
  rk::PriceTable t;
  const auto p = rk::TokenPrice::per_million_micros(1'000'000);
  t.set("m", {.base = {.input = p, .output = p}}).IgnoreError();
  return t;
}

struct Run {
  double per_s = 0;
  std::uint64_t ops = 0;
};

// Runs `op(thread, i)` on `threads` threads for `seconds`; ops per second.
template <class Op>
Run run(int threads, double seconds, Op op) {
  std::atomic<bool> stop{false};
  std::atomic<std::uint64_t> total{0};
  std::vector<std::thread> ts;
  const auto t0 = std::chrono::steady_clock::now();
  for (int t = 0; t < threads; ++t) {
    ts.emplace_back([&, t] {
      std::uint64_t n = 0;
      while (!stop.load(std::memory_order_relaxed)) {
        if (!op(t, n)) std::abort();
        ++n;
      }
      total += n;
    });
  }
  std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
  stop = true;
  for (auto& th : ts) th.join();
  const double dt =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0)
          .count();
  return {static_cast<double>(total.load()) / dt, total.load()};
}

// The ledger's file, timing its syncs (or, with sync_us > 0, sleeping that
// long instead of syncing).
class TimedFile final : public rk::LedgerFile {
 public:
  TimedFile(std::unique_ptr<rk::PosixLedgerFile> f, long sync_us)
      : f_(std::move(f)), sync_us_(sync_us) {}
  absl::Status write(std::string_view b) override { return f_->write(b); }
  absl::Status sync() override {
    const auto t0 = std::chrono::steady_clock::now();
    absl::Status st;
    if (sync_us_ > 0) {
      ::prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL);  // sleep to the us
      std::this_thread::sleep_for(std::chrono::microseconds(sync_us_));
    } else {
      st = f_->sync();
    }
    nanos_ += static_cast<std::uint64_t>(
        std::chrono::duration_cast<std::chrono::nanoseconds>(
            std::chrono::steady_clock::now() - t0)
            .count());
    ++syncs_;
    return st;
  }
  // The mean sync time so far, in milliseconds.
  double mean_ms() const {
    const std::uint64_t n = syncs_.load();
    return n == 0 ? 0.0
                  : static_cast<double>(nanos_.load()) / 1e6 /
                        static_cast<double>(n);
  }

 private:
  std::unique_ptr<rk::PosixLedgerFile> f_;
  long sync_us_;
  std::atomic<std::uint64_t> nanos_{0}, syncs_{0};
};

long g_sync_us = 0;
TimedFile* g_file = nullptr;  // the fresh ledger's

std::unique_ptr<rk::Ledger> fresh(const std::string& path) {
  fs::remove(path);
  auto f = rk::PosixLedgerFile::open_append(path);
  if (!f.ok()) {
    std::fprintf(stderr, "%s\n", std::string(f.status().message()).c_str());
    std::exit(1);
  }
  auto timed = std::make_unique<TimedFile>(*std::move(f), g_sync_us);
  g_file = timed.get();
  return rk::Ledger::with_file(std::move(timed),
                               {.durability = rk::Durability::kGroupCommit});
}

// The disk's fdatasync time alone: the median of 200 (append 300 bytes,
// fdatasync), in milliseconds.
double disk_sync_ms(const std::string& path) {
  fs::remove(path);
  auto f = rk::PosixLedgerFile::open_append(path);
  if (!f.ok()) return -1;
  const std::string rec(299, 'x');
  std::vector<double> ms;
  for (int i = 0; i < 200; ++i) {
    if (!(*f)->write(rec + "\n").ok()) return -1;
    const auto t0 = std::chrono::steady_clock::now();
    if (!(*f)->sync().ok()) return -1;
    ms.push_back(std::chrono::duration<double, std::milli>(
                     std::chrono::steady_clock::now() - t0)
                     .count());
  }
  f->reset();
  fs::remove(path);
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  const std::string dir = argc > 1 ? argv[1] : ".";
  const int threads = argc > 2 ? std::atoi(argv[2]) : 8;
  const double seconds = argc > 3 ? std::atof(argv[3]) : 3.0;
  g_sync_us = argc > 4 ? std::atol(argv[4]) : 0;
  const std::string path = (fs::path(dir) / "ledger_bench.jsonl").string();
  const rk::ShardedOptions store{.capacity = 1 << 14};
  if (g_sync_us > 0) {
    std::printf("SIMULATED disk: each sync sleeps %ld us (no fdatasync)\n",
                g_sync_us);
  } else {
    std::printf("disk fdatasync alone (1 thread, median of 200): %.3f ms\n",
                disk_sync_ms(path));
  }

  {
    auto ledger = fresh(path);
    rk::Accountant<> acct(prices(), rk::SystemClock{}, store);
    if (!acct.add_budget({"team", rk::Field::kTeam, rk::BudgetUnit::kNanoUsd,
                          rk::PeriodBudget::kMaxLimit,
                          rk::Period::calendar(rk::PeriodKind::kMonth).value()})
             .ok()) {
      return 1;
    }
    acct.set_audit(ledger.get());
    const Run r = run(threads, seconds, [&](int t, std::uint64_t i) {
      const std::string team = "team" + std::to_string(t);
      const rk::Subject who{.user = "u", .team = team};
      auto res = acct.reserve(
          who, "m", {.prompt_tokens = 100, .max_output_tokens = 100},
          "r" + std::to_string(t) + "-" + std::to_string(i));
      if (!res.ok() || !res->granted()) return false;
      rk::Usage u;
      u.input_uncached = 100;
      u.output = 50;
      return res->settle(u).ok();
    });
    const std::uint64_t syncs = ledger->syncs();
    std::printf(
        "accountant kGroupCommit, %d threads: %.0f reserve+settle pairs/s "
        "(%llu pairs, %llu syncs, %.1f settles per sync, %.3f ms per "
        "sync)\n",
        threads, r.per_s, static_cast<unsigned long long>(r.ops),
        static_cast<unsigned long long>(syncs),
        syncs == 0 ? 0.0
                   : static_cast<double>(r.ops) / static_cast<double>(syncs),
        g_file->mean_ms());
  }
  for (const bool with_ledger : {true, false}) {
    auto ledger = fresh(path);
    rk::Accountant<> acct(prices(), rk::SystemClock{}, store);
    if (!acct.add_budget({"team", rk::Field::kTeam, rk::BudgetUnit::kNanoUsd,
                          1'000,
                          rk::Period::calendar(rk::PeriodKind::kMonth).value()})
             .ok()) {
      return 1;
    }
    if (with_ledger) acct.set_audit(ledger.get());
    const rk::Subject who{.user = "u", .team = "spent"};
    {  // spend the budget
      auto res = acct.reserve(
          who, "m", {.prompt_tokens = 1, .max_output_tokens = 0}, "spend");
      if (!res.ok() || !res->granted()) return 1;
      rk::Usage u;
      u.input_uncached = 1000;
      if (!res->settle(u).ok()) return 1;
    }
    const std::uint64_t syncs0 = ledger->syncs();
    const Run r = run(threads, seconds, [&](int t, std::uint64_t i) {
      auto res =
          acct.reserve(who, "m", {.prompt_tokens = 10, .max_output_tokens = 10},
                       "d" + std::to_string(t) + "-" + std::to_string(i));
      return res.ok() && !res->granted();
    });
    std::printf("denials, %s, %d threads: %.0f denials/s (%llu syncs during)\n",
                with_ledger ? "kGroupCommit ledger" : "no ledger", threads,
                r.per_s,
                static_cast<unsigned long long>(ledger->syncs() - syncs0));
  }
  {
    auto ledger = fresh(path);
    const Run r = run(threads, seconds, [&](int, std::uint64_t i) {
      return ledger
          ->append("\"event\":\"bench\",\"cost_nanos\":150",
                   rk::Nanos{static_cast<std::int64_t>(i)})
          .ok();
    });
    std::printf(
        "ledger append kGroupCommit, %d threads: %.0f records/s (%llu syncs, "
        "%.3f ms per sync)\n",
        threads, r.per_s, static_cast<unsigned long long>(ledger->syncs()),
        g_file->mean_ms());
  }
  fs::remove(path);
  return 0;
}
