#!/bin/bash
# One paced run against a fresh relay on DIRECTORY's disk, then the relay's own view of it: how
# much of the send-to-receive latency is inside the relay (relay_delivery_latency_seconds: a SEND's
# arrival to its push) and what its group commits took (relay_store_commit_seconds), as the share
# of observations at or under each bucket.
#
#   paced_metrics.sh BINARY DIRECTORY [RATE] [SECONDS]
#   paced_metrics.sh /tmp/rel/relay /var/tmp          # this disk
#   paced_metrics.sh /tmp/rel/relay /dev/shm          # tmpfs: a flush that costs nothing
#
# Prints the load generator's p50/p99/p99.9 and the relay's CPU per message, then one line per histogram.
set -euo pipefail
source "$(dirname "$0")/bench_relay.sh"
bin=$1; dir=$2; rate=${3:-5000}; seconds=${4:-8}
port=${PORT:-47631}; admin=$((port + 1))
work=$(mktemp -d -p "$dir")
pid=
trap '[ -z "$pid" ] || { kill -TERM "$pid" 2> /dev/null; wait "$pid" 2> /dev/null; }; rm -rf "$work"' EXIT
if ! start_bench_relay "$bin" "$work/data" "$work/serve.log" "$port" "127.0.0.1:$admin"; then
  pid=$BENCH_PID
  exit 1
fi
pid=$BENCH_PID
address=$BENCH_ADDRESS
"$bin" bench "$address" --relay-pid "$pid" --json --scenario paced --rate "$rate" --duration "$seconds" 2> /dev/null | tail -1 |
    python3 -c 'import json,sys; d=json.load(sys.stdin); print("end to end: p50", d["p50_ms"], "p99", d["p99_ms"], "p99.9", d["p999_ms"], "ms; relay CPU", d["relay_cpu_us_per_message"], "us/msg")'
curl -fsS "http://127.0.0.1:$admin/metrics" | python3 -c '
import re, sys
rows = {}
for line in sys.stdin:
    m = re.match(r"(relay_store_commit_seconds|relay_delivery_latency_seconds)_bucket\{le=\"([^\"]+)\"\} (\S+)", line)
    if m:
        rows.setdefault(m[1], []).append((m[2], float(m[3])))
for name, buckets in rows.items():
    total = buckets[-1][1] or 1
    shown = [f"{float(le) * 1000:g} ms {count / total * 100:.2f}%" for le, count in buckets if le != "+Inf" and float(le) <= 0.0064]
    print(f"{name} (n={int(total)}): " + ", ".join(shown))
'
