// ratekeeper/budget/forecast.hpp: a burn-rate model of one subject's spend.
//
// Defines ForecastOptions, BurnTracker (the model of one budget and subject
// key: pure, testable alone), BurnProjection (what it says at a time) and
// BurnBook (thread-safe trackers by budget and key, as Accountant keeps
// them).
//
// The model, from settlements (amount, time):
//   - history: one spend bucket per hour for the last `weeks` weeks (a ring
//     of weeks x 168 doubles: 6.7 KiB per tracker at the default 5 weeks;
//     older hours are dropped), and a short-term rate, an EWMA of spend per
//     hour with a half-life of `ewma_half_life` (minutes);
//   - profile: a WeeklyProfile learned from the complete weeks of history
//     counted back from now (each hour of the week: its mean spend over
//     those weeks), flat until a whole week is known (`seasonal` says
//     which); learned_week(), what a Pacer spreads by, caps one week's
//     burst (see there);
//   - level: the deseasonalised rate, spend per average hour, blended from
//     the last 28 days' spend / their profile mass (month_weight, 0.4 by
//     default), the last 7 days' (the rest: 0.45 by default), the last 24
//     hours' (day_weight, 0.15) and the EWMA / the mean weight of its
//     recent window (ewma_weight, 0 by default: out of the level);
//   - projection at `end`: spent + level x profile.mass(now, end);
//     exhaustion: the first t with spent + level x mass(now, t) >= limit
//     (a binary search over the monotone mass: O(log));
//   - band: the model's own past errors. At each day boundary of history
//     with a week before it, the level known then, times the profile mass
//     of the next 24 hours (and the next 7 days where known), is compared
//     with what was spent: v1 and v7, the mean squared log errors, fit
//     v(n days) = a + c / n (a: the level's error, which lasts; c: day to
//     day noise, which averages out). The remaining spend's log error at n
//     days left is taken as normal with variance v(n): [low, high] =
//     spent + remaining x exp(-/+ z sqrt(v)), z the normal quantile of
//     (1 + band) / 2. With fewer than 3 past days to test, v = 0.25
//     (a wide band).
// The profile, sums and error fit are rebuilt when the hour of `now`
// changes or a past hour gets spend (a replay): forecasts in one hour cost
// O(1) plus the O(log) exhaustion search; a rebuild is O(weeks x 168).
#ifndef RATEKEEPER_BUDGET_FORECAST_HPP_
#define RATEKEEPER_BUDGET_FORECAST_HPP_

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/hash/hash.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "ratekeeper/budget/season.hpp"
#include "ratekeeper/decision.hpp"
#include "ratekeeper/detail/mutex.hpp"

