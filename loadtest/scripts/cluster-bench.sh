#!/usr/bin/env bash
# Cluster-mode ingest against its references, in one run on this machine:
# a 3-node NATS cluster on loopback (JetStream, `sync_interval: always`,
# node n0 also serving NATS's own MQTT listener), and in every round, in
# rotating order:
#  - `probe`:      the engine's ceiling, `loadtest stream-probe` (atomic
#                  batches of 1000 and 500 with 4 in flight, pipelined
#                  publishes; 150-byte messages straight to an R3 stream);
#  - `standalone`: Sluice without NATS (default config);
#  - `cluster1`:   one Sluice broker in cluster mode (R3 ingest stream, its
#                  own read model materialized beside);
#  - `clusterN`:   BROKERS brokers in cluster mode, connections spread over
#                  them (only when BROKERS > 1; needs brokers that share
#                  tokens);
#  - `nats-mqtt`:  NATS's own MQTT listener, QoS 1 publishes into an R3
#                  stream capturing their subjects (MQTT 3.1.1: NATS has no
#                  MQTT 5).
# The same `loadtest mqtt` load everywhere: CONNS connections, QoS 1,
# window WINDOW, 150-byte messages, as fast as acknowledgements come, for
# DURATION. Then one broker in cluster mode at half its median peak rate,
# for the acknowledgement latency there.
#
#   loadtest/scripts/cluster-bench.sh        (RUNS=3 DURATION=10s CONNS=100 WINDOW=100 BROKERS=1)
#
# Needs nats-server (installed by .ci/prepare with SLUICE_NEED_NATS=1) and
# builds the release binaries (the first release build compiles RocksDB).
set -euo pipefail
cd "$(dirname "$0")/../.."
SLUICE_NEED_NATS=1
SLUICE_EXTRA_PACKAGES=()
source .ci/prepare

RUNS=${RUNS:-3}
DURATION=${DURATION:-10s}
CONNS=${CONNS:-100}
WINDOW=${WINDOW:-100}
BROKERS=${BROKERS:-1}

cargo build --release -q -p sluice -p loadtest --bins
BIN=$CARGO_TARGET_DIR/release
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

ADMIN_TOKEN=cluster-bench-admin-token-0123456789abc
read -r -a P < <(python3 -c '
import socket
ss=[socket.socket() for _ in range(8)]
[s.bind(("127.0.0.1",0)) for s in ss]
print(" ".join(str(s.getsockname()[1]) for s in ss))')
routes="nats-route://127.0.0.1:${P[3]}, nats-route://127.0.0.1:${P[4]}, nats-route://127.0.0.1:${P[5]}"
for i in 0 1 2; do
  mqtt=""
  [ "$i" = 0 ] && mqtt="mqtt { listen: 127.0.0.1:${P[6]} }
http: 127.0.0.1:${P[7]}"
  cat >"$WORK/n$i.conf" <<CONF
server_name: n$i
listen: 127.0.0.1:${P[$i]}
jetstream { store_dir: "$WORK/n$i", sync_interval: always }
cluster { name: bench, listen: 127.0.0.1:${P[$((i + 3))]}, routes: [$routes] }
$mqtt
CONF
  nats-server -c "$WORK/n$i.conf" 2>"$WORK/n$i.log" &
  PIDS+=("$!")
done
sleep 3
NATS_URLS="[\"nats://127.0.0.1:${P[0]}\",\"nats://127.0.0.1:${P[1]}\",\"nats://127.0.0.1:${P[2]}\"]"

# Starts broker $1 of a run (fresh data dir) with extra VAR=value settings;
# appends its MQTT address to SL_MQTT and records its admin address.
SL_PIDS=()
start_sluice() {
  local dir=$WORK/sluice-$RANDOM$RANDOM
  mkdir -p "$dir"
  env "$@" SLUICE_ADMIN_TOKEN=$ADMIN_TOKEN RUST_LOG=warn "$BIN/sluice" serve --data-dir "$dir" \
    --mqtt-listen 127.0.0.1:0 --http-listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
    >"$dir/stdout" 2>"$dir/stderr" &
  SL_PIDS+=("$!")
  PIDS+=("$!")
  for _ in $(seq 1200); do [ -f "$dir/listening" ] && break; sleep 0.05; done
  [ -f "$dir/listening" ] || { cat "$dir/stderr" >&2; exit 1; }
  local m
  m=$(awk '$2=="mqtt"{print $3}' "$dir/listening")
  SL_MQTT=${SL_MQTT:+$SL_MQTT,}$m
  [ -n "${SL_ADMIN:-}" ] || SL_ADMIN=$(awk '$2=="admin"{print $3}' "$dir/listening")
}
stop_sluice() {
  for p in "${SL_PIDS[@]:-}"; do [ -n "$p" ] && { kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; }; done
  SL_PIDS=()
  SL_MQTT=""
  SL_ADMIN=""
}
cluster_env() { # prefix
  echo SLUICE_CLUSTER__NATS_URLS="$NATS_URLS" SLUICE_CLUSTER__PREFIX="$1" SLUICE_CLUSTER__MAX_AGE=5m
}

# "<acked msg/s> <p50 ms> <p99 ms>" from a loadtest --json file.
metric() { python3 -c 'import json,sys;j=json.load(open(sys.argv[1]));l=j.get("latency") or {};print("%.0f %s %s"%(j["throughput"]["acked_per_sec"],l.get("p50_ms","-"),l.get("p99_ms","-")))' "$1" 2>/dev/null || echo "0 - -"; }

RESULTS=$WORK/results
: >"$RESULTS"
lt_mqtt() { # label args...
  local label=$1; shift
  local out=$WORK/$label-$RANDOM.json
  "$BIN/loadtest" mqtt "$@" -c "$CONNS" --qos 1 --inflight "$WINDOW" --payload-size 150 \
    -d "$DURATION" --max-errors 1000000 --no-progress --json "$out" >"$out.txt" 2>&1 || true
  echo "$label $(metric "$out")" | tee -a "$RESULTS"
}

run_mode() { # mode round
  case $1 in
    probe)
      "$BIN/loadtest" stream-probe --nats "nats://127.0.0.1:${P[0]}" --rounds 1 --duration "$DURATION" >"$WORK/probe.txt"
      awk -F': ' '/round 1 /{split($2,a," "); l=$1; sub(/.*round 1  /,"",l); gsub(/[ ,]+/,"_",l); print "probe-" l " " a[1] " - -"}' "$WORK/probe.txt" | tee -a "$RESULTS"
      ;;
    standalone)
      start_sluice
      lt_mqtt standalone "$SL_MQTT" --admin "http://$SL_ADMIN" --admin-token "$ADMIN_TOKEN"
      stop_sluice
      ;;
    cluster1)
      # shellcheck disable=SC2046
      start_sluice $(cluster_env "c1r$2")
      lt_mqtt cluster1 "$SL_MQTT" --admin "http://$SL_ADMIN" --admin-token "$ADMIN_TOKEN"
      stop_sluice
      ;;
    clusterN)
      for _ in $(seq "$BROKERS"); do
        # shellcheck disable=SC2046
        start_sluice $(cluster_env "cnr$2")
      done
      lt_mqtt "cluster$BROKERS" "$SL_MQTT" --admin "http://$SL_ADMIN" --admin-token "$ADMIN_TOKEN"
      stop_sluice
      ;;
    nats-mqtt)
      # stream-probe created the R3 stream PROBE on probe.state.>, which
      # captures these topics.
      lt_mqtt nats-mqtt "127.0.0.1:${P[6]}" --no-provision --mqtt-version 3.1.1 --topic 'probe/state/{device}'
      ;;
  esac
}

