// ratekeeper/budget/ledger.hpp: an append-only, hash-chained JSON-lines log.
//
// Defines Ledger: every record one JSON line,
//
//   {"seq":7,"t":1796083200000000000,"prev":"<sha-256 of record 6>",
//    ...the caller's fields...,"hash":"<sha-256 of this line up to here>"}
//
// written with the caller's durability: kFsyncEach (append returns once the
// record is on disk), kGroupCommit (records written at once, one fdatasync
// for all records written while the previous one ran, from a thread of its
// own; append returns once its record is synced), or kNone (page cache
// only). append_nowait writes without waiting (the accountant's denials,
// releases and reserves); wait_durable waits for one record, with none of
// the caller's locks held. An fsync error is returned, and the ledger
// refuses every later append: it never reports success after a failed
// fsync (the kernel may have dropped the pages).
//
// One writer: open() takes an exclusive flock(2) on the file (a second
// open, in this process or another, is kFailedPrecondition), and fsyncs
// the directory after creating the file (so the file's name survives a
// crash, not only its contents). Reading is streamed (a bounded buffer,
// never the whole file in memory).
//
// verify_ledger() walks a file and names the first record whose hash, chain
// or sequence is wrong. Ledger::open() cuts a torn last line (a write cut
// short by a crash: no final newline) and refuses a file with any other
// damage (kDataLoss). read_ledger() hands every record to a callback, for
// replay.
//
// Keyed chain: with LedgerOptions::key set, each hash is an HMAC-SHA-256
// under the operator's key, so that an edit re-chained without the key
// does not verify (verify with the same key, LedgerReadOptions::key).
//
// Needs OpenSSL's libcrypto (SHA-256) and nlohmann-json (reading records).
#ifndef RATEKEEPER_BUDGET_LEDGER_HPP_
#define RATEKEEPER_BUDGET_LEDGER_HPP_

#include <fcntl.h>
#include <linux/futex.h>
#include <openssl/evp.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
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
#include "ratekeeper/detail/sha256.hpp"
#include "ratekeeper/detail/strings.hpp"

namespace ratekeeper {

enum class Durability : std::uint8_t { kNone, kFsyncEach, kGroupCommit };

struct LedgerOptions {
  Durability durability = Durability::kFsyncEach;
  // kGroupCommit: the least time between the starts of two syncs. 0 (the
  // default): a sync starts as soon as a record waits and the previous sync
  // has ended, so each covers every record written while the last one ran.
  Nanos group_commit_interval = Nanos{0};
  // kGroupCommit: records nobody waits for (append_nowait) are synced at
  // the latest this long after they were written.
  Nanos lazy_sync_after = std::chrono::milliseconds(50);
  // Non-empty: a keyed chain, each record's hash an HMAC-SHA-256 under this
  // key (the operator's secret; the same key reads and verifies it).
  std::string key = std::string();
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
  // open_append
  //
  // Opens (or creates) `path` for appending, holding an exclusive flock(2)
  // on it until closed: kFailedPrecondition when another open file (here or
  // in another process) holds it. A file it creates has its directory
  // fsynced before this returns.
  static absl::StatusOr<std::unique_ptr<PosixLedgerFile>> open_append(
      const std::string& path) {
    struct stat st {};
    const bool existed = ::stat(path.c_str(), &st) == 0;
    const int fd =
        ::open(path.c_str(), O_RDWR | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) return errno_status("open", path);
    if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
      const int e = errno;
      ::close(fd);
      if (e == EWOULDBLOCK) {
        return absl::FailedPreconditionError(absl::StrCat(
            "ledger ", path,
            ": another writer holds it (flock); one ledger has one writer"));
      }
      errno = e;
      return errno_status("flock", path);
    }
    if (!existed) {
      if (absl::Status s = sync_dir_of(path); !s.ok()) {
        ::close(fd);
        return s;
      }
    }
    return std::unique_ptr<PosixLedgerFile>(new PosixLedgerFile(fd, path));
  }

