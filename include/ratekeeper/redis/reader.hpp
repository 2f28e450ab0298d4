// ratekeeper/redis/reader.hpp: Redis's replies read from the socket and
// parsed in place, and commands written from the caller's buffer: the hot
// paths (a script call, a pipeline of them) without hiredis's reply objects
// (a calloc per array and per integer, and a free of each) and without a
// copy of every command into hiredis's output buffer.
//
// Internal (namespace detail). Defines:
//   RespReply     one reply, parsed: its type, its integer, its text (a view
//                 into the reader's buffer) and, for an array, its integer
//                 elements in a fixed inline array
//   parse_reply() one RESP2 reply from a byte range: done (and how many
//                 bytes), incomplete, or malformed (and why)
//   Exchange      one use of a connection: send() and next() under the
//                 call's deadline. On a clean connection (hiredis's output
//                 buffer empty, its reader holding no bytes) it writes with
//                 send() and reads with recv() into a per-thread buffer;
//                 else through hiredis, the replies converted. Bytes read
//                 past the last reply are handed to hiredis's reader when
//                 it ends, so that the connection's next user sees them.
//   ints_of()     a script's reply as integers, as reply.hpp's ints_of()
//                 gives it from a hiredis reply
#ifndef RATEKEEPER_REDIS_READER_HPP_
#define RATEKEEPER_REDIS_READER_HPP_

#include <hiredis/hiredis.h>
#include <poll.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <utility>

#include "absl/container/inlined_vector.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "ratekeeper/detail/strings.hpp"
#include "ratekeeper/redis/connection.hpp"
#include "ratekeeper/redis/reply.hpp"

