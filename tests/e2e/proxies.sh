#!/usr/bin/env bash
# End-to-end checks of the relay behind real proxies, with the configurations shipped in
# packaging/proxies/ (ports and paths substituted), all on loopback, against the published binary:
# haproxy with PROXY v2 (send-proxy-v2) and v1 (send-proxy) in front of `relay serve --proxy-protocol`,
# stunnel (an outer TLS layer, PROXY v1 to the relay) with stunnel in client mode on the other side,
# and shadowsocks-libev (ss-server in front of the relay, ss-local as the client's SOCKS5 proxy).
# Each proxy is started and stopped here; the relay's output must name no IP address.
source "$(dirname "$0")/lib.sh"
expect_checks 20

PROXIES=$(cd "$(dirname "$0")/../../packaging/proxies" && pwd)
DATA=$E2E_TMP/relay
PORT=$(free_port); ADMIN=$(free_port)
# The relay prints its address with the host relay.test, so that its own output names no IP address.
"$RELAY" init --data "$DATA" --host relay.test >/dev/null 2>&1
FP=$("$RELAY" address --data "$DATA" | sed 's|relay://||; s|@.*||')
addr() { echo "relay://$FP@127.0.0.1:$1"; }

# stop PID: TERM, then wait for it.
stop() { kill -TERM "$1" 2>/dev/null; wait "$1" 2>/dev/null; return 0; }

metric() {  # metric 'NAME{LABELS}': its value on the relay's /metrics, 0 when absent
    curl -fsS "http://127.0.0.1:$ADMIN/metrics" | awk -v k="$1" '$1 == k { v = $2 } END { print v + 0 }'
}
REJECTED='relay_connections_rejected_total{reason="proxy_header"}'

check "serve --help lists --proxy-protocol and the per-source limits" bash -c \
    "'$RELAY' serve --help | grep -q -- '--proxy-protocol' && '$RELAY' serve --help | grep -q -- '--max-connections-per-source' && '$RELAY' serve --help | grep -q -- '--queue-creation-rate' && '$RELAY' serve --help | grep -q -- '--key-agreement-rate'"
check "a bad per-source limit is a usage error (exit 2)" bash -c \
    "timeout 20 '$RELAY' serve --data '$E2E_TMP/unused' --max-connections-per-source -1 --listen 127.0.0.1:0 --admin 127.0.0.1:0 >/dev/null 2>&1; [ \$? = 2 ]"
if ! start_relay relay "$DATA" "$PORT" "$ADMIN" --host relay.test --proxy-protocol; then
    fail "relay starts with --proxy-protocol"; cat "$E2E_TMP/relay.log"; finish; exit 1
fi

# Without a header: refused and counted.
check "direct connection without a PROXY header fails (relay check to the relay port)" \
    bash -c "! '$RELAY' check '$(addr "$PORT")' --timeout 5 >'$E2E_TMP/direct.out' 2>&1"
before=$(metric "$REJECTED")
check "the refusal is counted in relay_connections_rejected_total{reason=\"proxy_header\"}" [ "$before" -ge 1 ]

# haproxy, PROXY v2 then v1, from packaging/proxies/haproxy/haproxy.cfg.
check "shipped haproxy.cfg passes haproxy -c" /usr/sbin/haproxy -c -q -f "$PROXIES/haproxy/haproxy.cfg"
for mode in send-proxy-v2 send-proxy; do
    HAPORT=$(free_port)
    cfg=$E2E_TMP/haproxy-$mode.cfg
    sed -e "s/^\(\s*\)bind :443$/\1bind 127.0.0.1:$HAPORT/" \
        -e "s/127\.0\.0\.1:5223/127.0.0.1:$PORT/" \
        -e "s/ port 5280 / port $ADMIN /" \
        -e "s/ send-proxy-v2 / $mode /" \
        -e "s/ inter 5s$/ inter 200ms fall 1 rise 1/" \
        "$PROXIES/haproxy/haproxy.cfg" >"$cfg"
    /usr/sbin/haproxy -f "$cfg" -db >"$E2E_TMP/haproxy-$mode.log" 2>&1 &
    HAPID=$!; E2E_PIDS+=("$HAPID")
    # A failing health check (every 200 ms here) would take the relay out of haproxy at once.
    if wait_for_port "$HAPORT" && sleep 1; then
        check "the shipped haproxy.cfg has the relay's server line (here with $mode)" grep -Eq "^\s*server relay 127\.0\.0\.1:$PORT $mode check port $ADMIN " "$cfg"
        check "relay check through haproxy ($mode)" "$RELAY" check "$(addr "$HAPORT")" --timeout 20
        check "relay ping through haproxy ($mode)" bash -c "set -o pipefail; '$RELAY' ping '$(addr "$HAPORT")' --count 2 | grep -q pong"
    else
        fail "haproxy ($mode) starts"; cat "$E2E_TMP/haproxy-$mode.log"
    fi
    stop "$HAPID"