namespace ratekeeper {

struct ForecastOptions {
  std::uint32_t weeks = 5;  // hourly history kept (>= 2)
  std::chrono::minutes ewma_half_life{30};
  double band = 0.8;  // frequency [low, high] should hold the total
  // The level's blend: the last 28 days, the last 24 hours and the EWMA
  // weigh these; the last 7 days the rest (1 - the three). The EWMA is out
  // of the level by default: a burst in its last minutes moves it far (on
  // forecast_test's months, a weight of 0.02 doubled the worst error at
  // 25% of the month); it is reported as burn_per_hour.
  double month_weight = 0.4;
  double day_weight = 0.15;
  double ewma_weight = 0;
};

// kInvalidArgument unless weeks is 2..53, the half-life 1 min..1 week, band
// in (0, 1), and the three weights each in [0, 1] with a sum <= 1.
inline absl::Status check_forecast_options(const ForecastOptions& o) {
  const auto unit = [](double w) { return w >= 0 && w <= 1; };
  if (o.weeks < 2 || o.weeks > 53 ||
      o.ewma_half_life < std::chrono::minutes(1) ||
      o.ewma_half_life > std::chrono::hours(168) || !(o.band > 0) ||
      !(o.band < 1) || !unit(o.month_weight) || !unit(o.day_weight) ||
      !unit(o.ewma_weight) ||
      !(o.month_weight + o.day_weight + o.ewma_weight <= 1)) {
    return absl::InvalidArgumentError(
        "ForecastOptions: weeks 2..53, half-life 1 min..1 week, band in "
        "(0, 1), weights in [0, 1] summing to at most 1");
  }
  return absl::OkStatus();
}

// BurnProjection: the model at one time (amounts in the budget's unit).
struct BurnProjection {
  double burn_per_hour = 0;   // the EWMA
  double level_per_hour = 0;  // deseasonalised: spend per average hour
  double projected = 0;       // spent + level x mass(now, end)
  double low = 0, high = 0;   // the band
  // projected, low and high less spent (computed apart from spent, so an
  // exact integer spent plus these rounded is exact: detail::with_burn).
  double remaining = 0, remaining_low = 0, remaining_high = 0;
  double band = 0;  // its stated frequency
  std::optional<Nanos> exhausts_at{};
  // Hours known up to now, the current one too: 0..ring size (0 when now
  // is before the first hour with spend, e.g. a clock stepped back).
  double history_hours = 0;
  bool seasonal = false;  // the profile was learned (a week or more)
};

namespace detail {
// The standard normal quantile of p in (0, 1), by bisection on erfc.
inline double normal_quantile(double p) {
  double lo = -10, hi = 10;
  for (int i = 0; i < 100; ++i) {
    const double mid = (lo + hi) / 2;
    (0.5 * std::erfc(-mid / std::sqrt(2.0)) < p ? lo : hi) = mid;
  }
  return (lo + hi) / 2;
}
}  // namespace detail

// BurnTracker: the model of one budget and subject. Not thread-safe
// (BurnBook locks).
class BurnTracker {
 public:
  static constexpr std::int64_t kHourNs = WeeklyProfile::kHourNs;

  explicit BurnTracker(ForecastOptions o = {})
      : o_(o),
        ring_(static_cast<std::size_t>(std::max<std::uint32_t>(2, o.weeks)) *
                  WeeklyProfile::kHours,
              0.0),
        profile_(WeeklyProfile::flat()),
        z_(detail::normal_quantile((1 + std::clamp(o.band, 0.01, 0.999)) / 2)) {
    const double hl_h = static_cast<double>(o.ewma_half_life.count()) / 60.0;
    decay_per_hour_ = std::log(2.0) / std::max(hl_h, 1.0 / 60);
  }

  // add
  //
  // `amount` spent at `t`. Spend older than the ring is dropped; spend
  // before the latest time added counts in its hour, not in the EWMA.
  void add(double amount, Nanos t) {
    if (!(amount > 0)) return;
    const std::int64_t h = hour(t);
    if (!first_) first_ = h;
    if (!last_ || h > *last_) advance(h);
    if (h <= *last_ - span()) return;  // older than the ring
    if (h < *first_) first_ = h;
    ring_[slot(h)] += amount;
    if (built_ && h < built_hour_) built_ = false;  // a past hour changed
    if (!ewma_set_ || t >= ewma_at_) {
      const double kept = ewma_set_ ? ewma_ * decay(t - ewma_at_) : 0.0;
      ewma_ = kept + amount * decay_per_hour_;
      ewma_at_ = t;
      ewma_set_ = true;
    }
  }

  // project
  //
  // Where `spent` (this period so far) heads by `end`, against `limit`.
  BurnProjection project(double spent, double limit, Nanos now, Nanos end) {
    const std::int64_t h0 = hour(now);
    if (last_ && h0 > *last_) advance(h0);
    if (!built_ || built_hour_ != h0) rebuild(h0);
    BurnProjection p;
    p.band = std::clamp(o_.band, 0.01, 0.999);
    p.seasonal = seasonal_;
    // Clamped: a clock stepped back puts now before spend already known.
    p.history_hours = first_ ? static_cast<double>(std::clamp<std::int64_t>(
                                   h0 - *first_ + 1, 0, span()))
                             : 0.0;
    p.burn_per_hour =
        ewma_set_ && now >= ewma_at_ ? ewma_ * decay(now - ewma_at_) : ewma_;
    p.level_per_hour = level(now, h0, p.burn_per_hour);
    const double remaining =
        std::max(0.0, p.level_per_hour * profile_.mass(now, end));
    p.remaining = remaining;
    p.projected = spent + remaining;
    const double n = std::max(0.25, static_cast<double>((end - now).count()) /
                                        static_cast<double>(24 * kHourNs));
    const double sd = std::sqrt(var_a_ + var_c_ / n);
    p.remaining_low = remaining * std::exp(-z_ * sd);
    p.remaining_high = remaining * std::exp(z_ * sd);
    p.low = spent + p.remaining_low;
    p.high = spent + p.remaining_high;
    if (spent >= limit) {
      p.exhausts_at = now;
    } else if (p.projected >= limit && p.level_per_hour > 0) {
      // The first t with spent + level x mass(now, t) >= limit.
      std::int64_t lo = now.count(), hi = end.count();
      const double need = (limit - spent) / p.level_per_hour;
      while (hi - lo > 1'000'000) {  // to the millisecond
        const std::int64_t mid = lo + (hi - lo) / 2;
        (profile_.mass(now, Nanos{mid}) >= need ? hi : lo) = mid;
      }
      p.exhausts_at = Nanos{hi};
    }
    return p;
  }

