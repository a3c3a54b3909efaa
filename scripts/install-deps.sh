#!/bin/sh
# Installs the Debian packages flexllm builds and tests with, when any is missing.
# lua5.1 makes Debian's luarocks (run by lua-any) default to Lua 5.1, the ABI of LuaJIT.
# gnuplot-nox draws the plots of `flexllm demo` and `flexllm bench` (optional at runtime).
# Arguments name further packages a target needs (`make fuzz`: clang and its libFuzzer).
set -u
PKGS="build-essential luajit libluajit-5.1-dev libev-dev lua-cjson libcjson-dev \
libopenblas-openmp-dev libpcre2-dev libutf8proc-dev libhttp-parser-dev lua-busted luarocks lua5.1 \
gnuplot-nox $*"

missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0

echo "flexllm: installing Debian packages:$missing"
if [ "$(id -u)" = 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
else
    echo "flexllm: cannot install packages (not root, no sudo). Install them and retry:" >&2
    echo "  apt-get install$missing" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq $missing; }; then
    echo "flexllm: apt-get failed; install these packages and retry:$missing" >&2
    exit 1
fi
