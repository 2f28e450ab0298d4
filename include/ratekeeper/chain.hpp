// ratekeeper/chain.hpp: several limits on one call, all or nothing.
//
// Defines:
//   Unit          what a limit counts: requests or tokens (for the headers).
//   LimitOptions  a limit's name, unit, charge-on-reject, shadow mode and
//                 near-limit threshold.
//   Limit         one named limit, any policy on any store, behind one
//                 interface: what a chain and a tier table hold.
//   PolicyLimit   the Limit of a Policy on a Store; reconfigure() changes its
//                 policy at run time and keeps every key's state.
//   make_limit    builds a PolicyLimit, validating its options.
//   Chain         acquires a list of (limit, key, cost) all or nothing.
//   ChainDecision what a chain decided: the binding limit, the largest
//                 retry_after, and every limit's own decision.
//
//   auto rpm = ratekeeper::make_limit(
//       {.name = "rpm"},
//       ratekeeper::SlidingWindow::create(per_minute(60)).value()) .value();
//   auto tpm = ratekeeper::make_limit(
//       {.name = "tpm", .unit = ratekeeper::Unit::kTokens},
//       ratekeeper::TokenBucket::create(per_minute(90'000), 90'000).value())
//       .value();
//   ratekeeper::Chain<> chain;
//   auto d = chain.acquire({{rpm.get(), user, 1}, {tpm.get(), user, tokens}});
//   if (!d) reply_429(d.retry_after);
//
// All or nothing: the chain acquires its limits in order; when one refuses,
// it gives back what the earlier ones took (and takes nothing from the later
// ones, which it only peeks, to report their remaining). Between the take
// and the give-back (a few hundred nanoseconds on the in-process stores)
// that capacity is unavailable to other calls: a concurrent call can be
// refused that a moment later would pass. The chain can under-admit in that
// window; it never over-admits on any limit (docs/chains.md).
#ifndef RATEKEEPER_CHAIN_HPP_
#define RATEKEEPER_CHAIN_HPP_

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <initializer_list>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <utility>

#include "absl/container/inlined_vector.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "ratekeeper/clock.hpp"
#include "ratekeeper/config.hpp"
#include "ratekeeper/decision.hpp"
#include "ratekeeper/detail/math.hpp"
#include "ratekeeper/detail/mutex.hpp"
#include "ratekeeper/detail/reclaim.hpp"
#include "ratekeeper/detail/strings.hpp"
#include "ratekeeper/limiter.hpp"
#include "ratekeeper/metrics.hpp"
#include "ratekeeper/policy/policy.hpp"
#include "ratekeeper/receipt.hpp"
#include "ratekeeper/store/sharded.hpp"
#include "ratekeeper/store/store.hpp"

namespace ratekeeper {

// Unit: what a limit's costs count. The HTTP headers report request limits
// and token limits apart (x-ratelimit-*-requests, x-ratelimit-*-tokens);
// kNanoUsd is money, for budgets (budget/accountant.hpp).
enum class Unit : std::uint8_t { kRequests, kTokens, kNanoUsd };

// The unit's name in metric labels: "requests", "tokens", "nano_usd".
constexpr std::string_view unit_name(Unit u) noexcept {
  switch (u) {
    case Unit::kRequests:
      return "requests";
    case Unit::kTokens:
      return "tokens";
    case Unit::kNanoUsd:
      return "nano_usd";
  }
  return "requests";
}

// LimitOptions: how a limit behaves in a chain.
//
//   name              [A-Za-z0-9_.:-], 1 to 64 characters: it appears in
//                     headers and metric labels as it is.
//   unit              requests or tokens.
//   charge_on_reject  count denied attempts too (anti-abuse: a client that
//                     keeps hammering stays locked out). A refused call is
//                     charged to this limit whichever limit refused it, and
//                     never given back. Needs a ChargingPolicy.
//   shadow            decide and count, never deny: a refusal is reported
//                     (LimitResult::shadow_denied, the shadow_denied metric)
//                     and the call goes ahead. For rolling out a new limit.
//                     Can be switched at run time (Limit::set_shadow).
//   near_limit_permille  an allowed call with remaining <= this many
//                     thousandths of the limit counts as a near-limit event.
struct LimitOptions {
  std::string name;
  Unit unit = Unit::kRequests;
  bool charge_on_reject = false;
  bool shadow = false;
  std::uint32_t near_limit_permille = 100;
};

namespace detail {

inline absl::Status check_limit_options(const LimitOptions& o) {
  if (o.name.empty() || o.name.size() > 64) {
    return absl::InvalidArgumentError(absl::StrCat(
        "limit name must be 1 to 64 characters, got ", o.name.size()));
  }
  for (const char c : o.name) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                    (c >= '0' && c <= '9') || c == '_' || c == '.' ||
                    c == ':' || c == '-';
    if (!ok) {
      return absl::InvalidArgumentError(absl::StrCat(
          "limit name \"", absl::CEscape(o.name),
          "\" may hold only letters, digits and _ . : - (it is written into "
          "HTTP headers and metric labels as it is)"));
    }
  }
  if (o.near_limit_permille > 1000) {
    return absl::InvalidArgumentError(
        absl::StrCat("limit \"", o.name,
                     "\": near_limit_permille must be at most 1000, got ",
                     o.near_limit_permille));
  }
  return absl::OkStatus();
}

// The length of time a policy's quota is stated over, for the headers: a
// window policy's period, or the time a token bucket takes to refill a whole
// burst (rounded up).
template <class P>
Nanos quota_window(const P& p) noexcept {
  if constexpr (requires {
                  p.burst();
                  p.rate();
                }) {
    const Rate r = p.rate();
    const i128 t = ceil_div(static_cast<i128>(p.burst()) * r.period.count(),
                            static_cast<i128>(r.count));
    return Nanos{clamp_i64(t)};
  } else if constexpr (requires { p.rate(); }) {
    return p.rate().period;
  } else {
    return Nanos{0};
  }
}

}  // namespace detail

