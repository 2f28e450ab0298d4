// Must not compile: an int is not a Policy.
#include "ratekeeper/limiter.hpp"

int main() {
  ratekeeper::Limiter<int> limiter(0);
  return 0;
}
