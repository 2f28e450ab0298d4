// ratekeeper/redis/permits.hpp: RedisPermits, a concurrency limit shared by
// many instances through Redis (issue 17).
//
// Each key is a sorted set (member "<slots>:<holder id>", score the
// holder's expiry in microseconds of Redis's TIME) that one script
// (lua/permits.lua, kPermitsScript) reads and writes atomically: it removes
// the expired holders (ZREMRANGEBYSCORE), counts the live ones' slots, and
// adds the new holder if they fit (ZADD, PEXPIRE of the key to its last
// expiry); renew is ZADD XX, release ZREM. A process that crashes holding
// permits loses them to their TTL. One key is one Redis key, hashed whole
// on a Cluster (one slot).
//
//   auto streams = ratekeeper::RedisPermits::create(
//       {.name = "streams"}, {.limit = 8, .ttl = std::chrono::minutes(2)},
//       client, {.fail = ratekeeper::FailMode::kLocal, .instances = 4})
//       .value();
//   ratekeeper::Permits<> permits(streams.get());
//   ratekeeper::Permit p = permits.acquire(user);
//
// When Redis cannot answer, the fail mode of RedisLimitOptions decides, as
// for a RedisLimit: kClosed refuses (retry_after fail_retry), kOpen admits
// holding nothing, kLocal holds a permit of an in-process ConcurrencyLimit
// of limit / instances slots (at least 1). Credentials Redis refuses are
// never a fail mode's case: the call is refused.
//
// A call not answered may still run in Redis (queued while Redis was
// paused, say): an acquire not answered would hold a slot nobody releases
// until its TTL. Its holder id is known before the call, so its release
// ("cancel": ZREM, or a tombstone that the late acquire finds and then adds
// nothing) is queued, as is a release not answered, in a bounded queue
// per RedisPermits that the next call reaching Redis sends first, in one
// pipeline (queued_releases(), dropped_releases()). A RedisPermits is a Limit
// for an in-process Chain; a RedisChain (one script per slot) does not take
// it.
#ifndef RATEKEEPER_REDIS_PERMITS_HPP_
#define RATEKEEPER_REDIS_PERMITS_HPP_

#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "ratekeeper/concurrency.hpp"
#include "ratekeeper/detail/mutex.hpp"
#include "ratekeeper/redis/client.hpp"
#include "ratekeeper/redis/codec.hpp"
#include "ratekeeper/redis/limit_base.hpp"
#include "ratekeeper/redis/options.hpp"

namespace ratekeeper {

namespace detail {
inline const RedisScript& redis_permits_script() {
  static const RedisScript s{std::string(lua::kPermitsScript)};
  return s;
}
// A Redis permit's holder, in its Receipt: this limit's random nonce and
// the permit's number (the member is "<slots>:<nonce><number>" in hex).
struct RedisPermitPlace {
  std::uint64_t nonce = 0;
  std::uint64_t number = 0;
};
}  // namespace detail

// RedisPermitsOptions: slots per key, and the TTL (a whole number of
// microseconds: Redis's TIME has no finer unit).
struct RedisPermitsOptions {
  std::uint64_t limit = 1;
  Nanos ttl = std::chrono::minutes(5);
};

class RedisPermits final : public PermitLimit {
 public:
  // kInvalidArgument for bad LimitOptions, charge_on_reject, no client,
  // limit 0 or above 2^53, a TTL not positive, not whole microseconds or
  // above 2^53 us, kLocal with instances 0.
  static absl::StatusOr<std::unique_ptr<RedisPermits>> create(
      const LimitOptions& options, const RedisPermitsOptions& p,
      std::shared_ptr<RedisClient> client, RedisLimitOptions redis = {}) {
    if (client == nullptr) {
      return absl::InvalidArgumentError("RedisPermits: no client");
    }
    if (absl::Status st = detail::check_limit_options(options); !st.ok()) {
      return st;
    }
    constexpr std::int64_t kExact = std::int64_t{1} << 53;
    if (options.charge_on_reject || p.limit == 0 ||
        p.limit > static_cast<std::uint64_t>(kExact) || p.ttl <= Nanos{0} ||
        p.ttl.count() % 1000 != 0 || p.ttl.count() / 1000 > kExact) {
      return absl::InvalidArgumentError(absl::StrCat(
          "RedisPermits \"", options.name,
          "\": limit 1 to 2^53, ttl positive and whole microseconds (below "
          "2^53 us), no charge_on_reject"));
    }
    std::unique_ptr<ConcurrencyLimit> local;
    if (redis.fail == FailMode::kLocal) {
      if (redis.instances == 0) {
        return absl::InvalidArgumentError(
            "RedisPermits: kLocal needs instances >= 1");
      }
      const std::uint64_t share =
          std::max<std::uint64_t>(1, p.limit / redis.instances);
      auto made = ConcurrencyLimit::create(
          options, {.limit = share, .ttl = p.ttl, .max_keys = 1 << 14});
      if (!made.ok()) return made.status();
      local = *std::move(made);
    }
    return std::unique_ptr<RedisPermits>(new RedisPermits(
        options, p, std::move(client), redis, std::move(local)));
  }

