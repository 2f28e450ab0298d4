// ratekeeper/store/redis.hpp: the Redis layer's umbrella under its first
// name, kept so that existing includes build. The Redis layer is not a store
// of store/store.hpp (it sits above chains, policies and budget periods):
// new code includes ratekeeper/redis.hpp, or one header of ratekeeper/redis/.
#ifndef RATEKEEPER_STORE_REDIS_HPP_
#define RATEKEEPER_STORE_REDIS_HPP_

#include "ratekeeper/redis.hpp"

#endif  // RATEKEEPER_STORE_REDIS_HPP_
