// ratekeeper/detail/reclaim.hpp: deferred reclamation for TierTable.
//
// Defines detail::Reclaimer (one per process) and detail::ReadSection.
//
// A reader (a TierTable call, an operation on a limit a TierTable owns)
// runs inside a ReadSection: on entry it writes the global epoch into a
// slot of its own thread, on exit it writes 0. A writer that has unlinked
// an object (a replaced snapshot, a policy version no longer in force, a
// limit it replaced) calls synchronize(): it advances the epoch, makes every
// thread's slot store visible, and waits until no slot holds an older epoch
// than the one it advanced to; readers that could have seen the object have
// then left their sections, and the object can be freed or reused.
//
// Cost to a reader: two stores to a cache line of its own thread, no atomic
// read-modify-write and no fence on Linux. The writer's
// membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) runs a full fence on every
// CPU running a thread of this process, which orders each reader's slot
// store before its later loads as far as the writer can tell (the
// asymmetric fence of userspace RCU). Where that call is not available
// (not Linux, an old kernel, a seccomp filter) readers fence themselves
// (one sequentially consistent fence on entry) and the writer fences too.
//
// Sections nest (a depth count per thread). A writer never waits on its own
// thread's section: synchronize() must not be called from inside one.
#ifndef RATEKEEPER_DETAIL_RECLAIM_HPP_
#define RATEKEEPER_DETAIL_RECLAIM_HPP_

#include <atomic>
#include <cstdint>
#include <thread>

#if defined(__linux__)
#  include <linux/membarrier.h>
#  include <sys/syscall.h>
#  include <unistd.h>
#endif

namespace ratekeeper::detail {

class Reclaimer {
 public:
  // A thread's slot: its epoch while in a section (0 outside one).
  struct alignas(64) Slot {
    std::atomic<std::uint64_t> epoch{0};
    std::atomic<bool> used{false};
    std::uint32_t depth = 0;  // the owning thread's only
    Slot* next = nullptr;     // immutable once pushed
  };

  constexpr Reclaimer() noexcept = default;
  Reclaimer(const Reclaimer&) = delete;
  Reclaimer& operator=(const Reclaimer&) = delete;

  static Reclaimer& instance() noexcept;

  // Whether writers use the asymmetric fence (readers then do not fence).
  bool asymmetric() const noexcept {
    return asymmetric_.load(std::memory_order_relaxed);
  }

  // The calling thread's slot (taken on first use, given back when the
  // thread exits, for another thread to reuse). A constant-initialised
  // thread_local: one load, no initialisation check.
  static Slot* my_slot() noexcept {
    Slot* s = tls_slot_;
    return s != nullptr ? s : first_slot();
  }

  void enter(Slot* s) noexcept {
    if (s->depth++ != 0) return;
    s->epoch.store(epoch_.load(std::memory_order_acquire),
                   std::memory_order_relaxed);
    // Until a writer has registered the asymmetric fence, readers fence
    // themselves (always safe); once it is registered every synchronize()
    // uses it, so a reader that saw it registered need not.
    if (asymmetric_.load(std::memory_order_relaxed)) {
      std::atomic_signal_fence(std::memory_order_seq_cst);
    } else {
      std::atomic_thread_fence(std::memory_order_seq_cst);
    }
  }

  void exit(Slot* s) noexcept {
    if (--s->depth == 0) s->epoch.store(0, std::memory_order_release);
  }

  // synchronize
  //
  // Returns once every section that was open when it was called has
  // closed: whatever the caller unlinked before the call is then no longer
  // read by any section. Yields while it waits (sections are short: one
  // call on a limit or a table). Not from inside a section.
  void synchronize() noexcept {
    register_once();
    const std::uint64_t target =
        epoch_.fetch_add(1, std::memory_order_acq_rel) + 1;
    fence_all();
    for (Slot* s = head_.load(std::memory_order_acquire); s != nullptr;
         s = s->next) {
      for (;;) {
        const std::uint64_t e = s->epoch.load(std::memory_order_acquire);
        if (e == 0 || e >= target) break;
        std::this_thread::yield();
      }
    }
  }

  // Registers the asymmetric fence now rather than at the first
  // synchronize(), so that readers stop fencing themselves from here on
  // (TierTable's constructor, PolicyLimit::defer_reclaim). Idempotent.
  void prepare() noexcept { register_once(); }

