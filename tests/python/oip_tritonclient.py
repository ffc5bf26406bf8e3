#!/usr/bin/env python3
"""Open Inference Protocol v2 checks through NVIDIA's tritonclient (gRPC), against a running
crate-mae-serve (never starts one). One line per check; exits 1 at the first failure.

    python oip_tritonclient.py --addr 127.0.0.1:50051 --fixtures tests/fixtures/fashion-mnist \
        --expected embeddings.json

tritonclient always sends inputs as raw_input_contents and reads outputs from
raw_output_contents (typed contents: only BYTES), so this covers the raw path.
"""
import argparse
import io
import json
import struct
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import tritonclient.grpc as tg
from PIL import Image
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

EMBED, COMPLETE = "crate-mae", "crate-mae-complete"


def check(name, ok, detail=""):
    if not ok:
        print(f"FAIL {name}: {detail}", flush=True)
        sys.exit(1)
    print(f"ok   {name}{': ' + detail if detail else ''}", flush=True)


def tensor(name, array, datatype):
    t = tg.InferInput(name, list(array.shape), datatype)
    return t.set_data_from_numpy(array)


def expect_error(name, code, fn):
    """fn must fail with gRPC status `code` and a message."""
    try:
        fn()
    except InferenceServerException as e:  # e.status() is "StatusCode.INVALID_ARGUMENT"
        check(name, e.status() == str(code) and bool(e.message()), f"{e.status()}: {e.message()}")
        return
    check(name, False, f"expected {code}, the call succeeded")


