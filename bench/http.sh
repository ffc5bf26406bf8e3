#!/usr/bin/env bash
# Issue 19's figures (BENCHMARKS.md, "HTTP against gRPC"): the release server on loopback with
# the built-in model, one fixture image per request, crate-mae-load as the client for every
# protocol (the same client code, so the gap is the protocol's): gRPC Embed, OIP REST with
# JSON (base64 images), OIP REST with the binary-data extension, and /v1/embeddings, each at
# concurrency 1 (latency) and 64 (throughput). ROUNDS rounds, the protocols interleaved in each,
# so drift on a noisy machine hits all of them alike. With the perf_analyzer venv the e2e test
# makes (target/python/perf-analyzer), also perf_analyzer over HTTP and gRPC at 64.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
ROUNDS=${ROUNDS:-2}
N1=${N1:-400}
N64=${N64:-4000}
cargo build --release -q --bin crate-mae-server --bin crate-mae-load --bin crate-mae-cli -p crate-mae-server
SERVER=target/release/crate-mae-server
LOAD=target/release/crate-mae-load
GRPC=127.0.0.1:50081
HTTP=127.0.0.1:8081
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores," \
  "$(grep -m1 flags /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx512f|avx512_bf16|amx_bf16|amx_tile)$' | xargs); $(date -u +%F)"
fashion=()
for f in tests/fixtures/fashion-mnist/*.png; do fashion+=(--image "$f"); done

$SERVER --grpc-addr $GRPC --http-addr $HTTP --metrics-addr 127.0.0.1:9181 --log warn &
PID=$!
trap 'kill -TERM $PID 2>/dev/null || true' EXIT
wait_serving "http://$GRPC" $PID
summary() { sed -n '/Requests\/sec (OK)/p;/50 % in/p;/99 % in/p;/\[[A-Z]/p'; }
run() { # call url concurrency total
  echo "== $1, concurrency $3"
  $LOAD --addr "$2" --call "$1" "${fashion[@]}" -c "$3" -n "$4" | summary
}
# Warm-up: every protocol's path once.
for call in embed rest-json rest-binary openai; do
  url=http://$HTTP; [ $call = embed ] && url=http://$GRPC
  $LOAD --addr $url --call $call "${fashion[@]}" -c 4 -n 200 >/dev/null
done
for round in $(seq 1 "$ROUNDS"); do
  echo "#### round $round"
  for c in 1 64; do
    n=$N1; [ "$c" = 64 ] && n=$N64
    run embed "http://$GRPC" "$c" "$n"
    run rest-json "http://$HTTP" "$c" "$n"
    run rest-binary "http://$HTTP" "$c" "$n"
    run openai "http://$HTTP" "$c" "$n"
  done
done

VENV=target/python/perf-analyzer
if [ -x $VENV/bin/perf_analyzer ]; then
  CUDART=$(ls -d $VENV/lib/python3*/site-packages/nvidia/cuda_runtime/lib)
  scratch=$(mktemp -d)
  python3 - "$scratch" <<'PY'
import base64, json, struct, sys
png = open("tests/fixtures/fashion-mnist/00000-ankle-boot.png", "rb").read()
b64 = base64.b64encode(struct.pack("<I", len(png)) + png).decode()
json.dump({"data": [{"image": {"b64": b64}}]}, open(f"{sys.argv[1]}/image.json", "w"))
PY
  for proto in grpc http; do
    url=$GRPC; [ $proto = http ] && url=$HTTP
    echo "== perf_analyzer -i $proto (binary tensors), concurrency 64"
    env LD_LIBRARY_PATH="$CUDART" $VENV/bin/perf_analyzer -m crate-mae -i $proto -u $url \
      --input-data "$scratch/image.json" --concurrency-range 64 --measurement-interval 5000 2>&1 \
      | sed -n '/Client:/,$p' | grep -E 'Throughput|p50|p99' || true
  done
  rm -rf "$scratch"
fi
