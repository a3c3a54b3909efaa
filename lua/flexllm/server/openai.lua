-- flexllm.server.openai: /v1/completions, /v1/chat/completions and /v1/models. A request
-- is checked field by field, tokenized and submitted to the runtime; its tokens come back
-- through Server:dispatch (server.lua), which streams them as SSE chunks or gathers them
-- for one JSON answer.
local R = require "flexllm.server.reply"

local M = {}

local UNSUPPORTED_IF_SET = {
  -- field = what a non-default value means here
  logprobs = "log probabilities are not returned by this server",
  top_logprobs = "log probabilities are not returned by this server",
  tools = "tool calls are not supported by this server",
  functions = "function calls are not supported by this server",
  suffix = "insertion (suffix) is not supported by this server",
}

local function reject_unsupported(body)
  for field, why in pairs(UNSUPPORTED_IF_SET) do
    local v = body[field]
    if v ~= nil and v ~= R.null and v ~= false and v ~= 0 and not (type(v) == "table" and next(v) == nil) then
      R.fail(400, ("'%s': %s"):format(field, why), field, "unsupported_parameter")
    end
  end
  for _, field in ipairs({ "presence_penalty", "frequency_penalty" }) do
    local v = R.number(body, field, 0)
    if v ~= 0 then
      R.fail(400, ("'%s': penalties are not supported by this server (only 0)"):format(field), field,
        "unsupported_parameter")
    end
  end
  local bias = R.object(body, "logit_bias")
  if bias and next(bias) then
    R.fail(400, "'logit_bias' is not supported by this server", "logit_bias", "unsupported_parameter")
  end
  local best = R.integer(body, "best_of", 1)
  if best ~= 1 then R.fail(400, "'best_of' must be 1: this server returns one choice", "best_of", "invalid_value") end
  local rf = R.object(body, "response_format")
  if rf and rf.type ~= nil and rf.type ~= "text" then
    R.fail(400, "'response_format': only {\"type\": \"text\"} is supported", "response_format", "unsupported_parameter")
  end
end

-- Sampling and stopping fields shared by both endpoints.
local function sampling(body)
  local p = {}
  p.temperature = R.range("temperature", R.number(body, "temperature", 1), 0, 2)
  local top_p = R.number(body, "top_p", 1)
  if not (top_p > 0 and top_p <= 1) then
    R.fail(400, ("'top_p' must be greater than 0 and at most 1, got %s"):format(top_p), "top_p", "invalid_value")
  end
  p.top_p = top_p
  local top_k = R.range("top_k", R.integer(body, "top_k", 0), -1)
  p.top_k = top_k > 0 and top_k or 0 -- -1 (vLLM) and 0 both mean off
  p.seed = R.range("seed", R.integer(body, "seed", nil), 0, 2^53)
  local stop = body.stop
  if stop == R.null then stop = nil end
  if type(stop) == "table" then
    if not R.is_array(stop) then R.fail(400, "'stop' must be a string or an array of strings", "stop", "invalid_type") end
    if #stop > 16 then R.fail(400, ("'stop' holds %d strings, at most 16"):format(#stop), "stop", "invalid_value") end
    for i, s in ipairs(stop) do
      if type(s) ~= "string" then
        R.fail(400, ("'stop[%d]' must be a string, got %s"):format(i - 1, R.json_type(s)), "stop", "invalid_type")
      end
    end
  elseif stop ~= nil and type(stop) ~= "string" then
    R.fail(400, "'stop' must be a string or an array of strings, got " .. R.json_type(stop), "stop", "invalid_type")
  end
  p.stop = stop
  p.ignore_eos = R.boolean(body, "ignore_eos", false)
  local n = R.integer(body, "n", 1)
  if n ~= 1 then R.fail(400, ("'n' must be 1: this server returns one choice per request, got %d"):format(n), "n", "invalid_value") end
  return p
end

local function stream_fields(body)
  local stream = R.boolean(body, "stream", false)
  local so = R.object(body, "stream_options")
  if so and not stream then
    R.fail(400, "'stream_options' is only allowed when 'stream' is true", "stream_options", "invalid_value")
  end
  return stream, so and R.boolean(so, "include_usage", false, "stream_options.include_usage") or false
end

