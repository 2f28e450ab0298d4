// ratekeeper/policy/token_bucket.hpp: the token bucket, as exact GCRA.
//
// Defines TokenBucket: `rate.count` tokens refill every `rate.period`, up to
// `burst` tokens. A call of cost c takes c tokens or is denied.
//
// Prefer TokenBucket unless you need counts that reset at clock-aligned
// boundaries (FixedWindow) or a smoother "last N seconds" count
// (SlidingWindow). It is the only policy with no boundary burst: in any
// interval of length t it admits at most burst + rate * t, exactly.
//
// Implemented as the generic cell rate algorithm (GCRA): the state is one
// "theoretical arrival time" (TAT), the instant at which the bucket will be
// full again. The emission interval period/count is kept as an exact
// fraction, so the TAT is an integer nanosecond plus a remainder in units of
// 1/den ns. That remainder is why the state is 16 bytes and not 8: a bucket
// at 7/s or 999/s refilled for a year has not drifted by a single token.
#ifndef RATEKEEPER_POLICY_TOKEN_BUCKET_HPP_
#define RATEKEEPER_POLICY_TOKEN_BUCKET_HPP_

#include <algorithm>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "ratekeeper/decision.hpp"
#include "ratekeeper/detail/math.hpp"
#include "ratekeeper/policy/policy.hpp"

namespace ratekeeper {

class TokenBucket {
 public:
  using i128 = detail::i128;

  // State: the TAT as tat_biased - 2^63 whole nanoseconds plus tat_frac / den
  // of a nanosecond. The bias makes the zeroed state the far past (INT64_MIN
  // ns): a bucket that is full at any time, i.e. "never seen".
  struct State {
    std::uint64_t tat_biased = 0;
    std::uint64_t tat_frac = 0;  // in [0, den)
    friend constexpr bool operator==(const State&, const State&) = default;
  };

  // Largest rate.count and burst accepted: 2^62 keeps every product of the
  // exact arithmetic inside 127 bits.
  static constexpr std::uint64_t kMaxCount = std::uint64_t{1} << 62;

  // create
  //
  // A bucket of `burst` tokens refilled at `rate`. kInvalidArgument when the
  // rate's count or the burst is zero or above kMaxCount, when the period is
  // not positive, or when refilling a whole burst would take longer than
  // INT64_MAX ns (292 years).
  static absl::StatusOr<TokenBucket> create(Rate rate, std::uint64_t burst) {
    if (rate.count == 0) {
      return absl::InvalidArgumentError(
          "TokenBucket: rate count must be positive");
    }
    if (rate.period.count() <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("TokenBucket: rate period must be positive, got ",
                       rate.period.count(), " ns"));
    }
    if (burst == 0) {
      return absl::InvalidArgumentError("TokenBucket: burst must be positive");
    }
    if (rate.count > kMaxCount || burst > kMaxCount) {
      return absl::InvalidArgumentError(
          absl::StrCat("TokenBucket: rate count and burst must be at most "
                       "2^62, got ",
                       rate.count, " and ", burst));
    }
    const auto period = static_cast<std::uint64_t>(rate.period.count());
    const std::uint64_t g = detail::gcd(period, rate.count);
    const std::uint64_t num = period / g;
    const std::uint64_t den = rate.count / g;
    // burst * (num / den) ns must fit in int64 ns.
    if (static_cast<detail::u128>(burst) * num >
        static_cast<detail::u128>(detail::kI64Max) * den) {
      return absl::InvalidArgumentError(
          absl::StrCat("TokenBucket: refilling a burst of ", burst,
                       " takes longer than 292 years at ", rate.count, " per ",
                       rate.period.count(), " ns"));
    }
    return TokenBucket(rate, burst, num, den);
  }

  // step
  //
  // Takes `cost` tokens at `now` if the bucket holds them. Pure.
  // Inlined always: the check's path (the store's apply) is this, a lookup
  // and one compare-and-swap.
  [[gnu::always_inline]] Step<State> step(const State& s, Nanos now,
                                          Cost cost) const noexcept {
    Step<State> out;
    if (unit_ && cost <= burst_ && step_unit(s, now, cost, out)) [[likely]] {
      return out;
    }
    return step_exact(s, now, cost);
  }

