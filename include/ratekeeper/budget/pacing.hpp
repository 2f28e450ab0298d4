// ratekeeper/budget/pacing.hpp: a budget that lasts its period.
//
// Defines Pacer, which admits calls against an Accountant's budgets at a
// pace: what is left of a budget over what is left of its period, spread
// by a WeeklyProfile, with a burst allowance; and graded actions for when
// the accountant's forecast says a budget runs out before its period ends
// (alert, route to a cheaper model, clamp max_tokens, deny).
//
//   Pacer<> pacer(acct);
//   pacer.add({.budget = "team_month", .burst_hours = 24,
//              .on_risk = {.route_to = "gpt-4o-mini", .clamp = true}});
//   auto r = pacer.reserve(who, "gpt-4o", {.prompt_tokens = 900,
//                                          .max_output_tokens = 1000}, id);
//   if (!r.ok()) return reply_500(r.status());
//   if (!r->reservation) return reply_429(r->pace.retry_after);  // paced
//   if (!r->granted()) return reply(refusal_response(*r->reservation));
//   call(r->model, r->max_tokens);  // what the pacer chose
//
// The pace of a subject's budget is a bucket in the budget's unit. The
// change of the budget's spend since the last look (forecast()'s spent,
// holds included) comes out of it, so a settle below its hold gives back
// and spend made around the pacer counts; what it does not hold of what
// is left, (left - level), flows in at its share of the weighted hours
// left: over [last, now], (left - level) x mass(last, now) / mass(last,
// end) (WeeklyProfile::mass). It holds at most burst_hours x left /
// mass(now, end) and starts a period full. A call whose worst case exceeds
// the level is refused; retry_after is the wait until the refill covers it
// if nothing is spent meanwhile (the period's end for a call larger than
// what is left). docs/budgets.md ("Pacing") has the rule, the actions and
// why this is a layer over Accountant rather than a Limit in its chain
// (the pace reads the budget's spend and forecast, and routing and
// clamping change the call before anything is held).
//
// Concurrent reserves of one subject may each see the level before the
// others' holds count: the pace (not the budget) can be overrun by the
// calls in flight at once. The buckets live in the process.
#ifndef RATEKEEPER_BUDGET_PACING_HPP_
#define RATEKEEPER_BUDGET_PACING_HPP_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "ratekeeper/budget/accountant.hpp"
#include "ratekeeper/budget/season.hpp"
#include "ratekeeper/detail/mutex.hpp"

namespace ratekeeper {

// What a Pacer did to a call, strongest last.
//   kNone   admitted as asked; no budget at risk
//   kAlert  a budget is at risk; admitted as asked (alert only)
//   kRoute  routed to the budget's cheaper model (maybe clamped too)
//   kClamp  max_tokens lowered to what the pace allows
//   kPaced  refused: the call exceeds the pace
//   kDeny   refused: a budget at risk denies every call
// clang-format off
enum class PaceAction : std::uint8_t {
  kNone, kAlert, kRoute, kClamp, kPaced, kDeny
};
// clang-format on

// RiskActions: what a budget does while its forecast says it runs out
// before its period ends: the burn model's Forecast::model_exhausts_at <
// period_end once it holds a day of the subject's settlements
// (history_hours >= 24); before that the period-average exhausts_at, when
// the spend is ahead of the budget's share of the period so far by more
// than the burst allowance (docs/budgets.md, "Pacing").
//   alert             the Pacer's alert callback, once per crossing into
//                     risk (again only after the forecast lasted again)
//   route_to          a cheaper model ("" none): the call goes there,
//                     priced from the price table
//   clamp             lower max_tokens to what the pace allows now (to no
//                     less than min_clamp_tokens; below it, the pace refuses)
//   deny              refuse every call
struct RiskActions {
  bool alert = true;
  std::string route_to{};
  bool clamp = false;
  std::uint64_t min_clamp_tokens = 1;
  bool deny = false;
};

// PacingSpec: the pace of one of the accountant's budgets.
//   budget        the BudgetSpec's name
//   profile       how demand spreads over the week (flat: evenly)
//   learn_profile true: the subject's own weekly profile, as the
//                 accountant's burn model learned it from its settlements
//                 (Accountant::learned_profile), once it holds a week of
//                 them; `profile` until then
//   burst_hours   the burst allowance, in weighted hours of pace (> 0)
//   enforce       refuse calls beyond the pace (false: actions only)
struct PacingSpec {
  std::string budget;
  WeeklyProfile profile = WeeklyProfile::flat();
  bool learn_profile = false;
  double burst_hours = 24;
  bool enforce = true;
  RiskActions on_risk{};
};

// PaceAlert: a budget's forecast crossed into running out early.
struct PaceAlert {
  std::string budget;
  std::string key;  // the subject key
  Forecast forecast;
};

// PacedReservation: the Pacer's answer.
//   action        the strongest action taken (PaceAction)
//   routed        the call goes to `model`, not the one asked for
//   clamped       max_tokens was lowered
//   at_risk       a paced budget's forecast runs out before period end
//   model         the model to call
//   max_tokens    the max_tokens to send
//   pace          the pace's decision: limit (the burst allowance),
//                 remaining (left after this call), retry_after (when the
//                 pace allows this call; 0 when it does), reset_after (when
//                 the allowance is full again); the tightest paced budget's
//   paced_by      the budget whose pace refused or bound the call
//   reservation   the accountant's reservation (nullopt when the pacer
//                 refused before reserving)
template <Clock C = SystemClock>
struct PacedReservation {
  PaceAction action = PaceAction::kNone;
  bool routed = false;
  bool clamped = false;
  bool at_risk = false;
  std::string model;
  std::uint64_t max_tokens = 0;
  Decision pace{};
  std::string paced_by;
  std::optional<Reservation<C>> reservation{};

