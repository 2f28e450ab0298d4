// ratekeeper/permits.hpp: concurrency (in-flight) limits, issue 17.
//
// Defines:
//   PermitLimit       a Limit whose take holds a permit while a call runs
//                     (Limit::held_while_running), with a TTL: the base of
//                     the in-process ConcurrencyLimit (concurrency.hpp) and
//                     of RedisPermits (redis/permits.hpp).
//   Permit            one call's permit, RAII: released when destroyed;
//                     release() and renew() explicit.
//   Permits<Clock>    acquires Permits on a PermitLimit, reading its clock.
//
//   auto streams = ratekeeper::ConcurrencyLimit::create(  // concurrency.hpp
//       {.name = "streams"}, {.limit = 4, .ttl = std::chrono::minutes(2)})
//       .value();
//   ratekeeper::Permits<> permits(streams.get());
//   ratekeeper::Permit p = permits.acquire(user);
//   if (!p) return reply_429(p.decision().retry_after);
//   // ... stream; every minute or so: p.renew() ...
//   // ~Permit releases it.
//
// Identity, not a counter: every permit has a holder id of its own. A
// permit not released within its TTL (a leaked or detached one, a thread
// that died) stops counting when its TTL ends; its late release then
// removes nothing (its id is gone), so it never frees a slot another
// holder took since. docs/concurrency.md.
#ifndef RATEKEEPER_PERMITS_HPP_
#define RATEKEEPER_PERMITS_HPP_

#include <string_view>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "ratekeeper/chain.hpp"
#include "ratekeeper/clock.hpp"
#include "ratekeeper/decision.hpp"
#include "ratekeeper/receipt.hpp"

namespace ratekeeper {

// PermitLimit: a Limit counted in calls running at once per key. A take
// (Chain::acquire's, or Permits::acquire's) holds `cost` slots of the key
// until the receipt is settled (any settle releases: there is no amount to
// settle to), or its TTL ends. renew() starts the TTL again.
//
//   acquire()  without a receipt: the permit cannot be released, so it
//              holds its slots for one whole TTL (a call counted for the
//              TTL). For callers that want starts per TTL; use take() or
//              Permits for calls.
//   charge()   as take() (a refused permit holds nothing).
//   window()   the TTL.
class PermitLimit : public Limit {
 public:
  bool held_while_running() const noexcept final { return true; }
  Nanos ttl() const noexcept { return ttl_; }
  Nanos window() const noexcept override { return ttl_; }

  // hold
  //
  // take(), and why a refusal was not the limit's own (`why`, when given):
  // kResourceExhausted when the table of keys is full (max_keys), the
  // status Redis answered when a fail mode decided. OK otherwise.
  virtual Decision hold(std::string_view key, Cost cost, Nanos now,
                        Receipt& receipt, absl::Status* why) = 0;

  // renew
  //
  // The permit of `receipt` expires one TTL after `now` (Redis's time for
  // RedisPermits): for a holder that streams. kNotFound when it had
  // expired already (its slots may be someone else's now: acquire again);
  // kFailedPrecondition for a released receipt; kInvalidArgument for
  // another limit's. The decision is what a zero-cost call is told.
  virtual absl::StatusOr<Decision> renew(Receipt& receipt, Nanos now) = 0;

  Decision take(std::string_view key, Cost cost, Nanos now,
                Receipt& receipt) override {
    return hold(key, cost, now, receipt, nullptr);
  }
  Decision charge(std::string_view key, Cost cost, Nanos now,
                  Receipt& receipt) override {
    return hold(key, cost, now, receipt, nullptr);
  }
  Decision acquire(std::string_view key, Cost cost, Nanos now) override {
    Receipt dropped;  // held until its TTL ends (see the class comment)
    return hold(key, cost, now, dropped, nullptr);
  }

 protected:
  PermitLimit(const LimitOptions& o, Nanos ttl) : Limit(o), ttl_(ttl) {}

