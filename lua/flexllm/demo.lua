-- flexllm demo: co-serves a synthetic inference trace while finetuning a LoRA adapter on
-- a small task the demo generates (the colors of things, as "Q: What color is the sky?
-- A:" -> " blue"), then compares the adapter with the base model: SLO attainment,
-- latencies, finetuning throughput, held-out loss, answers, a plot and a JSON summary.
local fl = require "flexllm"
local bench = require "flexllm.bench"
local trace = require "flexllm.trace"
local plot = require "flexllm.plot"
local cjson = require "cjson"

local M = {}

local max = math.max

-- -------------------------------------------------------------------- the task

-- Eight colors, six things each. The base model has random weights: a rank-16 adapter
-- on every linear layer learns the table in about a thousand steps.
M.COLORS = {
  { "red", "apple", "cherry", "tomato", "strawberry", "fire truck", "ruby" },
  { "yellow", "banana", "lemon", "sun", "corn", "canary", "butter" },
  { "green", "grass", "leaf", "frog", "lime", "cucumber", "emerald" },
  { "blue", "sky", "ocean", "sapphire", "blueberry", "jeans", "whale" },
  { "white", "snow", "milk", "cloud", "salt", "swan", "chalk" },
  { "black", "coal", "night", "crow", "ink", "tar", "panther" },
  { "orange", "carrot", "pumpkin", "orange", "tangerine", "apricot", "goldfish" },
  { "brown", "chocolate", "coffee", "bear", "wood", "soil", "acorn" },
}

local function task_prompt(thing) return ("Q: What color is the %s? A:"):format(thing) end

local function write_jsonl(path, items)
  local f = assert(io.open(path, "wb"))
  for _, it in ipairs(items) do f:write(cjson.encode({ prompt = it.prompt, completion = it.completion }), "\n") end
  f:close()
end

-- Writes the task as prompt/completion JSONL: dir/train.jsonl and dir/heldout.jsonl (one
-- thing per color, chosen by the seed, kept out of training). Returns both lists of
-- { prompt, completion } and the two paths.
function M.task_data(dir, seed)
  local rng = trace.rng(seed or 1)
  local train, held = {}, {}
  for _, row in ipairs(M.COLORS) do
    local out = rng:int(2, #row)
    for k = 2, #row do
      local item = { prompt = task_prompt(row[k]), completion = " " .. row[1] }
      if k == out then held[#held + 1] = item else train[#train + 1] = item end
    end
  end
  local tp, hp = dir .. "/train.jsonl", dir .. "/heldout.jsonl"
  write_jsonl(tp, train)
  write_jsonl(hp, held)
  return train, held, tp, hp
end

-- ---------------------------------------------------------------- evaluation

local function write_file(path, text)
  local f = assert(io.open(path, "wb"))
  f:write(text)
  f:close()
end

local function shell_quote(s) return "'" .. s:gsub("'", "'\\''") .. "'" end

-- The mean loss per label token of a prompt/completion JSONL file, on the base model or
-- with o.adapter (a loaded adapter); the engine's fl_evaluate, which trains nothing.
function M.evaluate(ctx, data, o)
  local loss, err = ctx:evaluate(data, { adapter = o and o.adapter, seq_len = o and o.seq_len })
  if not loss then error("evaluation: " .. err, 0) end
  return loss
end

-- Greedy answers to prompts (text up to EOS, at most max_tokens), with an adapter or none.
function M.answers(model, ctx, prompts, adapter, max_tokens)
  local gen = assert(ctx:generator())
  local index, out = {}, {}
  for i, p in ipairs(prompts) do
    local id = assert(gen:add(model:encode(p), { max_tokens = max_tokens or 8, temperature = 0, adapter = adapter }))
    index[id], out[i] = i, {}
  end
  while gen:active() > 0 do
    for _, ev in ipairs(assert(gen:step())) do
      if not ev.eos then table.insert(out[index[ev.request]], ev.text) end
    end
  end
  for i = 1, #out do out[i] = table.concat(out[i]) end
  return out
end

-- ------------------------------------------------------------------- the trace

local GENERAL = { "Once upon a time", "The little dog", "In a small town", "She looked at the",
                  "Tom and Lily", "One day, a bird", "The sun was", "A big red ball" }

-- The requests: Poisson arrivals; a third ask the task with the adapter being trained,
-- a third ask it of the base model, the rest continue general prompts.
local function demo_requests(model, o, adapter, train)
  local times = assert(trace.arrivals({ rate = o.rate, n = o.requests, seed = o.seed }))
  local rng = trace.rng(o.seed + 101)
  local reqs = {}
  for i, t in ipairs(times) do
    local kind = ({ "live", "base", "general" })[(i - 1) % 3 + 1]
    local r = { arrival = t, kind = kind }
    if kind == "general" then
      r.prompt = GENERAL[rng:int(1, #GENERAL)]
      r.output_len = rng:int(16, 32)
    else
      local item = train[rng:int(1, #train)]
      r.prompt, r.expect = item.prompt, item.completion
      -- A task answer ends at EOS; the base model rarely emits it and runs to the cap.
      r.output_len, r.options = 16, { ignore_eos = false }
      if kind == "live" then r.adapter = adapter end
    end
    r.ids = model:encode(r.prompt)
    reqs[i] = r
  end
  return reqs
end

-- ------------------------------------------------------------------- the output

-- Text for a terminal, quoted, control bytes as \xNN.
local function show(s)
  return '"' .. s:gsub("[%c\127]", function(c) return ("\\x%02x"):format(c:byte()) end) .. '"'
end

-- A summary figure in milliseconds ("-" for JSON null: nothing to measure).
local function ms(x) return x ~= cjson.null and ("%.1f ms"):format(x * 1000) or "-" end

local function is_tty() return os.execute("test -t 2") == 0 end

-- ------------------------------------------------------------------------ main

-- o: quick, out, requests, rate, steps, model, threads, seed (as the CLI parsed them).
function M.main(o)
  local t_start = fl.now()
  local quick = o.quick
  o.seed = o.seed or 1
  o.requests = o.requests or (quick and 24 or 180)
  o.rate = o.rate or (quick and 8 or 6)
  o.steps = o.steps or (quick and 150 or 1500)
  local out = o.out or ((os.getenv("TMPDIR") or "/tmp") .. "/flexllm-demo")
  for _, k in ipairs({ "requests", "steps" }) do
    if o[k] < 1 or o[k] % 1 ~= 0 then error(("--%s must be a positive integer, got %s"):format(k, o[k]), 0) end
  end
  if not (o.rate > 0) then error(("--rate must be positive, got %s"):format(o.rate), 0) end
  os.execute("mkdir -p " .. shell_quote(out))
  local rank, alpha, lr, targets = 16, 32, 5e-4, "all"
  local ttft_slo, tpot_slo = 0.5, 0.05
  local slo = { ttft = ttft_slo, tpot = tpot_slo }
  -- Without the policy files (an install that lacks them) the runtime's built-in plan runs.
  local policy, policy_missing = bench.find_policy("hybrid")

  local model, err = fl.load(o.model, { threads = o.threads })
  if not model then error(err, 0) end
  local cfg = model:config()
  print(("flexllm demo: co-serving on %s (%s, dim %d, %d layers, %.1fM parameters)"):format(o.model, cfg.arch,
    cfg.dim, cfg.n_layers, model.handle:n_params() / 1e6))
  local train, held, train_path, held_path = M.task_data(out, o.seed)
  print(("task: the colors of things, %d training pairs (%s), %d held out (%s)"):format(#train, train_path,
    #held, held_path))
  print(("finetuning: LoRA rank %d on all linear layers, lr %g, %d steps; inference: %d requests, Poisson at %g req/s,"
    .. " SLO TTFT <= %g s, TPOT <= %g ms; policy %s"):format(rank, lr, o.steps, o.requests, o.rate, ttft_slo,
    tpot_slo * 1000, policy or "none (the built-in plan)"))
  if policy_missing then print("  " .. policy_missing) end
  io.stdout:flush() -- before the progress lines on stderr

  local ctx = assert(model:context())
  local loss_before = M.evaluate(ctx, held_path)

  local rt = assert(ctx:runtime({ policy = policy, ttft_slo = ttft_slo, tpot_slo = tpot_slo }))
  local adapter_dir = out .. "/adapter"
  os.execute("rm -rf " .. shell_quote(adapter_dir))
  local job
  job, err = ctx:finetune({ data = train_path, out = adapter_dir, base_model = o.model, targets = targets,
                            rank = rank, alpha = alpha, lr = lr, epochs = 100000, max_steps = o.steps,
                            seed = o.seed })
  if not job then error(err, 0) end
  local job_id = assert(rt:add_job(job))
  local reqs = demo_requests(model, o, job:adapter(), train)

  -- The timelines for the plot and the progress line.
  local losses, mix, last_step = {}, {}, 0
  local prev = { t = 0, fwd = 0, bwd = 0, infer = 0 }
  local infer_tokens, last_print = 0, -1
  local tty = is_tty()
  local every = tty and 0.25 or (quick and 2 or 10)
  local function progress(t, records, final)
    local done, met = 0, 0
    for _, r in pairs(records) do
      if r.done then
        bench.finish_record(r, slo)
        done = done + 1
        if r.slo_met then met = met + 1 end
      end
    end
    local p = job:progress()
    local line = ("%5.1fs  requests %d/%d  SLO %s  ft step %d/%d loss %.3f  infer %.0f tok/s  ft %.0f tok/s")
      :format(t, done, o.requests, done > 0 and ("%.1f%%"):format(100 * met / done) or "-", p.step, o.steps,
        p.loss, infer_tokens / max(t, 1e-9), p.tokens / max(t, 1e-9))
    if tty then io.stderr:write("\r", line, final and "\n" or "") else io.stderr:write(line, "\n") end
    io.stderr:flush()
  end
  local function on_step(t, records, events, st)
    local p = job:progress()
    if p.step > last_step then
      losses[#losses + 1] = { t, p.step, p.loss }
      last_step = p.step
    end
    for _, ev in ipairs(events) do
      if not ev.eos then infer_tokens = infer_tokens + 1 end
    end
    if t - prev.t >= 0.5 then -- tokens per second over half-second windows
      local dt = t - prev.t
      mix[#mix + 1] = { t, (infer_tokens - prev.infer) / dt, (st.ft_forward_tokens - prev.fwd) / dt,
                        (st.ft_backward_tokens - prev.bwd) / dt }
      prev = { t = t, fwd = st.ft_forward_tokens, bwd = st.ft_backward_tokens, infer = infer_tokens }
    end
    if t - last_print >= every then
      last_print = t
      progress(t, records)
    end
  end
  local records, elapsed = bench.drive(rt, reqs, { job = job, job_id = job_id, wait_job = true, on_step = on_step })
  progress(elapsed, records, true)
  local st = rt:stats()
  for i, r in ipairs(records) do
    bench.finish_record(r, slo)
    r.kind = reqs[i].kind
  end
  local m = bench.metrics(records, slo, elapsed)
  local p = job:progress()
  local ft_tps = st.ft_forward_tokens / max(elapsed, 1e-9)

  -- The adapter against the base: held-out loss, and answers to the trained prompts.
  local saved = assert(model:load_adapter(adapter_dir))
  local loss_after = M.evaluate(ctx, held_path, { adapter = saved })
  local prompts = {}
  for i, it in ipairs(train) do prompts[i] = it.prompt end
  local base_ans = M.answers(model, ctx, prompts, nil)
  local ad_ans = M.answers(model, ctx, prompts, saved)
  local base_ok, ad_ok = 0, 0
  for i, it in ipairs(train) do
    if base_ans[i] == it.completion then base_ok = base_ok + 1 end
    if ad_ans[i] == it.completion then ad_ok = ad_ok + 1 end
  end
  local held_ans = M.answers(model, ctx, { held[1].prompt }, saved)[1]
  -- The task requests served with the adapter while it trained: right answers in the first
  -- and the last third of the trace.
  local live = {}
  for _, r in ipairs(records) do
    if r.kind == "live" then live[#live + 1] = { t = r.arrival, ok = r.text == reqs[r.index].expect } end
  end
  local third = reqs[#reqs].arrival / 3
  local live_early, live_late = { ok = 0, n = 0 }, { ok = 0, n = 0 }
  for _, l in ipairs(live) do
    local bucket = l.t < third and live_early or l.t >= 2 * third and live_late or nil
    if bucket then bucket.n, bucket.ok = bucket.n + 1, bucket.ok + (l.ok and 1 or 0) end
  end

  -- The plot: loss, token mix and latencies over time.
  local lat = {}
  for _, r in ipairs(records) do lat[#lat + 1] = { r.arrival, r.ttft * 1000, r.tpot * 1000 } end
  table.sort(lat, function(a, b) return a[1] < b[1] end)
  local smooth = {}
  for i = 1, #losses do
    local s, k = 0, 0
    for j = max(1, i - 24), i do s, k = s + losses[j][3], k + 1 end
    smooth[i] = { losses[i][1], s / k }
  end
  local span = { 0, ("%.1f"):format(elapsed) }
  local pl = plot.render({ png = out .. "/demo.png",
    title = ("flexllm demo: %d requests at %g req/s while finetuning a rank-%d LoRA"):format(o.requests, o.rate, rank),
    series = {
      { name = "loss", columns = { "t", "step", "loss" }, rows = losses },
      { name = "loss_smooth", columns = { "t", "loss_mean25" }, rows = smooth },
      { name = "mix", columns = { "t", "inference_tok_s", "ft_forward_tok_s", "ft_backward_tok_s" }, rows = mix },
      { name = "latency", columns = { "arrival", "ttft_ms", "tpot_ms" }, rows = lat },
    },
    panels = {
      { title = "finetuning loss (per step, and the mean of the last 25)", xlabel = "seconds", ylabel = "loss",
        xrange = span,
        lines = { { series = "loss", x = 1, y = 3, title = "step loss", style = "points pt 7 ps 0.2" },
                  { series = "loss_smooth", x = 1, y = 2, title = "mean of 25", style = "lines lw 2" } } },
      { title = "token mix", xlabel = "seconds", ylabel = "tokens/s", xrange = span,
        lines = { { series = "mix", x = 1, y = 2, title = "inference (generated)", style = "lines" },
                  { series = "mix", x = 1, y = 3, title = "finetuning forward", style = "lines" },
                  { series = "mix", x = 1, y = 4, title = "finetuning backward", style = "lines dt 2" } } },
      { title = ("request latency (SLO: TTFT %g ms, TPOT %g ms)"):format(ttft_slo * 1000, tpot_slo * 1000),
        xlabel = "arrival (s)", ylabel = "ms", logy = true, xrange = span,
        lines = { { series = "latency", x = 1, y = 2, title = "TTFT", style = "points pt 7 ps 0.5" },
                  { series = "latency", x = 1, y = 3, title = "TPOT", style = "points pt 7 ps 0.5" } } },
    } })

  local example = { prompt = train[1].prompt, expected = train[1].completion, base = base_ans[1], adapter = ad_ans[1] }
  local summary = {
    model = o.model, policy = policy or cjson.null, out = out, quick = quick and true or false, seed = o.seed,
    wall_s = fl.now() - t_start, coserve_s = elapsed,
    inference = m,
    finetune = { rank = rank, alpha = alpha, lr = lr, targets = targets, steps = p.step, samples = p.samples,
                 forward_tokens = st.ft_forward_tokens, backward_tokens = st.ft_backward_tokens,
                 tokens_per_s = ft_tps, final_step_loss = p.loss, adapter = adapter_dir },
    heldout_loss = { base = loss_before, adapter = loss_after, samples = #held },
    trained_prompts_exact = { base = base_ok, adapter = ad_ok, total = #train },
    example = example,
    heldout_example = { prompt = held[1].prompt, expected = held[1].completion, adapter = held_ans },
    live_adapter_right = { first_third = live_early, last_third = live_late },
    policy_stats = { iterations = st.iterations, policy_failures = st.policy_failures,
                     fallback_iterations = st.fallback_iterations, last_error = st.policy_error },
    plot = pl.png or cjson.null, plot_data = pl.data,
  }
  local json_path = out .. "/summary.json"
  write_file(json_path, cjson.encode(summary) .. "\n")

  print()
  print(("co-served for %.1f s in %d iterations"):format(elapsed, st.iterations))
  if st.policy_failures > 0 then -- such an iteration ran the built-in plan instead
    print(("  %d policy failures, the last: %s"):format(st.policy_failures, st.policy_error:match("^[^\n]*")))
  end
  print(("inference: %d/%d requests done; SLO attainment %.1f%% (TTFT <= %g s and TPOT <= %g ms), goodput %.2f req/s")
    :format(m.completed, m.requests, 100 * (m.slo_attainment ~= cjson.null and m.slo_attainment or 0), ttft_slo,
      tpot_slo * 1000, m.goodput_rps))
  print(("  TTFT p50 %s, p99 %s; TPOT p50 %s, p99 %s"):format(ms(m.ttft_s.p50), ms(m.ttft_s.p99),
    ms(m.tpot_s.p50), ms(m.tpot_s.p99)))
  print(("finetuning: %d steps, %d forward + %d backward tokens, %.0f tokens/s (forward) alongside inference")
    :format(p.step, st.ft_forward_tokens, st.ft_backward_tokens, ft_tps))
  print(("held-out loss (%d unseen things): base %.3f -> adapter %.3f"):format(#held, loss_before, loss_after))
  print(("trained prompts answered exactly: base %d/%d, adapter %d/%d"):format(base_ok, #train, ad_ok, #train))
  print(("  %s  (expected %s)"):format(example.prompt, show(example.expected)))
  print(("    base:    %s"):format(show(example.base)))
  print(("    adapter: %s"):format(show(example.adapter)))
  print(("the live adapter, while it trained, answered task requests right: %d/%d in the first third of the"
    .. " trace, %d/%d in the last"):format(live_early.ok, live_early.n, live_late.ok, live_late.n))
  print(pl.png and ("plot: %s"):format(pl.png) or ("plot: none (%s)"):format(pl.note))
  print(("summary: %s"):format(json_path))
  print(("demo took %.1f s"):format(fl.now() - t_start))
  return summary
end

return M