  Decision hold(std::string_view key, Cost cost, Nanos now, Receipt& receipt,
                absl::Status* why) override {
    receipt = Receipt();
    if (why != nullptr) *why = absl::OkStatus();
    const detail::RedisPermitPlace place{
        nonce_, next_.fetch_add(1, std::memory_order_relaxed)};
    const std::string member = member_of(cost, place);
    drain(now);
    absl::StatusOr<Reply> r = run("acquire", key, cost, member, now);
    if (!r.ok()) {
      // The script may yet run (or have run, its answer lost): its holder
      // is released by the next call that reaches Redis. A call never sent
      // (breaker open, no connection) holds nothing.
      if (cost > 0 && cost <= limit_ && RedisClient::may_have_run(r.status()) &&
          !RedisClient::is_auth_error(r.status())) {
        queue_release(key, member);
      }
      if (why != nullptr) *why = r.status();
      return fail(r.status(), key, cost, now, receipt);
    }
    if (r->ok && cost > 0) {
      receipt =
          Receipt::issue(this, key, cost, detail::from_us(r->now_us), place);
    }
    return r->decision;
  }

  // peek: the script's answer without writing; a fail mode's when Redis
  // cannot answer (kLocal: the local limit's peek).
  Decision peek(std::string_view key, Cost cost, Nanos now) const override {
    auto* self = const_cast<RedisPermits*>(this);
    self->drain(now);
    absl::StatusOr<Reply> r = self->run("peek", key, cost, "", now);
    if (r.ok()) return r->decision;
    Receipt none;
    return self->fail(r.status(), key, cost, now, none, true);
  }

  // settle: releases the permit in Redis (ZREM), whatever `actual`. One
  // whose TTL had ended frees nothing (counted in late_releases()).
  // kUnavailable when Redis did not answer: the receipt is closed and the
  // release queued (the next call that reaches Redis sends it; its TTL
  // ends the permit if the queue is full). A receipt the kLocal fail mode
  // issued is released in process.
  absl::StatusOr<Decision> settle(Receipt& receipt, Cost actual,
                                  Nanos now) override {
    if (absl::Status st = check(receipt); !st.ok()) return st;
    if (local_ != nullptr && receipt.issuer() == local_.get()) {
      return local_->settle(receipt, actual, now);
    }
    drain(now);
    const std::string member = member_of(receipt);
    absl::StatusOr<Reply> r = run("release", receipt.key(), 0, member, now);
    if (!r.ok()) {
      note_error(r.status());
      if (RedisClient::is_auth_error(r.status())) return r.status();
      queue_release(receipt.key(), member);
      receipt.close();
      return absl::Status(
          r.status().code(),
          absl::StrCat(r.status().message(),
                       " (the release is queued: the next call that reaches "
                       "Redis sends it)"));
    }
    receipt.close();
    (r->ok ? released_ : late_).fetch_add(1, std::memory_order_relaxed);
    return r->decision;
  }

  // renew: ZADD XX by Redis's time. kNotFound when the permit had expired.
  absl::StatusOr<Decision> renew(Receipt& receipt, Nanos now) override {
    if (absl::Status st = check(receipt); !st.ok()) return st;
    if (local_ != nullptr && receipt.issuer() == local_.get()) {
      return local_->renew(receipt, now);
    }
    drain(now);
    absl::StatusOr<Reply> r =
        run("renew", receipt.key(), 0, member_of(receipt), now);
    if (!r.ok()) {
      note_error(r.status());
      return r.status();
    }
    if (!r->ok) {
      return absl::NotFoundError(absl::StrCat(
          "RedisPermits \"", name(),
          "\": the permit expired (its TTL ended before the renewal); "
          "acquire again"));
    }
    return r->decision;
  }

