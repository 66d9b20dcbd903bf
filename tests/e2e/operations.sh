#!/usr/bin/env bash
# End-to-end checks of issue 4 (operations) against the published binary: /metrics passes
# promtool after traffic, a real Prometheus scrapes the relay, the admin API's token, JSON logs,
# configuration precedence, and packaging/monitoring (rules, scrape config, dashboard) against a
# live /metrics.
source "$(dirname "$0")/lib.sh"
expect_checks 47

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
MON=$ROOT/packaging/monitoring
DATA=$E2E_TMP/data
TOKEN=e2e-admin-token-$(python3 -c 'import secrets; print(secrets.token_hex(12))')
PORT=$(free_port); ADMIN=$(free_port)

if ! start_relay ops "$DATA" "$PORT" "$ADMIN" --admin-token "$TOKEN" --log-format json --log-level debug --sweep-interval 1s; then
    fail "relay becomes ready"; cat "$E2E_TMP/ops.log"; finish; exit 1
fi
pass "relay becomes ready"
ADDR=$("$RELAY" address --data "$DATA" --host 127.0.0.1 --port "$PORT")

# Traffic: `relay check` creates, secures, sends, receives, acks and deletes a queue.
check "relay check passes (1)" "$RELAY" check "$ADDR" --timeout 30
check "relay check passes (2)" "$RELAY" check "$ADDR" --timeout 30
check "relay check with a wrong fingerprint fails" bash -c "'$RELAY' check 'relay://AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA@127.0.0.1:$PORT' --timeout 10 >/dev/null 2>&1; [ \$? = 1 ]"
# Some failed handshakes as well (plain HTTP against the TLS listener).
for _ in 1 2 3; do curl -s -m 2 "http://127.0.0.1:$PORT/" >/dev/null 2>&1; done

METRICS=$E2E_TMP/metrics.txt
curl -m 10 -fsS "http://127.0.0.1:$ADMIN/metrics" >"$METRICS"
check "promtool check metrics passes on a live /metrics" bash -c "promtool check metrics < '$METRICS'"
check "metrics count the handshakes by result" grep -Eq '^relay_handshakes_total\{result="tls"\} [1-9]' "$METRICS"
check "metrics count the sends of relay check" grep -Eq '^relay_commands_total\{command="send",result="ok"\} [1-9]' "$METRICS"
check "metrics count deliveries" grep -Eq '^relay_deliveries_total [1-9]' "$METRICS"
check "store gauges are exported" bash -c "grep -q '^relay_store_disk_bytes ' '$METRICS' && grep -q '^relay_store_queues ' '$METRICS' && grep -q '^relay_store_pending_compaction_bytes ' '$METRICS'"
check "process and runtime metrics are exported" bash -c "grep -q '^process_cpu_seconds_total ' '$METRICS' && grep -q '^dotnet_collection_count_total' '$METRICS'"
check "expiry sweeps run and are counted" bash -c "sleep 1.5; curl -fsS 'http://127.0.0.1:$ADMIN/metrics' | grep -Eq '^relay_store_sweeps_total [1-9]'"
check "no metric label carries an address or a port" bash -c "! grep -E '\{[^}]*(127\.0\.0\.1|:$PORT)' '$METRICS'"

# Admin API.
check "admin API: 401 without the token" bash -c "[ \$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:$ADMIN/admin/stats) = 401 ]"
check "admin API: 401 with a wrong token" bash -c "[ \$(curl -s -o /dev/null -w '%{http_code}' -H 'Authorization: Bearer wrong-token-123456789' http://127.0.0.1:$ADMIN/admin/stats) = 401 ]"
check "admin API: 200 and JSON with the token" bash -c "curl -fsS -H 'Authorization: Bearer $TOKEN' http://127.0.0.1:$ADMIN/admin/stats | python3 -c 'import json,sys; d=json.load(sys.stdin); assert d[\"durable\"] is True and \"disk_bytes\" in d'"
check "admin API: the queue-creation switch" bash -c "curl -fsS -X POST -H 'Authorization: Bearer $TOKEN' -H 'Content-Type: application/json' -d '{\"enabled\": false}' http://127.0.0.1:$ADMIN/admin/queue-creation | grep -q false && curl -fsS -X POST -H 'Authorization: Bearer $TOKEN' -H 'Content-Type: application/json' -d '{\"enabled\": true}' http://127.0.0.1:$ADMIN/admin/queue-creation | grep -q true"
check "health and metrics need no token" bash -c "[ \$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:$ADMIN/healthz) = 200 ] && [ \$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:$ADMIN/metrics) = 200 ]"

