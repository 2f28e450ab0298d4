// ratekeeper/budget/ledger.hpp: an append-only, hash-chained JSON-lines log.
//
// Defines Ledger: every record one JSON line,
//
//   {"seq":7,"t":1796083200000000000,"prev":"<sha-256 of record 6>",
//    ...the caller's fields...,"hash":"<sha-256 of this line up to here>"}
//
// written with the caller's durability: kFsyncEach (append returns once the
// record is on disk), kGroupCommit (records written at once, one fdatasync
// every interval for all of them; append returns once its record is
// synced), or kNone (page cache only). An fsync error is returned, and the
// ledger refuses every later append: it never reports success after a
// failed fsync (the kernel may have dropped the pages).
//
// verify_ledger() walks a file and names the first record whose hash, chain
// or sequence is wrong. Ledger::open() cuts a torn last line (a write cut
// short by a crash: no final newline) and refuses a file with any other
// damage (kDataLoss). read_ledger() hands every record to a callback, for
// replay.
//
// Needs OpenSSL's libcrypto (SHA-256) and nlohmann-json (reading records).
#ifndef RATEKEEPER_BUDGET_LEDGER_HPP_
#define RATEKEEPER_BUDGET_LEDGER_HPP_

#include <fcntl.h>
#include <openssl/evp.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "ratekeeper/budget/audit.hpp"
#include "ratekeeper/decision.hpp"
#include "ratekeeper/detail/strings.hpp"

namespace ratekeeper {

enum class Durability : std::uint8_t { kNone, kFsyncEach, kGroupCommit };

struct LedgerOptions {
  Durability durability = Durability::kFsyncEach;
  Nanos group_commit_interval = std::chrono::milliseconds(2);
};

// LedgerFile: where records go; PosixLedgerFile by default, another in
// tests that inject write or sync failures. Calls to write() come one at a
// time; under group commit a sync() may run while a write() does (as
// write(2) and fdatasync(2) may), and covers every write that returned
// before it started.
class LedgerFile {
 public:
  virtual ~LedgerFile() = default;
  virtual absl::Status write(std::string_view bytes) = 0;
  virtual absl::Status sync() = 0;
};

class PosixLedgerFile final : public LedgerFile {
 public:
  static absl::StatusOr<std::unique_ptr<PosixLedgerFile>> open_append(
      const std::string& path) {
    const int fd =
        ::open(path.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) return errno_status("open", path);
    return std::unique_ptr<PosixLedgerFile>(new PosixLedgerFile(fd, path));
  }
  ~PosixLedgerFile() override { ::close(fd_); }

  absl::Status write(std::string_view bytes) override {
    while (!bytes.empty()) {
      const ssize_t n = ::write(fd_, bytes.data(), bytes.size());
      if (n < 0) {
        if (errno == EINTR) continue;
        return errno_status("write", path_);
      }
      bytes.remove_prefix(static_cast<std::size_t>(n));
    }
    return absl::OkStatus();
  }
  absl::Status sync() override {
    if (::fdatasync(fd_) != 0) return errno_status("fdatasync", path_);
    return absl::OkStatus();
  }

  static absl::Status errno_status(const char* what, const std::string& path) {
    const int e = errno;
    return absl::Status(
        absl::ErrnoToStatusCode(e),
        absl::StrCat("ledger ", what, " ", path, ": ", std::strerror(e)));
  }

