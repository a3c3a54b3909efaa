-- hybrid: the FlexLLM co-serving scheduler. Inference comes first; finetuning tokens fill
-- the iteration while its predicted time stays within the TPOT budget. FlexLLM picks its
-- token budget offline by profiling; here the runtime's online cost model (state.cost)
-- predicts each plan's seconds instead.
--
-- The TPOT budget T is margin * the tightest TPOT SLO among the requests in the state (a
-- request's own tpot_slo, else state.tpot_slo): a request still prefilling will decode soon.
-- Each iteration:
--  1. Decodes: one token for every decoding request, in arrival order.
--  2. Prefill, in two passes over the requests with prompt left, each in arrival order:
--     first the TTFT-pressured ones (no first token yet and waiting for at least
--     ttft_urgency of their TTFT SLO, the request's or state.ttft_slo), then the others.
--     Pressured requests may use the whole remaining token budget: their deadline is near,
--     and one longer iteration spreads thin over the decoders' mean TPOT. The others get
--     what keeps the predicted iteration time within T while requests decode (at least
--     min_prefill tokens, so that prefill always progresses), and the whole remaining
--     budget when nothing decodes. Waiting requests are admitted while the free KV pages and
--     sequence slots last; one that does not fit holds back the admission of every request
--     after it.
--  3. Finetuning: the time left under T, in finetuning-forward-token equivalents, split
--     fairly across the jobs (forward tokens by phase, or backward chunks weighed by their
--     predicted cost: per token, plus the model's per_backward_chunk once for each job that
--     runs backward), forward tokens within the batch's remaining token budget.
--     Nothing when the inference part alone reaches T.
-- When the plan holds no inference at all (nothing decodes, nothing could be prefilled),
-- finetuning gets the whole token budget.
-- Without a time model (no TPOT SLO in force, or a cost model fitted on fewer than min_fit
-- iterations, whose coefficients are zero or noise) the budget is split by tokens instead:
-- ft_share of it is reserved for finetuning when a job has work, inference uses the rest
-- (decodes first, pressured prefills next), and finetuning gets its reserve; with no TPOT
-- SLO at all it also fills whatever inference left, as FlexLLM fills its fixed budget.
-- With an SLO but no fit yet it keeps to the reserve until iteration times can be predicted.
--
-- options (defaults): margin (0.9): share of the TPOT SLO a plan may be predicted to take;
-- ttft_urgency (0.5): share of the TTFT SLO after which a request is pressured;
-- min_prefill (32): prefill tokens per iteration even when decodes fill the time budget;
-- ft_share (0.25): finetuning's share of the budget without a time model;
-- min_fit (16): iterations the cost model must have seen before its predictions are used.
local U = require "flexllm.policy_util"

local floor, max, min = math.floor, math.max, math.min
local WAITING, PREFILL, DECODE = U.REQ_WAITING, U.REQ_PREFILL, U.REQ_DECODE

local P = {}
local state, plan
local margin, urgency, min_prefill, ft_share, min_fit

function P.init(ctx)
  state, plan = ctx.state, ctx.plan
  local o = ctx.options
  margin = U.number_option(o, "margin", 0.9, 0, 1)
  urgency = U.number_option(o, "ttft_urgency", 0.5, 0, 1)
  min_prefill = U.number_option(o, "min_prefill", 32, 0, nil, true)
  ft_share = U.number_option(o, "ft_share", 0.25, 0, 1)
  min_fit = U.number_option(o, "min_fit", 16, 1, nil, true)
end

-- The tightest TPOT SLO over the requests, 0 when none is in force.
local function tightest_tpot()
  local reqs, default, t = state.requests, state.tpot_slo, 0
  for i = 0, state.n_requests - 1 do
    local s = reqs[i].tpot_slo
    if s <= 0 then s = default end
    if s > 0 and (t == 0 or s < t) then t = s end
  end
  return t
end

local function pressured(r, now)
  if r.first_token >= 0 then return false end
  local slo = r.ttft_slo
  if slo <= 0 then slo = state.ttft_slo end
  return slo > 0 and now - r.arrival >= urgency * slo
end

-- One prefill pass, in arrival order, over the requests with prompt left whose TTFT pressure
-- is `urgent`, until the prefill tokens reach limit. used, the pages and sequence slots left,
-- and admitting (false once a waiting request was refused) carry from one pass to the next.
-- The pressured requests up to urgent_limit prefill tokens, then the others up to
-- normal_limit in all. Returns the prefill tokens.
local function urgent(r) return pressured(r, state.now) end
local function relaxed(r) return not pressured(r, state.now) end

local function prefill(urgent_limit, normal_limit)
  local used, pages, seqs, admitting = U.add_prefills(state, plan, urgent_limit, urgent)
  return (U.add_prefills(state, plan, normal_limit, relaxed, used, pages, seqs, admitting))
end

-- With a time model: inference within the TPOT budget, finetuning in the time left.
local function by_time(tpot, decodes, context)
  local budget, cost = state.max_batch_tokens, state.cost
  local limit, left = margin * tpot, budget - decodes
  local normal = left
  if decodes > 0 then
    local spare = limit - U.predict(cost, 0, decodes, 0, 0, context, 0)
    local per = U.token_cost(cost, U.KIND_PREFILL)
    if per > 0 then normal = min(left, max(min_prefill, floor(spare / per))) end
  end
  local prefills = prefill(left, normal)
  left = left - prefills
  if plan.n_items == 0 then
    U.add_finetune_budget(state, plan)
    return
  end
  local spare = limit - U.predict(cost, prefills, decodes, 0, 0, context, 0)
  local per = U.token_cost(cost, U.KIND_FT_FORWARD)
  -- Even with no forward room left in the batch, backward tokens may fit in the time.
  if spare > 0 then
    U.add_finetune(state, plan, per > 0 and spare / per or left, left, U.backward_weight(cost),
                   U.backward_chunk_weight(cost))
  end
end

-- Without one: a token share reserved for finetuning, which fills the rest without SLOs.
local function by_tokens(tpot, decodes)
  local budget = state.max_batch_tokens
  local weight = U.backward_weight(state.cost)
  local reserve = U.has_ft_work(state) and floor(ft_share * budget) or 0
  local left = budget - decodes
  local inference = max(left - reserve, 0)
  left = left - prefill(inference, inference)
  if plan.n_items == 0 then
    U.add_finetune_budget(state, plan)
  elseif tpot > 0 then
    local r = min(reserve, left)
    U.add_finetune(state, plan, r, r, weight)
  else
    U.add_finetune(state, plan, left, left, weight)
  end
end

function P.schedule()
  local tpot = tightest_tpot()
  local decodes, context = U.add_decodes(state, plan, state.max_batch_tokens)
  if tpot > 0 and state.cost.fitted >= min_fit then
    by_time(tpot, decodes, context)
  else
    by_tokens(tpot, decodes)
  end
end

return P
