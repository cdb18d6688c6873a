-- settle.lua: close a hold, either committing a charge or releasing it, and
-- append the outcome to the outbox stream in the same atomic step, so that a
-- charge exists in Redis iff it is on its way to Postgres.
-- Does not decide billability: the caller says commit/release/expire.
--
-- KEYS[1] acct hash, KEYS[2] holds hash, KEYS[3] deadlines zset, KEYS[4] outbox stream
-- ARGV[1] reservation id
-- ARGV[2] charge requested (commit only; capped to [0, hold])
-- ARGV[3] outcome: commit | release | expire
-- ARGV[4] upstream status (0 when none)
-- ARGV[5] account id (copied into the outbox entry)
--
-- Returns {status, charged, available}:
--   1  settled now; 0  no such hold (already settled or swept): no-op.
local h = redis.call('HGET', KEYS[2], ARGV[1])
local a = redis.call('HMGET', KEYS[1], 'credited', 'spent', 'held')
local credited = tonumber(a[1] or '0')
local spent = tonumber(a[2] or '0')
local held = tonumber(a[3] or '0')
if not h then
    return {0, 0, credited - spent - held}
end
local sep = string.find(h, '|', 1, true)
local hold = tonumber(string.sub(h, 1, sep - 1))
local route = string.sub(h, sep + 1)
local charge = 0
if ARGV[3] == 'commit' then
    charge = tonumber(ARGV[2]) or hold
    if charge < 0 then charge = 0 end
    if charge > hold then charge = hold end
end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('HINCRBY', KEYS[1], 'held', -hold)
if charge > 0 then
    redis.call('HINCRBY', KEYS[1], 'spent', charge)
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('XADD', KEYS[4], '*', 'rid', ARGV[1], 'acct', ARGV[5], 'route', route,
           'amount', charge, 'hold', hold, 'outcome', ARGV[3], 'status', ARGV[4], 'ts', now)
return {1, charge, credited - (spent + charge) - (held - hold)}
