// ratekeeper/redis.hpp: limits kept in Redis, shared by every instance.
//
// The Redis layer, one header for all of it (each part is a header of
// ratekeeper/redis/, which may be included alone). Defines:
//   RedisOptions   where Redis is, the key prefix, timeouts, the pool size,
//                  credentials (AUTH, SELECT), an address map for tunnels,
//                  failover (pool bound, probes, slot map reads, WAIT)
//   RedisClient    pools of hiredis connections (one per node, bounded)
//                  that run the policies' Lua twins by EVALSHA, loading a
//                  script again when Redis answers NOSCRIPT (a restart,
//                  SCRIPT FLUSH); a circuit breaker per node
//   RedisLimit<P>  a Limit (chain.hpp) whose state lives in Redis: each
//                  acquire, peek, take, charge or settle is one script, one
//                  round trip, atomic on the server, timed by Redis's TIME
//                  so that instances with skewed clocks share one clock; a
//                  take's Receipt is placed and settled by Redis's clock
//   RedisChain     several Redis limits for one call in one script, all or
//                  nothing on the server (one script per Cluster slot when
//                  it mixes scopes: all or nothing through receipts)
//   RedisScope     whether a limit's key counts per tenant in a chain (the
//                  default) or once for all (kGlobal)
//   RedisLease     quota leasing: a key's tokens taken a batch at a time,
//                  served in process
//   RedisPermits   a concurrency limit in Redis (issue 17): a sorted set
//                  of holders per key, expiring by Redis's TIME
//   FailMode       what a RedisLimit answers when Redis cannot: kOpen
//                  (admit), kClosed (refuse) or kLocal (an in-process limit
//                  at this instance's share); every such answer counted
//
// The client keeps a circuit breaker per node, waits on every socket
// against a deadline, and speaks to a Redis Cluster (slot map, MOVED, ASK,
// the map read again after a node fails) when told to. Needs hiredis
// (libhiredis-dev); CMake target ratekeeper::redis. docs/redis.md has the
// design and the figures.
//
//   auto redis = RedisClient::create({.host = "10.0.0.7", .port = 6379});
//   auto rpm = RedisLimit<SlidingWindow>::create(
//       {.name = "rpm"}, SlidingWindow::create(per_minute(60)).value(),
//       *redis, {.fail = FailMode::kClosed});
//   Decision d = (*rpm)->acquire(key, 1, SteadyClock{}.now());
//
// Exactness: a script computes in microseconds (TIME's unit) with Lua's
// doubles, exact below 2^53. create() refuses a policy whose period is not a
// whole number of microseconds or whose numbers could leave that range; then
// every decision equals the C++ policy's step at the same time, with waits
// rounded up to the microsecond (tests/redis_test.cpp runs shared vectors
// through both).
#ifndef RATEKEEPER_REDIS_HPP_
#define RATEKEEPER_REDIS_HPP_

#include "ratekeeper/redis/chain.hpp"    // RedisChain
#include "ratekeeper/redis/client.hpp"   // RedisClient
#include "ratekeeper/redis/lease.hpp"    // RedisLease
#include "ratekeeper/redis/limit.hpp"    // RedisLimit<P>
#include "ratekeeper/redis/options.hpp"  // RedisOptions, FailMode...
#include "ratekeeper/redis/permits.hpp"  // RedisPermits (issue 17)
#include "ratekeeper/redis/scripts.hpp"  // RedisScript

#endif  // RATEKEEPER_REDIS_HPP_
