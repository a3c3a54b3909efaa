-- The built-in chat templates against the Jinja templates the models ship (rendered by
-- Python's jinja2 as transformers does), chosen from tokenizer_config.json; plain lines for
-- models without one; user templates from a Lua file.
local T = require "flexllm.server.chat_template"
local cjson = require "cjson.safe"
local scratch = require "scratch"

local tmp = scratch.dir("server_chat_template_spec")
local write = scratch.write

-- The chat_template strings of the models' tokenizer_config.json files.
local HF = {
  -- meta-llama/Meta-Llama-3-8B-Instruct
  llama3 = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    .. "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    .. "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    .. "{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant"
    .. "<|end_header_id|>\n\n' }}{% endif %}",
  -- Qwen/Qwen2-7B-Instruct
  chatml = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    .. "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' "
    .. "+ message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    .. "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
  -- meta-llama/Llama-2-7b-chat-hf
  llama2 = "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set "
    .. "system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set "
    .. "system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == "
    .. "'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    .. "user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != "
    .. "false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] "
    .. "%}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    .. "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' "
    .. "%}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}",
}

local TOKENS = {
  llama3 = { bos_token = "<|begin_of_text|>", eos_token = "<|eot_id|>" },
  chatml = { bos_token = cjson.null, eos_token = "<|im_end|>" },
  llama2 = { bos_token = "<s>", eos_token = "</s>" },
}

local CONVERSATIONS = {
  { { role = "system", content = "You are terse." }, { role = "user", content = "  Hi there!\n" },
    { role = "assistant", content = "Hello. " }, { role = "user", content = "What is 2+2?" } },
  { { role = "user", content = "One" }, { role = "assistant", content = "Two" }, { role = "user", content = "Three" } },
}

local has_jinja = os.execute("python3 -c 'import jinja2' 2>/dev/null") == 0

-- transformers' rendering: a sandboxed jinja2 environment with trim_blocks and
-- lstrip_blocks, raise_exception defined. cases: { { messages, add_generation_prompt } };
-- returns the texts in order (one python run for all).
local function jinja(template, cases, tokens)
  local input = tmp .. "/in.json"
  write(input, cjson.encode({ template = template, cases = cases, bos_token = tokens.bos_token,
                              eos_token = tokens.eos_token }))
  local script = [==[
import json, sys
from jinja2.sandbox import ImmutableSandboxedEnvironment
a = json.load(open(sys.argv[1]))
def raise_exception(m): raise Exception(m)
env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
env.globals["raise_exception"] = raise_exception
t = env.from_string(a["template"])
out = [t.render(messages=m, add_generation_prompt=g, bos_token=a["bos_token"] or "",
                eos_token=a["eos_token"] or "") for m, g in a["cases"]]
sys.stdout.write(json.dumps(out))
]==]
  write(tmp .. "/render.py", script)
  local p = io.popen(("python3 %s/render.py %s"):format(tmp, input))
  local out = p:read("*a")
  p:close()
  return assert(cjson.decode(out), "jinja2 rendering failed")
end

local function model_with(template, tokens)
  local dir = tmp .. "/m" .. math.random(1e9)
  os.execute("mkdir -p " .. dir)
  write(dir .. "/tokenizer_config.json", cjson.encode({ chat_template = template, bos_token = tokens.bos_token,
                                                        eos_token = tokens.eos_token, add_bos_token = true }))
  return dir
end

describe("built-in chat templates", function()
  for _, name in ipairs({ "llama3", "chatml", "llama2" }) do
    it(name .. " is chosen from the model's template and renders as Jinja does", function()
      local tmpl = assert(T.for_model(model_with(HF[name], TOKENS[name]), nil, { add_bos = true }))
      assert.are.equal(name, tmpl.name)
      if not has_jinja then
        pending("python3 with jinja2 is not installed: the comparison with the Jinja rendering is skipped")
        return
      end
      local cases = {}
      for _, conv in ipairs(CONVERSATIONS) do
        for _, gen in ipairs({ true, false }) do cases[#cases + 1] = { conv, gen } end
      end
      local want = jinja(HF[name], cases, TOKENS[name])
      assert.are.equal(#cases, #want)
      for i, c in ipairs(cases) do
        assert.is_true(#want[i] > 0)
        assert.are.equal(want[i], assert(tmpl:render(c[1], c[2])))
      end
    end)
  end

  it("ChatML takes the default system message from the template, Qwen2.5's included", function()
    local q25 = HF.chatml:gsub("You are a helpful assistant%.", "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.")
    local tmpl = assert(T.for_model(model_with(q25, TOKENS.chatml)))
    local text = tmpl:render({ { role = "user", content = "hi" } }, true)
    assert.are.equal("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
      .. "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", text)
  end)

  it("LLaMA-2 refuses roles that do not alternate, as its template does", function()
    local tmpl = assert(T.for_model(model_with(HF.llama2, TOKENS.llama2)))
    local text, err = tmpl:render({ { role = "user", content = "a" }, { role = "user", content = "b" } }, true)
    assert.is_nil(text)
    assert.matches("Conversation roles must alternate", err, 1, true)
  end)

  it("plain lines for a model without a chat template, BOS written when the tokenizer adds one", function()
    local dir = tmp .. "/plain"
    os.execute("mkdir -p " .. dir)
    write(dir .. "/tokenizer_config.json", cjson.encode({ bos_token = "<s>", eos_token = "</s>" }))
    local tmpl = assert(T.for_model(dir, nil, { add_bos = true }))
    assert.are.equal("plain", tmpl.name)
    assert.matches("no chat template", tmpl.note, 1, true)
    assert.are.equal("<s>system: s\nuser: u\nassistant: ", tmpl:render({ { role = "system", content = "s" },
                                                                        { role = "user", content = "u" } }, true))
    tmpl = assert(T.for_model(dir, nil, { add_bos = false }))
    assert.are.equal("user: u\n", tmpl:render({ { role = "user", content = "u" } }, false))
  end)

  it("an unknown template asks for --chat-template", function()
    local tmpl, err = T.for_model(model_with("{{ messages }}", TOKENS.llama2))
    assert.is_nil(tmpl)
    assert.matches("give one with --chat-template FILE", err, 1, true)
  end)
end)

describe("a user template", function()
  it("is a Lua file returning function(messages, add_generation_prompt, tokens)", function()
    local file = tmp .. "/tmpl.lua"
    write(file, [[return function(messages, gen, tokens)
      local out = {}
      for _, m in ipairs(messages) do out[#out + 1] = "<" .. m.role .. ">" .. m.content end
      if gen then out[#out + 1] = "<assistant>" end
      return (tokens.bos_token or "") .. table.concat(out)
    end]])
    local tmpl = assert(T.for_model(model_with(HF.llama2, TOKENS.llama2), file))
    assert.are.equal("<s><user>hi<assistant>", tmpl:render({ { role = "user", content = "hi" } }, true))
  end)

  it("that fails to load or returns no function is refused with the file's name", function()
    local file = tmp .. "/bad.lua"
    write(file, "return 42")
    local tmpl, err = T.for_model(model_with(HF.llama2, TOKENS.llama2), file)
    assert.is_nil(tmpl)
    assert.matches("--chat-template " .. file .. ": must return function", err, 1, true)
    write(file, "return function(")
    tmpl, err = T.for_model(model_with(HF.llama2, TOKENS.llama2), file)
    assert.is_nil(tmpl)
    assert.matches("--chat-template " .. file, err, 1, true)
  end)

  it("whose function fails or returns no string gives an error, not a crash", function()
    local file = tmp .. "/raises.lua"
    write(file, "return function(m) if #m > 1 then error('one message only', 0) end return 5 end")
    local tmpl = assert(T.for_model(model_with(HF.llama2, TOKENS.llama2), file))
    local text, err = tmpl:render({ {}, {} }, true)
    assert.is_nil(text)
    assert.matches("one message only", err, 1, true)
    text, err = tmpl:render({ {} }, true)
    assert.is_nil(text)
    assert.matches("returned a number instead of a string", err, 1, true)
  end)
end)
