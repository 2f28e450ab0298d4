// A consumer of an installed ratekeeper: builds, links and gets a decision.
#include <cstdio>

#include "ratekeeper/fmt.hpp"
#include "ratekeeper/ratekeeper.hpp"
#ifdef RK_CONSUMER_REDIS
// The Redis layer's scripts are generated from lua/*.lua when ratekeeper is
// configured and installed with the headers: an installed package (or a
// source tree taken in) must hold them.
#  include <string_view>

#  include "ratekeeper/store/redis.hpp"
#endif

int main() {
  auto bucket = ratekeeper::TokenBucket::create(ratekeeper::per_second(2), 2);
  if (!bucket.ok()) return 1;
  ratekeeper::ManualClock clock;
  ratekeeper::Limiter<ratekeeper::TokenBucket, ratekeeper::InMemoryStore,
                      ratekeeper::ManualClock>
      limiter(*bucket, clock);
  const bool ok = limiter.acquire("k").allowed &&
                  limiter.acquire("k").allowed && !limiter.acquire("k").allowed;
  fmt::print("consumer: {}\n", limiter.peek("k"));
#ifdef RK_CONSUMER_REDIS
  const std::string_view lua = ratekeeper::detail::redis_script().source();
  const std::string_view tb = ratekeeper::detail::redis_tb_script().source();
  const bool scripts =
      lua.find("local function token_bucket(") != std::string_view::npos &&
      tb.find("redis.call('TIME')") != std::string_view::npos;
  fmt::print("consumer: Redis scripts of {} and {} bytes\n", lua.size(),
             tb.size());
  return ok && scripts ? 0 : 1;
#else
  return ok ? 0 : 1;
#endif
}
