-- flexllm.server.metrics: counters, gauges and histograms rendered in the Prometheus text
-- exposition format (version 0.0.4).
local M = {}

M.CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

-- Latency buckets in seconds: 1 ms to 60 s.
M.LATENCY_BUCKETS = { 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60 }

local Histogram = {}
Histogram.__index = Histogram

function M.histogram(buckets)
  local counts = {}
  for i = 1, #buckets do counts[i] = 0 end
  return setmetatable({ buckets = buckets, counts = counts, sum = 0, count = 0 }, Histogram)
end

function Histogram:observe(v)
  for i, le in ipairs(self.buckets) do
    if v <= le then self.counts[i] = self.counts[i] + 1 break end
  end
  self.sum = self.sum + v
  self.count = self.count + 1
end

local function escape(v)
  return (tostring(v):gsub("\\", "\\\\"):gsub("\n", "\\n"):gsub('"', '\\"'))
end

local function labels(t, extra)
  local keys = {}
  for k in pairs(t or {}) do keys[#keys + 1] = k end
  table.sort(keys)
  local parts = {}
  for _, k in ipairs(keys) do parts[#parts + 1] = ('%s="%s"'):format(k, escape(t[k])) end
  if extra then parts[#parts + 1] = extra end
  if #parts == 0 then return "" end
  return "{" .. table.concat(parts, ",") .. "}"
end

-- Prometheus float text: integers without a fraction, +Inf/-Inf/NaN spelled its way.
local function num(v)
  if v ~= v then return "NaN" end
  if v == math.huge then return "+Inf" end
  if v == -math.huge then return "-Inf" end
  if v == math.floor(v) and math.abs(v) < 2^53 then return ("%d"):format(v) end
  for digits = 15, 16 do -- the shortest that reads back the same
    local s = ("%." .. digits .. "g"):format(v)
    if tonumber(s) == v then return s end
  end
  return ("%.17g"):format(v)
end
M.format_number = num

-- A page of metrics, written family by family.
local Page = {}
Page.__index = Page

function M.page() return setmetatable({ out = {} }, Page) end

function Page:family(name, kind, help)
  local o = self.out
  local h = help:gsub("\\", "\\\\"):gsub("\n", "\\n")
  o[#o + 1] = ("# HELP %s %s\n# TYPE %s %s\n"):format(name, h, name, kind)
end

-- One sample of a counter or gauge family; lbl: a table of label values (or nil).
function Page:sample(name, lbl, v)
  local o = self.out
  o[#o + 1] = ("%s%s %s\n"):format(name, labels(lbl), num(v))
end

-- A counter or gauge family with one unlabelled sample.
function Page:single(name, kind, help, v)
  self:family(name, kind, help)
  self:sample(name, nil, v)
end

-- A histogram's samples: cumulative _bucket lines ending with +Inf, then _sum and _count.
function Page:histogram(name, lbl, h)
  local o, cum = self.out, 0
  for i, le in ipairs(h.buckets) do
    cum = cum + h.counts[i]
    o[#o + 1] = ("%s_bucket%s %s\n"):format(name, labels(lbl, ('le="%s"'):format(num(le))), num(cum))
  end
  o[#o + 1] = ("%s_bucket%s %s\n"):format(name, labels(lbl, 'le="+Inf"'), num(h.count))
  o[#o + 1] = ("%s_sum%s %s\n"):format(name, labels(lbl), num(h.sum))
  o[#o + 1] = ("%s_count%s %s\n"):format(name, labels(lbl), num(h.count))
end

function Page:text() return table.concat(self.out) end

return M
