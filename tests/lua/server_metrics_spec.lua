-- Prometheus text exposition: histograms against counts made here from the raw
-- observations, and the server's whole /metrics page against the format's rules.
local metrics = require "flexllm.server.metrics"

-- name="value" pairs separated by commas; values keep their escapes (\\, \", \n).
local function parse_labels(s, where)
  local l, i = {}, 1
  while i <= #s do
    local k, j = s:match('^([%a_][%w_]*)="()', i)
    assert(k, where .. ": bad label at " .. s:sub(i))
    local v = {}
    while true do
      local c = s:sub(j, j)
      assert(c ~= "", where .. ": unterminated label value")
      if c == '"' then break end
      if c == "\\" then
        assert(s:sub(j + 1, j + 1):match('[\\"n]'), where .. ": bad escape in a label value")
        v[#v + 1], j = s:sub(j, j + 1), j + 2
      else
        v[#v + 1], j = c, j + 1
      end
    end
    l[k] = table.concat(v)
    i = j + 1
    if s:sub(i, i) == "," then i = i + 1 end
  end
  return l
end

-- Parses an exposition page by the format's grammar; errors name the line. Returns
-- { [family] = { type, help, samples = { { name, labels, value } } } } and the order.
local function parse(text)
  local families, order, current = {}, {}, nil
  local n = 0
  for line in text:gmatch("([^\n]*)\n") do
    n = n + 1
    local where = ("line %d (%s)"):format(n, line)
    local kw, name, rest = line:match("^# (%u+) ([%a_:][%w_:]*) (.*)$")
    if kw == "HELP" then
      assert(not families[name], where .. ": a second HELP for " .. name)
      current = { help = rest, samples = {} }
      families[name] = current
      order[#order + 1] = name
    elseif kw == "TYPE" then
      assert(current and order[#order] == name, where .. ": TYPE without its HELP")
      assert(({ counter = 1, gauge = 1, histogram = 1 })[rest], where .. ": unknown type")
      current.type = rest
    else
      local sname, labels, value = line:match("^([%a_:][%w_:]*)(%b{}) (%S+)$")
      if not sname then
        sname, value = line:match("^([%a_:][%w_:]*) (%S+)$")
        labels = "{}"
      end
      assert(sname, where .. ": not a sample")
      local fam = order[#order]
      local base = current.type == "histogram" and sname:match("^(.*)_bucket$") or sname:match("^(.*)_sum$")
        or sname:match("^(.*)_count$") or sname
      assert(base == fam or sname == fam, where .. ": sample outside its family " .. tostring(fam))
      local l = parse_labels(labels:sub(2, -2), where)
      local v = value == "+Inf" and math.huge or value == "NaN" and 0 / 0 or tonumber(value)
      assert(v, where .. ": bad value")
      current.samples[#current.samples + 1] = { name = sname, labels = l, value = v }
    end
  end
  assert(text:sub(-1) == "\n", "the page must end with a newline")
  return families, order
end

-- The histogram rules: le ascending ending +Inf, counts cumulative, +Inf == _count.
local function check_histogram(fam)
  local prev_le, prev_count, inf, count, sum = -math.huge, 0, nil, nil, nil
  for _, s in ipairs(fam.samples) do
    if s.name:match("_bucket$") then
      local le = s.labels.le == "+Inf" and math.huge or tonumber(s.labels.le)
      assert(le > prev_le, "le not ascending")
      assert(s.value >= prev_count, "bucket counts not cumulative")
      prev_le, prev_count = le, s.value
      if le == math.huge then inf = s.value end
    elseif s.name:match("_count$") then count = s.value
    elseif s.name:match("_sum$") then sum = s.value end
  end
  assert(inf and count and sum, "a histogram needs +Inf, _sum and _count")
  assert(inf == count, "+Inf bucket differs from _count")
end

describe("a histogram", function()
  it("renders the counts and sum of its observations", function()
    local obs = { 0.0005, 0.003, 0.003, 0.02, 0.7, 2, 45, 1000, 0.001 }
    local h = metrics.histogram(metrics.LATENCY_BUCKETS)
    for _, v in ipairs(obs) do h:observe(v) end
    local p = metrics.page()
    p:family("x_seconds", "histogram", "test")
    p:histogram("x_seconds", { rule = 'a"b\\c' }, h)
    local fams = parse(p:text())
    local fam = fams.x_seconds
    check_histogram(fam)
    local sum = 0
    for _, v in ipairs(obs) do sum = sum + v end
    for _, s in ipairs(fam.samples) do
      assert.are.equal('a\\"b\\\\c', s.labels.rule)
      if s.name == "x_seconds_bucket" then
        local le = s.labels.le == "+Inf" and math.huge or tonumber(s.labels.le)
        local want = 0
        for _, v in ipairs(obs) do if v <= le then want = want + 1 end end
        assert.are.equal(want, s.value, "le=" .. s.labels.le)
      elseif s.name == "x_seconds_sum" then
        assert.is_true(math.abs(s.value - sum) < 1e-9)
      else
        assert.are.equal(#obs, s.value)
      end
    end
  end)

  it("writes numbers as Prometheus reads them", function()
    assert.are.equal("+Inf", metrics.format_number(math.huge))
    assert.are.equal("NaN", metrics.format_number(0 / 0))
    assert.are.equal("3", metrics.format_number(3))
    assert.are.equal("0.0025", metrics.format_number(0.0025))
    assert.are.equal(1 / 3, tonumber(metrics.format_number(1 / 3)))
  end)
end)

describe("the server's /metrics page", function()
  it("follows the format and holds latency, queue, KV, policy, SLO and finetuning families", function()
    local server = require "flexllm.server"
    local F = require "server_fixture"
    local S = assert(server.new({ model = F.model_dir, data_dir = F.tmp .. "/metrics-data", log = function() end }))
    for i = 1, 3 do F.call(S, "POST", "/v1/completions", { model = "tiny", prompt = "x" .. i, max_tokens = 4 }) end
    local w = F.call(S, "GET", "/metrics")
    assert.are.equal(200, w.status)
    assert.matches("^text/plain; version=0.0.4", w.headers["content-type"])
    local fams = parse(w.body)
    for _, name in ipairs({ "flexllm_time_to_first_token_seconds", "flexllm_time_per_output_token_seconds",
                            "flexllm_e2e_request_latency_seconds" }) do
      assert.are.equal("histogram", fams[name].type)
      check_histogram(fams[name])
    end
    local function value(fam, labels)
      for _, s in ipairs(fams[fam].samples) do
        local match = true
        for k, v in pairs(labels or {}) do match = match and s.labels[k] == v end
        if match then return s.value end
      end
    end
    assert.are.equal(3, value("flexllm_time_to_first_token_seconds", { le = "+Inf" }))
    assert.are.equal(3, value("flexllm_requests_finished_total", { reason = "length" }))
    assert.are.equal(1, value("flexllm_slo_attainment", { rule = "default" }))
    assert.are.equal(0, value("flexllm_requests_waiting"))
    local _, total = S.ctx:kv_pages()
    assert.are.equal(total, value("flexllm_kv_pages_total"))
    for _, name in ipairs({ "flexllm_policy_seconds_total", "flexllm_policy_failures_total",
                            "flexllm_finetune_tokens_per_second", "flexllm_finetune_loss" }) do
      assert.is_table(fams[name], name)
    end
  end)
end)