  // Slots ever made: at most the number of threads alive at once.
  std::size_t slots() const noexcept {
    std::size_t n = 0;
    for (Slot* s = head_.load(std::memory_order_acquire); s != nullptr;
         s = s->next) {
      ++n;
    }
    return n;
  }

 private:
  // Gives the thread's slot back when the thread exits.
  struct Holder {
    Slot* slot = nullptr;
    Holder() = default;
    Holder(const Holder&) = delete;
    Holder& operator=(const Holder&) = delete;
    ~Holder() {
      if (slot == nullptr) return;
      tls_slot_ = nullptr;
      slot->depth = 0;
      slot->epoch.store(0, std::memory_order_release);
      slot->used.store(false, std::memory_order_release);
    }
  };

  static Slot* first_slot() noexcept {
    thread_local Holder holder;
    if (holder.slot == nullptr) holder.slot = instance().take_slot();
    tls_slot_ = holder.slot;
    return holder.slot;
  }

  // The first synchronize() registers the process for
  // MEMBARRIER_CMD_PRIVATE_EXPEDITED (readers fence themselves until then).
  void register_once() noexcept {
    if (registered_.load(std::memory_order_acquire)) return;
    bool expected = false;
    if (!registering_.compare_exchange_strong(expected, true)) {
      while (!registered_.load(std::memory_order_acquire)) {
        std::this_thread::yield();
      }
      return;
    }
#if defined(__linux__) && defined(__NR_membarrier)
    if (::syscall(__NR_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED, 0,
                  0) == 0) {
      asymmetric_.store(true, std::memory_order_seq_cst);
    }
#endif
    registered_.store(true, std::memory_order_release);
  }

  Slot* take_slot() noexcept {
    for (Slot* s = head_.load(std::memory_order_acquire); s != nullptr;
         s = s->next) {
      bool expected = false;
      if (!s->used.load(std::memory_order_relaxed) &&
          s->used.compare_exchange_strong(expected, true,
                                          std::memory_order_acq_rel)) {
        return s;
      }
    }
    // Slots are never freed: a writer may be reading any of them.
    Slot* s = new Slot;
    s->used.store(true, std::memory_order_relaxed);
    Slot* h = head_.load(std::memory_order_relaxed);
    do {
      s->next = h;
    } while (!head_.compare_exchange_weak(h, s, std::memory_order_acq_rel,
                                          std::memory_order_relaxed));
    return s;
  }

  void fence_all() noexcept {
#if defined(__linux__) && defined(__NR_membarrier)
    if (asymmetric_.load(std::memory_order_relaxed)) {
      // Registered: the command cannot fail for want of registration; on a
      // transient failure, try again (a plain fence would not order
      // readers that do not fence).
      while (::syscall(__NR_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0,
                       0) != 0) {
        std::this_thread::yield();
      }
      return;
    }
#endif
    std::atomic_thread_fence(std::memory_order_seq_cst);
  }

  static constinit inline thread_local Slot* tls_slot_ = nullptr;

  std::atomic<std::uint64_t> epoch_{1};
  std::atomic<Slot*> head_{nullptr};
  std::atomic<bool> asymmetric_{false};
  std::atomic<bool> registering_{false};
  std::atomic<bool> registered_{false};
};

// The process's one Reclaimer, constant-initialised (no guard on use).
inline constinit Reclaimer g_reclaimer{};

inline Reclaimer& Reclaimer::instance() noexcept { return g_reclaimer; }

// ReadSection: a reader's section, when `on` (a limit no TierTable owns
// skips it).
class ReadSection {
 public:
  explicit ReadSection(bool on = true) noexcept {
    if (!on) return;
    slot_ = Reclaimer::my_slot();
    Reclaimer::instance().enter(slot_);
  }
  ReadSection(const ReadSection&) = delete;
  ReadSection& operator=(const ReadSection&) = delete;
  ~ReadSection() {
    if (slot_ != nullptr) Reclaimer::instance().exit(slot_);
  }

 private:
  Reclaimer::Slot* slot_ = nullptr;
};

}  // namespace ratekeeper::detail

#endif  // RATEKEEPER_DETAIL_RECLAIM_HPP_
