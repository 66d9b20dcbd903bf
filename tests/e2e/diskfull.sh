#!/usr/bin/env bash
# End-to-end checks of a full disk against the published binary: the relay's data directory on a
# 64 MiB tmpfs that another file fills up (a real ENOSPC from the kernel, met by RocksDB's own
# writes). Senders hear FULL, the log says it once, a subscriber still gets what is stored and costs
# no redelivery loop, the relay writes again by itself once space returns, nothing acknowledged is
# lost (before the disk filled or after, through a crash), and a start on a full disk fails with one
# line naming the cause. Needs root (mount).
source "$(dirname "$0")/lib.sh"
expect_checks 19

MNT=$E2E_TMP/mnt
mkdir -p "$MNT"
if ! mount -t tmpfs -o size=64m relay-e2e-full "$MNT"; then
    fail "a 64 MiB tmpfs is mounted for the data directory (needs root)"; finish; exit 1
fi
pass "a 64 MiB tmpfs is mounted for the data directory"
trap 'for pid in "${E2E_PIDS[@]:-}"; do [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null; done; sleep 0.3; umount -l "$MNT"; cleanup' EXIT

DATA=$MNT/data
PORT=$(free_port); ADMIN=$(free_port)
if ! start_relay full "$DATA" "$PORT" "$ADMIN"; then
    fail "relay becomes ready"; cat "$E2E_TMP/full.log"; finish; exit 1
fi
pass "relay becomes ready"
ADDR=$("$RELAY" address --data "$DATA" --host 127.0.0.1 --port "$PORT")
metric() { curl -fsS "http://127.0.0.1:$ADMIN/metrics" | awk -v n="$1" '$1 == n { print $2 }'; }
relay_cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$RELAY_PID/stat"; }

# Two conversations: alice hears from bob while the disk is full, dave from carol only afterwards.
P=$E2E_TMP/profiles
converse() {  # converse INVITER JOINER
    local link
    link=$("$RELAY" invite --profile "$P/$1" --relay "$ADDR" --name "$2") || return 1
    "$RELAY" join "$link" --profile "$P/$2" --name "$1" >/dev/null || return 1
    "$RELAY" listen --profile "$P/$1" --timeout 3 2>/dev/null | grep -q "joined"
}
sends() {  # sends FROM TO TEXT...
    local from=$1 to=$2; shift 2
    for text in "$@"; do "$RELAY" send --profile "$P/$from" --to "$to" "$text" || return 1; done
}
check "two conversations, eight messages acknowledged before the disk fills" bash -c "$(declare -f converse sends); RELAY='$RELAY'; P='$P'; ADDR='$ADDR'
    converse alice bob && converse dave carol && sends bob alice kept-1 kept-2 kept-3 && sends carol dave stored-1 stored-2 stored-3 stored-4 stored-5"

# Another file takes the disk but 4 MiB; the relay's next memtable flush or log file meets ENOSPC.
avail=$(df --output=avail -k "$MNT" | tail -1)
dd if=/dev/zero of="$MNT/filler" bs=1k count=$((avail - 4096)) status=none
"$RELAY" bench "$ADDR" --scenario drain --messages 6000 --size 4096 --queues 64 --producers 1 --consumers 1 >"$E2E_TMP/bench.out" 2>&1
check "a sender meeting the full disk hears FULL, not INTERNAL" grep -q "refused SEND: FULL" "$E2E_TMP/bench.out"
check "relay send is refused with FULL while the disk is full, and says the message is kept" bash -c "
    out=\$('$RELAY' send --profile '$P/bob' --to alice during 2>&1); [ \$? = 1 ] && echo \"\$out\" | grep -q FULL && echo \"\$out\" | grep -q 'kept and goes out with the next'"
check "relay_store_disk_full is 1" bash -c "[ \"\$($(declare -f metric); ADMIN=$ADMIN; metric relay_store_disk_full)\" = 1 ]"
check "one log line says the disk is full, none per refused request" bash -c "
    [ \$(grep -c 'Relay\[28\].*disk is full (no space left on device)' '$E2E_TMP/full.log') = 1 ] && ! grep -q 'Relay\[20\]' '$E2E_TMP/full.log'"

