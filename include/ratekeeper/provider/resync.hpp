// ratekeeper/provider/resync.hpp: local limits that follow what the
// provider says (issue 18, "Following the provider").
//
// Defines ResyncOptions and ProviderChain: the limits a ProviderLimits
// preset describes (one TokenBucket PolicyLimit per configured dimension),
// admitted and settled the way the provider counts (provider/limits.hpp),
// and lowered after each call by what the provider's answer said
// (provider/headers.hpp), so that a fleet of instances that each think they
// have headroom stops before the provider refuses.
//
// The rule. Each dimension has a factor f in (0, 1]; the limit in force is
// the configured one times f (rate and burst both): a call's cost c is
// counted as ceil(c / f) against the configured bucket (at most its burst,
// so a call that fits the configured limit never becomes unadmittable).
// f never exceeds 1: nothing the provider says raises a limit above its
// configured value.
//   - Lowered by the headers: a `limit` header below the configured number
//     sets f to at most limit / configured.
//   - Multiplicative decrease: a 429 (or 529, 503) multiplies f by
//     decrease_permille / 1000, once per burst: the refusals within
//     burst_window of the one that lowered it count as one. Not below
//     floor_permille. When the answer's headers name the dimensions at 0
//     remaining, only those are lowered; else every one.
//   - Additive increase: f climbs back by increase_permille / 1000 per
//     whole increase_interval since it was last lowered or held, up to 1:
//     a limit lowered to f is back at its configured value after
//     ceil((1 - f) / increase) intervals without a refusal. A `remaining`
//     below hold_permille / 1000 of the provider's limit holds f at the
//     value it was last lowered to (the climb since is dropped and
//     restarts): the provider is nearly empty, there is no headroom to
//     climb into. Without it a fleet's instances climb together into the
//     next 429 (tests/provider_test.cpp, the fleet).
//   - Remaining: a `remaining` header R lowers what the local bucket has
//     left to R (in the limit in force: R / f counted units) by charging the
//     difference; never raises it. The bucket then refills at its rate.
//   - Retry-After: a refusal's wait (retry-after-ms, retry-after) empties
//     the request bucket (every dimension when there is none) so that no
//     call passes before it ends.
// Every change is a decrease of what is left or of f; only time brings
// them back.
#ifndef RATEKEEPER_PROVIDER_RESYNC_HPP_
#define RATEKEEPER_PROVIDER_RESYNC_HPP_

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string_view>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "ratekeeper/budget/usage.hpp"
#include "ratekeeper/chain.hpp"
#include "ratekeeper/decision.hpp"
#include "ratekeeper/detail/math.hpp"
#include "ratekeeper/detail/mutex.hpp"
#include "ratekeeper/detail/strings.hpp"
#include "ratekeeper/policy/token_bucket.hpp"
#include "ratekeeper/provider/headers.hpp"
#include "ratekeeper/provider/limits.hpp"

namespace ratekeeper::provider {

// ResyncOptions: the rule's numbers (see the file comment).
struct ResyncOptions {
  std::uint32_t decrease_permille = 500;  // f x this / 1000 per burst
  std::uint32_t increase_permille = 10;   // f + this / 1000 per interval
  Nanos increase_interval = std::chrono::seconds(1);
  std::uint32_t floor_permille = 20;  // the decrease stops here
  Nanos burst_window = std::chrono::seconds(1);
  // A `remaining` below this many thousandths of the provider's limit
  // holds f at the value it was last lowered to: the climb since then is
  // dropped and restarts from now (0: never holds).
  std::uint32_t hold_permille = 100;
  bool sync_remaining = true;      // follow `remaining` headers
  bool aimd = true;                // decrease on 429 / 529 / 503
  bool honour_retry_after = true;  // wait out a refusal's Retry-After
};

inline absl::Status validate(const ResyncOptions& o) {
  if (o.decrease_permille >= 1000 || o.floor_permille == 0 ||
      o.floor_permille > 1000 || o.increase_permille == 0 ||
      o.increase_permille > 1000 || o.hold_permille > 1000) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ResyncOptions: need decrease_permille < 1000, floor_permille and "
        "increase_permille in [1, 1000], hold_permille at most 1000; got ",
        o.decrease_permille, ", ", o.floor_permille, ", ", o.increase_permille,
        ", ", o.hold_permille));
  }
  if (o.increase_interval <= Nanos{0} || o.burst_window < Nanos{0}) {
    return absl::InvalidArgumentError(
        "ResyncOptions: increase_interval must be positive, burst_window "
        "not negative");
  }
  return absl::OkStatus();
}

