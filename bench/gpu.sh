#!/usr/bin/env bash
# The GPU device check: one command on a GPU host, results as JSON (and logs) in OUT_DIR.
#
#   bench/gpu-build.sh                 # here, on any machine: the stripped cuda bundle
#   bench/gpu.sh OUT_DIR               # on the GPU host, from the repository root
#   GPU_DRY_RUN=1 bench/gpu.sh OUT_DIR # here: the same steps on the CPU device, small sizes
#   GPU_STEPS=serve bench/gpu.sh OUT_DIR   # only some groups: golden,oom,encoder,profile,torch,serve
#
# Steps (each logged, timed and given a status in OUT_DIR/steps.json; one failing step does
# not stop the others): the GPU's identity (nvidia-smi); golden parity on the device for
# f32 / bf16 / f16; the device's out-of-memory error recognised; encoder throughput for the
# built-in model, Tiny and Base at batch 1, 8, 32, 128 in each dtype; the peer, the project's
# PyTorch reference on the same device in fp32 and bf16 autocast; the server on the device
# driven by crate-mae-load at concurrency 256 (and 1), with its /metrics. Summary:
# OUT_DIR/summary.json. Well under 8 minutes on an H100.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bench/gpu.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
repo=$(pwd)
bin=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$bin"' EXIT
for f in target/gpu-bundle/*.gz; do gunzip -c "$f" > "$bin/$(basename "$f" .gz)"; done
chmod +x "$bin"/*

if [ -n "${GPU_DRY_RUN:-}" ]; then
  device=cpu dtypes=f32,bf16 batches=1,8 sizes=builtin,tiny seconds=0.3 duration=4
  # A cuda build starts without a driver only with the link stubs on the loader path.
  # shellcheck source=../scripts/cuda-toolkit.sh
  source scripts/cuda-toolkit.sh
  export LD_LIBRARY_PATH="$CUDA_STUBS:$CUDA_HOME/lib:${LD_LIBRARY_PATH:-}"
  python=${PYTHON:-target/peers/venv/bin/python}
  serve=("builtin f32" "tiny bf16")
else
  device=cuda dtypes=f32,bf16,f16 batches=1,8,32,128 sizes=builtin,tiny,base seconds=1 duration=15
  # The CUDA 13 runtime libraries the host has (next to its PyTorch).
  cublas=$(ls /opt/torch/.venv/lib/python3*/site-packages/nvidia/cu13/lib/libcublas.so.13 2>/dev/null | head -n 1)
  [ -n "$cublas" ] || cublas=$(find / -name 'libcublas.so.13' -not -path '/proc/*' 2>/dev/null | head -n 1)
  export LD_LIBRARY_PATH="$(dirname "$cublas"):${LD_LIBRARY_PATH:-}"
  python=${PYTHON:-$(ls /opt/torch/.venv/bin/python 2>/dev/null || command -v python3)}
  serve=("builtin f32" "builtin bf16" "base bf16")
fi
echo "device $device, bundle in $bin, python $python, LD_LIBRARY_PATH $LD_LIBRARY_PATH"

wanted() { [ -z "${GPU_STEPS:-}" ] || [[ ",$GPU_STEPS," == *",$1,"* ]]; }
steps="$out/steps.jsonl"
: > "$steps"
ms_since() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }
step() { # name timeout command...
  local name=$1 limit=$2; shift 2
  local t0; t0=$(date +%s%N)
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  printf '{"step": "%s", "rc": %d, "ms": %d}\n' "$name" "$rc" "$(ms_since "$t0")" >> "$steps"
  echo "== $name: rc $rc"
  tail -n 3 "$out/$name.log"
}

# 1. What GPU this is.
if command -v nvidia-smi >/dev/null; then
  step nvidia-smi 30 nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.max.sm --format=csv
  nvidia-smi -q > "$out/nvidia-smi-q.txt" 2>&1
fi

# 2. Golden parity on the device, each dtype (f32 elementwise 1e-4; bf16/f16 relative L2).
wanted golden && step golden 240 env CRATE_MAE_GOLDEN="$repo/model/tests/golden/set_a" CRATE_MAE_TEST_DEVICE="$device" \
  CRATE_MAE_TEST_DTYPES="$dtypes" "$bin/golden" --nocapture --test-threads 1

# 3. Out of memory is recognised as such (the batcher then retries smaller batches).
[ "$device" = cuda ] && wanted oom && step out-of-memory 60 "$bin/bench" --device "$device" --check-oom

# 4. Encoder throughput, this project.
wanted encoder && step encoder 400 "$bin/bench" --device "$device" --sizes "$sizes" --batches "$batches" \
  --dtypes "$dtypes" --encoder-only --seconds "$seconds" --json "$out/encoder.json"

# 4b. Where one encoder block's time goes (the largest model, in its serving precision).
[ "$device" = cuda ] && wanted profile && step profile-base-bf16 60 "$bin/bench" --device "$device" --profile --sizes base --dtypes bf16 --batches 128
[ "$device" = cuda ] && wanted profile && step profile-base-f32 60 "$bin/bench" --device "$device" --profile --sizes base --dtypes f32 --batches 32
[ "$device" = cpu ] && wanted profile && step profile-builtin 60 "$bin/bench" --device "$device" --profile --sizes builtin --dtypes f32 --batches 8

