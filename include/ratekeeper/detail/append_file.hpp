// ratekeeper/detail/append_file.hpp: the durable-log writer shared by the
// ledger (budget/ledger.hpp) and the settle journal (redis/journal.hpp).
//
// Defines:
//   FileErrors  how a file's errno reads as a status (each log its own)
//   AppendFile  one file opened O_APPEND: a record written whole or not at
//               all, fdatasync, truncate, the descriptor's lifetime
//   sync_dir_of fsync of the directory that names a file
//
// What both logs do the same lives here; what they do differently stays
// with them: the ledger is append-only and hash-chained (a record once
// written is never taken back, a torn tail is cut only at open, and one
// writer holds a flock), the journal is emptied once its lines ran and sets
// stale lines aside to another file. Group commit is detail::GroupSync
// (journal) or the ledger's syncer thread, over AppendFile::sync().
#ifndef RATEKEEPER_DETAIL_APPEND_FILE_HPP_
#define RATEKEEPER_DETAIL_APPEND_FILE_HPP_

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "ratekeeper/detail/strings.hpp"

namespace ratekeeper::detail {

// FileErrors: "<prefix><what> <path>: <strerror(errno)>", with the status
// code `code`, or (unset) the errno's own (absl::ErrnoToStatusCode: ENOSPC
// kResourceExhausted, EFBIG kOutOfRange, ...).
struct FileErrors {
  std::string_view prefix;
  std::optional<absl::StatusCode> code = std::nullopt;

  absl::Status operator()(int err, std::string_view what,
                          std::string_view path) const {
    return absl::Status(code ? *code : absl::ErrnoToStatusCode(err),
                        absl::StrCat(av(prefix), av(what), " ", av(path), ": ",
                                     std::strerror(err)));
  }
};

// fsyncs the directory holding `path` (its entry, after a create).
inline absl::Status sync_dir_of(const std::string& path,
                                const FileErrors& errors) {
  const std::size_t slash = path.rfind('/');
  const std::string dir = slash == std::string::npos ? std::string(".")
                          : slash == 0               ? std::string("/")
                                                     : path.substr(0, slash);
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0) return errors(errno, "open directory", dir);
  const int rc = ::fsync(dfd);
  const int e = errno;
  ::close(dfd);
  if (rc != 0) return errors(e, "fsync directory", dir);
  return absl::OkStatus();
}

// AppendFile: a log file opened for appending (O_APPEND, O_CLOEXEC), closed
// by the destructor. Move-only. Appends come one at a time (the log's
// lock); sync() may run beside an append (as fdatasync(2) and write(2) may)
// and covers every append that returned before it started.
class AppendFile {
 public:
  struct Options {
    int access = O_RDWR;  // or O_WRONLY (never read back)
    mode_t mode = 0644;   // a file it creates
    // A file it creates has its directory fsynced before open returns, so
    // that its name survives a crash, not only its contents.
    bool sync_dir_on_create = true;
  };

  // Opens (or creates) `path`.
  static absl::StatusOr<AppendFile> open(std::string path, FileErrors errors,
                                         Options o) {
    struct stat st {};
    const bool existed = ::stat(path.c_str(), &st) == 0;
    const int fd =
        ::open(path.c_str(), o.access | O_APPEND | O_CREAT | O_CLOEXEC, o.mode);
    if (fd < 0) return errors(errno, "open", path);
    AppendFile f(fd, std::move(path), errors);
    if (!existed && o.sync_dir_on_create) {
      if (absl::Status s = sync_dir_of(f.path_, errors); !s.ok()) return s;
    }
    return f;
  }

  AppendFile() = default;
  AppendFile(AppendFile&& o) noexcept { *this = std::move(o); }
  AppendFile& operator=(AppendFile&& o) noexcept {
    if (this != &o) {
      close();
      fd_ = std::exchange(o.fd_, -1);
      path_ = std::move(o.path_);
      errors_ = o.errors_;
    }
    return *this;
  }
  AppendFile(const AppendFile&) = delete;
  AppendFile& operator=(const AppendFile&) = delete;
  ~AppendFile() { close(); }

  bool is_open() const noexcept { return fd_ >= 0; }
  int fd() const noexcept { return fd_; }
  const std::string& path() const noexcept { return path_; }

  // append
  //
  // Writes all of `bytes` at the end of the file: a short write goes on
  // with the rest, EINTR is retried. On an error (EFBIG, ENOSPC, EIO) what
  // this call wrote is cut off again, so that the file never keeps part of
  // a record that a later record would follow (a reader would find a
  // damaged line in the middle); the error is returned. Not durable until
  // sync().
  absl::Status append(std::string_view bytes) {
    std::size_t done = 0;
    while (done < bytes.size()) {
      const ssize_t w = ::write(fd_, bytes.data() + done, bytes.size() - done);
      if (w < 0) {
        if (errno == EINTR) continue;
        const int e = errno;
        if (done > 0) static_cast<void>(cut_back(done));
        return errors_(e, "write", path_);
      }
      done += static_cast<std::size_t>(w);
    }
    return absl::OkStatus();
  }

  // fdatasync(2): every append that returned before it is on disk.
  absl::Status sync() {
    if (::fdatasync(fd_) != 0) return errors_(errno, "fdatasync", path_);
    return absl::OkStatus();
  }

  // Cuts the file to `size` bytes, then (with `sync`) syncs it; an error
  // reads "<what> <path>".
  absl::Status truncate(std::uint64_t size, bool sync, std::string_view what) {
    if (::ftruncate(fd_, static_cast<off_t>(size)) != 0 ||
        (sync && ::fdatasync(fd_) != 0)) {
      return errors_(errno, what, path_);
    }
    return absl::OkStatus();
  }

  // The status of errno now, for `what` on this file.
  absl::Status error(std::string_view what) const {
    return errors_(errno, what, path_);
  }

 private:
  AppendFile(int fd, std::string path, FileErrors errors)
      : fd_(fd), path_(std::move(path)), errors_(errors) {}

  void close() noexcept {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

  // Takes the last `n` bytes off (one writer: they are this append's).
  bool cut_back(std::size_t n) {
    struct stat st {};
    if (::fstat(fd_, &st) != 0 || static_cast<std::uint64_t>(st.st_size) < n) {
      return false;
    }
    return ::ftruncate(fd_, st.st_size - static_cast<off_t>(n)) == 0;
  }

  int fd_ = -1;
  std::string path_;
  FileErrors errors_;
};

}  // namespace ratekeeper::detail

#endif  // RATEKEEPER_DETAIL_APPEND_FILE_HPP_
