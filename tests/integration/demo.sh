# flexllm demo --quick: co-serving while finetuning runs to the end, prints its summary,
# and the adapter it trained beats the base on the held-out task samples.
. tests/integration/tap.bash
FL=bin/flexllm
export FLEXLLM_HOME=$TMP/home # the default model, made for this test
OUT=$TMP/demo

tap_run "flexllm demo --quick runs to the end" "$TMP/demo.log" $FL demo --quick --out "$OUT"
for line in "SLO attainment" "TTFT p50" "finetuning: " "held-out loss" "base:" "adapter:" "summary: $OUT/summary.json"; do
    if grep -qF "$line" "$TMP/demo.log"; then tap_ok "the summary shows '$line'"
    else tap_fail "no '$line' in: $(cat "$TMP/demo.log")"; fi
done

tap_check "the JSON summary exists" test -s "$OUT/summary.json"
LUA_PATH="$ROOT/lua/?.lua;;" luajit - "$OUT/summary.json" >"$TMP/check.log" 2>&1 <<'LUA'
local d = require("cjson").decode(io.open(arg[1]):read("*a"))
local function say(ok, what) print((ok and "ok " or "not ok ") .. what) end
say(d.heldout_loss.adapter < d.heldout_loss.base,
  ("held-out loss: adapter %.3f below base %.3f"):format(d.heldout_loss.adapter, d.heldout_loss.base))
say(d.inference.completed == d.inference.requests and d.inference.requests > 0,
  ("every request completed (%d of %d)"):format(d.inference.completed, d.inference.requests))
say(d.finetune.steps > 0 and d.finetune.forward_tokens > 0 and d.finetune.tokens_per_s > 0,
  ("finetuning ran %d steps, %d tokens"):format(d.finetune.steps, d.finetune.forward_tokens))
say(d.inference.ttft_s.n == d.inference.completed and d.inference.slo_attainment >= 0,
  "TTFT measured for every request, SLO attainment reported")
say(d.trained_prompts_exact.base <= d.trained_prompts_exact.adapter,
  ("the adapter answers at least as many trained prompts exactly (%d) as the base (%d)")
    :format(d.trained_prompts_exact.adapter, d.trained_prompts_exact.base))
LUA
while read -r verdict rest; do
    case "$verdict" in ok) tap_ok "$rest" ;; *) tap_fail "$verdict $rest" ;; esac
done < "$TMP/check.log"

if command -v gnuplot >/dev/null; then
    tap_check "the plot is a PNG" test -s "$OUT/demo.png"
    tap_check "the plot's path is printed" grep -qF "plot: $OUT/demo.png" "$TMP/demo.log"
else
    tap_check "without gnuplot, the plot's data and script are written" test -s "$OUT/demo.dat" -a -s "$OUT/demo.gp"
fi
tap_check "the trained adapter is a PEFT folder" test -s "$OUT/adapter/adapter_model.safetensors" \
    -a -s "$OUT/adapter/adapter_config.json"
tap_check "the generated task data is there" test -s "$OUT/train.jsonl" -a -s "$OUT/heldout.jsonl"

tap_done
