#!/usr/bin/env python3
"""Offline validation of the KServe manifests in deploy/kserve (no cluster, no network).

    python deploy/kserve/validate.py [FILE.yaml ...]

With no FILE: every *.yaml beside this file, then the self-test (3.) on them.

Needs the `kserve` Python SDK (which brings the `kubernetes` client): deploy/validate.sh installs
it in a venv of its own.

1. Schema. Each document is read into the KServe SDK's generated models
   (V1alpha1ClusterServingRuntime, V1alpha1ServingRuntime, V1beta1InferenceService), which the
   SDK generates from the same Go types as KServe's CRDs, with the Kubernetes client's models
   (V1Container, V1Probe, ...) below them. The SDK itself drops unknown keys and takes any type,
   so the walk here is strict: an unknown or misspelled field, a wrong type (a string where an
   integer belongs, a bare boolean as an annotation value) or a missing required field fails.
2. What the schema cannot say, from KServe's and Knative's source (KServe's default
   "Serverless" mode runs the predictor as a Knative Service):
   - the model server container is `kserve-container`; `protocolVersions` is `grpc-v2` (gRPC)
     or `v2` (REST): one port serves one of them;
   - one container port (Knative refuses more), named `h2c` for gRPC or `http1` for REST, not
     a port the queue-proxy or KServe's agents hold in the pod, with native gRPC or HTTP
     probes on it; no `lifecycle` (Knative refuses it);
   - the args read the model from /mnt/models, where KServe puts the storageUri's contents;
     the ports in the args match the declared port and the Prometheus annotations;
   - {{...}} placeholders are ones KServe can render (the InferenceService's metadata);
   - an InferenceService names an existing runtime, a format and protocol it supports, a
     storage URI scheme KServe downloads, and appends no flag the runtime already passes (KServe
     concatenates the args; the server refuses a flag given twice); a GPU request comes with
     the CUDA image and `--device cuda`.
3. Self-test: known-broken variants of the manifests (misspelled field, wrong type, second
   port, wrong port name, ...) must each be refused, so a check that stops biting fails here.
"""
import copy
import difflib
import json
import re
import sys
from pathlib import Path

import yaml
import kserve.models as kserve_models
import kubernetes.client.models as k8s_models

HERE = Path(__file__).resolve().parent
KSERVE_CONTAINER = "kserve-container"
PROTOCOLS = {"v1", "v2", "grpc-v1", "grpc-v2"}
# Knative queue-proxy (8012 http, 8013 h2c, 8022 admin, 9090 autoscaler metrics, 9091 user
# metrics, 8008 profiling) and KServe (9081 agent, 9088 aggregated metrics) in the same pod.
RESERVED_PORTS = {8008, 8012, 8013, 8022, 9090, 9091, 9081, 9088}
# Knative's container field mask (pkg/apis/serving/fieldmask.go ContainerMask, SecurityContextMask).
KNATIVE_CONTAINER_FIELDS = {
    "name", "args", "command", "env", "workingDir", "envFrom", "image", "imagePullPolicy",
    "livenessProbe", "ports", "readinessProbe", "resources", "securityContext", "startupProbe",
    "terminationMessagePath", "terminationMessagePolicy", "volumeMounts",
}
KNATIVE_SECURITY_FIELDS = {
    "capabilities", "readOnlyRootFilesystem", "runAsUser", "runAsGroup", "runAsNonRoot",
    "allowPrivilegeEscalation", "seccompProfile", "privileged",
}
# Storage URI schemes KServe's storage initializer handles (https covers Azure blob and others).
STORAGE_SCHEMES = {"pvc", "s3", "gs", "https", "http", "hdfs", "webhdfs", "oci", "hf", "file"}
# KServe renders the kserve-container, marshalled to JSON, as a Go template over the
# InferenceService's ObjectMeta (so a quoted template argument would arrive escaped).
PLACEHOLDER = re.compile(r"\{\{(.*?)\}\}")
ALLOWED_PLACEHOLDER = re.compile(r"\s*(\.Name|\.Namespace|\.(Labels|Annotations)\.[A-Za-z0-9_]+)\s*")
KINDS = {
    ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): "V1alpha1ClusterServingRuntime",
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "V1alpha1ServingRuntime",
    ("serving.kserve.io/v1beta1", "InferenceService"): "V1beta1InferenceService",
}
# Fields the Kubernetes API types as resource.Quantity (int or string); the client says str.
QUANTITY_FIELDS = {("V1ResourceRequirements", "limits"), ("V1ResourceRequirements", "requests"),
                   ("V1EmptyDirVolumeSource", "size_limit")}
