#!/usr/bin/env bash
# End-to-end check of a store that stops writing for another reason than a full disk, against the
# published binary: the store's directory made immutable (chattr +i, which stops even root from
# creating the next log file) while the relay serves. RocksDB stays in error after such a failure
# until it is opened again, so the relay answers INTERNAL, says once after --store-failure-timeout
# that it stops (event 33) and exits with 1, for systemd's Restart=on-failure to start it again;
# once the directory is writable, a start finds every acknowledged message. Needs root and a file
# system with the immutable attribute (ext4, xfs, btrfs).
source "$(dirname "$0")/lib.sh"
expect_checks 11

DATA=$E2E_TMP/data
trap 'chattr -i "$DATA/queues" 2>/dev/null; for pid in "${E2E_PIDS[@]:-}"; do [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null; done; cleanup' EXIT
PORT=$(free_port); ADMIN=$(free_port)
if ! start_relay failing "$DATA" "$PORT" "$ADMIN" --store-failure-timeout 3s; then
    fail "relay becomes ready"; cat "$E2E_TMP/failing.log"; finish; exit 1
fi
pass "relay becomes ready"
ADDR=$("$RELAY" address --data "$DATA" --host 127.0.0.1 --port "$PORT")

P=$E2E_TMP/profiles
check "a conversation, three messages acknowledged before the store fails" bash -c "
    link=\$('$RELAY' invite --profile '$P/alice' --relay '$ADDR' --name bob) &&
    '$RELAY' join \"\$link\" --profile '$P/bob' --name alice >/dev/null &&
    '$RELAY' listen --profile '$P/alice' --timeout 3 2>/dev/null | grep -q joined &&
    for t in kept-1 kept-2 kept-3; do '$RELAY' send --profile '$P/bob' --to alice \$t || exit 1; done"

# From now on RocksDB cannot create a file in its directory: its next log file (a memtable
# switch, which 24 MB of messages bring about) fails with EPERM, and every write after it.
check "the store's directory is made immutable" chattr +i "$DATA/queues"
"$RELAY" bench "$ADDR" --scenario drain --messages 6000 --size 4096 --queues 64 --producers 1 --consumers 1 >"$E2E_TMP/bench.out" 2>&1
check "a sender meeting the failed store hears INTERNAL (nothing stored)" grep -q "refused SEND: INTERNAL" "$E2E_TMP/bench.out"

exited=124
deadline=$((SECONDS + 30))
while kill -0 "$RELAY_PID" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
if ! kill -0 "$RELAY_PID" 2>/dev/null; then exited=0; wait "$RELAY_PID" || exited=$?; fi
check "the relay exits by itself with 1 after --store-failure-timeout (exit $exited)" test "$exited" = 1
check "its log says why, once (event 33, naming RocksDB's error)" bash -c "
    [ \$(grep -c 'Relay\[33\].*failed every write for [0-9]* s, and not for a full disk (RocksDB: IO error: .*Operation not permitted)' '$E2E_TMP/failing.log') = 1 ]"
check "and each command's refusal (event 20) names it too" bash -c "
    grep -q 'Relay\[20\] Store operation SEND failed' '$E2E_TMP/failing.log' &&
    ! grep 'Relay\[20\]' '$E2E_TMP/failing.log' | grep -v -q 'Operation not permitted' ||
    { echo 'its event 20 lines:'; grep 'Relay\[20\]' '$E2E_TMP/failing.log' | head -5; false; }"

# The service manager would start it again at once; it starts as soon as the directory is writable.
chattr -i "$DATA/queues"
if ! start_relay again "$DATA" "$PORT" "$ADMIN"; then
    fail "relay starts again once the directory is writable"; cat "$E2E_TMP/again.log"
else
    pass "relay starts again once the directory is writable"
fi
check "every message acknowledged before the failure is delivered" bash -c "
    out=\$(timeout 30 '$RELAY' listen --profile '$P/alice' --timeout 4 2>/dev/null); for i in 1 2 3; do echo \"\$out\" | grep -q \"bob: kept-\$i\" || exit 1; done"
check "relay send works again" "$RELAY" send --profile "$P/bob" --to alice after
check "SIGTERM exits 0" stop_relay "$RELAY_PID" TERM

finish
