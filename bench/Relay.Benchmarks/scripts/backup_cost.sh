#!/usr/bin/env bash
# What a backup (POST /admin/backup) costs a serving relay.
#
#   backup_cost.sh RELAY_BINARY DIR MESSAGES PAIRS
#
# Starts the relay (fsync) on DIR/relay with an admin token, fills it with MESSAGES messages of
# 256 bytes in 200 queues (the benchmarks project's `fill`, built first), then:
#   1. three backups one after the other: the seconds, files and bytes each answer reports;
#   2. PAIRS pairs of paced runs (`relay bench ADDRESS --scenario paced --rate 5000 --duration 8`),
#      one while a backup is made every 2 s, one without, alternating: p50/p99/p99.9 of each.
# DIR should be on the disk under test (/var/tmp), not tmpfs.
set -euo pipefail
BIN=$1 DIR=$2 MESSAGES=$3 PAIRS=$4
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
source "$ROOT/bench/Relay.Benchmarks/scripts/bench_relay.sh"
dotnet build -c Release "$ROOT/bench/Relay.Benchmarks" -v q -nologo > /dev/null
FILL="$ROOT/bench/Relay.Benchmarks/bin/Release/net10.0/Relay.Benchmarks.dll"

TOKEN=bench-admin-token-0123456789
PORT=27711 ADMIN=27712
mkdir -p "$DIR"
start_bench_relay "$BIN" "$DIR/relay" "$DIR/relay.log" "$PORT" "127.0.0.1:$ADMIN" --admin-token "$TOKEN"
trap 'kill $BENCH_PID 2> /dev/null || true' EXIT
echo "fill: $MESSAGES messages"
dotnet "$FILL" fill "$BENCH_ADDRESS" "$MESSAGES" 200 > /dev/null
backup() { curl -fsS -X POST -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$ADMIN/admin/backup"; }
for i in 1 2 3; do
  echo "backup $i: $(backup | tr -d '\n ')"
done
echo "store: $(du -sh "$DIR/relay/queues" | cut -f1), backups: $(du -sh "$DIR/relay/backups" | cut -f1) (hard links counted once)"

paced() {
  "$BIN" bench "$BENCH_ADDRESS" --scenario paced --rate 5000 --duration 8 --relay-pid "$BENCH_PID" --json 2> /dev/null | tail -1 |
    python3 -c 'import json,sys; r=json.load(sys.stdin); print("p50 %.2f p99 %.2f p99.9 %.2f ms, lost %d" % (r["p50_ms"], r["p99_ms"], r["p999_ms"], r["lost"]))'
}
for pair in $(seq "$PAIRS"); do
  ( while true; do backup > /dev/null; sleep 2; done ) &
  LOOP=$!
  echo "pair $pair, backups every 2 s: $(paced)"
  kill "$LOOP"; wait "$LOOP" 2> /dev/null || true
  sleep 2   # a backup the loop started finishes before its directory goes
  rm -rf "$DIR/relay/backups"
  echo "pair $pair, no backups:       $(paced)"
done
