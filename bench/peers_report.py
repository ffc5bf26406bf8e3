"""Merges peers-benchmark JSONs (bench/peers.sh) into a markdown table.

  python3 bench/peers_report.py crate-mae.json python.json ...
      Each file: a JSON list of {"engine", "config", "batch", "threads", "images_per_s",
      "ms_per_batch"} (the Rust bench's --json and bench/peers.py's --json). Prints
      config | batch | crate-mae img/s | torch fp32 | torch bf16 | ORT fp32 | ratios, where a
      ratio is crate-mae img/s divided by the peer's (> 1: crate-mae is faster); then, where
      the files have completion figures, the same for Complete against PyTorch.
  python3 bench/peers_report.py --serving serving.json --serving-c1 serving-c1.json --inproc crate-mae.json
      The built-in model served through gRPC (crate-mae-load --json) against the in-process
      crate-mae `served` figures (the same model on the same default embedding) at batch 8 and 32.
Standard library only.
"""
import argparse
import datetime
import json
import os
import sys
from pathlib import Path

PEERS = [("torch-fp32", "torch fp32"), ("torch-bf16", "torch bf16"), ("ort-fp32", "ORT fp32")]
OURS = "crate-mae"
OURS_BF16 = "crate-mae-bf16"  # bf16 products (AVX512-BF16), compared with torch's bf16 autocast
CONFIG_ORDER = ["served", "builtin", "tiny", "small", "base", "large"]


def machine_line():
    info, flags = {}, []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "flags" and not flags:
                flags = value.split()
            elif key in ("model name", "cpu family", "model") and key not in info:
                info[key] = value.strip()
    except OSError:
        pass
    model = info.get("model name", "unknown CPU")
    if "cpu family" in info and "model" in info:
        model += f" (family {info['cpu family']} model {info['model']})"
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"machine: {model}, {cores} cores ({', '.join(isa) or 'no AVX2'}); "
            f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}")


def load(paths):
    records = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        if isinstance(data, dict):  # tolerate {"results": [...]}
            data = data.get("results", [])
        for r in data:
            missing = {"engine", "config", "batch", "threads", "images_per_s"} - r.keys()
            if missing:
                raise SystemExit(f"{path}: record without {sorted(missing)}: {r}")
            records.append(r)
    return records


def fmt(v):
    if v is None:
        return "–"
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def ratio(a, b):
    return "–" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def cell_order(key):
    """Sort key of a (threads, config, batch) cell: threads, configs by size, batch."""
    order = {c: i for i, c in enumerate(CONFIG_ORDER)}
    return (key[0], order.get(key[1], len(order)), key[1], key[2])


def table(records):
    cells = {}  # (threads, config, batch) -> engine -> img/s (the last record wins)
    for r in records:
        if r.get("task", "embed") != "embed":
            continue
        cells.setdefault((int(r["threads"]), r["config"], int(r["batch"])), {})[r["engine"]] = float(r["images_per_s"])
    keys = sorted(cells, key=cell_order)
    threads = sorted({k[0] for k in keys})
    versions = sorted({f"{'onnxruntime' if r['engine'].startswith('ort') else r['engine'].split('-')[0]} "
                       f"{r['version']}" for r in records if r.get("version")})
    out = [machine_line(), f"threads: {', '.join(map(str, threads))}"
           + (f"; peers: {', '.join(versions)}" if versions else ""), ""]
    thread_col = len(threads) > 1
    head = (["threads"] if thread_col else []) + ["config", "batch", f"{OURS} img/s"] + \
        [name for _, name in PEERS] + [f"ratio vs {name}" for _, name in PEERS] + \
        [f"{OURS} bf16 img/s", "bf16 ratio vs torch bf16"]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    for k in keys:
        c = cells[k]
        ours = c.get(OURS)
        row = ([str(k[0])] if thread_col else []) + [k[1], str(k[2]), fmt(ours)] + \
            [fmt(c.get(e)) for e, _ in PEERS] + [ratio(ours, c.get(e)) for e, _ in PEERS] + \
            [fmt(c.get(OURS_BF16)), ratio(c.get(OURS_BF16), c.get("torch-bf16"))]
        out.append("| " + " | ".join(row) + " |")
    out.append("")
    out.append("images/s = batch / median time per batch; ratio = crate-mae ÷ peer (> 1: crate-mae faster).")
    others = sorted({e for c in cells.values() for e in c} - {OURS, OURS_BF16} - {e for e, _ in PEERS})
    if others:
        out.append(f"(records of other engines not shown: {', '.join(others)})")
    return "\n".join(out)


