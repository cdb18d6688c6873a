-- prelude.lua: helpers put in front of every hot-balance script when it is
-- embedded (scripts/embed-lua.sh) or loaded by the tests (luahelp.py), so
-- that the scripts share one copy. Owns no key and writes nothing.

-- A figure as Redis's own integer commands read it: canonical decimal only
-- ("05", "5.0", "1e1", " 5", "-0" pass tonumber but make HINCRBY fail after a
-- script's earlier writes), within the 2^53 the scripts compute exactly.
-- nil for anything else. One pattern match and one tonumber: it runs for
-- every op of every batch, and the string.format round trip it replaced was
-- a measurable part of a script's time.
local INT_MAX = 9007199254740992 -- 2^53
local function int(v)
    if type(v) ~= 'string' or #v > 17 then return nil end
    if v ~= '0' and not string.find(v, '^%-?[1-9]%d*$') then return nil end
    local x = tonumber(v)
    if x > INT_MAX or x < -INT_MAX then return nil end
    return x
end

-- int(V) remembered in CACHE (false for nil): a batch carries the same few
-- prices, charges and hold amounts over and over, and a table lookup costs
-- a fraction of int()'s two library calls (each about 0.1 us in Redis's Lua).
local function intc(cache, v)
    local x = cache[v]
    if x == nil then
        x = int(v) or false
        if type(v) == 'string' then cache[v] = x end
    end
    return x or nil
end
