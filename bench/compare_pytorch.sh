#!/usr/bin/env bash
# Side-by-side throughput: this crate's CRATE-MAE vs an independent PyTorch CRATE-MAE
# (bench/pytorch_reference.py, checked against the golden vectors), same machine, same run,
# alternating per size so that machine noise hits both.
#
#   python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch numpy
#   PYTHON=/tmp/torchvenv/bin/python bench/compare_pytorch.sh
#
# Environment: SIZES (tiny,small,base), BATCHES (1,8,32), SECONDS_PER (3), THREADS (2).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SIZES=${SIZES:-tiny,small,base}
BATCHES=${BATCHES:-1,8,32}
SECONDS_PER=${SECONDS_PER:-3}
THREADS=${THREADS:-2}

cargo build --release -q -p crate-mae --example bench
"$PY" bench/pytorch_reference.py --check-golden model/tests/golden/set_a >/dev/null
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; $(date -u +%F)"
for size in ${SIZES//,/ }; do
  echo "== $size: Rust (candle) =="
  RAYON_NUM_THREADS=$THREADS target/release/examples/bench --sizes "$size" --batches "$BATCHES" --seconds "$SECONDS_PER"
  echo "== $size: PyTorch =="
  "$PY" bench/pytorch_reference.py --bench --sizes "$size" --batches "$BATCHES" --threads "$THREADS" --seconds "$SECONDS_PER"
done
