// Must not compile: a Decision converts to bool only explicitly.
#include "ratekeeper/decision.hpp"

int main() {
  ratekeeper::Decision d;
  int allowed = d;
  return allowed;
}
