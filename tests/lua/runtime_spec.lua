-- The co-serving runtime from Lua: requests and a finetuning job through one policy,
-- streamed events, reloads, and the stats a server reports.
local fl = require "flexllm"

local tmp = "build/tmp/runtime_spec"
os.execute("rm -rf " .. tmp .. " && mkdir -p " .. tmp)
assert(fl.init_model(tmp .. "/model", { dim = 64, hidden_dim = 160, n_layers = 2, n_heads = 4,
                                        n_kv_heads = 2, seed = 9 }))
local f = assert(io.open(tmp .. "/data.txt", "wb"))
for _ = 1, 30 do f:write("a small cat sat on a small mat. ") end
f:close()

describe("the runtime driven from Lua", function()
  local model = assert(fl.load(tmp .. "/model"))
  local ctx = assert(model:context({ max_batch_tokens = 64 }))

  local function drive(rt, ids)
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
    local want = drive(plain, ids)

    local rt = assert(ctx:runtime({ policy = "policies/hybrid.lua", tpot_slo = 1.0, ttft_slo = 10 }))
    local job = assert(ctx:finetune({ data = tmp .. "/data.txt", out = tmp .. "/ad", rank = 2,
                                      seq_len = 32, max_steps = 3, seed = 1 }))
    assert.is_number(rt:add_job(job))
    assert.has_error(function() job:step(10) end,
      "this finetuning job runs in a runtime: step the runtime instead")
    local got_ids = {}
    for i = 1, 5 do got_ids[i] = assert(rt:submit(model:encode("a cat " .. i), { max_tokens = 10, ignore_eos = true })) end
    local got, done = drive(rt, got_ids)
    assert.are.equal(5, done)
    for i = 1, 5 do assert.are.equal(want[ids[i]], got[got_ids[i]]) end
    local st = rt:stats()
    assert.is_true(st.policy_calls > 0)
    assert.are.equal(0, st.policy_failures)
    assert.is_true(st.ft_forward_tokens > 0)
    assert.is_true(job:progress().done)
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
