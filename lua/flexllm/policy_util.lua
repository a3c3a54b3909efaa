-- Shared pieces of the built-in scheduling policies (policies/*.lua): the ABI's constants,
-- the cost model's prediction, the blocks every policy builds a plan from (decodes, prefill
-- chunks with KV admission, fair finetuning shares), option checking, and a validator with
-- the runtime's rules (engine/scheduler.c) for specs and dry runs.
--
-- The plan builders write straight into the runtime's C arrays and build no Lua tables:
-- they run every iteration over up to thousands of requests, each in one pass.
local ffi = require "ffi"
require "flexllm.sched_abi"

local C = ffi.C
local floor, max, min = math.floor, math.max, math.min

local M = {
  REQ_WAITING = C.FL_REQ_WAITING,
  REQ_PREFILL = C.FL_REQ_PREFILL,
  REQ_DECODE = C.FL_REQ_DECODE,
  JOB_FORWARD = C.FL_JOB_FORWARD,
  JOB_BACKWARD = C.FL_JOB_BACKWARD,
  JOB_DONE = C.FL_JOB_DONE,
  KIND_PREFILL = C.FL_KIND_PREFILL,
  KIND_DECODE = C.FL_KIND_DECODE,
  KIND_FT_FORWARD = C.FL_KIND_FT_FORWARD,
  KIND_FT_BACKWARD = C.FL_KIND_FT_BACKWARD,
}
local WAITING, PREFILL, DECODE = M.REQ_WAITING, M.REQ_PREFILL, M.REQ_DECODE
local FORWARD, BACKWARD = M.JOB_FORWARD, M.JOB_BACKWARD

-- Reads a number option, default when absent, checked against [lo, hi] (hi may be nil) and,
-- when integer is true, for a whole number. A bad value is an error at load time, which the
-- host reports while it keeps the policy that was running.
function M.number_option(options, name, default, lo, hi, integer)
  local v = options and options[name]
  if v == nil then return default end
  if type(v) ~= "number" or v ~= v or v < lo or (hi and v > hi) or (integer and v % 1 ~= 0) then
    error(("option '%s' must be %s in [%s, %s], got %s"):format(name,
      integer and "a whole number" or "a number", lo, hi or "inf", tostring(v)), 0)
  end
  return v
end

-- Predicted seconds of an iteration with these token counts, decode context and number of
-- jobs running backward tokens (chunks) (see fl_cost_model).
function M.predict(cost, prefill, decode, forward, backward, context, chunks)
  local k = cost.per_token
  return cost.fixed + k[M.KIND_PREFILL] * prefill + k[M.KIND_DECODE] * decode
         + k[M.KIND_FT_FORWARD] * forward + k[M.KIND_FT_BACKWARD] * backward
         + cost.per_context * context + cost.per_backward_chunk * chunks
end

-- Seconds per token of a kind. A kind the fit has not seen yet has a zero coefficient, which
-- would make it look free; a prefill token (the same forward compute) stands in for it.
function M.token_cost(cost, kind)
  local c = cost.per_token[kind]
  if c > 0 then return c end
  return cost.per_token[M.KIND_PREFILL]
end

-- What one backward token costs in finetuning-forward tokens: 1 until the fit knows both.
function M.backward_weight(cost)
  if cost.fitted == 0 then return 1 end
  local f, b = M.token_cost(cost, M.KIND_FT_FORWARD), M.token_cost(cost, M.KIND_FT_BACKWARD)
  if f > 0 and b > 0 then return b / f end
  return 1
end

-- What a job's backward chunk costs on top of its tokens, in finetuning-forward tokens: 0
-- until the fit knows both.
function M.backward_chunk_weight(cost)
  if cost.fitted == 0 then return 0 end
  local f = M.token_cost(cost, M.KIND_FT_FORWARD)
  if f > 0 then return cost.per_backward_chunk / f end
  return 0
end

-- Tokens a job could run now: forward positions left in its sample, or a backward chunk of
-- at most chunk tokens; 0 when it is done.
local function job_want(job, chunk)
  local phase = job.phase
  if phase == FORWARD then return job.sample_len - job.forwarded end
  if phase == BACKWARD then return min(job.backward_left, chunk) end
  return 0
end

-- Whether some job could run a finetuning token now.
function M.has_ft_work(state)
  local jobs, chunk = state.jobs, state.max_batch_tokens
  for j = 0, state.n_jobs - 1 do
    if job_want(jobs[j], chunk) > 0 then return true end
  end
  return false
end

-- Appends a decode item for every decoding request in arrival order, at most limit of them.
-- Returns the decode tokens added and the context tokens their attention reads.
function M.add_decodes(state, plan, limit)
  local reqs, items = state.requests, plan.items
  local n, cap, added, context = plan.n_items, plan.cap_items, 0, 0
  for i = 0, state.n_requests - 1 do
    if added >= limit or n >= cap then break end
    local r = reqs[i]
    if r.state == DECODE then
      local it = items[n]
      it.request, it.tokens = i, 1
      n, added = n + 1, added + 1
      context = context + r.prefilled + r.generated
    end
  end
  plan.n_items = n
  return added, context
end

-- Appends request i's next prompt chunk of at most limit tokens (i must not be decoding).
-- A waiting request is admitted only when the pages it reserves fit in pages and a sequence
-- slot is left in seqs. Returns the tokens added, the pages and slots left, and true when it
-- was refused for want of either.
function M.add_prefill(state, plan, i, limit, pages, seqs)
  local r = state.requests[i]
  local n = min(r.prompt_len - r.prefilled, limit)
  local k = plan.n_items
  if n <= 0 or k >= plan.cap_items then return 0, pages, seqs, false end
  if r.state == WAITING then
    local need = r.pages_needed - r.kv_pages
    if need > pages or seqs <= 0 then return 0, pages, seqs, true end
    pages, seqs = pages - need, seqs - 1
  end
  local it = plan.items[k]
  it.request, it.tokens = i, n
  plan.n_items = k + 1
  return n, pages, seqs, false
end

-- Prefill chunks in arrival order up to limit tokens in all, admitting waiting requests while
-- the free pages and sequence slots last. Returns the tokens added, then the pages, slots
-- and admission state left, for a following pass.
-- accept(request) (optional) picks which requests this pass considers; a second pass
-- continues from the first with its returns (tokens added, pages, slots, admitting).
function M.add_prefills(state, plan, limit, accept, added, pages, seqs, admitting)
  local reqs = state.requests
  added, pages, seqs = added or 0, pages or state.kv_pages_free, seqs or state.seqs_free
  if admitting == nil then admitting = true end
  -- Without a sequence slot every waiting request would be refused: skip them (and their
  -- accept calls) at once; the plan is the same.
  admitting = admitting and seqs > 0
  for i = 0, state.n_requests - 1 do
    if added >= limit or plan.n_items >= plan.cap_items then break end
    local s = reqs[i].state
    if (s == PREFILL or (s == WAITING and admitting)) and (not accept or accept(reqs[i])) then
      local n, refused
      n, pages, seqs, refused = M.add_prefill(state, plan, i, limit - added, pages, seqs)
      added = added + n
      -- Later arrivals wait behind a request that does not fit; admitting them past it would
      -- starve long prompts. Admitted requests go on: they hold their pages already.
      if refused or seqs <= 0 then admitting = false end
    end
  end
  return added, pages, seqs, admitting
end

-- Decodes, then prefill chunks with admission (add_prefills), within limit tokens in all: the
-- inference of inference_only. Returns the tokens added.
function M.add_inference(state, plan, limit)
  local decodes = M.add_decodes(state, plan, limit)
  return decodes + (M.add_prefills(state, plan, limit - decodes))
end

-- Gives the jobs with work fair shares of units finetuning-forward-token equivalents: a
-- forward token costs 1 unit, a backward token bwd_weight units, and a job that runs backward
-- tokens bwd_chunk units more (0 when nil), so a share too small to pay that runs no backward
-- at all rather than a chunk that costs mostly its constant. Forward tokens come to at
-- most fwd_cap in all (they share the batch with inference); a job's backward chunk is at
-- most one batch (max_batch_tokens). Shares are equal; what a job cannot use goes to the
-- others in order, and the order starts at a job that rotates with the iteration so that no
-- job always comes last. Returns the forward and backward tokens added.
function M.add_finetune(state, plan, units, fwd_cap, bwd_weight, bwd_chunk)
  local jobs, n_jobs, chunk = state.jobs, state.n_jobs, state.max_batch_tokens
  bwd_chunk = bwd_chunk or 0
  local ft, first = plan.ft, plan.n_ft
  fwd_cap = floor(fwd_cap)
  local active = 0
  for j = 0, n_jobs - 1 do
    if job_want(jobs[j], chunk) > 0 then active = active + 1 end
  end
  active = min(active, plan.cap_ft - first)
  if active <= 0 or units <= 0 then return 0, 0 end

  local share, start = units / active, tonumber(state.iteration) % n_jobs
  local n, fwd, bwd, left = first, 0, 0, units
  for s = 0, n_jobs - 1 do
    if n - first >= active then break end
    local j = start + s
    if j >= n_jobs then j = j - n_jobs end
    local job = jobs[j]
    local want = job_want(job, chunk)
    if want > 0 then
      local e = ft[n]
      e.job, e.forward_tokens, e.backward_tokens = j, 0, 0
      if job.phase == FORWARD then
        local t = min(want, floor(share), fwd_cap - fwd)
        e.forward_tokens = t
        fwd, left = fwd + t, left - t
      else
        local t = max(min(want, floor((share - bwd_chunk) / bwd_weight)), 0)
        e.backward_tokens = t
        if t > 0 then bwd, left = bwd + t, left - t * bwd_weight - bwd_chunk end
      end
      n = n + 1
    end
  end
  -- What the equal shares left (jobs that wanted less, rounding) goes to the rest in order.
  for k = first, n - 1 do
    local e = ft[k]
    local job = jobs[e.job]
    local want = job_want(job, chunk)
    if job.phase == FORWARD then
      local t = min(want - e.forward_tokens, floor(left), fwd_cap - fwd)
      if t > 0 then
        e.forward_tokens = e.forward_tokens + t
        fwd, left = fwd + t, left - t
      end
    else
      local extra = e.backward_tokens > 0 and 0 or bwd_chunk
      local t = min(want - e.backward_tokens, floor((left - extra) / bwd_weight))
      if t > 0 then
        e.backward_tokens = e.backward_tokens + t
        bwd, left = bwd + t, left - t * bwd_weight - extra
      end
    end
  end
  -- Entries that got nothing are dropped: an empty entry would only cost the runtime a look.
  local out = first
  for k = first, n - 1 do
    local e = ft[k]
    if e.forward_tokens + e.backward_tokens > 0 then
      if out ~= k then
        local o = ft[out]
        o.job, o.forward_tokens, o.backward_tokens = e.job, e.forward_tokens, e.backward_tokens
      end
      out = out + 1
    end
  end
  plan.n_ft = out
  return fwd, bwd
end

-- The whole token budget to finetuning (add_finetune), backward tokens weighed by the cost
-- model: the plan of finetune_only. Returns the forward and backward tokens added.
function M.add_finetune_budget(state, plan)
  local budget = state.max_batch_tokens
  return M.add_finetune(state, plan, budget, budget, M.backward_weight(state.cost))
end

-- Checks a plan against the state with the runtime's rules (fl_sched_validate): capacities,
-- request and job indexes each at most once, token counts by state and phase, KV pages and
-- sequence slots for admissions, and the forward token budget. Returns true, or nil and what
-- is wrong. It builds tables: it is for specs and dry runs, not the per-iteration path.
function M.validate(state, plan)
  local n_items, n_ft = plan.n_items, plan.n_ft
  if n_items < 0 or n_items > plan.cap_items or n_ft < 0 or n_ft > plan.cap_ft then
    return nil, ("plan: %d items (capacity %d) and %d finetuning entries (capacity %d)")
      :format(n_items, plan.cap_items, n_ft, plan.cap_ft)
  end
  local seen, pages, seqs, tokens = {}, state.kv_pages_free, state.seqs_free, 0
  for i = 0, n_items - 1 do
    local it = plan.items[i]
    local ri = it.request
    if ri < 0 or ri >= state.n_requests then
      return nil, ("plan item %d: request index %d outside [0, %d)"):format(i, ri, state.n_requests)
    end
    if seen[ri] then return nil, ("plan item %d: request %d appears twice"):format(i, ri) end
    seen[ri] = true
    local r = state.requests[ri]
    if r.state == DECODE then
      if it.tokens ~= 1 then
        return nil, ("plan item %d: request %d is decoding and gets %d tokens (must be 1)")
          :format(i, r.id, it.tokens)
      end
    elseif it.tokens < 1 or it.tokens > r.prompt_len - r.prefilled then
      return nil, ("plan item %d: request %d gets %d prompt tokens, %d are left")
        :format(i, r.id, it.tokens, r.prompt_len - r.prefilled)
    end
    if r.state == WAITING then
      local need = r.pages_needed - r.kv_pages
      if need > pages then
        return nil, ("plan item %d: admitting request %d needs %d KV pages, %d are left")
          :format(i, r.id, need, pages)
      end
      if seqs == 0 then
        return nil, ("plan item %d: admitting request %d needs a sequence slot, none is left")
          :format(i, r.id)
      end
      pages, seqs = pages - need, seqs - 1
    end
    tokens = tokens + it.tokens
  end
  seen = {}
  for i = 0, n_ft - 1 do
    local f = plan.ft[i]
    local ji = f.job
    if ji < 0 or ji >= state.n_jobs then
      return nil, ("plan finetuning entry %d: job index %d outside [0, %d)")
        :format(i, ji, state.n_jobs)
    end
    if seen[ji] then
      return nil, ("plan finetuning entry %d: job %d appears twice"):format(i, ji)
    end
    seen[ji] = true
    local j = state.jobs[ji]
    if f.forward_tokens < 0 or f.backward_tokens < 0 then
      return nil, ("plan finetuning entry %d: negative token count"):format(i)
    end
    local fwd_left = j.sample_len - j.forwarded
    if f.forward_tokens ~= 0 and (j.phase ~= FORWARD or f.forward_tokens > fwd_left) then
      return nil, ("plan finetuning entry %d: job %d gets %d forward tokens (phase %d, %d left)")
        :format(i, j.id, f.forward_tokens, j.phase, fwd_left)
    end
    if f.backward_tokens ~= 0 and (j.phase ~= BACKWARD or f.backward_tokens > j.backward_left) then
      return nil, ("plan finetuning entry %d: job %d gets %d backward tokens (phase %d, %d left)")
        :format(i, j.id, f.backward_tokens, j.phase, j.backward_left)
    end
    tokens = tokens + f.forward_tokens
  end
  if tokens > state.max_batch_tokens then
    return nil, ("plan: %d forward tokens, the budget is %d"):format(tokens, state.max_batch_tokens)
  end
  return true
end

return M
