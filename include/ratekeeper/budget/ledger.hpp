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
// Segments: a ledger may be a directory of segment files, rotated by size
// or record age, the chain running on across them, with checkpoint records
// of the books (LedgerBooks) so that open and read_ledger read only from
// the last checkpoint on (docs/budgets.md: file layout, what verify
// detects across segments, pruning).
//
// Needs OpenSSL's libcrypto (SHA-256) and nlohmann-json (reading records).
#ifndef RATEKEEPER_BUDGET_LEDGER_HPP_
#define RATEKEEPER_BUDGET_LEDGER_HPP_

#include <dirent.h>
#include <fcntl.h>
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
#include <cstdio>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "ratekeeper/budget/audit.hpp"
#include "ratekeeper/decision.hpp"
#include "ratekeeper/detail/append_file.hpp"
#include "ratekeeper/detail/futex.hpp"
#include "ratekeeper/detail/sha256.hpp"
#include "ratekeeper/detail/strings.hpp"

namespace ratekeeper {

enum class Durability : std::uint8_t { kNone, kFsyncEach, kGroupCommit };

// LedgerBooks: what a segmented ledger's checkpoints hold. apply() is handed
// every record in order (a checkpoint record first, when replay starts from
// one: it loads the books it holds); books() is the state after the last
// one, a JSON value, written into the next checkpoint record. The Ledger
// owns one (ReplayBooks over an Accountant::replica()) and feeds it the
// records of each segment it closes, on a thread of its own.
class LedgerBooks {
 public:
  virtual ~LedgerBooks() = default;
  virtual absl::Status apply(const nlohmann::json& record) = 0;
  virtual std::string books() = 0;
};

// ReplayBooks: LedgerBooks over anything with replay(json) and
// checkpoint_books() (an Accountant that only replays).
template <class Replayer>
class ReplayBooks final : public LedgerBooks {
 public:
  explicit ReplayBooks(std::unique_ptr<Replayer> r) : r_(std::move(r)) {}
  absl::Status apply(const nlohmann::json& record) override {
    return r_->replay(record);
  }
  std::string books() override { return r_->checkpoint_books(); }
  Replayer& replayer() { return *r_; }

 private:
  std::unique_ptr<Replayer> r_;
};

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
  // Segments: the ledger is a directory of segment files, each named by the
  // sequence number of its first record (00000000000000000001.jsonl, ...).
  // The active one is closed and a new one started before a record once it
  // holds segment_bytes or more, or once the record's time is segment_age
  // or more after the time of its first record (the ledger's clock: the
  // times records carry). 0: no rotation by that measure. A ledger opened
  // on a directory, or with either set, or with `books`, is segmented.
  std::uint64_t segment_bytes = 0;
  Nanos segment_age = Nanos{0};
  // Books for checkpoints (segmented only): at each rotation the records of
  // the closed segment are applied to these books, on a thread of the
  // ledger's, and a checkpoint record holding them is appended to the new
  // segment. Opening and replaying then read from the last checkpoint on.
  std::shared_ptr<LedgerBooks> books = nullptr;
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

// PosixLedgerFile: a ledger file on disk, written through the durable-log
// writer it shares with the settle journal (detail/append_file.hpp: a
// record appended whole or not at all, EINTR and short writes resumed,
// fdatasync), plus what only the ledger does: one writer, by flock(2).
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
    absl::StatusOr<detail::AppendFile> f = detail::AppendFile::open(
        path, kErrors, {.access = O_RDWR, .mode = 0644});
    if (!f.ok()) return f.status();
    if (::flock(f->fd(), LOCK_EX | LOCK_NB) != 0) {
      const int e = errno;
      if (e == EWOULDBLOCK) return another_writer(path);
      return kErrors(e, "flock", path);
    }
    return std::unique_ptr<PosixLedgerFile>(new PosixLedgerFile(*std::move(f)));
  }

  // fsyncs the directory holding `path` (its entry, after a create).
  static absl::Status sync_dir_of(const std::string& path) {
    return detail::sync_dir_of(path, kErrors);
  }

  int fd() const noexcept { return file_.fd(); }
  const std::string& path() const noexcept { return file_.path(); }

  // Cuts the file to `size` bytes (a torn last line) and syncs it.
  absl::Status truncate(std::uint64_t size) {
    return file_.truncate(size, true, "truncate");
  }

  absl::Status write(std::string_view bytes) override {
    return file_.append(bytes);
  }
  absl::Status sync() override { return file_.sync(); }

  // An exclusive flock(2) on `fd` (open on `path`) for ledger `ledger`;
  // otherwise `fd` is closed and the status says why: kFailedPrecondition
  // when another writer holds it.
  static absl::Status lock_or_close(int fd, const std::string& ledger,
                                    const std::string& path) {
    if (::flock(fd, LOCK_EX | LOCK_NB) == 0) return absl::OkStatus();
    const int e = errno;
    ::close(fd);
    if (e == EWOULDBLOCK) return another_writer(ledger);
    return kErrors(e, "flock", path);
  }

  static absl::Status errno_status(const char* what, const std::string& path) {
    return kErrors(errno, what, path);
  }

 private:
  // "ledger <what> <path>: <strerror>", the errno's own status code.
  static constexpr detail::FileErrors kErrors{"ledger "};

  static absl::Status another_writer(const std::string& ledger) {
    return absl::FailedPreconditionError(absl::StrCat(
        "ledger ", ledger,
        ": another writer holds it (flock); one ledger has one writer"));
  }

  explicit PosixLedgerFile(detail::AppendFile f) : file_(std::move(f)) {}
  detail::AppendFile file_;
};

