-- The server's routes on a real (tiny) model, answered into a recording writer: text
-- against the engine's own generator, stream shapes, every malformed input's status and
-- message, auth, disconnects, adapters under a memory budget, and fine-tuning jobs.
local fl = require "flexllm"
local server = require "flexllm.server"
local F = require "server_fixture"
local cjson = require "cjson.safe"

local function new_server(opts)
  opts = opts or {}
  opts.model = F.model_dir
  opts.data_dir = opts.data_dir or (F.tmp .. "/data")
  opts.log = opts.log or function() end
  return assert(server.new(opts))
end

-- The reference: the generator (not the runtime) on the same prompt, greedy.
local model = assert(fl.load(F.model_dir))
local function reference(prompt, n, bos)
  return assert(model:generate(prompt, { max_tokens = n, temperature = 0, ignore_eos = true, bos = bos }))
end

local function expect_error(w, status, fragment, param)
  assert.are.equal(status, w.status, w.body)
  local e = assert(w:json(), "not JSON: " .. tostring(w.body)).error
  assert.is_table(e)
  assert.are.equal(status >= 500 and "server_error" or "invalid_request_error", e.type)
  assert.is_truthy(e.message:find(fragment, 1, true), ("message %q lacks %q"):format(e.message, fragment))
  if param then assert.are.equal(param, e.param) end
  assert.are.equal("application/json", w.headers["content-type"])
end

