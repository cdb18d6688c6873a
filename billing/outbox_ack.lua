-- outbox_ack.lua: settlement's acknowledgement of outbox entries it applied
-- to Postgres (or dead-lettered), and the backlog count lowered by their
-- records, in one atomic step (billing/settlement.c). Owns the decrement of
-- pg:backlog (settle.lua and lease.lua add to it as they append).
--
-- KEYS[1] outbox stream, KEYS[2] the backlog count (pg:backlog)
-- ARGV[1] consumer group; then per entry ARGV[2i] its stream id,
--   ARGV[2i+1] the number of records it carries (its "c" fields)
--
-- An entry is uncounted only if this call deleted it: an entry delivered
-- twice (claimed by a second worker, or redelivered after a crash between
-- its commit to Postgres and this step) is gone the second time, and is not
-- uncounted twice. Deleting and acknowledging together also leaves no
-- acknowledged entry in the stream and no pending id without an entry.
-- The count never goes below 0.
--
-- Returns {entries deleted, records uncounted, backlog now}.
--
-- Arguments are checked before any write: with valid ids on a stream, XDEL
-- and XACK cannot fail, so no error leaves entries deleted but counted.
if #KEYS ~= 2 or #ARGV < 1 or #ARGV % 2 ~= 1 then
    return redis.error_reply('outbox_ack: want 2 keys, the group, and id/records pairs')
end
local ids = {}
for i = 2, #ARGV, 2 do
    local nrec = int(ARGV[i + 1])
    if not string.match(ARGV[i], '^%d+%-%d+$') or not nrec or nrec < 0 then
        return redis.error_reply('outbox_ack: want stream ids and record counts')
    end
    ids[#ids + 1] = ARGV[i]
end
if #ids == 0 then return {0, 0, 0} end
local deleted, dec = 0, 0
for k, id in ipairs(ids) do
    if redis.call('XDEL', KEYS[1], id) == 1 then
        deleted = deleted + 1
        dec = dec + int(ARGV[2 * k + 1])
    end
end
for i = 1, #ids, 1000 do -- unpack() must stay within Lua's stack
    redis.call('XACK', KEYS[1], ARGV[1], unpack(ids, i, math.min(i + 999, #ids)))
end
local cur = redis.pcall('GET', KEYS[2])
local left = type(cur) == 'string' and int(cur) or 0
if dec > 0 then
    if cur and (type(cur) ~= 'string' or not int(cur)) then
        redis.log(redis.LOG_WARNING, 'outbox_ack: ' .. KEYS[2] .. ' was not a count; reset')
    end
    left = left - dec
    if left < 0 then left = 0 end
    redis.call('SET', KEYS[2], string.format('%d', left))
end
return {deleted, dec, left}
