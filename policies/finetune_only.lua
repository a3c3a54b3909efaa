-- finetune_only: runs finetuning alone and never schedules inference.
-- Each iteration the whole token budget (max_batch_tokens) is split in equal shares across
-- the jobs that have work: a job in its forward phase gets forward tokens, a job in its
-- backward phase a backward chunk (at most one batch). Backward tokens are weighed by what
-- the cost model says one costs against a forward token (1 until it knows), so a backward
-- iteration takes about as long as a forward one. Shares a job cannot use go to the others.
-- No options.
local U = require "flexllm.policy_util"

local P = {}
local state, plan

function P.init(ctx)
  state, plan = ctx.state, ctx.plan
end

function P.schedule()
  U.add_finetune_budget(state, plan)
end

return P
