// ratekeeper/redis/reply.hpp: what Redis answered, as statuses and values.
//
// Internal (namespace detail). Defines:
//   ReplyPtr          an owned hiredis reply
//   not_run()         marks a status "Redis did not run it" (a payload)
//   unanswered()      whether a status says Redis did not answer (what a
//                     node's breaker counts)
//   is_auth_error()   credentials refused, or a command or key denied
//   reply_error()     an error reply as a status (kUnavailable for the
//                     errors Redis answers while it cannot serve)
//   ints_of()         a script's reply: an integer or integers
//   append_text()     any reply as text (RedisClient::command)
#ifndef RATEKEEPER_REDIS_REPLY_HPP_
#define RATEKEEPER_REDIS_REPLY_HPP_

#include <hiredis/hiredis.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "absl/container/inlined_vector.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"
#include "ratekeeper/detail/strings.hpp"

namespace ratekeeper::detail {

struct ReplyDeleter {
  void operator()(redisReply* r) const noexcept { freeReplyObject(r); }
};
using ReplyPtr = std::unique_ptr<redisReply, ReplyDeleter>;

// A script's reply, flattened.
using RedisInts = absl::InlinedVector<std::int64_t, 8>;

// Payloads on a failed call's status:
//   kNotRunPayload    Redis did not run it (never sent, or refused unrun)
//   kAnsweredPayload  on a kUnavailable that is nonetheless Redis's answer
//                     (a WAIT that fewer replicas met): the node's breaker
//                     counts it as an answer
//   kCutPayload       the connection failed on a read or a write (closed
//                     by Redis, reset, broken): the caller may ask a fresh
//                     connection whether Redis closed it over credentials
inline constexpr std::string_view kNotRunPayload = "ratekeeper.redis/not-run";
inline constexpr std::string_view kAnsweredPayload =
    "ratekeeper.redis/answered";
inline constexpr std::string_view kCutPayload = "ratekeeper.redis/cut";

inline absl::Status not_run(absl::Status st) {
  st.SetPayload(av(kNotRunPayload), absl::Cord("1"));
  return st;
}

inline bool has_payload(const absl::Status& st, std::string_view payload) {
  return st.GetPayload(av(payload)).has_value();
}

// A failure that says Redis did not answer (counted by the breaker): a
// kUnavailable that is not an answer (a WAIT that fewer replicas met is
// one: the master answered).
inline bool unanswered(const absl::Status& st) {
  return absl::IsUnavailable(st) && !has_payload(st, kAnsweredPayload);
}

// Whether `st` says the credentials were refused (kUnauthenticated) or the
// user may not run a command or touch a key (kPermissionDenied).
inline bool is_auth_error(const absl::Status& st) {
  return absl::IsUnauthenticated(st) || absl::IsPermissionDenied(st);
}

// An error reply as a status. Redis refuses some commands without running
// them while it cannot serve (loading its data after a restart, a script
// running too long, no master, out of memory): those are kUnavailable,
// like no answer (the fail mode answers; a settle is journaled), marked
// "(not run)"; any other error is kInternal.
//
// Credentials refused (NOAUTH: none given where Redis wants one;
// WRONGPASS) are kUnauthenticated, a command or key the user may not
// touch (NOPERM, and a script's command refused by the ACL) is
// kPermissionDenied: both not run, and not "Redis is down".
inline absl::Status reply_error(std::string_view msg) {
  if (msg.substr(0, 6) == "NOAUTH" || msg.substr(0, 9) == "WRONGPASS") {
    return not_run(absl::UnauthenticatedError(
        absl::StrCat("redis: ", av(msg), " (not run)")));
  }
  constexpr std::string_view kScriptAcl =
      "ERR The user executing the script can";  // 't run ... / 't access
  if (msg.substr(0, 6) == "NOPERM" ||
      msg.substr(0, kScriptAcl.size()) == kScriptAcl) {
    return not_run(absl::PermissionDeniedError(
        absl::StrCat("redis: ", av(msg), " (not run)")));
  }
  for (const std::string_view transient :
       {"LOADING", "BUSY", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "OOM"}) {
    if (msg.substr(0, transient.size()) == transient &&
        (msg.size() == transient.size() || msg[transient.size()] == ' ')) {
      return not_run(absl::UnavailableError(
          absl::StrCat("redis: ", av(msg), " (not run)")));
    }
  }
  return absl::InternalError(absl::StrCat("redis: ", av(msg)));
}
inline absl::Status reply_error(const redisReply& r) {
  return reply_error(std::string_view(r.str, r.len));
}

// A script's reply: an integer or an array of integers.
inline absl::StatusOr<RedisInts> ints_of(const redisReply& reply) {
  RedisInts out;
  if (reply.type == REDIS_REPLY_INTEGER) {
    out.push_back(reply.integer);
  } else if (reply.type == REDIS_REPLY_ARRAY) {
    for (std::size_t i = 0; i < reply.elements; ++i) {
      if (reply.element[i]->type != REDIS_REPLY_INTEGER) {
        return absl::InternalError("redis: a script answered a non-integer");
      }
      out.push_back(reply.element[i]->integer);
    }
  } else if (reply.type == REDIS_REPLY_ERROR) {
    return reply_error(reply);
  } else {
    return absl::InternalError("redis: unexpected reply type");
  }
  return out;
}

// A reply as text: a status, a bulk string, an integer in decimal; arrays
// joined by newlines; nil as nothing.
inline void append_text(const redisReply& r, std::string& out) {
  switch (r.type) {
    case REDIS_REPLY_INTEGER:
      absl::StrAppend(&out, r.integer);
      break;
    case REDIS_REPLY_ARRAY:
      for (std::size_t i = 0; i < r.elements; ++i) {
        if (i != 0) out += '\n';
        append_text(*r.element[i], out);
      }
      break;
    case REDIS_REPLY_NIL:
      break;
    default:
      out.append(r.str, r.len);
  }
}

}  // namespace ratekeeper::detail

#endif  // RATEKEEPER_REDIS_REPLY_HPP_
