# headserve: the embedded mini GPT-2 and the committed heads, served on port 8000.
#   CPU (default):  docker build -t headserve .
#   CUDA:           docker build -t headserve:cuda \
#                     --build-arg BASE_IMAGE=pytorch/pytorch:2.7.0-cuda12.6-cudnn9-runtime \
#                     --build-arg TORCH_SPEC=preinstalled .
#   run:            TOKEN=$(openssl rand -hex 32)
#                   docker run -p 8000:8000 -v "$PWD/registry:/heads" -e HEADSERVE_ADMIN_TOKEN="$TOKEN" headserve
# Heads live in /heads (HEADSERVE_HEADS_DIR); mount a volume there so heads registered over HTTP
# survive the container. The image ships registry/ as the default content of /heads.
# The container listens on 0.0.0.0, so registering and deleting heads (POST/DELETE /heads) is
# refused with 403 unless HEADSERVE_ADMIN_TOKEN is set; callers then send
# "Authorization: Bearer <token>". Without the token the image serves read-only, which is safe.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# "preinstalled" keeps the torch the base image brings (CUDA images); otherwise the CPU wheel.
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    HEADSERVE_HOST=0.0.0.0 HEADSERVE_PORT=8000 HEADSERVE_HEADS_DIR=/heads \
    HEADSERVE_BASE_MODEL=/app/models/mini-gpt2 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

WORKDIR /app
RUN if [ "$TORCH_SPEC" != "preinstalled" ]; then \
        pip install --no-cache-dir --index-url "$TORCH_INDEX" "$TORCH_SPEC"; fi
COPY pyproject.toml README.md ./
COPY heads heads
COPY server server
COPY training training
COPY clients clients
RUN pip install --no-cache-dir .
COPY models models
COPY registry /heads

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz')"
CMD ["python", "-m", "server"]
