#!/usr/bin/env bash
# End-to-end checks of backups against the published binary: POST /admin/backup while a
# conversation is open; the relay goes on (a restart, a message carried), then its data directory is
# lost and it is started from the backup: the same address, the conversation goes on, and a message
# sent after the restore arrives (its id is above the ones the lost relay gave after the backup; a
# client drops a message whose id is not). Also: the backup's modes, the token, the metric and log
# lines, a backup that fails; `relay backup` of a stopped relay (refused while it runs), the
# backups it keeps, and a relay started from one.
source "$(dirname "$0")/lib.sh"
expect_checks 37

TOKEN=e2e-admin-token-$(python3 -c 'import secrets; print(secrets.token_hex(12))')
DATA=$E2E_TMP/relay
PORT=$(free_port); ADMIN=$(free_port)
"$RELAY" init --data "$DATA" --host relay.test >/dev/null 2>&1
ADDR=$("$RELAY" address --data "$DATA" --host 127.0.0.1 --port "$PORT")
if ! start_relay relay "$DATA" "$PORT" "$ADMIN" --host relay.test --admin-token "$TOKEN"; then
    fail "relay starts"; cat "$E2E_TMP/relay.log"; finish; exit 1
fi
A=$E2E_TMP/alice; B=$E2E_TMP/bob
listen_once() { "$RELAY" listen --profile "$1" --once --timeout 10; }
admin_post() { curl -sS -o "$2" -w '%{http_code}' -X POST -H "Authorization: Bearer $1" "http://127.0.0.1:$ADMIN/admin/backup"; }
export -f listen_once admin_post; export RELAY ADMIN

LINK=$("$RELAY" invite --profile "$A" --relay "$ADDR" --name bob 2>/dev/null)
"$RELAY" join "$LINK" --profile "$B" --name alice >/dev/null
check "a conversation opens" bash -c "'$RELAY' listen --profile '$A' --timeout 3 | grep -qx '\* bob joined'"
"$RELAY" send --profile "$B" --to alice "one" >/dev/null
check "a message before the backup arrives" bash -c "[ \"\$(listen_once '$A')\" = 'bob: one' ]"

