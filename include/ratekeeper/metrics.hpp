// ratekeeper/metrics.hpp: what each limit of a chain decided, counted.
//
// Defines LimitCounts (a snapshot) and LimitMetrics (the counters a Limit
// keeps). Counting costs one uncontended atomic add per limit per call: the
// counters are striped over cache lines by thread, so that threads deciding
// on different keys of one limit do not fight over one line.
//
// Render them with ratekeeper/prometheus.hpp.
#ifndef RATEKEEPER_METRICS_HPP_
#define RATEKEEPER_METRICS_HPP_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <thread>

namespace ratekeeper {

// LimitCounts: a limit's outcomes since construction. Each call of a chain
// adds one to exactly one of the first four for every limit it evaluates;
// errors and near-limit events are counted besides.
struct LimitCounts {
  std::uint64_t allowed = 0;        // admitted, and the whole chain went ahead
  std::uint64_t denied = 0;         // refused by this limit (enforced)
  std::uint64_t shadow_denied = 0;  // this shadow limit would have refused
  std::uint64_t vetoed = 0;         // admitted here, refused by another limit
  std::uint64_t errors = 0;         // no decision: bad key, store failure
  std::uint64_t near_limit = 0;     // allowed with remaining at or below the
                                    // limit's near-limit threshold

  friend constexpr bool operator==(const LimitCounts&,
                                   const LimitCounts&) = default;
};

// LimitStatistics: everything a limit counts and reports
// (Limit::statistics()), .NET's RateLimiterStatistics for one limit: what
// prometheus_text() writes for it, read once. Per-key figures (a key's
// remaining, its reset) are a peek: Limit::peek(key, 0, now).
struct LimitStatistics {
  LimitCounts counts;                  // chains' outcomes (above)
  std::uint64_t given_back = 0;        // receipts settled below their take
  std::uint64_t given_back_units = 0;  // units those settles asked back
  std::uint64_t listener_errors = 0;   // exceptions listeners threw
  std::uint64_t capacity = 0;          // the limit now, in its unit
  bool shadow = false;                 // in shadow mode now
  std::uint64_t keys = 0;              // keys it holds now (keys_held)

  friend constexpr bool operator==(const LimitStatistics&,
                                   const LimitStatistics&) = default;
};

// LimitMetrics: LimitCounts kept by a Limit. Thread-safe; snapshot() is a
// sum over stripes, each counter exact once the calls it counts returned.
class LimitMetrics {
 public:
  enum Counter : std::size_t {
    kAllowed,
    kDenied,
    kShadowDenied,
    kVetoed,
    kErrors,
    kNearLimit,
    // Issue 17: give-backs and listener failures, counted by PolicyLimit.
    kGivenBack,       // receipts settled below their take
    kGivenBackUnits,  // the units those settles asked back (taken - actual)
    kListenerErrors,  // exceptions a listener threw (listener.hpp)
    kCounters
  };

  void add(Counter c, std::uint64_t n = 1) noexcept {
    stripes_[stripe()].n[c].fetch_add(n, std::memory_order_relaxed);
  }

  // record_error
  //
  // Counts a call this limit could not decide (a malformed key, a store that
  // failed). Callers building keys themselves report their failures here.
  void record_error() noexcept { add(kErrors); }

  LimitCounts snapshot() const noexcept {
    std::uint64_t sum[kCounters] = {};
    for (const Stripe& s : stripes_) {
      for (std::size_t i = 0; i < kCounters; ++i) {
        sum[i] += s.n[i].load(std::memory_order_relaxed);
      }
    }
    return LimitCounts{sum[kAllowed], sum[kDenied], sum[kShadowDenied],
                       sum[kVetoed],  sum[kErrors], sum[kNearLimit]};
  }

  // One counter's total over the stripes (exact once the calls it counts
  // returned).
  std::uint64_t total(Counter c) const noexcept {
    std::uint64_t sum = 0;
    for (const Stripe& s : stripes_) {
      sum += s.n[c].load(std::memory_order_relaxed);
    }
    return sum;
  }

 private:
  static constexpr std::size_t kStripes = 8;
  struct alignas(64) Stripe {
    std::atomic<std::uint64_t> n[kCounters] = {};
  };

  static std::size_t stripe() noexcept {
    thread_local const std::size_t s =
        std::hash<std::thread::id>{}(std::this_thread::get_id()) % kStripes;
    return s;
  }

  Stripe stripes_[kStripes];
};

}  // namespace ratekeeper

#endif  // RATEKEEPER_METRICS_HPP_
