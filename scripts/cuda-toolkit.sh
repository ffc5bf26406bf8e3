# Source me: makes NVIDIA's CUDA 13.0 toolkit available for `cargo build --features cuda` on a
# machine without a GPU or a driver (see the README's GPU section).
#
# - the toolkit comes from NVIDIA's PyPI wheels, into a venv (`.venv-cuda`, reused when there);
# - the link line wants unversioned libraries the wheels do not ship, and a `libcuda.so` the
#   driver would provide: both are made in `$CUDA_HOME/lib/stubs`. The `libcuda.so` stub
#   defines every driver entry point (cudarc's and cuda.h's) returning
#   CUDA_ERROR_STUB_LIBRARY, so a cuda build links, and even starts on the CPU device with the
#   stubs on LD_LIBRARY_PATH; on a GPU host the real driver is found first.
#
# Exports CUDA_HOME, PATH, CUDA_COMPUTE_CAP (90: H100/H200), CUDARC_CUDA_VERSION and
# CUDA_STUBS (the folder to put on LD_LIBRARY_PATH to start a cuda build without a driver).

_cuda_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_cuda_venv="${CUDA_VENV:-$_cuda_root/.venv-cuda}"
# Pinned: nvcc 13.0 emits PTX that driver 580 (the GPU hosts) accepts; cudarc 0.19.10 knows
# CUDA up to 13.4. nvidia-nvvm is pinned because nvcc's wheel asks for it unversioned.
_cuda_wheels="nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85 nvidia-cuda-runtime==13.0.96 nvidia-cuda-nvrtc==13.0.88 nvidia-cublas==13.1.0.3 nvidia-curand==10.4.0.35"
if [ ! -x "$_cuda_venv/bin/python" ] || [ "$(cat "$_cuda_venv/.wheels" 2>/dev/null)" != "$_cuda_wheels" ]; then
  python3 -m venv "$_cuda_venv"
  # shellcheck disable=SC2086
  "$_cuda_venv/bin/pip" install -q --disable-pip-version-check $_cuda_wheels
  echo "$_cuda_wheels" > "$_cuda_venv/.wheels"
fi
CUDA_HOME="$(echo "$_cuda_venv"/lib/python3*/site-packages/nvidia/cu13)"
export CUDA_HOME
export PATH="$CUDA_HOME/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CUDARC_CUDA_VERSION=13000
export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-2}"
export CUDA_STUBS="$CUDA_HOME/lib/stubs"
if [ ! -f "$CUDA_STUBS/libcuda.so" ]; then
  mkdir -p "$CUDA_STUBS"
  for lib in libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13 libcudart.so.13; do
    ln -sf "../$lib" "$CUDA_STUBS/${lib%.so.*}.so"
  done
  # cudarc's sources list the driver entry points. A build without the cuda feature never
  # downloads cudarc, so on a fresh machine it is fetched first (a failed `ls` must not end a
  # caller running under `set -e -o pipefail`).
  _cudarc_src() { ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.10 2>/dev/null | head -n 1 || true; }
  _cudarc="$(_cudarc_src)"
  if [ -z "$_cudarc" ]; then
    (cd "$_cuda_root" && cargo fetch -q)
    _cudarc="$(_cudarc_src)"
  fi
  if [ -z "$_cudarc" ]; then
    echo "cuda-toolkit.sh: cudarc-0.19.10 is not in the cargo registry after cargo fetch" >&2
    return 1
  fi
  {
    grep -ohE 'pub unsafe fn cu[A-Za-z0-9_]+\(' "$_cudarc/src/driver/sys/mod.rs" | sed -E 's/pub unsafe fn (cu[A-Za-z0-9_]+)\(/\1/'
    grep -ohE 'CUresult CUDAAPI cu[A-Za-z0-9_]+\(' "$CUDA_HOME/include/cuda.h" | sed -E 's/CUresult CUDAAPI (cu[A-Za-z0-9_]+)\(/\1/'
  } | sort -u | awk '{ printf "int %s(void) { return 34; }\n", $1 }' > "$CUDA_STUBS/libcuda-stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$CUDA_STUBS/libcuda.so" "$CUDA_STUBS/libcuda-stub.c"
  ln -sf libcuda.so "$CUDA_STUBS/libcuda.so.1"
fi
unset _cuda_root _cuda_venv _cuda_wheels _cudarc
unset -f _cudarc_src 2>/dev/null || true
