-- token_bucket.lua: the single acquire or peek of a TokenBucket (the most
-- common call), as its own script (after now.lua): the same steps and
-- stored state as limits.lua's token_bucket on one item without
-- charge-on-reject, written for Redis's time per call (docs/redis.md,
-- "Cost"): no closures or tables built per call, each division inline
-- (floor of the quotient, corrected to be exact as arith.lua's idiv), the
-- state's fields cut by plain finds and used as numbers by Lua's coercion.
--
-- Its arguments are its own (RedisLimit's append_lean, limit.hpp), only
-- what it reads, as each one costs Redis a Lua string per call:
--   ARGV[1] now (us) or "" (now.lua), ARGV[2] "acquire" or "peek",
--   ARGV[3..5] the twin's num, den, burst, ARGV[6] the cost,
--   ARGV[7] the nonce (where a state born again starts its counter).
-- Its stored state is limits.lua's, "whole frac aux", read and written in
-- the same form, so this script, limits.lua and the previous release of
-- this script (which took limits.lua's 10 arguments) share keys: a fleet
-- may run both releases during an upgrade (tests/redis_test.cpp, [i16]).
--
-- Its reply is private to RedisLimit (limit.hpp, expand_lean), and short:
-- {1, now, after, aux} admitted, {0, now, r} refused, where r is the
-- stretch (in 1/den us) the state held and after the one it holds now.
-- The rest of limits.lua's reply (the limit, remaining, retry, reset) is a
-- function of these and the arguments: the client computes it, exactly,
-- rather than the script, which saves Redis the divisions and a 9-integer
-- reply per call.
local key = KEYS[1]
local num, den, burst = tonumber(ARGV[3]), tonumber(ARGV[4]),
                        tonumber(ARGV[5])
local c = tonumber(ARGV[6])
local span = burst * num
-- The stored "whole frac [aux]" (limits.lua's token_bucket): a state absent
-- or idle is born again, its give-back counter at the nonce. Its fields
-- are cut at the spaces by plain finds (a pattern's match costs Redis
-- more), and a frac of "0" (a whole number of us per token) is not
-- converted. A counter that is not a number is read as 0, as limits.lua's
-- fields() reads it, before anything is written; a value without a space
-- fails the script.
local r, aux, auxn = 0, ARGV[7], nil
local raw = redis.call('GET', key)
if raw then
  local i = string.find(raw, ' ', 1, true)
  local j = string.find(raw, ' ', i + 1, true)
  local f
  if j then
    f = string.sub(raw, i + 1, j - 1)
  else
    f = string.sub(raw, i + 1)
  end
  local d = string.sub(raw, 1, i - 1) - now
  if f == '0' then f = 0 else f = f + 0 end
  if d > 0 or (d == 0 and f > 0) then
    r = d * den + f
    aux, auxn = '0', 0
    if j and j < #raw then
      local a = string.sub(raw, j + 1)
      local an = tonumber(a)
      if an then aux, auxn = a, an end
    end
  end
end
-- A zero cost is always allowed, in debt too (r above span).
local after = r + c * num
if c <= burst and (after <= span or c == 0) then
  if c > 0 and ARGV[2] == 'acquire' then
    -- whole = floor(after / den), frac = after - whole * den,
    -- reset = ceil(after / den); after > 0 here
    local whole = math.floor(after / den)
    if whole * den > after then
      whole = whole - 1
    elseif (whole + 1) * den <= after then
      whole = whole + 1
    end
    local frac = after - whole * den
    local reset = whole
    if frac > 0 then reset = whole + 1 end
    -- limits.lua's store(): the TTL ends when the state would be idle.
    local ms = math.floor((reset + 999) / 1000) + 1
    if test_time and ms < 600000 then ms = 600000 end
    -- The same text as string.format('%d %d %s') would write; the counter
    -- (a string already) is joined, not formatted, and one number fewer
    -- is formatted when frac is 0 (a whole number of us per token).
    local v
    if frac == 0 then
      v = string.format('%d 0 ', now + whole) .. aux
    else
      v = string.format('%d %d ', now + whole, frac) .. aux
    end
    redis.call('SET', key, v, 'PX', ms)
  end
  return {1, now, after, auxn or tonumber(aux)}
end
return {0, now, r}