namespace detail {
// Whether `a` has less room than `b` relative to capacity
// (a.remaining / a.limit < b.remaining / b.limit), exactly.
inline bool less_room(const Decision& a, const Decision& b) noexcept {
  return static_cast<u128>(a.remaining) * b.limit <
         static_cast<u128>(b.remaining) * a.limit;
}
}  // namespace detail

// Limit: one named limit over keys, behind a virtual interface so that one
// chain or tier mixes policies and stores. Every call takes `now` from the
// caller: a chain reads its clock once for all its limits.
//
// Thread safety: all members, concurrently.
class Limit {
 public:
  virtual ~Limit() = default;
  Limit(const Limit&) = delete;
  Limit& operator=(const Limit&) = delete;

  // As Limiter::acquire, peek and take, at time `now` (a limit kept in
  // Redis decides by Redis's clock instead). take() fills `receipt` when it
  // admits (an empty one when it refuses).
  virtual Decision acquire(std::string_view key, Cost cost, Nanos now) = 0;
  virtual Decision peek(std::string_view key, Cost cost, Nanos now) const = 0;
  virtual Decision take(std::string_view key, Cost cost, Nanos now,
                        Receipt& receipt) = 0;
  // Counts `cost` whether or not it fits (charge-on-reject); the decision is
  // the step's, a denial when it did not fit. `receipt` as take(): filled
  // only when the cost fitted (a counted refusal is never given back).
  virtual Decision charge(std::string_view key, Cost cost, Nanos now,
                          Receipt& receipt) = 0;
  // As Limiter::settle, at time `now` (the limit's own clock for one kept
  // in Redis): settles a receipt this limit issued to its actual cost, and
  // returns what a zero-cost call would now be told.
  virtual absl::StatusOr<Decision> settle(Receipt& receipt, Cost actual,
                                          Nanos now) = 0;

  // Waiting (issue 17, waiting.hpp). reserve: as Limiter::reserve, at
  // `now`. This default holds only what take() admits now, and otherwise
  // promises go_at = now + retry_after (how a window policy waits);
  // PolicyLimit of a token bucket holds the wait exactly, and says so in
  // reserves_exactly().
  virtual Reserved reserve(std::string_view key, Cost cost, Nanos now,
                           Nanos max_wait) {
    static_cast<void>(max_wait);
    Reserved r;
    r.at = now;
    r.decision = take(key, cost, now, r.receipt);
    r.held = r.decision.allowed;
    r.go_at =
        r.decision.never()
            ? Nanos::max()
            : Nanos{detail::clamp_i64(static_cast<detail::i128>(now.count()) +
                                      r.decision.retry_after.count())};
    return r;
  }
  virtual bool reserves_exactly() const noexcept { return false; }

