// ratekeeper/redis/limit.hpp: RedisLimit<P>, the Limit of policy P with its
// state in Redis.
#ifndef RATEKEEPER_REDIS_LIMIT_HPP_
#define RATEKEEPER_REDIS_LIMIT_HPP_

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
#include "ratekeeper/redis/codec.hpp"
#include "ratekeeper/redis/limit_base.hpp"
#include "ratekeeper/redis/twins.hpp"

namespace ratekeeper {

// RedisLimit<P>: the Limit of policy P with its state in Redis. Its own
// acquire, peek, take, charge and settle name a key's state with an empty
// tag (Redis Cluster then hashes the whole key); in a RedisChain the
// chain's tenant is the tag (RedisScope::kTenant, the default: use such a
// limit one way or the other), or, with RedisScope::kGlobal, the same
// untagged key as its own calls: one count for all.
//
// A take's Receipt records Redis's TIME of the take (Receipt::at) and what
// the script placed it at (see RedisPlace); settle() sends it back to the
// script, which settles it as the C++ policy's settle() does, judged by
// Redis's clock (the caller's `now` is not used, unless test_time): a
// chain's roll-back, a lease's return and a call settled to its actual
// cost all give back at most what is still outstanding of the take by
// Redis's time, and charge an excess at once as a debt.
template <class P>
class RedisLimit final : public RedisLimitBase {
 public:
  // create
  //
  // kInvalidArgument for bad options (as make_limit), no client, or a
  // policy whose Lua twin could not be exact (see the file comment).
  static absl::StatusOr<std::unique_ptr<RedisLimit>> create(
      const LimitOptions& options, P policy,
      std::shared_ptr<RedisClient> client, RedisLimitOptions redis = {}) {
    if (client == nullptr) {
      return absl::InvalidArgumentError("RedisLimit: no client");
    }
    if (options.name.find_first_of("{}") != std::string::npos) {
      // check_limit_options refuses them too; this says why for Redis.
      return absl::InvalidArgumentError(absl::StrCat(
          "RedisLimit \"", absl::CEscape(options.name),
          "\": a limit name with '{' or '}' would be the hash tag of its "
          "Redis keys (every key of the limit in one Cluster slot, the "
          "tenant's tag ignored)"));
    }
    if (absl::Status st = detail::check_limit_options(options); !st.ok()) {
      return st;
    }
    absl::StatusOr<detail::TwinParams> params =
        detail::RedisTwin<P>::params(policy);
    if (!params.ok()) return params.status();
    std::unique_ptr<PolicyLimit<P>> local;
    if (redis.fail == FailMode::kLocal) {
      if (redis.instances == 0) {
        return absl::InvalidArgumentError(
            "RedisLimit: kLocal needs instances >= 1");
      }
      absl::StatusOr<P> share = detail::share_of(policy, redis.instances);
      if (!share.ok()) return share.status();
      auto made = make_limit(options, *std::move(share),
                             ShardedOptions{.capacity = 1 << 14});
      if (!made.ok()) return made.status();
      local = *std::move(made);
    }
    auto out = std::unique_ptr<RedisLimit>(
        new RedisLimit(options, std::move(policy), std::move(client), redis,
                       *std::move(params)));
    out->local_ = std::move(local);
    return out;
  }

  Limit* local_limit() noexcept override { return local_.get(); }

  Decision acquire(std::string_view key, Cost cost, Nanos now) override {
    return run("acquire", key, cost, false, now, nullptr);
  }
  Decision peek(std::string_view key, Cost cost, Nanos now) const override {
    return const_cast<RedisLimit*>(this)->run("peek", key, cost, false, now,
                                              nullptr);
  }
  // As acquire, with a receipt when admitted: Redis's, placed by the
  // script; the local limit's when kLocal answered; none when kOpen
  // admitted without Redis (it took nothing there to give back).
  Decision take(std::string_view key, Cost cost, Nanos now,
                Receipt& receipt) override {
    return run("acquire", key, cost, false, now, &receipt);
  }
  Decision charge(std::string_view key, Cost cost, Nanos now,
                  Receipt& receipt) override {
    return run("acquire", key, cost, true, now, &receipt);
  }

