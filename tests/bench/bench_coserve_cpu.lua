-- The FlexLLM co-serving comparison on the CPU executor (the real engine) with the default
-- init-model LLaMA (dim 256, 4 layers, vocab 512), through the Lua API.
--
-- One Poisson arrival trace per rate (seeded) with ShareGPT prompt/response lengths divided
-- by LENGTH_SCALE, replayed in real time (requests submitted when core.now() passes their
-- arrival) for each policy, with one LoRA finetuning job on a text dataset:
--   hybrid, temporal/2, /4, /8 (every N-th iteration finetunes), static_split/0.25, and
--   sequential: inference_only on the trace without the job, then finetune_only alone for as
--   long as that run took; its finetuning tokens/s are its tokens over both runs' time (the
--   median of its finetune_only phases alone is finetune_only_tokens_per_s in the JSON).
-- SLOs are set from the single-request latency measured at the start of the same run (see
-- slo in the JSON), and the rates from the measured request capacity.
-- Per run: SLO attainment (TTFT from the trace arrival, TPOT the mean time per later token,
-- over every request of the trace), and finetuning forward tokens/s over the trace's span.
-- Then the policy's time per call with up to 256 requests in the state, against the mean
-- iteration time of the same runs.
--
-- usage: luajit tests/bench/bench_coserve_cpu.lua [OUT.json]   (from the repository root,
-- with LUA_PATH and LUA_CPATH set as tests/bench/run sets them)
-- Environment: FLEXLLM_SHARED (default ../shared), BENCH_COSERVE_SECONDS (trace length,
-- default 12), BENCH_COSERVE_THREADS (engine threads, default 1: on a shared 2-core machine
-- a second thread stalls every GEMM whenever another process holds a core).
local fl = require "flexllm"
local ffi = require "ffi"
local core = fl.core

ffi.cdef "int usleep(unsigned int usec);"

local OUT = arg[1] or "tests/bench/results/cpu_coserving.json"
local SECONDS = tonumber(os.getenv "BENCH_COSERVE_SECONDS" or "12")
local THREADS = tonumber(os.getenv "BENCH_COSERVE_THREADS" or "1")
local SHARED = os.getenv "FLEXLLM_SHARED" or "../shared"
local LENGTH_SCALE = 8             -- ShareGPT lengths / 8: ~126-token prompts, ~36-token replies
local MAX_BATCH_TOKENS = 256
-- SLOs as multiples of one request's latency alone. One sequence's decode step is
-- matrix-vector bound (~0.3 ms) while each token of a batch costs ~0.1 ms more, so a full
-- 256-token batch takes ~30 ms: TPOT x40 (~12 ms) leaves decoding batches room but not a
-- full finetuning batch in every iteration, the regime where a co-serving policy matters.
local TTFT_FACTOR, TPOT_FACTOR = 10, 40
local RATE_FRACTIONS = { 0.05, 0.1, 0.2, 0.35 } -- of the measured request capacity
-- A policy call may take 10 ms instead of the default 2: a descheduled process (the machine
-- is shared) would otherwise fail calls and measure the fallback plan instead of the policy.
local POLICY_BUDGET = 0.01
local DRAIN_LIMIT = 3              -- a run stops DRAIN_LIMIT * SECONDS after the trace ends
local MODEL_DIR = "build/bench-models/coserve-default"
local TMP = "build/tmp/bench_coserve"

local function log(fmt, ...) io.stderr:write(fmt:format(...), "\n") end

local function exists(path)
  local f = io.open(path, "rb")
  if f then f:close() end
  return f ~= nil
end

