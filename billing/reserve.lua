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
-- Redis commands are issued per key, not per op: one HMGET per account and
-- one per holds hash read everything first (each command from a script costs
-- about a microsecond of Redis's time, which per op was most of the script),
-- then one HSET per holds hash and one HINCRBY per account write it.
--
-- A Lua error keeps the writes made before it, so ops in one batch must not
-- leave each other half-done: arguments are checked before any write, the
-- holds are written through redis.pcall, and an account's held total is
-- written once at the end, when no write can fail any more (its figures were
-- checked as integers, and Redis does not refuse later writes of a script
-- for memory once one went in). If the first write is refused (a replica's
-- READONLY, out of memory) the batch answers that error and nothing changed.
--
-- Numbers pass through Lua doubles: exact up to 2^53, which the ledger
-- enforces as the ceiling of any account's credited total. They are written
-- with %d, never by concatenation (which prints doubles as %.14g).
local n = #KEYS / 2
if n < 1 or n ~= math.floor(n) or #ARGV ~= 4 * n then
    return redis.error_reply('reserve: want 2 keys and 4 arguments per reservation')
end
if n > 1024 then -- unpack() of one key's fields must stay within Lua's stack
    return redis.error_reply('reserve: at most 1024 reservations per call')
end
-- Prices and ttls as canonical integers: the price's own string then goes
-- into the hold unchanged (no string.format per op).
local prices, ints = {}, {}
for i = 1, n do
    local price, ttl = intc(ints, ARGV[4 * i - 2]), intc(ints, ARGV[4 * i - 1])
    if not price or price <= 0 then
        -- a non-positive hold would lower held and mint available points
        return redis.error_reply('reserve: price must be a positive integer')
    end
    if not ttl or ttl <= 0 then
        return redis.error_reply('reserve: ttl must be a positive integer')
    end
    prices[i] = price
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- Pass 1: every account's figures (false: unknown to Redis) and every
-- asked-for hold, one read per key (prelude.lua).
local accts, order, groups, gorder = read_batch(n, 1, 4, 3, false)
for _, akey in ipairs(order) do
    accts[akey].added = 0
end
for _, hkey in ipairs(gorder) do
    groups[hkey].fields, groups[hkey].ops = {}, {}
end

-- Pass 2: decide each op in order; each sees the holds taken before it.
local out, deadlines, contended = {}, {}, {}
for i = 1, n do
    local akey, hkey = KEYS[2 * i - 1], KEYS[2 * i]
    local rid, route = ARGV[4 * i - 3], ARGV[4 * i]
    local price = prices[i]
    local a, g = accts[akey], groups[hkey]
    local o = 3 * i - 2
    out[o], out[o + 1], out[o + 2] = -2, 0, 0
    if a == false then
        out[o] = -1
    elseif a ~= 'bad' and not g.bad then
        local avail = a.credited - a.spent - a.held
        if g.vals[rid] then
            out[o], out[o + 1], out[o + 2] = 1, avail, a.held -- a retry of a hold taken
        elseif avail >= price then
            g.fields[#g.fields + 1] = rid
            local ttl = ARGV[4 * i - 1]
            local dl = deadlines[ttl]
            if not dl then
                dl = string.format('%d', now + tonumber(ttl))
                deadlines[ttl] = dl
            end
            g.fields[#g.fields + 1] = ARGV[4 * i - 2] .. '|' .. route .. '|' .. dl
            g.vals[rid] = g.fields[#g.fields] -- a retry later in this batch finds it
            g.ops[#g.ops + 1] = i
            a.held = a.held + price
            a.added = a.added + price
            out[o], out[o + 1], out[o + 2] = 1, avail - price, a.held
        else
            out[o], out[o + 1], out[o + 2] = 0, avail, a.held
            -- Short while leases (lease.lua) sit on free points that, with
            -- the rest held, would cover it: tell them to give those back,
            -- so that the caller's wait ends. (A call the account cannot
            -- afford at all is refused, and leaves the leases be.)
            if a.lf > 0 and avail + a.held >= price then contended[akey] = true end
        end
    end
end

-- Pass 3: write the holds, then each account's held total.
local wrote = false
for _, hkey in ipairs(gorder) do
    local g = groups[hkey]
    if #g.fields > 0 then
        local r = redis.pcall('HSET', hkey, unpack(g.fields))
        if type(r) == 'table' and r.err then
            if not wrote then return redis.error_reply(r.err) end
            -- Not expected once a write went in (see above); if it happens,
            -- these ops took nothing. Figures answered to later ops of the
            -- account stay lower than true, never higher.
            for _, i in ipairs(g.ops) do
                local a = accts[KEYS[2 * i - 1]]
                local price = prices[i]
                a.held, a.added = a.held - price, a.added - price
                out[3 * i - 2], out[3 * i - 1], out[3 * i] = -2, 0, 0
            end
        else
            wrote = true
        end
    end
end
for _, akey in ipairs(order) do
    if accts[akey].added ~= 0 then
        redis.call('HINCRBY', akey, 'held', string.format('%d', accts[akey].added))
    end
end
for akey in pairs(contended) do
    redis.pcall('HSET', akey, 'contend', string.format('%d', now)) -- a hint: may be refused
end
return out
