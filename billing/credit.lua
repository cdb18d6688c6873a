-- credit.lua: bring an account's credited total from Postgres into Redis.
-- Takes (seq, credited) only when seq is newer than what Redis has, so pushes
-- may repeat or arrive out of order. Creates the account's hash when missing
-- (first sync, or Redis lost its data), taking spent from Postgres then only.
-- Optionally drops a hold without charging it: the guard hold that a negative
-- adjustment takes while Postgres commits (no outbox entry: not a call).
--
-- KEYS[1] acct hash, KEYS[2] holds hash
-- ARGV[1] credit_seq, ARGV[2] credited, ARGV[3] spent (creation only),
-- ARGV[4] rid of a guard hold to drop, or ''
--
-- Returns {applied (1/0), seq now in Redis}
--
-- Reads and checks first, then writes that cannot fail: a Lua error keeps
-- the writes made before it.
local cur = redis.call('HGET', KEYS[1], 'seq')
local guard = nil
if ARGV[4] ~= '' then
    local h = redis.call('HGET', KEYS[2], ARGV[4])
    if h then
        local sep = string.find(h, '|', 1, true)
        guard = sep and tonumber(string.sub(h, 1, sep - 1))
        if not guard then
            return redis.error_reply('credit: unusable guard hold ' .. ARGV[4] .. ': ' .. h)
        end
    end
end
local applied = 0
if not cur then
    redis.call('HSET', KEYS[1], 'credited', ARGV[2], 'seq', ARGV[1], 'spent', ARGV[3], 'held', 0)
    applied = 1
    cur = ARGV[1]
elseif tonumber(cur) < tonumber(ARGV[1]) then
    redis.call('HSET', KEYS[1], 'credited', ARGV[2], 'seq', ARGV[1])
    applied = 1
    cur = ARGV[1]
end
if guard then
    redis.call('HDEL', KEYS[2], ARGV[4])
    redis.call('HINCRBY', KEYS[1], 'held', string.format('%d', -guard))
end
return {applied, tonumber(cur)}
