// ratekeeper/redis/journal.hpp: the settle journal of a RedisAccountant:
// settles and releases kept on disk while Redis is away.
//
// Defines detail::SettleJournal, the file: its line format, appends made
// durable by a group commit, the replayer's front/pop/set_aside. Written
// through the writer the ledger uses too (detail/append_file.hpp). What
// replays it, when, and what is set aside: redis/journal_replay.hpp.
#ifndef RATEKEEPER_REDIS_JOURNAL_HPP_
#define RATEKEEPER_REDIS_JOURNAL_HPP_

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "ratekeeper/decision.hpp"
#include "ratekeeper/detail/append_file.hpp"
#include "ratekeeper/detail/group_sync.hpp"
#include "ratekeeper/detail/mutex.hpp"
#include "ratekeeper/detail/strings.hpp"

namespace ratekeeper::detail {

// SettleJournal: scripts to run once Redis answers, one line each,
// appended and made durable before the caller is answered. A line: "J",
// the time it was journaled (Unix ns, the accountant's clock), the key
// count, each key and argument in hex, and an FNV-1a checksum of what
// precedes it ("j" lines, without the time, are read too: a journal of an
// earlier version; their time is the file's modification time). A torn
// last line (a crash mid-append: never acknowledged) is cut at open; any
// other damage is kDataLoss.
//
// Durability is a group commit (detail::GroupSync): each append writes its
// line under a short lock, then waits, holding no lock, for a fdatasync
// that covers it; settlers arriving during one sync share the next. A
// failed sync fails the journal for good (appends return its error).
//
// Replay (one replayer at a time, the accountant's): front() lends the
// oldest entries (stable while only the replayer pops), pop(n) drops those
// that ran, set_aside(n) moves the n oldest to `<path>.stale` (appended
// and synced before they leave the journal) instead of running them. The
// file is emptied (not synced: lost, the lines run again, changing nothing;
// the next append's sync covers the new size) once nothing is pending;
// lines that ran before a crash run again in the next process (every
// script is idempotent).
class SettleJournal {
 public:
  struct Entry {
    std::vector<std::string> keys;
    std::vector<std::string> args;
    Nanos t{0};  // when journaled (Unix time); 0: unknown
  };

  static absl::StatusOr<std::unique_ptr<SettleJournal>> open(
      const std::string& path) {
    absl::StatusOr<AppendFile> f =
        AppendFile::open(path, kErrors, {.access = O_RDWR, .mode = 0600});
    if (!f.ok()) return f.status();
    const int fd = f->fd();
    auto j = std::unique_ptr<SettleJournal>(new SettleJournal(*std::move(f)));
    struct stat st {};
    if (::fstat(fd, &st) != 0) return j->file_.error("stat");
    const Nanos mtime{std::int64_t{st.st_mtim.tv_sec} * 1'000'000'000 +
                      st.st_mtim.tv_nsec};
    std::string text;
    char buf[1 << 16];
    for (;;) {
      const ssize_t got = ::read(fd, buf, sizeof buf);
      if (got < 0) {
        if (errno == EINTR) continue;
        return j->file_.error("read");
      }
      if (got == 0) break;
      text.append(buf, static_cast<std::size_t>(got));
    }
    std::size_t good = 0;
    detail::MutexLock lock(&j->mu_);
    while (good < text.size()) {
      const std::size_t nl = text.find('\n', good);
      if (nl == std::string::npos) break;  // torn: cut below
      absl::StatusOr<Entry> e =
          parse(std::string_view(text).substr(good, nl - good), mtime);
      if (!e.ok()) {
        return absl::DataLossError(absl::StrCat("journal ", path,
                                                ": damaged line at byte ", good,
                                                ": ", e.status().message()));
      }
      j->pending_.push_back(*std::move(e));
      good = nl + 1;
    }
    if (good != text.size()) {
      if (absl::Status cut =
              j->file_.truncate(good, true, "cut the torn tail of");
          !cut.ok()) {
        return cut;
      }
    }
    j->size_.store(j->pending_.size());
    return j;
  }

  SettleJournal(const SettleJournal&) = delete;
  SettleJournal& operator=(const SettleJournal&) = delete;
  ~SettleJournal() = default;

  // Durable when it returns OK (then the entry is pending; otherwise it may
  // be pending too: a sync that failed after the line was written).
  absl::Status append(Entry e) {
    const std::string line = encode(e);
    std::uint64_t seq = 0;
    {
      detail::MutexLock lock(&mu_);
      if (absl::Status st = sync_.failed(); !st.ok()) return st;
      if (absl::Status st = file_.append(line); !st.ok()) return st;
      pending_.push_back(std::move(e));
      size_.store(pending_.size());
      seq = ++seq_;
      sync_.written(seq);
    }
    return sync_.wait(seq, [this] { return file_.sync(); });
  }

  // Entries not yet run (or set aside).
  std::size_t size() const noexcept { return size_.load(); }

  // A copy of the pending entries, oldest first (tests).
  std::vector<Entry> pending() const {
    detail::MutexLock lock(&mu_);
    return std::vector<Entry>(pending_.begin(), pending_.end());
  }

  // The replayer's: up to `n` of the oldest entries, valid until it pops
  // them.
  std::vector<const Entry*> front(std::size_t n) const {
    detail::MutexLock lock(&mu_);
    std::vector<const Entry*> out;
    for (std::size_t i = 0; i < n && i < pending_.size(); ++i) {
      out.push_back(&pending_[i]);
    }
    return out;
  }

