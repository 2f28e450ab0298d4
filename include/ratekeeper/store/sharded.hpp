// ratekeeper/store/sharded.hpp: the lock-free sharded store, the default.
//
// Defines ShardedStore<State> and ShardedOptions.
//
// Prefer ShardedStore (the default store of Limiter) unless you need the
// exact introspection of InMemoryStore. An existing key costs one seeded
// hash, a scan of one or two cache lines of key words and one 16-byte
// compare-and-swap: no lock, no allocation. `capacity` is a cap, not an
// allocation: memory grows with the keys held (docs/stores.md, "Memory").
//
// Layout. `shards` independent tables of buckets. A bucket holds 8 slots:
// 8 key words on one cache line, then their 8 States and 8 give-back
// counters (256 bytes in all). A key word is the 56-bit fingerprint of the
// key's 64-bit seeded hash and an 8-bit incarnation; a slot is 32 bytes.
// Each key has two candidate buckets in its shard's current table, derived
// from its fingerprint: a lookup reads the first bucket's key words and, if
// the key is not there, the second's. A new key goes to the emptier of the
// two; when both are full, resident keys are moved to their other buckets
// (cuckoo hashing, up to three moves deep). A shard's table starts at 16
// buckets (one 4 KiB page) and doubles, under the shard's mutex, when it is
// 7/8 full, up to the size that holds the shard's cap at 7/8 load; a grown
// shard moves its keys with the same tombstone protocol as a cuckoo move
// (grow()). Both candidate buckets are prefetched at once, so that in a
// table larger than the cache their misses overlap.
//
// Keys. Only the hash is kept. Two keys share a state only when their hashes
// agree on the shard and the 56 fingerprint bits: among 10M live keys, about
// 4e-5 expected such pairs with 16 shards (docs/stores.md). Sharing is
// conservative: both keys count against one limit, so it can deny early but
// never over-admit. The hash is wyhash's (the short-input path for keys of up
// to 16 bytes, its long-input chain beyond), with both operands of every
// multiplication keyed by a per-store random seed (or ShardedOptions::seed),
// so keys crafted to collide cannot be made without the seed.
//
// New keys take a short path of their own: under the shard's mutex (one per
// shard, on its own cache line) the key is looked for again, a free slot is
// claimed and its key word published; the call then proceeds lock-free like
// any other. When both buckets (even after cuckoo moves) or the shard are
// full, idle states (equivalent to never seen) are reclaimed first, then the
// caller's WhenFull applies; with kEvictStalest the state of the two buckets
// that becomes idle soonest is evicted and remembered by fingerprint until it
// goes idle, so an evicted key that returns starts from its own state and a
// never-seen key starts fresh. Up to `remembered` x capacity evicted keys are
// remembered; beyond that the soonest-idle ones spill into a per-shard
// summary (merged, most restrictive) that new keys start from: conservative,
// never an over-admission.
//
// Slot reuse. A reclaim, an eviction or a move marks the state with the
// reserved all-ones value (no policy produces it) and bumps the key word's
// incarnation; the tombstone stays until the slot is claimed again, so a
// thread holding a stale snapshot can never swap it into a freed slot. A
// thread re-checks the key word after a failed compare-and-swap, and after a
// successful one: an op whose swap succeeded is never run again when its
// slot was retired after it (the retirement carried its effect along). The
// one case it cannot tell apart is a slot given to a new key whose state is
// bit-identical to the snapshot it swapped; a take then counts again on its
// own key (an over-count, never an over-admission). Give-backs (update())
// run under the shard mutex and never meet it.
#ifndef RATEKEEPER_STORE_SHARDED_HPP_
#define RATEKEEPER_STORE_SHARDED_HPP_

#include <algorithm>
#include <atomic>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <new>
#include <optional>
#include <random>
#include <string_view>
#include <thread>
#include <vector>

#if defined(__linux__)
#  include <sys/mman.h>
#endif

#include "absl/base/thread_annotations.h"
#include "absl/hash/hash.h"
#include "absl/strings/string_view.h"
#include "ratekeeper/decision.hpp"
#include "ratekeeper/detail/atomic16.hpp"
#include "ratekeeper/detail/mutex.hpp"
#include "ratekeeper/policy/policy.hpp"
#include "ratekeeper/store/store.hpp"

namespace ratekeeper {

// KeyBudget: one cap on live keys shared by many ShardedStores (every limit
// of a TierTable, an Accountant's budget stores, limits of your own): give
// each store's ShardedOptions the same std::shared_ptr<KeyBudget>.
//
// Stores draw slots in chunks of kChunk per shard, on their insert path only
// (under the shard's insert mutex: never on a lookup of a key held), and
// give a chunk back whenever a shard holds 2 x kChunk slots more than it
// has live keys, and everything when cleared or destroyed. So the keys
// live in all the stores together never exceed capacity(), and a store
// holds at most shards x (2 x kChunk - 1) slots it does not use. A store
// that cannot draw is full, whatever its own `capacity`: idle keys are
// reclaimed, then its WhenFull applies (kEvictStalest evicts its own
// stalest key, kDenyNew refuses the new key; a budget store's refusal is
// kResourceExhausted). A store never loses the slots its live keys hold: a
// flood into one store takes only slots no other store holds, and every
// other store keeps its keys and decides its own new keys by its WhenFull.
//
// Cost per key: a store's table holds a live key in 37 to 73 bytes (its
// tables double at 7/8 load, docs/stores.md "Memory"), and each store's
// tables keep the size of that store's own peak; evicted keys a store
// remembers (ShardedOptions::remembered) are 64 bytes each and outside the
// cap. Thread-safe.
class KeyBudget {
 public:
  static constexpr std::size_t kChunk = 8;

  explicit KeyBudget(std::size_t keys) noexcept : cap_(keys), free_(keys) {}
  KeyBudget(const KeyBudget&) = delete;
  KeyBudget& operator=(const KeyBudget&) = delete;

  std::size_t capacity() const noexcept { return cap_; }
  // Slots no store holds now (a snapshot; may be stale on return).
  std::size_t available() const noexcept {
    return free_.load(std::memory_order_relaxed);
  }

  // For stores: takes up to `n` slots; returns how many it took.
  std::size_t draw(std::size_t n) noexcept {
    std::size_t cur = free_.load(std::memory_order_relaxed);
    for (;;) {
      const std::size_t take = std::min(cur, n);
      if (take == 0) return 0;
      if (free_.compare_exchange_weak(cur, cur - take,
                                      std::memory_order_relaxed)) {
        return take;
      }
    }
  }
  // For stores: gives back `n` slots drawn before.
  void give_back(std::size_t n) noexcept {
    free_.fetch_add(n, std::memory_order_relaxed);
  }

 private:
  const std::size_t cap_;
  std::atomic<std::size_t> free_;
};

// ShardedOptions: the knobs of a ShardedStore.
struct ShardedOptions {
  // Keys the store may hold at once: a cap, not an allocation. Enforced per
  // shard, with headroom for uneven hashing: any `capacity` keys fit, and at
  // most shards x (capacity / shards + 4 sqrt(capacity / shards) + 8) are
  // held. Each shard's table starts at 16 buckets and doubles as keys
  // arrive (docs/stores.md, "Memory"): about 37 to 73 bytes per live key.
  std::size_t capacity = std::size_t{1} << 20;
  // Independent tables, each with its own insert mutex. 0: a power of two
  // >= 4 x hardware threads (at least 16), fewer for small capacities. Raise
  // it when many threads insert new keys at once.
  std::size_t shards = 0;
  // What a new key gets when its shard is full and nothing idle is left.
  WhenFull when_full = WhenFull::kEvictStalest;
  // retry_after of a call denied because the store is full (kDenyNew).
  Nanos full_retry_after = std::chrono::seconds(1);
  // Hash seed. 0: a random seed per store. Fix it only to reproduce a run.
  std::uint64_t seed = 0;
  // kEvictStalest: how many evicted keys, as a multiple of `capacity`, are
  // remembered exactly (by fingerprint, with their state) until their state
  // goes idle. A flood of up to remembered x capacity keys that are not yet
  // idle leaves every never-seen key fresh; beyond it, evicted states spill
  // into a conservative per-shard summary (docs/stores.md). Memory: at most
  // 64 bytes per remembered key, allocated when a flood first needs it and
  // given back as its entries go idle (each sweep shrinks the table to fit).
  // 0: remember none (every eviction goes to the summary).
  std::size_t remembered = 16;
  // A cap on live keys shared with other stores (KeyBudget), on top of
  // `capacity`; null: none.
  std::shared_ptr<KeyBudget> key_budget = nullptr;
};

template <class StateT>
class ShardedStore {
 public:
  using State = StateT;
  using Options = ShardedOptions;

