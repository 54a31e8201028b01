-- Request shape and report for every benchmark run, configured by environment variables:
--   BENCH_METHOD    GET (default) or POST (with a small JSON body)
--   BENCH_KEY       none (default) | fresh (a new Idempotency-Key per request) | fixed
--   BENCH_DELAY_MS  pause per connection between requests (paced latency runs); 0 = closed loop
-- done() prints one JSON line with the counts and latency percentiles in microseconds.
local method = os.getenv("BENCH_METHOD") or "GET"
local key_mode = os.getenv("BENCH_KEY") or "none"
local pause = tonumber(os.getenv("BENCH_DELAY_MS") or "0")
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

if pause > 0 then
  delay = function()
    return pause
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
