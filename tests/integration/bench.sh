# flexllm bench: a trace in process on the default model (counts, fields, a finetuning job,
# a rate sweep), and over HTTP against a fake server whose delays are known.
. tests/integration/tap.bash
FL=bin/flexllm
export FLEXLLM_HOME=$TMP/home # the default model, made for this test
export LUA_PATH="$ROOT/lua/?.lua;$ROOT/build/lua/?.lua;;" LUA_CPATH="$ROOT/build/lib/?.so;;"

# check FILE LUA_EXPR...: luajit evaluates each expression with `d` the decoded JSON.
check() {
    local file=$1; shift
    luajit - "$file" "$@" <<'LUA'
local d = require("cjson").decode(io.open(arg[1]):read("*a"))
for i = 2, #arg do
  local f = assert(loadstring("local d = ...; return " .. arg[i]))
  if not f(d) then io.stderr:write("false: ", arg[i], "\n"); os.exit(1) end
end
LUA
}

tap_run "bench in process on the default model runs" "$TMP/one.log" \
    $FL bench --requests 6 --rate 20 --prompt-len 16 --output-len 8 --ttft-slo 5 --tpot-slo 1 --out "$TMP/one.json"
tap_check "its JSON counts 6 requests, all completed, 8 tokens each, every figure there" check "$TMP/one.json" \
    'd.mode == "in-process" and #d.runs == 1' \
    'd.runs[1].requests == 6 and d.runs[1].completed == 6 and d.runs[1].errors == 0' \
    'd.runs[1].ttft_s.n == 6 and d.runs[1].tpot_s.n == 6 and d.runs[1].e2e_s.n == 6 and d.runs[1].itl_s.n == 6 * 7' \
    'd.runs[1].ttft_s.p50 > 0 and d.runs[1].ttft_s.p99 >= d.runs[1].ttft_s.p50 and d.runs[1].tpot_s.p90 > 0' \
    'd.runs[1].slo_attainment >= 0 and d.runs[1].slo_attainment <= 1 and d.runs[1].goodput_rps >= 0' \
    'd.runs[1].throughput.output_tokens_per_s > 0 and d.runs[1].rate == 20' \
    'd.runs[1].slo.ttft_s == 5 and d.runs[1].slo.tpot_s == 1 and d.policy:match("hybrid.lua$")'
if grep -q "TTFT .*p50" "$TMP/one.log" && grep -q "results: $TMP/one.json" "$TMP/one.log"; then
    tap_ok "it prints the latencies and where the results went"
else
    tap_fail "bench output: $(cat "$TMP/one.log")"
fi

# A finetuning job alongside, and a sweep over two rates.
printf '{"prompt": "Q: sky? A:", "completion": " blue"}\n{"prompt": "Q: grass? A:", "completion": " green"}\n' > "$TMP/ft.jsonl"
tap_run "bench --rates with --finetune runs" "$TMP/sweep.log" \
    $FL bench --rates 10,30 --requests 5 --prompt-len 12 --output-len 6 --finetune "$TMP/ft.jsonl" --out "$TMP/sweep.json"
tap_check "the sweep has a run per rate, each with its 5 requests and finetuning tokens" check "$TMP/sweep.json" \
    '#d.runs == 2 and d.runs[1].rate == 10 and d.runs[2].rate == 30' \
    'd.runs[1].completed == 5 and d.runs[2].completed == 5' \
    'd.runs[1].finetune.forward_tokens > 0 and d.runs[2].finetune.tokens_per_s > 0'
if command -v gnuplot >/dev/null; then
    tap_check "the sweep's plot is a PNG" test -s "$TMP/sweep.png"
else
    tap_check "without gnuplot, the sweep's plot data and script are written" test -s "$TMP/sweep.dat" -a -s "$TMP/sweep.gp"
fi

out=$($FL bench --url http://127.0.0.1:1 --model "$TMP/x" 2>&1)
case "$out" in *"give --model DIR (in this process) or --url URL (a server), not both"*) tap_ok "--model with --url is refused" ;;
    *) tap_fail "--model with --url: $out" ;; esac
out=$($FL bench --rates 1,x 2>&1)
case "$out" in *"--rates: 'x' is not a positive rate"*) tap_ok "a bad --rates entry is named" ;;
    *) tap_fail "bad --rates: $out" ;; esac

