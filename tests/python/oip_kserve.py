#!/usr/bin/env python3
"""Open Inference Protocol v2 checks through the KServe SDK's gRPC client (asyncio), against a
running crate-mae-serve (never starts one). One line per check; exits 1 at the first failure.

    python oip_kserve.py --addr 127.0.0.1:50051 --fixtures tests/fixtures/fashion-mnist \
        --expected embeddings.json

kserve.InferenceGRPCClient sends a numpy input as raw_input_contents (with an input
parameter `binary_data_size`) and a list input as typed contents; it reads outputs from
either. It has no ServerMetadata / ModelMetadata call, so those go through KServe's own
generated stub. KServe's InferParameter has no double_param (only bool, int64, string), so
`mask_ratio` cannot be sent from this SDK: completion uses the default 0.75.
"""
import argparse
import asyncio
import io
import json
import logging
import sys
import time
from pathlib import Path

import grpc
import numpy as np
from kserve import InferenceGRPCClient, InferInput, InferRequest
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub
from kserve.protocol.infer_type import RequestedOutput
from PIL import Image

EMBED, COMPLETE = "crate-mae", "crate-mae-complete"
logging.getLogger("kserve.trace").setLevel(logging.CRITICAL)  # it logs every RpcError


def check(name, ok, detail=""):
    if not ok:
        print(f"FAIL {name}: {detail}", flush=True)
        sys.exit(1)
    print(f"ok   {name}{': ' + detail if detail else ''}", flush=True)


def raw(name, array, datatype):
    """An input sent as raw_input_contents."""
    t = InferInput(name, list(array.shape), datatype)
    t.set_data_from_numpy(array, binary_data=True)
    return t


def typed(name, shape, datatype, values):
    """An input sent as typed contents (bytes_contents / fp32_contents): a flat list."""
    return InferInput(name, shape, datatype, data=list(values))


def request(model, inp, **kw):
    return InferRequest(model_name=model, infer_inputs=[inp], **kw)


async def expect_error(name, code, coro):
    try:
        await coro
    except grpc.RpcError as e:  # grpc.aio.AioRpcError
        check(name, e.code() == code and bool(e.details()), f"{e.code().name}: {e.details()}")
        return
    check(name, False, f"expected {code.name}, the call succeeded")