describe("completions and chat", function()
  local S = new_server()
  local M = "tiny"

  it("answers a completion with the generator's greedy text and its usage", function()
    local w = F.call(S, "POST", "/v1/completions", { model = M, prompt = "the cat", max_tokens = 10,
                                                   temperature = 0, ignore_eos = true })
    assert.are.equal(200, w.status, w.body)
    local r = w:json()
    local ref = reference("the cat", 10)
    assert.are.equal("text_completion", r.object)
    assert.are.equal(M, r.model)
    assert.are.equal(ref.text, r.choices[1].text)
    assert.are.equal("length", r.choices[1].finish_reason)
    assert.are.same({ prompt_tokens = ref.prompt_tokens, completion_tokens = 10,
                      total_tokens = ref.prompt_tokens + 10 }, r.usage)
  end)

  it("streams the same text as SSE chunks ending with usage and [DONE]", function()
    local w = F.call(S, "POST", "/v1/completions", { model = M, prompt = "the cat", max_tokens = 10,
      temperature = 0, ignore_eos = true, stream = true, stream_options = { include_usage = true } })
    assert.are.equal(200, w.status)
    assert.are.equal("text/event-stream", w.headers["content-type"])
    local ev = w:events()
    assert.are.equal("[DONE]", ev[#ev])
    local usage = ev[#ev - 1]
    assert.are.same({}, usage.choices)
    assert.are.equal(10, usage.usage.completion_tokens)
    local text, ids = {}, {}
    for i = 1, #ev - 2 do
      assert.are.equal("text_completion", ev[i].object)
      ids[ev[i].id] = true
      text[#text + 1] = ev[i].choices[1].text
      assert.are.equal(i == #ev - 2 and "length" or cjson.null, ev[i].choices[1].finish_reason)
    end
    assert.are.equal(reference("the cat", 10).text, table.concat(text))
    assert.are.equal(1, #(function() local l = {} for k in pairs(ids) do l[#l + 1] = k end return l end)())
  end)

  it("echoes the prompt when asked", function()
    local r = F.call(S, "POST", "/v1/completions", { model = M, prompt = "the cat", max_tokens = 4,
                                                   temperature = 0, ignore_eos = true, echo = true }):json()
    assert.are.equal("the cat" .. reference("the cat", 4).text, r.choices[1].text)
  end)

  it("takes a prompt of token ids", function()
    local ids = model:encode("the cat")
    local r = F.call(S, "POST", "/v1/completions", { model = M, prompt = ids, max_tokens = 6,
                                                   temperature = 0, ignore_eos = true }):json()
    assert.are.equal(reference("the cat", 6).text, r.choices[1].text)
  end)

  it("renders chat messages with the template and generates from them", function()
    local messages = { { role = "system", content = "be kind" }, { role = "user", content = "hi" } }
    local w = F.call(S, "POST", "/v1/chat/completions", { model = M, messages = messages, max_tokens = 8,
                                                        temperature = 0, ignore_eos = true })
    assert.are.equal(200, w.status, w.body)
    local r = w:json()
    -- the default model has no chat template: plain lines, BOS written by the template
    local prompt = model.tok:token_text(model.tok:info().bos) .. "system: be kind\nuser: hi\nassistant: "
    assert.are.equal(reference(prompt, 8, false).text, r.choices[1].message.content)
    assert.are.equal("assistant", r.choices[1].message.role)
    assert.are.equal("chat.completion", r.object)

    local s = F.call(S, "POST", "/v1/chat/completions", { model = M, messages = messages, max_tokens = 8,
                                                        temperature = 0, ignore_eos = true, stream = true })
    local ev = s:events()
    assert.are.equal("assistant", ev[1].choices[1].delta.role)
    local text = {}
    for i = 1, #ev - 1 do
      assert.are.equal("chat.completion.chunk", ev[i].object)
      text[#text + 1] = ev[i].choices[1].delta.content or ""
    end
    assert.are.equal(r.choices[1].message.content, table.concat(text))
    assert.are.equal("length", ev[#ev - 1].choices[1].finish_reason)
    assert.is_nil(ev[#ev - 1].usage) -- no include_usage: no usage field at all
  end)

  it("ends a chat turn at the template's end-of-turn token, cancelling the rest in the runtime", function()
    local messages = { { role = "user", content = "hi" } }
    local prompt = model.tok:token_text(model.tok:info().bos) .. "user: hi\nassistant: "
    local texts = {}
    local ref = assert(model:generate(prompt, { max_tokens = 12, temperature = 0, ignore_eos = true, bos = false },
      function(_, ev) texts[#texts + 1] = ev.text end))
    -- the first token that did not occur before it ends the turn
    local k, seen = nil, {}
    for i, id in ipairs(ref.ids) do
      if i > 1 and not seen[id] then k = i break end
      seen[id] = true
    end
    local saved = S.end_of_turn
    S.end_of_turn = { [ref.ids[k]] = true }
    local r = F.call(S, "POST", "/v1/chat/completions", { model = M, messages = messages, max_tokens = 12,
                                                        temperature = 0, ignore_eos = true }):json()
    S.end_of_turn = saved
    assert.are.equal(table.concat(texts, "", 1, k - 1), r.choices[1].message.content)
    assert.are.equal("stop", r.choices[1].finish_reason)
    assert.are.equal(k - 1, r.usage.completion_tokens)
    assert.are.equal(0, S.rt:active())
  end)

  it("counts every finished request in the SLO tracker and the latency histograms", function()
    local before = S.hist.ttft.count
    F.call(S, "POST", "/v1/completions", { model = M, prompt = "a", max_tokens = 3 })
    assert.are.equal(before + 1, S.hist.ttft.count)
    assert.are.equal(S.hist.ttft.count, S.tracker:report().default.requests)
  end)

  it("lists the base model", function()
    local r = F.call(S, "GET", "/v1/models"):json()
    assert.are.equal("list", r.object)
    assert.are.equal(M, r.data[1].id)
    assert.are.equal("model", r.data[1].object)
    assert.are.equal("flexllm", r.data[1].owned_by)
  end)
end)

describe("malformed requests", function()
  local S = new_server()
  local ok = { model = "tiny", prompt = "a" }
  local function with(t)
    local b = {}
    for k, v in pairs(ok) do b[k] = v end
    for k, v in pairs(t) do b[k] = v end
    return b
  end

  local cases = {
    { "bad JSON", '{"model": "tiny", "prompt": ', 400, "the body is not valid JSON: Expected" },
    { "not an object", "[1, 2]", 400, "must be a JSON object, got an array" },
    { "empty body", "", 400, "the request body is empty" },
    { "model missing", { prompt = "a" }, 400, "'model' is required; known models: tiny", "model" },
    { "model a number", with({ model = 3 }), 400, "'model' must be a string, got a number", "model" },
    { "unknown model", with({ model = "gpt-9" }), 404, "The model 'gpt-9' does not exist; known models: tiny", "model" },
    { "max_tokens a string", with({ max_tokens = "10" }), 400, "'max_tokens' must be an integer, got a string", "max_tokens" },
    { "max_tokens a fraction", with({ max_tokens = 1.5 }), 400, "'max_tokens' must be an integer", "max_tokens" },
    { "max_tokens negative", with({ max_tokens = -1 }), 400, "'max_tokens' must be at least 1, got -1", "max_tokens" },
    { "max_tokens beyond the context", with({ max_tokens = 300 }), 400, "maximum context length is 256 tokens", "max_tokens" },
    { "n = 2", with({ n = 2 }), 400, "'n' must be 1", "n" },
    { "temperature a string", with({ temperature = "hot" }), 400, "'temperature' must be a number", "temperature" },
    { "temperature too high", with({ temperature = 3 }), 400, "'temperature' must be between 0 and 2", "temperature" },
    { "top_p zero", with({ top_p = 0 }), 400, "'top_p' must be greater than 0", "top_p" },
    { "stop a number", with({ stop = 5 }), 400, "'stop' must be a string or an array of strings", "stop" },
    { "stop with a number", with({ stop = { "x", 5 } }), 400, "'stop[1]' must be a string", "stop" },
    { "stream a string", with({ stream = "yes" }), 400, "'stream' must be a boolean", "stream" },
    { "stream_options without stream", with({ stream_options = { include_usage = true } }), 400,
      "only allowed when 'stream' is true", "stream_options" },
    { "prompt missing", { model = "tiny" }, 400, "'prompt' is required", "prompt" },
    { "prompt an object", with({ prompt = { a = 1 } }), 400, "'prompt' must be a string", "prompt" },
    { "two prompts", with({ prompt = { "a", "b" } }), 400, "holds 2 prompts", "prompt" },
    { "a token id outside the vocabulary", with({ prompt = { 1, 100000 } }), 400, "'prompt[1]' must be a token id in [0, 512)", "prompt" },
    { "logprobs", with({ logprobs = 2 }), 400, "log probabilities are not returned", "logprobs" },
    { "a penalty", with({ presence_penalty = 0.5 }), 400, "penalties are not supported", "presence_penalty" },
    { "seed negative", with({ seed = -3 }), 400, "'seed' must be between 0", "seed" },
  }
  for _, c in ipairs(cases) do
    it(c[1] .. " -> " .. c[3], function()
      expect_error(F.call(S, "POST", "/v1/completions", c[2]), c[3], c[4], c[5])
    end)
  end

  local chat_cases = {
    { "messages missing", { model = "tiny" }, "'messages' is required", "messages" },
    { "messages a string", { model = "tiny", messages = "hi" }, "'messages' must be an array", "messages" },
    { "a message without role", { model = "tiny", messages = { { content = "hi" } } }, "'messages[0].role' is required" },
    { "an unknown role", { model = "tiny", messages = { { role = "wizard", content = "hi" } } }, "'messages[0].role' is 'wizard'" },
    { "content a number", { model = "tiny", messages = { { role = "user", content = 5 } } }, "'messages[0].content' must be a string" },
    { "an image part", { model = "tiny", messages = { { role = "user", content = { { type = "image_url" } } } } },
      "only text parts" },
    { "tools", { model = "tiny", messages = { { role = "user", content = "x" } }, tools = { { type = "function" } } },
      "tool calls are not supported", "tools" },
  }
  for _, c in ipairs(chat_cases) do
    it("chat: " .. c[1] .. " -> 400", function()
      expect_error(F.call(S, "POST", "/v1/chat/completions", c[2]), 400, c[3], c[4])
    end)
  end

  it("unknown routes get 404 and wrong methods 405 with Allow", function()
    expect_error(F.call(S, "GET", "/v1/engines"), 404, "no route for GET /v1/engines")
    local w = F.call(S, "PUT", "/v1/models")
    expect_error(w, 405, "PUT /v1/models is not allowed; use GET")
    assert.are.equal("GET", w.headers.allow)
    w = F.call(S, "GET", "/v1/files/file-x/content")
    expect_error(w, 404, "no such file: 'file-x'")
    -- a path is percent-decoded, and '+' in it is a plus (in a query it is a space)
    expect_error(F.call(S, "GET", "/v1/models/lora+math%2Fv2"), 404, "The model 'lora+math/v2' does not exist")
    expect_error(F.call(S, "GET", "/v1/fine_tuning/jobs?limit=1+x"), 400, "'limit' must be a positive integer, got '1 x'")
  end)

  it("limits prompt tokens with --max-prompt-tokens", function()
    local L = new_server({ max_prompt_tokens = 3 })
    local n = #model:encode("the cat sat on the mat")
    expect_error(F.call(L, "POST", "/v1/completions", { model = "tiny", prompt = "the cat sat on the mat" }), 400,
      ("the prompt has %d tokens, more than this server's limit of 3"):format(n), "prompt")
  end)

  it("leaves other requests alone: a good one after all the bad ones is answered in full", function()
    local r = F.call(S, "POST", "/v1/completions", { model = "tiny", prompt = "the cat", max_tokens = 5,
                                                   temperature = 0, ignore_eos = true }):json()
    assert.are.equal(reference("the cat", 5).text, r.choices[1].text)
    assert.are.equal(0, S.rt:active())
  end)
end)

describe("an API key", function()
  local S = new_server({ api_key = "sk-secret" })

  it("guards /v1 and /admin with a 401 OpenAI error", function()
    local w = F.call(S, "GET", "/v1/models")
    expect_error(w, 401, "You didn't provide an API key")
    assert.are.equal("Bearer", w.headers["www-authenticate"])
    expect_error(F.call(S, "GET", "/v1/models", nil, { authorization = "Bearer sk-secreT" }), 401,
      "Incorrect API key provided")
    expect_error(F.call(S, "GET", "/admin/status", nil, { authorization = "Basic x" }), 401, "API key")
    expect_error(F.call(S, "POST", "/v1/nothing", nil, {}), 401, "API key")
  end)

  it("lets the right key through, and /health and /metrics without one", function()
    assert.are.equal(200, F.call(S, "GET", "/v1/models", nil, { authorization = "Bearer sk-secret" }).status)
    local w = F.call(S, "GET", "/health")
    assert.are.equal(200, w.status)
    assert.are.equal("ok", w.body)
    assert.are.equal(200, F.call(S, "GET", "/metrics").status)
  end)
end)

describe("a client that goes away", function()
  local S = new_server()

  it("cancels its streaming request in the runtime; the next request is served", function()
    local w = F.writer(2)
    S:handle(F.request("POST", "/v1/completions", { model = "tiny", prompt = "the cat", max_tokens = 100,
                                                    ignore_eos = true, stream = true }), w)
    for _ = 1, 100 do S:step() end
    assert.are.equal(0, S.rt:active())
    assert.are.equal(1, S.rt:stats().requests_cancelled)
    assert.are.equal(1, S.finished.cancelled)
    local r = F.call(S, "POST", "/v1/completions", { model = "tiny", prompt = "the cat", max_tokens = 5,
                                                   temperature = 0, ignore_eos = true }):json()
    assert.are.equal(reference("the cat", 5).text, r.choices[1].text)
  end)

  it("cancels a waiting non-streaming request when its connection closes", function()
    local w = F.writer()
    local req = F.request("POST", "/v1/completions", { model = "tiny", prompt = "x", max_tokens = 100, ignore_eos = true })
    S:handle(req, w)
    S:step()
    S:closed(req.conn)
    assert.are.equal(0, S.rt:active())
    assert.are.equal(2, S.rt:stats().requests_cancelled)
    assert.is_nil(w.status)
  end)
end)

-- A PEFT folder from a job's freshly made adapter (B = 0), written without training.
local function adapter_folder(name, seed)
  local data = F.tmp .. "/adapter-data.txt"
  F.write(data, ("the cat sat on the mat. "):rep(20))
  local job = assert(model:context():finetune({ data = data, out = F.tmp .. "/job-" .. name, rank = 4,
                                                seed = seed }))
  local dir = F.tmp .. "/" .. name
  assert(job:adapter():save(dir, F.model_dir))
  return dir
end

describe("adapters", function()
  local a_dir, b_dir = adapter_folder("a", 1), adapter_folder("b", 2)

  it("load and unload like vLLM, listed with their parent", function()
    local S = new_server()
    local w = F.call(S, "POST", "/v1/load_lora_adapter", { lora_name = "a", lora_path = a_dir })
    assert.are.equal(200, w.status, w.body)
    assert.are.equal("Success: LoRA adapter 'a' added successfully.", w.body)
    local r = F.call(S, "GET", "/v1/models"):json()
    assert.are.same({ "tiny", "a" }, { r.data[1].id, r.data[2].id })
    assert.are.equal("tiny", r.data[2].parent)
    assert.are.equal(a_dir, r.data[2].root)
    assert.are.equal("a", F.call(S, "GET", "/v1/models/a"):json().id)
    expect_error(F.call(S, "POST", "/v1/load_lora_adapter", { lora_name = "a", lora_path = a_dir }), 400,
      "The lora adapter 'a' has already been loaded.")
    expect_error(F.call(S, "POST", "/v1/load_lora_adapter", { lora_name = "c", lora_path = F.tmp .. "/none" }), 400,
      "adapter 'c'", "lora_path")
    expect_error(F.call(S, "POST", "/v1/load_lora_adapter", { lora_name = "c" }), 400, "'lora_path' is required")
    -- a zero-B adapter generates exactly what the base model does
    local out = F.call(S, "POST", "/v1/completions", { model = "a", prompt = "the cat", max_tokens = 6,
                                                     temperature = 0, ignore_eos = true }):json()
    assert.are.equal(reference("the cat", 6).text, out.choices[1].text)
    assert.are.equal("a", out.model)
    w = F.call(S, "POST", "/v1/unload_lora_adapter", { lora_name = "a" })
    assert.are.equal("Success: LoRA adapter 'a' removed successfully.", w.body)
    expect_error(F.call(S, "POST", "/v1/unload_lora_adapter", { lora_name = "a" }), 404,
      "The lora adapter 'a' cannot be found.")
    expect_error(F.call(S, "POST", "/v1/completions", { model = "a", prompt = "x" }), 404, "'a' does not exist")
  end)

  it("share a memory budget: one in use is never evicted, the request that cannot fit gets 503", function()
    local probe = new_server()
    local one = model:load_adapter(a_dir):info().bytes
    local S = new_server({ memory_budget = probe.kv_bytes + one, adapters = { "a=" .. a_dir, "b=" .. b_dir } })
    assert.are.equal(one, S.adapters.budget)
    -- a streams (in use); b cannot evict it
    local wa = F.writer()
    S:handle(F.request("POST", "/v1/completions", { model = "a", prompt = "x", max_tokens = 50, ignore_eos = true,
                                                    stream = true }), wa)
    S:step()
    local wb = F.call(S, "POST", "/v1/completions", { model = "b", prompt = "x", max_tokens = 2 })
    expect_error(wb, 503, "no memory for the adapter 'b'", "model")
    F.run(S, wa)
    -- a finished: b evicts it now
    local evictions = S.adapters.evictions
    assert.are.equal(200, F.call(S, "POST", "/v1/completions", { model = "b", prompt = "x", max_tokens = 2 }).status)
    local st = F.call(S, "GET", "/admin/status"):json()
    assert.are.equal(1, #st.adapters.resident)
    assert.are.equal("b", st.adapters.resident[1].name)
    assert.are.equal(evictions + 1, st.adapters.evictions)
  end)

  it("refuse a budget smaller than the KV pool, and a bad --adapter at start", function()
    local S, err = server.new({ model = F.model_dir, memory_budget = 1000, data_dir = F.tmp .. "/data" })
    assert.is_nil(S)
    assert.matches("leaves nothing for adapters", err, 1, true)
    S, err = server.new({ model = F.model_dir, adapters = { "x=" .. F.tmp .. "/missing" }, data_dir = F.tmp .. "/data" })
    assert.is_nil(S)
    assert.matches("--adapter x=", err, 1, true)
    S, err = server.new({ model = F.model_dir, adapters = { "novalue" }, data_dir = F.tmp .. "/data" })
    assert.matches("expected NAME=DIR", err, 1, true)
  end)

  it("take lifecycle hooks from a file: on_missing finds unknown names", function()
    local hooks = F.tmp .. "/lifecycle.lua"
    F.write(hooks, ("return { on_missing = function(name) if name == 'auto' then return %q end end }"):format(a_dir))
    local S = new_server({ lifecycle = hooks })
    assert.are.equal(200, F.call(S, "POST", "/v1/completions", { model = "auto", prompt = "x", max_tokens = 2 }).status)
    expect_error(F.call(S, "POST", "/v1/completions", { model = "other", prompt = "x" }), 404, "'other' does not exist")
    F.write(hooks, "return { on_mising = function() end }")
    local bad, err = server.new({ model = F.model_dir, lifecycle = hooks, data_dir = F.tmp .. "/data" })
    assert.is_nil(bad)
    assert.matches("unknown hook on_mising", err, 1, true)
  end)
end)

-- A multipart upload as the openai package sends it.
local function upload(S, name, content)
  local b = "----flexllm-spec-boundary"
  local body = table.concat({
    "--" .. b, 'Content-Disposition: form-data; name="purpose"', "", "fine-tune",
    "--" .. b, ('Content-Disposition: form-data; name="file"; filename="%s"'):format(name),
    "Content-Type: application/octet-stream", "", content,
    "--" .. b .. "--", "" }, "\r\n")
  return F.call(S, "POST", "/v1/files", body, { ["content-type"] = "multipart/form-data; boundary=" .. b })
end

describe("files and fine-tuning jobs", function()
  local S = new_server({ data_dir = F.tmp .. "/jobs-data" })
  local lines = {}
  for i = 1, 6 do
    lines[i] = ('{"prompt": "the cat %d", "completion": " sat on the mat number %d."}'):format(i, i)
  end
  local data = table.concat(lines, "\n") .. "\n"

  it("stores a valid upload and refuses a bad line with its number", function()
    local w = upload(S, "t.jsonl", data)
    assert.are.equal(200, w.status, w.body)
    local f = w:json()
    assert.are.equal(#data, f.bytes)
    assert.are.equal("fine-tune", f.purpose)
    assert.are.equal(f.id, F.call(S, "GET", "/v1/files/" .. f.id):json().id)
    assert.are.equal(data, F.call(S, "GET", "/v1/files/" .. f.id .. "/content").body)
    assert.are.equal(f.id, F.call(S, "GET", "/v1/files"):json().data[1].id)
    expect_error(upload(S, "bad.jsonl", '{"text": "ok"}\n\n{"messages": [{"role": "user"}]}\n'), 400,
      "invalid training file bad.jsonl: line 3: messages[0].content must be a string", "file")
  end)

  it("trains a job to an adapter served under its fine_tuned_model name", function()
    local f = upload(S, "t.jsonl", data):json()
    local w = F.call(S, "POST", "/v1/fine_tuning/jobs", { model = "tiny", training_file = f.id, suffix = "cats",
      hyperparameters = { n_epochs = 3, learning_rate_multiplier = 5, lora_rank = 4, lora_targets = { "q", "v", "o" } } })
    assert.are.equal(200, w.status, w.body)
    local job = w:json()
    assert.are.equal("validating_files", job.status)
    assert.are.equal(4, job.hyperparameters.lora_rank)
    assert.are.equal("q,v,o", job.hyperparameters.lora_targets)
    local statuses = {}
    for _ = 1, 100000 do
      S:step()
      S:tick()
      job = F.call(S, "GET", "/v1/fine_tuning/jobs/" .. job.id):json()
      statuses[job.status] = true
      if job.status == "succeeded" or job.status == "failed" then break end
    end
    assert.are.equal("succeeded", job.status, cjson.encode(job.error))
    assert.is_true(statuses.queued or statuses.running)
    assert.are.equal(("ft:tiny:cats:%s"):format(job.id:sub(#"ftjob-" + 1)), job.fine_tuned_model)
    assert.is_true(job.trained_tokens > 0)

    local ev = F.call(S, "GET", "/v1/fine_tuning/jobs/" .. job.id .. "/events?limit=100"):json()
    assert.are.equal("The job has successfully completed", ev.data[1].message)
    assert.are.equal("Validating training file: " .. f.id, ev.data[#ev.data].message)
    local metric
    for _, e in ipairs(ev.data) do if e.type == "metrics" then metric = e break end end
    assert.is_truthy(metric.message:match("^Step %d+/%d+: training loss=%d"))
    local page = F.call(S, "GET", "/v1/fine_tuning/jobs/" .. job.id .. "/events?limit=2"):json()
    assert.is_true(page.has_more)
    local next_page = F.call(S, "GET", ("/v1/fine_tuning/jobs/%s/events?limit=2&after=%s"):format(job.id,
      page.data[2].id)):json()
    assert.are.equal(ev.data[3].id, next_page.data[1].id)

    -- the adapter is served and changes the output; the base is unchanged
    local prompt = { model = job.fine_tuned_model, prompt = "the cat 3", max_tokens = 8, temperature = 0,
                     ignore_eos = true }
    local tuned = F.call(S, "POST", "/v1/completions", prompt):json().choices[1].text
    local loaded = model:load_adapter(F.tmp .. "/jobs-data/jobs/" .. job.id)
    local want = assert(model:generate("the cat 3", { max_tokens = 8, temperature = 0, ignore_eos = true,
                                                      adapter = loaded }))
    assert.are.equal(want.text, tuned)
    assert.are_not.equal(reference("the cat 3", 8).text, tuned)
    local models = F.call(S, "GET", "/v1/models"):json().data
    assert.are.equal(job.fine_tuned_model, models[2].id)
    assert.are.equal("tiny", models[2].parent)
  end)

  it("cancels a running job and refuses bad job requests", function()
    local f = upload(S, "t.jsonl", data):json()
    local job = F.call(S, "POST", "/v1/fine_tuning/jobs", { model = "tiny", training_file = f.id,
                                                          hyperparameters = { n_epochs = 1000 } }):json()
    for _ = 1, 100000 do
      S:step()
      S:tick()
      if S.jobs.jobs[job.id].public.status == "running" then break end
    end
    local c = F.call(S, "POST", "/v1/fine_tuning/jobs/" .. job.id .. "/cancel")
    assert.are.equal("cancelled", c:json().status)
    for _ = 1, 10 do S:step() S:tick() end
    assert.are.equal(0, S.rt:active())
    assert.are.equal("cancelled", F.call(S, "GET", "/v1/fine_tuning/jobs/" .. job.id):json().status)
    expect_error(F.call(S, "POST", "/v1/fine_tuning/jobs/" .. job.id .. "/cancel"), 400, "has already finished")
    local list = F.call(S, "GET", "/v1/fine_tuning/jobs?limit=1"):json()
    assert.are.equal(job.id, list.data[1].id)
    assert.is_true(list.has_more)

    expect_error(F.call(S, "POST", "/v1/fine_tuning/jobs", { model = "tiny", training_file = "file-0" }), 400,
      "no such file 'file-0'", "training_file")
    expect_error(F.call(S, "POST", "/v1/fine_tuning/jobs", { model = "other", training_file = f.id }), 400,
      "finetuning starts from the base model 'tiny'", "model")
    expect_error(F.call(S, "POST", "/v1/fine_tuning/jobs", { model = "tiny", training_file = f.id,
      hyperparameters = { n_epochs = 0 } }), 400, "'hyperparameters.n_epochs' must be at least 1")
    expect_error(F.call(S, "POST", "/v1/fine_tuning/jobs", { model = "tiny", training_file = f.id,
      hyperparameters = { lora_targets = "q,zz" } }), 400, "unknown target 'zz'")
    expect_error(F.call(S, "POST", "/v1/fine_tuning/jobs", { model = "tiny", training_file = f.id,
      suffix = "no spaces" }), 400, "'suffix' must be")
    expect_error(F.call(S, "GET", "/v1/fine_tuning/jobs/ftjob-none"), 404, "no such fine-tuning job")
  end)
end)

describe("SLO rules", function()
  it("count a request under its tenant's rule: the X-Tenant header, else the API key, else the default", function()
    local path = F.tmp .. "/tenants.lua"
    F.write(path, "return { default = { ttft = 100 }, tenants = { a = { ttft = 100 }, ['sk-b'] = { ttft = 100 } } }")
    local S = new_server({ slo = path })
    local function ask(headers)
      F.call(S, "POST", "/v1/completions", { model = "tiny", prompt = "x", max_tokens = 2 }, headers)
    end
    ask({ ["x-tenant"] = "a" })
    ask({ ["x-tenant"] = "a", authorization = "Bearer sk-b" })
    ask({ authorization = "Bearer sk-b  " })
    ask({ authorization = "bearer sk-c" })
    ask({})
    local report = S.tracker:report()
    assert.are.equal(2, report["tenant:a"].requests)
    assert.are.equal(1, report["tenant:sk-b"].requests)
    assert.are.equal(2, report.default.requests)
  end)

  it("leave a bound the matched rule lacks unbounded in the runtime, not the default's", function()
    local path = F.tmp .. "/partial.lua"
    F.write(path, "return { default = { ttft = 100, tpot = 1e-9 }, tenants = { a = { ttft = 100 } } }")
    local S = new_server({ slo = path })
    local body = { model = "tiny", prompt = "x", max_tokens = 4, ignore_eos = true }
    F.call(S, "POST", "/v1/completions", body, { ["x-tenant"] = "a" })
    local st = S.rt:stats()
    assert.are.equal(1, st.requests_done)
    assert.are.equal(1, st.requests_slo_met) -- tenant a bounds only the first token
    F.call(S, "POST", "/v1/completions", body)
    st = S.rt:stats()
    assert.are.equal(2, st.requests_done)
    assert.are.equal(1, st.requests_slo_met) -- the default's 1 ns per token is missed
  end)
end)

describe("admin", function()
  it("reloads the SLO file now and reports a bad edit, keeping the old rules", function()
    local path = F.tmp .. "/slo.lua"
    F.write(path, "return { default = { ttft = 2 }, adapters = { a = { ttft = 1 } } }")
    local S = new_server({ slo = path })
    local st = F.call(S, "GET", "/admin/status"):json()
    assert.are.equal(2, #st.slo.rules)
    F.write(path, "return { default = { ttft = -1 } }")
    local w = F.call(S, "POST", "/admin/reload")
    assert.are.equal(400, w.status)
    local r = w:json()
    assert.is_false(r.slo.ok)
    assert.matches("must be a positive number", r.error.message, 1, true)
    assert.are.equal(2, #F.call(S, "GET", "/admin/status"):json().slo.rules)
    F.write(path, "return { default = { ttft = 3 } }")
    r = F.call(S, "POST", "/admin/reload"):json()
    assert.is_true(r.ok)
    assert.are.equal(1, r.slo.rules)
  end)
end)
