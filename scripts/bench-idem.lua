-- bench-idem.lua: wrk script for make bench's "developer contract" rounds:
-- every request a POST with its own Idempotency-Key (so each is a first
-- call: proxied, settled and its answer stored, never a replay), keeping
-- the headers given with -H (the API key).
local thread_no = 0

function setup(thread)
    thread_no = thread_no + 1
    -- Unique across threads, rounds and runs of one bench.
    thread:set("prefix", string.format("bench-%d-%d", os.time(), thread_no))
end

local n = 0

function request()
    n = n + 1
    local h = {}
    for k, v in pairs(wrk.headers) do h[k] = v end
    h["Idempotency-Key"] = prefix .. "-" .. n
    h["Content-Type"] = "application/json"
    return wrk.format("POST", nil, h, '{"op":"ping"}')
end
