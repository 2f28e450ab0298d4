// ratekeeper/redis/connection.hpp: one hiredis connection, waited on against
// a deadline.
#ifndef RATEKEEPER_REDIS_CONNECTION_HPP_
#define RATEKEEPER_REDIS_CONNECTION_HPP_

#include <hiredis/hiredis.h>
#include <poll.h>
#include <sys/socket.h>

#include <cerrno>
#include <chrono>
#include <memory>

namespace ratekeeper::detail {

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

}  // namespace ratekeeper::detail

#endif  // RATEKEEPER_REDIS_CONNECTION_HPP_