local function read(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read "*a"
  f:close()
  return s
end

-- --------------------------------------------------------------- inputs

os.execute("mkdir -p " .. TMP)
if not exists(MODEL_DIR .. "/config.json") then
  log("bench_coserve: writing the default init-model to %s", MODEL_DIR)
  assert(fl.init_model(MODEL_DIR, {}))
end
local model = assert(fl.load(MODEL_DIR, { threads = THREADS }))
local ctx = assert(model:context({ max_batch_tokens = MAX_BATCH_TOKENS, max_seqs = 64 }))
local max_seq = model:config().max_seq_len

-- The finetuning text, and the prompts' tokens (slices of the same text).
local data = SHARED .. "/data/tinystories_sample.txt"
if not exists(data) then
  log("bench_coserve: %s absent: a generated text instead", data)
  data = TMP .. "/text.txt"
  local words = { "the", "cat", "sat", "on", "a", "small", "mat", "and", "looked", "at", "dog",
                  "who", "ran", "to", "big", "red", "ball", "in", "park", "sun" }
  local f = assert(io.open(data, "wb"))
  local s = 7
  for i = 1, 40000 do
    s = (s * 1103515245 + 12345) % 2147483648
    f:write(words[s % #words + 1], i % 12 == 0 and ".\n" or " ")
  end
  f:close()
end
local corpus = model:encode(read(data), { bos = false })

-- ShareGPT prompt/response token counts, or a fixed spread when the file is absent.
local pairs_path = SHARED .. "/data/sharegpt_pairs_50.json"
local lengths = {}
if exists(pairs_path) then
  for _, p in ipairs(require("cjson").decode(read(pairs_path))) do
    if type(p.prompt_tokens) == "number" and type(p.response_tokens) == "number" then
      lengths[#lengths + 1] = { p.prompt_tokens, p.response_tokens }
    end
  end
else
  log("bench_coserve: %s absent: synthetic lengths", pairs_path)
  pairs_path = "synthetic"
  for i = 0, 49 do lengths[#lengths + 1] = { 64 + i * 37 % 900, 32 + i * 53 % 480 } end
end
for _, l in ipairs(lengths) do
  l[1] = math.max(1, math.floor(l[1] / LENGTH_SCALE + 0.5))
  l[2] = math.max(2, math.floor(l[2] / LENGTH_SCALE + 0.5))
  assert(l[1] + l[2] <= max_seq, "scaled lengths exceed the model's context")
end

local function lcg(seed)
  local s = seed
  return function() -- uniform in (0, 1)
    s = (s * 1103515245 + 12345) % 2147483648
    return (s + 0.5) / 2147483648
  end
end

local function prompt(rand, n)
  local at = math.floor(rand() * (#corpus - n))
  local ids = {}
  for i = 1, n do ids[i] = corpus[at + i] end
  return ids
end

-- Poisson arrivals at rate per second over SECONDS, the same for every policy.
local function make_trace(rate, seed)
  local rand, t, trace = lcg(seed), 0, {}
  while true do
    t = t - math.log(rand()) / rate
    if t > SECONDS then return trace end
    local l = lengths[math.floor(rand() * #lengths) + 1]
    trace[#trace + 1] = { at = t, ids = prompt(rand, l[1]), out = l[2] }
  end
end

local function new_job(tag)
  return assert(ctx:finetune({ data = data, out = TMP .. "/adapter-" .. tag, rank = 8,
                               seq_len = 256, epochs = 1000, seed = 1 }))
end

local function free()
  collectgarbage()
  collectgarbage()
end

local function percentile(xs, p)
  if #xs == 0 then return 0 end
  local s = {}
  for i, x in ipairs(xs) do s[i] = x end
  table.sort(s)
  return s[math.max(1, math.ceil(p * #s))]
end

-- The 1-minute load average: how busy the machine was (this bench counts for about 1).
local function load_average()
  local f = io.open "/proc/loadavg"
  if not f then return nil end
  local s = f:read "*l"
  f:close()
  return tonumber(s:match "^(%S+)")
end

-- ------------------------------------------------------------------ replay

-- Replays trace through rt (with a job or not) until every request finished and span
-- seconds passed (or the drain limit did). Finetuning tokens/s are taken over span.
-- slo: { ttft, tpot } or nil. Returns the run's figures.
local function replay(rt, trace, span, slo)
  local n, reqs, by_id = #trace, {}, {}
  local nexti, done, in_flight, snap = 1, 0, 0, nil
  local with_job = rt:active() > 0
  local t0 = core.now()
  while true do
    local now = core.now() - t0
    while nexti <= n and trace[nexti].at <= now do
      local r = trace[nexti]
      local id = assert(rt:submit(r.ids, { max_tokens = r.out, ignore_eos = true }))
      local q = { at = t0 + r.at, tokens = 0 }
      reqs[nexti], by_id[id] = q, q
      nexti, in_flight = nexti + 1, in_flight + 1
    end
    if not snap and now >= span then snap = rt:stats(); snap.t = now end
    if (done == n and snap) or now > span + DRAIN_LIMIT * SECONDS then break end
    if in_flight == 0 and not with_job then
      local wait = (nexti <= n and trace[nexti].at or span) - now
      if wait > 0 then ffi.C.usleep(math.floor(wait * 1e6)) end
    else
      local events = assert(rt:step())
      local t = core.now()
      for _, ev in ipairs(events) do
        local q = by_id[ev.request]
        if ev.token >= 0 and not ev.eos then
          q.first = q.first or t
          q.last, q.tokens = t, q.tokens + 1
        end
        if ev.finish then q.done, done, in_flight = true, done + 1, in_flight - 1 end
      end
    end
  end
  local stats, met, ttfts, tpots = rt:stats(), 0, {}, {}
  for _, q in ipairs(reqs) do
    if q.done then
      local ttft = q.first - q.at
      local tpot = q.tokens > 1 and (q.last - q.first) / (q.tokens - 1) or 0
      ttfts[#ttfts + 1], tpots[#tpots + 1] = ttft, tpot
      if slo and ttft <= slo.ttft and tpot <= slo.tpot then met = met + 1 end
    end
  end
  return {
    requests = n, done = done, slo_attainment = n > 0 and met / n or 1,
    runtime_slo_attainment = n > 0 and stats.requests_slo_met / n or 1,
    ttft_p50 = percentile(ttfts, 0.5), ttft_p99 = percentile(ttfts, 0.99),
    tpot_p50 = percentile(tpots, 0.5), tpot_p99 = percentile(tpots, 0.99),
    finetune_forward_tokens_per_s = snap.ft_forward_tokens / snap.t,
    finetune_backward_tokens_per_s = snap.ft_backward_tokens / snap.t,
    seconds = core.now() - t0, iterations = stats.iterations,
    iteration_ms = stats.iterations > 0 and 1e3 * stats.busy_seconds / stats.iterations or 0,
    policy_us_per_call = stats.policy_calls > 0 and 1e6 * stats.policy_seconds / stats.policy_calls or 0,
    policy_failures = stats.policy_failures,
  }
end

-- Finetuning alone under finetune_only for the given seconds: forward tokens run.
local function finetune_alone(seconds)
  local rt = assert(ctx:runtime({ policy = "policies/finetune_only.lua" }))
  rt:add_job(new_job("alone"))
  local t0 = core.now()
  while core.now() - t0 < seconds do assert(rt:step()) end
  local tokens = rt:stats().ft_forward_tokens
  rt = nil
  free()
  return tokens, core.now() - t0
end

-- ------------------------------------------------------------- calibration

local median_len -- prompt and output tokens of a median request
do
  local p, r = {}, {}
  for i, l in ipairs(lengths) do p[i], r[i] = l[1], l[2] end
  median_len = { percentile(p, 0.5), percentile(r, 0.5) }
end

-- Single-request TTFT and TPOT of a median request, best of 3 (the least disturbed).
local single = { ttft = math.huge, tpot = math.huge }
for rep = 1, 3 do
  local rt = assert(ctx:runtime({ policy = "policies/inference_only.lua" }))
  local r = replay(rt, { { at = 0, ids = prompt(lcg(rep), median_len[1]), out = median_len[2] } }, 0)
  single.ttft, single.tpot = math.min(single.ttft, r.ttft_p50), math.min(single.tpot, r.tpot_p50)
  rt = nil
  free()
end
local slo = { ttft = TTFT_FACTOR * single.ttft, tpot = TPOT_FACTOR * single.tpot }

-- Request capacity: a burst of 64 trace requests at once under inference_only.
local capacity
do
  local rand, burst = lcg(99), {}
  for i = 1, 64 do
    local l = lengths[(i - 1) % #lengths + 1]
    burst[i] = { at = 0, ids = prompt(rand, l[1]), out = l[2] }
  end
  local rt = assert(ctx:runtime({ policy = "policies/inference_only.lua" }))
  capacity = 64 / replay(rt, burst, 0).seconds
  rt = nil
  free()
end
log("bench_coserve: %d thread(s); single request (%d+%d tokens): TTFT %.1f ms, TPOT %.2f ms;",
    THREADS, median_len[1], median_len[2], single.ttft * 1e3, single.tpot * 1e3)
log("  SLO: TTFT %.0f ms (x%d), TPOT %.1f ms (x%d); capacity %.1f req/s",
    slo.ttft * 1e3, TTFT_FACTOR, slo.tpot * 1e3, TPOT_FACTOR, capacity)

-- ------------------------------------------------------------------ sweep

local policies = {
  { name = "hybrid", file = "policies/hybrid.lua" },
  { name = "temporal/2", file = "policies/temporal.lua", options = "{ every = 2 }" },
  { name = "temporal/4", file = "policies/temporal.lua", options = "{ every = 4 }" },
  { name = "temporal/8", file = "policies/temporal.lua", options = "{ every = 8 }" },
  { name = "static_split/0.25", file = "policies/static_split.lua", options = "{ share = 0.25 }" },
  { name = "sequential" }, -- inference_only, then finetune_only as long
}

local rates = {}
for i, f in ipairs(RATE_FRACTIONS) do rates[i] = math.max(0.1, math.floor(f * capacity * 10 + 0.5) / 10) end

-- For each rate all policies run back to back, so that what they are compared on was
-- measured close in time (the machine's other load drifts).
local runs, alone, by = {}, {}, {}
for ri, rate in ipairs(rates) do
  local trace = make_trace(rate, 1000 + ri)
  for _, pol in ipairs(policies) do
    local r
    if pol.name == "sequential" then
      local rt = assert(ctx:runtime({ policy = "policies/inference_only.lua",
                                      ttft_slo = slo.ttft, tpot_slo = slo.tpot,
                                      policy_time_budget = POLICY_BUDGET }))
      r = replay(rt, trace, SECONDS, slo)
      rt = nil
      free()
      local tokens, s = finetune_alone(r.seconds)
      r.finetune_only_seconds = s
      r.finetune_alone_tokens_per_s = tokens / s
      alone[#alone + 1] = tokens / s
      r.finetune_forward_tokens_per_s = tokens / (r.seconds + s)
      r.finetune_backward_tokens_per_s = nil
    else
      local rt = assert(ctx:runtime({ policy = pol.file, options = pol.options,
                                      ttft_slo = slo.ttft, tpot_slo = slo.tpot,
                                      policy_time_budget = POLICY_BUDGET }))
      rt:add_job(new_job((pol.name:gsub("/", "-"))))
      r = replay(rt, trace, SECONDS, slo)
      rt = nil
      free()
    end
    r.policy, r.rate, r.load_average = pol.name, rate, load_average()
    runs[#runs + 1] = r
    by[pol.name .. "@" .. ri] = r
    log("  %5.1f req/s %-18s %5.1f%% SLO attained, %5.0f finetuning tokens/s (load %.1f)",
        rate, pol.name, 100 * r.slo_attainment, r.finetune_forward_tokens_per_s, r.load_average or 0)
  end
end
io.stderr:write(("\n%-18s"):format("policy \\ req/s"))
for _, rate in ipairs(rates) do io.stderr:write(("%16.1f"):format(rate)) end
io.stderr:write("\n  (SLO attainment % / finetuning forward tokens/s)\n")
for _, pol in ipairs(policies) do
  io.stderr:write(("%-18s"):format(pol.name))
  for ri in ipairs(rates) do
    local r = by[pol.name .. "@" .. ri]
    io.stderr:write(("%9.1f/%6.0f"):format(100 * r.slo_attainment, r.finetune_forward_tokens_per_s))
  end
  io.stderr:write "\n"
end

-- ----------------------------------------------------- policy time per call

-- n requests in the state (max_seqs of them running, the rest queued) and one job: the
-- policy's mean time per call and the mean iteration time, over 50 iterations once the
-- requests are admitted.
local function overhead(pol, n, max_seqs)
  local c = assert(model:context({ max_batch_tokens = MAX_BATCH_TOKENS, max_seqs = max_seqs }))
  local rt = assert(c:runtime({ policy = pol.file, options = pol.options,
                                ttft_slo = slo.ttft, tpot_slo = slo.tpot,
                                policy_time_budget = POLICY_BUDGET }))
  rt:add_job(assert(c:finetune({ data = data, out = TMP .. "/adapter-overhead", rank = 8,
                                 seq_len = 256, epochs = 1000, seed = 1 })))
  local rand = lcg(7)
  for _ = 1, n do assert(rt:submit(prompt(rand, 8), { max_tokens = 500, ignore_eos = true })) end
  for _ = 1, math.ceil(8 * max_seqs / MAX_BATCH_TOKENS) + 5 do assert(rt:step()) end
  local a = rt:stats()
  for _ = 1, 50 do assert(rt:step()) end
  local b = rt:stats()
  rt, c = nil, nil
  free()
  local per_call = (b.policy_seconds - a.policy_seconds) / (b.policy_calls - a.policy_calls)
  local iteration = (b.busy_seconds - a.busy_seconds) / (b.iterations - a.iterations)
  return { policy = pol.name, requests = n, running = math.min(n, max_seqs),
           us_per_call = per_call * 1e6, iteration_ms = iteration * 1e3,
           share_of_iteration = per_call / iteration }
end

log("\npolicy time per call against the iteration (one job, requests decoding 1 token each):")
local over = {}
for _, cfg in ipairs { { 16, 256 }, { 64, 256 }, { 256, 256 }, { 256, 64 } } do
  for _, pi in ipairs { 1, 4, 5 } do
    local o = overhead(policies[pi], cfg[1], cfg[2])
    over[#over + 1] = o
    log("  %-18s %3d requests (%3d running): %6.1f us per call, iteration %6.2f ms: %.2f%%",
        o.policy, o.requests, o.running, o.us_per_call, o.iteration_ms, 100 * o.share_of_iteration)
  end
end

-- ------------------------------------------------------------------ output

-- JSON with keys in order (objects are lists of { key, value }).
local function encode(v, indent)
  indent = indent or ""
  local t = type(v)
  if t == "number" then
    if v ~= v or v == math.huge or v == -math.huge then return "null" end
    if v % 1 == 0 and math.abs(v) < 1e15 then return ("%d"):format(v) end
    return ("%.6g"):format(v)
  elseif t == "string" then
    return '"' .. v:gsub('[%c"\\]', function(c) return ("\\u%04x"):format(c:byte()) end) .. '"'
  elseif t == "boolean" then
    return tostring(v)
  end
  local inner, parts = indent .. "  ", {}
  if v.keys then
    for _, k in ipairs(v.keys) do
      if v[k] ~= nil then parts[#parts + 1] = inner .. encode(k) .. ": " .. encode(v[k], inner) end
    end
    return "{\n" .. table.concat(parts, ",\n") .. "\n" .. indent .. "}"
  end
  for _, x in ipairs(v) do parts[#parts + 1] = inner .. encode(x, inner) end
  return "[\n" .. table.concat(parts, ",\n") .. "\n" .. indent .. "]"
end
local function obj(keys, t)
  t.keys = {}
  for k in keys:gmatch "%S+" do t.keys[#t.keys + 1] = k end
  return t
end

local run_keys = "policy rate requests done slo_attainment runtime_slo_attainment ttft_p50 ttft_p99 "
  .. "tpot_p50 tpot_p99 finetune_forward_tokens_per_s finetune_backward_tokens_per_s seconds "
  .. "finetune_only_seconds finetune_alone_tokens_per_s iterations iteration_ms policy_us_per_call policy_failures load_average"
for i, r in ipairs(runs) do runs[i] = obj(run_keys, r) end
for i, o in ipairs(over) do
  over[i] = obj("policy requests running us_per_call iteration_ms share_of_iteration", o)
end
local cfg = model:config()
local result = obj("executor model threads max_batch_tokens policy_time_budget trace_seconds "
  .. "lengths length_scale "
  .. "finetune single_request slo capacity_req_per_s rate_fractions finetune_only_tokens_per_s "
  .. "load_average_end runs policy_overhead", {
  executor = "cpu",
  model = obj("name dim hidden_dim n_layers n_heads n_kv_heads vocab_size", {
    name = "init-model defaults (random LLaMA)", dim = cfg.dim, hidden_dim = cfg.hidden_dim,
    n_layers = cfg.n_layers, n_heads = cfg.n_heads, n_kv_heads = cfg.n_kv_heads,
    vocab_size = cfg.vocab_size }),
  threads = THREADS, max_batch_tokens = MAX_BATCH_TOKENS, policy_time_budget = POLICY_BUDGET,
  trace_seconds = SECONDS,
  lengths = pairs_path, length_scale = LENGTH_SCALE,
  finetune = obj("data rank seq_len", { data = data, rank = 8, seq_len = 256 }),
  single_request = obj("prompt_tokens output_tokens ttft tpot how",
    { prompt_tokens = median_len[1], output_tokens = median_len[2], ttft = single.ttft,
      tpot = single.tpot, how = "a median request alone under inference_only, best of 3" }),
  slo = obj("ttft tpot ttft_factor tpot_factor met_when", {
    ttft = slo.ttft, tpot = slo.tpot, ttft_factor = TTFT_FACTOR, tpot_factor = TPOT_FACTOR,
    met_when = "TTFT (from the trace arrival) <= ttft and mean TPOT <= tpot; " ..
               "attainment over every request of the trace" }),
  capacity_req_per_s = capacity, rate_fractions = RATE_FRACTIONS,
  finetune_only_tokens_per_s = percentile(alone, 0.5),
  load_average_end = load_average(),
  runs = runs, policy_overhead = over,
})
local f = assert(io.open(OUT, "wb"))
f:write(encode(result), "\n")
f:close()
log("bench_coserve: wrote %s", OUT)
