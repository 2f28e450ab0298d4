// Must compile: the control for the compile-fail tests (same flags).
#include "ratekeeper/limiter.hpp"
#include "ratekeeper/policy/token_bucket.hpp"

int main() {
  ratekeeper::Limiter<ratekeeper::TokenBucket> limiter(
      ratekeeper::TokenBucket::create(ratekeeper::per_second(1), 1).value());
  return limiter.acquire("k") ? 0 : 1;
}
