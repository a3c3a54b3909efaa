-- flexllm.server: the OpenAI-compatible server. One thread: the main loop polls the HTTP
-- transport (flexllm.http), hands requests to the routes, steps the co-serving runtime
-- while it has work, and every TICK seconds reloads changed policy and SLO files and
-- advances finetuning jobs.
--
-- Routes are functions of (server, request, writer): a request is the transport's event
-- table (method, path, query, headers, body, conn), a writer answers it (respond, or
-- start_stream / write / finish). Tests drive Server:handle with a writer of their own.
local fl = require "flexllm"
local R = require "flexllm.server.reply"
local openai = require "flexllm.server.openai"
local chat_template = require "flexllm.server.chat_template"
local metrics = require "flexllm.server.metrics"
local files = require "flexllm.server.files"
local jobs = require "flexllm.server.jobs"
local adapters = require "flexllm.adapters"
local slo = require "flexllm.slo"

local M = {}

M.TICK = 0.2 -- seconds between reload checks and job bookkeeping

local Server = {}
Server.__index = Server

local function log(msg) io.stderr:write("flexllm serve: ", msg, "\n") io.stderr:flush() end

local function shell_quote(s) return "'" .. s:gsub("'", "'\\''") .. "'" end

local function mkdirs(dir)
  if os.execute("mkdir -p " .. shell_quote(dir)) ~= 0 then return nil, "cannot create the folder " .. dir end
  return true
end

-- Random ids: "<prefix>-<24 hex digits>", from a generator seeded by /dev/urandom.
local function id_maker()
  local f = io.open("/dev/urandom", "rb")
  local seed = os.time() + math.floor(fl.now() * 1e6) % 2^31
  if f then
    local b = f:read(4)
    f:close()
    seed = seed + b:byte(1) + b:byte(2) * 256 + b:byte(3) * 65536 + b:byte(4) * 16777216
  end
  math.randomseed(seed % 2^31)
  return function(prefix)
    local t = {}
    for i = 1, 6 do t[i] = ("%04x"):format(math.random(0, 65535)) end
    return prefix .. "-" .. table.concat(t)
  end
end

local LIFECYCLE_HOOKS = { on_missing = true, choose_victim = true, on_job_done = true }

-- A lifecycle file returns a table of hooks (see flexllm.adapters).
local function load_lifecycle(path)
  if not path then return {} end
  local chunk, err = loadfile(path)
  if not chunk then return nil, ("--lifecycle %s: %s"):format(path, err) end
  local ok, t = pcall(chunk)
  if not ok then return nil, ("--lifecycle %s: %s"):format(path, tostring(t)) end
  if type(t) ~= "table" then
    return nil, ("--lifecycle %s: must return a table of hooks, returned a %s"):format(path, type(t))
  end
  for k, v in pairs(t) do
    if not LIFECYCLE_HOOKS[k] then
      return nil, ("--lifecycle %s: unknown hook %s (known: on_missing, choose_victim, on_job_done)")
        :format(path, tostring(k))
    end
    if type(v) ~= "function" then
      return nil, ("--lifecycle %s: %s must be a function, got a %s"):format(path, k, type(v))
    end
  end
  return t
end

local function default_data_dir()
  local home = os.getenv("FLEXLLM_HOME")
    or ((os.getenv("XDG_CACHE_HOME") or ((os.getenv("HOME") or "/tmp") .. "/.cache")) .. "/flexllm")
  return ("%s/server/%s-%d"):format(home, os.date("!%Y%m%dT%H%M%S"), math.random(0, 2^30))
end

