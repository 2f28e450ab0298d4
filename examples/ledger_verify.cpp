// ledger_verify: checks a ratekeeper ledger and names its first broken
// record.
//
//   ledger_verify FILE
//
// Exit 0: every record verifies (a torn last line, left by a crash, is
// reported and is not an error: Ledger::open cuts it). Exit 1: a record's
// hash, chain or sequence is wrong; the message says which and where.
// Exit 2: the file cannot be read.
#include <cstdio>
#include <string>

#include "ratekeeper/budget/ledger.hpp"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: ledger_verify FILE\n");
    return 2;
  }
  const absl::StatusOr<std::string> text = ratekeeper::read_file(argv[1]);
  if (!text.ok()) {
    std::fprintf(stderr, "ledger_verify: %s\n",
                 std::string(text.status().message()).c_str());
    return 2;
  }
  const ratekeeper::VerifyResult v = ratekeeper::verify_ledger(*text);
  if (!v.ok()) {
    std::printf("%s: BROKEN at %s (%llu records verify before it)\n", argv[1],
                v.error.c_str(), static_cast<unsigned long long>(v.records));
    return 1;
  }
  std::printf("%s: %llu records verify%s\n", argv[1],
              static_cast<unsigned long long>(v.records),
              v.torn_tail ? "; a torn last line follows (cut on open)" : "");
  return 0;
}
