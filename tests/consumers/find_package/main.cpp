// A consumer of an installed ratekeeper: builds, links and gets a decision.
#include <cstdio>

#include "ratekeeper/fmt.hpp"
#include "ratekeeper/ratekeeper.hpp"

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
  return ok ? 0 : 1;
}
