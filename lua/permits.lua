-- permits.lua: a concurrency limit's permits (after now.lua); issue 17,
-- RedisPermits (ratekeeper/redis/permits.hpp).
--
-- KEYS[1]: the key's sorted set of holders: member "<slots>:<holder id>",
-- score the holder's expiry in microseconds of the script's clock (Redis's
-- TIME, or the test's time). A holder whose expiry is at or before now no
-- longer counts and is removed before anything is decided.
--   ARGV[1]  now (us), or "" for Redis's TIME (now.lua)
--   ARGV[2]  op: "acquire", "peek", "renew", "release", "cancel"
--   ARGV[3]  the limit (slots per key)
--   ARGV[4]  the TTL (us)
--   ARGV[5]  the member (acquire, renew, release)
--   ARGV[6]  the slots it holds (acquire, peek)
-- Reply: {ok, now_us, remaining, retry_after_us (-1: never), reset_after_us,
--         expiry_us}. ok: admitted (acquire, peek), renewed (renew: 0 when
-- the holder had expired), removed (release: 0 when it had expired, which
-- frees nothing). remaining and reset_after as an acquire answers them:
-- with its own permit counted when it admits.
--
-- cancel: the release of a holder whose acquire was not answered (it may
-- have run, may run later, or never). ZREM; if that removed nothing, a
-- tombstone "x<member>" (scored one TTL after now, so swept as a holder
-- is) that the acquire, if it runs later, finds: it then adds nothing. A
-- tombstone holds no slot: every count below skips members not "<n>:".
local key = KEYS[1]
local op = ARGV[2]
local limit = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])
local member = ARGV[5]
local cost = tonumber(ARGV[6])

-- Scores and TTLs written as integers: Lua's own conversion keeps only 14
-- digits, and microseconds since 1970 have 16.
local function int(x) return string.format('%.0f', x) end

if op ~= 'peek' then
  redis.call('ZREMRANGEBYSCORE', key, '-inf', int(now))
end
-- The live holders, earliest expiry first; the slots they hold.
local held = redis.call('ZRANGEBYSCORE', key, '(' .. int(now), '+inf',
                        'WITHSCORES')
-- The slots of a member; nil for a tombstone.
local function slots(m)
  local n = string.match(m, '^(%d+):')
  if n then return tonumber(n) end
  return nil
end
local used, latest = 0, now
for i = 1, #held, 2 do
  local n = slots(held[i])
  if n then
    used = used + n
    latest = math.max(latest, tonumber(held[i + 1]))
  end
end

-- The key lives as long as its last holder (in test mode at least ten
-- minutes: a test's time does not pass with Redis's).
local function keep(last)
  local ms = math.floor((last - now + 999) / 1000) + 1
  if test_time then ms = math.max(ms, 600000) end
  redis.call('PEXPIRE', key, ms)
end

if op == 'acquire' or op == 'peek' then
  if cost > limit then
    return {0, now, limit - used, -1, latest - now, 0}
  end
  if used + cost <= limit then
    local expiry = now + ttl
    if op == 'acquire' and cost > 0 and
        redis.call('ZREM', key, 'x' .. member) == 1 then
      -- Cancelled before it ran (its caller was told nothing): add nothing.
      return {0, now, limit - used, 0, latest - now, 0}
    end
    if cost > 0 then
      if op == 'acquire' then
        redis.call('ZADD', key, int(expiry), member)
        keep(math.max(latest, expiry))
      end
      latest = math.max(latest, expiry)
    end
    return {1, now, limit - used - cost, 0, latest - now, expiry}
  end
  -- The wait: until enough holders expire, earliest first.
  local wait = -1
  local left = used
  for i = 1, #held, 2 do
    left = left - (slots(held[i]) or 0)
    if left + cost <= limit then
      wait = tonumber(held[i + 1]) - now
      break
    end
  end
  return {0, now, limit - used, wait, latest - now, 0}
elseif op == 'renew' then
  if not redis.call('ZSCORE', key, member) then
    return {0, now, limit - used, 0, latest - now, 0}
  end
  local expiry = now + ttl
  redis.call('ZADD', key, 'XX', int(expiry), member)
  latest = math.max(latest, expiry)
  keep(latest)
  return {1, now, limit - used, 0, latest - now, expiry}
elseif op == 'release' or op == 'cancel' then
  local removed = redis.call('ZREM', key, member)
  if removed == 1 then
    used = used - slots(member)
    latest = now
    for i = 1, #held, 2 do
      if held[i] ~= member and slots(held[i]) then
        latest = math.max(latest, tonumber(held[i + 1]))
      end
    end
  elseif op == 'cancel' then
    local expiry = now + ttl
    redis.call('ZADD', key, int(expiry), 'x' .. member)
    keep(math.max(latest, expiry))
  end
  return {removed, now, limit - used, 0, latest - now, 0}
end
return redis.error_reply('permits.lua: unknown op ' .. tostring(op))
