-- wrk script for POST /v1/subscriptions, like signup.lua, with addresses spread over the
-- index: each local part starts with 8 random hex digits.
--
--   wrk -t1 -c16 -d15s --timeout 10s -s bench/signup_spread.lua http://127.0.0.1:PORT -- RUNTAG
--
-- signup.lua's addresses (u<thread>-<counter>-<runtag>@example.com) all sort next to each
-- other, so every new email_key lands on the same few index pages however big the table is.
-- Real addresses land anywhere in the index: here <8 hex>.u<thread>-<counter>-<runtag>, the
-- counter and run tag keep them unique and the random prefix sends each to a random page of
-- the subscribers email_key indexes, as bench/big_table.py's pre-filled addresses are spread
-- over the same hex prefixes. The BENCH line is signup.lua's.

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
    '{"email": "%04x%04x.u%d-%d-%s@example.com", "newsletters": ["bench"]}',
    math.random(0, 65535), math.random(0, 65535), thread_id, counter, tag
  )
  return wrk.format(nil, nil, nil, body)
end

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
