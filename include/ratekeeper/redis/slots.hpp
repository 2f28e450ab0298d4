// ratekeeper/redis/slots.hpp: Redis Cluster's hash slots.
#ifndef RATEKEEPER_REDIS_SLOTS_HPP_
#define RATEKEEPER_REDIS_SLOTS_HPP_

#include <cstdint>
#include <string_view>

namespace ratekeeper::detail {

// The Redis Cluster slot of `key`: CRC16 (XMODEM) of the key, or of its
// hash tag (the bytes between the first '{' and the next '}', if any), mod
// 16384.
inline std::uint16_t crc16(std::string_view s) noexcept {
  std::uint16_t crc = 0;
  for (const char ch : s) {
    crc =
        static_cast<std::uint16_t>(crc ^ (static_cast<unsigned char>(ch) << 8));
    for (int i = 0; i < 8; ++i) {
      crc = static_cast<std::uint16_t>((crc & 0x8000) != 0 ? (crc << 1) ^ 0x1021
                                                           : crc << 1);
    }
  }
  return crc;
}
inline std::uint16_t key_slot(std::string_view key) noexcept {
  const std::size_t open = key.find('{');
  if (open != std::string_view::npos) {
    const std::size_t close = key.find('}', open + 1);
    if (close != std::string_view::npos && close != open + 1) {
      key = key.substr(open + 1, close - open - 1);
    }
  }
  return static_cast<std::uint16_t>(crc16(key) % 16384);
}

}  // namespace ratekeeper::detail

#endif  // RATEKEEPER_REDIS_SLOTS_HPP_