# The backup, while the relay serves.
check "POST /admin/backup without the token: 401" bash -c "[ \"\$(admin_post wrong-token-0123456789 '$E2E_TMP/denied.json')\" = 401 ]"
check "POST /admin/backup: 200" bash -c "[ \"\$(admin_post '$TOKEN' '$E2E_TMP/backup.json')\" = 200 ]"
BACKUP=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['path'])" "$E2E_TMP/backup.json" 2>/dev/null)
check "the answer names a directory under DATA/backups, its files and bytes" python3 - "$E2E_TMP/backup.json" "$DATA/backups" <<'PY'
import json, os, sys
made = json.load(open(sys.argv[1]))
assert os.path.dirname(made["path"]) == os.path.realpath(sys.argv[2]), made
assert os.path.isdir(made["path"]) and made["files"] > 3 and made["bytes"] > 0 and made["seconds"] >= 0, made
assert made["removed"] == [], made
PY
check "the backup holds identity.pfx (0600) and queues/, in a directory of mode 0700" bash -c "
    [ \"\$(stat -c %a '$BACKUP')\" = 700 ] && [ \"\$(stat -c %a '$BACKUP/identity.pfx')\" = 600 ] &&
    cmp -s '$BACKUP/identity.pfx' '$DATA/identity.pfx' && [ -f '$BACKUP/queues/CURRENT' ]"
check "relay_backups_total{result=\"ok\"} 1, the time of the last one" bash -c "
    m=\$(curl -fsS http://127.0.0.1:$ADMIN/metrics) &&
    echo \"\$m\" | grep -qx 'relay_backups_total{result=\"ok\"} 1' &&
    echo \"\$m\" | grep -qx 'relay_backups_total{result=\"failed\"} 0' &&
    t=\$(echo \"\$m\" | sed -n 's/^relay_backup_last_success_timestamp_seconds //p') && [ \"\${t%.*}\" -gt \$((\$(date +%s) - 300)) ]"
check "log event 35 names the backup" grep -q "Relay\[35\].*Backup made in $BACKUP" "$E2E_TMP/relay.log"
check "a second backup gets a directory of its own" bash -c "[ \"\$(admin_post '$TOKEN' '$E2E_TMP/backup2.json')\" = 200 ] && [ \$(ls '$DATA/backups' | wc -l) = 2 ]"

# The relay goes on after the backup: a restart (a new id epoch) and a message carried in it.
check "the relay stops on SIGTERM" stop_relay "$RELAY_PID"
if ! start_relay relay2 "$DATA" "$PORT" "$ADMIN" --host relay.test --admin-token "$TOKEN"; then
    fail "relay starts again"; cat "$E2E_TMP/relay2.log"; finish; exit 1
fi
newest_backup_time() { python3 -c "import os,sys,datetime; n=max(os.listdir(sys.argv[1])); print(int(datetime.datetime.strptime(n.split('-')[0], '%Y%m%dT%H%M%SZ').replace(tzinfo=datetime.timezone.utc).timestamp()))" "$1"; }
check "after the restart relay_backup_last_success_timestamp_seconds is the newest backup's time" bash -c "
    curl -fsS http://127.0.0.1:$ADMIN/metrics | grep -qx \"relay_backup_last_success_timestamp_seconds $(newest_backup_time "$DATA/backups")\""
"$RELAY" send --profile "$B" --to alice "two" >/dev/null
check "a message after the backup arrives" bash -c "[ \"\$(listen_once '$A')\" = 'bob: two' ]"

# The disk is lost: the relay is started from the first backup, copied to a new data directory.
kill -9 "$RELAY_PID"; wait "$RELAY_PID" 2>/dev/null
RESTORED=$E2E_TMP/restored
cp -a "$BACKUP" "$RESTORED"
mv "$DATA" "$E2E_TMP/lost"
check "the restored data directory has the relay's address" bash -c "[ \"\$('$RELAY' address --data '$RESTORED' --host 127.0.0.1 --port $PORT)\" = '$ADDR' ]"
touch "$E2E_TMP/not-a-directory"
if ! start_relay restored "$RESTORED" "$PORT" "$ADMIN" --host relay.test --admin-token "$TOKEN" --backup-dir "$E2E_TMP/not-a-directory/backups"; then
    fail "the relay starts from the backup"; cat "$E2E_TMP/restored.log"; finish; exit 1
fi
check "relay check passes against the restored relay" "$RELAY" check "$ADDR"
"$RELAY" send --profile "$B" --to alice "three" >/dev/null
check "a message sent after the restore arrives (not taken for one received before)" bash -c "[ \"\$(listen_once '$A')\" = 'bob: three' ]"
"$RELAY" send --profile "$A" --to bob "four" >/dev/null
check "and the reply" bash -c "[ \"\$(listen_once '$B')\" = 'alice: four' ]"
check "nothing else is waiting for either" bash -c "! '$RELAY' listen --profile '$A' --once --timeout 2 >/dev/null 2>&1 && ! '$RELAY' listen --profile '$B' --once --timeout 2 >/dev/null 2>&1"
check "the restored relay logged no error" bash -c "! grep -Eq 'fail:|crit:' '$E2E_TMP/restored.log'"

# A backup that cannot be made (its directory would be under a file): 500 with the reason, a metric,
# event 36, nothing left, and the relay goes on.
check "a backup that fails: 500 with the reason" bash -c "[ \"\$(admin_post '$TOKEN' '$E2E_TMP/failed.json')\" = 500 ] && grep -q '\"error\": \"backup failed: ' '$E2E_TMP/failed.json'"
check "relay_backups_total{result=\"failed\"} 1" bash -c "curl -fsS http://127.0.0.1:$ADMIN/metrics | grep -qx 'relay_backups_total{result=\"failed\"} 1'"
check "log event 36 says why" grep -q "Relay\[36\].*Backup failed" "$E2E_TMP/restored.log"
check "the file in the way is as it was" bash -c "[ -f '$E2E_TMP/not-a-directory' ] && [ ! -s '$E2E_TMP/not-a-directory' ]"
check "the relay goes on after it" "$RELAY" check "$ADDR"
check "the relay stops cleanly" stop_relay "$RELAY_PID"

# relay backup: the restored relay, stopped, backed up by the command (its settings from RELAY_*
# as relay serve takes them), the oldest removed beyond --backup-keep, refused while the relay runs.
COLD=$E2E_TMP/cold
RELAY_BACKUP_DIR=$COLD "$RELAY" backup --data "$RESTORED" --backup-keep 2 > "$E2E_TMP/cold1.out" 2> "$E2E_TMP/cold1.err"
check "relay backup of a stopped relay exits 0 and prints the backup's path" bash -c "
    [ \"\$(dirname \"\$(cat '$E2E_TMP/cold1.out')\")\" = '$COLD' ] && grep -q 'Backup made in' '$E2E_TMP/cold1.err'"
COLD1=$(cat "$E2E_TMP/cold1.out")
check "it holds identity.pfx (0600) and queues/" bash -c "[ \"\$(stat -c %a '$COLD1/identity.pfx')\" = 600 ] && [ -f '$COLD1/queues/CURRENT' ] && cmp -s '$COLD1/identity.pfx' '$RESTORED/identity.pfx'"
"$RELAY" backup --data "$RESTORED" --backup-dir "$COLD" --backup-keep 2 > "$E2E_TMP/cold2.out" 2>&1
"$RELAY" backup --data "$RESTORED" --backup-dir "$COLD" --backup-keep 2 > "$E2E_TMP/cold3.out" 2> "$E2E_TMP/cold3.err"
check "--backup-keep 2: the third backup removes the first, and says so" bash -c "
    [ \$(ls '$COLD' | wc -l) = 2 ] && [ ! -e '$COLD1' ] && grep -qF 'Backup removed (--backup-keep 2): $COLD1' '$E2E_TMP/cold3.err'"
if ! start_relay restored2 "$RESTORED" "$PORT" "$ADMIN" --host relay.test; then
    fail "the restored relay starts again"; cat "$E2E_TMP/restored2.log"; finish; exit 1
fi
"$RELAY" backup --data "$RESTORED" --backup-dir "$COLD" > "$E2E_TMP/running.out" 2> "$E2E_TMP/running.err"; RC=$?
check "relay backup of a running relay: exit 1, one line saying to use POST /admin/backup" bash -c "
    [ $RC = 1 ] && [ ! -s '$E2E_TMP/running.out' ] && [ \$(wc -l < '$E2E_TMP/running.err') = 1 ] &&
    grep -q '^relay: backup failed: the relay in .* is running, or another relay backup has its store open .*POST /admin/backup' '$E2E_TMP/running.err'"
check "and makes nothing" bash -c "[ \$(ls '$COLD' | wc -l) = 2 ]"
check "the relay it refused goes on" "$RELAY" check "$ADDR"
"$RELAY" send --profile "$B" --to alice "five" >/dev/null
check "a message taken before the relay stops" bash -c "[ \"\$(listen_once '$A')\" = 'bob: five' ]"
check "the relay stops" stop_relay "$RELAY_PID"
mkdir -p "$E2E_TMP/empty"
"$RELAY" backup --data "$E2E_TMP/empty" > /dev/null 2> "$E2E_TMP/empty.err"; RC=$?
check "relay backup where there is no relay: exit 1, says so" bash -c "[ $RC = 1 ] && grep -q 'no relay identity in' '$E2E_TMP/empty.err' && [ -z \"\$(ls -A '$E2E_TMP/empty')\" ]"

# Run as root on the data directory of another user (a service user, systemd's dynamic user), relay
# backup acts as that user: every file it makes there belongs to the relay, which starts after it.
OWNED=$E2E_TMP/owned
cp -a "$RESTORED" "$OWNED"
chmod o+x "$E2E_TMP"
if [ "$(id -u)" = 0 ] && chown -R 65534:65534 "$OWNED"; then
    "$RELAY" backup --data "$OWNED" > "$E2E_TMP/owned.out" 2> "$E2E_TMP/owned.err"; RC=$?
    check "relay backup as root on a directory of uid 65534: every file it made there is that user's" bash -c "
        [ $RC = 0 ] && grep -q 'acting as the owner of $OWNED (uid 65534)' '$E2E_TMP/owned.err' &&
        [ -f \"\$(cat '$E2E_TMP/owned.out')/queues/CURRENT\" ] && [ -z \"\$(find '$OWNED' ! -uid 65534 -o ! -gid 65534)\" ]"
    setpriv --reuid=65534 --regid=65534 --clear-groups "$RELAY" serve --data "$OWNED" --listen "127.0.0.1:$PORT" \
        --admin "127.0.0.1:$ADMIN" --host relay.test > "$E2E_TMP/owned.log" 2>&1 &
    RELAY_PID=$!; E2E_PIDS+=("$RELAY_PID")
    wait_for_http "http://127.0.0.1:$ADMIN/readyz" 30
    check "the relay, run as that user, starts after it and works" bash -c "'$RELAY' check '$ADDR' >/dev/null && ! grep -Eq 'fail:|crit:' '$E2E_TMP/owned.log'"
    stop_relay "$RELAY_PID"
else
    fail "relay backup of another user's data directory (needs root, as CI runs the checks)"
    fail "the relay, run as that user, starts after it (needs root)"
fi

# A relay started from the newest backup of the command: the same address, and the conversation goes on.
COLD3=$(cat "$E2E_TMP/cold3.out")
cp -a "$COLD3" "$E2E_TMP/from-cold"
if ! start_relay from-cold "$E2E_TMP/from-cold" "$PORT" "$ADMIN" --host relay.test; then
    fail "a relay starts from relay backup's backup"; cat "$E2E_TMP/from-cold.log"; finish; exit 1
fi
"$RELAY" send --profile "$B" --to alice "six" >/dev/null
check "started from relay backup's backup, a new message arrives" bash -c "[ \"\$(listen_once '$A')\" = 'bob: six' ]"
stop_relay "$RELAY_PID"
check "the backups hold no address of a client or the relay" bash -c "! grep -rlaF '127.0.0.1' '$E2E_TMP/lost/backups' '$RESTORED' '$COLD'"

finish
