# syntax=docker/dockerfile:1
#
# sd-vae-service image: `vae serve` on 0.0.0.0:8000 with the default model baked in.
#
#   CPU (default):  docker build -t sd-vae-service .
#   CUDA:           docker build --build-arg TORCH_VARIANT=cu128 -t sd-vae-service:cu128 .
#
# TORCH_VARIANT names a PyTorch wheel index (https://download.pytorch.org/whl/<variant>):
# `cpu` gives a small CPU-only image; `cu126`, `cu128`, ... give CUDA builds whose CUDA
# runtime ships inside the wheels, so the same slim base serves both (the host needs only
# the NVIDIA driver and the NVIDIA Container Toolkit). See docs/deployment.md.

ARG PYTHON_VERSION=3.11

# ---------------------------------------------------------------------------------------
# Stage 1: build a self-contained virtual environment in /opt/venv.
# ---------------------------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS builder

ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, from the PyTorch index of the chosen variant: a later `pip install .`
# then finds `torch>=2.4,<3` satisfied and never pulls the (CUDA) build from PyPI.
RUN pip install --no-cache-dir --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" \
        "torch==${TORCH_VERSION}"

# The project itself (a regular, non-editable install). models/default/ is package data,
# so the shipped default model lands inside site-packages with the code.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY app/ app/
COPY models/ models/
COPY benchmarks/ benchmarks/
# /opt/venv/default-model: a stable path to the installed default model, for VAE_MODELS lists
# that name it beside others (e.g. default=/opt/venv/default-model,mine=/models/mine).
RUN pip install --no-cache-dir . \
    && python -c "import os, app.cli.main, models.vae.loading as m; os.symlink(m.DEFAULT_MODEL_DIR, '/opt/venv/default-model')"

# ---------------------------------------------------------------------------------------
# Stage 2: the runtime image; no build context, no pip cache, no sources.
# ---------------------------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime

ARG TORCH_VARIANT=cpu
LABEL org.opencontainers.image.title="sd-vae-service" \
      org.opencontainers.image.description="Stable-Diffusion-style VAE (diffusers AutoencoderKL) over HTTP" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="sd-vae-service" \
      ai.sd-vae-service.torch-variant="${TORCH_VARIANT}"

# A fixed, unprivileged uid/gid so that volume ownership is predictable.
RUN groupadd --system --gid 10001 vae \
    && useradd --system --uid 10001 --gid vae --home-dir /home/vae --create-home \
        --shell /usr/sbin/nologin vae \
    && mkdir -p /models \
    && chown vae:vae /models

COPY --from=builder /opt/venv /opt/venv

# Configuration is by environment (pydantic-settings, VAE_*); command-line options
# appended to `docker run IMAGE ...` override it. HF_HUB_OFFLINE: models load only from
# local folders, never from a hub.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/vae \
    HF_HOME=/home/vae/.cache/huggingface \
    HF_HUB_OFFLINE=1 \
    VAE_HOST=0.0.0.0 \
    VAE_PORT=8000

# More models: mount folders under /models and name them with VAE_MODELS or --model (naming
# any model replaces the default one unless it is listed too, as /opt/venv/default-model).
VOLUME ["/models"]
WORKDIR /home/vae
# Numeric, so that Kubernetes runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
EXPOSE 8000

# Liveness only (/healthz answers while the process is up; /readyz is for load balancers).
# Python's urllib, not curl: the slim image has no curl, and none is needed.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; r = urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('VAE_PORT', '8000'), timeout=4); sys.exit(0 if r.status == 200 else 1)"]

# Exec form, no shell in between: `vae serve` receives SIGTERM itself on `docker stop`
# and drains gracefully. Arguments after the image name are appended (e.g. --model).
ENTRYPOINT ["vae", "serve"]
CMD []
