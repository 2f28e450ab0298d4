// ratekeeper/redis/journal_replay.hpp: a RedisAccountant's journal in use:
// settles and releases journaled while Redis is away, and their replay.
//
// Defines (namespace detail):
//   JournalReplayer  the accountant's SettleJournal (redis/journal.hpp, the
//                    file) with what runs it: replay in bounded slices
//                    before calls, or whole on request; stale settles set
//                    aside; the counters the accountant reports
#ifndef RATEKEEPER_REDIS_JOURNAL_REPLAY_HPP_
#define RATEKEEPER_REDIS_JOURNAL_REPLAY_HPP_

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "ratekeeper/detail/mutex.hpp"
#include "ratekeeper/redis/client.hpp"
#include "ratekeeper/redis/journal.hpp"
#include "ratekeeper/redis/reservation.hpp"
#include "ratekeeper/redis/scripts.hpp"

namespace ratekeeper::detail {

// JournalReplayer: without a journal (no open()), append() is kUnavailable
// and the rest does nothing. Thread-safe: appends from any thread; one
// replayer at a time (a call finding another replaying goes on at once).
class JournalReplayer {
 public:
  // Holds references to the accountant's client and options.
  JournalReplayer(const std::shared_ptr<RedisClient>& client,
                  const RedisAccountantOptions& options)
      : client_(client), options_(options) {}
  JournalReplayer(const JournalReplayer&) = delete;
  JournalReplayer& operator=(const JournalReplayer&) = delete;

  // Opens (or creates) the journal at `path`; before any other call.
  absl::Status open(const std::string& path) {
    auto j = SettleJournal::open(path);
    if (!j.ok()) return j.status();
    journal_ = *std::move(j);
    return absl::OkStatus();
  }
  bool enabled() const noexcept { return journal_ != nullptr; }

  // Journals a call (durable when it returns OK), timed now.
  absl::Status append(SettleJournal::Entry e) {
    if (journal_ == nullptr) {
      return absl::UnavailableError("redis away and no journal configured");
    }
    e.t = unix_now(options_);
    if (absl::Status st = journal_->append(std::move(e)); !st.ok()) return st;
    journaled_.fetch_add(1, std::memory_order_relaxed);
    return absl::OkStatus();
  }

  // RedisAccountant::replay_journal: every line, in order.
  absl::StatusOr<std::size_t> replay_all() {
    if (journal_ == nullptr) return 0;
    MutexLock lock(&replay_mu_);
    return replay_locked(std::nullopt);
  }

  // Replays a slice of the journal before a reserve or settle: at most
  // replay_slice (by default an eighth of command_timeout) of batches,
  // started only while the breaker lets calls through, one replayer at a
  // time (a call finding another replaying goes on at once), and at most
  // one try a second after a failed one, so that a journal Redis keeps
  // refusing does not cost every call a round trip.
  void replay_if_due() {
    if (journal_ == nullptr || journal_->size() == 0) return;
    if (client_->breaker_refuses()) return;
    const auto now = std::chrono::steady_clock::now();
    if (now.time_since_epoch().count() <
        next_replay_.load(std::memory_order_relaxed)) {
      return;
    }
    if (!replay_mu_.try_lock()) return;
    const Nanos slice = options_.replay_slice > Nanos{0}
                            ? options_.replay_slice
                            : client_->options().command_timeout / 8;
    if (!replay_locked(now + slice).ok()) {
      next_replay_.store(
          (now + std::chrono::seconds(1)).time_since_epoch().count(),
          std::memory_order_relaxed);
    }
    replay_mu_.unlock();
  }

  // The counters and paths RedisAccountant reports (accountant.hpp).
  std::size_t pending() const noexcept {
    return journal_ == nullptr ? 0 : journal_->size();
  }
  std::uint64_t stale() const noexcept {
    return stale_.load(std::memory_order_relaxed);
  }
  std::string stale_path() const {
    return journal_ == nullptr ? std::string() : journal_->stale_path();
  }
  std::uint64_t syncs() const noexcept {
    return journal_ == nullptr ? 0 : journal_->syncs();
  }
  std::uint64_t journaled() const noexcept {
    return journaled_.load(std::memory_order_relaxed);
  }
  std::uint64_t replay_errors() const noexcept {
    return replay_errors_.load(std::memory_order_relaxed);
  }

