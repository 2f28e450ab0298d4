// ratekeeper/redis/books.hpp: a RedisAccountant's state, and what happens
// to a reservation after reserve(): settle, release, extension, the soft
// thresholds they cross.
//
// Defines:
//   detail::RedisBooks  the accountant's budgets, client, journal and
//                       counters (RedisAccountant, redis/accountant.hpp, is
//                       the facade over them), and the reservation's
//                       settle / release / extend by the rules of
//                       budget/rules.hpp
//   RedisReservation's members (declared in redis/reservation.hpp)
#ifndef RATEKEEPER_REDIS_BOOKS_HPP_
#define RATEKEEPER_REDIS_BOOKS_HPP_

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/container/inlined_vector.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "ratekeeper/budget/accountant.hpp"
#include "ratekeeper/budget/prices.hpp"
#include "ratekeeper/detail/strings.hpp"
#include "ratekeeper/redis/budget_scripts.hpp"
#include "ratekeeper/redis/burn.hpp"
#include "ratekeeper/redis/chain.hpp"
#include "ratekeeper/redis/journal_replay.hpp"
#include "ratekeeper/redis/local_shares.hpp"
#include "ratekeeper/redis/reservation.hpp"

namespace ratekeeper::detail {

// RedisBooks: the state is public to the facade (RedisAccountant); set up
// by create and add_budget, then only read, but for the atomics, the
// journal (which locks itself) and the reservations' own fields.
class RedisBooks {
 public:
  using ThresholdCallback = std::function<void(const ThresholdEvent&)>;

  RedisBooks(PriceTable prices, std::shared_ptr<RedisClient> client,
             RedisAccountantOptions options)
      : prices_(std::move(prices)),
        client_(std::move(client)),
        chain_(client_),
        options_(std::move(options)),
        scripts_(client_, options_, budgets_),
        journal_(client_, options_) {
    std::random_device rd;
    instance_ = (std::uint64_t{rd()} << 32) ^ rd();
  }
  RedisBooks(const RedisBooks&) = delete;
  RedisBooks& operator=(const RedisBooks&) = delete;

  absl::StatusOr<const RedisBudget*> find_budget(std::string_view name) const {
    for (const RedisBudget& b : budgets_) {
      if (b.spec.name == name) return &b;
    }
    return absl::NotFoundError(
        absl::StrCat("no budget named \"", av(name), "\""));
  }

  // A key of the tenant's slot per reservation: the instance and a count,
  // under a name no budget can have ('#').
  std::string mark_key(std::string_view tenant) {
    char id[16];
    const std::uint64_t n =
        instance_ + next_.fetch_add(1, std::memory_order_relaxed);
    for (int i = 0; i < 8; ++i) {
      id[i] = static_cast<char>(instance_ >> (8 * i));
      id[8 + i] = static_cast<char>(n >> (8 * i));
    }
    return scripts_.key("#res", tenant, std::string_view(id, sizeof id));
  }

  absl::StatusOr<Settlement> settle_reservation(RedisReservation& r,
                                                const Usage& used) {
    journal_.replay_if_due();
    absl::StatusOr<Money> cost = PriceTable::cost(r.prices_, used);
    if (!cost.ok()) return cost.status();
    const Settlement s{*cost, used.total(),
                       used.source != UsageSource::kReported};
    absl::InlinedVector<Cost, 4> actual;
    for (const auto& it : r.items_) {
      actual.push_back(settle_target(false, it.money, s));
    }
    const auto e = scripts_.settle_or_release(r, "settle", actual, &s);
    absl::StatusOr<BudgetScripts::Ints> reply = scripts_.run(e);
    Settlement out = s;
    // The id was settled before (here or on another instance): the first
    // settlement stands, and every hold of this reservation goes back
    // (rules.hpp, rule 3): the script gave back its holds in Redis, the
    // kLocal shares and the rate limits are settled to nothing below.
    bool duplicate = false;
    if (reply.ok()) {
      absl::StatusOr<BudgetScripts::SettleReply> sr =
          BudgetScripts::read_settle(*reply, r.items_.size());
      if (!sr.ok()) return sr.status();
      if (sr->first) {
        duplicate = true;
        out = *sr->first;
      } else if (on_threshold_ && !sr->after.empty()) {
        // An overage crosses thresholds too, in the period open now only
        // (rules.hpp, rule 4): one counted in a period that has ended
        // changes nothing now.
        for (std::size_t i = 0; i < r.items_.size(); ++i) {
          if (!period_open_now(r, i)) continue;
          const std::int64_t after = sr->after[i];
          const Cost held = r.items_[i].held - r.items_[i].unrecorded;
          if (after < 0 || actual[i] <= held) continue;
          const auto a = static_cast<std::uint64_t>(after);
          const Cost extra = actual[i] - held;
          fire_crossed(r, i, a >= extra ? a - extra : 0, a,
                       budgets_[r.items_[i].budget].limit->limit());
        }
      }
      // issue 18: a settlement applied here feeds the hourly buckets of
      // the forecast (redis/burn.hpp: advisory, not atomic with it).
      if (!duplicate) feed_burn(r, actual);
    } else if (absl::IsUnavailable(reply.status()) ||
               (RedisClient::is_auth_error(reply.status()) &&
                journal_.enabled())) {
      // Credentials refused: nothing ran, and the charge is kept in the
      // journal until they work again (without a journal, the status).
      if (absl::Status st = journal_.append(e); !st.ok()) {
        // Not journaled: nothing happened that a later settle cannot do.
        return st;
      }
    } else {
      return reply.status();
    }
    if (duplicate) {
      for (std::size_t i = 0; i < r.items_.size(); ++i) {
        actual[i] = settle_target(true, r.items_[i].money, s);
      }
    }
    LocalShares::settle(r, actual, budgets_);
    settle_limits(r, duplicate ? nullptr : &s);
    r.done_ = true;
    r.settled_ = out;
    return out;
  }

