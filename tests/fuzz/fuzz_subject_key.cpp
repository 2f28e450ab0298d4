// libFuzzer target (TESTPLAN T8): subject key encoding.
//
// Any bytes: if parse_subject_key accepts them, encoding what it read gives
// the same bytes back (one tuple, one key). And the input read as a tuple
// (fields split on 0xFF) encodes to a key that parses back to that tuple.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "ratekeeper/identity.hpp"

namespace rk = ratekeeper;

namespace {
void check(bool ok) {
  if (!ok) std::abort();
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data,
                                      std::size_t size) {
  const std::string_view in(reinterpret_cast<const char*>(data), size);
  if (const auto parsed = rk::parse_subject_key(in)) {
    const auto again = rk::subject_key(parsed->first, parsed->second);
    check(again.ok() && *again == in);
  }
  if (size == 0) return 0;
  const rk::Scope scope = rk::Scope::from_bits(data[0]);
  std::string_view fields[6];
  std::string_view rest = in.substr(1);
  for (std::string_view& f : fields) {
    const std::size_t cut = rest.find('\xFF');
    f = rest.substr(0, cut);
    rest = cut == std::string_view::npos ? std::string_view()
                                         : rest.substr(cut + 1);
  }
  const rk::Subject who{fields[0], fields[1], fields[2],
                        fields[3], fields[4], fields[5]};
  const auto key = rk::subject_key(scope, who);
  if (!key.ok()) {
    // Only a field of the scope that is empty or too long is refused.
    bool empty = false;
    for (const rk::Field f : rk::kAllFields) {
      if (scope.contains(f) &&
          (who.get(f).empty() || who.get(f).size() > rk::kMaxFieldBytes)) {
        empty = true;
      }
    }
    check(empty);
    return 0;
  }
  const auto back = rk::parse_subject_key(*key);
  check(back.has_value() && back->first == scope);
  for (const rk::Field f : rk::kAllFields) {
    check(back->second.get(f) ==
          (scope.contains(f) ? who.get(f) : std::string_view()));
  }
  return 0;
}
