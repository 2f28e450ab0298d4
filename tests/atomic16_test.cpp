// detail::Atomic16 and each of its paths (namespace detail::a16) that this
// CPU can run: CAS semantics, concurrent CAS increments that sum exactly, and
// loads that never tear where the path says they are atomic.
#include "ratekeeper/detail/atomic16.hpp"

#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "test_util.hpp"

using ratekeeper::detail::Atomic16;
using ratekeeper::detail::u128;
namespace a16 = ratekeeper::detail::a16;

namespace {

// One path: a CAS and a load on a raw 16-byte aligned cell.
struct Path {
  const char* name;
  bool (*cas)(u128*, u128&, u128);
  u128 (*load)(const u128*);
  bool loads_are_atomic;
  bool available;  // this CPU can run it
};

std::vector<Path> paths() {
  std::vector<Path> v;
#if defined(RATEKEEPER_ATOMIC16_ASM)
  v.push_back({"cmpxchg16b+movdqa", a16::cas_cmpxchg16b, a16::load_movdqa, true,
               a16::cpu_has_avx()});
  v.push_back(
      {"cmpxchg16b+pair", a16::cas_cmpxchg16b, a16::load_pair, false, true});
#endif
#if defined(RATEKEEPER_ATOMIC16_ARM64)
  const bool lse = a16::cpu_has_lse();
  const bool lse2 = a16::cpu_has_lse2();
  v.push_back({"caspal+ldp", a16::cas_casp, a16::load_ldp, true, lse && lse2});
  v.push_back({"caspal+ldaxp", a16::cas_casp, a16::load_llsc, true, lse});
  v.push_back({"ldaxp+ldp", a16::cas_llsc, a16::load_ldp, true, lse2});
  v.push_back({"ldaxp", a16::cas_llsc, a16::load_llsc, true, true});
#endif
  v.push_back({"striped", a16::Striped::cas, a16::Striped::load, true, true});
  return v;
}

// The default path, through an Atomic16 (its cell is the object).
struct Cell {
  Atomic16 a;
};

int scaled(int n) {
  const char* s = std::getenv("RATEKEEPER_TEST_SCALE");
  const double f = s != nullptr ? std::atof(s) : 1.0;
  const int m = static_cast<int>(n * (f > 0 ? f : 1.0));
  return m > 100 ? m : 100;
}

constexpr u128 kBoth = (u128{1} << 64) | 1u;  // +1 in each half

// `threads` threads each add kBoth `n` times with load + CAS retry loops.
template <class Load, class Cas>
void increments(int threads, int n, Load load, Cas cas) {
  std::vector<std::thread> ts;
  for (int t = 0; t < threads; ++t) {
    ts.emplace_back([&] {
      for (int i = 0; i < n; ++i) {
        u128 cur = load();
        while (!cas(cur, cur + kBoth)) {
        }
      }
    });
  }
  for (auto& t : ts) t.join();
}

// Two writers store values whose high word is the complement of the low
// word (one counts up from 0, the other down from ~0); two readers check
// that every load has that shape. A torn load (a low word of one value, the
// high word of another) does not. Returns the number of torn reads.
template <class Load, class Cas>
long tears(int n, Load load, Cas cas) {
  std::atomic<int> writers_left{2};
  std::atomic<long> torn{0};
  std::vector<std::thread> ts;
  for (int w = 0; w < 2; ++w) {
    ts.emplace_back([&, w] {
      for (int i = 1; i <= n; ++i) {
        const std::uint64_t lo = w == 0 ? static_cast<std::uint64_t>(i)
                                        : ~static_cast<std::uint64_t>(i);
        const u128 next = (static_cast<u128>(~lo) << 64) | lo;
        u128 cur = load();
        while (!cas(cur, next)) {
        }
      }
      writers_left.fetch_sub(1);
    });
  }
  for (int r = 0; r < 2; ++r) {
    ts.emplace_back([&] {
      long bad = 0;
      do {
        const u128 v = load();
        const auto lo = static_cast<std::uint64_t>(v);
        const auto hi = static_cast<std::uint64_t>(v >> 64);
        if (hi != ~lo) ++bad;
      } while (writers_left.load() > 0);
      torn.fetch_add(bad);
    });
  }
  for (auto& t : ts) t.join();
  return torn.load();
}

}  // namespace

