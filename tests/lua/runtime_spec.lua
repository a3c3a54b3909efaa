-- The co-serving runtime from Lua: requests and a finetuning job through one policy,
-- streamed events, reloads, cancellation, per-request SLOs, preemption, and the stats a
-- server reports.
local fl = require "flexllm"

local tmp = require("tiny_model").setup("runtime_spec", 9, "a small cat sat on a small mat. ", 30)

describe("the runtime driven from Lua", function()
  local model = assert(fl.load(tmp .. "/model"))
  local ctx = assert(model:context({ max_batch_tokens = 64 }))

  local function drive(rt)
    local texts, done = {}, 0
    for _ = 1, 2000 do
      if rt:active() == 0 then break end
      for _, ev in ipairs(assert(rt:step())) do
        texts[ev.request] = (texts[ev.request] or "") .. ev.text
        if ev.finish then done = done + 1 end
      end
    end
    return texts, done
  end

  it("co-serves requests and a job under the hybrid policy, same text as without the job", function()
    local plain = assert(ctx:runtime())
    local ids = {}
    for i = 1, 5 do ids[i] = assert(plain:submit(model:encode("a cat " .. i), { max_tokens = 10, ignore_eos = true })) end
    local want = drive(plain)

    local rt = assert(ctx:runtime({ policy = "policies/hybrid.lua", tpot_slo = 1.0, ttft_slo = 10 }))
    local job = assert(ctx:finetune({ data = tmp .. "/data.txt", out = tmp .. "/ad", rank = 2,
                                      seq_len = 32, max_steps = 3, seed = 1 }))
    assert.is_number(rt:add_job(job))
    assert.has_error(function() job:step(10) end,
      "this finetuning job runs in a runtime: step the runtime instead")
    local got_ids = {}
    for i = 1, 5 do got_ids[i] = assert(rt:submit(model:encode("a cat " .. i), { max_tokens = 10, ignore_eos = true })) end
    local got, done = drive(rt)
    assert.are.equal(5, done)
    for i = 1, 5 do assert.are.equal(want[ids[i]], got[got_ids[i]]) end
    local st = rt:stats()
    assert.is_true(st.policy_calls > 0)
    assert.are.equal(0, st.policy_failures)
    assert.is_true(st.ft_forward_tokens > 0)
    assert.is_true(job:progress().done)
  end)

  -- Every event by request id: token ids, finish events, and events after a finish.
  local function trace(rt, tr, steps)
    tr = tr or { ids = {}, fin = {}, late = {}, gone = {} }
    for _ = 1, steps or 100000 do
      if rt:active() == 0 then break end
      for _, ev in ipairs(assert(rt:step())) do
        local r = ev.request
        if tr.fin[r] or tr.gone[r] then tr.late[r] = (tr.late[r] or 0) + 1 end
        tr.ids[r] = tr.ids[r] or {}
        table.insert(tr.ids[r], ev.token)
        if ev.finish then tr.fin[r] = ev end
      end
    end
    return tr
  end

  local function prompt(k) return model:encode("the cat " .. k .. " sat") end

  it("cancels a running and a queued request: the others as without them, the pool whole", function()
    local small = assert(model.handle:context({ max_batch_tokens = 64, max_seqs = 2 }))
    local ref_rt = assert(small:runtime())
    for k = 2, 4 do assert(ref_rt:submit(prompt(k), { max_tokens = 10, ignore_eos = true })) end
    local ref = trace(ref_rt)

    local rt = assert(small:runtime())
    local ids = {}
    for k = 1, 5 do ids[k] = assert(rt:submit(prompt(k), { max_tokens = 10, ignore_eos = true })) end
    local tr = trace(rt, nil, 3)
    assert.is_true(#tr.ids[ids[1]] >= 1 and not tr.fin[ids[1]] and tr.ids[ids[5]] == nil)
    assert.is_true(rt:cancel(ids[1]))
    assert.is_true(rt:cancel(ids[5]))
    tr.gone[ids[1]], tr.gone[ids[5]] = true, true
    local ok, err = rt:cancel(ids[1])
    assert.is_nil(ok)
    assert.matches("is not queued or running", err, 1, true)
    trace(rt, tr)
    for k = 2, 4 do assert.are.same(ref.ids[k - 2], tr.ids[ids[k]]) end
    assert.is_nil(tr.late[ids[1]])
    assert.is_nil(tr.ids[ids[5]])
    local st = rt:stats()
    assert.are.equal(2, st.requests_cancelled)
    assert.are.equal(3, st.requests_done)
    local free, total = small:kv_pages()
    assert.are.equal(total, free)
  end)

  it("cancels a finetuning job: done, error 'cancelled', its adapter still generates", function()
    local rt = assert(ctx:runtime())
    local job = assert(ctx:finetune({ data = tmp .. "/data.txt", out = tmp .. "/cancelled", rank = 2,
                                      seq_len = 32, max_steps = 50, seed = 1 }))
    local id = assert(rt:add_job(job))
    for _ = 1, 3 do assert(rt:step()) end
    assert.is_false(rt:job_done(id))
    assert.is_true(rt:cancel_job(id))
    assert.is_true(rt:job_done(id))
    assert.are.equal("cancelled", rt:job_error(id))
    local ok, err = rt:cancel_job(id)
    assert.is_nil(ok)
    assert.matches("already failed", err, 1, true)
    ok, err = rt:job_done(99)
    assert.is_nil(ok)
    assert.matches("no finetuning job 99", err, 1, true)
    assert.are.equal(0, rt:active())
    local free, total = ctx:kv_pages()
    assert.are.equal(total, free)
    local r = assert(rt:submit(prompt(1), { max_tokens = 3, adapter = job:adapter() }))
    assert.is_table(trace(rt).fin[r])
  end)

  it("reports each request's ttft, tpot and SLO verdict in its finish event", function()
    local rt = assert(ctx:runtime({ tpot_slo = 1e3 }))
    local tight = assert(rt:submit(prompt(1), { max_tokens = 4, ttft_slo = 1e-9 }))
    local lax = assert(rt:submit(prompt(2), { max_tokens = 4, ttft_slo = 1e3 }))
    local fin = trace(rt).fin
    assert.is_false(fin[tight].slo_met)
    assert.is_true(fin[lax].slo_met)
    for _, ev in ipairs({ fin[tight], fin[lax] }) do
      assert.is_true(ev.ttft > 0 and ev.ttft < 1e3)
      assert.is_true(ev.tpot >= 0 and ev.tpot < 1e3)
    end
    assert.are.equal(1, rt:stats().requests_slo_met)
    assert.has_error(function() rt:submit(prompt(1), { ttft_slo = "soon" }) end,
      "option 'ttft_slo' must be a number")
  end)

  it("preempts in a small pool and gives the outputs of a large one", function()
    local function run(c)
      local rt = assert(c:runtime({ policy = "policies/hybrid.lua" }))
      for k = 1, 6 do
        assert(rt:submit(prompt(k), { max_tokens = 60, ignore_eos = true,
                                      temperature = k == 2 and 1 or 0, seed = k }))
      end
      return trace(rt), rt:stats()
    end
    local want = run(ctx)
    local small = assert(model.handle:context({ max_batch_tokens = 64, kv_pages = 10 }))
    local got, st = run(small)
    assert.is_true(st.preemptions > 0)
    assert.are.equal(0, st.policy_failures)
    for k = 0, 5 do
      assert.are.equal(60, #got.ids[k])
      assert.are.same(want.ids[k], got.ids[k])
      assert.is_nil(got.late[k])
    end
    local free, total = small:kv_pages()
    assert.are.equal(total, free)
  end)

  it("reports a failing reload and keeps the policy", function()
    local rt = assert(ctx:runtime({ policy = "policies/inference_only.lua" }))
    local ok, err = rt:reload("tests/policies/rt_raises.lua")
    assert.is_nil(ok)
    assert.matches("dry run failed", err, 1, true)
    assert.is_true(assert(rt:reload("policies/hybrid.lua")))
    assert.are.equal(1, rt:stats().reloads)
  end)
end)
