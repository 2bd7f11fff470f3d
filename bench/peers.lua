-- wrk script for bench/peers.py: every request carries X-Routing-Key set to a
-- key drawn uniformly at random from 10,000 ("key-1" .. "key-10000").
--
-- The 10,000 requests are formatted once per wrk thread in init(), so the
-- per-request cost on the load generator's core is a table index, not string
-- building. No response() callback is defined: wrk then skips per-response
-- Lua calls (wrk still counts non-2xx/3xx responses itself).

local NKEYS = 10000
local reqs = {}

function init(args)
   -- Different seed per thread (the table address differs per Lua state).
   local addr = tonumber(string.match(tostring(reqs), "0x(%x+)") or "0", 16) or 0
   math.randomseed(os.time() + addr % 1000003)
   for i = 1, NKEYS do
      reqs[i] = wrk.format("GET", wrk.path, { ["X-Routing-Key"] = "key-" .. i })
   end
end

function request()
   return reqs[math.random(NKEYS)]
end