MODES=(standalone cluster1 nats-mqtt)
[ "$BROKERS" -gt 1 ] && MODES+=(clusterN)
echo "load: $(uptime)"
for round in $(seq "$RUNS"); do
  # The probe first (it creates the stream NATS's MQTT publishes into),
  # then the others in an order that rotates every round.
  run_mode probe "$round"
  n=${#MODES[@]}
  for k in $(seq 0 $((n - 1))); do
    run_mode "${MODES[$(((k + round) % n))]}" "$round"
  done
done

median() { awk -v k="$1" '$1==k{print $2}' "$RESULTS" | sort -n | awk '{a[NR]=$1} END{if(NR==0){print 0}else{print a[int((NR+1)/2)]}}'; }
spread() { awk -v k="$1" '$1==k{print $2}' "$RESULTS" | sort -n | awk 'NR==1{lo=$1} {hi=$1} END{print lo "-" hi}'; }

echo
echo "== acknowledged msg/s: median (min-max) of $RUNS rounds; load after: $(uptime | sed 's/.*load/load/') =="
for k in $(awk '{print $1}' "$RESULTS" | awk '!s[$0]++'); do
  printf '%-45s %8s  (%s)\n' "$k" "$(median "$k")" "$(spread "$k")"
done

# Per round: cluster1 over the atomic:1000 ceiling measured in that round.
echo
echo "== cluster1 / probe atomic batches of 1000 (per round) =="
python3 - "$RESULTS" <<'PY'
import sys
rows=[l.split() for l in open(sys.argv[1])]
probes=[float(r[1]) for r in rows if r[0].startswith("probe-atomic_batches_of_1000")]
c1=[float(r[1]) for r in rows if r[0]=="cluster1"]
ratios=sorted(c/p for c,p in zip(c1,probes) if p)
print(" ".join("%.2f"%r for r in ratios), "median %.2f"%ratios[len(ratios)//2] if ratios else "")
PY

HALF=$(python3 -c "print(int(float('$(median cluster1)')/2))")
echo
echo "== one broker in cluster mode at half its median peak ($HALF msg/s): msg/s p50 p99 =="
# shellcheck disable=SC2046
start_sluice $(cluster_env half)
lt_mqtt cluster1-half "$SL_MQTT" --admin "http://$SL_ADMIN" --admin-token "$ADMIN_TOKEN" -r "$HALF"
stop_sluice
start_sluice
lt_mqtt standalone-half "$SL_MQTT" --admin "http://$SL_ADMIN" --admin-token "$ADMIN_TOKEN" -r "$HALF"
stop_sluice
lt_mqtt nats-mqtt-half "127.0.0.1:${P[6]}" --no-provision --mqtt-version 3.1.1 --topic 'probe/state/{device}' -r "$HALF"

# What one state costs in the stream: bytes per message of every stream
# (NATS's monitoring endpoint on n0; its file store, one replica's share).
echo
echo "== streams on n0: messages, bytes, bytes per message =="
curl -s "http://127.0.0.1:${P[7]}/jsz?streams=true" | python3 -c '
import json,sys
j=json.load(sys.stdin)
for a in j.get("account_details",[]):
    for s in a.get("stream_detail",[]):
        st=s["state"]; m=st.get("messages",0); b=st.get("bytes",0)
        print("%-20s %10d %12d %8.1f" % (s["name"], m, b, b/m if m else 0))
'
