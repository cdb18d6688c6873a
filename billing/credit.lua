-- credit.lua: bring an account's credited total from Postgres into Redis.
-- Takes (seq, credited) only when seq is newer than what Redis has, so pushes
-- may repeat or arrive out of order. Creates the account's hash when missing
-- (first sync, or Redis lost its data), taking spent from Postgres then.
-- Optionally drops a hold without charging it: the guard hold that a negative
-- adjustment takes while Postgres commits (no outbox entry: not a call).
--
-- Also repairs spent when Redis lost settled charges (a Redis host crash
-- with appendfsync everysec loses its last second): every charge row in
-- Postgres came from an outbox entry written with Redis's spent, so with the
-- outbox empty (and no call in flight on the account) Redis spent can only
-- be below Postgres spent if Redis lost writes. Postgres spent only grows, so a value read a moment ago is a safe
-- lower bound: spent is raised to it, never lowered.
--
-- Guard holds (route starting with '_') are never expired by the sweeper:
-- releasing one before the adjustment's new credited total reaches Redis
-- would open an overdraft window. The repair pass (ARGV[5] = '1') drops
-- those past their deadline here, in the same step that writes the credited
-- total it read from Postgres after the adjustment committed (or failed).
--
-- Creating the hash never forgets the holds: the account hash alone can be
-- lost (deleted, evicted) while its holds hash, with calls in flight and
-- leases, survives; or a settle of a surviving hold left a partial hash
-- (no seq). held and leasefree are then recomputed from the holds hash, in
-- the same atomic step, rather than set to 0 (which would free points that
-- calls in flight still hold: an overdraft once they commit). Refusing
-- instead, until the holds drain, would leave the account unusable for up
-- to a hold's deadline, and forever with a guard hold (only a push ends
-- one).
--
-- A hash created from Postgres for an account that had credits (seq > 0)
-- may lack charges that are still on their way to Postgres. After a whole
-- loss there are none: the settlement worker holds the pass lock shared
-- from its read of a batch to its commit, and the pass reads Postgres under
-- it exclusively (control.h), so every batch read from the lost outbox is
-- in the spent the hash is made from; what the loss took unread is lost
-- (under-billing). If the account hash alone was lost, the records still
-- in the outbox (o) are not in it. So the creation also sets KEYS[4]
-- (pg:{A}:rebuilt, PX REBUILT_MS), and while it lives a push raises spent
-- to Postgres' whenever that is higher, calls in flight or not. It can
-- never raise too far: both figures are lower bounds of the true spent.
-- Redis' is Postgres' at creation (P0) plus the charges settled into the
-- new hash since (p; every hold in a hash made from nothing is one Postgres
-- has not charged, so none is counted twice); Postgres' is P0 plus the
-- part of o and p it has committed. The true spent is P0 + o + p. Taking
-- the higher of the two never lowers spent and never passes the truth, so
-- each raise shrinks what the account could overspend (from o to the part
-- of o + p not yet in Postgres) and never refuses a funded call; it is not
-- exact until Postgres has all of o (the catch-up passes, then the rule
-- below). After a whole loss Postgres' is never the higher (it holds only
-- p's committed part), so the window writes nothing: a backstop, for a
-- batch ledger.c resent on a new session without the lock. (Outside the
-- window the rule below holds.)
--
-- A repair pass names its marker (pg:rebuild:<token>, set when it began) as
-- KEYS[5]: if it is gone, Redis lost its data since, and the figures the
-- pass read from Postgres before the loss may be stale (spent lower than
-- settlements committed since, credited lower than credits since), so
-- nothing is written (as keypush.lua does for keys) and the pass starts
-- again from a fresh read. Checked here, in the same atomic step, not every
-- so many accounts: a hash created from stale figures in between would let
-- calls spend what Postgres has charged already (or refuse funded ones).
--
-- KEYS[1] outbox stream, KEYS[2] acct hash, KEYS[3] holds hash, KEYS[4]
-- (optional) the account's rebuilt marker, KEYS[5] (optional, with KEYS[4])
-- the pass's marker
-- ARGV[1] credit_seq, ARGV[2] credited, ARGV[3] Postgres spent,
-- ARGV[4] rid of a guard hold to drop, or '', ARGV[5] '1': also drop guard
-- holds past their deadline
--
-- Returns {applied (1/0), seq now in Redis, spent repaired (1/0)}, or
-- {0, 0, 0, 1} when the pass's marker is gone (nothing written)
--
-- Reads and checks first, then writes that cannot fail: a Lua error keeps
-- the writes made before it.
if #KEYS >= 5 and redis.call('EXISTS', KEYS[5]) == 0 then return {0, 0, 0, 1} end
local f = redis.call('HMGET', KEYS[2], 'seq', 'spent', 'held')
local cur, rspent = f[1], int(f[2] or '0')
local pspent = int(ARGV[3])
if not pspent or (cur and (not int(cur) or not rspent or not int(f[3] or '0'))) then
    return redis.error_reply('credit: unusable figures for ' .. KEYS[2])
