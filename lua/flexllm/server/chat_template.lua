-- flexllm.server.chat_template: turns an OpenAI messages list into the prompt text a model
-- was trained on. Built in: LLaMA-3, ChatML (Qwen2) and LLaMA-2, written to match the
-- Jinja templates those models ship in tokenizer_config.json, and chosen by the markers in
-- the model's own template string; "plain" ("role: content" lines) for models without one,
-- such as the embedded default model. A user template is a Lua file returning
-- function(messages, add_generation_prompt, tokens) -> string, where tokens holds the
-- model's bos_token and eos_token texts.
--
-- The rendered text is tokenized whole with special tokens recognised and no BOS added, as
-- Hugging Face's apply_chat_template does: a template that wants BOS writes it.
local M = {}

local function trim(s) return (s:gsub("^%s+", ""):gsub("%s+$", "")) end

local function token_text(v)
  if type(v) == "table" then return v.content end
  if type(v) == "string" then return v end
  return nil
end

-- Each built-in: render(messages, add_generation_prompt, tokens) -> text, plus the texts
-- that end an assistant turn (generation stops on them).
local builtin = {}

-- Meta-Llama-3-Instruct: BOS, then <|start_header_id|>role<|end_header_id|>\n\n trimmed
-- content <|eot_id|> per message.
builtin.llama3 = {
  end_of_turn = { "<|eot_id|>" },
  render = function(messages, add_generation_prompt, tokens)
    local out = { tokens.bos_token or "" }
    for _, m in ipairs(messages) do
      out[#out + 1] = "<|start_header_id|>" .. m.role .. "<|end_header_id|>\n\n" .. trim(m.content)
        .. "<|eot_id|>"
    end
    if add_generation_prompt then out[#out + 1] = "<|start_header_id|>assistant<|end_header_id|>\n\n" end
    return table.concat(out)
  end,
}

-- Qwen2: <|im_start|>role\ncontent<|im_end|>\n per message, led by the template's default
-- system message when the conversation has none.
builtin.chatml = {
  end_of_turn = { "<|im_end|>" },
  render = function(messages, add_generation_prompt, tokens)
    local out = {}
    if tokens.default_system and messages[1] and messages[1].role ~= "system" then
      out[1] = "<|im_start|>system\n" .. tokens.default_system .. "<|im_end|>\n"
    end
    for _, m in ipairs(messages) do
      out[#out + 1] = "<|im_start|>" .. m.role .. "\n" .. m.content .. "<|im_end|>\n"
    end
    if add_generation_prompt then out[#out + 1] = "<|im_start|>assistant\n" end
    return table.concat(out)
  end,
}

-- Llama-2-chat: BOS [INST] user [/INST] assistant EOS per exchange, the system message
-- folded into the first user turn; roles must alternate user/assistant. The template has
-- no generation prompt: the text ends with [/INST] either way.
builtin.llama2 = {
  end_of_turn = {},
  render = function(messages, add_generation_prompt, tokens)
    local system, first = nil, 1
    if messages[1] and messages[1].role == "system" then system, first = messages[1].content, 2 end
    local out = {}
    for i = first, #messages do
      local m, k = messages[i], i - first
      if (m.role == "user") ~= (k % 2 == 0) then
        error("Conversation roles must alternate user/assistant/user/assistant/...", 0)
      end
      local content = m.content
      if k == 0 and system then content = "<<SYS>>\n" .. system .. "\n<</SYS>>\n\n" .. content end
      if m.role == "user" then
        out[#out + 1] = (tokens.bos_token or "") .. "[INST] " .. trim(content) .. " [/INST]"
      elseif m.role == "assistant" then
        out[#out + 1] = " " .. trim(content) .. " " .. (tokens.eos_token or "")
      end
    end
    return table.concat(out)
  end,
}

-- For models without a chat template: "role: content" lines, then "assistant: ".
builtin.plain = {
  end_of_turn = {},
  render = function(messages, add_generation_prompt, tokens)
    local out = { tokens.add_bos and tokens.bos_token or "" }
    for _, m in ipairs(messages) do out[#out + 1] = m.role .. ": " .. m.content .. "\n" end
    if add_generation_prompt then out[#out + 1] = "assistant: " end
    return table.concat(out)
  end,
}

-- The template string of a tokenizer_config (a string, or a list of named templates).
local function template_string(cfg)
  local t = cfg.chat_template
  if type(t) == "table" then
    for _, e in ipairs(t) do
      if type(e) == "table" and e.name == "default" then return e.template end
    end
    return t[1] and t[1].template
  end
  return type(t) == "string" and t or nil
end

-- The built-in template a tokenizer_config calls for: its name, and for ChatML the default
-- system message its template writes (or nil).
function M.detect(cfg)
  local s = template_string(cfg or {})
  if not s then return "plain" end
  if s:find("<|start_header_id|>", 1, true) then return "llama3" end
  if s:find("<|im_start|>", 1, true) then
    -- the literal default system message, e.g. '<|im_start|>system\nYou are ...<|im_end|>\n'
    local sys = s:match("<|im_start|>system\\n([^'\"{}]-)<|im_end|>")
      or s:match("<|im_start|>system\n([^'\"{}]-)<|im_end|>")
    return "chatml", sys
  end
  if s:find("[INST]", 1, true) then return "llama2" end
  return nil
end

local function read_json(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  local v, err = require("flexllm.server.reply").decode(s)
  if v == nil then return nil, ("%s: invalid JSON: %s"):format(path, err) end
  return v
end

-- Loads a user template file: it must return a function.
local function load_user(path)
  local chunk, err = loadfile(path)
  if not chunk then return nil, ("--chat-template %s: %s"):format(path, err) end
  local ok, fn = pcall(chunk)
  if not ok then return nil, ("--chat-template %s: %s"):format(path, tostring(fn)) end
  if type(fn) ~= "function" then
    return nil, ("--chat-template %s: must return function(messages, add_generation_prompt) -> string, "
      .. "returned a %s"):format(path, type(fn))
  end
  return fn
end

local Template = {}
Template.__index = Template

-- The template for a model folder: the user's file when given, else the built-in its
-- tokenizer_config.json asks for. tok_info: { add_bos } of the tokenizer. Returns a
-- template (name, end_of_turn texts, note: which one and why, for the server's log), or nil
-- and a message.
function M.for_model(dir, user_file, tok_info)
  local cfg, err = read_json(dir .. "/tokenizer_config.json")
  if err then return nil, err end
  cfg = cfg or {}
  local tokens = { bos_token = token_text(cfg.bos_token), eos_token = token_text(cfg.eos_token),
                   add_bos = tok_info and tok_info.add_bos }
  if user_file then
    local fn, lerr = load_user(user_file)
    if not fn then return nil, lerr end
    return setmetatable({ name = "user:" .. user_file, fn = fn, tokens = tokens, end_of_turn = {},
                          note = "the template from " .. user_file }, Template)
  end
  local name, sys = M.detect(cfg)
  if not name then
    return nil, ("%s/tokenizer_config.json: its chat_template is none of LLaMA-3, ChatML or "
      .. "LLaMA-2; give one with --chat-template FILE"):format(dir)
  end
  tokens.default_system = sys
  local b = builtin[name]
  local note = name == "plain" and "the model has no chat template: using plain 'role: content' lines"
    or ("the model's chat template is %s"):format(name)
  return setmetatable({ name = name, fn = b.render, tokens = tokens, end_of_turn = b.end_of_turn,
                        note = note }, Template)
end

-- Renders messages ({ role, content } with string contents). Returns the text, or nil and
-- the template's error.
function Template:render(messages, add_generation_prompt)
  local ok, text = pcall(self.fn, messages, add_generation_prompt, self.tokens)
  if not ok then return nil, tostring(text) end
  if type(text) ~= "string" then
    return nil, ("the chat template returned a %s instead of a string"):format(type(text))
  end
  return text
end

return M
