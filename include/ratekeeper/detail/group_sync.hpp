// ratekeeper/detail/group_sync.hpp: group commit for an append-only file,
// with no thread of its own.
//
// Writers number their records in order (under the writer's own lock),
// publish each with written(seq) once its bytes are written, release that
// lock, and call wait(seq, sync). The first waiter whose record is not yet
// synced while no sync runs makes one sync (the leader): it covers every
// record written before it started. Waiters that come meanwhile sleep on a
// futex, holding no lock, and share the next sync, which one of them makes
// when this one ends. So N writers arriving during a sync cost one sync,
// not N, and none waits for more than two syncs.
//
// A failed sync fails the log for good: every later wait returns its error
// (after a failed fdatasync the kernel may have dropped the pages, and a
// later sync that succeeds does not bring them back), as the ledger does.
//
// The ledger (budget/ledger.hpp) shares the futex primitives but keeps a
// syncer thread of its own (Durability::kGroupCommit gathers batches and
// syncs records nobody waits for); the settle journal, which is written
// only while Redis is away and then by every settle at once, needs no
// thread: its settlers take turns leading.
#ifndef RATEKEEPER_DETAIL_GROUP_SYNC_HPP_
#define RATEKEEPER_DETAIL_GROUP_SYNC_HPP_

#include <atomic>
#include <climits>
#include <cstdint>
#include <utility>

#include "absl/status/status.h"
#include "ratekeeper/detail/futex.hpp"
#include "ratekeeper/detail/mutex.hpp"

namespace ratekeeper::detail {

class GroupSync {
 public:
  explicit GroupSync(std::uint64_t start = 0)
      : written_(start), synced_(start) {}
  GroupSync(const GroupSync&) = delete;
  GroupSync& operator=(const GroupSync&) = delete;

  // Record `seq` (one more than the last) is written: a sync that starts
  // after this covers it. Called in order, under the writer's lock.
  void written(std::uint64_t seq) { written_.store(seq); }

  // wait
  //
  // Returns once every record up to `seq` is synced, or the error of the
  // sync that failed (then, and after, every wait fails). `sync` syncs the
  // file (fdatasync), called by at most one waiter at a time and with no
  // lock of this class held.
  template <class SyncFn>
  absl::Status wait(std::uint64_t seq, SyncFn&& sync) {
    for (;;) {
      // The epoch is read before the checks: a sync that ends after them
      // changes it, and the futex wait below returns at once.
      const std::uint32_t e = epoch_.load();
      if (synced_.load() >= seq) return absl::OkStatus();
      if (failed_flag_.load()) return failed();
      bool idle = false;
      if (!syncing_.compare_exchange_strong(idle, true)) {
        futex_wait(epoch_, e);
        continue;
      }
      const std::uint64_t upto = written_.load();
      const absl::Status st = std::forward<SyncFn>(sync)();
      syncs_.fetch_add(1);
      if (st.ok()) {
        std::uint64_t cur = synced_.load();
        while (cur < upto && !synced_.compare_exchange_weak(cur, upto)) {
        }
      } else {
        MutexLock lock(&mu_);
        if (failed_.ok()) failed_ = st;
        failed_flag_.store(true);
      }
      syncing_.store(false);
      epoch_.fetch_add(1);
      futex_wake(epoch_, INT_MAX);
    }
  }

  // The error of the sync that failed (OK: none has).
  absl::Status failed() const {
    if (!failed_flag_.load()) return absl::OkStatus();
    MutexLock lock(&mu_);
    return failed_;
  }

  // How many syncs were made (tests and benchmarks: records per sync).
  std::uint64_t syncs() const { return syncs_.load(); }

 private:
  std::atomic<std::uint64_t> written_;
  std::atomic<std::uint64_t> synced_;
  std::atomic<std::uint64_t> syncs_{0};
  std::atomic<std::uint32_t> epoch_{0};
  std::atomic<bool> syncing_{false};
  std::atomic<bool> failed_flag_{false};
  mutable Mutex mu_;
  absl::Status failed_ ABSL_GUARDED_BY(mu_);
};

}  // namespace ratekeeper::detail

#endif  // RATEKEEPER_DETAIL_GROUP_SYNC_HPP_
