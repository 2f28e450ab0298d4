// Decision and the rate helpers.
#include "ratekeeper/decision.hpp"

#include <type_traits>

#include "test_util.hpp"

using namespace ratekeeper;

static_assert(!std::is_convertible_v<Decision, bool>,
              "operator bool is explicit: a Decision is not an int");
static_assert(std::is_constructible_v<bool, Decision>);
static_assert(std::is_trivially_copyable_v<Decision>);

TEST_CASE("rate helpers", "[decision]") {
  CHECK(per_second(5) == Rate{5, std::chrono::seconds(1)});
  CHECK(per_minute(5).period == std::chrono::minutes(1));
  CHECK(per_hour(5).period == std::chrono::hours(1));
  CHECK(per_day(7).period == std::chrono::hours(24));
  CHECK(per_day(7).count == 7);
  CHECK(per(3, std::chrono::milliseconds(250)) == Rate{3, Nanos{250'000'000}});
}

TEST_CASE("a decision tests as its allowed flag", "[decision]") {
  const Decision yes{true, 10, 9, Nanos{0}, Nanos{5}};
  const Decision no{false, 10, 0, Nanos{7}, Nanos{9}};
  CHECK(static_cast<bool>(yes));
  CHECK_FALSE(static_cast<bool>(no));
  CHECK_FALSE(no.never());
  const Decision never{false, 10, 10, kNever, Nanos{0}};
  CHECK(never.never());
  CHECK(kNever == Nanos::max());
}
