// ratekeeper/redis/client.hpp: RedisClient, the connections to one Redis or
// to each node of a Redis Cluster: its public API.
//
// The parts it is made of (namespace detail, each a header of its own):
//   connection.hpp  opening a connection (deadline, AUTH, SELECT), round
//                   trips against a deadline, script loads
//   reply.hpp       replies as statuses and integers
//   reader.hpp      the hot paths' I/O: commands sent from one buffer,
//                   replies read from the socket and parsed in place
//   node.hpp        one server: its breaker and its bounded pool
//   calls.hpp       a script call, a pipeline, a command on one node
//   cluster.hpp     the node table, the slot map, MOVED and ASK, and the
//                   background thread (probes, slot map reads)
// RedisClient routes each call to its node, lets that node's breaker
// decide, and follows redirections.
#ifndef RATEKEEPER_REDIS_CLIENT_HPP_
#define RATEKEEPER_REDIS_CLIENT_HPP_

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/container/inlined_vector.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "ratekeeper/decision.hpp"
#include "ratekeeper/redis/breaker.hpp"
#include "ratekeeper/redis/calls.hpp"
#include "ratekeeper/redis/cluster.hpp"
#include "ratekeeper/redis/connection.hpp"
#include "ratekeeper/redis/node.hpp"
#include "ratekeeper/redis/options.hpp"
#include "ratekeeper/redis/reply.hpp"
#include "ratekeeper/redis/scripts.hpp"

