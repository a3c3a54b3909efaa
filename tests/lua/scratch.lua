-- What specs share for their files: a fresh folder under build/tmp and a file writer.
local M = {}

-- Empties (or makes) build/tmp/NAME and returns its path.
function M.dir(name)
  local path = "build/tmp/" .. name
  os.execute("rm -rf " .. path .. " && mkdir -p " .. path)
  return path
end

-- Writes text to path, replacing what was there.
function M.write(path, text)
  local f = assert(io.open(path, "wb"))
  f:write(text)
  f:close()
end

return M