  // The profile learned (flat until a week of history).
  const WeeklyProfile& profile() const noexcept { return profile_; }

  // learned_week
  //
  // The week a Pacer spreads a budget by (BurnBook::learned_profile): as
  // profile() at `now` (nullopt before a whole week is held), but robust
  // to one week's burst: with 3 or more complete weeks (counted back from
  // now's hour), each week's spend in an hour of the week counts at most
  // twice the other weeks' mean in that hour (kept as is when capping
  // leaves nothing, as spend in one week only). The forecast's projection
  // keeps the plain mean: on forecast_test's months the cap doubled its
  // worst error at 75% of the month (4.9% to 10.7%). O(weeks x 168).
  std::optional<WeeklyProfile> learned_week(Nanos now) {
    if (!project(0, 1, now, now).seasonal) return std::nullopt;
    const std::int64_t h0 = hour(now);
    const std::int64_t weeks = (h0 - base_) / 168;
    if (weeks < 3) return profile_;
    const WeeklyProfile flat = WeeklyProfile::flat();
    std::array<double, WeeklyProfile::kHours> w{}, c{};
    for (std::int64_t k = h0 - weeks * 168; k < h0; ++k) {
      w[flat.hour_of(at(k))] += hour_spend(k);
    }
    const double others = static_cast<double>(weeks - 1);
    double total = 0;
    for (std::int64_t k = h0 - weeks * 168; k < h0; ++k) {
      const std::size_t i = flat.hour_of(at(k));
      const double v = hour_spend(k);
      const double kept = std::min(v, 2 * std::max(0.0, w[i] - v) / others);
      c[i] += kept;
      total += kept;
    }
    if (!(total > 0)) return profile_;
    absl::StatusOr<WeeklyProfile> p = WeeklyProfile::from_weights(c);
    if (!p.ok()) return profile_;
    return *std::move(p);
  }
  // The spend of hour index `h` (Unix time / 1 h), if still held.
  double hour_spend(std::int64_t h) const noexcept {
    if (!last_ || h > *last_ || h <= *last_ - span()) return 0;
    return ring_[slot(h)];
  }
  std::size_t memory_bytes() const noexcept {
    return sizeof(*this) + ring_.size() * sizeof(double);
  }

 private:
  static std::int64_t hour(Nanos t) noexcept {
    const std::int64_t c = t.count();
    return c >= 0 ? c / kHourNs : -((-c + kHourNs - 1) / kHourNs);
  }
  std::int64_t span() const noexcept {
    return static_cast<std::int64_t>(ring_.size());
  }
  std::size_t slot(std::int64_t h) const noexcept {
    const std::int64_t m = h % span();
    return static_cast<std::size_t>(m < 0 ? m + span() : m);
  }
  double decay(Nanos dt) const noexcept {
    return std::exp(-decay_per_hour_ * static_cast<double>(dt.count()) /
                    static_cast<double>(kHourNs));
  }
  // Moves the ring's head to hour `h`, zeroing the hours it passes.
  void advance(std::int64_t h) {
    const std::int64_t from =
        last_ ? std::max(*last_ + 1, h - span() + 1) : h - span() + 1;
    for (std::int64_t k = from; k <= h; ++k) ring_[slot(k)] = 0;
    last_ = h;
    if (first_ && *first_ < h - span() + 1) first_ = h - span() + 1;
  }
  // The spend of complete hours [a, b), over what history holds.
  double sum(std::int64_t a, std::int64_t b) const {
    return prefix_at(b) - prefix_at(a);
  }
  double prefix_at(std::int64_t h) const {
    const std::int64_t i = std::clamp<std::int64_t>(
        h - base_, 0, static_cast<std::int64_t>(prefix_.size()) - 1);
    return prefix_[static_cast<std::size_t>(i)];
  }
  static Nanos at(std::int64_t h) { return Nanos{h * kHourNs}; }
  double week_weight() const noexcept {
    return std::max(0.0, 1 - o_.month_weight - o_.day_weight - o_.ewma_weight);
  }