# A real Prometheus scraping the relay every second, with the packaged rules loaded.
PROM_PORT=$(free_port)
sed -e "s/127.0.0.1:5280/127.0.0.1:$ADMIN/" -e 's/scrape_interval: 15s/scrape_interval: 1s/' -e 's/evaluation_interval: 15s/evaluation_interval: 1s/' \
    -e "s#- relay-rules.yml#- $MON/relay-rules.yml#" "$MON/prometheus.yml" >"$E2E_TMP/prometheus.yml"
prometheus --config.file="$E2E_TMP/prometheus.yml" --storage.tsdb.path="$E2E_TMP/prom" \
    --web.listen-address="127.0.0.1:$PROM_PORT" >"$E2E_TMP/prometheus.log" 2>&1 &
PROM_PID=$!
E2E_PIDS+=("$PROM_PID")
prom_query() {  # prom_query QUERY PYTHON-CONDITION-ON-result: polls until the condition holds (30 s)
    local deadline=$((SECONDS + 30))
    while [ $SECONDS -lt $deadline ]; do
        if curl -fsS -G "http://127.0.0.1:$PROM_PORT/api/v1/query" --data-urlencode "query=$1" 2>/dev/null \
            | python3 -c "import json,sys; r=json.load(sys.stdin)['data']['result']; sys.exit(0 if ($2) else 1)" 2>/dev/null; then
            return 0
        fi
        sleep 0.5
    done
    return 1
}
check "prometheus: the relay target is up" prom_query 'up{job="relay"}' 'len(r) == 1 and r[0]["value"][1] == "1"'
check "prometheus: relay metrics are stored" prom_query 'relay_connections_accepted_total{job="relay"}' 'len(r) == 1'
check "prometheus: handshake results are stored" prom_query 'sum(relay_handshakes_total{job="relay"})' 'len(r) == 1 and float(r[0]["value"][1]) > 0'
check "prometheus: the packaged rules loaded" bash -c "curl -fsS http://127.0.0.1:$PROM_PORT/api/v1/rules | grep -q RelayStoreNearDiskBudget"
kill "$PROM_PID" 2>/dev/null; wait "$PROM_PID" 2>/dev/null

# packaging/monitoring: valid, and every metric it names is one the relay exports.
check "promtool check rules" promtool check rules "$MON/relay-rules.yml"
check "promtool check config" promtool check config "$MON/prometheus.yml"
check "the dashboard is valid JSON" python3 -c "import json; json.load(open('$MON/grafana-dashboard.json'))"
curl -fsS "http://127.0.0.1:$ADMIN/metrics" >"$METRICS"
names_used() {
    python3 - "$MON/grafana-dashboard.json" "$MON/relay-rules.yml" <<'PY'
import json, re, sys
exprs = []
dash = json.load(open(sys.argv[1]))
for p in dash["panels"]:
    exprs += [t["expr"] for t in p.get("targets", [])]
exprs += [a or b for a, b in re.findall(r"expr:\s*(\|[\s\S]*?)(?=\n\s*(?:for|labels|annotations):)|expr:\s*(.+)", open(sys.argv[2]).read())]
names = set()
for e in exprs:
    e = re.sub(r'"[^"]*"', '""', e)       # drop label values
    e = re.sub(r"\{[^}]*\}", "", e)          # and matchers
    for n in re.findall(r"\b((?:relay|process|dotnet)_[a-z0-9_]+)\b", e):
        names.add(n)
print("\n".join(sorted(names)))
PY
}
MISSING=""
COUNT=0
for name in $(names_used); do
    COUNT=$((COUNT + 1))
    grep -Eq "^$name[{ ]|^# TYPE $name " "$METRICS" || MISSING="$MISSING $name"
done
check "dashboard and rules name $COUNT metrics, all exported by the relay" bash -c "[ $COUNT -ge 20 ] && [ -z '$MISSING' ] || { echo 'missing:$MISSING'; false; }"

# The admin listener holds 64 connections and closes more at once, without a log line for each.
admin_flood() {
    python3 - "$ADMIN" <<'PY'
import socket, sys, time
held = [socket.create_connection(("127.0.0.1", int(sys.argv[1])), 5) for _ in range(100)]
time.sleep(1.5)
closed = 0
for s in held:
    s.setblocking(False)
    try:
        closed += s.recv(1) == b""
    except (BlockingIOError, ConnectionResetError) as e:
        closed += isinstance(e, ConnectionResetError)
for s in held:
    s.close()
sys.exit(0 if closed >= 36 else f"{closed} of 100 closed")
PY
}
check "a flood of the admin port: connections beyond 64 are closed at once" admin_flood
check "and the log has no line for them" bash -c "! grep -q 'Kestrel.Connections' '$E2E_TMP/ops.log'"