  static_assert(std::is_trivially_copyable_v<State> && sizeof(State) <= 16,
                "ShardedStore keeps states inline: at most 16 trivially "
                "copyable bytes (see Policy)");

  static constexpr std::size_t kSlotsPerBucket = 8;
  static constexpr int kCuckooDepth = 3;
  static constexpr std::size_t kRetryStripes = 8;
  // A shard's first table: 16 buckets, 128 slots, one 4 KiB page.
  static constexpr std::size_t kFirstBuckets = 16;
  static constexpr bool kLockFree = detail::Atomic16::kLockFree;

  explicit ShardedStore(Options options = {})
      : options_(options),
        seed_(options.seed != 0 ? options.seed : random_seed()),
        wy_seed_(seed_ ^ wymix(seed_ ^ kWy0, kWy1)),
        wy_a_(kWy1 ^ wymix(seed_ ^ kWy1, kWy0)) {
    const std::size_t cap = std::max<std::size_t>(options_.capacity, 1);
    std::size_t shards = options_.shards;
    if (shards == 0) {
      const std::size_t hw =
          std::max<std::size_t>(1, std::thread::hardware_concurrency());
      shards = std::bit_ceil(std::max<std::size_t>(16, 4 * hw));
      // At least 64 keys per shard, so that small stores stay one table.
      shards = std::max<std::size_t>(
          1,
          std::min(shards, std::bit_floor(std::max<std::size_t>(1, cap / 64))));
    }
    // Hashing spreads keys unevenly over shards (binomially): each shard
    // gets 4 standard deviations of headroom, so that any `capacity` keys
    // fit, and the store holds at most shards x shard_cap_ keys.
    // (One shard needs none: it holds exactly `capacity`.)
    const std::size_t even = (cap + shards - 1) / shards;
    shard_cap_ = shards == 1
                     ? cap
                     : even +
                           static_cast<std::size_t>(
                               4.0 * std::sqrt(static_cast<double>(even))) +
                           8;
    // 7/8 load at capacity; at least two buckets, so a key has two choices.
    // The table starts at kFirstBuckets and grows to this (insert()).
    max_buckets_ = std::max<std::size_t>(
        2, (shard_cap_ * 8 / 7 + kSlotsPerBucket - 1) / kSlotsPerBucket);
    summary_size_ = std::max<std::size_t>(16, shard_cap_ / 16);
    max_remembered_ = std::max<std::size_t>(
        16, options_.remembered * ((cap + shards - 1) / shards));
    if (options_.remembered == 0) max_remembered_ = 0;
    shards_ = std::make_unique<Shard[]>(shards);
    n_shards_ = shards;
  }

  ShardedStore(const ShardedStore&) = delete;
  ShardedStore& operator=(const ShardedStore&) = delete;
  ~ShardedStore() {
    if (options_.key_budget == nullptr) return;
    for (std::size_t i = 0; i < n_shards_; ++i) {
      options_.key_budget->give_back(
          shards_[i].drawn.load(std::memory_order_relaxed));
    }
  }

  // apply
  //
  // Runs `op` on `key`'s state and publishes the result with one
  // compare-and-swap (a lost one re-runs `op`). A new key first takes the
  // shard's insert path. Thread-safe; lock-free for keys already held.
  template <StoreOp<State> Op>
  Decision apply(std::string_view key, const Op& op) {
    return run(key, op);
  }

  // peek
  //
  // `op`'s decision on `key`'s state; publishes and inserts nothing. A key
  // not held is decided on the state it would start from. Thread-safe.
  template <StoreOp<State> Op>
  Decision peek(std::string_view key, const Op& op) const {
    auto* self = const_cast<ShardedStore*>(this);
    const Hashed h = hash(key);
    Shard& shard = self->shards_[h.shard];
    for (;;) {
      std::optional<SlotRef> slot = self->find(shard, h);
      if (!slot) {
        // A lock-free lookup can miss a key that a move is carrying between
        // its buckets; moves hold the mutex, so under it the key is found
        // where it is (or it is truly not held).
        detail::MutexLock lock(&shard.mu);
        slot = self->find(shard, h);
        if (!slot) {
          detail::aux_in(op, shard.aux_floor);
          return op(self->initial_state(shard, h, op)).decision;
        }
      }
      Decision d;
      if (self->apply_at(shard, *slot, op, /*write=*/false, d)) return d;
    }
  }

  // update
  //
  // As apply() for a key held; a key not held stays absent. Runs under the
  // shard's mutex, so that no move, reclaim or eviction of the store's own
  // can interleave with it: the op is applied exactly once, to this key's
  // state (it is how receipts are given back, which must never land twice
  // or on another key). Lock-free calls on the key go on meanwhile; their
  // compare-and-swaps and this one's order them. Thread-safe.
  template <StoreOp<State> Op>
  Decision update(std::string_view key, const Op& op) {
    const Hashed h = hash(key);
    Shard& shard = shards_[h.shard];
    detail::MutexLock lock(&shard.mu);
    for (;;) {
      std::optional<SlotRef> slot = find(shard, h);
      if (!slot) {
        detail::aux_in(op, shard.aux_floor);
        return op(initial_state(shard, h, op)).decision;
      }
      Decision d;
      if (apply_at(shard, *slot, op, /*write=*/true, d, /*add_aux=*/true)) {
        return d;
      }
    }
  }

  // Thread-safe; a sum of per-shard counters, each read relaxed: a snapshot
  // that may be stale on return and is not taken at one instant.
  StoreStats stats() const {
    StoreStats st;
    for (std::size_t i = 0; i < n_shards_; ++i) {
      const Shard& s = shards_[i];
      st.keys += s.live.load(std::memory_order_relaxed);
      st.inserts += s.inserts.load(std::memory_order_relaxed);
      st.reclaimed += s.reclaimed.load(std::memory_order_relaxed);
      st.sweeps += s.sweeps.load(std::memory_order_relaxed);
      st.evicted += s.evicted.load(std::memory_order_relaxed);
      st.denied_full += s.denied_full.load(std::memory_order_relaxed);
      st.admitted_uncounted +=
          s.admitted_uncounted.load(std::memory_order_relaxed);
    }
    for (const auto& r : cas_retries_) {
      st.cas_retries += r.n.load(std::memory_order_relaxed);
    }
    return st;
  }

  // Thread-safe; may be stale on return.
  std::size_t size() const { return static_cast<std::size_t>(stats().keys); }

  // Slots this store holds of its KeyBudget (0 without one): its live keys
  // and at most 2 x KeyBudget::kChunk - 1 more per shard. Thread-safe; may
  // be stale on return.
  std::size_t key_budget_held() const noexcept {
    std::size_t n = 0;
    for (std::size_t i = 0; i < n_shards_; ++i) {
      n += shards_[i].drawn.load(std::memory_order_relaxed);
    }
    return n;
  }

  const Options& options() const noexcept { return options_; }
  std::size_t shard_count() const noexcept { return n_shards_; }
  std::size_t capacity_per_shard() const noexcept { return shard_cap_; }
  // Bytes the store holds resident now: its shards, their current tables,
  // retired tables not yet returned to the system (docs/stores.md,
  // "Memory"), remembered evicted keys and summaries. Thread-safe; may be
  // stale on return.
  std::size_t allocated_bytes() const noexcept {
    std::size_t n = n_shards_ * sizeof(Shard) + sizeof(*this);
    for (std::size_t i = 0; i < n_shards_; ++i) {
      n += shards_[i].bytes.load(std::memory_order_relaxed);
    }
    return n;
  }

  // clear
  //
  // Forgets every key and returns the tables' memory to the system where it
  // can (on Linux, where tables are mappings; elsewhere they are emptied
  // and kept): for
  // a store nothing will use again, such as a limit that TierTable::set_tier
  // replaced. Calls that race with it are safe: each decides on the key's
  // state before the clear or on a fresh one. Thread-safe.
  void clear() {
    for (std::size_t i = 0; i < n_shards_; ++i) {
      Shard& shard = shards_[i];
      detail::MutexLock lock(&shard.mu);
      Table* t = shard.table.load(std::memory_order_relaxed);
      if (t == nullptr) continue;
      for (std::size_t bi = 0; bi < t->n; ++bi) {
        for (std::size_t j = 0; j < kSlotsPerBucket; ++j) {
          retire(shard, t->b[bi], j, [](const State&) { return true; });
        }
      }
      shard.remembered.clear();
      shard.summary.clear();
      shard.summary.shrink_to_fit();
      // Retired tables are never read again once nothing can hold a pointer
      // into them; the current one is empty now. Give back what can be.
      // The current table stays in use: its pages go back (they are all
      // zero again) but it may fill again, so it is not marked released.
      for (auto& old : shard.tables) {
        if (old.get() == t) {
          old->mem.discard_pages();
        } else {
          old->mem.release_pages();
        }
      }
      shard.bytes.store(resident_bytes(shard), std::memory_order_relaxed);
      if (options_.key_budget != nullptr) {
        options_.key_budget->give_back(
            shard.drawn.exchange(0, std::memory_order_relaxed));
      }
    }
  }

