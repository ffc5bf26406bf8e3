#!/usr/bin/env bash
# Issue 18's figures (BENCHMARKS.md, "Peers' tools and HTTP/2"), one run, the release server on
# loopback with the built-in model:
#  1. NVIDIA's perf_analyzer (OIP, concurrency 16: crate-mae with `image`, with `pixels`,
#     crate-mae-complete) beside crate-mae-load at the same concurrency (Embed, Complete).
#  2. Online before bulk: interactive Embed (1 image, concurrency 1) idle, then while
#     EmbedStream bulk work saturates the model; and the stream's throughput alone and beside it.
#  3. Memory per open HTTP/2 stream with the stream limit lifted.
#  4. Threading: adaptive `auto` against fixed 2x1 and 1x2 (Base lone requests, Base at
#     concurrency 16, the built-in model at 64), beside the in-process encoder.
# Needs the perf_analyzer venv the e2e test makes (target/python/perf-analyzer) and libb64-0d.
# ONLY=pa|priority|streams|threading runs one group.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
DURATION=${DURATION:-15}
ONLY=${ONLY:-}
cargo build --release -q --bin crate-mae-server --bin crate-mae-load --bin crate-mae-cli -p crate-mae-server
cargo build --release -q -p crate-mae --example bench
SERVER=target/release/crate-mae-server
LOAD=target/release/crate-mae-load
ADDR=127.0.0.1:50071
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores," \
  "$(grep -m1 flags /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx512f|avx512_bf16|amx_bf16|amx_tile)$' | xargs); $(date -u +%F)"
fashion=()
for f in tests/fixtures/fashion-mnist/*.png; do fashion+=(--image "$f"); done

start_server() {
  $SERVER --grpc-addr $ADDR --http-addr off --metrics-addr 127.0.0.1:9171 --log warn "$@" &
  PID=$!
  wait_serving "http://$ADDR" $PID
}
stop_server() { kill -TERM "$PID"; wait "$PID" || true; }
summary() { sed -n '/client CPU/p;/Requests\/sec (OK)/p;/Images\/sec/p;/50 % in/p;/99 % in/p;/\[[A-Z]/p'; }
# The client's own CPU time: on two cores it shares the machine with the server.
timed() { /usr/bin/time -f "  client CPU: %U s user + %S s system over %e s" "$@"; }

if [ -z "$ONLY" ] || [ "$ONLY" = pa ]; then
  VENV=target/python/perf-analyzer
  [ -x $VENV/bin/perf_analyzer ] || { echo "run the e2e test perf_analyzer_drives_both_models_and_both_inputs first (it makes $VENV)" >&2; exit 1; }
  CUDART=$(ls -d $VENV/lib/python3*/site-packages/nvidia/cuda_runtime/lib)
  scratch=$(mktemp -d); trap 'rm -rf "$scratch"' EXIT
  python3 - "$scratch" <<'PY'
import base64, json, struct, sys
png = open("tests/fixtures/fashion-mnist/00000-ankle-boot.png", "rb").read()
b64 = base64.b64encode(struct.pack("<I", len(png)) + png).decode()
json.dump({"data": [{"image": {"b64": b64}}]}, open(f"{sys.argv[1]}/image.json", "w"))
json.dump({"data": [{"pixels": {"content": [0.0] * (3 * 32 * 32)}}]}, open(f"{sys.argv[1]}/pixels.json", "w"))
PY
  start_server
  pa() { # model data
    echo "== perf_analyzer -m $1 ($2), concurrency 16"
    timed env LD_LIBRARY_PATH=$CUDART $VENV/bin/perf_analyzer -m "$1" -i grpc -u $ADDR --input-data "$scratch/$2.json" \
      --concurrency-range 16 --measurement-interval 5000 2>&1 \
      | sed -n '/Client:/,$p' | grep -E 'Throughput|p50|p99|Avg request latency|Inference count|client CPU'
  }
  pa crate-mae image
  pa crate-mae pixels
  pa crate-mae-complete image
  echo "== crate-mae-load Embed, 1 image per request, concurrency 16 (one connection)"
  timed $LOAD --addr "http://$ADDR" --image tests/fixtures/fashion-mnist/00000-ankle-boot.png -c 16 --duration "$DURATION" -n 0 2>&1 | summary
  echo "== the two Embed measurements again, back to back on the same server"
  pa crate-mae image
  timed $LOAD --addr "http://$ADDR" --image tests/fixtures/fashion-mnist/00000-ankle-boot.png -c 16 --duration "$DURATION" -n 0 2>&1 | summary
  echo "== crate-mae-load Complete, concurrency 16"
  $LOAD --addr "http://$ADDR" --image tests/fixtures/fashion-mnist/00000-ankle-boot.png --call complete -c 16 --duration "$DURATION" -n 0 | summary
  stop_server
