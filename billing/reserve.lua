-- reserve.lua: hold calls' prices against their accounts' available points.
-- Owns the only path that creates holds. Does not price calls (the caller
-- passes the price) and does not touch the outbox: nothing is charged yet.
--
-- One call takes a batch of N >= 1 reservations (the gateway sends every
-- reservation of one loop iteration at once: Redis then pays the command,
-- script and reply overhead once per batch instead of once per call). Ops
-- are applied in order, each seeing the ones before it.
--
-- For op i (1-based): KEYS[2i-1] acct hash {credited, seq, spent, held},
--                     KEYS[2i]   holds hash rid -> "amount|route|deadline ms"
-- ARGV[4i-3] reservation id, ARGV[4i-2] price (> 0), ARGV[4i-1] ttl ms,
-- ARGV[4i] route id
--
-- Returns 3 integers per op, {status, available, held}:
--   1  held (or already held under this rid: idempotent), figures after it
--   0  short: available < price, figures now; nothing changed
--  -1  account unknown to Redis (never synced from Postgres)
--  -2  the account's data in Redis is unusable, or Redis refused the write
--      (e.g. out of memory): nothing changed for this op
--
-- A Lua error keeps the writes made before it, so ops in one batch must not
-- leave each other half-done: arguments are checked before any write, each
-- hold is one write done through redis.pcall (a refusal fails that op
-- alone), and an account's held total is written once at the end, when no
-- write can fail any more (its figures were checked as integers, and Redis
-- does not refuse later writes of a script for memory once one went in).
--
-- Numbers pass through Lua doubles: exact up to 2^53, which the ledger
-- enforces as the ceiling of any account's credited total. They are written
-- with %d, never by concatenation (which prints doubles as %.14g).
local n = #KEYS / 2
if n < 1 or n ~= math.floor(n) or #ARGV ~= 4 * n then
    return redis.error_reply('reserve: want 2 keys and 4 arguments per reservation')
end
for i = 1, n do
    local price, ttl = tonumber(ARGV[4 * i - 2]), tonumber(ARGV[4 * i - 1])
    if not price or price <= 0 or price ~= math.floor(price) then
        -- a non-positive hold would lower held and mint available points
        return redis.error_reply('reserve: price must be a positive integer')
    end
    if not ttl or ttl <= 0 then
        return redis.error_reply('reserve: ttl must be positive')
    end
end

-- An account's figures: a table, false when unknown, 'bad' when unusable.
local function figures(akey)
    local f = redis.pcall('HMGET', akey, 'credited', 'spent', 'held')
    if type(f) ~= 'table' or f.err then return 'bad' end
    if not f[1] then return false end
    local c, s, h = int(f[1]), int(f[2] or '0'), int(f[3] or '0')
    if not c or not s or not h then return 'bad' end
    return {credited = c, spent = s, held = h, added = 0}
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- Each account's figures are read once per batch and its held total written
-- once at the end; ops in between see the running figures.
local accts, order = {}, {}
local out = {}
local wrote = false
for i = 1, n do
    local akey, hkey = KEYS[2 * i - 1], KEYS[2 * i]
    local rid, route = ARGV[4 * i - 3], ARGV[4 * i]
    local price, ttl = tonumber(ARGV[4 * i - 2]), tonumber(ARGV[4 * i - 1])
    local a = accts[akey]
    if a == nil then
        a = figures(akey)
        accts[akey] = a
        if type(a) == 'table' then order[#order + 1] = akey end
    end
    local o = 3 * i - 2
    out[o], out[o + 1], out[o + 2] = -2, 0, 0
    if a == false then
        out[o] = -1
    elseif a ~= 'bad' then
        local avail = a.credited - a.spent - a.held
        if avail >= price then
            local r = redis.pcall('HSETNX', hkey, rid, string.format('%d|%s|%d', price, route, now + ttl))
            if type(r) == 'table' and not wrote and not string.find(r.err, 'WRONGTYPE', 1, true) then
                -- Refused before anything was written (a replica's READONLY,
                -- OOM: Redis checks those at a script's first write only):
                -- the whole batch fails with Redis's own error.
                return redis.error_reply(r.err)
            end
            if r == 1 then
                wrote = true
                a.held = a.held + price
                a.added = a.added + price
                out[o], out[o + 1], out[o + 2] = 1, avail - price, a.held
            elseif r == 0 then
                out[o], out[o + 1], out[o + 2] = 1, avail, a.held -- a retry of a hold taken
            end
        else
            local r = redis.pcall('HEXISTS', hkey, rid)
            if r == 1 then
                out[o], out[o + 1], out[o + 2] = 1, avail, a.held -- a retry of a hold taken
            elseif r == 0 then
                out[o], out[o + 1], out[o + 2] = 0, avail, a.held
            end
        end
    end
end
for _, akey in ipairs(order) do
    if accts[akey].added ~= 0 then
        redis.call('HINCRBY', akey, 'held', string.format('%d', accts[akey].added))
    end
end
return out