  // step_exact
  //
  // step() in 128-bit arithmetic throughout, for every configuration and
  // every time: what step() computes when the 64-bit path (step_unit) does
  // not apply, and the reference it is tested against. Pure.
  [[gnu::noinline]] Step<State> step_exact(const State& s, Nanos now,
                                           Cost cost) const noexcept {
    const i128 now_s = static_cast<i128>(now.count()) * den_;
    const i128 base = std::max(decode(s), now_s);
    if (cost > burst_) {
      return {s, Decision{false, burst_, remaining_at(base, now_s), kNever,
                          ceil_ns(base - now_s)}};
    }
    const i128 next = base + static_cast<i128>(cost) * num_;
    // A zero cost is always allowed, in debt too (the TAT past now + span:
    // a reservation held, a settle or a charge above what fits); then its
    // remaining is 0 and its reset_after the debt's end, as a denial's.
    if (next - now_s <= span_ || cost == 0) {
      // A zero cost changes nothing: the state stays as it was (a store then
      // has nothing to write, and a fresh key nothing to insert).
      return {cost == 0 ? s : encode(next),
              Decision{true, burst_, remaining_at(next, now_s), Nanos{0},
                       ceil_ns(next - now_s)}};
    }
    // Allowed once now' * den >= base_tat - (span - cost * num), with the
    // TAT unchanged (it is > now, since the bucket is short).
    const i128 allowed_at_s = base - (span_ - static_cast<i128>(cost) * num_);
    const i128 allowed_at = detail::ceil_div(allowed_at_s, den_);
    return {s, Decision{false, burst_, remaining_at(base, now_s),
                        Nanos{detail::clamp_i64(allowed_at - now.count())},
                        ceil_ns(base - now_s)}};
  }

  // Placement: the stretch [from, until) of the bucket's timeline that one
  // take occupies, in units of 1/den ns of the configuration it was taken
  // under (num/den ns per token, kept so that a receipt from before a
  // reconfigure() is given back at the rate it was taken at), and `mark`:
  // the key's give-back counter when it was taken (see shift()).
  struct Placement {
    i128 from = 0;
    i128 until = 0;
    std::uint64_t num = 1;
    std::uint64_t den = 1;
    std::uint64_t mark = 0;
  };

  // A give-back moves every later take's stretch earlier by the time it
  // returns (the TAT is one number): a receipt's recorded stretch is then
  // later than where its take now sits, and giving it back by the record
  // would return time that later takes hold (or that time has already
  // refilled, after a gap). So stores keep, per key, a counter of the time
  // give-backs moved later takes by (returned_ns(): a give-back of the last
  // take moves nothing), a receipt records it (`mark`), and shift() moves
  // the record by what was moved since, before it is settled. The counter
  // does not say where the moves were: one behind this take's stretch
  // (a later take given back first, with another still behind it) moves the
  // record too far, and the receipt gives back less than exact; so does a
  // counter merged or restarted (the key evicted or reclaimed). Never more.
  static constexpr bool kGiveBacksMoveLaterTakes = true;

  // The time a give-back of take `p` from `before` to `after` moved later
  // takes earlier, in ns, rounded up: what it returned, unless the take was
  // the last one (its stretch reaches the TAT: nothing is behind it to move).
  // Pure.
  std::uint64_t returned_ns(const State& before, const State& after,
                            const Placement& p) const noexcept {
    const i128 tat = decode(before);
    const i128 d = tat - decode(after);
    if (d <= 0) return 0;
    // The last take for certain: the end of its (moved) stretch is at or
    // past the TAT, compared exactly across the two configurations' units
    // (until / p.den >= tat / den_): a record only ever moves earlier, so
    // its end there means no take is behind it. (Comparing the end rounded
    // down with the TAT rounded up missed the last take whenever its end
    // fell inside a nanosecond, at a fractional rate: its give-back then
    // counted as moving later takes, and an earlier receipt gave back a
    // whole token too little.)
    if (p.den != 0 && reaches(p.until, static_cast<i128>(p.den), tat, den_)) {
      return 0;
    }
    return detail::clamp_u64(detail::ceil_div(d, den_));
  }

