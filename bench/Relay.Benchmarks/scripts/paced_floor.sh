#!/bin/bash
# What paced latency this machine allows: runs, N times in a row so each row is one moment of a
# noisy machine,
#   disk     disk_sync.py: 600-byte appends + fdatasync (the cost of one group commit's flush)
#   floor    latency_floor.c without a disk: sender -> forwarder -> receiver, loopback TCP, 3 threads
#   floor+fs latency_floor.c whose forwarder fdatasyncs every wake-up's records before forwarding
#   1 log    the same, the forwarder's reads going on while a writer thread flushes (--logs 1)
#   2 logs   the same with two logs flushed in parallel, each record in its queue's log (--logs 2):
#            what a store of two logs would change on this disk
#   relaxed  the relay without fsync (`--durability relaxed`), `relay bench --scenario paced`
#   relay    the relay as issue 6 measures it (fsync before OK and before delivery)
# all at RATE messages/s for SECONDS, the data on DIR's file system. The relay rows are `relay bench`
# with its defaults: a relay binary whose bench has a warm-up (--warmup, 1 s) leaves it out of the
# figures; the C floor has none.
#
#   paced_floor.sh N RELAY_BINARY|- [RATE] [SECONDS] [DIR]      (-: the C rows only)
#   bash bench/Relay.Benchmarks/scripts/paced_floor.sh 3 /tmp/rel/relay 5000 8 /var/tmp
#
# Prints one line per measurement: label, p50, p99, p99.9 in milliseconds.
set -euo pipefail
n=$1; relay=$2; rate=${3:-5000}; seconds=${4:-8}; dir=${5:-/var/tmp}
here=$(cd "$(dirname "$0")" && pwd)
source "$here/bench_relay.sh"
port=${PORT:-47623}
work=$(mktemp -d "$dir/paced_floor.XXXXXX")
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2> /dev/null; done; rm -rf "$work"' EXIT
clang -O2 -pthread -o "$work/latency_floor" "$here/latency_floor.c"

listening() {  # listening PORT: true once something accepts on 127.0.0.1:PORT
  ss -Hltn "sport = :$1" 2> /dev/null | grep -q .
}

floor() {
  local label=$1; shift
  "$work/latency_floor" forward "$port" "$@" &
  local forwarder=$!
  pids+=("$forwarder")
  for _ in $(seq 100); do listening "$port" && break; sleep 0.05; done
  "$work/latency_floor" send "$port" "$rate" "$seconds" |
    awk -v l="$label" '{ print l, $6, $8, $10 }' || echo "$label failed"
  kill "$forwarder"; wait "$forwarder" 2> /dev/null || true
}

relay_run() {
  local label=$1; shift
  local log="$work/serve.log"
  local ready=1
  start_bench_relay "$relay" "$work/data" "$log" "$port" off "$@" || ready=0
  local pid=$BENCH_PID
  pids+=("$pid")
  [ "$ready" = 1 ] || { echo "$label: relay serve was not ready"; return; }
  local json
  # relay bench exits 1 when it saw a lost or duplicated message: the JSON says so, the run goes on.
  json=$("$relay" bench "$BENCH_ADDRESS" --relay-pid "$pid" --json \
    --scenario paced --rate "$rate" --duration "$seconds" 2> /dev/null | tail -1) || true
  kill -TERM "$pid"; wait "$pid" || true
  python3 -c 'import json,sys; d=json.loads(sys.argv[2]); print(sys.argv[1], d["p50_ms"], d["p99_ms"], d["p999_ms"], "" if d["lost"] == d["duplicated"] == 0 else "lost %d duplicated %d" % (d["lost"], d["duplicated"]))' "$label" "$json" ||
    echo "$label failed"
}

for _ in $(seq "$n"); do
  python3 "$here/disk_sync.py" "$work" --count 3000 | awk '/^append/ { print "disk", $5, $9, $11 }'
  floor floor
  floor floor+fs --fsync "$work"
  floor "1 log" --fsync "$work" --logs 1
  floor "2 logs" --fsync "$work" --logs 2
  [ "$relay" = - ] && continue
  relay_run relaxed --durability relaxed
  relay_run relay
done
