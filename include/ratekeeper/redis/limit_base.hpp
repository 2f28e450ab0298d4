// ratekeeper/redis/limit_base.hpp: what every Redis limit shares.
//
// Defines:
//   redis_key       the Redis key of a limit's key under a tenant
//   RedisPlace      where a take kept in Redis sits, in a Receipt
//   RedisLimitBase  the Limit every RedisLimit<P> is; RedisChain runs them
#ifndef RATEKEEPER_REDIS_LIMIT_BASE_HPP_
#define RATEKEEPER_REDIS_LIMIT_BASE_HPP_

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "absl/container/inlined_vector.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "ratekeeper/chain.hpp"
#include "ratekeeper/decision.hpp"
#include "ratekeeper/detail/mutex.hpp"
#include "ratekeeper/detail/strings.hpp"
#include "ratekeeper/redis/client.hpp"
#include "ratekeeper/redis/options.hpp"
#include "ratekeeper/redis/twins.hpp"

namespace ratekeeper {

// The Redis key of `key` under limit `name`, in the hash slot of `tag`:
// prefix, the name, the tag in hex inside braces, the key in hex
// ("rk:rpm:{7465616d}75736572"). Injective (hex has neither ':' nor braces,
// and neither the prefix nor a name may hold a brace: RedisClient::create
// and RedisLimit::create refuse them, so the first '{' ends the name), safe
// for any bytes of the tag and the key (a tenant or subject key holding
// braces is hex too), and every key with one tag is in one Redis Cluster
// slot. An empty tag ("{}") is no hash tag: Cluster hashes the whole key
// (RedisScope::kGlobal, and a RedisLimit's own calls). append_redis_key
// writes it at the end of `out`.
inline void append_redis_key(std::string& out, std::string_view prefix,
                             std::string_view name, std::string_view tag,
                             std::string_view key) {
  out.append(prefix);
  out.append(name);
  out.append(":{");
  detail::append_hex(out, tag);
  out.push_back('}');
  detail::append_hex(out, key);
}
// Its length, for a buffer of many (RedisLimit::acquire_batch).
inline std::size_t redis_key_size(std::string_view prefix,
                                  std::string_view name, std::string_view tag,
                                  std::string_view key) {
  return prefix.size() + name.size() + 3 + 2 * (tag.size() + key.size());
}
inline std::string redis_key(std::string_view prefix, std::string_view name,
                             std::string_view tag, std::string_view key) {
  std::string out;
  out.reserve(redis_key_size(prefix, name, tag, key));
  append_redis_key(out, prefix, name, tag, key);
  return out;
}

// RedisPlace: where a take kept in Redis sits, in a Receipt. `at_us` is
// Redis's TIME of the take (microseconds); p1, p2 are what the script
// placed it at: for a token bucket, the key's give-back counter at the take
// (p1, us) and the end of the take's stretch of its timeline (p2, in units
// of 1/den us relative to at_us: the script's state is TAT - now; the
// stretch is the cost's time before it); a window's index (p1) by Redis's
// clock; a budget's period index (p1).
// `redis_key`: the receipt's key is the Redis key itself (a RedisChain's
// take, whose key carries the chain's tenant), else the limit's own key.
struct RedisPlace {
  std::int64_t at_us = 0;
  std::int64_t p1 = 0;
  std::int64_t p2 = 0;
  bool redis_key = false;
};

// RedisLimitBase: what every RedisLimit<P> shares; RedisChain runs them.
class RedisLimitBase : public Limit {
 public:
  // Calls answered by the fail mode because Redis could not answer.
  std::uint64_t fallbacks() const noexcept {
    return fallbacks_.load(std::memory_order_relaxed);
  }
  // Calls refused because Redis refused the credentials or the user's
  // permissions (kUnauthenticated, kPermissionDenied): see fail().
  std::uint64_t auth_failures() const noexcept {
    return auth_failures_.load(std::memory_order_relaxed);
  }
  // The last reason Redis could not answer (empty when it always could).
  std::string last_error() const {
    detail::MutexLock lock(&error_mu_);
    return last_error_;
  }
  const std::shared_ptr<RedisClient>& client() const noexcept {
    return client_;
  }
  const RedisLimitOptions& redis_options() const noexcept { return redis_; }
  // Its kind and parameters, as the script reads them, for a call at `t`
  // (a budget's period depends on it).
  virtual detail::TwinParams twin_at(Nanos /*t*/) const { return params_; }
  // The same without a copy: the limit's own parameters, formatted once at
  // create, or (a budget, whose period depends on `t`) `scratch` filled
  // for t. Valid while the limit and `scratch` are, and until `scratch`
  // is filled again (one scratch per set of views).
  virtual const detail::TwinParams& twin_for(
      Nanos /*t*/, detail::TwinParams& /*scratch*/) const {
    return params_;
  }

