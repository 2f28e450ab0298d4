// ratekeeper/redis/scripts.hpp: the Lua scripts the Redis layer runs.
//
// Defines:
//   RedisScript          a script's source and the SHA1 Redis gave it
//   detail::redis_script()     the one script of every policy and budget
//   detail::redis_tb_script()  a TokenBucket's single acquire or peek
//
// The sources are lua/*.lua in the source tree; CMake turns them into
// ratekeeper/redis/lua_scripts.hpp (cmake/ratekeeper_lua.cmake), installed
// with the other headers (docs/redis.md, "The scripts").
#ifndef RATEKEEPER_REDIS_SCRIPTS_HPP_
#define RATEKEEPER_REDIS_SCRIPTS_HPP_

#include <string>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "ratekeeper/detail/mutex.hpp"
#include "ratekeeper/redis/lua_scripts.hpp"

namespace ratekeeper {

namespace detail {
class Connector;  // connection.hpp: loads scripts, keeps their SHA1
}  // namespace detail

// A script: its source, and the SHA1 Redis gave it once loaded.
class RedisScript {
 public:
  explicit RedisScript(std::string source) : source_(std::move(source)) {}
  const std::string& source() const noexcept { return source_; }

 private:
  friend class detail::Connector;
  std::string source_;
  mutable detail::Mutex mu_;
  mutable std::string sha_ ABSL_GUARDED_BY(mu_);
};

namespace detail {

// The one script (every policy, single operations and chains).
inline const RedisScript& redis_script() {
  static const RedisScript s{std::string(lua::kScript)};
  return s;
}

// A TokenBucket's single acquire or peek (no charge-on-reject).
inline const RedisScript& redis_tb_script() {
  static const RedisScript s{std::string(lua::kTokenBucketScript)};
  return s;
}

}  // namespace detail

}  // namespace ratekeeper

#endif  // RATEKEEPER_REDIS_SCRIPTS_HPP_