  // settle
  //
  // Settles a receipt of this limit's take in one round trip, by Redis's
  // clock (`now` only with test_time, or for a receipt the kLocal fail mode
  // issued, which its local limit settles). kFailedPrecondition for a
  // closed or empty receipt, kInvalidArgument for another limit's;
  // kUnavailable when Redis could not be reached: see
  // detail::settle_in_redis for whether the receipt stays open.
  absl::StatusOr<Decision> settle(Receipt& receipt, Cost actual,
                                  Nanos now) override {
    if (!receipt.open()) {
      return absl::FailedPreconditionError(
          "receipt already settled, or empty (a refused call takes nothing)");
    }
    if (local_ != nullptr && receipt.issuer() == local_.get()) {
      return local_->settle(receipt, actual, now);
    }
    if (receipt.issuer() != this) {
      return absl::InvalidArgumentError(
          "receipt issued by another limit: a receipt is settled by the "
          "limit that took it");
    }
    detail::RedisSettle one{this, &receipt, actual};
    detail::settle_in_redis(
        *client(), std::span<detail::RedisSettle>(&one, 1),
        redis_options().test_time ? std::optional<Nanos>(now) : std::nullopt);
    return std::move(one.out);
  }

  // --- Waiting (issue 17): a token bucket's reservation held in Redis ---
  //
  // reserve
  //
  // RedisLimit<TokenBucket>: as TokenBucket::reserve in process, in one
  // round trip of the general script (lua/limits.lua, "hold"): the cost is
  // counted at once, the bucket in debt up to `max_wait`, so no later call
  // of any process overtakes it; the decision is the one a plain acquire
  // gets (a refusal with the exact wait, by Redis's clock, in whole
  // microseconds); the receipt (Redis's time of the reservation, its
  // placement) gives it back exactly with settle(receipt, 0) before its
  // time, moving every reservation behind it earlier by `holds`.
  //
  // The times are the caller's: `at` = now, `go_at` = now + retry_after
  // with test_time (Redis's time is then `now`); without it, `now` plus the
  // round trip as SteadyClock measured it, so that the call never goes
  // before its time by Redis's clock (Redis decided after `now`, and before
  // the reply), at most the reply's travel later. Pass the time of the call
  // from a clock running at real speed. `max_wait` is held in whole us
  // (rounded down); a wait whose debt would pass the script's exact range
  // ((2^52 - burst * num) / den us: centuries for a whole number of us per
  // token) is not held, though within max_wait.
  //
  // Redis not answering, the fail mode decides: kClosed (and credentials
  // refused, whatever the mode) holds nothing and refuses with fail_retry;
  // kOpen admits at once, holding nothing anywhere (an empty receipt,
  // nothing to give back), as take() does; kLocal reserves exactly in the
  // process's local share (its receipt settles there). Each counted in
  // fallbacks() (auth_failures()). Other policies: Limit::reserve (what
  // take() admits now, else a promise).
  Reserved reserve(std::string_view key, Cost cost, Nanos now,
                   Nanos max_wait) override {
    if constexpr (!std::is_same_v<P, TokenBucket>) {
      return Limit::reserve(key, cost, now, max_wait);
    } else {
      const bool test_time = redis_options().test_time;
      const std::string k =
          redis_key(client()->options().prefix, name(), {}, key);
      const std::string_view keys[] = {k};
      detail::ScriptArgs args(4);
      detail::TwinParams scratch;
      detail::append_time(args, test_time, now);
      args.add("hold");
      detail::append_item(args, *this, twin_for(now, scratch), cost, false);
      args.add_number(std::max<std::int64_t>(max_wait.count(), 0) / 1000);
      const auto sent = std::chrono::steady_clock::now();
      const absl::StatusOr<absl::InlinedVector<std::int64_t, 8>> r =
          client()->eval_ints(detail::redis_script(), keys, args.views());
      if (!r.ok() || r->size() != 9 || (*r)[0] < 0) {
        return reserve_failed(
            r.ok() ? absl::InternalError("redis: malformed reply to a hold")
                   : r.status(),
            key, cost, now, max_wait);
      }
      Reserved res;
      res.at = now;
      if (!test_time) {
        res.at = add_sat(now, std::chrono::duration_cast<Nanos>(
                                  std::chrono::steady_clock::now() - sent));
      }
      res.decision = detail::decision_at(*r, 0);
      res.held = (*r)[0] == 1;
      res.go_at = res.decision.never()
                      ? Nanos::max()
                      : add_sat(res.at, res.decision.retry_after);
      if (res.held) {
        // The time the cost occupies on the bucket's timeline: the C++
        // policy's, exactly (cost * period / rate, whole ns rounded down).
        res.holds =
            policy_.holds(policy_.place(TokenBucket::State{}, Nanos{0}, cost));
        res.receipt = Receipt::issue(this, key, cost, detail::from_us((*r)[1]),
                                     detail::place_at(*r, 0, false));
      }
      return res;
    }
  }
  bool reserves_exactly() const noexcept override {
    return std::is_same_v<P, TokenBucket>;
  }
  // --- end of waiting ---

