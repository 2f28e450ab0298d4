// ratekeeper/redis/codec.hpp: the scripts' arguments and replies, and the
// settling of Redis receipts.
#ifndef RATEKEEPER_REDIS_CODEC_HPP_
#define RATEKEEPER_REDIS_CODEC_HPP_

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
#include "ratekeeper/redis/client.hpp"
#include "ratekeeper/redis/limit_base.hpp"
#include "ratekeeper/redis/scripts.hpp"

namespace ratekeeper::detail {

// A random number below 2^50 per call: where the script finds a bucket's
// state absent (never seen, idle, or lost) its give-back counter starts
// there, so a receipt from another life of the state gives nothing back
// (lua/limits.lua). Per thread, splitmix64 seeded once from the OS.
inline std::uint64_t redis_nonce() noexcept {
  thread_local std::uint64_t state = [] {
    std::uint64_t seed = static_cast<std::uint64_t>(
        std::chrono::steady_clock::now().time_since_epoch().count());
    try {
      std::random_device rd;
      seed ^= (static_cast<std::uint64_t>(rd()) << 32) ^ rd();
    } catch (...) {
      // No entropy source: the clock and this thread's address serve.
    }
    return seed ^ reinterpret_cast<std::uintptr_t>(&seed);
  }();
  std::uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return (z ^ (z >> 31)) >> 14;
}

// The script's arguments for one item of "acquire", "peek" or "reserve"
// (see lua/limits.lua).
inline void append_item(absl::InlinedVector<std::string, 24>& args,
                        const RedisLimitBase& l, Cost cost, bool charge,
                        Nanos t) {
  for (std::string& p : l.twin_at(t)) args.push_back(std::move(p));
  // Costs at or above 2^53 exceed every limit a twin accepts: the same
  // decisions as the exact cost, in Lua's exact range.
  args.push_back(std::to_string(std::min<Cost>(cost, kExact)));
  args.push_back(std::to_string((l.shadow() ? 1 : 0) |
                                (charge || l.charge_on_reject() ? 2 : 0)));
  args.push_back(std::to_string(redis_nonce()));
}

inline Nanos from_us(std::int64_t us) {
  return Nanos{clamp_i64(static_cast<i128>(us) * 1000)};
}

// Item i's decision in a reply of `stride` integers per item (7 for
// acquire, peek and reserve: the decision and the take's placement; 5 for
// a settle).
inline Decision decision_at(std::span<const std::int64_t> v, std::size_t i,
                            std::size_t stride = 7) {
  const std::size_t b = 2 + stride * i;
  return Decision{v[b] == 1, static_cast<std::uint64_t>(v[b + 1]),
                  static_cast<std::uint64_t>(v[b + 2]),
                  v[b + 3] < 0 ? kNever : from_us(v[b + 3]), from_us(v[b + 4])};
}

// Item i's placement in an acquire's reply, at Redis's time of the reply.
inline RedisPlace place_at(std::span<const std::int64_t> v, std::size_t i,
                           bool key_is_redis_key) {
  const std::size_t b = 2 + 7 * i;
  return RedisPlace{v[1], v[b + 5], v[b + 6], key_is_redis_key};
}

// One receipt to settle in Redis.
struct RedisSettle {
  RedisLimitBase* limit = nullptr;
  Receipt* receipt = nullptr;
  Cost actual = 0;
  absl::StatusOr<Decision> out = absl::InternalError("redis: not run");
};

// The Redis key a receipt's take is kept under: the receipt's key itself
// for a RedisChain's take, else the limit's own key.
inline std::string receipt_key(const RedisClient& client,
                               const RedisSettle& s) {
  const RedisPlace p = s.receipt->placement<RedisPlace>();
  return p.redis_key ? std::string(s.receipt->key())
                     : redis_key(client.options().prefix, s.limit->name(), {},
                                 s.receipt->key());
}

// settle_in_redis
//
// Settles receipts issued by Redis limits of `client` (whose keys share one
// slot on a Cluster: RedisChain groups them) in one script, each judged by
// Redis's clock (or `test_now`), in order. Each item's `out` is what a
// zero-cost call would now be told, or kUnavailable when Redis could not be
// reached. A receipt is closed once Redis ran its settle, and also when it may
// have run (a time-out after sending: settling it again could give back twice,
// so the give-back is lost, the conservative side); one never sent (breaker
// open, no connection) stays open, to be settled again.
inline void settle_in_redis(RedisClient& client, std::span<RedisSettle> items,
                            std::optional<Nanos> test_now) {
  if (items.empty()) return;
  absl::InlinedVector<std::string, 8> keys;
  for (const RedisSettle& s : items) keys.push_back(receipt_key(client, s));
  absl::InlinedVector<std::string_view, 8> kv(keys.begin(), keys.end());
  Nanos t = test_now.value_or(std::chrono::duration_cast<Nanos>(
      std::chrono::system_clock::now().time_since_epoch()));
  absl::StatusOr<absl::InlinedVector<std::int64_t, 8>> r;
  for (int attempt = 0; attempt < 2; ++attempt) {
    absl::InlinedVector<std::string, 24> args;
    args.push_back(test_now ? std::to_string(test_now->count() / 1000)
                            : std::string());
    args.emplace_back("receipt");
    for (const RedisSettle& s : items) {
      const RedisPlace p = s.receipt->placement<RedisPlace>();
      for (std::string& a : s.limit->twin_at(t)) args.push_back(std::move(a));
      args.push_back(std::to_string(s.receipt->cost()));
      args.push_back(std::to_string(std::min<Cost>(s.actual, kExact)));
      args.push_back(std::to_string(p.at_us));
      args.push_back(std::to_string(p.p1));
      args.push_back(std::to_string(p.p2));
      args.push_back(std::to_string(redis_nonce()));
    }
    absl::InlinedVector<std::string_view, 24> av(args.begin(), args.end());
    r = client.eval_ints(redis_script(), kv, av);
    // A budget's period other than Redis's: again, for Redis's time.
    if (!r.ok() || r->size() != 2 || (*r)[0] != -2) break;
    t = from_us((*r)[1]);
  }
  const bool answered = r.ok() && r->size() == 2 + 5 * items.size();
  for (std::size_t i = 0; i < items.size(); ++i) {
    RedisSettle& s = items[i];
    if (answered) {
      s.out = decision_at(*r, i, 5);
      s.receipt->close();
      continue;
    }
    const absl::Status why =
        r.ok() ? absl::InternalError("redis: malformed reply to a settle")
               : r.status();
    s.limit->note_error(why);
    const bool may_have_run = !r.ok() ? RedisClient::may_have_run(why) : true;
    if (may_have_run) s.receipt->close();
    s.out = absl::Status(
        why.code(),
        absl::StrCat("settle of a Redis receipt: ", why.message(),
                     may_have_run ? " (it may have run: the receipt is closed, "
                                    "its give-back lost, nothing given twice)"
                                  : " (not run: the receipt stays open, "
                                    "settle it again)"));
  }
}

}  // namespace ratekeeper::detail

#endif  // RATEKEEPER_REDIS_CODEC_HPP_
