#!/usr/bin/env python3
"""/v1/embeddings checks through the official `openai` Python SDK, against a running
crate-mae-serve (never starts one). One line per check; exits 1 at the first failure.

    python openai_embeddings.py --addr 127.0.0.1:8000 --fixtures tests/fixtures/fashion-mnist \
        --expected embeddings.json

The SDK asks for base64 unless told otherwise and decodes it itself; both formats are checked.
"""
import argparse
import base64
import json
import sys
import time
from pathlib import Path

import numpy as np
import openai

MODEL = "crate-mae"


def check(name, ok, detail=""):
    if not ok:
        print(f"FAIL {name}: {detail}", flush=True)
        sys.exit(1)
    print(f"ok   {name}{': ' + detail if detail else ''}", flush=True)


def expect(name, error, fn, needle):
    try:
        fn()
    except error as e:
        check(name, needle in str(e), str(e))
        return
    except openai.APIError as e:
        check(name, False, f"expected {error.__name__}, got {type(e).__name__}: {e}")
    check(name, False, f"expected {error.__name__}, the call succeeded")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--addr", required=True, help="HOST:PORT of the server's HTTP port")
    ap.add_argument("--fixtures", type=Path, required=True, help="folder of the 10 fixture PNGs")
    ap.add_argument("--expected", type=Path, required=True,
                    help='JSON {"<png name>": [floats…]}: embeddings, pooling mean, normalized')
    ap.add_argument("--wait", type=float, default=30, help="seconds to wait for the server")
    args = ap.parse_args()

    pngs = sorted(args.fixtures.glob("*.png"))
    uris = [f"data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}" for p in pngs]
    want = json.loads(args.expected.read_text())
    ref = np.array([want[p.name] for p in pngs], dtype=np.float32)
    c = openai.OpenAI(base_url=f"http://{args.addr}/v1", api_key="unused", max_retries=0)
    end = time.monotonic() + args.wait
    while True:
        try:
            models = c.models.list()
            break
        except openai.APIConnectionError:
            if time.monotonic() > end:
                raise
            time.sleep(0.2)
    check("models.list", [m.id for m in models.data] == [MODEL], str(models.data))

    # The reference is mean pooling; unasked, the model's recommended readout is served.
    mean = {"pooling": "mean"}
    r = c.embeddings.create(model=MODEL, input=uris, extra_body=mean)
    emb = np.array([d.embedding for d in r.data], dtype=np.float32)
    diff = np.abs(emb - ref).max()
    check("embeddings.create (base64 on the wire) == gRPC Embed", emb.shape == ref.shape
          and [d.index for d in r.data] == list(range(10)) and diff <= 1e-6, f"max |diff| {diff:.2e}")
    check("model and usage", r.model == MODEL and r.usage.prompt_tokens == 10 * 65
          and r.usage.total_tokens == r.usage.prompt_tokens, str(r.usage))
    r = c.embeddings.create(model=MODEL, input=uris[0], encoding_format="float", dimensions=ref.shape[1],
                            extra_body=mean)
    diff = np.abs(np.array(r.data[0].embedding, dtype=np.float32) - ref[0]).max()
    check("one input, float, dimensions = the model's", len(r.data) == 1 and diff <= 1e-6, f"{diff:.2e}")
    cls = c.embeddings.create(model=MODEL, input=uris[:1], extra_body={"pooling": "cls"})
    check("extra_body pooling", not np.allclose(cls.data[0].embedding, ref[0], atol=1e-3))
    unasked = c.embeddings.create(model=MODEL, input=uris[:1])
    width = len(unasked.data[0].embedding)
    check("unasked: the recommended readout, unit norm", width != ref.shape[1]
          and abs(np.linalg.norm(unasked.data[0].embedding) - 1) < 1e-4, f"width {width}")

    expect("dimensions it cannot serve → BadRequestError", openai.BadRequestError,
           lambda: c.embeddings.create(model=MODEL, input=uris[0], dimensions=64), "dimensions")
    expect("unknown model → NotFoundError", openai.NotFoundError,
           lambda: c.embeddings.create(model="text-embedding-3-small", input=uris[0]), "does not exist")
    expect("an image URL is refused, not fetched", openai.BadRequestError,
           lambda: c.embeddings.create(model=MODEL, input="https://example.com/cat.png"), "not fetched")
    expect("text is refused", openai.BadRequestError,
           lambda: c.embeddings.create(model=MODEL, input="a photo of a coat"), "text is not supported")


if __name__ == "__main__":
    main()
