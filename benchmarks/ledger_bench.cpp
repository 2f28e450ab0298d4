// ledger_bench: the ledger's throughput on this machine's disk.
//
//   ledger_bench [dir] [threads] [seconds]
//
// (defaults: the current directory, 8 threads, 3 seconds each). Prints, each
// measured with a fresh ledger file in `dir`:
//   pairs/s     reserve + settle pairs through an Accountant writing a
//               Ledger with Durability::kGroupCommit (each settle returns
//               once its record is synced), from `threads` threads
//   denials/s   reserves refused by a spent budget, same ledger, same
//               threads (written, never waited for), and without a ledger
//   records/s   Ledger::append (durable) alone, from `threads` threads
// and the syncs made, so that records per sync shows the batching.
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

std::unique_ptr<rk::Ledger> fresh(const std::string& path) {
  fs::remove(path);
  auto l = rk::Ledger::open(path, {.durability = rk::Durability::kGroupCommit});
  if (!l.ok()) {
    std::fprintf(stderr, "%s\n", std::string(l.status().message()).c_str());
    std::exit(1);
  }
  return *std::move(l);
}

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  const std::string dir = argc > 1 ? argv[1] : ".";
  const int threads = argc > 2 ? std::atoi(argv[2]) : 8;
  const double seconds = argc > 3 ? std::atof(argv[3]) : 3.0;
  const std::string path = (fs::path(dir) / "ledger_bench.jsonl").string();
  const rk::ShardedOptions store{.capacity = 1 << 14};

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
      const rk::Subject who{.user = "u", .team = "team" + std::to_string(t)};
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
        "(%llu pairs, %llu syncs, %.1f settles per sync)\n",
        threads, r.per_s, static_cast<unsigned long long>(r.ops),
        static_cast<unsigned long long>(syncs),
        syncs == 0 ? 0.0
                   : static_cast<double>(r.ops) / static_cast<double>(syncs));
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
        "ledger append kGroupCommit, %d threads: %.0f records/s (%llu syncs)\n",
        threads, r.per_s, static_cast<unsigned long long>(ledger->syncs()));
  }
  fs::remove(path);
  return 0;
}
