// ratekeeper/redis/budget_scripts.hpp: the budget scripts' calls of a
// RedisAccountant: their KEYS and ARGV, and what their replies say.
//
// Defines (namespace detail):
//   RedisBudget    one budget: its spec and its state in Redis
//   BudgetScripts  the calls of lua/limits.lua's budget operations on a
//                  reservation (settle, release, extend: also what the
//                  journal keeps and replays) and on a subject (spent,
//                  settled, fire), and readers of their replies
//
// The reserve itself is RedisChain's (redis/chain.hpp): the budgets are
// links of the chain with the reservation's key and its settlement's.
#ifndef RATEKEEPER_REDIS_BUDGET_SCRIPTS_HPP_
#define RATEKEEPER_REDIS_BUDGET_SCRIPTS_HPP_

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/container/inlined_vector.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "ratekeeper/budget/accountant.hpp"
#include "ratekeeper/budget/period.hpp"
#include "ratekeeper/redis/journal.hpp"
#include "ratekeeper/redis/limit.hpp"
#include "ratekeeper/redis/reservation.hpp"
#include "ratekeeper/redis/scripts.hpp"

namespace ratekeeper::detail {

// A budget of a RedisAccountant: its spec and its limit in Redis.
struct RedisBudget {
  BudgetSpec spec;
  std::unique_ptr<RedisLimit<PeriodBudget>> limit;
};

// BudgetScripts: builds the budget scripts' calls from the accountant's
// budgets and options, and reads their replies. Holds references to both
// (the accountant's, which outlives it).
class BudgetScripts {
 public:
  using Call = SettleJournal::Entry;  // KEYS, ARGV (and, journaled, a time)
  using Ints = absl::InlinedVector<std::int64_t, 8>;

  // The most a script's amount argument may be (Lua's exact range).
  static constexpr Cost kCap = kExact / 2;

  BudgetScripts(const std::shared_ptr<RedisClient>& client,
                const RedisAccountantOptions& options,
                const std::vector<RedisBudget>& budgets)
      : client_(client), options_(options), budgets_(budgets) {}

  // Runs a call of the budget script.
  absl::StatusOr<Ints> run(const Call& e) const {
    absl::InlinedVector<std::string_view, 8> k(e.keys.begin(), e.keys.end());
    absl::InlinedVector<std::string_view, 24> a(e.args.begin(), e.args.end());
    return client_->eval_ints(redis_script(), k, a);
  }

  // Keys of the tenant's slot.
  std::string key(std::string_view name, std::string_view tenant,
                  std::string_view rest) const {
    return redis_key(client_->options().prefix, name, tenant, rest);
  }
  // The settlement of request id `id` (exactly once per id and tenant).
  std::string settled_key(std::string_view tenant, std::string_view id) const {
    return key("#settled", tenant, id);
  }
  std::string settled_key(const RedisReservation& r) const {
    return settled_key(r.tenant_, r.request_id_);
  }

  // settle (with `s`: `actual` per budget) or release (`s` null, `actual`
  // empty) of `r`: the holds Redis has for it given back, the actual cost
  // charged in each budget's period of the reservation, the settlement
  // recorded.
  Call settle_or_release(const RedisReservation& r, std::string_view op,
                         std::span<const Cost> actual,
                         const Settlement* s) const {
    Call e = head(r, op);
    if (s != nullptr) e.keys.push_back(settled_key(r));
    for (std::size_t i = 0; i < r.items_.size(); ++i) {
      const auto& it = r.items_[i];
      append_period(r, i, e.args);
      // What Redis holds: extensions granted while it was away are not.
      e.args.push_back(
          std::to_string(std::min<Cost>(it.held - it.unrecorded, kCap)));
      e.args.push_back(
          std::to_string(actual.empty() ? 0 : std::min<Cost>(actual[i], kCap)));
    }
    if (s != nullptr) {
      e.args.push_back(std::to_string(
          std::max<std::int64_t>(1, options_.settled_ttl.count() / 1'000'000)));
      e.args.push_back(std::to_string(std::min<std::int64_t>(
          s->cost.nanos, static_cast<std::int64_t>(kCap))));
      e.args.push_back(std::to_string(std::min<Cost>(s->tokens, kCap)));
      e.args.emplace_back(s->estimated ? "1" : "0");
    }
    return e;
  }

  // extend: every budget of `r` grows by `add` (all or nothing, each in its
  // period of the reservation, within its limit).
  Call extend(const RedisReservation& r, std::span<const Cost> add) const {
    Call e = head(r, "extend");
    for (std::size_t i = 0; i < r.items_.size(); ++i) {
      append_period(r, i, e.args);
      e.args.push_back(
          std::to_string(budgets_[r.items_[i].budget].limit->limit()));
      e.args.push_back(std::to_string(std::min<Cost>(add[i], kCap)));
    }
    return e;
  }

