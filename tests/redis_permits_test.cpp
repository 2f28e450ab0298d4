// Issue 17: RedisPermits against a redis-server of the test's own: the
// in-process ConcurrencyLimit (checked against a model in permits_test) as
// its twin on a driven clock, a real TTL, threads, a chain, fail modes.
#include <signal.h>

#include <atomic>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "ratekeeper/policy/fixed_window.hpp"
#include "ratekeeper/redis/permits.hpp"
#include "ratekeeper/store/redis.hpp"
#include "redis_server.hpp"
#include "test_util.hpp"
#include "wait.hpp"

using namespace ratekeeper;
using rk_test::RedisServer;
using std::chrono::milliseconds;
using std::chrono::seconds;

namespace {

std::shared_ptr<RedisClient> client_for(const RedisServer& s) {
  auto c = RedisClient::create({.port = s.port(),
                                .prefix = "rkt:",
                                .connect_timeout = seconds(2),
                                .command_timeout = seconds(5)});
  REQUIRE(c.ok());
  return *c;
}

// 2026-12-01 UTC, in whole microseconds (test_time).
constexpr Nanos kT0{1'796'083'200LL * 1'000'000'000};

std::unique_ptr<RedisPermits> permits_on(std::shared_ptr<RedisClient> c,
                                         std::uint64_t limit, Nanos ttl,
                                         RedisLimitOptions o = {
                                             .test_time = true}) {
  return RedisPermits::create({.name = "streams"}, {.limit = limit, .ttl = ttl},
                              std::move(c), o)
      .value();
}

}  // namespace

TEST_CASE("redis permits: the same decisions as in process, driven clock",
          "[i17][redis]") {
  RedisServer server;
  auto redis = permits_on(client_for(server), 4, seconds(20));
  auto local = ConcurrencyLimit::create({.name = "streams"},
                                        {.limit = 4, .ttl = seconds(20)})
                   .value();
  std::mt19937_64 rng(1717);
  struct Out {
    Receipt redis, local;
  };
  std::vector<Out> held;
  Nanos now = kT0;
  int admitted = 0, refused = 0, renewed = 0, late = 0;
  for (int step = 0; step < 3'000; ++step) {
    now += std::chrono::microseconds(rng() % 3'000'000);
    const std::string key = "k" + std::to_string(rng() % 2);
    const int op = static_cast<int>(rng() % 10);
    CAPTURE(step, key, op);
    Decision got, want;
    if (op < 5) {
      const Cost cost = rng() % 6;
      Out o;
      got = redis->take(key, cost, now, o.redis);
      want = local->take(key, cost, now, o.local);
      REQUIRE(o.redis.open() == o.local.open());
      if (o.redis) {
        REQUIRE(o.redis.at() == now);
        held.push_back(std::move(o));
        ++admitted;
      } else if (!got.allowed) {
        ++refused;
      }
    } else if (op < 8 && !held.empty()) {
      const std::size_t j = rng() % held.size();
      Out o = std::move(held[j]);
      held.erase(held.begin() + static_cast<std::ptrdiff_t>(j));
      absl::StatusOr<Decision> g = redis->settle(o.redis, 0, now);
      absl::StatusOr<Decision> w = local->settle(o.local, 0, now);
      REQUIRE(g.ok());
      REQUIRE(w.ok());
      got = *g;
      want = *w;
      REQUIRE_FALSE(o.redis.open());
    } else if (!held.empty()) {
      Out& o = held[rng() % held.size()];
      absl::StatusOr<Decision> g = redis->renew(o.redis, now);
      absl::StatusOr<Decision> w = local->renew(o.local, now);
      REQUIRE(g.status().code() == w.status().code());
      if (!g.ok()) continue;
      got = *g;
      want = *w;
      ++renewed;
    } else {
      const Cost cost = rng() % 6;
      got = redis->peek(key, cost, now);
      want = local->peek(key, cost, now);
    }
    REQUIRE(got == want);
    const Decision p = redis->peek(key, 1, now);
    REQUIRE(p == local->peek(key, 1, now));
  }
  late = static_cast<int>(redis->late_releases());
  CHECK(admitted > 500);
  CHECK(refused > 100);
  CHECK(renewed > 100);
  CHECK(late > 20);
  CHECK(redis->late_releases() == local->late_releases());
  CHECK(redis->released() == local->released());
}