LIST = re.compile(r"^(?:list|List)\[(.+)\]$")
DICT = re.compile(r"^(?:dict\(str, (.+)\)|Dict\[str, (.+)\])$")


# ---- 1. schema: a strict walk over the SDK's generated models ----------------------------------

def model_class(name):
    for module in (kserve_models, k8s_models):
        cls = getattr(module, name, None)
        if cls is not None:
            return cls
    raise LookupError(f"no SDK model named {name}")


def type_name(value):
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "list",
            dict: "mapping"}.get(type(value), type(value).__name__)


def build(value, typ, path, errors, quantity=False):
    """Checks `value` against the SDK type `typ` and returns it as SDK objects."""
    if value is None:  # null means absent; required fields are the model constructors' business
        return None
    m = LIST.match(typ)
    if m:
        if not isinstance(value, list):
            errors.append(f"{path}: expected a list, got {type_name(value)} {value!r}")
            return None
        return [build(v, m.group(1), f"{path}[{i}]", errors, quantity) for i, v in enumerate(value)]
    m = DICT.match(typ)
    if m:
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping, got {type_name(value)} {value!r}")
            return None
        return {k: build(v, m.group(1) or m.group(2), f"{path}.{k}", errors, quantity)
                for k, v in value.items()}
    if typ == "str":
        if quantity and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            errors.append(f"{path}: expected a string, got {type_name(value)} {value!r}")
        return value
    if typ == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{path}: expected an integer, got {type_name(value)} {value!r}")
        return value
    if typ in ("float", "number"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(f"{path}: expected a number, got {type_name(value)} {value!r}")
        return value
    if typ == "bool":
        if not isinstance(value, bool):
            errors.append(f"{path}: expected true or false, got {type_name(value)} {value!r}")
        return value
    if typ in ("datetime", "date"):
        if not isinstance(value, str):
            errors.append(f"{path}: expected a timestamp string, got {type_name(value)}")
        return value
    if typ == "object":  # IntOrString, free-form status and the like
        return value
    cls = model_class(typ)
    if not isinstance(value, dict):
        errors.append(f"{path}: expected a {typ} mapping, got {type_name(value)} {value!r}")
        return None
    by_json = {j: attr for attr, j in cls.attribute_map.items()}
    kwargs, before = {}, len(errors)
    for key, v in value.items():
        if key not in by_json:
            lower = {j.lower(): j for j in by_json}
            near = difflib.get_close_matches(key.lower(), lower, n=1)
            errors.append(f"{path}.{key}: unknown field in {typ}"
                          + (f" (did you mean {lower[near[0]]}?)" if near else ""))
            continue
        attr = by_json[key]
        kwargs[attr] = build(v, cls.openapi_types[attr], f"{path}.{key}", errors,
                             (typ, attr) in QUANTITY_FIELDS)
    if len(errors) > before:
        return None
    try:
        return cls(**kwargs)  # the SDK's own checks: required fields, enums
    except (ValueError, TypeError) as e:
        if callable(getattr(e, "errors", None)):  # pydantic (the Kubernetes client's models)
            detail = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        else:
            detail = " ".join(str(e).split())
        errors.append(f"{path}: {typ}: {detail[:300]}")
        return None


def check_schema(doc, where, errors):
    if not isinstance(doc, dict):
        errors.append(f"{where}: not a mapping")
        return
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key not in KINDS:
        errors.append(f"{where}: apiVersion/kind {key[0]}/{key[1]} is not one this checks "
                      f"({', '.join(f'{a}/{k}' for a, k in KINDS)})")
        return
    build(doc, KINDS[key], where, errors)


# ---- 2. KServe and Knative rules ---------------------------------------------------------------

def flags(args):
    """{--flag: value} from `--flag=value` / `--flag value` args, and the flags seen twice."""
    seen, twice, i = {}, [], 0
    while i < len(args):
        a = args[i]
        if a.startswith("--"):
            name, eq, value = a.partition("=")
            if not eq and i + 1 < len(args) and not args[i + 1].startswith("--"):
                value, i = args[i + 1], i + 1
            if name in seen:
                twice.append(name)
            seen[name] = value
        i += 1
    return seen, twice


def addr_port(addr):
    m = re.fullmatch(r".*:(\d+)", addr or "")
    return int(m.group(1)) if m else None


# What each protocol a runtime serves needs of its one port: the port's name (Knative and KServe
# read it as the protocol), the server flag that sets it, and the probe kind on it.
SERVED = {
    "grpc-v2": {"port_name": "h2c", "flag": "--grpc-addr", "probe": "grpc"},
    "v2": {"port_name": "http1", "flag": "--http-addr", "probe": "httpGet"},
}


def served_protocol(protocols):
    """The one protocol of SERVED a runtime declares, or None."""
    served = [p for p in protocols if p in SERVED]
    return served[0] if len(served) == 1 else None


def check_container(c, where, errors, protocol):
    need = SERVED[protocol]
    for key in sorted(set(c) - KNATIVE_CONTAINER_FIELDS):
        errors.append(f"{where}.{key}: Knative (KServe's Serverless mode) refuses this field")
    ports = c.get("ports") or []
    if len(ports) != 1:
        errors.append(f"{where}.ports: exactly one port, the {protocol} one (Knative refuses a "
                      f"second and KServe routes to the first); got {len(ports)}")
    port = ports[0] if ports else {}
    if port.get("name") != need["port_name"]:
        errors.append(f"{where}.ports[0].name: must be {need['port_name']} for {protocol} (KServe "
                      f"and Knative take the name as the protocol), got {port.get('name')!r}")
    if port.get("protocol", "TCP") != "TCP":
        errors.append(f"{where}.ports[0].protocol: must be TCP")
    number = port.get("containerPort")
    if number in RESERVED_PORTS:
        errors.append(f"{where}.ports[0].containerPort: {number} is held by the queue-proxy or "
                      f"KServe's agent in the pod")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        p = c.get(probe)
        if p is None:
            errors.append(f"{where}.{probe}: missing (the server has gRPC health for it)")
            continue
        g = p.get(need["probe"])
        if g is None:
            errors.append(f"{where}.{probe}: use the native {need['probe']} probe on the {protocol} port")
        elif g.get("port") != number:
            errors.append(f"{where}.{probe}.{need['probe']}.port: {g.get('port')} is not the "
                          f"{protocol} port {number}")
    if protocol == "grpc-v2":
        ready = ((c.get("readinessProbe") or {}).get("grpc") or {}).get("service")
        if ready != "cratemae.v1.CrateMae":
            errors.append(f"{where}.readinessProbe.grpc.service: must be cratemae.v1.CrateMae "
                          f"(serving once the model is loaded and warmed), got {ready!r}")
    else:
        ready = ((c.get("readinessProbe") or {}).get("httpGet") or {}).get("path")
        if ready != "/v2/health/ready":
            errors.append(f"{where}.readinessProbe.httpGet.path: must be /v2/health/ready (200 "
                          f"once the model is loaded and warmed), got {ready!r}")
    sc = c.get("securityContext") or {}
    for key in sorted(set(sc) - KNATIVE_SECURITY_FIELDS):
        errors.append(f"{where}.securityContext.{key}: Knative refuses this field")
    if sc.get("privileged") is not False and "privileged" in sc:
        errors.append(f"{where}.securityContext.privileged: may only be false")
    want = {"runAsNonRoot": True, "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False}
    for key, value in want.items():
        if sc.get(key) is not value:
            errors.append(f"{where}.securityContext.{key}: must be {str(value).lower()}")
    caps = sc.get("capabilities") or {}
    if "ALL" not in (caps.get("drop") or []):
        errors.append(f"{where}.securityContext.capabilities.drop: must contain ALL")
    if caps.get("add"):
        errors.append(f"{where}.securityContext.capabilities.add: none needed (Knative allows only "
                      f"NET_BIND_SERVICE)")
    check_env(c.get("env"), where, errors)
    rendered = json.dumps(c)
    for expr in PLACEHOLDER.findall(rendered):
        if not ALLOWED_PLACEHOLDER.fullmatch(expr):
            errors.append(f"{where}: placeholder {{{{{expr}}}}} is not one KServe can render "
                          f"(.Name, .Namespace, .Labels.x, .Annotations.x)")


def check_env(env, where, errors):
    for i, e in enumerate(env or []):
        source = (e or {}).get("valueFrom") or {}
        for key in ("fieldRef", "resourceFieldRef"):
            if key in source:
                errors.append(f"{where}.env[{i}].valueFrom.{key}: off by default in Knative "
                              f"(kubernetes.podspec-fieldref)")


def check_runtime(doc, where, errors):
    spec = doc.get("spec") or {}
    protocols = spec.get("protocolVersions") or []
    for p in protocols:
        if p not in PROTOCOLS:
            errors.append(f"{where}.spec.protocolVersions: {p!r} is not one of {sorted(PROTOCOLS)}")
    protocol = served_protocol(protocols)
    if protocol is None:
        errors.append(f"{where}.spec.protocolVersions: must be one of {sorted(SERVED)} (one port "
                      f"serves one protocol), got {protocols}")
        return
    formats = spec.get("supportedModelFormats") or []
    if not formats:
        errors.append(f"{where}.spec.supportedModelFormats: empty")
    containers = spec.get("containers") or []
    named = [i for i, c in enumerate(containers) if c.get("name") == KSERVE_CONTAINER]
    if len(named) != 1:
        errors.append(f"{where}.spec.containers: one container must be named {KSERVE_CONTAINER} "
                      f"(KServe's model server container), got {[c.get('name') for c in containers]}")
        return
    i = named[0]
    c, cw = containers[i], f"{where}.spec.containers[{i}]"
    check_container(c, cw, errors, protocol)
    args = c.get("args") or []
    if not any("/mnt/models" in a for a in args):
        errors.append(f"{cw}.args: nothing reads /mnt/models, where KServe puts the model")
    seen, twice = flags(args)
    for name in twice:
        errors.append(f"{cw}.args: {name} given twice (the server refuses it)")
    if not (seen.get("--weights") or "").startswith("/mnt/models/"):
        errors.append(f"{cw}.args: --weights must point into /mnt/models, got {seen.get('--weights')!r}")
    flag = SERVED[protocol]["flag"]
    served_port = addr_port(seen.get(flag))
    number = ((c.get("ports") or [{}])[0]).get("containerPort")
    if served_port != number:
        errors.append(f"{cw}.args: {flag} port {served_port} is not the declared port {number}")
    annotations = spec.get("annotations") or {}
    prom_port, prom_path = annotations.get("prometheus.kserve.io/port"), annotations.get("prometheus.kserve.io/path")
    if not (isinstance(prom_port, str) and prom_port.isdigit()):
        errors.append(f"{where}.spec.annotations: prometheus.kserve.io/port must be a port number "
                      f"string, got {prom_port!r}")
    else:
        metrics = addr_port(seen.get("--metrics-addr"))
        if metrics is None:
            errors.append(f"{cw}.args: --metrics-addr must be set: the image's 9090 is the "
                          f"queue-proxy's in Serverless mode")
        elif metrics != int(prom_port):
            errors.append(f"{cw}.args: --metrics-addr port {metrics} is not "
                          f"prometheus.kserve.io/port {prom_port}")
        if int(prom_port) in RESERVED_PORTS or int(prom_port) == number:
            errors.append(f"{where}.spec.annotations: prometheus.kserve.io/port {prom_port} is "
                          f"taken in the pod")
    if not (isinstance(prom_path, str) and prom_path.startswith("/")):
        errors.append(f"{where}.spec.annotations: prometheus.kserve.io/path must be a path, got {prom_path!r}")


def quantity(q):
    """resource.Quantity as a float (cpu cores, bytes, counts)."""
    m = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(q))
    if not m:
        raise ValueError(f"not a quantity: {q!r}")
    units = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    if m.group(2) not in units:
        raise ValueError(f"unknown unit in {q!r}")
    return float(m.group(1)) * units[m.group(2)]


def check_inference_service(doc, where, runtimes, errors):
    name = (doc.get("metadata") or {}).get("name") or ""
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) or len(name) > 63:
        errors.append(f"{where}.metadata.name: {name!r} does not match KServe's name format "
                      f"[a-z]([-a-z0-9]*[a-z0-9])? (a DNS-1035 label)")
    predictor = (doc.get("spec") or {}).get("predictor") or {}
    model = predictor.get("model")
    mw = f"{where}.spec.predictor.model"
    if model is None:
        errors.append(f"{mw}: missing (the runtime is chosen through predictor.model)")
        return
    runtime_name = model.get("runtime")
    runtime = runtimes.get(runtime_name)
    if runtime is None and runtime_name in runtimes:
        return  # the runtime failed its own checks above
    if runtime is None:
        errors.append(f"{mw}.runtime: {runtime_name!r} is not a runtime defined here ({sorted(runtimes)})")
        return
    rspec = runtime.get("spec") or {}
    protocol = model.get("protocolVersion")
    if protocol not in SERVED or protocol not in (rspec.get("protocolVersions") or []):
        errors.append(f"{mw}.protocolVersion: must be the protocol the runtime serves "
                      f"({rspec.get('protocolVersions')}); got {protocol!r}")
    fmt = model.get("modelFormat") or {}
    if not any(f.get("name") == fmt.get("name")
               and (fmt.get("version") is None or f.get("version") == fmt.get("version"))
               for f in rspec.get("supportedModelFormats") or []):
        errors.append(f"{mw}.modelFormat: {fmt} is not among the runtime's supportedModelFormats")
    uri = model.get("storageUri") or ""
    scheme = uri.partition("://")[0]
    if "://" not in uri or scheme not in STORAGE_SCHEMES:
        errors.append(f"{mw}.storageUri: {uri!r} is not a storage URI KServe downloads "
                      f"({', '.join(sorted(STORAGE_SCHEMES))})")
    for key in sorted(set(model) & {"lifecycle", "stdin", "tty", "volumeDevices", "ports"}):
        errors.append(f"{mw}.{key}: not for the predictor container here (Knative refuses it, "
                      f"or it would add a second port)")
    check_env(model.get("env"), mw, errors)
    rc = next((c for c in rspec.get("containers") or [] if c.get("name") == KSERVE_CONTAINER), {})
    args = [a.replace("{{.Name}}", name) for a in (rc.get("args") or []) + (model.get("args") or [])]
    seen, twice = flags(args)
    for flag in twice:
        errors.append(f"{mw}.args: {flag} is already in the runtime's args; KServe appends these, "
                      f"and the server refuses a flag given twice")
    limits = (model.get("resources") or {}).get("limits") or {}
    requests = (model.get("resources") or {}).get("requests") or {}
    gpus = limits.get("nvidia.com/gpu")
    device = seen.get("--device") or "not given"
    image = model.get("image") or rc.get("image") or ""
    if gpus is not None:
        if not device.startswith("cuda"):
            errors.append(f"{mw}.args: a GPU is requested but --device is {device}, not cuda "
                          f"(give --device=cuda here)")
        if "cuda" not in image:
            errors.append(f"{mw}.image: a GPU is requested but the image {image!r} is not the CUDA build")
        if requests.get("nvidia.com/gpu", gpus) != gpus:
            errors.append(f"{mw}.resources: nvidia.com/gpu request and limit must be equal")
    elif device.startswith("cuda"):
        errors.append(f"{mw}.resources.limits: --device {device} without an nvidia.com/gpu limit")
    for res in ("cpu", "memory"):
        if res in requests and res in limits:
            try:
                if quantity(requests[res]) > quantity(limits[res]):
                    errors.append(f"{mw}.resources: {res} request {requests[res]} is above the "
                                  f"limit {limits[res]}")
            except ValueError as e:
                errors.append(f"{mw}.resources.{res}: {e}")
    for key in ("minReplicas", "maxReplicas"):
        if isinstance(predictor.get(key), int) and predictor[key] < 0:
            errors.append(f"{where}.spec.predictor.{key}: negative")
    if (predictor.get("minReplicas") or 0) > (predictor.get("maxReplicas") or 10**9):
        errors.append(f"{where}.spec.predictor: minReplicas above maxReplicas")


