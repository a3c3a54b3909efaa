-- flexllm.adapters: the adapters a server knows (name -> PEFT folder) and the ones resident
-- in memory. A request that names a known adapter acquires it, loading it when it is not
-- resident; loading evicts resident adapters, least recently used first, until the new one
-- fits the memory budget. An adapter acquired by a running request is never evicted.
--
-- Hooks (a lifecycle file may give any of them):
--   on_missing(name) -> dir or nil   a request names an unknown adapter: where to find it
--   choose_victim(list) -> name      which adapter to evict; list holds the evictable ones,
--                                    least recently used first: { name, dir, bytes, last_used }
--   on_job_done(job)                 (used by the server) a finetuning job finished
local M = {}

local Registry = {}
Registry.__index = Registry

-- opts: load(dir) -> handle or nil, message (model:load_adapter); bytes(handle) -> resident
-- bytes (adapter:info().bytes); budget: bytes adapters may hold together (nil: no limit);
-- hooks: { on_missing, choose_victim }; log(message) for hook failures (default stderr).
function M.new(opts)
  assert(type(opts.load) == "function", "adapters.new: opts.load is required")
  return setmetatable({
    load = opts.load,
    size = opts.bytes or function(h) return h:info().bytes end,
    budget = opts.budget,
    hooks = opts.hooks or {},
    log = opts.log or function(msg) io.stderr:write("flexllm: ", msg, "\n") end,
    known = {},     -- name -> { name, dir, handle?, bytes, in_use, last_used }
    clock = 0,      -- use counter: last_used orders by it, not by wall time
    orphans = {},   -- removed entries still held by requests
    loads = 0, evictions = 0,
  }, Registry)
end

-- Registers name -> dir. Returns true, or nil and a message when the name is taken.
function Registry:add(name, dir)
  if type(name) ~= "string" or name == "" then return nil, "an adapter name must be a non-empty string" end
  if self.known[name] then
    return nil, ("the adapter '%s' is already known (from %s)"):format(name, self.known[name].dir)
  end
  self.known[name] = { name = name, dir = dir, bytes = 0, in_use = 0, last_used = 0 }
  return true
end

-- Forgets an adapter. One in use stays alive with the requests holding it and is dropped
-- when the last one releases it. Returns true, or nil and a message when it is unknown.
function Registry:remove(name)
  local e = self.known[name]
  if not e then return nil, ("the adapter '%s' is not known"):format(name) end
  self.known[name] = nil
  e.removed = true
  if e.in_use == 0 then e.handle = nil elseif e.handle then self.orphans[e] = true end
  return true
end

function Registry:has(name) return self.known[name] ~= nil end

-- Bytes held by resident adapters (removed ones still in use included).
function Registry:resident_bytes()
  local n = 0
  for _, e in pairs(self.known) do if e.handle then n = n + e.bytes end end
  for e in pairs(self.orphans) do n = n + e.bytes end
  return n
end

local function evictable(self)
  local list = {}
  for _, e in pairs(self.known) do
    if e.handle and e.in_use == 0 then
      list[#list + 1] = { name = e.name, dir = e.dir, bytes = e.bytes, last_used = e.last_used }
    end
  end
  table.sort(list, function(a, b) return a.last_used < b.last_used end)
  return list
end

-- The hook's choice when it names a candidate, else the least recently used.
local function victim(self, list)
  local hook = self.hooks.choose_victim
  if hook then
    local ok, name = pcall(hook, list)
    if ok then
      for _, c in ipairs(list) do if c.name == name then return name end end
      self.log(("lifecycle choose_victim returned %s, which is not an evictable adapter; evicting "
        .. "the least recently used"):format(tostring(name)))
    else
      self.log("lifecycle choose_victim failed: " .. tostring(name))
    end
  end
  return list[1].name
end

-- Drops the registry's reference and collects, so the adapter's memory goes back now
-- rather than whenever the Lua heap next grows enough to start a cycle.
local function evict(self, name)
  local e = self.known[name]
  e.handle, e.bytes = nil, 0
  self.evictions = self.evictions + 1
  collectgarbage()
end

-- Makes room for `need` more bytes. Returns true, or nil and a message.
local function make_room(self, need, for_name)
  if not self.budget then return true end
  if need > self.budget then
    return nil, ("the adapter '%s' needs %d bytes, more than the whole adapter budget of %d bytes")
      :format(for_name, need, self.budget)
  end
  while self:resident_bytes() + need > self.budget do
    local list = evictable(self)
    if #list == 0 then
      return nil, ("no memory for the adapter '%s' (%d bytes): the %d-byte adapter budget is held "
        .. "by adapters in use by running requests; retry later"):format(for_name, need, self.budget)
    end
    evict(self, victim(self, list))
  end
  return true
end

-- Resolves a name the registry does not know through on_missing. Returns true when it is
-- known now.
local function find_missing(self, name)
  local hook = self.hooks.on_missing
  if not hook then return false end
  local ok, dir = pcall(hook, name)
  if not ok then
    self.log(("lifecycle on_missing(%q) failed: %s"):format(name, tostring(dir)))
    return false
  end
  if type(dir) ~= "string" then return false end
  return self:add(name, dir) == true
end

-- Takes an adapter for a request: its handle (loaded if it was not resident), counted in
-- use until release. Returns handle, or nil, message, status: 404 unknown, 400 the folder
-- does not load, 503 no memory can be freed for it.
function Registry:acquire(name)
  local e = self.known[name]
  if not e and find_missing(self, name) then e = self.known[name] end
  if not e then return nil, ("the adapter '%s' is not known"):format(name), 404 end
  if not e.handle then
    local h, err = self.load(e.dir)
    if not h then return nil, ("adapter '%s': %s"):format(name, err), 400 end
    local bytes = self.size(h)
    local ok, merr = make_room(self, bytes, name)
    if not ok then return nil, merr, 503 end
    e.handle, e.bytes = h, bytes
    self.loads = self.loads + 1
  end
  self.clock = self.clock + 1
  e.last_used, e.in_use = self.clock, e.in_use + 1
  return e.handle, e
end

-- Ends a request's use of the entry acquire returned.
function Registry:release(e)
  e.in_use = e.in_use - 1
  assert(e.in_use >= 0, "adapters: released more often than acquired")
  if e.removed and e.in_use == 0 then
    e.handle = nil
    self.orphans[e] = nil
  end
end

-- Known adapters by name: { name, dir, resident, bytes, in_use, last_used }.
function Registry:list()
  local out = {}
  for _, e in pairs(self.known) do
    out[#out + 1] = { name = e.name, dir = e.dir, resident = e.handle ~= nil, bytes = e.bytes,
                      in_use = e.in_use, last_used = e.last_used }
  end
  table.sort(out, function(a, b) return a.name < b.name end)
  return out
end

return M