  // fsyncs the directory holding `path` (its entry, after a create).
  static absl::Status sync_dir_of(const std::string& path) {
    const std::size_t slash = path.rfind('/');
    const std::string dir = slash == std::string::npos ? std::string(".")
                            : slash == 0               ? std::string("/")
                                                       : path.substr(0, slash);
    const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0) return errno_status("open directory", dir);
    const int rc = ::fsync(dfd);
    const int e = errno;
    ::close(dfd);
    if (rc != 0) {
      errno = e;
      return errno_status("fsync directory", dir);
    }
    return absl::OkStatus();
  }

  int fd() const noexcept { return fd_; }
  const std::string& path() const noexcept { return path_; }

  // Cuts the file to `size` bytes (a torn last line) and syncs it.
  absl::Status truncate(std::uint64_t size) {
    if (::ftruncate(fd_, static_cast<off_t>(size)) != 0 ||
        ::fdatasync(fd_) != 0) {
      return errno_status("truncate", path_);
    }
    return absl::OkStatus();
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

// A record's hash: SHA-256 (OpenSSL), or with an operator's key
// HMAC-SHA-256 (detail/sha256.hpp).
inline std::string chain_hash(std::string_view key, std::string_view data) {
  if (key.empty()) return sha256_hex(data);
  return to_hex(hmac_sha256(key, data));
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

namespace detail {

// Checks one complete line (without its newline) at byte `pos` against the
// state in `r` and advances it; false, with r.error set, when it is broken.
inline bool check_record(VerifyResult& r, std::string_view line,
                         std::uint64_t pos, std::string_view key = {}) {
  const std::uint64_t seq = r.records + 1;
  auto broken = [&](std::string_view why) {
    r.error = absl::StrCat("record ", seq, " (byte ", pos, "): ", av(why));
    return false;
  };
  const std::size_t h = line.rfind(kHashField);
  if (h == std::string_view::npos ||
      line.size() != h + kHashFieldLen + 64 + 2 ||
      line.substr(line.size() - 2) != "\"}") {
    return broken("no hash field at its end");
  }
  const std::string_view hash = line.substr(h + kHashFieldLen, 64);
  if (chain_hash(key, line.substr(0, h)) != hash) {
    return broken("its hash does not match its contents");
  }
  const std::string head = absl::StrCat("{\"seq\":", seq, ",\"t\":");
  if (line.substr(0, head.size()) != head) {
    return broken("its seq is not the next one");
  }
  std::size_t after_t = head.size();
  if (after_t < line.size() && line[after_t] == '-') ++after_t;
  while (after_t < line.size() && line[after_t] >= '0' &&
         line[after_t] <= '9') {
    ++after_t;
  }
  const std::string prev = absl::StrCat(",\"prev\":\"", r.last_hash, "\"");
  if (line.substr(after_t, prev.size()) != prev) {
    return broken("its prev is not the previous record's hash");
  }
  r.last_hash = std::string(hash);
  ++r.records;
  r.good_bytes = pos + line.size() + 1;
  return true;
}

// LineReader: the complete lines of a file, read with pread(2) in chunks
// into one buffer that holds at most a chunk or twice the longest line,
// whichever is more: memory bounded whatever the file's size.
class LineReader {
 public:
  LineReader(int fd, std::string path, std::uint64_t from,
             std::size_t chunk = std::size_t{1} << 16)
      : fd_(fd), path_(std::move(path)), off_(from), line_off_(from) {
    buf_.resize(std::max<std::size_t>(chunk, 16));
  }

  // The next complete line (without its newline) in `line`, its byte
  // offset in `pos`: true; false at the end (torn() when bytes were left
  // without a newline).
  absl::StatusOr<bool> next(std::string_view& line, std::uint64_t& pos) {
    for (;;) {
      const char* b = buf_.data() + begin_;
      const void* nl = std::memchr(b, '\n', end_ - begin_);
      if (nl != nullptr) {
        const std::size_t len =
            static_cast<std::size_t>(static_cast<const char*>(nl) - b);
        line = std::string_view(b, len);
        pos = line_off_;
        begin_ += len + 1;
        line_off_ += len + 1;
        return true;
      }
      if (eof_) {
        torn_ = end_ > begin_;
        return false;
      }
      // Keep the partial line, at the front; grow only when one line
      // fills the whole buffer.
      if (begin_ > 0) {
        std::memmove(buf_.data(), buf_.data() + begin_, end_ - begin_);
        end_ -= begin_;
        begin_ = 0;
      }
      if (end_ == buf_.size()) buf_.resize(buf_.size() * 2);
      const ssize_t n = ::pread(fd_, buf_.data() + end_, buf_.size() - end_,
                                static_cast<off_t>(off_));
      if (n < 0) {
        if (errno == EINTR) continue;
        return PosixLedgerFile::errno_status("read", path_);
      }
      if (n == 0) eof_ = true;
      end_ += static_cast<std::size_t>(n);
      off_ += static_cast<std::uint64_t>(n);
      bytes_read_ += static_cast<std::uint64_t>(n);
    }
  }

  bool torn() const noexcept { return torn_; }
  std::size_t capacity() const noexcept { return buf_.size(); }
  std::uint64_t bytes_read() const noexcept { return bytes_read_; }

 private:
  int fd_;
  std::string path_;
  std::uint64_t off_;       // of the next pread
  std::uint64_t line_off_;  // of buf_[begin_]
  std::string buf_;
  std::size_t begin_ = 0, end_ = 0;
  bool eof_ = false, torn_ = false;
  std::uint64_t bytes_read_ = 0;
};

// Verifies the file open as `fd` from `from` on, streamed.
inline absl::StatusOr<VerifyResult> verify_fd(int fd, const std::string& path,
                                              const VerifyResult& from,
                                              std::size_t chunk,
                                              std::size_t* capacity,
                                              std::string_view key = {}) {
  VerifyResult r = from;
  r.torn_tail = false;
  r.error.clear();
  LineReader in(fd, path, from.good_bytes, chunk);
  std::string_view line;
  std::uint64_t pos = 0;
  for (;;) {
    absl::StatusOr<bool> more = in.next(line, pos);
    if (!more.ok()) return more.status();
    if (!*more) break;
    if (!check_record(r, line, pos, key)) break;
  }
  r.torn_tail = r.ok() && in.torn();
  if (capacity != nullptr) *capacity = std::max(*capacity, in.capacity());
  return r;
}

}  // namespace detail

// verify_ledger
//
// Checks every complete line: its hash over the line up to the hash field,
// its "prev" equal to the previous record's hash, its "seq" one more than
// the previous. Stops at the first broken record.
//
// `from`: resume after a prefix already verified (its VerifyResult): only
// the bytes from from.good_bytes on are read.
//
// `key`: the key of a keyed chain (LedgerOptions::key).
inline VerifyResult verify_ledger(std::string_view text,
                                  const VerifyResult& from = {},
                                  std::string_view key = {}) {
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
    if (!detail::check_record(r, text.substr(pos, nl - pos), pos, key)) break;
    pos = nl + 1;
  }
  return r;
}

// LedgerReadOptions: how files are read. chunk: the read size and the
// smallest buffer (the buffer grows past it only for a longer line).
// stats, if set, receives the largest buffer used and the bytes read.
struct LedgerReadStats {
  std::size_t max_buffer = 0;
  std::uint64_t bytes_read = 0;
};
// key: the key of a keyed chain (LedgerOptions::key).
struct LedgerReadOptions {
  std::size_t chunk = std::size_t{1} << 16;
  LedgerReadStats* stats = nullptr;
  std::string key = std::string();
};

// verify_ledger_file
//
// verify_ledger on the file at `path`, streamed in bounded memory (a file
// that does not exist verifies, empty).
inline absl::StatusOr<VerifyResult> verify_ledger_file(
    const std::string& path, LedgerReadOptions options = {}) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return VerifyResult{};
    return PosixLedgerFile::errno_status("open", path);
  }
  std::size_t cap = 0;
  absl::StatusOr<VerifyResult> v =
      detail::verify_fd(fd, path, {}, options.chunk, &cap, options.key);
  ::close(fd);
  if (options.stats != nullptr) {
    options.stats->max_buffer = std::max(options.stats->max_buffer, cap);
    if (v.ok()) options.stats->bytes_read += v->good_bytes;
  }
  return v;
}