  // acquire_timed
  //
  // acquire, and the time Redis decided it (Unix time; `now` when Redis
  // could not answer).
  std::pair<Decision, Nanos> acquire_timed(std::string_view key, Cost cost,
                                           Nanos now) {
    Nanos at = now;
    const Decision d = run("acquire", key, cost, false, now, nullptr, &at);
    return {d, at};
  }

  // acquire_batch
  //
  // Many acquires, each of its own key and cost, pipelined: one write and
  // one read for all of them (one per node on a Cluster), each decided by
  // its own script on the server, in order. Each is atomic on its own; the
  // batch is not all or nothing (a RedisChain is, for the limits of one
  // call). For servers that gather the decisions of many requests (an event
  // loop): the throughput of 50 calls in flight on one connection. A call
  // Redis does not answer gets the fail mode's decision, counted.
  struct Request {
    std::string_view key;
    Cost cost = 1;
  };
  std::vector<Decision> acquire_batch(std::span<const Request> requests,
                                      Nanos now) {
    const std::size_t n = requests.size();
    // Every request's key in one buffer and every argument in one
    // ScriptArgs (the limit's parameters viewed, not copied; two numbers
    // per request, the test's time once): no string per argument.
    const std::string_view prefix = client()->options().prefix;
    std::size_t key_bytes = 0;
    for (const Request& q : requests) {
      key_bytes += redis_key_size(prefix, name(), {}, q.key);
    }
    std::string key_buf;
    key_buf.reserve(key_bytes);  // no reallocation: the views stay valid
    std::vector<std::string_view> key_views;
    key_views.reserve(n);
    for (const Request& q : requests) {
      const std::size_t at = key_buf.size();
      append_redis_key(key_buf, prefix, name(), {}, q.key);
      key_views.emplace_back(key_buf.data() + at, key_buf.size() - at);
    }
    detail::ScriptArgs args(1 + 2 * n);
    detail::TwinParams scratch;  // a budget's, for `now`: the same for all
    const detail::TwinParams& twin = twin_for(now, scratch);
    const RedisScript& script = script_for("acquire", false);
    const bool lean = &script == &detail::redis_tb_script();
    std::vector<std::size_t> first(n + 1);
    for (std::size_t i = 0; i < n; ++i) {
      first[i] = args.size();
      detail::append_time(args, redis_options().test_time, now);
      args.add("acquire");
      if (lean) {
        append_lean(args, twin, requests[i].cost);
      } else {
        detail::append_item(args, *this, twin, requests[i].cost, false);
      }
    }
    first[n] = args.size();
    const std::span<const std::string_view> all = args.views();
    std::vector<RedisClient::EvalCall> calls;
    calls.reserve(n);
    for (std::size_t i = 0; i < n; ++i) {
      calls.push_back({std::span<const std::string_view>(&key_views[i], 1),
                       all.subspan(first[i], first[i + 1] - first[i])});
    }
    // Room for the script's 9 integers inline: no allocation per reply.
    using Ints = absl::InlinedVector<std::int64_t, 12>;
    std::vector<absl::StatusOr<Ints>> replies =
        client()->template eval_pipelined<Ints>(script, calls);
    std::vector<Decision> out;
    out.reserve(n);
    for (std::size_t i = 0; i < n; ++i) {
      absl::StatusOr<Ints>& r = replies[i];
      if (r.ok() && lean && !expand_lean(*r, requests[i].cost)) {
        r = absl::InternalError("redis: malformed reply");
      }
      if (r.ok() && r->size() == 9) {
        out.push_back(detail::decision_at(*r, 0));
      } else if (r.ok() && r->size() == 2 && (*r)[0] == -2) {
        // A budget's period other than Redis's: this one alone, again.
        out.push_back(acquire(requests[i].key, requests[i].cost, now));
      } else {
        out.push_back(fail(
            r.ok() ? absl::InternalError("redis: malformed reply") : r.status(),
            "acquire", requests[i].key, requests[i].cost, now));
      }
    }
    return out;
  }

  std::uint64_t limit() const noexcept override { return policy_.limit(); }
  Nanos window() const noexcept override {
    return detail::quota_window(policy_);
  }
  // Redis holds the states: key counts are Redis's (INFO keyspace).
  StoreStats store_stats() const override { return StoreStats{}; }

  const P& policy() const noexcept { return policy_; }

