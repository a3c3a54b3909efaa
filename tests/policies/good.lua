-- Decodes every decoding request, then prefills the others within the token budget, then
-- gives what is left of the budget to the first job's forward.
local ffi = require "ffi"
local C = ffi.C
local DECODE = C.FL_REQ_DECODE

local S, P
local calls = 0

local function add(i, tokens)
  local n = P.n_items
  P.items[n].request = i
  P.items[n].tokens = tokens
  P.n_items = n + 1
end

local function schedule()
  calls = calls + 1
  local budget, reqs, n = S.max_batch_tokens, S.requests, S.n_requests
  for i = 0, n - 1 do
    if reqs[i].state == DECODE and budget > 0 and P.n_items < P.cap_items then
      add(i, 1)
      budget = budget - 1
    end
  end
  for i = 0, n - 1 do
    local r = reqs[i]
    if r.state ~= DECODE and budget > 0 and P.n_items < P.cap_items then
      local t = math.min(r.prompt_len - r.prefilled, budget)
      add(i, t)
      budget = budget - t
    end
  end
  if S.n_jobs > 0 and S.jobs[0].phase == C.FL_JOB_FORWARD and budget > 0 and P.cap_ft > 0 then
    P.ft[0].job = 0
    P.ft[0].forward_tokens = budget
    P.ft[0].backward_tokens = 0
    P.n_ft = 1
  end
end

return {
  init = function(ctx) S, P = ctx.state, ctx.plan end,
  schedule = schedule,
  export_state = function() return { calls = calls } end,
}