// LedgerAnchor: a ledger's head, to keep where the ledger's writer cannot
// rewrite it (another host, a WORM bucket, a signed log): how many records
// it had and the hash of the last. Ledger::anchor() takes one;
// verify_anchor() checks a file against it.
struct LedgerAnchor {
  std::uint64_t records = 0;
  std::string hash = detail::zero_hash();
};

// verify_anchor
//
// OK when the file at `path` verifies up to record `anchor.records` and
// that record's hash is `anchor.hash` (records after it are not looked
// at). kDataLoss when it has fewer records (its tail was cut), when that
// record's hash differs (a record up to it was rewritten, even if the
// whole chain was recomputed), or when the chain breaks before it.
inline absl::Status verify_anchor(const std::string& path,
                                  const LedgerAnchor& anchor,
                                  LedgerReadOptions options = {}) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0 && errno != ENOENT) {
    return PosixLedgerFile::errno_status("open", path);
  }
  VerifyResult r;
  if (fd >= 0) {
    detail::LineReader in(fd, path, 0, options.chunk);
    std::string_view line;
    std::uint64_t pos = 0;
    while (r.records < anchor.records) {
      absl::StatusOr<bool> more = in.next(line, pos);
      if (!more.ok()) {
        ::close(fd);
        return more.status();
      }
      if (!*more || !detail::check_record(r, line, pos, options.key)) break;
    }
    ::close(fd);
  }
  if (!r.ok()) return absl::DataLossError(absl::StrCat(path, ": ", r.error));
  if (r.records < anchor.records) {
    return absl::DataLossError(
        absl::StrCat(path, ": ", r.records, " records, the anchor has ",
                     anchor.records, ": the ledger's tail was cut"));
  }
  if (r.last_hash != anchor.hash) {
    return absl::DataLossError(absl::StrCat(
        path, ": record ", anchor.records,
        "'s hash is not the anchor's: the ledger was rewritten up to it"));
  }
  return absl::OkStatus();
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
// tail is skipped). kDataLoss naming the first broken record otherwise,
// before any record is handed on. Two streamed passes (verify, then read)
// in a bounded buffer: memory does not grow with the file.
inline absl::Status read_ledger(
    const std::string& path,
    const std::function<absl::Status(const nlohmann::json&)>& fn,
    LedgerReadOptions options = {}) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return absl::OkStatus();
    return PosixLedgerFile::errno_status("open", path);
  }
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  std::size_t cap = 0;
  absl::StatusOr<VerifyResult> v =
      detail::verify_fd(fd, path, {}, options.chunk, &cap, options.key);
  if (!v.ok()) return v.status();
  if (!v->ok()) return absl::DataLossError(absl::StrCat(path, ": ", v->error));
  detail::LineReader in(fd, path, 0, options.chunk);
  std::string_view line;
  std::uint64_t pos = 0;
  while (pos < v->good_bytes) {
    absl::StatusOr<bool> more = in.next(line, pos);
    if (!more.ok()) return more.status();
    if (!*more || pos >= v->good_bytes) break;
    const nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded()) {
      return absl::DataLossError(
          absl::StrCat(path, ": a record at byte ", pos, " is not JSON"));
    }
    if (absl::Status st = fn(j); !st.ok()) return st;
  }
  if (options.stats != nullptr) {
    options.stats->max_buffer =
        std::max({options.stats->max_buffer, cap, in.capacity()});
    options.stats->bytes_read += v->good_bytes + in.bytes_read();
  }
  return absl::OkStatus();
}

