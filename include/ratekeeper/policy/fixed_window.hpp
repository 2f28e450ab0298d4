// ratekeeper/policy/fixed_window.hpp: a count per clock-aligned window.
//
// Defines FixedWindow: at most `rate.count` units in each window
// [k * period, (k + 1) * period) of the clock, the count starting again at 0
// at each boundary.
//
// Prefer FixedWindow when the limit is stated per calendar-like window ("100
// per minute, resetting on the minute") and callers expect resets at
// predictable instants. Its known weakness: up to 2 * count can pass in a
// short span straddling a boundary. Prefer TokenBucket when that matters.
#ifndef RATEKEEPER_POLICY_FIXED_WINDOW_HPP_
#define RATEKEEPER_POLICY_FIXED_WINDOW_HPP_

#include <algorithm>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "ratekeeper/decision.hpp"
#include "ratekeeper/detail/math.hpp"
#include "ratekeeper/detail/validate.hpp"
#include "ratekeeper/policy/policy.hpp"

namespace ratekeeper {

class FixedWindow {
 public:
  // State: the window index floor(now / period) and the units counted in it.
  // Zeroed: window 0 with nothing counted, which is "never seen" at any time.
  struct State {
    std::int64_t window = 0;
    std::uint64_t count = 0;
    friend constexpr bool operator==(const State&, const State&) = default;
  };

  // Largest count per window: 2^62, so that a count never has all bits set
  // (the all-ones State is reserved for stores, see policy.hpp).
  static constexpr std::uint64_t kMaxLimit = std::uint64_t{1} << 62;

  // create
  //
  // `rate.count` units per window of `rate.period`. kInvalidArgument when the
  // count is zero or above kMaxLimit, or the period is not positive.
  // Windows are aligned to the clock: a key's state names a window index,
  // so a limit's period cannot change under existing states.
  static constexpr bool kWindowAligned = true;

  static absl::StatusOr<FixedWindow> create(Rate rate) {
    if (absl::Status st =
            detail::check_window_rate("FixedWindow", rate, kMaxLimit, "2^62");
        !st.ok()) {
      return st;
    }
    return FixedWindow(rate);
  }

  // step
  //
  // Counts `cost` in now's window if it fits. When the clock is behind the
  // state's window (it stepped back), the state's window stays current: its
  // count is kept, so a backward step never frees capacity. Pure.
  Step<State> step(const State& s, Nanos now, Cost cost) const noexcept {
    State cur = current(s, now);
    const Nanos until_end = window_end(cur.window, now);
    const Nanos reset = cur.count == 0 ? Nanos{0} : until_end;
    // The count can exceed the limit: after a charged rejection (charge()),
    // or a limit lowered at run time (docs/chains.md).
    const std::uint64_t room = cur.count >= limit_ ? 0 : limit_ - cur.count;
    if (cost > limit_) {
      return {s, Decision{false, limit_, room, kNever, reset}};
    }
    if (cost <= room) {
      cur.count += cost;
      // A zero cost changes nothing: the state stays as it was.
      return {cost == 0 ? s : cur,
              Decision{true, limit_, room - cost, Nanos{0},
                       cur.count == 0 ? Nanos{0} : until_end}};
    }
    // The next window starts empty and cost <= limit fits there.
    return {s, Decision{false, limit_, room, until_end, reset}};
  }

  // charge
  //
  // Counts `cost` in now's window whether or not it fits (a denied attempt
  // that an anti-abuse limit counts), saturating at kMaxLimit. The excess
  // lasts until the window ends: a key hammering a full window stays denied
  // until then, and no longer. Pure.
  State charge(const State& s, Nanos now, Cost cost) const noexcept {
    State cur = current(s, now);
    cur.count = cost >= kMaxLimit - cur.count ? kMaxLimit : cur.count + cost;
    return cur;
  }

  // Placement: the index of the window a take was counted in.
  struct Placement {
    std::int64_t window = 0;
  };

  // place
  //
  // The window a take admitted at `now` from `before` counts in (the
  // state's own when the clock is behind it). Pure.
  Placement place(const State& before, Nanos now,
                  Cost /*cost*/) const noexcept {
    return Placement{current(before, now).window};
  }

  // settle
  //
  // Below `taken`: takes the unused units (at most what is counted) off the
  // take's window, if that window is still the state's window; a window
  // already closed is over, and its count is not given back. Above: the
  // excess counts in now's window whether or not it fits (a debt until that
  // window ends), saturating at kMaxLimit. Pure.
  State settle(const State& s, Nanos now, const Placement& p, Cost taken,
               Cost actual) const noexcept {
    if (actual > taken) return charge(s, now, actual - taken);
    if (p.window != s.window) return s;
    return State{s.window, s.count - std::min(taken - actual, s.count)};
  }

  // idle
  //
  // Nothing is counted in now's window.
  bool idle(const State& s, Nanos now) const noexcept {
    return s.count == 0 || window_of(now) > s.window;
  }

  // idle_at
  //
  // The end of the state's window, or never-busy (Nanos::min()) when nothing
  // is counted.
  Nanos idle_at(const State& s) const noexcept {
    if (s.count == 0) return Nanos::min();
    return Nanos{
        detail::clamp_i64((static_cast<detail::i128>(s.window) + 1) * period_)};
  }

  // merge
  //
  // The later window's state; in the same window, the larger count.
  State merge(const State& a, const State& b) const noexcept {
    if (a.window != b.window) return a.window > b.window ? a : b;
    return a.count >= b.count ? a : b;
  }

  std::uint64_t limit() const noexcept { return limit_; }
  Rate rate() const noexcept { return rate_; }

 private:
  explicit FixedWindow(Rate rate) noexcept
      : rate_(rate), limit_(rate.count), period_(rate.period.count()) {}

  // `s` seen from now's window: empty when now is in a later window; kept
  // when the clock is behind it (a backward step never frees capacity).
  State current(const State& s, Nanos now) const noexcept {
    const std::int64_t w = window_of(now);
    return w > s.window ? State{w, 0} : s;
  }

  std::int64_t window_of(Nanos t) const noexcept {
    return detail::floor_div_i64(t.count(), period_);
  }

  // Time from `now` to the end of window `w`, saturated.
  Nanos window_end(std::int64_t w, Nanos now) const noexcept {
    const detail::i128 end = (static_cast<detail::i128>(w) + 1) * period_;
    return Nanos{detail::clamp_i64(end - now.count())};
  }

  Rate rate_;
  std::uint64_t limit_;
  std::int64_t period_;
};

static_assert(Policy<FixedWindow>);
static_assert(ChargingPolicy<FixedWindow>);
static_assert(sizeof(FixedWindow::State) == 16);

}  // namespace ratekeeper

#endif  // RATEKEEPER_POLICY_FIXED_WINDOW_HPP_