namespace ratekeeper {

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
    if (absl::Status st = detail::check_options(options); !st.ok()) {
      return st;
    }
    std::shared_ptr<RedisClient> c(new RedisClient(std::move(options)));
    // Only "Redis does not answer" may be waved through: credentials Redis
    // refuses are never a reason to start.
    const auto soft = [&c](const absl::Status& st) {
      return c->options_.start_unreachable && absl::IsUnavailable(st);
    };
    detail::Node* first = c->cluster_.first_node();
    absl::StatusOr<detail::Node::Conn> conn =
        first->take(c->wire_.command_deadline());
    if (!conn.ok()) {
      if (soft(conn.status())) return c;
      return conn.status();
    }
    const std::string_view ping[] = {"PING"};
    absl::StatusOr<detail::ReplyPtr> pong = c->wire_.roundtrip(**conn, ping);
    if (pong.ok() && (*pong)->type == REDIS_REPLY_ERROR) {
      pong = c->wire_.as_user(detail::reply_error(**pong));
    }
    if (!pong.ok()) {
      if (soft(pong.status())) return c;
      return pong.status();
    }
    if (c->options_.cluster) {
      if (absl::Status st = c->cluster_.learn_slots(**conn);
          !st.ok() && !soft(st)) {
        return c->wire_.as_user(st);
      }
    }
    first->put_back(*std::move(conn));
    if (!c->options_.password.empty()) {
      if (absl::Status st = c->probe(); !st.ok() && !soft(st)) return st;
    }
    return c;
  }

  // Stops the background thread and joins it (~Cluster).
  ~RedisClient() = default;
  RedisClient(const RedisClient&) = delete;
  RedisClient& operator=(const RedisClient&) = delete;

  // Whether `st` says the credentials were refused (kUnauthenticated) or
  // the user may not run a command or touch a key (kPermissionDenied):
  // Redis answered, and will answer the same until an operator acts.
  static bool is_auth_error(const absl::Status& st) {
    return detail::is_auth_error(st);
  }

  // The node a key's slot belongs to, as "host:port" (cluster; else the
  // one server).
  std::string node_of(std::string_view key) {
    const detail::Node* n = cluster_.node_for(key);
    return absl::StrCat(n->host, ":", n->port);
  }

  const RedisOptions& options() const noexcept { return options_; }

  // eval
  //
  // Runs `script` on `keys` and `args` by EVALSHA, loading the script
  // first and again after NOSCRIPT. The reply, flattened to integers (the
  // scripts here answer arrays of integers). kUnavailable when Redis cannot
  // be reached or did not answer in time (the script may or may not have
  // run: never retried); kInternal for an error reply. `Ints` as for
  // eval_pipelined.
  template <class Ints = absl::InlinedVector<std::int64_t, 8>>
  absl::StatusOr<Ints> eval_ints(const RedisScript& script,
                                 std::span<const std::string_view> keys,
                                 std::span<const std::string_view> args) {
    return eval_once<Ints>(script, keys, args);
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
  // `Ints` may be any container of std::int64_t with push_back and assign
  // (an absl::InlinedVector sized for the script's reply allocates nothing
  // per call).
  template <class Ints = absl::InlinedVector<std::int64_t, 8>>
  std::vector<absl::StatusOr<Ints>> eval_pipelined(
      const RedisScript& script, std::span<const EvalCall> calls) {
    using Out = absl::StatusOr<Ints>;
    std::vector<Out> out(calls.size(), absl::InternalError("redis: not run"));
    // Nothing to send: nothing learned of Redis, so the breakers are left
    // as they are (an empty batch must not take a probe, nor count as an
    // answer).
    if (calls.empty()) return out;
    // Calls grouped by node, in order within each.
    std::vector<std::pair<detail::Node*, std::vector<std::size_t>>> groups;
    for (std::size_t i = 0; i < calls.size(); ++i) {
      detail::Node* n = calls[i].keys.empty()
                            ? cluster_.first_node()
                            : cluster_.node_for(calls[i].keys[0]);
      auto g = std::find_if(groups.begin(), groups.end(),
                            [n](const auto& p) { return p.first == n; });
      if (g == groups.end()) {
        groups.push_back({n, {}});
        g = groups.end() - 1;
        // One node (no Cluster) takes them all: one allocation.
        if (groups.size() == 1) g->second.reserve(calls.size() - i);
      }
      g->second.push_back(i);
    }
    std::vector<std::size_t> redo;
    for (auto& [node, which] : groups) {
      // Each node's breaker decides for its calls only.
      bool probe = false;
      if (!node->breaker.admit(detail::steady_now(), probe)) {
        const absl::Status st = node->breaker_open_status();
        for (const std::size_t i : which) out[i] = st;
        cluster_.unreachable(*node);
        continue;
      }
      if (probe) node->drop_idle();  // the probe asks a fresh connection
      const std::size_t redo_before = redo.size();
      detail::run_pipeline(wire_, *node, script, calls,
                           std::span<const std::size_t>(which),
                           std::span<Out>(out), redo);
      const auto cut = [&out](std::size_t i) {
        return !out[i].ok() &&
               detail::has_payload(out[i].status(), detail::kCutPayload);
      };
      for (const std::size_t i : which) {  // a cut: asked once per node
        if (!cut(i)) continue;
        if (absl::Status auth =
                cut_over_credentials(*node, out[i].status(), probe);
            !auth.ok()) {
          for (const std::size_t j : which) {
            if (cut(j)) out[j] = auth;
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
        if (!out[i].ok() && detail::unanswered(out[i].status())) {
          worst = out[i].status();
          break;
        }
      }
      record(*node, worst, probe);
    }
    for (const std::size_t i : redo) {
      out[i] = eval_once<Ints>(script, calls[i].keys, calls[i].args);
    }
    return out;
  }

  // command
  //
  // One command (administration, tests) to the configured node: the reply
  // as text (a status, a bulk string, an integer in decimal; arrays joined
  // by newlines).
  absl::StatusOr<std::string> command(std::span<const std::string_view> argv) {
    detail::Node& node = *cluster_.first_node();
    return on_node(node,
                   [&] { return detail::run_command(wire_, node, argv); });
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
    return !st.ok() && !detail::has_payload(st, detail::kNotRunPayload);
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
    for (const detail::Node* n : cluster_.serving()) {
      const detail::Breaker::State s = n->breaker.state();
      if (s == detail::Breaker::State::kOpen) return s;
      if (s == detail::Breaker::State::kHalfOpen) worst = s;
    }
    return worst;
  }
  detail::Breaker::State breaker_state(std::string_view key) {
    return cluster_.node_for(key)->breaker.state();
  }
  bool breaker_refuses() const {
    const Nanos now = detail::steady_now();
    for (const detail::Node* n : cluster_.serving()) {
      if (!n->breaker.refuses(now)) return false;
    }
    return true;
  }
  std::uint64_t breaker_trips() const { return cluster_.breaker_trips(); }

  // How many times the slot map was read again after create (Cluster).
  std::uint64_t slot_refreshes() const { return cluster_.slot_refreshes(); }

 private:
  explicit RedisClient(RedisOptions o)
      : options_(std::move(o)), wire_(options_), cluster_(wire_) {}

  // Runs `call` on `node` unless its breaker is open; a call the node did
  // not answer (kUnavailable) counts against its breaker, any answer
  // (errors included) for it.
  template <class F>
  auto on_node(detail::Node& node, F&& call) -> decltype(call()) {
    bool probe = false;
    if (!node.breaker.admit(detail::steady_now(), probe)) {
      cluster_.unreachable(node);
      return node.breaker_open_status();
    }
    if (probe) node.drop_idle();  // the probe asks a fresh connection
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

  void record(detail::Node& node, const absl::Status& st, bool probe) {
    if (!st.ok() && detail::unanswered(st)) {
      node.breaker.failure(detail::steady_now(), probe);
      node.drop_idle();  // the node's other connections are likely as dead
      cluster_.unreachable(node);
    } else {
      node.breaker.success();
    }
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
  static absl::Status cut_over_credentials(const detail::Node& node,
                                           const absl::Status& st, bool probe) {
    if (probe || st.ok() || !detail::has_payload(st, detail::kCutPayload)) {
      return absl::OkStatus();
    }
    absl::StatusOr<detail::ContextPtr> fresh = node.open_fresh();
    if (!fresh.ok() && detail::is_auth_error(fresh.status())) {
      return fresh.status();
    }
    return absl::OkStatus();
  }

  // The node for `keys` (all of one slot by construction), following up
  // to five MOVED or ASK redirections; each node's breaker decides for the
  // calls to it.
  template <class Ints>
  absl::StatusOr<Ints> eval_once(const RedisScript& script,
                                 std::span<const std::string_view> keys,
                                 std::span<const std::string_view> args) {
    detail::Node* node =
        keys.empty() ? cluster_.first_node() : cluster_.node_for(keys[0]);
    bool asking = false;
    for (int hop = 0; hop < 6; ++hop) {
      absl::StatusOr<Ints> r = on_node(*node, [&] {
        return detail::run_script<Ints>(wire_, *node, asking, script, keys,
                                        args);
      });
      if (r.ok()) return r;
      const std::optional<detail::Cluster::Redirect> to =
          detail::Cluster::redirect_of(r.status());
      if (!to.has_value()) return r;
      node = cluster_.follow(*to);
      asking = !to->moved;
    }
    return absl::InternalError("redis: too many cluster redirections");
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
    return detail::not_run(absl::Status(
        st.code(),
        absl::StrCat(
            "redis ", options_.host, ":", options_.port, " ", wire_.user_text(),
            ": the user may not run what ratekeeper runs on keys under \"",
            options_.prefix,
            "\" (docs/redis.md has the ACL line): ", st.message())));
  }

  // In this order: the connector refers to the options, the cluster (its
  // nodes, its thread) to the connector, and is destroyed first.
  const RedisOptions options_;
  const detail::Connector wire_;
  detail::Cluster cluster_;
};

}  // namespace ratekeeper

#endif  // RATEKEEPER_REDIS_CLIENT_HPP_
