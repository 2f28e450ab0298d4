// The README's ten-line example, kept compiling and running by the tests.
#include <cstdio>

#include "ratekeeper/ratekeeper.hpp"

int main() {
  using namespace ratekeeper;
  // 60,000 tokens per minute per user, bursts of up to 60,000.
  auto bucket = TokenBucket::create(per_minute(60'000), 60'000);
  if (!bucket.ok()) return 1;  // bad configuration is a Status, not a crash
  Limiter<TokenBucket> limiter(*bucket);

  const Cost prompt_tokens = 1'200, max_tokens = 4'000;
  for (int i = 0; i < 20; ++i) {
    Taken t = limiter.take("user:42", prompt_tokens + max_tokens);
    if (!t) {
      std::printf("call %d: 429, retry after %lld ns\n", i,
                  static_cast<long long>(t.decision.retry_after.count()));
      continue;
    }
    // The provider's usage: the prompt and some of max_tokens. Settling the
    // receipt gives back the unused part (or charges an excess).
    const Cost used = prompt_tokens + 900;
    if (auto left = limiter.settle(t.receipt, used); left.ok()) {
      std::printf("call %d: used %llu tokens, %llu left\n", i,
                  static_cast<unsigned long long>(used),
                  static_cast<unsigned long long>(left->remaining));
    }
  }
  return 0;
}