-- max_tokens: at least 1, and the prompt plus it within the model's context.
local function max_tokens(S, body, n_prompt, default, prompt_field)
  local ctx_len = S.max_seq_len
  if S.max_prompt_tokens and n_prompt > S.max_prompt_tokens then
    R.fail(400, ("the prompt has %d tokens, more than this server's limit of %d (--max-prompt-tokens)")
      :format(n_prompt, S.max_prompt_tokens), prompt_field, "prompt_too_long")
  end
  if n_prompt >= ctx_len then
    R.fail(400, ("This model's maximum context length is %d tokens, and the prompt has %d: no room for a "
      .. "completion. Please shorten the %s."):format(ctx_len, n_prompt, prompt_field), prompt_field,
      "context_length_exceeded")
  end
  local field = body.max_completion_tokens ~= nil and body.max_completion_tokens ~= R.null
    and "max_completion_tokens" or "max_tokens"
  local m = R.integer(body, field, nil)
  if m == nil then return math.min(default or ctx_len - n_prompt, ctx_len - n_prompt) end
  if m < 1 then R.fail(400, ("'%s' must be at least 1, got %d"):format(field, m), field, "invalid_value") end
  if n_prompt + m > ctx_len then
    R.fail(400, ("This model's maximum context length is %d tokens. However, you requested %d tokens (%d in "
      .. "the %s, %d in the completion). Please reduce the length of the %s or the completion.")
      :format(ctx_len, n_prompt + m, n_prompt, prompt_field, m, prompt_field), field, "context_length_exceeded")
  end
  return m
end

local function model_name(S, body)
  local name = R.string(body, "model")
  if not name then
    R.fail(400, "'model' is required; known models: " .. table.concat(S:model_names(), ", "), "model", "missing_field")
  end
  return name
end

