# The flexllm command: generate, tokenize, init-model, and its errors.
. tests/integration/tap.bash
FL=bin/flexllm

# Greedy ids from BOS through the CLI equal llama2.c's.
if [ -d "$SHARED/models/stories260K" ]; then
    M=$SHARED/models/stories260K
    got=$($FL generate --model "$M" --prompt "" --max-tokens 80 --ignore-eos --ids)
    want=$(tr -d '[],\n' < "$M/expected_greedy_from_bos_80.json" | tr -s ' ' | sed 's/^ //; s/ $//')
    if [ "$got" = "$want" ]; then tap_ok "flexllm generate --ids on stories260K gives llama2.c's 80 greedy ids"
    else tap_fail "flexllm generate --ids on stories260K: got '$got', want '$want'"; fi
    blas=$($FL generate --model "$M" --prompt "" --max-tokens 80 --ignore-eos --ids --gemm openblas)
    if [ "$blas" = "$want" ]; then tap_ok "the same 80 ids with --gemm openblas"
    else tap_fail "--gemm openblas: got '$blas'"; fi
    text=$($FL generate --model "$M" --prompt "" --max-tokens 80 --ignore-eos)
    case "$text" in "Once upon a time, there was a little girl named Lily."*) tap_ok "the same generation as text begins with llama2.c's story" ;;
        *) tap_fail "generation text begins '$text'" ;; esac
    stopped=$($FL generate --model "$M" --prompt "" --max-tokens 80 --stop "girl")
    if [ "$stopped" = "Once upon a time, there was a little " ]; then tap_ok "--stop ends the text before the stop string"
    else tap_fail "--stop: got '$stopped'"; fi
    rt=$(printf 'Once upon a time, Lily saw a big dog.\n' | $FL tokenize --model "$M" --no-bos | $FL tokenize --model "$M" --detokenize)
    if [ "$rt" = "Once upon a time, Lily saw a big dog." ]; then tap_ok "tokenize | tokenize --detokenize round-trips on stories260K"
    else tap_fail "tokenize round trip: got '$rt'"; fi
else
    tap_skip "stories260K CLI tests: $SHARED/models/stories260K absent (set FLEXLLM_SHARED)"
fi

# llama.cpp's LLaMA-3 vectors through the CLI, for the inputs that are one line.
if [ -f "$SHARED/tokenizers/llama3/tokenizer.json" ]; then
    luajit - "$SHARED/tokenizers/tests/llama-bpe.inp" "$SHARED/tokenizers/tests/llama-bpe.out" "$TMP" <<'LUA'
local inp, out, tmp = arg[1], arg[2], arg[3]
local cases = {}
local text = io.open(inp, "rb"):read("*a")
for case in (text .. "\n"):gmatch("(.-)\n__ggml_vocab_test__\n") do cases[#cases + 1] = case end
local ids = {}
for line in io.open(out, "rb"):lines() do ids[#ids + 1] = line end
local fi, fo = io.open(tmp .. "/in.txt", "wb"), io.open(tmp .. "/want.txt", "wb")
for i, c in ipairs(cases) do
  if c ~= "" and not c:find("[\n\r]") and ids[i] then
    fi:write(c, "\n"); fo:write((ids[i]:gsub("^%s+", ""):gsub("%s+$", "")), "\n")
  end
end
fi:close(); fo:close()
LUA
    $FL tokenize --tokenizer "$SHARED/tokenizers/llama3/tokenizer.json" --no-bos < "$TMP/in.txt" > "$TMP/got.txt"
    n=$(wc -l < "$TMP/want.txt")
    if diff -q "$TMP/want.txt" "$TMP/got.txt" >/dev/null; then tap_ok "flexllm tokenize matches llama.cpp's LLaMA-3 ids on all $n one-line cases"
    else tap_fail "flexllm tokenize differs from llama.cpp on: $(diff "$TMP/want.txt" "$TMP/got.txt" | head -5 | tr '\n' ' ')"; fi
else
    tap_skip "LLaMA-3 CLI tokenizer test: $SHARED/tokenizers/llama3 absent"
fi

# init-model then generate: every command works with no download.
if $FL init-model "$TMP/model" --seed 3 --dim 64 --hidden 160 --layers 2 --heads 4 --kv-heads 2 >/dev/null; then
    tap_ok "flexllm init-model writes a model"
    a=$($FL generate --model "$TMP/model" --prompt "hello" --max-tokens 12 --ignore-eos --ids)
    b=$($FL generate --model "$TMP/model" --prompt "hello" --max-tokens 12 --ignore-eos --ids)
    n=$(echo "$a" | wc -w)
    if [ "$n" = 12 ] && [ "$a" = "$b" ]; then tap_ok "generate on the init-model model gives 12 ids, the same twice"
    else tap_fail "generate on init-model: '$a' vs '$b'"; fi
    s1=$($FL generate --model "$TMP/model" --prompt "hi" --max-tokens 8 --ignore-eos --ids --temperature 1 --seed 5)
    s2=$($FL generate --model "$TMP/model" --prompt "hi" --max-tokens 8 --ignore-eos --ids --temperature 1 --seed 5)
    s3=$($FL generate --model "$TMP/model" --prompt "hi" --max-tokens 8 --ignore-eos --ids --temperature 1 --seed 6)
    if [ "$s1" = "$s2" ] && [ "$s1" != "$s3" ]; then tap_ok "sampling is reproducible for a seed and differs across seeds"
    else tap_fail "seeded sampling: '$s1' '$s2' '$s3'"; fi
else
    tap_fail "flexllm init-model failed"
fi

# Errors are clear and exit non-zero.
err=$($FL generate --prompt x 2>&1); rc=$?
case "$rc:$err" in 1:*"--model is required"*) tap_ok "generate without --model says it is required" ;; *) tap_fail "missing --model: rc $rc, '$err'" ;; esac
err=$($FL generate --model "$TMP/model" --bogus 2>&1); rc=$?
case "$rc:$err" in 1:*"unknown option --bogus"*) tap_ok "an unknown option is named" ;; *) tap_fail "unknown option: rc $rc, '$err'" ;; esac
err=$($FL generate --model "$TMP/model" --max-tokens lots 2>&1); rc=$?
case "$rc:$err" in 1:*"--max-tokens must be a number"*) tap_ok "a non-numeric value is named" ;; *) tap_fail "bad number: rc $rc, '$err'" ;; esac
err=$($FL generate --model "$TMP/nonexistent" 2>&1); rc=$?
case "$rc:$err" in 1:*"$TMP/nonexistent/config.json"*) tap_ok "a missing model folder names its config.json" ;; *) tap_fail "missing model: rc $rc, '$err'" ;; esac
err=$($FL generate --model "$TMP/model" --gemm blas 2>&1); rc=$?
case "$rc:$err" in 1:*"option 'gemm' must be \"packed\" or \"openblas\", got \"blas\""*) tap_ok "a bad --gemm value is named" ;; *) tap_fail "bad gemm: rc $rc, '$err'" ;; esac
err=$($FL frobnicate 2>&1); rc=$?
case "$rc:$err" in 1:*"unknown command 'frobnicate'"*) tap_ok "an unknown command is named" ;; *) tap_fail "unknown command: rc $rc, '$err'" ;; esac
tap_done
