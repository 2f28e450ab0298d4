// ratekeeper/redis/node.hpp: one Redis server of a deployment, with its
// circuit breaker and its bounded pool of connections.
//
// Internal (namespace detail). Defines:
//   Node        one server (host:port as Redis names it): its breaker, and
//               its pool under a lock of its own (the calls to one node
//               never wait on another's pool), at most max_connections
//               open at once, in use and idle
//   Node::Conn  a connection taken from a node's pool: put back with
//               Node::put_back(), or closed (its place freed) when dropped
#ifndef RATEKEEPER_REDIS_NODE_HPP_
#define RATEKEEPER_REDIS_NODE_HPP_

#include <hiredis/hiredis.h>

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "ratekeeper/detail/mutex.hpp"
#include "ratekeeper/redis/breaker.hpp"
#include "ratekeeper/redis/connection.hpp"
#include "ratekeeper/redis/reply.hpp"

namespace ratekeeper::detail {

class Node {
 public:
  using Deadline = Connector::Deadline;

  // A connection taken from the node's pool.
  class Conn {
   public:
    Conn(Node* node, ContextPtr c) noexcept : node_(node), c_(std::move(c)) {}
    Conn(Conn&& o) noexcept : node_(o.node_), c_(std::move(o.c_)) {}
    Conn& operator=(Conn&&) = delete;
    ~Conn() {
      if (c_ != nullptr) node_->discard(std::move(c_));
    }
    redisContext& operator*() const noexcept { return *c_; }
    redisContext* operator->() const noexcept { return c_.get(); }

   private:
    friend class Node;  // put_back() takes the context back
    ContextPtr release() noexcept { return std::move(c_); }
    Node* node_;
    ContextPtr c_;
  };

  // `wire` opens the node's connections and holds the options; it
  // outlives the node.
  Node(std::string h, int p, const Connector& wire)
      : host(std::move(h)),
        port(p),
        breaker(wire.options().breaker_failures, wire.options().breaker_open,
                wire.options().breaker_max_open),
        wire_(wire) {}
  Node(const Node&) = delete;
  Node& operator=(const Node&) = delete;

  const std::string host;
  const int port;
  Breaker breaker;

  // A connection: an idle one, or a new one while fewer than
  // max_connections are open; else waits for one until `deadline`, then
  // kUnavailable (not run). With `after_connect`, the time spent opening a
  // connection is added to it (the connect has its own time-out).
  absl::StatusOr<Conn> take(Deadline deadline,
                            Deadline* after_connect = nullptr) {
    {
      MutexLock lock(&mu_);
      for (;;) {
        if (!idle_.empty()) {
          ContextPtr c = std::move(idle_.back());
          idle_.pop_back();
          return Conn(this, std::move(c));
        }
        if (open_ < wire_.options().max_connections) {
          ++open_;
          break;
        }
        if (std::chrono::steady_clock::now() >= deadline) {
          return not_run(absl::UnavailableError(absl::StrCat(
              "redis ", host, ":", port, ": all ",
              wire_.options().max_connections,
              " connections busy until the call's deadline (not run)")));
        }
        ++waiters_;
        freed_.wait_until(mu_, deadline);
        --waiters_;
      }
    }
    const auto start = std::chrono::steady_clock::now();
    absl::StatusOr<ContextPtr> c = wire_.open(host, port);
    if (!c.ok()) {
      discard(nullptr);
      return c.status();
    }
    if (after_connect != nullptr) {
      *after_connect += std::chrono::steady_clock::now() - start;
    }
    return Conn(this, *std::move(c));
  }

  // A connection answered and is clean: kept idle (up to pool_size),
  // else closed.
  // A connection closed here is counted open until its socket is closed
  // (the close outside the lock), so that the sockets open never pass
  // max_connections, not even for the moment between the two.
  void put_back(Conn conn) {
    ContextPtr c = conn.release();
    {
      MutexLock lock(&mu_);
      if (idle_.size() < wire_.options().pool_size) {
        idle_.push_back(std::move(c));
        if (waiters_ > 0) freed_.notify_one();
        return;
      }
    }
    discard(std::move(c));
  }

  // Closes the idle connections (after the node failed: the others are
  // likely as dead); other nodes' pools are left alone. Each stays counted
  // until its socket is closed.
  void drop_idle() {
    std::vector<ContextPtr> dead;
    {
      MutexLock lock(&mu_);
      dead.swap(idle_);
    }
    if (dead.empty()) return;
    const std::size_t n = dead.size();
    dead.clear();
    MutexLock lock(&mu_);
    open_ -= n;
    if (waiters_ > 0) freed_.notify_all();
  }

  // A fresh connection outside the pool (to ask whether the credentials
  // still hold).
  absl::StatusOr<ContextPtr> open_fresh() const {
    return wire_.open(host, port);
  }

  // A call the breaker turned away.
  absl::Status breaker_open_status() const {
    return not_run(absl::UnavailableError(
        absl::StrCat("redis ", host, ":", port,
                     ": circuit open after repeated failures (not tried)")));
  }

 private:
  // A connection closed (`c`, null when the open failed).
  void discard(ContextPtr c) {
    c.reset();
    MutexLock lock(&mu_);
    --open_;
    if (waiters_ > 0) freed_.notify_one();
  }

  const Connector& wire_;
  Mutex mu_;
  std::vector<ContextPtr> idle_ ABSL_GUARDED_BY(mu_);
  std::size_t open_ ABSL_GUARDED_BY(mu_) = 0;  // in use and idle
  std::size_t waiters_ ABSL_GUARDED_BY(mu_) = 0;
  std::condition_variable_any freed_;  // a connection came back or closed
};

}  // namespace ratekeeper::detail

#endif  // RATEKEEPER_REDIS_NODE_HPP_
