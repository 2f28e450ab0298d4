// ratekeeper/store/redis.hpp: limits kept in Redis, shared by every instance.
//
// Defines:
//   RedisOptions   where Redis is, the key prefix, timeouts, the pool size,
//                  credentials (AUTH, SELECT), an address map for tunnels,
//                  failover (pool bound, probes, slot map reads, WAIT)
//   RedisClient    pools of hiredis connections (one per node, bounded)
//                  that run the policies' Lua twins by EVALSHA, loading a
//                  script again when Redis answers NOSCRIPT (a restart,
//                  SCRIPT FLUSH); a circuit breaker per node
//   RedisLimit<P>  a Limit (chain.hpp) whose state lives in Redis: each
//                  acquire, peek, take, charge or settle is one script, one
//                  round trip, atomic on the server, timed by Redis's TIME
//                  so that instances with skewed clocks share one clock; a
//                  take's Receipt is placed and settled by Redis's clock
//   RedisChain     several Redis limits for one call in one script, all or
//                  nothing on the server (one script per Cluster slot when
//                  it mixes scopes: all or nothing through receipts)
//   RedisScope     whether a limit's key counts per tenant in a chain (the
//                  default) or once for all (kGlobal)
//   RedisLease     quota leasing: a key's tokens taken a batch at a time,
//                  served in process
//   FailMode       what a RedisLimit answers when Redis cannot: kOpen
//                  (admit), kClosed (refuse) or kLocal (an in-process limit
//                  at this instance's share); every such answer counted
//
// The client keeps a circuit breaker per node, waits on every socket
// against a deadline, and speaks to a Redis Cluster (slot map, MOVED, ASK,
// the map read again after a node fails) when told to. Needs hiredis
// (libhiredis-dev); CMake target ratekeeper::redis. docs/redis.md has the
// design and the figures.
//
//   auto redis = RedisClient::create({.host = "10.0.0.7", .port = 6379});
//   auto rpm = RedisLimit<SlidingWindow>::create(
//       {.name = "rpm"}, SlidingWindow::create(per_minute(60)).value(),
//       *redis, {.fail = FailMode::kClosed});
//   Decision d = (*rpm)->acquire(key, 1, SteadyClock{}.now());
//
// Exactness: a script computes in microseconds (TIME's unit) with Lua's
// doubles, exact below 2^53. create() refuses a policy whose period is not a
// whole number of microseconds or whose numbers could leave that range; then
// every decision equals the C++ policy's step at the same time, with waits
// rounded up to the microsecond (tests/redis_test.cpp runs shared vectors
// through both).
#ifndef RATEKEEPER_STORE_REDIS_HPP_
#define RATEKEEPER_STORE_REDIS_HPP_

#include <hiredis/hiredis.h>
#include <poll.h>
#include <sys/socket.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "absl/container/inlined_vector.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/cord.h"
#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "ratekeeper/budget/period.hpp"
#include "ratekeeper/chain.hpp"
#include "ratekeeper/decision.hpp"
#include "ratekeeper/detail/math.hpp"
#include "ratekeeper/detail/mutex.hpp"
#include "ratekeeper/detail/strings.hpp"
#include "ratekeeper/policy/fixed_window.hpp"
#include "ratekeeper/policy/sliding_window.hpp"
#include "ratekeeper/policy/token_bucket.hpp"
#include "ratekeeper/store/redis_lua.hpp"

namespace ratekeeper {

// RedisOptions: one Redis server, or a Redis Cluster (`cluster`).
//   prefix           put before every key ratekeeper writes
//   connect_timeout  per connection attempt
//   command_timeout  per call, all its round trips together (a script
//                    load after NOSCRIPT included); a call that times out is
//                    not retried (Redis may have run it), its connection is
//                    dropped
//   pool_size        connections kept open for reuse (more are opened while
//                    more calls are in flight, and closed after)
//   breaker_failures consecutive failures (no answer: refused, timed out,
//                    cut) that open the circuit breaker: while open, calls
//                    fail at once instead of each waiting for a timeout
//   breaker_open     how long it stays open the first time; then one probe
//                    call goes through (half-open): success closes it,
//                    failure opens it again for twice as long, up to
//                    breaker_max_open
//   breaker_max_open the longest it stays open, and so the bound on
//                    recovery without probes (probe_interval 0): once
//                    Redis answers again, the first call made
//                    breaker_max_open after that goes to it (and,
//                    answered, closes the breaker); add one timeout if a
//                    probe was already waiting when Redis came back. With
//                    probes (the default) about one probe_interval.
//                    create() refuses breaker_failures < 1,
//                    breaker_open <= 0 and breaker_max_open < breaker_open
//                    (huge values saturate: open "for ever")
struct RedisOptions {
  std::string host = "127.0.0.1";
  int port = 6379;
  std::string prefix = "rk:";
  Nanos connect_timeout = std::chrono::milliseconds(250);
  Nanos command_timeout = std::chrono::milliseconds(100);
  std::size_t pool_size = 8;
  int breaker_failures = 3;
  Nanos breaker_open = std::chrono::milliseconds(250);
  Nanos breaker_max_open = std::chrono::seconds(1);
  // A Redis Cluster: host:port is one node to learn the others from
  // (CLUSTER SLOTS); each call goes to the node owning its keys' slot, and
  // follows MOVED (the map is updated) and ASK (once) redirections.
  bool cluster = false;
  // create() answers kUnavailable when Redis does not answer its PING
  // (a wrong address shows at once). With start_unreachable it returns the
  // client anyway: a service can start while Redis is down, its limits
  // answering by their fail modes until Redis answers (a Cluster's slot map
  // is then learned from MOVED replies).
  bool start_unreachable = false;
  // Credentials (managed Redis, ACL users; docs/redis.md "Credentials").
  // Every new connection (the pool's, each Cluster node's, every
  // reconnect) sends AUTH [username] password, then SELECT db when db is
  // not 0, before its first command and within connect_timeout.
  //   username  an ACL user (Redis 6+); empty: the default user. Needs a
  //             password.
  //   password  empty: no AUTH. Never put in a status or a log.
  //   db        the database number, 0 to kMaxDb; 0 only with cluster
  //             (Redis Cluster has database 0 only)
  // create() refuses bad ones with kInvalidArgument; credentials Redis
  // refuses are kUnauthenticated (AUTH refused, or none given where Redis
  // wants one) and a user without a command or key the library needs is
  // kPermissionDenied, both naming the user. After create, such an error
  // refuses the call whatever the limit's fail mode (never admitted as if
  // Redis were down), counted in RedisLimitBase::auth_failures().
  std::string username{};
  std::string password{};
  int db = 0;
  static constexpr int kMaxDb = 1023;
  // Where to connect for a node, for nodes reached through a local tunnel
  // (TLS by stunnel, docs/redis.md "TLS"): "host:port" as Redis names the
  // node (CLUSTER SLOTS, MOVED, ASK) -> "host:port" to connect to. A node
  // not in the map is connected to as named. Routing keeps the node's name
  // (slots, redirections); only the socket goes elsewhere. Applies to the
  // configured host:port too.
  std::map<std::string, std::string> address_map{};
  // Failover, bounded pools, recovery (docs/redis.md, "Redis Cluster" and
  // "When Redis cannot answer"). Each node (the one server, or each Cluster
  // node) has a breaker and a pool of its own.
  //   max_connections  the most connections open to one node at once, in
  //                    use and idle: a call that finds them all busy waits
  //                    for one until its deadline (command_timeout), then
  //                    fails kUnavailable, not run (its fail mode answers).
  //   probe_interval   while a node's breaker is open, a background thread
  //                    PINGs it every probe_interval on a fresh connection;
  //                    a PONG closes the breaker, so a Redis that is back is
  //                    used within about one interval instead of up to
  //                    breaker_max_open. Zero: no background probe (only the
  //                    half-open call above).
  //   slots_refresh_interval (Cluster) the slot map is read again (CLUSTER
  //                    SLOTS, from the nodes it named in turn, replicas
  //                    included) after a node did not answer, was turned
  //                    away by its breaker, or answered MOVED: in that
  //                    background thread, one read at a time, at most one
  //                    per interval.
  //   wait_replicas    above zero, each script call is followed in the same
  //                    round trip by WAIT wait_replicas wait_timeout: a
  //                    call the master ran but fewer replicas acknowledged
  //                    in time is kUnavailable (it may have run: the fail
  //                    mode answers, a settle is journaled), so nothing
  //                    answered from Redis is lost by a failover.
  //                    create() refuses max_connections 0, negative
  //                    intervals or wait_replicas, and a wait_timeout not
  //                    positive or not below command_timeout.
  std::size_t max_connections = 64;
  Nanos probe_interval = std::chrono::milliseconds(50);
  Nanos slots_refresh_interval = std::chrono::milliseconds(100);
  int wait_replicas = 0;
  Nanos wait_timeout = std::chrono::milliseconds(50);
};

// A script: its source, and the SHA1 Redis gave it once loaded.
class RedisScript {
 public:
  explicit RedisScript(std::string source) : source_(std::move(source)) {}
  const std::string& source() const noexcept { return source_; }

 private:
  friend class RedisClient;
  std::string source_;
  mutable detail::Mutex mu_;
  mutable std::string sha_ ABSL_GUARDED_BY(mu_);
};

namespace detail {

// The Redis Cluster slot of `key`: CRC16 (XMODEM) of the key, or of its
// hash tag (the bytes between the first '{' and the next '}', if any), mod
// 16384.
inline std::uint16_t crc16(std::string_view s) noexcept {
  std::uint16_t crc = 0;
  for (const char ch : s) {
    crc =
        static_cast<std::uint16_t>(crc ^ (static_cast<unsigned char>(ch) << 8));
    for (int i = 0; i < 8; ++i) {
      crc = static_cast<std::uint16_t>((crc & 0x8000) != 0 ? (crc << 1) ^ 0x1021
                                                           : crc << 1);
    }
  }
  return crc;
}
inline std::uint16_t key_slot(std::string_view key) noexcept {
  const std::size_t open = key.find('{');
  if (open != std::string_view::npos) {
    const std::size_t close = key.find('}', open + 1);
    if (close != std::string_view::npos && close != open + 1) {
      key = key.substr(open + 1, close - open - 1);
    }
  }
  return static_cast<std::uint16_t>(crc16(key) % 16384);
}

// Breaker: a circuit breaker over the calls to one Redis. Closed: calls go
// through, failures are counted. Open: calls fail at once until the open
// time ends. Then one call, the probe, goes through (half-open): its
// success closes the breaker, its failure opens it again for twice as long.
class Breaker {
 public:
  enum class State : std::uint8_t { kClosed, kOpen, kHalfOpen };

  Breaker(int failures, Nanos first_open, Nanos max_open)
      : failures_to_open_(failures < 1 ? 1 : failures),
        first_open_(first_open),
        max_open_(max_open < first_open ? first_open : max_open),
        backoff_(first_open) {}

  // Whether a call may go to Redis at `now`; `probe` says it is the probe.
  bool admit(Nanos now, bool& probe) {
    std::lock_guard<std::mutex> lock(mu_);
    probe = false;
    switch (state_) {
      case State::kClosed:
        return true;
      case State::kOpen:
        if (now < open_until_) return false;
        state_ = State::kHalfOpen;
        probe = true;
        return true;
      case State::kHalfOpen:
        return false;  // the probe is out
    }
    return false;
  }

  void success() {
    std::lock_guard<std::mutex> lock(mu_);
    failures_ = 0;
    state_ = State::kClosed;
    backoff_ = first_open_;
  }

  void failure(Nanos now, bool probe) {
    std::lock_guard<std::mutex> lock(mu_);
    if (probe || state_ == State::kHalfOpen) {
      // Twice as long, up to the cap (without overflowing near Nanos::max).
      backoff_ = backoff_ > max_open_ / 2 ? max_open_ : backoff_ * 2;
      open(now);
      return;
    }
    if (state_ == State::kClosed && ++failures_ >= failures_to_open_) {
      open(now);
    }
  }

  State state() const {
    std::lock_guard<std::mutex> lock(mu_);
    return state_;
  }
  // Whether a call at `now` would be turned away without being tried:
  // open with its open time not yet over, or half-open with the probe out.
  bool refuses(Nanos now) const {
    std::lock_guard<std::mutex> lock(mu_);
    return (state_ == State::kOpen && now < open_until_) ||
           state_ == State::kHalfOpen;
  }
  std::uint64_t trips() const {
    std::lock_guard<std::mutex> lock(mu_);
    return trips_;
  }

 private:
  void open(Nanos now) {
    state_ = State::kOpen;
    open_until_ = now > Nanos::max() - backoff_ ? Nanos::max() : now + backoff_;
    failures_ = 0;
    ++trips_;
  }