  // How many of `held` units of the take `r` (a receipt this limit issued)
  // could still be served at Redis time `t` without exceeding the limit:
  // for a token bucket, the whole tokens of the take's stretch still ahead
  // of t (what time has not yet refilled); for a window, all of them while
  // t is in the take's window, none after. What RedisLease serves.
  virtual Cost still_served(const Receipt& r, Cost held, Nanos t) const = 0;

  // A decision of the fail mode, counted, for a call Redis did not answer:
  // `op` on `key` at the caller's `now` (kLocal decides it in process, and
  // fills `receipt` with the local limit's receipt when it admits; the
  // other modes never issue one: nothing was taken in Redis).
  //
  // Credentials Redis refuses (RedisClient::is_auth_error) are not an
  // outage: the call is refused as kClosed would refuse it, whatever the
  // fail mode (kOpen must not admit everything while a rotated password
  // or a disabled ACL user locks the service out of Redis), counted in
  // auth_failures() and the errors metric, not in fallbacks().
  Decision fail(const absl::Status& why, std::string_view op,
                std::string_view key, Cost cost, Nanos now,
                Receipt* receipt = nullptr) {
    if (receipt != nullptr) *receipt = Receipt();
    if (RedisClient::is_auth_error(why)) {
      auth_failures_.fetch_add(1, std::memory_order_relaxed);
      note_error(why);
      return Decision{false, limit(), 0, redis_.fail_retry, Nanos{0}};
    }
    note_fallback(why);
    switch (redis_.fail) {
      case FailMode::kOpen:
        return Decision{true, limit(), 0, Nanos{0}, Nanos{0}};
      case FailMode::kClosed:
        return Decision{false, limit(), 0, redis_.fail_retry, Nanos{0}};
      case FailMode::kLocal: {
        Limit& l = *local_limit();
        if (op == "peek") return l.peek(key, cost, now);
        Receipt local;
        const Decision d = op == "charge" ? l.charge(key, cost, now, local)
                                          : l.take(key, cost, now, local);
        if (receipt != nullptr) *receipt = std::move(local);
        return d;
      }
    }
    return Decision{false, limit(), 0, redis_.fail_retry, Nanos{0}};
  }

  // Counts a call Redis did not answer, and why.
  void note_fallback(const absl::Status& why) {
    fallbacks_.fetch_add(1, std::memory_order_relaxed);
    note_error(why);
  }
  // Records an error that no fail mode answered (a settle).
  void note_error(const absl::Status& why) {
    metrics().record_error();
    detail::MutexLock lock(&error_mu_);
    last_error_ = std::string(why.message());
  }

  // kLocal: the in-process limit at this instance's share (nullptr
  // otherwise).
  virtual Limit* local_limit() noexcept = 0;

 protected:
  RedisLimitBase(const LimitOptions& o, std::shared_ptr<RedisClient> client,
                 RedisLimitOptions redis, detail::TwinParams params)
      : Limit(o),
        client_(std::move(client)),
        redis_(redis),
        params_(std::move(params)) {}

 private:
  const std::shared_ptr<RedisClient> client_;
  const RedisLimitOptions redis_;
  const detail::TwinParams params_;
  std::atomic<std::uint64_t> fallbacks_{0};
  std::atomic<std::uint64_t> auth_failures_{0};
  mutable detail::Mutex error_mu_;
  std::string last_error_ ABSL_GUARDED_BY(error_mu_);
};

}  // namespace ratekeeper

#endif  // RATEKEEPER_REDIS_LIMIT_BASE_HPP_
