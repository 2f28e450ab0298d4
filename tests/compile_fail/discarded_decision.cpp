// Must not compile under -Werror: a Decision is [[nodiscard]].
#include "ratekeeper/limiter.hpp"
#include "ratekeeper/policy/token_bucket.hpp"

int main() {
  ratekeeper::Limiter<ratekeeper::TokenBucket> limiter(
      ratekeeper::TokenBucket::create(ratekeeper::per_second(1), 1).value());
  limiter.acquire("k");
  return 0;
}
