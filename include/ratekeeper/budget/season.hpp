// ratekeeper/budget/season.hpp: a weekly profile of demand.
//
// Defines WeeklyProfile: one weight per hour of the week (168, Monday 00:00
// first, in UTC shifted by a fixed offset), normalised to a mean of 1, so a
// flat profile weighs every hour 1. mass(from, to) is the weighted length of
// [from, to) in hours: what share of a week's demand falls in it, in units
// of an average hour. The forecast learns a profile from settlements
// (forecast.hpp); the pacing limit spreads what is left of a budget over
// what is left of its period by it (pacing.hpp).
//
//   WeeklyProfile p = WeeklyProfile::flat();
//   double hours = p.mass(now, period_end);  // flat: (end - now) / 1h
#ifndef RATEKEEPER_BUDGET_SEASON_HPP_
#define RATEKEEPER_BUDGET_SEASON_HPP_

#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <span>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "ratekeeper/decision.hpp"

namespace ratekeeper {

class WeeklyProfile {
 public:
  static constexpr std::size_t kHours = 168;
  static constexpr std::int64_t kHourNs = 3'600'000'000'000;
  static constexpr std::int64_t kWeekNs = kHourNs * 168;

  // Every hour weighs 1.
  static WeeklyProfile flat() {
    WeeklyProfile p;
    p.w_.fill(1.0);
    p.prefix();
    return p;
  }

  // from_weights
  //
  // 168 weights, Monday 00:00-01:00 first, each finite and >= 0, their sum
  // > 0; scaled to a mean of 1. `utc_offset` shifts the week (+01:00 for
  // Paris in winter: Monday 00:00 there is Sunday 23:00 UTC).
  // kInvalidArgument otherwise.
  static absl::StatusOr<WeeklyProfile> from_weights(
      std::span<const double> weights,
      std::chrono::minutes utc_offset = std::chrono::minutes{0}) {
    if (weights.size() != kHours) {
      return absl::InvalidArgumentError(absl::StrCat(
          "WeeklyProfile: ", weights.size(), " weights, expected 168"));
    }
    if (utc_offset <= std::chrono::minutes{-24 * 60} ||
        utc_offset >= std::chrono::minutes{24 * 60}) {
      return absl::InvalidArgumentError(
          "WeeklyProfile: the UTC offset must be within a day");
    }
    double sum = 0;
    for (const double w : weights) {
      if (!std::isfinite(w) || w < 0) {
        return absl::InvalidArgumentError(
            "WeeklyProfile: weights must be finite and non-negative");
      }
      sum += w;
    }
    if (!(sum > 0) || !std::isfinite(sum)) {
      return absl::InvalidArgumentError(
          "WeeklyProfile: the weights must have a positive finite sum");
    }
    WeeklyProfile p;
    for (std::size_t i = 0; i < kHours; ++i) {
      p.w_[i] = weights[i] * static_cast<double>(kHours) / sum;
    }
    p.offset_ns_ = std::chrono::duration_cast<Nanos>(utc_offset).count();
    p.prefix();
    return p;
  }

  // The hour of the week of Unix time `t` (0: Monday 00:00 in the profile's
  // offset).
  std::size_t hour_of(Nanos t) const noexcept {
    return static_cast<std::size_t>(week_pos(t.count()) / kHourNs);
  }

  // The weight of the hour holding `t`.
  double weight(Nanos t) const noexcept { return w_[hour_of(t)]; }

  // The weights, Monday 00:00 first (mean 1).
  std::span<const double, kHours> weights() const noexcept { return w_; }
  std::chrono::minutes utc_offset() const noexcept {
    return std::chrono::duration_cast<std::chrono::minutes>(Nanos{offset_ns_});
  }

  // mass
  //
  // The weighted length of [from, to) in hours: the integral of the weight
  // over it (0 when to <= from). A flat profile gives (to - from) / 1 h; a
  // whole week gives 168 whatever the weights.
  double mass(Nanos from, Nanos to) const noexcept {
    if (to <= from) return 0;
    return upto(to.count()) - upto(from.count());
  }

 private:
  WeeklyProfile() = default;

  // The week's origin (a Monday 00:00 in the profile's offset) is `shift()`
  // before a multiple of kWeekNs: the Unix epoch was a Thursday, so Monday
  // 00:00 UTC was 3 days before it. In (2, 4) days: positive, under a week.
  std::int64_t shift() const noexcept { return offset_ns_ + 3 * 24 * kHourNs; }

  // Position of Unix time `t` in its week, in [0, kWeekNs), for every
  // int64 `t` (no sum that could overflow).
  std::int64_t week_pos(std::int64_t t) const noexcept {
    std::int64_t r = t % kWeekNs;
    if (r < 0) r += kWeekNs;
    r += shift();
    return r >= kWeekNs ? r - kWeekNs : r;
  }

  // Integral of the weight from an origin (a Monday 00:00) to `t`, in hours.
  double upto(std::int64_t t) const noexcept {
    std::int64_t weeks = t / kWeekNs;
    std::int64_t r = t % kWeekNs;
    if (r < 0) {
      r += kWeekNs;
      --weeks;
    }
    if (r + shift() >= kWeekNs) ++weeks;
    const std::int64_t pos = week_pos(t);
    const auto h = static_cast<std::size_t>(pos / kHourNs);
    const double frac =
        static_cast<double>(pos % kHourNs) / static_cast<double>(kHourNs);
    return static_cast<double>(weeks) * static_cast<double>(kHours) + sum_[h] +
           w_[h] * frac;
  }

  void prefix() noexcept {
    sum_[0] = 0;
    for (std::size_t i = 0; i < kHours; ++i) sum_[i + 1] = sum_[i] + w_[i];
  }

  std::array<double, kHours> w_{};
  std::array<double, kHours + 1> sum_{};  // sum_[h]: weight before hour h
  std::int64_t offset_ns_ = 0;
};

}  // namespace ratekeeper

#endif  // RATEKEEPER_BUDGET_SEASON_HPP_