namespace ratekeeper::detail {

// An array nested deeper than this is refused, as hiredis 0.14 refuses it
// ("No support for nested multi bulk replies with depth > 7").
inline constexpr int kRespMaxDepth = 7;
// The longest bulk string accepted (Redis's proto-max-bulk-len default).
inline constexpr std::int64_t kRespMaxBulk = 512LL * 1024 * 1024;

// One reply. `type` is RESP's type byte: '+' status, '-' error, ':'
// integer, '$' bulk string, '*' array; 'n' for a nil ($-1 or *-1).
struct RespReply {
  char type = 0;
  std::int64_t integer = 0;  // ':' its value; '*' how many elements
  std::string_view text;     // '+', '-', '$' (valid until the next read)
  bool all_ints = true;      // '*': every element an integer, in `ints`
  absl::InlinedVector<std::int64_t, 16> ints;
};

enum class RespParse { kDone, kIncomplete, kMalformed };

namespace resp_internal {

// The first "\r\n" at or after `p` (a lone '\r' is part of the line, as
// hiredis reads it), or nullptr when the bytes end first.
inline const char* find_crlf(const char* p, const char* end) {
  while (p < end) {
    const auto* cr =
        static_cast<const char*>(std::memchr(p, '\r', std::size_t(end - p)));
    if (cr == nullptr || cr + 1 >= end) return nullptr;
    if (cr[1] == '\n') return cr;
    p = cr + 1;
  }
  return nullptr;
}

// A whole line as a signed 64-bit decimal in canonical form, as hiredis
// reads it (Redis's string2ll): "0", or an optional '-' then digits not
// starting with '0' ("-0", "007" and "+5" are refused).
inline bool to_int(const char* p, const char* e, std::int64_t& out) {
  if (p == e || *p == '+') return false;
  const char* digits = *p == '-' ? p + 1 : p;
  if (digits == e || (*digits == '0' && (digits != p || e - p > 1))) {
    return false;
  }
  const std::from_chars_result r = std::from_chars(p, e, out);
  return r.ec == std::errc() && r.ptr == e;
}

// One element's header at `p` (and a bulk string's body): `type`, its
// integer (an array's count) and text; `p` moves past what it read.
inline RespParse head(const char*& p, const char* end, char& type,
                      std::int64_t& n, std::string_view& text,
                      std::string_view& why) {
  if (p >= end) return RespParse::kIncomplete;
  const char t = *p;
  const char* line = p + 1;
  const char* cr = find_crlf(line, end);
  if (cr == nullptr) return RespParse::kIncomplete;
  switch (t) {
    case '+':
    case '-':
      type = t;
      text = std::string_view(line, std::size_t(cr - line));
      p = cr + 2;
      return RespParse::kDone;
    case ':':
      if (!to_int(line, cr, n)) {
        why = "bad integer";
        return RespParse::kMalformed;
      }
      type = ':';
      p = cr + 2;
      return RespParse::kDone;
    case '$': {
      std::int64_t len = 0;
      if (!to_int(line, cr, len) || len < -1 || len > kRespMaxBulk) {
        why = "bad bulk length";
        return RespParse::kMalformed;
      }
      const char* body = cr + 2;
      if (len == -1) {
        type = 'n';
        p = body;
        return RespParse::kDone;
      }
      const auto size = static_cast<std::size_t>(len);
      if (std::size_t(end - body) < size + 2) return RespParse::kIncomplete;
      if (body[size] != '\r' || body[size + 1] != '\n') {
        why = "bulk string not ended by CRLF";
        return RespParse::kMalformed;
      }
      type = '$';
      text = std::string_view(body, size);
      p = body + size + 2;
      return RespParse::kDone;
    }
    case '*':
      if (!to_int(line, cr, n) || n < -1) {
        why = "bad array length";
        return RespParse::kMalformed;
      }
      type = n == -1 ? 'n' : '*';
      if (n == -1) n = 0;
      p = cr + 2;
      return RespParse::kDone;
    default:
      why = "bad reply type byte";
      return RespParse::kMalformed;
  }
}

// The `n` elements of an array at `depth` (the top reply's are at 1),
// read and left.
inline RespParse skip_elements(const char*& p, const char* end, std::int64_t n,
                               int depth, std::string_view& why) {
  for (std::int64_t i = 0; i < n; ++i) {
    char t = 0;
    std::int64_t m = 0;
    std::string_view s;
    const char* item = p;
    if (const RespParse r = head(p, end, t, m, s, why); r != RespParse::kDone) {
      return r;
    }
    // A nil array (*-1) counts as an array for the depth, as hiredis
    // counts it (fuzz_resp found one accepted at depth 8).
    if (t == '*' || (t == 'n' && *item == '*')) {
      if (depth + 1 > kRespMaxDepth) {
        why = "arrays nested too deep";
        return RespParse::kMalformed;
      }
    }
    if (t == '*') {
      if (const RespParse r = skip_elements(p, end, m, depth + 1, why);
          r != RespParse::kDone) {
        return r;
      }
    }
  }
  return RespParse::kDone;
}

}  // namespace resp_internal

// parse_reply
//
// One reply from [begin, end) into `out`: kDone with `used` the bytes it
// took, kIncomplete when more bytes are needed, kMalformed (with `why`)
// for bytes that are not RESP2.
inline RespParse parse_reply(const char* begin, const char* end, RespReply& out,
                             std::size_t& used, std::string_view& why) {
  using resp_internal::head;
  out.ints.clear();
  out.all_ints = true;
  out.text = {};
  out.integer = 0;
  const char* p = begin;
  if (const RespParse r = head(p, end, out.type, out.integer, out.text, why);
      r != RespParse::kDone) {
    return r;
  }
  if (out.type == '*') {
    for (std::int64_t i = 0; i < out.integer; ++i) {
      char t = 0;
      std::int64_t n = 0;
      std::string_view s;
      if (const RespParse r = head(p, end, t, n, s, why);
          r != RespParse::kDone) {
        return r;
      }
      if (t == ':') {
        if (out.all_ints) out.ints.push_back(n);
        continue;
      }
      out.all_ints = false;
      if (t == '*') {
        if (const RespParse r = resp_internal::skip_elements(p, end, n, 1, why);
            r != RespParse::kDone) {
          return r;
        }
      }
    }
  }
  used = std::size_t(p - begin);
  return RespParse::kDone;
}

// A script's reply (an integer or an array of integers) as `Ints`, with the
// statuses reply.hpp's ints_of() gives a hiredis reply.
// (Each vector is made whole by its constructor: GCC 12's -O1 with ASan
// warns maybe-uninitialized on an InlinedVector filled after a default
// construction.)
template <class Ints = RedisInts>
absl::StatusOr<Ints> ints_of(const RespReply& r) {
  switch (r.type) {
    case ':':
      return Ints(1, r.integer);
    case '*':
      if (!r.all_ints) {
        return absl::InternalError("redis: a script answered a non-integer");
      }
      return Ints(r.ints.begin(), r.ints.end());
    case '-':
      return reply_error(r.text);
    default:
      return absl::InternalError("redis: unexpected reply type");
  }
}

// A hiredis reply as a RespReply (its text a view into `h`).
inline void from_hiredis(const redisReply& h, RespReply& out) {
  out.ints.clear();
  out.all_ints = true;
  out.text = {};
  out.integer = 0;
  switch (h.type) {
    case REDIS_REPLY_INTEGER:
      out.type = ':';
      out.integer = h.integer;
      break;
    case REDIS_REPLY_ARRAY:
      out.type = '*';
      out.integer = static_cast<std::int64_t>(h.elements);
      for (std::size_t i = 0; i < h.elements; ++i) {
        if (h.element[i]->type != REDIS_REPLY_INTEGER) {
          out.all_ints = false;
          break;
        }
        out.ints.push_back(h.element[i]->integer);
      }
      break;
    case REDIS_REPLY_NIL:
      out.type = 'n';
      break;
    default:
      out.type = h.type == REDIS_REPLY_ERROR    ? '-'
                 : h.type == REDIS_REPLY_STATUS ? '+'
                                                : '$';
      out.text = std::string_view(h.str, h.len);
  }
}

// A string kept per thread and lent out (a command buffer, a read buffer):
// its capacity stays, so a thread's calls allocate nothing once it has
// grown. Its contents are what the last loan left. A second loan on the
// same thread at once gets a fresh string.
class ThreadScratch {
 public:
  explicit ThreadScratch(int which) : slot_(slot(which)) { s_.swap(slot_); }
  ~ThreadScratch() {
    // Kept up to kKeep: a rare huge batch or reply is not held for the
    // thread's life.
    if (slot_.capacity() < s_.capacity() && s_.capacity() <= kKeep) {
      s_.swap(slot_);
    }
  }
  ThreadScratch(const ThreadScratch&) = delete;
  ThreadScratch& operator=(const ThreadScratch&) = delete;
  std::string& get() noexcept { return s_; }

