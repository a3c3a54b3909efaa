-- A tiny server on flexllm.http for the transport tests, run as
--   luajit tests/integration/http_echo.lua [option=value ...]
-- (options of http.listen). It prints its port on the first line, then serves:
--   /stream?n=N   N server-sent events, one per loop iteration ({"conn":id,"i":k})
--   /closed       {"closed":[ids]}: the connections whose closed event it saw
--   /stats        srv:stats()
--   /status/NNN   that status with a JSON error body
--   /quit         answers, then stops
--   anything else echoes {"conn","method","path","query","headers","body","http_version"}
-- It never sleeps outside srv:poll.
local http = require "flexllm.http"
local cjson = require "cjson"

local opts = { port = 0 }
for _, a in ipairs(arg) do
  local k, v = a:match("^([%w_]+)=(.*)$")
  assert(k, "options are key=value, got '" .. a .. "'")
  opts[k] = tonumber(v) or v
end
local srv = assert(http.listen(opts))
io.stdout:write(srv:port(), "\n")
io.stdout:flush()

local json = { ["content-type"] = "application/json" }
local streams, closed, running = {}, {}, true

local function handle(e)
  local status = tonumber(e.path:match("^/status/(%d+)$"))
  if e.path == "/stream" then
    srv:start_stream(e.conn, 200, { ["content-type"] = "text/event-stream" })
    streams[e.conn] = { n = tonumber(e.query:match("n=(%d+)")) or 3, i = 0 }
  elseif e.path == "/closed" then
    srv:respond(e.conn, 200, json, cjson.encode({ closed = closed }))
  elseif e.path == "/stats" then
    srv:respond(e.conn, 200, json, cjson.encode(srv:stats()))
  elseif e.path == "/quit" then
    srv:respond(e.conn, 200, json, '{"bye":true}')
    running = false
  elseif status then
    srv:respond(e.conn, status, json, cjson.encode({ error = { message = "status " .. status } }))
  else
    srv:respond(e.conn, 200, json, cjson.encode({
      conn = e.conn, method = e.method, path = e.path, query = e.query,
      headers = e.headers, body = e.body, http_version = e.http_version, remote = e.remote,
    }))
  end
end

while running do
  for _, e in ipairs(srv:poll(next(streams) and 0.002 or 0.05)) do
    if e.kind == "closed" then
      closed[#closed + 1] = e.conn
      streams[e.conn] = nil
    else
      handle(e)
    end
  end
  for conn, s in pairs(streams) do
    s.i = s.i + 1
    if not srv:write(conn, "data: " .. cjson.encode({ conn = conn, i = s.i }) .. "\n\n") then
      streams[conn] = nil
    elseif s.i >= s.n then
      srv:finish(conn)
      streams[conn] = nil
    end
  end
end
-- Let the answer to /quit go out.
for _ = 1, 20 do
  srv:poll(0.01)
  if srv:stats().connections == 0 then break end
end
srv:close()