TEST_CASE("redis permits: TTL, late release, renew (driven clock)",
          "[i17][redis]") {
  RedisServer server;
  auto lim = permits_on(client_for(server), 1, seconds(30));
  Receipt leaked, fresh, late;
  REQUIRE(lim->take("k", 1, kT0, leaked).allowed);
  leaked = Receipt();  // a crashed holder: never released
  const Decision d = lim->take("k", 1, kT0 + seconds(30) - Nanos{1'000}, late);
  CHECK_FALSE(d.allowed);
  CHECK(d.retry_after == Nanos{1'000});
  REQUIRE(lim->take("k", 1, kT0 + seconds(30), late).allowed);
  // late's TTL ends at 60 s; fresh takes the slot; late's release is late.
  REQUIRE(lim->take("k", 1, kT0 + seconds(60), fresh).allowed);
  REQUIRE(lim->settle(late, 0, kT0 + seconds(61)).ok());
  CHECK(lim->late_releases() == 1);
  Receipt third;
  CHECK_FALSE(lim->take("k", 1, kT0 + seconds(61), third).allowed);
  // Renewed every 29 s, fresh holds on past its first TTL.
  for (int i = 1; i <= 3; ++i) {
    REQUIRE(lim->renew(fresh, kT0 + seconds(60 + 29 * i)).ok());
  }
  CHECK_FALSE(
      lim->take("k", 1, kT0 + seconds(147 + 30) - Nanos{1'000}, third).allowed);
  CHECK(lim->renew(fresh, kT0 + seconds(177)).status().code() ==
        absl::StatusCode::kNotFound);
  CHECK(lim->take("k", 1, kT0 + seconds(177), third).allowed);
}

TEST_CASE("redis permits: a crashed holder's permit returns by Redis's TTL",
          "[i17][redis]") {
  RedisServer server;
  auto client = client_for(server);
  // Redis's own clock: a short real TTL, waited for with a deadline.
  auto lim = permits_on(client, 1, milliseconds(300), {});
  Permits<> permits(lim.get());
  // Before the acquire: Redis's TIME at the acquire is later than this.
  const auto t0 = std::chrono::steady_clock::now();
  {
    Permit crashed = permits.acquire("k");
    REQUIRE(crashed);
    Receipt gone = crashed.detach();  // its process "dies" holding it
  }
  Permit blocked = permits.acquire("k");
  REQUIRE_FALSE(blocked);
  CHECK(blocked.decision().retry_after <= milliseconds(300));
  CHECK(blocked.decision().retry_after > Nanos{0});
  Permit next;
  CHECK(rk_test::eventually([&] {
    next = permits.acquire("k");
    return static_cast<bool>(next);
  }));
  // Not before its TTL: 300 ms of Redis's clock after the acquire, which
  // came after t0 (1 ms of slack for the two clocks' readings).
  CHECK(std::chrono::steady_clock::now() - t0 >= milliseconds(299));
  // The key lives only as long as its holders.
  const std::string key = redis_key("rkt:", "streams", {}, "k");
  const auto pttl = client->command({"PTTL", key});
  REQUIRE(pttl.ok());
  CHECK(std::stoll(*pttl) > 0);
  CHECK(std::stoll(*pttl) <= 302);
  REQUIRE(next.release().ok());
  CHECK(*client->command({"EXISTS", key}) == "0");
}

TEST_CASE("redis permits: threads never hold more than the limit",
          "[i17][redis]") {
  RedisServer server;
  constexpr std::uint64_t kLimit = 2;
  auto lim = permits_on(client_for(server), kLimit, std::chrono::hours(1), {});
  Permits<> permits(lim.get());
  std::atomic<std::uint64_t> holding{0}, over{0}, admitted{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 6; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 150; ++i) {
        Permit p = permits.acquire("shared");
        if (!p) continue;
        admitted.fetch_add(1);
        if (holding.fetch_add(1) + 1 > kLimit) over.fetch_add(1);
        std::this_thread::yield();
        holding.fetch_sub(1);
      }
    });
  }
  for (auto& th : threads) th.join();
  CHECK(over.load() == 0);
  CHECK(admitted.load() > 0);
  CHECK(lim->released() == admitted.load());
  CHECK(lim->fallbacks() == 0);
}

TEST_CASE("redis permits in a chain: all or nothing", "[i17][redis]") {
  RedisServer server;
  auto streams = permits_on(client_for(server), 1, seconds(60), {});
  auto rpm =
      make_limit({.name = "rpm"}, FixedWindow::create(per_minute(2)).value())
          .value();
  Chain<> chain;
  Permits<> permits(streams.get());
  {
    Permit busy = permits.acquire("u");
    REQUIRE(busy);
    ChainDecision d =
        chain.acquire({{rpm.get(), "u", 1}, {streams.get(), "u", 1}});
    CHECK_FALSE(d);
    CHECK(rpm->peek("u", 0, chain.now()).remaining == 2);  // given back
  }
  REQUIRE(rpm->acquire("u", 2, chain.now()).allowed);
  ChainDecision d =
      chain.acquire({{streams.get(), "u", 1}, {rpm.get(), "u", 1}});
  CHECK_FALSE(d);
  CHECK(d.binding == 1);
  CHECK(streams->peek("u", 0, chain.now()).remaining == 1);  // released
  CHECK(streams->released() == 2);
}

TEST_CASE("redis permits: Redis killed, the fail mode decides",
          "[i17][redis]") {
  RedisServer server;
  auto client = client_for(server);
  auto closed = permits_on(client, 4, seconds(60),
                           {.fail = FailMode::kClosed,
                            .fail_retry = milliseconds(250),
                            .test_time = true});
  auto open = permits_on(client, 4, seconds(60),
                         {.fail = FailMode::kOpen, .test_time = true});
  auto local =
      permits_on(client, 4, seconds(60),
                 {.fail = FailMode::kLocal, .instances = 2, .test_time = true});
  Receipt held;
  REQUIRE(closed->take("k", 1, kT0, held).allowed);
  server.stop(SIGKILL);

  Receipt r;
  const Decision c = closed->take("k", 1, kT0, r);
  CHECK_FALSE(c.allowed);
  CHECK(c.retry_after == milliseconds(250));
  CHECK_FALSE(r.open());
  CHECK(closed->fallbacks() == 1);
  // The release of a permit Redis holds cannot be made now: kUnavailable,
  // the receipt closed, the release queued with the acquire's (above).
  CHECK(closed->settle(held, 0, kT0).status().code() ==
        absl::StatusCode::kUnavailable);
  CHECK_FALSE(held.open());
  // (The acquire's too, if it may have reached Redis before it died.)
  CHECK(closed->queued_releases() >= 1);
  CHECK(closed->queued_releases() <= 2);

  const Decision o = open->take("k", 1, kT0, r);
  CHECK(o.allowed);
  CHECK_FALSE(r.open());  // nothing held anywhere
  CHECK(open->fallbacks() == 1);

  // kLocal: this instance's share, 4 / 2 = 2, held in process.
  Receipt l1, l2, l3;
  CHECK(local->take("k", 1, kT0, l1).allowed);
  CHECK(local->take("k", 1, kT0, l2).allowed);
  CHECK_FALSE(local->take("k", 1, kT0, l3).allowed);
  CHECK(local->fallbacks() == 3);
  REQUIRE(local->settle(l1, 0, kT0).ok());  // released in process
  CHECK(local->take("k", 1, kT0, l3).allowed);
  REQUIRE(local->renew(l2, kT0 + seconds(1)).ok());

  // Redis back (empty): it decides again.
  server.start();
  Receipt back;
  CHECK(rk_test::eventually(
      [&] { return closed->take("k", 4, kT0, back).allowed; }));
  CHECK(back.open());
  CHECK(closed->queued_releases() == 0);  // sent (to an empty Redis)
  CHECK(closed->dropped_releases() == 0);
  REQUIRE(closed->settle(back, 0, kT0).ok());
}

TEST_CASE("redis permits: credentials Redis refuses are not an outage",
          "[i17][redis]") {
  RedisServer server;
  auto client = client_for(server);
  auto open = permits_on(client, 4, seconds(60),
                         {.fail = FailMode::kOpen, .test_time = true});
  Receipt r;
  REQUIRE(open->take("k", 1, kT0, r).allowed);
  // The default user may no longer run scripts (NOPERM): refused whatever
  // the fail mode, counted apart from the fallbacks.
  REQUIRE(*client->command(
              {"ACL", "SETUSER", "default", "-evalsha", "-eval"}) == "OK");
  Receipt refused;
  const Decision d = open->take("k", 1, kT0, refused);
  CHECK_FALSE(d.allowed);
  CHECK_FALSE(refused.open());
  CHECK(open->auth_failures() == 1);
  CHECK(open->fallbacks() == 0);
  REQUIRE(*client->command({"ACL", "SETUSER", "default", "+@all"}) == "OK");
  REQUIRE(open->settle(r, 0, kT0).ok());
}

namespace {

// A client that gives up on Redis soon: a paused Redis times out.
std::shared_ptr<RedisClient> impatient_client(const RedisServer& s) {
  auto c = RedisClient::create({.port = s.port(),
                                .prefix = "rkt:",
                                .connect_timeout = milliseconds(500),
                                .command_timeout = milliseconds(500)});
  REQUIRE(c.ok());
  return *c;
}

// The holders of a key's sorted set (tombstones, "x...", left out).
std::vector<std::string> holders(RedisClient& c, std::string_view key) {
  const std::string k = redis_key("rkt:", "streams", {}, key);
  std::vector<std::string> out;
  const auto all = c.command({"ZRANGE", k, "0", "-1"});
  REQUIRE(all.ok());
  std::string line;
  for (const char ch : *all + "\n") {
    if (ch != '\n') {
      line += ch;
      continue;
    }
    if (!line.empty() && line[0] != 'x') out.push_back(line);
    line.clear();
  }
  return out;
}

}  // namespace

TEST_CASE("redis permits: an acquire Redis did not answer is released",
          "[i17][redis]") {
  // Redis paused (SIGSTOP) while an acquire waits: the call times out and
  // the fail mode answers, but Redis runs the queued script when it
  // resumes. Its holder must not keep the slot for the TTL (60 s): the
  // next call that reaches Redis releases it.
  const FailMode mode =
      GENERATE(FailMode::kClosed, FailMode::kOpen, FailMode::kLocal);
  CAPTURE(static_cast<int>(mode));
  RedisServer server;
  auto client = impatient_client(server);
  auto lim = permits_on(client, 1, seconds(60), {.fail = mode, .instances = 1});
  Permits<> permits(lim.get());
  REQUIRE(rk_test::eventually([&] {  // the script loaded
    Permit warm = permits.acquire("warm");
    return warm.held() && warm.status().ok();
  }));
  REQUIRE(rk_test::eventually([&] {  // anything a slow call queued, sent
    static_cast<void>(lim->peek("warm", 0, permits.now()));
    return lim->queued_releases() == 0;
  }));
  server.signal(SIGSTOP);
  {
    Permit p = permits.acquire("user");
    CHECK(p.status().code() == absl::StatusCode::kUnavailable);
    CHECK(static_cast<bool>(p) == (mode != FailMode::kClosed));
    CHECK(p.held() == (mode == FailMode::kLocal));  // in process
    CHECK(lim->queued_releases() == 1);
  }  // dropped: whatever Redis does with the acquire, nobody holds it
  server.signal(SIGCONT);
  const auto resumed = std::chrono::steady_clock::now();
  Permit again;
  CHECK(rk_test::eventually([&] {
    again = permits.acquire("user");
    return static_cast<bool>(again) && again.status().ok();
  }));
  CHECK(std::chrono::steady_clock::now() - resumed < seconds(30));
  CHECK(again.held());
  CHECK(rk_test::eventually([&] {  // sent before the acquire, or by a peek
    static_cast<void>(lim->peek("user", 0, permits.now()));
    return lim->queued_releases() == 0;
  }));
  CHECK(lim->dropped_releases() == 0);
  // Redis holds the new permit only.
  CHECK(holders(*client, "user").size() == 1);
  REQUIRE(again.release().ok());
  CHECK(holders(*client, "user").empty());
}

TEST_CASE("redis permits: a release Redis did not answer is sent later",
          "[i17][redis]") {
  // The breaker opened by calls that timed out: the release is turned away
  // without reaching Redis. It is queued, and sent once Redis answers.
  RedisServer server;
  auto client = impatient_client(server);
  auto lim = permits_on(client, 1, seconds(60), {.fail = FailMode::kClosed});
  Permits<> permits(lim.get());
  Permit p = permits.acquire("user");
  REQUIRE(p);
  server.signal(SIGSTOP);
  for (int i = 0; i < 3; ++i) {  // breaker_failures: 3 timeouts open it
    Permit other = permits.acquire("other" + std::to_string(i));
    CHECK_FALSE(other);
  }
  const absl::Status st = p.release();
  CHECK(st.code() == absl::StatusCode::kUnavailable);
  CHECK_FALSE(p.held());  // nothing to release again
  // The release, and the acquires whose scripts Redis may run on resuming
  // (not those the breaker turned away unsent).
  CHECK(lim->queued_releases() >= 2);
  CHECK(lim->queued_releases() <= 4);
  server.signal(SIGCONT);
  Permit again;
  CHECK(rk_test::eventually([&] {
    again = permits.acquire("user");
    return static_cast<bool>(again);
  }));
  CHECK(rk_test::eventually([&] {
    static_cast<void>(lim->peek("user", 0, permits.now()));
    return lim->queued_releases() == 0;
  }));
  CHECK(lim->dropped_releases() == 0);
  CHECK(holders(*client, "user").size() == 1);
  for (int i = 0; i < 3; ++i) {
    CHECK(holders(*client, "other" + std::to_string(i)).empty());
  }
}

TEST_CASE("redis permits: a release that reaches Redis before its acquire",
          "[i17][redis]") {
  // The script itself: "cancel" of a holder Redis has not added leaves a
  // tombstone; the acquire, run after it, adds nothing and consumes it. A
  // tombstone holds no slot and expires with the TTL.
  RedisServer server;
  auto client = client_for(server);
  const std::string k = redis_key("rkt:", "streams", {}, "k");
  const std::string_view keys[] = {k};
  const auto call = [&](std::string_view now_us, std::string_view op,
                        std::string_view member, std::string_view cost) {
    const std::string_view args[] = {now_us, op, "2", "10000000", member, cost};
    auto r = client->eval_ints(detail::redis_permits_script(), keys, args);
    REQUIRE(r.ok());
    return std::vector<std::int64_t>(r->begin(), r->end());
  };
  const std::string t0 = "1796083200000000";
  // {ok, now, remaining, retry_after, reset_after, expiry}
  CHECK(call(t0, "cancel", "1:late", "0")[0] == 0);  // nothing removed
  CHECK(*client->command({"ZCARD", k}) == "1");      // the tombstone
  // A tombstone counts no slot: two slots free.
  CHECK(call(t0, "peek", "", "2") ==
        std::vector<std::int64_t>{1, 1796083200000000, 0, 0, 10000000,
                                  1796083210000000});
  // The late acquire adds nothing, and takes the tombstone away.
  CHECK(call(t0, "acquire", "1:late", "1")[0] == 0);
  CHECK(*client->command({"ZCARD", k}) == "0");
  CHECK(call(t0, "acquire", "1:a", "1")[0] == 1);
  // A cancel that finds its holder removes it (no tombstone).
  CHECK(call(t0, "cancel", "1:a", "0")[0] == 1);
  CHECK(*client->command({"EXISTS", k}) == "0");
  // A tombstone no acquire came for ends at its TTL.
  CHECK(call(t0, "cancel", "1:never", "0")[0] == 0);
  CHECK(call("1796083210000000", "acquire", "2:b", "2") ==
        std::vector<std::int64_t>{1, 1796083210000000, 0, 0, 10000000,
                                  1796083220000000});
  CHECK(*client->command({"ZCARD", k}) == "1");
}
