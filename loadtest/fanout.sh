#!/usr/bin/env bash
# Live-stream fan-out measured with loadtest, each run on a fresh Sluice
# (default config) on loopback:
#  1. Ingest throughput with 0, 1 and 10 SSE consumers reading the whole
#     application: `loadtest mqtt` QoS 1, 100 connections, window 100,
#     150-byte messages, as fast as possible, $DURATION per run; the three
#     configurations alternate in rotating order for $RUNS rounds, and the
#     per-round ratios to 0 consumers are printed (every consumer must
#     receive every acknowledged message once, or the run fails).
#  2. Delivery latency at half of the peak measured in 1.: the same load
#     paced at half the median 0-consumer rate with 1 consumer: the
#     acknowledgement p50/p99 and the delivery p50/p99 (scheduled send →
#     arrival at the consumer) of the same messages.
#  3. Replay: $REPLAY states committed while no consumer reads, then one
#     SSE consumer reads them all from the start: states/s ($RUNS runs).
#
# Usage: loadtest/fanout.sh   (RUNS=3 DURATION=10s REPLAY=1000000 by default)
# Builds the release binaries (the first release build compiles RocksDB).
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
DURATION=${DURATION:-10s}
REPLAY=${REPLAY:-1000000}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/sluice/target-release}

cargo build --release -q -p sluice -p loadtest --bins
BIN=$CARGO_TARGET_DIR/release
WORK=$(mktemp -d)
SL_PID=""
cleanup() {
  [ -n "$SL_PID" ] && kill "$SL_PID" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

ADMIN_TOKEN=fanout-admin-token-0123456789abcdefghij
export SLUICE_ADMIN_TOKEN=$ADMIN_TOKEN

start_sluice() {
  local dir=$WORK/sluice-$RANDOM$RANDOM
  mkdir -p "$dir"
  RUST_LOG=warn "$BIN/sluice" serve --data-dir "$dir" \
    --mqtt-listen 127.0.0.1:0 --http-listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
    >"$dir/stdout" 2>"$dir/stderr" &
  SL_PID=$!
  for _ in $(seq 100); do [ -s "$dir/listening" ] && break; sleep 0.1; done
  SL_MQTT=$(awk '$2=="mqtt"{print $3}' "$dir/listening")
  SL_HTTP=$(awk '$2=="http"{print $3}' "$dir/listening")
  SL_ADMIN=$(awk '$2=="admin"{print $3}' "$dir/listening")
}

stop_sluice() {
  kill "$SL_PID" 2>/dev/null || true
  wait "$SL_PID" 2>/dev/null || true
  SL_PID=""
}

# run CONSUMERS RATE JSON: one loadtest run on a fresh broker.
run() {
  start_sluice
  local extra=()
  [ "$1" -gt 0 ] && extra=(--consumers "$1" --consumer-url "http://$SL_HTTP")
  "$BIN/loadtest" mqtt "$SL_MQTT" --admin "http://$SL_ADMIN" -c 100 --qos 1 --inflight 100 \
    -s 150 -d "$DURATION" -r "$2" --no-progress --json "$3" "${extra[@]}" >"$3.txt" 2>&1 ||
    { echo "run failed:"; cat "$3.txt"; }
  stop_sluice
}

field() { python3 -c "import json,sys;d=json.load(open(sys.argv[1]));print(eval(sys.argv[2]))" "$@"; }

echo "load: $(uptime)"
CONFIGS=(0 1 10)
for round in $(seq "$RUNS"); do
  for k in 0 1 2; do
    c=${CONFIGS[$(( (round + k) % 3 ))]}
    run "$c" 0 "$WORK/r$round-c$c.json"
    echo "round $round, $c consumers: $(field "$WORK/r$round-c$c.json" 'round(d["throughput"]["acked_per_sec"])') msg/s acked$( [ "$c" -gt 0 ] && echo ", consumers $(field "$WORK/r$round-c$c.json" 'd["consumers"]["received"]') received, ok $(field "$WORK/r$round-c$c.json" 'd["ok"]')")"
  done
done
python3 - "$WORK" "$RUNS" <<'EOF'
import json, statistics, sys
work, runs = sys.argv[1], int(sys.argv[2])
rate = lambda r, c: json.load(open(f"{work}/r{r}-c{c}.json"))["throughput"]["acked_per_sec"]
for c in (0, 1, 10):
    xs = [rate(r, c) for r in range(1, runs + 1)]
    line = f"{c:>2} consumers: median {statistics.median(xs):,.0f} msg/s ({min(xs):,.0f}-{max(xs):,.0f})"
    if c:
        ratios = [rate(r, c) / rate(r, 0) for r in range(1, runs + 1)]
        line += f", ratio to 0 per round: median {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
    print(line)
EOF
PEAK=$(python3 -c "import json,statistics;print(round(statistics.median(json.load(open('$WORK/r%d-c0.json'%r))['throughput']['acked_per_sec'] for r in range(1,$RUNS+1))))")
HALF=$(( PEAK / 2 ))
echo "latency at half of the peak ($HALF msg/s), 1 consumer:"
for round in $(seq "$RUNS"); do
  run 1 "$HALF" "$WORK/lat$round.json"
  echo "  round $round: ack p50 $(field "$WORK/lat$round.json" 'd["latency"]["p50_ms"]') p99 $(field "$WORK/lat$round.json" 'd["latency"]["p99_ms"]') ms; delivery p50 $(field "$WORK/lat$round.json" 'd["consumers"]["delivery_latency"]["p50_ms"]') p99 $(field "$WORK/lat$round.json" 'd["consumers"]["delivery_latency"]["p99_ms"]') ms; ok $(field "$WORK/lat$round.json" 'd["ok"]')"
done
echo "replay of $REPLAY states:"
for round in $(seq "$RUNS"); do
  start_sluice
  "$BIN/loadtest" mqtt "$SL_MQTT" --admin "http://$SL_ADMIN" -c 100 --qos 1 --inflight 100 \
    -s 150 -n "$REPLAY" --no-progress >"$WORK/fill$round.txt" 2>&1
  "$BIN/loadtest" replay "http://$SL_HTTP" --admin "http://$SL_ADMIN" -n "$REPLAY" | sed "s/^/  round $round: /" | grep -E "rate|states "
  stop_sluice
done
echo "load: $(uptime)"