  detail::TwinParams twin_at(Nanos t) const override {
    if constexpr (std::is_same_v<P, PeriodBudget>) {
      return detail::RedisTwin<PeriodBudget>::at(policy_, t);
    } else {
      return RedisLimitBase::twin_at(t);
    }
  }
  const detail::TwinParams& twin_for(
      Nanos t, detail::TwinParams& scratch) const override {
    if constexpr (std::is_same_v<P, PeriodBudget>) {
      scratch = detail::RedisTwin<PeriodBudget>::at(policy_, t);
      return scratch;
    } else {
      return RedisLimitBase::twin_for(t, scratch);
    }
  }

  Cost still_served(const Receipt& r, Cost held, Nanos t) const override {
    if (r.issuer() != this || held == 0) return 0;
    const RedisPlace p = r.placement<RedisPlace>();
    const std::int64_t t_us = t.count() / 1000;
    if constexpr (std::is_same_v<P, TokenBucket>) {
      // Tokens whose slot of the stretch starts at or after t: the held
      // ones are its tail (a lease serves from the front).
      const detail::TwinParams tw = twin_at(t);
      const detail::i128 num = std::stoll(tw[1]), den = std::stoll(tw[2]);
      const detail::i128 ahead =
          static_cast<detail::i128>(p.p2) -
          (static_cast<detail::i128>(t_us) - p.at_us) * den;
      if (ahead <= 0) return 0;
      return std::min<Cost>(held, detail::clamp_u64(ahead / num));
    } else if constexpr (std::is_same_v<P, PeriodBudget>) {
      return policy_.period().index_of(t) == p.p1 ? held : 0;
    } else {
      const std::int64_t period_us = policy_.rate().period.count() / 1000;
      return detail::floor_div_i64(t_us, period_us) == p.p1 ? held : 0;
    }
  }

 private:
  RedisLimit(const LimitOptions& o, P policy,
             std::shared_ptr<RedisClient> client, RedisLimitOptions redis,
             detail::TwinParams params)
      : RedisLimitBase(o, std::move(client), redis, std::move(params)),
        policy_(std::move(policy)) {
    if constexpr (std::is_same_v<P, TokenBucket>) {
      // The twin's numbers (RedisTwin<TokenBucket>: "tb", num, den, burst),
      // checked by create() to be below 2^53.
      const detail::TwinParams tw = RedisLimitBase::twin_at(Nanos{0});
      tb_num_ = std::stoll(tw[1]);
      tb_den_ = std::stoll(tw[2]);
      tb_burst_ = std::stoll(tw[3]);
    }
  }

  // expand_lean
  //
  // lua/token_bucket.lua's short reply, {1, now, after, aux} admitted or
  // {0, now, r} refused, made the 9 integers of lua/limits.lua's reply for
  // one token-bucket item ({all, now, allowed, limit, remaining, retry,
  // reset, p1, p2}) that decision_at() and place_at() read: the limit,
  // remaining, retry and reset computed here as limits.lua computes them,
  // exactly (integers; the twin's numbers are below 2^53). `cost` is the
  // call's, clamped as it was sent. False for a reply of another shape.
  template <class Ints>
  bool expand_lean(Ints& v, Cost cost) const {
    if constexpr (!std::is_same_v<P, TokenBucket>) {
      static_cast<void>(v);
      static_cast<void>(cost);
      return false;
    } else {
      const bool allowed = v.size() == 4 && v[0] == 1;
      if (!allowed && !(v.size() == 3 && v[0] == 0)) return false;
      using detail::i128;
      const i128 num = tb_num_, den = tb_den_, burst = tb_burst_;
      const i128 span = burst * num;
      const i128 c = static_cast<i128>(std::min<Cost>(cost, detail::kExact));
      const std::int64_t now = v[1];
      const i128 after = v[2];  // r when refused: the state as it was
      const std::int64_t aux = allowed ? v[3] : 0;
      const auto ceil_div = [](i128 x, i128 d) { return (x + d - 1) / d; };
      const i128 room = span - after;
      const i128 rem = room > 0 ? room / num : 0;
      i128 retry = 0;
      if (!allowed) {
        retry = c > burst ? -1 : ceil_div(after + c * num - span, den);
      }
      const i128 reset = after > 0 ? ceil_div(after, den) : 0;
      v.assign(
          {(allowed || shadow()) ? 1 : 0, now, allowed ? 1 : 0,
           static_cast<std::int64_t>(burst), static_cast<std::int64_t>(rem),
           static_cast<std::int64_t>(retry), static_cast<std::int64_t>(reset),
           aux, allowed ? static_cast<std::int64_t>(after) : 0});
      return true;
    }
  }

