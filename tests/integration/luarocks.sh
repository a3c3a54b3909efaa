# `luarocks make` installs a working module and flexllm command into a fresh tree.
. tests/integration/tap.bash
T=$TMP/tree
if ! command -v luarocks >/dev/null; then tap_skip "luarocks is not installed"; tap_done; exit; fi
if luarocks make --tree "$T" --deps-mode=none LUA_INCDIR=/usr/include/luajit-2.1 flexllm-scm-1.rockspec >"$TMP/log" 2>&1; then
    tap_ok "luarocks make installs flexllm into a fresh tree"
else
    tap_fail "luarocks make failed: $(tail -5 "$TMP/log" | tr '\n' ' ')"; tap_done; exit
fi
tap_check "the tree holds the flexllm command" test -x "$T/bin/flexllm"
out=$(cd / && "$T/bin/flexllm" init-model "$TMP/m" --dim 32 --hidden 64 --layers 1 --heads 2 --kv-heads 1 2>&1 &&
      cd / && "$T/bin/flexllm" generate --model "$TMP/m" --prompt "ab" --max-tokens 4 --ignore-eos --ids 2>&1)
n=$(echo "$out" | tail -n 1 | wc -w)
if [ "$n" = 4 ]; then tap_ok "the installed command runs init-model and generate from another directory"
else tap_fail "installed command: $out"; fi
share=$(ls -d "$T"/share/lua/*/ | head -1); lib=$(ls -d "$T"/lib/lua/*/ | head -1)
v=$(cd / && LUA_PATH="${share}?.lua;${share}?/init.lua;;" LUA_CPATH="${lib}?.so;;" luajit -e 'print(require("flexllm").version)' 2>&1)
case "$v" in [0-9]*.[0-9]*) tap_ok "require 'flexllm' works from the installed tree (version $v)" ;; *) tap_fail "require from tree: $v" ;; esac
tap_check "the tree holds the HTTP module" test -f "${lib}flexllm/http.so"
p=$(cd / && LUA_PATH="${share}?.lua;${share}?/init.lua;;" LUA_CPATH="${lib}?.so;;" \
    luajit -e 'print(require("flexllm.bench").find_policy("hybrid"))' 2>&1)
case "$p" in "$share"*flexllm/policies/hybrid.lua) tap_ok "the installed policies are found by name ($p)" ;;
    *) tap_fail "policy lookup from the tree: $p" ;; esac
tap_done
