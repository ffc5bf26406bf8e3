#!/usr/bin/env bash
# Builds the CPU image from the unchanged Dockerfile and runs it the way
# deploy/base/deployment.yaml does, on a machine without a Docker engine or registry access.
#
#   sudo deploy/container-check.sh
#
# 1. Installs podman, buildah, runc and debootstrap (apt) if they are missing.
# 2. Builds local stand-ins for the Dockerfile's base images and passes them as build args:
#    debian:bookworm-slim from `debootstrap --variant=minbase bookworm`, and
#    rust:1.95-slim-bookworm as that Debian plus gcc, libc6-dev, ca-certificates, pkg-config
#    and this machine's Rust 1.95 (the rustc, cargo and rust-std components, i.e. rustup's
#    minimal profile) under /usr/local/rustup and /usr/local/cargo, as the official image has
#    them. Both are cached (image present + stamp matches) under $CACHE.
# 3. Builds the default target (the CPU runtime) with buildah, --format docker (an OCI image
#    would drop the HEALTHCHECK), --layers, the repository as context (.dockerignore applies).
# 4. Runs it as the Deployment does: uid 10001, read-only root with only /tmp writable
#    (64 MiB), all capabilities dropped, no-new-privileges, default seccomp, 2 GiB, the
#    ConfigMap's environment, RAYON_NUM_THREADS=2; host network only, on free loopback ports.
# 5. Checks health, Embed, Complete, /metrics, the image's own HEALTHCHECK command, a drain
#    under load on SIGTERM (exit 0 within the drain timeout, no accepted request lost) and
#    prints the image size. Exits non-zero if any check fails.
#
# Needs root (debootstrap, rootful podman). Environment: CRATE_MAE_CHECK_CACHE (stand-in cache,
# default /var/tmp/crate-mae-container-check), CRATE_MAE_CHECK_IMAGE (default
# localhost/crate-mae-serve:check), DEBIAN_MIRROR, RUST_SYSROOT (a Rust 1.95 toolchain),
# CRATE_MAE_CHECK_EXTRA_CA (directory of *.crt the build stand-in trusts in addition to
# Debian's; default /usr/local/share/ca-certificates, for TLS-intercepting egress proxies).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

CACHE=${CRATE_MAE_CHECK_CACHE:-/var/tmp/crate-mae-container-check}
IMAGE=${CRATE_MAE_CHECK_IMAGE:-localhost/crate-mae-serve:check}
BASE_IMAGE=localhost/crate-mae-check/debian:bookworm-slim
RUST_IMAGE=localhost/crate-mae-check/rust:1.95-slim-bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
EXTRA_CA=${CRATE_MAE_CHECK_EXTRA_CA:-/usr/local/share/ca-certificates}
RUST_MINOR=1.95
RUST_TOOLCHAIN=1.95.0-x86_64-unknown-linux-gnu
# The clients that drive the container: release builds when they run here, else the debug
# builds that `cargo test --workspace` leaves (CI), else built here. (A cuda build's clients
# need the CUDA runtime, so "present" is not enough.)
runs() { "$1/crate-mae-cli" --version >/dev/null 2>&1 && "$1/crate-mae-load" --version >/dev/null 2>&1; }
CLIENT_DIR=$ROOT/target/release
runs "$CLIENT_DIR" || CLIENT_DIR=$ROOT/target/debug
CLI=$CLIENT_DIR/crate-mae-cli
LOAD=$CLIENT_DIR/crate-mae-load
SERVICE=cratemae.v1.CrateMae
PODMAN=(podman --runtime runc --events-backend file)
BUILDAH=(buildah)
NICE=(nice -n 19)
NAME=crate-mae-check-$$

log() { printf '\n== %s\n' "$*"; }
die() { printf 'container-check: %s\n' "$*" >&2; exit 1; }
now() { date +%s; }

[ "$(id -u)" -eq 0 ] || die "run as root (debootstrap and rootful podman need it)"
if ! runs "$CLIENT_DIR"; then
  log "building the clients (debug, CPU): crate-mae-cli, crate-mae-load"
  cargo build -p crate-mae-server --bin crate-mae-cli --bin crate-mae-load
  runs "$CLIENT_DIR" || die "the clients in $CLIENT_DIR do not run"
fi