  const int failures_to_open_;
  const Nanos first_open_;
  const Nanos max_open_;
  mutable std::mutex mu_;
  State state_ = State::kClosed;
  int failures_ = 0;
  Nanos backoff_;
  Nanos open_until_{0};
  std::uint64_t trips_ = 0;
};

struct ReplyDeleter {
  void operator()(redisReply* r) const noexcept { freeReplyObject(r); }
};
using ReplyPtr = std::unique_ptr<redisReply, ReplyDeleter>;

struct ContextDeleter {
  void operator()(redisContext* c) const noexcept { redisFree(c); }
};
using ContextPtr = std::unique_ptr<redisContext, ContextDeleter>;

// Waits until `fd` is ready for `events` or `deadline` passes (false).
inline bool wait_fd(int fd, short events,
                    std::chrono::steady_clock::time_point deadline) {
  for (;;) {
    const auto left = deadline - std::chrono::steady_clock::now();
    if (left <= std::chrono::steady_clock::duration::zero()) return false;
    const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(left);
    const timespec ts{static_cast<time_t>(ns.count() / 1'000'000'000),
                      static_cast<long>(ns.count() % 1'000'000'000)};
    pollfd p{fd, events, 0};
    const int r = ppoll(&p, 1, &ts, nullptr);
    if (r > 0) return true;  // ready, or an error the next call reports
    if (r < 0 && errno != EINTR) return true;
  }
}

}  // namespace detail

// RedisClient: a pool of connections to one Redis, or to each node of a
// Redis Cluster. Thread-safe; share it (create() returns a shared_ptr)
// between every limit on that deployment.
//
// Each node has its own circuit breaker and its own bounded pool: one dead
// node turns away only the calls for its slots, and its failure empties
// only its pool. A background thread, started the first time a node fails,
// PINGs nodes whose breaker is open (probe_interval) and, for a Cluster,
// reads the slot map again after a failure (slots_refresh_interval), so
// that the slots of a dead master are sent to its promoted replica without
// a restart; it holds no reference to the client and is joined by the
// destructor.
class RedisClient {
 public:
  // create
  //
  // Checks that Redis answers (one PING on a first connection, after its
  // AUTH and SELECT) and, with credentials, that the user may run what the
  // library runs (a probe script: SCRIPT LOAD, EVALSHA, EVAL and, inside,
  // TIME, GET, SET, DEL, EXISTS on a key under the prefix; it writes
  // nothing). kUnavailable when Redis does not answer (unless
  // options.start_unreachable); kUnauthenticated / kPermissionDenied for
  // credentials Redis refuses (whatever start_unreachable says);
  // kInvalidArgument for bad options.
  static absl::StatusOr<std::shared_ptr<RedisClient>> create(
      RedisOptions options) {
    if (options.port <= 0 || options.port > 65535) {
      return absl::InvalidArgumentError(
          absl::StrCat("RedisOptions: port ", options.port));
    }
    if (options.prefix.find_first_of("{}") != std::string::npos) {
      return absl::InvalidArgumentError(absl::StrCat(
          "RedisOptions: prefix \"", absl::CEscape(options.prefix),
          "\" holds '{' or '}': on a Redis Cluster it would be the hash tag "
          "of every key (all of them in one slot, the tenants' tags "
          "ignored); use a prefix without braces"));
    }
    if (options.connect_timeout <= Nanos{0} ||
        options.command_timeout <= Nanos{0}) {
      return absl::InvalidArgumentError(
          "RedisOptions: timeouts must be positive");
    }
    if (options.breaker_failures < 1 || options.breaker_open <= Nanos{0} ||
        options.breaker_max_open < options.breaker_open) {
      return absl::InvalidArgumentError(
          "RedisOptions: breaker_failures must be at least 1, breaker_open "
          "positive and breaker_max_open at least breaker_open");
    }
    if (options.max_connections < 1 || options.probe_interval < Nanos{0} ||
        options.slots_refresh_interval < Nanos{0}) {
      return absl::InvalidArgumentError(
          "RedisOptions: max_connections must be at least 1, probe_interval "
          "and slots_refresh_interval not negative");
    }
    if (options.wait_replicas < 0 ||
        (options.wait_replicas > 0 &&
         (options.wait_timeout <= Nanos{0} ||
          options.wait_timeout >= options.command_timeout))) {
      return absl::InvalidArgumentError(
          "RedisOptions: wait_replicas must not be negative, and with "
          "replicas to wait for wait_timeout must be positive and below "
          "command_timeout");
    }
    if (options.db < 0 || options.db > RedisOptions::kMaxDb) {
      return absl::InvalidArgumentError(
          absl::StrCat("RedisOptions: db ", options.db, " (0 to ",
                       RedisOptions::kMaxDb, ")"));
    }
    if (options.db != 0 && options.cluster) {
      return absl::InvalidArgumentError(
          absl::StrCat("RedisOptions: db ", options.db,
                       " with cluster: Redis Cluster has database 0 only"));
    }
    if (!options.username.empty() && options.password.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "RedisOptions: user \"", options.username, "\" without a password"));
    }
    for (const auto& [from, to] : options.address_map) {
      std::string h;
      int p = 0;
      if (!split_address(from, h, p) || !split_address(to, h, p)) {
        return absl::InvalidArgumentError(
            absl::StrCat("RedisOptions: address_map \"", from, "\" -> \"", to,
                         "\": both must be host:port"));
      }
    }
    std::shared_ptr<RedisClient> c(new RedisClient(std::move(options)));
    // Only "Redis does not answer" may be waved through: credentials Redis
    // refuses are never a reason to start.
    const auto soft = [&c](const absl::Status& st) {
      return c->options_.start_unreachable && absl::IsUnavailable(st);
    };
    Node* first = c->first_node();
    absl::StatusOr<Conn> conn = c->take(*first, c->command_deadline());
    if (!conn.ok()) {
      if (soft(conn.status())) return c;
      return conn.status();
    }
    const std::string_view ping[] = {"PING"};
    absl::StatusOr<detail::ReplyPtr> pong = c->roundtrip(**conn, ping);
    if (pong.ok() && (*pong)->type == REDIS_REPLY_ERROR) {
      pong = c->as_user(reply_error({(*pong)->str, (*pong)->len}));
    }
    if (!pong.ok()) {
      if (soft(pong.status())) return c;
      return pong.status();
    }
    if (c->options_.cluster) {
      if (absl::Status st = c->learn_slots(**conn); !st.ok() && !soft(st)) {
        return c->as_user(st);
      }
    }
    c->put_back(first, *std::move(conn));
    if (!c->options_.password.empty()) {
      if (absl::Status st = c->probe(); !st.ok() && !soft(st)) return st;
    }
    return c;
  }

  ~RedisClient() {
    {
      std::lock_guard<std::mutex> lock(bg_mu_);
      bg_stop_ = true;
    }
    bg_cv_.notify_all();
    if (bg_thread_.joinable()) bg_thread_.join();
  }
  RedisClient(const RedisClient&) = delete;
  RedisClient& operator=(const RedisClient&) = delete;

  // Whether `st` says the credentials were refused (kUnauthenticated) or
  // the user may not run a command or touch a key (kPermissionDenied):
  // Redis answered, and will answer the same until an operator acts.
  static bool is_auth_error(const absl::Status& st) {
    return absl::IsUnauthenticated(st) || absl::IsPermissionDenied(st);
  }

  // The node a key's slot belongs to, as "host:port" (cluster; else the
  // one server).
  std::string node_of(std::string_view key) {
    const Node* n = node_for(key);
    return absl::StrCat(n->host, ":", n->port);
  }

  const RedisOptions& options() const noexcept { return options_; }

  // eval
  //
  // Runs `script` on `keys` and `args` by EVALSHA, loading the script
  // first and again after NOSCRIPT. The reply, flattened to integers (the
  // scripts here answer arrays of integers). kUnavailable when Redis cannot
  // be reached or did not answer in time (the script may or may not have
  // run: never retried); kInternal for an error reply.
  absl::StatusOr<absl::InlinedVector<std::int64_t, 8>> eval_ints(
      const RedisScript& script, std::span<const std::string_view> keys,
      std::span<const std::string_view> args) {
    return eval_once(script, keys, args);
  }

  // eval_pipelined
  //
  // Runs many calls of `script` with one write and one read per node (a
  // pipeline: all in flight at once), each call's reply in its place as
  // eval_ints would answer it. Calls Redis answers NOSCRIPT, MOVED or ASK
  // run again one at a time. As with eval_ints, a call not answered is
  // kUnavailable and never retried (it may have run).
  struct EvalCall {
    std::span<const std::string_view> keys;
    std::span<const std::string_view> args;
  };
  using IntsOr = absl::StatusOr<absl::InlinedVector<std::int64_t, 8>>;
  std::vector<IntsOr> eval_pipelined(const RedisScript& script,
                                     std::span<const EvalCall> calls) {
    std::vector<IntsOr> out(calls.size(),
                            absl::InternalError("redis: not run"));
    // Nothing to send: nothing learned of Redis, so the breakers are left
    // as they are (an empty batch must not take a probe, nor count as an
    // answer).
    if (calls.empty()) return out;
    // Calls grouped by node, in order within each.
    std::vector<std::pair<Node*, std::vector<std::size_t>>> groups;
    for (std::size_t i = 0; i < calls.size(); ++i) {
      Node* n =
          calls[i].keys.empty() ? first_node() : node_for(calls[i].keys[0]);
      auto g = std::find_if(groups.begin(), groups.end(),
                            [n](const auto& p) { return p.first == n; });
      if (g == groups.end()) {
        groups.push_back({n, {}});
        g = groups.end() - 1;
      }
      g->second.push_back(i);
    }
    std::vector<std::size_t> redo;
    for (auto& [node, which] : groups) {
      // Each node's breaker decides for its calls only.
      bool probe = false;
      if (!node->breaker.admit(steady_now(), probe)) {
        const absl::Status st = breaker_open_status(*node);
        for (const std::size_t i : which) out[i] = st;
        unreachable(*node);
        continue;
      }
      if (probe) drop_idle(*node);  // the probe asks a fresh connection
      const std::size_t redo_before = redo.size();
      pipeline_on(*node, script, calls, which, std::span<IntsOr>(out), redo);
      for (const std::size_t i : which) {  // a cut: asked once per node
        if (out[i].ok() ||
            !out[i].status().GetPayload(detail::av(kCutPayload))) {
          continue;
        }
        if (absl::Status auth =
                cut_over_credentials(*node, out[i].status(), probe);
            !auth.ok()) {
          for (const std::size_t j : which) {
            if (!out[j].ok() &&
                out[j].status().GetPayload(detail::av(kCutPayload))) {
              out[j] = auth;
            }
          }
        }
        break;
      }
      absl::Status worst;
      for (const std::size_t i : which) {
        if (std::find(redo.begin() + static_cast<std::ptrdiff_t>(redo_before),
                      redo.end(), i) != redo.end()) {
          continue;  // answered (a redirection): it runs again below
        }
        if (!out[i].ok() && unanswered(out[i].status())) {
          worst = out[i].status();
          break;
        }
      }
      record(*node, worst, probe);
    }
    for (const std::size_t i : redo) {
      out[i] = eval_once(script, calls[i].keys, calls[i].args);
    }
    return out;
  }

  // command
  //
  // One command (administration, tests) to the configured node: the reply
  // as text (a status, a bulk string, an integer in decimal; arrays joined
  // by newlines).
  absl::StatusOr<std::string> command(std::span<const std::string_view> argv) {
    Node& node = *first_node();
    return on_node(node, [&] { return command_once(node, argv); });
  }
  absl::StatusOr<std::string> command(
      std::initializer_list<std::string_view> argv) {
    return command(
        std::span<const std::string_view>(argv.begin(), argv.size()));
  }

  // may_have_run
  //
  // Whether a call that failed may still have run in Redis: false for a
  // call never sent (breaker open, no connection) and for an error reply
  // that means Redis did not run it (LOADING, BUSY, OOM...); true for a
  // time-out, a cut connection after sending, or a write fewer replicas
  // than wait_replicas acknowledged in time.
  static bool may_have_run(const absl::Status& st) {
    return !st.ok() && !st.GetPayload(detail::av(kNotRunPayload)).has_value();
  }

  // The circuit breakers. Without a Cluster there is one, the server's.
  // With one, each node has its own, and these answer for the nodes that
  // serve slots now (a dead master whose slots moved to its replica no
  // longer counts):
  //   breaker_state()    the worst of their states (kOpen, then kHalfOpen)
  //   breaker_refuses()  whether a call now would fail without being tried
  //                      on every one of them (open and its open time not
  //                      over, or the probe out): Redis is away as a whole
  //   breaker_trips()    how often breakers have opened, every node's
  //                      (those of nodes no longer serving included)
  //   breaker_state(key) the breaker of the node `key`'s slot maps to
  detail::Breaker::State breaker_state() const {
    detail::Breaker::State worst = detail::Breaker::State::kClosed;
    for (const Node* n : serving()) {
      const detail::Breaker::State s = n->breaker.state();
      if (s == detail::Breaker::State::kOpen) return s;
      if (s == detail::Breaker::State::kHalfOpen) worst = s;
    }
    return worst;
  }
  detail::Breaker::State breaker_state(std::string_view key) {
    return node_for(key)->breaker.state();
  }
  bool breaker_refuses() const {
    const Nanos now = steady_now();
    for (const Node* n : serving()) {
      if (!n->breaker.refuses(now)) return false;
    }
    return true;
  }
  std::uint64_t breaker_trips() const {
    detail::MutexLock lock(&mu_);
    std::uint64_t trips = 0;
    for (const auto& n : nodes_) trips += n->breaker.trips();
    return trips;
  }

  // How many times the slot map was read again after create (Cluster).
  std::uint64_t slot_refreshes() const {
    return slot_refreshes_.load(std::memory_order_relaxed);
  }

 private:
  using Deadline = std::chrono::steady_clock::time_point;

  // One server of a deployment: its breaker, and its pool of connections
  // under a lock of its own (the calls to one node never wait on another's
  // pool). `open` counts the connections open to it (in use and idle), at
  // most max_connections.
  struct Node {
    Node(std::string h, int p, const RedisOptions& o)
        : host(std::move(h)),
          port(p),
          breaker(o.breaker_failures, o.breaker_open, o.breaker_max_open) {}
    const std::string host;
    const int port;
    detail::Breaker breaker;
    detail::Mutex mu;
    std::vector<detail::ContextPtr> idle ABSL_GUARDED_BY(mu);
    std::size_t open ABSL_GUARDED_BY(mu) = 0;
    std::size_t waiters ABSL_GUARDED_BY(mu) = 0;
    std::condition_variable_any freed;  // a connection came back or closed
  };

  // A connection taken from a node's pool: put back with put_back(), or
  // closed (and its place in the pool freed) when dropped.
  class Conn {
   public:
    Conn(RedisClient* owner, Node* node, detail::ContextPtr c) noexcept
        : owner_(owner), node_(node), c_(std::move(c)) {}
    Conn(Conn&& o) noexcept
        : owner_(o.owner_), node_(o.node_), c_(std::move(o.c_)) {}
    Conn& operator=(Conn&&) = delete;
    ~Conn() {
      if (c_ != nullptr) owner_->discard(*node_, std::move(c_));
    }
    redisContext& operator*() const noexcept { return *c_; }
    redisContext* operator->() const noexcept { return c_.get(); }
    detail::ContextPtr release() noexcept { return std::move(c_); }

   private:
    RedisClient* owner_;
    Node* node_;
    detail::ContextPtr c_;
  };

  explicit RedisClient(RedisOptions o)
      : options_(std::move(o)),
        first_(new Node(options_.host, options_.port, options_)) {
    detail::MutexLock lock(&mu_);
    nodes_.push_back(std::unique_ptr<Node>(first_));
  }

  static Nanos steady_now() {
    return std::chrono::duration_cast<Nanos>(
        std::chrono::steady_clock::now().time_since_epoch());
  }
  // Now plus `d`, saturating (an interval near Nanos::max(): never).
  static Nanos later(Nanos d) {
    const Nanos now = steady_now();
    return now > Nanos::max() - d ? Nanos::max() : now + d;
  }

  // A failure that says Redis did not answer (counted by the breaker): a
  // kUnavailable that is not an answer (a WAIT that fewer replicas met is
  // one: the master answered).
  static bool unanswered(const absl::Status& st) {
    return absl::IsUnavailable(st) &&
           !st.GetPayload(detail::av(kAnsweredPayload)).has_value();
  }

  // Runs `call` on `node` unless its breaker is open; a call the node did
  // not answer (kUnavailable) counts against its breaker, any answer
  // (errors included) for it.
  template <class F>
  auto on_node(Node& node, F&& call) -> decltype(call()) {
    bool probe = false;
    if (!node.breaker.admit(steady_now(), probe)) {
      unreachable(node);
      return breaker_open_status(node);
    }
    if (probe) drop_idle(node);  // the probe asks a fresh connection
    auto r = call();
    if (!r.ok()) {
      if (absl::Status auth = cut_over_credentials(node, r.status(), probe);
          !auth.ok()) {
        r = auth;
      }
    }
    record(node, r.ok() ? absl::OkStatus() : r.status(), probe);
    return r;
  }

  void record(Node& node, const absl::Status& st, bool probe) {
    if (!st.ok() && unanswered(st)) {
      node.breaker.failure(steady_now(), probe);
      drop_idle(node);  // the node's other connections are likely as dead
      unreachable(node);
    } else {
      node.breaker.success();
    }
  }

  // A node failed or was turned away: the background thread probes it
  // while its breaker is open, and (Cluster) reads the slot map again, in
  // case its slots have a new owner. Cheap when already asked.
  void unreachable(const Node& node) {
    if (options_.cluster) request(refresh_asked_);
    if (options_.probe_interval > Nanos{0} &&
        node.breaker.state() != detail::Breaker::State::kClosed) {
      request(probe_asked_);
    }
  }
  void request(std::atomic<bool>& flag) {
    if (flag.load(std::memory_order_acquire)) return;
    if (flag.exchange(true, std::memory_order_acq_rel)) return;
    std::lock_guard<std::mutex> lock(bg_mu_);
    if (bg_stop_) return;
    bg_kicked_ = true;
    if (!bg_thread_.joinable()) {
      bg_thread_ = std::thread([this] { maintain(); });
    }
    bg_cv_.notify_one();
  }

  // The background thread: slot map reads when asked (one at a time, at
  // most one per slots_refresh_interval), PINGs of the nodes whose breaker
  // is open every probe_interval; asleep when there is nothing to do.
  void maintain() {
    Nanos next_refresh{0};
    for (;;) {
      if (refresh_asked_.load(std::memory_order_acquire) &&
          steady_now() >= next_refresh) {
        refresh_asked_.store(false, std::memory_order_release);
        refresh_slots();
        next_refresh = later(options_.slots_refresh_interval);
      }
      bool probing = false;
      if (options_.probe_interval > Nanos{0}) {
        probe_asked_.store(false, std::memory_order_release);
        probing = probe_open_nodes();
        if (probing) probe_asked_.store(true, std::memory_order_release);
      }
      Nanos until = Nanos::max();
      if (refresh_asked_.load(std::memory_order_acquire)) {
        until = next_refresh;
      }
      if (probing) until = std::min(until, later(options_.probe_interval));
      std::unique_lock<std::mutex> lock(bg_mu_);
      const auto woken = [this] { return bg_stop_ || bg_kicked_; };
      if (until == Nanos::max()) {
        bg_cv_.wait(lock, woken);
      } else {
        bg_cv_.wait_until(
            lock,
            std::chrono::steady_clock::time_point(
                std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                    until)),
            woken);
      }
      if (bg_stop_) return;
      bg_kicked_ = false;
    }
  }