def wait_ready(c, seconds):
    """Gives a server that is still starting `seconds` to become ready; the checks follow."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            if c.is_server_ready(client_timeout=2):
                return
        except InferenceServerException:
            pass
        time.sleep(0.2)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--addr", required=True, help="HOST:PORT of the server's gRPC port")
    ap.add_argument("--fixtures", type=Path, required=True, help="folder of the 10 fixture PNGs")
    ap.add_argument("--expected", type=Path, required=True,
                    help='JSON {"<png name>": [floats…]}: embeddings, pooling mean, normalized')
    ap.add_argument("--max-images", type=int, default=64, help="the server's images-per-request limit")
    ap.add_argument("--wait", type=float, default=30, help="seconds to wait for ServerReady")
    args = ap.parse_args()

    pngs = sorted(args.fixtures.glob("*.png"))
    files = np.array([p.read_bytes() for p in pngs], dtype=np.object_)
    want = json.loads(args.expected.read_text())
    ref = np.array([want[p.name] for p in pngs], dtype=np.float32)
    check("fixtures", len(pngs) == 10 and ref.ndim == 2, f"{len(pngs)} PNGs, expected {ref.shape}")
    c = tg.InferenceServerClient(args.addr)
    wait_ready(c, args.wait)

    check("is_server_live", c.is_server_live())
    check("is_server_ready", c.is_server_ready())
    check("is_model_ready", c.is_model_ready(EMBED) and c.is_model_ready(COMPLETE))
    # As Triton: an unknown model is NOT_FOUND, not "not ready".
    expect_error("is_model_ready(unknown) → NOT_FOUND", grpc.StatusCode.NOT_FOUND,
                 lambda: c.is_model_ready("no-such-model"))
    sm = c.get_server_metadata()
    check("get_server_metadata", sm.name == "crate-mae-serve", f"{sm.name} {sm.version}")

    meta = {m: c.get_model_metadata(m) for m in (EMBED, COMPLETE)}
    version = meta[EMBED].versions[0]
    io_of = lambda m, side: {t.name: (t.datatype, list(t.shape)) for t in getattr(meta[m], side)}
    pix = io_of(EMBED, "inputs")["pixels"][1]
    s = pix[2]
    d = 128  # the built-in model's width (pooling mean, patch tokens); the embedding's depends on the pooling: -1
    L = io_of(COMPLETE, "outputs")["mask"][1][1]
    ins = {"image": ("BYTES", [-1, 1]), "pixels": ("FP32", [-1, 3, s, s])}
    # patch_tokens is returned only when named, so it is not listed.
    check("get_model_metadata crate-mae", io_of(EMBED, "inputs") == ins
          and io_of(EMBED, "outputs") == {"embedding": ("FP32", [-1, -1])}
          and (s, d, L) == (32, 128, 64), f"S={s} d={d} L={L} version {version}")
    cfg = c.get_model_config(EMBED).config
    check("get_model_config: both inputs optional, batching as served",
          [(i.name, i.optional) for i in cfg.input] == [("image", True), ("pixels", True)]
          and cfg.max_batch_size >= 10 and cfg.dynamic_batching.preferred_batch_size
          and [o.name for o in cfg.output] == ["embedding"], str(cfg)[:300])
    check("get_model_metadata crate-mae-complete", io_of(COMPLETE, "inputs") == ins
          and io_of(COMPLETE, "outputs") == {
              "reconstruction": ("BYTES", [-1]), "composite": ("BYTES", [-1]),
              "mask": ("BOOL", [-1, L]), "masked_patch_mse": ("FP32", [-1])}
          and meta[COMPLETE].versions[0] == version)
    check("model version", version.startswith("random-init-seed-")
          or (len(version) == 64 and all(ch in "0123456789abcdef" for ch in version)), version)
    expect_error("get_model_metadata(unknown) → NOT_FOUND", grpc.StatusCode.NOT_FOUND,
                 lambda: c.get_model_metadata("no-such-model"))

    params = {"pooling": "mean", "normalize": True}
    r = c.infer(EMBED, [tensor("image", files, "BYTES")], request_id="req-1", parameters=params)
    emb = r.as_numpy("embedding")
    resp = r.get_response()
    # No outputs listed: every listed output of the model, as the protocol says.
    check("infer BYTES embedding", emb.shape == (10, d) and emb.dtype == np.float32
          and r.as_numpy("patch_tokens") is None, f"{emb.shape} {emb.dtype}")
    check("response id and version", resp.id == "req-1" and resp.model_version == version
          and resp.model_name == EMBED, f"id={resp.id!r} version={resp.model_version[:16]}…")
    diff = np.abs(emb - ref).max()
    check("embedding == expected", diff <= 1e-6, f"max |diff| {diff:.2e}")
    r = c.infer(EMBED, [tensor("image", files[:3], "BYTES")], model_version=version,
                outputs=[tg.InferRequestedOutput("embedding"), tg.InferRequestedOutput("patch_tokens")])
    check("patch_tokens", r.as_numpy("patch_tokens").shape == (3, L, d)
          # unasked, the embedding is the model's recommended readout (its own width)
          and r.as_numpy("embedding").shape[0] == 3, str(r.as_numpy("patch_tokens").shape))
    norms = np.linalg.norm(r.as_numpy("embedding"), axis=1)
    check("default normalize is off", not np.allclose(norms, 1, atol=1e-3), f"norms {norms.round(3)}")
    bulk = c.infer(EMBED, [tensor("image", files, "BYTES")], parameters=params, priority=2,
                   timeout=10_000_000)
    diff = np.abs(bulk.as_numpy("embedding") - ref).max()
    check("priority 2 (bulk) and timeout parameters", diff <= 1e-6, f"max |diff| {diff:.2e}")
    stats = c.get_inference_statistics(EMBED).model_stats
    st = stats[0] if len(stats) == 1 else None
    check("get_inference_statistics", st is not None and st.name == EMBED and st.version == "1"
          and st.inference_count >= 13 and st.inference_stats.success.count >= 2
          and st.execution_count >= 1 and sum(b.compute_infer.count for b in st.batch_stats)
          == st.execution_count and st.inference_stats.compute_infer.ns > 0, str(st)[:300])
    both = c.get_inference_statistics().model_stats
    check("get_inference_statistics for every model", [m.name for m in both] == [EMBED, COMPLETE])

    zeros = np.zeros((2, 3, s, s), dtype=np.float32)
    e0 = c.infer(EMBED, [tensor("pixels", zeros, "FP32")], parameters=params).as_numpy("embedding")
    check("infer FP32 zeros", e0.shape == (2, d) and np.isfinite(e0).all()
          and np.array_equal(e0[0], e0[1]), str(e0.shape))
    noise = np.random.default_rng(0).normal(size=(1, 3, s, s)).astype(np.float32)
    e1 = c.infer(EMBED, [tensor("pixels", np.concatenate([noise, noise, zeros[:1]]), "FP32")],
                 parameters={"pooling": "cls", "layer": 1}).as_numpy("embedding")
    check("identical pixel rows, identical embeddings", np.allclose(e1[0], e1[1], atol=1e-6)
          and not np.allclose(e1[0], e1[2], atol=1e-4), "cls, layer 1")

    r = c.infer(COMPLETE, [tensor("image", files[:2], "BYTES")], parameters={"seed": 5})
    mask = r.as_numpy("mask")
    pics = [Image.open(io.BytesIO(b)) for b in [*r.as_numpy("reconstruction"), *r.as_numpy("composite")]]
    check("complete PNGs", len(pics) == 4 and all(p.format == "PNG" and p.size == (s, s) for p in pics),
          f"{[p.size for p in pics]}")
    n_masked = L - int(L * 0.25)
    check("complete mask", mask.shape == (2, L) and mask.dtype == bool
          and mask.sum(axis=1).tolist() == [n_masked] * 2, f"{mask.sum(axis=1)} of {L} hidden")
    mse = r.as_numpy("masked_patch_mse")
    check("complete mse", mse.shape == (2,) and np.isfinite(mse).all() and (mse >= 0).all(), str(mse))
    check("complete version", r.get_response().model_version == version)
    # Image i is masked with seed + i: image 1 at seed 5 is image 1 alone at seed 6.
    r6 = c.infer(COMPLETE, [tensor("image", files[1:2], "BYTES")],
                 parameters={"seed": 6, "mask_ratio": 0.5}, outputs=[tg.InferRequestedOutput("mask")])
    r6b = c.infer(COMPLETE, [tensor("image", files[1:2], "BYTES")], parameters={"seed": 6})
    m6 = r6.as_numpy("mask")
    check("mask_ratio 0.5", m6.shape == (1, L) and m6.sum() == L // 2
          and r6.as_numpy("composite") is None, f"{m6.sum()} of {L} hidden")
    check("seed + i", np.array_equal(r6b.as_numpy("mask")[0], mask[1])
          and not np.array_equal(mask[0], mask[1]))

    # Response metadata: tritonclient does not expose it, so one call on the raw stub.
    png = files[0]
    req = service_pb2.ModelInferRequest(
        model_name=EMBED, inputs=[{"name": "image", "datatype": "BYTES", "shape": [1]}],
        raw_input_contents=[struct.pack("<I", len(png)) + png])  # BYTES: u32 LE length + data
    with grpc.insecure_channel(args.addr) as ch:
        _, call = service_pb2_grpc.GRPCInferenceServiceStub(ch).ModelInfer.with_call(req, timeout=30)
    md = dict(call.initial_metadata())
    check("x-model-name / x-model-sha256", md.get("x-model-name") == EMBED
          and md.get("x-model-sha256", md.get("x-model-version")) == version, str(md))

    junk = np.array([np.random.default_rng(1).bytes(1000)], dtype=np.object_)
    INVALID = grpc.StatusCode.INVALID_ARGUMENT
    expect_error("random bytes → INVALID_ARGUMENT", INVALID,
                 lambda: c.infer(EMBED, [tensor("image", junk, "BYTES")]))
    expect_error("wrong pixels shape → INVALID_ARGUMENT", INVALID,
                 lambda: c.infer(EMBED, [tensor("pixels", zeros[:, :, :16, :16].copy(), "FP32")]))
    expect_error("wrong datatype → INVALID_ARGUMENT", INVALID,
                 lambda: c.infer(EMBED, [tensor("pixels", zeros.astype(np.float64), "FP64")]))
    expect_error("unknown input → INVALID_ARGUMENT", INVALID,
                 lambda: c.infer(EMBED, [tensor("images", files[:1], "BYTES")]))
    expect_error("unknown output → INVALID_ARGUMENT", INVALID,
                 lambda: c.infer(EMBED, [tensor("image", files[:1], "BYTES")],
                                 outputs=[tg.InferRequestedOutput("logits")]))
    expect_error("unknown model → NOT_FOUND", grpc.StatusCode.NOT_FOUND,
                 lambda: c.infer("no-such-model", [tensor("image", files[:1], "BYTES")]))
    expect_error("wrong model_version → NOT_FOUND", grpc.StatusCode.NOT_FOUND,
                 lambda: c.infer(EMBED, [tensor("image", files[:1], "BYTES")], model_version="2"))
    many = np.array([files[0]] * (args.max_images + 1), dtype=np.object_)
    expect_error("too many images → RESOURCE_EXHAUSTED", grpc.StatusCode.RESOURCE_EXHAUSTED,
                 lambda: c.infer(EMBED, [tensor("image", many, "BYTES")]))
    c.close()
    print("all checks passed")


if __name__ == "__main__":
    try:
        main()
    except (InferenceServerException, grpc.RpcError, OSError, KeyError, ValueError) as e:
        print(f"FAIL unexpected {type(e).__name__}: {e}", flush=True)
        sys.exit(1)
