#!/usr/bin/env bash
# Peers benchmark, run by hand (not in CI): this crate's encoder (Rust/candle) against
# PyTorch fp32, PyTorch bf16 autocast (CPU) and ONNX Runtime fp32, all at the same thread
# count, in ONE run, interleaved per configuration so that machine noise hits every engine.
# The peers run the project's own PyTorch reference (bench/pytorch_reference.py, checked
# against the golden vectors); ONNX Runtime runs that model exported with torch.onnx.export
# (opset 17, dynamic batch axis). The embedding path, no mask: for `served`, the built-in model
# itself (its weights) on its default embedding (early blocks, then the whitened grid readout:
# what `Embed` returns), the engines checked to agree on a fixed image; for the other configs
# the whole encoder (latent after the final norm) on random weights. Then (SKIP_SERVING=1 skips
# it) the built-in model served through gRPC against its own in-process figure.
#
#   bench/peers.sh                                   # everything, THREADS=2
#   CONFIGS=served,builtin BATCHES=1,8 SECONDS_PER=1 SKIP_SERVING=1 bench/peers.sh
#   SETUP_ONLY=1 bench/peers.sh                      # only create the Python venv
#
# Environment: CONFIGS (served,builtin,tiny,base), BATCHES (1,8,32), THREADS (2), SECONDS_PER (3,
# minimum measuring time per cell and engine), ENGINES (torch-fp32,torch-bf16,ort-fp32),
# DURATION (20, seconds per serving run), SKIP_SERVING, SKIP_COMPLETE (only the embedding path;
# otherwise Complete, encoder on a 75 %-masked image + decoder, is timed beside PyTorch's too),
# SETUP_ONLY, OUT (target/peers).
# The venv (target/peers/venv, 5.5 GiB with PyPI's torch, which pulls the CUDA runtime wheels;
# about 3 minutes to install) is created once and reused while its stamp file matches the
# pinned requirements below. The ONNX exports are cached in target/peers/onnx.
# Run it on an otherwise idle machine: PyTorch's OpenMP pool collapses when another process
# takes a core (2 threads next to a busy compiler measured 30x slower than 1 thread).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
CONFIGS=${CONFIGS:-served,builtin,tiny,base}
BATCHES=${BATCHES:-1,8,32}
THREADS=${THREADS:-2}
SECONDS_PER=${SECONDS_PER:-3}
ENGINES=${ENGINES:-torch-fp32,torch-bf16,ort-fp32}
DURATION=${DURATION:-20}
OUT=${OUT:-target/peers}
VENV=$OUT/venv
PY=$VENV/bin/python

# Pinned peers. onnxscript is what torch.onnx.export needs for its dynamo exporter (peers.py
# uses the TorchScript exporter when torch still has it, and falls back to dynamo otherwise).
# numpy 2.4.6: the last numpy for Python 3.11 (numpy 2.5 needs 3.12; python3 here is 3.11).
REQS=(torch==2.15.0 onnx==1.23.2 onnxscript==0.7.2 onnxruntime==1.31.1 numpy==2.4.6)
CPU_INDEX=https://download.pytorch.org/whl/cpu

setup_venv() {
  local stamp=$VENV/.peers-requirements
  if [ -x "$PY" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "${REQS[*]}" ]; then
    return 0
  fi
  echo "== creating $VENV (${REQS[*]})"
  local t0=$SECONDS
  rm -rf "$VENV"
  mkdir -p "$OUT"
  python3 -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip
  # The CPU-only torch wheel (~200 MB) when its index is reachable; otherwise PyPI's, which
  # is the same CPU code plus the CUDA runtime wheels (unused here, but large).
  if python3 - "$CPU_INDEX/torch/" <<'EOF' 2>/dev/null; then
import sys, urllib.request
urllib.request.urlopen(sys.argv[1], timeout=10).read(1)
EOF
    echo "   torch from $CPU_INDEX"
    "$PY" -m pip install -q "${REQS[0]}" --index-url "$CPU_INDEX" --extra-index-url https://pypi.org/simple
  else
    echo "   $CPU_INDEX unreachable: torch from PyPI"
    "$PY" -m pip install -q "${REQS[0]}"
  fi
  "$PY" -m pip install -q "${REQS[@]:1}"
  echo "${REQS[*]}" >"$stamp"
  echo "   venv ready in $((SECONDS - t0)) s, $(du -sh "$VENV" | cut -f1)"
}

