# Sourced by the benchmark scripts here, so that every figure they print comes from a relay started
# the same way.
#
# start_bench_relay BINARY DATA LOG PORT ADMIN [serve options...]
#   A fresh data directory (DATA and LOG removed first, so that the wait below cannot read an older
#   relay's address), then `relay serve` in the background as the benchmarks run it: the queue limits
#   of a load test, no per-source limits; ADMIN is HOST:PORT or `off`; $BENCH_ENV (say
#   `DOTNET_gcServer=1`) goes into its environment. Waits up to 10 s for its address in LOG and sets
#   BENCH_PID and BENCH_ADDRESS; returns 1 with the log's last lines on stderr when it is not ready.
start_bench_relay() {
  local bin=$1 data=$2 log=$3 port=$4 admin=$5
  shift 5
  rm -rf "$data" "$log"
  "$bin" init --data "$data" --host 127.0.0.1 --port "$port" > /dev/null 2>&1
  # shellcheck disable=SC2086  # BENCH_ENV is a list of NAME=VALUE words
  env ${BENCH_ENV:-} "$bin" serve --data "$data" --listen "127.0.0.1:$port" --admin "$admin" \
    --queue-max-messages 5000 --queue-max-bytes 100MB --max-connections-per-source 0 \
    --queue-creation-rate 0 --key-agreement-rate 0 "$@" > "$log" 2>&1 &
  BENCH_PID=$!
  BENCH_ADDRESS=
  for _ in $(seq 100); do
    BENCH_ADDRESS=$(grep -o 'relay://[^ ]*' "$log" | head -1 || true)
    [ -n "$BENCH_ADDRESS" ] && return 0
    kill -0 "$BENCH_PID" 2> /dev/null || break
    sleep 0.1
  done
  echo "the relay was not ready in 10 s:" >&2
  tail -5 "$log" >&2
  return 1
}
