-- flexllm.server.jobs: OpenAI fine-tuning jobs on the co-serving runtime. A job is
-- validated when created, answered as "validating_files", built (the dataset loads) at the
-- next tick and handed to the runtime ("queued"), "running" once it has trained a token,
-- and "succeeded" when its adapter is written: that PEFT folder (under the data dir) is
-- then published under the job's fine_tuned_model name, ft:<base>[:<suffix>]:<id>.
--
-- Hyperparameters: n_epochs (default 1), batch_size (samples per optimizer step, the
-- engine's grad_accum; default 1), learning_rate_multiplier (times BASE_LR; default 1), and
-- ours: lora_rank (8), lora_alpha (16), lora_targets ("q,v"; a list or comma string of q,
-- k, v, o, gate, up, down or all), seq_len (256, longest sample in tokens).
local R = require "flexllm.server.reply"

local M = {}

M.BASE_LR = 1e-3

local TARGETS = { q = 1, k = 1, v = 1, o = 1, gate = 1, up = 1, down = 1, all = 1, q_proj = 1,
                  k_proj = 1, v_proj = 1, o_proj = 1, gate_proj = 1, up_proj = 1, down_proj = 1 }

local FINISHED = { succeeded = true, failed = true, cancelled = true }

local Jobs = {}
Jobs.__index = Jobs

-- env: ctx, rt (the runtime), files (the file store), base (the base model's name),
-- base_dir, dir (where job folders go), new_id(prefix), now() (unix seconds), clock()
-- (monotonic seconds), on_job_done(job, publish), publish(name, dir), log(message).
function M.new(env)
  return setmetatable({ env = env, jobs = {}, order = {} }, Jobs)
end

-- "auto" or absent -> def; else an integer/number within bounds.
local function auto_int(hp, key, def, name)
  if hp[key] == "auto" then return def end
  return R.range(name, R.integer(hp, key, def, name), 1)
end

local function targets_of(hp)
  local v = hp.lora_targets
  if v == nil or v == R.null then return "q,v" end
  local list = {}
  if type(v) == "string" then
    for t in v:gmatch("[^,%s]+") do list[#list + 1] = t end
  elseif type(v) == "table" and v[1] ~= nil then
    for i, t in ipairs(v) do
      if type(t) ~= "string" then
        R.fail(400, ("'hyperparameters.lora_targets[%d]' must be a string"):format(i - 1),
          "hyperparameters.lora_targets", "invalid_type")
      end
      list[#list + 1] = t
    end
  else
    R.fail(400, "'hyperparameters.lora_targets' must be a string such as \"q,v\" or a list of names",
      "hyperparameters.lora_targets", "invalid_type")
  end
  if #list == 0 then R.fail(400, "'hyperparameters.lora_targets' is empty", "hyperparameters.lora_targets") end
  for _, t in ipairs(list) do
    if not TARGETS[t] then
      R.fail(400, ("'hyperparameters.lora_targets': unknown target '%s' (known: q, k, v, o, gate, up, "
        .. "down, all)"):format(t), "hyperparameters.lora_targets", "invalid_value")
    end
  end
  return table.concat(list, ",")
end

-- The hyperparameters of a create request (top level, or OpenAI's method.supervised).
local function hyperparameters(body)
  local hp = R.object(body, "hyperparameters", "hyperparameters")
  local method = R.object(body, "method", "method")
  if method then
    local kind = R.string(method, "type", nil, "method.type")
    if kind ~= "supervised" then
      R.fail(400, ("'method.type' must be \"supervised\" (the only method this server trains), got %s")
        :format(kind and ("'" .. kind .. "'") or "nothing"), "method.type", "invalid_value")
    end
    local sup = R.object(method, "supervised", "method.supervised")
    local mhp = sup and R.object(sup, "hyperparameters", "method.supervised.hyperparameters")
    if mhp and hp then
      R.fail(400, "give hyperparameters either at the top level or in method.supervised, not both",
        "hyperparameters")
    end
    hp = hp or mhp
  end
  hp = hp or {}
  local out = {
    n_epochs = auto_int(hp, "n_epochs", 1, "hyperparameters.n_epochs"),
    batch_size = auto_int(hp, "batch_size", 1, "hyperparameters.batch_size"),
    lora_rank = R.range("hyperparameters.lora_rank",
      R.integer(hp, "lora_rank", 8, "hyperparameters.lora_rank"), 1, 1024),
    lora_targets = targets_of(hp),
    seq_len = R.range("hyperparameters.seq_len", R.integer(hp, "seq_len", 256, "hyperparameters.seq_len"), 2),
  }
  if hp.learning_rate_multiplier == "auto" then
    out.learning_rate_multiplier = 1
  else
    local m = R.number(hp, "learning_rate_multiplier", 1, "hyperparameters.learning_rate_multiplier")
    if m <= 0 or m ~= m or m > 1e3 then
      R.fail(400, "'hyperparameters.learning_rate_multiplier' must be a number in (0, 1000]",
        "hyperparameters.learning_rate_multiplier", "invalid_value")
    end
    out.learning_rate_multiplier = m
  end
  local alpha = R.number(hp, "lora_alpha", 2 * out.lora_rank, "hyperparameters.lora_alpha")
  if alpha <= 0 or alpha ~= alpha then
    R.fail(400, "'hyperparameters.lora_alpha' must be positive", "hyperparameters.lora_alpha", "invalid_value")
  end
  out.lora_alpha = alpha
  return out
end

local function add_event(job, env, message, level, data)
  job.events[#job.events + 1] = {
    object = "fine_tuning.job.event", id = env.new_id("ftevent"), created_at = env.now(),
    level = level or "info", message = message, data = data or {},
    type = data and "metrics" or "message",
  }
end

-- POST /v1/fine_tuning/jobs
function Jobs:create(req, w)
  local env = self.env
  local body = R.json_body(req)
  local model = R.string(body, "model")
  if not model then R.fail(400, "'model' is required: the base model to finetune", "model", "missing_field") end
  if model ~= env.base then
    R.fail(400, ("'model': finetuning starts from the base model '%s'; '%s' is not it"):format(env.base, model),
      "model", "model_not_found")
  end
  local file_id = R.string(body, "training_file")
  if not file_id then R.fail(400, "'training_file' is required (a file id from POST /v1/files)", "training_file",
    "missing_field") end
  if not env.files:get(file_id) then
    R.fail(400, ("invalid training_file: no such file '%s'"):format(file_id), "training_file", "invalid_file")
  end
  if R.string(body, "validation_file") then
    R.fail(400, "'validation_file' is not supported: this server trains on training_file only", "validation_file")
  end
  local suffix = R.string(body, "suffix")
  if suffix and (#suffix > 64 or not suffix:match("^[%w%-_%.]+$")) then
    R.fail(400, "'suffix' must be 1 to 64 letters, digits, '-', '_' or '.'", "suffix", "invalid_value")
  end
  local seed = R.integer(body, "seed", nil)
  if seed then R.range("seed", seed, 0, 2^53) end
  local hp = hyperparameters(body)
  local id = env.new_id("ftjob")
  local job = {
    object = "fine_tuning.job", id = id, model = model, created_at = env.now(),
    finished_at = R.null, fine_tuned_model = R.null, organization_id = "org-flexllm",
    result_files = R.array({}), status = "validating_files", validation_file = R.null,
    training_file = file_id, hyperparameters = hp, trained_tokens = R.null, error = R.null,
    user_provided_suffix = suffix or R.null, seed = seed or 0, estimated_finish = R.null,
    integrations = R.array({}),
  }
  self.jobs[id] = { public = job, events = {}, out = env.dir .. "/" .. id }
  self.order[#self.order + 1] = id
  add_event(self.jobs[id], env, ("Validating training file: %s"):format(file_id))
  R.send_json(w, 200, job)
end

local function get(self, id)
  local j = self.jobs[id]
  if not j then R.fail(404, ("no such fine-tuning job: '%s'"):format(id), "fine_tuning_job_id", "not_found") end
  return j
end

-- OpenAI pagination over a newest-first list: after (an id), limit.
local function page(list, query, id_of)
  local after = query.after
  local limit = tonumber(query.limit or 20)
  if not limit or limit < 1 or limit ~= math.floor(limit) then
    R.fail(400, ("'limit' must be a positive integer, got '%s'"):format(tostring(query.limit)), "limit")
  end
  limit = math.min(limit, 100)
  local start = 1
  if after then
    start = nil
    for i, v in ipairs(list) do if id_of(v) == after then start = i + 1 break end end
    if not start then R.fail(400, ("'after': no such id '%s'"):format(after), "after") end
  end
  local data = {}
  for i = start, math.min(#list, start + limit - 1) do data[#data + 1] = list[i] end
  return { object = "list", data = R.array(data), has_more = start + limit - 1 < #list }
end

function Jobs:list(req, w, query)
  local list = {}
  for i = #self.order, 1, -1 do list[#list + 1] = self.jobs[self.order[i]].public end
  R.send_json(w, 200, page(list, query, function(j) return j.id end))
end

function Jobs:retrieve(req, w, query, id) R.send_json(w, 200, get(self, id).public) end

function Jobs:events(req, w, query, id)
  local j, list = get(self, id), {}
  for i = #j.events, 1, -1 do list[#list + 1] = j.events[i] end
  R.send_json(w, 200, page(list, query, function(e) return e.id end))
end

local function finish(self, j, status, err)
  local env, job = self.env, j.public
  job.status = status
  job.finished_at = env.now()
  if err then job.error = err end
  if j.engine_id and j.handle then job.trained_tokens = j.handle:progress().tokens end
end

function Jobs:cancel(req, w, query, id)
  local j = get(self, id)
  local job = j.public
  if FINISHED[job.status] then
    R.fail(400, ("the job %s has already finished (%s)"):format(id, job.status), "fine_tuning_job_id", "invalid_state")
  end
  if j.engine_id then self.env.rt:cancel_job(j.engine_id) end
  finish(self, j, "cancelled")
  add_event(j, self.env, "Fine-tuning job cancelled")
  R.send_json(w, 200, job)
end

-- Builds a validated job and hands it to the runtime.
local function start(self, j)
  local env, job = self.env, j.public
  local hp = job.hyperparameters
  local ok, handle, err = pcall(env.ctx.finetune, env.ctx, {
    data = env.files:path(job.training_file), out = j.out, base_model = env.base_dir,
    rank = hp.lora_rank, alpha = hp.lora_alpha, targets = hp.lora_targets,
    lr = M.BASE_LR * hp.learning_rate_multiplier, epochs = hp.n_epochs, grad_accum = hp.batch_size,
    seq_len = hp.seq_len, seed = job.seed,
  })
  if not ok or not handle then
    finish(self, j, "failed", { code = "invalid_training_file", param = "training_file",
                                message = tostring(ok and err or handle) })
    add_event(j, env, "Training file validation failed: " .. job.error.message, "error")
    return
  end
  local eid, aerr = env.rt:add_job(handle)
  if not eid then
    finish(self, j, "failed", { code = "server_error", param = R.null, message = tostring(aerr) })
    add_event(j, env, "The job could not start: " .. tostring(aerr), "error")
    return
  end
  j.handle, j.engine_id = handle, eid
  job.status = "queued"
  add_event(j, env, "Files validated, moving job to queued state")
end

-- The adapter is written: publish it and call the lifecycle hook.
local function succeed(self, j)
  local env, job = self.env, j.public
  local name = ("ft:%s:%s%s"):format(env.base, job.user_provided_suffix ~= R.null and
    (job.user_provided_suffix .. ":") or "", job.id:gsub("^ftjob%-", ""))
  local f = io.open(j.out .. "/adapter_model.safetensors", "rb")
  if not f then
    finish(self, j, "failed", { code = "server_error", param = R.null,
                                message = "the job ended but wrote no adapter to " .. j.out })
    return
  end
  f:close()
  job.fine_tuned_model = name
  finish(self, j, "succeeded")
  add_event(j, env, "New fine-tuned model created: " .. name)
  local info = { id = job.id, fine_tuned_model = name, adapter_dir = j.out, model = job.model,
                 trained_tokens = job.trained_tokens, status = job.status }
  local ok, err = pcall(env.on_job_done, info, env.publish)
  if not ok then env.log(("lifecycle on_job_done for %s failed: %s"):format(job.id, tostring(err))) end
  add_event(j, env, "The job has successfully completed")
end

-- Advances every job's state from the runtime; call between iterations.
function Jobs:tick()
  local env = self.env
  for _, id in ipairs(self.order) do
    local j = self.jobs[id]
    local job = j.public
    if job.status == "validating_files" then
      start(self, j)
    elseif job.status == "queued" or job.status == "running" then
      local p = j.handle:progress()
      local err = env.rt:job_error(j.engine_id)
      if job.status == "queued" and p.tokens > 0 then
        job.status = "running"
        j.rate_t, j.rate_tokens = env.clock(), 0
        add_event(j, env, "Fine-tuning job started")
      end
      if job.status == "running" then
        local now = env.clock()
        if now - j.rate_t >= 1 then
          j.rate = (p.tokens - j.rate_tokens) / (now - j.rate_t)
          j.rate_t, j.rate_tokens = now, p.tokens
        end
        if p.step > (j.step or 0) then
          j.step, j.loss = p.step, p.loss
          add_event(j, env, ("Step %d/%d: training loss=%.4f"):format(p.step, p.total_steps, p.loss), "info",
            { step = p.step, total_steps = p.total_steps, train_loss = R.finite(p.loss),
              learning_rate = R.finite(p.lr), epoch = p.epoch })
        end
      end
      if err ~= "" then
        finish(self, j, "failed", { code = "training_error", param = R.null, message = err })
        add_event(j, env, "Fine-tuning failed: " .. err, "error")
      elseif p.done then
        succeed(self, j)
      end
    end
  end
end

-- For /metrics and /admin/status: { id, status, tokens, tokens_per_second, loss, step, total_steps }.
function Jobs:summary()
  local out = {}
  for _, id in ipairs(self.order) do
    local j = self.jobs[id]
    local p = j.handle and j.handle:progress()
    out[#out + 1] = { id = id, status = j.public.status, tokens = p and p.tokens or 0,
                      tokens_per_second = j.rate or 0, loss = j.loss, step = p and p.step or 0,
                      total_steps = p and p.total_steps or 0,
                      fine_tuned_model = j.public.fine_tuned_model ~= R.null and j.public.fine_tuned_model or nil }
  end
  return out
end

return M