-- The prompt of a completions request as token ids.
local function completion_prompt(S, body)
  local p = body.prompt
  if p == nil or p == R.null then R.fail(400, "'prompt' is required", "prompt", "missing_field") end
  if type(p) == "table" and #p == 1 and (type(p[1]) == "string" or type(p[1]) == "table") then
    p = p[1] -- a batch of one
  end
  local ids
  if type(p) == "string" then
    ids = S.tok:encode(p)
  elseif type(p) == "table" and type(p[1]) == "number" then
    for i, v in ipairs(p) do
      if not R.is_int(v) or v < 0 or v >= S.vocab_size then
        R.fail(400, ("'prompt[%d]' must be a token id in [0, %d), got %s"):format(i - 1, S.vocab_size, tostring(v)),
          "prompt", "invalid_value")
      end
    end
    ids = p
  elseif type(p) == "table" and p[1] ~= nil then
    R.fail(400, ("'prompt' holds %d prompts: send one prompt per request"):format(#p), "prompt", "invalid_value")
  else
    R.fail(400, "'prompt' must be a string, an array of token ids, or an array with one string; got "
      .. R.json_type(p), "prompt", "invalid_type")
  end
  if #ids == 0 then
    if S.bos < 0 then R.fail(400, "'prompt' is empty and the model has no BOS token to start from", "prompt") end
    ids = { S.bos }
  end
  return ids, type(p) == "string" and p or S.tok:decode(ids)
end

local ROLES = { system = "system", developer = "system", user = "user", assistant = "assistant" }

-- messages as { role, content } with string contents (text parts joined).
local function chat_messages(body)
  local list = R.list(body, "messages")
  if not list or #list == 0 then R.fail(400, "'messages' is required and must not be empty", "messages", "missing_field") end
  local out = {}
  for i, m in ipairs(list) do
    local where = ("messages[%d]"):format(i - 1)
    if not R.is_object(m) then
      R.fail(400, ("'%s' must be an object, got %s"):format(where, R.json_type(m)), "messages", "invalid_type")
    end
    local role = R.string(m, "role", nil, where .. ".role")
    if not role then R.fail(400, ("'%s.role' is required"):format(where), "messages", "missing_field") end
    if not ROLES[role] then
      R.fail(400, ("'%s.role' is '%s'; this server takes system, developer, user and assistant messages")
        :format(where, role), "messages", "invalid_value")
    end
    local c = m.content
    if type(c) == "table" then
      local parts = {}
      for k, part in ipairs(c) do
        if type(part) ~= "table" or part.type ~= "text" or type(part.text) ~= "string" then
          R.fail(400, ("'%s.content[%d]': only text parts ({\"type\": \"text\", \"text\": ...}) are supported")
            :format(where, k - 1), "messages", "unsupported_content")
        end
        parts[#parts + 1] = part.text
      end
      c = table.concat(parts)
    elseif c == nil or c == R.null then
      if role ~= "assistant" then R.fail(400, ("'%s.content' is required"):format(where), "messages", "missing_field") end
      c = ""
    elseif type(c) ~= "string" then
      R.fail(400, ("'%s.content' must be a string or a list of text parts, got %s"):format(where, R.json_type(c)),
        "messages", "invalid_type")
    end
    out[#out + 1] = { role = ROLES[role], content = c }
  end
  return out
end

-- What both endpoints check first: the body, the model, unsupported fields, sampling and
-- streaming. Returns the body, the request record for S:generate (kind and prompt-specific
-- fields still to fill) and the runtime's request options.
local function common(S, req, w)
  local body = R.json_body(req)
  local g = { model = model_name(S, body), w = w, conn = req.conn, tenant = S:tenant(req) }
  reject_unsupported(body)
  local p = sampling(body)
  g.stream, g.include_usage = stream_fields(body)
  return body, g, p
end

-- POST /v1/completions
function M.completions(S, req, w)
  local body, g, p = common(S, req, w)
  g.kind = "text_completion"
  local echo = R.boolean(body, "echo", false)
  local ids, prompt_text = completion_prompt(S, body)
  g.prefix = echo and prompt_text or nil
  p.max_tokens = max_tokens(S, body, #ids, 16, "prompt")
  S:generate(g, ids, p)
end

-- POST /v1/chat/completions
function M.chat(S, req, w)
  local body, g, p = common(S, req, w)
  g.kind, g.end_of_turn = "chat.completion", S.end_of_turn
  local text, err = S.template:render(chat_messages(body), true)
  if not text then R.fail(400, "the chat template cannot render these messages: " .. err, "messages", "invalid_messages") end
  local ids = S.tok:encode(text, { bos = false })
  if #ids == 0 then R.fail(400, "the chat template rendered these messages as no tokens", "messages") end
  p.max_tokens = max_tokens(S, body, #ids, nil, "messages")
  S:generate(g, ids, p)
end

-- The model objects: the base, then adapters with their parent.
function M.model_objects(S)
  local out = { { id = S.base, object = "model", created = S.started_at, owned_by = "flexllm",
                  root = S.model_dir, parent = R.null, max_model_len = S.max_seq_len } }
  for _, a in ipairs(S.adapters:list()) do
    out[#out + 1] = { id = a.name, object = "model", created = S.started_at, owned_by = "flexllm",
                      root = a.dir, parent = S.base, max_model_len = S.max_seq_len }
  end
  return out
end

function M.models(S, req, w)
  R.send_json(w, 200, { object = "list", data = M.model_objects(S) })
end

function M.model(S, req, w, query, id)
  for _, m in ipairs(M.model_objects(S)) do
    if m.id == id then return R.send_json(w, 200, m) end
  end
  R.fail(404, ("The model '%s' does not exist; known models: %s"):format(id, table.concat(S:model_names(), ", ")),
    "model", "model_not_found")
end

-- The JSON of one streamed chunk or the final answer, for Server:dispatch. A chunk's object
-- is chat.completion.chunk for chat, and text_completion (as the answer's) for completions.
local function chunk_object(g) return g.kind == "chat.completion" and "chat.completion.chunk" or g.kind end

function M.chunk(g, text, finish)
  local choice
  if g.kind == "chat.completion" then
    local delta = {}
    if not g.role_sent then delta.role, g.role_sent = "assistant", true end
    if text then delta.content = text end
    choice = { index = 0, delta = delta, logprobs = R.null, finish_reason = finish or R.null }
  else
    choice = { index = 0, text = text or "", logprobs = R.null, finish_reason = finish or R.null }
  end
  local obj = { id = g.id, object = chunk_object(g), created = g.created, model = g.model, choices = { choice } }
  if g.include_usage then obj.usage = R.null end
  return obj
end

function M.usage(g)
  return { prompt_tokens = g.prompt_tokens, completion_tokens = g.completion_tokens,
           total_tokens = g.prompt_tokens + g.completion_tokens }
end

function M.usage_chunk(g)
  return { id = g.id, object = chunk_object(g), created = g.created, model = g.model, choices = R.array({}),
           usage = M.usage(g) }
end

function M.answer(g, text, finish)
  local choice
  if g.kind == "chat.completion" then
    choice = { index = 0, message = { role = "assistant", content = text }, logprobs = R.null, finish_reason = finish }
  else
    choice = { index = 0, text = text, logprobs = R.null, finish_reason = finish }
  end
  return { id = g.id, object = g.kind, created = g.created, model = g.model, choices = { choice },
           usage = M.usage(g) }
end

return M
