-- flexllm.slo: latency SLO rules from a Lua file, matched per request, reloaded while
-- serving, and an attainment tracker.
--
-- A rules file returns a table:
--   return {
--     default  = { ttft = 1.0, tpot = 0.2 },                -- rule "default"
--     adapters = { ["math-lora"] = { ttft = 0.5, tpot = 0.1 } }, -- rule "adapter:math-lora"
--     tenants  = { ["team-a"] = { ttft = 2.0 } },            -- rule "tenant:team-a"
--   }
-- ttft (time to first token) and tpot (time per output token) are in seconds; absent or
-- 0 means no bound. Matching picks one whole rule, the most specific: the tenant's rule,
-- else the adapter's, else the default (a field absent from the chosen rule is unbounded;
-- it is not filled in from a less specific rule). With no default, unmatched requests get
-- { name = "default", ttft = 0, tpot = 0 }.
--
-- The file runs in an empty environment (no io, os, require, load or debug; only pure
-- functions of math, string and table) with JIT off and an instruction budget, so a
-- mistaken file fails with a message instead of hanging or touching the system.
local core = require "flexllm.core"

local M = {}

local MAX_INSTRUCTIONS = 10000000 -- far beyond any table of rules
local MAX_MEMORY_KB = 64 * 1024   -- growth of the Lua heap while the file runs
local HOOK_EVERY = 1000

local function copy(t, names)
  local c = {}
  for name in names:gmatch "%S+" do c[name] = t[name] end
  return c
end

local function sandbox()
  return {
    assert = assert, error = error, ipairs = ipairs, next = next, pairs = pairs,
    select = select, tonumber = tonumber, tostring = tostring, type = type, unpack = unpack,
    math = copy(math, "abs ceil floor fmod huge max min pi pow sqrt exp log log10"),
    string = copy(string, "byte char find format gmatch gsub len lower match rep reverse sub upper"),
    table = copy(table, "concat insert remove sort"),
  }
end

