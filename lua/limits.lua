-- limits.lua: the one script of every policy and budget (after arith.lua,
-- fields.lua and now.lua).
--
-- Run by the Redis layer (ratekeeper/redis/). One script holds each policy's step, place,
-- settle and charge, the same arithmetic as the C++ policy in a time unit of
-- one microsecond: Redis's TIME gives microseconds, and every number in Redis's
-- Lua is a double, exact for integers below 2^53. Microseconds since 1970
-- are about 1.8e15; every other quantity the script computes is bounded by
-- the configuration, which RedisLimit's factory checks against 2^53
-- (docs/redis.md). Divisions go through idiv(), exact for such integers.
--
-- Calling convention: KEYS are the states' keys, one per item of a chain (a
-- single operation is a chain of one).
--   ARGV[1]  now in microseconds, or "" for Redis's TIME (tests pass a time)
--   ARGV[2]  op: "acquire", "peek", "receipt" (settle rate-limit receipts),
--            "reserve", "settle", "release", "extend", "fire", "settled" or
--            "spent" (the last six for budgets, described where the script
--            handles them), "hold" (a token bucket's reservation: below)
--   then per item, for acquire, peek and reserve, 8 fields: kind ("tb",
--   "fw", "sw", "pb"), four parameters, the cost, flags (1: shadow, 2:
--   charge on reject) and a nonce (a random number below 2^50: where a
--   bucket's state is born, its give-back counter starts); for "receipt",
--   11 fields: kind, four parameters, the cost taken, the actual cost, the
--   take's time (us, Redis's TIME of the take), its placement p1, p2 (as the
--   take's reply gave them) and a nonce
-- Reply: {allowed, now_us, then per item allowed, limit, remaining,
--         retry_after_us (-1: never), reset_after_us, and for acquire, peek
--         and reserve the take's placement p1, p2 (0, 0 when it did not
--         take)}: a bucket's stretch [p1, p2) of its timeline in units of
--         1/den us relative to now_us; a window's index (p1); a budget's
--         period index (p1).
-- "receipt" settles each item as the C++ policy's settle() does, by the
-- script's now, in order, and answers what a zero-cost call is then told.
--
-- "acquire" runs the items in order as Chain::acquire does (chain.hpp): an
-- item that charges on reject always counts (taken if it fits, charged if
-- not); the others take while no enforced item has refused, and are only
-- looked at after one has; a shadow item's refusal is not enforced. All or
-- nothing: the takes are written only if the chain admits, so a refused
-- chain gives nothing back (it never took). A single "charge" is an acquire
-- of one item flagged charge-on-reject. "!acquire" and "!reserve" decide as
-- if an item before the first had refused (RedisChain's later parts of a
-- chain spread over Cluster slots, once an earlier part refused).
--
-- A state whose key is absent is a fresh one; every write sets a TTL that
-- ends when the state would be idle, and an idle state is deleted, so no key
-- outlives its meaning.

-- A TTL ends when the state would be idle, by Redis's clock. A test's own
-- time does not pass with Redis's: keys then live at least ten minutes.
local function store(key, value, ttl_us)
  if ttl_us <= 0 then
    redis.call('DEL', key)
  else
    local ms = cdiv(ttl_us, 1000) + 1
    if test_time then ms = math.max(ms, 600000) end
    redis.call('SET', key, value, 'PX', ms)
  end
end

-- TokenBucket (GCRA): the emission interval num/den us in lowest terms.
-- Stored: "whole frac aux", the theoretical arrival time (TAT) as whole
-- microseconds and a remainder in units of 1/den us, and the key's
-- give-back counter: the time give-backs moved later takes earlier (us,
-- rounded up; TokenBucket::kGiveBacksMoveLaterTakes). A state born again
-- (absent: never seen, idle, or lost) starts its counter at `nonce`, a
-- random number below 2^50 the caller sends, so that a receipt from another
-- life of the state is told apart: its mark is above the counter (never so
-- for the state's own takes) or so far below that its moved stretch is long
-- past; either way it gives nothing back. The state worked on is TAT - now
-- scaled by den, never below 0: at most 2 * burst * num (a charge's debt),
-- exact when 4 * burst * num < 2^53 (checked).
local function token_bucket(key, num, den, burst, _, nonce)
  local span = burst * num
  local aux = nonce or 0
  local m = {}
  function m.load()
    local raw = redis.call('GET', key)
    if not raw then return 0 end
    local w, f, a = fields(raw)
    if w < now or (w == now and f == 0) then return 0 end
    aux = a or 0
    return (w - now) * den + f
  end
  function m.save(r)
    if r <= 0 then redis.call('DEL', key) return end
    local whole = idiv(r, den)
    store(key, string.format('%d %d %d', now + whole, r - whole * den, aux),
          cdiv(r, den))
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
  function m.decide(r, c)
    if c > burst then return {0, burst, remaining(r), -1, reset(r)}, r end
    local nxt = r + c * num
    -- A zero cost is always allowed, in debt too (r above span).
    if nxt <= span or c == 0 then
      return {1, burst, remaining(nxt), 0, reset(nxt)}, nxt
    end
    return {0, burst, remaining(r), cdiv(r - (span - c * num), den),
            reset(r)}, r
  end
  function m.charge(r, c)
    return math.max(r, math.min(r + math.min(c, 2 * burst) * num, 2 * span))
  end
  -- A take: the key's give-back counter (its mark) and the end of its
  -- stretch of the timeline [r, r + c * num), relative to now.
  function m.place(r, c) return aux, r + c * num end
  -- TokenBucket::settle of a take marked `pm` whose stretch ends at `pu`
  -- relative to `at`, moved earlier by what give-backs moved it since
  -- (TokenBucket::shift). Below the take, gives back at most what of the
  -- stretch is still ahead of now, and counts what that moved later takes
  -- by (TokenBucket::returned_ns); nothing for a take of another life of
  -- the state (its mark above the counter). Above, the excess is a debt
  -- charged now (capped at 2^52, far beyond any wait that means anything,
  -- to stay exact).
  function m.settle(r, pm, pu, at, taken, actual)
    if actual > taken then
      local x = math.min(actual - taken, cdiv(4503599627370496, num))
      return math.min(r + x * num, 4503599627370496)
    end
    if actual == taken or r <= 0 or pm > aux then return r end
    pu = pu - (aux - pm) * den
    local e = now - at
    if e >= cdiv(pu, den) then return r end
    local ed = e * den
    local len = pu - math.max(pu - taken * num, ed)
    if len <= 0 then return r end
    local nr = math.max(r - math.min((taken - actual) * num, len), 0)
    -- Not the last take (its stretch ends before the TAT): the later ones
    -- moved earlier by what it gave back.
    if nr < r and pu - ed < r then aux = aux + cdiv(r - nr, den) end
    return nr
  end
  function m.giveback(r, c)
    if r <= 0 then return r end
    return math.max(r - math.min(c, burst) * num, 0)
  end
  return m
end

-- FixedWindow: windows of `period` us from the epoch. Stored: "window
-- count", counts saturating at 2^52 (exact). The state worked on is the
-- count of the window holding now (a stored later window, the clock having
-- gone back, stays as it is).
local function fixed_window(key, period, limit)
  local w = idiv(now, period)
  local sw, stored = w, nil
  local m = {}
  function m.load()
    local raw = redis.call('GET', key)
    if not raw then return 0 end
    local a, b = fields(raw)
    stored = a
    if w > stored then return 0 end
    sw = stored
    return b
  end
  local function until_end() return (sw + 1) * period - now end
  function m.save(c)
    if c <= 0 then redis.call('DEL', key) return end
    store(key, string.format('%d %d', sw, c), until_end())
  end
  function m.decide(count, c)
    local room = 0
    if count < limit then room = limit - count end
    local reset = 0
    if count > 0 then reset = until_end() end
    if c > limit then return {0, limit, room, -1, reset}, count end
    if c <= room then
      local r = 0
      if count + c > 0 then r = until_end() end
      return {1, limit, room - c, 0, r}, count + c
    end
    return {0, limit, room, until_end(), reset}, count
  end
  function m.charge(count, c) return math.min(count + c, 4503599627370496) end
  -- A take's window index.
  function m.place(count, c) return sw, 0 end
  -- FixedWindow::settle: gives back only to the take's window while it is
  -- still the state's (and now's); an excess counts in now's window.
  function m.settle(count, pw, _, at, taken, actual)
    if actual > taken then return m.charge(count, actual - taken) end
    if stored == nil or sw ~= stored or pw ~= sw then return count end
    return count - math.min(taken - actual, count)
  end
  function m.giveback(count, c) return count - math.min(c, count) end
  return m
end

-- SlidingWindow: two windows of `p` us, the previous weighted by the share
-- of it the sliding window still covers. Stored: "window prev cur". The
-- state worked on is {prev, cur} rolled to the window holding now; exact
-- when limit * p * 2 < 2^53 (checked).
local function sliding_window(key, p, limit)
  local w = idiv(now, p)
  local sw, stored = w, false
  local m = {}
  function m.load()
    local raw = redis.call('GET', key)
    if not raw then return {0, 0} end
    stored = true
    local s0, prev, cur = fields(raw)
    if w > s0 then
      if w - s0 == 1 then return {cur, 0} end
      return {0, 0}
    end
    sw = s0
    return {prev, cur}
  end
  local function elapsed()
    local e = now - sw * p
    if e < 0 then return 0, true end
    return e, false
  end
  local function remaining(s, e)
    local r = limit * p - s[1] * (p - e) - s[2] * p
    if r <= 0 then return 0 end
    return idiv(r, p)
  end
  local function reset_after(s)
    if s[2] ~= 0 then return sw * p + 2 * p - now end
    if s[1] ~= 0 then return sw * p + p - now end
    return 0
  end
  function m.save(s)
    if s[1] == 0 and s[2] == 0 then redis.call('DEL', key) return end
    store(key, string.format('%d %d %d', sw, s[1], s[2]), reset_after(s))
  end
  function m.decide(s, c)
    local e = elapsed()
    local rem = remaining(s, e)
    if c > limit then return {0, limit, rem, -1, reset_after(s)}, s end
    if c <= rem then
      local after = {s[1], s[2] + c}
      return {1, limit, remaining(after, e), 0, reset_after(after)}, after
    end
    local prev, cur, start = s[1], s[2], sw * p
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
    return {0, limit, rem, at - now, reset_after(s)}, s
  end
  function m.charge(s, c) return {s[1], math.min(s[2] + c, 4294967294)} end
  function m.place(s, c) return sw, 0 end
  -- SlidingWindow::settle: gives back to the take's window if it is the
  -- current or the previous one; an excess counts in now's window.
  function m.settle(s, pw, _, at, taken, actual)
    if actual > taken then return m.charge(s, actual - taken) end
    local _, behind = elapsed()
    if behind or not stored then return s end
    local c = taken - actual
    if pw == sw then return {s[1], s[2] - math.min(c, s[2])} end
    if pw == sw - 1 then return {s[1] - math.min(c, s[1]), s[2]} end
    return s
  end
  function m.giveback(s, c) return {s[1], s[2] - math.min(c, s[2])} end
  return m
end

-- PeriodBudget: at most `limit` per period; the caller's calendar (abseil's
-- time zones) gives the index and bounds of the period it believes holds
-- now. A script whose now falls outside them answers {-2, now}: the caller
-- asks again with the period of Redis's now. Stored: "period spent". A
-- refund's `at` is the index of the period charged.
local function period_budget(key, limit, index, pstart, pend)
  if now < pstart or now >= pend then return nil end
  local m = {}
  local raw_p, raw_spent = nil, 0
  function m.load()
    local raw = redis.call('GET', key)
    if not raw then return {index, 0} end
    local p, spent = fields(raw)
    raw_p, raw_spent = p, spent
    if index > p then return {index, 0} end
    return {p, spent}
  end
  function m.save(s)
    if s[2] <= 0 then redis.call('DEL', key) return end
    store(key, string.format('%d %d', s[1], s[2]), pend - now)
  end
  function m.decide(s, c)
    local spent = s[2]
    local room = 0
    if spent < limit then room = limit - spent end
    local until_next = pend - now
    local reset = 0
    if spent > 0 then reset = until_next end
    if c > limit then return {0, limit, room, -1, reset}, s end
    if c <= room then
      local r = 0
      if spent + c > 0 then r = until_next end
      return {1, limit, room - c, 0, r}, {s[1], spent + c}
    end
    return {0, limit, room, until_next, reset}, s
  end
  function m.charge(s, c) return {s[1], math.min(s[2] + c, 4503599627370496)} end
  function m.place(s, c) return s[1], 0 end
  -- PeriodBudget::settle: the spend belongs to the take's period, both
  -- ways, while no later period is stored; a past period's change is
  -- dropped (its state is idle now).
  function m.settle(s, pl, _, at, taken, actual)
    local rp, rs = raw_p, raw_spent
    if rp == nil then rp, rs = pl, 0 end
    if rp > pl then return s end
    if pl > rp then rp, rs = pl, 0 end
    if actual > taken then
      rs = math.min(rs + (actual - taken), 4503599627370496)
    else
      rs = rs - math.min(taken - actual, rs)
    end
    if rp < index then return s end
    return {rp, rs}
  end
  function m.giveback(s, c) return {s[1], s[2] - math.min(c, s[2])} end
  return m
end

local makers = {tb = token_bucket, fw = fixed_window, sw = sliding_window,
                pb = period_budget}
local op = ARGV[2]
local n = #KEYS
-- "!acquire", "!reserve": a later part of a chain split across Cluster
-- slots, after an earlier part refused: decided as if an item before these
-- had refused (the others only looked at, charges on reject counted, no
-- reservation key set).
local vetoed = false
if string.sub(op, 1, 1) == '!' then
  vetoed = true
  op = string.sub(op, 2)
end

-- A budget's spend moved by `delta` in the period `index` (ending at `pend`)
-- that a reservation was made in, as PeriodBudget::settle does (rules.hpp,
-- rule 2): a refund (delta < 0) only to that period; a charge (delta > 0)
-- to that period, replacing an earlier one; either dropped once a later
-- period is stored (a call of yesterday never changes today). Answers the
-- spend after, or -1 when nothing moved. A change to a period that has
-- ended is stored with the shortest time to live (2 ms; 10 min in test
-- mode) rather than deleted at once: an ended period's state is idle, kept
-- only until it is reclaimed, as in process.
local function budget_move(key, index, pend, delta)
  local raw = redis.call('GET', key)
  local p, spent = index, 0
  if raw then p, spent = fields(raw) end
  if p > index then return -1 end
  if delta < 0 then
    if not raw or p ~= index then return -1 end
    spent = spent - math.min(-delta, spent)
    if spent <= 0 then redis.call('DEL', key) return 0 end
    redis.call('SET', key, string.format('%d %d', p, spent), 'KEEPTTL')
    return spent
  end
  if p < index then p, spent = index, 0 end
  spent = math.min(spent + delta, 4503599627370496)
  store(key, string.format('%d %d', p, spent), math.max(pend - now, 1))
  return spent
end

-- Settle or release one reservation (RedisAccountant). KEYS: the budgets'
-- states, the reservation's key (present while its holds are out), and for
-- settle the request id's settlement. ARGV[3]: the budget count m; per
-- budget 4 fields: period index, period end (us), held, actual; then for
-- settle the settlement's TTL (ms), cost, tokens and estimated flag. A
-- settle that applied also answers, per budget, its spend after (-1: not
-- moved).
-- Settle: when the id was settled before, the first settlement stands and
-- this reservation's holds (if out) go back: {2, now, first settlement}.
-- Else each budget moves by actual - held when the holds are out, by the
-- whole actual when they are not (granted while Redis was away, or Redis
-- lost them: a restart without persistence, an expired key): {1, now,
-- settlement}. Release: {1 (given back) or 0 (nothing out), now}.
if op == 'settle' or op == 'release' then
  local m = tonumber(ARGV[3])
  local out_held = redis.call('DEL', KEYS[m + 1]) == 1
  local function each(f)
    for i = 1, m do
      local b = 4 + (i - 1) * 4
      f(KEYS[i], tonumber(ARGV[b]), tonumber(ARGV[b + 1]),
        tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3]))
    end
  end
  local function give_back()
    each(function(key, index, pend, held)
      if held > 0 then budget_move(key, index, pend, -held) end
    end)
  end
  if op == 'release' then
    if out_held then give_back() return {1, now} end
    return {0, now}
  end
  local t = 4 + 4 * m
  local first = redis.call('GET', KEYS[m + 2])
  if first then
    if out_held then give_back() end
    local c, tk, e = fields(first)
    return {2, now, c, tk, e}
  end
  local after = {}
  each(function(key, index, pend, held, actual)
    if not out_held then held = 0 end
    local spent = -1
    if actual ~= held then spent = budget_move(key, index, pend, actual - held) end
    after[#after + 1] = spent
  end)
  local c, tk, e = tonumber(ARGV[t + 1]), tonumber(ARGV[t + 2]),
                   tonumber(ARGV[t + 3])
  redis.call('SET', KEYS[m + 2], string.format('%d %d %d', c, tk, e), 'PX',
             tonumber(ARGV[t]))
  local out = {1, now, c, tk, e}
  for i = 1, m do out[#out + 1] = after[i] end
  return out
end

-- "extend" (a stream outgrowing its reservation): KEYS: the budgets'
-- states and the reservation's key; ARGV[3] the budget count m, then per
-- budget: period index, period end (us), limit, more. All or nothing, in
-- the reservation's period, and only while its holds are out: {1, now,
-- spent after per budget}, {0, now, the refusing budget's number}, or
-- {-3, now} (no holds out). A budget that must grow where a later period
-- is stored refuses (rules.hpp, rule 2: detail::may_grow).
if op == 'extend' then
  local m = tonumber(ARGV[3])
  if redis.call('EXISTS', KEYS[m + 1]) == 0 then return {-3, now} end
  local states = {}
  for i = 1, m do
    local b = 4 + (i - 1) * 4
    local index, limit, more = tonumber(ARGV[b]), tonumber(ARGV[b + 2]),
                               tonumber(ARGV[b + 3])
    local raw = redis.call('GET', KEYS[i])
    local p, spent = index, 0
    if raw then p, spent = fields(raw) end
    if p < index then p, spent = index, 0 end
    if more > 0 and (p > index or spent + more > limit) then
      return {0, now, i}
    end
    states[i] = {p, spent}
  end
  local out = {1, now}
  for i = 1, m do
    local b = 4 + (i - 1) * 4
    local index, pend, more = tonumber(ARGV[b]), tonumber(ARGV[b + 1]),
                              tonumber(ARGV[b + 3])
    local spent = states[i][2]
    if states[i][1] == index and more > 0 then
      spent = budget_move(KEYS[i], index, pend, more)
    end
    out[#out + 1] = spent
  end
  return out
end

-- "fire" (a soft threshold crossed): once per key, set for ARGV[3] ms.
if op == 'fire' then
  if redis.call('SET', KEYS[1], '1', 'NX', 'PX', tonumber(ARGV[3])) then
    return {1, now}
  end
  return {0, now}
end

-- "settled": a request id's settlement, {1, now, cost, tokens, estimated},
-- or {0, now}.
if op == 'settled' then
  local raw = redis.call('GET', KEYS[1])
  if not raw then return {0, now} end
  local c, tk, e = fields(raw)
  return {1, now, c, tk, e}
end

-- "spent": a budget's spend in period ARGV[3] (0 when another is stored).
if op == 'spent' then
  local raw = redis.call('GET', KEYS[1])
  if not raw then return {0, now} end
  local p, spent = fields(raw)
  if p ~= tonumber(ARGV[3]) then return {0, now} end
  return {spent, now}
end

-- "reserve": an acquire whose admission also sets the reservation's key,
-- the next to last of KEYS (ARGV after the items: its TTL in ms). The last
-- is the request id's settlement: an id settled already takes nothing and
-- answers {-4, now, its settlement} (a new call needs a new id).
local mark = nil
if op == 'reserve' then
  n = n - 2
  mark = KEYS[#KEYS - 1]
  local first = redis.call('GET', KEYS[#KEYS])
  if first then
    local c, tk, e = fields(first)
    return {-4, now, c, tk, e}
  end
  op = 'acquire'
end

-- "hold": a token bucket's reservation (RedisLimit<TokenBucket>::reserve,
-- as TokenBucket::reserve does in process). One item, its 8 fields as
-- "acquire"'s (the flags are not read: a reservation neither charges on
-- reject nor is a shadow's), then ARGV[11]: the longest wait it may hold
-- (us). Admitted now: taken as "acquire" takes. Refused with a wait (the
-- decision's retry_after, us) of at most ARGV[11], a cost within the burst
-- and above 0: taken all the same, the bucket in debt by that wait, placed
-- (p1, p2) where a take at now + wait would sit. The decision stays the
-- refusal with its exact wait. Reply as "acquire"'s, its first number 1
-- when the cost is held, else 0. The wait held is capped where the debt
-- would pass 2^52 (exact doubles): (2^52 - burst * num) / den us, centuries
-- for a whole number of us per token; a longer wait is not held.
if op == 'hold' then
  if n ~= 1 or vetoed or ARGV[3] ~= 'tb' then return {-5, now} end
  local num, den = tonumber(ARGV[4]), tonumber(ARGV[5])
  local burst = tonumber(ARGV[6])
  local m = token_bucket(KEYS[1], num, den, burst, 0, tonumber(ARGV[10]))
  local cost = tonumber(ARGV[8])
  local wait = math.min(tonumber(ARGV[11]),
                        idiv(4503599627370496 - burst * num, den))
  local s = m.load()
  local d, nxt = m.decide(s, cost)
  local held = d[1]
  if held ~= 1 and d[4] >= 0 and d[4] <= wait and cost > 0 then
    nxt = s + cost * num
    held = 1
  end
  local p1, p2 = 0, 0
  if held == 1 then
    p1, p2 = m.place(s, cost)
    if cost > 0 then m.save(nxt) end
  end
  return {held, now, d[1], d[2], d[3], d[4], d[5], p1, p2}
end

-- One item, acquire or peek (most calls): the same steps as below, without
-- the chain's bookkeeping.
if n == 1 and op ~= 'receipt' and not mark and not vetoed then
  local m = makers[ARGV[3]](KEYS[1], tonumber(ARGV[4]), tonumber(ARGV[5]),
                            tonumber(ARGV[6]), tonumber(ARGV[7]),
                            tonumber(ARGV[10]))
  if m == nil then return {-2, now} end
  local cost, flags = tonumber(ARGV[8]), tonumber(ARGV[9])
  local s = m.load()
  local d, nxt = m.decide(s, cost)
  local p1, p2 = 0, 0
  if d[1] == 1 then p1, p2 = m.place(s, cost) end
  if op == 'acquire' then
    if d[1] == 1 then
      if cost > 0 then m.save(nxt) end
    elseif math.floor(flags / 2) % 2 == 1 then
      nxt = m.charge(s, cost)
      m.save(nxt)
      d = m.decide(nxt, cost)
      d[1] = 0
    end
  end
  local all = d[1]
  if d[1] ~= 1 and flags % 2 == 1 then all = 1 end
  return {all, now, d[1], d[2], d[3], d[4], d[5], p1, p2}
end
-- Items on one key share one state (a limit twice in one chain sees its
-- own first take, as in process).
local mods, states, touched, order = {}, {}, {}, {}
local items = {}
local width = 8
if op == 'receipt' then width = 11 end
for i = 1, n do
  local b = 3 + (i - 1) * width
  local key = KEYS[i]
  if not mods[key] then
    mods[key] = makers[ARGV[b]](key, tonumber(ARGV[b + 1]),
                                tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3]),
                                tonumber(ARGV[b + 4]),
                                tonumber(ARGV[b + width - 1]))
    if mods[key] == nil then return {-2, now} end
    states[key] = mods[key].load()
    order[#order + 1] = key
  end
  if op == 'receipt' then
    items[i] = {key = key, cost = tonumber(ARGV[b + 5]),
                actual = tonumber(ARGV[b + 6]), at = tonumber(ARGV[b + 7]),
                p1 = tonumber(ARGV[b + 8]), p2 = tonumber(ARGV[b + 9])}
  else
    items[i] = {key = key, cost = tonumber(ARGV[b + 5]),
                flags = tonumber(ARGV[b + 6])}
  end
end

local out = {1, now}
if op == 'receipt' then
  for i = 1, n do
    local it = items[i]
    local m = mods[it.key]
    states[it.key] = m.settle(states[it.key], it.p1, it.p2, it.at, it.cost,
                              it.actual)
    touched[it.key] = true
    local d = m.decide(states[it.key], 0)
    for j = 1, 5 do out[#out + 1] = d[j] end
  end
  for _, key in ipairs(order) do
    if touched[key] then mods[key].save(states[key]) end
  end
  return out
end

local refused = vetoed
local kept = {}     -- states written whatever the chain decides
local results = {}
for i = 1, n do
  local it = items[i]
  local m = mods[it.key]
  local s = states[it.key]
  local d, nxt
  local shadow = it.flags % 2 == 1
  local charge_on_reject = math.floor(it.flags / 2) % 2 == 1
  it.p1, it.p2 = 0, 0
  if op == 'acquire' and charge_on_reject then
    d, nxt = m.decide(s, it.cost)
    if d[1] == 1 then it.p1, it.p2 = m.place(s, it.cost) end
    if d[1] ~= 1 then
      nxt = m.charge(s, it.cost)
      d = m.decide(nxt, it.cost)
      d[1] = 0
    end
    states[it.key] = nxt
    kept[it.key] = true
  elseif op == 'acquire' and not refused then
    d, nxt = m.decide(s, it.cost)
    if d[1] == 1 then
      it.p1, it.p2 = m.place(s, it.cost)
      states[it.key] = nxt
      touched[it.key] = true
      it.taken = true
    end
  else
    d = m.decide(s, it.cost)
    if d[1] == 1 and it.cost ~= 0 and op == 'acquire' then
      local left = m.decide(s, 0)
      d[3], d[5] = left[3], left[5]
    end
  end
  if d[1] ~= 1 and not shadow then refused = true end
  results[i] = d
end
if refused and op == 'acquire' then
  -- Nothing is written but what charges on reject: the items that took
  -- report what their key has left once all is given back, in order, as
  -- an in-process chain's roll-back does.
  local work = {}
  for _, key in ipairs(order) do work[key] = states[key] end
  for i = 1, n do
    local it = items[i]
    if it.taken then
      work[it.key] = mods[it.key].giveback(work[it.key], it.cost)
    end
  end
  for i = 1, n do
    local it = items[i]
    if it.taken then
      local left = mods[it.key].decide(work[it.key], 0)
      results[i][3], results[i][5] = left[3], left[5]
    end
  end
end
if refused then out[1] = 0 end
for i = 1, n do
  for j = 1, 5 do out[#out + 1] = results[i][j] end
  out[#out + 1] = items[i].p1
  out[#out + 1] = items[i].p2
end
if op == 'acquire' then
  for _, key in ipairs(order) do
    if kept[key] or (touched[key] and not refused) then
      mods[key].save(states[key])
    end
  end
  if mark and not refused then
    redis.call('SET', mark, '1', 'PX', tonumber(ARGV[3 + 8 * n]))
  end
end
return out
