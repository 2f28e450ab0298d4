// Credentials (issue 16): RedisOptions::username, password and db against a
// redis-server started with --requirepass and ACL users made by the test.
// The oracle is Redis itself, read through raw hiredis connections of the
// test's own (which keys exist in which database, which user may do what).
#include <hiredis/hiredis.h>
#include <signal.h>
#include <stdlib.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "ratekeeper/budget/redis_accountant.hpp"
#include "ratekeeper/store/redis.hpp"
#include "redis_server.hpp"
#include "test_prices.hpp"

using namespace ratekeeper;
using namespace std::chrono_literals;
using rk_test::RedisServer;

namespace {

constexpr const char* kAdminPw = "admin-Secret-7f3a";
constexpr const char* kRkPw = "rk-Secret-91c2";
// The commands ratekeeper runs, as docs/redis.md recommends them (its ACL
// line, less the password and the key pattern). A Cluster adds
// +cluster|slots +asking; a database other than 0, +select.
constexpr const char* kAclCommands =
    "resetchannels -@all +ping +evalsha +eval +script|load "
    "+time +get +set +del +exists";

const Nanos kFrozen{1'796'083'200'000'000'000};  // 2026-12-01 UTC

// A raw hiredis connection of the test's own, authenticated as `auth`
// ({} for none, {pw}, or {user, pw}), on database `db`.
class Raw {
 public:
  explicit Raw(int port, std::vector<std::string> auth = {}, int db = 0) {
    c_ = redisConnectWithTimeout("127.0.0.1", port, timeval{5, 0});
    REQUIRE(c_ != nullptr);
    REQUIRE(c_->err == 0);
    if (!auth.empty()) {
      auth.insert(auth.begin(), "AUTH");
      REQUIRE(run(auth) == "OK");
    }
    if (db != 0) REQUIRE(run({"SELECT", std::to_string(db)}) == "OK");
  }
  ~Raw() { redisFree(c_); }
  Raw(const Raw&) = delete;
  Raw& operator=(const Raw&) = delete;

  // The reply as text: a status or string as is, an integer in decimal,
  // an error as "ERROR: ...", an array's elements joined by newlines.
  std::string run(const std::vector<std::string>& argv) {
    std::vector<const char*> p;
    std::vector<std::size_t> l;
    for (const auto& a : argv) {
      p.push_back(a.data());
      l.push_back(a.size());
    }
    auto* r = static_cast<redisReply*>(redisCommandArgv(
        c_, static_cast<int>(argv.size()), p.data(), l.data()));
    REQUIRE(r != nullptr);
    std::string out = text(*r);
    freeReplyObject(r);
    return out;
  }
  // `line` split at spaces.
  std::string line(const std::string& text_line) {
    std::vector<std::string> argv;
    std::size_t at = 0;
    while (at <= text_line.size()) {
      const std::size_t sp = text_line.find(' ', at);
      const std::size_t end = sp == std::string::npos ? text_line.size() : sp;
      if (end > at) argv.push_back(text_line.substr(at, end - at));
      at = end + 1;
    }
    return run(argv);
  }