  // The capacity (as in every Decision) and the time it is stated over.
  virtual std::uint64_t limit() const noexcept = 0;
  virtual Nanos window() const noexcept = 0;
  virtual StoreStats store_stats() const = 0;

  const std::string& name() const noexcept { return name_; }
  Unit unit() const noexcept { return unit_; }
  bool charge_on_reject() const noexcept { return charge_on_reject_; }
  bool shadow() const noexcept {
    return shadow_.load(std::memory_order_relaxed);
  }
  void set_shadow(bool on) noexcept {
    shadow_.store(on, std::memory_order_relaxed);
  }
  std::uint32_t near_limit_permille() const noexcept {
    return near_permille_.load(std::memory_order_relaxed);
  }
  // Changes the near-limit threshold (0 to 1000; larger is clamped): a
  // metrics setting, so a TierTable sets it on a limit it reuses rather
  // than keeping one object per threshold.
  void set_near_limit_permille(std::uint32_t permille) noexcept {
    near_permille_.store(permille > 1000 ? 1000 : permille,
                         std::memory_order_relaxed);
  }
  LimitMetrics& metrics() noexcept { return metrics_; }
  LimitCounts counts() const noexcept { return metrics_.snapshot(); }

 protected:
  explicit Limit(const LimitOptions& o)
      : name_(o.name),
        unit_(o.unit),
        charge_on_reject_(o.charge_on_reject),
        near_permille_(o.near_limit_permille),
        shadow_(o.shadow) {}

 private:
  const std::string name_;
  const Unit unit_;
  const bool charge_on_reject_;
  std::atomic<std::uint32_t> near_permille_;
  std::atomic<bool> shadow_;
  LimitMetrics metrics_;
};

// PolicyLimit: the Limit of policy P over store StoreT<P::State>.
//
// reconfigure() swaps the policy at run time; every key keeps its state,
// read under the new policy (docs/chains.md, "Changing limits"): a window
// policy keeps each key's count in the current window (a lowered limit can
// leave it above the new limit: remaining 0 until the window turns), a
// token bucket keeps the time until each key's bucket is full again. A
// window policy's period cannot change (its window indices would mean other
// instants): that needs a new limit, with fresh state.
template <Policy P, template <class> class StoreT = ShardedStore>
class PolicyLimit final : public Limit {
 public:
  using PolicyType = P;
  using State = typename P::State;
  using StoreType = StoreT<State>;

  static_assert(Store<StoreType>, "StoreT<State> must meet ratekeeper::Store");

  // Use make_limit(), which validates the options.
  PolicyLimit(const LimitOptions& o, P policy,
              typename StoreType::Options store_options)
      : Limit(o), store_(store_options) {
    versions_.push_back(std::move(policy));
    current_.store(&versions_.back(), std::memory_order_release);
  }

  Decision acquire(std::string_view key, Cost cost, Nanos now) override {
    const detail::ReadSection section(deferred_);
    return store_.apply(key, detail::AcquireOp<P>{policy_ptr(), now, cost});
  }

  Decision peek(std::string_view key, Cost cost, Nanos now) const override {
    const detail::ReadSection section(deferred_);
    return store_.peek(key, detail::AcquireOp<P>{policy_ptr(), now, cost});
  }

  Decision take(std::string_view key, Cost cost, Nanos now,
                Receipt& receipt) override {
    const detail::ReadSection section(deferred_);
    // The serial before the policy (acquire): restart() publishes a new
    // serial after the policy it goes with.
    const std::uint64_t serial = serial_.load(std::memory_order_acquire);
    const P* p = policy_ptr();
    return detail::take_on(store_, key, detail::AcquireOp<P>{p, now, cost}, *p,
                           this, serial, receipt);
  }

  Decision charge(std::string_view key, Cost cost, Nanos now,
                  Receipt& receipt) override {
    if constexpr (ChargingPolicy<P>) {
      const detail::ReadSection section(deferred_);
      const std::uint64_t serial = serial_.load(std::memory_order_acquire);
      const P* p = policy_ptr();
      return detail::take_on(store_, key, detail::ChargeOp<P>{p, now, cost}, *p,
                             this, serial, receipt);
    } else {
      // make_limit refuses charge_on_reject for such a policy; a caller
      // reaching here directly gets the plain take.
      return take(key, cost, now, receipt);
    }
  }