  // The nodes that serve now: the one server, or every node the slot map
  // names (the configured node while the map is empty).
  std::vector<Node*> serving() const {
    detail::MutexLock lock(&mu_);
    if (serving_.empty()) return {first_};
    return serving_;
  }
  // After the slot map changed: the nodes it names, once each.
  void recount_serving() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    serving_.clear();
    for (const std::atomic<Node*>& slot : slots_) {
      Node* const n = slot.load(std::memory_order_relaxed);
      if (n != nullptr &&
          std::find(serving_.begin(), serving_.end(), n) == serving_.end()) {
        serving_.push_back(n);
      }
    }
  }

  // PINGs each serving node whose breaker is not closed, on a fresh
  // connection; a PONG closes its breaker (and the connection joins its
  // pool). Whether any is still not closed.
  bool probe_open_nodes() {
    bool still_open = false;
    for (Node* np : serving()) {
      Node& n = *np;
      if (n.breaker.state() == detail::Breaker::State::kClosed) continue;
      drop_idle(n);
      const Deadline deadline = command_deadline();
      absl::StatusOr<Conn> conn = take(n, std::chrono::steady_clock::now());
      bool pong = false;
      if (conn.ok()) {
        const std::string_view ping[] = {"PING"};
        absl::StatusOr<detail::ReplyPtr> r = roundtrip(**conn, ping, deadline);
        pong = r.ok() && (*r)->type == REDIS_REPLY_STATUS &&
               std::string_view((*r)->str, (*r)->len) == "PONG";
        if (pong) put_back(&n, *std::move(conn));
      }
      if (pong) {
        n.breaker.success();
      } else {
        still_open = true;
      }
    }
    return still_open;
  }

  // Reads the slot map again from one node: the nodes the map named
  // (masters and replicas), in turn from a cursor that moves on each time
  // (a node with a stale map is not asked twice in a row), those whose
  // breaker lets calls through first.
  void refresh_slots() {
    std::vector<Node*> order;
    {
      detail::MutexLock lock(&mu_);
      const std::size_t n = nodes_.size();
      const std::size_t start = refresh_cursor_++ % n;
      for (std::size_t i = 0; i < n; ++i) {
        order.push_back(nodes_[(start + i) % n].get());
      }
    }
    std::stable_partition(order.begin(), order.end(), [](const Node* n) {
      return n->breaker.state() == detail::Breaker::State::kClosed;
    });
    for (Node* n : order) {
      absl::StatusOr<Conn> conn = take(*n, std::chrono::steady_clock::now());
      if (!conn.ok()) continue;
      if (learn_slots(**conn).ok()) {
        put_back(n, *std::move(conn));
        slot_refreshes_.fetch_add(1, std::memory_order_relaxed);
        return;
      }
    }
  }

  // The node for `keys` (all of one slot by construction), following up
  // to five MOVED or ASK redirections; each node's breaker decides for the
  // calls to it.
  absl::StatusOr<absl::InlinedVector<std::int64_t, 8>> eval_once(
      const RedisScript& script, std::span<const std::string_view> keys,
      std::span<const std::string_view> args) {
    Node* node = keys.empty() ? first_node() : node_for(keys[0]);
    bool asking = false;
    for (int hop = 0; hop < 6; ++hop) {
      absl::StatusOr<absl::InlinedVector<std::int64_t, 8>> r = on_node(
          *node, [&] { return eval_on(*node, asking, script, keys, args); });
      if (r.ok() || !absl::IsInternal(r.status())) return r;
      const absl::string_view am = r.status().message();
      const std::string_view msg(am.data(), am.size());
      const bool moved = msg.substr(0, 13) == "redis: MOVED ";
      const bool ask = msg.substr(0, 11) == "redis: ASK ";
      if (!moved && !ask) return r;
      // "MOVED <slot> <host>:<port>" / "ASK <slot> <host>:<port>"
      const std::string_view rest = msg.substr(moved ? 13 : 11);
      const std::size_t sp = rest.find(' ');
      const std::size_t colon = rest.rfind(':');
      if (sp == std::string_view::npos || colon == std::string_view::npos ||
          colon < sp) {
        return r;
      }
      int slot = 0, port = 0;
      if (!absl::SimpleAtoi(detail::av(rest.substr(0, sp)), &slot) ||
          !absl::SimpleAtoi(detail::av(rest.substr(colon + 1)), &port) ||
          slot < 0 || slot >= 16384) {
        return r;
      }
      node = node_at(std::string(rest.substr(sp + 1, colon - sp - 1)), port);
      if (moved && options_.cluster) {  // (one server: no map to keep)
        {
          detail::MutexLock lock(&mu_);
          slots_[static_cast<std::size_t>(slot)].store(
              node, std::memory_order_release);
          recount_serving();
        }
        // A slot moved: others may have too (a failover, a resharding).
        request(refresh_asked_);
      }
      asking = ask;
    }
    return absl::InternalError("redis: too many cluster redirections");
  }

  absl::StatusOr<absl::InlinedVector<std::int64_t, 8>> eval_on(
      Node& node, bool asking, const RedisScript& script,
      std::span<const std::string_view> keys,
      std::span<const std::string_view> args) {
    // One deadline for every round trip of this call (a wait for a free
    // connection, ASKING, a script load after NOSCRIPT, the script): a
    // decision waits at most command_timeout, plus the time it spent
    // opening a connection (at most connect_timeout).
    Deadline deadline = command_deadline();
    absl::StatusOr<Conn> conn = take(node, deadline, &deadline);
    if (!conn.ok()) return conn.status();
    if (asking) {
      const std::string_view a[] = {"ASKING"};
      absl::StatusOr<detail::ReplyPtr> ok = roundtrip(**conn, a, deadline);
      if (!ok.ok()) return ok.status();
      if ((*ok)->type == REDIS_REPLY_ERROR) {  // NOPERM: no +asking
        put_back(&node, *std::move(conn));
        return reply_error({(*ok)->str, (*ok)->len});
      }
    }
    std::string sha = known_sha(script);
    for (int attempt = 0; attempt < 2; ++attempt) {
      if (sha.empty()) {
        absl::StatusOr<std::string> loaded = load(**conn, script, deadline);
        if (!loaded.ok()) return loaded.status();
        sha = *std::move(loaded);
        if (asking) {  // ASKING holds for the next command only
          const std::string_view a[] = {"ASKING"};
          absl::StatusOr<detail::ReplyPtr> ok = roundtrip(**conn, a, deadline);
          if (!ok.ok()) return ok.status();
        }
      }
      if (attempt == 1 && asking) {  // spent on the EVALSHA
        const std::string_view a[] = {"ASKING"};
        absl::StatusOr<detail::ReplyPtr> ok = roundtrip(**conn, a, deadline);
        if (!ok.ok()) return ok.status();
      }
      // After NOSCRIPT, EVAL with the source: it cannot answer NOSCRIPT
      // (a flush between a SCRIPT LOAD and an EVALSHA could), and it caches
      // the script again for the next EVALSHA.
      absl::InlinedVector<std::string_view, 16> argv;
      const std::string nkeys = std::to_string(keys.size());
      argv.push_back(attempt == 0 ? "EVALSHA" : "EVAL");
      argv.push_back(attempt == 0 ? std::string_view(sha)
                                  : std::string_view(script.source()));
      argv.push_back(nkeys);
      argv.insert(argv.end(), keys.begin(), keys.end());
      argv.insert(argv.end(), args.begin(), args.end());
      bool replicated = true;
      absl::StatusOr<detail::ReplyPtr> r =
          roundtrip_waited(**conn, argv, deadline, replicated);
      if (!r.ok()) return r.status();  // the connection is gone
      const redisReply& reply = **r;
      if (reply.type == REDIS_REPLY_ERROR) {
        const std::string_view msg(reply.str, reply.len);
        if (msg.substr(0, 8) == "NOSCRIPT" && attempt == 0) {
          continue;  // Redis lost its scripts: run the source once
        }
        put_back(&node, *std::move(conn));
        return reply_error(msg);
      }
      put_back(&node, *std::move(conn));
      if (!replicated) return not_replicated(node);
      return ints_of(reply);
    }
    return absl::InternalError("redis: no answer to the script");
  }

  // An error reply as a status. Redis refuses some commands without running
  // them while it cannot serve (loading its data after a restart, a script
  // running too long, no master, out of memory): those are kUnavailable,
  // like no answer (the fail mode answers; a settle is journaled), marked
  // "(not run)"; any other error is kInternal.
  //
  // Credentials refused (NOAUTH: none given where Redis wants one;
  // WRONGPASS) are kUnauthenticated, a command or key the user may not
  // touch (NOPERM, and a script's command refused by the ACL) is
  // kPermissionDenied: both not run, and not "Redis is down".
  static absl::Status reply_error(std::string_view msg) {
    if (msg.substr(0, 6) == "NOAUTH" || msg.substr(0, 9) == "WRONGPASS") {
      return not_run(absl::UnauthenticatedError(
          absl::StrCat("redis: ", detail::av(msg), " (not run)")));
    }
    constexpr std::string_view kScriptAcl =
        "ERR The user executing the script can";  // 't run ... / 't access
    if (msg.substr(0, 6) == "NOPERM" ||
        msg.substr(0, kScriptAcl.size()) == kScriptAcl) {
      return not_run(absl::PermissionDeniedError(
          absl::StrCat("redis: ", detail::av(msg), " (not run)")));
    }
    for (const std::string_view transient :
         {"LOADING", "BUSY", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "OOM"}) {
      if (msg.substr(0, transient.size()) == transient &&
          (msg.size() == transient.size() || msg[transient.size()] == ' ')) {
        return not_run(absl::UnavailableError(
            absl::StrCat("redis: ", detail::av(msg), " (not run)")));
      }
    }
    return absl::InternalError(absl::StrCat("redis: ", detail::av(msg)));
  }

  // A script's reply: an integer or an array of integers.
  static absl::StatusOr<absl::InlinedVector<std::int64_t, 8>> ints_of(
      const redisReply& reply) {
    absl::InlinedVector<std::int64_t, 8> out;
    if (reply.type == REDIS_REPLY_INTEGER) {
      out.push_back(reply.integer);
    } else if (reply.type == REDIS_REPLY_ARRAY) {
      for (std::size_t i = 0; i < reply.elements; ++i) {
        if (reply.element[i]->type != REDIS_REPLY_INTEGER) {
          return absl::InternalError("redis: a script answered a non-integer");
        }
        out.push_back(reply.element[i]->integer);
      }
    } else if (reply.type == REDIS_REPLY_ERROR) {
      return reply_error(std::string_view(reply.str, reply.len));
    } else {
      return absl::InternalError("redis: unexpected reply type");
    }
    return out;
  }

  // The calls of one node, pipelined on one connection: every EVALSHA
  // written at once (and one WAIT after them with wait_replicas), the
  // replies read in order, under one deadline. A call answered NOSCRIPT,
  // MOVED or ASK is left for eval_once (`redo`); after an I/O failure the
  // calls not answered are kUnavailable.
  void pipeline_on(Node& node, const RedisScript& script,
                   std::span<const EvalCall> calls,
                   std::span<const std::size_t> which, std::span<IntsOr> out,
                   std::vector<std::size_t>& redo) {
    auto fail_from = [&](std::size_t k, const absl::Status& st) {
      for (; k < which.size(); ++k) out[which[k]] = st;
    };
    Deadline deadline = command_deadline();
    absl::StatusOr<Conn> conn = take(node, deadline, &deadline);
    if (!conn.ok()) return fail_from(0, conn.status());
    std::string sha = known_sha(script);
    if (sha.empty()) {
      absl::StatusOr<std::string> loaded = load(**conn, script, deadline);
      if (!loaded.ok()) return fail_from(0, loaded.status());
      sha = *std::move(loaded);
    }
    for (const std::size_t i : which) {
      absl::InlinedVector<const char*, 24> ptrs;
      absl::InlinedVector<std::size_t, 24> lens;
      const std::string nkeys = std::to_string(calls[i].keys.size());
      auto add = [&](std::string_view a) {
        ptrs.push_back(a.data());
        lens.push_back(a.size());
      };
      add("EVALSHA");
      add(sha);
      add(nkeys);
      for (const std::string_view k : calls[i].keys) add(k);
      for (const std::string_view a : calls[i].args) add(a);
      if (redisAppendCommandArgv(&**conn, static_cast<int>(ptrs.size()),
                                 ptrs.data(), lens.data()) != REDIS_OK) {
        return fail_from(0, unavailable((*conn)->errstr));
      }
    }
    if (options_.wait_replicas > 0) {
      const std::string n = std::to_string(options_.wait_replicas);
      const std::string wait_ms = wait_millis();
      const std::string_view w[] = {"WAIT", n, wait_ms};
      if (absl::Status st = append(**conn, w); !st.ok()) {
        return fail_from(0, st);
      }
    }
    if (absl::Status st = flush(**conn, deadline); !st.ok()) {
      return fail_from(0, st);
    }
    for (std::size_t k = 0; k < which.size(); ++k) {
      absl::StatusOr<detail::ReplyPtr> reply = read_reply(**conn, deadline);
      if (!reply.ok()) return fail_from(k, reply.status());
      if ((*reply)->type == REDIS_REPLY_ERROR) {
        const std::string_view msg((*reply)->str, (*reply)->len);
        if (msg.substr(0, 8) == "NOSCRIPT" || msg.substr(0, 6) == "MOVED " ||
            msg.substr(0, 4) == "ASK ") {
          redo.push_back(which[k]);
          continue;
        }
      }
      out[which[k]] = ints_of(**reply);
    }
    if (options_.wait_replicas > 0) {
      absl::StatusOr<detail::ReplyPtr> w = read_reply(**conn, deadline);
      // Without the WAIT's answer no call of the batch is known replicated.
      const bool replicated = w.ok() && replicas_met(**w);
      for (const std::size_t i : which) {
        if (out[i].ok() && !replicated) {
          out[i] = w.ok() ? not_replicated(node) : w.status();
        }
      }
      if (!w.ok()) return;
    }
    put_back(&node, *std::move(conn));
  }

  absl::StatusOr<std::string> command_once(
      Node& node, std::span<const std::string_view> argv) {
    Deadline deadline = command_deadline();
    absl::StatusOr<Conn> conn = take(node, deadline, &deadline);
    if (!conn.ok()) return conn.status();
    absl::StatusOr<detail::ReplyPtr> r = roundtrip(**conn, argv, deadline);
    if (!r.ok()) return r.status();
    const redisReply& reply = **r;
    std::string out;
    if (reply.type == REDIS_REPLY_ERROR) {
      out.assign(reply.str, reply.len);
      put_back(&node, *std::move(conn));
      if (absl::Status st = reply_error(out); is_auth_error(st)) return st;
      return absl::InternalError(absl::StrCat("redis: ", out));
    }
    append_text(reply, out);
    put_back(&node, *std::move(conn));
    return out;
  }