 private:
  const Nanos ttl_;
};

// Permit: one call's permit. Move-only; released when destroyed (or
// assigned over), or by release(); renew() for a holder that streams.
// Must not outlive its PermitLimit or the Permits that issued it.
class [[nodiscard]] Permit {
 public:
  Permit() = default;
  Permit(Permit&& o) noexcept
      : limit_(std::exchange(o.limit_, nullptr)),
        read_(o.read_),
        clock_(o.clock_),
        receipt_(std::move(o.receipt_)),
        decision_(o.decision_),
        status_(std::move(o.status_)) {}
  Permit& operator=(Permit&& o) noexcept {
    if (this != &o) {
      static_cast<void>(release());
      limit_ = std::exchange(o.limit_, nullptr);
      read_ = o.read_;
      clock_ = o.clock_;
      receipt_ = std::move(o.receipt_);
      decision_ = o.decision_;
      status_ = std::move(o.status_);
    }
    return *this;
  }
  Permit(const Permit&) = delete;
  Permit& operator=(const Permit&) = delete;
  ~Permit() { static_cast<void>(release()); }

  // Whether it was admitted and is held (not released or detached; its TTL
  // may have ended: renew() tells).
  bool held() const noexcept { return receipt_.open(); }
  explicit operator bool() const noexcept { return decision_.allowed; }
  // What the limit decided at the acquire: when refused, retry_after is
  // when enough held permits expire (sooner if they are released), kNever
  // for a cost above the limit.
  const Decision& decision() const noexcept { return decision_; }
  // Why a refusal was not the limit's (PermitLimit::hold): OK, or
  // kResourceExhausted (the key table is full), or Redis's error when a
  // fail mode answered.
  const absl::Status& status() const noexcept { return status_; }

  // release
  //
  // Gives the permit back now. kFailedPrecondition when not held (refused,
  // released, detached). A permit whose TTL had ended frees nothing. A
  // RedisPermits release Redis did not answer is kUnavailable and no longer
  // held: the release is queued (redis/permits.hpp).
  absl::Status release() {
    if (limit_ == nullptr || !receipt_.open()) {
      return absl::FailedPreconditionError("permit not held");
    }
    return limit_->settle(receipt_, 0, read_(clock_)).status();
  }

  // renew: PermitLimit::renew, at the clock's time now.
  absl::Status renew() {
    if (limit_ == nullptr || !receipt_.open()) {
      return absl::FailedPreconditionError("permit not held");
    }
    return limit_->renew(receipt_, read_(clock_)).status();
  }

  // detach
  //
  // Hands over the receipt (PermitLimit::settle releases it, renew renews
  // it); the Permit then releases nothing. A receipt dropped unsettled
  // holds its slots until its TTL ends.
  Receipt detach() noexcept { return std::move(receipt_); }

 private:
  template <Clock C>
  friend class Permits;
  Permit(PermitLimit* limit, Nanos (*read)(const void*), const void* clock,
         Receipt receipt, Decision d, absl::Status why)
      : limit_(limit),
        read_(read),
        clock_(clock),
        receipt_(std::move(receipt)),
        decision_(d),
        status_(std::move(why)) {}

  PermitLimit* limit_ = nullptr;
  Nanos (*read_)(const void*) = nullptr;
  const void* clock_ = nullptr;
  Receipt receipt_;
  Decision decision_;
  absl::Status status_;
};

// Permits: acquires Permits on one PermitLimit, reading clock C. Holds a
// pointer to the limit; thread-safe. Must outlive its Permits.
template <Clock C = SteadyClock>
class Permits {
 public:
  explicit Permits(PermitLimit* limit, C clock = C{})
      : limit_(limit), clock_(std::move(clock)) {}
  Permits(const Permits&) = delete;
  Permits& operator=(const Permits&) = delete;

  // `cost` slots of `key` for one call, if they are free now.
  Permit acquire(std::string_view key, Cost cost = 1) {
    Receipt r;
    absl::Status why;
    const Decision d = limit_->hold(key, cost, clock_.now(), r, &why);
    return Permit(limit_, &read, &clock_, std::move(r), d, std::move(why));
  }

  Nanos now() const noexcept { return clock_.now(); }
  PermitLimit* limit() const noexcept { return limit_; }

 private:
  static Nanos read(const void* c) noexcept {
    return static_cast<const C*>(c)->now();
  }
  PermitLimit* const limit_;
  const C clock_;
};
}  // namespace ratekeeper

#endif  // RATEKEEPER_PERMITS_HPP_
