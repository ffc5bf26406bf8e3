#!/usr/bin/env python3
"""Example client for crate-mae-serve's cratemae.v1 API: copy it into your backend.

    python crate_mae_client.py --addr localhost:50051 embed a.png b.png
    python crate_mae_client.py --addr localhost:50051 complete a.png -o out.png
"""
import argparse
import os
import random
import sys
import time
import uuid
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from generate import ensure_stubs

ensure_stubs()  # generates ./_gen from proto/ if missing or stale
from cratemae.v1 import cratemae_pb2 as pb, cratemae_pb2_grpc as pb_grpc  # noqa: E402

SERVICE = "cratemae.v1.CrateMae"  # the health-check name of the model service
POOLING = {"default": pb.POOLING_UNSPECIFIED, "cls": pb.POOLING_CLS, "mean": pb.POOLING_MEAN,
           "whitened-grid": pb.POOLING_WHITENED_GRID}
# What the server answers when its queue is full (RESOURCE_EXHAUSTED) or while it loads or
# drains for shutdown (UNAVAILABLE). Both are worth a retry after a pause. RESOURCE_EXHAUSTED
# also reports hard limits (too many images or pixels), which a retry cannot fix, so retries
# are bounded.
RETRYABLE = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)


class CrateMaeClient:
    def __init__(self, addr, token=None, tls=False, ca_file=None, timeout=30.0, attempts=5):
        opts = [("grpc.max_send_message_length", 64 << 20),  # the server's default limit
                ("grpc.max_receive_message_length", 64 << 20)]
        if tls or ca_file:
            root = Path(ca_file).read_bytes() if ca_file else None  # None: system roots
            self.channel = grpc.secure_channel(addr, grpc.ssl_channel_credentials(root), opts)
        else:
            self.channel = grpc.insecure_channel(addr, opts)
        self.stub = pb_grpc.CrateMaeStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.token, self.timeout, self.attempts = token, timeout, attempts

    def close(self):
        self.channel.close()

    def _metadata(self, request_id):
        md = [("x-request-id", request_id)]  # echoed by the server and in its logs
        if self.token:
            md.append(("authorization", f"Bearer {self.token}"))
        return md

    def call(self, method, request):
        """One unary call with a deadline, a request id and retries with jittered exponential
        backoff on RESOURCE_EXHAUSTED / UNAVAILABLE. Other errors are raised at once as
        grpc.RpcError: read err.code() and err.details() (the server's message)."""
        request_id = uuid.uuid4().hex  # one id for every attempt, so the logs correlate
        backoff = 0.05
        for attempt in range(1, self.attempts + 1):
            try:
                return method(request, timeout=self.timeout, metadata=self._metadata(request_id))
            except grpc.RpcError as err:
                if err.code() not in RETRYABLE or attempt == self.attempts:
                    raise
                pause = random.uniform(0, backoff)  # "full jitter": spread out the retries
                print(f"  {err.code().name}: {err.details()} (request {request_id}); "
                      f"retry {attempt} in {pause * 1000:.0f} ms", file=sys.stderr)
                time.sleep(pause)
                backoff = min(backoff * 2, 2.0)

    def wait_until_serving(self, timeout=60.0):
        """Polls grpc.health.v1 until the model service is SERVING (weights loaded, warm)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                reply = self.health.Check(health_pb2.HealthCheckRequest(service=SERVICE),
                                          timeout=2.0, metadata=self._metadata(uuid.uuid4().hex))
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError as err:  # not listening yet, or loading
                if err.code() not in (grpc.StatusCode.UNAVAILABLE,
                                      grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
            if time.monotonic() > deadline:
                raise TimeoutError(f"{SERVICE} not SERVING after {timeout} s")
            time.sleep(0.2)

    def info(self):
        return self.call(self.stub.GetModelInfo, pb.GetModelInfoRequest())

    def embed(self, paths, pooling="default", normalize=True):
        """One embedding per image, in order: float32 array [len(paths), d]."""
        images = [pb.Image(encoded=Path(p).read_bytes()) for p in paths]
        req = pb.EmbedRequest(images=images, pooling=POOLING[pooling], normalize=normalize)
        reply = self.call(self.stub.Embed, req)
        return np.array([e.values for e in reply.embeddings], dtype=np.float32)

    def complete(self, path, out=None, mask_ratio=0.75, seed=0):
        """Hides mask_ratio of the patches (seeded), lets the model fill them in, writes the
        composite (visible input + predicted patches) PNG to `out`; returns the response."""
        req = pb.CompleteRequest(image=pb.Image(encoded=Path(path).read_bytes()),
                                 mask_ratio=mask_ratio, seed=seed)
        reply = self.call(self.stub.Complete, req)
        if out:
            Path(out).write_bytes(reply.composite)
        return reply


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--addr", default="localhost:50051")
    ap.add_argument("--token", default=os.environ.get("CRATE_MAE_AUTH_TOKEN"),
                    help="bearer token (default: $CRATE_MAE_AUTH_TOKEN)")
    ap.add_argument("--tls", action="store_true", help="TLS with the system's roots")
    ap.add_argument("--ca", help="TLS with this CA certificate (PEM)")
    ap.add_argument("--timeout", type=float, default=30.0, help="deadline per call, seconds")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("health")
    sub.add_parser("info")
    e = sub.add_parser("embed")
    e.add_argument("images", nargs="+")
    e.add_argument("--pooling", choices=POOLING, default="default")
    e.add_argument("--no-normalize", action="store_true")
    c = sub.add_parser("complete")
    c.add_argument("image")
    c.add_argument("-o", "--out", default="completion.png")
    c.add_argument("--mask-ratio", type=float, default=0.75)
    c.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    client = CrateMaeClient(args.addr, args.token, args.tls, args.ca, args.timeout)
    try:
        client.wait_until_serving()
        if args.cmd == "health":
            print("SERVING")
        elif args.cmd == "info":
            print(client.info())
        elif args.cmd == "embed":
            emb = client.embed(args.images, args.pooling, not args.no_normalize)
            for path, row in zip(args.images, emb):
                print(f"{path}: d={row.size} norm={np.linalg.norm(row):.4f} "
                      f"[{', '.join(f'{v:.4f}' for v in row[:4])}, …]")
        else:
            r = client.complete(args.image, args.out, args.mask_ratio, args.seed)
            print(f"{args.out}: {len(r.masked_patches)} of {r.grid_size ** 2} patches "
                  f"filled in, masked-patch MSE {r.masked_patch_mse:.4f}")
    except grpc.RpcError as err:
        raise SystemExit(f"error: {err.code().name}: {err.details()}")
    finally:
        client.close()


if __name__ == "__main__":
    main()
