#!/usr/bin/env bash
# End-to-end checks of the release packaging against the published binary: the one file needs only
# system libraries (RocksDB is linked in), runs alone in an empty directory, the .deb builds with
# the expected files and metadata and its binary and default configuration work, the systemd unit
# verifies and the relay really notifies systemd when ready, the Dockerfile builds with the script.
source "$(dirname "$0")/lib.sh"
expect_checks 43
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
VERSION=$(tr -d ' \n' < "$ROOT/packaging/VERSION")

# start_bin NAME BIN DATA PORT ADMIN [serve args...]: like start_relay, for another binary; the
# process runs in $E2E_TMP/NAME.cwd (an empty directory).
start_bin() {
    local name=$1 bin=$2 data=$3 port=$4 admin=$5; shift 5
    mkdir -p "$E2E_TMP/$name.cwd"
    (cd "$E2E_TMP/$name.cwd" && exec "$bin" serve --data "$data" --listen "127.0.0.1:$port" --admin "127.0.0.1:$admin" "$@") \
        >"$E2E_TMP/$name.log" 2>&1 &
    RELAY_PID=$!
    E2E_PIDS+=("$RELAY_PID")
    wait_for_http "http://127.0.0.1:$admin/readyz" 30
}

# --- the one file -------------------------------------------------------------------------------
only_system_libs() {
    local needed
    needed=$(readelf -d "$RELAY" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')
    [ -n "$needed" ] || return 1
    for lib in $needed; do
        case "$lib" in
            libc.so.*|libm.so.*|libdl.so.*|libpthread.so.*|librt.so.*|ld-linux*) ;;
            *) echo "needs $lib"; return 1 ;;
        esac
    done
}
check "binary links only glibc dynamically (readelf NEEDED)" only_system_libs
check "ldd shows no librocksdb, libstdc++ or other non-system library" bash -c \
    "ldd '$RELAY' > '$E2E_TMP/ldd' && ! grep -Ev 'linux-vdso|libc\.so|libm\.so|libdl\.so|libpthread\.so|librt\.so|ld-linux' '$E2E_TMP/ldd' | grep -q ."
check "RocksDB is inside the binary (its code, not only P/Invoke names)" grep -qa 'Options.max_open_files' "$RELAY"
# packaging/rocksdb/build-rocksdb.sh: a release build. Debian's librocksdb.a keeps RocksDB's
# assertions (their texts are in the binary) and CRC32C in software, about a tenth of the relay's CPU.
check "RocksDB is a release build (no assertion of its skip list in the binary)" bash -c "! grep -qa 'splice->prev_' '$RELAY'"
check "RocksDB computes CRC32C with SSE4.2 (crc32 instructions in the binary)" bash -c "objdump -d --no-show-raw-insn '$RELAY' | grep -qE '\\scrc32q\\s'"

