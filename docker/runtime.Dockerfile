# The runtime image: the mlops CLI with MLflow, the model server (ONNX Runtime on CUDA, CPU
# fallback), monitoring and retraining. Same requirements.txt and lock as `make setup`, and the
# same layout (/opt/mlops/.venv), so `mlops stack run <service>` behaves as on one machine.
#   docker build -f docker/runtime.Dockerfile -t mlops-runtime:latest .
# onnxruntime-gpu 1.31 loads its CUDA provider only with CUDA 13 and cuDNN 9 (checked 2026-11-26).
ARG CUDA_BASE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu22.04
FROM ${CUDA_BASE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/mlops/.venv/bin:$PATH

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Python 3.11, the version both lock files were resolved for (Ubuntu 22.04 ships 3.10).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl gnupg software-properties-common \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/mlops
COPY requirements.txt constraints.txt ./
# torch: the CUDA build of the locked version, from PyTorch's index (the lock pins it as 2.13.0).
RUN python3.11 -m venv .venv \
 && .venv/bin/pip install --upgrade "pip==26.0.1" \
 && .venv/bin/pip install --extra-index-url "${TORCH_INDEX}" -r requirements.txt -c constraints.txt

COPY pyproject.toml README.md ./
COPY common ./common
COPY mlops ./mlops
COPY serving ./serving
COPY monitoring ./monitoring
COPY retraining ./retraining
COPY config ./config
RUN .venv/bin/pip install --no-deps --no-build-isolation -e . \
 && useradd --system --uid 10001 --home-dir /var/lib/mlops --create-home mlops

USER 10001
ENV MLOPS_STATE_DIR=/var/lib/mlops
HEALTHCHECK NONE
CMD ["mlops", "--help"]