namespace detail {

// Futex waits on a 32-bit atomic (Linux): the ledger's waiters and its
// syncer sleep in the kernel with no mutex to re-take on waking (a
// condition variable's waiters would queue on its mutex, which every
// append takes). futex_wait returns at once when `*a != expected`, on a
// wake, on a signal, or after `timeout` (negative: none); callers re-check.
inline void futex_wait(std::atomic<std::uint32_t>& a, std::uint32_t expected,
                       Nanos timeout = Nanos{-1}) {
  static_assert(sizeof(std::atomic<std::uint32_t>) == sizeof(std::uint32_t));
  struct timespec ts {};
  struct timespec* tp = nullptr;
  if (timeout.count() >= 0) {
    ts.tv_sec = static_cast<time_t>(timeout.count() / 1'000'000'000);
    ts.tv_nsec = static_cast<long>(timeout.count() % 1'000'000'000);
    tp = &ts;
  }
  ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&a), FUTEX_WAIT_PRIVATE,
            expected, tp, nullptr, 0);
}
inline void futex_wake(std::atomic<std::uint32_t>& a, int n) {
  ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&a), FUTEX_WAKE_PRIVATE,
            n, nullptr, nullptr, 0);
}

// SHA-256 of records as they are appended: the digest fetched once and one
// context reused (OpenSSL 3 otherwise looks the algorithm up, under a
// global lock, on every EVP_Digest), hex written into a caller's buffer:
// no allocation per record.
class RecordHasher {
 public:
  RecordHasher() : ctx_(EVP_MD_CTX_new()) {}
  ~RecordHasher() { EVP_MD_CTX_free(ctx_); }
  RecordHasher(const RecordHasher&) = delete;
  RecordHasher& operator=(const RecordHasher&) = delete;