// ProviderChain: the local limits of one provider account (and model
// class), following the provider. Keys name what the limits are counted
// under locally (one key per API key, say); the factor f is per dimension,
// shared by the keys. Thread-safe.
class ProviderChain {
 public:
  static constexpr std::uint32_t kOne = 1'000'000;  // f = 1, in ppm

  // create
  //
  // The limits of `limits` (validate(), one TokenBucket per configured
  // dimension: bucket_for), named limits.name + "." + dimension, following
  // the provider by `options`. kInvalidArgument for bad numbers.
  static absl::StatusOr<std::unique_ptr<ProviderChain>> create(
      ProviderLimits limits, ResyncOptions options = {}) {
    if (absl::Status st = validate(limits); !st.ok()) return st;
    if (absl::Status st = validate(options); !st.ok()) return st;
    std::unique_ptr<ProviderChain> out(new ProviderChain(limits, options));
    for (std::size_t i = 0; i < kDimensions; ++i) {
      const auto d = static_cast<Dimension>(i);
      if (limits.configured(d) == 0) continue;
      absl::StatusOr<TokenBucket> b = bucket_for(limits, d);
      if (!b.ok()) return b.status();
      auto l = make_limit(
          {.name = absl::StrCat(limits.name, ".",
                                ratekeeper::detail::av(dimension_name(d))),
           .unit = d == Dimension::kRequests ? Unit::kRequests : Unit::kTokens},
          *b);
      if (!l.ok()) return l.status();
      out->limits_[i] = std::move(*l);
    }
    return out;
  }

  const ProviderLimits& limits() const noexcept { return config_; }
  const ResyncOptions& options() const noexcept { return options_; }

  // The local limit of `d`, or nullptr where it is not configured.
  PolicyLimit<TokenBucket>* limit(Dimension d) const noexcept {
    return limits_[static_cast<std::size_t>(d)].get();
  }

  // f of `d` at `now`, in millionths (kOne: the configured limit).
  std::uint32_t factor_ppm(Dimension d, Nanos now) const {
    ratekeeper::detail::MutexLock lock(&mu_);
    return factor_locked(d, now);
  }

  // The limit in force for `d` at `now`: configured x f, rounded down.
  std::uint64_t effective_limit(Dimension d, Nanos now) const {
    const auto v =
        static_cast<ratekeeper::detail::u128>(config_.configured(d)) *
        factor_ppm(d, now) / kOne;
    return static_cast<std::uint64_t>(v);
  }

  // items
  //
  // The chain items of `r` under `key` at `now`: one per configured
  // dimension, costs as admission_costs() counted in the limit in force.
  // `key`'s bytes must outlive their use. For a chain of your own that puts
  // other limits beside these (then settle() below settles these).
  std::vector<ChainItem> items(std::string_view key, const ProviderRequest& r,
                               Nanos now) const {
    const DimensionCosts c = admission_costs(config_, r);
    std::vector<ChainItem> out;
    ratekeeper::detail::MutexLock lock(&mu_);
    for (std::size_t i = 0; i < kDimensions; ++i) {
      if (!limits_[i] || !c[i]) continue;
      const auto d = static_cast<Dimension>(i);
      out.push_back(
          {limits_[i].get(), key,
           scaled(*c[i], factor_locked(d, now), burst_of(config_, d))});
    }
    return out;
  }

  // admit
  //
  // Acquires `r` under `key` at `now`, all or nothing (Chain::acquire_at).
  ChainDecision admit(std::string_view key, const ProviderRequest& r,
                      Nanos now) {
    const std::vector<ChainItem> it = items(key, r, now);
    return chain_.acquire_at(it, now);
  }

