// ratekeeper/redis/chain.hpp: RedisChain, several Redis limits for one call
// in one script (one per Cluster slot when it mixes scopes).
#ifndef RATEKEEPER_REDIS_CHAIN_HPP_
#define RATEKEEPER_REDIS_CHAIN_HPP_

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
#include "ratekeeper/redis/chain_parts.hpp"
#include "ratekeeper/redis/codec.hpp"
#include "ratekeeper/redis/limit.hpp"

namespace ratekeeper {

// RedisChain: several Redis limits for one call, decided by one script: one
// round trip, atomic on the server, all or nothing as Chain (chain.hpp) with
// one difference that only helps: a refused chain never took anything, so
// there is no give-back and no window in which others see its take. Every
// item's limit must be a RedisLimit on this chain's client. The tenant is
// the hash tag of every kTenant limit's key (one Redis Cluster slot per
// tenant): pass the same tenant for a key every time. A kGlobal limit's key
// is its own (RedisScope), whatever the tenant.
//
// On a single Redis every chain is one script. On a Cluster, a chain whose
// kGlobal keys lie outside the tenant's slot runs one script per slot (one
// round trip each), the tenant's last, still all or nothing for the
// caller: once a part refuses, the later ones only look (charges on reject
// still count) and what the earlier ones took is given back through their
// receipts (while it is held, others can see it: the window an in-process
// Chain has). Thread-safe.
//
// An allowed chain's results hold receipts (LimitResult::receipt) for what
// each limit took, placed by the script by Redis's clock; settle() and
// give_back() send them back in one script, judged by Redis's clock. (A
// chain receipt's key() is the Redis key, which carries the tenant.)
class RedisChain {
 public:
  explicit RedisChain(std::shared_ptr<RedisClient> client)
      : client_(std::move(client)) {}

  // acquire
  //
  // ChainDecision as Chain::acquire; `at` is Redis's time of the decision.
  // When Redis cannot answer, each limit's fail mode answers (counted on
  // each): kLocal limits with their local receipts, the others with none.
  // `test_now` (tests): decide at that time instead of Redis's, for limits
  // created with test_time.
  ChainDecision acquire(std::string_view tenant,
                        std::span<const ChainItem> items,
                        std::optional<Nanos> test_now = std::nullopt) {
    return run("acquire", tenant, items, test_now).decision;
  }
  ChainDecision peek(std::string_view tenant, std::span<const ChainItem> items,
                     std::optional<Nanos> test_now = std::nullopt) {
    return run("peek", tenant, items, test_now).decision;
  }

  // settle
  //
  // As Chain::settle: result `index` settled to its actual cost (the unused
  // part given back, at most what is still outstanding of it by Redis's
  // clock; an excess charged as a debt). kOutOfRange for a bad index,
  // kFailedPrecondition for a result holding no open receipt, kUnavailable
  // when Redis could not be reached (see detail::settle_in_redis: a settle
  // never sent leaves the receipt open).
  absl::Status settle(ChainDecision& d, std::size_t index, Cost actual,
                      std::optional<Nanos> test_now = std::nullopt) {
    if (index >= d.results.size()) {
      return absl::OutOfRangeError(
          absl::StrCat("chain result ", index, " of ", d.results.size()));
    }
    if (!d.results[index].receipt) {
      return absl::FailedPreconditionError(
          "receipt already settled, or empty (a refused call takes nothing)");
    }
    const std::size_t which[] = {index};
    return settle_some(d, which, actual, test_now);
  }

