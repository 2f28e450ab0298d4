// ratekeeper/fmt.hpp: {fmt} formatters for ratekeeper's types.
//
// Opt-in: the only header that includes {fmt}. Defines fmt::formatter for
// Decision and StoreStats, so that fmt::print("{}", decision) works:
//
//   allowed limit=20 remaining=19 retry_after=0ns reset_after=100ms
//   denied limit=20 remaining=0 retry_after=never reset_after=2s
#ifndef RATEKEEPER_FMT_HPP_
#define RATEKEEPER_FMT_HPP_

#include <fmt/format.h>

#include <cstdint>
#include <string>
#include <string_view>

#include "ratekeeper/decision.hpp"
#include "ratekeeper/store/store.hpp"

namespace ratekeeper {

// format_nanos
//
// A duration, exactly, in the largest unit it reaches: "0ns", "999ns",
// "1.5us", "250ms", "64.910331843s", "120s"; "never" for kNever.
inline std::string format_nanos(Nanos d) {
  if (d == kNever) return "never";
  const std::int64_t n = d.count();
  const std::uint64_t mag =
      n < 0 ? 0 - static_cast<std::uint64_t>(n) : static_cast<std::uint64_t>(n);
  const char* sign = n < 0 ? "-" : "";
  struct Step {
    std::uint64_t ns;
    int digits;
    const char* name;
  };
  static constexpr Step kUnits[] = {
      {1'000'000'000, 9, "s"}, {1'000'000, 6, "ms"}, {1'000, 3, "us"}};
  for (const Step& u : kUnits) {
    if (mag < u.ns) continue;
    std::string frac = fmt::format("{:0{}}", mag % u.ns, u.digits);
    while (!frac.empty() && frac.back() == '0') frac.pop_back();
    return fmt::format("{}{}{}{}{}", sign, mag / u.ns, frac.empty() ? "" : ".",
                       frac, u.name);
  }
  return fmt::format("{}{}ns", sign, mag);
}

}  // namespace ratekeeper

template <>
struct fmt::formatter<ratekeeper::Decision> : fmt::formatter<std::string_view> {
  template <class FormatContext>
  auto format(const ratekeeper::Decision& d, FormatContext& ctx) const
      -> decltype(ctx.out()) {
    return fmt::format_to(ctx.out(),
                          "{} limit={} remaining={} retry_after={} "
                          "reset_after={}",
                          d.allowed ? "allowed" : "denied", d.limit,
                          d.remaining, ratekeeper::format_nanos(d.retry_after),
                          ratekeeper::format_nanos(d.reset_after));
  }
};

template <>
struct fmt::formatter<ratekeeper::StoreStats>
    : fmt::formatter<std::string_view> {
  template <class FormatContext>
  auto format(const ratekeeper::StoreStats& s, FormatContext& ctx) const
      -> decltype(ctx.out()) {
    return fmt::format_to(ctx.out(),
                          "keys={} inserts={} reclaimed={} sweeps={} "
                          "evicted={} denied_full={} admitted_uncounted={} "
                          "cas_retries={}",
                          s.keys, s.inserts, s.reclaimed, s.sweeps, s.evicted,
                          s.denied_full, s.admitted_uncounted, s.cas_retries);
  }
};

#endif  // RATEKEEPER_FMT_HPP_
