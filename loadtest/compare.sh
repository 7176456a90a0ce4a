#!/usr/bin/env bash
# Sluice measured against its peers on loopback, in the same run:
#  - MQTT: the same `loadtest mqtt` workload against Mosquitto (persistence
#    off, TCP_NODELAY) and Sluice with default config (WAL on, not fsynced):
#    100 connections QoS 0, 100 connections QoS 1 (window 100), and 1,000
#    connections QoS 1; 150-byte messages, as fast as possible.
#  - HTTP: wrk with 64 keep-alive connections POSTing a 150-byte state with
#    a Bearer token to Sluice, and the same to a bare hyper server that
#    reads the body and answers 204.
# Each figure is the median of $RUNS alternating runs; the ratios
# Sluice/Mosquitto and Sluice/bare-hyper are printed at the end, followed
# by the QoS 1 p99 at half of Sluice's peak rate and the RSS cost of 10,000
# idle MQTT connections.
#
# Usage: loadtest/compare.sh            (RUNS=3 DURATION=10s by default)
# Installs mosquitto and wrk (Debian packages) when missing, and builds the
# release binaries (the first release build compiles RocksDB: ~13 min).
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
DURATION=${DURATION:-10s}
IDLE=${IDLE:-10000}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/sluice/target-release}

need=()
command -v mosquitto >/dev/null || need+=(mosquitto)
command -v wrk >/dev/null || need+=(wrk)
dpkg -s libclang-dev >/dev/null 2>&1 || need+=(clang libclang-dev)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq >&2 || true
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >&2
fi
MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)

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

ADMIN_TOKEN=compare-admin-token-0123456789abcdefgh
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }

# Starts a fresh Sluice (default config, fresh data dir; arguments are
# extra VAR=value environment settings); sets SL_PID, SL_MQTT, SL_HTTP,
# SL_ADMIN.
start_sluice() {
  local dir=$WORK/sluice-$RANDOM$RANDOM
  mkdir -p "$dir"
  env "$@" SLUICE_ADMIN_TOKEN=$ADMIN_TOKEN RUST_LOG=warn "$BIN/sluice" serve --data-dir "$dir" \
    --mqtt-listen 127.0.0.1:0 --http-listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
    >"$dir/stdout" 2>"$dir/stderr" &
  SL_PID=$!
  PIDS+=("$SL_PID")
  for _ in $(seq 200); do [ -f "$dir/listening" ] && break; sleep 0.05; done
  SL_MQTT=$(awk '$2=="mqtt"{print $3}' "$dir/listening")
  SL_HTTP=$(awk '$2=="http"{print $3}' "$dir/listening")
  SL_ADMIN=$(awk '$2=="admin"{print $3}' "$dir/listening")
}
stop_sluice() { kill "$SL_PID" 2>/dev/null || true; wait "$SL_PID" 2>/dev/null || true; }

MQ_PORT=$(free_port)
cat >"$WORK/mosquitto.conf" <<EOF
listener $MQ_PORT 127.0.0.1
allow_anonymous true
persistence false
set_tcp_nodelay true
max_connections -1
max_inflight_messages 0
max_queued_messages 0
EOF
"$MOSQUITTO" -c "$WORK/mosquitto.conf" >"$WORK/mosquitto.log" 2>&1 &
PIDS+=("$!")
sleep 0.5

# Prints "<msg/s> <p99 ms>" from a loadtest --json file: acknowledged
# messages for QoS 1 ($2 = 1), sent messages for QoS 0.
metric() { python3 -c 'import json,sys;j=json.load(open(sys.argv[1]));t=j["throughput"];l=j.get("latency") or {};print("%.0f %s"%(t["acked_per_sec"] if sys.argv[2]=="1" else t["sent_per_sec"], l.get("p99_ms","-")))' "$1" "$2" 2>/dev/null || echo "0 -"; }

RESULTS=$WORK/results
: >"$RESULTS"
lt_mqtt() { # label conns qos args...
  local label=$1 conns=$2 qos=$3; shift 3
  local out=$WORK/$label-$RANDOM.json
  "$BIN/loadtest" mqtt "$@" -c "$conns" --qos "$qos" --inflight 100 --payload-size 150 \
    --mqtt-version 3.1.1 --connect-concurrency 64 -d "$DURATION" --max-errors 1000000 --json "$out" >"$out.txt" 2>&1 || true
  echo "$label $(metric "$out" "$qos")" | tee -a "$RESULTS"
}

for run in $(seq "$RUNS"); do
  for w in "qos0 100 0" "qos1 100 1" "qos1x1000 1000 1"; do
    set -- $w
    lt_mqtt "mosquitto-$1" "$2" "$3" "127.0.0.1:$MQ_PORT" --no-provision --topic 'bench/{device}'
    start_sluice
    lt_mqtt "sluice-$1" "$2" "$3" "$SL_MQTT" --admin "http://$SL_ADMIN" --admin-token "$ADMIN_TOKEN"
    stop_sluice
  done
done

