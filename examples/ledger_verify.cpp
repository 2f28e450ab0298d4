// ledger_verify: checks a ratekeeper ledger (one file, or a directory of
// segments) and names its first broken record.
//
//   ledger_verify [--key-file FILE] [--anchor RECORDS:HASH] LEDGER
//
// LEDGER: a ledger file, or a segmented ledger's directory (every segment
// is walked, oldest first, and the chain across them). --key-file: the
// operator's key of a keyed chain (LedgerOptions::key), the file's bytes
// (a trailing newline dropped). --anchor: also check the ledger against a
// head kept elsewhere (Ledger::anchor(): record count and last hash).
//
// Exit 0: every record verifies (a torn last line, left by a crash, is
// reported and is not an error: Ledger::open cuts it). Exit 1: a record's
// hash, chain or sequence is wrong, a segment is missing, cut or out of
// order, or the anchor does not match; the message says which and where.
// Exit 2: bad arguments (a RECORDS that is not a decimal count, a HASH
// that is not 64 characters), or the ledger cannot be read. A LEDGER that
// does not exist is an empty ledger, as Ledger::open would create it:
// "0 records", exit 0.
#include <cstdint>
#include <cstdio>
#include <optional>
#include <string>

#include "absl/strings/numbers.h"
#include "ratekeeper/budget/ledger.hpp"

namespace {

int usage() {
  std::fprintf(stderr,
               "usage: ledger_verify [--key-file FILE] [--anchor N:HASH] "
               "LEDGER\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  ratekeeper::LedgerReadOptions options;
  std::optional<ratekeeper::LedgerAnchor> anchor;
  std::string path;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--key-file" && i + 1 < argc) {
      absl::StatusOr<std::string> key = ratekeeper::read_file(argv[++i]);
      if (!key.ok() || key->empty()) {
        std::fprintf(stderr, "ledger_verify: cannot read the key file %s\n",
                     argv[i]);
        return 2;
      }
      if (key->back() == '\n') key->pop_back();
      options.key = *key;
    } else if (a == "--anchor" && i + 1 < argc) {
      const std::string v = argv[++i];
      const std::size_t colon = v.find(':');
      if (colon == std::string::npos || v.size() != colon + 65) return usage();
      // RECORDS: decimal digits only, within 64 bits (no sign, no spaces).
      const std::string n = v.substr(0, colon);
      std::uint64_t records = 0;
      if (n.empty() || n.find_first_not_of("0123456789") != std::string::npos ||
          !absl::SimpleAtoi(n, &records)) {
        return usage();
      }
      anchor = ratekeeper::LedgerAnchor{records, v.substr(colon + 1)};
    } else if (path.empty() && !a.empty() && a[0] != '-') {
      path = a;
    } else {
      return usage();
    }
  }
  if (path.empty()) return usage();
  const absl::StatusOr<ratekeeper::VerifyResult> v =
      ratekeeper::verify_ledger_file(path, options);
  if (!v.ok()) {
    std::fprintf(stderr, "ledger_verify: %s\n",
                 std::string(v.status().message()).c_str());
    return 2;
  }
  if (!v->ok()) {
    std::printf("%s: BROKEN at %s (%llu records verify before it)\n",
                path.c_str(), v->error.c_str(),
                static_cast<unsigned long long>(v->records));
    return 1;
  }
  if (v->records < v->first_seq) {
    std::printf("%s: 0 records verify", path.c_str());
  } else {
    std::printf("%s: records %llu to %llu verify", path.c_str(),
                static_cast<unsigned long long>(v->first_seq),
                static_cast<unsigned long long>(v->records));
  }
  if (v->segments != 0) {
    std::printf(" in %llu segments",
                static_cast<unsigned long long>(v->segments));
  }
  if (v->first_seq > 1) {
    std::printf(
        " (older segments pruned: the chain starts from the "
        "checkpoint's hash; check it with --anchor)");
  }
  std::printf("%s\n",
              v->torn_tail ? "; a torn last line follows (cut on open)" : "");
  if (anchor) {
    const absl::Status st = ratekeeper::verify_anchor(path, *anchor, options);
    if (!st.ok()) {
      std::printf("%s: ANCHOR %s\n", path.c_str(),
                  std::string(st.message()).c_str());
      return 1;
    }
    std::printf("%s: the anchor at record %llu matches\n", path.c_str(),
                static_cast<unsigned long long>(anchor->records));
  }
  return 0;
}
