// ratekeeper/detail/sha256.hpp: SHA-256 (FIPS 180-4) and HMAC-SHA-256
// (RFC 2104), for the ledger's keyed chain.
//
// Internal. Defines detail::Sha256 (incremental), detail::sha256() and
// detail::hmac_sha256(), and detail::to_hex(). Plain portable C++ (no
// OpenSSL), checked against the FIPS 180-4 and RFC 4231 test vectors in
// tests/ledger_test.cpp.
#ifndef RATEKEEPER_DETAIL_SHA256_HPP_
#define RATEKEEPER_DETAIL_SHA256_HPP_

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

#include "ratekeeper/detail/strings.hpp"

namespace ratekeeper::detail {

using Digest256 = std::array<unsigned char, 32>;

class Sha256 {
 public:
  Sha256() = default;

  void update(std::string_view data) {
    const auto* p = reinterpret_cast<const unsigned char*>(data.data());
    std::size_t n = data.size();
    bytes_ += n;
    if (fill_ != 0) {
      const std::size_t take = std::min<std::size_t>(64 - fill_, n);
      std::memcpy(block_.data() + fill_, p, take);
      fill_ += take;
      p += take;
      n -= take;
      if (fill_ < 64) return;
      compress(block_.data());
      fill_ = 0;
    }
    for (; n >= 64; p += 64, n -= 64) compress(p);
    std::memcpy(block_.data(), p, n);
    fill_ = n;
  }

  Digest256 finish() {
    const std::uint64_t bits = bytes_ * 8;
    const unsigned char one = 0x80;
    update(std::string_view(reinterpret_cast<const char*>(&one), 1));
    const unsigned char zero = 0;
    while (fill_ != 56) {
      update(std::string_view(reinterpret_cast<const char*>(&zero), 1));
    }
    unsigned char len[8];
    for (int i = 0; i < 8; ++i) {
      len[i] = static_cast<unsigned char>(bits >> (56 - 8 * i));
    }
    update(std::string_view(reinterpret_cast<const char*>(len), 8));
    Digest256 out{};
    for (int i = 0; i < 8; ++i) {
      for (int j = 0; j < 4; ++j) {
        out[static_cast<std::size_t>(4 * i + j)] = static_cast<unsigned char>(
            h_[static_cast<std::size_t>(i)] >> (24 - 8 * j));
      }
    }
    return out;
  }

 private:
  static std::uint32_t rotr(std::uint32_t x, int n) {
    return (x >> n) | (x << (32 - n));
  }

  void compress(const unsigned char* p) {
    static constexpr std::uint32_t k[64] = {
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1,
        0x923f82a4, 0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3,
        0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786,
        0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
        0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147,
        0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13,
        0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
        0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a,
        0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208,
        0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};
    std::uint32_t w[64];
    for (int i = 0; i < 16; ++i) {
      w[i] = static_cast<std::uint32_t>(p[4 * i]) << 24 |
             static_cast<std::uint32_t>(p[4 * i + 1]) << 16 |
             static_cast<std::uint32_t>(p[4 * i + 2]) << 8 |
             static_cast<std::uint32_t>(p[4 * i + 3]);
    }
    for (int i = 16; i < 64; ++i) {
      const std::uint32_t s0 =
          rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
      const std::uint32_t s1 =
          rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    std::uint32_t a = h_[0], b = h_[1], c = h_[2], d = h_[3], e = h_[4],
                  f = h_[5], g = h_[6], h = h_[7];
    for (int i = 0; i < 64; ++i) {
      const std::uint32_t s1 = rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25);
      const std::uint32_t ch = (e & f) ^ (~e & g);
      const std::uint32_t t1 = h + s1 + ch + k[i] + w[i];
      const std::uint32_t s0 = rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22);
      const std::uint32_t maj = (a & b) ^ (a & c) ^ (b & c);
      const std::uint32_t t2 = s0 + maj;
      h = g;
      g = f;
      f = e;
      e = d + t1;
      d = c;
      c = b;
      b = a;
      a = t1 + t2;
    }
    h_[0] += a;
    h_[1] += b;
    h_[2] += c;
    h_[3] += d;
    h_[4] += e;
    h_[5] += f;
    h_[6] += g;
    h_[7] += h;
  }

  std::array<std::uint32_t, 8> h_ = {0x6a09e667, 0xbb67ae85, 0x3c6ef372,
                                     0xa54ff53a, 0x510e527f, 0x9b05688c,
                                     0x1f83d9ab, 0x5be0cd19};
  std::array<unsigned char, 64> block_{};
  std::size_t fill_ = 0;
  std::uint64_t bytes_ = 0;
};

inline Digest256 sha256(std::string_view data) {
  Sha256 s;
  s.update(data);
  return s.finish();
}

// HMAC-SHA-256 (RFC 2104): a key longer than the block (64 bytes) is
// hashed first.
inline Digest256 hmac_sha256(std::string_view key, std::string_view data) {
  std::array<unsigned char, 64> k{};
  if (key.size() > 64) {
    const Digest256 kh = sha256(key);
    std::memcpy(k.data(), kh.data(), kh.size());
  } else {
    std::memcpy(k.data(), key.data(), key.size());
  }
  std::array<char, 64> ipad{}, opad{};
  for (std::size_t i = 0; i < 64; ++i) {
    ipad[i] = static_cast<char>(k[i] ^ 0x36);
    opad[i] = static_cast<char>(k[i] ^ 0x5c);
  }
  Sha256 inner;
  inner.update(std::string_view(ipad.data(), ipad.size()));
  inner.update(data);
  const Digest256 ih = inner.finish();
  Sha256 outer;
  outer.update(std::string_view(opad.data(), opad.size()));
  outer.update(
      std::string_view(reinterpret_cast<const char*>(ih.data()), ih.size()));
  return outer.finish();
}

inline std::string to_hex(const Digest256& d) {
  std::string out(64, '0');
  hex_into(std::string_view(reinterpret_cast<const char*>(d.data()), d.size()),
           out.data());
  return out;
}

}  // namespace ratekeeper::detail

#endif  // RATEKEEPER_DETAIL_SHA256_HPP_
