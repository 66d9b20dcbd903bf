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
n=$1; a=$2; b=$3; shift 3
port=${PORT:-47623}
work=$(mktemp -d)
pid=
# A run that fails (the relay not ready in 10 s, the load generator's error) stops the script; the
# relay it started is stopped with it, so that the next run's port is free.
trap '[ -z "$pid" ] || kill -TERM "$pid" 2> /dev/null || true; rm -rf "$work"' EXIT

run() {
  local bin=$1 env=$2 label=$3; shift 3
  local data="$work/data" log="$work/serve.log"
  # The log of the run before still names its relay's address: gone before this relay starts, so
  # that the wait below cannot read it and connect before this relay listens.
  rm -rf "$data" "$log"
  "$bin" init --data "$data" --host 127.0.0.1 --port "$port" > /dev/null 2>&1
  env $env "$bin" serve --data "$data" --listen "127.0.0.1:$port" --admin off --queue-max-messages 5000 \
    --queue-max-bytes 100MB --max-connections-per-source 0 --queue-creation-rate 0 > "$log" 2>&1 &
  pid=$!
  for _ in $(seq 100); do grep -q 'relay://' "$log" && break; sleep 0.1; done
  local address
  address=$(grep -o 'relay://[^ ]*' "$log" | head -1)
  if [ -z "$address" ]; then
    echo "interleaved: $label: the relay was not ready in 10 s:" >&2
    tail -5 "$log" >&2
    exit 1
  fi
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
