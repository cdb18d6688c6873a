-- prelude.lua: helpers put in front of every hot-balance script when it is
-- embedded (scripts/embed-lua.sh) or loaded by the tests (luahelp.py), so
-- that the scripts share one copy. Owns no key and writes nothing.

-- A figure as Redis's own integer commands read it: canonical decimal only
-- ("05", "5.0", "1e1", " 5" pass tonumber but make HINCRBY fail after a
-- script's earlier writes), within the 2^53 the scripts compute exactly.
-- nil for anything else.
local function int(v)
    if type(v) ~= 'string' or #v > 17 or not string.match(v, '^%-?%d+$') then return nil end
    local x = tonumber(v)
    if string.format('%d', x) ~= v then return nil end
    return x
end
