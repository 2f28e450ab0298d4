// ratekeeper/detail/validate.hpp: the configuration checks the window
// policies share.
//
// Internal. Every error is kInvalidArgument with a message that names the
// policy, the parameter and the value it got.
#ifndef RATEKEEPER_DETAIL_VALIDATE_HPP_
#define RATEKEEPER_DETAIL_VALIDATE_HPP_

#include <cstdint>
#include <string_view>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "ratekeeper/decision.hpp"

namespace ratekeeper::detail {

// check_window_rate
//
// A window policy's Rate: a count per window in 1..max_count (max_text says
// max_count in words; hint follows the message when it is exceeded) and a
// positive window.
inline absl::Status check_window_rate(std::string_view policy, Rate rate,
                                      std::uint64_t max_count,
                                      std::string_view max_text,
                                      std::string_view hint = {}) {
  const absl::string_view name(policy.data(), policy.size());
  if (rate.count == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, ": count per window must be positive"));
  }
  if (rate.count > max_count) {
    return absl::InvalidArgumentError(absl::StrCat(
        name, ": count per window must be at most ",
        absl::string_view(max_text.data(), max_text.size()), ", got ",
        rate.count, absl::string_view(hint.data(), hint.size())));
  }
  if (rate.period.count() <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        name, ": window must be positive, got ", rate.period.count(), " ns"));
  }
  return absl::OkStatus();
}

}  // namespace ratekeeper::detail

#endif  // RATEKEEPER_DETAIL_VALIDATE_HPP_
