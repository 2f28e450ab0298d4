// detail/append_file.hpp: the durable-log writer under the ledger and the
// settle journal. Records are appended whole across short writes and
// EINTR (a FIFO whose writer is interrupted by a signal), and a write the
// file system refuses (EFBIG: RLIMIT_FSIZE with SIGXFSZ ignored) leaves
// neither part of the record nor a damaged log behind, in AppendFile, the
// journal and the ledger; each reports the error its own way.
#include "ratekeeper/detail/append_file.hpp"

#include <pthread.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <thread>
#include <vector>

#include "ratekeeper/budget/ledger.hpp"
#include "ratekeeper/redis/journal.hpp"
#include "wait.hpp"

namespace rk = ratekeeper;
namespace fs = std::filesystem;
using rk::detail::AppendFile;
using rk::detail::FileErrors;

namespace {

constexpr FileErrors kLedgerStyle{"ledger "};
constexpr FileErrors kJournalStyle{"journal: ", absl::StatusCode::kUnavailable};

struct TempPath {
  std::string path;
  explicit TempPath(const std::string& name)
      : path((fs::temp_directory_path() /
              ("rk_af_" + std::to_string(::getpid()) + "_" + name))
                 .string()) {
    fs::remove(path);
    fs::remove(path + ".stale");
  }
  ~TempPath() {
    fs::remove(path);
    fs::remove(path + ".stale");
  }
};

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

std::string pattern(std::size_t n, unsigned seed) {
  std::string s(n, '\0');
  for (std::size_t i = 0; i < n; ++i) {
    s[i] = static_cast<char>('a' + (i * 7 + seed) % 26);
  }
  s.back() = '\n';
  return s;
}

// RLIMIT_FSIZE at `bytes` (no file of this process may grow past it: a
// write that would returns EFBIG, SIGXFSZ ignored) until destroyed.
class FileSizeLimit {
 public:
  explicit FileSizeLimit(rlim_t bytes) {
    REQUIRE(::getrlimit(RLIMIT_FSIZE, &old_) == 0);
    old_handler_ = ::signal(SIGXFSZ, SIG_IGN);
    rlimit l = old_;
    l.rlim_cur = bytes;
    REQUIRE(::setrlimit(RLIMIT_FSIZE, &l) == 0);
  }
  ~FileSizeLimit() {
    ::setrlimit(RLIMIT_FSIZE, &old_);
    ::signal(SIGXFSZ, old_handler_);
  }
  FileSizeLimit(const FileSizeLimit&) = delete;
  FileSizeLimit& operator=(const FileSizeLimit&) = delete;

 private:
  rlimit old_{};
  sighandler_t old_handler_ = SIG_DFL;
};

std::atomic<int> g_signals{0};
extern "C" void count_signal(int) { g_signals.fetch_add(1); }

// The scheduler state of thread `tid` of this process ('S': asleep).
char task_state(long tid) {
  std::ifstream in("/proc/self/task/" + std::to_string(tid) + "/stat");
  const std::string s(std::istreambuf_iterator<char>(in), {});
  const std::size_t paren = s.rfind(')');
  return paren == std::string::npos || paren + 2 >= s.size() ? '?'
                                                             : s[paren + 2];
}

}  // namespace

TEST_CASE("AppendFile: records appended in order, synced, truncated",
          "[i16][append_file]") {
  TempPath t("plain.log");
  auto f = AppendFile::open(t.path, kLedgerStyle, {.mode = 0600});
  REQUIRE(f.ok());
  CHECK(f->is_open());
  CHECK(f->path() == t.path);
  std::string expect;
  for (unsigned i = 0; i < 50; ++i) {
    const std::string rec = pattern(10 + i * 13, i);
    REQUIRE(f->append(rec).ok());
    expect += rec;
  }
  REQUIRE(f->sync().ok());
  CHECK(slurp(t.path) == expect);
  CHECK((fs::status(t.path).permissions() & fs::perms::all) ==
        (fs::perms::owner_read | fs::perms::owner_write));
  // Reopened: appended after what is there (O_APPEND), never over it.
  AppendFile moved = *std::move(f);
  moved = AppendFile();  // closes
  auto g = AppendFile::open(t.path, kLedgerStyle, {.access = O_WRONLY});
  REQUIRE(g.ok());
  REQUIRE(g->append("tail\n").ok());
  CHECK(slurp(t.path) == expect + "tail\n");
  REQUIRE(g->truncate(10, true, "truncate").ok());
  CHECK(slurp(t.path) == expect.substr(0, 10));
  REQUIRE(g->append("x\n").ok());
  CHECK(slurp(t.path) == expect.substr(0, 10) + "x\n");
}

