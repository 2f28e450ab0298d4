// libFuzzer target (issue 16, "Cost"): the RESP reader of the Redis hot
// paths (ratekeeper/redis/reader.hpp) against hiredis's own reader.
//
// The input, as bytes from Redis, is parsed reply by reply by
// parse_reply() and fed in two chunks (cut where the first byte says) to
// hiredis's reader. parse_reply() never reads outside the input and never
// loops; each reply it reads whole (kDone) hiredis must read too, with the
// same type, integer, text and integer elements, and the same status from
// ints_of(). Where ours says malformed, hiredis 0.14 (which does not check
// integers) may still accept: nothing more is compared after that.
#include <hiredis/hiredis.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <string_view>

#include "ratekeeper/redis/reader.hpp"

namespace rd = ratekeeper::detail;

namespace {

void check(bool ok) {
  if (!ok) std::abort();
}

struct ReaderDeleter {
  void operator()(redisReader* r) const { redisReaderFree(r); }
};

void same(const rd::RespReply& r, const redisReply& h) {
  switch (h.type) {
    case REDIS_REPLY_INTEGER:
      check(r.type == ':' && r.integer == h.integer);
      break;
    case REDIS_REPLY_NIL:
      check(r.type == 'n');
      break;
    case REDIS_REPLY_STATUS:
    case REDIS_REPLY_ERROR:
    case REDIS_REPLY_STRING:
      check(r.type == (h.type == REDIS_REPLY_STATUS  ? '+'
                       : h.type == REDIS_REPLY_ERROR ? '-'
                                                     : '$'));
      check(r.text == std::string_view(h.str, h.len));
      break;
    case REDIS_REPLY_ARRAY: {
      check(r.type == '*');
      check(r.integer == static_cast<std::int64_t>(h.elements));
      bool all = true;
      for (std::size_t i = 0; i < h.elements; ++i) {
        all = all && h.element[i]->type == REDIS_REPLY_INTEGER;
      }
      check(r.all_ints == all);
      if (all) {
        check(r.ints.size() == h.elements);
        for (std::size_t i = 0; i < h.elements; ++i) {
          check(r.ints[i] == h.element[i]->integer);
        }
      }
      break;
    }
    default:
      check(false);
  }
  const auto ours = rd::ints_of<rd::RedisInts>(r);
  const auto theirs = rd::ints_of(h);
  check(ours.ok() == theirs.ok());
  if (ours.ok()) {
    check(*ours == *theirs);
  } else {
    check(ours.status() == theirs.status());
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data,
                                      std::size_t size) {
  if (size == 0) return 0;
  const std::size_t cut = data[0] % size;
  const std::string bytes(reinterpret_cast<const char*>(data) + 1, size - 1);
  std::unique_ptr<redisReader, ReaderDeleter> h(redisReaderCreate());
  check(redisReaderFeed(h.get(), bytes.data(), std::min(cut, bytes.size())) ==
        REDIS_OK);
  bool fed_all = cut >= bytes.size();
  std::size_t at = 0;
  for (;;) {
    rd::RespReply r;
    std::size_t used = 0;
    std::string_view why;
    const rd::RespParse p = rd::parse_reply(
        bytes.data() + at, bytes.data() + bytes.size(), r, used, why);
    if (p != rd::RespParse::kDone) {
      check(p == rd::RespParse::kIncomplete || !why.empty());
      return 0;
    }
    check(used > 0 && used <= bytes.size() - at);
    at += used;
    void* reply = nullptr;
    for (;;) {
      check(redisReaderGetReply(h.get(), &reply) == REDIS_OK);
      if (reply != nullptr || fed_all) break;
      check(redisReaderFeed(h.get(), bytes.data() + cut, bytes.size() - cut) ==
            REDIS_OK);
      fed_all = true;
    }
    check(reply != nullptr);
    same(r, *static_cast<redisReply*>(reply));
    freeReplyObject(reply);
  }
}
