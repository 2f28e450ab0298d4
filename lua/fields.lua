-- The integers of a stored state ("a b [c]"), without patterns.
local function fields(raw)
  local i = string.find(raw, ' ', 1, true)
  local j = string.find(raw, ' ', i + 1, true)
  if j then
    return tonumber(string.sub(raw, 1, i - 1)),
           tonumber(string.sub(raw, i + 1, j - 1)),
           tonumber(string.sub(raw, j + 1))
  end
  return tonumber(string.sub(raw, 1, i - 1)), tonumber(string.sub(raw, i + 1))
end
