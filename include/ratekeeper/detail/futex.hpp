// ratekeeper/detail/futex.hpp: futex waits on a 32-bit atomic (Linux), for
// the durable logs' waiters and syncers (budget/ledger.hpp's group commit,
// detail/group_sync.hpp's): they sleep in the kernel with no mutex to
// re-take on waking (a condition variable's waiters would queue on its
// mutex, which every append takes).
#ifndef RATEKEEPER_DETAIL_FUTEX_HPP_
#define RATEKEEPER_DETAIL_FUTEX_HPP_

#include <linux/futex.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>

#include "ratekeeper/decision.hpp"

namespace ratekeeper::detail {

// futex_wait returns at once when `*a != expected`, on a wake, on a signal,
// or after `timeout` (negative: none); callers re-check.
inline void futex_wait(std::atomic<std::uint32_t>& a, std::uint32_t expected,
                       Nanos timeout = Nanos{-1}) {
  static_assert(sizeof(std::atomic<std::uint32_t>) == sizeof(std::uint32_t));
  struct timespec ts {};
  struct timespec* tp = nullptr;
  if (timeout.count() >= 0) {
    ts.tv_sec = static_cast<time_t>(timeout.count() / 1'000'000'000);
    ts.tv_nsec = static_cast<long>(timeout.count() % 1'000'000'000);
    tp = &ts;
  }
  ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&a), FUTEX_WAIT_PRIVATE,
            expected, tp, nullptr, 0);
}
inline void futex_wake(std::atomic<std::uint32_t>& a, int n) {
  ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&a), FUTEX_WAKE_PRIVATE,
            n, nullptr, nullptr, 0);
}

}  // namespace ratekeeper::detail

#endif  // RATEKEEPER_DETAIL_FUTEX_HPP_