# ---- driver ------------------------------------------------------------------------------------

def load(paths):
    docs = []
    for path in paths:
        with open(path) as f:
            for i, doc in enumerate(yaml.safe_load_all(f)):
                if doc is not None:
                    docs.append((f"{path.name}#{i}" if i else path.name, doc))
    return docs


def validate(docs):
    """The rules assume the shapes the schema guarantees, so they run on documents that pass it."""
    errors, valid = [], []
    for where, doc in docs:
        before = len(errors)
        check_schema(doc, where, errors)
        if len(errors) == before:
            valid.append((where, doc))
    runtimes = {}
    for where, doc in docs:
        if isinstance(doc, dict) and doc.get("kind") in ("ClusterServingRuntime", "ServingRuntime"):
            name = (doc.get("metadata") or {}).get("name")
            if (where, doc) in valid:
                before = len(errors)
                check_runtime(doc, where, errors)
                runtimes[name] = doc if len(errors) == before else None
            else:
                runtimes[name] = None
    for where, doc in valid:
        if doc.get("kind") == "InferenceService":
            check_inference_service(doc, where, runtimes, errors)
    return errors


def mutate(docs, file, fn):
    broken = copy.deepcopy(docs)
    for where, doc in broken:
        if where == file:
            fn(doc)
            return broken
    raise LookupError(file)