  // Whether a / b >= c / d, exactly, for b, d > 0 (no product of the
  // values: their whole parts first, then the remainders; b and d are a
  // configuration's den, at most 2^62 (create()), so each product of a
  // remainder and a den is below 2^124).
  static constexpr bool reaches(i128 a, i128 b, i128 c, i128 d) noexcept {
    const i128 qa = detail::floor_div(a, b), qc = detail::floor_div(c, d);
    if (qa != qc) return qa > qc;
    return (a - qa * b) * d >= (c - qc * d) * b;
  }

  // The record `p` moved earlier by `ns` of give-backs since it was taken
  // (all of its stretch: a give-back of an earlier take moves it whole).
  // Moving it too far only makes less of it outstanding. Pure.
  Placement shift(Placement p, std::uint64_t ns) const noexcept {
    const i128 by = static_cast<i128>(ns) * static_cast<i128>(p.den);
    p.from -= by;
    p.until -= by;
    return p;
  }

  // place
  //
  // Where a take of `cost` admitted at `now` from `before` sits: from the
  // later of the TAT and now, for cost tokens' worth of time. Pure.
  Placement place(const State& before, Nanos now, Cost cost) const noexcept {
    const i128 now_s = static_cast<i128>(now.count()) * den_;
    const i128 from = std::max(decode(before), now_s);
    // An admitted cost is at most the burst (2^62); a larger one (never
    // admitted) is placed as 2^62, inside 127 bits.
    return Placement{
        from, from + static_cast<i128>(std::min(cost, kMaxCount)) * num_,
        static_cast<std::uint64_t>(num_), static_cast<std::uint64_t>(den_), 0};
  }

  // settle
  //
  // Settles a take of `taken` tokens placed at `p` to `actual`.
  //
  // Below: gives back the unused tokens' time, at the rate the take was made
  // at, but only what of the take's stretch is still ahead of `now`: tokens
  // that time has already refilled are not refilled twice. So a bucket of 10
  // emptied at 0 and again at 10 s (full again by then) gets nothing back
  // from the first take's receipt at 10 s. The TAT never moves before `now`.
  //
  // Above: the excess is a debt, charged at `now` whether or not it fits
  // (the provider counted more than the estimate): the TAT moves later by
  // exactly the excess's time, so later calls wait exactly that much longer.
  // Saturates at the end of the clock's range. Pure.
  State settle(const State& s, Nanos now, const Placement& p, Cost taken,
               Cost actual) const noexcept {
    const i128 now_s = static_cast<i128>(now.count()) * den_;
    const i128 tat = decode(s);
    if (actual > taken) {
      // Saturates at the end of the clock's range: an excess that would
      // reach past it is not multiplied out (2^64 tokens at 2^63 ns each
      // exceed 127 bits).
      const i128 base = std::max(tat, now_s);
      const i128 end = static_cast<i128>(detail::kI64Max) * den_ + (den_ - 1);
      const i128 excess = static_cast<i128>(actual - taken);
      if (base >= end || excess > (end - base) / num_) return encode(end);
      return encode(base + excess * num_);
    }
    if (actual == taken || tat <= now_s || p.den == 0) return s;
    const i128 pden = static_cast<i128>(p.den);
    const i128 start = std::max(p.from, static_cast<i128>(now.count()) * pden);
    if (p.until <= start) return s;
    // (taken - actual) above 2^62 is more than any take held: clamped, so
    // the product stays inside 127 bits.
    const i128 back =
        std::min(static_cast<i128>(std::min(taken - actual, kMaxCount)) *
                     static_cast<i128>(p.num),
                 p.until - start);
    // `back` in this configuration's units, rounded down (give back less).
    i128 back_s = back;
    if (pden != den_) {
      back_s = (back / pden) * den_ + (back % pden) * den_ / pden;
    }
    return encode(std::max(tat - back_s, now_s));
  }

  // charge
  //
  // Takes `cost` tokens whether or not the bucket holds them (a denied
  // attempt that an anti-abuse limit counts): the bucket goes into debt, at
  // most one more full burst, so a key that stops hammering is admitted
  // again within 2 * burst / rate. Pure.
  State charge(const State& s, Nanos now, Cost cost) const noexcept {
    const i128 now_s = static_cast<i128>(now.count()) * den_;
    const i128 base = std::max(decode(s), now_s);
    const i128 debt =
        static_cast<i128>(std::min<Cost>(cost, 2 * burst_)) * num_;
    // The cap bounds what a charge adds; it never takes back what is
    // already counted (a settled debt, a burst lowered at run time, a
    // clock that stepped back).
    return encode(std::max(base, std::min(base + debt, now_s + 2 * span_)));
  }

