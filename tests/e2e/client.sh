#!/usr/bin/env bash
# End-to-end checks of the client commands against the published binary: the invite, join, send,
# listen flow as a newcomer types it; relay check directly, through a real SOCKS5 proxy (microsocks)
# and with a wrong fingerprint; profile key-file permissions; and the seizure test (nothing from
# the conversation, no key and no peer address in the relay's data directory or output).
source "$(dirname "$0")/lib.sh"
expect_checks 35

DATA=$E2E_TMP/relay
PORT=$(free_port); ADMIN=$(free_port)
# Clients dial relay.test, which /etc/hosts may not know: use the loopback address but give the
# relay a host name for its printed address, so that its own output names no IP address.
"$RELAY" init --data "$DATA" --host relay.test >/dev/null 2>&1
ADDR=$("$RELAY" address --data "$DATA" --host 127.0.0.1 --port "$PORT")
if ! start_relay relay "$DATA" "$PORT" "$ADMIN" --host relay.test; then
    fail "relay starts"; cat "$E2E_TMP/relay.log"; finish; exit 1
fi

# relay check: directly, through SOCKS5, and against the wrong identity.
check "relay check succeeds" bash -c "'$RELAY' check '$ADDR' > '$E2E_TMP/check.out' && grep -q '^ok   delete' '$E2E_TMP/check.out'"
check "relay check prints every step with its time" bash -c "for s in connect create secure send receive ack delete; do grep -Eq \"^ok   \$s +[0-9.]+ ms\" '$E2E_TMP/check.out' || exit 1; done"
check "relay ping answers" bash -c "set -o pipefail; '$RELAY' ping '$ADDR' --count 2 | grep -q pong"
# A port of this machine on which nothing listens, in the kernel's ephemeral range: in a network
# namespace whose range is that one port, the client's connect can only connect to itself (a relay
# restarting on that port would find it taken). The client says what is true: nothing listens there.
SELF_ADDR=$(echo "$ADDR" | sed "s|:$PORT\$|:40001|")
check "relay check of a port it would connect to itself on: connection refused, not a TLS error" unshare --net sh -c "ip link set lo up && echo '40001 40001' > /proc/sys/net/ipv4/ip_local_port_range && out=\$('$RELAY' check '$SELF_ADDR' 2>&1); rc=\$?; echo \"\$out\" > '$E2E_TMP/self.out'; [ \$rc = 1 ] && grep -q 'Connection refused' '$E2E_TMP/self.out' && ! grep -q TLS '$E2E_TMP/self.out'"
MAIN_RELAY_PID=$RELAY_PID
# A relay that stops answering (frozen with SIGSTOP while ping runs): ping gives up after --timeout.
"$RELAY" ping "$ADDR" --count 1000000 --timeout 2 >"$E2E_TMP/ping.out" 2>"$E2E_TMP/ping.err" &
PING_PID=$!
for _ in $(seq 100); do grep -q pong "$E2E_TMP/ping.out" 2>/dev/null && break; sleep 0.1; done
kill -STOP "$MAIN_RELAY_PID"
PING_START=$SECONDS
PING_RC=0; wait "$PING_PID" || PING_RC=$?
PING_TOOK=$((SECONDS - PING_START))
kill -CONT "$MAIN_RELAY_PID"
check "relay ping gives up on a relay that stops answering (exit 1 within the timeout)" bash -c "[ $PING_RC = 1 ] && [ $PING_TOOK -le 10 ] && grep -q 'no PONG within 2 s' '$E2E_TMP/ping.err' && grep -q pong '$E2E_TMP/ping.out'"
# A listener that accepts and never speaks: the handshake times out.
SILENT_PORT=$(free_port)
python3 -c "import socket,time; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1',$SILENT_PORT)); s.listen(); c,_=s.accept(); time.sleep(30)" &
E2E_PIDS+=($!); SILENT_PID=$!
for _ in $(seq 50); do ss -Hltn "sport = :$SILENT_PORT" | grep -q . && break; sleep 0.1; done
SILENT_ADDR=$(echo "$ADDR" | sed "s|:$PORT\$|:$SILENT_PORT|")
check "relay ping gives up on a listener that never answers" bash -c "start=\$SECONDS; '$RELAY' ping '$SILENT_ADDR' --timeout 2 2>'$E2E_TMP/silent.err'; rc=\$?; [ \$rc = 1 ] && [ \$((SECONDS - start)) -le 10 ] && [ -s '$E2E_TMP/silent.err' ]"
kill "$SILENT_PID" 2>/dev/null

