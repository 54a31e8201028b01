# syntax=docker/dockerfile:1
# idemproxy container image.
#   docker build -t idemproxy .                              # the proxy (default target)
#   docker build --target example -t idemproxy-example .     # the example service, for trying it out
# The runtime writes nothing outside /tmp, so it runs with a read-only root filesystem.

# For reproducible builds pin the base by digest: --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:…
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: the idemproxy wheel and a wheel for every dependency ---------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip wheel --wheel-dir /wheels .

# --- runtime: a venv installed from those wheels only, run as an unprivileged user ---------
FROM ${PYTHON_IMAGE} AS runtime
# Declared again: an ARG from before the first FROM is not in scope inside a stage.
ARG PYTHON_IMAGE
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="idemproxy" \
      org.opencontainers.image.description="Sidecar reverse proxy: Idempotency-Key replay, tracing, health, metrics" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TMPDIR=/tmp \
    PATH=/opt/idemproxy/bin:$PATH \
    IDEMPROXY_CONFIG=/etc/idemproxy/proxy.yaml
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m venv /opt/idemproxy \
    && /opt/idemproxy/bin/pip install --no-index --find-links=/wheels /wheels/idemproxy-*.whl \
    && /opt/idemproxy/bin/python -m compileall -q /opt/idemproxy \
    && groupadd --system --gid 10001 idemproxy \
    && useradd --system --uid 10001 --gid idemproxy --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin idemproxy
COPY --chmod=0444 config/proxy.yaml /etc/idemproxy/proxy.yaml
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000 9901
STOPSIGNAL SIGTERM
ENTRYPOINT ["idemproxy", "run"]

# --- example: the demo service from deploy/example on the same Python (docker build --target example)
FROM runtime AS example
COPY --chmod=0444 deploy/example/recognitions.py /opt/example/recognitions.py
EXPOSE 8080
ENTRYPOINT ["python", "/opt/example/recognitions.py"]
CMD ["--host", "0.0.0.0", "--port", "8080"]

# --- default target: the proxy ----------------------------------------------------------------
FROM runtime AS idemproxy
