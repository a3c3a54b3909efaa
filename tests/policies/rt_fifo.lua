-- A minimal valid policy for the runtime tests: decodes, then prefill in arrival order
-- within the budget and free pages, then finetuning with what is left. It counts its
-- calls and hands the count to its next version.
local S, P
local calls = 0
local M = {}

function M.init(ctx)
  S, P = ctx.state, ctx.plan
  calls = ctx.saved and ctx.saved.calls or 0
end

function M.schedule()
  calls = calls + 1
  local budget, pages, seqs, n = S.max_batch_tokens, S.kv_pages_free, S.seqs_free, 0
  for i = 0, S.n_requests - 1 do
    if S.requests[i].state == 2 and budget > 0 then
      P.items[n].request, P.items[n].tokens = i, 1
      n, budget = n + 1, budget - 1
    end
  end
  for i = 0, S.n_requests - 1 do
    local r = S.requests[i]
    if r.state ~= 2 and budget > 0 then
      if r.state == 0 then
        local need = r.pages_needed - r.kv_pages
        if need > pages or seqs == 0 then break end
        pages, seqs = pages - need, seqs - 1
      end
      local k = math.min(r.prompt_len - r.prefilled, budget, 7)
      P.items[n].request, P.items[n].tokens = i, k
      n, budget = n + 1, budget - k
    end
  end
  P.n_items = n
  local f = 0
  for j = 0, S.n_jobs - 1 do
    local job = S.jobs[j]
    if job.phase == 0 and budget > 0 then
      P.ft[f].job, P.ft[f].forward_tokens, P.ft[f].backward_tokens =
        j, math.min(job.sample_len - job.forwarded, budget), 0
      budget = budget - P.ft[f].forward_tokens
      f = f + 1
    elseif job.phase == 1 then
      P.ft[f].job, P.ft[f].forward_tokens, P.ft[f].backward_tokens = j, 0, math.min(job.backward_left, 13)
      f = f + 1
    end
  end
  P.n_ft = f
end

function M.export_state() return { calls = calls } end

return M