SOCKS_PORT=$(free_port)
microsocks -i 127.0.0.1 -p "$SOCKS_PORT" >"$E2E_TMP/socks.log" 2>&1 &
E2E_PIDS+=($!); SOCKS_PID=$!
wait_for_port "$SOCKS_PORT" || echo "microsocks is not listening on $SOCKS_PORT"
check "relay check through a SOCKS5 proxy (microsocks)" "$RELAY" check "$ADDR" --socks "127.0.0.1:$SOCKS_PORT"
kill "$SOCKS_PID" 2>/dev/null; wait "$SOCKS_PID" 2>/dev/null
check "relay check through a dead proxy fails naming the connect step" bash -c "out=\$('$RELAY' check '$ADDR' --socks 127.0.0.1:$SOCKS_PORT --timeout 5 2>&1); rc=\$?; [ \$rc = 1 ] && echo \"\$out\" | grep -q \"step 'connect'\""

"$RELAY" init --data "$E2E_TMP/other" >/dev/null 2>&1
OTHER_FP=$("$RELAY" address --data "$E2E_TMP/other" | sed 's|relay://||; s|@.*||')
WRONG=$(echo "$ADDR" | sed "s|relay://[^@]*@|relay://$OTHER_FP@|")
check "relay check with a wrong fingerprint fails clearly" bash -c "out=\$('$RELAY' check '$WRONG' --timeout 10 2>&1); rc=\$?; [ \$rc = 1 ] && echo \"\$out\" | grep -q 'does not match the fingerprint'"

# The conversation, as a newcomer types it.
CANARY="canary-$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')"
A=$E2E_TMP/alice; B=$E2E_TMP/bob
LINK=$("$RELAY" invite --profile "$A" --relay "$ADDR" --name bob 2>/dev/null)
check "invite prints one link" bash -c "[ \"\$(echo '$LINK' | wc -l)\" = 1 ] && echo '$LINK' | grep -q '^relay-invite:'"
check "join prints the contact's name" bash -c "[ \"\$('$RELAY' join '$LINK' --profile '$B' --name alice)\" = alice ]"
check "listen completes the join" bash -c "'$RELAY' listen --profile '$A' --timeout 3 > '$E2E_TMP/a1.out'; grep -qx '\* bob joined' '$E2E_TMP/a1.out'"
check "send from the joiner" "$RELAY" send --profile "$B" --to alice "hello alice $CANARY"
check "send from standard input" bash -c "echo 'second line $CANARY' | '$RELAY' send --profile '$B' --to alice"
check "listen --once prints NAME: TEXT" bash -c "[ \"\$('$RELAY' listen --profile '$A' --once --timeout 10)\" = 'bob: hello alice $CANARY' ]"
check "the next message is still there" bash -c "[ \"\$('$RELAY' listen --profile '$A' --once --timeout 10)\" = 'bob: second line $CANARY' ]"
check "reply from the inviter" "$RELAY" send --profile "$A" --to bob "hi bob $CANARY"
check "the joiner receives the reply" bash -c "[ \"\$('$RELAY' listen --profile '$B' --once --timeout 10)\" = 'alice: hi bob $CANARY' ]"
check "listen --timeout exits 1 when nothing arrives" bash -c "'$RELAY' listen --profile '$A' --timeout 1 >/dev/null 2>&1; [ \$? = 1 ]"
check "contacts lists the contact" bash -c "'$RELAY' contacts --profile '$A' | grep -q '^bob	joined$'"
check "send to an unknown contact fails clearly" bash -c "out=\$('$RELAY' send --profile '$A' --to carol x 2>&1); rc=\$?; [ \$rc = 1 ] && echo \"\$out\" | grep -q \"no contact named 'carol'\""
# A message whose text carries a newline and an escape sequence prints on one line, escaped.
check "send a message with control characters" "$RELAY" send --profile "$B" --to alice $'line one\n* mallory joined\e[31m'
check "listen prints it on one line with the controls escaped" bash -c "[ \"\$('$RELAY' listen --profile '$A' --once --timeout 10)\" = 'bob: line one\\n* mallory joined\\u001b[31m' ]"
# A relay that cannot be reached: invite gives up with one line and exit 1 instead of waiting for ever.
DEAD_PORT=$(free_port)
DEAD_ADDR=$(echo "$ADDR" | sed "s/:$PORT\$/:$DEAD_PORT/")
check "invite to an unreachable relay gives up within a minute, one line, exit 1" bash -c "out=\$(timeout 60 '$RELAY' invite --profile '$E2E_TMP/dead' --relay '$DEAD_ADDR' 2>&1 >/dev/null); rc=\$?; [ \$rc = 1 ] && [ \$(echo \"\$out\" | wc -l) = 1 ] && echo \"\$out\" | grep -q '^relay: '"
# Damaged profiles that still parse as JSON: one line naming the file, exit 1, nothing overwritten.
for damaged in '{"contacts":null}' '{"contacts":[null]}' '{"version":99,"contacts":[]}' '{"contacts":[{"name":"x"}]}'; do
    mkdir -p "$E2E_TMP/damaged" && chmod 700 "$E2E_TMP/damaged"
    printf '%s' "$damaged" > "$E2E_TMP/damaged/profile.json" && chmod 600 "$E2E_TMP/damaged/profile.json"
    check "a damaged profile ($damaged) is one clear line and exit 1" bash -c "out=\$('$RELAY' contacts --profile '$E2E_TMP/damaged' 2>&1); rc=\$?; [ \$rc = 1 ] && [ \$(echo \"\$out\" | wc -l) = 1 ] && echo \"\$out\" | grep -Eq 'profile.json (is damaged|is a profile of version 99)' && [ \"\$(cat '$E2E_TMP/damaged/profile.json')\" = '$damaged' ]"
