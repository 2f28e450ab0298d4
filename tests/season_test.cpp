// season_test: WeeklyProfile (budget/season.hpp) against a brute-force
// integral, minute by minute, and known calendar dates.
#include "ratekeeper/budget/season.hpp"

#include <catch2/catch.hpp>
#include <limits>
#include <random>
#include <vector>

namespace rk = ratekeeper;
using rk::Nanos;

namespace {

constexpr std::int64_t kMinute = 60'000'000'000;
// 2026-12-07T00:00:00Z, a Monday.
constexpr std::int64_t kMonday = 1796601600LL * 1'000'000'000;

// The integral of the weights over [from, to), a minute at a time (both on
// minute boundaries), from the hour of the week computed by hand.
double brute_mass(const std::vector<double>& w, std::int64_t from,
                  std::int64_t to, std::int64_t offset_ns) {
  double sum = 0;
  double total = 0;
  for (double x : w) total += x;
  for (std::int64_t t = from; t < to; t += kMinute) {
    // Days since the epoch (a Thursday), shifted to local time.
    std::int64_t local = t + offset_ns;
    std::int64_t hours = local / (60 * kMinute);
    if (local % (60 * kMinute) < 0) --hours;
    std::int64_t how = (hours + 72) % 168;
    if (how < 0) how += 168;
    sum += w[static_cast<std::size_t>(how)] * 168.0 / total / 60.0;
  }
  return sum;
}

}  // namespace

TEST_CASE("WeeklyProfile: hours of the week from known dates", "[i18]") {
  const rk::WeeklyProfile flat = rk::WeeklyProfile::flat();
  CHECK(flat.hour_of(Nanos{kMonday}) == 0);
  CHECK(flat.hour_of(Nanos{kMonday - 1}) == 167);  // Sunday 23:59
  CHECK(flat.hour_of(Nanos{kMonday + 30 * 60 * kMinute}) == 30);  // Tue 06:00
  CHECK(flat.hour_of(Nanos{0}) == 72);  // 1970-01-01 was a Thursday
  std::vector<double> w(168, 1.0);
  auto paris = rk::WeeklyProfile::from_weights(w, std::chrono::minutes{60});
  REQUIRE(paris.ok());
  // Sunday 23:00 UTC is Monday 00:00 at +01:00.
  CHECK(paris->hour_of(Nanos{kMonday - 60 * kMinute}) == 0);
}

TEST_CASE("WeeklyProfile: mass agrees with a minute-by-minute integral",
          "[i18]") {
  std::mt19937_64 rng(18);
  for (int round = 0; round < 20; ++round) {
    std::vector<double> w(168);
    std::uniform_real_distribution<double> u(0.0, 5.0);
    for (double& x : w) x = (rng() % 7 == 0) ? 0.0 : u(rng);
    const std::int64_t offset_min =
        static_cast<std::int64_t>(rng() % 1439) - 719;
    auto p =
        rk::WeeklyProfile::from_weights(w, std::chrono::minutes{offset_min});
    REQUIRE(p.ok());
    double mean = 0;
    for (double x : p->weights()) mean += x;
    CHECK(mean / 168.0 == Approx(1.0));
    for (int k = 0; k < 10; ++k) {
      const std::int64_t from =
          kMonday +
          (static_cast<std::int64_t>(rng() % 40000) - 20000) * kMinute;
      const std::int64_t to =
          from + static_cast<std::int64_t>(rng() % 30000) * kMinute;
      const double want = brute_mass(w, from, to, offset_min * kMinute);
      CHECK(p->mass(Nanos{from}, Nanos{to}) ==
            Approx(want).margin(1e-6).epsilon(1e-9));
    }
    // Any whole week weighs 168; an empty or reversed span 0.
    const std::int64_t start =
        kMonday + static_cast<std::int64_t>(rng() % 1000000) * 1'000'000;
    CHECK(p->mass(Nanos{start}, Nanos{start + rk::WeeklyProfile::kWeekNs}) ==
          Approx(168.0));
    CHECK(p->mass(Nanos{start}, Nanos{start}) == 0.0);
    CHECK(p->mass(Nanos{start + 5}, Nanos{start}) == 0.0);
  }
  // Before the epoch too.
  const rk::WeeklyProfile flat = rk::WeeklyProfile::flat();
  CHECK(flat.mass(Nanos{-kMonday}, Nanos{-kMonday + 90 * kMinute}) ==
        Approx(1.5));
}

TEST_CASE("WeeklyProfile: bad weights are refused", "[i18]") {
  CHECK(rk::WeeklyProfile::from_weights(std::vector<double>(167, 1.0))
            .status()
            .code() == absl::StatusCode::kInvalidArgument);
  std::vector<double> w(168, 0.0);
  CHECK_FALSE(rk::WeeklyProfile::from_weights(w).ok());
  w[3] = -1;
  w[4] = 2;
  CHECK_FALSE(rk::WeeklyProfile::from_weights(w).ok());
  w[3] = std::nan("");
  CHECK_FALSE(rk::WeeklyProfile::from_weights(w).ok());
  w[3] = 1;
  CHECK(rk::WeeklyProfile::from_weights(w).ok());
  CHECK_FALSE(
      rk::WeeklyProfile::from_weights(w, std::chrono::minutes{24 * 60}).ok());
}

TEST_CASE("WeeklyProfile: the ends of the int64 range", "[i18]") {
  // INT64_MAX ns after the epoch is Friday 2262-04-11 23:47:16 UTC: hour
  // 4 x 24 + 23 = 119 of its week. No sum overflows (UBSan would say).
  const rk::WeeklyProfile flat = rk::WeeklyProfile::flat();
  constexpr std::int64_t kMax = std::numeric_limits<std::int64_t>::max();
  constexpr std::int64_t kMin = std::numeric_limits<std::int64_t>::min();
  CHECK(flat.hour_of(Nanos{kMax}) == 119);
  // INT64_MIN is 1677-09-21 00:12:43.145224192 UTC, a Tuesday: hour 24.
  CHECK(flat.hour_of(Nanos{kMin}) == 24);
  CHECK(flat.mass(Nanos{kMax - 2 * 3'600'000'000'000}, Nanos{kMax}) ==
        Approx(2.0).epsilon(1e-6));
  CHECK(flat.mass(Nanos{kMin}, Nanos{kMin + 3'600'000'000'000}) ==
        Approx(1.0).epsilon(1e-6));
  auto p = rk::WeeklyProfile::from_weights(std::vector<double>(168, 1.0),
                                           std::chrono::minutes{23 * 60});
  REQUIRE(p.ok());
  CHECK(p->hour_of(Nanos{kMax}) == (119 + 23) % 168);
}
