-- flexllm bench: replays a request trace (Poisson or gamma arrivals, ShareGPT or
-- synthetic prompts) against the co-serving runtime in this process, or against an
-- OpenAI-compatible server over HTTP with streamed completions, optionally with a
-- finetuning job alongside, and reports TTFT, TPOT, inter-token latency, end-to-end
-- latency, SLO attainment, goodput and finetuning throughput, as JSON and a plot.
local trace = require "flexllm.trace"
local plot = require "flexllm.plot"
local cjson = require "cjson"

local M = {}

local max, min = math.max, math.min

local function now() return require("flexllm.core").now() end

-- --------------------------------------------------------------------- policies

local function file_exists(path)
  local f = io.open(path, "rb")
  if f then f:close() end
  return f ~= nil
end

-- The folder holding this module (lua/flexllm in a checkout, share/lua/5.1/flexllm
-- installed).
local function module_dir()
  local src = debug.getinfo(1, "S").source
  return src:sub(1, 1) == "@" and (src:sub(2):match("^(.*)/[^/]*$") or ".") or "."
end

-- The file of a built-in policy by name ("hybrid"), or a path given as is. Looks in
-- $FLEXLLM_POLICIES, a checkout's policies/ (two folders above this module), and
-- policies/ beside this module (an install). Returns the path, or nil and where it looked.
function M.find_policy(name)
  if name:find("/") or name:match("%.lua$") then
    if file_exists(name) then return name end
    return nil, ("policy file %s does not exist"):format(name)
  end
  local dirs = {}
  if os.getenv("FLEXLLM_POLICIES") then dirs[#dirs + 1] = os.getenv("FLEXLLM_POLICIES") end
  local here = module_dir()
  dirs[#dirs + 1] = here .. "/../../policies"
  dirs[#dirs + 1] = here .. "/policies"
  for _, d in ipairs(dirs) do
    local p = d .. "/" .. name .. ".lua"
    if file_exists(p) then
      repeat -- "a/b/../c" -> "a/c", for the messages that show it
        local q = p
        p = p:gsub("/[^/]+/%.%./", "/", 1)
      until p == q
      return p
    end
  end
  return nil, ("no policy '%s' in %s (set FLEXLLM_POLICIES to the policies folder)")
    :format(name, table.concat(dirs, ", "))
end

-- ------------------------------------------------------------------ the requests

local WORDS = { "the", "model", "serves", "requests", "while", "it", "trains", "an", "adapter", "on",
                "one", "shared", "base", "and", "every", "iteration", "mixes", "prefill", "decode",
                "tokens", "with", "finetuning", "work", "under", "a", "latency", "budget" }

-- Synthetic prompt text of n words, varied by the generator.
local function synthetic_text(rng, n)
  local w = {}
  for i = 1, n do w[i] = WORDS[rng:int(1, #WORDS)] end
  return table.concat(w, " ")
end

-- The trace's requests: { arrival, prompt (text), ids (when a tokenizer is at hand),
-- output_len }. o: rate, arrival, cv, requests or duration, seed, dataset (a list from
-- trace.load_prompts) or prompt_len (synthetic prompts: that many words, or tokens with a
-- tokenizer; 64 by default), output_len, max_prompt_len, max_output_len,
-- max_seq (the model's context, when known). tok: a tokenizer, or nil over HTTP.
function M.build_requests(o, tok)
  local times, err = trace.arrivals({ rate = o.rate, kind = o.arrival, cv = o.cv, n = o.requests,
                                      duration = o.duration, seed = o.seed })
  if not times then return nil, err end
  local rng = trace.rng((o.seed or 1) + 7919)
  local plen = o.prompt_len or 64
  local reqs = {}
  for i, t in ipairs(times) do
    local item = o.dataset and o.dataset[rng:int(1, #o.dataset)]
    local text = item and item.prompt or synthetic_text(rng, plen)
    local out = o.output_len
    if not out and item then
      out = item.output_tokens
      if not out and item.response and tok then out = #tok:encode(item.response, { bos = false }) end
    end
    out = max(1, out or 128)
    if o.max_output_len then out = min(out, o.max_output_len) end
    local r = { arrival = t, prompt = text, output_len = out }
    if tok then
      local ids = tok:encode(text)
      if not item then -- synthetic: exactly plen tokens
        local k = #ids
        while #ids < plen do ids[#ids + 1] = ids[(#ids % k) + 1] end
      end
      local cap = o.max_prompt_len or (item and math.huge or plen)
      if o.max_seq then
        if out >= o.max_seq then out = o.max_seq - 1 end
        cap = min(cap, o.max_seq - out)
      end
      if #ids > cap then
        for k = #ids, cap + 1, -1 do ids[k] = nil end
        r.prompt = tok:decode(ids)
      end
      r.ids, r.output_len = ids, out
    end
    reqs[i] = r
  end
  return reqs
end

-- -------------------------------------------------------------------- metrics

-- Per-request records: arrival, first (first token), last (last token), done, tokens,
-- gaps (inter-token latencies), error (a message) and, when the server measured them,
-- ttft and tpot. Times in seconds from the trace's start. Fills in ttft, tpot, e2e and
-- slo_met (slo: {ttft, tpot}, nil for no bound).
function M.finish_record(r, slo)
  if r.error then return end
  r.ttft = r.ttft or (r.first and r.first - r.arrival)
  if not r.tpot then
    r.tpot = (r.tokens or 0) > 1 and (r.last - r.first) / (r.tokens - 1) or 0
  end
  r.e2e = r.done - r.arrival
  r.slo_met = r.ttft ~= nil and (not slo.ttft or r.ttft <= slo.ttft) and (not slo.tpot or r.tpot <= slo.tpot)
end

local function json_summary(values)
  local s = trace.summary(values)
  for _, k in ipairs({ "mean", "p50", "p90", "p99", "max" }) do
    if s[k] == nil then s[k] = cjson.null end
  end
  return s
end

-- The figures of one run: records as above, slo {ttft, tpot} (nil: no bound), the wall
-- seconds the run took.
function M.metrics(records, slo, elapsed)
  local ttft, tpot, itl, e2e = {}, {}, {}, {}
  local done, errors, met, out_tokens, first_error = 0, 0, 0, 0, nil
  for _, r in ipairs(records) do
    if r.error then
      errors = errors + 1
      first_error = first_error or r.error
    elseif r.done then
      done = done + 1
      ttft[#ttft + 1] = r.ttft
      if r.tokens > 1 then tpot[#tpot + 1] = r.tpot end
      e2e[#e2e + 1] = r.e2e
      for _, g in ipairs(r.gaps) do itl[#itl + 1] = g end
      out_tokens = out_tokens + r.tokens
      if r.slo_met then met = met + 1 end
    end
  end
  local n = #records
  return {
    requests = n, completed = done, errors = errors, first_error = first_error or cjson.null,
    duration_s = elapsed,
    ttft_s = json_summary(ttft), tpot_s = json_summary(tpot), itl_s = json_summary(itl),
    e2e_s = json_summary(e2e),
    slo = { ttft_s = slo.ttft or cjson.null, tpot_s = slo.tpot or cjson.null },
    slo_met = met,
    slo_attainment = n > 0 and met / n or cjson.null,
    goodput_rps = met / max(elapsed, 1e-9),
    throughput = { requests_per_s = done / max(elapsed, 1e-9), output_tokens_per_s = out_tokens / max(elapsed, 1e-9) },
  }
end

-- ----------------------------------------------------------------- in process

-- Drives a runtime through a trace. reqs: { arrival, ids, output_len, adapter (optional),
-- options (extra request options) }. o: job and job_id (a finetuning job in the runtime),
-- wait_job (keep stepping until the job is done, else cancel it when the requests are),
-- on_step(t, records, events, stats) after every iteration (stats: rt:stats()).
-- Returns the records and the elapsed seconds; raises on an engine error.
function M.drive(rt, reqs, o)
  o = o or {}
  local records, by_id = {}, {}
  local t0 = now()
  local next_req, open = 1, 0
  local function job_running()
    return o.job ~= nil and not o.job:progress().done and rt:job_error(o.job_id) == ""
  end
  while next_req <= #reqs or open > 0 or (o.wait_job and job_running()) do
    local t = now() - t0
    while next_req <= #reqs and reqs[next_req].arrival <= t do
      local q = reqs[next_req]
      local opts = { max_tokens = q.output_len, ignore_eos = true, temperature = 0, adapter = q.adapter }
      for k, v in pairs(q.options or {}) do opts[k] = v end
      local id, err = rt:submit(q.ids, opts)
      if not id then error(("request %d: %s"):format(next_req, err), 0) end
      local r = { index = next_req, arrival = q.arrival, submitted = t, tokens = 0, gaps = {}, text = {} }
      records[next_req], by_id[id] = r, r
      next_req, open = next_req + 1, open + 1
    end
    if open == 0 and not job_running() then
      trace.sleep(reqs[next_req].arrival - t)
    else
      local events, err = rt:step()
      if not events then error(err, 0) end
      t = now() - t0
      for _, ev in ipairs(events) do
        local r = by_id[ev.request]
        if not ev.eos then
          if r.last then r.gaps[#r.gaps + 1] = t - r.last end
          r.first = r.first or t
          r.last = t
          r.tokens = r.tokens + 1
        end
        r.text[#r.text + 1] = ev.text
        if ev.finish then
          r.done, r.finish, r.text = t, ev.finish, table.concat(r.text)
          -- The runtime's clock starts at submission; a request that arrived during an
          -- iteration waited for it first.
          if ev.ttft then r.ttft, r.tpot = (r.submitted - r.arrival) + ev.ttft, ev.tpot end
          open = open - 1
        end
      end
      local job_err = o.job and rt:job_error(o.job_id)
      if job_err and job_err ~= "" and job_err ~= "cancelled" then error("the finetuning job failed: " .. job_err, 0) end
      if o.on_step then o.on_step(t, records, events, rt:stats()) end
    end
  end
  if o.job and not o.wait_job and job_running() then rt:cancel_job(o.job_id) end
  return records, now() - t0
end

local function in_process_run(model, reqs, o, slo)
  local ctx = assert(model:context())
  local rt, err = ctx:runtime({ policy = o.policy_path, ttft_slo = slo.ttft or 0, tpot_slo = slo.tpot or 0 })
  if not rt then error(err, 0) end
  local job, job_id, ft_dir
  if o.finetune then
    ft_dir = os.tmpname()
    os.remove(ft_dir)
    job, err = ctx:finetune({ data = o.finetune, out = ft_dir, epochs = 1000000, seed = o.seed })
    if not job then error(err, 0) end
    job_id = rt:add_job(job)
  end
  local st0 = rt:stats()
  local records, elapsed = M.drive(rt, reqs, { job = job, job_id = job_id })
  local st = rt:stats()
  if ft_dir then os.execute("rm -rf '" .. ft_dir .. "'") end
  local ft = cjson.null
  if job then
    local p = job:progress()
    local fwd, bwd = st.ft_forward_tokens - st0.ft_forward_tokens, st.ft_backward_tokens - st0.ft_backward_tokens
    ft = { data = o.finetune, forward_tokens = fwd, backward_tokens = bwd,
           tokens_per_s = fwd / max(elapsed, 1e-9), steps = p.step, loss = p.loss }
  end
  return records, elapsed, ft, { iterations = st.iterations - st0.iterations, policy_failures = st.policy_failures,
                                 preemptions = st.preemptions }
end

-- ------------------------------------------------------------------------ HTTP

-- "http://host[:port][/prefix]" -> host, port, prefix.
function M.parse_url(url)
  local host, port, prefix = url:match("^http://([^/:]+):?(%d*)(.*)$")
  if not host then return nil, ("--url must look like http://HOST:PORT, got '%s'"):format(url) end
  port = port == "" and 80 or tonumber(port)
  if port < 1 or port > 65535 then return nil, ("--url: port %d out of range"):format(port) end
  return host, port, (prefix:gsub("/+$", ""))
end

-- Splits the SSE text gathered so far into the data payloads of complete events; returns
-- the payloads and the rest.
function M.sse_split(buf)
  local payloads = {}
  buf = buf:gsub("\r\n", "\n")
  while true do
    local s, e = buf:find("\n\n", 1, true)
    if not s then break end
    local block = buf:sub(1, s - 1)
    buf = buf:sub(e + 1)
    local data = {}
    for line in (block .. "\n"):gmatch("(.-)\n") do
      local d = line:match("^data: ?(.*)$")
      if d then data[#data + 1] = d end
    end
    if #data > 0 then payloads[#payloads + 1] = table.concat(data, "\n") end
  end
  return payloads, buf
end

local function http_client()
  local ok, http = pcall(require, "flexllm.http")
  if not ok then error("bench over HTTP needs the flexllm.http module (did `make` build it?): " .. tostring(http), 0) end
  return http.client()
end

-- The first model a server lists, for requests that name none.
local function server_model(cl, host, port, prefix, headers)
  local id = cl:request({ host = host, port = port, method = "GET", path = prefix .. "/v1/models", headers = headers })
  local status, body = nil, {}
  local deadline = now() + 10
  while now() < deadline do
    for _, ev in ipairs(cl:poll(0.1)) do
      if ev.req == id then
        if ev.kind == "head" then status = ev.status
        elseif ev.kind == "data" then body[#body + 1] = ev.data
        elseif ev.kind == "error" then error(("GET %s/v1/models: %s"):format(prefix, ev.message), 0)
        elseif ev.kind == "done" then
          local ok, obj = pcall(cjson.decode, table.concat(body))
          if not ok or status ~= 200 or type(obj) ~= "table" or type(obj.data) ~= "table" or not obj.data[1] then
            error(("GET %s/v1/models answered %s: %s"):format(prefix, tostring(status), table.concat(body)), 0)
          end
          return obj.data[1].id
        end
      end
    end
  end
  error("GET /v1/models: no answer within 10 s", 0)
end

local function http_run(reqs, o)
  local host, port, prefix = assert(M.parse_url(o.url))
  local cl = http_client()
  local headers = { ["content-type"] = "application/json" }
  if o.api_key then headers.authorization = "Bearer " .. o.api_key end
  local name = o.model_name or server_model(cl, host, port, prefix, headers)
  local records, by_id = {}, {}
  local t0 = now()
  local next_req, open = 1, 0
  local function fail(r, msg)
    if not r.error and not r.done then
      r.error = msg
      open = open - 1
    end
  end
  while next_req <= #reqs or open > 0 do
    local t = now() - t0
    while next_req <= #reqs and reqs[next_req].arrival <= t do
      local q = reqs[next_req]
      local body = cjson.encode({ model = name, prompt = q.prompt, max_tokens = q.output_len, stream = true,
                                  temperature = 0, ignore_eos = true, stream_options = { include_usage = true } })
      local id = cl:request({ host = host, port = port, method = "POST", path = prefix .. "/v1/completions",
                              headers = headers, body = body })
      local r = { index = next_req, arrival = q.arrival, tokens = 0, gaps = {}, text = {}, buf = "", body = {} }
      records[next_req], by_id[id] = r, r
      next_req, open = next_req + 1, open + 1
    end
    local wait = next_req <= #reqs and max(0, reqs[next_req].arrival - (now() - t0)) or 0.5
    local events = open > 0 and cl:poll(min(wait, 0.5)) or (trace.sleep(wait) or {})
    t = now() - t0
    for _, ev in ipairs(events) do
      local r = by_id[ev.req]
      if ev.kind == "head" then
        r.status = ev.status
      elseif ev.kind == "data" and r.status ~= 200 then
        r.body[#r.body + 1] = ev.data
      elseif ev.kind == "data" then
        local payloads
        payloads, r.buf = M.sse_split(r.buf .. ev.data)
        for _, p in ipairs(payloads) do
          if p == "[DONE]" then
            r.saw_done = true
          else
            local ok, obj = pcall(cjson.decode, p)
            if not ok or type(obj) ~= "table" then
              fail(r, "a stream chunk is not JSON: " .. p:sub(1, 200))
            else
              local c = type(obj.choices) == "table" and obj.choices[1]
              if c and type(c.text) == "string" and c.text ~= "" then
                if r.last then r.gaps[#r.gaps + 1] = t - r.last end
                r.first = r.first or t
                r.last = t
                r.chunks = (r.chunks or 0) + 1
                r.text[#r.text + 1] = c.text
              end
              if c and c.finish_reason and c.finish_reason ~= cjson.null then r.finish = c.finish_reason end
              if type(obj.usage) == "table" and obj.usage.completion_tokens then
                r.usage_tokens = obj.usage.completion_tokens
              end
            end
          end
        end
      elseif ev.kind == "error" then
        fail(r, ev.message)
      elseif ev.kind == "done" then
        if r.status ~= 200 then
          fail(r, ("HTTP %s: %s"):format(tostring(r.status), table.concat(r.body):sub(1, 300)))
        elseif not r.error then
          r.done, r.text = t, table.concat(r.text)
          -- Chunks carry text: a token whose bytes end mid-character joins the next one, so
          -- the count comes from the usage chunk when the server sends it.
          r.tokens = r.usage_tokens or r.chunks or 0
          open = open - 1
        end
      end
    end
  end
  return records, now() - t0, cjson.null, { model_name = name }
end

-- ------------------------------------------------------------------------- runs

local function sweep_plot(result, png)
  local runs = result.runs
  local rows = {}
  for _, r in ipairs(runs) do
    local function v(x) return x ~= cjson.null and x or 0 / 0 end
    rows[#rows + 1] = { r.rate, v(r.slo_attainment) * 100, r.goodput_rps, v(r.ttft_s.p50) * 1000, v(r.ttft_s.p99) * 1000,
                        v(r.tpot_s.p50) * 1000, v(r.tpot_s.p99) * 1000,
                        r.finetune ~= cjson.null and r.finetune.tokens_per_s or 0 / 0, r.throughput.requests_per_s }
  end
  local cols = { "rate", "attainment_pct", "goodput", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "ft_tok_s",
                 "completed_rps" }
  local panels = {
    { title = "SLO attainment", xlabel = "request rate (req/s)", ylabel = "% of requests", yrange = { 0, 105 },
      lines = { { series = "sweep", x = 1, y = 2, title = "SLO attainment" } } },
    { title = "goodput", xlabel = "request rate (req/s)", ylabel = "req/s",
      lines = { { series = "sweep", x = 1, y = 3, title = "meeting the SLO" },
                { series = "sweep", x = 1, y = 9, title = "completed" } } },
    { title = "TTFT", xlabel = "request rate (req/s)", ylabel = "milliseconds",
      lines = { { series = "sweep", x = 1, y = 4, title = "p50" }, { series = "sweep", x = 1, y = 5, title = "p99" } } },
    { title = "TPOT", xlabel = "request rate (req/s)", ylabel = "milliseconds",
      lines = { { series = "sweep", x = 1, y = 6, title = "p50" }, { series = "sweep", x = 1, y = 7, title = "p99" } } },
  }
  if runs[1].finetune ~= cjson.null then
    panels[#panels + 1] = { title = "finetuning throughput", xlabel = "request rate (req/s)", ylabel = "tokens/s",
                            lines = { { series = "sweep", x = 1, y = 8, title = "finetuning forward tokens/s" } } }
  end
  return plot.render({ png = png, title = "flexllm bench: " .. result.target,
                       series = { { name = "sweep", columns = cols, rows = rows } }, panels = panels })
end

local function run_plot(result, records, png)
  local rows = {}
  for _, r in ipairs(records) do
    if r.done then rows[#rows + 1] = { r.arrival, r.ttft, r.tpot * 1000, r.e2e } end
  end
  table.sort(rows, function(a, b) return a[1] < b[1] end)
  return plot.render({ png = png, title = ("flexllm bench: %s at %g req/s"):format(result.target, result.runs[1].rate),
    series = { { name = "requests", columns = { "arrival", "ttft", "tpot_ms", "e2e" }, rows = rows } },
    panels = {
      { title = "latency per request", xlabel = "arrival (s)", ylabel = "seconds",
        lines = { { series = "requests", x = 1, y = 2, title = "TTFT", style = "points" },
                  { series = "requests", x = 1, y = 4, title = "end to end", style = "points" } } },
      { title = "time per output token", xlabel = "arrival (s)", ylabel = "milliseconds",
        lines = { { series = "requests", x = 1, y = 3, title = "TPOT", style = "points" } } },
    } })
end

-- Runs the benchmark. o (see the CLI's usage): model (a folder) or url; rates (a list);
-- the trace, SLO and output options. Returns the result table (also written to o.out)
-- and the plot's result.
function M.run(o, log)
  log = log or function(s) io.stderr:write(s, "\n") end
  local dataset
  if o.dataset then
    local err
    dataset, err = trace.load_prompts(o.dataset)
    if not dataset then error(err, 0) end
  end
  local model, tok
  if o.model then
    local fl = require "flexllm"
    local err
    model, err = fl.load(o.model, { threads = o.threads })
    if not model then error(err, 0) end
    tok = model.tok
    if not o.policy_path and o.policy ~= "none" then
      o.policy_path, err = M.find_policy(o.policy or "hybrid")
      if not o.policy_path then error(err, 0) end
    end
  elseif o.tokenizer then
    local err
    tok, err = require("flexllm.core").load_tokenizer(o.tokenizer)
    if not tok then error(err, 0) end
  end
  if o.finetune and not model then error("--finetune runs a job in this process: it needs --model, not --url", 0) end
  local slo = { ttft = o.ttft_slo, tpot = o.tpot_slo }
  local result = { mode = model and "in-process" or "http", target = o.model or o.url,
                   policy = o.policy_path or cjson.null, dataset = o.dataset or cjson.null,
                   arrival = o.arrival or "poisson", cv = o.arrival == "gamma" and (o.cv or 1) or cjson.null,
                   seed = o.seed or 1, runs = {} }
  local last_records
  for _, rate in ipairs(o.rates) do
    local ro = {}
    for k, v in pairs(o) do ro[k] = v end
    ro.rate, ro.dataset = rate, dataset
    ro.max_seq = model and model:config().max_seq_len or nil
    local reqs, err = M.build_requests(ro, tok)
    if not reqs then error(err, 0) end
    log(("bench: %d requests at %g req/s (%s arrivals)%s"):format(#reqs, rate, result.arrival,
      o.finetune and (", finetuning on " .. o.finetune) or ""))
    local records, elapsed, ft, extra
    if model then
      records, elapsed, ft, extra = in_process_run(model, reqs, ro, slo)
    else
      records, elapsed, ft, extra = http_run(reqs, ro)
    end
    for _, r in ipairs(records) do M.finish_record(r, slo) end
    local m = M.metrics(records, slo, elapsed)
    m.rate, m.finetune = rate, ft
    for k, v in pairs(extra) do m[k] = v end
    result.runs[#result.runs + 1] = m
    last_records = records
    log(M.format_run(m))
  end
  local out = o.out or "bench.json"
  local png = o.plot or out:gsub("%.json$", "") .. ".png"
  local pl = #o.rates > 1 and sweep_plot(result, png) or run_plot(result, last_records, png)
  result.plot = pl.png or cjson.null
  local f = assert(io.open(out, "wb"))
  f:write(cjson.encode(result), "\n")
  f:close()
  return result, pl, out
end

local function ms(x)
  if x == nil or x == cjson.null then return "-" end
  return ("%." .. (x < 0.01 and 2 or x < 1 and 1 or 0) .. "f"):format(x * 1000)
end

-- One run's figures in a few lines.
function M.format_run(m)
  local lines = {
    ("  rate %g req/s: %d/%d completed, %d errors in %.1f s; SLO attainment %s, goodput %.2f req/s, %.0f output tokens/s")
      :format(m.rate, m.completed, m.requests, m.errors, m.duration_s,
        m.slo_attainment ~= cjson.null and ("%.1f%%"):format(m.slo_attainment * 100) or "-",
        m.goodput_rps, m.throughput.output_tokens_per_s),
  }
  for _, k in ipairs({ { "TTFT", "ttft_s" }, { "TPOT", "tpot_s" }, { "ITL", "itl_s" }, { "end to end", "e2e_s" } }) do
    local s = m[k[2]]
    lines[#lines + 1] = ("    %-10s p50 %7s ms  p90 %7s ms  p99 %7s ms"):format(k[1], ms(s.p50), ms(s.p90), ms(s.p99))
  end
  if m.finetune ~= cjson.null then
    lines[#lines + 1] = ("    finetuning: %.0f tokens/s (%d forward, %d backward tokens), %d steps, loss %.3f")
      :format(m.finetune.tokens_per_s, m.finetune.forward_tokens, m.finetune.backward_tokens, m.finetune.steps,
        m.finetune.loss)
  end
  if m.errors > 0 then lines[#lines + 1] = "    first error: " .. tostring(m.first_error) end
  return table.concat(lines, "\n")
end

-- The command: checks the options (as the CLI parsed them), runs, prints where the
-- results went.
function M.main(o)
  local function bad(msg) error(msg, 0) end
  if o.model and o.url then bad("give --model DIR (in this process) or --url URL (a server), not both") end
  if not o.model and not o.url then bad("--model DIR or --url URL is required") end
  if o.url then
    local ok, err = M.parse_url(o.url)
    if not ok then bad(err) end
    if o.policy then bad("--policy applies in this process only (with --model)") end
  elseif o.api_key or o.model_name then
    bad("--api-key and --model-name apply over HTTP only (with --url)")
  end
  if o.rate and o.rates then bad("give --rate R or --rates R1,R2,..., not both") end
  local rates = {}
  if o.rates then
    for w in o.rates:gmatch("[^,]+") do
      local r = tonumber(w)
      if not r or not (r > 0) then bad(("--rates: '%s' is not a positive rate"):format(w)) end
      rates[#rates + 1] = r
    end
    if #rates == 0 then bad("--rates needs at least one rate") end
  else
    rates[1] = o.rate or 2
  end
  o.rates = rates
  if o.requests and o.duration then bad("give --requests N or --duration S, not both") end
  if not o.duration then o.requests = o.requests or 32 end
  o.arrival = o.arrival or "poisson"
  if o.arrival ~= "poisson" and o.arrival ~= "gamma" then
    bad(("--arrival must be poisson or gamma, got '%s'"):format(o.arrival))
  end
  if o.cv and o.arrival ~= "gamma" then bad("--cv applies to --arrival gamma") end
  if o.dataset and (o.prompt_len) then bad("--prompt-len makes synthetic prompts; it does not go with --dataset") end
  for _, k in ipairs({ "prompt_len", "output_len", "max_prompt_len", "max_output_len", "requests" }) do
    local v = o[k]
    if v ~= nil and (v < 1 or v % 1 ~= 0) then bad(("--%s must be a positive integer, got %s"):format(k:gsub("_", "-"), v)) end
  end
  for _, k in ipairs({ "ttft_slo", "tpot_slo", "duration", "cv" }) do
    local v = o[k]
    if v ~= nil and not (v > 0) then bad(("--%s must be positive, got %s"):format(k:gsub("_", "-"), v)) end
  end
  if o.out and not o.out:match("%.json$") then bad("--out names the JSON file to write (FILE.json)") end
  local result, pl, out = M.run(o)
  print(("results: %s"):format(out))
  if pl.png then print(("plot: %s"):format(pl.png)) else print(("plot: none (%s)"):format(pl.note)) end
  return result
end

return M