  // settle
  //
  // Settles an allowed decision of `r` (admit(), or a chain holding
  // items()) to what the provider counted of usage `u` (usage_costs), each
  // in the proportion its take was counted at: an estimate above the
  // usage gives back the difference, one below charges the excess. The
  // request limit keeps its request. kFailedPrecondition for a refused
  // decision; the first failing limit's status otherwise.
  absl::Status settle(ChainDecision& d, const ProviderRequest& r,
                      const Usage& u, Nanos now) {
    if (!d.allowed) {
      return absl::FailedPreconditionError(
          "ProviderChain::settle: the call was refused, it holds nothing");
    }
    const DimensionCosts took = admission_costs(config_, r);
    const DimensionCosts used = usage_costs(config_, r, u);
    for (LimitResult& res : d.results) {
      for (std::size_t i = 1; i < kDimensions; ++i) {  // not requests
        if (res.limit != limits_[i].get() || !res.receipt || !took[i]) {
          continue;
        }
        Cost actual = 0;
        if (*took[i] == 0) {
          actual = scaled(*used[i], factor_ppm(static_cast<Dimension>(i), now),
                          burst_of(config_, static_cast<Dimension>(i)));
        } else {
          const auto v = ratekeeper::detail::ceil_div(
              static_cast<ratekeeper::detail::i128>(*used[i]) * res.cost,
              static_cast<ratekeeper::detail::i128>(*took[i]));
          actual = ratekeeper::detail::clamp_u64(v);
        }
        absl::StatusOr<Decision> s =
            res.limit->settle(res.receipt, actual, now);
        if (!s.ok()) return s.status();
      }
    }
    return absl::OkStatus();
  }

  // observe
  //
  // Follows one answer of the provider (read_provider_headers) for calls
  // counted under `key`, at `now` (the local limits' clock): the rule of the
  // file comment.
  void observe(std::string_view key, const ProviderReading& reading,
               Nanos now) {
    std::array<std::uint32_t, kDimensions> f{};
    {
      ratekeeper::detail::MutexLock lock(&mu_);
      bool named = false;
      for (std::size_t i = 0; i < kDimensions; ++i) {
        named = named || (limits_[i] && reading.dims[i].remaining == 0u);
      }
      for (std::size_t i = 0; i < kDimensions; ++i) {
        if (!limits_[i]) continue;
        const auto d = static_cast<Dimension>(i);
        Aimd& a = aimd_[i];
        const DimensionReading& r = reading.dims[i];
        if (r.limit && *r.limit < config_.configured(d)) {
          const auto cap =
              static_cast<std::uint32_t>(std::max<ratekeeper::detail::u128>(
                  static_cast<ratekeeper::detail::u128>(*r.limit) * kOne /
                      config_.configured(d),
                  1));
          lower(a, std::min(factor_locked(d, now), cap), now);
        }
        if (options_.aimd && backs_off(reading.response) &&
            (!named || r.remaining == 0u) && now >= a.burst_until) {
          // Halved, not below the floor; and never above f as it stands
          // (a `limit` header may have put f under the floor already).
          const std::uint32_t cur = factor_locked(d, now);
          const std::uint64_t down = static_cast<std::uint64_t>(cur) *
                                     options_.decrease_permille / 1000;
          lower(a,
                std::min(cur, std::max<std::uint32_t>(
                                  static_cast<std::uint32_t>(down),
                                  options_.floor_permille * 1000)),
                now);
          a.burst_until = now + options_.burst_window;
        } else if (r.remaining) {
          const std::uint64_t of = r.limit ? *r.limit : config_.configured(d);
          if (static_cast<ratekeeper::detail::u128>(*r.remaining) * 1000 <
              static_cast<ratekeeper::detail::u128>(of) *
                  options_.hold_permille) {
            a.since = now;  // hold: f keeps its base, the climb restarts
          }
        }
        f[i] = factor_locked(d, now);
      }
    }
    for (std::size_t i = 0; i < kDimensions; ++i) {
      const DimensionReading& r = reading.dims[i];
      if (!limits_[i] || !options_.sync_remaining || !r.remaining) continue;
      const std::uint64_t burst = burst_of(config_, static_cast<Dimension>(i));
      const std::uint64_t target =
          static_cast<std::uint64_t>(std::min<ratekeeper::detail::u128>(
              static_cast<ratekeeper::detail::u128>(*r.remaining) * kOne / f[i],
              burst));
      const Decision held = limits_[i]->peek(key, 0, now);
      if (held.remaining > target) {
        Receipt none;
        (void)limits_[i]->charge(key, held.remaining - target, now, none);
      }
    }
    if (options_.honour_retry_after && backs_off(reading.response) &&
        reading.retry_after && *reading.retry_after > Nanos{0}) {
      for (std::size_t i = 0; i < kDimensions; ++i) {
        if (!limits_[i]) continue;
        if (limits_[0] && i != 0) break;  // the request bucket suffices
        block(*limits_[i], key, *reading.retry_after, now);
      }
    }
  }

