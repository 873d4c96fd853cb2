# syntax=docker/dockerfile:1
# tidal's images, one Dockerfile, two targets:
#
#   docker build --target tidal  -t ghcr.io/tidal-llm/tidal:0.1.0 .         # operator, scheduler
#                                                                          # extender, node agent
#   docker build --target worker -t ghcr.io/tidal-llm/tidal-worker:0.1.0 .  # the inference worker
#
# These are the chart's defaults (charts/tidal: image.repository, image.tag = appVersion = the
# package version) and the CRDs' default spec.image (tidal.operator.crds.DEFAULT_IMAGE). Nothing
# is published under ghcr.io/tidal-llm yet: build, push to your registry, and set
# image.repository. Both run as the non-root uid/gid 65532. The entrypoint of `tidal` is `tidal`
# (the chart's containers name their command anyway); the worker's is `tidal worker`, because the
# operator's worker pods give only the arguments (`serve --port=...`, `batch`). The chart's node
# agent overrides the user to root (the kubelet's device plugin directory is root's). The last
# stage, `tidal`, is what a plain `docker build .` builds.
#
# The worker's CUDA comes with PyPI's torch wheel (the CUDA 12 runtime libraries as nvidia-*
# wheels); the driver comes from the node (the nvidia RuntimeClass / container toolkit). Triton
# compiles a small launcher with the host C compiler at run time, hence gcc in the worker image.
# TORCH_INDEX picks another wheel index, e.g. https://download.pytorch.org/whl/cu128.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- build: a virtual environment in /opt/tidal ---------------------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/tidal
WORKDIR /src
COPY pyproject.toml README.md ./
COPY tidal ./tidal
RUN /opt/tidal/bin/pip install .

FROM build AS build-worker
ARG TORCH_INDEX=https://pypi.org/simple
RUN /opt/tidal/bin/pip install --extra-index-url "${TORCH_INDEX}" ".[kernels,worker]"

# -- the worker image: `tidal worker serve|batch` on the pod's GPUs -------------------------
FROM ${PYTHON_IMAGE} AS worker
LABEL org.opencontainers.image.source="https://github.com/tidal-llm/tidal" \
      org.opencontainers.image.description="tidal inference worker (CUDA, Triton kernels)" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && install -d -o 65532 -g 65532 /home/tidal
COPY --from=build-worker /opt/tidal /opt/tidal
ENV PATH=/opt/tidal/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/home/tidal \
    TRITON_CACHE_DIR=/home/tidal/.triton \
    HF_HOME=/home/tidal/.cache/huggingface
USER 65532:65532
WORKDIR /home/tidal
ENTRYPOINT ["tidal", "worker"]
CMD ["--help"]

# -- the control-plane image: operator, extender, node agent --------------------------------
FROM ${PYTHON_IMAGE} AS tidal
LABEL org.opencontainers.image.source="https://github.com/tidal-llm/tidal" \
      org.opencontainers.image.description="tidal: operator, scheduler extender, node agent" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/tidal /opt/tidal
ENV PATH=/opt/tidal/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
USER 65532:65532
ENTRYPOINT ["tidal"]
CMD ["--help"]
