// Issue 17: listeners (listener.hpp) and statistics (Limit::statistics,
// prometheus_text). The expected events come from a model of the limit
// computed here; the statistics are read back from the Prometheus text.
#include "ratekeeper/listener.hpp"

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "ratekeeper/chain.hpp"
#include "ratekeeper/detail/mutex.hpp"
#include "ratekeeper/policy/fixed_window.hpp"
#include "ratekeeper/policy/token_bucket.hpp"
#include "ratekeeper/prometheus.hpp"
#include "ratekeeper/store/sharded.hpp"
#include "test_util.hpp"

using namespace ratekeeper;
using rk_test::kSec;

namespace {

enum class Kind { kAllowed, kDenied, kNear, kGivenBack };

struct Seen {
  Kind kind;
  std::string key;
  Cost cost;
  std::uint64_t remaining;
  friend bool operator==(const Seen&, const Seen&) = default;
};

// Records every event, in order.
class Recorder : public LimitListener {
 public:
  void on_allowed(const LimitEvent& e) override { add(Kind::kAllowed, e); }
  void on_denied(const LimitEvent& e) override { add(Kind::kDenied, e); }
  void on_near_limit(const LimitEvent& e) override { add(Kind::kNear, e); }
  void on_given_back(const LimitEvent& e) override { add(Kind::kGivenBack, e); }
  std::vector<Seen> events() const {
    detail::MutexLock lock(&mu_);
    return events_;
  }

 private:
  void add(Kind k, const LimitEvent& e) {
    detail::MutexLock lock(&mu_);
    events_.push_back(
        Seen{k, std::string(e.key), e.cost, e.decision.remaining});
  }
  mutable detail::Mutex mu_;
  std::vector<Seen> events_;
};

constexpr Nanos at(std::int64_t s) { return Nanos{3600 * kSec + s * kSec}; }

// The samples of `text` whose labels hold `limit="name"`: metric name (with
// its outcome or unit label) to value.
std::map<std::string, std::uint64_t> samples(const std::string& text,
                                             const std::string& name) {
  std::map<std::string, std::uint64_t> out;
  std::istringstream in(text);
  std::string line;
  const std::string tag = "limit=\"" + name + "\"";
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    if (line.find(tag) == std::string::npos) continue;
    const std::size_t brace = line.find('{');
    const std::size_t close = line.find('}');
    std::string metric = line.substr(0, brace);
    const std::string labels = line.substr(brace + 1, close - brace - 1);
    if (const std::size_t o = labels.find("outcome=\"");
        o != std::string::npos) {
      metric += "/" + labels.substr(o + 9, labels.find('"', o + 9) - o - 9);
    }
    out[metric] = std::stoull(line.substr(close + 2));
  }
  return out;
}

}  // namespace

TEST_CASE("a listener hears each allow, deny, near-limit and give-back",
          "[i17]") {
  // 10 tokens, 1 per second; near-limit at remaining <= 20% (2 tokens).
  auto l =
      make_limit(
          {.name = "tpm", .unit = Unit::kTokens, .near_limit_permille = 200},
          TokenBucket::create(per_second(1), 10).value())
          .value();
  auto rec = std::make_shared<Recorder>();
  l->set_listener(rec);
  REQUIRE(l->listener() == rec.get());

  // The model: remaining per key, whole tokens, refilled 1 per second.
  std::vector<Seen> want;
  std::uint64_t left = 10;
  auto allowed = [&](const std::string& key, Cost cost) {
    left -= cost;
    want.push_back({Kind::kAllowed, key, cost, left});
    if (left * 1000 <= 10 * 200) want.push_back({Kind::kNear, key, cost, left});
  };

  CHECK(l->acquire("u", 4, at(0)).allowed);
  allowed("u", 4);
  Receipt r;
  CHECK(l->take("u", 5, at(0), r).allowed);
  allowed("u", 5);  // 1 left: near
  CHECK_FALSE(l->acquire("u", 3, at(0)).allowed);
  want.push_back({Kind::kDenied, "u", 3, left});
  // 5 taken, 2 used: 3 given back (the take is the bucket's last: exact).
  REQUIRE(l->settle(r, 2, at(0)).ok());
  left += 3;
  want.push_back({Kind::kGivenBack, "u", 3, left});
  // A peek is not a decision; a settle above the take is not a give-back.
  static_cast<void>(l->peek("u", 1, at(0)));
  Receipt r2;
  CHECK(l->take("u", 1, at(0), r2).allowed);
  allowed("u", 1);
  REQUIRE(l->settle(r2, 2, at(0)).ok());
  left -= 1;
  // Two seconds later: 2 refilled.
  left += 2;
  CHECK(l->acquire("u", 2, at(2)).allowed);
  allowed("u", 2);

  CHECK(rec->events() == want);
  const LimitStatistics s = l->statistics();
  CHECK(s.given_back == 1);
  CHECK(s.given_back_units == 3);
  CHECK(s.listener_errors == 0);

  SECTION("unset: no more events") {
    l->set_listener(nullptr);
    CHECK(l->listener() == nullptr);
    CHECK(l->acquire("u", 1, at(10)).allowed);
    CHECK(rec->events() == want);
  }
}