  // ceil(c / f) for f in ppm, at most `burst` when c fits it; 0 stays 0.
  static Cost scaled(Cost c, std::uint32_t f_ppm,
                     std::uint64_t burst) noexcept {
    if (c == 0 || c > burst) return c;
    const auto v = ratekeeper::detail::ceil_div(
        static_cast<ratekeeper::detail::i128>(c) * kOne,
        static_cast<ratekeeper::detail::i128>(
            std::max<std::uint32_t>(f_ppm, 1)));
    return std::min<Cost>(ratekeeper::detail::clamp_u64(v), burst);
  }

 private:
  struct Aimd {
    std::uint32_t base = kOne;  // f when last lowered
    Nanos since{0};             // when it was last lowered
    Nanos burst_until{ratekeeper::detail::kI64Min};
  };

  ProviderChain(ProviderLimits l, ResyncOptions o)
      : config_(std::move(l)), options_(o) {}

  std::uint32_t factor_locked(Dimension d, Nanos now) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const Aimd& a = aimd_[static_cast<std::size_t>(d)];
    if (a.base >= kOne || now <= a.since) return a.base;
    const auto steps = static_cast<std::uint64_t>(
        (now - a.since).count() / options_.increase_interval.count());
    const ratekeeper::detail::u128 up =
        static_cast<ratekeeper::detail::u128>(steps) *
            options_.increase_permille * 1000 +
        a.base;
    return up >= kOne ? kOne : static_cast<std::uint32_t>(up);
  }

  static void lower(Aimd& a, std::uint32_t to, Nanos now) {
    a.base = std::min(to, kOne);
    a.since = now;
  }

  // No call of cost >= 1 passes `l` under `key` before now + wait: charges
  // what is left (the bucket then holds less than one unit), reads when one
  // unit will be back, and charges the rest of the wait's refill, rounded
  // up to a unit: the first call passes within one unit's refill after the
  // wait. TokenBucket::charge holds at most one burst of debt: a wait
  // longer than a burst's refill (a minute for a per-minute limit) is held
  // for that long (reading.retry_after stays the caller's to honour).
  static void block(PolicyLimit<TokenBucket>& l, std::string_view key,
                    Nanos wait, Nanos now) {
    Receipt none;
    const Decision left = l.peek(key, 0, now);
    if (left.remaining > 0) (void)l.charge(key, left.remaining, now, none);
    const Decision one = l.peek(key, 1, now);
    const Nanos held = one.allowed ? Nanos{0} : one.retry_after;
    if (held >= wait) return;
    const Rate rate = l.policy().rate();
    const ratekeeper::detail::i128 x = ratekeeper::detail::ceil_div(
        static_cast<ratekeeper::detail::i128>((wait - held).count()) *
            static_cast<ratekeeper::detail::i128>(rate.count),
        static_cast<ratekeeper::detail::i128>(rate.period.count()));
    (void)l.charge(key,
                   static_cast<Cost>(std::min<ratekeeper::detail::i128>(
                       x, TokenBucket::kMaxCount)),
                   now, none);
  }

  const ProviderLimits config_;
  const ResyncOptions options_;
  std::array<std::unique_ptr<PolicyLimit<TokenBucket>>, kDimensions> limits_;
  Chain<> chain_;
  mutable ratekeeper::detail::Mutex mu_;
  std::array<Aimd, kDimensions> aimd_ ABSL_GUARDED_BY(mu_);
};

}  // namespace ratekeeper::provider

#endif  // RATEKEEPER_PROVIDER_RESYNC_HPP_