# Logs: one JSON object per line, without addresses.
check "SIGTERM exits 0" stop_relay "$RELAY_PID" TERM
check "every log line is valid JSON" python3 -c "
import json, sys
lines = [l for l in open('$E2E_TMP/ops.log') if l.strip()]
assert len(lines) >= 3, len(lines)
for l in lines:
    d = json.loads(l)
    assert 'EventId' in d and 'LogLevel' in d, l
"
check "the JSON log carries the event ids of start and stop" python3 -c "
import json
ids = {json.loads(l)['EventId'] for l in open('$E2E_TMP/ops.log') if l.strip()}
assert {1, 3, 4} <= ids, ids
"
check "no log line carries 127.0.0.1" bash -c "! grep -q '127\.0\.0\.1' <(grep -v '\"EventId\":1,' '$E2E_TMP/ops.log')"

# Configuration precedence end to end: JSON file < RELAY_* environment < flag.
P_JSON=$(free_port); P_ENV=$(free_port); P_FLAG=$(free_port); A2=$(free_port)
cat >"$E2E_TMP/relay.json" <<JSON
{ "listen": "127.0.0.1:$P_JSON", "admin": "127.0.0.1:$A2", "data": "$E2E_TMP/data2", "logFormat": "json" }
JSON
listens_on() {  # listens_on PORT ARGS...: serve with ARGS, wait for readiness, check the relay port, stop
    local port=$1; shift
    "$RELAY" serve "$@" >"$E2E_TMP/precedence.log" 2>&1 &
    local pid=$!
    E2E_PIDS+=("$pid")
    local ok=1
    if wait_for_http "http://127.0.0.1:$A2/readyz" 30; then
        python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 2).close()" && ok=0
    fi
    kill -TERM "$pid"; timeout 20 tail --pid="$pid" -f /dev/null; kill -9 "$pid" 2>/dev/null; wait "$pid"
    return $ok
}
check "config: the JSON file sets the port" listens_on "$P_JSON" --config "$E2E_TMP/relay.json"
check "config: RELAY_LISTEN overrides the file" env RELAY_LISTEN="127.0.0.1:$P_ENV" bash -c "$(declare -f listens_on wait_for_http); E2E_PIDS=(); RELAY='$RELAY'; E2E_TMP='$E2E_TMP'; A2=$A2; listens_on $P_ENV --config '$E2E_TMP/relay.json'"
check "config: --listen overrides the environment" env RELAY_LISTEN="127.0.0.1:$P_ENV" bash -c "$(declare -f listens_on wait_for_http); E2E_PIDS=(); RELAY='$RELAY'; E2E_TMP='$E2E_TMP'; A2=$A2; listens_on $P_FLAG --config '$E2E_TMP/relay.json' --listen 127.0.0.1:$P_FLAG"
check "config: RELAY_CONFIG names the file" env RELAY_CONFIG="$E2E_TMP/relay.json" bash -c "$(declare -f listens_on wait_for_http); E2E_PIDS=(); RELAY='$RELAY'; E2E_TMP='$E2E_TMP'; A2=$A2; listens_on $P_JSON"
check "config: an unknown key is exit 2 naming it" bash -c "echo '{\"lisen\": 1}' > '$E2E_TMP/bad.json'; err=\$(timeout 20 '$RELAY' serve --config '$E2E_TMP/bad.json' --admin 127.0.0.1:0 2>&1 >/dev/null); [ \$? = 2 ] && echo \"\$err\" | grep -q lisen"
check "config: a short admin token is exit 2 naming RELAY_ADMIN_TOKEN" bash -c "err=\$(RELAY_ADMIN_TOKEN=short timeout 20 '$RELAY' serve --data '$E2E_TMP/data3' --listen 127.0.0.1:0 --admin 127.0.0.1:0 2>&1 >/dev/null); [ \$? = 2 ] && echo \"\$err\" | grep -q RELAY_ADMIN_TOKEN"

# The command line: the version, and values no client could use refused in one line with exit 2.
check "relay --version prints packaging/VERSION" bash -c "[ \"\$('$RELAY' --version)\" = \"\$(tr -d ' \n' < '$ROOT/packaging/VERSION')\" ] && '$RELAY' --help | grep -q -- '--version'"
usage_error() {  # usage_error TEXT ARGS...: serve exits 2 with one stderr line containing TEXT
    local text=$1; shift
    local err rc=0
    err=$(timeout 20 "$RELAY" serve "$@" 2>&1 >/dev/null) || rc=$?
    [ "$rc" = 2 ] && [ "$(printf '%s\n' "$err" | wc -l)" = 1 ] && printf '%s' "$err" | grep -qF -- "$text" || { echo "exit $rc: $err"; false; }
}
check "serve --host 'bad host' is exit 2 naming --host" usage_error "--host must be one or more host names" --data "$E2E_TMP/data4" --listen 127.0.0.1:0 --admin off --host 'bad host'
check "serve with RELAY_DATA empty is exit 2 naming RELAY_DATA" env RELAY_DATA= bash -c "$(declare -f usage_error); RELAY='$RELAY'; usage_error 'RELAY_DATA must name a directory' --listen 127.0.0.1:0 --admin off"
check "serve --message-ttl 30m names the minimum as 1h" usage_error "--message-ttl must be at least 1h, got '30m'" --data "$E2E_TMP/data4" --message-ttl 30m
check "serve --message-ttl 40000d names the longest duration" usage_error "--message-ttl must be at most 36500d, got '40000d'" --data "$E2E_TMP/data4" --message-ttl 40000d

