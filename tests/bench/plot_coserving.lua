-- Plots the co-serving comparisons through flexllm.plot: for each results JSON
-- (cpu_coserving.json, sim_coserving.json) present in DIR, a PNG next to it with SLO
-- attainment against the arrival rate and finetuning forward tokens/s against the rate, one
-- line per policy.
-- usage: luajit tests/bench/plot_coserving.lua [DIR]   (default tests/bench/results; LUA_PATH
-- as tests/bench/run sets it)
local cjson = require "cjson"
local plot = require "flexllm.plot"

local dir = arg[1] or "tests/bench/results"

local function read(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read "*a"
  f:close()
  return s
end

-- One series per policy, in the order the policies first appear, sorted by rate:
-- rate, attainment (%), finetuning forward tokens/s.
local function by_policy(runs)
  local series, of = {}, {}
  for _, r in ipairs(runs) do
    if not of[r.policy] then
      of[r.policy] = { name = r.policy, columns = { "rate", "slo_attainment_pct", "ft_forward_tok_s" }, rows = {} }
      series[#series + 1] = of[r.policy]
    end
    table.insert(of[r.policy].rows, { r.rate, 100 * r.slo_attainment, r.finetune_forward_tokens_per_s })
  end
  for _, s in ipairs(series) do table.sort(s.rows, function(a, b) return a[1] < b[1] end) end
  return series
end

local function cpu_title(res)
  local m = res.model
  return ("CPU executor, %s, dim %d, %d layers, %d thread(s); SLO TTFT %.0f ms, TPOT %.1f ms")
    :format(m.name, m.dim, m.n_layers, res.threads, 1e3 * res.slo.ttft, 1e3 * res.slo.tpot)
end

local function sim_title(res)
  return ("sim executor, %s; %g s traces"):format(res.profile, res.trace_seconds)
end

-- Renders name.json into name.png; false when the JSON is absent.
local function render(name, title_of)
  local text = read(dir .. "/" .. name .. ".json")
  if not text then return false end
  local res = cjson.decode(text)
  local series = by_policy(res.runs)
  local lo, hi = math.huge, -math.huge
  for _, r in ipairs(res.runs) do lo, hi = math.min(lo, r.rate), math.max(hi, r.rate) end
  -- The 90% attainment mark and finetuning alone, as dashed lines across the rates.
  local alone = res.finetune_only_tokens_per_s or 0 / 0
  series[#series + 1] = { name = "reference", columns = { "rate", "pct90", "ft_alone_tok_s" },
                          rows = { { lo, 90, alone }, { hi, 90, alone } } }
  local attain, ft = {}, {}
  for i = 1, #series - 1 do
    local style = ("linespoints lw 2 pt %d"):format(i)
    attain[i] = { series = series[i].name, x = 1, y = 2, style = style }
    ft[i] = { series = series[i].name, x = 1, y = 3, style = style }
  end
  attain[#attain + 1] = { series = "reference", x = 1, y = 2, title = "90%", style = "lines dt 2 lc 'gray'" }
  if res.finetune_only_tokens_per_s then
    ft[#ft + 1] = { series = "reference", x = 1, y = 3, title = "finetuning alone", style = "lines dt 2 lc 'gray'" }
  end
  local png = dir .. "/" .. name .. ".png"
  local pl = plot.render({ png = png, title = title_of(res), series = series, panels = {
    { title = "SLO attainment", xlabel = "arrival rate (requests/s)", ylabel = "SLO attainment (%)",
      yrange = { 0, 105 }, lines = attain },
    { title = "finetuning throughput", xlabel = "arrival rate (requests/s)", ylabel = "finetuning forward tokens/s",
      yrange = { 0 }, lines = ft },
  } })
  if not pl.png then error(pl.note, 0) end
  -- The JSON is the record; the data and script plot.render leaves beside the PNG are not.
  os.remove(pl.data)
  os.remove(pl.script)
  print("wrote " .. png)
  return true
end

local cpu = render("cpu_coserving", cpu_title)
local sim = render("sim_coserving", sim_title)
if not cpu and not sim then
  io.stderr:write("plot_coserving: no cpu_coserving.json or sim_coserving.json in ", dir, "\n")
  os.exit(1)
end
