-- token_bucket.lua: the single acquire or peek of a TokenBucket (the most
-- common call), as its own script (after now.lua): the same arguments,
-- steps and reply as limits.lua's token_bucket on one item without
-- charge-on-reject, written for Redis's time per call (docs/redis.md,
-- "Cost"): no closures or tables built per call, each division inline
-- (floor of the quotient, corrected to be exact as arith.lua's idiv), the
-- state's fields read by one match and used as numbers by Lua's coercion.
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
local allowed, retry, after = 0, -1, r
if c <= burst then
  local nxt = r + c * num
  if nxt <= span then
    allowed, retry, after = 1, 0, nxt
  else  -- ceil((nxt - span) / den)
    local x = nxt - span
    local q = floor(x / den)
    if q * den > x then q = q - 1 elseif (q + 1) * den <= x then q = q + 1 end
    if q * den < x then q = q + 1 end
    retry = q
  end
end
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
if allowed == 1 and c > 0 and ARGV[2] == 'acquire' then
  -- limits.lua's store(): the TTL ends when the state would be idle.
  local ms = floor((reset + 999) / 1000) + 1
  if test_time and ms < 600000 then ms = 600000 end
  redis.call('SET', key, string.format('%d %d %s', now + whole,
                                        after - whole * den, aux), 'PX', ms)
end
-- remaining = floor((span - after) / num), 0 when none
local rem, room = 0, span - after
if room > 0 then
  rem = floor(room / num)
  if rem * num > room then
    rem = rem - 1
  elseif (rem + 1) * num <= room then
    rem = rem + 1
  end
end
local all = allowed
if ARGV[9] == '1' then all = 1 end
if allowed == 1 then
  return {all, now, 1, burst, rem, 0, reset, tonumber(aux), after}
end
return {all, now, 0, burst, rem, retry, reset, 0, 0}