  // Closes `node`'s idle connections (after it failed: the others are
  // likely as dead); other nodes' pools are left alone.
  void drop_idle(Node& node) {
    std::vector<detail::ContextPtr> dead;
    detail::MutexLock lock(&node.mu);
    dead.swap(node.idle);
    node.open -= dead.size();
    if (node.waiters > 0 && !dead.empty()) node.freed.notify_all();
  }

  // Without a lock: the first node never changes, and a slot's entry is
  // an atomic pointer to a node that is never removed.
  Node* first_node() const { return first_; }
  Node* node_for(std::string_view key) const {
    if (!options_.cluster) return first_;
    Node* n = slots_[detail::key_slot(key)].load(std::memory_order_acquire);
    return n != nullptr ? n : first_;
  }
  Node* node_at(std::string host, int port) {
    detail::MutexLock lock(&mu_);
    for (auto& n : nodes_) {
      if (n->port == port && n->host == host) return n.get();
    }
    nodes_.push_back(std::make_unique<Node>(std::move(host), port, options_));
    return nodes_.back().get();
  }

  // The slot map, from CLUSTER SLOTS: [[start, end, [host, port, id],
  // replicas...], ...]. The replicas become nodes too: a later read of the
  // map may ask them (a dead master's replica knows of its promotion
  // first).
  absl::Status learn_slots(redisContext& c) {
    const std::string_view argv[] = {"CLUSTER", "SLOTS"};
    absl::StatusOr<detail::ReplyPtr> r = roundtrip(c, argv);
    if (!r.ok()) return r.status();
    const redisReply& top = **r;
    if (top.type == REDIS_REPLY_ERROR) {
      if (absl::Status st = reply_error({top.str, top.len});
          is_auth_error(st)) {
        return st;
      }
    }
    if (top.type != REDIS_REPLY_ARRAY) {
      return absl::FailedPreconditionError(
          "redis: CLUSTER SLOTS failed (is cluster mode enabled?)");
    }
    const auto address = [](const redisReply& e) {
      return e.type == REDIS_REPLY_ARRAY && e.elements >= 2 &&
             e.element[0]->type == REDIS_REPLY_STRING &&
             e.element[1]->type == REDIS_REPLY_INTEGER;
    };
    for (std::size_t i = 0; i < top.elements; ++i) {
      const redisReply& range = *top.element[i];
      if (range.type != REDIS_REPLY_ARRAY || range.elements < 3 ||
          range.element[0]->type != REDIS_REPLY_INTEGER ||
          range.element[1]->type != REDIS_REPLY_INTEGER ||
          !address(*range.element[2])) {
        continue;
      }
      const redisReply& master = *range.element[2];
      Node* n =
          node_at(std::string(master.element[0]->str, master.element[0]->len),
                  static_cast<int>(master.element[1]->integer));
      for (std::size_t j = 3; j < range.elements; ++j) {
        const redisReply& replica = *range.element[j];
        if (address(replica)) {
          node_at(std::string(replica.element[0]->str, replica.element[0]->len),
                  static_cast<int>(replica.element[1]->integer));
        }
      }
      detail::MutexLock lock(&mu_);
      for (long long slot = std::max(0LL, range.element[0]->integer);
           slot <= range.element[1]->integer && slot < 16384; ++slot) {
        slots_[static_cast<std::size_t>(slot)].store(n,
                                                     std::memory_order_release);
      }
    }
    detail::MutexLock lock(&mu_);
    recount_serving();
    return absl::OkStatus();
  }

  static void append_text(const redisReply& r, std::string& out) {
    switch (r.type) {
      case REDIS_REPLY_INTEGER:
        absl::StrAppend(&out, r.integer);
        break;
      case REDIS_REPLY_ARRAY:
        for (std::size_t i = 0; i < r.elements; ++i) {
          if (i != 0) out += '\n';
          append_text(*r.element[i], out);
        }
        break;
      case REDIS_REPLY_NIL:
        break;
      default:
        out.append(r.str, r.len);
    }
  }

  // A connection, non-blocking: every wait below is a ppoll() against a
  // deadline, exact to the microsecond (socket timeouts would round up to
  // the kernel's tick).
  //
  // Then readied, within the same connect_timeout: AUTH and SELECT
  // (RedisOptions's credentials). Credentials refused make every new
  // connection fail at once for breaker_open, with the same status: a
  // wrong password does not cost a connection per call.
  absl::StatusOr<detail::ContextPtr> open(const Node& node) const {
    const auto deadline = std::chrono::steady_clock::now() +
                          std::chrono::duration_cast<std::chrono::nanoseconds>(
                              options_.connect_timeout);
    {
      detail::MutexLock lock(&auth_mu_);
      if (!auth_refused_.ok() &&
          std::chrono::steady_clock::now() < auth_retry_at_) {
        return auth_refused_;
      }
    }
    std::string host = node.host;
    int port = node.port;
    if (!options_.address_map.empty()) {
      const auto to =
          options_.address_map.find(absl::StrCat(node.host, ":", node.port));
      if (to != options_.address_map.end()) {
        split_address(to->second, host, port);  // checked by create()
      }
    }
    detail::ContextPtr c(redisConnectNonBlock(host.c_str(), port));
    if (c == nullptr) {
      return absl::ResourceExhaustedError("redis: cannot allocate a context");
    }
    // Nothing is sent before a connection is open: not run.
    if (c->err != 0) return not_run(unavailable(c->errstr));
    if (!detail::wait_fd(c->fd, POLLOUT, deadline)) {
      return not_run(unavailable("connect timed out"));
    }
    int err = 0;
    socklen_t len = sizeof(err);
    if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0 || err != 0) {
      return not_run(unavailable(std::strerror(err != 0 ? err : errno)));
    }
    if (absl::Status st = ready(*c, deadline); !st.ok()) return not_run(st);
    return c;
  }

  // AUTH and SELECT on a new connection. Statuses name the user, never
  // the password (Redis's replies do not carry it either).
  absl::Status ready(redisContext& c,
                     std::chrono::steady_clock::time_point deadline) const {
    absl::Status refused;
    if (!options_.password.empty()) {
      absl::InlinedVector<std::string_view, 3> argv = {"AUTH"};
      if (!options_.username.empty()) argv.push_back(options_.username);
      argv.push_back(options_.password);
      absl::StatusOr<detail::ReplyPtr> r = roundtrip(c, argv, deadline);
      if (!r.ok()) return r.status();
      if ((*r)->type == REDIS_REPLY_ERROR) {
        // WRONGPASS, or "AUTH ... called without any password configured":
        // either way these credentials are not accepted.
        refused = not_run(absl::UnauthenticatedError(absl::StrCat(
            "redis ", options_.host, ":", options_.port, ": AUTH ", user_text(),
            " refused: ", detail::av(std::string_view((*r)->str, (*r)->len)))));
      }
    }
    if (refused.ok() && options_.db != 0) {
      const std::string db = std::to_string(options_.db);
      const std::string_view argv[] = {"SELECT", db};
      absl::StatusOr<detail::ReplyPtr> r = roundtrip(c, argv, deadline);
      if (!r.ok()) return r.status();
      if ((*r)->type == REDIS_REPLY_ERROR) {
        const std::string_view msg((*r)->str, (*r)->len);
        absl::Status st = reply_error(msg);
        if (!is_auth_error(st)) {
          // "DB index is out of range": this server has fewer databases.
          return absl::InvalidArgumentError(
              absl::StrCat("redis ", options_.host, ":", options_.port,
                           ": SELECT ", db, ": ", detail::av(msg)));
        }
        refused = as_user(st);
      }
    }
    detail::MutexLock lock(&auth_mu_);
    auth_refused_ = refused;
    if (!refused.ok()) {
      auth_retry_at_ = std::chrono::steady_clock::now() +
                       std::chrono::duration_cast<std::chrono::nanoseconds>(
                           options_.breaker_open);
    }
    return refused;
  }

  std::string user_text() const {
    return options_.username.empty()
               ? std::string("as the default user")
               : absl::StrCat("as user \"", options_.username, "\"");
  }
  // An auth status with the host and the user named.
  absl::Status as_user(absl::Status st) const {
    if (!is_auth_error(st)) return st;
    absl::Status out(st.code(),
                     absl::StrCat("redis ", options_.host, ":", options_.port,
                                  " ", user_text(), ": ", st.message()));
    return not_run(std::move(out));
  }

  // Whether the user may run what the library runs: the scripts' commands
  // on a key under the prefix (the probe writes nothing: SET XX of a key
  // that does not exist, DEL of it), by EVALSHA after SCRIPT LOAD, and
  // EVAL (run after NOSCRIPT). PING was checked by create().
  absl::Status probe() {
    // Not static: its SCRIPT LOAD runs for every client (a SHA known from
    // another client would skip it).
    const RedisScript probe_script{
        "redis.call('TIME') redis.call('EXISTS', KEYS[1]) "
        "redis.call('GET', KEYS[1]) "
        "redis.call('SET', KEYS[1], '0', 'PX', 1, 'XX') "
        "redis.call('DEL', KEYS[1]) return 1"};
    const std::string key = absl::StrCat(options_.prefix, "#probe");
    const std::string_view keys[] = {key};
    absl::Status st = eval_ints(probe_script, keys, {}).status();
    if (st.ok()) st = command({"EVAL", "return 1", "0"}).status();
    if (!is_auth_error(st)) return st;
    return not_run(absl::Status(
        st.code(),
        absl::StrCat(
            "redis ", options_.host, ":", options_.port, " ", user_text(),
            ": the user may not run what ratekeeper runs on keys under \"",
            options_.prefix,
            "\" (docs/redis.md has the ACL line): ", st.message())));
  }

  // "host:port" (the port after the last ':', 1 to 65535).
  static bool split_address(std::string_view a, std::string& host, int& port) {
    const std::size_t colon = a.rfind(':');
    if (colon == std::string_view::npos || colon == 0) return false;
    int p = 0;
    if (!absl::SimpleAtoi(detail::av(a.substr(colon + 1)), &p) || p <= 0 ||
        p > 65535) {
      return false;
    }
    host = std::string(a.substr(0, colon));
    port = p;
    return true;
  }

  static constexpr std::string_view kNotRunPayload = "ratekeeper.redis/not-run";
  // On a kUnavailable that is nonetheless Redis's answer (a WAIT that fewer
  // replicas met): the node's breaker counts it as an answer.
  static constexpr std::string_view kAnsweredPayload =
      "ratekeeper.redis/answered";
  static absl::Status not_run(absl::Status st) {
    st.SetPayload(detail::av(kNotRunPayload), absl::Cord("1"));
    return st;
  }
  absl::Status breaker_open_status(const Node& node) const {
    return not_run(absl::UnavailableError(
        absl::StrCat("redis ", node.host, ":", node.port,
                     ": circuit open after repeated failures (not tried)")));
  }
  absl::Status not_replicated(const Node& node) const {
    absl::Status st = absl::UnavailableError(absl::StrCat(
        "redis ", node.host, ":", node.port, ": run, but fewer than ",
        options_.wait_replicas, " replicas acknowledged it within ",
        wait_millis(), " ms (WAIT)"));
    st.SetPayload(detail::av(kAnsweredPayload), absl::Cord("1"));
    return st;
  }

  // A connection that failed on a read or a write (closed by Redis, reset,
  // broken): kUnavailable, marked so that on_node() can ask a fresh
  // connection whether Redis closed it over credentials.
  static constexpr std::string_view kCutPayload = "ratekeeper.redis/cut";
  absl::Status io_failed(const redisContext& c) const {
    absl::Status st = unavailable(c.errstr);
    st.SetPayload(detail::av(kCutPayload), absl::Cord("1"));
    return st;
  }

  // Redis may close a client's connections because its credentials no
  // longer hold (CLIENT KILL USER after a password change, ACL DELUSER): a
  // call cut that way must be refused as an auth error, never answered by
  // the fail mode. So after a cut (not a time-out: a dead or slow host
  // costs nothing more) one fresh connection is opened, within
  // connect_timeout: if Redis refuses its AUTH, that status is the call's
  // (which refuses it, and holds new connections for breaker_open); if it
  // opens, or fails otherwise, the cut stands. Not for the breaker's probe,
  // whose connection is already a fresh one.
  absl::Status cut_over_credentials(const Node& node, const absl::Status& st,
                                    bool probe) const {
    if (probe || st.ok() || !st.GetPayload(detail::av(kCutPayload))) {
      return absl::OkStatus();
    }
    absl::StatusOr<detail::ContextPtr> fresh = open(node);
    if (!fresh.ok() && is_auth_error(fresh.status())) return fresh.status();
    return absl::OkStatus();
  }

  absl::Status unavailable(std::string_view why) const {
    return absl::UnavailableError(absl::StrCat(
        "redis ", options_.host, ":", options_.port, ": ", detail::av(why)));
  }

  // A connection to `node`: an idle one, or a new one while fewer than
  // max_connections are open; else waits for one until `deadline`, then
  // kUnavailable (not run). With `after_connect`, the time spent opening a
  // connection is added to it (the connect has its own time-out).
  absl::StatusOr<Conn> take(Node& node, Deadline deadline,
                            Deadline* after_connect = nullptr) {
    {
      detail::MutexLock lock(&node.mu);
      for (;;) {
        if (!node.idle.empty()) {
          detail::ContextPtr c = std::move(node.idle.back());
          node.idle.pop_back();
          return Conn(this, &node, std::move(c));
        }
        if (node.open < options_.max_connections) {
          ++node.open;
          break;
        }
        if (std::chrono::steady_clock::now() >= deadline) {
          return not_run(absl::UnavailableError(absl::StrCat(
              "redis ", node.host, ":", node.port, ": all ",
              options_.max_connections,
              " connections busy until the call's deadline (not run)")));
        }
        ++node.waiters;
        node.freed.wait_until(node.mu, deadline);
        --node.waiters;
      }
    }
    const auto start = std::chrono::steady_clock::now();
    absl::StatusOr<detail::ContextPtr> c = open(node);
    if (!c.ok()) {
      discard(node, nullptr);
      return c.status();
    }
    if (after_connect != nullptr) {
      *after_connect += std::chrono::steady_clock::now() - start;
    }
    return Conn(this, &node, *std::move(c));
  }

  void put_back(Node* node, Conn conn) {
    detail::ContextPtr c = conn.release();
    detail::ContextPtr spare;  // closed after the lock is released
    detail::MutexLock lock(&node->mu);
    if (node->idle.size() < options_.pool_size) {
      node->idle.push_back(std::move(c));
    } else {
      spare = std::move(c);
      --node->open;
    }
    if (node->waiters > 0) node->freed.notify_one();
  }

  // A connection of `node` closed (`c`, null when the open failed).
  void discard(Node& node, detail::ContextPtr c) {
    c.reset();
    detail::MutexLock lock(&node.mu);
    --node.open;
    if (node.waiters > 0) node.freed.notify_one();
  }

  // One command on `c`. A null reply (I/O error, timeout) leaves `c` in an
  // unknown state: the caller drops it (by not putting it back).
  Deadline command_deadline() const {
    return std::chrono::steady_clock::now() +
           std::chrono::duration_cast<std::chrono::nanoseconds>(
               options_.command_timeout);
  }

  absl::StatusOr<detail::ReplyPtr> roundtrip(
      redisContext& c, std::span<const std::string_view> argv) const {
    return roundtrip(c, argv, command_deadline());
  }
  absl::StatusOr<detail::ReplyPtr> roundtrip(
      redisContext& c, std::span<const std::string_view> argv,
      Deadline deadline) const {
    if (absl::Status st = append(c, argv); !st.ok()) return st;
    if (absl::Status st = flush(c, deadline); !st.ok()) return st;
    return read_reply(c, deadline);
  }

  // A script call, and with wait_replicas its WAIT in the same write;
  // `replicated` says whether enough replicas acknowledged it (true
  // without wait_replicas). The script's reply.
  absl::StatusOr<detail::ReplyPtr> roundtrip_waited(
      redisContext& c, std::span<const std::string_view> argv,
      Deadline deadline, bool& replicated) const {
    replicated = true;
    if (options_.wait_replicas <= 0) return roundtrip(c, argv, deadline);
    const std::string n = std::to_string(options_.wait_replicas);
    const std::string ms = wait_millis();
    const std::string_view w[] = {"WAIT", n, ms};
    if (absl::Status st = append(c, argv); !st.ok()) return st;
    if (absl::Status st = append(c, w); !st.ok()) return st;
    if (absl::Status st = flush(c, deadline); !st.ok()) return st;
    absl::StatusOr<detail::ReplyPtr> r = read_reply(c, deadline);
    if (!r.ok()) return r;
    absl::StatusOr<detail::ReplyPtr> waited = read_reply(c, deadline);
    if (!waited.ok()) return waited.status();
    replicated = replicas_met(**waited);
    return r;
  }
  bool replicas_met(const redisReply& w) const {
    return w.type == REDIS_REPLY_INTEGER && w.integer >= options_.wait_replicas;
  }
  // WAIT's time-out in whole milliseconds, rounded up (0 would wait for
  // ever).
  std::string wait_millis() const {
    const auto ms =
        std::chrono::ceil<std::chrono::milliseconds>(options_.wait_timeout);
    return std::to_string(std::max<std::int64_t>(1, ms.count()));
  }

  absl::Status append(redisContext& c,
                      std::span<const std::string_view> argv) const {
    absl::InlinedVector<const char*, 16> ptrs;
    absl::InlinedVector<std::size_t, 16> lens;
    for (const std::string_view a : argv) {
      ptrs.push_back(a.data());
      lens.push_back(a.size());
    }
    if (redisAppendCommandArgv(&c, static_cast<int>(argv.size()), ptrs.data(),
                               lens.data()) != REDIS_OK) {
      return unavailable(c.errstr);
    }
    return absl::OkStatus();
  }
  absl::Status flush(redisContext& c, Deadline deadline) const {
    for (int done = 0; done == 0;) {
      if (redisBufferWrite(&c, &done) != REDIS_OK) return io_failed(c);
      if (done == 0 && !detail::wait_fd(c.fd, POLLOUT, deadline)) {
        return unavailable("timed out writing");
      }
    }
    return absl::OkStatus();
  }
  absl::StatusOr<detail::ReplyPtr> read_reply(redisContext& c,
                                              Deadline deadline) const {
    for (;;) {
      void* reply = nullptr;
      if (redisGetReplyFromReader(&c, &reply) != REDIS_OK) {
        return unavailable(c.errstr);  // a protocol error, not a cut
      }
      if (reply != nullptr) {
        return detail::ReplyPtr(static_cast<redisReply*>(reply));
      }
      if (!detail::wait_fd(c.fd, POLLIN, deadline)) {
        return unavailable("timed out waiting for the reply");
      }
      if (redisBufferRead(&c) != REDIS_OK) return io_failed(c);
    }
  }

  static std::string known_sha(const RedisScript& s) {
    detail::MutexLock lock(&s.mu_);
    return s.sha_;
  }

  absl::StatusOr<std::string> load(redisContext& c, const RedisScript& s,
                                   Deadline deadline) {
    const std::string_view argv[] = {"SCRIPT", "LOAD", s.source()};
    absl::StatusOr<detail::ReplyPtr> r = roundtrip(c, argv, deadline);
    if (!r.ok()) return r.status();
    if ((*r)->type == REDIS_REPLY_ERROR) {
      absl::Status st = reply_error({(*r)->str, (*r)->len});
      if (is_auth_error(st)) return st;
    }
    if ((*r)->type != REDIS_REPLY_STRING) {
      return absl::InternalError(absl::StrCat(
          "redis: SCRIPT LOAD failed: ", (*r)->type == REDIS_REPLY_ERROR
                                             ? std::string((*r)->str, (*r)->len)
                                             : "unexpected reply"));
    }
    std::string sha((*r)->str, (*r)->len);
    detail::MutexLock lock(&s.mu_);
    s.sha_ = sha;
    return sha;
  }

  const RedisOptions options_;
  Node* const first_;  // the configured server, nodes_[0]
  // Credentials refused on a new connection, and until when new ones are
  // not tried (open()).
  mutable detail::Mutex auth_mu_;
  mutable absl::Status auth_refused_ ABSL_GUARDED_BY(auth_mu_);
  mutable std::chrono::steady_clock::time_point auth_retry_at_
      ABSL_GUARDED_BY(auth_mu_);
  mutable detail::Mutex mu_;
  // Nodes are never removed, so Node pointers stay valid.
  std::vector<std::unique_ptr<Node>> nodes_ ABSL_GUARDED_BY(mu_);
  // The slot map: read without a lock, written under mu_.
  std::array<std::atomic<Node*>, 16384> slots_{};
  std::vector<Node*> serving_ ABSL_GUARDED_BY(mu_);  // recount_serving()
  std::size_t refresh_cursor_ ABSL_GUARDED_BY(mu_) = 0;
  std::atomic<std::uint64_t> slot_refreshes_{0};
  // The background thread (maintain()): asked by the flags, woken by
  // bg_kicked_, stopped by bg_stop_; started on the first ask.
  std::atomic<bool> refresh_asked_{false};
  std::atomic<bool> probe_asked_{false};
  std::mutex bg_mu_;
  std::condition_variable bg_cv_;
  bool bg_kicked_ = false;  // guarded by bg_mu_
  bool bg_stop_ = false;    // guarded by bg_mu_
  std::thread bg_thread_;   // started under bg_mu_; joined by ~RedisClient
};