  // append_lean
  //
  // lua/token_bucket.lua's arguments after the time and the op, only what
  // it reads (each argument costs Redis a Lua string per call): the twin's
  // num, den and burst (views of `twin`, which outlives the call), the cost
  // (clamped to 2^53 as append_item clamps it) and a nonce. Its flags are
  // not sent: the lean script runs only without charge-on-reject, and a
  // shadow limit's answer is made by expand_lean.
  static void append_lean(detail::ScriptArgs& args,
                          const detail::TwinParams& twin, Cost cost) {
    args.add(twin[1]);
    args.add(twin[2]);
    args.add(twin[3]);
    args.add_number(std::min<Cost>(cost, detail::kExact));
    args.add_number(detail::redis_nonce());
  }

  // The lean script for what it covers, else the general one.
  const RedisScript& script_for(std::string_view op, bool charge) const {
    if constexpr (std::is_same_v<P, TokenBucket>) {
      if ((op == "acquire" || op == "peek") && !charge && !charge_on_reject()) {
        return detail::redis_tb_script();
      }
    }
    return detail::redis_script();
  }

  // One acquire, peek or charge; with `receipt`, the take's receipt.
  Decision run(std::string_view op, std::string_view key, Cost cost,
               bool charge, Nanos now, Receipt* receipt,
               Nanos* redis_now = nullptr) {
    if (receipt != nullptr) *receipt = Receipt();
    const std::string k =
        redis_key(client()->options().prefix, name(), {}, key);
    const std::string_view keys[] = {k};
    // Room for the script's 9 integers inline: no allocation per reply.
    using Ints = absl::InlinedVector<std::int64_t, 12>;
    absl::StatusOr<Ints> r;
    Nanos t = now;  // the time the parameters are for
    for (int attempt = 0; attempt < 2; ++attempt) {
      detail::ScriptArgs args(3);
      detail::TwinParams scratch;
      const RedisScript& script = script_for(op, charge);
      const bool lean = &script == &detail::redis_tb_script();
      detail::append_time(args, redis_options().test_time, now);
      args.add(op);
      if (lean) {
        append_lean(args, twin_for(t, scratch), cost);
      } else {
        detail::append_item(args, *this, twin_for(t, scratch), cost, charge);
      }
      r = client()->template eval_ints<Ints>(script, keys, args.views());
      if (r.ok() && lean && !expand_lean(*r, cost)) {
        r = absl::InternalError("redis: malformed reply");
      }
      // A budget's period other than Redis's: again, for Redis's time.
      if (!r.ok() || r->size() != 2 || (*r)[0] != -2) break;
      t = detail::from_us((*r)[1]);
    }
    if (!r.ok() || r->size() != 9) {
      return fail(
          r.ok() ? absl::InternalError("redis: malformed reply") : r.status(),
          charge ? "charge" : op, key, cost, now, receipt);
    }
    if (redis_now != nullptr) *redis_now = detail::from_us((*r)[1]);
    const Decision d = detail::decision_at(*r, 0);
    if (receipt != nullptr && d.allowed && op == "acquire") {
      *receipt = Receipt::issue(this, key, cost, detail::from_us((*r)[1]),
                                detail::place_at(*r, 0, false));
    }
    return d;
  }

  // Waiting (issue 17): a + b, saturated at the ends of the clock's range.
  static Nanos add_sat(Nanos a, Nanos b) noexcept {
    return Nanos{
        detail::clamp_i64(static_cast<detail::i128>(a.count()) + b.count())};
  }
  // Waiting (issue 17): the fail mode's answer to a reservation Redis did
  // not answer (see reserve()).
  Reserved reserve_failed(const absl::Status& why, std::string_view key,
                          Cost cost, Nanos now, Nanos max_wait) {
    if (redis_options().fail == FailMode::kLocal &&
        !RedisClient::is_auth_error(why)) {
      note_fallback(why);
      return local_->reserve(key, cost, now, max_wait);
    }
    Reserved res;
    res.at = now;
    res.decision = fail(why, "acquire", key, cost, now);
    res.held = res.decision.allowed;  // kOpen: nothing counted anywhere
    res.go_at = res.decision.never() ? Nanos::max()
                                     : add_sat(now, res.decision.retry_after);
    return res;
  }

  const P policy_;
  std::unique_ptr<PolicyLimit<P>> local_;  // kLocal only
  // TokenBucket only: the twin's num, den and burst (expand_lean).
  std::int64_t tb_num_ = 0, tb_den_ = 0, tb_burst_ = 0;
};

}  // namespace ratekeeper

#endif  // RATEKEEPER_REDIS_LIMIT_HPP_
