// Subject keys: injective whatever bytes the values hold.
#include "ratekeeper/identity.hpp"

#include <random>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "test_util.hpp"

using namespace ratekeeper;

namespace {

// Values built from the bytes that break naive encodings: separators,
// braces, NUL, length-looking digits and bytes with the high bit set.
std::string nasty(std::mt19937_64& rng) {
  static constexpr char kAlphabet[] = {
      ':', '|', '{', '}', '\0', '\n',   '/',    '\\',   '"',
      '0', '1', '9', 'a', ' ',  '\x80', '\xff', '\x01', '\x7f'};
  const std::size_t len = 1 + rng() % 12;
  std::string s;
  for (std::size_t i = 0; i < len; ++i) {
    s.push_back(kAlphabet[rng() % sizeof(kAlphabet)]);
  }
  if (rng() % 50 == 0) s.append(200 + rng() % 300, 'x');  // two-byte lengths
  return s;
}

}  // namespace

TEST_CASE(
    "subject keys are injective over 10,000 random tuples full of "
    "separators",
    "[identity][T8]") {
  const std::uint64_t seed = rk_test::seed_or(0x1D);
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  // Tuples drawn from a small pool of values, so that many share fields and
  // differ only in where the bytes fall.
  std::vector<std::string> pool;
  for (int i = 0; i < 40; ++i) pool.push_back(nasty(rng));
  using Tuple = std::tuple<std::uint8_t, std::string, std::string, std::string,
                           std::string, std::string, std::string>;
  std::set<Tuple> tuples;
  std::set<std::string> keys;
  for (int i = 0; i < 10'000; ++i) {
    const Scope scope =
        Scope::from_bits(static_cast<std::uint8_t>(1 + rng() % 63));
    std::string v[6];
    for (std::size_t f = 0; f < 6; ++f) {
      if (scope.contains(kAllFields[f])) v[f] = pool[rng() % pool.size()];
    }
    const Subject who{v[0], v[1], v[2], v[3], v[4], v[5]};
    const absl::StatusOr<std::string> key = subject_key(scope, who);
    REQUIRE(key.ok());
    // Round trip: the key names exactly the tuple it came from.
    const auto back = parse_subject_key(*key);
    REQUIRE(back.has_value());
    CHECK(back->first == scope);
    for (const Field f : kAllFields) {
      CHECK(back->second.get(f) == (scope.contains(f) ? who.get(f) : ""));
    }
    const bool new_tuple =
        tuples.emplace(scope.bits(), v[0], v[1], v[2], v[3], v[4], v[5]).second;
    const bool new_key = keys.insert(*key).second;
    // Injective: a key is new exactly when its tuple is.
    REQUIRE(new_tuple == new_key);
  }
  CHECK(keys.size() == tuples.size());
  CHECK(keys.size() > 5'000);
}

TEST_CASE("values that a separator encoding would confuse get apart keys",
          "[identity]") {
  const Scope s = Field::kUser | Field::kTeam;
  const auto a = subject_key(s, {.user = "a:b", .team = "c"}).value();
  const auto b = subject_key(s, {.user = "a", .team = "b:c"}).value();
  CHECK(a != b);
  // Different scopes never share a key, even over the same values.
  CHECK(subject_key(Field::kUser, {.user = "x"}).value() !=
        subject_key(Field::kTeam, {.team = "x"}).value());
  // The global scope: one key for everyone.
  CHECK(subject_key(Scope::global(), {}).value() ==
        subject_key(Scope::global(), {.user = "anyone"}).value());
}

TEST_CASE("a missing or oversized field is an error, not a shared key",
          "[identity]") {
  const auto r = subject_key(Field::kTeam, {.user = "u"});
  REQUIRE_FALSE(r.ok());
  CHECK(r.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(std::string(r.status().message()).find("team") != std::string::npos);
  const std::string big(kMaxFieldBytes + 1, 'x');
  CHECK_FALSE(subject_key(Field::kUser, {.user = big}).ok());
  std::string out = "prefix";
  CHECK_FALSE(append_subject_key(Field::kUser, {}, out).ok());
  CHECK(out == "prefix");  // left as it was
}

TEST_CASE("parse_subject_key refuses what no subject encodes to",
          "[identity]") {
  CHECK_FALSE(parse_subject_key("").has_value());
  CHECK_FALSE(parse_subject_key(std::string(1, '\x40')).has_value());
  const std::string k = subject_key(Field::kUser, {.user = "abc"}).value();
  CHECK_FALSE(parse_subject_key(k + "x").has_value());
  CHECK_FALSE(parse_subject_key(k.substr(0, k.size() - 1)).has_value());
  // A zero length, and a non-shortest varint (0x83 0x00 for 3).
  CHECK_FALSE(parse_subject_key(std::string("\x02\x00", 2)).has_value());
  CHECK_FALSE(parse_subject_key(std::string("\x02\x83\x00"
                                            "abc",
                                            6))
                  .has_value());
}
