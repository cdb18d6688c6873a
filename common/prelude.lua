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
-- lease.lua), limited (billing set a rate limit or a cap on the account or
-- one of its keys: limits.lua)}, read once per batch: false
-- when its hash has no credited field (unknown to Redis) unless
-- MISSING_IS_ZERO, 'bad' when unusable (not a hash, or not integers).
local function read_figures(akey, missing_is_zero)
    local f = redis.pcall('HMGET', akey, 'credited', 'spent', 'held', 'leasefree', 'limited')
    if type(f) ~= 'table' or f.err then return 'bad' end
    if not f[1] and not missing_is_zero then return false end
    local c, s, h, lf = int(f[1] or '0'), int(f[2] or '0'), int(f[3] or '0'), int(f[4] or '0')
    if not c or not s or not h or not lf then return 'bad' end
    return {credited = c, spent = s, held = h, lf = lf, limited = f[5] == '1'}
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

-- ---- limits (rate limits and spending caps: reserve.lua, settle.lua) ----
-- An account's limits hash, pg:{A}:lim (common/hotkeys.h): its settings,
-- written by billing (limits.lua), and the state the scripts keep (rate
-- buckets, cap counters). Named from the account hash here rather than
-- passed by the caller: it shares the account's hash tag, so it is in the
-- same cluster slot as the keys the caller declared, and no caller's key
-- layout changes.
local function lim_key(akey)
    return (string.gsub(akey, ':acct$', ':lim'))
end

-- A limits hash's fields as read in this call, with their pending writes:
-- {key, f = name -> value read (false: absent), v = name -> its integer
-- (parsed once, then what the script set), w/wn = names written, names =
-- field names by scope (lim_names)}. Values are formatted once, at the
-- flush: a batch of a hundred ops on one account sets the same few
-- counters a hundred times.
local function lim_new(akey)
    return {key = lim_key(akey), f = {}, v = {}, w = {}, wn = {}, names = {}}
end