setup_venv
"$PY" -c 'import torch, onnx, onnxruntime, numpy; print(f"torch {torch.__version__}, onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}, numpy {numpy.__version__}")'
[ -n "${SETUP_ONLY:-}" ] && exit 0

cargo build --release -q -p crate-mae --example bench
mkdir -p "$OUT"
stamp=$(date -u +%Y%m%dT%H%M%SZ)
jsons=()
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), family $(grep -m1 'cpu family' /proc/cpuinfo | cut -d: -f2 | xargs) model $(grep -m1 '^model\s' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores, flags: $(grep -m1 flags /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx2|fma|avx512f|avx512_bf16|amx_bf16|amx_int8|amx_tile)$' | xargs); $(date -u +%F)"
echo "threads: $THREADS, seconds per cell: $SECONDS_PER, batches: $BATCHES"
for config in ${CONFIGS//,/ }; do
  echo "== $config: crate-mae (Rust/candle)"
  rust_json=$OUT/crate-mae-$config-$stamp.json
  # RAYON_NUM_THREADS as well as --threads: candle's CPU kernels size their pool from it.
  RAYON_NUM_THREADS=$THREADS target/release/examples/bench --sizes "$config" --batches "$BATCHES" \
    --dtypes f32,bf16 ${SKIP_COMPLETE:+--encoder-only} --seconds "$SECONDS_PER" --threads "$THREADS" --json "$rust_json"
  jsons+=("$rust_json")
  echo "== $config: $ENGINES"
  py_json=$OUT/python-$config-$stamp.json
  # OMP/MKL variables too, so that no library sizes a pool from nproc behind set_num_threads.
  OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS "$PY" bench/peers.py --configs "$config" \
    --batches "$BATCHES" --threads "$THREADS" --seconds "$SECONDS_PER" --engines "$ENGINES" \
    --onnx-dir "$OUT/onnx" ${SKIP_COMPLETE:+--no-complete} --json "$py_json" --check-against "$rust_json"
  jsons+=("$py_json")
done

echo
echo "== report ($OUT/peers-$stamp.md)"
"$PY" bench/peers_report.py "${jsons[@]}" | tee "$OUT/peers-$stamp.md"

[ -n "${SKIP_SERVING:-}" ] && exit 0

# ---- Part 2: the built-in model served through gRPC vs its own in-process figure ----------
cargo build --release -q -p crate-mae-server --bin crate-mae-server --bin crate-mae-cli --bin crate-mae-load
ADDR=127.0.0.1:50071
fashion=()
for f in tests/fixtures/fashion-mnist/*.png; do fashion+=(--image "$f"); done
target/release/crate-mae-server --grpc-addr $ADDR --http-addr off --metrics-addr 127.0.0.1:9171 --log warn &
server_pid=$!
trap 'kill -TERM $server_pid 2>/dev/null || true' EXIT
wait_serving http://$ADDR $server_pid
echo
echo "== serving: built-in model via gRPC, Embed, 1 image per request, ${DURATION} s per run"
target/release/crate-mae-load --addr http://$ADDR "${fashion[@]}" -c 64 --duration "$DURATION" -n 0 \
  --json "$OUT/serving.json" >/dev/null
target/release/crate-mae-load --addr http://$ADDR "${fashion[@]}" -c 1 --duration "$DURATION" -n 0 \
  --json "$OUT/serving-c1.json" >/dev/null
kill -TERM $server_pid
wait $server_pid || true
trap - EXIT
# The in-process figure from the same (later) minutes of the machine, same thread count.
inproc_json=$OUT/crate-mae-served-serving-$stamp.json
RAYON_NUM_THREADS=$THREADS target/release/examples/bench --sizes served --batches 8,32 \
  --encoder-only --seconds "$SECONDS_PER" --threads "$THREADS" --json "$inproc_json" >/dev/null
"$PY" bench/peers_report.py --serving "$OUT/serving.json" --serving-c1 "$OUT/serving-c1.json" \
  --inproc "$inproc_json" | tee -a "$OUT/peers-$stamp.md"
