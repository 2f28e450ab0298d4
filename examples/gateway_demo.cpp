// gateway_demo: a simulated day of LLM API traffic through ratekeeper.
//
// Users of three tiers (free, pro, enterprise) call a chat model all day;
// each call carries a token estimate (prompt + max output). Every call is
// checked against its tier's limits, per authenticated user:
//   requests per minute   SlidingWindow
//   tokens per minute     TokenBucket, weighted by the call's tokens
//   requests per day      FixedWindow (free tier only)
// A call must pass all of them; when a later limit denies, the earlier ones
// are refunded, so a denied call consumes nothing.
//
// Time is a ManualClock, so the day runs at full speed. At the end it prints
// a table per tier and the measured cost of one check on the real clock.
//
//   gateway_demo [--users N] [--seed S]
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <optional>
#include <queue>
#include <random>
#include <string>
#include <vector>

#include "ratekeeper/fmt.hpp"
#include "ratekeeper/ratekeeper.hpp"

namespace rk = ratekeeper;
using std::chrono::hours;
using std::chrono::minutes;
using std::chrono::seconds;

namespace {

struct TierSpec {
  const char* name;
  std::uint64_t rpm;         // requests per minute
  std::uint64_t tpm;         // tokens per minute
  std::uint64_t rpd;         // requests per day, 0 = none
  double share;              // share of users
  double calls_per_hour;     // an average user's appetite
  std::uint64_t max_output;  // max_tokens the tier's clients ask for
};

constexpr TierSpec kTiers[] = {
    {"free", 10, 20'000, 200, 0.70, 25, 1'024},
    {"pro", 60, 150'000, 0, 0.25, 90, 4'096},
    {"enterprise", 600, 2'000'000, 0, 0.05, 900, 8'192},
};

using Clock = rk::ManualClock;
template <class P>
using UserLimiter =
    rk::Limiter<P, rk::ShardedStore, Clock>;  // the default store

// The limits of one tier, each keyed by user.
struct TierLimits {
  UserLimiter<rk::SlidingWindow> rpm;
  UserLimiter<rk::TokenBucket> tpm;
  std::optional<UserLimiter<rk::FixedWindow>> rpd;

  // Each store sized for this demo's users: its memory (about 30 bytes per
  // key of capacity) is allocated up front.
  static rk::ShardedOptions sized() {
    rk::ShardedOptions o;
    o.capacity = 16'384;
    return o;
  }

  TierLimits(const TierSpec& t, const Clock& clock)
      : rpm(rk::SlidingWindow::create(rk::per_minute(t.rpm)).value(), sized(),
            clock),
        tpm(rk::TokenBucket::create(rk::per_minute(t.tpm), t.tpm).value(),
            sized(), clock) {
    if (t.rpd != 0) {
      rpd.emplace(rk::FixedWindow::create(rk::per_day(t.rpd)).value(), sized(),
                  clock);
    }
  }
};

struct TierStats {
  std::uint64_t users = 0, tried = 0, admitted = 0;
  std::uint64_t denied_rpm = 0, denied_tpm = 0, denied_rpd = 0;
  std::uint64_t tokens_admitted = 0, tokens_denied = 0;
};

struct User {
  std::string key;  // "user:<id>": an authenticated subject, not an IP
  int tier;
  double calls_per_hour;
  bool bursty;  // sends in bursts (a batch job or a retry loop)
};

// Traffic follows the working day: quiet at night, busiest mid-afternoon.
double daily_intensity(double hour_of_day) {
  const double x = (hour_of_day - 15.0) / 24.0 * 2.0 * 3.14159265358979;
  return 0.25 + 0.75 * (0.5 + 0.5 * std::cos(x));
}

struct Arrival {
  std::int64_t at_ns;
  std::size_t user;
  bool operator>(const Arrival& o) const { return at_ns > o.at_ns; }
};

std::uint64_t arg_or(int argc, char** argv, const char* flag,
                     std::uint64_t fallback) {
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::strcmp(argv[i], flag) == 0) {
      return std::strtoull(argv[i + 1], nullptr, 10);
    }
  }
  return fallback;
}

