# TAP helpers for the integration scripts (sourced).
TAP_N=0
TAP_FAILED=0
tap_ok()   { TAP_N=$((TAP_N + 1)); echo "ok $TAP_N - $*"; }
tap_fail() { TAP_N=$((TAP_N + 1)); TAP_FAILED=$((TAP_FAILED + 1)); echo "not ok $TAP_N - $*"; }
tap_skip() { TAP_N=$((TAP_N + 1)); echo "ok $TAP_N - $* # SKIP"; }
# tap_check DESCRIPTION COMMAND...: ok when the command succeeds.
tap_check() { local d=$1; shift; if "$@"; then tap_ok "$d"; else tap_fail "$d"; fi; }
# tap_run DESCRIPTION LOG COMMAND...: ok when the command succeeds; its output goes to LOG,
# whose last lines a failure shows.
tap_run() {
    local d=$1 log=$2; shift 2
    if "$@" >"$log" 2>&1; then tap_ok "$d"; else tap_fail "$d: $(tail -5 "$log")"; fi
}
tap_done() { echo "1..$TAP_N"; [ "$TAP_FAILED" -eq 0 ]; }
SHARED=${FLEXLLM_SHARED:-../shared}
ROOT=$(pwd)
TMP=$ROOT/build/tmp/$(basename "$0" .sh)
rm -rf "$TMP" && mkdir -p "$TMP"