  // The hex hash of `data` (chain_hash's) into out[0..64).
  void hash(std::string_view key, std::string_view data, char* out) {
    static constexpr char kHex[] = "0123456789abcdef";
    if (!key.empty()) {
      const Digest256 d = hmac_sha256(key, data);
      for (std::size_t i = 0; i < 32; ++i) {
        out[2 * i] = kHex[d[i] >> 4];
        out[2 * i + 1] = kHex[d[i] & 15];
      }
      return;
    }
    std::array<unsigned char, 32> md{};
    unsigned int len = 0;
    if (ctx_ == nullptr || EVP_DigestInit_ex(ctx_, sha256_md(), nullptr) != 1 ||
        EVP_DigestUpdate(ctx_, data.data(), data.size()) != 1 ||
        EVP_DigestFinal_ex(ctx_, md.data(), &len) != 1) {
      EVP_Digest(data.data(), data.size(), md.data(), &len, EVP_sha256(),
                 nullptr);
    }
    for (std::size_t i = 0; i < 32; ++i) {
      out[2 * i] = kHex[md[i] >> 4];
      out[2 * i + 1] = kHex[md[i] & 15];
    }
  }

 private:
  static const EVP_MD* sha256_md() {
#if OPENSSL_VERSION_NUMBER >= 0x30000000L
    static EVP_MD* const md = EVP_MD_fetch(nullptr, "SHA256", nullptr);
    if (md != nullptr) return md;
#endif
    return EVP_sha256();
  }
  EVP_MD_CTX* ctx_;
};

}  // namespace detail

// Ledger: appends records. Thread-safe.
class Ledger final : public AuditSink {
 public:
  // open
  //
  // Opens (or creates) `path` for appending after verifying it (streamed):
  // a torn last line is cut; any other damage is kDataLoss and nothing is
  // opened. kFailedPrecondition while another Ledger (here or in another
  // process) has the file open.
  static absl::StatusOr<std::unique_ptr<Ledger>> open(
      const std::string& path, LedgerOptions options = {}) {
    absl::StatusOr<std::unique_ptr<PosixLedgerFile>> f =
        PosixLedgerFile::open_append(path);
    if (!f.ok()) return f.status();
    absl::StatusOr<VerifyResult> v = detail::verify_fd(
        (*f)->fd(), path, {}, std::size_t{1} << 16, nullptr, options.key);
    if (!v.ok()) return v.status();
    if (!v->ok()) {
      return absl::DataLossError(absl::StrCat(path, ": ", v->error));
    }
    if (v->torn_tail) {
      if (absl::Status st = (*f)->truncate(v->good_bytes); !st.ok()) return st;
    }
    return std::unique_ptr<Ledger>(
        new Ledger(*std::move(f), options, v->records, v->last_hash));
  }