# An IPv6 listener without --host: its address in brackets, which a client takes.
P6=$(free_port)
ipv6_address() {
    "$RELAY" serve --data "$E2E_TMP/data6" --listen "[::1]:$P6" --admin off >"$E2E_TMP/ipv6.log" 2>&1 &
    local pid=$! ok=1 addr=
    E2E_PIDS+=("$pid")
    for _ in $(seq 100); do
        addr=$(grep -o "relay://[^ ]*" "$E2E_TMP/ipv6.log" | head -1)
        [ -n "$addr" ] && break
        sleep 0.2
    done
    case "$addr" in
        *"@[::1]:$P6") "$RELAY" ping "$addr" --timeout 10 >/dev/null && ok=0 ;;
        *) echo "address: '$addr'"; cat "$E2E_TMP/ipv6.log" ;;
    esac
    stop_relay "$pid" TERM >/dev/null
    return $ok
}
check "serve --listen [::1]:PORT logs relay://…@[::1]:PORT and relay ping reaches it" ipv6_address

# A flood of refused commands (GETs naming random queue ids: each new id costs the relay a decoy key
# agreement) from one source is slowed to that source's key-agreement budget: the relay's CPU stays a
# small part of what the same flood takes from a relay without the budget (most of a core), and another
# connection is answered throughout. Both relays are measured in this run: the comparison is a ratio.
flood_run() {   # NAME EXTRA-ARGS…: leaves auth_flood.py's JSON line and the relay's waits counter in $E2E_TMP/NAME.flood
    local name=$1 port admin addr; shift
    port=$(free_port); admin=$(free_port)
    echo '{} 0' >"$E2E_TMP/$name.flood"
    start_relay "$name" "$E2E_TMP/data-$name" "$port" "$admin" "$@" || { cat "$E2E_TMP/$name.log"; return; }
    addr=$("$RELAY" address --data "$E2E_TMP/data-$name" --host 127.0.0.1 --port "$port")
    local out
    out=$(python3 "$ROOT/bench/Relay.Benchmarks/scripts/auth_flood.py" "$addr" "$RELAY_PID" --flooders=2 --seconds=5 2>/dev/null | tail -1)
    [ -n "$out" ] || out='{}'
    echo "$out $(curl -fsS "http://127.0.0.1:$admin/metrics" | awk '/^relay_key_agreement_waits_total /{print $2}')" >"$E2E_TMP/$name.flood"
    stop_relay "$RELAY_PID" TERM >/dev/null
}
flood_run flood --key-agreement-burst 200 --key-agreement-rate 100
flood_run flood-open --key-agreement-rate 0
BUDGET=$(cat "$E2E_TMP/flood.flood"); OPEN=$(cat "$E2E_TMP/flood-open.flood")
echo "flood with the budget: $BUDGET"
echo "flood without it:      $OPEN"
field() { python3 -c "import json,sys; print(json.loads(sys.argv[1].rsplit(' ',1)[0]).get(sys.argv[2], 'nan'))" "$1" "$2" 2>/dev/null || echo nan; }
check "a random-id flood from one source is held to its budget (at most 150 refused a second: 200 at once, then 100 a second)" \
    python3 -c "import sys; v=float(sys.argv[1]); sys.exit(0 if 0 < v <= 150 else 1)" "$(field "$BUDGET" refused_per_second)"
check "the relay spends less than a third of the CPU the same flood takes without the budget" \
    python3 -c "import sys; a,b=float(sys.argv[1]),float(sys.argv[2]); print(f'{a} vs {b} cores'); sys.exit(0 if 0 <= a < b / 3 else 1)" \
    "$(field "$BUDGET" relay_cpu_cores)" "$(field "$OPEN" relay_cpu_cores)"
check "another connection is answered throughout the flood (a PING every 10 ms)" \
    python3 -c "import sys; v=float(sys.argv[1]); sys.exit(0 if v >= 100 else 1)" "$(field "$BUDGET" bystander_pings)"
check "the waits are counted in relay_key_agreement_waits_total" \
    python3 -c "import sys; v=float(sys.argv[1]); sys.exit(0 if v >= 1 else 1)" "${BUDGET##* }"

finish