fi

if [ -z "$ONLY" ] || [ "$ONLY" = priority ]; then
  start_server
  echo "== online alone: Embed, 1 image, concurrency 1"
  $LOAD --addr "http://$ADDR" "${fashion[@]}" -c 1 --duration "$DURATION" -n 0 | summary
  echo "== bulk alone: EmbedStream, 4 streams of 32 messages × 8 images"
  $LOAD --addr "http://$ADDR" "${fashion[@]}" --call embed-stream --images-per-request 8 --stream-messages 32 -c 4 --duration "$DURATION" -n 0 | summary
  echo "== both at once: the same stream load, and online Embed at concurrency 1 beside it"
  $LOAD --addr "http://$ADDR" "${fashion[@]}" --call embed-stream --images-per-request 8 --stream-messages 32 -c 4 --duration "$((DURATION + 2))" -n 0 > "target/priority-bulk.txt" &
  bulk=$!
  sleep 1
  $LOAD --addr "http://$ADDR" "${fashion[@]}" -c 1 --duration "$DURATION" -n 0 | summary
  wait $bulk
  echo "   (the stream beside it)"; summary < target/priority-bulk.txt
  stop_server
fi

if [ -z "$ONLY" ] || [ "$ONLY" = streams ]; then
  echo "== memory per open stream (stream limit lifted)"
  cargo test -q -p crate-mae-server --test e2e memory_per_open_stream -- --ignored --nocapture 2>&1 | grep 'open streams'
  echo "== 6 connections × 20,000 open streams at the default limits"
  cargo test -q -p crate-mae-server --test e2e streams_that_never_finish -- --nocapture 2>&1 | grep 'open streams'
fi

if [ -z "$ONLY" ] || [ "$ONLY" = threading ]; then
  for t in auto 2x1 1x2; do
    start_server --random-weights --preset base --max-batch-size 8 --diagnostics-every 0 --threading $t
    echo "== Base, --threading $t"
    echo "  one request of 8 images, concurrency 1:"
    $LOAD --addr "http://$ADDR" --image tests/fixtures/scene.png --images-per-request 8 -c 1 -n 8 | grep '50 % in'
    echo "  one image, concurrency 1:"
    $LOAD --addr "http://$ADDR" --image tests/fixtures/scene.png -c 1 -n 20 | grep '50 % in'
    echo "  concurrency 16:"
    $LOAD --addr "http://$ADDR" --image tests/fixtures/scene.png -c 16 --duration "$DURATION" -n 0 | grep 'Images/sec'
    stop_server
  done
  echo "== Base in process, both cores"
  target/release/examples/bench --sizes base --batches 1,8 --encoder-only --seconds 5 | tail -2
  echo "== built-in, concurrency 64, alternating 2x1 and auto, 6 s each"
  for t in 2x1 auto 2x1 auto 2x1 auto; do
    start_server --threading $t
    echo "  $t $($LOAD --addr "http://$ADDR" "${fashion[@]}" -c 64 --duration 6 -n 0 | grep 'Images/sec' | awk '{print $3}')"
    stop_server
  done | tee target/threading-builtin.txt
  awk '{s[$1] += $2; n[$1]++} END {for (k in s) printf "  mean %s %.0f img/s\n", k, s[k] / n[k]}' target/threading-builtin.txt
fi