  // update_all (issue 17: what PolicyLimit::reconfigure carries over)
  //
  // As update() on every key held, one shard at a time under its mutex:
  // each held state is run through `op` exactly once (lock-free calls on a
  // key go on meanwhile; the compare-and-swap orders them). Keys not held
  // (never seen, reclaimed, or evicted and remembered) are left as they
  // are. O(keys held). Thread-safe.
  template <StoreOp<State> Op>
  void update_all(const Op& op) {
    for (std::size_t i = 0; i < n_shards_; ++i) {
      Shard& shard = shards_[i];
      detail::MutexLock lock(&shard.mu);
      Table* t = shard.table.load(std::memory_order_relaxed);
      if (t == nullptr) continue;
      for (std::size_t bi = 0; bi < t->n; ++bi) {
        Bucket& b = t->b[bi];
        for (std::size_t j = 0; j < kSlotsPerBucket; ++j) {
          const std::uint64_t w = b.keys[j].load(std::memory_order_acquire);
          if (fp_of(w) == 0) continue;
          Decision d;
          // Under the mutex no move or retirement can take the slot away.
          while (!apply_at(shard, SlotRef{&b, j, w, 0}, op, /*write=*/true, d,
                           /*add_aux=*/true)) {
          }
        }
      }
    }
  }

  // probe_distance
  //
  // Which of its two candidate buckets holds `key` (0: the first, read
  // first; 1: the second, read after the first), or nullopt when not held.
  // For tests of hash quality (TESTPLAN T9c). Thread-safe; may be stale.
  std::optional<std::size_t> probe_distance(std::string_view key) const {
    const Hashed h = hash(key);
    auto* self = const_cast<ShardedStore*>(this);
    const auto slot = self->find(self->shards_[h.shard], h);
    if (!slot) return std::nullopt;
    return slot->choice;
  }

 private:
  using u128 = detail::u128;

  static constexpr std::uint64_t kFpBits = 56;
  static constexpr std::uint64_t kFpMask = (std::uint64_t{1} << kFpBits) - 1;
  static constexpr u128 kTomb = ~u128{0};  // the reserved all-ones state

  // Key word: fingerprint in the low 56 bits (0: no key), incarnation in the
  // top 8.
  static std::uint64_t fp_of(std::uint64_t w) noexcept { return w & kFpMask; }
  static std::uint64_t inc_of(std::uint64_t w) noexcept { return w >> kFpBits; }
  static std::uint64_t make_word(std::uint64_t fp, std::uint64_t inc) noexcept {
    return (inc << kFpBits) | fp;
  }
  // Incarnations run 1..255 and wrap to 1 (0 is a slot never used): a
  // thread that read a key word notices when its slot changed hands, unless
  // it changed hands exactly 255 times while that thread was between two
  // instructions.
  static std::uint64_t next_inc(std::uint64_t inc) noexcept {
    return inc % 0xFF + 1;
  }

  struct alignas(64) Bucket {
    // keys[i]: the slot's key word, all 8 on one cache line. Stored with
    // release under the shard mutex (publishing a slot, or retiring it);
    // loaded with acquire by every lookup, so a thread that sees a key word
    // also sees the state written before it was published.
    std::atomic<std::uint64_t> keys[kSlotsPerBucket] = {};
    // states[i]: the slot's State, changed only by compare-and-swap
    // (sequentially consistent; see atomic16.hpp).
    detail::Atomic16 states[kSlotsPerBucket];
    // aux[i]: the slot's give-back counter (store.hpp, detail::aux_in),
    // written only under the shard mutex, after the state it accounts for
    // (release); read before the state (acquire).
    std::atomic<std::uint64_t> aux[kSlotsPerBucket] = {};
  };
  static_assert(sizeof(Bucket) == 256, "8 key words + 8 states + 8 counters");

  // A table's memory. On Linux an anonymous mapping of whole pages, which
  // the kernel zero-fills page by page on first touch, so only pages holding
  // keys become resident; from 4 MiB on it is advised for transparent huge
  // pages, so that a lookup in a large table costs a cache miss and not also a
  // page walk. release_pages() gives a mapping's pages back (MADV_DONTNEED) but
  // keeps the addresses mapped until the store is destroyed: a thread still
  // reading a retired table reads zeros, which are "no key here" (see grow()),
  // never unmapped memory. Elsewhere one aligned allocation, constructed
  // (zeroed) here, kept until destroyed.
  class BucketArray {
   public:
    explicit BucketArray(std::size_t n) : n_(n) {
      bytes_ = n * sizeof(Bucket);
#if defined(__linux__)
      {
        // Whole pages; from 4 MiB on, whole huge pages, aligned to one.
        const bool huge = bytes_ >= 2 * kHuge;
        const std::size_t unit = huge ? kHuge : kPage;
        bytes_ = (bytes_ + unit - 1) / unit * unit;
        map_bytes_ = bytes_ + (huge ? kHuge : 0);
        void* p = ::mmap(nullptr, map_bytes_, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) throw std::bad_alloc();
        map_ = p;
        auto addr = reinterpret_cast<std::uintptr_t>(p);
        addr = (addr + unit - 1) / unit * unit;
        b_ = reinterpret_cast<Bucket*>(addr);
#  if defined(MADV_HUGEPAGE)
        if (huge) {
          ::madvise(b_, bytes_, MADV_HUGEPAGE);  // advice: failure is harmless
        }
#  endif
        // Zero-filled by the kernel: all-zero bytes are an empty bucket
        // (key words 0, states 0, counters 0), the value Bucket() makes.
        return;
      }
#endif
      void* p = ::operator new (bytes_, std::align_val_t{alignof(Bucket)});
      b_ = static_cast<Bucket*>(p);
      for (std::size_t i = 0; i < n; ++i) new (&b_[i]) Bucket();
    }
    BucketArray(const BucketArray&) = delete;
    BucketArray& operator=(const BucketArray&) = delete;
    ~BucketArray() {
#if defined(__linux__)
      if (map_ != nullptr) {
        ::munmap(map_, map_bytes_);
        return;
      }
#endif
      for (std::size_t i = 0; i < n_; ++i) b_[i].~Bucket();
      ::operator delete (b_, std::align_val_t{alignof(Bucket)});
    }
    Bucket* data() noexcept { return b_; }
    // Gives a mapping's pages back to the system; the addresses stay mapped
    // and read as zeros. A no-op for a small (allocated) table.
    void release_pages() noexcept {
#if defined(__linux__)
      if (map_ != nullptr && !released_) {
        ::madvise(b_, bytes_, MADV_DONTNEED);
        released_ = true;
      }
#endif
    }
    // Gives a mapping's pages back while the table stays in use (clear()):
    // keys written later fault them in again, zero-filled. Counted as
    // resident still (an upper bound).
    void discard_pages() noexcept {
#if defined(__linux__)
      if (map_ != nullptr && !released_) ::madvise(b_, bytes_, MADV_DONTNEED);
#endif
    }
    // Resident at most: 0 once released.
    std::size_t resident_bytes() const noexcept {
      return released_ ? 0 : bytes_;
    }
    // Whether this table's pages can be given back.
    bool mapped() const noexcept { return map_ != nullptr; }

   private:
    static constexpr std::size_t kHuge = std::size_t{2} << 20;
    static constexpr std::size_t kPage = 4096;
    Bucket* b_ = nullptr;
    std::size_t n_ = 0;
    std::size_t bytes_ = 0;
    std::size_t map_bytes_ = 0;
    void* map_ = nullptr;
    bool released_ = false;
  };

  // One table of a shard: n buckets. Immutable once published; a grown
  // shard publishes a new one (grow()).
  struct Table {
    explicit Table(std::size_t buckets)
        : mem(buckets), b(mem.data()), n(buckets) {}
    BucketArray mem;
    Bucket* b;
    std::size_t n;
  };

