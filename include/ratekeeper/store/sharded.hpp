// ratekeeper/store/sharded.hpp: the lock-free sharded store, the default.
//
// Defines ShardedStore<State> and ShardedOptions.
//
// Prefer ShardedStore (the default store of Limiter) unless you need the
// exact introspection of InMemoryStore. An existing key costs one seeded
// hash, a scan of one or two cache lines of key words and one 16-byte
// compare-and-swap: no lock, no allocation. All memory is allocated once, at
// construction, from `capacity`; nothing grows afterwards, whatever keys
// clients send.
//
// Layout. `shards` independent tables of buckets. A bucket holds 8 slots:
// 8 key words on one cache line, then their 8 States (192 bytes in all). A
// key word is the 56-bit fingerprint of the key's 64-bit seeded hash and an
// 8-bit incarnation; a slot is 24 bytes. Each key has two candidate buckets
// in its shard, derived from its fingerprint: a lookup reads the first
// bucket's key words and, if the key is not there, the second's. A new key
// goes to the emptier of the two; when both are full, resident keys are moved
// to their other buckets (cuckoo hashing, up to three moves deep). Tables are
// sized for 7/8 load: about 30 bytes per key of capacity in all. Both candidate
// buckets are prefetched at once, so that in a table larger than the cache
// their misses overlap.
//
// Keys. Only the hash is kept. Two keys share a state only when their hashes
// agree on the shard and the 56 fingerprint bits: among 10M live keys, about
// 4e-5 expected such pairs with 16 shards (docs/stores.md). Sharing is
// conservative: both keys count against one limit, so it can deny early but
// never over-admit. The hash is absl's, keyed with a per-store random seed (or
// ShardedOptions::seed), so keys crafted to collide cannot be made without the
// seed.
//
// New keys take a short path of their own: under the shard's mutex (one per
// shard, on its own cache line) the key is looked for again, a free slot is
// claimed and its key word published; the call then proceeds lock-free like
// any other. When both buckets (even after cuckoo moves) or the shard are
// full, idle states (equivalent to never seen) are reclaimed first, then the
// caller's WhenFull applies;
// with kEvictStalest the state of the two buckets that becomes idle soonest
// is evicted into a per-shard summary (merged, most restrictive) from which a
// returning key starts, so an evicted key is never over-admitted.
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

// ShardedOptions: the knobs of a ShardedStore.
struct ShardedOptions {
  // Keys the store must be able to hold at once. Enforced per shard, with
  // headroom for uneven hashing: any `capacity` keys fit, and at most
  // shards x (capacity / shards + 4 sqrt(capacity / shards) + 8) are held.
  // Memory is about 30 bytes per key of capacity, allocated up front.
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
  static constexpr bool kLockFree = detail::Atomic16::kLockFree;

  explicit ShardedStore(Options options = {})
      : options_(options),
        seed_(options.seed != 0 ? options.seed : random_seed()) {
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
    buckets_per_shard_ = std::max<std::size_t>(
        2, (shard_cap_ * 8 / 7 + kSlotsPerBucket - 1) / kSlotsPerBucket);
    summary_size_ = std::max<std::size_t>(16, shard_cap_ / 16);
    buckets_ = BucketArray(shards * buckets_per_shard_);
    shards_ = std::make_unique<Shard[]>(shards);
    n_shards_ = shards;
    for (std::size_t i = 0; i < shards; ++i) {
      Shard& s = shards_[i];
      s.buckets = &buckets_[i * buckets_per_shard_];
      detail::MutexLock lock(&s.mu);
      s.summary.assign(summary_size_, State{});
    }
  }