# alice's ACKs cannot be written: she still gets the stored messages, and the relay does not push
# them again and again meanwhile (each push would be ACKed and fail once more).
delivered_before=$(metric relay_deliveries_total)
check "a subscriber gets the stored messages while the disk is full" bash -c "
    out=\$(timeout 30 '$RELAY' listen --profile '$P/alice' --timeout 4 2>/dev/null); echo \"\$out\" | grep -q 'bob: kept-1' && echo \"\$out\" | grep -q 'bob: kept-3'"
delivered=$(( $(metric relay_deliveries_total) - delivered_before ))
check "its failing ACKs cause no redelivery loop ($delivered deliveries for 3 stored messages)" bash -c "[ $delivered -ge 3 ] && [ $delivered -le 8 ]"
check "the relay stays healthy" bash -c "[ \$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:$ADMIN/healthz) = 200 ]"

# Space returns: RocksDB resumes once a memtable's worth is free (it looks every 5 s); the relay
# notices within a second, with no restart and no operator action.
rm -f "$MNT/filler"
wait_not_full() {
    local deadline=$((SECONDS + 30))
    while [ $SECONDS -lt $deadline ]; do
        [ "$(metric relay_store_disk_full)" = 0 ] && grep -q 'Relay\[29\]' "$E2E_TMP/full.log" && return 0
        sleep 0.5
    done
    return 1
}
check "the relay writes again by itself once space returns (gauge 0, log event 29)" wait_not_full
check "relay send works again" sends bob alice after
check "the receiver gets the kept message once, then the one sent after" bash -c "
    out=\$(timeout 30 '$RELAY' listen --profile '$P/alice' --timeout 4 2>/dev/null); echo \"\$out\"
    [ \"\$(echo \"\$out\" | grep -c 'bob: during')\" = 1 ] && echo \"\$out\" | grep -A1 'bob: during' | grep -q 'bob: after'"

# One more message acknowledged after the relay resumed, then a crash: the log written after the
# failed writes must replay (RocksDB switches to a new log file when it resumes).
check "a message sent after space returned is acknowledged" sends carol dave stored-6
kill -9 "$RELAY_PID"; wait "$RELAY_PID" 2>/dev/null

# Nothing acknowledged was lost: after the full disk, its failed writes and a crash, dave gets all
# six of carol's messages.
if ! start_relay full2 "$DATA" "$PORT" "$ADMIN"; then
    fail "relay starts again after the crash"; cat "$E2E_TMP/full2.log"
else
    pass "relay starts again after the crash"
fi
check "every message acknowledged before the disk filled and after is delivered" bash -c "
    out=\$(timeout 30 '$RELAY' listen --profile '$P/dave' --timeout 4 2>/dev/null); for i in 1 2 3 4 5 6; do echo \"\$out\" | grep -q \"carol: stored-\$i\" || exit 1; done"

# Stopped, and started on a disk that is full to the last block: one line naming the cause (after a
# crash a start can succeed, as RocksDB first gives back the space its log had reserved).
check "SIGTERM exits 0" stop_relay "$RELAY_PID" TERM
dd if=/dev/zero of="$MNT/filler" bs=4k status=none 2>/dev/null
check "a start on a full disk exits 2 naming the cause" bash -c "
    out=\$(timeout 30 '$RELAY' serve --data '$DATA' --listen 127.0.0.1:$PORT --admin 127.0.0.1:$ADMIN 2>&1 >/dev/null); rc=\$?
    echo \"\$out\" | tail -2; [ \$rc = 2 ] && echo \"\$out\" | grep -q 'No space left on device'"
rm -f "$MNT/filler"
check "and starts once space is free" start_relay full3 "$DATA" "$PORT" "$ADMIN"
stop_relay "$RELAY_PID" TERM >/dev/null

finish
