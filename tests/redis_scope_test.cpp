// Issue 16, tenants: the scope of a Redis key (RedisScope). A per-tenant
// key (the default) counts per tenant; a global one once, whichever tenant
// or chain it is used through. A chain mixing them is one script on a
// single Redis and one per slot on a Cluster, all or nothing either way;
// prefixes and names with braces are refused, tenants and keys with braces
// are hex.
#include <hiredis/hiredis.h>

#include <algorithm>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "ratekeeper/budget/redis_accountant.hpp"
#include "ratekeeper/store/in_memory.hpp"
#include "ratekeeper/store/redis.hpp"
#include "redis_server.hpp"
#include "test_prices.hpp"
#include "test_util.hpp"

using namespace ratekeeper;
using rk_test::RedisCluster;
using rk_test::RedisServer;

namespace {

constexpr std::int64_t kUs = 1'000;
const Nanos kT0{1'796'083'200LL * 1'000'000'000};  // 2026-12-01 UTC

std::shared_ptr<RedisClient> client_at(int port, bool cluster) {
  // Generous timeouts: these tests are about decisions, not time-outs.
  auto c = RedisClient::create({.port = port,
                                .prefix = "rkt:",
                                .connect_timeout = std::chrono::seconds(2),
                                .command_timeout = std::chrono::seconds(5),
                                .cluster = cluster});
  REQUIRE(c.ok());
  return *c;
}

// A wait in nanoseconds rounded up to the microsecond: what Redis answers.
Nanos ceil_us(Nanos d) {
  if (d == kNever || d <= Nanos{0}) return d < Nanos{0} ? Nanos{0} : d;
  return Nanos{(d.count() + kUs - 1) / kUs * kUs};
}

// One command to the Redis at `port`, through hiredis directly (not the
// library under test): an integer reply, or a string's text.
std::string raw_command(int port, const std::vector<std::string>& argv) {
  redisContext* c = redisConnectWithTimeout("127.0.0.1", port, timeval{2, 0});
  std::string out;
  if (c != nullptr && c->err == 0) {
    std::vector<const char*> v;
    std::vector<std::size_t> len;
    for (const std::string& a : argv) {
      v.push_back(a.data());
      len.push_back(a.size());
    }
    auto* r = static_cast<redisReply*>(
        redisCommandArgv(c, static_cast<int>(v.size()), v.data(), len.data()));
    if (r != nullptr) {
      if (r->type == REDIS_REPLY_INTEGER) {
        out = std::to_string(r->integer);
      } else if (r->str != nullptr) {
        out.assign(r->str, r->len);
      } else if (r->type == REDIS_REPLY_ARRAY) {
        out = std::to_string(r->elements);
      }
      freeReplyObject(r);
    }
  }
  if (c != nullptr) redisFree(c);
  return out;
}

// How many scripts the Redis at `port` ran since its last CONFIG RESETSTAT
// (INFO commandstats: evalsha's calls).
std::uint64_t scripts_run(int port) {
  const std::string info = raw_command(port, {"INFO", "commandstats"});
  const auto at = info.find("cmdstat_evalsha:calls=");
  if (at == std::string::npos) return 0;
  return std::stoull(info.substr(at + 22));
}

// Every key of the Redis at `port` under `pattern`.
std::uint64_t keys_matching(int port, const std::string& pattern) {
  const std::string n = raw_command(
      port, {"EVAL", "return #redis.call('KEYS', ARGV[1])", "0", pattern});
  return std::stoull(n);
}

}  // namespace

