// The previous release's lua/token_bucket.lua (with lua/now.lua before it,
// as cmake/ratekeeper_lua.cmake joins them), kept verbatim: it took
// limits.lua's 10 arguments (the time, the op, "tb", num, den, burst, "0",
// the cost, the flags, a nonce). Tests run it beside the current script on
// the same keys (a fleet half upgraded: the stored state is shared), and
// ratekeeper_bench runs it beside the current one (before and after, in one
// run).
#ifndef RATEKEEPER_TESTS_REDIS_TB_PREV_HPP_
#define RATEKEEPER_TESTS_REDIS_TB_PREV_HPP_

namespace rk_test {

inline constexpr char kPrevTokenBucketScript[] = R"rk_lua(
-- now.lua
-- now: the script's time in microseconds, ARGV[1] when a test passes one
-- (test_time), else Redis's TIME.
local test_time = ARGV[1] ~= ''
local now
if test_time then
  now = tonumber(ARGV[1])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
-- token_bucket.lua
-- token_bucket.lua: the single acquire or peek of a TokenBucket (the most
-- common call), as its own script (after now.lua): the same arguments,
-- steps and stored state as limits.lua's token_bucket on one item without
-- charge-on-reject, written for Redis's time per call (docs/redis.md,
-- "Cost"): no closures or tables built per call, each division inline
-- (floor of the quotient, corrected to be exact as arith.lua's idiv), the
-- state's fields read by one match and used as numbers by Lua's coercion.
--
-- Its reply is private to RedisLimit (limit.hpp, expand_lean), and short:
-- {1, now, after, aux} admitted, {0, now, r} refused, where r is the
-- stretch (in 1/den us) the state held and after the one it holds now.
-- The rest of limits.lua's reply (the limit, remaining, retry, reset) is a
-- function of these and the arguments: the client computes it, exactly,
-- rather than the script, which saves Redis the divisions and a 9-integer
-- reply per call.
local key = KEYS[1]
local floor = math.floor
local num, den, burst = tonumber(ARGV[4]), tonumber(ARGV[5]),
                        tonumber(ARGV[6])
local c = tonumber(ARGV[8])
local span = burst * num
-- The stored "whole frac [aux]" (limits.lua's token_bucket): a state absent
-- or idle is born again, its give-back counter at the nonce (ARGV[10]).
local r, aux = 0, ARGV[10]
local raw = redis.call('GET', key)
if raw then
  local w, f, a = string.match(raw, '^(%-?%d+) (%-?%d+) ?(%-?%d*)')
  local d = w - now
  f = f + 0
  if d > 0 or (d == 0 and f > 0) then
    r = d * den + f
    if a == '' then aux = 0 else aux = a end
  end
end
-- A zero cost is always allowed, in debt too (r above span).
if c <= burst and (r + c * num <= span or c == 0) then
  local after = r + c * num
  if c > 0 and ARGV[2] == 'acquire' then
    -- whole = floor(after / den), reset = ceil(after / den)
    local whole, reset = 0, 0
    if after > 0 then
      whole = floor(after / den)
      if whole * den > after then
        whole = whole - 1
      elseif (whole + 1) * den <= after then
        whole = whole + 1
      end
      reset = whole
      if whole * den < after then reset = whole + 1 end
    end
    -- limits.lua's store(): the TTL ends when the state would be idle.
    local ms = floor((reset + 999) / 1000) + 1
    if test_time and ms < 600000 then ms = 600000 end
    redis.call('SET', key, string.format('%d %d %s', now + whole,
                                          after - whole * den, aux), 'PX', ms)
  end
  return {1, now, after, tonumber(aux)}
end
return {0, now, r}
)rk_lua";

}  // namespace rk_test

#endif  // RATEKEEPER_TESTS_REDIS_TB_PREV_HPP_
