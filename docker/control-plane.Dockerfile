# syntax=docker/dockerfile:1.7
# LoRA Fleet control plane: the API, the scheduler and the migrations. No CUDA.
#   docker build -f docker/control-plane.Dockerfile -t lorafleet/control-plane:0.1.0 .
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# The distribution depends on torch because the workers do; the control plane never imports it.
# We install the CPU-only wheel first (about 200 MB instead of several GB of CUDA libraries), so
# that `pip install .` finds torch satisfied, and keep pyproject.toml the one list of
# dependencies (`pip install --no-deps .` plus a hand-copied list would drift from it).
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
COPY workers ./workers
RUN pip install . && pip check

FROM python:${PYTHON_VERSION}-slim
RUN groupadd --system --gid 10001 lorafleet \
 && useradd --system --uid 10001 --gid 10001 --home-dir /app --no-create-home \
      --shell /usr/sbin/nologin lorafleet
COPY --from=build /opt/venv /opt/venv
# alembic.ini sits in the WORKDIR, so `alembic upgrade head` runs as is.
WORKDIR /app
COPY alembic.ini ./
COPY migrations ./migrations
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    LORAFLEET_DATA_DIR=/tmp/lorafleet \
    LORAFLEET_HOST=0.0.0.0
# Numeric, so that Kubernetes' runAsNonRoot can verify it (the chart uses the same ids).
USER 10001:10001
EXPOSE 8000
CMD ["uvicorn", "service.main:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000"]
