// ratekeeper/detail/atomic16.hpp: a 16-byte compare-and-swap, lock-free on
// x86-64 and AArch64.
//
// Internal. Defines detail::Atomic16, 16 aligned bytes with load() and
// compare_exchange(), the one atomic the sharded store's hot path uses, and
// the paths it is made of (namespace detail::a16), which the tests drive one
// by one.
//
// How the 16-byte CAS is had, by platform:
//   - x86-64: `lock cmpxchg16b`, written as inline assembly, so that it is
//     lock-free whatever flags the user compiles with (no -mcx16, no
//     libatomic: GCC routes 16-byte __atomic builtins to libatomic, which
//     reports them as not lock-free). Every x86-64 CPU since 2006 has it.
//   - AArch64: `caspal` (FEAT_LSE, ARMv8.1: Graviton 2 and later, Apple M1,
//     Neoverse) where the kernel reports HWCAP_ATOMICS, else an LDAXP/STLXP
//     loop (ARMv8.0: Cortex-A53/A72, Graviton 1). Both are inline assembly
//     for the same reason as on x86-64; `.arch_extension lse` lets caspal
//     assemble with the default -march, and it is run only where the CPU has
//     it (checked once per process with getauxval).
//   - x86-64 and AArch64 under ThreadSanitizer (clang):
//     __sync_val_compare_and_swap on unsigned __int128, which TSan's runtime
//     implements and understands; inline assembly would be invisible to it.
//   - elsewhere: a sequence lock striped by address (kLockStripes of them).
//     Correct and portable, not lock-free; kLockFree says which one you have.
//     A writer spins (with a pause, then a yield) to take its stripe; a
//     load() does not write: it reads the stripe's sequence, the two words,
//     and the sequence again, and retries if a writer came between.
//
// load(), by path:
//   - x86-64 with AVX: one 16-byte MOVDQA. Intel (SDM vol. 3A, 9.1.1) and
//     AMD (APM vol. 2, 7.3.2) guarantee that an aligned 16-byte MOVDQA is
//     single-copy atomic on every processor that enumerates AVX. Without AVX
//     it is two 8-byte relaxed loads and may tear: callers then use what it
//     returns only as the `expected` value of a compare_exchange, which fails
//     on a torn value (then returns the true one), so a torn read can cost a
//     retry but never a wrong write. A load is an acquire on x86-64 (TSO:
//     loads are not reordered with later loads or stores, nor with an earlier
//     locked instruction).
//   - AArch64 with FEAT_LSE2 (ARMv8.4, HWCAP_USCAT: Graviton 3, Neoverse
//     V1/N2, Apple M1): one LDP, which LSE2 makes single-copy atomic for a
//     16-byte aligned address (Arm ARM B2.2.1.1). Without LSE2, LDAXP then a
//     STLXP of the same value, retried until the store-exclusive succeeds:
//     the LDAXP pair alone may tear, but a successful STLXP proves the
//     location was not written between the two (the exclusive monitor), so
//     the pair read is one value the cell held. That is a write (the line is
//     taken exclusive), as a CAS would be; but it is one round where a torn
//     read would need a load and a CAS, so loads_are_atomic() is true there.
//   - the striped sequence lock: untorn (a retry when a writer overlapped).
//
// Memory order: compare_exchange() is sequentially consistent on every path
// (the store's cells are read and written only through it and load(), and
// an admission must be ordered against every other admission on the key;
// SC is also what the x86-64 locked instruction gives for free). On x86-64
// a locked instruction is a full barrier. On AArch64, CASPAL is a load-
// acquire and store-release of the pair, and the LL/SC loop is LDAXP (load-
// acquire) with STLXP (store-release): Armv8 acquire/release are RCsc (a
// store-release is not reordered with a later load-acquire), which is the
// standard mapping of a seq_cst read-modify-write (the one GCC and LLVM
// emit, and libatomic's 16-byte CAS). A failed CAS is an acquire of the
// value it returns (CASPAL reads with acquire whether or not it writes; the
// LL/SC loop completes the read with a STLXP of the value read). load() is
// an acquire everywhere; on AArch64 the LDP is preceded by an LDAR of the
// first word, so that it is not reordered before an earlier store-release
// of this thread (as on x86-64, where a load is not hoisted above a locked
// instruction), and followed by DMB ISHLD (later loads and stores wait).
// The ordering is checked by TSan on the __sync path; qemu-user on an x86
// host runs the AArch64 code with x86's stronger order, so it proves the
// function, not the ordering.
#ifndef RATEKEEPER_DETAIL_ATOMIC16_HPP_
#define RATEKEEPER_DETAIL_ATOMIC16_HPP_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <thread>
#include <type_traits>

