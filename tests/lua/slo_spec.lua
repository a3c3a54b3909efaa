-- SLO rules files: parsing in a sandbox, strict validation, matching precedence, hot
-- reload with debounce (on a fake clock), and the attainment tracker.
local slo = require "flexllm.slo"
local scratch = require "scratch"

local tmp = scratch.dir("slo_spec")
local write = scratch.write

local RULES = [[
return {
  default = { ttft = 1.0, tpot = 0.2 },
  adapters = { ["math-lora"] = { ttft = 0.5, tpot = 0.1 }, code = { tpot = 0.05 } },
  tenants = { ["team-a"] = { ttft = 2.0 } },
}
]]

describe("slo.parse", function()
  it("reads every rule with its name, absent bounds as 0", function()
    local rules = assert(slo.parse(RULES, "slo.lua"))
    assert.are.same({
      { name = "default", ttft = 1.0, tpot = 0.2 },
      { name = "adapter:code", ttft = 0, tpot = 0.05 },
      { name = "adapter:math-lora", ttft = 0.5, tpot = 0.1 },
      { name = "tenant:team-a", ttft = 2.0, tpot = 0 },
    }, rules:list())
  end)

  it("accepts an empty table and 0 as no bound", function()
    local rules = assert(slo.parse("return {}", "slo.lua"))
    assert.are.same({ { name = "default", ttft = 0, tpot = 0 } }, rules:list())
    rules = assert(slo.parse("return { default = { ttft = 0, tpot = 0.3 } }", "slo.lua"))
    assert.are.same({ name = "default", ttft = 0, tpot = 0.3 }, rules:match {})
  end)

  local bad = {
    { 'return { adapters = { ["math-lora"] = { tpot = "fast" } } }',
      'slo.lua: adapters["math-lora"].tpot: must be a positive number (seconds), got "fast"' },
    { "return { default = { ttft = -1 } }",
      "slo.lua: default.ttft: must be a positive number (seconds), got -1" },
    { "return { default = { ttft = 0/0 } }",
      "slo.lua: default.ttft: must be a positive number (seconds), got nan" },
    { "return { default = { tpot = math.huge } }",
      "slo.lua: default.tpot: must be a positive number (seconds), got inf" },
    { "return { default = { ttft = 1, tbt = 2 } }",
      'slo.lua: default: unknown key "tbt" (expected ttft, tpot)' },
    { "return { defaults = {} }",
      'slo.lua: unknown key "defaults" (expected default, adapters, tenants)' },
    { "return { tenants = { ['t'] = 3 } }",
      'slo.lua: tenants["t"]: must be a table with ttft and/or tpot, got 3' },
    { "return { tenants = { { ttft = 1 } } }",
      "slo.lua: tenants[1]: keys must be non-empty names (strings)" },
    { "return { adapters = 'x' }",
      'slo.lua: adapters: must be a table of rules keyed by name, got "x"' },
    { "return 42", "slo.lua: must return a table of rules, got 42" },
    { "x = 1", "slo.lua: must return a table of rules, got nil" },
  }
  for _, case in ipairs(bad) do
    it("refuses " .. case[1], function()
      local rules, err = slo.parse(case[1], "slo.lua")
      assert.is_nil(rules)
      assert.are.equal(case[2], err)
    end)
  end

  it("names the file and line of a syntax or runtime error", function()
    local _, err = slo.parse("return {\n default = { ttft = 1 \n", "rules/slo.lua")
    assert.matches("^rules/slo.lua:3: ", err)
    _, err = slo.parse("\nreturn { default = nil + 1 }", "slo.lua")
    assert.matches("^slo.lua:2: attempt to perform arithmetic", err)
  end)

  it("runs the file without io, os, require, load or debug", function()
    for _, name in ipairs { "io", "os", "require", "loadstring", "load", "dofile", "debug",
                            "setfenv", "getfenv", "setmetatable", "collectgarbage" } do
      local src = ("return { default = { ttft = %s ~= nil and 'present' or nil } }"):format(name)
      local rules, err = slo.parse(src, "slo.lua")
      assert.is_nil(err, name)
      assert.are.equal(0, rules:match({}).ttft)
    end
    -- pure helpers are there
    local rules = assert(slo.parse("return { default = { ttft = math.max(0.5, 2) / 4 } }", "s"))
    assert.are.equal(0.5, rules:match({}).ttft)
  end)

  it("stops a file that never finishes or eats memory, and restores the caller's hook", function()
    local calls = 0
    local hook = function() calls = calls + 1 end
    debug.sethook(hook, "", 1000000)
    local _, err = slo.parse("while true do end", "slo.lua")
    local got = debug.gethook()
    debug.sethook()
    assert.are.equal(hook, got)
    assert.are.equal("slo.lua: runs more than 10000000 instructions", err)
    _, err = slo.parse("local t = {} for i = 1, 1e9 do t[i] = {} end", "slo.lua")
    assert.are.equal("slo.lua: uses more than 64 MiB of memory", err)
  end)
end)

