# Shared helpers of the end-to-end checks. Each check script sources this, runs checks with
# `check NAME COMMAND...`, and ends with `finish`, which prints "e2e total: N passed, N failed".
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

# Every curl of the checks, in this shell and in their `bash -c` children, gives up after 10 s (a
# later -m on the command line wins), so no check waits for ever on a relay that stopped answering.
curl() { command curl -m 10 "$@"; }
export -f curl

pass() { E2E_PASSED=$((E2E_PASSED + 1)); echo "PASS $*"; }
fail() { E2E_FAILED=$((E2E_FAILED + 1)); echo "FAIL $*"; }

# check NAME CMD...: passes when CMD exits 0.
check() {
    local name=$1; shift
    if "$@"; then pass "$name"; else fail "$name"; fi
}

# A free TCP port on loopback, below the kernel's ephemeral range (32768 and up), so that no
# outgoing connection of the checks (curl, clients, proxies) takes it before the server binds it.
free_port() {
    python3 -c '
import random, socket
for _ in range(1000):
    port = random.randrange(20000, 32000)
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        continue
    finally:
        s.close()
    print(port)
    break
else:
    raise SystemExit("no free port")'
}

# wait_for_http URL [SECONDS]
wait_for_http() {
    local url=$1 deadline=$((SECONDS + ${2:-20}))
    while [ $SECONDS -lt $deadline ]; do
        curl -m 2 -fsS "$url" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    return 1
}

# wait_for_port PORT [SECONDS]: until something listens on 127.0.0.1:PORT.
wait_for_port() {
    local deadline=$((SECONDS + ${2:-10}))
    while [ $SECONDS -lt $deadline ]; do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
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

# stop_relay PID [SIGNAL] [SECONDS]: sends the signal (TERM) and waits up to SECONDS (20) for the
# exit; returns its exit code, or 124 after killing a relay that did not stop in time.
stop_relay() {
    local pid=$1 sig=${2:-TERM} deadline=$((SECONDS + ${3:-20}))
    kill -s "$sig" "$pid" 2>/dev/null
    while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
        kill -9 "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
        echo "relay $pid did not exit within the deadline after SIG$sig"
        return 124
    fi
    local rc=0
    wait "$pid" || rc=$?
    return $rc
}

# expect_checks N: the number of checks this script runs when it runs to its end; finish counts
# the ones an early exit left out as failed (so a script cannot pass by not running its checks).
E2E_EXPECTED=0
expect_checks() { E2E_EXPECTED=$1; }

finish() {
    local ran=$((E2E_PASSED + E2E_FAILED))
    if [ "$ran" -lt "$E2E_EXPECTED" ]; then
        echo "FAIL $((E2E_EXPECTED - ran)) check(s) did not run"
        E2E_FAILED=$((E2E_FAILED + E2E_EXPECTED - ran))
    elif [ "$ran" -gt "$E2E_EXPECTED" ]; then
        # Checks were added without updating expect_checks: an early exit could then hide as many.
        echo "FAIL $ran checks ran, expect_checks says $E2E_EXPECTED: update it"
        E2E_FAILED=$((E2E_FAILED + 1))
    fi
    echo "e2e total: $E2E_PASSED passed, $E2E_FAILED failed"
    [ "$E2E_FAILED" -eq 0 ]
}
