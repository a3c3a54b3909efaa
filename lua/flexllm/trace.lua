-- Request traces for the demo and the benchmark: a seeded random generator, Poisson and
-- gamma arrivals, percentiles, ShareGPT-style prompt sets, and a sleep.
local bit = require "bit"
local ffi = require "ffi"

local band, bor, bxor, lshift, rshift, rol, tobit =
  bit.band, bit.bor, bit.bxor, bit.lshift, bit.rshift, bit.rol, bit.tobit
local floor, log, sqrt, cos, pi = math.floor, math.log, math.sqrt, math.cos, math.pi

local M = {}

-- ------------------------------------------------------------------ random numbers
-- xoshiro128** on LuaJIT's 32-bit bit operations, seeded through splitmix32: the same
-- seed gives the same trace on every machine, whatever else uses math.random.

-- The low 32 bits of a * b (split in 16-bit halves so that doubles stay exact).
local function mul32(a, b)
  local alo, ahi = band(a, 0xffff), band(rshift(a, 16), 0xffff)
  local blo, bhi = band(b, 0xffff), band(rshift(b, 16), 0xffff)
  return tobit(tobit(ahi * blo + alo * bhi) * 65536 + alo * blo)
end

local function unsigned(x) return x < 0 and x + 4294967296 or x end

local Rng = {}
Rng.__index = Rng

function M.rng(seed)
  if type(seed) ~= "number" or seed ~= seed then error("trace.rng: the seed must be a number", 2) end
  local x = tobit(floor(seed) % 4294967296)
  local s = {}
  for i = 1, 4 do -- splitmix32
    x = tobit(x + 0x9e3779b9)
    local z = mul32(bxor(x, rshift(x, 16)), 0x85ebca6b)
    z = mul32(bxor(z, rshift(z, 13)), 0xc2b2ae35)
    s[i] = bxor(z, rshift(z, 16))
  end
  if bor(s[1], s[2], s[3], s[4]) == 0 then s[1] = 1 end
  return setmetatable({ s0 = s[1], s1 = s[2], s2 = s[3], s3 = s[4] }, Rng)
end

-- The next 32 random bits, as an unsigned number.
function Rng:next32()
  local s0, s1, s2, s3 = self.s0, self.s1, self.s2, self.s3
  local r = tobit(rol(tobit(s1 * 5), 7) * 9)
  local t = lshift(s1, 9)
  s2 = bxor(s2, s0)
  s3 = bxor(s3, s1)
  s1 = bxor(s1, s2)
  s0 = bxor(s0, s3)
  s2 = bxor(s2, t)
  s3 = rol(s3, 11)
  self.s0, self.s1, self.s2, self.s3 = s0, s1, s2, s3
  return unsigned(r)
end

-- Uniform in [0, 1).
function Rng:uniform() return self:next32() / 4294967296 end

-- An integer in [lo, hi].
function Rng:int(lo, hi) return lo + floor(self:uniform() * (hi - lo + 1)) end

-- Exponential with the given rate (mean 1/rate).
function Rng:exponential(rate) return -log(1 - self:uniform()) / rate end

-- Standard normal (Box-Muller).
function Rng:normal()
  return sqrt(-2 * log(1 - self:uniform())) * cos(2 * pi * self:uniform())
end

-- Gamma with the given shape and scale (Marsaglia and Tsang; shape < 1 through shape + 1).
function Rng:gamma(shape, scale)
  if shape < 1 then return self:gamma(shape + 1, scale) * (1 - self:uniform()) ^ (1 / shape) end
  local d = shape - 1 / 3
  local c = 1 / sqrt(9 * d)
  while true do
    local x = self:normal()
    local v = 1 + c * x
    if v > 0 then
      v = v * v * v
      local u = 1 - self:uniform()
      if log(u) < 0.5 * x * x + d - d * v + d * log(v) then return d * v * scale end
    end
  end
end

-- -------------------------------------------------------------------- arrivals

