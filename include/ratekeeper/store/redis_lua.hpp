// ratekeeper/store/redis_lua.hpp: the policies' Lua twins, run inside Redis.
//
// Internal to store/redis.hpp. Each script is one policy's step, refund and
// charge on one key, the same arithmetic as the C++ policy in a time unit of
// one microsecond: Redis's TIME gives microseconds, and every number in
// Redis's Lua is a double, exact for integers below 2^53. Microseconds since
// 1970 are about 1.8e15; every other quantity a script computes is bounded
// by the configuration, which RedisLimit's factory checks against 2^53 (see
// docs/redis.md). Divisions go through idiv(), exact for such integers.
//
// A script is kPrelude + the policy's part + kOps. Calling convention:
//   KEYS[1]  the state's key
//   ARGV[1]  op: "acquire", "peek", "refund" or "charge"
//   ARGV[2]  now in microseconds, or "" for Redis's TIME (tests pass a time)
//   ARGV[3]  cost
//   ARGV[4]  refund: when the refunded cost was charged (microseconds)
//   ARGV[5..] the policy's parameters
// Reply: {allowed, limit, remaining, retry_after_us (-1: never),
//         reset_after_us, now_us}. A state whose key is absent is a fresh
// one; every write sets a TTL that ends when the state would be idle, and an
// idle state is deleted, so no key outlives its meaning.
#ifndef RATEKEEPER_STORE_REDIS_LUA_HPP_
#define RATEKEEPER_STORE_REDIS_LUA_HPP_

namespace ratekeeper::detail::lua {

// Shared helpers, prepended to every script.
inline constexpr char kPrelude[] = R"lua(
local function idiv(a, b)
  local q = math.floor(a / b)
  if q * b > a then q = q - 1 elseif (q + 1) * b <= a then q = q + 1 end
  return q
end
local function cdiv(a, b) return -idiv(-a, b) end
local function clock()
  if ARGV[2] ~= '' then return tonumber(ARGV[2]) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
-- A TTL ends when the state would be idle, by Redis's clock. A test's own
-- time does not pass with Redis's: keys then live at least ten minutes.
local function store(key, value, ttl_us)
  if ttl_us <= 0 then
    redis.call('DEL', key)
  else
    local ms = cdiv(ttl_us, 1000) + 1
    if ARGV[2] ~= '' then ms = math.max(ms, 600000) end
    redis.call('SET', key, value, 'PX', ms)
  end
end
local op = ARGV[1]
local now = clock()
local cost = tonumber(ARGV[3])
)lua";

// Each policy's script defines decide(state, cost) -> decision, next state
// (what a step would store), charge(state, cost) -> state, refund(state,
// cost, charged_at) -> state, and save(state); kOps below runs the op the
// way the C++ ops do (limiter.hpp): peek decides; acquire decides and saves
// what it admits; charge is an acquire that, refused, counts the cost
// anyway and reports the step at the charged state, refused; refund gives
// back and reports a zero-cost step.
inline constexpr char kOps[] = R"lua(
local state = load_state()
if op == 'refund' then
  state = refund(state, cost, tonumber(ARGV[4]))
  save(state)
  local d = decide(state, 0)
  return d
end
local d, nxt = decide(state, cost)
if op == 'acquire' or op == 'charge' then
  if d[1] == 1 then
    if cost > 0 then save(nxt) end
    return d
  end
  if op == 'charge' then
    state = charge(state, cost)
    save(state)
    d = decide(state, cost)
    d[1] = 0
  end
end
return d
)lua";

// TokenBucket (GCRA). Parameters: ARGV[5] num, ARGV[6] den (the emission
// interval num/den us in lowest terms), ARGV[7] burst. Stored: "whole frac",
// the theoretical arrival time (TAT) as whole microseconds and a remainder
// in units of 1/den us. The state a script works on is TAT - now, scaled by
// den and never below 0: bounded by 2 * burst * num (a charge's debt), so
// exact when 4 * burst * num < 2^53 (checked).
inline constexpr char kTokenBucket[] = R"lua(
local num, den, burst = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local span = burst * num
local key = KEYS[1]
local function load_state()
  local raw = redis.call('GET', key)
  if not raw then return 0 end
  local w, f = string.match(raw, '^(%-?%d+) (%d+)$')
  w, f = tonumber(w), tonumber(f)
  if w < now then return 0 end
  return (w - now) * den + f
end
local function save(r)
  if r <= 0 then redis.call('DEL', key) return end
  local whole = idiv(r, den)
  store(key, string.format('%d %d', now + whole, r - whole * den), cdiv(r, den))
end
local function remaining(r)
  local room = span - r
  if room <= 0 then return 0 end
  return idiv(room, num)
end
local function reset(r)
  if r <= 0 then return 0 end
  return cdiv(r, den)
end
local function decide(r, c)
  if c > burst then return {0, burst, remaining(r), -1, reset(r), now}, r end
  local nxt = r + c * num
  if nxt <= span then
    return {1, burst, remaining(nxt), 0, reset(nxt), now}, nxt
  end
  return {0, burst, remaining(r), cdiv(r - (span - c * num), den), reset(r),
          now}, r
