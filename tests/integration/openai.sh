# flexllm serve against the official openai Python package (unchanged, in a venv under
# build/), plus raw HTTP for what a client library would not send: completions and chat,
# streaming, files, fine-tuning jobs and their adapters, vLLM's LoRA routes, errors, a
# client that disconnects, an API key, a body limit, and a clean exit on SIGTERM.
. tests/integration/tap.bash
FL=bin/flexllm
VENV=build/venv-openai
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import openai" 2>/dev/null; then
    rm -rf "$VENV"
    if ! { python3 -m venv "$VENV" && "$VENV/bin/pip" install -q openai; } >"$TMP/pip.log" 2>&1; then
        tap_skip "cannot install the openai package into $VENV: $(tail -1 "$TMP/pip.log")"
        tap_done; exit
    fi
fi

"$FL" init-model "$TMP/model" >/dev/null || { tap_fail "init-model"; tap_done; exit; }
MODEL=model
PROMPT="Once upon a time"
"$FL" generate --model "$TMP/model" --prompt "$PROMPT" --max-tokens 12 --ignore-eos >"$TMP/expected.txt"

# start_server NAME ARGS...: runs flexllm serve --port 0, sets PORT_<NAME> and PID_<NAME>.
start_server() {
    local name=$1; shift
    "$FL" serve --model "$TMP/model" --port 0 --data-dir "$TMP/data-$name" "$@" \
        >"$TMP/$name.out" 2>"$TMP/$name.err" &
    local pid=$! port=
    for _ in $(seq 1 300); do
        port=$(sed -n 's|^listening on http://127.0.0.1:\([0-9]*\)$|\1|p' "$TMP/$name.out")
        [ -n "$port" ] && break
        kill -0 $pid 2>/dev/null || break
        sleep 0.05
    done
    eval "PORT_$name=$port PID_$name=$pid"
    [ -n "$port" ]
}

if ! start_server main; then
    tap_fail "flexllm serve did not start: $(cat "$TMP/main.err")"; tap_done; exit
fi
tap_ok "flexllm serve --port 0 prints the port it bound"
KEY=sk-test-$$
if ! start_server keyed --api-key "$KEY" --max-body-bytes 65536; then
    tap_fail "the keyed server did not start: $(cat "$TMP/keyed.err")"
    kill $PID_main; tap_done; exit
fi

timeout 300 "$VENV/bin/python" tests/integration/openai_client.py "http://127.0.0.1:$PORT_main" "$MODEL" \
    "$TMP/expected.txt" "http://127.0.0.1:$PORT_keyed" "$KEY" >"$TMP/client.out" 2>"$TMP/client.err"
rc=$?
while IFS= read -r line; do
    case "$line" in
        PASS\ *) tap_ok "${line#PASS }" ;;
        FAIL\ *) tap_fail "${line#FAIL }" ;;
        SKIP\ *) tap_skip "${line#SKIP }" ;;
    esac
done <"$TMP/client.out"
if [ $rc -ne 0 ] && ! grep -q '^FAIL' "$TMP/client.out"; then
    tap_fail "the client stopped (status $rc): $(tail -3 "$TMP/client.err" | tr '\n' ' ')"
fi

for name in main keyed; do
    eval "pid=\$PID_$name"
    kill -TERM "$pid"
    wait "$pid"; rc=$?
    if [ $rc -eq 0 ] && grep -q "shutting down" "$TMP/$name.err"; then
        tap_ok "the $name server exits 0 on SIGTERM"
    else
        tap_fail "the $name server exited with $rc: $(tail -3 "$TMP/$name.err" | tr '\n' ' ')"
    fi
done
if grep -q "internal error" "$TMP/main.err" "$TMP/keyed.err"; then
    tap_fail "the servers logged internal errors: $(grep -h "internal error" "$TMP"/*.err | head -3)"
else
    tap_ok "no internal errors in the servers' logs"
fi
tap_done