namespace detail {

inline std::string sha256_hex(std::string_view data) {
  std::array<unsigned char, 32> md{};
  unsigned int len = 0;
  EVP_Digest(data.data(), data.size(), md.data(), &len, EVP_sha256(), nullptr);
  std::string out(64, '0');
  hex_into(std::string_view(reinterpret_cast<const char*>(md.data()), 32),
           out.data());
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
//   first_seq     the first record verified (above 1 when the segments
//                 before a checkpoint were pruned)
//   segments      segment files walked (segmented ledgers)
struct VerifyResult {
  std::uint64_t records = 0;
  std::uint64_t good_bytes = 0;
  std::string last_hash = detail::zero_hash();
  bool torn_tail = false;
  std::string error;
  std::uint64_t first_seq = 1;
  std::uint64_t segments = 0;
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
// from_checkpoint (segmented ledgers): read_ledger starts at the last
// checkpoint (handed on first) rather than at the oldest segment.
struct LedgerReadOptions {
  std::size_t chunk = std::size_t{1} << 16;
  LedgerReadStats* stats = nullptr;
  std::string key = std::string();
  bool from_checkpoint = true;
};

namespace detail {

// One segment file of a segmented ledger: the sequence number of its first
// record (its name) and its path.
struct Segment {
  std::uint64_t first = 0;
  std::string path;
};

inline std::string segment_name(std::uint64_t first) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%020llu.jsonl",
                static_cast<unsigned long long>(first));
  return buf;
}

inline bool is_directory(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

// The segments in `dir`, oldest first (other files are ignored); none when
// it does not exist.
inline absl::StatusOr<std::vector<Segment>> list_segments(
    const std::string& dir) {
  std::vector<Segment> out;
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) {
    if (errno == ENOENT) return out;
    return PosixLedgerFile::errno_status("open directory", dir);
  }
  while (const dirent* e = ::readdir(d)) {
    const std::string_view name(e->d_name);
    if (name.size() != 26 || name.substr(20) != ".jsonl") continue;
    // Twenty digits naming a number of 64 bits: anything else (a name
    // above 2^64 - 1 included, which would wrap onto a real segment's
    // number) is not a segment.
    std::uint64_t first = 0;
    bool digits = true;
    for (std::size_t i = 0; i < 20 && digits; ++i) {
      if (name[i] < '0' || name[i] > '9' ||
          __builtin_mul_overflow(first, 10, &first) ||
          __builtin_add_overflow(
              first, static_cast<std::uint64_t>(name[i] - '0'), &first)) {
        digits = false;
      }
    }
    if (!digits || first == 0) continue;
    out.push_back({first, absl::StrCat(dir, "/", av(name))});
  }
  ::closedir(d);
  std::sort(out.begin(), out.end(), [](const Segment& a, const Segment& b) {
    return a.first < b.first;
  });
  return out;
}

// The digits of `line` from `at` on, as a number; false when there are
// none.
inline bool number_at(std::string_view line, std::size_t& at,
                      std::uint64_t& n) {
  const std::size_t from = at;
  n = 0;
  while (at < line.size() && line[at] >= '0' && line[at] <= '9') {
    n = n * 10 + static_cast<std::uint64_t>(line[at] - '0');
    ++at;
  }
  return at > from;
}

// The "prev" hash of a record line (as written by Ledger), or empty.
inline std::string_view prev_of(std::string_view line) {
  constexpr std::string_view kPrev = ",\"prev\":\"";
  const std::size_t p = line.find(kPrev);
  if (p == std::string_view::npos || p + kPrev.size() + 65 > line.size()) {
    return {};
  }
  return line.substr(p + kPrev.size(), 64);
}

// The "t" of a record line (0 when unreadable).
inline std::int64_t time_of(std::string_view line) {
  const std::size_t p = line.find(",\"t\":");
  if (p == std::string_view::npos) return 0;
  std::size_t at = p + 5;
  const bool neg = at < line.size() && line[at] == '-';
  if (neg) ++at;
  std::uint64_t n = 0;
  if (!number_at(line, at, n)) return 0;
  return neg ? -static_cast<std::int64_t>(n) : static_cast<std::int64_t>(n);
}

// Whether record line `line` is a checkpoint record (the ledger's own, its
// fields right after "prev"): its "upto" and "upto_hash".
inline bool checkpoint_of(std::string_view line, std::uint64_t& upto,
                          std::string_view& hash) {
  constexpr std::string_view kHead = ",\"event\":\"checkpoint\",\"upto\":";
  constexpr std::string_view kHash = ",\"upto_hash\":\"";
  const std::string_view prev = prev_of(line);
  if (prev.empty()) return false;
  std::size_t at = static_cast<std::size_t>(prev.data() - line.data()) + 64 + 1;
  if (line.substr(at, kHead.size()) != kHead) return false;
  at += kHead.size();
  if (!number_at(line, at, upto)) return false;
  if (line.substr(at, kHash.size()) != kHash) return false;
  at += kHash.size();
  if (at + 65 > line.size() || line[at + 64] != '"') return false;
  hash = line.substr(at, 64);
  return true;
}

// What walk_segments found: the chain's state after the last record
// verified (in r), where each walked segment's verified bytes end, and the
// start segment's checkpoint, if any (its byte offset there).
struct SegmentWalk {
  VerifyResult r;
  std::size_t start = 0;
  std::vector<std::uint64_t> good;
  std::optional<std::uint64_t> checkpoint_pos;  // in segs[start]
  std::size_t checkpoint_len = 0;               // its line's length
  std::int64_t last_first_t = 0;   // the last segment's first record's time
  std::uint64_t last_records = 0;  // records in the last segment
};

// walk_segments
//
// Verifies segments[start..] in order, streamed: each record's hash, chain
// and sequence, across segments (a segment's first record follows the last
// of the one before it, and its name is its first record's number). Only
// the last segment may end torn. A start segment that does not begin at
// record 1 (older ones pruned) must hold a checkpoint for the records
// before it: its first "prev" is taken on the checkpoint's word
// (upto_hash), which an anchor can confirm. Stops after record
// `stop_after`. Bytes read and the buffer are added to `stats`.
inline absl::StatusOr<SegmentWalk> walk_segments(
    const std::vector<Segment>& segs, std::size_t start,
    const LedgerReadOptions& o, LedgerReadStats& stats,
    std::uint64_t stop_after = ~std::uint64_t{0}) {
  SegmentWalk w;
  w.start = start;
  VerifyResult& r = w.r;
  for (std::size_t i = start; i < segs.size() && r.ok(); ++i) {
    const Segment& seg = segs[i];
    const std::string name = segment_name(seg.first);
    auto broken = [&](std::string_view why) {
      r.error = absl::StrCat("segment ", name, ": ", av(why));
    };
    if (i == start) {
      r.records = seg.first - 1;
      r.first_seq = seg.first;
    } else if (seg.first != r.records + 1) {
      broken(absl::StrCat("starts at record ", seg.first,
                          ", the segment before ends at ", r.records,
                          ": a segment is missing, cut short or out of order"));
      break;
    }
    // (At a pruned start, its first prev is still read: the anchor of the
    // record before it checks the hash the checkpoint starts from.)
    if (r.records >= stop_after && (i != start || seg.first == 1)) break;
    ++r.segments;
    const int fd = ::open(seg.path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return PosixLedgerFile::errno_status("open", seg.path);
    LineReader in(fd, seg.path, 0, o.chunk);
    std::string_view line;
    std::uint64_t pos = 0;
    std::string seg_prev;
    bool first_line = true;
    bool needs_checkpoint = i == start && seg.first != 1;
    bool cut_short = false;  // stopped before its end
    r.good_bytes = 0;
    r.torn_tail = false;
    w.last_first_t = 0;
    std::uint64_t count = 0;
    for (;;) {
      absl::StatusOr<bool> more = in.next(line, pos);
      if (!more.ok()) {
        ::close(fd);
        return more.status();
      }
      if (!*more) break;
      if (first_line) {
        if (needs_checkpoint) {
          const std::string_view prev = prev_of(line);
          if (prev.empty()) {
            broken("its first record has no prev");
            break;
          }
          r.last_hash = std::string(prev);
          if (r.records >= stop_after) {
            cut_short = true;
            break;
          }
        }
        seg_prev = r.last_hash;
        w.last_first_t = time_of(line);
        first_line = false;
      }
      VerifyResult before = r;
      if (!check_record(r, line, pos, o.key)) {
        r.error = absl::StrCat("segment ", name, ": ", r.error);
        break;
      }
      ++count;
      std::uint64_t upto = 0;
      std::string_view upto_hash;
      if (checkpoint_of(line, upto, upto_hash)) {
        if (upto != seg.first - 1 || upto_hash != seg_prev) {
          r = before;
          broken(absl::StrCat("record ", r.records + 1,
                              ": a checkpoint that does not match its "
                              "segment (upto ",
                              upto, ", the segment starts at ", seg.first,
                              ")"));
          break;
        }
        needs_checkpoint = false;
        if (i == start) {
          w.checkpoint_pos = pos;
          w.checkpoint_len = line.size();
        }
      }
      if (r.records >= stop_after) {
        cut_short = true;
        break;
      }
    }
    const bool torn = in.torn();
    stats.bytes_read += in.bytes_read();
    stats.max_buffer = std::max(stats.max_buffer, in.capacity());
    ::close(fd);
    w.good.push_back(r.good_bytes);
    w.last_records = count;
    if (!r.ok() || cut_short) break;
    if (torn) {
      if (i + 1 != segs.size()) {
        broken(absl::StrCat("ends in a torn record after record ", r.records,
                            " (only the active, last segment may)"));
        break;
      }
      r.torn_tail = true;
    }
    if (needs_checkpoint) {
      broken(absl::StrCat("records before ", seg.first,
                          " are missing and this segment holds no "
                          "checkpoint for them"));
      break;
    }
  }
  return w;
}

// The newest segment holding a checkpoint record (read from the newest
// back, each up to its checkpoint); 0 when none does.
inline absl::StatusOr<std::size_t> last_checkpoint_segment(
    const std::vector<Segment>& segs, const LedgerReadOptions& o,
    LedgerReadStats& stats) {
  for (std::size_t i = segs.size(); i-- > 0;) {
    const int fd = ::open(segs[i].path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return PosixLedgerFile::errno_status("open", segs[i].path);
    LineReader in(fd, segs[i].path, 0, o.chunk);
    std::string_view line;
    std::uint64_t pos = 0;
    bool found = false;
    for (;;) {
      absl::StatusOr<bool> more = in.next(line, pos);
      if (!more.ok()) {
        ::close(fd);
        return more.status();
      }
      if (!*more) break;
      std::uint64_t upto = 0;
      std::string_view h;
      if (checkpoint_of(line, upto, h)) {
        found = true;
        break;
      }
    }
    stats.bytes_read += in.bytes_read();
    stats.max_buffer = std::max(stats.max_buffer, in.capacity());
    ::close(fd);
    if (found) return i;
  }
  return std::size_t{0};
}

// Hands the records of a walk to `fn`, parsed: the start segment's
// checkpoint first when `with_checkpoint`, then every other record, in
// order (checkpoint records are not handed on).
inline absl::Status replay_walk(
    const std::vector<Segment>& segs, const SegmentWalk& w,
    bool with_checkpoint, const LedgerReadOptions& o, LedgerReadStats& stats,
    const std::function<absl::Status(const nlohmann::json&)>& fn) {
  auto parse = [&](std::string_view line, std::uint64_t pos,
                   const std::string& path) -> absl::StatusOr<nlohmann::json> {
    nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded()) {
      return absl::DataLossError(
          absl::StrCat(path, ": a record at byte ", pos, " is not JSON"));
    }
    return j;
  };
  for (std::size_t k = 0; k < w.good.size(); ++k) {
    const Segment& seg = segs[w.start + k];
    const int fd = ::open(seg.path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return PosixLedgerFile::errno_status("open", seg.path);
    struct Closer {
      int fd;
      ~Closer() { ::close(fd); }
    } closer{fd};
    std::string_view line;
    std::uint64_t pos = 0;
    if (k == 0 && with_checkpoint && w.checkpoint_pos) {
      // The checkpoint record alone, first (its length known from the
      // verify pass).
      std::string cp(w.checkpoint_len, '\0');
      std::size_t got = 0;
      while (got < cp.size()) {
        const ssize_t n = ::pread(fd, cp.data() + got, cp.size() - got,
                                  static_cast<off_t>(*w.checkpoint_pos + got));
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return PosixLedgerFile::errno_status("read", seg.path);
        got += static_cast<std::size_t>(n);
      }
      stats.bytes_read += cp.size();
      absl::StatusOr<nlohmann::json> j = parse(cp, *w.checkpoint_pos, seg.path);
      if (!j.ok()) return j.status();
      if (absl::Status st = fn(*j); !st.ok()) return st;
    }
    LineReader in(fd, seg.path, 0, o.chunk);
    absl::Status st;
    for (;;) {
      absl::StatusOr<bool> more = in.next(line, pos);
      if (!more.ok()) return more.status();
      if (!*more || pos >= w.good[k]) break;
      std::uint64_t upto = 0;
      std::string_view h;
      if (checkpoint_of(line, upto, h)) continue;
      absl::StatusOr<nlohmann::json> j = parse(line, pos, seg.path);
      if (!j.ok()) return j.status();
      if (st = fn(*j); !st.ok()) break;
    }
    stats.bytes_read += in.bytes_read();
    stats.max_buffer = std::max(stats.max_buffer, in.capacity());
    if (!st.ok()) return st;
  }
  return absl::OkStatus();
}

// A segmented ledger's verify: every segment, oldest first.
inline absl::StatusOr<VerifyResult> verify_segments(
    const std::string& dir, const LedgerReadOptions& o) {
  absl::StatusOr<std::vector<Segment>> segs = list_segments(dir);
  if (!segs.ok()) return segs.status();
  LedgerReadStats stats;
  absl::StatusOr<SegmentWalk> w = walk_segments(*segs, 0, o, stats);
  if (o.stats != nullptr) {
    o.stats->bytes_read += stats.bytes_read;
    o.stats->max_buffer = std::max(o.stats->max_buffer, stats.max_buffer);
  }
  if (!w.ok()) return w.status();
  return w->r;
}

}  // namespace detail

// verify_ledger_file
//
// verify_ledger on the file at `path`, streamed in bounded memory (a file
// that does not exist verifies, empty). A directory is a segmented ledger:
// every segment is verified, oldest first, and the chain across them (see
// detail::walk_segments: a missing, cut, reordered or edited segment is
// named; only the last may end torn).
inline absl::StatusOr<VerifyResult> verify_ledger_file(
    const std::string& path, LedgerReadOptions options = {}) {
  if (detail::is_directory(path)) return detail::verify_segments(path, options);
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

namespace detail {

// A chain read up to `anchor` (r) against the anchor: cut, rewritten or
// matching.
inline absl::Status match_anchor(const std::string& path, const VerifyResult& r,
                                 const LedgerAnchor& anchor) {
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

}  // namespace detail

// verify_anchor
//
// OK when the file at `path` verifies up to record `anchor.records` and
// that record's hash is `anchor.hash` (records after it are not looked
// at). kDataLoss when it has fewer records (its tail was cut), when that
// record's hash differs (a record up to it was rewritten, even if the
// whole chain was recomputed), or when the chain breaks before it.
//
// A segmented ledger (a directory) is walked from its oldest segment; an
// anchor older than that segment (pruned since) is kFailedPrecondition, and
// one at the record just before it checks that segment's first "prev", the
// hash its checkpoint starts from.
inline absl::Status verify_anchor(const std::string& path,
                                  const LedgerAnchor& anchor,
                                  LedgerReadOptions options = {}) {
  if (detail::is_directory(path)) {
    absl::StatusOr<std::vector<detail::Segment>> segs =
        detail::list_segments(path);
    if (!segs.ok()) return segs.status();
    if (!segs->empty() && anchor.records + 1 < segs->front().first) {
      return absl::FailedPreconditionError(
          absl::StrCat(path, ": the anchor is at record ", anchor.records,
                       ", before the oldest segment left (",
                       segs->front().first, "): pruned, it cannot be checked"));
    }
    LedgerReadStats stats;
    absl::StatusOr<detail::SegmentWalk> w =
        detail::walk_segments(*segs, 0, options, stats, anchor.records);
    if (!w.ok()) return w.status();
    const VerifyResult& r = w->r;
    if (!r.ok()) return absl::DataLossError(absl::StrCat(path, ": ", r.error));
    return detail::match_anchor(path, r, anchor);
  }
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
  return detail::match_anchor(path, r, anchor);
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
//
// A directory is a segmented ledger. With options.from_checkpoint (the
// default) reading starts at the newest segment holding a checkpoint: the
// checkpoint record is handed on first (Accountant::replay loads its
// books), then every other record from that segment's start on; the
// segments before it are not read. Without it, every segment is read from
// the oldest and checkpoint records are not handed on (a full replay; an
// oldest segment that is not the first still starts from its checkpoint).
// Either way the segments read are verified first (as verify_ledger_file).
inline absl::Status read_ledger(
    const std::string& path,
    const std::function<absl::Status(const nlohmann::json&)>& fn,
    LedgerReadOptions options = {}) {
  if (detail::is_directory(path)) {
    absl::StatusOr<std::vector<detail::Segment>> segs =
        detail::list_segments(path);
    if (!segs.ok()) return segs.status();
    if (segs->empty()) return absl::OkStatus();
    LedgerReadStats stats;
    std::size_t start = 0;
    if (options.from_checkpoint) {
      absl::StatusOr<std::size_t> s =
          detail::last_checkpoint_segment(*segs, options, stats);
      if (!s.ok()) return s.status();
      start = *s;
    }
    absl::StatusOr<detail::SegmentWalk> w =
        detail::walk_segments(*segs, start, options, stats);
    absl::Status st = w.ok() ? absl::OkStatus() : w.status();
    if (st.ok() && !w->r.ok()) {
      st = absl::DataLossError(absl::StrCat(path, ": ", w->r.error));
    }
    if (st.ok()) {
      const bool with_checkpoint =
          options.from_checkpoint || (*segs)[start].first != 1;
      st = detail::replay_walk(*segs, *w, with_checkpoint, options, stats, fn);
    }
    if (options.stats != nullptr) {
      options.stats->bytes_read += stats.bytes_read;
      options.stats->max_buffer =
          std::max(options.stats->max_buffer, stats.max_buffer);
    }
    return st;
  }
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

// SegmentFiles: a segmented ledger's directory, as one LedgerFile. Holds an
// exclusive flock(2) on the directory's LOCK file for the ledger's life (one
// writer for the ledger as a whole) and one on the active segment. write()
// goes to the active segment; rotate() syncs it, creates the next one
// durably (the file, then the directory) and switches to it, so that a
// sync() of the new one covers every record written before it started, in
// any segment. write() and rotate() come one at a time (the ledger's lock);
// sync() may run beside either.
class SegmentFiles final : public LedgerFile {
 public:
  // Creates `dir` (and syncs its parent) when missing; takes the lock.
  static absl::StatusOr<std::unique_ptr<SegmentFiles>> open(
      const std::string& dir) {
    if (::mkdir(dir.c_str(), 0755) == 0) {
      if (absl::Status s = PosixLedgerFile::sync_dir_of(dir); !s.ok()) {
        return s;
      }
    } else if (errno != EEXIST) {
      return PosixLedgerFile::errno_status("mkdir", dir);
    }
    if (!is_directory(dir)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "ledger ", dir, ": not a directory (a segmented ledger is one)"));
    }
    const std::string lock_path = dir + "/LOCK";
    const int fd =
        ::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) return PosixLedgerFile::errno_status("open", lock_path);
    if (absl::Status lk = PosixLedgerFile::lock_or_close(fd, dir, lock_path);
        !lk.ok()) {
      return lk;
    }
    return std::unique_ptr<SegmentFiles>(new SegmentFiles(dir, fd));
  }
  ~SegmentFiles() override { ::close(lock_fd_); }

  // Makes `path` (existing, or created durably) the active segment.
  absl::Status open_active(const std::string& path) {
    absl::StatusOr<std::unique_ptr<PosixLedgerFile>> f =
        PosixLedgerFile::open_append(path);
    if (!f.ok()) return f.status();
    std::lock_guard<std::mutex> lock(mu_);
    active_ = std::shared_ptr<PosixLedgerFile>(std::move(*f));
    return absl::OkStatus();
  }

  // Syncs the active segment, then creates segment `first` (file synced,
  // then the directory) and makes it the active one.
  absl::Status rotate(std::uint64_t first) {
    if (absl::Status st = active_->sync(); !st.ok()) return st;
    const std::string path = absl::StrCat(dir_, "/", segment_name(first));
    // Created (never one left by someone else), the file synced, then the
    // directory that names it.
    const int fd =
        ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0) return PosixLedgerFile::errno_status("create", path);
    const int rc = ::fsync(fd);
    const int e = errno;
    ::close(fd);
    if (rc != 0) {
      errno = e;
      return PosixLedgerFile::errno_status("fsync", path);
    }
    if (absl::Status st = PosixLedgerFile::sync_dir_of(path); !st.ok()) {
      return st;
    }
    absl::StatusOr<std::unique_ptr<PosixLedgerFile>> f =
        PosixLedgerFile::open_append(path);
    if (!f.ok()) return f.status();
    std::lock_guard<std::mutex> lock(mu_);
    active_ = std::shared_ptr<PosixLedgerFile>(std::move(*f));
    return absl::OkStatus();
  }

  absl::Status write(std::string_view bytes) override {
    return active_->write(bytes);
  }
  absl::Status sync() override {
    std::shared_ptr<PosixLedgerFile> a;
    {
      std::lock_guard<std::mutex> lock(mu_);
      a = active_;
    }
    return a->sync();
  }
  absl::Status truncate(std::uint64_t size) { return active_->truncate(size); }
  const std::string& active_path() const { return active_->path(); }
  const std::string& dir() const { return dir_; }

 private:
  SegmentFiles(std::string dir, int lock_fd)
      : dir_(std::move(dir)), lock_fd_(lock_fd) {}
  std::string dir_;
  int lock_fd_;
  std::mutex mu_;  // guards the pointer for sync()
  std::shared_ptr<PosixLedgerFile> active_;
};

// futex_wait / futex_wake: detail/futex.hpp (shared with the settle
// journal's group sync, detail/group_sync.hpp).

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
    if (!key.empty()) {
      const Digest256 d = hmac_sha256(key, data);
      hex_into(
          std::string_view(reinterpret_cast<const char*>(d.data()), d.size()),
          out);
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
    hex_into(std::string_view(reinterpret_cast<const char*>(md.data()), len),
             out);
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
  //
  // Segmented (`path` a directory, or options.segment_bytes, segment_age or
  // books set): `path` is created if missing (its parent synced) and locked
  // as a whole; the segments are verified from the newest one holding a
  // checkpoint on (all of them when none does), the last one's torn record
  // cut, and options.books, if set, rebuilt from that checkpoint. Records
  // go to the last segment. open_stats() says what was read.
  static absl::StatusOr<std::unique_ptr<Ledger>> open(
      const std::string& path, LedgerOptions options = {}) {
    if (options.segment_bytes != 0 || options.segment_age.count() != 0 ||
        options.books != nullptr || detail::is_directory(path)) {
      return open_segmented(path, std::move(options));
    }
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
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_.store(true);
    }
    cp_cv_.notify_all();
    if (checkpointer_.joinable()) checkpointer_.join();
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
    if (fields.substr(0, kCheckpointEvent.size()) == kCheckpointEvent) {
      return absl::InvalidArgumentError(
          "ledger: checkpoint records are the ledger's own");
    }
    std::lock_guard<std::mutex> lock(mu_);
    return append_locked(fields, t, /*may_rotate=*/true);
  }

  // checkpoint
  //
  // Closes the active segment now (unless it is empty) and waits for the
  // checkpoint record of the books up to its last record to be written at
  // the head of the next one and synced; returns its sequence number.
  // kFailedPrecondition without segments and books (LedgerOptions::books);
  // the books' error if a record could not be applied to them; kAborted
  // when the next segment was itself closed before its checkpoint could be
  // written (records arriving faster than checkpoints: call again).
  absl::StatusOr<std::uint64_t> checkpoint() {
    std::unique_lock<std::mutex> lock(mu_);
    if (segments_ == nullptr || books_ == nullptr) {
      return absl::FailedPreconditionError(
          "ledger: checkpoints need segments and books (LedgerOptions)");
    }
    if (failed_flag_.load()) return failed_;
    if (active_records_ > 0) {
      if (absl::Status st = rotate_locked(); !st.ok()) {
        fail(st);
        return st;
      }
    } else {
      boundaries_.push_back(
          Boundary{std::string(), seq_, last_hash_, ++boundaries_made_});
      cp_cv_.notify_all();
    }
    const std::uint64_t id = boundaries_made_;
    cp_cv_.wait(lock, [&] { return stop_ || boundaries_done_ >= id; });
    if (!checkpoint_failed_.ok()) return checkpoint_failed_;
    if (last_checkpoint_ < active_first_) {
      return absl::AbortedError(
          "ledger: the segment rotated again before its checkpoint");
    }
    const std::uint64_t seq = last_checkpoint_;
    lock.unlock();
    if (absl::Status st = wait_durable(seq); !st.ok()) return st;
    return seq;
  }

  // The sequence number of the last checkpoint record written (0: none).
  std::uint64_t last_checkpoint() const {
    std::lock_guard<std::mutex> lock(mu_);
    return last_checkpoint_;
  }

  // What open() read (segmented: from the last checkpoint on).
  LedgerReadStats open_stats() const {
    std::lock_guard<std::mutex> lock(mu_);
    return open_stats_;
  }

 private:
  static constexpr std::string_view kCheckpointEvent =
      "\"event\":\"checkpoint\"";

  // One record, mu_ held; a segmented ledger first rotates when the active
  // segment is full or old (unless !may_rotate: a checkpoint record goes to
  // the segment it belongs to).
  absl::StatusOr<std::uint64_t> append_locked(std::string_view fields, Nanos t,
                                              bool may_rotate) {
    if (failed_flag_.load(std::memory_order_relaxed)) return failed_;
    if (segments_ != nullptr && may_rotate && active_records_ > 0 &&
        ((options_.segment_bytes != 0 &&
          active_bytes_ >= options_.segment_bytes) ||
         (options_.segment_age.count() > 0 &&
          t.count() - active_t0_ >= options_.segment_age.count()))) {
      if (absl::Status st = rotate_locked(); !st.ok()) {
        fail(st);
        return st;
      }
    }
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
    if (active_records_++ == 0) active_t0_ = t.count();
    active_bytes_ += line.size();
    last_t_ = t.count();
    // Published after the write: a sync that reads it covers the record.
    written_.store(seq);
    // A syncer asleep with nothing to sync is woken (seq_cst both sides:
    // either it reads this record or this reads its state), so that a
    // record nobody waits for is synced within lazy_sync_after.
    if (syncer_state_.load() == kIdle) kick_syncer();
    return seq;
  }

  // Closes the active segment (synced) and starts the next; the closed one
  // is queued for a checkpoint when there are books. mu_ held.
  absl::Status rotate_locked() {
    std::string closed = segments_->active_path();
    if (absl::Status st = segments_->rotate(seq_ + 1); !st.ok()) return st;
    active_first_ = seq_ + 1;
    active_records_ = 0;
    active_bytes_ = 0;
    if (books_ != nullptr) {
      boundaries_.push_back(
          Boundary{std::move(closed), seq_, last_hash_, ++boundaries_made_});
      cp_cv_.notify_all();
    }
    return absl::OkStatus();
  }

  static absl::StatusOr<std::unique_ptr<Ledger>> open_segmented(
      std::string dir, LedgerOptions options) {
    while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
    absl::StatusOr<std::unique_ptr<detail::SegmentFiles>> files =
        detail::SegmentFiles::open(dir);
    if (!files.ok()) return files.status();
    absl::StatusOr<std::vector<detail::Segment>> segs =
        detail::list_segments(dir);
    if (!segs.ok()) return segs.status();
    LedgerReadOptions ro;
    ro.key = options.key;
    LedgerReadStats stats;
    VerifyResult head;
    std::uint64_t active_first = 1, active_bytes = 0, active_records = 0;
    std::int64_t active_t0 = 0;
    if (segs->empty()) {
      const std::string first = dir + "/" + detail::segment_name(1);
      if (absl::Status st = (*files)->open_active(first); !st.ok()) return st;
    } else {
      absl::StatusOr<std::size_t> start =
          detail::last_checkpoint_segment(*segs, ro, stats);
      if (!start.ok()) return start.status();
      absl::StatusOr<detail::SegmentWalk> w =
          detail::walk_segments(*segs, *start, ro, stats);
      if (!w.ok()) return w.status();
      if (!w->r.ok()) {
        return absl::DataLossError(absl::StrCat(dir, ": ", w->r.error));
      }
      if (absl::Status st = (*files)->open_active(segs->back().path);
          !st.ok()) {
        return st;
      }
      if (w->r.torn_tail) {
        if (absl::Status st = (*files)->truncate(w->good.back()); !st.ok()) {
          return st;
        }
      }
      if (options.books != nullptr) {
        if (absl::Status st =
                detail::replay_walk(*segs, *w, true, ro, stats,
                                    [&](const nlohmann::json& j) {
                                      return options.books->apply(j);
                                    });
            !st.ok()) {
          return st;
        }
      }
      head = w->r;
      active_first = segs->back().first;
      active_bytes = w->good.back();
      active_records = w->last_records;
      active_t0 = w->last_first_t;
    }
    detail::SegmentFiles* seg = files->get();
    std::unique_ptr<Ledger> l(
        new Ledger(*std::move(files), options, head.records, head.last_hash));
    std::lock_guard<std::mutex> lock(l->mu_);
    l->segments_ = seg;
    l->active_first_ = active_first;
    l->active_bytes_ = active_bytes;
    l->active_records_ = active_records;
    l->active_t0_ = active_t0;
    l->last_t_ = active_t0;
    l->open_stats_ = stats;
    l->books_ = options.books;
    l->books_upto_ = head.records;
    if (l->books_ != nullptr) {
      l->checkpointer_ = std::thread([p = l.get()] { p->checkpoints(); });
    }
    return l;
  }

  // A closed segment awaiting its checkpoint: the books up to record
  // `upto` (the segment's last, of hash `hash`), read from `path`.
  struct Boundary {
    std::string path;
    std::uint64_t upto = 0;
    std::string hash;
    std::uint64_t id = 0;
  };

  // The checkpoint thread: applies each closed segment's records to the
  // books (mu_ released) and appends a checkpoint record of them to the
  // segment after it, unless that one was itself closed meanwhile.
  void checkpoints() {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      cp_cv_.wait(lock, [&] { return stop_ || !boundaries_.empty(); });
      if (stop_) return;
      const Boundary b = boundaries_.front();
      // With a later segment already closed, this checkpoint could not be
      // written (it belongs at the head of the segment after b): the books
      // are only advanced, not written out, so a thread that fell behind
      // catches up as fast as it can apply records.
      const bool latest = boundaries_.size() == 1;
      lock.unlock();
      absl::Status st = advance_books(b);
      std::string books;
      if (st.ok() && latest) books = books_->books();
      lock.lock();
      boundaries_.pop_front();
      if (!st.ok() && checkpoint_failed_.ok()) checkpoint_failed_ = st;
      if (latest && checkpoint_failed_.ok() && failed_.ok() &&
          active_first_ == b.upto + 1) {
        const std::string fields =
            absl::StrCat(detail::av(kCheckpointEvent), ",\"upto\":", b.upto,
                         ",\"upto_hash\":\"", b.hash, "\",\"books\":", books);
        absl::StatusOr<std::uint64_t> seq =
            append_locked(fields, Nanos{last_t_}, /*may_rotate=*/false);
        if (seq.ok()) last_checkpoint_ = *seq;
      }
      boundaries_done_ = b.id;
      cp_cv_.notify_all();
    }
  }

  // Applies the records of b.path after books_upto_ and up to b.upto to
  // the books (the checkpoint thread only).
  absl::Status advance_books(const Boundary& b) {
    if (b.path.empty() || books_upto_ >= b.upto) return absl::OkStatus();
    const int fd = ::open(b.path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return PosixLedgerFile::errno_status("open", b.path);
    detail::LineReader in(fd, b.path, 0);
    std::string_view line;
    std::uint64_t pos = 0;
    absl::Status st;
    while (st.ok() && books_upto_ < b.upto) {
      absl::StatusOr<bool> more = in.next(line, pos);
      if (!more.ok()) {
        st = more.status();
        break;
      }
      if (!*more) break;
      std::size_t at = 7;  // {"seq":
      std::uint64_t seq = 0;
      if (!detail::number_at(line, at, seq)) {
        st = absl::DataLossError(
            absl::StrCat(b.path, ": byte ", pos, ": a record without a seq"));
        break;
      }
      if (seq <= books_upto_) continue;
      std::uint64_t upto = 0;
      std::string_view h;
      if (!detail::checkpoint_of(line, upto, h)) {
        const nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
        if (j.is_discarded()) {
          st = absl::DataLossError(
              absl::StrCat(b.path, ": a record at byte ", pos, " is not JSON"));
          break;
        }
        st = books_->apply(j);
      }
      books_upto_ = seq;
    }
    ::close(fd);
    if (st.ok() && books_upto_ < b.upto) {
      st = absl::DataLossError(
          absl::StrCat(b.path, ": ends before record ", b.upto));
    }
    return st;
  }

 public:
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
  // Segments (segments_ null: one file). All under mu_.
  detail::SegmentFiles* segments_ = nullptr;  // file_, when segmented
  std::uint64_t active_first_ = 1;            // the active segment's first seq
  std::uint64_t active_records_ = 0;          // records in it
  std::uint64_t active_bytes_ = 0;            // its size
  std::int64_t active_t0_ = 0;                // its first record's time
  std::int64_t last_t_ = 0;                   // the last record's time
  LedgerReadStats open_stats_;
  // Checkpoints: closed segments queued for the checkpoint thread, which
  // alone touches books_ and books_upto_ once it runs.
  std::shared_ptr<LedgerBooks> books_;
  std::uint64_t books_upto_ = 0;
  std::deque<Boundary> boundaries_;
  std::uint64_t boundaries_made_ = 0, boundaries_done_ = 0;
  std::uint64_t last_checkpoint_ = 0;
  absl::Status checkpoint_failed_;
  std::condition_variable cp_cv_;
  std::thread checkpointer_;
};

}  // namespace ratekeeper

#endif  // RATEKEEPER_BUDGET_LEDGER_HPP_
