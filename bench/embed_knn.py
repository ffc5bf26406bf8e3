#!/usr/bin/env python3
"""Retrieval quality of served embeddings, as a user measures it: Fashion-MNIST images sent as
the 28×28 grey PNGs users have, through the OIP REST endpoint of a running server, then
cosine 20-NN (majority vote) of test queries against a train gallery; raw pixels on the same
split for comparison. Needs numpy and Debian's dataset-fashion-mnist.

  cargo run --release &                       # the built-in model on :8000
  python3 bench/embed_knn.py --gallery 10000 --queries 2000 [--pooling mean]
"""
import argparse
import base64
import gzip
import json
import struct
import time
import urllib.request
import zlib

import numpy as np

DATA = "/usr/share/datasets/fashion-mnist"


def idx(path, header):
    with gzip.open(path) as f:
        return np.frombuffer(f.read()[header:], np.uint8)


def png(grey):
    """A 28×28 8-bit greyscale PNG (no dependencies)."""
    h, w = grey.shape
    raw = b"".join(b"\0" + grey[r].tobytes() for r in range(h))
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data
                                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def embed(url, images, pooling, batch):
    out = []
    for s in range(0, len(images), batch):
        part = images[s:s + batch]
        body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(part), 1],
                            "data": [base64.b64encode(png(g)).decode() for g in part]}]}
        if pooling:
            body["parameters"] = {"pooling": pooling}
        req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
        reply = json.load(urllib.request.urlopen(req, timeout=60))
        o = reply["outputs"][0]
        out.append(np.array(o["data"], np.float32).reshape(o["shape"]))
    return np.concatenate(out)


def knn20(gallery, g_labels, queries, q_labels, k=20):
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)
    sims = unit(queries) @ unit(gallery).T
    top = np.argpartition(-sims, k, axis=1)[:, :k]
    hits = 0
    for r, idxs in enumerate(top):
        votes = np.bincount(g_labels[idxs], minlength=10) + 1e-3 * np.bincount(
            g_labels[idxs], weights=sims[r, idxs], minlength=10)
        hits += votes.argmax() == q_labels[r]
    return hits / len(queries)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000/v2/models/crate-mae/infer")
    ap.add_argument("--gallery", type=int, default=10000)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--pooling", default=None, help="unset: the model's recommendation")
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    train = idx(f"{DATA}/train-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)[:args.gallery]
    train_y = idx(f"{DATA}/train-labels-idx1-ubyte.gz", 8)[:args.gallery]
    test = idx(f"{DATA}/t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)[:args.queries]
    test_y = idx(f"{DATA}/t10k-labels-idx1-ubyte.gz", 8)[:args.queries]
    started = time.monotonic()
    g, q = embed(args.url, train, args.pooling, args.batch), embed(args.url, test, args.pooling, args.batch)
    seconds = time.monotonic() - started
    pixels = lambda x: x.reshape(len(x), -1).astype(np.float32)
    result = {
        "pooling": args.pooling or "default", "values": int(g.shape[1]),
        "gallery": len(g), "queries": len(q), "embed_seconds": round(seconds, 1),
        "served_knn20": knn20(g, train_y, q, test_y),
        "raw_pixels_knn20": knn20(pixels(train), train_y, pixels(test), test_y),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
