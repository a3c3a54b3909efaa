-- The forward pass against an independent float64 NumPy reference of Hugging Face's
-- LLaMA / Qwen2 (tests/reference/hf_reference.py): Qwen2 biases, tied and untied
-- embeddings, LLaMA-3.1 rope scaling, GQA group sizes 1-4, explicit head_dim,
-- F32/F16/BF16 weights, sharded safetensors, chunked prefill, LLaMA attention_bias
-- (which also biases o_proj).
local fl = require "flexllm"
local cjson = require "cjson"

local out = "build/tmp/hf_reference"
local log = "build/tmp/hf_reference.log"

local function read(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  return s
end

-- Builds the fixtures once per run; returns the case list, or nil and why not.
local function make_fixtures()
  os.execute("mkdir -p build/tmp")
  local rc = os.execute("tests/reference/make_fixtures.sh " .. out .. " >" .. log .. " 2>&1")
  if rc ~= 0 and rc ~= true then
    local msg = (read(log) or ""):match("make_fixtures: ([^\n]*)") or "see " .. log
    return nil, msg
  end
  local text = read(out .. "/cases.json")
  if not text then return nil, out .. "/cases.json missing" end
  return cjson.decode(text)
end

-- Max |got - want| over every position and token, where it is, and whether every
-- position's argmax agrees (the first position where it does not).
local function compare(got, want)
  local err, at_pos, at_tok, max_want, argmax_bad = 0, 0, 0, 0, nil
  assert.are.equal(#want, #got, "positions")
  for p = 1, #want do
    local g, w = got[p], want[p]
    assert.are.equal(#w, #g, "vocab at position " .. p)
    local gi, wi = 1, 1
    for t = 1, #w do
      local d = math.abs(g[t] - w[t])
      if d ~= d then d = math.huge end -- NaN from the engine
      if d > err then err, at_pos, at_tok = d, p, t end
      if math.abs(w[t]) > max_want then max_want = math.abs(w[t]) end
      if g[t] > g[gi] then gi = t end
      if w[t] > w[wi] then wi = t end
    end
    if gi ~= wi and not argmax_bad then
      argmax_bad = ("position %d: engine argmax %d, reference %d"):format(p - 1, gi - 1, wi - 1)
    end
  end
  return err, at_pos - 1, at_tok - 1, max_want, argmax_bad
end

describe("flexllm against the HF reference", function()
  local cases, why = make_fixtures()
  if not cases then
    pending("HF reference fixtures unavailable: " .. why)
    return
  end

  for _, case in ipairs(cases) do
    local dir = out .. "/" .. case.name
    describe(case.name, function()
      local model, want
      local function load()
        if not want then
          local text = assert(read(dir .. "/expected.json"), dir .. "/expected.json missing")
          want = cjson.decode(text)
          model = assert(fl.load(dir))
        end
        return model, want
      end

      local function check(opts)
        local m, w = load()
        local ctx = assert(m:context(opts))
        local got = assert(ctx:logits(w.prompt))
        local err, pos, tok, max_want, argmax_bad = compare(got, w.logits)
        local tol = 1e-4 * math.max(1, max_want)
        assert.is_true(err <= tol, ("%s: max |engine - reference| = %.3g at position %d token %d "
          .. "(tolerance %.3g, max |logit| %.3g)"):format(case.name, err, pos, tok, tol, max_want))
        assert.is_nil(argmax_bad, ("%s: greedy ids differ at %s"):format(case.name, tostring(argmax_bad)))
      end

      it(("gives the reference logits at all %d positions (%s, %d shard%s)"):format(
        case.positions, case.dtype, case.shards, case.shards > 1 and "s" or ""), function()
        check(nil)
      end)

      it("gives them too when the prompt runs in chunks of 7 tokens", function()
        check({ max_batch_tokens = 7 })
      end)
    end)
  end
end)
