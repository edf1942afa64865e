# Ferry's images: one Dockerfile, one target per role (docs/deploy.md).
#
#   docker build --target gateway    -t ferry/gateway .     # slim: no model runtime; has ferry-edge
#   docker build --target broker     -t ferry/broker .      # slim: no model runtime
#   docker build --target worker-cpu -t ferry/worker-cpu .  # onnxruntime (CPU)
#   docker build --target worker-gpu -t ferry/worker-gpu .  # CUDA 12 + cuDNN 9, onnxruntime-gpu
#
# The Inferentia worker has a Dockerfile of its own (docker/Dockerfile.neuron).
# Every image runs as the unprivileged user 10001 and copes with a read-only root file
# system (nothing is written outside /tmp). Built wheels travel between stages; no compiler
# or build tool reaches a runtime image.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
ARG DEBIAN_IMAGE=debian:12.8-slim
# onnxruntime-gpu 1.22 is built for CUDA 12 and cuDNN 9: keep these majors together.
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04
ARG ONNXRUNTIME_VERSION=1.22.1
ARG ONNXRUNTIME_GPU_VERSION=1.22.0
ARG FERRY_VERSION=0.1.0

# --- build: Ferry's own wheel (pure Python) ------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY ferry ferry
COPY gateway gateway
COPY broker broker
COPY workers workers
COPY protos protos
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# --- edge: the native front end (Go, docs/edge.md), from Debian's Go and grpc-go packages ------------
FROM ${DEBIAN_IMAGE} AS edge-build
# Unpinned apt packages on purpose: they follow the pinned Debian base.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends golang-go golang-google-grpc-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY scripts/build-edge scripts/build-edge
COPY gateway/edge gateway/edge
RUN scripts/build-edge

# --- runtime base: Python, Ferry with tracing, a non-root user --------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ARG FERRY_VERSION
LABEL org.opencontainers.image.title="Ferry" \
      org.opencontainers.image.description="Batched, Redis-brokered inference serving (Open Inference Protocol over gRPC)" \
      org.opencontainers.image.version="${FERRY_VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.documentation="https://github.com/ferry-serve/ferry/blob/main/docs/deploy.md" \
      org.opencontainers.image.source="https://github.com/ferry-serve/ferry"
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FERRY_MODEL_REPOSITORY=/models
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir "/wheels/ferry_serve-${FERRY_VERSION}-py3-none-any.whl[tracing]" \
    && rm -rf /wheels \
    && useradd --uid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin ferry
USER 10001
WORKDIR /tmp
ENTRYPOINT ["ferry"]

# --- gateway (and the edge, which runs from the same image: `ferry-edge`) ----------------------------
FROM runtime AS gateway
COPY --from=edge-build /src/.cache/edge/ferry-edge /usr/local/bin/ferry-edge
EXPOSE 8001 8002
HEALTHCHECK --interval=10s --timeout=4s --start-period=20s --retries=3 \
    CMD ["ferry", "health", "--grpc", "127.0.0.1:8001"]
CMD ["gateway"]

# --- broker --------------------------------------------------------------------------------------
FROM runtime AS broker
EXPOSE 8003
HEALTHCHECK --interval=10s --timeout=4s --start-period=20s --retries=3 \
    CMD ["ferry", "health", "--http", "127.0.0.1:8003"]
CMD ["broker"]

# --- CPU worker ----------------------------------------------------------------------------------
FROM runtime AS worker-cpu
ARG ONNXRUNTIME_VERSION
USER 0
RUN pip install --no-cache-dir "onnxruntime==${ONNXRUNTIME_VERSION}"
USER 10001
EXPOSE 8004
HEALTHCHECK --interval=10s --timeout=4s --start-period=30s --retries=3 \
    CMD ["ferry", "health", "--http", "127.0.0.1:8004"]
CMD ["worker", "--pool", "cpu"]

# --- GPU worker: CUDA base, onnxruntime-gpu pinned to its CUDA major --------------------------------
FROM ${CUDA_IMAGE} AS worker-gpu
ARG FERRY_VERSION
ARG ONNXRUNTIME_GPU_VERSION
LABEL org.opencontainers.image.title="Ferry GPU worker" \
      org.opencontainers.image.description="Ferry worker for NVIDIA GPUs (onnxruntime-gpu, CUDA 12)" \
      org.opencontainers.image.version="${FERRY_VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/ferry-serve/ferry"
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FERRY_MODEL_REPOSITORY=/models PATH=/opt/ferry/bin:$PATH
COPY --from=build /wheels /wheels
# Ubuntu 24.04's Python 3.12, in a virtual environment (PEP 668 keeps pip off the system one).
# Unpinned apt packages on purpose: they follow the pinned CUDA base's security updates.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/ferry \
    && /opt/ferry/bin/pip install --no-cache-dir \
        "/wheels/ferry_serve-${FERRY_VERSION}-py3-none-any.whl[tracing]" "onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}" \
    && rm -rf /wheels \
    && useradd --uid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin ferry
USER 10001
WORKDIR /tmp
EXPOSE 8004
HEALTHCHECK --interval=10s --timeout=4s --start-period=60s --retries=3 \
    CMD ["ferry", "health", "--http", "127.0.0.1:8004"]
ENTRYPOINT ["ferry"]
CMD ["worker", "--pool", "gpu"]
