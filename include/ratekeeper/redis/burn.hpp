// ratekeeper/redis/burn.hpp: the burn model's hourly buckets in Redis.
//
// Defines detail::RedisBurn: RedisAccountant's settlements, bucketed by hour
// in Redis so that every instance forecasts from one history
// (budget/forecast.hpp has the model). Layout: one hash per budget, subject
// and week, <prefix><budget>#burn<week>:{<tenant hex>}<subject hex>, whose
// fields are Unix hour indices and values the spend settled in that hour
// (HINCRBY), expiring (weeks + 1) weeks after its last write. Every key of a
// subject carries its tenant's hash tag: one script reads or writes them
// all (Redis Cluster too).
//
// Written by one script call after a settle Redis applied (not a duplicate);
// not atomic with it: a crash between the two, a failed call, or a settle
// journaled while Redis was away and replayed later leaves its hour short.
// The forecast is advisory; the budgets stay exact. forecast() reads the
// weeks the model keeps in one call and builds a BurnTracker from them: one
// round trip and O(weeks x 168). In Redis burn_per_hour is the EWMA of the
// hour buckets (each hour's spend at its middle, the current hour's at its
// start), coarser than in process.
#ifndef RATEKEEPER_REDIS_BURN_HPP_
#define RATEKEEPER_REDIS_BURN_HPP_

#include <algorithm>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "ratekeeper/budget/forecast.hpp"
#include "ratekeeper/redis/client.hpp"
#include "ratekeeper/redis/limit_base.hpp"
#include "ratekeeper/redis/scripts.hpp"

namespace ratekeeper::detail {

// KEYS: week hashes. ARGV[1] "add": ARGV[2] the TTL (ms), then a field
// (hour) and an amount per key; "read": every field and value of every key,
// flattened.
inline const RedisScript& redis_burn_script() {
  static const RedisScript s{std::string(R"lua(
if ARGV[1] == 'add' then
  for i = 1, #KEYS do
    redis.call('HINCRBY', KEYS[i], ARGV[1 + 2 * i], ARGV[2 + 2 * i])
    redis.call('PEXPIRE', KEYS[i], ARGV[2])
  end
  return {1}
end
local out = {}
for i = 1, #KEYS do
  local kv = redis.call('HGETALL', KEYS[i])
  for j = 1, #kv, 2 do
    out[#out + 1] = tonumber(kv[j])
    out[#out + 1] = tonumber(kv[j + 1])
  end
end
return out
)lua")};
  return s;
}

class RedisBurn {
 public:
  static constexpr std::int64_t kHourNs = WeeklyProfile::kHourNs;

  RedisBurn(std::shared_ptr<RedisClient> client, ForecastOptions o = {})
      : client_(std::move(client)), o_(o) {}

  struct Entry {
    std::string_view budget;  // its name
    std::string_view key;     // the subject's key under its scope
    std::uint64_t amount;
  };

  // Adds `entries` (one tenant's) at `at`; an error is returned, nothing
  // retried.
  absl::Status add(std::string_view tenant, std::span<const Entry> entries,
                   Nanos at) {
    const std::int64_t h = hour(at);
    std::vector<std::string> keys, args{"add", std::to_string(ttl_ms())};
    for (const Entry& e : entries) {
      if (e.amount == 0) continue;
      keys.push_back(key(e.budget, tenant, e.key, week(h)));
      args.push_back(std::to_string(h));
      args.push_back(std::to_string(
          std::min<std::uint64_t>(e.amount, std::uint64_t{1} << 53)));
    }
    if (keys.empty()) return absl::OkStatus();
    return run(keys, args).status();
  }

  // A tracker holding the hours Redis has for (budget, tenant, key) in the
  // weeks the model keeps up to `now`.
  absl::StatusOr<BurnTracker> load(std::string_view budget,
                                   std::string_view tenant,
                                   std::string_view subject, Nanos now) {
    const std::int64_t w = week(hour(now));
    std::vector<std::string> keys;
    for (std::int64_t k = w - static_cast<std::int64_t>(o_.weeks); k <= w;
         ++k) {
      keys.push_back(key(budget, tenant, subject, k));
    }
    absl::StatusOr<std::vector<std::int64_t>> r = run(keys, {"read"});
    if (!r.ok()) return r.status();
    std::vector<std::pair<std::int64_t, double>> hours;
    for (std::size_t i = 0; i + 1 < r->size(); i += 2) {
      hours.emplace_back((*r)[i], static_cast<double>((*r)[i + 1]));
    }
    std::sort(hours.begin(), hours.end());
    BurnTracker t(o_);
    const std::int64_t h0 = hour(now);
    for (const auto& [h, amount] : hours) {
      if (h > h0) continue;
      t.add(amount, Nanos{h * kHourNs + (h == h0 ? 0 : kHourNs / 2)});
    }
    return t;
  }

  const ForecastOptions& options() const noexcept { return o_; }

 private:
  static std::int64_t hour(Nanos t) {
    const std::int64_t c = t.count();
    return c >= 0 ? c / kHourNs : -((-c + kHourNs - 1) / kHourNs);
  }
  static std::int64_t week(std::int64_t h) {
    return h >= 0 ? h / 168 : -((-h + 167) / 168);
  }
  std::int64_t ttl_ms() const {
    return (static_cast<std::int64_t>(o_.weeks) + 1) * 168 * 3'600'000;
  }
  std::string key(std::string_view budget, std::string_view tenant,
                  std::string_view subject, std::int64_t w) const {
    std::string name(budget);
    name += "#burn";
    name += std::to_string(w);
    return redis_key(client_->options().prefix, name, tenant, subject);
  }
  absl::StatusOr<std::vector<std::int64_t>> run(
      const std::vector<std::string>& keys,
      const std::vector<std::string>& args) {
    std::vector<std::string_view> k(keys.begin(), keys.end());
    std::vector<std::string_view> a(args.begin(), args.end());
    return client_->eval_ints<std::vector<std::int64_t>>(redis_burn_script(), k,
                                                         a);
  }

  std::shared_ptr<RedisClient> client_;
  ForecastOptions o_;
};

}  // namespace ratekeeper::detail

#endif  // RATEKEEPER_REDIS_BURN_HPP_
