-- static_split: a fixed share of every iteration's token budget is reserved for finetuning,
-- the rest serves inference as inference_only does (decodes, then prefill chunks in arrival
-- order with KV admission), even when inference would use more.
-- The reserve is floor(share * max_batch_tokens) finetuning-forward-token equivalents, split
-- across jobs as finetune_only splits the whole budget (backward tokens weighed by their
-- predicted cost against forward ones). When no job has work, inference gets everything:
-- an idle reserve would help nobody.
-- options: share (default 0.25, in [0, 1]).
local U = require "flexllm.policy_util"

local P = {}
local state, plan, share

function P.init(ctx)
  state, plan = ctx.state, ctx.plan
  share = U.number_option(ctx.options, "share", 0.25, 0, 1)
end

function P.schedule()
  local budget = state.max_batch_tokens
  local reserve = U.has_ft_work(state) and math.floor(share * budget) or 0
  U.add_inference(state, plan, budget - reserve)
  if reserve > 0 then
    U.add_finetune(state, plan, reserve, reserve, U.backward_weight(state.cost))
  end
end

return P
