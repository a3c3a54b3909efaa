# The HTTP transport (flexllm.http) over real sockets: pipelining, keep-alive, the
# errors the C layer answers itself, timeouts, disconnects (tests/integration/http_client.py).
. tests/integration/tap.bash
if [ ! -f build/lib/flexllm/http.so ]; then tap_fail "build/lib/flexllm/http.so is not built (run make)"; tap_done; exit; fi
if ! command -v python3 >/dev/null; then tap_skip "python3 is not installed"; tap_done; exit; fi
export LUA_PATH="$ROOT/lua/?.lua;$ROOT/build/lua/?.lua;${LUA_PATH:-;}"
export LUA_CPATH="$ROOT/build/lib/?.so;${LUA_CPATH:-;}"
timeout 120 python3 tests/integration/http_client.py
