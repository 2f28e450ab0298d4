// ratekeeper/redis/client.hpp: RedisClient, the connections to one Redis or
// to each node of a Redis Cluster.
#ifndef RATEKEEPER_REDIS_CLIENT_HPP_
#define RATEKEEPER_REDIS_CLIENT_HPP_

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
#include "ratekeeper/decision.hpp"
#include "ratekeeper/detail/mutex.hpp"
#include "ratekeeper/detail/strings.hpp"
#include "ratekeeper/redis/breaker.hpp"
#include "ratekeeper/redis/connection.hpp"
#include "ratekeeper/redis/options.hpp"
#include "ratekeeper/redis/resp.hpp"
#include "ratekeeper/redis/scripts.hpp"
#include "ratekeeper/redis/slots.hpp"

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
    std::string wire;  // every EVALSHA in RESP, handed to hiredis at once
    wire.reserve(which.size() * 256);
    for (const std::size_t i : which) {
      const std::string nkeys = std::to_string(calls[i].keys.size());
      const std::string_view head[] = {"EVALSHA", sha, nkeys};
      detail::resp_command(wire, {head, calls[i].keys, calls[i].args});
    }
    if (redisAppendFormattedCommand(&**conn, wire.data(), wire.size()) !=
        REDIS_OK) {
      return fail_from(0, unavailable((*conn)->errstr));
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
    std::string wire;
    detail::resp_command(wire, {argv});
    if (redisAppendFormattedCommand(&c, wire.data(), wire.size()) != REDIS_OK) {
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

}  // namespace ratekeeper

#endif  // RATEKEEPER_REDIS_CLIENT_HPP_
