// ratekeeper/budget/rules.hpp: the settlement rules both accountants follow.
//
// Accountant (budget/accountant.hpp, budgets in process) and RedisAccountant
// (budget/redis_accountant.hpp, budgets in Redis) keep their books in two
// different places; what they charge, to which period, and what a retried
// or duplicate call does is decided here, once, and both call it
// (tests/accountant_diff_test.cpp runs every scenario against both and an
// oracle of these rules). The rules (docs/budgets.md, "One set of rules"):
//
//   1. A reservation holds the priced worst case of the call in each
//      budget's unit, and at least one unit (hold_amount): a spent budget
//      refuses even an empty estimate.
//   2. A call's spend belongs to the period its reservation was counted in,
//      per budget. Every later change of that reservation (a stream's
//      growth, the settle in both directions, a release, a duplicate
//      settle's give-back) goes to that period. A budget's key holds the
//      spend of one period: the change applies while the key holds that
//      period (a charge also when it holds nothing, or an earlier one); once
//      a later period has spend on the key, the change is dropped from the
//      key (the settlement still records it) and growth is refused
//      (may_grow): a call of yesterday never spends, refunds or grows into
//      today. PeriodBudget::settle (budget/period.hpp) is this rule for a
//      key's state in process; its twin in Redis is the script's
//      budget_move and "extend" (lua/limits.lua).
//   3. A settle charges the settlement's amount in each budget's unit
//      (budget_amount) and settles each rate limit passed to reserve() to
//      its unit's amount (limit_amount). A settle of a request id that is
//      already settled (a retry, or a second reservation of the id in
//      flight) changes nothing but this reservation: every hold it took
//      goes back, budgets, rate limits and (RedisAccountant) the kLocal
//      shares it held while Redis was away, and the first settlement is the
//      answer (settle_target, limit_target with duplicate = true).
//   4. A soft threshold fires when a change of spend crosses it in the
//      period open now (fires_now), once per budget, key and period; the
//      event carries the spend after the change, past the limit if an
//      overage took it there.
#ifndef RATEKEEPER_BUDGET_RULES_HPP_
#define RATEKEEPER_BUDGET_RULES_HPP_

#include <algorithm>
#include <cstdint>
#include <optional>

#include "ratekeeper/budget/money.hpp"
#include "ratekeeper/budget/usage.hpp"
#include "ratekeeper/chain.hpp"
#include "ratekeeper/decision.hpp"
#include "ratekeeper/detail/math.hpp"

namespace ratekeeper {

// Estimate: the worst case of a call before it is made.
struct Estimate {
  std::uint64_t prompt_tokens = 0;      // estimated input
  std::uint64_t max_output_tokens = 0;  // the request's max_tokens
};

// Settlement: what a call was charged.
struct Settlement {
  Money cost;
  std::uint64_t tokens = 0;
  bool estimated = false;  // no usage from the provider: the counted estimate
  friend bool operator==(const Settlement&, const Settlement&) = default;
};

namespace detail {

// Whether a spend going from `before` to `after` reaches `permille`
// thousandths of `limit` (it was below, it is at or above).
inline bool crosses(std::uint64_t before, std::uint64_t after,
                    std::uint64_t limit, std::uint32_t permille) {
  const u128 mark = static_cast<u128>(limit) * permille;
  return static_cast<u128>(before) * 1000 < mark &&
         static_cast<u128>(after) * 1000 >= mark;
}

// A settlement's amount in one budget's unit: nano-USD or tokens.
inline Cost budget_amount(bool money, Money cost, std::uint64_t tokens) {
  return money ? static_cast<Cost>(std::max<std::int64_t>(0, cost.nanos))
               : tokens;
}

// What a rate limit passed to reserve() is settled to, in its unit: a token
// limit to the tokens the provider counted (the unused estimate back, an
// excess a debt), a money limit to the cost; nullopt for a request limit,
// which keeps its request. Both accountants settle by it.
inline std::optional<Cost> limit_amount(Unit unit, const Settlement& s) {
  switch (unit) {
    case Unit::kTokens:
      return s.tokens;
    case Unit::kNanoUsd:
      return budget_amount(true, s.cost, s.tokens);
    case Unit::kRequests:
      break;
  }
  return std::nullopt;
}

// What a call without a usage object is charged: the prompt estimate and
// the output the caller counted, flagged estimated.
inline Usage counted_usage(const Estimate& e, std::uint64_t output) {
  Usage u;
  u.input_uncached = e.prompt_tokens;
  u.output = output;
  u.source = UsageSource::kEstimated;
  return u;
}

// What a partial usage (UsageSource::kPartial: a stream cut short, or ended
// by an error event) is charged, since its counts are only a lower bound:
// the input side as the provider reported it (Anthropic's message_start
// carries all of it), or the prompt estimate where it reported none; the
// output at least `output_floor` (the caller's count, or the reservation's
// worst case) and never below what the stream reported. Flagged estimated.
// Any other usage is returned as it is.
inline Usage partial_charge(const Usage& used, const Estimate& e,
                            std::uint64_t output_floor) {
  if (used.source != UsageSource::kPartial) return used;
  Usage u = used;
  if (u.input_total() == 0) u.input_uncached = e.prompt_tokens;
  u.output = std::max(u.output, output_floor);
  u.source = UsageSource::kEstimated;
  return u;
}

// Rule 1: what a reservation holds of one budget: the worst case's amount
// in its unit, at least one unit (given back at the settle).
inline Cost hold_amount(bool money, Money cost, std::uint64_t tokens) {
  return std::max<Cost>(budget_amount(money, cost, tokens), 1);
}

// How much a budget holding `held` grows to hold `want` (a stream's next
// chunk): the difference, or nothing when it already holds enough.
inline Cost growth(Cost held, Cost want) {
  return want > held ? want - held : 0;
}

// Rule 2: whether a reservation counted in period `reserved` may grow on a
// key whose latest period with spend is `key_period` (nullopt: nothing
// spent on the key): not once a later period has spend there.
inline bool may_grow(std::optional<std::int64_t> key_period,
                     std::int64_t reserved) {
  return !key_period || *key_period <= reserved;
}

// Rule 3: what a budget of a settled reservation settles to: the
// settlement's amount, or nothing for a duplicate settle (the id was
// settled before: this reservation's holds go back).
inline Cost settle_target(bool duplicate, bool money, const Settlement& s) {
  return duplicate ? 0 : budget_amount(money, s.cost, s.tokens);
}

// And a rate limit passed to reserve(): its unit's amount, nothing for a
// duplicate; nullopt: a request limit of a call that happened keeps its
// request.
inline std::optional<Cost> limit_target(bool duplicate, Unit unit,
                                        const Settlement& s) {
  if (duplicate) return Cost{0};
  return limit_amount(unit, s);
}

// Rule 4: whether a change of spend in period `changed` may fire a
// threshold when the period open now is `now_period`.
inline bool fires_now(std::int64_t changed, std::int64_t now_period) {
  return changed == now_period;
}

}  // namespace detail
}  // namespace ratekeeper

#endif  // RATEKEEPER_BUDGET_RULES_HPP_
