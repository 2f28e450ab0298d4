// ratekeeper/redis/local_shares.hpp: a RedisAccountant's reservation while
// Redis is away: what the budgets' fail modes grant, and the kLocal shares
// (an in-process budget at the instance's share) that count it.
//
// Defines (namespace detail):
//   LocalShares  an extension granted by the fail modes (next_chunk_fits
//                with Redis away), and the settle of what the kLocal shares
//                took, through their receipts
#ifndef RATEKEEPER_REDIS_LOCAL_SHARES_HPP_
#define RATEKEEPER_REDIS_LOCAL_SHARES_HPP_

#include <algorithm>
#include <cstddef>
#include <span>
#include <utility>
#include <vector>

#include "absl/container/inlined_vector.h"
#include "absl/status/status.h"
#include "ratekeeper/chain.hpp"
#include "ratekeeper/redis/budget_scripts.hpp"
#include "ratekeeper/redis/reservation.hpp"

namespace ratekeeper::detail {

class LocalShares {
 public:
  // extend
  //
  // Redis away: each budget's fail mode answers for growing `r` by `add`
  // (kClosed: false; kOpen: true; kLocal: a take from the instance's share,
  // all or nothing, in the reservation's period). Granted, the growth is
  // held but not in Redis (`unrecorded`), so a settle charges it there in
  // full; each take's receipt goes with its budget, to be settled with it.
  static bool extend(RedisReservation& r, std::span<const Cost> add,
                     const std::vector<RedisBudget>& budgets) {
    absl::InlinedVector<ChainItem, 4> local;
    for (std::size_t i = 0; i < r.items_.size(); ++i) {
      if (add[i] == 0) continue;
      RedisLimit<PeriodBudget>& l = *budgets[r.items_[i].budget].limit;
      l.note_fallback(absl::UnavailableError("redis away: extension"));
      if (l.redis_options().fail == FailMode::kClosed) return false;
      if (l.local_limit() != nullptr) {
        local.push_back({l.local_limit(), r.items_[i].key, add[i]});
      }
    }
    if (!local.empty()) {
      Chain<ManualClock> c{ManualClock(r.decision_.at)};
      ChainDecision taken =
          c.acquire_at(std::span<const ChainItem>(local), r.decision_.at);
      if (!taken.allowed) return false;
      std::size_t j = 0;
      for (std::size_t i = 0; i < r.items_.size(); ++i) {
        if (add[i] == 0 ||
            budgets[r.items_[i].budget].limit->local_limit() == nullptr) {
          continue;
        }
        r.items_[i].local.push_back(std::move(taken.results[j++].receipt));
      }
      r.local_ = true;
    }
    for (std::size_t i = 0; i < r.items_.size(); ++i) {
      r.items_[i].held += add[i];
      r.items_[i].unrecorded += add[i];
    }
    return true;
  }

  // settle
  //
  // kLocal holds (taken while Redis was away) settle in process too, so the
  // instance's share keeps counting what it admitted.
  //
  // Through the receipts of the local takes: the reserve's (in decision_,
  // when the chain fell back to the local shares) and each extension's;
  // the give-backs bounded by each receipt, an excess on the last one, all
  // in the period each was counted in (PeriodBudget::settle). `actual`
  // empty: everything given back.
  static void settle(RedisReservation& r, std::span<const Cost> actual,
                     const std::vector<RedisBudget>& budgets) {
    if (!r.local_) return;
    const Nanos at = r.decision_.at;
    for (std::size_t i = 0; i < r.items_.size(); ++i) {
      auto& it = r.items_[i];
      Limit* l = budgets[it.budget].limit->local_limit();
      if (l == nullptr) continue;
      absl::InlinedVector<Receipt*, 4> receipts;
      if (!r.backed_) {
        Receipt& first = r.decision_.results[r.first_budget_ + i].receipt;
        if (first) receipts.push_back(&first);
      }
      for (Receipt& x : it.local) {
        if (x) receipts.push_back(&x);
      }
      Cost left = actual.empty() ? 0 : actual[i];
      for (std::size_t k = 0; k < receipts.size(); ++k) {
        const bool last = k + 1 == receipts.size();
        const Cost to = last ? left : std::min(left, receipts[k]->cost());
        left -= to;
        static_cast<void>(l->settle(*receipts[k], to, at));
      }
      it.local.clear();
    }
  }
};

}  // namespace ratekeeper::detail

#endif  // RATEKEEPER_REDIS_LOCAL_SHARES_HPP_
