-- reserve.lua: hold a call's price against an account's available points.
-- Owns the only path that creates holds. Does not price calls (the caller
-- passes the price) and does not touch the outbox: nothing is charged yet.
--
-- KEYS[1] acct hash {credited, seq, spent, held}
-- KEYS[2] holds hash  rid -> "amount|route"
-- KEYS[3] deadlines zset rid -> deadline (ms since epoch)
-- ARGV[1] reservation id, ARGV[2] price (> 0), ARGV[3] ttl ms, ARGV[4] route id
--
-- Returns {status, available, held}:
--   1  held (or already held under this rid: idempotent), figures after the hold
--   0  short: available < price, figures now; nothing changed
--  -1  account unknown to Redis (never synced from Postgres)
--
-- Numbers pass through Lua doubles: exact up to 2^53, which the ledger
-- enforces as the ceiling of any account's credited total.
local a = redis.call('HMGET', KEYS[1], 'credited', 'spent', 'held')
if not a[1] then
    return {-1, 0, 0}
end
local credited = tonumber(a[1])
local spent = tonumber(a[2] or '0')
local held = tonumber(a[3] or '0')
local avail = credited - spent - held
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then
    return {1, avail, held}
end
local price = tonumber(ARGV[2])
if not price or price <= 0 or price ~= math.floor(price) then
    -- a non-positive hold would lower held and mint available points
    return redis.error_reply('reserve: price must be a positive integer')
end
if avail < price then
    return {0, avail, held}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2] .. '|' .. ARGV[4])
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[3]), ARGV[1])
redis.call('HINCRBY', KEYS[1], 'held', price)
return {1, avail - price, held + price}