  // Waiting (issue 17): a token bucket reserves exactly (reserve_on).
  Reserved reserve(std::string_view key, Cost cost, Nanos now,
                   Nanos max_wait) override {
    const detail::ReadSection section(deferred_);
    const std::uint64_t serial = serial_.load(std::memory_order_acquire);
    const P* p = policy_ptr();
    return detail::reserve_on(store_, key, *p, now, cost, max_wait, this,
                              serial);
  }
  bool reserves_exactly() const noexcept override { return ReservingPolicy<P>; }

  // Settled under the policy in force now; the receipt's placement says
  // what it took under the policy it was taken under (a token bucket's
  // receipt keeps its rate), so a reconfigure() between take and settle
  // gives back what was taken, never the same count at the new rate.
  //
  // A receipt from before a restart() (a limit TierTable replaced and then
  // reused) is refused, kFailedPrecondition, before anything is read.
  absl::StatusOr<Decision> settle(Receipt& receipt, Cost actual,
                                  Nanos now) override {
    const detail::ReadSection section(deferred_);
    const std::uint64_t serial = serial_.load(std::memory_order_acquire);
    if (deferred_ && receipt.open() && receipt.issuer() == this &&
        receipt.serial() != serial) {
      return absl::FailedPreconditionError(absl::StrCat(
          "receipt issued by limit \"", name(),
          "\" before it was replaced (TierTable::set_tier): what it took was "
          "forgotten with the limit's keys"));
    }
    return detail::settle_on(store_, *policy_ptr(), this, serial, receipt,
                             actual, now);
  }

  std::uint64_t limit() const noexcept override {
    const detail::ReadSection section(deferred_);
    return policy().limit();
  }
  Nanos window() const noexcept override {
    const detail::ReadSection section(deferred_);
    return detail::quota_window(policy());
  }
  StoreStats store_stats() const override { return store_.stats(); }

  // The policy in force now. The reference stays valid for the limit's
  // life, or, for a limit a TierTable owns, until the table changes it.
  const P& policy() const noexcept { return *policy_ptr(); }

  // reconfigure
  //
  // Puts `next` in force for every call that starts after it returns; keys
  // keep their state (see the class comment). kFailedPrecondition when a
  // window policy's period would change. Each past policy is kept until the
  // limit is destroyed (calls in flight may still read it): a few dozen bytes
  // per change; a TierTable's limits give them back (drop_versions_before).
  // Thread-safe.
  absl::Status reconfigure(P next) {
    detail::MutexLock lock(&mu_);
    if constexpr (requires { P::kWindowAligned; }) {
      if (next.rate().period != versions_.back().rate().period) {
        return absl::FailedPreconditionError(absl::StrCat(
            "limit \"", name(),
            "\": a window policy's period cannot change in place (its keys' "
            "window indices would mean other instants); make a new limit"));
      }
    }
    versions_.push_back(std::move(next));
    current_.store(&versions_.back(), std::memory_order_release);
    return absl::OkStatus();
  }

  StoreType& store() noexcept { return store_; }
  // With the limit's address, what names it as the issuer of its receipts.
  std::uint64_t serial() const noexcept {
    return serial_.load(std::memory_order_acquire);
  }

  // For TierTable, which owns, replaces and reuses limits (tiers.hpp).
  //
  // defer_reclaim: every later call on the limit runs in a
  // detail::ReadSection, so that the table can give back policy versions
  // and reuse the limit once detail::Reclaimer::synchronize() returns.
  // Call before the limit is published to other threads.
  void defer_reclaim() noexcept {
    detail::Reclaimer::instance().prepare();
    deferred_ = true;
  }

  // retire
  //
  // Refuses every receipt issued so far (a new serial; settles and
  // give-backs with them are kFailedPrecondition and touch nothing): for a
  // limit TierTable has replaced, before it clears the store. Needs
  // defer_reclaim(). Thread-safe.
  void retire() {
    detail::MutexLock lock(&mu_);
    serial_.store(detail::next_issuer_serial(), std::memory_order_release);
  }

