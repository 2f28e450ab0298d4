// ratekeeper/ratekeeper.hpp: the umbrella header.
//
// Includes every header that needs nothing beyond abseil: clocks, decisions,
// the three policies, the in-memory store and the limiter. Opt-in headers
// with further dependencies (ratekeeper/fmt.hpp for {fmt}) are not included.
#ifndef RATEKEEPER_RATEKEEPER_HPP_
#define RATEKEEPER_RATEKEEPER_HPP_

#include "ratekeeper/clock.hpp"
#include "ratekeeper/config.hpp"
#include "ratekeeper/decision.hpp"
#include "ratekeeper/limiter.hpp"
#include "ratekeeper/policy/fixed_window.hpp"
#include "ratekeeper/policy/policy.hpp"
#include "ratekeeper/policy/sliding_window.hpp"
#include "ratekeeper/policy/token_bucket.hpp"
#include "ratekeeper/store/in_memory.hpp"
#include "ratekeeper/store/sharded.hpp"
#include "ratekeeper/store/store.hpp"

#endif  // RATEKEEPER_RATEKEEPER_HPP_
