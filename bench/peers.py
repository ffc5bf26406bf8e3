"""Peers of the crate-mae encoder: PyTorch fp32, PyTorch bf16 autocast (CPU), ONNX Runtime fp32.

All three run the project's own PyTorch reference (bench/pytorch_reference.py, checked against
the golden vectors from the official code), encoder only: `forward_encoder(x)` with no mask,
i.e. the latent [B, 1+L, d] after the final norm (the embedding path). Random seeded weights.
Unless --no-complete, PyTorch also times the completion path (`Complete`): the encoder on the image
with 75 % of its patches masked, then the decoder, `forward_decoder(forward_encoder(x, mask))`;
those records have task "complete" (ONNX Runtime times the embedding path only).
ONNX Runtime runs that model exported with torch.onnx.export (opset 17, dynamic batch axis),
cached per configuration in --onnx-dir and checked against PyTorch fp32 (max abs diff <= 1e-4)
once per configuration before any timing.

`served` is the server's built-in model itself (pytorch_reference.load_served: its weights and
its default readout, the whitened grid of early blocks), timed on the default embedding, what
`Embed` returns when a request names no pooling; with --check-against (the Rust bench's JSON)
PyTorch's embedding of the fixed check image must equal the one crate-mae recorded.

Timing, per (config, batch, engine): warm-up, then calls until at least --seconds have passed
and at least 3 calls were made. ms_per_batch is the median call; images_per_s = batch divided
by that median. Engines alternate per batch so that machine noise hits all of them.

Run by bench/peers.sh (which also runs the Rust side and merges the reports), or directly:
  target/peers/venv/bin/python bench/peers.py --configs builtin,tiny --batches 1,8 \
      --threads 2 --seconds 3 --json target/peers/python.json
"""
import argparse
import hashlib
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.dont_write_bytecode = True  # no bench/__pycache__ in the work tree
sys.path.insert(0, str(Path(__file__).resolve().parent))
import pytorch_reference as ref  # noqa: E402

ENGINES = ("torch-fp32", "torch-bf16", "ort-fp32")
OPSET = 17
TOLERANCE = 1e-4
SEED = 0


