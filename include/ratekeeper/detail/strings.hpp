// ratekeeper/detail/strings.hpp: std::string_view into abseil's string APIs.
//
// Debian's abseil is built with its own absl::string_view, not an alias of
// std::string_view, so absl::StrCat and absl::CHexEscape do not take a
// std::string_view. av() converts without copying.
#ifndef RATEKEEPER_DETAIL_STRINGS_HPP_
#define RATEKEEPER_DETAIL_STRINGS_HPP_

#include <string_view>

#include "absl/strings/string_view.h"

namespace ratekeeper::detail {

inline absl::string_view av(std::string_view s) noexcept {
  return absl::string_view(s.data(), s.size());
}

}  // namespace ratekeeper::detail

#endif  // RATEKEEPER_DETAIL_STRINGS_HPP_