-- Arrival times in seconds from 0: opts.rate (requests/s), opts.kind ("poisson" or
-- "gamma"), opts.cv (the gamma gaps' coefficient of variation; 1 is Poisson), opts.seed,
-- and opts.n (that many requests) or opts.duration (every arrival before it). The first
-- request arrives at 0; the gaps have mean 1/rate.
function M.arrivals(opts)
  local rate, kind, cv = opts.rate, opts.kind or "poisson", opts.cv or 1
  if type(rate) ~= "number" or not (rate > 0) or rate == math.huge then
    return nil, ("the arrival rate must be a positive number of requests per second, got %s"):format(tostring(rate))
  end
  if kind ~= "poisson" and kind ~= "gamma" then
    return nil, ("the arrival process must be poisson or gamma, got '%s'"):format(tostring(kind))
  end
  if type(cv) ~= "number" or not (cv > 0) or cv == math.huge then
    return nil, ("the gamma arrivals' CV must be a positive number, got %s"):format(tostring(cv))
  end
  local n, duration = opts.n, opts.duration
  if (n == nil) == (duration == nil) then return nil, "give the number of requests or a duration, one of them" end
  if n and (n < 1 or n % 1 ~= 0) then return nil, ("the number of requests must be a positive integer, got %s"):format(n) end
  if duration and not (duration > 0) then return nil, ("the duration must be positive, got %s"):format(duration) end
  local rng = M.rng(opts.seed or 1)
  local shape = 1 / (cv * cv)
  local gap = kind == "poisson" and function() return rng:exponential(rate) end
    or function() return rng:gamma(shape, 1 / (rate * shape)) end
  local times, t = {}, 0
  while true do
    if n and #times == n then break end
    if duration and t >= duration then break end
    times[#times + 1] = t
    t = t + gap()
  end
  return times
end

-- ------------------------------------------------------------------ percentiles

-- The k-th smallest of a[lo..hi] (Hoare quickselect, in place). Afterwards every element
-- after position k is at least a[k].
local function select(a, lo, hi, k)
  while lo < hi do
    local pivot = a[floor((lo + hi) / 2)]
    local i, j = lo, hi
    while i <= j do
      while a[i] < pivot do i = i + 1 end
      while a[j] > pivot do j = j - 1 end
      if i <= j then
        a[i], a[j] = a[j], a[i]
        i, j = i + 1, j - 1
      end
    end
    if k <= j then hi = j elseif k >= i then lo = i else return a[k] end
  end
  return a[k]
end

-- The p-th percentile (0..100) of a list of numbers, interpolated linearly between the
-- closest ranks (numpy's default); nil for an empty list. The list is not changed.
function M.percentile(values, p)
  if type(p) ~= "number" or p < 0 or p > 100 then
    error(("percentile: p must be in [0, 100], got %s"):format(tostring(p)), 2)
  end
  local n = #values
  if n == 0 then return nil end
  local a = {}
  for i = 1, n do
    local v = values[i]
    if type(v) ~= "number" or v ~= v then error(("percentile: item %d is %s, not a number"):format(i, tostring(v)), 2) end
    a[i] = v
  end
  local h = (n - 1) * p / 100
  local k = floor(h) + 1
  local v = select(a, 1, n, k)
  local frac = h - (k - 1)
  if frac == 0 or k == n then return v end
  local nxt = a[k + 1]
  for i = k + 2, n do if a[i] < nxt then nxt = a[i] end end
  return v + frac * (nxt - v)
end

-- { n, mean, p50, p90, p99, max } of a list (only n for an empty one).
function M.summary(values)
  local s = { n = #values }
  if s.n == 0 then return s end
  local sum, max = 0, -math.huge
  for _, v in ipairs(values) do
    sum = sum + v
    if v > max then max = v end
  end
  s.mean, s.max = sum / s.n, max
  s.p50, s.p90, s.p99 = M.percentile(values, 50), M.percentile(values, 90), M.percentile(values, 99)
  return s
end

-- ------------------------------------------------------------------- prompt sets

-- Reads a ShareGPT-style JSON file: a list of either {"conversations": [{"from": "human",
-- "value": ...}, {"from": "gpt", ...}]} (the first human turn is the prompt, the next
-- turn the response) or {"prompt", "response", "response_tokens"} objects. Returns a list
-- of { prompt, response (or nil), output_tokens (or nil) }, or nil and a message naming
-- the file and item.
function M.load_prompts(path)
  local cjson = require "cjson.safe"
  local f, err = io.open(path, "rb")
  if not f then return nil, err end
  local text = f:read("*a")
  f:close()
  local data, jerr = cjson.decode(text)
  if data == nil then return nil, ("%s: not valid JSON: %s"):format(path, jerr) end
  if type(data) ~= "table" or (next(data) ~= nil and data[1] == nil) then
    return nil, ("%s: expected a JSON array of prompts"):format(path)
  end
  local out = {}
  for i, item in ipairs(data) do
    local where = ("%s: item %d"):format(path, i)
    if type(item) ~= "table" then return nil, where .. ": not an object" end
    local prompt, response, tokens
    if type(item.prompt) == "string" then
      prompt = item.prompt
      response = type(item.response) == "string" and item.response or nil
      tokens = type(item.response_tokens) == "number" and item.response_tokens or nil
    elseif type(item.conversations) == "table" then
      for k, turn in ipairs(item.conversations) do
        if type(turn) ~= "table" or type(turn.value) ~= "string" then
          return nil, ("%s: conversations[%d] has no string 'value'"):format(where, k)
        end
        if not prompt and (turn.from == "human" or turn.from == "user") then
          prompt = turn.value
        elseif prompt then
          response = turn.value
          break
        end
      end
      if not prompt then return nil, where .. ": no human turn in 'conversations'" end
    else
      return nil, where .. ": expected 'prompt' or 'conversations'"
    end
    if prompt ~= "" then out[#out + 1] = { prompt = prompt, response = response, output_tokens = tokens } end
  end
  if #out == 0 then return nil, path .. ": no prompts" end
  return out
end

-- ------------------------------------------------------------------------ sleep

pcall(ffi.cdef, "int poll(void *fds, unsigned long nfds, int timeout);") -- another module may have it

-- Sleeps for about s seconds (millisecond resolution).
function M.sleep(s)
  local ms = floor(s * 1000 + 0.5)
  if ms > 0 then ffi.C.poll(nil, 0, ms) end
end

return M