TEST_CASE(
    "the issue's case: a per-user rpm of 5 used under three team tenants "
    "and on its own",
    "[redis][i16][scope]") {
  RedisServer server;
  auto client = client_at(server.port(), false);
  const bool global = GENERATE(false, true);
  CAPTURE(global);
  const std::string name = global ? "rpm_global" : "rpm_tenant";
  auto rpm =
      RedisLimit<SlidingWindow>::create(
          {.name = name}, SlidingWindow::create(per_minute(5)).value(), client,
          {.scope = global ? RedisScope::kGlobal : RedisScope::kTenant})
          .value();
  // A tenant's own limit beside it (per tenant, as budgets are), roomy
  // (refilling one token an hour: what it holds is what it counted).
  auto tpm = RedisLimit<TokenBucket>::create(
                 {.name = "tpm", .unit = Unit::kTokens},
                 TokenBucket::create(per_hour(1), 100'000).value(), client)
                 .value();
  RedisChain chain(client);
  const std::string tenants[] = {"team:red", "team:blue", "team:green"};
  // 40 calls of one user, round robin over the three tenants' chains and
  // the limit's own acquire. The independent count: one sliding window of
  // 5 a minute (this test takes seconds) admits the first 5 calls on each
  // state: one state (global) or four (per tenant, and the tenant-less
  // key of the limit's own calls).
  std::map<std::string, int> admitted_by_path;
  std::map<std::string, int> calls_by_path;
  int admitted = 0;
  for (int i = 0; i < 40; ++i) {
    const int path = i % 4;
    bool ok = false;
    std::string where;
    if (path == 3) {
      where = "own";
      ok = rpm->acquire("user:42", 1, SteadyClock{}.now()).allowed;
    } else {
      where = tenants[path];
      const ChainItem items[] = {{rpm.get(), "user:42", 1},
                                 {tpm.get(), "user:42", 100}};
      const ChainDecision d = chain.acquire(where, items);
      ok = d.allowed;
      // A refused chain took nothing from the tenant's tpm either.
      CHECK(d.results[1].counted == ok);
    }
    // Independent count: the first 5 calls on the call's state.
    const std::string state = global ? "one" : where;
    const bool want = calls_by_path[state]++ < 5;
    CAPTURE(i, where);
    CHECK(ok == want);
    admitted += ok;
    admitted_by_path[where] += ok;
  }
  CHECK(rpm->fallbacks() == 0);
  if (global) {
    // Fixed: 5 across the tenants and standalone.
    CHECK(admitted == 5);
    CHECK(keys_matching(server.port(), "rkt:" + name + ":*") == 1);
  } else {
    // The default, documented: a count per tenant and one for the
    // limit's own calls (rpm = 5 admitted 20).
    CHECK(admitted == 20);
    for (const auto& [where, n] : admitted_by_path) CHECK(n == 5);
    CHECK(keys_matching(server.port(), "rkt:" + name + ":*") == 4);
  }
  // Each tenant's tpm counted only its admitted chains' tokens.
  for (const std::string& t : tenants) {
    const ChainItem peek[] = {{tpm.get(), "user:42", 0}};
    CHECK(chain.peek(t, peek).results[0].decision.remaining ==
          100'000 - 100 * static_cast<std::uint64_t>(admitted_by_path[t]));
  }
}

namespace {

// Random chains mixing global and per-tenant limits through a RedisChain
// and, as the oracle, an in-process Chain on in-memory limits (a tenant's
// key there: the tenant and the key; a global key: the key): every field
// of every decision equal, settles and give-backs too, and at the end
// every state equal (nothing left taken by a refused chain, refunds
// exact). On a Cluster the chains split into one script per slot.
void mixed_scopes_against_chain(const std::shared_ptr<RedisClient>& client,
                                std::uint64_t seed, int chains,
                                int* split_refusals) {
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  // Whole microseconds per token: the give-back counters of both agree.
  const auto tb8 = TokenBucket::create(per_second(8), 6).value();
  const auto fw = FixedWindow::create(per_second(9)).value();
  const auto sw = SlidingWindow::create(per_second(8)).value();
  const auto tb4 = TokenBucket::create(per_second(4), 5).value();
  struct Pair {
    RedisLimitBase* redis;
    Limit* local;
    bool global;
  };
  const LimitOptions cor{.name = "g_fw", .charge_on_reject = true};
  auto rg_fw =
      RedisLimit<FixedWindow>::create(
          cor, fw, client, {.test_time = true, .scope = RedisScope::kGlobal})
          .value();
  auto rg_tb = RedisLimit<TokenBucket>::create(
                   {.name = "g_tb"}, tb8, client,
                   {.test_time = true, .scope = RedisScope::kGlobal})
                   .value();
  auto rt_sw = RedisLimit<SlidingWindow>::create({.name = "t_sw"}, sw, client,
                                                 {.test_time = true})
                   .value();
  auto rt_tb = RedisLimit<TokenBucket>::create({.name = "t_tb"}, tb4, client,
                                               {.test_time = true})
                   .value();
  auto lg_fw = make_limit<InMemoryStore>(cor, fw).value();
  auto lg_tb = make_limit<InMemoryStore>({.name = "g_tb"}, tb8).value();
  auto lt_sw = make_limit<InMemoryStore>({.name = "t_sw"}, sw).value();
  auto lt_tb = make_limit<InMemoryStore>({.name = "t_tb"}, tb4).value();
  const Pair pairs[] = {{rg_fw.get(), lg_fw.get(), true},
                        {rg_tb.get(), lg_tb.get(), true},
                        {rt_sw.get(), lt_sw.get(), false},
                        {rt_tb.get(), lt_tb.get(), false}};
  RedisChain redis(client);
  ManualClock lclock;
  Chain<ManualClock> local{lclock};
  std::vector<std::pair<ChainDecision, ChainDecision>> pending;
  std::vector<std::string> kept_keys;  // the in-process keys (views)
  kept_keys.reserve(static_cast<std::size_t>(chains) * 4);
  std::int64_t t_us = kT0.count() / kUs;
  int settled = 0, refused = 0;
  for (int i = 0; i < chains; ++i) {
    t_us += static_cast<std::int64_t>(rng() % 100'000);
    const Nanos now{t_us * kUs};
    lclock.set(now);
    const std::string tenant = "team" + std::to_string(rng() % 3);
    // 2 to 4 items in a random order (parts interleave with the items).
    std::vector<std::size_t> which = {0, 1, 2, 3};
    std::shuffle(which.begin(), which.end(), rng);
    which.resize(2 + rng() % 3);
    std::vector<ChainItem> ri, li;
    const std::string user = "user" + std::to_string(rng() % 3);
    for (const std::size_t p : which) {
      const Cost c = 1 + rng() % 3;
      ri.push_back({pairs[p].redis, user, c});
      kept_keys.push_back(pairs[p].global ? user : tenant + "/" + user);
      li.push_back({pairs[p].local, kept_keys.back(), c});
    }
    const bool peek = rng() % 6 == 0;
    if (peek) {
      const ChainDecision want = local.peek(li);
      const ChainDecision got = redis.peek(tenant, ri, now);
      REQUIRE(got.allowed == want.allowed);
      for (std::size_t k = 0; k < ri.size(); ++k) {
        REQUIRE(got.results[k].decision.allowed ==
                want.results[k].decision.allowed);
        REQUIRE(got.results[k].decision.remaining ==
                want.results[k].decision.remaining);
      }
      continue;
    }
    ChainDecision want = local.acquire_at(li, now);
    ChainDecision got = redis.acquire(tenant, ri, now);
    CAPTURE(i, t_us, tenant, user);
    REQUIRE(got.allowed == want.allowed);
    refused += !got.allowed;
    bool taken_then_refused = false;
    for (std::size_t k = 0; k < ri.size(); ++k) {
      CAPTURE(k, which[k]);
      const LimitResult& g = got.results[k];
      const LimitResult& w = want.results[k];
      REQUIRE(g.decision.allowed == w.decision.allowed);
      REQUIRE(g.decision.remaining == w.decision.remaining);
      REQUIRE(g.decision.retry_after == ceil_us(w.decision.retry_after));
      REQUIRE(g.decision.reset_after == ceil_us(w.decision.reset_after));
      REQUIRE(g.counted == w.counted);
      REQUIRE(g.shadow_denied == w.shadow_denied);
      REQUIRE(g.receipt.open() == w.receipt.open());
      if (!got.allowed && g.decision.allowed &&
          !pairs[which[k]].redis->charge_on_reject()) {
        taken_then_refused = true;
      }
    }
    if (taken_then_refused && split_refusals != nullptr) ++*split_refusals;
    REQUIRE(got.binding == want.binding);
    REQUIRE(got.retry_after == ceil_us(want.retry_after));
    if (got.allowed) pending.push_back({std::move(want), std::move(got)});
    if (!pending.empty() && rng() % 2 == 0) {
      const std::size_t j = rng() % pending.size();
      t_us += static_cast<std::int64_t>(rng() % 100'000);
      const Nanos later{t_us * kUs};
      lclock.set(later);
      auto [w, g] = std::move(pending[j]);
      pending.erase(pending.begin() + static_cast<std::ptrdiff_t>(j));
      if (rng() % 3 == 0) {
        // Every receipt in one call: one script per slot on a Cluster.
        local.give_back(w);
        REQUIRE(redis.give_back(g, later).ok());
      } else {
        const std::size_t k = rng() % g.results.size();
        if (!g.results[k].receipt) continue;  // a charge that stays
        const Cost actual = rng() % (2 * g.results[k].cost + 2);
        REQUIRE(local.settle(w, k, actual).ok());
        REQUIRE(redis.settle(g, k, actual, later).ok());
      }
      for (std::size_t k = 0; k < g.results.size(); ++k) {
        REQUIRE(g.results[k].receipt.open() == w.results[k].receipt.open());
        REQUIRE(g.results[k].decision.remaining ==
                w.results[k].decision.remaining);
      }
      ++settled;
    }
  }
  CHECK(settled > chains / 10);
  CHECK(refused > chains / 20);
  // Every state equal at the end: nothing a refused chain took is left.
  const Nanos end{t_us * kUs};
  for (int t = 0; t < 3; ++t) {
    const std::string tenant = "team" + std::to_string(t);
    for (int u = 0; u < 3; ++u) {
      const std::string user = "user" + std::to_string(u);
      for (const Pair& p : pairs) {
        const std::string lkey = p.global ? user : tenant + "/" + user;
        const ChainItem ri[] = {{p.redis, user, 0}};
        const ChainDecision got = redis.peek(tenant, ri, end);
        CAPTURE(tenant, user, p.redis->name());
        CHECK(got.results[0].decision.remaining ==
              p.local->peek(lkey, 0, end).remaining);
        if (p.global) {
          // The limit's own calls see the same state.
          CHECK(p.redis->peek(user, 0, end).remaining ==
                p.local->peek(lkey, 0, end).remaining);
        }
      }
    }
  }
  for (const Pair& p : pairs) CHECK(p.redis->fallbacks() == 0);
}

}  // namespace

TEST_CASE(
    "mixed scopes in a chain decide as an in-process chain: all or nothing, "
    "nothing left taken, on a single Redis",
    "[redis][i16][scope]") {
  RedisServer server;
  auto client = client_at(server.port(), false);
  // One script per chain on a single Redis, whatever the scopes.
  REQUIRE(raw_command(server.port(),
                      {"SCRIPT", "LOAD", std::string(detail::lua::kScript)})
              .size() == 40);
  REQUIRE(raw_command(server.port(), {"CONFIG", "RESETSTAT"}) == "OK");
  RedisChain chain(client);
  auto g = RedisLimit<FixedWindow>::create(
               {.name = "g"}, FixedWindow::create(per_minute(3)).value(),
               client, {.test_time = true, .scope = RedisScope::kGlobal})
               .value();
  auto t = RedisLimit<FixedWindow>::create(
               {.name = "t"}, FixedWindow::create(per_minute(50)).value(),
               client, {.test_time = true})
               .value();
  const ChainItem items[] = {{t.get(), "u", 1}, {g.get(), "u", 1}};
  int admitted = 0;
  for (int i = 0; i < 6; ++i) {
    const ChainDecision d =
        chain.acquire("team" + std::to_string(i), items, kT0);
    admitted += d.allowed;
    // A refused chain took nothing from its tenant's limit.
    const ChainItem peek[] = {{t.get(), "u", 0}};
    CHECK(chain.peek("team" + std::to_string(i), peek, kT0)
              .results[0]
              .decision.remaining == (d.allowed ? 49u : 50u));
  }
  CHECK(admitted == 3);
  CHECK(scripts_run(server.port()) == 12);  // 6 chains and 6 peeks
  mixed_scopes_against_chain(client, rk_test::seed_or(0x5C0E), 1'200, nullptr);
}

TEST_CASE(
    "on a 3-master Cluster a chain mixing scopes takes one round trip per "
    "slot, all or nothing, refunds exact",
    "[redis][i16][scope][cluster]") {
  RedisCluster cluster;
  auto client = client_at(cluster.port(0), true);
  auto g_rpm = RedisLimit<FixedWindow>::create(
                   {.name = "rpm"}, FixedWindow::create(per_hour(3)).value(),
                   client, {.test_time = true, .scope = RedisScope::kGlobal})
                   .value();
  auto t_tpm = RedisLimit<FixedWindow>::create(
                   {.name = "tpm", .unit = Unit::kTokens},
                   FixedWindow::create(per_hour(100)).value(), client,
                   {.test_time = true})
                   .value();
  auto t_abuse = RedisLimit<FixedWindow>::create(
                     {.name = "abuse", .charge_on_reject = true},
                     FixedWindow::create(per_hour(1'000)).value(), client,
                     {.test_time = true})
                     .value();
  const std::string tenant = "team:red";
  // A user whose global key lies on another master than the tenant's.
  std::string user;
  const std::string tenant_key = redis_key("rkt:", "tpm", tenant, "u");
  for (int i = 0; user.empty(); ++i) {
    REQUIRE(i < 1000);
    const std::string u = "user:" + std::to_string(i);
    if (client->node_of(redis_key("rkt:", "rpm", "", u)) !=
        client->node_of(tenant_key)) {
      user = u;
    }
  }
  const std::string global_key = redis_key("rkt:", "rpm", "", user);
  const std::string tenant_user_key = redis_key("rkt:", "tpm", tenant, user);
  // Our slots are Redis's (CLUSTER KEYSLOT), and differ.
  CHECK(std::to_string(detail::key_slot(global_key)) ==
        cluster.command(0, "CLUSTER KEYSLOT " + global_key));
  CHECK(std::to_string(detail::key_slot(tenant_user_key)) ==
        cluster.command(0, "CLUSTER KEYSLOT " + tenant_user_key));
  CHECK(detail::key_slot(global_key) != detail::key_slot(tenant_user_key));
  RedisChain chain(client);
  // Scripts loaded on every master, then the counters reset.
  for (int n = 0; n < 3; ++n) {
    REQUIRE(raw_command(cluster.port(n),
                        {"SCRIPT", "LOAD", std::string(detail::lua::kScript)})
                .size() == 40);
    REQUIRE(raw_command(cluster.port(n), {"CONFIG", "RESETSTAT"}) == "OK");
  }
  const auto scripts = [&] {
    std::uint64_t s = 0;
    for (int n = 0; n < 3; ++n) s += scripts_run(cluster.port(n));
    return s;
  };
  const auto rpm_left = [&] { return g_rpm->peek(user, 0, kT0).remaining; };
  const auto tpm_left = [&] {
    const ChainItem p[] = {{t_tpm.get(), user, 0}};
    return chain.peek(tenant, p, kT0).results[0].decision.remaining;
  };
  const auto abuse_left = [&] {
    const ChainItem p[] = {{t_abuse.get(), user, 0}};
    return chain.peek(tenant, p, kT0).results[0].decision.remaining;
  };
  std::uint64_t s0 = scripts();
  {
    // Admitted: both take, one script per slot.
    const ChainItem items[] = {{t_tpm.get(), user, 10}, {g_rpm.get(), user, 1}};
    ChainDecision d = chain.acquire(tenant, items, kT0);
    REQUIRE(d.allowed);
    CHECK(scripts() - s0 == 2);
    CHECK(rpm_left() == 2);
    CHECK(tpm_left() == 90);
    // Its receipts given back in one call: one script per slot.
    s0 = scripts();
    REQUIRE(chain.give_back(d, kT0).ok());
    CHECK(scripts() - s0 == 2);
    CHECK(rpm_left() == 3);
    CHECK(tpm_left() == 100);
  }
  {
    // Refused by the later part (the tenant's, which runs last): what the
    // global part took is given back, exactly.
    const ChainItem items[] = {{g_rpm.get(), user, 1},
                               {t_tpm.get(), user, 500},
                               {t_abuse.get(), user, 1}};
    s0 = scripts();
    const ChainDecision d = chain.acquire(tenant, items, kT0);
    CHECK_FALSE(d.allowed);
    CHECK(scripts() - s0 == 3);  // global take, tenant refusal, give-back
    CHECK(d.results[0].decision.allowed);  // it fitted, and was vetoed
    CHECK_FALSE(d.results[0].counted);
    CHECK_FALSE(d.results[0].receipt.open());
    CHECK(d.results[0].decision.remaining == 3);  // after the give-back
    CHECK_FALSE(d.results[1].decision.allowed);
    CHECK(d.results[2].counted);  // a charge on reject counts either way
    CHECK(d.binding == 1);
    CHECK(rpm_left() == 3);
    CHECK(tpm_left() == 100);
    CHECK(abuse_left() == 999);
  }
  {
    // Refused by the first part: the tenant's part only looks (its charge
    // on reject counts), nothing else is taken.
    for (int i = 0; i < 3; ++i) {
      REQUIRE(g_rpm->acquire(user, 1, kT0).allowed);
    }
    const ChainItem items[] = {{t_tpm.get(), user, 10},
                               {t_abuse.get(), user, 1},
                               {g_rpm.get(), user, 1}};
    s0 = scripts();
    const ChainDecision d = chain.acquire(tenant, items, kT0);
    CHECK_FALSE(d.allowed);
    CHECK(scripts() - s0 == 2);
    CHECK(d.results[0].decision.allowed);
    CHECK_FALSE(d.results[0].counted);
    CHECK(d.results[0].decision.remaining == 100);
    CHECK(d.results[1].counted);
    CHECK_FALSE(d.results[2].decision.allowed);
    CHECK(d.binding == 2);
    CHECK(tpm_left() == 100);
    CHECK(abuse_left() == 998);
    CHECK(rpm_left() == 0);
  }
  CHECK(g_rpm->fallbacks() + t_tpm->fallbacks() + t_abuse->fallbacks() == 0);
  // Random mixed chains, split by slot, against the in-process chain.
  int split_refusals = 0;
  mixed_scopes_against_chain(client, rk_test::seed_or(0x5C0F), 600,
                             &split_refusals);
  CHECK(split_refusals > 10);  // refusals after another part had taken
}

TEST_CASE("a prefix or a limit name with braces is refused at create",
          "[redis][i16][scope]") {
  // Checked before connecting: no server needed.
  for (const char* prefix : {"rk{x}:", "{rk}:", "rk{", "rk}"}) {
    CAPTURE(prefix);
    const auto c = RedisClient::create({.port = 1, .prefix = prefix});
    REQUIRE(c.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK(c.status().message().find("one slot") != std::string::npos);
  }
  RedisServer server;
  auto client = client_at(server.port(), false);
  for (const char* name : {"rpm{x}", "{rpm}", "r}"}) {
    CAPTURE(name);
    const auto l = RedisLimit<FixedWindow>::create(
        {.name = name}, FixedWindow::create(per_minute(5)).value(), client);
    REQUIRE(l.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK(l.status().message().find("hash tag") != std::string::npos);
  }
  // A budget is kept under its tenant.
  auto acct = RedisAccountant::create(rk_test::flat_prices(), client).value();
  const absl::Status st =
      acct->add_budget({.name = "team_day",
                        .scope = Field::kTeam,
                        .limit = 1'000,
                        .period = Period::calendar(PeriodKind::kDay).value()},
                       {.scope = RedisScope::kGlobal});
  CHECK(st.code() == absl::StatusCode::kInvalidArgument);
}

TEST_CASE(
    "tenants and keys holding braces stay in their tenant's slot and apart",
    "[redis][i16][scope][cluster]") {
  RedisCluster cluster;
  auto client = client_at(cluster.port(0), true);
  auto rph = RedisLimit<FixedWindow>::create(
                 {.name = "rph"}, FixedWindow::create(per_hour(1)).value(),
                 client, {.test_time = true})
                 .value();
  auto g = RedisLimit<FixedWindow>::create(
               {.name = "g"}, FixedWindow::create(per_hour(100)).value(),
               client, {.test_time = true, .scope = RedisScope::kGlobal})
               .value();
  RedisChain chain(client);
  const std::vector<std::string> tenants = {"{a}", "a",  "{a",   "a}",
                                            "}{",  "{}", "{a}b", ""};
  const std::vector<std::string> keys = {"b", "{b}", "}", "{a}b", ""};
  std::set<std::string> redis_keys;
  for (const std::string& t : tenants) {
    if (t.empty()) continue;  // an empty tenant has no tag
    std::set<std::uint16_t> slots;
    for (const std::string& k : keys) {
      const std::string rk = redis_key("rkt:", "rph", t, k);
      redis_keys.insert(rk);
      // Redis's slot of the key (KEYSLOT of its bytes, through hiredis's
      // argv: braces and all) is ours, and the tenant's alone.
      CHECK(std::to_string(detail::key_slot(rk)) ==
            raw_command(cluster.port(0), {"CLUSTER", "KEYSLOT", rk}));
      slots.insert(detail::key_slot(rk));
    }
    CHECK(slots.size() == 1);
  }
  // No two (tenant, key) pairs share a Redis key.
  CHECK(redis_keys.size() == (tenants.size() - 1) * keys.size());
  // Each pair counts once: 1 an hour admits each exactly once, in one
  // script per chain with a global limit beside it, no fail-mode answer.
  int admitted = 0;
  for (int round = 0; round < 2; ++round) {
    for (const std::string& t : tenants) {
      if (t.empty()) continue;
      for (const std::string& k : keys) {
        const ChainItem items[] = {{rph.get(), k, 1}, {g.get(), "all", 0}};
        admitted += chain.acquire(t, items, kT0).allowed;
      }
    }
  }
  CHECK(admitted == static_cast<int>(redis_keys.size()));
  CHECK(rph->fallbacks() + g->fallbacks() == 0);
  // An accountant whose org holds braces: its reservation in one slot.
  auto acct = RedisAccountant::create(rk_test::flat_prices(), client,
                                      {.test_clock = [] { return kT0; }})
                  .value();
  REQUIRE(
      acct->add_budget({.name = "team",
                        .scope = Field::kTeam,
                        .limit = 1'000'000,
                        .period = Period::calendar(PeriodKind::kMonth).value()})
          .ok());
  const Subject who{.user = "{u}", .team = "}t{", .org = "{acme}"};
  auto r = acct->reserve(who, "m", {10, 10}, "{id}");
  REQUIRE(r.ok());
  REQUIRE(r->granted());
  CHECK(r->backed());
  REQUIRE(r->settle(Usage{.input_uncached = 10, .output = 5}).ok());
  CHECK(acct->spent("team", who).value() == 15'000);
  CHECK(acct->fallback_reserves() == 0);
}

namespace {

// RedisAccountant with a global rpm passed to reserve(): one count across
// orgs (tenants); a refusal by either part leaves nothing taken, exactly;
// settles reach both slots.
void accountant_with_global_rpm(const std::shared_ptr<RedisClient>& client) {
  const Nanos now = kT0 + std::chrono::hours(1);
  auto acct = RedisAccountant::create(rk_test::flat_prices(), client,
                                      {.test_clock = [now] { return now; }})
                  .value();
  REQUIRE(
      acct->add_budget({.name = "team",
                        .scope = Field::kTeam,
                        .limit = 200'000,
                        .period = Period::calendar(PeriodKind::kMonth).value()})
          .ok());
  auto rpm = RedisLimit<FixedWindow>::create(
                 {.name = "rpm"}, FixedWindow::create(per_minute(5)).value(),
                 client, {.test_time = true, .scope = RedisScope::kGlobal})
                 .value();
  auto tpm = RedisLimit<FixedWindow>::create(
                 {.name = "tpm", .unit = Unit::kTokens},
                 FixedWindow::create(per_minute(1'000)).value(), client,
                 {.test_time = true, .scope = RedisScope::kGlobal})
                 .value();
  const std::string orgs[] = {"acme", "initech", "umbrella"};
  const auto spent = [&](const std::string& org) {
    return acct->spent("team", {.user = "u", .team = "t", .org = org}).value();
  };
  int granted = 0;
  std::map<std::string, std::uint64_t> want_spent;
  for (int i = 0; i < 12; ++i) {
    const std::string& org = orgs[i % 3];
    const Subject who{.user = "u", .team = "t", .org = org};
    const ChainItem limits[] = {{rpm.get(), "u", 1}, {tpm.get(), "u", 20}};
    auto r =
        acct->reserve(who, "m", {10, 10}, "id" + std::to_string(i), limits);
    REQUIRE(r.ok());
    CAPTURE(i, org);
    // The independent count: the rpm's first 5 calls, whatever the org.
    CHECK(r->granted() == (i < 5));
    if (!r->granted()) {
      CHECK_FALSE(r->refused_by_budget());
      CHECK(spent(org) == want_spent[org]);  // nothing held
      continue;
    }
    ++granted;
    CHECK(r->backed());
    // Settled to 15 tokens: the budget charged, tpm settled to 15.
    REQUIRE(r->settle(Usage{.input_uncached = 10, .output = 5}).ok());
    want_spent[org] += 15'000;
    CHECK(spent(org) == want_spent[org]);
  }
  CHECK(granted == 5);
  CHECK(rpm->peek("u", 0, now).remaining == 0);
  CHECK(tpm->peek("u", 0, now).remaining == 1'000 - 5 * 15);
  // A budget refusal after the global part took: rpm and tpm given back.
  auto rpm2 = RedisLimit<FixedWindow>::create(
                  {.name = "rpm2"}, FixedWindow::create(per_minute(5)).value(),
                  client, {.test_time = true, .scope = RedisScope::kGlobal})
                  .value();
  const Subject who{.user = "u", .team = "t", .org = "acme"};
  const ChainItem limits[] = {{rpm2.get(), "u", 1}, {tpm.get(), "u", 20}};
  auto big = acct->reserve(who, "m", {100'000, 100'000}, "big", limits);
  REQUIRE(big.ok());
  CHECK_FALSE(big->granted());
  CHECK(big->refused_by_budget());
  CHECK(rpm2->peek("u", 0, now).remaining == 5);
  CHECK(tpm->peek("u", 0, now).remaining == 1'000 - 5 * 15);
  CHECK(spent("acme") == want_spent["acme"]);
  CHECK(acct->fallback_reserves() == 0);
  CAPTURE(rpm->last_error(), tpm->last_error());
  CHECK(rpm->fallbacks() + rpm2->fallbacks() + tpm->fallbacks() == 0);
}

}  // namespace

TEST_CASE(
    "a RedisAccountant with a global rate limit in its reservation counts "
    "it once across tenants",
    "[redis][i16][scope][budget]") {
  SECTION("a single Redis") {
    RedisServer server;
    accountant_with_global_rpm(client_at(server.port(), false));
  }
  SECTION("a 3-master Cluster") {
    RedisCluster cluster;
    accountant_with_global_rpm(client_at(cluster.port(0), true));
  }
}
