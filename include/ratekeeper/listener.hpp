// ratekeeper/listener.hpp: callbacks on what one limit decides (issue 17).
//
// Defines LimitEvent and LimitListener (Bucket4j's BucketListener, .NET's
// RateLimiter statistics): a limit with a listener set
// (Limit::set_listener) calls it on each allow, deny, near-limit and
// give-back it decides, with the key, the cost and the decision.
//
//   struct Alerts : ratekeeper::LimitListener {
//     void on_denied(const ratekeeper::LimitEvent& e) override {
//       log_429(e.limit->name(), e.key, e.decision.retry_after);
//     }
//   };
//   limit->set_listener(std::make_shared<Alerts>());
//
// Rules (docs/chains.md, "Listeners and statistics"):
//   - called on the caller's thread, synchronously, after the limit's store
//     has published the decision: it cannot change or delay the decision
//     beyond its own run time, so it must not block (queue the event to
//     another thread for slow work);
//   - called concurrently from every thread deciding on the limit: a
//     listener is thread-safe;
//   - an exception it throws is caught and counted
//     (LimitStatistics::listener_errors, ratekeeper_listener_errors_total),
//     never passed to the caller: the decision and its receipt stand;
//   - the event's key and decision are valid during the call only.
// What a listener hears is the limit's own decisions (PolicyLimit's
// acquire, take, charge and settle), so a call a chain allowed here and
// another limit vetoed is heard as allowed, then given back (the chain's
// roll-back). LimitCounts (metrics.hpp) count chains' outcomes instead.
#ifndef RATEKEEPER_LISTENER_HPP_
#define RATEKEEPER_LISTENER_HPP_

#include <string_view>

#include "ratekeeper/decision.hpp"

namespace ratekeeper {

class Limit;

// LimitEvent: one decision of one limit.
//
//   limit     the limit that decided.
//   key       the key it decided on.
//   cost      the call's cost; for a give-back, the units the settle was
//             asked to return (taken - actual; the policy returns at most
//             what is still outstanding of the take).
//   decision  the decision; for a give-back, what a zero-cost call on the
//             key is told afterwards.
//   at        the limit's time of the decision.
struct LimitEvent {
  const Limit* limit = nullptr;
  std::string_view key;
  Cost cost = 0;
  Decision decision;
  Nanos at{0};
};

// LimitListener: override the events you want; the others do nothing.
class LimitListener {
 public:
  virtual ~LimitListener() = default;
  // An admitted call (acquire, take, or a charge that fitted).
  virtual void on_allowed(const LimitEvent& /*e*/) {}
  // A refused call (a charge on reject that did not fit included).
  virtual void on_denied(const LimitEvent& /*e*/) {}
  // After on_allowed, when the call left the key with remaining at or below
  // the limit's near-limit threshold (Limit::near_limit_permille).
  virtual void on_near_limit(const LimitEvent& /*e*/) {}
  // A receipt settled below its take (the unused part of an estimate, a
  // call that did not happen, a chain's roll-back).
  virtual void on_given_back(const LimitEvent& /*e*/) {}
};

}  // namespace ratekeeper

#endif  // RATEKEEPER_LISTENER_HPP_