  ShardedStore(const ShardedStore&) = delete;
  ShardedStore& operator=(const ShardedStore&) = delete;

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
      if (auto d = self->apply_at(shard, *slot, op, /*write=*/false)) {
        return *d;
      }
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
      if (auto d = apply_at(shard, *slot, op, /*write=*/true,
                            /*add_aux=*/true)) {
        return *d;
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
      for (const auto& r : s.cas_retries) {
        st.cas_retries += r.n.load(std::memory_order_relaxed);
      }
    }
    return st;
  }

  // Thread-safe; may be stale on return.
  std::size_t size() const { return static_cast<std::size_t>(stats().keys); }

  const Options& options() const noexcept { return options_; }
  std::size_t shard_count() const noexcept { return n_shards_; }
  std::size_t capacity_per_shard() const noexcept { return shard_cap_; }
  // Bytes allocated for slots, shards and summaries: the whole footprint.
  std::size_t allocated_bytes() const noexcept {
    return n_shards_ * (buckets_per_shard_ * sizeof(Bucket) + sizeof(Shard) +
                        summary_size_ * sizeof(State));
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

  // The table's memory: one allocation; from 4 MiB on, aligned to 2 MiB and
  // (on Linux) advised for transparent huge pages, so that a lookup in a
  // large table costs a cache miss and not also a page walk. Every bucket is
  // constructed (zeroed) here: all of it is resident from the start.
  class BucketArray {
   public:
    BucketArray() = default;
    explicit BucketArray(std::size_t n) : n_(n) {
      std::size_t bytes = n * sizeof(Bucket);
      // Tables of 4 MiB and more get huge pages; smaller ones are not
      // rounded up to them.
      align_ = bytes >= 2 * kHuge ? kHuge : alignof(Bucket);
      if (align_ == kHuge) bytes = (bytes + kHuge - 1) / kHuge * kHuge;
      void* p = ::operator new (bytes, std::align_val_t{align_});
#if defined(__linux__) && defined(MADV_HUGEPAGE)
      if (align_ == kHuge) {
        ::madvise(p, bytes, MADV_HUGEPAGE);  // advice only: failure is harmless
      }
#endif
      b_ = static_cast<Bucket*>(p);
      for (std::size_t i = 0; i < n; ++i) new (&b_[i]) Bucket();
    }
    BucketArray(BucketArray&& o) noexcept
        : b_(o.b_), n_(o.n_), align_(o.align_) {
      o.b_ = nullptr;
      o.n_ = 0;
    }
    BucketArray& operator=(BucketArray&& o) noexcept {
      std::swap(b_, o.b_);
      std::swap(n_, o.n_);
      std::swap(align_, o.align_);
      return *this;
    }
    ~BucketArray() {
      if (b_ == nullptr) return;
      for (std::size_t i = 0; i < n_; ++i) b_[i].~Bucket();
      ::operator delete (b_, std::align_val_t{align_});
    }
    Bucket& operator[](std::size_t i) noexcept { return b_[i]; }
    const Bucket& operator[](std::size_t i) const noexcept { return b_[i]; }

   private:
    static constexpr std::size_t kHuge = std::size_t{2} << 20;
    Bucket* b_ = nullptr;
    std::size_t n_ = 0;
    std::size_t align_ = alignof(Bucket);
  };

  // One shard: its insert mutex, counters and summary on cache lines of their
  // own (alignas(64) pads the struct), so that two cores working in two
  // shards never share a line. Counters are relaxed: they order nothing.
  struct alignas(64) Shard {
    Bucket* buckets = nullptr;
    mutable detail::Mutex mu;
    std::vector<State> summary ABSL_GUARDED_BY(mu);
    std::size_t since_sweep ABSL_GUARDED_BY(mu) = 0;
    // The give-back counter new keys start from: at least that of every key
    // retired from the shard.
    std::uint64_t aux_floor ABSL_GUARDED_BY(mu) = 0;
    std::atomic<std::uint64_t> live{0};
    std::atomic<std::uint64_t> inserts{0};
    std::atomic<std::uint64_t> reclaimed{0};
    std::atomic<std::uint64_t> sweeps{0};
    std::atomic<std::uint64_t> evicted{0};
    std::atomic<std::uint64_t> denied_full{0};
    std::atomic<std::uint64_t> admitted_uncounted{0};
    // Lost compare-and-swaps, counted on the contended path itself: striped
    // by thread over lines of their own, so that counting a retry does not
    // add a second contended line to the one being fought over.
    struct alignas(64) Stripe {
      std::atomic<std::uint64_t> n{0};
    };
    Stripe cas_retries[kRetryStripes];
  };

  struct Hashed {
    std::uint64_t fp;  // 1..2^56-1
    std::size_t shard;
    std::size_t first;  // candidate buckets within the shard
    std::size_t second;
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

  Hashed hash(std::string_view key) const noexcept {
    const std::uint64_t h =
        absl::HashOf(seed_, absl::string_view(key.data(), key.size()));
    Hashed out;
    // Fingerprint: the low 56 bits. Shard: a remix of all 64, by
    // multiply-shift (no power-of-two sizes needed).
    out.fp = h & kFpMask;
    if (out.fp == 0) out.fp = 1;
    out.shard = static_cast<std::size_t>(((mix(h) >> 32) * n_shards_) >> 32);
    buckets_of(out.fp, out.first, out.second);
    return out;
  }

  // A key's two candidate buckets, from its fingerprint alone, so that the
  // insert path can move a resident key to its other bucket (cuckoo) knowing
  // only its key word.
  void buckets_of(std::uint64_t fp, std::size_t& first,
                  std::size_t& second) const noexcept {
    const std::uint64_t m = mix(fp);
    first = static_cast<std::size_t>(
        ((m & 0xFFFF'FFFFu) * buckets_per_shard_) >> 32);
    second = static_cast<std::size_t>(((m >> 32) * buckets_per_shard_) >> 32);
    if (second == first)
      second = first + 1 == buckets_per_shard_ ? 0 : first + 1;
  }

  std::size_t other_bucket(std::uint64_t fp,
                           std::size_t current) const noexcept {
    std::size_t first = 0, second = 0;
    buckets_of(fp, first, second);
    return current == first ? second : first;
  }

  Bucket& bucket(Shard& shard, const Hashed& h, std::size_t choice) noexcept {
    return shard.buckets[choice == 0 ? h.first : h.second];
  }

  // The slot holding h.fp in either candidate bucket. The first bucket's
  // key line and both of its state lines are requested at once, so that in
  // a table larger than the cache their misses overlap instead of following
  // one another.
  std::optional<SlotRef> find(Shard& shard, const Hashed& h) noexcept {
    const Bucket& first = shard.buckets[h.first];
    __builtin_prefetch(&first.keys[0]);
    prefetch_for_write(&first.states[0]);
    prefetch_for_write(&first.states[4]);
    __builtin_prefetch(&shard.buckets[h.second].keys[0]);
    for (std::size_t c = 0; c < 2; ++c) {
      Bucket& b = bucket(shard, h, c);
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
    for (;;) {
      std::optional<SlotRef> slot = find(shard, h);
      if (!slot) {
        InsertResult ins = insert(shard, h, op);
        if (ins.decided) return *ins.decided;
        slot = ins.slot;
      }
      if (auto d = apply_at(shard, *slot, op, /*write=*/true)) return *d;
    }
  }

  // Runs op on the slot. nullopt: the slot is being reclaimed or changed
  // hands before op could be applied; the caller looks the key up again.
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
  std::optional<Decision> apply_at(Shard& shard, const SlotRef& slot,
                                   const Op& op, bool write,
                                   bool add_aux = false) {
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
        return std::nullopt;
      }
      const Step<State> r = op(detail::from_u128<State>(cur));
      // Denials, peeks and unchanged states still go through the CAS (as
      // cur -> cur): it is what proves `cur` was a real, untorn snapshot.
      const u128 next = write ? detail::to_u128(r.next) : cur;
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
          return r.decision;
        }
        if (!write) return std::nullopt;  // a peek of a slot in transit
        if (now_word == make_word(0, next_inc(inc_of(slot.word)))) {
          // Retired (moved, evicted or reclaimed) after our swap, and not
          // given to another key: the swap was on this key's state.
          op.published(detail::from_u128<State>(cur));
          return r.decision;
        }
        after_ambiguous_swap();
        return std::nullopt;
      }
      // The slot may have been retired (a tombstone stays in a freed slot,
      // so a stale snapshot can never be swapped into it): look again.
      if (word.load(std::memory_order_acquire) != slot.word) {
        return std::nullopt;
      }
      shard.cas_retries[retry_stripe()].n.fetch_add(1,
                                                    std::memory_order_relaxed);
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
      State& cell = shard.summary[h.fp % summary_size_];
      cell = *st;
      shard.evicted.fetch_add(1, std::memory_order_relaxed);
      return true;
    }
    Bucket& dst = bucket(shard, h, 1 - slot->choice);
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

  // The state a new key starts from: its summary cell, unless that has gone
  // idle (then zero, as in every other store).
  template <class Op>
  State initial_state(Shard& shard, const Hashed& h, const Op& op)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(shard.mu) {
    const State& s = shard.summary[h.fp % summary_size_];
    return op.idle(s) ? State{} : s;
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
        return s;
      }
    }
  }

  template <class Op>
  void reclaim_buckets(Shard& shard, const Hashed& h, const Op& op)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(shard.mu) {
    for (std::size_t c = 0; c < 2; ++c) {
      Bucket& b = bucket(shard, h, c);
      for (std::size_t i = 0; i < kSlotsPerBucket; ++i) {
        if (retire(shard, b, i, [&](const State& s) { return op.idle(s); })) {
          shard.reclaimed.fetch_add(1, std::memory_order_relaxed);
        }
      }
    }
  }

  // A sweep of the whole shard, at most once per shard_cap / 16 inserts or
  // full calls: O(shard) amortised to O(16) per call.
  template <class Op>
  void maybe_sweep(Shard& shard, const Op& op)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(shard.mu) {
    const std::size_t due = std::max<std::size_t>(1, shard_cap_ / 16);
    if (shard.since_sweep < due) return;
    shard.since_sweep = 0;
    shard.sweeps.fetch_add(1, std::memory_order_relaxed);
    for (std::size_t bi = 0; bi < buckets_per_shard_; ++bi) {
      Bucket& g = shard.buckets[bi];
      for (std::size_t i = 0; i < kSlotsPerBucket; ++i) {
        if (retire(shard, g, i, [&](const State& s) { return op.idle(s); })) {
          shard.reclaimed.fetch_add(1, std::memory_order_relaxed);
        }
      }
    }
  }

  // A free slot (a key word without fingerprint) in the emptier candidate
  // bucket, the first on a tie.
  std::optional<SlotRef> free_slot(Shard& shard, const Hashed& h) noexcept {
    std::optional<SlotRef> pick[2];
    std::size_t used[2] = {0, 0};
    for (std::size_t c = 0; c < 2; ++c) {
      Bucket& b = bucket(shard, h, c);
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

  // kEvictStalest: the slot of the two buckets whose state goes idle soonest
  // is retired into the summary. Returns whether one was.
  template <class Op>
  bool evict_stalest(Shard& shard, const Hashed& h, const Op& op)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(shard.mu) {
    Bucket* best_g = nullptr;
    std::size_t best_i = 0;
    Nanos best_at = Nanos::max();
    for (std::size_t c = 0; c < 2; ++c) {
      Bucket& g = bucket(shard, h, c);
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
    State& cell = shard.summary[fp_of(w) % summary_size_];
    cell = op.idle(cell) ? *s : op.merge(cell, *s);
    shard.evicted.fetch_add(1, std::memory_order_relaxed);
    return true;
  }

  template <class Op>
  InsertResult insert(Shard& shard, const Hashed& h, const Op& op) {
    detail::MutexLock lock(&shard.mu);
    if (auto s = find(shard, h)) return {s, std::nullopt};  // raced: it is in
    ++shard.since_sweep;
    const State start = initial_state(shard, h, op);
    detail::aux_in(op, shard.aux_floor);
    const Step<State> first = op(start);
    // Nothing to remember (a denied fresh key, a zero cost): no slot. The
    // state it would start from stays where it is (zero, or the summary).
    if (detail::to_u128(first.next) == detail::to_u128(start)) {
      op.published(start);
      return {std::nullopt, first.decision};
    }
    std::optional<SlotRef> slot;
    // `live` changes only under the mutex, which we hold: relaxed reads.
    const bool shard_full =
        shard.live.load(std::memory_order_relaxed) >= shard_cap_;
    if (!shard_full) slot = free_slot(shard, h);
    if (!slot) {
      reclaim_buckets(shard, h, op);
      if (shard.live.load(std::memory_order_relaxed) >= shard_cap_) {
        maybe_sweep(shard, op);
      }
      if (shard.live.load(std::memory_order_relaxed) < shard_cap_) {
        slot = free_slot(shard, h);
        if (!slot) slot = cuckoo(shard, h);
      }
    }
    if (!slot && options_.when_full == WhenFull::kEvictStalest &&
        evict_stalest(shard, h, op)) {
      slot = free_slot(shard, h);
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

  // A free index in bucket `bi`, made by moving a resident key to its other
  // bucket if need be, recursively up to `depth` moves (never back into
  // `avoid`, the bucket this call is freeing space for).
  std::optional<std::size_t> make_free(Shard& shard, std::size_t bi, int depth,
                                       std::size_t avoid)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(shard.mu) {
    Bucket& b = shard.buckets[bi];
    if (const auto j = free_index(b)) return j;
    if (depth == 0) return std::nullopt;
    for (std::size_t i = 0; i < kSlotsPerBucket; ++i) {
      const std::uint64_t fp = fp_of(b.keys[i].load(std::memory_order_acquire));
      if (fp == 0) continue;
      const std::size_t ai = other_bucket(fp, bi);
      if (ai == avoid || ai == bi) continue;
      if (const auto j = make_free(shard, ai, depth - 1, bi)) {
        move(shard, b, i, shard.buckets[ai], *j);
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
  std::optional<SlotRef> cuckoo(Shard& shard, const Hashed& h)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(shard.mu) {
    for (std::size_t c = 0; c < 2; ++c) {
      const std::size_t bi = c == 0 ? h.first : h.second;
      const std::size_t other = c == 0 ? h.second : h.first;
      if (const auto i = make_free(shard, bi, kCuckooDepth, other)) {
        Bucket& b = shard.buckets[bi];
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
  std::size_t n_shards_ = 0;
  std::size_t shard_cap_ = 0;
  std::size_t buckets_per_shard_ = 0;
  std::size_t summary_size_ = 0;
  BucketArray buckets_;
  std::unique_ptr<Shard[]> shards_;
};

}  // namespace ratekeeper

#endif  // RATEKEEPER_STORE_SHARDED_HPP_
