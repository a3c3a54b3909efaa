-- What the server specs share: a tiny model written once, a recording writer, requests,
-- and a loop that runs the server until an answer is complete.
local fl = require "flexllm"
local cjson = require "cjson.safe"

local M = {}

M.tmp = "build/tmp/server_spec"
os.execute("rm -rf " .. M.tmp .. " && mkdir -p " .. M.tmp)
M.model_dir = M.tmp .. "/tiny"
assert(fl.init_model(M.model_dir, { dim = 64, hidden_dim = 160, n_layers = 2, n_heads = 4, n_kv_heads = 2,
                                   seed = 4, max_seq_len = 256 }))

-- A writer that records everything; write fails once `gone_after` chunks went through
-- (a client that disconnected).
local Writer = {}
Writer.__index = Writer

function M.writer(gone_after)
  return setmetatable({ chunks = {}, finished = false, gone_after = gone_after }, Writer)
end

function Writer:respond(status, headers, body)
  assert(not self.status, "answered twice")
  self.status, self.headers, self.body, self.finished = status, headers, body, true
  return true
end

function Writer:start_stream(status, headers)
  assert(not self.status, "answered twice")
  self.status, self.headers, self.streaming = status, headers, true
  return true
end

function Writer:write(data)
  assert(self.streaming and not self.finished, "write outside a stream")
  if self.gone_after and #self.chunks >= self.gone_after then return false end
  self.chunks[#self.chunks + 1] = data
  return true
end

function Writer:finish()
  assert(self.streaming, "finish outside a stream")
  self.finished = true
  return true
end

-- The JSON answer (or nil).
function Writer:json() return cjson.decode(self.body or "") end

-- The SSE events of a stream: decoded JSON objects, and "[DONE]" as a string.
function Writer:events()
  local out = {}
  for _, c in ipairs(self.chunks) do
    local payload = assert(c:match("^data: (.*)\n\n$"), "not an SSE event: " .. c)
    out[#out + 1] = payload == "[DONE]" and payload or assert(cjson.decode(payload))
  end
  return out
end

local next_conn = 0

function M.request(method, path, body, headers)
  next_conn = next_conn + 1
  if type(body) == "table" then body = cjson.encode(body) end
  local p, q = path:match("^([^?]*)%??(.*)$")
  return { kind = "request", method = method, path = p, query = q, headers = headers or {}, body = body or "",
           conn = next_conn }
end

-- Runs the server (iterations and ticks) until the writer's answer is complete.
function M.run(S, w, limit)
  for _ = 1, limit or 100000 do
    if w.finished then return w end
    S:step()
    S:tick()
  end
  error("the answer did not complete")
end

-- Handles one request and runs it to completion.
function M.call(S, method, path, body, headers)
  local w = M.writer()
  S:handle(M.request(method, path, body, headers), w)
  return M.run(S, w)
end

return M
