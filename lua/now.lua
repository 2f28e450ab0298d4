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
