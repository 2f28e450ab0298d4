// ratekeeper/ratekeeper.hpp: the umbrella header.
//
// Includes every header that needs nothing beyond abseil: clocks, decisions,
// the three policies, the stores, the limiter, chains, concurrency permits,
// identities, client addresses and tiers. Opt-in headers that need {fmt}
// (ratekeeper/fmt.hpp, errors.hpp, prometheus.hpp, http/headers.hpp) are not
// included.
#ifndef RATEKEEPER_RATEKEEPER_HPP_
#define RATEKEEPER_RATEKEEPER_HPP_

#include "ratekeeper/chain.hpp"
#include "ratekeeper/clock.hpp"
#include "ratekeeper/concurrency.hpp"
#include "ratekeeper/config.hpp"
#include "ratekeeper/decision.hpp"
#include "ratekeeper/identity.hpp"
#include "ratekeeper/ip.hpp"
#include "ratekeeper/limiter.hpp"
#include "ratekeeper/listener.hpp"
#include "ratekeeper/metrics.hpp"
#include "ratekeeper/overrides.hpp"
#include "ratekeeper/permits.hpp"
#include "ratekeeper/policy/fixed_window.hpp"
#include "ratekeeper/policy/policy.hpp"
#include "ratekeeper/policy/sliding_window.hpp"
#include "ratekeeper/policy/token_bucket.hpp"
#include "ratekeeper/provider/formats.hpp"  // issue 18
#include "ratekeeper/provider/headers.hpp"  // issue 18
#include "ratekeeper/provider/limits.hpp"   // issue 18
#include "ratekeeper/provider/resync.hpp"   // issue 18
#include "ratekeeper/store/in_memory.hpp"
#include "ratekeeper/store/sharded.hpp"
#include "ratekeeper/store/store.hpp"
#include "ratekeeper/tiers.hpp"
#include "ratekeeper/waiting.hpp"
#include "ratekeeper/warm_up.hpp"

#endif  // RATEKEEPER_RATEKEEPER_HPP_