#include "ratekeeper/detail/math.hpp"
#include "ratekeeper/detail/mutex.hpp"

#if defined(__aarch64__) && defined(__linux__)
#  include <sys/auxv.h>
#endif

namespace ratekeeper::detail {

#if (defined(__x86_64__) || defined(__aarch64__)) && \
    defined(RATEKEEPER_TSAN) && defined(__clang__)
#  define RATEKEEPER_ATOMIC16_SYNC 1
#elif defined(__x86_64__) && !defined(RATEKEEPER_TSAN)
#  define RATEKEEPER_ATOMIC16_ASM 1
#elif defined(__aarch64__) && defined(__linux__) && !defined(RATEKEEPER_TSAN)
#  define RATEKEEPER_ATOMIC16_ARM64 1
#endif

namespace a16 {

// The paths, as functions on a 16-byte aligned cell, for Atomic16 to choose
// from and the tests to drive each. CAS: if *p == expected, writes desired
// and returns true; else stores *p in expected and returns false.

// A pause for a spin-wait: lets the sibling hyperthread (x86 PAUSE) or the
// other cores (AArch64 YIELD) run; after 64 of them, the scheduler.
inline void spin_pause(unsigned& spins) noexcept {
  if (++spins < 64) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__) || defined(__arm__)
    __asm__ __volatile__("yield" ::: "memory");
#endif
  } else {
    spins = 0;
    std::this_thread::yield();
  }
}

#if defined(RATEKEEPER_ATOMIC16_ASM)
inline bool cas_cmpxchg16b(u128* p, u128& expected, u128 desired) noexcept {
  std::uint64_t lo = static_cast<std::uint64_t>(expected);
  std::uint64_t hi = static_cast<std::uint64_t>(expected >> 64);
  bool ok = false;
  __asm__ __volatile__("lock cmpxchg16b %1"
                       : "=@ccz"(ok), "+m"(*p), "+a"(lo), "+d"(hi)
                       : "b"(static_cast<std::uint64_t>(desired)),
                         "c"(static_cast<std::uint64_t>(desired >> 64))
                       : "memory");
  if (!ok) expected = (static_cast<u128>(hi) << 64) | lo;
  return ok;
}

// Single-copy atomic on CPUs with AVX only (see the file comment).
inline u128 load_movdqa(const u128* p) noexcept {
  // The asm keeps the compiler from splitting it into two 8-byte loads.
  std::uint64_t lo = 0;
  std::uint64_t hi = 0;
  __asm__ __volatile__(
      "movdqa %2, %%xmm0\n\t"
      "movq %%xmm0, %0\n\t"
      "pextrq $1, %%xmm0, %1"
      : "=r"(lo), "=r"(hi)
      : "m"(*p)
      : "xmm0", "memory");
  return (static_cast<u128>(hi) << 64) | lo;
}

// Two 8-byte loads: may tear; for a CAS's expected value only.
inline u128 load_pair(const u128* p) noexcept {
  const auto* w = reinterpret_cast<const std::uint64_t*>(p);
  const std::uint64_t lo = __atomic_load_n(&w[0], __ATOMIC_RELAXED);
  const std::uint64_t hi = __atomic_load_n(&w[1], __ATOMIC_RELAXED);
  return (static_cast<u128>(hi) << 64) | lo;
}

