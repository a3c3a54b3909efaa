-- The built-in scheduling policies (policies/*.lua) on synthetic scheduling states: every plan
-- passes the runtime's rules, each policy does what its header says, and a small simulated
-- system run under hybrid and static_split finishes every request while finetuning moves.
local ffi = require "ffi"
require "flexllm.sched_abi"
local U = require "flexllm.policy_util"

local WAITING, PREFILL, DECODE = U.REQ_WAITING, U.REQ_PREFILL, U.REQ_DECODE
local FORWARD, BACKWARD, DONE = U.JOB_FORWARD, U.JOB_BACKWARD, U.JOB_DONE
local POLICIES = { "inference_only", "finetune_only", "hybrid", "temporal", "static_split" }

-- A cost model fitted on a GPU-like machine: a fixed launch cost, prefill and finetuning
-- forward tokens alike, backward twice a forward token, decode attention per context token.
local FITTED = { fixed = 0.008, prefill = 1e-4, decode = 2e-4, forward = 1e-4, backward = 2e-4,
                 context = 2e-7, fitted = 500 }

local function pages_for(tokens) return math.ceil(tokens / 16) end

-- Builds a scheduling state and an empty plan from plain tables. w.requests: {state, prompt,
-- prefilled, generated, max_tokens, pages_needed, kv_pages, arrival, first_token, ttft, tpot};
-- w.jobs: {phase, sample_len, forwarded, backward_left}. Returns { state, plan, keep }, where
-- keep anchors the arrays the state's pointers name.
local function build(w)
  local nr, nj = #(w.requests or {}), #(w.jobs or {})
  local st = ffi.new("fl_sched_state[1]")
  local reqs = ffi.new("fl_sched_request[?]", math.max(nr, 1))
  local jobs = ffi.new("fl_sched_job[?]", math.max(nj, 1))
  local cap_items, cap_ft = w.cap_items or math.max(nr, 1), w.cap_ft or math.max(nj, 1)
  local items = ffi.new("fl_sched_item[?]", cap_items)
  local fts = ffi.new("fl_sched_ft[?]", cap_ft)
  local pl = ffi.new("fl_sched_plan[1]")
  local s = st[0]
  s.now, s.iteration = w.now or 100, w.iteration or 1
  s.max_batch_tokens = w.budget or 256
  s.kv_pages_total = w.pages_total or 4096
  s.kv_pages_free = w.pages_free or s.kv_pages_total
  s.seqs_free = w.seqs_free or 256
  s.n_requests, s.requests, s.n_jobs, s.jobs = nr, reqs, nj, jobs
  s.ttft_slo, s.tpot_slo = w.ttft or 0, w.tpot or 0
  local c = w.cost or {}
  s.cost.fixed, s.cost.per_context, s.cost.fitted = c.fixed or 0, c.context or 0, c.fitted or 0
  s.cost.per_token[U.KIND_PREFILL], s.cost.per_token[U.KIND_DECODE] = c.prefill or 0, c.decode or 0
  s.cost.per_token[U.KIND_FT_FORWARD] = c.forward or 0
  s.cost.per_token[U.KIND_FT_BACKWARD] = c.backward or 0
  s.cost.per_backward_chunk = c.chunk or 0
  for i, r in ipairs(w.requests or {}) do
    local q = reqs[i - 1]
    q.id, q.state, q.adapter = i, r.state, -1
    q.prompt_len, q.max_tokens = r.prompt or 100, r.max_tokens or 50
    q.prefilled = r.prefilled or (r.state == DECODE and q.prompt_len or 0)
    q.generated = r.generated or (r.state == DECODE and 1 or 0)
    q.pages_needed = r.pages_needed or pages_for(q.prompt_len + q.max_tokens)
    q.kv_pages = r.kv_pages or (r.state == WAITING and 0 or q.pages_needed)
    q.arrival = r.arrival or (s.now - 0.1)
    q.first_token = r.first_token or (r.state == DECODE and q.arrival + 0.05 or -1)
    q.last_token = q.first_token
    q.ttft_slo, q.tpot_slo = r.ttft or 0, r.tpot or 0
  end
  for i, j in ipairs(w.jobs or {}) do
    local b = jobs[i - 1]
    b.id, b.phase, b.adapter = i, j.phase, i
    b.sample_len, b.forwarded = j.sample_len or 1000, j.forwarded or 0
    b.backward_left, b.total_steps = j.backward_left or 0, 100
  end
  pl[0].cap_items, pl[0].items, pl[0].cap_ft, pl[0].ft = cap_items, items, cap_ft, fts
  return { state = ffi.cast("fl_sched_state *", st), plan = ffi.cast("fl_sched_plan *", pl),
           keep = { st, reqs, jobs, items, fts, pl } }
end

local function load(name, w, options, saved)
  local P = dofile("policies/" .. name .. ".lua")
  if P.init then P.init({ state = w.state, plan = w.plan, options = options, saved = saved }) end
  return P
end

-- One iteration as the host runs it: the plan emptied, the policy called, the plan checked.
local function step(P, w)
  w.plan.n_items, w.plan.n_ft = 0, 0
  P.schedule()
  local ok, err = U.validate(w.state, w.plan)
  assert(ok, err)
  for k = 0, w.plan.n_ft - 1 do
    local f = w.plan.ft[k]
    assert(f.forward_tokens + f.backward_tokens > 0, "an empty finetuning entry")
  end
end

-- Token counts of the plan: prefill, decode, ft forward, ft backward, decode context, and the
-- jobs running backward tokens.
local function counts(w)
  local s, p = w.state, w.plan
  local pre, dec, fwd, bwd, ctx, chunks = 0, 0, 0, 0, 0, 0
  for k = 0, p.n_items - 1 do
    local r = s.requests[p.items[k].request]
    if r.state == DECODE then
      dec, ctx = dec + 1, ctx + r.prefilled + r.generated
    else
      pre = pre + p.items[k].tokens
    end
  end
  for k = 0, p.n_ft - 1 do
    fwd, bwd = fwd + p.ft[k].forward_tokens, bwd + p.ft[k].backward_tokens
    if p.ft[k].backward_tokens > 0 then chunks = chunks + 1 end
  end
  return pre, dec, fwd, bwd, ctx, chunks
end

-- The plan's predicted seconds under cost (the state's when nil).
local function predicted(w, cost)
  local pre, dec, fwd, bwd, ctx, chunks = counts(w)
  if cost then
    return cost.fixed + cost.prefill * pre + cost.decode * dec + cost.forward * fwd
           + cost.backward * bwd + cost.context * ctx + cost.chunk * chunks
  end
  return U.predict(w.state.cost, pre, dec, fwd, bwd, ctx, chunks)
end

local function decoding(n, extra)
  local t = {}
  for i = 1, n do t[i] = { state = DECODE, prompt = 50 + i % 200, generated = 1 + i % 40 } end
  for _, r in ipairs(extra or {}) do t[#t + 1] = r end
  return t
end

local function rep(n, v)
  local t = {}
  for i = 1, n do t[i] = v end
  return t
end

local BOTH_PHASES = { { phase = FORWARD, sample_len = 900, forwarded = 100 },
                      { phase = BACKWARD, sample_len = 600, forwarded = 600, backward_left = 450 },
                      { phase = DONE, sample_len = 10, forwarded = 10 },
                      { phase = FORWARD, sample_len = 40, forwarded = 35 } }

-- Varied states every policy must plan validly.
local SCENARIOS = {
  ["many decoding requests, more than the budget"] = function()
    return { budget = 256, requests = decoding(300), jobs = BOTH_PHASES, cost = FITTED, tpot = 0.05 }
  end,
  ["long prompts waiting with few free pages"] = function()
    return { budget = 512, pages_free = 70, cost = FITTED, tpot = 0.05, ttft = 5,
             requests = decoding(20, {
               { state = PREFILL, prompt = 3000, prefilled = 1024 },
               { state = WAITING, prompt = 4000, max_tokens = 100 },   -- 257 pages: refused
               { state = WAITING, prompt = 200, max_tokens = 10 },     -- held back behind it
               { state = PREFILL, prompt = 900, prefilled = 10 } }),
             jobs = { { phase = BACKWARD, sample_len = 2000, forwarded = 2000, backward_left = 2000 } } }
  end,
  ["waiting requests that fit, jobs in both phases"] = function()
    return { budget = 256, pages_free = 200, cost = FITTED, tpot = 0.05, ttft = 5,
             requests = decoding(8, rep(12, { state = WAITING, prompt = 80, max_tokens = 20 })),
             jobs = BOTH_PHASES }
  end,
  ["TTFT-pressured requests"] = function()
    return { budget = 256, now = 100, cost = FITTED, tpot = 0.05, ttft = 2,
             requests = decoding(30, {
               { state = WAITING, prompt = 700, arrival = 98.5 },
               { state = PREFILL, prompt = 700, prefilled = 300, arrival = 99.9 },
               { state = WAITING, prompt = 500, arrival = 99.95, ttft = 0.05 } }),
             jobs = BOTH_PHASES }
  end,
  ["unfitted cost model with SLOs"] = function()
    return { budget = 256, tpot = 0.05, ttft = 5, requests = decoding(10, {
               { state = WAITING, prompt = 400 } }), jobs = BOTH_PHASES }
  end,
  ["no SLOs"] = function()
    return { budget = 256, cost = FITTED, requests = decoding(10, {
               { state = WAITING, prompt = 100 } }), jobs = BOTH_PHASES }
  end,
  ["only finetuning jobs"] = function()
    return { budget = 256, cost = FITTED, tpot = 0.05, jobs = BOTH_PHASES }
  end,
  ["nothing at all"] = function() return { budget = 256, cost = FITTED } end,
  ["one sequence slot left"] = function()
    return { budget = 256, seqs_free = 1, cost = FITTED, tpot = 0.05, ttft = 1, now = 100,
             requests = decoding(4, { { state = WAITING, prompt = 30, arrival = 99.9 },
                                      { state = WAITING, prompt = 30, arrival = 99.0 } }),
             jobs = BOTH_PHASES }
  end,
  ["small plan capacities"] = function()
    return { budget = 256, cap_items = 3, cap_ft = 1, cost = FITTED, tpot = 0.05,
             requests = decoding(5, { { state = WAITING, prompt = 90 } }), jobs = BOTH_PHASES }
  end,
  ["decodes alone past the TPOT budget"] = function()
    local cost = { fixed = 0.01, prefill = 1e-4, decode = 2e-4, forward = 1e-4, backward = 2e-4,
                   context = 1e-5, fitted = 500 }
    return { budget = 512, cost = cost, tpot = 0.03, requests = decoding(200, {
               { state = WAITING, prompt = 300 } }), jobs = BOTH_PHASES }
  end,
  ["per-request SLOs tighter than the global ones"] = function()
    return { budget = 256, cost = FITTED, tpot = 0.1, ttft = 10,
             requests = decoding(40, { { state = DECODE, prompt = 30, tpot = 0.02 },
                                       { state = WAITING, prompt = 64, ttft = 0.01 } }),
             jobs = BOTH_PHASES }
  end,
}

describe("the plan validator", function()
  local function check(items, fts)
    local w = build({ budget = 100, pages_free = 10, seqs_free = 1, jobs = BOTH_PHASES, requests = {
      { state = DECODE }, { state = PREFILL, prompt = 50, prefilled = 20 },
      { state = WAITING, prompt = 40, max_tokens = 40 },               -- 5 pages
      { state = WAITING, prompt = 40, max_tokens = 40 } } })
    for k, it in ipairs(items) do
      w.plan.items[k - 1].request, w.plan.items[k - 1].tokens = it[1], it[2]
    end
    for k, f in ipairs(fts or {}) do
      local e = w.plan.ft[k - 1]
      e.job, e.forward_tokens, e.backward_tokens = f[1], f[2], f[3] or 0
    end
    w.plan.n_items, w.plan.n_ft = #items, #(fts or {})
    local ok, err = U.validate(w.state, w.plan)
    return ok and "ok" or err
  end

  it("accepts a plan within every rule", function()
    assert.are.equal("ok", check({ { 0, 1 }, { 1, 30 }, { 2, 10 } }, { { 0, 50 }, { 1, 0, 450 } }))
  end)

  it("refuses each broken rule with the runtime's message", function()
    assert.matches("request index 4 outside", check({ { 4, 1 } }))
    assert.matches("appears twice", check({ { 1, 5 }, { 1, 5 } }))
    assert.matches("is decoding and gets 2 tokens", check({ { 0, 2 } }))
    assert.matches("gets 31 prompt tokens, 30 are left", check({ { 1, 31 } }))
    assert.matches("gets 0 prompt tokens", check({ { 1, 0 } }))
    assert.matches("needs a sequence slot", check({ { 2, 5 }, { 3, 5 } }))
    assert.matches("plan: 101 forward tokens", check({ { 1, 30 } }, { { 0, 71 } }))
    assert.matches("job %d+ gets 5 forward tokens %(phase 1", check({}, { { 1, 5, 0 } }))
    assert.matches("gets 451 backward tokens", check({}, { { 1, 0, 451 } }))
    assert.matches("gets 1 forward tokens %(phase 2", check({}, { { 2, 1, 0 } }))
    assert.matches("job 0 appears twice", check({}, { { 0, 1, 0 }, { 0, 1, 0 } }))
    assert.matches("negative token count", check({}, { { 0, -1, 0 } }))
    local w = build({ budget = 100, pages_free = 4, requests = { { state = WAITING, prompt = 40 } } })
    w.plan.items[0].request, w.plan.items[0].tokens, w.plan.n_items = 0, 10, 1
    assert.matches("needs 6 KV pages, 4 are left", select(2, U.validate(w.state, w.plan)))
    w.plan.n_items = 2
    assert.matches("capacity 1", select(2, U.validate(w.state, w.plan)))
  end)
end)

describe("every policy on every scenario", function()
  for _, name in ipairs(POLICIES) do
    for title, make in pairs(SCENARIOS) do
      it(name .. ": " .. title .. ": a valid plan within the budget", function()
        local w = build(make())
        local P = load(name, w)
        for iteration = 1, 3 do
          w.state.iteration = iteration
          step(P, w)
          local pre, dec, fwd = counts(w)
          assert.is_true(pre + dec + fwd <= w.state.max_batch_tokens)
        end
      end)
    end
  end
end)

describe("inference_only", function()
  it("never schedules finetuning, decodes before prefills, prefills in arrival order", function()
    local w = build({ budget = 256, pages_free = 100, requests = decoding(10, rep(5,
                      { state = WAITING, prompt = 100, max_tokens = 20 })), jobs = BOTH_PHASES })
    local P = load("inference_only", w)
    step(P, w)
    assert.are.equal(0, w.plan.n_ft)
    for k = 0, 9 do assert.are.equal(k, w.plan.items[k].request) end
    -- 246 tokens left: requests 10 and 11 whole, 46 tokens of request 12.
    assert.are.equal(13, w.plan.n_items)
    assert.are.same({ 10, 100 }, { w.plan.items[10].request, w.plan.items[10].tokens })
    assert.are.same({ 12, 46 }, { w.plan.items[12].request, w.plan.items[12].tokens })
  end)

  it("stops admitting at a request whose pages do not fit but goes on with admitted ones", function()
    local w = build({ budget = 512, pages_free = 10, requests = {
      { state = WAITING, prompt = 300, max_tokens = 10 },        -- 20 pages: refused
      { state = WAITING, prompt = 20, max_tokens = 10 },         -- 2 pages, but behind it
      { state = PREFILL, prompt = 200, prefilled = 50 } } })
    local P = load("inference_only", w)
    step(P, w)
    assert.are.equal(1, w.plan.n_items)
    assert.are.same({ 2, 150 }, { w.plan.items[0].request, w.plan.items[0].tokens })
  end)

  it("admits no more requests than there are sequence slots", function()
    local w = build({ budget = 512, seqs_free = 2, requests = rep(4, { state = WAITING, prompt = 20 }) })
    step(load("inference_only", w), w)
    assert.are.equal(2, w.plan.n_items)
  end)
end)

describe("finetune_only", function()
  it("never schedules inference and splits the budget across the jobs by phase", function()
    local w = build({ budget = 256, requests = decoding(10), jobs = {
      { phase = FORWARD, sample_len = 1000 }, { phase = FORWARD, sample_len = 1000 },
      { phase = BACKWARD, sample_len = 500, forwarded = 500, backward_left = 500 },
      { phase = DONE } } })
    local P = load("finetune_only", w)
    step(P, w)
    assert.are.equal(0, w.plan.n_items)
    local _, _, fwd, bwd = counts(w)
    assert.are.equal(3, w.plan.n_ft)
    -- Unfitted: a backward token weighs one forward token, so three shares of 85 (+1 left).
    assert.is_true(fwd >= 170 and fwd <= 171, "forward " .. fwd)
    assert.is_true(bwd >= 85 and bwd <= 86, "backward " .. bwd)
    assert.are.equal(256, fwd + bwd)
  end)

  it("gives a job's unused share to the others", function()
    local w = build({ budget = 256, jobs = { { phase = FORWARD, sample_len = 10 },
                                              { phase = FORWARD, sample_len = 1000 } } })
    local P = load("finetune_only", w)
    step(P, w)
    local _, _, fwd = counts(w)
    assert.are.equal(256, fwd)
  end)
end)

describe("hybrid", function()
  it("schedules every decode and finetunes in the time the TPOT budget leaves", function()
    local w = build({ budget = 512, cost = FITTED, tpot = 0.05, requests = decoding(100),
                      jobs = BOTH_PHASES })
    local P = load("hybrid", w)
    step(P, w)
    local seen = {}
    for k = 0, w.plan.n_items - 1 do seen[w.plan.items[k].request] = true end
    for i = 0, 99 do assert.is_true(seen[i], "decode of request " .. i) end
    local _, _, fwd, bwd = counts(w)
    assert.is_true(fwd > 0 and bwd > 0)
    local t = predicted(w)
    assert.is_true(t <= 0.9 * 0.05 + 1e-4, "predicted " .. t)
    assert.is_true(t >= 0.9 * 0.05 - 3e-4, "finetuning should fill the budget, predicted " .. t)
  end)

  it("finetunes not at all when the decodes use up the TPOT budget", function()
    local w = build(SCENARIOS["decodes alone past the TPOT budget"]())
    local P = load("hybrid", w)
    step(P, w)
    assert.are.equal(0, w.plan.n_ft)
    local pre, dec = counts(w)
    assert.are.equal(200, dec)
    assert.are.equal(32, pre) -- min_prefill still moves the waiting request along
  end)

  it("prefills a TTFT-pressured request before a newer one and an older relaxed one", function()
    local w = build({ budget = 256, now = 100, cost = FITTED, tpot = 0.05, ttft = 10, requests = {
      { state = WAITING, prompt = 400, arrival = 99.0 },              -- 10% of its TTFT
      { state = WAITING, prompt = 400, arrival = 99.2, ttft = 1 },    -- 80%: pressured
      { state = WAITING, prompt = 400, arrival = 99.9 } } })
    local P = load("hybrid", w)
    step(P, w)
    assert.are.same({ 1, 256 }, { w.plan.items[0].request, w.plan.items[0].tokens })
    assert.are.equal(1, w.plan.n_items)
  end)

  it("lets a pressured request past the time limit that holds others to small chunks", function()
    local reqs = decoding(150, { { state = WAITING, prompt = 400, arrival = 99.9 },
                                 { state = WAITING, prompt = 400, arrival = 96 } })
    local w = build({ budget = 512, now = 100, cost = FITTED, tpot = 0.05, ttft = 5,
                      requests = reqs })
    local P = load("hybrid", w)
    step(P, w)
    local first = w.plan.items[150]
    assert.are.same({ 151, 362 }, { first.request, first.tokens })
    assert.are.equal(151, w.plan.n_items)
  end)

  it("plans larger backward chunks when the model has a per-chunk constant", function()
    -- A CPU-like machine whose backward chunk has a large fixed cost (the truth), and the
    -- same machine as a fit without the chunk term sees it at 16-token chunks: the constant
    -- spread over the backward tokens.
    local truth = { fixed = 0.002, prefill = 3e-4, decode = 1e-4, forward = 3e-4,
                    backward = 3.5e-4, context = 0, chunk = 0.012, fitted = 500 }
    local folded = {}
    for k, v in pairs(truth) do folded[k] = v end
    folded.backward, folded.chunk = truth.backward + truth.chunk / 16, 0
    local function plan_with(cost)
      local w = build({ budget = 256, cost = cost, tpot = 0.1, requests = decoding(10),
                        jobs = { { phase = BACKWARD, sample_len = 600, forwarded = 600,
                                   backward_left = 600 } } })
      step(load("hybrid", w), w)
      local _, _, _, bwd, _, chunks = counts(w)
      return bwd, chunks, predicted(w, truth)
    end
    local with_chunk, chunks, t_chunk = plan_with(truth)
    local without, _, t_folded = plan_with(folded)
    assert.are.equal(1, chunks)
    assert.is_true(with_chunk > 2 * without, ("chunk %d vs %d"):format(with_chunk, without))
    -- Its plan fills the budget on the true machine, within one backward token; the folded
    -- model's leaves much of it idle.
    assert.is_true(t_chunk <= 0.09 + 1e-9 and t_chunk > 0.09 - truth.backward,
                   "predicted " .. t_chunk)
    assert.is_true(t_folded < 0.6 * 0.09, "predicted " .. t_folded)
  end)

  it("runs no backward chunk whose constant the time left cannot pay", function()
    local cost = { fixed = 0.002, prefill = 3e-4, decode = 1e-4, forward = 3e-4,
                   backward = 3.5e-4, context = 0, chunk = 0.05, fitted = 500 }
    local w = build({ budget = 256, cost = cost, tpot = 0.05, requests = decoding(10),
                      jobs = { { phase = BACKWARD, sample_len = 600, forwarded = 600,
                                 backward_left = 600 } } })
    step(load("hybrid", w), w)
    assert.are.equal(0, w.plan.n_ft)
  end)

  it("gives finetuning the whole budget when nothing decodes and nothing waits", function()
    local w = build({ budget = 256, cost = FITTED, tpot = 0.05,
                      jobs = { { phase = FORWARD, sample_len = 2000 } } })
    local P = load("hybrid", w)
    step(P, w)
    local _, _, fwd = counts(w)
    assert.are.equal(256, fwd)
  end)

  it("keeps finetuning to its share without SLOs fitted, fills the budget without SLOs", function()
    local reqs = decoding(10, { { state = WAITING, prompt = 100 } })
    local jobs = { { phase = FORWARD, sample_len = 2000 } }
    local w = build({ budget = 256, tpot = 0.05, requests = reqs, jobs = jobs })
    step(load("hybrid", w), w)
    local pre, dec, fwd = counts(w)
    assert.are.same({ 100, 10, 64 }, { pre, dec, fwd })

    w = build({ budget = 256, cost = FITTED, requests = reqs, jobs = jobs })
    step(load("hybrid", w), w)
    pre, dec, fwd = counts(w)
    assert.are.same({ 100, 10, 146 }, { pre, dec, fwd })
  end)

  it("prints its time per call over 256 requests", function()
    -- The policy host runs policies with the JIT off (its time budget needs the instruction
    -- hook); both modes are printed.
    local reqs = decoding(224)
    for i = 1, 32 do
      reqs[#reqs + 1] = { state = i % 2 == 0 and WAITING or PREFILL, prompt = 6 + i % 8,
                          prefilled = i % 2 == 0 and 0 or 5, arrival = 99 - i * 0.01 }
    end
    local w = build({ budget = 1024, pages_free = 2000, cost = FITTED, tpot = 0.1, ttft = 5,
                      requests = reqs, jobs = BOTH_PHASES })
    local P = load("hybrid", w)
    step(P, w)
    local function per_call(n)
      local t0 = os.clock()
      for i = 1, n do
        w.plan.n_items, w.plan.n_ft = 0, 0
        w.state.iteration = i
        P.schedule()
      end
      return (os.clock() - t0) / n * 1e6
    end
    local jitted = per_call(5000)
    jit.off()
    jit.flush()
    local interpreted = per_call(500)
    jit.on()
    print(("# hybrid over 256 requests and 4 jobs (%d items, %d ft entries): %.1f us per call"
           .. " with the JIT, %.1f us interpreted"):format(w.plan.n_items, w.plan.n_ft, jitted,
           interpreted))
  end)
end)

describe("temporal", function()
  local function ft_iterations(P, w, from, to)
    local got = {}
    for i = from, to do
      w.state.iteration = i
      step(P, w)
      assert.is_true((w.plan.n_ft > 0) ~= (w.plan.n_items > 0), "iteration " .. i .. " mixes")
      if w.plan.n_ft > 0 then got[#got + 1] = i end
    end
    return got
  end
  local both = { budget = 256, requests = decoding(20), jobs = BOTH_PHASES }

  it("finetunes exactly on every N-th iteration", function()
    local w = build(both)
    assert.are.same({ 8, 16, 24, 32, 40 }, ft_iterations(load("temporal", w, { every = 8 }), w, 1, 40))
    w = build(both)
    assert.are.same({ 64, 128 }, ft_iterations(load("temporal", w), w, 1, 130))
  end)

  it("runs a window of finetuning iterations at the end of each cycle", function()
    local w = build(both)
    local P = load("temporal", w, { every = 5, window = 2 })
    assert.are.same({ 4, 5, 9, 10, 14, 15 }, ft_iterations(P, w, 1, 15))
  end)

  it("moves with iterations, not calls: a repeated iteration number is the same iteration", function()
    local w = build(both)
    local P = load("temporal", w, { every = 4 })
    assert.are.same({ 4 }, ft_iterations(P, w, 1, 4))
    assert.are.same({ 4 }, ft_iterations(P, w, 4, 4))
    assert.are.same({ 8 }, ft_iterations(P, w, 5, 8))
  end)

  it("carries its position across a reload", function()
    local w = build(both)
    local P = load("temporal", w, { every = 8 })
    assert.are.same({ 8 }, ft_iterations(P, w, 1, 10))
    local saved = P.export_state()
    local Q = load("temporal", w, { every = 8 }, saved)
    assert.are.same({ 16, 24 }, ft_iterations(Q, w, 11, 25))
  end)

  it("runs the other kind when its kind has no work", function()
    local w = build({ budget = 256, jobs = BOTH_PHASES })
    local P = load("temporal", w, { every = 8 })
    w.state.iteration = 1
    step(P, w)
    assert.is_true(w.plan.n_ft > 0)
    w = build({ budget = 256, requests = decoding(3) })
    P = load("temporal", w, { every = 1 })
    step(P, w)
    assert.are.equal(3, w.plan.n_items)
  end)
end)

describe("static_split", function()
  for _, share in ipairs({ 0.25, 0.1, 0.5, 0.33 }) do
    it("reserves " .. share .. " of the budget for finetuning", function()
      local w = build({ budget = 300, requests = decoding(10, { { state = WAITING, prompt = 900 } }),
                        jobs = { { phase = FORWARD, sample_len = 4000 },
                                 { phase = FORWARD, sample_len = 4000 } } })
      step(load("static_split", w, { share = share }), w)
      local pre, dec, fwd = counts(w)
      assert.is_true(math.abs(fwd - share * 300) <= 1, "forward " .. fwd)
      assert.are.equal(300 - fwd, pre + dec)
    end)
  end

  it("gives inference the whole budget when no job has work", function()
    local w = build({ budget = 300, requests = { { state = WAITING, prompt = 900 } },
                      jobs = { { phase = DONE } } })
    step(load("static_split", w), w)
    assert.are.equal(300, w.plan.items[0].tokens)
  end)
end)

describe("options", function()
  it("are checked at load with a message naming the option", function()
    local w = build({ budget = 256 })
    assert.has_error(function() load("temporal", w, { every = 0 }) end,
      "option 'every' must be a whole number in [1, inf], got 0")
    assert.has_error(function() load("static_split", w, { share = 2 }) end,
      "option 'share' must be a number in [0, 1], got 2")
    assert.has_error(function() load("hybrid", w, { margin = "high" }) end,
      "option 'margin' must be a number in [0, 1], got high")
  end)
end)

-- A tiny system driven by a policy: requests arrive over the first 100 iterations, advance
-- by the plans (prefill, first token when the prompt is in, decode to max_tokens, pages and
-- one of 6 sequence slots held from admission to the end), and the clock moves by the cost
-- model's prediction. Two jobs train throughout. Runs 200 iterations; returns the finished
-- requests, those still live, and the jobs.
local function simulate(name)
  math.randomseed(7)
  local arrivals = {}
  for i = 1, 40 do
    arrivals[i] = { at = math.floor(i * 2.5), prompt = math.random(8, 160),
                    max_tokens = math.random(1, 24) }
  end
  local st = { budget = 128, pages_total = 80, cost = FITTED, tpot = 0.05, ttft = 1,
               jobs = { { phase = FORWARD, sample_len = 100 }, { phase = FORWARD, sample_len = 60 } },
               requests = {}, cap_items = 64, cap_ft = 2 }
  local w = build(st)
  local s, plan = w.state, w.plan
  local reqs = ffi.new("fl_sched_request[?]", 64)
  w.keep[#w.keep + 1] = reqs
  s.requests = reqs
  local P = load(name, w)
  local live, finished, next_arrival = {}, {}, 1
  for iteration = 1, 200 do
    s.iteration = iteration
    while arrivals[next_arrival] and arrivals[next_arrival].at <= iteration do
      local a = arrivals[next_arrival]
      live[#live + 1] = { id = next_arrival, state = WAITING, prompt_len = a.prompt, prefilled = 0,
                          generated = 0, max_tokens = a.max_tokens, kv_pages = 0,
                          pages_needed = pages_for(a.prompt + a.max_tokens), arrival = s.now,
                          first_token = -1 }
      next_arrival = next_arrival + 1
    end
    local held, admitted = 0, 0
    for i, r in ipairs(live) do
      local q = reqs[i - 1]
      q.id, q.state, q.prompt_len, q.prefilled, q.generated = r.id, r.state, r.prompt_len,
        r.prefilled, r.generated
      q.max_tokens, q.kv_pages, q.pages_needed = r.max_tokens, r.kv_pages, r.pages_needed
      q.arrival, q.first_token = r.arrival, r.first_token
      held = held + r.kv_pages
      if r.state ~= WAITING then admitted = admitted + 1 end
    end
    s.n_requests, s.kv_pages_free, s.seqs_free = #live, 80 - held, 6 - admitted
    step(P, w)
    local took = predicted(w)
    s.now = s.now + took
    for k = 0, plan.n_items - 1 do
      local it = plan.items[k]
      local r = live[it.request + 1]
      if r.state == DECODE then
        r.generated = r.generated + 1
      else
        if r.state == WAITING then r.state, r.kv_pages = PREFILL, r.pages_needed end
        r.prefilled = r.prefilled + it.tokens
        if r.prefilled == r.prompt_len then
          r.state, r.generated, r.first_token = DECODE, 1, s.now
        end
      end
    end
    for k = 0, plan.n_ft - 1 do
      local f = plan.ft[k]
      local j = s.jobs[f.job]
      j.forwarded, j.tokens = j.forwarded + f.forward_tokens, j.tokens + f.forward_tokens
      j.backward_left = j.backward_left - f.backward_tokens
      if j.phase == FORWARD and j.forwarded == j.sample_len then
        j.phase, j.backward_left = BACKWARD, j.sample_len
      elseif j.phase == BACKWARD and j.backward_left == 0 then
        j.phase, j.forwarded, j.step = FORWARD, 0, j.step + 1
      end
    end
    local kept = {}
    for _, r in ipairs(live) do
      if r.state == DECODE and r.generated >= r.max_tokens then
        finished[#finished + 1] = r
      else
        kept[#kept + 1] = r
      end
    end
    live = kept
  end
  return finished, live, s.jobs
end

describe("a simulated system", function()
  for _, name in ipairs({ "hybrid", "static_split" }) do
    it(name .. ": completes every request while both jobs train", function()
      local finished, live, jobs = simulate(name)
      assert.are.equal(0, #live)
      assert.are.equal(40, #finished)
      for j = 0, 1 do
        assert.is_true(jobs[j].tokens > 0 and jobs[j].step > 0,
          ("job %d: %d tokens, %d steps"):format(j, tonumber(jobs[j].tokens), jobs[j].step))
      end
      print(("# %s: 40 requests done; jobs at %d and %d forward tokens, %d and %d steps")
            :format(name, tonumber(jobs[0].tokens), tonumber(jobs[1].tokens), jobs[0].step, jobs[1].step))
    end)
  end
end)