  // restart
  //
  // Starts the limit afresh under `next`, whatever its period: every key
  // forgotten, receipts issued before refused (a new serial). For a limit
  // no table call uses any more (TierTable reuses a replaced limit of the
  // same name, kind and options with it); calls that still arrive (a caller
  // who kept a ChainItem past set_tier) are safe: each is decided by the old
  // incarnation or the new one, and a take of the old one cannot be settled
  // against the new one. The serial stays retired while the store is
  // cleared, so receipts from that interval are refused too. Needs
  // defer_reclaim(); not from inside a detail::ReadSection. Thread-safe.
  void restart(P next) {
    detail::MutexLock lock(&mu_);
    serial_.store(detail::next_issuer_serial(), std::memory_order_release);
    // Settles that read the old serial have finished.
    detail::Reclaimer::instance().synchronize();
    store_.clear();
    versions_.push_back(std::move(next));
    current_.store(&versions_.back(), std::memory_order_release);
    serial_.store(detail::next_issuer_serial(), std::memory_order_release);
  }

  // Policy versions made so far (reconfigure, restart), the one in force
  // being the last: drop_versions_before(versions_made() - 1) keeps only it.
  std::uint64_t versions_made() const {
    detail::MutexLock lock(&mu_);
    return dropped_ + versions_.size();
  }

  // Frees the versions before the `n`th. Only once no call can be reading
  // them: with defer_reclaim(), after a Reclaimer::synchronize() that
  // follows the reconfigure or restart that replaced them.
  void drop_versions_before(std::uint64_t n) {
    detail::MutexLock lock(&mu_);
    while (dropped_ < n && versions_.size() > 1) {
      versions_.pop_front();
      ++dropped_;
    }
  }

 private:
  const P* policy_ptr() const noexcept {
    return current_.load(std::memory_order_acquire);
  }

  StoreType store_;
  std::atomic<std::uint64_t> serial_{detail::next_issuer_serial()};
  std::atomic<const P*> current_{nullptr};
  bool deferred_ = false;
  mutable detail::Mutex mu_;
  std::deque<P> versions_;     // stable addresses; guarded by mu_ after ctor
  std::uint64_t dropped_ = 0;  // versions popped; guarded by mu_
};

// make_limit
//
// A PolicyLimit of `policy` on StoreT (ShardedStore by default), or
// kInvalidArgument for a bad name or threshold, or charge_on_reject with a
// policy that cannot charge.
template <template <class> class StoreT = ShardedStore, Policy P>
absl::StatusOr<std::unique_ptr<PolicyLimit<P, StoreT>>> make_limit(
    const LimitOptions& options, P policy,
    typename StoreT<typename P::State>::Options store_options = {}) {
  if (absl::Status st = detail::check_limit_options(options); !st.ok()) {
    return st;
  }
  if (options.charge_on_reject && !ChargingPolicy<P>) {
    return absl::InvalidArgumentError(
        absl::StrCat("limit \"", options.name,
                     "\": charge_on_reject needs a policy with charge()"));
  }
  return std::make_unique<PolicyLimit<P, StoreT>>(options, std::move(policy),
                                                  store_options);
}

// ChainItem: one limit of a chain, the key it is counted under, and the cost
// of this call in the limit's unit. The key's bytes must outlive the call.
struct ChainItem {
  Limit* limit = nullptr;
  std::string_view key;
  Cost cost = 1;
};

// ChainItems: chain items that own their keys' bytes, for items built from
// keys made on the fly (TierTable::chain_items). items() views them; the
// view is valid until the ChainItems is changed, moved or destroyed. Keys of
// up to 256 bytes in all are kept inline. Not thread-safe.
class ChainItems {
 public:
  ChainItems() = default;
  ChainItems(const ChainItems& o) : buf_(o.buf_), parts_(o.parts_) {
    rebuild();
  }
  ChainItems(ChainItems&& o) noexcept
      : buf_(std::move(o.buf_)), parts_(std::move(o.parts_)) {
    rebuild();
    o.clear();
  }
  ChainItems& operator=(const ChainItems& o) {
    if (this != &o) {
      buf_ = o.buf_;
      parts_ = o.parts_;
      rebuild();
    }
    return *this;
  }
  ChainItems& operator=(ChainItems&& o) noexcept {
    if (this != &o) {
      buf_ = std::move(o.buf_);
      parts_ = std::move(o.parts_);
      rebuild();
      o.clear();
    }
    return *this;
  }

  // Appends an item; its key's bytes are copied (a key viewing this
  // object's own bytes included).
  void add(Limit* limit, std::string_view key, Cost cost) {
    const std::string copy(key);
    parts_.push_back(Part{limit, buf_.size(), copy.size(), cost});
    buf_.insert(buf_.end(), copy.begin(), copy.end());
    rebuild();
  }
  void add(const ChainItem& item) { add(item.limit, item.key, item.cost); }
  void clear() {
    buf_.clear();
    parts_.clear();
    view_.clear();
  }