 private:
  static std::string text(const redisReply& r) {
    switch (r.type) {
      case REDIS_REPLY_INTEGER:
        return std::to_string(r.integer);
      case REDIS_REPLY_ERROR:
        return "ERROR: " + std::string(r.str, r.len);
      case REDIS_REPLY_NIL:
        return "";
      case REDIS_REPLY_ARRAY: {
        std::string out;
        for (std::size_t i = 0; i < r.elements; ++i) {
          if (i != 0) out += '\n';
          out += text(*r.element[i]);
        }
        return out;
      }
      default:
        return std::string(r.str, r.len);
    }
  }
  redisContext* c_ = nullptr;
};

// Every key of the current database of `raw`, one a line.
std::vector<std::string> keys_of(Raw& raw) {
  const std::string all = raw.run({"KEYS", "*"});
  std::vector<std::string> out;
  std::size_t at = 0;
  while (at < all.size()) {
    const std::size_t nl = all.find('\n', at);
    const std::size_t end = nl == std::string::npos ? all.size() : nl;
    out.push_back(all.substr(at, end - at));
    at = end + 1;
  }
  return out;
}

RedisOptions user_options(int port, std::string user, std::string pw) {
  RedisOptions o;
  o.port = port;
  o.prefix = "rkauth:";
  o.connect_timeout = 5s;
  o.command_timeout = 5s;
  o.username = std::move(user);
  o.password = std::move(pw);
  return o;
}

// No secret of the test in `s`'s message.
void check_no_secret(const absl::Status& s) {
  INFO(s);
  const std::string m(s.message());
  CHECK(m.find("Secret") == std::string::npos);
  CHECK(m.find("pw") == std::string::npos);
}

std::unique_ptr<RedisLimit<FixedWindow>> fixed(
    const std::shared_ptr<RedisClient>& c, std::string name,
    std::uint64_t per_min, FailMode fail) {
  return RedisLimit<FixedWindow>::create(
             {.name = std::move(name)},
             FixedWindow::create(per_minute(per_min)).value(), c,
             {.fail = fail,
              .fail_retry = 3s,
              .instances = 2,
              .test_time = true})
      .value();
}

Usage used_tokens(std::uint64_t in, std::uint64_t out) {
  Usage u;
  u.input_uncached = in;
  u.output = out;
  return u;
}

BudgetSpec team_budget() {
  return BudgetSpec{"team",
                    Scope(Field::kTeam),
                    BudgetUnit::kNanoUsd,
                    1'000'000,
                    Period::calendar(PeriodKind::kMonth).value(),
                    {}};
}

std::string temp_dir() {
  char tmpl[] = "/tmp/rk_auth_XXXXXX";
  REQUIRE(mkdtemp(tmpl) != nullptr);
  return tmpl;
}

}  // namespace

