# flexllm finetune and memory-plan from the command line: a real kill -9 and --resume,
# bad data, and the planner's figures for a real 8B config.
. tests/integration/tap.bash
FL=bin/flexllm

if [ -f "$SHARED/models/configs/llama-3.1-8b/config.json" ]; then
    out=$($FL memory-plan --model "$SHARED/models/configs/llama-3.1-8b" --targets all --rank 16 --seq 8192)
    pct=$(echo "$out" | sed -n 's/.*keep-everything .*: \([0-9.]*\)%$/\1/p')
    if [ -n "$pct" ] && awk "BEGIN{exit !($pct <= 25)}"; then
        tap_ok "memory-plan, LLaMA-3.1-8B, LoRA on all linears, seq 8192: pruned is $pct% of keep-everything (goal <= 25%)"
    else tap_fail "memory-plan output: $out"; fi
    err=$($FL memory-plan --model "$SHARED/models/configs/llama-3.1-8b" --targets q,qq 2>&1); rc=$?
    case "$rc:$err" in 1:*"unknown LoRA target 'qq'"*) tap_ok "memory-plan names an unknown target" ;; *) tap_fail "bad target: $rc $err" ;; esac
else
    tap_skip "memory-plan on LLaMA-3.1-8B: $SHARED/models/configs absent"
fi

M=$SHARED/models/stories260K
if [ ! -d "$M" ] || [ ! -f "$SHARED/data/tinyshakespeare.txt" ]; then
    tap_skip "finetune CLI tests: stories260K or tinyshakespeare absent"; tap_done; exit
fi
head -c 50000 "$SHARED/data/tinyshakespeare.txt" > "$TMP/train.txt"
args=(--model "$M" --data "$TMP/train.txt" --targets all --rank 4 --lr 1e-3 --seq-len 128
      --max-steps 120 --checkpoint-every 10 --seed 3 --threads 1)

$FL finetune "${args[@]}" --out "$TMP/whole" >"$TMP/whole.log" 2>&1
tap_check "an uninterrupted finetune writes a PEFT adapter" test -f "$TMP/whole/adapter_model.safetensors"
grep -q "loss" "$TMP/whole.log" && tap_ok "it reports progress (step, loss, tok/s, ETA)" || tap_fail "no progress lines"

# The same run, killed with SIGKILL once a checkpoint exists, then resumed.
$FL finetune "${args[@]}" --out "$TMP/killed" >"$TMP/killed.log" 2>&1 &
pid=$!
for _ in $(seq 1 400); do
    [ -f "$TMP/killed/checkpoint.json" ] && break
    sleep 0.01
done
kill -9 $pid 2>/dev/null; killed=$?
wait $pid 2>/dev/null
if [ $killed -ne 0 ] || [ -f "$TMP/killed/adapter_model.safetensors" ]; then
    tap_skip "the run finished before it could be killed (machine too fast for this check)"
else
    step=$(sed -n 's/.*"step": \([0-9]*\).*/\1/p' "$TMP/killed/checkpoint.json")
    $FL finetune "${args[@]}" --out "$TMP/killed" --resume >"$TMP/resumed.log" 2>&1
    if cmp -s "$TMP/whole/adapter_model.safetensors" "$TMP/killed/adapter_model.safetensors"; then
        tap_ok "killed with SIGKILL after the step-$step checkpoint, --resume ends with a byte-identical adapter"
    else tap_fail "the resumed adapter differs from the uninterrupted one ($(tail -2 "$TMP/resumed.log"))"; fi
fi

printf '{"text": "fine"}\n{"prompt": 1, "completion": "x"}\n' > "$TMP/bad.jsonl"
err=$($FL finetune --model "$M" --data "$TMP/bad.jsonl" --out "$TMP/bad" 2>&1); rc=$?
case "$rc:$err" in 1:*"bad.jsonl:2"*) tap_ok "a malformed JSONL line is named with its line number and nothing starts" ;; *) tap_fail "bad jsonl: $rc $err" ;; esac
[ ! -e "$TMP/bad" ] && tap_ok "no output folder is made for a job that did not start" || tap_fail "$TMP/bad exists"
tap_done
