// ratekeeper/redis/options.hpp: what a user configures of the Redis layer.
//
// Defines:
//   RedisOptions       where Redis is (one server or a Cluster), the key
//                      prefix, timeouts, pools, breakers, credentials, an
//                      address map for tunnels, failover
//   FailMode           what a Redis limit answers when Redis cannot
//   RedisScope         whether a limit's key counts per tenant or once
//   RedisLimitOptions  how one Redis limit behaves
//   detail::check_options()  what RedisClient::create() refuses
//   detail::split_address()  "host:port" read
#ifndef RATEKEEPER_REDIS_OPTIONS_HPP_
#define RATEKEEPER_REDIS_OPTIONS_HPP_

#include <chrono>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "ratekeeper/decision.hpp"
#include "ratekeeper/detail/strings.hpp"

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

// "host:port" (the port after the last ':', 1 to 65535).
inline bool split_address(std::string_view a, std::string& host, int& port) {
  const std::size_t colon = a.rfind(':');
  if (colon == std::string_view::npos || colon == 0) return false;
  int p = 0;
  if (!absl::SimpleAtoi(av(a.substr(colon + 1)), &p) || p <= 0 || p > 65535) {
    return false;
  }
  host = std::string(a.substr(0, colon));
  port = p;
  return true;
}

// What RedisClient::create() refuses (kInvalidArgument), as the comments
// above state it.
inline absl::Status check_options(const RedisOptions& options) {
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
    return absl::InvalidArgumentError(absl::StrCat(
        "RedisOptions: db ", options.db, " (0 to ", RedisOptions::kMaxDb, ")"));
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
  return absl::OkStatus();
}

}  // namespace detail

}  // namespace ratekeeper

#endif  // RATEKEEPER_REDIS_OPTIONS_HPP_