 private:
  PosixLedgerFile(int fd, std::string path) : fd_(fd), path_(std::move(path)) {}
  int fd_;
  std::string path_;
};

namespace detail {

inline std::string sha256_hex(std::string_view data) {
  std::array<unsigned char, 32> md{};
  unsigned int len = 0;
  EVP_Digest(data.data(), data.size(), md.data(), &len, EVP_sha256(), nullptr);
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out(64, '0');
  for (std::size_t i = 0; i < 32; ++i) {
    out[2 * i] = kHex[md[i] >> 4];
    out[2 * i + 1] = kHex[md[i] & 15];
  }
  return out;
}

inline const std::string& zero_hash() {
  static const std::string z(64, '0');
  return z;
}

constexpr char kHashField[] = ",\"hash\":\"";
constexpr std::size_t kHashFieldLen = sizeof(kHashField) - 1;

}  // namespace detail

// VerifyResult: what verify_ledger found.
//   records       complete records that verified
//   good_bytes    the length of the file up to the end of the last of them
//   torn_tail     the file ends in a line without its newline (a torn write)
//   error         the first broken record (empty when all verify)
struct VerifyResult {
  std::uint64_t records = 0;
  std::uint64_t good_bytes = 0;
  std::string last_hash = detail::zero_hash();
  bool torn_tail = false;
  std::string error;
  bool ok() const { return error.empty(); }
};

// verify_ledger
//
// Checks every complete line: its hash over the line up to the hash field,
// its "prev" equal to the previous record's hash, its "seq" one more than
// the previous. Stops at the first broken record.
//
// `from`: resume after a prefix already verified (its VerifyResult): only
// the bytes from from.good_bytes on are read.
inline VerifyResult verify_ledger(std::string_view text,
                                  const VerifyResult& from = {}) {
  VerifyResult r = from;
  r.torn_tail = false;
  r.error.clear();
  std::size_t pos = from.good_bytes;
  while (pos < text.size()) {
    const std::size_t nl = text.find('\n', pos);
    if (nl == std::string_view::npos) {
      r.torn_tail = true;
      break;
    }
    const std::string_view line = text.substr(pos, nl - pos);
    const std::uint64_t seq = r.records + 1;
    auto broken = [&](std::string_view why) {
      r.error =
          absl::StrCat("record ", seq, " (byte ", pos, "): ", detail::av(why));
    };
    const std::size_t h = line.rfind(detail::kHashField);
    if (h == std::string_view::npos ||
        line.size() != h + detail::kHashFieldLen + 64 + 2 ||
        line.substr(line.size() - 2) != "\"}") {
      broken("no hash field at its end");
      break;
    }
    const std::string_view hash = line.substr(h + detail::kHashFieldLen, 64);
    if (detail::sha256_hex(line.substr(0, h)) != hash) {
      broken("its hash does not match its contents");
      break;
    }
    const std::string head = absl::StrCat("{\"seq\":", seq, ",\"t\":");
    if (line.substr(0, head.size()) != head) {
      broken("its seq is not the next one");
      break;
    }
    std::size_t after_t = head.size();
    if (after_t < line.size() && line[after_t] == '-') ++after_t;
    while (after_t < line.size() && line[after_t] >= '0' &&
           line[after_t] <= '9') {
      ++after_t;
    }
    const std::string prev = absl::StrCat(",\"prev\":\"", r.last_hash, "\"");
    if (line.substr(after_t, prev.size()) != prev) {
      broken("its prev is not the previous record's hash");
      break;
    }
    r.last_hash = std::string(hash);
    ++r.records;
    pos = nl + 1;
    r.good_bytes = pos;
  }
  return r;
}

inline absl::StatusOr<std::string> read_file(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return std::string();
    return PosixLedgerFile::errno_status("open", path);
  }
  std::string out;
  char buf[1 << 16];
  for (;;) {
    const ssize_t n = ::read(fd, buf, sizeof(buf));
    if (n < 0) {
      if (errno == EINTR) continue;
      absl::Status st = PosixLedgerFile::errno_status("read", path);
      ::close(fd);
      return st;
    }
    if (n == 0) break;
    out.append(buf, static_cast<std::size_t>(n));
  }
  ::close(fd);
  return out;
}

// read_ledger
//
// Verifies `path` and hands each record, parsed, to `fn` in order (a torn
// tail is skipped). kDataLoss naming the first broken record otherwise.
inline absl::Status read_ledger(
    const std::string& path,
    const std::function<absl::Status(const nlohmann::json&)>& fn) {
  absl::StatusOr<std::string> text = read_file(path);
  if (!text.ok()) return text.status();
  const VerifyResult v = verify_ledger(*text);
  if (!v.ok()) return absl::DataLossError(absl::StrCat(path, ": ", v.error));
  std::size_t pos = 0;
  while (pos < v.good_bytes) {
    const std::size_t nl = text->find('\n', pos);
    const nlohmann::json j = nlohmann::json::parse(
        text->begin() + static_cast<std::ptrdiff_t>(pos),
        text->begin() + static_cast<std::ptrdiff_t>(nl), nullptr, false);
    if (j.is_discarded()) {
      return absl::DataLossError(
          absl::StrCat(path, ": a record at byte ", pos, " is not JSON"));
    }
    if (absl::Status st = fn(j); !st.ok()) return st;
    pos = nl + 1;
  }
  return absl::OkStatus();
}