  std::size_t size() const noexcept { return parts_.size(); }
  bool empty() const noexcept { return parts_.empty(); }
  ChainItem operator[](std::size_t i) const { return view_[i]; }

  // The items, with keys viewing this object's bytes: valid until the
  // object is changed, moved from or destroyed.
  std::span<const ChainItem> items() const noexcept {
    return std::span<const ChainItem>(view_.data(), view_.size());
  }
  operator std::span<const ChainItem>() const noexcept {  // NOLINT
    return items();
  }

 private:
  struct Part {
    Limit* limit;
    std::size_t offset;
    std::size_t size;
    Cost cost;
  };
  // The views, made again whenever the bytes may have moved.
  // resize rather than clear: g++ -O1 sees clear()'s deallocation test on
  // a just-constructed vector as a read of uninitialised storage.
  void rebuild() {
    view_.resize(parts_.size());
    for (std::size_t i = 0; i < parts_.size(); ++i) {
      const Part& p = parts_[i];
      view_[i] = ChainItem{
          p.limit, std::string_view(buf_.data() + p.offset, p.size), p.cost};
    }
  }
  absl::InlinedVector<char, 256> buf_;
  absl::InlinedVector<Part, 4> parts_;
  absl::InlinedVector<ChainItem, 4> view_;
};

// LimitResult: what one limit of a chain decided.
//
//   decision       the limit's own decision. For a limit that admitted but
//                  was vetoed by another, `allowed` stays true and
//                  `remaining` is what its key has left once the chain's
//                  takes are all given back.
//   counted        the cost is held by this limit now (the chain went ahead,
//                  or the limit charges on reject).
//   shadow_denied  a shadow limit that would have refused.
//   receipt        what this limit took, open while the chain holds it: the
//                  chain's settle() and give_back() consume it. Empty for a
//                  refused chain (everything was given back, apart from
//                  charges on reject, which are never given back).
//
// A copy is a report: it has everything but the receipt (the original keeps
// it; a copy's settle is kFailedPrecondition), so one take is never given
// back twice through copies. Moves carry the receipt.
struct LimitResult {
  Limit* limit = nullptr;
  Cost cost = 0;
  Decision decision;
  bool counted = false;
  bool shadow_denied = false;
  Receipt receipt;

  LimitResult() = default;
  LimitResult(LimitResult&&) noexcept = default;
  LimitResult& operator=(LimitResult&&) noexcept = default;
  LimitResult(const LimitResult& o)
      : limit(o.limit),
        cost(o.cost),
        decision(o.decision),
        counted(o.counted),
        shadow_denied(o.shadow_denied) {}
  LimitResult& operator=(const LimitResult& o) {
    if (this != &o) {
      limit = o.limit;
      cost = o.cost;
      decision = o.decision;
      counted = o.counted;
      shadow_denied = o.shadow_denied;
      receipt = Receipt();
    }
    return *this;
  }
};

// ChainDecision: the answer of a chain.
//
//   allowed      every enforced limit admitted, and all hold their cost.
//   retry_after  0 when allowed; else the largest retry_after of the limits
//                that refused (kNever when one can never admit the cost).
//   at           the time the chain decided (by the chain's clock).
//   binding      index in results of the limit that decided: when refused,
//                the refusing limit with the longest wait; when allowed, the
//                limit with the least remaining relative to its capacity
//                (what the headers report). npos for an empty chain.
//   results      one per item, in the order given.
struct [[nodiscard]] ChainDecision {
  static constexpr std::size_t npos = static_cast<std::size_t>(-1);

  bool allowed = true;
  Nanos retry_after{0};
  Nanos at{0};
  std::size_t binding = npos;
  absl::InlinedVector<LimitResult, 4> results;

  constexpr explicit operator bool() const noexcept { return allowed; }

  // The binding limit's result, or nullptr for an empty chain.
  const LimitResult* binding_result() const noexcept {
    return binding == npos ? nullptr : &results[binding];
  }
  // True when no wait can admit this call (a cost above some capacity).
  bool never() const noexcept { return retry_after == kNever; }
};

