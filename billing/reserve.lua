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
-- ARGV[S(i-1)+1] reservation id, +2 price (> 0), +3 ttl ms, +4 route id,
-- and with S = 7 (the gateway's form; S = 4 is the form without limits):
-- +5 the API key's id (0 unknown), +6 +7 the route's rate limit per key,
-- quota and window ms (0 0: none); and with S = 11 (the gateway's form for a
-- batch with a call that carries an Idempotency-Key): +8 the SHA-256 of the
-- key (hex; '' for an op without one), +9 the request's fingerprint (hex),
-- +10 IDEMPOTENCY_TTL ms, +11 the account's budget of stored answers, bytes
--
-- Returns per op, {status, available, held} (S = 4) or {status, available,
-- held, flags, q, w, r, t} (S = 7), or those and a 9th element (S = 11): the
-- stored answer (a string) for status 4, else 0:
--   1  held (or already held under this rid: idempotent), figures after it
--   0  short: available < price, figures now; nothing changed
--  -1  account unknown to Redis (never synced from Postgres)
--  -2  the account's data in Redis is unusable, or Redis refused the write
--      (e.g. out of memory): nothing changed for this op
--   2  rate limited: q w the limit that refused (quota, window ms), r 0, t
--      ms until one call passes; nothing changed
--   3  a spending cap refused: q the cap, w 1 daily or 2 monthly, r what
--      is left of it, t ms until it resets; nothing changed
-- and for an op with an Idempotency-Key (prelude.lua's markers), decided
-- before its limits and its points, nothing changed and nothing taken:
--   4  replay: the first call's answer, stored (9th element); available
--      and held as they are
--   5  the first call with the key is in flight: t ms until its marker
--      expires (the hold's deadline)
--   6  the key was used with another fingerprint (method, target, body)
--   7  the first call was billable but its answer is not kept: q its
--      status, w 1 (too large) or 2 (its settle came late)
--   8  the account's stored answers are at their budget: t ms until the
--      oldest of them leave the count
-- An op that is held with a key writes its in-flight marker (PX its ttl):
-- a later op with the key, in this batch or after, gets 5 until the
-- call's settle stores its answer (4, 7) or clears the marker (a failed
-- call: the next one runs anew), or until the hold's deadline.
-- flags: 1 the call is under limits (the gateway serves it with no lease,
-- so that every such call is checked here), 2 q w r t describe the rate
-- limit closest to refusing (for the RateLimit headers of a call held).
--
-- Limits (the account's pg:{A}:lim hash, prelude.lua) are read only for
-- an account billing marked limited, or a route with a rate: others cost
-- nothing more. Rate limits are GCRA buckets, one per (key, route) (the
-- key's own limit, else the route's) and one per account (its own limit,
-- if set): a quota q per window w lets q calls at once and one more every
-- w/q; the state is the bucket's theoretical arrival time, tat.<bucket>,
-- in us. Caps hold the price against the day's and the month's counters
-- of the account and of the key (<scope>.d|m: the period, .ds|ms spent,
-- .dh|mh held), and the hold carries the periods (cap_tag) so that its
-- settle moves them from held to spent. A call is checked against every
-- limit, then the points, and takes from each only when all pass.
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
local S = n >= 1 and #ARGV / n or 0
if n < 1 or n ~= math.floor(n) or (S ~= 4 and S ~= 7 and S ~= 11) then
    return redis.error_reply('reserve: want 2 keys and 4, 7 or 11 arguments per reservation')
end
if n > 1024 then -- unpack() of one key's fields must stay within Lua's stack
    return redis.error_reply('reserve: at most 1024 reservations per call')
end
-- Prices and ttls as canonical integers: the price's own string then goes
-- into the hold unchanged (no string.format per op).
local prices, ints, rq, rw, idem = {}, {}, {}, {}, {}
for i = 1, n do
    local b = S * (i - 1)
    local price, ttl = intc(ints, ARGV[b + 2]), intc(ints, ARGV[b + 3])
    if not price or price <= 0 then
        -- a non-positive hold would lower held and mint available points
        return redis.error_reply('reserve: price must be a positive integer')
    end
    if not ttl or ttl <= 0 then
        return redis.error_reply('reserve: ttl must be a positive integer')
    end
    prices[i] = price
    rq[i], rw[i] = 0, 0
    if S == 7 then
        local k, q, w = intc(ints, ARGV[b + 5]), intc(ints, ARGV[b + 6]), intc(ints, ARGV[b + 7])
        if not k or k < 0 or not q or q < 0 or not w or w < 0 or (q > 0) ~= (w > 0) then
            return redis.error_reply('reserve: key id, quota and window must be integers >= 0')
        end
        rq[i], rw[i] = q, w
    end
    if S == 11 and ARGV[b + 8] ~= '' then
        local ttl, budget = intc(ints, ARGV[b + 10]), intc(ints, ARGV[b + 11])
        if not idem_hex(ARGV[b + 8]) or not idem_hex(ARGV[b + 9]) or not ttl or ttl <= 0 or
            not budget or budget <= 0 then
            return redis.error_reply('reserve: idempotency key and fingerprint must be 64 hex ' ..
                                         'digits, ttl and budget positive integers')
        end
        idem[i] = {kh = ARGV[b + 8], fp = ARGV[b + 9], ttl = ttl, budget = budget}
    end
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local today = math.floor(now / 86400000)
local month = utc_month(today)
local DAY_RESET = (today + 1) * 86400000 - now
local MONTH_RESET = utc_next_month_day(month) * 86400000 - now
local lims = {by = {}, order = {}} -- account key -> limits (prelude.lua lim_of)

-- One GCRA bucket (quota Q per window W ms; TAT field NAME of L): nil and
-- its new tat when a call passes, with {q, w, r, t} for the headers; or
-- the ms until one would pass.
local function bucket(L, name, q, w)
    local T = w * 1000 / q
    local tat = lim_num(L, name)
    if tat < now_us then tat = now_us end
    local new = tat + T
    if new - now_us > w * 1000 then
        return math.ceil((new - now_us - w * 1000) / 1000)
    end
    return nil, new, {q, w, math.floor((w * 1000 - (new - now_us)) / T + 1e-6),
                      math.ceil((new - now_us) / 1000)}
end

-- The cap checks of one scope's names N: nil, or the refusal.
local function caps_check(L, N, price)
    local cap = lim_num(L, N.cd)
    if cap > 0 then
        local used = lim_num(L, N.d) == today and lim_num(L, N.ds) + lim_num(L, N.dh) or 0
        if used + price > cap then
            return {3, cap, 1, cap - used > 0 and cap - used or 0, DAY_RESET}
        end
    end
    cap = lim_num(L, N.cm)
    if cap > 0 then
        local used = lim_num(L, N.m) == month and lim_num(L, N.ms) + lim_num(L, N.mh) or 0
        if used + price > cap then
            return {3, cap, 2, cap - used > 0 and cap - used or 0, MONTH_RESET}
        end
    end
    return nil
end

-- Checks op I (account A, hold PRICE) against every limit that applies:
-- nil, or the refusal {status, q, w, r, t}; then what to write when the
-- call is held: {L, a, k (names), tats = {name, tat}..., info}. Field names
-- and the limits hash's read are made once per call for each key and
-- route (prelude.lua lim_names), not per op.
local function limits_check(i, akey, price, route)
    local L = lim_of(lims, akey)
    local a = lim_names(L, 'a')
    local k = lim_names(L, S == 7 and ARGV[S * (i - 1) + 5] or '0')
    local tk = k.tat[route]
    if not tk then
        tk = 'tat.' .. k.p .. route
        k.tat[route] = tk
    end
    if not k.seen[route] then
        if not lim_read(L, {a.rq, a.rw, a.cd, a.cm, k.rq, k.rw, k.cd, k.cm, 'tat.a', tk, a.d,
                            a.ds, a.dh, a.m, a.ms, a.mh, k.d, k.ds, k.dh, k.m, k.ms, k.mh}) then
            return {-2, 0, 0, 0, 0}
        end
        k.seen[route] = true
    end
    local plan = {L = L, a = a, k = k, tats = {}, info = nil}
    -- The key's bucket on this route (its own limit, else the route's),
    -- then the account's.
    local q, w = lim_num(L, k.rq), lim_num(L, k.rw)
    if q <= 0 or w <= 0 then q, w = rq[i], rw[i] end
    local aq, aw = lim_num(L, a.rq), lim_num(L, a.rw)
    for b = 1, 2 do
        local name, bq, bw = tk, q, w
        if b == 2 then name, bq, bw = 'tat.a', aq, aw end
        if bq > 0 and bw > 0 then
            local retry, new, info = bucket(L, name, bq, bw)
            if retry then return {2, bq, bw, 0, retry} end
            plan.tats[#plan.tats + 1] = {name, new}
            if not plan.info or info[3] < plan.info[3] then plan.info = info end
        end
    end
    -- Caps: what is spent and held in the current day and month, per scope.
    local refused = caps_check(L, a, price) or caps_check(L, k, price)
    if refused then return refused end
    return nil, plan
end

-- One scope's counters of the current day and month take PRICE as held.
local function caps_take(L, N, price)
    if lim_num(L, N.d) ~= today then
        lim_set(L, N.d, today)
        lim_set(L, N.ds, 0)
        lim_set(L, N.dh, 0)
    end
    lim_set(L, N.dh, lim_num(L, N.dh) + price)
    if lim_num(L, N.m) ~= month then
        lim_set(L, N.m, month)
        lim_set(L, N.ms, 0)
        lim_set(L, N.mh, 0)
    end
    lim_set(L, N.mh, lim_num(L, N.mh) + price)
end

-- Op held: its buckets move and its price is held in every cap counter
-- (kept whether or not a cap is set, so that a cap set later in a day
-- counts the day's calls). Returns the hold's cap tag (made once per key).
local function limits_take(plan, price)
    local L, k = plan.L, plan.k
    for _, tt in ipairs(plan.tats) do lim_set(L, tt[1], math.floor(tt[2])) end
    caps_take(L, plan.a, price)
    caps_take(L, k, price)
    if not k.tag then k.tag = string.format('c%d.%d.%s', today, month, string.sub(k.p, 2, -2)) end
    return k.tag
end

-- Idempotency: the markers seen in this call (key -> prelude.lua's parts,
-- false: none, 'bad': unusable), including those this batch writes, and
-- each account's stored bytes (idem_used), read once per call.
local iseen, ibudget = {}, {}

-- The verdict on op I's Idempotency-Key IM: nil (no marker and room in the
-- budget: the call goes on to its limits and points), or the answer
-- {status, q, w, r, t, answer}.
local function idem_check(akey, im)
    im.mkey = idem_key(akey, im.kh)
    local st = iseen[im.mkey]
    if st == nil then
        local v = redis.pcall('GET', im.mkey)
        if type(v) == 'table' then
            st = 'bad' -- not a string
        elseif not v then
            st = false
        else
            st = idem_parse(v) or 'bad'
        end
        iseen[im.mkey] = st
    end
    if st == 'bad' then
        redis.log(redis.LOG_WARNING, 'reserve: unusable idempotency marker ' .. im.mkey)
        return {-2, 0, 0, 0, 0}
    end
    if st then
        if st.fp ~= im.fp then return {6, 0, 0, 0, 0} end
        if st.kind == 'f' then
            local dl = int(string.sub(st.v, st.at)) or now
            return {5, 0, 0, 0, dl > now and dl - now or 1}
        end
        if st.kind == 'd' then return {4, 0, 0, 0, 0, string.sub(st.v, st.at)} end
        local status, why = string.match(st.v, '^(%d+)|(%a)', st.at)
        return {7, int(status or '0') or 0, why == 't' and 1 or 2, 0, 0}
    end
    local bu = ibudget[akey]
    if not bu then
        local used, wait = idem_used(idem_budget_key(akey), now, im.ttl)
        if not used then
            redis.log(redis.LOG_WARNING, 'reserve: unusable idempotency budget of ' .. akey)
            return {-2, 0, 0, 0, 0}
        end
        bu = {used, wait}
        ibudget[akey] = bu
    end
    if bu[1] >= im.budget then return {8, 0, 0, 0, bu[2]} end
    return nil
end

-- Pass 1: every account's figures (false: unknown to Redis) and every
-- asked-for hold, one read per key (prelude.lua).
local accts, order, groups, gorder = read_batch(n, 1, S, S - 1, false)
for _, akey in ipairs(order) do
    accts[akey].added = 0
end
for _, hkey in ipairs(gorder) do
    groups[hkey].fields, groups[hkey].ops = {}, {}
end

-- Pass 2: decide each op in order; each sees the holds taken before it
-- (and the limits' state as the ops before it left it).
local R = S == 11 and 9 or (S == 7 and 8 or 3) -- elements answered per op
local out, deadlines, contended = {}, {}, {}
local iwrites = {} -- in-flight markers to write: {op, key, value, ttl}
for i = 1, R * n do out[i] = 0 end
for i = 1, n do
    local akey, hkey = KEYS[2 * i - 1], KEYS[2 * i]
    local b = S * (i - 1)
    local rid, route = ARGV[b + 1], ARGV[b + 4]
    local price = prices[i]
    local a, g = accts[akey], groups[hkey]
    local o = R * (i - 1) + 1
    out[o], out[o + 1], out[o + 2] = -2, 0, 0
    local refused, plan = nil, nil
    local im = idem[i]
    if im and type(a) == 'table' and not g.bad and not g.vals[rid] then
        -- A retry is answered from its key alone: before the limits (a
        -- replay is not a call) and the points (nor does it cost any).
        refused = idem_check(akey, im)
        if refused and refused[1] == 4 then
            out[o + 8] = refused[6]
            refused[2], refused[3] = a.credited - a.spent - a.held + a.lf, a.held
        end
    end
    if not refused and type(a) == 'table' and not g.bad and not g.vals[rid] and
        (a.limited or rq[i] > 0) then
        refused, plan = limits_check(i, akey, price, route)
        if R >= 8 then out[o + 3] = 1 end
    end
    if a == false then
        out[o] = -1
    elseif refused and refused[1] == 4 then
        out[o], out[o + 1], out[o + 2] = 4, refused[2], refused[3]
    elseif refused then
        if R >= 8 then
            out[o], out[o + 4], out[o + 5], out[o + 6], out[o + 7] =
                refused[1], refused[2], refused[3], refused[4], refused[5]
        end
    elseif a ~= 'bad' and not g.bad then
        local avail = a.credited - a.spent - a.held
        if g.vals[rid] then
            out[o], out[o + 1], out[o + 2] = 1, avail, a.held -- a retry of a hold taken
            if R >= 8 and (a.limited or rq[i] > 0) then out[o + 3] = 1 end
        elseif avail >= price then
            g.fields[#g.fields + 1] = rid
            local ttl = ARGV[b + 3]
            local dl = deadlines[ttl]
            if not dl then
                dl = string.format('%d', now + tonumber(ttl))
                deadlines[ttl] = dl
            end
            local mid = route .. '|'
            if plan then
                mid = mid .. limits_take(plan, price) .. '|'
                if plan.info and R >= 8 then
                    out[o + 3] = 3
                    out[o + 4], out[o + 5], out[o + 6], out[o + 7] =
                        plan.info[1], plan.info[2], plan.info[3], plan.info[4]
                end
            end
            g.fields[#g.fields + 1] = ARGV[b + 2] .. '|' .. mid .. dl
            g.vals[rid] = g.fields[#g.fields] -- a retry later in this batch finds it
            g.ops[#g.ops + 1] = i
            if im then
                -- In flight until the hold's deadline: a later op with the
                -- key (in this batch too) gets 5.
                local v = 'f|' .. im.fp .. '|' .. rid .. '|' .. dl
                iwrites[#iwrites + 1] = {i, im.mkey, v, ttl}
                iseen[im.mkey] = idem_parse(v)
            end
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

-- Pass 3: write the in-flight markers, the holds, then each account's
-- held total. A marker goes before its hold: a hold without its marker
-- would let a retry run the call a second time.
local wrote = false
local unmarked = {} -- op -> true: its marker was refused, it takes nothing
for _, m in ipairs(iwrites) do
    local r = redis.pcall('SET', m[2], m[3], 'PX', m[4])
    if type(r) == 'table' and r.err then
        if not wrote then return redis.error_reply(r.err) end
        unmarked[m[1]] = true -- not expected after a write (see above)
    else
        wrote = true
    end
end
-- Op I took nothing after all: its figures go back, it answers -2.
local function untake(i)
    local a = accts[KEYS[2 * i - 1]]
    local price = prices[i]
    a.held, a.added = a.held - price, a.added - price
    out[R * (i - 1) + 1], out[R * (i - 1) + 2], out[R * (i - 1) + 3] = -2, 0, 0
end
for _, hkey in ipairs(gorder) do
    local g = groups[hkey]
    local fields = g.fields
    if next(unmarked) then
        fields = {}
        for j, i in ipairs(g.ops) do
            if unmarked[i] then
                untake(i)
            else
                fields[#fields + 1] = g.fields[2 * j - 1]
                fields[#fields + 1] = g.fields[2 * j]
            end
        end
    end
    if #fields > 0 then
        local r = redis.pcall('HSET', hkey, unpack(fields))
        if type(r) == 'table' and r.err then
            if not wrote then return redis.error_reply(r.err) end
            -- Not expected once a write went in (see above); if it happens,
            -- these ops took nothing (and their markers go). Figures
            -- answered to later ops of the account stay lower than true,
            -- never higher.
            for _, i in ipairs(g.ops) do
                if not unmarked[i] then
                    untake(i)
                    if idem[i] and idem[i].mkey then redis.pcall('DEL', idem[i].mkey) end
                end
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
-- The limits' state after the holds (a batch refused at its first write
-- returned above, before it): buckets and cap counters moved only for
-- calls held.
for _, akey in ipairs(lims.order) do lim_flush(lims.by[akey]) end
for akey in pairs(contended) do
    redis.pcall('HSET', akey, 'contend', string.format('%d', now)) -- a hint: may be refused
end
return out
