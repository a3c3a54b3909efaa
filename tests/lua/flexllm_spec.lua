-- The Lua API: loading, tokenizing, batched streaming generation, and its errors.
local fl = require "flexllm"
local cjson = require "cjson"

local shared = os.getenv("FLEXLLM_SHARED") or "../shared"
local stories = shared .. "/models/stories260K"
local function exists(path)
  local f = io.open(path, "rb")
  if f then f:close() end
  return f ~= nil
end
local have_stories = exists(stories .. "/config.json")

local function read(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("*a")
  f:close()
  return s
end

describe("flexllm on stories260K", function()
  if not have_stories then
    pending("stories260K absent: set FLEXLLM_SHARED or put shared/ beside the checkout")
    return
  end
  local model = assert(fl.load(stories))
  local expected = cjson.decode(read(stories .. "/expected_greedy_from_bos_80.json"))

  it("reads the config", function()
    local c = model:config()
    assert.are.same({ "llama", 64, 5, 8, 4, 512 }, { c.arch, c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size })
  end)

  it("generates llama2.c's greedy ids from BOS", function()
    local r = assert(model:generate({ 1 }, { max_tokens = 80, ignore_eos = true }))
    assert.are.same(expected, r.ids)
    assert.are.equal("length", r.finish)
  end)

  it("streams text between iterations, and the pieces add up to the whole", function()
    local pieces = {}
    local r = assert(model:generate("", { max_tokens = 30 }, function(i, ev) pieces[#pieces + 1] = ev.text end))
    assert.is_true(#pieces >= 10)
    assert.are.equal(r.text, table.concat(pieces))
    assert.are.equal("Once upon a time", r.text:sub(1, 16))
  end)

  it("gives each prompt of a batch the ids it gets alone", function()
    local prompts = { "Once upon a time", "The dog ran", "Lily and Tom went to the park to play" }
    local batch = assert(model:generate(prompts, { max_tokens = 20, ignore_eos = true, prefill_chunk = 3 }))
    for i, p in ipairs(prompts) do
      local alone = assert(model:generate(p, { max_tokens = 20, ignore_eos = true }))
      assert.are.same(alone.ids, batch[i].ids)
    end
  end)

  it("round-trips text through encode and decode", function()
    local text = "Once upon a time, there was a little girl named Lily. She liked to play!"
    local ids = model:encode(text, { bos = false })
    assert.are.equal(text, model:decode(ids))
    assert.are.equal(1, model:encode(text)[1]) -- add_bos_token from tokenizer_config.json
  end)

  it("returns every KV page when the requests finish", function()
    local ctx = model:context()
    assert(model:generate({ "a", "b", "c" }, { max_tokens = 5 }))
    local free, total = ctx:kv_pages()
    assert.are.equal(total, free)
  end)

  it("refuses a bad request with a message and keeps working", function()
    local r, err = model:generate("hi", { max_tokens = 100000 })
    assert.is_nil(r)
    assert.matches("exceeds the model's context of 512", err)
    assert.has_error(function() model:generate("hi", { max_tokens = "many" }) end,
      "option 'max_tokens' must be a number")
    assert.truthy(model:generate("hi", { max_tokens = 2 }))
  end)
end)

describe("flexllm loading errors", function()
  it("names the missing config.json", function()
    local m, err = fl.load("/nonexistent/model")
    assert.is_nil(m)
    assert.matches("/nonexistent/model/config.json", err, 1, true)
  end)
end)
