// ratekeeper/redis/reservation.hpp: what a RedisAccountant is created with
// and what its reserve() returns.
//
// Defines:
//   RedisAccountantOptions  the tenant (hash tag), TTLs, the journal's path,
//                           a test clock, the replay slice
//   RedisReservation        one call's worst case held in Redis (move-only,
//                           released by its destructor unless settled); its
//                           members are defined in redis/books.hpp
//   detail::unix_now, test_now, now_arg
//                           the options' clock: the system's, or the test's
//
// Include redis/accountant.hpp (RedisAccountant) to use them.
#ifndef RATEKEEPER_REDIS_RESERVATION_HPP_
#define RATEKEEPER_REDIS_RESERVATION_HPP_

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/inlined_vector.h"
#include "absl/status/statusor.h"
#include "ratekeeper/budget/accountant.hpp"
#include "ratekeeper/budget/money.hpp"
#include "ratekeeper/budget/prices.hpp"
#include "ratekeeper/budget/usage.hpp"
#include "ratekeeper/chain.hpp"
#include "ratekeeper/decision.hpp"
#include "ratekeeper/identity.hpp"

namespace ratekeeper {

// RedisAccountantOptions
//   tenant           the subject fields whose key is every key's hash tag:
//                    one tenant's budgets (and the rate limits reserved
//                    with them) share one Redis Cluster slot. Every budget's
//                    scope should contain it (a team budget under an org
//                    tenant), and a subject must have its fields.
//   reservation_ttl  how long a reservation's key ("its holds are out")
//                    lives; a settle after it charges the whole actual cost
//                    (the holds stay until their period ends): over-counts,
//                    never loses a charge
//   settled_ttl      how long a request id stays settled (exactly-once
//                    window: a retry after it is charged again)
//   journal_path     where settles and releases wait while Redis is away
//                    (one file per instance; empty: no journal)
//   test_clock       tests: run the scripts at this Unix time instead of
//                    Redis's TIME (budgets created with test_time)
//   replay_slice     the most time a reserve or settle spends replaying the
//                    journal before its own call (0: an eighth of the
//                    client's command_timeout); the rest waits for the next
//                    calls (docs/redis.md, "The journal")
struct RedisAccountantOptions {
  Scope tenant = Scope(Field::kOrg);
  Nanos reservation_ttl = std::chrono::hours(24);
  Nanos settled_ttl = std::chrono::hours(24 * 7);
  std::string journal_path{};
  std::function<Nanos()> test_clock{};
  Nanos replay_slice = Nanos{0};
};

class RedisAccountant;
namespace detail {
class RedisBooks;
class BudgetScripts;
class LocalShares;
}  // namespace detail

// RedisReservation: the worst case of one call, held in Redis. Move-only.
// settle() once; unsettled, the destructor releases it.
class RedisReservation {
 public:
  RedisReservation() = default;
  RedisReservation(RedisReservation&& o) noexcept { *this = std::move(o); }
  RedisReservation& operator=(RedisReservation&& o) noexcept;
  RedisReservation(const RedisReservation&) = delete;
  RedisReservation& operator=(const RedisReservation&) = delete;
  ~RedisReservation() { release(); }

  bool granted() const noexcept { return decision_.allowed; }
  // Refused by one of the budgets (403) rather than a rate limit (429).
  bool refused_by_budget() const noexcept {
    if (decision_.allowed) return false;
    return decision_.binding != ChainDecision::npos &&
           decision_.binding >= first_budget_;
  }
  // Redis decided it (false: the budgets' fail modes did, Redis being away).
  bool backed() const noexcept { return backed_; }
  const ChainDecision& decision() const noexcept { return decision_; }
  const std::string& request_id() const noexcept { return request_id_; }
  Money reserved_money() const noexcept { return reserved_money_; }
  std::uint64_t reserved_tokens() const noexcept { return reserved_tokens_; }

  // settle
  //
  // As Reservation::settle (accountant.hpp): the actual cost replaces the
  // hold, exactly once per request id across every instance; a retry gets
  // the first settlement. While Redis is away the settle is journaled and
  // this instance's pricing returned (if the id turns out to be settled
  // already when it replays, the first settlement stands). kUnavailable
  // only without a journal, or when the journal's write or sync failed
  // (then it may be called again);
  // kFailedPrecondition for a refused or released reservation. A partial
  // usage (UsageSource::kPartial) is charged as Reservation::settle does:
  // the worst-case output, flagged estimated.
  absl::StatusOr<Settlement> settle(const Usage& used);

