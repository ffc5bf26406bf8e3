#!/usr/bin/env python3
"""Checks the example client against a running crate-mae-serve (never starts one).

    python test_client.py --addr 127.0.0.1:50051 [--fixtures DIR] [--expected emb.json]

One line per check; exits 1 at the first failure. --expected is a JSON file
{"<png file name>": [floats…]} of embeddings (pooling MEAN, normalize true) to match to 1e-6.
"""
import argparse
import json
import random
import struct
import sys
import tempfile
import zlib
from pathlib import Path

import grpc
import numpy as np

from crate_mae_client import CrateMaeClient, pb

REPO = Path(__file__).resolve().parent.parent.parent


def check(name, ok, detail=""):
    if not ok:
        print(f"FAIL {name}: {detail}", flush=True)
        sys.exit(1)
    print(f"ok   {name}{': ' + detail if detail else ''}", flush=True)


def png_size(data):
    """(width, height) of a PNG after checking its structure: signature, every chunk's CRC,
    IHDR first, IEND last, and IDAT inflating to exactly the bytes the header implies."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("no PNG signature")
    pos, chunks, idat = 8, [], b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        if zlib.crc32(kind + body) != crc:
            raise ValueError(f"bad CRC in chunk {kind!r}")
        chunks.append(kind)
        if kind == b"IHDR":
            w, h, depth, colour = struct.unpack(">IIBB", body[:10])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    if chunks[0] != b"IHDR" or chunks[-1] != b"IEND":
        raise ValueError(f"chunks out of order: {chunks}")
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[colour]
    if len(zlib.decompress(idat)) != h * (1 + (w * channels * depth + 7) // 8):
        raise ValueError("IDAT does not hold the image the header declares")
    return w, h


def expect_error(name, code, words, fn):
    try:
        fn()
    except grpc.RpcError as err:
        msg = err.details() or ""
        check(name, err.code() == code and any(w in msg.lower() for w in words),
              f"{err.code().name}: {msg}")
        return
    check(name, False, f"expected {code.name}, the call succeeded")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--addr", required=True)
    ap.add_argument("--fixtures", type=Path, default=REPO / "tests/fixtures/fashion-mnist")
    ap.add_argument("--expected", type=Path)
    ap.add_argument("--token")
    ap.add_argument("--ca", help="CA certificate (PEM) for a TLS server")
    ap.add_argument("--wait", type=float, default=60.0, help="seconds to wait for SERVING")
    args = ap.parse_args()

    pngs = sorted(args.fixtures.glob("*.png"))
    check("fixtures", len(pngs) == 10, f"{len(pngs)} PNGs in {args.fixtures}")
    c = CrateMaeClient(args.addr, token=args.token, ca_file=args.ca, timeout=30.0)

    c.wait_until_serving(args.wait)
    check("health", True, "cratemae.v1.CrateMae is SERVING")

    info = c.info()
    s, p, d = info.image_size, info.patch_size, info.dim
    grid = s // p
    check("GetModelInfo", d > 0 and s > 0 and p > 0 and s % p == 0 and info.model_version,
          f"{info.model_name} {info.model_version[:16]}… d={d} {s}px/p{p} "
          f"({info.weights_source})")
    if info.weights_source.startswith("built-in"):
        check("built-in model size", (d, s, p) == (128, 32, 4), f"d={d} {s}px/p{p}")

    # The request id is echoed, the model identified, in the response metadata.
    _, call = c.stub.GetModelInfo.with_call(pb.GetModelInfoRequest(), timeout=10,
                                            metadata=c._metadata("test-client-1"))
    md = dict(call.initial_metadata())
    check("response metadata", md.get("x-request-id") == "test-client-1"
          and md.get("x-model-name") == info.model_name, str(md))

    emb = c.embed(pngs, pooling="mean", normalize=True)
    norms = np.linalg.norm(emb, axis=1)
    check("embed shape", emb.shape == (10, d), str(emb.shape))
    check("embed unit norm", np.isfinite(emb).all() and np.allclose(norms, 1, atol=1e-5),
          f"norms {norms.min():.6f}…{norms.max():.6f}")
    one = c.embed(pngs[3:4], pooling="mean")
    check("embed order", np.allclose(one[0], emb[3], atol=1e-5),
          f"max diff alone vs in a batch {np.abs(one[0] - emb[3]).max():.2e}")
    raw = c.embed(pngs[:2], pooling="mean", normalize=False)
    raw_norms = np.linalg.norm(raw, axis=1)
    check("embed normalize=false", np.allclose(raw / raw_norms[:, None], emb[:2], atol=1e-5)
          and not np.allclose(raw_norms, 1, atol=1e-3), f"norms {raw_norms.round(3).tolist()}")
    unasked = c.embed(pngs[:2])
    check("embed default: the recommended readout", unasked.shape[0] == 2 and unasked.shape[1] != d
          and np.isfinite(unasked).all(), str(unasked.shape))
    cls = c.embed(pngs[:2], pooling="cls")
    check("embed cls", cls.shape == (2, d) and not np.allclose(cls, emb[:2], atol=1e-3),
          "cls pooling differs from mean")
    if args.expected:
        want = json.loads(args.expected.read_text())
        missing = [q.name for q in pngs if q.name not in want]
        check("expected covers fixtures", not missing, f"missing {missing}")
        ref = np.array([want[q.name] for q in pngs], dtype=np.float32)
        diff = np.abs(ref - emb).max() if ref.shape == emb.shape else np.inf
        check("embed == expected", diff <= 1e-6, f"max |diff| {diff:.2e}, shape {ref.shape}")

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "composite.png"
        r = c.complete(pngs[0], out, mask_ratio=0.75, seed=7)
        masked = list(r.masked_patches)
        n_masked = grid * grid - int(grid * grid * (1 - 0.75))
        check("complete PNG", png_size(out.read_bytes()) == (s, s)
              and png_size(r.reconstruction) == (s, s) and png_size(r.masked_input) == (s, s),
              f"{out.stat().st_size} B composite, {s}×{s}")
        check("complete mask", r.grid_size == grid and len(masked) == n_masked
              and masked == sorted(set(masked)) and masked[-1] < grid * grid,
              f"{len(masked)} of {grid * grid} patches masked")
        check("complete mse", np.isfinite(r.masked_patch_mse) and r.masked_patch_mse >= 0,
              f"{r.masked_patch_mse:.4f}")
        again = c.complete(pngs[0], mask_ratio=0.75, seed=7)
        check("complete seeded", list(again.masked_patches) == masked, "same seed, same mask")

    junk = random.Random(0).randbytes(2048)  # starts with no PNG/JPEG signature
    bad = pb.EmbedRequest(images=[pb.Image(encoded=junk)])
    expect_error("random bytes → INVALID_ARGUMENT", grpc.StatusCode.INVALID_ARGUMENT,
                 ["image", "png", "jpeg"], lambda: c.call(c.stub.Embed, bad))
    data = pngs[0].read_bytes()
    cut = data[:len(data) // 2]
    bad = pb.CompleteRequest(image=pb.Image(encoded=cut))
    expect_error("truncated PNG → INVALID_ARGUMENT", grpc.StatusCode.INVALID_ARGUMENT,
                 ["decode", "png", "image"], lambda: c.call(c.stub.Complete, bad))
    c.close()
    print("all checks passed")


if __name__ == "__main__":
    try:
        main()
    except grpc.RpcError as e:
        print(f"FAIL unexpected {e.code().name}: {e.details()}", flush=True)
        sys.exit(1)
    except (OSError, KeyError, ValueError, TimeoutError) as e:
        print(f"FAIL unexpected {type(e).__name__}: {e}", flush=True)
        sys.exit(1)