end
local function charge(r, c)
  return math.min(r + math.min(c, 2 * burst) * num, 2 * span)
end
local function refund(r, c, at)
  if r <= 0 then return r end
  return math.max(r - math.min(c, burst) * num, 0)
end
)lua";

// FixedWindow. Parameters: ARGV[5] period (us), ARGV[6] limit. Stored:
// "window count", counts saturating at 2^52 (exact). The state a script
// works on is the count of the window holding now.
inline constexpr char kFixedWindow[] = R"lua(
local period, limit = tonumber(ARGV[5]), tonumber(ARGV[6])
local key = KEYS[1]
local w = idiv(now, period)
local sw = w
local stored = nil
local function load_state()
  local raw = redis.call('GET', key)
  if not raw then return 0 end
  local a, b = string.match(raw, '^(%-?%d+) (%d+)$')
  stored = tonumber(a)
  if w > stored then return 0 end
  sw = stored
  return tonumber(b)
end
local function until_end() return (sw + 1) * period - now end
local function save(c)
  if c <= 0 then redis.call('DEL', key) return end
  store(key, string.format('%d %d', sw, c), until_end())
end
local function decide(count, c)
  local room = 0
  if count < limit then room = limit - count end
  local reset = 0
  if count > 0 then reset = until_end() end
  if c > limit then return {0, limit, room, -1, reset, now}, count end
  if c <= room then
    local r = 0
    if count + c > 0 then r = until_end() end
    return {1, limit, room - c, 0, r, now}, count + c
  end
  return {0, limit, room, until_end(), reset, now}, count
end
local function charge(count, c)
  return math.min(count + c, 4503599627370496)
end
local function refund(count, c, at)
  if stored == nil or idiv(at, period) ~= sw or sw ~= stored then
    return count
  end
  return count - math.min(c, count)
end
)lua";

// SlidingWindow (two windows, the previous weighted by the share of it the
// sliding window still covers). Parameters: ARGV[5] period (us), ARGV[6]
// limit. Stored: "window prev cur". The state a script works on is {prev,
// cur} rolled to the window holding now; exact when limit * period < 2^53
// (checked).
inline constexpr char kSlidingWindow[] = R"lua(
local p, limit = tonumber(ARGV[5]), tonumber(ARGV[6])
local key = KEYS[1]
local w = idiv(now, p)
local sw = w
local stored = false
local function load_state()
  local raw = redis.call('GET', key)
  if not raw then return {0, 0} end
  stored = true
  local a, b, c = string.match(raw, '^(%-?%d+) (%d+) (%d+)$')
  local s0, prev, cur = tonumber(a), tonumber(b), tonumber(c)
  if w > s0 then
    if w - s0 == 1 then return {cur, 0} end
    return {0, 0}
  end
  sw = s0
  return {prev, cur}
end
local start = nil
local function e_now()
  start = sw * p
  local e = now - start
  if e < 0 then return 0, true end
  return e, false
end
local function room(s, e) return limit * p - s[1] * (p - e) - s[2] * p end
local function remaining(s, e)
  local r = room(s, e)
  if r <= 0 then return 0 end
  return idiv(r, p)
end
local function reset_after(s)
  if s[2] ~= 0 then return start + 2 * p - now end
  if s[1] ~= 0 then return start + p - now end
  return 0
end
local function save(s)
  if s[1] == 0 and s[2] == 0 then redis.call('DEL', key) return end
  e_now()
  store(key, string.format('%d %d %d', sw, s[1], s[2]), reset_after(s))
end
local function decide(s, c)
  local e = e_now()
  local rem = remaining(s, e)
  if c > limit then return {0, limit, rem, -1, reset_after(s), now}, s end
  if c <= rem then
    local after = {s[1], s[2] + c}
    return {1, limit, remaining(after, e), 0, reset_after(after), now}, after
  end
  local prev, cur = s[1], s[2]
  local at
  local found = false
  local r = limit - cur - c
  if r >= 0 and prev > 0 then
    local e_min = p - idiv(r * p, prev)
    if e_min <= p - 1 then
      at = start + math.max(e_min, e)
      found = true
    end
  end
  if not found then
    local e_next = 0
    if cur > 0 then e_next = math.max(0, p - idiv((limit - c) * p, cur)) end
    at = start + p + e_next
  end
  return {0, limit, rem, at - now, reset_after(s), now}, s
end
local function charge(s, c)
  return {s[1], math.min(s[2] + c, 4294967294)}
end
local function refund(s, c, at)
  local _, behind = e_now()
  if behind or not stored then return s end
  local wc = idiv(at, p)
  if wc == sw then return {s[1], s[2] - math.min(c, s[2])} end
  if wc == sw - 1 then return {s[1] - math.min(c, s[1]), s[2]} end
  return s
end
)lua";

}  // namespace ratekeeper::detail::lua

#endif  // RATEKEEPER_STORE_REDIS_LUA_HPP_