TEST_CASE("AppendFile: an open that fails says so in the log's own words",
          "[i16][append_file]") {
  const std::string missing =
      (fs::temp_directory_path() /
       ("rk_af_no_such_dir_" + std::to_string(::getpid())) / "x.log")
          .string();
  auto l = AppendFile::open(missing, kLedgerStyle, {});
  REQUIRE_FALSE(l.ok());
  CHECK(l.status().code() == absl::StatusCode::kNotFound);  // ENOENT
  CHECK(l.status().message() ==
        "ledger open " + missing + ": No such file or directory");
  auto j = AppendFile::open(missing, kJournalStyle, {});
  REQUIRE_FALSE(j.ok());
  CHECK(j.status().code() == absl::StatusCode::kUnavailable);
  CHECK(j.status().message() ==
        "journal: open " + missing + ": No such file or directory");
}

TEST_CASE(
    "AppendFile: a record is written whole through short writes and EINTR "
    "(a FIFO's writer interrupted by signals)",
    "[i16][append_file]") {
  TempPath t("fifo");
  REQUIRE(::mkfifo(t.path.c_str(), 0600) == 0);
  // A handler without SA_RESTART: a blocked write(2) returns what it wrote
  // so far (a short write), or -1 with EINTR when it wrote nothing.
  struct sigaction sa {};
  sa.sa_handler = count_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = 0;
  struct sigaction old {};
  REQUIRE(::sigaction(SIGUSR1, &sa, &old) == 0);
  g_signals.store(0);

  auto f = AppendFile::open(t.path, kLedgerStyle, {.access = O_RDWR});
  REQUIRE(f.ok());
  const std::string record = pattern(std::size_t{1} << 20, 3);  // > the pipe
  std::atomic<long> tid{0};
  std::atomic<bool> done{false};
  absl::Status st;
  std::thread writer([&] {
    tid.store(static_cast<long>(::syscall(SYS_gettid)));
    st = f->append(record);
    done.store(true);
  });
  const pthread_t handle = writer.native_handle();
  REQUIRE(rk_test::eventually([&] { return tid.load() != 0; }));
  // Three interruptions, each while the writer sleeps in write(2) on the
  // full pipe: the first cuts a write that had filled the pipe (short), the
  // later ones a write that wrote nothing (EINTR).
  int sent = 0;
  for (; sent < 3; ++sent) {
    REQUIRE(rk_test::eventually(
        [&] { return done.load() || task_state(tid.load()) == 'S'; }));
    if (done.load()) break;  // append gave up: checked below
    REQUIRE(::pthread_kill(handle, SIGUSR1) == 0);
    REQUIRE(rk_test::eventually([&] { return g_signals.load() == sent + 1; }));
  }
  std::string got;
  if (!done.load()) {
    const int rd = ::open(t.path.c_str(), O_RDONLY | O_CLOEXEC);
    REQUIRE(rd >= 0);
    char buf[1 << 16];
    while (got.size() < record.size()) {
      const ssize_t n = ::read(rd, buf, sizeof buf);
      if (n < 0 && errno == EINTR) continue;
      REQUIRE(n > 0);
      got.append(buf, static_cast<std::size_t>(n));
    }
    ::close(rd);
  }
  writer.join();
  ::sigaction(SIGUSR1, &old, nullptr);
  CHECK(st.ok());
  CHECK(sent == 3);
  CHECK(g_signals.load() == 3);
  CHECK(got.size() == record.size());
  CHECK(got == record);
}

