// ratekeeper/redis/lease.hpp: RedisLease, quota leasing over a Redis limit.
#ifndef RATEKEEPER_REDIS_LEASE_HPP_
#define RATEKEEPER_REDIS_LEASE_HPP_

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
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "ratekeeper/chain.hpp"
#include "ratekeeper/redis/limit_base.hpp"

namespace ratekeeper {

// RedisLease: quota leasing. Serves one key of a Redis limit in process
// from tokens taken from Redis `batch` at a time (one round trip per batch
// instead of per call). A batch is a take with its receipt, and the lease
// serves its tokens only while they are still the take's by Redis's clock:
// within the window (or budget period) it was taken in, and for a token
// bucket only the tokens of its stretch of the timeline that time has not
// yet refilled (the held tokens are the stretch's tail). So what the lease
// serves plus what others take never exceeds the limit: no over-admission,
// in any window or interval. Redis's time at a serve is bounded above by
// the take's Redis time plus the steady time since the take was sent, so a
// lease stops serving a window early rather than late. The unused rest is
// returned with the receipt (settled to what was served) when released or
// destroyed, given back only as far as it is still outstanding. The cost is
// fairness: tokens one instance holds unused (at most `batch` per instance)
// are unavailable to the others until it releases them. A batch Redis
// refuses is retried as the exact cost, so a nearly spent limit still
// serves what fits. When Redis cannot answer, the limit's fail mode answers
// each call (nothing is held). Thread-safe.
class RedisLease {
 public:
  RedisLease(RedisLimitBase& limit, std::string key, Cost batch)
      : limit_(limit), key_(std::move(key)), batch_(batch == 0 ? 1 : batch) {}
  RedisLease(const RedisLease&) = delete;
  RedisLease& operator=(const RedisLease&) = delete;
  ~RedisLease() { static_cast<void>(release()); }

  // acquire
  //
  // Served from the lease when it still holds `cost` valid now; else one
  // round trip takes another batch (or the cost alone). A refusal is
  // Redis's decision. `test_now` (tests, a limit with test_time): the time
  // of this call, as Redis's.
  Decision acquire(Cost cost, std::optional<Nanos> test_now = std::nullopt) {
    detail::MutexLock lock(&mu_);
    const auto steady_now = std::chrono::steady_clock::now();
    trim(steady_now, test_now);
    if (cost <= held_) {
      held_ -= cost;
      return Decision{true, limit_.limit(), held_, Nanos{0}, Nanos{0}};
    }
    // Refused a moment ago: the same answer, without asking Redis again
    // before the wait it stated is over (on the test time when one is
    // given).
    if (test_now) {
      if (*test_now < blocked_test_) {
        return Decision{false, limit_.limit(), held_, blocked_test_ - *test_now,
                        Nanos{0}};
      }
    } else if (steady_now < blocked_until_) {
      return Decision{
          false, limit_.limit(), held_,
          std::chrono::duration_cast<Nanos>(blocked_until_ - steady_now),
          Nanos{0}};
    }
    // Take what is missing, rounded up to a batch; or just that. What the
    // lease holds now serves the rest of this call, so the old receipt is
    // then used up to what time left of it.
    const Cost need = cost - held_;
    const Cost want = std::max(batch_, need);
    const Cost takes[2] = {want, need};
    const int tries = want == need ? 1 : 2;
    const Nanos now = test_now.value_or(std::chrono::duration_cast<Nanos>(
        std::chrono::system_clock::now().time_since_epoch()));
    for (int i = 0; i < tries; ++i) {
      const Cost take = takes[i];
      Receipt r;
      const auto sent = std::chrono::steady_clock::now();
      const Decision d = limit_.take(key_, take, now, r);
      ++round_trips_;
      if (d.allowed) {
        if (r.issuer() != &limit_) {
          // The fail mode answered: serve this call alone, hold nothing
          // (a kLocal receipt is settled to the cost at once).
          if (r) static_cast<void>(limit_.settle(r, need, now));
          held_ = 0;
          return Decision{true, limit_.limit(), held_, Nanos{0}, Nanos{0}};
        }
        // The old batch is spent: what it held serves this call; what time
        // took back of it is gone, nothing to give back.
        receipt_ = std::move(r);
        taken_ = take;
        sent_ = sent;
        held_ = take - need;
        return Decision{true, limit_.limit(), held_, Nanos{0}, Nanos{0}};
      }
      if (i == tries - 1) {
        if (d.retry_after != kNever && test_now) {
          blocked_test_ = *test_now + d.retry_after;
        } else if (d.retry_after != kNever) {
          blocked_until_ =
              steady_now +
              std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                  d.retry_after);
        }
        return d;
      }
    }
    return Decision{false, limit_.limit(), 0, kNever, Nanos{0}};
  }

  // release
  //
  // Returns the unused rest through the receipt (settled to what was
  // served: given back only as far as it is still outstanding by Redis's
  // clock). The status of that settle (kUnavailable: see
  // RedisLimit::settle; a receipt not sent is kept, to be released again).
  absl::Status release(std::optional<Nanos> test_now = std::nullopt) {
    detail::MutexLock lock(&mu_);
    if (!receipt_) {
      held_ = 0;
      return absl::OkStatus();
    }
    trim(std::chrono::steady_clock::now(), test_now);
    const Nanos now = test_now.value_or(std::chrono::duration_cast<Nanos>(
        std::chrono::system_clock::now().time_since_epoch()));
    absl::StatusOr<Decision> left =
        limit_.settle(receipt_, taken_ - held_, now);
    if (!receipt_) held_ = 0;
    return left.ok() ? absl::OkStatus() : left.status();
  }

  // What the lease holds and may still serve (as of its last call).
  Cost held() const {
    detail::MutexLock lock(&mu_);
    return held_;
  }
  std::uint64_t round_trips() const {
    detail::MutexLock lock(&mu_);
    return round_trips_;
  }

 private:
  // Drops what the receipt can no longer serve at Redis's time (bounded
  // above: the take's Redis time plus the steady time since it was sent).
  void trim(std::chrono::steady_clock::time_point steady_now,
            std::optional<Nanos> test_now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (!receipt_ || held_ == 0) return;
    const Nanos t = test_now.value_or(
        receipt_.at() + std::chrono::duration_cast<Nanos>(steady_now - sent_) +
        Nanos{1'000});
    held_ = limit_.still_served(receipt_, held_, t);
  }

  RedisLimitBase& limit_;
  const std::string key_;
  const Cost batch_;
  mutable detail::Mutex mu_;
  Receipt receipt_ ABSL_GUARDED_BY(mu_);
  Cost taken_ ABSL_GUARDED_BY(mu_) = 0;
  Cost held_ ABSL_GUARDED_BY(mu_) = 0;
  std::chrono::steady_clock::time_point sent_ ABSL_GUARDED_BY(mu_){};
  std::uint64_t round_trips_ ABSL_GUARDED_BY(mu_) = 0;
  std::chrono::steady_clock::time_point blocked_until_ ABSL_GUARDED_BY(mu_){};
  Nanos blocked_test_ ABSL_GUARDED_BY(mu_){Nanos::min()};
};

}  // namespace ratekeeper

#endif  // RATEKEEPER_REDIS_LEASE_HPP_
