#!/usr/bin/env bash
# Serving benchmarks (BENCHMARKS.md, "Serving"): the release server on loopback driven by the
# in-repo load generator.
#  1. Small model, Embed at concurrency 64: dynamic batching (max batch 8) vs max_batch_size=1.
#  2. Base model, Embed at concurrency 16 through gRPC vs the in-process encoder at batch 8.
#  3. The built-in model (what `cargo run --release` serves): Embed and Complete at
#     concurrency 64 on the Fashion-MNIST fixtures, at max batch 8 (default) and 32.
# ONLY=small|base|builtin runs one group.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
DURATION=${DURATION:-30}
IMG=tests/fixtures/scene.png
ONLY=${ONLY:-}
cargo build --release -q --bin crate-mae-server --bin crate-mae-load -p crate-mae-server
cargo build --release -q -p crate-mae --example bench
SERVER=target/release/crate-mae-server
LOAD=target/release/crate-mae-load
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; $(date -u +%F)"

run() { # name, load args..., -- server args...
  local name=$1; shift
  case "$name" in "$ONLY"*) ;; *) return 0 ;; esac
  local load_args=() server_args=()
  while [ "$1" != "--" ]; do load_args+=("$1"); shift; done; shift
  server_args=("$@")
  $SERVER --grpc-addr 127.0.0.1:50061 --http-addr off --metrics-addr 127.0.0.1:9161 --log warn "${server_args[@]}" &
  local pid=$!
  wait_serving http://127.0.0.1:50061 $pid
  echo "== $name (server: ${server_args[*]})"
  $LOAD --addr http://127.0.0.1:50061 "${load_args[@]}" --json "target/serving-$name.json" | sed -n '/Summary/,/Status/p;/\[/p'
  kill -TERM $pid; wait $pid
}

run small-batched --image $IMG -c 64 --duration "$DURATION" -n 0 -- --random-weights --preset small --max-batch-size 8
run small-batch1 --image $IMG -c 64 --duration "$DURATION" -n 0 -- --random-weights --preset small --max-batch-size 1
run base-grpc --image $IMG -c 16 --duration "$DURATION" -n 0 -- --random-weights --preset base --max-batch-size 8 --diagnostics-every 0
if [ -z "$ONLY" ] || [ "$ONLY" = base ]; then
  echo "== base in-process encoder, same machine, same run"
  target/release/examples/bench --sizes base --batches 8 --encoder-only --seconds "$DURATION"
fi
fashion=()
for f in tests/fixtures/fashion-mnist/*.png; do fashion+=(--image "$f"); done
run builtin-embed "${fashion[@]}" -c 64 --duration "$DURATION" -n 0 --
run builtin-complete "${fashion[@]}" --call complete -c 64 --duration "$DURATION" -n 0 --
run builtin-embed-batch32 "${fashion[@]}" -c 64 --duration "$DURATION" -n 0 -- --max-batch-size 32
