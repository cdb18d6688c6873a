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

-- An account's figures {credited, spent, held, lf (its leases' free points,
-- lease.lua)}, read once per batch: false
-- when its hash has no credited field (unknown to Redis) unless
-- MISSING_IS_ZERO, 'bad' when unusable (not a hash, or not integers).
local function read_figures(akey, missing_is_zero)
    local f = redis.pcall('HMGET', akey, 'credited', 'spent', 'held', 'leasefree')
    if type(f) ~= 'table' or f.err then return 'bad' end
    if not f[1] and not missing_is_zero then return false end
    local c, s, h, lf = int(f[1] or '0'), int(f[2] or '0'), int(f[3] or '0'), int(f[4] or '0')
    if not c or not s or not h or not lf then return 'bad' end
    return {credited = c, spent = s, held = h, lf = lf}
end

-- The reads of a reserve or settle batch, one command per key: op i's
-- account and holds keys are KEYS[K0 + 2i - 2] and KEYS[K0 + 2i - 1], its
-- reservation id ARGV[STRIDE * i - BACK]. Returns the accounts' figures by
-- key (read_figures) and the keys in first-seen order, and per holds hash
-- {rids, vals = rid -> hold value} (bad = true when it is not a hash) and
-- those keys in order.
local function read_batch(n, k0, stride, back, missing_is_zero)
    local accts, order, groups, gorder = {}, {}, {}, {}
    for i = 1, n do
        local akey, hkey = KEYS[k0 + 2 * i - 2], KEYS[k0 + 2 * i - 1]
        if accts[akey] == nil then
            local a = read_figures(akey, missing_is_zero)
            accts[akey] = a
            if type(a) == 'table' then order[#order + 1] = akey end
        end
        local g = groups[hkey]
        if g == nil then
            g = {rids = {}, vals = {}}
            groups[hkey] = g
            gorder[#gorder + 1] = hkey
        end
        g.rids[#g.rids + 1] = ARGV[stride * i - back]
    end
    for _, hkey in ipairs(gorder) do
        local g = groups[hkey]
        local v = redis.pcall('HMGET', hkey, unpack(g.rids))
        if type(v) == 'table' and v.err then
            g.bad = true
        else
            for k, rid in ipairs(g.rids) do
                if v[k] then g.vals[rid] = v[k] end
            end
        end
    end
    return accts, order, groups, gorder
end
