-- The benchmark's pieces: percentiles against a sort-based reference, arrival processes
-- against their mean rate and CV, the random generator's distributions, prompt sets,
-- the request builder, SSE splitting, and the figures of a run.
local trace = require "flexllm.trace"
local bench = require "flexllm.bench"
local scratch = require "scratch"

local tmp = scratch.dir("bench_spec")
local write = scratch.write

-- numpy's linear percentile, straight from a sorted copy.
local function reference_percentile(values, p)
  local a = {}
  for i, v in ipairs(values) do a[i] = v end
  table.sort(a)
  local h = (#a - 1) * p / 100
  local lo = math.floor(h)
  local hi = math.min(lo + 1, #a - 1)
  return a[lo + 1] + (h - lo) * (a[hi + 1] - a[lo + 1])
end

local function mean_cv(xs)
  local m, v = 0, 0
  for _, x in ipairs(xs) do m = m + x end
  m = m / #xs
  for _, x in ipairs(xs) do v = v + (x - m) ^ 2 end
  return m, math.sqrt(v / (#xs - 1)) / m
end

local function gaps(times)
  local g = {}
  for i = 2, #times do g[#g + 1] = times[i] - times[i - 1] end
  return g
end

describe("trace.percentile", function()
  it("equals the sort-based reference on random lists of every size, ties included", function()
    local rng = trace.rng(11)
    for n = 1, 60 do
      for _ = 1, 5 do
        local xs = {}
        local ties = rng:uniform() < 0.3
        for i = 1, n do xs[i] = ties and rng:int(1, 5) or (rng:uniform() - 0.5) * 1000 end
        local before = table.concat(xs, ",")
        for _, p in ipairs({ 0, 1, 10, 25, 50, 75, 90, 99, 99.9, 100, rng:uniform() * 100 }) do
          local got, want = trace.percentile(xs, p), reference_percentile(xs, p)
          assert(math.abs(got - want) <= 1e-9 * math.max(1, math.abs(want)),
            ("n=%d p=%g: got %.17g, want %.17g"):format(n, p, got, want))
        end
        assert.are.equal(before, table.concat(xs, ","), "the list must stay as it was")
      end
    end
  end)

  it("is nil for an empty list and refuses bad input", function()
    assert.is_nil(trace.percentile({}, 50))
    assert.has_error(function() trace.percentile({ 1, 2 }, 101) end, "percentile: p must be in [0, 100], got 101")
    assert.has_error(function() trace.percentile({ 1, 0 / 0 }, 50) end, "percentile: item 2 is nan, not a number")
  end)

  it("summarises a list with n, mean, max and the usual percentiles", function()
    local s = trace.summary({ 4, 1, 3, 2 })
    assert.are.same({ n = 4, mean = 2.5, max = 4, p50 = 2.5, p90 = reference_percentile({ 1, 2, 3, 4 }, 90),
                      p99 = reference_percentile({ 1, 2, 3, 4 }, 99) }, s)
    assert.are.same({ n = 0 }, trace.summary({}))
  end)
end)

describe("trace.rng", function()
  it("repeats with its seed and differs between seeds", function()
    local a, b, c = trace.rng(5), trace.rng(5), trace.rng(6)
    local same, differ = true, false
    for _ = 1, 100 do
      local x, y, z = a:next32(), b:next32(), c:next32()
      same = same and x == y
      differ = differ or x ~= z
      assert(x >= 0 and x < 2 ^ 32 and x % 1 == 0)
    end
    assert.is_true(same)
    assert.is_true(differ)
  end)

  it("draws uniforms with mean 1/2 and variance 1/12, and integers over their whole range", function()
    local rng, xs, seen = trace.rng(3), {}, {}
    for i = 1, 100000 do xs[i] = rng:uniform() end
    local m, cv = mean_cv(xs)
    assert.is_true(math.abs(m - 0.5) < 0.005)
    assert.is_true(math.abs((cv * m) ^ 2 - 1 / 12) < 0.002)
    for _ = 1, 1000 do
      local k = rng:int(3, 9)
      assert(k >= 3 and k <= 9 and k % 1 == 0)
      seen[k] = true
    end
    for k = 3, 9 do assert.is_true(seen[k]) end
  end)

  it("draws gammas with mean shape*scale and CV 1/sqrt(shape), below and above shape 1", function()
    for _, shape in ipairs({ 0.25, 0.7, 1, 3.5 }) do
      local rng, xs = trace.rng(17), {}
      for i = 1, 50000 do xs[i] = rng:gamma(shape, 2) end
      local m, cv = mean_cv(xs)
      local sd_mean = 2 * math.sqrt(shape) / math.sqrt(#xs) -- standard error of the mean
      assert(math.abs(m - 2 * shape) < 5 * sd_mean, ("shape %g: mean %g, want %g"):format(shape, m, 2 * shape))
      assert(math.abs(cv - 1 / math.sqrt(shape)) < 0.05 / math.sqrt(shape),
        ("shape %g: CV %g, want %g"):format(shape, cv, 1 / math.sqrt(shape)))
    end
  end)
end)

describe("trace.arrivals", function()
  it("gives Poisson arrivals at the rate, with exponential gaps (CV 1), from 0", function()
    local t = assert(trace.arrivals({ rate = 4, n = 20000, seed = 3 }))
    assert.are.equal(20000, #t)
    assert.are.equal(0, t[1])
    for i = 2, #t do assert(t[i] >= t[i - 1]) end
    local m, cv = mean_cv(gaps(t))
    assert.is_true(math.abs(1 / m - 4) < 4 * 0.03, "rate " .. 1 / m)
    assert.is_true(math.abs(cv - 1) < 0.04, "CV " .. cv)
  end)

  it("gives gamma arrivals at the rate with the asked CV", function()
    for _, cv_want in ipairs({ 0.5, 1, 2, 3 }) do
      local t = assert(trace.arrivals({ rate = 10, n = 40000, kind = "gamma", cv = cv_want, seed = 8 }))
      local m, cv = mean_cv(gaps(t))
      assert(math.abs(1 / m - 10) < 10 * 0.05, ("cv %g: rate %g"):format(cv_want, 1 / m))
      assert(math.abs(cv - cv_want) < 0.06 * cv_want, ("cv %g: got %g"):format(cv_want, cv))
    end
  end)

  it("repeats with its seed, and a duration gives every arrival before it", function()
    local a = assert(trace.arrivals({ rate = 2, n = 50, seed = 9 }))
    local b = assert(trace.arrivals({ rate = 2, n = 50, seed = 9 }))
    local c = assert(trace.arrivals({ rate = 2, n = 50, seed = 10 }))
    assert.are.same(a, b)
    assert.are_not.same(a, c)
    local d = assert(trace.arrivals({ rate = 50, duration = 100, seed = 2 }))
    for _, x in ipairs(d) do assert(x < 100) end
    assert.is_true(math.abs(#d - 5000) < 5 * math.sqrt(5000))
    local more = assert(trace.arrivals({ rate = 50, n = #d + 1, seed = 2 }))
    assert.is_true(more[#more] >= 100, "the next arrival falls after the duration")
  end)

  it("refuses bad processes, rates and sizes with the reason", function()
    local cases = {
      { { rate = 0, n = 3 }, "the arrival rate must be a positive number of requests per second, got 0" },
      { { rate = 1, n = 3, kind = "uniform" }, "the arrival process must be poisson or gamma, got 'uniform'" },
      { { rate = 1, n = 3, kind = "gamma", cv = -1 }, "the gamma arrivals' CV must be a positive number, got -1" },
      { { rate = 1 }, "give the number of requests or a duration, one of them" },
      { { rate = 1, n = 2.5 }, "the number of requests must be a positive integer, got 2.5" },
    }
    for _, c in ipairs(cases) do
      local t, err = trace.arrivals(c[1])
      assert.is_nil(t)
      assert.are.equal(c[2], err)
    end
  end)
end)

describe("trace.load_prompts", function()
  it("reads ShareGPT conversations and prompt/response pairs", function()
    write(tmp .. "/conv.json", [=[[
      {"id": "a", "conversations": [{"from": "human", "value": "hello there"}, {"from": "gpt", "value": "hi"}]},
      {"id": "b", "conversations": [{"from": "system", "value": "be kind"}, {"from": "human", "value": "why?"}]}
    ]]=])
    assert.are.same({ { prompt = "hello there", response = "hi" }, { prompt = "why?" } },
      assert(trace.load_prompts(tmp .. "/conv.json")))
    write(tmp .. "/pairs.json", [=[[{"prompt": "p1", "response": "r1", "prompt_tokens": 3, "response_tokens": 7}]]=])
    assert.are.same({ { prompt = "p1", response = "r1", output_tokens = 7 } },
      assert(trace.load_prompts(tmp .. "/pairs.json")))
  end)

  it("names the file and the item that is wrong", function()
    write(tmp .. "/bad1.json", [[{"prompt": "x"}]])
    write(tmp .. "/bad2.json", [=[[{"prompt": "x"}, {"text": "y"}]]=])
    write(tmp .. "/bad3.json", [=[[{"conversations": [{"from": "gpt", "value": "y"}]}]]=])
    write(tmp .. "/bad4.json", "[1,")
    local function err(name) return select(2, trace.load_prompts(tmp .. "/" .. name)) end
    assert.are.equal(tmp .. "/bad1.json: expected a JSON array of prompts", err("bad1.json"))
    assert.are.equal(tmp .. "/bad2.json: item 2: expected 'prompt' or 'conversations'", err("bad2.json"))
    assert.are.equal(tmp .. "/bad3.json: item 1: no human turn in 'conversations'", err("bad3.json"))
    assert.matches("^" .. tmp .. "/bad4.json: not valid JSON", err("bad4.json"))
  end)

  it("reads the shared ShareGPT sets when they are there", function()
    local shared = os.getenv("FLEXLLM_SHARED") or "../shared"
    local f = io.open(shared .. "/data/sharegpt_prompts_500.json", "rb")
    if not f then
      pending("the shared data set is absent (" .. shared .. "/data); set FLEXLLM_SHARED")
      return
    end
    f:close()
    assert.are.equal(500, #assert(trace.load_prompts(shared .. "/data/sharegpt_prompts_500.json")))
    local pairs50 = assert(trace.load_prompts(shared .. "/data/sharegpt_pairs_50.json"))
    assert.are.equal(50, #pairs50)
    for _, p in ipairs(pairs50) do assert.is_true(p.output_tokens > 0) end
  end)
end)

describe("bench.build_requests", function()
  -- A stand-in tokenizer: one token per byte.
  local tok = {
    encode = function(_, s) local t = {} for i = 1, #s do t[i] = s:byte(i) end return t end,
    decode = function(_, ids) return string.char(unpack(ids)) end,
  }

  it("makes synthetic prompts of exactly prompt_len tokens on the trace's arrivals", function()
    local reqs = assert(bench.build_requests({ rate = 3, requests = 20, seed = 4, prompt_len = 40, output_len = 5 }, tok))
    local times = trace.arrivals({ rate = 3, n = 20, seed = 4 })
    for i, r in ipairs(reqs) do
      assert.are.equal(times[i], r.arrival)
      assert.are.equal(40, #r.ids)
      assert.are.equal(5, r.output_len)
    end
  end)

  it("makes synthetic prompts of 64 tokens without prompt_len, and of 64 words without a tokenizer", function()
    for _, r in ipairs(assert(bench.build_requests({ rate = 3, requests = 5, seed = 4, output_len = 5 }, tok))) do
      assert.are.equal(64, #r.ids)
    end
    for _, r in ipairs(assert(bench.build_requests({ rate = 3, requests = 5, seed = 4, output_len = 5 }))) do
      assert.is_nil(r.ids)
      assert.are.equal(64, select(2, r.prompt:gsub("%S+", "")))
    end
  end)

  it("takes output lengths from the data set, capped, and cuts prompts to fit the context", function()
    local data = { { prompt = ("x"):rep(300), output_tokens = 90 }, { prompt = "short", response = "abcdef" } }
    local reqs = assert(bench.build_requests({ rate = 1, requests = 40, seed = 1, dataset = data,
                                               max_output_len = 50, max_seq = 128 }, tok))
    local seen = {}
    for _, r in ipairs(reqs) do
      if r.prompt:sub(1, 1) == "x" then
        assert.are.equal(50, r.output_len)
        assert.are.equal(128 - 50, #r.ids)
        assert.are.equal(78, #r.prompt)
      else
        assert.are.equal(6, r.output_len) -- the response's tokens
        assert.are.equal("short", r.prompt)
      end
      seen[r.prompt:sub(1, 1)] = true
    end
    assert.is_true(seen.x and seen.s)
  end)
end)

describe("bench.sse_split", function()
  it("gives the same payloads however the stream is cut", function()
    local stream = 'data: {"a":1}\n\ndata: {"b":2}\r\n\r\n: comment\n\ndata: [DONE]\n\n'
    local want = { '{"a":1}', '{"b":2}', "[DONE]" }
    for cut = 1, #stream - 1 do
      local p1, rest = bench.sse_split(stream:sub(1, cut))
      local p2, tail = bench.sse_split(rest .. stream:sub(cut + 1))
      local all = {}
      for _, p in ipairs(p1) do all[#all + 1] = p end
      for _, p in ipairs(p2) do all[#all + 1] = p end
      assert.are.same(want, all, "cut at " .. cut)
      assert.are.equal("", tail)
    end
  end)
end)

describe("bench.metrics", function()
  it("counts, measures and judges requests against the SLO", function()
    local slo = { ttft = 0.5, tpot = 0.1 }
    local recs = {
      { arrival = 0, first = 0.2, last = 0.6, done = 0.6, tokens = 5, gaps = { 0.1, 0.1, 0.1, 0.1 } },
      { arrival = 1, first = 1.9, last = 2.0, done = 2.0, tokens = 2, gaps = { 0.1 } },       -- late first token
      { arrival = 2, first = 2.1, last = 2.9, done = 2.9, tokens = 3, gaps = { 0.4, 0.4 } },  -- slow decoding
      { arrival = 3, error = "HTTP 400: too long", tokens = 0, gaps = {} },
    }
    for _, r in ipairs(recs) do bench.finish_record(r, slo) end
    assert.is_true(recs[1].slo_met)
    assert.is_false(recs[2].slo_met)
    assert.is_false(recs[3].slo_met)
    local m = bench.metrics(recs, slo, 4)
    assert.are.equal(4, m.requests)
    assert.are.equal(3, m.completed)
    assert.are.equal(1, m.errors)
    assert.are.equal("HTTP 400: too long", m.first_error)
    assert.are.equal(1, m.slo_met)
    assert.are.equal(0.25, m.slo_attainment)
    assert.are.equal(0.25, m.goodput_rps)
    assert.are.equal(3, m.ttft_s.n)
    assert.is_true(math.abs(m.ttft_s.p50 - 0.2) < 1e-12)
    assert.is_true(math.abs(m.tpot_s.p50 - 0.1) < 1e-12)
    assert.are.equal(7, m.itl_s.n)
    assert.is_true(math.abs(m.e2e_s.max - 1.0) < 1e-12)
    assert.are.equal(10 / 4, m.throughput.output_tokens_per_s)
  end)
end)

describe("bench.find_policy", function()
  it("finds the built-in policies of a checkout and says where it looked otherwise", function()
    assert.are.equal("policies/hybrid.lua", (assert(bench.find_policy("hybrid")):gsub("^.*/policies/", "policies/")))
    local p, err = bench.find_policy("no_such_policy")
    assert.is_nil(p)
    assert.matches("no policy 'no_such_policy' in ", err, 1, true)
    assert.is_nil((bench.find_policy(tmp .. "/missing.lua")))
  end)
end)

describe("the demo's task and evaluation", function()
  local fl = require "flexllm"
  local demo = require "flexllm.demo"
  assert(fl.init_model(tmp .. "/model", { dim = 64, hidden_dim = 160, n_layers = 2, n_heads = 4,
                                          n_kv_heads = 2, seed = 5 }))
  local model = assert(fl.load(tmp .. "/model"))
  local ctx = assert(model:context({ max_batch_tokens = 64 }))
  local train, held, train_path, held_path = demo.task_data(tmp, 3)

  -- The loss of the base model on prompt/completion samples from ctx:logits: the mean
  -- cross-entropy over every completion token and EOS of all samples.
  local function reference_loss(items)
    local tok, eos, total, count = model.tok, model.tok:info().eos, 0, 0
    for _, it in ipairs(items) do
      local ids = tok:encode(it.prompt, { special = false })
      local n_prompt = #ids
      for _, t in ipairs(tok:encode(it.completion, { bos = false, special = false })) do ids[#ids + 1] = t end
      ids[#ids + 1] = eos
      local logits = assert(ctx:logits(ids))
      local sum, n = 0, 0
      for pos = n_prompt, #ids - 1 do
        local row, m = logits[pos], -math.huge
        for _, v in ipairs(row) do if v > m then m = v end end
        local z = 0
        for _, v in ipairs(row) do z = z + math.exp(v - m) end
        sum, n = sum + (m + math.log(z) - row[ids[pos + 1] + 1]), n + 1
      end
      total, count = total + sum, count + n
    end
    return total / count
  end

  it("holds one thing per color out of training", function()
    assert.are.equal(#demo.COLORS, #held)
    assert.are.equal(#demo.COLORS * (#demo.COLORS[1] - 1) - #held, #train)
    local seen = {}
    for _, it in ipairs(train) do seen[it.prompt] = true end
    for _, it in ipairs(held) do assert.is_nil(seen[it.prompt]) end
  end)

  it("measures the base model's held-out loss as its logits give it", function()
    local got = demo.evaluate(ctx, held_path)
    local want = reference_loss(held)
    assert(math.abs(got - want) < 1e-3 * want, ("got %.6f, want %.6f"):format(got, want))
  end)

  it("measures a trained adapter lower on its data, leaving the adapter as it was", function()
    local job = assert(ctx:finetune({ data = train_path, out = tmp .. "/adapter", targets = "all", rank = 4,
                                      lr = 3e-3, max_steps = 60, epochs = 100, seed = 1 }))
    repeat
      local running, err = job:step(64)
      assert(running ~= nil, err)
    until not running
    local before = io.open(tmp .. "/adapter/adapter_model.safetensors", "rb"):read("*a")
    local base = demo.evaluate(ctx, train_path)
    local o = { adapter = assert(model.handle:load_adapter(tmp .. "/adapter")) }
    local a1, a2 = demo.evaluate(ctx, train_path, o), demo.evaluate(ctx, train_path, o)
    assert.is_true(a1 < base - 0.5, ("adapter %g, base %g"):format(a1, base))
    assert.are.equal(a1, a2)
    assert.are.equal(before, io.open(tmp .. "/adapter/adapter_model.safetensors", "rb"):read("*a"))
  end)
end)