TEST_CASE("a chain's veto is heard as allowed, then given back", "[i17]") {
  auto a = make_limit({.name = "a"}, FixedWindow::create(per_minute(5)).value())
               .value();
  auto b = make_limit({.name = "b"}, FixedWindow::create(per_minute(1)).value())
               .value();
  auto rec = std::make_shared<Recorder>();
  a->set_listener(rec);
  ManualClock clock(at(0));
  Chain<ManualClock> chain(clock);
  REQUIRE(chain.acquire({{a.get(), "k", 1}, {b.get(), "k", 1}}).allowed);
  REQUIRE_FALSE(chain.acquire({{a.get(), "k", 1}, {b.get(), "k", 1}}));
  const std::vector<Seen> want = {{Kind::kAllowed, "k", 1, 4},
                                  {Kind::kAllowed, "k", 1, 3},
                                  {Kind::kGivenBack, "k", 1, 4}};
  CHECK(rec->events() == want);
  // The chain's counts: one allowed, one vetoed; one give-back.
  const LimitStatistics s = a->statistics();
  CHECK(s.counts.allowed == 1);
  CHECK(s.counts.vetoed == 1);
  CHECK(s.given_back == 1);
  CHECK(s.given_back_units == 1);
}

TEST_CASE("a listener that throws: counted, the decision stands", "[i17]") {
  struct Thrower : LimitListener {
    void on_allowed(const LimitEvent&) override {
      throw std::runtime_error("listener failed");
    }
  };
  auto l =
      make_limit({.name = "l"}, TokenBucket::create(per_second(1), 3).value())
          .value();
  l->set_listener(std::make_shared<Thrower>());
  Receipt r;
  CHECK(l->take("k", 2, at(0), r).allowed);
  CHECK(r.open());
  CHECK(l->peek("k", 0, at(0)).remaining == 1);
  REQUIRE(l->settle(r, 0, at(0)).ok());
  CHECK(l->peek("k", 0, at(0)).remaining == 3);
  CHECK(l->statistics().listener_errors == 1);
}

TEST_CASE("a limit built without hooks hears nothing", "[i17]") {
  PolicyLimit<TokenBucket, ShardedStore, false> bare(
      {.name = "bare"}, TokenBucket::create(per_second(1), 3).value(), {});
  auto rec = std::make_shared<Recorder>();
  bare.set_listener(rec);
  CHECK(bare.acquire("k", 1, at(0)).allowed);
  CHECK(rec->events().empty());
}