// Ledger: appends records. Thread-safe.
class Ledger final : public AuditSink {
 public:
  // open
  //
  // Opens (or creates) `path` for appending after verifying it: a torn last
  // line is cut; any other damage is kDataLoss and nothing is opened.
  static absl::StatusOr<std::unique_ptr<Ledger>> open(
      const std::string& path, LedgerOptions options = {}) {
    absl::StatusOr<std::string> text = read_file(path);
    if (!text.ok()) return text.status();
    const VerifyResult v = verify_ledger(*text);
    if (!v.ok()) {
      return absl::DataLossError(absl::StrCat(path, ": ", v.error));
    }
    if (v.torn_tail &&
        ::truncate(path.c_str(), static_cast<off_t>(v.good_bytes)) != 0) {
      return PosixLedgerFile::errno_status("truncate", path);
    }
    absl::StatusOr<std::unique_ptr<PosixLedgerFile>> f =
        PosixLedgerFile::open_append(path);
    if (!f.ok()) return f.status();
    return std::unique_ptr<Ledger>(
        new Ledger(*std::move(f), options, v.records, v.last_hash));
  }

  // With a file of your own (tests inject failures), starting a new chain.
  static std::unique_ptr<Ledger> with_file(std::unique_ptr<LedgerFile> file,
                                           LedgerOptions options = {}) {
    return std::unique_ptr<Ledger>(
        new Ledger(std::move(file), options, 0, detail::zero_hash()));
  }

  ~Ledger() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    if (syncer_.joinable()) syncer_.join();
  }

  // append
  //
  // Writes one record: `fields` is the inside of a JSON object (without
  // braces), e.g. "\"event\":\"settle\",\"cost_nanos\":150". Returns its
  // sequence number once as durable as the options say; an error otherwise,
  // and for every append after a failed write or sync.
  absl::StatusOr<std::uint64_t> append(std::string_view fields,
                                       Nanos t) override {
    std::unique_lock<std::mutex> lock(mu_);
    if (!failed_.ok()) return failed_;
    const std::uint64_t seq = seq_ + 1;
    std::string line = absl::StrCat(
        "{\"seq\":", seq, ",\"t\":", t.count(), ",\"prev\":\"", last_hash_,
        "\"", fields.empty() ? "" : ",", detail::av(fields));
    const std::string hash = detail::sha256_hex(line);
    absl::StrAppend(&line, detail::kHashField, hash, "\"}\n");
    if (absl::Status st = file_->write(line); !st.ok()) {
      failed_ = st;
      return st;
    }
    seq_ = seq;
    last_hash_ = hash;
    switch (options_.durability) {
      case Durability::kNone:
        return seq;
      case Durability::kFsyncEach:
        if (absl::Status st = file_->sync(); !st.ok()) {
          failed_ = st;
          return st;
        }
        synced_ = seq;
        return seq;
      case Durability::kGroupCommit:
        if (seq == synced_ + 1) cv_.notify_all();  // the syncer may be idle
        cv_.wait(lock, [&] { return synced_ >= seq || !failed_.ok(); });
        if (synced_ >= seq) return seq;
        return failed_;
    }
    return seq;
  }

  std::uint64_t last_seq() const {
    std::lock_guard<std::mutex> lock(mu_);
    return seq_;
  }

 private:
  Ledger(std::unique_ptr<LedgerFile> file, LedgerOptions options,
         std::uint64_t seq, std::string last_hash)
      : file_(std::move(file)),
        options_(options),
        seq_(seq),
        synced_(seq),
        last_hash_(std::move(last_hash)) {
    if (options_.durability == Durability::kGroupCommit) {
      syncer_ = std::thread([this] { group_commit(); });
    }
  }

  // At most one sync per interval, for every record written before it
  // starts. The sync runs outside mu_: appends go on writing meanwhile, and
  // the next sync covers them.
  void group_commit() {
    std::unique_lock<std::mutex> lock(mu_);
    auto next = std::chrono::steady_clock::now();
    while (!stop_) {
      if (seq_ == synced_ || !failed_.ok() ||
          std::chrono::steady_clock::now() < next) {
        cv_.wait_until(lock, seq_ == synced_
                                 ? std::chrono::steady_clock::now() +
                                       options_.group_commit_interval
                                 : next);
        continue;
      }
      const std::uint64_t upto = seq_;
      next = std::chrono::steady_clock::now() + options_.group_commit_interval;
      lock.unlock();
      const absl::Status st = file_->sync();
      lock.lock();
      if (st.ok()) {
        synced_ = std::max(synced_, upto);
      } else if (failed_.ok()) {
        failed_ = st;
      }
      cv_.notify_all();
    }
  }

  std::unique_ptr<LedgerFile> file_;
  const LedgerOptions options_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::uint64_t seq_;
  std::uint64_t synced_;
  std::string last_hash_;
  absl::Status failed_;
  bool stop_ = false;
  std::thread syncer_;
};

}  // namespace ratekeeper

#endif  // RATEKEEPER_BUDGET_LEDGER_HPP_