  // settle
  //
  // Every open result of `unit` settled to `actual`, in one round trip.
  // kFailedPrecondition when none was open.
  absl::Status settle(ChainDecision& d, Unit unit, Cost actual,
                      std::optional<Nanos> test_now = std::nullopt) {
    absl::InlinedVector<std::size_t, 4> which;
    for (std::size_t i = 0; i < d.results.size(); ++i) {
      if (d.results[i].limit->unit() == unit && d.results[i].receipt) {
        which.push_back(i);
      }
    }
    if (which.empty()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "no open ", detail::av(unit_name(unit)), " receipt in the chain"));
    }
    return settle_some(d, which, actual, test_now);
  }

  // give_back
  //
  // Every open result settled to 0 (the call did not happen), in one round
  // trip. kUnavailable when Redis could not be reached (receipts not sent
  // stay open: call it again).
  absl::Status give_back(ChainDecision& d,
                         std::optional<Nanos> test_now = std::nullopt) {
    absl::InlinedVector<std::size_t, 4> which;
    for (std::size_t i = 0; i < d.results.size(); ++i) {
      if (d.results[i].receipt) which.push_back(i);
    }
    if (which.empty()) return absl::OkStatus();
    return settle_some(d, which, 0, test_now);
  }

  struct Outcome {
    ChainDecision decision;
    bool reached = false;  // Redis answered
    absl::Status error;    // why not
    // The request id was settled already: its settlement's cost (nano-USD),
    // tokens and estimated flag, as Redis holds them; nothing was taken.
    std::optional<std::array<std::int64_t, 3>> settled;
  };

  // reserve (for RedisAccountant)
  //
  // acquire, and when the chain admits, `mark` (a key of the tenant's slot)
  // is set for `ttl` in the same script: it says the holds are out; unless
  // `settled` (the request id's settlement key, same slot) exists, which
  // takes nothing and answers `settled`. When Redis cannot answer, the fail
  // modes decide (`reached` false), at the system clock's time. The results
  // hold receipts as acquire's do.
  Outcome reserve(std::string_view tenant, std::span<const ChainItem> items,
                  std::string_view mark, Nanos ttl, std::string_view settled,
                  std::optional<Nanos> test_now = std::nullopt) {
    return run("reserve", tenant, items, test_now, mark, ttl, settled);
  }

 private:
  static RedisLimitBase* redis_limit(Limit* l) {
    return dynamic_cast<RedisLimitBase*>(l);
  }

  // Settles results `which` of `d` to `actual`: the receipts Redis issued
  // in one script, those a kLocal fail mode issued in process.
  absl::Status settle_some(ChainDecision& d, std::span<const std::size_t> which,
                           Cost actual, std::optional<Nanos> test_now) {
    absl::InlinedVector<detail::RedisSettle, 4> remote;
    absl::InlinedVector<std::size_t, 4> remote_at;
    absl::Status first = absl::OkStatus();
    const Nanos unix_now = test_now.value_or(std::chrono::duration_cast<Nanos>(
        std::chrono::system_clock::now().time_since_epoch()));
    for (const std::size_t i : which) {
      LimitResult& r = d.results[i];
      RedisLimitBase* l = redis_limit(r.limit);
      RATEKEEPER_ASSERT(l != nullptr, "RedisChain: not a RedisLimit");
      if (r.receipt.issuer() == l) {
        remote.push_back({l, &r.receipt, actual});
        remote_at.push_back(i);
        continue;
      }
      // A kLocal receipt (Redis was away when it was taken). The local
      // limit's clock was the chain's Unix time at the take.
      absl::StatusOr<Decision> left = l->settle(r.receipt, actual, unix_now);
      if (!left.ok()) {
        if (first.ok()) first = left.status();
        continue;
      }
      r.counted = actual != 0;
      r.decision.remaining = left->remaining;
      r.decision.reset_after = left->reset_after;
    }
    detail::settle_by_slot(*client_, std::span<detail::RedisSettle>(remote),
                           test_now);
    for (std::size_t k = 0; k < remote.size(); ++k) {
      LimitResult& r = d.results[remote_at[k]];
      if (!remote[k].out.ok()) {
        if (first.ok()) first = remote[k].out.status();
        continue;
      }
      r.counted = actual != 0;
      r.decision.remaining = remote[k].out->remaining;
      r.decision.reset_after = remote[k].out->reset_after;
    }
    return first;
  }

  // A chain split across slots refused (or its request id was settled)
  // after earlier parts admitted: what they took is given back through the
  // receipts (at most what is still outstanding, by Redis's clock: all of
  // it a moment after the take), as Chain's roll-back does. A charge on
  // reject keeps its count, its receipt dropped. A give-back Redis does not
  // answer leaves the take (the conservative side), still counted.
  void roll_back(ChainDecision& out, std::span<const ChainItem> items,
                 std::optional<Nanos> test_now) {
    absl::InlinedVector<std::size_t, 4> which;
    for (std::size_t i = 0; i < out.results.size(); ++i) {
      LimitResult& r = out.results[i];
      if (!r.receipt) continue;
      if (r.limit->charge_on_reject()) {
        r.receipt = Receipt();
        continue;
      }
      which.push_back(i);
    }
    if (which.empty()) return;
    static_cast<void>(settle_some(out, which, 0, test_now));
    // A limit and key twice: both report what is left after both.
    for (std::size_t a = 0; a < which.size(); ++a) {
      for (std::size_t b = which.size(); --b > a;) {
        const std::size_t i = which[a], j = which[b];
        if (items[j].limit == items[i].limit && items[j].key == items[i].key) {
          out.results[i].decision.remaining = out.results[j].decision.remaining;
          out.results[i].decision.reset_after =
              out.results[j].decision.reset_after;
          break;
        }
      }
    }
  }

  Outcome run(std::string_view op, std::string_view tenant,
              std::span<const ChainItem> items, std::optional<Nanos> test_now,
              std::string_view mark = {}, Nanos mark_ttl = Nanos{0},
              std::string_view settled = {}) {
    Outcome result;
    ChainDecision& out = result.decision;
    out.results.resize(items.size());
    absl::InlinedVector<std::string, 8> keys;
    absl::InlinedVector<RedisLimitBase*, 4> limits;
    for (std::size_t i = 0; i < items.size(); ++i) {
      auto* l = redis_limit(items[i].limit);
      RATEKEEPER_ASSERT(l != nullptr && l->client() == client_,
                        "RedisChain: an item that is not a RedisLimit of "
                        "this chain's client");
      limits.push_back(l);
      // A global key is the limit's own (no tag): one count for every
      // tenant, the same as the limit's own calls.
      const bool global = l->redis_options().scope == RedisScope::kGlobal;
      keys.push_back(redis_key(client_->options().prefix, l->name(),
                               global ? std::string_view() : tenant,
                               items[i].key));
      out.results[i].limit = l;
      out.results[i].cost = items[i].cost;
    }
    const bool taking = op == "acquire" || op == "reserve";
    const absl::InlinedVector<detail::ChainPart, 2> parts = detail::split_chain(
        *client_, tenant, std::span<const std::string>(keys), limits,
        !mark.empty());
    bool refused = false;
    result.reached = true;
    for (const detail::ChainPart& p : parts) {
      detail::ChainPartOutcome po = detail::run_chain_part(
          *client_, op, taking && refused, p, keys, limits, items, test_now,
          mark, mark_ttl, settled, out);
      out.at = po.at;
      if (po.settled) {
        // Retried after its settle: nothing stays taken.
        result.settled = po.settled;
        if (parts.size() > 1) roll_back(out, items, test_now);
        out.allowed = false;
        return result;
      }
      if (!po.allowed) refused = true;
      // reserve: whether its budgets' part (which holds the mark) was
      // reached; otherwise, whether every part was.
      if (p.mark || mark.empty()) {
        if (!po.reached && result.reached) {
          result.reached = false;
          result.error = po.error;
        }
      }
    }
    out.allowed = !refused;
    if (refused && taking && parts.size() > 1) roll_back(out, items, test_now);
    detail::finish_chain(out, taking);
    return result;
  }

  const std::shared_ptr<RedisClient> client_;
};

}  // namespace ratekeeper

#endif  // RATEKEEPER_REDIS_CHAIN_HPP_