done
check "relay without arguments prints its help on stderr and exits 2" bash -c "out=\$('$RELAY' 2>/dev/null); rc=\$?; [ \$rc = 2 ] && [ -z \"\$out\" ] && '$RELAY' 2>&1 | grep -q '^Usage: relay'"
check "profile key file is mode 0600" bash -c "[ \"\$(stat -c %a '$A/profile.json')\" = 600 ]"
chmod 644 "$A/profile.json"
check "a profile readable by others is refused" bash -c "'$RELAY' send --profile '$A' --to bob x 2>&1 | grep -q 'accessible by other users'; r=(\${PIPESTATUS[@]}); [ \${r[0]} = 1 ] && [ \${r[1]} = 0 ]"
chmod 600 "$A/profile.json"

# Seizure: stop the relay and search everything it wrote.
stop_relay "$RELAY_PID" TERM
keys=$(python3 - "$A/profile.json" "$B/profile.json" <<'PY'
import json, sys, base64
out = set()
for path in sys.argv[1:]:
    for c in json.load(open(path))["contacts"]:
        for k in ("ownPrivate", "recipientPrivate", "deliveryKey", "senderPrivate", "sendChain", "receiveChain"):
            v = c.get(k)
            if v:
                raw = base64.b64decode(v)
                out.add(raw.hex()); out.add(v); out.add(base64.urlsafe_b64encode(raw).decode().rstrip("="))
print("\n".join(sorted(out)))
PY
)
seized() {  # seized NEEDLE: true when NEEDLE is nowhere in the data directory or the relay's output
    [ -d "$DATA" ] && [ -s "$E2E_TMP/relay.log" ] || return 1
    local rc=0
    grep -rqaF -- "$1" "$DATA" "$E2E_TMP/relay.log" || rc=$?
    [ "$rc" = 1 ]   # 1: not found; 0: found; 2: grep failed
}
check "seizure: the canary text is nowhere in the data directory or output" seized "$CANARY"
check "seizure: no profile key in any encoding (the keys were found: $(echo "$keys" | grep -c .))" bash -c "[ \$(echo '$keys' | grep -c .) -ge 12 ] || exit 1; while read -r k; do [ -z \"\$k\" ] && continue; grep -rqaF -- \"\$k\" '$DATA' '$E2E_TMP/relay.log'; rc=\$?; [ \$rc = 1 ] || exit 1; done <<< \"$keys\"; exit 0"
check "seizure: no raw private key bytes" python3 - "$DATA" "$A/profile.json" "$B/profile.json" <<'PY'
import json, sys, base64, os
keys = []
for path in sys.argv[2:]:
    for c in json.load(open(path))["contacts"]:
        for k in ("ownPrivate", "recipientPrivate", "senderPrivate", "sendChain", "receiveChain"):
            if c.get(k): keys.append(base64.b64decode(c[k]))
if len(keys) < 4 or not os.path.isdir(sys.argv[1]): sys.exit(2)
for root, _, files in os.walk(sys.argv[1]):
    for f in files:
        data = open(os.path.join(root, f), "rb").read()
        if any(k in data for k in keys): sys.exit(1)
PY
check "seizure: no peer address in the relay's output" seized "127.0.0.1"

finish