enum class FailMode : std::uint8_t {
  kClosed,  // refuse while Redis cannot answer (retry_after: fail_retry)
  kOpen,    // admit while Redis cannot answer
  kLocal,   // decide in process, at the limit divided by `instances`
};

// RedisScope: where a limit's keys live when a RedisChain (or a
// RedisAccountant's reserve) uses it for a tenant.
//   kTenant  under the chain's tenant (the default): a key counts per
//            tenant, in the tenant's Redis Cluster slot beside its budgets,
//            so a chain of such limits is one script. The same key used
//            through another tenant, or by the limit's own acquire (no
//            tenant), is another count.
//   kGlobal  the key's own: one count whichever tenant or chain it is used
//            through, and the same state as the limit's own acquire. On a
//            Cluster the key hashes to a slot of its own, so a chain mixing
//            it with a tenant's keys runs one script per slot (RedisChain).
enum class RedisScope : std::uint8_t { kTenant, kGlobal };

// RedisLimitOptions: how one Redis limit behaves.
//   fail        the answer when Redis cannot give one (counted either way)
//   fail_retry  the wait a kClosed refusal states
//   instances   kLocal: how many instances share the limit; each then
//               admits at most its share (the limit's count, or a bucket's
//               burst and rate, divided by it, rounded down but at least 1)
//               until Redis answers again
//   test_time   run on the caller's `now` (whole microseconds) instead of
//               Redis's TIME: for tests that compare with the C++ policy
//   scope       whether its keys count per tenant in a RedisChain or once
//               for all (RedisScope)
struct RedisLimitOptions {
  FailMode fail = FailMode::kClosed;
  Nanos fail_retry = std::chrono::seconds(1);
  std::uint64_t instances = 1;
  bool test_time = false;
  RedisScope scope = RedisScope::kTenant;
};

namespace detail {

// What a policy's Lua twin needs: its script and parameters, checked for
// exactness in doubles.
template <class P>
struct RedisTwin;

inline constexpr std::uint64_t kExact = std::uint64_t{1} << 53;

inline absl::StatusOr<std::uint64_t> whole_micros(std::string_view policy,
                                                  Nanos period) {
  if (period.count() % 1000 != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        detail::av(policy), " in Redis: the period (", period.count(),
        " ns) must be a whole number of microseconds (Redis's TIME unit)"));
  }
  return static_cast<std::uint64_t>(period.count() / 1000);
}

// The one script (every policy, single operations and chains).
inline const RedisScript& redis_script() {
  static const RedisScript s{std::string(lua::kScript)};
  return s;
}

// A TokenBucket's single acquire or peek (no charge-on-reject).
inline const RedisScript& redis_tb_script() {
  static const RedisScript s{std::string(lua::kTokenBucketScript)};
  return s;
}

// A twin's arguments: its kind and four parameters.
using TwinParams = std::array<std::string, 5>;

template <>
struct RedisTwin<TokenBucket> {
  static absl::StatusOr<TwinParams> params(const TokenBucket& p) {
    absl::StatusOr<std::uint64_t> period =
        whole_micros("TokenBucket", p.rate().period);
    if (!period.ok()) return period.status();
    const std::uint64_t g = gcd(*period, p.rate().count);
    const std::uint64_t num = *period / g, den = p.rate().count / g;
    if (static_cast<u128>(p.burst()) * num * 4 >= kExact || den >= kExact) {
      return absl::InvalidArgumentError(absl::StrCat(
          "TokenBucket in Redis: burst ", p.burst(), " at ", p.rate().count,
          " per ", *period, " us needs more than 2^53 (Lua's exact integers)"));
    }
    return TwinParams{"tb", std::to_string(num), std::to_string(den),
                      std::to_string(p.burst()), "0"};
  }
};

template <>
struct RedisTwin<FixedWindow> {
  static absl::StatusOr<TwinParams> params(const FixedWindow& p) {
    absl::StatusOr<std::uint64_t> period =
        whole_micros("FixedWindow", p.rate().period);
    if (!period.ok()) return period.status();
    if (p.limit() >= kExact / 2) {
      return absl::InvalidArgumentError(
          "FixedWindow in Redis: the limit must be below 2^52");
    }
    return TwinParams{"fw", std::to_string(*period), std::to_string(p.limit()),
                      "0", "0"};
  }
};

template <>
struct RedisTwin<SlidingWindow> {
  static absl::StatusOr<TwinParams> params(const SlidingWindow& p) {
    absl::StatusOr<std::uint64_t> period =
        whole_micros("SlidingWindow", p.rate().period);
    if (!period.ok()) return period.status();
    if (static_cast<u128>(p.limit()) * *period * 2 >= kExact) {
      return absl::InvalidArgumentError(
          absl::StrCat("SlidingWindow in Redis: ", p.limit(), " per ", *period,
                       " us needs more than 2^53 (Lua's exact integers)"));
    }
    return TwinParams{"sw", std::to_string(*period), std::to_string(p.limit()),
                      "0", "0"};
  }
};

// PeriodBudget: the limit here; the period's index and bounds per call
// (RedisLimit asks the policy's calendar for the period of its time).
template <>
struct RedisTwin<PeriodBudget> {
  static absl::StatusOr<TwinParams> params(const PeriodBudget& p) {
    if (p.limit() >= kExact / 2) {
      return absl::InvalidArgumentError(
          "PeriodBudget in Redis: the limit must be below 2^52");
    }
    return TwinParams{"pb", std::to_string(p.limit()), "0", "0", "0"};
  }
  // The arguments for the period holding `t` (Unix time).
  static TwinParams at(const PeriodBudget& p, Nanos t) {
    const Period::Span span = p.period().span_of(t);
    return TwinParams{"pb", std::to_string(p.limit()),
                      std::to_string(span.index),
                      std::to_string(span.start.count() / 1000),
                      std::to_string((span.end.count() + 999) / 1000)};
  }
};

// A policy's share for one of `n` instances (FailMode::kLocal).
inline absl::StatusOr<TokenBucket> share_of(const TokenBucket& p,
                                            std::uint64_t n) {
  const std::uint64_t count = std::max<std::uint64_t>(1, p.rate().count / n);
  return TokenBucket::create(Rate{count, p.rate().period},
                             std::max<std::uint64_t>(1, p.burst() / n));
}
inline absl::StatusOr<FixedWindow> share_of(const FixedWindow& p,
                                            std::uint64_t n) {
  return FixedWindow::create(
      Rate{std::max<std::uint64_t>(1, p.rate().count / n), p.rate().period});
}
inline absl::StatusOr<SlidingWindow> share_of(const SlidingWindow& p,
                                              std::uint64_t n) {
  return SlidingWindow::create(
      Rate{std::max<std::uint64_t>(1, p.rate().count / n), p.rate().period});
}

inline absl::StatusOr<PeriodBudget> share_of(const PeriodBudget& p,
                                             std::uint64_t n) {
  return PeriodBudget::create(std::max<std::uint64_t>(1, p.limit() / n),
                              p.period());
}

}  // namespace detail

// The Redis key of `key` under limit `name`, in the hash slot of `tag`:
// prefix, the name, the tag in hex inside braces, the key in hex
// ("rk:rpm:{7465616d}75736572"). Injective (hex has neither ':' nor braces,
// and neither the prefix nor a name may hold a brace: RedisClient::create
// and RedisLimit::create refuse them, so the first '{' ends the name), safe
// for any bytes of the tag and the key (a tenant or subject key holding
// braces is hex too), and every key with one tag is in one Redis Cluster
// slot. An empty tag ("{}") is no hash tag: Cluster hashes the whole key
// (RedisScope::kGlobal, and a RedisLimit's own calls).
inline std::string redis_key(std::string_view prefix, std::string_view name,
                             std::string_view tag, std::string_view key) {
  std::string out;
  out.reserve(prefix.size() + name.size() + 3 + 2 * (tag.size() + key.size()));
  out.append(prefix);
  out.append(name);
  out.append(":{");
  detail::append_hex(out, tag);
  out.push_back('}');
  detail::append_hex(out, key);
  return out;
}

// RedisPlace: where a take kept in Redis sits, in a Receipt. `at_us` is
// Redis's TIME of the take (microseconds); p1, p2 are what the script
// placed it at: for a token bucket, the key's give-back counter at the take
// (p1, us) and the end of the take's stretch of its timeline (p2, in units
// of 1/den us relative to at_us: the script's state is TAT - now; the
// stretch is the cost's time before it); a window's index (p1) by Redis's
// clock; a budget's period index (p1).
// `redis_key`: the receipt's key is the Redis key itself (a RedisChain's
// take, whose key carries the chain's tenant), else the limit's own key.
struct RedisPlace {
  std::int64_t at_us = 0;
  std::int64_t p1 = 0;
  std::int64_t p2 = 0;
  bool redis_key = false;
};

// RedisLimitBase: what every RedisLimit<P> shares; RedisChain runs them.
class RedisLimitBase : public Limit {
 public:
  // Calls answered by the fail mode because Redis could not answer.
  std::uint64_t fallbacks() const noexcept {
    return fallbacks_.load(std::memory_order_relaxed);
  }
  // Calls refused because Redis refused the credentials or the user's
  // permissions (kUnauthenticated, kPermissionDenied): see fail().
  std::uint64_t auth_failures() const noexcept {
    return auth_failures_.load(std::memory_order_relaxed);
  }
  // The last reason Redis could not answer (empty when it always could).
  std::string last_error() const {
    detail::MutexLock lock(&error_mu_);
    return last_error_;
  }
  const std::shared_ptr<RedisClient>& client() const noexcept {
    return client_;
  }
  const RedisLimitOptions& redis_options() const noexcept { return redis_; }
  // Its kind and parameters, as the script reads them, for a call at `t`
  // (a budget's period depends on it).
  virtual detail::TwinParams twin_at(Nanos /*t*/) const { return params_; }

  // How many of `held` units of the take `r` (a receipt this limit issued)
  // could still be served at Redis time `t` without exceeding the limit:
  // for a token bucket, the whole tokens of the take's stretch still ahead
  // of t (what time has not yet refilled); for a window, all of them while
  // t is in the take's window, none after. What RedisLease serves.
  virtual Cost still_served(const Receipt& r, Cost held, Nanos t) const = 0;

