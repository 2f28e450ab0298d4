// ratekeeper/config.hpp: the library's version and its few configuration
// macros.
//
// Defines RATEKEEPER_VERSION and RATEKEEPER_ASSERT, the one macro through which
// internal invariants are checked (as fmt's FMT_ASSERT). Every macro here may
// be defined by the user before the first include; each branch that honours a
// user definition opens with "Use the provided definition."
#ifndef RATEKEEPER_CONFIG_HPP_
#define RATEKEEPER_CONFIG_HPP_

#include <cstdio>
#include <cstdlib>

#define RATEKEEPER_VERSION_MAJOR 0
#define RATEKEEPER_VERSION_MINOR 1
#define RATEKEEPER_VERSION_PATCH 0
#define RATEKEEPER_VERSION 100  // major * 10000 + minor * 100 + patch

// RATEKEEPER_ASSERT(cond, msg): checks an internal invariant, never user input
// (user input gets an absl::Status or a Decision). Active unless NDEBUG; in
// NDEBUG builds the condition is not evaluated.
#ifdef RATEKEEPER_ASSERT
// Use the provided definition.
#elif defined(NDEBUG)
#  define RATEKEEPER_ASSERT(cond, msg) static_cast<void>(sizeof(!(cond)))
#else
#  define RATEKEEPER_ASSERT(cond, msg) \
    ((cond) ? static_cast<void>(0)     \
            : ::ratekeeper::detail::assert_fail(__FILE__, __LINE__, msg))
#endif

namespace ratekeeper::detail {

[[noreturn]] inline void assert_fail(const char* file, int line,
                                     const char* msg) noexcept {
  std::fprintf(stderr, "%s:%d: ratekeeper assertion failed: %s\n", file, line,
               msg);
  std::abort();
}

}  // namespace ratekeeper::detail

#endif  // RATEKEEPER_CONFIG_HPP_
