-- wrk script for POST /v1/subscriptions: one new address per request.
--
--   wrk -t1 -c16 -d15s --timeout 10s -s bench/signup.lua http://127.0.0.1:PORT -- RUNTAG
--
-- Addresses are u<thread>-<counter>-<runtag>@example.com: the thread number comes from
-- setup(), the counter is per thread, and the run tag (the first argument after `--`, or a
-- random number) keeps a warm-up run and the measured run from reusing each other's
-- addresses. The last line printed is one `BENCH key=value ...` line for bench/signup.py.

local thread_count = 0

function setup(thread)
  thread:set("thread_id", thread_count)
  thread_count = thread_count + 1
end

local counter = 0
local tag

function init(args)
  math.randomseed(os.time() + (thread_id or 0) * 7919)
  tag = args[1] or tostring(math.random(1, 2147483647))
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["Accept"] = "application/json"
end

function request()
  counter = counter + 1
  local body = string.format(
    '{"email": "u%d-%d-%s@example.com", "newsletters": ["bench"]}', thread_id, counter, tag
  )
  return wrk.format(nil, nil, nil, body)
end

-- wrk counts answers with a status >= 400 in errors.status; the endpoint never answers a
-- JSON POST with 1xx or 3xx, so that is the non-2xx count.
function done(summary, latency, requests)
  local seconds = summary.duration / 1e6
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d seconds=%.3f rps=%.1f p50_ms=%.3f p90_ms=%.3f p99_ms=%.3f "
      .. "max_ms=%.3f non2xx=%d connect_errors=%d read_errors=%d write_errors=%d "
      .. "timeouts=%d\n",
    summary.requests, seconds, summary.requests / seconds,
    latency:percentile(50) / 1000, latency:percentile(90) / 1000,
    latency:percentile(99) / 1000, latency.max / 1000,
    e.status, e.connect, e.read, e.write, e.timeout
  ))
end