async def wait_ready(c, seconds):
    """Gives a server that is still starting `seconds` to become ready; the checks follow."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            if await c.is_server_ready(timeout=2):
                return
        except grpc.RpcError:
            pass
        await asyncio.sleep(0.2)


async def run(args):
    pngs = sorted(args.fixtures.glob("*.png"))
    files = [p.read_bytes() for p in pngs]
    want = json.loads(args.expected.read_text())
    ref = np.array([want[p.name] for p in pngs], dtype=np.float32)
    check("fixtures", len(pngs) == 10 and ref.ndim == 2, f"{len(pngs)} PNGs, expected {ref.shape}")
    c = InferenceGRPCClient(args.addr, timeout=60)
    channel = grpc.aio.insecure_channel(args.addr)
    stub = GRPCInferenceServiceStub(channel)
    await wait_ready(c, args.wait)

    check("is_server_live", await c.is_server_live())
    check("is_server_ready", await c.is_server_ready())
    check("is_model_ready", await c.is_model_ready(EMBED) and await c.is_model_ready(COMPLETE))
    # As Triton: an unknown model is NOT_FOUND, not "not ready".
    await expect_error("is_model_ready(unknown) → NOT_FOUND", grpc.StatusCode.NOT_FOUND,
                       c.is_model_ready("no-such-model"))
    sm = await stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=10)
    check("ServerMetadata", sm.name == "crate-mae-serve", f"{sm.name} {sm.version}")
    meta = await stub.ModelMetadata(pb.ModelMetadataRequest(name=EMBED), timeout=10)
    version = meta.versions[0]
    ins = {t.name: (t.datatype, list(t.shape)) for t in meta.inputs}
    outs = {t.name: (t.datatype, list(t.shape)) for t in meta.outputs}
    s = ins["pixels"][1][2]
    d, L = 128, (s // 4) ** 2  # the built-in model's width (pooling mean, patch tokens); the embedding's depends on the pooling: -1
    # patch_tokens is returned only when named, so it is not listed.
    check("ModelMetadata", ins == {"image": ("BYTES", [-1, 1]), "pixels": ("FP32", [-1, 3, s, s])}
          and outs == {"embedding": ("FP32", [-1, -1])}
          and (s, d, L) == (32, 128, 64), f"S={s} d={d} L={L} version {version}")
    await expect_error("ModelMetadata(unknown) → NOT_FOUND", grpc.StatusCode.NOT_FOUND,
                       stub.ModelMetadata(pb.ModelMetadataRequest(name="no-such-model"), timeout=10))

    params = {"pooling": "mean", "normalize": True}
    r = await c.infer(request(EMBED, raw("image", np.array(files, dtype=np.object_), "BYTES"),
                              request_id="k-1", parameters=params))
    emb = r.get_output_by_name("embedding").as_numpy()
    # No outputs listed: every listed output of the model, as the protocol says.
    check("infer BYTES raw", emb.shape == (10, d) and r.id == "k-1" and r.model_version == version
          and r.get_output_by_name("patch_tokens") is None, f"{emb.shape} id={r.id}")
    diff = np.abs(emb - ref).max()
    check("raw embedding == expected", diff <= 1e-6, f"max |diff| {diff:.2e}")
    r = await c.infer(request(EMBED, typed("image", [10], "BYTES", files), parameters=params,
                              model_version=version))
    diff = np.abs(r.get_output_by_name("embedding").as_numpy() - ref).max()
    check("infer BYTES typed contents == expected", diff <= 1e-6, f"max |diff| {diff:.2e}")

    rng = np.random.default_rng(0)
    px = np.concatenate([rng.normal(size=(1, 3, s, s)).astype(np.float32)] * 2
                        + [np.zeros((1, 3, s, s), np.float32)])
    outputs = [RequestedOutput("embedding"), RequestedOutput("patch_tokens")]
    a = await c.infer(request(EMBED, raw("pixels", px, "FP32"), request_outputs=outputs, parameters=params))
    b = await c.infer(request(EMBED, typed("pixels", list(px.shape), "FP32", px.ravel().tolist()),
                              request_outputs=outputs, parameters=params))
    ea, eb = (x.get_output_by_name("embedding").as_numpy() for x in (a, b))
    check("infer FP32 raw and typed", ea.shape == (3, d) and np.allclose(ea, eb, atol=1e-6),
          f"max |raw - typed| {np.abs(ea - eb).max():.2e}")
    check("identical pixel rows, identical embeddings", np.allclose(ea[0], ea[1], atol=1e-6)
          and not np.allclose(ea[0], ea[2], atol=1e-4))
    check("patch_tokens", b.get_output_by_name("patch_tokens").as_numpy().shape == (3, L, d))

    r = await c.infer(request(COMPLETE, typed("image", [2], "BYTES", files[:2]),
                              parameters={"seed": 5}, request_id="k-2"))
    out = {o.name: o.as_numpy() for o in r.outputs}
    pics = [Image.open(io.BytesIO(x)) for x in [*out["reconstruction"], *out["composite"]]]
    check("complete PNGs", len(pics) == 4 and all(p.format == "PNG" and p.size == (s, s) for p in pics),
          f"{[p.size for p in pics]}")
    n_masked = L - int(L * 0.25)
    check("complete mask", out["mask"].shape == (2, L) and out["mask"].dtype == bool
          and out["mask"].sum(axis=1).tolist() == [n_masked] * 2, f"{out['mask'].sum(axis=1)}")
    mse = out["masked_patch_mse"]
    check("complete mse, id, version", mse.shape == (2,) and np.isfinite(mse).all()
          and r.id == "k-2" and r.model_version == version, str(mse))
    r6 = await c.infer(request(COMPLETE, raw("image", np.array(files[1:2], dtype=np.object_), "BYTES"),
                               parameters={"seed": 6}, request_outputs=[RequestedOutput("mask")]))
    check("seed + i", np.array_equal(r6.get_output_by_name("mask").as_numpy()[0], out["mask"][1])
          and [o.name for o in r6.outputs] == ["mask"])

    call = stub.ModelInfer(request(EMBED, typed("image", [1], "BYTES", files[:1])).to_grpc(), timeout=30)
    md = dict(await call.initial_metadata())
    await call
    check("x-model-name / x-model-sha256", md.get("x-model-name") == EMBED
          and md.get("x-model-sha256", md.get("x-model-version")) == version, str(md))

    INVALID = grpc.StatusCode.INVALID_ARGUMENT
    junk = rng.bytes(1000)
    await expect_error("random bytes (typed) → INVALID_ARGUMENT", INVALID,
                       c.infer(request(EMBED, typed("image", [1], "BYTES", [junk]))))
    await expect_error("random bytes (raw) → INVALID_ARGUMENT", INVALID, c.infer(
        request(COMPLETE, raw("image", np.array([junk], dtype=np.object_), "BYTES"))))
    await expect_error("wrong pixels shape → INVALID_ARGUMENT", INVALID, c.infer(
        request(EMBED, typed("pixels", [1, 3, s // 2, s // 2], "FP32", [0.0] * (3 * s * s // 4)))))
    await expect_error("wrong datatype → INVALID_ARGUMENT", INVALID, c.infer(
        request(EMBED, typed("image", [1], "FP32", [0.0]))))
    await expect_error("unknown model → NOT_FOUND", grpc.StatusCode.NOT_FOUND,
                       c.infer(request("no-such-model", typed("image", [1], "BYTES", files[:1]))))
    await expect_error("wrong model_version → NOT_FOUND", grpc.StatusCode.NOT_FOUND, c.infer(
        request(EMBED, typed("image", [1], "BYTES", files[:1]), model_version="0" * 64)))
    await channel.close()
    await c.close()
    print("all checks passed")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--addr", required=True, help="HOST:PORT of the server's gRPC port")
    ap.add_argument("--fixtures", type=Path, required=True, help="folder of the 10 fixture PNGs")
    ap.add_argument("--expected", type=Path, required=True,
                    help='JSON {"<png name>": [floats…]}: embeddings, pooling mean, normalized')
    ap.add_argument("--wait", type=float, default=30, help="seconds to wait for ServerReady")
    try:
        asyncio.run(run(ap.parse_args()))
    except grpc.RpcError as e:
        print(f"FAIL unexpected {e.code().name}: {e.details()}", flush=True)
        sys.exit(1)
    except (OSError, KeyError, ValueError) as e:
        print(f"FAIL unexpected {type(e).__name__}: {e}", flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
