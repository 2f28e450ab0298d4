-- token_bucket.lua: the single acquire or peek of a TokenBucket (the most
-- common call), as its own script (after now.lua, arith.lua and
-- fields.lua): the same arguments, steps and reply as limits.lua's
-- token_bucket on one item without charge-on-reject, with no closures over
-- the policies or tables to build per call (about a fifth of the script's
-- time in Redis).
local key = KEYS[1]
local num, den, burst = tonumber(ARGV[4]), tonumber(ARGV[5]),
                        tonumber(ARGV[6])
local c = tonumber(ARGV[8])
local span = burst * num
-- The stored "whole frac aux" (limits.lua's token_bucket): a state absent
-- or idle is born again, its give-back counter at the nonce (ARGV[10]).
local r, aux = 0, tonumber(ARGV[10])
local raw = redis.call('GET', key)
if raw then
  local w, f, a = fields(raw)
  if w > now or (w == now and f > 0) then
    r, aux = (w - now) * den + f, a or 0
  end
end
local allowed, retry, after = 0, -1, r
if c <= burst then
  local nxt = r + c * num
  if nxt <= span then
    allowed, retry, after = 1, 0, nxt
  else
    retry = -idiv(span - c * num - r, den)
  end
end
if allowed == 1 and c > 0 and ARGV[2] == 'acquire' then
  local whole = idiv(after, den)
  local ms = -idiv(idiv(-after, den), 1000) + 1
  if test_time and ms < 600000 then ms = 600000 end
  redis.call('SET', key,
             string.format('%d %d %d', now + whole, after - whole * den,
                           aux),
             'PX', ms)
end
local rem, reset = 0, 0
if span - after > 0 then rem = idiv(span - after, num) end
if after > 0 then reset = -idiv(-after, den) end
local all = allowed
if ARGV[9] == '1' then all = 1 end
local p1, p2 = 0, 0
if allowed == 1 then p1, p2 = aux, after end
return {all, now, allowed, burst, rem, retry, reset, p1, p2}