def self_test(docs):
    """Each variant breaks one thing; each must be refused with the expected message."""
    rt, isvc, gpu = "cluster-serving-runtime.yaml", "inference-service.yaml", "inference-service-gpu.yaml"
    rest, rest_isvc = "cluster-serving-runtime-rest.yaml", "inference-service-rest.yaml"
    kc = lambda d: d["spec"]["containers"][0]
    model = lambda d: d["spec"]["predictor"]["model"]

    def set_arg(d, flag, value):
        args = kc(d)["args"]
        args[next(i for i, a in enumerate(args) if a.startswith(flag + "="))] = f"{flag}={value}"
    cases = [
        ("misspelled field", rt, lambda d: kc(d)["ports"][0].update(containerport=kc(d)["ports"][0].pop("containerPort")),
         "unknown field"),
        ("unknown field", isvc, lambda d: model(d).update(storageURI=model(d).pop("storageUri")), "unknown field"),
        ("unknown top-level spec field", rt, lambda d: d["spec"].update(protocolVersion=["grpc-v2"]), "unknown field"),
        ("string port", rt, lambda d: kc(d)["readinessProbe"]["grpc"].update(port="50051"), "expected an integer"),
        ("list as a string", rt, lambda d: d["spec"].update(protocolVersions="grpc-v2"), "expected a list"),
        ("boolean annotation", isvc, lambda d: d["metadata"]["annotations"].update(
            {"serving.kserve.io/enable-prometheus-scraping": True}), "expected a string"),
        ("number as version", rt, lambda d: d["spec"]["supportedModelFormats"][0].update(version=1), "expected a string"),
        ("missing required field", rt, lambda d: kc(d)["livenessProbe"]["grpc"].pop("port"), "port"),
        ("container name", rt, lambda d: kc(d).update(name="server"), KSERVE_CONTAINER),
        ("port name", rt, lambda d: kc(d)["ports"][0].update(name="grpc"), "must be h2c"),
        ("second port", rt, lambda d: kc(d)["ports"].append({"name": "metrics", "containerPort": 8082}),
         "exactly one port"),
        ("both protocols on one port", rt, lambda d: d["spec"].update(protocolVersions=["v2", "grpc-v2"]),
         "one port serves one protocol"),
        ("REST port name", rest, lambda d: kc(d)["ports"][0].update(name="h2c"), "must be http1"),
        ("REST probe of the wrong kind", rest, lambda d: kc(d).update(
            readinessProbe={"grpc": {"port": 8000}}), "native httpGet probe"),
        ("REST readiness on liveness", rest, lambda d: kc(d)["readinessProbe"]["httpGet"].update(
            path="/v2/health/live"), "/v2/health/ready"),
        ("HTTP port out of step", rest, lambda d: set_arg(d, "--http-addr", "0.0.0.0:8081"),
         "is not the declared port"),
        ("service protocol the runtime lacks", rest_isvc, lambda d: model(d).update(protocolVersion="grpc-v2"),
         "must be the protocol the runtime serves"),
        ("model path", rt, lambda d: kc(d).update(args=[a for a in kc(d)["args"] if "/mnt/models" not in a]),
         "/mnt/models"),
        ("metrics on the queue-proxy's port", rt, lambda d: (
            set_arg(d, "--metrics-addr", "0.0.0.0:9090"),
            d["spec"]["annotations"].update({"prometheus.kserve.io/port": "9090"})), "taken in the pod"),
        ("metrics port out of step", rt, lambda d: set_arg(d, "--metrics-addr", "0.0.0.0:8083"),
         "is not prometheus.kserve.io/port"),
        ("gRPC port out of step", rt, lambda d: set_arg(d, "--grpc-addr", "0.0.0.0:8081"),
         "is not the declared port"),
        ("lifecycle hook", rt, lambda d: kc(d).update(lifecycle={"preStop": {"exec": {"command": ["sleep", "5"]}}}),
         "refuses this field"),
        ("unrenderable placeholder", rt, lambda d: set_arg(d, "--model-name", "{{.Spec.Name}}"), "placeholder"),
        ("readiness on the process only", rt, lambda d: kc(d)["readinessProbe"]["grpc"].update(service=""),
         "cratemae.v1.CrateMae"),
        ("writable root filesystem", rt, lambda d: kc(d)["securityContext"].update(readOnlyRootFilesystem=False),
         "readOnlyRootFilesystem"),
        ("flag repeated by the service", isvc, lambda d: model(d).update(args=["--weights=/mnt/models/x.pth"]),
         "already in the runtime's args"),
        ("unknown runtime", isvc, lambda d: model(d).update(runtime="crate-mae"), "not a runtime defined here"),
        ("unsupported format", isvc, lambda d: model(d)["modelFormat"].update(name="pytorch"), "supportedModelFormats"),
        ("storage URI", isvc, lambda d: model(d).update(storageUri="/models/crate-mae"), "storage URI"),
        ("GPU without CUDA", gpu, lambda d: model(d).update(args=[]), "not cuda"),
    ]
    failures = []
    for name, file, fn, expect in cases:
        errors = validate(mutate(docs, file, fn))
        if not any(expect in e for e in errors):
            failures.append(f"self-test '{name}' ({file}): not refused as expected ({expect!r}); "
                            f"errors: {errors or 'none'}")
    return len(cases), failures


def main():
    paths = [Path(p).resolve() for p in sys.argv[1:]] or sorted(HERE.glob("*.yaml"))
    docs = load(paths)
    # InferenceServices given alone are checked against the runtimes defined here.
    docs += [(w, d) for w, d in load(sorted(set(HERE.glob("*.yaml")) - set(paths)))
             if isinstance(d, dict) and d.get("kind") in ("ClusterServingRuntime", "ServingRuntime")]
    errors = validate(docs)
    for e in errors:
        print(f"FAIL {e}")
    if errors:
        sys.exit(1)
    for where, doc in docs:
        print(f"  {where}: {doc['kind']} {doc['metadata']['name']} OK")
    if not sys.argv[1:]:
        n, failures = self_test(docs)
        for f in failures:
            print(f"FAIL {f}")
        if failures:
            sys.exit(1)
        print(f"  self-test: {n} broken variants, each refused")


if __name__ == "__main__":
    main()
