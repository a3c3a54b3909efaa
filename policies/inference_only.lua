-- inference_only: serves inference alone and never schedules finetuning.
-- Each iteration: a decode token for every decoding request in arrival order, then prefill
-- chunks in arrival order up to the token budget (max_batch_tokens), admitting waiting
-- requests while the free KV pages and sequence slots last; a waiting request that does not
-- fit holds back the admission of later arrivals. No options.
local U = require "flexllm.policy_util"

local P = {}
local state, plan

function P.init(ctx)
  state, plan = ctx.state, ctx.plan
end

function P.schedule()
  U.add_inference(state, plan, state.max_batch_tokens)
end

return P