def completion_table(records):
    """Complete (encoder on a 75 %-masked image + decoder): crate-mae's completion figures
    (the Rust bench's completion_images_per_s) against PyTorch's task "complete" records."""
    cells = {}  # (threads, config, batch) -> engine -> img/s
    for r in records:
        key = (int(r["threads"]), r["config"], int(r["batch"]))
        if r["engine"] in (OURS, OURS_BF16) and r.get("completion_images_per_s"):
            cells.setdefault(key, {})[r["engine"]] = float(r["completion_images_per_s"])
        elif r.get("task") == "complete":
            cells.setdefault(key, {})[r["engine"]] = float(r["images_per_s"])
    keys = [k for k in cells if OURS in cells[k] and any(e in cells[k] for e in ("torch-fp32", "torch-bf16"))]
    if not keys:
        return ""
    keys.sort(key=cell_order)
    head = ["threads", "config", "batch", f"{OURS} img/s", "torch fp32", "ratio vs torch fp32",
            f"{OURS} bf16 img/s", "torch bf16", "bf16 ratio vs torch bf16"]
    out = ["", "### Complete (encoder on a 75 %-masked image, then the decoder)", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in keys:
        c = cells[k]
        out.append("| " + " | ".join([str(k[0]), k[1], str(k[2]), fmt(c.get(OURS)), fmt(c.get("torch-fp32")),
                                      ratio(c.get(OURS), c.get("torch-fp32")), fmt(c.get(OURS_BF16)),
                                      fmt(c.get("torch-bf16")), ratio(c.get(OURS_BF16), c.get("torch-bf16"))]) + " |")
    return "\n".join(out)


def serving(args):
    served = json.loads(Path(args.serving).read_text())
    inproc = {int(r["batch"]): float(r["images_per_s"]) for r in load([args.inproc])
              if r["engine"] == OURS and r["config"] == "served"}
    ok = served.get("ok_count", 0)
    total = served.get("count", 0)
    ips = served["images_per_sec"]
    p = served.get("latency_percentiles") or {}
    out = ["", "### Serving: the built-in model through gRPC vs in-process", "",
           machine_line(), "",
           "| measure | value |", "|---|---|",
           f"| served images/s, Embed, concurrency {served.get('concurrency')}, "
           f"{served.get('total_seconds', 0):.0f} s | **{ips:,.0f}** |",
           f"| OK requests | {ok:,} / {total:,} |",
           f"| latency p50 / p99 at concurrency {served.get('concurrency')} | "
           f"{p.get('p50', float('nan')):.2f} ms / {p.get('p99', float('nan')):.2f} ms |"]
    for b in (8, 32):
        if b in inproc:
            out.append(f"| in-process crate-mae `served`, batch {b} | {inproc[b]:,.0f} img/s → "
                       f"served = **{100 * ips / inproc[b]:.0f} %** |")
    if args.serving_c1:
        c1 = json.loads(Path(args.serving_c1).read_text())
        p1 = c1.get("latency_percentiles") or {}
        out.append(f"| concurrency 1: round-trip p50 / p99 | **{p1.get('p50', float('nan')):.2f} ms** / "
                   f"{p1.get('p99', float('nan')):.2f} ms ({c1['images_per_sec']:,.0f} img/s, "
                   f"{c1.get('ok_count', 0):,} / {c1.get('count', 0):,} OK) |")
    if total and ok < total:
        out.append(f"\nWARNING: {total - ok} requests failed: {served.get('status_codes')}")
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("jsons", nargs="*")
    p.add_argument("--serving", metavar="LOAD_JSON")
    p.add_argument("--serving-c1", metavar="LOAD_JSON")
    p.add_argument("--inproc", metavar="CRATE_MAE_JSON")
    args = p.parse_args()
    if args.serving:
        if not args.inproc:
            p.error("--serving needs --inproc")
        print(serving(args))
    if args.jsons:
        records = load(args.jsons)
        print(table(records))
        print(completion_table(records))
    if not args.serving and not args.jsons:
        p.error("pass JSON files, or --serving/--inproc")
    return 0


if __name__ == "__main__":
    sys.exit(main())