  // The replayer's: the `n` oldest entries ran. The file is emptied once
  // none is left.
  absl::Status pop(std::size_t n) {
    detail::MutexLock lock(&mu_);
    return pop_locked(n);
  }

  // The replayer's: the oldest entry is not run but reported, appended to
  // `<path>.stale` (synced) before it leaves the journal.
  absl::Status set_aside(std::size_t n) {
    detail::MutexLock lock(&mu_);
    n = std::min(n, pending_.size());
    if (n == 0) return absl::OkStatus();
    if (!stale_.is_open()) {
      absl::StatusOr<AppendFile> f = AppendFile::open(
          stale_path(), kErrors, {.access = O_WRONLY, .mode = 0600});
      if (!f.ok()) return f.status();
      stale_ = *std::move(f);
    }
    std::string lines;
    for (std::size_t i = 0; i < n; ++i) lines += encode(pending_[i]);
    if (absl::Status st = stale_.append(lines); !st.ok()) return st;
    if (absl::Status st = stale_.sync(); !st.ok()) return st;
    return pop_locked(n);
  }

  std::string stale_path() const { return file_.path() + ".stale"; }
  // fdatasyncs of the journal made by appends (records per sync).
  std::uint64_t syncs() const { return sync_.syncs(); }

 private:
  // Its errors are kUnavailable ("journal: write <path>: ..."): the settle
  // may be called again.
  static constexpr FileErrors kErrors{"journal: ",
                                      absl::StatusCode::kUnavailable};

  explicit SettleJournal(AppendFile file) : file_(std::move(file)) {}

  absl::Status pop_locked(std::size_t n) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    for (std::size_t i = 0; i < n && !pending_.empty(); ++i) {
      pending_.pop_front();
    }
    size_.store(pending_.size());
    if (!pending_.empty()) return absl::OkStatus();
    // Every line has run (or was set aside): empty the file. An append
    // waiting for its sync meanwhile is covered: its entry ran. No sync
    // here (it would wait on the file system's journal, on a busy disk for
    // long, inside a caller's slice): a crash before the next append's sync
    // leaves lines that run again, to no effect (idempotent).
    return file_.truncate(0, false, "clear");
  }

  static std::string encode(const Entry& e) {
    std::string line = "J ";
    absl::StrAppend(&line, e.t.count(), " ", e.keys.size());
    for (const auto* part : {&e.keys, &e.args}) {
      for (const std::string& s : *part) {
        line.push_back(' ');
        line += s.empty() ? std::string("-") : hex(s);
      }
    }
    absl::StrAppend(&line, " ", absl::Hex(fnv(line), absl::kZeroPad16), "\n");
    return line;
  }

  static std::uint64_t fnv(std::string_view s) {
    std::uint64_t h = 1469598103934665603ull;
    for (const char c : s) {
      h ^= static_cast<unsigned char>(c);
      h *= 1099511628211ull;
    }
    return h;
  }

  static std::string hex(std::string_view bytes) { return detail::hex(bytes); }

  // "-" is an empty field.
  static std::optional<std::string> unhex(std::string_view h) {
    if (h == "-") return std::string();
    return detail::unhex(h);
  }

  // `untimed`: the time of a line without one (the file's mtime).
  static absl::StatusOr<Entry> parse(std::string_view line, Nanos untimed) {
    const std::size_t last = line.rfind(' ');
    if (last == std::string_view::npos) {
      return absl::DataLossError("no checksum");
    }
    std::uint64_t sum = 0;
    if (!absl::SimpleHexAtoi(detail::av(line.substr(last + 1)), &sum) ||
        sum != fnv(line.substr(0, last))) {
      return absl::DataLossError("checksum mismatch");
    }
    const std::vector<absl::string_view> parts =
        absl::StrSplit(detail::av(line.substr(0, last)), ' ');
    Entry e;
    std::size_t first = 2;  // the first key's part
    if (!parts.empty() && parts[0] == "J") {
      std::int64_t t = 0;
      if (parts.size() < 3 || !absl::SimpleAtoi(parts[1], &t)) {
        return absl::DataLossError("bad time");
      }
      e.t = Nanos{t};
      first = 3;
    } else if (!parts.empty() && parts[0] == "j") {
      e.t = untimed;
    } else {
      return absl::DataLossError("bad header");
    }
    std::size_t nkeys = 0;
    if (parts.size() < first || !absl::SimpleAtoi(parts[first - 1], &nkeys) ||
        nkeys > parts.size() - first) {
      return absl::DataLossError("bad header");
    }
    for (std::size_t i = first; i < parts.size(); ++i) {
      std::optional<std::string> v =
          unhex(std::string_view(parts[i].data(), parts[i].size()));
      if (!v) return absl::DataLossError("bad hex");
      (i - first < nkeys ? e.keys : e.args).push_back(*std::move(v));
    }
    return e;
  }

  AppendFile file_;  // appends, truncation: under mu_; sync(): beside them
  mutable detail::Mutex mu_;
  std::deque<Entry> pending_ ABSL_GUARDED_BY(mu_);
  std::uint64_t seq_ ABSL_GUARDED_BY(mu_) = 0;
  AppendFile stale_ ABSL_GUARDED_BY(mu_);  // <path>.stale, once opened
  std::atomic<std::size_t> size_{0};
  detail::GroupSync sync_;
};

}  // namespace ratekeeper::detail

#endif  // RATEKEEPER_REDIS_JOURNAL_HPP_