 private:
  static constexpr std::size_t kKeep = std::size_t{1} << 20;
  static std::string& slot(int which) {
    thread_local std::string slots[2];
    return slots[which];
  }
  std::string& slot_;
  std::string s_;
};
inline constexpr int kScratchWrite = 0;
inline constexpr int kScratchRead = 1;

// Exchange: one use of a connection, under one deadline. Not thread-safe
// (one caller holds the connection). Every failure leaves the connection
// in an unknown state: the caller drops it (by not putting it back).
class Exchange {
 public:
  using Deadline = Connector::Deadline;

  Exchange(const Connector& wire, redisContext& c, Deadline deadline)
      : wire_(wire),
        c_(c),
        deadline_(deadline),
        direct_(clean(c)),
        buf_(kScratchRead) {}
  ~Exchange() {
    // Bytes past the last reply read (none in a request and its replies):
    // the connection's, for whoever reads it next through hiredis.
    if (direct_ && begin_ < end_) {
      redisReaderFeed(c_.reader, buf_.get().data() + begin_, end_ - begin_);
    }
  }
  Exchange(const Exchange&) = delete;
  Exchange& operator=(const Exchange&) = delete;

  // Whether `c` holds nothing of its own to write or to read: hiredis's
  // output buffer empty, no bytes in its reader, no reply half read.
  static bool clean(const redisContext& c) {
    return c.err == 0 && c.reader != nullptr && c.reader->err == 0 &&
           c.reader->ridx == -1 && c.reader->pos >= c.reader->len &&
           sdslen(c.obuf) == 0;
  }
  bool direct() const noexcept { return direct_; }

