#!/usr/bin/env bash
# Start-up time and memory at rest of the release server (BENCHMARKS.md, "Memory and start-up").
#
#   bench/startup.sh                                   # the built-in model
#   target/release/examples/bench --sizes base --save-weights /tmp/base.safetensors
#   bench/startup.sh --weights /tmp/base.safetensors [--dtype bf16]
#
# Start = process start to health SERVING (polled every 50 ms); RSS from /proc 2 s later.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
cargo build --release -q -p crate-mae-server --bin crate-mae-server --bin crate-mae-cli
start=$(date +%s%N)
target/release/crate-mae-server --grpc-addr 127.0.0.1:50111 --http-addr 127.0.0.1:8111 --metrics-addr 127.0.0.1:9211 --log warn "$@" &
pid=$!
trap 'kill -TERM $pid 2>/dev/null || true' EXIT
wait_serving http://127.0.0.1:50111 $pid
ready=$(( ($(date +%s%N) - start) / 1000000 ))
sleep 2
field() { awk -v k="$1:" '$1 == k {print int($2 / 1024)}' "/proc/$pid/status"; }
echo "SERVING after ${ready} ms; RSS at rest $(field VmRSS) MiB (anonymous $(field RssAnon), file $(field RssFile)), peak $(field VmHWM) MiB"
for arg in "$@"; do
  [ -f "$arg" ] && echo "weights $arg: $(( $(stat -c %s "$arg") / 1048576 )) MiB"
done
