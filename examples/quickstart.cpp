// The README's ten-line example, kept compiling and running by the tests.
#include <cstdio>

#include "ratekeeper/ratekeeper.hpp"

int main() {
  using namespace ratekeeper;
  // 10 requests per second per user, bursts of up to 20.
  auto bucket = TokenBucket::create(per_second(10), 20);
  if (!bucket.ok()) return 1;  // bad configuration is a Status, not a crash
  Limiter<TokenBucket> limiter(*bucket);

  for (int i = 0; i < 25; ++i) {
    if (auto d = limiter.acquire("user:42"); !d) {
      std::printf("call %d: 429, retry after %lld ns\n", i,
                  static_cast<long long>(d.retry_after.count()));
    }
  }
  return 0;
}