# build-rocksdb.sh's failures: one line naming the cause, exit 1, nothing kept that the next run
# would trust (no build is started, so these take a second).
BUILD_ROCKSDB=$ROOT/packaging/rocksdb/build-rocksdb.sh
rocksdb_unreachable_mirror() {
    local out rc=0
    out=$(DEBIAN_MIRROR=http://127.0.0.1:9 bash "$BUILD_ROCKSDB" "$E2E_TMP/rocksdb-a" 2>&1) || rc=$?
    [ "$rc" = 1 ] && echo "$out" | grep -q 'cannot fetch the RocksDB source from http://127.0.0.1:9 (set DEBIAN_MIRROR)' \
        && [ -z "$(ls -A "$E2E_TMP/rocksdb-a")" ]
}
check "build-rocksdb.sh: an unreachable mirror is a one-line error naming DEBIAN_MIRROR" rocksdb_unreachable_mirror
rocksdb_wrong_source() {
    local mirror=$E2E_TMP/mirror port out rc=0
    mkdir -p "$mirror/pool/main/r/rocksdb"
    echo 'not the RocksDB source' > "$mirror/pool/main/r/rocksdb/rocksdb_7.8.3.orig.tar.gz"
    port=$(free_port)
    python3 -m http.server "$port" --bind 127.0.0.1 --directory "$mirror" >/dev/null 2>&1 &
    local server=$!
    wait_for_http "http://127.0.0.1:$port/" 10 || { kill "$server"; return 1; }
    out=$(DEBIAN_MIRROR=http://127.0.0.1:$port bash "$BUILD_ROCKSDB" "$E2E_TMP/rocksdb-b" 2>&1) || rc=$?
    kill "$server"; wait "$server" 2>/dev/null || true
    [ "$rc" = 1 ] && echo "$out" | grep -q "does not match Debian's SHA-256" && [ -z "$(ls -A "$E2E_TMP/rocksdb-b")" ]
}
check "build-rocksdb.sh: a source that does not match Debian's SHA-256 is refused and not kept" rocksdb_wrong_source

ALONE=$E2E_TMP/alone
mkdir -p "$ALONE"
cp "$RELAY" "$ALONE/relay"
check "binary alone in an empty directory: init" bash -c "cd '$ALONE' && env -u LD_LIBRARY_PATH ./relay init --data '$ALONE/data' 2>/dev/null | grep -q '^relay://'"
PORT=$(free_port); ADMIN=$(free_port)
# LD_DEBUG=libs logs every library the dynamic loader looks up, dlopen() included.
if LD_DEBUG=libs start_bin alone "$ALONE/relay" "$ALONE/data" "$PORT" "$ADMIN"; then
    pass "binary alone in an empty directory: serve reaches /readyz"
    check "the binary puts nothing beside itself (only relay and its data directory)" bash -c "[ \"\$(ls -A '$ALONE' | tr '\n' ' ')\" = 'data relay ' ]"
    check "serve loads no librocksdb*.so (not even the system's)" bash -c "grep -q 'find library=libc.so' '$E2E_TMP/alone.log' && ! grep -q 'rocksdb' '$E2E_TMP/alone.log'"
    check "binary alone: SIGTERM exits 0" stop_relay "$RELAY_PID" TERM
else
    fail "binary alone in an empty directory: serve reaches /readyz"; cat "$E2E_TMP/alone.log"
fi

# sd_notify: with NOTIFY_SOCKET set, serve sends READY=1 once ready (relay.service is Type=notify).
notify_ready() {
    local sock=$E2E_TMP/notify.sock port admin pid rc=0
    port=$(free_port); admin=$(free_port)
    python3 - "$sock" > "$E2E_TMP/notify.out" <<'PY' &
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.bind(sys.argv[1]); s.settimeout(30)
print(s.recv(4096).decode(), flush=True)
PY
    local listener=$!
    E2E_PIDS+=("$listener")
    for _ in $(seq 50); do [ -S "$sock" ] && break; sleep 0.1; done
    NOTIFY_SOCKET=$sock start_bin notify "$RELAY" "$ALONE/data" "$port" "$admin" || rc=1
    pid=$RELAY_PID
    wait "$listener" || rc=1
    grep -q 'READY=1' "$E2E_TMP/notify.out" || rc=1
    stop_relay "$pid" TERM || rc=1
    return $rc
}
check "serve sends READY=1 to \$NOTIFY_SOCKET" notify_ready

# --- the .deb -----------------------------------------------------------------------------------
DEBDIR=$E2E_TMP/deb
DEB=$DEBDIR/relay_${VERSION}_amd64.deb
check ".deb builds (packaging/deb/build-deb.sh)" bash -c "RELAY='$RELAY' OUT='$DEBDIR' bash '$ROOT/packaging/deb/build-deb.sh' >/dev/null && [ -f '$DEB' ]"
if [ -f "$DEB" ]; then
    dpkg-deb -c "$DEB" > "$E2E_TMP/deb.list"
    dpkg-deb -I "$DEB" > "$E2E_TMP/deb.info"
    for f in ./usr/bin/relay ./lib/systemd/system/relay.service ./etc/relay/relay.json; do
        check "dpkg-deb -c lists $f" grep -Eq " $f\$" "$E2E_TMP/deb.list"
    done
    check "dpkg-deb -c: binary is root-owned and 0755" grep -Eq '^-rwxr-xr-x root/root .* \./usr/bin/relay$' "$E2E_TMP/deb.list"
    check "dpkg-deb -c: nothing but the expected files" bash -c \
        "[ \"\$(grep -v '^d' '$E2E_TMP/deb.list' | awk '{print \$NF}' | sort | tr '\n' ' ')\" = './etc/relay/relay.json ./lib/systemd/system/relay.service ./usr/bin/relay ./usr/share/doc/relay/README.Debian ' ]"
    check "dpkg-deb -I: Package relay, Version $VERSION, Architecture amd64" bash -c \
        "[ \"\$(dpkg-deb -f '$DEB' Package Version Architecture | tr '\n' ' ')\" = 'Package: relay Version: $VERSION Architecture: amd64 ' ]"
    check "dpkg-deb -I: depends on glibc and libssl only" bash -c \
        "dpkg-deb -f '$DEB' Depends | grep -Eq '^libc6 \(>= 2\.[0-9]+\), libssl3 \| libssl1\.1$'"
    check "dpkg-deb -I: /etc/relay/relay.json is a conffile" bash -c \
        "dpkg-deb --ctrl-tarfile '$DEB' | tar -xO ./conffiles | grep -qx /etc/relay/relay.json"
    check "dpkg-deb -I: postinst, prerm and postrm are present and valid sh" bash -c \
        "grep -Eq ' postinst ' '$E2E_TMP/deb.info' && grep -Eq ' prerm ' '$E2E_TMP/deb.info' && grep -Eq ' postrm ' '$E2E_TMP/deb.info' && mkdir -p '$E2E_TMP/ctrl' && dpkg-deb -e '$DEB' '$E2E_TMP/ctrl' && for s in postinst prerm postrm; do sh -n '$E2E_TMP/ctrl/'\$s || exit 1; done && grep -q /var/lib/private '$E2E_TMP/ctrl/postinst'"

    X=$E2E_TMP/x
    dpkg-deb -x "$DEB" "$X"
    check "binary in the .deb is the release binary" cmp -s "$RELAY" "$X/usr/bin/relay"
    check "binary from the .deb: init" bash -c "'$X/usr/bin/relay' init --data '$E2E_TMP/debdata' 2>/dev/null | grep -q '^relay://'"
    PORT=$(free_port); ADMIN=$(free_port)
    if start_bin deb "$X/usr/bin/relay" "$E2E_TMP/debdata" "$PORT" "$ADMIN"; then
        pass "binary from the .deb: serve reaches /readyz"
        check "binary from the .deb: SIGTERM exits 0" stop_relay "$RELAY_PID" TERM
    else
        fail "binary from the .deb: serve reaches /readyz"; cat "$E2E_TMP/deb.log"
    fi

    # The packaged default configuration is valid: serve with it (ports overridden by flags).
    PORT=$(free_port); ADMIN=$(free_port)
    if start_bin conf "$X/usr/bin/relay" "$E2E_TMP/confdata" "$PORT" "$ADMIN" --config "$X/etc/relay/relay.json"; then
        pass "default configuration from the .deb is accepted by serve --config"
        check "serve with the default configuration: SIGTERM exits 0" stop_relay "$RELAY_PID" TERM
    else
        fail "default configuration from the .deb is accepted by serve --config"; cat "$E2E_TMP/conf.log"
    fi

    UNIT=$X/lib/systemd/system/relay.service
    for kv in Type=notify DynamicUser=yes StateDirectory=relay ProtectSystem=strict NoNewPrivileges=yes PrivateTmp=yes \
              "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX" LimitNOFILE=65536 MemoryDenyWriteExecute=yes \
              SystemCallFilter=@system-service "ExecStart=/usr/bin/relay serve --data /var/lib/relay --config /etc/relay/relay.json"; do
        check "relay.service has $kv" grep -qx "$kv" "$UNIT"
    done
    # verify checks that ExecStart's binary exists: point it at the extracted one. (.ci/run installs
    # systemd for systemd-analyze; without it this check fails rather than being skipped.)
    mkdir -p "$E2E_TMP/unit"
    sed "s#/usr/bin/relay#$X/usr/bin/relay#" "$UNIT" > "$E2E_TMP/unit/relay.service"
    check "systemd-analyze verify relay.service" bash -c "command -v systemd-analyze >/dev/null || { echo 'systemd-analyze is not installed'; exit 1; }; out=\$(systemd-analyze verify '$E2E_TMP/unit/relay.service' 2>&1); rc=\$?; [ -z \"\$out\" ] || echo \"\$out\"; [ \$rc = 0 ] && [ -z \"\$out\" ]"
fi

# --- the Dockerfile (no Docker engine here: check that it is built around the same script) ------
DF=$ROOT/Dockerfile
check "Dockerfile builds with packaging/build-release.sh" grep -q 'packaging/build-release.sh' "$DF"
check "Dockerfile: non-root user, /data volume, healthcheck, both ports" bash -c \
    "grep -Eq '^USER relay' '$DF' && grep -Eq '^VOLUME /data' '$DF' && grep -Eq '^HEALTHCHECK ' '$DF' && grep -q 'GET /healthz' '$DF' && grep -Eq '^EXPOSE 5223 5280' '$DF' && grep -Eq '^ENTRYPOINT .*\"serve\", \"--data\", \"/data\"' '$DF'"

finish
