#!/bin/bash
# Builds the Hugging Face reference fixtures: tiny random models in HF layout with
# the float64 logits that hf_reference.py computes for them.
# Usage: tests/reference/make_fixtures.sh OUTDIR
# Sets up a Python venv in build/pyenv (numpy + safetensors from PyPI) on first use
# and reuses it after. Exits non-zero with a message when something is missing.
set -u
cd "$(dirname "$0")/../.."
root=$PWD

if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
out=$1
venv=$root/build/pyenv
py=$venv/bin/python

fail() {
    echo "make_fixtures: $*" >&2
    exit 1
}

if ! "$py" -c "import numpy, safetensors" >/dev/null 2>&1; then
    command -v python3 >/dev/null 2>&1 || fail "python3 not found"
    if [ ! -x "$py" ]; then
        rm -rf "$venv"
        if ! python3 -m venv "$venv" >/dev/null 2>&1; then
            rm -rf "$venv"
            if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
                apt-get install -y python3-venv >/dev/null 2>&1 ||
                    fail "python3 -m venv failed and 'apt-get install -y python3-venv' failed"
                python3 -m venv "$venv" >/dev/null 2>&1 || { rm -rf "$venv"; fail "python3 -m venv failed"; }
            else
                fail "python3 -m venv failed (install python3-venv)"
            fi
        fi
    fi
    if ! "$venv/bin/pip" install --quiet --timeout 15 --retries 1 numpy safetensors >"$root/build/pyenv-pip.log" 2>&1; then
        fail "pip install numpy safetensors failed (no network?); see build/pyenv-pip.log"
    fi
    "$py" -c "import numpy, safetensors" >/dev/null 2>&1 ||
        fail "numpy/safetensors still not importable in $venv"
fi

mkdir -p "$out" || fail "cannot create $out"
"$py" "$root/tests/reference/hf_reference.py" "$out" || fail "hf_reference.py failed"