  // A decision of the fail mode, counted, for a call Redis did not answer:
  // `op` on `key` at the caller's `now` (kLocal decides it in process, and
  // fills `receipt` with the local limit's receipt when it admits; the
  // other modes never issue one: nothing was taken in Redis).
  //
  // Credentials Redis refuses (RedisClient::is_auth_error) are not an
  // outage: the call is refused as kClosed would refuse it, whatever the
  // fail mode (kOpen must not admit everything while a rotated password
  // or a disabled ACL user locks the service out of Redis), counted in
  // auth_failures() and the errors metric, not in fallbacks().
  Decision fail(const absl::Status& why, std::string_view op,
                std::string_view key, Cost cost, Nanos now,
                Receipt* receipt = nullptr) {
    if (receipt != nullptr) *receipt = Receipt();
    if (RedisClient::is_auth_error(why)) {
      auth_failures_.fetch_add(1, std::memory_order_relaxed);
      note_error(why);
      return Decision{false, limit(), 0, redis_.fail_retry, Nanos{0}};
    }
    note_fallback(why);
    switch (redis_.fail) {
      case FailMode::kOpen:
        return Decision{true, limit(), 0, Nanos{0}, Nanos{0}};
      case FailMode::kClosed:
        return Decision{false, limit(), 0, redis_.fail_retry, Nanos{0}};
      case FailMode::kLocal: {
        Limit& l = *local_limit();
        if (op == "peek") return l.peek(key, cost, now);
        Receipt local;
        const Decision d = op == "charge" ? l.charge(key, cost, now, local)
                                          : l.take(key, cost, now, local);
        if (receipt != nullptr) *receipt = std::move(local);
        return d;
      }
    }
    return Decision{false, limit(), 0, redis_.fail_retry, Nanos{0}};
  }

  // Counts a call Redis did not answer, and why.
  void note_fallback(const absl::Status& why) {
    fallbacks_.fetch_add(1, std::memory_order_relaxed);
    note_error(why);
  }
  // Records an error that no fail mode answered (a settle).
  void note_error(const absl::Status& why) {
    metrics().record_error();
    detail::MutexLock lock(&error_mu_);
    last_error_ = std::string(why.message());
  }

  // kLocal: the in-process limit at this instance's share (nullptr
  // otherwise).
  virtual Limit* local_limit() noexcept = 0;

 protected:
  RedisLimitBase(const LimitOptions& o, std::shared_ptr<RedisClient> client,
                 RedisLimitOptions redis, detail::TwinParams params)
      : Limit(o),
        client_(std::move(client)),
        redis_(redis),
        params_(std::move(params)) {}

 private:
  const std::shared_ptr<RedisClient> client_;
  const RedisLimitOptions redis_;
  const detail::TwinParams params_;
  std::atomic<std::uint64_t> fallbacks_{0};
  std::atomic<std::uint64_t> auth_failures_{0};
  mutable detail::Mutex error_mu_;
  std::string last_error_ ABSL_GUARDED_BY(error_mu_);
};

namespace detail {

// A random number below 2^50 per call: where the script finds a bucket's
// state absent (never seen, idle, or lost) its give-back counter starts
// there, so a receipt from another life of the state gives nothing back
// (redis_lua.hpp). Per thread, splitmix64 seeded once from the OS.
inline std::uint64_t redis_nonce() noexcept {
  thread_local std::uint64_t state = [] {
    std::uint64_t seed = static_cast<std::uint64_t>(
        std::chrono::steady_clock::now().time_since_epoch().count());
    try {
      std::random_device rd;
      seed ^= (static_cast<std::uint64_t>(rd()) << 32) ^ rd();
    } catch (...) {
      // No entropy source: the clock and this thread's address serve.
    }
    return seed ^ reinterpret_cast<std::uintptr_t>(&seed);
  }();
  std::uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return (z ^ (z >> 31)) >> 14;
}

// The script's arguments for one item of "acquire", "peek" or "reserve"
// (see redis_lua.hpp).
inline void append_item(absl::InlinedVector<std::string, 24>& args,
                        const RedisLimitBase& l, Cost cost, bool charge,
                        Nanos t) {
  for (std::string& p : l.twin_at(t)) args.push_back(std::move(p));
  // Costs at or above 2^53 exceed every limit a twin accepts: the same
  // decisions as the exact cost, in Lua's exact range.
  args.push_back(std::to_string(std::min<Cost>(cost, kExact)));
  args.push_back(std::to_string((l.shadow() ? 1 : 0) |
                                (charge || l.charge_on_reject() ? 2 : 0)));
  args.push_back(std::to_string(redis_nonce()));
}

inline Nanos from_us(std::int64_t us) {
  return Nanos{clamp_i64(static_cast<i128>(us) * 1000)};
}

// Item i's decision in a reply of `stride` integers per item (7 for
// acquire, peek and reserve: the decision and the take's placement; 5 for
// a settle).
inline Decision decision_at(std::span<const std::int64_t> v, std::size_t i,
                            std::size_t stride = 7) {
  const std::size_t b = 2 + stride * i;
  return Decision{v[b] == 1, static_cast<std::uint64_t>(v[b + 1]),
                  static_cast<std::uint64_t>(v[b + 2]),
                  v[b + 3] < 0 ? kNever : from_us(v[b + 3]), from_us(v[b + 4])};
}

// Item i's placement in an acquire's reply, at Redis's time of the reply.
inline RedisPlace place_at(std::span<const std::int64_t> v, std::size_t i,
                           bool key_is_redis_key) {
  const std::size_t b = 2 + 7 * i;
  return RedisPlace{v[1], v[b + 5], v[b + 6], key_is_redis_key};
}

// One receipt to settle in Redis.
struct RedisSettle {
  RedisLimitBase* limit = nullptr;
  Receipt* receipt = nullptr;
  Cost actual = 0;
  absl::StatusOr<Decision> out = absl::InternalError("redis: not run");
};

// The Redis key a receipt's take is kept under: the receipt's key itself
// for a RedisChain's take, else the limit's own key.
inline std::string receipt_key(const RedisClient& client,
                               const RedisSettle& s) {
  const RedisPlace p = s.receipt->placement<RedisPlace>();
  return p.redis_key ? std::string(s.receipt->key())
                     : redis_key(client.options().prefix, s.limit->name(), {},
                                 s.receipt->key());
}

// settle_in_redis
//
// Settles receipts issued by Redis limits of `client` (whose keys share one
// slot on a Cluster: RedisChain groups them) in one script, each judged by
// Redis's clock (or `test_now`), in order. Each item's `out` is what a
// zero-cost call would now be told, or kUnavailable when Redis could not be
// reached. A receipt is closed once Redis ran its settle, and also when it may
// have run (a time-out after sending: settling it again could give back twice,
// so the give-back is lost, the conservative side); one never sent (breaker
// open, no connection) stays open, to be settled again.
inline void settle_in_redis(RedisClient& client, std::span<RedisSettle> items,
                            std::optional<Nanos> test_now) {
  if (items.empty()) return;
  absl::InlinedVector<std::string, 8> keys;
  for (const RedisSettle& s : items) keys.push_back(receipt_key(client, s));
  absl::InlinedVector<std::string_view, 8> kv(keys.begin(), keys.end());
  Nanos t = test_now.value_or(std::chrono::duration_cast<Nanos>(
      std::chrono::system_clock::now().time_since_epoch()));
  absl::StatusOr<absl::InlinedVector<std::int64_t, 8>> r;
  for (int attempt = 0; attempt < 2; ++attempt) {
    absl::InlinedVector<std::string, 24> args;
    args.push_back(test_now ? std::to_string(test_now->count() / 1000)
                            : std::string());
    args.emplace_back("receipt");
    for (const RedisSettle& s : items) {
      const RedisPlace p = s.receipt->placement<RedisPlace>();
      for (std::string& a : s.limit->twin_at(t)) args.push_back(std::move(a));
      args.push_back(std::to_string(s.receipt->cost()));
      args.push_back(std::to_string(std::min<Cost>(s.actual, kExact)));
      args.push_back(std::to_string(p.at_us));
      args.push_back(std::to_string(p.p1));
      args.push_back(std::to_string(p.p2));
      args.push_back(std::to_string(redis_nonce()));
    }
    absl::InlinedVector<std::string_view, 24> av(args.begin(), args.end());
    r = client.eval_ints(redis_script(), kv, av);
    // A budget's period other than Redis's: again, for Redis's time.
    if (!r.ok() || r->size() != 2 || (*r)[0] != -2) break;
    t = from_us((*r)[1]);
  }
  const bool answered = r.ok() && r->size() == 2 + 5 * items.size();
  for (std::size_t i = 0; i < items.size(); ++i) {
    RedisSettle& s = items[i];
    if (answered) {
      s.out = decision_at(*r, i, 5);
      s.receipt->close();
      continue;
    }
    const absl::Status why =
        r.ok() ? absl::InternalError("redis: malformed reply to a settle")
               : r.status();
    s.limit->note_error(why);
    const bool may_have_run = !r.ok() ? RedisClient::may_have_run(why) : true;
    if (may_have_run) s.receipt->close();
    s.out = absl::Status(
        why.code(),
        absl::StrCat("settle of a Redis receipt: ", why.message(),
                     may_have_run ? " (it may have run: the receipt is closed, "
                                    "its give-back lost, nothing given twice)"
                                  : " (not run: the receipt stays open, "
                                    "settle it again)"));
  }
}

}  // namespace detail

// RedisLimit<P>: the Limit of policy P with its state in Redis. Its own
// acquire, peek, take, charge and settle name a key's state with an empty
// tag (Redis Cluster then hashes the whole key); in a RedisChain the
// chain's tenant is the tag (RedisScope::kTenant, the default: use such a
// limit one way or the other), or, with RedisScope::kGlobal, the same
// untagged key as its own calls: one count for all.
//
// A take's Receipt records Redis's TIME of the take (Receipt::at) and what
// the script placed it at (see RedisPlace); settle() sends it back to the
// script, which settles it as the C++ policy's settle() does, judged by
// Redis's clock (the caller's `now` is not used, unless test_time): a
// chain's roll-back, a lease's return and a call settled to its actual
// cost all give back at most what is still outstanding of the take by
// Redis's time, and charge an excess at once as a debt.
template <class P>
class RedisLimit final : public RedisLimitBase {
 public:
  // create
  //
  // kInvalidArgument for bad options (as make_limit), no client, or a
  // policy whose Lua twin could not be exact (see the file comment).
  static absl::StatusOr<std::unique_ptr<RedisLimit>> create(
      const LimitOptions& options, P policy,
      std::shared_ptr<RedisClient> client, RedisLimitOptions redis = {}) {
    if (client == nullptr) {
      return absl::InvalidArgumentError("RedisLimit: no client");
    }
    if (options.name.find_first_of("{}") != std::string::npos) {
      // check_limit_options refuses them too; this says why for Redis.
      return absl::InvalidArgumentError(absl::StrCat(
          "RedisLimit \"", absl::CEscape(options.name),
          "\": a limit name with '{' or '}' would be the hash tag of its "
          "Redis keys (every key of the limit in one Cluster slot, the "
          "tenant's tag ignored)"));
    }
    if (absl::Status st = detail::check_limit_options(options); !st.ok()) {
      return st;
    }
    absl::StatusOr<detail::TwinParams> params =
        detail::RedisTwin<P>::params(policy);
    if (!params.ok()) return params.status();
    std::unique_ptr<PolicyLimit<P>> local;
    if (redis.fail == FailMode::kLocal) {
      if (redis.instances == 0) {
        return absl::InvalidArgumentError(
            "RedisLimit: kLocal needs instances >= 1");
      }
      absl::StatusOr<P> share = detail::share_of(policy, redis.instances);
      if (!share.ok()) return share.status();
      auto made = make_limit(options, *std::move(share),
                             ShardedOptions{.capacity = 1 << 14});
      if (!made.ok()) return made.status();
      local = *std::move(made);
    }
    auto out = std::unique_ptr<RedisLimit>(
        new RedisLimit(options, std::move(policy), std::move(client), redis,
                       *std::move(params)));
    out->local_ = std::move(local);
    return out;
  }

  Limit* local_limit() noexcept override { return local_.get(); }

  Decision acquire(std::string_view key, Cost cost, Nanos now) override {
    return run("acquire", key, cost, false, now, nullptr);
  }
  Decision peek(std::string_view key, Cost cost, Nanos now) const override {
    return const_cast<RedisLimit*>(this)->run("peek", key, cost, false, now,
                                              nullptr);
  }
  // As acquire, with a receipt when admitted: Redis's, placed by the
  // script; the local limit's when kLocal answered; none when kOpen
  // admitted without Redis (it took nothing there to give back).
  Decision take(std::string_view key, Cost cost, Nanos now,
                Receipt& receipt) override {
    return run("acquire", key, cost, false, now, &receipt);
  }
  Decision charge(std::string_view key, Cost cost, Nanos now,
                  Receipt& receipt) override {
    return run("acquire", key, cost, true, now, &receipt);
  }

  // settle
  //
  // Settles a receipt of this limit's take in one round trip, by Redis's
  // clock (`now` only with test_time, or for a receipt the kLocal fail mode
  // issued, which its local limit settles). kFailedPrecondition for a
  // closed or empty receipt, kInvalidArgument for another limit's;
  // kUnavailable when Redis could not be reached: see
  // detail::settle_in_redis for whether the receipt stays open.
  absl::StatusOr<Decision> settle(Receipt& receipt, Cost actual,
                                  Nanos now) override {
    if (!receipt.open()) {
      return absl::FailedPreconditionError(
          "receipt already settled, or empty (a refused call takes nothing)");
    }
    if (local_ != nullptr && receipt.issuer() == local_.get()) {
      return local_->settle(receipt, actual, now);
    }
    if (receipt.issuer() != this) {
      return absl::InvalidArgumentError(
          "receipt issued by another limit: a receipt is settled by the "
          "limit that took it");
    }
    detail::RedisSettle one{this, &receipt, actual};
    detail::settle_in_redis(
        *client(), std::span<detail::RedisSettle>(&one, 1),
        redis_options().test_time ? std::optional<Nanos>(now) : std::nullopt);
    return std::move(one.out);
  }

  // acquire_timed
  //
  // acquire, and the time Redis decided it (Unix time; `now` when Redis
  // could not answer).
  std::pair<Decision, Nanos> acquire_timed(std::string_view key, Cost cost,
                                           Nanos now) {
    Nanos at = now;
    const Decision d = run("acquire", key, cost, false, now, nullptr, &at);
    return {d, at};
  }

  // acquire_batch
  //
  // Many acquires, each of its own key and cost, pipelined: one write and
  // one read for all of them (one per node on a Cluster), each decided by
  // its own script on the server, in order. Each is atomic on its own; the
  // batch is not all or nothing (a RedisChain is, for the limits of one
  // call). For servers that gather the decisions of many requests (an event
  // loop): the throughput of 50 calls in flight on one connection. A call
  // Redis does not answer gets the fail mode's decision, counted.
  struct Request {
    std::string_view key;
    Cost cost = 1;
  };
  std::vector<Decision> acquire_batch(std::span<const Request> requests,
                                      Nanos now) {
    const std::size_t n = requests.size();
    std::vector<std::string> keys;
    std::vector<absl::InlinedVector<std::string, 24>> args(n);
    std::vector<absl::InlinedVector<std::string_view, 24>> argv(n);
    std::vector<std::string_view> key_views;
    keys.reserve(n);
    key_views.reserve(n);
    std::vector<RedisClient::EvalCall> calls;
    calls.reserve(n);
    const std::string time = redis_options().test_time
                                 ? std::to_string(now.count() / 1000)
                                 : std::string();
    for (std::size_t i = 0; i < n; ++i) {
      keys.push_back(
          redis_key(client()->options().prefix, name(), {}, requests[i].key));
      key_views.emplace_back(keys.back());
      args[i].push_back(time);
      args[i].emplace_back("acquire");
      detail::append_item(args[i], *this, requests[i].cost, false, now);
      argv[i].assign(args[i].begin(), args[i].end());
      calls.push_back({std::span<const std::string_view>(&key_views[i], 1),
                       std::span<const std::string_view>(argv[i])});
    }
    std::vector<RedisClient::IntsOr> replies =
        client()->eval_pipelined(script_for("acquire", false), calls);
    std::vector<Decision> out;
    out.reserve(n);
    for (std::size_t i = 0; i < n; ++i) {
      const RedisClient::IntsOr& r = replies[i];
      if (r.ok() && r->size() == 9) {
        out.push_back(detail::decision_at(*r, 0));
      } else if (r.ok() && r->size() == 2 && (*r)[0] == -2) {
        // A budget's period other than Redis's: this one alone, again.
        out.push_back(acquire(requests[i].key, requests[i].cost, now));
      } else {
        out.push_back(fail(
            r.ok() ? absl::InternalError("redis: malformed reply") : r.status(),
            "acquire", requests[i].key, requests[i].cost, now));
      }
    }
    return out;
  }

