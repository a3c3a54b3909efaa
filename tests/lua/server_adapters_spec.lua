-- The adapter registry: on-demand loads, least-recently-used eviction under a budget,
-- adapters in use never evicted, lifecycle hooks, and real PEFT folders through
-- model:load_adapter.
local adapters = require "flexllm.adapters"

-- A loader that records its loads; every adapter of dir "d<n>" holds n bytes.
local function recorder()
  local loads = {}
  local function load(dir)
    if dir == "broken" then return nil, "cannot read broken/adapter_config.json" end
    loads[#loads + 1] = dir
    return { dir = dir }
  end
  local function bytes(h) return tonumber(h.dir:match("^d(%d+)")) end
  return loads, load, bytes
end

-- A registry on the recorder, knowing `known` (name -> dir) to begin with.
local function registry(budget, hooks, known)
  local loads, load, bytes = recorder()
  local logged = {}
  local r = adapters.new({ load = load, bytes = bytes, budget = budget, hooks = hooks,
                           log = function(m) logged[#logged + 1] = m end })
  for name, dir in pairs(known or {}) do assert(r:add(name, dir)) end
  return r, loads, logged
end

local function resident(r)
  local out = {}
  for _, a in ipairs(r:list()) do if a.resident then out[#out + 1] = a.name end end
  return out
end

-- acquire and release at once: a request that came and went
local function use(r, name)
  local h, e, status = r:acquire(name)
  if h then r:release(e) end
  return h, e, status
end

describe("the adapter registry", function()
  it("loads on first use only, and evicts the least recently used to fit the budget", function()
    local r, loads = registry(300, nil, { a = "d100-a", b = "d100-b", c = "d100-c", d = "d100-d" })
    use(r, "a")
    use(r, "b")
    use(r, "c")
    use(r, "a") -- resident already: no load, but now the most recent
    assert.are.same({ "d100-a", "d100-b", "d100-c" }, loads)
    use(r, "d") -- b is the least recently used
    assert.are.same({ "a", "c", "d" }, resident(r))
    use(r, "b") -- now c is
    assert.are.same({ "a", "b", "d" }, resident(r))
    assert.are.equal(300, r:resident_bytes())
    assert.are.equal(2, r.evictions)
    assert.are.equal(5, r.loads)
  end)

  it("evicts several small adapters for a large one, oldest first", function()
    local r = registry(300, nil, { s1 = "d100-1", s2 = "d100-2", s3 = "d100-3", big = "d250" })
    use(r, "s1")
    use(r, "s2")
    use(r, "s3")
    use(r, "big")
    assert.are.same({ "big" }, resident(r))
  end)

  it("never evicts an adapter in use; with nothing evictable the request gets 503", function()
    local r = registry(200, nil, { a = "d100-a", b = "d100-b", c = "d100-c" })
    local ha, ea = r:acquire("a")
    local hb, eb = r:acquire("b")
    assert.is_table(ha)
    assert.is_table(hb)
    local h, msg, status = r:acquire("c")
    assert.is_nil(h)
    assert.are.equal(503, status)
    assert.matches("no memory for the adapter 'c' (100 bytes)", msg, 1, true)
    assert.are.same({ "a", "b" }, resident(r))
    r:release(ea)
    assert.is_table((use(r, "c")))
    assert.are.same({ "b", "c" }, resident(r)) -- a went, b (in use) stayed
    r:release(eb)
  end)

  it("refuses an adapter larger than the whole budget, and names unknown and broken ones", function()
    local r = registry(50, nil, { big = "d100", bad = "broken" })
    local h, msg, status = r:acquire("big")
    assert.is_nil(h)
    assert.are.equal(503, status)
    assert.matches("more than the whole adapter budget of 50 bytes", msg, 1, true)
    h, msg, status = r:acquire("nope")
    assert.are.equal(404, status)
    assert.matches("'nope' is not known", msg, 1, true)
    h, msg, status = r:acquire("bad")
    assert.are.equal(400, status)
    assert.matches("adapter 'bad': cannot read broken", msg, 1, true)
    local ok, err = r:add("big", "d1")
    assert.is_nil(ok)
    assert.matches("already known", err, 1, true)
  end)

  it("keeps a removed adapter alive for the request using it, counted until released", function()
    local r = registry(1000, nil, { a = "d100" })
    local h, e = r:acquire("a")
    assert(r:remove("a"))
    assert.is_false(r:has("a"))
    assert.are.equal(100, r:resident_bytes())
    r:release(e)
    assert.are.equal(0, r:resident_bytes())
    assert.is_nil(r:remove("a"))
    assert.is_table(h)
  end)

  it("asks on_missing where an unknown adapter lives", function()
    local asked = {}
    local r, loads = registry(nil, { on_missing = function(name)
      asked[#asked + 1] = name
      if name == "x" then return "d10-x" end
    end })
    assert.is_table((use(r, "x")))
    assert.is_nil((use(r, "y")))
    use(r, "x")
    assert.are.same({ "x", "y" }, asked) -- x became known: asked once
    assert.are.same({ "d10-x" }, loads)
  end)

  it("lets choose_victim pick among the evictable, falling back to LRU on a bad answer", function()
    local seen
    local r = registry(200, { choose_victim = function(list)
      seen = list
      return list[#list].name -- the most recently used
    end }, { a = "d100-a", b = "d100-b", c = "d100-c" })
    use(r, "a")
    use(r, "b")
    use(r, "c")
    assert.are.same({ "a", "c" }, resident(r))
    assert.are.same({ "a", "b" }, { seen[1].name, seen[2].name }) -- least recently used first
    assert.are.equal(100, seen[1].bytes)

    local bad, _, logged = registry(100, { choose_victim = function() return "zzz" end },
      { a = "d100-a", b = "d100-b" })
    use(bad, "a")
    use(bad, "b")
    assert.are.same({ "b" }, resident(bad))
    assert.matches("choose_victim returned zzz", logged[1], 1, true)
  end)
end)

describe("the registry with real adapters", function()
  it("loads PEFT folders with model:load_adapter and sizes them with adapter:info()", function()
    local fl = require "flexllm"
    local scratch = require "scratch"
    local tmp = scratch.dir("server_adapters_spec")
    assert(fl.init_model(tmp .. "/m", { dim = 32, hidden_dim = 64, n_layers = 1, n_heads = 2, n_kv_heads = 1 }))
    local model = assert(fl.load(tmp .. "/m"))
    scratch.write(tmp .. "/data.txt", ("abc "):rep(100))
    for i, rank in ipairs({ 2, 4 }) do
      local job = assert(model:context():finetune({ data = tmp .. "/data.txt", out = tmp .. "/job" .. i, rank = rank }))
      assert(job:adapter():save(tmp .. "/a" .. i, tmp .. "/m"))
    end
    local small = model:load_adapter(tmp .. "/a1"):info().bytes
    local r = adapters.new({ load = function(dir) return model:load_adapter(dir) end, budget = small })
    assert(r:add("small", tmp .. "/a1"))
    assert(r:add("large", tmp .. "/a2"))
    local h, e = r:acquire("small")
    assert.are.equal(2, h:info().rank)
    r:release(e)
    local _, msg, status = r:acquire("large") -- rank 4 holds twice the bytes
    assert.are.equal(503, status)
    assert.matches("more than the whole adapter budget", msg, 1, true)
  end)
end)
