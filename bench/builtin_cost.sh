#!/usr/bin/env bash
# The served cost of the built-in model against the built-in model of an earlier commit, on the
# same binary (BENCHMARKS.md, "The built-in model's two-block readout"): gRPC Embed, one
# Fashion-MNIST fixture per request, at concurrency 1 and 8, the two interleaved, ROUNDS rounds.
#
#   bench/builtin_cost.sh a5cf67b        # the commit whose asset is the baseline
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
base=${1:?usage: bench/builtin_cost.sh COMMIT}
ROUNDS=${ROUNDS:-2}
DURATION=${DURATION:-6}
cargo build --release -q -p crate-mae-server --bin crate-mae-server --bin crate-mae-load --bin crate-mae-cli
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
git show "$base:server/assets/default-model/model.safetensors" >"$scratch/base.safetensors"
images=()
for f in $(ls tests/fixtures/fashion-mnist/*.png | head -10); do images+=(--image "$f"); done
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; $(date -u +%F)"
for round in $(seq "$ROUNDS"); do
  for which in base built-in; do
    weights=()
    [ "$which" = base ] && weights=(--weights "$scratch/base.safetensors")
    target/release/crate-mae-server --grpc-addr 127.0.0.1:50071 --http-addr off \
      --metrics-addr 127.0.0.1:9171 --log warn "${weights[@]}" &
    pid=$!
    wait_serving http://127.0.0.1:50071 $pid
    for c in 1 8; do
      result=$(target/release/crate-mae-load --addr http://127.0.0.1:50071 "${images[@]}" \
        --concurrency "$c" -n 0 --duration "$DURATION" | grep -E "Images/sec|50 % in" | xargs)
      echo "round $round, $which ($( [ "$which" = base ] && echo "$base" || echo HEAD)), c=$c: $result"
    done
    kill -TERM $pid
    wait $pid 2>/dev/null || true
  done
done
