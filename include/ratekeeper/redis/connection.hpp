// ratekeeper/redis/connection.hpp: one hiredis connection, opened and
// spoken to against a deadline.
//
// Internal (namespace detail). Defines:
//   ContextPtr    an owned hiredis context
//   wait_fd()     ppoll on a socket until a deadline
//   steady_now()  the steady clock as Nanos
//   Connector     what every connection of one RedisClient shares: opening
//                 one (non-blocking, within connect_timeout, through the
//                 address map, then AUTH and SELECT), a command's round
//                 trip against a deadline (with WAIT after a script when
//                 wait_replicas asks), a script's SCRIPT LOAD, and the
//                 statuses that name the server and the user
#ifndef RATEKEEPER_REDIS_CONNECTION_HPP_
#define RATEKEEPER_REDIS_CONNECTION_HPP_

#include <hiredis/hiredis.h>
#include <poll.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <span>
#include <string>
#include <string_view>

#include "absl/base/thread_annotations.h"
#include "absl/container/inlined_vector.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"
#include "ratekeeper/decision.hpp"
#include "ratekeeper/detail/mutex.hpp"
#include "ratekeeper/detail/strings.hpp"
#include "ratekeeper/redis/options.hpp"
#include "ratekeeper/redis/reply.hpp"
#include "ratekeeper/redis/resp.hpp"
#include "ratekeeper/redis/scripts.hpp"

namespace ratekeeper::detail {

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

inline Nanos steady_now() {
  return std::chrono::duration_cast<Nanos>(
      std::chrono::steady_clock::now().time_since_epoch());
}

// Connector: the client's options applied to its connections. Thread-safe.
// It refers to the options (the client's own copy, which outlives it).
class Connector {
 public:
  using Deadline = std::chrono::steady_clock::time_point;

  explicit Connector(const RedisOptions& options) : options_(options) {}
  Connector(const Connector&) = delete;
  Connector& operator=(const Connector&) = delete;

  const RedisOptions& options() const noexcept { return options_; }

  // Now plus command_timeout: one call's deadline, all its round trips.
  Deadline command_deadline() const {
    return std::chrono::steady_clock::now() +
           std::chrono::duration_cast<std::chrono::nanoseconds>(
               options_.command_timeout);
  }