namespace detail {

// The binding limit and the wait of a chain's results; with `metrics`, each
// limit's outcome counted too (a peek counts nothing). Shared by Chain and
// RedisChain.
inline void finish_chain(ChainDecision& out, bool metrics) {
  out.retry_after = Nanos{0};
  out.binding = ChainDecision::npos;
  for (std::size_t i = 0; i < out.results.size(); ++i) {
    const LimitResult& r = out.results[i];
    if (out.allowed) {
      // The least remaining relative to capacity: remaining / limit.
      if (out.binding == ChainDecision::npos ||
          less_room(r.decision, out.results[out.binding].decision)) {
        out.binding = i;
      }
    } else if (!r.decision.allowed && !r.shadow_denied &&
               (out.binding == ChainDecision::npos ||
                r.decision.retry_after > out.retry_after)) {
      out.binding = i;
      out.retry_after = r.decision.retry_after;
    }
  }
  if (!metrics) return;
  for (const LimitResult& r : out.results) {
    LimitMetrics& m = r.limit->metrics();
    if (r.shadow_denied) {
      m.add(LimitMetrics::kShadowDenied);
    } else if (!r.decision.allowed) {
      m.add(LimitMetrics::kDenied);
    } else if (!out.allowed) {
      m.add(LimitMetrics::kVetoed);
    } else {
      m.add(LimitMetrics::kAllowed);
      const u128 lhs = static_cast<u128>(r.decision.remaining) * 1000;
      const u128 rhs =
          static_cast<u128>(r.decision.limit) * r.limit->near_limit_permille();
      if (lhs <= rhs) m.add(LimitMetrics::kNearLimit);
    }
  }
}

}  // namespace detail

// Chain: acquires several limits for one call, all or nothing, reading the
// clock `C` once. Stateless apart from its clock: one Chain serves any
// number of threads and limits. Thread-safe.
template <Clock C = SteadyClock>
class Chain {
 public:
  explicit Chain(C clock = C{}) : clock_(std::move(clock)) {}

  // acquire
  //
  // Decides the call against every item in order. Allowed: each enforced
  // limit admitted and holds its cost. Refused: nothing stays consumed,
  // except on limits that charge on reject. A shadow limit's refusal is
  // reported, never enforced.
  ChainDecision acquire(std::span<const ChainItem> items) {
    return acquire_at(items, clock_.now());
  }
  ChainDecision acquire(std::initializer_list<ChainItem> items) {
    return acquire(std::span<const ChainItem>(items.begin(), items.size()));
  }

  // acquire_at
  //
  // As acquire, at a time the caller read (a ManualClock in tests, or one
  // clock read shared with other work).
  ChainDecision acquire_at(std::span<const ChainItem> items, Nanos now) {
    ChainDecision out;
    out.at = now;
    out.results.resize(items.size());
    bool refused = false;
    for (std::size_t i = 0; i < items.size(); ++i) {
      const ChainItem& it = items[i];
      RATEKEEPER_ASSERT(it.limit != nullptr, "ChainItem without a limit");
      LimitResult& r = out.results[i];
      r.limit = it.limit;
      r.cost = it.cost;
      if (it.limit->charge_on_reject()) {
        // Taken if it fits, charged if not: counted either way.
        r.decision = it.limit->charge(it.key, it.cost, now, r.receipt);
        r.counted = true;
      } else if (!refused) {
        r.decision = it.limit->take(it.key, it.cost, now, r.receipt);
        r.counted = r.decision.allowed;
      } else {
        // Refused already: what this limit would say, without taking. An
        // admission reports remaining and reset as they stand (the call
        // took nothing), as a vetoed limit's do after its give-back.
        r.decision = it.limit->peek(it.key, it.cost, now);
        if (r.decision.allowed && it.cost != 0) {
          const Decision now_left = it.limit->peek(it.key, 0, now);
          r.decision.remaining = now_left.remaining;
          r.decision.reset_after = now_left.reset_after;
        }
      }
      if (!r.decision.allowed) {
        if (it.limit->shadow()) {
          r.shadow_denied = true;
        } else {
          refused = true;
        }
      }
    }
    out.allowed = !refused;
    if (refused) roll_back(out, items, now);
    detail::finish_chain(out, true);
    return out;
  }

  // peek
  //
  // What acquire would decide now, counting nothing.
  ChainDecision peek(std::span<const ChainItem> items) const {
    const Nanos now = clock_.now();
    ChainDecision out;
    out.at = now;
    out.results.resize(items.size());
    for (std::size_t i = 0; i < items.size(); ++i) {
      LimitResult& r = out.results[i];
      r.limit = items[i].limit;
      r.cost = items[i].cost;
      r.decision = items[i].limit->peek(items[i].key, items[i].cost, now);
      if (!r.decision.allowed) {
        if (r.limit->shadow()) {
          r.shadow_denied = true;
        } else {
          out.allowed = false;
        }
      }
    }
    detail::finish_chain(out, false);
    return out;
  }