  // reserve
  //
  // step(), and when step() denies a cost the bucket will hold within
  // `max_wait` (retry_after <= max_wait), the take all the same: the bucket
  // goes into debt by that wait, and the take sits on the timeline exactly
  // where a plain step at now + retry_after would have put it (place()
  // says where). The decision stays step()'s (a denial, with the exact
  // wait): the caller goes at now + retry_after, and every later take waits
  // behind it. A cost above the burst is never reserved. Pure.
  static constexpr bool kReservesExactly = true;
  Step<State> reserve(const State& s, Nanos now, Cost cost,
                      Nanos max_wait) const noexcept {
    Step<State> st = step(s, now, cost);
    if (st.decision.allowed || st.decision.never() ||
        st.decision.retry_after > max_wait) {
      return st;
    }
    const i128 now_s = static_cast<i128>(now.count()) * den_;
    const i128 base = std::max(decode(s), now_s);
    st.next = encode(base + static_cast<i128>(cost) * num_);
    return st;
  }

  // holds
  //
  // The time of the timeline a take placed at `p` holds, in whole ns
  // rounded down: a reserved take given back before its time moves every
  // later take earlier by at least this much. Pure.
  Nanos holds(const Placement& p) const noexcept {
    if (p.den == 0 || p.until <= p.from) return Nanos{0};
    return Nanos{detail::clamp_i64(
        detail::floor_div(p.until - p.from, static_cast<i128>(p.den)))};
  }

  // idle
  //
  // The bucket is full at `now`, as good as never seen.
  bool idle(const State& s, Nanos now) const noexcept {
    return decode(s) <= static_cast<i128>(now.count()) * den_;
  }

  // idle_at
  //
  // When the bucket is full again: the TAT, rounded up to the nanosecond.
  Nanos idle_at(const State& s) const noexcept {
    return Nanos{detail::clamp_i64(detail::ceil_div(decode(s), den_))};
  }

  // merge
  //
  // The emptier bucket: the later TAT.
  State merge(const State& a, const State& b) const noexcept {
    return decode(a) >= decode(b) ? a : b;
  }

  std::uint64_t limit() const noexcept { return burst_; }
  Rate rate() const noexcept { return rate_; }
  std::uint64_t burst() const noexcept { return burst_; }

 private:
  TokenBucket(Rate rate, std::uint64_t burst, std::uint64_t num,
              std::uint64_t den) noexcept
      : rate_(rate),
        burst_(burst),
        num_(static_cast<i128>(num)),
        den_(static_cast<i128>(den)),
        span_(static_cast<i128>(burst) * static_cast<i128>(num)),
        unit_(den == 1),
        num64_(num),
        span64_(den == 1 ? static_cast<std::int64_t>(burst * num) : 0),
        inv_num_(num) {}

  // tat_biased holds TAT - INT64_MIN: flipping the top bit converts.
  static constexpr std::uint64_t kBias = std::uint64_t{1} << 63;