  // The rate limits passed to reserve(), through their receipts, as the
  void feed_burn(const RedisReservation& r, std::span<const Cost> actual) {
    absl::InlinedVector<RedisBurn::Entry, 4> e;
    for (std::size_t i = 0; i < r.items_.size(); ++i) {
      e.push_back(
          {budgets_[r.items_[i].budget].spec.name, r.items_[i].key, actual[i]});
    }
    static_cast<void>(burn_.add(r.tenant_, e, unix_now(options_)));
  }

  // in-process Accountant settles them: given back (`s` null: released, or
  // settled as a duplicate); settled, each to its unit's amount
  // (detail::limit_target; a request limit keeps its request). Each limit
  // by its own clock (Redis's, or a kLocal share's). A settle Redis does
  // not answer leaves that limit holding its take (the conservative side:
  // it ends with the take's window or stretch).
  void settle_limits(RedisReservation& r, const Settlement* s) {
    for (std::size_t i = 0; i < r.first_budget_; ++i) {
      LimitResult& lr = r.decision_.results[i];
      if (!lr.receipt) continue;
      Cost actual = 0;
      if (s != nullptr) {
        const std::optional<Cost> to =
            limit_target(false, lr.limit->unit(), *s);
        if (!to) {
          lr.receipt = Receipt();  // the request happened: it stays counted
          continue;
        }
        actual = *to;
      }
      if (absl::Status st =
              chain_.settle(r.decision_, i, actual, test_now(options_));
          !st.ok()) {
        lr.receipt = Receipt();
      }
    }
  }

  absl::StatusOr<bool> extend(RedisReservation& r, std::uint64_t output) {
    Usage u;
    u.input_uncached = r.estimate_.prompt_tokens;
    u.output = output;
    absl::StatusOr<Money> cost = PriceTable::cost(r.prices_, u);
    if (!cost.ok()) return cost.status();
    absl::InlinedVector<Cost, 4> add;
    bool any = false;
    for (const auto& it : r.items_) {
      add.push_back(growth(it.held, budget_amount(it.money, *cost, u.total())));
      any = any || add.back() != 0;
    }
    if (!any) return true;
    if (r.backed_) {
      absl::StatusOr<BudgetScripts::Ints> reply =
          scripts_.run(scripts_.extend(r, add));
      if (reply.ok()) {
        auto after = BudgetScripts::read_extend(*reply, r.items_.size());
        if (!after.ok()) return after.status();
        if (!*after) return false;
        for (std::size_t i = 0; i < r.items_.size(); ++i) {
          r.items_[i].held += add[i];
          // Growth in a period that has ended fires nothing now (rules.hpp,
          // rule 4).
          if (on_threshold_ && add[i] > 0 && period_open_now(r, i)) {
            const auto a = static_cast<std::uint64_t>((**after)[i]);
            fire_crossed(r, i, a >= add[i] ? a - add[i] : 0, a,
                         budgets_[r.items_[i].budget].limit->limit());
          }
        }
        return true;
      }
      if (!absl::IsUnavailable(reply.status())) return reply.status();
    }
    // Redis away: each budget's fail mode; the extension is not in Redis.
    return LocalShares::extend(r, add, budgets_);
  }

  // Whether item `i`'s period (the reservation's) is the one open now.
  bool period_open_now(const RedisReservation& r, std::size_t i) const {
    const Period& p = *budgets_[r.items_[i].budget].spec.period;
    return fires_now(p.index_of(r.decision_.at),
                     p.index_of(unix_now(options_)));
  }

