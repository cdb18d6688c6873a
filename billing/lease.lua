-- lease.lua: a gateway worker's point lease on one account: one hold, taken
-- and resized here, from which the worker serves that account's calls
-- without a Redis command per call; and the settlement of the calls it
-- served, appended to the outbox in the same atomic step (as settle.lua does
-- for per-call holds). Does not decide which calls are billable nor price
-- them: the gateway sends each call's outbox record ready-made, and the
-- total they charge.
--
-- A lease is a field of the account's holds hash, next to per-call holds:
--   L<id> -> "amount|~lease|seq|free|deadline|soft"
-- amount: points the lease holds (counted in the account's held); free: the
-- part not yet promised to a call, as of the lease's last op (summed over
-- the account's leases in its leasefree field, so that balances shown to
-- people count it as available). Every op renews two deadlines. soft (now +
-- SOFT_MS) is last, where the sweeper reads a hold's deadline: past it the
-- worker has stopped promising from the lease (gateway/lease.c fences
-- itself well before), so the sweeper gives its free points back to the
-- account (settle.lua, outcome expire) and a caller waiting for them is
-- not kept waiting by a dead or cut-off worker. deadline (now + ttl, as a
-- per-call hold's) covers the calls in flight: past it the sweeper releases
-- the whole lease, cost 0 for the calls it served that never reached this
-- script, which were never answered either.
--
-- KEYS[1] acct hash, KEYS[2] holds hash, KEYS[3] outbox stream
-- ARGV[1] lease id (the field), ARGV[2] seq: 1 creates the lease, each later
--   op has the next number; an op at or below the stored seq was applied
--   already (a resend after a lost reply) and changes nothing
-- ARGV[3] ttl ms (the new deadline is now + ttl)
-- ARGV[4] charge: the sum of the records' amounts (<= the lease's amount)
-- ARGV[5] resize: > 0 asks for up to that many more points, < 0 gives back
--   up to that many of the free ones; 0 neither
-- ARGV[6] busy: points of the lease still promised after this op (calls in
--   flight, records not in this op), so free = amount - busy
-- ARGV[7] close: '1' when the worker closes the lease (it promises nothing
--   and gives everything back): an op that leaves it empty then drops it;
--   'late' for an op replayed from a gateway's spill file after a restart:
--   with the lease there, a normal op (as '0'); with the lease gone and its
--   swept mark pg:{A}:swept:L<id> (settle.lua, the sweeper) below this seq,
--   the records are charged from the available points, in order, as far
--   as they go, and the mark set to this seq (status 1, amount 0); else
--   status 0. A late op never recreates the lease.
-- ARGV[8..] the outbox entry's fields: 'c', then a record
--   "rid|acct|route|amount|hold|outcome|status", per call (settle.lua's)
--
-- Returns {status, amount, available, contended, charged}:
--   1 applied; 2 already applied (a resend); 0 no such lease (expired by the
--   sweeper, or Redis lost it): nothing applied, nothing charged;
--  -1 account unknown to Redis (creation, or a late op); -2 its data is
--   unusable: nothing changed
-- amount: the lease's points now; available: credited - spent - held +
-- leasefree; charged: how many of the op's records were charged and
-- appended, always the first ones (0 unless status 1 or 2). Fewer than
-- the op carried only when they charge more than the lease holds plus the
-- account's available points: then the records are charged in order while
-- they fit, and the first that does not fit and every one after it are
-- neither charged nor appended (their calls are not billed: under-billing,
-- never an overdraft); the lease stays, for the worker's next ops. A
-- resend of that op (status 2) answers the same number (kept in
-- pg:{A}:leaseshort:L<id> = "seq|charged" for a day, written only then).
-- contended: 1 when a reserve was short of points held here in
-- the last CONTEND_MS (reserve.lua marks it), or the account is under
-- limits (its acct hash's limited field). A contended lease grows no
-- more, and its worker stops serving from it and gives its free points back
-- with its next op: a caller waiting for points (reserve.lua's short
-- answer, then the gateway's bounded wait) is then served, and no call is
-- refused while a lease sits on points that would cover it. Only the
-- worker shrinks its lease (resize < 0, sent when it takes no more from
-- it): a shrink decided here could cut below calls it promised while this
-- op was on its way.
--
-- Cost: one HMGET, one HGET, the XADD, one INCRBY of pg:backlog (the
-- records not yet in Postgres: settle.lua's) and a few writes per op,
-- whatever the number of records: the gateway formats them, Lua only
-- passes them on (it parses their amounts only when they do not fit).
--
-- All or nothing, as settle.lua: reads and checks first, the outbox entry
-- is the first write, the writes after it cannot fail.
local CONTEND_MS = 2000
local SOFT_MS = 3000 -- gateway/lease.c stops promising 1500 ms after its last op was sent
local SHARE = 4 -- a lease grows by at most 1/SHARE of the available points

if #KEYS ~= 3 or #ARGV < 7 or #ARGV % 2 ~= 1 then
    return redis.error_reply('lease: want 3 keys, 7 arguments and pairs of entry fields')
end
local lid = ARGV[1]
local seq, ttl, charge = int(ARGV[2]), int(ARGV[3]), int(ARGV[4])
local resize, busy, close = int(ARGV[5]), int(ARGV[6]), ARGV[7]
if not seq or seq < 1 or not ttl or ttl <= 0 or not charge or charge < 0 or not resize or
   not busy or busy < 0 or (close ~= '0' and close ~= '1' and close ~= 'late') then
    return redis.error_reply('lease: seq, ttl, charge, resize, busy and close must be integers')
end
local nrec = (#ARGV - 7) / 2
local late = close == 'late'
if late then close = '0' end
local base = string.match(KEYS[2], '^(.*:)holds$') -- "pg:{A}:" (hotkeys.h)

local cur = redis.pcall('HGET', KEYS[2], lid)
if type(cur) == 'table' then return {-2, 0, 0, 0, 0} end
local a = read_figures(KEYS[1], cur ~= false)
if a == false then return {-1, 0, 0, 0, 0} end
if a == 'bad' then return {-2, 0, 0, 0, 0} end
local lf = a.lf
local cont = redis.call('HGET', KEYS[1], 'contend')

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local contended = cont and int(cont) and now - int(cont) < CONTEND_MS and 1 or 0
-- An account under limits (reserve.lua) is served per call: its leases
-- are treated as contended, so their workers stop promising from them and
-- give them back with their next op.
if a.limited then contended = 1 end
local function shown()
    return a.credited - a.spent - a.held + lf
end

-- The first records whose amounts fit in BUDGET, in order: how many, and
-- what they charge. Parses the records (the gateway's format), so only for
-- an op whose charge does not fit.
local function fitting(budget)
    local k, c = 0, 0
    for j = 1, nrec do
        local amt = string.match(ARGV[7 + 2 * j], '^[^|]*|[^|]*|[^|]*|(%d+)|')
        amt = amt and int(amt)
        if not amt or c + amt > budget then break end
        k, c = j, c + amt
    end
    return k, c
end

-- Appends the first K records as one outbox entry and counts them in the
-- backlog; an error reply when Redis refuses the entry (nothing written).
local function append(k)
    if k == 0 then return nil end
    local r = redis.pcall('XADD', KEYS[3], '*', 'ts', string.format('%d', now),
                          unpack(ARGV, 8, 7 + 2 * k))
    if type(r) == 'table' and r.err then return redis.error_reply(r.err) end
    return nil
end
local function count(k)
    if k == 0 then return end
    local r = redis.pcall('INCRBY', 'pg:backlog', string.format('%d', k))
    if type(r) == 'table' and r.err then
        redis.log(redis.LOG_WARNING, 'lease: pg:backlog: ' .. r.err)
    end
end

local amount, free = 0, 0
if cur then
    local am, sq, fr = string.match(cur, '^(%d+)|~lease|(%d+)|(%d+)|%d+|%d+$')
    amount, free = int(am or ''), int(fr or '')
    local stored = int(sq or '')
    if not amount or not stored or not free then
        redis.log(redis.LOG_WARNING, 'lease: unusable lease ' .. lid .. ' in ' .. KEYS[2] .. ': ' .. cur)
        return {-2, 0, 0, 0, 0}
    end
    if stored >= seq then
        local k = nrec
        if stored == seq and nrec > 0 and base then
            local v = redis.pcall('GET', base .. 'leaseshort:' .. lid)
            local vs, vk = false, nil
            if type(v) == 'string' then vs, vk = string.match(v, '^(%d+)|(%d+)$') end
            if vs and int(vs) == seq and int(vk) and int(vk) < nrec then k = int(vk) end
        end
        return {2, amount, shown(), contended, k}
    end
elseif late then
    -- A replayed op of a lease the sweeper released whole past its deadline
    -- (its calls were answered before the gateway stopped): charged from
    -- the available points as far as they go, once per seq, never more than
    -- the account has; the lease is not recreated.
    if not base then return {0, 0, shown(), contended, 0} end
    local sk = base .. 'swept:' .. lid
    local m = redis.pcall('GET', sk)
    m = type(m) == 'string' and int(m)
    if not m or m >= seq then return {0, 0, shown(), contended, 0} end
    local k, c = fitting(a.credited - a.spent - a.held)
    if k < nrec then
        redis.log(redis.LOG_WARNING, 'lease: late op ' .. seq .. ' of ' .. lid .. ': ' .. k .. ' of ' ..
                  nrec .. ' records fit the available points')
    end
    local err = append(k)
    if err then return err end
    redis.pcall('SET', sk, string.format('%d', seq), 'KEEPTTL')
    if c ~= 0 then redis.call('HINCRBY', KEYS[1], 'spent', string.format('%d', c)) end
    count(k)
    a.spent = a.spent + c
    return {1, 0, shown(), contended, k}
elseif seq ~= 1 then
    return {0, 0, shown(), contended, 0}
elseif charge ~= 0 or nrec > 0 then
    return redis.error_reply('lease: a new lease has nothing to settle')
end
local orig = amount
local avail = a.credited - a.spent - a.held

-- The records first: their calls were served. If they charge more than
-- the lease holds (the sweeper took its free points back after the soft
-- deadline while the worker was cut off, or Redis came back from older
-- data), the rest comes from the available points. If even those do not
-- cover them, the records are charged in order as far as the lease and the
-- available points go; the rest are not charged and not appended.
local k = nrec
if charge > amount then
    if charge - amount > avail then
        local asked = charge
        k, charge = fitting(amount + avail)
        redis.log(redis.LOG_WARNING, 'lease: ' .. lid .. ' holds ' .. amount .. ', asked to settle ' ..
                  asked .. ', ' .. avail .. ' available: ' .. k .. ' of ' .. nrec ..
                  ' records charged')
    end
    if charge > amount then
        local need = charge - amount
        amount, avail = amount + need, avail - need
    end
end
-- Then what calls in flight were promised, as far as the available points
-- go: what is not covered stays promised, and their records re-take it
-- when they come (or are refused as above).
local new = amount - charge
if busy > new then
    local more = busy - new
    if more > avail then more = avail end
    new, avail = new + more, avail - more
end

-- Then it grows or gives back. Contended: no growth. The worker stops
-- taking and gives its free points back with its next op (a shrink decided
-- here could cut below calls it promised while this op was on its way).
if resize > 0 and contended == 0 and avail >= SHARE then
    local grant = math.floor(avail / SHARE)
    if grant > resize then grant = resize end
    new = new + grant
elseif resize < 0 and new > busy then
    local back = -resize
    if new - busy < back then back = new - busy end
    new = new - back
end
local newfree = new > busy and new - busy or 0
local dheld = new - orig -- the charge leaves held; a re-take or resize moves it

local err = append(k)
if err then return err end
if new == 0 and busy == 0 and nrec == 0 and (close == '1' or not cur) then
    -- Only an op the worker sends to close it (a resend finds nothing, and
    -- carries no record to lose), or a new lease granted nothing. An amount
    -- of 0 alone may be a lease the sweeper emptied while its worker still
    -- has calls to settle.
    if cur then redis.call('HDEL', KEYS[2], lid) end
else
    redis.call('HSET', KEYS[2], lid, string.format('%d|~lease|%d|%d|%d|%d', new, seq, newfree,
                                                   now + ttl, now + SOFT_MS))
end
if dheld ~= 0 then redis.call('HINCRBY', KEYS[1], 'held', string.format('%d', dheld)) end
if charge ~= 0 then redis.call('HINCRBY', KEYS[1], 'spent', string.format('%d', charge)) end
if newfree ~= free then
    redis.call('HINCRBY', KEYS[1], 'leasefree', string.format('%d', newfree - free))
end
if k < nrec and base then
    redis.pcall('SET', base .. 'leaseshort:' .. lid, string.format('%d|%d', seq, k), 'EX', '86400')
end
count(k)
a.held, a.spent, lf = a.held + dheld, a.spent + charge, lf + newfree - free
return {1, new, shown(), contended, k}