describe("matching", function()
  local rules = assert(slo.parse(RULES, "slo.lua"))
  it("takes the tenant's rule over the adapter's, the adapter's over the default", function()
    assert.are.same({ name = "tenant:team-a", ttft = 2.0, tpot = 0 },
                    rules:match { adapter = "math-lora", tenant = "team-a" })
    assert.are.same({ name = "adapter:math-lora", ttft = 0.5, tpot = 0.1 },
                    rules:match { adapter = "math-lora", tenant = "team-b" })
    assert.are.same({ name = "default", ttft = 1.0, tpot = 0.2 },
                    rules:match { adapter = "other", tenant = "team-b" })
    assert.are.same({ name = "default", ttft = 1.0, tpot = 0.2 }, rules:match {})
  end)

  it("gives no bounds without a default", function()
    local r = assert(slo.parse("return { tenants = { a = { ttft = 1 } } }", "s"))
    assert.are.same({ name = "default", ttft = 0, tpot = 0 }, r:match { tenant = "b" })
  end)
end)

describe("slo.watch", function()
  local path = tmp .. "/slo.lua"
  local t = 0
  local clock = function() return t end

  -- A watcher of the file holding `content`, on the fake clock, which is set to 0.
  local function watching(content, debounce, interval)
    write(path, content)
    t = 0
    return assert(slo.watch(path, { debounce = debounce, interval = interval, clock = clock }))
  end

  it("loads new content once it has stayed put for the debounce time", function()
    local w = watching("return { default = { ttft = 1 } }", 1, 0)
    assert.are.equal(1, w:rules():match({}).ttft)
    t = 0.5
    assert.is_false(w:poll()) -- unchanged
    write(path, "return { default = { ttft = 2 } }")
    t = 1
    assert.is_false(w:poll()) -- seen, not yet settled
    t = 1.6
    write(path, "return { default = { ttft = 3 } }")
    assert.is_false(w:poll()) -- changed again: the wait starts over
    t = 2.5
    assert.is_false(w:poll())
    assert.are.equal(1, w:rules():match({}).ttft)
    t = 2.6
    assert.is_true(w:poll())
    assert.are.equal(3, w:rules():match({}).ttft)
    t = 5
    assert.is_false(w:poll()) -- loaded content is not reloaded
    assert.are.equal(1, w.reloads)
  end)

  it("keeps the old rules after a bad edit, with the reason, until the file is fixed", function()
    local w = watching("return { default = { ttft = 1 } }", 0.2, 0)
    write(path, 'return { adapters = { ["math-lora"] = { tpot = "fast" } } }')
    t = 1; assert.is_false(w:poll())
    t = 2; assert.is_false(w:poll())
    assert.are.equal(path .. ': adapters["math-lora"].tpot: must be a positive number (seconds), got "fast"',
                     w.last_error)
    assert.are.equal(1, w:rules():match({}).ttft)
    t = 3; assert.is_false(w:poll()) -- the same bad content is not parsed again
    os.remove(path)
    t = 4; assert.is_false(w:poll())
    t = 5; assert.is_false(w:poll())
    assert.matches("^" .. path:gsub("%p", "%%%0") .. ": cannot open: ", w.last_error)
    write(path, "return { default = { ttft = 4 } }")
    t = 6; assert.is_false(w:poll())
    t = 7; assert.is_true(w:poll())
    assert.is_nil(w.last_error)
    assert.are.equal(4, w:rules():match({}).ttft)
  end)

  it("reads the file at most once per interval", function()
    local w = watching("return {}", 0, 1)
    write(path, "return { default = { tpot = 0.5 } }")
    t = 0.9; assert.is_false(w:poll())
    t = 1.0; assert.is_true(w:poll())
    assert.are.equal(0.5, w:rules():match({}).tpot)
  end)

  it("reloads on demand, reporting failures", function()
    write(path, "return {}")
    local w = assert(slo.watch(path, { clock = clock }))
    write(path, "return { default = 1 }")
    local ok, err = w:reload()
    assert.is_nil(ok)
    assert.are.equal(path .. ": default: must be a table with ttft and/or tpot, got 1", err)
    assert.are.equal(err, w.last_error)
    write(path, "return { default = { ttft = 9 } }")
    assert.is_true(w:reload())
    assert.are.equal(9, w:rules():match({}).ttft)
  end)

  it("has no rules without a path, and fails at start on a bad file", function()
    local w = assert(slo.watch(nil))
    assert.are.same({ name = "default", ttft = 0, tpot = 0 }, w:rules():match { tenant = "x" })
    assert.is_false(w:poll())
    write(path, "return { bogus = 1 }")
    local none, err = slo.watch(path)
    assert.is_nil(none)
    assert.are.equal(path .. ': unknown key "bogus" (expected default, adapters, tenants)', err)
    none, err = slo.watch(tmp .. "/absent.lua")
    assert.is_nil(none)
    assert.matches("absent.lua: cannot open: ", err, 1, true)
    assert.is_nil((slo.watch(nil, { debounce = -1 })))
  end)

  it("works on the real clock", function()
    write(path, "return {}")
    local w = assert(slo.watch(path, { debounce = 0, interval = 0 }))
    write(path, "return { default = { ttft = 0.25 } }")
    assert.is_true(w:poll())
    assert.are.equal(0.25, w:rules():match({}).ttft)
  end)
end)

describe("slo.tracker", function()
  it("counts requests and met SLOs per rule", function()
    local tr = slo.tracker()
    local want = {}
    math.randomseed(3)
    for i = 1, 500 do
      local name = ({ "default", "adapter:a", "tenant:t" })[i % 3 + 1]
      local met = math.random() < 0.7
      tr:record(name, met)
      want[name] = want[name] or { requests = 0, met = 0 }
      want[name].requests = want[name].requests + 1
      if met then want[name].met = want[name].met + 1 end
    end
    local rep = tr:report()
    for name, w in pairs(want) do
      assert.are.same({ requests = w.requests, met = w.met, attainment = w.met / w.requests }, rep[name])
    end
    assert.are.same({}, slo.tracker():report())
  end)
end)

describe("the example rules file", function()
  it("parses into the rules its comments describe", function()
    local rules = assert(slo.load("examples/slo.lua"))
    local names = {}
    for i, r in ipairs(rules:list()) do names[i] = r.name end
    assert.are.same({ "default", "adapter:math-lora", "tenant:team-a" }, names)
    local batch = rules:match { tenant = "team-a" } -- only the first token is bounded
    assert.is_true(batch.ttft > 0)
    assert.are.equal(0, batch.tpot)
  end)
end)
