-- temporal: temporal sharing, the baseline co-serving is measured against. Iterations are
-- either inference-only or finetuning-only, in cycles of `every` iterations: the last
-- `window` iterations of each cycle are finetuning iterations, the others inference ones.
-- With the defaults every 64th iteration is a finetuning iteration (iterations 64, 128, ...
-- counted from when the policy first ran).
-- An inference iteration is planned as inference_only plans one, a finetuning iteration as
-- finetune_only does (the whole budget to finetuning). An iteration of one kind with no work
-- of its kind runs the other kind instead, so the machine never idles beside queued work.
-- The position in the cycle counts iterations, not calls (a dry run repeating an iteration
-- number does not move it), and it is handed across a hot reload (export_state), so a
-- reload does not restart the cycle.
-- options: every (default 64, a whole number >= 1), window (default 1, in [1, every]).
local U = require "flexllm.policy_util"

local P = {}
local state, plan, every, window
local count, last_iteration = 0, nil -- iterations seen; the latest iteration number

function P.init(ctx)
  state, plan = ctx.state, ctx.plan
  every = U.number_option(ctx.options, "every", 64, 1, nil, true)
  window = U.number_option(ctx.options, "window", 1, 1, every, true)
  local saved = ctx.saved
  if type(saved) == "table" and type(saved.count) == "number" then
    count, last_iteration = saved.count, saved.last_iteration
  end
end

function P.schedule()
  local iteration = tonumber(state.iteration)
  if iteration ~= last_iteration then
    count, last_iteration = count + 1, iteration
  end
  if (count - 1) % every >= every - window and U.has_ft_work(state) then
    U.add_finetune_budget(state, plan)
  else
    U.add_inference(state, plan, state.max_batch_tokens)
    if plan.n_items == 0 then U.add_finetune_budget(state, plan) end
  end
end

function P.export_state()
  return { count = count, last_iteration = last_iteration }
end

return P
