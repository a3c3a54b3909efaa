-- The JSON request path under the fuzzer: every input is one request to a server on a
-- tiny model (its first byte picks the route, the rest is the body), answered through a
-- recording writer (the server specs' own) and run to completion. Any answer is fine except
-- a 500 (a Lua error in a route), a misused writer or an answer that never completes; those
-- raise, and the harness aborts.
package.path = "lua/?.lua;lua/?/init.lua;build/lua/?.lua;tests/lua/?.lua;" .. package.path
package.cpath = "build/lib/?.so;" .. package.cpath
local fl = require "flexllm"
local server = require "flexllm.server"
local writer = require "server_writer"

local dir = "build/fuzz/model"
if not io.open(dir .. "/model.safetensors", "rb") then
  os.execute("mkdir -p build/fuzz")
  assert(fl.init_model(dir, { dim = 32, hidden_dim = 64, n_layers = 1, n_heads = 2, n_kv_heads = 1,
                              seed = 1, max_seq_len = 128 }))
end
local S = assert(server.new({ model = dir, data_dir = "build/fuzz/data", log = function() end,
                              max_prompt_tokens = 96 }))

local ROUTES = {
  { "POST", "/v1/completions", "application/json" },
  { "POST", "/v1/chat/completions", "application/json" },
  { "POST", "/v1/fine_tuning/jobs", "application/json" },
  { "POST", "/v1/load_lora_adapter", "application/json" },
  { "POST", "/v1/unload_lora_adapter", "application/json" },
  { "POST", "/v1/files", "multipart/form-data; boundary=fuzz" },
  { "GET", "/v1/fine_tuning/jobs", "application/json" },
}

local conn = 0
return function(data)
  local r = ROUTES[(data:byte(1) or 0) % #ROUTES + 1]
  conn = conn + 1
  local w = writer()
  S:handle({ kind = "request", conn = conn, method = r[1], path = r[2], query = "",
             headers = { ["content-type"] = r[3] }, body = data:sub(2) }, w)
  for _ = 1, 5000 do
    if w.finished then break end
    S:step()
  end
  if not w.finished then S:closed(conn) error("the answer did not complete in 5000 iterations") end
  if w.status == 500 then error("500: " .. tostring(w.body)) end
end