-- Builds a server. opts: model (folder), threads, kv_pages, max_batch_tokens, max_seqs,
-- policy (file), slo (file), adapters (list of "NAME=DIR"), api_key, data_dir,
-- chat_template (file), lifecycle (file), memory_budget (bytes), max_prompt_tokens, log.
-- Returns a server, or nil and a message.
function M.new(opts)
  local S = setmetatable({ opts = opts, log = opts.log or log, gens = {}, by_conn = {},
                           started_at = os.time(), new_id = id_maker(), last_tick = 0,
                           http_requests = 0, finished = {} }, Server)
  S.clock = fl.now
  S.model_dir = opts.model:gsub("/+$", "")
  S.base = S.model_dir:match("([^/]+)$") or S.model_dir
  local model, err = fl.load(S.model_dir, { threads = opts.threads })
  if not model then return nil, err end
  S.model, S.tok = model, model.tok
  local cfg, info = model:config(), model.tok:info()
  S.max_seq_len, S.vocab_size, S.bos = cfg.max_seq_len, cfg.vocab_size, info.bos
  S.max_prompt_tokens = opts.max_prompt_tokens
  S.ctx, err = model:context({ kv_pages = opts.kv_pages, max_batch_tokens = opts.max_batch_tokens,
                               max_seqs = opts.max_seqs })
  if not S.ctx then return nil, err end

  S.slo_watch, err = slo.watch(opts.slo)
  if not S.slo_watch then return nil, err end
  S.tracker = slo.tracker()
  -- No global rule in the runtime: every request carries the whole rule it matched (an
  -- absent bound is 0 = none, which a global rule would otherwise fill in), and rule
  -- files reload without touching the runtime.
  S.rt, err = S.ctx:runtime({ policy = opts.policy })
  if not S.rt then return nil, err end

  S.template, err = chat_template.for_model(S.model_dir, opts.chat_template, info)
  if not S.template then return nil, err end
  S.end_of_turn = {}
  for _, text in ipairs(S.template.end_of_turn) do
    local ids = model.tok:encode(text, { bos = false })
    if #ids == 1 and ids[1] ~= info.eos then S.end_of_turn[ids[1]] = true end
  end

  S.hooks, err = load_lifecycle(opts.lifecycle)
  if not S.hooks then return nil, err end
  local _, kv_total = S.ctx:kv_pages()
  -- K and V in fp32, FL_KV_PAGE_TOKENS (16) tokens a page, as fl_context_new sizes the pool
  S.kv_bytes = 2 * cfg.n_layers * 16 * cfg.n_kv_heads * cfg.head_dim * 4 * kv_total
  local budget
  if opts.memory_budget then
    budget = opts.memory_budget - S.kv_bytes
    if budget <= 0 then
      return nil, ("--memory-budget %d bytes leaves nothing for adapters: the KV pool alone takes %d bytes")
        :format(opts.memory_budget, S.kv_bytes)
    end
  end
  S.adapters = adapters.new({ load = function(dir) return model:load_adapter(dir) end, budget = budget,
                              hooks = S.hooks, log = S.log })
  for _, spec in ipairs(opts.adapters or {}) do
    local name, dir = spec:match("^([^=]+)=(.+)$")
    if not name then return nil, ("--adapter %s: expected NAME=DIR"):format(spec) end
    if name == S.base then return nil, ("--adapter %s: the name is the base model's"):format(spec) end
    local ok, aerr = S.adapters:add(name, dir)
    if not ok then return nil, ("--adapter %s: %s"):format(spec, aerr) end
    local h, e = S.adapters:acquire(name) -- loads it now, so a bad folder fails at start
    if not h then return nil, ("--adapter %s: %s"):format(spec, e) end
    S.adapters:release(e)
  end

  S.data_dir = opts.data_dir or default_data_dir()
  local ok, derr = mkdirs(S.data_dir .. "/files")
  if ok then ok, derr = mkdirs(S.data_dir .. "/jobs") end
  if not ok then return nil, "--data-dir: " .. derr end
  S.files = files.store(S.data_dir .. "/files", S.new_id)
  local function publish(name, dir)
    local pok, perr = S.adapters:add(name, dir)
    if not pok then error(perr, 0) end
  end
  S.jobs = jobs.new({ ctx = S.ctx, rt = S.rt, files = S.files, base = S.base, base_dir = S.model_dir,
                      dir = S.data_dir .. "/jobs", new_id = S.new_id, now = os.time, clock = S.clock,
                      publish = publish, log = S.log,
                      on_job_done = S.hooks.on_job_done or function(job) publish(job.fine_tuned_model, job.adapter_dir) end })
  S.hist = { ttft = metrics.histogram(metrics.LATENCY_BUCKETS), tpot = metrics.histogram(metrics.LATENCY_BUCKETS),
             e2e = metrics.histogram(metrics.LATENCY_BUCKETS) }
  S.api_key = opts.api_key
  return S
