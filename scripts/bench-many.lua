-- bench-many.lua: wrk script for make bench's many-accounts scenario: each
-- request carries the API key of an account drawn at random, half of them
-- among the small accounts (per-call holds: too few points for a lease),
-- half among the large ones (leases). BENCH_MANY_KEYS names a file of
-- "small KEY" / "large KEY" lines. The requests are formatted once, in
-- init, 8,192 per thread, and drawn at random per call, so that wrk (on the
-- same cores) spends no more per request than with -H in the other runs.
local reqs = {}

function init(args)
    local small, large = {}, {}
    for line in io.lines(os.getenv("BENCH_MANY_KEYS")) do
        local kind, key = line:match("^(%S+) (%S+)")
        if kind == "small" then
            small[#small + 1] = key
        elseif kind == "large" then
            large[#large + 1] = key
        end
    end
    -- A seed per thread: the threads draw different sequences.
    math.randomseed(os.time() + tonumber(tostring(reqs):match("0x(%x+)") or "0", 16) % 1000003)
    for i = 1, 8192 do
        local keys = (math.random() < 0.5) and small or large
        reqs[i] = wrk.format("GET", nil,
                             {["Host"] = wrk.headers["Host"],
                              ["Authorization"] = "Bearer " .. keys[math.random(#keys)]})
    end
end

function request()
    return reqs[math.random(#reqs)]
end
