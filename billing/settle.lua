-- settle.lua: close holds, each either committing a charge or releasing it,
-- and append the outcomes to the outbox stream in the same atomic step, so
-- that a charge exists in Redis iff it is on its way to Postgres.
-- Does not decide billability: the caller says commit/release/expire.
--
-- One call takes a batch of N >= 1 settles (see reserve.lua for why) and
-- appends ONE outbox entry carrying every hold it closed:
--   ts <ms>, then per closed hold a field c = "rid|acct|route|amount|hold|outcome|status"
-- (route ids cannot contain '|'; billing/settlement.c parses this).
--
-- KEYS[1] outbox stream; for op i (1-based): KEYS[2i] acct hash, KEYS[2i+1] holds hash
-- ARGV[5i-4] reservation id
-- ARGV[5i-3] charge requested (commit only; capped to [0, hold])
-- ARGV[5i-2] outcome: commit | release | expire
-- ARGV[5i-1] upstream status (0 when none)
-- ARGV[5i]   account id (copied into the outbox entry)
--
-- Returns 3 integers per op, {status, charged, available}:
--   1  settled now; 0  no such hold (already settled or swept): no-op.
local n = (#KEYS - 1) / 2
if n < 1 or n ~= math.floor(n) or #ARGV ~= 5 * n then
    return redis.error_reply('settle: want 1 + 2 keys and 5 arguments per settle')
end
local accts, order = {}, {}
local out, entry = {}, {}
for i = 1, n do
    local akey, hkey = KEYS[2 * i], KEYS[2 * i + 1]
    local rid = ARGV[5 * i - 4]
    local a = accts[akey]
    if a == nil then
        local f = redis.call('HMGET', akey, 'credited', 'spent', 'held')
        a = {credited = tonumber(f[1] or '0'), spent = tonumber(f[2] or '0'),
             held = tonumber(f[3] or '0'), dheld = 0, dspent = 0}
        accts[akey] = a
        order[#order + 1] = akey
    end
    local h = redis.call('HGET', hkey, rid)
    local o = 3 * i - 2
    if not h then
        out[o], out[o + 1], out[o + 2] = 0, 0, a.credited - a.spent - a.held
    else
        local s1 = string.find(h, '|', 1, true)
        local s2 = string.find(h, '|', s1 + 1, true)
        local hold = tonumber(string.sub(h, 1, s1 - 1))
        local route = string.sub(h, s1 + 1, (s2 or 0) - 1)
        local outcome = ARGV[5 * i - 2]
        local charge = 0
        if outcome == 'commit' then
            charge = tonumber(ARGV[5 * i - 3]) or hold
            if charge < 0 then charge = 0 end
            if charge > hold then charge = hold end
        end
        redis.call('HDEL', hkey, rid)
        a.held, a.dheld = a.held - hold, a.dheld - hold
        a.spent, a.dspent = a.spent + charge, a.dspent + charge
        entry[#entry + 1] = 'c'
        entry[#entry + 1] = string.format('%s|%s|%s|%d|%d|%s|%s', rid, ARGV[5 * i], route, charge,
                                          hold, outcome, ARGV[5 * i - 1])
        out[o], out[o + 1], out[o + 2] = 1, charge, a.credited - a.spent - a.held
    end
end
for _, akey in ipairs(order) do
    local a = accts[akey]
    if a.dheld ~= 0 then redis.call('HINCRBY', akey, 'held', a.dheld) end
    if a.dspent ~= 0 then redis.call('HINCRBY', akey, 'spent', a.dspent) end
end
if #entry > 0 then
    local t = redis.call('TIME')
    local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    redis.call('XADD', KEYS[1], '*', 'ts', string.format('%d', now), unpack(entry))
end
return out