inline bool cpu_has_avx() noexcept {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx") != 0;
}
#endif

#if defined(RATEKEEPER_ATOMIC16_ARM64)
// Linux's AArch64 hwcaps (asm/hwcap.h), spelled here so that an old libc's
// headers need not have them.
inline constexpr unsigned long kHwcapAtomics = 1UL << 8;  // FEAT_LSE
inline constexpr unsigned long kHwcapUscat = 1UL << 25;   // FEAT_LSE2

inline bool cpu_has_lse() noexcept {
  return (::getauxval(AT_HWCAP) & kHwcapAtomics) != 0;
}
inline bool cpu_has_lse2() noexcept {
  return (::getauxval(AT_HWCAP) & kHwcapUscat) != 0;
}

// CASPAL: compares the pair at [p] with x0:x1 and, if equal, writes x2:x3;
// x0:x1 get the old value either way. Little-endian: the first register of
// a pair is the word at the lower address (the low half). The register
// pairs must start at an even register, hence the pinned x0..x3. Acquire
// and release (see the file comment). Only where cpu_has_lse().
inline bool cas_casp(u128* p, u128& expected, u128 desired) noexcept {
  const std::uint64_t e_lo = static_cast<std::uint64_t>(expected);
  const std::uint64_t e_hi = static_cast<std::uint64_t>(expected >> 64);
  register std::uint64_t x0 __asm__("x0") = e_lo;
  register std::uint64_t x1 __asm__("x1") = e_hi;
  register std::uint64_t x2 __asm__("x2") = static_cast<std::uint64_t>(desired);
  register std::uint64_t x3 __asm__("x3") =
      static_cast<std::uint64_t>(desired >> 64);
  __asm__ __volatile__(
      ".arch_extension lse\n\t"
      "caspal %0, %1, %3, %4, %2"
      : "+r"(x0), "+r"(x1), "+Q"(*p)
      : "r"(x2), "r"(x3)
      : "memory");
  if (x0 == e_lo && x1 == e_hi) return true;
  expected = (static_cast<u128>(x1) << 64) | x0;
  return false;
}

// LDAXP/STLXP: the ARMv8.0 CAS. On a mismatch the value read is written
// back (STLXP of the same pair), which is what makes the read atomic: an
// LDAXP pair is single-copy atomic only if the STLXP that follows succeeds.
inline bool cas_llsc(u128* p, u128& expected, u128 desired) noexcept {
  const std::uint64_t e_lo = static_cast<std::uint64_t>(expected);
  const std::uint64_t e_hi = static_cast<std::uint64_t>(expected >> 64);
  const std::uint64_t d_lo = static_cast<std::uint64_t>(desired);
  const std::uint64_t d_hi = static_cast<std::uint64_t>(desired >> 64);
  std::uint64_t lo = 0;
  std::uint64_t hi = 0;
  std::uint32_t failed = 0;
  __asm__ __volatile__(
      "1:\n\t"
      "ldaxp %0, %1, %3\n\t"
      "cmp %0, %4\n\t"
      "ccmp %1, %5, #0, eq\n\t"
      "b.ne 2f\n\t"
      "stlxp %w2, %6, %7, %3\n\t"
      "cbnz %w2, 1b\n\t"
      "b 3f\n"
      "2:\n\t"
      "stlxp %w2, %0, %1, %3\n\t"
      "cbnz %w2, 1b\n"
      "3:"
      : "=&r"(lo), "=&r"(hi), "=&r"(failed), "+Q"(*p)
      : "r"(e_lo), "r"(e_hi), "r"(d_lo), "r"(d_hi)
      : "cc", "memory");
  if (lo == e_lo && hi == e_hi) return true;
  expected = (static_cast<u128>(hi) << 64) | lo;
  return false;
}