# Over HTTP: first token after 0.3 s, then one every 0.1 s; prompts holding REJECT get 400.
if [ -f build/lib/flexllm/http.so ]; then
    luajit tests/integration/bench_fake_server.lua 0.3 0.1 sekret >"$TMP/fake.port" 2>"$TMP/fake.log" &
    fake=$!
    for _ in $(seq 50); do [ -s "$TMP/fake.port" ] && break; sleep 0.1; done
    port=$(head -1 "$TMP/fake.port")
    printf '[{"prompt": "a fine prompt"}, {"prompt": "please REJECT this"}, {"prompt": "another one"}]' > "$TMP/prompts.json"
    tap_run "bench over HTTP against the fake server runs" "$TMP/http.log" \
        $FL bench --url "http://127.0.0.1:$port" --api-key sekret --dataset "$TMP/prompts.json" --output-len 4 \
            --requests 8 --rate 10 --seed 3 --ttft-slo 2 --tpot-slo 0.5 --out "$TMP/http.json"
    # The requests the trace holds that the fake rejects.
    rejects=$(luajit - "$TMP/prompts.json" <<'LUA'
local b, t = require "flexllm.bench", require "flexllm.trace"
local reqs = b.build_requests({ rate = 10, requests = 8, seed = 3, output_len = 4,
                                dataset = assert(t.load_prompts(arg[1])) })
local n = 0
for _, r in ipairs(reqs) do if r.prompt:find("REJECT") then n = n + 1 end end
print(n)
LUA
)
    tap_check "it counts the rejected requests as errors ($rejects) and times the others from the stream" \
        check "$TMP/http.json" \
        'd.mode == "http" and d.runs[1].model_name == "fake-model" and d.runs[1].requests == 8' \
        "d.runs[1].errors == $rejects and d.runs[1].completed == 8 - $rejects" \
        'd.runs[1].first_error:match("^HTTP 400: .*rejected prompt")' \
        'd.runs[1].ttft_s.p50 >= 0.3 and d.runs[1].ttft_s.p99 < 3' \
        'd.runs[1].tpot_s.p50 >= 0.1 * 0.9 and d.runs[1].tpot_s.p50 < 0.5' \
        "d.runs[1].itl_s.n == 3 * (8 - $rejects) and d.runs[1].itl_s.p50 >= 0.1 * 0.9" \
        'd.runs[1].e2e_s.p50 >= 0.6' \
        "d.runs[1].slo_met == 8 - $rejects"
    ok=$(luajit - "$TMP/fake.log" <<'LUA'
local cjson, n = require "cjson", 0
for line in io.lines(arg[1]) do
  local b = cjson.decode(line)
  if b.stream == true and b.model == "fake-model" and b.max_tokens == 4 and b.stream_options.include_usage then n = n + 1 end
end
print(n)
LUA
)
    tap_check "all 8 requests asked for a stream with usage, of the listed model, 4 tokens each" test "$ok" = 8
    out=$($FL bench --url "http://127.0.0.1:$port" --api-key wrong --requests 2 --rate 10 --output-len 2 \
        --out "$TMP/key.json" 2>&1)
    tap_check "a wrong API key makes every request an error, with the server's message" check "$TMP/key.json" \
        'd.runs[1].errors == 2 and d.runs[1].first_error:match("^HTTP 401: .*bad API key")'
    luajit - "$port" <<'LUA'
local h = require("flexllm.http").client()
h:request({ host = "127.0.0.1", port = tonumber(arg[1]), path = "/quit" })
for _ = 1, 20 do h:poll(0.1) if h:active() == 0 then break end end
LUA
    wait "$fake" 2>/dev/null
else
    tap_skip "bench over HTTP: build/lib/flexllm/http.so is not built"
fi

# Against `flexllm serve` itself: its streamed chunks and usage give the same counts.
if [ -f build/lib/flexllm/http.so ] && $FL help | grep -q "^  serve "; then
    $FL init-model "$TMP/small" --dim 64 --hidden 160 --layers 2 --heads 4 --kv-heads 2 >/dev/null
    $FL serve --model "$TMP/small" --port 0 --data-dir "$TMP/srv" >"$TMP/serve.log" 2>&1 &
    srv=$!
    for _ in $(seq 100); do grep -q "listening on" "$TMP/serve.log" && break; sleep 0.1; done
    url=$(grep -o "http://[0-9.:]*" "$TMP/serve.log" | head -1)
    if [ -n "$url" ] && $FL bench --url "$url" --requests 6 --rate 20 --prompt-len 10 --output-len 5 \
            --out "$TMP/serve.json" >"$TMP/serve-bench.log" 2>&1; then
        # A chunk carries text: a token ending mid-character comes with the next one, so
        # there are at most 4 gaps per request, and the usage chunk counts the tokens.
        tap_check "bench against flexllm serve: 6 requests, 5 tokens each by the usage, timed from the stream" \
            check "$TMP/serve.json" \
            'd.runs[1].completed == 6 and d.runs[1].errors == 0 and d.runs[1].itl_s.n <= 6 * 4' \
            'math.abs(d.runs[1].throughput.output_tokens_per_s * d.runs[1].duration_s - 30) < 1e-6' \
            'd.runs[1].ttft_s.n == 6 and d.runs[1].tpot_s.n == 6 and d.runs[1].ttft_s.p50 > 0'
    else
        tap_fail "bench against flexllm serve ($url): $(tail -3 "$TMP/serve-bench.log") $(tail -3 "$TMP/serve.log")"
    fi
    kill "$srv" 2>/dev/null
    wait "$srv" 2>/dev/null
else
    tap_skip "bench against flexllm serve: no serve command or no http module"
fi

tap_done