  // Writes `bytes` (commands in RESP) whole.
  absl::Status send(std::string_view bytes) {
    if (!direct_) {
      if (redisAppendFormattedCommand(&c_, bytes.data(), bytes.size()) !=
          REDIS_OK) {
        return wire_.unavailable(c_.errstr);
      }
      return wire_.flush(c_, deadline_);
    }
    while (!bytes.empty()) {
      const ssize_t n = ::send(c_.fd, bytes.data(), bytes.size(), MSG_NOSIGNAL);
      if (n > 0) {
        bytes.remove_prefix(static_cast<std::size_t>(n));
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        if (!wait_fd(c_.fd, POLLOUT, deadline_)) {
          return wire_.unavailable("timed out writing");
        }
        continue;
      }
      return wire_.io_failed(std::strerror(n < 0 ? errno : EPIPE));
    }
    return absl::OkStatus();
  }

  // The next reply, into `out` (its text valid until the next call).
  absl::Status next(RespReply& out) {
    if (!direct_) {
      absl::StatusOr<ReplyPtr> r = wire_.read_reply(c_, deadline_);
      if (!r.ok()) return r.status();
      held_ = *std::move(r);
      from_hiredis(*held_, out);
      return absl::OkStatus();
    }
    std::string& b = buf_.get();
    for (;;) {
      if (begin_ < end_) {
        std::size_t used = 0;
        std::string_view why;
        const RespParse r =
            parse_reply(b.data() + begin_, b.data() + end_, out, used, why);
        if (r == RespParse::kDone) {
          begin_ += used;
          return absl::OkStatus();
        }
        if (r == RespParse::kMalformed) {
          return wire_.unavailable(absl::StrCat("Protocol error: ", av(why)));
        }
      }
      if (!wait_fd(c_.fd, POLLIN, deadline_)) {
        return wire_.unavailable("timed out waiting for the reply");
      }
      if (absl::Status st = fill(b); !st.ok()) return st;
    }
  }

 private:
  // One recv() into the buffer's free end (room made first: the unread
  // bytes moved to the front, or the buffer grown).
  absl::Status fill(std::string& b) {
    if (begin_ == end_) begin_ = end_ = 0;
    if (b.size() - end_ < kMinRead) {
      if (begin_ > 0) {
        std::memmove(b.data(), b.data() + begin_, end_ - begin_);
        end_ -= begin_;
        begin_ = 0;
      }
      if (b.size() - end_ < kMinRead) {
        b.resize(std::max(b.size() * 2, kInitial));
      }
    }
    for (;;) {
      const ssize_t n = ::recv(c_.fd, b.data() + end_, b.size() - end_, 0);
      if (n > 0) {
        end_ += static_cast<std::size_t>(n);
        return absl::OkStatus();
      }
      if (n == 0) return wire_.io_failed("Server closed the connection");
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return absl::OkStatus();
      return wire_.io_failed(std::strerror(errno));
    }
  }

  static constexpr std::size_t kInitial = 16 * 1024;
  static constexpr std::size_t kMinRead = 4 * 1024;

  const Connector& wire_;
  redisContext& c_;
  const Deadline deadline_;
  const bool direct_;
  ThreadScratch buf_;
  std::size_t begin_ = 0, end_ = 0;  // the unread bytes of buf_
  ReplyPtr held_;                    // through hiredis: the last reply
};

}  // namespace ratekeeper::detail

#endif  // RATEKEEPER_REDIS_READER_HPP_