// LDP: single-copy atomic for an aligned 16 bytes with FEAT_LSE2 only.
// LDAR of the first word first, DMB ISHLD after (see the file comment).
inline u128 load_ldp(const u128* p) noexcept {
  std::uint64_t lo = 0;
  std::uint64_t hi = 0;
  std::uint64_t first = 0;
  __asm__ __volatile__(
      "ldar %2, %3\n\t"
      "ldp %0, %1, %3\n\t"
      "dmb ishld"
      : "=r"(lo), "=r"(hi), "=&r"(first)
      : "Q"(*p)
      : "memory");
  static_cast<void>(first);
  return (static_cast<u128>(hi) << 64) | lo;
}

// LDAXP, then STLXP of the same pair until it succeeds: an atomic read on
// ARMv8.0 (it writes, so the cell must be writable; every Atomic16 is).
inline u128 load_llsc(const u128* p) noexcept {
  std::uint64_t lo = 0;
  std::uint64_t hi = 0;
  std::uint32_t failed = 0;
  __asm__ __volatile__(
      "1:\n\t"
      "ldaxp %0, %1, %3\n\t"
      "stlxp %w2, %0, %1, %3\n\t"
      "cbnz %w2, 1b"
      : "=&r"(lo), "=&r"(hi), "=&r"(failed), "+Q"(*const_cast<u128*>(p))
      :
      : "memory");
  return (static_cast<u128>(hi) << 64) | lo;
}
#endif

// The portable path: a sequence lock per stripe of addresses. The words are
// read and written with relaxed 8-byte atomics (a reader may overlap a
// writer: it then sees the sequence move and retries; no data race).
class Striped {
 public:
  static bool cas(u128* p, u128& expected, u128 desired) noexcept {
    Stripe& s = stripe(p);
    const std::uint32_t seq = s.lock();
    const u128 cur = read(p);
    const bool ok = cur == expected;
    if (ok) write(p, desired);
    s.unlock(seq, ok);
    if (!ok) expected = cur;
    return ok;
  }

  static u128 load(const u128* p) noexcept {
    Stripe& s = stripe(p);
    unsigned spins = 0;
    while (true) {
      const std::uint32_t before = s.seq.load(std::memory_order_acquire);
      if ((before & 1U) == 0) {
        const u128 v = read(p);
        // The acquire fence orders the word loads before the re-read of the
        // sequence (a seqlock's read side).
        std::atomic_thread_fence(std::memory_order_acquire);
        if (s.seq.load(std::memory_order_relaxed) == before) return v;
      }
      spin_pause(spins);
    }
  }

 private:
  static constexpr std::size_t kLockStripes = 256;
  struct alignas(64) Stripe {
    // Odd while a writer holds the stripe.
    std::atomic<std::uint32_t> seq{0};

    // Returns the even sequence it took. Test (a load) before the CAS, so
    // waiting writers do not keep taking the line exclusive.
    std::uint32_t lock() noexcept {
      unsigned spins = 0;
      while (true) {
        std::uint32_t cur = seq.load(std::memory_order_relaxed);
        // Acquire: this writer's reads and writes of the words stay after
        // the previous writer's release in unlock(); seq_cst, so that the
        // CAS this path implements is sequentially consistent.
        if ((cur & 1U) == 0 &&
            seq.compare_exchange_weak(cur, cur + 1, std::memory_order_seq_cst,
                                      std::memory_order_relaxed)) {
          return cur;
        }
        spin_pause(spins);
      }
    }
    // Release: the words written are visible before the sequence is even
    // again. A failed CAS wrote nothing, so the sequence goes back to what
    // it was (readers that began before it need not retry).
    void unlock(std::uint32_t taken, bool wrote) noexcept {
      seq.store(wrote ? taken + 2 : taken, std::memory_order_release);
    }
  };

