// Helpers shared by the tests: a policy driven by hand, seeds, time literals.
#ifndef RATEKEEPER_TESTS_TEST_UTIL_HPP_
#define RATEKEEPER_TESTS_TEST_UTIL_HPP_

#include <algorithm>
#include <catch2/catch.hpp>
#include <cstdint>
#include <cstdlib>
#include <random>
#include <string>

#include "ratekeeper/decision.hpp"
#include "ratekeeper/policy/policy.hpp"

namespace rk_test {

using ratekeeper::Cost;
using ratekeeper::Decision;
using ratekeeper::Nanos;

inline constexpr std::int64_t kMs = 1'000'000;
inline constexpr std::int64_t kSec = 1'000'000'000;

// Driver: one key's state stepped by hand, time as an argument.
template <class P>
struct Driver {
  P policy;
  typename P::State state{};

  // A take's record, as a Receipt keeps it: where it sits and its cost.
  struct Held {
    typename P::Placement place{};
    Cost cost = 0;
  };
  // The last admitted take's record (see at()).
  Held last{};

  Decision at(std::int64_t ns, Cost cost = 1) {
    auto r = policy.step(state, Nanos{ns}, cost);
    if (r.decision.allowed) {
      last = Held{policy.place(state, Nanos{ns}, cost), cost};
    }
    state = r.next;
    return r.decision;
  }
  // The decision without keeping the new state.
  Decision peek(std::int64_t ns, Cost cost = 1) const {
    return policy.step(state, Nanos{ns}, cost).decision;
  }
  // Settles take `h` to `actual` at `ns`.
  void settle(std::int64_t ns, const Held& h, Cost actual) {
    state = policy.settle(state, Nanos{ns}, h.place, h.cost, actual);
  }
  // Gives back `amount` of take `h` (at most its cost) at `ns`.
  void give_back(std::int64_t ns, const Held& h, Cost amount) {
    settle(ns, h, h.cost - std::min(amount, h.cost));
  }
};

template <class P>
Driver<P> drive(P p) {
  return Driver<P>{std::move(p)};
}

// Seed for a random test: RATEKEEPER_SEED from the environment when set (to
// replay a failure), else `fallback`. Printed on failure through INFO.
inline std::uint64_t seed_or(std::uint64_t fallback) {
  if (const char* s = std::getenv("RATEKEEPER_SEED")) {
    return std::strtoull(s, nullptr, 10);
  }
  return fallback;
}

// Scale for long-running tests: RATEKEEPER_TEST_SCALE (default 1.0) shortens
// or lengthens them; sanitizer presets set it below 1.
inline double scale() {
  if (const char* s = std::getenv("RATEKEEPER_TEST_SCALE")) {
    return std::strtod(s, nullptr);
  }
  return 1.0;
}

}  // namespace rk_test

// Readable failures: Catch2 prints a Decision field by field.
namespace Catch {
template <>
struct StringMaker<ratekeeper::Decision> {
  static std::string convert(const ratekeeper::Decision& d) {
    return std::string(d.allowed ? "{allowed" : "{denied") +
           " limit=" + std::to_string(d.limit) +
           " remaining=" + std::to_string(d.remaining) +
           " retry_after=" + std::to_string(d.retry_after.count()) +
           "ns reset_after=" + std::to_string(d.reset_after.count()) + "ns}";
  }
};
}  // namespace Catch

#endif  // RATEKEEPER_TESTS_TEST_UTIL_HPP_