  std::uint64_t limit() const noexcept override { return policy_.limit(); }
  Nanos window() const noexcept override {
    return detail::quota_window(policy_);
  }
  // Redis holds the states: key counts are Redis's (INFO keyspace).
  StoreStats store_stats() const override { return StoreStats{}; }

  const P& policy() const noexcept { return policy_; }

  detail::TwinParams twin_at(Nanos t) const override {
    if constexpr (std::is_same_v<P, PeriodBudget>) {
      return detail::RedisTwin<PeriodBudget>::at(policy_, t);
    } else {
      return RedisLimitBase::twin_at(t);
    }
  }

  Cost still_served(const Receipt& r, Cost held, Nanos t) const override {
    if (r.issuer() != this || held == 0) return 0;
    const RedisPlace p = r.placement<RedisPlace>();
    const std::int64_t t_us = t.count() / 1000;
    if constexpr (std::is_same_v<P, TokenBucket>) {
      // Tokens whose slot of the stretch starts at or after t: the held
      // ones are its tail (a lease serves from the front).
      const detail::TwinParams tw = twin_at(t);
      const detail::i128 num = std::stoll(tw[1]), den = std::stoll(tw[2]);
      const detail::i128 ahead =
          static_cast<detail::i128>(p.p2) -
          (static_cast<detail::i128>(t_us) - p.at_us) * den;
      if (ahead <= 0) return 0;
      return std::min<Cost>(held, detail::clamp_u64(ahead / num));
    } else if constexpr (std::is_same_v<P, PeriodBudget>) {
      return policy_.period().index_of(t) == p.p1 ? held : 0;
    } else {
      const std::int64_t period_us = policy_.rate().period.count() / 1000;
      return detail::floor_div_i64(t_us, period_us) == p.p1 ? held : 0;
    }
  }

 private:
  RedisLimit(const LimitOptions& o, P policy,
             std::shared_ptr<RedisClient> client, RedisLimitOptions redis,
             detail::TwinParams params)
      : RedisLimitBase(o, std::move(client), redis, std::move(params)),
        policy_(std::move(policy)) {}

  // The lean script for what it covers, else the general one.
  const RedisScript& script_for(std::string_view op, bool charge) const {
    if constexpr (std::is_same_v<P, TokenBucket>) {
      if ((op == "acquire" || op == "peek") && !charge && !charge_on_reject()) {
        return detail::redis_tb_script();
      }
    }
    return detail::redis_script();
  }

  // One acquire, peek or charge; with `receipt`, the take's receipt.
  Decision run(std::string_view op, std::string_view key, Cost cost,
               bool charge, Nanos now, Receipt* receipt,
               Nanos* redis_now = nullptr) {
    if (receipt != nullptr) *receipt = Receipt();
    const std::string k =
        redis_key(client()->options().prefix, name(), {}, key);
    const std::string_view keys[] = {k};
    absl::StatusOr<absl::InlinedVector<std::int64_t, 8>> r;
    Nanos t = now;  // the time the parameters are for
    for (int attempt = 0; attempt < 2; ++attempt) {
      absl::InlinedVector<std::string, 24> args;
      args.push_back(redis_options().test_time
                         ? std::to_string(now.count() / 1000)
                         : std::string());
      args.emplace_back(op);
      detail::append_item(args, *this, cost, charge, t);
      absl::InlinedVector<std::string_view, 24> argv(args.begin(), args.end());
      r = client()->eval_ints(script_for(op, charge), keys, argv);
      // A budget's period other than Redis's: again, for Redis's time.
      if (!r.ok() || r->size() != 2 || (*r)[0] != -2) break;
      t = detail::from_us((*r)[1]);
    }
    if (!r.ok() || r->size() != 9) {
      return fail(
          r.ok() ? absl::InternalError("redis: malformed reply") : r.status(),
          charge ? "charge" : op, key, cost, now, receipt);
    }
    if (redis_now != nullptr) *redis_now = detail::from_us((*r)[1]);
    const Decision d = detail::decision_at(*r, 0);
    if (receipt != nullptr && d.allowed && op == "acquire") {
      *receipt = Receipt::issue(this, key, cost, detail::from_us((*r)[1]),
                                detail::place_at(*r, 0, false));
    }
    return d;
  }

  const P policy_;
  std::unique_ptr<PolicyLimit<P>> local_;  // kLocal only
};

// RedisChain: several Redis limits for one call, decided by one script: one
// round trip, atomic on the server, all or nothing as Chain (chain.hpp) with
// one difference that only helps: a refused chain never took anything, so
// there is no give-back and no window in which others see its take. Every
// item's limit must be a RedisLimit on this chain's client. The tenant is
// the hash tag of every kTenant limit's key (one Redis Cluster slot per
// tenant): pass the same tenant for a key every time. A kGlobal limit's key
// is its own (RedisScope), whatever the tenant.
//
// On a single Redis every chain is one script. On a Cluster, a chain whose
// kGlobal keys lie outside the tenant's slot runs one script per slot (one
// round trip each), the tenant's last, still all or nothing for the
// caller: once a part refuses, the later ones only look (charges on reject
// still count) and what the earlier ones took is given back through their
// receipts (while it is held, others can see it: the window an in-process
// Chain has). Thread-safe.
//
// An allowed chain's results hold receipts (LimitResult::receipt) for what
// each limit took, placed by the script by Redis's clock; settle() and
// give_back() send them back in one script, judged by Redis's clock. (A
// chain receipt's key() is the Redis key, which carries the tenant.)
class RedisChain {
 public:
  explicit RedisChain(std::shared_ptr<RedisClient> client)
      : client_(std::move(client)) {}

  // acquire
  //
  // ChainDecision as Chain::acquire; `at` is Redis's time of the decision.
  // When Redis cannot answer, each limit's fail mode answers (counted on
  // each): kLocal limits with their local receipts, the others with none.
  // `test_now` (tests): decide at that time instead of Redis's, for limits
  // created with test_time.
  ChainDecision acquire(std::string_view tenant,
                        std::span<const ChainItem> items,
                        std::optional<Nanos> test_now = std::nullopt) {
    return run("acquire", tenant, items, test_now).decision;
  }
  ChainDecision peek(std::string_view tenant, std::span<const ChainItem> items,
                     std::optional<Nanos> test_now = std::nullopt) {
    return run("peek", tenant, items, test_now).decision;
  }

  // settle
  //
  // As Chain::settle: result `index` settled to its actual cost (the unused
  // part given back, at most what is still outstanding of it by Redis's
  // clock; an excess charged as a debt). kOutOfRange for a bad index,
  // kFailedPrecondition for a result holding no open receipt, kUnavailable
  // when Redis could not be reached (see detail::settle_in_redis: a settle
  // never sent leaves the receipt open).
  absl::Status settle(ChainDecision& d, std::size_t index, Cost actual,
                      std::optional<Nanos> test_now = std::nullopt) {
    if (index >= d.results.size()) {
      return absl::OutOfRangeError(
          absl::StrCat("chain result ", index, " of ", d.results.size()));
    }
    if (!d.results[index].receipt) {
      return absl::FailedPreconditionError(
          "receipt already settled, or empty (a refused call takes nothing)");
    }
    const std::size_t which[] = {index};
    return settle_some(d, which, actual, test_now);
  }

