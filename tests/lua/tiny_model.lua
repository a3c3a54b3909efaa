-- The scratch folder the runtime and finetuning specs start from: a small seeded random
-- LLaMA and a text to train on.
local fl = require "flexllm"
local scratch = require "scratch"

local M = {}

-- Empties build/tmp/<name>, writes a random LLaMA (dim 64, 2 layers) made with seed to its
-- model/ and `line` repeated `times` times to its data.txt. Returns the folder.
function M.setup(name, seed, line, times)
  local tmp = scratch.dir(name)
  assert(fl.init_model(tmp .. "/model", { dim = 64, hidden_dim = 160, n_layers = 2, n_heads = 4,
                                          n_kv_heads = 2, seed = seed }))
  scratch.write(tmp .. "/data.txt", line:rep(times))
  return tmp
end

return M