end
local guard = nil
if ARGV[4] ~= '' then
    local h = redis.call('HGET', KEYS[3], ARGV[4])
    if h then
        local sep = string.find(h, '|', 1, true)
        guard = sep and int(string.sub(h, 1, sep - 1))
        if not guard then
            return redis.error_reply('credit: unusable guard hold ' .. ARGV[4] .. ': ' .. h)
        end
    end
end
-- No open hold either: a hold brought back by the same loss could be
-- committed again by a late settle, and spent raised twice.
local expired, dropped = {}, 0
if ARGV[5] == '1' and cur then
    local t = redis.call('TIME')
    local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    local all = redis.call('HGETALL', KEYS[3])
    for i = 1, #all, 2 do
        local rid, v = all[i], all[i + 1]
        local amount, route, dl = string.match(v, '^([^|]*)|([^|]*)|([^|]*)$')
        if rid ~= ARGV[4] and route and string.sub(route, 1, 1) == '_' and int(amount) and
           int(dl) and int(dl) <= now then
            expired[#expired + 1] = rid
            dropped = dropped + int(amount)
        end
    end
end
-- Creating: held and leasefree from the holds that exist (see the top).
local held, leasefree = 0, 0
if not cur then
    local all = redis.call('HGETALL', KEYS[3])
    for i = 2, #all, 2 do
        local amount = int(string.match(all[i], '^([^|]*)|') or '')
        local free = string.match(all[i], '^[^|]*|~lease|[^|]*|([^|]*)|')
        if free then free = int(free) end
        if not amount or amount < 0 or (string.find(all[i], '|~lease|', 1, true) and not free) then
            return redis.error_reply('credit: unusable hold ' .. all[i - 1] .. ' in ' .. KEYS[3])
        end
        held = held + amount
        leasefree = leasefree + (free or 0)
    end
end
local REBUILT_MS = 300000
local rebuilt = cur and #KEYS >= 4 and redis.call('EXISTS', KEYS[4]) == 1
local repair = cur and pspent > rspent and
               (rebuilt or (redis.call('XLEN', KEYS[1]) == 0 and redis.call('HLEN', KEYS[3]) == 0))
local applied = 0
if not cur then
    redis.call('HSET', KEYS[2], 'credited', ARGV[2], 'seq', ARGV[1], 'spent', ARGV[3], 'held',
               string.format('%d', held))
    if leasefree ~= 0 then
        redis.call('HSET', KEYS[2], 'leasefree', string.format('%d', leasefree))
    else
        redis.call('HDEL', KEYS[2], 'leasefree')
    end
    if #KEYS >= 4 and ARGV[1] ~= '0' then
        redis.call('SET', KEYS[4], '1', 'PX', REBUILT_MS)
    end
    if held ~= 0 then
        redis.log(redis.LOG_WARNING, 'credit: ' .. KEYS[2] .. ' recreated with held ' ..
                  string.format('%d', held) .. ' from ' .. KEYS[3])
    end
    applied = 1
    cur = ARGV[1]
elseif tonumber(cur) < tonumber(ARGV[1]) then
    redis.call('HSET', KEYS[2], 'credited', ARGV[2], 'seq', ARGV[1])
    applied = 1
    cur = ARGV[1]
end
if repair then
    redis.call('HSET', KEYS[2], 'spent', ARGV[3])
    redis.log(redis.LOG_WARNING, 'credit: ' .. KEYS[2] .. ' spent raised from ' ..
              string.format('%d', rspent) .. ' to Postgres ' .. ARGV[3])
end
if guard then
    redis.call('HDEL', KEYS[3], ARGV[4])
    redis.call('HINCRBY', KEYS[2], 'held', string.format('%d', -guard))
end
if #expired > 0 then
    redis.call('HDEL', KEYS[3], unpack(expired))
    redis.call('HINCRBY', KEYS[2], 'held', string.format('%d', -dropped))
    redis.log(redis.LOG_WARNING, 'credit: dropped ' .. #expired .. ' expired guard hold(s) of ' .. KEYS[2])
end
return {applied, tonumber(cur), repair and 1 or 0}
