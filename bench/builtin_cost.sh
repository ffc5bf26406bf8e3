#!/usr/bin/env bash
# The served cost of the built-in model against a baseline from an earlier commit (BENCHMARKS.md):
# gRPC Embed, one Fashion-MNIST fixture per request, at each concurrency in CONCURRENCY, the two
# interleaved, ROUNDS rounds.
#
#   bench/builtin_cost.sh a5cf67b            # that commit's asset, on this tree's binary
#   bench/builtin_cost.sh --binary 5a338c3   # that commit's server (built in a git worktree
#                                            # under target/), serving this tree's asset
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
mode=asset
if [ "${1:-}" = --binary ]; then
  mode=binary
  shift
fi
base=${1:?usage: bench/builtin_cost.sh [--binary] COMMIT}
ROUNDS=${ROUNDS:-2}
DURATION=${DURATION:-6}
CONCURRENCY=${CONCURRENCY:-1 8}
cargo build --release -q -p crate-mae-server --bin crate-mae-server --bin crate-mae-load --bin crate-mae-cli
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
asset=server/assets/default-model/model.safetensors
if [ $mode = asset ]; then
  git show "$base:$asset" >"$scratch/base.safetensors"
  base_server=target/release/crate-mae-server
  base_weights=(--weights "$scratch/base.safetensors")
else
  # The baseline's own worktree and target folder: its crates must not overwrite this tree's.
  tree=target/baseline-$base
  [ -d "$tree/src" ] || git worktree add --force --detach "$tree/src" "$base" >/dev/null
  CARGO_TARGET_DIR=$PWD/$tree/target cargo build --release -q \
    --manifest-path "$tree/src/Cargo.toml" -p crate-mae-server --bin crate-mae-server
  base_server=$tree/target/release/crate-mae-server
  base_weights=(--weights "$asset")
fi
images=()
for f in $(ls tests/fixtures/fashion-mnist/*.png | head -10); do images+=(--image "$f"); done
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; $(date -u +%F); baseline: $mode of $base"
for round in $(seq "$ROUNDS"); do
  for which in base HEAD; do
    if [ "$which" = base ]; then
      server=$base_server
      weights=("${base_weights[@]}")
    else
      server=target/release/crate-mae-server
      weights=()
    fi
    "$server" --grpc-addr 127.0.0.1:50071 --http-addr off \
      --metrics-addr 127.0.0.1:9171 --log warn "${weights[@]}" &
    pid=$!
    wait_serving http://127.0.0.1:50071 $pid
    for c in $CONCURRENCY; do
      result=$(target/release/crate-mae-load --addr http://127.0.0.1:50071 "${images[@]}" \
        --concurrency "$c" -n 0 --duration "$DURATION" | grep -E "Images/sec|50 % in" | xargs)
      echo "round $round, $which ($( [ "$which" = base ] && echo "$mode of $base" || echo "this tree")), c=$c: $result"
    done
    kill -TERM $pid
    wait $pid 2>/dev/null || true
  done
done