 private:
  // Journal entries per pipelined replay batch: a few hundred microseconds
  // of Redis's time, so a slice stops close to its deadline.
  static constexpr std::size_t kReplayBatch = 64;

  // Whether a journaled settle may find its request id's #settled key
  // expired: journaled settled_ttl ago, less a margin (a tenth of it, at
  // most an hour) for a settle that ran before it was journaled (a
  // time-out) and for clocks. Replayed, it could charge a second time.
  bool stale_settle(const SettleJournal::Entry& e, Nanos now) const {
    if (e.t <= Nanos{0} || e.args.size() < 2 || e.args[1] != "settle") {
      return false;
    }
    const Nanos ttl = options_.settled_ttl;
    const Nanos margin = std::min<Nanos>(ttl / 10, std::chrono::hours(1));
    return now - e.t >= ttl - margin;
  }

  // Runs the journal in order, in pipelined batches, until it is empty or
  // (with a deadline) no batch may start after `until`. A stale settle is
  // set aside, never run. A batch's first failure (no answer, or an error
  // reply: Redis out of memory, a key of ours overwritten) stops the
  // replay there, reported; that entry and those after it stay, to run
  // again later (every line is idempotent: a batch's later entries that
  // ran already change nothing the second time).
  absl::StatusOr<std::size_t> replay_locked(
      std::optional<std::chrono::steady_clock::time_point> until)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(replay_mu_) {
    std::size_t ran = 0;
    for (;;) {
      const std::vector<const SettleJournal::Entry*> batch =
          journal_->front(kReplayBatch);
      if (batch.empty()) return ran;
      const Nanos now = unix_now(options_);
      std::size_t stale = 0;
      while (stale < batch.size() && stale_settle(*batch[stale], now)) {
        ++stale;
      }
      if (stale > 0) {
        // The stale settles at the front: set aside together, one sync.
        if (absl::Status st = journal_->set_aside(stale); !st.ok()) {
          replay_errors_.fetch_add(1, std::memory_order_relaxed);
          return st;
        }
        stale_.fetch_add(stale, std::memory_order_relaxed);
        if (until && std::chrono::steady_clock::now() >= *until) return ran;
        continue;
      }
      std::size_t n = 0;
      while (n < batch.size() && !stale_settle(*batch[n], now)) ++n;
      std::vector<std::vector<std::string_view>> views(2 * n);
      std::vector<RedisClient::EvalCall> calls(n);
      for (std::size_t i = 0; i < n; ++i) {
        views[2 * i].assign(batch[i]->keys.begin(), batch[i]->keys.end());
        views[2 * i + 1].assign(batch[i]->args.begin(), batch[i]->args.end());
        calls[i] = {views[2 * i], views[2 * i + 1]};
      }
      const std::vector<RedisClient::IntsOr> replies =
          client_->eval_pipelined(redis_script(), calls);
      std::size_t done = 0;
      while (done < n && replies[done].ok()) ++done;
      if (absl::Status st = journal_->pop(done); !st.ok()) {
        replay_errors_.fetch_add(1, std::memory_order_relaxed);
        return st;
      }
      ran += done;
      if (done < n) {
        replay_errors_.fetch_add(1, std::memory_order_relaxed);
        return replies[done].status();
      }
      if (until && std::chrono::steady_clock::now() >= *until) return ran;
    }
  }

  const std::shared_ptr<RedisClient>& client_;
  const RedisAccountantOptions& options_;
  // Set by open, then only read (the journal locks itself).
  std::unique_ptr<SettleJournal> journal_;
  // The replayer's: one at a time (a slice before a call, or replay_all).
  Mutex replay_mu_;
  std::atomic<std::uint64_t> stale_{0};
  std::atomic<std::uint64_t> journaled_{0};
  std::atomic<std::uint64_t> replay_errors_{0};
  std::atomic<std::int64_t> next_replay_{0};  // steady clock ticks
};

}  // namespace ratekeeper::detail

#endif  // RATEKEEPER_REDIS_JOURNAL_REPLAY_HPP_
