#!/bin/bash
# Load run on loopback (`make bench`, or alone): `flexllm serve` on the default init-model model
# under many concurrent streaming clients (flexllm bench over HTTP, Poisson arrivals) for
# LOAD_SECONDS. Every response must be complete and well formed (bench counts a non-200, a
# chunk that is not JSON, a stream cut short as errors), and the server's resident memory is
# sampled every 2 s: the growth over the second half of the run should be flat.
# Writes tests/bench/results/load_server.json.
#   LOAD_SECONDS (default 180), LOAD_RATE requests/s (default 45; about 60 saturates the 256 connections on 2 cores), LOAD_OUTPUT tokens (64)
set -u
cd "$(dirname "$0")/../.."
secs=${LOAD_SECONDS:-180} rate=${LOAD_RATE:-45} outlen=${LOAD_OUTPUT:-64}
work=build/bench/load
out=tests/bench/results/load_server.json
rm -rf "$work" && mkdir -p "$work" tests/bench/results
export LUA_PATH="$PWD/lua/?.lua;$PWD/lua/?/init.lua;$PWD/build/lua/?.lua;;" LUA_CPATH="$PWD/build/lib/?.so;;"
bin/flexllm init-model "$work/model" >/dev/null || exit 1
bin/flexllm serve --model "$work/model" --port 0 --kv-pages 1024 --data-dir "$work/data" \
    >"$work/serve.out" 2>"$work/serve.err" &
pid=$!
trap 'kill $pid 2>/dev/null' EXIT
for _ in $(seq 100); do grep -q "listening on" "$work/serve.out" && break; sleep 0.1; done
url=$(grep -o "http://[^ ]*" "$work/serve.out" | head -1)
[ -n "$url" ] || { echo "load: the server did not start: $(cat "$work/serve.err")" >&2; exit 1; }

( while kill -0 $pid 2>/dev/null; do
      echo "$(date +%s.%N) $(awk '/VmRSS/ {print $2}' /proc/$pid/status 2>/dev/null)"; sleep 2
  done ) >"$work/rss.txt" &
sampler=$!
bin/flexllm bench --url "$url" --rate "$rate" --duration "$secs" --prompt-len 24 --output-len "$outlen" \
    --out "$work/bench.json" | tee "$work/bench.out"
kill $sampler 2>/dev/null
kill -TERM $pid && wait $pid
server_rc=$?

luajit - "$work/bench.json" "$work/rss.txt" "$out" "$server_rc" "$secs" "$rate" <<'LUA'
local cjson = require "cjson"
local bench_path, rss_path, out, rc, secs, rate = arg[1], arg[2], arg[3], tonumber(arg[4]), tonumber(arg[5]), tonumber(arg[6])
local f = assert(io.open(bench_path)); local r = cjson.decode(f:read("*a")).runs[1]; f:close()
local samples = {}
for line in io.lines(rss_path) do
  local t, kb = line:match("^(%S+) (%d+)$")
  if t then samples[#samples + 1] = { t = tonumber(t), kb = tonumber(kb) } end
end
if #samples < 2 then io.stderr:write("load: fewer than two RSS samples in ", rss_path, "\n"); os.exit(1) end
-- RSS growth over the second half of the run: the least-squares slope of its samples (the
-- difference of two samples would measure where the garbage collector's sawtooth was).
local mid, last = math.ceil(#samples / 2), samples[#samples]
local n, mt, mk = #samples - mid + 1, 0, 0
for i = mid, #samples do mt, mk = mt + samples[i].t / n, mk + samples[i].kb / n end
local sxy, sxx = 0, 0
for i = mid, #samples do
  local dt = samples[i].t - mt
  sxy, sxx = sxy + dt * (samples[i].kb - mk), sxx + dt * dt
end
local growth = sxy / sxx -- KiB/s
-- Little's law: the requests' time in the server summed, over the run's time.
local in_flight = r.completed > 0 and r.e2e_s.mean * r.completed / r.duration_s or 0
local res = { seconds = secs, rate = rate, requests = r.requests, completed = r.completed, errors = r.errors,
              first_error = r.first_error, server_exit = rc, rss_kib_start = samples[1].kb,
              rss_kib_mid = samples[mid].kb, rss_kib_end = last.kb, rss_growth_kib_per_s_second_half = growth,
              ttft_p99 = r.ttft_s.p99, e2e_p99 = r.e2e_s.p99, mean_concurrent_requests = in_flight }
local o = assert(io.open(out, "w")); o:write(cjson.encode(res), "\n"); o:close()
print(("load: %d/%d completed, %d errors, server exit %d, %.1f requests in flight on average; "
  .. "RSS %d -> %d -> %d KiB (%.2f KiB/s over the second half)")
  :format(r.completed, r.requests, r.errors, rc, in_flight, samples[1].kb, samples[mid].kb, last.kb, growth))
os.exit((r.errors == 0 and r.completed == r.requests and rc == 0) and 0 or 1)
LUA