TEST_CASE("statistics and the Prometheus text agree", "[i17]") {
  ManualClock clock(at(0));
  Chain<ManualClock> chain(clock);
  auto rpm = make_limit({.name = "rpm", .near_limit_permille = 500},
                        FixedWindow::create(per_minute(4)).value())
                 .value();
  auto tpm = make_limit({.name = "tpm", .unit = Unit::kTokens},
                        TokenBucket::create(per_minute(1000), 1000).value())
                 .value();
  auto items = [&](Cost tokens) {
    return std::vector<ChainItem>{{rpm.get(), "u", 1},
                                  {tpm.get(), "u", tokens}};
  };
  // Allowed, a veto by tpm, a settle below the estimate, a give-back, a
  // denial by rpm, an error.
  ChainDecision d1 = chain.acquire(items(300));
  REQUIRE(d1.allowed);
  REQUIRE(chain.settle(d1, Unit::kTokens, 100).ok());
  REQUIRE_FALSE(chain.acquire(items(1000)));  // tpm refuses, rpm rolled back
  ChainDecision d2 = chain.acquire(items(200));
  REQUIRE(d2.allowed);
  chain.give_back(d2);
  REQUIRE(chain.acquire(items(10)).allowed);
  REQUIRE(chain.acquire(items(10)).allowed);
  REQUIRE(chain.acquire(items(10)).allowed);
  REQUIRE_FALSE(chain.acquire(items(10)));  // rpm: 4 per minute
  rpm->metrics().record_error();

  const Limit* limits[] = {rpm.get(), tpm.get()};
  const std::string text =
      prometheus_text(std::span<const Limit* const>(limits));
  for (const Limit* l : limits) {
    const LimitStatistics s = l->statistics();
    auto m = samples(text, l->name());
    INFO(l->name());
    CHECK(m["ratekeeper_decisions_total/allowed"] == s.counts.allowed);
    CHECK(m["ratekeeper_decisions_total/denied"] == s.counts.denied);
    CHECK(m["ratekeeper_decisions_total/shadow_denied"] ==
          s.counts.shadow_denied);
    CHECK(m["ratekeeper_decisions_total/vetoed"] == s.counts.vetoed);
    CHECK(m["ratekeeper_errors_total"] == s.counts.errors);
    CHECK(m["ratekeeper_near_limit_total"] == s.counts.near_limit);
    CHECK(m["ratekeeper_given_back_total"] == s.given_back);
    CHECK(m["ratekeeper_given_back_units_total"] == s.given_back_units);
    CHECK(m["ratekeeper_listener_errors_total"] == s.listener_errors);
    CHECK(m["ratekeeper_limit_capacity"] == s.capacity);
    CHECK(m["ratekeeper_limit_shadow"] == (s.shadow ? 1u : 0u));
    CHECK(m["ratekeeper_store_keys"] == s.keys);
    CHECK(m.size() == 12);
  }
  // And both say what happened (the model of the calls above).
  const LimitStatistics r = rpm->statistics();
  // Allowed: calls 1, 3 (then given back), 4, 5, 6; near-limit (remaining
  // <= 2 of 4): calls 3 to 6.
  CHECK(r.counts == LimitCounts{5, 1, 0, 1, 1, 4});
  CHECK(r.given_back == 2);  // the veto's and the give-back's roll-backs
  CHECK(r.given_back_units == 2);
  CHECK(r.capacity == 4);
  CHECK(r.keys == 1);
  const LimitStatistics t = tpm->statistics();
  CHECK(t.counts.allowed == 5);
  CHECK(t.counts.denied == 1);
  CHECK(t.counts.vetoed == 1);  // peeked after rpm refused
  CHECK(t.given_back == 2);     // 300 -> 100, and 200 given back
  CHECK(t.given_back_units == 400);
  CHECK(t.capacity == 1000);
}

