#!/usr/bin/env python3
"""Generates the cratemae.v1 Python stubs from ../../proto into ./_gen (git-ignored).

Run it by hand (`python generate.py`) or let `crate_mae_client` call `ensure_stubs()` on
import: it regenerates only when the stubs are missing or older than the .proto.
"""
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO_ROOT = HERE.parent.parent / "proto"
PROTO = "cratemae/v1/cratemae.proto"
GEN = HERE / "_gen"
STAMP = GEN / "cratemae" / "v1" / "cratemae_pb2_grpc.py"  # written last by protoc


def generate() -> None:
    from grpc_tools import protoc  # from grpcio-tools

    # Generate into a scratch folder next to _gen, then swap it in, so a concurrent reader
    # never sees half-written stubs.
    tmp = Path(tempfile.mkdtemp(prefix="_gen.", dir=HERE))
    try:
        rc = protoc.main(["protoc", f"-I{PROTO_ROOT}", f"--python_out={tmp}",
                          f"--grpc_python_out={tmp}", str(PROTO_ROOT / PROTO)])
        if rc != 0:
            raise RuntimeError(f"protoc failed ({rc}) on {PROTO_ROOT / PROTO}")
        shutil.rmtree(GEN, ignore_errors=True)
        try:
            tmp.rename(GEN)
        except OSError:
            if not STAMP.exists():  # not another process that got there first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_stubs() -> None:
    """Generates the stubs if needed and puts _gen on sys.path (the generated modules import
    each other as `cratemae.v1.…`)."""
    proto = PROTO_ROOT / PROTO
    if not STAMP.exists() or STAMP.stat().st_mtime < proto.stat().st_mtime:
        generate()
    if str(GEN) not in sys.path:
        sys.path.insert(0, str(GEN))


if __name__ == "__main__":
    generate()
    print(f"stubs for {PROTO} written to {GEN}")
