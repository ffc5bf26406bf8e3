#!/usr/bin/env bash
# Builds, on this machine (no GPU needed), everything bench/gpu.sh runs on a GPU host:
# stripped binaries, gzipped into target/gpu-bundle/ (git-ignored), small enough to copy
# (the GPU hosts have no Rust toolchain and no network). Only what touches the device is a
# `--features cuda` build; the CLI and the load generator are the plain ones.
#
#   bench/gpu-build.sh            # ~10 min cold on 2 cores (mostly nvcc), under a minute after
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/gpu-bundle
rm -rf "$out"
mkdir -p "$out"
pack() { # binary name
  strip -o "$out/$2" "$1"
  gzip -f -9 "$out/$2"
}
cargo build --release --locked -p crate-mae-server --bin crate-mae-load --bin crate-mae-cli
pack target/release/crate-mae-load crate-mae-load
pack target/release/crate-mae-cli crate-mae-cli
(
  # shellcheck source=../scripts/cuda-toolkit.sh
  source scripts/cuda-toolkit.sh
  # One feature set for every cuda artifact, so candle's kernels are compiled once.
  features=(-p crate-mae-server -p crate-mae --features crate-mae-server/cuda,crate-mae/cuda)
  cargo build --release --locked "${features[@]}" --bin crate-mae-server --example bench
  pack target/release/crate-mae-server crate-mae-server
  pack target/release/examples/bench bench
  # The golden parity test binary (its file name has a hash: ask cargo for it).
  golden=$(cargo test --release --locked "${features[@]}" --test golden --no-run \
    --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "golden" and m.get("executable"):
        print(m["executable"])')
  pack "$golden" golden
)
ls -la "$out"
du -sh "$out"
