#!/usr/bin/env bash
# Interoperability: a Python client written from docs/PROTOCOL.md alone (relay_client.py) runs the
# whole queue lifecycle against the published relay binary ($RELAY), over TLS with a pinned
# fingerprint and over plain TCP; its end-to-end layer (e2e_layer.py, §11) then holds conversations
# with the C# SDK through the `relay` command line (invite, join, send, listen), each side inviting
# once. Ends with "e2e total: N passed, N failed".
# Needs /usr/bin/python3 with python3-cryptography (Debian). TRANSCRIPT_OUT=FILE keeps the annotated
# hex transcript of one exchange of each command (docs/PROTOCOL.md Appendix A is made from it).
HERE=$(cd "$(dirname "$0")" && pwd)
source "$HERE/../e2e/lib.sh"
expect_checks 138
export PYTHONDONTWRITEBYTECODE=1

PY=${PYTHON:-}
if [ -z "$PY" ]; then
    for candidate in /usr/bin/python3 python3; do
        if "$candidate" -c 'import cryptography' 2>/dev/null; then PY=$candidate; break; fi
    done
fi
if [ -z "$PY" ]; then
    fail "python3 with the cryptography package (apt-get install python3-cryptography)"
    finish; exit
fi

# run_client NAME ADDRESS [lifecycle args...]: one PASS/FAIL per check of the Python client.
# SCRIPT=conversation.py runs the end-to-end conversations instead of the queue lifecycle.
run_client() {
    local name=$1 address=$2; shift 2
    local out=$E2E_TMP/$name.out rc=0
    (cd "$HERE" && timeout 180 "$PY" "${SCRIPT:-lifecycle.py}" "$address" "$@") >"$out" 2>&1 || rc=$?
    while IFS= read -r line; do
        case "$line" in
            "PASS "*) pass "$name: ${line#PASS }" ;;
            "FAIL "*) fail "$name: ${line#FAIL }" ;;
        esac
    done <"$out"
    if [ "$rc" -ne 0 ] && ! grep -q '^FAIL ' "$out"; then
        fail "$name: the client exited $rc"; cat "$out"
    fi
}

relay_address() {  # relay_address LOGFILE: the address from the "Relay ready at" line
    grep -Eo 'Relay ready at relay://[^ ]+' "$1" | tail -1 | sed 's/^Relay ready at //'
}

# TLS (the default), fingerprint pinned by the Python client.
PORT=$(free_port); ADMIN=$(free_port)
if start_relay tls "$E2E_TMP/tls" "$PORT" "$ADMIN"; then
    ADDRESS=$(relay_address "$E2E_TMP/tls.log")
    check "tls: the ready line carries the address" test -n "$ADDRESS"
    check "tls: relay address matches 'relay address'" \
        test "$ADDRESS" = "$("$RELAY" address --data "$E2E_TMP/tls" --host 127.0.0.1 --port "$PORT")"
    run_client tls "$ADDRESS"
    check "tls: SIGTERM exits 0 after the Python client" stop_relay "$RELAY_PID" TERM
else
    fail "tls: relay becomes ready"; cat "$E2E_TMP/tls.log"
fi

# Plain TCP (--plain-tcp): the same bytes without TLS, and the annotated transcript.
PORT=$(free_port); ADMIN=$(free_port)
if start_relay plain "$E2E_TMP/plain" "$PORT" "$ADMIN" --plain-tcp; then
    ADDRESS=$(relay_address "$E2E_TMP/plain.log")
    run_client plain "$ADDRESS" --plain --transcript "$E2E_TMP/transcript.txt"
    check "plain: the transcript recomputes (lengths, MACs, deliveries)" \
        bash -c "cd '$HERE' && '$PY' verify_transcript.py '$E2E_TMP/transcript.txt' >/dev/null"
    if [ -n "${TRANSCRIPT_OUT:-}" ] && [ -s "$E2E_TMP/transcript.txt" ]; then cp "$E2E_TMP/transcript.txt" "$TRANSCRIPT_OUT"; fi
    # §11 both ways: Python invites and the CLI joins, then the CLI invites and Python joins.
    mkdir -p "$E2E_TMP/profiles"
    SCRIPT=conversation.py run_client e2e "$ADDRESS" --plain --relay-bin "$RELAY" --dir "$E2E_TMP/profiles"
    check "plain: SIGTERM exits 0 after the Python client" stop_relay "$RELAY_PID" TERM
else
    fail "plain: relay becomes ready"; cat "$E2E_TMP/plain.log"
fi

# The transcript in docs/PROTOCOL.md Appendix A is recomputable from the keys printed beside it.
check "PROTOCOL.md Appendix A recomputes (lengths, MACs, deliveries)" \
    bash -c "grep -q '^## Appendix A' '$HERE/../../docs/PROTOCOL.md' && cd '$HERE' && '$PY' verify_transcript.py ../../docs/PROTOCOL.md"

finish