  // The level blended from complete hours before hour `h0` (and the
  // current hour's spend until `now`), and the EWMA `burn` (< 0: left out).
  double level(Nanos now, std::int64_t h0, double burn) const {
    if (!first_) return 0;
    const double part = hour_spend(h0);
    double wsum = 0, lsum = 0;
    const auto window = [&](std::int64_t hours, double w) {
      const std::int64_t a = std::max({h0 - hours, *first_, base_});
      const double m = profile_.mass(at(a), now);
      if (w <= 0 || m <= 1e-9) return;
      lsum += w * (sum(a, h0) + part) / m;
      wsum += w;
    };
    window(28 * 24, o_.month_weight);
    window(168, week_weight());
    window(24, o_.day_weight);
    if (burn >= 0 && o_.ewma_weight > 0) {
      const Nanos win{static_cast<std::int64_t>(2.0 / decay_per_hour_ *
                                                static_cast<double>(kHourNs))};

      const double mean_w =
          profile_.mass(now - win, now) /
          (static_cast<double>(win.count()) / static_cast<double>(kHourNs));
      if (mean_w > 0.05) {
        lsum += o_.ewma_weight * burn / mean_w;
        wsum += o_.ewma_weight;
      }
    }
    return wsum > 0 ? lsum / wsum : 0;
  }

  // Rebuilds the profile, the prefix sums and the error fit for hour h0.
  void rebuild(std::int64_t h0) {
    built_ = true;
    built_hour_ = h0;
    seasonal_ = false;
    profile_ = WeeklyProfile::flat();
    var_a_ = 0.25;
    var_c_ = 0;
    prefix_.assign(1, 0.0);
    if (!first_) return;
    base_ = std::max(*first_, h0 - span() + 1);
    for (std::int64_t k = base_; k < h0; ++k) {
      // hour_spend: 0 for hours the ring no longer (or not yet) holds, as
      // when the clock stepped back behind the latest spend.
      prefix_.push_back(prefix_.back() + hour_spend(k));
    }
    const std::int64_t known = h0 - base_;
    const std::int64_t weeks = known / 168;
    if (weeks >= 1) {
      std::array<double, WeeklyProfile::kHours> w{};
      const WeeklyProfile flat = WeeklyProfile::flat();
      for (std::int64_t k = h0 - weeks * 168; k < h0; ++k) {
        w[flat.hour_of(at(k))] += hour_spend(k);
      }
      if (auto p = WeeklyProfile::from_weights(w); p.ok()) {
        profile_ = *std::move(p);
        seasonal_ = true;
      }
    }
    // Past errors: at each day boundary b (counted back from h0) with a
    // week of history before it.
    double s1 = 0, s7 = 0;
    int n1 = 0, n7 = 0;
    const auto err = [&](std::int64_t b, std::int64_t hours) {
      const double pred =
          level_at(b) * profile_.mass(at(b), at(b + hours)) + 1e-9;
      const double act = sum(b, b + hours) + 1e-9;
      const double e = std::log(act / pred);
      return e * e;
    };
    for (std::int64_t b = h0 - 24; b - 168 >= base_; b -= 24) {
      s1 += err(b, 24);
      ++n1;
      if (b + 168 <= h0) {
        s7 += err(b, 168);
        ++n7;
      }
    }
    if (n1 >= 3) {
      const double v1 = s1 / n1;
      const double v7 = n7 >= 3 ? s7 / n7 : v1;
      var_c_ = std::max(0.0, v1 - v7) * 7 / 6;
      var_a_ = std::max(v7 - var_c_ / 7, 0.0);
    }
  }
  // The level from complete hours before hour b (no EWMA), for the fit.
  double level_at(std::int64_t b) const {
    double wsum = 0, lsum = 0;
    const auto window = [&](std::int64_t hours, double w) {
      const std::int64_t a = std::max(b - hours, base_);
      const double m = profile_.mass(at(a), at(b));
      if (w <= 0 || m <= 1e-9) return;
      lsum += w * sum(a, b) / m;
      wsum += w;
    };
    window(28 * 24, o_.month_weight);
    window(168, week_weight());
    window(24, o_.day_weight);
    return wsum > 0 ? lsum / wsum : 0;
  }

