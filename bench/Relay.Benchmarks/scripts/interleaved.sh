#!/bin/bash
# Compares two relay binaries (or two environments of one) on a noisy machine: runs N pairs,
# alternating A and B, each run a fresh relay on its own data directory plus `relay bench` against
# it with --relay-pid, so the relay's CPU is measured apart from the load generator's.
#
#   interleaved.sh N BINARY_A BINARY_B [relay bench options...]
#   ENV_A='X=1' ENV_B='DOTNET_ThreadPool_UnfairSemaphoreSpinLimit=70' interleaved.sh 5 relay relay --messages 200000
#
# Prints one line per run: label, messages/s, relay CPU µs/msg, load generator CPU µs/msg, p50 ms, p99 ms.
# Each binary runs its own load generator (`BINARY bench`).
set -euo pipefail
source "$(dirname "$0")/bench_relay.sh"
n=$1; a=$2; b=$3; shift 3
port=${PORT:-47623}
work=$(mktemp -d)
pid=
# A run that fails (the relay not ready in 10 s, the load generator's error) stops the script; the
# relay it started is stopped with it, so that the next run's port is free.
trap '[ -z "$pid" ] || kill -TERM "$pid" 2> /dev/null || true; rm -rf "$work"' EXIT

run() {
  local bin=$1 env=$2 label=$3; shift 3
  local log="$work/serve.log"
  if ! BENCH_ENV=$env start_bench_relay "$bin" "$work/data" "$log" "$port" off; then
    pid=$BENCH_PID
    echo "interleaved: $label: see above" >&2
    exit 1
  fi
  pid=$BENCH_PID
  local address=$BENCH_ADDRESS
  local json
  if ! json=$("$bin" bench "$address" --relay-pid "$pid" --json "$@" 2> "$work/bench.err" | tail -1); then
    echo "interleaved: $label: relay bench failed:" >&2
    tail -5 "$work/bench.err" >&2
    echo "interleaved: $label: the relay's log:" >&2
    tail -5 "$log" >&2
    exit 1
  fi
  kill -TERM "$pid"
  wait "$pid" || true
  pid=
  python3 -c 'import json,sys; d=json.loads(sys.argv[2]); print(sys.argv[1], d["messages_per_second"], d["relay_cpu_us_per_message"], d["process_cpu_us_per_message"], d["p50_ms"], d["p99_ms"])' "$label" "$json"
}

for _ in $(seq "$n"); do
  run "$a" "${ENV_A:-X=1}" "A" "$@"
  run "$b" "${ENV_B:-X=1}" "B" "$@"
done
