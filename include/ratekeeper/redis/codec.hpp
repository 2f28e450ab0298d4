// ratekeeper/redis/codec.hpp: the scripts' arguments and replies, and the
// settling of Redis receipts.
#ifndef RATEKEEPER_REDIS_CODEC_HPP_
#define RATEKEEPER_REDIS_CODEC_HPP_

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <forward_list>
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

// ScriptArgs: a script call's arguments, as the string_views RedisClient
// sends, with no std::string per argument. Constants (an op, a limit's
// kind and parameters, formatted once at create) are viewed where they
// live; this call's numbers are formatted into a buffer sized up front
// (room for `numbers` of them), so the views into it stay valid; past
// that room, each further number gets a string of its own (never
// invalidated either). Neither copied nor moved: the views point into it.
class ScriptArgs {
 public:
  explicit ScriptArgs(std::size_t numbers) : buf_(numbers * kDigits) {}
  ScriptArgs(const ScriptArgs&) = delete;
  ScriptArgs& operator=(const ScriptArgs&) = delete;

  // A string that outlives the call.
  void add(std::string_view constant) { views_.push_back(constant); }
  // A number, in decimal.
  template <class Int>
  void add_number(Int v) {
    static_assert(std::is_integral_v<Int>);
    char* const at = buf_.data() + used_;
    const std::to_chars_result r =
        std::to_chars(at, buf_.data() + buf_.size(), v);
    if (r.ec == std::errc()) {
      const auto n = static_cast<std::size_t>(r.ptr - at);
      used_ += n;
      views_.emplace_back(at, n);
    } else {
      views_.emplace_back(spill_.emplace_front(std::to_string(v)));
    }
  }
  // The arguments, in the order added.
  std::span<const std::string_view> views() const { return views_; }
  std::size_t size() const noexcept { return views_.size(); }

 private:
  static constexpr std::size_t kDigits = 20;  // 2^64 - 1, or a '-' and 19
  absl::InlinedVector<char, 12 * kDigits> buf_;
  std::size_t used_ = 0;
  absl::InlinedVector<std::string_view, 24> views_;
  // Numbers past the buffer (none, as sized by the callers): stable
  // addresses, and nothing allocated until one is needed (a deque allocates
  // its map on construction, once per script call).
  std::forward_list<std::string> spill_;
};

// A flags argument (lua/limits.lua: 1 shadow, 2 charge on reject).
inline std::string_view flags_arg(bool shadow, bool charge) {
  static constexpr std::string_view kFlags[] = {"0", "1", "2", "3"};
  return kFlags[(shadow ? 1 : 0) | (charge ? 2 : 0)];
}

// The script's arguments for one item of "acquire", "peek" or "reserve"
// (see lua/limits.lua): the limit's parameters `twin` (l.twin_for(t, ...),
// which must outlive the call), the cost, the flags and a nonce; two
// numbers.
inline void append_item(ScriptArgs& args, const RedisLimitBase& l,
                        const TwinParams& twin, Cost cost, bool charge) {
  for (const std::string& p : twin) args.add(p);
  // Costs at or above 2^53 exceed every limit a twin accepts: the same
  // decisions as the exact cost, in Lua's exact range.
  args.add_number(std::min<Cost>(cost, kExact));
  args.add(flags_arg(l.shadow(), charge || l.charge_on_reject()));
  args.add_number(redis_nonce());
}
// The script's first argument: with test_time, the caller's `now` (us),
// else empty (Redis's TIME).
inline void append_time(ScriptArgs& args, bool test_time, Nanos now) {
  if (test_time) {
    args.add_number(now.count() / 1000);
  } else {
    args.add(std::string_view());
  }
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
    ScriptArgs args(1 + 6 * items.size());
    absl::InlinedVector<TwinParams, 4> scratch(items.size());
    append_time(args, test_now.has_value(), test_now.value_or(Nanos{0}));
    args.add("receipt");
    for (std::size_t i = 0; i < items.size(); ++i) {
      const RedisSettle& s = items[i];
      const RedisPlace p = s.receipt->placement<RedisPlace>();
      for (const std::string& a : s.limit->twin_for(t, scratch[i])) {
        args.add(a);
      }
      args.add_number(s.receipt->cost());
      args.add_number(std::min<Cost>(s.actual, kExact));
      args.add_number(p.at_us);
      args.add_number(p.p1);
      args.add_number(p.p2);
      args.add_number(redis_nonce());
    }
    const std::span<const std::string_view> av = args.views();
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
