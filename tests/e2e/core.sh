#!/usr/bin/env bash
# End-to-end checks of the relay core against the published binary: command-line contract,
# health and readiness, clean exit on SIGTERM and SIGINT.
source "$(dirname "$0")/lib.sh"
expect_checks 22

DATA=$E2E_TMP/data

FIRST=$("$RELAY" init --data "$DATA" 2>/dev/null)
check "init prints the address" bash -c "echo '$FIRST' | grep -Eq '^relay://[A-Za-z0-9_-]{43}@localhost:5223$'"
check "init keeps the identity" bash -c "[ -n '$FIRST' ] && [ \"\$('$RELAY' init --data '$DATA' 2>/dev/null)\" = '$FIRST' ] && [ \"\$('$RELAY' address --data '$DATA')\" = '$FIRST' ]"
check "identity file is private (0600)" bash -c "[ \"\$(stat -c %a '$DATA/identity.pfx')\" = 600 ]"
check "address prints only the address" bash -c "[ \"\$('$RELAY' address --data '$DATA' --host relay.example,abc.onion --port 443 | wc -l)\" = 1 ] && '$RELAY' address --data '$DATA' --host relay.example,abc.onion --port 443 | grep -Eq '^relay://[A-Za-z0-9_-]{43}@relay.example,abc.onion:443$'"
check "address without identity fails clearly" bash -c "'$RELAY' address --data '$E2E_TMP/none' 2>&1 | grep -q 'relay init'; r=(\${PIPESTATUS[@]}); [ \${r[0]} = 1 ] && [ \${r[1]} = 0 ]"
check "address takes an IPv6 host in brackets" bash -c "'$RELAY' address --data '$DATA' --host '[::1],x.onion' --port 5223 | grep -q '@\\[::1\\],x.onion:5223\$'"
check "address refuses an IPv6 host without brackets, saying how" bash -c "out=\$('$RELAY' address --data '$DATA' --host ::1 2>&1); rc=\$?; [ \$rc = 2 ] && echo \"\$out\" | grep -q 'in brackets'"
check "--help lists the commands" bash -c "'$RELAY' --help | grep -q serve && '$RELAY' --help | grep -q address"
check "serve --help lists every option" bash -c "'$RELAY' serve --help | grep -q -- '--listen' && '$RELAY' serve --help | grep -q -- '--admin' && '$RELAY' serve --help | grep -q -- '--data' && '$RELAY' serve --help | grep -q -- '--config'"

usage_error() {  # usage_error ARGS...: exit code 2 and exactly one line on stderr
    local err rc=0
    err=$(timeout 20 "$RELAY" "$@" 2>&1 >/dev/null) || rc=$?   # a wrongly accepted serve stops at 20 s (exit 124)
    [ "$rc" = 2 ] && [ "$(printf '%s\n' "$err" | wc -l)" = 1 ] && [ -n "$err" ]
}
check "unknown command: exit 2, one line" usage_error frobnicate
check "unknown option: exit 2, one line" usage_error serve --bogus --listen 127.0.0.1:0 --admin 127.0.0.1:0
check "bad listen value: exit 2, one line" usage_error serve --data "$DATA" --listen nonsense --admin 127.0.0.1:0
check "bad duration: exit 2, one line" usage_error serve --data "$DATA" --message-ttl soon --listen 127.0.0.1:0 --admin 127.0.0.1:0
BUSY=$(free_port)
python3 -c "import socket,time; s=socket.socket(); s.bind(('127.0.0.1', $BUSY)); s.listen(); time.sleep(60)" &
BUSY_PID=$!; E2E_PIDS+=("$BUSY_PID")
if wait_for_port "$BUSY"; then
    check "port in use: exit 2, one line naming the address" bash -c "err=\$(timeout 20 '$RELAY' serve --data '$DATA' --listen 127.0.0.1:$BUSY --admin 127.0.0.1:0 2>&1 >/dev/null); rc=\$?; [ \$rc = 2 ] && [ \$(echo \"\$err\" | wc -l) = 1 ] && echo \"\$err\" | grep -q '127.0.0.1:$BUSY: Address already in use'"
else
    fail "port in use: the busy port's listener starts"
fi
kill "$BUSY_PID" 2>/dev/null

PORT=$(free_port); ADMIN=$(free_port)
if start_relay serve "$DATA" "$PORT" "$ADMIN"; then
    pass "serve becomes ready"
    check "healthz answers 200" curl -fsSo /dev/null "http://127.0.0.1:$ADMIN/healthz"
    check "readyz answers 200" curl -fsSo /dev/null "http://127.0.0.1:$ADMIN/readyz"
    check "ready line carries the address" grep -Eq "Relay ready at relay://[A-Za-z0-9_-]{43}@" "$E2E_TMP/serve.log"
    # What a relay started without --admin listens on (ss), not what its help says.
    check "admin listener is loopback only by default (127.0.0.1:5280)" bash -c "'$RELAY' serve --data '$E2E_TMP/default-admin' --listen 127.0.0.1:$(free_port) >'$E2E_TMP/default-admin.log' 2>&1 & pid=\$!; ok=1; for _ in \$(seq 100); do curl -m 2 -fsS http://127.0.0.1:5280/readyz >/dev/null 2>&1 && { ok=0; break; }; sleep 0.1; done; l=\$(ss -Hltnp 'sport = :5280'); kill \$pid; wait \$pid; [ \$ok = 0 ] && echo \"\$l\" | grep -q \"pid=\$pid,\" && echo \"\$l\" | grep -q '127.0.0.1:5280' && ! echo \"\$l\" | grep -Eq '(0\.0\.0\.0|\*|\[::\]):5280'"
    check "SIGTERM exits 0" stop_relay "$RELAY_PID" TERM
else
    fail "serve becomes ready"; cat "$E2E_TMP/serve.log"
fi

if start_relay serve2 "$DATA" "$PORT" "$ADMIN"; then
    check "restart keeps the address" bash -c "[ -n '$FIRST' ] && grep -qF \"\$(echo '$FIRST' | sed 's/@.*//')@\" '$E2E_TMP/serve2.log'"
    check "SIGINT exits 0" stop_relay "$RELAY_PID" INT
else
    fail "restart becomes ready"
fi

finish
