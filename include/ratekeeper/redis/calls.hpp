// ratekeeper/redis/calls.hpp: the calls RedisClient makes on one node's
// connection, under one deadline each.
//
// Internal (namespace detail). Defines:
//   run_script()    one script call (ASKING first when redirected by ASK;
//                   SCRIPT LOAD when the SHA is not known; EVAL after
//                   NOSCRIPT; WAIT with wait_replicas)
//   run_pipeline()  many script calls pipelined on one connection: one
//                   write, the replies read in order
//   run_command()   one command, its reply as text
// Routing (which node), breakers and redirections are the caller's
// (client.hpp, cluster.hpp).
#ifndef RATEKEEPER_REDIS_CALLS_HPP_
#define RATEKEEPER_REDIS_CALLS_HPP_

#include <hiredis/hiredis.h>

#include <charconv>
#include <cstddef>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/container/inlined_vector.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "ratekeeper/redis/connection.hpp"
#include "ratekeeper/redis/node.hpp"
#include "ratekeeper/redis/reader.hpp"
#include "ratekeeper/redis/reply.hpp"
#include "ratekeeper/redis/resp.hpp"
#include "ratekeeper/redis/scripts.hpp"

namespace ratekeeper::detail {

// One script call on `node`. One deadline for every round trip of the call
// (a wait for a free connection, ASKING, a script load after NOSCRIPT, the
// script): a decision waits at most command_timeout, plus the time it
// spent opening a connection (at most connect_timeout).
// The reply as `Ints` (a container of integers with push_back and assign).
template <class Ints = RedisInts>
absl::StatusOr<Ints> run_script(const Connector& wire, Node& node, bool asking,
                                const RedisScript& script,
                                std::span<const std::string_view> keys,
                                std::span<const std::string_view> args) {
  Node::Deadline deadline = wire.command_deadline();
  absl::StatusOr<Node::Conn> conn = node.take(deadline, &deadline);
  if (!conn.ok()) return conn.status();
  const auto send_asking = [&]() -> absl::StatusOr<ReplyPtr> {
    const std::string_view a[] = {"ASKING"};
    return wire.roundtrip(**conn, a, deadline);
  };
  if (asking) {
    absl::StatusOr<ReplyPtr> ok = send_asking();
    if (!ok.ok()) return ok.status();
    if ((*ok)->type == REDIS_REPLY_ERROR) {  // NOPERM: no +asking
      node.put_back(*std::move(conn));
      return reply_error(**ok);
    }
  }
  std::string sha = Connector::known_sha(script);
  for (int attempt = 0; attempt < 2; ++attempt) {
    if (sha.empty()) {
      absl::StatusOr<std::string> loaded = wire.load(**conn, script, deadline);
      if (!loaded.ok()) return loaded.status();
      sha = *std::move(loaded);
      if (asking) {  // ASKING holds for the next command only
        absl::StatusOr<ReplyPtr> ok = send_asking();
        if (!ok.ok()) return ok.status();
      }
    }
    if (attempt == 1 && asking) {  // spent on the EVALSHA
      absl::StatusOr<ReplyPtr> ok = send_asking();
      if (!ok.ok()) return ok.status();
    }
    // After NOSCRIPT, EVAL with the source: it cannot answer NOSCRIPT (a
    // flush between a SCRIPT LOAD and an EVALSHA could), and it caches the
    // script again for the next EVALSHA.
    absl::InlinedVector<std::string_view, 16> argv;
    const std::string nkeys = std::to_string(keys.size());
    argv.push_back(attempt == 0 ? "EVALSHA" : "EVAL");
    argv.push_back(attempt == 0 ? std::string_view(sha)
                                : std::string_view(script.source()));
    argv.push_back(nkeys);
    argv.insert(argv.end(), keys.begin(), keys.end());
    argv.insert(argv.end(), args.begin(), args.end());
    // The script, and with wait_replicas its WAIT, in one write; the
    // replies parsed in place (reader.hpp). The exchange ends before the
    // connection goes back (it may hand hiredis bytes it read past them).
    absl::StatusOr<Ints> ints;
    bool replicated = true;
    bool noscript = false;
    {
      ThreadScratch out(kScratchWrite);
      std::string& cmd = out.get();
      cmd.clear();
      resp_command(cmd, {argv});
      const bool waits = wire.options().wait_replicas > 0;
      if (waits) wire.wait_command(cmd);
      Exchange ex(wire, **conn, deadline);
      if (absl::Status st = ex.send(cmd); !st.ok()) return st;
      RespReply reply;
      // A failed read: the connection is gone.
      if (absl::Status st = ex.next(reply); !st.ok()) return st;
      // Judged before WAIT's answer is read: an error's text is a view
      // into the read buffer, which that read may fill again from its
      // start (WAIT's answer comes late when a replica is slow).
      bool error_reply = false;
      if (reply.type == '-') {
        // Redis lost its scripts: run the source once.
        noscript = reply.text.substr(0, 8) == "NOSCRIPT" && attempt == 0;
        ints = reply_error(reply.text);
        error_reply = true;
      } else {
        ints = ints_of<Ints>(reply);
      }
      if (waits) {
        RespReply w;
        if (absl::Status st = ex.next(w); !st.ok()) return st;
        // An error reply: the error is the answer.
        replicated = error_reply || wire.replicas_met(w);
      }
    }
    if (noscript) continue;
    node.put_back(*std::move(conn));
    if (!replicated) return wire.not_replicated(node.host, node.port);
    return ints;
  }
  return absl::InternalError("redis: no answer to the script");
}

// The calls `which` of `calls` (each with .keys and .args; all for `node`),
// pipelined on one connection: every EVALSHA written at once (and one WAIT
// after them with wait_replicas), the replies read in order and parsed in
// place (reader.hpp), under one deadline, each into its place in `out` (as
// `Ints`: a container of integers with push_back and assign). A call
// answered NOSCRIPT, MOVED or ASK is left for the caller to run again alone
// (`redo`); after an I/O failure the calls not answered are kUnavailable.
template <class Call, class Ints>
void run_pipeline(const Connector& wire, Node& node, const RedisScript& script,
                  std::span<const Call> calls,
                  std::span<const std::size_t> which,
                  std::span<absl::StatusOr<Ints>> out,
                  std::vector<std::size_t>& redo) {
  auto fail_from = [&](std::size_t k, const absl::Status& st) {
    for (; k < which.size(); ++k) out[which[k]] = st;
  };
  const bool waits = wire.options().wait_replicas > 0;
  Node::Deadline deadline = wire.command_deadline();
  absl::StatusOr<Node::Conn> conn = node.take(deadline, &deadline);
  if (!conn.ok()) return fail_from(0, conn.status());
  std::string sha = Connector::known_sha(script);
  if (sha.empty()) {
    absl::StatusOr<std::string> loaded = wire.load(**conn, script, deadline);
    if (!loaded.ok()) return fail_from(0, loaded.status());
    sha = *std::move(loaded);
  }
  // Every EVALSHA in RESP, in this thread's reused buffer, written at once.
  ThreadScratch scratch(kScratchWrite);
  std::string& cmds = scratch.get();
  cmds.clear();
  for (const std::size_t i : which) {
    char nkeys[24];
    const auto len = static_cast<std::size_t>(
        std::to_chars(nkeys, nkeys + sizeof(nkeys), calls[i].keys.size()).ptr -
        nkeys);
    const std::string_view head[] = {"EVALSHA", sha,
                                     std::string_view(nkeys, len)};
    resp_command(cmds, {head, calls[i].keys, calls[i].args});
  }
  if (waits) wire.wait_command(cmds);
  bool replicated = true;
  absl::Status wait_status;
  {
    Exchange ex(wire, **conn, deadline);
    if (absl::Status st = ex.send(cmds); !st.ok()) return fail_from(0, st);
    RespReply reply;
    for (std::size_t k = 0; k < which.size(); ++k) {
      if (absl::Status st = ex.next(reply); !st.ok()) return fail_from(k, st);
      if (reply.type == '-') {
        const std::string_view msg = reply.text;
        if (msg.substr(0, 8) == "NOSCRIPT" || msg.substr(0, 6) == "MOVED " ||
            msg.substr(0, 4) == "ASK ") {
          redo.push_back(which[k]);
          continue;
        }
      }
      out[which[k]] = ints_of<Ints>(reply);
    }
    if (waits) {
      // Without the WAIT's answer no call of the batch is known replicated.
      wait_status = ex.next(reply);
      replicated = wait_status.ok() && wire.replicas_met(reply);
    }
  }
  if (waits) {
    for (const std::size_t i : which) {
      if (out[i].ok() && !replicated) {
        out[i] = wait_status.ok() ? wire.not_replicated(node.host, node.port)
                                  : wait_status;
      }
    }
    if (!wait_status.ok()) return;
  }
  node.put_back(*std::move(conn));
}

// One command on `node`: the reply as text (append_text()); an error reply
// is kInternal, or the auth status reply_error() gives it.
inline absl::StatusOr<std::string> run_command(
    const Connector& wire, Node& node, std::span<const std::string_view> argv) {
  Node::Deadline deadline = wire.command_deadline();
  absl::StatusOr<Node::Conn> conn = node.take(deadline, &deadline);
  if (!conn.ok()) return conn.status();
  absl::StatusOr<ReplyPtr> r = wire.roundtrip(**conn, argv, deadline);
  if (!r.ok()) return r.status();
  const redisReply& reply = **r;
  std::string out;
  if (reply.type == REDIS_REPLY_ERROR) {
    out.assign(reply.str, reply.len);
    node.put_back(*std::move(conn));
    if (absl::Status st = reply_error(out); is_auth_error(st)) return st;
    return absl::InternalError(absl::StrCat("redis: ", out));
  }
  append_text(reply, out);
  node.put_back(*std::move(conn));
  return out;
}

}  // namespace ratekeeper::detail

#endif  // RATEKEEPER_REDIS_CALLS_HPP_
