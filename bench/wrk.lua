-- Request shape and report for every benchmark run, configured by environment variables:
--   BENCH_METHOD    GET (default) or POST (with a small JSON body)
--   BENCH_KEY       none (default) | fresh (a new Idempotency-Key per request) | fixed
--   BENCH_DELAY_MS  mean pause per connection between requests (paced latency runs); 0 = closed loop
--   BENCH_PACING    poisson (default): each pause is drawn from an exponential distribution with
--                   that mean, so arrivals spread out as independent clients' do; fixed: every
--                   pause is exactly BENCH_DELAY_MS, which keeps the connections in lock-step (all
--                   of them send within the same millisecond, then nothing: a burst every period)
-- done() prints one JSON line with the counts and latency percentiles in microseconds.
local method = os.getenv("BENCH_METHOD") or "GET"
local key_mode = os.getenv("BENCH_KEY") or "none"
local pause = tonumber(os.getenv("BENCH_DELAY_MS") or "0")
local pacing = os.getenv("BENCH_PACING") or "poisson"
math.randomseed(os.time())
local body = nil
local headers = {}
local prefix = string.format("bench-%d-%s-", os.time(), tostring({}):sub(8))
local counter = 0

if method == "POST" then
  body = '{"amount":1000,"currency":"EUR","note":"benchmark"}'
  headers["Content-Type"] = "application/json"
end
if key_mode == "fixed" then
  headers["Idempotency-Key"] = "bench-fixed-key"
end
local fixed_request = nil

request = function()
  if key_mode == "fresh" then
    counter = counter + 1
    headers["Idempotency-Key"] = prefix .. counter
    return wrk.format(method, nil, headers, body)
  end
  if fixed_request == nil then
    fixed_request = wrk.format(method, nil, headers, body)
  end
  return fixed_request
end

if pause > 0 and pacing == "fixed" then
  delay = function()
    return pause
  end
elseif pause > 0 then
  delay = function()
    -- 1 - random() is in (0, 1]: the logarithm is finite.
    return math.floor(-pause * math.log(1 - math.random()) + 0.5)
  end
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"connect_errors":%d,"read_errors":%d,' ..
    '"write_errors":%d,"timeouts":%d,"non_2xx":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean))
end