  ForecastOptions o_;
  std::vector<double> ring_;
  std::optional<std::int64_t> first_, last_;  // hour indices held
  double ewma_ = 0;                           // per hour, at ewma_at_
  Nanos ewma_at_{0};
  bool ewma_set_ = false;
  double decay_per_hour_ = 0;
  // Rebuilt per hour (rebuild()).
  bool built_ = false;
  std::int64_t built_hour_ = 0;
  std::int64_t base_ = 0;       // the hour prefix_[0] starts at
  std::vector<double> prefix_;  // spend of hours [base_, base_ + i)
  WeeklyProfile profile_;
  bool seasonal_ = false;
  double var_a_ = 0.25, var_c_ = 0;
  double z_ = 0;
};

// BurnBook: a BurnTracker per (budget index, subject key), created on the
// first spend; thread-safe (16 shards, a mutex each). Memory: one tracker
// (BurnTracker::memory_bytes) per budget and subject that ever settled.
class BurnBook {
 public:
  explicit BurnBook(ForecastOptions o = {}) : o_(o) {}

  void add(std::size_t budget, std::string_view key, double amount, Nanos t) {
    if (!(amount > 0)) return;
    Shard& s = shard(budget, key);
    detail::MutexLock lock(&s.mu);
    auto& tr = s.map[std::make_pair(budget, std::string(key))];
    if (!tr) tr = std::make_unique<BurnTracker>(o_);
    tr->add(amount, t);
  }

  // The projection of (budget, key); a subject never seen projects spent.
  BurnProjection project(std::size_t budget, std::string_view key, double spent,
                         double limit, Nanos now, Nanos end) {
    Shard& s = shard(budget, key);
    detail::MutexLock lock(&s.mu);
    auto it = s.map.find(std::make_pair(budget, std::string(key)));
    if (it == s.map.end()) {
      BurnProjection p;
      p.projected = p.low = p.high = spent;
      p.band = std::clamp(o_.band, 0.01, 0.999);
      if (spent >= limit) p.exhausts_at = now;
      return p;
    }
    return it->second->project(spent, limit, now, end);
  }

  // The weekly profile learned for (budget, key) as of `now`, once it
  // holds a week of history (nullopt before, or for a subject never seen).
  std::optional<WeeklyProfile> learned_profile(std::size_t budget,
                                               std::string_view key,
                                               Nanos now) {
    Shard& s = shard(budget, key);
    detail::MutexLock lock(&s.mu);
    auto it = s.map.find(std::make_pair(budget, std::string(key)));
    if (it == s.map.end()) return std::nullopt;
    return it->second->learned_week(now);
  }

  const ForecastOptions& options() const noexcept { return o_; }

 private:
  struct Shard {
    detail::Mutex mu;
    absl::flat_hash_map<std::pair<std::size_t, std::string>,
                        std::unique_ptr<BurnTracker>>
        map ABSL_GUARDED_BY(mu);
  };
  Shard& shard(std::size_t budget, std::string_view key) {
    const std::size_t h =
        absl::Hash<std::pair<std::size_t, std::string_view>>{}({budget, key});
    return shards_[h % shards_.size()];
  }
  ForecastOptions o_;
  std::array<Shard, 16> shards_;
};

}  // namespace ratekeeper

#endif  // RATEKEEPER_BUDGET_FORECAST_HPP_