  static Stripe& stripe(const void* p) noexcept {
    static Stripe stripes[kLockStripes];
    return stripes[(reinterpret_cast<std::uintptr_t>(p) >> 4) % kLockStripes];
  }
  static u128 read(const u128* p) noexcept {
    const auto* w = reinterpret_cast<const std::uint64_t*>(p);
    const std::uint64_t a = __atomic_load_n(&w[0], __ATOMIC_RELAXED);
    const std::uint64_t b = __atomic_load_n(&w[1], __ATOMIC_RELAXED);
    std::uint64_t words[2] = {a, b};
    u128 v = 0;
    std::memcpy(&v, words, sizeof v);  // whatever the byte order
    return v;
  }
  static void write(u128* p, u128 v) noexcept {
    std::uint64_t words[2];
    std::memcpy(words, &v, sizeof v);
    auto* w = reinterpret_cast<std::uint64_t*>(p);
    __atomic_store_n(&w[0], words[0], __ATOMIC_RELAXED);
    __atomic_store_n(&w[1], words[1], __ATOMIC_RELAXED);
  }
};

}  // namespace a16

class alignas(16) Atomic16 {
 public:
#if defined(RATEKEEPER_ATOMIC16_ASM) || defined(RATEKEEPER_ATOMIC16_SYNC) || \
    defined(RATEKEEPER_ATOMIC16_ARM64)
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
  // x86-64 with AVX (MOVDQA), on AArch64 (LDP with LSE2, else an LL/SC
  // round), under the striped sequence lock, and under TSan (a CAS). When
  // false (x86-64 without AVX), load() may tear and its value must be
  // validated by a compare_exchange() before it decides anything.
  // Thread-safe.
  static bool loads_are_atomic() noexcept {
#if defined(RATEKEEPER_ATOMIC16_ASM)
    return has_avx_;
#else
    return true;
#endif
  }

  // load_writes
  //
  // Whether load() writes the cell (takes its cache line exclusive): on
  // AArch64 without LSE2 (LL/SC) and under TSan (a CAS). Thread-safe.
  static bool load_writes() noexcept {
#if defined(RATEKEEPER_ATOMIC16_ARM64)
    return !has_lse2_;
#elif defined(RATEKEEPER_ATOMIC16_SYNC)
    return true;
#else
    return false;
#endif
  }

  // load
  //
  // The value; untorn when loads_are_atomic(), else possibly torn (see the
  // file comment): then use it only as the expected value of
  // compare_exchange(). An acquire. Thread-safe.
  u128 load() const noexcept {
#if defined(RATEKEEPER_ATOMIC16_ASM)
    if (has_avx_) return a16::load_movdqa(word());
    // Relaxed: the compare_exchange that consumes this value validates it.
    return a16::load_pair(word());
#elif defined(RATEKEEPER_ATOMIC16_ARM64)
    if (has_lse2_) return a16::load_ldp(word());
    return a16::load_llsc(word());
#elif defined(RATEKEEPER_ATOMIC16_SYNC)
    return __sync_val_compare_and_swap(const_cast<u128*>(word()), u128{0},
                                       u128{0});
#else
    return a16::Striped::load(word());
#endif
  }

  // compare_exchange
  //
  // If the value equals `expected`, writes `desired` and returns true;
  // otherwise stores the current value in `expected` and returns false.
  // Sequentially consistent. Thread-safe.
  bool compare_exchange(u128& expected, u128 desired) noexcept {
#if defined(RATEKEEPER_ATOMIC16_ASM)
    return a16::cas_cmpxchg16b(word(), expected, desired);
#elif defined(RATEKEEPER_ATOMIC16_ARM64)
    if (has_lse_) return a16::cas_casp(word(), expected, desired);
    return a16::cas_llsc(word(), expected, desired);
#elif defined(RATEKEEPER_ATOMIC16_SYNC)
    const u128 prev = __sync_val_compare_and_swap(word(), expected, desired);
    if (prev == expected) return true;
    expected = prev;
    return false;
#else
    return a16::Striped::cas(word(), expected, desired);
#endif
  }

