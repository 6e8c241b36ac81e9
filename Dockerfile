# syntax=docker/dockerfile:1
# The CPU image: runs every service (`slime serve router|rollout-engine|reward-model|rollout-buffer`) and the
# trainer (`slime train`, torch backend on CPU). Build from the repository root: docker build -t slime-rl .
#
# PyPI has no torch==2.13.0 build that stays on the CPU (its Linux wheel pulls several GB of CUDA libraries), so
# torch comes from PyTorch's CPU wheel index first; the project's own install then finds its torch pin satisfied.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --upgrade pip \
 && pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
# Dependencies first, from pyproject.toml alone, so that a source change does not reinstall them.
WORKDIR /src
COPY pyproject.toml README.md ./
RUN pip install . && pip uninstall -y slime-rl
COPY protos ./protos
COPY services ./services
COPY trainer ./trainer
COPY router ./router
COPY rollout_buffer ./rollout_buffer
RUN pip install --no-deps . \
 && slime --help >/dev/null

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/slime \
    HF_HOME=/home/slime/.cache/huggingface \
    SLIME_LOG_DIR=/tmp/slime-logs
RUN groupadd --gid 10001 slime \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/slime slime \
 && mkdir -p /app /shared \
 && chown slime:slime /shared
COPY --from=build /opt/venv /opt/venv
# The quick-start model and task data; the shared volume (/shared) holds checkpoints and synced weights.
COPY --chown=slime:slime examples /app/examples
WORKDIR /app
USER 10001:10001
# router, engine, reward model (HTTP, gRPC), rollout buffer (HTTP, gRPC), trainer (HTTP, gRPC).
EXPOSE 30000 30001 8000 8001 8889 8890 9000 9001
ENTRYPOINT ["slime"]
CMD ["--help"]