TEST_CASE("Atomic16 says which path it runs", "[i15][atomic16]") {
  WARN("Atomic16 path: " << Atomic16::path() << ", loads_are_atomic: "
                         << Atomic16::loads_are_atomic()
                         << ", load_writes: " << Atomic16::load_writes());
#if defined(__x86_64__) || defined(__aarch64__)
  CHECK(Atomic16::kLockFree);
#endif
  // CI runs this binary under qemu-aarch64 with -cpu models with and without
  // LSE and says which path each must take (a prefix: "caspal" for a CPU
  // with LSE, whether or not it also has LSE2).
  if (const char* want = std::getenv("RK_EXPECT_ATOMIC16_PATH")) {
    CHECK(std::string(Atomic16::path()).rfind(want, 0) == 0);
  }
}

TEST_CASE("each Atomic16 path: CAS semantics, halves in their place",
          "[i15][atomic16]") {
  for (const Path& p : paths()) {
    if (!p.available) continue;
    INFO("path " << p.name);
    alignas(16) u128 cell = 0;
    const u128 big = (u128{0xDEADBEEF} << 64) | 42u;
    u128 expected = 0;
    CHECK(p.cas(&cell, expected, big));
    CHECK(cell == big);  // the low word is the low half
    CHECK(p.load(&cell) == big);
    expected = (u128{42} << 64) | 0xDEADBEEFu;  // halves swapped: no match
    CHECK_FALSE(p.cas(&cell, expected, 9));
    CHECK(expected == big);
    expected = big | (u128{1} << 127);  // differs in the high half only
    CHECK_FALSE(p.cas(&cell, expected, 9));
    CHECK(expected == big);
    expected = big + 1;  // differs in the low half only
    CHECK_FALSE(p.cas(&cell, expected, 9));
    CHECK(expected == big);
    CHECK(cell == big);
    CHECK(p.cas(&cell, expected, ~u128{0}));
    CHECK(p.load(&cell) == ~u128{0});
  }
  Cell c;
  u128 expected = 0;
  const u128 big = (u128{7} << 64) | 5u;
  CHECK(c.a.compare_exchange(expected, big));
  CHECK(c.a.load() == big);
  expected = 5;
  CHECK_FALSE(c.a.compare_exchange(expected, 1));
  CHECK(expected == big);
}

TEST_CASE("each Atomic16 path: concurrent CAS increments sum exactly",
          "[i15][atomic16]") {
  constexpr int kThreads = 4;
  const int n = scaled(50'000);
  // The oracle: kThreads * n increments of one in each half.
  const u128 want = static_cast<u128>(kThreads) * static_cast<u128>(n) * kBoth;
  for (const Path& p : paths()) {
    if (!p.available) continue;
    INFO("path " << p.name);
    alignas(16) u128 cell = 0;
    increments(
        kThreads, n, [&] { return p.load(&cell); },
        [&](u128& e, u128 d) { return p.cas(&cell, e, d); });
    CHECK(cell == want);
  }
  Cell c;
  increments(
      kThreads, n, [&] { return c.a.load(); },
      [&](u128& e, u128 d) { return c.a.compare_exchange(e, d); });
  CHECK(c.a.load() == want);
}

TEST_CASE("each Atomic16 path whose loads are atomic: no load tears",
          "[i15][atomic16]") {
  const int n = scaled(100'000);
  int ran = 0;
  for (const Path& p : paths()) {
    if (!p.available || !p.loads_are_atomic) continue;
    INFO("path " << p.name);
    alignas(16) u128 cell = static_cast<u128>(~std::uint64_t{0}) << 64;
    CHECK(tears(
              n, [&] { return p.load(&cell); },
              [&](u128& e, u128 d) { return p.cas(&cell, e, d); }) == 0);
    ++ran;
  }
  CHECK(ran >= 1);  // the striped path at least
  if (Atomic16::loads_are_atomic()) {
    Cell c;
    u128 e = 0;
    REQUIRE(
        c.a.compare_exchange(e, static_cast<u128>(~std::uint64_t{0}) << 64));
    CHECK(tears(
              n, [&] { return c.a.load(); },
              [&](u128& ex, u128 d) { return c.a.compare_exchange(ex, d); }) ==
          0);
  }
}