done
check "haproxy's connections were never refused for their PROXY header" [ "$(metric "$REJECTED")" = "$before" ]

# stunnel: outer TLS on the server side (PROXY v1 to the relay), client mode on the other side.
if command -v stunnel >/dev/null 2>&1; then
    # The outer certificate (the guide makes it with openssl; python3-cryptography is what CI has).
    python3 - "$E2E_TMP" <<'PY'
import datetime, sys
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
key = ec.generate_private_key(ec.SECP256R1())
name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay.example.com")])
now = datetime.datetime.now(datetime.timezone.utc)
cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("relay.example.com")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256()))
crt = cert.public_bytes(serialization.Encoding.PEM)
pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
open(sys.argv[1] + "/outer.crt", "wb").write(crt)
open(sys.argv[1] + "/outer.pem", "wb").write(pem + crt)
PY
    SPORT=$(free_port); CPORT=$(free_port)
    { echo "pid = $E2E_TMP/stunnel-server.pid"
      sed -e "s/^accept = 443$/accept = 127.0.0.1:$SPORT/" \
          -e "s/127\.0\.0\.1:5223/127.0.0.1:$PORT/" \
          -e "s|/etc/stunnel/relay-outer.pem|$E2E_TMP/outer.pem|" \
          "$PROXIES/stunnel/stunnel-server.conf"; } >"$E2E_TMP/stunnel-server.conf"
    { echo "pid = $E2E_TMP/stunnel-client.pid"
      sed -e "s/127\.0\.0\.1:5224/127.0.0.1:$CPORT/" \
          -e "s/relay\.example\.com:443/127.0.0.1:$SPORT/" \
          -e "s|/etc/stunnel/relay-outer.crt|$E2E_TMP/outer.crt|" \
          "$PROXIES/stunnel/stunnel-client.conf"; } >"$E2E_TMP/stunnel-client.conf"
    stunnel "$E2E_TMP/stunnel-server.conf" >"$E2E_TMP/stunnel-server.log" 2>&1 &
    SSPID=$!; E2E_PIDS+=("$SSPID")
    stunnel "$E2E_TMP/stunnel-client.conf" >"$E2E_TMP/stunnel-client.log" 2>&1 &
    SCPID=$!; E2E_PIDS+=("$SCPID")
    if wait_for_port "$SPORT" && wait_for_port "$CPORT"; then
        check "relay check through stunnel (client mode, outer TLS, PROXY v1 to the relay)" \
            "$RELAY" check "$(addr "$CPORT")" --timeout 20
        check "stunnel's connections were never refused for their header" [ "$(metric "$REJECTED")" = "$before" ]
        check "the outer layer is TLS with the pinned outer certificate" python3 -c "
import socket, ssl, sys
ctx = ssl.create_default_context(cafile='$E2E_TMP/outer.crt')
with socket.create_connection(('127.0.0.1', $SPORT), timeout=10) as raw, ctx.wrap_socket(raw, server_hostname='relay.example.com') as tls:
    sys.exit(0 if tls.version() else 1)"
    else
        fail "stunnel starts"; cat "$E2E_TMP/stunnel-server.log" "$E2E_TMP/stunnel-client.log"
    fi
    stop "$SCPID"; stop "$SSPID"
else
    fail "stunnel is installed (apt-get install stunnel4)"
fi

