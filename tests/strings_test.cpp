// detail/strings.hpp: the library's one hex encoder and decoder, against
// printf's %02x, and the encoders built on it (a digest's hex, the audit's
// JSON escapes).
#include "ratekeeper/detail/strings.hpp"

#include <catch2/catch.hpp>
#include <cstdio>
#include <string>

#include "ratekeeper/budget/audit.hpp"
#include "ratekeeper/detail/sha256.hpp"

namespace rk = ratekeeper;

namespace {

std::string printf_hex(const std::string& bytes) {
  std::string out;
  char buf[3];
  for (const char c : bytes) {
    std::snprintf(buf, sizeof buf, "%02x", static_cast<unsigned char>(c));
    out += buf;
  }
  return out;
}

std::string all_bytes() {
  std::string s;
  for (int i = 0; i < 256; ++i) s.push_back(static_cast<char>(i));
  return s;
}

}  // namespace

TEST_CASE("hex: every byte as printf's %02x, and back", "[i16][hex]") {
  const std::string bytes = all_bytes();
  const std::string h = rk::detail::hex(bytes);
  CHECK(h == printf_hex(bytes));
  CHECK(rk::detail::unhex(h) == bytes);
  std::string upper = h;
  for (char& c : upper) {
    if (c >= 'a' && c <= 'f') c = static_cast<char>(c - 'a' + 'A');
  }
  CHECK(rk::detail::unhex(upper) == bytes);  // either case is read
  // append_hex appends; hex_into writes exactly two chars a byte.
  std::string out = "k:";
  rk::detail::append_hex(out, std::string("\x00\xff", 2));
  CHECK(out == "k:00ff");
  char buf[8] = {'x', 'x', 'x', 'x', 'x', 'x', 'x', 'x'};
  CHECK(rk::detail::hex_into("ab", buf) == buf + 4);
  CHECK(std::string(buf, 8) == "6162xxxx");
  CHECK(rk::detail::hex("").empty());
  CHECK(rk::detail::unhex("") == std::string());
}

TEST_CASE("unhex refuses what is not hex", "[i16][hex]") {
  CHECK_FALSE(rk::detail::unhex("a").has_value());     // odd length
  CHECK_FALSE(rk::detail::unhex("0g").has_value());    // not a digit
  CHECK_FALSE(rk::detail::unhex("-").has_value());     // the journal's own
  CHECK_FALSE(rk::detail::unhex(" 0").has_value());    // no spaces
  CHECK_FALSE(rk::detail::unhex("0x00").has_value());  // no prefix
}

TEST_CASE("a digest's hex and the audit's escapes use it", "[i16][hex]") {
  // FIPS 180-2's example: SHA-256("abc").
  CHECK(rk::detail::to_hex(rk::detail::sha256("abc")) ==
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  std::string j;
  rk::detail::append_json_quoted(j, std::string("a\x01\"\xff", 4));
  CHECK(j == "\"a\\u0001\\\"\\u00ff\"");
}
