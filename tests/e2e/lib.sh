# Shared helpers of the end-to-end checks. Each check script sources this, runs checks with
# `check NAME COMMAND...`, and ends with `finish`, which prints "N passed, N failed".
set -uo pipefail
# Job control: without it bash starts background jobs with SIGINT ignored, and SIGINT is checked.
set -m

RELAY=${RELAY:?set RELAY to the published relay binary}
E2E_PASSED=0
E2E_FAILED=0
E2E_TMP=$(mktemp -d /tmp/relay-e2e.XXXXXX)
E2E_PIDS=()

cleanup() {
    for pid in "${E2E_PIDS[@]:-}"; do
        [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null
    done
    rm -rf "$E2E_TMP"
}
trap cleanup EXIT

pass() { E2E_PASSED=$((E2E_PASSED + 1)); echo "PASS $*"; }
fail() { E2E_FAILED=$((E2E_FAILED + 1)); echo "FAIL $*"; }

# check NAME CMD...: passes when CMD exits 0.
check() {
    local name=$1; shift
    if "$@"; then pass "$name"; else fail "$name"; fi
}

# A free TCP port on loopback.
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# wait_for_http URL [SECONDS]
wait_for_http() {
    local url=$1 deadline=$((SECONDS + ${2:-20}))
    while [ $SECONDS -lt $deadline ]; do
        curl -fsS "$url" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    return 1
}

# start_relay NAME DATA PORT ADMIN [extra serve args...]: starts the relay in the background,
# logs to $E2E_TMP/NAME.log, waits for /readyz, sets RELAY_PID.
start_relay() {
    local name=$1 data=$2 port=$3 admin=$4; shift 4
    "$RELAY" serve --data "$data" --listen "127.0.0.1:$port" --admin "127.0.0.1:$admin" "$@" \
        >"$E2E_TMP/$name.log" 2>&1 &
    RELAY_PID=$!
    E2E_PIDS+=("$RELAY_PID")
    wait_for_http "http://127.0.0.1:$admin/readyz" 30
}

# stop_relay PID [SIGNAL]: sends the signal (TERM) and waits; returns the exit code.
stop_relay() {
    local pid=$1 sig=${2:-TERM}
    kill -s "$sig" "$pid" 2>/dev/null
    local rc=0
    wait "$pid" || rc=$?
    return $rc
}

finish() {
    echo "$E2E_PASSED passed, $E2E_FAILED failed"
    [ "$E2E_FAILED" -eq 0 ]
}
