# syntax=docker/dockerfile:1.7
#
# CRATE-MAE gRPC server.
#   CPU (default):  docker build -t crate-mae-serve .
#   CUDA:           docker build --target runtime-cuda -t crate-mae-serve:cuda .
# Ports: 50051 gRPC (health: grpc.health.v1, names "" and cratemae.v1.CrateMae), 9090 /metrics.
# SIGTERM drains: NOT_SERVING, stop accepting, finish accepted requests (25 s by default).

ARG RUST_IMAGE=rust:1.95-slim-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim
# CUDA 13.0: the GPU hosts run driver 580 (CUDA 13.0), which JIT-compiles the PTX candle embeds
# only if nvcc is no newer than 13.0; cudarc 0.19.10 knows CUDA up to 13.4.
ARG CUDA_DEVEL_IMAGE=nvidia/cuda:13.0.1-devel-ubuntu24.04
ARG CUDA_RUNTIME_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04

# ---- sources: the workspace as cargo needs it (every member's manifest and sources) ----------
# deploy/validate.sh loads the workspace from exactly these paths, so a new member that is
# missing here fails CI rather than the image build.
FROM scratch AS sources
COPY Cargo.toml Cargo.lock /src/
COPY model /src/model
COPY server /src/server
COPY train /src/train
COPY proto /src/proto
COPY tests /src/tests

# ---- build (CPU) -----------------------------------------------------------------------------
FROM ${RUST_IMAGE} AS build
COPY --from=sources /src /src
WORKDIR /src
# Registry and target dir are cache mounts: rebuilding after a source change recompiles only
# the workspace crates, not the dependency tree.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin crate-mae-server --bin crate-mae-cli \
 && install -D -m 0755 target/release/crate-mae-server /out/crate-mae-server \
 && install -D -m 0755 target/release/crate-mae-cli /out/crate-mae-cli \
 && objcopy --strip-debug /out/crate-mae-server \
 && objcopy --strip-debug /out/crate-mae-cli

# ---- runtime (CPU) ---------------------------------------------------------------------------
FROM ${RUNTIME_IMAGE} AS runtime
RUN groupadd --system --gid 10001 cratemae \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin cratemae
COPY --from=build /out/ /usr/local/bin/
USER 10001:10001
EXPOSE 50051 8000 9090
ENV CRATE_MAE_GRPC_ADDR=0.0.0.0:50051 \
    CRATE_MAE_HTTP_ADDR=0.0.0.0:8000 \
    CRATE_MAE_METRICS_ADDR=0.0.0.0:9090 \
    CRATE_MAE_LOG_FORMAT=json
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s \
    CMD ["/usr/local/bin/crate-mae-cli", "--addr", "http://127.0.0.1:50051", "--timeout", "2", "health", "--service", "cratemae.v1.CrateMae"]
# Exec form: the server is PID 1 and receives SIGTERM itself.
ENTRYPOINT ["/usr/local/bin/crate-mae-server"]

# ---- build (CUDA) ----------------------------------------------------------------------------
FROM ${CUDA_DEVEL_IMAGE} AS build-cuda
ARG RUST_TOOLCHAIN=1.95.0
# 90 = H100/H200 (candle's kernels build for sm_90a); 80 for A100, 89 for L4/L40S.
ARG CUDA_COMPUTE_CAP=90
ENV PATH=/root/.cargo/bin:${PATH} \
    CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP} \
    CUDARC_CUDA_VERSION=13000
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Versions follow the CUDA base image's distribution; pinning them here would break on every
# base image bump.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl gcc pkg-config \
 && rm -rf /var/lib/apt/lists/* \
 && curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain ${RUST_TOOLCHAIN}
COPY --from=sources /src /src
WORKDIR /src
RUN --mount=type=cache,target=/root/.cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --features cuda --bin crate-mae-server --bin crate-mae-cli \
 && install -D -m 0755 target/release/crate-mae-server /out/crate-mae-server \
 && install -D -m 0755 target/release/crate-mae-cli /out/crate-mae-cli \
 && objcopy --strip-debug /out/crate-mae-server \
 && objcopy --strip-debug /out/crate-mae-cli

# ---- runtime (CUDA) --------------------------------------------------------------------------
FROM ${CUDA_RUNTIME_IMAGE} AS runtime-cuda
RUN groupadd --system --gid 10001 cratemae \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin cratemae
COPY --from=build-cuda /out/ /usr/local/bin/
USER 10001:10001
EXPOSE 50051 8000 9090
ENV CRATE_MAE_GRPC_ADDR=0.0.0.0:50051 \
    CRATE_MAE_HTTP_ADDR=0.0.0.0:8000 \
    CRATE_MAE_METRICS_ADDR=0.0.0.0:9090 \
    CRATE_MAE_LOG_FORMAT=json \
    CRATE_MAE_DEVICE=cuda \
    CRATE_MAE_DTYPE=bf16
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s \
    CMD ["/usr/local/bin/crate-mae-cli", "--addr", "http://127.0.0.1:50051", "--timeout", "2", "health", "--service", "cratemae.v1.CrateMae"]
ENTRYPOINT ["/usr/local/bin/crate-mae-server"]

# The default build target is the CPU image.
FROM runtime
