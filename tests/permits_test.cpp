// Issue 17: concurrency (in-flight) limits in process. ConcurrencyLimit,
// Permit and Permits against a model of holders computed here; in a Chain
// with a rate limit, all or nothing; threads never over the limit.
#include <atomic>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "ratekeeper/budget/accountant.hpp"
#include "ratekeeper/concurrency.hpp"
#include "ratekeeper/policy/fixed_window.hpp"
#include "ratekeeper/policy/token_bucket.hpp"
#include "test_util.hpp"

using namespace ratekeeper;
using std::chrono::seconds;

namespace {

std::unique_ptr<ConcurrencyLimit> make(std::uint64_t limit, Nanos ttl,
                                       std::size_t max_keys = 1 << 20) {
  return ConcurrencyLimit::create(
             {.name = "streams"},
             {.limit = limit, .ttl = ttl, .max_keys = max_keys})
      .value();
}

// The model: per key, holder -> (expiry, slots); a holder counts while
// now < expiry.
struct Model {
  struct Held {
    Nanos expires;
    Cost count;
  };
  std::map<std::string, std::map<int, Held>> keys;
  Cost limit;
  Nanos ttl;

  Cost used(const std::string& k, Nanos now) const {
    Cost u = 0;
    auto it = keys.find(k);
    if (it == keys.end()) return 0;
    for (const auto& [id, h] : it->second) {
      if (h.expires > now) u += h.count;
    }
    return u;
  }
  Nanos reset(const std::string& k, Nanos now) const {
    Nanos r{0};
    auto it = keys.find(k);
    if (it == keys.end()) return r;
    for (const auto& [id, h] : it->second) {
      if (h.expires > now) r = std::max(r, h.expires - now);
    }
    return r;
  }
  // The wait until enough live holders expire for `cost`.
  Nanos wait(const std::string& k, Cost cost, Nanos now) const {
    std::vector<std::pair<Nanos, Cost>> live;
    for (const auto& [id, h] : keys.at(k)) {
      if (h.expires > now) live.emplace_back(h.expires, h.count);
    }
    std::sort(live.begin(), live.end());
    Cost u = used(k, now);
    for (const auto& [at, c] : live) {
      u -= c;
      if (u + cost <= limit) return at - now;
    }
    return kNever;
  }
  Decision decide(const std::string& k, Cost cost, Nanos now) const {
    const Cost u = used(k, now);
    if (cost > limit) return {false, limit, limit - u, kNever, reset(k, now)};
    if (u + cost <= limit) {  // remaining and reset with its own permit
      return {true, limit, limit - u - cost, Nanos{0},
              cost == 0 ? reset(k, now) : ttl};
    }
    return {false, limit, limit - u, wait(k, cost, now), reset(k, now)};
  }
};

}  // namespace

TEST_CASE("permits: the limit per key, exact waits, release", "[i17]") {
  ManualClock clock(seconds(100));
  auto lim = make(3, seconds(10));
  Permits<ManualClock> permits(lim.get(), clock);

  Permit a = permits.acquire("u1");
  clock.advance(seconds(1));
  Permit b = permits.acquire("u1");
  clock.advance(seconds(1));
  Permit c = permits.acquire("u1");
  REQUIRE(a);
  REQUIRE(b);
  REQUIRE(c);
  CHECK(c.decision().remaining == 0);
  CHECK(c.decision().reset_after == seconds(10));  // c expires last
  // Full: the wait is until the first holder's TTL ends (a, at 110 s).
  Permit d = permits.acquire("u1");
  CHECK_FALSE(d);
  CHECK_FALSE(d.held());
  CHECK(d.status().ok());
  CHECK(d.decision().retry_after == seconds(8));
  CHECK(d.decision().reset_after == seconds(10));
  // Two slots at once wait for two expiries (b's, at 111 s).
  CHECK(permits.acquire("u1", 2).decision().retry_after == seconds(9));
  // Above the limit: never.
  CHECK(permits.acquire("u1", 4).decision().never());
  // Another key is another count.
  CHECK(permits.acquire("u2", 3));
  // A release frees the slot at once.
  REQUIRE(b.release().ok());
  CHECK(b.release().code() == absl::StatusCode::kFailedPrecondition);
  Permit e = permits.acquire("u1");
  CHECK(e);
  CHECK(lim->released() == 2);  // b, and the u2 permit at its destruction
  CHECK(lim->late_releases() == 0);
}