scratch=$(mktemp -d)
load_pid=
cleanup() {
  if [ -n "$load_pid" ]; then kill "$load_pid" 2>/dev/null || true; fi
  "${PODMAN[@]}" rm -f -t 0 "$NAME" >/dev/null 2>&1 || true
  rm -rf "$scratch"
}
trap cleanup EXIT

# ---- 1. tools --------------------------------------------------------------------------------
log "tools"
missing=()
for tool in podman:podman buildah:buildah runc:runc conmon:conmon debootstrap:debootstrap \
  fuse-overlayfs:fuse-overlayfs newuidmap:uidmap slirp4netns:slirp4netns curl:curl python3:python3; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || missing+=("${tool#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if ! "${NICE[@]}" apt-get install -y --no-install-recommends "${missing[@]}"; then
    apt-get update
    "${NICE[@]}" apt-get install -y --no-install-recommends "${missing[@]}"
  fi
fi
podman --version
buildah --version
mkdir -p "$CACHE"

image_id() { "${PODMAN[@]}" image inspect --format '{{.Id}}' "$1" 2>/dev/null || true; }
# A cached stand-in is reused when the image exists and its stamp matches.
fresh() { [ -f "$CACHE/$1.stamp" ] && [ "$(cat "$CACHE/$1.stamp")" = "$2" ] && [ -n "$(image_id "$3")" ]; }

# ---- 2. stand-ins ----------------------------------------------------------------------------
t_standins=$(now)
log "stand-in $BASE_IMAGE (debootstrap --variant=minbase bookworm)"
base_stamp="v4 bookworm minbase $MIRROR $SECURITY_MIRROR"
if fresh debian "$base_stamp" "$BASE_IMAGE"; then
  echo "cached: $(image_id "$BASE_IMAGE")"
else
  rootfs="$CACHE/debian-rootfs"
  rm -rf "$rootfs" "$CACHE/debian.stamp"
  "${NICE[@]}" debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR"
  # What the official image differs in: deb822 sources with updates and security, empty apt
  # lists and caches, no build-host resolv.conf or hostname.
  rm -f "$rootfs/etc/apt/sources.list" "$rootfs/etc/hostname"
  cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $SECURITY_MIRROR
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  # Current with bookworm-updates and -security, as the official image is when it is built.
  cp -L /etc/resolv.conf "$rootfs/etc/resolv.conf"
  "${NICE[@]}" chroot "$rootfs" sh -euxc \
    'apt-get update --error-on=any; DEBIAN_FRONTEND=noninteractive apt-get -y upgrade; apt-get clean'
  # The "slim" variant (debuerreotype-slimify): no docs, man pages or translations, and a
  # dpkg configuration that keeps them out of later installs.
  slim_cfg="$rootfs/etc/dpkg/dpkg.cfg.d/docker"
  echo '# This is the "slim" variant of the Debian base image.' >"$slim_cfg"
  for dir in doc groff info linda lintian/overrides locale man; do
    echo "path-exclude /usr/share/$dir/*" >>"$slim_cfg"
    [ -d "$rootfs/usr/share/$dir" ] || continue
    find "$rootfs/usr/share/$dir" -mindepth 1 -depth \( -type f -o -type l \) \
      -not -path "$rootfs/usr/share/doc/*/copyright" -not -path "$rootfs/usr/share/locale/locale.alias" -delete
    find "$rootfs/usr/share/$dir" -mindepth 1 -depth -type d -empty -delete
  done
  printf 'path-include %s\n' '/usr/share/doc/*/copyright' /usr/share/locale/locale.alias >>"$slim_cfg"
  rm -rf "$rootfs/etc/resolv.conf" "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
    "$rootfs"/var/log/*.log "$rootfs"/var/log/apt/* "$rootfs"/tmp/* "$rootfs"/debootstrap
  "${NICE[@]}" tar --numeric-owner --xattrs -C "$rootfs" -cf "$CACHE/debian-rootfs.tar" .
  rm -rf "$rootfs"
  "${PODMAN[@]}" rmi -f "$BASE_IMAGE" >/dev/null 2>&1 || true
  "${PODMAN[@]}" import --change 'CMD ["bash"]' "$CACHE/debian-rootfs.tar" "$BASE_IMAGE" >/dev/null
  rm -f "$CACHE/debian-rootfs.tar"
  echo "$base_stamp" >"$CACHE/debian.stamp"
  echo "built: $(image_id "$BASE_IMAGE")"
fi

log "stand-in $RUST_IMAGE (that Debian + gcc, libc6-dev, ca-certificates, pkg-config + this machine's Rust)"
sysroot=${RUST_SYSROOT:-$(rustc "+$RUST_TOOLCHAIN" --print sysroot 2>/dev/null || rustc --print sysroot)}
rust_version=$("$sysroot/bin/rustc" --version)
case "$rust_version" in
  "rustc $RUST_MINOR."*) ;;
  *) die "$sysroot has $rust_version; the stand-in for rust:$RUST_MINOR-slim-bookworm needs $RUST_MINOR (set RUST_SYSROOT)" ;;
esac
rustup_bin=$(command -v rustup) || die "rustup not found (the official image's cargo and rustc are rustup proxies)"
extra_ca=()
if [ -d "$EXTRA_CA" ]; then
  while IFS= read -r -d '' crt; do extra_ca+=("$crt"); done < <(find "$EXTRA_CA" -maxdepth 1 -name '*.crt' -print0 | sort -z)
fi
ca_sum=$(cat /dev/null "${extra_ca[@]}" | sha256sum | cut -c1-16)
rust_stamp="v1 base=$(image_id "$BASE_IMAGE") $("$sysroot/bin/rustc" -vV | tr '\n' ' ') $("$rustup_bin" --version 2>/dev/null) ca=$ca_sum"
if fresh rust "$rust_stamp" "$RUST_IMAGE"; then
  echo "cached: $(image_id "$RUST_IMAGE")"
else
  rm -f "$CACHE/rust.stamp"
  # The minimal profile (rustc, cargo, rust-std), file by file from rustup's component
  # manifests, as toolchain $RUST_TOOLCHAIN, with cargo and rustc as rustup proxies.
  stage="$scratch/rust"
  tc="$stage/rustup/toolchains/$RUST_TOOLCHAIN"
  rustlib="$sysroot/lib/rustlib"
  mkdir -p "$tc/lib/rustlib" "$stage/cargo/bin"
  components=(rustc cargo rust-std)
  for c in "${components[@]}"; do
    manifest="$rustlib/manifest-$c-x86_64-unknown-linux-gnu"
    [ -f "$manifest" ] || die "$sysroot lacks the $c component ($manifest)"
    sed -n 's/^file://p' "$manifest" | (cd "$sysroot" && tar --no-recursion -cf - -T -) | tar -C "$tc" -xf -
    cp "$manifest" "$tc/lib/rustlib/"
    echo "$c-x86_64-unknown-linux-gnu" >>"$tc/lib/rustlib/components"
  done
  cp "$rustlib/rust-installer-version" "$tc/lib/rustlib/"
  if [ -f "$rustlib/multirust-channel-manifest.toml" ]; then
    cp "$rustlib/multirust-channel-manifest.toml" "$tc/lib/rustlib/"
  fi
  {
    echo 'config_version = "1"'
    for c in "${components[@]}"; do
      printf '\n[[components]]\npkg = "%s"\ntarget = "x86_64-unknown-linux-gnu"\nis_extension = false\n' "$c"
    done
  } >"$tc/lib/rustlib/multirust-config.toml"
  printf 'version = "12"\ndefault_toolchain = "%s"\nprofile = "minimal"\n\n[overrides]\n' \
    "$RUST_TOOLCHAIN" >"$stage/rustup/settings.toml"
  cp "$rustup_bin" "$stage/cargo/bin/rustup"
  for proxy in cargo cargo-clippy cargo-fmt cargo-miri clippy-driver rls rust-analyzer rust-gdb \
    rust-gdbgui rust-lldb rustc rustdoc rustfmt; do
    ln -s rustup "$stage/cargo/bin/$proxy"
  done
  mkdir -p "$stage/ca"
  if [ ${#extra_ca[@]} -gt 0 ]; then
    echo "trusting ${#extra_ca[@]} extra CA certificate(s) from $EXTRA_CA in the build stand-in only"
    cp "${extra_ca[@]}" "$stage/ca/"
  fi

  ctr=$("${BUILDAH[@]}" from --pull=never "$BASE_IMAGE")
  # shellcheck disable=SC2016 # expanded inside the container
  "${NICE[@]}" "${BUILDAH[@]}" run --isolation chroot --network host "$ctr" -- sh -euxc '
    apt-get update --error-on=any
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates gcc libc6-dev pkg-config
    rm -rf /var/lib/apt/lists/*'
  "${BUILDAH[@]}" copy "$ctr" "$stage/rustup" /usr/local/rustup
  "${BUILDAH[@]}" copy "$ctr" "$stage/cargo" /usr/local/cargo
  "${BUILDAH[@]}" copy "$ctr" "$stage/ca" /usr/local/share/ca-certificates
  "${BUILDAH[@]}" config \
    --env RUSTUP_HOME=/usr/local/rustup \
    --env CARGO_HOME=/usr/local/cargo \
    --env PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env RUST_VERSION="$(echo "$rust_version" | cut -d' ' -f2)" \
    --cmd bash "$ctr"
  # shellcheck disable=SC2016 # expanded inside the container
  "${NICE[@]}" "${BUILDAH[@]}" run --isolation chroot --network host "$ctr" -- sh -euxc '
    update-ca-certificates
    chmod -R a+w "$RUSTUP_HOME" "$CARGO_HOME"
    rustup --version; cargo --version; rustc --version'
  "${PODMAN[@]}" rmi -f "$RUST_IMAGE" >/dev/null 2>&1 || true
  "${BUILDAH[@]}" commit --rm --format docker "$ctr" "$RUST_IMAGE" >/dev/null
  echo "$rust_stamp" >"$CACHE/rust.stamp"
  echo "built: $(image_id "$RUST_IMAGE")"
fi
t_standins=$(($(now) - t_standins))

# ---- 3. image --------------------------------------------------------------------------------
log "build $IMAGE (default target, from the unchanged Dockerfile)"
t_build=$(now)
"${NICE[@]}" "${BUILDAH[@]}" bud --isolation chroot --network host --pull=never --layers --format docker \
  --build-arg "RUST_IMAGE=$RUST_IMAGE" --build-arg "RUNTIME_IMAGE=$BASE_IMAGE" \
  -f Dockerfile -t "$IMAGE" .
# buildah 1.28 leaves the working container of the Dockerfile's last stage (`FROM runtime`,
# no instructions) behind; remove the ones on this image so reruns do not pile them up.
built=$(image_id "$IMAGE")
"${BUILDAH[@]}" containers --format '{{.ContainerID}} {{.ImageID}}' | while read -r cid iid; do
  if [ "$iid" = "$built" ]; then "${BUILDAH[@]}" rm "$cid" >/dev/null; fi
done
t_build=$(($(now) - t_build))

# ---- 4 + 5. run and check --------------------------------------------------------------------
t_checks=$(now)
failures=0
ok() { printf 'ok    %s\n' "$*"; }
fail() { printf 'FAIL  %s\n' "$*"; failures=$((failures + 1)); }
check() { # check DESCRIPTION COMMAND...: ok when the command succeeds; its output only on failure
  local what=$1 out
  shift
  if out=$("$@" 2>&1); then ok "$what"; else fail "$what"; printf '%s\n' "$out" | tail -20 | sed 's/^/      /'; fi
}

log "image configuration"
inspect() { "${PODMAN[@]}" image inspect --format "$1" "$IMAGE"; }
check "runs as 10001:10001 (USER)" test "$(inspect '{{.Config.User}}')" = "10001:10001"
check "exec-form ENTRYPOINT is the server" test "$(inspect '{{json .Config.Entrypoint}}')" = '["/usr/local/bin/crate-mae-server"]'
check "STOPSIGNAL is SIGTERM" test "$(inspect '{{.Config.StopSignal}}')" = "SIGTERM"
healthcheck=$(inspect '{{json .Config.Healthcheck}}')
check "HEALTHCHECK is kept in the image" test "$healthcheck" != "null"

# The Deployment's environment: the ConfigMap, and RAYON_NUM_THREADS from limits.cpu (2).
python3 - deploy/base/configmap.yaml "$scratch/env" <<'PYEOF'
import re, sys
lines, out, inside = open(sys.argv[1]).read().splitlines(), [], False
for line in lines:
    if re.match(r"^data:\s*$", line):
        inside = True
        continue
    if inside and re.match(r"^\S", line):
        break
    m = re.match(r'^\s+([A-Z0-9_]+):\s*"?([^"#]*?)"?\s*(#.*)?$', line) if inside else None
    if m:
        out.append(f"{m.group(1)}={m.group(2)}")
out.append("RAYON_NUM_THREADS=2")
open(sys.argv[2], "w").write("\n".join(out) + "\n")
PYEOF
DRAIN_TIMEOUT_SECS=$(sed -n 's/^CRATE_MAE_DRAIN_TIMEOUT_SECS=//p' "$scratch/env")
DRAIN_TIMEOUT_SECS=${DRAIN_TIMEOUT_SECS:-25}
read -r grpc_port metrics_port http_port < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')
addr=http://127.0.0.1:$grpc_port

# Environment workarounds, not part of what is checked:
# - Without CAP_SYS_RESOURCE (some sandboxes and VMs drop it even for root), runc cannot
#   raise the container's RLIMIT_NOFILE / RLIMIT_NPROC above podman's own, and rootful
#   podman asks for 1048576 of each ("error setting rlimit type 7: operation not
#   permitted"). Ask for what podman has instead (podman holds RLIMIT_NPROC at 32768).
# - Without systemd, podman cannot schedule the HEALTHCHECK timer (it logs errors); the
#   HEALTHCHECK is checked below by running the image's command instead.
run_extra=()
cap_eff=$(awk '/^CapEff:/ {print $2}' /proc/self/status)
if (((0x$cap_eff >> 24 & 1) == 0)); then
  nofile=$(ulimit -Hn)
  nproc=$(ulimit -Hu)
  if [ "$nofile" = unlimited ] || [ "$nofile" -gt 1048576 ]; then nofile=1048576; fi
  if [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ]; then nproc=32768; fi
  echo "no CAP_SYS_RESOURCE here: --ulimit nofile=$nofile:$nofile --ulimit nproc=$nproc:$nproc"
  run_extra+=(--ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc")
fi
if [ ! -d /run/systemd/system ]; then
  run_extra+=(--no-healthcheck)
fi

log "run (uid 10001, read-only root, cap-drop ALL, no-new-privileges, host network: gRPC $grpc_port, HTTP $http_port, metrics $metrics_port)"
"${NICE[@]}" "${PODMAN[@]}" run -d --name "$NAME" --network host \
  --user 10001:10001 --read-only --read-only-tmpfs=false --tmpfs /tmp:rw,size=64m,mode=1777 \
  --cap-drop ALL --security-opt no-new-privileges --memory 2g \
  --env-file "$scratch/env" "${run_extra[@]}" \
  "$IMAGE" --grpc-addr "127.0.0.1:$grpc_port" --http-addr "127.0.0.1:$http_port" \
  --metrics-addr "127.0.0.1:$metrics_port" >/dev/null

serving=
for _ in $(seq 1 150); do
  if [ "$("${PODMAN[@]}" inspect --format '{{.State.Running}}' "$NAME")" != "true" ]; then break; fi
  if "$CLI" --addr "$addr" --timeout 2 health --service "$SERVICE" >/dev/null 2>&1; then serving=1; break; fi
  sleep 1
done
if [ -n "$serving" ]; then
  ok "gRPC health of $SERVICE reaches SERVING"
else
  fail "gRPC health of $SERVICE reaches SERVING (within 150 s)"
  "${PODMAN[@]}" logs --tail 30 "$NAME" 2>&1 | sed 's/^/      /'
  exit 1
fi

pid=$("${PODMAN[@]}" inspect --format '{{.State.Pid}}' "$NAME")
check "server process runs as uid 10001" test "$(awk '/^Uid:/ {print $2}' "/proc/$pid/status")" = 10001
check "server process has no capabilities" test "$(awk '/^CapEff:/ {print $2}' "/proc/$pid/status")" = 0000000000000000
check "server process has no_new_privs" test "$(awk '/^NoNewPrivs:/ {print $2}' "/proc/$pid/status")" = 1
not() { ! "$@"; }
embed() { local out; out=$("$CLI" --addr "$addr" embed tests/fixtures/fashion-mnist/00000-*.png) && test -n "$out"; }
complete() { "$CLI" --addr "$addr" complete tests/fixtures/fashion-mnist/00000-*.png -o "$1" && test -s "$1"; }
metrics() {
  local out
  out=$(curl -fsS --max-time 5 "http://127.0.0.1:$metrics_port/metrics") && grep -q '^cratemae_requests_total{' <<<"$out"
}
check "root filesystem is read-only" not "${PODMAN[@]}" exec "$NAME" touch /probe
check "liveness service \"\" is SERVING" "$CLI" --addr "$addr" --timeout 5 health --service ""
check "Embed" embed
check "Complete" complete "$scratch/complete.png"
check "/metrics has cratemae_requests_total" metrics
# One HTTP call: OpenAI-style embeddings of a fixture, as the README's curl example sends it.
http_embed() {
  local out
  out=$(curl -fsS --max-time 30 "http://127.0.0.1:$http_port/v1/embeddings" -H 'Content-Type: application/json' \
    -d '{"model": "crate-mae", "input": "data:image/png;base64,'"$(base64 -w0 tests/fixtures/fashion-mnist/00000-ankle-boot.png)"'"}') \
    && python3 -c 'import json, sys; d = json.load(sys.stdin)["data"]; sys.exit(len(d) != 1 or len(d[0]["embedding"]) < 1)' <<<"$out"
}
check "HTTP: POST /v1/embeddings" http_embed

# The image's own HEALTHCHECK command, inside the container, with the port this run uses.
mapfile -t hc < <(python3 -c '
import json, sys
hc = json.loads(sys.argv[1]) or {}
test = hc.get("Test") or []
assert test and test[0] == "CMD", test
for arg in test[1:]:
    print(arg.replace("127.0.0.1:50051", "127.0.0.1:" + sys.argv[2]))' "$healthcheck" "$grpc_port" || true)
if [ ${#hc[@]} -gt 0 ]; then
  check "HEALTHCHECK command inside the container (${hc[*]})" "${PODMAN[@]}" exec "$NAME" "${hc[@]}"
else
  fail "HEALTHCHECK command inside the container (no exec-form HEALTHCHECK in the image: $healthcheck)"
fi

log "SIGTERM under load (crate-mae-load -c 8)"
"$LOAD" --addr "$addr" --image tests/fixtures/fashion-mnist/00000-ankle-boot.png -c 8 --duration 20 -n 0 \
  --json "$scratch/load.json" >"$scratch/load.out" 2>&1 &
load_pid=$!
sleep 4
t_term=$(date +%s.%N)
"${PODMAN[@]}" kill --signal TERM "$NAME" >/dev/null
code=$(timeout $((DRAIN_TIMEOUT_SECS + 30)) "${PODMAN[@]}" wait "$NAME" || echo "none (still running)")
elapsed=$(python3 -c "import sys, time; print(f'{time.time() - float(sys.argv[1]):.1f}')" "$t_term")
wait "$load_pid" || true
load_pid=
check "exits with code 0 on SIGTERM (got $code)" test "$code" = 0
check "exits within the drain timeout ($elapsed s <= $DRAIN_TIMEOUT_SECS s)" \
  python3 -c "import sys; sys.exit(float(sys.argv[1]) > float(sys.argv[2]))" "$elapsed" "$DRAIN_TIMEOUT_SECS"
last=$("${PODMAN[@]}" logs "$NAME" 2>&1 | grep -v '^\s*$' | tail -1)
check "last log line is \"drained; exiting\" with admitted == answered_ok + answered_error > 0" python3 -c '
import json, sys
line = json.loads(sys.argv[1])
f = line.get("fields", line)
print(sys.argv[1])
assert f["message"] == "drained; exiting", f["message"]
assert f["admitted"] > 0 and f["admitted"] == f["answered_ok"] + f["answered_error"], f' "$last"
echo "      server: $last"
echo "      load:   $(grep -i -E 'requests|ok|error' "$scratch/load.out" | head -3 | tr '\n' ' ')"

size=$(inspect '{{.Size}}')
ok "image size: $((size / 1000000)) MB ($size bytes)"
t_checks=$(($(now) - t_checks))

log "timings"
printf 'stand-ins %4d s\nbuild     %4d s\nchecks    %4d s\n' "$t_standins" "$t_build" "$t_checks"
if [ "$failures" -gt 0 ]; then
  echo "$failures check(s) failed"
  exit 1
fi
echo "all checks passed"