  bool granted() const noexcept {
    return reservation.has_value() && reservation->granted();
  }
};

template <Clock C = SystemClock>
class Pacer {
 public:
  using AlertCallback = std::function<void(const PaceAlert&)>;

  // `acct` must outlive the pacer; `clock` should be the accountant's.
  // Calls are priced from the accountant's price table.
  explicit Pacer(Accountant<C>& acct, C clock = C{})
      : acct_(acct), clock_(clock) {}

  // Called from the reserving thread, no lock held. Set before use.
  void on_alert(AlertCallback cb) { on_alert_ = std::move(cb); }

  // add
  //
  // Paces an accountant budget. kNotFound for an unknown budget;
  // kInvalidArgument for burst_hours not > 0 or finite, or a route_to
  // model without a price. Add before the first reserve.
  absl::Status add(PacingSpec spec) {
    absl::StatusOr<BudgetSpec> b = acct_.budget_spec(spec.budget);
    if (!b.ok()) return b.status();
    if (!(spec.burst_hours > 0) || !std::isfinite(spec.burst_hours)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "pacing \"", spec.budget, "\": burst_hours must be > 0"));
    }
    if (!spec.on_risk.route_to.empty()) {
      absl::StatusOr<Prices> p =
          acct_.prices().prices(spec.on_risk.route_to, sys(clock_.now()));
      if (!p.ok()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "pacing \"", spec.budget, "\": route_to: ", p.status().message()));
      }
    }
    paced_.push_back(Paced{std::move(spec), std::move(*b)});
    return absl::OkStatus();
  }

  // The paces held (one per paced budget and subject seen); those of
  // ended periods are forgotten whenever the count doubles.
  std::size_t pace_memory() const {
    detail::MutexLock lock(&mu_);
    return states_.size();
  }

  // reserve
  //
  // Observes each paced budget of `who` (its forecast and pace), applies
  // the actions of the budgets at risk (alert, deny, route, clamp), refuses
  // a call beyond a pace, and otherwise reserves the call as changed
  // (model, max_tokens) through the accountant. Errors are the
  // accountant's (unknown model, a subject lacking a field, a settled id).
  absl::StatusOr<PacedReservation<C>> reserve(
      const Subject& who, std::string_view model, const Estimate& e,
      std::string request_id, std::span<const ChainItem> limits = {}) {
    PacedReservation<C> out;
    out.model = std::string(model);
    out.max_tokens = e.max_output_tokens;
    const Nanos now = clock_.now();
    std::vector<View> views;
    views.reserve(paced_.size());
    std::vector<PaceAlert> alerts;
    for (std::size_t i = 0; i < paced_.size(); ++i) {
      absl::StatusOr<View> v = observe(i, who, now, alerts);
      if (!v.ok()) return v.status();
      views.push_back(*std::move(v));
    }
    if (on_alert_) {
      for (const PaceAlert& a : alerts) on_alert_(a);
    }
    const RiskActions* deny = nullptr;
    Decision deny_pace{};
    for (const View& v : views) {
      if (!v.at_risk) continue;
      const RiskActions& ra = paced_[v.i].spec.on_risk;
      out.at_risk = true;
      if (ra.deny && deny == nullptr) {
        deny = &ra;
        out.paced_by = paced_[v.i].spec.budget;
      }
      if (!ra.route_to.empty() && !out.routed) {
        out.model = ra.route_to;
        out.routed = true;
      }
    }
    absl::StatusOr<Prices> p = acct_.prices().prices(out.model, sys(now));
    if (!p.ok()) return p.status();
    // Clamp to what each at-risk clamping budget's pace allows.
    for (const View& v : views) {
      const RiskActions& ra = paced_[v.i].spec.on_risk;
      if (!v.at_risk || !ra.clamp) continue;
      absl::StatusOr<Cost> c = cost_of(v, *p, e.prompt_tokens, out.max_tokens);
      if (!c.ok()) return c.status();
      if (!exceeds(static_cast<double>(*c), v.level)) continue;
      const std::optional<std::uint64_t> n = fits(v, *p, e.prompt_tokens);
      if (n && *n >= ra.min_clamp_tokens && *n < out.max_tokens) {
        out.max_tokens = *n;
        out.clamped = true;
      }
    }
    // The pace of every budget, on the call as changed: a refusal reports
    // the longest wait among the paces that refuse, an admission the
    // tightest pace.
    bool bound = false;
    bool first = true;
    for (const View& v : views) {
      absl::StatusOr<Cost> c = cost_of(v, *p, e.prompt_tokens, out.max_tokens);
      if (!c.ok()) return c.status();
      const double cost = static_cast<double>(*c);
      const bool over = exceeds(cost, v.level);
      Decision d;
      d.limit = floor_u64(v.cap);
      d.allowed = !over;
      d.remaining = floor_u64(over ? v.level : v.level - cost);
      d.retry_after = over ? wait_for(v, cost, now) : Nanos{0};
      d.reset_after = wait_for(v, v.cap + (over ? 0 : cost), now);
      if (deny != nullptr && &paced_[v.i].spec.on_risk == deny) {
        // Denied while at risk: retry once the pace has refilled this
        // call's cost beyond what it allows now.
        d.allowed = false;
        d.retry_after = std::min(wait_for(v, v.level + cost, now),
                                 std::max(Nanos{1}, v.f.period_end - now));
        if (d.retry_after == Nanos{0}) d.retry_after = Nanos{1};
        deny_pace = d;
      }
      if (paced_[v.i].spec.enforce && over) {
        if (!bound || d.retry_after > out.pace.retry_after) {
          out.pace = d;
          if (deny == nullptr) out.paced_by = paced_[v.i].spec.budget;
        }
        bound = true;
      } else if (!bound && (first || d.remaining < out.pace.remaining)) {
        out.pace = d;
        if (deny == nullptr) out.paced_by = paced_[v.i].spec.budget;
      }
      first = false;
    }
    if (deny != nullptr) out.pace = deny_pace;
    if (views.empty()) out.pace.allowed = true;  // nothing paced
    const bool refused = deny != nullptr || bound;
    if (refused) {
      out.action = deny != nullptr ? PaceAction::kDeny : PaceAction::kPaced;
      // In the ledger as any denial, named "pace:<budget>" or
      // "at_risk:<budget>" (a what-if replay counts the call).
      if (absl::Status st = acct_.record_refusal(
              who, out.model,
              Estimate{.prompt_tokens = e.prompt_tokens,
                       .max_output_tokens = out.max_tokens},
              request_id,
              absl::StrCat(deny != nullptr ? "at_risk:" : "pace:",
                           out.paced_by));
          !st.ok()) {
        return st;
      }
      return out;
    }
    out.action = out.clamped   ? PaceAction::kClamp
                 : out.routed  ? PaceAction::kRoute
                 : out.at_risk ? PaceAction::kAlert
                               : PaceAction::kNone;
    absl::StatusOr<Reservation<C>> r =
        acct_.reserve(who, out.model,
                      Estimate{.prompt_tokens = e.prompt_tokens,
                               .max_output_tokens = out.max_tokens},
                      std::move(request_id), limits);
    if (!r.ok()) return r.status();
    out.reservation.emplace(*std::move(r));
    return out;
  }

 private:
  struct Paced {
    PacingSpec spec;
    BudgetSpec budget;
  };
  // One subject's pace of one budget.
  struct State {
    Nanos period_start{0};
    Nanos last{0};
    double level = 0;
    std::uint64_t spent = 0;
    bool at_risk = false;
    std::size_t budget = 0;  // index in paced_
  };
  // A budget's pace as seen by one reserve.
  struct View {
    std::size_t i = 0;
    Forecast f{};
    double rate = 0;  // per weighted hour
    double cap = 0;
    double level = 0;
    bool at_risk = false;
    // The subject's learned profile (PacingSpec::learn_profile), if any.
    std::optional<WeeklyProfile> learned{};
    const WeeklyProfile& profile(const PacingSpec& spec) const {
      return learned ? *learned : spec.profile;
    }
  };

  // A relative slack of 1e-9 absorbs the rounding of the refill, so that a
  // call made at its retry_after is admitted.
  static bool exceeds(double cost, double level) {
    return cost > level + 1e-9 * std::max(1.0, cost);
  }

  static SysTime sys(Nanos n) {
    return SysTime(std::chrono::duration_cast<SysTime::duration>(n));
  }
  static std::uint64_t floor_u64(double x) {
    if (!(x > 0)) return 0;
    if (x >= 1.8e19) return ~std::uint64_t{0};
    return static_cast<std::uint64_t>(x);
  }

  absl::StatusOr<View> observe(std::size_t i, const Subject& who, Nanos now,
                               std::vector<PaceAlert>& alerts) {
    const Paced& pb = paced_[i];
    std::string key;
    if (absl::Status st = append_subject_key(pb.budget.scope, who, key);
        !st.ok()) {
      return st;
    }
    absl::StatusOr<Forecast> f = acct_.forecast(pb.spec.budget, who);
    if (!f.ok()) return f.status();
    View v;
    v.i = i;
    v.f = *f;
    const double left =
        f->spent < f->limit ? static_cast<double>(f->limit - f->spent) : 0.0;
    if (pb.spec.learn_profile) {
      absl::StatusOr<std::optional<WeeklyProfile>> lp =
          acct_.learned_profile(pb.spec.budget, who);
      if (!lp.ok()) return lp.status();
      v.learned = *std::move(lp);
    }
    const WeeklyProfile& profile = v.profile(pb.spec);
    const double mass_left = profile.mass(now, f->period_end);
    // No weight left in the period: what is left may go at once.
    v.rate = mass_left > 0 ? left / mass_left : left;
    v.cap = v.rate * pb.spec.burst_hours;
    // The burn model once it holds a day of settlements. Before that the
    // period average, and only when the spend is ahead of the budget's
    // share of the period so far (by the profile) by more than the burst
    // allowance: a first call a second into the month projects the month
    // at its pace, and being ahead by less than the allowance is what the
    // allowance is for.
    if (f->history_hours >= 24) {
      v.at_risk = f->model_exhausts_at.has_value() &&
                  *f->model_exhausts_at < f->period_end;
    } else {
      const double whole = profile.mass(f->period_start, f->period_end);
      const double share =
          whole > 0 ? static_cast<double>(f->limit) *
                          (profile.mass(f->period_start, now) / whole)
                    : 0.0;
      v.at_risk =
          f->exhausts_at.has_value() &&
          *f->exhausts_at<f->period_end&& static_cast<double>(f->spent)> share +
              v.cap;
    }
    detail::MutexLock lock(&mu_);
    auto [it, fresh] = states_.try_emplace(absl::StrCat(i, "/", key));
    State& s = it->second;
    if (fresh || s.period_start != f->period_start) {
      s = State{f->period_start, now, v.cap, f->spent, false, i};
      if (fresh && states_.size() >= prune_at_) prune(now);
    } else {
      // Spend since the last look comes out of the level; what the level
      // does not hold of what is left (unpaced = left - level, unchanged by
      // spend) flows in at its share of the weighted hours left.
      const double spent_since =
          static_cast<double>(f->spent) - static_cast<double>(s.spent);
      const double level = s.level - spent_since;
      const double rest = profile.mass(s.last, f->period_end);
      const double refill = now <= s.last ? 0.0
                            : rest > 0    ? std::max(0.0, left - level) *
                                             (profile.mass(s.last, now) / rest)
                                       : std::max(0.0, left - level);
      s.level = std::min(v.cap, level + refill);
      s.last = std::max(s.last, now);
      s.spent = f->spent;
    }
    v.level = s.level;
    if (v.at_risk && !s.at_risk && pb.spec.on_risk.alert) {
      alerts.push_back(PaceAlert{pb.spec.budget, key, *f});
    }
    s.at_risk = v.at_risk;
    return v;
  }

  // Forgets the paces of periods that have ended (a subject seen again
  // starts its period full, as it would). Amortised: when the map doubles.
  void prune(Nanos now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    std::vector<Nanos> starts;
    for (const Paced& pb : paced_) {
      starts.push_back(pb.budget.period->span_of(now).start);
    }
    absl::erase_if(states_, [&](const auto& e) {
      return e.second.period_start < starts[e.second.budget];
    });
    prune_at_ = std::max<std::size_t>(4096, 2 * states_.size());
  }

  // The cost of the call in the budget's unit, as the accountant holds it.
  static absl::StatusOr<Cost> cost_of(const View&, const Prices& p,
                                      std::uint64_t prompt,
                                      std::uint64_t max_out, bool money) {
    Usage u;
    u.input_uncached = prompt;
    u.output = max_out;
    absl::StatusOr<Money> m = PriceTable::cost(p, u);
    if (!m.ok()) return m.status();
    return detail::hold_amount(money, *m, u.total());
  }
  absl::StatusOr<Cost> cost_of(const View& v, const Prices& p,
                               std::uint64_t prompt,
                               std::uint64_t max_out) const {
    return cost_of(v, p, prompt, max_out,
                   paced_[v.i].budget.unit == BudgetUnit::kNanoUsd);
  }

  // The largest max_tokens whose cost fits the level (nullopt: none).
  std::optional<std::uint64_t> fits(const View& v, const Prices& p,
                                    std::uint64_t prompt) const {
    const std::uint64_t room = floor_u64(v.level);
    if (paced_[v.i].budget.unit == BudgetUnit::kTokens) {
      if (prompt >= room) return std::nullopt;
      return room - prompt;
    }
    Usage u;
    u.input_uncached = prompt;
    return PriceTable::max_output_within(
        p, u,
        Money{static_cast<std::int64_t>(std::min<std::uint64_t>(
            room, static_cast<std::uint64_t>(INT64_MAX)))});
  }

  // The wait until the level reaches `target` if nothing is spent
  // meanwhile: the first t with min(cap(t), level + (left - level) x
  // mass(now, t) / mass(now, end)) >= target, the rule observe() applies
  // at t (in one step or several: the refill composes). The period's
  // end when even that is not enough (more than is left of the budget: a
  // new period starts full).
  Nanos wait_for(const View& v, double target, Nanos now) const {
    if (target <= v.level) return Nanos{0};
    const Nanos to_end = std::max(Nanos{1}, v.f.period_end - now);
    const double left = v.f.spent < v.f.limit
                            ? static_cast<double>(v.f.limit - v.f.spent)
                            : 0.0;
    if (target > left) return to_end;
    const PacingSpec& spec = paced_[v.i].spec;
    const WeeklyProfile& profile = v.profile(spec);
    const double rest0 = profile.mass(now, v.f.period_end);
    const double unpaced = std::max(0.0, left - v.level);
    const auto reaches = [&](std::int64_t t) {
      const double rest = profile.mass(Nanos{t}, v.f.period_end);
      if (!(rest > 0) || !(rest0 > 0)) return true;
      const double cap = left / rest * spec.burst_hours;
      const double level =
          v.level + unpaced * (profile.mass(now, Nanos{t}) / rest0);
      return std::min(cap, level) >= target;
    };
    std::int64_t lo = now.count(), hi = v.f.period_end.count();
    if (hi <= lo) return to_end;
    while (hi - lo > 1) {
      const std::int64_t mid = lo + (hi - lo) / 2;
      if (reaches(mid)) {
        hi = mid;
      } else {
        lo = mid;
      }
    }
    return Nanos{hi} - now;
  }

  Accountant<C>& acct_;
  C clock_;
  std::vector<Paced> paced_;
  AlertCallback on_alert_;
  mutable detail::Mutex mu_;
  // "budget index/subject key" -> its pace.
  absl::flat_hash_map<std::string, State> states_ ABSL_GUARDED_BY(mu_);
  std::size_t prune_at_ ABSL_GUARDED_BY(mu_) = 4096;
};

}  // namespace ratekeeper

#endif  // RATEKEEPER_BUDGET_PACING_HPP_