  // Fires each soft threshold of item `i`'s budget that its spend crossed
  // going from `before` to `after`, once per key and period across every
  // instance (a key in Redis remembers it; Redis away: not fired).
  void fire_crossed(const RedisReservation& r, std::size_t i,
                    std::uint64_t before, std::uint64_t after,
                    std::uint64_t limit) {
    const RedisBudget& b = budgets_[r.items_[i].budget];
    for (const std::uint32_t t : b.spec.soft_permille) {
      if (!crosses(before, after, limit, t)) continue;
      const Period::Span span = b.spec.period->span_of(r.decision_.at);
      std::string what =
          absl::StrCat(b.spec.name, "/", t, "/", span.index, "/");
      what += r.items_[i].key;
      const std::int64_t ttl_ms = std::max<std::int64_t>(
          1, (span.end - r.decision_.at).count() / 1'000'000 + 3'600'000);
      if (scripts_.fire_once(scripts_.key("#fired", r.tenant_, what), ttl_ms)) {
        on_threshold_(
            ThresholdEvent{b.spec.name, r.items_[i].key, t, after, limit});
      }
    }
  }

  void release_reservation(RedisReservation& r) noexcept {
    if (r.done_) return;
    r.done_ = true;
    LocalShares::settle(r, {}, budgets_);
    settle_limits(r, nullptr);
    if (!r.backed_) return;  // nothing held in Redis
    const auto e = scripts_.settle_or_release(r, "release", {}, nullptr);
    absl::StatusOr<BudgetScripts::Ints> reply = scripts_.run(e);
    if (!reply.ok() && (absl::IsUnavailable(reply.status()) ||
                        RedisClient::is_auth_error(reply.status()))) {
      // Journaled, or (no journal) held until the period ends: the
      // conservative side.
      static_cast<void>(journal_.append(e));
    }
  }

  const PriceTable prices_;
  const std::shared_ptr<RedisClient> client_;
  RedisChain chain_;
  const RedisAccountantOptions options_;
  std::vector<RedisBudget> budgets_;
  const BudgetScripts scripts_;
  JournalReplayer journal_;
  RedisBurn burn_{client_};  // issue 18: hourly spend for the forecast
  std::uint64_t instance_ = 0;
  std::atomic<std::uint64_t> next_{0};
  std::atomic<std::uint64_t> fallback_reserves_{0};
  std::atomic<std::uint64_t> auth_refusals_{0};
  ThresholdCallback on_threshold_;
};

}  // namespace ratekeeper::detail

namespace ratekeeper {

inline RedisReservation& RedisReservation::operator=(
    RedisReservation&& o) noexcept {
  if (this != &o) {
    release();
    acct_ = std::exchange(o.acct_, nullptr);
    decision_ = std::move(o.decision_);
    first_budget_ = o.first_budget_;
    request_id_ = std::move(o.request_id_);
    tenant_ = std::move(o.tenant_);
    mark_ = std::move(o.mark_);
    prices_ = o.prices_;
    estimate_ = o.estimate_;
    items_ = std::move(o.items_);
    reserved_money_ = o.reserved_money_;
    reserved_tokens_ = o.reserved_tokens_;
    backed_ = o.backed_;
    local_ = o.local_;
    done_ = o.done_;
    settled_ = o.settled_;
    worst_output_ = o.worst_output_;
  }
  return *this;
}

inline absl::StatusOr<Settlement> RedisReservation::settle(const Usage& used) {
  if (settled_) return *settled_;
  if (acct_ == nullptr || !granted() || done_) {
    return absl::FailedPreconditionError(
        "settle: the reservation was not granted or was released");
  }
  return acct_->settle_reservation(
      *this, detail::partial_charge(
                 used, estimate_,
                 std::max(estimate_.max_output_tokens, worst_output_)));
}

inline absl::StatusOr<bool> RedisReservation::next_chunk_fits(
    std::uint64_t output_so_far, std::uint64_t next_tokens) {
  if (acct_ == nullptr || !granted() || done_) {
    return absl::FailedPreconditionError(
        "next_chunk_fits: the reservation is not live");
  }
  if (output_so_far > kMaxUsageTokens || next_tokens > kMaxUsageTokens) {
    return absl::InvalidArgumentError(
        "next_chunk_fits: token counts must be at most 2^48");
  }
  absl::StatusOr<bool> fits = acct_->extend(*this, output_so_far + next_tokens);
  if (fits.ok() && *fits) {
    worst_output_ = std::max(worst_output_, output_so_far + next_tokens);
  }
  return fits;
}

inline void RedisReservation::release() noexcept {
  if (acct_ != nullptr && granted() && !done_)
    acct_->release_reservation(*this);
  acct_ = nullptr;
}

}  // namespace ratekeeper

#endif  // RATEKEEPER_REDIS_BOOKS_HPP_