TEST_CASE(
    "AppendFile: a write the file system refuses (EFBIG) is reported and "
    "leaves no part of the record",
    "[i16][append_file]") {
  TempPath t("efbig.log");
  auto f = AppendFile::open(t.path, kLedgerStyle, {});
  REQUIRE(f.ok());
  const std::string first = pattern(1000, 1);
  REQUIRE(f->append(first).ok());
  const std::string big = pattern(5000, 2);
  absl::Status refused;
  absl::Status journal_style;
  {
    // Room for 100 more bytes: the first write(2) of `big` is short (100
    // bytes), the next one EFBIG.
    FileSizeLimit limit(first.size() + 100);
    refused = f->append(big);
    auto j = AppendFile::open(t.path, kJournalStyle, {});
    REQUIRE(j.ok());
    journal_style = j->append(big);
  }
  CHECK(refused.code() == absl::StatusCode::kOutOfRange);  // EFBIG's own
  CHECK(refused.message() == "ledger write " + t.path + ": File too large");
  CHECK(journal_style.code() == absl::StatusCode::kUnavailable);
  CHECK(journal_style.message() ==
        "journal: write " + t.path + ": File too large");
  // What the refused appends wrote was cut off again.
  CHECK(slurp(t.path) == first);
  // And the next record follows the last whole one.
  REQUIRE(f->append(big).ok());
  REQUIRE(f->sync().ok());
  CHECK(slurp(t.path) == first + big);
}

TEST_CASE(
    "Settle journal: a settle whose line the file system refuses is "
    "kUnavailable, and the journal reopens with every line that was "
    "acknowledged",
    "[i16][append_file]") {
  using rk::detail::SettleJournal;
  TempPath t("journal");
  auto entry = [](int i, std::size_t arg_bytes) {
    return SettleJournal::Entry{{"k" + std::to_string(i)},
                                {std::string(arg_bytes, 'a'), "settle"},
                                rk::Nanos{1'000 + i}};
  };
  {
    auto j = SettleJournal::open(t.path);
    REQUIRE(j.ok());
    REQUIRE((*j)->append(entry(1, 10)).ok());
    absl::Status refused;
    {
      FileSizeLimit limit(fs::file_size(t.path) + 50);
      refused = (*j)->append(entry(2, 4000));  // a line of ~8 KB: cut short
    }
    CHECK(refused.code() == absl::StatusCode::kUnavailable);
    CHECK(refused.message().find("File too large") != absl::string_view::npos);
    CHECK((*j)->size() == 1);
    REQUIRE((*j)->append(entry(3, 10)).ok());
    CHECK((*j)->size() == 2);
  }
  // Before the shared writer, the cut line stayed and the next line was
  // written after it: this open returned kDataLoss.
  auto j = SettleJournal::open(t.path);
  REQUIRE(j.ok());
  const std::vector<SettleJournal::Entry> p = (*j)->pending();
  REQUIRE(p.size() == 2);
  CHECK(p[0].keys == std::vector<std::string>{"k1"});
  CHECK(p[1].keys == std::vector<std::string>{"k3"});
  CHECK(p[1].t == rk::Nanos{1'003});
}

TEST_CASE(
    "Ledger: a record the file system refuses fails the ledger, and the file "
    "verifies with every record acknowledged",
    "[i16][append_file]") {
  TempPath t("ledger.jsonl");
  const rk::Nanos t0{1'796'083'200LL * 1'000'000'000};
  {
    auto ledger = rk::Ledger::open(t.path);
    REQUIRE(ledger.ok());
    for (int i = 0; i < 5; ++i) {
      REQUIRE((*ledger)->append("\"event\":\"x\"", t0).ok());
    }
    absl::StatusOr<std::uint64_t> refused;
    {
      FileSizeLimit limit(fs::file_size(t.path) + 20);
      refused =
          (*ledger)->append("\"event\":\"" + std::string(2000, 'y') + "\"", t0);
    }
    REQUIRE_FALSE(refused.ok());
    CHECK(refused.status().code() == absl::StatusCode::kOutOfRange);
    // Refused for good after a failed write (as after a failed sync).
    CHECK_FALSE((*ledger)->append("\"event\":\"z\"", t0).ok());
  }
  auto v = rk::verify_ledger_file(t.path);
  REQUIRE(v.ok());
  CHECK(v->ok());
  CHECK(v->records == 5);
  CHECK_FALSE(v->torn_tail);
  // It opens and goes on from record 5.
  auto again = rk::Ledger::open(t.path);
  REQUIRE(again.ok());
  auto seq = (*again)->append("\"event\":\"z\"", t0);
  REQUIRE(seq.ok());
  CHECK(*seq == 6);
}
