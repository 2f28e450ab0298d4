// ratekeeper/policy/sliding_window.hpp: the two-window weighted counter.
//
// Defines SlidingWindow: an estimate of the units taken in the last `period`,
// kept at most `rate.count`. The estimate is the count of the current aligned
// window plus the previous window's count weighted by the share of the
// previous window that the sliding window still covers:
//
//   estimate(now) = prev * (period - e) / period + cur,  e = now - window start
//
// A call of cost c is admitted when estimate + c <= limit, computed exactly in
// integers (no rounding). Guarantees, each tested:
//   - at most `limit` units in every aligned window;
//   - at most 2 * limit - 1 units in any sliding window of length `period`:
//     the weighting assumes the previous window's units were spread evenly, and
//     a burst at the very end of one window followed by one in the next is the
//     worst case (limit at the end, then limit - 1 before e reaches period).
//
// Prefer SlidingWindow for "N per rolling minute" without FixedWindow's reset
// cliff and in 16 bytes per key. Prefer TokenBucket when the bound must hold
// in every interval exactly. Limits are at most 2^32 - 2 per window (two
// 32-bit counts share the state with a 64-bit window index).
#ifndef RATEKEEPER_POLICY_SLIDING_WINDOW_HPP_
#define RATEKEEPER_POLICY_SLIDING_WINDOW_HPP_

#include <algorithm>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "ratekeeper/decision.hpp"
#include "ratekeeper/detail/math.hpp"
#include "ratekeeper/detail/validate.hpp"
#include "ratekeeper/policy/policy.hpp"

namespace ratekeeper {

class SlidingWindow {
 public:
  // State: the current aligned window's index, the previous window's count
  // and the current one's. Zeroed: nothing counted, "never seen".
  struct State {
    std::int64_t window = 0;
    std::uint32_t prev = 0;
    std::uint32_t cur = 0;
    friend constexpr bool operator==(const State&, const State&) = default;
  };

  // Largest count per window: 2^32 - 2, so that it fits a 32-bit count that
  // never has all bits set (the all-ones State is reserved for stores, see
  // policy.hpp).
  static constexpr std::uint64_t kMaxLimit = 0xFFFF'FFFEu;

  // create
  //
  // At most `rate.count` units per sliding `rate.period`. kInvalidArgument
  // when the count is zero or above kMaxLimit, or the period is not positive.
  // Windows are aligned to the clock: a key's state names a window index,
  // so a limit's period cannot change under existing states.
  static constexpr bool kWindowAligned = true;

  static absl::StatusOr<SlidingWindow> create(Rate rate) {
    if (absl::Status st = detail::check_window_rate(
            "SlidingWindow", rate, kMaxLimit, "2^32 - 2",
            " (use TokenBucket or FixedWindow for larger counts)");
        !st.ok()) {
      return st;
    }
    return SlidingWindow(rate);
  }

  // step
  //
  // Counts `cost` in the current window if the estimate allows it. When the
  // clock is behind the state's window (it stepped back), time is taken as
  // the start of the state's window, where the estimate is highest: a
  // backward step never frees capacity. Pure.
  Step<State> step(const State& s, Nanos now, Cost cost) const noexcept {
    const View v = view(s, now);
    const std::uint64_t rem = remaining(v);
    if (cost > limit_) {
      return {s, Decision{false, limit_, rem, kNever, reset_after(v, now)}};
    }
    if (cost <= rem) {
      View after = v;
      after.st.cur = static_cast<std::uint32_t>(v.st.cur + cost);
      // A zero cost changes nothing: the state stays as it was.
      return {cost == 0 ? s : after.st,
              Decision{true, limit_, remaining(after), Nanos{0},
                       reset_after(after, now)}};
    }
    return {s, Decision{false, limit_, rem, retry_after(v, now, cost),
                        reset_after(v, now)}};
  }

  // Placement: the index of the aligned window a take was counted in.
  struct Placement {
    std::int64_t window = 0;
  };

  // place
  //
  // The window a take admitted at `now` from `before` counts in (the
  // state's own when the clock is behind it). Pure.
  Placement place(const State& before, Nanos now,
                  Cost /*cost*/) const noexcept {
    return Placement{view(before, now).st.window};
  }

  // settle
  //
  // Below `taken`: takes the unused units (at most what is counted) off the
  // count of the take's window if that is the state's current or previous
  // window (the previous one's count still weighs on the estimate);
  // otherwise nothing is given back, as while the clock is behind the
  // state's window. Above: the excess counts in now's window whether or not
  // it fits (a debt that weighs on the estimate for the next window too),
  // saturating at kMaxLimit. Pure.
  State settle(const State& s, Nanos now, const Placement& p, Cost taken,
               Cost actual) const noexcept {
    if (actual > taken) return charge(s, now, actual - taken);
    const View v = view(s, now);
    if (v.behind) return s;
    State out = v.st;
    const Cost back = taken - actual;
    if (p.window == out.window) {
      out.cur -= static_cast<std::uint32_t>(std::min<Cost>(back, out.cur));
    } else if (static_cast<i128>(p.window) ==
               static_cast<i128>(out.window) - 1) {
      out.prev -= static_cast<std::uint32_t>(std::min<Cost>(back, out.prev));
    }
    return out;
  }