# 5. The peer on the same device: PyTorch fp32 and bf16 autocast.
if wanted torch && { [ -x "$python" ] || command -v "$python" >/dev/null; }; then
  step torch 400 "$python" bench/pytorch_reference.py --bench --device "$device" --sizes "$sizes" \
    --batches "$batches" --dtypes fp32,bf16 --encoder-only --seconds "$seconds" --json "$out/torch.json"
fi

# 6. The server on the device, driven through gRPC.
fashion=()
for f in tests/fixtures/fashion-mnist/*.png; do fashion+=(--image "$f"); done
port=50091
wanted serve || serve=()
for set in "${serve[@]}"; do
  read -r model dtype <<< "$set"
  name="serve-$model-$dtype"
  case $model in
    builtin) model_args=() images=("${fashion[@]}") ;;
    *) model_args=(--random-weights --preset "$model" --image-size 224) images=(--image tests/fixtures/scene.png) ;;
  esac
  "$bin/crate-mae-server" --device "$device" --dtype "$dtype" "${model_args[@]}" \
    --grpc-addr "127.0.0.1:$port" --http-addr off --metrics-addr "127.0.0.1:$((port + 1))" --log-format json \
    --max-queue-images 1024 \
    > "$out/$name-server.log" 2>&1 &
  pid=$!
  t0=$(date +%s%N)
  until "$bin/crate-mae-cli" --addr "http://127.0.0.1:$port" --timeout 1 health --service cratemae.v1.CrateMae >/dev/null 2>&1; do
    if ! kill -0 "$pid" 2>/dev/null || [ "$(ms_since "$t0")" -gt 120000 ]; then break; fi
    sleep 0.2
  done
  printf '{"step": "%s-ready", "ms": %d}\n' "$name" "$(ms_since "$t0")" >> "$steps"
  step "$name-c1" 60 "$bin/crate-mae-load" --addr "http://127.0.0.1:$port" "${images[@]}" -c 1 \
    --duration 3 -n 0 --json "$out/$name-c1.json"
  # CPU seconds of the server and of the load generator over the run: which one is the
  # bottleneck when the GPU is not.
  server_ticks0=$(awk '{print $14 + $15}' "/proc/$pid/stat")
  times > "$out/.times"; children0=$(tail -n 1 "$out/.times")
  t0=$(date +%s%N)
  step "$name-c256" 120 "$bin/crate-mae-load" --addr "http://127.0.0.1:$port" "${images[@]}" -c 256 \
    --connections 8 --duration "$duration" -n 0 --json "$out/$name-c256.json"
  wall=$(ms_since "$t0")
  server_ticks1=$(awk '{print $14 + $15}' "/proc/$pid/stat")
  times > "$out/.times"; children1=$(tail -n 1 "$out/.times")
  echo "{\"step\": \"$name-cpu\", \"wall_ms\": $wall, \"server_cpu_ticks\": $((server_ticks1 - server_ticks0)), \"ticks_per_s\": $(getconf CLK_TCK), \"children_before\": \"$children0\", \"children_after\": \"$children1\", \"cores\": $(nproc)}" >> "$steps"
  curl -s "http://127.0.0.1:$((port + 1))/metrics" > "$out/$name-metrics.txt" 2>/dev/null \
    || python3 -c "import urllib.request,sys; sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:$((port + 1))/metrics').read().decode())" > "$out/$name-metrics.txt"
  kill -TERM "$pid"; wait "$pid"
  echo "{\"step\": \"$name-exit\", \"rc\": $?}" >> "$steps"
  port=$((port + 10))
done

# 7. One summary.
"$(command -v python3 || echo "$python")" - "$out" <<'PY'
import json, pathlib, re, sys
out = pathlib.Path(sys.argv[1])
load = lambda p: json.loads(p.read_text()) if p.exists() else None
summary = {"steps": [json.loads(l) for l in (out / "steps.jsonl").read_text().splitlines() if l.strip()]}
smi = out / "nvidia-smi.log"
summary["gpu"] = smi.read_text().strip().splitlines()[-1] if smi.exists() else "none (dry run)"
golden = out / "golden.log"
summary["golden"] = [l for l in golden.read_text().splitlines() if "tensors match" in l or "failed" in l] if golden.exists() else None
summary["encoder"] = load(out / "encoder.json")
torch = load(out / "torch.json")
summary["torch"] = torch["results"] if torch else None
summary["torch_version"] = torch and torch.get("torch_version")
serving = {}
for p in sorted(out.glob("serve-*-c*.json")):
    r = json.loads(p.read_text())
    serving[p.stem] = {k: r.get(k) for k in ("images_per_sec", "rps", "ok_count", "status_codes", "latency_percentiles")}
summary["serving"] = serving
gauges = {}
for p in sorted(out.glob("serve-*-metrics.txt")):
    gauges[p.stem] = [l for l in p.read_text().splitlines() if l.startswith(("cratemae_gpu_", "cratemae_batch_size_sum", "cratemae_batch_size_count"))]
summary["metrics"] = gauges
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps({k: summary[k] for k in ("gpu", "golden", "steps")}, indent=1))
PY