  std::uint64_t limit() const noexcept override { return limit_; }
  // Redis holds the holders: key counts are Redis's.
  StoreStats store_stats() const override { return StoreStats{}; }

  // Calls the fail mode answered; calls refused for credentials; releases
  // in time; releases after the TTL had ended (freed nothing).
  std::uint64_t fallbacks() const noexcept {
    return fallbacks_.load(std::memory_order_relaxed);
  }
  std::uint64_t auth_failures() const noexcept {
    return auth_failures_.load(std::memory_order_relaxed);
  }
  std::uint64_t released() const noexcept {
    return released_.load(std::memory_order_relaxed);
  }
  std::uint64_t late_releases() const noexcept {
    return late_.load(std::memory_order_relaxed);
  }
  // Releases not yet sent (acquires and releases Redis did not answer),
  // and those dropped: the queue was full (kMaxQueued), or Redis refused
  // them (an error reply); each of those ends by its TTL.
  std::size_t queued_releases() const noexcept {
    return queued_n_.load(std::memory_order_relaxed);
  }
  std::uint64_t dropped_releases() const noexcept {
    return dropped_.load(std::memory_order_relaxed);
  }
  static constexpr std::size_t kMaxQueued = 4096;

  const RedisLimitOptions& redis_options() const noexcept { return redis_; }
  // kLocal: the in-process limit at this instance's share.
  ConcurrencyLimit* local_limit() noexcept { return local_.get(); }

 private:
  struct Reply {
    bool ok = false;
    std::int64_t now_us = 0;
    Decision decision;
  };

  RedisPermits(const LimitOptions& o, const RedisPermitsOptions& p,
               std::shared_ptr<RedisClient> client, RedisLimitOptions redis,
               std::unique_ptr<ConcurrencyLimit> local)
      : PermitLimit(o, p.ttl),
        client_(std::move(client)),
        redis_(redis),
        limit_(p.limit),
        ttl_us_(p.ttl.count() / 1000),
        nonce_(std::random_device{}() |
               (static_cast<std::uint64_t>(std::random_device{}()) << 32)),
        local_(std::move(local)) {}

  static std::string member_of(Cost cost, const detail::RedisPermitPlace& p) {
    return absl::StrFormat("%d:%016x%016x", cost, p.nonce, p.number);
  }
  static std::string member_of(const Receipt& r) {
    return member_of(r.cost(), r.placement<detail::RedisPermitPlace>());
  }

  absl::Status check(const Receipt& r) const {
    if (!r.open()) {
      return absl::FailedPreconditionError(
          "permit already released, or empty (a refused call holds "
          "nothing)");
    }
    if (r.issuer() != this &&
        (local_ == nullptr || r.issuer() != local_.get())) {
      return absl::InvalidArgumentError(
          "permit issued by another limit: a permit is released by the "
          "limit that issued it");
    }
    return absl::OkStatus();
  }

  absl::StatusOr<Reply> run(std::string_view op, std::string_view key,
                            Cost cost, std::string_view member, Nanos now) {
    const std::string k = redis_key(client_->options().prefix, name(), {}, key);
    const std::string_view keys[] = {k};
    const std::string t =
        redis_.test_time ? std::to_string(now.count() / 1000) : std::string();
    const std::string lim = std::to_string(limit_);
    const std::string ttl = std::to_string(ttl_us_);
    const std::string c = std::to_string(cost);
    const std::string_view args[] = {t, op, lim, ttl, member, c};
    absl::StatusOr<absl::InlinedVector<std::int64_t, 8>> r =
        client_->eval_ints(detail::redis_permits_script(), keys, args);
    if (!r.ok()) return r.status();
    if (r->size() != 6) return absl::InternalError("redis: malformed reply");
    const auto& v = *r;
    Reply out;
    out.ok = v[0] == 1;
    out.now_us = v[1];
    out.decision = Decision{
        op == "acquire" || op == "peek" ? out.ok : true, limit_,
        static_cast<std::uint64_t>(std::max<std::int64_t>(v[2], 0)),
        v[3] < 0 ? kNever : detail::from_us(v[3]), detail::from_us(v[4])};
    return out;
  }

