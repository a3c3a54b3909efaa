-- Finetuning from Lua: a job trained step by step, its live adapter used by generation,
-- the PEFT folder it writes loaded back, and the options it refuses.
local fl = require "flexllm"

local tmp = require("tiny_model").setup("finetune_spec", 4,
                                        "the cat sat on the mat. the dog sat on the log. ", 40)

describe("a finetuning job driven from Lua", function()
  local model = assert(fl.load(tmp .. "/model"))
  local ctx = assert(model:context({ max_batch_tokens = 64 }))

  it("trains, lowers its loss, and writes a PEFT adapter that generation can use", function()
    local job = assert(ctx:finetune({ data = tmp .. "/data.txt", out = tmp .. "/out", targets = "all",
                                      rank = 4, lr = 3e-3, seq_len = 48, chunk = 16, seed = 2,
                                      epochs = 3 }))
    local first
    while true do
      local running, err = job:step(32)
      assert.is_not_nil(running, err)
      local p = job:progress()
      if p.step >= 1 and not first then first = p.loss end
      if not running then break end
    end
    local p = job:progress()
    assert.is_true(p.done)
    assert.are.equal(p.total_steps, p.step)
    assert.is_true(p.loss < first - 0.5, ("loss %.3f -> %.3f"):format(first, p.loss))

    local live, loaded = job:adapter(), assert(model:load_adapter(tmp .. "/out"))
    local opts = { max_tokens = 12, ignore_eos = true }
    local base = assert(model:generate("the cat", opts))
    opts.adapter = live
    local tuned = assert(model:generate("the cat", opts))
    opts.adapter = loaded
    local again = assert(model:generate("the cat", opts))
    assert.are_not.same(base.ids, tuned.ids)
    assert.are.same(tuned.ids, again.ids)
  end)

  it("refuses bad options with a message", function()
    local job, err = ctx:finetune({ data = tmp .. "/missing.txt", out = tmp .. "/x" })
    assert.is_nil(job)
    assert.matches("missing.txt", err, 1, true)
    assert.has_error(function() ctx:finetune({ data = tmp .. "/data.txt", out = tmp .. "/x",
                                               optimizer = "adam" }) end,
      'option \'optimizer\' must be "adamw" or "sgd", got "adam"')
    job, err = ctx:finetune({ data = tmp .. "/data.txt", out = tmp .. "/x", targets = "q,zz" })
    assert.is_nil(job)
    assert.matches("unknown LoRA target 'zz'", err, 1, true)
  end)
end)
