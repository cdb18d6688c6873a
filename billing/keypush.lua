-- keypush.lua: writes an API key's mirror, pg:key:<hash>, so that a revoke
-- wins every race. A revoke writes the tombstone "-1" (after its Postgres
-- commit); every other write of a key goes through here and never
-- overwrites "-1": a push of a stale "live" snapshot (the repair pass read
-- its keys before a revoke that landed during the pass) changes nothing.
-- A key is never revoked and then made live again (a revoke is final in
-- the ledger too), and a revoked key's hash cannot come back with a new
-- key: keys are 32 random bytes.
--
-- A pass (the repair pass, the rebuild after a loss) also names its marker
-- key pg:rebuild:<token>, set when it started: if Redis lost its data since
-- (the marker is gone with it), the pass's snapshot may predate a revoke
-- whose tombstone the loss took, so nothing is written and the pass starts
-- again from a fresh snapshot.
--
-- A live key's value is "account|key id|version|expires ms|scopes"
-- (billing/keys.h); version rises with every change of the key's row, and
-- a value never replaces one of a higher version: a pass that read the key
-- before a rotation (which shortened its life) cannot lengthen it again.
-- A bare "account" (the form before key management) counts as version 0.
--
-- KEYS[1] pg:key:<hash>, KEYS[2] (optional) the pass's marker
-- ARGV[1] the value, or "-1" for the tombstone
-- Returns 1 written, 0 tombstone (or a newer version) kept, 2 marker gone: nothing written,
-- 3 the key already had that value: nothing written (a repair pass counts
-- only the writes that changed Redis as fixes).
local function version(v)
    if not v then return -1 end
    if string.find(v, '^%d+$') then return 0 end
    local ver = string.match(v, '^%d+|%d+|(%d+)|')
    return ver and tonumber(ver) or -1
end

if #KEYS == 2 and redis.call('EXISTS', KEYS[2]) == 0 then return 2 end
local cur = redis.call('GET', KEYS[1])
if ARGV[1] ~= '-1' then
    local a, k, ver, exp, scopes = string.match(ARGV[1], '^(%d+)|(%d+)|(%d+)|(%d+)|([^|]*)$')
    if not a or tonumber(a) <= 0 or tonumber(k) <= 0 or #ARGV[1] > 4096 then
        return redis.error_reply('keypush: want account|key id|version|expires ms|scopes or -1')
    end
    if cur == '-1' then return 0 end
    if cur == ARGV[1] then return 3 end
    if version(cur) > tonumber(ver) then return 0 end
end
if cur == ARGV[1] then return 3 end
redis.call('SET', KEYS[1], ARGV[1])
return 1
