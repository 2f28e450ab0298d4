// ratekeeper/redis/cluster.hpp: the nodes of a deployment, the Redis
// Cluster slot map, and the background thread that keeps both current.
//
// Internal (namespace detail). Defines:
//   Cluster  the node table (one server: a table of one), the slot map
//            (read from CLUSTER SLOTS, a key routed to its slot's node,
//            MOVED and ASK followed), and the maintenance thread: PINGs of
//            the nodes whose breaker is open (probe_interval), reads of the
//            slot map after a failure or a MOVED (slots_refresh_interval)
//   Cluster::Redirect  a MOVED or ASK error, parsed
// RedisClient (client.hpp) owns one.
#ifndef RATEKEEPER_REDIS_CLUSTER_HPP_
#define RATEKEEPER_REDIS_CLUSTER_HPP_

#include <hiredis/hiredis.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "ratekeeper/decision.hpp"
#include "ratekeeper/detail/mutex.hpp"
#include "ratekeeper/detail/strings.hpp"
#include "ratekeeper/redis/breaker.hpp"
#include "ratekeeper/redis/connection.hpp"
#include "ratekeeper/redis/node.hpp"
#include "ratekeeper/redis/reply.hpp"
#include "ratekeeper/redis/slots.hpp"

namespace ratekeeper::detail {

class Cluster {
 public:
  // `wire` opens the nodes' connections and holds the options; it
  // outlives the cluster. The configured host:port is the first node.
  explicit Cluster(const Connector& wire)
      : wire_(wire),
        options_(wire.options()),
        first_(new Node(options_.host, options_.port, wire)) {
    MutexLock lock(&mu_);
    nodes_.push_back(std::unique_ptr<Node>(first_));
  }
  // Stops the maintenance thread and joins it.
  ~Cluster() {
    {
      std::lock_guard<std::mutex> lock(bg_mu_);
      bg_stop_ = true;
    }
    bg_cv_.notify_all();
    if (bg_thread_.joinable()) bg_thread_.join();
  }
  Cluster(const Cluster&) = delete;
  Cluster& operator=(const Cluster&) = delete;

  // Without a lock: the first node never changes, and a slot's entry is
  // an atomic pointer to a node that is never removed (Node pointers stay
  // valid for the cluster's life).
  Node* first_node() const { return first_; }
  Node* node_for(std::string_view key) const {
    if (!options_.cluster) return first_;
    Node* n = slots_[key_slot(key)].load(std::memory_order_acquire);
    return n != nullptr ? n : first_;
  }
  Node* node_at(std::string host, int port) {
    MutexLock lock(&mu_);
    for (auto& n : nodes_) {
      if (n->port == port && n->host == host) return n.get();
    }
    nodes_.push_back(std::make_unique<Node>(std::move(host), port, wire_));
    return nodes_.back().get();
  }

  // The nodes that serve now: the one server, or every node the slot map
  // names (the configured node while the map is empty).
  std::vector<Node*> serving() const {
    MutexLock lock(&mu_);
    if (serving_.empty()) return {first_};
    return serving_;
  }
  // Every node's breaker trips, nodes no longer serving included.
  std::uint64_t breaker_trips() const {
    MutexLock lock(&mu_);
    std::uint64_t trips = 0;
    for (const auto& n : nodes_) trips += n->breaker.trips();
    return trips;
  }
  // How many times the slot map was read again after create.
  std::uint64_t slot_refreshes() const {
    return slot_refreshes_.load(std::memory_order_relaxed);
  }

