-- wrk script of the Fluidity benchmark: absolute-form GETs, as a client sends them to a forward
-- proxy (BENCH_URL=http://127.0.0.1:PORT/small, BENCH_HOST=127.0.0.1:PORT), or origin-form ones
-- for the direct row (BENCH_URL=/small). The request is formatted once; keep-alive is wrk's own.
-- done() prints one machine-readable line that the harness parses (latencies in microseconds).
local target = os.getenv("BENCH_URL")
local host = os.getenv("BENCH_HOST")
local req

init = function(args)
  req = wrk.format("GET", target, {["Host"] = host})
end

request = function()
  return req
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, "connect": %d, ' ..
    '"read": %d, "write": %d, "status": %d, "timeout": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.status, e.timeout))
end
