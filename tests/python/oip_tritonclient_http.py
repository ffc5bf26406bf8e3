#!/usr/bin/env python3
"""Open Inference Protocol v2 REST checks through NVIDIA's tritonclient.http, against a running
crate-mae-serve (never starts one). One line per check; exits 1 at the first failure.

    python oip_tritonclient_http.py --addr 127.0.0.1:8000 --fixtures tests/fixtures/fashion-mnist \
        --expected embeddings.json

tritonclient.http sends tensors with Triton's binary-data extension by default and as JSON
with binary_data=False (BYTES only as UTF-8 text, so images go binary); both are covered, and
outputs both ways.
"""
import argparse
import base64
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import tritonclient.http as th
from PIL import Image
from tritonclient.utils import InferenceServerException

EMBED, COMPLETE = "crate-mae", "crate-mae-complete"


def check(name, ok, detail=""):
    if not ok:
        print(f"FAIL {name}: {detail}", flush=True)
        sys.exit(1)
    print(f"ok   {name}{': ' + detail if detail else ''}", flush=True)


def tensor(name, array, datatype, binary=True):
    t = th.InferInput(name, list(array.shape), datatype)
    return t.set_data_from_numpy(array, binary_data=binary)


def expect_error(name, status, fn):
    """fn must fail with HTTP `status` and a message."""
    try:
        fn()
    except InferenceServerException as e:
        check(name, e.status() == str(status) and bool(e.message()), f"{e.status()}: {e.message()}")
        return
    check(name, False, f"expected HTTP {status}, the call succeeded")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--addr", required=True, help="HOST:PORT of the server's HTTP port")
    ap.add_argument("--fixtures", type=Path, required=True, help="folder of the 10 fixture PNGs")
    ap.add_argument("--expected", type=Path, required=True,
                    help='JSON {"<png name>": [floats…]}: embeddings, pooling mean, normalized')
    ap.add_argument("--wait", type=float, default=30, help="seconds to wait for readiness")
    args = ap.parse_args()

    pngs = sorted(args.fixtures.glob("*.png"))
    files = np.array([p.read_bytes() for p in pngs], dtype=np.object_)
    want = json.loads(args.expected.read_text())
    ref = np.array([want[p.name] for p in pngs], dtype=np.float32)
    c = th.InferenceServerClient(args.addr)
    end = time.monotonic() + args.wait
    while time.monotonic() < end and not c.is_server_ready():
        time.sleep(0.2)

    check("is_server_live / is_server_ready", c.is_server_live() and c.is_server_ready())
    check("is_model_ready", c.is_model_ready(EMBED) and c.is_model_ready(COMPLETE)
          and not c.is_model_ready("no-such-model"))
    sm = c.get_server_metadata()
    check("get_server_metadata", sm["name"] == "crate-mae-serve"
          and "statistics" in sm["extensions"], str(sm))
    meta = c.get_model_metadata(EMBED)
    version = meta["versions"][0]
    ins = {t["name"]: (t["datatype"], t["shape"]) for t in meta["inputs"]}
    s = ins["pixels"][1][2]
    width = meta["outputs"][0]["shape"][1]  # -1: the embedding's width depends on the pooling
    check("get_model_metadata", ins == {"image": ("BYTES", [-1, 1]), "pixels": ("FP32", [-1, 3, s, s])}
          and (s, width) == (32, -1), str(meta))
    d = 128  # the built-in model's width: embeddings with pooling mean
    cfg = c.get_model_config(EMBED)
    check("get_model_config", [(i["name"], i["optional"]) for i in cfg["input"]]
          == [("image", True), ("pixels", True)] and cfg["max_batch_size"] >= 10, str(cfg)[:200])

    params = {"pooling": "mean", "normalize": True}
    r = c.infer(EMBED, [tensor("image", files, "BYTES")], request_id="rest-1", parameters=params)
    emb = r.as_numpy("embedding")
    diff = np.abs(emb - ref).max()
    check("infer, binary in and out: embedding == gRPC Embed", emb.shape == (10, d) and diff <= 1e-6,
          f"max |diff| {diff:.2e}")
    resp = r.get_response()
    check("response id, name and version", resp["id"] == "rest-1" and resp["model_name"] == EMBED
          and resp["model_version"] == version)
    r = c.infer(EMBED, [tensor("image", files[:3], "BYTES")], parameters=params,
                outputs=[th.InferRequestedOutput("embedding", binary_data=False)])
    diff = np.abs(r.as_numpy("embedding") - ref[:3]).max()
    check("infer, JSON out", diff <= 1e-6, f"max |diff| {diff:.2e}")
    zeros = np.zeros((2, 3, s, s), dtype=np.float32)
    e0 = c.infer(EMBED, [tensor("pixels", zeros, "FP32", binary=False)], parameters=params).as_numpy("embedding")
    e1 = c.infer(EMBED, [tensor("pixels", zeros, "FP32")], parameters=params).as_numpy("embedding")
    check("infer FP32 pixels, JSON in and binary in agree", e0.shape == (2, d)
          and np.array_equal(e0, e1), str(e0.shape))

    r = c.infer(COMPLETE, [tensor("image", files[:2], "BYTES")], parameters={"seed": 5, "mask_ratio": 0.5})
    pics = [Image.open(io.BytesIO(b)) for b in r.as_numpy("composite")]
    mask = r.as_numpy("mask")
    check("complete, binary out: PNGs and the mask", len(pics) == 2 and pics[0].format == "PNG"
          and mask.shape[0] == 2 and mask.sum(axis=1).tolist() == [mask.shape[1] // 2] * 2,
          f"{mask.sum(axis=1)} hidden")
    r = c.infer(COMPLETE, [tensor("image", files[:1], "BYTES")], parameters={"seed": 5, "mask_ratio": 0.5},
                outputs=[th.InferRequestedOutput("composite", binary_data=False)])
    png = base64.b64decode(r.as_numpy("composite")[0])
    check("complete, JSON out: the PNG as base64", png.startswith(b"\x89PNG"))

    junk = np.array([np.random.default_rng(1).bytes(1000)], dtype=np.object_)
    expect_error("random bytes → 400", 400, lambda: c.infer(EMBED, [tensor("image", junk, "BYTES")]))
    expect_error("unknown model → 404", 404, lambda: c.infer("nope", [tensor("image", files[:1], "BYTES")]))
    expect_error("unknown parameter → 400", 400,
                 lambda: c.infer(EMBED, [tensor("image", files[:1], "BYTES")], parameters={"poolng": "x"}))
    st = c.get_inference_statistics(EMBED)["model_stats"][0]
    check("get_inference_statistics", st["name"] == EMBED and st["inference_count"] >= 17
          and st["inference_stats"]["success"]["count"] >= 5, str(st)[:200])


if __name__ == "__main__":
    main()
