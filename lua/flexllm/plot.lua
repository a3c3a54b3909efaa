-- Plots through gnuplot: the data goes to a text file (one gnuplot index block per
-- series), the commands to a script beside it, and gnuplot renders them as a PNG when it
-- is installed. Without gnuplot the data and the script stay for later.
local M = {}

local function shell_quote(s) return "'" .. s:gsub("'", "'\\''") .. "'" end
local function gp_string(s) return '"' .. tostring(s):gsub('[\\"]', "\\%0") .. '"' end
local function gp_file(s) return "'" .. s:gsub("'", "''") .. "'" end

local function gnuplot_installed() return os.execute("command -v gnuplot >/dev/null 2>&1") == 0 end

local function number(v)
  if v ~= v then return "NaN" end
  if v == math.huge or v == -math.huge then return "NaN" end
  return ("%.9g"):format(v)
end

-- spec:
--   png     the image to write (its data goes to the same name with .dat, the script .gp)
--   title   above every panel
--   series  list of { name, columns = {names...}, rows = { {numbers...}, ... } }
--   panels  list of { title, xlabel, ylabel, logx, logy, xrange = {lo, hi}, yrange = {lo, hi},
--                     lines = { { series = name, x = column, y = column, title, style } } }
--           stacked top to bottom; a line's style is gnuplot's (default "linespoints").
-- Returns { png = path or nil, data = path, script = path, note = why no PNG, or nil }.
function M.render(spec)
  local base = spec.png:gsub("%.png$", "")
  local data_path, script_path = base .. ".dat", base .. ".gp"
  local index, f = {}, assert(io.open(data_path, "wb"))
  local n = 0
  for _, s in ipairs(spec.series) do
    if #s.rows > 0 then
      index[s.name] = n
      n = n + 1
      f:write("# ", s.name, ": ", table.concat(s.columns, " "), "\n")
      for _, row in ipairs(s.rows) do
        local cells = {}
        for i = 1, #s.columns do cells[i] = number(row[i] or 0 / 0) end
        f:write(table.concat(cells, " "), "\n")
      end
      f:write("\n\n")
    end
  end
  f:close()

  local panels = {}
  for _, p in ipairs(spec.panels) do
    local lines = {}
    for _, l in ipairs(p.lines) do
      if index[l.series] then
        lines[#lines + 1] = ("%s index %d using %d:%d with %s title %s"):format(gp_file(data_path),
          index[l.series], l.x, l.y, l.style or "linespoints", gp_string(l.title or l.series))
      end
    end
    if #lines > 0 then panels[#panels + 1] = { p = p, lines = lines } end
  end
  local width, height = 900, math.max(1, #panels) * 300
  local gp = {
    "# gnuplot " .. script_path .. " renders " .. spec.png,
    'if (strstrt(GPVAL_TERMINALS, "pngcairo") > 0) {',
    ("  set terminal pngcairo size %d,%d noenhanced font \",10\""):format(width, height),
    "} else {",
    ("  set terminal png size %d,%d noenhanced"):format(width, height),
    "}",
    "set output " .. gp_file(spec.png),
    "set grid",
    "set key outside right top",
    "set lmargin 12", -- fixed margins line the panels' x axes up, keys in the right one
    "set rmargin 30",
    ("set multiplot layout %d,1 title %s"):format(math.max(1, #panels), gp_string(spec.title or "")),
  }
  for _, pl in ipairs(panels) do
    local p = pl.p
    gp[#gp + 1] = "unset logscale"
    if p.logx then gp[#gp + 1] = "set logscale x" end
    if p.logy then gp[#gp + 1] = "set logscale y" end
    gp[#gp + 1] = p.xrange and ("set xrange [%s:%s]"):format(p.xrange[1] or "*", p.xrange[2] or "*")
      or "set autoscale x"
    gp[#gp + 1] = p.yrange and ("set yrange [%s:%s]"):format(p.yrange[1] or "*", p.yrange[2] or "*")
      or "set autoscale y"
    gp[#gp + 1] = "set title " .. gp_string(p.title or "")
    gp[#gp + 1] = "set xlabel " .. gp_string(p.xlabel or "")
    gp[#gp + 1] = "set ylabel " .. gp_string(p.ylabel or "")
    gp[#gp + 1] = "plot " .. table.concat(pl.lines, ", \\\n     ")
  end
  gp[#gp + 1] = "unset multiplot"
  f = assert(io.open(script_path, "wb"))
  f:write(table.concat(gp, "\n"), "\n")
  f:close()

  local res = { data = data_path, script = script_path }
  if #panels == 0 then
    res.note = "nothing to plot"
  elseif not gnuplot_installed() then
    res.note = ("gnuplot is not installed: the data is in %s; render it later with `gnuplot %s`")
      :format(data_path, script_path)
  else
    local err_path = base .. ".gnuplot.log"
    local rc = os.execute(("gnuplot %s >%s 2>&1"):format(shell_quote(script_path), shell_quote(err_path)))
    if rc == 0 then
      os.remove(err_path)
      res.png = spec.png
    else
      local ef = io.open(err_path, "rb")
      local msg = ef and ef:read("*a") or ""
      if ef then ef:close() end
      res.note = ("gnuplot failed on %s: %s"):format(script_path, (msg:gsub("%s+$", "")))
    end
  end
  return res
end

return M