// ns per check of `lim` over 1,000 keys, one thread.
template <class L>
double ns_per_check(L& lim, const std::vector<std::string>& keys, int calls) {
  std::uint64_t allowed = 0;
  const auto t0 = std::chrono::steady_clock::now();
  std::size_t k = 0;
  for (int i = 0; i < calls; ++i) {
    allowed += lim.acquire(keys[k]).allowed;
    if (++k == keys.size()) k = 0;
  }
  const auto t1 = std::chrono::steady_clock::now();
  if (allowed != static_cast<std::uint64_t>(calls)) std::abort();
  return std::chrono::duration<double, std::nano>(t1 - t0).count() / calls;
}

// The cost of one check on real clocks, beside its floor (one clock read),
// measured in this run. benchmarks/ has the careful version (make bench).
void measure_check_cost() {
  const auto policy =
      rk::TokenBucket::create(rk::per_second(1'000'000'000), 1'000'000'000)
          .value();
  std::vector<std::string> keys;
  for (int i = 0; i < 1000; ++i) keys.push_back("user:" + std::to_string(i));
  constexpr int kCalls = 2'000'000;
  rk::ShardedOptions small;
  small.capacity = 4096;
  rk::Limiter<rk::TokenBucket> sharded(policy, small);
  rk::Limiter<rk::TokenBucket, rk::ShardedStore, rk::CachedClock> cached(
      policy, small, rk::CachedClock{});
  rk::Limiter<rk::TokenBucket, rk::InMemoryStore> in_memory(policy);
  const double s = ns_per_check(sharded, keys, kCalls);
  const double c = ns_per_check(cached, keys, kCalls);
  const double m = ns_per_check(in_memory, keys, kCalls);
  std::int64_t sink = 0;
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < kCalls; ++i) sink += rk::SteadyClock{}.now().count() & 1;
  const double clock_ns = std::chrono::duration<double, std::nano>(
                              std::chrono::steady_clock::now() - t0)
                              .count() /
                          kCalls;
  fmt::print(
      "\nOne check (TokenBucket, 1,000 keys, one thread), measured now:\n"
      "  ShardedStore + SteadyClock  {:6.1f} ns   (one clock read alone: "
      "{:.1f} ns{})\n"
      "  ShardedStore + CachedClock  {:6.1f} ns\n"
      "  InMemoryStore + SteadyClock {:6.1f} ns\n",
      s, clock_ns, sink < 0 ? "?" : "", c, m);
}

}  // namespace