# HTTP: wrk against Sluice and bare hyper, alternating.
BODY='{"data":{"temperature":21.5,"humidity":40.2,"pressure":1013.25,"battery":97,"status":"ok","firmware":"1.4.2","rssi":-67},"time":1700000000000}'
cat >"$WORK/post.lua" <<EOF
wrk.method = "POST"
wrk.body = '$BODY'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. (os.getenv("TOKEN") or "none")
EOF
BH_PORT=$(free_port)
"$BIN/bare_hyper" "127.0.0.1:$BH_PORT" >/dev/null &
PIDS+=("$!")
sleep 0.3
wrk_rps() { wrk -t2 -c64 -d"$DURATION" -s "$WORK/post.lua" "$1" 2>/dev/null | awk '/Requests\/sec/{printf "%.0f", $2}'; }
for run in $(seq "$RUNS"); do
  echo "hyper-204 $(wrk_rps "http://127.0.0.1:$BH_PORT/applications/app/devices/d/state") -" | tee -a "$RESULTS"
  start_sluice
  TOKEN=$(curl -s -X POST "http://$SL_ADMIN/applications/app/tokens" -H "Authorization: Bearer $ADMIN_TOKEN" \
    -H 'Content-Type: application/json' -d '{"name":"wrk","scope":["device.sendState"]}' |
    python3 -c 'import json,sys;print(json.load(sys.stdin)["token"])')
  echo "sluice-http $(TOKEN=$TOKEN wrk_rps "http://$SL_HTTP/applications/app/devices/d/state") -" | tee -a "$RESULTS"
  stop_sluice
done

median() { awk -v k="$1" '$1==k{print $2}' "$RESULTS" | sort -n | awk '{a[NR]=$1} END{if(NR==0){print 0}else{print a[int((NR+1)/2)]}}'; }

echo
echo "== medians of $RUNS runs (msg/s or req/s) =="
for k in mosquitto-qos0 sluice-qos0 mosquitto-qos1 sluice-qos1 mosquitto-qos1x1000 sluice-qos1x1000 hyper-204 sluice-http; do
  printf '%-22s %s\n' "$k" "$(median "$k")"
done
ratio() { python3 -c "import sys;a,b=float(sys.argv[1]),float(sys.argv[2]);print('%.2f'%(a/b) if b else 'n/a')" "$1" "$2"; }
echo
echo "== ratios =="
echo "MQTT QoS 0, 100 conns:   Sluice/Mosquitto = $(ratio "$(median sluice-qos0)" "$(median mosquitto-qos0)")   (target >= 1.0)"
echo "MQTT QoS 1, 100 conns:   Sluice/Mosquitto = $(ratio "$(median sluice-qos1)" "$(median mosquitto-qos1)")   (target >= 1.5)"
echo "MQTT QoS 1, 1000 conns:  Sluice/Mosquitto = $(ratio "$(median sluice-qos1x1000)" "$(median mosquitto-qos1x1000)")"
echo "HTTP POST, 64 conns:     Sluice/bare hyper = $(ratio "$(median sluice-http)" "$(median hyper-204)")   (target >= 0.7)"

# QoS 1 latency at half of Sluice's peak (100 connections, window 10).
PEAK=$(median sluice-qos1)
HALF=$((PEAK / 2))
start_sluice
out=$WORK/half.json
"$BIN/loadtest" mqtt "$SL_MQTT" --admin "http://$SL_ADMIN" --admin-token "$ADMIN_TOKEN" -c 100 --qos 1 --inflight 10 \
  --payload-size 150 --mqtt-version 3.1.1 -r "$HALF" -d "$DURATION" --verify --json "$out" >"$out.txt" 2>&1 || true
echo
echo "QoS 1 at half the peak ($HALF msg/s, 100 conns, window 10): $(metric "$out" 1 | awk '{print "acked " $1 " msg/s, p99 " $2 " ms"}')   (target p99 <= 5 ms)"
grep -E '^  verify' "$out.txt" || true
stop_sluice

# RSS per idle MQTT connection (all from one address: lift the per-address
# connect rate and connection limits for this measurement).
start_sluice SLUICE_MQTT__CONNECT_RATE_PER_IP=0 SLUICE_MQTT__MAX_CONNECTIONS_PER_IP=0
TOKEN=$(curl -s -X POST "http://$SL_ADMIN/applications/app/tokens" -H "Authorization: Bearer $ADMIN_TOKEN" \
  -H 'Content-Type: application/json' -d '{"name":"idle","scope":["device.sendState"]}' |
  python3 -c 'import json,sys;print(json.load(sys.stdin)["token"])')
python3 - "$SL_MQTT" "$TOKEN" "$IDLE" "$SL_PID" <<'EOF'
import socket, struct, sys, time
host, port = sys.argv[1].rsplit(':', 1); tok = sys.argv[2].encode(); n = int(sys.argv[3]); pid = sys.argv[4]
def rss():
    for l in open(f'/proc/{pid}/status'):
        if l.startswith('VmRSS'): return int(l.split()[1])
def connect(cid):
    var = b'\x00\x04MQTT\x04\xc2' + struct.pack('>H', 600)
    for f in (cid, b'u', tok): var += struct.pack('>H', len(f)) + f
    l, rl = len(var), b''
    while True:
        b = l % 128; l //= 128; rl += bytes([b | (0x80 if l else 0)])
        if not l: break
    return b'\x10' + rl + var
time.sleep(0.5)
base = rss(); socks = []
for i in range(n):
    s = socket.create_connection((host, int(port))); s.sendall(connect(b'idle%d' % i)); socks.append(s)
for s in socks:
    assert s.recv(4) == b'\x20\x02\x00\x00', 'CONNACK'
time.sleep(1)
after = rss()
print(f'{n} idle MQTT connections: RSS {base} -> {after} KiB = {(after - base) * 1024 / n / 1024:.1f} KiB per connection   (target <= 16 KiB)')
EOF
stop_sluice
echo
echo "raw results: one line per run (label, msg/s, p99 ms):"
cat "$RESULTS"