  // With a file of your own (tests inject failures), starting a new chain.
  static std::unique_ptr<Ledger> with_file(std::unique_ptr<LedgerFile> file,
                                           LedgerOptions options = {}) {
    return std::unique_ptr<Ledger>(
        new Ledger(std::move(file), options, 0, detail::zero_hash()));
  }

  ~Ledger() override {
    stop_.store(true);
    kick_syncer();
    if (syncer_.joinable()) syncer_.join();
    // Records nobody waited for (denials, releases) are synced on a clean
    // close too.
    std::lock_guard<std::mutex> lock(mu_);
    if (options_.durability != Durability::kNone && !failed_flag_.load() &&
        seq_ > synced_.load()) {
      static_cast<void>(file_->sync());
    }
  }

  // append
  //
  // Writes one record: `fields` is the inside of a JSON object (without
  // braces), e.g. "\"event\":\"settle\",\"cost_nanos\":150". Returns its
  // sequence number once as durable as the options say; an error otherwise,
  // and for every append after a failed write or sync.
  absl::StatusOr<std::uint64_t> append(std::string_view fields,
                                       Nanos t) override {
    absl::StatusOr<std::uint64_t> seq = append_nowait(fields, t);
    if (!seq.ok()) return seq;
    if (absl::Status st = wait_durable(*seq); !st.ok()) return st;
    return seq;
  }