  // The slot map, from CLUSTER SLOTS: [[start, end, [host, port, id],
  // replicas...], ...]. The replicas become nodes too: a later read of the
  // map may ask them (a dead master's replica knows of its promotion
  // first).
  absl::Status learn_slots(redisContext& c) {
    const std::string_view argv[] = {"CLUSTER", "SLOTS"};
    absl::StatusOr<ReplyPtr> r = wire_.roundtrip(c, argv);
    if (!r.ok()) return r.status();
    const redisReply& top = **r;
    if (top.type == REDIS_REPLY_ERROR) {
      if (absl::Status st = reply_error(top); is_auth_error(st)) return st;
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
    const auto node_of = [this](const redisReply& e) {
      return node_at(std::string(e.element[0]->str, e.element[0]->len),
                     static_cast<int>(e.element[1]->integer));
    };
    for (std::size_t i = 0; i < top.elements; ++i) {
      const redisReply& range = *top.element[i];
      if (range.type != REDIS_REPLY_ARRAY || range.elements < 3 ||
          range.element[0]->type != REDIS_REPLY_INTEGER ||
          range.element[1]->type != REDIS_REPLY_INTEGER ||
          !address(*range.element[2])) {
        continue;
      }
      Node* n = node_of(*range.element[2]);
      for (std::size_t j = 3; j < range.elements; ++j) {
        if (address(*range.element[j])) node_of(*range.element[j]);
      }
      MutexLock lock(&mu_);
      for (long long slot = std::max(0LL, range.element[0]->integer);
           slot <= range.element[1]->integer && slot < 16384; ++slot) {
        slots_[static_cast<std::size_t>(slot)].store(n,
                                                     std::memory_order_release);
      }
    }
    MutexLock lock(&mu_);
    recount_serving();
    return absl::OkStatus();
  }

  // A redirection: "MOVED <slot> <host>:<port>" or "ASK <slot>
  // <host>:<port>", as reply_error() words it (kInternal, "redis: ...").
  struct Redirect {
    bool moved = false;  // else ASK
    int slot = 0;
    std::string host;
    int port = 0;
  };
  static std::optional<Redirect> redirect_of(const absl::Status& st) {
    if (!absl::IsInternal(st)) return std::nullopt;
    const absl::string_view am = st.message();
    const std::string_view msg(am.data(), am.size());
    const bool moved = msg.substr(0, 13) == "redis: MOVED ";
    const bool ask = msg.substr(0, 11) == "redis: ASK ";
    if (!moved && !ask) return std::nullopt;
    const std::string_view rest = msg.substr(moved ? 13 : 11);
    const std::size_t sp = rest.find(' ');
    const std::size_t colon = rest.rfind(':');
    if (sp == std::string_view::npos || colon == std::string_view::npos ||
        colon < sp) {
      return std::nullopt;
    }
    Redirect r;
    r.moved = moved;
    if (!absl::SimpleAtoi(av(rest.substr(0, sp)), &r.slot) ||
        !absl::SimpleAtoi(av(rest.substr(colon + 1)), &r.port) || r.slot < 0 ||
        r.slot >= 16384) {
      return std::nullopt;
    }
    r.host = std::string(rest.substr(sp + 1, colon - sp - 1));
    return r;
  }
  // The node a redirection names. A MOVED (Cluster; one server has no map
  // to keep) updates the slot map and asks for the whole map again: a slot
  // moved, others may have too (a failover, a resharding).
  Node* follow(const Redirect& r) {
    Node* node = node_at(r.host, r.port);
    if (r.moved && options_.cluster) {
      {
        MutexLock lock(&mu_);
        slots_[static_cast<std::size_t>(r.slot)].store(
            node, std::memory_order_release);
        recount_serving();
      }
      request(refresh_asked_);
    }
    return node;
  }

  // A node failed or was turned away: the background thread probes it
  // while its breaker is open, and (Cluster) reads the slot map again, in
  // case its slots have a new owner. Cheap when already asked.
  void unreachable(const Node& node) {
    if (options_.cluster) request(refresh_asked_);
    if (options_.probe_interval > Nanos{0} &&
        node.breaker.state() != Breaker::State::kClosed) {
      request(probe_asked_);
    }
  }

 private:
  // Now plus `d`, saturating (an interval near Nanos::max(): never).
  static Nanos later(Nanos d) {
    const Nanos now = steady_now();
    return now > Nanos::max() - d ? Nanos::max() : now + d;
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
      if (n.breaker.state() == Breaker::State::kClosed) continue;
      n.drop_idle();
      const Connector::Deadline deadline = wire_.command_deadline();
      absl::StatusOr<Node::Conn> conn =
          n.take(std::chrono::steady_clock::now());
      bool pong = false;
      if (conn.ok()) {
        const std::string_view ping[] = {"PING"};
        absl::StatusOr<ReplyPtr> r = wire_.roundtrip(**conn, ping, deadline);
        pong = r.ok() && (*r)->type == REDIS_REPLY_STATUS &&
               std::string_view((*r)->str, (*r)->len) == "PONG";
        if (pong) n.put_back(*std::move(conn));
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
      MutexLock lock(&mu_);
      const std::size_t n = nodes_.size();
      const std::size_t start = refresh_cursor_++ % n;
      for (std::size_t i = 0; i < n; ++i) {
        order.push_back(nodes_[(start + i) % n].get());
      }
    }
    std::stable_partition(order.begin(), order.end(), [](const Node* n) {
      return n->breaker.state() == Breaker::State::kClosed;
    });
    for (Node* n : order) {
      absl::StatusOr<Node::Conn> conn =
          n->take(std::chrono::steady_clock::now());
      if (!conn.ok()) continue;
      if (learn_slots(**conn).ok()) {
        n->put_back(*std::move(conn));
        slot_refreshes_.fetch_add(1, std::memory_order_relaxed);
        return;
      }
    }
  }

  const Connector& wire_;
  const RedisOptions& options_;
  Node* const first_;  // the configured server, nodes_[0]
  mutable Mutex mu_;
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
  std::thread bg_thread_;   // started under bg_mu_; joined by ~Cluster
};

}  // namespace ratekeeper::detail

#endif  // RATEKEEPER_REDIS_CLUSTER_HPP_
