#!/usr/bin/env bash
# Reliability harness (RELIABILITY.md): overload at 10× capacity, recovery, and SIGTERM under
# sustained load. Release server on loopback, Tiny model at 224 px, random weights.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
cargo build --release -q -p crate-mae-server --bins
SERVER=target/release/crate-mae-server
LOAD=target/release/crate-mae-load
CLI=target/release/crate-mae-cli
IMG=tests/fixtures/scene.png
ADDR=http://127.0.0.1:50071
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; $(date -u +%F)"

start() {
  $SERVER --random-weights --grpc-addr 127.0.0.1:50071 --http-addr off --metrics-addr 127.0.0.1:9171 \
    --max-batch-size 8 --max-queue-images "${QUEUE:-32}" --max-images-per-request 8 --log info --log-format json "$@" \
    > target/reliability-server.log 2>&1 &
  SERVER_PID=$!
  wait_serving $ADDR $SERVER_PID || { tail -3 target/reliability-server.log; exit 1; }
}
rss_mib() { awk '/VmRSS/ {printf "%.0f", $2/1024}' /proc/$1/status; }
json() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print($2)" "$1"; }

start
echo "== capacity: closed loop, concurrency 8, 15 s"
$LOAD --addr $ADDR --image $IMG -c 8 -n 0 --duration 15 --json target/rel-capacity.json >/dev/null
CAP=$(json target/rel-capacity.json 'round(d["rps_ok"], 1)')
echo "capacity: $CAP requests/s, p99 $(json target/rel-capacity.json 'd["latency_percentiles"]["p99"]') ms; RSS $(rss_mib $SERVER_PID) MiB"

RATE=$(python3 -c "print(round(10 * $CAP))")
echo "== overload: open loop at $RATE requests/s (10x), 20 s"
( peak=0; while kill -0 $SERVER_PID 2>/dev/null; do r=$(rss_mib $SERVER_PID 2>/dev/null); [ "${r:-0}" -gt "$peak" ] && peak=$r && echo $peak > target/rel-peak-rss; sleep 0.2; done ) &
WATCH=$!
$LOAD --addr $ADDR --image $IMG -c 256 --rps "$RATE" -n 0 --duration 20 --json target/rel-overload.json >/dev/null
json target/rel-overload.json '"sent %d, OK %d (%.1f/s), codes %s; admitted p50/p99 %.0f/%.0f ms; refused p50/p99 %.2f/%.2f ms" % (d["count"], d["ok_count"], d["rps_ok"], d["status_codes"], d["latency_percentiles"]["p50"], d["latency_percentiles"]["p99"], d["failed_latency_percentiles"].get("p50", 0), d["failed_latency_percentiles"].get("p99", 0))'
echo "peak RSS during overload: $(cat target/rel-peak-rss) MiB"

echo "== recovery: right after, concurrency 4, 10 s"
$LOAD --addr $ADDR --image $IMG -c 4 -n 0 --duration 10 --json target/rel-recovery.json >/dev/null
json target/rel-recovery.json '"OK %d of %d, p50 %.0f ms, p99 %.0f ms" % (d["ok_count"], d["count"], d["latency_percentiles"]["p50"], d["latency_percentiles"]["p99"])'
kill -TERM $SERVER_PID; wait $SERVER_PID || true; kill $WATCH 2>/dev/null || true

echo "== SIGTERM under sustained load (concurrency 32, signal after 8 s)"
QUEUE=64 start --drain-timeout-secs 25
$LOAD --addr $ADDR --image $IMG -c 32 -n 0 --duration 30 --timeout 60 --json target/rel-shutdown.json >/dev/null &
LOAD_PID=$!
sleep 8
T0=$(date +%s.%N)
kill -TERM $SERVER_PID
set +e; wait $SERVER_PID; EXIT=$?; set -e
T1=$(date +%s.%N)
wait $LOAD_PID || true
echo "server exit code $EXIT after $(python3 -c "print(round($T1 - $T0, 2))") s"
grep '"drained; exiting"' target/reliability-server.log | python3 -c "import json,sys; d=json.loads(sys.stdin.read()); print('server ledger: admitted %s, answered OK %s, answered with error %s, lost %d' % (d['admitted'], d['answered_ok'], d['answered_error'], d['admitted'] - d['answered_ok'] - d['answered_error']))"
json target/rel-shutdown.json '"client view: %s" % d["status_codes"]'
