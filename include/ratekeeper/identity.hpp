// ratekeeper/identity.hpp: limit keys from who is calling.
//
// Defines:
//   Field    one attribute of a caller: API key, user, team, org, model, IP.
//   Scope    the set of fields a limit is counted per: "tokens per day per
//            team" is Scope(Field::kTeam); "requests per user per model" is
//            Field::kUser | Field::kModel.
//   Subject  the caller's values, authenticated by you (never taken from a
//            header the client controls).
//   subject_key / append_subject_key
//            the key of a subject under a scope: injective, so no two
//            different tuples share a key whatever bytes they hold.
//   parse_subject_key
//            the inverse, for tools and tests.
//
// The encoding: one byte naming the scope's fields, then for each field in
// the scope, in Field order, its length as a LEB128 varint and its bytes.
// Every key therefore says how to read itself, and reading is unambiguous:
// no separator a value could contain, no escaping to get wrong.
#ifndef RATEKEEPER_IDENTITY_HPP_
#define RATEKEEPER_IDENTITY_HPP_

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "ratekeeper/detail/strings.hpp"

namespace ratekeeper {

enum class Field : std::uint8_t {
  kApiKey = 1,
  kUser = 2,
  kTeam = 4,
  kOrg = 8,
  kModel = 16,
  kIp = 32,
};

inline constexpr std::array<Field, 6> kAllFields = {
    Field::kApiKey, Field::kUser,  Field::kTeam,
    Field::kOrg,    Field::kModel, Field::kIp};

constexpr std::string_view field_name(Field f) noexcept {
  switch (f) {
    case Field::kApiKey:
      return "api_key";
    case Field::kUser:
      return "user";
    case Field::kTeam:
      return "team";
    case Field::kOrg:
      return "org";
    case Field::kModel:
      return "model";
    case Field::kIp:
      return "ip";
  }
  return "?";
}

// Scope: a set of Fields. The empty scope is one key for every caller (a
// global pool).
class Scope {
 public:
  constexpr Scope() = default;
  constexpr Scope(Field f) noexcept  // NOLINT: a field is a scope of one
      : bits_(static_cast<std::uint8_t>(f)) {}
  static constexpr Scope global() noexcept { return Scope(); }
  static constexpr Scope from_bits(std::uint8_t b) noexcept {
    Scope s;
    s.bits_ = static_cast<std::uint8_t>(b & 0x3F);
    return s;
  }

  constexpr bool contains(Field f) const noexcept {
    return (bits_ & static_cast<std::uint8_t>(f)) != 0;
  }
  constexpr std::uint8_t bits() const noexcept { return bits_; }

  friend constexpr Scope operator|(Scope a, Scope b) noexcept {
    return from_bits(static_cast<std::uint8_t>(a.bits_ | b.bits_));
  }
  friend constexpr bool operator==(Scope, Scope) = default;

 private:
  std::uint8_t bits_ = 0;
};

constexpr Scope operator|(Field a, Field b) noexcept {
  return Scope(a) | Scope(b);
}

// Subject: the values of a caller. Empty means "not known": a limit scoped
// by a field the subject lacks is an error, never a bucket shared by every
// caller without it. `ip` is the text of ip_key() (ratekeeper/ip.hpp).
//
// A Subject holds views, like std::string_view: the strings it names must
// outlive it. `Subject{.user = absl::StrCat("u", n)}` names a temporary that
// is gone at the end of the line; keep the string in a variable first.
struct Subject {
  std::string_view api_key{};
  std::string_view user{};
  std::string_view team{};
  std::string_view org{};
  std::string_view model{};
  std::string_view ip{};

  // The member holding field `f`: one mapping, for reading and writing.
  static constexpr std::string_view Subject::*member(Field f) noexcept {
    switch (f) {
      case Field::kApiKey:
        return &Subject::api_key;
      case Field::kUser:
        return &Subject::user;
      case Field::kTeam:
        return &Subject::team;
      case Field::kOrg:
        return &Subject::org;
      case Field::kModel:
        return &Subject::model;
      case Field::kIp:
        return &Subject::ip;
    }
    return &Subject::api_key;  // unreachable: every Field is listed
  }

  constexpr std::string_view get(Field f) const noexcept {
    return this->*member(f);
  }
};

// Longest value of one field, in bytes.
inline constexpr std::size_t kMaxFieldBytes = 4096;

// append_subject_key
//
// Appends the key of `who` under `scope` to `out`. kInvalidArgument when a
// field of the scope is empty or longer than kMaxFieldBytes; `out` is then
// left as it was.
inline absl::Status append_subject_key(Scope scope, const Subject& who,
                                       std::string& out) {
  const std::size_t start = out.size();
  out.push_back(static_cast<char>(scope.bits()));
  for (const Field f : kAllFields) {
    if (!scope.contains(f)) continue;
    const std::string_view v = who.get(f);
    if (v.empty() || v.size() > kMaxFieldBytes) {
      out.resize(start);
      if (v.empty()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "the limit is counted per ", detail::av(field_name(f)),
            ", and the caller has no ", detail::av(field_name(f))));
      }
      return absl::InvalidArgumentError(
          absl::StrCat(detail::av(field_name(f)), " is ", v.size(),
                       " bytes; at most ", kMaxFieldBytes, " are accepted"));
    }
    std::size_t n = v.size();
    do {
      const auto byte = static_cast<unsigned char>(n & 0x7F);
      n >>= 7;
      out.push_back(static_cast<char>(n != 0 ? (byte | 0x80) : byte));
    } while (n != 0);
    out.append(v);
  }
  return absl::OkStatus();
}

// subject_key
//
// The key of `who` under `scope`, or the error of append_subject_key.
inline absl::StatusOr<std::string> subject_key(Scope scope,
                                               const Subject& who) {
  std::string out;
  if (absl::Status st = append_subject_key(scope, who, out); !st.ok()) {
    return st;
  }
  return out;
}

// parse_subject_key
//
// The scope and values a key was made from (views into `key`), or nullopt
// when `key` is not exactly one encoded key.
inline std::optional<std::pair<Scope, Subject>> parse_subject_key(
    std::string_view key) {
  if (key.empty()) return std::nullopt;
  const auto bits = static_cast<std::uint8_t>(key[0]);
  if ((bits & ~0x3Fu) != 0) return std::nullopt;
  const Scope scope = Scope::from_bits(bits);
  Subject who;
  std::size_t i = 1;
  for (const Field f : kAllFields) {
    if (!scope.contains(f)) continue;
    std::size_t n = 0;
    int shift = 0;
    for (;;) {
      if (i >= key.size() || shift > 14) return std::nullopt;
      const auto byte = static_cast<unsigned char>(key[i++]);
      n |= static_cast<std::size_t>(byte & 0x7F) << shift;
      shift += 7;
      if ((byte & 0x80) == 0) {
        // The shortest encoding only, so that one tuple has one key.
        if (byte == 0 && shift > 7) return std::nullopt;
        break;
      }
    }
    if (n == 0 || n > kMaxFieldBytes || key.size() - i < n) {
      return std::nullopt;
    }
    const std::string_view v = key.substr(i, n);
    i += n;
    who.*Subject::member(f) = v;
  }
  if (i != key.size()) return std::nullopt;
  return std::make_pair(scope, who);
}

}  // namespace ratekeeper

#endif  // RATEKEEPER_IDENTITY_HPP_
