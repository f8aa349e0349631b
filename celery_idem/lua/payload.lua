-- payload: a function the store puts before the scripts that compare argument digests
-- (acquire, submit); Redis scripts cannot load one another.
--
-- Two calls' payload digests agree unless an argument both can compare differs (an
-- argument without a canonical encoding has a null digest and is not compared).
local function same_payload(a, b)
  if a == b then return true end
  local x, y = cjson.decode(a), cjson.decode(b)
  for name, digest in pairs(x) do
    local other = y[name]
    if digest ~= cjson.null and other ~= cjson.null and digest ~= other then return false end
  end
  for name, other in pairs(y) do
    if x[name] == nil and other ~= cjson.null then return false end
  end
  return true
end
