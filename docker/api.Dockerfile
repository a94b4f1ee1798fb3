# slm-api: the HTTP API with the bundled model. torch comes from a wheel in docker/wheels/ or from
#   --build-arg TORCH_INDEX=<a PyTorch wheel index: the CPU one, or a CUDA one (then run with --gpus all)>;
#   pytorch.org's install page lists them. Without either, pip's index gives torch's default (CUDA) build.
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
# Where pip finds torch besides docker/wheels/ (empty: only there and pip's own index).
ARG TORCH_INDEX=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY docker/wheels/ /wheels/
RUN pip install --find-links /wheels ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} torch==2.13.0
COPY pyproject.toml README.md /src/
COPY src /src/src
RUN pip install "/src[serve]"

FROM ${BASE}
# A C compiler for the native decode step (slm/csrc/decode.c, built for this CPU at first start): 3-6x the
# tokens/s of the PyTorch step. Without it the API still works, on the PyTorch step.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 1000 slm
COPY --from=build /opt/venv /opt/venv
COPY models /models
ENV PATH=/opt/venv/bin:$PATH \
    SLM_MODELS_DIR=/models \
    SLM_MODEL=default \
    SLM_HOST=0.0.0.0 \
    SLM_PORT=8000 \
    PYTHONUNBUFFERED=1
USER 1000:1000
EXPOSE 8000
HEALTHCHECK --interval=5s --timeout=3s --start-period=20s --retries=12 \
  CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('SLM_PORT', '8000') + '/health', timeout=2)"]
CMD ["slm", "serve"]
