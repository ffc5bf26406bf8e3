#!/usr/bin/env python3
"""Open Inference Protocol v2 REST checks through the KServe SDK's InferenceRESTClient (httpx,
asyncio), against a running crate-mae-serve (never starts one). One line per check; exits 1
at the first failure.

    python oip_kserve_rest.py --addr 127.0.0.1:8000 --fixtures tests/fixtures/fashion-mnist \
        --expected embeddings.json

The SDK sends a numpy input with binary_data=True through Triton's binary-data extension and
list inputs as JSON (BYTES as strings: base64 here), and reads outputs either way.
"""
import argparse
import asyncio
import base64
import io
import json
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.infer_type import RequestedOutput
from PIL import Image

EMBED, COMPLETE = "crate-mae", "crate-mae-complete"


def check(name, ok, detail=""):
    if not ok:
        print(f"FAIL {name}: {detail}", flush=True)
        sys.exit(1)
    print(f"ok   {name}{': ' + detail if detail else ''}", flush=True)


def binary(name, array, datatype):
    t = InferInput(name, list(array.shape), datatype)
    t.set_data_from_numpy(array, binary_data=True)
    return t


async def expect_status(name, status, coro):
    try:
        await coro
    except httpx.HTTPStatusError as e:
        check(name, e.response.status_code == status and "error" in e.response.json(),
              f"{e.response.status_code}: {e.response.json()}")
        return
    check(name, False, f"expected HTTP {status}, the call succeeded")


async def run(args):
    pngs = sorted(args.fixtures.glob("*.png"))
    files = np.array([p.read_bytes() for p in pngs], dtype=np.object_)
    want = json.loads(args.expected.read_text())
    ref = np.array([want[p.name] for p in pngs], dtype=np.float32)
    base = f"http://{args.addr}"
    c = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
    end = time.monotonic() + args.wait
    while time.monotonic() < end:
        try:
            if await c.is_server_ready(base):
                break
        except httpx.HTTPError:
            await asyncio.sleep(0.2)

    check("is_server_live / is_server_ready", await c.is_server_live(base) and await c.is_server_ready(base))
    check("is_model_ready", await c.is_model_ready(base, EMBED) and await c.is_model_ready(base, COMPLETE))
    # The SDK reads any non-2xx as "not ready" (this server answers 404 for an unknown model).
    check("is_model_ready(unknown) is false", not await c.is_model_ready(base, "no-such-model"))

    params = {"pooling": "mean", "normalize": True}
    r = await c.infer(base, InferRequest(model_name=EMBED, infer_inputs=[binary("image", files, "BYTES")],
                                         parameters=params), model_name=EMBED)
    emb = r.outputs[0].as_numpy()
    diff = np.abs(emb - ref).max()
    check("infer, binary in: embedding == gRPC Embed", r.outputs[0].name == "embedding"
          and emb.shape == ref.shape and diff <= 1e-6, f"max |diff| {diff:.2e}")
    text = [base64.b64encode(f).decode() for f in files[:4]]
    r = await c.infer(base, InferRequest(model_name=EMBED, infer_inputs=[InferInput("image", [4], "BYTES", data=text)],
                                         parameters=params), model_name=EMBED)
    diff = np.abs(r.outputs[0].as_numpy() - ref[:4]).max()
    check("infer, JSON in (base64 BYTES), JSON out", diff <= 1e-6, f"max |diff| {diff:.2e}")
    s = 32
    zeros = np.zeros((1, 3, s, s), dtype=np.float32)
    r = await c.infer(base, InferRequest(model_name=EMBED, infer_inputs=[
        InferInput("pixels", [1, 3, s, s], "FP32", data=zeros.flatten().tolist())], parameters=params),
        model_name=EMBED)
    check("infer FP32 pixels as JSON", r.outputs[0].as_numpy().shape == (1, ref.shape[1]))

    r = await c.infer(base, InferRequest(model_name=COMPLETE, infer_inputs=[binary("image", files[:2], "BYTES")],
                                         parameters={"seed": 5},
                                         request_outputs=[RequestedOutput("composite"), RequestedOutput("mask")]),
                      model_name=COMPLETE)
    out = {o.name: o for o in r.outputs}
    pngs_back = [base64.b64decode(b) for b in out["composite"].as_numpy().reshape(-1)]
    pics = [Image.open(io.BytesIO(b)) for b in pngs_back]
    mask = out["mask"].as_numpy()
    check("complete: composite PNGs (base64 in JSON) and the mask", len(pics) == 2
          and all(p.format == "PNG" for p in pics) and mask.shape == (2, 64)
          and mask.sum(axis=1).tolist() == [48, 48], f"{mask.sum(axis=1)} of 64 hidden")

    junk = np.array([np.random.default_rng(1).bytes(1000)], dtype=np.object_)
    await expect_status("random bytes → 400", 400, c.infer(
        base, InferRequest(model_name=EMBED, infer_inputs=[binary("image", junk, "BYTES")]), model_name=EMBED))
    await expect_status("unknown model → 404", 404, c.infer(
        base, InferRequest(model_name="nope", infer_inputs=[binary("image", files[:1], "BYTES")]), model_name="nope"))
    await c.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--addr", required=True, help="HOST:PORT of the server's HTTP port")
    ap.add_argument("--fixtures", type=Path, required=True, help="folder of the 10 fixture PNGs")
    ap.add_argument("--expected", type=Path, required=True,
                    help='JSON {"<png name>": [floats…]}: embeddings, pooling mean, normalized')
    ap.add_argument("--wait", type=float, default=30, help="seconds to wait for readiness")
    asyncio.run(run(ap.parse_args()))


if __name__ == "__main__":
    main()
