-- Integer arithmetic on Lua numbers (doubles), exact below 2^53:
-- idiv(a, b) = floor(a / b) and cdiv(a, b) = ceil(a / b) for b > 0.
local function idiv(a, b)
  local q = math.floor(a / b)
  if q * b > a then q = q - 1 elseif (q + 1) * b <= a then q = q + 1 end
  return q
end
local function cdiv(a, b) return -idiv(-a, b) end
