#!/usr/bin/env bash
# End-to-end checks of the relay against its open files limit (RLIMIT_NOFILE), with the published
# binary under prlimit: every connection is a file descriptor and so is every file of the store. A
# relay started from a shell or a container often gets a soft limit of 1,024; a flood of connections
# that took the last descriptors used to leave RocksDB none for its next log file, and every write
# failed from then on (INTERNAL) until a restart. The relay raises its soft limit for
# --max-connections, closes connections beyond what the limit leaves at once, and says so.
source "$(dirname "$0")/lib.sh"
expect_checks 16

# start_limited NAME NOFILE [serve args...]: the relay under prlimit --nofile=NOFILE (SOFT:HARD),
# sets PORT, ADMIN, ADDR and RELAY_PID; waits for /readyz.
start_limited() {
    local name=$1 nofile=$2; shift 2
    local data="$E2E_TMP/$name"
    PORT=$(free_port); ADMIN=$(free_port)
    "$RELAY" init --data "$data" --host 127.0.0.1 --port "$PORT" >/dev/null 2>&1
    ADDR=$("$RELAY" address --data "$data" --host 127.0.0.1 --port "$PORT")
    prlimit --nofile="$nofile" "$RELAY" serve --data "$data" --listen "127.0.0.1:$PORT" --admin "127.0.0.1:$ADMIN" "$@" \
        >"$E2E_TMP/$name.log" 2>&1 &
    RELAY_PID=$!
    E2E_PIDS+=("$RELAY_PID")
    wait_for_http "http://127.0.0.1:$ADMIN/readyz" 30
}

soft_limit() { awk '/^Max open files/ { print $4 }' "/proc/$1/limits"; }

# flood PORT COUNT SECONDS: opens COUNT connections to PORT (stops at the first that fails: a relay
# that stopped accepting has a full backlog), holds them SECONDS, then prints "closed N of M": how
# many of the M it opened the relay had closed meanwhile (end-of-stream or a reset).
cat > "$E2E_TMP/flood.py" <<'PY'
import socket, sys, time
port, count, hold = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
held = []
for i in range(count):
    s = socket.socket()
    s.settimeout(5)
    try:
        s.connect(("127.0.0.1", port))
    except OSError as e:
        print("connect", i, "failed:", e)
        break
    held.append(s)
time.sleep(hold)
closed = 0
for s in held:
    s.setblocking(False)
    try:
        closed += s.recv(1) == b""
    except BlockingIOError:
        pass
    except ConnectionError:
        closed += 1
for s in held:
    s.close()
print("closed", closed, "of", len(held))
PY
flood() { python3 "$E2E_TMP/flood.py" "$@"; }

# 1. A soft limit below what --max-connections needs, a hard limit above: raised, nothing to say.
# (The hard limit stays this shell's: raising it takes CAP_SYS_RESOURCE, which a container may lack.)
HARD=$(ulimit -Hn)
[ "$HARD" = unlimited ] || [ "$HARD" -ge 5768 ] || echo "this shell's hard open files limit $HARD is below 5768: the first checks cannot pass"
if ! start_limited raised "1024:$HARD" --max-connections 5000; then
    fail "relay starts under a soft limit of 1024"; cat "$E2E_TMP/raised.log"; finish; exit 1
fi
soft_limit_is() { [ "$(soft_limit "$RELAY_PID")" = "$1" ]; }
check "serve raises its soft open files limit to --max-connections + 768 (1024 -> 5768)" soft_limit_is 5768
check "and logs no open files warning (event 34)" bash -c "! grep -q 'Relay\[34\]' '$E2E_TMP/raised.log'"
# The admin listener keeps within its share of the reserve: 100 idle connections, 36 closed at once.
admin_flood() {
    local out
    out=$(flood "$ADMIN" 100 1.5); echo "$out"
    # 64 held: 36 of the 100 closed (a probe of a moment before may still count for a few more).
    local closed; closed=$(echo "$out" | awk '/^closed/ { print $2 }')
    [ "${closed:-0}" -ge 36 ] && [ "$closed" -le 40 ]
}
check "the admin listener serves 64 connections at once and closes more at once" admin_flood
check "and /readyz answers once they are gone" wait_for_http "http://127.0.0.1:$ADMIN/readyz" 10
check "SIGTERM exits 0" stop_relay "$RELAY_PID" TERM

# 2. A hard limit of 1,000: room for 232 connections. A client sends and receives throughout while
# a flood of 1,100 connections (more than the limit; no per-source limit here) comes and goes.
if ! start_limited capped 1000:1000 --max-connections-per-source 0 --queue-creation-rate 0 \
        --queue-max-messages 100000 --queue-max-bytes 1GB; then
    fail "relay starts under a hard limit of 1000"; cat "$E2E_TMP/capped.log"; finish; exit 1