  // A settle's reply: `first` set when the id was settled before (the
  // first settlement, which stands); `after` each budget's spend after it
  // (a negative value: none), empty when the reply does not have them.
  struct SettleReply {
    std::optional<Settlement> first;
    std::span<const std::int64_t> after;
  };
  static absl::StatusOr<SettleReply> read_settle(const Ints& reply,
                                                 std::size_t items) {
    if (reply.size() < 5) {
      return absl::InternalError("redis: malformed settle reply");
    }
    SettleReply out;
    if (reply[0] == 2) {
      out.first = Settlement{
          Money{reply[2]}, static_cast<std::uint64_t>(reply[3]), reply[4] != 0};
    } else if (reply.size() == 5 + items) {
      out.after = std::span<const std::int64_t>(reply.data() + 5, items);
    }
    return out;
  }

  // An extension's reply: each budget's spend after it, or nullopt when a
  // budget refused it; kFailedPrecondition when the reservation's holds are
  // gone.
  static absl::StatusOr<std::optional<std::span<const std::int64_t>>>
  read_extend(const Ints& reply, std::size_t items) {
    if (reply.size() == 2 && reply[0] == -3) {
      return absl::FailedPreconditionError(
          "next_chunk_fits: the reservation's holds are gone (released, "
          "or its key expired)");
    }
    if (reply.size() >= 2 && reply[0] == 0) {
      return std::optional<std::span<const std::int64_t>>();
    }
    if (reply.size() != 2 + items) {
      return absl::InternalError("redis: malformed extend reply");
    }
    return std::optional<std::span<const std::int64_t>>(
        std::span<const std::int64_t>(reply.data() + 2, items));
  }

  // What a budget's key `k` has spent in period `index`.
  absl::StatusOr<std::uint64_t> spent(const std::string& k,
                                      std::int64_t index) const {
    absl::StatusOr<Ints> r =
        run({{k}, {now_arg(options_), "spent", std::to_string(index)}});
    if (!r.ok()) return r.status();
    if (r->size() != 2) return absl::InternalError("redis: malformed reply");
    return static_cast<std::uint64_t>((*r)[0]);
  }

  // The settlement recorded under `settled` (nullopt: none).
  absl::StatusOr<std::optional<Settlement>> settlement(
      const std::string& settled) const {
    absl::StatusOr<Ints> r = run({{settled}, {now_arg(options_), "settled"}});
    if (!r.ok()) return r.status();
    if (r->size() == 2 && (*r)[0] == 0) return std::optional<Settlement>();
    if (r->size() != 5) return absl::InternalError("redis: malformed reply");
    return std::optional<Settlement>(Settlement{
        Money{(*r)[2]}, static_cast<std::uint64_t>((*r)[3]), (*r)[4] != 0});
  }

  // Whether this call is the first to fire `fired` (a threshold of a key in
  // a period; remembered for `ttl_ms`). An error or no answer: false.
  bool fire_once(const std::string& fired, std::int64_t ttl_ms) const {
    absl::StatusOr<Ints> r =
        run({{fired}, {now_arg(options_), "fire", std::to_string(ttl_ms)}});
    return r.ok() && r->size() == 2 && (*r)[0] == 1;
  }

 private:
  // What every script on a reservation starts with (lua/limits.lua): KEYS
  // the budgets' states and the reservation's key; ARGV now, `op` and the
  // budget count.
  Call head(const RedisReservation& r, std::string_view op) const {
    Call e;
    for (const auto& it : r.items_) {
      e.keys.push_back(key(budgets_[it.budget].spec.name, r.tenant_, it.key));
    }
    e.keys.push_back(r.mark_);
    e.args.push_back(now_arg(options_));
    e.args.emplace_back(op);
    e.args.push_back(std::to_string(r.items_.size()));
    return e;
  }

  // Item `i`'s period, the reservation's: its index and end (us).
  void append_period(const RedisReservation& r, std::size_t i,
                     std::vector<std::string>& args) const {
    TwinParams p = RedisTwin<PeriodBudget>::at(
        budgets_[r.items_[i].budget].limit->policy(), r.decision_.at);
    args.push_back(std::move(p[2]));
    args.push_back(std::move(p[4]));
  }

  const std::shared_ptr<RedisClient>& client_;
  const RedisAccountantOptions& options_;
  const std::vector<RedisBudget>& budgets_;
};

}  // namespace ratekeeper::detail

#endif  // RATEKEEPER_REDIS_BUDGET_SCRIPTS_HPP_