int main(int argc, char** argv) {
  const auto n_users = arg_or(argc, argv, "--users", 2'000);
  const auto seed = arg_or(argc, argv, "--seed", 20261128);
  std::mt19937_64 rng(seed);

  Clock clock;                    // the simulated day starts at midnight, t = 0
  std::deque<TierLimits> limits;  // a Limiter does not move: no vector
  for (const auto& t : kTiers) limits.emplace_back(t, clock);
  std::vector<TierStats> stats(std::size(kTiers));

  std::vector<User> users;
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  for (std::uint64_t i = 0; i < n_users; ++i) {
    const double u = unit(rng);
    int tier = 0;
    double acc = 0;
    for (int t = 0; t < static_cast<int>(std::size(kTiers)); ++t) {
      acc += kTiers[t].share;
      if (u <= acc) {
        tier = t;
        break;
      }
    }
    // Appetites vary tenfold between users of one tier.
    const double appetite =
        kTiers[tier].calls_per_hour * std::exp(unit(rng) * 2.3 - 1.15);
    users.push_back(
        {"user:" + std::to_string(i), tier, appetite, unit(rng) < 0.1});
    ++stats[static_cast<std::size_t>(tier)].users;
  }

  constexpr std::int64_t kDay = 86'400'000'000'000;
  std::priority_queue<Arrival, std::vector<Arrival>, std::greater<>> queue;
  auto schedule = [&](std::size_t u, std::int64_t now) {
    const User& user = users[u];
    const double hour = static_cast<double>(now % kDay) / 3.6e12;
    const double rate_per_ns =
        user.calls_per_hour * daily_intensity(hour) / 3.6e12;
    double gap = std::exponential_distribution<double>(rate_per_ns)(rng);
    // A bursty client fires most calls back to back.
    if (user.bursty && unit(rng) < 0.8) gap = unit(rng) * 2e8;
    queue.push({now + static_cast<std::int64_t>(gap) + 1, u});
  };
  for (std::size_t u = 0; u < users.size(); ++u) schedule(u, 0);

  std::lognormal_distribution<double> prompt_tokens(6.5, 1.0);  // ~665 median
  std::optional<std::pair<rk::Decision, std::string>> sample_denial;
  std::uint64_t calls = 0;
  const auto wall0 = std::chrono::steady_clock::now();
  while (!queue.empty()) {
    const Arrival a = queue.top();
    queue.pop();
    if (a.at_ns >= kDay) continue;
    clock.set(rk::Nanos{a.at_ns});
    const User& user = users[a.user];
    const auto tier = static_cast<std::size_t>(user.tier);
    TierLimits& lim = limits[tier];
    TierStats& st = stats[tier];
    // Reserve the worst case: prompt estimate plus max output tokens.
    const auto tokens =
        std::min<std::uint64_t>(static_cast<std::uint64_t>(prompt_tokens(rng)),
                                kTiers[tier].tpm / 2) +
        kTiers[tier].max_output;
    ++st.tried;
    ++calls;

    bool ok = true;
    const rk::Decision r = lim.rpm.acquire(user.key);
    if (!r) {
      ++st.denied_rpm;
      ok = false;
      if (!sample_denial)
        sample_denial.emplace(r, "requests/min of " + user.key);
    } else if (const rk::Decision t = lim.tpm.acquire(user.key, tokens); !t) {
      ++st.denied_tpm;
      lim.rpm.refund(user.key, 1);  // all or nothing
      ok = false;
    } else if (lim.rpd) {
      if (const rk::Decision d = lim.rpd->acquire(user.key); !d) {
        ++st.denied_rpd;
        lim.rpm.refund(user.key, 1);
        lim.tpm.refund(user.key, tokens);
        ok = false;
      }
    }
    if (ok) {
      ++st.admitted;
      st.tokens_admitted += tokens;
    } else {
      st.tokens_denied += tokens;
    }
    schedule(a.user, a.at_ns);
  }
  const double wall_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - wall0)
          .count();

  fmt::print("ratekeeper gateway demo: one simulated day, {} users, seed {}\n",
             n_users, seed);
  fmt::print(
      "{} calls checked in {:.2f} s of CPU ({:.0f} ns per call, "
      "2-3 limits each)\n\n",
      calls, wall_s,
      wall_s * 1e9 / static_cast<double>(std::max<std::uint64_t>(calls, 1)));
  fmt::print("{:<11} {:>6} {:>10} {:>10} {:>9} {:>9} {:>9} {:>15} {:>15}\n",
             "tier", "users", "tried", "admitted", "rpm-deny", "tpm-deny",
             "rpd-deny", "tokens-admit", "tokens-denied");
  for (std::size_t t = 0; t < std::size(kTiers); ++t) {
    const TierStats& s = stats[t];
    fmt::print("{:<11} {:>6} {:>10} {:>10} {:>9} {:>9} {:>9} {:>15} {:>15}\n",
               kTiers[t].name, s.users, s.tried, s.admitted, s.denied_rpm,
               s.denied_tpm, s.denied_rpd, s.tokens_admitted, s.tokens_denied);
  }
  fmt::print("\nLimits per user: ");
  for (const auto& t : kTiers) {
    fmt::print("{} {} req/min, {} tokens/min{}; ", t.name, t.rpm, t.tpm,
               t.rpd ? fmt::format(", {} req/day", t.rpd) : "");
  }
  fmt::print("\n");
  if (sample_denial) {
    fmt::print("First denial ({}): {}\n", sample_denial->second,
               sample_denial->first);
  }
  std::uint64_t held = 0;
  for (auto& l : limits) held += l.rpm.stats().keys + l.tpm.stats().keys;
  fmt::print("States held at the end of the day: {}\n", held);

  measure_check_cost();

  // The books must balance: every call is admitted or denied exactly once.
  for (const auto& s : stats) {
    if (s.admitted + s.denied_rpm + s.denied_tpm + s.denied_rpd != s.tried) {
      return 1;
    }
  }
  return calls > 0 ? 0 : 1;
}
