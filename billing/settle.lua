-- settle.lua: close holds, each either committing a charge or releasing it,
-- and append the outcomes to the outbox stream in the same atomic step, so
-- that a charge exists in Redis iff it is on its way to Postgres.
-- Does not decide billability: the caller says commit/release/expire/late.
--
-- One call takes a batch of N >= 1 settles (see reserve.lua for why) and
-- appends ONE outbox entry carrying every hold it closed:
--   ts <ms>, then per closed hold a field c = "rid|acct|route|amount|hold|outcome|status"
-- (route ids cannot contain '|'; billing/settlement.c parses this), and adds
-- the number of those records to pg:backlog (HOT_BACKLOG: records not yet in
-- Postgres, which settlement lowers as it acknowledges them) in the same step.
--
-- KEYS[1] outbox stream; for op i (1-based): KEYS[2i] acct hash, KEYS[2i+1] holds hash
-- and S = 5 arguments per op (S = 8: the gateway's form for a batch with a
-- call that carried an Idempotency-Key), from b = S(i-1):
-- ARGV[b+1] reservation id
-- ARGV[b+2] charge requested (commit and late only; capped to [0, hold])
-- ARGV[b+3] outcome: commit | release | expire | late
-- ARGV[b+4] upstream status (0 when none)
-- ARGV[b+5] account id (copied into the outbox entry)
-- ARGV[b+6] the SHA-256 of the call's Idempotency-Key (hex; '' none)
-- ARGV[b+7] the marker to store for it (prelude.lua: "d|..." the answer,
--           "n|..." billable without the answer), its rid this op's; ''
--           to clear the call's in-flight marker (a call not billable:
--           a retry runs anew)
-- ARGV[b+8] IDEMPOTENCY_TTL ms: the stored marker's PX, and the budget's
--
-- The marker is stored, or cleared, whatever became of the hold (a call the
-- device ran is not run again even when it was not charged), unless it is
-- another call's (a retry that ran after this call's marker expired): that
-- one is left alone. A stored answer counts against the account's budget
-- (pg:{A}:idemb, prelude.lua). A marker that cannot be written is logged:
-- the charge is applied whatever becomes of it.
--
-- expire is the sweeper's: the hold's call ended unseen, released at cost 0.
-- For a per-call hold it also leaves pg:{A}:swept:<rid> = "hold|route" (7
-- days), and for a whole lease past its deadline pg:{A}:swept:L<id> = the
-- lease's last seq (lease.lua): the marks a replayed settle needs.
-- late is a settle the gateway answered but could not deliver before it
-- stopped (spilled to disk, replayed at its next start): with the hold
-- still there, exactly a commit (recorded as commit); with the hold gone and
-- its swept mark there, the charge (capped at the hold) is taken from the
-- available points as far as they go (never an overdraft), the mark is
-- dropped and a record with outcome late is appended (none when 0 was
-- charged) that settlement uses to upgrade the expire row; with neither,
-- a no-op (settled already).
--
-- Returns 3 integers per op, {status, charged, available}:
--   1  settled now; 0  no such hold (already settled or swept): no-op;
--  -2  the account's or the hold's data in Redis is unusable: nothing
--      changed for this op (logged; the hold stays for a human)
-- or an error reply when the outbox refused the entry: then nothing changed.
--
-- All or nothing: every read and check comes first; then the outbox entry is
-- the first write (if Redis refuses it, e.g. out of memory, nothing has been
-- written), and the writes after it cannot fail (a Lua error would keep the
-- writes made before it); the marks and the backlog count go last, through
-- pcall (a key of the wrong type there is logged, never a half-applied op).
--
-- Redis commands are issued per key, not per op (see reserve.lua): one HMGET
-- per account and per holds hash, the XADD, one HDEL per holds hash, the
-- HINCRBYs per account and one INCRBY of the backlog. Only the sweeper's
-- expires and replayed late settles touch the swept marks.
local n = (#KEYS - 1) / 2
local S = n >= 1 and #ARGV / n or 0
if n < 1 or n ~= math.floor(n) or (S ~= 5 and S ~= 8) then
    return redis.error_reply('settle: want 1 + 2 keys and 5 or 8 arguments per settle')
end
if n > 1024 then -- unpack() of one key's fields must stay within Lua's stack
    return redis.error_reply('settle: at most 1024 settles per call')
end

local charges, ints, idem = {}, {}, {}
for i = 1, n do
    local b = S * (i - 1)
    charges[i] = intc(ints, ARGV[b + 2])
    if not charges[i] then
        return redis.error_reply('settle: charge must be an integer')
    end
    if S == 8 and ARGV[b + 6] ~= '' then
        local ttl, v = intc(ints, ARGV[b + 8]), ARGV[b + 7]
        local p = v ~= '' and idem_parse(v)
        if not idem_hex(ARGV[b + 6]) or not ttl or ttl <= 0 or
            (v ~= '' and (not p or p.kind == 'f' or p.rid ~= ARGV[b + 1])) then
            return redis.error_reply('settle: idempotency key must be 64 hex digits, the ' ..
                                         "marker this op's answer, the ttl a positive integer")
        end
        idem[i] = {kh = ARGV[b + 6], v = v, ttl = ttl}
    end
end

-- A capped hold (reserve.lua: its cap tag) gives its amount back to the
-- cap counters of the day and month it was held in, and adds its charge to
-- what they count as spent (only while those periods are current: the
-- counters of a day that is over are not kept). Its account's limits hash
-- is read in pass 2 and written after the outbox entry, like the rest.
local lims = {by = {}, order = {}} -- account key -> limits (prelude.lua lim_of)
-- One scope's counters (names N) of day D and month M, if current.
local function caps_give(L, N, d, m, hold, charge)
    if lim_num(L, N.d) == d then
        local left = lim_num(L, N.dh) - hold
        lim_set(L, N.dh, left > 0 and left or 0)
        lim_set(L, N.ds, lim_num(L, N.ds) + charge)
    end
    if lim_num(L, N.m) == m then
        local left = lim_num(L, N.mh) - hold
        lim_set(L, N.mh, left > 0 and left or 0)
        lim_set(L, N.ms, lim_num(L, N.ms) + charge)
    end
end

local function caps_settle(akey, h, hold, charge)
    local d, m, key = cap_tag(h)
    if not d then return end
    local L = lim_of(lims, akey)
    local a, k = lim_names(L, 'a'), lim_names(L, key)
    if not k.settled then
        if not lim_read(L, {a.d, a.ds, a.dh, a.m, a.ms, a.mh, k.d, k.ds, k.dh, k.m, k.ms, k.mh}) then
            redis.log(redis.LOG_WARNING, 'settle: unusable limits hash ' .. L.key)
            return
        end
        k.settled = true
    end
    caps_give(L, a, d, m, hold, charge)
    caps_give(L, k, d, m, hold, charge)
end

-- A hold's amount, route and amount as written, from "amount|route|deadline"
-- (or "amount|route|cap tag|deadline");
-- nil if malformed.
local function parse_hold(h)
    local hstr, route = string.match(h, '^(%d+)|([^|]*)')
    if not hstr then return nil end
    local hold = intc(ints, hstr)
    if not hold then return nil end
    return hold, route, hstr
end

-- Pass 1: every account's figures (zeros for an account Redis lost: the
-- hold's own figures still balance) and every hold asked for, one read per
-- key (prelude.lua).
local accts, order, groups, gorder = read_batch(n, 2, S, S - 1, true)
for _, akey in ipairs(order) do
    accts[akey].dheld, accts[akey].dspent, accts[akey].dlf = 0, 0, 0
end
for _, hkey in ipairs(gorder) do
    groups[hkey].closed, groups[hkey].updated = {}, {}
    -- "pg:{A}:" (hotkeys.h): the account's swept marks are named from it.
    groups[hkey].base = string.match(hkey, '^(.*:)holds$')
end
local SWEPT_TTL = '604800' -- 7 days: how long a spilled settle may wait for its replay
local marks = {} -- swept mark -> value to SET, or false to DEL
local seen = {}  -- swept mark -> its value as read (false: absent or consumed)

-- A lease (lease.lua) is touched here only by the sweeper (outcome
-- expire), and by its deadlines as they are now (each of its ops moves
-- them, maybe since the sweeper read them): past its deadline it goes back
-- whole, at cost 0, with no outbox record (the calls it served that never
-- reached lease.lua were never answered); past its soft deadline only, its
-- free points go back (its worker stopped promising from it). Returns 1 if
-- it changed.
local now = nil
local function time_now()
    if not now then
        local t = redis.call('TIME')
        now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    end
    return now
end

-- Idempotency markers: as read or decided in this call (key -> prelude.lua's
-- parts, false none, 'bad' unusable), what to write (key -> {value, ttl},
-- false to delete), and the bytes each account's new answers take.
local iseen, iwrite, ibytes, ibkeys = {}, {}, {}, {}
local function idem_settle(akey, rid, im)
    local mkey = idem_key(akey, im.kh)
    local st = iseen[mkey]
    if st == nil then
        local v = redis.pcall('GET', mkey)
        if type(v) == 'table' then
            st = 'bad'
        elseif not v then
            st = false
        else
            st = idem_parse(v) or 'bad'
        end
    end
    if st == 'bad' then
        redis.log(redis.LOG_WARNING, 'settle: unusable idempotency marker ' .. mkey)
        return
    end
    if st and st.rid ~= rid then return end -- another call's
    -- This call's answer is already stored: final. A resend of the settle
    -- (its reply was lost) may carry less (the bare status when the gateway
    -- no longer had the answer) and must not overwrite it.
    if st and st.kind ~= 'f' then return end
    if im.v == '' then
        if st and st.kind == 'f' then
            iwrite[mkey], iseen[mkey] = false, false
        end
        return
    end
    local bkey = idem_budget_key(akey)
    if not ibytes[bkey] then
        ibytes[bkey] = 0
        ibkeys[#ibkeys + 1] = {bkey, im.ttl}
    end
    ibytes[bkey] = ibytes[bkey] + #im.v + #mkey + 64
    iwrite[mkey], iseen[mkey] = {im.v, im.ttl}, idem_parse(im.v)
end

local function expire_lease(a, g, rid, h)
    local amount, seq, free, dl, soft = string.match(h, '^(%d+)|~lease|(%d+)|(%d+)|(%d+)|(%d+)$')
    amount, free, dl, soft = int(amount or ''), int(free or ''), int(dl or ''), int(soft or '')
    if not amount or not free or not dl or not soft or string.sub(rid, 1, 1) ~= 'L' then
        return -2
    end
    time_now()
    if dl <= now then
        g.vals[rid] = nil
        g.closed[#g.closed + 1] = rid
        a.held, a.dheld = a.held - amount, a.dheld - amount
        if g.base then marks[g.base .. 'swept:' .. rid] = seq end
    elseif soft <= now and free > 0 then
        local v = string.format('%d|~lease|%s|0|%d|%d', amount - free, seq, dl, soft)
        g.updated[#g.updated + 1] = rid
        g.updated[#g.updated + 1] = v
        g.vals[rid] = v -- the same lease later in this batch sees it emptied
        a.held, a.dheld = a.held - free, a.dheld - free
    else
        return 0
    end
    a.lf, a.dlf = a.lf - free, a.dlf - free
    return 1
end

-- Pass 2: decide each op in order.
local out, entry = {}, {}
for i = 1, n do
    local akey, hkey = KEYS[2 * i], KEYS[2 * i + 1]
    local b = S * (i - 1)
    local rid, outcome = ARGV[b + 1], ARGV[b + 3]
    local a, g = accts[akey], groups[hkey]
    local o = 3 * i - 2
    out[o], out[o + 1], out[o + 2] = -2, 0, 0
    local h = nil
    if a ~= 'bad' then
        out[o + 2] = a.credited - a.spent - a.held + a.lf
        if not g.bad then
            h = g.vals[rid]
            if h == nil then out[o] = 0 end -- not held, settled, swept, or closed earlier in this batch
        end
    end
    local hold, route, hstr
    if h then hold, route, hstr = parse_hold(h) end
    if route == '~lease' then
        out[o] = outcome == 'expire' and expire_lease(a, g, rid, h) or 0
        out[o + 2] = a.credited - a.spent - a.held + a.lf
    elseif outcome == 'late' and out[o] == 0 and g.base then
        -- No hold: swept (mark there) or settled already (no mark).
        local sk = g.base .. 'swept:' .. rid
        local sv = seen[sk]
        if sv == nil then sv = marks[sk] end -- swept earlier in this batch
        if sv == nil then
            sv = redis.pcall('GET', sk)
            if type(sv) ~= 'string' then sv = false end
            seen[sk] = sv
        end
        local hstr, sroute = false, nil
        if sv then hstr, sroute = string.match(sv, '^(%d+)|([^|]*)$') end
        local hold = hstr and intc(ints, hstr)
        if hold then
            local charge = charges[i]
            if charge > hold then charge = hold end
            local avail = a.credited - a.spent - a.held
            if charge > avail then charge = avail end
            if charge < 0 then charge = 0 end
            seen[sk], marks[sk] = false, false
            if charge > 0 then
                a.spent, a.dspent = a.spent + charge, a.dspent + charge
                entry[#entry + 1] = 'c'
                entry[#entry + 1] = rid .. '|' .. ARGV[b + 5] .. '|' .. sroute .. '|' ..
                                        string.format('%d', charge) .. '|' .. hstr .. '|late|' ..
                                        ARGV[b + 4]
            end
            out[o], out[o + 1], out[o + 2] = 1, charge, a.credited - a.spent - a.held + a.lf
        elseif sv then
            redis.log(redis.LOG_WARNING, 'settle: unusable swept mark ' .. sk .. ': ' .. sv)
        end
    elseif h then
        if not hold then
            redis.log(redis.LOG_WARNING, 'settle: unusable hold ' .. rid .. ' in ' .. hkey .. ': ' .. h)
        else
            -- The figures' own canonical strings go into the entry (no
            -- string.format per op): the charge as asked, or its bounds.
            local charge, cstr = 0, '0'
            local recorded = outcome
            if outcome == 'late' then recorded = 'commit' end -- the hold is there: a commit
            if recorded == 'commit' and charges[i] > 0 then
                charge, cstr = charges[i], ARGV[b + 2]
                if charge > hold then charge, cstr = hold, hstr end
            end
            g.vals[rid] = nil
            g.closed[#g.closed + 1] = rid
            caps_settle(akey, h, hold, charge)
            a.held, a.dheld = a.held - hold, a.dheld - hold
            a.spent, a.dspent = a.spent + charge, a.dspent + charge
            entry[#entry + 1] = 'c'
            entry[#entry + 1] = rid .. '|' .. ARGV[b + 5] .. '|' .. route .. '|' .. cstr .. '|' ..
                                    hstr .. '|' .. recorded .. '|' .. ARGV[b + 4]
            -- A guard hold ('_' route, credit.lua) is not a call: no mark.
            if outcome == 'expire' and g.base and string.sub(route, 1, 1) ~= '_' then
                marks[g.base .. 'swept:' .. rid] = hstr .. '|' .. route
            end
            out[o], out[o + 1], out[o + 2] = 1, charge, a.credited - a.spent - a.held + a.lf
        end
    end
    if idem[i] and a ~= 'bad' then idem_settle(akey, rid, idem[i]) end
end

-- Pass 3: the outbox entry first (the only write that may be refused), then
-- the holds and the accounts' totals.
if #entry > 0 then
    local r = redis.pcall('XADD', KEYS[1], '*', 'ts', string.format('%d', time_now()), unpack(entry))
    if type(r) == 'table' and r.err then
        return redis.error_reply(r.err) -- Redis's own code first (READONLY, OOM...)
    end
end
for _, hkey in ipairs(gorder) do
    local g = groups[hkey]
    if #g.closed > 0 then redis.call('HDEL', hkey, unpack(g.closed)) end
    if #g.updated > 0 then redis.call('HSET', hkey, unpack(g.updated)) end
end
for _, akey in ipairs(order) do
    local a = accts[akey]
    if a.dheld ~= 0 then redis.call('HINCRBY', akey, 'held', string.format('%d', a.dheld)) end
    if a.dspent ~= 0 then redis.call('HINCRBY', akey, 'spent', string.format('%d', a.dspent)) end
    if a.dlf ~= 0 then redis.call('HINCRBY', akey, 'leasefree', string.format('%d', a.dlf)) end
end
for _, akey in ipairs(lims.order) do lim_flush(lims.by[akey]) end
for mkey, w in pairs(iwrite) do
    local r
    if w then
        r = redis.pcall('SET', mkey, w[1], 'PX', string.format('%d', w[2]))
    else
        r = redis.pcall('DEL', mkey)
    end
    if type(r) == 'table' and r.err then
        redis.log(redis.LOG_WARNING, 'settle: idempotency marker ' .. mkey .. ': ' .. r.err)
    end
end
for _, bk in ipairs(ibkeys) do idem_count(bk[1], time_now(), bk[2], ibytes[bk[1]]) end
for sk, v in pairs(marks) do
    local r
    if v then
        r = redis.pcall('SET', sk, v, 'EX', SWEPT_TTL)
    else
        r = redis.pcall('DEL', sk)
    end
    if type(r) == 'table' and r.err then
        redis.log(redis.LOG_WARNING, 'settle: swept mark ' .. sk .. ': ' .. r.err)
    end
end
if #entry > 0 then
    local r = redis.pcall('INCRBY', 'pg:backlog', string.format('%d', #entry / 2))
    if type(r) == 'table' and r.err then
        redis.log(redis.LOG_WARNING, 'settle: pg:backlog: ' .. r.err)
    end
end
return out