  // An evicted key remembered by fingerprint (kEvictStalest): fp 0 is an
  // empty entry. Open addressing with linear probing, under the shard mutex.
  struct Remembered {
    std::uint64_t fp = 0;
    State state{};
  };
  class RememberedSet {
   public:
    std::size_t size() const noexcept { return count_; }
    std::size_t bytes() const noexcept {
      return slots_.capacity() * sizeof(Remembered);
    }
    void clear() {
      slots_.clear();
      slots_.shrink_to_fit();
      count_ = 0;
    }
    const State* find(std::uint64_t fp) const noexcept {
      if (slots_.empty()) return nullptr;
      for (std::size_t i = home(fp);; i = next(i)) {
        if (slots_[i].fp == fp) return &slots_[i].state;
        if (slots_[i].fp == 0) return nullptr;
      }
    }
    // Inserts or replaces; the caller keeps size() below its bound.
    void put(std::uint64_t fp, const State& s) {
      if ((count_ + 1) * 4 > slots_.size() * 3)
        rehash(slots_.empty() ? 16 : 2 * slots_.size());
      std::size_t i = home(fp);
      while (slots_[i].fp != 0 && slots_[i].fp != fp) i = next(i);
      if (slots_[i].fp == 0) ++count_;
      slots_[i] = Remembered{fp, s};
    }
    void erase(std::uint64_t fp) noexcept {
      if (slots_.empty()) return;
      std::size_t i = home(fp);
      while (slots_[i].fp != fp) {
        if (slots_[i].fp == 0) return;
        i = next(i);
      }
      erase_at(i);
    }
    // Drops every entry for which pred(state) holds; returns how many.
    template <class Pred>
    std::size_t erase_if(Pred pred) {
      std::size_t dropped = 0;
      for (std::size_t i = 0; i < slots_.size();) {
        if (slots_[i].fp != 0 && pred(slots_[i].state)) {
          erase_at(i);  // shifts a later entry into i: look at i again
          ++dropped;
        } else {
          ++i;
        }
      }
      shrink_to_fit();
      return dropped;
    }
    // After a flood: back to a table no more than 3/8 full (16 slots at
    // least), or none, so that memory follows the keys still remembered.
    void shrink_to_fit() {
      if (count_ == 0) {
        clear();
        return;
      }
      std::size_t n = 16;
      while (n * 3 < count_ * 8) n *= 2;
      if (n * 2 <= slots_.size()) rehash(n);
    }
    // The entry at or after fp's home going idle soonest among `look`
    // entries (by idle_at), if any.
    template <class IdleAt>
    std::optional<Remembered> soonest_near(std::uint64_t fp, std::size_t look,
                                           IdleAt idle_at) const {
      std::optional<Remembered> best;
      Nanos best_at = Nanos::max();
      if (slots_.empty()) return best;
      std::size_t i = home(fp);
      for (std::size_t k = 0; k < slots_.size() && look > 0; ++k, i = next(i)) {
        if (slots_[i].fp == 0) continue;
        --look;
        const Nanos at = idle_at(slots_[i].state);
        if (!best || at < best_at) {
          best = slots_[i];
          best_at = at;
        }
      }
      return best;
    }

   private:
    std::size_t home(std::uint64_t fp) const noexcept {
      return static_cast<std::size_t>(mix(fp ^ 0x9e3779b97f4a7c15ULL)) &
             (slots_.size() - 1);
    }
    std::size_t next(std::size_t i) const noexcept {
      return (i + 1) & (slots_.size() - 1);
    }
    void rehash(std::size_t n) {
      std::vector<Remembered> old = std::move(slots_);
      slots_.assign(n, Remembered{});
      count_ = 0;
      for (const Remembered& r : old) {
        if (r.fp != 0) put(r.fp, r.state);
      }
    }
    // Backward-shift deletion: no tombstones, probes stay short.
    void erase_at(std::size_t i) noexcept {
      std::size_t j = i;
      for (;;) {
        j = next(j);
        if (slots_[j].fp == 0) break;
        const std::size_t h = home(slots_[j].fp);
        // Move j back to i unless its home lies cyclically in (i, j].
        const bool stays = i <= j ? (i < h && h <= j) : (i < h || h <= j);
        if (!stays) {
          slots_[i] = slots_[j];
          i = j;
        }
      }
      slots_[i] = Remembered{};
      --count_;
    }
    std::vector<Remembered> slots_;
    std::size_t count_ = 0;
  };

  // One shard: its insert mutex, counters and summary on cache lines of their
  // own (alignas(64) pads the struct), so that two cores working in two
  // shards never share a line. Counters are relaxed: they order nothing.
  struct alignas(64) Shard {
    // The current table: null until the first key; replaced (release) only
    // under the mutex, by grow(); loaded with acquire by lookups.
    std::atomic<Table*> table{nullptr};
    mutable detail::Mutex mu;
    // Every table this shard had, the current one last. Retired ones stay
    // allocated until the store is destroyed (a lock-free lookup may still
    // be reading one); on Linux they give their pages back.
    std::vector<std::unique_ptr<Table>> tables ABSL_GUARDED_BY(mu);
    // Evicted keys remembered exactly until idle (kEvictStalest).
    RememberedSet remembered ABSL_GUARDED_BY(mu);
    std::size_t since_purge ABSL_GUARDED_BY(mu) = 0;
    // Where remembered states spill when `remembered` is full: empty (all
    // fresh) until then.
    std::vector<State> summary ABSL_GUARDED_BY(mu);
    std::size_t since_sweep ABSL_GUARDED_BY(mu) = 0;
    // Slots drawn from the KeyBudget: written under mu, read relaxed by
    // key_budget_held(). At least `live` whenever the store has a budget.
    std::atomic<std::size_t> drawn{0};
    // The give-back counter new keys start from: at least that of every key
    // retired from the shard.
    std::uint64_t aux_floor ABSL_GUARDED_BY(mu) = 0;
    std::atomic<std::size_t> bytes{0};
    std::atomic<std::uint64_t> live{0};
    std::atomic<std::uint64_t> inserts{0};
    std::atomic<std::uint64_t> reclaimed{0};
    std::atomic<std::uint64_t> sweeps{0};
    std::atomic<std::uint64_t> evicted{0};
    std::atomic<std::uint64_t> denied_full{0};
    std::atomic<std::uint64_t> admitted_uncounted{0};
  };

  // Lost compare-and-swaps, counted on the contended path itself: striped
  // by thread over lines of their own (one set per store), so that counting
  // a retry does not add a second contended line to the one being fought
  // over.
  struct alignas(64) Stripe {
    std::atomic<std::uint64_t> n{0};
  };

  struct Hashed {
    std::uint64_t fp;  // 1..2^56-1
    std::size_t shard;
  };

  struct SlotRef {
    Bucket* bucket;
    std::size_t index;
    std::uint64_t word;  // the key word as found
    std::size_t choice;  // 0: first candidate bucket, 1: second
  };

  // What the insert path did: a slot to run the call on, or the call's
  // decision when it was decided there (store full, or nothing to store).
  struct InsertResult {
    std::optional<SlotRef> slot;
    std::optional<Decision> decided;
  };

  static std::uint64_t random_seed() {
    std::random_device rd;
    const std::uint64_t s =
        (static_cast<std::uint64_t>(rd()) << 32) ^ rd() ^
        static_cast<std::uint64_t>(
            std::chrono::steady_clock::now().time_since_epoch().count());
    return s == 0 ? 1 : s;
  }

  static std::uint64_t mix(std::uint64_t m) noexcept {  // murmur3 finaliser
    m ^= m >> 33;
    m *= 0xff51afd7ed558ccdULL;
    m ^= m >> 33;
    m *= 0xc4ceb9fe1a85ec53ULL;
    m ^= m >> 33;
    return m;
  }