  // The fail mode's decision for a call Redis did not answer (see the file
  // comment); kLocal fills `receipt` with the local limit's.
  Decision fail(const absl::Status& why, std::string_view key, Cost cost,
                Nanos now, Receipt& receipt, bool peek = false) {
    metrics().record_error();
    if (RedisClient::is_auth_error(why)) {
      auth_failures_.fetch_add(1, std::memory_order_relaxed);
      return Decision{false, limit_, 0, redis_.fail_retry, Nanos{0}};
    }
    fallbacks_.fetch_add(1, std::memory_order_relaxed);
    switch (redis_.fail) {
      case FailMode::kOpen:
        return Decision{true, limit_, 0, Nanos{0}, Nanos{0}};
      case FailMode::kClosed:
        return Decision{false, limit_, 0, redis_.fail_retry, Nanos{0}};
      case FailMode::kLocal:
        if (peek) return local_->peek(key, cost, now);
        return local_->hold(key, cost, now, receipt, nullptr);
    }
    return Decision{false, limit_, 0, redis_.fail_retry, Nanos{0}};
  }

  void note_error(const absl::Status&) { metrics().record_error(); }

  // A holder Redis may hold (its call was not answered), for drain().
  struct Queued {
    std::string key;  // the caller's key
    std::string member;
  };
  void queue_release(std::string_view key, std::string_view member) {
    detail::MutexLock lock(&queue_mu_);
    if (queue_.size() >= kMaxQueued) {
      dropped_.fetch_add(1, std::memory_order_relaxed);
      return;
    }
    queue_.push_back({std::string(key), std::string(member)});
    queued_n_.store(queue_.size(), std::memory_order_relaxed);
  }

  // Sends the queued releases ("cancel") in one pipeline before a call;
  // those Redis does not answer are queued again.
  void drain(Nanos now) {
    if (queued_n_.load(std::memory_order_relaxed) == 0) return;
    std::vector<Queued> batch;
    {
      detail::MutexLock lock(&queue_mu_);
      batch.swap(queue_);
      queued_n_.store(0, std::memory_order_relaxed);
    }
    if (batch.empty()) return;
    const std::string t =
        redis_.test_time ? std::to_string(now.count() / 1000) : std::string();
    const std::string lim = std::to_string(limit_);
    const std::string ttl = std::to_string(ttl_us_);
    std::vector<std::string> keys(batch.size());
    std::vector<std::array<std::string_view, 1>> key_args(batch.size());
    std::vector<std::array<std::string_view, 6>> args(batch.size());
    std::vector<RedisClient::EvalCall> calls(batch.size());
    for (std::size_t i = 0; i < batch.size(); ++i) {
      keys[i] = redis_key(client_->options().prefix, name(), {}, batch[i].key);
      key_args[i] = {keys[i]};
      args[i] = {t, "cancel", lim, ttl, batch[i].member, "0"};
      calls[i] = {key_args[i], args[i]};
    }
    const std::vector<RedisClient::IntsOr> out =
        client_->eval_pipelined(detail::redis_permits_script(), calls);
    for (std::size_t i = 0; i < batch.size(); ++i) {
      if (out[i].ok()) continue;
      note_error(out[i].status());
      if (absl::IsUnavailable(out[i].status())) {
        queue_release(batch[i].key, batch[i].member);
      } else {
        dropped_.fetch_add(1, std::memory_order_relaxed);
      }
    }
  }

  const std::shared_ptr<RedisClient> client_;
  const RedisLimitOptions redis_;
  const std::uint64_t limit_;
  const std::int64_t ttl_us_;
  const std::uint64_t nonce_;
  std::unique_ptr<ConcurrencyLimit> local_;
  std::atomic<std::uint64_t> next_{1};
  std::atomic<std::uint64_t> fallbacks_{0};
  std::atomic<std::uint64_t> auth_failures_{0};
  std::atomic<std::uint64_t> released_{0};
  std::atomic<std::uint64_t> late_{0};
  detail::Mutex queue_mu_;
  std::vector<Queued> queue_ ABSL_GUARDED_BY(queue_mu_);
  std::atomic<std::size_t> queued_n_{0};
  std::atomic<std::uint64_t> dropped_{0};
};

}  // namespace ratekeeper

#endif  // RATEKEEPER_REDIS_PERMITS_HPP_
