#!/usr/bin/env bash
# Where the CPU goes while the built-in model is served at concurrency 64 (BENCHMARKS.md,
# "Serving"): CPU time per server thread kind and of the load generator over 5 s, from /proc.
#
#   bench/cpu_split.sh [server flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
cargo build --release -q -p crate-mae-server --bins
target/release/crate-mae-server --grpc-addr 127.0.0.1:50071 --http-addr off --metrics-addr 127.0.0.1:9171 --log warn "$@" &
spid=$!
trap 'kill -TERM $spid 2>/dev/null || true' EXIT
wait_serving http://127.0.0.1:50071 $spid
fashion=(); for f in tests/fixtures/fashion-mnist/*.png; do fashion+=(--image "$f"); done
target/release/crate-mae-load --addr http://127.0.0.1:50071 "${fashion[@]}" -c 64 --duration 10 -n 0 --json /tmp/cpu-split-load.json >/dev/null &
lpid=$!
sleep 2
snap() {
  for t in /proc/$spid/task/*; do echo "$(tr ' ' _ < "$t/comm") $(awk '{print $14 + $15}' "$t/stat")"; done \
    | sed -E 's/-[0-9.]+ / /' | awk '{a[$1] += $2} END {for (k in a) print k, a[k]}' | sort
  echo "load-generator $(awk '{print $14 + $15}' "/proc/$lpid/stat")"
}
snap > /tmp/cpu-split-a; sleep 5; snap > /tmp/cpu-split-b
ticks=$(getconf CLK_TCK)
join /tmp/cpu-split-a /tmp/cpu-split-b | awk -v t="$ticks" '{printf "%-18s %.2f cores\n", $1, ($3 - $2) / (5 * t)}'
wait $lpid
python3 -c "import json; print('served images/s', round(json.load(open('/tmp/cpu-split-load.json'))['images_per_sec']))"