TEST_CASE("statistics count overridden keys too", "[i17]") {
  // Issue 17 examiner (l3_keys_shadow): 3 plain keys and 10 overridden
  // ones, each called once, are 13 keys held: the limit's store holds 3,
  // its override store 10 (statistics().keys, ratekeeper_store_keys).
  auto l = make_limit({.name = "keys"},
                      TokenBucket::create(per_second(1), 5).value())
               .value();
  const Nanos t{3600 * kSec};
  std::vector<std::string> plain, special;
  for (int i = 0; i < 3; ++i) plain.push_back("p" + std::to_string(i));
  for (int i = 0; i < 10; ++i) special.push_back("o" + std::to_string(i));
  for (const std::string& k : special) {
    REQUIRE(
        l->set_override(k, TokenBucket::create(per_second(2), 50).value(), t)
            .ok());
  }
  // An override set, its key not called yet: nothing held for it.
  CHECK(l->statistics().keys == 0);
  for (const std::string& k : plain) REQUIRE(l->acquire(k, 1, t).allowed);
  for (const std::string& k : special) REQUIRE(l->acquire(k, 7, t).allowed);
  CHECK(l->store_stats().keys == plain.size());  // the limit's store alone
  const LimitStatistics s = l->statistics();
  CHECK(s.keys == plain.size() + special.size());
  const Limit* limits[] = {l.get()};
  const std::string text =
      prometheus_text(std::span<const Limit* const>(limits));
  CHECK(samples(text, "keys")["ratekeeper_store_keys"] == 13);
}

TEST_CASE("statistics from a listener while overrides are set", "[i17]") {
  // keys_held takes no lock: a listener reading statistics() while another
  // thread's set_override holds the limit's mutex (and waits for calls in
  // flight) neither blocks it nor races (run under TSan). Keys only grow
  // here (nothing is idle at a fixed time), so each reading is at most the
  // final count, and the final count is exact: 20 plain + 20 overridden.
  auto l =
      make_limit({.name = "l"}, TokenBucket::create(per_second(1), 100).value())
          .value();
  struct Reader : LimitListener {
    std::atomic<std::uint64_t> most{0};
    void on_allowed(const LimitEvent& e) override {
      const std::uint64_t k = e.limit->statistics().keys;
      std::uint64_t m = most.load();
      while (k > m && !most.compare_exchange_weak(m, k)) {
      }
    }
  };
  auto r = std::make_shared<Reader>();
  l->set_listener(r);
  const Nanos t{3600 * kSec};
  // Catch2's assertions are not thread-safe: the setter records failures.
  std::atomic<int> setter_failures{0};
  std::thread setter([&] {
    for (int i = 0; i < 20; ++i) {
      const std::string k = "o" + std::to_string(i);
      if (!l->set_override(k, TokenBucket::create(per_second(2), 9).value(), t)
               .ok() ||
          !l->acquire(k, 1, t).allowed) {
        setter_failures.fetch_add(1);
      }
    }
  });
  for (int round = 0; round < 5; ++round) {
    for (int i = 0; i < 20; ++i) {
      CHECK(l->acquire("p" + std::to_string(i), 1, t).allowed);
    }
  }
  setter.join();
  CHECK(setter_failures.load() == 0);
  CHECK(l->statistics().keys == 40);
  CHECK(r->most.load() <= 40);
  CHECK(r->most.load() >= 20);
}

TEST_CASE("listeners under threads: every decision heard once", "[i17]") {
  // No refill while the threads run (time is fixed): exactly 100 of the
  // 8 x 50 calls are admitted, the rest denied.
  auto l =
      make_limit({.name = "l"}, FixedWindow::create(per_minute(100)).value())
          .value();
  struct Counter : LimitListener {
    std::atomic<std::uint64_t> allowed{0}, denied{0}, near{0};
    void on_allowed(const LimitEvent&) override { allowed.fetch_add(1); }
    void on_denied(const LimitEvent&) override { denied.fetch_add(1); }
    void on_near_limit(const LimitEvent&) override { near.fetch_add(1); }
  };
  auto c = std::make_shared<Counter>();
  l->set_listener(c);
  std::atomic<std::uint64_t> admitted{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 50; ++i) {
        if (l->acquire("k", 1, at(0)).allowed) admitted.fetch_add(1);
      }
    });
  }
  for (auto& th : threads) th.join();
  CHECK(admitted.load() == 100);
  CHECK(c->allowed.load() == 100);
  CHECK(c->denied.load() == 300);
  // Near-limit: remaining 10 .. 0 after the call (10% of 100).
  CHECK(c->near.load() == 11);
}
