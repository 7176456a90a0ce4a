#!/usr/bin/env bash
# Client CPU of loadtest's native MQTT client vs rumqttc at a fixed rate,
# QoS 1, MQTT 3.1.1, against a release sluice started on port 0 in a temp dir.
# Runs alternate between the two clients to spread the machine's noise.
#
#   loadtest/scripts/compare-clients.sh [RATE] [SECONDS] [ROUNDS] [CONNECTIONS]
#
# Builds release binaries first (a cold RocksDB build takes ~13 minutes;
# SKIP_BUILD=1 uses what is in $CARGO_TARGET_DIR/release).
set -euo pipefail
cd "$(dirname "$0")/../.."
RATE=${1:-50000}
SECS=${2:-10}
ROUNDS=${3:-3}
CONNS=${4:-10}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/sluice/target-release}
[ -n "${SKIP_BUILD:-}" ] || cargo build --release -p sluice -p loadtest
BIN=$CARGO_TARGET_DIR/release

DIR=$(mktemp -d)
PID=
cleanup() {
    [ -n "$PID" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null
    rm -rf "$DIR"
}
trap cleanup EXIT
export SLUICE_ADMIN_TOKEN="compare-clients-$$-token"
"$BIN/sluice" serve --data-dir "$DIR/data" --http-listen 127.0.0.1:0 \
    --admin-listen 127.0.0.1:0 --mqtt-listen 127.0.0.1:0 >"$DIR/out" 2>"$DIR/err" &
PID=$!
for _ in $(seq 300); do
    grep -q '^listening admin' "$DIR/out" 2>/dev/null && break
    sleep 0.1
done
MQTT=$(awk '$2 == "mqtt" {print $3}' "$DIR/out")
ADMIN=$(awk '$2 == "admin" {print $3}' "$DIR/out")
[ -n "$MQTT" ] || { cat "$DIR/err"; exit 1; }

echo "rate $RATE msg/s, $CONNS connections, ${SECS}s per run, QoS 1, MQTT 3.1.1"
for r in $(seq "$ROUNDS"); do
    for client in native rumqttc; do
        printf '%-8s' "$client"
        "$BIN/loadtest" mqtt "$MQTT" --admin "http://$ADMIN" --mqtt-version 3.1.1 \
            --mqtt-client "$client" -c "$CONNS" -r "$RATE" -d "${SECS}s" --no-progress \
            --device-prefix "$client-$r-" 2>/dev/null |
            grep -E 'throughput|latency ms|client cpu' |
            sed -E 's/^ +//; s/ +/ /g; s/\(mean.*//; s/, [0-9.]+ msg\/s sent//' | paste -sd'|' -
    done
done