class Encoder(nn.Module):
    """The embedding path as a module of its own (what gets exported)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, imgs):
        return self.model.forward_encoder(imgs)


def measure(fn, batch, seconds, min_runs=3):
    """Warm-up, then calls until >= seconds and >= min_runs; (median s, mean s, runs)."""
    # Two warm-up calls, more for fast cells: a tenth of the measuring time in all, so that
    # allocator caches, oneDNN/ORT kernels and thread pools are settled.
    t_warm = time.perf_counter()
    fn()
    fn()
    while time.perf_counter() - t_warm < 0.1 * seconds:
        fn()
    times, start = [], time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), statistics.fmean(times), len(times)


def export_onnx(encoder, config, path):
    """torch.onnx.export at opset 17 with a dynamic batch axis, to path (atomically)."""
    img_size = ref.CONFIGS[config][0]
    example = torch.randn(2, 3, img_size, img_size)
    tmp = path.with_suffix(".tmp.onnx")
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs = dict(input_names=["imgs"], output_names=["latent"], opset_version=OPSET)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:  # the TorchScript exporter, where this torch still has it
            torch.onnx.export(encoder, (example,), str(tmp), dynamo=False,
                              dynamic_axes={"imgs": {0: "batch"}, "latent": {0: "batch"}}, **kwargs)
            how = "torchscript exporter"
        except Exception as err:  # noqa: BLE001 - fall back to the dynamo exporter
            print(f"  [{config}] TorchScript exporter failed ({type(err).__name__}: "
                  f"{str(err)[:200]}); using dynamo=True", flush=True)
            batch = torch.export.Dim("batch", min=1, max=4096)
            torch.onnx.export(encoder, (example,), str(tmp), dynamo=True, external_data=False,
                              dynamic_shapes={"imgs": {0: batch}}, verbose=False, **kwargs)
            how = "dynamo exporter"
    os.replace(tmp, path)
    return how


def ort_session(path, threads):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def max_diff(got, want):
    """Max abs difference, relative to the reference's largest magnitude where that is over 1
    (a whitened embedding of a random image runs to hundreds; f32 rounding scales with it)."""
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape:
        return float("inf")
    return float(np.abs(got - want).max() / max(1.0, float(np.abs(want).max())))


def check_ort(encoder, config, sess):
    """Max diff ORT vs PyTorch fp32 at a batch other than the export's (3)."""
    img_size = ref.CONFIGS[config][0]
    x = torch.randn(3, 3, img_size, img_size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = encoder(x).numpy()
    return max_diff(sess.run(None, {"imgs": x.numpy()})[0], want)


def check_rust(encoder, config, rust_json):
    """PyTorch's embedding of the fixed check image against crate-mae's (--check-against)."""
    records = [r for r in json.loads(Path(rust_json).read_text())
               if r.get("config") == config and r.get("engine") == "crate-mae"
               and r.get("check_embedding")]
    if not records:
        raise SystemExit(f"{rust_json}: no crate-mae {config} record with check_embedding")
    with torch.inference_mode():
        want = encoder(ref.check_image(ref.CONFIGS[config][0])).flatten().numpy()
    diff = max_diff(np.array(records[0]["check_embedding"], dtype=np.float32), want)
    print(f"  [{config}] crate-mae vs PyTorch fp32, default embedding of the check image: "
          f"max diff {diff:.2e} ({'OK' if diff <= TOLERANCE else 'FAIL'}, tolerance {TOLERANCE:g})",
          flush=True)
    if diff > TOLERANCE:
        raise SystemExit(f"{config}: crate-mae's embedding differs from PyTorch's by {diff:.2e}")


def onnx_for(encoder, config, onnx_dir, threads):
    """A checked ORT session for config: the cached export if it still matches, else a new one."""
    path = Path(onnx_dir) / f"{config}.onnx"
    meta_path = path.with_suffix(".json")
    meta = {"config": config, "shape": ref.CONFIGS[config], "seed": SEED, "opset": OPSET,
            "torch": torch.__version__}
    if config == "served":  # a new asset is a new model
        meta["weights_sha256"] = hashlib.sha256(ref.SERVED_WEIGHTS.read_bytes()).hexdigest()
    fresh = False
    if not (path.exists() and meta_path.exists() and json.loads(meta_path.read_text()) == meta):
        t0 = time.perf_counter()
        how = export_onnx(encoder, config, path)
        meta_path.write_text(json.dumps(meta) + "\n")
        print(f"  [{config}] exported {path} ({how}, {time.perf_counter() - t0:.1f} s, "
              f"{path.stat().st_size / 2**20:.1f} MiB)", flush=True)
        fresh = True
    sess = ort_session(path, threads)
    diff = check_ort(encoder, config, sess)
    if diff > TOLERANCE and not fresh:  # a stale cache: export again, once
        print(f"  [{config}] cached {path} differs ({diff:.2e}): exporting again", flush=True)
        meta_path.unlink()
        return onnx_for(encoder, config, onnx_dir, threads)
    print(f"  [{config}] ORT vs PyTorch fp32: max abs diff {diff:.2e} "
          f"({'OK' if diff <= TOLERANCE else 'FAIL'}, tolerance {TOLERANCE:g})", flush=True)
    if diff > TOLERANCE:
        raise SystemExit(f"{config}: ONNX Runtime output differs from PyTorch fp32 by {diff:.2e}")
    return sess


def run(args):
    engines = args.engines.split(",")
    for e in engines:
        if e not in ENGINES:
            raise SystemExit(f"unknown engine {e!r} (expected {', '.join(ENGINES)})")
    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    versions = {"torch": torch.__version__}
    if "ort-fp32" in engines:
        import onnxruntime as ort

        versions["onnxruntime"] = ort.__version__
    print(f"{', '.join(f'{k} {v}' for k, v in versions.items())}; threads {args.threads} "
          f"(torch.get_num_threads() = {torch.get_num_threads()}); "
          f"bf16 CPU capability: {bf16_capability()}", flush=True)
    rows = []
    for config in args.configs.split(","):
        if config not in ref.CONFIGS:
            raise SystemExit(f"unknown config {config!r} (expected {', '.join(ref.CONFIGS)})")
        if config == "served":
            encoder = ref.load_served()
            if args.check_against:
                check_rust(encoder, config, args.check_against)
        else:
            encoder = Encoder(ref.build_model(config, SEED)).eval()
        img_size = ref.CONFIGS[config][0]
        sess = onnx_for(encoder, config, args.onnx_dir, args.threads) if "ort-fp32" in engines else None
        if "torch-bf16" in engines:
            x = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(1))
            with torch.inference_mode():
                want = encoder(x)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    got = encoder(x)
            print(f"  [{config}] bf16 autocast: output {got.dtype}, max abs diff vs fp32 "
                  f"{(got.float() - want).abs().max().item():.2e} (information only)", flush=True)
        for batch in [int(b) for b in args.batches.split(",")]:
            x = torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(2))
            x_np = x.numpy()

            def torch_fp32():
                with torch.inference_mode():
                    encoder(x)

            def torch_bf16():
                with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                    encoder(x)

            def ort_fp32():
                sess.run(None, {"imgs": x_np})

            patches = (img_size // ref.CONFIGS[config][1]) ** 2
            mask = ref.random_mask(batch, patches, 0.75, torch.Generator().manual_seed(3))
            model = encoder.model

            def complete(autocast):
                def fn():
                    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                        model.forward_decoder(model.forward_encoder(x, mask))
                return fn

            cells = [("embed", e, {"torch-fp32": torch_fp32, "torch-bf16": torch_bf16,
                                   "ort-fp32": ort_fp32}[e]) for e in engines]
            if args.complete:
                cells += [("complete", e, complete(e == "torch-bf16"))
                          for e in engines if e.startswith("torch")]
            for task, engine, fn in cells:
                median, mean, runs = measure(fn, batch, args.seconds)
                row = dict(engine=engine, task=task, config=config, batch=batch, threads=args.threads,
                           images_per_s=batch / median, ms_per_batch=median * 1e3,
                           images_per_s_mean=batch / mean, runs=runs,
                           version=versions["onnxruntime" if engine.startswith("ort") else "torch"])
                rows.append(row)
                print(f"  {config} b{batch} {task:8s} {engine:10s} {row['images_per_s']:9.1f} img/s  "
                      f"{row['ms_per_batch']:9.2f} ms/batch (median of {runs})", flush=True)
    return rows


def bf16_capability():
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    have = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return ", ".join(have) if have else "none (bf16 is emulated)"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="builtin,tiny,base", help=f"comma list of {', '.join(ref.CONFIGS)}")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seconds", type=float, default=3.0, help="minimum measuring time per cell and engine")
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--onnx-dir", default=str(Path(__file__).resolve().parent.parent / "target/peers/onnx"))
    p.add_argument("--complete", action=argparse.BooleanOptionalAction, default=True,
                   help="also time PyTorch's completion path (encoder on a masked image + decoder)")
    p.add_argument("--json", metavar="PATH", help="write the records as a JSON list")
    p.add_argument("--check-against", metavar="RUST_JSON",
                   help="the Rust bench's JSON: served's embedding of the check image must match")
    args = p.parse_args()
    rows = run(args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