  // settle
  //
  // Settles result `index` of an allowed chain to its actual cost (the
  // tokens the provider counted, against the estimate taken): the unused
  // part is given back, an excess is charged as a debt (see
  // Limiter::settle). kOutOfRange for a bad index; kFailedPrecondition for
  // a result already settled, or one that holds nothing (a refused chain).
  absl::Status settle(ChainDecision& d, std::size_t index, Cost actual) {
    if (index >= d.results.size()) {
      return absl::OutOfRangeError(
          absl::StrCat("chain result ", index, " of ", d.results.size()));
    }
    return settle_result(d.results[index], actual, clock_.now());
  }

  // settle
  //
  // Settles every open result of `unit` (every token limit, say) to
  // `actual`: what a call does once the provider reports its usage.
  // kFailedPrecondition when none was open.
  absl::Status settle(ChainDecision& d, Unit unit, Cost actual) {
    bool any = false;
    for (std::size_t i = 0; i < d.results.size(); ++i) {
      if (d.results[i].limit->unit() != unit || !d.results[i].receipt) {
        continue;
      }
      any = true;
      if (absl::Status st = settle(d, i, actual); !st.ok()) return st;
    }
    if (!any) {
      return absl::FailedPreconditionError(absl::StrCat(
          "no open ", detail::av(unit_name(unit)), " receipt in the chain"));
    }
    return absl::OkStatus();
  }

  // give_back
  //
  // Gives back everything an allowed chain still holds (the call did not
  // happen): each open result settled to 0, each reporting what is left
  // after its own give-back. Charges on reject of a refused chain are never
  // given back; a result settled already is left alone. In the order taken,
  // as RedisChain does: a limit that appears twice gives its earlier take
  // back first, which moves the later one, and the key's give-back counter
  // moves that one's receipt with it (exact for a token bucket whatever
  // else took after, docs/policies.md).
  void give_back(ChainDecision& d) {
    const Nanos now = clock_.now();
    for (LimitResult& r : d.results) {
      if (r.receipt) static_cast<void>(settle_result(r, 0, now));
    }
  }

  Nanos now() const noexcept { return clock_.now(); }

 private:
  // Settles one result's receipt; the result then reports what is left.
  static absl::Status settle_result(LimitResult& r, Cost actual, Nanos now) {
    absl::StatusOr<Decision> left = r.limit->settle(r.receipt, actual, now);
    if (!left.ok()) return left.status();
    r.counted = actual != 0;
    r.decision.remaining = left->remaining;
    r.decision.reset_after = left->reset_after;
    return absl::OkStatus();
  }

  // Gives back what limits that do not charge on reject took, each with
  // its receipt (judged in that limit's own time), in the order taken; a
  // charge on reject keeps its count and its receipt is dropped (a refused
  // call's charge is never given back). Each result given back reports what
  // its limit and key have left once all is given back (a limit twice in
  // the chain: both report the end), as a refused RedisChain does.
  static void roll_back(ChainDecision& out, std::span<const ChainItem> items,
                        Nanos now) {
    absl::InlinedVector<bool, 8> rolled(out.results.size(), false);
    for (std::size_t i = 0; i < out.results.size(); ++i) {
      LimitResult& r = out.results[i];
      if (!r.counted) continue;
      if (r.limit->charge_on_reject()) {
        r.receipt = Receipt();
        continue;
      }
      static_cast<void>(settle_result(r, 0, now));
      r.counted = false;
      rolled[i] = true;
    }
    for (std::size_t i = 0; i < out.results.size(); ++i) {
      if (!rolled[i]) continue;
      for (std::size_t j = out.results.size(); --j > i;) {
        if (rolled[j] && items[j].limit == items[i].limit &&
            items[j].key == items[i].key) {
          out.results[i].decision.remaining = out.results[j].decision.remaining;
          out.results[i].decision.reset_after =
              out.results[j].decision.reset_after;
          break;
        }
      }
    }
  }

  C clock_;
};

}  // namespace ratekeeper

#endif  // RATEKEEPER_CHAIN_HPP_
