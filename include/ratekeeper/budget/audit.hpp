// ratekeeper/budget/audit.hpp: where the accountant writes its records.
//
// Defines AuditSink, what the accountant needs from a ledger: append a
// record, and say when it is durable (append waits; append_nowait and
// wait_durable split the two, so that a caller waits outside its locks). Ledger
// (ledger.hpp) is the file-backed, hash-chained one; a test or an embedder may
// supply another. Kept apart so that the accountant needs neither OpenSSL nor
// nlohmann.
#ifndef RATEKEEPER_BUDGET_AUDIT_HPP_
#define RATEKEEPER_BUDGET_AUDIT_HPP_

#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "ratekeeper/decision.hpp"
#include "ratekeeper/detail/strings.hpp"

namespace ratekeeper {

class AuditSink {
 public:
  virtual ~AuditSink() = default;
  // Appends one record (`fields`: the inside of a JSON object) at time `t`;
  // returns its sequence number once durable, or why it is not.
  virtual absl::StatusOr<std::uint64_t> append(std::string_view fields,
                                               Nanos t) = 0;
  // Writes one record without waiting for it to be durable (denials,
  // releases and reserves, which are not money); returns its sequence
  // number, for wait_durable. Records keep their order: a record written
  // before another is durable no later than it. The default is append (a
  // sink with nothing cheaper).
  virtual absl::StatusOr<std::uint64_t> append_nowait(std::string_view fields,
                                                      Nanos t) {
    return append(fields, t);
  }
  // Returns once record `seq` (and every one before it) is durable, or why
  // it cannot be. Called with no lock of the caller held, so that one
  // flush covers every record written meanwhile. Default: already durable.
  virtual absl::Status wait_durable(std::uint64_t seq) {
    static_cast<void>(seq);
    return absl::OkStatus();
  }
};

namespace detail {
// `s` as a JSON string literal, quotes included; bytes outside printable
// ASCII as \u00XX, so any key or id stays one valid line.
inline void append_json_quoted(std::string& out, std::string_view s) {
  out.push_back('"');
  for (const char c : s) {
    const auto u = static_cast<unsigned char>(c);
    if (c == '"' || c == '\\') {
      out.push_back('\\');
      out.push_back(c);
    } else if (u < 0x20 || u >= 0x7F) {
      out += "\\u00";
      append_hex(out, std::string_view(&c, 1));
    } else {
      out.push_back(c);
    }
  }
  out.push_back('"');
}
}  // namespace detail

}  // namespace ratekeeper

#endif  // RATEKEEPER_BUDGET_AUDIT_HPP_
