-- What the server specs share: a tiny model written once, a file writer, a recording writer,
-- requests, and a loop that runs the server until an answer is complete.
local fl = require "flexllm"
local cjson = require "cjson.safe"
local scratch = require "scratch"

local M = {}

M.tmp = scratch.dir("server_spec")
M.model_dir = M.tmp .. "/tiny"
assert(fl.init_model(M.model_dir, { dim = 64, hidden_dim = 160, n_layers = 2, n_heads = 4, n_kv_heads = 2,
                                   seed = 4, max_seq_len = 256 }))

M.write = scratch.write

-- A writer that records the answer (see server_writer.lua): F.writer(gone_after).
M.writer = require "server_writer"

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
