-- Plots the co-serving comparisons with gnuplot: for each results JSON (cpu_coserving.json,
-- sim_coserving.json) present in DIR, a PNG next to it with SLO attainment against the
-- arrival rate and finetuning forward tokens/s against the rate, one line per policy.
-- usage: luajit tests/bench/plot_coserving.lua [DIR]   (default tests/bench/results)
local cjson = require "cjson"

local dir = arg[1] or "tests/bench/results"

local function read(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read "*a"
  f:close()
  return s
end

-- The runs grouped by policy, in the order the policies first appear.
local function by_policy(runs)
  local order, rows = {}, {}
  for _, r in ipairs(runs) do
    if not rows[r.policy] then
      order[#order + 1] = r.policy
      rows[r.policy] = {}
    end
    table.insert(rows[r.policy], r)
  end
  for _, p in ipairs(order) do
    table.sort(rows[p], function(a, b) return a.rate < b.rate end)
  end
  return order, rows
end

local function plot(json_path, png_path, title)
  local text = read(json_path)
  if not text then return false end
  local res = cjson.decode(text)
  local order, rows = by_policy(res.runs)
  local g = {
    "set terminal pngcairo size 1200,520 font 'sans,10' noenhanced",
    ("set output '%s'"):format(png_path),
    "set multiplot layout 1,2 title '" .. title .. "'",
    "set key below maxrows 2 font ',9'",
    "set grid",
    "set xlabel 'arrival rate (requests/s)'",
  }
  for i, p in ipairs(order) do
    g[#g + 1] = ("$d%d << EOD"):format(i)
    for _, r in ipairs(rows[p]) do
      g[#g + 1] = ("%g %g %g"):format(r.rate, 100 * r.slo_attainment, r.finetune_forward_tokens_per_s)
    end
    g[#g + 1] = "EOD"
  end
  local function series(col)
    local s = {}
    for i, p in ipairs(order) do
      s[#s + 1] = ("$d%d using 1:%d with linespoints lw 2 pt %d title '%s'"):format(i, col, i, p)
    end
    return table.concat(s, ", ")
  end
  g[#g + 1] = "set ylabel 'SLO attainment (%)'"
  g[#g + 1] = "set yrange [0:105]"
  g[#g + 1] = "plot " .. series(2) .. ", 90 with lines dt 2 lc 'gray' title '90%'"
  g[#g + 1] = "set ylabel 'finetuning forward tokens/s'"
  g[#g + 1] = "set yrange [0:*]"
  local alone = res.finetune_only_tokens_per_s
  g[#g + 1] = "plot " .. series(3) ..
    (alone and (", %g with lines dt 2 lc 'gray' title 'finetuning alone'"):format(alone) or "")
  g[#g + 1] = "unset multiplot"
  local p = assert(io.popen("gnuplot", "w"))
  p:write(table.concat(g, "\n"), "\n")
  local ok = p:close()
  if not ok then error("gnuplot failed on " .. json_path) end
  print("wrote " .. png_path)
  return true
end

local function cpu_title()
  local res = cjson.decode(read(dir .. "/cpu_coserving.json"))
  local m = res.model
  return ("CPU executor, %s, dim %d, %d layers, %d thread(s); SLO TTFT %.0f ms, TPOT %.1f ms")
    :format(m.name, m.dim, m.n_layers, res.threads, 1e3 * res.slo.ttft, 1e3 * res.slo.tpot)
end

local function sim_title()
  local res = cjson.decode(read(dir .. "/sim_coserving.json"))
  return ("sim executor, %s; %g s traces"):format(res.profile, res.trace_seconds)
end

local any = false
if read(dir .. "/cpu_coserving.json") then
  any = plot(dir .. "/cpu_coserving.json", dir .. "/cpu_coserving.png", cpu_title()) or any
end
if read(dir .. "/sim_coserving.json") then
  any = plot(dir .. "/sim_coserving.json", dir .. "/sim_coserving.png", sim_title()) or any
end
if not any then
  io.stderr:write("plot_coserving: no cpu_coserving.json or sim_coserving.json in ", dir, "\n")
  os.exit(1)
end
