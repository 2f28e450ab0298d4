// ratekeeper/redis/chain_parts.hpp: a RedisChain's scripts: how a chain's
// items split into one script per Redis Cluster slot, one part's script and
// its fail modes, and receipts settled per slot.
//
// Internal (namespace detail), used by redis/chain.hpp. Defines:
//   ChainPart, ChainPartOutcome  the items of one script, and its answer
//   split_chain()                a chain's items as parts
//   run_chain_part()             one part's script, or its fail modes
//   settle_by_slot()             receipts settled in one script per slot
#ifndef RATEKEEPER_REDIS_CHAIN_PARTS_HPP_
#define RATEKEEPER_REDIS_CHAIN_PARTS_HPP_

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>

#include "absl/container/inlined_vector.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "ratekeeper/chain.hpp"
#include "ratekeeper/clock.hpp"
#include "ratekeeper/redis/client.hpp"
#include "ratekeeper/redis/codec.hpp"
#include "ratekeeper/redis/limit_base.hpp"
#include "ratekeeper/redis/scripts.hpp"
#include "ratekeeper/redis/slots.hpp"

namespace ratekeeper::detail {

// Receipts settled in one script per Cluster slot (a chain mixing
// scopes took in several); on a single Redis, in one.
inline void settle_by_slot(RedisClient& client, std::span<RedisSettle> remote,
                           std::optional<Nanos> test_now) {
  if (!client.options().cluster || remote.size() < 2) {
    settle_in_redis(client, remote, test_now);
    return;
  }
  absl::InlinedVector<std::uint16_t, 4> slot;
  for (const RedisSettle& s : remote) {
    slot.push_back(key_slot(receipt_key(client, s)));
  }
  absl::InlinedVector<bool, 4> done(remote.size(), false);
  for (std::size_t i = 0; i < remote.size(); ++i) {
    if (done[i]) continue;
    absl::InlinedVector<RedisSettle, 4> group;
    absl::InlinedVector<std::size_t, 4> at;
    for (std::size_t j = i; j < remote.size(); ++j) {
      if (done[j] || slot[j] != slot[i]) continue;
      group.push_back(std::move(remote[j]));
      at.push_back(j);
      done[j] = true;
    }
    settle_in_redis(client, std::span<RedisSettle>(group), test_now);
    for (std::size_t k = 0; k < at.size(); ++k) {
      remote[at[k]] = std::move(group[k]);
    }
  }
}

// The items of one script, all in one Cluster slot (or any, on a single
// Redis); `mark`: it holds a reservation's two keys too.
struct ChainPart {
  absl::InlinedVector<std::size_t, 4> items;
  bool mark = false;
};

// One part's answer.
struct ChainPartOutcome {
  bool allowed = false;
  bool reached = false;
  absl::Status error;
  std::optional<std::array<std::int64_t, 3>> settled;
  Nanos at{0};
};

// How a chain's items split into scripts. A single Redis runs any keys
// in one script: one part. On a Cluster, the tenant's items (kTenant)
// and a reservation's keys make one part, in the tenant's slot (an empty
// tenant over several keys: Redis answers CROSSSLOT, as before); kGlobal
// items make one part per slot, joining the tenant's where their slot is
// the tenant's. Parts in the order of their first item, the tenant's
// (which sets a reservation's key only if all admitted) last.
inline absl::InlinedVector<ChainPart, 2> split_chain(
    const RedisClient& client, std::string_view tenant,
    std::span<const std::string> keys, std::span<RedisLimitBase* const> limits,
    bool mark) {
  absl::InlinedVector<ChainPart, 2> parts;
  if (!client.options().cluster) {
    parts.emplace_back();
    for (std::size_t i = 0; i < keys.size(); ++i) parts[0].items.push_back(i);
    parts[0].mark = mark;
    return parts;
  }
  ChainPart own;  // the tenant's
  own.mark = mark;
  // An empty tenant is no tag: its keys are not in one slot.
  const bool tagged = !tenant.empty();
  const std::uint16_t own_slot =
      tagged ? key_slot(redis_key({}, {}, tenant, {})) : 0;
  absl::InlinedVector<std::uint16_t, 2> slots;
  for (std::size_t i = 0; i < keys.size(); ++i) {
    if (limits[i]->redis_options().scope != RedisScope::kGlobal) {
      own.items.push_back(i);
      continue;
    }
    const std::uint16_t slot = key_slot(keys[i]);
    if (tagged && slot == own_slot) {
      own.items.push_back(i);
      continue;
    }
    std::size_t g = 0;
    while (g < slots.size() && slots[g] != slot) ++g;
    if (g == slots.size()) {
      slots.push_back(slot);
      parts.emplace_back();
    }
    parts[g].items.push_back(i);
  }
  // (An empty chain still runs its one script: Redis's time.)
  if (!own.items.empty() || own.mark || parts.empty()) {
    parts.push_back(std::move(own));
  }
  return parts;
}

// One part's script (decided as if an earlier item had refused when
// `vetoed`: an earlier part refused), its results written into `out`.
inline ChainPartOutcome run_chain_part(
    RedisClient& client, std::string_view op, bool vetoed,
    const ChainPart& part, std::span<const std::string> keys,
    std::span<RedisLimitBase* const> limits, std::span<const ChainItem> items,
    std::optional<Nanos> test_now, std::string_view mark, Nanos mark_ttl,
    std::string_view settled, ChainDecision& out) {
  ChainPartOutcome po;
  const std::size_t n = part.items.size();
  absl::InlinedVector<std::string_view, 8> kv;
  for (const std::size_t i : part.items) kv.emplace_back(keys[i]);
  if (part.mark) {
    kv.push_back(mark);
    kv.push_back(settled);
  }
  // A reservation's keys are in its tenant's part; the others acquire.
  const std::string op_arg = absl::StrCat(
      vetoed ? "!" : "", av(op == "reserve" && !part.mark ? "acquire" : op));
  // Budgets' periods are for the caller's time first (Unix time: the
  // test time, or the system clock), then for Redis's if it differs.
  Nanos t = test_now.value_or(std::chrono::duration_cast<Nanos>(
      std::chrono::system_clock::now().time_since_epoch()));
  absl::StatusOr<absl::InlinedVector<std::int64_t, 8>> r;
  for (int attempt = 0; attempt < 2; ++attempt) {
    ScriptArgs args(2 + 2 * n);
    absl::InlinedVector<TwinParams, 4> scratch(n);  // budgets'
    append_time(args, test_now.has_value(), test_now.value_or(Nanos{0}));
    args.add(op_arg);
    for (std::size_t j = 0; j < n; ++j) {
      const std::size_t i = part.items[j];
      append_item(args, *limits[i], limits[i]->twin_for(t, scratch[j]),
                  items[i].cost, false);
    }
    if (part.mark) {
      args.add_number(std::max<std::int64_t>(1, mark_ttl.count() / 1'000'000));
    }
    r = client.eval_ints(redis_script(), kv, args.views());
    if (!r.ok() || r->size() != 2 || (*r)[0] != -2) break;
    t = from_us((*r)[1]);
  }
  const bool taking = op == "acquire" || op == "reserve";
  if (part.mark && r.ok() && r->size() == 5 && (*r)[0] == -4) {
    po.reached = true;
    po.settled = std::array<std::int64_t, 3>{(*r)[2], (*r)[3], (*r)[4]};
    po.at = from_us((*r)[1]);
    return po;
  }
  po.reached = r.ok() && r->size() == 2 + 7 * n;
  if (!po.reached) {
    const absl::Status why =
        r.ok() ? absl::InternalError("redis: malformed reply") : r.status();
    po.error = why;
    // Each limit's fail mode, in process: kLocal limits as an in-process
    // chain of their shares (all or nothing among them, given back if a
    // closed one refuses), the others answered as their mode says (no
    // receipt: nothing was taken in Redis). Unix time, as a budget's
    // calendar needs.
    const Nanos now = t;
    po.at = now;
    po.allowed = true;
    absl::InlinedVector<ChainItem, 4> local;
    absl::InlinedVector<std::size_t, 4> local_at;
    for (const std::size_t i : part.items) {
      LimitResult& res = out.results[i];
      if (limits[i]->local_limit() != nullptr &&
          !RedisClient::is_auth_error(why)) {
        local.push_back(
            {limits[i]->local_limit(), items[i].key, items[i].cost});
        local_at.push_back(i);
        limits[i]->note_fallback(why);
        continue;
      }
      res.decision =
          limits[i]->fail(why, op, items[i].key, items[i].cost, now, nullptr);
      res.counted = false;
      if (!res.decision.allowed && !limits[i]->shadow()) po.allowed = false;
    }
    if (!local.empty()) {
      Chain<ManualClock> c{ManualClock(now)};
      ChainDecision d =
          op == "peek" || vetoed || !po.allowed
              ? c.peek(std::span<const ChainItem>(local))
              : c.acquire_at(std::span<const ChainItem>(local), now);
      for (std::size_t k = 0; k < local.size(); ++k) {
        LimitResult& res = out.results[local_at[k]];
        res.decision = d.results[k].decision;
        res.counted = d.results[k].counted;
        res.shadow_denied = d.results[k].shadow_denied;
        res.receipt = std::move(d.results[k].receipt);
      }
      if (!d.allowed) po.allowed = false;
    }
    if (vetoed) po.allowed = false;
    return po;
  }
  po.allowed = (*r)[0] == 1;
  po.at = from_us((*r)[1]);
  for (std::size_t k = 0; k < n; ++k) {
    const std::size_t i = part.items[k];
    LimitResult& res = out.results[i];
    res.decision = decision_at(*r, k);
    res.shadow_denied = !res.decision.allowed && limits[i]->shadow();
    res.counted = taking && (limits[i]->charge_on_reject() ||
                             (po.allowed && res.decision.allowed));
    // A receipt for what was taken and stays taken (a refused chain
    // took nothing but its charges on reject, never given back).
    if (taking && po.allowed && res.decision.allowed) {
      res.receipt = Receipt::issue(limits[i], keys[i], items[i].cost, po.at,
                                   place_at(*r, k, true));
    }
  }
  return po;
}

}  // namespace ratekeeper::detail

#endif  // RATEKEEPER_REDIS_CHAIN_PARTS_HPP_
