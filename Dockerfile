# syntax=docker/dockerfile:1
#
# One image for every pagedserve service; the command picks which one runs:
#
#   docker build -t pagedserve .
#   docker run --rm -p 8000:8000 -p 50051:50051 pagedserve          # `pagedserve up`: the whole stack
#   docker run --rm pagedserve pagedserve tokenizer --host 0.0.0.0 --port 50052 --model /app/models/tiny-py
#
# docker-compose.yml runs one container per service from this image. The image carries the
# CPU build of torch, so it runs anywhere; for GPUs, build with a CUDA wheel index
# (--build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128) and run with --gpus.

FROM python:3.11-slim AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update && apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# Dependencies in layers of their own, so that a change to the source does not reinstall
# torch: torch from the PyTorch CPU index first (pip then keeps it: it satisfies `torch>=`),
# then everything else pyproject.toml lists.
RUN pip install --index-url "$TORCH_INDEX" "torch==$TORCH_VERSION"
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt

# The gRPC stubs are generated, never committed: `make gen-stubs` writes them into
# services/v1/ with the grpc_tools that the dependencies above installed.
COPY . .
RUN make gen-stubs PY=python && pip install --no-deps .
# Every service whose source is here must import from the installed package (from /, so
# not from /src): a subpackage missing from pyproject.toml's list fails the build, not a container.
RUN cd / && python -c "import importlib, pathlib; from pagedserve.cli import SUBCOMMANDS; \
mods = [m for m, _ in SUBCOMMANDS.values() if pathlib.Path('/src/services', *m.split('.')[1:]).with_suffix('.py').exists()]; \
[importlib.import_module(m) for m in mods]; print('importable:', *mods)"

FROM python:3.11-slim
# redis-server only for `pagedserve up` in a single container; compose uses redis:7-alpine.
RUN apt-get update && apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 pagedserve
COPY --from=build /opt/venv /opt/venv
COPY models/ /app/models/
# `pip install .` puts the package in site-packages, away from the repository's models/,
# so the bundled model is named here; override it with a path or a hub id.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PAGEDSERVE_MODEL=/app/models/tiny-py
USER pagedserve
WORKDIR /app
EXPOSE 8000 50051
CMD ["pagedserve", "up", "--host", "0.0.0.0"]
