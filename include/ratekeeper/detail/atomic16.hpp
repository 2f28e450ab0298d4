// ratekeeper/detail/atomic16.hpp: a 16-byte compare-and-swap, lock-free on
// x86-64.
//
// Internal. Defines detail::Atomic16, 16 aligned bytes with load() and
// compare_exchange(), the one atomic the sharded store's hot path uses.
//
// How the 16-byte CAS is had, by platform:
//   - x86-64: `lock cmpxchg16b`, written as inline assembly, so that it is
//     lock-free whatever flags the user compiles with (no -mcx16, no
//     libatomic: GCC routes 16-byte __atomic builtins to libatomic, which
//     reports them as not lock-free). Every x86-64 CPU since 2006 has it.
//   - x86-64 under ThreadSanitizer (clang): __sync_val_compare_and_swap on
//     unsigned __int128, which TSan's runtime implements and understands;
//     inline assembly would be invisible to it.
//   - elsewhere: a lock striped by address (kLockStripes spinlocks). Correct
//     and portable, not lock-free; kLockFree says which one you have.
//
// load() on x86-64 is one 16-byte MOVDQA where the CPU has AVX: Intel (SDM
// vol. 3A, 9.1.1) and AMD (APM vol. 2, 7.3.2) guarantee that an aligned
// 16-byte MOVDQA is single-copy atomic on every processor that enumerates
// AVX, so the value read is one the cell really held (loads_are_atomic()
// says so, checked once per process with CPUID). Without AVX it is two
// 8-byte relaxed loads and may tear: callers then use what it returns only
// as the `expected` value of a compare_exchange, which fails on a torn value
// (then returns the true one), so a torn read can cost a retry but never a
// wrong write. compare_exchange() is sequentially consistent (a locked
// instruction is a full barrier on x86-64). A load is an acquire on x86-64
// (TSO: loads are not reordered with later loads or stores).
#ifndef RATEKEEPER_DETAIL_ATOMIC16_HPP_
#define RATEKEEPER_DETAIL_ATOMIC16_HPP_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "ratekeeper/detail/math.hpp"
#include "ratekeeper/detail/mutex.hpp"

namespace ratekeeper::detail {

#if defined(__x86_64__) && defined(RATEKEEPER_TSAN) && defined(__clang__)
#  define RATEKEEPER_ATOMIC16_SYNC 1
#elif defined(__x86_64__) && !defined(RATEKEEPER_TSAN)
#  define RATEKEEPER_ATOMIC16_ASM 1
#endif

class alignas(16) Atomic16 {
 public:
#if defined(RATEKEEPER_ATOMIC16_ASM) || defined(RATEKEEPER_ATOMIC16_SYNC)
  static constexpr bool kLockFree = true;
#else
  static constexpr bool kLockFree = false;
#endif

  Atomic16() = default;
  Atomic16(const Atomic16&) = delete;
  Atomic16& operator=(const Atomic16&) = delete;

  // loads_are_atomic
  //
  // Whether load() returns an untorn value, one the cell held at one instant
  // (the linearisation point of a read that decides without writing): on
  // x86-64 with AVX (MOVDQA), under the striped lock, and under TSan (a
  // CAS). When false, load() may tear and its value must be validated by a
  // compare_exchange() before it decides anything. Thread-safe.
  static bool loads_are_atomic() noexcept {
#if defined(RATEKEEPER_ATOMIC16_ASM)
    return has_avx_;
#else
    return true;
#endif
  }

  // load
  //
  // The value; untorn when loads_are_atomic(), else possibly torn (see the
  // file comment): then use it only as the expected value of
  // compare_exchange(). Thread-safe.
  u128 load() const noexcept {
#if defined(RATEKEEPER_ATOMIC16_ASM)
    if (loads_are_atomic()) {
      // One aligned 16-byte load (MOVDQA), atomic on AVX processors. The
      // asm keeps the compiler from splitting it into two 8-byte loads.
      std::uint64_t lo = 0;
      std::uint64_t hi = 0;
      __asm__ __volatile__(
          "movdqa %2, %%xmm0\n\t"
          "movq %%xmm0, %0\n\t"
          "pextrq $1, %%xmm0, %1"
          : "=r"(lo), "=r"(hi)
          : "m"(*word())
          : "xmm0", "memory");
      return (static_cast<u128>(hi) << 64) | lo;
    }
    // Relaxed: the compare_exchange that consumes this value validates it.
    const std::uint64_t lo = __atomic_load_n(&w_[0], __ATOMIC_RELAXED);
    const std::uint64_t hi = __atomic_load_n(&w_[1], __ATOMIC_RELAXED);
    return (static_cast<u128>(hi) << 64) | lo;
#elif defined(RATEKEEPER_ATOMIC16_SYNC)
    return __sync_val_compare_and_swap(const_cast<u128*>(word()), u128{0},
                                       u128{0});
#else
    SpinGuard g(stripe(this));
    return *word();
#endif
  }