  // settle
  //
  // Every open result of `unit` settled to `actual`, in one round trip.
  // kFailedPrecondition when none was open.
  absl::Status settle(ChainDecision& d, Unit unit, Cost actual,
                      std::optional<Nanos> test_now = std::nullopt) {
    absl::InlinedVector<std::size_t, 4> which;
    for (std::size_t i = 0; i < d.results.size(); ++i) {
      if (d.results[i].limit->unit() == unit && d.results[i].receipt) {
        which.push_back(i);
      }
    }
    if (which.empty()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "no open ", detail::av(unit_name(unit)), " receipt in the chain"));
    }
    return settle_some(d, which, actual, test_now);
  }

  // give_back
  //
  // Every open result settled to 0 (the call did not happen), in one round
  // trip. kUnavailable when Redis could not be reached (receipts not sent
  // stay open: call it again).
  absl::Status give_back(ChainDecision& d,
                         std::optional<Nanos> test_now = std::nullopt) {
    absl::InlinedVector<std::size_t, 4> which;
    for (std::size_t i = 0; i < d.results.size(); ++i) {
      if (d.results[i].receipt) which.push_back(i);
    }
    if (which.empty()) return absl::OkStatus();
    return settle_some(d, which, 0, test_now);
  }

  struct Outcome {
    ChainDecision decision;
    bool reached = false;  // Redis answered
    absl::Status error;    // why not
    // The request id was settled already: its settlement's cost (nano-USD),
    // tokens and estimated flag, as Redis holds them; nothing was taken.
    std::optional<std::array<std::int64_t, 3>> settled;
  };

  // reserve (for RedisAccountant)
  //
  // acquire, and when the chain admits, `mark` (a key of the tenant's slot)
  // is set for `ttl` in the same script: it says the holds are out; unless
  // `settled` (the request id's settlement key, same slot) exists, which
  // takes nothing and answers `settled`. When Redis cannot answer, the fail
  // modes decide (`reached` false), at the system clock's time. The results
  // hold receipts as acquire's do.
  Outcome reserve(std::string_view tenant, std::span<const ChainItem> items,
                  std::string_view mark, Nanos ttl, std::string_view settled,
                  std::optional<Nanos> test_now = std::nullopt) {
    return run("reserve", tenant, items, test_now, mark, ttl, settled);
  }

 private:
  static RedisLimitBase* redis_limit(Limit* l) {
    return dynamic_cast<RedisLimitBase*>(l);
  }

  // Receipts settled in one script per Cluster slot (a chain mixing
  // scopes took in several); on a single Redis, in one.
  void settle_by_slot(std::span<detail::RedisSettle> remote,
                      std::optional<Nanos> test_now) {
    if (!client_->options().cluster || remote.size() < 2) {
      detail::settle_in_redis(*client_, remote, test_now);
      return;
    }
    absl::InlinedVector<std::uint16_t, 4> slot;
    for (const detail::RedisSettle& s : remote) {
      slot.push_back(detail::key_slot(detail::receipt_key(*client_, s)));
    }
    absl::InlinedVector<bool, 4> done(remote.size(), false);
    for (std::size_t i = 0; i < remote.size(); ++i) {
      if (done[i]) continue;
      absl::InlinedVector<detail::RedisSettle, 4> group;
      absl::InlinedVector<std::size_t, 4> at;
      for (std::size_t j = i; j < remote.size(); ++j) {
        if (done[j] || slot[j] != slot[i]) continue;
        group.push_back(std::move(remote[j]));
        at.push_back(j);
        done[j] = true;
      }
      detail::settle_in_redis(*client_, std::span<detail::RedisSettle>(group),
                              test_now);
      for (std::size_t k = 0; k < at.size(); ++k) {
        remote[at[k]] = std::move(group[k]);
      }
    }
  }

  // Settles results `which` of `d` to `actual`: the receipts Redis issued
  // in one script, those a kLocal fail mode issued in process.
  absl::Status settle_some(ChainDecision& d, std::span<const std::size_t> which,
                           Cost actual, std::optional<Nanos> test_now) {
    absl::InlinedVector<detail::RedisSettle, 4> remote;
    absl::InlinedVector<std::size_t, 4> remote_at;
    absl::Status first = absl::OkStatus();
    const Nanos unix_now = test_now.value_or(std::chrono::duration_cast<Nanos>(
        std::chrono::system_clock::now().time_since_epoch()));
    for (const std::size_t i : which) {
      LimitResult& r = d.results[i];
      RedisLimitBase* l = redis_limit(r.limit);
      RATEKEEPER_ASSERT(l != nullptr, "RedisChain: not a RedisLimit");
      if (r.receipt.issuer() == l) {
        remote.push_back({l, &r.receipt, actual});
        remote_at.push_back(i);
        continue;
      }
      // A kLocal receipt (Redis was away when it was taken). The local
      // limit's clock was the chain's Unix time at the take.
      absl::StatusOr<Decision> left = l->settle(r.receipt, actual, unix_now);
      if (!left.ok()) {
        if (first.ok()) first = left.status();
        continue;
      }
      r.counted = actual != 0;
      r.decision.remaining = left->remaining;
      r.decision.reset_after = left->reset_after;
    }
    settle_by_slot(std::span<detail::RedisSettle>(remote), test_now);
    for (std::size_t k = 0; k < remote.size(); ++k) {
      LimitResult& r = d.results[remote_at[k]];
      if (!remote[k].out.ok()) {
        if (first.ok()) first = remote[k].out.status();
        continue;
      }
      r.counted = actual != 0;
      r.decision.remaining = remote[k].out->remaining;
      r.decision.reset_after = remote[k].out->reset_after;
    }
    return first;
  }

  // The items of one script, all in one Cluster slot (or any, on a single
  // Redis); `mark`: it holds a reservation's two keys too.
  struct Part {
    absl::InlinedVector<std::size_t, 4> items;
    bool mark = false;
  };

  // One part's answer.
  struct PartOutcome {
    bool allowed = false;
    bool reached = false;
    absl::Status error;
    std::optional<std::array<std::int64_t, 3>> settled;
    Nanos at{0};
  };

  // How a chain's items split into scripts. A single Redis runs any keys
  // in one script: one part. On a Cluster, the tenant's items (kTenant)
  // and a reservation's keys make one part, in the tenant's slot (an empty
  // tenant over several keys: Redis answers CROSSSLOT, as before); kGlobal
  // items make one part per slot, joining the tenant's where their slot is
  // the tenant's. Parts in the order of their first item, the tenant's
  // (which sets a reservation's key only if all admitted) last.
  absl::InlinedVector<Part, 2> split(std::string_view tenant,
                                     std::span<const std::string> keys,
                                     std::span<RedisLimitBase* const> limits,
                                     bool mark) const {
    absl::InlinedVector<Part, 2> parts;
    if (!client_->options().cluster) {
      parts.emplace_back();
      for (std::size_t i = 0; i < keys.size(); ++i) parts[0].items.push_back(i);
      parts[0].mark = mark;
      return parts;
    }
    Part own;  // the tenant's
    own.mark = mark;
    // An empty tenant is no tag: its keys are not in one slot.
    const bool tagged = !tenant.empty();
    const std::uint16_t own_slot =
        tagged ? detail::key_slot(redis_key({}, {}, tenant, {})) : 0;
    absl::InlinedVector<std::uint16_t, 2> slots;
    for (std::size_t i = 0; i < keys.size(); ++i) {
      if (limits[i]->redis_options().scope != RedisScope::kGlobal) {
        own.items.push_back(i);
        continue;
      }
      const std::uint16_t slot = detail::key_slot(keys[i]);
      if (tagged && slot == own_slot) {
        own.items.push_back(i);
        continue;
      }
      std::size_t g = 0;
      while (g < slots.size() && slots[g] != slot) ++g;
      if (g == slots.size()) {
        slots.push_back(slot);
        parts.emplace_back();
      }
      parts[g].items.push_back(i);
    }
    // (An empty chain still runs its one script: Redis's time.)
    if (!own.items.empty() || own.mark || parts.empty()) {
      parts.push_back(std::move(own));
    }
    return parts;
  }

  // One part's script (decided as if an earlier item had refused when
  // `vetoed`: an earlier part refused), its results written into `out`.
  PartOutcome run_part(std::string_view op, bool vetoed, const Part& part,
                       std::span<const std::string> keys,
                       std::span<RedisLimitBase* const> limits,
                       std::span<const ChainItem> items,
                       std::optional<Nanos> test_now, std::string_view mark,
                       Nanos mark_ttl, std::string_view settled,
                       ChainDecision& out) {
    PartOutcome po;
    const std::size_t n = part.items.size();
    absl::InlinedVector<std::string_view, 8> kv;
    for (const std::size_t i : part.items) kv.emplace_back(keys[i]);
    if (part.mark) {
      kv.push_back(mark);
      kv.push_back(settled);
    }
    // A reservation's keys are in its tenant's part; the others acquire.
    const std::string op_arg = absl::StrCat(
        vetoed ? "!" : "",
        detail::av(op == "reserve" && !part.mark ? "acquire" : op));
    // Budgets' periods are for the caller's time first (Unix time: the
    // test time, or the system clock), then for Redis's if it differs.
    Nanos t = test_now.value_or(std::chrono::duration_cast<Nanos>(
        std::chrono::system_clock::now().time_since_epoch()));
    absl::StatusOr<absl::InlinedVector<std::int64_t, 8>> r;
    for (int attempt = 0; attempt < 2; ++attempt) {
      absl::InlinedVector<std::string, 24> args;
      args.push_back(test_now ? std::to_string(test_now->count() / 1000)
                              : std::string());
      args.push_back(op_arg);
      for (const std::size_t i : part.items) {
        detail::append_item(args, *limits[i], items[i].cost, false, t);
      }
      if (part.mark) {
        args.push_back(std::to_string(
            std::max<std::int64_t>(1, mark_ttl.count() / 1'000'000)));
      }
      absl::InlinedVector<std::string_view, 24> av(args.begin(), args.end());
      r = client_->eval_ints(detail::redis_script(), kv, av);
      if (!r.ok() || r->size() != 2 || (*r)[0] != -2) break;
      t = detail::from_us((*r)[1]);
    }
    const bool taking = op == "acquire" || op == "reserve";
    if (part.mark && r.ok() && r->size() == 5 && (*r)[0] == -4) {
      po.reached = true;
      po.settled = std::array<std::int64_t, 3>{(*r)[2], (*r)[3], (*r)[4]};
      po.at = detail::from_us((*r)[1]);
      return po;
    }
    po.reached = r.ok() && r->size() == 2 + 7 * n;
    if (!po.reached) {
      const absl::Status why =
          r.ok() ? absl::InternalError("redis: malformed reply") : r.status();
      po.error = why;
      // Each limit's fail mode, in process: kLocal limits as an in-process
      // chain of their shares (all or nothing among them, given back if a
      // closed one refuses), the others answered as their mode says (no
      // receipt: nothing was taken in Redis). Unix time, as a budget's
      // calendar needs.
      const Nanos now = t;
      po.at = now;
      po.allowed = true;
      absl::InlinedVector<ChainItem, 4> local;
      absl::InlinedVector<std::size_t, 4> local_at;
      for (const std::size_t i : part.items) {
        LimitResult& res = out.results[i];
        if (limits[i]->local_limit() != nullptr &&
            !RedisClient::is_auth_error(why)) {
          local.push_back(
              {limits[i]->local_limit(), items[i].key, items[i].cost});
          local_at.push_back(i);
          limits[i]->note_fallback(why);
          continue;
        }
        res.decision =
            limits[i]->fail(why, op, items[i].key, items[i].cost, now, nullptr);
        res.counted = false;
        if (!res.decision.allowed && !limits[i]->shadow()) po.allowed = false;
      }
      if (!local.empty()) {
        Chain<ManualClock> c{ManualClock(now)};
        ChainDecision d =
            op == "peek" || vetoed || !po.allowed
                ? c.peek(std::span<const ChainItem>(local))
                : c.acquire_at(std::span<const ChainItem>(local), now);
        for (std::size_t k = 0; k < local.size(); ++k) {
          LimitResult& res = out.results[local_at[k]];
          res.decision = d.results[k].decision;
          res.counted = d.results[k].counted;
          res.shadow_denied = d.results[k].shadow_denied;
          res.receipt = std::move(d.results[k].receipt);
        }
        if (!d.allowed) po.allowed = false;
      }
      if (vetoed) po.allowed = false;
      return po;
    }
    po.allowed = (*r)[0] == 1;
    po.at = detail::from_us((*r)[1]);
    for (std::size_t k = 0; k < n; ++k) {
      const std::size_t i = part.items[k];
      LimitResult& res = out.results[i];
      res.decision = detail::decision_at(*r, k);
      res.shadow_denied = !res.decision.allowed && limits[i]->shadow();
      res.counted = taking && (limits[i]->charge_on_reject() ||
                               (po.allowed && res.decision.allowed));
      // A receipt for what was taken and stays taken (a refused chain
      // took nothing but its charges on reject, never given back).
      if (taking && po.allowed && res.decision.allowed) {
        res.receipt = Receipt::issue(limits[i], keys[i], items[i].cost, po.at,
                                     detail::place_at(*r, k, true));
      }
    }
    return po;
  }

  // A chain split across slots refused (or its request id was settled)
  // after earlier parts admitted: what they took is given back through the
  // receipts (at most what is still outstanding, by Redis's clock: all of
  // it a moment after the take), as Chain's roll-back does. A charge on
  // reject keeps its count, its receipt dropped. A give-back Redis does not
  // answer leaves the take (the conservative side), still counted.
  void roll_back(ChainDecision& out, std::span<const ChainItem> items,
                 std::optional<Nanos> test_now) {
    absl::InlinedVector<std::size_t, 4> which;
    for (std::size_t i = 0; i < out.results.size(); ++i) {
      LimitResult& r = out.results[i];
      if (!r.receipt) continue;
      if (r.limit->charge_on_reject()) {
        r.receipt = Receipt();
        continue;
      }
      which.push_back(i);
    }
    if (which.empty()) return;
    static_cast<void>(settle_some(out, which, 0, test_now));
    // A limit and key twice: both report what is left after both.
    for (std::size_t a = 0; a < which.size(); ++a) {
      for (std::size_t b = which.size(); --b > a;) {
        const std::size_t i = which[a], j = which[b];
        if (items[j].limit == items[i].limit && items[j].key == items[i].key) {
          out.results[i].decision.remaining = out.results[j].decision.remaining;
          out.results[i].decision.reset_after =
              out.results[j].decision.reset_after;
          break;
        }
      }
    }
  }

  Outcome run(std::string_view op, std::string_view tenant,
              std::span<const ChainItem> items, std::optional<Nanos> test_now,
              std::string_view mark = {}, Nanos mark_ttl = Nanos{0},
              std::string_view settled = {}) {
    Outcome result;
    ChainDecision& out = result.decision;
    out.results.resize(items.size());
    absl::InlinedVector<std::string, 8> keys;
    absl::InlinedVector<RedisLimitBase*, 4> limits;
    for (std::size_t i = 0; i < items.size(); ++i) {
      auto* l = redis_limit(items[i].limit);
      RATEKEEPER_ASSERT(l != nullptr && l->client() == client_,
                        "RedisChain: an item that is not a RedisLimit of "
                        "this chain's client");
      limits.push_back(l);
      // A global key is the limit's own (no tag): one count for every
      // tenant, the same as the limit's own calls.
      const bool global = l->redis_options().scope == RedisScope::kGlobal;
      keys.push_back(redis_key(client_->options().prefix, l->name(),
                               global ? std::string_view() : tenant,
                               items[i].key));
      out.results[i].limit = l;
      out.results[i].cost = items[i].cost;
    }
    const bool taking = op == "acquire" || op == "reserve";
    const absl::InlinedVector<Part, 2> parts = split(
        tenant, std::span<const std::string>(keys), limits, !mark.empty());
    bool refused = false;
    result.reached = true;
    for (const Part& p : parts) {
      PartOutcome po = run_part(op, taking && refused, p, keys, limits, items,
                                test_now, mark, mark_ttl, settled, out);
      out.at = po.at;
      if (po.settled) {
        // Retried after its settle: nothing stays taken.
        result.settled = po.settled;
        if (parts.size() > 1) roll_back(out, items, test_now);
        out.allowed = false;
        return result;
      }
      if (!po.allowed) refused = true;
      // reserve: whether its budgets' part (which holds the mark) was
      // reached; otherwise, whether every part was.
      if (p.mark || mark.empty()) {
        if (!po.reached && result.reached) {
          result.reached = false;
          result.error = po.error;
        }
      }
    }
    out.allowed = !refused;
    if (refused && taking && parts.size() > 1) roll_back(out, items, test_now);
    detail::finish_chain(out, taking);
    return result;
  }

  const std::shared_ptr<RedisClient> client_;
};

// RedisLease: quota leasing. Serves one key of a Redis limit in process
// from tokens taken from Redis `batch` at a time (one round trip per batch
// instead of per call). A batch is a take with its receipt, and the lease
// serves its tokens only while they are still the take's by Redis's clock:
// within the window (or budget period) it was taken in, and for a token
// bucket only the tokens of its stretch of the timeline that time has not
// yet refilled (the held tokens are the stretch's tail). So what the lease
// serves plus what others take never exceeds the limit: no over-admission,
// in any window or interval. Redis's time at a serve is bounded above by
// the take's Redis time plus the steady time since the take was sent, so a
// lease stops serving a window early rather than late. The unused rest is
// returned with the receipt (settled to what was served) when released or
// destroyed, given back only as far as it is still outstanding. The cost is
// fairness: tokens one instance holds unused (at most `batch` per instance)
// are unavailable to the others until it releases them. A batch Redis
// refuses is retried as the exact cost, so a nearly spent limit still
// serves what fits. When Redis cannot answer, the limit's fail mode answers
// each call (nothing is held). Thread-safe.
class RedisLease {
 public:
  RedisLease(RedisLimitBase& limit, std::string key, Cost batch)
      : limit_(limit), key_(std::move(key)), batch_(batch == 0 ? 1 : batch) {}
  RedisLease(const RedisLease&) = delete;
  RedisLease& operator=(const RedisLease&) = delete;
  ~RedisLease() { static_cast<void>(release()); }

  // acquire
  //
  // Served from the lease when it still holds `cost` valid now; else one
  // round trip takes another batch (or the cost alone). A refusal is
  // Redis's decision. `test_now` (tests, a limit with test_time): the time
  // of this call, as Redis's.
  Decision acquire(Cost cost, std::optional<Nanos> test_now = std::nullopt) {
    detail::MutexLock lock(&mu_);
    const auto steady_now = std::chrono::steady_clock::now();
    trim(steady_now, test_now);
    if (cost <= held_) {
      held_ -= cost;
      return Decision{true, limit_.limit(), held_, Nanos{0}, Nanos{0}};
    }
    // Refused a moment ago: the same answer, without asking Redis again
    // before the wait it stated is over (on the test time when one is
    // given).
    if (test_now) {
      if (*test_now < blocked_test_) {
        return Decision{false, limit_.limit(), held_, blocked_test_ - *test_now,
                        Nanos{0}};
      }
    } else if (steady_now < blocked_until_) {
      return Decision{
          false, limit_.limit(), held_,
          std::chrono::duration_cast<Nanos>(blocked_until_ - steady_now),
          Nanos{0}};
    }
    // Take what is missing, rounded up to a batch; or just that. What the
    // lease holds now serves the rest of this call, so the old receipt is
    // then used up to what time left of it.
    const Cost need = cost - held_;
    const Cost want = std::max(batch_, need);
    const Cost takes[2] = {want, need};
    const int tries = want == need ? 1 : 2;
    const Nanos now = test_now.value_or(std::chrono::duration_cast<Nanos>(
        std::chrono::system_clock::now().time_since_epoch()));
    for (int i = 0; i < tries; ++i) {
      const Cost take = takes[i];
      Receipt r;
      const auto sent = std::chrono::steady_clock::now();
      const Decision d = limit_.take(key_, take, now, r);
      ++round_trips_;
      if (d.allowed) {
        if (r.issuer() != &limit_) {
          // The fail mode answered: serve this call alone, hold nothing
          // (a kLocal receipt is settled to the cost at once).
          if (r) static_cast<void>(limit_.settle(r, need, now));
          held_ = 0;
          return Decision{true, limit_.limit(), held_, Nanos{0}, Nanos{0}};
        }
        // The old batch is spent: what it held serves this call; what time
        // took back of it is gone, nothing to give back.
        receipt_ = std::move(r);
        taken_ = take;
        sent_ = sent;
        held_ = take - need;
        return Decision{true, limit_.limit(), held_, Nanos{0}, Nanos{0}};
      }
      if (i == tries - 1) {
        if (d.retry_after != kNever && test_now) {
          blocked_test_ = *test_now + d.retry_after;
        } else if (d.retry_after != kNever) {
          blocked_until_ =
              steady_now +
              std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                  d.retry_after);
        }
        return d;
      }
    }
    return Decision{false, limit_.limit(), 0, kNever, Nanos{0}};
  }

  // release
  //
  // Returns the unused rest through the receipt (settled to what was
  // served: given back only as far as it is still outstanding by Redis's
  // clock). The status of that settle (kUnavailable: see
  // RedisLimit::settle; a receipt not sent is kept, to be released again).
  absl::Status release(std::optional<Nanos> test_now = std::nullopt) {
    detail::MutexLock lock(&mu_);
    if (!receipt_) {
      held_ = 0;
      return absl::OkStatus();
    }
    trim(std::chrono::steady_clock::now(), test_now);
    const Nanos now = test_now.value_or(std::chrono::duration_cast<Nanos>(
        std::chrono::system_clock::now().time_since_epoch()));
    absl::StatusOr<Decision> left =
        limit_.settle(receipt_, taken_ - held_, now);
    if (!receipt_) held_ = 0;
    return left.ok() ? absl::OkStatus() : left.status();
  }

  // What the lease holds and may still serve (as of its last call).
  Cost held() const {
    detail::MutexLock lock(&mu_);
    return held_;
  }
  std::uint64_t round_trips() const {
    detail::MutexLock lock(&mu_);
    return round_trips_;
  }

 private:
  // Drops what the receipt can no longer serve at Redis's time (bounded
  // above: the take's Redis time plus the steady time since it was sent).
  void trim(std::chrono::steady_clock::time_point steady_now,
            std::optional<Nanos> test_now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (!receipt_ || held_ == 0) return;
    const Nanos t = test_now.value_or(
        receipt_.at() + std::chrono::duration_cast<Nanos>(steady_now - sent_) +
        Nanos{1'000});
    held_ = limit_.still_served(receipt_, held_, t);
  }

  RedisLimitBase& limit_;
  const std::string key_;
  const Cost batch_;
  mutable detail::Mutex mu_;
  Receipt receipt_ ABSL_GUARDED_BY(mu_);
  Cost taken_ ABSL_GUARDED_BY(mu_) = 0;
  Cost held_ ABSL_GUARDED_BY(mu_) = 0;
  std::chrono::steady_clock::time_point sent_ ABSL_GUARDED_BY(mu_){};
  std::uint64_t round_trips_ ABSL_GUARDED_BY(mu_) = 0;
  std::chrono::steady_clock::time_point blocked_until_ ABSL_GUARDED_BY(mu_){};
  Nanos blocked_test_ ABSL_GUARDED_BY(mu_){Nanos::min()};
};

}  // namespace ratekeeper

#endif  // RATEKEEPER_STORE_REDIS_HPP_
