-- limits.lua: writes an account's limit settings (rate limits, spending
-- caps of the account and of its keys) into its limits hash, pg:{A}:lim,
-- and its acct hash's limited flag, which reserve.lua and lease.lua read.
-- Owns the settings fields only (a.rq a.rw a.cd a.cm, k<id>.rq ...); the
-- state fields beside them (rate buckets, cap counters) are reserve.lua's
-- and settle.lua's, and stay.
--
-- A push is the account's whole snapshot, read from Postgres in the
-- transaction that raised its limits_seq: an older snapshot (a repair pass
-- that read before a change, a slow API call) is refused, so the last
-- change wins whatever the order of arrival.
--
-- KEYS[1] acct hash, KEYS[2] limits hash
-- ARGV[1] the snapshot's limits_seq, ARGV[2..] setting name, value pairs
-- Returns 1 written, 0 stale (a newer snapshot is there), 3 unchanged.
local seq = int(ARGV[1])
if not seq or seq < 0 or #ARGV % 2 ~= 1 then
    return redis.error_reply('limits: want a seq and name, value pairs')
end
for i = 2, #ARGV, 2 do
    local nm, v = ARGV[i], int(ARGV[i + 1])
    if not (string.find(nm, '^a%.[rc][qwdm]$') or string.find(nm, '^k%d+%.[rc][qwdm]$')) or
       not v or v <= 0 then
        return redis.error_reply('limits: bad setting ' .. nm)
    end
end
local cur = redis.call('HGET', KEYS[2], 'seq')
if cur and int(cur) and int(cur) > seq then return 0 end
-- The settings there now, to drop those the snapshot no longer has.
local old, keep = {}, {}
for i = 2, #ARGV, 2 do keep[ARGV[i]] = ARGV[i + 1] end
local same = cur and int(cur) == seq
for _, nm in ipairs(redis.call('HKEYS', KEYS[2])) do
    if string.find(nm, '^a%.[rc][qwdm]$') or string.find(nm, '^k%d+%.[rc][qwdm]$') then
        if not keep[nm] then old[#old + 1] = nm end
    end
end
if #old > 0 then redis.call('HDEL', KEYS[2], unpack(old)) end
local set = {'seq', string.format('%d', seq)}
for i = 2, #ARGV do set[#set + 1] = ARGV[i] end
redis.call('HSET', KEYS[2], unpack(set))
-- Never create the acct hash: a missing one means Redis lost it, which
-- the repair pass must see (credit.lua) and which pushes the limits again
-- after the account.
if redis.call('EXISTS', KEYS[1]) == 1 then
    if #ARGV > 1 then
        redis.call('HSET', KEYS[1], 'limited', '1')
    else
        redis.call('HDEL', KEYS[1], 'limited')
    end
end
if same and #old == 0 then return 3 end
return 1