-- Runs fn with JIT off (compiled loops do not see hooks) under the instruction and
-- memory budgets; restores whatever hook was set before (a coverage tool's, say).
local function run_limited(fn)
  jit.off(fn, true)
  local count, base = 0, collectgarbage "count"
  local old = { debug.gethook() }
  debug.sethook(function()
    count = count + HOOK_EVERY
    if count > MAX_INSTRUCTIONS then
      error(("runs more than %d instructions"):format(MAX_INSTRUCTIONS), 0)
    end
    if collectgarbage "count" - base > MAX_MEMORY_KB then
      error(("uses more than %d MiB of memory"):format(MAX_MEMORY_KB / 1024), 0)
    end
  end, "", HOOK_EVERY)
  local ok, res = pcall(fn)
  if old[1] then debug.sethook(old[1], old[2], old[3]) else debug.sethook() end
  return ok, res
end

local function show(v)
  if type(v) == "string" then return ("%q"):format(v) end
  return tostring(v)
end

local function bound(chunk, where, v)
  if v == nil or v == 0 then return 0 end
  if type(v) ~= "number" or v ~= v or v <= 0 or v == math.huge then
    error(("%s: %s: must be a positive number (seconds), got %s"):format(chunk, where, show(v)), 0)
  end
  return v
end

local function rule(chunk, where, name, t)
  if type(t) ~= "table" then
    error(("%s: %s: must be a table with ttft and/or tpot, got %s"):format(chunk, where, show(t)), 0)
  end
  for k in pairs(t) do
    if k ~= "ttft" and k ~= "tpot" then
      error(("%s: %s: unknown key %s (expected ttft, tpot)"):format(chunk, where, show(k)), 0)
    end
  end
  return { name = name, ttft = bound(chunk, where .. ".ttft", t.ttft),
           tpot = bound(chunk, where .. ".tpot", t.tpot) }
end

local function named_rules(chunk, field, prefix, t)
  local out = {}
  if t == nil then return out end
  if type(t) ~= "table" then
    error(("%s: %s: must be a table of rules keyed by name, got %s"):format(chunk, field, show(t)), 0)
  end
  for name, r in pairs(t) do
    if type(name) ~= "string" or name == "" then
      error(("%s: %s[%s]: keys must be non-empty names (strings)"):format(chunk, field, show(name)), 0)
    end
    out[name] = rule(chunk, ("%s[%q]"):format(field, name), prefix .. name, r)
  end
  return out
end

local Rules = {}
Rules.__index = Rules

local NO_BOUND = { name = "default", ttft = 0, tpot = 0 }

local function validate(chunk, t)
  if type(t) ~= "table" then
    error(("%s: must return a table of rules, got %s"):format(chunk, show(t)), 0)
  end
  for k in pairs(t) do
    if k ~= "default" and k ~= "adapters" and k ~= "tenants" then
      error(("%s: unknown key %s (expected default, adapters, tenants)"):format(chunk, show(k)), 0)
    end
  end
  return setmetatable({
    default = t.default ~= nil and rule(chunk, "default", "default", t.default) or NO_BOUND,
    adapters = named_rules(chunk, "adapters", "adapter:", t.adapters),
    tenants = named_rules(chunk, "tenants", "tenant:", t.tenants),
  }, Rules)
end

-- Parses rules from Lua source; chunkname names it in messages. Returns rules, or nil and
-- a message that names the chunk and the field.
function M.parse(source, chunkname)
  chunkname = chunkname or "slo rules"
  if type(source) ~= "string" then
    return nil, ("%s: the source must be a string, got %s"):format(chunkname, type(source))
  end
  local fn, err = loadstring(source, "@" .. chunkname)
  if not fn then return nil, err end
  setfenv(fn, sandbox())
  local ok, res = run_limited(fn)
  if not ok then
    res = tostring(res)
    if res:sub(1, #chunkname + 1) ~= chunkname .. ":" then res = chunkname .. ": " .. res end
    return nil, res
  end
  local vok, rules = pcall(validate, chunkname, res)
  if not vok then return nil, tostring(rules) end
  return rules
end

local function read(path)
  local f, err = io.open(path, "rb")
  if not f then return nil, ("%s: cannot open: %s"):format(path, err) end
  local s = f:read "*a"
  f:close()
  if not s then return nil, ("%s: cannot read"):format(path) end
  return s
end

-- Loads rules from a file. Returns rules, or nil and a message.
function M.load(path)
  local src, err = read(path)
  if not src then return nil, err end
  return M.parse(src, path)
end

-- The empty rule set: every request gets { name = "default", ttft = 0, tpot = 0 }.
function M.none()
  return setmetatable({ default = NO_BOUND, adapters = {}, tenants = {} }, Rules)
end

-- req: { adapter = name or nil, tenant = key or nil }. Returns the matching rule
-- { name, ttft, tpot } (shared: do not modify it).
function Rules:match(req)
  local r = req and ((req.tenant and self.tenants[req.tenant]) or
                     (req.adapter and self.adapters[req.adapter]))
  return r or self.default
end

-- Every rule as { name, ttft, tpot }: the default first, then adapters, then tenants, by name.
function Rules:list()
  local out = { { name = self.default.name, ttft = self.default.ttft, tpot = self.default.tpot } }
  for _, group in ipairs { self.adapters, self.tenants } do
    local names = {}
    for n in pairs(group) do names[#names + 1] = n end
    table.sort(names)
    for _, n in ipairs(names) do
      local r = group[n]
      out[#out + 1] = { name = r.name, ttft = r.ttft, tpot = r.tpot }
    end
  end
  return out
end

local Watch = {}
Watch.__index = Watch

-- Watches a rules file. path nil: no rules, never reloads. opts: debounce (seconds the
-- new content must stay unchanged before it is loaded, default 0.2), interval (seconds
-- between reads of the file, default debounce / 2), clock (a function returning seconds,
-- default core.now). Returns a watcher, or nil and a message when the first load fails.
function M.watch(path, opts)
  opts = opts or {}
  local debounce = opts.debounce or 0.2
  if type(debounce) ~= "number" or debounce < 0 or debounce ~= debounce then
    return nil, ("slo.watch: debounce must be a number of seconds >= 0, got %s"):format(show(debounce))
  end
  local interval = opts.interval or debounce / 2
  if type(interval) ~= "number" or interval < 0 or interval ~= interval then
    return nil, ("slo.watch: interval must be a number of seconds >= 0, got %s"):format(show(interval))
  end
  local w = setmetatable({ path = path, debounce = debounce, interval = interval,
                           clock = opts.clock or core.now, reloads = 0 }, Watch)
  if path == nil then
    w.current = M.none()
    return w
  end
  local src, err = read(path)
  if not src then return nil, err end
  local rules, perr = M.parse(src, path)
  if not rules then return nil, perr end
  w.current, w.content, w.last_read = rules, src, w.clock()
  return w
end

function Watch:rules() return self.current end

-- Installs content read from the file; content nil means the read failed with err.
function Watch:install(content, err)
  self.pending, self.failed = nil, nil
  local rules
  if content then rules, err = M.parse(content, self.path) end
  if not rules then
    self.last_error, self.failed = err, content or err
    return nil, err
  end
  self.current, self.content, self.last_error = rules, content, nil
  self.reloads = self.reloads + 1
  return true
end

-- Reads the file at most once per interval; loads new content once it has stayed the same
-- for debounce seconds. Returns true when the rules were replaced. A file that fails to
-- load (or to read) leaves the old rules in place with the reason in self.last_error, and
-- is not tried again until its content changes.
function Watch:poll()
  if not self.path then return false end
  local now = self.clock()
  if now - self.last_read < self.interval then return false end
  self.last_read = now
  local content, err = read(self.path)
  -- Strings are interned, so comparing contents is comparing hashes.
  local key = content or err
  if key == self.content then
    -- back to the loaded rules: an earlier failed edit no longer matters
    self.pending, self.failed, self.last_error = nil, nil, nil
    return false
  end
  if key == self.failed then
    self.pending = nil
    return false
  end
  if not self.pending or self.pending.key ~= key then
    self.pending = { key = key, since = now }
    if self.debounce > 0 then return false end
  end
  if now - self.pending.since < self.debounce then return false end
  return self:install(content, err) == true
end

-- Loads the file now, whatever changed. Returns true, or nil and the message (the old
-- rules stay).
function Watch:reload()
  if not self.path then return true end
  self.last_read = self.clock()
  return self:install(read(self.path))
end

local Tracker = {}
Tracker.__index = Tracker

-- Counts, per rule name, the requests finished and those that met their SLO.
function M.tracker() return setmetatable({ counts = {} }, Tracker) end

function Tracker:record(name, met)
  local c = self.counts[name]
  if not c then
    c = { requests = 0, met = 0 }
    self.counts[name] = c
  end
  c.requests = c.requests + 1
  if met then c.met = c.met + 1 end
end

-- { [rule name] = { requests, met, attainment = met / requests } }
function Tracker:report()
  local out = {}
  for name, c in pairs(self.counts) do
    out[name] = { requests = c.requests, met = c.met, attainment = c.met / c.requests }
  end
  return out
end

return M
