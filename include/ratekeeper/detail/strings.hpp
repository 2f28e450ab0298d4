// ratekeeper/detail/strings.hpp: std::string_view into abseil's string APIs,
// and the library's one hex encoder and decoder.
//
// Debian's abseil is built with its own absl::string_view, not an alias of
// std::string_view, so absl::StrCat and absl::CHexEscape do not take a
// std::string_view. av() converts without copying.
//
// Hex: the ledger's hashes, Redis keys, the journal's and the checkpoints'
// keys all use hex_into() below. Not absl::BytesToHexString: it returns a new
// string, where the ledger writes a record's hash into the record's buffer
// and a Redis key is appended to in place, without an allocation per call;
// and absl::HexStringToBytes (20220623) does not say when its input is not
// hex, which unhex() must.
#ifndef RATEKEEPER_DETAIL_STRINGS_HPP_
#define RATEKEEPER_DETAIL_STRINGS_HPP_

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>

#include "absl/strings/string_view.h"

namespace ratekeeper::detail {

inline absl::string_view av(std::string_view s) noexcept {
  return absl::string_view(s.data(), s.size());
}

// Writes the lowercase hex of `bytes` (2 * bytes.size() chars) at `out`;
// returns the end.
inline char* hex_into(std::string_view bytes, char* out) noexcept {
  static constexpr char kHex[] = "0123456789abcdef";
  for (const char c : bytes) {
    const auto u = static_cast<unsigned char>(c);
    *out++ = kHex[u >> 4];
    *out++ = kHex[u & 15];
  }
  return out;
}

inline void append_hex(std::string& out, std::string_view bytes) {
  const std::size_t at = out.size();
  out.resize(at + 2 * bytes.size());
  hex_into(bytes, out.data() + at);
}

inline std::string hex(std::string_view bytes) {
  std::string out;
  append_hex(out, bytes);
  return out;
}

// The bytes of hex `h` (either case); nullopt for an odd length or any
// other character.
inline std::optional<std::string> unhex(std::string_view h) {
  if (h.size() % 2 != 0) return std::nullopt;
  auto val = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  std::string out(h.size() / 2, '\0');
  for (std::size_t i = 0; i < h.size(); i += 2) {
    const int hi = val(h[i]), lo = val(h[i + 1]);
    if (hi < 0 || lo < 0) return std::nullopt;
    out[i / 2] = static_cast<char>(hi * 16 + lo);
  }
  return out;
}

}  // namespace ratekeeper::detail

#endif  // RATEKEEPER_DETAIL_STRINGS_HPP_