  // charge
  //
  // Counts `cost` in now's window whether or not it fits (a denied attempt
  // that an anti-abuse limit counts), saturating at kMaxLimit. The excess
  // weighs on the estimate for at most the next window: a key hammering a
  // full limit stays denied while it hammers, and for at most two windows
  // after. Pure.
  State charge(const State& s, Nanos now, Cost cost) const noexcept {
    const View v = view(s, now);
    State out = v.st;
    const std::uint64_t cur = out.cur;
    out.cur = static_cast<std::uint32_t>(cost >= kMaxLimit - cur ? kMaxLimit
                                                                 : cur + cost);
    return out;
  }

  // idle
  //
  // The estimate is zero at `now` and stays zero.
  bool idle(const State& s, Nanos now) const noexcept {
    const View v = view(s, now);
    return v.st.prev == 0 && v.st.cur == 0;
  }

  // idle_at
  //
  // The end of the next window when the current one counts anything, the end
  // of the current one when only the previous does, else Nanos::min().
  Nanos idle_at(const State& s) const noexcept {
    const i128 start = static_cast<i128>(s.window) * period_;
    if (s.cur != 0) return Nanos{detail::clamp_i64(start + 2 * i128{period_})};
    if (s.prev != 0) return Nanos{detail::clamp_i64(start + period_)};
    return Nanos::min();
  }

  // merge
  //
  // Both states rolled to the later window, then the larger of each count.
  State merge(const State& a, const State& b) const noexcept {
    const std::int64_t w = std::max(a.window, b.window);
    const State ra = roll_to(a, w);
    const State rb = roll_to(b, w);
    return State{w, std::max(ra.prev, rb.prev), std::max(ra.cur, rb.cur)};
  }

  std::uint64_t limit() const noexcept { return limit_; }
  Rate rate() const noexcept { return rate_; }

 private:
  using i128 = detail::i128;

  // The state rolled forward to now's window, and now's offset in it.
  struct View {
    State st;
    i128 start;   // start of st.window, ns
    i128 e;       // now - start, clamped to 0 when the clock is behind
    bool behind;  // the clock is before st.window
  };

  explicit SlidingWindow(Rate rate) noexcept
      : rate_(rate), limit_(rate.count), period_(rate.period.count()) {}

  std::int64_t window_of(Nanos t) const noexcept {
    return detail::floor_div_i64(t.count(), period_);
  }

  // `s` as seen from window `w` >= s.window. The gap is computed in 128
  // bits: the difference of two int64 window indices can overflow 64.
  static State roll_to(const State& s, std::int64_t w) noexcept {
    const i128 gap = static_cast<i128>(w) - s.window;
    if (gap == 0) return s;
    return State{w, gap == 1 ? s.cur : 0u, 0u};
  }

  View view(const State& s, Nanos now) const noexcept {
    const std::int64_t w = window_of(now);
    View v{s, 0, 0, false};
    if (w > s.window) v.st = roll_to(s, w);
    v.start = static_cast<i128>(v.st.window) * period_;
    const i128 e = static_cast<i128>(now.count()) - v.start;
    v.behind = e < 0;
    v.e = v.behind ? 0 : e;
    return v;
  }

  // limit * period - prev * (period - e) - cur * period, scaled by period.
  i128 room(const View& v) const noexcept {
    return static_cast<i128>(limit_) * period_ -
           static_cast<i128>(v.st.prev) * (period_ - v.e) -
           static_cast<i128>(v.st.cur) * period_;
  }

  std::uint64_t remaining(const View& v) const noexcept {
    const i128 r = room(v);
    return r <= 0 ? 0 : detail::clamp_u64(detail::div_pos(r, period_));
  }

  Nanos reset_after(const View& v, Nanos now) const noexcept {
    i128 until = 0;
    if (v.st.cur != 0) {
      until = v.start + 2 * static_cast<i128>(period_);
    } else if (v.st.prev != 0) {
      until = v.start + period_;
    } else {
      return Nanos{0};
    }
    return Nanos{detail::clamp_i64(until - now.count())};
  }

  // The exact wait until `cost` (<= limit) fits, nothing else happening.
  Nanos retry_after(const View& v, Nanos now, Cost cost) const noexcept {
    const i128 p = period_;
    const i128 prev = v.st.prev;
    const i128 cur = v.st.cur;
    const i128 c = static_cast<i128>(cost);
    const i128 l = static_cast<i128>(limit_);
    i128 at = 0;  // absolute time, ns
    bool found = false;
    // In this window: prev * (p - e') <= (l - cur - c) * p.
    const i128 r = l - cur - c;
    if (r >= 0 && prev > 0) {
      const i128 e_min = p - detail::floor_div(r * p, prev);
      if (e_min <= p - 1) {
        at = v.start + std::max(e_min, v.e);
        found = true;
      }
    }
    if (!found) {
      // Next window: prev' = cur, cur' = 0: cur * (p - e') <= (l - c) * p.
      i128 e_next = 0;
      if (cur > 0)
        e_next = std::max<i128>(0, p - detail::floor_div((l - c) * p, cur));
      at = v.start + p + e_next;
    }
    return Nanos{detail::clamp_i64(at - now.count())};
  }

  Rate rate_;
  std::uint64_t limit_;
  std::int64_t period_;
};

static_assert(Policy<SlidingWindow>);
static_assert(ChargingPolicy<SlidingWindow>);
static_assert(sizeof(SlidingWindow::State) == 16);

}  // namespace ratekeeper

#endif  // RATEKEEPER_POLICY_SLIDING_WINDOW_HPP_