end

function Server:model_names()
  local names = { self.base }
  for _, a in ipairs(self.adapters:list()) do names[#names + 1] = a.name end
  return names
end

-- The key of an "Authorization: Bearer KEY" header, or nil.
local function bearer(req)
  local auth = req.headers and req.headers.authorization
  return auth and auth:match("^[Bb]earer%s+(.-)%s*$") or nil
end

-- The tenant SLO rules match: the X-Tenant header, else the API key the client sent.
function Server:tenant(req)
  local t = req.headers and req.headers["x-tenant"]
  if t and t ~= "" then return t end
  return bearer(req)
end

---------------------------------------------------------------------------- generation

local SSE_HEADERS = { ["content-type"] = "text/event-stream", ["cache-control"] = "no-cache" }

-- One server-sent event: a JSON text (a chunk, an error) or [DONE].
local function sse(w, payload) return w:write("data: " .. payload .. "\n\n") end

-- Submits a request: g holds its kind (text_completion or chat.completion), model name,
-- writer, conn, stream, include_usage, prefix (echoed prompt), end_of_turn ids, tenant;
-- p the runtime's request options.
function Server:generate(g, ids, p)
  local adapter_name = g.model ~= self.base and g.model or nil
  if adapter_name then
    local h, entry, status = self.adapters:acquire(adapter_name)
    if not h then
      if status == 404 then
        R.fail(404, ("The model '%s' does not exist; known models: %s"):format(g.model,
          table.concat(self:model_names(), ", ")), "model", "model_not_found")
      end
      R.fail(status, entry, "model", status == 503 and "adapter_memory_exhausted" or "adapter_load_failed")
    end
    g.handle, g.entry = h, entry
  end
  g.rule = self.slo_watch:rules():match({ adapter = adapter_name, tenant = g.tenant })
  p.adapter, p.ttft_slo, p.tpot_slo = g.handle, g.rule.ttft, g.rule.tpot
  local ok, rid, err = pcall(self.rt.submit, self.rt, ids, p)
  if not ok or not rid then
    if g.entry then self.adapters:release(g.entry) end
    R.fail(400, tostring(ok and err or rid), nil, "request_rejected")
  end
  g.rid, g.prompt_tokens, g.completion_tokens, g.text = rid, #ids, 0, {}
  g.id = self.new_id(g.kind == "chat.completion" and "chatcmpl" or "cmpl")
  g.created, g.t0 = os.time(), self.clock()
  g.end_of_turn = g.end_of_turn or {}
  self.gens[rid] = g
  if g.conn then self.by_conn[g.conn] = g end
  if g.stream then
    g.w:start_stream(200, SSE_HEADERS)
    if g.prefix and g.prefix ~= "" then self:emit(g, g.prefix) end
  elseif g.prefix then
    g.text[1] = g.prefix
  end
end

local function count(t, k) t[k] = (t[k] or 0) + 1 end

-- Takes a request off the books: its adapter released, its latencies recorded.
function Server:retire(g, reason)
  self.gens[g.rid] = nil
  if g.conn then self.by_conn[g.conn] = nil end
  if g.entry then self.adapters:release(g.entry) end
  g.entry, g.handle = nil, nil
  count(self.finished, reason)
  if reason == "cancelled" or reason == "error" then return end
  local now = self.clock()
  local ttft = (g.t_first or now) - g.t0
  local tpot = g.completion_tokens > 1 and (now - g.t_first) / (g.completion_tokens - 1) or nil
  self.hist.ttft:observe(ttft)
  if tpot then self.hist.tpot:observe(tpot) end
  self.hist.e2e:observe(now - g.t0)
  local rule = g.rule
  local met = (rule.ttft == 0 or ttft <= rule.ttft) and (rule.tpot == 0 or not tpot or tpot <= rule.tpot)
  self.tracker:record(rule.name, met)
end

-- The client is gone: the runtime drops the request.
function Server:abandon(g)
  self.rt:cancel(g.rid)
  self:retire(g, "cancelled")
end

-- New text for a request: a chunk when streaming, else kept for the answer.
function Server:emit(g, text)
  if not g.stream then
    g.text[#g.text + 1] = text
    return true
  end
  if not sse(g.w, R.encode(openai.chunk(g, text))) then
    self:abandon(g)
    return false
  end
  return true
end

function Server:complete(g, finish)
  self:retire(g, finish)
  if g.stream then
    local w = g.w
    if sse(w, R.encode(openai.chunk(g, nil, finish)))
      and (not g.include_usage or sse(w, R.encode(openai.usage_chunk(g)))) and sse(w, "[DONE]") then
      w:finish()
    end
  else
    R.send_json(g.w, 200, openai.answer(g, table.concat(g.text), finish))
  end
end

-- Hands one iteration's events to their requests.
function Server:dispatch(events)
  local now = self.clock()
  for _, ev in ipairs(events) do
    local g = self.gens[ev.request]
    if g then
      g.t_first = g.t_first or now
      if g.end_of_turn[ev.token] then
        self.rt:cancel(g.rid) -- the model ended its turn with a token that is not EOS
        self:complete(g, "stop")
      else
        if not ev.eos then g.completion_tokens = g.completion_tokens + 1 end
        local alive = ev.text == "" or self:emit(g, ev.text) -- false: the client went away
        if alive and ev.finish then self:complete(g, ev.finish) end
      end
    end
  end
end

-- One runtime iteration when there is work. A failing iteration fails the requests in
-- flight (the runtime's state is unknown) rather than retrying forever.
function Server:step()
  if self.rt:active() == 0 then return false end
  local events, err = self.rt:step()
  if not events then
    self.log("iteration failed: " .. tostring(err))
    for _, g in pairs(self.gens) do
      self.rt:cancel(g.rid)
      self:retire(g, "error")
      local message = "generation failed: " .. tostring(err)
      if g.stream then
        sse(g.w, R.error_body(500, message))
        g.w:finish()
      else
        R.send_error(g.w, 500, message)
      end
    end
    return true
  end
  self:dispatch(events)
  return true
end

-- A connection closed while its answer was pending or streaming.
function Server:closed(conn)
  local g = self.by_conn[conn]
  if g then self:abandon(g) end
end

-- Every TICK: the policy and SLO files, finetuning jobs.
function Server:tick()
  self.last_tick = self.clock()
  if self.opts.policy then
    local ok, err = self.rt:poll_reload(M.TICK)
    if ok == nil then
      if err ~= self.policy_error then self.log("policy reload failed: " .. tostring(err)) end
      self.policy_error = err
    elseif ok then
      self.policy_error = nil
      self.log("policy reloaded from " .. self.opts.policy)
    end
  end
  local slo_error = self.slo_watch.last_error
  if self.slo_watch:poll() then self.log("SLO rules reloaded from " .. self.opts.slo)
  elseif self.slo_watch.last_error and self.slo_watch.last_error ~= slo_error then
    self.log("SLO rules reload failed: " .. self.slo_watch.last_error)
  end
  self.jobs:tick()
end

---------------------------------------------------------------------------- other routes

local function admin_reload(S, req, w)
  local out, ok = { ok = true }, true
  if S.opts.policy then
    local rok, err = S.rt:reload(S.opts.policy)
    S.policy_error = not rok and err or nil
    out.policy = { path = S.opts.policy, ok = rok == true, error = rok and R.null or err }
    ok = ok and rok == true
  else
    out.policy = { path = R.null, ok = true, error = R.null, note = "no --policy: the built-in plan" }
  end
  if S.opts.slo then
    local sok, err = S.slo_watch:reload()
    out.slo = { path = S.opts.slo, ok = sok == true, error = sok and R.null or err,
                rules = #S.slo_watch:rules():list() }
    ok = ok and sok == true
  else
    out.slo = { path = R.null, ok = true, error = R.null, note = "no --slo: no rules" }
  end
  out.ok = ok
  if not ok then
    local msgs = {}
    if not out.policy.ok then msgs[#msgs + 1] = "policy: " .. out.policy.error end
    if not out.slo.ok then msgs[#msgs + 1] = "slo: " .. out.slo.error end
    out.error = { message = "reload failed (the previous files stay in force): " .. table.concat(msgs, "; "),
                  type = "invalid_request_error", param = R.null, code = "reload_failed" }
  end
  R.send_json(w, ok and 200 or 400, out)
end

function Server:queue_lengths()
  local waiting, running = 0, 0
  for _, g in pairs(self.gens) do
    if g.t_first then running = running + 1 else waiting = waiting + 1 end
  end
  return waiting, running
end

local function admin_status(S, req, w)
  local st = S.rt:stats()
  local waiting, running = S:queue_lengths()
  local free, total = S.ctx:kv_pages()
  local resident, known = {}, {}
  for _, a in ipairs(S.adapters:list()) do
    known[#known + 1] = { name = a.name, dir = a.dir }
    if a.resident then
      resident[#resident + 1] = { name = a.name, bytes = a.bytes, in_use = a.in_use, last_used = a.last_used }
    end
  end
  local job_list = {}
  for _, j in ipairs(S.jobs:summary()) do
    job_list[#job_list + 1] = { id = j.id, status = j.status, step = j.step, total_steps = j.total_steps,
                                trained_tokens = j.tokens, loss = R.finite(j.loss),
                                tokens_per_second = j.tokens_per_second, fine_tuned_model = j.fine_tuned_model }
  end
  R.send_json(w, 200, {
    model = { id = S.base, dir = S.model_dir, chat_template = S.template.name, max_model_len = S.max_seq_len },
    policy = { path = S.opts.policy or R.null, disabled = st.policy_disabled,
               last_error = S.policy_error or (st.policy_error ~= "" and st.policy_error) or R.null,
               reloads = st.reloads, calls = st.policy_calls, failures = st.policy_failures,
               fallback_iterations = st.fallback_iterations },
    slo = { path = S.opts.slo or R.null, rules = S.slo_watch:rules():list(), reloads = S.slo_watch.reloads,
            last_error = S.slo_watch.last_error or R.null, attainment = S.tracker:report() },
    adapters = { budget_bytes = S.adapters.budget or R.null, resident_bytes = S.adapters:resident_bytes(),
                 resident = R.array(resident), known = R.array(known), loads = S.adapters.loads,
                 evictions = S.adapters.evictions },
    jobs = R.array(job_list),
    requests = { waiting = waiting, running = running, finished = S.finished },
    kv_pages = { used = total - free, total = total, bytes = S.kv_bytes },
    data_dir = S.data_dir, uptime_seconds = os.time() - S.started_at,
  })
end

local function render_metrics(S)
  local p = metrics.page()
  local st = S.rt:stats()
  p:family("flexllm_time_to_first_token_seconds", "histogram", "Seconds from a request's arrival to its first token.")
  p:histogram("flexllm_time_to_first_token_seconds", nil, S.hist.ttft)
  p:family("flexllm_time_per_output_token_seconds", "histogram", "Seconds per output token after the first, per request.")
  p:histogram("flexllm_time_per_output_token_seconds", nil, S.hist.tpot)
  p:family("flexllm_e2e_request_latency_seconds", "histogram", "Seconds from a request's arrival to its last token.")
  p:histogram("flexllm_e2e_request_latency_seconds", nil, S.hist.e2e)
  local waiting, running = S:queue_lengths()
  p:single("flexllm_requests_waiting", "gauge", "Requests submitted that have no token yet.", waiting)
  p:single("flexllm_requests_running", "gauge", "Requests generating tokens.", running)
  p:family("flexllm_requests_finished_total", "counter", "Requests finished, by finish reason (stop, length, cancelled, error).")
  local reasons = {}
  for k in pairs(S.finished) do reasons[#reasons + 1] = k end
  table.sort(reasons)
  for _, k in ipairs(reasons) do p:sample("flexllm_requests_finished_total", { reason = k }, S.finished[k]) end
  p:single("flexllm_http_requests_total", "counter", "HTTP requests handled.", S.http_requests)
  local free, total = S.ctx:kv_pages()
  p:single("flexllm_kv_pages_used", "gauge", "KV cache pages in use.", total - free)
  p:single("flexllm_kv_pages_total", "gauge", "KV cache pages in the pool.", total)
  p:single("flexllm_iterations_total", "counter", "Runtime iterations.", st.iterations)
  p:single("flexllm_busy_seconds_total", "counter", "Seconds spent in runtime iterations.", st.busy_seconds)
  p:single("flexllm_preemptions_total", "counter", "Requests preempted for KV pages (and recomputed).", st.preemptions)
  p:single("flexllm_policy_seconds_total", "counter", "Seconds spent in scheduling policy calls.", st.policy_seconds)
  p:single("flexllm_policy_calls_total", "counter", "Scheduling policy calls.", st.policy_calls)
  p:single("flexllm_policy_failures_total", "counter", "Policy calls that failed or gave an invalid plan.", st.policy_failures)
  p:single("flexllm_policy_fallback_iterations_total", "counter", "Iterations run on the built-in plan after a policy failure.", st.fallback_iterations)
  p:single("flexllm_policy_disabled", "gauge", "1 when the policy was disabled after repeated failures.", st.policy_disabled and 1 or 0)
  p:single("flexllm_policy_reloads_total", "counter", "Policy reloads.", st.reloads)
  p:single("flexllm_finetune_forward_tokens_total", "counter", "Finetuning tokens through the forward pass.", st.ft_forward_tokens)
  p:single("flexllm_finetune_backward_tokens_total", "counter", "Finetuning tokens through the backward pass.", st.ft_backward_tokens)
  local js = S.jobs:summary()
  p:family("flexllm_finetune_tokens_per_second", "gauge", "Finetuning throughput per job over the last second or more.")
  for _, j in ipairs(js) do p:sample("flexllm_finetune_tokens_per_second", { job = j.id }, j.tokens_per_second) end
  p:family("flexllm_finetune_loss", "gauge", "Training loss of each job's last optimizer step.")
  for _, j in ipairs(js) do if j.loss then p:sample("flexllm_finetune_loss", { job = j.id }, j.loss) end end
  p:family("flexllm_finetune_trained_tokens", "gauge", "Tokens each job has trained on.")
  for _, j in ipairs(js) do p:sample("flexllm_finetune_trained_tokens", { job = j.id }, j.tokens) end
  p:family("flexllm_finetune_step", "gauge", "Optimizer steps each job has taken.")
  for _, j in ipairs(js) do p:sample("flexllm_finetune_step", { job = j.id }, j.step) end
  local report, rules = S.tracker:report(), {}
  for name in pairs(report) do rules[#rules + 1] = name end
  table.sort(rules)
  p:family("flexllm_slo_attainment", "gauge", "Fraction of finished requests that met their SLO rule.")
  for _, r in ipairs(rules) do p:sample("flexllm_slo_attainment", { rule = r }, report[r].attainment) end
  p:family("flexllm_slo_requests_total", "counter", "Finished requests per SLO rule.")
  for _, r in ipairs(rules) do p:sample("flexllm_slo_requests_total", { rule = r }, report[r].requests) end
  p:family("flexllm_slo_met_total", "counter", "Finished requests that met their SLO rule.")
  for _, r in ipairs(rules) do p:sample("flexllm_slo_met_total", { rule = r }, report[r].met) end
  p:single("flexllm_adapters_known", "gauge", "Adapters the server can serve.", #S.adapters:list())
  p:single("flexllm_adapter_resident_bytes", "gauge", "Bytes of adapters resident in memory.", S.adapters:resident_bytes())
  p:single("flexllm_adapter_loads_total", "counter", "Adapter loads.", S.adapters.loads)
  p:single("flexllm_adapter_evictions_total", "counter", "Adapters evicted to stay within the memory budget.", S.adapters.evictions)
  return p:text()
end

local function metrics_route(S, req, w)
  w:respond(200, { ["content-type"] = metrics.CONTENT_TYPE }, render_metrics(S))
end

-- vLLM's dynamic LoRA routes: plain-text success, JSON errors.
local function load_lora(S, req, w)
  local body = R.json_body(req)
  local name = R.string(body, "lora_name")
  local path = R.string(body, "lora_path")
  if not name or name == "" then R.fail(400, "'lora_name' is required", "lora_name", "missing_field") end
  if not path or path == "" then R.fail(400, "'lora_path' is required", "lora_path", "missing_field") end
  if name == S.base then R.fail(400, ("'lora_name' '%s' is the base model's name"):format(name), "lora_name") end
  if S.adapters:has(name) then
    R.fail(400, ("The lora adapter '%s' has already been loaded."):format(name), "lora_name", "adapter_exists")
  end
  S.adapters:add(name, path)
  local h, entry, status = S.adapters:acquire(name)
  if not h and status ~= 503 then
    S.adapters:remove(name)
    R.fail(400, entry, "lora_path", "adapter_load_failed")
  end
  local note = ""
  if h then S.adapters:release(entry) else note = " (not resident yet: " .. entry .. ")" end
  w:respond(200, { ["content-type"] = "text/plain; charset=utf-8" },
    ("Success: LoRA adapter '%s' added successfully.%s"):format(name, note))
end

local function unload_lora(S, req, w)
  local body = R.json_body(req)
  local name = R.string(body, "lora_name")
  if not name or name == "" then R.fail(400, "'lora_name' is required", "lora_name", "missing_field") end
  if not S.adapters:remove(name) then
    R.fail(404, ("The lora adapter '%s' cannot be found."):format(name), "lora_name", "adapter_not_found")
  end
  w:respond(200, { ["content-type"] = "text/plain; charset=utf-8" },
    ("Success: LoRA adapter '%s' removed successfully."):format(name))
end

local function health(S, req, w) w:respond(200, { ["content-type"] = "text/plain" }, "ok") end

local function file_route(method)
  return function(S, req, w, query, id) return S.files[method](S.files, req, w, id) end
end

local function job_route(method)
  return function(S, req, w, query, id) return S.jobs[method](S.jobs, req, w, query, id) end
end

-- { pattern, { METHOD = handler(S, req, w, query, capture) } }
local ROUTES = {
  { "^/v1/completions$", { POST = openai.completions } },
  { "^/v1/chat/completions$", { POST = openai.chat } },
  { "^/v1/models$", { GET = openai.models } },
  { "^/v1/models/(.+)$", { GET = openai.model } },
  { "^/v1/files$", { GET = file_route("list"), POST = file_route("upload") } },
  { "^/v1/files/([^/]+)$", { GET = file_route("retrieve"), DELETE = file_route("delete") } },
  { "^/v1/files/([^/]+)/content$", { GET = file_route("content") } },
  { "^/v1/fine_tuning/jobs$", { GET = job_route("list"), POST = job_route("create") } },
  { "^/v1/fine_tuning/jobs/([^/]+)$", { GET = job_route("retrieve") } },
  { "^/v1/fine_tuning/jobs/([^/]+)/events$", { GET = job_route("events") } },
  { "^/v1/fine_tuning/jobs/([^/]+)/cancel$", { POST = job_route("cancel") } },
  { "^/v1/load_lora_adapter$", { POST = load_lora } },
  { "^/v1/unload_lora_adapter$", { POST = unload_lora } },
  { "^/metrics$", { GET = metrics_route } },
  { "^/health$", { GET = health } },
  { "^/admin/reload$", { POST = admin_reload } },
  { "^/admin/status$", { GET = admin_status } },
}

local function percent_decode(s)
  return (s:gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
end

-- A query is form-encoded: '+' stands for a space there (in a path it is itself).
local function parse_query(q)
  local t = {}
  for pair in (q or ""):gmatch("[^&]+") do
    local k, v = pair:gsub("%+", " "):match("^([^=]*)=?(.*)$")
    t[percent_decode(k)] = percent_decode(v)
  end
  return t
end

-- Compares without an early exit, so timing does not tell how much of a key matched.
local function same_secret(a, b)
  if #a ~= #b then return false end
  local diff = 0
  for i = 1, #a do diff = bit.bor(diff, bit.bxor(a:byte(i), b:byte(i))) end
  return diff == 0
end

local function authorize(S, req)
  if not S.api_key then return end
  local path = req.path
  if not (path:find("^/v1/") or path:find("^/admin/")) then return end
  local key = bearer(req)
  if not key then
    R.fail(401, "You didn't provide an API key: send it as 'Authorization: Bearer YOUR_KEY'", nil, "missing_api_key")
  end
  if not same_secret(key, S.api_key) then R.fail(401, "Incorrect API key provided.", nil, "invalid_api_key") end
end

local function route(S, req, w)
  authorize(S, req)
  local path = req.path
  for _, r in ipairs(ROUTES) do
    local cap = path:match(r[1])
    if cap then
      local h = r[2][req.method]
      if not h then
        local allow = {}
        for m in pairs(r[2]) do allow[#allow + 1] = m end
        table.sort(allow)
        R.send_error(w, 405, ("%s %s is not allowed; use %s"):format(req.method, path, table.concat(allow, " or ")),
          nil, "method_not_allowed", { allow = table.concat(allow, ", ") })
        return
      end
      return h(S, req, w, parse_query(req.query), cap ~= path and percent_decode(cap) or nil)
    end
  end
  R.fail(404, ("no route for %s %s"):format(req.method, path), nil, "not_found")
end

local function traceback(e)
  if R.is_error(e) then return e end
  return debug.traceback(tostring(e), 2)
end

-- Answers one request. A route's OpenAI error becomes its answer; any other error is a
-- bug, logged and answered 500, and the server goes on.
function Server:handle(req, w)
  self.http_requests = self.http_requests + 1
  local ok, err = xpcall(route, traceback, self, req, w)
  if ok then return end
  local g = req.conn and self.by_conn[req.conn]
  if g then self:abandon(g) end -- it failed after its request was submitted
  local known = R.is_error(err)
  if not known then self.log(("internal error in %s %s: %s"):format(req.method, req.path, err)) end
  local status = known and err.status or 500
  local message = known and err.message or "internal server error: " .. (tostring(err):match("^[^\n]*"))
  if w.streaming then -- the status line is out: end the stream with an error event
    pcall(sse, w, R.error_body(status, message))
    pcall(w.finish, w)
  elseif known then
    R.send_error(w, status, message, err.param, err.code, status == 401 and { ["www-authenticate"] = "Bearer" } or nil)
  else
    pcall(R.send_error, w, status, message, nil, "internal_error")
  end
end

---------------------------------------------------------------------------- main loop

local Writer = {}
Writer.__index = Writer

function Writer:respond(status, headers, body) return self.srv:respond(self.conn, status, headers, body) end
function Writer:start_stream(status, headers)
  self.streaming = true
  return self.srv:start_stream(self.conn, status, headers)
end
function Writer:write(data) return self.srv:write(self.conn, data) end
function Writer:finish() return self.srv:finish(self.conn) end

-- Serves until SIGINT or SIGTERM. opts: as for M.new, plus host, port, max_body_bytes.
-- Returns 0, or nil and a message when the server cannot start.
function M.run(opts)
  local http, core = require "flexllm.http", fl.core
  core.watch_signals() -- from the start: a signal while the model loads stops us cleanly too
  local S, err = M.new(opts)
  if not S then return nil, err end
  local host = opts.host or "127.0.0.1"
  local srv, lerr = http.listen({ host = host, port = opts.port or 8000,
                                  max_body_bytes = opts.max_body_bytes or 64 * 1024 * 1024 })
  if not srv then return nil, ("cannot listen on %s:%s: %s"):format(host, tostring(opts.port or 8000), lerr) end
  S.log(("model %s (%s), data in %s"):format(S.model_dir, S.template.note, S.data_dir))
  io.stdout:write(("listening on http://%s:%d\n"):format(host:find(":") and "[" .. host .. "]" or host, srv:port()))
  io.stdout:flush()
  while not core.signalled() do
    local busy = S.rt:active() > 0
    for _, ev in ipairs(srv:poll(busy and 0 or 0.05)) do
      if ev.kind == "request" then
        S:handle(ev, setmetatable({ srv = srv, conn = ev.conn }, Writer))
      elseif ev.kind == "closed" then
        S:closed(ev.conn)
      end
    end
    S:step()
    if S.clock() - S.last_tick >= M.TICK then S:tick() end
  end
  S.log("signal received: shutting down")
  srv:close()
  return 0
end

return M
