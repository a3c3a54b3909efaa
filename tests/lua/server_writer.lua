-- A writer for Server:handle that records the answer instead of sending it (used by the
-- server specs through server_fixture, and by the fuzz harness tests/fuzz/request_target.lua).
-- It refuses misuse (answering twice, writing outside a stream) with an error; write fails
-- once `gone_after` chunks went through, as for a client that disconnected.
local cjson = require "cjson.safe"

local Writer = {}
Writer.__index = Writer

local function new(gone_after)
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

return new