  // path
  //
  // Which instructions this process uses, for logs and benchmarks:
  // "cmpxchg16b+movdqa", "cmpxchg16b+pair", "caspal+ldp", "caspal+ldaxp",
  // "ldaxp+ldp", "ldaxp", "sync", "striped".
  static const char* path() noexcept {
#if defined(RATEKEEPER_ATOMIC16_ASM)
    return has_avx_ ? "cmpxchg16b+movdqa" : "cmpxchg16b+pair";
#elif defined(RATEKEEPER_ATOMIC16_ARM64)
    if (has_lse_) return has_lse2_ ? "caspal+ldp" : "caspal+ldaxp";
    return has_lse2_ ? "ldaxp+ldp" : "ldaxp";
#elif defined(RATEKEEPER_ATOMIC16_SYNC)
    return "sync";
#else
    return "striped";
#endif
  }

 private:
  // Read once, at static initialisation (a plain load afterwards, no guard).
#if defined(RATEKEEPER_ATOMIC16_ASM)
  // __builtin_cpu_init() first: this may run before libgcc's own
  // constructor has filled in the CPU model.
  inline static const bool has_avx_ = a16::cpu_has_avx();
#endif
#if defined(RATEKEEPER_ATOMIC16_ARM64)
  inline static const bool has_lse_ = a16::cpu_has_lse();
  inline static const bool has_lse2_ = a16::cpu_has_lse2();
#endif

  // The 16 bytes as two words; word() views them as one 128-bit value for
  // the locked instructions (low word first on the little-endian x86-64 and
  // AArch64 Linux).
  alignas(16) std::uint64_t w_[2] = {0, 0};
  u128* word() noexcept { return reinterpret_cast<u128*>(w_); }
  const u128* word() const noexcept {
    return reinterpret_cast<const u128*>(w_);
  }
};

static_assert(sizeof(Atomic16) == 16 && alignof(Atomic16) == 16);

// A State (at most 16 bytes, trivially copyable) as 128 bits, zero-padded.
//
// How the bytes move matters on the check's path. A 16-byte load of bytes
// just stored as two 8-byte words cannot be served by store forwarding (a
// stall of about a dozen cycles, seen with perf annotate on the store's
// apply): to_u128 reads a State as two words, and from_u128 lands a 16-byte
// State with one 16-byte store, from which loads of either width forward
// (a policy's step out of line takes the State by reference and may read
// it either way).
template <class State>
inline u128 to_u128(const State& s) noexcept {
  static_assert(std::is_trivially_copyable_v<State> && sizeof(State) <= 16);
  const auto* bytes = reinterpret_cast<const unsigned char*>(&s);
  std::uint64_t lo = 0;
  std::uint64_t hi = 0;
  if constexpr (sizeof(State) >= 8) {
    std::memcpy(&lo, bytes, 8);
    std::memcpy(&hi, bytes + 8, sizeof(State) - 8);
  } else {
    std::memcpy(&lo, bytes, sizeof(State));
  }
  return (static_cast<u128>(hi) << 64) | lo;
}

template <class State>
inline State from_u128(u128 v) noexcept {
  State s{};
  // Through void*: State may have default member initialisers, which makes
  // it non-trivial to construct but still trivially copyable.
  auto* bytes = static_cast<unsigned char*>(static_cast<void*>(&s));
  const auto lo = static_cast<std::uint64_t>(v);
  const auto hi = static_cast<std::uint64_t>(v >> 64);
#if defined(__GNUC__) && defined(__SSE2__)
  if constexpr (sizeof(State) == 16) {
    // One 16-byte store where the State lands in memory (a policy's step
    // out of line takes it by reference): a load of any part of it, 8 or
    // 16 bytes, is then served by store forwarding.
    using V = long long __attribute__((vector_size(16)));
    const V x = {static_cast<long long>(lo), static_cast<long long>(hi)};
    std::memcpy(bytes, &x, 16);
    return s;
  }
#endif
  if constexpr (sizeof(State) >= 8) {
    std::memcpy(bytes, &lo, 8);
    std::memcpy(bytes + 8, &hi, sizeof(State) - 8);
  } else {
    std::memcpy(bytes, &lo, sizeof(State));
  }
  return s;
}

}  // namespace ratekeeper::detail

#endif  // RATEKEEPER_DETAIL_ATOMIC16_HPP_
