-- The flexllm command line. Run through bin/flexllm; each command is a function
-- taking the parsed options.
local M = {}

local function die(msg)
  io.stderr:write("flexllm: ", msg, "\n")
  os.exit(1)
end

local function flexllm()
  local ok, fl = pcall(require, "flexllm")
  if not ok then die("cannot load the engine module (did `make` run?): " .. tostring(fl)) end
  return fl
end

-- spec: option name -> "string" | "number" | "flag" | "list". Returns options and positionals.
local function parse(args, spec, command)
  local opts, pos, i = {}, {}, 1
  while i <= #args do
    local a = args[i]
    local name, inline = a:match("^%-%-([%w%-]+)=(.*)$")
    name = name or a:match("^%-%-([%w%-]+)$")
    if name then
      local kind = spec[name]
      if not kind then die(("%s: unknown option --%s (see flexllm help)"):format(command, name)) end
      local key = name:gsub("%-", "_")
      if kind == "flag" then
        if inline then die(("%s: --%s takes no value"):format(command, name)) end
        opts[key] = true
      else
        local v = inline
        if not v then
          i = i + 1
          v = args[i]
          if v == nil then die(("%s: --%s needs a value"):format(command, name)) end
        end
        if kind == "number" then
          local n = tonumber(v)
          if not n then die(("%s: --%s must be a number, got '%s'"):format(command, name, v)) end
          v = n
        end
        if kind == "list" then
          opts[key] = opts[key] or {}
          table.insert(opts[key], v)
        else
          opts[key] = v
        end
      end
    else
      pos[#pos + 1] = a
    end
    i = i + 1
  end
  return opts, pos
end

local function need(opts, key, command)
  if opts[key] == nil then die(("%s: --%s is required"):format(command, key:gsub("_", "-"))) end
  return opts[key]
end

-- device: "auto" (default), "cpu" or "cuda"; the choice and its reason go to stderr.
local function load_model(dir, threads, gemm, device)
  local model, err = flexllm().load(dir, { threads = threads, gemm = gemm, device = device })
  if not model then die(err) end
  if device then
    local _, why = model.handle:device()
    io.stderr:write("flexllm: device ", why, "\n")
  end
  return model
end

local commands = {}

commands.generate = {
  usage = "generate --model DIR [--prompt TEXT] [--max-tokens N] [--temperature T] [--top-k K]\n"
    .. "         [--top-p P] [--seed S] [--stop STR]... [--ignore-eos] [--no-bos] [--ids] [--threads N]\n"
    .. "         [--gemm packed|openblas] [--device auto|cpu|cuda]",
  help = "stream a completion of TEXT to stdout (an empty prompt starts from BOS); --ids prints token ids",
  spec = { model = "string", prompt = "string", ["max-tokens"] = "number", temperature = "number",
           ["top-k"] = "number", ["top-p"] = "number", seed = "number", stop = "list",
           ["ignore-eos"] = "flag", ["no-bos"] = "flag", ids = "flag", threads = "number",
           gemm = "string", device = "string" },
  run = function(o)
    local model = load_model(need(o, "model", "generate"), o.threads, o.gemm, o.device or "auto")
    local first = true
    local res, err = model:generate(o.prompt or "", {
      max_tokens = o.max_tokens or 128, temperature = o.temperature or 0, top_k = o.top_k,
      top_p = o.top_p, seed = o.seed, stop = o.stop, ignore_eos = o.ignore_eos,
      bos = not o.no_bos or nil,
    }, function(_, ev)
      if o.ids then
        if not ev.eos then
          io.stdout:write(first and "" or " ", ev.token)
          first = false
        end
      else
        io.stdout:write(ev.text)
      end
      io.stdout:flush()
    end)
    if not res then die(err) end
    io.stdout:write("\n")
  end,
}

commands.tokenize = {
  usage = "tokenize (--model DIR | --tokenizer FILE) [--detokenize] [--no-bos] [--no-special]",
  help = "read text lines on stdin, print one line of ids per line (--detokenize: the reverse)",
  spec = { model = "string", tokenizer = "string", detokenize = "flag", ["no-bos"] = "flag",
           ["no-special"] = "flag" },
  run = function(o)
    local src = o.tokenizer or o.model
    if not src then die("tokenize: --model DIR or --tokenizer FILE is required") end
    local tok, err = flexllm().load_tokenizer(src)
    if not tok then die(err) end
    local n = 0
    for line in io.stdin:lines() do
      n = n + 1
      if o.detokenize then
        local ids = {}
        for w in line:gmatch("%S+") do
          local id = tonumber(w)
          if not id or id % 1 ~= 0 then die(("stdin line %d: '%s' is not a token id"):format(n, w)) end
          ids[#ids + 1] = id
        end
        io.stdout:write(tok:decode(ids), "\n")
      else
        local opts = { special = not o.no_special }
        if o.no_bos then opts.bos = false end
        local ids, terr = tok:encode(line, opts)
        if not ids then die(("stdin line %d: %s"):format(n, terr)) end
        io.stdout:write(table.concat(ids, " "), "\n")
      end
    end
  end,
}

local init_spec = { seed = "number", dim = "number", hidden = "number", layers = "number",
                    heads = "number", ["kv-heads"] = "number", vocab = "number", ["max-seq"] = "number" }

local function init_opts(o)
  return { seed = o.seed, dim = o.dim, hidden_dim = o.hidden, n_layers = o.layers,
           n_heads = o.heads, n_kv_heads = o.kv_heads, vocab_size = o.vocab,
           max_seq_len = o.max_seq }
end

commands["init-model"] = {
  usage = "init-model DIR [--seed N] [--dim N] [--hidden N] [--layers N] [--heads N] [--kv-heads N]\n"
    .. "         [--vocab N] [--max-seq N]",
  help = "write a seeded random LLaMA with a byte-level tokenizer in the Hugging Face layout",
  spec = init_spec,
  run = function(o, pos)
    local dir = pos[1] or die("init-model: the output DIR is required")
    local ok, err = flexllm().init_model(dir, init_opts(o))
    if not ok then die(err) end
    print(("wrote %s"):format(dir))
  end,
}

-- The embedded default model, written once into the cache.
local function default_model_dir()
  local home = os.getenv("FLEXLLM_HOME")
    or ((os.getenv("XDG_CACHE_HOME") or ((os.getenv("HOME") or "/tmp") .. "/.cache")) .. "/flexllm")
  local dir = home .. "/default-model"
  local f = io.open(dir .. "/model.safetensors", "rb")
  if f then
    f:close()
  else
    os.execute(("mkdir -p '%s'"):format(home))
    local ok, err = flexllm().init_model(dir, {})
    if not ok then die(err) end
  end
  return dir
end

-- OpenMP workers that sleep between parallel regions, unless OMP_WAIT_POLICY says
-- otherwise (libgomp reads it as the engine loads): spinning ones stall every iteration of
-- co-serving, and a server's network handling, as soon as other processes share the cores
-- (on 2 cores under a loopback load: TPOT p90 103 ms spinning, 0.13 ms sleeping).
local function sleeping_omp_workers()
  if os.getenv("OMP_WAIT_POLICY") then return end
  local ffi = require "ffi"
  pcall(ffi.cdef, "int setenv(const char *name, const char *value, int overwrite);")
  ffi.C.setenv("OMP_WAIT_POLICY", "passive", 0)
end

commands.demo = {
  usage = "demo [--quick] [--out DIR] [--requests N] [--rate R] [--steps N] [--model DIR] [--threads N]\n"
    .. "         [--seed S]",
  help = "co-serve a synthetic trace while finetuning a LoRA adapter on a small generated task, then\n"
    .. "      compare the adapter with the base: SLO attainment, latencies, loss, answers, plot, JSON",
  spec = { quick = "flag", out = "string", requests = "number", rate = "number", steps = "number",
           model = "string", threads = "number", seed = "number" },
  run = function(o)
    sleeping_omp_workers()
    flexllm()
    o.model = o.model or default_model_dir()
    require("flexllm.demo").main(o)
  end,
}

commands.bench = {
  usage = "bench (--model DIR [--policy NAME|FILE|none] [--finetune DATA.jsonl] | --url http://HOST:PORT\n"
    .. "         [--api-key K] [--model-name NAME] [--tokenizer FILE|DIR]) [--rate R | --rates R1,R2,...]\n"
    .. "         [--requests N | --duration S] [--arrival poisson|gamma] [--cv X] [--dataset FILE.json]\n"
    .. "         [--prompt-len N] [--output-len N] [--max-prompt-len N] [--max-output-len N]\n"
    .. "         [--ttft-slo S] [--tpot-slo S] [--seed S] [--threads N] [--out FILE.json] [--plot FILE.png]",
  help = "replay a request trace in this process or against a server: TTFT, TPOT, ITL, end-to-end\n"
    .. "      percentiles, SLO attainment, goodput, finetuning tokens/s; JSON and a plot",
  spec = { model = "string", policy = "string", finetune = "string", url = "string", ["api-key"] = "string",
           ["model-name"] = "string", tokenizer = "string", rate = "number", rates = "string",
           requests = "number", duration = "number", arrival = "string", cv = "number", dataset = "string",
           ["prompt-len"] = "number", ["output-len"] = "number", ["max-prompt-len"] = "number",
           ["max-output-len"] = "number", ["ttft-slo"] = "number", ["tpot-slo"] = "number", seed = "number",
           threads = "number", out = "string", plot = "string" },
  run = function(o)
    flexllm()
    if not o.url then o.model = o.model or default_model_dir() end
    require("flexllm.bench").main(o)
  end,
}

local function duration(s)
  if s ~= s or s == math.huge then return "?" end
  s = math.floor(s + 0.5)
  if s >= 3600 then return ("%dh%02dm"):format(math.floor(s / 3600), math.floor(s % 3600 / 60)) end
  if s >= 60 then return ("%dm%02ds"):format(math.floor(s / 60), s % 60) end
  return ("%ds"):format(s)
end

commands.finetune = {
  usage = "finetune --model DIR --data FILE --out DIR [--targets q,v|all] [--rank R] [--alpha A]\n"
    .. "         [--dropout P] [--lr LR] [--epochs N] [--seq-len N] [--chunk N] [--grad-accum N]\n"
    .. "         [--optimizer adamw|sgd] [--schedule constant|cosine] [--warmup N] [--clip C]\n"
    .. "         [--weight-decay W] [--seed S] [--checkpoint-every N] [--max-steps N] [--resume]\n"
    .. "         [--remat q,gate_up] [--threads N]",
  help = "train a LoRA adapter (PEFT format) on text or JSONL, with checkpoints and --resume",
  spec = { model = "string", data = "string", out = "string", targets = "string", rank = "number",
           alpha = "number", dropout = "number", lr = "number", epochs = "number",
           ["seq-len"] = "number", chunk = "number", ["grad-accum"] = "number",
           optimizer = "string", schedule = "string", warmup = "number", clip = "number",
           ["weight-decay"] = "number", seed = "number", ["checkpoint-every"] = "number",
           ["max-steps"] = "number", resume = "flag", remat = "string", threads = "number" },
  run = function(o)
    local fl = flexllm()
    local dir = need(o, "model", "finetune")
    local model = load_model(dir, o.threads)
    local remat = {}
    for w in (o.remat or ""):gmatch("[^,%s]+") do remat[w] = true end
    local ctx = assert(model:context({ max_batch_tokens = math.max(o.chunk or 128, 16) }))
    local job, err = ctx:finetune({
      data = need(o, "data", "finetune"), out = need(o, "out", "finetune"), base_model = dir,
      targets = o.targets, rank = o.rank, alpha = o.alpha, dropout = o.dropout, lr = o.lr,
      epochs = o.epochs, seq_len = o.seq_len, chunk = o.chunk, grad_accum = o.grad_accum,
      optimizer = o.optimizer, schedule = o.schedule, warmup = o.warmup, clip = o.clip,
      weight_decay = o.weight_decay, seed = o.seed, checkpoint_every = o.checkpoint_every,
      max_steps = o.max_steps, resume = o.resume, remat_q = remat.q, remat_gate_up = remat.gate_up })
    if not job then die(err) end
    local tty = os.getenv("TERM") and io.stderr and os.execute("test -t 2") == 0
    local p0 = job:progress()
    local t0, first_loss, last_print = fl.now(), nil, -1
    local function report(p, final)
      local dt = fl.now() - t0
      local tps = (p.tokens - p0.tokens) / math.max(dt, 1e-9)
      local frac = p.total_steps > 0 and p.step / p.total_steps or 1
      local width = 24
      local bar = ("#"):rep(math.floor(frac * width)) .. ("."):rep(width - math.floor(frac * width))
      local eta = (p.step > p0.step) and dt / (p.step - p0.step) * (p.total_steps - p.step) or 0 / 0
      local line = ("step %d/%d [%s] loss %.4f lr %.2e %.0f tok/s ETA %s"):format(p.step,
        p.total_steps, bar, p.loss, p.lr, tps, final and "0s" or duration(eta))
      if tty then io.stderr:write("\r", line, final and "\n" or "") else io.stderr:write(line, "\n") end
      io.stderr:flush()
    end
    while true do
      local running, serr = job:step(o.chunk or 128)
      if running == nil then
        if tty then io.stderr:write("\n") end
        die(serr)
      end
      local p = job:progress()
      if p.step > 0 and not first_loss then first_loss = p.loss end
      local every = tty and 1 or math.max(1, math.floor(p.total_steps / 20))
      if p.step ~= last_print and (p.step % every == 0 or not running) then
        report(p, not running)
        last_print = p.step
      end
      if not running then break end
    end
    local p = job:progress()
    print(("finetuned %d steps (%d samples, %d tokens): loss %.4f -> %.4f; adapter in %s")
      :format(p.step, p.samples, p.tokens, first_loss or p.loss, p.loss, o.out))
  end,
}

local function human(bytes)
  local units, i = { "B", "KiB", "MiB", "GiB", "TiB" }, 1
  while bytes >= 1024 and i < #units do bytes, i = bytes / 1024, i + 1 end
  return ("%.1f %s"):format(bytes, units[i])
end

commands["memory-plan"] = {
  usage = "memory-plan --model DIR|CONFIG.json [--targets q,v|all] [--rank R] [--seq N]\n"
    .. "         [--remat q,gate_up]",
  help = "print the activations LoRA training keeps per token, pruned versus keep-everything",
  spec = { model = "string", targets = "string", rank = "number", seq = "number", remat = "string" },
  run = function(o)
    local path = need(o, "model", "memory-plan")
    if not path:match("%.json$") then path = path .. "/config.json" end
    local remat = {}
    for w in (o.remat or ""):gmatch("[^,%s]+") do
      if w ~= "q" and w ~= "gate_up" then die(("memory-plan: --remat takes q and/or gate_up, got '%s'"):format(w)) end
      remat[w] = true
    end
    local plan, err = flexllm().core.memory_plan(path, { targets = o.targets or "q,v", rank = o.rank,
      seq = o.seq, remat_q = remat.q, remat_gate_up = remat.gate_up })
    if not plan then die(err) end
    local B = 4 -- fp32
    print(("%s: %d layers, targets %s, rank %d, seq %d, remat %s"):format(path, plan.n_layers,
      o.targets or "q,v", o.rank or 8, plan.seq, o.remat or "none"))
    print(("  %-14s %12s   %s"):format("tensor", "bytes/token", "pruned plan"))
    for _, t in ipairs(plan.tensors) do
      if t.produced or t.kept or t.in_pool then
        local where = t.kept and "kept" or t.in_pool and "kept (KV pool)" or "dropped"
        print(("  %-14s %12d   %s"):format(t.name, t.floats * B, where))
      end
    end
    local pruned = (plan.arena_floats + plan.pool_floats) * B
    local keep = plan.keep_all_floats * B
    print(("per token per layer: pruned %s (arena %s + KV %s), keep-everything %s: %.1f%%")
      :format(human(pruned), human(plan.arena_floats * B), human(plan.pool_floats * B), human(keep),
        100 * pruned / keep))
    local L, S = plan.n_layers, plan.seq
    print(("for %d tokens: pruned %s, keep-everything %s; backward workspace (dK/dV accumulators,"
      .. " final-hidden gradient) %s; training arena %s")
      :format(S, human(pruned * L * S), human(keep * L * S), human(plan.workspace_floats * B * S),
        human(plan.arena_bytes)))
  end,
}

commands.serve = {
  usage = "serve [--model DIR] [--port N] [--host H] [--api-key K] [--policy FILE] [--slo FILE]\n"
    .. "         [--adapter NAME=DIR]... [--data-dir D] [--kv-pages N] [--max-batch-tokens N]\n"
    .. "         [--max-seqs N] [--threads N] [--chat-template FILE] [--lifecycle FILE]\n"
    .. "         [--memory-budget BYTES] [--max-prompt-tokens N] [--max-body-bytes N]",
  help = "an OpenAI-compatible server (completions, chat, files, fine-tuning jobs, LoRA adapters,\n"
    .. "      /metrics) on 127.0.0.1:8000 by default; the API key may come from FLEXLLM_API_KEY",
  spec = { model = "string", port = "number", host = "string", ["api-key"] = "string", policy = "string",
           slo = "string", adapter = "list", ["data-dir"] = "string", ["kv-pages"] = "number",
           ["max-batch-tokens"] = "number", ["max-seqs"] = "number", threads = "number",
           ["chat-template"] = "string", lifecycle = "string", ["memory-budget"] = "number",
           ["max-prompt-tokens"] = "number", ["max-body-bytes"] = "number" },
  run = function(o)
    sleeping_omp_workers()
    flexllm()
    o.model = o.model or default_model_dir()
    o.adapters, o.adapter = o.adapter, nil
    o.api_key = o.api_key or os.getenv("FLEXLLM_API_KEY")
    if o.api_key == "" then o.api_key = nil end
    local rc, err = require("flexllm.server").run(o)
    if not rc then die(err) end
  end,
}

local function usage()
  local names = {}
  for k in pairs(commands) do names[#names + 1] = k end
  table.sort(names)
  local out = { "usage: flexllm COMMAND [options]\n" }
  for _, k in ipairs(names) do
    out[#out + 1] = ("  %s\n      %s\n"):format(commands[k].usage, commands[k].help)
  end
  return table.concat(out)
end

function M.main(args)
  local name = args[1]
  if name == nil or name == "help" or name == "--help" or name == "-h" then
    io.stdout:write(usage())
    return 0
  end
  if name == "version" or name == "--version" then
    print("flexllm " .. flexllm().version)
    return 0
  end
  local cmd = commands[name]
  if not cmd then
    io.stderr:write(("flexllm: unknown command '%s'\n"):format(name), usage())
    return 1
  end
  local rest = {}
  for i = 2, #args do rest[#rest + 1] = args[i] end
  local opts, pos = parse(rest, cmd.spec, name)
  local ok, err = pcall(cmd.run, opts, pos)
  if not ok then
    io.stderr:write(("flexllm %s: %s\n"):format(name, tostring(err)))
    return 1
  end
  return 0
end

-- Run as a script by bin/flexllm (required as a module, `...` is its name).
if ... ~= "flexllm.cli" then os.exit(M.main(arg)) end

return M
