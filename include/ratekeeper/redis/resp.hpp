// ratekeeper/redis/resp.hpp: commands in Redis's protocol (RESP), written
// into one buffer.
//
// What hiredis's redisAppendCommandArgv writes, without an sds string per
// command (formatted by sdscatfmt, argument by argument) and a copy into
// the connection's buffer per command: a pipeline of many script calls is
// written into one std::string and handed to hiredis at once
// (redisAppendFormattedCommand).
#ifndef RATEKEEPER_REDIS_RESP_HPP_
#define RATEKEEPER_REDIS_RESP_HPP_

#include <charconv>
#include <cstddef>
#include <initializer_list>
#include <span>
#include <string>
#include <string_view>

namespace ratekeeper::detail {

// "<kind><n>\r\n": an array's ('*') or a bulk string's ('$') header.
inline void resp_header(std::string& out, char kind, std::size_t n) {
  char buf[24];
  buf[0] = kind;
  char* end = std::to_chars(buf + 1, buf + sizeof(buf) - 2, n).ptr;
  *end++ = '\r';
  *end++ = '\n';
  out.append(buf, static_cast<std::size_t>(end - buf));
}

// One command whose arguments are those of `parts`, in order (e.g. a
// command's name and fixed arguments, then its keys, then its arguments).
inline void resp_command(
    std::string& out,
    std::initializer_list<std::span<const std::string_view>> parts) {
  std::size_t n = 0;
  for (const auto& p : parts) n += p.size();
  resp_header(out, '*', n);
  for (const auto& p : parts) {
    for (const std::string_view a : p) {
      resp_header(out, '$', a.size());
      out.append(a);
      out.append("\r\n", 2);
    }
  }
}

}  // namespace ratekeeper::detail

#endif  // RATEKEEPER_REDIS_RESP_HPP_