TEST_CASE(
    "[i16] an ACL user confined to the prefix runs limits, chains, "
    "batches and budgets",
    "[redis][i16]") {
  RedisServer server({"--requirepass", kAdminPw});
  Raw admin(server.port(), {kAdminPw});
  REQUIRE(admin.line(std::string("ACL SETUSER rk on >") + kRkPw +
                     " ~rkauth:* " + kAclCommands) == "OK");
  auto client = RedisClient::create(user_options(server.port(), "rk", kRkPw));
  REQUIRE(client.ok());

  auto rpm = fixed(*client, "rpm", 5, FailMode::kOpen);
  int admitted = 0;
  for (int i = 0; i < 8; ++i)
    admitted += rpm->acquire("u1", 1, kFrozen).allowed;
  CHECK(admitted == 5);  // exactly the limit: Redis counted every call

  std::vector<RedisLimit<FixedWindow>::Request> batch(4, {"u2", 1});
  int batch_admitted = 0;
  for (const Decision& d : rpm->acquire_batch(batch, kFrozen)) {
    batch_admitted += d.allowed;
  }
  CHECK(batch_admitted == 4);

  auto tpm = fixed(*client, "tpm", 100, FailMode::kClosed);
  RedisChain chain(*client);
  int chains = 0;
  for (int i = 0; i < 7; ++i) {
    const ChainItem items[] = {{rpm.get(), "u3", 1}, {tpm.get(), "u3", 10}};
    ChainDecision d = chain.acquire("team", items, kFrozen);
    if (d.allowed) {
      ++chains;
      REQUIRE(chain.settle(d, 1, 4, kFrozen).ok());  // tokens settled down
    }
  }
  CHECK(chains == 5);
  CHECK(rpm->fallbacks() == 0);
  CHECK(tpm->fallbacks() == 0);
  CHECK(rpm->auth_failures() == 0);

  // RedisAccountant shares the client: its keys are under the prefix too.
  auto acct = RedisAccountant::create(rk_test::flat_prices(), *client,
                                      {.test_clock = [] { return kFrozen; }})
                  .value();
  REQUIRE(acct->add_budget(team_budget(), {.fail = FailMode::kOpen}).ok());
  const Subject who{.user = "u", .team = "t", .org = "o"};
  auto r = acct->reserve(
      who, "m", {.prompt_tokens = 100, .max_output_tokens = 400}, "req-1");
  REQUIRE(r.ok());
  REQUIRE(r->granted());
  CHECK(r->backed());
  CHECK(acct->spent("team", who).value() == 500'000);
  REQUIRE(r->settle(used_tokens(100, 50)).ok());
  CHECK(acct->spent("team", who).value() == 150'000);
  CHECK(acct->fallback_reserves() == 0);
  CHECK(acct->auth_refusals() == 0);

  // Everything ratekeeper wrote is under the user's key pattern (Redis
  // would have refused anything else), and something was written.
  const std::vector<std::string> keys = keys_of(admin);
  CHECK(keys.size() >= 4);
  for (const std::string& k : keys) CHECK(k.rfind("rkauth:", 0) == 0);
  // The probe at create wrote nothing.
  CHECK(admin.run({"EXISTS", "rkauth:#probe"}) == "0");
}

TEST_CASE(
    "[i16] credentials Redis refuses are a clear status at create, "
    "naming the user, never the password",
    "[redis][i16]") {
  RedisServer server({"--requirepass", kAdminPw});
  Raw admin(server.port(), {kAdminPw});
  const std::string cmds = kAclCommands;
  REQUIRE(admin.line(std::string("ACL SETUSER rk on >") + kRkPw +
                     " ~rkauth:* " + cmds) == "OK");

  const auto create_as = [&](std::string user, std::string pw) {
    return RedisClient::create(
        user_options(server.port(), std::move(user), std::move(pw)));
  };
  const auto expect = [](const absl::StatusOr<std::shared_ptr<RedisClient>>& c,
                         absl::StatusCode code, const std::string& names) {
    INFO(c.status());
    REQUIRE(!c.ok());
    CHECK(c.status().code() == code);
    CHECK(std::string(c.status().message()).find(names) != std::string::npos);
    if (RedisClient::is_auth_error(c.status())) {  // the server named too
      CHECK(std::string(c.status().message()).find("redis 127.0.0.1:") !=
            std::string::npos);
    }
    check_no_secret(c.status());
  };

  SECTION("a wrong password, an unknown user, the default user's wrong one") {
    expect(create_as("rk", "wrong-Secret-pw"),
           absl::StatusCode::kUnauthenticated, "user \"rk\"");
    expect(create_as("nobody", kRkPw), absl::StatusCode::kUnauthenticated,
           "user \"nobody\"");
    expect(create_as("", "wrong-Secret-pw"), absl::StatusCode::kUnauthenticated,
           "default user");
    // No credentials where Redis wants some: NOAUTH, not "unavailable".
    expect(create_as("", ""), absl::StatusCode::kUnauthenticated, "NOAUTH");
    // start_unreachable waves through an absent Redis, never a refusal.
    RedisOptions o = user_options(server.port(), "rk", "wrong-Secret-pw");
    o.start_unreachable = true;
    expect(RedisClient::create(o), absl::StatusCode::kUnauthenticated,
           "user \"rk\"");
  }
  SECTION("a password given to a Redis that has none") {
    RedisServer open_server;
    RedisOptions o = user_options(open_server.port(), "", "some-Secret-pw");
    expect(RedisClient::create(o), absl::StatusCode::kUnauthenticated,
           "default user");
  }
  SECTION("a user without a command or key the library needs") {
    // Each line drops one thing of the recommended one.
    const std::vector<std::pair<std::string, std::string>> users = {
        {"no_evalsha",
         "~rkauth:* -@all +ping +eval +script|load +time +get "
         "+set +del +exists"},
        {"no_eval",
         "~rkauth:* -@all +ping +evalsha +script|load +time +get "
         "+set +del +exists"},
        {"no_load",
         "~rkauth:* -@all +ping +evalsha +eval +time +get +set "
         "+del +exists"},
        {"no_time",
         "~rkauth:* -@all +ping +evalsha +eval +script|load +get "
         "+set +del +exists"},
        {"no_set",
         "~rkauth:* -@all +ping +evalsha +eval +script|load +time "
         "+get +del +exists"},
        {"no_get",
         "~rkauth:* -@all +ping +evalsha +eval +script|load +time "
         "+set +del +exists"},
        {"no_del",
         "~rkauth:* -@all +ping +evalsha +eval +script|load +time "
         "+get +set +exists"},
        {"no_exists",
         "~rkauth:* -@all +ping +evalsha +eval +script|load "
         "+time +get +set +del"},
        {"no_ping",
         "~rkauth:* -@all +evalsha +eval +script|load +time +get "
         "+set +del +exists"},
        {"other_keys", "~other:* " + cmds},
        {"read_only_keys", "%R~rkauth:* " + cmds},
    };
    for (const auto& [user, rules] : users) {
      INFO(user);
      REQUIRE(admin.line("ACL SETUSER " + user + " on >" + kRkPw + " " +
                         rules) == "OK");
      expect(create_as(user, kRkPw), absl::StatusCode::kPermissionDenied,
             "user \"" + user + "\"");
    }
    // The recommended line works (the control).
    CHECK(create_as("rk", kRkPw).ok());
  }
  SECTION("databases: no SELECT permission, and past the server's count") {
    RedisOptions o = user_options(server.port(), "rk", kRkPw);
    o.db = 3;
    expect(RedisClient::create(o), absl::StatusCode::kPermissionDenied,
           "user \"rk\"");
    o.username.clear();
    o.password = kAdminPw;
    o.db = 20;  // the server has 16
    expect(RedisClient::create(o), absl::StatusCode::kInvalidArgument,
           "SELECT 20");
  }
  SECTION("options create() refuses before connecting") {
    RedisOptions o = user_options(server.port(), "rk", kRkPw);
    o.db = -1;
    expect(RedisClient::create(o), absl::StatusCode::kInvalidArgument, "db -1");
    o.db = RedisOptions::kMaxDb + 1;
    expect(RedisClient::create(o), absl::StatusCode::kInvalidArgument, "db ");
    o.db = 1;
    o.cluster = true;
    expect(RedisClient::create(o), absl::StatusCode::kInvalidArgument,
           "database 0 only");
    o = user_options(server.port(), "rk", "");
    expect(RedisClient::create(o), absl::StatusCode::kInvalidArgument,
           "without a password");
    o = user_options(server.port(), "rk", kRkPw);
    o.address_map = {{"10.0.0.1:6379", "127.0.0.1"}};
    expect(RedisClient::create(o), absl::StatusCode::kInvalidArgument,
           "address_map");
  }
  SECTION("AUTH and SELECT are waited for within connect_timeout") {
    // A stopped server accepts the connection (the kernel does) and never
    // answers AUTH: create() gives up after connect_timeout, long before
    // command_timeout.
    RedisOptions o = user_options(server.port(), "rk", kRkPw);
    o.connect_timeout = 200ms;
    o.command_timeout = 20s;
    server.signal(SIGSTOP);
    const auto t0 = std::chrono::steady_clock::now();
    const auto c = RedisClient::create(o);
    const auto took = std::chrono::steady_clock::now() - t0;
    server.signal(SIGCONT);
    REQUIRE(!c.ok());
    CHECK(c.status().code() == absl::StatusCode::kUnavailable);
    CHECK(took >= 200ms);
    CHECK(took < 5s);  // a loaded machine's slack; command_timeout is 20 s
  }
}

TEST_CASE("[i16] db = 3 keeps its keys apart from database 0", "[redis][i16]") {
  RedisServer server({"--requirepass", kAdminPw});
  Raw admin(server.port(), {kAdminPw});
  REQUIRE(admin.line(std::string("ACL SETUSER rk on >") + kRkPw +
                     " ~rkauth:* " + kAclCommands + " +select") == "OK");
  RedisOptions o3 = user_options(server.port(), "rk", kRkPw);
  o3.db = 3;
  o3.pool_size = 1;
  auto in3 = RedisClient::create(o3).value();
  auto in0 =
      RedisClient::create(user_options(server.port(), "rk", kRkPw)).value();
  // The same limit and key in both: each database counts on its own.
  auto a = fixed(in3, "rpm", 2, FailMode::kOpen);
  auto b = fixed(in0, "rpm", 2, FailMode::kOpen);
  int in_3 = 0, in_0 = 0;
  for (int i = 0; i < 5; ++i) in_3 += a->acquire("k", 1, kFrozen).allowed;
  for (int i = 0; i < 5; ++i) in_0 += b->acquire("k", 1, kFrozen).allowed;
  CHECK(in_3 == 2);
  CHECK(in_0 == 2);
  CHECK(a->fallbacks() == 0);
  // Reconnects select the database again: Redis drops the connection, the
  // next calls come back on a new one, still in database 3.
  REQUIRE(admin.line("CLIENT KILL USER rk") != "0");
  for (int i = 0; i < 3; ++i) {
    static_cast<void>(a->acquire("k2", 1, kFrozen));  // one may meet the cut
  }
  Raw db0(server.port(), {kAdminPw}, 0), db3(server.port(), {kAdminPw}, 3);
  const std::string key = redis_key("rkauth:", "rpm", {}, "k");
  const std::string key2 = redis_key("rkauth:", "rpm", {}, "k2");
  CHECK(db3.run({"EXISTS", key}) == "1");
  CHECK(db3.run({"EXISTS", key2}) == "1");
  CHECK(db0.run({"EXISTS", key}) == "1");
  CHECK(db0.run({"EXISTS", key2}) == "0");
  CHECK(db3.run({"DBSIZE"}) == "2");
  CHECK(db0.run({"DBSIZE"}) == "1");
}

TEST_CASE(
    "[i16] credentials that stop working after create refuse calls, "
    "counted, never answered by kOpen",
    "[redis][i16]") {
  RedisServer server({"--requirepass", kAdminPw});
  Raw admin(server.port(), {kAdminPw});
  REQUIRE(admin.line(std::string("ACL SETUSER rk on >") + kRkPw +
                     " ~rkauth:* " + kAclCommands) == "OK");
  RedisOptions o = user_options(server.port(), "rk", kRkPw);
  o.pool_size = 2;
  o.breaker_open = 100ms;
  o.breaker_max_open = 200ms;
  auto client = RedisClient::create(o).value();
  auto open = fixed(client, "open", 1'000'000, FailMode::kOpen);
  auto local = fixed(client, "local", 1'000'000, FailMode::kLocal);
  RedisChain chain(client);
  const std::string dir = temp_dir();
  auto acct = RedisAccountant::create(rk_test::flat_prices(), client,
                                      {.journal_path = dir + "/journal",
                                       .test_clock = [] { return kFrozen; }})
                  .value();
  REQUIRE(acct->add_budget(team_budget(), {.fail = FailMode::kOpen}).ok());
  // Another instance without a journal.
  auto bare = RedisAccountant::create(rk_test::flat_prices(), client,
                                      {.test_clock = [] { return kFrozen; }})
                  .value();
  REQUIRE(bare->add_budget(team_budget(), {.fail = FailMode::kOpen}).ok());
  const Subject who{.user = "u", .team = "t", .org = "o"};
  const Subject who2{.user = "u2", .team = "t2", .org = "o"};
  auto before = acct->reserve(
      who, "m", {.prompt_tokens = 100, .max_output_tokens = 400}, "req-1");
  auto to_release = acct->reserve(who, "m", {100, 100}, "req-3");
  auto streaming = acct->reserve(who, "m", {100, 100}, "req-4");
  auto unjournaled = bare->reserve(
      who2, "m", {.prompt_tokens = 100, .max_output_tokens = 400}, "req-5");
  for (auto* r : {&before, &to_release, &streaming, &unjournaled}) {
    REQUIRE((*r)->granted());
    REQUIRE((*r)->backed());
  }
  CHECK(acct->spent("team", who).value() == 900'000);
  REQUIRE(open->acquire("k", 1, kFrozen).allowed);
  Receipt taken;
  REQUIRE(open->take("r", 5, kFrozen, taken).allowed);

  // An ACL narrowed under live connections: NOPERM, refused, counted.
  REQUIRE(admin.line("ACL SETUSER rk -evalsha") == "OK");
  CHECK_FALSE(open->acquire("k", 1, kFrozen).allowed);
  CHECK(open->auth_failures() == 1);
  CHECK(open->fallbacks() == 0);
  CHECK(open->last_error().find("NOPERM") != std::string::npos);
  REQUIRE(admin.line("ACL SETUSER rk +evalsha") == "OK");

  // Zero-downtime rotation, as docs/redis.md says: a second password
  // first, new clients with it, then the old one removed.
  REQUIRE(admin.line("ACL SETUSER rk >rk-Secret-new") == "OK");
  REQUIRE(
      RedisClient::create(user_options(server.port(), "rk", "rk-Secret-new"))
          .ok());
  REQUIRE(admin.line(std::string("ACL SETUSER rk <") + kRkPw) == "OK");
  // Connections authenticated before keep working (Redis keeps them), the
  // user disabled too.
  CHECK(open->acquire("k", 1, kFrozen).remaining == 1'000'000 - 2);
  REQUIRE(admin.line("ACL SETUSER rk off") == "OK");
  CHECK(open->acquire("k", 1, kFrozen).remaining == 1'000'000 - 3);
  CHECK(open->auth_failures() == 1);
  CHECK(open->fallbacks() == 0);

  // Redis drops them: every new connection is refused its AUTH. The call
  // that meets a connection Redis cut is refused as the credentials are (a
  // fresh connection's AUTH says why), never answered by the fail mode.
  REQUIRE(admin.line("CLIENT KILL USER rk") != "0");
  CHECK_FALSE(open->acquire("k", 1, kFrozen).allowed);
  CHECK(open->auth_failures() == 2);
  CHECK(open->fallbacks() == 0);
  const auto connections = [&] {
    const std::string info = admin.run({"INFO", "stats"});
    const std::string field = "total_connections_received:";
    return std::stoll(info.substr(info.find(field) + field.size()));
  };
  const std::uint64_t fallbacks = open->fallbacks();
  const std::uint64_t failures = open->auth_failures();
  const long long connections_before = connections();
  const auto t0 = std::chrono::steady_clock::now();
  int admitted = 0;
  for (int i = 0; i < 50; ++i) {
    const Decision d = open->acquire("k", 1, kFrozen);
    admitted += d.allowed;
    CHECK(d.retry_after == 3s);  // as kClosed would refuse
  }
  const auto took = std::chrono::steady_clock::now() - t0;
  // One AUTH per breaker_open at most (100 ms here), not one per call.
  CHECK(connections() - connections_before <= took / o.breaker_open + 2);
  CHECK(admitted == 0);
  CHECK(open->auth_failures() == failures + 50);
  CHECK(open->fallbacks() == fallbacks);  // not an outage
  CHECK(open->last_error().find("WRONGPASS") != std::string::npos);
  CHECK(open->last_error().find("user \"rk\"") != std::string::npos);
  check_no_secret(absl::UnknownError(open->last_error()));
  // kLocal does not decide in process either, nor a batch, nor a chain.
  CHECK_FALSE(local->acquire("k", 1, kFrozen).allowed);
  CHECK(local->auth_failures() == 1);
  CHECK(local->fallbacks() == 0);
  std::vector<RedisLimit<FixedWindow>::Request> batch(3, {"k", 1});
  for (const Decision& d : open->acquire_batch(batch, kFrozen)) {
    CHECK_FALSE(d.allowed);
  }
  const ChainItem items[] = {{open.get(), "k", 1}, {local.get(), "k", 1}};
  CHECK_FALSE(chain.acquire("team", items, kFrozen).allowed);
  CHECK(open->fallbacks() == fallbacks);
  // A receipt's settle: the status, the receipt still open.
  CHECK(open->settle(taken, 2, kFrozen).status().code() ==
        absl::StatusCode::kUnauthenticated);
  CHECK(taken.open());
  // The accountant: a reserve is refused, counted on its own; a settle and
  // a release of reservations made before are journaled (nothing ran);
  // growing a stream is the status; without a journal, settle is the
  // status and the reservation stays open.
  auto during = acct->reserve(who, "m", {100, 100}, "req-2");
  REQUIRE(during.ok());
  CHECK_FALSE(during->granted());
  CHECK(acct->auth_refusals() == 1);
  CHECK(acct->fallback_reserves() == 0);
  REQUIRE(before->settle(used_tokens(100, 50)).ok());
  to_release->release();
  CHECK(acct->journal_pending() == 2);
  CHECK(acct->replay_journal().status().code() ==
        absl::StatusCode::kUnauthenticated);
  CHECK(acct->journal_pending() == 2);
  CHECK(streaming->next_chunk_fits(100, 500).status().code() ==
        absl::StatusCode::kUnauthenticated);
  const auto no_journal = unjournaled->settle(used_tokens(100, 50));
  CHECK(no_journal.status().code() == absl::StatusCode::kUnauthenticated);
  check_no_secret(no_journal.status());

  // The password the client has works again: calls reach Redis once the
  // refusal's hold (breaker_open) is over.
  REQUIRE(admin.line(std::string("ACL SETUSER rk on >") + kRkPw) == "OK");
  const auto back = std::chrono::steady_clock::now() + 20s;
  for (;;) {
    const std::uint64_t f = open->auth_failures();
    const Decision d = open->acquire("k", 1, kFrozen);
    if (open->auth_failures() == f) {
      CHECK(d.allowed);
      break;
    }
    REQUIRE(std::chrono::steady_clock::now() < back);
    std::this_thread::sleep_for(5ms);
  }
  CHECK(open->fallbacks() == fallbacks);
  CHECK(open->settle(taken, 2, kFrozen).ok());
  CHECK(acct->replay_journal().value() == 2);
  streaming->release();
  // Charged once, the released holds back: the settle's 150,000 alone.
  CHECK(acct->spent("team", who).value() == 150'000);
  CHECK(unjournaled->settle(used_tokens(100, 50)).ok());
  CHECK(bare->spent("team", who2).value() == 150'000);

  // Cut again under live, pooled connections: the first reserve after it
  // is refused (kOpen does not grant it), and so is the first batch after
  // the next cut.
  const auto cut = [&] {
    REQUIRE(admin.line("ACL SETUSER rk off") == "OK");
    REQUIRE(admin.line("CLIENT KILL USER rk") != "0");
  };
  const auto user_back = [&] {
    REQUIRE(admin.line("ACL SETUSER rk on") == "OK");
    const auto until = std::chrono::steady_clock::now() + 20s;
    for (;;) {
      const std::uint64_t f = open->auth_failures();
      if (open->acquire("k", 1, kFrozen).allowed &&
          open->auth_failures() == f) {
        break;
      }
      REQUIRE(std::chrono::steady_clock::now() < until);
      std::this_thread::sleep_for(5ms);
    }
  };
  cut();
  auto first = acct->reserve(who, "m", {100, 100}, "req-6");
  REQUIRE(first.ok());
  CHECK_FALSE(first->granted());
  CHECK(acct->auth_refusals() == 2);
  CHECK(acct->fallback_reserves() == 0);
  user_back();
  const std::uint64_t batch_failures = open->auth_failures();
  cut();
  for (const Decision& d : open->acquire_batch(batch, kFrozen)) {
    CHECK_FALSE(d.allowed);
  }
  CHECK(open->auth_failures() == batch_failures + batch.size());
  CHECK(open->fallbacks() == fallbacks);
}

TEST_CASE(
    "[i16] an ACL user on a Redis Cluster: the line plus "
    "+cluster|slots +asking",
    "[redis][i16]") {
  rk_test::RedisCluster cluster;
  for (int i = 0; i < 3; ++i) {
    REQUIRE(cluster.command(i, std::string("ACL SETUSER rk on >") + kRkPw +
                                   " ~rkauth:* " + kAclCommands +
                                   " +cluster|slots +asking") == "OK");
    REQUIRE(cluster.command(i, std::string("ACL SETUSER no_slots on >") +
                                   kRkPw + " ~rkauth:* " + kAclCommands) ==
            "OK");
  }
  RedisOptions o = user_options(cluster.port(0), "rk", kRkPw);
  o.cluster = true;
  auto client = RedisClient::create(o);
  INFO(client.status());
  REQUIRE(client.ok());
  auto rpm = fixed(*client, "rpm", 2, FailMode::kOpen);
  std::set<std::string> nodes;
  int admitted = 0;
  for (int k = 0; k < 60; ++k) {
    const std::string key = "user-" + std::to_string(k);
    for (int i = 0; i < 3; ++i) {
      admitted += rpm->acquire(key, 1, kFrozen).allowed;
    }
    nodes.insert((*client)->node_of(redis_key("rkauth:", "rpm", {}, key)));
  }
  CHECK(admitted == 60 * 2);  // exact on every master
  CHECK(nodes.size() == 3);
  CHECK(rpm->fallbacks() == 0);
  CHECK(rpm->auth_failures() == 0);

  // ASK during a slot's migration: ASKING, then the script on the
  // importing node, under the user's ACL; without +asking, refused as an
  // auth failure (never kOpen's admission).
  RedisOptions no_asking_o = o;
  no_asking_o.username = "no_asking";
  for (int i = 0; i < 3; ++i) {
    REQUIRE(cluster.command(i, std::string("ACL SETUSER no_asking on >") +
                                   kRkPw + " ~rkauth:* " + kAclCommands +
                                   " +cluster|slots") == "OK");
  }
  auto no_asking = RedisClient::create(no_asking_o).value();
  auto rpm_no_asking = fixed(no_asking, "rpm", 2, FailMode::kOpen);
  const std::string moving = redis_key("rkauth:", "rpm", {}, "moving");
  const int slot = std::stoi(cluster.command(0, "CLUSTER KEYSLOT " + moving));
  const int from = slot <= 5460 ? 0 : slot <= 10922 ? 1 : 2;
  const int to = (from + 1) % 3;
  const std::string slot_s = std::to_string(slot);
  REQUIRE(cluster.command(to, "CLUSTER SETSLOT " + slot_s + " IMPORTING " +
                                  cluster.command(from, "CLUSTER MYID")) ==
          "OK");
  REQUIRE(cluster.command(from, "CLUSTER SETSLOT " + slot_s + " MIGRATING " +
                                    cluster.command(to, "CLUSTER MYID")) ==
          "OK");
  CHECK(rpm->acquire("moving", 1, kFrozen).allowed);
  CHECK(rpm->fallbacks() == 0);
  CHECK(cluster.command(to, "CLUSTER COUNTKEYSINSLOT " + slot_s) == "1");
  CHECK(cluster.command(from, "CLUSTER COUNTKEYSINSLOT " + slot_s) == "0");
  CHECK_FALSE(rpm_no_asking->acquire("moving", 1, kFrozen).allowed);
  CHECK(rpm_no_asking->auth_failures() == 1);
  CHECK(rpm_no_asking->fallbacks() == 0);
  CHECK(rpm_no_asking->last_error().find("asking") != std::string::npos);

  o.username = "no_slots";
  const auto refused = RedisClient::create(o);
  INFO(refused.status());
  REQUIRE(!refused.ok());
  CHECK(refused.status().code() == absl::StatusCode::kPermissionDenied);
  CHECK(std::string(refused.status().message()).find("user \"no_slots\"") !=
        std::string::npos);
  CHECK(std::string(refused.status().message()).find("cluster|slots") !=
        std::string::npos);
}
