-- passend.lua: ends a repair pass and, when Redis lost nothing since the
-- pass started, writes the epoch marker pg:epoch if it is missing.
--
-- pg:epoch says "Redis holds a complete copy of Postgres' accounts and
-- keys": the gateway answers 503 instead of 401/402 for what it cannot find
-- while it is absent, and billing rebuilds at once when it vanishes
-- (creditsync.c). It may only be written by a pass that pushed everything
-- into the Redis it writes to: the pass's marker pg:rebuild:<token>, set
-- before its first push, proves that no loss came in between (a loss takes
-- the marker with it).
--
-- KEYS[1] the pass's marker, KEYS[2] pg:epoch; ARGV[1] a new epoch token
-- Returns 2 epoch written, 1 complete (epoch was there), 0 marker gone.
if redis.call('DEL', KEYS[1]) == 0 then return 0 end
if redis.call('SET', KEYS[2], ARGV[1], 'NX') then return 2 end
return 1
