# syntax=docker/dockerfile:1.7
# LoRA Fleet Ray image: training (Ray Train) and serving (Ray Serve) pods. CUDA, torch,
# bitsandbytes, ray. KubeRay runs `ray start` in it, so it builds on Ray's own image.
#   docker build -f docker/ray-worker.Dockerfile -t lorafleet/ray-worker:0.1.0 .
ARG RAY_VERSION=2.60.0
ARG CUDA_TAG=cu128

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
COPY workers ./workers
# Only our wheel here; its dependencies are resolved against the CUDA base below.
RUN pip wheel --no-deps --wheel-dir /wheels .

FROM rayproject/ray:${RAY_VERSION}-py311-${CUDA_TAG}
ARG RAY_VERSION
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=build /wheels /tmp/wheels
# Ray pinned to the base image's version (the chart's ray.rayVersion): pip must not swap it.
# torch from PyPI is the CUDA build on linux/x86_64; bitsandbytes ships its CUDA kernels.
RUN pip install /tmp/wheels/*.whl "ray[serve,train,default]==${RAY_VERSION}" \
 && python -c "import torch, bitsandbytes, peft, ray.serve, workers.spec" \
 && rm -rf /tmp/wheels
ENV PYTHONUNBUFFERED=1 \
    TOKENIZERS_PARALLELISM=false \
    RAY_USAGE_STATS_ENABLED=0
# The base image's non-root `ray` user (uid 1000, gid 100), matching the chart's Ray pods.
USER 1000:100
WORKDIR /home/ray
