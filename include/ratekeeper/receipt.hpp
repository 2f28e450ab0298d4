// ratekeeper/receipt.hpp: what one take took, to be settled or given back.
//
// Defines Receipt. Every call that takes capacity and may later give some of
// it back (Limiter::take, a Chain's acquire, a reservation) gets a Receipt:
// which limit issued it, for which key, how much was taken, at which time of
// that limit's own clock, and where the take sits in the limit's state (a
// token bucket's stretch of its timeline, a window's index). Settling the
// receipt to the call's actual cost gives back the unused part, or charges
// the excess, judged against that record:
//
//   - a receipt is settled once: settling moves its content out, and a
//     settled (or moved-from) receipt is refused (kFailedPrecondition);
//   - what a settle gives back is at most what is still outstanding of that
//     take now: never capacity that time has already returned, never a
//     window that has closed, never more than the take;
//   - a receipt is judged by the limit that issued it, in that limit's time
//     and at the rate it was taken at (a receipt from before a
//     reconfigure() gives back what it took, converted, not tokens at the
//     new rate); handed to another limit it is refused (kInvalidArgument).
//
// Receipts are move-only, so that one take cannot be given back twice by
// accident through a copy.
#ifndef RATEKEEPER_RECEIPT_HPP_
#define RATEKEEPER_RECEIPT_HPP_

#include <atomic>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

#include "ratekeeper/decision.hpp"

namespace ratekeeper {

namespace detail {
// A number no other limit of this process has: with the limit's address, it
// names the issuer of a receipt (an address alone can be reused by a limit
// built after the first was destroyed).
inline std::uint64_t next_issuer_serial() noexcept {
  static std::atomic<std::uint64_t> next{1};
  return next.fetch_add(1, std::memory_order_relaxed);
}
}  // namespace detail

class Receipt {
 public:
  // An empty receipt: nothing to settle (a refusal, or a moved-from one).
  Receipt() = default;

  Receipt(Receipt&& o) noexcept
      : issuer_(std::exchange(o.issuer_, nullptr)),
        serial_(o.serial_),
        key_(std::move(o.key_)),
        cost_(std::exchange(o.cost_, 0)),
        at_(o.at_) {
    std::memcpy(place_, o.place_, sizeof(place_));
  }
  Receipt& operator=(Receipt&& o) noexcept {
    if (this != &o) {
      issuer_ = std::exchange(o.issuer_, nullptr);
      serial_ = o.serial_;
      key_ = std::move(o.key_);
      cost_ = std::exchange(o.cost_, 0);
      at_ = o.at_;
      std::memcpy(place_, o.place_, sizeof(place_));
    }
    return *this;
  }
  Receipt(const Receipt&) = delete;
  Receipt& operator=(const Receipt&) = delete;

  // True while the receipt can be settled: issued for a take, not yet
  // settled or moved from.
  bool open() const noexcept { return issuer_ != nullptr; }
  explicit operator bool() const noexcept { return open(); }

  // What was taken, in the limit's unit (0 for a zero-cost take, which can
  // still be settled above: the actual cost is then all debt).
  Cost cost() const noexcept { return cost_; }
  // The key it was taken under.
  const std::string& key() const noexcept { return key_; }
  // When it was taken, by the issuing limit's clock (Redis's TIME for a
  // Redis limit).
  Nanos at() const noexcept { return at_; }

  // For limits and stores (not for callers): a receipt from `issuer` for a
  // take of `cost` on `key` at `at`, placed at `placement`.
  // `serial` tells apart limits that lived at the same address
  // (detail::next_issuer_serial()).
  template <class Placement>
  static Receipt issue(const void* issuer, std::string_view key, Cost cost,
                       Nanos at, const Placement& placement,
                       std::uint64_t serial = 0) {
    static_assert(std::is_trivially_copyable_v<Placement> &&
                      sizeof(Placement) <= kPlaceBytes,
                  "a Placement is at most 64 trivially copyable bytes");
    Receipt r;
    r.issuer_ = issuer;
    r.serial_ = serial;
    r.key_.assign(key.data(), key.size());
    r.cost_ = cost;
    r.at_ = at;
    std::memcpy(r.place_, &placement, sizeof(Placement));
    return r;
  }
  const void* issuer() const noexcept { return issuer_; }
  std::uint64_t serial() const noexcept { return serial_; }
  template <class Placement>
  Placement placement() const noexcept {
    Placement p;
    std::memcpy(&p, place_, sizeof(Placement));
    return p;
  }
  // Marks the receipt settled.
  void close() noexcept {
    issuer_ = nullptr;
    cost_ = 0;
  }

  static constexpr std::size_t kPlaceBytes = 64;

 private:
  const void* issuer_ = nullptr;
  std::uint64_t serial_ = 0;
  std::string key_;
  Cost cost_ = 0;
  Nanos at_{0};
  alignas(16) unsigned char place_[kPlaceBytes] = {};
};

}  // namespace ratekeeper

#endif  // RATEKEEPER_RECEIPT_HPP_
