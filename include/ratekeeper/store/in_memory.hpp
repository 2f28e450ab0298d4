// ratekeeper/store/in_memory.hpp: the simple, exact reference store.
//
// Defines InMemoryStore<State>: an absl::flat_hash_map from key bytes to
// State under one mutex. Every call takes the lock once.
//
// Prefer the sharded store for throughput on many cores (one lock serialises
// every key here). InMemoryStore is the reference that other stores are
// tested against, and the right choice when simplicity and exact
// introspection (size(), stats()) matter more than speed.
//
// Memory is bounded: at most `max_keys` states are held. When a new key
// arrives at capacity, states that are idle (equivalent to never seen) are
// reclaimed first, in a sweep whose O(max_keys) cost is amortised over at
// least max(1, max_keys / 16) calls; when nothing can be reclaimed the
// caller's WhenFull choice decides (kEvictStalest acts as kDenyNew here:
// eviction is ShardedStore's). Each held key costs its bytes plus the
// map's slot (about 48 bytes with a 16-byte state).
#ifndef RATEKEEPER_STORE_IN_MEMORY_HPP_
#define RATEKEEPER_STORE_IN_MEMORY_HPP_

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/strings/string_view.h"
#include "ratekeeper/decision.hpp"
#include "ratekeeper/detail/mutex.hpp"
#include "ratekeeper/store/store.hpp"

namespace ratekeeper {

// InMemoryOptions: the knobs of an InMemoryStore.
struct InMemoryOptions {
  // Most states held at once. Raise it when legitimate keys are being denied
  // (stats().denied_full grows while traffic is normal).
  std::size_t max_keys = 1'000'000;
  // What happens to a new key when full and nothing idle can be reclaimed.
  WhenFull when_full = WhenFull::kDenyNew;
  // retry_after of a call denied because the store is full.
  Nanos full_retry_after = std::chrono::seconds(1);
};

template <class StateT>
class InMemoryStore {
 public:
  using State = StateT;
  using Options = InMemoryOptions;

  explicit InMemoryStore(Options options = {}) : options_(options) {}

  InMemoryStore(const InMemoryStore&) = delete;
  InMemoryStore& operator=(const InMemoryStore&) = delete;

  // apply
  //
  // Runs `op` on `key`'s state under the lock and stores the result.
  // Thread-safe.
  template <StoreOp<State> Op>
  Decision apply(std::string_view key, const Op& op) {
    detail::MutexLock lock(&mu_);
    if (auto it = map_.find(to_absl(key)); it != map_.end()) {
      return run_on(it->second, op);
    }
    detail::aux_in(op, aux_floor_);
    Step<State> r = op(State{});
    // Nothing to remember (a deny of a fresh key, a zero cost): no slot.
    if (r.next == State{}) {
      op.published(State{});
      return r.decision;
    }
    // A debt settled on a key the store let go is counted even when the
    // store is full (it can only come from a receipt of an admitted call, so
    // such keys are bounded by the calls in flight).
    bool forced = false;
    if constexpr (requires { op.forces_insert(); }) forced = op.forces_insert();
    if (!make_room(op) && !forced) return when_full(r.decision);
    map_.emplace(
        std::string(key),
        Slot{r.next, aux_floor_ + detail::aux_add(op, State{}, r.next)});
    op.published(State{});
    ++stats_.inserts;
    ++since_sweep_;
    return r.decision;
  }

  // peek
  //
  // `op`'s decision on `key`'s current state; changes nothing. A key not held
  // is decided as fresh, even when the store is full. Thread-safe.
  template <StoreOp<State> Op>
  Decision peek(std::string_view key, const Op& op) const {
    detail::MutexLock lock(&mu_);
    const auto it = map_.find(to_absl(key));
    detail::aux_in(op, it == map_.end() ? aux_floor_ : it->second.aux);
    return op(it == map_.end() ? State{} : it->second.state).decision;
  }

  // update
  //
  // As apply() for a key held; a key not held stays absent. Thread-safe.
  template <StoreOp<State> Op>
  Decision update(std::string_view key, const Op& op) {
    detail::MutexLock lock(&mu_);
    const auto it = map_.find(to_absl(key));
    if (it == map_.end()) {
      detail::aux_in(op, aux_floor_);
      return op(State{}).decision;
    }
    return run_on(it->second, op);
  }

  // update_all (issue 17: what PolicyLimit::reconfigure carries over)
  //
  // As update() on every key held, under the lock. O(keys). Thread-safe.
  template <StoreOp<State> Op>
  void update_all(const Op& op) {
    detail::MutexLock lock(&mu_);
    for (auto& kv : map_) static_cast<void>(run_on(kv.second, op));
  }

  // Thread-safe; may be stale on return.
  StoreStats stats() const {
    detail::MutexLock lock(&mu_);
    StoreStats s = stats_;
    s.keys = map_.size();
    return s;
  }

  // Thread-safe; may be stale on return.
  std::size_t size() const {
    detail::MutexLock lock(&mu_);
    return map_.size();
  }

  const Options& options() const noexcept { return options_; }

 private:
  // Debian's abseil has its own absl::string_view (not std::string_view).
  static absl::string_view to_absl(std::string_view key) noexcept {
    return absl::string_view(key.data(), key.size());
  }

  // True when a new key may be inserted, after reclaiming idle states if the
  // store is full and a sweep is due.
  template <class Op>
  bool make_room(const Op& op) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (map_.size() < options_.max_keys) return true;
    ++since_sweep_;
    const std::size_t due = std::max<std::size_t>(1, options_.max_keys / 16);
    if (since_sweep_ < due) return false;
    since_sweep_ = 0;
    ++stats_.sweeps;
    const std::size_t before = map_.size();
    std::uint64_t floor = aux_floor_;
    absl::erase_if(map_, [&](const auto& kv) {
      if (!op.idle(kv.second.state)) return false;
      floor = std::max(floor, kv.second.aux);
      return true;
    });
    aux_floor_ = floor;
    stats_.reclaimed += before - map_.size();
    return map_.size() < options_.max_keys;
  }

  Decision when_full(Decision fresh) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (options_.when_full == WhenFull::kAdmitUncounted) {
      ++stats_.admitted_uncounted;
      return fresh;
    }
    ++stats_.denied_full;
    return detail::denied_full(fresh, options_.full_retry_after);
  }

  const Options options_;
  mutable detail::Mutex mu_;
  // A key's state and its give-back counter (store.hpp, detail::aux_in).
  struct Slot {
    State state;
    std::uint64_t aux;
  };

  template <class Op>
  Decision run_on(Slot& slot, const Op& op) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    detail::aux_in(op, slot.aux);
    Step<State> r = op(slot.state);
    op.published(slot.state);
    slot.aux += detail::aux_add(op, slot.state, r.next);
    slot.state = r.next;
    return r.decision;
  }

  absl::flat_hash_map<std::string, Slot> map_ ABSL_GUARDED_BY(mu_);
  // The counter new keys start from: at least that of every key dropped.
  std::uint64_t aux_floor_ ABSL_GUARDED_BY(mu_) = 0;
  StoreStats stats_ ABSL_GUARDED_BY(mu_);
  // Calls that found the store full, plus inserts, since the last sweep: a
  // sweep runs when this reaches max(1, max_keys / 16), so its cost is
  // amortised over the calls that made it due. Starts due.
  std::size_t since_sweep_ ABSL_GUARDED_BY(mu_) = ~std::size_t{0} / 2;
};

}  // namespace ratekeeper

#endif  // RATEKEEPER_STORE_IN_MEMORY_HPP_