stop_relay "$RELAY_PID" TERM
cp "$E2E_TMP/relay.log" "$E2E_TMP/relay-proxy-protocol.log"

# shadowsocks-libev cannot send a PROXY header: the relay runs without --proxy-protocol and with the
# per-source limits off (as packaging/proxies/README.md says), on loopback
# only, and ss-server is what the internet sees. The client asks ss-server (through ss-local) for the
# relay's loopback address.
if ! start_relay relay "$DATA" "$PORT" "$ADMIN" --host relay.test --max-connections-per-source 0 --queue-creation-rate 0 --key-agreement-rate 0; then
    fail "relay starts without --proxy-protocol"; cat "$E2E_TMP/relay.log"; finish; exit 1
fi
check "shipped shadowsocks configs are valid JSON" python3 -c "import json, sys; [json.load(open(f)) for f in sys.argv[1:]]" \
    "$PROXIES/shadowsocks/ss-server.json" "$PROXIES/shadowsocks/ss-local.json"
SSPORT=$(free_port); SLPORT=$(free_port)
PASSWORD=$(head -c 18 /dev/urandom | base64)
python3 - "$PROXIES/shadowsocks" "$E2E_TMP" "$SSPORT" "$SLPORT" "$PASSWORD" <<'PY'
import json, sys
src, out, ss_port, local_port, password = sys.argv[1:]
server = json.load(open(f"{src}/ss-server.json"))
server.update(server="127.0.0.1", server_port=int(ss_port), password=password)
json.dump(server, open(f"{out}/ss-server.json", "w"))
local = json.load(open(f"{src}/ss-local.json"))
local.update(server="127.0.0.1", server_port=int(ss_port), local_port=int(local_port), password=password)
json.dump(local, open(f"{out}/ss-local.json", "w"))
PY
ss-server -c "$E2E_TMP/ss-server.json" >"$E2E_TMP/ss-server.log" 2>&1 &
SSSPID=$!; E2E_PIDS+=("$SSSPID")
ss-local -c "$E2E_TMP/ss-local.json" >"$E2E_TMP/ss-local.log" 2>&1 &
SSLPID=$!; E2E_PIDS+=("$SSLPID")
if wait_for_port "$SSPORT" && wait_for_port "$SLPORT"; then
    check "relay check through ss-local + ss-server (chacha20-ietf-poly1305)" \
        "$RELAY" check "$(addr "$PORT")" --socks "127.0.0.1:$SLPORT" --timeout 20
    sed -i "s|\"password\": *\"[^\"]*\"|\"password\": \"wrong-password\"|" "$E2E_TMP/ss-local.json"
    stop "$SSLPID"
    ss-local -c "$E2E_TMP/ss-local.json" >"$E2E_TMP/ss-local-wrong.log" 2>&1 &
    SSLPID=$!; E2E_PIDS+=("$SSLPID")
    if wait_for_port "$SLPORT"; then
        check "through ss-local with a wrong password the check fails" \
            bash -c "'$RELAY' check '$(addr "$PORT")' --socks 127.0.0.1:$SLPORT --timeout 5 >/dev/null 2>&1; [ \$? = 1 ]"
    else
        fail "ss-local restarts with the wrong password"
    fi
else
    fail "ss-server and ss-local start"; cat "$E2E_TMP/ss-server.log" "$E2E_TMP/ss-local.log"
fi
stop "$SSLPID"; stop "$SSSPID"
stop_relay "$RELAY_PID" TERM

check "the relay's output names no IP address (127.0.0.1)" bash -c \
    "[ -s '$E2E_TMP/relay-proxy-protocol.log' ] && [ -s '$E2E_TMP/relay.log' ]; [ \$? = 0 ] || exit 1; grep -qF 127.0.0.1 '$E2E_TMP/relay-proxy-protocol.log' '$E2E_TMP/relay.log'; [ \$? = 1 ]"
check "the relay's output names no IPv6 loopback or proxy source" bash -c \
    "grep -qE '::1|::ffff:' '$E2E_TMP/relay-proxy-protocol.log' '$E2E_TMP/relay.log'; [ \$? = 1 ]"

finish