  // step_unit: step() in 64-bit arithmetic, for the usual configuration, a
  // whole number of ns per token (den == 1: the fraction is always 0), and a
  // cost within the burst. span = burst * num fits in int64 (create()
  // checks), so cost * num does too; a TAT or a time near the ends of the
  // clock's range, where a sum or difference would overflow, returns false
  // (`out` unset) and the caller takes step_exact(). The results are
  // step_exact()'s, bit for bit (token_bucket_test checks them against an
  // independent 128-bit model). Pure. Inlined always, and the result written
  // through `out`: a Step returned in memory from a call is read back with
  // wider loads than it was written with, which stalls store forwarding (perf
  // annotate).
  [[gnu::always_inline]] bool step_unit(const State& s, Nanos now, Cost cost,
                                        Step<State>& out) const noexcept {
    // decode() with den == 1: the whole part; the fraction clamps to 0.
    const auto tat = static_cast<std::int64_t>(s.tat_biased ^ kBias);
    const std::int64_t t = now.count();
    const std::int64_t base = std::max(tat, t);
    std::int64_t lead = 0;  // base - now, >= 0
    if (__builtin_sub_overflow(base, t, &lead)) [[unlikely]] {
      return false;
    }
    // cost <= burst, so cost * num <= span <= INT64_MAX.
    const auto need = static_cast<std::int64_t>(cost * num64_);
    const std::int64_t room = span64_ - need;  // >= 0
    if (lead <= room) [[likely]] {
      std::int64_t next = 0;
      if (__builtin_add_overflow(base, need, &next)) [[unlikely]] {
        return false;
      }
      const std::int64_t ahead = lead + need;  // next - now, <= span
      // Whole tokens left: (span - ahead) / num, span - ahead >= 0.
      const std::uint64_t left =
          inv_num_(static_cast<std::uint64_t>(span64_ - ahead));
      out.next =
          cost == 0 ? s : State{static_cast<std::uint64_t>(next) ^ kBias, 0};
      out.decision = Decision{true, burst_, left, Nanos{0}, Nanos{ahead}};
      return true;
    }
    // Denied: allowed once now reaches base - room; the wait is lead - room
    // (> 0). What is left at base: (span - lead) / num when positive.
    const std::int64_t gap = span64_ - lead;
    const std::uint64_t left =
        gap <= 0 ? 0 : inv_num_(static_cast<std::uint64_t>(gap));
    out.next = s;
    // A zero cost in debt (lead > span): allowed, nothing counted.
    out.decision =
        cost == 0
            ? Decision{true, burst_, left, Nanos{0}, Nanos{lead}}
            : Decision{false, burst_, left, Nanos{lead - room}, Nanos{lead}};
    return true;
  }

  // The TAT in units of 1/den ns.
  i128 decode(const State& s) const noexcept {
    const auto whole =
        static_cast<i128>(s.tat_biased) + static_cast<i128>(detail::kI64Min);
    // The remainder is below den_ for every state this bucket wrote; one
    // written before reconfigure() under another den is clamped (< 1 ns).
    const i128 frac = std::min(static_cast<i128>(s.tat_frac), den_ - 1);
    return whole * den_ + frac;
  }

  // Saturates past INT64_MAX ns (the bucket then stays empty until the end of
  // the clock's range: the conservative side).
  State encode(i128 tat) const noexcept {
    // den == 1 (a whole number of ns per token, the common case): no division.
    i128 whole = den_ == 1 ? tat : detail::floor_div(tat, den_);
    i128 frac = den_ == 1 ? 0 : tat - whole * den_;
    if (whole > detail::kI64Max) {
      whole = detail::kI64Max;
      frac = den_ - 1;
    }
    return State{static_cast<std::uint64_t>(whole - detail::kI64Min),
                 static_cast<std::uint64_t>(frac)};
  }

  // Whole tokens in the bucket when the TAT is `tat` (both scaled).
  std::uint64_t remaining_at(i128 tat, i128 now_s) const noexcept {
    const i128 room = span_ - (tat - now_s);
    if (room <= 0) return 0;
    // room fits 64 bits in every call but a huge burst's: one multiply.
    if ((room >> 64) == 0) return inv_num_(static_cast<std::uint64_t>(room));
    return detail::clamp_u64(detail::div_pos(room, num_));
  }

  Nanos ceil_ns(i128 scaled) const noexcept {
    if (scaled <= 0) return Nanos{0};
    if (den_ == 1) return Nanos{detail::clamp_i64(scaled)};
    return Nanos{detail::clamp_i64(detail::ceil_div(scaled, den_))};
  }

  Rate rate_;
  std::uint64_t burst_;
  i128 num_;  // emission interval = num_ / den_ ns, in lowest terms
  i128 den_;
  i128 span_;  // burst * num_: a full bucket's TAT lead, scaled by den_
  // For step_unit(): den == 1, and num and span in 64 bits (span only then).
  bool unit_;
  std::uint64_t num64_;
  std::int64_t span64_;
  detail::DivBy inv_num_;  // x / num_ by multiplication
};

static_assert(Policy<TokenBucket>);
static_assert(ChargingPolicy<TokenBucket>);
static_assert(sizeof(TokenBucket::State) == 16);

}  // namespace ratekeeper

#endif  // RATEKEEPER_POLICY_TOKEN_BUCKET_HPP_
