-- flexllm: the Lua entry point. Wraps the C engine (flexllm.core) in a small
-- object API: load a model, tokenize, and generate with streaming callbacks.
local core = require "flexllm.core"

local M = { version = core.version, core = core }

local Model = {}
Model.__index = Model

-- Loads a Hugging Face model folder. opts: threads. Returns a model, or nil and a message.
function M.load(dir, opts)
  local handle, err = core.load_model(dir, opts)
  if not handle then return nil, err end
  return setmetatable({ dir = dir, handle = handle, tok = handle:tokenizer() }, Model)
end

-- Loads a tokenizer from a tokenizer.json file or a model folder.
M.load_tokenizer = core.load_tokenizer

-- Writes a seeded random LLaMA with a byte-level tokenizer to dir.
M.init_model = core.init_model

-- Monotonic wall-clock seconds.
M.now = core.now

function Model:config() return self.handle:config() end

-- opts: bos (default: the tokenizer's add_bos_token), special (match special tokens, default true)
function Model:encode(text, opts) return self.tok:encode(text, opts) end

function Model:decode(ids, opts) return self.tok:decode(ids, opts) end

-- Loads a PEFT LoRA adapter folder for generation (opts.adapter of generate).
function Model:load_adapter(dir) return self.handle:load_adapter(dir) end

-- The context is made on first use; opts as for core context (kv_pages, max_batch_tokens, max_seqs).
function Model:context(opts)
  if not self.ctx or opts then
    local ctx, err = self.handle:context(opts)
    if not ctx then return nil, err end
    self.ctx = ctx
  end
  return self.ctx
end

local function prompt_ids(self, prompt, opts)
  if type(prompt) == "table" then return prompt end
  local ids = self:encode(prompt, { bos = opts.bos })
  if #ids == 0 then
    local bos = self.tok:info().bos
    if bos < 0 then return nil, "the prompt is empty and the tokenizer has no BOS token" end
    ids = { bos }
  end
  return ids
end

-- Generates for one prompt or a list of prompts (strings or id lists), all in the
-- same batches. opts: max_tokens, temperature, top_k, top_p, seed, stop, ignore_eos,
-- bos, prefill_chunk. on_event(i, event) is called between iterations with each new
-- piece of text (event.text, event.token, event.finish). Returns a list of
-- { text, ids, finish, prompt_tokens } in prompt order, or nil and a message.
function Model:generate(prompts, opts, on_event)
  opts = opts or {}
  local single = type(prompts) == "string" or (type(prompts) == "table" and type(prompts[1]) == "number")
  if single then prompts = { prompts } end
  local ctx, err = self:context()
  if not ctx then return nil, err end
  local gen
  gen, err = ctx:generator({ prefill_chunk = opts.prefill_chunk })
  if not gen then return nil, err end
  local results, index = {}, {}
  for i, p in ipairs(prompts) do
    local ids, perr = prompt_ids(self, p, opts)
    if not ids then return nil, perr end
    local id, aerr = gen:add(ids, opts)
    if not id then return nil, ("prompt %d: %s"):format(i, aerr) end
    index[id] = i
    results[i] = { text = {}, ids = {}, prompt_tokens = #ids }
  end
  while gen:active() > 0 do
    local events, serr = gen:step()
    if not events then return nil, serr end
    for _, ev in ipairs(events) do
      local i = index[ev.request]
      local r = results[i]
      if not ev.eos then r.ids[#r.ids + 1] = ev.token end
      r.text[#r.text + 1] = ev.text
      if ev.finish then r.finish = ev.finish end
      if on_event then on_event(i, ev) end
    end
  end
  for _, r in ipairs(results) do r.text = table.concat(r.text) end
  if single then return results[1] end
  return results
end

return M