fi
check "event 34 names the connections the limit leaves and the limit to set" \
    grep -q 'Relay\[34\] The open files limit (1000, hard limit 1000) leaves room for 232 relay connections, fewer than --max-connections 20000: more are closed at once. Raise the limit to 20768' "$E2E_TMP/capped.log"
# relay bench: 4 producers and 4 consumers with 4,000-byte messages (memtables fill and are flushed
# to new table files, a new log file each time) while the flood holds every connection it can get.
"$RELAY" bench "$ADDR" --scenario live --duration 20 --size 4000 --json >"$E2E_TMP/bench.json" 2>"$E2E_TMP/bench.err" &
BENCH_PID=$!
sleep 3
flood "$PORT" 1100 8 >"$E2E_TMP/flood.out" 2>&1
BENCH_RC=0; wait "$BENCH_PID" || BENCH_RC=$?
CLOSED=$(awk '/^closed/ { print $2 }' "$E2E_TMP/flood.out")
check "the flood's connections beyond the limit were closed at once (800 of 1,100 or more)" bash -c "[ '${CLOSED:-0}' -ge 800 ] || { cat '$E2E_TMP/flood.out'; false; }"
check "relay bench through the flood: every message once, none lost (exit 0)" bash -c "[ $BENCH_RC = 0 ] && tail -1 '$E2E_TMP/bench.json' | python3 -c 'import json,sys; d=json.load(sys.stdin); assert d[\"lost\"] == 0 and d[\"duplicated\"] == 0 and d[\"messages\"] > 0, d'"
check "relay check passes after the flood (the store writes)" "$RELAY" check "$ADDR" --timeout 30
check "no store failure (event 20) and no failed accept (event 16) in the log" bash -c "! grep -E 'Relay\[(20|16)\]' '$E2E_TMP/capped.log'"
check "relay_connections_limit says 232" bash -c "curl -fsS http://127.0.0.1:$ADMIN/metrics | grep -qx 'relay_connections_limit 232'"
check "the refusals are counted: relay_connections_rejected_total{reason=\"max_connections\"}" bash -c \
    "curl -fsS http://127.0.0.1:$ADMIN/metrics | awk -F' ' '/^relay_connections_rejected_total\\{reason=\"max_connections\"\\}/ { n = \$2 } END { exit !(n >= 800) }'"
check "and logged at most once per 10 s (event 15), not once each" bash -c "n=\$(grep -c 'Relay\[15\]' '$E2E_TMP/capped.log'); [ \"\$n\" -ge 1 ] && [ \"\$n\" -le 3 ]"
check "SIGTERM exits 0" stop_relay "$RELAY_PID" TERM

# A backlog of connections over the limit let in at once (the relay stopped while they queued, as a
# busy relay leaves them): each is closed before the next accept, so the relay's descriptors stay
# where they were. A relay of its own, just started: few thread-pool threads yet. (It used to hand each on to the thread pool first: 500 queued refusals held 500
# descriptors at once, enough under load to leave the store none.)
backlog_burst() {
    python3 - "$PORT" "$RELAY_PID" <<'PY'
import os, signal, socket, sys, time
port, pid = int(sys.argv[1]), int(sys.argv[2])
held = []
def connect(n):
    for _ in range(n):
        s = socket.socket(); s.settimeout(2)
        try:
            s.connect(("127.0.0.1", port))
        except OSError:
            break
        held.append(s)
connect(240)                      # the 232 the limit leaves, and 8 refused
time.sleep(1)
before = len(os.listdir(f"/proc/{pid}/fd"))
os.kill(pid, signal.SIGSTOP)
connect(500)                      # queue in the listen backlog (512)
queued = len(held) - 240
os.kill(pid, signal.SIGCONT)
most, end = 0, time.time() + 2
while time.time() < end:
    try:
        most = max(most, len(os.listdir(f"/proc/{pid}/fd")))
    except OSError:
        pass
for s in held:
    s.close()
print(f"descriptors before {before}, connections in the backlog {queued}, most seen after {most}")
sys.exit(0 if queued >= 400 and most <= before + 40 else 1)
PY
}
if ! start_limited burst 1000:1000 --max-connections-per-source 0; then
    fail "relay starts under a hard limit of 1000"; cat "$E2E_TMP/burst.log"; finish; exit 1
fi
check "a backlog of 500 refused connections let in at once: the relay's descriptors stay within 40 of before" backlog_burst
stop_relay "$RELAY_PID" TERM >/dev/null

# 3. A limit that leaves no room at all: a clear refusal to start.
check "a hard limit of 500: exit 2 naming --max-connections and the limit" bash -c \
    "err=\$(timeout 20 prlimit --nofile=500:500 '$RELAY' serve --data '$E2E_TMP/none' --listen 127.0.0.1:0 --admin off 2>&1 >/dev/null); [ \$? = 2 ] && echo \"\$err\" | grep -q -- '--max-connections: the open files limit (500, hard limit 500) leaves no room'"

finish