TEST_CASE("permits: a leaked permit returns at its TTL, exactly", "[i17]") {
  ManualClock clock(seconds(5));
  auto lim = make(1, seconds(30));
  Permits<ManualClock> permits(lim.get(), clock);
  {
    Permit leaked = permits.acquire("k");
    REQUIRE(leaked);
    Receipt gone = leaked.detach();  // dropped unsettled: never released
    CHECK_FALSE(leaked.held());
  }
  clock.set(seconds(35) - Nanos{1});
  Permit p = permits.acquire("k");
  CHECK_FALSE(p);
  CHECK(p.decision().retry_after == Nanos{1});
  clock.set(seconds(35));
  Permit q = permits.acquire("k");
  CHECK(q);
  CHECK(lim->expired() == 1);
  // A permit acquired without a receipt (Limit::acquire) holds one TTL.
  CHECK(lim->acquire("a", 1, seconds(35)).allowed);
  CHECK_FALSE(lim->acquire("a", 1, seconds(65) - Nanos{1}).allowed);
  CHECK(lim->acquire("a", 1, seconds(65)).allowed);
}

TEST_CASE("permits: a late release of an expired permit frees nothing",
          "[i17]") {
  ManualClock clock(seconds(0));
  auto lim = make(1, seconds(10));
  Permits<ManualClock> permits(lim.get(), clock);
  Permit stale = permits.acquire("k");
  REQUIRE(stale);
  clock.advance(seconds(10));  // its TTL ends
  Permit fresh = permits.acquire("k");
  REQUIRE(fresh);
  clock.advance(seconds(1));
  CHECK(stale.release().ok());  // released late: nothing of fresh's
  CHECK(lim->late_releases() == 1);
  Permit third = permits.acquire("k");
  CHECK_FALSE(third);
  CHECK(third.decision().retry_after == seconds(9));  // fresh's expiry
  // Not yet swept either: the holder expired at 30 s is gone by then.
  clock.set(seconds(30));
  CHECK(fresh.release().ok());
  CHECK(lim->late_releases() == 2);
  CHECK(lim->store_stats().keys == 0);
}

TEST_CASE("permits: renew keeps a streaming holder's permit", "[i17]") {
  ManualClock clock(seconds(0));
  auto lim = make(1, seconds(10));
  Permits<ManualClock> permits(lim.get(), clock);
  Permit streaming = permits.acquire("k");
  REQUIRE(streaming);
  for (int i = 0; i < 5; ++i) {
    clock.advance(seconds(9));
    REQUIRE(streaming.renew().ok());
  }
  // Renewed at 45 s: held until 55 s.
  clock.set(seconds(55) - Nanos{1});
  CHECK_FALSE(permits.acquire("k"));
  clock.set(seconds(55));
  CHECK(streaming.renew().code() == absl::StatusCode::kNotFound);
  Permit next = permits.acquire("k");
  CHECK(next);
  // The renewal that came too late did not take next's slot.
  CHECK_FALSE(permits.acquire("k"));
}