-- The field names of scope ID ('a' the account, else a key id) in L, made
-- once per call: {p = prefix, rq rw cd cm d ds dh m ms mh = names, tat =
-- route -> its bucket's name, seen = route -> read}.
local function lim_names(L, id)
    local N = L.names[id]
    if N then return N end
    local p = id == 'a' and 'a.' or 'k' .. id .. '.'
    N = {p = p, tat = {}, seen = {}}
    for _, f in ipairs({'rq', 'rw', 'cd', 'cm', 'd', 'ds', 'dh', 'm', 'ms', 'mh'}) do
        N[f] = p .. f
    end
    L.names[id] = N
    return N
end

-- The limits of AKEY in this call's set {by = akey -> limits, order =
-- akeys in first-seen order (the order lim_flush writes them in)}.
local function lim_of(set, akey)
    local L = set.by[akey]
    if not L then
        L = lim_new(akey)
        set.by[akey] = L
        set.order[#set.order + 1] = akey
    end
    return L
end

-- Reads the fields of NAMES not known yet, one HMGET. false when Redis
-- refused (the key is not a hash).
local function lim_read(L, names)
    local want = {}
    for _, nm in ipairs(names) do
        if L.f[nm] == nil then want[#want + 1] = nm end
    end
    if #want == 0 then return true end
    local v = redis.pcall('HMGET', L.key, unpack(want))
    if type(v) ~= 'table' or v.err then return false end
    for k, nm in ipairs(want) do L.f[nm] = v[k] or false end
    return true
end

-- A field as an integer: 0 when absent (a setting not set, a counter not
-- started) or not one (the scripts write these fields with %d only).
local function lim_num(L, nm)
    local x = L.v[nm]
    if x then return x end
    local s = L.f[nm]
    x = s and int(s) or 0
    L.v[nm] = x
    return x
end

local function lim_set(L, nm, v)
    L.v[nm] = v
    if not L.w[nm] then
        L.w[nm] = true
        L.wn[#L.wn + 1] = nm
    end
end

-- Writes what was set (HSET through pcall: a limits hash of the wrong type
-- was refused at the read already; anything else is logged, not fatal).
local function lim_flush(L)
    if #L.wn == 0 then return end
    local args = {}
    for _, nm in ipairs(L.wn) do
        args[#args + 1] = nm
        args[#args + 1] = string.format('%d', L.v[nm])
    end
    local r = redis.pcall('HSET', L.key, unpack(args))
    if type(r) == 'table' and r.err then
        redis.log(redis.LOG_WARNING, 'limits: ' .. L.key .. ': ' .. r.err)
    end
end

-- UTC calendar (Howard Hinnant's civil-from-days algorithms): the month of
-- a day number (days since 1970-01-01) as y * 100 + m, and the day number
-- of the first of the month after it. Caps count per UTC day and month.
local function utc_month(days)
    local z = days + 719468
    local era = math.floor(z / 146097)
    local doe = z - era * 146097
    local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) -
                                math.floor(doe / 146096)) / 365)
    local y = yoe + era * 400
    local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
    local mp = math.floor((5 * doy + 2) / 153)
    local m = mp < 10 and mp + 3 or mp - 9
    if m <= 2 then y = y + 1 end
    return y * 100 + m
end

local function utc_next_month_day(month)
    local y, m = math.floor(month / 100), month % 100 + 1
    if m == 13 then y, m = y + 1, 1 end
    if m <= 2 then y = y - 1 end
    local era = math.floor(y / 400)
    local yoe = y - era * 400
    local mp = m > 2 and m - 3 or m + 9
    local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) +
                    math.floor((153 * mp + 2) / 5)
    return era * 146097 + doe - 719468
end

-- The tag a capped hold carries between its route and its deadline,
-- "c<day>.<month>.<key id>": which day's and month's counters it is held
-- in, so that its settle gives back to those (a hold taken before
-- midnight and settled after it counts in the day it was taken).
local function cap_tag(h)
    local d, m, k = string.match(h, '^%d+|[^|]*|c(%d+)%.(%d+)%.(%d+)|')
    if not d then return nil end
    return tonumber(d), tonumber(m), k
end

-- ---- idempotency (Idempotency-Key: reserve.lua, settle.lua) ----
-- One string per key an account used, pg:{A}:idem:<SHA-256 of the key, hex>
-- (common/hotkeys.h), in the account's slot like the limits hash:
--   f|<fp>|<rid>|<deadline ms>   the first call is in flight (reserve.lua;
--                                PX the hold's ttl: it dies with the hold)
--   d|<fp>|<rid>|<answer>        its billable answer, to replay (settle.lua;
--                                PX IDEMPOTENCY_TTL)
--   n|<fp>|<rid>|<status>|<why>  billable, but the answer is not kept (why:
--                                t too large, l its settle came late)
-- fp is the request's fingerprint (SHA-256 of method, target and body
-- hash, hex), rid the first call's reservation id. The answer is the
-- gateway's own format (gateway/idem.c); the scripts only carry it.
local function idem_key(akey, khash)
    return (string.gsub(akey, 'acct$', 'idem:')) .. khash
end

-- A marker's parts {kind, fp, rid, rest = what follows rid's '|'}, or nil.
local function idem_parse(v)
    local kind, fp, rid, at = string.match(v, '^([fdn])|(%x+)|(%w+)|()')
    if not kind or #fp ~= 64 then return nil end
    return {kind = kind, fp = fp, rid = rid, at = at, v = v}
end

-- An argument that names a key or a fingerprint: 64 hex digits.
local function idem_hex(s)
    return type(s) == 'string' and #s == 64 and string.find(s, '^%x+$') ~= nil
end

-- The per-account budget of stored answers, pg:{A}:idemb: a hash of the
-- bytes stored per time bucket, IDEM_BUCKETS + 1 buckets covering the TTL,
-- so that what was stored more than a TTL ago leaves the count without a
-- scan (settle.lua adds to the current bucket and deletes those past the
-- window; the hash expires when no answer was stored for a TTL). The count
-- errs high by at most one bucket (answers of the oldest bucket that
-- already expired), never low.
local IDEM_BUCKETS = 24
local function idem_budget_key(akey)
    return (string.gsub(akey, 'acct$', 'idemb'))
end

local function idem_bucket_ms(ttl)
    return math.ceil(ttl / IDEM_BUCKETS)
end

-- Bytes stored in the window of NOW for a TTL, and the ms until the oldest
-- bucket with bytes leaves it; nil when the hash is unusable.
local function idem_used(bkey, now, ttl)
    local B = idem_bucket_ms(ttl)
    local cur = math.floor(now / B)
    local names = {}
    for k = cur - IDEM_BUCKETS, cur do names[#names + 1] = string.format('%d', k) end
    local v = redis.pcall('HMGET', bkey, unpack(names))
    if type(v) ~= 'table' or v.err then return nil end
    local used, wait = 0, nil
    for j = 1, #names do
        local x = v[j] and int(v[j])
        if x and x > 0 then
            used = used + x
            if not wait then wait = (cur - IDEM_BUCKETS + j - 1 + IDEM_BUCKETS + 1) * B - now end
        end
    end
    return used, wait or B
end

-- An answer of BYTES stored now: counted in the current bucket; the
-- buckets that left the window go (see idem_used).
local function idem_count(bkey, now, ttl, bytes)
    local B = idem_bucket_ms(ttl)
    local cur = math.floor(now / B)
    local old = {}
    for k = cur - 2 * IDEM_BUCKETS - 1, cur - IDEM_BUCKETS - 1 do
        old[#old + 1] = string.format('%d', k)
    end
    local r = redis.pcall('HINCRBY', bkey, string.format('%d', cur), string.format('%d', bytes))
    if type(r) == 'table' and r.err then
        redis.log(redis.LOG_WARNING, 'idempotency: ' .. bkey .. ': ' .. r.err)
        return
    end
    redis.pcall('HDEL', bkey, unpack(old))
    redis.pcall('EXPIRE', bkey, string.format('%d', math.ceil((ttl + B) / 1000) + 1))
end
