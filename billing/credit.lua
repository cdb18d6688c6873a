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
-- outbox empty Redis spent can only be below Postgres spent if Redis lost
-- writes. Postgres spent only grows, so a value read a moment ago is a safe
-- lower bound: spent is raised to it, never lowered.
--
-- KEYS[1] outbox stream, KEYS[2] acct hash, KEYS[3] holds hash
-- ARGV[1] credit_seq, ARGV[2] credited, ARGV[3] Postgres spent,
-- ARGV[4] rid of a guard hold to drop, or ''
--
-- Returns {applied (1/0), seq now in Redis, spent repaired (1/0)}
--
-- Reads and checks first, then writes that cannot fail: a Lua error keeps
-- the writes made before it.
local f = redis.call('HMGET', KEYS[2], 'seq', 'spent')
local cur, rspent = f[1], tonumber(f[2] or '0')
local pspent = tonumber(ARGV[3])
if not pspent or (cur and (not tonumber(cur) or not rspent)) then
    return redis.error_reply('credit: unusable figures for ' .. KEYS[2])
end
local guard = nil
if ARGV[4] ~= '' then
    local h = redis.call('HGET', KEYS[3], ARGV[4])
    if h then
        local sep = string.find(h, '|', 1, true)
        guard = sep and tonumber(string.sub(h, 1, sep - 1))
        if not guard then
            return redis.error_reply('credit: unusable guard hold ' .. ARGV[4] .. ': ' .. h)
        end
    end
end
local repair = cur and pspent > rspent and redis.call('XLEN', KEYS[1]) == 0
local applied = 0
if not cur then
    redis.call('HSET', KEYS[2], 'credited', ARGV[2], 'seq', ARGV[1], 'spent', ARGV[3], 'held', 0)
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
return {applied, tonumber(cur), repair and 1 or 0}
