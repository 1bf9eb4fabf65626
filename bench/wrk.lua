-- wrk script for bench/http_load.py, configured through environment variables:
--
--   BENCH_TOKEN   bearer token sent as "Authorization: Bearer ..." (unset: no header)
--   BENCH_METHOD  GET (default) or POST
--   BENCH_BODIES  POST bodies, one per line; request k sends line k mod n, with every "{{n}}"
--                 replaced by a value unique across wrk's threads ("<thread>-<k>"), so each
--                 request is a real write rather than a repeat
--
-- Without BENCH_BODIES the script defines no request() function, so wrk sends one prebuilt
-- request (its fast static path). done() prints one line, "WRK_RESULT {json}", that
-- http_load.py parses: counts, duration, latency percentiles in microseconds and wrk's error
-- counters ("status" counts answers with a status of 400 or more).

local token = os.getenv("BENCH_TOKEN")
local bodies = {}
for line in (os.getenv("BENCH_BODIES") or ""):gmatch("[^\n]+") do
  bodies[#bodies + 1] = line
end

wrk.method = os.getenv("BENCH_METHOD") or "GET"
if token and token ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. token
end

local thread_count = 0

function setup(thread)
  thread_count = thread_count + 1
  thread:set("thread_id", thread_count)
end

if #bodies > 0 then
  wrk.headers["Content-Type"] = "application/json"
  local sent = 0

  function request()
    sent = sent + 1
    local body = bodies[sent % #bodies + 1]:gsub("{{n}}", thread_id .. "-" .. sent)
    return wrk.format(nil, nil, nil, body)
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests": %d, "duration_us": %d, "p50_us": %d, "p90_us": %d, '
    .. '"p99_us": %d, "max_us": %d, "status_errors": %d, "connect_errors": %d, '
    .. '"read_errors": %d, "write_errors": %d, "timeouts": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, e.status, e.connect, e.read, e.write, e.timeout))
end
