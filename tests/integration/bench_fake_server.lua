-- A fake OpenAI completions server on flexllm.http for testing `flexllm bench --url`,
-- run as
--   luajit tests/integration/bench_fake_server.lua TTFT GAP API_KEY
-- It prints its port on the first line, then answers:
--   GET /v1/models          one model, "fake-model"
--   POST /v1/completions    401 without "Bearer API_KEY"; 404 for another model; 400 when
--                           the prompt holds "REJECT"; otherwise it streams max_tokens SSE
--                           chunks of one token each, the first TTFT seconds after the
--                           request, then one every GAP seconds, a usage chunk, [DONE]
--   GET /quit               stops (it also stops by itself after 120 s)
-- It logs each completion request's body to stderr, one JSON line.
local http = require "flexllm.http"
local core = require "flexllm.core"
local cjson = require "cjson"

local ttft, gap, key = tonumber(arg[1]), tonumber(arg[2]), arg[3]
local srv = assert(http.listen({ port = 0 }))
io.stdout:write(srv:port(), "\n")
io.stdout:flush()

local json = { ["content-type"] = "application/json" }
local streams, running, started = {}, true, core.now()

local function fail(conn, status, msg)
  srv:respond(conn, status, json, cjson.encode({ error = { message = msg } }))
end

local function chunk(text, finish)
  return "data: " .. cjson.encode({ id = "cmpl-fake", object = "text_completion", model = "fake-model",
    choices = { { index = 0, text = text, finish_reason = finish or cjson.null } } }) .. "\n\n"
end

local function handle(e)
  if e.method == "GET" and e.path == "/v1/models" then
    return srv:respond(e.conn, 200, json, cjson.encode({ object = "list", data = { { id = "fake-model", object = "model" } } }))
  elseif e.path == "/quit" then
    running = false
    return srv:respond(e.conn, 200, json, "{}")
  elseif e.method ~= "POST" or e.path ~= "/v1/completions" then
    return fail(e.conn, 404, "no route " .. e.method .. " " .. e.path)
  end
  io.stderr:write(e.body, "\n")
  if e.headers.authorization ~= "Bearer " .. key then return fail(e.conn, 401, "bad API key") end
  local body = cjson.decode(e.body)
  if body.model ~= "fake-model" then return fail(e.conn, 404, "no model " .. tostring(body.model)) end
  if body.stream ~= true then return fail(e.conn, 400, "this fake only streams") end
  if body.prompt:find("REJECT", 1, true) then return fail(e.conn, 400, "rejected prompt") end
  srv:start_stream(e.conn, 200, { ["content-type"] = "text/event-stream" })
  streams[e.conn] = { n = body.max_tokens, sent = 0, at = core.now() + ttft }
end

while running and core.now() - started < 120 do
  for _, e in ipairs(srv:poll(next(streams) and 0.001 or 0.02)) do
    if e.kind == "request" then handle(e) elseif e.kind == "closed" then streams[e.conn] = nil end
  end
  local t = core.now()
  for conn, s in pairs(streams) do
    if t >= s.at then
      s.sent = s.sent + 1
      local last = s.sent == s.n
      srv:write(conn, chunk("t" .. s.sent .. " ", last and "length" or nil))
      s.at = s.at + gap
      if last then
        srv:write(conn, "data: " .. cjson.encode({ id = "cmpl-fake", object = "text_completion", choices = {},
          usage = { prompt_tokens = 1, completion_tokens = s.n, total_tokens = s.n + 1 } }) .. "\n\n")
        srv:write(conn, "data: [DONE]\n\n")
        srv:finish(conn)
        streams[conn] = nil
      end
    end
  end
end
srv:close()