  // compare_exchange
  //
  // If the value equals `expected`, writes `desired` and returns true;
  // otherwise stores the current value in `expected` and returns false.
  // Sequentially consistent. Thread-safe.
  bool compare_exchange(u128& expected, u128 desired) noexcept {
#if defined(RATEKEEPER_ATOMIC16_ASM)
    std::uint64_t lo = static_cast<std::uint64_t>(expected);
    std::uint64_t hi = static_cast<std::uint64_t>(expected >> 64);
    bool ok = false;
    __asm__ __volatile__("lock cmpxchg16b %1"
                         : "=@ccz"(ok), "+m"(*word()), "+a"(lo), "+d"(hi)
                         : "b"(static_cast<std::uint64_t>(desired)),
                           "c"(static_cast<std::uint64_t>(desired >> 64))
                         : "memory");
    if (!ok) expected = (static_cast<u128>(hi) << 64) | lo;
    return ok;
#elif defined(RATEKEEPER_ATOMIC16_SYNC)
    const u128 prev = __sync_val_compare_and_swap(word(), expected, desired);
    if (prev == expected) return true;
    expected = prev;
    return false;
#else
    SpinGuard g(stripe(this));
    if (*word() == expected) {
      *word() = desired;
      return true;
    }
    expected = *word();
    return false;
#endif
  }

 private:
#if defined(RATEKEEPER_ATOMIC16_ASM)
  // Read once, at static initialisation (a plain load afterwards, no guard).
  // __builtin_cpu_init() first: this may run before libgcc's own
  // constructor has filled in the CPU model.
  inline static const bool has_avx_ = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx") != 0;
  }();
#endif
#if !defined(RATEKEEPER_ATOMIC16_ASM) && !defined(RATEKEEPER_ATOMIC16_SYNC)
  static constexpr std::size_t kLockStripes = 256;
  struct alignas(64) Spin {
    std::atomic<bool> locked{false};
  };
  static Spin& stripe(const void* p) noexcept {
    static Spin stripes[kLockStripes];
    return stripes[(reinterpret_cast<std::uintptr_t>(p) >> 4) % kLockStripes];
  }
  struct SpinGuard {
    explicit SpinGuard(Spin& s) noexcept : s_(s) {
      // Acquire pairs with the release in the destructor of the last holder.
      while (s_.locked.exchange(true, std::memory_order_acquire)) {
      }
    }
    ~SpinGuard() { s_.locked.store(false, std::memory_order_release); }
    Spin& s_;
  };
#endif

  // The 16 bytes as two words (low word first: x86-64 is little-endian);
  // word() views them as one 128-bit value for the locked instructions.
  alignas(16) std::uint64_t w_[2] = {0, 0};
  u128* word() noexcept { return reinterpret_cast<u128*>(w_); }
  const u128* word() const noexcept {
    return reinterpret_cast<const u128*>(w_);
  }
};

static_assert(sizeof(Atomic16) == 16 && alignof(Atomic16) == 16);

// A State (at most 16 bytes, trivially copyable) as 128 bits, zero-padded.
template <class State>
inline u128 to_u128(const State& s) noexcept {
  static_assert(std::is_trivially_copyable_v<State> && sizeof(State) <= 16);
  u128 v = 0;
  std::memcpy(&v, &s, sizeof(State));
  return v;
}

template <class State>
inline State from_u128(u128 v) noexcept {
  State s{};
  // Through void*: State may have default member initialisers, which makes
  // it non-trivial to construct but still trivially copyable.
  std::memcpy(static_cast<void*>(&s), &v, sizeof(State));
  return s;
}

}  // namespace ratekeeper::detail

#endif  // RATEKEEPER_DETAIL_ATOMIC16_HPP_