  // A connection to host:port, non-blocking: every wait below is a ppoll()
  // against a deadline, exact to the microsecond (socket timeouts would
  // round up to the kernel's tick).
  //
  // Then readied, within the same connect_timeout: AUTH and SELECT
  // (RedisOptions's credentials). Credentials refused make every new
  // connection fail at once for breaker_open, with the same status: a
  // wrong password does not cost a connection per call.
  absl::StatusOr<ContextPtr> open(const std::string& node_host,
                                  int node_port) const {
    const auto deadline = std::chrono::steady_clock::now() +
                          std::chrono::duration_cast<std::chrono::nanoseconds>(
                              options_.connect_timeout);
    {
      MutexLock lock(&auth_mu_);
      if (!auth_refused_.ok() &&
          std::chrono::steady_clock::now() < auth_retry_at_) {
        return auth_refused_;
      }
    }
    std::string host = node_host;
    int port = node_port;
    if (!options_.address_map.empty()) {
      const auto to =
          options_.address_map.find(absl::StrCat(node_host, ":", node_port));
      if (to != options_.address_map.end()) {
        split_address(to->second, host, port);  // checked by create()
      }
    }
    ContextPtr c(redisConnectNonBlock(host.c_str(), port));
    if (c == nullptr) {
      return absl::ResourceExhaustedError("redis: cannot allocate a context");
    }
    // Nothing is sent before a connection is open: not run.
    if (c->err != 0) return not_run(unavailable(c->errstr));
    if (!wait_fd(c->fd, POLLOUT, deadline)) {
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

  // One command on `c`. A failed round trip (I/O error, timeout) leaves
  // `c` in an unknown state: the caller drops it (by not putting it back).
  absl::StatusOr<ReplyPtr> roundtrip(
      redisContext& c, std::span<const std::string_view> argv) const {
    return roundtrip(c, argv, command_deadline());
  }
  absl::StatusOr<ReplyPtr> roundtrip(redisContext& c,
                                     std::span<const std::string_view> argv,
                                     Deadline deadline) const {
    if (absl::Status st = append(c, argv); !st.ok()) return st;
    if (absl::Status st = flush(c, deadline); !st.ok()) return st;
    return read_reply(c, deadline);
  }

  // A script call, and with wait_replicas its WAIT in the same write;
  // `replicated` says whether enough replicas acknowledged it (true
  // without wait_replicas). The script's reply.
  absl::StatusOr<ReplyPtr> roundtrip_waited(
      redisContext& c, std::span<const std::string_view> argv,
      Deadline deadline, bool& replicated) const {
    replicated = true;
    if (options_.wait_replicas <= 0) return roundtrip(c, argv, deadline);
    if (absl::Status st = append(c, argv); !st.ok()) return st;
    if (absl::Status st = append_wait(c); !st.ok()) return st;
    if (absl::Status st = flush(c, deadline); !st.ok()) return st;
    absl::StatusOr<ReplyPtr> r = read_reply(c, deadline);
    if (!r.ok()) return r;
    absl::StatusOr<ReplyPtr> waited = read_reply(c, deadline);
    if (!waited.ok()) return waited.status();
    replicated = replicas_met(**waited);
    return r;
  }

  // WAIT wait_replicas wait_timeout, appended (not sent).
  absl::Status append_wait(redisContext& c) const {
    std::string wire;
    wait_command(wire);
    if (redisAppendFormattedCommand(&c, wire.data(), wire.size()) != REDIS_OK) {
      return unavailable(c.errstr);
    }
    return absl::OkStatus();
  }
  // The same WAIT in RESP, appended to `out`.
  void wait_command(std::string& out) const {
    const std::string n = std::to_string(options_.wait_replicas);
    const std::string ms = wait_millis();
    const std::string_view w[] = {"WAIT", n, ms};
    resp_command(out, {w});
  }
  bool replicas_met(const redisReply& w) const {
    return w.type == REDIS_REPLY_INTEGER && w.integer >= options_.wait_replicas;
  }
  // The same, of a reply parsed in place (reader.hpp: ':' an integer).
  template <class Parsed>
  bool replicas_met(const Parsed& w) const {
    return w.type == ':' && w.integer >= options_.wait_replicas;
  }

  absl::Status append(redisContext& c,
                      std::span<const std::string_view> argv) const {
    std::string wire;
    resp_command(wire, {argv});
    if (redisAppendFormattedCommand(&c, wire.data(), wire.size()) != REDIS_OK) {
      return unavailable(c.errstr);
    }
    return absl::OkStatus();
  }
  absl::Status flush(redisContext& c, Deadline deadline) const {
    for (int done = 0; done == 0;) {
      if (redisBufferWrite(&c, &done) != REDIS_OK) return io_failed(c);
      if (done == 0 && !wait_fd(c.fd, POLLOUT, deadline)) {
        return unavailable("timed out writing");
      }
    }
    return absl::OkStatus();
  }
  absl::StatusOr<ReplyPtr> read_reply(redisContext& c,
                                      Deadline deadline) const {
    for (;;) {
      void* reply = nullptr;
      if (redisGetReplyFromReader(&c, &reply) != REDIS_OK) {
        return unavailable(c.errstr);  // a protocol error, not a cut
      }
      if (reply != nullptr) return ReplyPtr(static_cast<redisReply*>(reply));
      if (!wait_fd(c.fd, POLLIN, deadline)) {
        return unavailable("timed out waiting for the reply");
      }
      if (redisBufferRead(&c) != REDIS_OK) return io_failed(c);
    }
  }

  // The SHA1 Redis gave `s` (empty until a load answered).
  static std::string known_sha(const RedisScript& s) {
    MutexLock lock(&s.mu_);
    return s.sha_;
  }
  // SCRIPT LOAD of `s` on `c`; its SHA1, kept in `s` for every connection.
  absl::StatusOr<std::string> load(redisContext& c, const RedisScript& s,
                                   Deadline deadline) const {
    const std::string_view argv[] = {"SCRIPT", "LOAD", s.source()};
    absl::StatusOr<ReplyPtr> r = roundtrip(c, argv, deadline);
    if (!r.ok()) return r.status();
    if ((*r)->type == REDIS_REPLY_ERROR) {
      absl::Status st = reply_error(**r);
      if (is_auth_error(st)) return st;
    }
    if ((*r)->type != REDIS_REPLY_STRING) {
      return absl::InternalError(absl::StrCat(
          "redis: SCRIPT LOAD failed: ", (*r)->type == REDIS_REPLY_ERROR
                                             ? std::string((*r)->str, (*r)->len)
                                             : "unexpected reply"));
    }
    std::string sha((*r)->str, (*r)->len);
    MutexLock lock(&s.mu_);
    s.sha_ = sha;
    return sha;
  }

  // kUnavailable naming the configured server.
  absl::Status unavailable(std::string_view why) const {
    return absl::UnavailableError(absl::StrCat("redis ", options_.host, ":",
                                               options_.port, ": ", av(why)));
  }
  // A connection that failed on a read or a write (closed by Redis, reset,
  // broken): kUnavailable, marked kCutPayload.
  absl::Status io_failed(const redisContext& c) const {
    return io_failed(std::string_view(c.errstr));
  }
  absl::Status io_failed(std::string_view why) const {
    absl::Status st = unavailable(why);
    st.SetPayload(av(kCutPayload), absl::Cord("1"));
    return st;
  }
  // A script the node ran that fewer than wait_replicas acknowledged in
  // time: kUnavailable, but an answer (kAnsweredPayload).
  absl::Status not_replicated(const std::string& host, int port) const {
    absl::Status st = absl::UnavailableError(absl::StrCat(
        "redis ", host, ":", port, ": run, but fewer than ",
        options_.wait_replicas, " replicas acknowledged it within ",
        wait_millis(), " ms (WAIT)"));
    st.SetPayload(av(kAnsweredPayload), absl::Cord("1"));
    return st;
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

 private:
  // AUTH and SELECT on a new connection. Statuses name the user, never
  // the password (Redis's replies do not carry it either).
  absl::Status ready(redisContext& c, Deadline deadline) const {
    absl::Status refused;
    if (!options_.password.empty()) {
      absl::InlinedVector<std::string_view, 3> argv = {"AUTH"};
      if (!options_.username.empty()) argv.push_back(options_.username);
      argv.push_back(options_.password);
      absl::StatusOr<ReplyPtr> r = roundtrip(c, argv, deadline);
      if (!r.ok()) return r.status();
      if ((*r)->type == REDIS_REPLY_ERROR) {
        // WRONGPASS, or "AUTH ... called without any password configured":
        // either way these credentials are not accepted.
        refused = not_run(absl::UnauthenticatedError(absl::StrCat(
            "redis ", options_.host, ":", options_.port, ": AUTH ", user_text(),
            " refused: ", av(std::string_view((*r)->str, (*r)->len)))));
      }
    }
    if (refused.ok() && options_.db != 0) {
      const std::string db = std::to_string(options_.db);
      const std::string_view argv[] = {"SELECT", db};
      absl::StatusOr<ReplyPtr> r = roundtrip(c, argv, deadline);
      if (!r.ok()) return r.status();
      if ((*r)->type == REDIS_REPLY_ERROR) {
        const std::string_view msg((*r)->str, (*r)->len);
        absl::Status st = reply_error(msg);
        if (!is_auth_error(st)) {
          // "DB index is out of range": this server has fewer databases.
          return absl::InvalidArgumentError(
              absl::StrCat("redis ", options_.host, ":", options_.port,
                           ": SELECT ", db, ": ", av(msg)));
        }
        refused = as_user(st);
      }
    }
    MutexLock lock(&auth_mu_);
    auth_refused_ = refused;
    if (!refused.ok()) {
      auth_retry_at_ = std::chrono::steady_clock::now() +
                       std::chrono::duration_cast<std::chrono::nanoseconds>(
                           options_.breaker_open);
    }
    return refused;
  }

  // WAIT's time-out in whole milliseconds, rounded up (0 would wait for
  // ever).
  std::string wait_millis() const {
    const auto ms =
        std::chrono::ceil<std::chrono::milliseconds>(options_.wait_timeout);
    return std::to_string(std::max<std::int64_t>(1, ms.count()));
  }

  const RedisOptions& options_;
  // Credentials refused on a new connection, and until when new ones are
  // not tried (open()).
  mutable Mutex auth_mu_;
  mutable absl::Status auth_refused_ ABSL_GUARDED_BY(auth_mu_);
  mutable std::chrono::steady_clock::time_point auth_retry_at_
      ABSL_GUARDED_BY(auth_mu_);
};

}  // namespace ratekeeper::detail

#endif  // RATEKEEPER_REDIS_CONNECTION_HPP_