  // The key's 64-bit seeded hash. Keys of up to 16 bytes (most: "user:42",
  // an IPv6 address in binary, a UUID) take wyhash's short-input path (Wang
  // Yi's wyhash, final version 4: two 64x64->128 multiplications, SMHasher
  // clean) inline, a few cycles on the path of every check; longer keys take
  // wyhash's long-input chain. Both multiplicands of every product are
  // keyed with the store's seed (premixed once): with wyhash's public
  // constant as one of them, as published, a key whose bytes spell that
  // constant zeroes the product whatever the seed, and every such key of a
  // length collides (an examiner found 2^64 16-byte keys sharing one limit,
  // and the same through absl's hash, whose salt is public too). Keyed
  // operands cannot be zeroed, or keys crafted to collide made, without the
  // seed.
  static constexpr std::uint64_t kWy0 = 0xa0761d6478bd642fULL;
  static constexpr std::uint64_t kWy1 = 0xe7037ed1a0b428dbULL;
  static std::uint64_t wymix(std::uint64_t a, std::uint64_t b) noexcept {
    const u128 r = static_cast<u128>(a) * b;
    return static_cast<std::uint64_t>(r) ^ static_cast<std::uint64_t>(r >> 64);
  }
  static std::uint64_t read32(const unsigned char* p) noexcept {
    std::uint32_t v = 0;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  static std::uint64_t read64(const unsigned char* p) noexcept {
    std::uint64_t v = 0;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  // Keys over 16 bytes: wyhash's long-input chain, 16 bytes a step, then
  // the last 16 bytes (overlapping), with the same keyed operands.
  [[gnu::noinline]] std::uint64_t long_key_hash(const unsigned char* p,
                                                std::size_t n) const noexcept {
    std::uint64_t h = wy_seed_;
    std::size_t i = n;
    const unsigned char* q = p;
    while (i > 16) {
      h = wymix(read64(q) ^ wy_a_, read64(q + 8) ^ h);
      q += 16;
      i -= 16;
    }
    const u128 r =
        static_cast<u128>(read64(p + n - 16) ^ wy_a_) * (read64(p + n - 8) ^ h);
    return wymix(static_cast<std::uint64_t>(r) ^ kWy0 ^ n,
                 static_cast<std::uint64_t>(r >> 64) ^ kWy1);
  }
  std::uint64_t key_hash(std::string_view key) const noexcept {
    const std::size_t n = key.size();
    const auto* p = reinterpret_cast<const unsigned char*>(key.data());
    if (n > 16) [[unlikely]] {
      return long_key_hash(p, n);
    }
    std::uint64_t a = 0;
    std::uint64_t b = 0;
    if (n >= 4) [[likely]] {
      // Four 4-byte reads that cover the key (overlapping when n < 16).
      const std::size_t m = (n >> 3) << 2;
      a = (read32(p) << 32) | read32(p + m);
      b = (read32(p + n - 4) << 32) | read32(p + n - 4 - m);
    } else if (n > 0) {
      a = (std::uint64_t{p[0]} << 16) | (std::uint64_t{p[n >> 1]} << 8) |
          p[n - 1];
    }
    const u128 r = static_cast<u128>(a ^ wy_a_) * (b ^ wy_seed_);
    return wymix(static_cast<std::uint64_t>(r) ^ kWy0 ^ n,
                 static_cast<std::uint64_t>(r >> 64) ^ kWy1);
  }

  Hashed hash(std::string_view key) const noexcept {
    const std::uint64_t h = key_hash(key);
    Hashed out;
    // Fingerprint: the low 56 bits. Shard: the high 32 by multiply-shift
    // (no power-of-two sizes needed), so up to 256 shards are chosen by the
    // 8 bits the fingerprint does not hold (more shards read fingerprint
    // bits too: 64 bits tell keys apart either way). Both hashes are mixed
    // already; no remix, which would sit on the lookup's critical path.
    out.fp = h & kFpMask;
    if (out.fp == 0) out.fp = 1;
    out.shard = static_cast<std::size_t>(((h >> 32) * n_shards_) >> 32);
    return out;
  }

  // A key's two candidate buckets in a table of n, from its fingerprint
  // alone, so that the insert path can move a resident key to its other
  // bucket (cuckoo) knowing only its key word.
  static void buckets_of(std::uint64_t fp, std::size_t n, std::size_t& first,
                         std::size_t& second) noexcept {
    // The fingerprint is hash bits already: bits 0..31 and 24..55, each by
    // multiply-shift, which reads a word's high bits (log2 n of them: for
    // tables of up to 2^24 buckets, disjoint bits). No remix: it would sit
    // on the lookup's critical path.
    first = static_cast<std::size_t>(((fp & 0xFFFF'FFFFu) * n) >> 32);
    second = static_cast<std::size_t>((((fp >> 24) & 0xFFFF'FFFFu) * n) >> 32);
    if (second == first) second = first + 1 == n ? 0 : first + 1;
  }

  static std::size_t other_bucket(std::uint64_t fp, std::size_t n,
                                  std::size_t current) noexcept {
    std::size_t first = 0, second = 0;
    buckets_of(fp, n, first, second);
    return current == first ? second : first;
  }

  static Bucket& bucket(Table& t, std::uint64_t fp,
                        std::size_t choice) noexcept {
    std::size_t first = 0, second = 0;
    buckets_of(fp, t.n, first, second);
    return t.b[choice == 0 ? first : second];
  }

  // The slot holding h.fp in either candidate bucket of the shard's current
  // table. The first bucket's key line and both of its state lines are
  // requested at once, so that in a table larger than the cache their
  // misses overlap instead of following one another.
  [[gnu::always_inline]] std::optional<SlotRef> find(Shard& shard,
                                                     const Hashed& h) noexcept {
    // Acquire: pairs with grow()'s release, so the table's contents are seen.
    Table* t = shard.table.load(std::memory_order_acquire);
    if (t == nullptr) return std::nullopt;
    std::size_t bi[2];
    buckets_of(h.fp, t->n, bi[0], bi[1]);
    const Bucket& first = t->b[bi[0]];
    __builtin_prefetch(&first.keys[0]);
    prefetch_for_write(&first.states[0]);
    prefetch_for_write(&first.states[4]);
    __builtin_prefetch(&t->b[bi[1]].keys[0]);
    for (std::size_t c = 0; c < 2; ++c) {
      Bucket& b = t->b[bi[c]];
      for (std::size_t i = 0; i < kSlotsPerBucket; ++i) {
        const std::uint64_t w = b.keys[i].load(std::memory_order_acquire);
        if (fp_of(w) == h.fp) return SlotRef{&b, i, w, c};
      }
    }
    return std::nullopt;
  }

  // apply(): op on the key's slot, which a key not held gets from the
  // insert path (where the op is decided and published under the mutex).
  template <class Op>
  Decision run(std::string_view key, const Op& op) {
    const Hashed h = hash(key);
    Shard& shard = shards_[h.shard];
    Decision d;  // the return value, written in place (apply_at)
    for (;;) {
      std::optional<SlotRef> slot = find(shard, h);
      if (!slot) [[unlikely]] {
        InsertResult ins = insert(shard, h, op);
        if (ins.decided) return *ins.decided;
        slot = ins.slot;
      }
      if (apply_at(shard, *slot, op, /*write=*/true, d)) [[likely]] {
        return d;
      }
    }
  }

  // A Decision copied field by field, each through a register. A copy of
  // the whole struct is made of 16-byte moves (and GCC's SLP vectoriser
  // turns a plain field-by-field copy into the same), and a 16-byte load of
  // a Decision just written as a bool and 8-byte words is a load that store
  // forwarding cannot serve: a stall of about a dozen cycles on every check
  // (perf annotate of apply()). The empty asm makes each field a 64-bit
  // register value, read with a load of the width it was written with.
  static void set_decision(Decision& to, const Decision& from) noexcept {
    std::uint64_t limit = from.limit;
    std::uint64_t remaining = from.remaining;
    std::int64_t retry = from.retry_after.count();
    std::int64_t reset = from.reset_after.count();
    __asm__("" : "+r"(limit), "+r"(remaining), "+r"(retry), "+r"(reset));
    to.allowed = from.allowed;
    to.limit = limit;
    to.remaining = remaining;
    to.retry_after = Nanos{retry};
    to.reset_after = Nanos{reset};
  }

  // Runs op on the slot and sets `out` to its decision. false: the slot is
  // being reclaimed or changed hands before op could be applied; the caller
  // looks the key up again.
  //
  // An op whose compare-and-swap succeeded is applied: it is never run
  // again, even when the slot's key word changed after it (a move or an
  // eviction carried the state, with this op's effect, elsewhere; a reclaim
  // found it idle). Only when the word shows the slot was given to another
  // key since (a move or eviction followed by an insert into the freed
  // slot) can this thread not tell whether its swap landed before the slot
  // changed hands or, the new key's state being bit-identical to the one it
  // read, after: then a take is counted again on its own key (an
  // over-count, never an over-admission), and a give-back (update(), under
  // the mutex) cannot meet the case at all.
  template <class Op>
  bool apply_at([[maybe_unused]] Shard& shard, const SlotRef& slot,
                const Op& op, bool write, Decision& out, bool add_aux = false) {
    detail::Atomic16& cell = slot.bucket->states[slot.index];
    std::atomic<std::uint64_t>& word = slot.bucket->keys[slot.index];
    std::atomic<std::uint64_t>& aux = slot.bucket->aux[slot.index];
    std::uint64_t aux_before = 0;
    if constexpr (detail::wants_aux<Op>) {
      aux_before = aux.load(std::memory_order_acquire);
      op.aux_in(aux_before);
    }
    u128 cur = cell.load();
    for (;;) {
      if (cur == kTomb) {
        yield_briefly();
        return false;
      }
      const Step<State> r = op(detail::from_u128<State>(cur));
      const u128 next = write ? detail::to_u128(r.next) : cur;
      if (next == cur && !add_aux && detail::Atomic16::loads_are_atomic()) {
        // A denial, a peek, an unchanged state, decided from an untorn load
        // (MOVDQA on AVX x86-64, or a load under the stripe lock): nothing
        // to write, so no CAS and the line is not taken exclusive. The
        // load is the decision's linearisation point. It read this key's
        // state if the key word, loaded after it (acquire; on x86 loads are
        // not reordered with later loads either), is still the word the
        // lookup found: every retirement (reclaim, eviction, move, grow)
        // first swaps the state for the tombstone (seq_cst CAS) and only
        // then changes the word (release), so a state loaded from a slot
        // that then changed hands is either the tombstone (handled above)
        // or is followed by a changed word here; a slot that changed hands
        // and came back bumps the incarnation. When the word changed, look
        // again, as after a lost CAS.
        if (word.load(std::memory_order_acquire) != slot.word) {
          return false;
        }
        if (write) op.published(detail::from_u128<State>(cur));
        set_decision(out, r.decision);
        return true;
      }
      // Where loads may tear, denials, peeks and unchanged states still go
      // through the CAS (as cur -> cur): it is what proves `cur` was a real,
      // untorn snapshot.
      if (cell.compare_exchange(cur, next)) {
        run_after_swap_hook();
        // Acquire: ordered after the CAS, so a reclaim or move that retired
        // the key word before our CAS is seen here.
        const std::uint64_t now_word = word.load(std::memory_order_acquire);
        if (now_word == slot.word) {
          if (write) {
            op.published(detail::from_u128<State>(cur));
            // Under the mutex (update()): no other give-back, move or
            // retirement runs meanwhile.
            if (detail::wants_aux<Op> && add_aux) {
              aux.store(
                  aux_before + detail::aux_add(
                                   op, detail::from_u128<State>(cur), r.next),
                  std::memory_order_release);
            }
          }
          set_decision(out, r.decision);
          return true;
        }
        if (!write) return false;  // a peek of a slot in transit
        if (now_word == make_word(0, next_inc(inc_of(slot.word)))) {
          // Retired (moved, evicted or reclaimed) after our swap, and not
          // given to another key: the swap was on this key's state.
          op.published(detail::from_u128<State>(cur));
          set_decision(out, r.decision);
          return true;
        }
        after_ambiguous_swap();
        return false;
      }
      // The slot may have been retired (a tombstone stays in a freed slot,
      // so a stale snapshot can never be swapped into it): look again.
      if (word.load(std::memory_order_acquire) != slot.word) {
        return false;
      }
      cas_retries_[retry_stripe()].n.fetch_add(1, std::memory_order_relaxed);
      cpu_relax();
    }
  }

  // A test hook (RATEKEEPER_SHARDED_TEST_HOOKS): runs between a successful
  // compare-and-swap and the check of the slot's key word.
#if defined(RATEKEEPER_SHARDED_TEST_HOOKS)
 public:
  inline static thread_local void (*after_swap_hook)(void*) = nullptr;
  inline static thread_local void* after_swap_arg = nullptr;
  // Moves `key` to a free slot of its other bucket (false when it is not
  // held or that bucket is full), or evicts it into its summary cell.
  bool test_relocate(std::string_view key, bool evict) {
    const Hashed h = hash(key);
    Shard& shard = shards_[h.shard];
    detail::MutexLock lock(&shard.mu);
    const auto slot = find(shard, h);
    if (!slot) return false;
    if (evict) {
      const auto st = retire(shard, *slot->bucket, slot->index,
                             [](const State&) { return true; });
      if (!st) return false;
      if (shard.remembered.size() >= max_remembered_) return false;
      shard.remembered.put(h.fp, *st);
      shard.evicted.fetch_add(1, std::memory_order_relaxed);
      shard.bytes.store(resident_bytes(shard), std::memory_order_relaxed);
      return true;
    }
    Table& t = *shard.table.load(std::memory_order_relaxed);
    Bucket& dst = bucket(t, h.fp, 1 - slot->choice);
    const auto j = free_index(dst);
    if (!j) return false;
    move(shard, *slot->bucket, slot->index, dst, *j);
    return true;
  }
  // Whether `key`'s shard mutex is free now (it is held by whoever moves,
  // reclaims or evicts, and by update()).
  bool test_shard_free(std::string_view key) {
    Shard& shard = shards_[hash(key).shard];
    if (!shard.mu.try_lock()) return false;
    shard.mu.unlock();
    return true;
  }
  // Counts of ambiguous swaps (see apply_at), for tests.
  std::uint64_t test_ambiguous() const noexcept {
    return ambiguous_.load(std::memory_order_relaxed);
  }

 private:
  std::atomic<std::uint64_t> ambiguous_{0};
  void run_after_swap_hook() {
    if (after_swap_hook != nullptr) after_swap_hook(after_swap_arg);
  }
  void after_ambiguous_swap() {
    ambiguous_.fetch_add(1, std::memory_order_relaxed);
  }
#else
  static void run_after_swap_hook() noexcept {}
  static void after_ambiguous_swap() noexcept {}
#endif

  static void yield_briefly() noexcept { std::this_thread::yield(); }

  // Asks for a state's cache line in the exclusive state (PREFETCHW), so
  // that reading the state and then swapping it costs one transfer of a
  // contended line between cores, not two (shared, then exclusive). On x86
  // CPUs without the instruction it is a no-op; elsewhere a plain prefetch.
  static void prefetch_for_write(const void* p) noexcept {
#if defined(__x86_64__)
    __asm__ __volatile__("prefetchw %0" : : "m"(*static_cast<const char*>(p)));
#else
    __builtin_prefetch(p, 1);
#endif
  }

  // After a lost compare-and-swap: a pause lets the winner finish with the
  // cache line before this thread asks for it again.
  static void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  }

  static std::size_t retry_stripe() noexcept {
    thread_local const std::size_t stripe =
        std::hash<std::thread::id>{}(std::this_thread::get_id()) %
        kRetryStripes;
    return stripe;
  }

  // The state a new key starts from: its own remembered state if it was
  // evicted and that state is not idle yet; else its summary cell, if the
  // remembered set ever spilled and that cell is not idle; else zero, as in
  // every other store.
  template <class Op>
  State initial_state(Shard& shard, const Hashed& h, const Op& op)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(shard.mu) {
    if (const State* r = shard.remembered.find(h.fp)) {
      if (!op.idle(*r)) return *r;
    }
    if (shard.summary.empty()) return State{};
    const State& s = shard.summary[h.fp % summary_size_];
    return op.idle(s) ? State{} : s;
  }

  std::size_t resident_bytes(const Shard& shard) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(shard.mu) {
    std::size_t n = shard.remembered.bytes() +
                    shard.summary.capacity() * sizeof(State) +
                    shard.tables.capacity() * sizeof(void*);
    for (const auto& t : shard.tables) {
      n += sizeof(Table) + t->mem.resident_bytes();
    }
    return n;
  }

  // Under the mutex: marks slot (bucket g, index i) as being retired if its
  // state satisfies `pred`, then frees it. Returns the retired state.
  template <class Pred>
  std::optional<State> retire(Shard& shard, Bucket& g, std::size_t i, Pred pred)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(shard.mu) {
    const std::uint64_t w = g.keys[i].load(std::memory_order_acquire);
    if (fp_of(w) == 0) return std::nullopt;
    u128 cur = g.states[i].load();
    for (;;) {
      if (cur == kTomb) return std::nullopt;
      const State s = detail::from_u128<State>(cur);
      if (!pred(s)) return std::nullopt;
      if (g.states[i].compare_exchange(cur, kTomb)) {
        // Release: a lookup that sees the retired word (a new incarnation,
        // no fingerprint) sees the tombstone before it. The tombstone stays
        // until the slot is claimed again, so that a thread holding a stale
        // snapshot of the old state can never swap it into a free slot.
        g.keys[i].store(make_word(0, next_inc(inc_of(w))),
                        std::memory_order_release);
        shard.aux_floor =
            std::max(shard.aux_floor, g.aux[i].load(std::memory_order_relaxed));
        shard.live.fetch_sub(1, std::memory_order_relaxed);
        release_slack(shard);
        return s;
      }
    }
  }

  // Under the mutex: room for one more key, under the shard's cap and its
  // KeyBudget if any.
  bool has_room(Shard& shard) ABSL_EXCLUSIVE_LOCKS_REQUIRED(shard.mu) {
    return shard.live.load(std::memory_order_relaxed) < shard_cap_ &&
           budget_room(shard);
  }

  // Under the mutex: whether one more key fits the shard's KeyBudget draw,
  // drawing another chunk if need be (true without a budget).
  bool budget_room(Shard& shard) ABSL_EXCLUSIVE_LOCKS_REQUIRED(shard.mu) {
    if (options_.key_budget == nullptr) return true;
    const std::size_t live =
        static_cast<std::size_t>(shard.live.load(std::memory_order_relaxed));
    const std::size_t drawn = shard.drawn.load(std::memory_order_relaxed);
    if (live < drawn) return true;
    const std::size_t got = options_.key_budget->draw(KeyBudget::kChunk);
    shard.drawn.store(drawn + got, std::memory_order_relaxed);
    return got != 0;
  }

  // Under the mutex, after a key left the shard: a chunk back to the
  // KeyBudget when 2 chunks are unused.
  void release_slack(Shard& shard) ABSL_EXCLUSIVE_LOCKS_REQUIRED(shard.mu) {
    if (options_.key_budget == nullptr) return;
    const std::size_t live =
        static_cast<std::size_t>(shard.live.load(std::memory_order_relaxed));
    const std::size_t drawn = shard.drawn.load(std::memory_order_relaxed);
    if (drawn >= live + 2 * KeyBudget::kChunk) {
      shard.drawn.store(drawn - KeyBudget::kChunk, std::memory_order_relaxed);
      options_.key_budget->give_back(KeyBudget::kChunk);
    }
  }

  template <class Op>
  void reclaim_buckets(Shard& shard, Table& t, const Hashed& h, const Op& op)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(shard.mu) {
    for (std::size_t c = 0; c < 2; ++c) {
      Bucket& b = bucket(t, h.fp, c);
      for (std::size_t i = 0; i < kSlotsPerBucket; ++i) {
        if (retire(shard, b, i, [&](const State& s) { return op.idle(s); })) {
          shard.reclaimed.fetch_add(1, std::memory_order_relaxed);
        }
      }
    }
  }

  // A sweep of the whole shard, at most once per shard_cap / 16 inserts or
  // full calls: O(shard) amortised to O(16) per call. Remembered keys that
  // went idle are dropped too.
  template <class Op>
  void maybe_sweep(Shard& shard, Table& t, const Op& op)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(shard.mu) {
    const std::size_t due = std::max<std::size_t>(1, shard_cap_ / 16);
    if (shard.since_sweep < due) return;
    shard.since_sweep = 0;
    shard.sweeps.fetch_add(1, std::memory_order_relaxed);
    for (std::size_t bi = 0; bi < t.n; ++bi) {
      Bucket& g = t.b[bi];
      for (std::size_t i = 0; i < kSlotsPerBucket; ++i) {
        if (retire(shard, g, i, [&](const State& s) { return op.idle(s); })) {
          shard.reclaimed.fetch_add(1, std::memory_order_relaxed);
        }
      }
    }
    if (shard.remembered.size() != 0) {
      shard.remembered.erase_if([&](const State& r) { return op.idle(r); });
      shard.bytes.store(resident_bytes(shard), std::memory_order_relaxed);
    }
  }

  // A free slot (a key word without fingerprint) in the emptier candidate
  // bucket, the first on a tie.
  static std::optional<SlotRef> free_slot(Table& t, std::uint64_t fp) noexcept {
    std::optional<SlotRef> pick[2];
    std::size_t used[2] = {0, 0};
    for (std::size_t c = 0; c < 2; ++c) {
      Bucket& b = bucket(t, fp, c);
      for (std::size_t i = 0; i < kSlotsPerBucket; ++i) {
        const std::uint64_t w = b.keys[i].load(std::memory_order_acquire);
        if (fp_of(w) != 0) {
          ++used[c];
        } else if (!pick[c]) {
          pick[c] = SlotRef{&b, i, w, c};
        }
      }
    }
    if (pick[0] && (!pick[1] || used[0] <= used[1])) return pick[0];
    return pick[1];
  }

  // Keeps an evicted key's state by fingerprint, so that it returns to it
  // (initial_state). At the set's bound: first drop what went idle (a full
  // pass, at most once per bound / 8 evictions), then spill the entry near
  // the new one that goes idle soonest into the summary (merged, most
  // restrictive), which never-seen keys then start from: beyond the bound
  // the store is conservative, as before remembering existed.
  template <class Op>
  void remember(Shard& shard, std::uint64_t fp, const State& s, const Op& op)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(shard.mu) {
    RememberedSet& set = shard.remembered;
    ++shard.since_purge;
    if (set.size() >= max_remembered_ && set.find(fp) == nullptr) {
      if (shard.since_purge >= std::max<std::size_t>(1, max_remembered_ / 8)) {
        shard.since_purge = 0;
        set.erase_if([&](const State& r) { return op.idle(r); });
      }
    }
    if (set.size() >= max_remembered_ && set.find(fp) == nullptr) {
      auto spill = set.soonest_near(
          fp, 8, [&](const State& r) { return op.idle_at(r); });
      if (shard.summary.empty()) shard.summary.assign(summary_size_, State{});
      if (spill && op.idle_at(spill->state) < op.idle_at(s)) {
        set.erase(spill->fp);
      } else {
        spill = Remembered{fp, s};  // the new one is the soonest: spill it
      }
      State& cell = shard.summary[spill->fp % summary_size_];
      cell = op.idle(cell) ? spill->state : op.merge(cell, spill->state);
      if (spill->fp == fp) return;
    }
    if (max_remembered_ == 0) return;
    if (const State* old = set.find(fp)) {
      set.put(fp, op.merge(*old, s));
    } else {
      set.put(fp, s);
    }
  }

  // kEvictStalest: the slot of the two buckets whose state goes idle soonest
  // is retired and remembered. Returns whether one was.
  template <class Op>
  bool evict_stalest(Shard& shard, Table& t, const Hashed& h, const Op& op)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(shard.mu) {
    Bucket* best_g = nullptr;
    std::size_t best_i = 0;
    Nanos best_at = Nanos::max();
    for (std::size_t c = 0; c < 2; ++c) {
      Bucket& g = bucket(t, h.fp, c);
      for (std::size_t i = 0; i < kSlotsPerBucket; ++i) {
        if (fp_of(g.keys[i].load(std::memory_order_acquire)) == 0) continue;
        const u128 v = g.states[i].load();  // a hint; retire() validates
        if (v == kTomb) continue;
        const Nanos at = op.idle_at(detail::from_u128<State>(v));
        if (best_g == nullptr || at < best_at) {
          best_g = &g;
          best_i = i;
          best_at = at;
        }
      }
    }
    if (best_g == nullptr) return false;
    const std::uint64_t w =
        best_g->keys[best_i].load(std::memory_order_acquire);
    const auto s =
        retire(shard, *best_g, best_i, [](const State&) { return true; });
    if (!s) return false;
    remember(shard, fp_of(w), *s, op);
    shard.evicted.fetch_add(1, std::memory_order_relaxed);
    shard.bytes.store(resident_bytes(shard), std::memory_order_relaxed);
    return true;
  }

  // Slots a table of n buckets holds before it grows: 7/8 of them.
  static std::size_t grow_at(std::size_t n) noexcept {
    return n * kSlotsPerBucket * 7 / 8;
  }

  // Under the mutex: replaces the shard's table by one of at least `n`
  // buckets and moves every key into it, as move() does one key: each old
  // slot's state is swapped for the tombstone (a lock-free writer of it then
  // fails its swap, or its swap landed first and the value carried here
  // includes it) and its word retired, so a lookup in the old table finds
  // nothing and falls into the insert path, which waits on this mutex and
  // then looks in the new table. The new table is published (release) once
  // every key is in it. Old tables are never reused, so a thread holding a
  // slot of one never meets another key there; once the new one is
  // published, a mapped old table gives its pages back (they then read as
  // zeros: no key word matches, a swap there fails its check of the word
  // and looks the key up again).
  void grow(Shard& shard, std::size_t n)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(shard.mu) {
    Table* old = shard.table.load(std::memory_order_relaxed);
    struct Moved {
      std::uint64_t fp;
      u128 state;
      std::uint64_t aux;
    };
    std::vector<Moved> moved;
    if (old != nullptr) {
      moved.reserve(shard.live.load(std::memory_order_relaxed));
      for (std::size_t bi = 0; bi < old->n; ++bi) {
        Bucket& g = old->b[bi];
        for (std::size_t i = 0; i < kSlotsPerBucket; ++i) {
          const std::uint64_t w = g.keys[i].load(std::memory_order_acquire);
          if (fp_of(w) == 0) continue;
          u128 v = g.states[i].load();
          while (!g.states[i].compare_exchange(v, kTomb)) {
          }
          moved.push_back(
              {fp_of(w), v, g.aux[i].load(std::memory_order_relaxed)});
          g.keys[i].store(make_word(0, next_inc(inc_of(w))),
                          std::memory_order_release);
        }
      }
    }
    for (;; n *= 2) {
      auto t = std::make_unique<Table>(n);
      bool ok = true;
      for (const Moved& m : moved) {
        std::optional<SlotRef> slot = free_slot(*t, m.fp);
        if (!slot) slot = cuckoo(shard, *t, m.fp);
        if (!slot) {
          ok = false;
          break;
        }
        Bucket& g = *slot->bucket;
        g.aux[slot->index].store(m.aux, std::memory_order_relaxed);
        u128 cur = g.states[slot->index].load();
        while (!g.states[slot->index].compare_exchange(cur, m.state)) {
        }
        g.keys[slot->index].store(make_word(m.fp, inc_of(slot->word)),
                                  std::memory_order_relaxed);
      }
      if (!ok) continue;  // cannot happen at 7/16 load; a larger one then
      // Release: a lookup that loads this table sees every key in it.
      shard.table.store(t.get(), std::memory_order_release);
      shard.tables.push_back(std::move(t));
      break;
    }
    if (old != nullptr) old->mem.release_pages();
    shard.bytes.store(resident_bytes(shard), std::memory_order_relaxed);
  }

  // Out of line and cold: a key's first call (or one after its slot was
  // let go) takes it, under the mutex; keeping it out of run() keeps the
  // lock-free path's registers free of it.
  template <class Op>
  [[gnu::noinline, gnu::cold]] InsertResult insert(Shard& shard,
                                                   const Hashed& h,
                                                   const Op& op) {
    detail::MutexLock lock(&shard.mu);
    if (auto s = find(shard, h)) return {s, std::nullopt};  // raced: it is in
    ++shard.since_sweep;
    const State start = initial_state(shard, h, op);
    detail::aux_in(op, shard.aux_floor);
    const Step<State> first = op(start);
    // Nothing to remember (a denied fresh key, a zero cost): no slot. The
    // state it would start from stays where it is (zero, remembered, or the
    // summary).
    if (detail::to_u128(first.next) == detail::to_u128(start)) {
      op.published(start);
      return {std::nullopt, first.decision};
    }
    // `live` changes only under the mutex, which we hold: relaxed reads.
    const auto live = [&] {
      return shard.live.load(std::memory_order_relaxed);
    };
    Table* t = shard.table.load(std::memory_order_relaxed);
    if (t == nullptr) {
      grow(shard, std::min<std::size_t>(max_buckets_, kFirstBuckets));
      t = shard.table.load(std::memory_order_relaxed);
    } else if (t->n < max_buckets_ && live() + 1 > grow_at(t->n)) {
      grow(shard, std::min(max_buckets_, 2 * t->n));
      t = shard.table.load(std::memory_order_relaxed);
    }
    std::optional<SlotRef> slot;
    if (has_room(shard)) slot = free_slot(*t, h.fp);
    if (!slot) {
      reclaim_buckets(shard, *t, h, op);
      if (!has_room(shard)) maybe_sweep(shard, *t, op);
      if (has_room(shard)) {
        slot = free_slot(*t, h.fp);
        if (!slot) slot = cuckoo(shard, *t, h.fp);
        if (!slot && t->n < max_buckets_) {
          grow(shard, std::min(max_buckets_, 2 * t->n));
          t = shard.table.load(std::memory_order_relaxed);
          slot = free_slot(*t, h.fp);
          if (!slot) slot = cuckoo(shard, *t, h.fp);
        }
      }
    }
    if (!slot && options_.when_full == WhenFull::kEvictStalest &&
        evict_stalest(shard, *t, h, op)) {
      slot = free_slot(*t, h.fp);
    }
    if (!slot) return {std::nullopt, when_full(shard, first.decision)};
    // Claim: the state first (zero, or a tombstone, in a free slot), then
    // publish the key word with release, so a reader that finds the key sees
    // the state. The state is the first call's result: that call is decided
    // and published here, once, under the mutex.
    Bucket& g = *slot->bucket;
    g.aux[slot->index].store(
        shard.aux_floor + detail::aux_add(op, start, first.next),
        std::memory_order_release);
    u128 cur = g.states[slot->index].load();
    while (!g.states[slot->index].compare_exchange(
        cur, detail::to_u128(first.next))) {
    }
    const std::uint64_t word = make_word(h.fp, inc_of(slot->word));
    g.keys[slot->index].store(word, std::memory_order_release);
    shard.live.fetch_add(1, std::memory_order_relaxed);
    shard.inserts.fetch_add(1, std::memory_order_relaxed);
    // The key is held again: what was remembered of it is in its state now.
    if (shard.remembered.size() != 0) shard.remembered.erase(h.fp);
    op.published(start);
    return {std::nullopt, first.decision};
  }

  // The first free slot of bucket b, if any.
  static std::optional<std::size_t> free_index(const Bucket& b) noexcept {
    for (std::size_t i = 0; i < kSlotsPerBucket; ++i) {
      if (fp_of(b.keys[i].load(std::memory_order_acquire)) == 0) return i;
    }
    return std::nullopt;
  }

  // Moves the key in slot (src, i) to the free slot (dst, j), under the
  // mutex. Writers of the old slot are fenced out by the tombstone (their
  // compare-and-swap fails; they look the key up again); the new slot is
  // published before the old one is retired, so a lookup that misses both
  // can only happen while the mutex is held, and the insert path it falls
  // into waits for it, then finds the key in its new place.
  void move([[maybe_unused]] Shard& shard, Bucket& src, std::size_t i,
            Bucket& dst, std::size_t j)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(shard.mu) {
    const std::uint64_t w = src.keys[i].load(std::memory_order_acquire);
    u128 v = src.states[i].load();
    while (!src.states[i].compare_exchange(v, kTomb)) {
    }
    u128 cur = dst.states[j].load();
    while (!dst.states[j].compare_exchange(cur, v)) {
    }
    // The counter travels with the state, published before the word.
    dst.aux[j].store(src.aux[i].load(std::memory_order_relaxed),
                     std::memory_order_release);
    // Relaxed: key words are written only under the mutex, which we hold.
    const std::uint64_t dw = dst.keys[j].load(std::memory_order_relaxed);
    dst.keys[j].store(make_word(fp_of(w), inc_of(dw)),
                      std::memory_order_release);
    src.keys[i].store(make_word(0, next_inc(inc_of(w))),
                      std::memory_order_release);
    // The tombstone stays in the freed slot until it is claimed (retire()).
  }

  // A free index in bucket `bi` of t, made by moving a resident key to its
  // other bucket if need be, recursively up to `depth` moves (never back
  // into `avoid`, the bucket this call is freeing space for).
  std::optional<std::size_t> make_free(Shard& shard, Table& t, std::size_t bi,
                                       int depth, std::size_t avoid)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(shard.mu) {
    Bucket& b = t.b[bi];
    if (const auto j = free_index(b)) return j;
    if (depth == 0) return std::nullopt;
    for (std::size_t i = 0; i < kSlotsPerBucket; ++i) {
      const std::uint64_t fp = fp_of(b.keys[i].load(std::memory_order_acquire));
      if (fp == 0) continue;
      const std::size_t ai = other_bucket(fp, t.n, bi);
      if (ai == avoid || ai == bi) continue;
      if (const auto j = make_free(shard, t, ai, depth - 1, bi)) {
        move(shard, b, i, t.b[ai], *j);
        return i;
      }
    }
    return std::nullopt;
  }

  // When both of a new key's buckets are full: frees a slot in one of them
  // by moving resident keys to their other buckets, up to kCuckooDepth moves
  // deep (at most 8 + 64 + 512 buckets looked at). Cuckoo hashing without the
  // unbounded walk: it lifts the usable load well past what two choices
  // alone give, and a lookup still reads at most two buckets.
  std::optional<SlotRef> cuckoo(Shard& shard, Table& t, std::uint64_t fp)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(shard.mu) {
    std::size_t first = 0, second = 0;
    buckets_of(fp, t.n, first, second);
    for (std::size_t c = 0; c < 2; ++c) {
      const std::size_t bi = c == 0 ? first : second;
      const std::size_t other = c == 0 ? second : first;
      if (const auto i = make_free(shard, t, bi, kCuckooDepth, other)) {
        Bucket& b = t.b[bi];
        // Relaxed: key words change only under the mutex, which we hold.
        return SlotRef{&b, *i, b.keys[*i].load(std::memory_order_relaxed), c};
      }
    }
    return std::nullopt;
  }

  Decision when_full(Shard& shard, Decision fresh) {
    if (options_.when_full == WhenFull::kAdmitUncounted) {
      shard.admitted_uncounted.fetch_add(1, std::memory_order_relaxed);
      return fresh;
    }
    shard.denied_full.fetch_add(1, std::memory_order_relaxed);
    return detail::denied_full(fresh, options_.full_retry_after);
  }

  const Options options_;
  const std::uint64_t seed_;
  const std::uint64_t wy_seed_;  // seed_, premixed for key_hash()
  const std::uint64_t wy_a_;     // the other operand's key, from seed_
  std::size_t n_shards_ = 0;
  std::size_t shard_cap_ = 0;
  std::size_t max_buckets_ = 0;
  std::size_t summary_size_ = 0;
  std::size_t max_remembered_ = 0;
  std::unique_ptr<Shard[]> shards_;
  Stripe cas_retries_[kRetryStripes];
};

}  // namespace ratekeeper

#endif  // RATEKEEPER_STORE_SHARDED_HPP_