TEST_CASE("permits: decisions against the model, random script", "[i17]") {
  const Nanos ttl = seconds(20);
  auto lim = make(5, ttl);
  Model model{{}, 5, ttl};
  std::mt19937_64 rng(17);
  struct Out {
    std::string key;
    int id;
    Receipt r;
  };
  std::vector<Out> held;
  Nanos now = seconds(1000);
  int next_id = 0, admitted = 0, refused = 0, renews = 0, late = 0;
  for (int step = 0; step < 20'000; ++step) {
    now += Nanos{static_cast<std::int64_t>(rng() % 3'000'000'000ULL)};
    const std::string key = "k" + std::to_string(rng() % 3);
    const int op = static_cast<int>(rng() % 10);
    CAPTURE(step, key, op);
    if (op < 5) {
      const Cost cost = rng() % 7;
      Receipt r;
      const Decision want = model.decide(key, cost, now);
      const Decision got = lim->take(key, cost, now, r);
      REQUIRE(got.allowed == want.allowed);
      REQUIRE(got.remaining == want.remaining);
      REQUIRE(got.retry_after == want.retry_after);
      REQUIRE(got.reset_after == want.reset_after);
      if (got.allowed && cost > 0) {
        REQUIRE(r.open());
        model.keys[key][next_id] = {now + ttl, cost};
        held.push_back({key, next_id++, std::move(r)});
        ++admitted;
      } else {
        REQUIRE_FALSE(r.open());
        refused += got.allowed ? 0 : 1;
      }
    } else if (op < 8 && !held.empty()) {
      const std::size_t j = rng() % held.size();
      Out o = std::move(held[j]);
      held.erase(held.begin() + static_cast<std::ptrdiff_t>(j));
      auto& m = model.keys[o.key];
      if (m.at(o.id).expires <= now) ++late;
      m.erase(o.id);
      REQUIRE(lim->settle(o.r, 0, now).ok());
      REQUIRE(lim->settle(o.r, 0, now).status().code() ==
              absl::StatusCode::kFailedPrecondition);
    } else if (!held.empty()) {
      Out& o = held[rng() % held.size()];
      auto& h = model.keys[o.key].at(o.id);
      absl::StatusOr<Decision> d = lim->renew(o.r, now);
      if (h.expires > now) {
        REQUIRE(d.ok());
        h.expires = now + ttl;
        ++renews;
      } else {
        REQUIRE(d.status().code() == absl::StatusCode::kNotFound);
      }
    }
    // Every key's room, as peek reports it, is the model's.
    const Decision p = lim->peek(key, 1, now);
    const Decision w = model.decide(key, 1, now);
    REQUIRE(p.allowed == w.allowed);
    REQUIRE(p.remaining == w.remaining);
    REQUIRE(p.retry_after == w.retry_after);
    REQUIRE(p.reset_after == w.reset_after);
  }
  CHECK(admitted > 3'000);
  CHECK(refused > 1'000);
  CHECK(renews > 500);
  CHECK(late > 100);
  CHECK(lim->late_releases() == static_cast<std::uint64_t>(late));
}

TEST_CASE("permits: keys are dropped, max_keys refuses clearly", "[i17]") {
  ManualClock clock(seconds(0));
  auto lim = make(2, seconds(10), 2);
  Permits<ManualClock> permits(lim.get(), clock);
  {
    Permit a = permits.acquire("a");
    Permit b = permits.acquire("b");
    REQUIRE(a);
    REQUIRE(b);
    CHECK(permits.acquire("a"));  // a key held already: room
    Permit c = permits.acquire("c");
    CHECK_FALSE(c);
    CHECK(c.status().code() == absl::StatusCode::kResourceExhausted);
    CHECK(c.decision().retry_after == seconds(1));
    CHECK(lim->store_stats().denied_full == 1);
    CHECK(lim->store_stats().keys == 2);
  }
  CHECK(lim->store_stats().keys == 0);  // all released: no key kept
  // Keys whose permits expired make room: when touched again, or swept
  // from every shard when a new key finds the table full.
  for (int i = 0; i < 1000; ++i) {
    Receipt r;  // dropped: each permit ends by its TTL
    const std::string k = "k" + std::to_string(i % 2);
    REQUIRE(lim->take(k, 1, Nanos{i * 10'000'000'001LL}, r).allowed);
  }
  CHECK(lim->expired() == 998);
  CHECK(lim->store_stats().keys == 2);
  Receipt r;
  CHECK(lim->take("new", 2, seconds(100'000), r).allowed);
  CHECK(lim->expired() == 1000);
  CHECK(lim->store_stats().keys == 1);
  CHECK(lim->store_stats().denied_full == 1);
}

TEST_CASE("permits: peek on a full table decides as hold", "[i17]") {
  // max_keys 1: "a" holds the table; a new key is refused by hold with
  // nothing left (remaining 0) and full_retry, and peek says the same
  // before it, field by field, as does a chain's peek.
  ManualClock clock(seconds(100));
  auto lim = make(2, seconds(10), 1);
  Permits<ManualClock> permits(lim.get(), clock);
  Chain<ManualClock> chain(clock);
  const Decision full{false, 2, 0, seconds(1), Nanos{0}};
  Permit a = permits.acquire("a");
  REQUIRE(a);
  for (int step = 0; step < 3; ++step) {  // "a" live throughout
    clock.advance(seconds(3));
    const Decision p = lim->peek("b", 1, clock.now());
    CHECK(p == full);
    const ChainItem items[] = {{lim.get(), "b", 1}};
    const ChainDecision cp = chain.peek(items);
    CHECK_FALSE(cp.allowed);
    CHECK(cp.retry_after == seconds(1));
    Permit b = permits.acquire("b");
    CHECK(b.decision() == full);
    CHECK(b.status().code() == absl::StatusCode::kResourceExhausted);
    CHECK(b.decision() == p);
  }
  // A cost of 0 (holds nothing) and a cost above the limit are decided
  // without the table, by peek as by hold.
  Receipt r;
  CHECK(lim->peek("b", 0, clock.now()) == lim->take("b", 0, clock.now(), r));
  CHECK(lim->peek("b", 0, clock.now()).allowed);
  CHECK(lim->peek("b", 3, clock.now()) == lim->take("b", 3, clock.now(), r));
  CHECK(lim->peek("b", 3, clock.now()).retry_after == kNever);
  // "a" detached: it ends at its TTL (110 s); hold would sweep it, so peek
  // admits "b" from then on, and says what hold then does.
  Receipt kept = a.detach();
  clock.set(seconds(110) - Nanos{1});
  CHECK(lim->peek("b", 1, clock.now()) == full);
  clock.set(seconds(110));
  const Decision p = lim->peek("b", 2, clock.now());
  CHECK(p == Decision{true, 2, 0, Nanos{0}, seconds(10)});
  Permit b = permits.acquire("b", 2);
  CHECK(b.decision() == p);
  CHECK(lim->store_stats().denied_full == 3);
}

TEST_CASE("permits: one limit, two clocks mixed (docs/concurrency.md)",
          "[i17]") {
  // The defaults the doc names.
  static_assert(std::is_same_v<Permits<>, Permits<SteadyClock>>);
  static_assert(std::is_same_v<Chain<>, Chain<SteadyClock>>);
  static_assert(std::is_same_v<Accountant<>, Accountant<SystemClock>>);
  // Times of each kind: a day since boot, 2026 since 1970.
  const Nanos steady = std::chrono::hours(24);
  const Nanos system = std::chrono::seconds(1'796'083'200);
  auto lim = make(1, seconds(60));
  // Taken at a steady time, seen at a system time: expired at once, its
  // release late (it frees nothing more).
  Receipt a;
  REQUIRE(lim->take("k", 1, steady, a).allowed);
  CHECK(lim->peek("k", 1, system).allowed);
  REQUIRE(lim->settle(a, 0, system).ok());
  CHECK(lim->late_releases() == 1);
  // Taken at a system time: at steady times it never expires.
  Receipt b, c;
  REQUIRE(lim->take("k", 1, system, b).allowed);
  const Decision d =
      lim->take("k", 1, steady + std::chrono::hours(24 * 365), c);
  CHECK_FALSE(d.allowed);
  CHECK(d.retry_after > std::chrono::hours(24 * 365 * 50));
  // Released at a steady time, it is found (by its id) and freed.
  REQUIRE(lim->settle(b, 0, steady).ok());
  CHECK(lim->released() == 1);
  CHECK(lim->peek("k", 1, steady).allowed);
}

TEST_CASE("permits: N threads never hold more than the limit", "[i17]") {
  // Real threads on the real clock; a TTL far beyond the run, so only
  // releases free slots. The counter of holders is checked at every admit.
  constexpr std::uint64_t kLimit = 3;
  auto lim = make(kLimit, std::chrono::hours(1));
  Permits<> permits(lim.get());
  const std::string keys[] = {"team-a", "team-b"};
  std::atomic<std::uint64_t> holding[2] = {0, 0};
  std::atomic<std::uint64_t> over{0}, admitted{0}, refused{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 2'000; ++i) {
        const int k = (t + i) % 2;
        Permit p = permits.acquire(keys[k]);
        if (!p) {
          refused.fetch_add(1);
          continue;
        }
        admitted.fetch_add(1);
        if (holding[k].fetch_add(1) + 1 > kLimit) over.fetch_add(1);
        std::this_thread::yield();
        holding[k].fetch_sub(1);
        // ~Permit releases it (after the counter went down).
      }
    });
  }
  for (auto& th : threads) th.join();
  CHECK(over.load() == 0);
  CHECK(admitted.load() + refused.load() == 16'000);
  CHECK(admitted.load() > 0);
  CHECK(lim->released() == admitted.load());
  CHECK(lim->store_stats().keys == 0);
}

namespace {

// A chain of a permit and a rate limit (3 requests a minute, fixed).
struct ChainRig {
  ManualClock clock{std::chrono::hours(1)};
  std::unique_ptr<ConcurrencyLimit> streams = make(2, seconds(60));
  std::unique_ptr<Limit> rpm =
      make_limit({.name = "rpm"}, FixedWindow::create(per_minute(3)).value())
          .value();
  std::unique_ptr<Limit> tpm =
      make_limit({.name = "tpm", .unit = Unit::kTokens},
                 TokenBucket::create(per_minute(1'000), 1'000).value())
          .value();
  Chain<ManualClock> chain{clock};

  std::uint64_t free_slots() {
    return streams->peek("u", 0, clock.now()).remaining;
  }
  std::uint64_t rpm_left() { return rpm->peek("u", 0, clock.now()).remaining; }
  std::uint64_t tpm_left() { return tpm->peek("u", 0, clock.now()).remaining; }
};

}  // namespace

TEST_CASE("permits in a chain: all or nothing with a rate limit", "[i17]") {
  ChainRig g;
  SECTION("the rate limit refuses: the permit is released") {
    for (int i = 0; i < 3; ++i) {
      REQUIRE(g.rpm->acquire("u", 1, g.clock.now()).allowed);
    }
    ChainDecision d =
        g.chain.acquire({{g.streams.get(), "u", 1}, {g.rpm.get(), "u", 1}});
    CHECK_FALSE(d);
    CHECK(d.binding == 1);
    CHECK_FALSE(d.results[0].receipt.open());
    CHECK(g.free_slots() == 2);
  }
  SECTION("the permit refuses: the rate limit's take is given back") {
    Permits<ManualClock> permits(g.streams.get(), g.clock);
    Permit a = permits.acquire("u");
    Permit b = permits.acquire("u");
    ChainDecision d =
        g.chain.acquire({{g.rpm.get(), "u", 1}, {g.streams.get(), "u", 1}});
    CHECK_FALSE(d);
    CHECK(d.binding == 1);
    CHECK(d.retry_after == seconds(60));  // a's TTL
    CHECK(g.rpm_left() == 3);
  }
  SECTION("tokens settled while streaming leave the permit held") {
    ChainDecision d = g.chain.acquire({{g.streams.get(), "u", 1},
                                       {g.rpm.get(), "u", 1},
                                       {g.tpm.get(), "u", 500}});
    REQUIRE(d);
    CHECK(g.free_slots() == 1);
    REQUIRE(g.chain.settle(d, Unit::kTokens, 200).ok());
    CHECK(g.tpm_left() == 800);
    // Requests are counted per call: settling them leaves the permit too.
    REQUIRE(g.chain.settle(d, Unit::kRequests, 1).ok());
    CHECK(g.free_slots() == 1);
    CHECK(d.results[0].receipt.open());
    // The stream ends: release ends the permit and nothing else.
    CHECK(g.chain.release(d) == 1);
    CHECK(g.free_slots() == 2);
    CHECK(g.rpm_left() == 2);
    CHECK(g.chain.release(d) == 0);
  }
  SECTION("settle by unit skips permits: alone, kFailedPrecondition") {
    // {permit, tpm}: the permit is the only request-unit result, and settle
    // by unit never touches a permit, so none was open to settle.
    ChainDecision d =
        g.chain.acquire({{g.streams.get(), "u", 1}, {g.tpm.get(), "u", 300}});
    REQUIRE(d);
    const absl::Status st = g.chain.settle(d, Unit::kRequests, 1);
    CHECK(st.code() == absl::StatusCode::kFailedPrecondition);
    CHECK(d.results[0].receipt.open());  // still held
    CHECK(g.free_slots() == 1);
    CHECK(d.results[1].receipt.open());  // the tokens untouched
    CHECK(g.tpm_left() == 700);
    REQUIRE(g.chain.settle(d, Unit::kTokens, 100).ok());
    CHECK(g.tpm_left() == 900);
    CHECK(g.free_slots() == 1);
    CHECK(g.chain.release(d) == 1);
    CHECK(g.free_slots() == 2);
  }
  SECTION("give_back releases the permit with the rest") {
    ChainDecision d =
        g.chain.acquire({{g.streams.get(), "u", 1}, {g.tpm.get(), "u", 300}});
    REQUIRE(d);
    g.chain.give_back(d);
    CHECK(g.free_slots() == 2);
    CHECK(g.tpm_left() == 1'000);
  }
  SECTION("a chain's permit never released ends by its TTL") {
    {
      ChainDecision d = g.chain.acquire({{g.streams.get(), "u", 2}});
      REQUIRE(d);
    }
    CHECK(g.free_slots() == 0);
    g.clock.advance(seconds(60));
    CHECK(g.free_slots() == 2);
  }
}

TEST_CASE("permits: bad configuration, foreign receipts", "[i17]") {
  CHECK(ConcurrencyLimit::create({.name = "c"}, {.limit = 0}).status().code() ==
        absl::StatusCode::kInvalidArgument);
  CHECK(ConcurrencyLimit::create({.name = "c"}, {.limit = 1, .ttl = Nanos{0}})
            .status()
            .code() == absl::StatusCode::kInvalidArgument);
  CHECK(ConcurrencyLimit::create({.name = "c"}, {.limit = 1, .max_keys = 0})
            .status()
            .code() == absl::StatusCode::kInvalidArgument);
  CHECK(ConcurrencyLimit::create({.name = "c", .charge_on_reject = true},
                                 {.limit = 1})
            .status()
            .code() == absl::StatusCode::kInvalidArgument);
  CHECK(ConcurrencyLimit::create({.name = "bad name"}, {.limit = 1})
            .status()
            .code() == absl::StatusCode::kInvalidArgument);
  auto a = make(1, seconds(10));
  auto b = make(1, seconds(10));
  Receipt r;
  REQUIRE(a->take("k", 1, seconds(1), r).allowed);
  CHECK(b->settle(r, 0, seconds(1)).status().code() ==
        absl::StatusCode::kInvalidArgument);
  CHECK(b->renew(r, seconds(1)).status().code() ==
        absl::StatusCode::kInvalidArgument);
  CHECK(a->settle(r, 0, seconds(1)).ok());
  // A moved-over permit releases what it held first.
  ManualClock clock;
  Permits<ManualClock> permits(a.get(), clock);
  Permit p = permits.acquire("k");
  REQUIRE(p);
  p = permits.acquire("k");  // refused: a's slot is still p's
  CHECK_FALSE(p);
  CHECK(permits.acquire("k"));  // p's old permit was released by the move
}
