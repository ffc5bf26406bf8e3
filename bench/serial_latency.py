"""Serial round trips against a running server: how much of each call is transport.

Sends N Embed calls one after another (one image each) on one channel and reports the
round trip's percentiles next to the server's own queue + inference time (`Timing`) and the
difference: the cost of gRPC, HTTP/2, TCP and image decoding on both sides.

  target/python/client/bin/python bench/serial_latency.py --addr 127.0.0.1:50051 \\
      --image tests/fixtures/fashion-mnist/00000-ankle-boot.png -n 500
(the venv is the one the e2e tests make from clients/python/requirements.txt)
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "clients" / "python"))
import grpc  # noqa: E402
from generate import ensure_stubs  # noqa: E402

ensure_stubs()
from cratemae.v1 import cratemae_pb2 as pb, cratemae_pb2_grpc as pb_grpc  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--addr", required=True)
    ap.add_argument("--image", type=Path, required=True)
    ap.add_argument("-n", type=int, default=500)
    args = ap.parse_args()
    stub = pb_grpc.CrateMaeStub(grpc.insecure_channel(args.addr))
    req = pb.EmbedRequest(images=[pb.Image(encoded=args.image.read_bytes())])
    for _ in range(20):
        stub.Embed(req, timeout=10)
    rtt, server, outside = [], [], []
    for _ in range(args.n):
        t = time.perf_counter()
        r = stub.Embed(req, timeout=10)
        dt = time.perf_counter() - t
        s = r.timing.queue_seconds + r.timing.inference_seconds
        rtt.append(dt * 1e3)
        server.append(s * 1e3)
        outside.append((dt - s) * 1e3)
    q = lambda v, p: statistics.quantiles(v, n=100)[p - 1]
    print(f"{args.n} serial Embed calls, one image each")
    print("| ms | p50 | p90 | p99 |\n|---|---|---|---|")
    for name, v in (("round trip", rtt), ("server queue + inference", server), ("round trip − server time", outside)):
        print(f"| {name} | {q(v, 50):.3f} | {q(v, 90):.3f} | {q(v, 99):.3f} |")


if __name__ == "__main__":
    main()