  // As Reservation::settle_partial: the caller's count of the output of a
  // stream that did not finish.
  absl::StatusOr<Settlement> settle_partial(
      const Usage& partial, std::uint64_t counted_output_tokens) {
    Usage u = partial;
    u.source = UsageSource::kPartial;
    return settle(detail::partial_charge(u, estimate_, counted_output_tokens));
  }

  // A stream without a usage object: the prompt estimate and the counted
  // output, flagged estimated.
  absl::StatusOr<Settlement> settle_without_usage(
      std::uint64_t counted_output_tokens) {
    return settle(detail::counted_usage(estimate_, counted_output_tokens));
  }
  absl::StatusOr<Settlement> cancel_after_dispatch(
      std::uint64_t counted_output_tokens = 0) {
    return settle_without_usage(counted_output_tokens);
  }

  // next_chunk_fits
  //
  // Streaming, as Reservation::next_chunk_fits: within the reservation the
  // next chunk fits; beyond it, every budget grows by the difference (one
  // script, all or nothing, in the reservation's period) or the answer is
  // false and the caller cuts the stream. While Redis is away the budgets'
  // fail modes answer (kClosed: false; kOpen: true; kLocal: the share).
  absl::StatusOr<bool> next_chunk_fits(std::uint64_t output_so_far,
                                       std::uint64_t next_tokens);

  // Gives back everything held (journaled while Redis is away).
  void release() noexcept;

 private:
  // The accountant's parts that settle, release and extend it
  // (redis/books.hpp), build its scripts' calls (redis/budget_scripts.hpp)
  // and take from the kLocal shares (redis/local_shares.hpp).
  friend class RedisAccountant;
  friend class detail::RedisBooks;
  friend class detail::BudgetScripts;
  friend class detail::LocalShares;
  struct Item {
    std::size_t budget;  // index in the accountant
    std::string key;     // the subject's key under the budget's scope
    Cost held;
    bool money;
    Cost unrecorded = 0;  // of `held`, granted while Redis was away
    // Receipts of what this budget's kLocal share took while Redis was away
    // (extensions; the reserve's own is in decision_ when the chain fell
    // back): settle_local settles them.
    std::vector<Receipt> local{};
  };

  detail::RedisBooks* acct_ = nullptr;
  ChainDecision decision_;
  std::size_t first_budget_ = 0;  // decision_.results index of budget 0
  std::string request_id_;
  std::string tenant_;
  std::string mark_;  // the reservation's key
  Prices prices_;
  Estimate estimate_;
  absl::InlinedVector<Item, 4> items_;
  Money reserved_money_;
  std::uint64_t reserved_tokens_ = 0;
  bool backed_ = false;
  bool local_ = false;  // holds taken from kLocal shares (Redis away)
  bool done_ = false;
  std::optional<Settlement> settled_;
  // The most output next_chunk_fits has held room for (0: none asked).
  std::uint64_t worst_output_ = 0;
};

namespace detail {

// The accountant's time: Unix time by the test clock if set, else the
// system clock.
inline Nanos unix_now(const RedisAccountantOptions& o) {
  if (o.test_clock) return o.test_clock();
  return std::chrono::duration_cast<Nanos>(
      std::chrono::system_clock::now().time_since_epoch());
}
// The test clock's time (nullopt: none; the scripts use Redis's TIME).
inline std::optional<Nanos> test_now(const RedisAccountantOptions& o) {
  if (o.test_clock) return o.test_clock();
  return std::nullopt;
}
// The scripts' `now` argument: the test clock's time in microseconds, or
// empty (Redis's TIME).
inline std::string now_arg(const RedisAccountantOptions& o) {
  return o.test_clock ? std::to_string(o.test_clock().count() / 1000)
                      : std::string();
}

}  // namespace detail
}  // namespace ratekeeper

#endif  // RATEKEEPER_REDIS_RESERVATION_HPP_
