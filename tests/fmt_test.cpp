// {fmt} formatting of ratekeeper's types.
#include "ratekeeper/fmt.hpp"

#include "test_util.hpp"

using namespace ratekeeper;

TEST_CASE("durations print in their largest exact unit", "[fmt]") {
  CHECK(format_nanos(Nanos{0}) == "0ns");
  CHECK(format_nanos(Nanos{999}) == "999ns");
  CHECK(format_nanos(Nanos{1500}) == "1.5us");
  CHECK(format_nanos(Nanos{64'910'331'843}) == "64.910331843s");
  CHECK(format_nanos(Nanos{-2'500'000}) == "-2.5ms");
  CHECK(format_nanos(Nanos{2'000}) == "2us");
  CHECK(format_nanos(Nanos{250'000'000}) == "250ms");
  CHECK(format_nanos(std::chrono::minutes(2)) == "120s");
  CHECK(format_nanos(kNever) == "never");
}

TEST_CASE("decisions and stats format", "[fmt]") {
  const Decision d{false, 20, 0, Nanos{100'000'000}, std::chrono::seconds(2)};
  CHECK(fmt::format("{}", d) ==
        "denied limit=20 remaining=0 retry_after=100ms reset_after=2s");
  StoreStats s;
  s.keys = 3;
  s.denied_full = 1;
  CHECK(fmt::format("{}", s) ==
        "keys=3 inserts=0 reclaimed=0 sweeps=0 evicted=0 denied_full=1 "
        "admitted_uncounted=0 cas_retries=0");
}
