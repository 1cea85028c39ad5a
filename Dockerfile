# syntax=docker/dockerfile:1
#
# sd-vae-service image: `vae serve` on 0.0.0.0:8000 with the default model baked in.
#
#   CPU (default):  docker build -t sd-vae-service .
#   CUDA:           docker build --build-arg TORCH_VARIANT=cu128 -t sd-vae-service:cu128 .
#   Mirrored / air-gapped:
#                   docker build --build-arg BASE_IMAGE=registry.example/python:3.11-slim-bookworm \
#                     --build-arg TORCH_INDEX_URL=https://pypi.example/torch-cpu/simple \
#                     --build-arg PIP_INDEX_URL=https://pypi.example/simple -t sd-vae-service .
#
# TORCH_VARIANT names a PyTorch wheel index (https://download.pytorch.org/whl/<variant>):
# `cpu` gives a small CPU-only image; `cu126`, `cu128`, ... give CUDA builds whose CUDA
# runtime ships inside the wheels, so the same slim base serves both (the host needs only
# the NVIDIA driver and the NVIDIA Container Toolkit). TORCH_INDEX_URL replaces that index,
# PIP_INDEX_URL replaces PyPI for everything else, PIP_EXTRA_ARGS is added to every
# `pip install` (e.g. "--no-index --find-links /wheels", "--trusted-host ..."). BASE_IMAGE is
# any Debian-like image with python3 (>= 3.11) and its venv module, used by both stages.
# See docs/deployment.md.

ARG PYTHON_VERSION=3.11
ARG BASE_IMAGE=python:${PYTHON_VERSION}-slim-bookworm

# ---------------------------------------------------------------------------------------
# Stage 1: build a self-contained virtual environment in /opt/venv.
# ---------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS builder

ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
# Unset: PyPI. pip reads it from the environment, where a build argument appears in RUN.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_ARGS=

# SOURCE_DATE_EPOCH makes pip write hash-based .pyc files (PEP 552), which stay valid however
# the layers store file times: some builders (buildah's vfs/chroot, seen) round the sources'
# sub-second mtimes up, so timestamp .pyc go stale and the non-root server, unable to rewrite
# them, would compile much of torch from source at every start.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SOURCE_DATE_EPOCH=315532800 \
    PATH=/opt/venv/bin:$PATH

# torch first, from the PyTorch index of the chosen variant: a later `pip install .`
# then finds `torch>=2.4,<3` satisfied and never pulls the (CUDA) build from PyPI.
# PIP_EXTRA_ARGS is unquoted on purpose: it holds several words (which hadolint would take
# for an unpinned package name; torch is pinned).
# hadolint ignore=SC2086,DL3013
RUN python3 -m venv /opt/venv \
    && pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" ${PIP_EXTRA_ARGS} "torch==${TORCH_VERSION}"

# The project's dependencies, pinned by constraints.txt, in a layer of their own that a
# source change does not invalidate.
WORKDIR /src
COPY pyproject.toml constraints.txt ./
# hadolint ignore=SC2086
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > requirements.txt \
    && pip install --no-cache-dir -c constraints.txt ${PIP_EXTRA_ARGS} -r requirements.txt

# The project itself (a regular, non-editable install). models/default/ is package data,
# so the shipped default model lands inside site-packages with the code. The build context
# is an allow-list (.dockerignore): pyproject.toml, README.md, constraints.txt, app/,
# models/, benchmarks/.
COPY . ./
# /opt/venv/default-model: a stable path to the installed default model, for VAE_MODELS lists
# that name it beside others (e.g. default=/opt/venv/default-model,mine=/models/mine). It is
# looked up in the installed distribution's file list with `python -I` (isolated: the current
# directory, /src with the sources, is not on sys.path), so it points into site-packages,
# and the build fails if the link would dangle.
# hadolint ignore=SC2086
RUN pip install --no-cache-dir -c constraints.txt ${PIP_EXTRA_ARGS} . \
    && python -I -c "import importlib.metadata as md, os, sys; d = md.distribution('sd-vae-service'); [cfg] = [f for f in d.files if f.name == 'config.json' and f.parent.name == 'default']; os.symlink(os.path.dirname(d.locate_file(cfg)), '/opt/venv/default-model'); real = os.path.realpath('/opt/venv/default-model'); assert real.startswith(sys.prefix + '/lib/') and os.path.isfile(real + '/diffusion_pytorch_model.safetensors'), real; print('/opt/venv/default-model ->', real)"

# ---------------------------------------------------------------------------------------
# Stage 2: the runtime image; no build context, no pip cache, no sources.
# ---------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime

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