  // append_nowait
  //
  // Writes one record (to the page cache) and returns its sequence number
  // without waiting for a sync; wait_durable(seq) waits for it. Under
  // kGroupCommit a record nobody waits for is synced within
  // lazy_sync_after; otherwise with the next record waited for. The line is
  // built in a buffer the ledger keeps (no allocation per record once it
  // has grown to the longest line).
  absl::StatusOr<std::uint64_t> append_nowait(std::string_view fields,
                                              Nanos t) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (failed_flag_.load(std::memory_order_relaxed)) return failed_;
    const std::uint64_t seq = seq_ + 1;
    std::string& line = line_;
    line.clear();
    absl::StrAppend(&line, "{\"seq\":", seq, ",\"t\":", t.count(),
                    ",\"prev\":\"", last_hash_, "\"");
    if (!fields.empty()) {
      line += ',';
      line.append(fields.data(), fields.size());
    }
    char hash[64];
    hasher_.hash(options_.key, line, hash);
    line.append(detail::kHashField, detail::kHashFieldLen);
    line.append(hash, sizeof(hash));
    line.append("\"}\n", 3);
    if (absl::Status st = file_->write(line); !st.ok()) {
      fail(st);
      return st;
    }
    if (seq_ == synced_.load()) {
      first_unsynced_.store(steady_nanos(), std::memory_order_relaxed);
    }
    seq_ = seq;
    last_hash_.assign(hash, sizeof(hash));
    // Published after the write: a sync that reads it covers the record.
    written_.store(seq);
    // A syncer asleep with nothing to sync is woken (seq_cst both sides:
    // either it reads this record or this reads its state), so that a
    // record nobody waits for is synced within lazy_sync_after.
    if (syncer_state_.load() == kIdle) kick_syncer();
    return seq;
  }

  // wait_durable
  //
  // Returns once record `seq` and every one before it are synced (kNone:
  // at once), or the sync's error. Concurrent waiters share one sync: it
  // covers every record written before it started. Waiters hold no lock:
  // they sleep on a futex that the sync's end wakes, all at once.
  absl::Status wait_durable(std::uint64_t seq) override {
    if (options_.durability == Durability::kNone) return failed_status();
    bool registered = false;
    for (;;) {
      // The epoch is read before the checks: a sync that ends after them
      // changes it, and the futex wait below returns at once.
      const std::uint32_t e = epoch_.load();
      if (synced_.load() >= seq) return absl::OkStatus();
      if (failed_flag_.load()) return failed_status();
      if (options_.durability == Durability::kFsyncEach) {
        // This caller syncs, unless a sync is running (it may not cover
        // this record: wait for its end, then look again).
        std::lock_guard<std::mutex> sync_lock(sync_mu_);
        if (synced_.load() < seq && !failed_flag_.load()) sync_once();
        continue;
      }
      if (!registered) {
        registered = true;
        register_waiter();
        continue;
      }
      detail::futex_wait(epoch_, e);
    }
  }

  std::uint64_t last_seq() const {
    std::lock_guard<std::mutex> lock(mu_);
    return seq_;
  }

  // The head now (every record written, synced or not): store it outside
  // the ledger's reach, and check the file later with verify_anchor().
  LedgerAnchor anchor() const {
    std::lock_guard<std::mutex> lock(mu_);
    return LedgerAnchor{seq_, last_hash_};
  }

  // How many syncs the ledger has made (for tests and benchmarks).
  std::uint64_t syncs() const { return syncs_.load(); }

 private:
  Ledger(std::unique_ptr<LedgerFile> file, LedgerOptions options,
         std::uint64_t seq, std::string last_hash)
      : file_(std::move(file)),
        options_(options),
        seq_(seq),
        last_hash_(std::move(last_hash)),
        written_(seq),
        synced_(seq) {
    if (options_.durability == Durability::kGroupCommit) {
      syncer_ = std::thread([this] { group_commit(); });
    }
  }

  static std::int64_t steady_nanos() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(
               std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }

  absl::Status failed_status() const {
    if (!failed_flag_.load()) return absl::OkStatus();
    std::lock_guard<std::mutex> lock(mu_);
    return failed_;
  }

  // The first error wins; the flag is set after the status, so that a
  // reader who sees it finds the status (read under mu_).
  void fail(const absl::Status& st) {
    if (failed_.ok()) failed_ = st;
    failed_flag_.store(true);
  }

  // One sync of every record written so far, with no lock held but
  // sync_mu_ (one sync at a time; appends go on writing meanwhile, the next
  // sync covers them). Waiters are woken at its end, all at once.
  void sync_once() {
    const std::uint64_t upto = written_.load();
    const absl::Status st = file_->sync();
    syncs_.fetch_add(1);
    if (st.ok()) {
      // Only forward: a sync never reports less than one before it.
      std::uint64_t cur = synced_.load();
      while (cur < upto && !synced_.compare_exchange_weak(cur, upto)) {
      }
    } else {
      std::lock_guard<std::mutex> lock(mu_);
      fail(st);
    }
    epoch_.fetch_add(1);
    detail::futex_wake(epoch_, INT_MAX);
  }

  // The syncer's states, for waiters deciding whether to wake it: awake;
  // asleep until woken (nothing to sync); asleep with a deadline (lazy
  // records, the interval); gathering a batch (asleep until `population_`
  // waiters have come, or a deadline).
  enum SyncerState : std::uint32_t { kAwake, kIdle, kTimed, kGathering };

  // A waiter counts itself and wakes the syncer if it sleeps for want of
  // it: always, unless it is gathering a batch that this waiter does not
  // complete (it wakes at its deadline anyway).
  void register_waiter() {
    const std::uint32_t n = pending_.fetch_add(1) + 1;
    const std::uint32_t state = syncer_state_.load();
    if (state == kAwake) return;
    if (state == kGathering && n < population_.load()) return;
    kick_syncer();
  }

  void kick_syncer() {
    kick_.fetch_add(1);
    detail::futex_wake(kick_, 1);
  }

  // The group syncer. A sync starts when a waiter's record is unsynced and
  // the previous sync has ended (and group_commit_interval has passed since
  // the last start), covering every record written until it starts; records
  // nobody waits for are synced within lazy_sync_after. Batching: after a
  // sync, the waiters it released usually write again at once, while those
  // who came during it already wait; the next sync waits for as many
  // waiters as both together (the batch's population), for at most half
  // the last sync's time, so that they share one sync rather than
  // alternating between two half-full ones. With a fast disk that wait is
  // a few microseconds.
  void group_commit() {
    std::int64_t next_start = 0;       // group_commit_interval
    std::int64_t gather_deadline = 0;  // the batch's wait, at the latest
    while (!stop_.load()) {
      const std::uint32_t k = kick_.load();
      // Set before reading what waits (seq_cst both sides): a waiter that
      // reads an older state came before these reads, which see it.
      syncer_state_.store(kIdle);
      const std::uint64_t written = written_.load();
      const std::uint32_t waiting = pending_.load();
      if (stop_.load()) break;
      if (written == synced_.load() || failed_flag_.load()) {
        detail::futex_wait(kick_, k);
        continue;
      }
      const std::int64_t now = steady_nanos();
      if (waiting == 0) {
        const std::int64_t due =
            first_unsynced_.load(std::memory_order_relaxed) +
            options_.lazy_sync_after.count();
        if (now < due) {
          syncer_state_.store(kTimed);
          if (pending_.load() == 0) {
            detail::futex_wait(kick_, k, Nanos{due - now});
          }
          continue;
        }
      }
      if (now < next_start) {
        syncer_state_.store(kTimed);
        detail::futex_wait(kick_, k, Nanos{next_start - now});
        continue;
      }
      if (waiting != 0 && waiting < population_.load() &&
          now < gather_deadline) {
        syncer_state_.store(kGathering);
        if (pending_.load() < population_.load()) {
          detail::futex_wait(kick_, k, Nanos{gather_deadline - now});
        }
        continue;
      }
      syncer_state_.store(kAwake);
      next_start = now + options_.group_commit_interval.count();
      // The waiters counted here wrote before this: the sync covers them.
      const std::uint32_t batch = pending_.exchange(0);
      sync_once();
      const std::int64_t end = steady_nanos();
      population_.store(batch + pending_.load());
      gather_deadline = end + (end - now) / 2;
      if (written_.load() != synced_.load()) {
        first_unsynced_.store(end, std::memory_order_relaxed);
      }
    }
    syncer_state_.store(kAwake);
  }

  std::unique_ptr<LedgerFile> file_;
  const LedgerOptions options_;
  // mu_: the writer's (one record at a time, in order); also the first
  // error's status.
  mutable std::mutex mu_;
  std::uint64_t seq_;  // the last record written
  std::string last_hash_;
  std::string line_;  // the record being written
  detail::RecordHasher hasher_;
  absl::Status failed_;
  // Read without mu_:
  std::atomic<std::uint64_t> written_;  // seq_, once its record is written
  std::atomic<std::uint64_t> synced_;   // every record up to it is durable
  std::atomic<bool> failed_flag_{false};
  std::atomic<std::uint64_t> syncs_{0};
  std::atomic<std::int64_t> first_unsynced_{0};  // steady clock, ns
  // Waiters sleep on epoch_ (one more after each sync); the syncer on kick_.
  std::atomic<std::uint32_t> epoch_{0};
  std::atomic<std::uint32_t> kick_{0};
  std::atomic<std::uint32_t> pending_{0};     // waiters since a sync began
  std::atomic<std::uint32_t> population_{0};  // the last batch's waiters
  std::atomic<std::uint32_t> syncer_state_{kAwake};
  std::atomic<bool> stop_{false};
  std::mutex sync_mu_;  // kFsyncEach: one sync at a time
  std::thread syncer_;
};

}  // namespace ratekeeper

#endif  // RATEKEEPER_BUDGET_LEDGER_HPP_
